//! The operator's side of the real server binary: the metrics and probes of the admin
//! HTTP listener (checked by `promtool`), the admin commands against a running server
//! and a stopped one, and the lifecycle on signals.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cyberbackup_e2e::*;

const PASS: &str = "operator test passphrase";

/// Runs the v4 CLI with the config directory `cfg`.
fn cli(cfg: &Path, args: &[&str]) -> Output {
    Command::new(client_binary())
        .env("CYBERBACKUP_CONFIG_DIR", cfg)
        .env("CYBERBACKUP_PASSWORD", PASS)
        .env("CYBERBACKUP_KDF", "test")
        .env_remove("CYBERBACKUP_SERVER")
        .args(args)
        .output()
        .expect("run cyberbackup")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}:\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Under `work`: an account of `srv` (config dir `cfg`) named `prefix`-unique, and a
/// first backup of `src/a.bin` (`bytes` of `seed`'s data). Returns (cfg, account).
fn account_with_backup(
    srv: &Server,
    work: &Path,
    prefix: &str,
    bytes: usize,
    seed: u64,
) -> (std::path::PathBuf, String) {
    let cfg = work.join("cfg");
    let src = work.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.bin"), data(bytes, seed)).unwrap();
    let account = unique_name(prefix);
    ok(cli(
        &cfg,
        &["init", "-s", &srv.addr.to_string(), "-a", &account],
    ));
    ok(cli(&cfg, &["backup", src.to_str().unwrap()]));
    (cfg, account)
}

