//! Protocol v4 end to end: the real server (both runtimes) and the real `cyberbackup`
//! CLI over 127.0.0.1, with real files: a tree backed up and restored byte for byte
//! with modes, times and links; versions; no plaintext on the server; accounts kept
//! apart whatever ids a client sends; a server killed mid-backup; a tampered chunk.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use cyberbackup_client::v4::conn::{ConnError, ConnectOptions, Connection};
use cyberbackup_client::v4::profile::Profile;
use cyberbackup_client::v4::{self, snapshots};
use cyberbackup_e2e::*;
use cyberbackup_protocol::v4::format::EntryKind;
use cyberbackup_protocol::v4::wire::{Answer, ErrorCode, Request, SnapshotHeader};

const MARKER: &str = "CYBERBACKUP-PLAINTEXT-MARKER-5f1d0c";
const PASS: &str = "correct horse battery staple";

/// A v4 user: a config directory and the CLI.
struct User {
    cfg: tempfile::TempDir,
}

impl User {
    fn new() -> User {
        User {
            cfg: tempfile::tempdir().unwrap(),
        }
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.cli_env(args, &[])
    }

    fn cli_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(client_binary())
            .env("CYBERBACKUP_CONFIG_DIR", self.cfg.path())
            .env("CYBERBACKUP_PASSWORD", PASS)
            .env("CYBERBACKUP_KDF", "test")
            .env_remove("CYBERBACKUP_SERVER")
            .env_remove("CYBERBACKUP_PROTOCOL")
            .envs(env.iter().copied())
            .args(args)
            .output()
            .expect("run cyberbackup")
    }

    /// Runs the CLI and requires success; returns standard output.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "cyberbackup {args:?} failed ({:?}):\n{}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn init(&self, srv: &Server, account: &str) {
        self.ok(&["init", "-s", &srv.addr.to_string(), "-a", account]);
    }

    /// `backup --json`: the snapshot summary.
    fn backup(&self, paths: &[&Path], extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["--json", "backup"];
        let ps: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        args.extend(ps.iter().map(String::as_str));
        args.extend(extra);
        let out = self.ok(&args);
        serde_json::from_str(out.lines().last().unwrap_or("")).expect("backup --json")
    }

    fn profile(&self) -> Profile {
        Profile::new(self.cfg.path())
    }
}

/// Asserts a CLI run's exit code, showing its standard error when it differs.
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a tree holds, by relative path: type, mode, mtime (ns), content hash or
/// link target, size.
fn describe(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_owned();
            let mode = md.mode() & 0o7777;
            let mtime = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
            let what = if md.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&p).unwrap().display())
            } else if md.is_dir() {
                stack.push(p.clone());
                format!("dir {mode:o} {mtime}")
            } else {
                format!("file {mode:o} {mtime} {} {}", md.len(), digest(&p))
            };
            out.insert(rel, what);
        }
    }
    out
}

static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// A cheap content digest that reads the file in 1 MiB blocks (FNV over words; a
/// block of zeros counts once, compared with memcmp so that a debug build is quick).
fn digest(p: &Path) -> String {
    let mut f = fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut h: u64 = 0xcbf29ce484222325;
    let mut zero_blocks = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        if buf[..n] == ZEROS[..n] {
            zero_blocks += 1;
            h = (h ^ n as u64).wrapping_mul(0x100000001b3);
            continue;
        }
        for chunk in buf[..n].chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(w)).wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}/{zero_blocks}")
}

