//! Scale-out (issue 22), end to end: the real server with its registry in a real
//! PostgreSQL (`scripts/postgres-test.sh` starts one; CI sets
//! `CYBERBACKUP_TEST_POSTGRES`) and its blobs in a real three-node Garage cluster
//! (`scripts/garage-test.sh`; CI sets `CYBERBACKUP_TEST_S3`), driven by the real
//! `cyberbackup` CLI over 127.0.0.1.
//!
//! Each test works in a scratch schema and a bucket prefix of its own. Without a
//! database or an object store the tests that need it say so and pass, except under
//! CI, where they fail.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use cyberbackup_e2e::*;

const PASS: &str = "correct horse battery staple";

/// The test database's URL: `CYBERBACKUP_TEST_POSTGRES`, else one
/// `scripts/postgres-test.sh` starts (or finds running) where PostgreSQL is installed.
/// `None` when neither: the PostgreSQL tests then say so and pass, except under CI
/// (`CI` set), where they fail, so the suite never leaves them out unseen.
fn base_url() -> Option<String> {
    static URL: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let url = URL.get_or_init(|| {
        if let Ok(u) = std::env::var("CYBERBACKUP_TEST_POSTGRES") {
            if !u.is_empty() {
                return Some(u);
            }
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/postgres-test.sh");
        let out = std::process::Command::new("bash")
            .arg(script)
            .output()
            .ok()?;
        let url = String::from_utf8(out.stdout).ok()?.trim().to_owned();
        if !out.status.success() || url.is_empty() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(url)
    });
    match url {
        Some(u) => Some(u.clone()),
        None if std::env::var_os("CI").is_some() => {
            panic!("no PostgreSQL for the tests (CI runs them): set CYBERBACKUP_TEST_POSTGRES or install postgresql")
        }
        None => {
            eprintln!("no PostgreSQL here (CYBERBACKUP_TEST_POSTGRES unset, none installed): test not run");
            None
        }
    }
}

/// A scratch schema, dropped when the value is.
struct Schema {
    base: String,
    name: String,
}

impl Schema {
    fn new(base: String) -> Schema {
        let name = format!("e2e_{}", unique_name("s").replace('-', "_").to_lowercase());
        let mut c = postgres::Client::connect(&base, postgres::NoTls).expect("connect");
        c.batch_execute(&format!("CREATE SCHEMA {name}")).unwrap();
        Schema { base, name }
    }

    /// The URL a server is given: the database with this schema first on its path.
    fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-csearch_path%3D{}", self.base, self.name)
    }

    fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).expect("connect")
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&self.base, postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
        }
    }
}

/// The CLI with `cfg` as its config directory and the test's passphrase.
fn cyberbackup(cfg: &Path) -> Command {
    let mut cmd = Command::new(client_binary());
    cmd.env("CYBERBACKUP_CONFIG_DIR", cfg)
        .env("CYBERBACKUP_PASSWORD", PASS)
        .env("CYBERBACKUP_KDF", "test")
        .env_remove("CYBERBACKUP_SERVER")
        .env_remove("CYBERBACKUP_PROTOCOL");
    cmd
}

fn cli(cfg: &Path, args: &[&str]) -> Output {
    cyberbackup(cfg)
        .args(args)
        .output()
        .expect("run cyberbackup")
}

