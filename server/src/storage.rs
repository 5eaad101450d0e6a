//! Where files live: one directory per client under the storage root, and temp files
//! that become visible only when complete, verified and durable.
//!
//! A transfer gets a temp file in `<root>/.incoming/NN/`, allocated to its full ciphertext
//! size up front when it is 1 MiB or more (so a full disk is an error now, never
//! halfway through). The session
//! writes the decrypted bytes at their offsets (out-of-order packets land at their
//! place; the file is the reassembly buffer): files of at least `--direct-io-min-size`
//! through a page-aligned stage that the session decrypts into and that goes out with
//! `O_DIRECT` (`Direct`), smaller ones with `pwrite` through the page cache. On
//! CRC_OK the stage is written out, the file cut to the plaintext size, `fdatasync`ed,
//! renamed to `<root>/<client id hex>/<name>` and the directory `fsync`ed, in that
//! order, before the ACK is sent. Anything else (CRC_RETRY, CRC_ABORT, an error, a
//! dropped connection) removes the temp file, and start-up removes whatever a crash
//! left in `.incoming/`.
//!
//! Why not a shared memory mapping of the temp file, nor plain `pwrite`: profiled under
//! 64 concurrent uploads, both spent most of the server's CPU in the page cache, on a
//! fresh cache page per 4 KiB (a mapping faults each page in, and ext4 zero-fills it
//! first; `pwrite` copies into it): 3-4 core-seconds per GiB through the mapping. The
//! direct stage is reused and the device reads it by DMA, which cut that to about a
//! quarter (benches/results/latest.md; the closing note of issue 7).
//!
//! Every function here but the [`FileSink`] methods blocks: runtimes call them from a
//! blocking thread pool, never from a reactor thread. The sink's `pwrite`s go to the
//! page cache and run on the connection's thread.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use std::os::unix::fs::FileExt;

use cyberbackup_protocol::common::{client_id_hex, ClientId};
use cyberbackup_protocol::v3::session::{sink_range, FileSink};
use memmap2::MmapMut;

pub mod ring;

/// Name of the temp directory under the root; client directories are 32 hex digits, so
/// it cannot collide with one.
pub const INCOMING: &str = ".incoming";

/// Marker in `.incoming` while a server runs on the root: found at start-up, it means
/// the last run did not end cleanly.
const RUNNING: &str = "RUNNING";

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
        .filter(|d| d.file_name() != RUNNING)
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
    /// Temp files at least this large are written with `O_DIRECT`; 0: never.
    direct_min: u64,
    writers: Arc<Writers>,
    /// The last run on this root did not end cleanly (a crash or a kill).
    unclean: bool,
}

impl Storage {
    /// Opens (creating if needed) the root and removes leftovers of a crash.
    pub fn open(root: &Path, max_pending: u64) -> Result<Self, StorageError> {
        fs::create_dir_all(root).map_err(io_err("creating storage root", root))?;
        let incoming = root.join(INCOMING);
        fs::create_dir_all(&incoming).map_err(io_err("creating", &incoming))?;
        let mut removed = 0usize;
        let marker = incoming.join(RUNNING);
        let unclean = marker.exists();
        for entry in fs::read_dir(&incoming).map_err(io_err("reading", &incoming))? {
            let entry = entry.map_err(io_err("reading", &incoming))?;
            let path = entry.path();
            if path == marker {
                continue;
            }
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
        File::create(&marker).map_err(io_err("creating", &marker))?;
        Ok(Self {
            root: root.to_owned(),
            incoming,
            seq: AtomicU64::new(0),
            pending: Arc::new(AtomicU64::new(0)),
            max_pending,
            durable_dirs: Mutex::new(HashSet::new()),
            direct_min: DIRECT_MIN_DEFAULT,
            writers: Arc::new(Writers::new()),
            unclean: unclean || removed > 0,
        })
    }

    /// Whether the last run on this root ended without [`close`](Self::close) (a crash
    /// or a kill): files renamed into place just before it may lack their registry row.
    pub fn unclean_start(&self) -> bool {
        self.unclean
    }

    /// Marks a clean end of the run (after every connection is done).
    pub fn close(&self) {
        let marker = self.incoming.join(RUNNING);
        if let Err(e) = fs::remove_file(&marker) {
            tracing::warn!(error = %e, path = %marker.display(), "cannot remove the run marker");
        }
    }

    /// Temp files of at least `min` bytes bypass the page cache (`O_DIRECT`); 0 turns
    /// direct I/O off.
    pub fn with_direct_io(mut self, min: u64) -> Self {
        self.direct_min = min;
        self
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

    /// Creates a temp file for `len` bytes, fully allocated from [`PREALLOCATE_MIN`] on.
    /// A smaller one starts empty and grows with its writes through the page cache,
    /// where ext4's delayed allocation reserves blocks at `write` time, so a full disk
    /// is still an error at once. Allocating it, or even sizing it, would cost journal
    /// updates per small file (sizing with `ftruncate` took 7% of the server's CPU with
    /// 64 clients sending 4 KiB files); reads past what was written see zeros, as in a
    /// sparse file.
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
        let mut pending = PendingFile {
            file: Some(file),
            direct: None,
            len,
            path,
            written_back: 0,
            tail: (len < PREALLOCATE_MIN && len >= TAIL as u64).then_some([0; TAIL]),
            _reservation: reservation,
        };
        let file = pending.file.as_ref().expect("just set");
        if len >= PREALLOCATE_MIN {
            nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, len as i64)
                .map_err(|e| io_err("allocating", &pending.path)(io::Error::from(e)))?;
        }
        if self.direct_min > 0 && len >= self.direct_min {
            pending.direct = Direct::open(&pending.path, file, &self.writers).map(Box::new);
            if pending.direct.is_some() {
                // The stage writes whole blocks; it keeps no tail back.
                pending.tail = None;
            }
        }
        Ok(pending)
    }

