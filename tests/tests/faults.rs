//! Faults against the real server binary on 127.0.0.1: kill -9 in the middle of many
//! concurrent uploads and a restart on the same data, a full disk (a small tmpfs), slow
//! and silent peers, connection floods over the limit and a thousand connections under
//! it, SIGTERM while uploads run, the bridge losing its server mid-transfer, and a flood
//! of random and truncated frames while honest clients keep uploading.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cyberbackup_e2e::*;
use cyberbackup_protocol::common::{client_id_hex, ClientId};
use cyberbackup_protocol::v3::cksum;
use cyberbackup_protocol::v3::header::RequestCode;
use cyberbackup_protocol::v3::message::{
    encode_name_request, encode_send_file_head, encode_send_public_key, Response, SendFileHead,
};
use rand::{Rng, SeedableRng};

fn header(id: ClientId, version: u8, code: u16, size: u32) -> Vec<u8> {
    request_header(id, version, code, size)
}

/// How far an upload got, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Packets (being) sent, no CRC_OK yet: the file must never become visible.
    Sending,
    /// CRC_OK (being) sent, no ACK seen: the file may or may not be stored.
    CrcOkSent,
    /// ACK received: the file must be stored, with these bytes.
    Acked,
}

/// Uploads a file without panicking on a dead connection; `stage` is told how far it
/// got before each step that the server could see.
fn try_upload(
    c: &mut Conn,
    name: &str,
    plain: &[u8],
    packet: usize,
    mut stage: impl FnMut(Stage),
) -> Result<(), String> {
    stage(Stage::Sending);
    for p in c.packets(name, plain, packet) {
        c.send(&p).map_err(|e| format!("sending {name}: {e}"))?;
    }
    match c
        .recv()
        .map_err(|e| format!("waiting for 1603 of {name}: {e}"))?
    {
        Response::FileReceived(f) if f.cksum == cksum(plain) => {}
        r => {
            return Err(format!(
                "{name}: expected 1603 with the right cksum, got {r:?}"
            ))
        }
    }
    let mut req = Vec::new();
    encode_name_request(&mut req, &c.id, RequestCode::CrcOk, name).unwrap();
    stage(Stage::CrcOkSent);
    c.send(&req).map_err(|e| format!("CRC_OK {name}: {e}"))?;
    match c
        .recv()
        .map_err(|e| format!("waiting for ACK of {name}: {e}"))?
    {
        Response::Ack { client_id } if client_id == c.id => {
            stage(Stage::Acked);
            Ok(())
        }
        r => Err(format!("{name}: expected ACK, got {r:?}")),
    }
}

/// Files (not directories) under `dir`, recursively, as paths relative to it.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| dir.join(p).is_file())
        .collect()
}

/// Temp files under `<root>/.incoming` (not the server's run marker `RUNNING`).
fn temp_files_in(root: &Path) -> usize {
    walk_files(&root.join(".incoming"))
        .iter()
        .filter(|p| p.as_os_str() != "RUNNING")
        .count()
}

// ---------------------------------------------------------------------------------
// kill -9 in the middle of 16 concurrent uploads

