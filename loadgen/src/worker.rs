//! One virtual client: its connection, its session's pre-encrypted payload, and its
//! loop of files (or handshakes).
//!
//! CBC ciphertext is prefix-consistent: the ciphertext of the first `16k` bytes of a
//! plaintext is the first `16k` bytes of the ciphertext of the whole. So each session
//! encrypts the largest payload once under its key, and a file of `n` bytes is sent as
//! the first `16 * floor(n / 16)` cached bytes plus one freshly encrypted final block:
//! per file, one AES block and a checksum of the plaintext prefix (every 1603 is
//! checked against it), never a re-encryption.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use cyberbackup_client::{ClientError, ConnectOptions, Identity, Session};
use cyberbackup_protocol::v3::crypto::{AesKey, ClientKeypair, StreamEncryptor, BLOCK, ZERO_IV};
use cyberbackup_protocol::v3::header::{RequestCode, ResponseCode, ResponseHeader};
use cyberbackup_protocol::v3::message::encode_name_request;
use rand::{Rng, SeedableRng};

use crate::config::{Args, Mode};
use crate::stats::Event;

/// What all clients share.
pub struct Shared {
    pub args: Args,
    pub plain: Vec<u8>,
    pub keys: Vec<ClientKeypair>,
    pub user_prefix: String,
    pub ready: Barrier,
    pub go: Barrier,
    /// When load starts (warm-up included), set between the two barriers.
    pub start: OnceLock<Instant>,
    pub stop: AtomicBool,
    /// Next open-loop slot.
    pub next_slot: AtomicU64,
    /// Measured files (or handshakes) started, for --files.
    pub started: AtomicU64,
    /// Measured ones finished, for --files.
    pub finished: AtomicU64,
    /// Clients whose set-up (connect, register) failed: they never start.
    pub setup_failed: AtomicU64,
    /// The first set-up failure's message.
    pub setup_error: std::sync::Mutex<Option<String>>,
}

/// One unit of work's place in the schedule.
pub struct Slot {
    /// When it was due (open loop only).
    pub due: Option<Instant>,
    pub began: Instant,
    /// Whether it counts in the results (begun, or due, inside the window).
    pub measured: bool,
}

impl Slot {
    /// Microseconds from when it was due to `now` (open loop only).
    pub fn corrected(&self, now: Instant) -> Option<u64> {
        self.due
            .map(|d| now.saturating_duration_since(d).as_micros() as u64)
    }

