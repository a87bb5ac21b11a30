//! One build, from plan to image: RIE, base image (pull if missing and allowed), layer walk,
//! fingerprint, cache check, image assembled and streamed into the engine's loader, outcome.
//!
//! Runs on its own task (see `builds.rs`); reports through a [`Reporter`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::access::{self, Peer};
use crate::assemble::{self, Reuse};
use crate::assembly::{self, Assembly, short_id};
use crate::base;
use crate::builds::Reporter;
use crate::engine::{ImageInfo, ImageStoreKind};
use crate::error::{Error, Result};
use crate::fingerprint::{self, FINGERPRINT_LABEL, Parts, decide};
use crate::image_store;
use crate::layers;
use crate::outcome::{Completed, Event, LogKind, Reason};
use crate::prune;
use crate::registry_cache;
use crate::resolve::Plan;

mod shared;

pub use shared::{Shared, rie_path};

/// Layers with at most this many entries at their last walk are walked inline.
const INLINE_WALK_ENTRIES: usize = 64;

/// Runs one build (or cache check) to its outcome.
/// Layer files are read with `peer`'s rights (see `access.rs`).
///
/// The steps a cache hit skips are boxed: this future is moved whole into its task, and
/// their states inline made it so large that copying it was a warm hit's biggest `memcpy`.
///
/// The steps of one build, in order: walk the inputs (RIE and layers, hashed), get the base
/// image, compute the parts and decide whether the image is up to date, build it in the engine,
/// and tidy up after the build.
pub async fn run(
    shared: Arc<Shared>,
    plan: Plan,
    peer: Peer,
    reporter: Reporter,
) -> Result<Completed> {
    let started = Instant::now();
    if !plan.ignored_layers.is_empty() {
        reporter.emit(Event::Warning {
            code: "layers_ignored".into(),
            message: ignored_layers_message(&plan.ignored_layers),
        });
    }
    let inputs = walk_inputs(&shared, &plan, &peer, &reporter).await?;
    let base = base::base_image(
        &shared.tasks,
        &shared.engine,
        &shared.freshness,
        shared.build_timeout,
        &plan,
        &reporter,
    )
    .await?;
    let parts = parts_of(&plan, &base::identity(&shared.engine, &base).await, &inputs);
    // The tag is asked of the engine, never the index: a "cached" answer must name an image
    // that exists, and the index hears of a `docker rmi` only when its event arrives, which
    // can be after the removal has returned and the next request has come in.
    let existing = shared.engine.inspect_fresh(plan.tag.as_str()).await?;
    let (reason, changed_layer) = decide(existing.as_ref(), &parts, plan.force_image_build);
    let (image_id, config, cached, reason) = if reason == Reason::UpToDate {
        record_use(&shared, plan.tag.as_str());
        // `decide` only says UpToDate for an existing image.
        let existing = existing.unwrap_or_default();
        (existing.id, existing.config, true, reason)
    } else if let Some(pulled) =
        Box::pin(from_registry(&shared, &plan, &parts, reason, &reporter)).await
    {
        let adopted = Box::pin(after_build(&shared, &plan, &pulled, existing)).await?;
        let tree = inputs.tree.clone();
        assembly::remember_pulled(&shared.images, &parts, &inputs.rie, tree, &base, &adopted).await;
        (adopted.id, adopted.config, false, Reason::RegistryHit)
    } else {
        let images = (&base, existing.as_ref());
        let layers = (plan.layers.clone(), inputs.tree.clone());
        let (image_id, pushable) = Box::pin(build(
            &shared, &plan, &parts, inputs, images, peer, &reporter,
        ))
        .await?;
        let built = Box::pin(after_build(&shared, &plan, &image_id, existing)).await?;
        if let Some(cache) = shared.registry_cache.as_ref().filter(|_| pushable) {
            registry_cache::push_in_background(
                &shared.tasks,
                shared.engine.clone(),
                reporter.builds().clone(),
                cache.clone(),
                built.id.clone(),
                parts.fingerprint(),
                layers,
            );
        }
        (built.id, built.config, false, reason)
    };
    Ok(Completed {
        tag: plan.tag.as_str().to_owned(),
        image_id,
        cached,
        reason,
        changed_layer,
        duration_ms: elapsed_ms(started),
        config,
        warnings: Vec::new(),
    })
}

