//! The repository's metadata: accounts, devices, chunk records, snapshots.
//!
//! A [`Registry`] answers every question about what is stored without touching a blob,
//! and makes the decisions that must be atomic: a snapshot commit (every named chunk
//! present, the id new), the "held" answer that also protects a chunk from collection
//! (it touches the chunk), and collection's delete (it checks again that a chunk is
//! unreferenced and untouched). Every method that returns `Ok` after a write has made
//! it durable.
//!
//! Times are milliseconds since the epoch, passed in by the caller (the
//! [`Repo`](super::Repo)'s clock), so that tests can move time.
//!
//! Every method that takes an account acts only on that account's rows, whatever ids
//! it is given: that is the isolation between accounts.

use super::{
    AccountId, Capabilities, ChunkId, DeviceId, Hash, PackId, RepoError, SnapshotHeader, SnapshotId,
};

/// Longest account or device name, in bytes.
pub use cyberbackup_protocol::v4::wire::MAX_NAME_LEN;

/// A device of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub account: AccountId,
    pub name: String,
    pub caps: Capabilities,
    pub created_ms: i64,
    /// When it was revoked; a revoked device is refused at the handshake.
    pub revoked_ms: Option<i64>,
}

impl Device {
    pub fn revoked(&self) -> bool {
        self.revoked_ms.is_some()
    }
}

/// A stored chunk's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRecord {
    pub id: ChunkId,
    /// Length of the stored (encrypted) bytes.
    pub stored_len: u64,
    /// BLAKE3 of the stored bytes, computed by the server at ingest (for scrub).
    pub hash: Hash,
    pub stored_ms: i64,
    /// Last time a client learned the chunk was held or put it (a commit does not
    /// touch: its snapshot names the chunk): collection spares chunks touched within
    /// its grace period.
    pub touched_ms: i64,
    /// Set by scrub when the blob was missing or did not match `hash`: the chunk then
    /// counts as not held until it is put again.
    pub damaged_ms: Option<i64>,
    /// Where its bytes are when they are in a pack; `None` for a chunk that is a blob
    /// of its own.
    pub pack: Option<PackLoc>,
}

impl ChunkRecord {
    /// For a packed chunk, where up to `len` of its bytes from `offset` are in its
    /// pack: (pack, offset in the pack, length), clipped to the chunk's `stored_len`;
    /// `None` for a chunk that is a blob of its own, or a place past any pack.
    pub fn pack_range(&self, offset: u64, len: u64) -> Option<(PackId, u64, u64)> {
        let loc = self.pack?;
        let offset = offset.min(self.stored_len);
        let len = len.min(self.stored_len - offset);
        let start = loc.offset.checked_add(offset)?;
        start.checked_add(len)?;
        Some((loc.pack, start, len))
    }
}

/// Where a packed chunk's bytes are: `stored_len` bytes at `offset` in the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PackLoc {
    pub pack: PackId,
    pub offset: u64,
}

/// A pack as the registry keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackRecord {
    pub id: PackId,
    /// The pack blob's length (chunks and trailer).
    pub stored_len: u64,
    pub created_ms: i64,
}

/// A pack and what of it is still live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackUsage {
    pub pack: PackRecord,
    /// Chunk rows that name it, and their stored bytes.
    pub live_chunks: u64,
    pub live_bytes: u64,
}

/// A packed chunk's row to move to another pack ([`Registry::move_chunks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkMove {
    pub id: ChunkId,
    /// Where the row must still point for the move to happen.
    pub from: PackLoc,
    /// Its offset in the new pack.
    pub to_offset: u64,
}

/// What a snapshot commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The snapshot is new and now visible.
    Committed,
    /// The same snapshot (same body hash and chunk list) was committed before: a retried
    /// commit whose acknowledgement was lost.
    AlreadyCommitted,
}

/// A committed snapshot as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    pub header: SnapshotHeader,
    /// The chunks it names, in the order the client gave.
    pub chunks: Vec<ChunkId>,
    /// BLAKE3 of the body, computed by the server.
    pub body_hash: Hash,
    /// When the server committed it.
    pub created_ms: i64,
}

/// What [`Registry::unreferenced_chunks`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Unreferenced {
    /// The chunks no snapshot names that nobody touched since the cutoff, in id order.
    pub chunks: Vec<ChunkRecord>,
    /// Every snapshot of the account at that reading.
    pub snapshots: Vec<SnapshotStamp>,
}

