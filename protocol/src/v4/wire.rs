//! The v4 wire format: the preamble, frame headers, and every request and answer body
//! (`docs/PROTOCOL-V4.md` §1, §3, §5, §6), encoded and decoded with every length
//! bounded before it is used.
//!
//! Decoding never panics and never allocates more than the body it was given: a body
//! is only decoded once its frame's `len` passed [`max_request_len`] (or [`max_answer_len`]) and the whole body
//! has arrived, and every count inside it is checked against the bytes that are left.

use std::fmt;

/// The 16-byte magic a v4 connection starts with.
pub const MAGIC: &[u8; 16] = b"CyberBackup-v4\r\n";
/// The protocol version byte (offset 16 of the preamble, like v3's header).
pub const VERSION: u8 = 4;
/// Bytes of the preamble: the magic and the version byte.
pub const PREAMBLE_LEN: usize = 17;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 16;

/// A chunk id: the keyed BLAKE3 hash of the chunk's plaintext.
pub type ChunkId = [u8; 32];
/// A snapshot id: 16 random bytes chosen by the client.
pub type SnapshotId = [u8; 16];

/// Most ids in one HAS_CHUNKS.
pub const MAX_HAS_CHUNKS: u32 = 16_384;
/// Most bytes of snapshot refs in one COMMIT_SNAPSHOT (2 Mi chunk ids).
pub const MAX_REFS_BYTES: u64 = 64 << 20;
/// Largest snapshot root.
pub const MAX_ROOT_LEN: u64 = 1 << 20;
/// Largest wrapped repository key.
pub const MAX_KEY_LEN: u64 = 4096;
/// Largest error message.
pub const MAX_ERROR_MESSAGE: usize = 1024;
/// Largest error detail.
pub const MAX_ERROR_DETAIL: usize = 32 * 1024;
/// Longest host name in a snapshot header.
pub const MAX_HOST_LEN: usize = 255;
/// Most tags on a snapshot.
pub const MAX_TAGS: usize = 64;
/// Longest tag.
pub const MAX_TAG_LEN: usize = 128;
/// Longest account or device name.
pub const MAX_NAME_LEN: usize = 100;
/// Most snapshots one SNAPSHOT_LIST carries.
pub const MAX_LIST: u32 = 1 << 20;
/// Bound on any answer body a client accepts (a SNAPSHOT_LIST of many snapshots).
pub const MAX_ANSWER_LEN: u64 = 256 << 20;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// Fewer than [`PREAMBLE_LEN`] bytes so far.
    NeedMore,
    /// A v4 preamble: skip [`PREAMBLE_LEN`] bytes and start a v4 session.
    V4,
    /// Anything else: a v3 session takes every byte (and answers a bad version as v3).
    V3,
}

/// Tells a v4 connection from a v3 one by the version byte at offset 16.
pub fn detect(first: &[u8]) -> Detected {
    if first.len() < PREAMBLE_LEN {
        return Detected::NeedMore;
    }
    if first[16] == VERSION && &first[..16] == MAGIC {
        Detected::V4
    } else {
        Detected::V3
    }
}

/// The preamble a client sends first.
pub fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..16].copy_from_slice(MAGIC);
    p[16] = VERSION;
    p
}

/// Frame kinds (`docs/PROTOCOL-V4.md` §5).
pub mod kind {
    pub const HAS_CHUNKS: u16 = 0x0001;
    pub const PUT_CHUNK: u16 = 0x0002;
    pub const COMMIT_SNAPSHOT: u16 = 0x0003;
    pub const LIST_SNAPSHOTS: u16 = 0x0004;
    pub const GET_SNAPSHOT: u16 = 0x0005;
    pub const GET_CHUNK: u16 = 0x0006;
    pub const FORGET_SNAPSHOT: u16 = 0x0007;
    pub const USAGE: u16 = 0x0008;
    pub const PUT_KEY: u16 = 0x0009;
    pub const GET_KEY: u16 = 0x000A;
    pub const DEVICE_ADD: u16 = 0x000B;
    pub const LIST_DEVICES: u16 = 0x000C;
    pub const REVOKE_DEVICE: u16 = 0x000D;
    pub const LEGACY_LOGIN: u16 = 0x000E;
    pub const LEGACY_LIST: u16 = 0x000F;
    pub const LEGACY_READ: u16 = 0x0011;
    pub const PRUNE: u16 = 0x0012;

    pub const ERROR: u16 = 0x8000;
    pub const CHUNKS_HELD: u16 = 0x8001;
    pub const CHUNK_STORED: u16 = 0x8002;
    pub const SNAPSHOT_COMMITTED: u16 = 0x8003;
    pub const SNAPSHOT_LIST: u16 = 0x8004;
    pub const SNAPSHOT: u16 = 0x8005;
    pub const CHUNK: u16 = 0x8006;
    pub const FORGOTTEN: u16 = 0x8007;
    pub const USAGE_INFO: u16 = 0x8008;
    pub const KEY_STORED: u16 = 0x8009;
    pub const KEY: u16 = 0x800A;
    pub const ENROLMENT: u16 = 0x800B;
    pub const DEVICE_LIST: u16 = 0x800C;
    pub const DEVICE_REVOKED: u16 = 0x800D;
    pub const LEGACY_ACCOUNT: u16 = 0x800E;
    pub const LEGACY_FILES: u16 = 0x800F;
    pub const WELCOME: u16 = 0x8010;
    pub const LEGACY_DATA: u16 = 0x8011;
    pub const PRUNED: u16 = 0x8012;
}

