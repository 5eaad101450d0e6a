//! A v4 backup: walk the paths, cut files into chunks, send what the server does not
//! hold, and commit one snapshot.
//!
//! The walk runs on several threads at once (a tree not in the page cache costs a
//! disk wait per directory and inode, and those overlap), and hands each file it finds
//! to the readers at once, so reading starts with the walk rather than after it. The
//! entries are put in manifest order when the walk ends.
//!
//! The pipeline has two pools of threads. Readers take files from a shared queue,
//! read and cut them with FastCDC, name each chunk by its keyed hash, and gather
//! chunks (of one or many files) into batches. For a batch they ask the server which
//! chunks it holds (HAS_CHUNKS; chunks named by the parent snapshot or already sent in
//! this run are not asked about) and hand the batch with its question to the sealers
//! through a bounded queue (`SealQueue`), without waiting for the answer. Sealers take
//! the answer, then compress, encrypt and send the chunks the server does not hold
//! (PUT_CHUNK) without waiting for the acknowledgements, which they take as they come.
//! So a file is read and cut on one core while its chunks are sealed on the others,
//! and a reader waits neither for answers nor for acknowledgements (a reader
//! that waited for each batch's answer, behind the chunks in flight, spent 0.5 s of a
//! 2.5 s backup of a 1 GiB file waiting). The window of the connection bounds what
//! is in flight. The snapshot is committed only after every chunk was acknowledged as
//! durable.
//!
//! A file of 32 MiB or more is cut by two readers when another is free: one from its
//! start, one from its middle, and the file's chunks are the first reader's up to
//! where their cuts meet and the second's after, the same chunks one reader cuts
//! (`Worker::split_file`). A cold backup of one 1 GiB file took 2.02-2.28 s (median
//! 2.09) against 2.18-2.37 s (2.27) with one reader, 5 alternated runs.
//!
//! A file's next 64 MiB are asked of the disk ahead of its reader
//! (`POSIX_FADV_WILLNEED`): a 1 GiB file backed up from a cold cache took 2.34-2.53 s
//! and 2.0-2.2 CPU seconds on the client, against 2.5-3.8 s and 2.1-4.1 with the
//! kernel's read-ahead alone (`_copy_to_iter` then took up to half the client's CPU).
//!
//! Memory for a tree of a million tiny files (peak RSS, `peers.py` scenario 6): the
//! readers' results are one flat list of chunk names, the set of chunks known this run
//! holds half of each name, a read buffer is no larger than its file, the walk sorts
//! in place, the manifest is encoded as it is cut instead of whole first, and the
//! sealers take PUT_CHUNK answers in any order through one channel
//! ([`AnswerQueue`]) instead of holding one per request until the first was
//! answered. Peak RSS fell from 437 to 263 MiB.
//!
//! A file whose size and modification time match the parent snapshot's entry (the
//! last snapshot of this host with the same paths) is not read again: its chunks are
//! taken from the parent. So an unchanged tree costs a walk and one small commit.
//!
//! A commit the server refuses because it no longer holds chunks the snapshot names
//! (MISSING_CHUNKS) does not end the backup: a collection, on this node or another
//! sharing the registry, deleted them while the backup ran, after the server had
//! answered that it held them (chunks no snapshot named, asked about longer ago than
//! the server's grace period), or they were the parent snapshot's. The backup is run
//! again, up to three times in all (`COMMIT_ATTEMPTS`): it asks HAS_CHUNKS afresh
//! (nothing it was told is kept from one run to the next), so the chunks gone are
//! answered "not held" and sent again; with a parent, every file is read, since the
//! parent's chunks are taken without asking. A backup of streams (standard input),
//! which cannot be read again, and a commit of files uploaded before ([`commit_files`])
//! return the refusal.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cyberbackup_protocol::v4::format::{Entry, EntryKind, FormatError, RepoKey, Root};
use cyberbackup_protocol::v4::wire::{
    Answer, ChunkId, ErrorAnswer, ErrorCode, Request, SnapshotHeader, SnapshotId, MAX_HAS_CHUNKS,
};
use cyberbackup_protocol::v4::MAX_CHUNK;
use rand::RngCore;

use super::conn::{AnswerQueue, ConnError, Connection, Pending};
use super::snapshots::{self, SnapshotError};
use super::PendingKey;

/// FastCDC sizes (`docs/PROTOCOL-V4.md` §7).
pub const CHUNK_MIN: u32 = 256 * 1024;
pub const CHUNK_AVG: u32 = 1024 * 1024;
pub const CHUNK_MAX: u32 = MAX_CHUNK;

/// Bytes a worker reads from a file at once (a multiple of the largest chunk).
const READ_BUF: usize = 16 << 20;
/// The smallest read buffer.
const MIN_READ_BUF: usize = 64 << 10;

/// Plaintext bytes a worker gathers before it asks the server about them.
const BATCH_BYTES: usize = 8 << 20;
/// Chunks a worker gathers before it asks.
const BATCH_CHUNKS: usize = 512;

/// Plaintext bytes waiting for a sealer, at most (one item is always taken).
const SEAL_QUEUE_BYTES: usize = 32 << 20;
/// A sealer takes chunks in items of at most this many bytes (a chunk is never split)
/// or [`SEAL_ITEM_CHUNKS`] chunks: large chunks go one by one to any free sealer, tiny
/// ones in groups, so the queue's lock is not taken once per tiny file.
const SEAL_ITEM_BYTES: usize = 1 << 20;
const SEAL_ITEM_CHUNKS: usize = 64;

/// Backup errors.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The repository key could not be opened (a wrong passphrase, with
    /// [`backup_unlocking`]).
    #[error("{0}")]
    Key(#[from] FormatError),
    #[error("{0}: not a file, directory or symbolic link that can be backed up")]
    Unsupported(PathBuf),
    #[error("nothing to back up: {0}")]
    Empty(String),
    #[error("cancelled")]
    Cancelled,
    /// A bug: a thread of the backup panicked (nothing is committed).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Backup settings.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    pub host: String,
    pub tags: Vec<String>,
    /// Worker threads (0: one per CPU).
    pub workers: usize,
    /// Read every file even when the parent snapshot has it unchanged.
    pub force: bool,
    /// Try zstd on each chunk.
    pub compress: bool,
    /// The snapshot's time, milliseconds since the epoch (None: now).
    pub time_ms: Option<i64>,
    /// What the walk leaves out.
    pub filter: Filter,
    /// Back up standard input as one file of this name instead of paths.
    pub stdin_name: Option<String>,
}

impl Default for BackupOptions {
    fn default() -> Self {
        BackupOptions {
            host: hostname(),
            tags: Vec::new(),
            workers: 0,
            force: false,
            compress: true,
            time_ms: None,
            filter: Filter::default(),
            stdin_name: None,
        }
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// What a backup did.
#[derive(Debug, Clone, Default)]
pub struct BackupSummary {
    pub snapshot: SnapshotId,
    pub parent: Option<SnapshotId>,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Plaintext bytes of the files.
    pub size: u64,
    /// Files taken from the parent without reading.
    pub files_unchanged: u64,
    /// Chunks sent (new to the server).
    pub chunks_sent: u64,
    /// Chunks the server already held.
    pub chunks_held: u64,
    /// Chunk blob bytes sent.
    pub bytes_sent: u64,
    /// Paths that could not be read, and why.
    pub skipped: Vec<(PathBuf, String)>,
    pub seconds: f64,
}

/// Progress, updated as the backup goes.
#[derive(Debug, Default)]
pub struct BackupProgress {
    pub files_total: AtomicU64,
    pub bytes_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub cancel: AtomicBool,
    /// The file a worker last started on (its path as found on disk).
    pub current: Mutex<PathBuf>,
}

struct Walked {
    /// Manifest entries in path order; files' chunk lists filled later.
    entries: Vec<Entry>,
    /// A file's index in `entries` by its number (the readers' name for it).
    file_index: Vec<usize>,
    skipped: Vec<(PathBuf, String)>,
    /// The paths as the user named them, for the snapshot root.
    named: Vec<Vec<u8>>,
}

/// The manifest path of a path the user named: relative paths stay as given (without
/// `.`), absolute ones lose their leading `/`; a path with `..` is made absolute first.
fn manifest_base(p: &Path) -> Result<Vec<u8>, std::io::Error> {
    let p = if p.components().any(|c| matches!(c, Component::ParentDir)) {
        std::fs::canonicalize(p)?
    } else {
        p.to_path_buf()
    };
    let parts: Vec<&[u8]> = p
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.as_bytes()),
            _ => None,
        })
        .collect();
    Ok(parts.join(&b'/'))
}

fn mtime_ns(md: &std::fs::Metadata) -> i64 {
    md.mtime().saturating_mul(1_000_000_000) + md.mtime_nsec()
}

/// The chunk ids a file on disk has now under `key` (the same cuts and ids a backup
/// would make): a restore compares them to tell a file already restored.
pub fn file_chunk_ids(key: &RepoKey, path: &Path) -> std::io::Result<Vec<ChunkId>> {
    let f = File::open(path)?;
    let mut ids = Vec::new();
    let cdc = fastcdc::v2020::StreamCDC::new(
        std::io::BufReader::with_capacity(1 << 20, f),
        CHUNK_MIN,
        CHUNK_AVG,
        CHUNK_MAX,
    );
    for c in cdc {
        let c = c.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(e) => e,
            other => std::io::Error::other(other.to_string()),
        })?;
        ids.push(key.chunk_id(&c.data));
    }
    Ok(ids)
}

/// What the walk leaves out.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Globs (`*`, `?`, `**`): one without `/` is matched against each name, one with
    /// `/` against the whole path as found on disk.
    pub excludes: Vec<String>,
    /// Leave out the contents of directories tagged with a CACHEDIR.TAG file (the tag
    /// file and the directory itself are kept, as the tag's spec asks).
    pub exclude_caches: bool,
    /// Do not descend into directories on another file system than the path named.
    pub one_file_system: bool,
}

