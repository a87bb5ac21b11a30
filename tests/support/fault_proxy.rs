//! A fault-injecting HTTP proxy on a Unix socket, in front of the REAL engine.
//!
//! The daemon under test gets `DOCKER_HOST=unix://<proxy socket>` ([`FaultProxy::host`]); every
//! request goes on to the engine at `$DOCKER_HOST` unless the test's current [`Rule`] says
//! otherwise for it. The proxy never answers in the engine's place except to inject a fault
//! (an HTTP 500, a dropped connection): images, layers and tags are always the engine's own.
//!
//! Each request is parsed with hyper (so every request on a kept-alive connection is seen) and
//! forwarded on a fresh engine connection; the answer streams back as it comes. Faults:
//! [`Fault`] per request (optionally only for paths under a prefix), plus
//! [`FaultProxy::refuse`] / [`FaultProxy::restore`], which model an engine restart as a client
//! sees it: every open connection is cut and new ones are refused until it is back.
//! Requests are counted per path (API version prefix removed, e.g. `/images/load`).
//!
//! Shared by `tests/faults.rs` and the `soak` bench (`#[path]`-included there).

#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// What the proxy does to a matching request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Forward it untouched.
    Pass,
    /// Forward it after this long (an engine that is slow to start answering).
    Delay(Duration),
    /// Hold it unanswered (its body unread) until the rule changes, then apply the new rule:
    /// a hung engine, or a gate a test opens to let a build go on.
    Hang,
    /// Answer HTTP 500 with Docker's error body `{"message": <text>}`; the engine never sees
    /// the request.
    Error500(String),
    /// Forward it, but cut the answer's body after this many bytes and drop the connection
    /// (a chunked stream that ends midway).
    CutAfter(usize),
    /// Close the connection without answering.
    Drop,
    /// Forward it and put this many bytes of `{"stream":"..."}` lines (what the engine's
    /// build and load answers carry) before the engine's answer: a very chatty engine.
    Inflate(usize),
}

/// A fault and the requests it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Paths (without the `/v1.xx` prefix) starting with this; "" is every request.
    pub prefix: String,
    pub fault: Fault,
}

struct State {
    upstream: PathBuf,
    rule: watch::Sender<Rule>,
    /// Requests seen per path; `seen` bumps on each so a test can wait for one.
    counts: Mutex<HashMap<String, usize>>,
    seen: watch::Sender<u64>,
    /// Bumped to cut every open connection (both sides).
    epoch: watch::Sender<u64>,
    /// Client connections open right now.
    open: watch::Sender<usize>,
    /// Client connections accepted since the start.
    accepted: std::sync::atomic::AtomicUsize,
}

/// A running proxy; stops (cutting its connections) when dropped.
pub struct FaultProxy {
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    state: Arc<State>,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl FaultProxy {
    /// A proxy in front of the engine at `$DOCKER_HOST` (which must be `unix://`), passing
    /// everything through.
    pub async fn start() -> FaultProxy {
        let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| {
            panic!("DOCKER_HOST is not set: run `eval \"$(scripts/test-env.sh)\"` first")
        });
        let upstream = PathBuf::from(
            host.strip_prefix("unix://")
                .unwrap_or_else(|| panic!("the fault proxy needs a unix:// engine, not {host}")),
        );
        let dir = tempfile::tempdir().unwrap();
        let state = Arc::new(State {
            upstream,
            rule: watch::channel(Rule {
                prefix: String::new(),
                fault: Fault::Pass,
            })
            .0,
            counts: Mutex::new(HashMap::new()),
            seen: watch::channel(0).0,
            epoch: watch::channel(0).0,
            open: watch::channel(0).0,
            accepted: std::sync::atomic::AtomicUsize::new(0),
        });
        let proxy = FaultProxy {
            socket: dir.path().join("engine.sock"),
            _dir: dir,
            state,
            accept: Mutex::new(None),
        };
        proxy.restore();
        proxy
    }

