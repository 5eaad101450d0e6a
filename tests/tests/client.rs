//! End to end with the real `cyberbackup` CLI binary and the real server: registration
//! then reconnection, several files, empty and 1 GiB files (with the client's peak RSS),
//! bad input, a server that is down or dies mid-upload, and the checksum retry sequence
//! on the wire against a server that always answers with a wrong checksum.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cyberbackup_e2e::*;

fn cli(dir: &Path) -> Command {
    let mut c = Command::new(client_binary());
    // These tests are of the v3 uploader.
    c.current_dir(dir)
        .env("CYBERBACKUP_PROTOCOL", "3")
        .env_remove("CYBERBACKUP_SERVER")
        .env_remove("CYBERBACKUP_USER");
    c
}

fn backup(dir: &Path, server: &str, args: &[&str]) -> std::process::Output {
    cli(dir)
        .args(["backup", "--server", server])
        .args(args)
        .output()
        .expect("run cyberbackup")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn first_run_registers_second_reconnects_with_several_files(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let server = srv.addr.to_string();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let a = data(300_000, 1);
    let b = data(17, 2);
    std::fs::write(w.join("a.bin"), &a).unwrap();
    std::fs::write(w.join("b.bin"), &b).unwrap();
    std::fs::write(w.join("empty"), b"").unwrap();
    let user = unique_name("cli");

    let out = backup(w, &server, &["--user", &user, "a.bin", "b.bin", "empty"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("registered as"));
    let me = std::fs::read_to_string(w.join("me.info")).unwrap();
    let lines: Vec<&str> = me.lines().collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0], user);
    assert_eq!(lines[1].len(), 32);
    assert!(lines[1]
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    let id = cyberbackup_protocol::common::parse_client_id_hex(lines[1]).unwrap();
    for (name, bytes) in [("a.bin", &a[..]), ("b.bin", &b[..]), ("empty", &[][..])] {
        assert_eq!(
            std::fs::read(srv.client_dir(&id).join(name)).unwrap(),
            bytes,
            "{name}"
        );
    }
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "stored a.bin: 300000 bytes, cksum {}",
            cyberbackup_protocol::v3::cksum(&a)
        )),
        "{stdout}"
    );

    // second run: reconnects with me.info (no --user), the identity stays the same
    std::fs::write(w.join("c.txt"), b"second run").unwrap();
    let out = backup(w, &server, &["--json", "c.txt"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(w.join("me.info")).unwrap(), me);
    assert!(!text(&out.stderr).contains("registered as"));
    let last: serde_json::Value = text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .rfind(|v: &serde_json::Value| v["event"] == "stored")
        .expect("a stored event");
    assert_eq!(last["file"], "c.txt");
    assert_eq!(
        last["cksum"],
        cyberbackup_protocol::v3::cksum(b"second run")
    );
    assert_eq!(
        std::fs::read(srv.client_dir(&id).join("c.txt")).unwrap(),
        b"second run"
    );
    assert!(srv.log().contains("reconnect=true"));
}

fn a_1_gib_file_in_constant_memory(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("big.bin");
    {
        let block = data(1 << 20, 42);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for i in 0..1024u32 {
            let mut b = block.clone();
            b[..4].copy_from_slice(&i.to_le_bytes());
            f.write_all(&b).unwrap();
        }
        f.flush().unwrap();
    }
    let mut cmd = cli(work.path());
    cmd.args([
        "backup",
        "--server",
        &srv.addr.to_string(),
        "--user",
        &unique_name("big"),
        "big.bin",
    ]);
    let (out, peak_kib) = run_measuring_rss(&mut cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    eprintln!(
        "client peak RSS for 1 GiB: {} KiB; {}",
        peak_kib,
        text(&out.stdout).trim()
    );
    assert!(peak_kib > 0, "RSS was sampled");
    assert!(
        peak_kib < 64 * 1024,
        "peak RSS {peak_kib} KiB is over 64 MiB"
    );
    let me = std::fs::read_to_string(work.path().join("me.info")).unwrap();
    let id = cyberbackup_protocol::common::parse_client_id_hex(me.lines().nth(1).unwrap()).unwrap();
    let stored = srv.client_dir(&id).join("big.bin");
    assert_eq!(system_cksum(&stored), system_cksum(&path));
}

#[test]
fn bad_input_is_refused_before_connecting() {
    // nothing listens on this port: bad input must be reported first (exit 3, not 5)
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(w.join("ok.txt"), b"x").unwrap();
    let long = "n".repeat(251);
    std::fs::write(w.join(&long), b"x").unwrap();
    for args in [
        vec!["--user", "u", "missing.txt"],
        vec!["--user", "u", "."],
        vec!["--user", "u", long.as_str()],
        vec!["--user", "u", "ok.txt", "/dev/null"],
    ] {
        let out = backup(w, "127.0.0.1:1", &args);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).starts_with("cyberbackup: "),
            "a clear message"
        );
    }
    // corrupt me.info: exit 4 with the reason
    std::fs::write(w.join("me.info"), "someone\nnot-hex\nAAAA\n").unwrap();
    let out = backup(w, "127.0.0.1:1", &["ok.txt"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("me.info"));
    assert!(text(&out.stderr).contains("line 2"));
    // no identity and no user: usage error
    std::fs::remove_file(w.join("me.info")).unwrap();
    let out = backup(w, "127.0.0.1:1", &["ok.txt"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--user"));
}

#[test]
fn server_down_or_speaking_something_else() {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("f"), b"x").unwrap();
    // down: a port nobody listens on
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = backup(
        work.path(),
        &format!("127.0.0.1:{port}"),
        &["--user", "u", "f"],
    );
    assert_eq!(out.status.code(), Some(5));
    assert!(
        text(&out.stderr).contains("cannot reach the server"),
        "{}",
        text(&out.stderr)
    );
    // something else: an HTTP-ish server
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut b = [0u8; 300];
            let _ = s.read(&mut b);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let out = backup(
        work.path(),
        &addr.to_string(),
        &["--user", "u", "f", "--timeout", "5"],
    );
    assert_eq!(out.status.code(), Some(6), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("does not speak CyberBackup v3"),
        "{}",
        text(&out.stderr)
    );
    t.join().unwrap();
}

fn the_server_killed_mid_upload_gives_a_clear_error_and_stores_nothing(rt: Runtime) {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start_in(rt, dir.path(), &[]);
    let work = tempfile::tempdir().unwrap();
    let path = work.path().join("victim.bin");
    {
        let block = data(1 << 20, 3);
        let mut f = std::fs::File::create(&path).unwrap();
        for _ in 0..1024 {
            f.write_all(&block).unwrap();
        }
    }
    let child = cli(work.path())
        .args([
            "backup",
            "--server",
            &srv.addr.to_string(),
            "--user",
            &unique_name("kill"),
            "victim.bin",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // kill -9 as soon as the upload is under way
    let t0 = std::time::Instant::now();
    while srv.temp_files() == 0 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(2));
    }
    srv.kill();
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "the upload cannot have succeeded: {err}"
    );
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains("connection to the server was lost")
            || err.contains("cannot reach the server"),
        "{err}"
    );
    assert!(
        err.contains("WARN") && err.contains("reconnecting"),
        "the reconnect attempts are logged: {err}"
    );
    // after a restart nothing of it is visible and no temp is left
    let srv = Server::start_in(rt, dir.path(), &[]);
    assert_eq!(srv.temp_files(), 0);
    let me = std::fs::read_to_string(work.path().join("me.info")).unwrap();
    let id = cyberbackup_protocol::common::parse_client_id_hex(me.lines().nth(1).unwrap()).unwrap();
    assert!(!srv.client_dir(&id).join("victim.bin").exists());
}

