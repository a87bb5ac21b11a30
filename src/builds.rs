//! The in-flight table: at most one build per tag, every client gets the whole story.
//!
//! `DashMap<tag, Arc<InFlight>>`: the first request for a tag inserts an entry and drives the
//! build on a task of its own (never on a client's stream, so a client that goes away cancels
//! nothing). A later request with the same definition key attaches and replays the event log
//! from the start, then follows live events. A request for a tag being built from other
//! inputs (SAM's tags do not encode content) waits for that build to end and then starts its
//! own. The entry is removed when the build ends, so a request after a failure retries.
//!
//! Events live in the entry's log (a `Vec` behind a mutex) and a `watch` channel only says
//! "the log grew": a slow subscriber reads at its own pace and never stalls the build or the
//! other subscribers. The log is bounded ([`MAX_EVENTS`] events, [`MAX_LOG_BYTES`] bytes of
//! text, each log line cut to [`MAX_LINE_BYTES`]; successive progress of one pull layer is
//! coalesced), so a build that prints without end, followed by a client that never reads,
//! costs a fixed amount of memory.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::outcome::{Completed, Event, Phase};

/// Most events kept per build; further engine log lines and progress are dropped (one warning
/// says so).
pub const MAX_EVENTS: usize = 20_000;
/// Most bytes of event text (log lines, layer ids, warnings) kept per build; beyond it, like
/// [`MAX_EVENTS`], further log lines and progress are dropped.
pub const MAX_LOG_BYTES: usize = 8 << 20;
/// Longest log line kept, in bytes; a longer one is cut at a character boundary and ends in
/// "…".
pub const MAX_LINE_BYTES: usize = 8 << 10;
/// Finished builds kept for ListBuilds.
pub const HISTORY: usize = 100;

/// A build in progress (or just finished).
pub struct InFlight {
    pub id: String,
    pub tag: String,
    /// Identifies the inputs; only requests with the same key attach.
    key: String,
    /// Started by a `force_image_build` request.
    force: bool,
    /// Started by keep-warm (`keep_warm.rs`), not by a request.
    background: bool,
    pub started: SystemTime,
    state: Mutex<State>,
    grew: watch::Sender<usize>,
    subscribers: AtomicU32,
}

#[derive(Default)]
struct State {
    events: Vec<Event>,
    /// Text bytes held in `events` (see [`MAX_LOG_BYTES`]).
    bytes: usize,
    truncated: bool,
    phase: Option<Phase>,
    /// Set once, when the build ends.
    error: Option<Error>,
    finished: bool,
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, State> {
        // State holds plain data, consistent after any push; a poisoned lock is still usable.
        crate::sync::lock(&self.state)
    }

