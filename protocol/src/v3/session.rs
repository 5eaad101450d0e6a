//! The per-connection server session: a state machine that takes bytes and the time,
//! and gives response bytes and operations to run.
//!
//! # Contract (the call order a runtime follows)
//!
//! 1. [`ServerSession::handle_input`] with the bytes read from the socket. It returns
//!    how many it consumed; it stops early while an operation is outstanding or once
//!    the session is closing, and the caller keeps the rest for the next call.
//! 2. [`ServerSession::poll_op`] until `None`: each [`Op`] is run by the runtime
//!    (registry or storage, off the reactor thread). An op that
//!    [`Op::needs_completion`] must be answered with [`ServerSession::complete`]
//!    before the session consumes more input; [`Op::Discard`] needs no answer.
//! 3. Write [`ServerSession::output`] to the socket, then [`ServerSession::clear_output`].
//! 4. If [`ServerSession::is_closing`], close the connection (after flushing output).
//! 5. Wait for more input no longer than [`ServerSession::poll_timeout`]; when it passes,
//!    call [`ServerSession::handle_timeout`].
//! 6. When the connection ends for any reason, call [`ServerSession::abort`] and discard
//!    the sink it returns (a transfer that did not finish is never stored).
//!
//! # Files
//!
//! A file's packets are decrypted as they arrive, 64 KiB at a time, into the sink's
//! stage when it offers one (the server's direct-I/O buffer, or a `Vec`'s own bytes) or
//! else into a scratch buffer written to the sink at its offset; the sink is
//! `ciphertext_len(orig_file_size)` bytes that the runtime provides (a temp file in the
//! server, a `Vec` in tests and benches). Bytes are checksummed in the same pass while
//! they arrive in order. A packet that arrives ahead of a gap (allowed when
//! all packets but the last have the size of packet 1) is decrypted on arrival with a
//! zero IV; its first block is corrected when its predecessor arrives, and it is
//! checksummed when the gap closes. When the last byte is in, the padding is checked and
//! 1603 goes out; the sink is handed back to the runtime with [`Op::Commit`] on CRC_OK,
//! or [`Op::Discard`] on CRC_RETRY, CRC_ABORT, an error or a disconnect.

use std::time::{Duration, Instant};

use crate::common::ClientId;
use crate::v3::cksum::Cksum;
use crate::v3::crypto::{
    self, CryptoRngCore, KeyExchange, RsaOaep, StreamDecryptor, BLOCK, ZERO_IV,
};
use crate::v3::header::{RequestCode, RequestHeader, REQUEST_HEADER_LEN};
use crate::v3::message::{
    self, FileReceived, Response, SendFileHead, NAME_PAYLOAD_LEN, SEND_FILE_FIXED_LEN,
    SEND_PUBLIC_KEY_LEN,
};
use crate::v3::name;
use crate::v3::{MAX_PAYLOAD_SIZE, PUBLIC_KEY_LEN, VERSION};

/// Limits and timeouts of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Largest payload accepted; a larger one is answered 1607 and the connection closed
    /// before any of it is read.
    pub max_payload: u32,
    /// Largest file (plaintext bytes) accepted. At most `u32::MAX - 16`, so that the
    /// ciphertext size fits the u32 of 1603.
    pub max_file_size: u64,
    /// Time allowed to receive a header and the fixed part of a payload once its first
    /// byte has arrived.
    pub header_timeout: Duration,
    /// Time a connection may sit idle between requests.
    pub idle_timeout: Duration,
    /// Slowest accepted rate for packet content, in bytes per second. Content is owed
    /// in windows of at most `min_rate × header_timeout` bytes (the rest of the packet
    /// if less): a window of `w` bytes must arrive within `header_timeout + w /
    /// min_rate` of the previous one's end, so a peer that trickles a large packet is
    /// closed after one window, not after the whole packet's time.
    pub min_rate: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_payload: MAX_PAYLOAD_SIZE,
            max_file_size: u32::MAX as u64 - 16,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            min_rate: 16 * 1024,
        }
    }
}

/// A place that holds one file's decrypted bytes while it is reassembled.
///
/// It must be exactly as long as requested in [`Op::OpenFile`].
pub trait FileSink {
    /// Size in bytes, fixed when the sink is made (the file's ciphertext size).
    fn len(&self) -> u64;
    /// Whether the sink holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes `data` at `offset`; the session never writes past [`len`](Self::len).
    /// An error fails the transfer with 1607 (general error) and discards the sink.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    /// Reads back bytes written earlier (an out-of-order packet's content, to checksum
    /// it once the gap before it closes, and the last block, to check its padding).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    /// Room to decrypt straight into, for a sink that buffers writes itself (a direct
    /// I/O stage): up to `max` bytes that will land at `offset`, or `None` (the session
    /// then decrypts into its own scratch and calls [`write_at`](Self::write_at)).
    /// After filling the start of the slice the session calls [`staged`](Self::staged).
    fn stage(&mut self, _offset: u64, _max: usize) -> Option<&mut [u8]> {
        None
    }
    /// The first `n` bytes of the slice [`stage`](Self::stage) returned hold the file's
    /// bytes at the offset it was asked for.
    fn staged(&mut self, _n: usize) -> std::io::Result<()> {
        Ok(())
    }
    /// The first `end` bytes are final (decrypted and never written again): a sink
    /// backed by a file may start writing them back now, so that the sync at the end
    /// has less to do. Called after every packet that extends the in-order prefix.
    fn settled(&mut self, _end: u64) {}
}

/// The bytes `offset..offset + n` of a sink of `len` bytes, or an error naming them.
pub fn sink_range(len: usize, offset: u64, n: usize) -> std::io::Result<std::ops::Range<usize>> {
    usize::try_from(offset)
        .ok()
        .and_then(|o| Some(o..o.checked_add(n)?))
        .filter(|r| r.end <= len)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{n} bytes at {offset} are outside a sink of {len} bytes"),
            )
        })
}

/// An in-memory sink (tests, benches and the fuzz targets).
impl FileSink for Vec<u8> {
    fn len(&self) -> u64 {
        Vec::len(self) as u64
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let r = sink_range(Vec::len(self), offset, data.len())?;
        self[r].copy_from_slice(data);
        Ok(())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let r = sink_range(Vec::len(self), offset, buf.len())?;
        buf.copy_from_slice(&self[r]);
        Ok(())
    }
    /// The bytes themselves: the session decrypts straight into them.
    fn stage(&mut self, offset: u64, max: usize) -> Option<&mut [u8]> {
        let r = sink_range(Vec::len(self), offset, max).ok()?;
        Some(&mut self[r])
    }
}

