//! One build, from plan to image: RIE, base image (pull if missing and allowed), layer walk,
//! fingerprint, cache check, image assembled and streamed into the engine's loader, outcome.
//!
//! Runs on its own task (see `builds.rs`); reports through a [`Reporter`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::access::{self, Peer};
use crate::assemble::{self, Reuse};
use crate::assembly::{self, Assembly, short_id};
use crate::base;
use crate::builds::Reporter;
use crate::engine::{ImageInfo, ImageStoreKind};
use crate::error::{Error, Result};
use crate::fingerprint::{self, FINGERPRINT_LABEL, Parts, decide};
use crate::layers;
use crate::outcome::{Completed, Event, LogKind, Reason};
use crate::prune;
use crate::registry_cache;
use crate::registry_policy;
use crate::resolve::{LayerSpec, Plan};
use crate::retire;
use crate::sync::pass_gate;
use sha2::{Digest, Sha256};

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
    warn_shared_tag(&shared, &plan, &reporter);
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
    // A build may load an image a pending retirement names (same content, same ID): none is
    // removed until this answer is noted.
    let _building = (reason != Reason::UpToDate).then(|| shared.retire.building());
    let (image, cached, reason) = if reason == Reason::UpToDate {
        record_use(&shared, plan.tag.as_str());
        // `decide` only says UpToDate for an existing image.
        (existing.unwrap_or_default(), true, reason)
    } else if let Some(pulled) = Box::pin(from_registry(
        &shared,
        &plan,
        (&parts, &inputs, &base),
        &peer,
        reason,
        &reporter,
    ))
    .await
    {
        let adopted = Box::pin(after_build(&shared, &plan, &pulled.id, existing)).await?;
        let tree = inputs.tree.as_deref();
        assembly::remember_pulled(&shared.images, &parts, tree, &adopted, &pulled.layers);
        (adopted, false, Reason::RegistryHit)
    } else {
        let images = (&base, existing.as_ref());
        let layers = (plan.layers.clone(), inputs.tree.clone());
        let (image_id, pushable) = Box::pin(build(
            &shared, &plan, &parts, inputs, images, peer, &reporter,
        ))
        .await?;
        let built = Box::pin(after_build(&shared, &plan, &image_id, existing)).await?;
        if let Some(cache) = shared.registry_cache.as_ref().filter(|_| pushable) {
            let context = registry_cache::PushContext {
                tasks: shared.tasks.clone(),
                engine: shared.engine.clone(),
                builds: reporter.builds().clone(),
                gate: shared.hooks.before_push.clone(),
            };
            let push = registry_cache::Push {
                image_id: built.id.clone(),
                fingerprint: parts.fingerprint(),
                tag: plan.tag.as_str().to_owned(),
                layers,
            };
            registry_cache::push_in_background(context, cache.clone(), push);
        }
        (built, false, reason)
    };
    let pinned_tag = pin(&shared, &plan, &image).await;
    shared.retire.answered(&image.id);
    Ok(Completed {
        tag: plan.tag.as_str().to_owned(),
        image_id: image.id,
        cached,
        reason,
        changed_layer,
        duration_ms: elapsed_ms(started),
        config: image.config,
        warnings: Vec::new(),
        pinned_tag,
    })
}

/// With layers, the answer's pinned tag (`retire.rs`), created when the image lacks it: SAM's
/// tag hashes layer names only, so another request can move `plan.tag` before the client has
/// used it. Empty without layers (nothing else can ask for such a tag with other inputs), or
/// when the engine refuses the tag (the answer still holds under `plan.tag`; logged).
async fn pin(shared: &Shared, plan: &Plan, image: &ImageInfo) -> String {
    if plan.layers.is_empty() {
        return String::new();
    }
    let Some(pin) = retire::pin_of(&plan.tag, &image.id) else {
        return String::new();
    };
    if !image.tags.iter().any(|tag| tag == pin.as_str())
        && let Err(err) = shared.engine.tag(&image.id, &pin).await
    {
        tracing::warn!(image = %image.id, pin = %pin, error = %err, "could not pin the image");
        return String::new();
    }
    pin.as_str().to_owned()
}

/// Warns `shared_tag` when `plan.tag` was last asked for with other layers: SAM's tag hashes
/// the layers' names only (`LambdaImage._generate_docker_image_version`), so two functions
/// whose layers share names but not sources take turns moving one tag, and every turn is a
/// rebuild. Both answers stay valid (pinned tags, `retire.rs`); renaming a layer ends it.
fn warn_shared_tag(shared: &Shared, plan: &Plan, reporter: &Reporter) {
    if plan.layers.is_empty() {
        return;
    }
    let tag = plan.tag.as_str();
    let before = shared.tag_layers.get(tag);
    if before
        .as_ref()
        .is_some_and(|(before, _)| **before == plan.layers)
    {
        // The usual case (a repeat): nothing to say, nothing to store.
        return;
    }
    if let Some((before, _)) = before {
        reporter.emit(Event::Warning {
            code: "shared_tag".into(),
            message: shared_tag_message(tag, &before, &plan.layers),
        });
    }
    shared
        .tag_layers
        .set(tag, Arc::new(plan.layers.clone()), Instant::now());
}

