//! The connection driver both runtimes share: the read buffer, the protocol session,
//! and the order of work, as a small state machine that says what to do next.
//!
//! A runtime calls [`Driver::step`] until it has to wait, and does what it is told:
//! run an op (see [`crate::ops`]), write output, read more, or close. The glommio
//! runtime awaits each step; the mio runtime does them when the socket is ready or an
//! op completes. Everything protocol-shaped stays in the session; everything
//! buffer-shaped stays here.
//!
//! Sockets are read into one buffer per thread ([`with_read_buffer`]), not one per
//! connection: a thread serves one connection at a time, and the session consumes
//! what was read before the next read, so a single buffer that stays in the CPU's
//! cache replaces 64 buffers of half a megabyte that did not. Only the bytes a
//! session cannot take yet (it waits for an op, or closes) are copied to the
//! connection's own buffer, which is empty otherwise.
//!
//! Both protocol versions share the port: a connection starts in a detecting state
//! that holds its first 17 bytes, then becomes a v3 session (fed every byte) or, after
//! the v4 preamble, a v4 session ([`cyberbackup_protocol::v4::wire::detect`]). A v3 op
//! is run before the next step ([`AnyOp::is_concurrent`] is false); v4 ops run
//! concurrently, their completions delivered whenever they come, and [`Step::Wait`]
//! says the session takes no input until one does.

use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use cyberbackup_protocol::v3::session::{Completion, Op, ServerSession, SessionConfig};
use cyberbackup_protocol::v4;
use cyberbackup_protocol::v4::wire::{detect, Detected, PREAMBLE_LEN};

use crate::metrics::metrics;
use crate::storage::PendingFile;

/// A process-wide connection id for the logs (each shard keys its own table apart):
/// one connection's lines are found by it alone.
pub fn next_conn_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// Size of a thread's read buffer: the most one read takes from a socket.
pub const READ_BUF: usize = 512 * 1024;

thread_local! {
    static READ_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's read buffer ([`READ_BUF`] bytes, made on first use).
///
/// `f` must not call back into this function (the buffer is borrowed for the call).
pub fn with_read_buffer<T>(f: impl FnOnce(&mut [u8]) -> T) -> T {
    READ_BUFFER.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() != READ_BUF {
            b.resize(READ_BUF, 0);
        }
        f(&mut b)
    })
}

/// An op of either protocol version.
#[derive(Debug)]
pub enum AnyOp {
    V3(Op<PendingFile>),
    V4(v4::server::Op),
}

impl AnyOp {
    /// v4 ops run while the connection goes on; a v3 op is awaited before the next
    /// step (when it [`needs_completion`](Op::needs_completion)).
    pub fn is_concurrent(&self) -> bool {
        matches!(self, AnyOp::V4(_))
    }

    /// Whether a completion must be delivered.
    pub fn needs_completion(&self) -> bool {
        match self {
            AnyOp::V3(op) => op.needs_completion(),
            AnyOp::V4(_) => true,
        }
    }
}

/// The result of an [`AnyOp`].
#[derive(Debug)]
pub enum AnyCompletion {
    V3(Completion<PendingFile>),
    V4(v4::server::Completion),
}

/// Counters for the disconnect log line.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConnStats {
    /// 3, 4, or 0 before the version was known.
    pub version: u8,
    pub requests: u64,
    /// v3: files committed; v4: chunks received.
    pub files_committed: u64,
    /// v3: packet content bytes; v4: chunk bytes received.
    pub content_bytes: u64,
}

/// What the runtime must do next.
// An op is moved once from the session to its task; boxing it would cost an
// allocation per chunk to save copying a few hundred bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Step {
    /// Run this op. A concurrent one ([`AnyOp::is_concurrent`]) is started and its
    /// completion given to [`Driver::complete`] whenever it comes; any other that
    /// [`needs_completion`](AnyOp::needs_completion) is completed before stepping again.
    Op(AnyOp),
    /// Wait for a concurrent op's completion (the session takes no input until then).
    Wait,
    /// Write [`Driver::output`], then [`Driver::consume_output`] what was written.
    Write,
    /// Read with [`Driver::read_from`]; wait no longer than [`Driver::deadline`].
    Read,
    /// Close the connection; the reason is for the log.
    Close(&'static str),
}

