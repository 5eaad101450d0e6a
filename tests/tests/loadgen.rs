//! The load generator against the real server (both runtimes), a server that answers
//! with wrong checksums, and a server that stops mid-run; and its refusal of
//! impossible options.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use cyberbackup_e2e::*;
use serde_json::Value;

fn loadgen(args: &[&str]) -> Output {
    Command::new(binary("cyberbackup-loadgen", "cyberbackup-loadgen"))
        .args(args)
        .output()
        .expect("run the load generator")
}

fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "the report is not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn ordered(p: &Value) {
    let keys = ["p50", "p90", "p99", "p999", "p9999", "max"];
    let v: Vec<u64> = keys.iter().map(|k| p[k].as_u64().unwrap()).collect();
    assert!(
        v.windows(2).all(|w| w[0] <= w[1]),
        "percentiles out of order: {p}"
    );
    assert!(v[0] > 0, "latencies were recorded: {p}");
}

fn closed_loop_report_holds_together(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let addr = srv.addr.to_string();
    let out = loadgen(&[
        "-s",
        &addr,
        "-c",
        "4",
        "--size",
        "64KiB",
        "-d",
        "2",
        "--warmup",
        "0.5",
        "--json",
        "--congestion",
        "reno",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out);
    let files = r["files"].as_u64().unwrap();
    assert!(files > 10, "{r}");
    assert_eq!(r["bytes"].as_u64().unwrap(), files * 65536);
    assert_eq!(r["error_count"], 0);
    assert_eq!(r["checksum_mismatches"], 0);
    assert_eq!(r["file_latency_us"]["count"].as_u64().unwrap(), files);
    ordered(&r["file_latency_us"]);
    let rate = r["files_per_sec"].as_f64().unwrap();
    assert!(
        (rate - files as f64 / 2.0).abs() < 1e-6 * rate.max(1.0),
        "{r}"
    );
    // the timeline covers the warm-up and the window; its measured part adds up
    let timeline = r["timeline"].as_array().unwrap();
    assert!(
        timeline.iter().any(|s| s["t"].as_i64().unwrap() < 0),
        "warm-up seconds are in the timeline"
    );
    let in_window: u64 = timeline
        .iter()
        .filter(|s| s["t"].as_i64().unwrap() >= 0)
        .map(|s| s["files"].as_u64().unwrap())
        .sum();
    assert!(in_window >= files, "{in_window} < {files}");
    assert!(r["generator_cpu_user_s"].as_f64().unwrap() >= 0.0);
    assert_eq!(r["congestion"], "reno");
    // the server really stored them
    assert!(srv.log().contains("file stored"));
}

fn a_light_constant_rate_is_held_within_5_percent(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let addr = srv.addr.to_string();
    let out = loadgen(&[
        "-s", &addr, "-c", "4", "--size", "4KiB", "--rate", "100", "-d", "3", "--warmup", "0.5",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out);
    let rate = r["files_per_sec"].as_f64().unwrap();
    assert!(
        (95.0..=105.0).contains(&rate),
        "held {rate} files/s for a target of 100: {r}"
    );
    ordered(&r["file_latency_us"]);
    ordered(&r["file_latency_uncorrected_us"]);
    assert!(
        r["file_latency_us"]["p50"].as_u64().unwrap()
            >= r["file_latency_uncorrected_us"]["p50"].as_u64().unwrap(),
        "latency from the due time is never shorter: {r}"
    );
}

fn handshake_mode_counts_reconnects(rt: Runtime) {
    let srv = Server::start(rt, &[]);
    let addr = srv.addr.to_string();
    let out = loadgen(&[
        "-s",
        &addr,
        "-c",
        "2",
        "--mode",
        "handshake",
        "-n",
        "200",
        "--warmup",
        "0",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out);
    assert!(r["handshakes"].as_u64().unwrap() >= 200, "{r}");
    assert_eq!(r["error_count"], 0);
    ordered(&r["handshake_latency_us"]);
}

fn a_server_that_stops_is_counted_as_errors_not_a_hang(rt: Runtime) {
    let mut srv = Server::start(rt, &[]);
    let addr = srv.addr.to_string();
    let child = Command::new(binary("cyberbackup-loadgen", "cyberbackup-loadgen"))
        .args([
            "-s",
            &addr,
            "-c",
            "4",
            "--size",
            "256KiB",
            "-d",
            "4",
            "--warmup",
            "0",
            "--timeout",
            "5",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    srv.kill();
    let t0 = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(20), "the generator hung");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out);
    assert!(r["files"].as_u64().unwrap() > 0, "{r}");
    assert!(r["error_count"].as_u64().unwrap() > 0, "{r}");
    let kinds = r["errors"].as_object().unwrap();
    assert!(
        kinds.contains_key("connect") || kinds.contains_key("connection lost"),
        "errors by kind: {r}"
    );
}

both_runtimes!(
    closed_loop_report_holds_together,
    a_light_constant_rate_is_held_within_5_percent,
    handshake_mode_counts_reconnects,
    a_server_that_stops_is_counted_as_errors_not_a_hang,
    v4_modes_move_what_they_say,
);

#[test]
fn wrong_checksums_are_counted_as_mismatches() {
    let fake = WrongChecksumServer::start();
    let addr = fake.addr.to_string();
    let out = loadgen(&[
        "-s", &addr, "-c", "2", "--size", "4KiB", "-n", "20", "--warmup", "0", "--json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a mismatch is an error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out);
    assert!(r["checksum_mismatches"].as_u64().unwrap() >= 20, "{r}");
    assert_eq!(r["files"], 0, "{r}");
    // every mismatch was answered with CRC_ABORT
    let codes = fake.codes.lock().unwrap().concat();
    assert!(codes.iter().filter(|&&c| c == 1031).count() >= 20);
    assert!(!codes.contains(&1029), "no CRC_OK for a wrong checksum");
}

#[test]
fn impossible_options_are_refused_before_any_load() {
    for (args, msg) in [
        (&["--rate", "0"][..], "--rate"),
        (&["--size", "16MiB..4KiB"], "reversed"),
        (&["--connections", "0"], "--connections"),
        (&["--connections", "2000000", "--size", "16"], "open files"),
        (&["--packet-size", "100"], "--packet-size"),
        (&["--congestion", "no-such-algorithm"], "--congestion"),
    ] {
        let out = loadgen(&[&["-s", "127.0.0.1:1"][..], args].concat());
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(!err.contains("setting up"), "no load started: {err}");
    }
}

/// Against an address nobody serves, the generator fails (exit 2) and says why,
/// instead of reporting a run of no files and no errors.
#[test]
fn a_dead_server_is_an_error_not_an_empty_success() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let out = loadgen(&[
        "-s",
        &addr,
        "-c",
        "3",
        "-d",
        "1s",
        "--warmup",
        "0ms",
        "--timeout",
        "2s",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("none of the 3 clients could set up"), "{err}");
    assert!(err.contains("connect"), "{err}");
}

/// The users a run leaves are named in its report, with the command that removes them;
/// that command refuses while the server runs and removes them (rows and files) once
/// it is stopped.
#[test]
fn the_users_a_run_leaves_are_named_and_removable() {
    let mut srv = Server::start(Runtime::Mio, &[]);
    let prefix = unique_name("lgclean");
    let out = loadgen(&[
        "-s",
        &srv.addr.to_string(),
        "-c",
        "2",
        "--size",
        "4KiB",
        "-d",
        "1s",
        "--warmup",
        "0ms",
        "--user-prefix",
        &prefix,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = report(&out);
    let left = r["left_on_server"].as_str().unwrap();
    let cmd = format!("remove-v3-clients --name-prefix {prefix}-");
    assert!(left.contains(&cmd), "{left}");
    assert!(left.starts_with("2 v3 users"), "{left}");
    let client_dirs = |srv: &Server| {
        std::fs::read_dir(srv.storage())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'))
            .count()
    };
    assert_eq!(client_dirs(&srv), 2);
    let args: Vec<&str> = cmd.split(' ').collect();
    let busy = srv.admin_cmd(&args);
    assert_eq!(busy.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stopped"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    assert!(srv.stop().success());
    let dry = srv.admin_cmd(&[&args[..], &["--dry-run"]].concat());
    assert!(String::from_utf8_lossy(&dry.stdout).contains("would remove 2 v3 clients"));
    assert_eq!(client_dirs(&srv), 2, "a dry run removes nothing");
    let done = srv.admin_cmd(&args);
    let text = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success() && text.contains("removed 2 v3 clients"),
        "{text}"
    );
    assert_eq!(client_dirs(&srv), 0);
    let again = srv.admin_cmd(&args);
    assert!(String::from_utf8_lossy(&again.stdout).contains("removed 0 v3 clients"));
}

/// The v4 modes against the real server: snapshots of new content are ingested,
/// snapshots of the same content are deduplicated (the server's metrics say which),
/// handshakes are counted, and each client's snapshots are forgotten at the end.
fn v4_modes_move_what_they_say(rt: Runtime) {
    let mut srv = Server::start(rt, &[]);
    let addr = srv.addr.to_string();
    let scrape = || srv.http_get("/metrics").unwrap().1;
    let run = |extra: &[&str]| {
        let out = loadgen(
            &[
                &[
                    "-s", &addr, "-c", "2", "-d", "1s", "--warmup", "0ms", "--json",
                ][..],
                extra,
            ]
            .concat(),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        report(&out)
    };
    let m0 = scrape();
    let prefix = unique_name("lgv4");
    let r = run(&[
        "--mode",
        "v4-backup",
        "--size",
        "256KiB",
        "--files-per-snapshot",
        "2",
        "--user-prefix",
        &prefix,
    ]);
    let snapshots = r["files"].as_u64().unwrap();
    assert!(snapshots > 0, "{r}");
    let remove = format!("remove-accounts --name-prefix {prefix}-");
    assert!(
        r["left_on_server"].as_str().unwrap().contains(&remove),
        "{r}"
    );
    assert_eq!(
        r["bytes"].as_u64().unwrap(),
        snapshots * 2 * 256 * 1024,
        "{r}"
    );
    let m1 = scrape();
    let grew = |a: &str, b: &str, name: &str| metric(b, name) - metric(a, name);
    assert!(grew(&m0, &m1, "cyberbackup_snapshots_committed_total") >= snapshots as f64);
    assert!(
        grew(&m0, &m1, "cyberbackup_ingested_bytes_total{protocol=\"4\"}")
            >= (snapshots * 2 * 256 * 1024) as f64
    );
    // The same content again and again: deduplicated, not ingested twice.
    let r = run(&["--mode", "v4-backup", "--size", "256KiB", "--dedup"]);
    let again = r["files"].as_u64().unwrap();
    assert!(again > 1, "{r}");
    let m2 = scrape();
    assert!(grew(&m1, &m2, "cyberbackup_chunks_deduplicated_total") >= (again - 1) as f64);
    assert!(
        grew(&m1, &m2, "cyberbackup_ingested_bytes_total{protocol=\"4\"}")
            < (again * 256 * 1024) as f64 / 2.0,
        "dedup runs store little"
    );
    // Handshakes.
    let r = run(&["--mode", "v4-handshake"]);
    assert!(r["handshakes"].as_u64().unwrap() > 0, "{r}");
    assert!(r["left_on_server"]
        .as_str()
        .unwrap()
        .contains("v4 accounts"));
    // The first run's snapshots were forgotten when it ended.
    let accounts = String::from_utf8_lossy(&srv.admin_cmd(&["accounts"]).stdout).into_owned();
    let rows: Vec<&str> = accounts.lines().filter(|l| l.contains(&prefix)).collect();
    assert_eq!(rows.len(), 2, "{accounts}");
    for row in rows {
        assert_eq!(
            row.split_whitespace().nth(3),
            Some("0"),
            "no snapshots left: {row}"
        );
    }
    // What the report says removes them: refused while the server runs, listed by a
    // dry run, then gone with their blobs; the other runs' accounts stay.
    let args: Vec<&str> = remove.split(' ').collect();
    let busy = srv.admin_cmd(&args);
    assert_eq!(busy.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("stopped"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    assert!(srv.stop().success());
    let listed = |srv: &Server| {
        String::from_utf8_lossy(&srv.admin_cmd(&["accounts"]).stdout)
            .lines()
            .filter(|l| l.contains(&prefix))
            .count()
    };
    let dry = srv.admin_cmd(&[&args[..], &["--dry-run"]].concat());
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("would remove 2 v4 accounts"),
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    assert_eq!(listed(&srv), 2, "a dry run removes nothing");
    let all = String::from_utf8_lossy(&srv.admin_cmd(&["accounts"]).stdout)
        .lines()
        .count();
    let blob_dirs = || {
        std::fs::read_dir(srv.dir.join("repository/blobs"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().parse::<u64>().is_ok())
            .count()
    };
    let dirs = blob_dirs();
    let done = srv.admin_cmd(&args);
    let text = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success() && text.contains("removed 2 v4 accounts"),
        "{text}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(listed(&srv), 0);
    let left = String::from_utf8_lossy(&srv.admin_cmd(&["accounts"]).stdout)
        .lines()
        .count();
    assert_eq!(left, all - 2, "only the prefix's accounts go");
    assert_eq!(blob_dirs(), dirs - 2, "their blobs went with them");
    let short = srv.admin_cmd(&["remove-accounts", "--name-prefix", "lo"]);
    assert_eq!(short.status.code(), Some(2));
}
