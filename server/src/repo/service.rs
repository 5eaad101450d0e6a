//! [`Repo`]: the facade the server calls, a [`BlobStore`] and a [`Registry`] together.
//!
//! Writes go through one committer thread, which takes everything waiting (up to
//! [`MAX_BATCH_ITEMS`] requests or about [`MAX_BATCH_BYTES`]) and commits it together:
//! the chunks' blobs in one durable [`BlobStore::put_batch`], then their rows in one
//! registry transaction, then every waiter is answered (group commit across
//! connections). Chunks already held are answered without being written again.
//! Snapshot commits go through the same thread, after the round's chunks, so that the
//! checks and the writes of a snapshot (id new, every chunk held, body, row) are never
//! interleaved with another commit of the same id. The async methods only queue and
//! await a `futures_channel::oneshot`, so they run under glommio as well as under a
//! blocking `block_on`.
//!
//! Every other method blocks (SQLite, file reads): call them from a blocking pool.
//! The caller authenticates the device and checks its capabilities ([`require`]) before
//! calling; the repository then acts only on the account it is given.
//!
//! [`require`]: super::require

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;

use futures_channel::oneshot;

use super::blob::{BlobKey, BlobStore};
use super::fs::FsBlobStore;
use super::pack::{PackBuilder, PackId, MAX_PACK_BYTES};
use super::pool::{Opener, Pooled, RegistryPool};
use super::registry::{
    ChunkRecord, CommitOutcome, Device, PackLoc, PackRecord, Registry, StoredSnapshot, Usage,
};
use super::sqlite::SqliteRegistry;
use super::{
    now_unix_ms, AccountId, Capabilities, ChunkId, DeviceId, RepoError, SnapshotHeader, SnapshotId,
};

/// Most requests one committer round takes.
pub const MAX_BATCH_ITEMS: usize = 1024;
/// A committer round stops taking requests once it holds this many bytes.
pub const MAX_BATCH_BYTES: usize = 64 << 20;

/// A clock: milliseconds since the epoch.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The repository: clone it freely (an `Arc` inside). Dropping the last clone stops the
/// committer thread (after the requests already queued) and closes the store and the
/// registry.
#[derive(Clone)]
pub struct Repo {
    // Dropped first: stops and joins the committer, whose `Shared` is then released.
    committer: Arc<CommitterHandle>,
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo").finish_non_exhaustive()
    }
}

pub(super) struct Shared {
    pub(super) store: Box<dyn BlobStore>,
    registry: RegistryPool,
    /// Shared by a committer round, exclusive for collection's deletes: see the module
    /// documentation of [`super`].
    pub(super) gc_lock: RwLock<()>,
    clock: Clock,
    stats: Stats,
    /// Chunks smaller than this are written in packs (0: none are); see
    /// [`Repo::set_pack_below`].
    pack_below: AtomicU64,
    /// Packs read whole for reads that go through them in order.
    packs_read: super::pack::PackCache,
    /// Collections and scrubs running now, for `status`.
    pub(super) maintenance: super::gc::Maintenance,
}

/// Counters of the committer (for metrics, and for tests that check grouping).
#[derive(Debug, Default)]
struct Stats {
    rounds: AtomicU64,
    chunks_written: AtomicU64,
    chunks_held: AtomicU64,
}

/// What the committer has done since the repository was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Committer rounds that stored chunks (each one durable batch and one transaction).
    pub rounds: u64,
    /// Chunks written and recorded.
    pub chunks_written: u64,
    /// Chunk puts answered without writing (held already, or twice in one round).
    pub chunks_held: u64,
}

impl Shared {
    /// A registry connection for the caller alone, until the guard is dropped.
    pub(super) fn registry(&self) -> Result<Pooled<'_>, RepoError> {
        self.registry.get()
    }

    pub(super) fn now(&self) -> i64 {
        (self.clock)()
    }

    /// Takes rule 2's lock in the registry too, for the processes that share it
    /// ([`Registry::lock_round`]); released when the guard is dropped. Taken after
    /// `gc_lock`, and released before it. The lock is a connection's: the guard keeps
    /// that connection checked out, and the locked work goes through it
    /// ([`CrossLock::registry`]), so that if the connection is lost, taking the lock
    /// with it, the work stops there (the registry refuses every call until the lock
    /// is released) instead of going on through another connection unprotected. A
    /// round's shared lock waits in the database's queue, behind a collection's
    /// exclusive one that asked first.
    pub(super) fn cross_lock(&self, exclusive: bool) -> Result<CrossLock<'_>, RepoError> {
        if !self.registry.is_shared() {
            return Ok(CrossLock {
                shared: self,
                held: None,
                exclusive,
                _local: None,
            });
        }
        let mut conn = self.registry()?;
        conn.lock_round(exclusive, true)?;
        Ok(CrossLock {
            shared: self,
            held: Some(conn),
            exclusive,
            _local: None,
        })
    }

    /// Rule 2's lock held exclusively, in this process (`gc_lock`) and on every node
    /// sharing the registry (collection's deletes, forgets, account removal).
    pub(super) fn exclusive(&self) -> Result<CrossLock<'_>, RepoError> {
        let local = self.gc_lock.write().unwrap_or_else(PoisonError::into_inner);
        let mut all = self.cross_lock(true)?;
        all._local = Some(local);
        Ok(all)
    }
}

/// Rule 2's lock in a shared registry, held until dropped.
pub(super) struct CrossLock<'a> {
    shared: &'a Shared,
    /// The connection holding the lock (a shared registry).
    held: Option<Pooled<'a>>,
    exclusive: bool,
    /// This process's `gc_lock`, when taken with it ([`Shared::exclusive`]): a field
    /// after `held`, so released after the registry's lock.
    _local: Option<std::sync::RwLockWriteGuard<'a, ()>>,
}

impl<'a> CrossLock<'a> {
    /// The registry for the work the lock covers: the connection holding it, or with
    /// an unshared registry (which needs no lock) any connection, for one step at a
    /// time, so that others are not kept waiting while blobs are written.
    pub(super) fn registry(&mut self) -> Result<LockedRegistry<'_, 'a>, RepoError> {
        Ok(match &mut self.held {
            Some(conn) => LockedRegistry::Held(conn),
            None => LockedRegistry::Any(self.shared.registry()?),
        })
    }
}

/// A registry connection under a [`CrossLock`].
pub(super) enum LockedRegistry<'b, 'a> {
    Held(&'b mut Pooled<'a>),
    Any(Pooled<'a>),
}

impl std::ops::Deref for LockedRegistry<'_, '_> {
    type Target = Box<dyn Registry>;