/// A reason code (`docs/PROTOCOL-V4.md` §6).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    pub const BAD_FRAME: Self = Self(100);
    pub const FRAME_TOO_LARGE: Self = Self(101);
    pub const UNKNOWN_KIND: Self = Self(102);
    pub const WINDOW_EXCEEDED: Self = Self(103);
    pub const TIMEOUT: Self = Self(104);
    pub const UNKNOWN_DEVICE: Self = Self(200);
    pub const DEVICE_REVOKED: Self = Self(201);
    pub const NAME_TAKEN: Self = Self(202);
    pub const BAD_NAME: Self = Self(203);
    pub const REGISTRATION_CLOSED: Self = Self(204);
    pub const BAD_CODE: Self = Self(205);
    pub const FORBIDDEN: Self = Self(300);
    pub const NOT_FOUND: Self = Self(400);
    pub const MISSING_CHUNKS: Self = Self(401);
    pub const SNAPSHOT_EXISTS: Self = Self(402);
    pub const BAD_REQUEST: Self = Self(403);
    pub const QUOTA_EXCEEDED: Self = Self(404);
    pub const INTERNAL: Self = Self(500);
    pub const STORAGE_FULL: Self = Self(501);
    pub const SHUTTING_DOWN: Self = Self(502);

    /// The code's name in the spec, or "UNKNOWN".
    pub fn name(self) -> &'static str {
        match self.0 {
            100 => "BAD_FRAME",
            101 => "FRAME_TOO_LARGE",
            102 => "UNKNOWN_KIND",
            103 => "WINDOW_EXCEEDED",
            104 => "TIMEOUT",
            200 => "UNKNOWN_DEVICE",
            201 => "DEVICE_REVOKED",
            202 => "NAME_TAKEN",
            203 => "BAD_NAME",
            204 => "REGISTRATION_CLOSED",
            205 => "BAD_CODE",
            300 => "FORBIDDEN",
            400 => "NOT_FOUND",
            401 => "MISSING_CHUNKS",
            402 => "SNAPSHOT_EXISTS",
            403 => "BAD_REQUEST",
            404 => "QUOTA_EXCEEDED",
            500 => "INTERNAL",
            501 => "STORAGE_FULL",
            502 => "SHUTTING_DOWN",
            _ => "UNKNOWN",
        }
    }

    /// Whether the server closes the connection after sending this code.
    pub fn closes(self) -> bool {
        matches!(self.0, 100 | 101 | 103 | 104 | 200..=299 | 502)
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{what}: body ends early")]
    Short { what: &'static str },
    #[error("{what}: {extra} bytes after the end")]
    Trailing { what: &'static str, extra: usize },
    #[error("{what}: {detail}")]
    Invalid {
        what: &'static str,
        detail: &'static str,
    },
    #[error("frame kind {0:#06x}: body of {1} bytes over its limit")]
    TooLarge(u16, u64),
    #[error("unknown frame kind {0:#06x}")]
    UnknownKind(u16),
}

impl WireError {
    /// The reason code a server answers this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge(..) => ErrorCode::FRAME_TOO_LARGE,
            WireError::UnknownKind(_) => ErrorCode::UNKNOWN_KIND,
            // A field out of range in a well-framed body: the stream is intact.
            WireError::Invalid { what, .. } if *what != "frame header" => ErrorCode::BAD_REQUEST,
            _ => ErrorCode::BAD_FRAME,
        }
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u16,
    pub flags: u16,
    pub request_id: u32,
    pub len: u64,
}

impl FrameHeader {
    pub fn parse(b: &[u8; FRAME_HEADER_LEN]) -> FrameHeader {
        FrameHeader {
            kind: u16::from_le_bytes([b[0], b[1]]),
            flags: u16::from_le_bytes([b[2], b[3]]),
            request_id: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            len: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        }
    }

    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0..2].copy_from_slice(&self.kind.to_le_bytes());
        b[2..4].copy_from_slice(&self.flags.to_le_bytes());
        b[4..8].copy_from_slice(&self.request_id.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// Largest body a request of `kind` may have, given the server's `max_chunk`; `None`
/// for a kind that is not a request.
pub fn max_request_len(kind: u16, max_chunk: u32) -> Option<u64> {
    Some(match kind {
        kind::HAS_CHUNKS => 4 + 32 * MAX_HAS_CHUNKS as u64,
        kind::PUT_CHUNK => 32 + max_chunk as u64,
        kind::COMMIT_SNAPSHOT => MAX_SNAPSHOT_HEADER as u64 + 4 + MAX_REFS_BYTES + MAX_ROOT_LEN,
        kind::LIST_SNAPSHOTS | kind::USAGE | kind::GET_KEY => 0,
        kind::GET_SNAPSHOT | kind::FORGET_SNAPSHOT => 16,
        kind::GET_CHUNK => 32,
        kind::PUT_KEY => MAX_KEY_LEN,
        kind::DEVICE_ADD => 4 + 2 + MAX_NAME_LEN as u64 + 4,
        kind::LIST_DEVICES => 0,
        kind::REVOKE_DEVICE => 8,
        kind::LEGACY_LOGIN => 16 + MAX_LEGACY_SIGNATURE as u64,
        kind::LEGACY_LIST => 2 + MAX_LEGACY_NAME as u64,
        kind::LEGACY_READ => 2 + MAX_LEGACY_NAME as u64 + 8 + 4,
        kind::PRUNE => 0,
        _ => return None,
    })
}

/// Longest enrolment code.
pub const MAX_CODE_LEN: usize = 64;
/// Longest v3 client or file name (v3's fixed name field).
pub const MAX_LEGACY_NAME: usize = 255;
/// Longest LEGACY_LOGIN signature (a 4096-bit RSA signature).
pub const MAX_LEGACY_SIGNATURE: usize = 512;
/// Most files in one LEGACY_FILES answer.
pub const MAX_LEGACY_PAGE: u32 = 1000;
/// Most bytes one LEGACY_READ may ask for.
pub const MAX_LEGACY_READ: u32 = 4 << 20;
/// Most devices one DEVICE_LIST carries.
pub const MAX_DEVICES: u32 = 65_536;

/// Largest body an answer of `kind` may have, given the server's `max_chunk`.
pub fn max_answer_len(kind: u16, max_chunk: u32) -> Option<u64> {
    Some(match kind {
        kind::ERROR => (2 + 2 + MAX_ERROR_MESSAGE + MAX_ERROR_DETAIL) as u64,
        kind::CHUNKS_HELD => 4 + (MAX_HAS_CHUNKS as u64).div_ceil(8),
        kind::CHUNK_STORED | kind::SNAPSHOT_COMMITTED => 1,
        kind::SNAPSHOT_LIST => MAX_ANSWER_LEN,
        kind::SNAPSHOT => MAX_SNAPSHOT_HEADER as u64 + 16 + MAX_ROOT_LEN,
        kind::CHUNK => max_chunk as u64,
        kind::FORGOTTEN | kind::KEY_STORED => 0,
        kind::USAGE_INFO => 32,
        kind::KEY => MAX_KEY_LEN,
        kind::WELCOME => 8 + 8 + 4 + 2 + MAX_NAME_LEN as u64,
        kind::ENROLMENT => 2 + MAX_CODE_LEN as u64 + 8,
        kind::DEVICE_LIST => 4 + MAX_DEVICES as u64 * (8 + 4 + 8 + 8 + 1 + 2 + MAX_NAME_LEN as u64),
        kind::DEVICE_REVOKED => 0,
        kind::LEGACY_ACCOUNT => 2 + MAX_LEGACY_NAME as u64 + 16,
        kind::LEGACY_FILES => {
            4 + MAX_LEGACY_PAGE as u64 * (2 + MAX_LEGACY_NAME as u64 + 8 + 4 + 8) + 1
        }
        kind::LEGACY_DATA => MAX_LEGACY_READ as u64,
        kind::PRUNED => 24,
        _ => return None,
    })
}

/// Largest encoded snapshot header (without the server's two fields).
pub const MAX_SNAPSHOT_HEADER: usize =
    16 + 8 * 5 + 2 + MAX_HOST_LEN + 2 + MAX_TAGS * (2 + MAX_TAG_LEN);

/// The part of a snapshot the server reads (`docs/PROTOCOL-V4.md` §5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotHeader {
    pub id: SnapshotId,
    /// Milliseconds since the Unix epoch, by the client's clock.
    pub time_ms: i64,
    pub files: u64,
    pub dirs: u64,
    /// Plaintext bytes of the files.
    pub size: u64,
    /// Bytes of chunk blobs this snapshot added (informational).
    pub stored: u64,
    pub host: String,
    pub tags: Vec<String>,
}

/// A snapshot as the server lists it: the header, who committed it, and when.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotInfo {
    pub header: SnapshotHeader,
    pub device: u64,
    /// Server time of the commit, milliseconds since the Unix epoch.
    pub committed_ms: u64,
}

