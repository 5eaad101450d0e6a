//! The mio (epoll) runtime, for hosts where io_uring cannot run: older kernels,
//! containers whose seccomp profile blocks it, locked-memory limits.
//!
//! The same shape as the glommio runtime: one event-loop thread per shard, each with
//! its own SO_REUSEPORT listener, non-blocking sockets, connections that never leave
//! their shard. Each connection is a [`Driver`] (the same one glommio uses); ops run on
//! a small pool of worker threads per shard through the same [`run_any_op`], and their
//! completions come back through a `mio::Waker`. Timeouts are a heap of deadlines per
//! shard.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cyberbackup_protocol::v3::session::{Completion, Op};
use cyberbackup_protocol::v4::server::ServerConfig as V4Config;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use crate::config::Config;
use crate::conn::{AnyCompletion, AnyOp, Driver, Step};
use crate::ops::{run_any_op, Blocking, Services};
use crate::shutdown::Shutdown;

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const FIRST_CONN: usize = 2;
/// Worker threads per shard for ops (registry round trips, file creation, fsync).
/// A worker is held for the whole op, including the wait for its group commit, so
/// this caps how many of a shard's files can share one commit: with 16, 64 clients of
/// 4 KiB files ran at 0.68x glommio (whose ops wait without holding a thread). The
/// threads are mostly blocked; each costs a stack's resident pages only.
const WORKERS: usize = 64;
/// Reads one connection may do before others get a turn.
const READS_PER_TURN: usize = 16;
/// Longest sleep in `poll`, so that a shutdown is noticed promptly.
const TICK: Duration = Duration::from_millis(100);

/// Runs a closure where it is called: mio's ops already run on a worker thread.
struct Inline;

impl Blocking for Inline {
    fn run<F, R>(&self, f: F) -> impl std::future::Future<Output = R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        std::future::ready(f())
    }
}

/// An op, its connection's token, and the connection's span (its log lines carry the
/// connection id and account).
type Job = (usize, AnyOp, tracing::Span);
type Done = (usize, AnyCompletion);