/// An operation the runtime runs for the session (registry and storage work).
#[derive(Debug)]
pub enum Op<S> {
    /// Insert a client; answer [`Completion::Registered`] (false when the name is taken).
    Register { client_id: ClientId, name: String },
    /// Store a public key for a client; answer [`Completion::PublicKeyStored`]. Store it
    /// only when the client exists, its name is `name`, and either `registered_here`
    /// (this connection registered it) or it has no key yet.
    StorePublicKey {
        client_id: ClientId,
        name: String,
        public_key: Box<[u8; PUBLIC_KEY_LEN]>,
        registered_here: bool,
    },
    /// Look up a client by name (and whether `client_id` is known at all), and touch its
    /// last-seen time; answer [`Completion::Reconnect`].
    Reconnect { client_id: ClientId, name: String },
    /// Create a temporary sink of `len` bytes for the client's file; answer
    /// [`Completion::FileOpened`].
    OpenFile {
        client_id: ClientId,
        file_name: String,
        len: u64,
    },
    /// The client confirmed the checksum: keep the first `size` bytes of the sink, make
    /// them durable and visible under `file_name`, record it; answer
    /// [`Completion::Committed`] (the ACK goes out only after that).
    Commit {
        client_id: ClientId,
        file_name: String,
        sink: S,
        size: u64,
        cksum: u32,
    },
    /// Throw the sink away. No answer.
    Discard { sink: S },
}

impl<S> Op<S> {
    /// Whether the session waits for a [`Completion`] of this op.
    pub fn needs_completion(&self) -> bool {
        !matches!(self, Op::Discard { .. })
    }
}

/// The outcome of storing a public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStored {
    Stored,
    /// No client has this id.
    UnknownClient,
    /// The client exists, but the name differs or it already has a key and did not
    /// register on this connection.
    Refused,
}

/// What the registry knows for a RECONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectLookup {
    /// The client registered under the requested name: its id and stored public key.
    pub by_name: Option<(ClientId, Option<Vec<u8>>)>,
    /// Whether the header's client id belongs to any client.
    pub id_known: bool,
}

/// The answer to an [`Op`].
#[derive(Debug)]
pub enum Completion<S> {
    Registered(bool),
    PublicKeyStored(KeyStored),
    Reconnect(ReconnectLookup),
    /// The sink, or why it could not be made (disk full, I/O error): answered 1607.
    FileOpened(Result<S, OpError>),
    /// Durable and visible, or why not: answered 1607.
    Committed(Result<(), OpError>),
}

/// Where an [`Op`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpErrorKind {
    /// Storage has no room for the file now (a budget of bytes in flight, say).
    Busy,
    /// Storage failed: creating, writing, syncing or renaming a file.
    Storage,
    /// The registry could not record the result.
    Registry,
}

/// Why an [`Op`] failed: a kind and a message for the logs. v3 errors carry no reason,
/// so every kind is answered with the same 1607; the kind is for the runtime's logs
/// and metrics. Displays as its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    kind: OpErrorKind,
    message: String,
}