/// What a server tells about itself in handshake message 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// Bytes of requests a client may have unanswered.
    pub window: u32,
    /// Largest chunk blob the server takes.
    pub max_chunk: u32,
    /// Software name and version.
    pub server: String,
}

/// Login modes (handshake message 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginMode {
    /// The device key names the device and its account.
    Device = 1,
    /// Create an account with this device as its first.
    Create = 2,
    /// Join the account of a one-time enrolment code.
    Enrol = 3,
}

/// Handshake message 3's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub mode: LoginMode,
    pub account: String,
    pub device: String,
    /// Mode 3 only: the enrolment code.
    pub code: String,
}

/// The answer to a login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub account_id: u64,
    pub device_id: u64,
    pub capabilities: u32,
    pub account: String,
}

/// An account's use of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub chunks: u64,
    pub stored_bytes: u64,
    pub snapshots: u64,
    /// 0: no quota.
    pub quota: u64,
}

/// An ERROR answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorAnswer {
    pub code: ErrorCode,
    pub message: String,
    /// For MISSING_CHUNKS: the missing ids, 32 bytes each.
    pub detail: Vec<u8>,
}

impl ErrorAnswer {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        truncate_utf8(&mut message, MAX_ERROR_MESSAGE);
        ErrorAnswer {
            code,
            message,
            detail: Vec::new(),
        }
    }

    /// A MISSING_CHUNKS answer naming (at most 1,024 of) `ids`.
    pub fn missing_chunks(ids: &[ChunkId]) -> Self {
        let mut e = ErrorAnswer::new(
            ErrorCode::MISSING_CHUNKS,
            format!("{} chunks named by the snapshot are not stored", ids.len()),
        );
        for id in ids.iter().take(MAX_ERROR_DETAIL / 32) {
            e.detail.extend_from_slice(id);
        }
        e
    }

    /// The ids of a MISSING_CHUNKS answer.
    pub fn missing_ids(&self) -> Vec<ChunkId> {
        self.detail
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap_or([0; 32]))
            .collect()
    }
}

impl fmt::Display for ErrorAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    HasChunks(Vec<ChunkId>),
    PutChunk {
        id: ChunkId,
        blob: Vec<u8>,
    },
    CommitSnapshot {
        header: SnapshotHeader,
        refs: Vec<ChunkId>,
        root: Vec<u8>,
    },
    ListSnapshots,
    GetSnapshot(SnapshotId),
    GetChunk(ChunkId),
    ForgetSnapshot(SnapshotId),
    Usage,
    PutKey(Vec<u8>),
    GetKey,
    /// Make an enrolment code for a new device of this account.
    DeviceAdd {
        capabilities: u32,
        name: String,
        ttl_s: u32,
    },
    ListDevices,
    RevokeDevice(u64),
    /// Prove a v3 identity (`docs/PROTOCOL-V4.md` §5.1).
    LegacyLogin {
        client_id: [u8; 16],
        signature: Vec<u8>,
    },
    /// List the proven v3 client's files after `after`.
    LegacyList {
        after: String,
    },
    /// Read a piece of one of its files.
    LegacyRead {
        name: String,
        offset: u64,
        max: u32,
    },
    /// Collect the account's unreferenced chunks now.
    Prune,
}

/// A v3 upload as LEGACY_FILES tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyFile {
    pub name: String,
    pub size: u64,
    /// POSIX `cksum` of the bytes.
    pub cksum: u32,
    /// When it was stored, ms since the epoch.
    pub stored_ms: u64,
}

/// A device as DEVICE_LIST tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: u64,
    pub capabilities: u32,
    pub created_ms: u64,
    /// 0: not revoked.
    pub revoked_ms: u64,
    /// The device that asked.
    pub this: bool,
    pub name: String,
}

