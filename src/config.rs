//! The daemon's settings, validated once at start-up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::archive::ZipLimits;
/// Re-exported: the TLS settings of a `tcp://` engine ([`Config::engine_tls`]).
pub use crate::engine::EngineTls;
use crate::layers::Limits;
use tokio::sync::Semaphore;

/// `--registry-cache-policy`, for code that builds a [`Config`] (tests, embedders).
pub use crate::registry_policy::Policy as RegistryCachePolicy;

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
    /// TLS to a `tcp://` engine (`DOCKER_TLS_VERIFY` + `DOCKER_CERT_PATH`, or
    /// `engine_cert_path`); `None` for plain TCP and Unix sockets.
    pub engine_tls: Option<EngineTls>,
    /// Where Prometheus metrics are served (`GET /metrics`); `None`: no listener.
    pub metrics_listen: Option<SocketAddr>,
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
    /// Group that owns the socket (and may use the daemon).
    pub socket_gid: Option<u32>,
    /// Further uids allowed to use the daemon (root and the daemon's own uid always are).
    pub allow_uids: Vec<u32>,
    /// Further gids allowed to use the daemon.
    pub allow_gids: Vec<u32>,
    /// Points where tests hold builds. Never set by flags.
    pub hooks: TestHooks,
    /// How long a Build stream may wait on a client that does not read its events before it is
    /// ended with RESOURCE_EXHAUSTED (the build goes on for everyone else). Not a flag: tests
    /// shorten it.
    pub client_stall_timeout: Duration,
    /// How often each ZIP base is compared with its registry, for all clients together.
    pub base_check_ttl: Duration,
    /// How long an image that was an answer is kept after it was superseded (`retire.rs`).
    pub answer_grace: Duration,
    /// ZIP bases come from `<prefix>/<name:tag>` instead of `public.ecr.aws/lambda/...`.
    pub base_image_mirror: Option<String>,
    /// Most connections one peer uid may have open at once; further ones are closed on
    /// accept (`listener::accept`). At least 1.
    pub max_connections_per_uid: usize,
    /// `--registry-cache REGISTRY/REPO`: share built images with a fleet through this
    /// repository (validated by `into_config`); off when `None`.
    pub registry_cache: Option<String>,
    /// `--registry-cache-share-private`: also push images built from files others cannot read.
    pub registry_cache_share_private: bool,
    /// `--keep-warm`: watch the layer sources of images served within this window and rebuild
    /// them in the background when they change (`keep_warm.rs`); zero turns it off.
    pub keep_warm: Duration,
    /// `--registry-cache-policy`: when to look in the registry cache (`registry_policy.rs`).
    pub registry_cache_policy: crate::registry_policy::Policy,
    /// Most inotify watches keep-warm holds before it watches further sources by a stat walk
    /// ([`MAX_KEEP_WARM_INOTIFY_WATCHES`]). Not a flag: tests lower it to reach the fallback.
    pub keep_warm_inotify_watches: usize,
}

/// Default of [`Config::keep_warm`].
pub const DEFAULT_KEEP_WARM: Duration = Duration::from_secs(60 * 60);

/// Default of [`Config::keep_warm_inotify_watches`]: most inotify watches (directories)
/// keep-warm holds; further sources are polled. Well under the kernel's default
/// `max_user_watches` (8,192 before Linux 5.11, up to 1,048,576 after).
pub const MAX_KEEP_WARM_INOTIFY_WATCHES: usize = 8_192;

/// Gates a test can hold builds at, to reach a known point without sleeping. Each gate, when
/// set, consumes one permit per build. Set through [`Config::hooks`], never by flags.
#[derive(Debug, Clone, Default)]
pub struct TestHooks {
    /// Before the engine build starts (a build slot is already held).
    pub before_build: Option<Arc<Semaphore>>,
    /// After the engine finished building, before the outcome is published.
    pub after_build: Option<Arc<Semaphore>>,
    /// Before each background task runs (registry push, superseded-image removal, prune,
    /// last-use record, base check): see `tasks.rs`.
    pub background: Option<Arc<Semaphore>>,
    /// Before a registry-cache push talks to the engine (it is listed as running already):
    /// see `registry_cache.rs`.
    pub before_push: Option<Arc<Semaphore>>,
}

