//! Serves the API, health and reflection on a listener until shutdown, then drains builds.

/// The in-flight table a [`Daemon`] shares with its service, for tests and embedders that
/// watch builds in process (`Daemon::builds`): what is running, who waits, each build's
/// events.
pub use crate::builds::{Builds, MAX_EVENTS, MAX_LOG_BYTES, Summary as BuildSummary};
/// The events and phases of a build, as [`Builds`] reports them.
pub use crate::outcome::{Event as BuildLogEvent, Phase};
/// The daemon's background work, awaited at shutdown (`Daemon::tasks`).
pub use crate::tasks::Tasks;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;

use crate::config::Config;
use crate::engine::Engine;
use crate::h2_compat::TolerantAuthority;
use crate::listener::Listener;
use crate::pipeline::Shared;
use crate::proto::{self, image_builder_server::ImageBuilderServer};
use crate::service::Service;
use crate::stat_cache::StatCache;

/// HTTP/2 streams one client connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// After every build ended at shutdown, how long streams may take to deliver their outcome.
const STREAM_GRACE: Duration = Duration::from_secs(10);
/// How often a changed stat cache is saved.
const STAT_CACHE_SAVE_EVERY: Duration = Duration::from_secs(10);
/// How often the stat cache forgets files that no longer exist (`StatCache::forget_missing`):
/// rarely, since it costs one `lstat` per entry.
const STAT_CACHE_SWEEP_EVERY: Duration = Duration::from_secs(60 * 60);

/// The daemon's parts, built from a config; tests keep a handle to inspect the table.
pub struct Daemon {
    pub config: Config,
    pub engine: Arc<Engine>,
    pub builds: Arc<Builds>,
    pub shared: Arc<Shared>,
    /// The metrics listener once [`Daemon::bind_metrics`] bound it.
    metrics_listener: Option<tokio::net::TcpListener>,
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving gRPC failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("building the reflection service failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// `--metrics-listen` could not be bound (the message names the address).
    #[error(transparent)]
    Metrics(#[from] crate::metrics::BindError),
}

impl Daemon {
    /// Creates the engine handle, the build table and the shared build state. No I/O.
    pub fn new(config: Config) -> Daemon {
        let engine = Engine::new(
            config.engine_host.clone(),
            config.engine_tls.clone(),
            config.build_timeout,
        );
        let builds = Builds::new(config.max_parallel_builds);
        let shared = Arc::new(Shared::new(&config, engine.clone()));
        Daemon {
            config,
            engine,
            builds,
            shared,
            metrics_listener: None,
        }
    }

    /// The daemon's background tasks: what runs, and what the drain at shutdown cut off.
    pub fn tasks(&self) -> Tasks {
        self.shared.tasks().clone()
    }

    /// What the daemon answered and the superseded images it has yet to remove (`retire.rs`).
    pub fn retirements(&self) -> Arc<crate::retire::Retirements> {
        self.shared.retire().clone()
    }

    /// Binds `--metrics-listen` now (else [`Daemon::serve`] does), returning the address
    /// actually bound (`None` when metrics are off): with port 0 the caller learns the port.
    pub async fn bind_metrics(
        &mut self,
    ) -> Result<Option<std::net::SocketAddr>, crate::metrics::BindError> {
        let Some(addr) = self.config.metrics_listen else {
            return Ok(None);
        };
        if self.metrics_listener.is_none() {
            self.metrics_listener = Some(crate::metrics::bind(addr).await?);
        }
        let bound = self
            .metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok());
        Ok(bound.or(Some(addr)))
    }

    /// Serves on `listener` until `shutdown` resolves; then refuses new builds, lets those in
    /// flight finish (up to the shutdown timeout), ends the remaining streams with
    /// UNAVAILABLE and returns.
    pub async fn serve(
        mut self,
        listener: Listener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let socket_gid = self.config.socket_gid.or_else(|| listener.socket_gid());
        let Listener {
            listener,
            path,
            guard,
        } = listener;
        // Bound first: a port in use is a startup error, before anything is announced.
        let metrics_listener = match (self.metrics_listener.take(), self.config.metrics_listen) {
            (Some(bound), _) => Some(bound),
            (None, Some(addr)) => Some(crate::metrics::bind(addr).await?),
            (None, None) => None,
        };
        let stat_cache_path = self.shared.stat_cache_path();
        let mut background = Background::default();
        if let Some(metrics_listener) = metrics_listener {
            tracing::info!(addr = ?metrics_listener.local_addr().ok(), "serving metrics at /metrics");
            background.spawn(crate::metrics::serve(
                metrics_listener,
                self.builds.metrics().clone(),
            ));
        }
        background.spawn(self.engine.clone().watch());
        background.spawn(
            self.shared
                .retire()
                .clone()
                .run(self.engine.clone(), self.shared.cache_dir().to_owned()),
        );
        background.spawn(save_stat_cache_every(
            self.shared.stat_cache().clone(),
            stat_cache_path.clone(),
        ));
        background.spawn(report_builds_in_flight(self.builds.clone()));
        let (health, health_service) = tonic_health::server::health_reporter();
        background.spawn(report_engine_health(health, self.engine.health()));

        let (abort_tx, abort_rx) = watch::channel(false);
        let service = Service::new(
            &self.config,
            (&path, socket_gid),
            self.shared.clone(),
            self.builds.clone(),
            abort_rx,
        );
        let router = routes(service, health_service)?;
        let drained = drain(
            shutdown,
            self.builds.clone(),
            self.shared.tasks().clone(),
            self.config.shutdown_timeout,
            abort_tx,
        );
        tracing::info!(socket = %path.display(), engine = %self.engine.host(), "serving");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        // Every connection through `TolerantAuthority`, so clients that send the socket path
        // as `:authority` (grpcio, grpc-java) are served rather than reset by h2; at most
        // `max_connections_per_uid` per peer uid, and accept errors back off (listener.rs).
        let incoming = crate::listener::accept(listener, self.config.max_connections_per_uid)
            .map(|accepted| accepted.map(TolerantAuthority::new));
        let result = router.serve_with_incoming_shutdown(incoming, drained).await;

        drop(background);
        save_stat_cache(self.shared.stat_cache().clone(), stat_cache_path).await;
        drop(guard);
        result.map_err(ServeError::from)
    }
}

/// The tasks that run while the daemon serves; all aborted when this is dropped, so none
/// outlives `serve`, whether it returns normally or early with an error.
#[derive(Default)]
struct Background(Vec<JoinHandle<()>>);

impl Background {
    fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.0.push(tokio::spawn(task));
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The API, health and reflection (v1 and v1alpha, for grpcurl and older clients), on one
/// HTTP/2 server with our limits.
fn routes(service: Service, health: HealthServer<impl Health>) -> Result<Router, ServeError> {
    let descriptors = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = descriptors().build_v1()?;
    let reflection_v1alpha = descriptors().build_v1alpha()?;
    Ok(tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // Streams per connection: further ones wait for the client's HTTP/2 flow control.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        // Above our own 1 MiB limit (RESOURCE_EXHAUSTED, service.rs) but bounded.
        .add_service(ImageBuilderServer::new(service).max_decoding_message_size(8 << 20))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha))
}

/// Waits for `shutdown`, then for the builds in flight (up to `timeout`), and ends the streams
/// left: at once when builds were cut off, after [`STREAM_GRACE`] otherwise, so shutdown
/// cannot hang on a client that stopped reading.
async fn drain(
    shutdown: impl Future<Output = ()>,
    builds: Arc<Builds>,
    tasks: Tasks,
    timeout: Duration,
    abort: watch::Sender<bool>,
) {
    shutdown.await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        in_flight = builds.in_flight(),
        "shutting down: waiting for builds in flight"
    );
    let deadline = tokio::time::Instant::now() + timeout;
    let left = builds.drain(timeout).await;
    // Then the background work the builds started (pushes, removals, records), within the
    // same --shutdown-timeout; what is cut off is logged by name (tasks.rs).
    let running = tasks.running();
    if !running.is_empty() {
        tracing::info!(
            tasks = running.len(),
            "shutting down: waiting for background tasks"
        );
    }
    tasks
        .drain(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    if left > 0 {
        tracing::warn!(
            left,
            "shutdown timeout passed; ending the remaining streams"
        );
        abort.send_replace(true);
    } else {
        // Every build ended: give their streams a grace period to deliver the outcome, then
        // end any stream whose client stopped reading. Not held by `Background`: it must
        // still fire while the server waits for those streams.
        tokio::spawn(async move {
            tokio::time::sleep(STREAM_GRACE).await;
            abort.send_replace(true);
        });
    }
}

/// Saves a changed stat cache every [`STAT_CACHE_SAVE_EVERY`], and first, every
/// [`STAT_CACHE_SWEEP_EVERY`], forgets the files that no longer exist.
async fn save_stat_cache_every(cache: Arc<StatCache>, path: PathBuf) {
    let mut every = tokio::time::interval(STAT_CACHE_SAVE_EVERY);
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        every.tick().await;
        if last_sweep.elapsed() >= STAT_CACHE_SWEEP_EVERY {
            last_sweep = tokio::time::Instant::now();
            let swept = cache.clone();
            if let Ok(dropped) = tokio::task::spawn_blocking(move || swept.forget_missing()).await
                && dropped > 0
            {
                tracing::info!(dropped, "stat cache: forgot files that no longer exist");
            }
        }
        save_stat_cache(cache.clone(), path.clone()).await;
    }
}

