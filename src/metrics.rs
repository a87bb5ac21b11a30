//! What an operator of a fleet watches: counters, gauges and latency histograms, served as
//! Prometheus text on an opt-in HTTP listener (`--metrics-listen 127.0.0.1:PORT`,
//! `GET /metrics`).
//!
//! The exposition format is written by `prometheus-client`, the Prometheus project's own Rust
//! client (OpenMetrics text, which Prometheus scrapes natively): escaping, `_total` suffixes,
//! cumulative histogram buckets and `# EOF` are its business, not ours. Every series is an
//! atomic updated where the outcome is known (`builds.rs` for requests, outcomes and the
//! queue, `pipeline.rs` for bytes sent); a scrape only reads them.
//!
//! The listener is plain HTTP/1.1 (hyper, already in the tree through tonic) and answers only
//! `GET /metrics`; it carries no secrets, but bind it to loopback or a trusted network.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::outcome::{Completed, Reason};

/// Content type of the OpenMetrics text `prometheus-client` writes.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A scrape's request must arrive within this; a stalled client is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed accept (EMFILE and the like), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Labels of `lambda_imaged_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// `"true"` when the request attached to a build already in flight for its tag.
    joined: &'static str,
}

/// Labels of `lambda_imaged_builds_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    /// Why a build ran (`missing`, `layer_changed`, ...), `up_to_date` for a cache hit, or
    /// `undecided` when it failed before the cache check.
    reason: &'static str,
    /// `completed` or `failed`.
    outcome: &'static str,
}

/// Every series the daemon exports. Cheap to update from any task (atomics); one per daemon,
/// shared through the in-flight table (`Builds::metrics`).
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    builds: Family<BuildLabels, Counter>,
    cache_hits: Counter,
    /// Images found in the registry cache (`--registry-cache`) instead of built.
    pub registry_hits: Counter,
    /// Registry cache lookups that found no image, so the daemon built it.
    pub registry_misses: Counter,
    /// Pushes to the registry cache that failed (a warning, never a failed build).
    pub registry_push_failures: Counter,
    /// Images under our cache tag that were not what the request builds (refused, removed,
    /// built locally; `registry_cache.rs`, `difference`).
    pub registry_mismatches: Counter,
    /// Pushes not queued because the push backlog was full (`MAX_PUSH_BACKLOG`).
    pub registry_pushes_dropped: Counter,
    build_seconds: Histogram,
    hit_seconds: Histogram,
    engine_bytes_sent: Counter,
    /// Entries in the in-flight table: raised when one is inserted, lowered when it leaves.
    pub in_flight: Gauge,
    /// Builds waiting for a parallel-build slot: raised when one starts waiting, lowered when
    /// it gets its slot (or the daemon shuts down).
    pub queue_depth: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Every series at zero, registered under the `lambda_imaged_` prefix.
    pub fn new() -> Metrics {
        // Engine builds take from well under a second (a small delta layer) to many minutes
        // (15 min is the default build timeout): 0.1 s .. ~27 min, doubling.
        let build_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.1, 2.0, 15),
        );
        // A cache hit is a walk of the layers plus one engine inspect: 1 ms .. ~16 s.
        let hit_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        );
        let mut metrics = Metrics {
            registry: Registry::with_prefix("lambda_imaged"),
            requests: Family::default(),
            builds: Family::default(),
            cache_hits: Counter::default(),
            registry_hits: Counter::default(),
            registry_misses: Counter::default(),
            registry_push_failures: Counter::default(),
            registry_mismatches: Counter::default(),
            registry_pushes_dropped: Counter::default(),
            build_seconds,
            hit_seconds,
            engine_bytes_sent: Counter::default(),
            in_flight: Gauge::default(),
            queue_depth: Gauge::default(),
        };
        let registry = &mut metrics.registry;
        registry.register(
            "requests",
            "Build requests accepted, by whether they joined a build already in flight",
            metrics.requests.clone(),
        );
        registry.register(
            "builds",
            "Finished builds and cache checks, by reason (up_to_date = cache hit) and outcome",
            metrics.builds.clone(),
        );
        registry.register(
            "cache_hits",
            "Requests answered by an image already in the engine",
            metrics.cache_hits.clone(),
        );
        registry.register(
            "registry_cache_hits",
            "Images pulled from the registry cache instead of built",
            metrics.registry_hits.clone(),
        );
        registry.register(
            "registry_cache_misses",
            "Registry cache lookups that found nothing",
            metrics.registry_misses.clone(),
        );
        registry.register(
            "registry_cache_push_failures",
            "Pushes to the registry cache that failed",
            metrics.registry_push_failures.clone(),
        );
        registry.register(
            "registry_cache_mismatches",
            "Images under the registry cache's tag refused: not what the request builds",
            metrics.registry_mismatches.clone(),
        );
        registry.register(
            "registry_cache_pushes_dropped",
            "Pushes to the registry cache not made because the push backlog was full",
            metrics.registry_pushes_dropped.clone(),
        );
        registry.register(
            "build_duration_seconds",
            "Time from request to a built image, for builds that ran in the engine",
            metrics.build_seconds.clone(),
        );
        registry.register(
            "hit_duration_seconds",
            "Time from request to answer, for cache hits",
            metrics.hit_seconds.clone(),
        );
        registry.register(
            "engine_bytes_sent",
            "Bytes of image archives streamed to the engine's loader",
            metrics.engine_bytes_sent.clone(),
        );
        registry.register(
            "builds_in_flight",
            "Builds and cache checks in progress (one per tag)",
            metrics.in_flight.clone(),
        );
        registry.register(
            "build_queue_depth",
            "Builds waiting for a parallel-build slot (--max-parallel-builds)",
            metrics.queue_depth.clone(),
        );
        metrics
    }

    /// One accepted Build request; `joined` when it attached to a build in flight.
    pub fn request(&self, joined: bool) {
        let joined = if joined { "true" } else { "false" };
        self.requests.get_or_create(&RequestLabels { joined }).inc();
    }

    /// A build (or cache check) ended: counts it by reason and outcome and records its
    /// latency in the build or hit histogram. A failure records no latency.
    pub fn finished(&self, outcome: Result<&Completed, ()>) {
        let (reason, outcome) = match outcome {
            Ok(completed) => {
                let seconds = Duration::from_millis(completed.duration_ms).as_secs_f64();
                if completed.cached {
                    self.cache_hits.inc();
                    self.hit_seconds.observe(seconds);
                } else {
                    self.build_seconds.observe(seconds);
                }
                (Reason::name(completed.reason), "completed")
            }
            Err(()) => ("undecided", "failed"),
        };
        self.builds
            .get_or_create(&BuildLabels { reason, outcome })
            .inc();
    }

    /// Bytes of one image archive streamed to the engine.
    pub fn bytes_sent(&self, bytes: u64) {
        self.engine_bytes_sent.inc_by(bytes);
    }

    /// Every series as OpenMetrics text.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail; the encoder only forwards fmt::Write errors.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
