//! The `O_DIRECT` path of large temp files: [`Direct`] collects a session's in-order
//! writes (or its decryption, straight into the stage) into whole aligned stages and
//! sends each full one to the calling thread's ring or to the writer threads, with at
//! most [`MAX_IN_FLIGHT`] writes of a file out at once ([`Flight`]).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::ring;
use super::stages::{Stage, STAGE};
use super::writers::{WriteJob, Writers};

/// Temp files of at least this size are written with `O_DIRECT` by default.
pub const DIRECT_MIN_DEFAULT: u64 = 1 << 20;
/// Offsets, lengths and buffers of direct I/O are multiples of this (the largest
/// logical block size of common devices).
const DIRECT_ALIGN: u64 = 4096;
/// Direct writes of one file in flight at once (each holds a stage).
const MAX_IN_FLIGHT: usize = 2;

/// Direct I/O for one temp file: a second descriptor opened with `O_DIRECT` and
/// page-aligned staging buffers that collect the session's in-order writes into whole
/// aligned blocks. Writing through the page cache touches a fresh cache page per 4 KiB;
/// stages are reused, and the device reads them by DMA.
///
/// A full stage goes to the calling thread's io_uring ([`ring`]; glommio
/// shards have one) or else to the [`Writers`] pool, and the session goes on filling the
/// next one, so the disk works while the connection reads and decrypts (at most
/// [`MAX_IN_FLIGHT`] writes per file; the next full stage waits for one to finish).
/// Whole aligned blocks go out through the direct descriptor; a partial block at
/// either end of a run (a packet size that is not a multiple of 4 KiB, the CBC
/// fix-up of an out-of-order packet, the file's tail) goes through the ordinary
/// descriptor. Before any write that does not continue the stage and before any read,
/// the writes in flight are waited for and the stage is written out, so writes reach
/// the file in the session's order; the kernel keeps the two descriptors coherent (a
/// direct write first writes back and then drops the cached pages in its range).
#[derive(Debug)]
pub(super) struct Direct {
    fd: Arc<File>,
    /// The ordinary descriptor, for the writers' fallback.
    cached: Arc<File>,
    writers: Arc<Writers>,
    pub(super) stage: Stage,
    /// File offset of `stage[0]`, always a multiple of [`DIRECT_ALIGN`].
    start: u64,
    /// Bytes of the stage in use, from `start` on.
    filled: usize,
    flight: Arc<Flight>,
    /// The ring this file's writes went to (the first one's thread's; see
    /// [`ring`]).
    ring: Option<Arc<ring::Ring>>,
}

/// The writes of one file in flight, the stages they free, and the first error.
#[derive(Debug, Default)]
pub(super) struct Flight {
    pub(super) state: Mutex<FlightState>,
    pub(super) done: std::sync::Condvar,
}

#[derive(Debug, Default)]
pub(super) struct FlightState {
    pub(super) in_flight: usize,
    pub(super) error: Option<io::Error>,
    /// The file system opened the file with `O_DIRECT` but refused a direct write:
    /// stages go out through the cache from then on.
    pub(super) refused: bool,
}

/// `Direct::start` when no run is open: aligned, and no write can continue it.
const NO_RUN: u64 = u64::MAX - DIRECT_ALIGN + 1;

impl Direct {
    /// Opens `path` again with `O_DIRECT`; `None` where the file system refuses it (the
    /// file is then written through the page cache).
    pub(super) fn open(path: &Path, cached: &File, writers: &Arc<Writers>) -> Option<Direct> {
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

    pub(super) fn write_at(
        &mut self,
        file: &File,
        mut offset: u64,
        mut data: &[u8],
    ) -> io::Result<()> {
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
    pub(super) fn stage(&mut self, offset: u64, max: usize) -> Option<&mut [u8]> {
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
    pub(super) fn staged(&mut self, n: usize) -> io::Result<()> {
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
    pub(super) fn flush(&mut self, file: &File) -> io::Result<()> {
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
pub(super) fn write_direct(
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

#[cfg(test)]
mod tests {
    use super::super::Storage;
    use super::*;
    use cyberbackup_protocol::v3::session::FileSink;
    use std::fs;

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
}
