//! Peer.Order: requests forwarded to an order-keeper; the driver is `order_requests`
//! in replica/tests/untrusted/mod.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem_fuzz::order_requests(data);
});