fn set_mtime(p: &Path, secs: u64, nanos: u32) {
    let t = SystemTime::UNIX_EPOCH + Duration::new(secs, nanos);
    let f = fs::File::options()
        .write(true)
        .open(p)
        .or_else(|_| fs::File::open(p))
        .unwrap();
    f.set_times(fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// The test tree under `root/tree`.
fn make_tree(root: &Path, big_sparse: bool) -> PathBuf {
    let t = root.join("tree");
    fs::create_dir_all(t.join("a/b/c")).unwrap();
    fs::create_dir_all(t.join("x")).unwrap();
    fs::create_dir_all(t.join("y")).unwrap();
    fs::create_dir_all(t.join("empty dir")).unwrap();
    fs::write(t.join("x/notes.txt"), format!("x notes {MARKER}")).unwrap();
    fs::write(t.join("y/notes.txt"), format!("y notes, other {MARKER}")).unwrap();
    fs::write(t.join("a/b/c/deep.bin"), data(3 << 20, 1)).unwrap();
    fs::write(t.join("a/empty"), b"").unwrap();
    fs::write(t.join("a/b/ünïcode näme.txt"), MARKER.repeat(1000)).unwrap();
    fs::write(t.join("setuid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(t.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(t.join("x/private"), b"secret").unwrap();
    fs::set_permissions(t.join("x/private"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(t.join("x/none"), b"nobody may read").unwrap();
    fs::set_permissions(t.join("x/none"), fs::Permissions::from_mode(0o000)).unwrap();
    std::os::unix::fs::symlink("../x/notes.txt", t.join("a/link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", t.join("dangling")).unwrap();
    if big_sparse {
        // Over 4 GiB, almost all a hole, with data past the 4 GiB mark.
        let mut f = fs::File::create(t.join("sparse.img")).unwrap();
        f.set_len((4 << 30) + (512 << 20)).unwrap();
        f.seek(SeekFrom::Start((4 << 30) + 12345)).unwrap();
        f.write_all(format!("past 4 GiB {MARKER}").as_bytes())
            .unwrap();
    }
    for (i, p) in ["x/notes.txt", "a/b/c/deep.bin", "a/empty", "setuid"]
        .iter()
        .enumerate()
    {
        set_mtime(&t.join(p), 1_600_000_000 + i as u64, 123_456_789);
    }
    fs::set_permissions(t.join("a/b"), fs::Permissions::from_mode(0o751)).unwrap();
    t
}

/// Every file under `dir` holds no `needle`.
fn assert_nowhere(dir: &Path, needle: &[u8]) {
    let mut stack = vec![dir.to_owned()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() {
                files += 1;
                let b = fs::read(&p).unwrap();
                assert!(
                    !b.windows(needle.len()).any(|w| w == needle),
                    "plaintext found in {}",
                    p.display()
                );
            }
        }
    }
    assert!(files > 3, "the server stored files");
}

fn tree_round_trip(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let tree = make_tree(work.path(), true);
    let u = User::new();
    u.init(&srv, &unique_name("tree"));
    let s = u.backup(&[&tree], &["--tag", "first"]);
    assert_eq!(s["files"], 9, "{s}");
    assert!(s["size"].as_u64().unwrap() > 4 << 30);
    // The zeros of the sparse file are one chunk, sent once.
    assert!(s["bytes_sent"].as_u64().unwrap() < 64 << 20, "{s}");
    let out = work.path().join("restored");
    u.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    let rel = tree.strip_prefix("/").unwrap();
    let restored = out.join(rel);
    assert_eq!(describe(&tree), describe(&restored));
    // The hole stays a hole.
    let md = fs::metadata(restored.join("sparse.img")).unwrap();
    assert!(md.blocks() * 512 < 64 << 20, "{} blocks", md.blocks());
    // Restoring again over a target where a file differs is refused, naming it.
    fs::write(restored.join("a/empty"), b"changed here").unwrap();
    let again = u.cli(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(9));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already exists") && err.contains("a/empty"),
        "{err}"
    );
    // A sub-path alone.
    let part = work.path().join("part");
    let sub = format!("{}/x", rel.display());
    u.ok(&[
        "restore",
        "latest",
        &sub,
        "--target",
        part.to_str().unwrap(),
    ]);
    assert_eq!(
        describe(&tree.join("x")),
        describe(&part.join(rel).join("x"))
    );
    assert!(!part.join(rel).join("a").exists());
    // No plaintext anywhere in the server's directory.
    assert_nowhere(&srv.dir, MARKER.as_bytes());
    // `ls` shows the tree with the symlink's target.
    let ls = u.ok(&["ls", "latest"]);
    assert!(ls.contains("a/link -> ../x/notes.txt"), "{ls}");
}

fn versions_and_an_unchanged_backup(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let tree = make_tree(work.path(), false);
    let u = User::new();
    u.init(&srv, &unique_name("ver"));
    let first = u.backup(&[&tree], &[]);
    fs::write(tree.join("x/notes.txt"), b"changed on tuesday").unwrap();
    let second = u.backup(&[&tree], &[]);
    assert_eq!(second["files"], 8, "{second}");
    assert_eq!(second["files_unchanged"], 7, "{second}");
    let third = u.backup(&[&tree], &[]);
    // Unchanged: nothing read, one small manifest at most.
    assert_eq!(third["files_unchanged"], 8, "{third}");
    assert_eq!(third["chunks_sent"], 0, "{third}");
    assert_eq!(third["bytes_sent"], 0, "{third}");
    let list = u.ok(&["--json", "snapshots"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);
    let rel = tree.strip_prefix("/").unwrap();
    let old = work.path().join("old");
    let id = first["id"].as_str().unwrap();
    u.ok(&["restore", &id[..12], "--target", old.to_str().unwrap()]);
    assert_eq!(
        fs::read_to_string(old.join(rel).join("x/notes.txt")).unwrap(),
        format!("x notes {MARKER}")
    );
    let new = work.path().join("new");
    u.ok(&["restore", "latest", "--target", new.to_str().unwrap()]);
    assert_eq!(
        fs::read(new.join(rel).join("x/notes.txt")).unwrap(),
        b"changed on tuesday"
    );
    // Forget the first: it is gone from the list, the others restore.
    u.ok(&["forget", &id[..12]]);
    let list: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "snapshots"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let gone = u.cli(&[
        "restore",
        &id[..12],
        "--target",
        old.join("x").to_str().unwrap(),
    ]);
    assert_eq!(
        gone.status.code(),
        Some(2),
        "an unknown snapshot is a usage error"
    );
}

fn connect_raw(u: &User) -> Connection {
    v4::connect(&u.profile(), None).unwrap()
}

fn accounts_are_isolated(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let tree = make_tree(work.path(), false);
    let (alice, mallory) = (User::new(), User::new());
    alice.init(&srv, &unique_name("alice"));
    mallory.init(&srv, &unique_name("mallory"));
    let snap = alice.backup(&[&tree], &[]);
    // What alice's data is called, read through her own key.
    let (aconn, akey) = v4::open(&alice.profile(), PASS.as_bytes(), None).unwrap();
    let info = snapshots::find(&aconn, "latest").unwrap();
    let t = snapshots::load(&aconn, &akey, &info.header.id).unwrap();
    let ids: Vec<[u8; 32]> = t
        .entries
        .iter()
        .flat_map(|e| match &e.kind {
            EntryKind::File { chunks } => chunks.clone(),
            _ => vec![],
        })
        .collect();
    assert!(!ids.is_empty());
    drop(aconn);

    let m = connect_raw(&mallory);
    let code = |r: Result<Answer, ConnError>| r.err().and_then(|e| e.code());
    assert!(matches!(m.call(&Request::ListSnapshots), Ok(Answer::SnapshotList(l)) if l.is_empty()));
    assert_eq!(
        code(m.call(&Request::GetSnapshot(info.header.id))),
        Some(ErrorCode::NOT_FOUND)
    );
    assert_eq!(
        code(m.call(&Request::GetChunk(ids[0]))),
        Some(ErrorCode::NOT_FOUND)
    );
    assert_eq!(
        code(m.call(&Request::ForgetSnapshot(info.header.id))),
        Some(ErrorCode::NOT_FOUND)
    );
    match m.call(&Request::HasChunks(ids.clone())) {
        Ok(Answer::ChunksHeld(h)) => assert!(h.iter().all(|h| !h), "{h:?}"),
        other => panic!("{other:?}"),
    }
    // A commit naming alice's chunks is refused: mallory does not hold them.
    let header = SnapshotHeader {
        id: [7; 16],
        ..Default::default()
    };
    let r = m.call(&Request::CommitSnapshot {
        header: header.clone(),
        refs: ids.clone(),
        root: vec![1; 64],
    });
    match r {
        Err(ConnError::Server(e)) => {
            assert_eq!(e.code, ErrorCode::MISSING_CHUNKS);
            assert_eq!(e.missing_ids().len(), ids.len().min(1024));
        }
        other => panic!("{other:?}"),
    }
    // Mallory "overwrites" alice's chunk ids and snapshot id with garbage: it lands in
    // mallory's own namespace.
    for id in &ids {
        let r = m.call(&Request::PutChunk {
            id: *id,
            blob: b"garbage".to_vec(),
        });
        assert!(matches!(r, Ok(Answer::ChunkStored { .. })), "{r:?}");
    }
    let mut h2 = header;
    h2.id = info.header.id;
    let r = m.call(&Request::CommitSnapshot {
        header: h2,
        refs: ids.clone(),
        root: vec![2; 64],
    });
    assert!(matches!(r, Ok(Answer::SnapshotCommitted { .. })), "{r:?}");
    drop(m);
    // Alice's backup is untouched.
    let out = work.path().join("out");
    alice.ok(&[
        "restore",
        snap["id"].as_str().unwrap(),
        "--target",
        out.to_str().unwrap(),
    ]);
    let rel = tree.strip_prefix("/").unwrap();
    assert_eq!(describe(&tree), describe(&out.join(rel)));
    // Mallory's "snapshot" does not open with mallory's key either.
    let bad = mallory.cli(&[
        "restore",
        "latest",
        "--target",
        work.path().join("m").to_str().unwrap(),
    ]);
    assert_exit(&bad, 8);
}

/// The pack files of the server in `dir`.
fn packs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir.join("repository/blobs"))
        .unwrap()
        .filter_map(|e| fs::read_dir(e.unwrap().path().join("packs")).ok())
        .flatten()
        .map(|e| e.unwrap().path())
        .collect()
}

/// The chunk blob files and the pack files of the server in `dir`.
fn blobs_and_packs(dir: &Path) -> Vec<PathBuf> {
    let mut out = blobs(dir);
    out.extend(packs(dir));
    out
}

/// The chunk blob files (chunks not in packs) of the server in `dir`.
fn blobs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("repository/blobs")];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "tmp") {
                    stack.push(p);
                }
            } else if p.parent().is_some_and(|d| {
                d.parent()
                    .and_then(|c| c.file_name())
                    .is_some_and(|n| n == "chunks")
            }) {
                out.push(p);
            }
        }
    }
    out
}

/// Chunk rows committed in the repository's registry (read while the server runs).
fn recorded_chunks(dir: &Path) -> u64 {
    let db = dir.join("repository/repo.db");
    let Ok(c) =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return 0;
    };
    c.query_row("SELECT count(*) FROM chunks", [], |r| r.get::<_, i64>(0))
        .map_or(0, |n| n as u64)
}

fn kill_during_backup_then_resume(rt: Runtime) {
    kill_then_resume(rt, &["--pack-below", "0"]);
}