/// A server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Error(ErrorAnswer),
    ChunksHeld(Vec<bool>),
    ChunkStored {
        already: bool,
    },
    SnapshotCommitted {
        already: bool,
    },
    SnapshotList(Vec<SnapshotInfo>),
    Snapshot {
        info: SnapshotInfo,
        root: Vec<u8>,
    },
    Chunk(Vec<u8>),
    Forgotten,
    UsageInfo(Usage),
    KeyStored,
    Key(Vec<u8>),
    Welcome(Welcome),
    Enrolment {
        code: String,
        expires_ms: u64,
    },
    DeviceList(Vec<DeviceInfo>),
    DeviceRevoked,
    LegacyAccount {
        name: String,
        files: u64,
        bytes: u64,
    },
    LegacyFiles {
        files: Vec<LegacyFile>,
        more: bool,
    },
    LegacyData(Vec<u8>),
    Pruned {
        chunks: u64,
        bytes: u64,
        grace_s: u64,
    },
}

impl From<ErrorAnswer> for Answer {
    fn from(e: ErrorAnswer) -> Self {
        Answer::Error(e)
    }
}

/// A bounded reader over a body: every read checks what is left.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader { b, what }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Short { what: self.what });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    fn flag(&mut self) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.invalid("a flag is neither 0 nor 1")),
        }
    }
    fn str(&mut self, max: usize) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(self.invalid("a string is over its limit"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.invalid("a string is not UTF-8"))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn ids<const N: usize>(&mut self, count: usize) -> Result<Vec<[u8; N]>, WireError> {
        let bytes = count
            .checked_mul(N)
            .ok_or(WireError::Short { what: self.what })?;
        let b = self.take(bytes)?;
        Ok(b.chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                a
            })
            .collect())
    }
    fn invalid(&self, detail: &'static str) -> WireError {
        WireError::Invalid {
            what: self.what,
            detail,
        }
    }
    fn end(self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing {
                what: self.what,
                extra: self.b.len(),
            })
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Callers bound their strings; a longer one is cut at a character boundary.
    let mut s = s;
    if s.len() > u16::MAX as usize {
        let mut end = u16::MAX as usize;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s = &s[..end];
    }
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl SnapshotHeader {
    /// Appends the header's encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.time_ms.to_le_bytes());
        for v in [self.files, self.dirs, self.size, self.stored] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        put_str(out, &self.host);
        out.extend_from_slice(&(self.tags.len().min(u16::MAX as usize) as u16).to_le_bytes());
        for t in self.tags.iter().take(u16::MAX as usize) {
            put_str(out, t);
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<SnapshotHeader, WireError> {
        let id = r.array()?;
        let time_ms = r.i64()?;
        let files = r.u64()?;
        let dirs = r.u64()?;
        let size = r.u64()?;
        let stored = r.u64()?;
        let host = r.str(MAX_HOST_LEN)?;
        let n = r.u16()? as usize;
        if n > MAX_TAGS {
            return Err(r.invalid("more than 64 tags"));
        }
        let mut tags = Vec::with_capacity(n);
        for _ in 0..n {
            tags.push(r.str(MAX_TAG_LEN)?);
        }
        Ok(SnapshotHeader {
            id,
            time_ms,
            files,
            dirs,
            size,
            stored,
            host,
            tags,
        })
    }

    /// Checks the limits a server enforces (a header that decodes always passes).
    pub fn check(&self) -> Result<(), &'static str> {
        if self.host.len() > MAX_HOST_LEN {
            return Err("host name over 255 bytes");
        }
        if self.tags.len() > MAX_TAGS {
            return Err("more than 64 tags");
        }
        if self.tags.iter().any(|t| t.len() > MAX_TAG_LEN) {
            return Err("a tag over 128 bytes");
        }
        Ok(())
    }
}

impl SnapshotInfo {
    fn encode(&self, out: &mut Vec<u8>) {
        self.header.encode(out);
        out.extend_from_slice(&self.device.to_le_bytes());
        out.extend_from_slice(&self.committed_ms.to_le_bytes());
    }

    fn decode(r: &mut Reader<'_>) -> Result<SnapshotInfo, WireError> {
        let header = SnapshotHeader::decode(r)?;
        Ok(SnapshotInfo {
            header,
            device: r.u64()?,
            committed_ms: r.u64()?,
        })
    }
}

impl ServerHello {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + self.server.len());
        out.extend_from_slice(&self.window.to_le_bytes());
        out.extend_from_slice(&self.max_chunk.to_le_bytes());
        put_str(&mut out, &self.server);
        out
    }

    pub fn decode(b: &[u8]) -> Result<ServerHello, WireError> {
        let mut r = Reader::new(b, "ServerHello");
        let h = ServerHello {
            window: r.u32()?,
            max_chunk: r.u32()?,
            server: r.str(64)?,
        };
        r.end()?;
        Ok(h)
    }
}

impl Login {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.account.len() + self.device.len());
        out.push(self.mode as u8);
        put_str(&mut out, &self.account);
        put_str(&mut out, &self.device);
        if self.mode == LoginMode::Enrol {
            put_str(&mut out, &self.code);
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Login, WireError> {
        let mut r = Reader::new(b, "Login");
        let mode = match r.u8()? {
            1 => LoginMode::Device,
            2 => LoginMode::Create,
            3 => LoginMode::Enrol,
            _ => return Err(r.invalid("unknown login mode")),
        };
        let account = r.str(MAX_NAME_LEN)?;
        let device = r.str(MAX_NAME_LEN)?;
        let code = if mode == LoginMode::Enrol {
            r.str(MAX_CODE_LEN)?
        } else {
            String::new()
        };
        let l = Login {
            mode,
            account,
            device,
            code,
        };
        r.end()?;
        Ok(l)
    }
}

/// Checks an account or device name: 1 to 100 bytes of UTF-8 without control
/// characters (a device name may be empty).
pub fn check_name(name: &str, allow_empty: bool) -> Result<(), &'static str> {
    if name.is_empty() && !allow_empty {
        return Err("the name is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("the name is over 100 bytes");
    }
    if name.chars().any(char::is_control) {
        return Err("the name holds a control character");
    }
    Ok(())
}