    /// Makes a finished file durable and visible under its final name. The file keeps
    /// `size` bytes (the plaintext; the temp file also held the padding block).
    pub fn commit(
        &self,
        pending: PendingFile,
        client: &ClientId,
        name: &str,
        size: u64,
    ) -> Result<Stored, StorageError> {
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
    pub fn commit_batch(&self, items: Vec<CommitItem>) -> Vec<Result<Stored, StorageError>> {
        let group = items.len() >= GROUP_MIN;
        let mut batch = self.prepare(items, !group);
        // 2. all the data at once
        if group {
            if let Err(e) = self.syncfs() {
                return batch.fail(&e);
            }
        }
        // 3. into place
        batch.rename();
        // 4. the renames (and new directories) durable
        let durable = if group {
            self.syncfs()
        } else {
            let mut dirs: Vec<&PathBuf> = batch
                .files
                .iter()
                .filter_map(|s| s.as_ref().ok().map(|x| &x.1))
                .collect();
            dirs.dedup();
            let mut r = Ok(());
            if !batch.new_dirs.is_empty() {
                r = sync_dir(&self.root);
            }
            for d in dirs {
                if r.is_ok() {
                    r = sync_dir(d);
                }
            }
            r
        };
        self.finish(batch, durable)
    }

    /// Step 1 of a commit: client directories, the stage written out, each file cut to
    /// its size, and synced one by one when `sync_each`.
    fn prepare(&self, items: Vec<CommitItem>, sync_each: bool) -> Batch {
        let mut new_dirs = Vec::new();
        let files = items
            .into_iter()
            .map(|mut it| {
                let dir = self.client_dir(&it.client);
                let known = self
                    .durable_dirs
                    .lock()
                    .map(|d| d.contains(&it.client))
                    .unwrap_or(false);
                if !known {
                    fs::create_dir_all(&dir).map_err(io_err("creating client directory", &dir))?;
                    new_dirs.push(it.client);
                }
                it.pending
                    .flush()
                    .map_err(io_err("writing", &it.pending.path))?;
                drop(it.pending.direct.take());
                let file = it.pending.file.take().expect("a pending file has its file");
                it.pending
                    .cut(&file, it.size)
                    .map_err(io_err("truncating", &it.pending.path))?;
                if sync_each {
                    file.sync_data()
                        .map_err(io_err("syncing", &it.pending.path))?;
                }
                let inode = file
                    .metadata()
                    .map_err(io_err("reading the metadata of", &it.pending.path))?
                    .ino();
                drop(file);
                let target = Stored {
                    path: dir.join(&it.name),
                    inode,
                };
                Ok((it.pending, dir, target, it.client))
            })
            .collect();
        Batch { files, new_dirs }
    }

    /// The last step: the outcome of each file, given whether its rename is durable.
    fn finish(
        &self,
        batch: Batch,
        durable: Result<(), StorageError>,
    ) -> Vec<Result<Stored, StorageError>> {
        if let Err(e) = durable {
            return batch.fail(&e);
        }
        if let Ok(mut d) = self.durable_dirs.lock() {
            d.extend(batch.new_dirs);
        }
        batch
            .files
            .into_iter()
            .map(|s| s.map(|(_, _, target, _)| target))
            .collect()
    }

    /// The committer thread's loop, a pipeline of group commits. Each file needs two
    /// syncs: one for its data before its rename, one for the rename. Files that
    /// arrived while the last sync ran are cut to size, the files whose data that
    /// sync made durable are renamed, and then one `syncfs` serves both: the new
    /// files' data and the renames. One `syncfs` per round instead of two, so twice
    /// the files per second for the same sync time, and each file still waits for
    /// two syncs before its answer.
    ///
    /// A batch of fewer than [`GROUP_MIN`] files with no other in the pipeline is
    /// committed on its own ([`commit_batch`](Self::commit_batch): `fdatasync` per
    /// file and `fsync` per directory), so a lone upload does not sync the whole
    /// file system.
    fn run_committer(&self, rx: &std::sync::mpsc::Receiver<(CommitItem, CommitReply)>) {
        // Files whose data is durable, to be renamed in the next round.
        let mut synced: Option<(Batch, Vec<CommitReply>)> = None;
        loop {
            let arrived = if synced.is_some() {
                let mut more = Vec::new();
                while let Ok(x) = rx.try_recv() {
                    more.push(x);
                }
                more
            } else {
                match crate::queue::recv_batch(rx, 1024) {
                    Some(batch) => batch,
                    None => return,
                }
            };
            let (items, replies): (Vec<_>, Vec<_>) = arrived.into_iter().unzip();
            if synced.is_none() && items.len() < GROUP_MIN {
                for (r, reply) in self.commit_batch(items).into_iter().zip(replies) {
                    let _ = reply.send(r);
                }
                continue;
            }
            let fresh = (!items.is_empty()).then(|| (self.prepare(items, false), replies));
            let renamed = synced.take().map(|(mut batch, replies)| {
                batch.rename();
                (batch, replies)
            });
            let r = self.syncfs();
            if let Some((batch, replies)) = renamed {
                let durable = r.as_ref().map(|_| ()).map_err(StorageError::duplicate);
                for (r, reply) in self.finish(batch, durable).into_iter().zip(replies) {
                    let _ = reply.send(r);
                }
            }
            match (fresh, r) {
                (Some(f), Ok(())) => synced = Some(f),
                (Some((batch, replies)), Err(e)) => {
                    for (r, reply) in batch.fail(&e).into_iter().zip(replies) {
                        let _ = reply.send(r);
                    }
                }
                (None, _) => {}
            }
        }
    }

    fn syncfs(&self) -> Result<(), StorageError> {
        let root = File::open(&self.root).map_err(io_err("opening", &self.root))?;
        nix::unistd::syncfs(root.as_raw_fd())
            .map_err(|e| io_err("syncing the file system of", &self.root)(io::Error::from(e)))
    }

    /// Starts the group-commit thread: files that finish together are committed
    /// together, see `Storage::run_committer`.
    pub fn start_committer(self: &Arc<Self>) -> Committer {
        let (tx, rx) = std::sync::mpsc::channel::<(CommitItem, CommitReply)>();
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || me.run_committer(&rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the committer thread");
        }
        Committer { tx }
    }
}

/// A committed file: where it is, and its inode number (for the registry row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub path: PathBuf,
    pub inode: u64,
}

/// A file to commit.
#[derive(Debug)]
pub struct CommitItem {
    pub pending: PendingFile,
    pub client: ClientId,
    pub name: String,
    pub size: u64,
}

type CommitReply = futures_channel::oneshot::Sender<Result<Stored, StorageError>>;

/// Files on their way through a commit: (temp file, client directory, final path and
/// inode, client), or why one failed; and the client directories it created.
struct Batch {
    files: Vec<Result<(PendingFile, PathBuf, Stored, ClientId), StorageError>>,
    new_dirs: Vec<ClientId>,
}

impl Batch {
    /// Step 3: every file still in the running into place.
    fn rename(&mut self) {
        for st in self.files.iter_mut() {
            if let Ok((pending, _, target, _)) = st {
                match fs::rename(&pending.path, &target.path) {
                    // Renamed: the temp path no longer exists, nothing to clean.
                    Ok(()) => pending.path = PathBuf::new(),
                    Err(e) => *st = Err(io_err("renaming to", &target.path)(e)),
                }
            }
        }
    }

