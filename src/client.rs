//! A typed client for the daemon: what `lambda-imagectl`, the tests, the benchmarks and Rust
//! emulators use.
//!
//! [`Client`] connects over the daemon's Unix socket (optionally waiting for it to come up),
//! [`RequestBuilder`] makes a `BuildRequest` with absolute layer paths (the daemon's working
//! directory means nothing to the caller), and [`Client::build`] runs a build to its end,
//! returning every event and the outcome.
//!
//! ```no_run
//! use lambda_imaged::client::{self, Client, LayerArg, RequestBuilder};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let mut daemon = Client::connect(&client::default_socket()).await?;
//! let request = RequestBuilder::zip("python3.12")
//!     .layer("deps=./build/deps".parse::<LayerArg>()?)
//!     .finish()?;
//! let outcome = daemon.build(request).await;
//! match outcome.result {
//!     Ok(done) => println!("run {} ({} events)", done.tag, outcome.events.len()),
//!     Err(status) => eprintln!("build failed: {}", status.message()),
//! }
//! # Ok(()) }
//! ```
//!
//! The generated [`ImageBuilderClient`] stays available through [`connect`] and
//! [`Client::raw`] for calls this module does not wrap.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::service_fn;

pub use crate::proto;
pub use crate::proto::image_builder_client::ImageBuilderClient;

use proto::build_event::Event;

/// How often [`Client::connect_waiting`] retries while the daemon is not up yet.
const CONNECT_RETRY: Duration = Duration::from_millis(200);

/// A status that the connection produced rather than the daemon, as `UNAVAILABLE` saying what
/// happened and what to do; any other status unchanged. tonic attaches the transport's error
/// (h2, hyper) as the source of a status it makes from a broken connection (`UNKNOWN` "h2
/// protocol error: error reading a body", or `UNAVAILABLE`, depending on where the read was);
/// statuses the daemon sends arrive in trailers and have none.
pub fn connection_lost(status: tonic::Status) -> tonic::Status {
    use std::error::Error as _;
    match status.source() {
        Some(source) => tonic::Status::unavailable(format!(
            "the connection to lambda-imaged broke ({source}): the daemon was stopped or \
             killed; retry once it is back (a build it had begun is built again, nothing \
             half-done is kept)"
        )),
        None => status,
    }
}

/// The socket the daemon serves by default: `LAMBDA_IMAGED_SOCKET`, else
/// `/run/lambda-imaged/lambda-imaged.sock` as root, `$XDG_RUNTIME_DIR/lambda-imaged.sock`
/// otherwise (when `XDG_RUNTIME_DIR` is set).
pub fn daemon_socket() -> PathBuf {
    if let Some(path) = std::env::var_os("LAMBDA_IMAGED_SOCKET") {
        return PathBuf::from(path);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("lambda-imaged.sock");
    }
    PathBuf::from("/run/lambda-imaged/lambda-imaged.sock")
}

/// The socket a client uses by default: [`daemon_socket`], except that a non-root user
/// without a per-user daemon (and no `LAMBDA_IMAGED_SOCKET`) falls back to the system one.
pub fn default_socket() -> PathBuf {
    let path = daemon_socket();
    let system = Path::new("/run/lambda-imaged/lambda-imaged.sock");
    if std::env::var_os("LAMBDA_IMAGED_SOCKET").is_none() && !path.exists() && system.exists() {
        return system.to_owned();
    }
    path
}

/// The daemon could not be reached. Displays as `cannot reach lambda-imaged at <socket>: <why>`:
/// when the socket refused us (EACCES), who owns it, its mode and the group to join (what
/// docker's CLI says for docker.sock); otherwise asks whether the daemon runs.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach lambda-imaged at {}: {}", path.display(), self.reason())]
pub struct ConnectError {
    /// The socket tried.
    pub path: PathBuf,
    /// Why the connection failed (the last attempt's error when waiting).
    #[source]
    pub source: tonic::transport::Error,
    /// Set when `connect(2)` failed with EACCES: what the socket's permissions are and what to
    /// do, read from the file system when the error happened.
    pub denied: Option<String>,
}

impl ConnectError {
    fn new(path: &Path, source: tonic::transport::Error) -> ConnectError {
        let denied = permission_denied(&source).then(|| explain_denied(path));
        ConnectError {
            path: path.to_owned(),
            source,
            denied,
        }
    }

