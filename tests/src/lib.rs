//! Harness of the end-to-end tests: starts the real `cyberbackup-server` binary on
//! 127.0.0.1 in a temporary directory, and speaks protocol v3 to it over real TCP with
//! real RSA and AES (a minimal client built from the protocol crate's codecs, so that
//! tests can also send bytes no honest client would).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cyberbackup_protocol::common::ClientId;
use cyberbackup_protocol::v3::crypto::{self, AesKey, ClientKeypair};
use cyberbackup_protocol::v3::header::{RequestCode, ResponseHeader, RESPONSE_HEADER_LEN};
use cyberbackup_protocol::v3::message::{
    encode_name_request, encode_send_file, encode_send_public_key, FileReceived, Response,
};
use rand::{RngCore, SeedableRng};

/// How long any single read waits before a test fails instead of hanging.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of a workspace binary, built (once per test process) by `cargo build`, so the
/// tests always run the current code whatever built the test binary itself.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, p)) = built.iter().find(|(b, _)| b == bin) {
        return p.clone();
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/<bin>
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("running cargo build");
    assert!(status.success(), "building {bin} failed");
    let path = profile_dir.join(bin);
    assert!(path.exists(), "{} missing after build", path.display());
    built.push((bin.to_owned(), path.clone()));
    path
}

/// The server binary.
pub fn server_binary() -> PathBuf {
    binary("cyberbackup-server", "cyberbackup-server")
}

/// The client CLI binary.
pub fn client_binary() -> PathBuf {
    binary("cyberbackup-client", "cyberbackup")
}

/// Runs a process to its end, sampling its peak resident set (VmHWM) from /proc.
/// Returns the output and the peak in KiB.
pub fn run_measuring_rss(cmd: &mut Command) -> (std::process::Output, u64) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak = 0u64;
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_path) {
            if let Some(kb) = text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak = peak.max(kb);
            }
        }
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = std::process::Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    (output, peak)
}

/// The seccomp wrapper that blocks io_uring for the program it runs.
pub fn no_io_uring_binary() -> PathBuf {
    binary("cyberbackup-e2e", "no-io-uring")
}

/// The server runtime a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Glommio,
    Mio,
}

impl Runtime {
    pub fn flag(self) -> &'static str {
        match self {
            Runtime::Glommio => "glommio",
            Runtime::Mio => "mio",
        }
    }
}

