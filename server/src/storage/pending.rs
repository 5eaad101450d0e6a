//! Temp files being reassembled: the budget of bytes they may hold at once
//! (`--max-pending-bytes`), and [`PendingFile`], the session's [`FileSink`] (writes at
//! their offsets, reads for the CBC fix-up, and the held-back last block of a small
//! file), which hands large files' writes to the direct-I/O stage.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cyberbackup_protocol::v3::session::{sink_range, FileSink};

use super::direct::Direct;
use super::{io_err, StorageError, Writers};

/// Bytes counted against the pending budget until dropped.
#[derive(Debug)]
pub(super) struct Reservation {
    counter: Arc<AtomicU64>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}
impl Reservation {
    /// Counts `len` more bytes in `counter`, unless that would pass `limit`.
    pub(super) fn take(
        counter: &Arc<AtomicU64>,
        len: u64,
        limit: u64,
    ) -> Result<Reservation, StorageError> {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                cur.checked_add(len).filter(|&n| n <= limit)
            })
            .map_err(|_| StorageError::Busy {
                requested: len,
                limit,
            })?;
        Ok(Reservation {
            counter: counter.clone(),
            bytes: len,
        })
    }
}

/// A temp file being reassembled. Dropping it removes the file.
#[derive(Debug)]
pub struct PendingFile {
    pub(super) file: Option<File>,
    /// Large files: the `O_DIRECT` descriptor and its staging buffer.
    pub(super) direct: Option<Box<Direct>>,
    /// Size allocated (the ciphertext size).
    len: u64,
    pub(super) path: PathBuf,
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
    /// Creates the temp file at `path` for `len` bytes (see
    /// [`Storage::create_pending`](super::Storage::create_pending)), written with
    /// `O_DIRECT` through `direct`'s stages when given and the file system allows.
    pub(super) fn create(
        path: PathBuf,
        len: u64,
        reservation: Reservation,
        direct: Option<&Arc<Writers>>,
    ) -> Result<PendingFile, StorageError> {
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
        if let Some(writers) = direct {
            pending.direct = Direct::open(&pending.path, file, writers).map(Box::new);
            if pending.direct.is_some() {
                // The stage writes whole blocks; it keeps no tail back.
                pending.tail = None;
            }
        }
        Ok(pending)
    }

    /// Makes `file` (this file's descriptor) end at `size`: the plaintext part of the
    /// held-back tail is written where the sink ends in it, else the file is cut.
    pub(super) fn cut(&self, file: &File, size: u64) -> io::Result<()> {
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
    pub(super) fn flush(&mut self) -> io::Result<()> {
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
    use super::super::{temp_files, Storage};
    use super::*;

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
}