impl OpError {
    /// An error of `kind` described by `message`.
    pub fn new(kind: OpErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A storage failure, described by `e`.
    pub fn storage(e: impl std::fmt::Display) -> Self {
        Self::new(OpErrorKind::Storage, e.to_string())
    }

    /// A registry failure, described by `e`.
    pub fn registry(e: impl std::fmt::Display) -> Self {
        Self::new(OpErrorKind::Registry, e.to_string())
    }

    /// Where the op failed.
    pub fn kind(&self) -> OpErrorKind {
        self.kind
    }

    /// What went wrong, for the logs.
    pub fn message(&self) -> &str {
        &self.message
    }
}

#[derive(Debug, Clone, Copy)]
enum Read {
    /// Accumulating a request header in `inbuf`.
    Header,
    /// Accumulating a small payload (or SEND_FILE's fixed part) in `inbuf[23..]`.
    Payload { hdr: RequestHeader, need: usize },
    /// Streaming the content of the current packet into the transfer.
    Content { remaining: u32 },
    /// Dropping payload bytes of a request that was refused.
    Skip { remaining: u32 },
}

/// What an outstanding op will resume (`P`: the key exchange's public key).
enum Waiting<P> {
    Register { id: ClientId, name: String },
    StoreKey { id: ClientId, name: String, key: P },
    Reconnect { id: ClientId, name: String },
    Open(PacketPlan, String),
    Commit,
}

/// Who the peer is on this connection. A session key exists only once a client is
/// known, and a client without one can only be one that registered here.
// Inline, as the key schedules were in the `Option<ClientState>` this replaces.
#[allow(clippy::large_enum_variant)]
enum Peer {
    /// No client yet (nothing registered or keyed on this connection).
    Anonymous,
    /// REGISTER succeeded on this connection; no session key yet.
    Registered { id: ClientId, name: String },
    /// A session key went out (SEND_PUBLIC_KEY or RECONNECT): files may follow.
    Keyed {
        id: ClientId,
        name: String,
        /// The client registered on this connection.
        registered_here: bool,
        key: crypto::DecryptionKey,
    },
}

impl Peer {
    /// The client's id and name, if there is a client.
    fn client(&self) -> Option<(ClientId, &str)> {
        match self {
            Peer::Anonymous => None,
            Peer::Registered { id, name } | Peer::Keyed { id, name, .. } => Some((*id, name)),
        }
    }
    fn id(&self) -> Option<ClientId> {
        self.client().map(|(id, _)| id)
    }
    /// Whether `id` registered on this connection.
    fn registered_here(&self, id: &ClientId) -> bool {
        match self {
            Peer::Anonymous => false,
            Peer::Registered { id: i, .. } => i == id,
            Peer::Keyed {
                id: i,
                registered_here,
                ..
            } => *registered_here && i == id,
        }
    }
    /// The session key, once one was issued.
    fn key(&self) -> Option<&crypto::DecryptionKey> {
        match self {
            Peer::Keyed { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// A validated packet about to stream in.
#[derive(Clone)]
struct PacketPlan {
    orig: u64,
    cipher_total: u64,
    total: u16,
    number: u16,
    offset: u64,
    len: u32,
}

/// The packet being received.
struct Cursor {
    number: u16,
    pos: u64,
    end: u64,
    dec: StreamDecryptor,
    carry: [u8; BLOCK],
    carry_len: usize,
    last_cipher: [u8; BLOCK],
    /// All earlier packets are in, so this one is checksummed as it streams.
    in_prefix: bool,
}

/// A file being reassembled.
struct Transfer<S> {
    file_name: String,
    orig: u64,
    cipher_total: u64,
    total: u16,
    sink: S,
    /// Content size of packet 1: the stride of out-of-order packets.
    first_len: u32,
    /// Every packet so far but the last has been `first_len` bytes.
    uniform: bool,
    /// Some packet arrived ahead of a gap.
    out_of_order: bool,
    received: Vec<u64>,
    received_count: u16,
    /// Lowest packet number not yet received.
    /// (u32: one past packet 65535 must fit.)
    next_in_order: u32,
    /// End offset of packets 1..next_in_order.
    in_order_end: u64,
    /// The most recently completed packet and its last ciphertext block.
    last_done: (u16, [u8; BLOCK]),
    /// Last ciphertext block of each packet, kept once packets go out of order.
    boundary: Vec<[u8; BLOCK]>,
    crc: Cksum,
    cursor: Option<Cursor>,
    /// Where packets are decrypted before they go to the sink: one [`CHUNK`] at most,
    /// so it stays in the CPU cache.
    scratch: Vec<u8>,
    /// The sink failed a write or read: the transfer ends with 1607 at the packet's end.
    sink_error: Option<std::io::Error>,
}

impl<S> Transfer<S> {
    fn is_received(&self, k: u16) -> bool {
        k >= 1
            && k <= self.total
            && self.received[(k as usize - 1) / 64] >> ((k as usize - 1) % 64) & 1 == 1
    }
    fn set_received(&mut self, k: u16) {
        self.received[(k as usize - 1) / 64] |= 1 << ((k as usize - 1) % 64);
        self.received_count += 1;
    }
    /// Byte range of packet `k` at the fixed stride; the last packet runs to the end
    /// (it may be shorter or longer than packet 1).
    fn packet_range(&self, k: u16) -> (u64, u64) {
        let start = (k as u64 - 1) * self.first_len as u64;
        if k == self.total {
            return (start, self.cipher_total);
        }
        (
            start,
            (start + self.first_len as u64).min(self.cipher_total),
        )
    }
    fn iv_for(&self, k: u16) -> Option<[u8; BLOCK]> {
        if k == 1 {
            Some(ZERO_IV)
        } else if !self.is_received(k - 1) {
            None
        } else if self.last_done.0 == k - 1 {
            Some(self.last_done.1)
        } else {
            self.boundary.get(k as usize - 2).copied()
        }
    }
}

/// A complete, checked file waiting for the client's CRC_OK / CRC_RETRY / CRC_ABORT.
struct Verdict<S> {
    file_name: String,
    sink: S,
    orig: u64,
    cksum: u32,
}

/// Where the connection's file stands: a file is streaming in or waiting for its
/// verdict, never both, and the session holds at most one sink.
// Inline like the `Option<Transfer>` it replaces: the session lives as long as its
// connection, and a box would cost an allocation per file for no saving.
#[allow(clippy::large_enum_variant)]
enum FilePhase<S> {
    /// No file (also while OpenFile or Commit is outstanding: the sink is not ours then).
    None,
    /// Packets are arriving.
    Receiving(Transfer<S>),
    /// All packets are in and checked, 1603 went out: the client's CRC_* decides.
    Received(Verdict<S>),
}

impl<S> FilePhase<S> {
    fn transfer(&self) -> Option<&Transfer<S>> {
        match self {
            FilePhase::Receiving(t) => Some(t),
            _ => None,
        }
    }
    fn transfer_mut(&mut self) -> Option<&mut Transfer<S>> {
        match self {
            FilePhase::Receiving(t) => Some(t),
            _ => None,
        }
    }
    fn verdict(&self) -> Option<&Verdict<S>> {
        match self {
            FilePhase::Received(v) => Some(v),
            _ => None,
        }
    }
    /// The transfer, if a file is streaming in; a verdict stays where it is.
    fn take_transfer(&mut self) -> Option<Transfer<S>> {
        match std::mem::replace(self, FilePhase::None) {
            FilePhase::Receiving(t) => Some(t),
            other => {
                *self = other;
                None
            }
        }
    }
    /// The verdict, if a file waits for one; a transfer stays where it is.
    fn take_verdict(&mut self) -> Option<Verdict<S>> {
        match std::mem::replace(self, FilePhase::None) {
            FilePhase::Received(v) => Some(v),
            other => {
                *self = other;
                None
            }
        }
    }
    /// The sink of whatever file there is, leaving none.
    fn take_sink(&mut self) -> Option<S> {
        match std::mem::replace(self, FilePhase::None) {
            FilePhase::None => None,
            FilePhase::Receiving(t) => Some(t.sink),
            FilePhase::Received(v) => Some(v.sink),
        }
    }
}

/// Why a request was refused; logged, never sent (v3 errors carry no reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Version,
    PayloadTooLarge,
    PayloadSize,
    UnknownClient,
    UnknownCode,
    BadName,
    BadPublicKey,
    KeyRefused,
    BadPacket,
    BadDecryption,
    Storage,
    NoSuchTransfer,
}

/// Counters a runtime may export.
#[derive(Debug, Default, Clone, Copy)]
pub struct SessionStats {
    pub requests: u64,
    pub files_received: u64,
    pub files_committed: u64,
    pub content_bytes: u64,
    pub errors: u64,
}

/// The per-connection state machine. `S` is the file sink, `R` the randomness, `K` the
/// key exchange (RSA-OAEP, as v3 says; only fuzz targets choose another, through
/// [`with_key_exchange`](Self::with_key_exchange)).
pub struct ServerSession<S, R, K: KeyExchange = RsaOaep> {
    cfg: SessionConfig,
    rng: R,
    keys: K,
    inbuf: [u8; REQUEST_HEADER_LEN + SEND_PUBLIC_KEY_LEN],
    inlen: usize,
    read: Read,
    peer: Peer,
    file: FilePhase<S>,
    waiting: Option<Waiting<K::PublicKey>>,
    ops: Vec<Op<S>>,
    out: Vec<u8>,
    closing: bool,
    deadline: Option<Instant>,
    /// Content bytes still owed before `deadline` (the current window).
    due: u32,
    last_refusal: Option<Refusal>,
    stats: SessionStats,
    /// Files that did not decrypt on this connection.
    bad_files: u8,
}

/// Files that do not decrypt before the connection is closed: an honest client never
/// sends one (TCP checksums the bytes), someone without the session key sends many.
pub const MAX_BAD_FILES: u8 = 3;

/// Largest plaintext that goes through the decrypt and the checksum at once, so that it
/// is still in cache for the checksum.
const CHUNK: usize = 64 * 1024;

impl<S: FileSink, R: CryptoRngCore> ServerSession<S, R> {
    /// A session for a new connection.
    pub fn new(cfg: SessionConfig, rng: R, now: Instant) -> Self {
        Self::with_key_exchange(cfg, rng, RsaOaep, now)
    }
}

impl<S: FileSink, R: CryptoRngCore, K: KeyExchange> ServerSession<S, R, K> {
    /// A session for a new connection with the given key exchange. Production code
    /// uses [`new`](ServerSession::new) (RSA-OAEP); this is for fuzz targets and tests.
    pub fn with_key_exchange(cfg: SessionConfig, rng: R, keys: K, now: Instant) -> Self {
        let deadline = Some(now + cfg.idle_timeout);
        Self {
            cfg,
            rng,
            keys,
            inbuf: [0; REQUEST_HEADER_LEN + SEND_PUBLIC_KEY_LEN],
            inlen: 0,
            read: Read::Header,
            peer: Peer::Anonymous,
            file: FilePhase::None,
            waiting: None,
            ops: Vec::new(),
            out: Vec::with_capacity(512),
            closing: false,
            deadline,
            due: 0,
            last_refusal: None,
            stats: SessionStats::default(),
            bad_files: 0,
        }
    }

    /// Response bytes to send.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Forget the output once it has been written.
    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// Forget the first `n` bytes of the output (a partial write).
    pub fn consume_output(&mut self, n: usize) {
        if n >= self.out.len() {
            self.out.clear();
        } else {
            self.out.drain(..n);
        }
    }

    /// The next operation to run.
    pub fn poll_op(&mut self) -> Option<Op<S>> {
        if self.ops.is_empty() {
            None
        } else {
            Some(self.ops.remove(0))
        }
    }

    /// True while an op's completion is awaited.
    pub fn is_waiting(&self) -> bool {
        self.waiting.is_some()
    }

    /// True between requests with no file in flight: closing the connection now loses
    /// nothing (used to drain connections at shutdown).
    pub fn is_idle(&self) -> bool {
        matches!(self.read, Read::Header)
            && self.inlen == 0
            && matches!(self.file, FilePhase::None)
            && self.waiting.is_none()
            && self.ops.is_empty()
    }

    /// True once the connection should be closed (after the output is flushed).
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.waiting.is_some() || self.closing {
            None
        } else {
            self.deadline
        }
    }

    /// The id the client authenticated as on this connection, if any.
    pub fn client_id(&self) -> Option<ClientId> {
        self.peer.id()
    }

    /// Why the last request was refused (for logs).
    pub fn last_refusal(&self) -> Option<Refusal> {
        self.last_refusal
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Heap bytes the session holds apart from its sinks: unsent output, queued ops and
    /// the bookkeeping of a file in flight. Without output it is bounded by a few KiB,
    /// the 64 KiB decryption scratch, plus `16 * total_packets` (at most the ciphertext size of the file in flight);
    /// the fuzz targets check that no input makes it grow further.
    pub fn held_bytes(&self) -> usize {
        let names = |t: &str| t.len();
        let transfer = self.file.transfer().map_or(0, |t| {
            names(&t.file_name)
                + t.received.capacity() * std::mem::size_of::<u64>()
                + t.boundary.capacity() * BLOCK
                + t.scratch.capacity()
        });
        let verdict = self.file.verdict().map_or(0, |v| names(&v.file_name));
        let client = self.peer.client().map_or(0, |(_, name)| names(name));
        self.out.capacity()
            + self.ops.capacity() * std::mem::size_of::<Op<S>>()
            + transfer
            + verdict
            + client
    }

    /// The deadline passed without the input it waited for: the connection closes and
    /// any transfer is dropped.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|d| now >= d) {
            tracing::debug!(state = ?self.read, "timeout, closing");
            self.closing = true;
        }
    }

    /// The connection is gone: returns the sinks to throw away.
    pub fn abort(&mut self) -> Vec<S> {
        self.closing = true;
        let mut v = Vec::new();
        if let Some(sink) = self.file.take_sink() {
            v.push(sink);
        }
        for op in self.ops.drain(..) {
            match op {
                Op::Discard { sink } | Op::Commit { sink, .. } => v.push(sink),
                _ => {}
            }
        }
        v
    }

    /// Feeds bytes read from the peer; returns how many were consumed.
    pub fn handle_input(&mut self, now: Instant, input: &[u8]) -> usize {
        let mut used = 0;
        while used < input.len() && self.waiting.is_none() && !self.closing {
            let rest = &input[used..];
            match self.read {
                Read::Header => {
                    if self.inlen == 0 {
                        self.deadline = Some(now + self.cfg.header_timeout);
                    }
                    let take = (REQUEST_HEADER_LEN - self.inlen).min(rest.len());
                    self.inbuf[self.inlen..self.inlen + take].copy_from_slice(&rest[..take]);
                    self.inlen += take;
                    used += take;
                    if self.inlen == REQUEST_HEADER_LEN {
                        self.on_header(now);
                    }
                }
                Read::Payload { hdr, need } => {
                    let have = self.inlen - REQUEST_HEADER_LEN;
                    let take = (need - have).min(rest.len());
                    self.inbuf[self.inlen..self.inlen + take].copy_from_slice(&rest[..take]);
                    self.inlen += take;
                    used += take;
                    if self.inlen - REQUEST_HEADER_LEN == need {
                        self.on_payload(now, hdr);
                    }
                }
                Read::Content { remaining } => {
                    let take = (remaining as usize).min(rest.len());
                    self.on_content(&rest[..take]);
                    used += take;
                    let remaining = remaining - take as u32;
                    if remaining == 0 {
                        self.on_packet_end(now);
                    } else {
                        self.read = Read::Content { remaining };
                        self.content_arrived(now, take, remaining);
                    }
                }
                Read::Skip { remaining } => {
                    let take = (remaining as usize).min(rest.len());
                    used += take;
                    let remaining = remaining - take as u32;
                    if remaining == 0 {
                        self.next_request(now);
                    } else {
                        self.read = Read::Skip { remaining };
                        self.content_arrived(now, take, remaining);
                    }
                }
            }
        }
        used
    }

    /// Delivers the result of the op the session waits for.
    pub fn complete(&mut self, now: Instant, c: Completion<S>) {
        let Some(w) = self.waiting.take() else {
            // Nothing was asked: hand any sink back for discarding.
            match c {
                Completion::FileOpened(Ok(sink)) => self.ops.push(Op::Discard { sink }),
                _ => tracing::warn!("completion without a pending op"),
            }
            return;
        };
        match (w, c) {
            (Waiting::Register { id, name }, Completion::Registered(ok)) => {
                if ok {
                    tracing::info!(client = %crate::common::client_id_hex(&id), name = %name, "registered");
                    // A file in flight belongs to the identity it was sent under.
                    self.drop_transfer();
                    self.drop_verdict();
                    self.peer = Peer::Registered { id, name };
                    self.respond(Response::RegisterOk { client_id: id });
                } else {
                    tracing::info!(name = %name, "register refused: name taken");
                    self.respond(Response::RegisterFailed);
                }
                self.next_request(now);
            }
            (Waiting::StoreKey { id, name, key }, Completion::PublicKeyStored(r)) => {
                match r {
                    KeyStored::Stored => self.issue_key(id, name, &key, false),
                    KeyStored::UnknownClient => self.refuse_close(Refusal::UnknownClient),
                    KeyStored::Refused => self.refuse_close(Refusal::KeyRefused),
                }
                self.next_request(now);
            }
            (Waiting::Reconnect { id, name }, Completion::Reconnect(look)) => {
                let key = match &look.by_name {
                    Some((stored_id, Some(der))) if *stored_id == id => {
                        self.keys.parse_public_key(der).ok()
                    }
                    _ => None,
                };
                match key {
                    Some(key) => self.issue_key(id, name, &key, true),
                    None => {
                        tracing::info!(name = %name, "reconnect rejected");
                        self.last_refusal = Some(Refusal::UnknownClient);
                        self.respond(Response::ReconnectRejected { client_id: id });
                        if !look.id_known && id != [0u8; 16] {
                            self.closing = true;
                        }
                    }
                }
                self.next_request(now);
            }
            (Waiting::Open(plan, file_name), Completion::FileOpened(r)) => match r {
                Ok(sink) => {
                    if sink.len() != plan.cipher_total {
                        tracing::error!("storage returned a sink of the wrong size");
                        self.ops.push(Op::Discard { sink });
                        self.refuse(Refusal::Storage);
                        self.skip(now, plan.len);
                        return;
                    }
                    let words = (plan.total as usize).div_ceil(64);
                    debug_assert!(
                        matches!(self.file, FilePhase::None),
                        "packet 1 dropped any earlier file"
                    );
                    self.file = FilePhase::Receiving(Transfer {
                        file_name,
                        orig: plan.orig,
                        cipher_total: plan.cipher_total,
                        total: plan.total,
                        sink,
                        first_len: plan.len,
                        uniform: true,
                        out_of_order: false,
                        received: vec![0; words],
                        received_count: 0,
                        next_in_order: 1,
                        in_order_end: 0,
                        last_done: (0, ZERO_IV),
                        boundary: Vec::new(),
                        crc: Cksum::new(),
                        cursor: None,
                        scratch: vec![0; (plan.cipher_total as usize).min(CHUNK)],
                        sink_error: None,
                    });
                    self.start_packet(now, &plan);
                }
                Err(e) => {
                    tracing::warn!(error = %e, file = %file_name, "cannot open a temp file");
                    self.refuse(Refusal::Storage);
                    self.skip(now, plan.len);
                }
            },
            (Waiting::Commit, Completion::Committed(r)) => {
                match r {
                    Ok(()) => {
                        self.stats.files_committed += 1;
                        let (id, name) = self.peer.client().unwrap_or_default();
                        tracing::debug!(client = name, "file committed");
                        self.respond(Response::Ack { client_id: id });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "commit failed");
                        self.refuse(Refusal::Storage);
                    }
                }
                self.next_request(now);
            }
            (_, c) => {
                tracing::error!("completion does not match the pending op; closing");
                if let Completion::FileOpened(Ok(sink)) = c {
                    self.ops.push(Op::Discard { sink });
                }
                self.closing = true;
            }
        }
    }

