//! Direct writes through io_uring, submitted and reaped by the thread that fills the
//! stages (a glommio shard), instead of handed to the [`Writers`](super::Writers)
//! threads.
//!
//! With the writer threads every 1 MiB stage cost a hand-off (a futex wake), a writer
//! that slept in `pwrite` until the device was done and woke again, and the shard
//! sleeping whenever a file had two writes out: about three voluntary context switches
//! per write, and a fifth of the server's CPU in scenario 2 of the benchmark suite. Here
//! the shard thread queues the write on its own ring (one `io_uring_enter`, which starts
//! the direct write and returns), the device's completion is posted to the ring, and
//! whoever next looks at the ring (the shard, before it submits again or when it must
//! wait for a file's writes, or a blocking thread that flushes a file at commit) books
//! it. Nothing sleeps per write.
//!
//! A thread gets a ring with [`install`]; writes staged on a thread without one go to
//! the writer threads, as under the mio runtime (the fallback where io_uring is not
//! available). A stage stays owned by its job in the ring's table until the kernel has
//! posted the write's completion, so its memory is never reused or unmapped while the
//! device may still read it.
//!
//! # Whether it pays
//!
//! glommio's DMA files would do the same job; this ring is kept because, measured
//! against the writer threads in the same run, it costs less CPU per byte stored:
//!
//! ```text
//! python3 benches/scripts/direct_writes.py --runs 5 --out benches/results/direct_writes.md
//! ```
//!
//! (glommio runtime, 5 alternating runs per mode, the writer threads selected with
//! `--direct-writes threads`; 2-CPU VM, generator on the same machine, medians):
//!
//! | scenario | core-s/GiB ring | threads | ring | MB/s ring | threads | ring |
//! |---|---|---|---|---|---|---|
//! | 64 x 16 MiB, closed loop | 0.402 | 0.458 | -12% | 1451 | 1604 | -10% |
//! | 1 x 1 GiB | 0.260 | 0.320 | -19% | 1371 | 1586 | -14% |
//!
//! The CPU ranges do not overlap (0.385-0.407 against 0.448-0.479 core-s/GiB in the
//! first scenario) and the saving is system time, as expected from the hand-offs it
//! removes. The rate went the other way: every ring run moved less than the threads'
//! median (6-11% less in the first scenario, 8-18% in the second). Why was not
//! investigated in this run; both modes stay well above what the disk takes
//! synchronously (`dd` with `fdatasync`, 434 MB/s in benches/results/v3.md).
//! Re-run the script when touching this path.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::Duration;

use io_uring::{opcode, types, IoUring};

use super::direct::{write_direct, Flight};
use super::stages::Stages;
use super::writers::WriteJob;

/// Submission queue entries per ring; the kernel sizes the completion queue at twice
/// this, which bounds the writes a ring has out at once (more go to the writer threads).
const ENTRIES: u32 = 256;

/// Stages a ring registers with the kernel (`IORING_OP_WRITE_FIXED`: their pages are
/// pinned once, not at every write). Registration counts against `RLIMIT_MEMLOCK`
/// unless the server has `CAP_IPC_LOCK`; once the kernel refuses one, the ring stops
/// asking and writes the rest with plain `IORING_OP_WRITE`.
const FIXED_SLOTS: u32 = 64;

/// How long a thread that does not own the ring sleeps between looks at it.
const FOREIGN_POLL: Duration = Duration::from_micros(100);

thread_local! {
    static RING: RefCell<Option<Arc<Ring>>> = const { RefCell::new(None) };
}

/// Gives the calling thread its own ring for direct writes. Errors where io_uring is
/// not available (an old kernel, a seccomp profile); writes then go to the writer
/// threads.
pub fn install() -> io::Result<()> {
    install_with(true, ENTRIES)
}

/// [`install`], with or without registered buffers and with a given size (tests: the
/// plain-write path, a full ring).
pub(super) fn install_with(register: bool, entries: u32) -> io::Result<()> {
    let ring = Ring::new(register, entries)?;
    RING.with(|r| *r.borrow_mut() = Some(Arc::new(ring)));
    Ok(())
}

/// Takes the calling thread's ring away (its writes still out finish first, when the
/// last file that used it lets go of it).
pub fn uninstall() {
    RING.with(|r| r.borrow_mut().take());
}

/// The calling thread's ring, if it has one.
pub(super) fn current() -> Option<Arc<Ring>> {
    RING.with(|r| r.borrow().clone())
}

