//! The protocol v4 repository: where the server keeps what end-to-end encrypted,
//! deduplicating backups send it (the design brief is `V4.md`).
//!
//! The client encrypts everything. The server stores opaque *chunk* blobs, named by a
//! 32-byte [`ChunkId`] (a keyed hash of the plaintext the client computes; the server
//! cannot check it), and *snapshots*: a plaintext [`SnapshotHeader`] the server reads
//! (for listing and retention) plus an opaque encrypted body (the manifest), and the
//! list of chunk ids the snapshot names (for the commit check and garbage collection).
//!
//! # Parts
//! - [`blob`]: the [`BlobStore`] trait, bytes by [`BlobKey`] (account, kind, id), every
//!   batch durable on return; [`fs`] is the local implementation (one file per blob),
//!   [`s3`] the S3-compatible one (one object per blob).
//! - [`pack`]: packs, one blob holding many small chunks of an account, so that an
//!   object store is not asked once per small chunk (`docs/PACKS.md`); the committer
//!   writes them when [`Repo::set_pack_below`] is set (1 MiB by default on S3).
//! - [`registry`]: the [`Registry`] trait, the metadata (accounts, devices with their
//!   [`Capabilities`], chunk records with the hash taken at ingest, snapshots);
//!   [`sqlite`] is the local implementation, [`pg`] the PostgreSQL one (several
//!   server nodes sharing one database); [`pool`] keeps a node's connections.
//! - [`service`]: [`Repo`], the facade the server calls: group commit of chunk puts,
//!   snapshot commits, reads, quotas; [`gc`] adds garbage collection and scrub to it.
//! - `conformance` (tests only): one suite per trait, a generic function per test, run
//!   against every implementation (the registry suite against SQLite and PostgreSQL;
//!   an S3 blob store must pass the blob suite too).
//!
//! # Durability
//! A chunk is acknowledged only when its blob (its own, or its pack) is durable ([`BlobStore::put_batch`]:
//! data synced, renamed into place, directory synced) *and* its row is committed
//! (SQLite in WAL mode with `synchronous = FULL`: the commit returns after the WAL is
//! fsync'd). The blob is written first, so a crash in between leaves a blob without a
//! row: the client had no acknowledgement and sends the chunk again (the put overwrites
//! the blob), and garbage collection removes it if it never does. A snapshot becomes
//! visible only with its row, which is written after its body blob is durable and only
//! if every chunk it names has a row; so a visible snapshot never names a missing chunk
//! or lacks its body, and a crash shows either no snapshot or the whole one.
//!
//! # Garbage collection against concurrent backups
//! A backup asks which chunks are held ([`Repo::chunks_held`]) and sends only the others,
//! then commits a snapshot naming all of them; [`gc`] must never delete a chunk in
//! between. Three rules make that hold:
//! 1. Asking (`chunks_held`) and putting set the chunk's
//!    `touched_at` to now, in the same registry statement that answers; collection only
//!    deletes rows untouched for a grace period, and it checks "unreferenced and
//!    untouched" again in the transaction that deletes. The registry serialises the two:
//!    either the touch comes first (the row survives) or the delete does (the answer is
//!    "not held", or the commit is refused naming the chunk, and the client sends it
//!    again). A snapshot commit itself is atomic with its check that every chunk has a
//!    row, so it never names a chunk collected before it; it touches nothing, since
//!    its row then names the chunks, and rule 2 keeps collection out until it is in.
//! 2. The committer holds a shared lock for a whole round (held check, blob writes, row
//!    inserts, snapshot body and row), and collection holds it exclusively from deleting
//!    rows until their blobs are gone. Without it, a put of a chunk whose row was just
//!    deleted could write its blob and row before collection removed the blob, leaving
//!    a row without a blob. The same lock keeps the sweep of orphan blobs (blobs without
//!    a row) from taking a blob whose row is about to be written.
//! 3. Rows are deleted before blobs: a crash in between leaves orphan blobs, which the
//!    next collection removes, never a row without its blob. A pack goes only once no
//!    row names it (checked in the transaction that deletes its record); repacking
//!    writes the new pack before any row moves to it.
//!
//! Servers sharing one registry (PostgreSQL, with the blobs in an object store) keep
//! rule 2 across them too: each round also holds a lock shared in the registry, and
//! collection and forgets hold it exclusively ([`Registry::lock_round`], a PostgreSQL
//! advisory lock), so a round on one node never interleaves with a collection's
//! deletes on another. The lock is one connection's, and the locked work goes through
//! that connection, so a lost connection stops the work instead of letting it go on
//! unprotected. Collection deletes in batches ([`gc::GC_BATCH`]), taking the lock
//! for each, so rounds wait for one batch, not a whole account. A snapshot commit also
//! locks its id ([`Registry::lock_snapshot`]) from its check to its row, so two nodes
//! committing one id at once never write one body over the other.
//!
//! The grace period covers a client that learned a chunk was held (rule 1 touched it)
//! and commits its snapshot later: the snapshot must come within the grace period, or
//! its commit is refused naming the chunks, which the client sends again.

pub mod blob;
#[cfg(test)]
pub(crate) mod conformance;
pub mod fs;
pub mod gc;
#[cfg(test)]
pub(crate) mod hooked;
pub mod pack;
pub mod pg;
pub mod pool;
pub mod registry;
pub mod s3;
pub mod service;
pub mod sqlite;
pub mod tls;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use blob::{BlobKey, BlobKind, BlobStore};
pub use fs::FsBlobStore;
pub use gc::{GcReport, Progress, Scope, ScrubReport};
pub use pack::PackId;
pub use pg::PostgresRegistry;
pub use pool::RegistryPool;
pub use registry::{
    ChunkMove, ChunkRecord, CommitOutcome, Device, PackLoc, PackRecord, PackUsage, Registry,
    SnapshotStamp, StoredSnapshot, Unreferenced, Usage, MAX_NAME_LEN,
};
pub use service::{CommitStats, Repo};
pub use sqlite::SqliteRegistry;

