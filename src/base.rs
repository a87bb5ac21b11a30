//! Base image freshness, shared by every client: a ZIP function's base is compared with its
//! registry at most once per base per `--base-check-ttl`, in the background, while requests
//! are answered from the local base (stale-while-revalidate).
//!
//! SAM asks the registry on every request and fails offline (aws-sam-cli #3773, #4702); we
//! ask once per TTL for everyone, never make a request wait when a local base exists, keep
//! working from the local base when the registry fails (with a back-off before the next try),
//! and treat an engine without the distribution API (Podman, aws-sam-cli #5019) as "current".
//! An outdated base is pulled in the background; the next request sees the new base id, so
//! its fingerprint differs and it rebuilds with reason `base_changed`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::engine::{Engine, RegistryError};
use crate::reference::ImageRef;

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
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
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

#[cfg(test)]
mod tests {
    use super::*;

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