/// Before a cold build, with `--registry-cache`: the image another daemon built for the
/// fingerprint of `parts`, pulled and tagged (see `registry_cache.rs`); `None` builds locally.
/// A forced rebuild never asks: the client wants a fresh build. (A hit never needs the
/// fingerprint beyond `decide`'s comparison, so it is computed here, not for every request.)
async fn from_registry(
    shared: &Shared,
    plan: &Plan,
    parts: &Parts,
    reason: Reason,
    reporter: &Reporter,
) -> Option<String> {
    let cache = shared.registry_cache.as_ref()?;
    if reason == Reason::Forced {
        return None;
    }
    let engine = &shared.engine;
    registry_cache::fetch(
        engine,
        cache,
        &parts.fingerprint(),
        &plan.tag,
        shared.build_timeout,
        reporter,
    )
    .await
}

/// The `layers_ignored` warning: which layers an IMAGE function's request named in vain.
fn ignored_layers_message(layers: &[crate::resolve::LayerSpec]) -> String {
    let names: Vec<String> = layers.iter().map(|l| format!("{:?}", l.name)).collect();
    format!(
        "layers {} ignored: an IMAGE function has no layers (Lambda refuses them, SAM ignores \
         them); put their files in the function's image instead",
        names.join(", ")
    )
}

/// What the walk read: the RIE's digest and the merged layer tree (none without layers).
struct Inputs {
    rie: PathBuf,
    rie_digest: [u8; 32],
    tree: Option<Arc<layers::Tree>>,
}

/// Step 1: hashes the RIE and walks the layers (with the peer's rights), and reports the
/// walk's warnings.
///
/// One trip to the blocking pool for all file I/O (a warm hit is a few stats; each trip costs
/// a thread hand-off). Walks are bounded (`walks`): many large distinct requests must not fill
/// the blocking pool that running builds stream from.
async fn walk_inputs(
    shared: &Shared,
    plan: &Plan,
    peer: &Peer,
    reporter: &Reporter,
) -> Result<Inputs> {
    let rie = rie_path(&shared.rie_dir, plan.arch);
    let walk_permit = shared
        .walks
        .acquire()
        .await
        .map_err(|_| Error::Unavailable("daemon shutting down".into()))?;
    let (cache, path, specs, limits) = (
        shared.stat_cache.clone(),
        rie.clone(),
        plan.layers.clone(),
        shared.limits,
    );
    let zips = shared.zips.clone();
    let arch = plan.arch;
    let peer_for_walk = peer.clone();
    let work =
        move || {
            let rie_digest = cache.file_digest(&path).map_err(|err| match err {
            Error::NotFound(_) => Error::FailedPrecondition(format!(
                "runtime interface emulator missing at {}; fetch it with `scripts/fetch-rie.sh {}` \
                 or point --rie-dir at a directory holding {}",
                path.display(),
                path.parent().map(|p| p.display().to_string()).unwrap_or_default(),
                path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            )),
            other => other,
        })?;
            let tree = if specs.is_empty() {
                None
            } else {
                let walked = access::as_peer(&peer_for_walk, || {
                    let mut tree = layers::walk(&specs, limits, &cache, &zips)?;
                    let found = layers::arch_warnings(&tree, arch, &cache);
                    tree.warnings.extend(found);
                    Ok(tree)
                });
                Some(walked.map_err(|err| access::denied_for(&peer_for_walk, err))?)
            };
            Ok((rie_digest, tree))
        };
    // A layer this tag walked before with only a few entries costs microseconds: walk it
    // right here instead of waking a blocking-pool thread, which on an idle machine costs
    // more than the walk. The rights switch is per thread and this code does not yield,
    // so the worker thread gets its own rights back before it runs anything else.
    let small = shared
        .walk_sizes
        .get(plan.tag.as_str())
        .is_some_and(|(entries, _)| entries <= INLINE_WALK_ENTRIES);
    let (rie_digest, tree) = if small {
        work()?
    } else {
        crate::sync::blocking(work).await?
    };
    // Zip layers never go inline: a changed archive may need a long extraction.
    let entries = tree.as_ref().map_or(0, |t| {
        if t.entries.values().any(|e| e.from_cache) {
            usize::MAX
        } else {
            t.entries.len()
        }
    });
    shared
        .walk_sizes
        .set(plan.tag.as_str(), entries, Instant::now());
    for warning in tree.iter().flat_map(|t| t.warnings.iter()) {
        reporter.emit(Event::Warning {
            code: warning.code.into(),
            message: warning.message.clone(),
        });
    }
    drop(walk_permit);
    Ok(Inputs {
        rie,
        rie_digest,
        tree: tree.map(Arc::new),
    })
}

