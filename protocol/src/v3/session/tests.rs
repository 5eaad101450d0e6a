//! Session tests on the in-memory backend: every flow and every row of the Errors
//! table of PROTOCOL.md, and arbitrary splits and reorders of valid byte streams.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::memory::MemoryBackend;
use super::*;
use crate::v3::crypto::{self, ClientKeypair};
use crate::v3::header::{ResponseCode, ResponseHeader, RESPONSE_HEADER_LEN};
use crate::v3::message::{encode_name_request, encode_send_file, encode_send_public_key, Response};

type Sess = ServerSession<Vec<u8>, StdRng>;

fn keypair() -> &'static ClientKeypair {
    static KP: OnceLock<ClientKeypair> = OnceLock::new();
    KP.get_or_init(|| ClientKeypair::generate(&mut StdRng::seed_from_u64(1)).unwrap())
}

fn session(now: Instant) -> Sess {
    ServerSession::new(SessionConfig::default(), StdRng::seed_from_u64(2), now)
}

/// Splits an output buffer into responses.
fn responses(mut out: &[u8]) -> Vec<Response> {
    let mut v = Vec::new();
    while !out.is_empty() {
        let h = ResponseHeader::parse(out).expect("whole header");
        let end = RESPONSE_HEADER_LEN + h.payload_size as usize;
        v.push(Response::decode(h.code, &out[RESPONSE_HEADER_LEN..end]).expect("decodes"));
        out = &out[end..];
    }
    v
}

fn take(s: &mut Sess) -> Vec<Response> {
    let r = responses(s.output());
    s.clear_output();
    r
}

struct Client {
    id: ClientId,
    key: crypto::AesKey,
}

/// Registers `name` and exchanges keys; returns the client id and the session key.
fn login(b: &mut MemoryBackend, s: &mut Sess, now: Instant, name: &str) -> Client {
    let mut req = Vec::new();
    encode_name_request(&mut req, &[0; 16], RequestCode::Register, name).unwrap();
    assert_eq!(b.feed(s, now, &req), req.len());
    let Response::RegisterOk { client_id } = take(s).remove(0) else {
        panic!("register failed")
    };
    req.clear();
    encode_send_public_key(&mut req, &client_id, name, keypair().public_der()).unwrap();
    b.feed(s, now, &req);
    let Response::AesKey {
        client_id: id2,
        encrypted_key,
    } = take(s).remove(0)
    else {
        panic!("no AES key")
    };
    assert_eq!(id2, client_id);
    let key = keypair().decrypt_session_key(&encrypted_key).unwrap();
    Client { id: client_id, key }
}

/// The packets of one file as (number, bytes), in order.
fn packets(c: &Client, name: &str, data: &[u8], packet: usize) -> Vec<Vec<u8>> {
    let ct = crypto::encrypt(&c.key, data);
    let total = ct.len().div_ceil(packet);
    ct.chunks(packet)
        .enumerate()
        .map(|(i, chunk)| {
            let mut out = Vec::new();
            encode_send_file(
                &mut out,
                &c.id,
                name,
                data.len() as u32,
                i as u16 + 1,
                total as u16,
                chunk,
            )
            .unwrap();
            out
        })
        .collect()
}

fn crc_req(c: &Client, code: RequestCode, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    encode_name_request(&mut out, &c.id, code, name).unwrap();
    out
}

fn data(n: usize, seed: u64) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn upload(
    b: &mut MemoryBackend,
    s: &mut Sess,
    now: Instant,
    c: &Client,
    name: &str,
    data: &[u8],
    packet: usize,
) {
    for p in packets(c, name, data, packet) {
        b.feed(s, now, &p);
    }
    let r = take(s);
    assert_eq!(r.len(), 1, "one 1603 after the last packet");
    let Response::FileReceived(f) = &r[0] else {
        panic!("expected 1603, got {r:?}")
    };
    assert_eq!(f.cksum, crate::v3::cksum(data));
    assert_eq!(
        f.content_size as u64,
        crypto::ciphertext_len(data.len() as u64)
    );
    assert_eq!(f.file_name, name);
    b.feed(s, now, &crc_req(c, RequestCode::CrcOk, name));
    assert_eq!(take(s), vec![Response::Ack { client_id: c.id }]);
}