/// The session of a connection, once its version is known.
enum Session {
    /// Fewer than [`PREAMBLE_LEN`] bytes so far.
    Detect {
        v3: SessionConfig,
        v4: Arc<v4::server::ServerConfig>,
        deadline: Instant,
        closing: bool,
    },
    V3(Box<ServerSession<PendingFile, rand::rngs::ThreadRng>>),
    V4(Box<v4::server::ServerSession>),
}

impl Session {
    fn output(&self) -> &[u8] {
        match self {
            Session::Detect { .. } => &[],
            Session::V3(s) => s.output(),
            Session::V4(s) => s.output(),
        }
    }

    fn consume_output(&mut self, n: usize) {
        match self {
            Session::Detect { .. } => {}
            Session::V3(s) => s.consume_output(n),
            Session::V4(s) => s.consume_output(n),
        }
    }

    fn poll_op(&mut self) -> Option<AnyOp> {
        match self {
            Session::Detect { .. } => None,
            Session::V3(s) => s.poll_op().map(AnyOp::V3),
            Session::V4(s) => s.poll_op().map(AnyOp::V4),
        }
    }

    fn is_closing(&self) -> bool {
        match self {
            Session::Detect { closing, .. } => *closing,
            Session::V3(s) => s.is_closing(),
            Session::V4(s) => s.is_closing(),
        }
    }

    fn is_waiting(&self) -> bool {
        match self {
            Session::Detect { .. } => false,
            Session::V3(s) => s.is_waiting(),
            Session::V4(s) => s.is_waiting(),
        }
    }

    fn handle_input(&mut self, now: Instant, input: &[u8]) -> usize {
        if let Session::Detect { v3, v4, .. } = self {
            match detect(input) {
                Detected::NeedMore => return 0,
                Detected::V3 => {
                    *self = Session::V3(Box::new(ServerSession::new(
                        v3.clone(),
                        rand::thread_rng(),
                        now,
                    )));
                }
                Detected::V4 => {
                    match v4::server::ServerSession::new((**v4).clone(), now) {
                        Ok(s) => *self = Session::V4(Box::new(s)),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start a v4 session");
                            if let Session::Detect { closing, .. } = self {
                                *closing = true;
                            }
                            return 0;
                        }
                    }
                    return PREAMBLE_LEN + self.handle_input(now, &input[PREAMBLE_LEN..]);
                }
            }
        }
        match self {
            Session::Detect { .. } => 0,
            Session::V3(s) => s.handle_input(now, input),
            Session::V4(s) => s.handle_input(now, input),
        }
    }
}

/// One connection's protocol state, and the input its session could not take yet.
pub struct Driver {
    session: Session,
    /// Input read but not consumed (`buf[head..]`): empty unless the session stopped
    /// to wait for an op, or to close, in the middle of a read.
    buf: Vec<u8>,
    head: usize,
    /// Who the connection acts for, once logged in (v4: the account's name; v3: the
    /// client's name): recorded in the connection's log span as `account`.
    account: Option<String>,
    /// v3: the name of the registration or login in flight.
    v3_name: Option<String>,
}

impl Driver {
    pub fn new(cfg: &SessionConfig, v4: &Arc<v4::server::ServerConfig>, now: Instant) -> Self {
        Self {
            // A new connection has the header timeout to send its first bytes (a real
            // client sends at once): silent or trickling sockets cannot hold the
            // connection slots for the idle timeout.
            session: Session::Detect {
                deadline: now + cfg.header_timeout,
                v3: cfg.clone(),
                v4: v4.clone(),
                closing: false,
            },
            buf: Vec::new(),
            head: 0,
            account: None,
            v3_name: None,
        }
    }

