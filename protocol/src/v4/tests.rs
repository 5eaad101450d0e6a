//! The v4 client and server sessions against each other, in memory, with a small
//! in-memory repository answering the server's ops.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::client::{ClientError, ClientSession, Event};
use super::noise::StaticKey;
use super::server::{Completion, Ended, Op, ServerConfig, ServerSession, MAX_OPS_IN_FLIGHT};
use super::wire::{
    self, Answer, ErrorAnswer, ErrorCode, Login, LoginMode, Request, SnapshotHeader, Welcome,
};
use super::Capabilities;

/// Accounts by device key, chunks by (account, id).
#[derive(Default)]
struct Repo {
    devices: HashMap<[u8; 32], (u64, u64, u32, String)>,
    chunks: HashMap<(u64, [u8; 32]), Vec<u8>>,
    next: u64,
}

impl Repo {
    fn run(&mut self, op: Op) -> Completion {
        match op {
            Op::Login { device_key, login } => Completion::LoggedIn(match login.mode {
                LoginMode::Create => {
                    self.next += 1;
                    let w = (self.next, self.next, 15, login.account.clone());
                    self.devices.insert(device_key, w.clone());
                    Ok(welcome(&w))
                }
                LoginMode::Enrol => Err(ErrorAnswer::new(ErrorCode::BAD_CODE, "no codes here")),
                LoginMode::Device => match self.devices.get(&device_key) {
                    Some(w) => Ok(welcome(w)),
                    None => Err(ErrorAnswer::new(
                        ErrorCode::UNKNOWN_DEVICE,
                        "unknown device",
                    )),
                },
            }),
            Op::Request {
                request_id,
                principal,
                request,
            } => {
                let answer = match request {
                    Request::PutChunk { id, blob } => {
                        let already = self
                            .chunks
                            .insert((principal.account_id, id), blob)
                            .is_some();
                        Answer::ChunkStored { already }
                    }
                    Request::HasChunks(ids) => Answer::ChunksHeld(
                        ids.iter()
                            .map(|id| self.chunks.contains_key(&(principal.account_id, *id)))
                            .collect(),
                    ),
                    Request::GetChunk(id) => match self.chunks.get(&(principal.account_id, id)) {
                        Some(b) => Answer::Chunk(b.clone()),
                        None => ErrorAnswer::new(ErrorCode::NOT_FOUND, "no such chunk").into(),
                    },
                    // Stands in for the RSA check: the "signature" must be the
                    // connection's handshake hash.
                    Request::LegacyLogin { signature, .. } => {
                        if signature == principal.handshake_hash {
                            Answer::LegacyAccount {
                                name: "old".into(),
                                files: 1,
                                bytes: 1,
                            }
                        } else {
                            ErrorAnswer::new(ErrorCode::FORBIDDEN, "bad proof").into()
                        }
                    }
                    Request::LegacyList { .. } => Answer::LegacyFiles {
                        files: vec![wire::LegacyFile {
                            name: format!("{:?}", principal.legacy),
                            size: 1,
                            cksum: 1,
                            stored_ms: 1,
                        }],
                        more: false,
                    },
                    _ => Answer::Forgotten,
                };
                Completion::Answered { request_id, answer }
            }
        }
    }
}

fn welcome(w: &(u64, u64, u32, String)) -> Welcome {
    Welcome {
        account_id: w.0,
        device_id: w.1,
        capabilities: w.2,
        account: w.3.clone(),
    }
}

struct Pair {
    client: ClientSession,
    server: ServerSession,
    /// Server ops not run yet (tests choose when).
    held: Vec<Op>,
    /// Feed the server one byte at a time.
    trickle: bool,
    now: Instant,
    events: Vec<Event>,
}

impl Pair {
    fn new(server_key: &StaticKey, device: &StaticKey, login: Login) -> Pair {
        let now = Instant::now();
        let client = ClientSession::new(device, login).unwrap();
        let mut cfg = ServerConfig::new(server_key.clone());
        cfg.window = 64 * 1024;
        let server = ServerSession::new(cfg, now).unwrap();
        Pair {
            client,
            server,
            held: Vec::new(),
            trickle: false,
            now,
            events: Vec::new(),
        }
    }