/// The cache directory's layout: every name under `--cache-dir`, in one place.
pub mod layout {
    /// Extracted zip layers, by content (`archive.rs`).
    pub const LAYERS: &str = "layers";
    /// Diff IDs of the layers we assembled, by content key (`image_store.rs`).
    pub const DIFF_IDS: &str = "diff-ids";
    /// Listings of the images we assembled, by image id (`image_store.rs`).
    pub const IMAGES: &str = "images";
    /// Last use of each tag, for prune (`prune.rs`).
    pub const USED: &str = "used";
    /// The RIE binaries' default place (`--rie-dir`).
    pub const RIE: &str = "rie";
    /// The persisted stat cache (`stat_cache.rs`).
    pub const STAT_CACHE_FILE: &str = "statcache.v1.json";
}

/// Default of [`Config::max_connections_per_uid`]: far above what one machine's emulators
/// open (one connection per client process, each carrying up to 256 streams), far below the
/// daemon's file descriptor limit (systemd's soft default is 1024).
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: usize = 256;

/// Default of [`Config::answer_grace`] (`--answer-grace`): how long after its last answer an
/// image is kept once superseded (`retire.rs`). SAM creates its container within a second of
/// the answer; a `start-api` with warm containers keeps the container, which keeps the image
/// by itself.
pub const ANSWER_GRACE: Duration = Duration::from_secs(5 * 60);

/// Default for [`Config::client_stall_timeout`]: a client whose queue stays full this long is
/// told RESOURCE_EXHAUSTED and let go, so it stops pinning its build's event log.
pub const CLIENT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
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
    /// Who may connect to the socket: everyone when `--allow-uid` or `--allow-gid` name ids
    /// (they need not be in the socket group; each call is checked against the caller's
    /// credentials), else root and the socket group.
    pub fn socket_reach(&self) -> crate::listener::Reach {
        if self.allow_uids.is_empty() && self.allow_gids.is_empty() {
            crate::listener::Reach::Group
        } else {
            crate::listener::Reach::Everyone
        }
    }

    /// Defaults for everything, with `socket` and `cache_dir` as given.
    pub fn new(socket: PathBuf, cache_dir: PathBuf) -> Config {
        Config {
            rie_dir: cache_dir.join(layout::RIE),
            socket,
            cache_dir,
            engine_host: crate::engine::Engine::host_from_env(),
            engine_tls: EngineTls::from_env(),
            metrics_listen: None,
            build_timeout: Duration::from_secs(15 * 60),
            max_parallel_builds: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            shutdown_timeout: Duration::from_secs(60),
            limits: Limits::default(),
            zip_limits: ZipLimits::default(),
            max_cache_bytes: None,
            socket_gid: None,
            allow_uids: Vec::new(),
            allow_gids: Vec::new(),
            hooks: TestHooks::default(),
            client_stall_timeout: CLIENT_STALL_TIMEOUT,
            base_check_ttl: Duration::from_secs(60 * 60),
            answer_grace: ANSWER_GRACE,
            base_image_mirror: None,
            max_connections_per_uid: DEFAULT_MAX_CONNECTIONS_PER_UID,
            registry_cache: None,
            registry_cache_share_private: false,
            keep_warm: DEFAULT_KEEP_WARM,
            registry_cache_policy: crate::registry_policy::Policy::Auto,
            keep_warm_inotify_watches: MAX_KEEP_WARM_INOTIFY_WATCHES,
        }
    }
}

