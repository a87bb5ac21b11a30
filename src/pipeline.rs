//! One build, from plan to image: RIE, base image (pull if missing and allowed), layer walk,
//! fingerprint, cache check, image assembled and streamed into the engine's loader, outcome.
//!
//! Runs on its own task (see `builds.rs`); reports through a [`Reporter`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::access::{self, Peer};
use crate::archive::ZipStore;
use crate::assemble;
use crate::base::{self, Freshness};
use crate::builds::Reporter;
use crate::engine::{Engine, ImageInfo};
use crate::error::{Error, Result};
use crate::fingerprint::{self, FINGERPRINT_LABEL, Parts, decide};
use crate::image_store::{self, ImageStore, Listing};
use crate::layers::{self, Limits};
use crate::outcome::{Completed, Event, LogKind, Reason};
use crate::prune;
use crate::registry_cache::{self, RegistryCache};
use crate::resolve::{Arch, Plan, RIE_IMAGE_PATH};
use crate::stat_cache::{StatCache, StatKey};

/// Layers with at most this many entries at their last walk are walked inline.
const INLINE_WALK_ENTRIES: usize = 64;

/// What every build shares.
pub struct Shared {
    pub engine: Arc<Engine>,
    pub stat_cache: Arc<StatCache>,
    pub zips: Arc<ZipStore>,
    pub rie_dir: PathBuf,
    pub limits: Limits,
    pub build_timeout: Duration,
    /// The cache directory (last-use records live under it).
    pub cache_dir: PathBuf,
    /// When each tag's use was last written to disk (bounded, see [`TagHints`]).
    pub last_recorded: TagHints<()>,
    /// Prune our images down to this many bytes after each build (`--max-cache-size`).
    pub max_cache_bytes: Option<u64>,
    /// Test hooks (see [`TestHooks`]).
    pub hooks: TestHooks,
    /// Entries each tag's layers had at its last walk (decides inline vs blocking pool;
    /// bounded, see [`TagHints`]).
    pub walk_sizes: TagHints<usize>,
    /// Bounds concurrent layer walks (hashing), one per CPU and at least two.
    pub walks: Semaphore,
    /// Diff IDs, chains the engine holds, image listings (for sending only what it lacks).
    pub images: ImageStore,
    /// Whether the engine's loader needs every layer (containerd image store); asked once.
    pub every_layer: tokio::sync::OnceCell<bool>,
    /// Base image freshness checks, shared by every request (`--base-check-ttl`).
    pub freshness: Arc<Freshness>,
    /// `--base-image-mirror`: ZIP bases come from `<prefix>/<name:tag>` (see `resolve`).
    pub base_mirror: Option<String>,
    /// `--registry-cache`: images are looked up before cold builds and pushed after builds.
    pub registry_cache: Option<RegistryCache>,
}

/// Gates a test can hold builds at, to reach a known point without sleeping. Each gate, when
/// set, consumes one permit per build. Set through `config::Config::hooks`, never by flags.
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Before the engine build starts (a build slot is already held).
    pub before_build: Option<Arc<Semaphore>>,
    /// After the engine finished building, before the outcome is published.
    pub after_build: Option<Arc<Semaphore>>,
}

/// Most tags each [`TagHints`] remembers (a few hundred bytes each).
pub const MAX_TAG_HINTS: usize = 4096;

/// A per-tag hint and when it was last set, for at most `cap` tags: setting a new tag when the
/// map is full first forgets the older half (by when each was set). Every hint only saves
/// work (a blocking-pool hand-off, a small file write), so forgetting one is always safe; a
/// daemon that sees ever new tags keeps at most `cap` of them (plus, briefly, one per
/// concurrent request racing past the size check).
pub struct TagHints<V> {
    /// DashMap: read on every request from many tasks; no reference is held across `.await`.
    map: dashmap::DashMap<String, (V, Instant)>,
    cap: usize,
}

impl<V: Copy> TagHints<V> {
    /// An empty map that remembers at most `cap` tags.
    pub fn new(cap: usize) -> TagHints<V> {
        TagHints {
            map: dashmap::DashMap::new(),
            cap,
        }
    }

    /// The hint for `tag` and when it was set.
    pub fn get(&self, tag: &str) -> Option<(V, Instant)> {
        self.map.get(tag).map(|entry| *entry)
    }

    /// Sets the hint for `tag`, set at `now`.
    pub fn set(&self, tag: &str, value: V, now: Instant) {
        if self.map.len() >= self.cap && !self.map.contains_key(tag) {
            self.forget_older_half();
        }
        self.map.insert(tag.to_owned(), (value, now));
    }

