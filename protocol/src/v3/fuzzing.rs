//! Fuzz harnesses: hostile bytes against the decoders and the session, with invariants.
//!
//! Compiled for unit tests and with the `fuzz` crate's feature `fuzzing`; never enable
//! that feature in a production build ([`KnownKey`] sends the session key in clear).
//! The cargo-fuzz targets in `fuzz/` are one line each and call these functions, so the
//! seed corpus and every crash found become ordinary `cargo test` cases
//! (`fuzzing::tests`).
//!
//! - [`request_header`]: any bytes as a request and a response header. Decoding never
//!   fails on 23 (7) bytes, encoding gives back exactly those bytes, the code mapping is
//!   total, and a fresh session answers a lone header as the Errors table of PROTOCOL.md
//!   says.
//! - [`payload`]: the first two bytes pick a code, the rest is its payload. Every request
//!   payload decoder (name fields, SEND_PUBLIC_KEY with the RSA key parser and OAEP,
//!   SEND_FILE's fixed part) and every response decoder: decode then encode gives the
//!   input back where the input is canonical (and a decode of the encoding otherwise),
//!   lengths are bounded, an accepted file name is one bare path component.
//! - [`session`]: byte 0 holds flags (storage failures, passing time), bytes 1..5 seed
//!   the split, the rest is the client's byte stream. It drives a [`ServerSession`] with
//!   the [`KnownKey`] exchange (so the inputs can carry valid ciphertext) twice: once cut
//!   at the seeded points, once also cut at every request boundary so that each response
//!   and op can be traced to its request. Checked: both runs give the same bytes and
//!   files; each request gets at most one response, of a kind its code allows, only
//!   once read; every 1603 matches a reference reassembly and decryption of the packets
//!   since the last packet 1; a file is committed only on a CRC_OK that names the file
//!   of the last 1603, with that checksum, for that client, and holds exactly the
//!   announced size of plaintext; ACK to CRC_OK only after the commit; sinks have the
//!   announced size and at most two are held; held memory stays bounded; input is
//!   consumed unless the session waits or closes; nothing is read or answered after
//!   closing; a deadline is always set; `abort` returns every sink.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::common::ClientId;
use crate::v3::cksum::cksum;
use crate::v3::crypto::{
    self, ciphertext_len, AesKey, CryptoError, CryptoRng, CryptoRngCore, KeyExchange, RngCore,
};
use crate::v3::header::{
    RequestCode, RequestHeader, ResponseCode, ResponseHeader, REQUEST_HEADER_LEN,
    RESPONSE_HEADER_LEN,
};
use crate::v3::message::{
    self, DecodeError, Response, SendFileHead, ENCRYPTED_KEY_LEN, NAME_PAYLOAD_LEN,
    SEND_FILE_FIXED_LEN, SEND_PUBLIC_KEY_LEN,
};
use crate::v3::name::{self, NameError, NAME_FIELD_LEN};
use crate::v3::session::memory::{MemClient, MemoryBackend};
use crate::v3::session::{Completion, Op, OpError, ServerSession, SessionConfig};
use crate::v3::{MAX_PAYLOAD_SIZE, PUBLIC_KEY_LEN, VERSION};

/// The session key [`KnownKey`] issues to everyone.
pub const KNOWN_AES_KEY: AesKey = *b"cyberbackup fuzz: known aes key!";

/// A key exchange for fuzzing: every public key field whose first byte is not zero is
/// accepted, the session key is always [`KNOWN_AES_KEY`], and it is "encrypted" by
/// sending it in clear, padded to the 128 bytes of RSA-1024. Insecure by design.
#[derive(Debug, Clone, Copy, Default)]
pub struct KnownKey;

impl KeyExchange for KnownKey {
    type PublicKey = ();

    fn parse_public_key(&self, field: &[u8]) -> Result<(), CryptoError> {
        // An all-zero field is "no key": keep a refusal path as RSA has one.
        match field.first() {
            Some(&b) if b != 0 => Ok(()),
            _ => Err(CryptoError::BadPublicKey),
        }
    }

    fn session_key<R: CryptoRngCore + ?Sized>(&self, _rng: &mut R) -> AesKey {
        KNOWN_AES_KEY
    }

    fn encrypt_session_key<R: CryptoRngCore>(
        &self,
        _public_key: &(),
        _rng: &mut R,
        key: &AesKey,
    ) -> Result<Vec<u8>, CryptoError> {
        let mut v = key.to_vec();
        v.resize(ENCRYPTED_KEY_LEN, 0);
        Ok(v)
    }
}

/// A cheap deterministic RNG (SplitMix64), so that a fuzz input replays exactly.
#[derive(Debug, Clone)]
pub struct FuzzRng(pub u64);

