//! A v4 connection: the handshake with the server-key check, then requests from any
//! number of threads, pipelined within the server's window.
//!
//! The wire is [`cyberbackup_protocol::v4::client::ClientSession`]'s; this module only
//! moves its bytes. After the handshake a reader thread owns the socket's read half
//! and hands each answer to whoever sent its request ([`Connection::submit`] returns a
//! [`Pending`] to wait on). Writers take turns on the write half: a request is sealed
//! and written under one lock, so records leave in the order of their nonces, and a
//! writer waits for room in the window without holding the session, so the reader can
//! always take the answers that make room.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use cyberbackup_protocol::v4::client::{ClientError as WireClientError, ClientSession, Event};
use cyberbackup_protocol::v4::noise::{fingerprint, StaticKey};
use cyberbackup_protocol::v4::wire::{Answer, ErrorAnswer, ErrorCode, Login, Request, Welcome};

/// Errors of a v4 connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] WireClientError),
    #[error(
        "the server's key {got} is not the one pinned for this server ({pinned}): \
         if the server's key was changed on purpose, remove its line from {pins}"
    )]
    KeyMismatch {
        got: String,
        pinned: String,
        pins: String,
    },
    #[error(
        "the server's key {got} is not the one given with --server-key ({expected}): \
         check the address, and the fingerprint the server logs at start"
    )]
    KeyNotExpected { got: String, expected: String },
    #[error("{0:?} is not a server address: give HOST:PORT (the default port is 1256)")]
    BadAddress(String),
    #[error("the server answered {0}")]
    Server(ErrorAnswer),
    #[error("the connection was closed")]
    Closed,
    #[error("the server sent an answer of the wrong kind to {0}")]
    UnexpectedAnswer(&'static str),
}

impl ConnError {
    /// Whether the connection (or the attempt to make one) was lost, rather than
    /// refused: another node of the cluster may do.
    pub fn is_connection_loss(&self) -> bool {
        matches!(
            self,
            ConnError::Connect { .. } | ConnError::Io(_) | ConnError::Closed
        )
    }

    /// The server's reason code, if the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ConnError::Server(e) => Some(e.code),
            ConnError::Protocol(WireClientError::Refused(e) | WireClientError::Closed(e)) => {
                Some(e.code)
            }
            _ => None,
        }
    }
}

/// What the caller decides about the server's key.
pub trait KeyCheck {
    /// Returns Ok to go on, or the error to stop with.
    fn check(&mut self, key: &[u8; 32]) -> Result<(), ConnError>;
}

impl<F: FnMut(&[u8; 32]) -> Result<(), ConnError>> KeyCheck for F {
    fn check(&mut self, key: &[u8; 32]) -> Result<(), ConnError> {
        self(key)
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub connect_timeout: Duration,
    /// Longest wait for the server to answer anything while requests are out.
    pub io_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(300),
        }
    }
}

type Reply = mpsc::Sender<Result<Answer, Arc<ConnError>>>;

struct Shared {
    session: Mutex<State>,
    room: Condvar,
}

struct State {
    session: ClientSession,
    replies: HashMap<u32, Reply>,
    /// Set when the reader stopped: every later request fails with it.
    failed: Option<Arc<ConnError>>,
}

/// A logged-in connection.
pub struct Connection {
    shared: Arc<Shared>,
    writer: Mutex<Writer>,
    reader: Option<thread::JoinHandle<()>>,
    welcome: Welcome,
    server_key: [u8; 32],
    stream: TcpStream,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("account", &self.welcome.account)
            .field("server", &fingerprint(&self.server_key))
            .finish_non_exhaustive()
    }
}

/// An answer on its way.
#[derive(Debug)]
pub struct Pending {
    rx: mpsc::Receiver<Result<Answer, Arc<ConnError>>>,
}

impl Pending {
    /// Waits for the answer; an ERROR answer is returned as [`ConnError::Server`].
    pub fn wait(self) -> Result<Answer, ConnError> {
        match self.rx.recv() {
            Ok(r) => unwrap_answer(r),
            Err(_) => Err(ConnError::Closed),
        }
    }
}

/// The answers to many requests through one channel ([`Connection::submit_to`]): for a
/// caller that sends many requests and only needs each one's outcome, as they come in
/// any order. (A [`Pending`] for each, taken in the order sent, held a million of them
/// while the first one's answer was late.)
#[derive(Debug)]
pub struct AnswerQueue {
    tx: Reply,
    rx: mpsc::Receiver<Result<Answer, Arc<ConnError>>>,
    outstanding: usize,
}

impl Default for AnswerQueue {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        AnswerQueue {
            tx,
            rx,
            outstanding: 0,
        }
    }
}

impl AnswerQueue {
    /// An answer that is here, if any (ERROR answers as [`ConnError::Server`]).
    pub fn try_next(&mut self) -> Option<Result<Answer, ConnError>> {
        if self.outstanding == 0 {
            return None;
        }
        let r = self.rx.try_recv().ok()?;
        self.outstanding -= 1;
        Some(unwrap_answer(r))
    }