/// Saves the stat cache if it changed, on the blocking pool; a failure is logged (the cache
/// is only an optimisation).
async fn save_stat_cache(cache: Arc<StatCache>, path: PathBuf) {
    let saved = tokio::task::spawn_blocking(move || cache.save_if_dirty(&path)).await;
    if let Ok(Err(err)) = saved {
        tracing::warn!(error = %err, "saving the stat cache failed");
    }
}

/// Mirrors the engine's reachability into the health service (overall and for the API).
async fn report_engine_health(health: HealthReporter, mut engine_health: watch::Receiver<bool>) {
    loop {
        let status = if *engine_health.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status("", status).await;
        health
            .set_service_status("lambda_imaged.v1.ImageBuilder", status)
            .await;
        if engine_health.changed().await.is_err() {
            return;
        }
    }
}

/// STATUS= for `systemctl status`: builds in flight, refreshed while serving.
async fn report_builds_in_flight(builds: Arc<Builds>) {
    let mut every = tokio::time::interval(Duration::from_secs(5));
    let mut last = usize::MAX;
    loop {
        every.tick().await;
        let now = builds.in_flight();
        if now != last {
            let status = format!("{now} builds in flight");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
            last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropping the guard aborts its tasks (here one that would otherwise never end).
    #[tokio::test]
    async fn background_tasks_end_with_their_guard() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let mut background = Background::default();
        background.spawn(async move {
            let _held_until_aborted = tx;
            std::future::pending::<()>().await;
        });
        drop(background);
        let ended = tokio::time::timeout(Duration::from_secs(60), rx).await;
        assert!(
            matches!(ended, Ok(Err(_))),
            "the task was aborted and dropped its sender"
        );
    }
}
