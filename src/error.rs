//! The daemon's one error type and its one mapping to a gRPC `Status`.
//!
//! Library code returns [`Error`]; only `service.rs` turns it into a [`tonic::Status`], through
//! [`Error::into_status`]. Every message says which field, path or limit is at fault and what to
//! do about it. `Error` is `Clone` because one build's outcome is delivered to every client
//! attached to it.

use std::path::PathBuf;

use tonic::Code;

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
    /// Opening `path` (while doing `what`) was refused by the kernel. Kept apart from
    /// [`Error::PermissionDenied`] so that `access::denied_for` can say whose rights were
    /// used without editing the message. Status: PERMISSION_DENIED.
    #[error("{what} {}: permission denied for the daemon", path.display())]
    ReadDenied {
        /// What was being done ("reading layer file", ...).
        what: String,
        /// The path the kernel refused.
        path: PathBuf,
    },
    /// A layer file (or zip archive) changed between being walked, hashed and streamed, so the
    /// image could hold other bytes than its fingerprint says. Status: FAILED_PRECONDITION.
    #[error("{} changed while the request was reading it; retry once it is stable", .0.display())]
    FileChanged(PathBuf),
}

/// The metadata key (a gRPC trailer, or a header of a trailers-only answer) on every error
/// status the daemon itself sends, with the value [`ORIGIN_DAEMON`]. A client in any language
/// tells by it an `UNAVAILABLE` from the daemon (the engine is unreachable, the daemon is
/// shutting down) from one its own transport made up (nothing listens on the socket, the
/// connection broke mid-call: the daemon was stopped or killed).
pub const ORIGIN_METADATA: &str = "lambda-imaged-origin";

/// The value of [`ORIGIN_METADATA`].
pub const ORIGIN_DAEMON: &str = "daemon";

/// Shorthand used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The one mapping from our errors to gRPC codes.
    /// The same error with `prefix` before its message ("<prefix>: <message>"), keeping its
    /// variant, and so its status: context never turns a cause into another kind of error.
    /// A refused read keeps its path; a changed file its own message.
    pub fn context(self, prefix: &str) -> Error {
        let with = |message: String| format!("{prefix}: {message}");
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(with(m)),
            Error::NotFound(m) => Error::NotFound(with(m)),
            Error::PermissionDenied(m) => Error::PermissionDenied(with(m)),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(with(m)),
            Error::Unavailable(m) => Error::Unavailable(with(m)),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(with(m)),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(with(m)),
            Error::Internal(m) => Error::Internal(with(m)),
            Error::ReadDenied { what, path } => Error::ReadDenied {
                what: with(what),
                path,
            },
            changed @ Error::FileChanged(_) => changed,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::PermissionDenied(_) | Error::ReadDenied { .. } => Code::PermissionDenied,
            Error::FailedPrecondition(_) | Error::FileChanged(_) => Code::FailedPrecondition,
            Error::Unavailable(_) => Code::Unavailable,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Internal(_) => Code::Internal,
        }
    }

    /// The gRPC code name, as printed by the CLI (`NOT_FOUND`, ...).
    pub fn code_name(&self) -> &'static str {
        code_name(self.code())
    }

    /// The status a client receives: [`Error::code`], the message, and the
    /// [`ORIGIN_METADATA`] trailer that tells it the daemon sent this status.
    pub fn into_status(self) -> tonic::Status {
        let mut status = tonic::Status::new(self.code(), self.to_string());
        status.metadata_mut().insert(
            ORIGIN_METADATA,
            tonic::metadata::MetadataValue::from_static(ORIGIN_DAEMON),
        );
        status
    }

    /// An unexpected I/O failure on `path` while doing `what`. A full disk or quota (ENOSPC,
    /// EDQUOT) is RESOURCE_EXHAUSTED via [`Error::cache_full`]: the daemon writes only into
    /// its cache dir, so that is the file system that is full.
    pub fn io(what: &str, path: &std::path::Path, err: &std::io::Error) -> Error {
        if is_disk_full(err) {
            return Error::cache_full(what);
        }
        match err.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!(
                "{what} {}: no such file or directory",
                path.display()
            )),
            std::io::ErrorKind::PermissionDenied => Error::ReadDenied {
                what: what.to_owned(),
                path: path.to_owned(),
            },
            _ => Error::Internal(format!("{what} {}: {err}", path.display())),
        }
    }
}