    /// Moves bytes both ways, runs ops (unless `hold`), until nothing moves.
    fn pump(&mut self, repo: &mut Repo, hold: bool) -> Result<(), ClientError> {
        let mut skip_preamble = true;
        loop {
            let mut moved = false;
            let out = self.client.output().to_vec();
            if !out.is_empty() {
                let mut input: &[u8] = &out;
                if skip_preamble && input.starts_with(wire::MAGIC) {
                    assert_eq!(wire::detect(input), wire::Detected::V4);
                    input = &input[wire::PREAMBLE_LEN..];
                }
                skip_preamble = false;
                let mut taken = 0;
                while taken < input.len() {
                    let end = if self.trickle { taken + 1 } else { input.len() };
                    let n = self.server.handle_input(self.now, &input[taken..end]);
                    taken += n;
                    if n == 0 {
                        break;
                    }
                }
                let consumed = out.len() - (input.len() - taken);
                self.client.consume_output(consumed);
                moved |= consumed > 0;
            }
            while let Some(op) = self.server.poll_op() {
                moved = true;
                if hold {
                    self.held.push(op);
                } else {
                    let c = repo.run(op);
                    self.server.complete(self.now, c);
                }
            }
            let sout = self.server.output().to_vec();
            if !sout.is_empty() {
                self.server.consume_output(sout.len());
                self.client.handle_input(&sout)?;
                moved = true;
            }
            while let Some(e) = self.client.poll_event() {
                moved = true;
                if let Event::ServerKey { .. } = e {
                    self.client.accept_server()?;
                }
                self.events.push(e);
            }
            if !moved {
                return Ok(());
            }
        }
    }

    fn answers(&mut self) -> Vec<(u32, Answer)> {
        let mut out = Vec::new();
        for e in std::mem::take(&mut self.events) {
            if let Event::Answer { request_id, answer } = e {
                out.push((request_id, answer));
            }
        }
        out
    }
}

fn create(name: &str) -> Login {
    Login {
        mode: LoginMode::Create,
        account: name.into(),
        device: "laptop".into(),
        code: String::new(),
    }
}

fn device() -> Login {
    Login {
        mode: LoginMode::Device,
        account: String::new(),
        device: String::new(),
        code: String::new(),
    }
}

#[test]
fn create_then_log_in_and_store_chunks() {
    let sk = StaticKey::generate().unwrap();
    let dk = StaticKey::generate().unwrap();
    let mut repo = Repo::default();
    let mut p = Pair::new(&sk, &dk, create("alice"));
    p.pump(&mut repo, false).unwrap();
    assert!(p.client.is_ready());
    assert!(matches!(&p.events[1], Event::Welcome(w) if w.account == "alice"));
    let Event::ServerKey { key, hello } = &p.events[0] else {
        panic!("first event is the server key")
    };
    assert_eq!(key, sk.public());
    assert_eq!(hello.window, 64 * 1024);

    let id = p
        .client
        .send(&Request::PutChunk {
            id: [1; 32],
            blob: vec![7; 1000],
        })
        .unwrap();
    p.pump(&mut repo, false).unwrap();
    assert_eq!(
        p.answers(),
        vec![(id, Answer::ChunkStored { already: false })]
    );

    // Second connection by the same device: logs in by its key alone.
    let mut p2 = Pair::new(&sk, &dk, device());
    p2.trickle = true;
    p2.pump(&mut repo, false).unwrap();
    assert!(p2.client.is_ready());
    let id = p2
        .client
        .send(&Request::HasChunks(vec![[1; 32], [2; 32]]))
        .unwrap();
    p2.pump(&mut repo, false).unwrap();
    assert_eq!(
        p2.answers(),
        vec![(id, Answer::ChunksHeld(vec![true, false]))]
    );
}

#[test]
fn an_unknown_device_is_refused() {
    let sk = StaticKey::generate().unwrap();
    let mut repo = Repo::default();
    let mut p = Pair::new(&sk, &StaticKey::generate().unwrap(), device());
    let err = p.pump(&mut repo, false).unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused(e) if e.code == ErrorCode::UNKNOWN_DEVICE),
        "{err}"
    );
    assert!(p.server.is_closing());
}

