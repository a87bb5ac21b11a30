//! The gRPC service: the only code that handles `tonic::Request`s and response streams.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::Stream;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::access::{self, Peer};
use crate::builds::{Builds, Key};
use crate::config::Config;
use crate::error::Error;
use crate::keep_warm::KeepWarm;
use crate::outcome::Event;
use crate::pipeline::{self, Shared};
use crate::proto::{self, image_builder_server::ImageBuilder};
use crate::prune;
use crate::resolve::{self, Arch, Plan};

/// Largest BuildRequest accepted (a request names paths; it never carries content).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Build streams open at once across all clients; beyond it, RESOURCE_EXHAUSTED.
pub const MAX_STREAMS: usize = 4096;

/// Capacity of each client's outgoing queue. A slow client only delays itself: the build's
/// log is in memory and each client reads it at its own pace. One slot is always kept free
/// for the status that ends the stream.
const CLIENT_QUEUE: usize = 64;

/// The service state shared by every request.
pub struct Service {
    pub shared: Arc<Shared>,
    pub builds: Arc<Builds>,
    pub socket: PathBuf,
    pub cache_dir: PathBuf,
    /// Becomes true when shutdown gave up waiting: open streams end with UNAVAILABLE.
    pub abort: watch::Receiver<bool>,
    /// Who may call.
    pub policy: access::Policy,
    /// One permit per open Build stream.
    streams: Arc<tokio::sync::Semaphore>,
    /// See `Config::client_stall_timeout`.
    stall_timeout: Duration,
    /// `--keep-warm`; `None` when off.
    keep_warm: Option<Arc<KeepWarm>>,
}

impl Service {
    /// The service for `config`, serving on `socket` (its path, and the group whose members
    /// may call: `--socket-group`, or the socket file's own group).
    pub fn new(
        config: &Config,
        socket: (&Path, Option<u32>),
        shared: Arc<Shared>,
        builds: Arc<Builds>,
        abort: watch::Receiver<bool>,
    ) -> Service {
        Service {
            shared: shared.clone(),
            builds: builds.clone(),
            socket: socket.0.to_owned(),
            cache_dir: config.cache_dir.clone(),
            abort,
            policy: access::Policy::new(&config.allow_uids, &config.allow_gids, socket.1),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            stall_timeout: config.client_stall_timeout,
            keep_warm: KeepWarm::start(
                (config.keep_warm, config.keep_warm_inotify_watches),
                shared.clone(),
                builds.clone(),
            ),
        }
    }
}

impl Service {
    /// The peer, if allowed; PERMISSION_DENIED (logged) otherwise. Every RPC starts here, so
    /// whatever follows holds a checked peer.
    fn authorize<T>(&self, request: &Request<T>, rpc: &str) -> Result<Peer, Status> {
        // Fail closed: a connection without peer credentials is not a Unix-socket peer we know.
        // Who is asking, from SO_PEERCRED (always present on a Unix socket).
        let cred = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred);
        let Some(cred) = cred else {
            tracing::warn!(rpc, "request denied: no peer credentials");
            return Err(Error::PermissionDenied(
                "no peer credentials on this connection; connect over the daemon's Unix socket"
                    .into(),
            )
            .into_status());
        };
        let peer = Peer::new(cred.uid(), cred.gid(), cred.pid());
        if let Err(err) = self.policy.check(&peer) {
            tracing::warn!(uid = peer.uid, gid = peer.gid, pid = ?peer.pid, rpc, "request denied");
            return Err(err.into_status());
        }
        Ok(peer)
    }
}

fn plan_of(request: proto::BuildRequest, mirror: Option<&str>) -> Result<Plan, Error> {
    let size = prost::Message::encoded_len(&request);
    if size > MAX_REQUEST_BYTES {
        return Err(Error::ResourceExhausted(format!(
            "max_request_bytes: the request is {size} bytes, the limit is {MAX_REQUEST_BYTES}; \
             send fewer or shorter layers and invoke images"
        )));
    }
    let plan = resolve::resolve_with(&proto::request_from_wire(request)?, mirror)?;
    layer_paths_exist(&plan.layers)?;
    Ok(plan)
}

/// NOT_FOUND naming the first layer whose path does not exist (`lstat`: a dangling link is
/// found by the walk, with its own message). The one system call between a request and its
/// plan, made here rather than in the pure `resolve`, with the peer's rights ([`plan_as`]).
fn layer_paths_exist(layers: &[resolve::LayerSpec]) -> Result<(), Error> {
    for (index, layer) in layers.iter().enumerate() {
        match std::fs::symlink_metadata(&layer.path) {
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(format!(
                    "layers[{index}].path: {} does not exist",
                    layer.path.display()
                )));
            }
            Err(err) => {
                return Err(Error::io(
                    &format!("layers[{index}].path:"),
                    &layer.path,
                    &err,
                ));
            }
        }
    }
    Ok(())
}

