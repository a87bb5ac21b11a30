//! The few engine calls we make, over one shared bollard client, and the image index.
//!
//! The client is created and its API version negotiated lazily (the daemon starts and answers
//! Resolve while the engine is down) and again after the engine comes back. The index maps an
//! image reference to what `inspect` said about it, so looking up a base image needs no engine
//! call; it is kept true by the engine's `/events` stream (anything can `docker rmi` behind our
//! back), but only as fast as events arrive: a removal's event can reach us after the removal
//! has returned. Answers that must be true now (is the built tag still there?) use
//! [`Engine::inspect_fresh`].
//!
//! # Remote engines
//! The engine may be local (`unix://`) or remote (`tcp://host:port`, plain or with TLS as the
//! docker CLI does it: `DOCKER_TLS_VERIFY` + `DOCKER_CERT_PATH`, see [`EngineTls`]). Nothing
//! here assumes the engine shares our filesystem: layers are read where the daemon runs and
//! streamed in the load request's body, base images are pulled by the engine, the index follows
//! `/events` over the same connection, and Podman is told by `/version`'s component name, never
//! by a socket path. (What does read local files: peer credentials from `/proc/<pid>/status`
//! in `access.rs`, about the client on our own socket, which is right whatever the engine.)
//! `ssh://` is refused at start-up ([`check_endpoint`]): bollard's ssh transport is an optional
//! feature built on an `ssh` control master; forwarding the engine's socket with `ssh -L` and
//! pointing at it with `unix://` does the same with parts we test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::auth::DockerCredentials;
use bollard::models::{BuildInfo, CreateImageInfo, EventMessageTypeEnum};
use bollard::query_parameters::{
    CreateImageOptions, EventsOptions, ImportImageOptions, ListContainersOptions,
    ListImagesOptions, PushImageOptions, RemoveImageOptions, TagImageOptions,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use futures_util::StreamExt;
use tokio::sync::{Mutex, broadcast, watch};

use crate::error::{Error, Result};
use crate::reference::ImageRef;
use crate::resolve::Arch;

mod content;

pub use content::ManifestFacts;

/// How long a connect + version negotiation may take before the engine counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Ordinary engine calls (inspect, remove, version).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an idle engine connection over a Unix socket is kept for the next call: below
/// Podman's 10 s (twice its default service timeout), after which it closes idle API
/// connections; Docker keeps them open.
const POOL_IDLE: Duration = Duration::from_secs(5);
/// Idle engine connections kept at most (concurrent calls open more, closed once done).
const POOL_MAX_IDLE: usize = 8;

/// What an emulator needs to run an image, as the engine reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub env: Vec<String>,
    pub architecture: String,
}

/// What we know about one image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageInfo {
    /// "sha256:<64 hex>".
    pub id: String,
    pub labels: HashMap<String, String>,
    pub config: RunConfig,
    /// The layers' diff IDs ("sha256:<hex>" of each uncompressed layer tar), bottom first.
    pub diff_ids: Vec<String>,
    /// Registry digests the engine recorded when the image was pulled or pushed
    /// ("<repository>@sha256:<hex>"); empty for an image that never met a registry.
    pub repo_digests: Vec<String>,
    /// The names the image has ("repository:tag"; `RepoTags`), empty for an untagged one.
    pub tags: Vec<String>,
    /// The image config in Docker's JSON form, as an assembled image derived from this one
    /// needs it: `created`, `os`, `architecture`, `variant` and `config` (only the OCI image-config
    /// keys: User, ExposedPorts, Env, Entrypoint, Cmd, Volumes, WorkingDir, Labels,
    /// StopSignal, ArgsEscaped, OnBuild, Shell, Healthcheck).
    pub image_config: serde_json::Value,
}

/// The keys of an image's `config` an image config may carry (OCI image spec, `config`; plus
/// Docker's Shell / Healthcheck / OnBuild / ArgsEscaped): the container-only ones Docker's
/// inspect also shows (Hostname, AttachStdin, ...) are left out.
const IMAGE_CONFIG_KEYS: &[&str] = &[
    "User",
    "ExposedPorts",
    "Env",
    "Entrypoint",
    "Cmd",
    "Volumes",
    "WorkingDir",
    "Labels",
    "StopSignal",
    "ArgsEscaped",
    "OnBuild",
    "Shell",
    "Healthcheck",
];

/// An image found by label.
#[derive(Debug, Clone)]
pub struct LabelledImage {
    pub id: String,
    pub tags: Vec<String>,
    pub size: u64,
    pub created_unix: i64,
}

/// Engine identity, for GetInfo.
#[derive(Debug, Clone, Default)]
pub struct EngineVersion {
    pub name: String,
    pub version: String,
    pub api_version: String,
    /// The engine host's architecture as Go spells it ("amd64", "arm64"); empty if unsaid.
    pub arch: String,
}

/// What the engine's distribution API says of a manifest in a registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryManifest {
    /// "sha256:<hex>" of the manifest (or index).
    pub digest: String,
    /// The architectures it is for, as Go spells them ("amd64"): an index's entries, or for a
    /// single manifest the one in its config, which Docker reads from the config blob to answer
    /// (moby `distribution_routes.go`). Empty when the engine did not say.
    pub architectures: Vec<String>,
}

/// Why [`Engine::registry_digest`] has no digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// The engine has no distribution API (Podman): freshness cannot be checked.
    Unsupported,
    /// The engine answered with the registry's failure (unreachable, DNS, 429, 5xx, unknown
    /// manifest, refused credentials), in the engine's words.
    Registry(String),
    /// The engine itself could not be reached.
    Engine(Error),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Unsupported => f.write_str("the engine has no distribution API"),
            RegistryError::Registry(message) => f.write_str(message),
            RegistryError::Engine(err) => write!(f, "{err}"),
        }
    }
}

/// Whether an error answer to `GET /distribution/{name}/json` means the engine has no such
/// route (rather than the registry's failure, which Docker sends as JSON with the registry's
/// words, e.g. 404 "manifest unknown: manifest unknown"). Podman 4.3's service answers the
/// route with a bare text 404 "Not Found" (measured; aws-sam-cli#5019); a Go router's default
/// is "404 page not found"; an engine may also say 501 Not Implemented.
fn distribution_unsupported(status_code: u16, message: &str) -> bool {
    let message = message.trim();
    status_code == 501
        || (status_code == 404
            && (message.eq_ignore_ascii_case("not found") || message.contains("page not found")))
}