    // -----------------------------------------------------------------------------

    fn respond(&mut self, r: Response) {
        r.encode(&mut self.out);
    }

    /// 1607, the connection stays open.
    fn refuse(&mut self, why: Refusal) {
        tracing::debug!(reason = ?why, "request refused");
        self.last_refusal = Some(why);
        self.stats.errors += 1;
        self.respond(Response::Error);
    }

    /// 1607 and close.
    fn refuse_close(&mut self, why: Refusal) {
        self.refuse(why);
        self.closing = true;
    }

    fn next_request(&mut self, now: Instant) {
        self.inlen = 0;
        self.read = Read::Header;
        self.deadline = Some(now + self.cfg.idle_timeout);
    }

    fn skip(&mut self, now: Instant, n: u32) {
        if n == 0 {
            self.next_request(now);
        } else {
            self.read = Read::Skip { remaining: n };
            self.open_window(now, n);
        }
    }

    /// Content of `left` bytes is expected: the next window is owed by its deadline.
    fn open_window(&mut self, now: Instant, left: u32) {
        let rate = self.cfg.min_rate.max(1) as u64;
        let window = (rate as f64 * self.cfg.header_timeout.as_secs_f64()).max(1.0);
        self.due = (left as u64).min(window as u64) as u32;
        self.deadline = Some(
            now + self.cfg.header_timeout + Duration::from_secs_f64(self.due as f64 / rate as f64),
        );
    }

