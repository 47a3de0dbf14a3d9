//! Peer.InstallCheckpoint: chunk streams into the Assembler and a joining replica; the driver is `checkpoint`
//! in replica/tests/untrusted/mod.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem_fuzz::checkpoint(data);
});
