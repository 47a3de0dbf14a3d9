//! Tandem's Replication Manager. `rm` decides (pure); the platform adapters observe
//! replicas and carry the decisions out: `local` runs them as processes on this machine.

pub mod local;
pub mod rm;