    /// `n` content bytes arrived and `left` are still to come: once the window's bytes
    /// are in, the next window opens.
    fn content_arrived(&mut self, now: Instant, n: usize, left: u32) {
        self.due = self.due.saturating_sub(n.min(u32::MAX as usize) as u32);
        if self.due == 0 {
            self.open_window(now, left);
        }
    }

    fn authenticated(&self, id: &ClientId) -> bool {
        matches!(&self.peer, Peer::Keyed { id: i, .. } if i == id)
    }

    fn on_header(&mut self, now: Instant) {
        let Ok(hdr) = RequestHeader::parse(&self.inbuf[..REQUEST_HEADER_LEN]) else {
            return;
        };
        self.stats.requests += 1;
        if hdr.version != VERSION {
            return self.refuse_close(Refusal::Version);
        }
        if hdr.payload_size > self.cfg.max_payload {
            return self.refuse_close(Refusal::PayloadTooLarge);
        }
        let size = hdr.payload_size as usize;
        let need = match hdr.code {
            RequestCode::Register | RequestCode::Reconnect => NAME_PAYLOAD_LEN,
            RequestCode::SendPublicKey => SEND_PUBLIC_KEY_LEN,
            RequestCode::CrcOk | RequestCode::CrcRetry | RequestCode::CrcAbort => NAME_PAYLOAD_LEN,
            RequestCode::SendFile => SEND_FILE_FIXED_LEN,
            RequestCode::Unknown(_) => {
                self.refuse(Refusal::UnknownCode);
                return self.skip(now, hdr.payload_size);
            }
        };
        let size_ok = if hdr.code == RequestCode::SendFile {
            size >= need
        } else {
            size == need
        };
        if !size_ok {
            return self.refuse_close(Refusal::PayloadSize);
        }
        let needs_session_key = matches!(
            hdr.code,
            RequestCode::SendFile
                | RequestCode::CrcOk
                | RequestCode::CrcRetry
                | RequestCode::CrcAbort
        );
        if needs_session_key && !self.authenticated(&hdr.client_id) {
            return self.refuse_close(Refusal::UnknownClient);
        }
        self.read = Read::Payload { hdr, need };
    }