#[test]
fn register_then_duplicate_name_fails() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    login(&mut b, &mut s, now, "alice");
    let mut s2 = session(now);
    let mut req = Vec::new();
    encode_name_request(&mut req, &[0; 16], RequestCode::Register, "alice").unwrap();
    b.feed(&mut s2, now, &req);
    assert_eq!(take(&mut s2), vec![Response::RegisterFailed]);
    assert!(!s2.is_closing());
}

#[test]
fn files_of_every_edge_size_in_several_packet_sizes() {
    let now = Instant::now();
    for packet in [16usize, 64, 4096, 65_536] {
        let mut b = MemoryBackend::default();
        let mut s = session(now);
        let c = login(&mut b, &mut s, now, "bob");
        for (i, n) in [0usize, 1, 15, 16, 17, 65_536, 67_584]
            .into_iter()
            .enumerate()
        {
            if packet == 16 && n > 4096 {
                continue;
            }
            let d = data(n, i as u64);
            let name = format!("f{n}.bin");
            upload(&mut b, &mut s, now, &c, &name, &d, packet);
            assert_eq!(b.files[&(c.id, name)].0, d, "size {n} packet {packet}");
        }
        assert_eq!(b.open_sinks, 0);
    }
}

#[test]
fn out_of_order_packets_reassemble() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let c = login(&mut b, &mut s, now, "carol");
    let d = data(10_000, 9);
    let mut ps = packets(&c, "o.bin", &d, 1024);
    // packet 1 first, then the rest reversed: every packet arrives ahead of a gap
    let first = ps.remove(0);
    b.feed(&mut s, now, &first);
    for p in ps.iter().rev() {
        b.feed(&mut s, now, p);
    }
    let r = take(&mut s);
    let Response::FileReceived(f) = &r[0] else {
        panic!("{r:?}")
    };
    assert_eq!(f.cksum, crate::v3::cksum(&d));
    b.feed(&mut s, now, &crc_req(&c, RequestCode::CrcOk, "o.bin"));
    assert_eq!(b.files[&(c.id, "o.bin".to_string())].0, d);
}

#[test]
fn in_order_packets_may_differ_in_size_but_not_out_of_order() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let c = login(&mut b, &mut s, now, "dave");
    let d = data(100, 3);
    let ct = crypto::encrypt(&c.key, &d); // 112 bytes: 32 + 64 + 16
    let cuts = [(0, 32), (32, 96), (96, 112)];
    let mk = |i: usize| {
        let mut out = Vec::new();
        let (a, z) = cuts[i];
        encode_send_file(&mut out, &c.id, "v", 100, i as u16 + 1, 3, &ct[a..z]).unwrap();
        out
    };
    for i in 0..3 {
        b.feed(&mut s, now, &mk(i));
    }
    let r = take(&mut s);
    assert!(
        matches!(&r[0], Response::FileReceived(f) if f.cksum == crate::v3::cksum(&d)),
        "{r:?}"
    );
    // the same sizes with packet 3 before packet 2: refused (stride unknown)
    b.feed(&mut s, now, &mk(0));
    b.feed(&mut s, now, &mk(2));
    assert_eq!(take(&mut s), vec![Response::Error]);
    assert!(!s.is_closing());
}

#[test]
fn the_largest_packet_count_works_in_and_out_of_order() {
    // 65535 packets of 16 bytes: packet numbers reach u16::MAX.
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let c = login(&mut b, &mut s, now, "many");
    let d = data(65_535 * 16 - 16, 11);
    let ps = packets(&c, "many", &d, 16);
    assert_eq!(ps.len(), 65_535);
    let mut stream: Vec<u8> = ps.concat();
    stream.extend_from_slice(&crc_req(&c, RequestCode::CrcOk, "many"));
    b.feed(&mut s, now, &stream);
    let r = take(&mut s);
    assert!(
        matches!(&r[0], Response::FileReceived(f) if f.cksum == crate::v3::cksum(&d)),
        "{:?}",
        &r[..1]
    );
    assert_eq!(b.files[&(c.id, "many".to_string())].0, d);
    // the last packet first, then the others
    let mut order = vec![ps[0].clone(), ps[65_534].clone()];
    order.extend(ps[1..65_534].iter().cloned());
    b.feed(&mut s, now, &order.concat());
    assert!(
        matches!(&take(&mut s)[0], Response::FileReceived(f) if f.cksum == crate::v3::cksum(&d))
    );
}