/// Resolves with the peer's rights: the layer paths are stat'ed as the peer, so a peer learns
/// nothing about paths it could not see itself. The daemon's own user (the common case, and
/// every warm hit from it) resolves inline.
async fn plan_as(
    peer: &Peer,
    request: proto::BuildRequest,
    mirror: Option<String>,
) -> Result<Plan, Error> {
    if peer.uid == access::own_uid() {
        return plan_of(request, mirror.as_deref());
    }
    let peer = peer.clone();
    crate::sync::blocking(move || {
        access::as_peer(&peer, || plan_of(request, mirror.as_deref()))
            .map_err(|err| access::denied_for(&peer, err))
    })
    .await
}

/// Identifies a request's inputs: requests with the same key may share one build.
fn definition_key(plan: &Plan, peer: &Peer) -> String {
    let mut hasher = Sha256::new();
    // Builds are shared only between requests with the same rights: each peer's layer reads
    // are its own.
    hasher.update(format!("{}:{}:{:?}\0", peer.uid, peer.gid, peer.groups));
    hasher.update(plan.tag.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(plan.base.as_str().as_bytes());
    hasher.update([0]);
    hasher.update(plan.dockerfile.as_bytes());
    hasher.update([0]);
    hasher.update(plan.arch.as_str().as_bytes());
    hasher.update([u8::from(plan.skip_pull_image)]);
    for layer in &plan.layers {
        hasher.update(layer.name.as_bytes());
        hasher.update([0]);
        hasher.update(layer.path.as_os_str().as_encoded_bytes());
        hasher.update([0]);
    }
    hex::encode(hasher.finalize())
}

/// How [`send_or_stall`] went.
enum Sent {
    Yes,
    /// The client closed its stream.
    Gone,
    /// The client's queue stayed full for the stall timeout; it was sent RESOURCE_EXHAUSTED.
    Stalled,
}

/// Queues `event` for the client, waiting at most `stall` for room. Room means two free slots:
/// one for the event and one kept for the status that ends the stream, so a client that stops
/// reading can still be told why it was let go (it reads the status after what it left
/// unread). The build never waits on this: it appends to its log and moves on.
async fn send_or_stall(
    tx: &mpsc::Sender<Result<proto::BuildEvent, Status>>,
    stall: Duration,
    event: proto::BuildEvent,
) -> Sent {
    match tokio::time::timeout(stall, tx.reserve_many(2)).await {
        Ok(Ok(mut permits)) => {
            // `reserve_many(2)` yields exactly two permits.
            if let Some(permit) = permits.next() {
                permit.send(Ok(event));
            }
            Sent::Yes
        }
        Ok(Err(_)) => Sent::Gone,
        Err(_) => {
            let status = Error::ResourceExhausted(format!(
                "client did not read events for {}s; the build goes on without this stream: \
                 read the stream continuously (or request again to replay the build's events \
                 from the start)",
                stall.as_secs_f32()
            ));
            // The free slot kept above takes it; if the client closed meanwhile, no one cares.
            let _ = tx.try_send(Err(status.into_status()));
            Sent::Stalled
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::BuildEvent, Status>> + Send>>;

#[tonic::async_trait]
impl ImageBuilder for Service {
    type BuildStream = EventStream;

    async fn build(
        &self,
        request: Request<proto::BuildRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let started = Instant::now();
        let peer = self.authorize(&request, "Build")?;
        let stream_permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Error::ResourceExhausted(format!(
                "max_streams: {MAX_STREAMS} build streams are open; retry when some have ended"
            ))
            .into_status()
        })?;
        let (uid, pid) = (peer.uid, peer.pid);
        let plan = plan_as(
            &peer,
            request.into_inner(),
            self.shared.base_mirror().map(str::to_owned),
        )
        .await
        .inspect_err(|err| {
            tracing::info!(?uid, ?pid, code = err.code_name(), error = %err, "build rejected");
        })?;
        let key = Key {
            tag: plan.tag.as_str().to_owned(),
            definition: definition_key(&plan, &peer),
            force: plan.force_image_build,
            background: false,
        };
        if let Some(keep_warm) = &self.keep_warm {
            keep_warm.served(&plan, &peer, &key);
        }
        let shared = self.shared.clone();
        let tag = plan.tag.as_str().to_owned();
        let (mut subscription, joined) = self
            .builds
            .submit(key, move |reporter| {
                pipeline::run(shared, plan, peer, reporter)
            })
            .await?;
        let build_id = subscription.flight().id.clone();
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let mut abort = self.abort.clone();
        let (builds, stall) = (self.builds.clone(), self.stall_timeout);
        tokio::spawn(async move {
            let _stream_permit = stream_permit;
            let accepted = proto::build_event::Event::Accepted(proto::Accepted {
                tag: tag.clone(),
                joined,
            });
            let first = proto::BuildEvent {
                build_id: build_id.clone(),
                event: Some(accepted),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            let outcome = loop {
                let next = tokio::select! {
                    next = subscription.next() => next,
                    // Noticed even while the build is quiet, so the subscriber count is true.
                    () = tx.closed() => break "client went away".to_owned(),
                    () = async {
                        // A dropped sender (shutdown finished without giving up) never aborts.
                        if abort.wait_for(|aborted| *aborted).await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    } => {
                        let gone = Error::Unavailable("daemon shutting down; retry once it is back".into());
                        let _ = tx.send(Err(gone.into_status())).await;
                        break "aborted".to_owned();
                    }
                };
                match next {
                    Some(Ok(event)) => {
                        let summary = match &event {
                            Event::Completed(c) => Some(format!(
                                "completed cached={} reason={:?}",
                                c.cached, c.reason
                            )),
                            _ => None,
                        };
                        match send_or_stall(&tx, stall, proto::event_to_wire(&build_id, &event))
                            .await
                        {
                            Sent::Yes => {}
                            Sent::Gone => break "client went away".to_owned(),
                            Sent::Stalled => {
                                builds
                                    .stats
                                    .slow_clients_dropped
                                    .fetch_add(1, Ordering::Relaxed);
                                break format!("client did not read for {stall:?}");
                            }
                        }
                        if let Some(summary) = summary {
                            break summary;
                        }
                    }
                    Some(Err(err)) => {
                        let code = err.code_name();
                        let _ = tx.send(Err(err.into_status())).await;
                        break format!("failed {code}");
                    }
                    None => break "ended".to_owned(),
                }
            };
            tracing::info!(
                ?uid, ?pid, %tag, %build_id, joined, %outcome,
                duration_ms = started.elapsed().as_millis() as u64, "build request"
            );
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resolve(
        &self,
        request: Request<proto::BuildRequest>,
    ) -> Result<Response<proto::BuildPlan>, Status> {
        let peer = self.authorize(&request, "Resolve")?;
        let plan = plan_as(
            &peer,
            request.into_inner(),
            self.shared.base_mirror().map(str::to_owned),
        )
        .await;
        tracing::info!(
            uid = peer.uid,
            tag = plan.as_ref().map(|p| p.tag.as_str()).unwrap_or(""),
            ok = plan.is_ok(),
            "resolve request"
        );
        Ok(Response::new(proto::BuildPlan::from(&plan?)))
    }

    async fn list_builds(
        &self,
        request: Request<proto::ListBuildsRequest>,
    ) -> Result<Response<proto::ListBuildsResponse>, Status> {
        self.authorize(&request, "ListBuilds")?;
        let (in_flight, recent) = self.builds.list();
        Ok(Response::new(proto::ListBuildsResponse {
            in_flight: in_flight.iter().map(Into::into).collect(),
            recent: recent.iter().map(Into::into).collect(),
        }))
    }

    async fn prune(
        &self,
        request: Request<proto::PruneRequest>,
    ) -> Result<Response<proto::PruneResponse>, Status> {
        let peer = self.authorize(&request, "Prune")?;
        let request = request.into_inner();
        let policy = prune::Policy {
            older_than: (request.older_than_seconds > 0)
                .then(|| Duration::from_secs(request.older_than_seconds)),
            keep_bytes: (request.keep_storage_bytes > 0).then_some(request.keep_storage_bytes),
            dry_run: request.dry_run,
            // A build in flight may be reading an extracted layer.
            keep_layers: self.builds.in_flight() > 0,
        };
        let answered = self.shared.retire().recent_answers();
        let report = prune::prune(self.shared.engine(), &self.cache_dir, policy, &answered).await?;
        tracing::info!(
            uid = peer.uid,
            images = report.images.len(),
            layers = report.layers.len(),
            bytes = report.bytes,
            dry_run = request.dry_run,
            "prune request"
        );
        Ok(Response::new(proto::PruneResponse {
            images_removed: report.images,
            layers_removed: report.layers,
            bytes_freed: report.bytes,
        }))
    }

    async fn get_info(
        &self,
        request: Request<proto::GetInfoRequest>,
    ) -> Result<Response<proto::GetInfoResponse>, Status> {
        self.authorize(&request, "GetInfo")?;
        let engine = self.shared.engine();
        let mut engine_info = proto::EngineInfo {
            host: engine.host().to_owned(),
            ..Default::default()
        };
        match tokio::time::timeout(Duration::from_secs(5), engine.version()).await {
            Ok(Ok(version)) => {
                engine_info.reachable = true;
                engine_info.distribution_api = !crate::engine::is_podman(&version.name);
                engine_info.name = version.name;
                engine_info.version = version.version;
                engine_info.api_version = version.api_version;
                let local = engine.is_local(&version.arch);
                let binfmt = std::path::Path::new(crate::engine::BINFMT_MISC_DIR);
                // A few small procfs reads: off the async workers all the same.
                let native = version.arch;
                let archs = tokio::task::spawn_blocking(move || {
                    crate::engine::runnable_architectures(&native, local, binfmt)
                })
                .await
                .unwrap_or_default();
                engine_info.architectures = archs.iter().map(|a| a.as_str().to_owned()).collect();
                if let Ok(store) = engine.image_store().await {
                    engine_info.image_store = store.as_str().to_owned();
                }
            }
            Ok(Err(err)) => engine_info.error = err.to_string(),
            Err(_) => engine_info.error = "the engine did not answer within 5 s".into(),
        }
        let mut rie = Vec::new();
        for arch in [Arch::X86_64, Arch::Arm64] {
            let path = self.shared.rie_path(arch);
            let cache = self.shared.stat_cache().clone();
            let probe = path.clone();
            let digest = tokio::task::spawn_blocking(move || cache.file_digest(&probe))
                .await
                .ok()
                .and_then(Result::ok);
            rie.push(proto::RieInfo {
                architecture: arch.as_str().into(),
                path: path.display().to_string(),
                sha256: digest.map(hex::encode).unwrap_or_default(),
                present: digest.is_some(),
            });
        }
        let cache_dir = self.cache_dir.clone();
        let cache_bytes = tokio::task::spawn_blocking(move || prune::dir_size(&cache_dir))
            .await
            .unwrap_or(0);
        let limits = self.shared.limits();
        Ok(Response::new(proto::GetInfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            engine: Some(engine_info),
            socket_path: self.socket.display().to_string(),
            cache_dir: self.cache_dir.display().to_string(),
            cache_bytes,
            rie,
            capabilities: [
                "build",
                "resolve",
                "list_builds",
                "dedup",
                "fingerprint",
                "streamed_context",
            ]
            .map(String::from)
            .to_vec(),
            limits: [
                ("max_layers", resolve::MAX_LAYERS.to_string()),
                ("max_layer_entries", limits.max_entries.to_string()),
                ("max_layer_bytes", limits.max_bytes.to_string()),
                (
                    "build_timeout_s",
                    self.shared.build_timeout().as_secs().to_string(),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            stats: Some(self.stats()),
            keep_warm: self.keep_warm.as_ref().map(|keep_warm| keep_warm.info()),
        }))
    }
}

impl Service {
    fn stats(&self) -> proto::Stats {
        use std::sync::atomic::Ordering::Relaxed;
        let counters = &self.builds.stats;
        let cache = self.shared.stat_cache();
        proto::Stats {
            requests: counters.requests.load(Relaxed),
            joined: counters.joined.load(Relaxed),
            cache_hits: counters.cache_hits.load(Relaxed),
            engine_builds: counters.engine_builds.load(Relaxed),
            failures: counters.failures.load(Relaxed),
            files_hashed: cache.files_hashed.load(Relaxed),
            bytes_hashed: cache.bytes_hashed.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layer paths are checked here, not in `resolve`: the first missing one is
    /// NOT_FOUND naming its index and path; an existing one (a dangling link too: the walk
    /// reports it) passes.
    #[test]
    fn missing_layer_paths_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("dangling");
        std::os::unix::fs::symlink("/nonexistent/target", &link).unwrap();
        let spec = |name: &str, path: PathBuf| resolve::LayerSpec {
            name: name.into(),
            path,
        };
        let mut layers = vec![
            spec("a", dir.path().to_owned()),
            spec("b", link),
            spec("c", dir.path().join("missing")),
        ];
        let err = layer_paths_exist(&layers).unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
        assert_eq!(
            err.to_string(),
            format!(
                "layers[2].path: {}/missing does not exist",
                dir.path().display()
            )
        );
        layers.pop();
        assert!(layer_paths_exist(&layers).is_ok());
    }
}