impl Request {
    /// The request's frame kind.
    pub fn kind(&self) -> u16 {
        match self {
            Request::HasChunks(_) => kind::HAS_CHUNKS,
            Request::PutChunk { .. } => kind::PUT_CHUNK,
            Request::CommitSnapshot { .. } => kind::COMMIT_SNAPSHOT,
            Request::ListSnapshots => kind::LIST_SNAPSHOTS,
            Request::GetSnapshot(_) => kind::GET_SNAPSHOT,
            Request::GetChunk(_) => kind::GET_CHUNK,
            Request::ForgetSnapshot(_) => kind::FORGET_SNAPSHOT,
            Request::Usage => kind::USAGE,
            Request::PutKey(_) => kind::PUT_KEY,
            Request::GetKey => kind::GET_KEY,
            Request::DeviceAdd { .. } => kind::DEVICE_ADD,
            Request::ListDevices => kind::LIST_DEVICES,
            Request::RevokeDevice(_) => kind::REVOKE_DEVICE,
            Request::LegacyLogin { .. } => kind::LEGACY_LOGIN,
            Request::LegacyList { .. } => kind::LEGACY_LIST,
            Request::LegacyRead { .. } => kind::LEGACY_READ,
            Request::Prune => kind::PRUNE,
        }
    }

    /// The request's name in the spec.
    pub fn name(&self) -> &'static str {
        match self {
            Request::HasChunks(_) => "HAS_CHUNKS",
            Request::PutChunk { .. } => "PUT_CHUNK",
            Request::CommitSnapshot { .. } => "COMMIT_SNAPSHOT",
            Request::ListSnapshots => "LIST_SNAPSHOTS",
            Request::GetSnapshot(_) => "GET_SNAPSHOT",
            Request::GetChunk(_) => "GET_CHUNK",
            Request::ForgetSnapshot(_) => "FORGET_SNAPSHOT",
            Request::Usage => "USAGE",
            Request::PutKey(_) => "PUT_KEY",
            Request::GetKey => "GET_KEY",
            Request::DeviceAdd { .. } => "DEVICE_ADD",
            Request::ListDevices => "LIST_DEVICES",
            Request::RevokeDevice(_) => "REVOKE_DEVICE",
            Request::LegacyLogin { .. } => "LEGACY_LOGIN",
            Request::LegacyList { .. } => "LEGACY_LIST",
            Request::LegacyRead { .. } => "LEGACY_READ",
            Request::Prune => "PRUNE",
        }
    }

    /// Bytes of the body's encoding (without encoding it).
    pub fn body_len(&self) -> u64 {
        (match self {
            Request::HasChunks(ids) => 4 + 32 * ids.len(),
            Request::PutChunk { blob, .. } => 32 + blob.len(),
            Request::CommitSnapshot { header, refs, root } => {
                let tags: usize = header.tags.iter().map(|t| 2 + t.len()).sum();
                16 + 8 * 5 + 2 + header.host.len() + 2 + tags + 4 + 32 * refs.len() + root.len()
            }
            Request::ListSnapshots | Request::Usage | Request::GetKey => 0,
            Request::GetSnapshot(_) | Request::ForgetSnapshot(_) => 16,
            Request::GetChunk(_) => 32,
            Request::PutKey(k) => k.len(),
            Request::DeviceAdd { name, .. } => 4 + 2 + name.len() + 4,
            Request::ListDevices => 0,
            Request::RevokeDevice(_) => 8,
            Request::LegacyLogin { signature, .. } => 16 + signature.len(),
            Request::LegacyList { after } => 2 + after.len(),
            Request::LegacyRead { name, .. } => 2 + name.len() + 12,
            Request::Prune => 0,
        }) as u64
    }

    /// Appends the body's encoding.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Request::HasChunks(ids) => {
                out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
                for id in ids {
                    out.extend_from_slice(id);
                }
            }
            Request::PutChunk { id, blob } => {
                out.extend_from_slice(id);
                out.extend_from_slice(blob);
            }
            Request::CommitSnapshot { header, refs, root } => {
                header.encode(out);
                out.extend_from_slice(&(refs.len() as u32).to_le_bytes());
                for id in refs {
                    out.extend_from_slice(id);
                }
                out.extend_from_slice(root);
            }
            Request::ListSnapshots | Request::Usage | Request::GetKey => {}
            Request::GetSnapshot(id) | Request::ForgetSnapshot(id) => out.extend_from_slice(id),
            Request::GetChunk(id) => out.extend_from_slice(id),
            Request::PutKey(k) => out.extend_from_slice(k),
            Request::DeviceAdd {
                capabilities,
                name,
                ttl_s,
            } => {
                out.extend_from_slice(&capabilities.to_le_bytes());
                put_str(out, name);
                out.extend_from_slice(&ttl_s.to_le_bytes());
            }
            Request::ListDevices => {}
            Request::RevokeDevice(id) => out.extend_from_slice(&id.to_le_bytes()),
            Request::LegacyLogin {
                client_id,
                signature,
            } => {
                out.extend_from_slice(client_id);
                out.extend_from_slice(signature);
            }
            Request::LegacyList { after } => put_str(out, after),
            Request::LegacyRead { name, offset, max } => {
                put_str(out, name);
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&max.to_le_bytes());
            }
            Request::Prune => {}
        }
    }

    /// Decodes a request body of `kind` (whose length already passed
    /// [`max_request_len`]).
    pub fn decode(kind: u16, body: &[u8]) -> Result<Request, WireError> {
        let mut r = Reader::new(body, "request");
        let req = match kind {
            kind::HAS_CHUNKS => {
                r.what = "HAS_CHUNKS";
                let n = r.u32()?;
                if n > MAX_HAS_CHUNKS {
                    return Err(r.invalid("more than 16,384 ids"));
                }
                Request::HasChunks(r.ids(n as usize)?)
            }
            kind::PUT_CHUNK => {
                r.what = "PUT_CHUNK";
                let id = r.array()?;
                let blob = r.rest().to_vec();
                if blob.is_empty() {
                    return Err(r.invalid("empty chunk blob"));
                }
                Request::PutChunk { id, blob }
            }
            kind::COMMIT_SNAPSHOT => {
                r.what = "COMMIT_SNAPSHOT";
                let header = SnapshotHeader::decode(&mut r)?;
                let n = r.u32()? as u64;
                if n * 32 > MAX_REFS_BYTES {
                    return Err(r.invalid("more refs than the limit"));
                }
                let refs = r.ids(n as usize)?;
                let root = r.rest().to_vec();
                if root.len() as u64 > MAX_ROOT_LEN {
                    return Err(r.invalid("snapshot root over 1 MiB"));
                }
                Request::CommitSnapshot { header, refs, root }
            }
            kind::LIST_SNAPSHOTS => Request::ListSnapshots,
            kind::USAGE => Request::Usage,
            kind::GET_KEY => Request::GetKey,
            kind::GET_SNAPSHOT => {
                r.what = "GET_SNAPSHOT";
                Request::GetSnapshot(r.array()?)
            }
            kind::FORGET_SNAPSHOT => {
                r.what = "FORGET_SNAPSHOT";
                Request::ForgetSnapshot(r.array()?)
            }
            kind::GET_CHUNK => {
                r.what = "GET_CHUNK";
                Request::GetChunk(r.array()?)
            }
            kind::PUT_KEY => {
                r.what = "PUT_KEY";
                let k = r.rest().to_vec();
                if k.is_empty() || k.len() as u64 > MAX_KEY_LEN {
                    return Err(r.invalid("wrapped key empty or over 4 KiB"));
                }
                Request::PutKey(k)
            }
            kind::DEVICE_ADD => {
                r.what = "DEVICE_ADD";
                let capabilities = r.u32()?;
                let name = r.str(MAX_NAME_LEN)?;
                let ttl_s = r.u32()?;
                if !(60..=604_800).contains(&ttl_s) {
                    return Err(r.invalid("a code's lifetime is 60 s to 7 days"));
                }
                Request::DeviceAdd {
                    capabilities,
                    name,
                    ttl_s,
                }
            }
            kind::LIST_DEVICES => Request::ListDevices,
            kind::REVOKE_DEVICE => {
                r.what = "REVOKE_DEVICE";
                Request::RevokeDevice(r.u64()?)
            }
            kind::LEGACY_LOGIN => {
                r.what = "LEGACY_LOGIN";
                let client_id = r.array()?;
                let signature = r.rest().to_vec();
                if signature.is_empty() || signature.len() > MAX_LEGACY_SIGNATURE {
                    return Err(r.invalid("a signature is 1 to 512 bytes"));
                }
                Request::LegacyLogin {
                    client_id,
                    signature,
                }
            }
            kind::LEGACY_LIST => {
                r.what = "LEGACY_LIST";
                Request::LegacyList {
                    after: r.str(MAX_LEGACY_NAME)?,
                }
            }
            kind::LEGACY_READ => {
                r.what = "LEGACY_READ";
                let name = r.str(MAX_LEGACY_NAME)?;
                let offset = r.u64()?;
                let max = r.u32()?;
                if max == 0 || max > MAX_LEGACY_READ {
                    return Err(r.invalid("a read is 1 byte to 4 MiB"));
                }
                Request::LegacyRead { name, offset, max }
            }
            kind::PRUNE => Request::Prune,
            other => return Err(WireError::UnknownKind(other)),
        };
        r.end()?;
        Ok(req)
    }
}