    /// The same error for every file (temp files not yet renamed are removed).
    fn fail(self, e: &StorageError) -> Vec<Result<Stored, StorageError>> {
        self.files.into_iter().map(|_| Err(e.duplicate())).collect()
    }
}

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
    pub async fn commit(&self, item: CommitItem) -> Result<Stored, StorageError> {
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

/// A temp file being reassembled. Dropping it removes the file.
#[derive(Debug)]
pub struct PendingFile {
    file: Option<File>,
    /// Large files: the `O_DIRECT` descriptor and its staging buffer.
    direct: Option<Box<Direct>>,
    /// Size allocated (the ciphertext size).
    len: u64,
    path: PathBuf,
    /// Bytes already handed to the kernel for write-back.
    written_back: u64,
    /// Small files: the last [`TAIL`] bytes of the sink, kept here rather than written.
    /// They are the final cipher block, which holds the padding; at commit only the
    /// plaintext part of it is written, so the file ends at its size without the
    /// `ftruncate` that would cut the padding off (shrinking a file with dirty pages
    /// made ext4 write them out and wait, a third of the committer thread's time).
    tail: Option<[u8; TAIL]>,
    _reservation: Reservation,
}

/// Temp files of at least this size are allocated in full when they are created.
pub const PREALLOCATE_MIN: u64 = 1 << 20;

/// The AES block: the part of a small file's sink that [`PendingFile`] holds back.
const TAIL: usize = 16;

/// Temp files of at least this size are written with `O_DIRECT` by default.
pub const DIRECT_MIN_DEFAULT: u64 = 1 << 20;
/// Offsets, lengths and buffers of direct I/O are multiples of this (the largest
/// logical block size of common devices).
const DIRECT_ALIGN: u64 = 4096;
/// Bytes staged per file before a direct write. Measured with 64 uploads of 16 MiB
/// (benches/scripts/load.sh glommio -c 64 --size 16MiB -d 8), 1 MiB stages moved
/// 1036-1130 MB/s at 0.98-1.18 core-s/GiB, against 663-958 MB/s at 1.10-1.67 with
/// 256 and 512 KiB, for at most 3 MiB of stages per upload (one filling, two writing).
const STAGE: usize = 1 << 20;
/// Direct writes of one file in flight at once (each holds a stage).
const MAX_IN_FLIGHT: usize = 2;
/// Threads that carry out direct writes for all files.
const WRITERS: usize = 4;
/// Free stages kept for the next files (64 MiB at most). A stage that is mapped anew
/// costs a page fault and a zeroed page per 4 KiB on its first fill: with a fresh
/// stage per file, 3 MiB of every 16 MiB upload went through fresh pages (10% of the
/// server's CPU in scenario 2 was page faults and unmaps).
const SPARE_STAGES: usize = 64;

/// Direct I/O for one temp file: a second descriptor opened with `O_DIRECT` and
/// page-aligned staging buffers that collect the session's in-order writes into whole
/// aligned blocks. Writing through the page cache touches a fresh cache page per 4 KiB;
/// stages are reused, and the device reads them by DMA.
///
/// A full stage goes to the calling thread's io_uring ([`ring`]; glommio shards have
/// one) or else to the [`Writers`] pool, and the session goes on filling the next one, so the disk works while the connection reads and decrypts (at most
/// [`MAX_IN_FLIGHT`] writes per file; the next full stage waits for one to finish).
/// Whole aligned blocks go out through the direct descriptor; a partial block at
/// either end of a run (a packet size that is not a multiple of 4 KiB, the CBC
/// fix-up of an out-of-order packet, the file's tail) goes through the ordinary
/// descriptor. Before any write that does not continue the stage and before any read,
/// the writes in flight are waited for and the stage is written out, so writes reach
/// the file in the session's order; the kernel keeps the two descriptors coherent (a
/// direct write first writes back and then drops the cached pages in its range).
#[derive(Debug)]
struct Direct {
    fd: Arc<File>,
    /// The ordinary descriptor, for the writers' fallback.
    cached: Arc<File>,
    writers: Arc<Writers>,
    stage: Stage,
    /// File offset of `stage[0]`, always a multiple of [`DIRECT_ALIGN`].
    start: u64,
    /// Bytes of the stage in use, from `start` on.
    filled: usize,
    flight: Arc<Flight>,
    /// The ring this file's writes went to (the first one's thread's; see [`ring`]).
    ring: Option<Arc<ring::Ring>>,
}

/// The writes of one file in flight, the stages they free, and the first error.
#[derive(Debug, Default)]
struct Flight {
    state: Mutex<FlightState>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct FlightState {
    in_flight: usize,
    error: Option<io::Error>,
    /// The file system opened the file with `O_DIRECT` but refused a direct write:
    /// stages go out through the cache from then on.
    refused: bool,
}

/// `Direct::start` when no run is open: aligned, and no write can continue it.
const NO_RUN: u64 = u64::MAX - DIRECT_ALIGN + 1;

impl Direct {
    /// Opens `path` again with `O_DIRECT`; `None` where the file system refuses it (the
    /// file is then written through the page cache).
    fn open(path: &Path, cached: &File, writers: &Arc<Writers>) -> Option<Direct> {
        let fd = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(
                |e| tracing::debug!(error = %e, "no direct I/O; writing through the page cache"),
            )
            .ok()?;
        Some(Direct {
            fd: Arc::new(fd),
            cached: Arc::new(cached.try_clone().ok()?),
            writers: writers.clone(),
            stage: writers.stages.take().ok()?,
            start: 0,
            filled: 0,
            flight: Arc::default(),
            ring: None,
        })
    }

    fn write_at(&mut self, file: &File, mut offset: u64, mut data: &[u8]) -> io::Result<()> {
        if offset != self.start + self.filled as u64 {
            self.flush(file)?;
            // Up to the next aligned offset through the cache, then a new run.
            let head = ((DIRECT_ALIGN - offset % DIRECT_ALIGN) % DIRECT_ALIGN)
                .min(data.len() as u64) as usize;
            if head > 0 {
                file.write_all_at(&data[..head], offset)?;
                offset += head as u64;
                data = &data[head..];
            }
            if data.is_empty() {
                return Ok(());
            }
            self.start = offset;
        }
        while !data.is_empty() {
            let n = (STAGE - self.filled).min(data.len());
            self.stage[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            self.staged(n)?;
        }
        Ok(())
    }

    /// Free room of the stage when `offset` continues it (or starts a new aligned run).
    fn stage(&mut self, offset: u64, max: usize) -> Option<&mut [u8]> {
        if offset != self.start + self.filled as u64 {
            if self.filled > 0 || !offset.is_multiple_of(DIRECT_ALIGN) {
                return None;
            }
            self.start = offset;
        }
        let end = (self.filled + max).min(STAGE);
        Some(&mut self.stage[self.filled..end])
    }

    /// `n` bytes were put into the room [`stage`](Self::stage) gave; a full stage goes
    /// to the writers.
    fn staged(&mut self, n: usize) -> io::Result<()> {
        self.filled += n;
        debug_assert!(self.filled <= STAGE);
        if self.filled < STAGE {
            return Ok(());
        }
        // Room first, then the next stage: a file holds at most MAX_IN_FLIGHT + 1.
        drop(self.wait(MAX_IN_FLIGHT - 1)?);
        let next = self.writers.stages.take()?;
        // (returns at once: only this thread adds writes to this file)
        self.wait(MAX_IN_FLIGHT - 1)?.in_flight += 1;
        let full = std::mem::replace(&mut self.stage, next);
        let job = WriteJob {
            fd: self.fd.clone(),
            cached: self.cached.clone(),
            buf: full,
            offset: self.start,
            flight: self.flight.clone(),
        };
        // Through this thread's ring if it has one (and the file takes direct writes),
        // else the writer threads.
        let refused = self.flight.state.lock().map(|s| s.refused).unwrap_or(true);
        if self.ring.is_none() && !refused {
            self.ring = ring::current();
        }
        match self.ring.as_ref() {
            Some(r) if !refused => {
                if let Err(job) = r.submit(job) {
                    self.writers.submit(job);
                }
            }
            _ => self.writers.submit(job),
        }
        self.start += STAGE as u64;
        self.filled = 0;
        Ok(())
    }

    /// Waits until at most `n` writes are in flight; returns the first error any had.
    fn wait(&self, n: usize) -> io::Result<std::sync::MutexGuard<'_, FlightState>> {
        let mut st = self
            .flight
            .state
            .lock()
            .map_err(|_| io::Error::other("a direct writer panicked"))?;
        if let Some(ring) = self.ring.as_ref() {
            // Writes on a ring complete only when someone reaps it (a file whose
            // direct writes were refused midway may also have some with the writers,
            // which `progress` waits for on the condition variable).
            while st.in_flight > n {
                drop(st);
                ring.progress(&self.flight);
                st = self
                    .flight
                    .state
                    .lock()
                    .map_err(|_| io::Error::other("a direct writer panicked"))?;
            }
        }
        while st.in_flight > n {
            st = self
                .flight
                .done
                .wait(st)
                .map_err(|_| io::Error::other("a direct writer panicked"))?;
        }
        match st.error.take() {
            Some(e) => Err(e),
            None => Ok(st),
        }
    }

    /// Waits for the writes in flight, then writes out the stage: whole blocks
    /// directly, a partial last block through the cache.
    fn flush(&mut self, file: &File) -> io::Result<()> {
        let refused = self.wait(0)?.refused;
        let whole = self.filled / DIRECT_ALIGN as usize * DIRECT_ALIGN as usize;
        if whole > 0 {
            let r = write_direct(&self.fd, file, &self.stage[..whole], self.start, refused)?;
            if r {
                if let Ok(mut st) = self.flight.state.lock() {
                    st.refused = true;
                }
            }
        }
        if self.filled > whole {
            file.write_all_at(&self.stage[whole..self.filled], self.start + whole as u64)?;
        }
        // The next run starts wherever its first write is.
        self.start += whole as u64;
        if self.filled > whole {
            self.start = NO_RUN;
        }
        self.filled = 0;
        Ok(())
    }
}

/// Writes `buf` at `offset` with `O_DIRECT`, or through the cache when `refused` or
/// when the file system refuses it now (EINVAL); returns whether it refused now.
fn write_direct(
    fd: &File,
    cached: &File,
    buf: &[u8],
    offset: u64,
    refused: bool,
) -> io::Result<bool> {
    if !refused {
        match fd.write_all_at(buf, offset) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!(error = %e, "direct write refused; writing through the page cache");
                cached.write_all_at(buf, offset)?;
                return Ok(true);
            }
            r => return r.map(|()| false),
        }
    }
    cached.write_all_at(buf, offset).map(|()| false)
}