fn shared_tag_message(tag: &str, before: &[LayerSpec], now: &[LayerSpec]) -> String {
    let list = |layers: &[LayerSpec]| {
        layers
            .iter()
            .map(|l| format!("{} = {}", l.name, l.path.display()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{tag} was last asked for with layers [{}] and now with [{}]: SAM names the image by \
         the layers' names only, so these functions share one tag and rebuild it in turn (each \
         answer keeps its own image under its pinned tag); give one of the layers another \
         logical ID to end this",
        list(before),
        list(now)
    )
}

/// Before a cold build, with `--registry-cache`: the image another daemon built for these
/// `parts` over `base`, pulled, checked against the full assembly of `inputs` (its layers'
/// diff IDs computed from the files, read with `peer`'s rights, while the pull runs) and
/// tagged (see `registry_cache.rs`); `None` builds locally. A forced rebuild never asks: the
/// client wants a fresh build.
async fn from_registry(
    shared: &Shared,
    plan: &Plan,
    (parts, inputs, base): (&Parts, &Inputs, &ImageInfo),
    peer: &Peer,
    reason: Reason,
    reporter: &Reporter,
) -> Option<registry_cache::Adopted> {
    let cache = shared.registry_cache.as_ref()?;
    if reason == Reason::Forced {
        return None;
    }
    let (rie, tree) = (inputs.rie.as_path(), inputs.tree.as_deref());
    let rie_bytes = std::fs::metadata(rie).map_or(0, |m| m.len());
    let (local, pull) = registry_policy::sizes(&plan.layers, tree, rie_bytes, peer);
    let rates = cache.rates();
    let remote = !shared.engine.host().starts_with("unix://");
    let estimate = registry_policy::estimate(local, pull, rates.send(remote), rates.pull());
    let (look, why) = registry_policy::decide(cache.policy, &estimate);
    reporter.emit(Event::Log {
        kind: LogKind::Status,
        text: why,
        step: 0,
    });
    if !look {
        return None;
    }
    let expected = registry_cache::Expected {
        base_diff_ids: base.diff_ids.clone(),
        image_config: registry_cache::expected_config(
            &base.image_config,
            &fingerprint::labels(parts),
        ),
        layers: assembly::expected_layers(&shared.images, parts, rie, tree, peer),
    };
    let wanted = (parts.fingerprint(), &plan.tag);
    let engine = &shared.engine;
    let limit = shared.build_timeout;
    registry_cache::fetch(
        engine,
        cache,
        (&wanted.0, wanted.1),
        limit,
        expected,
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

/// Another tag's image whose request began with the same layer contents (the longest such
/// prefix, [`image_store::ImageStore::sibling`]) when it still exists on our base: what a
/// function whose layer list starts like another's may be a delta over. Its chains are then
/// known to be held.
async fn sibling(
    shared: &Shared,
    parts: &Parts,
    base: &ImageInfo,
    existing: Option<&ImageInfo>,
) -> Option<ImageInfo> {
    let digests: Vec<&str> = parts.layers.iter().map(|(_, d)| d.as_str()).collect();
    let (id, _) = shared.images.sibling(&parts.base, &parts.rie, &digests)?;
    if existing.is_some_and(|existing| existing.id == id) {
        return None;
    }
    let found = shared.engine.inspect(&id).await.ok().flatten()?;
    if !found.diff_ids.starts_with(&base.diff_ids) {
        return None;
    }
    shared.images.note_chains(&found.diff_ids);
    Some(found)
}

/// Step 4: assembles the image from layers and loads it into the engine, within
/// `--build-timeout`, holding a build slot: a delta over the previous image when one can be
/// made, else a full assembly; layers the engine holds are referenced, not sent. If the engine
/// lost a layer we relied on (removed behind our back), every layer is sent again: a build
/// never fails for that. Returns the image id and whether it may be pushed to the registry
/// cache: only a full assembly, and not when Docker's containerd store got a docker archive
/// (its base layers are zero-size entries there, which that store records as empty blobs).
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
        let sibling = sibling(shared, parts, base, existing).await;
        let over = assembly::Over {
            base,
            existing,
            sibling: sibling.as_ref(),
        };
        let assembly = assembly::plan(&shared.images, parts, rie, tree, over, reuse)?;
        let reused = assembly.layers.iter().any(|l| l.skip);
        // Only full assemblies are shared: a peer can check those against its own files, but
        // not a delta (its lower layers are this machine's history), and pulling one would
        // fetch the whole chain below it (README, "Running a fleet").
        let full = assembly.keys.iter().all(Option::is_some);
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
                let every = assembly::full(&shared.images, parts, rie, tree, base, Reuse::Nothing)?;
                load(
                    shared,
                    plan,
                    parts,
                    (base, format),
                    every,
                    peer.clone(),
                    reporter,
                )
                .await
                .map(|id| (id, true))
            }
            other => other.map(|id| (id, full)),
        };
        loaded.map(|(id, full)| (id, pushable && full))
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
    let digests: Vec<&str> = parts.layers.iter().map(|(_, d)| d.as_str()).collect();
    shared
        .images
        .record_prefixes(&parts.base, &parts.rie, &digests, &image_id);
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
    let started = Instant::now();
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
    if let Some(cache) = shared
        .registry_cache
        .as_ref()
        .filter(|_| engine_result.is_ok())
    {
        let bytes = sent.load(Ordering::Relaxed);
        cache.rates().learn_send(bytes, started.elapsed());
    }
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
        // The tag moved: the superseded image goes (SAM removes it too) once no answer can
        // still need it, and its listing with it (`retire.rs`).
        shared.retire.supersede(&old.id);
    }
    record_use(shared, plan.tag.as_str());
    if let Some(cap) = shared.max_cache_bytes {
        let (engine, cache_dir) = (engine.clone(), shared.cache_dir.clone());
        let answered = shared.retire.recent_answers();
        shared.tasks.spawn("prune to --max-cache-size", async move {
            // Images only: a build in flight may be reading an extracted layer.
            let policy = prune::Policy {
                keep_bytes: Some(cap),
                keep_layers: true,
                ..Default::default()
            };
            if let Err(err) = prune::prune(&engine, &cache_dir, policy, &answered).await {
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
