//! Any bytes as a request header and a response header; a lone header against the
//! Errors table. The checks are in `cyberbackup_protocol::v3::fuzzing::request_header`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cyberbackup_protocol::v3::fuzzing::request_header(data));