impl RngCore for FuzzRng {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for FuzzRng {}

// ---------------------------------------------------------------------------------
// (a) headers

/// Target `request_header`: see the module docs.
pub fn request_header(data: &[u8]) {
    match RequestHeader::parse(data) {
        Ok(h) => {
            assert!(data.len() >= REQUEST_HEADER_LEN);
            assert_eq!(h.to_bytes()[..], data[..REQUEST_HEADER_LEN]);
            assert_eq!(RequestHeader::parse(&h.to_bytes()), Ok(h));
            let raw = u16::from_le_bytes([data[17], data[18]]);
            assert_eq!(u16::from(h.code), raw);
            assert_eq!(
                matches!(h.code, RequestCode::Unknown(_)),
                !(1025..=1031).contains(&raw)
            );
            lone_header_follows_the_errors_table(&h);
        }
        Err(e) => {
            assert!(data.len() < REQUEST_HEADER_LEN);
            assert_eq!((e.needed, e.available), (REQUEST_HEADER_LEN, data.len()));
        }
    }
    match ResponseHeader::parse(data) {
        Ok(h) => {
            assert!(data.len() >= RESPONSE_HEADER_LEN);
            assert_eq!(h.to_bytes()[..], data[..RESPONSE_HEADER_LEN]);
            let raw = u16::from_le_bytes([data[1], data[2]]);
            assert_eq!(u16::from(h.code), raw);
            assert_eq!(
                matches!(h.code, ResponseCode::Unknown(_)),
                !(1600..=1607).contains(&raw)
            );
        }
        Err(e) => {
            assert!(data.len() < RESPONSE_HEADER_LEN);
            assert_eq!((e.needed, e.available), (RESPONSE_HEADER_LEN, data.len()));
        }
    }
}

/// A fresh session (no client yet) given only a header answers as PROTOCOL.md's Errors
/// table says, or waits for the payload.
fn lone_header_follows_the_errors_table(h: &RequestHeader) {
    let now = Instant::now();
    let mut s = ServerSession::<Vec<u8>, _, _>::with_key_exchange(
        SessionConfig::default(),
        FuzzRng(0),
        KnownKey,
        now,
    );
    assert_eq!(s.handle_input(now, &h.to_bytes()), REQUEST_HEADER_LEN);
    assert!(s.poll_op().is_none(), "no op before the payload");
    let size = h.payload_size;
    let size_ok = match h.code {
        RequestCode::SendPublicKey => size as usize == SEND_PUBLIC_KEY_LEN,
        RequestCode::SendFile => size as usize >= SEND_FILE_FIXED_LEN,
        _ => size as usize == NAME_PAYLOAD_LEN,
    };
    let needs_key = matches!(
        h.code,
        RequestCode::SendFile | RequestCode::CrcOk | RequestCode::CrcRetry | RequestCode::CrcAbort
    );
    // (answered with 1607, closes)
    let expect = if h.version != VERSION || size > MAX_PAYLOAD_SIZE {
        Some(true)
    } else if matches!(h.code, RequestCode::Unknown(_)) {
        Some(false)
    } else if !size_ok || needs_key {
        Some(true)
    } else {
        None
    };
    let out = s.output();
    match expect {
        Some(closes) => {
            assert_eq!(out, error_frame(), "{h:?}");
            assert_eq!(s.is_closing(), closes, "{h:?}");
        }
        None => {
            assert!(out.is_empty(), "{h:?}");
            assert!(!s.is_closing());
            assert!(!s.is_idle(), "mid-request");
        }
    }
}

fn error_frame() -> &'static [u8] {
    &[3, 0x47, 0x06, 0, 0, 0, 0]
}

// ---------------------------------------------------------------------------------
// (b) payloads

/// Target `request_payload`: see the module docs.
pub fn payload(data: &[u8]) {
    let Some((code, p)) = data.split_first_chunk::<2>() else {
        return;
    };
    let code = u16::from_le_bytes(*code);
    match RequestCode::from(code) {
        RequestCode::SendPublicKey => send_public_key_payload(p),
        RequestCode::SendFile => send_file_payload(p),
        RequestCode::Unknown(_) => match ResponseCode::from(code) {
            ResponseCode::Unknown(c) => {
                assert_eq!(
                    Response::decode(ResponseCode::Unknown(c), p),
                    Err(DecodeError::UnexpectedCode(c))
                );
                let _ = message::decode_name_payload(p);
                let _ = message::decode_send_public_key(p);
                let _ = SendFileHead::decode(p);
            }
            rc => response_payload(rc, p),
        },
        rc => name_payload(rc, p),
    }
}

/// The name of a decoded name field: a prefix of the field, followed by its NUL.
fn check_field_name(field: &[u8], name: &[u8]) {
    assert_eq!(field.len(), NAME_FIELD_LEN);
    assert!(name.len() < NAME_FIELD_LEN);
    assert_eq!(&field[..name.len()], name);
    assert_eq!(field[name.len()], 0);
    check_name_rules(name);
}

/// What the name checks accept is what the rules say, and a file name is one bare path
/// component that cannot leave the directory it is joined to.
fn check_name_rules(raw: &[u8]) {
    let text_ok = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.as_bytes() == raw && !s.chars().any(char::is_control)
    };
    if let Ok(u) = name::check_user_name(raw) {
        assert!(text_ok(u, name::MAX_USER_NAME), "{raw:?}");
    }
    match name::check_file_name(raw) {
        Ok(f) => {
            assert!(text_ok(f, name::MAX_FILE_NAME), "{raw:?}");
            assert!(!f.contains(['/', '\\']));
            let mut parts = std::path::Path::new(f).components();
            assert_eq!(
                parts.next(),
                Some(std::path::Component::Normal(std::ffi::OsStr::new(f))),
                "{f:?}"
            );
            assert!(parts.next().is_none(), "{f:?}");
            let root = std::path::Path::new("/srv/backup/client");
            assert_eq!(root.join(f).parent(), Some(root));
        }
        Err(_) => {
            if let Ok(s) = std::str::from_utf8(raw) {
                let bare = s != "." && s != ".." && !s.contains(['/', '\\']);
                assert!(!(text_ok(s, name::MAX_FILE_NAME) && bare), "{s:?} refused");
            }
        }
    }
}

/// Encoding a decoded name field gives the field with zero padding.
fn check_canonical_name_field(field: &[u8], encoded: &[u8], name: &[u8]) {
    assert_eq!(encoded.len(), NAME_FIELD_LEN);
    assert_eq!(&encoded[..=name.len()], &field[..=name.len()]);
    assert!(encoded[name.len()..].iter().all(|&b| b == 0));
}

