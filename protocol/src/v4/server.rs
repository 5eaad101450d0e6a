//! The v4 server session: one connection's handshake, login, framing, window and
//! capability checks, as a sans-IO state machine.
//!
//! The session is fed the bytes that follow the preamble ([`ServerSession::handle_input`]),
//! hands out ciphertext to write ([`ServerSession::output`]) and the work to do
//! ([`ServerSession::poll_op`]): a login to look up, or a request to run against the
//! repository. Ops run concurrently: the session keeps reading while they are out, up
//! to the window and [`MAX_OPS_IN_FLIGHT`], and each op's result comes back through
//! [`ServerSession::complete`], in any order. The runtime never parses a byte.
//!
//! Call order, like v3's session: `handle_input` with what was read (it returns how
//! much it took; the rest must be offered again later), then `poll_op` until `None`,
//! write `output`, and when [`ServerSession::is_waiting`] hold input back until a
//! completion arrives.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::noise::{self, Handshake, MessageReader, NoiseError, StaticKey, Transport};
use super::wire::{
    self, check_name, max_request_len, Answer, ErrorAnswer, ErrorCode, FrameReader, Login,
    LoginMode, Request, ServerHello, Welcome, FRAME_HEADER_LEN,
};
use super::Capabilities;

/// Most ops one connection may have running at once.
pub const MAX_OPS_IN_FLIGHT: usize = 256;
/// Output (ciphertext) a session buffers before it stops taking input.
pub const MAX_OUTPUT: usize = 4 << 20;
/// Largest body of an unknown request kind that is skipped (answered UNKNOWN_KIND).
pub const MAX_UNKNOWN_BODY: u64 = 64 * 1024;

/// A session's settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The server's static key.
    pub key: StaticKey,
    /// Bytes of requests a client may have unanswered.
    pub window: u32,
    /// Largest chunk blob taken.
    pub max_chunk: u32,
    /// Software name and version, told to the client.
    pub server_name: String,
    /// Time for the whole handshake and login.
    pub handshake_timeout: Duration,
    /// Time a connection with nothing in flight may stay silent.
    pub idle_timeout: Duration,
    /// Time a started frame may take to arrive whole.
    pub frame_timeout: Duration,
}

impl ServerConfig {
    /// Defaults: a 64 MiB window, 4 MiB chunks (and their blob overhead).
    pub fn new(key: StaticKey) -> Self {
        ServerConfig {
            key,
            window: 64 << 20,
            max_chunk: super::MAX_CHUNK_BLOB,
            server_name: format!("cyberbackup-server {}", env!("CARGO_PKG_VERSION")),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            frame_timeout: Duration::from_secs(120),
        }
    }
}

/// Who is on the other end, once logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub account_id: u64,
    pub device_id: u64,
    pub capabilities: Capabilities,
    /// The connection's Noise handshake hash (what a LEGACY_LOGIN proof signs).
    pub handshake_hash: [u8; 32],
    /// The v3 client this connection proved it holds the key of (LEGACY_LOGIN), if
    /// any: LEGACY_LIST and LEGACY_READ act on its files.
    pub legacy: Option<crate::common::ClientId>,
}

/// Work for the runtime.
#[derive(Debug)]
pub enum Op {
    /// Look up (mode Device) or create (mode Create) the account of `device_key`;
    /// complete with [`Completion::LoggedIn`].
    Login { device_key: [u8; 32], login: Login },
    /// Run `request` for `principal` (capabilities already checked); complete with
    /// [`Completion::Answered`] carrying the same `request_id`.
    Request {
        request_id: u32,
        principal: Principal,
        request: Request,
    },
}

/// An op's result.
#[derive(Debug)]
pub enum Completion {
    LoggedIn(Result<Welcome, ErrorAnswer>),
    Answered { request_id: u32, answer: Answer },
}

/// Why a session ended (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The handshake failed (bad message, failed decryption).
    Handshake(String),
    /// A record failed to decrypt.
    Record,
    /// An error answer that closes the connection was sent.
    Refused(ErrorCode),
    /// A timer ran out.
    TimedOut,
}

enum Phase {
    /// Waiting for handshake message 1.
    Message1(Handshake),
    /// Message 2 sent; waiting for message 3.
    Message3(Handshake),
    /// Login op out.
    LoggingIn(Transport, [u8; 32]),
    /// Serving requests.
    Ready {
        transport: Transport,
        principal: Principal,
    },
    /// Nothing more is read; output is flushed, then the connection closes.
    Closing(Ended),
    /// Only while moving between phases.
    Moving,
}