/// Why a config file or a setting was refused. Each message names the file or the setting, and
/// what is expected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why reading failed.
        source: std::io::Error,
    },
    /// The config file is not valid TOML, or has an unknown key (the TOML error names it).
    #[error("{}: {source}", path.display())]
    Parse {
        /// The config file.
        path: PathBuf,
        /// The parser's error, with line and key (boxed: it is large).
        source: Box<toml::de::Error>,
    },
    /// A duration setting that is neither seconds nor a humantime string.
    #[error("{name} = {value:?}: {source} (e.g. \"90s\", \"15m\")")]
    Duration {
        /// The setting (`build_timeout`, `shutdown_timeout`).
        name: &'static str,
        /// What was given.
        value: String,
        /// Why it does not parse.
        source: humantime::DurationError,
    },
    /// A size setting that is not a bytesize string.
    #[error("{name} = {value:?}: {reason} (e.g. \"500MB\", \"10GiB\")")]
    Size {
        /// The setting (`max_cache_size`, `max_layer_bytes`, `max_zip_bytes`).
        name: &'static str,
        /// What was given.
        value: String,
        /// Why it does not parse (bytesize reports a message, not a type).
        reason: String,
    },
    /// `base_image_mirror` does not make valid image references.
    #[error(
        "base_image_mirror = {value:?}: {reason}; expected a registry and path prefix such as \
         \"127.0.0.1:5055/lambda\" (lower case, no tag)"
    )]
    Mirror {
        /// What was given.
        value: String,
        /// Why `<prefix>/python:3.12-x86_64` does not parse.
        reason: String,
    },
    /// The engine address or its TLS settings cannot work (unsupported scheme, a certificate
    /// file missing).
    #[error("engine = {value:?}: {reason}")]
    Engine {
        /// The engine address.
        value: String,
        /// What is wrong and what is supported.
        reason: String,
    },
    /// `metrics_listen` is not an IP address with a port.
    #[error("metrics_listen = {value:?}: {source}; expected IP:PORT such as \"127.0.0.1:9464\"")]
    MetricsListen {
        /// What was given.
        value: String,
        /// Why it does not parse.
        source: std::net::AddrParseError,
    },
    /// `max_parallel_builds = 0`.
    /// `registry_cache` does not name a registry repository.
    #[error(
        "registry_cache = {value:?}: {reason}; expected REGISTRY/REPO such as \
         \"registry.example.com:5000/lambda-cache\""
    )]
    RegistryCache {
        /// What was given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// `registry_cache_policy` is not one of auto, always, never.
    #[error(
        "registry_cache_policy = {value:?}: expected auto (look up only when a pull is estimated \
         to beat a local build), always or never"
    )]
    RegistryCachePolicy {
        /// What was given.
        value: String,
    },
    #[error("max_parallel_builds must be at least 1")]
    NoParallelBuilds,
    /// `max_connections_per_uid = 0`.
    #[error("max_connections_per_uid must be at least 1 (default 256)")]
    NoConnections,
    /// `log_format` is neither `text` nor `json`.
    #[error("log_format = {0:?}: one of \"text\", \"json\"")]
    LogFormat(String),
    /// `/etc/group` could not be read to look `socket_group` up.
    #[error("reading /etc/group: {0}")]
    GroupFile(std::io::Error),
    /// `socket_group` names no group in `/etc/group`.
    #[error("socket_group = {0:?}: no such group (create it with groupadd)")]
    NoSuchGroup(String),
}