    /// How many tags are remembered.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no tag is remembered.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn forget_older_half(&self) {
        let mut times: Vec<Instant> = self.map.iter().map(|entry| entry.value().1).collect();
        if times.is_empty() {
            return;
        }
        let middle = (times.len() - 1) / 2;
        let cut = *times.select_nth_unstable(middle).1;
        self.map.retain(|_, (_, at)| *at > cut);
    }
}

/// Where the RIE for `arch` is read from.
pub fn rie_path(rie_dir: &std::path::Path, arch: Arch) -> PathBuf {
    rie_dir.join(format!("aws-lambda-rie-{}", arch.as_str()))
}

/// Runs one build (or cache check) to its outcome.
/// Layer files are read with `peer`'s rights (see `access.rs`).
///
/// The steps of one build, in order: walk the inputs (RIE and layers, hashed), get the base
/// image, compute the parts and decide whether the image is up to date, build it in the engine,
/// and tidy up after the build.
pub async fn run(
    shared: Arc<Shared>,
    plan: Plan,
    peer: Option<Peer>,
    reporter: Reporter,
) -> Result<Completed> {
    let started = Instant::now();
    if !plan.ignored_layers.is_empty() {
        reporter.emit(Event::Warning {
            code: "layers_ignored".into(),
            message: ignored_layers_message(&plan.ignored_layers),
        });
    }
    let inputs = walk_inputs(&shared, &plan, peer.as_ref(), &reporter).await?;
    let base = base_image(&shared, &plan, &reporter).await?;
    let parts = parts_of(&plan, &base, &inputs);
    // The tag is asked of the engine, never the index: a "cached" answer must name an image
    // that exists, and the index hears of a `docker rmi` only when its event arrives, which
    // can be after the removal has returned and the next request has come in.
    let existing = shared.engine.inspect_fresh(&plan.tag).await?;
    let (reason, changed_layer) = decide(existing.as_ref(), &parts, plan.force_image_build);
    let fingerprint = parts.fingerprint();
    let (image_id, config, cached, reason) = if reason == Reason::UpToDate {
        record_use(&shared, &plan.tag);
        // `decide` only says UpToDate for an existing image.
        let existing = existing.unwrap_or_default();
        (existing.id, existing.config, true, reason)
    } else if let Some(pulled) =
        from_registry(&shared, &plan, &fingerprint, reason, &reporter).await
    {
        let adopted = after_build(&shared, &plan, &pulled, existing).await?;
        remember_pulled(&shared, &parts, &inputs, &base, &adopted).await;
        (adopted.id, adopted.config, false, Reason::RegistryHit)
    } else {
        let images = (&base, existing.as_ref());
        let layers = (plan.layers.clone(), inputs.tree.clone());
        let image_id = build(&shared, &plan, &parts, inputs, images, peer, &reporter).await?;
        let built = after_build(&shared, &plan, &image_id, existing).await?;
        if let Some(cache) = &shared.registry_cache {
            registry_cache::push_in_background(
                shared.engine.clone(),
                reporter.builds().clone(),
                cache.clone(),
                built.id.clone(),
                fingerprint,
                layers,
            );
        }
        (built.id, built.config, false, reason)
    };
    Ok(Completed {
        tag: plan.tag,
        image_id,
        cached,
        reason,
        changed_layer,
        duration_ms: elapsed_ms(started),
        config,
    })
}