#[test]
fn a_bad_account_name_is_refused_before_any_op() {
    let sk = StaticKey::generate().unwrap();
    let mut repo = Repo::default();
    let mut p = Pair::new(&sk, &StaticKey::generate().unwrap(), create("bad\nname"));
    let err = p.pump(&mut repo, false).unwrap_err();
    assert!(matches!(&err, ClientError::Refused(e) if e.code == ErrorCode::BAD_NAME));
    assert!(repo.devices.is_empty());
}

#[test]
fn answers_come_in_completion_order_and_the_window_is_kept() {
    let sk = StaticKey::generate().unwrap();
    let dk = StaticKey::generate().unwrap();
    let mut repo = Repo::default();
    let mut p = Pair::new(&sk, &dk, create("bob"));
    p.pump(&mut repo, false).unwrap();
    p.events.clear();
    // 10 KiB chunks into a 64 KiB window: six fit, the seventh does not.
    let mut sent = Vec::new();
    for i in 0..10u8 {
        let body = 32 + 10 * 1024;
        if !p.client.can_send(body) {
            break;
        }
        sent.push(
            p.client
                .send(&Request::PutChunk {
                    id: [i; 32],
                    blob: vec![i; 10 * 1024],
                })
                .unwrap(),
        );
    }
    assert_eq!(sent.len(), 6);
    p.pump(&mut repo, true).unwrap();
    assert_eq!(p.held.len(), 6);
    // Complete them in reverse: answers follow completion order.
    let held: Vec<Op> = std::mem::take(&mut p.held);
    for op in held.into_iter().rev() {
        let c = repo.run(op);
        p.server.complete(p.now, c);
    }
    p.pump(&mut repo, false).unwrap();
    let ids: Vec<u32> = p.answers().into_iter().map(|(id, _)| id).collect();
    let mut rev = sent.clone();
    rev.reverse();
    assert_eq!(ids, rev);
    assert_eq!(p.client.weight(), 0);
    assert!(p.client.can_send(32 + 10 * 1024));
}

#[test]
fn a_client_over_the_window_is_closed() {
    let sk = StaticKey::generate().unwrap();
    let mut repo = Repo::default();
    let mut p = Pair::new(&sk, &StaticKey::generate().unwrap(), create("eve"));
    p.pump(&mut repo, false).unwrap();
    for i in 0..8u8 {
        // Ignores can_send.
        p.client
            .send(&Request::PutChunk {
                id: [i; 32],
                blob: vec![i; 10 * 1024],
            })
            .unwrap();
    }
    let err = p.pump(&mut repo, true).unwrap_err();
    assert!(
        matches!(&err, ClientError::Closed(e) if e.code == ErrorCode::WINDOW_EXCEEDED)
            || matches!(&err, ClientError::UnexpectedAnswer(_)),
        "{err}"
    );
    assert_eq!(
        p.server.ended(),
        Some(&Ended::Refused(ErrorCode::WINDOW_EXCEEDED))
    );
}

#[test]
fn capabilities_are_enforced_by_the_session() {
    let sk = StaticKey::generate().unwrap();
    let dk = StaticKey::generate().unwrap();
    let mut repo = Repo::default();
    repo.devices
        .insert(*dk.public(), (1, 2, Capabilities::BACKUP.0, "acct".into()));
    let mut p = Pair::new(&sk, &dk, device());
    p.pump(&mut repo, false).unwrap();
    let forget = p.client.send(&Request::ForgetSnapshot([1; 16])).unwrap();
    let get = p.client.send(&Request::GetChunk([1; 32])).unwrap();
    let put = p
        .client
        .send(&Request::PutChunk {
            id: [1; 32],
            blob: vec![1],
        })
        .unwrap();
    p.pump(&mut repo, false).unwrap();
    let answers: HashMap<u32, Answer> = p.answers().into_iter().collect();
    assert!(matches!(&answers[&forget], Answer::Error(e) if e.code == ErrorCode::FORBIDDEN));
    assert!(matches!(&answers[&get], Answer::Error(e) if e.code == ErrorCode::FORBIDDEN));
    assert_eq!(answers[&put], Answer::ChunkStored { already: false });
    assert!(!p.server.is_closing(), "FORBIDDEN keeps the connection");
}

