//! The repository format the server never reads (`docs/PROTOCOL-V4.md` §7): the
//! repository key and the keys derived from it, the passphrase-wrapped key, chunk
//! blobs, the manifest of a snapshot's tree and the snapshot root.
//!
//! Everything is pure: randomness comes in as an argument, nothing touches a file.
//! The primitives are crates' (BLAKE3 for ids and key derivation, AES-256-GCM from
//! `ring` through [`super::aead`], Argon2id from `argon2`, zstd); this module only
//! fixes the byte layouts.

use super::aead::Gcm;
use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use super::wire::{ChunkId, SnapshotId};
use super::MAX_CHUNK;

/// The blob format version.
pub const FORMAT: u8 = 1;
/// Bytes before a blob's ciphertext: format, compression, nonce.
pub const BLOB_HEADER: usize = 14;
/// Bytes of a wrapped key.
pub const WRAPPED_KEY_LEN: usize = 89;
/// zstd level for chunks.
pub const ZSTD_LEVEL: i32 = 3;

/// Format errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{0} is malformed")]
    Malformed(&'static str),
    #[error("{0} failed authentication (wrong key, or altered)")]
    Auth(&'static str),
    #[error("the passphrase does not open the repository key")]
    Passphrase,
    #[error("the chunk's content does not match its id")]
    IdMismatch,
    #[error("{0} uses an unknown format version {1}")]
    Version(&'static str, u8),
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

const CTX_ID: &str = "CyberBackup v4 2026-12-04 chunk id";
const CTX_DATA: &str = "CyberBackup v4 2026-12-04 chunk data";
const CTX_SNAPSHOT: &str = "CyberBackup v4 2026-12-04 snapshot root";

/// The repository key and the keys derived from it.
pub struct RepoKey {
    master: Zeroizing<[u8; 32]>,
    id_key: Zeroizing<[u8; 32]>,
    data: Gcm,
    snapshot: Gcm,
}

impl std::fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoKey").finish_non_exhaustive()
    }
}

impl Clone for RepoKey {
    fn clone(&self) -> Self {
        RepoKey::from_master(*self.master)
    }
}

impl RepoKey {
    /// A new random repository key.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> RepoKey {
        let mut m = [0u8; 32];
        rng.fill_bytes(&mut m);
        let k = RepoKey::from_master(m);
        zeroize::Zeroize::zeroize(&mut m);
        k
    }

    /// The keys of a master key.
    pub fn from_master(master: [u8; 32]) -> RepoKey {
        let id_key = Zeroizing::new(blake3::derive_key(CTX_ID, &master));
        let data = Zeroizing::new(blake3::derive_key(CTX_DATA, &master));
        let snap = Zeroizing::new(blake3::derive_key(CTX_SNAPSHOT, &master));
        RepoKey {
            master: Zeroizing::new(master),
            id_key,
            data: Gcm::new(&data),
            snapshot: Gcm::new(&snap),
        }
    }

    /// A chunk's id: the keyed BLAKE3 hash of its plaintext.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        *blake3::keyed_hash(&self.id_key, plaintext).as_bytes()
    }

    /// Seals a chunk into its blob (compressing it with zstd when that saves at
    /// least 1/16). Returns the id and the blob.
    pub fn seal_chunk(
        &self,
        plaintext: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> (ChunkId, Vec<u8>) {
        let id = self.chunk_id(plaintext);
        (id, self.seal_chunk_with_id(&id, plaintext, true, rng))
    }

    /// Seals a chunk whose id is known; `compress` false skips the zstd attempt.
    pub fn seal_chunk_with_id(
        &self,
        id: &ChunkId,
        plaintext: &[u8],
        compress: bool,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Vec<u8> {
        let compressed = if compress && plaintext.len() >= 64 && looks_compressible(plaintext) {
            zstd_compress(plaintext, ZSTD_LEVEL)
                .ok()
                .filter(|c| c.len() + plaintext.len() / 16 <= plaintext.len())
        } else {
            None
        };
        let (method, body) = match &compressed {
            Some(c) => (1u8, c.as_slice()),
            None => (0u8, plaintext),
        };
        let mut blob = Vec::with_capacity(BLOB_HEADER + body.len() + 16);
        blob.push(FORMAT);
        blob.push(method);
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(body);
        let mut ad = [0u8; 34];
        ad[..32].copy_from_slice(id);
        ad[32] = FORMAT;
        ad[33] = method;
        let tag = self.data.seal(nonce, &ad, &mut blob[BLOB_HEADER..]);
        blob.extend_from_slice(&tag);
        blob
    }

    /// Opens a chunk blob fetched for `id`: authenticates, decompresses (at most
    /// [`MAX_CHUNK`] bytes) and checks the keyed hash against the id. The blob is
    /// decrypted where it lies: an uncompressed chunk's plaintext is returned in the
    /// blob's own buffer.
    pub fn open_chunk(&self, id: &ChunkId, mut blob: Vec<u8>) -> Result<Vec<u8>, FormatError> {
        if blob.len() < BLOB_HEADER + 16 {
            return Err(FormatError::Malformed("a chunk blob"));
        }
        if blob[0] != FORMAT {
            return Err(FormatError::Version("a chunk blob", blob[0]));
        }
        let method = blob[1];
        if method > 1 {
            return Err(FormatError::Malformed("a chunk blob's compression"));
        }
        let nonce: [u8; 12] = blob[2..14].try_into().unwrap_or_default();
        let mut tag = [0u8; 16];
        let end = blob.len() - 16;
        tag.copy_from_slice(&blob[end..]);
        blob.truncate(end);
        let mut ad = [0u8; 34];
        ad[..32].copy_from_slice(id);
        ad[32] = FORMAT;
        ad[33] = method;
        self.data
            .open_shifted(nonce, &ad, &mut blob, BLOB_HEADER, &tag)
            .map_err(|_| FormatError::Auth("a chunk"))?;
        blob.truncate(end - BLOB_HEADER);
        let plain = if method == 1 {
            // The frame says its size (the sealing side writes it): the output is
            // allocated at that size, not at the largest a chunk may be.
            let cap = match zstd::zstd_safe::get_frame_content_size(&blob) {
                Ok(Some(n)) if n <= MAX_CHUNK as u64 => n as usize,
                Ok(Some(_)) => {
                    return Err(FormatError::Malformed("a chunk's compressed data"));
                }
                _ => MAX_CHUNK as usize,
            };
            DCTX.with(|d| match d.borrow_mut().as_mut() {
                Some(d) => d.decompress(&blob, cap),
                None => zstd::bulk::decompress(&blob, cap),
            })
            .map_err(|_| FormatError::Malformed("a chunk's compressed data"))?
        } else {
            blob
        };
        if self.chunk_id(&plain) != *id {
            return Err(FormatError::IdMismatch);
        }
        Ok(plain)
    }

    /// Seals a snapshot root under the snapshot key, bound to the snapshot id.
    pub fn seal_root(
        &self,
        id: &SnapshotId,
        root: &Root,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Vec<u8> {
        let mut out = vec![FORMAT];
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        out.extend_from_slice(&nonce);
        let start = out.len();
        root.encode(&mut out);
        let tag = self.snapshot.seal(nonce, id, &mut out[start..]);
        out.extend_from_slice(&tag);
        out
    }

    /// Opens a snapshot root.
    pub fn open_root(&self, id: &SnapshotId, sealed: &[u8]) -> Result<Root, FormatError> {
        if sealed.len() < 13 + 16 {
            return Err(FormatError::Malformed("a snapshot root"));
        }
        if sealed[0] != FORMAT {
            return Err(FormatError::Version("a snapshot root", sealed[0]));
        }
        let nonce: [u8; 12] = sealed[1..13].try_into().unwrap_or_default();
        let (ct, tag) = sealed[13..].split_at(sealed.len() - 13 - 16);
        let mut body = ct.to_vec();
        self.snapshot
            .open(nonce, id, &mut body, tag)
            .map_err(|_| FormatError::Auth("a snapshot root"))?;
        Root::decode(&body)
    }

    /// Wraps the key under a passphrase (Argon2id with the given cost).
    pub fn wrap(
        &self,
        passphrase: &[u8],
        cost: KdfCost,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::with_capacity(WRAPPED_KEY_LEN);
        out.push(FORMAT);
        out.extend_from_slice(&cost.m_kib.to_le_bytes());
        out.extend_from_slice(&cost.t.to_le_bytes());
        out.extend_from_slice(&cost.p.to_le_bytes());
        let mut salt = [0u8; 16];
        rng.fill_bytes(&mut salt);
        out.extend_from_slice(&salt);
        let mut nonce = [0u8; 12];
        rng.fill_bytes(&mut nonce);
        out.extend_from_slice(&nonce);
        let kek = kdf(passphrase, &salt, cost)?;
        let cipher = Gcm::new(&kek);
        let mut body = self.master.to_vec();
        let tag = cipher.seal(nonce, &out[..41], &mut body);
        out.extend_from_slice(&body);
        out.extend_from_slice(&tag);
        zeroize::Zeroize::zeroize(&mut body);
        Ok(out)
    }

    /// Unwraps a key with its passphrase.
    /// The Argon2id cost a wrapped key was made with (checked against the bounds a
    /// client accepts), without the passphrase.
    pub fn wrapped_cost(wrapped: &[u8]) -> Result<KdfCost, FormatError> {
        if wrapped.len() != WRAPPED_KEY_LEN {
            return Err(FormatError::Malformed("the wrapped key"));
        }
        if wrapped[0] != FORMAT {
            return Err(FormatError::Version("the wrapped key", wrapped[0]));
        }
        let u = |i: usize| u32::from_le_bytes(wrapped[i..i + 4].try_into().unwrap_or_default());
        let cost = KdfCost {
            m_kib: u(1),
            t: u(5),
            p: u(9),
        };
        // A server could send costs that exhaust the client: bound them.
        if cost.m_kib > 4 << 20 || cost.t > 64 || cost.p > 64 || cost.t == 0 || cost.p == 0 {
            return Err(FormatError::Malformed("the wrapped key's cost"));
        }
        Ok(cost)
    }

    pub fn unwrap(wrapped: &[u8], passphrase: &[u8]) -> Result<RepoKey, FormatError> {
        let cost = Self::wrapped_cost(wrapped)?;
        let salt: [u8; 16] = wrapped[13..29].try_into().unwrap_or_default();
        let nonce: [u8; 12] = wrapped[29..41].try_into().unwrap_or_default();
        let kek = kdf(passphrase, &salt, cost)?;
        let cipher = Gcm::new(&kek);
        let mut body = Zeroizing::new(wrapped[41..73].to_vec());
        cipher
            .open(nonce, &wrapped[..41], &mut body, &wrapped[73..])
            .map_err(|_| FormatError::Passphrase)?;
        let mut m = [0u8; 32];
        m.copy_from_slice(&body);
        let k = RepoKey::from_master(m);
        zeroize::Zeroize::zeroize(&mut m);
        Ok(k)
    }
}

/// Bytes of a chunk's sample tried before the whole chunk is compressed.
const SAMPLE: usize = 32 * 1024;

/// Whether compressing a chunk may pay: chunks over twice the sample size are tried
/// on their first [`SAMPLE`] bytes at zstd's fastest level first (the way borg's
/// "auto" mode tries lz4), so random data (media, archives, encrypted files) costs a
/// sample, not a whole compression.
fn looks_compressible(plaintext: &[u8]) -> bool {
    if plaintext.len() <= 2 * SAMPLE {
        return true;
    }
    let sample = &plaintext[..SAMPLE];
    zstd_compress(sample, 1).is_ok_and(|c| c.len() + SAMPLE / 16 <= SAMPLE)
}

thread_local! {
    /// zstd contexts kept per thread (level 1 for samples, [`ZSTD_LEVEL`] for chunks):
    /// a context made per call cost about a tenth of a backup's CPU on small files.
    static CCTX: std::cell::RefCell<[Option<zstd::bulk::Compressor<'static>>; 2]> =
        std::cell::RefCell::new([
            zstd::bulk::Compressor::new(1).ok(),
            zstd::bulk::Compressor::new(ZSTD_LEVEL).ok(),
        ]);
    static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

/// zstd at `level` (1 or [`ZSTD_LEVEL`]) with this thread's context.
fn zstd_compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    let i = usize::from(level != 1);
    CCTX.with(|c| match c.borrow_mut()[i].as_mut() {
        Some(c) => c.compress(data),
        None => zstd::bulk::compress(data, level),
    })
}

/// Argon2id cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfCost {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Passes.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfCost {
    /// The default: 64 MiB, 3 passes, 1 lane.
    pub const DEFAULT: KdfCost = KdfCost {
        m_kib: 64 * 1024,
        t: 3,
        p: 1,
    };
    /// Cheap, for tests only.
    pub const TEST: KdfCost = KdfCost {
        m_kib: 64,
        t: 1,
        p: 1,
    };
}

fn kdf(
    passphrase: &[u8],
    salt: &[u8; 16],
    cost: KdfCost,
) -> Result<Zeroizing<[u8; 32]>, FormatError> {
    let params = argon2::Params::new(cost.m_kib, cost.t, cost.p, Some(32))
        .map_err(|e| FormatError::Kdf(e.to_string()))?;
    let a = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params.clone(),
    );
    let mut out = Zeroizing::new([0u8; 32]);
    let mut blocks = vec![argon2::Block::default(); params.block_count()];
    a.hash_password_into_with_memory(passphrase, salt, &mut *out, &mut blocks)
        .map_err(|e| FormatError::Kdf(e.to_string()))?;
    Ok(out)
}

/// The decrypted snapshot root: where the manifest is, and what the user named.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Root {
    /// Bytes of the manifest.
    pub manifest_len: u64,
    /// The manifest's chunks, in order.
    pub manifest_chunks: Vec<ChunkId>,
    /// The paths given to the backup (raw bytes).
    pub paths: Vec<Vec<u8>>,
    /// Paths the backup could not read (the snapshot is partial), and why.
    pub skipped: Vec<(Vec<u8>, String)>,
}