/// The signature a CACHEDIR.TAG file starts with (bford.info/cachedir).
const CACHEDIR_SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";

impl Filter {
    fn excluded(&self, disk: &Path) -> bool {
        if self.excludes.is_empty() {
            return false;
        }
        let full = disk.to_string_lossy();
        let name = disk
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        self.excludes.iter().any(|p| {
            if p.contains('/') {
                super::inspect::glob(p, &full)
            } else {
                super::inspect::glob(p, &name)
            }
        })
    }

    fn is_cache(&self, dir: &Path) -> bool {
        use std::io::Read as _;
        if !self.exclude_caches {
            return false;
        }
        let mut head = [0u8; CACHEDIR_SIGNATURE.len()];
        File::open(dir.join("CACHEDIR.TAG"))
            .and_then(|mut f| f.read_exact(&mut head))
            .is_ok_and(|()| head == CACHEDIR_SIGNATURE)
    }
}

/// Reads an exclude file: one pattern a line; blank lines and `#` comments skipped.
pub fn read_patterns(path: &Path) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// A path still to look at: (manifest path, disk path, device of the path named).
type WalkItem = (Vec<u8>, PathBuf, u64);

/// The walk's starting points, and the paths as the user named them.
fn walk_roots(paths: &[PathBuf]) -> Result<(Vec<WalkItem>, Vec<Vec<u8>>), BackupError> {
    let mut named = Vec::new();
    let mut todo: Vec<WalkItem> = Vec::new();
    for p in paths {
        let base = manifest_base(p).map_err(|source| BackupError::Io {
            path: p.clone(),
            source,
        })?;
        named.push(p.as_os_str().as_bytes().to_vec());
        let dev = std::fs::metadata(p).map_or(0, |m| m.dev());
        if base.is_empty() {
            // "." or "/": its contents go at the top.
            let rd = std::fs::read_dir(p).map_err(|source| BackupError::Io {
                path: p.clone(),
                source,
            })?;
            for n in rd.filter_map(Result::ok).map(|e| e.file_name()) {
                todo.push((n.as_bytes().to_vec(), p.join(&n), dev));
            }
        } else {
            todo.push((base, p.clone(), dev));
        }
    }
    todo.sort();
    todo.dedup_by(|a, b| a.0 == b.0);
    Ok((todo, named))
}

/// Threads that look at paths at once: the walk of a tree not in the page cache
/// waits on the disk for each directory and inode, so several in flight overlap.
const WALKERS: usize = 16;

/// The walk's shared work: paths to look at, and how many are queued or being
/// looked at (the walk ends when that reaches zero).
struct WalkQueue {
    st: Mutex<(Vec<WalkItem>, usize)>,
    cv: Condvar,
}

/// One thing the walk found; `file`: its number and where it is on disk.
struct Found {
    entry: Entry,
    /// A file's number ([`NOT_A_FILE`] for the rest).
    file: usize,
}

const NOT_A_FILE: usize = usize::MAX;

/// Manifest order: component by component, so a directory comes just before its
/// contents (as a depth-first walk in name order gives).
fn manifest_order(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    a.split(|&c| c == b'/').cmp(b.split(|&c| c == b'/'))
}

/// Walks from `roots` on [`WALKERS`] threads. Each file found is numbered and given
/// to `on_file`, which may fill its chunks (unchanged since the parent) or queue it
/// to be read, while the walk goes on. Returns the entries in manifest order, each
/// file's number and index, and what could not be read.
fn walk(
    roots: Vec<WalkItem>,
    named: Vec<Vec<u8>>,
    filter: &Filter,
    on_file: &(dyn Fn(usize, &Path, &mut Entry) + Sync),
    stop: &(dyn Fn() -> bool + Sync),
) -> Walked {
    let pending = roots.len();
    let q = WalkQueue {
        st: Mutex::new((roots, pending)),
        cv: Condvar::new(),
    };
    let next_file = AtomicU64::new(0);
    // One list for every thread, filled in batches: a million files' entries are not
    // gathered per thread and then copied into one.
    let all: Mutex<Vec<Found>> = Mutex::new(Vec::new());
    let mut skipped: Vec<(PathBuf, String)> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..WALKERS)
            .map(|_| {
                s.spawn(|| {
                    let mut found = Vec::new();
                    let mut skipped = Vec::new();
                    loop {
                        let item = {
                            let mut st = lock(&q.st);
                            loop {
                                if stop() {
                                    // Cancelled, or the backup failed: the walk ends here.
                                    st.0.clear();
                                    st.1 = 0;
                                    q.cv.notify_all();
                                    break None;
                                }
                                if let Some(it) = st.0.pop() {
                                    break Some(it);
                                }
                                if st.1 == 0 {
                                    break None;
                                }
                                st =
                                    q.cv.wait(st)
                                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                            }
                        };
                        let Some(item) = item else { break };
                        let kids =
                            walk_one(item, filter, &next_file, on_file, &mut found, &mut skipped);
                        if found.len() >= 1024 {
                            lock(&all).append(&mut found);
                        }
                        let mut st = lock(&q.st);
                        if st.1 > 0 {
                            // (0 once a stop emptied the queue.)
                            st.1 += kids.len();
                            st.1 -= 1;
                            st.0.extend(kids);
                        }
                        q.cv.notify_all();
                    }
                    (found, skipped)
                })
            })
            .collect();
        for h in handles {
            if let Ok((mut f, sk)) = h.join() {
                lock(&all).append(&mut f);
                skipped.extend(sk);
            }
        }
    });
    let mut found = all
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Unstable: no two entries share a path, and a stable sort of a million entries
    // would take half their size again in a buffer.
    found.sort_unstable_by(|a, b| manifest_order(&a.entry.path, &b.entry.path));
    skipped.sort();
    let mut file_index = vec![usize::MAX; next_file.load(Ordering::Relaxed) as usize];
    // Collected in place (an entry is smaller than what it is found in): a million
    // files' entries are not held twice.
    let entries = found
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            if let Some(slot) = file_index.get_mut(f.file) {
                *slot = i;
            }
            f.entry
        })
        .collect();
    Walked {
        entries,
        file_index,
        skipped,
        named,
    }
}

/// Looks at one path: records it, and returns a directory's contents to look at.
fn walk_one(
    (mpath, disk, dev): WalkItem,
    filter: &Filter,
    next_file: &AtomicU64,
    on_file: &(dyn Fn(usize, &Path, &mut Entry) + Sync),
    found: &mut Vec<Found>,
    skipped: &mut Vec<(PathBuf, String)>,
) -> Vec<WalkItem> {
    if filter.excluded(&disk) {
        return Vec::new();
    }
    let md = match std::fs::symlink_metadata(&disk) {
        Ok(m) => m,
        Err(e) => {
            skipped.push((disk, e.to_string()));
            return Vec::new();
        }
    };
    let ft = md.file_type();
    let mode = md.permissions().mode() & 0o7777;
    let mtime = mtime_ns(&md);
    if ft.is_file() {
        let no = next_file.fetch_add(1, Ordering::Relaxed) as usize;
        let mut entry = Entry {
            path: mpath,
            kind: EntryKind::File { chunks: Vec::new() },
            mode,
            mtime_ns: mtime,
            size: md.len(),
        };
        on_file(no, &disk, &mut entry);
        found.push(Found { entry, file: no });
    } else if ft.is_symlink() {
        match std::fs::read_link(&disk) {
            Ok(t) => found.push(Found {
                entry: Entry {
                    path: mpath,
                    kind: EntryKind::Symlink {
                        target: t.as_os_str().as_bytes().to_vec(),
                    },
                    mode,
                    mtime_ns: mtime,
                    size: 0,
                },
                file: NOT_A_FILE,
            }),
            Err(e) => skipped.push((disk, e.to_string())),
        }
    } else if ft.is_dir() {
        found.push(Found {
            entry: Entry {
                path: mpath.clone(),
                kind: EntryKind::Dir,
                mode,
                mtime_ns: mtime,
                size: 0,
            },
            file: NOT_A_FILE,
        });
        if filter.one_file_system && md.dev() != dev {
            // A mount point: recorded, not entered.
            return Vec::new();
        }
        let cache = filter.is_cache(&disk);
        match std::fs::read_dir(&disk) {
            Ok(rd) => {
                return rd
                    .filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .filter(|k| !cache || k == "CACHEDIR.TAG")
                    .map(|k| {
                        // Of the exact size: a clone grown by a push would have twice
                        // the parent's length, held for every file to the commit.
                        let mut mp = Vec::with_capacity(mpath.len() + 1 + k.len());
                        mp.extend_from_slice(&mpath);
                        mp.push(b'/');
                        mp.extend_from_slice(k.as_bytes());
                        (mp, disk.join(&k), dev)
                    })
                    .collect();
            }
            Err(e) => skipped.push((disk, e.to_string())),
        }
    } else {
        skipped.push((disk, "not a regular file, directory or symlink".into()));
    }
    Vec::new()
}

/// A file's chunks and size as read, or why it could not be read.
type FileResult = Result<(Vec<ChunkId>, u64), (PathBuf, String)>;

/// What the readers made of the files, by file number, kept compact: the chunk lists
/// of a million files are one list, not a million (a tree of a million tiny files
/// held 48 bytes more a file the other way).
#[derive(Default)]
struct Results {
    /// (file number, how many chunks, its size as read), in the order read; the
    /// chunks are in `chunks`, in the same order.
    read: Vec<(usize, usize, u64)>,
    chunks: Vec<ChunkId>,
    /// (file number, where it is on disk, why it could not be read).
    failed: Vec<(usize, PathBuf, String)>,
}

impl Results {
    fn push(&mut self, no: usize, r: FileResult) {
        match r {
            Ok((ids, size)) => {
                self.read.push((no, ids.len(), size));
                self.chunks.extend_from_slice(&ids);
            }
            Err((disk, why)) => self.failed.push((no, disk, why)),
        }
    }
}