/// TLS to a `tcp://` engine, as the docker CLI does it: the daemon presents `cert.pem` with
/// `key.pem` and trusts only an engine whose certificate `ca.pem` signed (and names the host
/// we dial), all read from one directory. Source of the rule: the docker CLI's
/// `DOCKER_TLS_VERIFY` (any non-empty value turns it on) and `DOCKER_CERT_PATH` (default
/// `~/.docker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineTls {
    /// Directory holding `ca.pem`, `cert.pem` and `key.pem`.
    pub cert_dir: PathBuf,
}

impl EngineTls {
    /// The files read from [`EngineTls::cert_dir`], in the docker CLI's names.
    pub const FILES: [&'static str; 3] = ["ca.pem", "cert.pem", "key.pem"];

    /// From the environment: `Some` when `DOCKER_TLS_VERIFY` is non-empty, with the
    /// certificates in `DOCKER_CERT_PATH` (else `~/.docker`).
    pub fn from_env() -> Option<EngineTls> {
        std::env::var_os("DOCKER_TLS_VERIFY").filter(|v| !v.is_empty())?;
        let cert_dir = std::env::var_os("DOCKER_CERT_PATH")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
                Path::new(&home).join(".docker")
            });
        Some(EngineTls { cert_dir })
    }

    fn file(&self, name: &str) -> PathBuf {
        self.cert_dir.join(name)
    }
}

/// Checks an engine address (and its TLS settings) once, at start-up: `unix:///path` or
/// `tcp://host:port`, TLS only with `tcp://`, and every certificate file present. The error
/// says what is supported or which file is missing.
pub fn check_endpoint(host: &str, tls: Option<&EngineTls>) -> std::result::Result<(), String> {
    let tcp = host.starts_with("tcp://");
    if host.starts_with("ssh://") {
        return Err(
            "ssh:// engines are not supported; forward the remote socket instead \
             (ssh -nNT -L /run/remote-docker.sock:/var/run/docker.sock HOST) and use \
             unix:///run/remote-docker.sock, or expose the engine on tcp:// with TLS"
                .to_owned(),
        );
    }
    if !tcp && !host.starts_with("unix://") {
        return Err("expected unix:///path/to/docker.sock or tcp://host:port".to_owned());
    }
    if let Some(tls) = tls {
        if !tcp {
            return Err(format!(
                "TLS (DOCKER_TLS_VERIFY, certificates in {}) needs a tcp://host:port engine; \
                 unset DOCKER_TLS_VERIFY for a unix:// socket",
                tls.cert_dir.display()
            ));
        }
        for name in EngineTls::FILES {
            let path = tls.file(name);
            if !path.is_file() {
                return Err(format!(
                    "TLS is on (DOCKER_TLS_VERIFY) but {} is missing; put ca.pem, cert.pem and \
                     key.pem in one directory and point DOCKER_CERT_PATH (or engine_cert_path) \
                     at it",
                    path.display()
                ));
            }
        }
    }
    Ok(())
}

/// A client for the engine's Unix socket at `path` that keeps its connections for the next
/// call (at most [`POOL_MAX_IDLE`], each for [`POOL_IDLE`]): bollard's own `connect_with_unix`
/// opens a connection per call (`pool_max_idle_per_host(0)`), which on a warm hit costs as
/// much as the engine's inspect itself. The same connector (hyperlocal's) and hyper client as
/// bollard's, with its pool on; a kept connection the engine closed is retried on a new one
/// before anything is sent (hyper's `retry_canceled_requests`, on by default). `timeout` is
/// bollard's per-call limit in seconds.
///
/// # Errors
/// `SocketNotFoundError` when nothing is at `path`, as bollard's `connect_with_unix`.
pub fn unix_client(
    path: &Path,
    timeout: u64,
) -> std::result::Result<Docker, bollard::errors::Error> {
    if !path.exists() {
        return Err(bollard::errors::Error::SocketNotFoundError(
            path.display().to_string(),
        ));
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(hyperlocal::UnixConnector);
    let client = Arc::new(client);
    // hyperlocal's URIs name the socket in the host part, hex-encoded (what bollard sends).
    let address = format!(
        "unix://{}",
        hex::encode(path.as_os_str().as_encoded_bytes())
    );
    Docker::connect_with_custom_transport(
        move |request: bollard::BollardRequest| {
            let client = client.clone();
            async move {
                client
                    .request(request)
                    .await
                    .map_err(bollard::errors::Error::from)
            }
        },
        Some(address),
        timeout,
        API_DEFAULT_VERSION,
    )
}

/// `err` and its sources, joined with ": " (a TLS failure hides under two layers of hyper).
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// Where the kernel lists its binfmt_misc entries (one file per registered interpreter, plus
/// `status` and `register`).
pub const BINFMT_MISC_DIR: &str = "/proc/sys/fs/binfmt_misc";

/// The Lambda architectures an engine can run containers of, for GetInfo, in [`Arch`] order.
///
/// The rule: the engine's native architecture (`native`, Go's spelling from `/version`), plus
/// each architecture with an enabled 64-bit little-endian ELF entry under `binfmt_dir` (an
/// emulator such as qemu-user, which lets the kernel run that architecture's binaries) while
/// binfmt_misc itself is enabled. Entries are only read when the engine is `local` (it shares
/// this kernel; see [`Engine::is_local`]): for a remote engine, only the native architecture is
/// reported, since its host's binfmt_misc cannot be seen from here. An entry is recognised by
/// its ELF magic's `e_machine` (x86-64: 62, AArch64: 183), not by its name, which differs
/// between qemu-user-static, binfmt-support and tonistiigi/binfmt.
pub fn runnable_architectures(native: &str, local: bool, binfmt_dir: &Path) -> Vec<Arch> {
    let mut found: Vec<Arch> = match native {
        "amd64" | "x86_64" => vec![Arch::X86_64],
        "arm64" | "aarch64" => vec![Arch::Arm64],
        _ => Vec::new(),
    };
    let binfmt_on = local
        && std::fs::read_to_string(binfmt_dir.join("status"))
            .is_ok_and(|status| status.trim() == "enabled");
    if binfmt_on {
        let entries = std::fs::read_dir(binfmt_dir)
            .into_iter()
            .flatten()
            .flatten();
        for entry in entries {
            if matches!(entry.file_name().to_str(), Some("status" | "register")) {
                continue;
            }
            if let Some(arch) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|text| binfmt_entry_arch(&text))
            {
                found.push(arch);
            }
        }
    }
    found.sort_by_key(|arch| *arch as u8);
    found.dedup();
    found
}