/// Settings as written in the TOML file or given as flags; every field optional, flags win.
/// Durations are humantime strings ("15m", "90s"), sizes bytesize strings ("10GiB").
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Unix socket to serve on [default: /run/lambda-imaged/lambda-imaged.sock as root,
    /// $XDG_RUNTIME_DIR/lambda-imaged.sock otherwise]
    #[arg(long, env = "LAMBDA_IMAGED_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Group that owns the socket (name or gid); its members may use the daemon
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Further uids allowed to use the daemon (root and the daemon's own uid always are)
    #[arg(long = "allow-uid")]
    #[serde(default)]
    pub allow_uid: Vec<u32>,
    /// Further gids allowed to use the daemon
    #[arg(long = "allow-gid")]
    #[serde(default)]
    pub allow_gid: Vec<u32>,
    /// Layer cache and records [default: /var/cache/lambda-imaged as root,
    /// $XDG_CACHE_HOME/lambda-imaged otherwise]
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Directory holding aws-lambda-rie-x86_64 and aws-lambda-rie-arm64 [default: <cache-dir>/rie]
    #[arg(long, env = "LAMBDA_IMAGED_RIE_DIR")]
    pub rie_dir: Option<PathBuf>,
    /// Container engine address: unix:///path or tcp://host:port
    /// [default: $DOCKER_HOST, else unix:///var/run/docker.sock]
    #[arg(long)]
    pub engine: Option<String>,
    /// Directory with ca.pem, cert.pem and key.pem: talk TLS to a tcp:// engine and verify it
    /// [default: $DOCKER_CERT_PATH (else ~/.docker) when $DOCKER_TLS_VERIFY is set, else no TLS]
    #[arg(long)]
    pub engine_cert_path: Option<PathBuf>,
    /// Serve Prometheus metrics on IP:PORT at GET /metrics (e.g. 127.0.0.1:9464)
    /// [default: off]
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Longest one engine build may take [default: 15m]
    #[arg(long)]
    pub build_timeout: Option<String>,
    /// Most engine builds at once [default: number of CPUs]
    #[arg(long)]
    pub max_parallel_builds: Option<usize>,
    /// How long SIGTERM waits for builds in flight [default: 60s]
    #[arg(long)]
    pub shutdown_timeout: Option<String>,
    /// Prune our images down to this size after each build (e.g. 20GiB) [default: no cap]
    #[arg(long)]
    pub max_cache_size: Option<String>,
    /// Most bytes of layer content per request [default: 8GiB]
    #[arg(long)]
    pub max_layer_bytes: Option<String>,
    /// Most files and directories across a request's layers [default: 500000]
    #[arg(long)]
    pub max_layer_entries: Option<usize>,
    /// Most bytes a zip layer may extract to [default: 4GiB]
    #[arg(long)]
    pub max_zip_bytes: Option<String>,
    /// Most entries in a zip layer [default: 200000]
    #[arg(long)]
    pub max_zip_entries: Option<usize>,
    /// Largest compression ratio of a zip entry over 256 MiB [default: 200]
    #[arg(long)]
    pub max_zip_ratio: Option<u64>,
    /// Log format: text or json [default: text]
    #[arg(long)]
    pub log_format: Option<String>,
    /// How often a ZIP function's base image is compared with its registry (once per base for
    /// all clients; requests never wait on it) [default: 1h]
    #[arg(long)]
    pub base_check_ttl: Option<String>,
    /// How long an image that was an answer is kept once its tag moved to another image (a
    /// client may still be about to start a container from it) [default: 5m]
    #[arg(long)]
    pub answer_grace: Option<String>,
    /// Watch the layer sources of images served within this window and rebuild an image in
    /// the background when its source changes, so the next request is a hit; 0 turns it off
    /// [default: 1h]
    #[arg(long)]
    pub keep_warm: Option<String>,
    /// Take ZIP base images from PREFIX/<name:tag> (e.g. 127.0.0.1:5055/lambda) instead of
    /// public.ecr.aws/lambda; the images keep SAM's tags [default: none]
    #[arg(long)]
    pub base_image_mirror: Option<String>,
    /// Most connections one peer uid may have open at once; further ones are closed at once
    /// and logged [default: 256]
    #[arg(long)]
    pub max_connections_per_uid: Option<usize>,
    /// How long a client may leave its event queue full before its Build stream is ended with
    /// RESOURCE_EXHAUSTED (the build goes on for the others) [default: 1m]
    #[arg(long)]
    pub client_stall_timeout: Option<String>,
    /// Share built images with other daemons through this registry repository
    /// (REGISTRY/REPO): look each image up there before building it, push it after.
    #[arg(long)]
    pub registry_cache: Option<String>,
    /// Also push images built from layer files that other local users cannot read.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_cache_share_private: Option<bool>,
    /// When to look in the registry cache before a cold build: auto (only when a pull is
    /// estimated to beat a local build), always, or never [default: auto]
    #[arg(long)]
    pub registry_cache_policy: Option<String>,
}

fn pick<T>(over: Option<T>, base: Option<T>) -> Option<T> {
    over.or(base)
}

impl Settings {
    /// Reads a TOML file; unknown keys are an error naming the key.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// `self` with every field `over` sets replaced (lists: `over` wins when non-empty).
    pub fn overridden_by(self, over: Settings) -> Settings {
        Settings {
            socket: pick(over.socket, self.socket),
            socket_group: pick(over.socket_group, self.socket_group),
            allow_uid: if over.allow_uid.is_empty() {
                self.allow_uid
            } else {
                over.allow_uid
            },
            allow_gid: if over.allow_gid.is_empty() {
                self.allow_gid
            } else {
                over.allow_gid
            },
            cache_dir: pick(over.cache_dir, self.cache_dir),
            rie_dir: pick(over.rie_dir, self.rie_dir),
            engine: pick(over.engine, self.engine),
            engine_cert_path: pick(over.engine_cert_path, self.engine_cert_path),
            metrics_listen: pick(over.metrics_listen, self.metrics_listen),
            build_timeout: pick(over.build_timeout, self.build_timeout),
            max_parallel_builds: pick(over.max_parallel_builds, self.max_parallel_builds),
            shutdown_timeout: pick(over.shutdown_timeout, self.shutdown_timeout),
            max_cache_size: pick(over.max_cache_size, self.max_cache_size),
            max_layer_bytes: pick(over.max_layer_bytes, self.max_layer_bytes),
            max_layer_entries: pick(over.max_layer_entries, self.max_layer_entries),
            max_zip_bytes: pick(over.max_zip_bytes, self.max_zip_bytes),
            max_zip_entries: pick(over.max_zip_entries, self.max_zip_entries),
            max_zip_ratio: pick(over.max_zip_ratio, self.max_zip_ratio),
            log_format: pick(over.log_format, self.log_format),
            base_check_ttl: pick(over.base_check_ttl, self.base_check_ttl),
            answer_grace: pick(over.answer_grace, self.answer_grace),
            keep_warm: pick(over.keep_warm, self.keep_warm),
            base_image_mirror: pick(over.base_image_mirror, self.base_image_mirror),
            max_connections_per_uid: pick(
                over.max_connections_per_uid,
                self.max_connections_per_uid,
            ),
            client_stall_timeout: pick(over.client_stall_timeout, self.client_stall_timeout),
            registry_cache: pick(over.registry_cache, self.registry_cache),
            registry_cache_policy: pick(over.registry_cache_policy, self.registry_cache_policy),
            registry_cache_share_private: pick(
                over.registry_cache_share_private,
                self.registry_cache_share_private,
            ),
        }
    }

    /// Validates everything once; the error names the setting and what is expected.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let socket = self
            .socket
            .clone()
            .unwrap_or_else(crate::client::daemon_socket);
        let mut config = Config::new(
            socket,
            self.cache_dir.clone().unwrap_or_else(default_cache_dir),
        );
        if let Some(rie_dir) = &self.rie_dir {
            config.rie_dir = rie_dir.clone();
        }
        if let Some(engine) = &self.engine {
            config.engine_host = engine.clone();
        }
        if let Some(cert_dir) = &self.engine_cert_path {
            config.engine_tls = Some(EngineTls {
                cert_dir: cert_dir.clone(),
            });
        }
        crate::engine::check_endpoint(&config.engine_host, config.engine_tls.as_ref()).map_err(
            |reason| ConfigError::Engine {
                value: config.engine_host.clone(),
                reason,
            },
        )?;
        if let Some(listen) = &self.metrics_listen {
            config.metrics_listen =
                Some(
                    listen
                        .parse()
                        .map_err(|source| ConfigError::MetricsListen {
                            value: listen.clone(),
                            source,
                        })?,
                );
        }
        config.build_timeout =
            duration("build_timeout", &self.build_timeout, config.build_timeout)?;
        config.base_check_ttl = duration(
            "base_check_ttl",
            &self.base_check_ttl,
            config.base_check_ttl,
        )?;
        config.answer_grace = duration("answer_grace", &self.answer_grace, config.answer_grace)?;
        config.keep_warm = duration("keep_warm", &self.keep_warm, config.keep_warm)?;
        if let Some(prefix) = &self.base_image_mirror {
            let prefix = prefix.trim_end_matches('/');
            let probe = format!("{prefix}/python:3.12-x86_64");
            if let Err(reason) = crate::reference::ImageRef::parse(&probe) {
                return Err(ConfigError::Mirror {
                    value: prefix.to_owned(),
                    reason: reason.to_string(),
                });
            }
            config.base_image_mirror = Some(prefix.to_owned());
        }
        if let Some(repository) = &self.registry_cache {
            let cache =
                crate::registry_cache::RegistryCache::new(repository, false).map_err(|reason| {
                    ConfigError::RegistryCache {
                        value: repository.clone(),
                        reason,
                    }
                })?;
            config.registry_cache = Some(cache.repository().to_owned());
        }
        config.registry_cache_share_private = self.registry_cache_share_private.unwrap_or(false);
        if let Some(value) = &self.registry_cache_policy {
            config.registry_cache_policy = crate::registry_policy::Policy::parse(value)
                .ok_or_else(|| ConfigError::RegistryCachePolicy {
                    value: value.clone(),
                })?;
        }
        config.shutdown_timeout = duration(
            "shutdown_timeout",
            &self.shutdown_timeout,
            config.shutdown_timeout,
        )?;
        if let Some(max) = self.max_parallel_builds {
            if max == 0 {
                return Err(ConfigError::NoParallelBuilds);
            }
            config.max_parallel_builds = max;
        }
        config.client_stall_timeout = duration(
            "client_stall_timeout",
            &self.client_stall_timeout,
            config.client_stall_timeout,
        )?;
        if let Some(max) = self.max_connections_per_uid {
            if max == 0 {
                return Err(ConfigError::NoConnections);
            }
            config.max_connections_per_uid = max;
        }
        self.apply_size_limits(&mut config)?;
        if let Some(group) = &self.socket_group {
            config.socket_gid = Some(group_id(group)?);
        }
        config.allow_uids = self.allow_uid.clone();
        config.allow_gids = self.allow_gid.clone();
        match self.log_format.as_deref() {
            None | Some("text" | "json") => {}
            Some(other) => {
                return Err(ConfigError::LogFormat(other.to_owned()));
            }
        }
        Ok(config)
    }
}