#[error(
    "metrics_listen = \"{addr}\": cannot listen: {source}; pick a free port or leave \
     --metrics-listen unset"
)]
pub struct BindError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why binding failed (in use, not a local address, no permission).
    pub source: std::io::Error,
}

/// Binds `addr` for [`serve`]; a refused bind is a startup error naming the address.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { addr, source })
}

/// Answers scrapes on `listener` until the task is dropped: `GET /metrics` gets the text,
/// any other path 404, any other method 405. One task per connection; a connection that does
/// not send its request within `HEADER_TIMEOUT` is closed.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of descriptors and the like: log, back off a little (so this loop does
                // not spin while the condition lasts), then keep serving.
                tracing::warn!(error = %err, "metrics listener: accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<_>| {
                let response = answer(&request, &metrics);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(err) = http.serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %err, "metrics connection ended");
            }
        });
    }
}

fn answer<B>(request: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, CONTENT_TYPE, metrics.render()),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hit and a build land in their own histograms and in the reason/outcome counter.
    #[test]
    fn outcomes_are_counted_by_reason_and_latency_kind() {
        let metrics = Metrics::new();
        let completed = |cached, reason| Completed {
            tag: "t:latest".into(),
            image_id: "sha256:0".into(),
            cached,
            reason,
            changed_layer: String::new(),
            duration_ms: 1500,
            config: Default::default(),
            warnings: Vec::new(),
            pinned_tag: String::new(),
        };
        metrics.request(false);
        metrics.finished(Ok(&completed(false, Reason::Missing)));
        metrics.finished(Ok(&completed(true, Reason::UpToDate)));
        metrics.finished(Err(()));
        metrics.bytes_sent(42);
        let text = metrics.render();
        for line in [
            "lambda_imaged_requests_total{joined=\"false\"} 1",
            "lambda_imaged_builds_total{reason=\"missing\",outcome=\"completed\"} 1",
            "lambda_imaged_builds_total{reason=\"up_to_date\",outcome=\"completed\"} 1",
            "lambda_imaged_builds_total{reason=\"undecided\",outcome=\"failed\"} 1",
            "lambda_imaged_cache_hits_total 1",
            "lambda_imaged_build_duration_seconds_count 1",
            "lambda_imaged_build_duration_seconds_sum 1.5",
            "lambda_imaged_hit_duration_seconds_count 1",
            "lambda_imaged_engine_bytes_sent_total 42",
            "lambda_imaged_registry_cache_hits_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