#[test]
fn a_pending_file_is_never_committed_under_another_identity() {
    // Mallory uploads a file, then reconnects as the victim (name and id travel in
    // clear) and sends CRC_OK with the victim's id: nothing may land in the victim's
    // directory.
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut sv = session(now);
    let victim = login(&mut b, &mut sv, now, "victim");
    let mut s = ServerSession::new(SessionConfig::default(), StdRng::seed_from_u64(3), now);
    let mallory = login(&mut b, &mut s, now, "mallory");
    for p in packets(&mallory, "report.doc", b"evil", 64) {
        b.feed(&mut s, now, &p);
    }
    assert!(matches!(take(&mut s)[0], Response::FileReceived(_)));
    let mut req = Vec::new();
    encode_name_request(&mut req, &victim.id, RequestCode::Reconnect, "victim").unwrap();
    b.feed(&mut s, now, &req);
    let r = take(&mut s);
    assert!(matches!(r[0], Response::ReconnectOk { .. }), "{r:?}");
    let forged = Client {
        id: victim.id,
        key: [0; 32],
    };
    b.feed(
        &mut s,
        now,
        &crc_req(&forged, RequestCode::CrcOk, "report.doc"),
    );
    assert_eq!(take(&mut s), vec![Response::Error]);
    assert!(!b.files.contains_key(&(victim.id, "report.doc".to_string())));
    assert!(!b
        .files
        .contains_key(&(mallory.id, "report.doc".to_string())));
    assert_eq!(b.open_sinks, 0, "the pending file was discarded");
}

#[test]
fn a_last_packet_larger_than_packet_one_may_arrive_early() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let c = login(&mut b, &mut s, now, "lastbig");
    let d = data(100, 8);
    let ct = crypto::encrypt(&c.key, &d); // 112 bytes: 32 + 32 + 48
    let cuts = [(0, 32), (32, 64), (64, 112)];
    let mk = |i: usize| {
        let mut out = Vec::new();
        let (a, z) = cuts[i];
        encode_send_file(&mut out, &c.id, "v", 100, i as u16 + 1, 3, &ct[a..z]).unwrap();
        out
    };
    for i in [0, 2, 1] {
        b.feed(&mut s, now, &mk(i));
    }
    let r = take(&mut s);
    assert!(
        matches!(&r[0], Response::FileReceived(f) if f.cksum == crate::v3::cksum(&d)),
        "{r:?}"
    );
}

#[test]
fn repeated_files_that_do_not_decrypt_close_the_connection() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let c = login(&mut b, &mut s, now, "guesser");
    for i in 0..MAX_BAD_FILES {
        let mut req = Vec::new();
        encode_send_file(&mut req, &c.id, "g", 15, 1, 1, &[i; 16]).unwrap();
        b.feed(&mut s, now, &req);
        assert_eq!(take(&mut s), vec![Response::Error]);
        assert_eq!(s.is_closing(), i + 1 == MAX_BAD_FILES);
    }
}

#[test]
fn crc_retry_then_ok_and_abort_leaves_nothing() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let c = login(&mut b, &mut s, now, "erin");
    let d = data(5000, 4);
    for p in packets(&c, "r.bin", &d, 1024) {
        b.feed(&mut s, now, &p);
    }
    assert!(matches!(take(&mut s)[0], Response::FileReceived(_)));
    b.feed(&mut s, now, &crc_req(&c, RequestCode::CrcRetry, "r.bin"));
    assert_eq!(take(&mut s), vec![Response::Ack { client_id: c.id }]);
    assert_eq!(b.discarded, 1);
    upload(&mut b, &mut s, now, &c, "r.bin", &d, 1024);
    assert_eq!(b.files[&(c.id, "r.bin".to_string())].0, d);

    for p in packets(&c, "a.bin", &d, 1024) {
        b.feed(&mut s, now, &p);
    }
    take(&mut s);
    b.feed(&mut s, now, &crc_req(&c, RequestCode::CrcAbort, "a.bin"));
    assert_eq!(take(&mut s), vec![Response::Ack { client_id: c.id }]);
    assert!(!b.files.contains_key(&(c.id, "a.bin".to_string())));
    assert_eq!(b.open_sinks, 0);
}