#[test]
fn a_bad_commit_header_is_a_bad_request_that_keeps_the_connection() {
    let sk = StaticKey::generate().unwrap();
    let mut repo = Repo::default();
    let mut p = Pair::new(&sk, &StaticKey::generate().unwrap(), create("tags"));
    p.pump(&mut repo, false).unwrap();
    let header = SnapshotHeader {
        tags: vec!["t".into(); 65],
        ..Default::default()
    };
    let id = p
        .client
        .send(&Request::CommitSnapshot {
            header,
            refs: vec![],
            root: vec![1],
        })
        .unwrap();
    p.pump(&mut repo, false).unwrap();
    let a = p.answers();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].0, id);
    assert!(
        matches!(&a[0].1, Answer::Error(e) if e.code == ErrorCode::BAD_FRAME || e.code == ErrorCode::BAD_REQUEST)
    );
}

#[test]
fn ops_in_flight_are_bounded() {
    let sk = StaticKey::generate().unwrap();
    let mut repo = Repo::default();
    let mut p = Pair::new(&sk, &StaticKey::generate().unwrap(), create("many"));
    p.pump(&mut repo, false).unwrap();
    for _ in 0..(MAX_OPS_IN_FLIGHT + 50) {
        p.client.send(&Request::HasChunks(vec![[0; 32]])).unwrap();
    }
    p.pump(&mut repo, true).unwrap();
    assert_eq!(p.held.len(), MAX_OPS_IN_FLIGHT);
    assert!(p.server.is_waiting());
    // Completing them lets the rest in.
    for op in std::mem::take(&mut p.held) {
        let c = repo.run(op);
        p.server.complete(p.now, c);
    }
    p.pump(&mut repo, false).unwrap();
    assert_eq!(p.answers().len(), MAX_OPS_IN_FLIGHT + 50);
}

#[test]
fn garbage_after_the_preamble_closes_without_a_panic() {
    let sk = StaticKey::generate().unwrap();
    let now = Instant::now();
    for junk in [
        &[0u8; 0][..],
        &[5, 0, 1, 2, 3, 4, 5],
        &[0xff; 300],
        &[32, 0],
    ] {
        let mut s = ServerSession::new(ServerConfig::new(sk.clone()), now).unwrap();
        let n = s.handle_input(now, junk);
        assert!(n <= junk.len());
        assert!(s.poll_op().is_none());
    }
    let mut s = ServerSession::new(ServerConfig::new(sk.clone()), now).unwrap();
    s.handle_input(now, &[5, 0, 1, 2, 3, 4, 5]);
    assert!(s.is_closing());
}

#[test]
fn a_silent_handshake_times_out() {
    let sk = StaticKey::generate().unwrap();
    let now = Instant::now();
    let mut s = ServerSession::new(ServerConfig::new(sk), now).unwrap();
    let d = s.poll_timeout().unwrap();
    assert!(d <= now + Duration::from_secs(10));
    s.handle_timeout(d);
    assert_eq!(s.ended(), Some(&Ended::TimedOut));
}

#[test]
fn a_client_refuses_to_go_on_before_the_key_is_accepted() {
    let sk = StaticKey::generate().unwrap();
    let dk = StaticKey::generate().unwrap();
    let now = Instant::now();
    let mut c = ClientSession::new(&dk, create("x")).unwrap();
    let mut s = ServerSession::new(ServerConfig::new(sk.clone()), now).unwrap();
    let out = c.output()[wire::PREAMBLE_LEN..].to_vec();
    c.consume_output(c.output().len());
    s.handle_input(now, &out);
    c.handle_input(s.output()).unwrap();
    let Some(Event::ServerKey { key, .. }) = c.poll_event() else {
        panic!("no server key event")
    };
    assert_eq!(&key, sk.public());
    // The pin does not match: the caller drops the session; nothing was written.
    assert!(c.output().is_empty(), "message 3 waits for accept_server");
    assert!(c.send(&Request::Usage).is_err());
}