/// A shard's op workers. Dropping the pool lets the workers finish what is queued
/// (temp files to remove, say) and joins them.
struct Pool {
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Pool {
    fn drop(&mut self) {
        drop(self.jobs.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Pool {
    fn start(
        shard: usize,
        svc: Services,
        done: mpsc::Sender<Done>,
        waker: Arc<Waker>,
    ) -> Result<Pool> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::with_capacity(WORKERS);
        for i in 0..WORKERS {
            let (rx, svc, done, waker) = (rx.clone(), svc.clone(), done.clone(), waker.clone());
            let w = std::thread::Builder::new()
                .name(format!("shard-{shard}-ops-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    let Ok((token, op, span)) = job else { return };
                    let c = span
                        .in_scope(|| futures_lite::future::block_on(run_any_op(&svc, &Inline, op)));
                    if let Some(c) = c {
                        if done.send((token, c)).is_err() {
                            return;
                        }
                        let _ = waker.wake();
                    }
                })
                .context("spawning an op worker")?;
            workers.push(w);
        }
        Ok(Pool {
            jobs: Some(jobs),
            workers,
        })
    }

    fn submit(&self, token: usize, op: AnyOp) {
        let Some(jobs) = &self.jobs else { return };
        if let Err(mpsc::SendError((_, op, _))) = jobs.send((token, op, tracing::Span::current())) {
            // Workers gone: dropping the op drops (removes) any temp file it holds.
            drop(op);
        }
    }
}

struct Conn {
    stream: TcpStream,
    driver: Driver,
    /// An op's completion is awaited.
    waiting: bool,
    /// Since when output has been waiting for the socket to take it.
    write_blocked: Option<Instant>,
    span: tracing::Span,
}

struct Shard {
    id: usize,
    cfg: Arc<Config>,
    shutdown: Arc<Shutdown>,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: HashMap<usize, Conn>,
    next_token: usize,
    pool: Pool,
    done: mpsc::Receiver<Done>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    v4: Arc<V4Config>,
    /// Connections that stopped before their socket was drained (fairness).
    again: VecDeque<usize>,
    draining: Option<Instant>,
}

fn bind_reuseport(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sk = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sk.set_reuse_port(true)?;
    sk.set_reuse_address(true)?;
    sk.set_nonblocking(true)?;
    sk.bind(&addr.into())?;
    sk.listen(1024)?;
    Ok(sk.into())
}

/// Starts every shard, waits until all listen, then until all have stopped.
pub fn run(cfg: Arc<Config>, svc: Services, shutdown: Arc<Shutdown>) -> Result<()> {
    let mut threads = Vec::with_capacity(cfg.shards);
    let mut addr = cfg.listen;
    for shard in 0..cfg.shards {
        let listener = bind_reuseport(addr).with_context(|| format!("cannot listen on {addr}"))?;
        addr = listener.local_addr()?; // port 0: the other shards share the port chosen
        let (cfg2, svc2, sd) = (cfg.clone(), svc.clone(), shutdown.clone());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let t = std::thread::Builder::new()
            .name(format!("shard-{shard}"))
            .spawn(move || {
                let _stop = crate::shutdown::StopOnPanic(sd.clone());
                let span = tracing::info_span!("shard", shard);
                let _e = span.enter();
                match Shard::new(shard, cfg2, svc2, sd, listener) {
                    Ok(mut s) => {
                        let _ = ready_tx.send(Ok(()));
                        s.run();
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .context("spawning a shard thread")?;
        threads.push(t);
        crate::shutdown::wait_ready(&ready_rx, &shutdown, &mut threads, shard)?;
    }
    crate::shutdown::serve_until_stopped(threads, addr, cfg.shards, "mio")
}

impl Shard {
    fn new(
        id: usize,
        cfg: Arc<Config>,
        svc: Services,
        shutdown: Arc<Shutdown>,
        listener: std::net::TcpListener,
    ) -> Result<Shard> {
        let poll = Poll::new().context("creating an epoll instance")?;
        let mut listener = TcpListener::from_std(listener);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (done_tx, done) = mpsc::channel();
        let v4 = svc.v4_session.clone();
        let pool = Pool::start(id, svc, done_tx, waker)?;
        Ok(Shard {
            id,
            cfg,
            shutdown,
            poll,
            listener: Some(listener),
            conns: HashMap::new(),
            next_token: FIRST_CONN,
            pool,
            done,
            timers: BinaryHeap::new(),
            v4,
            again: VecDeque::new(),
            draining: None,
        })
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let mut timeout = TICK;
            if let Some(Reverse((t, _))) = self.timers.peek() {
                timeout = timeout.min(t.saturating_duration_since(now));
            }
            if !self.again.is_empty() {
                timeout = Duration::ZERO;
            }
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "epoll failed; stopping the shard");
                    break;
                }
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => self.completions(),
                    Token(t) => self.drive(t),
                }
            }
            for _ in 0..self.again.len() {
                if let Some(t) = self.again.pop_front() {
                    self.drive(t);
                }
            }
            self.expire_timers();
            if self.shutdown.is_triggered() && self.drain() {
                break;
            }
        }
        let left: Vec<usize> = self.conns.keys().copied().collect();
        for t in left {
            self.close(t, "server shutting down");
        }
    }

    /// Shutdown: stop accepting, close idle connections, give the rest the grace
    /// period. True when the shard can stop.
    fn drain(&mut self) -> bool {
        let now = Instant::now();
        let deadline = *self
            .draining
            .get_or_insert_with(|| now + self.cfg.shutdown_grace);
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        let idle: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.waiting && c.driver.is_idle() && c.driver.output().is_empty())
            .map(|(t, _)| *t)
            .collect();
        for t in idle {
            self.close(t, "server shutting down");
        }
        if self.conns.is_empty() {
            return true;
        }
        if now >= deadline {
            tracing::warn!(
                connections = self.conns.len(),
                "grace period over; dropping unfinished uploads"
            );
            return true;
        }
        false
    }

    fn accept(&mut self) {
        loop {
            let Some(l) = self.listener.as_ref() else {
                return;
            };
            let (mut stream, peer) = match l.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: try again on the next event or tick.
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            };
            if !self
                .shutdown
                .try_acquire_connection(self.cfg.max_connections)
            {
                tracing::warn!(
                    max = self.cfg.max_connections,
                    "connection limit reached; refusing a connection"
                );
                crate::metrics::metrics().connections_refused.inc();
                continue;
            }
            crate::metrics::metrics().connections_accepted.inc();
            let token = self.next_token;
            self.next_token += 1;
            let _ = stream.set_nodelay(true);
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(token),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!(error = %e, "cannot register a connection");
                self.shutdown.connections.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            let span = tracing::info_span!(
                "conn",
                shard = self.id,
                conn = crate::conn::next_conn_id(),
                peer = %peer,
                account = tracing::field::Empty
            );
            span.in_scope(|| tracing::debug!("connected"));
            self.conns.insert(
                token,
                Conn {
                    stream,
                    driver: Driver::new(&self.cfg.session, &self.v4, Instant::now()),
                    waiting: false,
                    write_blocked: None,
                    span,
                },
            );
            self.drive(token);
        }
    }