#[test]
fn reconnect_flows() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let c = login(&mut b, &mut s, now, "frank");

    let mut s2 = session(now);
    let mut req = Vec::new();
    encode_name_request(&mut req, &c.id, RequestCode::Reconnect, "frank").unwrap();
    b.feed(&mut s2, now, &req);
    let Response::ReconnectOk {
        client_id,
        encrypted_key,
    } = take(&mut s2).remove(0)
    else {
        panic!()
    };
    assert_eq!(client_id, c.id);
    let key = keypair().decrypt_session_key(&encrypted_key).unwrap();
    let c2 = Client { id: c.id, key };
    upload(&mut b, &mut s2, now, &c2, "after-reconnect", b"hello", 64);

    // unknown name, zero id: rejected, may register on the same connection
    let mut s3 = session(now);
    req.clear();
    encode_name_request(&mut req, &[0; 16], RequestCode::Reconnect, "nobody").unwrap();
    b.feed(&mut s3, now, &req);
    assert_eq!(
        take(&mut s3),
        vec![Response::ReconnectRejected { client_id: [0; 16] }]
    );
    assert!(!s3.is_closing());
    login(&mut b, &mut s3, now, "nobody");

    // unknown client id: 1606 and close
    let mut s4 = session(now);
    req.clear();
    encode_name_request(&mut req, &[7; 16], RequestCode::Reconnect, "frank").unwrap();
    b.feed(&mut s4, now, &req);
    assert_eq!(
        take(&mut s4),
        vec![Response::ReconnectRejected { client_id: [7; 16] }]
    );
    assert!(s4.is_closing());
}

#[test]
fn public_key_for_someone_elses_id_is_refused() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let victim = login(&mut b, &mut s, now, "victim");
    let mut s2 = session(now);
    let mut req = Vec::new();
    encode_send_public_key(&mut req, &victim.id, "victim", keypair().public_der()).unwrap();
    b.feed(&mut s2, now, &req);
    assert_eq!(take(&mut s2), vec![Response::Error]);
    assert!(s2.is_closing());
    // unknown id
    let mut s3 = session(now);
    req.clear();
    encode_send_public_key(&mut req, &[5; 16], "x", keypair().public_der()).unwrap();
    b.feed(&mut s3, now, &req);
    assert_eq!(take(&mut s3), vec![Response::Error]);
    assert!(s3.is_closing());
}

fn header(id: ClientId, version: u8, code: u16, size: u32) -> Vec<u8> {
    RequestHeader {
        client_id: id,
        version,
        code: code.into(),
        payload_size: size,
    }
    .to_bytes()
    .to_vec()
}

#[test]
fn errors_table_version_closes() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let mut req = header([0; 16], 2, 1025, 255);
    req.extend_from_slice(&[0; 255]);
    b.feed(&mut s, now, &req);
    assert_eq!(take(&mut s), vec![Response::Error]);
    assert!(s.is_closing());
    assert_eq!(s.last_refusal(), Some(Refusal::Version));
}

#[test]
fn errors_table_oversized_payload_is_not_read() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let mut req = header([0; 16], 3, 1028, MAX_PAYLOAD_SIZE + 1);
    req.extend_from_slice(&[0; 1000]);
    let used = b.feed(&mut s, now, &req);
    assert_eq!(used, 23, "nothing of the payload is consumed");
    assert_eq!(take(&mut s), vec![Response::Error]);
    assert!(s.is_closing());
}

#[test]
fn errors_table_wrong_payload_size_closes() {
    let now = Instant::now();
    for (code, size) in [
        (1025u16, 254u32),
        (1026, 255),
        (1027, 0),
        (1028, 266),
        (1029, 256),
    ] {
        let mut b = MemoryBackend::default();
        let mut s = session(now);
        let c = login(&mut b, &mut s, now, "gina");
        let mut req = header(c.id, 3, code, size);
        req.resize(23 + size as usize, 0);
        b.feed(&mut s, now, &req);
        assert_eq!(take(&mut s), vec![Response::Error], "code {code}");
        assert!(s.is_closing(), "code {code}");
        assert_eq!(s.last_refusal(), Some(Refusal::PayloadSize));
    }
}

