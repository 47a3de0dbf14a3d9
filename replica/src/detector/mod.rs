//! Fault detection: the Local Fault Detector beside each replica and the Global Fault
//! Detector that keeps the membership. `lfd` and `gfd` decide; `service` does the I/O;
//! `limits` (the crate's) says which settings can work at all.

pub mod gfd;
pub mod lfd;
pub mod service;

/// The settings bounds, at the crate's root since they cover more than the detectors.
pub use crate::limits;
