//! When to look in the registry cache (`--registry-cache-policy auto|always|never`): a pull must
//! never make a runner slower than building. Pure but for the rates it learns and a `stat` per zip layer.
//!
//! Under `auto` each cold build compares two estimates, made before any registry call:
//! - **local build**: [`LOCAL_FIXED`] plus the bytes of the layers it would send (the layer
//!   files and the RIE) over the rate at which this daemon's engine took its past loads (bytes
//!   sent / load time, the engine's own writing included): a remote engine behind a slow link
//!   shows here. Until a load of at least [`MIN_SAMPLE`] was measured: [`DEFAULT_SEND`] for an
//!   engine on a Unix socket, [`DEFAULT_REMOTE_SEND`] for one over TCP.
//! - **pull**: [`PULL_FIXED`] (lookup, manifest, config, the engine's setup) plus the bytes the
//!   engine would download over the rate of this daemon's past registry-cache pulls (bytes the
//!   engine reported downloading / pull time; [`DEFAULT_PULL`] until measured). The engine's API
//!   gives no manifest's layer sizes before the pull, so the download is estimated from the
//!   request: a zip layer as its archive's size (the registry's gzip blob of the same content is
//!   about as small), a directory layer and the RIE as their bytes (taken as incompressible,
//!   which leans towards building).
//!
//! The lookup happens only when the pull is estimated to be faster; the decision and both
//! estimates are a status line in the build's events. Zip extraction is not in the local
//! estimate: the walk that computes the fingerprint has extracted them before the decision.

use std::sync::Mutex;
use std::time::Duration;

use crate::access::{self, Peer};
use crate::layers::{Kind, Tree};
use crate::resolve::LayerSpec;

/// What a local build costs besides its bytes (assembly start, load call, tag, inspect).
pub const LOCAL_FIXED: Duration = Duration::from_millis(50);
/// What a pull costs besides its bytes: the lookup, the manifest and config requests, the
/// engine's own setup.
pub const PULL_FIXED: Duration = Duration::from_millis(500);
/// Assumed rate of loads into an engine on a Unix socket until one is measured (bytes/s):
/// a cold 200 MB assembly takes 0.7–2.5 s here.
pub const DEFAULT_SEND: f64 = 150e6;
/// Assumed rate of loads into an engine over TCP until one is measured (100 Mbit/s).
pub const DEFAULT_REMOTE_SEND: f64 = 12.5e6;
/// Assumed download rate of registry-cache pulls until one is measured (bytes/s).
pub const DEFAULT_PULL: f64 = 50e6;
/// Loads and pulls smaller than this teach nothing (their fixed costs dominate).
pub const MIN_SAMPLE: u64 = 1 << 20;

/// `--registry-cache-policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// Look up only when the pull is estimated to beat a local build.
    #[default]
    Auto,
    /// Look up before every cold build.
    Always,
    /// Never look up (images are still pushed, for the rest of the fleet).
    Never,
}

impl Policy {
    /// Parses `auto`, `always` or `never`.
    pub fn parse(text: &str) -> Option<Policy> {
        match text {
            "auto" => Some(Policy::Auto),
            "always" => Some(Policy::Always),
            "never" => Some(Policy::Never),
            _ => None,
        }
    }

    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Auto => "auto",
            Policy::Always => "always",
            Policy::Never => "never",
        }
    }
}

/// Rates learned from this daemon's own loads and pulls (bytes/s), each the mean of the last
/// sample and the mean before it (recent samples weigh most: links change).
#[derive(Debug, Default)]
pub struct Rates {
    send: Mutex<Option<f64>>,
    pull: Mutex<Option<f64>>,
}

impl Rates {
    /// A load of `bytes` took `took`.
    pub fn learn_send(&self, bytes: u64, took: Duration) {
        learn(&self.send, bytes, took);
    }

    /// A pull that downloaded `bytes` took `took`.
    pub fn learn_pull(&self, bytes: u64, took: Duration) {
        learn(&self.pull, bytes, took);
    }

    /// The load rate: learned, else the default for a `remote` engine or a local one.
    pub fn send(&self, remote: bool) -> f64 {
        let default = if remote {
            DEFAULT_REMOTE_SEND
        } else {
            DEFAULT_SEND
        };
        crate::sync::lock(&self.send).unwrap_or(default)
    }

    /// The pull rate: learned, else [`DEFAULT_PULL`].
    pub fn pull(&self) -> f64 {
        crate::sync::lock(&self.pull).unwrap_or(DEFAULT_PULL)
    }
}

fn learn(rate: &Mutex<Option<f64>>, bytes: u64, took: Duration) {
    if bytes < MIN_SAMPLE || took.is_zero() {
        return;
    }
    let sample = bytes as f64 / took.as_secs_f64();
    let mut rate = crate::sync::lock(rate);
    *rate = Some(rate.map_or(sample, |old| (old + sample) / 2.0));
}