impl Answer {
    /// The answer's frame kind.
    pub fn kind(&self) -> u16 {
        match self {
            Answer::Error(_) => kind::ERROR,
            Answer::ChunksHeld(_) => kind::CHUNKS_HELD,
            Answer::ChunkStored { .. } => kind::CHUNK_STORED,
            Answer::SnapshotCommitted { .. } => kind::SNAPSHOT_COMMITTED,
            Answer::SnapshotList(_) => kind::SNAPSHOT_LIST,
            Answer::Snapshot { .. } => kind::SNAPSHOT,
            Answer::Chunk(_) => kind::CHUNK,
            Answer::Forgotten => kind::FORGOTTEN,
            Answer::UsageInfo(_) => kind::USAGE_INFO,
            Answer::KeyStored => kind::KEY_STORED,
            Answer::Key(_) => kind::KEY,
            Answer::Welcome(_) => kind::WELCOME,
            Answer::Enrolment { .. } => kind::ENROLMENT,
            Answer::DeviceList(_) => kind::DEVICE_LIST,
            Answer::DeviceRevoked => kind::DEVICE_REVOKED,
            Answer::LegacyAccount { .. } => kind::LEGACY_ACCOUNT,
            Answer::LegacyFiles { .. } => kind::LEGACY_FILES,
            Answer::LegacyData(_) => kind::LEGACY_DATA,
            Answer::Pruned { .. } => kind::PRUNED,
        }
    }