/// Counters for the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerStats {
    pub requests: u64,
    pub chunks_put: u64,
    pub chunk_bytes: u64,
}

/// One v4 connection on the server.
pub struct ServerSession {
    cfg: ServerConfig,
    phase: Phase,
    messages: MessageReader,
    frames: FrameReader,
    out: Vec<u8>,
    ops: VecDeque<Op>,
    /// Unanswered requests and their weight.
    unanswered: HashMap<u32, u64>,
    weight: u64,
    /// Ops handed out and not completed.
    ops_out: usize,
    deadline: Option<Instant>,
    stats: ServerStats,
    /// A LEGACY_LOGIN in flight: its request id and v3 client id.
    legacy_pending: Option<(u32, crate::common::ClientId)>,
    /// Error answers sent and not yet taken by [`take_errors`](Self::take_errors), by
    /// code (a few distinct codes at most).
    errors: std::collections::BTreeMap<u16, u64>,
}

impl std::fmt::Debug for ServerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSession")
            .field("ops_out", &self.ops_out)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

impl ServerSession {
    /// A session whose preamble was read at `now`.
    pub fn new(cfg: ServerConfig, now: Instant) -> Result<Self, NoiseError> {
        let hs = Handshake::responder(&cfg.key)?;
        Ok(ServerSession {
            deadline: Some(now + cfg.handshake_timeout),
            cfg,
            phase: Phase::Message1(hs),
            messages: MessageReader::default(),
            frames: FrameReader::new(),
            out: Vec::new(),
            ops: VecDeque::new(),
            unanswered: HashMap::new(),
            weight: 0,
            ops_out: 0,
            stats: ServerStats::default(),
            legacy_pending: None,
            errors: std::collections::BTreeMap::new(),
        })
    }

    /// Ciphertext to write.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// `n` bytes of the output were written.
    pub fn consume_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    /// The next op to run.
    pub fn poll_op(&mut self) -> Option<Op> {
        let op = self.ops.pop_front()?;
        self.ops_out += 1;
        Some(op)
    }

    /// True while the session takes no input until an op completes (a login is out,
    /// or too many ops or too much output are pending).
    pub fn is_waiting(&self) -> bool {
        matches!(self.phase, Phase::LoggingIn(..))
            || self.ops_out + self.ops.len() >= MAX_OPS_IN_FLIGHT
            || self.out.len() >= MAX_OUTPUT
    }