/// Step 3: the digests that determine the image (the decision follows in [`decide`]); `base`
/// is the base's identity (`base::identity`).
fn parts_of(plan: &Plan, base: &str, inputs: &Inputs) -> Parts {
    Parts {
        base: base.to_owned(),
        rie: hex::encode(inputs.rie_digest),
        dockerfile: hex::encode(Sha256::digest(plan.dockerfile.as_bytes())),
        layers: plan
            .layers
            .iter()
            .zip(inputs.tree.iter().flat_map(|t| t.layer_digests.iter()))
            .map(|(spec, digest)| (spec.name.clone(), digest.clone()))
            .collect(),
    }
}

/// Step 4: assembles the image from layers and loads it into the engine, within
/// `--build-timeout`, holding a build slot: a delta over the previous image when one can be
/// made, else a full assembly; layers the engine holds are referenced, not sent. If the engine
/// lost a layer we relied on (removed behind our back), every layer is sent again: a build
/// never fails for that. Returns the image id and whether it may be pushed to the registry
/// cache: not when Docker's containerd store got a docker archive (its base layers are
/// zero-size entries there, which that store records as empty blobs).
async fn build(
    shared: &Shared,
    plan: &Plan,
    parts: &Parts,
    inputs: Inputs,
    images: (&ImageInfo, Option<&ImageInfo>),
    peer: Peer,
    reporter: &Reporter,
) -> Result<(String, bool)> {
    let (base, existing) = images;
    let _slot = reporter.slot().await?;
    pass_gate(shared.hooks.before_build.as_ref()).await;
    let work = async {
        let (reuse, format) = base::archive_format(&shared.engine, base).await?;
        // Both exist now (inspected for this request): the engine holds their chains.
        shared.images.note_chains(&base.diff_ids);
        if let Some(existing) = existing {
            shared.images.note_chains(&existing.diff_ids);
        }
        let (rie, tree) = (inputs.rie.as_path(), inputs.tree.as_deref());
        let assembly = assembly::plan(&shared.images, parts, rie, tree, base, existing, reuse)?;
        let reused = assembly.layers.iter().any(|l| l.skip);
        let pushable = matches!(format, assemble::Format::OciLayout { .. })
            || shared.engine.known_image_store() != Some(ImageStoreKind::Containerd);
        let image = (base, format.clone());
        let loaded = match load(shared, plan, parts, image, assembly, peer.clone(), reporter).await
        {
            Err(err) if reused && !matches!(err, Error::DeadlineExceeded(_)) => {
                reporter.emit(Event::Warning {
                    code: "layers_resent".into(),
                    message: format!(
                        "the engine refused an image reusing layers it held before ({err}); \
                         sending every layer"
                    ),
                });
                shared.images.forget_chains();
                let full = assembly::full(&shared.images, parts, rie, tree, base, Reuse::Nothing)?;
                load(
                    shared,
                    plan,
                    parts,
                    (base, format),
                    full,
                    peer.clone(),
                    reporter,
                )
                .await
            }
            other => other,
        };
        loaded.map(|id| (id, pushable))
    };
    match tokio::time::timeout(shared.build_timeout, work).await {
        Ok(result) => result.map_err(|err| access::denied_for(&peer, err)),
        Err(_) => Err(Error::DeadlineExceeded(format!(
            "building {} took longer than --build-timeout ({}s); raise it or check the engine",
            plan.tag,
            shared.build_timeout.as_secs()
        ))),
    }
}

