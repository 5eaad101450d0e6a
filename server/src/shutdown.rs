//! Process-wide state the shards share off the hot path: the shutdown flag (set by
//! SIGINT/SIGTERM) and the count of open connections (checked on accept).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// Shutdown flag and connection count.
#[derive(Debug, Default)]
pub struct Shutdown {
    triggered: AtomicBool,
    /// Connections open across all shards.
    pub connections: AtomicUsize,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.load(Ordering::Relaxed)
    }

    /// Takes a connection slot if fewer than `max` are open.
    pub fn try_acquire_connection(&self, max: usize) -> bool {
        self.connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Sets the flag on the first SIGINT or SIGTERM; a second one exits at once.
    pub fn install_signal_handlers(self: &Arc<Self>) -> std::io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if me.is_triggered() {
                        tracing::warn!(signal = sig, "second signal: exiting now");
                        std::process::exit(130);
                    }
                    tracing::info!(
                        signal = sig,
                        "shutting down: no new connections, finishing in-flight files"
                    );
                    me.trigger();
                }
            })?;
        Ok(())
    }
}

/// Waits for a shard thread's start-up report. On failure the shutdown flag is set, the
/// shards started so far are joined, and the error is returned.
pub fn wait_ready<T>(
    ready: &mpsc::Receiver<anyhow::Result<T>>,
    shutdown: &Shutdown,
    threads: &mut Vec<JoinHandle<()>>,
    shard: usize,
) -> anyhow::Result<T> {
    let r = match ready.recv() {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("shard {shard} stopped during start-up")),
    };
    if r.is_err() {
        shutdown.trigger();
        for t in threads.drain(..) {
            let _ = t.join();
        }
    }
    r
}

/// Announces the address once every shard listens, then waits for them all to stop.
pub fn serve_until_stopped(
    threads: Vec<JoinHandle<()>>,
    addr: std::net::SocketAddr,
    shards: usize,
    runtime: &str,
) {
    tracing::info!(addr = %addr, shards, runtime, "listening");
    println!("cyberbackup-server listening on {addr}");
    for t in threads {
        let _ = t.join();
    }
}