    /// True when the socket's permissions kept us out (waiting will not help).
    pub fn is_permission_denied(&self) -> bool {
        self.denied.is_some()
    }

    fn reason(&self) -> String {
        match &self.denied {
            Some(why) => format!("permission denied: {why}"),
            None => format!(
                "{}; is the daemon running? (--socket, LAMBDA_IMAGED_SOCKET)",
                self.source
            ),
        }
    }
}

/// True when an error in `err`'s source chain is an I/O error of kind PermissionDenied.
fn permission_denied(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Why `connect(2)` on `path` was refused and what to do, from the socket's owner, group and
/// mode and the caller's groups. connect(2) needs write permission on the socket and search
/// permission on every directory above it.
fn explain_denied(path: &Path) -> String {
    use nix::unistd::{Gid, Group, Uid, User};
    use std::os::unix::fs::MetadataExt;

    let uid = Uid::current();
    let user = User::from_uid(uid).ok().flatten().map(|u| u.name);
    let me = match &user {
        Some(name) => format!("user {name} (uid {uid})"),
        None => format!("uid {uid}"),
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(err) => {
            let dir = path.parent().unwrap_or(Path::new("/"));
            return format!(
                "{me} cannot look the socket up ({err}): a directory on the path ({}) is not \
                 searchable by {me}; ask the administrator to open it to the daemon's group",
                dir.display()
            );
        }
    };
    let owner = User::from_uid(Uid::from_raw(meta.uid()))
        .ok()
        .flatten()
        .map_or_else(|| meta.uid().to_string(), |u| u.name);
    let group = Group::from_gid(Gid::from_raw(meta.gid())).ok().flatten();
    let group_name = group
        .as_ref()
        .map_or_else(|| meta.gid().to_string(), |g| g.name.clone());
    let what = format!(
        "the socket is owned by {owner}:{group_name} with mode {:04o}",
        meta.mode() & 0o7777
    );
    let group_may_write = meta.mode() & 0o020 != 0;
    if meta.gid() == 0 || !group_may_write {
        return format!(
            "{what}, so only {owner} may connect; run as {owner}, or have the daemon started \
             with --socket-group GROUP (SocketGroup= for systemd) and join that group"
        );
    }
    let in_session = nix::unistd::getgroups()
        .map(|groups| groups.contains(&Gid::from_raw(meta.gid())))
        .unwrap_or(false)
        || Gid::effective().as_raw() == meta.gid();
    let listed = match (&group, &user) {
        (Some(group), Some(user)) => group.mem.iter().any(|m| m == user),
        _ => false,
    };
    let name = user.as_deref().unwrap_or("$USER");
    if listed && !in_session {
        format!(
            "{what}; {me} is a member of {group_name} but this login session is not yet: log \
             in again (or run `newgrp {group_name}`)"
        )
    } else if in_session {
        format!(
            "{what}; {me} is in {group_name}, yet the socket refused it: check the mode of the \
             socket and of the directories above it"
        )
    } else {
        format!(
            "{what} and {me} is not in group {group_name}; join it (sudo usermod -aG \
             {group_name} {name}, then log in again) or run as a member of {group_name}"
        )
    }
}

/// A channel to the daemon at `socket` (connected now, so an absent daemon is reported here).
pub async fn channel(socket: &Path) -> Result<Channel, ConnectError> {
    let path = socket.to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    let endpoint = Endpoint::from_static("http://lambda-imaged.local");
    endpoint
        .connect_with_connector(service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .map_err(|source| ConnectError::new(socket, source))
}

/// Like [`channel`], but while the daemon is not up yet (no socket, nobody listening) retries
/// every 200 ms until `deadline`; the error is the last attempt's. A socket that refuses us
/// (permission denied) is reported at once.
pub async fn channel_waiting(
    socket: &Path,
    deadline: tokio::time::Instant,
) -> Result<Channel, ConnectError> {
    loop {
        match channel(socket).await {
            Ok(channel) => return Ok(channel),
            Err(err) if err.is_permission_denied() => return Err(err),
            Err(err) if tokio::time::Instant::now() >= deadline => return Err(err),
            // A poll interval, not synchronisation: each attempt checks the real condition.
            Err(_) => tokio::time::sleep(CONNECT_RETRY).await,
        }
    }
}

/// The generated client for the daemon at `socket`, for calls [`Client`] does not wrap.
pub async fn connect(socket: &Path) -> Result<ImageBuilderClient<Channel>, ConnectError> {
    Ok(ImageBuilderClient::new(channel(socket).await?))
}

/// A layer argument, `[NAME=]PATH`: a directory or a zip file in the function's layer order.
/// Without `NAME`, the name is the path's base name minus a `.zip` suffix (SAM's rule for
/// local layers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerArg {
    /// The layer's name (part of the image tag, as in SAM).
    pub name: String,
    /// Where its content is; relative paths are resolved by [`RequestBuilder::finish`].
    pub path: PathBuf,
}

impl LayerArg {
    /// A layer with an explicit name.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> LayerArg {
        LayerArg {
            name: name.into(),
            path: path.into(),
        }
    }
}

