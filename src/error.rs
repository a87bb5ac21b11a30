//! The daemon's one error type and its one mapping to a gRPC `Status`.
//!
//! Library code returns [`Error`]; only `service.rs` turns it into a [`tonic::Status`], through
//! [`Error::into_status`]. Every message says which field, path or limit is at fault and what to
//! do about it. `Error` is `Clone` because one build's outcome is delivered to every client
//! attached to it.

/// An error a request can end with. Variants exist because callers (and the status mapping)
/// branch on them.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The request is malformed: names the field and the allowed values.
    #[error("{0}")]
    InvalidArgument(String),
    /// A layer path, or a base image neither local nor pullable.
    #[error("{0}")]
    NotFound(String),
    /// The peer may not use the daemon, or may not read a path.
    #[error("{0}")]
    PermissionDenied(String),
    /// The engine refused the build (its own text included), or the RIE is missing.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The engine cannot be reached, or the daemon is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A configured limit was hit; the message names it.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The build ran longer than `--build-timeout`.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug of ours, or an I/O failure we did not expect.
    #[error("{0}")]
    Internal(String),
}

/// Shorthand used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code name, as printed by the CLI (`NOT_FOUND`, ...).
    pub fn code_name(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "INVALID_ARGUMENT",
            Error::NotFound(_) => "NOT_FOUND",
            Error::PermissionDenied(_) => "PERMISSION_DENIED",
            Error::FailedPrecondition(_) => "FAILED_PRECONDITION",
            Error::Unavailable(_) => "UNAVAILABLE",
            Error::ResourceExhausted(_) => "RESOURCE_EXHAUSTED",
            Error::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            Error::Internal(_) => "INTERNAL",
        }
    }

    /// The one mapping from our errors to gRPC statuses.
    pub fn into_status(self) -> tonic::Status {
        use tonic::Code;
        let code = match &self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, self.to_string())
    }

    /// An unexpected I/O failure on `path` while doing `what`.
    pub fn io(what: &str, path: &std::path::Path, err: &std::io::Error) -> Error {
        match err.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!(
                "{what} {}: no such file or directory",
                path.display()
            )),
            std::io::ErrorKind::PermissionDenied => Error::PermissionDenied(format!(
                "{what} {}: permission denied for the daemon",
                path.display()
            )),
            _ => Error::Internal(format!("{what} {}: {err}", path.display())),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        err.into_status()
    }
}

/// The gRPC name of `code` (`NOT_FOUND`, ...), as `lambda-imagectl` prints it. `tonic::Code`
/// only offers a sentence (`description`), not the name scripts match on.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