/// True for the errors of a full file system or an exhausted disk quota (ENOSPC, EDQUOT).
pub fn is_disk_full(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

impl Error {
    /// RESOURCE_EXHAUSTED for a write into the daemon's cache that found its file system full
    /// while doing `what` (which names the client's input, e.g. the layer and zip entry). The
    /// message names the setting, not the path: the cache's location means nothing to the
    /// client, and the daemon's operator knows it from the setting.
    pub fn cache_full(what: &str) -> Error {
        Error::ResourceExhausted(format!(
            "{what}: no space left on the file system of the daemon's cache (cache_dir, \
             --cache-dir); free space there, run `lambda-imagectl prune`, or set \
             max_cache_size to keep the cache smaller"
        ))
    }
}

/// The name of `code` as the CLI prints it (`NOT_FOUND`, ...); the names of the gRPC spec.
pub fn code_name(code: Code) -> &'static str {
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

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        err.into_status()
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::Path;

    use super::*;

    /// Context adds words, never changes the kind of error.
    #[test]
    fn context_keeps_the_variant() {
        let err = Error::ResourceExhausted("disk full".into()).context("pulling base image b");
        assert_eq!(
            err,
            Error::ResourceExhausted("pulling base image b: disk full".into())
        );
        let denied = Error::ReadDenied {
            what: "reading".into(),
            path: "/x".into(),
        }
        .context("layer a");
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(
            denied.to_string(),
            "layer a: reading /x: permission denied for the daemon"
        );
    }

    /// Every status made from an error carries the origin trailer, so clients can tell it from
    /// a transport failure with the same code.
    #[test]
    fn statuses_say_the_daemon_sent_them() {
        let status = Error::Unavailable("cannot reach the container engine".into()).into_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status
                .metadata()
                .get(ORIGIN_METADATA)
                .map(|v| v.to_str().unwrap()),
            Some(ORIGIN_DAEMON)
        );
    }

    /// The causes callers branch on keep the status code and the message clients always saw.
    #[test]
    fn typed_causes_keep_their_codes_and_messages() {
        let path = Path::new("/layers/a/secret");
        let denied = Error::io(
            "reading layer file",
            path,
            &io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert!(matches!(&denied, Error::ReadDenied { path: p, .. } if p == path));
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert_eq!(
            denied.to_string(),
            "reading layer file /layers/a/secret: permission denied for the daemon"
        );
        let changed = Error::FileChanged(path.to_owned());
        assert_eq!(changed.code_name(), "FAILED_PRECONDITION");
        assert_eq!(
            changed.to_string(),
            "/layers/a/secret changed while the request was reading it; retry once it is stable"
        );
    }

    /// ENOSPC and EDQUOT are RESOURCE_EXHAUSTED naming the cache setting, never the path.
    #[test]
    fn a_full_disk_is_resource_exhausted_naming_the_setting() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let full = Error::io(
                "extracting layer \"deps\"",
                Path::new("/var/cache/lambda-imaged/layers/.tmp-x"),
                &io::Error::from_raw_os_error(errno),
            );
            assert_eq!(full.code(), Code::ResourceExhausted);
            let message = full.to_string();
            assert!(
                message.starts_with("extracting layer \"deps\": no space left"),
                "{message}"
            );
            assert!(message.contains("--cache-dir"), "{message}");
            assert!(!message.contains("/var/cache"), "{message}");
        }
    }
}