    /// Waits for the next answer; None when none is outstanding. (Every request sent
    /// is answered, or given the connection's error when it fails.)
    pub fn wait_next(&mut self) -> Option<Result<Answer, ConnError>> {
        if self.outstanding == 0 {
            return None;
        }
        self.outstanding -= 1;
        Some(match self.rx.recv() {
            Ok(r) => unwrap_answer(r),
            Err(_) => Err(ConnError::Closed),
        })
    }
}

fn unwrap_answer(r: Result<Answer, Arc<ConnError>>) -> Result<Answer, ConnError> {
    match r {
        Ok(Answer::Error(e)) => Err(ConnError::Server(e)),
        Ok(a) => Ok(a),
        Err(e) => Err(clone_err(&e)),
    }
}

/// A TCP connection to the first of `addrs` that takes one, tried one after another
/// (an address that does not answer costs `timeout` before the next is tried), or the
/// last error.
fn first_to_answer(
    addrs: impl IntoIterator<Item = std::net::SocketAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let mut last = std::io::Error::other("the name resolves to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn clone_err(e: &ConnError) -> ConnError {
    match e {
        ConnError::Server(a) => ConnError::Server(a.clone()),
        ConnError::Protocol(WireClientError::Closed(a)) => ConnError::Server(a.clone()),
        ConnError::Protocol(WireClientError::Refused(a)) => ConnError::Server(a.clone()),
        ConnError::Io(io) => ConnError::Io(std::io::Error::new(io.kind(), io.to_string())),
        _ => ConnError::Io(std::io::Error::other(e.to_string())),
    }
}

impl Connection {
    /// Connects to the first of `addrs` that answers: one `HOST:PORT`, or several
    /// separated by commas (the nodes of a cluster, which share one server key, so
    /// the pin made for the list holds for every one of them). An address that cannot
    /// be reached, or whose connection drops before the login is answered, is passed
    /// over; anything else (a key that does not match, a refused login) ends the try.
    pub fn connect_any(
        addrs: &str,
        device: &StaticKey,
        login: Login,
        check: &mut dyn KeyCheck,
        opts: &ConnectOptions,
    ) -> Result<Connection, ConnError> {
        let mut last = None;
        for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            match Connection::connect(addr, device, login.clone(), check, opts) {
                Ok(c) => return Ok(c),
                Err(e) if e.is_connection_loss() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ConnError::BadAddress(addrs.into())))
    }

    /// Connects to `addr` (`HOST:PORT`; a name with several addresses: the first that
    /// takes the TCP connection, in the resolver's order), checks the server's key
    /// with `check` before the device key is sent, and logs in.
    pub fn connect(
        addr: &str,
        device: &StaticKey,
        login: Login,
        check: &mut dyn KeyCheck,
        opts: &ConnectOptions,
    ) -> Result<Connection, ConnError> {
        if !addr.contains(':') {
            return Err(ConnError::BadAddress(addr.into()));
        }
        let resolved = addr
            .to_socket_addrs()
            .map_err(|source| ConnError::Connect {
                addr: addr.into(),
                source,
            })?;
        let mut stream = first_to_answer(resolved, opts.connect_timeout).map_err(|source| {
            ConnError::Connect {
                addr: addr.into(),
                source,
            }
        })?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(opts.connect_timeout.max(Duration::from_secs(10))))?;
        stream.set_write_timeout(Some(opts.io_timeout))?;
        let mut session = ClientSession::new(device, login)?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut server_key = None;
        let welcome = loop {
            if !session.output().is_empty() {
                stream.write_all(session.output())?;
                let n = session.output().len();
                session.consume_output(n);
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Err(ConnError::Closed);
            }
            session.handle_input(&buf[..n])?;
            let mut welcome = None;
            while let Some(ev) = session.poll_event() {
                match ev {
                    Event::ServerKey { key, .. } => {
                        check.check(&key)?;
                        server_key = Some(key);
                        session.accept_server()?;
                    }
                    Event::Welcome(w) => welcome = Some(w),
                    Event::Answer { .. } => return Err(ConnError::UnexpectedAnswer("login")),
                }
            }
            if let Some(w) = welcome {
                break w;
            }
        };
        let server_key = server_key.ok_or(ConnError::UnexpectedAnswer("login"))?;
        stream.set_read_timeout(None)?;
        let shared = Arc::new(Shared {
            session: Mutex::new(State {
                session,
                replies: HashMap::new(),
                failed: None,
            }),
            room: Condvar::new(),
        });
        let read_half = stream.try_clone()?;
        let io_timeout = opts.io_timeout;
        let sh = shared.clone();
        let reader = thread::Builder::new()
            .name("cyberbackup-v4-reader".into())
            .spawn(move || read_loop(read_half, sh, io_timeout))?;
        Ok(Connection {
            shared,
            writer: Mutex::new(Writer {
                stream: stream.try_clone()?,
                out: Vec::new(),
            }),
            reader: Some(reader),
            welcome,
            server_key,
            stream,
        })
    }

    /// Who the server says we are.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The server's static key.
    pub fn server_key(&self) -> &[u8; 32] {
        &self.server_key
    }

    /// True once the connection has failed (the server closed it, or it broke): every
    /// request on it fails; connect again.
    pub fn is_failed(&self) -> bool {
        lock(&self.shared.session).failed.is_some()
    }

    /// This connection's Noise handshake hash (what a legacy login signs).
    pub fn handshake_hash(&self) -> [u8; 32] {
        lock(&self.shared.session).session.handshake_hash()
    }

    /// The server's window and largest chunk blob.
    pub fn limits(&self) -> (u64, u32) {
        let st = lock(&self.shared.session);
        (
            st.session.window(),
            st.session.server_hello().map_or(0, |h| h.max_chunk),
        )
    }

    /// Sends a request (waiting for room in the window); the answer comes to the
    /// returned [`Pending`].
    pub fn submit(&self, req: &Request) -> Result<Pending, ConnError> {
        let (tx, rx) = mpsc::channel();
        self.send_with(req, tx)?;
        Ok(Pending { rx })
    }

    /// Sends a request (waiting for room in the window); the answer comes to `q`.
    pub fn submit_to(&self, req: &Request, q: &mut AnswerQueue) -> Result<(), ConnError> {
        self.send_with(req, q.tx.clone())?;
        q.outstanding += 1;
        Ok(())
    }

    fn send_with(&self, req: &Request, tx: Reply) -> Result<(), ConnError> {
        let body_len = req.body_len();
        let mut w = lock(&self.writer);
        {
            let mut st = lock(&self.shared.session);
            loop {
                if let Some(e) = &st.failed {
                    return Err(clone_err(e));
                }
                if st.session.can_send(body_len) {
                    break;
                }
                st = self
                    .shared
                    .room
                    .wait(st)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            let id = st.session.send(req)?;
            st.replies.insert(id, tx);
            st.session.swap_output(&mut w.out);
        };
        let Writer { stream, out } = &mut *w;
        if let Err(e) = stream.write_all(out) {
            let e = Arc::new(ConnError::Io(e));
            fail(&self.shared, e.clone());
            return Err(clone_err(&e));
        }
        Ok(())
    }

    /// Sends a request and waits for its answer.
    pub fn call(&self, req: &Request) -> Result<Answer, ConnError> {
        self.submit(req)?.wait()
    }

    /// Requests sent and not answered.
    pub fn unanswered(&self) -> usize {
        lock(&self.shared.session).session.unanswered()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// The write half and the buffer its records are sealed into (kept, so that a
/// large request does not fault in fresh memory each time).
struct Writer {
    stream: TcpStream,
    out: Vec<u8>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn fail(shared: &Shared, e: Arc<ConnError>) {
    let mut st = lock(&shared.session);
    if st.failed.is_none() {
        st.failed = Some(e.clone());
    }
    for (_, r) in st.replies.drain() {
        let _ = r.send(Err(e.clone()));
    }
    shared.room.notify_all();
}

fn read_loop(mut stream: TcpStream, shared: Arc<Shared>, io_timeout: Duration) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        // A server that answers nothing for the whole timeout while requests are
        // out is gone; an idle connection may stay silent.
        let waiting = !lock(&shared.session).replies.is_empty();
        let _ = stream.set_read_timeout(if waiting {
            Some(io_timeout)
        } else {
            Some(Duration::from_secs(1))
        });
        let n = match stream.read(&mut buf) {
            Ok(0) => {
                fail(&shared, Arc::new(ConnError::Closed));
                return;
            }
            Ok(n) => n,
            Err(e)
                if !waiting
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                if lock(&shared.session).failed.is_some() {
                    return;
                }
                continue;
            }
            Err(e) => {
                fail(&shared, Arc::new(ConnError::Io(e)));
                return;
            }
        };
        let mut st = lock(&shared.session);
        if let Err(e) = st.session.handle_input(&buf[..n]) {
            drop(st);
            fail(&shared, Arc::new(ConnError::Protocol(e)));
            return;
        }
        let mut answered = false;
        while let Some(ev) = st.session.poll_event() {
            if let Event::Answer { request_id, answer } = ev {
                answered = true;
                if let Some(r) = st.replies.remove(&request_id) {
                    let _ = r.send(Ok(answer));
                }
            }
        }
        if answered {
            shared.room.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name with several addresses: one that refuses is passed over for the next
    /// (a cluster's DNS name while one node is down), and none answering is the last
    /// error.
    #[test]
    fn the_first_address_that_takes_the_connection_is_used() {
        let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let down_addr = down.local_addr().unwrap();
        drop(down);
        let t = Duration::from_secs(2);
        let s = first_to_answer([down_addr, up.local_addr().unwrap()], t).unwrap();
        assert_eq!(s.peer_addr().unwrap(), up.local_addr().unwrap());
        let e = first_to_answer([down_addr], t).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(first_to_answer([], t).is_err());
    }
}