/// Declares each listed `fn name(rt: Runtime)` as two tests, `glommio::name` and
/// `mio::name`: the end-to-end suite runs against both runtimes without a copy.
#[macro_export]
macro_rules! both_runtimes {
    ($($name:ident),* $(,)?) => {
        mod glommio {
            $( #[test] fn $name() { super::$name($crate::Runtime::Glommio) } )*
        }
        mod mio {
            $( #[test] fn $name() { super::$name($crate::Runtime::Mio) } )*
        }
    };
}

/// The first line a child prints on standard output (its "listening on" line), or ""
/// after 30 s.
fn first_stdout_line(child: &mut Child) -> String {
    stdout_lines(child, 1).pop().unwrap_or_default()
}

/// The first `n` lines a child prints on standard output (fewer if it stops first or
/// 30 s pass). The rest of its output is read and dropped until it exits, so a later
/// print never meets a closed pipe.
fn stdout_lines(child: &mut Child, n: usize) -> Vec<String> {
    let Some(stdout) = child.stdout.take() else {
        return Vec::new();
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let _ = tx.send(line);
                }
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(30);
    let mut lines = Vec::new();
    while lines.len() < n {
        match rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
            Ok(l) => lines.push(l),
            Err(_) => break,
        }
    }
    lines
}

/// A running server process in its own working directory.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The admin HTTP listener (metrics, probes), unless the test turned it off.
    pub admin: Option<SocketAddr>,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on `rt` in a fresh temporary directory.
    pub fn start(rt: Runtime, extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = Server::start_in(rt, tmp.path(), extra);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on `rt` in `dir` (kept by the caller, e.g. to restart on the same
    /// data).
    pub fn start_in(rt: Runtime, dir: &Path, extra: &[&str]) -> Server {
        let mut cmd = Command::new(server_binary());
        cmd.args(["--runtime", rt.flag()]);
        Server::spawn(cmd, dir, extra)
    }

    /// Starts `cmd` (the server, possibly behind a wrapper) in `dir`.
    pub fn spawn(cmd: Command, dir: &Path, extra: &[&str]) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))
            .expect("log file");
        Server::spawn_logging_to(cmd, dir, extra, log)
    }

    /// Starts `cmd` in `dir` with its log (standard error) going to `log`.
    pub fn spawn_logging_to(
        mut cmd: Command,
        dir: &Path,
        extra: &[&str],
        log: std::fs::File,
    ) -> Server {
        // `--log debug` unless the test chose a level (the flag may be given once)
        let level: &[&str] = if extra.contains(&"--log") {
            &[]
        } else {
            &["--log", "debug"]
        };
        // A free port unless the test chose one (to restart on the same address).
        let port: &[&str] = if extra.contains(&"--port") {
            &[]
        } else {
            &["--port", "0"]
        };
        // The admin listener on a free port too, unless the test chose.
        let admin: &[&str] = if extra.contains(&"--admin-listen") {
            &[]
        } else {
            &["--admin-listen", "127.0.0.1:0"]
        };
        let admin_on = extra
            .windows(2)
            .all(|w| !(w[0] == "--admin-listen" && w[1] == "off"));
        // Not the machine's /etc/cyberbackup/server.toml, unless the test gives one.
        if !extra.contains(&"--config") {
            cmd.env("CYBERBACKUP_CONFIG", "/dev/null");
        }
        let mut child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(port)
            .args(admin)
            .args(level)
            .args(extra)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("starting the server");
        let lines = stdout_lines(&mut child, if admin_on { 2 } else { 1 });
        let line = lines.first().cloned().unwrap_or_default();
        let Some(addr) = line.trim().strip_prefix("cyberbackup-server listening on ") else {
            let _ = child.kill();
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            panic!("server did not start: {line:?}\n{log}");
        };
        let addr: SocketAddr = addr.parse().expect("listen address");
        let admin = lines.get(1).and_then(|l| {
            l.trim()
                .strip_prefix("cyberbackup-server admin on http://")?
                .trim_end_matches('/')
                .parse()
                .ok()
        });
        assert!(
            admin.is_some() || !admin_on,
            "no admin listener line: {lines:?}"
        );
        Server {
            child: Some(child),
            addr,
            admin,
            dir: dir.to_owned(),
            _tmp: None,
        }
    }

    /// The storage root.
    pub fn storage(&self) -> PathBuf {
        self.dir.join("received_files")
    }

    /// A client's directory.
    pub fn client_dir(&self, id: &ClientId) -> PathBuf {
        self.storage()
            .join(cyberbackup_protocol::common::client_id_hex(id))
    }

    /// Entries in the temp directory (but the server's run marker, `.incoming/RUNNING`).
    pub fn temp_files(&self) -> usize {
        // .incoming/NN/<temp files>
        std::fs::read_dir(self.storage().join(".incoming"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name() != "RUNNING")
                    .map(|e| {
                        if e.path().is_dir() {
                            std::fs::read_dir(e.path()).map(|f| f.count()).unwrap_or(0)
                        } else {
                            1
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Waits until no temp file is left (the server cleans up asynchronously).
    pub fn wait_no_temp_files(&self) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if self.temp_files() == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Sends a signal to the server.
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([&format!("-{sig}"), &c.id().to_string()])
                .status();
        }
    }

    /// SIGTERM, then waits (at most 60 s) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait(Duration::from_secs(60))
            .expect("server did not exit after SIGTERM")
    }

    /// SIGTERM, then waits at most `limit` for the exit status (None: still running;
    /// the process is then killed when the `Server` drops).
    pub fn wait_or_term(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.signal("TERM");
        self.wait(limit)
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One RSA key pair for every test in the process (generation is slow-ish).
pub fn keypair() -> &'static ClientKeypair {
    static KP: OnceLock<ClientKeypair> = OnceLock::new();
    KP.get_or_init(|| ClientKeypair::generate(&mut rand::thread_rng()).expect("RSA keygen"))
}

/// Random bytes from a seed.
pub fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// A unique user name for a test.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

/// The order in which packets 2..N are sent (packet 1 always goes first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    InOrder,
    Reversed,
    Shuffled(u64),
}

/// A v3 connection.
pub struct Conn {
    pub s: TcpStream,
    pub id: ClientId,
    pub key: Option<AesKey>,
}

impl Conn {
    pub fn connect(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        Conn {
            s,
            id: [0; 16],
            key: None,
        }
    }

    /// Registers and exchanges keys on a fresh connection.
    pub fn login(addr: SocketAddr, name: &str) -> Conn {
        let mut c = Conn::connect(addr);
        match c.register(name) {
            Response::RegisterOk { .. } => {}
            r => panic!("register {name}: {r:?}"),
        }
        match c.send_key(name) {
            Response::AesKey { .. } => {}
            r => panic!("public key: {r:?}"),
        }
        c
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    /// Reads one response (bounded: a payload over the v3 maximum is an error).
    pub fn recv(&mut self) -> io::Result<Response> {
        let mut h = [0u8; RESPONSE_HEADER_LEN];
        self.s.read_exact(&mut h)?;
        let h = ResponseHeader::parse(&h).expect("7 bytes");
        if h.payload_size > Response::MAX_PAYLOAD.max(279) {
            return Err(io::Error::other("response payload too large"));
        }
        let mut p = vec![0u8; h.payload_size as usize];
        self.s.read_exact(&mut p)?;
        Response::decode(h.code, &p).map_err(io::Error::other)
    }

    /// True when the server closes the connection (EOF or reset) before `IO_TIMEOUT`.
    pub fn is_closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }

    pub fn request_name(&mut self, code: RequestCode, name: &str) -> Response {
        let mut req = Vec::new();
        encode_name_request(&mut req, &self.id, code, name).unwrap();
        self.send(&req).unwrap();
        self.recv().unwrap()
    }

    pub fn register(&mut self, name: &str) -> Response {
        let r = self.request_name(RequestCode::Register, name);
        if let Response::RegisterOk { client_id } = r {
            self.id = client_id;
        }
        r
    }

    pub fn send_key(&mut self, name: &str) -> Response {
        let mut req = Vec::new();
        encode_send_public_key(&mut req, &self.id, name, keypair().public_der()).unwrap();
        self.send(&req).unwrap();
        let r = self.recv().unwrap();
        if let Response::AesKey { encrypted_key, .. } = &r {
            self.key = Some(
                keypair()
                    .decrypt_session_key(encrypted_key)
                    .expect("key decrypts"),
            );
        }
        r
    }

    pub fn reconnect(&mut self, name: &str) -> Response {
        let r = self.request_name(RequestCode::Reconnect, name);
        if let Response::ReconnectOk { encrypted_key, .. } = &r {
            self.key = Some(
                keypair()
                    .decrypt_session_key(encrypted_key)
                    .expect("key decrypts"),
            );
        }
        r
    }

    /// The packets of a file, numbered from 1, in order.
    pub fn packets(&self, name: &str, plain: &[u8], packet: usize) -> Vec<Vec<u8>> {
        let key = self.key.expect("session key");
        let ct = crypto::encrypt(&key, plain);
        let total = ct.len().div_ceil(packet);
        assert!(total <= 65535, "too many packets");
        ct.chunks(packet)
            .enumerate()
            .map(|(i, chunk)| {
                let mut out = Vec::with_capacity(chunk.len() + 290);
                encode_send_file(
                    &mut out,
                    &self.id,
                    name,
                    plain.len() as u32,
                    i as u16 + 1,
                    total as u16,
                    chunk,
                )
                .unwrap();
                out
            })
            .collect()
    }

    /// Sends every packet of a file in `order`; returns the server's answer.
    pub fn send_file(&mut self, name: &str, plain: &[u8], packet: usize, order: Order) -> Response {
        let mut ps = self.packets(name, plain, packet);
        let first = ps.remove(0);
        match order {
            Order::InOrder => {}
            Order::Reversed => ps.reverse(),
            Order::Shuffled(seed) => {
                use rand::seq::SliceRandom;
                ps.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
            }
        }
        self.send(&first).unwrap();
        for p in &ps {
            self.send(p).unwrap();
        }
        self.recv().unwrap()
    }

    /// Uploads a file and confirms its checksum; returns the 1603 payload.
    pub fn upload(
        &mut self,
        name: &str,
        plain: &[u8],
        packet: usize,
        order: Order,
    ) -> FileReceived {
        let r = self.send_file(name, plain, packet, order);
        let Response::FileReceived(f) = r else {
            panic!("expected 1603 for {name}, got {r:?}")
        };
        assert_eq!(
            self.request_name(RequestCode::CrcOk, name),
            Response::Ack { client_id: self.id }
        );
        f
    }
}

/// The system `cksum` of a file: (checksum, size).
pub fn system_cksum(path: &Path) -> (u32, u64) {
    let out = Command::new("cksum").arg(path).output().expect("cksum");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut f = text.split_whitespace();
    (
        f.next().unwrap().parse().unwrap(),
        f.next().unwrap().parse().unwrap(),
    )
}

/// A fake server that registers anyone, issues keys, and answers every file with a 1603
/// whose checksum is wrong; it records the request codes of each connection.
pub struct WrongChecksumServer {
    pub addr: SocketAddr,
    /// Request codes per connection, in the order the connections came.
    pub codes: std::sync::Arc<Mutex<Vec<Vec<u16>>>>,
    done: std::sync::Arc<Mutex<Vec<bool>>>,
}

impl WrongChecksumServer {
    pub fn start() -> WrongChecksumServer {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().unwrap();
        let codes = std::sync::Arc::new(Mutex::new(Vec::new()));
        let done = std::sync::Arc::new(Mutex::new(Vec::new()));
        let (c2, d2) = (codes.clone(), done.clone());
        std::thread::spawn(move || {
            for (i, s) in l.incoming().enumerate() {
                let Ok(s) = s else { continue };
                c2.lock().unwrap().push(Vec::new());
                d2.lock().unwrap().push(false);
                let (c3, d3) = (c2.clone(), d2.clone());
                std::thread::spawn(move || {
                    serve_wrong_checksum(s, |code| c3.lock().unwrap()[i].push(code));
                    d3.lock().unwrap()[i] = true;
                });
            }
        });
        WrongChecksumServer { addr, codes, done }
    }

    /// Waits (at most 60 s) until connection `i` has ended; returns its request codes.
    pub fn wait_for_connection_end(&self, i: usize) -> Vec<u16> {
        let end = Instant::now() + Duration::from_secs(60);
        while Instant::now() < end {
            if self.done.lock().unwrap().get(i).copied().unwrap_or(false) {
                return self.codes.lock().unwrap()[i].clone();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("connection {i} did not end");
    }
}

fn serve_wrong_checksum(mut s: TcpStream, mut record: impl FnMut(u16)) {
    use cyberbackup_protocol::v3::crypto::PublicKey;
    use cyberbackup_protocol::v3::header::RequestHeader;
    use cyberbackup_protocol::v3::message::SendFileHead;
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let id = [7u8; 16];
    loop {
        let mut h = [0u8; 23];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let Ok(h) = RequestHeader::parse(&h) else {
            return;
        };
        if h.payload_size > 16 * 1024 * 1024 + 267 {
            return;
        }
        let mut p = vec![0u8; h.payload_size as usize];
        if s.read_exact(&mut p).is_err() {
            return;
        }
        record(u16::from(h.code));
        let reply = match h.code {
            RequestCode::Register => Response::RegisterOk { client_id: id },
            RequestCode::SendPublicKey => {
                let Ok(pk) = PublicKey::from_field(&p[255..415]) else {
                    return;
                };
                let key = crypto::random_aes_key(&mut rand::thread_rng());
                Response::AesKey {
                    client_id: id,
                    encrypted_key: pk
                        .encrypt_session_key(&mut rand::thread_rng(), &key)
                        .unwrap(),
                }
            }
            RequestCode::SendFile => {
                let Ok(head) = SendFileHead::decode(&p[..267]) else {
                    return;
                };
                if head.packet_number != head.total_packets {
                    continue;
                }
                Response::FileReceived(FileReceived {
                    client_id: id,
                    content_size: crypto::ciphertext_len(head.orig_file_size as u64) as u32,
                    file_name: String::from_utf8_lossy(head.file_name).into_owned(),
                    cksum: 0xBAD,
                })
            }
            _ => Response::Ack { client_id: id },
        };
        let mut out = Vec::new();
        reply.encode(&mut out);
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

/// The sign-in token the test bridges are started with (`--token-file`).
pub const BRIDGE_TOKEN: &str = "e2e-test-token-0123456789abcdef";

/// A running bridge process (HTTP on 127.0.0.1, a free port) with its own device (the
/// config directory `config` under its data directory), started with [`BRIDGE_TOKEN`].
pub struct Bridge {
    child: Option<Child>,
    pub url: String,
    pub data: PathBuf,
}

impl Bridge {
    /// Starts the bridge with `server` as its default backup server.
    pub fn start(data: &Path, server: &str) -> Bridge {
        Bridge::start_with(data, server, &[])
    }

    /// Starts the bridge with `server` as its default backup server and `extra` flags
    /// (e.g. `--log trace`).
    pub fn start_with(data: &Path, server: &str, extra: &[&str]) -> Bridge {
        std::fs::create_dir_all(data).expect("bridge data dir");
        let token_file = data.join("e2e-token");
        std::fs::write(&token_file, BRIDGE_TOKEN).expect("token file");
        let mut child = Command::new(binary("cyberbackup-bridge", "cyberbackup-bridge"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--server",
                server,
                "--config-dir",
            ])
            .arg(data.join("config"))
            .arg("--token-file")
            .arg(&token_file)
            .args(extra)
            // A cheap Argon2id for keys made through the bridge (tests only).
            .env("CYBERBACKUP_KDF", "test")
            .env_remove("CYBERBACKUP_PASSWORD_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(data.join("bridge.log"))
                    .or_else(|_| {
                        std::fs::create_dir_all(data)?;
                        std::fs::File::create(data.join("bridge.log"))
                    })
                    .expect("bridge log"),
            )
            .spawn()
            .expect("starting the bridge");
        let line = first_stdout_line(&mut child);
        let Some(url) = line.trim().strip_prefix("cyberbackup-bridge listening on ") else {
            let _ = child.kill();
            panic!(
                "bridge did not start: {line:?}\n{}",
                std::fs::read_to_string(data.join("bridge.log")).unwrap_or_default()
            );
        };
        Bridge {
            child: Some(child),
            url: url.trim_end_matches('/').to_owned(),
            data: data.to_owned(),
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let end = Instant::now() + Duration::from_secs(20);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Server {
    /// The server's process id (None once it has been killed or waited for).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// GET `path` from the admin HTTP listener: (status, body).
    pub fn http_get(&self, path: &str) -> io::Result<(u16, String)> {
        let addr = self
            .admin
            .ok_or_else(|| io::Error::other("the admin listener is off"))?;
        http_get(addr, path)
    }

    /// Runs an admin command (`cyberbackup-server ARGS`) in the server's directory, as
    /// an operator would beside it.
    pub fn admin_cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new(server_binary())
            .current_dir(&self.dir)
            .env("CYBERBACKUP_CONFIG", "/dev/null")
            .args(args)
            .output()
            .expect("running an admin command")
    }
}

/// Polls `f` every 10 ms until it holds or `limit` passes; its last answer.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

/// A plain HTTP/1.1 GET of `path` at `addr` (the server closes after answering):
/// (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP answer: {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_owned()))
}

/// The value of the sample `name` (with its labels, as exposed, e.g.
/// `cyberbackup_received_bytes_total{protocol="4"}`) in a metrics text, 0 if absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// The resident set of a process now and its peak, in KiB (`VmRSS`, `VmHWM` of
/// /proc/PID/status), or None once it is gone.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Raises this process's soft limit on open files to at least `want` (children such as
/// the server inherit it); panics with the reason if the hard limit is lower.
pub fn raise_open_files_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim),
            0,
            "getrlimit"
        );
        if lim.rlim_cur >= want {
            return;
        }
        assert!(
            lim.rlim_max >= want,
            "RLIMIT_NOFILE hard limit {} is below the {want} this test needs",
            lim.rlim_max
        );
        lim.rlim_cur = want;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0, "setrlimit");
    }
}

/// A v3 request header with any version, code and payload size (for hostile inputs).
pub fn request_header(id: ClientId, version: u8, code: u16, size: u32) -> Vec<u8> {
    cyberbackup_protocol::v3::header::RequestHeader {
        client_id: id,
        version,
        code: code.into(),
        payload_size: size,
    }
    .to_bytes()
    .to_vec()
}

/// Every path under `dir` (files and directories), relative to it.
pub fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            assert!(!t.is_symlink(), "a symlink: {}", e.path().display());
            out.push(e.path().strip_prefix(dir).unwrap().to_owned());
            if t.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out
}
