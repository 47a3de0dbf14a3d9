//! Control.InstallConfiguration: configurations checked and installed; the driver is `configurations`
//! in replica/tests/untrusted/mod.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem_fuzz::configurations(data);
});
