//! Two bytes of code, then a payload: every request payload decoder (and the response
//! decoders). The checks are in `cyberbackup_protocol::v3::fuzzing::payload`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cyberbackup_protocol::v3::fuzzing::payload(data));