/// A `[NAME=]PATH` argument that names no usable layer. The message quotes the argument; a CLI
/// prefixes its flag (`--layer "x=": the path is empty`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayerArgError {
    /// `PATH` alone, and it has no base name to use (`/`, `..`) or one that is not UTF-8.
    #[error("{0:?}: cannot derive a name from the path; use NAME=PATH")]
    NoName(String),
    /// `NAME=` with nothing after it.
    #[error("{0:?}: the path is empty")]
    EmptyPath(String),
}

impl FromStr for LayerArg {
    type Err = LayerArgError;

    fn from_str(text: &str) -> Result<LayerArg, LayerArgError> {
        let layer = match text.split_once('=') {
            Some((name, path)) => LayerArg::new(name, path),
            None => {
                let path = Path::new(text);
                let name = path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .map(|name| name.strip_suffix(".zip").unwrap_or(name))
                    .ok_or_else(|| LayerArgError::NoName(text.to_owned()))?;
                LayerArg::new(name, path)
            }
        };
        if layer.path.as_os_str().is_empty() {
            return Err(LayerArgError::EmptyPath(text.to_owned()));
        }
        Ok(layer)
    }
}

/// An emulation image argument, `[FUNCTION=]REF`: without `FUNCTION` it is the global default
/// (SAM's `--invoke-image`). Parsing cannot fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvokeImageArg {
    /// The function it applies to; `None` for every function.
    pub function: Option<String>,
    /// The image reference.
    pub image: String,
}

impl FromStr for InvokeImageArg {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<InvokeImageArg, Self::Err> {
        Ok(match text.split_once('=') {
            Some((function, image)) => InvokeImageArg {
                function: Some(function.to_owned()),
                image: image.to_owned(),
            },
            None => InvokeImageArg {
                function: None,
                image: text.to_owned(),
            },
        })
    }
}

/// A `BuildRequest` (also what `Resolve` takes) under construction. Start from
/// [`RequestBuilder::zip`] or [`RequestBuilder::image`]; [`finish`](RequestBuilder::finish)
/// makes layer paths absolute. Values are checked by the daemon, which names the field at
/// fault.
#[derive(Debug, Clone, Default)]
pub struct RequestBuilder {
    request: proto::BuildRequest,
    layers: Vec<LayerArg>,
}

impl RequestBuilder {
    /// A ZIP function on `runtime` (e.g. `python3.12`).
    pub fn zip(runtime: impl Into<String>) -> RequestBuilder {
        RequestBuilder::default()
            .package_type(proto::PackageType::Zip)
            .runtime(runtime)
    }

    /// An IMAGE function running `image` (e.g. `myrepo/fn:v1`).
    pub fn image(image: impl Into<String>) -> RequestBuilder {
        let mut builder = RequestBuilder::default().package_type(proto::PackageType::Image);
        builder.request.image = image.into();
        builder
    }

    /// How the function is packaged (default: ZIP).
    pub fn package_type(mut self, package_type: proto::PackageType) -> RequestBuilder {
        self.request.package_type = package_type as i32;
        self
    }

    /// The Lambda runtime of a ZIP function.
    pub fn runtime(mut self, runtime: impl Into<String>) -> RequestBuilder {
        self.request.runtime = runtime.into();
        self
    }

    /// The image of an IMAGE function.
    pub fn image_ref(mut self, image: impl Into<String>) -> RequestBuilder {
        self.request.image = image.into();
        self
    }