/// The part of a chunk's name the run's set of known chunks holds: half of a keyed
/// BLAKE3 hash tells chunks apart as surely as a backup needs (two chunks of one run
/// that shared it would be a 2^-64 event for 2^32 chunks, and the server would
/// refuse the commit, not store a wrong snapshot), in half the memory.
fn known_key(id: &ChunkId) -> u128 {
    let mut b = [0u8; 16];
    b.copy_from_slice(&id[..16]);
    u128::from_le_bytes(b)
}

/// State the workers share.
struct Shared<'a> {
    conn: &'a Connection,
    key: &'a PendingKey<'a>,
    compress: bool,
    /// Chunks known to be on the server or on their way (this run's puts), by the
    /// first half of their names ([`known_key`]).
    known: Mutex<HashSet<u128>>,
    /// Files to read.
    jobs: Jobs,
    /// What the readers made of the files.
    results: Mutex<Results>,
    failed: Mutex<Option<BackupError>>,
    sent: AtomicU64,
    held: AtomicU64,
    bytes_sent: AtomicU64,
    progress: &'a BackupProgress,
    /// Chunks the server does not hold, on their way to the sealers.
    seal: SealQueue,
}

/// How far ahead of the reading a large file is asked for (`POSIX_FADV_WILLNEED`), in
/// steps of [`READ_AHEAD_STEP`]: the disk reads the next pieces while this one is cut,
/// named and sealed, instead of when it is asked for (the kernel's own read-ahead is
/// smaller than a reader's piece, [`READ_BUF`]).
const READ_AHEAD: u64 = 64 << 20;
const READ_AHEAD_STEP: u64 = 16 << 20;

/// A file read by position from `pos`, with the disk asked for what comes next. The
/// file may be shared: the two readers of a large file read the one file opened.
struct ReadAhead {
    f: Arc<File>,
    len: u64,
    pos: u64,
    /// Where what was asked for ends.
    hinted: u64,
}

impl ReadAhead {
    fn hint(&mut self) {
        while self.hinted < self.len && self.hinted < self.pos + READ_AHEAD {
            let step = READ_AHEAD_STEP.min(self.len - self.hinted);
            // A hint: where it fails (a pipe, an old kernel) reading is as before.
            if let (Ok(off), Ok(n)) = (i64::try_from(self.hinted), i64::try_from(step)) {
                let _ = nix::fcntl::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&self.f),
                    off,
                    n,
                    nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
                );
            }
            self.hinted += step;
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(&*self.f, buf, self.pos)?;
        self.pos += n as u64;
        self.hint();
        Ok(n)
    }
}

/// The parent snapshot's files: path -> (size, mtime, chunks).
type ParentFiles = HashMap<Vec<u8>, (u64, i64, Vec<ChunkId>)>;

/// The parent's chunks of a file whose size and time are the parent's: it is not read
/// again.
fn unchanged_chunks<'p>(
    parent: &'p ParentFiles,
    path: &[u8],
    size: u64,
    mtime_ns: i64,
) -> Option<&'p [ChunkId]> {
    match parent.get(path) {
        Some((s, m, chunks)) if *s == size && *m == mtime_ns => Some(chunks),
        _ => None,
    }
}

/// What a backup reports when the thread that finds the parent snapshot panicked.
const PARENT_PANICKED: &str = "the parent snapshot's thread panicked";

/// A file the walk found before the parent snapshot was known.
struct Early {
    no: usize,
    disk: PathBuf,
    path: Vec<u8>,
    size: u64,
    mtime_ns: i64,
}

/// Files to read, by number, as the walk finds them: the walk pushes, readers pop.
/// Second halves of large files ([`Half`]) go before them.
#[derive(Default)]
struct Jobs {
    st: Mutex<JobsState>,
    /// Readers wait here for a file, walkers for room.
    queued: Condvar,
    room: Condvar,
}

#[derive(Default)]
struct JobsState {
    files: VecDeque<(usize, PathBuf)>,
    halves: VecDeque<Arc<Half>>,
    /// The walk has ended: no more files will come.
    walked: bool,
    /// Readers inside a file, which may still offer its second half.
    busy: usize,
}

/// A reader's next work.
enum Job {
    File(usize, PathBuf),
    Half(Arc<Half>),
}

/// Files found and not yet taken by a reader, at most: the walk waits for the readers
/// beyond that, so a tree of a million files does not queue a million paths.
const JOBS_MAX: usize = 4096;

impl Jobs {
    /// Queues a file, waiting while [`JOBS_MAX`] are queued; gives up (the file is
    /// not queued) once `stop` says the backup is over.
    fn push(&self, job: (usize, PathBuf), stop: &dyn Fn() -> bool) {
        let mut st = lock(&self.st);
        while st.files.len() >= JOBS_MAX {
            if stop() {
                return;
            }
            st = self
                .room
                .wait_timeout(st, std::time::Duration::from_millis(50))
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        st.files.push_back(job);
        self.queued.notify_one();
    }

    /// Offers the second half of a file a reader is cutting to the other readers.
    fn offer(&self, half: Arc<Half>) {
        lock(&self.st).halves.push_back(half);
        self.queued.notify_one();
    }

    /// The next work; None once the walk has ended, every file was taken and no
    /// reader is still in one. A file taken must be given back with [`Jobs::left`].
    fn pop(&self) -> Option<Job> {
        let mut st = lock(&self.st);
        loop {
            if let Some(h) = st.halves.pop_front() {
                return Some(Job::Half(h));
            }
            if let Some((no, path)) = st.files.pop_front() {
                if st.files.len() + 1 == JOBS_MAX {
                    self.room.notify_one();
                }
                st.busy += 1;
                return Some(Job::File(no, path));
            }
            if st.walked && st.busy == 0 {
                return None;
            }
            st = self
                .queued
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// A reader is done with a file it took.
    fn left(&self) {
        let mut st = lock(&self.st);
        st.busy -= 1;
        if st.busy == 0 && st.walked {
            self.queued.notify_all();
        }
    }

    fn finish(&self) {
        lock(&self.st).walked = true;
        self.queued.notify_all();
    }
}

/// Files of at least this many bytes are cut by two readers at once when one is free:
/// one from the start, one from the middle (see [`Worker::split_file`]).
const SPLIT_MIN: u64 = 32 << 20;

/// The second reader's first chunks held back until the first reader finds where their
/// cuts meet; from the next on it sends as it cuts. FastCDC's cuts depend only on the
/// bytes since the chunk's start, so two cutters started at different places cut at
/// the same place from the first cut they share; over a 1 GiB random file they
/// shared one within the second reader's first two chunks.
const HALF_HOLD: usize = 4;

/// The second half of a large file, offered to another reader by the reader cutting
/// it from the start.
struct Half {
    path: PathBuf,
    /// The file as the first reader opened it (a file replaced meanwhile is not read
    /// half old and half new), and its length then.
    file: Arc<File>,
    len: u64,
    /// Where the second reader starts.
    mid: u64,
    st: Mutex<HalfState>,
    cv: Condvar,
}

#[derive(Default)]
struct HalfState {
    claim: Claim,
    /// The second reader's cut points: `cuts[0]` is `mid`, `cuts[i]` the end of its
    /// `i`th chunk, named `ids[i - 1]`.
    cuts: Vec<u64>,
    ids: Vec<ChunkId>,
    /// Its first chunks' bytes (at most [`HALF_HOLD`]), not sent until the meeting
    /// point is known.
    held: Vec<Vec<u8>>,
    /// The last of its chunks it sent before the meeting point was known (0: none);
    /// their bytes are counted in the progress once it is known, if they are the file's.
    sent_undecided: usize,
    /// The held chunks were released, and the chunks sent undecided counted.
    settled: bool,
    /// It stopped: at the end of the file, or with the error that stopped it.
    ended: Option<Result<(), String>>,
    /// The first reader's decision.
    decided: Option<Meeting>,
}

#[derive(Default, PartialEq, Eq, Clone, Copy)]
enum Claim {
    #[default]
    Open,
    Taken,
    /// The first reader came to the middle first: it cuts the whole file.
    Withdrawn,
}

#[derive(Clone, Copy)]
enum Meeting {
    /// A chunk of the first reader ended at `cuts[j]`: the file's chunks are the first
    /// reader's, then the second's from its `j + 1`th on.
    At(usize),
    /// The first reader cut the file to its end alone.
    Alone,
}

impl Half {
    fn state(&self) -> std::sync::MutexGuard<'_, HalfState> {
        lock(&self.st)
    }

    fn wait<'g>(
        &self,
        g: std::sync::MutexGuard<'g, HalfState>,
    ) -> std::sync::MutexGuard<'g, HalfState> {
        self.cv
            .wait(g)
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The first reader's decision, unless it was made; wakes the second.
    fn decide(&self, m: Meeting) {
        let mut st = self.state();
        if st.decided.is_none() {
            st.decided = Some(m);
        }
        self.cv.notify_all();
    }

    /// The second reader stopped, unless it said so already; wakes the first.
    fn end(&self, r: Result<(), String>) {
        let mut st = self.state();
        if st.ended.is_none() {
            st.ended = Some(r);
        }
        self.cv.notify_all();
    }
}

impl HalfState {
    /// Once the meeting point is known (the first time only): the held chunks that are
    /// the file's, to send, and the bytes of the chunks sent before it was known that
    /// are the file's, to count.
    fn settle(&mut self) -> (Vec<(ChunkId, Vec<u8>)>, u64) {
        let Some(Meeting::At(j)) = self.decided.filter(|_| !self.settled) else {
            self.held.clear();
            return (Vec::new(), 0);
        };
        self.settled = true;
        // Held chunk k is chunk k + 1, which is the file's when it starts at or after
        // cuts[j].
        let held = std::mem::take(&mut self.held)
            .into_iter()
            .enumerate()
            .filter(|(k, _)| *k >= j)
            .map(|(k, d)| (self.ids[k], d))
            .collect();
        // Chunks HALF_HOLD + 1 ..= sent_undecided were sent; those after cuts[j] count.
        let from = j.max(HALF_HOLD);
        let bytes = match (self.cuts.get(self.sent_undecided), self.cuts.get(from)) {
            (Some(&to), Some(&at)) if self.sent_undecided > from => to - at,
            _ => 0,
        };
        (held, bytes)
    }
}

/// Makes sure the second reader hears a decision however the first one leaves.
struct Decides<'h>(&'h Half);

