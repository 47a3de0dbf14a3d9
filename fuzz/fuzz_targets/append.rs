//! Peer.Append: a leader's appends to passive and active followers; the driver is `appends`
//! in replica/tests/untrusted/mod.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem_fuzz::appends(data);
});