fn scrape(srv: &Server) -> String {
    let (status, body) = srv.http_get("/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

/// `promtool check metrics` on a scrape: Prometheus' own linter.
fn promtool(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; .ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scrape during a v4 backup and a v3 upload shows the bytes and items moving, the
/// commit histograms filled, and passes promtool; a bad request is counted by reason.
fn metrics_follow_uploads_and_pass_promtool(rt: Runtime) {
    let srv = Server::start(rt, &["--metrics-per-account", "true"]);
    let before = scrape(&srv);
    promtool(&before);
    assert_eq!(metric(&before, "cyberbackup_draining"), 0.0);

    // v4: a backup of 3 MiB of random data.
    let work = tempfile::tempdir().unwrap();
    let (cfg, account) = account_with_backup(&srv, work.path(), "metrics", 3 << 20, 1);
    // A name with a quote and a backslash is the user's choice: the scrape stays valid.
    let odd = format!("ev\"il\\{}", unique_name("x"));
    ok(cli(
        &work.path().join("odd"),
        &["init", "-s", &srv.addr.to_string(), "-a", &odd],
    ));
    // v3: one file; a scrape in the middle of it already shows its bytes.
    let mut c = Conn::login(srv.addr, &unique_name("m3"));
    let f = data(300_000, 2);
    let ps = c.packets("f.bin", &f, 65536);
    c.send(&ps[0]).unwrap();
    c.send(&ps[1]).unwrap();
    let mid_v3 = |m: &str| metric(m, "cyberbackup_received_bytes_total{protocol=\"3\"}");
    assert!(wait_until(Duration::from_secs(10), || {
        mid_v3(&scrape(&srv)) - mid_v3(&before) >= 2.0 * 65536.0
    }));
    let during = scrape(&srv);
    assert!(
        metric(&during, "cyberbackup_connections_open") >= 1.0,
        "{during}"
    );
    for p in &ps[2..] {
        c.send(p).unwrap();
    }
    assert!(matches!(
        c.recv().unwrap(),
        cyberbackup_protocol::v3::message::Response::FileReceived(_)
    ));
    assert_eq!(
        c.request_name(
            cyberbackup_protocol::v3::header::RequestCode::CrcOk,
            "f.bin"
        ),
        cyberbackup_protocol::v3::message::Response::Ack { client_id: c.id }
    );
    drop(c);
    // v4: a restore serves the chunks back.
    let out = work.path().join("out");
    ok(cli(
        &cfg,
        &["restore", "latest", "--target", out.to_str().unwrap()],
    ));

    let after = scrape(&srv);
    promtool(&after);
    let grew = |name: &str| metric(&after, name) - metric(&before, name);
    assert!(
        grew("cyberbackup_received_bytes_total{protocol=\"4\"}") >= (3 << 20) as f64,
        "{after}"
    );
    assert!(grew("cyberbackup_received_bytes_total{protocol=\"3\"}") >= 300_000.0);
    assert!(grew("cyberbackup_ingested_bytes_total{protocol=\"4\"}") >= (3 << 20) as f64);
    assert_eq!(
        grew("cyberbackup_ingested_bytes_total{protocol=\"3\"}"),
        300_000.0
    );
    assert!(grew("cyberbackup_served_bytes_total{protocol=\"4\"}") >= (3 << 20) as f64);
    assert!(grew("cyberbackup_sent_bytes_total{protocol=\"4\"}") >= (3 << 20) as f64);
    assert!(grew("cyberbackup_chunks_ingested_total") >= 1.0);
    assert!(grew("cyberbackup_chunks_served_total") >= 1.0);
    assert_eq!(grew("cyberbackup_files_ingested_total"), 1.0);
    assert!(grew("cyberbackup_snapshots_committed_total") >= 1.0);
    assert!(grew("cyberbackup_handshakes_total{protocol=\"4\",result=\"ok\"}") >= 2.0);
    assert_eq!(
        grew("cyberbackup_handshakes_total{protocol=\"3\",result=\"ok\"}"),
        1.0
    );
    assert!(grew("cyberbackup_connections_accepted_total") >= 3.0);
    assert!(grew("cyberbackup_commit_duration_seconds_count{protocol=\"4\"}") >= 1.0);
    assert!(grew("cyberbackup_commit_duration_seconds_count{protocol=\"3\"}") >= 1.0);
    assert!(grew("cyberbackup_commit_size_bytes_sum{protocol=\"4\"}") >= (3 << 20) as f64);
    assert!(metric(&after, "cyberbackup_accounts") >= 1.0);
    assert!(
        metric(
            &after,
            "cyberbackup_volume_free_bytes{volume=\"repository\"}"
        ) > 0.0
    );
    let label = format!("cyberbackup_account_stored_bytes{{account=\"{account}\"}}");
    assert!(
        metric(&after, &label) >= (3 << 20) as f64,
        "{label} in\n{after}"
    );

    // A v4 peer that sends garbage after the preamble fails its handshake: counted.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        let mut junk = cyberbackup_protocol::v4::wire::MAGIC.to_vec();
        junk.push(cyberbackup_protocol::v4::wire::VERSION);
        junk.extend_from_slice(&[0xff; 64]);
        s.write_all(&junk).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.read(&mut [0u8; 64]);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = scrape(&srv);
        if metric(
            &now,
            "cyberbackup_handshakes_total{protocol=\"4\",result=\"failed\"}",
        ) >= 1.0
        {
            assert!(
                now.lines()
                    .any(|l| l.starts_with("cyberbackup_errors_total{protocol=\"4\"")),
                "{now}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed handshake counted:\n{now}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The listener is read-only, and says what it serves.
    assert_eq!(srv.http_get("/nothing").unwrap().0, 404);
}

/// /healthz and /readyz answer 200; while the server drains (an upload in flight after
/// SIGTERM) /readyz answers 503 naming the drain and /healthz still 200; the server
/// then exits 0.
fn readyz_turns_false_while_draining(rt: Runtime) {
    let mut srv = Server::start(rt, &["--shutdown-grace", "4"]);
    assert_eq!(srv.http_get("/healthz").unwrap(), (200, "ok\n".into()));
    assert_eq!(srv.http_get("/readyz").unwrap(), (200, "ready\n".into()));
    let mut c = Conn::login(srv.addr, &unique_name("drain"));
    let ps = c.packets("slow.bin", &data(2 << 20, 3), 1 << 20);
    c.send(&ps[0]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || srv.temp_files() == 1));
    srv.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(3);
    let (status, body) = loop {
        let r = srv.http_get("/readyz").unwrap();
        if r.0 != 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    assert_eq!(srv.http_get("/healthz").unwrap().0, 200);
    assert_eq!(metric(&scrape(&srv), "cyberbackup_draining"), 1.0);
    let st = srv
        .wait(Duration::from_secs(30))
        .expect("exits after the grace");
    assert!(st.success(), "{st:?}");
    assert_eq!(srv.temp_files(), 0);
    assert!(!srv.storage().join(".incoming/RUNNING").exists());
}

/// Every admin command against a running server (through its admin socket), then the
/// same data with the server stopped.
fn admin_commands_against_a_running_server(rt: Runtime) {
    let mut srv = Server::start(rt, &[]);
    let work = tempfile::tempdir().unwrap();
    let (laptop, nas) = (work.path().join("laptop"), work.path().join("nas"));
    let src = work.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("a.txt"), b"hello operator").unwrap();
    let account = unique_name("ops");
    let addr = srv.addr.to_string();
    ok(cli(&laptop, &["init", "-s", &addr, "-a", &account]));
    ok(cli(&laptop, &["backup", src.to_str().unwrap()]));

    let status = ok(srv.admin_cmd(&["status"]));
    assert!(status.contains("running: pid"), "{status}");
    assert!(status.contains(&addr), "the bound address: {status}");

    let accounts = ok(srv.admin_cmd(&["accounts"]));
    let row = accounts
        .lines()
        .find(|l| l.contains(&account))
        .unwrap_or_else(|| panic!("{accounts}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[2], "1", "one device: {row}");
    assert_eq!(cols[3], "1", "one snapshot: {row}");
    assert!(!row.contains("never"), "a last backup: {row}");

    // A second device through an enrolment code issued by the operator.
    let code = ok(srv.admin_cmd(&["enrol-code", "--account", &account]));
    ok(cli(&nas, &["enrol", "-s", &addr, code.trim()]));
    let devices = ok(srv.admin_cmd(&["devices", "--account", &account]));
    assert_eq!(devices.lines().count(), 3, "{devices}");
    let nas_id = devices
        .lines()
        .nth(2)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    let revoked = ok(srv.admin_cmd(&["revoke", "--account", &account, "--device", nas_id]));
    assert!(revoked.contains("revoked"), "{revoked}");
    let refused = cli(&nas, &["snapshots"]);
    assert_eq!(
        refused.status.code(),
        Some(6),
        "a revoked device is refused"
    );

    // Quota, with its errors.
    let q = ok(srv.admin_cmd(&["quota", "--account", &account, "--bytes", "10M"]));
    assert!(q.contains("10485760"), "{q}");
    assert!(ok(srv.admin_cmd(&["accounts"])).contains("10.0 MiB"));
    let bad = srv.admin_cmd(&["quota", "--account", &account, "--bytes", "lots"]);
    assert_eq!(bad.status.code(), Some(2));
    let nobody = srv.admin_cmd(&["quota", "--account", "nobody-here", "--bytes", "1G"]);
    assert_eq!(nobody.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("no account named"));

    // Collection and scrub run inside the server, beside it serving.
    let gc = ok(srv.admin_cmd(&["gc", "--grace-hours", "0"]));
    assert!(gc.starts_with("gc: "), "{gc}");
    let scrub = ok(srv.admin_cmd(&["scrub"]));
    assert!(scrub.contains("0 damaged, 0 missing"), "{scrub}");
    let m = scrape(&srv);
    assert!(metric(&m, "cyberbackup_maintenance_runs_total{kind=\"scrub\"}") >= 1.0);

    // The key a client pinned is the one `key` shows.
    let key = ok(srv.admin_cmd(&["key"]));
    let pins = std::fs::read_to_string(laptop.join("known_servers")).unwrap();
    let pinned = pins.split_whitespace().nth(1).unwrap();
    let public: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&pinned[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let expected = cyberbackup_protocol::v4::noise::fingerprint(&public.try_into().unwrap());
    assert_eq!(key.trim(), expected, "the pinned key {pinned}");
    let check = ok(srv.admin_cmd(&["check-config"]));
    assert!(check.contains("configuration OK"), "{check}");

    // Stopped: status says so (exit 3); the rest works on the data.
    assert!(srv.stop().success());
    assert_eq!(srv.admin_cmd(&["status"]).status.code(), Some(3));
    assert!(ok(srv.admin_cmd(&["accounts"])).contains(&account));
    let scrub = ok(srv.admin_cmd(&["scrub"]));
    assert!(scrub.contains("0 damaged"), "{scrub}");
}

both_runtimes!(
    metrics_follow_uploads_and_pass_promtool,
    readyz_turns_false_while_draining,
    admin_commands_against_a_running_server,
    restart_on_the_same_port_right_after_a_drain,
    a_trickling_new_connection_is_closed_after_the_header_timeout
);

/// SIGINT in the middle of an upload: what was acknowledged stays, the upload in flight
/// is dropped when the grace ends, and no temp file nor run marker is left. Two signals
/// at once (Ctrl-C reaching a script and its server) still drain; a second signal
/// after the first's grace forces an exit (130).
#[test]
fn sigint_mid_upload_drains_and_a_late_second_signal_forces() {
    let mut srv = Server::start(Runtime::Mio, &["--shutdown-grace", "2"]);
    let mut c = Conn::login(srv.addr, &unique_name("int"));
    let kept = data(200_000, 5);
    c.upload("kept.bin", &kept, 65536, Order::InOrder);
    let ps = c.packets("cut.bin", &data(3 << 20, 6), 1 << 20);
    c.send(&ps[0]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || srv.temp_files() == 1));
    srv.signal("INT");
    std::thread::sleep(Duration::from_millis(50));
    srv.signal("INT");
    let st = srv
        .wait(Duration::from_secs(30))
        .expect("exits after the grace");
    assert_eq!(st.code(), Some(0), "a doubled signal still drains");
    assert_eq!(srv.temp_files(), 0, "no temp file left");
    assert!(
        !srv.storage().join(".incoming/RUNNING").exists(),
        "no marker"
    );
    assert_eq!(
        std::fs::read(srv.client_dir(&c.id).join("kept.bin")).unwrap(),
        kept
    );
    assert!(!srv.client_dir(&c.id).join("cut.bin").exists());
    assert!(!srv.log().contains("did not end cleanly"));

    // Restarted on the same data: no recovery, the file still there.
    let dir = srv.dir.clone();
    let mut again = Server::start_in(Runtime::Mio, &dir, &["--shutdown-grace", "30"]);
    assert!(
        !again.log().contains("did not end cleanly"),
        "{}",
        again.log()
    );
    let mut c2 = Conn::login(again.addr, &unique_name("force"));
    let ps = c2.packets("stuck.bin", &data(3 << 20, 7), 1 << 20);
    c2.send(&ps[0]).unwrap();
    assert!(wait_until(Duration::from_secs(10), || again.temp_files() == 1));
    again.signal("INT");
    std::thread::sleep(Duration::from_millis(2500));
    again.signal("INT");
    let st = again.wait(Duration::from_secs(10)).expect("forced out");
    assert_eq!(st.code(), Some(130), "{st:?}");
    // What was acknowledged before survives a forced exit too.
    assert_eq!(
        std::fs::read(again.client_dir(&c.id).join("kept.bin")).unwrap(),
        kept
    );
}

/// JSON logs: every line of a v4 connection carries its connection id, and every line
/// from its login on (its ops' lines included) the account.
#[test]
fn log_lines_carry_the_connection_and_the_account() {
    let srv = Server::start(Runtime::Glommio, &["--log-format", "json"]);
    let work = tempfile::tempdir().unwrap();
    let (_, account) = account_with_backup(&srv, work.path(), "logs", 1 << 20, 9);
    let log = srv.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let mine: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["span"]["account"] == account.as_str())
        .collect();
    assert!(
        mine.iter().any(|v| v["message"] == "disconnected"),
        "the connection's last line has the account:\n{log}"
    );
    for v in &mine {
        assert_eq!(v["span"]["name"], "conn", "{v}");
        assert!(v["span"]["conn"].is_u64(), "{v}");
    }
    // Lines logged by the ops (on other threads) of that connection have it too.
    assert!(
        mine.iter()
            .any(|v| v["message"] != "disconnected" && v["message"] != "logged in"),
        "{log}"
    );
}

/// A server restarted on its port right after a drain starts at once: the drained
/// connections' TIME_WAIT is not taken for another server on the port.
fn restart_on_the_same_port_right_after_a_drain(rt: Runtime) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start_in(rt, dir.path(), &["--port", &port]);
    let mut c = Conn::login(srv.addr, &unique_name("tw"));
    c.upload("a.bin", &data(1000, 1), 65536, Order::InOrder);
    assert!(srv.stop().success());
    // The server closed the idle connection first: its side is in TIME_WAIT now.
    assert!(c.is_closed_by_server());
    drop(srv);
    let again = Server::start_in(rt, dir.path(), &["--port", &port]);
    assert_eq!(again.addr.port().to_string(), port);
}

/// A connection that sends a byte and stops is closed after the header timeout, not
/// held for the idle timeout.
fn a_trickling_new_connection_is_closed_after_the_header_timeout(rt: Runtime) {
    let srv = Server::start(rt, &["--header-timeout", "1", "--idle-timeout", "300"]);
    let t0 = Instant::now();
    let mut c = Conn::connect(srv.addr);
    c.send(&[0]).unwrap();
    assert!(wait_until(Duration::from_secs(15), || c.is_closed_by_server()));
    assert!(t0.elapsed() < Duration::from_secs(15));
}
