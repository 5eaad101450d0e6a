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
//! quarter (benches/results/v3.md; the closing note of issue 7).
//!
//! Every function here but the
//! [`FileSink`](cyberbackup_protocol::v3::session::FileSink) methods blocks: runtimes
//! call them from a blocking thread pool, never from a reactor thread. The sink's
//! `pwrite`s go to the page cache and run on the connection's thread.
//!
//! The parts, by job:
//! - `incoming`: the `.incoming` directory, the run marker that tells a crash from a
//!   clean stop, and the sweep of what a crash left;
//! - `pending`: the pending-bytes budget and the temp file being reassembled
//!   ([`PendingFile`], the session's `FileSink`);
//! - `direct`: the `O_DIRECT` path of large temp files (the stage a session decrypts
//!   into, and the writes of one file in flight);
//! - `stages`: the page-aligned stage buffers, cut from huge pages and reused;
//! - `writers`: the threads that carry out direct writes;
//! - [`ring`]: direct writes through the calling thread's own io_uring instead;
//! - `commit`: making finished files durable and visible, alone or in groups, and
//!   the group-commit thread ([`Committer`]).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cyberbackup_protocol::common::{client_id_hex, ClientId};

mod commit;
mod direct;
mod incoming;
mod pending;
pub mod ring;
mod stages;
mod writers;

pub use commit::{CommitItem, Committer, Stored, GROUP_MIN};
pub use direct::DIRECT_MIN_DEFAULT;
pub use incoming::{temp_files, INCOMING, SPREAD};
pub use pending::{PendingFile, PREALLOCATE_MIN};
pub use writers::Writers;

use pending::Reservation;

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
        std::fs::create_dir_all(root).map_err(io_err("creating storage root", root))?;
        let incoming = root.join(INCOMING);
        let unclean = incoming::start_run(&incoming)?;
        Ok(Self {
            root: root.to_owned(),
            incoming,
            seq: AtomicU64::new(0),
            pending: Arc::new(AtomicU64::new(0)),
            max_pending,
            durable_dirs: Mutex::new(HashSet::new()),
            direct_min: DIRECT_MIN_DEFAULT,
            writers: Arc::new(Writers::new()),
            unclean,
        })
    }

    /// Whether the last run on this root ended without [`close`](Self::close) (a crash
    /// or a kill): files renamed into place just before it may lack their registry row.
    pub fn unclean_start(&self) -> bool {
        self.unclean
    }

    /// Marks a clean end of the run (after every connection is done).
    pub fn close(&self) {
        incoming::end_run(&self.incoming);
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
        let reservation = Reservation::take(&self.pending, len, self.max_pending)?;
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .incoming
            .join(format!("{:02x}", n as usize % SPREAD))
            .join(format!("{}-{n}.part", std::process::id()));
        let direct = (self.direct_min > 0 && len >= self.direct_min).then_some(&self.writers);
        PendingFile::create(path, len, reservation, direct)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cyberbackup_protocol::v3::session::FileSink;
    use std::fs;

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
        let path = s.commit(p, &[2; 16], "empty", 0).unwrap().path;
        assert_eq!(fs::metadata(path).unwrap().len(), 0);
    }
}
