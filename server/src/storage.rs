//! Where files live: one directory per client under the storage root, and temp files
//! that become visible only when complete, verified and durable.
//!
//! A transfer gets a temp file in `<root>/.incoming/`, allocated to its full ciphertext
//! size up front (so a full disk is an error now, never a SIGBUS later) and mapped with
//! memmap2; the session decrypts packets straight into the mapping. On CRC_OK the
//! mapping is dropped, the file cut to the plaintext size, `fdatasync`ed, renamed to
//! `<root>/<client id hex>/<name>` and the directory `fsync`ed, in that order, before
//! the ACK is sent. Anything else (CRC_RETRY, CRC_ABORT, an error, a dropped connection)
//! removes the temp file, and start-up removes whatever a crash left in `.incoming/`.
//!
//! Every function here blocks: runtimes call them from a blocking thread pool, never
//! from a reactor thread.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cyberbackup_protocol::session::FileSink;
use cyberbackup_protocol::{client_id_hex, ClientId};
use memmap2::MmapMut;

/// Name of the temp directory under the root; client directories are 32 hex digits, so
/// it cannot collide with one.
pub const INCOMING: &str = ".incoming";

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{requested} more bytes would put uploads in flight over the {limit}-byte budget (--max-pending-bytes)")]
    Busy { requested: u64, limit: u64 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The storage root.
#[derive(Debug)]
pub struct Storage {
    root: PathBuf,
    incoming: PathBuf,
    seq: AtomicU64,
    /// Bytes allocated to temp files now, and the most allowed: a peer cannot make the
    /// server reserve the disk with tiny packets that announce huge files.
    pending: Arc<AtomicU64>,
    max_pending: u64,
    /// Client directories whose entry in the root is known to be durable.
    durable_dirs: Mutex<HashSet<ClientId>>,
}

impl Storage {
    /// Opens (creating if needed) the root and removes leftovers of a crash.
    pub fn open(root: &Path, max_pending: u64) -> Result<Self, StorageError> {
        fs::create_dir_all(root).map_err(io_err("creating storage root", root))?;
        let incoming = root.join(INCOMING);
        fs::create_dir_all(&incoming).map_err(io_err("creating", &incoming))?;
        let mut removed = 0usize;
        for entry in fs::read_dir(&incoming).map_err(io_err("reading", &incoming))? {
            let entry = entry.map_err(io_err("reading", &incoming))?;
            let path = entry.path();
            let r = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            r.map_err(io_err("removing leftover", &path))?;
            removed += 1;
        }
        if removed > 0 {
            tracing::warn!(removed, dir = %incoming.display(), "removed unfinished uploads left by a crash");
            sync_dir(&incoming)?;
        }
        Ok(Self {
            root: root.to_owned(),
            incoming,
            seq: AtomicU64::new(0),
            pending: Arc::new(AtomicU64::new(0)),
            max_pending,
            durable_dirs: Mutex::new(HashSet::new()),
        })
    }

    /// The storage root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of a client's files.
    pub fn client_dir(&self, client: &ClientId) -> PathBuf {
        self.root.join(client_id_hex(client))
    }

    /// Bytes held by temp files now.
    pub fn pending_bytes(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Creates a temp file of `len` bytes, fully allocated, and maps it.
    pub fn create_pending(&self, len: u64) -> Result<PendingFile, StorageError> {
        let limit = self.max_pending;
        self.pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                cur.checked_add(len).filter(|&n| n <= limit)
            })
            .map_err(|_| StorageError::Busy {
                requested: len,
                limit,
            })?;
        let reservation = Reservation {
            counter: self.pending.clone(),
            bytes: len,
        };
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .incoming
            .join(format!("{}-{n}.part", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("creating temp file", &path))?;
        let pending = PendingFile {
            map: None,
            file: Some(file),
            path,
            _reservation: reservation,
        };
        let file = pending.file.as_ref().expect("just set");
        if len > 0 {
            nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, len as i64)
                .map_err(|e| io_err("allocating", &pending.path)(io::Error::from(e)))?;
        }
        // SAFETY: the file was just created with create_new in our private incoming
        // directory (mode 0600) and nobody else opens it; its length is fixed (allocated
        // above) until the mapping is dropped in `commit`, so the mapping never outlives
        // or exceeds the file.
        let map = unsafe { MmapMut::map_mut(file) }.map_err(io_err("mapping", &pending.path))?;
        let mut pending = pending;
        pending.map = Some(map);
        Ok(pending)
    }

    /// Makes a finished file durable and visible under its final name. The file keeps
    /// `size` bytes (the plaintext; the mapping also held the padding block).
    pub fn commit(
        &self,
        mut pending: PendingFile,
        client: &ClientId,
        name: &str,
        size: u64,
    ) -> Result<PathBuf, StorageError> {
        let dir = self.client_dir(client);
        let known = self
            .durable_dirs
            .lock()
            .map(|d| d.contains(client))
            .unwrap_or(false);
        if !known {
            // Make the directory's own entry durable before any file in it is
            // acknowledged (once per client and process; concurrent first commits
            // both sync, which is harmless).
            fs::create_dir_all(&dir).map_err(io_err("creating client directory", &dir))?;
            sync_dir(&self.root)?;
            if let Ok(mut d) = self.durable_dirs.lock() {
                d.insert(*client);
            }
        }
        drop(pending.map.take());
        let file = pending.file.take().expect("a pending file has its file");
        file.set_len(size)
            .map_err(io_err("truncating", &pending.path))?;
        file.sync_data().map_err(io_err("syncing", &pending.path))?;
        drop(file);
        let target = dir.join(name);
        fs::rename(&pending.path, &target).map_err(io_err("renaming to", &target))?;
        // Renamed: the temp path no longer exists, nothing to clean.
        pending.path = PathBuf::new();
        sync_dir(&dir)?;
        Ok(target)
    }
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// Bytes counted against the pending budget until dropped.
#[derive(Debug)]
struct Reservation {
    counter: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A temp file being reassembled, mapped into memory. Dropping it removes the file.
#[derive(Debug)]
pub struct PendingFile {
    map: Option<MmapMut>,
    file: Option<File>,
    path: PathBuf,
    _reservation: Reservation,
}

impl FileSink for PendingFile {
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        drop(self.map.take());
        drop(self.file.take());
        if !self.path.as_os_str().is_empty() {
            if let Err(e) = fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temp file");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_makes_the_file_visible_and_drop_removes_temps() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), 1 << 30).unwrap();
        let mut p = s.create_pending(32).unwrap();
        assert_eq!(p.bytes().len(), 32);
        p.bytes_mut()[..5].copy_from_slice(b"hello");
        let path = s.commit(p, &[1; 16], "a.txt", 5).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        assert_eq!(fs::read_dir(dir.path().join(INCOMING)).unwrap().count(), 0);

        let p = s.create_pending(16).unwrap();
        assert_eq!(fs::read_dir(dir.path().join(INCOMING)).unwrap().count(), 1);
        drop(p);
        assert_eq!(fs::read_dir(dir.path().join(INCOMING)).unwrap().count(), 0);
    }

    #[test]
    fn leftovers_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(INCOMING)).unwrap();
        fs::write(dir.path().join(INCOMING).join("1-0.part"), b"junk").unwrap();
        let _s = Storage::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(fs::read_dir(dir.path().join(INCOMING)).unwrap().count(), 0);
    }

    #[test]
    fn the_pending_budget_is_enforced_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), 100).unwrap();
        let a = s.create_pending(64).unwrap();
        assert!(matches!(
            s.create_pending(64),
            Err(StorageError::Busy { .. })
        ));
        assert_eq!(s.pending_bytes(), 64);
        drop(a);
        assert_eq!(s.pending_bytes(), 0);
        let b = s.create_pending(96).unwrap();
        s.commit(b, &[3; 16], "x", 1).unwrap();
        assert_eq!(s.pending_bytes(), 0);
    }

    #[test]
    fn empty_file_commits() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), 1 << 30).unwrap();
        let p = s.create_pending(16).unwrap();
        let path = s.commit(p, &[2; 16], "empty", 0).unwrap();
        assert_eq!(fs::metadata(path).unwrap().len(), 0);
    }
}