impl Root {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.manifest_len.to_le_bytes());
        out.extend_from_slice(&(self.manifest_chunks.len() as u32).to_le_bytes());
        for c in &self.manifest_chunks {
            out.extend_from_slice(c);
        }
        out.extend_from_slice(&(self.paths.len() as u32).to_le_bytes());
        for p in &self.paths {
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(p);
        }
        if !self.skipped.is_empty() {
            out.extend_from_slice(&(self.skipped.len() as u32).to_le_bytes());
            for (p, why) in &self.skipped {
                out.extend_from_slice(&(p.len() as u32).to_le_bytes());
                out.extend_from_slice(p);
                out.extend_from_slice(&(why.len() as u32).to_le_bytes());
                out.extend_from_slice(why.as_bytes());
            }
        }
    }

    fn decode(b: &[u8]) -> Result<Root, FormatError> {
        let mut r = Cursor {
            b,
            what: "a snapshot root",
        };
        let manifest_len = r.u64()?;
        let n = r.u32()? as usize;
        let mut manifest_chunks = Vec::with_capacity(n.min(b.len() / 32));
        for _ in 0..n {
            manifest_chunks.push(r.array()?);
        }
        let n = r.u32()? as usize;
        let mut paths = Vec::with_capacity(n.min(b.len() / 4));
        for _ in 0..n {
            paths.push(r.bytes(MAX_PATH)?.to_vec());
        }
        let mut skipped = Vec::new();
        if !r.b.is_empty() {
            let n = r.u32()? as usize;
            skipped.reserve(n.min(b.len() / 8));
            for _ in 0..n {
                let p = r.bytes(MAX_PATH)?.to_vec();
                let why = String::from_utf8_lossy(r.bytes(4096)?).into_owned();
                skipped.push((p, why));
            }
        }
        r.end()?;
        Ok(Root {
            manifest_len,
            manifest_chunks,
            paths,
            skipped,
        })
    }
}

