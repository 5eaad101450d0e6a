//! Process-wide state the shards share off the hot path: the shutdown flag (set by
//! SIGINT/SIGTERM) and the count of open connections (checked on accept).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

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