impl Drop for Decides<'_> {
    fn drop(&mut self) {
        self.0.decide(Meeting::Alone);
    }
}

/// Makes sure the first reader hears that the second stopped, however it leaves.
struct Ends<'h>(&'h Half);

impl Drop for Ends<'_> {
    fn drop(&mut self) {
        self.0
            .end(Err("the second reader of the file stopped".into()));
    }
}

/// Gives a file back to [`Jobs`] however its reader leaves it.
struct Left<'j>(&'j Jobs);

impl Drop for Left<'_> {
    fn drop(&mut self) {
        self.0.left();
    }
}

/// Chunks waiting to be sealed and sent: readers put, sealers take. Bounded in
/// bytes, so a fast reader waits for the sealers rather than filling memory.
#[derive(Default)]
struct SealQueue {
    st: Mutex<SealState>,
    cv: Condvar,
}

/// A batch's question to the server (HAS_CHUNKS, in parts of at most
/// [`MAX_HAS_CHUNKS`]), asked by the reader and answered for the sealers: the reader
/// goes on reading while the answer comes, and the first sealer to take one of the
/// batch's items waits for it.
struct Asked {
    st: Mutex<AskedState>,
}

enum AskedState {
    /// The answers to come, one a part, and how many ids each part asked about.
    Waiting(Vec<(Pending, usize)>),
    /// Held or not, one a chunk of the batch.
    Known(Vec<bool>),
    /// A sealer took the error (and reported it).
    Failed,
}

impl Asked {
    /// Whether the batch's chunks `at..at + n` are held; None when another sealer
    /// took the answer and failed (it reports the error).
    fn held(&self, at: usize, n: usize) -> Result<Option<Vec<bool>>, BackupError> {
        let mut st = lock(&self.st);
        if let AskedState::Waiting(parts) = &mut *st {
            let parts = std::mem::take(parts);
            *st = AskedState::Failed;
            let mut held = Vec::new();
            for (p, asked) in parts {
                match p.wait()? {
                    Answer::ChunksHeld(h) if h.len() == asked => held.extend(h),
                    _ => return Err(ConnError::UnexpectedAnswer("HAS_CHUNKS").into()),
                }
            }
            *st = AskedState::Known(held);
        }
        match &*st {
            AskedState::Known(h) => {
                h.get(at..at + n)
                    .map(|h| Some(h.to_vec()))
                    .ok_or(BackupError::Internal(
                        "a sealer's item is outside its batch",
                    ))
            }
            _ => Ok(None),
        }
    }
}

/// Chunks for the sealers: a slice of a batch (its first chunk is the batch's `at`th),
/// and the batch's question.
struct SealItem {
    chunks: Vec<(ChunkId, Vec<u8>)>,
    asked: Arc<Asked>,
    at: usize,
}

#[derive(Default)]
struct SealState {
    items: VecDeque<SealItem>,
    bytes: usize,
    /// No more items will come: sealers finish what is queued and stop.
    closed: bool,
    /// A sealer failed: readers and sealers stop at once.
    aborted: bool,
}