    fn on_payload(&mut self, now: Instant, hdr: RequestHeader) {
        let payload_end = self.inlen;
        let payload = &self.inbuf[REQUEST_HEADER_LEN..payload_end];
        match hdr.code {
            RequestCode::Register => {
                let name = message::decode_name_payload(payload)
                    .map_err(|_| ())
                    .and_then(|raw| {
                        name::check_user_name(raw)
                            .map(str::to_owned)
                            .map_err(|_| ())
                    });
                match name {
                    Ok(name) => {
                        let mut id = [0u8; 16];
                        self.rng.fill_bytes(&mut id);
                        id[6] = (id[6] & 0x0F) | 0x40; // UUID version 4
                        id[8] = (id[8] & 0x3F) | 0x80; // RFC 4122 variant
                        self.ops.push(Op::Register {
                            client_id: id,
                            name: name.clone(),
                        });
                        self.waiting = Some(Waiting::Register { id, name });
                    }
                    Err(()) => {
                        self.refuse(Refusal::BadName);
                        self.next_request(now);
                    }
                }
            }
            RequestCode::SendPublicKey => {
                let parsed =
                    message::decode_send_public_key(payload)
                        .ok()
                        .and_then(|(raw, key)| {
                            Some((name::check_user_name(raw).ok()?.to_owned(), *key))
                        });
                let Some((name, field)) = parsed else {
                    // The header's id may be unknown too: close, as the Errors table says.
                    return self.refuse_close(Refusal::BadName);
                };
                let key = match self.keys.parse_public_key(&field) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::info!(error = %e, "public key refused");
                        return self.refuse_close(Refusal::BadPublicKey);
                    }
                };
                let registered_here = self.peer.registered_here(&hdr.client_id);
                self.ops.push(Op::StorePublicKey {
                    client_id: hdr.client_id,
                    name: name.clone(),
                    public_key: Box::new(field),
                    registered_here,
                });
                self.waiting = Some(Waiting::StoreKey {
                    id: hdr.client_id,
                    name,
                    key,
                });
            }
            RequestCode::Reconnect => {
                let name = message::decode_name_payload(payload)
                    .ok()
                    .and_then(|raw| name::check_user_name(raw).ok())
                    .map(str::to_owned);
                match name {
                    Some(name) => {
                        self.ops.push(Op::Reconnect {
                            client_id: hdr.client_id,
                            name: name.clone(),
                        });
                        self.waiting = Some(Waiting::Reconnect {
                            id: hdr.client_id,
                            name,
                        });
                    }
                    None => {
                        self.last_refusal = Some(Refusal::BadName);
                        self.respond(Response::ReconnectRejected {
                            client_id: hdr.client_id,
                        });
                        self.next_request(now);
                    }
                }
            }
            RequestCode::CrcOk | RequestCode::CrcRetry | RequestCode::CrcAbort => {
                let name = message::decode_name_payload(payload)
                    .ok()
                    .and_then(|raw| name::check_file_name(raw).ok())
                    .map(str::to_owned);
                self.on_crc(now, hdr.code, name);
            }
            RequestCode::SendFile => {
                let content_size = hdr.payload_size - SEND_FILE_FIXED_LEN as u32;
                let head = SendFileHead::decode(payload).ok();
                match head {
                    Some(head) if head.content_size == content_size => {
                        // Copy the name out of the input buffer (on the stack: no
                        // allocation per packet) so that `self` can be borrowed mutably.
                        let mut raw = [0u8; name::NAME_FIELD_LEN];
                        raw[..head.file_name.len()].copy_from_slice(head.file_name);
                        let raw = &raw[..head.file_name.len()];
                        let orig = head.orig_file_size as u64;
                        let (number, total) = (head.packet_number, head.total_packets);
                        match name::check_file_name(raw) {
                            Ok(f) => self.on_packet_head(now, f, orig, number, total, content_size),
                            Err(_) => {
                                self.drop_transfer();
                                self.refuse(Refusal::BadName);
                                self.skip(now, content_size);
                            }
                        }
                    }
                    Some(_) => self.refuse_close(Refusal::PayloadSize),
                    None => {
                        // the name field has no terminator
                        self.drop_transfer();
                        self.refuse(Refusal::BadName);
                        self.skip(now, content_size);
                    }
                }
            }
            RequestCode::Unknown(_) => unreachable_code_path(self),
        }
    }

    fn issue_key(&mut self, id: ClientId, name: String, key: &K::PublicKey, reconnect: bool) {
        // Wiped when this function returns: the schedules keep what decryption needs.
        let aes_key = zeroize::Zeroizing::new(self.keys.session_key(&mut self.rng));
        match self.keys.encrypt_session_key(key, &mut self.rng, &aes_key) {
            Ok(encrypted_key) => {
                let registered_here = self.peer.registered_here(&id);
                tracing::info!(client = %crate::common::client_id_hex(&id), name = %name, reconnect, "session key issued");
                if self.peer.id().is_some_and(|i| i != id) {
                    // A file in flight belongs to the identity it was sent under: it
                    // must never be committed into another client's directory.
                    self.drop_transfer();
                    self.drop_verdict();
                }
                self.peer = Peer::Keyed {
                    id,
                    name,
                    registered_here,
                    key: crypto::decryption_key(&aes_key),
                };
                self.respond(if reconnect {
                    Response::ReconnectOk {
                        client_id: id,
                        encrypted_key,
                    }
                } else {
                    Response::AesKey {
                        client_id: id,
                        encrypted_key,
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "RSA encryption of the session key failed");
                self.refuse(Refusal::BadPublicKey);
            }
        }
    }

    fn drop_transfer(&mut self) {
        if let Some(t) = self.file.take_transfer() {
            self.ops.push(Op::Discard { sink: t.sink });
        }
    }

    fn drop_verdict(&mut self) {
        if let Some(v) = self.file.take_verdict() {
            self.ops.push(Op::Discard { sink: v.sink });
        }
    }

    fn on_crc(&mut self, now: Instant, code: RequestCode, name: Option<String>) {
        let id = self.peer.id().unwrap_or_default();
        let matches_verdict =
            name.is_some() && self.file.verdict().map(|v| &v.file_name) == name.as_ref();
        let matches_transfer =
            name.is_some() && self.file.transfer().map(|t| &t.file_name) == name.as_ref();
        match code {
            RequestCode::CrcOk if matches_verdict => {
                let Some(v) = self.file.take_verdict() else {
                    return;
                };
                self.ops.push(Op::Commit {
                    client_id: id,
                    file_name: v.file_name,
                    sink: v.sink,
                    size: v.orig,
                    cksum: v.cksum,
                });
                self.waiting = Some(Waiting::Commit);
                return;
            }
            RequestCode::CrcRetry | RequestCode::CrcAbort
                if matches_verdict || matches_transfer =>
            {
                if matches_verdict {
                    self.drop_verdict();
                } else {
                    self.drop_transfer();
                }
                tracing::info!(code = ?code, file = name.as_deref().unwrap_or(""), "pending file discarded");
                self.respond(Response::Ack { client_id: id });
            }
            _ => self.refuse(Refusal::NoSuchTransfer),
        }
        self.next_request(now);
    }

    /// Validates a packet's fixed part against the transfer and starts its content.
    fn on_packet_head(
        &mut self,
        now: Instant,
        file_name: &str,
        orig: u64,
        number: u16,
        total: u16,
        len: u32,
    ) {
        let cipher_total = crypto::ciphertext_len(orig);
        let sane = len > 0
            && len.is_multiple_of(BLOCK as u32)
            && orig <= self.cfg.max_file_size
            && cipher_total <= u32::MAX as u64
            && total >= 1
            && number >= 1
            && number <= total
            && (total as u64) * BLOCK as u64 <= cipher_total;
        if !sane {
            self.drop_transfer();
            self.refuse(Refusal::BadPacket);
            return self.skip(now, len);
        }
        if number == 1 {
            self.drop_transfer();
            self.drop_verdict();
            let end = len as u64;
            let fits = if total == 1 {
                end == cipher_total
            } else {
                end < cipher_total
            };
            if !fits {
                self.refuse(Refusal::BadPacket);
                return self.skip(now, len);
            }
            let id = self.peer.id().unwrap_or_default();
            self.ops.push(Op::OpenFile {
                client_id: id,
                file_name: file_name.to_owned(),
                len: cipher_total,
            });
            let plan = PacketPlan {
                orig,
                cipher_total,
                total,
                number,
                offset: 0,
                len,
            };
            self.waiting = Some(Waiting::Open(plan, file_name.to_owned()));
            return;
        }
        let plan = self.file.transfer().and_then(|t| {
            if t.file_name != file_name
                || t.orig != orig
                || t.total != total
                || t.is_received(number)
            {
                return None;
            }
            let in_order = number as u32 == t.next_in_order;
            let is_last = number == total;
            // In order with no gap so far, packet sizes may differ; otherwise every
            // packet but the last has the size of packet 1 and sits at a fixed stride.
            let fixed_stride = t.out_of_order || !in_order;
            let offset = if fixed_stride {
                if !t.uniform || (!is_last && len != t.first_len) {
                    return None;
                }
                (number as u64 - 1) * t.first_len as u64
            } else {
                t.in_order_end
            };
            let end = offset + len as u64;
            let fits = if is_last {
                end == cipher_total
            } else {
                end < cipher_total
            };
            fits.then_some(PacketPlan {
                orig,
                cipher_total,
                total,
                number,
                offset,
                len,
            })
        });
        match plan {
            Some(plan) => self.start_packet(now, &plan),
            None => {
                self.drop_transfer();
                self.refuse(Refusal::BadPacket);
                self.skip(now, len);
            }
        }
    }

    fn start_packet(&mut self, now: Instant, plan: &PacketPlan) {
        let Some(t) = self.file.transfer_mut() else {
            return self.skip(now, plan.len);
        };
        let Some(key) = self.peer.key() else {
            return self.refuse_close(Refusal::UnknownClient);
        };
        let k = plan.number;
        let in_order = k as u32 == t.next_in_order;
        if !in_order && !t.out_of_order {
            t.out_of_order = true;
            t.boundary = vec![ZERO_IV; t.total as usize];
            if t.last_done.0 >= 1 {
                t.boundary[t.last_done.0 as usize - 1] = t.last_done.1;
            }
        }
        if k != t.total && plan.len != t.first_len {
            t.uniform = false;
        }
        let iv = t.iv_for(k).unwrap_or(ZERO_IV);
        t.cursor = Some(Cursor {
            number: k,
            pos: plan.offset,
            end: plan.offset + plan.len as u64,
            dec: StreamDecryptor::new(key, &iv),
            carry: [0; BLOCK],
            carry_len: 0,
            last_cipher: iv,
            in_prefix: in_order,
        });
        self.read = Read::Content {
            remaining: plan.len,
        };
        self.open_window(now, plan.len);
    }

    /// Decrypts `data` (the next bytes of the current packet) into the scratch buffer,
    /// checksums it when it extends the in-order prefix, and writes it to the sink.
    fn on_content(&mut self, mut data: &[u8]) {
        self.stats.content_bytes += data.len() as u64;
        let Some(t) = self.file.transfer_mut() else {
            return;
        };
        let Some(c) = t.cursor.as_mut() else { return };
        if t.sink_error.is_some() {
            return;
        }
        let orig = t.orig;
        let mut written = Ok(());
        if c.carry_len > 0 {
            let take = (BLOCK - c.carry_len).min(data.len());
            c.carry[c.carry_len..c.carry_len + take].copy_from_slice(&data[..take]);
            c.carry_len += take;
            data = &data[take..];
            if c.carry_len < BLOCK {
                return;
            }
            let out = &mut t.scratch[..BLOCK];
            let _ = c.dec.decrypt_b2b(&c.carry, out);
            c.last_cipher = c.carry;
            c.carry_len = 0;
            if c.in_prefix {
                update_clamped(&mut t.crc, out, c.pos, orig);
            }
            written = t.sink.write_at(c.pos, out);
            c.pos += BLOCK as u64;
        }
        let whole = data.len() / BLOCK * BLOCK;
        let mut blocks = &data[..whole];
        while !blocks.is_empty() && written.is_ok() {
            // Whole blocks, at most a CHUNK, at least one block: always progress.
            let want = blocks.len().min(CHUNK);
            let n = match t.sink.stage(c.pos, want) {
                Some(out) if out.len() >= BLOCK => {
                    let n = out.len().min(want) / BLOCK * BLOCK;
                    let out = &mut out[..n];
                    let _ = c.dec.decrypt_b2b(&blocks[..n], out);
                    if c.in_prefix {
                        update_clamped(&mut t.crc, out, c.pos, orig);
                    }
                    written = t.sink.staged(n);
                    n
                }
                _ => {
                    let n = want.min(t.scratch.len()) / BLOCK * BLOCK;
                    let out = &mut t.scratch[..n];
                    let _ = c.dec.decrypt_b2b(&blocks[..n], out);
                    if c.in_prefix {
                        update_clamped(&mut t.crc, out, c.pos, orig);
                    }
                    written = t.sink.write_at(c.pos, out);
                    n
                }
            };
            c.pos += n as u64;
            blocks = &blocks[n..];
        }
        if let Err(e) = written {
            t.sink_error = Some(e);
            return;
        }
        if whole > 0 {
            c.last_cipher.copy_from_slice(&data[whole - BLOCK..whole]);
        }
        let rest = &data[whole..];
        c.carry[..rest.len()].copy_from_slice(rest);
        c.carry_len = rest.len();
    }

    fn on_packet_end(&mut self, now: Instant) {
        let Some(t) = self.file.transfer_mut() else {
            return self.next_request(now);
        };
        let Some(c) = t.cursor.take() else {
            return self.next_request(now);
        };
        let placed = match t.sink_error.take() {
            Some(e) => Err(e),
            None => Self::place(t, &c),
        };
        if let Err(e) = placed {
            tracing::warn!(error = %e, file = %t.file_name, "cannot write the file");
            self.drop_transfer();
            self.refuse(Refusal::Storage);
            return self.next_request(now);
        }
        if t.received_count == t.total {
            self.finish_file(now);
        } else {
            self.next_request(now);
        }
    }

    /// Books a packet whose content is in the sink: fixes up its successor's first
    /// block if that came first, and checksums what is now in order.
    fn place(t: &mut Transfer<S>, c: &Cursor) -> std::io::Result<()> {
        debug_assert_eq!(c.pos, c.end);
        let k = c.number;
        t.set_received(k);
        t.last_done = (k, c.last_cipher);
        if t.out_of_order {
            t.boundary[k as usize - 1] = c.last_cipher;
        }
        // The successor arrived first: its first block was decrypted with a zero IV.
        if k < t.total && t.is_received(k + 1) {
            let (start, _) = t.packet_range(k + 1);
            let mut block = [0u8; BLOCK];
            t.sink.read_at(start, &mut block)?;
            for (b, x) in block.iter_mut().zip(c.last_cipher) {
                *b ^= x;
            }
            t.sink.write_at(start, &block)?;
        }
        if c.in_prefix {
            t.next_in_order = k as u32 + 1;
            t.in_order_end = c.end;
            // Close the gap: packets that came ahead are now final; checksum them.
            while t.next_in_order <= t.total as u32 && t.is_received(t.next_in_order as u16) {
                let (mut pos, e) = t.packet_range(t.next_in_order as u16);
                let end = e.min(t.orig);
                while pos < end {
                    let n = ((end - pos) as usize).min(t.scratch.len());
                    t.sink.read_at(pos, &mut t.scratch[..n])?;
                    t.crc.update(&t.scratch[..n]);
                    pos += n as u64;
                }
                t.in_order_end = e;
                t.next_in_order += 1;
            }
            let end = t.in_order_end.min(t.orig);
            t.sink.settled(end);
        }
        Ok(())
    }

    fn finish_file(&mut self, now: Instant) {
        let Some(mut t) = self.file.take_transfer() else {
            return;
        };
        let mut last = [0u8; BLOCK];
        if let Err(e) = t.sink.read_at(t.cipher_total - BLOCK as u64, &mut last) {
            tracing::warn!(error = %e, file = %t.file_name, "cannot read the file back");
            self.ops.push(Op::Discard { sink: t.sink });
            self.refuse(Refusal::Storage);
            return self.next_request(now);
        }
        let data_in_last = crypto::unpad(&last).ok();
        let expect = (t.orig % BLOCK as u64) as usize;
        if data_in_last != Some(expect) || t.crc.len() != t.orig {
            tracing::info!(file = %t.file_name, "file does not decrypt (bad padding)");
            self.ops.push(Op::Discard { sink: t.sink });
            self.bad_files += 1;
            if self.bad_files >= MAX_BAD_FILES {
                // Someone guessing at padding without the key: stop them here.
                return self.refuse_close(Refusal::BadDecryption);
            }
            self.refuse(Refusal::BadDecryption);
            return self.next_request(now);
        }
        let cksum = t.crc.finalize();
        let id = self.peer.id().unwrap_or_default();
        self.stats.files_received += 1;
        tracing::debug!(file = %t.file_name, size = t.orig, cksum, "file received");
        self.respond(Response::FileReceived(FileReceived {
            client_id: id,
            content_size: t.cipher_total as u32,
            file_name: t.file_name.clone(),
            cksum,
        }));
        self.file = FilePhase::Received(Verdict {
            file_name: t.file_name,
            sink: t.sink,
            orig: t.orig,
            cksum,
        });
        self.next_request(now);
    }
}

/// `Unknown` codes are skipped in `on_header` and never reach `on_payload`; should one,
/// the connection is closed rather than panicking.
fn unreachable_code_path<S: FileSink, R: CryptoRngCore, K: KeyExchange>(
    s: &mut ServerSession<S, R, K>,
) {
    s.refuse_close(Refusal::UnknownCode);
}

/// Checksums `buf`, which holds the file's bytes from `start` on, clipped to the
/// plaintext length `orig` (the padding is not checksummed).
#[inline]
fn update_clamped(crc: &mut Cksum, buf: &[u8], start: u64, orig: u64) {
    if start < orig {
        let n = (orig - start).min(buf.len() as u64) as usize;
        crc.update(&buf[..n]);
    }
}

pub mod memory;

#[cfg(test)]
mod tests;
