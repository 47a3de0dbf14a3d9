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
pub mod log;
pub mod node;
pub mod peers;
pub mod replication;
pub mod server;
pub mod state;
pub mod wire;

/// Generated code of the `tandem.v1` protobuf package.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tandem.v1");
}
