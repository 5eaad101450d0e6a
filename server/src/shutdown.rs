//! Process-wide state the shards share off the hot path: the shutdown flag (set by
//! SIGINT/SIGTERM) and the count of open connections (checked on accept).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// A second SIGINT/SIGTERM sooner than this after the first is ignored; a later one
/// forces an exit.
pub const FORCE_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// Shutdown flag and connection count.
#[derive(Debug, Default)]
pub struct Shutdown {
    triggered: AtomicBool,
    /// Connections open across all shards.
    pub connections: AtomicUsize,
    /// Tasks waiting in [`Shutdown::triggered`], woken by [`Shutdown::trigger`].
    waiting: std::sync::Mutex<Vec<std::task::Waker>>,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        let waiting = std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()));
        for w in waiting {
            w.wake();
        }
    }

    /// Ready once the flag is set: a task waits for the shutdown without being woken
    /// before it. (A shard's accept loop waits on this beside `accept()`. It used to
    /// poll the flag every 100 ms instead, and every such wake-up polled the pending
    /// accept again; glommio keeps a clone of the task's waker per poll of a pending
    /// accept, and after about 32,767 of them, some 55 minutes of a shard without a
    /// new connection, the task's reference count overflowed and the shard panicked.)
    pub fn triggered(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.is_triggered() {
                return std::task::Poll::Ready(());
            }
            {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                    waiting.push(cx.waker().clone());
                }
            }
            // Set between the check and the registration: trigger() may have taken
            // the list before this waker was in it.
            if self.is_triggered() {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
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

    /// Sets the flag on the first SIGINT or SIGTERM (the drain: no new connections,
    /// in-flight uploads finish within the shutdown grace). A second signal within
    /// [`FORCE_AFTER`] of the first is the same request delivered twice (Ctrl-C reaches
    /// a script and the server it started) and is ignored; one after that forces an
    /// exit at once, leaving what was in flight to the next start's recovery.
    pub fn install_signal_handlers(self: &Arc<Self>) -> std::io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut first: Option<std::time::Instant> = None;
                for sig in signals.forever() {
                    match first {
                        None => {
                            first = Some(std::time::Instant::now());
                            tracing::info!(
                                signal = sig,
                                "shutting down: no new connections, finishing in-flight files (a second signal after 2 s forces)"
                            );
                            crate::notify::stopping();
                            me.trigger();
                        }
                        Some(t) if t.elapsed() < FORCE_AFTER => {
                            tracing::info!(signal = sig, "already draining; a signal 2 s after the first forces an exit");
                        }
                        Some(_) => {
                            tracing::warn!(
                                signal = sig,
                                "second signal: exiting now; uploads in flight are abandoned (the next start cleans up)"
                            );
                            std::process::exit(130);
                        }
                    }
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
/// A shard that panicked is an error: the others were told to drain (see
/// [`StopOnPanic`]), and the caller must not wait for the services the dead shard's
/// tasks may still hold.
pub fn serve_until_stopped(
    threads: Vec<JoinHandle<()>>,
    addr: std::net::SocketAddr,
    shards: usize,
    runtime: &str,
) -> anyhow::Result<()> {
    tracing::info!(addr = %addr, shards, runtime, "listening");
    let _ = crate::admin::LISTEN.set(addr);
    println!("cyberbackup-server listening on {addr}");
    if let Some(a) = crate::admin_http::ADDR.get() {
        println!("cyberbackup-server admin on http://{a}/");
    }
    crate::notify::ready();
    let mut panicked = Vec::new();
    for (i, t) in threads.into_iter().enumerate() {
        if t.join().is_err() {
            panicked.push(i);
        }
    }
    if panicked.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!(
            "shard(s) {panicked:?} stopped with a panic; the server stopped"
        ))
    }
}

/// Held by a shard thread: if the thread unwinds from a panic, the whole server
/// drains and stops instead of serving on with one shard gone. (glommio does not
/// drop the tasks of an executor that unwinds, so what they hold stays held.)
pub struct StopOnPanic(pub Arc<Shutdown>);

impl Drop for StopOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("a shard panicked; stopping the server");
            self.0.trigger();
        }
    }
}