/// Streams `assembly` into the engine's loader in `format` over `base`, tags the image, and
/// remembers its diff IDs, chains, blobs and listing. Reports each layer (referenced or sent)
/// and the bytes sent.
async fn load(
    shared: &Shared,
    plan: &Plan,
    parts: &Parts,
    (base, format): (&ImageInfo, assemble::Format),
    assembly: Assembly,
    peer: Peer,
    reporter: &Reporter,
) -> Result<String> {
    let oci = matches!(format, assemble::Format::OciLayout { .. });
    let total = assembly.layers.len();
    let mut listing = assembly.listing;
    listing.labels = assembly.layers.iter().map(|l| l.label.clone()).collect();
    for (index, layer) in assembly.layers.iter().enumerate() {
        let what = if layer.skip { "reused" } else { "sending" };
        reporter.emit(Event::Log {
            kind: LogKind::Status,
            text: format!("layer {}/{total} {}: {what}", index + 1, layer.label),
            step: u32::try_from(index + 1).unwrap_or(u32::MAX),
        });
    }
    let spec = assemble::Spec {
        base_diff_ids: base.diff_ids.clone(),
        base_config: base.image_config.clone(),
        labels: fingerprint::labels(parts),
        layers: assembly.layers,
        peer,
        format,
    };
    let (producer_result, engine_result) = stream_into_engine(shared, spec, reporter).await;
    // The producer's own error is the real cause when the upload broke off, unless it only
    // saw the engine stop reading (UNAVAILABLE): then the engine's error says why.
    let (assembled, loaded) = match (producer_result, engine_result) {
        (Some(Err(err)), Err(_)) if !matches!(err, Error::Unavailable(_)) => return Err(err),
        (Some(Err(err)), Ok(_)) => return Err(err),
        (_, Err(err)) => return Err(err),
        (Some(Ok(assembled)), Ok(loaded)) => (assembled, loaded),
        (None, Ok(_)) => {
            return Err(Error::Internal("the image writer never finished".into()));
        }
    };
    // The image as the engine names it: the containerd image store's IDs are manifest
    // digests, the config digest we wrote names nothing there (engine.rs, `load`).
    let image_id = crate::engine::tagged_id(loaded, &assembled.image_id);
    if let Err(err) = shared.engine.tag(&image_id, &plan.tag).await {
        // Nothing else names the image just loaded: an untagged image must not stay behind.
        if let Err(removal) = shared.engine.remove_image(&image_id, false).await {
            tracing::warn!(image = %image_id, error = %removal, "could not remove an untagged image");
        }
        return Err(err);
    }
    for (key, diff_id) in assembly.keys.iter().zip(&assembled.layers) {
        if let Some(key) = key {
            shared.images.record_diff_id(key, diff_id);
        }
    }
    shared.images.note_chains(&assembled.diff_ids);
    if oci {
        // Our layers went in (or were named) uncompressed: the content store holds them so.
        shared.images.note_blobs(&assembled.layers);
    }
    // Every layer tar has at least its end-of-archive blocks, so a size of 0 is one not known
    // (a kept layer of an image whose listing had no sizes): then none are recorded, and prune
    // counts the image whole.
    if assembled.layers.iter().all(|layer| layer.size > 0) {
        listing.layer_bytes = assembled.layers.iter().map(|layer| layer.size).collect();
    }
    shared.images.record_listing(&image_id, &listing);
    reporter.emit(Event::Log {
        kind: LogKind::Status,
        text: format!(
            "loaded {} ({} of layers sent)",
            short_id(&image_id),
            bytesize::ByteSize::b(assembled.layer_bytes_sent)
        ),
        step: u32::try_from(total).unwrap_or(u32::MAX),
    });
    Ok(image_id)
}

/// Streams the archive of `spec` into the engine's loader while it is written, reporting the
/// engine's output and the bytes sent (every 250 ms, and once at the end). Returns the
/// writer's result (`None` if it never finished) and the engine's (what it says it loaded).
async fn stream_into_engine(
    shared: &Shared,
    spec: assemble::Spec,
    reporter: &Reporter,
) -> (Option<Result<assemble::Assembled>>, Result<Option<String>>) {
    let sent = Arc::new(AtomicU64::new(0));
    let producer = assemble::produce(spec, sent.clone());
    let mut done = Some(producer.done);
    let mut producer_result: Option<Result<assemble::Assembled>> = None;
    let loading = shared.engine.load(producer.stream, |info| {
        if let Some(text) = info
            .stream
            .as_deref()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            reporter.emit(Event::Log {
                kind: LogKind::Stream,
                text: text.to_owned(),
                step: 0,
            });
        }
    });
    tokio::pin!(loading);
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut reported = 0;
    let engine_result = loop {
        tokio::select! {
            result = &mut loading => break result,
            result = async { done.as_mut().expect("polled only while Some").await }, if done.is_some() => {
                done = None;
                producer_result = Some(result.unwrap_or_else(|err| Err(Error::Internal(format!("image writer failed: {err}")))));
                let bytes = sent.load(Ordering::Relaxed);
                reporter.emit(Event::ContextProgress { bytes_sent: bytes, bytes_total: bytes });
                reported = bytes;
            }
            _ = ticker.tick() => {
                let bytes = sent.load(Ordering::Relaxed);
                if bytes != reported && done.is_some() {
                    reporter.emit(Event::ContextProgress { bytes_sent: bytes, bytes_total: 0 });
                    reported = bytes;
                }
            }
        }
    };
    if let Some(done) = done {
        // The engine ended first; the producer stops once its channel is gone.
        producer_result = Some(
            done.await
                .unwrap_or_else(|err| Err(Error::Internal(format!("image writer failed: {err}")))),
        );
    }
    reporter.metrics().bytes_sent(sent.load(Ordering::Relaxed));
    (producer_result, engine_result)
}