    /// Clients attached right now.
    pub fn subscribers(&self) -> u32 {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Where the build is.
    pub fn phase(&self) -> Phase {
        self.lock().phase.unwrap_or(Phase::Checking)
    }

    fn push(&self, mut event: Event) {
        let len = {
            let mut state = self.lock();
            // Progress of the layer last reported replaces that report: a pull prints many
            // per layer, and only the latest matters to a client that catches up.
            if let (
                Event::PullProgress { image, layer, .. },
                Some(Event::PullProgress {
                    image: last_image,
                    layer: last_layer,
                    ..
                }),
            ) = (&event, state.events.last())
                && image == last_image
                && layer == last_layer
            {
                let at = state.events.len() - 1;
                state.events[at] = event;
                let len = state.events.len();
                drop(state);
                self.grew.send_replace(len);
                return;
            }
            if let Event::Log { text, .. } = &mut event {
                cut_line(text);
            }
            let size = text_bytes(&event);
            let droppable = matches!(event, Event::Log { .. } | Event::PullProgress { .. });
            let full = state.events.len() >= MAX_EVENTS || state.bytes + size > MAX_LOG_BYTES;
            if full && droppable {
                if !state.truncated {
                    state.truncated = true;
                    state.events.push(Event::Warning {
                        code: "log_truncated".into(),
                        message: format!(
                            "more than {MAX_EVENTS} events or {} of text; further engine \
                             output is dropped",
                            bytesize::ByteSize::b(MAX_LOG_BYTES as u64)
                        ),
                    });
                }
                return;
            }
            state.bytes += size;
            state.events.push(event);
            state.events.len()
        };
        self.grew.send_replace(len);
    }

    fn finish(&self, outcome: &Result<Completed>) {
        {
            let mut state = self.lock();
            match outcome {
                Ok(completed) => {
                    let mut completed = completed.clone();
                    completed.warnings = state
                        .events
                        .iter()
                        .filter_map(|event| match event {
                            Event::Warning { code, message } => {
                                Some((code.clone(), message.clone()))
                            }
                            _ => None,
                        })
                        .collect();
                    state.events.push(Event::Completed(completed));
                    state.phase = Some(Phase::Succeeded);
                }
                Err(err) => {
                    state.error = Some(err.clone());
                    state.phase = Some(Phase::Failed);
                }
            }
            state.finished = true;
        }
        self.grew.send_modify(|len| *len += 1);
    }

    /// Waits until the build has ended.
    pub async fn finished(&self) {
        let mut rx = self.grew.subscribe();
        loop {
            if self.lock().finished {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Cuts `text` to [`MAX_LINE_BYTES`] at a character boundary, marking the cut.
fn cut_line(text: &mut String) {
    if text.len() > MAX_LINE_BYTES {
        let mut end = MAX_LINE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

/// The bytes of text an event holds (what [`MAX_LOG_BYTES`] counts).
fn text_bytes(event: &Event) -> usize {
    match event {
        Event::Log { text, .. } => text.len(),
        Event::PullProgress { image, layer, .. } => image.len() + layer.len(),
        Event::Warning { code, message } => code.len() + message.len(),
        Event::Queued { .. } | Event::ContextProgress { .. } | Event::Completed(_) => 0,
    }
}

/// One client's view of a build: every event from the start, then live ones, then the outcome.
pub struct Subscription {
    flight: Arc<InFlight>,
    next: usize,
    rx: watch::Receiver<usize>,
    done: bool,
}

impl Subscription {
    fn new(flight: Arc<InFlight>) -> Subscription {
        flight.subscribers.fetch_add(1, Ordering::Relaxed);
        let rx = flight.grew.subscribe();
        Subscription {
            flight,
            next: 0,
            rx,
            done: false,
        }
    }

    /// The build this follows.
    pub fn flight(&self) -> &Arc<InFlight> {
        &self.flight
    }

    /// The next event; `Some(Err)` once if the build failed; `None` after the end.
    pub async fn next(&mut self) -> Option<Result<Event>> {
        loop {
            if self.done {
                return None;
            }
            {
                let state = self.flight.lock();
                if let Some(event) = state.events.get(self.next) {
                    self.next += 1;
                    return Some(Ok(event.clone()));
                }
                if state.finished {
                    self.done = true;
                    return state.error.clone().map(Err);
                }
            }
            // The sender lives in `flight`, which we hold: this only fails if it is gone.
            if self.rx.changed().await.is_err() {
                self.done = true;
                return None;
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.flight.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a build driver uses to report and to wait for a slot.
pub struct Reporter {
    flight: Arc<InFlight>,
    builds: Arc<Builds>,
}

impl Reporter {
    /// Appends an event to the build's log.
    pub fn emit(&self, event: Event) {
        self.flight.push(event);
    }

    /// The daemon's Prometheus series, for what only the driver knows (bytes sent).
    pub fn metrics(&self) -> &Metrics {
        &self.builds.metrics
    }

    /// The table this build is in (for work that outlives the build, such as a push).
    pub fn builds(&self) -> &Arc<Builds> {
        &self.builds
    }

    /// The build id.
    pub fn build_id(&self) -> &str {
        &self.flight.id
    }

    /// Waits for a build slot (bounded parallelism), telling clients the queue position.
    pub async fn slot(&self) -> Result<OwnedSemaphorePermit> {
        self.builds
            .stats
            .engine_builds
            .fetch_add(1, Ordering::Relaxed);
        if let Ok(permit) = self.builds.slots.clone().try_acquire_owned() {
            self.flight.lock().phase = Some(Phase::Running);
            return Ok(permit);
        }
        let position = self.builds.waiting.fetch_add(1, Ordering::SeqCst) + 1;
        self.builds.metrics.queue_depth.inc();
        self.flight.lock().phase = Some(Phase::Queued);
        self.emit(Event::Queued {
            position: u32::try_from(position).unwrap_or(u32::MAX),
        });
        let permit = self.builds.slots.clone().acquire_owned().await;
        self.builds.waiting.fetch_sub(1, Ordering::SeqCst);
        self.builds.metrics.queue_depth.dec();
        let permit = permit.map_err(|_| Error::Unavailable("daemon shutting down".into()))?;
        self.flight.lock().phase = Some(Phase::Running);
        Ok(permit)
    }
}

/// A finished build, for ListBuilds.
#[derive(Debug, Clone)]
pub struct Summary {
    pub build_id: String,
    pub tag: String,
    pub started: SystemTime,
    pub finished: Option<SystemTime>,
    pub subscribers: u32,
    pub phase: Phase,
    pub image_id: String,
    pub error: String,
    /// A keep-warm rebuild (see [`Key::background`]).
    pub background: bool,
}

/// The table of builds in flight plus a short history.
pub struct Builds {
    table: DashMap<String, Arc<InFlight>>,
    history: Mutex<VecDeque<Summary>>,
    /// Background pushes to the registry cache in progress (listed with the builds in flight,
    /// under their registry reference; see `registry_cache.rs`). std Mutex: held for a push or
    /// a remove, never across an `.await`.
    pushes: Mutex<Vec<Summary>>,
    /// Bounds concurrent engine builds (distinct tags); checks and cache hits need no slot.
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    closing: watch::Sender<bool>,
    /// Counters for GetInfo.
    pub stats: Counters,
    /// The Prometheus series (`--metrics-listen`), updated where outcomes are known.
    metrics: Arc<Metrics>,
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub joined: AtomicU64,
    pub cache_hits: AtomicU64,
    pub engine_builds: AtomicU64,
    pub failures: AtomicU64,
    /// Build streams ended with RESOURCE_EXHAUSTED because their client stopped reading.
    pub slow_clients_dropped: AtomicU64,
}

/// How a request wants to be matched against builds in flight.
#[derive(Debug, Clone)]
pub struct Key {
    pub tag: String,
    /// Hash of everything the request names (base, Dockerfile, layer names and paths, ...).
    pub definition: String,
    pub force: bool,
    /// Started by keep-warm, not by a client: listed as such by ListBuilds. Joining does not
    /// look at it (a request joins a background rebuild of its image).
    pub background: bool,
}

impl Builds {
    /// A table allowing `max_parallel` engine builds at once.
    pub fn new(max_parallel: usize) -> Arc<Builds> {
        let (closing, _) = watch::channel(false);
        Arc::new(Builds {
            table: DashMap::new(),
            history: Mutex::new(VecDeque::new()),
            pushes: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(max_parallel.max(1))),
            waiting: AtomicUsize::new(0),
            closing,
            stats: Counters::default(),
            metrics: Arc::new(Metrics::new()),
        })
    }

    /// The daemon's Prometheus series: requests, outcomes, latencies and the queue are
    /// counted here; other parts (bytes sent, the registry cache) add theirs through it.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Attaches to the build of `key.tag` with the same inputs, or starts one with `driver`.
    /// Returns the subscription and whether it joined an existing build.
    pub async fn submit<F, Fut>(
        self: &Arc<Self>,
        key: Key,
        driver: F,
    ) -> Result<(Subscription, bool)>
    where
        F: FnOnce(Reporter) -> Fut,
        Fut: Future<Output = Result<Completed>> + Send + 'static,
    {
        let mut driver = Some(driver);
        loop {
            if *self.closing.borrow() {
                return Err(Error::Unavailable(
                    "daemon shutting down; retry once it is back".into(),
                ));
            }
            // Never hold the shard lock across an await: clone the Arc out first.
            let busy = match self.table.entry(key.tag.clone()) {
                MapEntry::Occupied(entry) => {
                    let flight = entry.get().clone();
                    let joinable = flight.key == key.definition
                        && (!key.force || flight.force || flight.phase() != Phase::Checking);
                    if joinable {
                        if !key.background {
                            self.stats.requests.fetch_add(1, Ordering::Relaxed);
                            self.stats.joined.fetch_add(1, Ordering::Relaxed);
                            self.metrics.request(true);
                        }
                        return Ok((Subscription::new(flight), true));
                    }
                    flight
                }
                MapEntry::Vacant(entry) => {
                    let (grew, _) = watch::channel(0);
                    let flight = Arc::new(InFlight {
                        id: uuid::Uuid::new_v4().to_string(),
                        tag: key.tag.clone(),
                        key: key.definition.clone(),
                        force: key.force,
                        background: key.background,
                        started: SystemTime::now(),
                        state: Mutex::new(State::default()),
                        grew,
                        subscribers: AtomicU32::new(0),
                    });
                    entry.insert(flight.clone());
                    // A keep-warm rebuild is no client's request (its engine build counts).
                    if !key.background {
                        self.stats.requests.fetch_add(1, Ordering::Relaxed);
                        self.metrics.request(false);
                    }
                    self.metrics.in_flight.inc();
                    // Subscribe before the driver can emit anything.
                    let subscription = Subscription::new(flight.clone());
                    let reporter = Reporter {
                        flight: flight.clone(),
                        builds: self.clone(),
                    };
                    // `driver` is taken exactly once: this arm returns.
                    let future = (driver.take().expect("driver used once"))(reporter);
                    let builds = self.clone();
                    tokio::spawn(async move {
                        // A panic in the driver must still end the build for everyone waiting.
                        let outcome = std::panic::AssertUnwindSafe(future)
                            .catch_unwind()
                            .await
                            .unwrap_or_else(|_| {
                                Err(Error::Internal(
                                    "the build failed unexpectedly (a bug in lambda-imaged; its \
                                     log has details); retry"
                                        .into(),
                                ))
                            });
                        if builds
                            .table
                            .remove_if(&flight.tag, |_, v| Arc::ptr_eq(v, &flight))
                            .is_some()
                        {
                            builds.metrics.in_flight.dec();
                        }
                        // Counted before the outcome is published: a scrape made after a
                        // client's answer includes it.
                        builds.metrics.finished(outcome.as_ref().map_err(|_| ()));
                        flight.finish(&outcome);
                        builds.record(&flight, &outcome);
                    });
                    return Ok((subscription, false));
                }
            };
            // Same tag, other inputs (or a forced rebuild behind a check): wait, then retry.
            busy.finished().await;
        }
    }

    fn record(&self, flight: &InFlight, outcome: &Result<Completed>) {
        match outcome {
            Ok(c) if c.cached => {
                self.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                return; // a cache hit is not a build
            }
            Ok(_) => {}
            Err(_) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        let summary = Summary {
            build_id: flight.id.clone(),
            tag: flight.tag.clone(),
            started: flight.started,
            finished: Some(SystemTime::now()),
            subscribers: flight.subscribers(),
            phase: flight.phase(),
            image_id: outcome
                .as_ref()
                .map(|c| c.image_id.clone())
                .unwrap_or_default(),
            error: outcome
                .as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
            background: flight.background,
        };
        let mut history = crate::sync::lock(&self.history);
        history.push_front(summary);
        history.truncate(HISTORY);
    }

    /// A background push of `reference` started: listed as running until
    /// [`Builds::push_finished`] with the returned id.
    pub fn push_started(&self, reference: &str) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let summary = Summary {
            build_id: id.clone(),
            tag: reference.to_owned(),
            started: SystemTime::now(),
            finished: None,
            subscribers: 0,
            phase: Phase::Running,
            image_id: String::new(),
            error: String::new(),
            background: false,
        };
        crate::sync::lock(&self.pushes).push(summary);
        id
    }

    /// The push `id` ended: pushed `Ok(image id)` or failed `Err(why)`; it moves to the history.
    pub fn push_finished(&self, id: &str, outcome: std::result::Result<String, String>) {
        let mut summary = {
            let mut pushes = crate::sync::lock(&self.pushes);
            let Some(at) = pushes.iter().position(|s| s.build_id == id) else {
                return;
            };
            pushes.remove(at)
        };
        summary.finished = Some(SystemTime::now());
        match outcome {
            Ok(image_id) => {
                summary.phase = Phase::Succeeded;
                summary.image_id = image_id;
            }
            Err(error) => {
                summary.phase = Phase::Failed;
                summary.error = error;
            }
        }
        let mut history = crate::sync::lock(&self.history);
        history.push_front(summary);
        history.truncate(HISTORY);
    }

    /// Builds in flight (oldest first) and recent finished ones (newest first); background
    /// pushes to the registry cache are among them, under their registry reference.
    pub fn list(&self) -> (Vec<Summary>, Vec<Summary>) {
        let mut in_flight: Vec<Summary> = self
            .table
            .iter()
            .map(|entry| {
                let flight = entry.value();
                Summary {
                    build_id: flight.id.clone(),
                    tag: flight.tag.clone(),
                    started: flight.started,
                    finished: None,
                    subscribers: flight.subscribers(),
                    phase: flight.phase(),
                    image_id: String::new(),
                    error: String::new(),
                    background: flight.background,
                }
            })
            .collect();
        in_flight.extend(crate::sync::lock(&self.pushes).iter().cloned());
        in_flight.sort_by_key(|s| s.started);
        let recent = crate::sync::lock(&self.history).iter().cloned().collect();
        (in_flight, recent)
    }

    /// The events so far of the build in flight for `tag` (for tests and diagnostics).
    pub fn events_of(&self, tag: &str) -> Option<Vec<Event>> {
        let flight = self.table.get(tag)?.value().clone();
        let events = flight.lock().events.clone();
        Some(events)
    }

    /// Number of entries in the table (0 once everything has ended).
    pub fn in_flight(&self) -> usize {
        self.table.len()
    }

    /// Refuses new builds from now on, then waits up to `timeout` for those in flight.
    /// Returns how many were still running when it gave up.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.closing.send_replace(true);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let flights: Vec<Arc<InFlight>> =
                self.table.iter().map(|e| e.value().clone()).collect();
            let Some(flight) = flights.into_iter().next() else {
                return 0;
            };
            if tokio::time::timeout_at(deadline, flight.finished())
                .await
                .is_err()
            {
                return self.table.len();
            }
            // `finished` fires just before the entry leaves the table; let the task remove it.
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::LogKind;

    fn flight() -> InFlight {
        InFlight {
            id: "b".into(),
            tag: "t".into(),
            key: "k".into(),
            force: false,
            background: false,
            started: SystemTime::now(),
            state: Mutex::new(State::default()),
            grew: watch::channel(0).0,
            subscribers: AtomicU32::new(0),
        }
    }

    /// Progress of one pull layer coalesces; long lines are cut; the text cap stops further
    /// output with one warning, while a warning or the outcome still gets in.
    #[test]
    fn the_event_log_is_bounded() {
        let flight = flight();
        for current in 0..1000 {
            flight.push(Event::PullProgress {
                image: "i".into(),
                layer: "l".into(),
                current,
                total: 1000,
            });
        }
        assert_eq!(
            flight.lock().events.len(),
            1,
            "one layer's progress coalesces"
        );
        flight.push(Event::Log {
            kind: LogKind::Stream,
            text: "é".repeat(MAX_LINE_BYTES),
            step: 0,
        });
        let cut = flight.lock().events[1].clone();
        let Event::Log { text, .. } = cut else {
            panic!("a log line")
        };
        assert!(text.len() <= MAX_LINE_BYTES + '…'.len_utf8() && text.ends_with('…'));
        for _ in 0..(MAX_LOG_BYTES / MAX_LINE_BYTES + 10) {
            flight.push(Event::Log {
                kind: LogKind::Stream,
                text: "x".repeat(MAX_LINE_BYTES),
                step: 0,
            });
        }
        let state = flight.lock();
        assert!(state.bytes <= MAX_LOG_BYTES, "{} bytes kept", state.bytes);
        assert!(state.truncated);
        let warnings = state
            .events
            .iter()
            .filter(|e| matches!(e, Event::Warning { code, .. } if code == "log_truncated"))
            .count();
        assert_eq!(warnings, 1);
    }
}
