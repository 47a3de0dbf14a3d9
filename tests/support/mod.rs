//! Shared scaffolding of the end-to-end tests: a local group of real replica processes,
//! recording clients with a fault-time workload, and the linearizability checker.
#![allow(dead_code)] // each test binary uses its own part of the scaffolding

pub mod cluster;
pub mod kubernetes;
pub mod linearizability;
pub mod local;
pub mod workload;