/// Longest path or symlink target in a manifest.
pub const MAX_PATH: usize = 64 * 1024;

/// What a manifest entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file and its chunks, in order.
    File {
        chunks: Vec<ChunkId>,
    },
    Dir,
    /// A symbolic link and its target (raw bytes).
    Symlink {
        target: Vec<u8>,
    },
}

/// One entry of a snapshot's tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Relative, `/`-separated, raw bytes.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Files: plaintext bytes; else 0.
    pub size: u64,
}

impl Entry {
    /// Appends the entry's encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(match self.kind {
            EntryKind::File { .. } => 1,
            EntryKind::Dir => 2,
            EntryKind::Symlink { .. } => 3,
        });
        out.extend_from_slice(&(self.path.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.path);
        out.extend_from_slice(&self.mode.to_le_bytes());
        out.extend_from_slice(&self.mtime_ns.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        match &self.kind {
            EntryKind::File { chunks } => {
                out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
                for c in chunks {
                    out.extend_from_slice(c);
                }
            }
            EntryKind::Dir => {}
            EntryKind::Symlink { target } => {
                out.extend_from_slice(&(target.len() as u32).to_le_bytes());
                out.extend_from_slice(target);
            }
        }
    }

    /// Decodes every entry of a manifest, checking each path is safe to join to a
    /// restore target.
    pub fn decode_all(b: &[u8]) -> Result<Vec<Entry>, FormatError> {
        let mut r = Cursor {
            b,
            what: "the manifest",
        };
        let mut out = Vec::new();
        while !r.b.is_empty() {
            let kind = r.u8()?;
            let path = r.bytes(MAX_PATH)?.to_vec();
            if !safe_path(&path) {
                return Err(FormatError::Malformed("a manifest path"));
            }
            let mode = r.u32()?;
            let mtime_ns = r.u64()? as i64;
            let size = r.u64()?;
            let kind = match kind {
                1 => {
                    let n = r.u32()? as usize;
                    if n > r.b.len() / 32 {
                        return Err(FormatError::Malformed("the manifest"));
                    }
                    let mut chunks = Vec::with_capacity(n);
                    for _ in 0..n {
                        chunks.push(r.array()?);
                    }
                    EntryKind::File { chunks }
                }
                2 => EntryKind::Dir,
                3 => EntryKind::Symlink {
                    target: r.bytes(MAX_PATH)?.to_vec(),
                },
                _ => return Err(FormatError::Malformed("a manifest entry's kind")),
            };
            out.push(Entry {
                path,
                kind,
                mode,
                mtime_ns,
                size,
            });
        }
        Ok(out)
    }
}

