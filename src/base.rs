//! The base image, step 2 of a build: present, pulled, fresh.
//!
//! [`base_image`] inspects the base and pulls it when missing and allowed (one pull per base
//! and platform, shared by the requests that need it), and names a failed pull's cause
//! ([`pull_failure`]). Freshness is shared by every client: a ZIP function's base is compared
//! with its registry at most once per base per `--base-check-ttl`, in the background, while
//! requests are answered from the local base (stale-while-revalidate).
//!
//! SAM asks the registry on every request and fails offline (aws-sam-cli #3773, #4702); we
//! ask once per TTL for everyone, never make a request wait when a local base exists, keep
//! working from the local base when the registry fails (with a back-off before the next try),
//! and treat an engine without the distribution API (Podman, aws-sam-cli #5019) as "current".
//! An outdated base is pulled in the background; the next request sees the new base id, so
//! its fingerprint differs and it rebuilds with reason `base_changed`.
//!
//! What the base is on this engine: its [`identity`] in fingerprints (the config digest, the
//! same on every store) and the [`archive_format`] a build over it is sent in (by the engine's
//! image store, over the base's own layer descriptors on Docker's containerd store).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::assemble::{self, Reuse};
use crate::builds::Reporter;
use crate::engine::{Engine, ImageInfo, ImageStoreKind, RegistryError};
use crate::error::{Error, Result};
use crate::outcome::{Event, LogKind};
use crate::reference::ImageRef;
use crate::resolve::{Arch, Plan};

/// The longest back-off between failed checks of one base, whatever the TTL.
const MAX_BACKOFF: Duration = Duration::from_secs(60 * 60);

/// The checks of every base the daemon used; one per daemon.
pub struct Freshness {
    ttl: Duration,
    /// std Mutex: held only to read or update one entry, never across an `.await`.
    entries: Mutex<HashMap<String, Entry>>,
    /// The engine has no distribution API; logged once, then every base counts as current.
    unsupported: AtomicBool,
}

#[derive(Debug, Default)]
struct Entry {
    /// When the next check is due; `None` before the first one.
    due: Option<Instant>,
    /// A check is running in the background (concurrent requests share it).
    checking: bool,
    /// Why the last check failed, until one succeeds.
    failure: Option<String>,
    /// Consecutive failed checks (the back-off doubles with each).
    failures: u32,
}

/// What a request is told about its base.
#[derive(Debug, PartialEq, Eq)]
pub struct Status {
    /// Start the background check (this request is the first to find it due).
    pub start_check: bool,
    /// The `base_unverified` warning: why the base is served unverified.
    pub unverified: Option<String>,
}