/// The same with every chunk written in packs: a kill between a pack and its rows
/// leaves an orphan pack at most, which collection removes; scrub then finds every
/// chunk where its row says, and the snapshot restores whole again.
fn kill_during_a_packed_backup_then_resume_and_collect(rt: Runtime) {
    let (dir, srv, u, src, work) = kill_then_resume(rt, &["--pack-below", "16777216"]);
    assert!(!packs(dir.path()).is_empty(), "no packs written");
    assert!(blobs(dir.path()).is_empty(), "a chunk outside a pack");
    let gc = srv.admin_cmd(&["gc", "--grace-hours", "0"]);
    assert!(gc.status.success(), "{gc:?}");
    let scrub = srv.admin_cmd(&["scrub"]);
    let said = String::from_utf8_lossy(&scrub.stdout);
    assert!(said.contains("0 damaged, 0 missing"), "{said} {scrub:?}");
    let out = work.path().join("again");
    let addr = srv.addr.to_string();
    restores_whole(&u, &addr, &src, &out);
}

/// `restore latest` of `src` through `addr` into `out` gives `src` back.
fn restores_whole(u: &User, addr: &str, src: &Path, out: &Path) {
    u.ok(&[
        "restore",
        "latest",
        "-s",
        addr,
        "--target",
        out.to_str().unwrap(),
    ]);
    let rel = src.strip_prefix("/").unwrap();
    assert_eq!(describe(src), describe(&out.join(rel)));
}

/// Kills the server (started with `args`) mid-backup, resumes the backup on a
/// restarted one and restores it; returns the running server and what it serves.
fn kill_then_resume(
    rt: Runtime,
    args: &[&str],
) -> (tempfile::TempDir, Server, User, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start_in(rt, dir.path(), args);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        fs::write(src.join(format!("f{i}.bin")), data(48 << 20, 100 + i)).unwrap();
    }
    let u = User::new();
    u.init(&srv, &unique_name("kill"));
    let mut child = Command::new(client_binary())
        .env("CYBERBACKUP_CONFIG_DIR", u.cfg.path())
        .env("CYBERBACKUP_PASSWORD", PASS)
        .env("CYBERBACKUP_KDF", "test")
        .args(["--json", "backup", src.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the server once some chunks are recorded (and so acknowledged: a chunk's
    // answer leaves after its row is committed), well before the end.
    let t0 = Instant::now();
    let recorded = loop {
        let n = recorded_chunks(dir.path());
        if n >= 10 {
            break n;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no chunks stored");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the backup ended before the kill"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    srv.kill();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(5), "a lost server is exit code 5");
    // The restarted server listens on another port: the same key, pinned, is accepted.
    let srv = Server::start_in(rt, dir.path(), args);
    let addr = srv.addr.to_string();
    let s = u.backup(&[&src], &["-s", &addr]);
    assert_eq!(s["files"], 6);
    // What was recorded (acknowledged) before the kill was not sent again.
    assert!(
        s["chunks_held"].as_u64().unwrap() >= recorded,
        "{recorded} chunks were recorded before the kill: {s}"
    );
    assert!(
        s["bytes_sent"].as_u64().unwrap() < 6 * (48 << 20) - (8 << 20),
        "{s}"
    );
    let out = work.path().join("out");
    restores_whole(&u, &addr, &src, &out);
    (dir, srv, u, src, work)
}

fn tampering_is_found_by_restore_and_scrub(rt: Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start_in(rt, dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("only.bin"), data(2 << 20, 9)).unwrap();
    let u = User::new();
    u.init(&srv, &unique_name("tamper"));
    u.backup(&[&src], &[]);
    srv.stop();
    // The largest chunk blob or pack holds the file's chunks (the manifest's is small);
    // a byte in the middle of it is a byte of one chunk.
    let victim = blobs_and_packs(dir.path())
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut b = fs::read(&victim).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x40;
    fs::write(&victim, &b).unwrap();
    let srv = Server::start_in(rt, dir.path(), &[]);
    let addr = srv.addr.to_string();
    let out = work.path().join("out");
    let r = u.cli(&[
        "restore",
        "latest",
        "-s",
        &addr,
        "--target",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(8), "{err}");
    assert!(err.contains("only.bin"), "the error names the file: {err}");
    let rel = src.strip_prefix("/").unwrap();
    assert!(
        !out.join(rel).join("only.bin").exists(),
        "no half-written file"
    );
    drop(srv);
    // The scrub (on the stopped server) finds it too.
    let scrub = Command::new(server_binary())
        .current_dir(dir.path())
        .arg("scrub")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&scrub.stdout);
    assert_eq!(scrub.status.code(), Some(3), "{text}");
    assert!(text.contains("damaged chunk"), "{text}");
    assert!(text.contains("1 damaged"), "{text}");
}

/// A second connection while the scrub holds the repository is refused clearly, and
/// a wrong passphrase is exit code 7.
fn wrong_passphrase_and_server_key(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let u = User::new();
    u.init(&srv, &unique_name("pw"));
    let out = Command::new(client_binary())
        .env("CYBERBACKUP_CONFIG_DIR", u.cfg.path())
        .env("CYBERBACKUP_PASSWORD", "wrong")
        .args(["ls", "latest"])
        .output()
        .unwrap();
    assert_exit(&out, 7);
    // A server with another key at the pinned address is refused before login.
    let other = Server::start(rt, &[]);
    let pins = u.cfg.path().join("known_servers");
    let text = fs::read_to_string(&pins).unwrap();
    fs::write(
        &pins,
        text.replace(&srv.addr.to_string(), &other.addr.to_string()),
    )
    .unwrap();
    let out = u.cli(&["snapshots", "--server", &other.addr.to_string()]);
    assert_exit(&out, 7);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the one pinned"));
    let _ = ConnectOptions::default();
}

/// The server's own collection: chunks of a forgotten snapshot go once the grace
/// period has passed, while backups made during collections restore whole.
fn collection_while_serving(rt: Runtime) {
    let srv = Server::start(rt, &["--gc-interval", "1", "--gc-grace", "4"]);
    let work = tempfile::tempdir().unwrap();
    let tree = make_tree(work.path(), false);
    let u = User::new();
    u.init(&srv, &unique_name("gc"));
    let first = u.backup(&[&tree], &[]);
    let usage = |u: &User| -> serde_json::Value {
        serde_json::from_str(&u.ok(&["--json", "usage"])).unwrap()
    };
    let held = usage(&u)["chunks"].as_u64().unwrap();
    assert!(held > 0);
    u.ok(&["forget", first["id"].as_str().unwrap()]);
    // Backups go on while collections run every second.
    let other = work.path().join("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("kept.bin"), data(1 << 20, 42)).unwrap();
    for _ in 0..3 {
        u.backup(&[&other], &[]);
        std::thread::sleep(Duration::from_millis(700));
    }
    let t0 = Instant::now();
    loop {
        let now = usage(&u)["chunks"].as_u64().unwrap();
        if now < held {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the forgotten snapshot's chunks were never collected ({now} held)"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The line is logged just after the registry commits what usage reads.
    assert!(
        wait_until(Duration::from_secs(10), || srv
            .log()
            .contains("v4 collection freed space")),
        "{}",
        srv.log()
    );
    let out = work.path().join("out");
    u.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    let rel = other.strip_prefix("/").unwrap();
    assert_eq!(describe(&other), describe(&out.join(rel)));
    // The forgotten tree backed up again is whole again.
    u.backup(&[&tree], &[]);
    let out2 = work.path().join("out2");
    u.ok(&["restore", "latest", "--target", out2.to_str().unwrap()]);
    assert_eq!(
        describe(&tree),
        describe(&out2.join(tree.strip_prefix("/").unwrap()))
    );
}

/// `forget --keep-*` on snapshots with made-up times: the dry run says what the
/// rules keep and why and changes nothing; the real run forgets the rest.
fn forget_policy(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), b"version 0").unwrap();
    let u = User::new();
    u.init(&srv, &unique_name("policy"));
    let times = [
        ("2026-01-01 12:00:00", Some("keep")),
        ("2026-06-01 12:00:00", None),
        ("2026-11-01 10:00:00", None),
        ("2026-12-01 09:00:00", None),
        ("2026-12-01 20:00:00", None),
        ("2026-12-04 10:00:00", None),
    ];
    let mut ids = Vec::new();
    for (i, (t, tag)) in times.iter().enumerate() {
        fs::write(src.join("a.txt"), format!("version {i}")).unwrap();
        let mut extra = vec!["--time", t];
        if let Some(tag) = tag {
            extra.extend(["--tag", tag]);
        }
        ids.push(
            u.backup(&[&src], &extra)["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let rules = [
        "--keep-last",
        "1",
        "--keep-monthly",
        "2",
        "--keep-tag",
        "keep",
    ];
    let mut args = vec!["--json", "forget", "--dry-run"];
    args.extend(rules);
    let dry: serde_json::Value = serde_json::from_str(&u.ok(&args)).unwrap();
    let kept: Vec<&str> = dry["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["keep"].as_bool().unwrap())
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    let mut want = vec![ids[0].as_str(), ids[2].as_str(), ids[5].as_str()];
    let mut got = kept.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "{dry}");
    let newest = dry["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == ids[5])
        .unwrap();
    assert_eq!(
        newest["reasons"],
        serde_json::json!(["last 1", "monthly 2026-12"])
    );
    let list: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "snapshots"])).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        6,
        "a dry run forgets nothing"
    );
    let mut args = vec!["forget"];
    args.extend(rules);
    u.ok(&args);
    let list: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "snapshots"])).unwrap();
    let mut left: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, want);
    // A kept snapshot restores its own version.
    let out = work.path().join("out");
    u.ok(&["restore", &ids[2][..10], "--target", out.to_str().unwrap()]);
    let rel = src.strip_prefix("/").unwrap();
    assert_eq!(fs::read(out.join(rel).join("a.txt")).unwrap(), b"version 2");
    // No rule and no snapshot is a usage error.
    assert_eq!(u.cli(&["forget"]).status.code(), Some(2));
}