/// A manifest path is relative, `/`-separated, without empty, `.` or `..` parts and
/// without NUL: joined to a target directory it stays inside it.
pub fn safe_path(p: &[u8]) -> bool {
    !p.is_empty()
        && !p.contains(&0)
        && p.split(|b| *b == b'/')
            .all(|part| !part.is_empty() && part != b"." && part != b"..")
}

struct Cursor<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        if self.b.len() < n {
            return Err(FormatError::Malformed(self.what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn bytes(&mut self, max: usize) -> Result<&'a [u8], FormatError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(FormatError::Malformed(self.what));
        }
        self.take(n)
    }
    fn end(self) -> Result<(), FormatError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(FormatError::Malformed(self.what))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    #[test]
    fn chunk_round_trip_compressed_and_not() {
        let k = RepoKey::generate(&mut rng());
        let text = b"abcdefgh".repeat(1000);
        let (id, blob) = k.seal_chunk(&text, &mut rng());
        assert_eq!(blob[1], 1, "repetitive text is compressed");
        assert!(blob.len() < text.len());
        assert_eq!(k.open_chunk(&id, blob.clone()).unwrap(), text);
        let mut noise = vec![0u8; 10_000];
        rng().fill_bytes(&mut noise);
        let (id2, blob2) = k.seal_chunk(&noise, &mut rng());
        assert_eq!(blob2[1], 0, "random bytes are not");
        assert_eq!(blob2.len(), noise.len() + BLOB_HEADER + 16);
        assert_eq!(k.open_chunk(&id2, blob2.clone()).unwrap(), noise);
    }

