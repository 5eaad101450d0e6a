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

use std::cell::RefCell;
use std::io;
use std::time::Instant;

use cyberbackup_protocol::v3::session::{Completion, Op, ServerSession, SessionConfig};

use crate::storage::PendingFile;

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

/// What the runtime must do next.
#[derive(Debug)]
pub enum Step {
    /// Run this op; if it [`needs_completion`](Op::needs_completion), pass the result to
    /// [`Driver::complete`] before stepping again.
    Op(Op<PendingFile>),
    /// Write [`Driver::output`], then [`Driver::consume_output`] what was written.
    Write,
    /// Read with [`Driver::read_from`]; wait no longer than [`Driver::deadline`].
    Read,
    /// Close the connection; the reason is for the log.
    Close(&'static str),
}

/// One connection's protocol state, and the input its session could not take yet.
pub struct Driver {
    session: ServerSession<PendingFile, rand::rngs::ThreadRng>,
    /// Input read but not consumed (`buf[head..]`): empty unless the session stopped
    /// to wait for an op, or to close, in the middle of a read.
    buf: Vec<u8>,
    head: usize,
}

impl Driver {
    pub fn new(cfg: &SessionConfig, now: Instant) -> Self {
        Self {
            session: ServerSession::new(cfg.clone(), rand::thread_rng(), now),
            buf: Vec::new(),
            head: 0,
        }
    }

    /// The next thing to do.
    pub fn step(&mut self, now: Instant) -> Step {
        loop {
            if !self.session.output().is_empty() {
                return Step::Write;
            }
            if let Some(op) = self.session.poll_op() {
                return Step::Op(op);
            }
            if self.session.is_closing() {
                return Step::Close("closed by the protocol");
            }
            if self.session.is_waiting() {
                // Only reachable if a runtime steps before completing an op.
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
    pub fn complete(&mut self, now: Instant, c: Completion<PendingFile>) {
        self.session.complete(now, c);
    }

    /// Bytes to write.
    pub fn output(&self) -> &[u8] {
        self.session.output()
    }

    /// `n` bytes of the output were written.
    pub fn consume_output(&mut self, n: usize) {
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
        self.session.poll_timeout()
    }

    /// The deadline passed: true if the connection must close.
    pub fn timed_out(&mut self, now: Instant) -> bool {
        self.session.handle_timeout(now);
        self.session.is_closing()
    }

    /// Between requests with nothing in flight and nothing buffered: safe to close at
    /// shutdown.
    pub fn is_idle(&self) -> bool {
        self.session.is_idle() && self.head == self.buf.len()
    }

    /// The connection is over: the temp files to remove.
    pub fn abort(&mut self) -> Vec<PendingFile> {
        self.session.abort()
    }

    /// Counters for the disconnect log line.
    pub fn stats(&self) -> cyberbackup_protocol::v3::session::SessionStats {
        self.session.stats()
    }
}