/// `diff` marks what changed between two snapshots; `find` finds every version.
fn diff_and_find(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let tree = make_tree(work.path(), false);
    let u = User::new();
    u.init(&srv, &unique_name("diff"));
    let a = u.backup(&[&tree], &[]);
    fs::write(tree.join("x/notes.txt"), b"rewritten").unwrap();
    fs::set_permissions(tree.join("x/private"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::write(tree.join("new.txt"), b"brand new").unwrap();
    fs::remove_file(tree.join("a/empty")).unwrap();
    let b = u.backup(&[&tree], &[]);
    let out = u.ok(&[
        "--json",
        "diff",
        a["id"].as_str().unwrap(),
        b["id"].as_str().unwrap(),
    ]);
    let rel = tree.strip_prefix("/").unwrap().display().to_string();
    let mut marks = BTreeMap::new();
    for l in out.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let p = v["path"]
            .as_str()
            .unwrap()
            .strip_prefix(&format!("{rel}/"))
            .map(str::to_string);
        if let Some(p) = p {
            marks.insert(p, v["change"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(
        marks.get("x/notes.txt").map(String::as_str),
        Some("M"),
        "{marks:?}"
    );
    assert_eq!(
        marks.get("x/private").map(String::as_str),
        Some("U"),
        "{marks:?}"
    );
    assert_eq!(
        marks.get("new.txt").map(String::as_str),
        Some("+"),
        "{marks:?}"
    );
    assert_eq!(
        marks.get("a/empty").map(String::as_str),
        Some("-"),
        "{marks:?}"
    );
    assert!(
        !marks.contains_key("y/notes.txt"),
        "unchanged files are not listed: {marks:?}"
    );
    let found = u.ok(&["--json", "find", "notes.txt"]);
    let hits: Vec<serde_json::Value> = found
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(hits.len(), 4, "x/ and y/ notes in both snapshots: {found}");
    let found = u.ok(&["--json", "find", "**/y/*.txt"]);
    assert_eq!(found.lines().count(), 2, "{found}");
}

/// `check` sees every snapshot open; `check --read-data` finds a removed and a
/// corrupted chunk, naming the snapshot and file.
fn check_finds_removed_and_corrupted_chunks(rt: Runtime) {
    let dir = tempfile::tempdir().unwrap();
    // Chunks as blobs of their own: one is removed, another damaged.
    let mut srv = Server::start_in(rt, dir.path(), &["--pack-below", "0"]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("one.bin"), data(600 << 10, 1)).unwrap();
    fs::write(src.join("two.bin"), data(700 << 10, 2)).unwrap();
    let u = User::new();
    u.init(&srv, &unique_name("check"));
    u.backup(&[&src], &[]);
    let ok = u.ok(&["--json", "check", "--read-data"]);
    let v: serde_json::Value = serde_json::from_str(ok.lines().last().unwrap()).unwrap();
    assert_eq!(v["errors"], serde_json::json!([]), "{ok}");
    assert!(v["chunks_read"].as_u64().unwrap() >= 3, "{ok}");
    srv.stop();
    let mut bl = blobs(dir.path());
    bl.sort_by_key(|p| std::cmp::Reverse(fs::metadata(p).unwrap().len()));
    fs::remove_file(&bl[0]).unwrap();
    let mut b = fs::read(&bl[1]).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    fs::write(&bl[1], &b).unwrap();
    let srv = Server::start_in(rt, dir.path(), &["--pack-below", "0"]);
    let addr = srv.addr.to_string();
    let r = u.cli(&["check", "--read-data", "-s", &addr]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(8), "{err}");
    assert!(err.contains("cannot be read"), "{err}");
    assert!(err.contains("does not verify"), "{err}");
    assert!(err.contains("one.bin") || err.contains("two.bin"), "{err}");
    let sub = u.cli(&["check", "--read-data-subset", "150%", "-s", &addr]);
    assert_eq!(
        sub.status.code(),
        Some(2),
        "a share over 100% is a usage error"
    );
}

/// Backup excludes (patterns, an exclude file, cache directories), `dump`, restore
/// includes and excludes, and a restore run again that keeps what is already in place.
fn excludes_dump_and_resumed_restore(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let tree = make_tree(work.path(), false);
    fs::create_dir_all(tree.join("cache/sub")).unwrap();
    fs::write(
        tree.join("cache/CACHEDIR.TAG"),
        "Signature: 8a477f597d28d172789f06886806bc55\n# a cache\n",
    )
    .unwrap();
    fs::write(tree.join("cache/sub/blob"), data(1 << 20, 5)).unwrap();
    fs::write(tree.join("scratch.tmp"), b"temporary").unwrap();
    let xf = work.path().join("excludes");
    fs::write(&xf, "# temporary files\n*.tmp\n").unwrap();
    let u = User::new();
    u.init(&srv, &unique_name("excl"));
    let xf_s = xf.display().to_string();
    u.backup(
        &[&tree],
        &[
            "--exclude-caches",
            "--exclude-file",
            &xf_s,
            "--exclude",
            "y",
        ],
    );
    let rel = tree.strip_prefix("/").unwrap().display().to_string();
    let ls = u.ok(&["--json", "ls", "latest"]);
    let paths: Vec<String> = ls
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["path"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let has = |p: &str| paths.iter().any(|x| *x == format!("{rel}/{p}"));
    assert!(
        has("x/notes.txt") && has("cache") && has("cache/CACHEDIR.TAG"),
        "{paths:?}"
    );
    assert!(
        !has("scratch.tmp") && !has("y") && !has("y/notes.txt") && !has("cache/sub"),
        "{paths:?}"
    );
    // dump: one file to standard output.
    let out = u.cli(&["dump", "latest", &format!("{rel}/x/notes.txt")]);
    assert!(out.status.success());
    assert_eq!(out.stdout, fs::read(tree.join("x/notes.txt")).unwrap());
    assert_eq!(
        u.cli(&["dump", "latest", &format!("{rel}/x")])
            .status
            .code(),
        Some(2)
    );
    // Restore only the .txt files, then everything but a/.
    let only = work.path().join("only");
    u.ok(&[
        "restore",
        "latest",
        "--include",
        "*.txt",
        "--target",
        only.to_str().unwrap(),
    ]);
    assert!(only.join(&rel).join("x/notes.txt").exists());
    assert!(!only.join(&rel).join("a/b/c/deep.bin").exists());
    let some = work.path().join("some");
    u.ok(&[
        "restore",
        "latest",
        "--exclude",
        "a",
        "--target",
        some.to_str().unwrap(),
    ]);
    assert!(some.join(&rel).join("x/notes.txt").exists());
    assert!(!some.join(&rel).join("a").exists());
    // A full restore, interrupted (a file is missing), run again: the rest is kept.
    let full = work.path().join("full");
    u.ok(&["restore", "latest", "--target", full.to_str().unwrap()]);
    fs::remove_file(full.join(&rel).join("a/b/c/deep.bin")).unwrap();
    let again = u.ok(&[
        "--json",
        "restore",
        "latest",
        "--target",
        full.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(again.lines().last().unwrap()).unwrap();
    assert_eq!(
        v["already_restored"].as_u64().unwrap() + 1,
        v["files"].as_u64().unwrap(),
        "{v}"
    );
    assert_eq!(
        fs::read(full.join(&rel).join("a/b/c/deep.bin")).unwrap(),
        fs::read(tree.join("a/b/c/deep.bin")).unwrap()
    );
    // A file that differs is still refused without --overwrite.
    fs::write(full.join(&rel).join("x/notes.txt"), b"local edit").unwrap();
    let r = u.cli(&["restore", "latest", "--target", full.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(9));
}

/// Devices: a backup-only device enrolled with a code can back up but not forget or
/// read; a code works once; a revoked device is refused; when every device is lost,
/// the server's admin code and the passphrase bring the data back; `key passwd`.
fn devices_enrolment_revocation_and_recovery(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let addr = srv.addr.to_string();
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("thesis.txt"), format!("chapter one {MARKER}")).unwrap();
    let account = unique_name("dev");
    let alice = User::new();
    alice.init(&srv, &account);
    alice.backup(&[&src], &[]);
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();

    // A backup-only device.
    let code = alice.ok(&["device", "add", "--capabilities", "backup"]);
    let code = code.trim();
    let nas = User::new();
    nas.ok(&["enrol", "-s", &addr, code, "--device", "nas"]);
    nas.backup(&[&src], &["--tag", "from-nas"]);
    let f = nas.cli(&["forget", "latest"]);
    assert_eq!(f.status.code(), Some(6), "{}", stderr(&f));
    assert!(stderr(&f).contains("FORBIDDEN"), "{}", stderr(&f));
    let r = nas.cli(&[
        "restore",
        "latest",
        "--target",
        work.path().join("n").to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(6), "{}", stderr(&r));
    // The code is used up.
    let again = User::new().cli(&["enrol", "-s", &addr, code]);
    assert_eq!(again.status.code(), Some(6));
    assert!(stderr(&again).contains("BAD_CODE"), "{}", stderr(&again));
    // Listed, then revoked.
    let list: serde_json::Value =
        serde_json::from_str(&alice.ok(&["--json", "device", "list"])).unwrap();
    let devs = list.as_array().unwrap();
    assert_eq!(devs.len(), 2, "{list}");
    let nas_id = devs.iter().find(|d| d["name"] == "nas").unwrap()["id"]
        .as_u64()
        .unwrap();
    assert_eq!(
        devs.iter().find(|d| d["this"] == true).unwrap()["capabilities"],
        "backup+read+forget+admin"
    );
    alice.ok(&["device", "revoke", &nas_id.to_string()]);
    let refused = nas.cli(&["snapshots"]);
    assert_eq!(refused.status.code(), Some(6));
    assert!(
        stderr(&refused).contains("DEVICE_REVOKED"),
        "{}",
        stderr(&refused)
    );

    // Every device lost: the operator's code, then the passphrase alone.
    let admin = Command::new(server_binary())
        .current_dir(&srv.dir)
        .args(["enrol-code", "--account", &account])
        .output()
        .unwrap();
    assert!(
        admin.status.success(),
        "{}",
        String::from_utf8_lossy(&admin.stderr)
    );
    let rescue_code = String::from_utf8_lossy(&admin.stdout).trim().to_string();
    let rescued = User::new();
    rescued.ok(&["enrol", "-s", &addr, &rescue_code]);
    let out = work.path().join("rescued");
    rescued.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    let rel = src.strip_prefix("/").unwrap();
    assert_eq!(describe(&src), describe(&out.join(rel)));

    // A new passphrase: the old one stops working; `key list` shows a new wrapping
    // (its id) at the test's Argon2id cost.
    let key_id = |u: &User| -> serde_json::Value {
        serde_json::from_str(u.ok(&["--json", "key", "list"]).trim()).unwrap()
    };
    let before = key_id(&rescued);
    assert_eq!(before["kdf"], "argon2id");
    let changed = rescued.cli_env(
        &["key", "passwd"],
        &[("CYBERBACKUP_NEW_PASSWORD", "a new passphrase")],
    );
    assert!(changed.status.success(), "{}", stderr(&changed));
    let after = key_id(&rescued);
    assert_ne!(before["id"], after["id"]);
    assert_eq!(before["memory_kib"], after["memory_kib"]);
    let old = alice.cli(&["ls", "latest"]);
    assert_eq!(old.status.code(), Some(7), "{}", stderr(&old));
    let new = alice.cli_env(
        &["ls", "latest"],
        &[("CYBERBACKUP_PASSWORD", "a new passphrase")],
    );
    assert!(new.status.success(), "{}", stderr(&new));
}

/// A file that cannot be backed up makes a partial snapshot (tagged, exit code 3);
/// standard input as a file; `stats`; a quota refuses a backup before data is sent.
fn partial_stdin_stats_and_quota(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("ok.txt"), b"fine").unwrap();
    let fifo = std::ffi::CString::new(src.join("pipe").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let account = unique_name("part");
    let u = User::new();
    u.init(&srv, &account);
    // Nothing that exists: no snapshot, a usage error that says why.
    let none = u.cli(&["backup", "/nonexistent/path"]);
    assert_eq!(none.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("No such file"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );
    let out = u.cli(&["--json", "backup", src.to_str().unwrap()]);
    assert_exit(&out, 3);
    assert!(String::from_utf8_lossy(&out.stderr).contains("pipe"));
    let list: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "snapshots"])).unwrap();
    assert_eq!(list[0]["tags"], serde_json::json!(["partial"]), "{list}");
    // Standard input.
    let mut child = Command::new(client_binary())
        .env("CYBERBACKUP_CONFIG_DIR", u.cfg.path())
        .env("CYBERBACKUP_PASSWORD", PASS)
        .args(["backup", "--stdin", "--stdin-filename", "db/dump.sql"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let dump = data(3 << 20, 77);
    child.stdin.take().unwrap().write_all(&dump).unwrap();
    assert!(child.wait().unwrap().success());
    let got = u.cli(&["dump", "latest", "db/dump.sql"]);
    assert!(got.status.success());
    assert_eq!(got.stdout, dump);
    // stats: two snapshots; every byte of the 3 MiB stored once.
    let st: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "stats"])).unwrap();
    assert_eq!(st["snapshots"], 2, "{st}");
    assert!(st["stored_bytes"].as_u64().unwrap() >= 3 << 20, "{st}");
    // A quota already reached: refused before anything is sent.
    let q = Command::new(server_binary())
        .current_dir(&srv.dir)
        .args(["quota", "--account", &account, "--bytes", "1M"])
        .output()
        .unwrap();
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let before = st["stored_bytes"].as_u64().unwrap();
    fs::remove_file(src.join("pipe")).unwrap();
    fs::write(src.join("more.bin"), data(1 << 20, 3)).unwrap();
    let refused = u.cli(&["backup", src.to_str().unwrap()]);
    assert_eq!(refused.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("QUOTA_EXCEEDED"));
    // With --json, the error line carries the server's reason.
    let refused = u.cli(&["--json", "backup", src.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&refused.stdout);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["reason"], "QUOTA_EXCEEDED", "{last}");
    assert_eq!(last["exit_code"], 6, "{last}");
    let st: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "stats"])).unwrap();
    assert_eq!(
        st["stored_bytes"].as_u64().unwrap(),
        before,
        "nothing was stored"
    );
    assert_eq!(st["quota"], 1 << 20);
}

/// A profile of config.toml drives backup and forget without flags (as the systemd
/// units in contrib/ run them).
fn profiles_drive_backup_and_forget(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("keep.txt"), b"kept").unwrap();
    fs::write(src.join("junk.tmp"), b"not kept").unwrap();
    let u = User::new();
    u.init(&srv, &unique_name("prof"));
    fs::write(
        u.cfg.path().join("config.toml"),
        format!(
            "[profiles.home]\npaths = [{:?}]\nexcludes = [\"*.tmp\"]\ntags = [\"scheduled\"]\nkeep_last = 1\n",
            src.display().to_string()
        ),
    )
    .unwrap();
    u.ok(&["backup", "--profile", "home"]);
    let second = u.cli_env(&["backup"], &[("CYBERBACKUP_PROFILE", "home")]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let list: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "snapshots"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(list[0]["tags"], serde_json::json!(["scheduled"]));
    let ls = u.ok(&["ls", "latest"]);
    assert!(ls.contains("keep.txt") && !ls.contains("junk.tmp"), "{ls}");
    // Snapshots of other paths are not the profile's to forget.
    let other = work.path().join("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("x"), b"x").unwrap();
    u.backup(&[&other], &[]);
    u.backup(&[&other], &[]);
    u.ok(&["forget", "--profile", "home"]);
    let list: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "snapshots"])).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        3,
        "keep_last = 1 of the profile's two; the other two stay"
    );
    // Every flag also comes from the environment (lists comma-separated).
    let env_src = work.path().join("env-src");
    fs::create_dir_all(&env_src).unwrap();
    for n in ["a.txt", "b.log", "c.tmp"] {
        fs::write(env_src.join(n), n).unwrap();
    }
    let out = u.cli_env(
        &["backup", env_src.to_str().unwrap()],
        &[
            ("CYBERBACKUP_BACKUP_EXCLUDE", "*.log,*.tmp"),
            ("CYBERBACKUP_BACKUP_TAG", "from-env,second"),
            ("CYBERBACKUP_QUIET", "true"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "quiet from the environment");
    let ls = u.ok(&["ls", "latest"]);
    assert!(
        ls.contains("a.txt") && !ls.contains("b.log") && !ls.contains("c.tmp"),
        "{ls}"
    );
    let list: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "snapshots"])).unwrap();
    let newest = list
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|s| s["time_ms"].as_i64())
        .unwrap();
    assert_eq!(newest["tags"], serde_json::json!(["from-env", "second"]));
    let bad = u.cli(&["backup", "--profile", "nope"]);
    assert_eq!(bad.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("it has: home"));
}