#[test]
fn errors_table_unknown_client_id_closes() {
    let now = Instant::now();
    for code in [1028u16, 1029, 1030, 1031] {
        let mut b = MemoryBackend::default();
        let mut s = session(now);
        login(&mut b, &mut s, now, "hank");
        let size = if code == 1028 { 267 + 16 } else { 255 };
        let mut req = header([9; 16], 3, code, size);
        req.resize(23 + size as usize, 0);
        b.feed(&mut s, now, &req);
        assert_eq!(take(&mut s), vec![Response::Error], "code {code}");
        assert!(s.is_closing());
    }
    // a file before any key exchange
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let mut req = header([0; 16], 3, 1028, 267 + 16);
    req.resize(23 + 267 + 16, 0);
    b.feed(&mut s, now, &req);
    assert_eq!(take(&mut s), vec![Response::Error]);
    assert!(s.is_closing());
}

#[test]
fn errors_table_unknown_code_keeps_connection() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let mut req = header([0; 16], 3, 1099, 10);
    req.extend_from_slice(&[0xEE; 10]);
    encode_name_request(&mut req, &[0; 16], RequestCode::Register, "ivy").unwrap();
    b.feed(&mut s, now, &req);
    let r = take(&mut s);
    assert_eq!(r[0], Response::Error);
    assert!(matches!(r[1], Response::RegisterOk { .. }));
    assert!(!s.is_closing());
}

#[test]
fn errors_table_bad_packets_drop_the_transfer() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let c = login(&mut b, &mut s, now, "jack");
    let d = data(3000, 5);
    let ps = packets(&c, "p.bin", &d, 1024);
    // packet 2 before packet 1
    b.feed(&mut s, now, &ps[1]);
    assert_eq!(take(&mut s), vec![Response::Error]);
    // duplicate packet
    b.feed(&mut s, now, &ps[0]);
    b.feed(&mut s, now, &ps[0][..]);
    assert_eq!(take(&mut s), vec![]); // a new packet 1 restarts the file
    b.feed(&mut s, now, &ps[1]);
    b.feed(&mut s, now, &ps[1]);
    assert_eq!(take(&mut s), vec![Response::Error]);
    assert_eq!(b.open_sinks, 0, "the transfer was dropped");
    // the connection is still usable
    upload(&mut b, &mut s, now, &c, "p.bin", &d, 1024);

    let bad_names: [&[u8]; 4] = [b"../x", b"a/b", b"..", b"\x01"];
    for name in bad_names {
        let mut req = Vec::new();
        let head = crate::v3::message::SendFileHead {
            content_size: 16,
            orig_file_size: 1,
            packet_number: 1,
            total_packets: 1,
            file_name: name,
        };
        crate::v3::message::encode_send_file_head(&mut req, &c.id, &head).unwrap();
        req.extend_from_slice(&crypto::encrypt(&c.key, b"x"));
        b.feed(&mut s, now, &req);
        assert_eq!(take(&mut s), vec![Response::Error], "{name:?}");
        assert_eq!(s.last_refusal(), Some(Refusal::BadName));
    }
    assert!(!s.is_closing());
    // content not a multiple of 16, sizes that do not add up, total 0
    let mut req = Vec::new();
    encode_send_file(&mut req, &c.id, "z", 1, 1, 1, &[0; 15]).unwrap();
    encode_send_file(&mut req, &c.id, "z", 100, 1, 1, &[0; 16]).unwrap();
    encode_send_file(&mut req, &c.id, "z", 1, 1, 0, &[0; 16]).unwrap();
    encode_send_file(&mut req, &c.id, "z", 1, 2, 1, &[0; 16]).unwrap();
    b.feed(&mut s, now, &req);
    assert_eq!(take(&mut s), vec![Response::Error; 4]);
    assert_eq!(b.open_sinks, 0);
}

