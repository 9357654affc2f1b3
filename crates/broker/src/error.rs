//! The broker's error type and its one mapping to `tonic::Status`.

use lienthong_audit::AuditError;
use lienthong_store::StoreError;
use std::time::Duration;
use tonic::{Code, Status};

/// Every way a broker RPC can fail. Messages are for people: lowercase, no
/// trailing period, naming what to change; never a subject key or a secret.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The caller could not be identified.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but not allowed.
    #[error("{0}")]
    PermissionDenied(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The object exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request conflicts with the current state (e.g. an incompatible schema).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Lost a conflict with concurrent changes; the whole request may be retried.
    #[error("{0}")]
    Aborted(String),
    /// Past the end of the log as it is now (an entry no signed tree head
    /// covers yet): it may succeed later, unlike `InvalidArgument`.
    #[error("{0}")]
    OutOfRange(String),
    /// A grant's rate limit is reached.
    #[error("{message}")]
    RateLimited {
        /// What was limited.
        message: String,
        /// When to try again.
        retry_after: Duration,
    },
    /// A dependency (provider, database, audit log) cannot serve now.
    #[error("{0}")]
    Unavailable(String),
    /// The provider did not answer in time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The provider answered something that violates its registered schema.
    #[error("{0}")]
    InvalidProviderRecord(String),
    /// Stored data is not what was written (an audit entry whose columns
    /// are not its leaf's): nothing built on it is served.
    #[error("{0}")]
    DataLoss(String),
    /// A bug or an unexpected state; details are logged, not returned.
    #[error("{0}")]
    Internal(String),
    /// An administrative change took effect, but its audit entry could not
    /// be written: not a refusal, so it is not audited as one.
    #[error("{0}")]
    AppliedNotAudited(String),
    /// An administrative change took effect and was audited, but this
    /// replica cannot load it into its snapshot, so it refuses lookups until
    /// it can: not a refusal either, and not to be repeated.
    #[error("{0}")]
    AppliedNotLoaded(String),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, BrokerError>;

impl BrokerError {
    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            BrokerError::Unauthenticated(_) => Code::Unauthenticated,
            BrokerError::PermissionDenied(_) => Code::PermissionDenied,
            BrokerError::InvalidArgument(_) => Code::InvalidArgument,
            BrokerError::NotFound(_) => Code::NotFound,
            BrokerError::AlreadyExists(_) => Code::AlreadyExists,
            BrokerError::FailedPrecondition(_) => Code::FailedPrecondition,
            BrokerError::OutOfRange(_) => Code::OutOfRange,
            BrokerError::Aborted(_) => Code::Aborted,
            BrokerError::RateLimited { .. } => Code::ResourceExhausted,
            BrokerError::Unavailable(_) => Code::Unavailable,
            BrokerError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            // Distinct from every consumer-side error: the register is at fault.
            BrokerError::InvalidProviderRecord(_) | BrokerError::DataLoss(_) => Code::DataLoss,
            // Not UNAVAILABLE: a client would retry a change already made.
            BrokerError::Internal(_) | BrokerError::AppliedNotAudited(_) | BrokerError::AppliedNotLoaded(_) => {
                Code::Internal
            }
        }
    }
}

/// Longest status message sent, in bytes before percent-encoding: it rides in
/// a header, and stock clients drop a call whose headers pass 16 KiB (the
/// encoding triples non-ASCII text), reporting their own error instead.
const MAX_STATUS_MESSAGE: usize = 2048;

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let mut message = e.to_string();
        if message.len() > MAX_STATUS_MESSAGE {
            let end = lienthong_core::clip(&message, MAX_STATUS_MESSAGE).len();
            message.truncate(end);
            message.push('…');
        }
        let mut status = Status::new(e.code(), message);
        if let BrokerError::RateLimited { retry_after, .. } = &e {
            // Whole seconds, rounded up, as HTTP's Retry-After.
            let secs = retry_after.as_millis().div_ceil(1000).max(1);
            if let Ok(v) = secs.to_string().parse() {
                status.metadata_mut().insert("retry-after", v);
            }
            // The same wait for stock clients' retry policies (gRFC A6), which
            // read this trailer and not HTTP's.
            let ms = retry_after.as_millis().max(1);
            if let Ok(v) = ms.to_string().parse() {
                status.metadata_mut().insert("grpc-retry-pushback-ms", v);
            }
        }
        status
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists { what } => BrokerError::AlreadyExists(format!("{what} already exists")),
            StoreError::NotFound { what } => BrokerError::NotFound(format!("{what} not found")),
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "database unavailable");
                BrokerError::Unavailable("the broker's database is unavailable; retry shortly".into())
            }
            e @ StoreError::SequenceGap { .. } => {
                tracing::error!(error = %e, "audit log sequence conflict");
                BrokerError::Unavailable("the audit log cannot be written; no data was released; retry shortly".into())
            }
            StoreError::Config(m) | StoreError::Corrupt(m) | StoreError::Invalid(m) => {
                tracing::error!(error = %m, "database error");
                BrokerError::Internal("internal database error; the operator has the details in the broker log".into())
            }
        }
    }
}

impl From<AuditError> for BrokerError {
    fn from(e: AuditError) -> Self {
        match e {
            AuditError::NotFound(m) => BrokerError::NotFound(m),
            AuditError::InvalidArgument(m) => BrokerError::InvalidArgument(m),
            AuditError::OutOfRange(m) => BrokerError::OutOfRange(m),
            AuditError::ShuttingDown => {
                BrokerError::Unavailable("the broker is shutting down; retry on another replica".into())
            }
            // Reads of the log (proofs, tree heads): the database's own answer,
            // not "cannot be written".
            AuditError::Store(e) => BrokerError::from(e),
            other => {
                tracing::error!(error = %other, "audit log unavailable");
                BrokerError::Unavailable("the audit log cannot be written; no data was released; retry shortly".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status message rides in a header: a long one would have stock
    /// clients drop the call and report their own error instead.
    #[test]
    fn a_long_status_message_is_cut_on_a_character_boundary() {
        let status = Status::from(BrokerError::FailedPrecondition("kiểm tra ".repeat(1_000)));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(
            status.message().len() <= MAX_STATUS_MESSAGE + '…'.len_utf8(),
            "{}",
            status.message().len()
        );
        assert!(status.message().ends_with('…'));
        let short = Status::from(BrokerError::NotFound("member x".into()));
        assert_eq!(short.message(), "member x");
    }

    #[test]
    fn a_failed_read_of_the_log_is_not_called_a_failed_write() {
        let read = |e: StoreError| Status::from(BrokerError::from(AuditError::Store(e)));
        let missing = read(StoreError::NotFound {
            what: "tree head of log ab12".into(),
        });
        assert_eq!(missing.code(), Code::NotFound);
        let down = read(StoreError::Unavailable("connection refused".into()));
        assert_eq!(down.code(), Code::Unavailable);
        assert!(down.message().contains("database is unavailable"), "{}", down.message());
        assert!(!down.message().contains("cannot be written"), "{}", down.message());
        // Appends keep their fail-closed message.
        let append = Status::from(BrokerError::from(AuditError::Unavailable("disk full".into())));
        assert_eq!(append.code(), Code::Unavailable);
        assert!(
            append.message().contains("no data was released"),
            "{}",
            append.message()
        );
    }
}
