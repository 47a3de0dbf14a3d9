//! Fault detection: the Local Fault Detector beside each replica and the Global Fault
//! Detector that keeps the membership. `lfd` and `gfd` decide; `service` does the I/O.

pub mod gfd;
pub mod lfd;
pub mod service;