/// One full stage on its way to the disk.
struct WriteJob {
    fd: Arc<File>,
    cached: Arc<File>,
    buf: Stage,
    offset: u64,
    flight: Arc<Flight>,
}

/// The threads that carry out direct writes, shared by every file (started with the
/// first direct file).
#[derive(Debug)]
pub struct Writers {
    tx: Mutex<Option<std::sync::mpsc::Sender<WriteJob>>>,
    stages: Arc<Stages>,
}

/// Free stages, shared by every file: at most [`SPARE_STAGES`], plus any a ring has
/// registered (those are never unmapped while the pool lives; see [`ring`]).
#[derive(Debug, Default)]
struct Stages(Mutex<Vec<Spare>>);

/// A free stage in the pool.
#[derive(Debug)]
struct Spare {
    block: Arc<Block>,
    half: usize,
    id: u64,
    registered: bool,
}

/// Ids of stages, unique in the process (rings know their registered stages by id).
static STAGE_IDS: AtomicU64 = AtomicU64::new(0);

/// The size of a transparent huge page on x86_64 and of the blocks stages are cut from.
const HUGE_PAGE: usize = 2 << 20;

/// Memory for two stages: [`HUGE_PAGE`] bytes aligned to a huge page, which the
/// kernel is asked to back with one (`MADV_HUGEPAGE`).
///
/// With small pages a 1 MiB direct write is 256 separate pages: the kernel maps each
/// one for the device, and this VM's virtio disk (at most 254 segments a request)
/// splits every such write in two. From a huge page it is one physically contiguous
/// segment. Measured with `-c 64 --size 16MiB -d 8`, `io_uring_enter` fell from 12.6%
/// to 6.9% of the server's samples. Where the kernel has no huge page to give, the
/// block is backed by small pages and works as before.
struct Block {
    /// Mapped with room to spare, so that an aligned [`HUGE_PAGE`] fits inside; only
    /// that part is ever touched.
    _map: MmapMut,
    /// The start of the aligned part. Each half belongs to one [`Stage`] or [`Spare`]
    /// at a time, and nothing else reads or writes through this pointer.
    base: std::ptr::NonNull<u8>,
}

// SAFETY: `Block` only keeps its mapping alive and remembers where the aligned part
// begins; it never reads or writes the memory itself. Access goes through the stage
// that owns a half, one owner per half, so sharing or sending a `Block` between
// threads cannot create aliasing access.
unsafe impl Send for Block {}
// SAFETY: as for `Send`: `&Block` gives no access to the memory.
unsafe impl Sync for Block {}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block").field("base", &self.base).finish()
    }
}

impl Block {
    fn new() -> io::Result<Arc<Block>> {
        let mut map = MmapMut::map_anon(2 * HUGE_PAGE)?;
        let off = (map.as_ptr() as usize).wrapping_neg() & (HUGE_PAGE - 1);
        if let Err(e) = map.advise_range(memmap2::Advice::HugePage, off, HUGE_PAGE) {
            tracing::debug!(error = %e, "no transparent huge pages for direct-write stages");
        }
        let base = std::ptr::NonNull::from(&mut map[off]);
        Ok(Arc::new(Block { _map: map, base }))
    }
}

impl Stages {
    /// A free stage, or a new one; it comes back here when dropped.
    fn take(self: &Arc<Self>) -> io::Result<Stage> {
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let spare = match pool.pop() {
            Some(s) => s,
            None => {
                // A new block: one half is taken now, the other waits in the pool.
                let block = Block::new()?;
                pool.push(Spare {
                    block: block.clone(),
                    half: 1,
                    id: STAGE_IDS.fetch_add(1, Ordering::Relaxed),
                    registered: false,
                });
                Spare {
                    block,
                    half: 0,
                    id: STAGE_IDS.fetch_add(1, Ordering::Relaxed),
                    registered: false,
                }
            }
        };
        drop(pool);
        Ok(Stage {
            block: Some(spare.block),
            half: spare.half,
            id: spare.id,
            registered: spare.registered,
            home: self.clone(),
        })
    }
}

/// A page-aligned buffer of [`STAGE`] bytes (half of a [`Block`]), lent by [`Stages`].
#[derive(Debug)]
struct Stage {
    /// `None` only while being dropped.
    block: Option<Arc<Block>>,
    half: usize,
    id: u64,
    /// A ring holds this stage's pages registered: it must stay mapped while the pool
    /// lives (the ring holds the pool).
    registered: bool,
    home: Arc<Stages>,
}

impl Stage {
    fn ptr(&self) -> Option<*mut u8> {
        let b = self.block.as_ref()?;
        // SAFETY: `half` is 0 or 1, so this stays inside the block's aligned part.
        Some(unsafe { b.base.as_ptr().add(self.half * STAGE) })
    }
}

impl std::ops::Deref for Stage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self.ptr() {
            // SAFETY: this stage owns these `STAGE` bytes (one half of its block, which
            // the `Arc` keeps mapped); no other stage or spare holds the same half.
            Some(p) => unsafe { std::slice::from_raw_parts(p, STAGE) },
            None => &[],
        }
    }
}

