//! A logged-in v4 server session fed an arbitrary decrypted stream. The checks are in
//! `cyberbackup_protocol::v4::fuzzing::session`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = cyberbackup_protocol::v4::fuzzing::session(data);
});
