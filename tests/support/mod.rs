//! Shared scaffolding of the end-to-end tests: a local group of real replica processes,
//! a real `tandem up`, the real test cluster; the workload and the checks come from
//! the tandem-check crate.
#![allow(dead_code)] // each test binary uses its own part of the scaffolding

pub mod cluster;
pub mod kubernetes;
pub mod local;
pub mod pod_security;

pub use tandem_check::{verdict, workload};