impl std::ops::DerefMut for Stage {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self.ptr() {
            // SAFETY: as in `deref`; `&mut self` makes this the only borrow of the half.
            Some(p) => unsafe { std::slice::from_raw_parts_mut(p, STAGE) },
            None => &mut [],
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            let mut spare = self.home.0.lock().unwrap_or_else(|p| p.into_inner());
            if spare.len() < SPARE_STAGES || self.registered {
                spare.push(Spare {
                    block,
                    half: self.half,
                    id: self.id,
                    registered: self.registered,
                });
            }
        }
    }
}

impl Writers {
    fn new() -> Writers {
        Writers {
            tx: Mutex::new(None),
            stages: Arc::default(),
        }
    }

    fn submit(&self, job: WriteJob) {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let sender = tx.get_or_insert_with(|| {
            let (tx, rx) = std::sync::mpsc::channel::<WriteJob>();
            let rx = Arc::new(Mutex::new(rx));
            for i in 0..WRITERS {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("direct-writer-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock().map(|r| r.recv()) {
                            Ok(Ok(job)) => job,
                            _ => return,
                        };
                        job.run();
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a direct writer thread");
                }
            }
            tx
        });
        if let Err(std::sync::mpsc::SendError(job)) = sender.send(job) {
            // No writer is left: write here rather than lose the stage.
            job.run();
        }
    }
}

impl WriteJob {
    fn run(self) {
        let refused = self.flight.state.lock().map(|s| s.refused).unwrap_or(false);
        let r = write_direct(&self.fd, &self.cached, &self.buf, self.offset, refused);
        self.done(r);
    }

    /// Books the completion of this job's write on a ring: `res` is the byte count or
    /// a negated errno. A short write is finished here, and a refused one (EINVAL: the
    /// file system takes no direct writes after all) is written through the cache.
    fn completed(self, res: i32) {
        let r = if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            if e.raw_os_error() == Some(libc::EINVAL) {
                tracing::debug!(error = %e, "direct write refused; writing through the page cache");
                self.cached
                    .write_all_at(&self.buf, self.offset)
                    .map(|()| true)
            } else {
                Err(e)
            }
        } else {
            let n = (res as usize).min(self.buf.len());
            if n < self.buf.len() {
                write_direct(
                    &self.fd,
                    &self.cached,
                    &self.buf[n..],
                    self.offset + n as u64,
                    false,
                )
            } else {
                Ok(false)
            }
        };
        self.done(r);
    }

    fn done(self, r: io::Result<bool>) {
        let mut st = self.flight.state.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(now_refused) => st.refused |= now_refused,
            Err(e) => {
                st.error.get_or_insert(e);
            }
        }
        st.in_flight -= 1;
        drop(st);
        self.flight.done.notify_all();
    }
}

/// Settled bytes are handed to the kernel for write-back in steps of this size...
const WRITEBACK_STEP: u64 = 8 << 20;
/// ...in files of at least this size.
const WRITEBACK_MIN_FILE: u64 = 64 << 20;

