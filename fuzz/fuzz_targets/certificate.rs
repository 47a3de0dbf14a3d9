//! mutual TLS: the identity in a peer's DER certificate; the driver is `certificate`
//! in replica/tests/untrusted/mod.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem_fuzz::certificate(data);
});