    #[test]
    fn large_random_chunks_skip_compression_and_large_text_keeps_it() {
        let k = RepoKey::generate(&mut rng());
        let mut noise = vec![0u8; 1 << 20];
        rng().fill_bytes(&mut noise);
        assert!(!looks_compressible(&noise));
        let (id, blob) = k.seal_chunk(&noise, &mut rng());
        assert_eq!(blob[1], 0);
        assert_eq!(k.open_chunk(&id, blob.clone()).unwrap(), noise);
        let text = b"the quick brown fox jumps over the lazy dog ".repeat(30_000);
        assert!(looks_compressible(&text));
        let (id, blob) = k.seal_chunk(&text, &mut rng());
        assert_eq!(blob[1], 1);
        assert!(blob.len() < text.len() / 10);
        assert_eq!(k.open_chunk(&id, blob.clone()).unwrap(), text);
    }

    #[test]
    fn a_chunk_fails_under_another_id_key_or_with_a_flipped_byte() {
        let k = RepoKey::generate(&mut rng());
        let (id, blob) = k.seal_chunk(b"secret marker", &mut rng());
        let mut other = id;
        other[0] ^= 1;
        assert_eq!(
            k.open_chunk(&other, blob.clone()),
            Err(FormatError::Auth("a chunk"))
        );
        let mut bad = blob.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(k.open_chunk(&id, bad.clone()).is_err());
        let k2 = RepoKey::from_master([9; 32]);
        assert!(k2.open_chunk(&id, blob.clone()).is_err());
        // The same plaintext has another id under another key: no cross-account match.
        assert_ne!(k2.chunk_id(b"secret marker"), id);
        // The plaintext is not in the blob.
        assert!(!blob.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn wrapped_key_opens_with_its_passphrase_only() {
        let k = RepoKey::generate(&mut rng());
        let w = k.wrap(b"correct horse", KdfCost::TEST, &mut rng()).unwrap();
        assert_eq!(w.len(), WRAPPED_KEY_LEN);
        let k2 = RepoKey::unwrap(&w, b"correct horse").unwrap();
        assert_eq!(k2.chunk_id(b"x"), k.chunk_id(b"x"));
        assert_eq!(
            RepoKey::unwrap(&w, b"wrong").unwrap_err(),
            FormatError::Passphrase
        );
        let mut costly = w.clone();
        costly[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            RepoKey::unwrap(&costly, b"correct horse"),
            Err(FormatError::Malformed(_))
        ));
    }

    #[test]
    fn root_and_manifest_round_trip() {
        let k = RepoKey::generate(&mut rng());
        let root = Root {
            manifest_len: 1234,
            manifest_chunks: vec![[1; 32], [2; 32]],
            paths: vec![b"/home/a".to_vec()],
            skipped: vec![],
        };
        let id = [5u8; 16];
        let sealed = k.seal_root(&id, &root, &mut rng());
        assert_eq!(k.open_root(&id, &sealed).unwrap(), root);
        assert!(
            k.open_root(&[6; 16], &sealed).is_err(),
            "bound to its snapshot id"
        );
        let entries = vec![
            Entry {
                path: b"d".to_vec(),
                kind: EntryKind::Dir,
                mode: 0o755,
                mtime_ns: -5,
                size: 0,
            },
            Entry {
                path: b"d/f".to_vec(),
                kind: EntryKind::File {
                    chunks: vec![[3; 32]],
                },
                mode: 0o600,
                mtime_ns: 1_700_000_000_123_456_789,
                size: 10,
            },
            Entry {
                path: b"d/l".to_vec(),
                kind: EntryKind::Symlink {
                    target: b"../x".to_vec(),
                },
                mode: 0o777,
                mtime_ns: 0,
                size: 0,
            },
        ];
        let mut m = Vec::new();
        for e in &entries {
            e.encode(&mut m);
        }
        assert_eq!(Entry::decode_all(&m).unwrap(), entries);
        for cut in 0..m.len() {
            // Every prefix either decodes to fewer entries or is refused; never a panic.
            let _ = Entry::decode_all(&m[..cut]);
        }
    }

    #[test]
    fn unsafe_manifest_paths_are_refused() {
        for p in [
            &b""[..],
            b"/abs",
            b"a/../b",
            b"..",
            b"./a",
            b"a//b",
            b"a/",
            b"a\0b",
        ] {
            assert!(!safe_path(p), "{p:?}");
        }
        assert!(safe_path(b"a/b c/.hidden"));
        let e = Entry {
            path: b"../escape".to_vec(),
            kind: EntryKind::Dir,
            mode: 0,
            mtime_ns: 0,
            size: 0,
        };
        let mut m = Vec::new();
        e.encode(&mut m);
        assert!(Entry::decode_all(&m).is_err());
    }
}