fn kill_9_mid_concurrent_uploads_then_restart_loses_nothing_acknowledged(rt: Runtime) {
    const CONNS: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start_in(rt, dir.path(), &[]);
    let addr = srv.addr;
    type Files = HashMap<(ClientId, String), (u64, usize, Stage)>;
    let files: Arc<Mutex<Files>> = Arc::default();
    let logged_in = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicUsize::new(0));
    let names = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..CONNS)
        .map(|t| {
            let (files, logged_in, acked, names) = (
                files.clone(),
                logged_in.clone(),
                acked.clone(),
                names.clone(),
            );
            std::thread::spawn(move || {
                let user = unique_name(&format!("k9-{t}"));
                let mut c = Conn::login(addr, &user);
                names.lock().unwrap().push((user, c.id));
                logged_in.fetch_add(1, Ordering::SeqCst);
                for i in 0u64.. {
                    let seed = (t as u64) << 32 | i;
                    // small files go through the group committer, large ones through
                    // their own fdatasync: both paths are under way at the kill
                    let size = match i % 4 {
                        0 => 1000 + 37 * i as usize,
                        1 => 100_000,
                        2 => 600_000,
                        _ => 3 << 20,
                    };
                    let name = format!("t{t}-f{i}.bin");
                    let plain = data(size, seed);
                    let key = (c.id, name.clone());
                    let r = try_upload(&mut c, &name, &plain, 256 * 1024, |s| {
                        files.lock().unwrap().insert(key.clone(), (seed, size, s));
                        if s == Stage::Acked {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                    if r.is_err() {
                        return;
                    }
                }
            })
        })
        .collect();
    // kill once every connection is uploading, files have been acknowledged, and
    // uploads are in flight (temp files exist)
    assert!(
        wait_until(Duration::from_secs(120), || {
            logged_in.load(Ordering::SeqCst) == CONNS
                && acked.load(Ordering::SeqCst) >= 48
                && srv.temp_files() >= 4
        }),
        "the uploads did not get going"
    );
    srv.kill();
    for t in threads {
        t.join().expect("uploader thread");
    }
    let temp_left = srv.temp_files();
    let files = files.lock().unwrap().clone();
    let count = |s: Stage| files.values().filter(|f| f.2 == s).count();
    let (n_acked, n_crc, n_sending) = (
        count(Stage::Acked),
        count(Stage::CrcOkSent),
        count(Stage::Sending),
    );

    // restart on the same storage and database
    let srv = Server::start_in(rt, dir.path(), &[]);
    assert_eq!(srv.temp_files(), 0, "start-up removes what the crash left");
    let log = srv.log();
    if temp_left > 0 {
        assert!(
            log.contains("removed unfinished uploads left by a crash"),
            "{log}"
        );
    }

    // every file visible is a confirmed one, with the right bytes
    let root = srv.storage();
    let by_hex: HashMap<String, ClientId> = names
        .lock()
        .unwrap()
        .iter()
        .map(|(_, id)| (client_id_hex(id), *id))
        .collect();
    let mut found = 0usize;
    let mut unacked_found = 0usize;
    for rel in walk_files(&root) {
        let mut parts = rel.iter().map(|p| p.to_str().unwrap().to_owned());
        let (d, name) = (parts.next().unwrap(), parts.next());
        if d == ".lock" && name.is_none() {
            continue; // the lock the server holds on its data directory
        }
        if d == ".incoming" {
            if name.as_deref() == Some("RUNNING") {
                continue; // the server's run marker
            }
            panic!("temp file after start-up: {}", rel.display());
        }
        let name = name.unwrap_or_else(|| panic!("stray file in the root: {}", rel.display()));
        assert!(parts.next().is_none(), "nested file {}", rel.display());
        let id = by_hex
            .get(&d)
            .unwrap_or_else(|| panic!("unknown client dir {d}"));
        let (seed, size, stage) = files
            .get(&(*id, name.clone()))
            .unwrap_or_else(|| panic!("a file nobody sent: {}", rel.display()));
        assert_ne!(
            *stage,
            Stage::Sending,
            "{} is visible without a CRC_OK",
            rel.display()
        );
        assert!(
            std::fs::read(root.join(&rel)).unwrap() == data(*size, *seed),
            "{} has the wrong bytes",
            rel.display()
        );
        found += 1;
        if *stage == Stage::CrcOkSent {
            unacked_found += 1;
        }
    }
    // every acknowledged file is there
    for ((id, name), (_, _, stage)) in &files {
        if *stage == Stage::Acked {
            assert!(
                srv.client_dir(id).join(name).exists(),
                "acknowledged file {name} lost"
            );
        }
    }

    // the registry is intact and agrees with the files
    let db = rusqlite::Connection::open_with_flags(
        dir.path().join("defensive.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let mut rows = HashMap::new();
    {
        let mut st = db
            .prepare("SELECT client_id, name, path, size, cksum, verified FROM files")
            .unwrap();
        let it = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .unwrap();
        for row in it {
            let (id, name, path, size, ck, verified) = row.unwrap();
            let id: ClientId = id.try_into().unwrap();
            let (seed, fsize, _) = files
                .get(&(id, name.clone()))
                .unwrap_or_else(|| panic!("a registry row for a file nobody sent: {name}"));
            assert_eq!(verified, 1, "{name}");
            assert_eq!(size as usize, *fsize, "{name}");
            assert_eq!(ck as u32, cksum(&data(*fsize, *seed)), "{name}");
            let on_disk = dir.path().join(&path);
            assert_eq!(on_disk, srv.client_dir(&id).join(&name), "{name}");
            assert!(on_disk.exists(), "registry row without its file: {path}");
            rows.insert((id, name), ());
        }
    }
    // A file whose CRC_OK was being committed when the server died may have been
    // renamed into place without its registry row (the ACK goes out only after both,
    // so it was never acknowledged): the restart after the crash writes its row.
    let mut files_without_row = 0;
    for ((id, name), (_, _, stage)) in &files {
        if *stage == Stage::Acked {
            assert!(
                rows.contains_key(&(*id, name.clone())),
                "acknowledged {name} not in the registry"
            );
        }
        if srv.client_dir(id).join(name).exists() && !rows.contains_key(&(*id, name.clone())) {
            assert_eq!(*stage, Stage::CrcOkSent, "{name}");
            files_without_row += 1;
        }
    }
    assert_eq!(
        files_without_row, 0,
        "files on disk without a registry row after the restart"
    );
    for (user, _) in names.lock().unwrap().iter() {
        let key_len: i64 = db
            .query_row(
                "SELECT length(public_key) FROM clients WHERE name = ?1",
                [user],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(key_len, 160, "{user}");
    }
    drop(db);

    // and the restarted server serves the same clients
    let (user, id) = names.lock().unwrap()[0].clone();
    let mut c = Conn::connect(srv.addr);
    c.id = id;
    assert!(matches!(c.reconnect(&user), Response::ReconnectOk { .. }));
    c.upload("after-restart.bin", b"alive", 64, Order::InOrder);
    eprintln!(
        "kill -9 recovery ({rt:?}): {CONNS} connections; before the kill {n_acked} files acked, \
         {n_crc} with CRC_OK sent but no ACK, {n_sending} in flight; after the restart \
         {found} files found ({} acked + {unacked_found} confirmed but unacknowledged), \
         {files_without_row} without a registry row; {temp_left} temp files left by the crash, \
         removed at start-up",
        found - unacked_found
    );
    assert_eq!(found - unacked_found, n_acked);
}

// ---------------------------------------------------------------------------------
// a full disk

/// A size-limited tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Tmpfs { dir },
            Ok(o) => panic!(
                "cannot mount a {size} tmpfs on {} ({}): {} -- this test needs root (CAP_SYS_ADMIN) \
                 to fill a real file system; it fails rather than pass without testing",
                dir.path().display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("cannot run mount(8): {e} -- this test needs it to make a full disk"),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn remount(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path())
            .status()
            .expect("mount");
        assert!(st.success(), "remount to {size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

fn a_full_disk_answers_1607_spares_the_others_and_recovers(rt: Runtime) {
    let fs = Tmpfs::mount("8m");
    let store = fs.path().join("store");
    let srv = Server::start(rt, &["--storage", store.to_str().unwrap()]);
    let dir_of = |id: &ClientId| store.join(client_id_hex(id));
    let early = data(1 << 20, 1);
    let mut a = Conn::login(srv.addr, &unique_name("full-a"));
    a.upload("early.bin", &early, 65536, Order::InOrder);
    // b holds a 2 MiB upload in flight
    let mut b = Conn::login(srv.addr, &unique_name("full-b"));
    let bd = data(2 << 20, 2);
    let bp = b.packets("b.bin", &bd, 1 << 20);
    b.send(&bp[0]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || temp_files_in(
        &store
    ) == 1));
    // c wants 6 MiB: 8 MiB - 1 MiB stored - 2 MiB reserved does not hold it
    let mut c = Conn::login(srv.addr, &unique_name("full-c"));
    let cd = data(6 << 20, 3);
    let cp = c.packets("c.bin", &cd, 1 << 20);
    c.send(&cp[0]).unwrap();
    assert_eq!(
        c.recv().unwrap(),
        Response::Error,
        "no room: 1607 on the first packet"
    );
    assert!(wait_until(Duration::from_secs(10), || temp_files_in(
        &store
    ) == 1));
    assert!(!dir_of(&c.id).join("c.bin").exists());
    assert!(
        srv.log().contains("No space left on device") || srv.log().contains("os error 28"),
        "the reason is logged:\n{}",
        srv.log()
    );
    // the refused client's connection still works for what fits
    c.upload("small.bin", b"fits", 64, Order::InOrder);
    // now fill the file system to the last byte: small files (not preallocated) and
    // large ones (preallocated) are both refused with 1607, and the server stays up
    let filler = fs.path().join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0xEEu8; 64 << 10];
        while f.write(&block).is_ok_and(|n| n > 0) {}
        while f.write(&block[..512]).is_ok_and(|n| n > 0) {}
    }
    for (name, size) in [("tiny.bin", 100_000usize), ("mid.bin", 2 << 20)] {
        let d = data(size, 9);
        // one packet, so that there is exactly one answer
        let r = a.send_file(name, &d, 4 << 20, Order::InOrder);
        assert_eq!(r, Response::Error, "{name} on a full disk");
        assert!(!dir_of(&a.id).join(name).exists());
    }
    // the upload in flight finishes, the earlier file is intact
    for p in &bp[1..] {
        b.send(p).unwrap();
    }
    let Response::FileReceived(f) = b.recv().unwrap() else {
        panic!("b's upload was disturbed")
    };
    assert_eq!(f.cksum, cksum(&bd));
    assert_eq!(
        b.request_name(RequestCode::CrcOk, "b.bin"),
        Response::Ack { client_id: b.id }
    );
    assert_eq!(std::fs::read(dir_of(&b.id).join("b.bin")).unwrap(), bd);
    assert_eq!(
        std::fs::read(dir_of(&a.id).join("early.bin")).unwrap(),
        early
    );
    // space freed: the small file goes through on the same connection
    std::fs::remove_file(&filler).unwrap();
    let tiny = data(100_000, 9);
    a.upload("tiny.bin", &tiny, 4 << 20, Order::InOrder);
    assert_eq!(std::fs::read(dir_of(&a.id).join("tiny.bin")).unwrap(), tiny);
    // still too big; then the disk grows and the same upload succeeds
    assert!(matches!(
        c.send_file("c.bin", &cd, 1 << 20, Order::InOrder),
        Response::Error
    ));
    // the 5 packets after the refused first one are refused too (no packet 1)
    for _ in 1..cp.len() {
        assert_eq!(c.recv().unwrap(), Response::Error);
    }
    fs.remount("64m");
    c.upload("c.bin", &cd, 1 << 20, Order::InOrder);
    assert_eq!(std::fs::read(dir_of(&c.id).join("c.bin")).unwrap(), cd);
    assert_eq!(temp_files_in(&store), 0);
    drop(srv);
}

// ---------------------------------------------------------------------------------
// slow and silent peers

/// What a slow peer does.
#[derive(Debug, Clone, Copy)]
enum Slow {
    /// Sends a header one byte per second.
    HeaderTrickle,
    /// Sends half a header, then nothing.
    HalfHeader,
    /// Connects and says nothing.
    Silent,
    /// Logs in and sends a packet's content one byte per second (`content` bytes
    /// announced).
    ContentTrickle { content: u32 },
}

/// Runs a slow peer until the server closes it or `stop` is set; returns the time from
/// its first byte (or connect, for a silent one) to the close, if it was closed.
fn slow_peer(addr: SocketAddr, kind: Slow, stop: Arc<AtomicBool>) -> Option<Duration> {
    let mut to_send = Vec::new();
    let mut s = match kind {
        Slow::ContentTrickle { content } => {
            let c = Conn::login(addr, &unique_name("trickle"));
            let head = SendFileHead {
                content_size: content,
                orig_file_size: content - 1,
                packet_number: 1,
                total_packets: 1,
                file_name: b"slow.bin",
            };
            let mut req = Vec::new();
            encode_send_file_head(&mut req, &c.id, &head).unwrap();
            let mut s = c.s;
            s.write_all(&req).unwrap();
            to_send = vec![0x55; content as usize];
            s
        }
        Slow::HeaderTrickle => {
            to_send = header([0; 16], 3, 1025, 255);
            TcpStream::connect(addr).unwrap()
        }
        Slow::HalfHeader => {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&header([0; 16], 3, 1025, 255)[..11]).unwrap();
            s
        }
        Slow::Silent => TcpStream::connect(addr).unwrap(),
    };
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        if i < to_send.len() && s.write_all(&to_send[i..i + 1]).is_err() {
            return Some(t0.elapsed());
        }
        i += 1;
        // the read doubles as the one-second pause
        let mut b = [0u8; 16];
        match s.read(&mut b) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => panic!("{kind:?}: the server answered a slow peer"),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(t0.elapsed()),
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return None;
        }
    }
    None
}

fn slow_peers_cannot_starve_an_honest_client_and_are_timed_out(rt: Runtime) {
    // header 2 s, idle 3 s, packets at 64 KiB/s at least
    let srv = Server::start(
        rt,
        &[
            "--header-timeout",
            "2",
            "--idle-timeout",
            "3",
            "--min-rate",
            "65536",
        ],
    );
    let addr = srv.addr;
    let stop = Arc::new(AtomicBool::new(false));
    // (kind, the time the server must give it)
    let timed: Vec<(Slow, f64)> = [
        (Slow::HeaderTrickle, 2.0),
        (Slow::HeaderTrickle, 2.0),
        (Slow::HeaderTrickle, 2.0),
        (Slow::HalfHeader, 2.0),
        (Slow::HalfHeader, 2.0),
        // a new connection owes its first bytes within the header timeout, as a
        // started header does: silence cannot hold a slot for the idle timeout
        (Slow::Silent, 2.0),
        (Slow::Silent, 2.0),
        // content is owed in windows of 2 s x 64 KiB/s = 128 KiB, each within
        // 2 s + 128 KiB at 64 KiB/s: a trickler is closed after its first window,
        // whatever its packet announces (8 MiB would allow 2 s + 128 s as a whole)
        (Slow::ContentTrickle { content: 256 << 10 }, 4.0),
        (Slow::ContentTrickle { content: 256 << 10 }, 4.0),
        (Slow::ContentTrickle { content: 8 << 20 }, 4.0),
        (Slow::ContentTrickle { content: 8 << 20 }, 4.0),
        (Slow::ContentTrickle { content: 8 << 20 }, 4.0),
    ]
    .into();
    let timed_threads: Vec<_> = timed
        .iter()
        .map(|&(kind, _)| {
            let stop = stop.clone();
            std::thread::spawn(move || slow_peer(addr, kind, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let mut c = Conn::login(addr, &unique_name("honest"));
    for i in 0..20u64 {
        let d = data(64 << 10, i);
        let name = format!("h{i}.bin");
        c.upload(&name, &d, 16 << 10, Order::InOrder);
        assert_eq!(std::fs::read(srv.client_dir(&c.id).join(&name)).unwrap(), d);
    }
    let honest = t0.elapsed();
    for ((kind, limit), t) in timed.iter().zip(timed_threads) {
        let closed = t
            .join()
            .unwrap()
            .unwrap_or_else(|| panic!("{kind:?} was never closed"));
        eprintln!("{rt:?}: {kind:?} closed after {closed:.2?} (limit {limit} s)");
        assert!(
            closed.as_secs_f64() >= limit - 0.5,
            "{kind:?} closed after {closed:?}, before its {limit} s"
        );
        assert!(
            closed.as_secs_f64() < limit + 15.0,
            "{kind:?} closed only after {closed:?}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    eprintln!("{rt:?}: the honest client uploaded 20 files in {honest:.2?} meanwhile");
    assert!(
        srv.wait_no_temp_files(),
        "the slow peers' temp files removed"
    );
}

// ---------------------------------------------------------------------------------
// connection floods

/// Sends a REGISTER on `s`: Some(true) if the server closed the connection without
/// answering, Some(false) if it answered, None if neither happened within `wait`.
fn probe(mut s: TcpStream, wait: Duration) -> Option<bool> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut req = Vec::new();
    encode_name_request(&mut req, &[0; 16], RequestCode::Register, "flood").unwrap();
    let _ = s.write_all(&req);
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => Some(true),
        Ok(_) => Some(false),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(_) => Some(true),
    }
}

/// Sends a REGISTER on `s` and says whether the server closed the connection without
/// answering (within 10 s).
fn refused_unanswered(s: TcpStream) -> bool {
    probe(s, Duration::from_secs(10)) == Some(true)
}

fn a_flood_over_max_connections_is_refused_at_once(rt: Runtime) {
    const MAX: usize = 20;
    let srv = Server::start(rt, &["--max-connections", &MAX.to_string()]);
    let addr = srv.addr;
    let mut held: Vec<Conn> = (0..MAX)
        .map(|i| {
            let mut c = Conn::connect(addr);
            assert!(
                matches!(
                    c.register(&unique_name(&format!("held{i}"))),
                    Response::RegisterOk { .. }
                ),
                "connection {i} under the limit"
            );
            c
        })
        .collect();
    // 8 threads x 40 connections over the limit
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let flood: Vec<_> = (0..8)
        .map(|_| {
            let slowest = slowest.clone();
            std::thread::spawn(move || {
                for _ in 0..40 {
                    let t0 = Instant::now();
                    match TcpStream::connect(addr) {
                        Ok(s) => assert!(refused_unanswered(s), "served over the limit"),
                        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
                    }
                    let dt = t0.elapsed();
                    let mut m = slowest.lock().unwrap();
                    *m = (*m).max(dt);
                }
            })
        })
        .collect();
    for t in flood {
        t.join().expect("flood thread");
    }
    eprintln!(
        "{rt:?}: 320 connections over --max-connections {MAX}: all closed unanswered, the slowest after {:.2?}",
        *slowest.lock().unwrap()
    );
    // the held connections were not disturbed: each is still served
    for c in held.iter_mut() {
        let r = c.request_name(RequestCode::Reconnect, &unique_name("nobody"));
        assert_eq!(r, Response::ReconnectRejected { client_id: c.id });
    }
    // freeing slots lets new connections in again
    held.truncate(MAX - 5);
    assert!(
        wait_until(Duration::from_secs(10), || {
            let mut c = Conn::connect(addr);
            let mut req = Vec::new();
            encode_name_request(
                &mut req,
                &[0; 16],
                RequestCode::Register,
                &unique_name("late"),
            )
            .unwrap();
            c.send(&req).is_ok() && matches!(c.recv(), Ok(Response::RegisterOk { .. }))
        }),
        "a slot freed is usable"
    );
}

fn a_thousand_concurrent_connections_are_served(rt: Runtime) {
    const N: usize = 1000;
    raise_open_files_limit(4096);
    // the default --max-connections (1024)
    let srv = Server::start(rt, &[]);
    let t0 = Instant::now();
    let mut conns: Vec<Conn> = (0..N).map(|_| Conn::connect(srv.addr)).collect();
    let users: Vec<String> = (0..N).map(|i| unique_name(&format!("k{i}"))).collect();
    // all 1000 open at once: every request is written to all, then every answer read
    for (c, u) in conns.iter_mut().zip(&users) {
        let mut req = Vec::new();
        encode_name_request(&mut req, &[0; 16], RequestCode::Register, u).unwrap();
        c.send(&req).unwrap();
    }
    for c in conns.iter_mut() {
        let Response::RegisterOk { client_id } = c.recv().unwrap() else {
            panic!("register")
        };
        c.id = client_id;
    }
    for (c, u) in conns.iter_mut().zip(&users) {
        let mut req = Vec::new();
        encode_send_public_key(&mut req, &c.id, u, keypair().public_der()).unwrap();
        c.send(&req).unwrap();
    }
    for c in conns.iter_mut() {
        let Response::AesKey { encrypted_key, .. } = c.recv().unwrap() else {
            panic!("key")
        };
        c.key = Some(keypair().decrypt_session_key(&encrypted_key).unwrap());
    }
    for (i, c) in conns.iter_mut().enumerate() {
        for p in c.packets("k.bin", &data(4096, i as u64), 4096) {
            c.send(&p).unwrap();
        }
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let Response::FileReceived(f) = c.recv().unwrap() else {
            panic!("1603 on connection {i}")
        };
        assert_eq!(f.cksum, cksum(&data(4096, i as u64)));
        let mut req = Vec::new();
        encode_name_request(&mut req, &c.id, RequestCode::CrcOk, "k.bin").unwrap();
        c.send(&req).unwrap();
    }
    for c in conns.iter_mut() {
        assert_eq!(c.recv().unwrap(), Response::Ack { client_id: c.id });
    }
    let took = t0.elapsed();
    for (i, c) in conns.iter().enumerate() {
        assert_eq!(
            std::fs::read(srv.client_dir(&c.id).join("k.bin")).unwrap(),
            data(4096, i as u64)
        );
    }
    assert!(!srv.log().contains("connection limit reached"));
    assert!(!srv.log().contains("accept failed"), "{}", srv.log());
    eprintln!(
        "{rt:?}: {N} concurrent connections registered, exchanged keys and stored a file each in {took:.2?}"
    );
}

// ---------------------------------------------------------------------------------
// SIGTERM while uploads run

fn sigterm_during_concurrent_uploads_finishes_or_drops_them_cleanly(rt: Runtime) {
    let mut srv = Server::start(rt, &["--shutdown-grace", "3"]);
    let addr = srv.addr;
    let mut idle: Vec<Conn> = (0..4)
        .map(|i| Conn::login(addr, &unique_name(&format!("idle{i}"))))
        .collect();
    let mut ups: Vec<(Conn, Vec<u8>, Vec<Vec<u8>>)> = (0..8)
        .map(|i| {
            let c = Conn::login(addr, &unique_name(&format!("up{i}")));
            let d = data(3 << 19, 100 + i);
            let ps = c.packets("inflight.bin", &d, 1 << 19);
            (c, d, ps)
        })
        .collect();
    for (c, _, ps) in ups.iter_mut() {
        c.send(&ps[0]).unwrap();
    }
    assert!(wait_until(Duration::from_secs(10), || srv.temp_files() == 8));
    srv.signal("TERM");
    for c in idle.iter_mut() {
        assert!(c.is_closed_by_server(), "idle connections are closed");
    }
    // no new connection is served: refused, or closed unanswered -- never left hanging
    // (which held a connection until the process exited, see the glommio listener)
    assert!(wait_until(Duration::from_secs(5), || {
        match TcpStream::connect(addr).map(|s| probe(s, Duration::from_secs(2))) {
            Err(_) | Ok(Some(true)) => true,
            // accepted just before this shard saw the signal: try again
            Ok(Some(false)) => false,
            Ok(None) => {
                panic!("a connection made during the drain was neither refused nor answered")
            }
        }
    }));
    // half the uploads finish their file (and try to start another)
    let (finishing, stalled) = ups.split_at_mut(4);
    let mut second_stored = 0;
    for (c, d, ps) in finishing.iter_mut() {
        for p in &ps[1..] {
            c.send(p).unwrap();
        }
        let Response::FileReceived(f) = c.recv().unwrap() else {
            panic!("no 1603 while draining")
        };
        assert_eq!(f.cksum, cksum(d));
        assert_eq!(
            c.request_name(RequestCode::CrcOk, "inflight.bin"),
            Response::Ack { client_id: c.id }
        );
        // a new file after the drain began: finished (an honest 1603 + ACK) or refused
        // by closing the connection, never half stored
        let r = try_upload(c, "second.bin", b"second", 64, |_| {});
        if r.is_ok() {
            second_stored += 1;
        }
        assert_eq!(
            srv.client_dir(&c.id).join("second.bin").exists(),
            r.is_ok(),
            "{r:?}"
        );
    }
    // the other half stall: dropped when the grace period ends
    for (c, _, _) in stalled.iter_mut() {
        assert!(
            c.is_closed_by_server(),
            "stalled upload dropped after the grace"
        );
    }
    let st = srv
        .wait(Duration::from_secs(30))
        .expect("the server exits after the grace period");
    assert!(st.success(), "{st:?}");
    assert_eq!(srv.temp_files(), 0, "nothing left in .incoming");
    for (c, d, _) in finishing.iter() {
        assert_eq!(
            &std::fs::read(srv.client_dir(&c.id).join("inflight.bin")).unwrap(),
            d
        );
    }
    for (c, _, _) in stalled.iter() {
        assert!(!srv.client_dir(&c.id).join("inflight.bin").exists());
    }
    assert!(srv.log().contains("grace period over"), "{}", srv.log());
    eprintln!("{rt:?}: SIGTERM: 4 in-flight files finished, 4 stalled ones dropped after the grace, {second_stored}/4 files begun after the signal were stored");
}

// ---------------------------------------------------------------------------------
// the bridge loses its server mid-transfer

#[test]
fn the_bridge_survives_its_server_killed_mid_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start_in(Runtime::Mio, dir.path(), &[]);
    let server = srv.addr.to_string();
    let bdata = tempfile::tempdir().unwrap();
    let b = Bridge::start(bdata.path(), &server);
    let auth = format!("Bearer {BRIDGE_TOKEN}");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    agent
        .post(&format!("{}/api/setup", b.url))
        .set("Authorization", &auth)
        .send_json(serde_json::json!({"server": server, "account": "kim", "passphrase": "kim's passphrase"}))
        .unwrap();
    let size = 64usize << 20;
    let v: serde_json::Value = agent
        .post(&format!("{}/api/backups", b.url))
        .set("Authorization", &auth)
        .send_json(serde_json::json!({"files": [{"path": "victim.bin", "size": size}]}))
        .unwrap()
        .into_json()
        .unwrap();
    let id = v["backup"]["id"].as_str().unwrap().to_owned();
    // the body: 24 MiB at once (chunks reach the server), then waits for the kill,
    // then the rest
    let killed = Arc::new(AtomicBool::new(false));
    struct Body {
        left: usize,
        sent: usize,
        killed: Arc<AtomicBool>,
        seed: u64,
    }
    impl Read for Body {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.left == 0 {
                return Ok(0);
            }
            while self.sent >= 24 << 20 && !self.killed.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let n = buf.len().min(self.left).min(64 << 10);
            for b in &mut buf[..n] {
                self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                *b = (self.seed >> 33) as u8;
            }
            self.left -= n;
            self.sent += n;
            Ok(n)
        }
    }
    let url = format!("{}/api/backups/{id}/files/0", b.url);
    let body = Body {
        left: size,
        sent: 0,
        killed: killed.clone(),
        seed: 7,
    };
    let agent2 = agent.clone();
    let auth2 = auth.clone();
    let up = std::thread::spawn(move || {
        agent2
            .put(&url)
            .set("Authorization", &auth2)
            .set("Content-Length", &size.to_string())
            .send(body)
            .map_err(Box::new)
    });
    let repo_bytes = |d: &Path| -> u64 {
        let r = d.join("repository");
        walk_files(&r)
            .iter()
            .filter_map(|p| std::fs::metadata(r.join(p)).ok())
            .map(|m| m.len())
            .sum()
    };
    let before = repo_bytes(dir.path());
    assert!(
        wait_until(Duration::from_secs(60), || repo_bytes(dir.path())
            > before + (4 << 20)),
        "the upload reached the server: {}\n{}",
        std::fs::read_to_string(bdata.path().join("bridge.log")).unwrap_or_default(),
        srv.log()
    );
    srv.kill();
    killed.store(true, Ordering::SeqCst);
    match up.join().unwrap().map_err(|e| *e) {
        Err(ureq::Error::Status(code, r)) => {
            let v: serde_json::Value = r.into_json().unwrap();
            assert_eq!(code, 502, "{v}");
            assert_eq!(v["code"], "upload_failed", "{v}");
        }
        // the bridge may answer before it has read the whole body
        Err(ureq::Error::Transport(_)) => {}
        Ok(r) => panic!("the upload succeeded with its server dead: {}", r.status()),
    }
    let v: serde_json::Value = agent
        .get(&format!("{}/api/backups/{id}", b.url))
        .set("Authorization", &auth)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(v["backup"]["files"][0]["done"], false, "{v}");
    assert_eq!(v["backup"]["state"], "open", "{v}");
    // the bridge is still up, and knows its server is not
    assert_eq!(
        agent
            .get(&format!("{}/healthz", b.url))
            .call()
            .unwrap()
            .status(),
        200
    );
    assert!(matches!(
        agent.get(&format!("{}/readyz", b.url)).call(),
        Err(ureq::Error::Status(503, _))
    ));
    match agent
        .get(&format!("{}/api/snapshots", b.url))
        .set("Authorization", &auth)
        .call()
    {
        Err(ureq::Error::Status(502, r)) => {
            let v: serde_json::Value = r.into_json().unwrap();
            assert_eq!(v["code"], "unreachable", "{v}");
        }
        other => panic!(
            "snapshots with the server down: {:?}",
            other.map(|r| r.status())
        ),
    }
    // the server restarted on its port: the bridge connects again by itself, and the
    // same backup goes on to a snapshot
    let port = server.rsplit(':').next().unwrap().to_owned();
    let srv = Server::start_in(Runtime::Mio, dir.path(), &["--port", &port]);
    assert_eq!(srv.addr.to_string(), server);
    let body = Body {
        left: size,
        sent: 0,
        killed: Arc::new(AtomicBool::new(true)),
        seed: 7,
    };
    let v: serde_json::Value = agent
        .put(&format!("{}/api/backups/{id}/files/0", b.url))
        .set("Authorization", &auth)
        .set("Content-Length", &size.to_string())
        .send(body)
        .unwrap()
        .into_json()
        .unwrap();
    assert!(v["backup"]["chunks_held"].as_u64().unwrap() > 0, "{v}");
    let v: serde_json::Value = agent
        .post(&format!("{}/api/backups/{id}/commit", b.url))
        .set("Authorization", &auth)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(v["backup"]["state"], "done", "{v}");
    drop(srv);
}

// ---------------------------------------------------------------------------------
// a flood of random and truncated frames

const FLOOD_THREADS: usize = 32;
const FLOOD_SECS: u64 = 10;

/// One flood connection: random or truncated frames, then a close.
fn flood_once(addr: SocketAddr, rng: &mut rand::rngs::StdRng, auth: &(String, ClientId)) -> usize {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let mut out = Vec::new();
    let mut id = [0u8; 16];
    // a third of the connections reconnect first, so their frames reach the file code
    if rng.gen_ratio(1, 3) {
        let mut req = Vec::new();
        encode_name_request(&mut req, &auth.1, RequestCode::Reconnect, &auth.0).unwrap();
        if s.write_all(&req).is_err() {
            return 0;
        }
        let mut h = [0u8; 7 + 16 + 128];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        if s.read_exact(&mut h).is_err() {
            return 0;
        }
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        id = auth.1;
    }
    for _ in 0..rng.gen_range(1..8) {
        match rng.gen_range(0..6) {
            // random bytes
            0 => {
                let n = rng.gen_range(1..4096);
                out.extend((0..n).map(|_| rng.gen::<u8>()));
            }
            // a plausible header with a truncated payload
            1 => {
                let code = rng.gen_range(1024..1033);
                let size = rng.gen_range(0..2000u32);
                out.extend(header(id, 3, code, size));
                let n = rng.gen_range(0..=size as usize);
                out.extend((0..n).map(|_| rng.gen::<u8>()));
            }
            // a header announcing a huge or random payload
            2 => {
                let v = if rng.gen_ratio(1, 4) { rng.gen() } else { 3 };
                out.extend(header(id, v, rng.gen(), rng.gen()));
            }
            // SEND_FILE with random sizes, numbers and name, random content
            3 => {
                let content = 16 * rng.gen_range(1..1024u32);
                let mut name = [0u8; 255];
                let len = rng.gen_range(0..40);
                for b in name.iter_mut().take(len) {
                    *b = rng.gen_range(b'a'..=b'z');
                }
                if rng.gen_ratio(1, 4) {
                    rng.fill(&mut name[..]);
                }
                let total = rng.gen_range(1..5u16);
                let mut p = Vec::new();
                p.extend(content.to_le_bytes());
                let orig: u32 = if rng.gen_ratio(1, 5) {
                    rng.gen()
                } else {
                    rng.gen_range(0..(1 << 20))
                };
                p.extend(orig.to_le_bytes());
                p.extend(rng.gen_range(0..=total).to_le_bytes());
                p.extend(total.to_le_bytes());
                p.extend(name);
                let c = rng.gen_range(0..=content as usize);
                p.extend((0..c).map(|_| rng.gen::<u8>()));
                out.extend(header(id, 3, 1028, 267 + content));
                out.extend(p);
            }
            // a CRC request for a random name
            4 => {
                let code = rng.gen_range(1029..1032);
                out.extend(header(id, 3, code, 255));
                let mut name = [0u8; 255];
                name[..5].copy_from_slice(b"x.bin");
                out.extend(name);
            }
            // a burst of tiny headers
            _ => {
                for _ in 0..rng.gen_range(1..50) {
                    out.extend(header(rng.gen(), 3, rng.gen_range(1025..1032), 0));
                }
            }
        }
        if rng.gen_ratio(1, 3) {
            // truncate what is left mid-frame
            let cut = rng.gen_range(0..=out.len());
            out.truncate(cut);
            break;
        }
    }
    let _ = s.write_all(&out);
    let mut sink = [0u8; 4096];
    let _ = s.read(&mut sink);
    out.len()
}

fn a_flood_of_random_and_truncated_frames_leaves_honest_clients_untouched(rt: Runtime) {
    // uploads in flight may reserve at most 256 MiB of disk (flood frames announce
    // files up to 4 GiB)
    let srv = Server::start(rt, &["--max-pending-bytes", "268435456"]);
    let addr = srv.addr;
    let pid = srv.pid().unwrap();
    let (rss0, _) = rss_kib(pid).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, peak_rss) = (stop.clone(), peak.clone(), peak_rss.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some((rss, hwm)) = rss_kib(pid) {
                    peak.fetch_max(hwm, Ordering::SeqCst);
                    peak_rss.fetch_max(rss, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let frames = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let flood: Vec<_> = (0..FLOOD_THREADS)
        .map(|t| {
            let (stop, frames, bytes) = (stop.clone(), frames.clone(), bytes.clone());
            std::thread::spawn(move || {
                let user = unique_name(&format!("flood{t}"));
                let me = (user.clone(), Conn::login(addr, &user).id);
                let mut rng = rand::rngs::StdRng::seed_from_u64(t as u64);
                while !stop.load(Ordering::SeqCst) {
                    let n = flood_once(addr, &mut rng, &me);
                    frames.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(n as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let honest: Vec<_> = (0..2)
        .map(|h| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + h);
                let (mut ok, mut failed) = (0usize, Vec::new());
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let mut c = Conn::login(addr, &unique_name(&format!("honest{h}")));
                    for _ in 0..5 {
                        i += 1;
                        let size = rng.gen_range(0..(2 << 20));
                        let packet = 16 * rng.gen_range(64..(1 << 16));
                        let d = data(size, h << 32 | i);
                        let name = format!("h{i}.bin");
                        match try_upload(&mut c, &name, &d, packet, |_| {}) {
                            Ok(()) => ok += 1,
                            Err(e) => {
                                failed.push(e);
                                break;
                            }
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(FLOOD_SECS));
    stop.store(true, Ordering::SeqCst);
    for t in flood {
        t.join().expect("flood thread");
    }
    let (mut ok, mut failed) = (0, Vec::new());
    for t in honest {
        let (o, f) = t.join().expect("honest thread");
        ok += o;
        failed.extend(f);
    }
    sampler.join().unwrap();
    let (peak, peak_rss) = (peak.load(Ordering::SeqCst), peak_rss.load(Ordering::SeqCst));
    let attempts = ok + failed.len();
    eprintln!(
        "{rt:?}: flood of {} connections ({} MB of frames) from {FLOOD_THREADS} threads for {FLOOD_SECS} s: \
         honest uploads {ok}/{attempts} succeeded ({:.1}%); server RSS {rss0} KiB at start, \
         peak VmRSS {peak_rss} KiB, VmHWM {peak} KiB",
        frames.load(Ordering::SeqCst),
        bytes.load(Ordering::SeqCst) / 1_000_000,
        100.0 * ok as f64 / attempts.max(1) as f64
    );
    assert!(failed.is_empty(), "honest uploads failed: {failed:?}");
    assert!(ok >= 10, "the honest clients got through only {ok} uploads");
    // generous: 32 connections' buffers, the mapped windows of files in flight, the
    // registry; a leak or an unbounded buffer would go far past it
    assert!(peak < 512 * 1024, "server peak RSS {peak} KiB");
    // still up, and clean
    let mut srv = srv;
    assert!(srv.wait(Duration::from_millis(1)).is_none(), "server died");
    let mut c = Conn::login(addr, &unique_name("after"));
    c.upload("after.bin", b"still here", 64, Order::InOrder);
    assert!(srv.wait_no_temp_files(), "flood temp files removed");
}

/// A log that cannot be written (its disk is full: here `/dev/full`) costs the log
/// lines, never the service: uploads are stored and SIGTERM still stops the server.
/// tracing-subscriber used to report the failed write with `eprintln!`, which failed
/// too and panicked the shard that logged; glommio leaked that shard's tasks, and the
/// server never exited.
fn a_log_on_a_full_disk_neither_kills_nor_hangs_the_server(rt: Runtime) {
    let tmp = tempfile::tempdir().unwrap();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut cmd = Command::new(server_binary());
    cmd.args(["--runtime", rt.flag()]);
    let mut srv = Server::spawn_logging_to(cmd, tmp.path(), &[], full);
    let mut conns: Vec<Conn> = (0..4)
        .map(|i| Conn::login(srv.addr, &unique_name(&format!("full-log-{i}"))))
        .collect();
    for round in 0..3 {
        for (i, c) in conns.iter_mut().enumerate() {
            let plain = data(200_000 + i, round * 10 + i as u64);
            let f = c.upload(&format!("f{round}"), &plain, 65536, Order::InOrder);
            assert_eq!(f.cksum, cksum::cksum(&plain));
            let stored = std::fs::read(srv.client_dir(&c.id).join(format!("f{round}"))).unwrap();
            assert_eq!(stored, plain);
        }
    }
    drop(conns);
    let st = srv
        .wait_or_term(Duration::from_secs(30))
        .expect("the server exits after SIGTERM although it cannot log");
    assert!(st.success(), "{st:?}");
}

both_runtimes!(
    a_log_on_a_full_disk_neither_kills_nor_hangs_the_server,
    kill_9_mid_concurrent_uploads_then_restart_loses_nothing_acknowledged,
    a_full_disk_answers_1607_spares_the_others_and_recovers,
    slow_peers_cannot_starve_an_honest_client_and_are_timed_out,
    a_flood_over_max_connections_is_refused_at_once,
    a_thousand_concurrent_connections_are_served,
    sigterm_during_concurrent_uploads_finishes_or_drops_them_cleanly,
    a_flood_of_random_and_truncated_frames_leaves_honest_clients_untouched,
);