    /// True once the connection must close (after its output is written).
    pub fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing(_))
    }

    /// Why the session ended, once it did.
    pub fn ended(&self) -> Option<&Ended> {
        match &self.phase {
            Phase::Closing(e) => Some(e),
            _ => None,
        }
    }

    /// Nothing in flight, nothing buffered: safe to close at shutdown.
    pub fn is_idle(&self) -> bool {
        self.ops_out == 0
            && self.ops.is_empty()
            && self.unanswered.is_empty()
            && self.frames.buffered() == 0
            && self.messages.buffered() == 0
            && matches!(self.phase, Phase::Ready { .. } | Phase::Message1(_))
    }

    /// Ops handed out and not completed.
    pub fn ops_in_flight(&self) -> usize {
        self.ops_out
    }

    /// Who is logged in.
    pub fn principal(&self) -> Option<Principal> {
        match &self.phase {
            Phase::Ready { principal, .. } => Some(*principal),
            _ => None,
        }
    }

    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    /// The error answers sent since the last call, as (code, count), for metrics.
    pub fn take_errors(&mut self) -> Vec<(ErrorCode, u64)> {
        if self.errors.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut self.errors)
            .into_iter()
            .map(|(c, n)| (ErrorCode(c), n))
            .collect()
    }

    /// Bytes held for this connection (buffered input and output).
    pub fn held_bytes(&self) -> usize {
        self.frames.buffered() + self.messages.buffered() + self.out.len()
    }

    /// When the peer must have sent more by (`None` while the server itself works).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.ops_out > 0 || !self.ops.is_empty() || self.is_closing() {
            return None;
        }
        self.deadline
    }

    /// A deadline from [`Self::poll_timeout`] passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) && self.poll_timeout().is_some() {
            if matches!(self.phase, Phase::Ready { .. }) && self.frames.buffered() > 0 {
                self.refuse(0, ErrorCode::TIMEOUT, "a frame did not arrive in time");
            } else if matches!(self.phase, Phase::Ready { .. }) {
                // Idle: close quietly.
                self.phase = Phase::Closing(Ended::TimedOut);
            } else {
                self.phase = Phase::Closing(Ended::TimedOut);
            }
        }
    }

    /// Takes bytes read from the socket; returns how many were taken (the rest must be
    /// offered again once [`Self::is_waiting`] is false).
    pub fn handle_input(&mut self, now: Instant, input: &[u8]) -> usize {
        let mut taken = 0;
        // Take bytes one Noise message at a time, so that a session that starts to
        // wait stops taking input at a message boundary.
        while taken < input.len() && !self.is_closing() && !self.is_waiting() {
            // A whole message at the front of the input, with none begun before it, is
            // handled where it lies (the common case), not copied first.
            let rest = &input[taken..];
            if self.messages.buffered() == 0 && self.takes_messages() {
                if let Some((msg, n)) = noise::whole_message(rest) {
                    taken += n;
                    self.process_message(msg, now);
                    continue;
                }
            }
            let n = self.take_message_bytes(rest);
            if n == 0 {
                break;
            }
            taken += n;
            self.process_messages(now);
        }
        if taken > 0 {
            self.touch(now);
        }
        taken
    }

    /// Moves bytes into the message reader up to the end of the next whole message (or
    /// all of them if it is not whole yet).
    fn take_message_bytes(&mut self, input: &[u8]) -> usize {
        let mut taken = 0;
        let have = self.messages.buffered();
        if have < 2 {
            taken = (2 - have).min(input.len());
            self.messages.push(&input[..taken]);
        }
        let Some(total) = self.messages.current_len() else {
            return taken;
        };
        let have = self.messages.buffered();
        let rest = total.saturating_sub(have).min(input.len() - taken);
        self.messages.push(&input[taken..taken + rest]);
        taken + rest
    }

    fn touch(&mut self, now: Instant) {
        match self.phase {
            Phase::Ready { .. } => {
                let t = if self.frames.buffered() > 0 {
                    self.cfg.frame_timeout
                } else {
                    self.cfg.idle_timeout
                };
                self.deadline = Some(now + t);
            }
            Phase::Closing(_) => self.deadline = None,
            _ => {}
        }
    }

    fn process_messages(&mut self, now: Instant) {
        // The reader is moved out while its messages are decrypted straight from its
        // buffer (no copy of each record), and put back on every way out.
        let mut messages = std::mem::take(&mut self.messages);
        self.process_messages_from(&mut messages, now);
        self.messages = messages;
    }

    fn process_messages_from(&mut self, messages: &mut MessageReader, now: Instant) {
        loop {
            if !self.takes_messages() {
                return;
            }
            let Some(msg) = messages.next_message() else {
                break;
            };
            if !self.process_message(msg, now) {
                return;
            }
        }
    }

    /// False while logging in or closing: messages wait.
    fn takes_messages(&self) -> bool {
        !self.is_closing() && !matches!(self.phase, Phase::LoggingIn(..))
    }

    /// Handles one Noise message; false when no more may follow now.
    fn process_message(&mut self, msg: &[u8], now: Instant) -> bool {
        match std::mem::replace(&mut self.phase, Phase::Moving) {
            Phase::Message1(mut hs) => {
                let r = hs.read(msg).and_then(|_| {
                    let hello = ServerHello {
                        window: self.cfg.window,
                        max_chunk: self.cfg.max_chunk,
                        server: self.cfg.server_name.clone(),
                    };
                    hs.write(&hello.encode(), &mut self.out)
                });
                self.phase = match r {
                    Ok(()) => Phase::Message3(hs),
                    Err(e) => Phase::Closing(Ended::Handshake(e.to_string())),
                };
            }
            Phase::Message3(mut hs) => {
                let payload = match hs.read(msg) {
                    Ok(p) => p,
                    Err(e) => {
                        self.phase = Phase::Closing(Ended::Handshake(e.to_string()));
                        return false;
                    }
                };
                let key = hs.remote_static();
                let handshake_hash = hs.handshake_hash();
                let transport = match hs.into_transport() {
                    Ok(t) => t,
                    Err(e) => {
                        self.phase = Phase::Closing(Ended::Handshake(e.to_string()));
                        return false;
                    }
                };
                self.phase = Phase::LoggingIn(transport, handshake_hash);
                let (Some(device_key), Ok(login)) = (key, Login::decode(&payload)) else {
                    self.refuse(0, ErrorCode::BAD_FRAME, "the login message is malformed");
                    return false;
                };
                let bad = match login.mode {
                    LoginMode::Create => check_name(&login.account, false)
                        .err()
                        .or_else(|| check_name(&login.device, true).err()),
                    LoginMode::Enrol => check_name(&login.device, true).err(),
                    LoginMode::Device => None,
                };
                if let Some(why) = bad {
                    self.refuse(0, ErrorCode::BAD_NAME, why);
                    return false;
                }
                self.ops.push_back(Op::Login { device_key, login });
                return false;
            }
            Phase::Ready {
                mut transport,
                principal,
            } => {
                if transport.open_into(msg, &mut self.frames).is_err() {
                    self.phase = Phase::Closing(Ended::Record);
                    return false;
                }
                self.phase = Phase::Ready {
                    transport,
                    principal,
                };
                self.process_frames(now);
            }
            other => {
                // LoggingIn and Closing return above; Moving is never left.
                self.phase = other;
                return false;
            }
        }
        true
    }

    fn process_frames(&mut self, _now: Instant) {
        loop {
            let Phase::Ready { principal, .. } = &self.phase else {
                return;
            };
            let principal = *principal;
            let max_chunk = self.cfg.max_chunk;
            let next = self
                .frames
                .next_frame(|k| max_request_len(k, max_chunk), MAX_UNKNOWN_BODY);
            // Decoded while the body is borrowed from the reader: a chunk's bytes are
            // copied once, into the request.
            let (h, decoded) = match next {
                Ok(Some((h, body))) => (h, Request::decode(h.kind, body)),
                Ok(None) => return,
                Err(e) => {
                    let id = self.frames.peek_header().map_or(0, |h| h.request_id);
                    self.refuse(id, e.code(), &e.to_string());
                    return;
                }
            };
            self.stats.requests += 1;
            if self.unanswered.contains_key(&h.request_id) {
                self.refuse(
                    h.request_id,
                    ErrorCode::BAD_FRAME,
                    "request id still in use",
                );
                return;
            }
            let weight = FRAME_HEADER_LEN as u64 + h.len;
            if !self.unanswered.is_empty() && self.weight + weight > self.cfg.window as u64 {
                self.refuse(
                    h.request_id,
                    ErrorCode::WINDOW_EXCEEDED,
                    "unanswered requests over the window",
                );
                return;
            }
            let request = match decoded {
                Ok(r) => r,
                Err(e) => {
                    let code = e.code();
                    if code.closes() {
                        self.refuse(h.request_id, code, &e.to_string());
                        return;
                    }
                    self.answer_now(h.request_id, ErrorAnswer::new(code, e.to_string()).into());
                    continue;
                }
            };
            if let Err(e) = check_request(&request, &principal) {
                self.answer_now(h.request_id, e.into());
                continue;
            }
            if let Request::LegacyLogin { client_id, .. } = &request {
                if self.legacy_pending.is_some() {
                    self.answer_now(
                        h.request_id,
                        ErrorAnswer::new(
                            ErrorCode::BAD_REQUEST,
                            "another LEGACY_LOGIN is still unanswered",
                        )
                        .into(),
                    );
                    continue;
                }
                self.legacy_pending = Some((h.request_id, *client_id));
            }
            if let Request::PutChunk { blob, .. } = &request {
                self.stats.chunks_put += 1;
                self.stats.chunk_bytes += blob.len() as u64;
            }
            self.unanswered.insert(h.request_id, weight);
            self.weight += weight;
            self.ops.push_back(Op::Request {
                request_id: h.request_id,
                principal,
                request,
            });
            if self.is_waiting() {
                return;
            }
        }
    }

    /// Sends an answer (sealing it in records).
    fn answer_now(&mut self, request_id: u32, answer: Answer) {
        if let Answer::Error(e) = &answer {
            *self.errors.entry(e.code.0).or_default() += 1;
        }
        // A chunk is sealed from where it lies, after its frame header.
        let mut frame = Vec::new();
        let body = wire::encode_answer_split(request_id, &answer, &mut frame);
        let sealed = match &mut self.phase {
            Phase::Ready { transport, .. } | Phase::LoggingIn(transport, _) => {
                transport.seal_parts(&[&frame, body], &mut self.out)
            }
            _ => return,
        };
        if sealed.is_err() {
            self.phase = Phase::Closing(Ended::Record);
        }
    }

    /// Sends an error that closes the connection.
    fn refuse(&mut self, request_id: u32, code: ErrorCode, message: &str) {
        self.answer_now(request_id, ErrorAnswer::new(code, message).into());
        self.phase = Phase::Closing(Ended::Refused(code));
    }

    /// Delivers an op's result.
    pub fn complete(&mut self, now: Instant, c: Completion) {
        self.ops_out = self.ops_out.saturating_sub(1);
        match c {
            Completion::LoggedIn(r) => {
                let Phase::LoggingIn(transport, handshake_hash) =
                    std::mem::replace(&mut self.phase, Phase::Moving)
                else {
                    // Not logging in (closed meanwhile): nothing to do.
                    if matches!(self.phase, Phase::Moving) {
                        self.phase = Phase::Closing(Ended::Record);
                    }
                    return;
                };
                self.phase = Phase::LoggingIn(transport, handshake_hash);
                match r {
                    Ok(w) => {
                        let principal = Principal {
                            account_id: w.account_id,
                            device_id: w.device_id,
                            capabilities: Capabilities(w.capabilities),
                            handshake_hash,
                            legacy: None,
                        };
                        self.answer_now(0, Answer::Welcome(w));
                        if let Phase::LoggingIn(transport, _) =
                            std::mem::replace(&mut self.phase, Phase::Moving)
                        {
                            self.phase = Phase::Ready {
                                transport,
                                principal,
                            };
                        }
                        self.deadline = Some(now + self.cfg.idle_timeout);
                        // Frames that came with message 3's flight wait in the reader.
                        self.process_messages(now);
                    }
                    Err(e) => {
                        let code = if e.code.closes() {
                            e.code
                        } else {
                            ErrorCode::UNKNOWN_DEVICE
                        };
                        self.answer_now(0, e.into());
                        self.phase = Phase::Closing(Ended::Refused(code));
                    }
                }
            }
            Completion::Answered { request_id, answer } => {
                if let Some(w) = self.unanswered.remove(&request_id) {
                    self.weight -= w;
                }
                if let Some((id, client)) = self.legacy_pending {
                    if id == request_id {
                        self.legacy_pending = None;
                        if let (Answer::LegacyAccount { .. }, Phase::Ready { principal, .. }) =
                            (&answer, &mut self.phase)
                        {
                            principal.legacy = Some(client);
                        }
                    }
                }
                if self.is_closing() {
                    return;
                }
                let closes = matches!(&answer, Answer::Error(e) if e.code.closes());
                let code = match &answer {
                    Answer::Error(e) => Some(e.code),
                    _ => None,
                };
                self.answer_now(request_id, answer);
                if closes {
                    self.phase =
                        Phase::Closing(Ended::Refused(code.unwrap_or(ErrorCode::INTERNAL)));
                    return;
                }
                if self.unanswered.is_empty() {
                    self.deadline = Some(now + self.cfg.idle_timeout);
                }
                // Frames that arrived while the session waited.
                self.process_frames(now);
            }
        }
    }

    /// The connection is over: ops not yet handed out are dropped.
    pub fn abort(&mut self) {
        self.ops.clear();
    }
}