impl SealQueue {
    /// Queues an item, waiting for room; false once the queue was aborted.
    fn put(&self, item: SealItem) -> bool {
        let len = weight(&item.chunks);
        let mut st = lock(&self.st);
        while !st.aborted && !st.items.is_empty() && st.bytes + len > SEAL_QUEUE_BYTES {
            st = self
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if st.aborted {
            return false;
        }
        st.bytes += len;
        st.items.push_back(item);
        self.cv.notify_all();
        true
    }

    /// The next item; None once the queue is closed and empty, or aborted.
    fn take(&self) -> Option<SealItem> {
        let mut st = lock(&self.st);
        loop {
            if st.aborted {
                return None;
            }
            if let Some(item) = st.items.pop_front() {
                st.bytes -= weight(&item.chunks);
                self.cv.notify_all();
                return Some(item);
            }
            if st.closed {
                return None;
            }
            st = self
                .cv
                .wait(st)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn finish(&self, abort: bool) {
        let mut st = lock(&self.st);
        st.closed = true;
        st.aborted |= abort;
        self.cv.notify_all();
    }

    fn reopen(&self) {
        let mut st = lock(&self.st);
        *st = SealState::default();
    }
}

/// What an item costs the queue: its bytes, a tiny chunk counted as 512 (its
/// bookkeeping), so that a million tiny files cannot queue a million chunks.
fn weight(item: &[(ChunkId, Vec<u8>)]) -> usize {
    item.iter().map(|(_, d)| d.len().max(512)).sum()
}

/// Runs `body` (which queues chunks with [`Worker::flush`]) beside `n` sealer threads,
/// and returns once every chunk queued was sent and acknowledged as durable. The
/// first failure of a sealer or a reader wins over `body`'s own result.
fn with_sealers<R>(
    sh: &Shared<'_>,
    n: usize,
    body: impl FnOnce() -> Result<R, BackupError>,
) -> Result<R, BackupError> {
    sh.seal.reopen();
    let r = std::thread::scope(|s| {
        let sealers: Vec<_> = (0..n.max(1))
            .map(|_| {
                s.spawn(|| {
                    if let Err(e) = sealer(sh) {
                        // The error first, then the abort: a reader the abort wakes
                        // fails as "cancelled", which must not be what is reported.
                        fail(sh, e);
                    }
                })
            })
            .collect();
        let r = body();
        sh.seal.finish(false);
        for h in sealers {
            if h.join().is_err() {
                let mut f = lock(&sh.failed);
                if f.is_none() {
                    *f = Some(BackupError::Cancelled);
                }
            }
        }
        r
    });
    match lock(&sh.failed).take() {
        Some(e) => Err(e),
        None => r,
    }
}

/// Records the backup's first error, then stops the readers and sealers.
fn fail(sh: &Shared<'_>, e: BackupError) {
    {
        let mut f = lock(&sh.failed);
        if f.is_none() {
            *f = Some(e);
        }
    }
    sh.seal.finish(true);
}

/// A sealer: compresses, encrypts and sends queued chunks, taking the answers as
/// they come, and waits for the last ones before it returns.
fn sealer(sh: &Shared<'_>) -> Result<(), BackupError> {
    let key = sh.key.get()?;
    let mut rng = rand::thread_rng();
    let mut puts = AnswerQueue::default();
    while let Some(item) = sh.seal.take() {
        let Some(held) = item.asked.held(item.at, item.chunks.len())? else {
            // Another sealer failed on this batch, and reports why.
            return Ok(());
        };
        for ((id, data), h) in item.chunks.into_iter().zip(held) {
            if h {
                sh.held.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if sh.progress.cancel.load(Ordering::Relaxed) {
                return Err(BackupError::Cancelled);
            }
            let blob = key.seal_chunk_with_id(&id, &data, sh.compress, &mut rng);
            drop(data);
            let len = blob.len() as u64;
            sh.conn
                .submit_to(&Request::PutChunk { id, blob }, &mut puts)?;
            sh.sent.fetch_add(1, Ordering::Relaxed);
            sh.bytes_sent.fetch_add(len, Ordering::Relaxed);
            sh.progress.bytes_sent.fetch_add(len, Ordering::Relaxed);
            reap(&mut puts, false)?;
        }
    }
    reap(&mut puts, true)
}

/// Takes the answers to PUT_CHUNK that are here (all of them with `all`).
fn reap(puts: &mut AnswerQueue, all: bool) -> Result<(), BackupError> {
    loop {
        let r = if all {
            puts.wait_next()
        } else {
            puts.try_next()
        };
        match r {
            None => return Ok(()),
            Some(Ok(Answer::ChunkStored { .. })) => {}
            Some(Ok(_)) => return Err(ConnError::UnexpectedAnswer("PUT_CHUNK").into()),
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// What a reader does with each chunk it cuts ([`Worker::cut`]): it takes the chunk's
/// end in the file, its name and its bytes, and answers whether to go on.
type OnChunk<'f, W> = dyn FnMut(&mut W, u64, ChunkId, &[u8]) -> Result<bool, BackupError> + 'f;

/// Chunks gathered and not yet asked about.
#[derive(Default)]
struct Batch {
    chunks: Vec<(ChunkId, Vec<u8>)>,
    bytes: usize,
}

struct Worker<'s, 'a> {
    sh: &'s Shared<'a>,
    /// The read buffer, kept across files.
    buf: Vec<u8>,
    batch: Batch,
}

impl<'s, 'a> Worker<'s, 'a> {
    fn new(sh: &'s Shared<'a>) -> Self {
        Worker {
            sh,
            buf: Vec::new(),
            batch: Batch::default(),
        }
    }

    fn run(&mut self) -> Result<(), BackupError> {
        loop {
            if self.sh.progress.cancel.load(Ordering::Relaxed) {
                return Err(BackupError::Cancelled);
            }
            if lock(&self.sh.failed).is_some() {
                return Ok(());
            }
            let (idx, path) = match self.sh.jobs.pop() {
                None => break,
                Some(Job::Half(h)) => {
                    self.second_half(&h)?;
                    continue;
                }
                Some(Job::File(idx, path)) => (idx, path),
            };
            let left = Left(&self.sh.jobs);
            lock(&self.sh.progress.current).clone_from(&path);
            let r = self.file(&path);
            drop(left);
            let r = match r {
                Ok(ids) => Ok(ids),
                Err(BackupError::Io { source, .. }) => Err((path, source.to_string())),
                Err(e) => return Err(e),
            };
            self.sh.progress.files_done.fetch_add(1, Ordering::Relaxed);
            lock(&self.sh.results).push(idx, r);
        }
        self.flush()
    }

    /// Reads and cuts one file (a large one with the help of another reader).
    fn file(&mut self, path: &Path) -> Result<(Vec<ChunkId>, u64), BackupError> {
        let io = |source| BackupError::Io {
            path: path.to_owned(),
            source,
        };
        let f = File::open(path).map_err(io)?;
        let len = f.metadata().map_or(0, |m| m.len());
        let mut ahead = ReadAhead {
            f: Arc::new(f),
            len,
            pos: 0,
            hinted: 0,
        };
        // The disk starts on the file's first pieces as it is opened.
        ahead.hint();
        if len >= SPLIT_MIN {
            return self.split_file(&mut ahead, path, len);
        }
        self.chunks_of(&mut ahead, path, Some(len))
    }

    /// Reads `src` to its end, cutting, naming and queueing its chunks.
    fn chunks_of(
        &mut self,
        f: &mut dyn Read,
        path: &Path,
        size: Option<u64>,
    ) -> Result<(Vec<ChunkId>, u64), BackupError> {
        let mut ids = Vec::new();
        let mut total = 0u64;
        self.cut(f, path, 0, size, &mut |w, _, id, data| {
            ids.push(id);
            total += data.len() as u64;
            w.count(data.len() as u64);
            w.add(id, data.to_vec())?;
            Ok(true)
        })?;
        Ok((ids, total))
    }

    /// Counts bytes of files as done, for the progress.
    fn count(&self, n: u64) {
        self.sh.progress.bytes_done.fetch_add(n, Ordering::Relaxed);
    }

    /// A large file, cut by this reader from the start and, if another reader is free
    /// before this one reaches the middle, by that one from the middle (`second_half`).
    /// Where one of this reader's chunks ends on one of the other's cuts, the two
    /// readers' cuts are the same from there to the end of the file, so the file's
    /// chunks are this reader's up to there and the other's after: the same chunks as
    /// one reader would cut. The other's first [`HALF_HOLD`] chunks wait to be sent
    /// until that place is known; if the readers meet later, what the other sent before
    /// it is not part of the snapshot (the server collects it as unreferenced).
    fn split_file(
        &mut self,
        f: &mut ReadAhead,
        path: &Path,
        len: u64,
    ) -> Result<(Vec<ChunkId>, u64), BackupError> {
        let mid = len / 2;
        let half = Arc::new(Half {
            path: path.to_owned(),
            file: Arc::clone(&f.f),
            len,
            mid,
            st: Mutex::new(HalfState {
                cuts: vec![mid],
                ..HalfState::default()
            }),
            cv: Condvar::new(),
        });
        let _decides = Decides(&half);
        self.sh.jobs.offer(Arc::clone(&half));
        let mut ids = Vec::new();
        let mut total = 0u64;
        let mut alone = false;
        let mut met = None;
        self.cut(f, path, 0, Some(len), &mut |w, end, id, data| {
            ids.push(id);
            total += data.len() as u64;
            w.count(data.len() as u64);
            w.add(id, data.to_vec())?;
            if alone || end < mid {
                return Ok(true);
            }
            let mut st = half.state();
            // Not taken yet; or this reader has the whole file already.
            if st.claim == Claim::Open || end >= len {
                if st.claim == Claim::Open {
                    st.claim = Claim::Withdrawn;
                }
                alone = true;
                return Ok(true);
            }
            loop {
                if let Ok(j) = st.cuts.binary_search(&end) {
                    met = Some(j);
                    return Ok(false);
                }
                if st.cuts.last().is_some_and(|&c| c > end) {
                    return Ok(true);
                }
                if st.ended.is_some() {
                    // It stopped short of here (an error, or a file that shrank).
                    alone = true;
                    return Ok(true);
                }
                st = half.wait(st);
            }
        })?;
        let Some(j) = met else {
            half.decide(Meeting::Alone);
            return Ok((ids, total));
        };
        half.decide(Meeting::At(j));
        let mut st = half.state();
        while st.ended.is_none() {
            st = half.wait(st);
        }
        match &st.ended {
            Some(Ok(())) => {
                ids.extend_from_slice(&st.ids[j..]);
                total += st.cuts.last().map_or(0, |&c| c - st.cuts[j]);
                Ok((ids, total))
            }
            Some(Err(e)) => Err(BackupError::Io {
                path: path.to_owned(),
                source: std::io::Error::other(e.clone()),
            }),
            None => unreachable!("waited for above"),
        }
    }

    /// Cuts a file's second half for the reader of its first (see `split_file`).
    fn second_half(&mut self, h: &Half) -> Result<(), BackupError> {
        {
            let mut st = h.state();
            if st.claim != Claim::Open {
                return Ok(());
            }
            st.claim = Claim::Taken;
        }
        let _ends = Ends(h);
        match self.cut_second_half(h) {
            Ok(()) => h.end(Ok(())),
            // The first reader reports it, as the file's own error.
            Err(BackupError::Io { source, .. }) => {
                h.end(Err(source.to_string()));
                return Ok(());
            }
            Err(e) => return Err(e),
        }
        // The held chunks from the meeting point on are the file's: sent now.
        let mut st = h.state();
        while st.decided.is_none() {
            st = h.wait(st);
        }
        let (release, mut counted) = st.settle();
        counted += release.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        drop(st);
        self.count(counted);
        for (id, data) in release {
            self.add(id, data)?;
        }
        Ok(())
    }

    fn cut_second_half(&mut self, h: &Half) -> Result<(), BackupError> {
        let mut ahead = ReadAhead {
            f: Arc::clone(&h.file),
            len: h.len,
            pos: h.mid,
            hinted: h.mid,
        };
        ahead.hint();
        let rest = h.len.saturating_sub(h.mid);
        let cancel = &self.sh.progress.cancel;
        self.cut(
            &mut ahead,
            &h.path,
            h.mid,
            Some(rest),
            &mut |w, end, id, data| {
                if cancel.load(Ordering::Relaxed) {
                    return Err(BackupError::Cancelled);
                }
                let mut st = h.state();
                st.cuts.push(end);
                st.ids.push(id);
                let i = st.ids.len();
                h.cv.notify_all();
                // (chunks to send, bytes to count as the file's)
                let (send, counted) = match st.decided {
                    Some(Meeting::Alone) => return Ok(false),
                    Some(Meeting::At(j)) => {
                        let (mut now, mut counted) = st.settle();
                        counted += now.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
                        if i > j {
                            now.push((id, data.to_vec()));
                            counted += data.len() as u64;
                        }
                        (now, counted)
                    }
                    None if i <= HALF_HOLD => {
                        st.held.push(data.to_vec());
                        (Vec::new(), 0)
                    }
                    None => {
                        st.sent_undecided = i;
                        (vec![(id, data.to_vec())], 0)
                    }
                };
                drop(st);
                w.count(counted);
                for (id, data) in send {
                    w.add(id, data)?;
                }
                Ok(true)
            },
        )
    }

    /// Reads `f` to its end, or until `on_chunk` answers false, cutting it into chunks
    /// and naming them; `on_chunk` takes each chunk's end (as an offset from `start`,
    /// where `f` stands), name and bytes. `size`: how many bytes are expected, if known. The file is read into the worker's buffer in
    /// large pieces and cut there (FastCDC over a slice finds the same cut points as
    /// over the stream, since a cut depends only on the bytes since the chunk's start);
    /// the last chunk of a piece that is not the end of the file moves to the front of
    /// the buffer and is cut again with the next piece.
    fn cut(
        &mut self,
        f: &mut dyn Read,
        path: &Path,
        start: u64,
        size: Option<u64>,
        on_chunk: &mut OnChunk<'_, Self>,
    ) -> Result<(), BackupError> {
        let io = |source| BackupError::Io {
            path: path.to_owned(),
            source,
        };
        let key = self.sh.key.get()?;
        let mut buf = std::mem::take(&mut self.buf);
        // As large as what is to come, up to READ_BUF: a reader of tiny files does not
        // hold 16 MiB. A buffer too small to hold a whole chunk grows below.
        let want = size.map_or(READ_BUF, |n| {
            usize::try_from(n)
                .unwrap_or(READ_BUF)
                .saturating_add(1)
                .clamp(MIN_READ_BUF, READ_BUF)
        });
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let mut len = 0;
        let mut eof = false;
        let mut read_err = None;
        // Where buf[0] stands in the file.
        let mut at = start;
        let r = loop {
            while len < buf.len() && !eof {
                match f.read(&mut buf[len..]) {
                    Ok(0) => eof = true,
                    Ok(n) => len += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // What was read is still cut (all but the last, unfinished
                        // chunk), so that a stream resent after a break reuses it.
                        read_err = Some(e);
                        break;
                    }
                }
            }
            let mut consumed = 0;
            let mut stop = None;
            for c in fastcdc::v2020::FastCDC::new(&buf[..len], CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
                let end = c.offset + c.length;
                if end == len && !eof {
                    break;
                }
                let data = &buf[c.offset..end];
                let id = key.chunk_id(data);
                consumed = end;
                match on_chunk(self, at + end as u64, id, data) {
                    Ok(true) => {}
                    Ok(false) => {
                        stop = Some(Ok(()));
                        break;
                    }
                    Err(e) => {
                        stop = Some(Err(e));
                        break;
                    }
                }
            }
            if let Some(r) = stop {
                break r;
            }
            if consumed == 0 && len == buf.len() && !eof && read_err.is_none() {
                // Full, and no chunk ends before its end (the file is longer than
                // it was): the largest buffer holds a chunk of the largest size.
                buf.resize(READ_BUF, 0);
                continue;
            }
            buf.copy_within(consumed..len, 0);
            len -= consumed;
            at += consumed as u64;
            if let Some(e) = read_err.take() {
                break Err(io(e));
            }
            if eof && len == 0 {
                break Ok(());
            }
        };
        self.buf = buf;
        r
    }

    fn add(&mut self, id: ChunkId, data: Vec<u8>) -> Result<(), BackupError> {
        if !lock(&self.sh.known).insert(known_key(&id)) {
            self.sh.held.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.batch.bytes += data.len();
        self.batch.chunks.push((id, data));
        if self.batch.bytes >= BATCH_BYTES || self.batch.chunks.len() >= BATCH_CHUNKS {
            self.flush()?;
        }
        Ok(())
    }

    /// Asks which of the batch's chunks are held, and hands the batch to the sealers
    /// with the question: they send the chunks the server does not hold. The reader
    /// does not wait for the answer.
    fn flush(&mut self) -> Result<(), BackupError> {
        let batch = std::mem::take(&mut self.batch);
        if batch.chunks.is_empty() {
            return Ok(());
        }
        let mut parts = Vec::new();
        for part in batch.chunks.chunks(MAX_HAS_CHUNKS as usize) {
            let ids = part.iter().map(|(id, _)| *id).collect();
            parts.push((self.sh.conn.submit(&Request::HasChunks(ids))?, part.len()));
        }
        let asked = Arc::new(Asked {
            st: Mutex::new(AskedState::Waiting(parts)),
        });
        let mut item = Vec::new();
        let mut item_bytes = 0;
        let mut at = 0;
        for (id, data) in batch.chunks {
            if !item.is_empty()
                && (item_bytes + data.len() > SEAL_ITEM_BYTES || item.len() >= SEAL_ITEM_CHUNKS)
            {
                let n = item.len();
                self.queue(std::mem::take(&mut item), &asked, at)?;
                at += n;
                item_bytes = 0;
            }
            item_bytes += data.len();
            item.push((id, data));
        }
        if !item.is_empty() {
            self.queue(item, &asked, at)?;
        }
        Ok(())
    }

    fn queue(
        &self,
        chunks: Vec<(ChunkId, Vec<u8>)>,
        asked: &Arc<Asked>,
        at: usize,
    ) -> Result<(), BackupError> {
        let item = SealItem {
            chunks,
            asked: Arc::clone(asked),
            at,
        };
        if self.sh.seal.put(item) {
            Ok(())
        } else {
            // A sealer failed; its error is the one reported.
            Err(BackupError::Cancelled)
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A file that is not on disk, backed up from a reader: standard input, or a v3
/// upload being imported.
pub struct NamedStream<'a> {
    /// Its path in the snapshot (relative, `/`-separated).
    pub path: String,
    pub mtime_ns: i64,
    pub mode: u32,
    pub reader: Box<dyn Read + Send + 'a>,
}

/// Backs `paths` up as one snapshot (or standard input, with
/// [`BackupOptions::stdin_name`]).
pub fn backup(
    conn: &Connection,
    key: &RepoKey,
    paths: &[PathBuf],
    opts: &BackupOptions,
    progress: &BackupProgress,
) -> Result<BackupSummary, BackupError> {
    backup_unlocking(conn, &PendingKey::ready(key), paths, opts, progress)
}

/// [`backup`] with a key that may still be being unwrapped
/// ([`open_unlocking`](super::open_unlocking)): the walk starts at once, and the
/// parent snapshot is looked up, and files read, once the key is open.
pub fn backup_unlocking(
    conn: &Connection,
    key: &PendingKey<'_>,
    paths: &[PathBuf],
    opts: &BackupOptions,
    progress: &BackupProgress,
) -> Result<BackupSummary, BackupError> {
    match &opts.stdin_name {
        None => backup_inner(conn, key, paths, None, opts, progress),
        Some(name) => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64);
            let stream = NamedStream {
                path: name.clone(),
                mtime_ns: now,
                mode: 0o644,
                reader: Box::new(std::io::stdin()),
            };
            let named = vec![format!("(stdin) {name}").into_bytes()];
            let key = key.get()?;
            backup_streams(conn, key, vec![stream], named, opts, progress)
        }
    }
}

/// Backs named streams up as one snapshot, read one after the other; `named` is what
/// the snapshot says it holds (its paths in `snapshots`).
pub fn backup_streams(
    conn: &Connection,
    key: &RepoKey,
    mut streams: Vec<NamedStream<'_>>,
    named: Vec<Vec<u8>>,
    opts: &BackupOptions,
    progress: &BackupProgress,
) -> Result<BackupSummary, BackupError> {
    // The manifest lists entries in path order, each path once.
    streams.sort_by(|a, b| a.path.trim_matches('/').cmp(b.path.trim_matches('/')));
    if let Some(w) = streams
        .windows(2)
        .find(|w| w[0].path.trim_matches('/') == w[1].path.trim_matches('/'))
    {
        return Err(BackupError::Io {
            path: w[0].path.clone().into(),
            source: std::io::Error::other("two files of the same name"),
        });
    }
    let mut entries = Vec::with_capacity(streams.len());
    for s in &streams {
        let path = s.path.trim_matches('/').as_bytes().to_vec();
        if !cyberbackup_protocol::v4::format::safe_path(&path) {
            return Err(BackupError::Io {
                path: s.path.clone().into(),
                source: std::io::Error::other("not a usable file name in a snapshot"),
            });
        }
        entries.push(Entry {
            path,
            kind: EntryKind::File { chunks: Vec::new() },
            mode: s.mode,
            mtime_ns: s.mtime_ns,
            size: 0,
        });
    }
    let walked = Walked {
        entries,
        file_index: Vec::new(),
        skipped: Vec::new(),
        named,
    };
    backup_inner(
        conn,
        &PendingKey::ready(key),
        &[],
        Some((walked, streams)),
        opts,
        progress,
    )
}

/// How many times in all a backup is run when the server refuses its commit because
/// chunks the snapshot names are not stored (MISSING_CHUNKS): a collection (on any
/// node sharing the registry) deleted them while the backup ran, after the server had
/// answered HAS_CHUNKS that it held them (chunks no snapshot names, asked about longer
/// ago than the grace period: a backup that ran longer than it), or they were the
/// parent snapshot's and it was forgotten and collected meanwhile.
const COMMIT_ATTEMPTS: u32 = 3;

/// A backup, run again while its commit is refused for chunks collected meanwhile
/// (at most [`COMMIT_ATTEMPTS`] times in all; streams only once).
fn backup_inner(
    conn: &Connection,
    key: &PendingKey<'_>,
    paths: &[PathBuf],
    mut streams: Option<(Walked, Vec<NamedStream<'_>>)>,
    opts: &BackupOptions,
    progress: &BackupProgress,
) -> Result<BackupSummary, BackupError> {
    let started = Instant::now();
    let from_streams = streams.is_some();
    let mut o = opts.clone();
    let mut attempt = 1;
    loop {
        match backup_attempt(conn, key, paths, streams.take(), &o, progress)? {
            Committed::Done(mut s) => {
                s.seconds = started.elapsed().as_secs_f64();
                return Ok(s);
            }
            // Streams cannot be read again.
            Committed::Missing { refused, .. } if from_streams => {
                return Err(missing_chunks(
                    refused,
                    "collected while the backup ran; its input cannot be read again: run \
                     the backup again",
                ));
            }
            Committed::Missing { refused, .. } if attempt >= COMMIT_ATTEMPTS => {
                return Err(missing_chunks(
                    refused,
                    &format!(
                        "collected while the backup ran; the backup was run {attempt} times, \
                         sending the missing chunks again each time, and nothing was committed"
                    ),
                ));
            }
            Committed::Missing {
                parent_used,
                refused,
            } => {
                let missing = refused.missing_ids().len();
                let next = attempt + 1;
                if parent_used {
                    tracing::warn!(
                        missing,
                        "the server no longer holds {missing} chunks this backup named \
                         (collected while it ran, perhaps the parent snapshot's, or found \
                         damaged by the server's scrub): reading \
                         every file again and sending what is missing (attempt {next} of \
                         {COMMIT_ATTEMPTS})"
                    );
                } else {
                    tracing::warn!(
                        missing,
                        "the server no longer holds {missing} chunks this backup named \
                         (collected while it ran, or found damaged by the server's scrub): \
                         reading the files again and sending what \
                         is missing (attempt {next} of {COMMIT_ATTEMPTS})"
                    );
                }
                // The run again asks HAS_CHUNKS about every chunk it cuts (nothing it
                // was told is kept: the set of known chunks is the run's own), so the
                // chunks gone are answered "not held" and sent. With a parent, whose
                // chunks are taken without asking and may be the ones gone, every
                // file is read.
                if parent_used {
                    o.force = true;
                }
                attempt += 1;
                restart(progress);
            }
        }
    }
}

/// The MISSING_CHUNKS refusal of a commit, with what happened.
fn missing_chunks(mut refused: ErrorAnswer, what: &str) -> BackupError {
    refused.message = format!("{} ({what})", refused.message);
    ConnError::Server(refused).into()
}

/// Progress counted again from zero, for a backup run again (what was sent stays
/// counted).
fn restart(progress: &BackupProgress) {
    for n in [
        &progress.files_total,
        &progress.bytes_total,
        &progress.files_done,
        &progress.bytes_done,
    ] {
        n.store(0, Ordering::Relaxed);
    }
}

/// One run of a backup: walk, read, send, commit.
fn backup_attempt(
    conn: &Connection,
    key: &PendingKey<'_>,
    paths: &[PathBuf],
    streams: Option<(Walked, Vec<NamedStream<'_>>)>,
    opts: &BackupOptions,
    progress: &BackupProgress,
) -> Result<Committed, BackupError> {
    let (roots, named, given) = match streams {
        None => {
            let (roots, named) = walk_roots(paths)?;
            (roots, named, None)
        }
        Some((w, s)) => (Vec::new(), w.named.clone(), Some((w, s))),
    };
    let from_streams = given.is_some();
    let mut summary = BackupSummary::default();
    // The parent: the newest snapshot of this host with the same paths.
    // A device without the read capability (backup-only) cannot read the parent: it
    // reads every file, and the server's HAS_CHUNKS still spares what it holds.
    let can_read =
        conn.welcome().capabilities & cyberbackup_protocol::v4::Capabilities::READ.0 != 0;
    let look_for_parent = !(opts.force || !can_read || from_streams);
    let shared = shared(conn, key, opts.compress, progress);
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let readers = if opts.workers == 0 {
        cpus
    } else {
        opts.workers
    };
    let unchanged = AtomicU64::new(0);
    let stopped = || progress.cancel.load(Ordering::Relaxed) || lock(&shared.failed).is_some();
    // The walk starts before the key is open and the parent known (the Argon2id
    // unwrap and the parent's manifest take a while, and a cold tree's walk waits on
    // the disk): files found before are held in `early` and sorted out when the
    // parent is known.
    let parent_files: std::sync::OnceLock<ParentFiles> = std::sync::OnceLock::new();
    let early: Mutex<Vec<Early>> = Mutex::new(Vec::new());
    let early_room = Condvar::new();
    // Files found before the parent was known that it holds unchanged: (file number,
    // chunks), put in their entries after the walk.
    let late_unchanged: Mutex<Vec<(usize, Vec<ChunkId>)>> = Mutex::new(Vec::new());
    let reused = |size: u64| {
        unchanged.fetch_add(1, Ordering::Relaxed);
        progress.files_done.fetch_add(1, Ordering::Relaxed);
        progress.bytes_done.fetch_add(size, Ordering::Relaxed);
    };
    // Each file the walk finds is taken from the parent when its size and time match,
    // else queued for the readers: the walk and the reading overlap.
    let on_file = |no: usize, disk: &Path, e: &mut Entry| {
        progress.files_total.fetch_add(1, Ordering::Relaxed);
        progress.bytes_total.fetch_add(e.size, Ordering::Relaxed);
        let parent = match parent_files.get() {
            Some(p) => p,
            None => {
                let mut held = lock(&early);
                // The parent is set under this lock: look again. At most JOBS_MAX
                // files wait for it (a million-file tree whose parent takes longer
                // than its walk does not hold them all); the walk waits beyond that.
                loop {
                    if let Some(p) = parent_files.get() {
                        break p;
                    }
                    if held.len() < JOBS_MAX {
                        held.push(Early {
                            no,
                            disk: disk.to_owned(),
                            path: e.path.clone(),
                            size: e.size,
                            mtime_ns: e.mtime_ns,
                        });
                        return;
                    }
                    if stopped() {
                        return;
                    }
                    held = early_room
                        .wait_timeout(held, std::time::Duration::from_millis(50))
                        .map_or_else(|p| p.into_inner().0, |r| r.0);
                }
            }
        };
        match unchanged_chunks(parent, &e.path, e.size, e.mtime_ns) {
            Some(chunks) => {
                e.kind = EntryKind::File {
                    chunks: chunks.to_vec(),
                };
                reused(e.size);
            }
            None => shared.jobs.push((no, disk.to_owned()), &stopped),
        }
    };
    // Opens the key, finds the parent, and lets the files found so far go on.
    let find_parent = || -> Result<Option<SnapshotId>, BackupError> {
        let key = shared.key.get()?;
        let parent = if look_for_parent {
            snapshots::find_parent(conn, key, &opts.host, &named)?
        } else {
            None
        };
        let mut files = ParentFiles::new();
        let mut id = None;
        if let Some((pid, entries)) = parent {
            id = Some(pid);
            let mut known = lock(&shared.known);
            for e in entries {
                if let EntryKind::File { chunks } = e.kind {
                    known.extend(chunks.iter().map(known_key));
                    files.insert(e.path, (e.size, e.mtime_ns, chunks));
                }
            }
        }
        let (files, held) = {
            let mut held = lock(&early);
            (
                parent_files.get_or_init(|| files),
                std::mem::take(&mut *held),
            )
        };
        early_room.notify_all();
        for f in held {
            match unchanged_chunks(files, &f.path, f.size, f.mtime_ns) {
                Some(chunks) => {
                    lock(&late_unchanged).push((f.no, chunks.to_vec()));
                    reused(f.size);
                }
                None => shared.jobs.push((f.no, f.disk), &stopped),
            }
        }
        Ok(id)
    };
    let (mut walked, results, parent) = with_sealers(&shared, cpus, || {
        let (walked, parent) = std::thread::scope(|s| {
            for _ in 0..readers {
                s.spawn(|| {
                    let mut w = Worker::new(&shared);
                    if let Err(e) = w.run() {
                        fail(&shared, e);
                    }
                });
            }
            // A panic there is caught and fails the backup at once: the walk may be
            // waiting for the parent.
            let parent = s.spawn(|| {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&find_parent))
                    .unwrap_or(Err(BackupError::Internal(PARENT_PANICKED)))
                {
                    Ok(id) => id,
                    Err(e) => {
                        fail(&shared, e);
                        None
                    }
                }
            });
            let walked = match &given {
                None => Some(walk(roots, named.clone(), &opts.filter, &on_file, &stopped)),
                Some(_) => None,
            };
            // The files the walk found before the parent was known are queued by
            // `find_parent`: the readers run out of work only after it.
            // (Its files would be neither read nor taken from the parent.)
            let parent = parent.join().unwrap_or_else(|_| {
                fail(&shared, BackupError::Internal(PARENT_PANICKED));
                None
            });
            shared.jobs.finish();
            (walked, parent)
        });
        // A walk cut short by a failure or Ctrl-C is not committed.
        if lock(&shared.failed).is_some() || progress.cancel.load(Ordering::Relaxed) {
            return Err(BackupError::Cancelled);
        }
        let results = std::mem::take(&mut *lock(&shared.results));
        let walked = match (walked, given) {
            (Some(w), _) => w,
            (None, Some((mut w, streams))) => {
                let mut worker = Worker::new(&shared);
                for (i, mut s) in streams.into_iter().enumerate() {
                    progress.files_total.fetch_add(1, Ordering::Relaxed);
                    let (chunks, size) =
                        worker.chunks_of(&mut s.reader, Path::new(&s.path), None)?;
                    w.entries[i].kind = EntryKind::File { chunks };
                    w.entries[i].size = size;
                    progress.files_done.fetch_add(1, Ordering::Relaxed);
                }
                worker.flush()?;
                w
            }
            (None, None) => unreachable!("either walked or given"),
        };
        Ok((walked, results, parent))
    })?;
    summary.parent = parent;
    for (no, chunks) in late_unchanged
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        let idx = walked.file_index[no];
        walked.entries[idx].kind = EntryKind::File { chunks };
    }
    summary.files_unchanged = unchanged.load(Ordering::Relaxed);
    summary.skipped = std::mem::take(&mut walked.skipped);
    if walked.entries.is_empty() {
        let why: Vec<String> = summary
            .skipped
            .iter()
            .map(|(p, w)| format!("{}: {w}", p.display()))
            .collect();
        return Err(BackupError::Empty(if why.is_empty() {
            "no paths".into()
        } else {
            why.join("; ")
        }));
    }
    // Files that could not be read are left out of the snapshot (and reported).
    let Results {
        read,
        chunks,
        failed,
    } = results;
    let mut at = 0;
    for (no, n, size) in read {
        let e = &mut walked.entries[walked.file_index[no]];
        // A file that grew or shrank while it was read is stored as read.
        e.kind = EntryKind::File {
            chunks: chunks[at..at + n].to_vec(),
        };
        e.size = size;
        at += n;
    }
    drop(chunks);
    let mut drop_idx = HashSet::new();
    for (no, disk, msg) in failed {
        summary.skipped.push((disk, msg));
        drop_idx.insert(walked.file_index[no]);
    }
    let entries: Vec<Entry> = walked
        .entries
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !drop_idx.contains(i))
        .map(|(_, e)| e)
        .collect();
    commit_with(&shared, entries, walked.named, summary, opts)
}

/// What [`upload_stream`] sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamUpload {
    /// The stream's chunks, in order.
    pub chunks: Vec<ChunkId>,
    /// Its bytes.
    pub size: u64,
    pub chunks_sent: u64,
    pub chunks_held: u64,
    pub bytes_sent: u64,
}

fn shared<'a>(
    conn: &'a Connection,
    key: &'a PendingKey<'a>,
    compress: bool,
    progress: &'a BackupProgress,
) -> Shared<'a> {
    Shared {
        conn,
        key,
        compress,
        known: Mutex::new(HashSet::new()),
        jobs: Jobs::default(),
        results: Mutex::new(Results::default()),
        failed: Mutex::new(None),
        sent: AtomicU64::new(0),
        held: AtomicU64::new(0),
        bytes_sent: AtomicU64::new(0),
        progress,
        seal: SealQueue::default(),
    }
}

/// Cuts a stream into chunks and sends those the server does not hold (asking first,
/// in batches), and returns once every chunk sent is durable: the building block of
/// a backup assembled piece by piece, as the bridge does for a browser's upload. A
/// stream sent again (a resumed upload) sends nothing the server already holds.
pub fn upload_stream(
    conn: &Connection,
    key: &RepoKey,
    reader: &mut dyn Read,
    name: &Path,
    compress: bool,
    progress: &BackupProgress,
) -> Result<StreamUpload, BackupError> {
    let key = PendingKey::ready(key);
    let sh = shared(conn, &key, compress, progress);
    let sealers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let (chunks, size) = with_sealers(&sh, sealers, || {
        let mut w = Worker::new(&sh);
        // A stream that broke off (a dropped upload) still sends the chunks cut
        // before the break: they are whole, and a resend of the stream finds them
        // held.
        let r = w.chunks_of(reader, name, None);
        let flushed = w.flush();
        let r = r?;
        flushed.map(|()| r)
    })?;
    Ok(StreamUpload {
        chunks,
        size,
        chunks_sent: sh.sent.load(Ordering::Relaxed),
        chunks_held: sh.held.load(Ordering::Relaxed),
        bytes_sent: sh.bytes_sent.load(Ordering::Relaxed),
    })
}

/// A file whose chunks are on the server (from [`upload_stream`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadedFile {
    /// Its path in the snapshot (relative, `/`-separated).
    pub path: String,
    pub mode: u32,
    pub mtime_ns: i64,
    pub size: u64,
    pub chunks: Vec<ChunkId>,
}

/// Commits a snapshot of files already uploaded with [`upload_stream`]; each parent
/// directory gets an entry of its own (mode 0755, the newest of its files' times).
/// `named` is what the snapshot says it holds.
pub fn commit_files(
    conn: &Connection,
    key: &RepoKey,
    mut files: Vec<UploadedFile>,
    named: Vec<Vec<u8>>,
    opts: &BackupOptions,
) -> Result<BackupSummary, BackupError> {
    let started = Instant::now();
    files.sort_by(|a, b| a.path.trim_matches('/').cmp(b.path.trim_matches('/')));
    let mut dirs: std::collections::BTreeMap<Vec<u8>, i64> = std::collections::BTreeMap::new();
    let mut entries: Vec<Entry> = Vec::with_capacity(files.len());
    let mut last: Option<Vec<u8>> = None;
    for f in files {
        let path = f.path.trim_matches('/').as_bytes().to_vec();
        if !cyberbackup_protocol::v4::format::safe_path(&path) {
            return Err(BackupError::Io {
                path: f.path.into(),
                source: std::io::Error::other("not a usable file name in a snapshot"),
            });
        }
        if last.as_ref() == Some(&path) {
            return Err(BackupError::Io {
                path: f.path.into(),
                source: std::io::Error::other("two files of the same name"),
            });
        }
        let mut p = &path[..];
        while let Some(i) = p.iter().rposition(|&b| b == b'/') {
            p = &p[..i];
            let t = dirs.entry(p.to_vec()).or_insert(f.mtime_ns);
            *t = (*t).max(f.mtime_ns);
        }
        last = Some(path.clone());
        entries.push(Entry {
            path,
            kind: EntryKind::File { chunks: f.chunks },
            mode: f.mode,
            mtime_ns: f.mtime_ns,
            size: f.size,
        });
    }
    if entries.is_empty() {
        return Err(BackupError::Empty("no files".into()));
    }
    let file_paths: HashSet<&[u8]> = entries.iter().map(|e| &e.path[..]).collect();
    if let Some(path) = dirs.keys().find(|d| file_paths.contains(&d[..])) {
        return Err(BackupError::Io {
            path: String::from_utf8_lossy(path).into_owned().into(),
            source: std::io::Error::other("a file and a directory of the same name"),
        });
    }
    drop(file_paths);
    for (path, mtime_ns) in dirs {
        entries.push(Entry {
            path,
            kind: EntryKind::Dir,
            mode: 0o755,
            mtime_ns,
            size: 0,
        });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let progress = BackupProgress::default();
    let key = PendingKey::ready(key);
    let sh = shared(conn, &key, opts.compress, &progress);
    match commit_with(&sh, entries, named, BackupSummary::default(), opts)? {
        Committed::Done(mut s) => {
            s.seconds = started.elapsed().as_secs_f64();
            Ok(s)
        }
        // The files were uploaded before: they cannot be read again here.
        Committed::Missing { refused, .. } => Err(missing_chunks(
            refused,
            "collected since the files were uploaded: upload them again",
        )),
    }
}

/// How a commit ended.
enum Committed {
    Done(BackupSummary),
    /// The server refused the commit (MISSING_CHUNKS, `refused`): it no longer holds
    /// chunks the snapshot names. `parent_used`: some were taken from the parent
    /// snapshot without asking the server.
    Missing {
        parent_used: bool,
        refused: ErrorAnswer,
    },
}

/// Entries read as their manifest encoding, a few at a time.
struct EncodedEntries<I> {
    entries: I,
    buf: Vec<u8>,
    pos: usize,
}

impl<I: Iterator<Item = Entry>> Read for EncodedEntries<I> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
            while self.buf.len() < 64 << 10 {
                match self.entries.next() {
                    Some(e) => e.encode(&mut self.buf),
                    None => break,
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Writes the manifest of `entries` (in path order, their chunks on the server), sends
/// its chunks and commits the snapshot.
fn commit_with(
    shared: &Shared<'_>,
    entries: Vec<Entry>,
    named: Vec<Vec<u8>>,
    mut summary: BackupSummary,
    opts: &BackupOptions,
) -> Result<Committed, BackupError> {
    // What the walk's and reads' bookkeeping held is not needed any more: a tree of a
    // million files holds a lot of it, and the manifest below is as large again.
    *lock(&shared.known) = HashSet::new();
    let mut refs: Vec<ChunkId> = Vec::new();
    for e in &entries {
        match &e.kind {
            EntryKind::File { chunks } => {
                summary.files += 1;
                summary.size += e.size;
                refs.extend(chunks.iter().copied());
            }
            EntryKind::Dir => summary.dirs += 1,
            EntryKind::Symlink { .. } => summary.symlinks += 1,
        }
    }
    refs.sort_unstable();
    refs.dedup();
    // The manifest: encoded as it is cut, chunked and sent like a file (the cuts are
    // those of the whole manifest at once), so that it is never held whole beside the
    // entries.
    let mut manifest_chunks = Vec::new();
    let mut manifest_len = 0;
    with_sealers(shared, 1, || {
        let mut w = Worker::new(shared);
        let mut src = EncodedEntries {
            entries: entries.into_iter(),
            buf: Vec::new(),
            pos: 0,
        };
        w.cut(
            &mut src,
            Path::new("the snapshot's manifest"),
            0,
            None,
            &mut |w, _, id, data| {
                manifest_chunks.push(id);
                manifest_len += data.len() as u64;
                w.add(id, data.to_vec())?;
                Ok(true)
            },
        )?;
        w.flush()
    })?;
    refs.extend(manifest_chunks.iter().copied());
    summary.chunks_sent = shared.sent.load(Ordering::Relaxed);
    summary.chunks_held = shared.held.load(Ordering::Relaxed);
    summary.bytes_sent = shared.bytes_sent.load(Ordering::Relaxed);
    let mut id: SnapshotId = [0; 16];
    rand::thread_rng().fill_bytes(&mut id);
    let root = Root {
        manifest_len,
        manifest_chunks,
        paths: named,
        skipped: summary
            .skipped
            .iter()
            .map(|(p, why)| (p.as_os_str().as_bytes().to_vec(), why.clone()))
            .collect(),
    };
    let key = shared.key.get()?;
    let sealed = key.seal_root(&id, &root, &mut rand::thread_rng());
    let time_ms = opts.time_ms.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    });
    let header = SnapshotHeader {
        id,
        time_ms,
        files: summary.files,
        dirs: summary.dirs,
        size: summary.size,
        stored: summary.bytes_sent,
        host: opts.host.clone(),
        tags: {
            let mut t = opts.tags.clone();
            if !summary.skipped.is_empty() && !t.iter().any(|x| x == "partial") {
                t.push("partial".into());
            }
            t
        },
    };
    refs.sort_unstable();
    refs.dedup();
    match shared.conn.call(&Request::CommitSnapshot {
        header,
        refs,
        root: sealed,
    }) {
        Ok(Answer::SnapshotCommitted { .. }) => {}
        Ok(_) => return Err(ConnError::UnexpectedAnswer("COMMIT_SNAPSHOT").into()),
        Err(ConnError::Server(e)) if e.code == ErrorCode::MISSING_CHUNKS => {
            return Ok(Committed::Missing {
                parent_used: summary.parent.is_some(),
                refused: e,
            });
        }
        Err(e) => return Err(e.into()),
    }
    summary.snapshot = id;
    Ok(Committed::Done(summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel walk's order is the order of a depth-first walk in name order: a
    /// directory just before its contents, even where a sibling's name sorts between
    /// the directory's name and `/` ("a-c" comes after all of "a/").
    #[test]
    fn manifest_order_is_depth_first_in_name_order() {
        let mut paths: Vec<&[u8]> = vec![b"b", b"a/b/c", b"a-c", b"a", b"a/b", b"a/a-", b"a/b-"];
        paths.sort_by(|a, b| manifest_order(a, b));
        let want: Vec<&[u8]> = vec![b"a", b"a/a-", b"a/b", b"a/b/c", b"a/b-", b"a-c", b"b"];
        assert_eq!(paths, want);
    }

    /// The walk finds the same tree, in the same order, whatever the threads did first.
    #[test]
    fn walk_finds_every_path_in_manifest_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        for d in ["a/b/c", "a-c", "a/b-", "z"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for f in ["a/1", "a/b/c/2", "a-c/3", "a/b-/4", "z/5", "top"] {
            std::fs::write(root.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink("top", root.join("link")).unwrap();
        let (roots, named) = walk_roots(std::slice::from_ref(&root)).unwrap();
        let seen = Mutex::new(Vec::new());
        let w = walk(
            roots,
            named,
            &Filter::default(),
            &|no, disk, _| lock(&seen).push((no, disk.to_owned())),
            &|| false,
        );
        let base = root.strip_prefix("/").unwrap().to_str().unwrap().to_owned();
        let got: Vec<String> = w
            .entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).replacen(&base, "T", 1))
            .collect();
        let want = [
            "T",
            "T/a",
            "T/a/1",
            "T/a/b",
            "T/a/b/c",
            "T/a/b/c/2",
            "T/a/b-",
            "T/a/b-/4",
            "T/a-c",
            "T/a-c/3",
            "T/link",
            "T/top",
            "T/z",
            "T/z/5",
        ];
        assert_eq!(got, want);
        // Every file was handed over once, and its number finds its entry.
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), 6);
        for (no, disk) in seen {
            let e = &w.entries[w.file_index[no]];
            assert_eq!(
                disk.strip_prefix("/").unwrap(),
                Path::new(std::ffi::OsStr::from_bytes(&e.path))
            );
        }
    }
}