/// One thread's io_uring and the writes it has out.
pub(super) struct Ring {
    inner: Mutex<Inner>,
    owner: ThreadId,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("owner", &self.owner).finish()
    }
}

struct Inner {
    uring: IoUring,
    /// Writes the kernel has (or will get at the next submit), by `user_data`.
    jobs: Vec<Option<WriteJob>>,
    free: Vec<usize>,
    out: usize,
    /// Most writes out at once (the completion queue's size).
    max_out: usize,
    /// Registered stages by id, and their slots in the kernel's table.
    fixed: std::collections::HashMap<u64, u16>,
    /// Whether more stages may be registered (the table has room, the kernel agrees).
    can_register: bool,
    /// The pools of the registered stages: kept alive (and so mapped) for as long as
    /// the kernel holds their pages; dropped after `uring`.
    pools: Vec<Arc<Stages>>,
}

impl Ring {
    fn new(register: bool, entries: u32) -> io::Result<Ring> {
        let uring = IoUring::new(entries)?;
        if !uring.params().is_feature_nodrop() {
            return Err(io::Error::other(
                "io_uring without IORING_FEAT_NODROP (Linux 5.5 or newer)",
            ));
        }
        let mut probe = io_uring::Probe::new();
        uring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::Write::CODE) {
            return Err(io::Error::other(
                "io_uring without IORING_OP_WRITE (Linux 5.6 or newer)",
            ));
        }
        let register = register && probe.is_supported(opcode::WriteFixed::CODE);
        // Writes out at once stay below the completion queue's size, so completions
        // never overflow into the kernel's list (which only `io_uring_enter` drains).
        let max_out = uring.params().cq_entries() as usize;
        let can_register = register
            && match uring.submitter().register_buffers_sparse(FIXED_SLOTS) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(error = %e, "no registered buffers for direct writes");
                    false
                }
            };
        Ok(Ring {
            inner: Mutex::new(Inner {
                uring,
                jobs: Vec::new(),
                free: Vec::new(),
                out: 0,
                max_out,
                fixed: Default::default(),
                can_register,
                pools: Vec::new(),
            }),
            owner: std::thread::current().id(),
        })
    }

    /// Stages registered with the kernel so far, and whether it would take more.
    #[cfg(test)]
    pub(super) fn registered(&self) -> (usize, bool) {
        let inner = self.lock();
        (inner.fixed.len(), inner.can_register)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts `job`'s write. The caller has counted it in its file's flight; its
    /// completion is booked there by whoever reaps it. Hands the job back when the ring
    /// already has as many writes out as its completion queue holds, or the kernel
    /// takes no more entries: the caller writes it some other way.
    pub(super) fn submit(&self, mut job: WriteJob) -> Result<(), WriteJob> {
        let mut inner = self.lock();
        let done = inner.reap();
        if inner.out >= inner.max_out {
            drop(inner);
            complete_all(done);
            return Err(job);
        }
        let (fd, buf, len) = (
            types::Fd(job.fd.as_raw_fd()),
            job.buf.as_ptr(),
            job.buf.len() as u32,
        );
        let entry = match inner.fixed_index(&mut job) {
            Some(index) => opcode::WriteFixed::new(fd, buf, len, index)
                .offset(job.offset)
                .build(),
            None => opcode::Write::new(fd, buf, len).offset(job.offset).build(),
        };
        let slot = match inner.free.pop() {
            Some(i) => i,
            None => {
                inner.jobs.push(None);
                inner.jobs.len() - 1
            }
        };
        let entry = entry.user_data(slot as u64);
        inner.jobs[slot] = Some(job);
        // SAFETY: the entry points at the job's stage and names the job's descriptor;
        // the job (which owns both) stays in `jobs[slot]` until the kernel posts the
        // completion for `user_data == slot`, which `reap` removes it on, so neither is
        // freed or reused while the kernel may read them.
        let mut pushed = unsafe { inner.uring.submission().push(&entry).is_ok() };
        if !pushed {
            // The queue is full of entries not yet submitted: submit them, then retry.
            let _ = inner.uring.submit();
            // SAFETY: as above.
            pushed = unsafe { inner.uring.submission().push(&entry).is_ok() };
        }
        if !pushed {
            let job = inner.jobs[slot].take().expect("just put");
            inner.free.push(slot);
            drop(inner);
            complete_all(done);
            return Err(job);
        }
        inner.out += 1;
        // An error here (EBUSY, EAGAIN, EINTR) leaves the entry queued: the next submit
        // or wait takes it.
        if let Err(e) = inner.uring.submit() {
            tracing::debug!(error = %e, "io_uring submit deferred");
        }
        drop(inner);
        complete_all(done);
        Ok(())
    }

    /// Books completed writes; if none had completed, waits for one (the owner thread,
    /// which runs the completions' task work as it waits) or sleeps briefly (any other
    /// thread, while the owner posts them).
    pub(super) fn progress(&self, flight: &Flight) {
        let mut inner = self.lock();
        let mut done = inner.reap();
        if done.is_empty() && inner.out > 0 && std::thread::current().id() == self.owner {
            match inner.uring.submit_and_wait(1) {
                Ok(_) => done = inner.reap(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => tracing::debug!(error = %e, "io_uring wait failed; polling"),
            }
        }
        if done.is_empty() && inner.out > 0 {
            // Entries a failed submit left queued go now (any thread may submit).
            let _ = inner.uring.submit();
            done = inner.reap();
        }
        drop(inner);
        if !done.is_empty() {
            complete_all(done);
            return;
        }
        let st = flight.state.lock().unwrap_or_else(|p| p.into_inner());
        let _ = flight.done.wait_timeout(st, FOREIGN_POLL);
    }
}

/// Books completions taken off a ring, outside its lock: a short or refused write is
/// finished with a blocking write here, which must not hold up the ring's owner.
fn complete_all(done: Vec<(WriteJob, i32)>) {
    for (job, res) in done {
        job.completed(res);
    }
}

impl Inner {
    /// The slot of `job`'s stage in the kernel's buffer table, registering it there if
    /// it is new and there is room.
    fn fixed_index(&mut self, job: &mut WriteJob) -> Option<u16> {
        if let Some(&i) = self.fixed.get(&job.buf.id) {
            return Some(i);
        }
        if !self.can_register || self.fixed.len() >= FIXED_SLOTS as usize {
            return None;
        }
        let index = self.fixed.len() as u16;
        let iov = libc::iovec {
            iov_base: job.buf.as_ptr() as *mut libc::c_void,
            iov_len: job.buf.len(),
        };
        // SAFETY: the iovec covers the stage's whole mapping. A registered stage is
        // never unmapped while its pool lives (`Stage::registered`), and this ring
        // holds the pool (`pools`, dropped after the ring's descriptor), so the range
        // stays valid for as long as the kernel holds it.
        let r = unsafe {
            self.uring
                .submitter()
                .register_buffers_update(index as u32, &[iov], None)
        };
        match r {
            Ok(()) => {
                job.buf.registered = true;
                if !self.pools.iter().any(|p| Arc::ptr_eq(p, &job.buf.home)) {
                    self.pools.push(job.buf.home.clone());
                }
                self.fixed.insert(job.buf.id, index);
                Some(index)
            }
            Err(e) => {
                tracing::debug!(error = %e, registered = self.fixed.len(), "registering a stage failed; plain writes from now on");
                self.can_register = false;
                None
            }
        }
    }

    /// Takes every posted completion off the queue, with its job (which the caller
    /// books with [`WriteJob::completed`] once the lock is released).
    fn reap(&mut self) -> Vec<(WriteJob, i32)> {
        let posted: Vec<(u64, i32)> = self
            .uring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut done = Vec::with_capacity(posted.len());
        for (slot, res) in posted {
            let Some(job) = self
                .jobs
                .get_mut(slot as usize)
                .and_then(|j: &mut Option<WriteJob>| j.take())
            else {
                continue;
            };
            self.free.push(slot as usize);
            self.out -= 1;
            done.push((job, res));
        }
        done
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The stages of writes still out must outlive them.
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        while inner.out > 0 {
            match inner.uring.submit_and_wait(1) {
                Ok(_) => complete_all(inner.reap()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!(error = %e, writes = inner.out, "io_uring wait failed at exit; leaking the stages of writes still out");
                    for job in inner.jobs.drain(..).flatten() {
                        std::mem::forget(job.buf);
                    }
                    return;
                }
            }
        }
    }
}

impl WriteJob {
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
}

#[cfg(test)]
mod tests {
    use super::super::direct::Flight;
    use super::super::stages::{Stages, STAGE};
    use super::super::writers::WriteJob;
    use super::super::{ring, PendingFile, Storage};
    use super::*;
    use cyberbackup_protocol::v3::session::FileSink;
    use std::fs::{self, File, OpenOptions};
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::PathBuf;

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
}