/// An account (one user's repository).
pub type AccountId = i64;
/// A device of an account (one device key).
pub type DeviceId = i64;
/// A chunk's id: a keyed hash of its plaintext, computed by the client. The id types,
/// the capabilities and the name limit are the protocol's, defined once there.
pub use cyberbackup_protocol::v4::wire::{ChunkId, SnapshotId};
/// What a device may do, a bit set. The server enforces it ([`require`]); a device
/// enrolled without [`Capabilities::FORGET`] can add snapshots but never remove one.
pub use cyberbackup_protocol::v4::Capabilities;
/// A BLAKE3 hash of stored bytes, computed by the server.
pub type Hash = [u8; 32];

/// `Ok` if `caps` holds every capability in `needed`, else [`RepoError::Forbidden`].
pub fn require(caps: Capabilities, needed: Capabilities) -> Result<(), RepoError> {
    if caps.contains(needed) {
        Ok(())
    } else {
        Err(RepoError::Forbidden { needed, held: caps })
    }
}

/// The part of a snapshot the server can read. The body (the encrypted manifest) is
/// opaque to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub id: SnapshotId,
    /// When the backup was taken (the client's clock), milliseconds since the epoch.
    pub time_unix_ms: i64,
    pub host: String,
    pub tags: Vec<String>,
    pub paths: Vec<String>,
    pub files: u64,
    pub dirs: u64,
    /// Plaintext bytes of the files.
    pub size: u64,
    /// The device that committed it (set by the server from the authenticated device).
    pub device: DeviceId,
    /// Length of the encrypted body.
    pub body_len: u64,
    /// Bytes of chunk blobs the backup added, as the client counted them.
    pub stored: u64,
    /// When the server committed it (set by the registry; ignored on commit).
    pub committed_ms: i64,
}

/// Repository errors. Cheap to clone, so that one failure can answer every request of
/// a group commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RepoError {
    #[error("the device lacks capabilities {needed:?} (it holds {held:?})")]
    Forbidden {
        needed: Capabilities,
        held: Capabilities,
    },
    #[error("an account with this name exists")]
    NameTaken,
    #[error("a device with this public key exists")]
    KeyTaken,
    #[error("no account {0}")]
    NoSuchAccount(AccountId),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("account {account} would exceed its quota: {used} bytes used + {requested} > {quota}")]
    QuotaExceeded {
        account: AccountId,
        used: u64,
        requested: u64,
        quota: u64,
    },
    #[error("the disk is full ({path})")]
    DiskFull { path: PathBuf },
    #[error("{} chunks the snapshot names are not stored", .0.len())]
    MissingChunks(Vec<ChunkId>),
    #[error("a different snapshot with this id exists (snapshots are never replaced)")]
    SnapshotExists,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("database: {0}")]
    Db(#[source] Arc<rusqlite::Error>),
    #[error("PostgreSQL: {0}")]
    Postgres(#[source] Arc<::postgres::Error>),
    #[error("object store: {0}")]
    ObjectStore(String),
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("the database has schema version {found}; this server knows up to {supported}")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("{path} is in use by another process")]
    Locked { path: PathBuf },
    #[error("the repository's committer has stopped")]
    Stopped,
}

impl From<rusqlite::Error> for RepoError {
    fn from(e: rusqlite::Error) -> Self {
        RepoError::Db(Arc::new(e))
    }
}

/// Whether an I/O error means the disk (or the quota of the file system) is full.
fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Maps an I/O error on `path` to [`RepoError::DiskFull`] or [`RepoError::Io`].
pub(crate) fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> RepoError + 'a {
    move |source| {
        if is_disk_full(&source) {
            RepoError::DiskFull {
                path: path.to_owned(),
            }
        } else {
            RepoError::Io {
                what,
                path: path.to_owned(),
                source: Arc::new(source),
            }
        }
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The bytes of `N * 2` lowercase hex digits (`None` for anything else).
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        let pair = s.get(2 * i..2 * i + 2)?;
        if pair.bytes().any(|c| c.is_ascii_uppercase()) {
            return None;
        }
        *b = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

/// Milliseconds since the epoch, now.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_checks_every_needed_bit() {
        let backup = Capabilities::BACKUP;
        assert!(require(backup, Capabilities::BACKUP).is_ok());
        assert!(matches!(
            require(backup, Capabilities::FORGET),
            Err(RepoError::Forbidden { .. })
        ));
        assert!(require(backup, Capabilities::BACKUP | Capabilities::READ).is_err());
        assert!(require(
            Capabilities::ALL,
            Capabilities::ADMIN | Capabilities::FORGET
        )
        .is_ok());
        assert_eq!(Capabilities::from_bits_truncate(0xff), Capabilities::ALL);
    }

    #[test]
    fn hex_round_trips_and_rejects_uppercase() {
        let id = [0xab; 16];
        assert_eq!(unhex::<16>(&hex(&id)), Some(id));
        assert_eq!(unhex::<16>(&hex(&id).to_uppercase()), None);
        assert_eq!(unhex::<16>("abc"), None);
        assert!(is_disk_full(&io::Error::from_raw_os_error(libc::ENOSPC)));
        assert!(matches!(
            io_err("writing", Path::new("/x"))(io::Error::from_raw_os_error(libc::ENOSPC)),
            RepoError::DiskFull { .. }
        ));
    }
}