    /// Reports a handshake of this slot that ended now, or its failure (and pauses
    /// briefly after one, so that a refusing server is not hammered).
    pub fn handshake_done(&self, tx: &mpsc::Sender<Event>, r: Result<(), &'static str>) {
        let now = Instant::now();
        match r {
            Ok(()) => {
                let _ = tx.send(Event::Handshake {
                    at: now,
                    latency_us: (now - self.began).as_micros() as u64,
                    corrected_us: self.corrected(now),
                });
            }
            Err(kind) => {
                let _ = tx.send(Event::Error { at: now, kind });
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Shared {
    /// The next unit of work of a client, once it may start (at a constant rate, when
    /// it is due); None when the run is over for this client.
    pub fn next_slot(&self) -> Option<Slot> {
        let a = &self.args;
        let end = self.end();
        let due = match a.rate {
            Some(rate) => {
                let slot = self.next_slot.fetch_add(1, Ordering::Relaxed);
                let start = *self.start.get().expect("set before go");
                let due = start + Duration::from_secs_f64(slot as f64 / rate);
                if end.is_some_and(|e| due >= e) {
                    return None;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                Some(due)
            }
            None => None,
        };
        let began = Instant::now();
        // Closed loop: nothing starts after the window. Open loop: what was due in the
        // window still starts (late, which its latency shows).
        if due.is_none() && end.is_some_and(|e| began >= e) {
            return None;
        }
        let measured = due.unwrap_or(began) >= self.window();
        if measured {
            if let Some(n) = a.files {
                if self.started.fetch_add(1, Ordering::Relaxed) >= n {
                    return None;
                }
            }
        }
        Some(Slot {
            due,
            began,
            measured,
        })
    }

    /// Whether a unit that finished at `done` still counts: in a closed loop it must
    /// end inside the window; in an open loop being due in it is enough (as wrk2).
    pub fn counts(&self, slot: &Slot, done: Instant) -> bool {
        slot.measured && (self.args.rate.is_some() || self.end().is_none_or(|e| done <= e))
    }

    /// A measured unit is over (for --files).
    pub fn finished(&self, slot: &Slot) {
        if slot.measured && self.args.files.is_some() {
            self.finished.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn window(&self) -> Instant {
        *self.start.get().expect("set before go") + self.args.warmup
    }
    fn end(&self) -> Option<Instant> {
        if self.args.files.is_some() {
            None
        } else {
            Some(self.window() + self.args.duration)
        }
    }
}

fn kind(e: &ClientError) -> &'static str {
    match e {
        ClientError::Unreachable { .. } | ClientError::BadAddress { .. } => "connect",
        ClientError::ConnectionLost(_) => "connection lost",
        ClientError::Timeout(_) => "timeout",
        ClientError::ServerError(_) => "server error (1607)",
        ClientError::NameTaken(_) => "name taken",
        ClientError::Rejected(_) => "reconnect rejected",
        ClientError::Protocol(_) => "protocol",
        _ => "other",
    }
}

/// The session's ciphertext of the whole payload (whole blocks only).
struct Cache {
    key: AesKey,
    body: Vec<u8>,
}

impl Cache {
    fn new(key: &AesKey, plain: &[u8]) -> Cache {
        let whole = plain.len() / BLOCK * BLOCK;
        let mut body = plain[..whole].to_vec();
        let mut enc = StreamEncryptor::new(key);
        // Whole blocks, so this cannot fail.
        let _ = enc.encrypt_blocks(&mut body);
        Cache { key: *key, body }
    }

    /// Body and final block of the ciphertext of `plain[..n]`.
    fn file<'a>(&'a self, plain: &[u8], n: usize) -> (&'a [u8], [u8; BLOCK]) {
        let k = n / BLOCK * BLOCK;
        let iv: [u8; BLOCK] = if k == 0 {
            ZERO_IV
        } else {
            self.body[k - BLOCK..k].try_into().unwrap_or(ZERO_IV)
        };
        let last = StreamEncryptor::with_iv(&self.key, &iv)
            .finish_tail(&plain[k..n])
            .unwrap_or([0; BLOCK]);
        (&self.body[..k], last)
    }
}

/// Runs client `idx` until the run stops.
pub fn run(idx: usize, sh: Arc<Shared>, tx: mpsc::Sender<Event>) {
    let a = &sh.args;
    let copts = ConnectOptions {
        connect_timeout: a.io_timeout(),
        io_timeout: a.io_timeout(),
        congestion: a.congestion.clone(),
    };
    let name = format!("{}-{idx}", sh.user_prefix);
    let key = sh.keys[idx % sh.keys.len()].clone();
    // Set-up, outside the measured window: register.
    let setup = Session::register_with_key(&a.server, &name, key, &copts);
    let mut session = match setup {
        Ok((s, _)) => Some(s),
        Err(e) => {
            // Counted apart (and in the error rate) by the caller: before the window,
            // an error event would not be measured.
            sh.setup_failed.fetch_add(1, Ordering::Relaxed);
            let mut first = sh.setup_error.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some(format!("{} ({})", e.report(), kind(&e)));
            }
            None
        }
    };
    let mut identity: Option<Identity> = session.as_ref().map(|s| s.identity().clone());
    if a.mode == Mode::Handshake {
        session = None; // handshakes open their own connections
    }
    let mut cache = match (&session, a.mode) {
        (Some(s), Mode::Upload) => Some(Cache::new(s.session_key(), &sh.plain)),
        _ => None,
    };
    sh.ready.wait();
    sh.go.wait();
    let Some(id) = identity.clone() else { return };
    let mut rng = rand::rngs::StdRng::seed_from_u64(idx as u64 ^ 0x5eed);
    let mut in_session = 0u64;
    let mut sessions = 0u64;
    let fixed_cksum = (a.mode == Mode::Upload && a.size.min == a.size.max)
        .then(|| cyberbackup_protocol::v3::cksum(&sh.plain[..a.size.min as usize]));

    while !sh.stop.load(Ordering::Relaxed) {
        let Some(slot) = sh.next_slot() else { break };
        let corrected = |now: Instant| slot.corrected(now);

        if a.mode == Mode::Handshake {
            slot.handshake_done(&tx, handshake(&a.server, &id, &copts));
            sh.finished(&slot);
            continue;
        }

        // A new session when the last one is used up or broke.
        if session.is_none() || (a.files_per_session > 0 && in_session >= a.files_per_session) {
            drop(session.take());
            let t0 = Instant::now();
            sessions += 1;
            let fresh = a.register_ratio > 0.0 && rng.gen_bool(a.register_ratio);
            let r = if fresh {
                let key = sh.keys[rng.gen_range(0..sh.keys.len())].clone();
                Session::register_with_key(&a.server, &format!("{name}-s{sessions}"), key, &copts)
                    .map(|(s, id)| {
                        identity = Some(id);
                        s
                    })
            } else {
                Session::open_existing(
                    &a.server,
                    identity.clone().unwrap_or_else(|| id.clone()),
                    &copts,
                )
            };
            match r {
                Ok(s) => {
                    let now = Instant::now();
                    let _ = tx.send(Event::Handshake {
                        at: now,
                        latency_us: (now - t0).as_micros() as u64,
                        corrected_us: None,
                    });
                    cache = Some(Cache::new(s.session_key(), &sh.plain));
                    session = Some(s);
                    in_session = 0;
                }
                Err(e) => {
                    let _ = tx.send(Event::Error {
                        at: Instant::now(),
                        kind: kind(&e),
                    });
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        }
        let (Some(s), Some(c)) = (session.as_mut(), cache.as_ref()) else {
            continue;
        };

        let n = if a.size.min == a.size.max {
            a.size.min
        } else {
            // log-uniform in [min, max]
            let lo = (a.size.min.max(1) as f64).ln();
            let hi = (a.size.max.max(1) as f64).ln();
            (rng.gen_range(lo..=hi).exp().round() as u64).clamp(a.size.min, a.size.max)
        } as usize;
        let want = fixed_cksum.unwrap_or_else(|| cyberbackup_protocol::v3::cksum(&sh.plain[..n]));
        let (body, last) = c.file(&sh.plain, n);
        let file_name = format!("lg-{}", in_session % 64);
        let t0 = Instant::now();
        let r = s.send_ciphertext(&file_name, n as u64, body, &last, a.packet_size as usize);
        let t1603 = Instant::now();
        let outcome = r.and_then(|f| {
            let good = f.cksum == want && f.content_size as usize == body.len() + BLOCK;
            let code = if good {
                RequestCode::CrcOk
            } else {
                RequestCode::CrcAbort
            };
            s.crc_request(code, &file_name).map(|_| good)
        });
        in_session += 1;
        // Closed loop: counted when it started in the window and finished before its
        // end. Open loop: counted when it was due in the window (as wrk2 does); files
        // due but not started when the window closes are dropped, so a server that
        // falls behind the rate shows it in files/s, and its lateness in the latency.
        let measured = sh.counts(&slot, Instant::now());
        match outcome {
            Ok(true) => {
                let _ = tx.send(Event::File {
                    at: Instant::now(),
                    measured,
                    bytes: n as u64,
                    latency_us: (t1603 - t0).as_micros() as u64,
                    corrected_us: corrected(t1603),
                });
            }
            Ok(false) => {
                let _ = tx.send(Event::Mismatch {
                    at: Instant::now(),
                    measured,
                });
            }
            Err(e) => {
                let _ = tx.send(Event::Error {
                    at: Instant::now(),
                    kind: kind(&e),
                });
                session = None;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        sh.finished(&slot);
    }
}

/// Connect, RECONNECT, read the answer, disconnect. The session key is not decrypted:
/// the generator's RSA work would be measured, not the server's.
fn handshake(server: &str, id: &Identity, copts: &ConnectOptions) -> Result<(), &'static str> {
    let addr: std::net::SocketAddr = server.parse().map_err(|_| "connect")?;
    let mut s = TcpStream::connect_timeout(&addr, copts.connect_timeout).map_err(|_| "connect")?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(copts.io_timeout))
        .map_err(|_| "connect")?;
    let mut req = Vec::with_capacity(300);
    encode_name_request(&mut req, &id.id, RequestCode::Reconnect, &id.name).map_err(|_| "other")?;
    s.write_all(&req).map_err(|_| "connection lost")?;
    let mut h = [0u8; 7];
    s.read_exact(&mut h).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timeout",
        _ => "connection lost",
    })?;
    let h = ResponseHeader::parse(&h).map_err(|_| "protocol")?;
    if h.payload_size > 1024 {
        return Err("protocol");
    }
    let mut p = [0u8; 1024];
    s.read_exact(&mut p[..h.payload_size as usize])
        .map_err(|_| "connection lost")?;
    match h.code {
        ResponseCode::ReconnectOk => Ok(()),
        ResponseCode::ReconnectRejected => Err("reconnect rejected"),
        ResponseCode::Error => Err("server error (1607)"),
        _ => Err("protocol"),
    }
}