/// Step 5: the built image as the engine now has it under the tag; then, in the background,
/// removes the image the tag moved from, records the use, and prunes to `--max-cache-size`.
async fn after_build(
    shared: &Shared,
    plan: &Plan,
    image_id: &str,
    existing: Option<ImageInfo>,
) -> Result<ImageInfo> {
    pass_gate(shared.hooks.after_build.as_ref()).await;
    let engine = &shared.engine;
    let built = engine
        .inspect_fresh(plan.tag.as_str())
        .await?
        .ok_or_else(|| {
            Error::Internal(format!(
                "the engine built {image_id} but has no image tagged {}",
                plan.tag
            ))
        })?;
    if let Some(old) =
        existing.filter(|old| old.id != built.id && old.labels.contains_key(FINGERPRINT_LABEL))
    {
        // The tag moved: remove the superseded image if nothing uses it (SAM does the same),
        // and its listing with it (the new image's listing is what the next delta needs).
        let (engine, cache_dir) = (engine.clone(), shared.cache_dir.clone());
        let name = format!("removal of superseded image {}", short_id(&old.id));
        shared.tasks.spawn(name, async move {
            if engine.remove_unused(&old.id).await {
                image_store::remove_listing(&cache_dir, &old.id);
            }
        });
    }
    record_use(shared, plan.tag.as_str());
    if let Some(cap) = shared.max_cache_bytes {
        let (engine, cache_dir) = (engine.clone(), shared.cache_dir.clone());
        shared.tasks.spawn("prune to --max-cache-size", async move {
            // Images only: a build in flight may be reading an extracted layer.
            let policy = prune::Policy {
                keep_bytes: Some(cap),
                keep_layers: true,
                ..Default::default()
            };
            if let Err(err) = prune::prune(&engine, &cache_dir, policy).await {
                tracing::warn!(error = %err, "automatic prune to --max-cache-size failed");
            }
        });
    }
    Ok(built)
}

/// Notes the tag's use for prune, off the request path and at most once a minute per tag
/// (prune works in hours; a warm hit should not pay for a file write).
fn record_use(shared: &Shared, tag: &str) {
    let now = Instant::now();
    let fresh = shared
        .last_recorded
        .get(tag)
        .is_some_and(|((), at)| now.duration_since(at) < Duration::from_secs(60));
    if fresh {
        return;
    }
    shared.last_recorded.set(tag, (), now);
    let (cache_dir, tag) = (shared.cache_dir.clone(), tag.to_owned());
    let name = format!("last-use record of {tag}");
    shared
        .tasks
        .spawn_blocking(name, move || prune::record_use(&cache_dir, &tag));
}

/// Test hook: waits for (and consumes) one permit when the gate is set.
async fn pass_gate(gate: Option<&Arc<Semaphore>>) {
    if let Some(gate) = gate
        && let Ok(permit) = gate.acquire().await
    {
        permit.forget();
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read refused while acting for a peer names the peer's uid and the path, once.
    #[test]
    fn refused_reads_name_the_peer() {
        let peer = Peer {
            uid: 4321,
            gid: 4321,
            pid: None,
            groups: Vec::new(),
        };
        let denied = Error::ReadDenied {
            what: "reading layer file".into(),
            path: "/layers/a/secret".into(),
        };
        assert_eq!(
            access::denied_for(&peer, denied.clone()),
            Error::PermissionDenied(
                "reading layer file /layers/a/secret; uid 4321 cannot read it, and the daemon \
                 reads layers only with the client's own rights"
                    .into()
            )
        );
        let other = Error::NotFound("x".into());
        assert_eq!(access::denied_for(&peer, other.clone()), other);
    }
}