/// The architecture an enabled binfmt_misc entry runs (its text as the kernel shows it), if it
/// is a 64-bit little-endian ELF entry for x86-64 or AArch64.
fn binfmt_entry_arch(text: &str) -> Option<Arch> {
    let mut lines = text.lines();
    if lines.next()?.trim() != "enabled" {
        return None;
    }
    let magic = lines.find_map(|line| line.strip_prefix("magic "))?.trim();
    let magic = hex::decode(magic).ok()?;
    // ELF header: "\x7fELF", class 2 (64-bit), data 1 (little-endian), e_machine at 18..20.
    if magic.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    match u16::from_le_bytes([*magic.get(18)?, *magic.get(19)?]) {
        62 => Some(Arch::X86_64),
        183 => Some(Arch::Arm64),
        _ => None,
    }
}

/// One shared engine connection plus the image index.
pub struct Engine {
    host: String,
    tls: Option<EngineTls>,
    build_timeout: Duration,
    client: Mutex<Option<Docker>>,
    index: RwLock<Index>,
    healthy: watch::Sender<bool>,
    /// Bumped on each container `destroy` event, and whenever the events stream (re)attaches
    /// (events may have been missed): what waits for a container to go watches it.
    containers_gone: watch::Sender<u64>,
    /// The ID of each image an `untag` event names (a `docker rmi <tag>` of one of several
    /// names): an image of ours left with only its pinned tags is superseded (`retire.rs`).
    untagged: broadcast::Sender<String>,
    /// Pulls in flight by (reference, platform): concurrent requests for one missing base
    /// (whatever their tags) and a freshness check's update share one pull. A std Mutex: held
    /// only to look up, insert or remove an entry, never across an `.await`.
    pulls: std::sync::Mutex<HashMap<(String, String), Arc<InFlightPull>>>,
    /// Where the engine keeps images, once learned ([`Engine::image_store`]).
    store: tokio::sync::OnceCell<ImageStoreKind>,
    /// Manifest facts of images, by image ID ([`Engine::manifest_facts`]).
    manifests: std::sync::Mutex<HashMap<String, Arc<ManifestFacts>>>,
}

/// Untag events kept for a receiver that falls behind ([`Engine::untagged`]).
const UNTAGGED_BUFFER: usize = 256;

/// Progress items one pull keeps for followers that fall behind; a slower one skips items
/// (it lags), it never stalls the pull.
const PULL_PROGRESS_BUFFER: usize = 256;

/// One pull in flight, shared by every request for the same reference and platform.
struct InFlightPull {
    /// The engine's progress items, as they come.
    progress: broadcast::Sender<CreateImageInfo>,
    /// The outcome, set once the pull ended (before `progress` closes).
    done: watch::Receiver<Option<Result<()>>>,
}

/// A request's share of a pull, from [`Engine::start_pull`].
pub struct PullTicket {
    /// True when this request started the pull; false when it joined one already in flight
    /// (it then sees progress from the moment it joined).
    pub started: bool,
    progress: broadcast::Receiver<CreateImageInfo>,
    done: watch::Receiver<Option<Result<()>>>,
}

impl PullTicket {
    /// Hands each progress item to `on_progress` until the pull ends; returns its outcome,
    /// the same for every request that shares it.
    ///
    /// # Errors
    /// The pull's error (registry refused, engine unreachable, `DEADLINE_EXCEEDED` after
    /// `--build-timeout`), as [`Engine::start_pull`] describes.
    pub async fn wait(mut self, mut on_progress: impl FnMut(&CreateImageInfo)) -> Result<()> {
        loop {
            match self.progress.recv().await {
                Ok(item) => on_progress(&item),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        match self.done.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Ok(())),
            Err(_) => Err(Error::Internal(
                "the pull's task ended without an outcome".into(),
            )),
        }
    }
}

#[derive(Default)]
struct Index {
    /// Bumped on every invalidation; an inspect that started before a bump must not insert.
    generation: u64,
    /// False while the events stream is down: nothing is served from or added to the index.
    live: bool,
    images: HashMap<String, ImageInfo>,
}