/// Files uploaded with the v3 CLI, read over v4 by proving the v3 identity: listed,
/// restored byte for byte (and resumed), imported as a snapshot; a key that is not
/// the v3 client's is refused; the v3 store is unchanged.
fn legacy_list_restore_and_import(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let v3 = w.join("v3");
    fs::create_dir_all(&v3).unwrap();
    let files = [
        ("report.pdf", data(3 * 1024 * 1024 + 17, 7)),
        ("notes.txt", format!("{MARKER} notes\n").into_bytes()),
        ("empty", Vec::new()),
    ];
    for (n, b) in &files {
        fs::write(v3.join(n), b).unwrap();
    }
    let old_user = unique_name("old");
    let up = Command::new(client_binary())
        .current_dir(&v3)
        .env("CYBERBACKUP_PROTOCOL", "3")
        .args([
            "backup",
            "--server",
            &srv.addr.to_string(),
            "--user",
            &old_user,
        ])
        .args(files.iter().map(|(n, _)| *n))
        .output()
        .unwrap();
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let me = v3.join("me.info");
    let me_s = me.to_str().unwrap();

    let u = User::new();
    u.init(&srv, &unique_name("new"));
    // list: JSON lines, one per file, then the summary.
    let out = u.ok(&["--json", "--identity", me_s, "legacy", "list"]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let names: Vec<&str> = lines[..3]
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["empty", "notes.txt", "report.pdf"]);
    assert_eq!(lines[2]["size"], 3 * 1024 * 1024 + 17);
    assert_eq!(lines[3]["event"], "summary");
    assert_eq!(lines[3]["v3_client"], old_user.as_str());
    assert_eq!(lines[3]["files"], 3);

    // restore: every file, byte for byte; a second run resumes without rewriting.
    let out_dir = w.join("restored");
    let t = out_dir.to_str().unwrap();
    u.ok(&["--identity", me_s, "legacy", "restore", "--target", t]);
    for (n, b) in &files {
        assert_eq!(&fs::read(out_dir.join(n)).unwrap(), b, "{n}");
    }
    let again: serde_json::Value = serde_json::from_str(
        u.ok(&[
            "--json",
            "--identity",
            me_s,
            "legacy",
            "restore",
            "--target",
            t,
        ])
        .trim(),
    )
    .unwrap();
    assert_eq!(again["files"], 0);
    assert_eq!(again["already_restored"], 3);
    // A file changed since is not replaced without --overwrite (exit 9).
    fs::write(out_dir.join("notes.txt"), b"changed").unwrap();
    let r = u.cli(&[
        "--identity",
        me_s,
        "legacy",
        "restore",
        "notes.*",
        "--target",
        t,
    ]);
    assert_exit(&r, 9);
    u.ok(&[
        "--identity",
        me_s,
        "legacy",
        "restore",
        "notes.*",
        "--target",
        t,
        "--overwrite",
    ]);
    assert_eq!(fs::read(out_dir.join("notes.txt")).unwrap(), files[1].1);
    let r = u.cli(&[
        "--identity",
        me_s,
        "legacy",
        "restore",
        "nope*",
        "--target",
        t,
    ]);
    assert_eq!(r.status.code(), Some(2));

    // Someone with the id but another key is refused (exit 6, FORBIDDEN).
    // (--private-key replaces me.info's key line; DER is taken as well as base64.)
    let text = fs::read_to_string(&me).unwrap();
    let other = cyberbackup_protocol::v3::crypto::ClientKeypair::generate(
        &mut cyberbackup_protocol::v3::crypto::OsRng,
    )
    .unwrap();
    let forged = w.join("forged.der");
    fs::write(&forged, other.private_der()).unwrap();
    let r = u.cli(&[
        "--identity",
        me_s,
        "legacy",
        "list",
        "--private-key",
        forged.to_str().unwrap(),
    ]);
    assert_exit(&r, 6);
    assert!(String::from_utf8_lossy(&r.stderr).contains("FORBIDDEN"));
    // A missing identity file is a configuration error (exit 4).
    let r = u.cli(&["--identity", "/nonexistent/me.info", "legacy", "list"]);
    assert_exit(&r, 4);

    // import: one snapshot tagged legacy-import that restores the same bytes, with no
    // plaintext in the v4 repository.
    let imp = u.ok(&["--json", "--identity", me_s, "legacy", "import"]);
    let summary: serde_json::Value = serde_json::from_str(imp.lines().last().unwrap()).unwrap();
    assert_eq!(summary["files"], 3);
    let list: serde_json::Value = serde_json::from_str(&u.ok(&["--json", "snapshots"])).unwrap();
    assert_eq!(list[0]["tags"], serde_json::json!(["legacy-import"]));
    let back = w.join("from-snapshot");
    u.ok(&["restore", "latest", "--target", back.to_str().unwrap()]);
    for (n, b) in &files {
        assert_eq!(&fs::read(back.join(n)).unwrap(), b, "{n}");
    }
    assert_nowhere(&srv.dir.join("repository"), MARKER.as_bytes());
    // The v3 files are still where v3 put them.
    let id =
        cyberbackup_protocol::common::parse_client_id_hex(text.lines().nth(1).unwrap()).unwrap();
    assert_eq!(
        fs::read(srv.client_dir(&id).join("report.pdf")).unwrap(),
        files[0].1
    );
}

