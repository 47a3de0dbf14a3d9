//! Replica.Execute: client requests routed by a primary, an order-keeper and a member; the driver is `execute_requests`
//! in replica/tests/untrusted/mod.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem_fuzz::execute_requests(data);
});
