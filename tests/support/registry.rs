//! The real `docker-registry` that `scripts/test-env.sh` runs on loopback, and a counting TCP
//! proxy in front of it: it records the requests that pass (to count manifest requests), and
//! can hold them (to keep a pull or check in flight while requests arrive) or refuse
//! connections (a registry that stopped answering).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lambda_imaged::client::{Client, proto};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The registry's host:port.
pub fn registry() -> String {
    std::env::var("LAMBDA_IMAGED_TEST_REGISTRY").unwrap_or_else(|_| {
        panic!(
            "LAMBDA_IMAGED_TEST_REGISTRY is not set: run `eval \"$(scripts/test-env.sh)\"` first"
        )
    })
}

/// How long a registry-cache push may take to be listed as finished.
const PUSH_DEADLINE: Duration = Duration::from_secs(180);

/// Where the image `tag` (in the engine at `host`) is shared: `<cache>:fp-<its fingerprint>`.
pub fn cache_reference(host: &str, tag: &str, cache: &str) -> String {
    let format = "{{index .Config.Labels \"io.lambda-imaged.fingerprint\"}}";
    let fingerprint = super::docker_ok_on(host, &["image", "inspect", "--format", format, tag]);
    format!("{cache}:fp-{}", fingerprint.trim())
}

/// Waits until the daemon on `socket` lists the push of `reference` as finished; its summary.
pub async fn push_of(socket: &Path, reference: &str) -> proto::BuildSummary {
    let found = &std::sync::Mutex::new(None);
    let what = format!("a finished push of {reference} in ListBuilds");
    super::until_async(what, PUSH_DEADLINE, || async move {
        let mut client = Client::connect(socket).await.unwrap();
        let listed = client.list_builds().await.unwrap();
        let push = listed.recent.into_iter().find(|s| s.tag == reference);
        let done = push.is_some();
        *found.lock().unwrap() = push;
        done
    })
    .await;
    found
        .lock()
        .unwrap()
        .take()
        .expect("until returned once it was listed")
}

/// Waits until the daemon on `socket` has pushed `reference`; panics with the error when the
/// push failed.
pub async fn pushed(socket: &Path, reference: &str) {
    let push = push_of(socket, reference).await;
    assert_eq!(
        push.state,
        proto::BuildState::Succeeded as i32,
        "push of {reference} failed: {}",
        push.error
    );
}

/// The HTTP status the registry at `addr` (host:port, plain HTTP) answers to an anonymous
/// `GET /v2/<repository>/manifests/<tag>` for a Docker or OCI manifest: 200 when it holds it,
/// 404 when not; `None` while nothing answers.
pub async fn manifest_status(addr: &str, repository: &str, tag: &str) -> Option<u16> {
    let accept = "Accept: application/vnd.docker.distribution.manifest.v2+json, \
                  application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.oci.image.index.v1+json\r\n";
    http_status(addr, &format!("/v2/{repository}/manifests/{tag}"), accept).await
}

/// The HTTP status `addr` (host:port, plain HTTP) answers to `GET path` with `headers` (each
/// line ending in CRLF); `None` while nothing answers.
pub async fn http_status(addr: &str, path: &str, headers: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    String::from_utf8_lossy(&answer)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// The bytes a client sent on one connection.
type Recorded = Arc<Mutex<Vec<u8>>>;

/// A TCP proxy on 127.0.0.1 in front of the registry that records every request line sent
/// through it.
pub struct Proxy {
    /// Where it listens (host:port); image references name it instead of the registry.
    pub addr: String,
    /// What clients sent, per connection (requests only: the registry's answers are not kept).
    sent: Arc<Mutex<Vec<Recorded>>>,
    /// Connections accepted while held.
    pub held: Arc<AtomicUsize>,
    /// False holds new connections (until set true again).
    pub open: watch::Sender<bool>,
    /// True drops new connections at once (a registry that stopped answering).
    pub refuse: Arc<AtomicBool>,
}

impl Proxy {
    /// A proxy to `upstream` (host:port), open and accepting.
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let sent: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let held = Arc::new(AtomicUsize::new(0));
        let refuse = Arc::new(AtomicBool::new(false));
        let (open, open_rx) = watch::channel(true);
        let (sent2, held2, refuse2) = (sent.clone(), held.clone(), refuse.clone());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                if refuse2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut open_rx = open_rx.clone();
                if !*open_rx.borrow() {
                    held2.fetch_add(1, Ordering::SeqCst);
                }
                let record = Arc::new(Mutex::new(Vec::new()));
                sent2.lock().unwrap().push(record.clone());
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if open_rx.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            record.lock().unwrap().extend_from_slice(&buf[..n]);
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let down = async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    tokio::join!(up, down);
                });
            }
        });
        Proxy {
            addr,
            sent,
            held,
            open,
            refuse,
        }
    }

    /// Request lines (`GET /v2/...`, `HEAD ...`, `PUT`, `POST`, `PATCH`) that passed so far
    /// containing `needle`.
    pub fn requests(&self, needle: &str) -> Vec<String> {
        let sent = self.sent.lock().unwrap();
        sent.iter()
            .flat_map(|conn| {
                let bytes = conn.lock().unwrap().clone();
                String::from_utf8_lossy(&bytes)
                    .split("\r\n")
                    .filter(|line| {
                        ["GET ", "HEAD ", "PUT ", "POST ", "PATCH "]
                            .iter()
                            .any(|m| line.starts_with(m))
                            && line.contains(needle)
                    })
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Manifest requests by tag (`GET`/`HEAD /v2/<repository>/manifests/<tag>`) that passed
    /// so far: one per pull or freshness check (each then asks for the manifest by digest as
    /// well, which is not counted).
    pub fn manifest_requests_for(&self, repository: &str, tag: &str) -> usize {
        let needle = format!(" /v2/{repository}/manifests/{tag} ");
        self.sent
            .lock()
            .unwrap()
            .iter()
            .map(|conn| {
                let bytes = conn.lock().unwrap().clone();
                String::from_utf8_lossy(&bytes)
                    .split("\r\n")
                    .filter(|line| {
                        (line.starts_with("GET ") || line.starts_with("HEAD "))
                            && line.contains(&needle)
                    })
                    .count()
            })
            .sum()
    }
}