/// `prune` frees a forgotten snapshot's chunks at once (the server's grace is 0 here),
/// a kept snapshot still restores whole, and a device without forget may not prune.
fn prune_reclaims_space(rt: Runtime) {
    let srv = Server::start(rt, &["--gc-interval", "0", "--gc-grace", "0"]);
    let work = tempfile::tempdir().unwrap();
    let a = work.path().join("a");
    let b = work.path().join("b");
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    fs::write(a.join("big.bin"), data(4 << 20, 1)).unwrap();
    fs::write(b.join("kept.bin"), data(2 << 20, 2)).unwrap();
    let u = User::new();
    u.init(&srv, &unique_name("prune"));
    let first = u.backup(&[&a], &[]);
    u.backup(&[&b], &[]);
    let usage = |u: &User| -> serde_json::Value {
        serde_json::from_str(&u.ok(&["--json", "usage"])).unwrap()
    };
    let before = usage(&u)["stored_bytes"].as_u64().unwrap();
    u.ok(&["forget", first["id"].as_str().unwrap()]);
    let out = u.ok(&["--json", "prune"]);
    let p: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(p["chunks_deleted"].as_u64().unwrap() > 0, "{p}");
    let freed = p["bytes_freed"].as_u64().unwrap();
    assert!(freed >= 4 << 20, "{p}");
    let after = usage(&u)["stored_bytes"].as_u64().unwrap();
    // (The forgotten snapshot's own record went with forget.)
    assert!(after <= before - freed, "{after} {before} {freed}");
    // Nothing more to free.
    let again: serde_json::Value = serde_json::from_str(u.ok(&["--json", "prune"]).trim()).unwrap();
    assert_eq!(again["chunks_deleted"], 0);
    let out = work.path().join("out");
    u.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_eq!(
        describe(&b),
        describe(&out.join(b.strip_prefix("/").unwrap()))
    );
    // A backup-only device may not prune (FORBIDDEN, exit 6).
    let code = u.ok(&["device", "add", "--capabilities", "backup"]);
    let code = code.trim();
    let d = User::new();
    d.ok(&["enrol", code, "-s", &srv.addr.to_string()]);
    let r = d.cli(&["prune"]);
    assert_exit(&r, 6);
    assert!(String::from_utf8_lossy(&r.stderr).contains("may not prune"));
    // With --json the error is the last line, with its reason and exit code; forget
    // names the capability it lacks (not the read it would have needed first).
    let r = d.cli(&["--json", "forget", "latest"]);
    assert_eq!(r.status.code(), Some(6));
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&r.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["reason"], "FORBIDDEN");
    assert_eq!(last["reason_code"], 300);
    assert_eq!(last["exit_code"], 6);
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("lacks the forget capability"),
        "{last}"
    );
    // So does a refusal that comes through a restore's or a listing's error.
    for args in [
        &[
            "--json",
            "restore",
            "latest",
            "--target",
            "/nonexistent-target",
        ][..],
        &["--json", "ls", "latest"][..],
    ] {
        let r = d.cli(args);
        let out = String::from_utf8_lossy(&r.stdout);
        let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(last["reason"], "FORBIDDEN", "{args:?}: {last}");
        assert_eq!(last["exit_code"], 6, "{args:?}: {last}");
    }
    // A path a snapshot does not hold, and a restore target that is a file: usage
    // errors (exit 2), with nothing written.
    let r = u.cli(&["ls", "latest", "no/such/path"]);
    assert_exit(&r, 2);
    let file = work.path().join("a-file");
    fs::write(&file, b"x").unwrap();
    let r = u.cli(&["restore", "latest", "--target", file.to_str().unwrap()]);
    assert_exit(&r, 2);
    assert_eq!(fs::read(&file).unwrap(), b"x");
    let under = file.join("x");
    let r = u.cli(&["restore", "latest", "--target", under.to_str().unwrap()]);
    assert_exit(&r, 2);
}

