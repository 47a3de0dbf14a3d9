//! Shared scaffolding of the end-to-end tests: a local group of real replica processes,
//! a real `tandem up`, the real test cluster; the workload and the checks come from
//! the tandem-check crate.
#![allow(dead_code)] // each test binary uses its own part of the scaffolding

pub mod cluster;
pub mod kubernetes;
pub mod local;
pub mod pod_security;

pub use tandem_check::{verdict, workload};

use std::net::TcpListener;

/// A loopback port `base` such that `base..base + span` and the internal ports of
/// those (+10000) are free right now. All of them lie below the kernel's ephemeral
/// range: a port picked there can be taken, between our check and the replica's bind,
/// by any outgoing connection (a client's, a heartbeat's) as its source port.
pub fn spare_ports(span: u16) -> u16 {
    let internal = tandem_replica::wire::INTERNAL_PORT_OFFSET;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let low = 10_000u16;
    let high = ephemeral_low.saturating_sub(internal + span);
    assert!(high > low + 1_000, "the ephemeral port range starts too low ({ephemeral_low}) for test ports");
    for _ in 0..10_000 {
        let base = low + rand::random::<u16>() % (high - low);
        let ports = (base..base + span).chain(base + internal..base + internal + span);
        if ports.into_iter().all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return base;
        }
    }
    panic!("no {span} free loopback ports (and their internal ports) below {ephemeral_low} in 10000 tries")
}