    /// The address to give the daemon as its engine (`unix://...`).
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Applies `fault` to requests whose path starts with `prefix` ("" for all) from now on;
    /// requests held by [`Fault::Hang`] go on under the new rule.
    pub fn set(&self, prefix: &str, fault: Fault) {
        self.state.rule.send_replace(Rule {
            prefix: prefix.to_owned(),
            fault,
        });
    }

    /// Passes everything through again.
    pub fn clear(&self) {
        self.set("", Fault::Pass);
    }

    /// Models the engine going down: cuts every open connection and refuses new ones
    /// (ECONNREFUSED: the socket file stays, nothing listens) until [`FaultProxy::restore`].
    pub fn refuse(&self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        self.state.epoch.send_modify(|e| *e += 1);
    }

    /// Listens again (the engine is back).
    pub fn restore(&self) {
        let mut accept = self.accept.lock().unwrap();
        if accept.is_some() {
            return;
        }
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket).unwrap();
        *accept = Some(tokio::spawn(serve(listener, self.state.clone())));
    }

    /// Requests seen so far whose path starts with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.state
            .counts
            .lock()
            .unwrap()
            .iter()
            .filter(|(path, _)| path.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Waits until at least `n` requests under `prefix` were seen; panics after `deadline`.
    pub async fn wait_for(&self, prefix: &str, n: usize, deadline: Duration) {
        let mut seen = self.state.seen.subscribe();
        let waited = tokio::time::timeout(deadline, async {
            while self.count(prefix) < n {
                seen.changed().await.unwrap();
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "the engine proxy saw {} of {n} requests under {prefix:?} within {deadline:?}",
            self.count(prefix)
        );
    }

    /// Client connections open right now (the daemon's pooled engine connections included).
    pub fn open_connections(&self) -> usize {
        *self.state.open.borrow()
    }

    /// Client connections accepted since the start: a client that reuses its connections
    /// leaves this unchanged across requests.
    pub fn accepted_connections(&self) -> usize {
        self.state
            .accepted
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Requests seen so far, by path (API version prefix removed).
    pub fn counts(&self) -> HashMap<String, usize> {
        self.state.counts.lock().unwrap().clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.refuse();
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

async fn serve(listener: UnixListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        state
            .accepted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut epoch = state.epoch.subscribe();
        tokio::spawn(async move {
            state.open.send_modify(|n| *n += 1);
            let service = {
                let state = state.clone();
                service_fn(move |request| handle(state.clone(), request))
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = epoch.changed() => {}
            }
            state.open.send_modify(|n| *n -= 1);
        });
    }
}

/// The path without the API version (`/v1.47/images/load` is `/images/load`).
fn unversioned(path: &str) -> &str {
    match path.strip_prefix("/v") {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => {
            rest.find('/').map_or(path, |at| &rest[at..])
        }
        _ => path,
    }
}

/// Answers one request per the current rule. An `Err` makes hyper drop the connection.
async fn handle(state: Arc<State>, request: Request<Incoming>) -> Result<Response<Body>, String> {
    let path = unversioned(request.uri().path()).to_owned();
    *state
        .counts
        .lock()
        .unwrap()
        .entry(path.clone())
        .or_default() += 1;
    state.seen.send_modify(|n| *n += 1);
    let mut rules = state.rule.subscribe();
    let fault = loop {
        let rule = rules.borrow_and_update().clone();
        let fault = if path.starts_with(&rule.prefix) {
            rule.fault
        } else {
            Fault::Pass
        };
        if fault != Fault::Hang {
            break fault;
        }
        // The sender lives in `state`, which we hold.
        let _ = rules.changed().await;
    };
    match fault {
        Fault::Pass => forward(&state, request).await.map(|r| r.map(box_body)),
        Fault::Delay(delay) => {
            // Injected latency, not synchronisation.
            tokio::time::sleep(delay).await;
            forward(&state, request).await.map(|r| r.map(box_body))
        }
        Fault::Hang => unreachable!("held above until the rule changes"),
        Fault::Error500(message) => {
            let body = serde_json::json!({ "message": message }).to_string();
            Ok(Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .header("content-type", "application/json")
                .body(
                    Full::new(Bytes::from(body))
                        .map_err(|never: Infallible| match never {})
                        .boxed(),
                )
                .unwrap())
        }
        Fault::CutAfter(limit) => {
            let response = forward(&state, request).await?;
            let (mut parts, body) = response.into_parts();
            parts.headers.remove("content-length");
            Ok(Response::from_parts(parts, cut(body, limit)))
        }
        Fault::Drop => Err("dropped by the fault proxy".into()),
        Fault::Inflate(bytes) => {
            let response = forward(&state, request).await?;
            let (mut parts, body) = response.into_parts();
            parts.headers.remove("content-length");
            let filler =
                filler_lines(bytes).map(|chunk| Ok::<_, std::io::Error>(Frame::data(chunk)));
            let rest = body
                .into_data_stream()
                .map(|chunk| chunk.map(Frame::data).map_err(std::io::Error::other));
            Ok(Response::from_parts(
                parts,
                BodyExt::boxed(StreamBody::new(filler.chain(rest))),
            ))
        }
    }
}

fn box_body(body: Incoming) -> Body {
    body.map_err(std::io::Error::other).boxed()
}

/// Sends `request` to the engine on a connection of its own; the connection lives until the
/// answer has been read, or until the proxy cuts everything.
async fn forward(state: &State, request: Request<Incoming>) -> Result<Response<Incoming>, String> {
    let stream = UnixStream::connect(&state.upstream)
        .await
        .map_err(|err| format!("connecting to the engine: {err}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|err| err.to_string())?;
    let mut epoch = state.epoch.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            _ = connection => {}
            _ = epoch.changed() => {}
        }
    });
    sender
        .send_request(request)
        .await
        .map_err(|err| err.to_string())
}

/// `body` up to `limit` bytes, then an error (hyper then drops the connection mid-body).
fn cut(body: Incoming, limit: usize) -> Body {
    let stream = futures_util::stream::unfold(
        (body.into_data_stream(), limit, false),
        |(mut data, left, failed)| async move {
            if failed {
                return None;
            }
            match data.next().await {
                None => None,
                Some(Err(err)) => Some((Err(std::io::Error::other(err)), (data, 0, true))),
                Some(Ok(chunk)) if chunk.len() < left => {
                    let left = left - chunk.len();
                    Some((Ok(Frame::data(chunk)), (data, left, false)))
                }
                Some(Ok(chunk)) if left > 0 => {
                    Some((Ok(Frame::data(chunk.slice(..left))), (data, 0, false)))
                }
                Some(Ok(_)) => Some((
                    Err(std::io::Error::other("cut by the fault proxy")),
                    (data, 0, true),
                )),
            }
        },
    );
    BodyExt::boxed(StreamBody::new(stream))
}

/// About `bytes` of `{"stream":"..."}\n` lines (each about 200 bytes), made lazily in chunks
/// of ~64 KiB (so the proxy itself holds one chunk at a time).
fn filler_lines(bytes: usize) -> impl futures_util::Stream<Item = Bytes> {
    futures_util::stream::unfold((0usize, 0u64), move |(written, line)| async move {
        if written >= bytes {
            return None;
        }
        let mut chunk = String::with_capacity(66 << 10);
        let mut line = line;
        while chunk.len() < 64 << 10 && written + chunk.len() < bytes {
            chunk.push_str(&format!(
                "{{\"stream\":\"fault proxy filler line {line:08} {}\"}}\n",
                "x".repeat(160)
            ));
            line += 1;
        }
        let written = written + chunk.len();
        Some((Bytes::from(chunk), (written, line)))
    })
}

/// Resident memory of this process in bytes (`VmRSS`), and its peak (`VmHWM`).
pub fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/self/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