#[test]
fn tampered_ciphertext_is_caught() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let c = login(&mut b, &mut s, now, "kim");
    let d = data(40, 6);
    let mut p = packets(&c, "t", &d, 1024).remove(0);
    // flip a bit of the last ciphertext block: padding breaks
    let n = p.len();
    p[n - 1] ^= 0x55;
    b.feed(&mut s, now, &p);
    assert_eq!(take(&mut s), vec![Response::Error]);
    assert_eq!(s.last_refusal(), Some(Refusal::BadDecryption));
    // flip a bit of the first block: decrypts to garbage, the checksum shows it
    let mut p = packets(&c, "t", &d, 1024).remove(0);
    p[23 + 267] ^= 1;
    b.feed(&mut s, now, &p);
    let r = take(&mut s);
    let Response::FileReceived(f) = &r[0] else {
        panic!("{r:?}")
    };
    assert_ne!(f.cksum, crate::v3::cksum(&d));
}

#[test]
fn storage_failure_answers_1607() {
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(now);
    let c = login(&mut b, &mut s, now, "lee");
    b.fail_open = Some("no space left on device".into());
    let ps = packets(&c, "big", &data(3000, 1), 1024);
    for p in &ps {
        b.feed(&mut s, now, p);
    }
    // 1607 for packet 1; packets 2 and 3 have no transfer
    assert_eq!(take(&mut s), vec![Response::Error; 3]);
    assert!(!s.is_closing());
    b.fail_open = None;
    upload(&mut b, &mut s, now, &c, "big", &data(3000, 1), 1024);
}

#[test]
fn timeouts_close_and_abort_returns_the_sink() {
    let t0 = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = session(t0);
    let c = login(&mut b, &mut s, t0, "mo");
    let ps = packets(&c, "slow", &data(3000, 2), 1024);
    b.feed(&mut s, t0, &ps[0]);
    b.feed(&mut s, t0, &ps[1][..100]);
    let d = s.poll_timeout().expect("a deadline mid-packet");
    assert!(d > t0);
    s.handle_timeout(d - Duration::from_millis(1));
    assert!(!s.is_closing());
    s.handle_timeout(d);
    assert!(s.is_closing());
    let sinks = s.abort();
    assert_eq!(sinks.len(), 1);
    // idle timeout
    let s = session(t0);
    let d = s.poll_timeout().unwrap();
    assert_eq!(d, t0 + SessionConfig::default().idle_timeout);
}

#[test]
fn content_is_owed_window_by_window() {
    // 1 KiB/s with a 10 s header timeout: windows of 10 KiB, each due 20 s after the
    // last one ended. One 64 KiB packet would allow 10 + 64 s as a whole.
    let t0 = Instant::now();
    let cfg = SessionConfig {
        header_timeout: Duration::from_secs(10),
        min_rate: 1024,
        ..SessionConfig::default()
    };
    let mut b = MemoryBackend::default();
    let mut s: Sess = ServerSession::new(cfg.clone(), StdRng::seed_from_u64(2), t0);
    let c = login(&mut b, &mut s, t0, "win");
    let ps = packets(&c, "w", &data(64 << 10, 3), 64 << 10);
    let head = ps[0].len() - (64 << 10);
    b.feed(&mut s, t0, &ps[0][..head]);
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(20)));
    // half a window at 5 s moves nothing
    let at = |secs: u64| t0 + Duration::from_secs(secs);
    b.feed(&mut s, at(5), &ps[0][head..head + (5 << 10)]);
    assert_eq!(s.poll_timeout(), Some(at(20)));
    // the window completes at 15 s: the next is due at 35 s
    b.feed(&mut s, at(15), &ps[0][head + (5 << 10)..head + (10 << 10)]);
    assert_eq!(s.poll_timeout(), Some(at(35)));
    s.handle_timeout(at(35) - Duration::from_millis(1));
    assert!(!s.is_closing());
    // a trickle of one byte a second does not keep it open
    for i in 0..19 {
        let o = head + (10 << 10) + i;
        b.feed(&mut s, at(16 + i as u64), &ps[0][o..o + 1]);
    }
    assert_eq!(s.poll_timeout(), Some(at(35)));
    s.handle_timeout(at(35));
    assert!(s.is_closing(), "closed after one window, not after 74 s");
    // the rest of the packet at full speed is fine on a fresh connection
    let mut s: Sess = ServerSession::new(cfg, StdRng::seed_from_u64(2), t0);
    let c = login(&mut b, &mut s, t0, "win2");
    let ps = packets(&c, "w", &data(64 << 10, 3), 64 << 10);
    for (i, chunk) in ps[0].chunks(4096).enumerate() {
        b.feed(&mut s, at(i as u64), chunk);
        assert!(s.poll_timeout().unwrap() > at(i as u64));
    }
    assert!(!s.is_closing());
}