    /// Appends the body's encoding.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Answer::Error(e) => {
                out.extend_from_slice(&e.code.0.to_le_bytes());
                let mut m = e.message.clone();
                truncate_utf8(&mut m, MAX_ERROR_MESSAGE);
                put_str(out, &m);
                out.extend_from_slice(&e.detail[..e.detail.len().min(MAX_ERROR_DETAIL)]);
            }
            Answer::ChunksHeld(held) => {
                out.extend_from_slice(&(held.len() as u32).to_le_bytes());
                let start = out.len();
                out.resize(start + held.len().div_ceil(8), 0);
                for (i, h) in held.iter().enumerate() {
                    if *h {
                        out[start + i / 8] |= 1 << (i % 8);
                    }
                }
            }
            Answer::ChunkStored { already } | Answer::SnapshotCommitted { already } => {
                out.push(*already as u8)
            }
            Answer::SnapshotList(list) => {
                out.extend_from_slice(&(list.len() as u32).to_le_bytes());
                for s in list {
                    s.encode(out);
                }
            }
            Answer::Snapshot { info, root } => {
                info.encode(out);
                out.extend_from_slice(root);
            }
            Answer::Chunk(b) | Answer::Key(b) | Answer::LegacyData(b) => out.extend_from_slice(b),
            Answer::LegacyAccount { name, files, bytes } => {
                put_str(out, name);
                out.extend_from_slice(&files.to_le_bytes());
                out.extend_from_slice(&bytes.to_le_bytes());
            }
            Answer::LegacyFiles { files, more } => {
                out.extend_from_slice(&(files.len() as u32).to_le_bytes());
                for f in files {
                    put_str(out, &f.name);
                    out.extend_from_slice(&f.size.to_le_bytes());
                    out.extend_from_slice(&f.cksum.to_le_bytes());
                    out.extend_from_slice(&f.stored_ms.to_le_bytes());
                }
                out.push(*more as u8);
            }
            Answer::Pruned {
                chunks,
                bytes,
                grace_s,
            } => {
                for v in [chunks, bytes, grace_s] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Answer::Forgotten | Answer::KeyStored | Answer::DeviceRevoked => {}
            Answer::Enrolment { code, expires_ms } => {
                put_str(out, code);
                out.extend_from_slice(&expires_ms.to_le_bytes());
            }
            Answer::DeviceList(list) => {
                out.extend_from_slice(&(list.len() as u32).to_le_bytes());
                for d in list {
                    out.extend_from_slice(&d.id.to_le_bytes());
                    out.extend_from_slice(&d.capabilities.to_le_bytes());
                    out.extend_from_slice(&d.created_ms.to_le_bytes());
                    out.extend_from_slice(&d.revoked_ms.to_le_bytes());
                    out.push(d.this as u8);
                    put_str(out, &d.name);
                }
            }
            Answer::UsageInfo(u) => {
                for v in [u.chunks, u.stored_bytes, u.snapshots, u.quota] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Answer::Welcome(w) => {
                out.extend_from_slice(&w.account_id.to_le_bytes());
                out.extend_from_slice(&w.device_id.to_le_bytes());
                out.extend_from_slice(&w.capabilities.to_le_bytes());
                put_str(out, &w.account);
            }
        }
    }

    /// Decodes an answer body of `kind` (whose length already passed
    /// [`max_answer_len`]).
    pub fn decode(kind: u16, body: &[u8]) -> Result<Answer, WireError> {
        let mut r = Reader::new(body, "answer");
        let a = match kind {
            kind::ERROR => {
                r.what = "ERROR";
                let code = ErrorCode(r.u16()?);
                let message = r.str(MAX_ERROR_MESSAGE)?;
                let detail = r.rest().to_vec();
                if detail.len() > MAX_ERROR_DETAIL {
                    return Err(r.invalid("error detail over 32 KiB"));
                }
                Answer::Error(ErrorAnswer {
                    code,
                    message,
                    detail,
                })
            }
            kind::CHUNKS_HELD => {
                r.what = "CHUNKS_HELD";
                let n = r.u32()?;
                if n > MAX_HAS_CHUNKS {
                    return Err(r.invalid("more than 16,384 ids"));
                }
                let bits = r.take((n as usize).div_ceil(8))?;
                Answer::ChunksHeld(
                    (0..n as usize)
                        .map(|i| bits[i / 8] & (1 << (i % 8)) != 0)
                        .collect(),
                )
            }
            kind::CHUNK_STORED => {
                r.what = "CHUNK_STORED";
                Answer::ChunkStored { already: r.flag()? }
            }
            kind::SNAPSHOT_COMMITTED => {
                r.what = "SNAPSHOT_COMMITTED";
                Answer::SnapshotCommitted { already: r.flag()? }
            }
            kind::SNAPSHOT_LIST => {
                r.what = "SNAPSHOT_LIST";
                let n = r.u32()?;
                if n > MAX_LIST {
                    return Err(r.invalid("too many snapshots"));
                }
                // Each entry is at least 76 bytes: bound the allocation by the body.
                let mut list = Vec::with_capacity((n as usize).min(body.len() / 76));
                for _ in 0..n {
                    list.push(SnapshotInfo::decode(&mut r)?);
                }
                Answer::SnapshotList(list)
            }
            kind::SNAPSHOT => {
                r.what = "SNAPSHOT";
                let info = SnapshotInfo::decode(&mut r)?;
                Answer::Snapshot {
                    info,
                    root: r.rest().to_vec(),
                }
            }
            kind::CHUNK => Answer::Chunk(r.rest().to_vec()),
            kind::KEY => Answer::Key(r.rest().to_vec()),
            kind::LEGACY_DATA => Answer::LegacyData(r.rest().to_vec()),
            kind::LEGACY_ACCOUNT => {
                r.what = "LEGACY_ACCOUNT";
                Answer::LegacyAccount {
                    name: r.str(MAX_LEGACY_NAME)?,
                    files: r.u64()?,
                    bytes: r.u64()?,
                }
            }
            kind::LEGACY_FILES => {
                r.what = "LEGACY_FILES";
                let n = r.u32()?;
                if n > MAX_LEGACY_PAGE {
                    return Err(r.invalid("more than 1,000 files"));
                }
                let mut files = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    files.push(LegacyFile {
                        name: r.str(MAX_LEGACY_NAME)?,
                        size: r.u64()?,
                        cksum: r.u32()?,
                        stored_ms: r.u64()?,
                    });
                }
                Answer::LegacyFiles {
                    files,
                    more: r.flag()?,
                }
            }
            kind::PRUNED => {
                r.what = "PRUNED";
                Answer::Pruned {
                    chunks: r.u64()?,
                    bytes: r.u64()?,
                    grace_s: r.u64()?,
                }
            }
            kind::FORGOTTEN => Answer::Forgotten,
            kind::KEY_STORED => Answer::KeyStored,
            kind::DEVICE_REVOKED => Answer::DeviceRevoked,
            kind::ENROLMENT => {
                r.what = "ENROLMENT";
                Answer::Enrolment {
                    code: r.str(MAX_CODE_LEN)?,
                    expires_ms: r.u64()?,
                }
            }
            kind::DEVICE_LIST => {
                r.what = "DEVICE_LIST";
                let n = r.u32()?;
                if n > MAX_DEVICES {
                    return Err(r.invalid("too many devices"));
                }
                let mut list = Vec::with_capacity((n as usize).min(body.len() / 31));
                for _ in 0..n {
                    list.push(DeviceInfo {
                        id: r.u64()?,
                        capabilities: r.u32()?,
                        created_ms: r.u64()?,
                        revoked_ms: r.u64()?,
                        this: r.flag()?,
                        name: r.str(MAX_NAME_LEN)?,
                    });
                }
                Answer::DeviceList(list)
            }
            kind::USAGE_INFO => {
                r.what = "USAGE_INFO";
                Answer::UsageInfo(Usage {
                    chunks: r.u64()?,
                    stored_bytes: r.u64()?,
                    snapshots: r.u64()?,
                    quota: r.u64()?,
                })
            }
            kind::WELCOME => {
                r.what = "WELCOME";
                Answer::Welcome(Welcome {
                    account_id: r.u64()?,
                    device_id: r.u64()?,
                    capabilities: r.u32()?,
                    account: r.str(MAX_NAME_LEN)?,
                })
            }
            other => return Err(WireError::UnknownKind(other)),
        };
        r.end()?;
        Ok(a)
    }
}

