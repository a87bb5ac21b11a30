//! Serves the API, health and reflection on a listener until shutdown, then drains builds.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic_health::ServingStatus;

use crate::archive::ZipStore;
use crate::builds::Builds;
use crate::config::Config;
use crate::engine::Engine;
use crate::listener::Listener;
use crate::pipeline::{MAX_TAG_HINTS, Shared, TagHints};
use crate::proto::{self, image_builder_server::ImageBuilderServer};
use crate::service::Service;
use crate::stat_cache::StatCache;

/// Where the stat cache is persisted, under the cache dir.
const STAT_CACHE_FILE: &str = "statcache.v1.json";
/// HTTP/2 streams one client connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// After every build ended at shutdown, how long streams may take to deliver their outcome.
const STREAM_GRACE: Duration = Duration::from_secs(10);
/// How often a changed stat cache is saved.
const STAT_CACHE_SAVE_EVERY: Duration = Duration::from_secs(10);

/// The daemon's parts, built from a config; tests keep a handle to inspect the table.
pub struct Daemon {
    pub config: Config,
    pub engine: Arc<Engine>,
    pub builds: Arc<Builds>,
    pub shared: Arc<Shared>,
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving gRPC failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("building the reflection service failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

impl Daemon {
    /// Creates the engine handle, the build table and the shared build state. No I/O.
    pub fn new(config: Config) -> Daemon {
        let engine = Engine::new(config.engine_host.clone(), config.build_timeout);
        let builds = Builds::new(config.max_parallel_builds);
        let shared = Arc::new(Shared {
            engine: engine.clone(),
            stat_cache: Arc::new(StatCache::load(&config.cache_dir.join(STAT_CACHE_FILE))),
            zips: Arc::new(ZipStore::open(
                config.cache_dir.join("layers"),
                config.zip_limits,
            )),
            rie_dir: config.rie_dir.clone(),
            limits: config.limits,
            build_timeout: config.build_timeout,
            cache_dir: config.cache_dir.clone(),
            max_cache_bytes: config.max_cache_bytes,
            last_recorded: TagHints::new(MAX_TAG_HINTS),
            hooks: config.hooks.clone(),
            walks: tokio::sync::Semaphore::new(config.max_parallel_builds.max(2)),
            walk_sizes: TagHints::new(MAX_TAG_HINTS),
        });
        Daemon {
            config,
            engine,
            builds,
            shared,
        }
    }

    /// Serves on `listener` until `shutdown` resolves; then refuses new builds, lets those in
    /// flight finish (up to the shutdown timeout), ends the remaining streams with
    /// UNAVAILABLE and returns.
    pub async fn serve(
        self,
        listener: Listener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let Listener {
            listener,
            path,
            guard,
        } = listener;
        let watcher = tokio::spawn(self.engine.clone().watch());
        let stat_cache_path = self.config.cache_dir.join(STAT_CACHE_FILE);
        let saver = {
            let (cache, path) = (self.shared.stat_cache.clone(), stat_cache_path.clone());
            tokio::spawn(async move {
                let mut every = tokio::time::interval(STAT_CACHE_SAVE_EVERY);
                loop {
                    every.tick().await;
                    let (cache, path) = (cache.clone(), path.clone());
                    let saved =
                        tokio::task::spawn_blocking(move || cache.save_if_dirty(&path)).await;
                    if let Ok(Err(err)) = saved {
                        tracing::warn!(error = %err, "saving the stat cache failed");
                    }
                }
            })
        };

        let (health, health_service) = tonic_health::server::health_reporter();
        let mut engine_health = self.engine.health();
        let health_task = tokio::spawn(async move {
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
        });

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let (abort_tx, abort_rx) = watch::channel(false);
        let mut config = self.config.clone();
        config.socket = path.clone();
        if config.socket_gid.is_none() {
            // A socket systemd made (SocketGroup=): its group's members may use the daemon.
            use std::os::unix::fs::MetadataExt;
            config.socket_gid = std::fs::metadata(&path)
                .ok()
                .map(|m| m.gid())
                .filter(|g| *g != 0);
        }
        let service = Service::new(&config, self.shared.clone(), self.builds.clone(), abort_rx);
        let builds = self.builds.clone();
        let shutdown_timeout = self.config.shutdown_timeout;
        let drained = async move {
            shutdown.await;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
            tracing::info!(
                in_flight = builds.in_flight(),
                "shutting down: waiting for builds in flight"
            );
            let left = builds.drain(shutdown_timeout).await;
            if left > 0 {
                tracing::warn!(
                    left,
                    "shutdown timeout passed; ending the remaining streams"
                );
                abort_tx.send_replace(true);
            } else {
                // Every build ended: give their streams a grace period to deliver the outcome,
                // then end any stream whose client stopped reading, so shutdown cannot hang.
                tokio::spawn(async move {
                    tokio::time::sleep(STREAM_GRACE).await;
                    abort_tx.send_replace(true);
                });
            }
        };

        // STATUS= for `systemctl status`: builds in flight, refreshed while serving.
        let status_task = {
            let builds = self.builds.clone();
            tokio::spawn(async move {
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
            })
        };
        tracing::info!(socket = %path.display(), engine = %self.engine.host(), "serving");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // Streams per connection: further ones wait for the client's HTTP/2 flow control.
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            // Above our own 1 MiB limit (RESOURCE_EXHAUSTED, service.rs) but bounded.
            .add_service(ImageBuilderServer::new(service).max_decoding_message_size(8 << 20))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), drained)
            .await;
        watcher.abort();
        health_task.abort();
        saver.abort();
        status_task.abort();
        let cache = self.shared.stat_cache.clone();
        let saved =
            tokio::task::spawn_blocking(move || cache.save_if_dirty(&stat_cache_path)).await;
        if let Ok(Err(err)) = saved {
            tracing::warn!(error = %err, "saving the stat cache failed");
        }
        drop(guard);
        result.map_err(ServeError::from)
    }
}