impl Settings {
    /// The cache and layer size limits (`max_cache_size`, `max_layer_*`, `max_zip_*`).
    fn apply_size_limits(&self, config: &mut Config) -> Result<(), ConfigError> {
        config.max_cache_bytes = size("max_cache_size", &self.max_cache_size)?;
        if let Some(bytes) = size("max_layer_bytes", &self.max_layer_bytes)? {
            config.limits.max_bytes = bytes;
        }
        if let Some(entries) = self.max_layer_entries {
            config.limits.max_entries = entries;
        }
        if let Some(bytes) = size("max_zip_bytes", &self.max_zip_bytes)? {
            config.zip_limits.max_bytes = bytes;
        }
        if let Some(entries) = self.max_zip_entries {
            config.zip_limits.max_entries = entries;
        }
        if let Some(ratio) = self.max_zip_ratio {
            config.zip_limits.max_ratio = ratio;
        }
        Ok(())
    }
}

/// Setting `name`'s duration: whole seconds (`30`) or humantime (`10m`); `default` when unset.
fn duration(
    name: &'static str,
    text: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match text {
        None => Ok(default),
        Some(text) => text
            .parse::<u64>()
            .map(Duration::from_secs)
            .or_else(|_| humantime::parse_duration(text))
            .map_err(|source| ConfigError::Duration {
                name,
                value: text.clone(),
                source,
            }),
    }
}

