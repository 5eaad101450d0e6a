//! The connection driver both runtimes share: the read buffer, the protocol session,
//! and the order of work, as a small state machine that says what to do next.
//!
//! A runtime calls [`Driver::step`] until it has to wait, and does what it is told:
//! run an op (see [`crate::ops`]), write output, read more, or close. The glommio
//! runtime awaits each step; the mio runtime does them when the socket is ready or an
//! op completes. Everything protocol-shaped stays in the session; everything
//! buffer-shaped stays here.

use std::time::Instant;

use cyberbackup_protocol::session::{Completion, Op, ServerSession, SessionConfig};

use crate::storage::PendingFile;

/// Bytes read at once to begin with; grows while reads fill it (bulk uploads).
pub const INITIAL_BUF: usize = 16 * 1024;
/// Largest read buffer of a connection.
pub const MAX_BUF: usize = 512 * 1024;

/// What the runtime must do next.
#[derive(Debug)]
pub enum Step {
    /// Run this op; if it [`needs_completion`](Op::needs_completion), pass the result to
    /// [`Driver::complete`] before stepping again.
    Op(Op<PendingFile>),
    /// Write [`Driver::output`], then [`Driver::consume_output`] what was written.
    Write,
    /// Read into [`Driver::read_buf`], then [`Driver::filled`]; wait no longer than
    /// [`Driver::deadline`].
    Read,
    /// Close the connection; the reason is for the log.
    Close(&'static str),
}

/// One connection's protocol state and input buffer.
pub struct Driver {
    session: ServerSession<PendingFile, rand::rngs::ThreadRng>,
    buf: Vec<u8>,
    head: usize,
    tail: usize,
}

impl Driver {
    pub fn new(cfg: &SessionConfig, now: Instant) -> Self {
        Self {
            session: ServerSession::new(cfg.clone(), rand::thread_rng(), now),
            buf: vec![0; INITIAL_BUF],
            head: 0,
            tail: 0,
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
            if self.head == self.tail {
                return Step::Read;
            }
            let n = self
                .session
                .handle_input(now, &self.buf[self.head..self.tail]);
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

    /// Free space to read into (compacting, and growing the buffer while reads fill it).
    pub fn read_buf(&mut self) -> &mut [u8] {
        if self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        } else if self.head > 0 {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        if self.tail == self.buf.len() && self.buf.len() < MAX_BUF {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        &mut self.buf[self.tail..]
    }

    /// `n` bytes were read into [`read_buf`](Self::read_buf).
    pub fn filled(&mut self, n: usize) {
        self.tail += n;
        if self.tail == self.buf.len() && self.buf.len() < MAX_BUF {
            self.buf.resize(self.buf.len() * 2, 0);
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
        self.session.is_idle() && self.head == self.tail
    }

    /// The connection is over: the temp files to remove.
    pub fn abort(&mut self) -> Vec<PendingFile> {
        self.session.abort()
    }

    /// Counters for the disconnect log line.
    pub fn stats(&self) -> cyberbackup_protocol::session::SessionStats {
        self.session.stats()
    }
}