/// What tells one committed snapshot from any other: its id, body hash and commit
/// time. A snapshot never changes once committed; an id forgotten and committed again
/// (with any body) has another commit time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotStamp {
    pub id: SnapshotId,
    pub body_hash: Hash,
    pub created_ms: i64,
}

/// An account's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub chunks: u64,
    /// Bytes of stored chunks and snapshot bodies.
    pub stored_bytes: u64,
    pub snapshots: u64,
    pub quota: Option<u64>,
}

/// The metadata store. `Send` but not `Sync`: one owner at a time (the [`Repo`] keeps
/// it behind a mutex).
///
/// [`Repo`]: super::Repo
pub trait Registry: Send {
    /// A new account named `name` (1 to [`MAX_NAME_LEN`] bytes, unique) with its first
    /// device, which holds [`Capabilities::ALL`].
    fn create_account(
        &mut self,
        name: &str,
        device_key: &[u8; 32],
        device_name: &str,
        now_ms: i64,
    ) -> Result<(AccountId, DeviceId), RepoError>;

    /// The account of this name.
    fn account_by_name(&mut self, name: &str) -> Result<Option<AccountId>, RepoError>;

    /// The name of an account.
    fn account_name(&mut self, id: AccountId) -> Result<Option<String>, RepoError>;