/// Appends a whole frame (header and body) for a request.
pub fn encode_request(request_id: u32, req: &Request, out: &mut Vec<u8>) {
    encode_frame(req.kind(), request_id, out, |o| req.encode_body(o));
}

/// Appends a whole frame (header and body) for an answer.
pub fn encode_answer(request_id: u32, a: &Answer, out: &mut Vec<u8>) {
    encode_frame(a.kind(), request_id, out, |o| a.encode_body(o));
}

/// Encodes an answer as [`encode_answer`] does, except that an answer whose body is
/// one byte string (a chunk, a key, v3 data) gets only its header in `out`, and its
/// body is returned to be sent after it without a copy; any other answer is encoded
/// whole and the returned body is empty.
pub fn encode_answer_split<'a>(request_id: u32, a: &'a Answer, out: &mut Vec<u8>) -> &'a [u8] {
    match a {
        Answer::Chunk(b) | Answer::Key(b) | Answer::LegacyData(b) => {
            let h = FrameHeader {
                kind: a.kind(),
                flags: 0,
                request_id,
                len: b.len() as u64,
            };
            out.extend_from_slice(&h.encode());
            b
        }
        _ => {
            encode_answer(request_id, a, out);
            &[]
        }
    }
}

fn encode_frame(kind: u16, request_id: u32, out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    body(out);
    let len = (out.len() - start - FRAME_HEADER_LEN) as u64;
    let h = FrameHeader {
        kind,
        flags: 0,
        request_id,
        len,
    };
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&h.encode());
}

/// Splits a plaintext stream into frames: feed bytes, take whole frames out. Bounds
/// each frame's body by a limit function before buffering it.
#[derive(Debug)]
pub struct FrameReader {
    /// `buf[head..end]` is what was pushed and not taken. Past `end` the buffer keeps
    /// old bytes, so that a record decrypted into it does not zero memory first.
    buf: Vec<u8>,
    head: usize,
    end: usize,
}

impl Default for FrameReader {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameReader {
    pub fn new() -> Self {
        FrameReader {
            buf: Vec::new(),
            head: 0,
            end: 0,
        }
    }

    /// Appends decrypted bytes.
    pub fn push(&mut self, b: &[u8]) {
        self.push_with(b.len(), |out| {
            out.copy_from_slice(b);
            Ok::<_, std::convert::Infallible>(b.len())
        })
        .unwrap_or_else(|never| match never {});
    }

    /// Appends at most `max` bytes that `fill` writes into the buffer itself (and
    /// says how many it wrote): a record is decrypted straight into the frame
    /// buffer, with no copy between. On an error nothing is appended.
    pub fn push_with<E>(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize, E>,
    ) -> Result<(), E> {
        self.compact();
        if self.buf.len() < self.end + max {
            self.buf.resize(self.end + max, 0);
        }
        let n = fill(&mut self.buf[self.end..self.end + max])?;
        self.end += n.min(max);
        Ok(())
    }

    /// Drops what was taken: all of it when nothing is left, or the front once it
    /// is over 1 MiB and more than half of what is held.
    fn compact(&mut self) {
        if self.head == self.end {
            self.head = 0;
            self.end = 0;
        } else if self.head > 1 << 20 && self.head * 2 > self.end {
            self.buf.copy_within(self.head..self.end, 0);
            self.end -= self.head;
            self.head = 0;
        }
    }

    /// Bytes buffered and not yet taken.
    pub fn buffered(&self) -> usize {
        self.end - self.head
    }

    /// The next frame's header, if all 16 bytes are here (without taking it).
    pub fn peek_header(&self) -> Option<FrameHeader> {
        let b = self.buf[self.head..self.end].get(..FRAME_HEADER_LEN)?;
        Some(FrameHeader::parse(b.try_into().ok()?))
    }

    /// Takes the next whole frame. `limit` gives the largest body allowed for a kind
    /// (`None`: unknown kind, which is still framed, up to `unknown_max` bytes).
    pub fn next_frame(
        &mut self,
        limit: impl Fn(u16) -> Option<u64>,
        unknown_max: u64,
    ) -> Result<Option<(FrameHeader, &[u8])>, WireError> {
        let Some(h) = self.peek_header() else {
            return Ok(None);
        };
        if h.flags != 0 {
            return Err(WireError::Invalid {
                what: "frame header",
                detail: "reserved flags are set",
            });
        }
        let max = limit(h.kind).unwrap_or(unknown_max);
        if h.len > max {
            return Err(WireError::TooLarge(h.kind, h.len));
        }
        let len = h.len as usize;
        let start = self.head + FRAME_HEADER_LEN;
        if self.end - start < len {
            return Ok(None);
        }
        self.head = start + len;
        Ok(Some((h, &self.buf[start..start + len])))
    }
}

#[cfg(test)]
mod tests;
