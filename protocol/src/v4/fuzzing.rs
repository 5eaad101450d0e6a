//! The harnesses of the v4 cargo-fuzz targets in `fuzz/` (feature `fuzzing`, and unit
//! tests): every v4 decoder on arbitrary bytes, and a logged-in server session fed an
//! arbitrary decrypted stream. Each checks invariants beyond "no panic".

use std::sync::OnceLock;
use std::time::Instant;

use super::client::{ClientSession, Event};
use super::format::Entry;
use super::noise::StaticKey;
use super::server::{Completion, Op, ServerConfig, ServerSession, MAX_OPS_IN_FLIGHT};
use super::wire::{
    self, max_answer_len, max_request_len, Answer, FrameReader, Login, LoginMode, Request,
    ServerHello, Welcome,
};

/// Two bytes of kind, then a body: the request and answer decoders (a decoded value
/// must encode back to the same body), the handshake payloads, the manifest decoder,
/// and the frame splitter over the same bytes.
pub fn frames(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let kind = u16::from_le_bytes([data[0], data[1]]);
    let body = &data[2..];
    if max_request_len(kind, super::MAX_CHUNK_BLOB).is_some_and(|m| body.len() as u64 <= m) {
        if let Ok(r) = Request::decode(kind, body) {
            let mut again = Vec::new();
            r.encode_body(&mut again);
            assert_eq!(again, body, "a request re-encodes to its bytes");
        }
    }
    if let Ok(a) = Answer::decode(kind, body) {
        let mut again = Vec::new();
        a.encode_body(&mut again);
        assert_eq!(Answer::decode(kind, &again).as_ref(), Ok(&a));
    }
    let _ = ServerHello::decode(body);
    let _ = Login::decode(body);
    if let Ok(entries) = Entry::decode_all(body) {
        let mut again = Vec::new();
        for e in &entries {
            assert!(super::format::safe_path(&e.path));
            e.encode(&mut again);
        }
        assert_eq!(again, body, "a manifest re-encodes to its bytes");
    }
    let mut r = FrameReader::new();
    for part in data.chunks(7) {
        r.push(part);
        while let Ok(Some((h, b))) = r.next_frame(|k| max_request_len(k, 1 << 20), 4096) {
            assert_eq!(h.len as usize, b.len());
        }
    }
}

fn keys() -> &'static (StaticKey, StaticKey) {
    static K: OnceLock<(StaticKey, StaticKey)> = OnceLock::new();
    K.get_or_init(|| {
        (
            StaticKey::from_private([0x11; 32]),
            StaticKey::from_private([0x22; 32]),
        )
    })
}

/// What a [`session`] run did.
#[derive(Debug, Default)]
pub struct SessionReport {
    pub ops: usize,
    pub answers: usize,
    pub closed: bool,
}

/// A logged-in server session (real handshake) fed `data` as the decrypted stream
/// from the client, in records of varying size; ops complete at once with plausible
/// answers. The server must never panic, never hand out more than
/// [`MAX_OPS_IN_FLIGHT`] ops at once, and every record it writes must decrypt and
/// decode on the client side.
pub fn session(data: &[u8]) -> SessionReport {
    let (sk, dk) = keys();
    let now = Instant::now();
    let mut rep = SessionReport::default();
    let mut cfg = ServerConfig::new(sk.clone());
    cfg.window = 1 << 20;
    cfg.max_chunk = 64 * 1024;
    let Ok(mut server) = ServerSession::new(cfg, now) else {
        return rep;
    };
    let login = Login {
        mode: LoginMode::Device,
        account: String::new(),
        device: String::new(),
        code: String::new(),
    };
    let Ok(mut client) = ClientSession::new(dk, login) else {
        return rep;
    };
    // Handshake.
    for _ in 0..4 {
        let out = client.output().to_vec();
        client.consume_output(out.len());
        let input = out.strip_prefix(&wire::preamble()[..]).unwrap_or(&out);
        server.handle_input(now, input);
        while let Some(op) = server.poll_op() {
            if let Op::Login { .. } = op {
                server.complete(
                    now,
                    Completion::LoggedIn(Ok(Welcome {
                        account_id: 1,
                        device_id: 1,
                        capabilities: 15,
                        account: "fuzz".into(),
                    })),
                );
            }
        }
        let sout = server.output().to_vec();
        server.consume_output(sout.len());
        if client.handle_input(&sout).is_err() {
            return rep;
        }
        while let Some(e) = client.poll_event() {
            if let Event::ServerKey { .. } = e {
                let _ = client.accept_server();
            }
        }
        if client.is_ready() {
            break;
        }
    }
    assert!(client.is_ready(), "the handshake completes");
    // The fuzzed stream, cut into records at sizes the input chooses.
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() && !server.is_closing() {
        let n = (1 + (rest[0] as usize) * 37).min(rest.len());
        let (part, tail) = rest.split_at(n);
        rest = tail;
        i += 1;
        if client.send_plain(part).is_err() {
            break;
        }
        let out = client.output().to_vec();
        client.consume_output(out.len());
        let mut off = 0;
        while off < out.len() && !server.is_closing() {
            let k = server.handle_input(now, &out[off..]);
            let mut ops = Vec::new();
            while let Some(op) = server.poll_op() {
                ops.push(op);
            }
            assert!(ops.len() <= MAX_OPS_IN_FLIGHT);
            rep.ops += ops.len();
            for op in ops {
                if let Op::Request {
                    request_id,
                    request,
                    ..
                } = op
                {
                    let answer = match request {
                        Request::HasChunks(ids) => Answer::ChunksHeld(vec![false; ids.len()]),
                        Request::GetChunk(_) => Answer::Chunk(vec![i as u8; 100]),
                        _ => Answer::Forgotten,
                    };
                    server.complete(now, Completion::Answered { request_id, answer });
                }
            }
            if k == 0 && server.is_waiting() {
                break;
            }
            off += k;
            if k == 0 {
                break;
            }
        }
        // Whatever the server wrote must open and decode on the client's side.
        let sout = server.output().to_vec();
        server.consume_output(sout.len());
        let mut m = super::noise::MessageReader::default();
        m.push(&sout);
        while let Some(_rec) = m.next_message() {
            rep.answers += 1;
        }
        let _ = max_answer_len(0, 0);
    }
    rep.closed = server.is_closing();
    rep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_harness_on_the_vectors() {
        let mut seed = vec![0x01, 0x00];
        seed.extend_from_slice(&1u32.to_le_bytes());
        seed.extend_from_slice(&[7; 32]);
        frames(&seed);
        frames(&[0x03, 0x00, 1, 2, 3]);
        frames(&[]);
        frames(&[0xff; 300]);
    }

    #[test]
    fn session_harness_serves_a_request_and_survives_garbage() {
        let mut f = Vec::new();
        wire::encode_request(1, &Request::HasChunks(vec![[1; 32]]), &mut f);
        let r = session(&f);
        assert_eq!(r.ops, 1, "{r:?}");
        assert!(!r.closed);
        let r = session(&[0xff; 200]);
        assert!(r.closed, "a garbage frame header closes: {r:?}");
    }
}