    fn completions(&mut self) {
        while let Ok((token, c)) = self.done.try_recv() {
            match self.conns.get_mut(&token) {
                Some(conn) => {
                    if let AnyCompletion::V3(_) = c {
                        conn.waiting = false;
                    }
                    let span = conn.span.clone();
                    span.in_scope(|| conn.driver.complete(Instant::now(), c));
                    self.drive(token);
                }
                None => {
                    // The connection is gone: a sink it was given must still go.
                    if let AnyCompletion::V3(Completion::FileOpened(Ok(sink))) = c {
                        self.pool.submit(token, AnyOp::V3(Op::Discard { sink }));
                    }
                }
            }
        }
    }

    fn expire_timers(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((t, token))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(&token) else {
                continue;
            };
            if let Some(since) = conn.write_blocked {
                if now >= since + self.cfg.session.header_timeout {
                    self.close(token, "write timed out");
                    continue;
                }
            }
            if conn.waiting {
                continue;
            }
            match conn.driver.deadline() {
                Some(d) if d <= now && conn.driver.timed_out(now) => self.close(token, "timed out"),
                Some(d) if d <= now => {}
                Some(d) => self.timers.push(Reverse((d, token))),
                None => {}
            }
        }
    }

    /// Does everything a connection can do now.
    fn drive(&mut self, token: usize) {
        let now = Instant::now();
        let draining = self.draining.is_some();
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let _e = conn.span.clone().entered();
        let mut reads = 0;
        let close: Option<&'static str> = loop {
            if conn.waiting {
                break None;
            }
            match conn.driver.step(now) {
                Step::Op(op) => {
                    let wait = op.needs_completion() && !op.is_concurrent();
                    self.pool.submit(token, op);
                    if wait {
                        conn.waiting = true;
                        break None;
                    }
                }
                // A concurrent op's completion drives the connection again.
                Step::Wait => break None,
                Step::Write => match conn.stream.write(conn.driver.output()) {
                    Ok(0) => break Some("write error"),
                    Ok(n) => {
                        conn.driver.consume_output(n);
                        conn.write_blocked = None;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if conn.write_blocked.is_none() {
                            conn.write_blocked = Some(now);
                            self.timers
                                .push(Reverse((now + self.cfg.session.header_timeout, token)));
                        }
                        break None;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "write failed");
                        break Some("write error");
                    }
                },
                Step::Read => {
                    if draining && conn.driver.is_idle() {
                        break Some("server shutting down");
                    }
                    if reads == READS_PER_TURN {
                        self.again.push_back(token);
                        break None;
                    }
                    reads += 1;
                    let stream = &mut conn.stream;
                    match conn.driver.read_from(now, |b| stream.read(b)) {
                        Ok(0) => break Some("peer closed"),
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if let Some(d) = conn.driver.deadline() {
                                self.timers.push(Reverse((d, token)));
                            }
                            break None;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "read failed");
                            break Some("read error");
                        }
                    }
                }
                Step::Close(reason) => break Some(reason),
            }
        };
        drop(_e);
        if let Some(reason) = close {
            self.close(token, reason);
        }
    }

    fn close(&mut self, token: usize, reason: &'static str) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        let _e = conn.span.clone().entered();
        let _ = self.poll.registry().deregister(&mut conn.stream);
        for sink in conn.driver.abort() {
            self.pool.submit(token, AnyOp::V3(Op::Discard { sink }));
        }
        conn.driver.finish();
        let stats = conn.driver.stats();
        tracing::debug!(
            reason,
            requests = stats.requests,
            files = stats.files_committed,
            bytes = stats.content_bytes,
            "disconnected"
        );
        self.shutdown.connections.fetch_sub(1, Ordering::Relaxed);
    }
}