/// Before a cold build, with `--registry-cache`: the image another daemon built for
/// `fingerprint`, pulled and tagged (see `registry_cache.rs`); `None` builds locally. A forced
/// rebuild never asks: the client wants a fresh build.
async fn from_registry(
    shared: &Shared,
    plan: &Plan,
    fingerprint: &str,
    reason: Reason,
    reporter: &Reporter,
) -> Option<String> {
    let cache = shared.registry_cache.as_ref()?;
    if reason == Reason::Forced {
        return None;
    }
    let tag = match crate::reference::ImageRef::parse(&plan.tag) {
        Ok(tag) => tag,
        Err(why) => {
            tracing::warn!(tag = plan.tag, "registry cache skipped: tag {why}");
            return None;
        }
    };
    let engine = &shared.engine;
    registry_cache::fetch(
        engine,
        cache,
        fingerprint,
        &tag,
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

/// After a registry-cache hit: the pulled image's chains are held by the engine now, and when
/// it is a full assembly (the base, the RIE layer and one layer per Lambda layer: the shape
/// only a full assembly has) its listing is this request's tree, since its fingerprint covers
/// every file's content, mode and mtime. So the next edit here is a delta, as after a local
/// build, and prune counts its layers by the sizes a local assembly of the tree has (the
/// writer is deterministic: the same tar lengths as on the machine that built it). An image of
/// another shape (a delta made elsewhere) gets no listing: the next edit is a full assembly,
/// and prune counts it whole.
async fn remember_pulled(
    shared: &Shared,
    parts: &Parts,
    inputs: &Inputs,
    base: &ImageInfo,
    pulled: &ImageInfo,
) {
    shared.images.note_chains(&pulled.diff_ids);
    let Some(tree) = inputs.tree.clone() else {
        return;
    };
    let full = 1 + tree.layers.len();
    if !pulled.diff_ids.starts_with(&base.diff_ids)
        || pulled.diff_ids.len() != base.diff_ids.len() + full
    {
        return;
    }
    let mut listing = full_listing(parts, Some(&tree));
    let rie = inputs.rie.clone();
    // Writes every layer over a counting sink (zeros for contents): off the async workers.
    let sizes = blocking(move || {
        std::iter::once(rie_items(&rie))
            .chain(
                tree.layers
                    .iter()
                    .map(|entries| Ok(image_store::layer_items(entries))),
            )
            .map(|items| assemble::layer_size(&items?))
            .collect::<Result<Vec<u64>>>()
    })
    .await;
    match sizes {
        Ok(sizes) => listing.layer_bytes = sizes,
        Err(err) => {
            tracing::warn!(image = %pulled.id, error = %err, "could not size the pulled image's layers")
        }
    }
    shared.images.record_listing(&pulled.id, &listing);
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
    peer: Option<&Peer>,
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
    let peer_for_walk = peer.cloned();
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
                let walked = access::as_peer(peer_for_walk.as_ref(), || {
                    layers::walk(&specs, limits, &cache, &zips)
                });
                Some(walked.map_err(|err| access::denied_for(peer_for_walk.as_ref(), err))?)
            };
            Ok((rie_digest, tree))
        };
    // A layer this tag walked before with only a few entries costs microseconds: walk it
    // right here instead of waking a blocking-pool thread, which on an idle machine costs
    // more than the walk. The rights switch is per thread and this code does not yield,
    // so the worker thread gets its own rights back before it runs anything else.
    let small = shared
        .walk_sizes
        .get(&plan.tag)
        .is_some_and(|(entries, _)| entries <= INLINE_WALK_ENTRIES);
    let (rie_digest, tree) = if small {
        work()?
    } else {
        blocking(work).await?
    };
    // Zip layers never go inline: a changed archive may need a long extraction.
    let entries = tree.as_ref().map_or(0, |t| {
        if t.entries.values().any(|e| e.from_cache) {
            usize::MAX
        } else {
            t.entries.len()
        }
    });
    shared.walk_sizes.set(&plan.tag, entries, Instant::now());
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

/// Step 2: the base image, pulled when missing and allowed, within `--build-timeout` (a
/// registry that stalls mid-pull must not hang this tag forever); warns when its
/// architecture is not the requested one.
///
/// A ZIP function's base, unless `skip_pull_image`, is also kept fresh (see `base.rs`): a
/// local base is used at once, and when its check is due one check starts in the background
/// (the next request after an update rebuilds with `base_changed`); a base served while its
/// check is overdue or failed gets a `base_unverified` warning.
async fn base_image(shared: &Shared, plan: &Plan, reporter: &Reporter) -> Result<ImageInfo> {
    let checked = plan.package_type == crate::resolve::PackageType::Zip && !plan.skip_pull_image;
    let (base, existed) = tokio::time::timeout(
        shared.build_timeout,
        ensure_base(&shared.engine, plan, reporter),
    )
    .await
    .map_err(|_| {
        Error::DeadlineExceeded(format!(
            "getting base image {} took longer than --build-timeout ({}s); check the \
             registry, or pull it yourself",
            plan.base,
            shared.build_timeout.as_secs()
        ))
    })??;
    if checked {
        let name = plan.base.as_str();
        if existed {
            let status = shared.freshness.status(name, Instant::now());
            if status.start_check {
                tokio::spawn(base::check(
                    shared.engine.clone(),
                    shared.freshness.clone(),
                    plan.base.clone(),
                    plan.arch.platform(),
                    base.repo_digests.clone(),
                    shared.build_timeout,
                ));
            }
            if let Some(message) = status.unverified {
                reporter.emit(Event::Warning {
                    code: "base_unverified".into(),
                    message,
                });
            }
        } else {
            // Just pulled: as fresh as the registry's.
            shared.freshness.verified(name, Instant::now());
        }
    }
    if let Some(mismatch) = arch_mismatch(&base, plan.arch) {
        reporter.emit(Event::Warning {
            code: "arch_mismatch".into(),
            message: mismatch,
        });
    }
    Ok(base)
}

/// Step 3: the digests that determine the image (the decision follows in [`decide`]).
fn parts_of(plan: &Plan, base: &ImageInfo, inputs: &Inputs) -> Parts {
    Parts {
        base: base.id.clone(),
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
/// never fails for that. Returns the image id.
async fn build(
    shared: &Shared,
    plan: &Plan,
    parts: &Parts,
    inputs: Inputs,
    images: (&ImageInfo, Option<&ImageInfo>),
    peer: Option<Peer>,
    reporter: &Reporter,
) -> Result<String> {
    let (base, existing) = images;
    let _slot = reporter.slot().await?;
    pass_gate(shared.hooks.before_build.as_ref()).await;
    let work = async {
        let every = *shared
            .every_layer
            .get_or_try_init(|| shared.engine.loads_need_every_layer())
            .await?;
        // Both exist now (inspected for this request): the engine holds their chains.
        shared.images.note_chains(&base.diff_ids);
        if let Some(existing) = existing {
            shared.images.note_chains(&existing.diff_ids);
        }
        let assembly = delta_assembly(shared, parts, &inputs, base, existing, every)
            .map_or_else(|| full_assembly(shared, parts, &inputs, base, every), Ok)?;
        let reused = assembly.layers.iter().any(|l| l.skip);
        match load(shared, plan, parts, base, assembly, peer.clone(), reporter).await {
            Err(err) if reused && !matches!(err, Error::DeadlineExceeded(_)) => {
                reporter.emit(Event::Warning {
                    code: "layers_resent".into(),
                    message: format!(
                        "the engine refused an image reusing layers it held before ({err}); \
                         sending every layer"
                    ),
                });
                shared.images.forget_chains();
                let full = full_assembly(shared, parts, &inputs, base, true)?;
                load(shared, plan, parts, base, full, peer.clone(), reporter).await
            }
            other => other,
        }
    };
    match tokio::time::timeout(shared.build_timeout, work).await {
        Ok(result) => result.map_err(|err| access::denied_for(peer.as_ref(), err)),
        Err(_) => Err(Error::DeadlineExceeded(format!(
            "building {} took longer than --build-timeout ({}s); raise it or check the engine",
            plan.tag,
            shared.build_timeout.as_secs()
        ))),
    }
}

/// The layers of one image above its base, and what to remember once it is loaded.
struct Assembly {
    layers: Vec<assemble::Layer>,
    /// Per layer: the content key its diff ID is recorded under (none for deltas and reused
    /// layers of a previous image).
    keys: Vec<Option<String>>,
    /// The image's `/opt`, for the next delta.
    listing: Listing,
}

/// The listing of a full assembly of `parts` with `/opt` = `tree`: its own root (the RIE layer
/// and one layer per Lambda layer), depth 0; layer sizes are added once the image is loaded.
fn full_listing(parts: &Parts, tree: Option<&layers::Tree>) -> Listing {
    let mut listing = Listing {
        base: parts.base.clone(),
        rie: parts.rie.clone(),
        root_layers: 1 + tree.map_or(0, |t| t.layers.len()),
        labels: std::iter::once(RIE_LABEL.to_owned())
            .chain(parts.layers.iter().map(|(name, _)| layer_label(name)))
            .collect(),
        ..Listing::default()
    };
    if let Some(tree) = tree {
        listing.set_tree(&tree.entries);
    }
    listing
}

/// The RIE layer's items: `/var/rapid/aws-lambda-rie`, 0755, time 0, from `rie`.
fn rie_items(rie: &Path) -> Result<Vec<assemble::Item>> {
    let meta = std::fs::metadata(rie)
        .map_err(|err| Error::io("reading the runtime interface emulator", rie, &err))?;
    Ok(vec![
        assemble::Item::Dir { path: "var".into() },
        assemble::Item::Dir {
            path: "var/rapid".into(),
        },
        assemble::Item::File {
            path: RIE_IMAGE_PATH.trim_start_matches('/').into(),
            source: rie.to_owned(),
            size: meta.len(),
            key: StatKey::of(&meta),
            mode: 0o755,
            mtime: 0,
            as_daemon: true,
        },
    ])
}

/// What events call the RIE layer, and Lambda layer `name`.
const RIE_LABEL: &str = "runtime interface emulator";

fn layer_label(name: &str) -> String {
    format!("layer {name:?}")
}

/// A full assembly: the RIE layer and one layer per Lambda layer. A prefix of layers whose
/// diff IDs are known and whose chains the engine holds is referenced, not sent (`every`:
/// the engine needs every layer).
fn full_assembly(
    shared: &Shared,
    parts: &Parts,
    inputs: &Inputs,
    base: &ImageInfo,
    every: bool,
) -> Result<Assembly> {
    let mut planned = vec![(
        RIE_LABEL.to_owned(),
        rie_items(&inputs.rie)?,
        image_store::rie_key(&parts.rie),
    )];
    let listing = full_listing(parts, inputs.tree.as_deref());
    if let Some(tree) = &inputs.tree {
        for ((name, _), (entries, digest)) in parts
            .layers
            .iter()
            .zip(tree.layers.iter().zip(&tree.layer_digests))
        {
            planned.push((
                layer_label(name),
                image_store::layer_items(entries),
                image_store::layer_key(digest),
            ));
        }
    }
    // The chain under the next layer; extended one layer at a time while every layer so far is
    // known (a layer after an unknown one is never skipped).
    let mut chain = assemble::chain_ids(&base.diff_ids).pop();
    let mut all_held = !every;
    let mut assembly = Assembly {
        layers: Vec::new(),
        keys: Vec::new(),
        listing,
    };
    for (label, items, key) in planned {
        let known = shared.images.diff_id(&key);
        if let Some(known) = &known {
            let next = assemble::chain_id(chain.as_deref(), &known.digest);
            all_held &= shared.images.has_chain(&next);
            chain = Some(next);
        } else {
            all_held = false;
        }
        assembly.layers.push(assemble::Layer {
            label,
            items: Arc::new(items),
            skip: all_held,
            known,
        });
        assembly.keys.push(Some(key));
    }
    Ok(assembly)
}

/// A delta over the image the tag names now, when it is ours, on the same base and RIE, with
/// its listing kept and the engine able to reuse layers: its layers plus one layer of what
/// changed in `/opt`. Once the chain is [`image_store::MAX_DELTA_DEPTH`] deep, the deltas are
/// squashed: the last full assembly's layers plus one delta of everything changed since it, so
/// the chain stays short without resending the big layers. `None` (a full assembly) when the
/// deltas would carry more than max(¼ of the layers' bytes, 4 MiB).
fn delta_assembly(
    shared: &Shared,
    parts: &Parts,
    inputs: &Inputs,
    base: &ImageInfo,
    existing: Option<&ImageInfo>,
    every: bool,
) -> Option<Assembly> {
    let (existing, tree) = (existing?, inputs.tree.as_ref()?);
    if every || !existing.diff_ids.starts_with(&base.diff_ids) {
        return None;
    }
    let previous = shared.images.listing(&existing.id)?;
    if previous.base != parts.base || previous.rie != parts.rie {
        return None;
    }
    let ours = &existing.diff_ids[base.diff_ids.len()..];
    // What the new delta goes over: the whole previous image, or (squashing) its full part.
    let squash = previous.depth >= image_store::MAX_DELTA_DEPTH;
    let (over, kept_layers, kept_bytes, depth) = if squash {
        let root = previous.root_entries.as_ref()?;
        (root, previous.root_layers.min(ours.len()), 0, 1)
    } else {
        (
            &previous.entries,
            ours.len(),
            previous.delta_bytes,
            previous.depth + 1,
        )
    };
    let (items, bytes) = image_store::delta_items(over, &tree.entries);
    let mut listing = Listing {
        depth: if items.is_empty() && !squash {
            previous.depth
        } else {
            depth
        },
        delta_bytes: kept_bytes + bytes,
        base: parts.base.clone(),
        rie: parts.rie.clone(),
        root_layers: previous.root_layers,
        root_entries: Some(
            previous
                .root_entries
                .clone()
                .unwrap_or_else(|| previous.entries.clone()),
        ),
        ..Listing::default()
    };
    listing.set_tree(&tree.entries);
    let allowed =
        (listing.full_bytes / image_store::MAX_DELTA_SHARE).max(image_store::DELTA_ALLOWANCE);
    if listing.delta_bytes > allowed {
        return None;
    }
    let mut assembly = Assembly {
        layers: Vec::new(),
        keys: Vec::new(),
        listing,
    };
    // The kept layers' tar sizes, for prune, when the previous listing has them (0: unknown).
    let sizes = (previous.layer_bytes.len() == ours.len()).then_some(&previous.layer_bytes);
    for (index, diff_id) in ours[..kept_layers].iter().enumerate() {
        let label = previous
            .labels
            .get(index)
            .cloned()
            .unwrap_or_else(|| "layer of the previous image".into());
        assembly.layers.push(assemble::Layer {
            label,
            items: Arc::new(Vec::new()),
            known: Some(assemble::DiffId {
                digest: diff_id.clone(),
                size: sizes.map_or(0, |sizes| sizes[index]),
            }),
            skip: true,
        });
        assembly.keys.push(None);
    }
    if !items.is_empty() {
        let squashed = if squash {
            ", the earlier deltas squashed"
        } else {
            ""
        };
        assembly.layers.push(assemble::Layer {
            label: format!(
                "delta {}/{} over {} ({} entries, {}{squashed})",
                assembly.listing.depth,
                image_store::MAX_DELTA_DEPTH,
                short_id(&existing.id),
                items.len(),
                bytesize::ByteSize::b(bytes)
            ),
            items: Arc::new(items),
            known: None,
            skip: false,
        });
        assembly.keys.push(None);
    }
    Some(assembly)
}

/// The first 12 hex digits of an image id.
fn short_id(id: &str) -> &str {
    let hex = id.trim_start_matches("sha256:");
    hex.get(..12).unwrap_or(hex)
}

/// Streams `assembly` into the engine's loader, tags the image, and remembers its diff IDs,
/// chains and listing. Reports each layer (referenced or sent) and the bytes sent.
async fn load(
    shared: &Shared,
    plan: &Plan,
    parts: &Parts,
    base: &ImageInfo,
    assembly: Assembly,
    peer: Option<Peer>,
    reporter: &Reporter,
) -> Result<String> {
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
    };
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
    // The producer's own error is the real cause when the upload broke off, unless it only
    // saw the engine stop reading (UNAVAILABLE): then the engine's error says why.
    let assembled = match (producer_result, engine_result) {
        (Some(Err(err)), Err(_)) if !matches!(err, Error::Unavailable(_)) => return Err(err),
        (Some(Err(err)), Ok(())) => return Err(err),
        (_, Err(err)) => {
            return Err(match err {
                Error::NotFound(message) => {
                    Error::FailedPrecondition(format!("the engine failed the load: {message}"))
                }
                other => other,
            });
        }
        (Some(Ok(assembled)), Ok(())) => assembled,
        (None, Ok(())) => {
            return Err(Error::Internal("the image writer never finished".into()));
        }
    };
    let tag = crate::reference::ImageRef::parse(&plan.tag)
        .map_err(|why| Error::Internal(format!("tag {}: {why}", plan.tag)))?;
    shared.engine.tag(&assembled.image_id, &tag).await?;
    for (key, diff_id) in assembly.keys.iter().zip(&assembled.layers) {
        if let Some(key) = key {
            shared.images.record_diff_id(key, diff_id);
        }
    }
    shared.images.note_chains(&assembled.diff_ids);
    // Every layer tar has at least its end-of-archive blocks, so a size of 0 is one not known
    // (a kept layer of an image whose listing had no sizes): then none are recorded, and prune
    // counts the image whole.
    if assembled.layers.iter().all(|layer| layer.size > 0) {
        listing.layer_bytes = assembled.layers.iter().map(|layer| layer.size).collect();
    }
    shared.images.record_listing(&assembled.image_id, &listing);
    reporter.emit(Event::Log {
        kind: LogKind::Status,
        text: format!(
            "loaded {} ({} of layers sent)",
            short_id(&assembled.image_id),
            bytesize::ByteSize::b(assembled.layer_bytes_sent)
        ),
        step: u32::try_from(total).unwrap_or(u32::MAX),
    });
    Ok(assembled.image_id)
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
    let built = engine.inspect_fresh(&plan.tag).await?.ok_or_else(|| {
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
        tokio::spawn(async move {
            if engine.remove_unused(&old.id).await {
                image_store::remove_listing(&cache_dir, &old.id);
            }
        });
    }
    record_use(shared, &plan.tag);
    if let Some(cap) = shared.max_cache_bytes {
        let (engine, cache_dir) = (engine.clone(), shared.cache_dir.clone());
        tokio::spawn(async move {
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
    tokio::task::spawn_blocking(move || prune::record_use(&cache_dir, &tag));
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

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|err| Error::Internal(format!("worker thread failed: {err}")))?
}

/// Inspects the base; pulls it when missing and allowed. Never lets the build call pull.
/// The flag is true when the base was present, false when it was just pulled.
async fn ensure_base(
    engine: &Arc<Engine>,
    plan: &Plan,
    reporter: &Reporter,
) -> Result<(ImageInfo, bool)> {
    let name = plan.base.as_str();
    if let Some(info) = engine.inspect(name).await? {
        return Ok((info, true));
    }
    if plan.skip_pull_image {
        return Err(Error::NotFound(format!(
            "base image {name} is not present in the engine and skip_pull_image is set; pull or \
             load it first, or drop --skip-pull-image"
        )));
    }
    // One pull per base and platform, whatever the tags asking: a request joins a pull in
    // flight (and says so) instead of starting its own.
    let ticket = engine.start_pull(&plan.base, plan.arch.platform());
    reporter.emit(Event::Log {
        kind: LogKind::Status,
        text: if ticket.started {
            format!("pulling {name}")
        } else {
            format!("pulling {name} (joined the pull already in flight)")
        },
        step: 0,
    });
    let pulled = ticket.wait(|item| report_pull(reporter, name, item)).await;
    if let Err(err) = pulled {
        return Err(pull_failure(name, err));
    }
    let info = engine.inspect(name).await?.ok_or_else(|| {
        Error::NotFound(format!("base image {name} is still missing after the pull"))
    })?;
    Ok((info, false))
}

/// The error a request gets when the pull of its base `name` failed with `err`.
///
/// NOT_FOUND only when no registry has the image: Docker answers that with HTTP 404 (mapped to
/// [`Error::NotFound`]); Podman's compatible API answers 200 and puts the registry's error in
/// the stream, so there its text decides ("manifest unknown", "not found", "name unknown",
/// "repository does not exist": the registry API's and the engines' words). The engine
/// unreachable and a pull past `--build-timeout` keep their own status. Anything else (a
/// registry outage, a TLS or auth failure: Docker's 5xx, a stream error) is not "no such
/// image": FAILED_PRECONDITION naming the base, with the engine's text.
fn pull_failure(name: &str, err: Error) -> Error {
    const NOT_FOUND_TEXTS: [&str; 4] = [
        "manifest unknown",
        "not found",
        "name unknown",
        "repository does not exist",
    ];
    match err {
        Error::Unavailable(_) | Error::DeadlineExceeded(_) => err,
        Error::NotFound(message) => Error::NotFound(format!(
            "base image {name} is neither in the engine nor pullable: {message}"
        )),
        Error::FailedPrecondition(message)
            if NOT_FOUND_TEXTS
                .iter()
                .any(|text| message.to_ascii_lowercase().contains(text)) =>
        {
            Error::NotFound(format!(
                "base image {name} is neither in the engine nor pullable: {message}"
            ))
        }
        err => {
            let message = format!("pulling base image {name} failed: {err}");
            match err.code() {
                tonic::Code::PermissionDenied => Error::PermissionDenied(message),
                tonic::Code::ResourceExhausted => Error::ResourceExhausted(message),
                tonic::Code::Internal => Error::Internal(message),
                _ => Error::FailedPrecondition(message),
            }
        }
    }
}

/// One item of the engine's pull stream of `image`, as a PullProgress event (with progress)
/// or a status log line.
pub(crate) fn report_pull(
    reporter: &Reporter,
    image: &str,
    item: &bollard::models::CreateImageInfo,
) {
    if let Some(detail) = &item.progress_detail {
        reporter.emit(Event::PullProgress {
            image: image.to_owned(),
            layer: item.id.clone().unwrap_or_default(),
            current: detail.current.unwrap_or(0).max(0) as u64,
            total: detail.total.unwrap_or(0).max(0) as u64,
        });
    } else if let Some(status) = &item.status {
        let text = match &item.id {
            Some(id) => format!("{id}: {status}"),
            None => status.clone(),
        };
        reporter.emit(Event::Log {
            kind: LogKind::Status,
            text,
            step: 0,
        });
    }
}

fn arch_mismatch(base: &ImageInfo, arch: Arch) -> Option<String> {
    let engine_arch = match arch {
        Arch::X86_64 => "amd64",
        Arch::Arm64 => "arm64",
    };
    let have = base.config.architecture.as_str();
    (!have.is_empty() && have != engine_arch).then(|| {
        format!(
            "the base image is {have} but {} was requested; the image will not run natively",
            arch.as_str()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NOT_FOUND only for an image no registry has: Docker's 404, or Podman's stream error
    /// with the registry's words. A registry outage or TLS failure is FAILED_PRECONDITION
    /// naming the base; timeouts keep their status. The Docker 404 and both Podman texts are
    /// what Docker 20.10 and Podman 4.3's `POST /images/create` answered here for a missing
    /// repository on the test registry (Podman's HTTPS one before the registry was marked
    /// insecure).
    #[test]
    fn pull_failures_are_not_found_only_for_a_missing_image() {
        let base = "127.0.0.1:5596/nowhere/x:1";
        let code = |err: Error| pull_failure(base, err).code();
        let docker_404 = "manifest for 127.0.0.1:5596/nowhere/x:1 not found: manifest unknown";
        assert_eq!(
            code(Error::NotFound(docker_404.into())),
            tonic::Code::NotFound
        );
        let podman_missing = "the engine failed: initializing source docker://127.0.0.1:5596/\
                              nowhere/x:1: reading manifest 1 in 127.0.0.1:5596/nowhere/x: \
                              manifest unknown: manifest unknown";
        assert_eq!(
            code(Error::FailedPrecondition(podman_missing.into())),
            tonic::Code::NotFound
        );
        let podman_tls = "the engine failed: initializing source docker://127.0.0.1:5596/nowhere/\
                          x:1: pinging container registry 127.0.0.1:5596: Get \"https://127.0.0.\
                          1:5596/v2/\": http: server gave HTTP response to HTTPS client";
        let outage = pull_failure(base, Error::FailedPrecondition(podman_tls.into()));
        assert_eq!(outage.code(), tonic::Code::FailedPrecondition);
        assert!(
            outage
                .to_string()
                .starts_with(&format!("pulling base image {base} failed: "))
        );
        let docker_500 = "the engine refused: received unexpected HTTP status: 503 Service \
                          Unavailable (HTTP 500 from the engine at unix:///d.sock; see its log, \
                          then retry)";
        assert_eq!(
            code(Error::FailedPrecondition(docker_500.into())),
            tonic::Code::FailedPrecondition
        );
        for kept in [
            Error::Unavailable("cannot reach the container engine".into()),
            Error::DeadlineExceeded("pulling took longer than --build-timeout".into()),
        ] {
            assert_eq!(pull_failure(base, kept.clone()), kept);
        }
    }

    /// The per-tag hints stay within their cap however many tags pass, keep the recently set
    /// ones, and a known tag is updated in place even when the map is full.
    #[test]
    fn tag_hints_are_bounded_and_keep_the_recent_half() {
        let hints = TagHints::new(4);
        let start = Instant::now();
        let at = |i: u64| start + Duration::from_millis(i);
        for i in 0..4 {
            hints.set(&format!("tag{i}"), i, at(i));
        }
        hints.set("tag0", 10, at(10));
        assert_eq!(hints.len(), 4, "a known tag does not evict");
        hints.set("tag4", 4, at(11));
        assert_eq!(hints.get("tag1"), None, "the oldest went");
        assert_eq!(hints.get("tag2"), None);
        assert_eq!(hints.get("tag0"), Some((10, at(10))), "recently set, kept");
        assert_eq!(hints.get("tag3"), Some((3, at(3))));
        assert_eq!(hints.get("tag4"), Some((4, at(11))));
        for i in 0..1000 {
            hints.set(&format!("many{i}"), i, at(100 + i));
            assert!(hints.len() <= 4, "{} tags after {i} inserts", hints.len());
        }
        assert_eq!(hints.get("many999"), Some((999, at(1099))));
    }

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
            access::denied_for(Some(&peer), denied.clone()),
            Error::PermissionDenied(
                "reading layer file /layers/a/secret; uid 4321 cannot read it, and the daemon \
                 reads layers only with the client's own rights"
                    .into()
            )
        );
        assert_eq!(
            access::denied_for(None, denied.clone()),
            denied,
            "no peer: unchanged"
        );
        let other = Error::NotFound("x".into());
        assert_eq!(access::denied_for(Some(&peer), other.clone()), other);
    }
}
