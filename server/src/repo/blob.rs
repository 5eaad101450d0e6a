//! Blob stores: opaque bytes by key, namespaced by account and kind.
//!
//! A store knows nothing of the registry: it keeps whatever it is given under the key
//! it is given. Isolation between accounts is in the key (every key names its account,
//! and an implementation must keep namespaces apart whatever the id bytes are), and in
//! the [`Repo`](super::Repo), which builds keys only from the authenticated account.

use super::{AccountId, ChunkId, PackId, RepoError, SnapshotId};

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// An encrypted chunk, named by its [`ChunkId`].
    Chunk,
    /// A snapshot's encrypted body (its manifest), named by its [`SnapshotId`].
    SnapshotBody,
    /// Several small chunks of one account in one blob, named by a random [`PackId`]
    /// (the layout is in [`super::pack`]).
    Pack,
}

impl BlobKind {
    /// Every kind, for listings that cover an account.
    pub const ALL: [BlobKind; 3] = [BlobKind::Chunk, BlobKind::SnapshotBody, BlobKind::Pack];

    /// The length of this kind's ids in bytes.
    pub fn id_len(self) -> usize {
        match self {
            BlobKind::Chunk => 32,
            BlobKind::SnapshotBody | BlobKind::Pack => 16,
        }
    }
}

/// A blob's key: its account, its kind and its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKey {
    Chunk(AccountId, ChunkId),
    SnapshotBody(AccountId, SnapshotId),
    Pack(AccountId, PackId),
}

impl BlobKey {
    pub fn account(&self) -> AccountId {
        match self {
            BlobKey::Chunk(a, _) | BlobKey::SnapshotBody(a, _) | BlobKey::Pack(a, _) => *a,
        }
    }

    /// The key of `kind` with these id bytes (`None` if they are not that kind's
    /// length).
    pub fn of(account: AccountId, kind: BlobKind, id: &[u8]) -> Option<BlobKey> {
        Some(match kind {
            BlobKind::Chunk => BlobKey::Chunk(account, id.try_into().ok()?),
            BlobKind::SnapshotBody => BlobKey::SnapshotBody(account, id.try_into().ok()?),
            BlobKind::Pack => BlobKey::Pack(account, id.try_into().ok()?),
        })
    }

    pub fn kind(&self) -> BlobKind {
        match self {
            BlobKey::Chunk(..) => BlobKind::Chunk,
            BlobKey::SnapshotBody(..) => BlobKind::SnapshotBody,
            BlobKey::Pack(..) => BlobKind::Pack,
        }
    }

    /// The id's bytes (32 for a chunk, 16 for a snapshot body or a pack).
    pub fn id(&self) -> &[u8] {
        match self {
            BlobKey::Chunk(_, id) => id,
            BlobKey::SnapshotBody(_, id) | BlobKey::Pack(_, id) => id,
        }
    }
}

/// Where blobs live. Every method blocks: call them from a blocking thread pool or a
/// dedicated thread, never from a reactor thread.
pub trait BlobStore: Send + Sync {
    /// Stores every item; when it returns `Ok`, every item is durable (survives a crash
    /// or power loss) under its key. A crash at any moment leaves each key with its old
    /// state or the complete new blob, never a partial one. Putting a key that exists
    /// replaces its bytes (so putting the same bytes again is harmless, and a damaged
    /// blob can be rewritten). On `Err` some items may have been stored.
    fn put_batch(&self, items: &[(BlobKey, &[u8])]) -> Result<(), RepoError>;

    /// The whole blob, or `None` if there is none under the key.
    fn get(&self, key: &BlobKey) -> Result<Option<Vec<u8>>, RepoError>;

    /// Up to `len` bytes from `offset` (fewer at the end of the blob, none from an
    /// offset at or past its end), or `None` if there is no blob.
    fn get_range(&self, key: &BlobKey, offset: u64, len: u64)
        -> Result<Option<Vec<u8>>, RepoError>;

    /// The blob's length, or `None` if there is none.
    fn len(&self, key: &BlobKey) -> Result<Option<u64>, RepoError>;

    /// Removes the blob; `true` if there was one. Not necessarily durable: after a crash
    /// a deleted blob may be back (an orphan that garbage collection removes again).
    fn delete(&self, key: &BlobKey) -> Result<bool, RepoError>;

    /// Removes every blob of `keys` (absent ones too). Not necessarily durable, as
    /// [`delete`](Self::delete). A store slow per request does them at once.
    fn delete_batch(&self, keys: &[BlobKey]) -> Result<(), RepoError> {
        keys.iter().try_for_each(|k| self.delete(k).map(|_| ()))
    }

    /// Removes every blob of the account (after its registry rows are gone).
    fn delete_account(&self, account: AccountId) -> Result<(), RepoError> {
        for kind in BlobKind::ALL {
            let keys: Vec<BlobKey> = self
                .list(account, kind)?
                .into_iter()
                .filter_map(|id| BlobKey::of(account, kind, &id))
                .collect();
            for part in keys.chunks(1000) {
                self.delete_batch(part)?;
            }
        }
        Ok(())
    }

    /// `Ok` if the store takes writes now (the readiness probe): the file system
    /// store makes and removes a file, the object store asks for its bucket.
    fn ready(&self) -> Result<(), RepoError>;

    /// The ids of every blob of `kind` in `account`, in no particular order.
    fn list(&self, account: AccountId, kind: BlobKind) -> Result<Vec<Vec<u8>>, RepoError>;
}