    fn deref(&self) -> &Self::Target {
        match self {
            LockedRegistry::Held(c) => c,
            LockedRegistry::Any(c) => c,
        }
    }
}

impl std::ops::DerefMut for LockedRegistry<'_, '_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            LockedRegistry::Held(c) => c,
            LockedRegistry::Any(c) => c,
        }
    }
}

impl Drop for CrossLock<'_> {
    fn drop(&mut self) {
        if let Some(conn) = &mut self.held {
            if let Err(e) = conn.unlock_round(self.exclusive) {
                // A lost connection took the lock with it; anything else is worth a look.
                tracing::warn!(error = %e, "cannot release the registry's round lock");
            }
        }
    }
}

struct CommitterHandle {
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for CommitterHandle {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Job {
    Chunk {
        account: AccountId,
        id: ChunkId,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), RepoError>>,
    },
    Snapshot {
        account: AccountId,
        header: SnapshotHeader,
        chunks: Vec<ChunkId>,
        body: Vec<u8>,
        reply: oneshot::Sender<Result<CommitOutcome, RepoError>>,
    },
}

impl Job {
    fn bytes(&self) -> usize {
        match self {
            Job::Chunk { data, .. } => data.len(),
            Job::Snapshot { body, chunks, .. } => body.len() + chunks.len() * 32,
        }
    }
}

impl Repo {
    /// A repository on `store` and `registry`, with the system clock.
    pub fn new(store: Box<dyn BlobStore>, registry: Box<dyn Registry>) -> Result<Repo, RepoError> {
        Repo::with_clock(store, registry, Arc::new(now_unix_ms))
    }

    /// The local repository in `dir`: blobs under `dir/blobs`, the registry in
    /// `dir/repo.db`.
    pub fn open_local(dir: &Path) -> Result<Repo, RepoError> {
        std::fs::create_dir_all(dir).map_err(super::io_err("creating", dir))?;
        let store = FsBlobStore::open(&dir.join("blobs"))?;
        let registry = SqliteRegistry::open(&dir.join("repo.db"))?;
        Repo::new(Box::new(store), Box::new(registry))
    }

    /// The repository in `dir` as configured: the blobs in the S3 store `s3` when
    /// given, else under `dir/blobs`; the registry in PostgreSQL at `registry` when
    /// given, else in `dir/repo.db`.
    /// A PostgreSQL registry keeps up to `connections` connections (at least 2: a
    /// commit round holds one through its blob writes).
    pub fn open(
        dir: &Path,
        registry: Option<&str>,
        connections: usize,
        s3: Option<&super::s3::S3Config>,
    ) -> Result<Repo, RepoError> {
        if registry.is_none() && s3.is_none() {
            return Repo::open_local(dir);
        }
        std::fs::create_dir_all(dir).map_err(super::io_err("creating", dir))?;
        let store: Box<dyn BlobStore> = match s3 {
            Some(cfg) => Box::new(super::s3::S3BlobStore::open(cfg)?),
            None => Box::new(FsBlobStore::open(&dir.join("blobs"))?),
        };
        let registry = match registry {
            Some(url) => {
                let first = Box::new(super::pg::PostgresRegistry::open(url)?);
                let url = url.to_owned();
                let opener: Opener = Box::new(move || {
                    Ok(Box::new(super::pg::PostgresRegistry::connect(&url)?) as Box<dyn Registry>)
                });
                RegistryPool::new(first, Some(opener), connections.max(2))
            }
            None => RegistryPool::single(Box::new(SqliteRegistry::open(&dir.join("repo.db"))?)),
        };
        Repo::with_pool(store, registry, Arc::new(now_unix_ms))
    }

    /// A repository with its own clock (tests move time with it).
    pub fn with_clock(
        store: Box<dyn BlobStore>,
        registry: Box<dyn Registry>,
        clock: Clock,
    ) -> Result<Repo, RepoError> {
        Repo::with_pool(store, RegistryPool::single(registry), clock)
    }

    /// A repository on a pool of registry connections.
    pub fn with_pool(
        store: Box<dyn BlobStore>,
        registry: RegistryPool,
        clock: Clock,
    ) -> Result<Repo, RepoError> {
        let shared = Arc::new(Shared {
            store,
            registry,
            gc_lock: RwLock::new(()),
            clock,
            stats: Stats::default(),
            pack_below: AtomicU64::new(0),
            packs_read: super::pack::PackCache::new(super::pack::PACK_CACHE_BYTES),
            maintenance: Default::default(),
        });
        let (tx, rx) = mpsc::channel();
        let me = shared.clone();
        let thread = std::thread::Builder::new()
            .name("repo-committer".into())
            .spawn(move || run_committer(&me, &rx))
            .map_err(super::io_err(
                "starting the committer thread",
                Path::new(""),
            ))?;
        Ok(Repo {
            committer: Arc::new(CommitterHandle {
                tx: Some(tx),
                thread: Some(thread),
            }),
            shared,
        })
    }

    /// From now on, a round's chunks of fewer than `bytes` stored bytes are written
    /// together, per account, as packs of up to [`MAX_PACK_BYTES`] (`docs/PACKS.md`):
    /// one blob, and on an object store one request, for many small chunks. 0 turns
    /// packing off (each chunk its own blob, the default). Chunks already stored stay
    /// where they are: reads find either layout.
    pub fn set_pack_below(&self, bytes: u64) {
        self.shared.pack_below.store(bytes, Ordering::Relaxed);
    }

    /// What [`set_pack_below`](Self::set_pack_below) set.
    pub fn pack_below(&self) -> u64 {
        self.shared.pack_below.load(Ordering::Relaxed)
    }

    /// The committer's counters.
    pub fn commit_stats(&self) -> CommitStats {
        let s = &self.shared.stats;
        CommitStats {
            rounds: s.rounds.load(Ordering::Relaxed),
            chunks_written: s.chunks_written.load(Ordering::Relaxed),
            chunks_held: s.chunks_held.load(Ordering::Relaxed),
        }
    }

    fn send(&self, job: Job) -> Result<(), RepoError> {
        self.committer
            .tx
            .as_ref()
            .ok_or(RepoError::Stopped)?
            .send(job)
            .map_err(|_| RepoError::Stopped)
    }

    /// Stores a chunk; returns when it is durable and recorded (or refused: over the
    /// quota, disk full). A chunk the account holds already is acknowledged without
    /// being written again.
    pub async fn put_chunk(
        &self,
        account: AccountId,
        id: ChunkId,
        data: Vec<u8>,
    ) -> Result<(), RepoError> {
        let (reply, rx) = oneshot::channel();
        self.send(Job::Chunk {
            account,
            id,
            data,
            reply,
        })?;
        rx.await.map_err(|_| RepoError::Stopped)?
    }