/// The capability a request needs (`docs/PROTOCOL-V4.md` §8), and the checks the
/// session can make without the repository.
fn check_request(r: &Request, principal: &Principal) -> Result<(), ErrorAnswer> {
    let caps = principal.capabilities;
    let need = match r {
        Request::HasChunks(_) | Request::PutChunk { .. } | Request::CommitSnapshot { .. } => {
            Capabilities::BACKUP
        }
        Request::ListSnapshots
        | Request::GetSnapshot(_)
        | Request::GetChunk(_)
        | Request::LegacyLogin { .. }
        | Request::LegacyList { .. }
        | Request::LegacyRead { .. } => Capabilities::READ,
        Request::Usage | Request::GetKey => {
            Capabilities(Capabilities::BACKUP.0 | Capabilities::READ.0)
        }
        Request::ForgetSnapshot(_) | Request::Prune => Capabilities::FORGET,
        Request::PutKey(_)
        | Request::DeviceAdd { .. }
        | Request::ListDevices
        | Request::RevokeDevice(_) => Capabilities::ADMIN,
    };
    if caps.0 & need.0 == 0 {
        return Err(ErrorAnswer::new(
            ErrorCode::FORBIDDEN,
            format!(
                "this device may not {}: it lacks the {} capability",
                r.name(),
                need.names()
            ),
        ));
    }
    if matches!(r, Request::LegacyList { .. } | Request::LegacyRead { .. })
        && principal.legacy.is_none()
    {
        return Err(ErrorAnswer::new(
            ErrorCode::FORBIDDEN,
            format!(
                "{} needs a v3 identity proven first (LEGACY_LOGIN)",
                r.name()
            ),
        ));
    }
    if let Request::CommitSnapshot { header, .. } = r {
        if let Err(why) = header.check() {
            return Err(ErrorAnswer::new(ErrorCode::BAD_REQUEST, why));
        }
    }
    Ok(())
}
