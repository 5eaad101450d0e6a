//! A flags byte, a split seed, then a client's byte stream, through `ServerSession` with
//! a known session key. The checks are in `cyberbackup_protocol::v3::fuzzing::session`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cyberbackup_protocol::v3::fuzzing::session(data);
});
