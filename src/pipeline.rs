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
use crate::config::TestHooks;
use crate::context;
use crate::engine::{Engine, ImageInfo};
use crate::error::{Error, Result};
use crate::layers::{self, Limits, StatCache};
use crate::prune;
use crate::resolve::{Arch, Plan};

/// Layers with at most this many entries at their last walk are walked inline.
const INLINE_WALK_ENTRIES: usize = 64;

/// Label holding the content fingerprint of an image we built.
pub const FINGERPRINT_LABEL: &str = "io.lambda-imaged.fingerprint";
/// Label holding the per-part digests, so a rebuild can say what changed.
pub const PARTS_LABEL: &str = "io.lambda-imaged.parts";
/// Label naming the daemon version that built the image.
pub const VERSION_LABEL: &str = "io.lambda-imaged.version";

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
    /// When each tag's use was last written to disk.
    pub last_recorded: dashmap::DashMap<String, Instant>,
    /// Prune our images down to this many bytes after each build (`--max-cache-size`).
    pub max_cache_bytes: Option<u64>,
    /// Test hooks (see `config::TestHooks`).
    pub hooks: TestHooks,
    /// Entries each tag's layers had at its last walk (decides inline vs blocking pool).
    pub walk_sizes: dashmap::DashMap<String, usize>,
    /// Bounds concurrent layer walks (hashing), one per CPU and at least two.
    pub walks: Semaphore,
}

/// Where the RIE for `arch` is read from.
pub fn rie_path(rie_dir: &std::path::Path, arch: Arch) -> PathBuf {
    rie_dir.join(format!("aws-lambda-rie-{}", arch.as_str()))
}

/// The digests that determine an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    pub base: String,
    pub rie: String,
    pub dockerfile: String,
    /// (layer name, content digest) in request order.
    pub layers: Vec<(String, String)>,
}

impl Parts {
    /// The fingerprint: sha256 over every part.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(self.to_label().as_bytes()))
    }

    fn names_digest(&self) -> String {
        let mut hasher = Sha256::new();
        for (name, _) in &self.layers {
            hasher.update(name.as_bytes());
            hasher.update([0]);
        }
        hex::encode(hasher.finalize())
    }

    /// The label form: only hex digests and fixed words, so it is safe inside a Dockerfile
    /// (layer names, which are free text, appear only as a digest).
    pub fn to_label(&self) -> String {
        let layers: Vec<&str> = self
            .layers
            .iter()
            .map(|(_, digest)| digest.as_str())
            .collect();
        format!(
            "v1 base={} rie={} dockerfile={} names={} layers={}",
            self.base,
            self.rie,
            self.dockerfile,
            self.names_digest(),
            layers.join(",")
        )
    }
}

/// The label form of [`Parts`], parsed back (names are only known as a digest).
#[derive(Debug, Default, PartialEq, Eq)]
struct LabelParts {
    base: String,
    rie: String,
    dockerfile: String,
    names: String,
    layers: Vec<String>,
}