impl Freshness {
    /// Checks each base at most once per `ttl`.
    pub fn new(ttl: Duration) -> Freshness {
        Freshness {
            ttl,
            entries: Mutex::new(HashMap::new()),
            unsupported: AtomicBool::new(false),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // The map holds plain data; a panic elsewhere cannot leave an entry half-updated.
        crate::sync::lock(&self.entries)
    }

    /// A request is about to use the local `base` (at `now`): whether to start a check, and
    /// whether the base is served unverified (check overdue, or the last one failed).
    pub fn status(&self, base: &str, now: Instant) -> Status {
        if self.unsupported.load(Ordering::Relaxed) {
            return Status {
                start_check: false,
                unverified: None,
            };
        }
        let mut entries = self.entries();
        let entry = entries.entry(base.to_owned()).or_default();
        let due = entry.due.is_none_or(|due| now >= due);
        let start_check = due && !entry.checking;
        if start_check {
            entry.checking = true;
        }
        let unverified = match (&entry.failure, due) {
            (Some(failure), _) => Some(format!(
                "base image {base} could not be checked against its registry ({failure}); \
                 using the local copy, next check {}",
                if due { "now" } else { "after a back-off" }
            )),
            (None, true) => Some(format!(
                "base image {base} is due for its freshness check (every {}); using the local \
                 copy while it is checked in the background",
                humantime::format_duration(self.ttl)
            )),
            (None, false) => None,
        };
        Status {
            start_check,
            unverified,
        }
    }

    /// `base` was just pulled or found current: the next check is one TTL away.
    pub fn verified(&self, base: &str, now: Instant) {
        let mut entries = self.entries();
        let entry = entries.entry(base.to_owned()).or_default();
        *entry = Entry {
            due: Some(now + self.ttl),
            ..Entry::default()
        };
    }

    /// The check of `base` failed with `why`: the next one waits a back-off that doubles with
    /// each consecutive failure (from one TTL up to an hour, or the TTL if longer).
    pub fn failed(&self, base: &str, why: String, now: Instant) {
        let mut entries = self.entries();
        let entry = entries.entry(base.to_owned()).or_default();
        entry.failures = entry.failures.saturating_add(1);
        let factor = 1u32 << (entry.failures - 1).min(12);
        let backoff = self
            .ttl
            .saturating_mul(factor)
            .min(MAX_BACKOFF.max(self.ttl));
        entry.due = Some(now + backoff);
        entry.checking = false;
        entry.failure = Some(why);
    }

    /// The engine has no distribution API: every base counts as current from now on.
    fn unsupported(&self, base: &str) {
        if !self.unsupported.swap(true, Ordering::Relaxed) {
            tracing::info!(
                base,
                "the engine has no distribution API (Podman?); base images count as current \
                 and are never checked for freshness"
            );
        }
        self.entries().remove(base);
    }
}

/// The background check of `base`: asks the registry (through the engine) for its digest,
/// pulls the base when the local copy's repo digests do not include it, and records the
/// outcome. `local_digests` are the local base's `RepoDigests`. A check (pull included) that
/// takes longer than `limit` (`--build-timeout`) counts as failed, so a stalled registry never
/// leaves the base marked "checking" for good.
pub async fn check(
    engine: Arc<Engine>,
    freshness: Arc<Freshness>,
    base: ImageRef,
    platform: &'static str,
    local_digests: Vec<String>,
    limit: Duration,
) {
    let name = base.as_str().to_owned();
    let work = check_now(&engine, &freshness, &base, platform, &local_digests);
    if tokio::time::timeout(limit, work).await.is_err() {
        tracing::warn!(base = name, "base image freshness check timed out");
        freshness.failed(
            &name,
            format!(
                "no answer within --build-timeout ({})",
                humantime::format_duration(limit)
            ),
            Instant::now(),
        );
    }
}

async fn check_now(
    engine: &Arc<Engine>,
    freshness: &Freshness,
    base: &ImageRef,
    platform: &'static str,
    local_digests: &[String],
) {
    let name = base.as_str().to_owned();
    let remote = match engine.registry_digest(&name).await {
        Ok(digest) => digest,
        Err(RegistryError::Unsupported) => {
            freshness.unsupported(&name);
            return;
        }
        Err(err) => {
            tracing::warn!(base = name, error = %err, "base image freshness check failed");
            freshness.failed(&name, err.to_string(), Instant::now());
            return;
        }
    };
    let current = local_digests.iter().any(|d| {
        d.rsplit_once('@')
            .is_some_and(|(_, digest)| digest == remote)
    });
    if current {
        tracing::debug!(base = name, digest = remote, "base image is current");
        freshness.verified(&name, Instant::now());
        return;
    }
    tracing::info!(base = name, digest = remote, "base image outdated; pulling");
    // Shared with any request pulling the same base right now.
    if let Err(err) = engine.start_pull(base, platform).wait(|_| {}).await {
        tracing::warn!(base = name, error = %err, "pulling the updated base image failed");
        freshness.failed(
            &name,
            format!("pulling the update failed: {err}"),
            Instant::now(),
        );
        return;
    }
    // Refresh the index now: the next request must see the new base id, not wait for the
    // engine's event.
    match engine.inspect_fresh(&name).await {
        Ok(_) => freshness.verified(&name, Instant::now()),
        Err(err) => freshness.failed(&name, err.to_string(), Instant::now()),
    }
}

/// Step 2: the base image, pulled when missing and allowed, within `--build-timeout` (a
/// registry that stalls mid-pull must not hang this tag forever); warns when its
/// architecture is not the requested one.
///
/// A ZIP function's base, unless `skip_pull_image`, is also kept fresh (see [`Freshness`]): a
/// local base is used at once, and when its check is due one check starts in the background
/// (the next request after an update rebuilds with `base_changed`); a base served while its
/// check is overdue or failed gets a `base_unverified` warning.
pub async fn base_image(
    tasks: &crate::tasks::Tasks,
    engine: &Arc<Engine>,
    freshness: &Arc<Freshness>,
    build_timeout: Duration,
    plan: &Plan,
    reporter: &Reporter,
) -> Result<ImageInfo> {
    let checked = plan.package_type == crate::resolve::PackageType::Zip && !plan.skip_pull_image;
    let (base, existed) = tokio::time::timeout(build_timeout, ensure_base(engine, plan, reporter))
        .await
        .map_err(|_| {
            Error::DeadlineExceeded(format!(
                "getting base image {} took longer than --build-timeout ({}s); check the \
             registry, or pull it yourself",
                plan.base,
                build_timeout.as_secs()
            ))
        })??;
    if checked {
        let name = plan.base.as_str();
        if existed {
            let status = freshness.status(name, Instant::now());
            if status.start_check {
                let name = format!("freshness check of {}", plan.base);
                tasks.spawn(
                    name,
                    check(
                        engine.clone(),
                        freshness.clone(),
                        plan.base.clone(),
                        plan.arch.platform(),
                        base.repo_digests.clone(),
                        build_timeout,
                    ),
                );
            }
            if let Some(message) = status.unverified {
                reporter.emit(Event::Warning {
                    code: "base_unverified".into(),
                    message,
                });
            }
        } else {
            // Just pulled: as fresh as the registry's.
            freshness.verified(name, Instant::now());
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
        // A refusal, a limit or a bug of ours keep their kind, with the base named.
        err @ (Error::PermissionDenied(_)
        | Error::ReadDenied { .. }
        | Error::ResourceExhausted(_)
        | Error::Internal(_)) => err.context(&format!("pulling base image {name} failed")),
        err => Error::FailedPrecondition(format!("pulling base image {name} failed: {err}")),
    }
}

/// One item of the engine's pull stream of `image`, as a PullProgress event (with progress)
/// or a status log line.
pub fn report_pull(reporter: &Reporter, image: &str, item: &bollard::models::CreateImageInfo) {
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

/// The base's identity in fingerprints: its config digest, the same on every store. Docker's
/// classic store and Podman name an image by it; Docker's containerd store names it by its
/// manifest digest, so there it is read from the manifest (once per base). An image pushed to
/// the registry cache from one store is then found from the other. If the manifest cannot be
/// read, the containerd store's ID (logged): only cross-store hits are lost.
pub async fn identity(engine: &Engine, base: &ImageInfo) -> String {
    if engine.image_store().await.ok() != Some(ImageStoreKind::Containerd) {
        return base.id.clone();
    }
    let architecture = base.config.architecture.as_str();
    match engine.manifest_facts(&base.id, architecture).await {
        Ok(facts) => facts.config.clone(),
        Err(err) => {
            tracing::warn!(base = %base.id, error = %err, "base config digest unknown: fingerprints name its manifest");
            base.id.clone()
        }
    }
}

/// What the engine's loader may be spared, and the archive format that spares it: a docker
/// archive with zero-size entries for held chains on Docker's classic store and Podman; an OCI
/// layout naming held blobs on Docker's containerd store, over the base's own layer
/// descriptors (read from the engine once per base). If those cannot be read, a docker archive
/// with every layer of ours, as that store's importer needs (logged).
pub async fn archive_format(
    engine: &Engine,
    base: &ImageInfo,
) -> Result<(Reuse, assemble::Format)> {
    if engine.image_store().await? != ImageStoreKind::Containerd {
        return Ok((Reuse::Chains, assemble::Format::DockerArchive));
    }
    let architecture = base.config.architecture.as_str();
    match engine.manifest_facts(&base.id, architecture).await {
        Ok(facts) if facts.layers.len() == base.diff_ids.len() => Ok((
            Reuse::ChainsAndBlobs,
            assemble::Format::OciLayout {
                base_layers: Arc::new(facts.layers.clone()),
            },
        )),
        other => {
            let why = match other {
                Err(err) => err.to_string(),
                Ok(facts) => format!(
                    "{} layers for {} diff IDs",
                    facts.layers.len(),
                    base.diff_ids.len()
                ),
            };
            tracing::warn!(base = %base.id, error = %why, "base layer descriptors unknown: sending every layer");
            Ok((Reuse::Nothing, assemble::Format::DockerArchive))
        }
    }
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

    /// Concurrent requests share one check; before the TTL nothing is checked; a failure
    /// backs off, doubling, and is named in every warning until a check succeeds.
    #[test]
    fn one_check_per_ttl_with_back_off() {
        let ttl = Duration::from_secs(10);
        let fresh = Freshness::new(ttl);
        let t0 = Instant::now();
        let first = fresh.status("b", t0);
        assert!(first.start_check && first.unverified.is_some(), "{first:?}");
        let second = fresh.status("b", t0);
        assert!(!second.start_check, "a check is in flight");
        fresh.verified("b", t0);
        assert_eq!(
            fresh.status("b", t0 + ttl / 2),
            Status {
                start_check: false,
                unverified: None
            }
        );
        assert!(fresh.status("b", t0 + ttl).start_check, "due after the TTL");
        fresh.failed("b", "connection refused".into(), t0 + ttl);
        let backing_off = fresh.status("b", t0 + ttl + ttl / 2);
        assert!(!backing_off.start_check);
        assert!(
            backing_off
                .unverified
                .unwrap()
                .contains("connection refused")
        );
        assert!(fresh.status("b", t0 + ttl * 2).start_check);
        fresh.failed("b", "again".into(), t0 + ttl * 2);
        assert!(
            !fresh.status("b", t0 + ttl * 3).start_check,
            "back-off doubled"
        );
        assert!(fresh.status("b", t0 + ttl * 4).start_check);
        fresh.unsupported("b");
        assert_eq!(
            fresh.status("b", t0 + ttl * 100),
            Status {
                start_check: false,
                unverified: None
            },
            "no distribution API: current"
        );
    }
}