impl FileSink for PendingFile {
    fn len(&self) -> u64 {
        self.len
    }
    fn write_at(&mut self, offset: u64, mut data: &[u8]) -> io::Result<()> {
        sink_range(self.len as usize, offset, data.len())?;
        let file = self.file.as_ref().ok_or_else(handed_over)?;
        if let Some(tail) = self.tail.as_mut() {
            let start = self.len - TAIL as u64;
            if offset + data.len() as u64 > start {
                let (body, end) = data.split_at(start.saturating_sub(offset) as usize);
                let at = offset.saturating_sub(start) as usize;
                tail[at..at + end.len()].copy_from_slice(end);
                data = body;
            }
            return file.write_all_at(data, offset);
        }
        match self.direct.as_mut() {
            Some(d) => d.write_at(file, offset, data),
            None => file.write_all_at(data, offset),
        }
    }
    fn stage(&mut self, offset: u64, max: usize) -> Option<&mut [u8]> {
        sink_range(self.len as usize, offset, max).ok()?;
        self.direct.as_mut()?.stage(offset, max)
    }
    fn staged(&mut self, n: usize) -> io::Result<()> {
        match self.direct.as_mut() {
            Some(d) => d.staged(n),
            None => Err(io::Error::other("nothing was staged")),
        }
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        sink_range(self.len as usize, offset, buf.len())?;
        let file = self.file.as_ref().ok_or_else(handed_over)?;
        if let Some(d) = self.direct.as_mut() {
            d.flush(file)?;
        }
        if let Some(tail) = self.tail.as_ref() {
            let start = self.len - TAIL as u64;
            if offset + buf.len() as u64 > start {
                let (body, end) = buf.split_at_mut(start.saturating_sub(offset) as usize);
                let at = offset.saturating_sub(start) as usize;
                end.copy_from_slice(&tail[at..at + end.len()]);
                return read_or_zeros(file, body, offset);
            }
        }
        read_or_zeros(file, buf, offset)
    }
    /// Starts write-back of what is settled, in 8 MiB steps of buffered files of 64 MiB and
    /// more, while the rest of the file is still arriving: the `fdatasync` at commit
    /// then has little left to do (overlapping the disk with the network).
    fn settled(&mut self, end: u64) {
        // Only large files: many concurrent small ones are better left to the kernel
        // and their own fdatasync (kicking each costs a syscall on the reactor thread
        // and contends for the device queue).
        if self.direct.is_some()
            || self.len < WRITEBACK_MIN_FILE
            || end < self.written_back + WRITEBACK_STEP
        {
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

impl PendingFile {
    /// Makes `file` (this file's descriptor) end at `size`: the plaintext part of the
    /// held-back tail is written where the sink ends in it, else the file is cut.
    fn cut(&self, file: &File, size: u64) -> io::Result<()> {
        if size > self.len {
            return Err(io::Error::other(format!(
                "a size of {size} bytes is beyond the {} the file holds",
                self.len
            )));
        }
        if let Some(tail) = self.tail.as_ref() {
            let start = self.len - TAIL as u64;
            let on_disk = file.metadata()?.len();
            if size >= start && on_disk <= start {
                let kept = &tail[..(size - start) as usize];
                if !kept.is_empty() {
                    // (ends the file at `size`, even were the body short of `start`)
                    return file.write_all_at(kept, start);
                }
                if on_disk == size {
                    return Ok(());
                }
            }
        }
        file.set_len(size)
    }

    /// Writes out what the direct-I/O stage still holds (before the file is synced).
    fn flush(&mut self) -> io::Result<()> {
        if let (Some(d), Some(file)) = (self.direct.as_mut(), self.file.as_ref()) {
            d.flush(file)?;
        }
        Ok(())
    }
}

/// Reads `buf.len()` bytes at `offset`; what lies past the end of the file reads as
/// zeros (a small temp file is only as long as its furthest write).
fn read_or_zeros(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn handed_over() -> io::Error {
    io::Error::other("the temp file was already handed over")
}

impl Drop for PendingFile {
    fn drop(&mut self) {
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
        assert_eq!(p.len(), 32);
        p.write_at(0, b"hello").unwrap();
        assert!(
            p.write_at(30, b"abc").is_err(),
            "a write past the end is refused"
        );
        let path = s.commit(p, &[1; 16], "a.txt", 5).unwrap().path;
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        assert_eq!(temp_files(dir.path()), 0);

        let p = s.create_pending(16).unwrap();
        assert_eq!(temp_files(dir.path()), 1);
        drop(p);
        assert_eq!(temp_files(dir.path()), 0);
    }

    #[test]
    fn a_run_that_did_not_close_is_unclean_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!Storage::open(dir.path(), 1 << 30).unwrap().unclean_start());
        // dropped without close: a crash, as far as the next run can tell
        let s = Storage::open(dir.path(), 1 << 30).unwrap();
        assert!(s.unclean_start());
        s.close();
        assert!(!Storage::open(dir.path(), 1 << 30).unwrap().unclean_start());
        assert_eq!(temp_files(dir.path()), 0, "the marker is no temp file");
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
                p.write_at(0, &[i]).unwrap();
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
            .map(|r| r.unwrap().path)
            .collect();
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(fs::read(p).unwrap(), vec![i as u8]);
        }
        assert_eq!(temp_files(dir.path()), 0);
        assert_eq!(s.pending_bytes(), 0);
    }

    #[test]
    fn a_small_temp_file_grows_with_its_writes_and_reads_zeros_past_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), 1 << 30).unwrap();
        let mut p = s.create_pending(4096 + 16).unwrap();
        let on_disk = |p: &PendingFile| fs::metadata(&p.path).unwrap().len();
        assert_eq!(on_disk(&p), 0, "a small temp file is not sized up front");
        p.write_at(100, b"abc").unwrap();
        assert_eq!(on_disk(&p), 103);
        let mut got = vec![7u8; 200];
        p.read_at(0, &mut got).unwrap();
        let mut want = vec![0u8; 200];
        want[100..103].copy_from_slice(b"abc");
        assert_eq!(got, want, "holes and what lies past the end read as zeros");
        assert!(
            p.read_at(4096, &mut [0; 32]).is_err(),
            "past the sink's length"
        );
        let path = s.commit(p, &[2; 16], "small", 103).unwrap().path;
        assert_eq!(&fs::read(path).unwrap()[100..], b"abc");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Small files hold their last block back: any writes and reads, across that
        /// boundary too, give the bytes of a plain buffer, and the committed file is
        /// its first `size` bytes.
        #[test]
        fn a_small_file_matches_a_buffer(
            blocks in 1u64..300,
            pad in 1u64..=16,
            ops in proptest::collection::vec((0u64..5000, 0usize..600, proptest::bool::weighted(0.3)), 0..30),
        ) {
            let len = blocks * 16;
            let dir = tempfile::tempdir().unwrap();
            let s = Storage::open(dir.path(), 1 << 30).unwrap();
            let mut p = s.create_pending(len).unwrap();
            proptest::prop_assert!(p.tail.is_some());
            let mut model = vec![0u8; len as usize];
            for (i, &(at, n, read)) in ops.iter().enumerate() {
                let at = at % len;
                let n = n.min((len - at) as usize);
                if read {
                    let mut got = vec![9u8; n];
                    p.read_at(at, &mut got).unwrap();
                    proptest::prop_assert_eq!(&got[..], &model[at as usize..at as usize + n]);
                } else {
                    let data: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8 | 1).collect();
                    p.write_at(at, &data).unwrap();
                    model[at as usize..at as usize + n].copy_from_slice(&data);
                }
            }
            // The whole file at last, as a finished upload has it.
            let all: Vec<u8> = (0..len).map(|j| (j * 7) as u8).collect();
            p.write_at(0, &all).unwrap();
            let size = len - pad;
            let path = s.commit(p, &[6; 16], "small", size).unwrap().path;
            proptest::prop_assert_eq!(fs::read(path).unwrap(), all[..size as usize].to_vec());
        }
    }

    #[test]
    fn the_committer_pipeline_stores_every_file() {
        /// Runs a future on this thread (the committer's answers come from its thread).
        fn block_on<F: std::future::Future>(f: F) -> F::Output {
            struct Unpark(std::thread::Thread);
            impl std::task::Wake for Unpark {
                fn wake(self: Arc<Self>) {
                    self.0.unpark();
                }
            }
            let waker = Arc::new(Unpark(std::thread::current())).into();
            let mut cx = std::task::Context::from_waker(&waker);
            let mut f = std::pin::pin!(f);
            loop {
                if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                    return v;
                }
                std::thread::park();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Storage::open(dir.path(), 1 << 30).unwrap());
        let committer = s.start_committer();
        // 16 threads commit 20 files each, so that rounds of the pipeline overlap.
        let threads: Vec<_> = (0..16u8)
            .map(|t| {
                let (s, committer) = (s.clone(), committer.clone());
                std::thread::spawn(move || {
                    for i in 0..20u8 {
                        let body = vec![t ^ i; 100 + i as usize];
                        let len = (body.len() as u64 / 16 + 1) * 16;
                        let mut p = s.create_pending(len).unwrap();
                        let mut padded = body.clone();
                        padded.resize(len as usize, (len - body.len() as u64) as u8);
                        p.write_at(0, &padded).unwrap();
                        let item = CommitItem {
                            pending: p,
                            client: [t; 16],
                            name: format!("f{i}"),
                            size: body.len() as u64,
                        };
                        let path = block_on(committer.commit(item)).unwrap().path;
                        assert_eq!(fs::read(path).unwrap(), body);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for t in 0..16u8 {
            for i in 0..20u8 {
                let path = s.client_dir(&[t; 16]).join(format!("f{i}"));
                assert_eq!(fs::read(path).unwrap(), vec![t ^ i; 100 + i as usize]);
            }
        }
        assert_eq!(temp_files(dir.path()), 0);
        assert_eq!(s.pending_bytes(), 0);
    }

    #[test]
    fn a_small_file_ends_at_its_size_whatever_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), 1 << 30).unwrap();
        // A size beyond the sink is an error, not a panic.
        let mut p = s.create_pending(64).unwrap();
        p.write_at(0, &[1; 64]).unwrap();
        assert!(s.commit(p, &[8; 16], "over", 65).is_err());
        // A whole padding block (size = len - 16) with the body not all written:
        // the file still ends at its size.
        let mut p = s.create_pending(64).unwrap();
        p.write_at(0, &[2; 10]).unwrap();
        let path = s.commit(p, &[8; 16], "short", 48).unwrap().path;
        let mut want = vec![0u8; 48];
        want[..10].fill(2);
        assert_eq!(fs::read(path).unwrap(), want);
        // The same with part of the tail kept.
        let mut p = s.create_pending(64).unwrap();
        p.write_at(0, &[3; 10]).unwrap();
        p.write_at(48, &[4; 16]).unwrap();
        let path = s.commit(p, &[8; 16], "holey", 50).unwrap().path;
        let mut want = vec![0u8; 50];
        want[..10].fill(3);
        want[48..].fill(4);
        assert_eq!(fs::read(path).unwrap(), want);
        assert_eq!(temp_files(dir.path()), 0);
    }

    #[test]
    fn stages_are_halves_of_aligned_blocks() {
        let pool = Arc::new(Stages::default());
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
        assert_eq!(pa % HUGE_PAGE, 0, "the first stage starts a huge page");
        assert_eq!(
            pb,
            pa + STAGE,
            "the second is the other half of the same block"
        );
        assert_eq!((a.len(), b.len()), (STAGE, STAGE));
        // The halves do not overlap: each keeps what was written to it.
        let (mut a, mut b) = (a, b);
        a.fill(1);
        b.fill(2);
        assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2));
        // A block outlives the half given back first.
        drop(a);
        b[STAGE - 1] = 3;
        assert_eq!(b[STAGE - 1], 3);
        let c = pool.take().unwrap();
        assert_eq!(c.as_ptr() as usize, pa, "the freed half is lent again");
    }

    #[test]
    fn stages_are_shared_by_files_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), 1 << 30)
            .unwrap()
            .with_direct_io(1);
        let spare = |s: &Storage| -> Vec<usize> {
            let v = s.writers.stages.0.lock().unwrap();
            v.iter()
                .map(|m| m.block.base.as_ptr() as usize + m.half * STAGE)
                .collect()
        };
        let len = 3 * STAGE as u64;
        let data = vec![5u8; len as usize];
        let mut p = s.create_pending(len).unwrap();
        p.write_at(0, &data).unwrap();
        s.commit(p, &[4; 16], "a", len).unwrap();
        let after_first = spare(&s);
        assert!(
            !after_first.is_empty(),
            "a finished file gives its stages back"
        );
        let p = s.create_pending(len).unwrap();
        let taken = p.direct.as_ref().unwrap().stage.as_ptr() as usize;
        assert!(after_first.contains(&taken), "the next file reuses a stage");
        drop(p);
        assert_eq!(spare(&s).len(), after_first.len());
        // No more than SPARE_STAGES are kept, however many were out at once.
        let many: Vec<Stage> = (0..SPARE_STAGES + 5)
            .map(|_| s.writers.stages.take().unwrap())
            .collect();
        drop(many);
        assert_eq!(spare(&s).len(), SPARE_STAGES);
        // A stage a ring registered is kept (mapped) even past that.
        let mut many: Vec<Stage> = (0..SPARE_STAGES + 5)
            .map(|_| s.writers.stages.take().unwrap())
            .collect();
        // (the last one dropped, when the pool is full)
        let last = many.last_mut().unwrap();
        last.registered = true;
        let kept = last.id;
        drop(many);
        let pool = s.writers.stages.0.lock().unwrap();
        assert_eq!(pool.len(), SPARE_STAGES + 1);
        assert!(pool.iter().any(|p| p.id == kept && p.registered));
    }

    /// Writes as the session makes them, against a plain buffer: any mix of runs that
    /// continue each other, jumps (out-of-order packets), small rewrites (the CBC
    /// fix-up) and reads gives the same bytes through the direct-I/O stage.
    ///
    /// `via`: the writer threads, this thread's io_uring, or the ring with the commit
    /// (and its final wait for the writes out) on another thread.
    /// Returns whether the file's stages went to a ring.
    fn direct_matches_a_buffer(len: u64, ops: &[(u64, usize, bool)], via: Via) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(
            Storage::open(dir.path(), 1 << 30)
                .unwrap()
                .with_direct_io(1),
        );
        match via {
            Via::Threads => ring::uninstall(),
            Via::RingUnregistered => ring::install_with(false, 256).unwrap(),
            Via::Ring | Via::RingCommitElsewhere => ring::install().unwrap(),
        }
        let mut p = s.create_pending(len).unwrap();
        assert!(p.direct.is_some(), "ext4 under the test takes O_DIRECT");
        let mut model = vec![0u8; len as usize];
        let mut fill = 1u8;
        for &(at, n, read) in ops {
            let at = at % len;
            let n = n.min((len - at) as usize);
            if read {
                let mut got = vec![0u8; n];
                p.read_at(at, &mut got).unwrap();
                assert_eq!(got, model[at as usize..at as usize + n]);
            } else {
                let data: Vec<u8> = (0..n).map(|i| fill.wrapping_add(i as u8)).collect();
                fill = fill.wrapping_add(7);
                // Every other write goes through the stage where it can, as the
                // session's decryption does.
                let mut done = 0;
                if fill.is_multiple_of(2) {
                    if let Some(room) = p.stage(at, n) {
                        done = room.len().min(n);
                        room[..done].copy_from_slice(&data[..done]);
                        p.staged(done).unwrap();
                    }
                }
                p.write_at(at + done as u64, &data[done..]).unwrap();
                model[at as usize..at as usize + n].copy_from_slice(&data);
            }
        }
        let on_ring = p.direct.as_ref().is_some_and(|d| d.ring.is_some());
        let (registered, may_register) = ring::current().map_or((0, false), |r| r.registered());
        match via {
            Via::RingUnregistered | Via::Threads => assert_eq!(registered, 0),
            // Stages were registered, unless the kernel refused (RLIMIT_MEMLOCK).
            _ => assert!(!on_ring || registered > 0 || !may_register),
        }
        let threads_started = s.writers.tx.lock().unwrap().is_some();
        match via {
            Via::Threads => assert!(!on_ring),
            // Whole stages went to the ring, none to the threads.
            _ => assert!(!threads_started),
        }
        let path = match via {
            Via::RingCommitElsewhere => {
                let s2 = s.clone();
                std::thread::spawn(move || s2.commit(p, &[9; 16], "f", len))
                    .join()
                    .unwrap()
            }
            _ => s.commit(p, &[9; 16], "f", len),
        }
        .unwrap()
        .path;
        assert!(
            fs::read(&path).unwrap() == model,
            "file differs from the model"
        );
        ring::uninstall();
        // A stage the ring registered came back to the pool marked as such (so it is
        // never unmapped while the kernel holds its pages).
        let kept = s.writers.stages.0.lock().unwrap();
        assert_eq!(kept.iter().filter(|p| p.registered).count(), registered);
        on_ring
    }

    /// A pipe already full: writes to it wait until its reader drains it.
    fn full_pipe() -> (std::io::PipeReader, Arc<File>) {
        use std::io::Write;
        let (rd, wr) = std::io::pipe().unwrap();
        let wr = Arc::new(File::from(std::os::fd::OwnedFd::from(wr)));
        let cap = nix::fcntl::fcntl(wr.as_raw_fd(), nix::fcntl::FcntlArg::F_GETPIPE_SZ).unwrap();
        (&*wr).write_all(&vec![0u8; cap as usize]).unwrap();
        (rd, wr)
    }

    /// A ring hands back a write when it already has as many out as its completion
    /// queue holds, and books the ones out once they complete. (The writes go to a
    /// pipe that is full until a reader starts, so none can complete before the third
    /// is offered.)
    #[test]
    fn a_full_ring_hands_writes_back() {
        use std::io::Read;
        let (mut rd, wr) = full_pipe();
        let stages = Arc::<Stages>::default();
        let flight = Arc::<Flight>::default();
        ring::install_with(false, 1).unwrap();
        let ring = ring::current().unwrap();
        let job = || WriteJob {
            fd: wr.clone(),
            cached: wr.clone(),
            buf: stages.take().unwrap(),
            offset: 0,
            flight: flight.clone(),
        };
        flight.state.lock().unwrap().in_flight = 2;
        // (a completion queue of two)
        assert!(ring.submit(job()).is_ok());
        assert!(ring.submit(job()).is_ok());
        assert!(ring.submit(job()).is_err(), "a third write is handed back");
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while rd.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        let t0 = std::time::Instant::now();
        while flight.state.lock().unwrap().in_flight > 0 {
            assert!(t0.elapsed().as_secs() < 60, "the writes were never booked");
            ring.progress(&flight);
        }
        drop((ring, wr));
        ring::uninstall();
        reader.join().unwrap();
    }

    /// A ring that goes away with writes out waits for them: their completions are
    /// booked (the flight drains) before their stages can be reused. (The writes go to
    /// a full pipe that a reader starts draining only later.)
    #[test]
    fn a_ring_dropped_with_writes_out_waits_for_them() {
        use std::io::Read;
        let (mut rd, wr) = full_pipe();
        let stages = Arc::<Stages>::default();
        let flight = Arc::<Flight>::default();
        ring::install_with(false, 8).unwrap();
        let ring = ring::current().unwrap();
        flight.state.lock().unwrap().in_flight = 2;
        for _ in 0..2 {
            let job = WriteJob {
                fd: wr.clone(),
                cached: wr.clone(),
                buf: stages.take().unwrap(),
                offset: 0,
                flight: flight.clone(),
            };
            assert!(ring.submit(job).is_ok());
        }
        drop((ring, wr));
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let mut buf = vec![0u8; 1 << 16];
            while rd.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        assert_eq!(flight.state.lock().unwrap().in_flight, 2, "none done yet");
        // The thread's reference was the last one: this waits for the reader.
        ring::uninstall();
        assert_eq!(flight.state.lock().unwrap().in_flight, 0);
        reader.join().unwrap();
    }

    /// With a ring of two entries (writes past its room go to the writer threads when
    /// the device is slower than the stages fill), commits on another thread (the
    /// blocking pool's way) finish while the ring's owner does nothing.
    #[test]
    fn a_full_ring_overflows_to_the_threads_and_foreign_commits_finish() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(
            Storage::open(dir.path(), 1 << 34)
                .unwrap()
                .with_direct_io(1),
        );
        // (a completion queue of 2: two writes out at most)
        ring::install_with(true, 1).unwrap();
        let len = 2 * STAGE as u64 + 4096;
        let files: Vec<PendingFile> = (0..6u8)
            .map(|i| {
                let mut p = s.create_pending(len).unwrap();
                p.write_at(0, &vec![i; len as usize]).unwrap();
                p
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        std::thread::spawn(move || {
            let r: Vec<PathBuf> = files
                .into_iter()
                .enumerate()
                .map(|(i, p)| s2.commit(p, &[9; 16], &format!("f{i}"), len).unwrap().path)
                .collect();
            let _ = tx.send(r);
        });
        let paths = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the commits finished");
        for (i, path) in paths.iter().enumerate() {
            let data = fs::read(path).unwrap();
            assert!(data.len() == len as usize && data.iter().all(|&b| b == i as u8));
        }
        ring::uninstall();
    }

    /// What a ring's completion means: the rest of a short write is written, a refused
    /// one (EINVAL) goes through the cache and marks the file, an error is kept.
    #[test]
    fn ring_completions_finish_short_writes_and_keep_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let cached = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .unwrap(),
        );
        cached.set_len(2 * STAGE as u64).unwrap();
        let fd = Arc::new(
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .unwrap(),
        );
        let stages = Arc::<Stages>::default();
        let flight = Arc::<Flight>::default();
        flight.state.lock().unwrap().in_flight = 3;
        let job = |offset: u64, fill: u8| {
            let mut buf = stages.take().unwrap();
            buf.fill(fill);
            WriteJob {
                fd: fd.clone(),
                cached: cached.clone(),
                buf,
                offset,
                flight: flight.clone(),
            }
        };
        // The kernel says it wrote 4 KiB of the stage (it did not, here): the rest is
        // written by the completion.
        job(0, 1).completed(4096);
        let data = fs::read(&path).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0));
        assert!(data[4096..STAGE].iter().all(|&b| b == 1));
        {
            let st = flight.state.lock().unwrap();
            assert_eq!(st.in_flight, 2);
            assert!(st.error.is_none() && !st.refused);
        }
        job(STAGE as u64, 2).completed(-libc::EINVAL);
        let data = fs::read(&path).unwrap();
        assert!(data[STAGE..].iter().all(|&b| b == 2));
        {
            let st = flight.state.lock().unwrap();
            assert_eq!(st.in_flight, 1);
            assert!(st.error.is_none() && st.refused);
        }
        job(0, 3).completed(-libc::EIO);
        let st = flight.state.lock().unwrap();
        assert_eq!(st.in_flight, 0);
        assert_eq!(st.error.as_ref().unwrap().raw_os_error(), Some(libc::EIO));
    }

    #[derive(Debug, Clone, Copy)]
    enum Via {
        Threads,
        Ring,
        RingUnregistered,
        RingCommitElsewhere,
    }
    const VIAS: [Via; 4] = [
        Via::Threads,
        Via::Ring,
        Via::RingUnregistered,
        Via::RingCommitElsewhere,
    ];

    #[test]
    fn direct_io_in_order_odd_sizes_and_jumps() {
        let len = 3 * STAGE as u64 + 12_345 * 16;
        // in order, chunk sizes not multiples of 4 KiB
        let mut ops = Vec::new();
        let mut at = 0;
        while at < len {
            ops.push((at, 65_536 - 48, false));
            at += 65_536 - 48;
        }
        for via in VIAS {
            let on_ring = direct_matches_a_buffer(len, &ops, via);
            assert_eq!(on_ring, !matches!(via, Via::Threads), "{via:?}");
        }
        // packets of 1 MiB + 16 bytes, out of order, with fix-ups and reads in between
        let pk = (1 << 20) + 16;
        let ops = vec![
            (pk, pk as usize, false),
            (0, 100_000, false),
            (100_000, pk as usize - 100_000, false),
            (pk, 16, false),
            (0, 70_000, true),
            (2 * pk, 5000, false),
            (pk, 4096 * 3, true),
        ];
        for via in VIAS {
            direct_matches_a_buffer(3 * pk + 4096, &ops, via);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        #[test]
        fn direct_io_any_write_order(
            len in 1u64..(2 * STAGE as u64 + 50_000),
            ops in proptest::collection::vec(
                (0u64..u64::MAX, 0usize..(STAGE + 9000), proptest::bool::weighted(0.15)),
                1..40,
            ),
            via in 0usize..4,
        ) {
            // Mostly continue the previous write, as the session does.
            let mut next = 0u64;
            let ops: Vec<(u64, usize, bool)> = ops
                .into_iter()
                .enumerate()
                .map(|(i, (at, n, read))| {
                    let at = if i % 3 == 2 { at / 16 * 16 } else { next };
                    next = (at % len) + n as u64;
                    (at, n, read)
                })
                .collect();
            direct_matches_a_buffer(len, &ops, VIAS[via]);
        }
    }

    #[test]
    fn empty_file_commits() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), 1 << 30).unwrap();
        let p = s.create_pending(16).unwrap();
        let path = s.commit(p, &[2; 16], "empty", 0).unwrap().path;
        assert_eq!(fs::metadata(path).unwrap().len(), 0);
    }
}
