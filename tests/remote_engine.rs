//! A remote engine over tcp:// and over TLS: the private dockerd behind a loopback forwarder
//! (plain, or TLS-terminating with client certificates from a CA made here), so the daemon
//! speaks TCP to a real engine.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use lambda_imaged::client::{Client, proto};
use lambda_imaged::config::EngineTls;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use support::*;
use tokio::net::{TcpListener, UnixStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// The private engine's Unix socket (DOCKER_HOST is `unix://...` in the test environment).
fn engine_socket() -> PathBuf {
    let host = engine_host();
    PathBuf::from(
        host.strip_prefix("unix://")
            .unwrap_or_else(|| panic!("the test engine is a unix:// socket, not {host}")),
    )
}

/// A forwarder on 127.0.0.1:<ephemeral> to the private engine's socket, optionally
/// terminating TLS; counts the connections it carried. Runs until the test's runtime ends.
async fn forwarder(tls: Option<TlsAcceptor>) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let carried = Arc::new(AtomicUsize::new(0));
    let count = carried.clone();
    let socket = engine_socket();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (tls, socket, count) = (tls.clone(), socket.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut engine) = UnixStream::connect(&socket).await else {
                    return;
                };
                match tls {
                    Some(acceptor) => {
                        // A handshake the client aborts (wrong CA) just ends here.
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut engine).await;
                    }
                    None => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let mut tcp = tcp;
                        let _ = tokio::io::copy_bidirectional(&mut tcp, &mut engine).await;
                    }
                }
            });
        }
    });
    (port, carried)
}

/// A CA, and a certificate it signed for `names`, as (cert PEM, key PEM).
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    fn sign(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes ca.pem, cert.pem and key.pem into `dir`, as DOCKER_CERT_PATH holds them.
fn cert_dir(dir: &Path, ca_pem: &str, (cert, key): &(String, String)) -> EngineTls {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("cert.pem"), cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    EngineTls {
        cert_dir: dir.to_owned(),
    }
}

/// A TLS acceptor presenting `server` and requiring a client certificate `ca` signed.
fn acceptor(ca: &Ca, (cert, key): &(String, String)) -> TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let clients =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(clients)
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
        )
        .unwrap();
    TlsAcceptor::from(Arc::new(config))
}

/// Polls the daemon's health until it is SERVING (bounded: 60 s): the engine answered a ping
/// and the image index is following its `/events` stream.
async fn until_serving(socket: &Path) {
    let deadline = std::time::Duration::from_secs(60);
    until_async("the daemon to report SERVING", deadline, || async {
        let channel = lambda_imaged::client::channel(socket).await.unwrap();
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: "lambda_imaged.v1.ImageBuilder".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        status == ServingStatus::Serving as i32
    })
    .await;
}

/// A request with one fresh layer (its own content, so its own image).
fn fresh_request(dir: &Path) -> proto::BuildRequest {
    write_file(&dir.join("app.py"), &unique("print('remote') # "), 0o644);
    zip_request(&[(&unique("r"), dir)])
}

/// Over plain tcp:// the daemon builds into the engine behind the forwarder (the image is
/// there, the forwarder carried the connections) and the repeat is a cache hit.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_engine_builds_and_hits() {
    let (port, carried) = forwarder(None).await;
    let daemon = TestDaemon::start_with(|config| {
        config.engine_host = format!("tcp://127.0.0.1:{port}");
        config.engine_tls = None;
    })
    .await;
    let layer = tempfile::tempdir().unwrap();
    let request = fresh_request(layer.path());

    let first = build(&daemon.socket, request.clone()).await;
    let done = first.completed().clone();
    assert_eq!(done.reason, proto::Reason::Missing as i32);
    assert!(bytes_sent(&first.events) > 0, "layers streamed over TCP");
    let id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", &done.tag]);
    assert_eq!(
        id.trim(),
        done.image_id,
        "the engine behind the forwarder has it"
    );
    assert!(carried.load(Ordering::SeqCst) > 0, "the daemon spoke TCP");

    let again = build(&daemon.socket, request).await;
    assert!(again.completed().cached);
    assert_eq!(again.completed().image_id, done.image_id);

    until_serving(&daemon.socket).await;
    let info = Client::connect(&daemon.socket)
        .await
        .unwrap()
        .info()
        .await
        .unwrap();
    let engine = info.engine.expect("engine info");
    assert_eq!(engine.host, format!("tcp://127.0.0.1:{port}"));
    assert!(engine.reachable, "{}", engine.error);
    assert!(!engine.version.is_empty());
    daemon.stop().await;
}

/// With DOCKER_TLS_VERIFY-style settings (ca.pem, cert.pem, key.pem) the daemon talks TLS
/// with a client certificate to the engine, builds and hits; with a CA that did not sign the
/// engine's certificate, a request fails UNAVAILABLE naming TLS and DOCKER_CERT_PATH.
#[tokio::test(flavor = "multi_thread")]
async fn tls_engine_builds_and_hits_and_a_wrong_ca_is_named() {
    let ca = Ca::new("lambda-imaged test CA");
    let server = ca.sign(&["127.0.0.1"]);
    let client = ca.sign(&["lambda-imaged client"]);
    let (port, carried) = forwarder(Some(acceptor(&ca, &server))).await;
    let certs = tempfile::tempdir().unwrap();
    let tls = cert_dir(&certs.path().join("good"), &ca.pem, &client);
    let daemon = TestDaemon::start_with(|config| {
        config.engine_host = format!("tcp://127.0.0.1:{port}");
        config.engine_tls = Some(tls);
    })
    .await;
    let layer = tempfile::tempdir().unwrap();
    let request = fresh_request(layer.path());

    let first = build(&daemon.socket, request.clone()).await;
    let done = first.completed().clone();
    assert_eq!(done.reason, proto::Reason::Missing as i32);
    let id = docker_ok(&["image", "inspect", "--format", "{{.Id}}", &done.tag]);
    assert_eq!(id.trim(), done.image_id);
    assert!(
        carried.load(Ordering::SeqCst) > 0,
        "TLS handshakes completed"
    );
    let again = build(&daemon.socket, request.clone()).await;
    assert!(again.completed().cached);
    daemon.stop().await;

    let other = Ca::new("some other CA");
    let wrong = cert_dir(&certs.path().join("wrong"), &other.pem, &client);
    let wrong_dir = wrong.cert_dir.display().to_string();
    let daemon = TestDaemon::start_with(|config| {
        config.engine_host = format!("tcp://127.0.0.1:{port}");
        config.engine_tls = Some(wrong);
    })
    .await;
    let refused = build(&daemon.socket, fresh_request(layer.path())).await;
    let status = refused.status();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    for needle in ["TLS", "DOCKER_CERT_PATH", wrong_dir.as_str(), "ca.pem"] {
        assert!(
            status.message().contains(needle),
            "{needle:?} in {}",
            status.message()
        );
    }
    let info = Client::connect(&daemon.socket)
        .await
        .unwrap()
        .info()
        .await
        .unwrap();
    let engine = info.engine.expect("engine info");
    assert!(!engine.reachable);
    assert!(engine.error.contains("TLS"), "{}", engine.error);
    daemon.stop().await;
}
