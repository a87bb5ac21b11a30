//! One build, from plan to image: RIE, base image (pull if missing and allowed), layer walk,
//! fingerprint, cache check, streamed context, engine messages, outcome.
//!
//! Runs on its own task (see `builds.rs`); reports through a [`Reporter`].

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bollard::query_parameters::BuildImageOptions;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::access::{self, Peer};
use crate::archive::ZipStore;
use crate::builds::{Completed, Event, LogKind, Reason, Reporter};
use crate::context;
use crate::engine::{Engine, ImageInfo};
use crate::error::{Error, Result};
use crate::fingerprint::{FINGERPRINT_LABEL, Parts, decide, labelled_dockerfile};
use crate::layers::{self, Limits};
use crate::prune;
use crate::resolve::{Arch, Plan};
use crate::stat_cache::StatCache;

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
    let (image_id, config, cached) = if reason == Reason::UpToDate {
        record_use(&shared, &plan.tag);
        // `decide` only says UpToDate for an existing image.
        let existing = existing.unwrap_or_default();
        (existing.id, existing.config, true)
    } else {
        let image_id = build(&shared, &plan, &parts, inputs, peer, &reporter).await?;
        let built = after_build(&shared, &plan, &image_id, existing).await?;
        (built.id, built.config, false)
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
async fn base_image(shared: &Shared, plan: &Plan, reporter: &Reporter) -> Result<ImageInfo> {
    let base = tokio::time::timeout(
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

/// Step 4: builds the image in the engine, within `--build-timeout`, holding a build slot.
/// Returns the image id the engine reported.
async fn build(
    shared: &Shared,
    plan: &Plan,
    parts: &Parts,
    inputs: Inputs,
    peer: Option<Peer>,
    reporter: &Reporter,
) -> Result<String> {
    let _slot = reporter.slot().await?;
    pass_gate(shared.hooks.before_build.as_ref()).await;
    let spec = context::Spec {
        dockerfile: labelled_dockerfile(&plan.dockerfile, parts),
        rie: inputs.rie,
        tree: inputs.tree,
        peer: peer.clone(),
    };
    let build = async {
        match engine_build(shared, plan, spec.clone(), reporter).await {
            // Someone (`docker rmi`, `image prune`) removed the build cache step this build
            // was reusing while it ran; the next attempt rebuilds that step.
            Err(Error::BuildCacheRemoved(message)) => {
                reporter.emit(Event::Warning {
                    code: "build_cache_removed".into(),
                    message: format!(
                        "the engine's build cache changed under the build ({message}); retrying once"
                    ),
                });
                engine_build(shared, plan, spec, reporter).await
            }
            other => other,
        }
    };
    match tokio::time::timeout(shared.build_timeout, build).await {
        Ok(result) => result.map_err(|err| access::denied_for(peer.as_ref(), err)),
        Err(_) => Err(Error::DeadlineExceeded(format!(
            "building {} took longer than --build-timeout ({}s); raise it or check the engine",
            plan.tag,
            shared.build_timeout.as_secs()
        ))),
    }
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
        // The tag moved: remove the superseded image if nothing uses it (SAM does the same).
        let engine = engine.clone();
        tokio::spawn(async move { engine.remove_unused(&old.id).await });
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
    if let Some(gate) = gate {
        if let Ok(permit) = gate.acquire().await {
            permit.forget();
        }
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
async fn ensure_base(engine: &Engine, plan: &Plan, reporter: &Reporter) -> Result<ImageInfo> {
    let name = plan.base.as_str();
    if let Some(info) = engine.inspect(name).await? {
        return Ok(info);
    }
    if plan.skip_pull_image {
        return Err(Error::NotFound(format!(
            "base image {name} is not present in the engine and skip_pull_image is set; pull or \
             load it first, or drop --skip-pull-image"
        )));
    }
    reporter.emit(Event::Log {
        kind: LogKind::Status,
        text: format!("pulling {name}"),
        step: 0,
    });
    let pulled = engine
        .pull(&plan.base, plan.arch.platform(), |item| {
            if let Some(detail) = &item.progress_detail {
                reporter.emit(Event::PullProgress {
                    image: name.to_owned(),
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
        })
        .await;
    match pulled {
        Ok(()) => {}
        Err(Error::Unavailable(message)) => return Err(Error::Unavailable(message)),
        Err(err) => {
            return Err(Error::NotFound(format!(
                "base image {name} is neither in the engine nor pullable: {err}"
            )));
        }
    }
    engine.inspect(name).await?.ok_or_else(|| {
        Error::NotFound(format!("base image {name} is still missing after the pull"))
    })
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

/// Streams the context into the engine and follows its messages. Returns the image id.
async fn engine_build(
    shared: &Shared,
    plan: &Plan,
    spec: context::Spec,
    reporter: &Reporter,
) -> Result<String> {
    let sent = Arc::new(AtomicU64::new(0));
    let producer = context::produce(spec, sent.clone());
    let options = BuildImageOptions {
        dockerfile: "Dockerfile".into(),
        t: Some(plan.tag.clone()),
        rm: true,
        forcerm: true,
        // Never let the engine pull: the base was inspected (and pulled) explicitly.
        pull: None,
        platform: plan.arch.platform().into(),
        ..Default::default()
    };
    let mut messages = shared.engine.build(options, producer.stream).await?;
    let mut done = Some(producer.done);
    let mut producer_result: Option<Result<()>> = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut reported = 0;
    let mut step = 0;
    let mut image_id = None;
    let mut engine_error = None;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { break };
                match message {
                    Ok(info) => {
                        if let Some(aux) = info.aux.and_then(|aux| aux.id) {
                            image_id = Some(aux);
                        }
                        if let Some(text) = info.stream {
                            for line in text.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()) {
                                step = parse_step(line).unwrap_or(step);
                                reporter.emit(Event::Log { kind: LogKind::Stream, text: line.to_owned(), step });
                            }
                        }
                        if let Some(status) = info.status {
                            reporter.emit(Event::Log { kind: LogKind::Status, text: status, step });
                        }
                    }
                    Err(err) => {
                        engine_error = Some(err);
                        break;
                    }
                }
            }
            result = async { done.as_mut().expect("polled only while Some").await }, if done.is_some() => {
                done = None;
                producer_result = Some(result.unwrap_or_else(|err| Err(Error::Internal(format!("context writer failed: {err}")))));
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
    }
    drop(messages);
    if let Some(done) = done {
        // The engine ended first; the producer stops once its channel is gone.
        producer_result =
            Some(done.await.unwrap_or_else(|err| {
                Err(Error::Internal(format!("context writer failed: {err}")))
            }));
    }
    // The producer's own error is the real cause when the upload broke off, unless it only
    // saw the engine stop reading (UNAVAILABLE): then the engine's error says why.
    if let Some(Err(err)) = producer_result {
        if !(matches!(err, Error::Unavailable(_)) && engine_error.is_some()) {
            return Err(err);
        }
    }
    if let Some(err) = engine_error {
        let err = shared.engine.map_error(err);
        return Err(match err {
            Error::NotFound(message) => {
                Error::FailedPrecondition(format!("the engine failed the build: {message}"))
            }
            other => other,
        });
    }
    image_id.ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "the engine ended the build of {} without reporting an image id",
            plan.tag
        ))
    })
}

/// "Step 2/4 : COPY ..." (Docker) or "STEP 2/4: COPY ..." (Podman) -> 2.
fn parse_step(line: &str) -> Option<u32> {
    let rest = line
        .strip_prefix("Step ")
        .or_else(|| line.strip_prefix("STEP "))?;
    rest.split('/').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_parsed_from_both_engines() {
        assert_eq!(
            parse_step("Step 2/4 : COPY aws-lambda-rie /var/rapid/aws-lambda-rie"),
            Some(2)
        );
        assert_eq!(parse_step("STEP 3/3: COPY opt/ /opt/"), Some(3));
        assert_eq!(parse_step(" ---> Using cache"), None);
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