fn an_interrupted_registration_is_finished_by_the_next_run(rt: Runtime) {
    // The connection drops between REGISTER_OK and the key exchange: the id is known
    // (saved right after 1600), the server has no key for it yet.
    let srv = Server::start(rt, &[]);
    let user = unique_name("interrupted");
    let mut c = Conn::connect(srv.addr);
    let cyberbackup_protocol::v3::message::Response::RegisterOk { client_id } = c.register(&user)
    else {
        panic!("register")
    };
    drop(c);
    let work = tempfile::tempdir().unwrap();
    let identity = cyberbackup_client::Identity {
        name: user.clone(),
        id: client_id,
        keypair: keypair().clone(),
    };
    identity.save(&work.path().join("me.info")).unwrap();
    let before = std::fs::read_to_string(work.path().join("me.info")).unwrap();
    std::fs::write(work.path().join("f.txt"), b"finally").unwrap();
    let out = backup(work.path(), &srv.addr.to_string(), &["f.txt"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("registered as"),
        "no new registration"
    );
    assert_eq!(
        std::fs::read_to_string(work.path().join("me.info")).unwrap(),
        before
    );
    assert_eq!(
        std::fs::read(srv.client_dir(&client_id).join("f.txt")).unwrap(),
        b"finally"
    );
}

fn batch_mode_reads_transfer_info(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(w.join("doc.txt"), b"batch mode").unwrap();
    let user = unique_name("batch");
    std::fs::write(
        w.join("transfer.info"),
        format!("{}\n{user}\ndoc.txt\n", srv.addr),
    )
    .unwrap();
    let out = cli(w).arg("--batch").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let me = std::fs::read_to_string(w.join("me.info")).unwrap();
    let id = cyberbackup_protocol::common::parse_client_id_hex(me.lines().nth(1).unwrap()).unwrap();
    assert_eq!(
        std::fs::read(srv.client_dir(&id).join("doc.txt")).unwrap(),
        b"batch mode"
    );
}

#[test]
fn a_wrong_checksum_is_retried_three_times_then_aborted() {
    let server = WrongChecksumServer::start();
    let addr = server.addr;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("f.bin"), data(40_000, 9)).unwrap();
    let out = backup(
        work.path(),
        &addr.to_string(),
        &["--user", "u", "--packet-size", "16384", "f.bin"],
    );
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("checksum mismatch"),
        "{}",
        text(&out.stderr)
    );
    let codes = server.wait_for_connection_end(0);
    // 40000 bytes -> 40016 bytes of ciphertext -> 3 packets of 16 KiB
    let file = [1028u16, 1028, 1028];
    let mut expect = vec![1025u16, 1026];
    for i in 0..4 {
        expect.extend_from_slice(&file);
        expect.push(if i < 3 { 1030 } else { 1031 });
    }
    assert_eq!(codes, expect);
}

both_runtimes!(
    an_interrupted_registration_is_finished_by_the_next_run,
    first_run_registers_second_reconnects_with_several_files,
    a_1_gib_file_in_constant_memory,
    the_server_killed_mid_upload_gives_a_clear_error_and_stores_nothing,
    batch_mode_reads_transfer_info,
);