    /// 3, 4, or 0 before the version is known.
    pub fn version(&self) -> u8 {
        match self.session {
            Session::Detect { .. } => 0,
            Session::V3(_) => 3,
            Session::V4(_) => 4,
        }
    }

    /// Logged in as `name`: every later log line of the connection's span (the
    /// current one: runtimes complete ops inside it) carries it.
    fn logged_in(&mut self, v: u8, name: String) {
        tracing::Span::current().record("account", name.as_str());
        tracing::debug!(protocol = v, account = %name, "logged in");
        self.account = Some(name);
        metrics().handshake(v, true);
    }

    /// Counts the error answers the v4 session sent since the last look.
    fn count_errors(&mut self) {
        if let Session::V4(s) = &mut self.session {
            for (code, n) in s.take_errors() {
                metrics().errors_n(4, code.0.to_string(), n);
            }
        }
    }

    /// The connection is over: counts what only its end tells (a handshake that never
    /// finished, v3 errors, how a v4 session ended).
    pub fn finish(&mut self) {
        self.count_errors();
        let v = self.version();
        if v != 0 && self.account.is_none() {
            metrics().handshake(v, false);
        }
        match &self.session {
            Session::V3(s) => {
                // v3 answers every error with 1607 GENERAL_ERROR.
                let n = s.stats().errors;
                if n > 0 {
                    metrics().errors_n(3, "1607", n);
                }
            }
            Session::V4(s) => match s.ended() {
                Some(v4::server::Ended::Handshake(_)) => metrics().error(4, "handshake"),
                Some(v4::server::Ended::Record) => metrics().error(4, "record"),
                Some(v4::server::Ended::TimedOut) => metrics().error(4, "timeout"),
                // Refusals were counted as the error answers they are.
                Some(v4::server::Ended::Refused(_)) | None => {}
            },
            Session::Detect { .. } => {}
        }
    }

    /// The next thing to do.
    pub fn step(&mut self, now: Instant) -> Step {
        loop {
            if !self.session.output().is_empty() {
                return Step::Write;
            }
            if let Some(op) = self.session.poll_op() {
                if let AnyOp::V3(Op::Register { name, .. } | Op::Reconnect { name, .. }) = &op {
                    self.v3_name = Some(name.clone());
                }
                return Step::Op(op);
            }
            if self.session.is_closing() {
                return Step::Close("closed by the protocol");
            }
            if self.session.is_waiting() {
                if let Session::V4(_) = self.session {
                    return Step::Wait;
                }
                // Only reachable if a runtime steps before completing a v3 op.
                return Step::Close("stepped while an op was outstanding");
            }
            if self.head == self.buf.len() {
                self.release_input();
                return Step::Read;
            }
            let n = self.session.handle_input(now, &self.buf[self.head..]);
            self.head += n;
            if n == 0
                && !self.session.is_waiting()
                && !self.session.is_closing()
                && self.session.output().is_empty()
            {
                return Step::Read;
            }
        }
    }

    /// Delivers an op's result.
    pub fn complete(&mut self, now: Instant, c: AnyCompletion) {
        match (&mut self.session, c) {
            (Session::V3(s), AnyCompletion::V3(c)) => {
                s.complete(now, c);
                if self.account.is_none() && s.client_id().is_some() {
                    let name = self.v3_name.take().unwrap_or_default();
                    self.logged_in(3, name);
                }
            }
            (Session::V4(s), AnyCompletion::V4(c)) => {
                let login = match &c {
                    v4::server::Completion::LoggedIn(Ok(w)) => Some(w.account.clone()),
                    _ => None,
                };
                s.complete(now, c);
                if let Some(name) = login {
                    self.logged_in(4, name);
                }
                self.count_errors();
            }
            (_, c) => tracing::error!(completion = ?c, "a completion for another protocol version"),
        }
    }

