//! The writer threads: a small pool, shared by every file, that carries out the
//! direct writes of full stages handed to it (all of them under the mio runtime, and
//! under glommio those a shard's ring cannot take).

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use super::direct::{write_direct, Flight};
use super::stages::{Stage, Stages};

/// Threads that carry out direct writes for all files.
const WRITERS: usize = 4;

/// One full stage on its way to the disk.
pub(super) struct WriteJob {
    pub(super) fd: Arc<File>,
    pub(super) cached: Arc<File>,
    pub(super) buf: Stage,
    pub(super) offset: u64,
    pub(super) flight: Arc<Flight>,
}

/// The threads that carry out direct writes, shared by every file (started with the
/// first direct file).
#[derive(Debug)]
pub struct Writers {
    pub(super) tx: Mutex<Option<std::sync::mpsc::Sender<WriteJob>>>,
    pub(super) stages: Arc<Stages>,
}
impl Writers {
    pub(super) fn new() -> Writers {
        Writers {
            tx: Mutex::new(None),
            stages: Arc::default(),
        }
    }

    pub(super) fn submit(&self, job: WriteJob) {
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
    pub(super) fn done(self, r: io::Result<bool>) {
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