#[test]
fn an_unknown_request_kind_is_answered_and_the_connection_stays() {
    let sk = StaticKey::generate().unwrap();
    let mut repo = Repo::default();
    let mut p = Pair::new(&sk, &StaticKey::generate().unwrap(), create("unk"));
    p.pump(&mut repo, false).unwrap();
    let id = p.client.send_raw(0x0077, &[1, 2, 3]).unwrap();
    let ok = p.client.send(&Request::HasChunks(vec![])).unwrap();
    p.pump(&mut repo, false).unwrap();
    let a = p.answers();
    assert!(
        matches!(&a[0], (i, Answer::Error(e)) if *i == id && e.code == ErrorCode::UNKNOWN_KIND)
    );
    assert_eq!(a[1], (ok, Answer::ChunksHeld(vec![])));
}

#[test]
fn legacy_reads_need_a_proof_bound_to_the_connection() {
    let sk = StaticKey::generate().unwrap();
    let dk = StaticKey::generate().unwrap();
    let mut repo = Repo::default();
    let mut p = Pair::new(&sk, &dk, create("alice"));
    p.pump(&mut repo, false).unwrap();
    let hh = p.client.handshake_hash();
    assert_ne!(hh, [0; 32]);
    // Before a proof: FORBIDDEN, and the connection stays.
    let early = p
        .client
        .send(&Request::LegacyList { after: "".into() })
        .unwrap();
    // A proof for another connection is refused by the repository.
    let wrong = p
        .client
        .send(&Request::LegacyLogin {
            client_id: [5; 16],
            signature: vec![1; 32],
        })
        .unwrap();
    p.pump(&mut repo, false).unwrap();
    let answers: HashMap<u32, Answer> = p.answers().into_iter().collect();
    assert!(matches!(&answers[&early], Answer::Error(e) if e.code == ErrorCode::FORBIDDEN));
    assert!(matches!(&answers[&wrong], Answer::Error(e) if e.code == ErrorCode::FORBIDDEN));
    let still = p
        .client
        .send(&Request::LegacyList { after: "".into() })
        .unwrap();
    p.pump(&mut repo, false).unwrap();
    assert!(
        matches!(&p.answers()[0], (id, Answer::Error(e)) if *id == still && e.code == ErrorCode::FORBIDDEN)
    );
    // The right proof: the server saw the same handshake hash, and later requests
    // carry the proven client id.
    let ok = p
        .client
        .send(&Request::LegacyLogin {
            client_id: [5; 16],
            signature: hh.to_vec(),
        })
        .unwrap();
    p.pump(&mut repo, false).unwrap();
    assert!(matches!(&p.answers()[0], (id, Answer::LegacyAccount { .. }) if *id == ok));
    p.client
        .send(&Request::LegacyList { after: "".into() })
        .unwrap();
    p.pump(&mut repo, false).unwrap();
    let Answer::LegacyFiles { files, .. } = &p.answers()[0].1 else {
        panic!("a file list")
    };
    assert_eq!(files[0].name, format!("{:?}", Some([5u8; 16])));
    // A read-less device may not even try.
    let dk2 = StaticKey::generate().unwrap();
    repo.devices.insert(
        *dk2.public(),
        (1, 3, Capabilities::BACKUP.0, "alice".into()),
    );
    let mut p2 = Pair::new(&sk, &dk2, device());
    p2.pump(&mut repo, false).unwrap();
    let hh2 = p2.client.handshake_hash();
    let denied = p2
        .client
        .send(&Request::LegacyLogin {
            client_id: [5; 16],
            signature: hh2.to_vec(),
        })
        .unwrap();
    p2.pump(&mut repo, false).unwrap();
    assert!(
        matches!(&p2.answers()[0], (id, Answer::Error(e)) if *id == denied && e.code == ErrorCode::FORBIDDEN)
    );
    assert_ne!(hh, hh2, "each connection has its own hash");
}
