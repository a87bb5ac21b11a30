//! The daemon's settings, validated once at start-up.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::archive::ZipLimits;
use crate::layers::Limits;

/// Everything the daemon needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Socket to serve on (unless a systemd-passed socket is used).
    pub socket: PathBuf,
    /// Layer cache and the daemon's own records.
    pub cache_dir: PathBuf,
    /// Where `aws-lambda-rie-{x86_64,arm64}` are read.
    pub rie_dir: PathBuf,
    /// Engine address (`unix://...`, `tcp://...`).
    pub engine_host: String,
    /// Longest a single engine build may take.
    pub build_timeout: Duration,
    /// Most engine builds at once.
    pub max_parallel_builds: usize,
    /// How long SIGTERM waits for builds in flight.
    pub shutdown_timeout: Duration,
    /// Limits on layer content per request.
    pub limits: Limits,
    /// Limits on zip layer archives.
    pub zip_limits: ZipLimits,
    /// Prune our images down to this size after each build.
    pub max_cache_bytes: Option<u64>,
    /// Points where tests hold builds. Never set by flags.
    pub hooks: TestHooks,
}

/// Gates a test can hold builds at, to reach a known point without sleeping. Each gate, when
/// set, consumes one permit per build.
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Before the engine build starts (a build slot is already held).
    pub before_build: Option<Arc<Semaphore>>,
    /// After the engine finished building, before the outcome is published.
    pub after_build: Option<Arc<Semaphore>>,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The default socket: `/run/lambda-imaged/lambda-imaged.sock` as root,
/// `$XDG_RUNTIME_DIR/lambda-imaged.sock` otherwise.
pub fn default_socket() -> PathBuf {
    if let Some(path) = std::env::var_os("LAMBDA_IMAGED_SOCKET") {
        return PathBuf::from(path);
    }
    if !is_root() {
        if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
            return Path::new(&dir).join("lambda-imaged.sock");
        }
    }
    PathBuf::from("/run/lambda-imaged/lambda-imaged.sock")
}

/// The default cache: `/var/cache/lambda-imaged` as root, `$XDG_CACHE_HOME/lambda-imaged`
/// (or `~/.cache/lambda-imaged`) otherwise.
pub fn default_cache_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/cache/lambda-imaged");
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Path::new(&dir).join("lambda-imaged");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    Path::new(&home).join(".cache/lambda-imaged")
}

impl Config {
    /// Defaults for everything, with `socket` and `cache_dir` as given.
    pub fn new(socket: PathBuf, cache_dir: PathBuf) -> Config {
        Config {
            rie_dir: cache_dir.join("rie"),
            socket,
            cache_dir,
            engine_host: crate::engine::Engine::host_from_env(),
            build_timeout: Duration::from_secs(15 * 60),
            max_parallel_builds: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            shutdown_timeout: Duration::from_secs(60),
            limits: Limits::default(),
            zip_limits: ZipLimits::default(),
            max_cache_bytes: None,
            hooks: TestHooks::default(),
        }
    }
}