    /// Records a one-time enrolment code (its hash) for a new device of `account`.
    fn add_enrolment(
        &mut self,
        account: AccountId,
        code_hash: &[u8; 32],
        caps: Capabilities,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<(), RepoError>;

    /// Uses up an unexpired, unused code: adds the device with the code's capabilities,
    /// in one transaction. `None` for an unknown, used or expired code.
    fn redeem_enrolment(
        &mut self,
        code_hash: &[u8; 32],
        key: &[u8; 32],
        name: &str,
        now_ms: i64,
    ) -> Result<Option<Device>, RepoError>;

    /// Every account, in id order.
    fn accounts(&mut self) -> Result<Vec<AccountId>, RepoError>;

    /// Removes the account and every row of it (devices, enrolment codes, chunk
    /// records, snapshots) in one transaction; `false` if there is no such account.
    /// Its blobs are the caller's to remove, after.
    fn remove_account(&mut self, account: AccountId) -> Result<bool, RepoError>;

    /// Whether the registry answers (the readiness probe): a cheap read.
    fn ping(&mut self) -> Result<(), RepoError>;

    /// The device with this public key (revoked ones too: the caller refuses them).
    fn device_by_key(&mut self, key: &[u8; 32]) -> Result<Option<Device>, RepoError>;

    /// Enrols a device; [`RepoError::KeyTaken`] if its key is any device's already.
    fn add_device(
        &mut self,
        account: AccountId,
        key: &[u8; 32],
        name: &str,
        caps: Capabilities,
        now_ms: i64,
    ) -> Result<DeviceId, RepoError>;

    /// The account's devices, in id order.
    fn list_devices(&mut self, account: AccountId) -> Result<Vec<Device>, RepoError>;

    /// Revokes a device of the account; `false` if it has no such device (revoking
    /// twice keeps the first time).
    fn revoke_device(
        &mut self,
        account: AccountId,
        device: DeviceId,
        now_ms: i64,
    ) -> Result<bool, RepoError>;

    /// Stores the master key wrapped under the user's passphrase (opaque here).
    fn set_wrapped_key(&mut self, account: AccountId, key: &[u8]) -> Result<(), RepoError>;

    fn wrapped_key(&mut self, account: AccountId) -> Result<Option<Vec<u8>>, RepoError>;

    /// Sets (or with `None` removes) the account's quota in stored bytes.
    fn set_quota(&mut self, account: AccountId, quota: Option<u64>) -> Result<(), RepoError>;

    fn usage(&mut self, account: AccountId) -> Result<Usage, RepoError>;

    /// For each id, whether the account holds that chunk (and it is not damaged). The
    /// held ones are touched (`touched_ms` = `now_ms`) in the same transaction, which
    /// protects them from a concurrent collection.
    fn chunks_held(
        &mut self,
        account: AccountId,
        ids: &[ChunkId],
        now_ms: i64,
    ) -> Result<Vec<bool>, RepoError>;

    /// For each id, whether the account holds that chunk, sound (not damaged), without
    /// touching it: the check before a snapshot's body is written, inside a commit
    /// round, where collection cannot delete rows (`super` module docs, rule 2).
    fn chunks_sound(&mut self, account: AccountId, ids: &[ChunkId])
        -> Result<Vec<bool>, RepoError>;

    /// For each id, whether the account has a record of that chunk (damaged or not),
    /// without touching it (for the sweep of orphan blobs).
    fn chunks_recorded(
        &mut self,
        account: AccountId,
        ids: &[ChunkId],
    ) -> Result<Vec<bool>, RepoError>;

    /// Records packs and chunks whose blobs are durable, for any accounts, in one
    /// transaction (a group commit). A chunk record that exists is replaced (a damaged
    /// chunk put again becomes sound, at its new location). All or nothing.
    fn insert_chunks(
        &mut self,
        packs: &[(AccountId, PackRecord)],
        records: &[(AccountId, ChunkRecord)],
    ) -> Result<(), RepoError>;

    /// The account's record of a chunk (damaged or not), without touching it: where
    /// a read finds its bytes.
    fn chunk_record(
        &mut self,
        account: AccountId,
        id: &ChunkId,
    ) -> Result<Option<ChunkRecord>, RepoError>;

    /// Every pack of the account with its live chunks and bytes, in id order.
    fn packs(&mut self, account: AccountId) -> Result<Vec<PackUsage>, RepoError>;

    /// The chunk records that name the pack, in offset order.
    fn chunks_in_pack(
        &mut self,
        account: AccountId,
        pack: &PackId,
    ) -> Result<Vec<ChunkRecord>, RepoError>;

    /// For each id, whether the account has a record of that pack (for the sweep of
    /// orphan blobs).
    fn packs_recorded(
        &mut self,
        account: AccountId,
        ids: &[PackId],
    ) -> Result<Vec<bool>, RepoError>;

    /// Deletes, in one transaction that decides and deletes, the records of those of
    /// `ids` that no chunk row names, and returns them; their blobs are the caller's to
    /// delete, after.
    fn delete_unnamed_packs(
        &mut self,
        account: AccountId,
        ids: &[PackId],
    ) -> Result<Vec<PackId>, RepoError>;

    /// Records the new pack `to` and, in the same transaction, points each row of
    /// `moves` that still points at its `from` (and is not damaged) at its offset in
    /// `to`; returns how many moved. A row put again or marked damaged meanwhile stays.
    fn move_chunks(
        &mut self,
        account: AccountId,
        to: &PackRecord,
        moves: &[ChunkMove],
    ) -> Result<u64, RepoError>;

    /// Commits a snapshot atomically: [`RepoError::MissingChunks`] naming every chunk
    /// of `chunks` the account does not hold (or holds damaged), unless all are held;
    /// for an id that exists, [`CommitOutcome::AlreadyCommitted`] if its body hash and
    /// chunk list are these, else [`RepoError::SnapshotExists`]. The named chunks are
    /// not touched: once the row is in, the snapshot names them, and until then the
    /// commit round keeps collection out (`super` module docs, rule 2). So a commit
    /// that names tens of thousands of held chunks writes one row, not as many.
    fn commit_snapshot(
        &mut self,
        account: AccountId,
        header: &SnapshotHeader,
        chunks: &[ChunkId],
        body_hash: &Hash,
        now_ms: i64,
    ) -> Result<CommitOutcome, RepoError>;

    /// The account's snapshot headers, oldest first.
    fn list_snapshots(&mut self, account: AccountId) -> Result<Vec<SnapshotHeader>, RepoError>;

    fn get_snapshot(
        &mut self,
        account: AccountId,
        id: &SnapshotId,
    ) -> Result<Option<StoredSnapshot>, RepoError>;

    /// Removes the snapshot's row; `false` if the account has no such snapshot.
    fn forget_snapshot(&mut self, account: AccountId, id: &SnapshotId) -> Result<bool, RepoError>;

    /// Chunks of the account that no snapshot names and nobody touched at or after
    /// `touched_before`, with the snapshots whose chunk lists that answer took into
    /// account: one consistent reading, from which collection then deletes in batches
    /// ([`delete_unreferenced_chunks`](Self::delete_unreferenced_chunks)).
    fn unreferenced_chunks(
        &mut self,
        account: AccountId,
        touched_before: i64,
    ) -> Result<Unreferenced, RepoError>;

    /// Deletes, in one transaction that decides and deletes, the rows of those of `ids`
    /// that nobody touched at or after `touched_before` and that no snapshot names, and
    /// returns them (in id order). The snapshots in `checked` (from
    /// [`unreferenced_chunks`](Self::unreferenced_chunks)) are known not to name any of
    /// `ids`: only the others are read, so a collection deleting in many short
    /// batches reads every chunk list once, not once a batch. Snapshots never change
    /// once committed, so a snapshot with the same [`SnapshotStamp`] names the same
    /// chunks.
    fn delete_unreferenced_chunks(
        &mut self,
        account: AccountId,
        ids: &[ChunkId],
        touched_before: i64,
        checked: &[SnapshotStamp],
    ) -> Result<Vec<ChunkRecord>, RepoError>;

    /// Up to `limit` chunk records of the account in id order, starting after `after`
    /// (for scrub and the sweep of orphan blobs, a page at a time).
    fn chunk_records(
        &mut self,
        account: AccountId,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<ChunkRecord>, RepoError>;

    /// Whether other processes share this registry (PostgreSQL), so that
    /// [`lock_round`](Self::lock_round) and [`lock_snapshot`](Self::lock_snapshot) take
    /// locks they see. A registry only one process uses (SQLite: the blob store's lock
    /// keeps other servers out) needs nothing beyond the process's own locks.
    fn is_shared(&self) -> bool {
        false
    }

    /// The server key (public) the nodes sharing this registry serve with, once one
    /// has claimed it; `None` for an unshared registry (its server's key is its own).
    fn cluster_key(&mut self) -> Result<Option<[u8; 32]>, RepoError> {
        Ok(None)
    }

    /// Records `key` as the cluster's server key if none is yet; returns the recorded
    /// one if it is another (the node must not serve: clients pinned that one).
    fn claim_server_key(
        &mut self,
        _key: &[u8; 32],
        _now_ms: i64,
    ) -> Result<Option<[u8; 32]>, RepoError> {
        Ok(None)
    }

    /// Whether this connection may still hold a lock of [`lock_round`](Self::lock_round)
    /// or [`lock_snapshot`](Self::lock_snapshot) (its release failed, or its holder
    /// panicked): such a connection is closed, not given back to the pool, so that the
    /// database releases what it holds.
    fn holds_locks(&self) -> bool {
        false
    }

    /// Rule 2 of [`super`] across processes: held shared by a commit round (and a
    /// forget), exclusive by collection from deleting rows until their blobs are gone.
    /// With `wait`, waits until it is granted; without, tries once and says whether it
    /// was. An unshared registry grants at once; a shared one takes a lock every
    /// process sharing it sees, on this connection, and refuses every call (rather than
    /// open a new connection without the lock) once the connection holding it is lost,
    /// until it is released. The caller does the locked work on this same registry.
    fn lock_round(&mut self, _exclusive: bool, _wait: bool) -> Result<bool, RepoError> {
        Ok(true)
    }

    /// Releases what [`lock_round`](Self::lock_round) took.
    fn unlock_round(&mut self, _exclusive: bool) -> Result<(), RepoError> {
        Ok(())
    }

    /// Keeps every other process sharing the registry from committing a snapshot with
    /// this id until [`unlock_snapshot`](Self::unlock_snapshot): taken before a
    /// commit's check, held through its body's write and its row, so that of two
    /// commits of one id through two nodes at once the second sees the first's row
    /// and never overwrites its body. One process's commits are one at a time already
    /// (its committer thread), so an unshared registry does nothing. Waits.
    fn lock_snapshot(&mut self, _account: AccountId, _id: &SnapshotId) -> Result<(), RepoError> {
        Ok(())
    }

    /// Releases what [`lock_snapshot`](Self::lock_snapshot) took.
    fn unlock_snapshot(&mut self, _account: AccountId, _id: &SnapshotId) -> Result<(), RepoError> {
        Ok(())
    }

    /// Marks a chunk damaged if its record still has hash `hash` and is not marked
    /// yet; `true` if it marked it.
    fn mark_damaged(
        &mut self,
        account: AccountId,
        id: &ChunkId,
        hash: &Hash,
        now_ms: i64,
    ) -> Result<bool, RepoError>;
}

/// Checks a name's length (1 to [`MAX_NAME_LEN`] bytes).
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), RepoError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(RepoError::InvalidArgument(format!(
            "{what} must be 1 to {MAX_NAME_LEN} bytes, not {}",
            name.len()
        )));
    }
    Ok(())
}