    /// Bytes to write.
    pub fn output(&self) -> &[u8] {
        self.session.output()
    }

    /// `n` bytes of the output were written.
    pub fn consume_output(&mut self, n: usize) {
        metrics().sent(self.version(), n);
        self.session.consume_output(n);
    }

    /// Reads once through this thread's read buffer with `read` (a non-blocking read
    /// of the socket) and feeds what came to the session. Returns what `read`
    /// returned: `Ok(0)` is the end of the stream, errors are the socket's.
    pub fn read_from(
        &mut self,
        now: Instant,
        read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<usize> {
        with_read_buffer(|scratch| {
            // Input left from before goes first. `step` only asks for a read once
            // the session took everything, so this is empty unless a caller reads
            // out of turn; it is at most one read's worth either way.
            let carry = self.buf.len() - self.head;
            if carry >= scratch.len() {
                return Err(io::Error::other("read while a full buffer waits"));
            }
            let n = read(&mut scratch[carry..])?;
            if n == 0 {
                return Ok(0);
            }
            scratch[..carry].copy_from_slice(&self.buf[self.head..]);
            let input = &scratch[..carry + n];
            let used = self.session.handle_input(now, input);
            metrics().received(self.version(), n);
            self.count_errors();
            self.buf.clear();
            self.head = 0;
            self.buf.extend_from_slice(&input[used..]);
            Ok(n)
        })
    }

    /// The connection's own buffer is empty: give back its memory if a burst grew it.
    fn release_input(&mut self) {
        self.head = 0;
        self.buf.clear();
        if self.buf.capacity() > 64 * 1024 {
            self.buf = Vec::new();
        }
    }

    /// When the peer must have sent more by (None while the server itself is busy).
    pub fn deadline(&self) -> Option<Instant> {
        match &self.session {
            Session::Detect { deadline, .. } => Some(*deadline),
            Session::V3(s) => s.poll_timeout(),
            Session::V4(s) => s.poll_timeout(),
        }
    }

    /// The deadline passed: true if the connection must close.
    pub fn timed_out(&mut self, now: Instant) -> bool {
        match &mut self.session {
            Session::Detect {
                deadline, closing, ..
            } => {
                if now >= *deadline {
                    *closing = true;
                }
            }
            Session::V3(s) => s.handle_timeout(now),
            Session::V4(s) => s.handle_timeout(now),
        }
        self.session.is_closing()
    }

    /// Between requests with nothing in flight and nothing buffered: safe to close at
    /// shutdown.
    pub fn is_idle(&self) -> bool {
        let idle = match &self.session {
            Session::Detect { .. } => true,
            Session::V3(s) => s.is_idle(),
            Session::V4(s) => s.is_idle(),
        };
        idle && self.head == self.buf.len()
    }

    /// Concurrent ops started and not completed.
    pub fn ops_in_flight(&self) -> usize {
        match &self.session {
            Session::V4(s) => s.ops_in_flight(),
            _ => 0,
        }
    }

    /// The connection is over: the temp files to remove.
    pub fn abort(&mut self) -> Vec<PendingFile> {
        match &mut self.session {
            Session::V3(s) => s.abort(),
            Session::V4(s) => {
                s.abort();
                Vec::new()
            }
            Session::Detect { .. } => Vec::new(),
        }
    }

    /// Counters for the disconnect log line.
    pub fn stats(&self) -> ConnStats {
        match &self.session {
            Session::Detect { .. } => ConnStats::default(),
            Session::V3(s) => {
                let st = s.stats();
                ConnStats {
                    version: 3,
                    requests: st.requests,
                    files_committed: st.files_committed,
                    content_bytes: st.content_bytes,
                }
            }
            Session::V4(s) => {
                let st = s.stats();
                ConnStats {
                    version: 4,
                    requests: st.requests,
                    files_committed: st.chunks_put,
                    content_bytes: st.chunk_bytes,
                }
            }
        }
    }
}