fn name_payload(code: RequestCode, p: &[u8]) {
    match message::decode_name_payload(p) {
        Ok(name) => {
            check_field_name(p, name);
            if let Ok(s) = std::str::from_utf8(name) {
                let mut out = Vec::new();
                message::encode_name_request(&mut out, &[7; 16], code, s).expect("fits");
                let h = RequestHeader::parse(&out).expect("a header");
                assert_eq!((h.code, h.version), (code, VERSION));
                assert_eq!(h.payload_size as usize, out.len() - REQUEST_HEADER_LEN);
                check_canonical_name_field(p, &out[REQUEST_HEADER_LEN..], name);
                assert_eq!(
                    message::decode_name_payload(&out[REQUEST_HEADER_LEN..]),
                    Ok(name)
                );
            }
        }
        Err(DecodeError::Size { expected, actual }) => {
            assert_eq!((expected, actual), (NAME_PAYLOAD_LEN, p.len()));
            assert_ne!(p.len(), NAME_PAYLOAD_LEN);
        }
        Err(DecodeError::Name(NameError::Unterminated)) => {
            assert_eq!(p.len(), NAME_PAYLOAD_LEN);
            assert!(!p.contains(&0));
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

fn send_public_key_payload(p: &[u8]) {
    match message::decode_send_public_key(p) {
        Ok((name, key)) => {
            assert_eq!(p.len(), SEND_PUBLIC_KEY_LEN);
            check_field_name(&p[..NAME_FIELD_LEN], name);
            assert_eq!(&key[..], &p[NAME_FIELD_LEN..]);
            if let Ok(s) = std::str::from_utf8(name) {
                let mut out = Vec::new();
                message::encode_send_public_key(&mut out, &[7; 16], s, key).expect("fits");
                let body = &out[REQUEST_HEADER_LEN..];
                assert_eq!(body.len(), SEND_PUBLIC_KEY_LEN);
                check_canonical_name_field(&p[..NAME_FIELD_LEN], &body[..NAME_FIELD_LEN], name);
                assert_eq!(&body[NAME_FIELD_LEN..], &key[..]);
            }
            // The RSA path the session runs on a hostile key: parse, then encrypt to it.
            if let Ok(pk) = crypto::PublicKey::from_field(key) {
                let ct = pk
                    .encrypt_session_key(&mut FuzzRng(1), &KNOWN_AES_KEY)
                    .expect("a parsed key encrypts");
                assert!(!ct.is_empty() && ct.len() <= message::MAX_ENCRYPTED_KEY_LEN);
            }
        }
        Err(DecodeError::Size { expected, actual }) => {
            assert_eq!((expected, actual), (SEND_PUBLIC_KEY_LEN, p.len()));
            assert_ne!(p.len(), SEND_PUBLIC_KEY_LEN);
        }
        Err(DecodeError::Name(NameError::Unterminated)) => {
            assert_eq!(p.len(), SEND_PUBLIC_KEY_LEN);
            assert!(!p[..NAME_FIELD_LEN].contains(&0));
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

fn send_file_payload(p: &[u8]) {
    if p.len() != SEND_FILE_FIXED_LEN {
        assert!(SendFileHead::decode(p).is_err());
    }
    let Some(fixed) = p.get(..SEND_FILE_FIXED_LEN) else {
        return;
    };
    match SendFileHead::decode(fixed) {
        Ok(head) => {
            let le32 = |i: usize| u32::from_le_bytes(fixed[i..i + 4].try_into().unwrap());
            let le16 = |i: usize| u16::from_le_bytes(fixed[i..i + 2].try_into().unwrap());
            assert_eq!(head.content_size, le32(0));
            assert_eq!(head.orig_file_size, le32(4));
            assert_eq!(head.packet_number, le16(8));
            assert_eq!(head.total_packets, le16(10));
            check_field_name(&fixed[12..], head.file_name);
            if std::str::from_utf8(head.file_name).is_ok() {
                let mut out = Vec::new();
                message::encode_send_file_head(&mut out, &[7; 16], &head).expect("fits");
                let body = &out[REQUEST_HEADER_LEN..];
                assert_eq!(body.len(), SEND_FILE_FIXED_LEN);
                assert_eq!(&body[..12], &fixed[..12]);
                check_canonical_name_field(&fixed[12..], &body[12..], head.file_name);
                assert_eq!(SendFileHead::decode(body), Ok(head));
                // (A content size over 16 MiB is never sent: the u32 payload size of the
                // header would not hold it; see the fuzz README.)
                if head.content_size <= crate::v3::MAX_CONTENT_SIZE {
                    let h = RequestHeader::parse(&out).expect("a header");
                    assert_eq!(
                        h.payload_size as u64,
                        SEND_FILE_FIXED_LEN as u64 + head.content_size as u64
                    );
                }
            }
        }
        Err(e) => {
            assert_eq!(e, DecodeError::Name(NameError::Unterminated));
            assert!(!fixed[12..].contains(&0));
        }
    }
}

fn response_payload(code: ResponseCode, p: &[u8]) {
    let Ok(r) = Response::decode(code, p) else {
        return;
    };
    assert_eq!(r.code(), code);
    let mut out = Vec::new();
    r.encode(&mut out);
    let h = ResponseHeader::parse(&out).expect("a header");
    assert_eq!((h.version, h.code), (VERSION, code));
    assert_eq!(h.payload_size as usize, out.len() - RESPONSE_HEADER_LEN);
    assert!(h.payload_size <= Response::MAX_PAYLOAD.max(message::FILE_RECEIVED_LEN as u32));
    let again = Response::decode(code, &out[RESPONSE_HEADER_LEN..]).expect("encoding decodes");
    let body = &out[RESPONSE_HEADER_LEN..];
    match &r {
        Response::Error => assert!(body.is_empty()),
        Response::FileReceived(f) => {
            // The name is decoded lossily; when it was valid UTF-8 with zero padding the
            // encoding is the input.
            if f.file_name.len() < NAME_FIELD_LEN {
                assert_eq!(again, r);
            }
            let raw = name::decode_field(&p[20..20 + NAME_FIELD_LEN]).expect("decoded");
            let canonical =
                std::str::from_utf8(raw).is_ok() && p[20 + raw.len()..275].iter().all(|&b| b == 0);
            if canonical {
                assert_eq!(body, p);
            }
        }
        _ => {
            assert_eq!(again, r);
            assert_eq!(body, p);
        }
    }
}

// ---------------------------------------------------------------------------------
// (c) the session

/// The client that exists before any input: registered with a key on file.
pub const ALICE: ClientId = [0xA1; 16];
/// A client registered without a key (its connection dropped after REGISTER).
pub const BOB: ClientId = [0xB0; 16];
/// The public key field on file for [`ALICE`] (accepted by [`KnownKey`]).
pub const ALICE_KEY: [u8; PUBLIC_KEY_LEN] = [0x30; PUBLIC_KEY_LEN];
/// Seed of the session's RNG (client ids).
pub const RNG_SEED: u64 = 0x5EED;

/// Limits of fuzzed sessions: the default, but files of at most 256 KiB so that a
/// hostile SEND_FILE cannot make the in-memory sink take gigabytes.
pub fn config() -> SessionConfig {
    SessionConfig {
        max_file_size: 256 * 1024,
        ..SessionConfig::default()
    }
}

/// Flags of the session target's first byte.
pub mod flags {
    /// Every third OpenFile fails (disk full).
    pub const FAIL_OPEN: u8 = 1;
    /// Every second Commit fails.
    pub const FAIL_COMMIT: u8 = 2;
    /// Time passes between chunks (up to a minute), and deadlines are checked.
    pub const TIME_PASSES: u8 = 4;
}

/// What a session run did (for the seed tests).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SessionReport {
    pub consumed: usize,
    pub output: Vec<u8>,
    pub files: Vec<((ClientId, String), Vec<u8>, u32)>,
    pub closing: bool,
}

/// Target `session`: see the module docs.
pub fn session(data: &[u8]) -> SessionReport {
    let (ctl, stream) = data.split_at(data.len().min(5));
    let flags = ctl.first().copied().unwrap_or(0);
    let mut seed = [0u8; 4];
    seed[..ctl.len().saturating_sub(1)].copy_from_slice(&ctl[1.min(ctl.len())..]);
    let mut rng = FuzzRng(u32::from_le_bytes(seed) as u64);
    // Seeded cut points, each with the time that passes there.
    let mut cuts = Vec::new();
    let mut at = 0usize;
    while at < stream.len() {
        let r = rng.next_u64();
        let n = match r & 3 {
            0 => 1 + (r >> 8) as usize % 8,
            1 => 1 + (r >> 8) as usize % 300,
            2 => 1 + (r >> 8) as usize % 5000,
            _ => stream.len(),
        };
        at = (at + n).min(stream.len());
        let pause = if flags & flags::TIME_PASSES != 0 {
            Duration::from_secs((r >> 40) % 64)
        } else {
            Duration::ZERO
        };
        cuts.push((at, pause));
    }
    let now = Instant::now();
    let plain = Run::new(stream, flags, false).go(now, &cuts);
    // The same stream cut also at every request boundary.
    let reqs = frame(stream);
    let mut fine: Vec<(usize, Duration)> = reqs
        .iter()
        .filter(|r| r.end <= stream.len())
        .map(|r| (r.end, Duration::ZERO))
        .collect();
    fine.extend_from_slice(&cuts);
    // A seeded cut keeps its pause; boundaries that coincide add none.
    fine.sort_by_key(|&(at, pause)| (at, std::cmp::Reverse(pause)));
    fine.dedup_by_key(|c| c.0);
    let traced = Run::new(stream, flags, true).go(now, &fine);
    assert_eq!(plain, traced, "the cut points changed the outcome");
    traced
}

/// A request as framed by its header.
#[derive(Debug, Clone)]
struct Req {
    start: usize,
    hdr_end: usize,
    /// May lie past the end of the stream.
    end: usize,
    hdr: RequestHeader,
}

fn frame(stream: &[u8]) -> Vec<Req> {
    let mut v = Vec::new();
    let mut at = 0;
    while let Ok(hdr) = RequestHeader::parse(&stream[at..]) {
        let hdr_end = at + REQUEST_HEADER_LEN;
        let end = hdr_end.saturating_add(hdr.payload_size as usize);
        v.push(Req {
            start: at,
            hdr_end,
            end,
            hdr,
        });
        if end >= stream.len() {
            break;
        }
        at = end;
    }
    v
}

/// The last 1603 sent, with the plaintext the reference reassembly gives.
struct Sent1603 {
    client: ClientId,
    name: String,
    cksum: u32,
    plain: Vec<u8>,
}

struct Run<'a> {
    stream: &'a [u8],
    flags: u8,
    /// Trace responses and ops to requests (only when cuts include every boundary).
    traced: bool,
    reqs: Vec<Req>,
    registry: MemoryBackend,
    files: HashMap<(ClientId, String), (Vec<u8>, u32)>,
    /// Lengths of the sinks handed out and not yet returned.
    sinks: Vec<usize>,
    opens: u32,
    commits: u32,
    consumed: usize,
    output: Vec<u8>,
    closed: bool,
    answered: Vec<u8>,
    errored: Vec<bool>,
    committed_in: Option<usize>,
    last_1603: Option<Sent1603>,
}

impl<'a> Run<'a> {
    fn new(stream: &'a [u8], flags: u8, traced: bool) -> Self {
        let mut registry = MemoryBackend::default();
        registry.clients.insert(
            ALICE,
            MemClient {
                name: "alice".into(),
                public_key: Some(ALICE_KEY),
            },
        );
        registry.clients.insert(
            BOB,
            MemClient {
                name: "bob".into(),
                public_key: None,
            },
        );
        let reqs = frame(stream);
        let n = reqs.len();
        Self {
            stream,
            flags,
            traced,
            reqs,
            registry,
            files: HashMap::new(),
            sinks: Vec::new(),
            opens: 0,
            commits: 0,
            consumed: 0,
            output: Vec::new(),
            closed: false,
            answered: vec![0; n],
            errored: vec![false; n],
            committed_in: None,
            last_1603: None,
        }
    }

    fn go(mut self, t0: Instant, cuts: &[(usize, Duration)]) -> SessionReport {
        let cfg = config();
        // Output and ops of one call, a decryption scratch of up to 64 KiB, and the
        // bookkeeping of the file in flight (at most its ciphertext size).
        let held_bound = 192 * 1024 + ciphertext_len(cfg.max_file_size) as usize;
        let mut s = ServerSession::with_key_exchange(cfg, FuzzRng(RNG_SEED), KnownKey, t0);
        let mut now = t0;
        let mut from = 0;
        for &(to, pause) in cuts {
            let mut window = &self.stream[from..to];
            from = to;
            while !window.is_empty() {
                let closing_before = s.is_closing();
                let used = s.handle_input(now, window);
                assert!(used <= window.len());
                if closing_before {
                    assert_eq!(used, 0, "input read after closing");
                }
                self.consumed += used;
                window = &window[used..];
                let waited = s.is_waiting();
                self.run_ops(&mut s, now);
                assert!(!s.is_waiting(), "every op was completed");
                self.take_output(&mut s, closing_before);
                assert!(s.held_bytes() <= held_bound, "{} held", s.held_bytes());
                if s.is_closing() {
                    break;
                }
                assert!(s.poll_timeout().is_some(), "an open session has a deadline");
                if s.is_idle() {
                    assert!(self.sinks.is_empty(), "idle with a file in memory");
                }
                if used == 0 {
                    assert!(waited, "the session neither read nor waited");
                }
            }
            if s.is_closing() {
                break;
            }
            if pause > Duration::ZERO {
                now += pause;
                let due = s.poll_timeout().is_some_and(|d| now >= d);
                s.handle_timeout(now);
                assert_eq!(s.is_closing(), due);
                self.run_ops(&mut s, now);
                self.take_output(&mut s, false);
                if s.is_closing() {
                    break;
                }
            }
        }
        self.closed = s.is_closing();
        let mut back: Vec<usize> = s.abort().iter().map(Vec::len).collect();
        back.sort_unstable();
        self.sinks.sort_unstable();
        assert_eq!(back, self.sinks, "abort returns exactly the sinks held");
        let mut files: Vec<_> = self
            .files
            .into_iter()
            .map(|(k, (v, c))| (k, v, c))
            .collect();
        files.sort();
        SessionReport {
            consumed: self.consumed,
            output: self.output,
            files,
            closing: self.closed,
        }
    }

    /// The request the last consumed byte belongs to (traced runs only).
    fn current(&self) -> Option<usize> {
        if !self.traced || self.consumed == 0 {
            return None;
        }
        let at = self.consumed - 1;
        let i = self.reqs.partition_point(|r| r.start <= at);
        i.checked_sub(1)
    }

    fn return_sink(&mut self, len: usize) {
        let i = self
            .sinks
            .iter()
            .position(|&l| l == len)
            .expect("a sink came back with another length than it was opened with");
        self.sinks.swap_remove(i);
    }

    fn run_ops(&mut self, s: &mut ServerSession<Vec<u8>, FuzzRng, KnownKey>, now: Instant) {
        let mut needing = 0;
        while let Some(op) = s.poll_op() {
            if op.needs_completion() {
                needing += 1;
                assert_eq!(needing, 1, "one op at a time is awaited");
                assert!(s.is_waiting());
            }
            let cur = self.current();
            let q = cur.map(|i| self.reqs[i].clone());
            let at_end = q.as_ref().is_none_or(|q| q.end == self.consumed);
            let done = match op {
                Op::Discard { sink } => {
                    self.return_sink(sink.len());
                    None
                }
                Op::OpenFile {
                    client_id,
                    file_name,
                    len,
                } => {
                    let max = ciphertext_len(config().max_file_size);
                    assert!(len <= max && len.is_multiple_of(16) && len >= 16);
                    assert_eq!(name::check_file_name(file_name.as_bytes()), Ok(&*file_name));
                    if let Some(q) = &q {
                        assert_eq!(q.hdr.code, RequestCode::SendFile);
                        assert_eq!(self.consumed, q.hdr_end + SEND_FILE_FIXED_LEN);
                        assert_eq!(client_id, q.hdr.client_id);
                        let head = SendFileHead::decode(
                            &self.stream[q.hdr_end..q.hdr_end + SEND_FILE_FIXED_LEN],
                        )
                        .expect("decodes");
                        assert_eq!(head.packet_number, 1);
                        assert_eq!(head.file_name, file_name.as_bytes());
                        assert_eq!(len, ciphertext_len(head.orig_file_size as u64));
                    }
                    // A new packet 1 discards a file waiting for its CRC_OK.
                    self.last_1603 = None;
                    self.opens += 1;
                    if self.flags & flags::FAIL_OPEN != 0 && self.opens.is_multiple_of(3) {
                        Some(Completion::FileOpened(Err(OpError::storage("disk full"))))
                    } else {
                        self.sinks.push(len as usize);
                        Some(Completion::FileOpened(Ok(vec![0u8; len as usize])))
                    }
                }
                Op::Commit {
                    client_id,
                    file_name,
                    sink,
                    size,
                    cksum: sum,
                } => {
                    self.return_sink(sink.len());
                    assert_eq!(sink.len() as u64, ciphertext_len(size));
                    if let Some(q) = &q {
                        let p = self
                            .last_1603
                            .take()
                            .expect("a commit without a 1603 the client could confirm");
                        assert_eq!(
                            (p.client, &p.name, p.cksum),
                            (client_id, &file_name, sum),
                            "the commit is not what the last 1603 announced"
                        );
                        assert_eq!(size as usize, p.plain.len());
                        assert_eq!(&sink[..size as usize], &p.plain[..], "committed bytes");
                        assert!(at_end);
                        assert_eq!(q.hdr.code, RequestCode::CrcOk);
                        assert_eq!(q.hdr.client_id, client_id);
                        let raw = message::decode_name_payload(&self.stream[q.hdr_end..q.end])
                            .expect("decodes");
                        assert_eq!(raw, file_name.as_bytes(), "CRC_OK named another file");
                    }
                    self.commits += 1;
                    if self.flags & flags::FAIL_COMMIT != 0 && self.commits.is_multiple_of(2) {
                        Some(Completion::Committed(Err(OpError::storage("fsync failed"))))
                    } else {
                        let mut data = sink;
                        data.truncate(size as usize);
                        self.files.insert((client_id, file_name), (data, sum));
                        self.committed_in = cur;
                        Some(Completion::Committed(Ok(())))
                    }
                }
                op => {
                    if let Some(q) = &q {
                        assert!(at_end, "{op:?} before the whole request was read");
                        let want = match &op {
                            Op::Register { client_id, name } => {
                                assert_eq!(client_id[6] >> 4, 4, "UUIDv4");
                                assert_eq!(name::check_user_name(name.as_bytes()), Ok(&**name));
                                RequestCode::Register
                            }
                            Op::StorePublicKey { client_id, .. } => {
                                assert_eq!(*client_id, q.hdr.client_id);
                                RequestCode::SendPublicKey
                            }
                            Op::Reconnect { client_id, .. } => {
                                assert_eq!(*client_id, q.hdr.client_id);
                                RequestCode::Reconnect
                            }
                            _ => unreachable!(),
                        };
                        assert_eq!(q.hdr.code, want);
                    }
                    self.registry.execute(op)
                }
            };
            if let Some(c) = done {
                s.complete(now, c);
            }
            assert!(self.sinks.len() <= 2, "a session holds at most two files");
        }
    }

    fn take_output(
        &mut self,
        s: &mut ServerSession<Vec<u8>, FuzzRng, KnownKey>,
        closing_before: bool,
    ) {
        let out = s.output().to_vec();
        s.clear_output();
        if closing_before {
            assert!(out.is_empty(), "an answer after closing");
        }
        let mut rest = &out[..];
        while !rest.is_empty() {
            let h = ResponseHeader::parse(rest).expect("whole response headers");
            assert_eq!(h.version, VERSION);
            let end = RESPONSE_HEADER_LEN + h.payload_size as usize;
            let r = Response::decode(h.code, &rest[RESPONSE_HEADER_LEN..end]).expect("decodes");
            let mut again = Vec::new();
            r.encode(&mut again);
            assert_eq!(&again[..], &rest[..end], "responses are canonical");
            rest = &rest[end..];
            if self.traced {
                self.trace(s, r);
            }
        }
        self.output.extend_from_slice(&out);
    }

    /// Checks one response of a traced run against the request it answers.
    fn trace(&mut self, s: &ServerSession<Vec<u8>, FuzzRng, KnownKey>, r: Response) {
        let i = self.current().expect("an answer before any request");
        let q = self.reqs[i].clone();
        self.answered[i] += 1;
        assert_eq!(self.answered[i], 1, "two answers to one request");
        if r == Response::Error {
            self.errored[i] = true;
            return;
        }
        assert_eq!(
            self.consumed, q.end,
            "{r:?} before the whole request was read"
        );
        assert_eq!(q.hdr.version, VERSION);
        let payload = &self.stream[q.hdr_end..q.end];
        let id = q.hdr.client_id;
        match (q.hdr.code, &r) {
            (RequestCode::Register, Response::RegisterOk { client_id }) => {
                assert_eq!(client_id[6] >> 4, 4, "UUIDv4");
                assert_eq!(s.client_id(), Some(*client_id));
                self.last_1603 = None;
            }
            (RequestCode::Register, Response::RegisterFailed) => {}
            (
                RequestCode::SendPublicKey,
                Response::AesKey {
                    client_id,
                    encrypted_key,
                },
            )
            | (
                RequestCode::Reconnect,
                Response::ReconnectOk {
                    client_id,
                    encrypted_key,
                },
            ) => {
                assert_eq!(*client_id, id);
                assert_eq!(&encrypted_key[..32], &KNOWN_AES_KEY[..]);
                assert_eq!(s.client_id(), Some(id));
                if self.last_1603.as_ref().is_some_and(|p| p.client != id) {
                    self.last_1603 = None;
                }
            }
            (RequestCode::Reconnect, Response::ReconnectRejected { client_id }) => {
                assert_eq!(*client_id, id);
            }
            (RequestCode::SendFile, Response::FileReceived(f)) => {
                assert_eq!(f.client_id, id);
                self.check_1603(i, f);
            }
            (
                code @ (RequestCode::CrcOk | RequestCode::CrcRetry | RequestCode::CrcAbort),
                Response::Ack { client_id },
            ) => {
                assert_eq!(*client_id, id);
                let committed = self.committed_in.take() == Some(i);
                assert_eq!(
                    code == RequestCode::CrcOk,
                    committed,
                    "ACK without a commit"
                );
                if code != RequestCode::CrcOk {
                    let raw = message::decode_name_payload(payload).expect("decodes");
                    if self
                        .last_1603
                        .as_ref()
                        .is_some_and(|p| p.name.as_bytes() == raw)
                    {
                        self.last_1603 = None;
                    }
                }
            }
            (code, r) => panic!("{r:?} is no answer to {code:?}"),
        }
    }

    /// A 1603 after request `k`: the packets since the last packet 1 must be a whole
    /// file, which the reference (whole-buffer) decryption accepts, with this checksum.
    fn check_1603(&mut self, k: usize, f: &message::FileReceived) {
        let stream: &'a [u8] = self.stream;
        let head_of = |r: &Req| {
            if r.hdr.code != RequestCode::SendFile || r.end > stream.len() {
                return None;
            }
            SendFileHead::decode(stream.get(r.hdr_end..r.hdr_end + SEND_FILE_FIXED_LEN)?).ok()
        };
        let first = (0..=k)
            .rev()
            .find(|&j| head_of(&self.reqs[j]).is_some_and(|h| h.packet_number == 1))
            .expect("a 1603 without a packet 1");
        let mut parts: Vec<(u16, &[u8])> = Vec::new();
        let h1 = head_of(&self.reqs[first]).expect("decodes");
        for j in first..=k {
            let r = &self.reqs[j];
            if r.hdr.code != RequestCode::SendFile {
                continue;
            }
            assert!(!self.errored[j], "a refused packet became part of a file");
            let h = head_of(r).expect("an accepted packet decodes");
            assert_eq!(
                (h.file_name, h.orig_file_size, h.total_packets),
                (h1.file_name, h1.orig_file_size, h1.total_packets)
            );
            parts.push((
                h.packet_number,
                &stream[r.hdr_end + SEND_FILE_FIXED_LEN..r.end],
            ));
        }
        parts.sort_by_key(|p| p.0);
        let numbers: Vec<u16> = parts.iter().map(|p| p.0).collect();
        let want: Vec<u16> = (1..=h1.total_packets).collect();
        assert_eq!(numbers, want, "a 1603 before every packet was in");
        let cipher: Vec<u8> = parts.iter().flat_map(|p| p.1.iter().copied()).collect();
        let orig = h1.orig_file_size as u64;
        assert_eq!(cipher.len() as u64, ciphertext_len(orig));
        assert_eq!(f.content_size as usize, cipher.len());
        assert_eq!(f.file_name.as_bytes(), h1.file_name);
        let plain = crypto::decrypt(&KNOWN_AES_KEY, &cipher)
            .expect("the session accepted a file the reference decryption refuses");
        assert_eq!(plain.len() as u64, orig);
        assert_eq!(f.cksum, cksum(&plain), "1603 checksum");
        self.last_1603 = Some(Sent1603 {
            client: f.client_id,
            name: f.file_name.clone(),
            cksum: f.cksum,
            plain,
        });
    }
}

// ---------------------------------------------------------------------------------
// Seeds

/// The request stream of a client of the [`session`] target (ids as a [`KnownKey`]
/// session with [`RNG_SEED`] issues them).
#[derive(Debug, Default)]
pub struct Script {
    pub bytes: Vec<u8>,
}

impl Script {
    /// The id the `n`th successful REGISTER of a session gets (from 0).
    pub fn registered_id(n: usize) -> ClientId {
        let mut rng = FuzzRng(RNG_SEED);
        let mut id = [0u8; 16];
        for _ in 0..=n {
            rng.fill_bytes(&mut id);
        }
        id[6] = (id[6] & 0x0F) | 0x40;
        id[8] = (id[8] & 0x3F) | 0x80;
        id
    }

    pub fn name_request(&mut self, id: &ClientId, code: RequestCode, name: &str) -> &mut Self {
        message::encode_name_request(&mut self.bytes, id, code, name).expect("name fits");
        self
    }

    pub fn public_key(&mut self, id: &ClientId, name: &str) -> &mut Self {
        message::encode_send_public_key(&mut self.bytes, id, name, &ALICE_KEY).expect("fits");
        self
    }

    /// A file cut into packets of `packet` bytes, sent in `order` (packet numbers from
    /// 1; missing ones are not sent).
    pub fn file(
        &mut self,
        id: &ClientId,
        name: &str,
        data: &[u8],
        packet: usize,
        order: &[u16],
    ) -> &mut Self {
        let ct = crypto::encrypt(&KNOWN_AES_KEY, data);
        let chunks: Vec<&[u8]> = ct.chunks(packet).collect();
        for &k in order {
            message::encode_send_file(
                &mut self.bytes,
                id,
                name,
                data.len() as u32,
                k,
                chunks.len() as u16,
                chunks[k as usize - 1],
            )
            .expect("name fits");
        }
        self
    }

    /// Packets numbered in order, of the given sizes (multiples of 16 that add up).
    pub fn file_cut(
        &mut self,
        id: &ClientId,
        name: &str,
        data: &[u8],
        sizes: &[usize],
    ) -> &mut Self {
        let ct = crypto::encrypt(&KNOWN_AES_KEY, data);
        let mut at = 0;
        for (i, &n) in sizes.iter().enumerate() {
            message::encode_send_file(
                &mut self.bytes,
                id,
                name,
                data.len() as u32,
                i as u16 + 1,
                sizes.len() as u16,
                &ct[at..at + n],
            )
            .expect("name fits");
            at += n;
        }
        self
    }

    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }

    /// As a `session` input: flags, split seed, stream.
    pub fn input(&self, flags: u8, split_seed: u32) -> Vec<u8> {
        let mut v = vec![flags];
        v.extend_from_slice(&split_seed.to_le_bytes());
        v.extend_from_slice(&self.bytes);
        v
    }
}

/// A real RSA-1024 public key field (exponent 17, 160 bytes), made once.
fn rsa_public_key() -> &'static [u8] {
    static DER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DER.get_or_init(|| {
        crypto::ClientKeypair::generate(&mut FuzzRng(17))
            .expect("RSA key generation")
            .public_der()
            .to_vec()
    })
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The seed corpus, as (target, name, bytes): valid streams and the test vectors.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    use RequestCode as C;
    let mut v: Vec<(&'static str, String, Vec<u8>)> = Vec::new();
    let zero = [0u8; 16];
    let me = Script::registered_id(0);

    // session
    let mut s = Script::default();
    s.name_request(&zero, C::Register, "carol")
        .public_key(&me, "carol")
        .file(&me, "a.txt", b"hello", 1024, &[1])
        .name_request(&me, C::CrcOk, "a.txt");
    v.push(("session", "upload_one_packet".into(), s.input(0, 0)));
    v.push(("session", "upload_one_packet_split".into(), s.input(0, 7)));

    let d = pattern(3000, 1);
    let mut s = Script::default();
    s.name_request(&zero, C::Register, "dave")
        .public_key(&me, "dave")
        .file(&me, "r.bin", &d, 512, &[1, 6, 3, 5, 2, 4])
        .name_request(&me, C::CrcRetry, "r.bin")
        .file(&me, "r.bin", &d, 512, &[1, 2, 3, 4, 5, 6])
        .name_request(&me, C::CrcOk, "r.bin")
        .file(&me, "empty", b"", 16, &[1])
        .name_request(&me, C::CrcAbort, "empty");
    v.push(("session", "retry_reorder_abort".into(), s.input(0, 3)));
    v.push((
        "session",
        "retry_reorder_abort_failures".into(),
        s.input(
            flags::FAIL_OPEN | flags::FAIL_COMMIT | flags::TIME_PASSES,
            11,
        ),
    ));

    let d = pattern(100, 2);
    let mut s = Script::default();
    s.name_request(&ALICE, C::Reconnect, "alice")
        .file_cut(&ALICE, "v", &d, &[32, 64, 16])
        .name_request(&ALICE, C::CrcOk, "v")
        .file(&ALICE, "w", &pattern(40, 3), 16, &[1, 3, 2])
        .name_request(&ALICE, C::CrcOk, "w");
    v.push(("session", "reconnect_uneven_packets".into(), s.input(0, 5)));
    v.push((
        "session",
        "reconnect_second_commit_fails".into(),
        s.input(flags::FAIL_COMMIT, 5),
    ));

    let mut s = Script::default();
    s.public_key(&BOB, "bob")
        .file(&BOB, "b", &pattern(20, 4), 32, &[1])
        .name_request(&BOB, C::CrcOk, "b")
        .name_request(&zero, C::Reconnect, "nobody")
        .name_request(&zero, C::Register, "erin")
        .name_request(&zero, C::Register, "erin");
    v.push(("session", "bob_finishes_registration".into(), s.input(0, 9)));

    let mut bad = Script::default();
    let d = pattern(1000, 5);
    bad.name_request(&zero, C::Register, "frank")
        .public_key(&me, "frank")
        .file(&me, "p", &d, 256, &[2])
        .file(&me, "p", &d, 256, &[1, 2, 2])
        .file(&me, "../x", b"x", 16, &[1])
        .name_request(&me, C::CrcOk, "p");
    let mut tampered = crypto::encrypt(&KNOWN_AES_KEY, b"tamper");
    tampered[15] ^= 0x55;
    message::encode_send_file(&mut bad.bytes, &me, "t", 6, 1, 1, &tampered).expect("fits");
    let unknown = RequestHeader {
        client_id: me,
        version: VERSION,
        code: RequestCode::Unknown(1099),
        payload_size: 4,
    };
    bad.raw(&unknown.to_bytes()).raw(b"junk");
    bad.name_request(&me, C::Register, "bad\nname");
    let old = RequestHeader {
        client_id: me,
        version: 2,
        code: C::Register,
        payload_size: 255,
    };
    bad.raw(&old.to_bytes());
    v.push(("session", "refusals".into(), bad.input(0, 1)));

    // request_payload: code, then payload
    let with_code = |code: u16, frame: &[u8], skip: usize| {
        let mut b = code.to_le_bytes().to_vec();
        b.extend_from_slice(&frame[skip..]);
        b
    };
    for (code, name) in [
        (1025u16, "alice"),
        (1027, "alice"),
        (1029, "report.pdf"),
        (1030, "été.txt"),
        (1031, "a"),
    ] {
        let mut f = Vec::new();
        message::encode_name_request(&mut f, &zero, code.into(), name).expect("fits");
        v.push((
            "request_payload",
            format!("name_{code}"),
            with_code(code, &f, 23),
        ));
    }
    let mut f = Vec::new();
    message::encode_send_public_key(&mut f, &me, "alice", &ALICE_KEY).expect("fits");
    v.push((
        "request_payload",
        "send_public_key".into(),
        with_code(1026, &f, 23),
    ));
    let mut f = Vec::new();
    message::encode_send_public_key(&mut f, &me, "alice", rsa_public_key()).expect("fits");
    v.push((
        "request_payload",
        "send_public_key_rsa".into(),
        with_code(1026, &f, 23),
    ));
    let mut f = Vec::new();
    message::encode_send_file(&mut f, &me, "x.bin", 17, 1, 2, &[9; 32]).expect("fits");
    v.push((
        "request_payload",
        "send_file".into(),
        with_code(1028, &f, 23),
    ));
    let responses = [
        Response::RegisterOk { client_id: me },
        Response::RegisterFailed,
        Response::AesKey {
            client_id: me,
            encrypted_key: vec![5; 128],
        },
        Response::FileReceived(message::FileReceived {
            client_id: me,
            content_size: 1024,
            file_name: "a.txt".into(),
            cksum: cksum(b"123456789"),
        }),
        Response::Ack { client_id: me },
        Response::ReconnectOk {
            client_id: me,
            encrypted_key: vec![6; 128],
        },
        Response::ReconnectRejected { client_id: me },
        Response::Error,
    ];
    for r in responses {
        let mut f = Vec::new();
        r.encode(&mut f);
        let code = u16::from(r.code());
        v.push((
            "request_payload",
            format!("response_{code}"),
            with_code(code, &f, 7),
        ));
    }

    // request_header
    for (name, code, size) in [
        ("register", 1025u16, 255u32),
        ("send_file", 1028, 267 + 16),
        ("unknown", 1099, 3),
        ("too_large", 1028, MAX_PAYLOAD_SIZE + 1),
    ] {
        let h = RequestHeader {
            client_id: me,
            version: VERSION,
            code: code.into(),
            payload_size: size,
        };
        v.push(("request_header", name.into(), h.to_bytes().to_vec()));
    }
    v
}

#[cfg(test)]
mod tests;