fn ok(cfg: &Path, args: &[&str]) -> String {
    let out = cli(cfg, args);
    assert!(
        out.status.success(),
        "cyberbackup {args:?} failed ({:?}):\n{}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A small tree: text, random bytes, an empty file, a nested directory.
fn make_tree(root: &Path) -> std::path::PathBuf {
    let t = root.join("tree");
    fs::create_dir_all(t.join("a/b")).unwrap();
    fs::write(t.join("notes.txt"), "postgres registry\n".repeat(5000)).unwrap();
    fs::write(t.join("a/random.bin"), data(3 << 20, 22)).unwrap();
    fs::write(t.join("a/b/empty"), b"").unwrap();
    fs::write(t.join("a/b/small"), data(777, 23)).unwrap();
    t
}

fn files(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                out.push((rel, fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// A backup through one server process with its registry in PostgreSQL; the process
/// stopped, another started on the same repository directory and database restores
/// it byte for byte. The registry's rows are in PostgreSQL, and no SQLite registry
/// was made.
#[test]
fn backup_and_restore_with_the_registry_in_postgresql() {
    let Some(base) = base_url() else { return };
    let schema = Schema::new(base);
    let url = schema.url();
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let tree = make_tree(work.path());

    let mut a = Server::start_in(Runtime::Mio, dir.path(), &["--registry", &url]);
    ok(
        cfg.path(),
        &["init", "-s", &a.addr.to_string(), "-a", "pg-user"],
    );
    let out = ok(cfg.path(), &["--json", "backup", tree.to_str().unwrap()]);
    assert!(out.contains("\"files\":4"), "{out}");
    assert!(a.log().contains("postgresql"), "{}", a.log());
    a.stop();

    assert!(!dir.path().join("repository/repo.db").exists());
    let mut c = schema.client();
    let row = c
        .query_one(
            "SELECT a.chunk_count, a.snapshot_count, (SELECT count(*) FROM chunks)
             FROM accounts a WHERE a.name = 'pg-user'",
            &[],
        )
        .unwrap();
    let (chunks, snaps, rows): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(snaps, 1);
    assert!(
        chunks >= 3 && chunks == rows,
        "{chunks} counted, {rows} rows"
    );

    let b = Server::start_in(Runtime::Glommio, dir.path(), &["--registry", &url]);
    let out_dir = work.path().join("restored");
    // The same server key (the repository's), so the pinned client goes on.
    ok(
        cfg.path(),
        &[
            "restore",
            "-s",
            &b.addr.to_string(),
            "latest",
            "--target",
            out_dir.to_str().unwrap(),
        ],
    );
    let restored = out_dir.join(tree.strip_prefix("/").unwrap());
    assert_eq!(files(&tree), files(&restored));
    let list = ok(cfg.path(), &["snapshots", "-s", &b.addr.to_string()]);
    assert!(
        list.contains("1 snapshot") && list.contains(" 4 "),
        "{list}"
    );
}

/// A registry URL that is not PostgreSQL's is refused at start with a message, and a
/// database that cannot be reached stops the server with one too (exit status 1),
/// never a panic.
#[test]
fn a_bad_registry_url_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    // A URL the server cannot take is a bad argument (2); one it cannot reach, a
    // failure (1).
    for (url, says, code) in [
        ("sqlite:///tmp/x.db", "--registry takes a PostgreSQL URL", 2),
        ("postgres://nobody@127.0.0.1:1/none", "PostgreSQL", 1),
    ] {
        let out = Command::new(server_binary())
            .current_dir(dir.path())
            .args(["--port", "0", "--admin-listen", "off", "--registry", url])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{url}: {err}");
        assert!(err.contains(says), "{url}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // An admin command that cannot reach the database says so too.
    let out = Command::new(server_binary())
        .current_dir(dir.path())
        .args(["--registry", "postgres://nobody@127.0.0.1:1/none"])
        .args(["remove-accounts", "--name-prefix", "abc"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("PostgreSQL"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A node whose registry URL asks for TLS (`sslmode=verify-full` with the test CA)
/// talks to PostgreSQL over TLS; and `remove-accounts` works on a running cluster: the
/// accounts named go, rows and blobs, while another account on the same node backs up
/// and restores as before.
#[test]
fn accounts_are_removed_from_a_running_cluster_reached_over_tls() {
    let (Some(base), Some(s3)) = (base_url(), s3_line()) else {
        return;
    };
    let schema = Schema::new(base);
    let mut c = schema.client();
    let cert: String = c.query_one("SHOW ssl_cert_file", &[]).unwrap().get(0);
    let ca = Path::new(&cert).with_file_name("ca.crt");
    let mut owned = cluster_args(&schema, &s3);
    assert_eq!(owned[0], "--registry");
    owned[1] = format!(
        "{}&sslmode=verify-full&sslrootcert={}",
        owned[1],
        ca.display()
    );
    let args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let (d, admin_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let work = tempfile::tempdir().unwrap();
    let (gone_cfg, kept_cfg) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let tree = make_tree(work.path());
    let node = Server::start_in(Runtime::Mio, d.path(), &args);
    let s = node.addr.to_string();
    let tls: i64 = c
        .query_one("SELECT count(*) FROM pg_stat_ssl WHERE ssl", &[])
        .unwrap()
        .get(0);
    assert!(tls >= 1, "the node's connections are TLS");
    ok(gone_cfg.path(), &["init", "-s", &s, "-a", "rm-alpha"]);
    ok(kept_cfg.path(), &["init", "-s", &s, "-a", "keep-beta"]);
    for cfg in [&gone_cfg, &kept_cfg] {
        ok(cfg.path(), &["backup", tree.to_str().unwrap()]);
    }
    let gone_id: i64 = c
        .query_one("SELECT id FROM accounts WHERE name = 'rm-alpha'", &[])
        .unwrap()
        .get(0);
    let admin = |extra: &[&str]| {
        let out = Command::new(server_binary())
            .current_dir(admin_dir.path())
            .args(&args)
            .args([
                "--admin-listen",
                "off",
                "remove-accounts",
                "--name-prefix",
                "rm-",
            ])
            .args(extra)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let dry = admin(&["--dry-run"]);
    assert!(dry.contains("would remove rm-alpha: 1 snapshots"), "{dry}");
    assert!(!dry.contains("keep-beta"), "{dry}");
    let done = admin(&[]);
    assert!(
        done.contains("removed 1 v4 accounts, 1 snapshots"),
        "{done}"
    );
    for table in ["chunks", "snapshots", "devices"] {
        let n: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE account = $1"),
                &[&gone_id],
            )
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "{table}");
    }
    // The removed account's device is refused; the other goes on, on the same node.
    let refused = cli(gone_cfg.path(), &["snapshots"]);
    assert_ne!(refused.status.code(), Some(0));
    fs::write(tree.join("after-removal"), data(1 << 20, 7)).unwrap();
    ok(kept_cfg.path(), &["backup", tree.to_str().unwrap()]);
    let out = work.path().join("restored");
    ok(
        kept_cfg.path(),
        &["restore", "latest", "--target", out.to_str().unwrap()],
    );
    assert_eq!(
        files(&out.join(tree.strip_prefix("/").unwrap())),
        files(&tree)
    );
    ok(kept_cfg.path(), &["check", "--read-data"]);
}

/// Nodes sharing a registry serve with one key: a node started without `server.key`
/// does not make one of its own, and a node with another key does not start; both say
/// what to do. (Clients pinned the first node's key and would refuse either.)
#[test]
fn a_node_without_the_clusters_key_does_not_serve() {
    let Some(base) = base_url() else { return };
    let schema = Schema::new(base);
    let url = schema.url();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Server::start_in(Runtime::Mio, da.path(), &["--registry", &url]);
    let start_b = || {
        Command::new(server_binary())
            .current_dir(db.path())
            .args(["--port", "0", "--admin-listen", "off", "--registry", &url])
            .output()
            .unwrap()
    };
    let out = start_b();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("server.key is missing"), "{err}");
    assert!(!db.path().join("repository/server.key").exists());
    // Another key: refused, naming both.
    fs::create_dir_all(db.path().join("repository")).unwrap();
    fs::write(db.path().join("repository/server.key"), "ab".repeat(32)).unwrap();
    let out = start_b();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the nodes sharing this registry serve with key SHA256:"),
        "{err}"
    );
    // The cluster's key: it serves.
    drop(second_node(
        Runtime::Mio,
        da.path(),
        db.path(),
        &["--registry", &url],
    ));
    drop(a);
}

/// `check-config` reaches the registry and the object store it is given, and says so;
/// one that does not answer is a problem (exit 1).
#[test]
fn check_config_reaches_the_registry_and_the_bucket() {
    let (Some(base), Some(s3)) = (base_url(), s3_line()) else {
        return;
    };
    let schema = Schema::new(base);
    let dir = tempfile::tempdir().unwrap();
    let check = |args: &[String]| {
        let out = Command::new(server_binary())
            .current_dir(dir.path())
            .args(["--port", "0", "--admin-listen", "off"])
            .args(args)
            .arg("check-config")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let good = cluster_args(&schema, &s3);
    let (code, text) = check(&good);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("v4 registry: PostgreSQL, up to 8 connections (answers, not encrypted"),
        "{text}"
    );
    assert!(text.contains("(the bucket answers)"), "{text}");
    let mut bad = good.clone();
    let i = bad.iter().position(|a| a == "--s3-bucket").unwrap();
    bad[i + 1] = "no-such-bucket-here".into();
    let (code, text) = check(&bad);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("problem: v4 blobs:"), "{text}");
    bad[1] = "postgres://nobody@127.0.0.1:1/none".into();
    let (code, text) = check(&bad);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("problem: v4 registry:"), "{text}");
}

/// The test object store, `ENDPOINT BUCKET REGION KEY_ID SECRET`: `CYBERBACKUP_TEST_S3`,
/// else what `scripts/garage-test.sh` starts (or finds running) where Garage is
/// installed; `None` when neither (a failure under CI).
fn s3_line() -> Option<Vec<String>> {
    static LINE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let line = LINE.get_or_init(|| {
        if let Ok(v) = std::env::var("CYBERBACKUP_TEST_S3") {
            if !v.is_empty() {
                return Some(v);
            }
        }
        let out = Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../scripts/garage-test.sh"
            ))
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
    });
    match line {
        Some(l) => Some(l.split_whitespace().map(String::from).collect()),
        None if std::env::var_os("CI").is_some() => {
            panic!("no S3 object store for the tests (CI runs them): set CYBERBACKUP_TEST_S3 or install garage")
        }
        None => {
            eprintln!(
                "no S3 object store here (CYBERBACKUP_TEST_S3 unset, no garage): test not run"
            );
            None
        }
    }
}

fn garage(args: &[&str]) {
    let st = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/garage-test.sh"
        ))
        .args(args)
        .status()
        .unwrap();
    assert!(st.success(), "garage-test.sh {args:?}");
}

/// Two nodes at once on one PostgreSQL and one three-node Garage cluster, sharing the
/// cluster's server key: a backup through node A restores byte for byte through node
/// B; B's backup of the same tree sends nothing (A's chunks are B's); with one of the
/// three Garage nodes stopped, backups and restores go on through either node. The
/// nodes' own directories hold no blob and no registry.
#[test]
fn two_nodes_share_postgresql_and_s3() {
    let (Some(base), Some(s3)) = (base_url(), s3_line()) else {
        return;
    };
    let schema = Schema::new(base);
    let owned = cluster_args(&schema, &s3);
    let args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let work = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let tree = make_tree(work.path());

    let a = Server::start_in(Runtime::Mio, da.path(), &args);
    let b = second_node(Runtime::Glommio, da.path(), db.path(), &args);
    assert!(b.log().contains("s3"), "{}", b.log());
    let (sa, sb) = (a.addr.to_string(), b.addr.to_string());

    ok(cfg.path(), &["init", "-s", &sa, "-a", "two-nodes"]);
    ok(cfg.path(), &["backup", "-s", &sa, tree.to_str().unwrap()]);
    let restored = |server: &str, name: &str| {
        let out = work.path().join(name);
        ok(
            cfg.path(),
            &[
                "restore",
                "-s",
                server,
                "latest",
                "--target",
                out.to_str().unwrap(),
            ],
        );
        files(&out.join(tree.strip_prefix("/").unwrap()))
    };
    assert_eq!(restored(&sb, "via-b"), files(&tree));
    let again = ok(
        cfg.path(),
        &["--json", "backup", "-s", &sb, tree.to_str().unwrap()],
    );
    assert!(again.contains("\"bytes_sent\":0"), "{again}");

    // One of the three object-store nodes down: writes and reads go on (quorum 2).
    garage(&["stop-node", "2"]);
    let more = tree.join("added-while-a-node-is-down");
    fs::write(&more, data(2 << 20, 99)).unwrap();
    let r = std::panic::catch_unwind(|| {
        ok(cfg.path(), &["backup", "-s", &sb, tree.to_str().unwrap()]);
        assert_eq!(restored(&sa, "via-a"), files(&tree));
    });
    garage(&["start-node", "2"]);
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
    let list = ok(cfg.path(), &["snapshots", "-s", &sa]);
    assert!(list.contains("3 snapshots"), "{list}");
    for d in [da.path(), db.path()] {
        assert!(!d.join("repository/blobs").exists());
        assert!(!d.join("repository/repo.db").exists());
    }
}

/// Collection on node A (every second, a 2 s grace period) while node B ingests: B backs
/// a changing tree up five times and forgets all but the newest snapshot each time,
/// so A keeps finding garbage to delete while B's rounds write. Nothing a snapshot
/// names is lost: the last one restores byte for byte through A and a full `check
/// --read-data` finds every chunk, and the rows left are the chunks it names.
#[test]
fn collection_on_one_node_while_another_ingests_loses_nothing() {
    let (Some(base), Some(s3)) = (base_url(), s3_line()) else {
        return;
    };
    let schema = Schema::new(base);
    let owned = cluster_args(&schema, &s3);
    let common: Vec<&str> = owned.iter().map(String::as_str).collect();
    let mut collecting = common.clone();
    // A grace period of 2 s covers a backup in flight here (under a second), and
    // lets the forgotten rounds' chunks go within seconds.
    collecting.extend(["--gc-interval", "1", "--gc-grace", "2"]);
    let mut ingesting = common.clone();
    ingesting.extend(["--gc-interval", "0"]);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let work = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let tree = make_tree(work.path());
    let a = Server::start_in(Runtime::Mio, da.path(), &collecting);
    let b = second_node(Runtime::Mio, da.path(), db.path(), &ingesting);
    let (sa, sb) = (a.addr.to_string(), b.addr.to_string());
    ok(cfg.path(), &["init", "-s", &sb, "-a", "collected"]);
    for round in 0..5u64 {
        let _ = fs::remove_file(tree.join(format!("round-{}", round.wrapping_sub(1))));
        fs::write(
            tree.join(format!("round-{round}")),
            data(4 << 20, 1000 + round),
        )
        .unwrap();
        ok(cfg.path(), &["backup", "-s", &sb, tree.to_str().unwrap()]);
        ok(cfg.path(), &["forget", "-s", &sb, "--keep-last", "1"]);
    }
    // A collected meanwhile (its log says so), then once more now.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let out = work.path().join("restored");
    ok(
        cfg.path(),
        &[
            "restore",
            "-s",
            &sa,
            "latest",
            "--target",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(
        files(&out.join(tree.strip_prefix("/").unwrap())),
        files(&tree)
    );
    ok(cfg.path(), &["check", "-s", &sa, "--read-data"]);
    // A collects every second: within a few, the only rows left are the chunks the
    // kept snapshot names (the four forgotten rounds' files are gone).
    let mut c = schema.client();
    let named = || -> (usize, i64, i64) {
        let mut c = schema.client();
        let r = c.query_one("SELECT chunk_ids FROM snapshots", &[]).unwrap();
        let ids: &[u8] = r.get(0);
        let distinct: std::collections::HashSet<&[u8]> = ids.chunks(32).collect();
        let rows: i64 = c
            .query_one("SELECT count(*) FROM chunks", &[])
            .unwrap()
            .get(0);
        let snaps: i64 = c
            .query_one("SELECT count(*) FROM snapshots", &[])
            .unwrap()
            .get(0);
        (distinct.len(), rows, snaps)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (mut n, mut rows, mut snaps) = named();
    while rows as usize != n && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(300));
        (n, rows, snaps) = named();
    }
    assert_eq!(
        (rows as usize, snaps),
        (n, 1),
        "rows left against chunks named"
    );
    let collected: i64 = c
        .query_one(
            "SELECT count(*) FROM accounts WHERE chunk_count = $1",
            &[&rows],
        )
        .unwrap()
        .get(0);
    assert_eq!(collected, 1, "the usage counter follows the rows");
    assert!(
        a.log().contains("collect") || a.log().contains("gc"),
        "{}",
        a.log()
    );
}

/// A client given both nodes' addresses: node A is killed with -9 in the middle of a
/// backup; the client goes on with node B and the snapshot completes there, without
/// sending again what A acknowledged (those chunks' rows are in the shared registry),
/// and restores byte for byte through B.
#[test]
fn a_node_killed_mid_backup_and_the_client_goes_on_with_the_next() {
    let (Some(base), Some(s3)) = (base_url(), s3_line()) else {
        return;
    };
    let schema = Schema::new(base);
    let owned = cluster_args(&schema, &s3);
    let args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let work = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let total: u64 = 8 * (8 << 20);
    for i in 0..8u64 {
        fs::write(src.join(format!("f{i}.bin")), data(8 << 20, 500 + i)).unwrap();
    }
    let mut a = Server::start_in(Runtime::Mio, da.path(), &args);
    let b = second_node(Runtime::Glommio, da.path(), db.path(), &args);
    let both = format!("{},{}", a.addr, b.addr);
    ok(cfg.path(), &["init", "-s", &both, "-a", "failover"]);

    let child = Command::new(client_binary())
        .env("CYBERBACKUP_CONFIG_DIR", cfg.path())
        .env("CYBERBACKUP_PASSWORD", PASS)
        .env("CYBERBACKUP_KDF", "test")
        .args(["--json", "backup", src.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill A once some chunks are recorded (so acknowledged), well before the end.
    let mut c = schema.client();
    let t0 = std::time::Instant::now();
    let recorded = loop {
        let n: i64 = c
            .query_one("SELECT count(*) FROM chunks", &[])
            .unwrap()
            .get(0);
        if n >= 8 {
            break n;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "no chunks stored"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    a.kill();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stderr.contains("going on with the next server"), "{stderr}");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("backup --json");
    assert_eq!(summary["files"], 8, "{summary}");
    // What A acknowledged was not sent again: B's run sent less than the whole.
    let sent = summary["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < total,
        "{sent} bytes sent to B of {total}; {recorded} chunks were acknowledged by A"
    );
    let restored = work.path().join("restored");
    ok(
        cfg.path(),
        &[
            "restore",
            "-s",
            &b.addr.to_string(),
            "latest",
            "--target",
            restored.to_str().unwrap(),
        ],
    );
    assert_eq!(
        files(&restored.join(src.strip_prefix("/").unwrap())),
        files(&src)
    );
}

/// The cluster's round lock (`ROUND_LOCK` in server/src/repo/pg.rs): every commit
/// round of every node takes it shared, a collection exclusively.
const ROUND_LOCK: i64 = 0x6379_6272_726f_756e;

/// A backup told "held" for chunks no snapshot names, which a collection then deletes
/// before the backup's commit (a backup that ran longer than the grace period, a
/// collection on another node): the server refuses the commit (MISSING_CHUNKS), and the
/// client runs the backup again, which asks again, sends the chunks and commits; the
/// snapshot restores byte for byte and `check --read-data` finds every chunk.
///
/// Deterministic: the test holds the round lock exclusively, as a collection does, so
/// the backup's commit waits (its HAS_CHUNKS answers do not); once every chunk row was
/// touched by those answers, it deletes the rows as a collection would, and lets the
/// commit go.
#[test]
fn a_backup_whose_held_chunks_are_collected_before_its_commit_sends_them_again() {
    let Some(base) = base_url() else { return };
    let schema = Schema::new(base);
    let url = schema.url();
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cfg = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("x.bin"), data(6 << 20, 4242)).unwrap();
    let src_arg = src.to_str().unwrap();

    let a = Server::start_in(
        Runtime::Mio,
        dir.path(),
        &["--registry", &url, "--gc-interval", "0"],
    );
    let addr = a.addr.to_string();
    ok(
        cfg.path(),
        &["init", "-s", &addr, "-a", "collected-meanwhile"],
    );
    // X's chunks (and the manifest's) stored, then named by no snapshot.
    ok(cfg.path(), &["backup", src_arg]);
    ok(cfg.path(), &["forget", "latest"]);
    let mut c = schema.client();
    let count = |c: &mut postgres::Client, since: i64| -> (i64, i64) {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE touched_ms >= $1), count(*) FROM chunks",
                &[&since],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let (_, rows) = count(&mut c, 0);
    assert!(rows >= 3, "{rows} chunk rows after the first backup");

    // Every commit round on the node waits from now on.
    c.execute("SELECT pg_advisory_lock($1)", &[&ROUND_LOCK])
        .unwrap();
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut child = cyberbackup(cfg.path())
        .env_remove("RUST_LOG")
        .args(["--json", "backup", src_arg])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The backup asks about every chunk (none is sent: all are held), and its commit
    // waits for the lock.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (touched, all) = count(&mut c, since);
        if touched == rows && all == rows {
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{touched} of {all} chunk rows touched by the backup's HAS_CHUNKS, {rows} wanted:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A collection deletes them (rows and usage counters; the blobs may stay).
    let deleted = c
        .execute(
            "WITH d AS (DELETE FROM chunks RETURNING account, stored_len)
             UPDATE accounts a SET chunk_count = a.chunk_count - s.n,
                 stored_bytes = a.stored_bytes - s.b
             FROM (SELECT account, count(*) AS n, sum(stored_len)::bigint AS b
                   FROM d GROUP BY account) s
             WHERE a.id = s.account",
            &[],
        )
        .unwrap();
    assert_eq!(deleted, 1, "one account's usage");
    assert_eq!(count(&mut c, 0).1, 0);
    c.execute("SELECT pg_advisory_unlock($1)", &[&ROUND_LOCK])
        .unwrap();

    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("no longer holds") && stderr.contains("reading the files again"),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).expect("backup --json");
    assert_eq!(summary["files"], 1, "{summary}");
    // Every chunk deleted was sent again (the run again asked, and was told "not
    // held"), and its row is back.
    assert_eq!(summary["chunks_sent"].as_i64(), Some(rows), "{summary}");
    assert_eq!(count(&mut c, 0).1, rows);

    let restored = work.path().join("restored");
    ok(
        cfg.path(),
        &["restore", "latest", "--target", restored.to_str().unwrap()],
    );
    assert_eq!(
        files(&restored.join(src.strip_prefix("/").unwrap())),
        files(&src)
    );
    ok(cfg.path(), &["check", "--read-data"]);
    let list = ok(cfg.path(), &["snapshots"]);
    assert!(list.contains("1 snapshot"), "{list}");
}

/// A node's flags for `schema`'s registry and the test object store `s3`, under a
/// bucket prefix of the schema's own.
fn cluster_args(schema: &Schema, s3: &[String]) -> Vec<String> {
    let mut args = vec!["--registry".to_string(), schema.url()];
    for (flag, v) in [
        "--s3-endpoint",
        "--s3-bucket",
        "--s3-region",
        "--s3-access-key-id",
    ]
    .iter()
    .zip(s3)
    {
        args.extend([flag.to_string(), v.clone()]);
    }
    args.extend([
        "--s3-secret-access-key".into(),
        s3[4].clone(),
        "--s3-prefix".into(),
        format!("{}/", schema.name),
    ]);
    args
}

/// Starts a second node in `db` with the first's (in `da`) server key: the cluster's
/// one key, which a client pinned on either trusts on both.
fn second_node(rt: Runtime, da: &Path, db: &Path, args: &[&str]) -> Server {
    fs::create_dir_all(db.join("repository")).unwrap();
    fs::copy(
        da.join("repository/server.key"),
        db.join("repository/server.key"),
    )
    .unwrap();
    Server::start_in(rt, db, args)
}