/// The whole byte stream of a client that logs in (with a fixed key pair) and uploads.
fn scripted_stream(seed: u64, sizes: &[usize], packet: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    // Run once to learn the id and key the seeded session will issue.
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = ServerSession::new(SessionConfig::default(), StdRng::seed_from_u64(seed), now);
    let c = login(&mut b, &mut s, now, "prop");
    let mut stream = Vec::new();
    encode_name_request(&mut stream, &[0; 16], RequestCode::Register, "prop").unwrap();
    encode_send_public_key(&mut stream, &c.id, "prop", keypair().public_der()).unwrap();
    let mut files = Vec::new();
    for (i, &n) in sizes.iter().enumerate() {
        let d = data(n, i as u64 + seed);
        let name = format!("file{i}");
        for p in packets(&c, &name, &d, packet) {
            stream.extend_from_slice(&p);
        }
        stream.extend_from_slice(&crc_req(&c, RequestCode::CrcOk, &name));
        files.push(d);
    }
    (stream, files)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_split_of_a_valid_stream_gives_the_same_result(
        seed in 0u64..4,
        sizes in proptest::collection::vec(0usize..3000, 1..4),
        packet_blocks in 1usize..80,
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let (stream, files) = scripted_stream(seed, &sizes, packet_blocks * 16);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        points.push(0);
        points.push(stream.len());
        points.sort_unstable();
        let now = Instant::now();
        let mut b = MemoryBackend::default();
        let mut s = ServerSession::new(SessionConfig::default(), StdRng::seed_from_u64(seed), now);
        let mut out = Vec::new();
        for w in points.windows(2) {
            let used = b.feed(&mut s, now, &stream[w[0]..w[1]]);
            prop_assert_eq!(used, w[1] - w[0]);
            out.extend_from_slice(s.output());
            s.clear_output();
        }
        let r = responses(&out);
        prop_assert_eq!(r.len(), 2 + 2 * files.len());
        prop_assert!(r.iter().all(|x| x.code() != ResponseCode::Error));
        let id = s.client_id().unwrap();
        for (i, d) in files.iter().enumerate() {
            prop_assert_eq!(&b.files[&(id, format!("file{i}"))].0, d);
        }
    }

    #[test]
    fn any_order_after_packet_one_gives_the_same_file(
        n in 0usize..6000,
        packet_blocks in 1usize..40,
        order in any::<prop::sample::Index>(),
    ) {
        let now = Instant::now();
        let mut b = MemoryBackend::default();
        let mut s = session(now);
        let c = login(&mut b, &mut s, now, "perm");
        let d = data(n, n as u64);
        let mut ps = packets(&c, "x", &d, packet_blocks * 16);
        let first = ps.remove(0);
        // a pseudo-random permutation of the rest, from the index
        let mut rng = StdRng::seed_from_u64(order.index(1 << 20) as u64);
        rand::seq::SliceRandom::shuffle(&mut ps[..], &mut rng);
        b.feed(&mut s, now, &first);
        for p in &ps {
            b.feed(&mut s, now, p);
        }
        let r = take(&mut s);
        prop_assert_eq!(r.len(), 1);
        let ok = matches!(&r[0], Response::FileReceived(f) if f.cksum == crate::v3::cksum(&d));
        prop_assert!(ok, "{:?}", r);
        b.feed(&mut s, now, &crc_req(&c, RequestCode::CrcOk, "x"));
        prop_assert_eq!(&b.files[&(c.id, "x".to_string())].0, &d);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let now = Instant::now();
        let mut b = MemoryBackend::default();
        let mut s = session(now);
        b.feed(&mut s, now, &bytes);
        let _ = responses(s.output());
        s.abort();
    }
}

