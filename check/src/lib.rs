//! How Tandem's correctness is checked, by machine: clients that record every operation
//! (`workload`), the Wing-Gong-Lowe linearizability checker (`linearizability`), and the
//! checks every run ends with: no acknowledged write lost, no request executed twice,
//! equal digests on every live replica (`verdict`); and partitions on loopback to
//! inject (`firewall`). The end-to-end tests and `tandem nemesis` share them.

pub mod firewall;
pub mod linearizability;
pub mod verdict;
pub mod workload;
