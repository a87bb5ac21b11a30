//! Connecting to the daemon: what the CLI, the tests and Rust emulators use.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use lambda_imaged::client::{self, proto};
//! let mut daemon = client::connect(&client::default_socket()).await?;
//! let request = proto::BuildRequest { runtime: "python3.12".into(), ..Default::default() };
//! let mut events = daemon.build(request).await?.into_inner();
//! while let Some(event) = events.message().await? {
//!     if let Some(proto::build_event::Event::Completed(done)) = event.event {
//!         println!("run {}", done.tag);
//!     }
//! }
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

pub use crate::proto;
pub use crate::proto::image_builder_client::ImageBuilderClient;

/// The socket a client uses by default: `LAMBDA_IMAGED_SOCKET`, else the daemon's default
/// for this user; a non-root user without a per-user daemon falls back to the system one.
pub fn default_socket() -> PathBuf {
    let path = crate::config::default_socket();
    let system = Path::new("/run/lambda-imaged/lambda-imaged.sock");
    if std::env::var_os("LAMBDA_IMAGED_SOCKET").is_none() && !path.exists() && system.exists() {
        return system.to_owned();
    }
    path
}

/// The daemon could not be reached.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach lambda-imaged at {path}: {source}; is the daemon running? (--socket, LAMBDA_IMAGED_SOCKET)"
)]
pub struct ConnectError {
    pub path: PathBuf,
    #[source]
    pub source: tonic::transport::Error,
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
        .map_err(|source| ConnectError {
            path: socket.to_owned(),
            source,
        })
}

/// A typed client for the daemon at `socket`.
pub async fn connect(socket: &Path) -> Result<ImageBuilderClient<Channel>, ConnectError> {
    Ok(ImageBuilderClient::new(channel(socket).await?))
}