    /// The function's architecture (default: x86_64).
    pub fn architecture(mut self, architecture: proto::Architecture) -> RequestBuilder {
        self.request.architecture = architecture as i32;
        self
    }

    /// Appends a layer (call in the function's layer order).
    pub fn layer(mut self, layer: LayerArg) -> RequestBuilder {
        self.layers.push(layer);
        self
    }

    /// Adds an emulation image override.
    pub fn invoke_image(mut self, invoke: InvokeImageArg) -> RequestBuilder {
        self.request.invoke_images.push(proto::InvokeImage {
            function_name: invoke.function.unwrap_or_default(),
            image: invoke.image,
        });
        self
    }

    /// The function's name, which selects a per-function emulation image.
    pub fn function_name(mut self, name: impl Into<String>) -> RequestBuilder {
        self.request.function_name = name.into();
        self
    }

    /// Do not pull a missing base image (fail instead).
    pub fn skip_pull_image(mut self, skip: bool) -> RequestBuilder {
        self.request.skip_pull_image = skip;
        self
    }

    /// Rebuild even if the image is up to date.
    pub fn force_image_build(mut self, force: bool) -> RequestBuilder {
        self.request.force_image_build = force;
        self
    }

    /// The request, relative layer paths joined to the current directory.
    ///
    /// # Errors
    /// The current directory cannot be read (removed, or no permission).
    pub fn finish(self) -> std::io::Result<proto::BuildRequest> {
        let cwd = std::env::current_dir()?;
        Ok(self.finish_in(&cwd))
    }

    /// The request, relative layer paths joined to `dir` (absolute ones are kept).
    pub fn finish_in(mut self, dir: &Path) -> proto::BuildRequest {
        self.request.layers = self
            .layers
            .into_iter()
            .map(|layer| proto::Layer {
                name: layer.name,
                path: dir.join(layer.path).display().to_string(),
            })
            .collect();
        self.request
    }
}

/// Every event of one Build stream, and how it ended.
#[derive(Debug)]
pub struct Outcome {
    /// Every event received, in order; `Completed`, when it came, is the last.
    pub events: Vec<proto::BuildEvent>,
    /// The `Completed` event, or the status the call or stream ended with.
    pub result: Result<proto::Completed, tonic::Status>,
}

/// The typed client: one connection to the daemon, and the calls it serves.
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
    inner: ImageBuilderClient<Channel>,
}

impl Client {
    /// Connects to the daemon at `socket`.
    ///
    /// # Errors
    /// [`ConnectError`] names the socket when nobody answers there.
    pub async fn connect(socket: &Path) -> Result<Client, ConnectError> {
        Ok(Client::new(channel(socket).await?))
    }

    /// Connects to the daemon at `socket`, retrying until `deadline` while it is not up yet
    /// (e.g. just started by systemd or a test).
    ///
    /// # Errors
    /// [`ConnectError`] from the last attempt when the deadline passed.
    pub async fn connect_waiting(
        socket: &Path,
        deadline: tokio::time::Instant,
    ) -> Result<Client, ConnectError> {
        Ok(Client::new(channel_waiting(socket, deadline).await?))
    }

    /// A client over an existing channel.
    pub fn new(channel: Channel) -> Client {
        Client {
            inner: ImageBuilderClient::new(channel.clone()),
            channel,
        }
    }

    /// The generated client, for calls not wrapped here.
    pub fn raw(&mut self) -> &mut ImageBuilderClient<Channel> {
        &mut self.inner
    }

    /// Runs one Build to its end, collecting every event.
    pub async fn build(&mut self, request: proto::BuildRequest) -> Outcome {
        let mut events = Vec::new();
        let result = self
            .build_with(request, |event| events.push(event.clone()))
            .await;
        Outcome { events, result }
    }

