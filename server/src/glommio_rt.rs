//! The glommio (io_uring) runtime: one executor thread per shard, each with its own
//! SO_REUSEPORT listener, so the kernel spreads connections across shards and a
//! connection lives and dies on the shard that accepted it.
//!
//! This module only moves bytes: it reads into a per-connection buffer, hands the
//! bytes to the protocol session, runs the ops the session asks for (see [`crate::ops`])
//! and writes the responses. Nothing on the per-byte path takes a lock or touches an
//! atomic; the only shared state is the connection count, on accept.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use cyberbackup_protocol::session::ServerSession;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::task::JoinHandle;
use glommio::timer::Timer;
use glommio::{LocalExecutorBuilder, Placement, PoolPlacement};
use tracing::Instrument;

use crate::config::Config;
use crate::ops::{run_op, Blocking, Services};
use crate::shutdown::Shutdown;

/// Bytes read at once to begin with; grows while reads fill it (bulk uploads).
const INITIAL_BUF: usize = 16 * 1024;
/// Largest read buffer of a connection.
const MAX_BUF: usize = 512 * 1024;
/// Threads per shard for blocking work (file creation, fsync, rename).
const BLOCKING_THREADS: usize = 4;
/// Registered-buffer memory per executor: we do no DMA file I/O, so keep it small
/// (it counts against RLIMIT_MEMLOCK).
const IO_MEMORY: usize = 512 * 1024;

struct GlommioBlocking;

impl Blocking for GlommioBlocking {
    fn run<F, R>(&self, f: F) -> impl Future<Output = R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        glommio::executor().spawn_blocking(f)
    }
}

/// Checks that an io_uring executor can be made on this host.
pub fn probe() -> Result<()> {
    std::thread::spawn(|| {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(IO_MEMORY)
            .make()
            .map(drop)
            .map_err(|e| anyhow!("{e}"))
    })
    .join()
    .map_err(|_| anyhow!("the glommio probe panicked"))?
}

/// A live connection's task, and whether it sits idle between requests.
struct LiveConn {
    task: Option<JoinHandle<()>>,
    idle: Rc<Cell<bool>>,
}

/// Per-shard bookkeeping of live connections, for draining at shutdown.
#[derive(Default)]
struct ShardState {
    next_id: Cell<u64>,
    draining: Cell<bool>,
    conns: RefCell<HashMap<u64, LiveConn>>,
}

/// Starts every shard, waits until all listen, then until all have stopped.
pub fn run(cfg: Arc<Config>, svc: Services, shutdown: Arc<Shutdown>) -> Result<()> {
    let mut threads = Vec::with_capacity(cfg.shards);
    let mut addr = cfg.listen;
    for shard in 0..cfg.shards {
        let (ready_tx, ready_rx) = mpsc::channel::<Result<SocketAddr>>();
        let (cfg2, svc2, sd) = (cfg.clone(), svc.clone(), shutdown.clone());
        let bind = addr;
        let t = std::thread::Builder::new()
            .name(format!("shard-{shard}"))
            .spawn(move || {
                let ex = match LocalExecutorBuilder::new(Placement::Unbound)
                    .name(&format!("shard-{shard}"))
                    .io_memory(IO_MEMORY)
                    .blocking_thread_pool_placement(PoolPlacement::Unbound(BLOCKING_THREADS))
                    .make()
                {
                    Ok(ex) => ex,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("cannot start a glommio executor: {e}")));
                        return;
                    }
                };
                ex.run(
                    shard_main(shard, bind, cfg2, svc2, sd, ready_tx)
                        .instrument(tracing::info_span!("shard", shard)),
                );
            })
            .context("spawning a shard thread")?;
        threads.push(t);
        match ready_rx.recv() {
            Ok(Ok(bound)) => addr = bound, // port 0: the other shards share the port chosen
            Ok(Err(e)) => {
                shutdown.trigger();
                for t in threads {
                    let _ = t.join();
                }
                return Err(e);
            }
            Err(_) => {
                shutdown.trigger();
                return Err(anyhow!("shard {shard} stopped during start-up"));
            }
        }
    }
    tracing::info!(addr = %addr, shards = cfg.shards, runtime = "glommio", "listening");
    println!("cyberbackup-server listening on {addr}");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

