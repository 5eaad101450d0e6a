//! Two bytes of kind, then a body: every v4 request and answer decoder, the handshake
//! payloads, the manifest decoder and the frame splitter. The checks are in
//! `cyberbackup_protocol::v4::fuzzing::frames`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cyberbackup_protocol::v4::fuzzing::frames(data));