    /// Runs one Build to its end, handing each event to `on_event` as it arrives (a renderer,
    /// a progress bar); returns the `Completed` event.
    ///
    /// # Errors
    /// The status the daemon ended the call or stream with (e.g. `NOT_FOUND` naming a layer
    /// path); `UNAVAILABLE` "the connection to lambda-imaged broke …" when the connection
    /// itself failed mid-call (the daemon was stopped or killed: see [`connection_lost`]);
    /// `INTERNAL` if the stream breaks the protocol (ends without `Completed`, or goes on
    /// after it).
    pub async fn build_with(
        &mut self,
        request: proto::BuildRequest,
        mut on_event: impl FnMut(&proto::BuildEvent),
    ) -> Result<proto::Completed, tonic::Status> {
        let mut stream = self
            .inner
            .build(request)
            .await
            .map_err(connection_lost)?
            .into_inner();
        while let Some(event) = stream.message().await.map_err(connection_lost)? {
            on_event(&event);
            if let Some(Event::Completed(done)) = event.event {
                // The stream ends right after Completed; anything else is a daemon bug.
                return match stream.message().await.map_err(connection_lost)? {
                    None => Ok(done),
                    Some(extra) => Err(tonic::Status::internal(format!(
                        "the daemon sent an event after Completed: {extra:?}"
                    ))),
                };
            }
        }
        Err(tonic::Status::internal(
            "the daemon ended the build stream without Completed or an error",
        ))
    }

    /// The plan a request resolves to (tag, base image, Dockerfile); no engine I/O.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` / `NOT_FOUND` naming the request field at fault.
    pub async fn resolve(
        &mut self,
        request: proto::BuildRequest,
    ) -> Result<proto::BuildPlan, tonic::Status> {
        Ok(self.inner.resolve(request).await?.into_inner())
    }

    /// Builds in flight and recently finished.
    ///
    /// # Errors
    /// The call's status (e.g. `PERMISSION_DENIED` for a peer not allowed to use the daemon).
    pub async fn list_builds(&mut self) -> Result<proto::ListBuildsResponse, tonic::Status> {
        Ok(self
            .inner
            .list_builds(proto::ListBuildsRequest {})
            .await?
            .into_inner())
    }

    /// The daemon's version, engine, paths, limits and counters.
    ///
    /// # Errors
    /// The call's status.
    pub async fn info(&mut self) -> Result<proto::GetInfoResponse, tonic::Status> {
        Ok(self
            .inner
            .get_info(proto::GetInfoRequest {})
            .await?
            .into_inner())
    }

    /// Removes (or with `dry_run` lists) this daemon's images and unused layers.
    ///
    /// # Errors
    /// The call's status (e.g. `UNAVAILABLE` when the engine is down).
    pub async fn prune(
        &mut self,
        request: proto::PruneRequest,
    ) -> Result<proto::PruneResponse, tonic::Status> {
        Ok(self.inner.prune(request).await?.into_inner())
    }

    /// The daemon's overall health (`SERVING` while the engine answers); an unknown value
    /// reads as `Unknown`.
    ///
    /// # Errors
    /// The call's status.
    pub async fn health(&mut self) -> Result<ServingStatus, tonic::Status> {
        let response = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        Ok(ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[NAME=]PATH`: explicit names, base names minus `.zip`, and the two errors.
    #[test]
    fn layer_arguments() {
        assert_eq!(
            "deps=../x".parse::<LayerArg>(),
            Ok(LayerArg::new("deps", "../x"))
        );
        assert_eq!(
            "/a/b/layer.zip".parse::<LayerArg>(),
            Ok(LayerArg::new("layer", "/a/b/layer.zip"))
        );
        assert_eq!(
            "/".parse::<LayerArg>(),
            Err(LayerArgError::NoName("/".into()))
        );
        assert_eq!(
            "x=".parse::<LayerArg>(),
            Err(LayerArgError::EmptyPath("x=".into()))
        );
        assert_eq!(
            LayerArgError::EmptyPath("x=".into()).to_string(),
            r#""x=": the path is empty"#
        );
    }

    /// Relative layer paths are joined to the given directory; absolute ones are kept.
    #[test]
    fn finish_makes_layer_paths_absolute() {
        let request = RequestBuilder::zip("python3.12")
            .layer(LayerArg::new("a", "rel/a"))
            .layer(LayerArg::new("b", "/abs/b"))
            .invoke_image("f=emu:1".parse().unwrap_or_else(|e| match e {}))
            .finish_in(Path::new("/work"));
        let paths: Vec<&str> = request.layers.iter().map(|l| l.path.as_str()).collect();
        assert_eq!(paths, ["/work/rel/a", "/abs/b"]);
        assert_eq!(request.package_type, proto::PackageType::Zip as i32);
        assert_eq!(request.invoke_images[0].function_name, "f");
    }
}
