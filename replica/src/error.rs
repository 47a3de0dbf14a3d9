//! Typed errors of the replica protocol and their wire form: a gRPC status with a precise
//! code, a message a user can act on, and an encoded `tandem.v1.ErrorDetail` in its
//! details so that clients and peers can react (go to the primary, learn a newer
//! configuration) without parsing text.

use prost::Message;
use tonic::{Code, Status};

use crate::pb::{self, error_detail};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReplicaError {
    #[error(
        "replica {replica} is not the primary of epoch {epoch}; the primary is {primary_id} at {primary_address}"
    )]
    NotPrimary { replica: String, epoch: u64, primary_id: String, primary_address: String },

    #[error("replica {replica} is not ready (epoch {epoch}): {reason}")]
    NotReady { replica: String, epoch: u64, reason: String },

    #[error("wrong epoch: the message is for epoch {got}, replica {replica} is at epoch {current}")]
    WrongEpoch { replica: String, got: u64, current: u64, configuration: Option<pb::Configuration> },

    #[error("invalid request: {field}: {reason}")]
    InvalidRequest { field: String, reason: String },

    #[error(
        "stale request <{client_id}, {request_id}>: the session already executed request {last_request_id}"
    )]
    StaleRequest { client_id: String, request_id: u64, last_request_id: u64 },

    #[error(
        "request <{client_id}, {request_id}> reuses the id of the session's last request for another operation: not executed; a new request needs a new, higher request id"
    )]
    RequestIdReused { client_id: String, request_id: u64 },

    #[error(
        "request <{client_id}, {request_id}>: session {client_id} is unknown, expired after {session_expiry_ms} ms idle (or the request is older than that): not executed. If this is a retry, an earlier attempt may have executed: check, then continue with a new session (a new client id, or request ids from the clock in microseconds, as the client library does)"
    )]
    SessionExpired { client_id: String, request_id: u64, session_expiry_ms: u64 },

    #[error(
        "replica {replica} is at epoch {have} and the sender at epoch {want}: install the configuration first"
    )]
    ConfigurationRequired { replica: String, have: u64, want: u64 },

    #[error(
        "request <{client_id}, {replica}, {request_id}> did not execute within {waited_ms} ms (epoch {epoch}); retry with the same request id"
    )]
    NotExecuted { client_id: String, replica: String, request_id: u64, epoch: u64, waited_ms: u64 },

    #[error("checkpoint refused: {reason}")]
    BadCheckpoint { reason: String },
}

impl ReplicaError {
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidRequest { .. } | Self::BadCheckpoint { .. } => Code::InvalidArgument,
            Self::NotPrimary { .. }
            | Self::NotReady { .. }
            | Self::WrongEpoch { .. }
            | Self::ConfigurationRequired { .. }
            | Self::SessionExpired { .. } => Code::FailedPrecondition,
            Self::StaleRequest { .. } => Code::Aborted,
            Self::RequestIdReused { .. } => Code::AlreadyExists,
            Self::NotExecuted { .. } => Code::Unavailable,
        }
    }

    fn detail(&self) -> Option<error_detail::Kind> {
        Some(match self.clone() {
            Self::NotPrimary { epoch, primary_id, primary_address, .. } => {
                error_detail::Kind::NotPrimary(pb::NotPrimary { epoch, primary_id, primary_address })
            }
            Self::NotReady { reason, epoch, .. } => {
                error_detail::Kind::NotReady(pb::NotReady { reason, epoch })
            }
            Self::WrongEpoch { got, current, configuration, .. } => {
                error_detail::Kind::WrongEpoch(pb::WrongEpoch { got, current, configuration })
            }
            Self::InvalidRequest { field, reason } => {
                error_detail::Kind::InvalidRequest(pb::InvalidRequest { field, reason })
            }
            Self::StaleRequest { client_id, request_id, last_request_id } => {
                error_detail::Kind::StaleRequest(pb::StaleRequest { client_id, request_id, last_request_id })
            }
            Self::RequestIdReused { client_id, request_id } => {
                error_detail::Kind::RequestIdReused(pb::RequestIdReused { client_id, request_id })
            }
            Self::SessionExpired { client_id, request_id, session_expiry_ms } => {
                error_detail::Kind::SessionExpired(pb::SessionExpired {
                    client_id,
                    request_id,
                    session_expiry_ms,
                })
            }
            Self::ConfigurationRequired { have, want, .. } => {
                error_detail::Kind::ConfigurationRequired(pb::ConfigurationRequired { have, want })
            }
            Self::NotExecuted { .. } | Self::BadCheckpoint { .. } => return None,
        })
    }
}

impl From<ReplicaError> for Status {
    fn from(error: ReplicaError) -> Self {
        let message = error.to_string();
        match error.detail() {
            Some(kind) => {
                let detail = pb::ErrorDetail { kind: Some(kind) }.encode_to_vec();
                Status::with_details(error.code(), message, detail.into())
            }
            None => Status::new(error.code(), message),
        }
    }
}

/// The typed detail a replica attached to a status, if any.
pub fn error_detail(status: &Status) -> Option<error_detail::Kind> {
    pb::ErrorDetail::decode(status.details()).ok()?.kind
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_primary_round_trips_through_a_status() {
        let error = ReplicaError::NotPrimary {
            replica: "r2".into(),
            epoch: 3,
            primary_id: "r1".into(),
            primary_address: "127.0.0.1:7101".into(),
        };
        let status = Status::from(error);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("the primary is r1 at 127.0.0.1:7101"), "{}", status.message());
        let Some(error_detail::Kind::NotPrimary(detail)) = error_detail(&status) else { panic!("no detail") };
        assert_eq!((detail.epoch, detail.primary_id.as_str()), (3, "r1"));
    }

    #[test]
    fn expired_session_says_what_to_do_and_carries_its_detail() {
        let error = ReplicaError::SessionExpired {
            client_id: "c1".into(),
            request_id: 7,
            session_expiry_ms: 600_000,
        };
        let status = Status::from(error);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().contains("not executed"), "{}", status.message());
        assert!(status.message().contains("new session"), "{}", status.message());
        let Some(error_detail::Kind::SessionExpired(detail)) = error_detail(&status) else {
            panic!("no detail")
        };
        assert_eq!(
            (detail.client_id.as_str(), detail.request_id, detail.session_expiry_ms),
            ("c1", 7, 600_000)
        );
    }

    #[test]
    fn plain_status_has_no_detail() {
        assert_eq!(error_detail(&Status::unavailable("connection refused")), None);
    }
}