    /// Commits a snapshot committed by `device`: its body is stored durably, then its
    /// row written, after which it is visible. Refused if a chunk it names is not held
    /// ([`RepoError::MissingChunks`]), if a different snapshot has its id
    /// ([`RepoError::SnapshotExists`]; the same one again is
    /// [`CommitOutcome::AlreadyCommitted`]), or over the quota. `header.device` is set to
    /// `device`, and `header.body_len` must be the body's length.
    pub async fn commit_snapshot(
        &self,
        account: AccountId,
        device: DeviceId,
        mut header: SnapshotHeader,
        chunks: Vec<ChunkId>,
        body: Vec<u8>,
    ) -> Result<CommitOutcome, RepoError> {
        if header.body_len != body.len() as u64 {
            return Err(RepoError::InvalidArgument(format!(
                "the header says the body has {} bytes, it has {}",
                header.body_len,
                body.len()
            )));
        }
        header.device = device;
        let (reply, rx) = oneshot::channel();
        self.send(Job::Snapshot {
            account,
            header,
            chunks,
            body,
            reply,
        })?;
        rx.await.map_err(|_| RepoError::Stopped)?
    }

    // ---- accounts and devices ----

    /// A new account with its first device (which may do everything).
    pub fn create_account(
        &self,
        name: &str,
        device_key: &[u8; 32],
        device_name: &str,
    ) -> Result<(AccountId, DeviceId), RepoError> {
        let now = self.shared.now();
        self.shared
            .registry()?
            .create_account(name, device_key, device_name, now)
    }

    /// Makes a one-time enrolment code for a new device of `account` with `caps`,
    /// valid for `ttl`; only its SHA-256 is kept. Returns the code and its expiry.
    pub fn new_enrolment(
        &self,
        account: AccountId,
        caps: Capabilities,
        ttl: std::time::Duration,
    ) -> Result<(String, i64), RepoError> {
        let (code, hash) = enrolment_code();
        let now = self.shared.now();
        let expires = now.saturating_add(ttl.as_millis().min(i64::MAX as u128) as i64);
        self.shared
            .registry()?
            .add_enrolment(account, &hash, caps, now, expires)?;
        Ok((code, expires))
    }

    /// Redeems an enrolment code for the device `key` named `name`.
    pub fn redeem_enrolment(
        &self,
        code: &str,
        key: &[u8; 32],
        name: &str,
    ) -> Result<Option<Device>, RepoError> {
        let now = self.shared.now();
        self.shared
            .registry()?
            .redeem_enrolment(&code_hash(code), key, name, now)
    }

    /// The name of an account.
    pub fn account_name(&self, id: AccountId) -> Result<Option<String>, RepoError> {
        self.shared.registry()?.account_name(id)
    }

    pub fn account_by_name(&self, name: &str) -> Result<Option<AccountId>, RepoError> {
        self.shared.registry()?.account_by_name(name)
    }

    /// The device with this key, revoked or not (the handshake refuses revoked ones).
    pub fn device_by_key(&self, key: &[u8; 32]) -> Result<Option<Device>, RepoError> {
        self.shared.registry()?.device_by_key(key)
    }

    pub fn add_device(
        &self,
        account: AccountId,
        key: &[u8; 32],
        name: &str,
        caps: Capabilities,
    ) -> Result<DeviceId, RepoError> {
        let now = self.shared.now();
        self.shared
            .registry()?
            .add_device(account, key, name, caps, now)
    }

    pub fn list_devices(&self, account: AccountId) -> Result<Vec<Device>, RepoError> {
        self.shared.registry()?.list_devices(account)
    }

    pub fn revoke_device(&self, account: AccountId, device: DeviceId) -> Result<bool, RepoError> {
        let now = self.shared.now();
        self.shared.registry()?.revoke_device(account, device, now)
    }

    pub fn set_wrapped_key(&self, account: AccountId, key: &[u8]) -> Result<(), RepoError> {
        self.shared.registry()?.set_wrapped_key(account, key)
    }

    pub fn wrapped_key(&self, account: AccountId) -> Result<Option<Vec<u8>>, RepoError> {
        self.shared.registry()?.wrapped_key(account)
    }

    pub fn set_quota(&self, account: AccountId, quota: Option<u64>) -> Result<(), RepoError> {
        self.shared.registry()?.set_quota(account, quota)
    }

    /// Removes an account with everything it holds: its rows in one transaction
    /// (under the lock that keeps commit rounds out, on every node sharing the
    /// registry), then its blobs. A round after that finds no account and writes
    /// nothing; a crash between leaves blobs no row names, which nobody serves.
    /// `false` if there is no such account.
    pub fn remove_account(&self, account: AccountId) -> Result<bool, RepoError> {
        {
            let mut all = self.shared.exclusive()?;
            if !all.registry()?.remove_account(account)? {
                return Ok(false);
            }
        }
        self.shared.store.delete_account(account)?;
        Ok(true)
    }

    /// The server key the nodes sharing this registry serve with (see
    /// [`Registry::cluster_key`]).
    pub fn cluster_key(&self) -> Result<Option<[u8; 32]>, RepoError> {
        self.shared.registry()?.cluster_key()
    }

    /// Claims `key` as the cluster's server key (see [`Registry::claim_server_key`]).
    pub fn claim_server_key(&self, key: &[u8; 32]) -> Result<Option<[u8; 32]>, RepoError> {
        let now = self.shared.now();
        self.shared.registry()?.claim_server_key(key, now)
    }

    /// Whether the blob store takes writes (the readiness probe).
    pub fn store_ready(&self) -> Result<(), RepoError> {
        self.shared.store.ready()
    }

    /// Whether the registry answers (the readiness probe).
    pub fn ping(&self) -> Result<(), RepoError> {
        self.shared.registry()?.ping()
    }

    /// Every account's id, in id order.
    pub fn accounts(&self) -> Result<Vec<AccountId>, RepoError> {
        self.shared.registry()?.accounts()
    }

    pub fn usage(&self, account: AccountId) -> Result<Usage, RepoError> {
        self.shared.registry()?.usage(account)
    }

    // ---- chunks ----

    /// For each id, whether the account holds the chunk; the held ones are protected
    /// from collection for its grace period from now.
    pub fn chunks_held(&self, account: AccountId, ids: &[ChunkId]) -> Result<Vec<bool>, RepoError> {
        let now = self.shared.now();
        self.shared.registry()?.chunks_held(account, ids, now)
    }

