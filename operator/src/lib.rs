//! Tandem's Replication Manager. `rm` decides (pure); the platform adapters observe
//! replicas and carry the decisions out: `local` runs them as processes on this machine,
//! `controller` as pods on Kubernetes (with `crd`, `pods`, `status` and `leader`).

pub mod certs;
pub mod controller;
pub mod crd;
pub mod leader;
pub mod local;
pub mod membership;
pub mod pods;
pub mod replicas;
pub mod rm;
pub mod rotation;
pub mod status;
pub mod switchover;
