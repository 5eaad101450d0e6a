//! Where files live: one directory per client under the storage root, and temp files
//! that become visible only when complete, verified and durable.
//!
//! A transfer gets a temp file in `<root>/.incoming/NN/`, allocated to its full ciphertext
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

/// Temp files are spread over this many subdirectories of `.incoming` (`00`..`3f`):
/// creating them all in one directory serialises every upload on that directory's
/// lock and crowds ext4's inode allocator into one block group.
pub const SPREAD: usize = 64;

/// Temp files now in `.incoming` (for tests and checks).
pub fn temp_files(root: &Path) -> usize {
    let Ok(dirs) = fs::read_dir(root.join(INCOMING)) else {
        return 0;
    };
    dirs.filter_map(|d| d.ok())
        .map(|d| {
            if d.path().is_dir() {
                fs::read_dir(d.path()).map(|f| f.count()).unwrap_or(0)
            } else {
                1
            }
        })
        .sum()
}

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
            let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let fan_out = is_dir
                && entry
                    .file_name()
                    .to_str()
                    .and_then(|n| u8::from_str_radix(n, 16).ok().filter(|_| n.len() == 2))
                    .is_some_and(|i| (i as usize) < SPREAD);
            if fan_out {
                for inner in fs::read_dir(&path).map_err(io_err("reading", &path))? {
                    let inner = inner.map_err(io_err("reading", &path))?.path();
                    let r = if inner.is_dir() {
                        fs::remove_dir_all(&inner)
                    } else {
                        fs::remove_file(&inner)
                    };
                    r.map_err(io_err("removing leftover", &inner))?;
                    removed += 1;
                }
            } else {
                let r = if is_dir {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                r.map_err(io_err("removing leftover", &path))?;
                removed += 1;
            }
        }
        for i in 0..SPREAD {
            let d = incoming.join(format!("{i:02x}"));
            fs::create_dir_all(&d).map_err(io_err("creating", &d))?;
        }
        if removed > 0 {
            tracing::warn!(removed, dir = %incoming.display(), "removed unfinished uploads left by a crash");
            nix::unistd::sync();
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
            .join(format!("{:02x}", n as usize % SPREAD))
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
            written_back: 0,
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
        pending: PendingFile,
        client: &ClientId,
        name: &str,
        size: u64,
    ) -> Result<PathBuf, StorageError> {
        self.commit_batch(vec![CommitItem {
            pending,
            client: *client,
            name: name.to_owned(),
            size,
        }])
        .pop()
        .unwrap_or_else(|| {
            Err(io_err("committing", &self.root)(io::Error::other(
                "empty batch",
            )))
        })
    }

    /// Commits files that finished together (group commit): each is cut to its size;
    /// then their data is made durable, they are renamed into place, and the renames
    /// (and any new client directory) are made durable. For a few files that is
    /// `fdatasync` per file and `fsync` per directory; from [`GROUP_MIN`] files on it is
    /// one `syncfs` before the renames and one after, however many files there are.
    /// Every result is durable and visible before it is returned.
    pub fn commit_batch(&self, items: Vec<CommitItem>) -> Vec<Result<PathBuf, StorageError>> {
        let group = items.len() >= GROUP_MIN;
        let mut new_dirs = Vec::new();
        // 1. directories, unmap, truncate (and sync each file when not grouping)
        let mut staged: Vec<Result<(PendingFile, PathBuf, PathBuf, ClientId), StorageError>> =
            items
                .into_iter()
                .map(|mut it| {
                    let dir = self.client_dir(&it.client);
                    let known = self
                        .durable_dirs
                        .lock()
                        .map(|d| d.contains(&it.client))
                        .unwrap_or(false);
                    if !known {
                        fs::create_dir_all(&dir)
                            .map_err(io_err("creating client directory", &dir))?;
                        new_dirs.push(it.client);
                    }
                    drop(it.pending.map.take());
                    let file = it.pending.file.take().expect("a pending file has its file");
                    file.set_len(it.size)
                        .map_err(io_err("truncating", &it.pending.path))?;
                    if !group {
                        file.sync_data()
                            .map_err(io_err("syncing", &it.pending.path))?;
                    }
                    drop(file);
                    let target = dir.join(&it.name);
                    Ok((it.pending, dir, target, it.client))
                })
                .collect();
        // 2. all the data at once
        if group {
            if let Err(e) = self.syncfs() {
                return staged.into_iter().map(|_| Err(e.duplicate())).collect();
            }
        }
        // 3. into place
        for st in staged.iter_mut() {
            if let Ok((pending, _, target, _)) = st {
                match fs::rename(&pending.path, &*target) {
                    // Renamed: the temp path no longer exists, nothing to clean.
                    Ok(()) => pending.path = PathBuf::new(),
                    Err(e) => *st = Err(io_err("renaming to", target)(e)),
                }
            }
        }
        // 4. the renames (and new directories) durable
        let durable = if group {
            self.syncfs()
        } else {
            let mut dirs: Vec<&PathBuf> = staged
                .iter()
                .filter_map(|s| s.as_ref().ok().map(|x| &x.1))
                .collect();
            dirs.dedup();
            let mut r = Ok(());
            if !new_dirs.is_empty() {
                r = sync_dir(&self.root);
            }
            for d in dirs {
                if r.is_ok() {
                    r = sync_dir(d);
                }
            }
            r
        };
        if let Err(e) = durable {
            return staged.into_iter().map(|_| Err(e.duplicate())).collect();
        }
        if let Ok(mut d) = self.durable_dirs.lock() {
            d.extend(new_dirs);
        }
        staged
            .into_iter()
            .map(|s| s.map(|(_, _, target, _)| target))
            .collect()
    }

    fn syncfs(&self) -> Result<(), StorageError> {
        let root = File::open(&self.root).map_err(io_err("opening", &self.root))?;
        nix::unistd::syncfs(root.as_raw_fd())
            .map_err(|e| io_err("syncing the file system of", &self.root)(io::Error::from(e)))
    }

    /// Starts the group-commit thread: files that finish together are committed
    /// together.
    pub fn start_committer(self: &Arc<Self>) -> Committer {
        let (tx, rx) = std::sync::mpsc::channel::<(CommitItem, CommitReply)>();
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || {
                while let Some(batch) = crate::queue::recv_batch(&rx, 1024) {
                    let (items, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    for (r, reply) in me.commit_batch(items).into_iter().zip(replies) {
                        let _ = reply.send(r);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the committer thread");
        }
        Committer { tx }
    }
}

/// A file to commit.
#[derive(Debug)]
pub struct CommitItem {
    pub pending: PendingFile,
    pub client: ClientId,
    pub name: String,
    pub size: u64,
}

type CommitReply = futures_channel::oneshot::Sender<Result<PathBuf, StorageError>>;

/// From this many files finishing together on, a commit syncs the file system once
/// instead of each file.
pub const GROUP_MIN: usize = 3;

/// The handle of the group-commit thread; clone it freely.
#[derive(Debug, Clone)]
pub struct Committer {
    tx: std::sync::mpsc::Sender<(CommitItem, CommitReply)>,
}

impl Committer {
    /// Queues a file; the answer comes when it is durable and visible (or failed).
    pub async fn commit(&self, item: CommitItem) -> Result<PathBuf, StorageError> {
        let (reply, rx) = futures_channel::oneshot::channel();
        if self.tx.send((item, reply)).is_err() {
            return Err(StorageError::Io {
                what: "committing",
                path: PathBuf::new(),
                source: io::Error::other("the committer thread has stopped"),
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(StorageError::Io {
                what: "committing",
                path: PathBuf::new(),
                source: io::Error::other("the committer thread has stopped"),
            })
        })
    }
}

impl StorageError {
    /// The same error for another file of a failed group.
    fn duplicate(&self) -> StorageError {
        match self {
            StorageError::Busy { requested, limit } => StorageError::Busy {
                requested: *requested,
                limit: *limit,
            },
            StorageError::Io { what, path, source } => StorageError::Io {
                what,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
        }
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
    /// Bytes already handed to the kernel for write-back.
    written_back: u64,
    _reservation: Reservation,
}

/// Settled bytes are handed to the kernel for write-back in steps of this size...
const WRITEBACK_STEP: u64 = 8 << 20;
/// ...in files of at least this size.
const WRITEBACK_MIN_FILE: u64 = 64 << 20;

impl FileSink for PendingFile {
    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.map.as_deref_mut().unwrap_or(&mut [])
    }
    /// Starts write-back of what is settled, in 8 MiB steps of files of 64 MiB and
    /// more, while the rest of the file is still arriving: the `fdatasync` at commit then has little left to do,
    /// instead of the whole file (overlapping the disk with the network).
    fn settled(&mut self, end: u64) {
        // Only large files: many concurrent small ones are better left to the kernel
        // and their own fdatasync (kicking each costs a syscall on the reactor thread
        // and contends for the device queue).
        let len = self.map.as_ref().map_or(0, |m| m.len() as u64);
        if len < WRITEBACK_MIN_FILE || end < self.written_back + WRITEBACK_STEP {
            return;
        }
        let Some(file) = self.file.as_ref() else {
            return;
        };
        // SAFETY: sync_file_range takes no pointers; the descriptor belongs to `file`,
        // which is open for the whole call. SYNC_FILE_RANGE_WRITE only starts
        // write-out of dirty pages in the range and never changes the file's content.
        let r = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                self.written_back as libc::off64_t,
                (end - self.written_back) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r == 0 {
            self.written_back = end;
        }
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
        assert_eq!(temp_files(dir.path()), 0);

        let p = s.create_pending(16).unwrap();
        assert_eq!(temp_files(dir.path()), 1);
        drop(p);
        assert_eq!(temp_files(dir.path()), 0);
    }

    #[test]
    fn leftovers_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(INCOMING).join("07")).unwrap();
        fs::write(dir.path().join(INCOMING).join("1-0.part"), b"junk").unwrap();
        fs::write(
            dir.path().join(INCOMING).join("07").join("1-7.part"),
            b"junk",
        )
        .unwrap();
        let _s = Storage::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(temp_files(dir.path()), 0);
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
    fn a_group_commit_stores_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), 1 << 30).unwrap();
        let items: Vec<CommitItem> = (0..5u8)
            .map(|i| {
                let mut p = s.create_pending(16).unwrap();
                p.bytes_mut()[0] = i;
                CommitItem {
                    pending: p,
                    client: [i % 2; 16],
                    name: format!("f{i}"),
                    size: 1,
                }
            })
            .collect();
        let paths: Vec<PathBuf> = s
            .commit_batch(items)
            .into_iter()
            .map(|r| r.unwrap())
            .collect();
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(fs::read(p).unwrap(), vec![i as u8]);
        }
        assert_eq!(temp_files(dir.path()), 0);
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
