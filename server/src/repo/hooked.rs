//! A file blob store with a hook (tests only): the fault or the other node's work to
//! inject at one moment of a store operation.

use super::blob::{BlobKey, BlobKind, BlobStore};
use super::{AccountId, FsBlobStore, RepoError};

/// When a [`HookedStore`] calls its hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Moment {
    /// After a batch was stored (an error then is a failure after the write).
    Stored,
    /// Before a blob is read (`get`, `get_range`).
    Reading,
    /// Before a batch delete.
    Deleting,
}

/// What a [`HookedStore`] runs: an error is the operation's answer.
pub(crate) type Hook =
    Box<dyn Fn(Moment, &[BlobKey], &FsBlobStore) -> Result<(), RepoError> + Send + Sync>;

/// A [`FsBlobStore`] that calls `hook` at each [`Moment`] with the keys concerned.
pub(crate) struct HookedStore {
    pub inner: FsBlobStore,
    pub hook: Hook,
}

impl BlobStore for HookedStore {
    fn put_batch(&self, items: &[(BlobKey, &[u8])]) -> Result<(), RepoError> {
        self.inner.put_batch(items)?;
        let keys: Vec<BlobKey> = items.iter().map(|(k, _)| *k).collect();
        (self.hook)(Moment::Stored, &keys, &self.inner)
    }
    fn get(&self, key: &BlobKey) -> Result<Option<Vec<u8>>, RepoError> {
        (self.hook)(Moment::Reading, &[*key], &self.inner)?;
        self.inner.get(key)
    }
    fn get_range(
        &self,
        key: &BlobKey,
        offset: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        (self.hook)(Moment::Reading, &[*key], &self.inner)?;
        self.inner.get_range(key, offset, len)
    }
    fn len(&self, key: &BlobKey) -> Result<Option<u64>, RepoError> {
        self.inner.len(key)
    }
    fn delete(&self, key: &BlobKey) -> Result<bool, RepoError> {
        self.inner.delete(key)
    }
    fn delete_batch(&self, keys: &[BlobKey]) -> Result<(), RepoError> {
        (self.hook)(Moment::Deleting, keys, &self.inner)?;
        self.inner.delete_batch(keys)
    }
    fn ready(&self) -> Result<(), RepoError> {
        self.inner.ready()
    }
    fn list(&self, account: AccountId, kind: BlobKind) -> Result<Vec<Vec<u8>>, RepoError> {
        self.inner.list(account, kind)
    }
}