fn parse_label(text: &str) -> Option<LabelParts> {
    let mut fields = text.split(' ');
    if fields.next()? != "v1" {
        return None;
    }
    let mut parts = LabelParts::default();
    for field in fields {
        let (key, value) = field.split_once('=')?;
        match key {
            "base" => parts.base = value.to_owned(),
            "rie" => parts.rie = value.to_owned(),
            "dockerfile" => parts.dockerfile = value.to_owned(),
            "names" => parts.names = value.to_owned(),
            "layers" => {
                parts.layers = value
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            _ => return None,
        }
    }
    Some(parts)
}

/// The LABEL line appended to the Dockerfile: one step for all labels (the classic builder
/// commits one intermediate image per LABEL instruction).
pub fn label_line(parts: &Parts) -> String {
    format!(
        "LABEL {FINGERPRINT_LABEL}=\"{}\" {PARTS_LABEL}=\"{}\" {VERSION_LABEL}=\"{}\"\n",
        parts.fingerprint(),
        parts.to_label(),
        env!("CARGO_PKG_VERSION")
    )
}

/// Why an existing image does (not) serve the request.
pub fn decide(existing: Option<&ImageInfo>, parts: &Parts, force: bool) -> (Reason, String) {
    let Some(existing) = existing else {
        return (Reason::Missing, String::new());
    };
    let Some(old) = existing.labels.get(FINGERPRINT_LABEL) else {
        return (Reason::Missing, String::new());
    };
    if force {
        return (Reason::Forced, String::new());
    }
    if *old == parts.fingerprint() {
        return (Reason::UpToDate, String::new());
    }
    let Some(old) = existing
        .labels
        .get(PARTS_LABEL)
        .and_then(|p| parse_label(p))
    else {
        return (Reason::DefinitionChanged, String::new());
    };
    if old.base != parts.base {
        return (Reason::BaseChanged, String::new());
    }
    if old.rie != parts.rie {
        return (Reason::RieChanged, String::new());
    }
    if old.dockerfile != parts.dockerfile
        || old.names != parts.names_digest()
        || old.layers.len() != parts.layers.len()
    {
        return (Reason::DefinitionChanged, String::new());
    }
    for ((name, digest), old_digest) in parts.layers.iter().zip(&old.layers) {
        if digest != old_digest {
            return (Reason::LayerChanged, name.clone());
        }
    }
    (Reason::DefinitionChanged, String::new())
}

/// Runs one build (or cache check) to its outcome.
/// Layer files are read with `peer`'s rights (see `access.rs`).
pub async fn run(
    shared: Arc<Shared>,
    plan: Plan,
    peer: Option<Peer>,
    reporter: Reporter,
) -> Result<Completed> {
    let started = Instant::now();
    let engine = &shared.engine;

    let rie = rie_path(&shared.rie_dir, plan.arch);
    // One trip to the blocking pool for all file I/O (a warm hit is a few stats; each trip
    // costs a thread hand-off). Walks are bounded (`walks`): many large distinct requests
    // must not fill the blocking pool that running builds stream from.
    let walk_permit = shared
        .walks
        .acquire()
        .await
        .map_err(|_| Error::Unavailable("daemon shutting down".into()))?;
    let (rie_digest, tree) = {
        let (cache, path, specs, limits) = (
            shared.stat_cache.clone(),
            rie.clone(),
            plan.layers.clone(),
            shared.limits,
        );
        let zips = shared.zips.clone();
        let peer_for_walk = peer.clone();
        let work = move || {
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
            .is_some_and(|n| *n <= INLINE_WALK_ENTRIES);
        if small {
            work()?
        } else {
            blocking(work).await?
        }
    };
    // Zip layers never go inline: a changed archive may need a long extraction.
    let entries = tree.as_ref().map_or(0, |t| {
        if t.entries.values().any(|e| e.from_cache) {
            usize::MAX
        } else {
            t.entries.len()
        }
    });
    shared.walk_sizes.insert(plan.tag.clone(), entries);
    for warning in tree.iter().flat_map(|t| t.warnings.iter()) {
        reporter.emit(Event::Warning {
            code: warning.code.into(),
            message: warning.message.clone(),
        });
    }
    let tree = tree.map(Arc::new);
    drop(walk_permit);

    // A registry that stalls mid-pull must not hang this tag forever.
    let base = tokio::time::timeout(shared.build_timeout, ensure_base(engine, &plan, &reporter))
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

    let parts = Parts {
        base: base.id.clone(),
        rie: hex::encode(rie_digest),
        dockerfile: hex::encode(Sha256::digest(plan.dockerfile.as_bytes())),
        layers: plan
            .layers
            .iter()
            .zip(tree.iter().flat_map(|t| t.layer_digests.iter()))
            .map(|(spec, digest)| (spec.name.clone(), digest.clone()))
            .collect(),
    };

    // The tag is asked of the engine, never the index: a "cached" answer must name an image
    // that exists, and the index hears of a `docker rmi` only when its event arrives, which
    // can be after the removal has returned and the next request has come in.
    let existing = engine.inspect_fresh(&plan.tag).await?;
    let (reason, changed_layer) = decide(existing.as_ref(), &parts, plan.force_image_build);
    if reason == Reason::UpToDate {
        record_use(&shared, &plan.tag);
        // `decide` only says UpToDate for an existing image.
        let existing = existing.unwrap_or_default();
        return Ok(Completed {
            tag: plan.tag.clone(),
            image_id: existing.id,
            cached: true,
            reason,
            changed_layer,
            duration_ms: elapsed_ms(started),
            config: existing.config,
        });
    }

    let _slot = reporter.slot().await?;
    pass_gate(shared.hooks.before_build.as_ref()).await;
    let dockerfile = format!("{}{}", plan.dockerfile, label_line(&parts));
    let spec = context::Spec {
        dockerfile,
        rie,
        tree,
        peer: peer.clone(),
    };
    let build = async {
        let first = engine_build(&shared, &plan, spec.clone(), &reporter).await;
        match first {
            // Someone (`docker rmi`, `image prune`) removed the build cache step this build
            // was reusing while it ran; the next attempt rebuilds that step.
            Err(Error::FailedPrecondition(message))
                if message.contains("unknown parent image ID") =>
            {
                reporter.emit(Event::Warning {
                    code: "build_cache_removed".into(),
                    message: format!("the engine's build cache changed under the build ({message}); retrying once"),
                });
                engine_build(&shared, &plan, spec, &reporter).await
            }
            other => other,
        }
    };
    let image_id = match tokio::time::timeout(shared.build_timeout, build).await {
        Ok(result) => result.map_err(|err| access::denied_for(peer.as_ref(), err))?,
        Err(_) => {
            return Err(Error::DeadlineExceeded(format!(
                "building {} took longer than --build-timeout ({}s); raise it or check the engine",
                plan.tag,
                shared.build_timeout.as_secs()
            )));
        }
    };

    pass_gate(shared.hooks.after_build.as_ref()).await;
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
    record_use(&shared, &plan.tag);
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
    Ok(Completed {
        tag: plan.tag.clone(),
        image_id: built.id,
        cached: false,
        reason,
        changed_layer,
        duration_ms: elapsed_ms(started),
        config: built.config,
    })
}

/// Notes the tag's use for prune, off the request path and at most once a minute per tag
/// (prune works in hours; a warm hit should not pay for a file write).
fn record_use(shared: &Shared, tag: &str) {
    let now = Instant::now();
    let fresh = shared
        .last_recorded
        .get(tag)
        .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(60));
    if fresh {
        return;
    }
    shared.last_recorded.insert(tag.to_owned(), now);
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
    use std::collections::HashMap;

    use super::*;

    fn parts() -> Parts {
        Parts {
            base: "sha256:base".into(),
            rie: "rie".into(),
            dockerfile: "df".into(),
            layers: vec![("a".into(), "1".into()), ("b".into(), "2".into())],
        }
    }

    fn image(parts: &Parts) -> ImageInfo {
        ImageInfo {
            id: "sha256:x".into(),
            labels: HashMap::from([
                (FINGERPRINT_LABEL.into(), parts.fingerprint()),
                (PARTS_LABEL.into(), parts.to_label()),
            ]),
            config: Default::default(),
        }
    }

    #[test]
    fn reasons_name_what_changed() {
        let old = parts();
        let existing = image(&old);
        assert_eq!(decide(None, &old, false).0, Reason::Missing);
        assert_eq!(
            decide(Some(&ImageInfo::default()), &old, false).0,
            Reason::Missing
        );
        assert_eq!(decide(Some(&existing), &old, false).0, Reason::UpToDate);
        assert_eq!(decide(Some(&existing), &old, true).0, Reason::Forced);
        let mut new = old.clone();
        new.layers[1].1 = "changed".into();
        assert_eq!(
            decide(Some(&existing), &new, false),
            (Reason::LayerChanged, "b".into())
        );
        let mut new = old.clone();
        new.base = "sha256:other".into();
        assert_eq!(decide(Some(&existing), &new, false).0, Reason::BaseChanged);
        let mut new = old.clone();
        new.rie = "other".into();
        assert_eq!(decide(Some(&existing), &new, false).0, Reason::RieChanged);
        let mut new = old.clone();
        new.layers.pop();
        assert_eq!(
            decide(Some(&existing), &new, false).0,
            Reason::DefinitionChanged
        );
    }

    #[test]
    fn label_round_trips_and_is_dockerfile_safe() {
        let mut p = parts();
        p.layers[0].0 = "evil\"\nRUN rm -rf /".into();
        let line = label_line(&p);
        assert_eq!(line.matches('\n').count(), 1, "one line: {line}");
        assert!(!line.contains("evil"));
        let parsed = parse_label(&p.to_label()).unwrap();
        assert_eq!(parsed.layers, vec!["1".to_owned(), "2".to_owned()]);
        assert_eq!(parsed.names, p.names_digest());
        assert_eq!(parse_label("v2 base=x"), None);
    }

    #[test]
    fn steps_are_parsed_from_both_engines() {
        assert_eq!(
            parse_step("Step 2/4 : COPY aws-lambda-rie /var/rapid/aws-lambda-rie"),
            Some(2)
        );
        assert_eq!(parse_step("STEP 3/3: COPY opt/ /opt/"), Some(3));
        assert_eq!(parse_step(" ---> Using cache"), None);
    }
}