/// The bytes a local build of `specs` (walked into `tree`) over an RIE of `rie_bytes` sends,
/// and the bytes a pull of it is expected to download (module doc): (local, pull). A zip
/// layer's archive is `stat`ed with `peer`'s rights (the walk read it so); one that cannot be
/// counts as its extracted bytes.
pub fn sizes(specs: &[LayerSpec], tree: Option<&Tree>, rie_bytes: u64, peer: &Peer) -> (u64, u64) {
    let (mut local, mut pull) = (rie_bytes, rie_bytes);
    let Some(tree) = tree else {
        return (local, pull);
    };
    for (spec, entries) in specs.iter().zip(&tree.layers) {
        let bytes: u64 = entries
            .iter()
            .map(|e| match &e.kind {
                Kind::File { size, .. } => *size,
                _ => 0,
            })
            .sum();
        local += bytes;
        let archive = access::as_peer(peer, || {
            std::fs::metadata(&spec.path)
                .map_err(|err| crate::error::Error::io("stat", &spec.path, &err))
        });
        pull += match archive {
            Ok(meta) if meta.is_file() => meta.len().min(bytes),
            _ => bytes,
        };
    }
    (local, pull)
}

/// Both estimates for one cold build.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Bytes a local build sends the engine.
    pub local_bytes: u64,
    pub local: Duration,
    /// Bytes the pull is expected to download.
    pub pull_bytes: u64,
    pub pull: Duration,
}

/// The estimates for sending `local_bytes` at `send_rate` and downloading `pull_bytes` at
/// `pull_rate` (bytes/s).
pub fn estimate(local_bytes: u64, pull_bytes: u64, send_rate: f64, pull_rate: f64) -> Estimate {
    let at = |bytes: u64, rate: f64| Duration::from_secs_f64(bytes as f64 / rate.max(1.0));
    Estimate {
        local_bytes,
        local: LOCAL_FIXED + at(local_bytes, send_rate),
        pull_bytes,
        pull: PULL_FIXED + at(pull_bytes, pull_rate),
    }
}

/// Whether to look in the registry under `policy`, and the status line that says so
/// ("registry cache skipped: local build of 212.0 MiB estimated at 1.5 s, pull of 212.0 MiB at 4.7 s").
pub fn decide(policy: Policy, estimate: &Estimate) -> (bool, String) {
    let local = format!(
        "local build of {} estimated at {:.1} s",
        bytesize::ByteSize::b(estimate.local_bytes),
        estimate.local.as_secs_f64()
    );
    let pull = format!(
        "pull of {} at {:.1} s",
        bytesize::ByteSize::b(estimate.pull_bytes),
        estimate.pull.as_secs_f64()
    );
    match policy {
        Policy::Never => (
            false,
            "registry cache skipped: --registry-cache-policy never".into(),
        ),
        Policy::Always => (
            true,
            format!("registry cache: looking up (--registry-cache-policy always; {local}, {pull})"),
        ),
        Policy::Auto if estimate.pull < estimate.local => (
            true,
            format!("registry cache: looking up: {pull} beats {local}"),
        ),
        Policy::Auto => (false, format!("registry cache skipped: {local}, {pull}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local engine with a small layer builds; a slow link or a big compressible zip pulls;
    /// `always` and `never` override.
    #[test]
    fn the_cheaper_way_wins() {
        let small = estimate(2 << 20, 2 << 20, DEFAULT_SEND, DEFAULT_PULL);
        assert!(!decide(Policy::Auto, &small).0, "{small:?}");
        let (look, text) = decide(Policy::Auto, &small);
        assert!(
            !look && text.starts_with("registry cache skipped: local build of 2.0 MiB"),
            "{text}"
        );
        assert!(decide(Policy::Always, &small).0);

        let throttled = estimate(200 << 20, 200 << 20, 2e6, DEFAULT_PULL);
        assert!(decide(Policy::Auto, &throttled).0, "{throttled:?}");
        assert!(!decide(Policy::Never, &throttled).0);

        let compressible_zip = estimate(800 << 20, 4 << 20, DEFAULT_SEND, DEFAULT_PULL);
        assert!(
            decide(Policy::Auto, &compressible_zip).0,
            "{compressible_zip:?}"
        );
    }

    /// Rates start at the documented defaults and follow measured samples; tiny samples
    /// teach nothing.
    #[test]
    fn rates_are_learned_from_samples() {
        let rates = Rates::default();
        assert_eq!(rates.send(false), DEFAULT_SEND);
        assert_eq!(rates.send(true), DEFAULT_REMOTE_SEND);
        rates.learn_send(1000, Duration::from_secs(10));
        assert_eq!(rates.send(true), DEFAULT_REMOTE_SEND, "below MIN_SAMPLE");
        rates.learn_send(10_000_000, Duration::from_secs(5));
        assert_eq!(rates.send(false), 2e6);
        rates.learn_send(10_000_000, Duration::from_secs(1));
        assert_eq!(rates.send(false), 6e6);
        rates.learn_pull(100_000_000, Duration::from_secs(1));
        assert_eq!(rates.pull(), 1e8);
    }
}