/// One client's stream with the [`KnownKey`](crate::v3::fuzzing::KnownKey) exchange: REGISTER,
/// SEND_PUBLIC_KEY, then each file as packets of `packet_blocks` blocks (the last
/// packet takes the rest, possibly more than the others when `long_last`), packet 1
/// first and the others in the order `shuffle` gives (none: in order), then CRC_OK.
fn known_key_stream(
    files: &[Vec<u8>],
    packet_blocks: usize,
    long_last: bool,
    shuffle: Option<u64>,
) -> Vec<u8> {
    use crate::v3::fuzzing::{Script, KNOWN_AES_KEY};
    let id = Script::registered_id(0);
    let mut s = Script::default();
    s.name_request(&[0; 16], RequestCode::Register, "prop");
    s.public_key(&id, "prop");
    for (i, d) in files.iter().enumerate() {
        let name = format!("file{i}");
        let ct = crypto::encrypt(&KNOWN_AES_KEY, d);
        let blocks = ct.len() / 16;
        let mut full = blocks / packet_blocks;
        if full * packet_blocks == blocks {
            full -= 1; // the last packet is not empty
        }
        if long_last && full > 0 {
            full -= 1;
        }
        let total = full + 1;
        let mut ps: Vec<Vec<u8>> = (0..total)
            .map(|k| {
                let a = k * packet_blocks * 16;
                let z = if k + 1 == total {
                    ct.len()
                } else {
                    a + packet_blocks * 16
                };
                let mut out = Vec::new();
                encode_send_file(
                    &mut out,
                    &id,
                    &name,
                    d.len() as u32,
                    k as u16 + 1,
                    total as u16,
                    &ct[a..z],
                )
                .unwrap();
                out
            })
            .collect();
        if let Some(seed) = shuffle {
            rand::seq::SliceRandom::shuffle(&mut ps[1..], &mut StdRng::seed_from_u64(seed));
        }
        s.raw(&ps.concat());
        s.name_request(&id, RequestCode::CrcOk, &name);
    }
    s.bytes
}

/// Feeds `stream` cut at `cuts` to a [`KnownKey`](crate::v3::fuzzing::KnownKey) session;
/// returns the output and the stored files.
fn run_known_key(stream: &[u8], cuts: &[prop::sample::Index]) -> (Vec<u8>, MemoryBackend) {
    use crate::v3::fuzzing::{config, FuzzRng, KnownKey, RNG_SEED};
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
    points.extend([0, stream.len()]);
    points.sort_unstable();
    let now = Instant::now();
    let mut b = MemoryBackend::default();
    let mut s = ServerSession::with_key_exchange(config(), FuzzRng(RNG_SEED), KnownKey, now);
    let mut out = Vec::new();
    for w in points.windows(2) {
        assert_eq!(b.feed(&mut s, now, &stream[w[0]..w[1]]), w[1] - w[0]);
        out.extend_from_slice(s.output());
        s.clear_output();
    }
    (out, b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// PROTOCOL.md, File transfer 5: after packet 1, the packets of a file may come in
    /// any order when all but the last have one size. Any such order, cut anywhere,
    /// gives the same bytes back and the same files as the in-order stream in one
    /// piece; and the fuzz harness's invariants hold on it.
    #[test]
    fn any_reorder_and_split_gives_the_same_result(
        sizes in proptest::collection::vec(0usize..2500, 1..4),
        packet_blocks in 1usize..24,
        long_last in any::<bool>(),
        shuffle in any::<u64>(),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let files: Vec<Vec<u8>> =
            sizes.iter().enumerate().map(|(i, &n)| data(n, i as u64)).collect();
        let straight = known_key_stream(&files, packet_blocks, long_last, None);
        let mixed = known_key_stream(&files, packet_blocks, long_last, Some(shuffle));
        let (want, _) = run_known_key(&straight, &[]);
        let (got, b) = run_known_key(&mixed, &cuts);
        prop_assert_eq!(&got, &want);
        let r = responses(&got);
        prop_assert_eq!(r.len(), 2 + 2 * files.len());
        prop_assert!(r.iter().all(|x| x.code() != ResponseCode::Error), "{:?}", r);
        let id = crate::v3::fuzzing::Script::registered_id(0);
        for (i, d) in files.iter().enumerate() {
            prop_assert_eq!(&b.files[&(id, format!("file{i}"))].0, d);
        }
        let mut input = vec![0u8];
        input.extend_from_slice(&(shuffle as u32).to_le_bytes());
        input.extend_from_slice(&mixed);
        let report = crate::v3::fuzzing::session(&input);
        prop_assert_eq!(report.output, want);
        prop_assert_eq!(report.files.len(), files.len());
    }
}