    /// The chunk's stored bytes, from the account's own namespace only: its own blob,
    /// or its range of a pack.
    pub fn get_chunk(
        &self,
        account: AccountId,
        id: &ChunkId,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        self.get_chunk_range(account, id, 0, u64::MAX)
    }

    /// Up to `len` of the chunk's bytes from `offset`.
    pub fn get_chunk_range(
        &self,
        account: AccountId,
        id: &ChunkId,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        let store = &self.shared.store;
        // Without packing, most chunks are blobs of their own: one read, no lookup.
        if self.pack_below() == 0 {
            if let Some(b) = store.get_range(&BlobKey::Chunk(account, *id), offset, len)? {
                return Ok(Some(b));
            }
        }
        // A repack may move the chunk and delete its old pack between the row's read
        // and the pack's: a pack gone (or short) is read again at the row's new place.
        let mut last = None;
        for _ in 0..4 {
            let Some(rec) = self.shared.registry()?.chunk_record(account, id)? else {
                return Ok(None);
            };
            if last.is_some() && last == Some(rec.pack) {
                return Ok(None); // it did not move: gone for good
            }
            last = Some(rec.pack);
            if let Some(b) = self.read_located(account, &rec, offset, len)? {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    /// [`read_chunk`], through the cache of whole packs for a packed chunk.
    fn read_located(
        &self,
        account: AccountId,
        rec: &ChunkRecord,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        let store = &self.shared.store;
        let Some((pack, start, len)) = rec.pack_range(offset, len) else {
            return read_chunk(&**store, account, rec, offset, len);
        };
        // A restore reads a pack's chunks one after another: from the second on, the
        // pack is read whole, once, rather than a request a chunk.
        let key = BlobKey::Pack(account, pack);
        let whole = self.shared.packs_read.get(key, || store.get(&key))?;
        let Some(bytes) = whole else {
            return read_chunk(&**store, account, rec, offset, len);
        };
        Ok(slice(&bytes, start, len).map(<[u8]>::to_vec))
    }

    // ---- snapshots ----

    pub fn list_snapshots(&self, account: AccountId) -> Result<Vec<SnapshotHeader>, RepoError> {
        self.shared.registry()?.list_snapshots(account)
    }

    pub fn get_snapshot(
        &self,
        account: AccountId,
        id: &SnapshotId,
    ) -> Result<Option<StoredSnapshot>, RepoError> {
        self.shared.registry()?.get_snapshot(account, id)
    }

    /// A committed snapshot's body (`None` for an id the account has no snapshot of,
    /// even if a body blob was left by a crash or a forget).
    pub fn get_snapshot_body(
        &self,
        account: AccountId,
        id: &SnapshotId,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        if self.shared.registry()?.get_snapshot(account, id)?.is_none() {
            return Ok(None);
        }
        self.shared.store.get(&BlobKey::SnapshotBody(account, *id))
    }

    /// Forgets a snapshot: its row, then its body. `false` if the account has none of
    /// this id. Its chunks stay until a collection finds them unreferenced.
    pub fn forget_snapshot(&self, account: AccountId, id: &SnapshotId) -> Result<bool, RepoError> {
        // Exclusive, so that no commit of the same id writes its body between the two.
        let mut all = self.shared.exclusive()?;
        if !all.registry()?.forget_snapshot(account, id)? {
            return Ok(false);
        }
        // A failure here leaves an orphan body, which collection removes.
        if let Err(e) = self
            .shared
            .store
            .delete(&BlobKey::SnapshotBody(account, *id))
        {
            tracing::warn!(error = %e, account, "cannot remove a forgotten snapshot's body");
        }
        Ok(true)
    }
}

/// The committer thread: rounds of group commit until every [`Repo`] is gone.
fn run_committer(shared: &Shared, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut bytes = first.bytes();
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH_ITEMS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(j) => {
                    bytes += j.bytes();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        let mut chunks = Vec::new();
        let mut snapshots = Vec::new();
        for j in jobs {
            match j {
                Job::Chunk {
                    account,
                    id,
                    data,
                    reply,
                } => chunks.push((account, id, data, reply)),
                Job::Snapshot {
                    account,
                    header,
                    chunks,
                    body,
                    reply,
                } => snapshots.push((account, header, chunks, body, reply)),
            }
        }
        let _round = shared
            .gc_lock
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        // The same rule across the nodes sharing the registry: no collection on any
        // of them deletes between this round's check and its rows.
        let mut all = match shared.cross_lock(false) {
            Ok(g) => g,
            Err(e) => {
                for (.., reply) in chunks {
                    let _ = reply.send(Err(e.clone()));
                }
                for (.., reply) in snapshots {
                    let _ = reply.send(Err(e.clone()));
                }
                continue;
            }
        };
        if !chunks.is_empty() {
            commit_chunks(shared, &mut all, chunks);
        }
        for (account, header, chunks, body, reply) in snapshots {
            let _ = reply.send(commit_snapshot(
                shared, &mut all, account, &header, &chunks, &body,
            ));
        }
    }
}

type ChunkReply = oneshot::Sender<Result<(), RepoError>>;

/// One chunk to store, and everyone waiting for it.
struct Pending {
    account: AccountId,
    id: ChunkId,
    data: Vec<u8>,
    replies: Vec<ChunkReply>,
}

impl Pending {
    fn answer(self, r: &Result<(), RepoError>) {
        for reply in self.replies {
            let _ = reply.send(r.clone());
        }
    }
}

/// A round's chunks: the held ones answered, the rest checked against the quota,
/// written in one batch and recorded in one transaction.
fn commit_chunks(
    shared: &Shared,
    all: &mut CrossLock<'_>,
    jobs: Vec<(AccountId, ChunkId, Vec<u8>, ChunkReply)>,
) {
    // The same chunk twice in a round is written once.
    let mut index: HashMap<(AccountId, ChunkId), usize> = HashMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    for (account, id, data, reply) in jobs {
        match index.get(&(account, id)) {
            Some(&i) => {
                shared.stats.chunks_held.fetch_add(1, Ordering::Relaxed);
                crate::metrics::metrics().chunks_deduplicated.inc();
                pending[i].replies.push(reply)
            }
            None => {
                index.insert((account, id), pending.len());
                pending.push(Pending {
                    account,
                    id,
                    data,
                    replies: vec![reply],
                });
            }
        }
    }
    let mut by_account: HashMap<AccountId, Vec<Pending>> = HashMap::new();
    for p in pending {
        by_account.entry(p.account).or_default().push(p);
    }
    let now = shared.now();
    let mut to_write = Vec::new();
    {
        let mut reg = match all.registry() {
            Ok(r) => r,
            Err(e) => {
                let e = Err(e);
                for p in by_account.into_values().flatten() {
                    p.answer(&e);
                }
                return;
            }
        };
        for (account, list) in by_account {
            let ids: Vec<ChunkId> = list.iter().map(|p| p.id).collect();
            let checked = reg
                .chunks_held(account, &ids, now)
                .and_then(|held| Ok((held, reg.usage(account)?)));
            let (held, usage) = match checked {
                Ok(x) => x,
                Err(e) => {
                    let e = Err(e);
                    list.into_iter().for_each(|p| p.answer(&e));
                    continue;
                }
            };
            let mut used = usage.stored_bytes;
            for (p, held) in list.into_iter().zip(held) {
                let len = p.data.len() as u64;
                if held {
                    shared.stats.chunks_held.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::metrics().chunks_deduplicated.inc();
                    p.answer(&Ok(()));
                } else if let Some(quota) = usage.quota.filter(|&q| used.saturating_add(len) > q) {
                    p.answer(&Err(RepoError::QuotaExceeded {
                        account,
                        used,
                        requested: len,
                        quota,
                    }));
                } else {
                    used += len;
                    to_write.push(p);
                }
            }
        }
    }
    if to_write.is_empty() {
        return;
    }
    let mut records = records_of(&to_write, now);
    let packs = pack_small(
        &to_write,
        &mut records,
        shared.pack_below.load(Ordering::Relaxed),
        now,
    );
    let mut items: Vec<(BlobKey, &[u8])> = packs
        .iter()
        .map(|(a, p, bytes)| (BlobKey::Pack(*a, p.id), &bytes[..]))
        .collect();
    items.extend(
        to_write
            .iter()
            .zip(&records)
            .filter(|(_, (_, r))| r.pack.is_none())
            .map(|(p, _)| (BlobKey::Chunk(p.account, p.id), &p.data[..])),
    );
    let pack_records: Vec<(AccountId, PackRecord)> =
        packs.iter().map(|(a, p, _)| (*a, *p)).collect();
    let t0 = std::time::Instant::now();
    let r = shared
        .store
        .put_batch(&items)
        .and_then(|()| all.registry()?.insert_chunks(&pack_records, &records));
    match &r {
        Ok(()) => {
            shared.stats.rounds.fetch_add(1, Ordering::Relaxed);
            let n = to_write.len() as u64;
            shared.stats.chunks_written.fetch_add(n, Ordering::Relaxed);
            let bytes: u64 = records.iter().map(|(_, r)| r.stored_len).sum();
            let m = crate::metrics::metrics();
            m.commit(4, t0.elapsed(), to_write.len(), bytes);
            m.chunks_ingested.inc_by(n);
            m.ingested(4, bytes);
        }
        Err(e) => {
            tracing::warn!(error = %e, chunks = to_write.len(), "a group commit of chunks failed")
        }
    }
    for p in to_write {
        p.answer(&r);
    }
}

/// Writes the chunks of `chunks` under `pack_below` bytes into packs, per account, and
/// points their `records` (in the same order) at them; returns the packs' records and
/// bytes.
fn pack_small(
    chunks: &[Pending],
    records: &mut [(AccountId, ChunkRecord)],
    pack_below: u64,
    now: i64,
) -> Vec<(AccountId, PackRecord, Vec<u8>)> {
    let mut done = Vec::new();
    if pack_below == 0 {
        return done;
    }
    let finish = |account: AccountId, id: PackId, b: PackBuilder| {
        let bytes = b.finish();
        let rec = PackRecord {
            id,
            stored_len: bytes.len() as u64,
            created_ms: now,
        };
        (account, rec, bytes)
    };
    let mut open: HashMap<AccountId, (PackId, PackBuilder)> = HashMap::new();
    for (p, (_, rec)) in chunks.iter().zip(records.iter_mut()) {
        if p.data.len() as u64 >= pack_below {
            continue;
        }
        let (id, b) = open
            .entry(p.account)
            .or_insert_with(|| (new_pack_id(), PackBuilder::new()));
        if !b.is_empty() && b.data_len() + p.data.len() > MAX_PACK_BYTES {
            let full = std::mem::take(b);
            done.push(finish(p.account, *id, full));
            *id = new_pack_id();
        }
        let offset = b.push(p.id, &p.data);
        rec.pack = Some(PackLoc { pack: *id, offset });
    }
    done.extend(open.into_iter().map(|(a, (id, b))| finish(a, id, b)));
    done
}

/// A new pack's id: random, so that two nodes never write the same one.
pub(super) fn new_pack_id() -> PackId {
    use rand::RngCore;
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    id
}

/// Up to `len` bytes from `offset` of the chunk `rec` records: from its own blob, or
/// from its range of a pack (`None` if the blob is gone, or the pack too short).
fn read_chunk(
    store: &dyn BlobStore,
    account: AccountId,
    rec: &ChunkRecord,
    offset: u64,
    len: u64,
) -> Result<Option<Vec<u8>>, RepoError> {
    if rec.pack.is_none() {
        return store.get_range(&BlobKey::Chunk(account, rec.id), offset, len);
    }
    let Some((pack, start, len)) = rec.pack_range(offset, len) else {
        return Ok(None);
    };
    let got = store.get_range(&BlobKey::Pack(account, pack), start, len)?;
    Ok(got.filter(|b| b.len() as u64 == len))
}

/// `len` bytes of `bytes` from `start`, if it holds them.
pub(super) fn slice(bytes: &[u8], start: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(start).ok()?;
    bytes.get(start..start.checked_add(usize::try_from(len).ok()?)?)
}

/// The registry's records of chunks about to be stored, with their scrub checksums.
fn records_of(chunks: &[Pending], now: i64) -> Vec<(AccountId, ChunkRecord)> {
    chunks
        .iter()
        .map(|p| {
            (
                p.account,
                ChunkRecord {
                    id: p.id,
                    stored_len: p.data.len() as u64,
                    hash: *blake3::hash(&p.data).as_bytes(),
                    stored_ms: now,
                    touched_ms: now,
                    damaged_ms: None,
                    pack: None,
                },
            )
        })
        .collect()
}

/// One snapshot commit: checked before its body is written (a different snapshot's
/// body is never overwritten, and a refused commit writes nothing), then the body
/// durably, then the row (which checks again, atomically).
fn commit_snapshot(
    shared: &Shared,
    all: &mut CrossLock<'_>,
    account: AccountId,
    header: &SnapshotHeader,
    chunks: &[ChunkId],
    body: &[u8],
) -> Result<CommitOutcome, RepoError> {
    // Two nodes committing one id at once: the second waits here, then finds the
    // first's row, and never writes over its body.
    all.registry()?.lock_snapshot(account, &header.id)?;
    let r = commit_snapshot_locked(shared, all, account, header, chunks, body);
    let unlocked = all
        .registry()
        .and_then(|mut reg| reg.unlock_snapshot(account, &header.id));
    if let Err(e) = unlocked {
        // A lost connection took the lock with it.
        tracing::warn!(error = %e, "cannot release a snapshot's lock");
    }
    r
}

fn commit_snapshot_locked(
    shared: &Shared,
    all: &mut CrossLock<'_>,
    account: AccountId,
    header: &SnapshotHeader,
    chunks: &[ChunkId],
    body: &[u8],
) -> Result<CommitOutcome, RepoError> {
    let body_hash = *blake3::hash(body).as_bytes();
    let now = shared.now();
    {
        let mut reg = all.registry()?;
        let usage = reg.usage(account)?;
        if let Some(old) = reg.get_snapshot(account, &header.id)? {
            return if old.body_hash == body_hash && old.chunks == chunks {
                Ok(CommitOutcome::AlreadyCommitted)
            } else {
                Err(RepoError::SnapshotExists)
            };
        }
        let held = reg.chunks_sound(account, chunks)?;
        let mut seen = std::collections::HashSet::new();
        let missing: Vec<ChunkId> = chunks
            .iter()
            .zip(held)
            .filter(|(id, held)| !held && seen.insert(**id))
            .map(|(id, _)| *id)
            .collect();
        if !missing.is_empty() {
            return Err(RepoError::MissingChunks(missing));
        }
        let len = body.len() as u64;
        if let Some(quota) = usage
            .quota
            .filter(|&q| usage.stored_bytes.saturating_add(len) > q)
        {
            return Err(RepoError::QuotaExceeded {
                account,
                used: usage.stored_bytes,
                requested: len,
                quota,
            });
        }
    }
    let t0 = std::time::Instant::now();
    shared
        .store
        .put_batch(&[(BlobKey::SnapshotBody(account, header.id), body)])?;
    let outcome = all
        .registry()?
        .commit_snapshot(account, header, chunks, &body_hash, now)?;
    if outcome == CommitOutcome::Committed {
        let m = crate::metrics::metrics();
        m.commit(4, t0.elapsed(), 1, body.len() as u64);
        m.snapshots_committed.inc();
        m.ingested(4, body.len() as u64);
    }
    Ok(outcome)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::repo::conformance::header;
    use futures_lite::future::block_on;
    use std::sync::atomic::AtomicI64;

    /// A repository in a temp dir with a clock the test moves.
    pub(crate) struct Fixture {
        pub dir: tempfile::TempDir,
        pub time: Arc<AtomicI64>,
    }

    impl Fixture {
        pub fn new() -> Fixture {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
                time: Arc::new(AtomicI64::new(1_000_000)),
            }
        }

        pub fn open(&self) -> Repo {
            let store = FsBlobStore::open(&self.dir.path().join("blobs")).unwrap();
            let reg = SqliteRegistry::open(&self.dir.path().join("repo.db")).unwrap();
            let time = self.time.clone();
            Repo::with_clock(
                Box::new(store),
                Box::new(reg),
                Arc::new(move || time.load(Ordering::Relaxed)),
            )
            .unwrap()
        }

        pub fn set_time(&self, ms: i64) {
            self.time.store(ms, Ordering::Relaxed);
        }

        pub fn blob_path(&self, key: &BlobKey) -> std::path::PathBuf {
            // The layout of `FsBlobStore` (checked in its own tests).
            let id = crate::repo::hex(key.id());
            let base = self
                .dir
                .path()
                .join("blobs")
                .join(key.account().to_string());
            match key {
                BlobKey::Chunk(..) => base.join("chunks").join(&id[..2]).join(id),
                BlobKey::SnapshotBody(..) => base.join("snapshots").join(id),
                BlobKey::Pack(..) => base.join("packs").join(id),
            }
        }
    }

    pub(crate) fn cid(n: u32) -> ChunkId {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        id[31] = 0x5a;
        id
    }

    pub(crate) fn data(n: u32) -> Vec<u8> {
        let len = 100 + (n as usize * 37) % 3000;
        (0..len).map(|i| (i as u32 ^ n) as u8).collect()
    }

    pub(crate) fn account(repo: &Repo, n: u8) -> AccountId {
        repo.create_account(&format!("user{n}"), &[n; 32], "laptop")
            .unwrap()
            .0
    }

    #[test]
    fn concurrent_puts_are_all_acknowledged_and_survive_reopening() {
        let fx = Fixture::new();
        let (a, b) = {
            let repo = fx.open();
            let (a, b) = (account(&repo, 1), account(&repo, 2));
            let threads: Vec<_> = (0..8u32)
                .map(|t| {
                    let repo = repo.clone();
                    std::thread::spawn(move || {
                        for i in 0..25u32 {
                            let n = t * 25 + i;
                            let acct = if t % 2 == 0 { a } else { b };
                            block_on(repo.put_chunk(acct, cid(n), data(n))).unwrap();
                            // The same chunk again, acknowledged as held.
                            if i % 5 == 0 {
                                block_on(repo.put_chunk(acct, cid(n), data(n))).unwrap();
                            }
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let stats = repo.commit_stats();
            assert_eq!((stats.chunks_written, stats.chunks_held), (200, 40));
            // Eight threads wait on the committer at once: its rounds take several each.
            assert!(stats.rounds < 150, "{stats:?}");
            (a, b)
        };
        let repo = fx.open();
        for t in 0..8u32 {
            let acct = if t % 2 == 0 { a } else { b };
            let ids: Vec<ChunkId> = (0..25).map(|i| cid(t * 25 + i)).collect();
            assert_eq!(repo.chunks_held(acct, &ids).unwrap(), vec![true; 25]);
            for (i, id) in ids.iter().enumerate() {
                let n = t * 25 + i as u32;
                assert_eq!(repo.get_chunk(acct, id).unwrap(), Some(data(n)));
            }
        }
        let total: u64 = (0..200u32)
            .filter(|n| (n / 25) % 2 == 0)
            .map(|n| data(n).len() as u64)
            .sum();
        let u = repo.usage(a).unwrap();
        assert_eq!((u.chunks, u.stored_bytes), (100, total));
    }

    #[test]
    fn a_chunk_put_again_is_not_rewritten() {
        use std::os::unix::fs::MetadataExt;
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        block_on(repo.put_chunk(a, cid(1), data(1))).unwrap();
        let path = fx.blob_path(&BlobKey::Chunk(a, cid(1)));
        let inode = std::fs::metadata(&path).unwrap().ino();
        block_on(repo.put_chunk(a, cid(1), data(1))).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        assert_eq!(repo.usage(a).unwrap().chunks, 1);
    }

    #[test]
    fn a_commit_naming_a_missing_chunk_is_refused_and_writes_nothing() {
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        block_on(repo.put_chunk(a, cid(1), data(1))).unwrap();
        let body = b"encrypted manifest".to_vec();
        let hdr = header(1, body.len() as u64);
        let r = block_on(repo.commit_snapshot(
            a,
            1,
            hdr.clone(),
            vec![cid(1), cid(2), cid(3), cid(2)],
            body.clone(),
        ));
        match r {
            Err(RepoError::MissingChunks(m)) => assert_eq!(m, vec![cid(2), cid(3)]),
            other => panic!("{other:?}"),
        }
        assert!(repo.list_snapshots(a).unwrap().is_empty());
        assert!(!fx.blob_path(&BlobKey::SnapshotBody(a, hdr.id)).exists());
        for n in [2, 3] {
            block_on(repo.put_chunk(a, cid(n), data(n))).unwrap();
        }
        let r = block_on(repo.commit_snapshot(
            a,
            1,
            hdr.clone(),
            vec![cid(1), cid(2), cid(3)],
            body.clone(),
        ));
        assert_eq!(r.unwrap(), CommitOutcome::Committed);
        assert_eq!(repo.get_snapshot_body(a, &hdr.id).unwrap(), Some(body));
        // A body of another length than the header says.
        let mut bad = header(2, 5);
        bad.body_len = 5;
        assert!(matches!(
            block_on(repo.commit_snapshot(a, 1, bad, vec![], vec![0; 4])),
            Err(RepoError::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_commit_is_idempotent_and_a_snapshot_never_replaced() {
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        let phone = repo
            .add_device(a, &[9; 32], "phone", Capabilities::BACKUP)
            .unwrap();
        block_on(repo.put_chunk(a, cid(1), data(1))).unwrap();
        let body = b"body one".to_vec();
        let mut hdr = header(1, body.len() as u64);
        hdr.device = 12345; // the server sets the committing device
        let commit = |hdr: &SnapshotHeader, body: &[u8]| {
            block_on(repo.commit_snapshot(a, phone, hdr.clone(), vec![cid(1)], body.to_vec()))
        };
        assert_eq!(commit(&hdr, &body).unwrap(), CommitOutcome::Committed);
        assert_eq!(
            commit(&hdr, &body).unwrap(),
            CommitOutcome::AlreadyCommitted
        );
        let other = b"body two".to_vec();
        assert!(matches!(
            commit(&hdr, &other),
            Err(RepoError::SnapshotExists)
        ));
        assert_eq!(repo.get_snapshot_body(a, &hdr.id).unwrap(), Some(body));
        let s = repo.get_snapshot(a, &hdr.id).unwrap().unwrap();
        assert_eq!(s.header.device, phone);
        assert_eq!(s.body_hash, *blake3::hash(b"body one").as_bytes());
    }

    #[test]
    fn accounts_are_isolated() {
        let fx = Fixture::new();
        let repo = fx.open();
        let (a, b) = (account(&repo, 1), account(&repo, 2));
        block_on(repo.put_chunk(a, cid(1), data(1))).unwrap();
        let body = b"alice's manifest".to_vec();
        let hdr = header(1, body.len() as u64);
        block_on(repo.commit_snapshot(a, 1, hdr.clone(), vec![cid(1)], body.clone())).unwrap();

        assert_eq!(repo.chunks_held(b, &[cid(1)]).unwrap(), vec![false]);
        assert_eq!(repo.get_chunk(b, &cid(1)).unwrap(), None);
        assert_eq!(repo.get_chunk_range(b, &cid(1), 0, 10).unwrap(), None);
        assert!(repo.list_snapshots(b).unwrap().is_empty());
        assert_eq!(repo.get_snapshot(b, &hdr.id).unwrap(), None);
        assert_eq!(repo.get_snapshot_body(b, &hdr.id).unwrap(), None);
        assert!(!repo.forget_snapshot(b, &hdr.id).unwrap());
        // Bob cannot commit a snapshot naming Alice's chunk, nor dedup against it.
        assert!(matches!(
            block_on(repo.commit_snapshot(b, 2, header(2, 0), vec![cid(1)], vec![])),
            Err(RepoError::MissingChunks(_))
        ));
        block_on(repo.put_chunk(b, cid(1), b"bob's bytes".to_vec())).unwrap();
        assert_eq!(repo.get_chunk(a, &cid(1)).unwrap(), Some(data(1)));
        assert_eq!(
            repo.get_chunk_range(a, &cid(1), 1, 3).unwrap(),
            Some(data(1)[1..4].to_vec())
        );
        // Alice's snapshot is untouched by all of it.
        assert_eq!(repo.get_snapshot_body(a, &hdr.id).unwrap(), Some(body));
        assert!(repo.forget_snapshot(a, &hdr.id).unwrap());
        assert!(!fx.blob_path(&BlobKey::SnapshotBody(a, hdr.id)).exists());
    }

    #[test]
    fn the_quota_is_checked_before_writing() {
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        repo.set_quota(a, Some(1000)).unwrap();
        block_on(repo.put_chunk(a, cid(1), vec![1; 600])).unwrap();
        match block_on(repo.put_chunk(a, cid(2), vec![2; 401])) {
            Err(RepoError::QuotaExceeded {
                used,
                requested,
                quota,
                ..
            }) => assert_eq!((used, requested, quota), (600, 401, 1000)),
            other => panic!("{other:?}"),
        }
        assert!(!fx.blob_path(&BlobKey::Chunk(a, cid(2))).exists());
        assert_eq!(repo.chunks_held(a, &[cid(2)]).unwrap(), vec![false]);
        // A held chunk costs nothing more; exactly up to the quota is fine.
        block_on(repo.put_chunk(a, cid(1), vec![1; 600])).unwrap();
        block_on(repo.put_chunk(a, cid(3), vec![3; 400])).unwrap();
        assert!(matches!(
            block_on(repo.commit_snapshot(a, 1, header(1, 1), vec![cid(1)], vec![0])),
            Err(RepoError::QuotaExceeded { .. })
        ));
        // Each put counts what the ones before it stored.
        repo.set_quota(a, Some(1500)).unwrap();
        let puts: Vec<_> = (10..14u32)
            .map(|n| repo.put_chunk(a, cid(n), vec![n as u8; 200]))
            .collect();
        let results: Vec<_> = puts.into_iter().map(block_on).collect();
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 2);
        assert_eq!(repo.usage(a).unwrap().stored_bytes, 1400);
        repo.set_quota(a, None).unwrap();
        block_on(repo.put_chunk(a, cid(2), vec![2; 401])).unwrap();
    }

    #[test]
    fn everything_survives_reopening() {
        let fx = Fixture::new();
        let body = b"manifest".to_vec();
        let hdr = header(1, body.len() as u64);
        let (a, d) = {
            let repo = fx.open();
            let (a, d) = repo.create_account("alice", &[1; 32], "laptop").unwrap();
            repo.set_wrapped_key(a, b"wrapped master key").unwrap();
            repo.set_quota(a, Some(1 << 30)).unwrap();
            block_on(repo.put_chunk(a, cid(1), data(1))).unwrap();
            block_on(repo.commit_snapshot(a, d, hdr.clone(), vec![cid(1)], body.clone())).unwrap();
            (a, d)
        };
        let repo = fx.open();
        assert_eq!(repo.account_by_name("alice").unwrap(), Some(a));
        assert_eq!(repo.device_by_key(&[1; 32]).unwrap().unwrap().id, d);
        assert_eq!(
            repo.wrapped_key(a).unwrap().as_deref(),
            Some(&b"wrapped master key"[..])
        );
        assert_eq!(repo.get_chunk(a, &cid(1)).unwrap(), Some(data(1)));
        assert_eq!(repo.list_snapshots(a).unwrap()[0].id, hdr.id);
        assert_eq!(repo.get_snapshot_body(a, &hdr.id).unwrap(), Some(body));
        assert_eq!(repo.usage(a).unwrap().quota, Some(1 << 30));
    }

    #[test]
    fn puts_after_a_failed_store_report_the_error_and_leave_nothing() {
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        // The account's chunk directory cannot be created: a file is in its way.
        let acct_dir = fx.dir.path().join("blobs").join(a.to_string());
        std::fs::write(&acct_dir, b"in the way").unwrap();
        assert!(matches!(
            block_on(repo.put_chunk(a, cid(1), data(1))),
            Err(RepoError::Io { .. })
        ));
        assert_eq!(repo.chunks_held(a, &[cid(1)]).unwrap(), vec![false]);
        assert_eq!(
            std::fs::read_dir(fx.dir.path().join("blobs/tmp"))
                .unwrap()
                .count(),
            0,
            "no temp file left"
        );
        std::fs::remove_file(&acct_dir).unwrap();
        block_on(repo.put_chunk(a, cid(1), data(1))).unwrap();
        assert_eq!(repo.chunks_held(a, &[cid(1)]).unwrap(), vec![true]);
    }
}

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// A fresh enrolment code (128 random bits as 26 base32 characters, in groups of
/// five) and its hash.
pub fn enrolment_code() -> (String, [u8; 32]) {
    use rand::RngCore;
    let mut raw = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut raw);
    let mut bits: u128 = u128::from_be_bytes(raw);
    let mut chars = Vec::with_capacity(26);
    for _ in 0..26 {
        chars.push(BASE32[(bits & 31) as usize]);
        bits >>= 5;
    }
    let plain: String = chars.iter().map(|c| *c as char).collect();
    let code = plain
        .as_bytes()
        .chunks(5)
        .map(|c| std::str::from_utf8(c).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("-");
    let hash = code_hash(&code);
    (code, hash)
}

/// The hash a code is kept under: SHA-256 of its characters without dashes or spaces,
/// upper-cased (so a code typed in lower case or without dashes works).
pub fn code_hash(code: &str) -> [u8; 32] {
    use sha2::Digest;
    let norm: String = code
        .chars()
        .filter(|c| !matches!(c, '-' | ' '))
        .map(|c| c.to_ascii_uppercase())
        .collect();
    sha2::Sha256::digest(norm.as_bytes()).into()
}

#[cfg(test)]
mod enrol_tests {
    use super::tests::Fixture;
    use super::*;

    #[test]
    fn an_enrolment_code_adds_one_device_once_before_it_expires() {
        let f = Fixture::new();
        let repo = f.open();
        let (a, _) = repo.create_account("alice", &[1; 32], "laptop").unwrap();
        let (code, expires) = repo
            .new_enrolment(a, Capabilities::BACKUP, std::time::Duration::from_secs(60))
            .unwrap();
        assert_eq!(expires, 1_000_000 + 60_000);
        assert_eq!(
            code.len(),
            26 + 5,
            "26 characters in groups of five: {code}"
        );
        // Typed in lower case and without dashes, it still works; only once.
        let typed = code.replace('-', "").to_lowercase();
        let d = repo
            .redeem_enrolment(&typed, &[2; 32], "phone")
            .unwrap()
            .unwrap();
        assert_eq!((d.account, d.caps), (a, Capabilities::BACKUP));
        assert_eq!(repo.device_by_key(&[2; 32]).unwrap().unwrap().id, d.id);
        assert!(repo
            .redeem_enrolment(&code, &[3; 32], "x")
            .unwrap()
            .is_none());
        // Expired.
        let (late, _) = repo
            .new_enrolment(a, Capabilities::ALL, std::time::Duration::from_secs(60))
            .unwrap();
        f.set_time(1_000_000 + 61_000);
        assert!(repo
            .redeem_enrolment(&late, &[4; 32], "x")
            .unwrap()
            .is_none());
        // A key that already belongs to a device cannot enrol again (and the code
        // stays unused: the transaction rolls back).
        f.set_time(1_000_000);
        let (again, _) = repo
            .new_enrolment(a, Capabilities::ALL, std::time::Duration::from_secs(60))
            .unwrap();
        assert!(matches!(
            repo.redeem_enrolment(&again, &[1; 32], "dup"),
            Err(RepoError::KeyTaken)
        ));
        assert!(repo
            .redeem_enrolment(&again, &[5; 32], "ok")
            .unwrap()
            .is_some());
        // The database holds the hash, never the code.
        drop(repo);
        let db = std::fs::read(f.dir.path().join("repo.db")).unwrap();
        assert!(!db.windows(10).any(|w| w == &code.as_bytes()[..10]));
    }
}