async fn shard_main(
    shard: usize,
    addr: SocketAddr,
    cfg: Arc<Config>,
    svc: Services,
    shutdown: Arc<Shutdown>,
    ready: mpsc::Sender<Result<SocketAddr>>,
) {
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(anyhow!("cannot listen on {addr}: {e}")));
            return;
        }
    };
    let bound = listener.local_addr().unwrap_or(addr);
    let _ = ready.send(Ok(bound));
    let state = Rc::new(ShardState::default());
    let svc = Rc::new(svc);
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            while !shutdown.is_triggered() {
                Timer::new(Duration::from_millis(100)).await;
            }
            None
        })
        .await;
        let stream = match accepted {
            None => break,
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                Timer::new(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !shutdown.try_acquire_connection(cfg.max_connections) {
            tracing::warn!(
                max = cfg.max_connections,
                "connection limit reached; refusing a connection"
            );
            drop(stream);
            continue;
        }
        let id = state.next_id.get();
        state.next_id.set(id + 1);
        let peer = stream.peer_addr().ok();
        let idle = Rc::new(Cell::new(true));
        let span = tracing::info_span!("conn", shard, conn = id, peer = ?peer);
        let task = glommio::spawn_local(
            serve(
                stream,
                cfg.clone(),
                svc.clone(),
                state.clone(),
                idle.clone(),
                shutdown.clone(),
                id,
            )
            .instrument(span),
        )
        .detach();
        state.conns.borrow_mut().insert(
            id,
            LiveConn {
                task: Some(task),
                idle,
            },
        );
    }
    drop(listener);
    drain(&state, cfg.shutdown_grace).await;
}

/// Stops idle connections at once, gives the others `grace` to finish their files,
/// then cancels what is left (their temp files are removed as they drop).
async fn drain(state: &ShardState, grace: Duration) {
    state.draining.set(true);
    let deadline = Instant::now() + grace;
    let cancel_idle = |all: bool| {
        let mut conns = state.conns.borrow_mut();
        for c in conns.values_mut() {
            if all || c.idle.get() {
                if let Some(t) = c.task.take() {
                    t.cancel();
                }
            }
        }
    };
    cancel_idle(false);
    while !state.conns.borrow().is_empty() && Instant::now() < deadline {
        Timer::new(Duration::from_millis(20)).await;
        cancel_idle(false);
    }
    let left = state.conns.borrow().len();
    if left > 0 {
        tracing::warn!(
            connections = left,
            "grace period over; dropping unfinished uploads"
        );
        cancel_idle(true);
        // Let the cancelled tasks be dropped.
        Timer::new(Duration::from_millis(10)).await;
    }
}

/// Removes a connection from the shard's table and frees its slot, however it ends
/// (including cancellation).
struct ConnGuard {
    state: Rc<ShardState>,
    shutdown: Arc<Shutdown>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.state.conns.borrow_mut().remove(&self.id);
        self.shutdown.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve(
    mut stream: TcpStream,
    cfg: Arc<Config>,
    svc: Rc<Services>,
    state: Rc<ShardState>,
    idle: Rc<Cell<bool>>,
    shutdown: Arc<Shutdown>,
    id: u64,
) {
    let _guard = ConnGuard {
        state: state.clone(),
        shutdown,
        id,
    };
    let _ = stream.set_nodelay(true);
    // A peer that stops reading its answers cannot hold the connection forever.
    let _ = stream.set_write_timeout(Some(cfg.session.header_timeout));
    tracing::debug!("connected");
    let mut session = ServerSession::new(cfg.session.clone(), rand::thread_rng(), Instant::now());
    let mut buf = vec![0u8; INITIAL_BUF];
    let (mut head, mut tail) = (0usize, 0usize);
    let end: &str = 'conn: loop {
        // Hand the session what we have, run its ops, send its answers.
        loop {
            let n = session.handle_input(Instant::now(), &buf[head..tail]);
            head += n;
            while let Some(op) = session.poll_op() {
                if let Some(c) = run_op(&svc, &GlommioBlocking, op).await {
                    session.complete(Instant::now(), c);
                }
            }
            if !session.output().is_empty() {
                if let Err(e) = stream.write_all(session.output()).await {
                    tracing::debug!(error = %e, "write failed");
                    break 'conn "write error";
                }
                session.clear_output();
            }
            if session.is_closing() {
                break 'conn "closed by the protocol";
            }
            if head == tail || (n == 0 && !session.is_waiting()) {
                break;
            }
        }
        if head == tail {
            head = 0;
            tail = 0;
        } else if head > 0 {
            buf.copy_within(head..tail, 0);
            tail -= head;
            head = 0;
        }
        let is_idle = session.is_idle() && tail == 0;
        idle.set(is_idle);
        if is_idle && state.draining.get() {
            break 'conn "server shutting down";
        }
        let now = Instant::now();
        let timeout = session.poll_timeout().map(|d| {
            d.saturating_duration_since(now)
                .max(Duration::from_millis(1))
        });
        let _ = stream.set_read_timeout(timeout);
        match stream.read(&mut buf[tail..]).await {
            Ok(0) => break 'conn "peer closed",
            Ok(n) => {
                tail += n;
                if tail == buf.len() && buf.len() < MAX_BUF {
                    buf.resize(buf.len() * 2, 0);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                session.handle_timeout(Instant::now());
                if session.is_closing() {
                    break 'conn "timed out";
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "read failed");
                break 'conn "read error";
            }
        }
    };
    idle.set(false);
    let stats = session.stats();
    for sink in session.abort() {
        GlommioBlocking.run(move || drop(sink)).await;
    }
    tracing::debug!(
        reason = end,
        requests = stats.requests,
        files = stats.files_committed,
        bytes = stats.content_bytes,
        "disconnected"
    );
}