/// Temporary names a restore writes under, anywhere below `dir`.
fn temp_names(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if e.file_name().to_string_lossy().contains(".cyberbackup-") {
                found.push(p);
            }
        }
    }
    found
}

/// A restore of more files than one durable batch puts every file in place whole and
/// leaves no temporary name; one that meets a damaged chunk stops with exit code 8,
/// leaves no temporary name either, and every file it did put in place is whole.
#[test]
fn batched_restore_is_whole_or_absent() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start_in(Runtime::Mio, dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for i in 0..700u64 {
        let d = src.join(format!("d{}", i % 7));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join(format!("f{i}")),
            data(100 + (i as usize * 37) % 3000, i),
        )
        .unwrap();
    }
    fs::write(src.join("d3").join("m.bin"), data(2 << 20, 9)).unwrap();
    let u = User::new();
    u.init(&srv, &unique_name("land"));
    u.backup(&[&src], &[]);
    let rel = src.strip_prefix("/").unwrap();
    let whole = work.path().join("whole");
    u.ok(&["restore", "latest", "--target", whole.to_str().unwrap()]);
    assert_eq!(describe(&src), describe(&whole.join(rel)));
    assert_eq!(temp_names(&whole), Vec::<PathBuf>::new());
    // The 2 MiB file's chunks are in the largest blob or pack: damage one.
    srv.stop();
    let victim = blobs_and_packs(dir.path())
        .into_iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut b = fs::read(&victim).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x01;
    fs::write(&victim, &b).unwrap();
    let srv = Server::start_in(Runtime::Mio, dir.path(), &[]);
    let out = work.path().join("out");
    let r = u.cli(&[
        "restore",
        "latest",
        "-s",
        &srv.addr.to_string(),
        "--target",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        r.status.code(),
        Some(8),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(temp_names(&out), Vec::<PathBuf>::new());
    assert!(!out.join(rel).join("d3/m.bin").exists());
    let mut placed = 0;
    for (path, what) in describe(&out.join(rel)) {
        if what.starts_with("file") {
            placed += 1;
            assert_eq!(
                fs::read(out.join(rel).join(&path)).unwrap(),
                fs::read(src.join(&path)).unwrap(),
                "{path:?} is in place but not whole"
            );
        }
    }
    assert!(placed < 701, "{placed} files in place");
}

both_runtimes!(
    legacy_list_restore_and_import,
    prune_reclaims_space,
    profiles_drive_backup_and_forget,
    partial_stdin_stats_and_quota,
    devices_enrolment_revocation_and_recovery,
    excludes_dump_and_resumed_restore,
    forget_policy,
    diff_and_find,
    check_finds_removed_and_corrupted_chunks,
    collection_while_serving,
    tree_round_trip,
    versions_and_an_unchanged_backup,
    accounts_are_isolated,
    kill_during_backup_then_resume,
    kill_during_a_packed_backup_then_resume_and_collect,
    tampering_is_found_by_restore_and_scrub,
    wrong_passphrase_and_server_key,
);

/// With a real Argon2id cost, the key unlocks while the walk runs, so the files of an
/// unchanged backup are found before the parent snapshot is known: they are still
/// taken from it, changed ones are read, and the snapshot restores whole. A wrong
/// passphrase stops the backup with exit code 7, sending and committing nothing.
/// More files than may wait for the parent (4,096) are found before it is known.
#[test]
fn a_backup_walks_while_the_key_unlocks() {
    let srv = Server::start(Runtime::Mio, &[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    for i in 0..5000u64 {
        let d = src.join(format!("d{}", i % 50));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join(format!("f{i}")),
            // 50 contents: the server stores 50 chunks, not 5,000 files.
            data(50 + (i % 50) as usize * 13, i % 50),
        )
        .unwrap();
    }
    let u = User::new();
    // The default cost, not the tests' cheap one (the key is wrapped at init).
    let cli = |args: &[&str], pass: &str| {
        Command::new(client_binary())
            .env("CYBERBACKUP_CONFIG_DIR", u.cfg.path())
            .env("CYBERBACKUP_PASSWORD", pass)
            .env_remove("CYBERBACKUP_KDF")
            .env_remove("CYBERBACKUP_SERVER")
            .env_remove("CYBERBACKUP_PROTOCOL")
            .args(args)
            .output()
            .unwrap()
    };
    let out = cli(
        &[
            "init",
            "-s",
            &srv.addr.to_string(),
            "-a",
            &unique_name("kdf"),
        ],
        PASS,
    );
    assert_exit(&out, 0);
    let key = u.ok(&["--json", "key", "list"]);
    assert!(key.contains("\"memory_kib\":65536"), "{key}");
    let backup = |pass: &str| {
        let out = cli(&["--json", "backup", src.to_str().unwrap()], pass);
        let last = String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .to_string();
        (out, serde_json::from_str::<serde_json::Value>(&last).ok())
    };
    let (out, first) = backup(PASS);
    assert_exit(&out, 0);
    assert_eq!(first.unwrap()["files"], 5000);
    let (out, second) = backup(PASS);
    assert_exit(&out, 0);
    let second = second.unwrap();
    assert_eq!(second["files_unchanged"], 5000, "{second}");
    assert_eq!(second["chunks_sent"], 0, "{second}");
    fs::write(src.join("d3/f3"), b"changed while nobody looked").unwrap();
    let (out, third) = backup(PASS);
    assert_exit(&out, 0);
    let third = third.unwrap();
    assert_eq!(third["files_unchanged"], 4999, "{third}");
    // The changed file's chunk, and the manifest's.
    assert_eq!(third["chunks_sent"], 2, "{third}");
    // A wrong passphrase: exit 7, and no fourth snapshot.
    let (out, _) = backup("not the passphrase");
    assert_exit(&out, 7);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("passphrase"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = cli(&["--json", "snapshots"], PASS);
    assert_exit(&list, 0);
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);
    let back = work.path().join("back");
    assert_exit(
        &cli(
            &["restore", "latest", "--target", back.to_str().unwrap()],
            PASS,
        ),
        0,
    );
    assert_eq!(
        describe(&src),
        describe(&back.join(src.strip_prefix("/").unwrap()))
    );
}

/// A file of 32 MiB or more is cut by two readers when two are free, one from its
/// middle. Its chunks are the ones one reader cuts (so a backup with one reader sends
/// nothing new), and it restores whole: random bytes (the readers' cuts meet near the
/// middle), the same bytes one byte later, and zeros whose cuts, every 4 MiB from
/// either start, meet only at the end of the file.
#[test]
fn large_files_are_cut_by_two_readers_as_by_one() {
    use cyberbackup_client::v4::backup::{self, BackupOptions, BackupProgress};
    let srv = Server::start(Runtime::Mio, &[]);
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let random = data((72 << 20) + 12_345, 7);
    let mut shifted = vec![0xab];
    shifted.extend_from_slice(&random[..40 << 20]);
    fs::write(src.join("random.bin"), &random).unwrap();
    fs::write(src.join("shifted.bin"), &shifted).unwrap();
    fs::write(src.join("zeros.bin"), vec![0u8; 50 << 20]).unwrap();
    fs::write(src.join("small.bin"), data(3 << 20, 9)).unwrap();
    let u = User::new();
    u.init(&srv, &unique_name("split"));
    let (conn, key) = v4::open(&u.profile(), PASS.as_bytes(), None).unwrap();
    let run = |workers: usize| {
        let opts = BackupOptions {
            workers,
            force: true,
            ..BackupOptions::default()
        };
        backup::backup(
            &conn,
            &key,
            std::slice::from_ref(&src),
            &opts,
            &BackupProgress::default(),
        )
        .unwrap()
    };
    let two = run(2);
    assert_eq!(two.files, 4);
    assert!(two.skipped.is_empty(), "{:?}", two.skipped);
    assert_eq!(
        two.size,
        (72 << 20) + 12_345 + (40 << 20) + 1 + (50 << 20) + (3 << 20)
    );
    let t = snapshots::load(&conn, &key, &two.snapshot).unwrap();
    let mut files = 0;
    for e in &t.entries {
        if let EntryKind::File { chunks } = &e.kind {
            let name = String::from_utf8_lossy(&e.path).into_owned();
            let name = name.rsplit('/').next().unwrap();
            let one = backup::file_chunk_ids(&key, &src.join(name)).unwrap();
            assert_eq!(chunks, &one, "{name}: the chunks one reader cuts");
            files += 1;
        }
    }
    assert_eq!(files, 4);
    let one = run(1);
    assert_eq!(one.chunks_sent, 0, "one reader cut the same chunks");
    drop(conn);
    let out = work.path().join("out");
    let id: String = two.snapshot.iter().map(|b| format!("{b:02x}")).collect();
    u.ok(&["restore", &id, "--target", out.to_str().unwrap()]);
    let back = out.join(src.strip_prefix("/").unwrap());
    for name in ["random.bin", "shifted.bin", "zeros.bin", "small.bin"] {
        let (a, b) = (
            fs::read(src.join(name)).unwrap(),
            fs::read(back.join(name)).unwrap(),
        );
        assert!(a == b, "{name} restores whole");
    }
}

/// A file that holds more than its size says (as `/proc/kallsyms` does: size 0, some
/// MiB of text) is read whole: the read buffer, sized to the file, grows when no chunk
/// fits in it, and the snapshot holds every byte, cut as one reader cuts.
#[test]
fn a_file_longer_than_its_size_is_read_whole() {
    use cyberbackup_client::v4::backup::{self, BackupOptions, BackupProgress};
    let path = PathBuf::from("/proc/kallsyms");
    let content = fs::read(&path).expect("/proc/kallsyms is readable (Linux, as on CI)");
    assert_eq!(fs::metadata(&path).unwrap().len(), 0);
    assert!(content.len() > 1 << 20, "{} bytes", content.len());
    let srv = Server::start(Runtime::Mio, &[]);
    let u = User::new();
    u.init(&srv, &unique_name("grows"));
    let (conn, key) = v4::open(&u.profile(), PASS.as_bytes(), None).unwrap();
    let s = backup::backup(
        &conn,
        &key,
        std::slice::from_ref(&path),
        &BackupOptions::default(),
        &BackupProgress::default(),
    )
    .unwrap();
    assert_eq!(s.size, content.len() as u64);
    let t = snapshots::load(&conn, &key, &s.snapshot).unwrap();
    let chunks: Vec<_> = t
        .entries
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::File { chunks } => Some(chunks.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(chunks, vec![backup::file_chunk_ids(&key, &path).unwrap()]);
    assert!(chunks[0].len() >= 2, "{} chunks", chunks[0].len());
}
