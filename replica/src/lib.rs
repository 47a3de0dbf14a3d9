//! Tandem's replica: the replicated key-value server (passive and active replication,
//! checkpoints, recovery), the client library, and the wire contract they share.
//!
//! Pure cores (`state`, `log`, `replication`, `checkpoint`) decide; `node` is the shell
//! that applies events to them, `server` and `peers` do the I/O around it; `wire` is the
//! plumbing every layer shares; `client` is what the CLI, benchmarks and tests use.

pub mod checkpoint;
pub mod client;
pub mod detector;
pub mod error;
pub mod limits;
pub mod log;
pub mod node;
pub mod peers;
pub mod replication;
pub mod server;
pub mod state;
pub mod storage;
mod stream;
pub mod tls;
pub mod wire;

/// Generated code of the `tandem.v1` protobuf package.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tandem.v1");
}

impl pb::Configuration {
    /// The member with this id, if it is one.
    pub fn member(&self, id: &str) -> Option<&pb::Member> {
        self.members.iter().find(|m| m.id == id)
    }

    pub fn has_member(&self, id: &str) -> bool {
        self.member(id).is_some()
    }

    /// The primary (passive) or order-keeper (active), when it is a member.
    pub fn leader(&self) -> Option<&pb::Member> {
        self.member(&self.primary)
    }
}

/// The replication mode's one name, everywhere (flags, files, status, logs):
/// `passive` or `active`.
impl std::fmt::Display for pb::Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            pb::Mode::Passive => "passive",
            pb::Mode::Active => "active",
            pb::Mode::Unspecified => "unspecified",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown replication mode {0:?} (expected passive or active)")]
pub struct UnknownMode(pub String);

impl std::str::FromStr for pb::Mode {
    type Err = UnknownMode;

    /// `passive` or `active`; anything else is refused, never taken for a default.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim().to_ascii_lowercase().as_str() {
            "passive" => Ok(pb::Mode::Passive),
            "active" => Ok(pb::Mode::Active),
            _ => Err(UnknownMode(text.to_owned())),
        }
    }
}
