//! A pool of registry connections: each [`Registry`] is one connection (`&mut self`, one
//! request at a time), so a node that serves several requests at once (its shards,
//! the committer, collection, the admin endpoint) keeps several.
//!
//! A request checks one out ([`RegistryPool::get`]) and gives it back when the guard is
//! dropped. Connections are opened when first needed, up to the pool's size, and a
//! request that finds them all busy waits for one. A registry only one process uses
//! (SQLite) has a pool of one: its writes are one at a time anyway, and its calls are
//! short. A connection that broke reconnects by itself on its next call (the
//! PostgreSQL registry does), so the pool does not check them.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::registry::Registry;
use super::RepoError;

/// Opens one more connection.
pub type Opener = Box<dyn Fn() -> Result<Box<dyn Registry>, RepoError> + Send + Sync>;

/// Registry connections, checked out one request at a time.
pub struct RegistryPool {
    state: Mutex<State>,
    freed: Condvar,
    size: usize,
    opener: Option<Opener>,
    shared: bool,
}

struct State {
    idle: Vec<Box<dyn Registry>>,
    /// Connections open (idle or checked out), and being opened.
    open: usize,
}

impl std::fmt::Debug for RegistryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryPool")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl RegistryPool {
    /// A pool of the one connection `registry`.
    pub fn single(registry: Box<dyn Registry>) -> RegistryPool {
        RegistryPool::new(registry, None, 1)
    }

    /// A pool of up to `size` connections (at least 1): `first`, and more opened by
    /// `opener` when every open one is busy.
    pub fn new(first: Box<dyn Registry>, opener: Option<Opener>, size: usize) -> RegistryPool {
        let shared = first.is_shared();
        RegistryPool {
            state: Mutex::new(State {
                idle: vec![first],
                open: 1,
            }),
            freed: Condvar::new(),
            size: if opener.is_some() { size.max(1) } else { 1 },
            opener,
            shared,
        }
    }

    /// Whether other processes share the registry ([`Registry::is_shared`]).
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// The most connections the pool opens.
    pub fn size(&self) -> usize {
        self.size
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing the state's holders do can panic between two consistent states.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection for the caller alone until the guard is dropped: an idle one, a
    /// new one if fewer than the pool's size are open, else the first given back.
    pub fn get(&self) -> Result<Pooled<'_>, RepoError> {
        let mut st = self.lock();
        loop {
            if let Some(reg) = st.idle.pop() {
                return Ok(Pooled {
                    pool: self,
                    reg: Some(reg),
                });
            }
            if let (Some(open), true) = (&self.opener, st.open < self.size) {
                st.open += 1;
                drop(st);
                // Opened without the pool's lock: others check out and give back
                // meanwhile.
                return match open() {
                    Ok(reg) => Ok(Pooled {
                        pool: self,
                        reg: Some(reg),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            st = self.freed.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A checked-out connection; given back to the pool when dropped.
pub struct Pooled<'a> {
    pool: &'a RegistryPool,
    reg: Option<Box<dyn Registry>>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Box<dyn Registry>;

    fn deref(&self) -> &Self::Target {
        self.reg
            .as_ref()
            .expect("a checked-out connection until dropped")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.reg
            .as_mut()
            .expect("a checked-out connection until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(reg) = self.reg.take() else { return };
        // A connection that may still hold an advisory lock (a release that failed, a
        // holder that panicked between taking and releasing) is closed, which makes
        // the database release it; given back, it would hold the lock for ever, and
        // with it every node's collection (and behind that, every round). Otherwise a
        // panic leaves it usable: a registry call that panics leaves no transaction
        // open (it rolls back on drop).
        let mut st = self.pool.lock();
        if reg.holds_locks() && self.pool.opener.is_some() {
            st.open -= 1;
            drop(st);
            tracing::warn!("a registry connection still holding a lock is closed");
            drop(reg);
        } else {
            st.idle.push(reg);
        }
        self.pool.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::SqliteRegistry;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn sqlite(dir: &std::path::Path) -> Box<dyn Registry> {
        Box::new(SqliteRegistry::open(&dir.join("repo.db")).unwrap())
    }

    /// Up to its size, a busy pool opens a connection; beyond, a request waits for
    /// one given back; a failed open is not counted as open.
    #[test]
    fn opens_up_to_its_size_then_waits_for_one_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, o, f) = (dir.path().to_owned(), opened.clone(), fail.clone());
        let opener: Opener = Box::new(move || {
            if f.load(Ordering::SeqCst) {
                return Err(RepoError::Stopped);
            }
            o.fetch_add(1, Ordering::SeqCst);
            Ok(sqlite(&d))
        });
        let pool = RegistryPool::new(sqlite(dir.path()), Some(opener), 3);
        assert!(!pool.is_shared());
        let a = pool.get().unwrap();
        let b = pool.get().unwrap();
        fail.store(true, Ordering::SeqCst);
        assert!(matches!(pool.get(), Err(RepoError::Stopped)));
        fail.store(false, Ordering::SeqCst);
        let mut c = pool.get().unwrap();
        assert_eq!(opened.load(Ordering::SeqCst), 2, "the first, then two more");
        c.ping().unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let mut d = pool.get().unwrap();
                d.ping().unwrap();
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiter.is_finished(), "all three are checked out");
            drop(a);
            waiter.join().unwrap();
        });
        drop((b, c));
        assert_eq!(opened.load(Ordering::SeqCst), 2, "no fourth");
        assert_eq!(pool.lock().idle.len(), 3);
    }
}