/// Setting `name`'s size in bytes (`2GiB`, `500MB`, `1024`); `None` when unset.
fn size(name: &'static str, text: &Option<String>) -> Result<Option<u64>, ConfigError> {
    text.as_ref()
        .map(|text| {
            text.parse::<bytesize::ByteSize>()
                .map(|s| s.as_u64())
                .map_err(|reason| ConfigError::Size {
                    name,
                    value: text.clone(),
                    reason,
                })
        })
        .transpose()
}

/// A group name or number to its gid.
fn group_id(group: &str) -> Result<u32, ConfigError> {
    if let Ok(gid) = group.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").map_err(ConfigError::GroupFile)?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| ConfigError::NoSuchGroup(group.to_owned()))
}

/// The effective settings of `config`, as TOML (for `--print-config`).
pub fn effective_toml(config: &Config, log_format: &str) -> String {
    let settings = Settings {
        socket: Some(config.socket.clone()),
        socket_group: config.socket_gid.map(|g| g.to_string()),
        allow_uid: config.allow_uids.clone(),
        allow_gid: config.allow_gids.clone(),
        cache_dir: Some(config.cache_dir.clone()),
        rie_dir: Some(config.rie_dir.clone()),
        engine: Some(config.engine_host.clone()),
        engine_cert_path: config.engine_tls.as_ref().map(|tls| tls.cert_dir.clone()),
        metrics_listen: config.metrics_listen.map(|addr| addr.to_string()),
        build_timeout: Some(humantime::format_duration(config.build_timeout).to_string()),
        max_parallel_builds: Some(config.max_parallel_builds),
        shutdown_timeout: Some(humantime::format_duration(config.shutdown_timeout).to_string()),
        max_cache_size: config
            .max_cache_bytes
            .map(|b| bytesize::ByteSize(b).to_string()),
        max_layer_bytes: Some(bytesize::ByteSize(config.limits.max_bytes).to_string()),
        max_layer_entries: Some(config.limits.max_entries),
        max_zip_bytes: Some(bytesize::ByteSize(config.zip_limits.max_bytes).to_string()),
        max_zip_entries: Some(config.zip_limits.max_entries),
        max_zip_ratio: Some(config.zip_limits.max_ratio),
        log_format: Some(log_format.to_owned()),
        base_check_ttl: Some(humantime::format_duration(config.base_check_ttl).to_string()),
        answer_grace: Some(humantime::format_duration(config.answer_grace).to_string()),
        keep_warm: Some(humantime::format_duration(config.keep_warm).to_string()),
        base_image_mirror: config.base_image_mirror.clone(),
        max_connections_per_uid: Some(config.max_connections_per_uid),
        client_stall_timeout: Some(
            humantime::format_duration(config.client_stall_timeout).to_string(),
        ),
        registry_cache: config.registry_cache.clone(),
        registry_cache_share_private: config
            .registry_cache
            .is_some()
            .then_some(config.registry_cache_share_private),
        registry_cache_policy: config
            .registry_cache
            .is_some()
            .then(|| config.registry_cache_policy.as_str().to_owned()),
    };
    toml::to_string(&settings).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "cache_dir = \"/tmp/c\"\nbuild_timeout = \"2m\"\nmax_zip_ratio = 50\nallow_uid = [1000]\n").unwrap();
        let from_file = Settings::from_file(&file).unwrap();
        let flags = Settings {
            build_timeout: Some("30s".into()),
            ..Default::default()
        };
        let config = from_file.overridden_by(flags).into_config().unwrap();
        assert_eq!(config.cache_dir, PathBuf::from("/tmp/c"));
        assert_eq!(config.rie_dir, PathBuf::from("/tmp/c/rie"));
        assert_eq!(config.build_timeout, Duration::from_secs(30), "flags win");
        assert_eq!(config.zip_limits.max_ratio, 50);
        assert_eq!(config.allow_uids, [1000]);
        let printed = effective_toml(&config, "text");
        assert!(printed.contains("build_timeout = \"30s\""), "{printed}");

        std::fs::write(&file, "cache_dir = \"/tmp/c\"\nbuild_timeuot = \"2m\"\n").unwrap();
        let err = Settings::from_file(&file).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        assert!(err.to_string().contains("build_timeuot"), "{err}");
        let bad = Settings {
            build_timeout: Some("soon".into()),
            ..Default::default()
        };
        let err = bad.into_config().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::Duration {
                    name: "build_timeout",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("build_timeout = \"soon\""),
            "{err}"
        );
        let bad = Settings {
            socket_group: Some("no-such-group-here".into()),
            ..Default::default()
        };
        let err = bad.into_config().unwrap_err();
        assert!(matches!(&err, ConfigError::NoSuchGroup(g) if g == "no-such-group-here"));
        assert!(err.to_string().contains("no such group"), "{err}");
        let bad = Settings {
            max_parallel_builds: Some(0),
            max_cache_size: Some("lots".into()),
            ..Default::default()
        };
        let err = bad.into_config().unwrap_err();
        assert!(matches!(err, ConfigError::NoParallelBuilds), "{err:?}");

        std::fs::write(
            &file,
            "max_connections_per_uid = 8\nclient_stall_timeout = \"5s\"\n",
        )
        .unwrap();
        let config = Settings::from_file(&file).unwrap().into_config().unwrap();
        assert_eq!(config.max_connections_per_uid, 8);
        assert_eq!(config.client_stall_timeout, Duration::from_secs(5));
        assert_eq!(
            Settings::default()
                .into_config()
                .unwrap()
                .client_stall_timeout,
            CLIENT_STALL_TIMEOUT
        );
        assert_eq!(
            Settings::default()
                .into_config()
                .unwrap()
                .max_connections_per_uid,
            DEFAULT_MAX_CONNECTIONS_PER_UID
        );
        let bad = Settings {
            max_connections_per_uid: Some(0),
            ..Default::default()
        };
        let err = bad.into_config().unwrap_err();
        assert!(matches!(err, ConfigError::NoConnections), "{err:?}");
        assert!(err.to_string().contains("max_connections_per_uid"), "{err}");
    }

    /// `metrics_listen` and `engine_cert_path` parse from TOML; a bad address, an `ssh://`
    /// engine and TLS with a missing certificate file are refused naming the setting.
    #[test]
    fn metrics_listen_and_engine_endpoints() {
        let certs = tempfile::tempdir().unwrap();
        for name in EngineTls::FILES {
            std::fs::write(certs.path().join(name), "pem").unwrap();
        }
        let text = format!(
            "metrics_listen = \"127.0.0.1:9464\"\nengine = \"tcp://10.0.0.5:2376\"\n\
             engine_cert_path = {:?}\n",
            certs.path().display().to_string()
        );
        let config = toml::from_str::<Settings>(&text)
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(
            config.engine_tls.as_ref().map(|t| t.cert_dir.clone()),
            Some(certs.path().to_owned())
        );
        let printed = effective_toml(&config, "text");
        assert!(
            printed.contains("metrics_listen = \"127.0.0.1:9464\""),
            "{printed}"
        );

        let bad = Settings {
            metrics_listen: Some("localhost".into()),
            ..Settings::default()
        };
        let err = bad.into_config().unwrap_err();
        assert!(matches!(err, ConfigError::MetricsListen { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("metrics_listen = \"localhost\""),
            "{err}"
        );

        let ssh = Settings {
            engine: Some("ssh://me@build-host".into()),
            ..Settings::default()
        };
        let err = ssh.into_config().unwrap_err().to_string();
        assert!(err.contains("ssh:// engines are not supported"), "{err}");
        assert!(err.contains("unix://"), "{err}");

        std::fs::remove_file(certs.path().join("key.pem")).unwrap();
        let missing = Settings {
            engine: Some("tcp://10.0.0.5:2376".into()),
            engine_cert_path: Some(certs.path().to_owned()),
            ..Settings::default()
        };
        let err = missing.into_config().unwrap_err().to_string();
        assert!(err.contains("key.pem is missing"), "{err}");
        assert!(err.contains("DOCKER_CERT_PATH"), "{err}");
        let unix_tls = Settings {
            engine: Some("unix:///run/docker.sock".into()),
            engine_cert_path: Some(certs.path().to_owned()),
            ..Settings::default()
        };
        let err = unix_tls.into_config().unwrap_err().to_string();
        assert!(err.contains("needs a tcp://host:port engine"), "{err}");
    }

    /// The freshness TTL and the mirror prefix parse from TOML; a trailing `/` is dropped and a
    /// prefix that cannot make an image reference is refused naming the setting.
    /// `registry_cache_policy` takes auto, always or never (auto by default), from the file or
    /// the flag; anything else names the setting and the choices.
    #[test]
    fn registry_cache_policy() {
        let parsed = |policy: Option<&str>| {
            Settings {
                registry_cache_policy: policy.map(str::to_owned),
                ..Settings::default()
            }
            .into_config()
        };
        use crate::registry_policy::Policy;
        assert_eq!(parsed(None).unwrap().registry_cache_policy, Policy::Auto);
        assert_eq!(
            parsed(Some("never")).unwrap().registry_cache_policy,
            Policy::Never
        );
        assert_eq!(
            parsed(Some("always")).unwrap().registry_cache_policy,
            Policy::Always
        );
        let refused = parsed(Some("sometimes")).unwrap_err().to_string();
        assert!(
            refused.contains("registry_cache_policy = \"sometimes\"") && refused.contains("always"),
            "{refused}"
        );
    }

    #[test]
    fn base_check_ttl_and_mirror() {
        let settings: Settings = toml::from_str(
            "base_check_ttl = \"10m\"\nbase_image_mirror = \"127.0.0.1:5055/lambda/\"\n",
        )
        .unwrap();
        let config = settings.into_config().unwrap();
        assert_eq!(config.base_check_ttl, Duration::from_secs(600));
        assert_eq!(
            config.base_image_mirror.as_deref(),
            Some("127.0.0.1:5055/lambda")
        );
        assert_eq!(
            Settings::default().into_config().unwrap().base_check_ttl,
            Duration::from_secs(3600)
        );
        let bad = Settings {
            base_image_mirror: Some("Not A Prefix".into()),
            ..Settings::default()
        };
        let err = bad.into_config().unwrap_err().to_string();
        assert!(
            err.starts_with("base_image_mirror = \"Not A Prefix\""),
            "{err}"
        );
    }
}
