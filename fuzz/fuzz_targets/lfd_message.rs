//! FaultDetector.Attach: LFD messages to the GFD's membership; the driver is `lfd_messages`
//! in replica/tests/untrusted/mod.rs.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tandem_fuzz::lfd_messages(data);
});