impl Engine {
    /// An engine at `host` (`unix:///path` or `tcp://host:port`, with `tls` for
    /// `tcp://`; see [`check_endpoint`]); nothing is contacted yet.
    pub fn new(host: String, tls: Option<EngineTls>, build_timeout: Duration) -> Arc<Engine> {
        let (healthy, _) = watch::channel(false);
        let (containers_gone, _) = watch::channel(0);
        let (untagged, _) = broadcast::channel(UNTAGGED_BUFFER);
        Arc::new(Engine {
            host,
            tls,
            build_timeout,
            client: Mutex::new(None),
            index: RwLock::new(Index::default()),
            healthy,
            containers_gone,
            untagged,
            pulls: std::sync::Mutex::new(HashMap::new()),
            store: tokio::sync::OnceCell::new(),
            manifests: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The engine address from `DOCKER_HOST`, or Docker's default socket.
    pub fn host_from_env() -> String {
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".to_owned())
    }

    /// Where the engine is reached.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// True when the engine shares this machine's kernel, as far as we can tell: it is reached
    /// over a Unix socket and reports the architecture this daemon was built for. (A socket
    /// forwarded from another machine, or Docker Desktop's VM, can still pass: the answer is a
    /// hint for GetInfo, never used to decide a build.)
    pub fn is_local(&self, native: &str) -> bool {
        let ours = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        self.host.starts_with("unix://") && native == ours
    }

    /// True while the engine answers; changes are published to [`Engine::health`] watchers.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.healthy.subscribe()
    }

    /// The IDs of images that lost a name (`untag` events), as they come; a receiver that falls
    /// behind misses some (an image missed this way is left to `prune`).
    pub fn untagged(&self) -> broadcast::Receiver<String> {
        self.untagged.subscribe()
    }

    /// Changes whenever a container may have gone: on each container `destroy` event, and
    /// when the events stream (re)attaches after a gap. The value itself means nothing.
    pub fn containers_gone(&self) -> watch::Receiver<u64> {
        self.containers_gone.subscribe()
    }

    /// The shared client, connecting and negotiating the API version on first use.
    pub async fn client(&self) -> Result<Docker> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = self
            .connect()
            .map_err(|err| self.unreachable(&err))?
            .with_timeout(CALL_TIMEOUT);
        let client = tokio::time::timeout(CONNECT_TIMEOUT, client.negotiate_version())
            .await
            .map_err(|_| {
                Error::Unavailable(format!(
                    "the engine at {} did not answer within {CONNECT_TIMEOUT:?}; is it running?",
                    self.host
                ))
            })?
            .map_err(|err| self.unreachable(&err))?;
        *slot = Some(client.clone());
        Ok(client)
    }

    /// A client for the configured transport. Chosen here, not by bollard's
    /// `connect_with_host`, which would read `DOCKER_TLS_VERIFY` from the environment behind
    /// the config's back.
    fn connect(&self) -> std::result::Result<Docker, bollard::errors::Error> {
        let timeout = CALL_TIMEOUT.as_secs();
        match &self.tls {
            Some(tls) => {
                // bollard's client-certificate resolver asks for the process-wide provider;
                // installing ring (the only one we build) fails harmlessly if already done.
                let _ = rustls::crypto::ring::default_provider().install_default();
                Docker::connect_with_ssl(
                    &self.host,
                    &tls.file("key.pem"),
                    &tls.file("cert.pem"),
                    &tls.file("ca.pem"),
                    timeout,
                    API_DEFAULT_VERSION,
                )
            }
            None if self.host.starts_with("tcp://") => {
                Docker::connect_with_http(&self.host, timeout, API_DEFAULT_VERSION)
            }
            None => match self.host.strip_prefix("unix://") {
                Some(path) => unix_client(Path::new(path), timeout),
                None => Docker::connect_with_host(&self.host),
            },
        }
    }

    /// Forgets the negotiated client, so the next call reconnects (the engine may have been
    /// replaced by another version).
    async fn reset_client(&self) {
        *self.client.lock().await = None;
    }

    fn unreachable(&self, err: &bollard::errors::Error) -> Error {
        let err = error_chain(err);
        match &self.tls {
            Some(tls) => Error::Unavailable(format!(
                "cannot reach the container engine at {} over TLS (DOCKER_TLS_VERIFY, \
                 certificates from DOCKER_CERT_PATH={}): {err}; check that ca.pem there signed \
                 the engine's certificate (for this host name or IP), that the engine trusts \
                 cert.pem, and that the engine is running",
                self.host,
                tls.cert_dir.display()
            )),
            None => Error::Unavailable(format!(
                "cannot reach the container engine at {}: {err}; start it or point DOCKER_HOST \
                 at it",
                self.host
            )),
        }
    }

    /// Maps an engine error: 404 is NOT_FOUND; other answers are the engine refusing
    /// (FAILED_PRECONDITION with its own text; a 5xx also names the engine and its status,
    /// since it is the engine's own failure); no answer in time is UNAVAILABLE; a connection
    /// that broke mid-answer (engine restarted, answer cut short) is UNAVAILABLE saying so;
    /// anything else means the engine is unreachable (UNAVAILABLE).
    pub fn map_error(&self, err: bollard::errors::Error) -> Error {
        use bollard::errors::Error as B;
        match err {
            B::DockerResponseServerError {
                status_code: 404,
                message,
            } => Error::NotFound(message),
            B::DockerResponseServerError {
                status_code,
                message,
            } if status_code >= 500 => Error::FailedPrecondition(format!(
                "the engine refused: {} (HTTP {status_code} from the engine at {}; see its log, \
                 then retry)",
                message.trim_end(),
                self.host
            )),
            B::DockerResponseServerError { message, .. } => {
                Error::FailedPrecondition(format!("the engine refused: {}", message.trim_end()))
            }
            B::DockerStreamError { error } => {
                Error::FailedPrecondition(format!("the engine failed: {}", error.trim_end()))
            }
            B::RequestTimeoutError => Error::Unavailable(format!(
                "the engine at {} did not answer in time; check that it is responsive, then retry",
                self.host
            )),
            err @ (B::HyperResponseError { .. } | B::IOError { .. } | B::JsonDataError { .. }) => {
                Error::Unavailable(format!(
                    "the connection to the engine at {} broke mid-answer ({err}); it may have \
                     restarted: retry once it answers",
                    self.host
                ))
            }
            other => self.unreachable(&other),
        }
    }

    /// Looks `reference` up: from the index when it is live, else from the engine.
    /// `Ok(None)` when the engine has no such image.
    pub async fn inspect(&self, reference: &str) -> Result<Option<ImageInfo>> {
        let generation = {
            let index = self.read_index();
            if index.live
                && let Some(info) = index.images.get(reference)
            {
                return Ok(Some(info.clone()));
            }
            index.generation
        };
        self.inspect_engine(reference, generation).await
    }

    /// Asks the engine, never the index: for answers that must hold now (a cache hit names an
    /// image that exists; after a build moved a tag, before its event arrives).
    pub async fn inspect_fresh(&self, reference: &str) -> Result<Option<ImageInfo>> {
        let generation = {
            let mut index = crate::sync::write(&self.index);
            index.images.remove(reference);
            index.generation
        };
        self.inspect_engine(reference, generation).await
    }

    async fn inspect_engine(&self, reference: &str, generation: u64) -> Result<Option<ImageInfo>> {
        let client = self.client().await?;
        let inspected = match client.inspect_image(reference).await {
            Ok(inspected) => inspected,
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                return Ok(None);
            }
            // A whole answer without the fields of an image: Docker's containerd store lists an
            // image whose content it lacks so (`RootFS: {}`, no architecture), e.g. one pulled
            // over layers it had unpacked from other blobs (containerd's unpacker then skips
            // fetching them).
            Err(bollard::errors::Error::JsonDataError { message, .. }) => {
                return Err(Error::FailedPrecondition(format!(
                    "the engine lists image {reference} without its content ({message}); remove \
                     it and pull or build it again"
                )));
            }
            Err(err) => return Err(self.map_error(err)),
        };
        let mut kept = serde_json::Map::new();
        if let Ok(serde_json::Value::Object(all)) = serde_json::to_value(&inspected.config) {
            for (key, value) in all {
                if IMAGE_CONFIG_KEYS.contains(&key.as_str()) && !value.is_null() {
                    kept.insert(key, value);
                }
            }
        }
        let image_config = serde_json::json!({
            "created": inspected.created.clone().unwrap_or_default(),
            "os": inspected.os.clone().unwrap_or_else(|| "linux".into()),
            "architecture": inspected.architecture.clone().unwrap_or_default(),
            "variant": inspected.variant.clone().unwrap_or_default(),
            "config": kept,
        });
        let diff_ids = inspected
            .root_fs
            .and_then(|root| root.layers)
            .unwrap_or_default();
        let config = inspected.config.unwrap_or_default();
        let info = ImageInfo {
            diff_ids,
            repo_digests: inspected.repo_digests.unwrap_or_default(),
            tags: inspected
                .repo_tags
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t != "<none>:<none>")
                .collect(),
            image_config,
            id: inspected.id.unwrap_or_default(),
            labels: config.labels.unwrap_or_default(),
            config: RunConfig {
                entrypoint: config.entrypoint.unwrap_or_default(),
                cmd: config.cmd.unwrap_or_default(),
                working_dir: config.working_dir.unwrap_or_default(),
                env: config.env.unwrap_or_default(),
                architecture: inspected.architecture.unwrap_or_default(),
            },
        };
        self.remember(reference, &info, generation);
        Ok(Some(info))
    }

    /// Records `info` for `reference` unless the index was invalidated since `generation`.
    fn remember(&self, reference: &str, info: &ImageInfo, generation: u64) {
        let mut index = crate::sync::write(&self.index);
        if index.live && index.generation == generation {
            index.images.insert(reference.to_owned(), info.clone());
        }
    }

    fn read_index(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        // The index holds plain data; a panic elsewhere cannot leave it half-updated.
        crate::sync::read(&self.index)
    }

    /// Forgets everything (an image changed behind our back); `live` says whether the events
    /// stream is attached so that new entries may be trusted.
    fn invalidate(&self, live: bool) {
        let mut index = crate::sync::write(&self.index);
        index.generation += 1;
        index.live = live;
        index.images.clear();
    }

    /// Pulls `reference` for `platform`, or joins the pull of the same reference and platform
    /// already in flight: however many requests ask at once, the engine (and the registry)
    /// sees one pull. The pull runs on a task of its own, bounded by `--build-timeout`, so a
    /// request that gives up (client gone, its own deadline) never cancels it for the others.
    /// Joining happens before this returns: a request may report it right away.
    pub fn start_pull(self: &Arc<Self>, reference: &ImageRef, platform: &str) -> PullTicket {
        let key = (reference.as_str().to_owned(), platform.to_owned());
        let mut pulls = crate::sync::lock(&self.pulls);
        if let Some(pull) = pulls.get(&key) {
            return PullTicket {
                started: false,
                progress: pull.progress.subscribe(),
                done: pull.done.clone(),
            };
        }
        let (progress, progress_rx) = broadcast::channel(PULL_PROGRESS_BUFFER);
        let (done_tx, done) = watch::channel(None);
        pulls.insert(
            key.clone(),
            Arc::new(InFlightPull {
                progress: progress.clone(),
                done: done.clone(),
            }),
        );
        drop(pulls);
        let (engine, reference) = (self.clone(), reference.clone());
        tokio::spawn(async move {
            let limit = engine.build_timeout;
            let pulling = engine.pull(&reference, &key.1, |item| {
                // No receiver left is fine: the pull still completes for the next request.
                let _ = progress.send(item.clone());
            });
            let outcome = tokio::time::timeout(limit, pulling)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::DeadlineExceeded(format!(
                        "pulling {} took longer than --build-timeout ({}); check the registry, \
                         or pull it yourself",
                        key.0,
                        humantime::format_duration(limit)
                    )))
                });
            // The outcome first, then the entry goes and the progress channel closes (its
            // last sender is dropped with `progress`): a waiter that sees it closed finds
            // the outcome set.
            done_tx.send_replace(Some(outcome));
            crate::sync::lock(&engine.pulls).remove(&key);
        });
        PullTicket {
            started: true,
            progress: progress_rx,
            done,
        }
    }

    /// Pulls `reference`, reporting progress as (layer, current, total, status). Not shared:
    /// requests use [`Engine::start_pull`].
    async fn pull(
        &self,
        reference: &ImageRef,
        platform: &str,
        progress: impl FnMut(&CreateImageInfo),
    ) -> Result<()> {
        self.pull_as(reference, platform, None, progress).await
    }

    /// [`Engine::pull`] with registry credentials (sent as `X-Registry-Auth`); `platform` may
    /// be empty (the engine's own).
    pub async fn pull_as(
        &self,
        reference: &ImageRef,
        platform: &str,
        credentials: Option<DockerCredentials>,
        mut progress: impl FnMut(&CreateImageInfo),
    ) -> Result<()> {
        let client = self.client().await?;
        // Always name a tag or digest: an empty tag would pull every tag of the repository.
        let tag = reference.digest().or(reference.tag()).unwrap_or("latest");
        let options = CreateImageOptions {
            from_image: Some(reference.repository().to_owned()),
            tag: Some(tag.to_owned()),
            platform: platform.to_owned(),
            ..Default::default()
        };
        let mut stream = client.create_image(Some(options), None, credentials);
        while let Some(item) = stream.next().await {
            let item = item.map_err(|err| self.map_error(err))?;
            progress(&item);
        }
        Ok(())
    }

    /// The manifest digest ("sha256:<hex>") the registry serves for `reference`, asked through
    /// the engine's distribution API (`GET /distribution/{name}/json`), so the engine's own
    /// registry settings (mirrors, insecure registries, credentials) apply.
    pub async fn registry_digest(&self, reference: &str) -> Result<String, RegistryError> {
        self.registry_lookup(reference, None)
            .await?
            .map(|manifest| manifest.digest)
            .ok_or_else(|| RegistryError::Registry(format!("manifest unknown: {reference}")))
    }

    /// Whether the registry has `reference` (a tag): its manifest's digest and platforms, or `Ok(None)` when
    /// the registry answers that it has no such manifest or repository (the engine relays its
    /// 404). Asked through the distribution API with `credentials` as `X-Registry-Auth`, so the
    /// engine decides TLS or plain HTTP and applies its mirrors, as for its own pulls.
    pub async fn registry_lookup(
        &self,
        reference: &str,
        credentials: Option<DockerCredentials>,
    ) -> Result<Option<RegistryManifest>, RegistryError> {
        let client = self.client().await.map_err(RegistryError::Engine)?;
        match client.inspect_registry_image(reference, credentials).await {
            Ok(inspect) => Ok(Some(RegistryManifest {
                digest: inspect.descriptor.digest.unwrap_or_default(),
                architectures: inspect
                    .platforms
                    .into_iter()
                    .filter_map(|p| p.architecture)
                    .collect(),
            })),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code,
                message,
            }) => {
                if distribution_unsupported(status_code, &message) {
                    Err(RegistryError::Unsupported)
                } else if status_code == 404 {
                    Ok(None)
                } else {
                    Err(RegistryError::Registry(message.trim().to_owned()))
                }
            }
            Err(err) => Err(RegistryError::Engine(self.map_error(err))),
        }
    }

    /// Pushes `reference` (a tag the engine holds) with `credentials` as `X-Registry-Auth`,
    /// within the build timeout. A failure the engine reports in the stream (refused
    /// credentials, unreachable registry) is an error.
    pub async fn push(
        &self,
        reference: &ImageRef,
        credentials: Option<DockerCredentials>,
    ) -> Result<()> {
        let client = self
            .client()
            .await?
            .with_timeout(self.build_timeout.saturating_add(CALL_TIMEOUT));
        let options = PushImageOptions {
            tag: reference.tag().map(str::to_owned),
            ..Default::default()
        };
        let mut stream = client.push_image(reference.repository(), Some(options), credentials);
        while let Some(item) = stream.next().await {
            let item = item.map_err(|err| self.map_error(err))?;
            if let Some(error) = item.error_detail.and_then(|d| d.message) {
                return Err(Error::FailedPrecondition(format!(
                    "the engine failed the push of {}: {error}",
                    reference.as_str()
                )));
            }
        }
        Ok(())
    }

    /// Removes the name `reference` only (the image stays while it has other names).
    pub async fn untag(&self, reference: &str) -> Result<()> {
        let client = self.client().await?;
        let options = RemoveImageOptions {
            force: false,
            noprune: true,
            ..Default::default()
        };
        client
            .remove_image(reference, Some(options), None)
            .await
            .map_err(|err| self.map_error(err))?;
        Ok(())
    }

    /// Loads a `docker save`-style archive (`POST /images/load`), streamed as it is produced.
    /// The client's request timeout is raised to the build timeout: bollard's covers the whole
    /// upload. Engine errors come back as FAILED_PRECONDITION with the engine's text.
    ///
    /// Returns what the engine says it loaded (the last `Loaded image ID: <id>`, `Loaded
    /// image: <ref>` or `Loaded image(s): <id>` line, see [`loaded_image`]), `None` when it
    /// said nothing of the kind. That is the name to tag: an image's ID is the config digest
    /// on Docker's classic store and Podman, but the manifest (or index) digest on Docker's
    /// containerd image store (Docker 26+ with `containerd-snapshotter`, the default of
    /// Docker 29), where the config digest names nothing.
    pub async fn load(
        &self,
        body: impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
        mut progress: impl FnMut(&BuildInfo),
    ) -> Result<Option<String>> {
        let client = self
            .client()
            .await?
            .with_timeout(self.build_timeout.saturating_add(CALL_TIMEOUT));
        let options = ImportImageOptions {
            quiet: true,
            ..Default::default()
        };
        let mut stream = std::pin::pin!(client.import_image_stream(options, body, None));
        let mut loaded: Option<String> = None;
        let mut failed = None;
        while let Some(item) = stream.next().await {
            let item = match item {
                Ok(item) => item,
                Err(err) => {
                    // A 404 here is the load refused (a layer it lacks), not a missing object.
                    failed = Some(match self.map_error(err) {
                        Error::NotFound(message) => Error::FailedPrecondition(format!(
                            "the engine failed the load: {message}"
                        )),
                        other => other,
                    });
                    break;
                }
            };
            let text = item.stream.as_deref().unwrap_or_default();
            if let Some(name) = loaded_image(text) {
                loaded = Some(name.to_owned());
            }
            if let Some(message) = unpack_failure(text) {
                // Worded as the engine's other refusals (`map_error`).
                failed = Some(Error::FailedPrecondition(format!(
                    "the engine failed: {message}"
                )));
            }
            progress(&item);
        }
        let Some(err) = failed else {
            return Ok(loaded);
        };
        // Docker 28's containerd store keeps an image it could not unpack: remove it.
        if let Some(id) = loaded.filter(|name| name.starts_with("sha256:"))
            && let Err(removal) = self.remove_image(&id, false).await
        {
            tracing::debug!(image = %id, error = %removal, "no image left from the failed load");
        }
        Err(err)
    }

    /// Tags image `id` as `reference` (moving the tag if another image has it).
    pub async fn tag(&self, id: &str, reference: &ImageRef) -> Result<()> {
        let client = self.client().await?;
        let options = TagImageOptions {
            repo: Some(reference.repository().to_owned()),
            tag: Some(reference.tag().unwrap_or("latest").to_owned()),
        };
        client
            .tag_image(id, Some(options))
            .await
            .map_err(|err| self.map_error(err))
    }

    /// Where the engine keeps images (see [`ImageStoreKind`]), asked once per daemon and
    /// logged when first learned: Podman by `/version`'s component name, Docker's containerd
    /// image store by `docker info`'s driver status (`driver-type:
    /// io.containerd.snapshotter.v1`), else Docker's classic store.
    pub async fn image_store(&self) -> Result<ImageStoreKind> {
        self.store
            .get_or_try_init(|| async {
                let version = self.version().await?;
                let kind = if is_podman(&version.name) {
                    ImageStoreKind::Podman
                } else {
                    let client = self.client().await?;
                    let info = client.info().await.map_err(|err| self.map_error(err))?;
                    let containerd = info
                        .driver_status
                        .unwrap_or_default()
                        .iter()
                        .flatten()
                        .any(|value| value.contains("containerd.snapshotter"));
                    if containerd {
                        ImageStoreKind::Containerd
                    } else {
                        ImageStoreKind::Classic
                    }
                };
                tracing::info!(
                    engine = %self.host, name = %version.name, version = %version.version,
                    image_store = kind.as_str(), "engine image store"
                );
                Ok(kind)
            })
            .await
            .copied()
    }

    /// The image store when already learned ([`Engine::image_store`]), without asking.
    pub fn known_image_store(&self) -> Option<ImageStoreKind> {
        self.store.get().copied()
    }

    /// How many containers (running or not) were created from `image_id` or one of its names.
    ///
    /// # Errors
    /// The engine is unreachable or refuses the listing.
    pub async fn containers_of(&self, image_id: &str) -> Result<usize> {
        let client = self.client().await?;
        let filters = HashMap::from([("ancestor".to_owned(), vec![image_id.to_owned()])]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let containers = client
            .list_containers(Some(options))
            .await
            .map_err(|err| self.map_error(err))?;
        Ok(containers.len())
    }

    /// Removes the image `image_id` that has the names `tags`: each name first (a name the
    /// image shares with no other is how an image with several names is removed without
    /// force), then the image. Untagged parents are pruned only with `prune_parents`. An image
    /// already gone counts as removed.
    ///
    /// # Errors
    /// The engine refuses (a container uses the image) or is unreachable.
    pub async fn remove_named(
        &self,
        image_id: &str,
        tags: &[String],
        prune_parents: bool,
    ) -> Result<()> {
        let mut outcome = Ok(());
        for name in tags.iter().map(String::as_str).chain([image_id]) {
            match self.remove_image(name, prune_parents).await {
                Ok(()) | Err(Error::NotFound(_)) => {}
                Err(err) => {
                    outcome = Err(err);
                    break;
                }
            }
        }
        // Another remover (a retirement, a user's `docker rmi`) may have taken it meanwhile,
        // which the engine can answer with a conflict: gone is removed.
        if outcome.is_err() && matches!(self.inspect_fresh(image_id).await, Ok(None)) {
            return Ok(());
        }
        outcome
    }

    /// Images carrying `label` (ours), with their tags, size and creation time.
    pub async fn labelled_images(&self, label: &str) -> Result<Vec<LabelledImage>> {
        let client = self.client().await?;
        let filters = HashMap::from([("label".to_owned(), vec![label.to_owned()])]);
        let options = ListImagesOptions {
            filters: Some(filters),
            ..Default::default()
        };
        let images = client
            .list_images(Some(options))
            .await
            .map_err(|err| self.map_error(err))?;
        Ok(images
            .into_iter()
            .map(|image| LabelledImage {
                id: image.id,
                tags: image
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect(),
                size: u64::try_from(image.size).unwrap_or(0),
                created_unix: image.created,
            })
            .collect())
    }

    /// Ids of the images any container (running or not) was created from.
    pub async fn images_in_use(&self) -> Result<std::collections::HashSet<String>> {
        let client = self.client().await?;
        let options = ListContainersOptions {
            all: true,
            ..Default::default()
        };
        let containers = client
            .list_containers(Some(options))
            .await
            .map_err(|err| self.map_error(err))?;
        Ok(containers.into_iter().filter_map(|c| c.image_id).collect())
    }

    /// Removes an image by id (never forced: the engine refuses if something still uses it).
    /// `prune_parents` also removes its untagged parents; only safe while nothing builds.
    pub async fn remove_image(&self, id: &str, prune_parents: bool) -> Result<()> {
        let client = self.client().await?;
        let options = RemoveImageOptions {
            force: false,
            noprune: !prune_parents,
            ..Default::default()
        };
        client
            .remove_image(id, Some(options), None)
            .await
            .map_err(|err| self.map_error(err))?;
        Ok(())
    }

    /// Engine identity, for GetInfo.
    pub async fn version(&self) -> Result<EngineVersion> {
        let client = self.client().await?;
        let version = client.version().await.map_err(|err| self.map_error(err))?;
        // Components name the product ("Engine" for Docker, "Podman Engine" for Podman);
        // Podman's platform name is only "linux/amd64/<distro>".
        let name = version
            .components
            .and_then(|c| c.into_iter().next())
            .map(|c| c.name)
            .filter(|n| !n.is_empty())
            .or_else(|| version.platform.map(|p| p.name).filter(|n| !n.is_empty()))
            .unwrap_or_else(|| "unknown engine".to_owned());
        Ok(EngineVersion {
            name,
            version: version.version.unwrap_or_default(),
            api_version: client.client_version().to_string(),
            arch: version.arch.unwrap_or_default(),
        })
    }

    /// Watches the engine for as long as the daemon runs: keeps [`Engine::health`] current and
    /// the index true. Events are requested `since` the moment the index was last cleared, so
    /// an event that happens while the subscription is being set up is still delivered.
    pub async fn watch(self: Arc<Self>) {
        loop {
            let client = match self.client().await {
                Ok(client) => client,
                Err(_) => {
                    self.invalidate(false);
                    self.healthy.send_replace(false);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if client.ping().await.is_err() {
                self.invalidate(false);
                self.healthy.send_replace(false);
                self.reset_client().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            // A whole second earlier: `since` has one-second resolution.
            let since = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
                .saturating_sub(1);
            self.invalidate(true);
            self.healthy.send_replace(true);
            self.containers_gone.send_modify(|n| *n = n.wrapping_add(1));
            let filters = HashMap::from([(
                "type".to_owned(),
                vec!["image".to_owned(), "container".to_owned()],
            )]);
            let options = EventsOptions {
                since: Some(since.to_string()),
                filters: Some(filters),
                ..Default::default()
            };
            // The events call must not time out while idle.
            let events_client = client.with_timeout(Duration::from_secs(u64::from(u32::MAX)));
            let attached = std::time::Instant::now();
            let mut events = events_client.events(Some(options));
            while let Some(event) = events.next().await {
                match event {
                    // A container gone may free a superseded image (`retire.rs`); other
                    // container events (create, start, die, ...) change no image.
                    Ok(event) if event.typ == Some(EventMessageTypeEnum::CONTAINER) => {
                        if event.action.as_deref() == Some("destroy") {
                            self.containers_gone.send_modify(|n| *n = n.wrapping_add(1));
                        }
                    }
                    // Any image event may change what a reference means: forget everything.
                    // They are rare next to requests, and a miss costs one inspect.
                    Ok(event) => {
                        self.invalidate(true);
                        if event.action.as_deref() == Some("untag")
                            && let Some(id) = event.actor.and_then(|actor| actor.id)
                        {
                            let _ = self.untagged.send(id);
                        }
                    }
                    Err(err) => {
                        tracing::warn!(engine = %self.host, error = %err, "engine events stream ended");
                        break;
                    }
                }
            }
            self.invalidate(false);
            self.reset_client().await;
            if attached.elapsed() < Duration::from_secs(1) {
                // Ended at once (a proxy, an engine quirk): do not spin.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Where an engine keeps its images; it decides what an image ID is and what a load may leave
/// out. Docker's classic store (graph drivers, e.g. overlay2): ID = config digest; a layer whose
/// chain it holds is sent as a zero-size entry. Docker's containerd image store (Docker 26+
/// with `containerd-snapshotter`, the default of Docker 29 and Docker Desktop): ID = manifest
/// (or index) digest; its docker-archive importer reads every listed file, so our layers are
/// all sent. Podman: ID = config digest, as the classic store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageStoreKind {
    Classic,
    Containerd,
    Podman,
}

impl ImageStoreKind {
    /// The name `GetInfo` and the log use: `classic`, `containerd`, `podman`.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageStoreKind::Classic => "classic",
            ImageStoreKind::Containerd => "containerd",
            ImageStoreKind::Podman => "podman",
        }
    }
}

/// True when `/version`'s product name is Podman's ("Podman Engine"): how Podman is told.
pub fn is_podman(product_name: &str) -> bool {
    product_name.to_lowercase().contains("podman")
}

/// The ID to tag after a load: the one the engine answered ([`Engine::load`]) when it is an
/// image ID (`sha256:` and 64 hex digits), else the config digest we wrote (`written`): the
/// ID on Docker's classic store and on Podman, which may answer with a name instead.
pub fn tagged_id(loaded: Option<String>, written: &str) -> String {
    loaded
        .filter(|id| {
            id.strip_prefix("sha256:")
                .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .unwrap_or_else(|| written.to_owned())
}

/// The engine's reason when a load answer line says the loaded image could not be unpacked.
/// Docker 28's containerd store answers `Loaded image ID: <id>` and then, in the same stream
/// and with a 200, `Error unpacking image <id>: <why>` (a layer blob neither in the archive nor
/// in its content store); Docker 26 sends an `errorDetail` instead (measured, engine-facts.md).
pub fn unpack_failure(line: &str) -> Option<&str> {
    let line = line.trim();
    line.starts_with("Error unpacking image").then_some(line)
}

/// The image a load answer line names: `Loaded image ID: sha256:<hex>` (Docker, an untagged
/// image: the classic store's config digest, the containerd store's manifest digest),
/// `Loaded image: <ref>` (Docker, a named image; Podman 4.3 for an untagged one, with its ID),
/// `Loaded image(s): <id>` (Podman's older wording). Text as moby's `image/tarexport/load.go`
/// and `daemon/containerd/image_import.go` and Podman's compat handler print it.
pub fn loaded_image(line: &str) -> Option<&str> {
    let line = line.trim();
    ["Loaded image ID: ", "Loaded image(s): ", "Loaded image: "]
        .iter()
        .find_map(|prefix| line.strip_prefix(prefix))
        .map(|rest| rest.split(',').next().unwrap_or(rest).trim())
        .filter(|name| !name.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Unix-socket engine client is refused at once when nothing is at the path (as
    /// bollard's own `connect_with_unix`), and made without contacting anything otherwise.
    #[test]
    fn unix_clients_need_a_socket_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("docker.sock");
        assert!(matches!(
            unix_client(&missing, 60),
            Err(bollard::errors::Error::SocketNotFoundError(path)) if path == missing.display().to_string()
        ));
        let _listener = std::os::unix::net::UnixListener::bind(&missing).unwrap();
        assert!(unix_client(&missing, 60).is_ok());
    }

    /// The engine's answer names the image when it is an ID (the containerd store's manifest
    /// digest); a name, or no answer, leaves the config digest we wrote.
    #[test]
    fn the_tagged_id_is_the_engines() {
        let written = format!("sha256:{}", "8".repeat(64));
        let manifest = format!("sha256:{}", "4e".repeat(32));
        assert_eq!(tagged_id(Some(manifest.clone()), &written), manifest);
        assert_eq!(tagged_id(None, &written), written);
        assert_eq!(tagged_id(Some("lambda:x".into()), &written), written);
        assert_eq!(tagged_id(Some("sha256:4e8b".into()), &written), written);
    }

    /// The load answers of Docker's two stores and Podman, as they print them.
    #[test]
    fn the_loaded_image_is_read_from_the_answer() {
        let id = "sha256:4e8bae2f23276f5cc76dc7674eebcb3df62cc9369a2e6b8aa2550a4229a0c824";
        assert_eq!(loaded_image(&format!("Loaded image ID: {id}\n")), Some(id));
        assert_eq!(loaded_image(&format!("Loaded image: {id}\n")), Some(id));
        assert_eq!(loaded_image(&format!("Loaded image(s): {id}")), Some(id));
        assert_eq!(
            loaded_image("Loaded image: samcli/lambda-python:3.12-x86_64-abc\n"),
            Some("samcli/lambda-python:3.12-x86_64-abc")
        );
        assert_eq!(loaded_image("Loading layer 1/2"), None);
        let unpack = format!("Error unpacking image {id}: apply layer error: not found\n");
        assert_eq!(unpack_failure(&unpack), Some(unpack.trim()));
        assert_eq!(unpack_failure(&format!("Loaded image ID: {id}")), None);
        assert_eq!(loaded_image("Loaded image ID: "), None);
    }

    /// The native architecture, plus enabled 64-bit ELF binfmt_misc entries told by their
    /// e_machine (names do not matter), only for a local engine and while binfmt_misc is on.
    #[test]
    fn runnable_architectures_follow_binfmt_entries_of_a_local_engine() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |name: &str, state: &str, magic: &str| {
            std::fs::write(
                dir.path().join(name),
                format!("{state}\ninterpreter /usr/bin/qemu\nflags: F\noffset 0\nmagic {magic}\nmask ff\n"),
            )
            .unwrap();
        };
        let aarch64 = "7f454c460201010000000000000000000200b700";
        let arm32 = "7f454c4601010100000000000000000002002800";
        entry("some-emulator", "enabled", aarch64);
        entry("qemu-arm", "enabled", arm32);
        std::fs::write(dir.path().join("register"), "").unwrap();
        let archs = |native: &str, local: bool| runnable_architectures(native, local, dir.path());
        assert_eq!(
            archs("amd64", true),
            [Arch::X86_64],
            "binfmt_misc has no status: off"
        );
        std::fs::write(dir.path().join("status"), "enabled\n").unwrap();
        assert_eq!(archs("amd64", true), [Arch::X86_64, Arch::Arm64]);
        assert_eq!(archs("amd64", false), [Arch::X86_64], "remote: native only");
        assert_eq!(archs("arm64", true), [Arch::Arm64], "no duplicate");
        assert_eq!(archs("riscv64", false), Vec::<Arch>::new());
        entry("some-emulator", "disabled", aarch64);
        assert_eq!(
            archs("amd64", true),
            [Arch::X86_64],
            "a disabled entry does not count"
        );
        std::fs::write(dir.path().join("status"), "disabled\n").unwrap();
        entry(
            "qemu-x86_64",
            "enabled",
            "7f454c4602010100000000000000000002003e00",
        );
        assert_eq!(archs("arm64", true), [Arch::Arm64], "binfmt_misc off");
        std::fs::write(dir.path().join("status"), "enabled\n").unwrap();
        assert_eq!(archs("arm64", true), [Arch::X86_64, Arch::Arm64]);
    }

    /// Podman's bare 404 and a 501 mean "no distribution API"; Docker's registry errors do not.
    #[test]
    fn distribution_api_missing_is_told_from_registry_errors() {
        assert!(distribution_unsupported(404, "Not Found\n"));
        assert!(distribution_unsupported(404, "404 page not found"));
        assert!(distribution_unsupported(501, ""));
        assert!(!distribution_unsupported(
            404,
            "manifest unknown: manifest unknown"
        ));
        assert!(!distribution_unsupported(
            500,
            "Get \"http://127.0.0.1:1/v2/\": dial tcp 127.0.0.1:1: connect: connection refused"
        ));
    }
}
