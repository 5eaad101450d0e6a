//! The bridge's API against the real bridge and the real server processes: a device
//! set up and unlocked through it; a folder backed up from "the browser" file by file
//! and committed as one snapshot; browsing, downloading a file and a folder (tar),
//! restoring to a path, diff and forget; an interrupted upload resumed without
//! sending the server what it holds; devices; errors as JSON; and the refusals that
//! keep the bridge safe (token, Host, Origin, CSP).

use std::io::{Read, Write};
use std::time::Duration;

use cyberbackup_e2e::*;
use serde_json::{json, Value};

/// An HTTP agent signed in with the test bridges' token.
// ureq's middleware signature has ureq's (large) error type.
#[allow(clippy::result_large_err)]
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .middleware(|req: ureq::Request, next: ureq::MiddlewareNext| {
            next.handle(req.set("Authorization", &format!("Bearer {BRIDGE_TOKEN}")))
        })
        .build()
}

/// An agent with no credentials.
fn anonymous() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .redirects(0)
        .build()
}

/// (status, JSON body) of a response or an error status.
fn call(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let body: Value = resp.into_json().unwrap_or(Value::Null);
    (status, body)
}

fn get(url: &str) -> (u16, Value) {
    call(agent().get(url).call())
}

fn post(url: &str, body: Value) -> (u16, Value) {
    call(agent().post(url).send_json(body))
}

fn ok(r: (u16, Value)) -> Value {
    assert!((200..300).contains(&r.0), "{} {}", r.0, r.1);
    r.1
}

fn bytes(url: &str) -> Vec<u8> {
    let r = agent().get(url).call().unwrap();
    let mut v = Vec::new();
    r.into_reader().read_to_end(&mut v).unwrap();
    v
}

const PASS: &str = "a long enough passphrase";

/// A bridge whose device has an account on `srv`, unlocked.
fn set_up(data: &std::path::Path, srv: &Server) -> Bridge {
    let b = Bridge::start(data, &srv.addr.to_string());
    let st = ok(get(&format!("{}/api/status", b.url)));
    assert_eq!(st["setup"], false);
    assert_eq!(st["default_server"], srv.addr.to_string());
    ok(post(
        &format!("{}/api/setup", b.url),
        json!({"server": srv.addr.to_string(), "account": unique_name("web"), "passphrase": PASS}),
    ));
    b
}

/// Announces `files` (path, bytes), sends each, commits; returns the snapshot id.
fn backup(url: &str, label: &str, tag: &str, files: &[(&str, Vec<u8>)]) -> String {
    let list: Vec<Value> = files
        .iter()
        .map(|(p, b)| json!({"path": p, "size": b.len(), "mtime_ms": 1_700_000_000_000i64}))
        .collect();
    let (st, v) = post(
        &format!("{url}/api/backups"),
        json!({"label": label, "tag": tag, "files": list}),
    );
    assert_eq!(st, 201, "{v}");
    let id = v["backup"]["id"].as_str().unwrap().to_owned();
    // The bridge may have sorted nothing: files keep the announced order.
    for (i, (p, b)) in files.iter().enumerate() {
        assert_eq!(v["backup"]["files"][i]["path"], *p);
        ok(call(
            agent()
                .put(&format!("{url}/api/backups/{id}/files/{i}"))
                .send_bytes(b),
        ));
    }
    let c = ok(post(&format!("{url}/api/backups/{id}/commit"), json!({})));
    assert_eq!(c["backup"]["state"], "done");
    c["backup"]["snapshot"].as_str().unwrap().to_owned()
}

fn tar_members(archive: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut ar = tar::Archive::new(archive);
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        let mut b = Vec::new();
        e.read_to_end(&mut b).unwrap();
        out.push((name, b));
    }
    out
}

#[test]
fn a_folder_from_the_browser_is_one_snapshot_to_browse_download_diff_and_restore() {
    let srv = Server::start(Runtime::Glommio, &[]);
    let data = tempfile::tempdir().unwrap();
    let b = set_up(data.path(), &srv);
    let url = &b.url;
    let big = cyberbackup_e2e::data(3 << 20, 5);
    let xss = "<img src=x onerror=alert(1)>.txt";
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("Photos/2024/beach.jpg", big.clone()),
        ("Photos/2024/empty.txt", Vec::new()),
        ("Photos/notes – été.txt", "déjà vu\n".as_bytes().to_vec()),
        (
            "Photos/<img src=x onerror=alert(1)>.txt",
            b"not html".to_vec(),
        ),
    ];
    let first = backup(url, "Photos", "pictures", &files);
    let st = ok(get(&format!("{url}/api/status")));
    assert_eq!(st["unlocked"], true);
    assert!(st["server_key"].as_str().unwrap().starts_with("SHA256:"));
    assert_eq!(st["last_backup"]["id"], first.as_str());
    assert_eq!(st["last_backup"]["files"], 4);
    assert_eq!(st["last_backup"]["tags"], json!(["pictures"]));
    assert_eq!(st["snapshots_size"], big.len() + 8 + "déjà vu\n".len());
    assert!(st["usage"]["stored_bytes"].as_u64().unwrap() > 0);

    // Browse: the top, then a nested directory.
    let top = ok(get(&format!("{url}/api/snapshots/{first}/tree")));
    assert_eq!(top["entries"][0]["name"], "Photos");
    assert_eq!(top["entries"][0]["type"], "dir");
    let d = ok(get(&format!(
        "{url}/api/snapshots/{}/tree?path=Photos/2024",
        &first[..8]
    )));
    let names: Vec<&str> = d["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["beach.jpg", "empty.txt"]);
    let (st, v) = get(&format!("{url}/api/snapshots/{first}/tree?path=Nope"));
    assert_eq!((st, v["code"].as_str()), (404, Some("no_path")));

    // Download one file, byte for byte, with its name; and the folder as a tar.
    let r = agent()
        .get(&format!(
            "{url}/api/snapshots/{first}/file?path=Photos/2024/beach.jpg"
        ))
        .call()
        .unwrap();
    assert!(r
        .header("Content-Disposition")
        .unwrap()
        .contains("beach.jpg"));
    let mut got = Vec::new();
    r.into_reader().read_to_end(&mut got).unwrap();
    assert_eq!(got, big);
    let enc = "Photos/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E.txt";
    assert_eq!(
        bytes(&format!("{url}/api/snapshots/{first}/file?path={enc}")),
        b"not html"
    );
    let members = tar_members(&bytes(&format!(
        "{url}/api/snapshots/{first}/archive?path=Photos"
    )));
    let find = |n: &str| members.iter().find(|(m, _)| m.trim_end_matches('/') == n);
    assert_eq!(find("Photos/2024/beach.jpg").unwrap().1, big);
    assert_eq!(
        find("Photos/notes – été.txt").unwrap().1,
        "déjà vu\n".as_bytes()
    );
    assert_eq!(find(&format!("Photos/{xss}")).unwrap().1, b"not html");
    assert!(find("Photos/2024").is_some());
    let whole = tar_members(&bytes(&format!("{url}/api/snapshots/{first}/archive")));
    let top = format!("snapshot-{}/", &first[..8]);
    assert_eq!(
        whole.len(),
        members.len(),
        "the whole snapshot is the folder here"
    );
    assert!(whole.iter().all(|(n, _)| n.starts_with(&top)), "{top}");
    let beach = format!("{top}Photos/2024/beach.jpg");
    assert_eq!(whole.iter().find(|(n, _)| *n == beach).unwrap().1, big);

    // A second backup with a change; the diff says what changed.
    let mut changed = files.clone();
    changed[1].1 = b"now with text".to_vec();
    changed.push(("Photos/new.txt", b"new".to_vec()));
    changed.remove(3);
    let second = backup(url, "Photos", "pictures", &changed);
    let diff = ok(get(&format!("{url}/api/diff?a={first}&b={second}")));
    let kinds: Vec<(String, String)> = diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_owned(),
                c["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("Photos/2024/empty.txt".into(), "modified".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("Photos/new.txt".into(), "added".into())),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&(format!("Photos/{xss}"), "removed".into())),
        "{kinds:?}"
    );
    let snaps = ok(get(&format!("{url}/api/snapshots")));
    assert_eq!(snaps["snapshots"][0]["id"], second.as_str(), "newest first");

    // Restore a folder of the first snapshot to a path; a second time resumes; an
    // existing different file is refused (409) unless overwrite.
    let out = tempfile::tempdir().unwrap();
    let target = out.path().join("r");
    let r = ok(post(
        &format!("{url}/api/snapshots/{first}/restore"),
        json!({"path": "Photos/2024", "target": target}),
    ));
    assert_eq!(r["files"], 2);
    assert_eq!(
        std::fs::read(target.join("Photos/2024/beach.jpg")).unwrap(),
        big
    );
    let r = ok(post(
        &format!("{url}/api/snapshots/{first}/restore"),
        json!({"path": "Photos/2024", "target": target}),
    ));
    assert_eq!(r["already_restored"], 2);
    std::fs::write(target.join("Photos/2024/empty.txt"), b"mine").unwrap();
    let (st, v) = post(
        &format!("{url}/api/snapshots/{first}/restore"),
        json!({"path": "Photos/2024", "target": target}),
    );
    assert_eq!((st, v["code"].as_str()), (409, Some("exists")), "{v}");
    let (st, v) = post(
        &format!("{url}/api/snapshots/{first}/restore"),
        json!({"target": "relative/dir"}),
    );
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_target")));

    // Forget: the dry run changes nothing; keep_last 1 then forgets the first.
    let (st, v) = post(&format!("{url}/api/forget"), json!({}));
    assert_eq!((st, v["code"].as_str()), (400, Some("empty_policy")));
    let plan = ok(post(&format!("{url}/api/forget"), json!({"keep_last": 1})));
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["plan"][0]["keep"], true);
    assert_eq!(plan["plan"][0]["reasons"], json!(["last 1"]));
    assert_eq!(plan["plan"][1]["keep"], false);
    assert_eq!(
        ok(get(&format!("{url}/api/snapshots")))["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let done = ok(post(
        &format!("{url}/api/forget"),
        json!({"keep_last": 1, "dry_run": false}),
    ));
    assert_eq!(done["forgotten"], 1);
    let left = ok(get(&format!("{url}/api/snapshots")));
    assert_eq!(left["snapshots"].as_array().unwrap().len(), 1);
    assert_eq!(left["snapshots"][0]["id"], second.as_str());

    // Lock: reading needs the passphrase again; a wrong one is told as such.
    ok(post(&format!("{url}/api/lock"), json!({})));
    let (st, v) = get(&format!("{url}/api/snapshots/{second}/tree"));
    assert_eq!((st, v["code"].as_str()), (401, Some("locked")));
    let (st, v) = post(
        &format!("{url}/api/unlock"),
        json!({"passphrase": "wrong one"}),
    );
    assert_eq!((st, v["code"].as_str()), (401, Some("wrong_passphrase")));
    ok(post(
        &format!("{url}/api/unlock"),
        json!({"passphrase": PASS}),
    ));
    ok(get(&format!("{url}/api/snapshots/{second}/tree")));

    // Devices: this one, a code for a new one, which can then be revoked.
    let devs = ok(get(&format!("{url}/api/devices")));
    assert_eq!(devs["devices"][0]["this"], true);
    assert_eq!(
        devs["devices"][0]["capabilities"],
        json!(["backup", "read", "forget", "admin"])
    );
    let code = ok(post(
        &format!("{url}/api/devices"),
        json!({"capabilities": "backup", "name": "nas"}),
    ));
    assert!(code["code"].as_str().unwrap().len() >= 20);
    let (st, v) = post(
        &format!("{url}/api/devices"),
        json!({"capabilities": "fly"}),
    );
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_capabilities")));

    // Metrics count what went through.
    let text = agent()
        .get(&format!("{url}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        text.contains("cyberbackup_bridge_snapshots_total{result=\"done\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("cyberbackup_bridge_files_total{result=\"stored\"} 8"),
        "{text}"
    );
}

/// A file cut off midway is not stored; sent again it is, and its chunks that reached
/// the server the first time are not sent to it again; a file already stored is not
/// taken twice; the snapshot commits only when every file is in.
#[test]
fn an_interrupted_upload_resumes_without_resending_what_the_server_holds() {
    let srv = Server::start(Runtime::Mio, &[]);
    let data = tempfile::tempdir().unwrap();
    let b = set_up(data.path(), &srv);
    let url = &b.url;
    let small = cyberbackup_e2e::data(100_000, 1);
    let big = cyberbackup_e2e::data(40 << 20, 2);
    let (st, v) = post(
        &format!("{url}/api/backups"),
        json!({"label": "work", "files": [
            {"path": "work/a.bin", "size": small.len()},
            {"path": "work/big.bin", "size": big.len()},
        ]}),
    );
    assert_eq!(st, 201, "{v}");
    let id = v["backup"]["id"].as_str().unwrap().to_owned();
    ok(call(
        agent()
            .put(&format!("{url}/api/backups/{id}/files/0"))
            .send_bytes(&small),
    ));
    // Not every file is in: no commit.
    let (st, v) = post(&format!("{url}/api/backups/{id}/commit"), json!({}));
    assert_eq!((st, v["code"].as_str()), (409, Some("incomplete")), "{v}");
    // The big file: 30 of its 40 MiB, then the connection drops (a reload).
    let host = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(
        s,
        "PUT /api/backups/{id}/files/1 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {BRIDGE_TOKEN}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .unwrap();
    s.write_all(&big[..30 << 20]).unwrap();
    s.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop(s);
    let t0 = std::time::Instant::now();
    let state = loop {
        let v = ok(get(&format!("{url}/api/backups/{id}")));
        if v["backup"]["files_resent"] == 1 {
            break v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the cut-off file never ended: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(state["backup"]["files"][0]["done"], true);
    assert_eq!(state["backup"]["files"][1]["done"], false);
    assert_eq!(state["backup"]["state"], "open");
    let sent_before = state["backup"]["bytes_sent"].as_u64().unwrap();
    // The page lists what is open, to offer the resume.
    let open = ok(get(&format!("{url}/api/backups")));
    assert_eq!(open["backups"][0]["id"], id.as_str());
    // A file already stored is not taken twice (refused before its body is read; a
    // short body, so that the refusal arrives before the client is done writing).
    let (st, v) = call(
        agent()
            .put(&format!("{url}/api/backups/{id}/files/0"))
            .send_bytes(&small[..10]),
    );
    assert_eq!((st, v["code"].as_str()), (409, Some("already_done")));
    // A wrong length is refused before anything is read.
    let (st, v) = call(
        agent()
            .put(&format!("{url}/api/backups/{id}/files/1"))
            .send_bytes(&big[..10]),
    );
    assert_eq!(
        (st, v["code"].as_str()),
        (400, Some("size_mismatch")),
        "{v}"
    );
    // Resume: the whole file again; the server is sent only what it lacked.
    let v = ok(call(
        agent()
            .put(&format!("{url}/api/backups/{id}/files/1"))
            .send_bytes(&big),
    ));
    let sent_now = v["backup"]["bytes_sent"].as_u64().unwrap() - sent_before;
    let held = v["backup"]["chunks_held"].as_u64().unwrap();
    assert!(held > 0, "no chunk of the first attempt was reused: {v}");
    assert!(
        sent_now < (big.len() as u64) - (20 << 20),
        "the resumed file sent {sent_now} bytes of {}",
        big.len()
    );
    eprintln!(
        "resumed: sent {sent_now} of {} bytes; {held} chunks were already held",
        big.len()
    );
    let c = ok(post(&format!("{url}/api/backups/{id}/commit"), json!({})));
    let snap = c["backup"]["snapshot"].as_str().unwrap().to_owned();
    assert_eq!(
        bytes(&format!(
            "{url}/api/snapshots/{snap}/file?path=work/big.bin"
        )),
        big
    );
    assert!(ok(get(&format!("{url}/api/backups")))["backups"]
        .as_array()
        .unwrap()
        .is_empty());
    // Announcing the same files again (a new backup after a restart of the bridge):
    // the server holds every chunk, so nothing new is sent.
    let (_, v) = post(
        &format!("{url}/api/backups"),
        json!({"files": [{"path": "work/big.bin", "size": big.len()}]}),
    );
    let id2 = v["backup"]["id"].as_str().unwrap().to_owned();
    let v = ok(call(
        agent()
            .put(&format!("{url}/api/backups/{id2}/files/0"))
            .send_bytes(&big),
    ));
    assert_eq!(v["backup"]["bytes_sent"], 0, "{v}");
}

/// Bad input is answered with JSON errors, and a fresh device is told to set up.
#[test]
fn bad_input_gets_json_errors() {
    let srv = Server::start(Runtime::Glommio, &[]);
    let data = tempfile::tempdir().unwrap();
    let b = Bridge::start(data.path(), &srv.addr.to_string());
    let url = &b.url;
    // Not set up yet.
    let (st, v) = get(&format!("{url}/api/snapshots"));
    assert_eq!((st, v["code"].as_str()), (409, Some("not_set_up")), "{v}");
    let (st, v) = post(
        &format!("{url}/api/setup"),
        json!({"server": "no-port", "account": "x", "passphrase": PASS}),
    );
    assert_eq!((st, v["code"].as_str()), (400, Some("bad_server")));
    let (st, v) = post(
        &format!("{url}/api/setup"),
        json!({"server": srv.addr.to_string(), "account": "x", "passphrase": "short"}),
    );
    assert_eq!((st, v["code"].as_str()), (400, Some("weak_passphrase")));
    let (st, v) = post(
        &format!("{url}/api/setup"),
        json!({"server": "127.0.0.1:9", "account": "x", "passphrase": PASS}),
    );
    assert_eq!((st, v["code"].as_str()), (502, Some("unreachable")), "{v}");
    assert!(v["detail"].is_string());
    let (st, v) = post(&format!("{url}/api/setup"), json!({"nonsense": 1}));
    assert_eq!((st, v["code"].as_str()), (422, Some("bad_request")), "{v}");
    // An oversized body is read before the 413 goes, so the client, still sending it,
    // gets the answer rather than a reset connection (a broken pipe), every time.
    for size in [100_000, 500_000, 1 << 20] {
        for _ in 0..5 {
            let (st, v) = call(
                agent()
                    .post(&format!("{url}/api/unlock"))
                    .set("Content-Type", "application/json")
                    .send_string(&"x".repeat(size)),
            );
            assert_eq!((st, v["code"].as_str()), (413, Some("too_large")), "{v}");
        }
    }
    ok(post(
        &format!("{url}/api/setup"),
        json!({"server": srv.addr.to_string(), "account": unique_name("bad"), "passphrase": PASS}),
    ));
    // Backups: no files, a path that escapes, a duplicate, an unknown backup or file.
    for (files, code) in [
        (json!([]), "no_files"),
        (json!([{"path": "../etc/passwd", "size": 1}]), "bad_path"),
        (json!([{"path": "a/./b", "size": 1}]), "bad_path"),
        (
            json!([{"path": "a", "size": 1}, {"path": "/a/", "size": 2}]),
            "duplicate_path",
        ),
        (
            json!([{"path": "x", "size": 1}, {"path": "x/y/z", "size": 2}]),
            "file_and_dir",
        ),
    ] {
        let (st, v) = post(&format!("{url}/api/backups"), json!({"files": files}));
        assert_eq!((st, v["code"].as_str()), (400, Some(code)), "{files}: {v}");
    }
    // A misspelt field is refused, never ignored (a forget without its rule would
    // forget more).
    let (st, v) = post(
        &format!("{url}/api/forget"),
        json!({"keep_last": 1, "keep_dialy": 7, "dry_run": false}),
    );
    assert_eq!(st, 422, "{v}");
    assert!(v["error"].as_str().unwrap().contains("keep_dialy"), "{v}");
    let (st, v) = call(
        agent()
            .put(&format!("{url}/api/backups/nope/files/0"))
            .send_bytes(b"x"),
    );
    assert_eq!((st, v["code"].as_str()), (404, Some("no_backup")));
    let (_, v) = post(
        &format!("{url}/api/backups"),
        json!({"files": [{"path": "f", "size": 1}]}),
    );
    let id = v["backup"]["id"].as_str().unwrap().to_owned();
    let (st, v) = call(
        agent()
            .put(&format!("{url}/api/backups/{id}/files/7"))
            .send_bytes(b"x"),
    );
    assert_eq!((st, v["code"].as_str()), (404, Some("no_file")));
    let (st, v) = get(&format!("{url}/api/snapshots/ffffffff/tree"));
    assert_eq!((st, v["code"].as_str()), (404, Some("no_snapshot")));
    let (st, v) = get(&format!("{url}/api/nope"));
    assert_eq!((st, v["code"].as_str()), (404, Some("not_found")));
    ok(call(
        agent().delete(&format!("{url}/api/backups/{id}")).call(),
    ));
    // Health, readiness, the OpenAPI document.
    assert_eq!(
        call(anonymous().get(&format!("{url}/healthz")).call()).0,
        200
    );
    assert_eq!(
        call(anonymous().get(&format!("{url}/readyz")).call()).0,
        200
    );
    let spec = ok(get(&format!("{url}/api/openapi.json")));
    assert_eq!(spec["openapi"], "3.0.3");
    assert!(spec["paths"]["/api/backups/{id}/files/{index}"]["put"].is_object());
    drop(srv);
    let (st, v) = call(anonymous().get(&format!("{url}/readyz")).call());
    assert_eq!((st, v["ready"].as_bool()), (503, Some(false)));
}

/// The bridge is safe by default: nothing but the UI's static files and the probes
/// without the token; the printed link signs in with an HttpOnly, SameSite=Strict
/// cookie; foreign Hosts (DNS rebinding) and Origins are refused, the WebSocket too;
/// every response carries the Content-Security-Policy.
#[test]
fn the_bridge_refuses_strangers_foreign_hosts_and_origins() {
    let data = tempfile::tempdir().unwrap();
    let b = Bridge::start(data.path(), "127.0.0.1:9");
    let url = &b.url;
    let host = url.trim_start_matches("http://").to_owned();
    // Without the token: 401 as JSON; static files and probes are public.
    for path in [
        "/api/status",
        "/api/snapshots",
        "/metrics",
        "/api/openapi.json",
    ] {
        let (st, v) = call(anonymous().get(&format!("{url}{path}")).call());
        assert_eq!(st, 401, "{path}: {v}");
        assert_eq!(v["code"], "unauthorized", "{path}");
    }
    let (st, _) = call(
        anonymous()
            .post(&format!("{url}/api/backups"))
            .send_json(json!({"files": [{"path": "y", "size": 1}]})),
    );
    assert_eq!(st, 401);
    let page = anonymous().get(&format!("{url}/")).call().unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.header("Content-Security-Policy").unwrap().to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(page.header("X-Content-Type-Options"), Some("nosniff"));
    assert_eq!(page.header("Referrer-Policy"), Some("no-referrer"));
    // A wrong token, as a bearer or in the link.
    let (st, _) = call(
        anonymous()
            .get(&format!("{url}/api/status"))
            .set("Authorization", "Bearer not-the-token-at-all")
            .call(),
    );
    assert_eq!(st, 401);
    let (st, _) = call(anonymous().get(&format!("{url}/?token=wrong")).call());
    assert_eq!(st, 401);
    // The link: a session cookie, and a redirect to the page without the token.
    let r = anonymous()
        .get(&format!("{url}/?token={BRIDGE_TOKEN}"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.header("Location"), Some("/"));
    let cookie = r.header("Set-Cookie").unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let (st, v) = call(
        anonymous()
            .get(&format!("{url}/api/status"))
            .set("Cookie", &pair)
            .call(),
    );
    assert_eq!(st, 200, "{v}");
    // The sign-in form's way: POST /api/login.
    let r = anonymous()
        .post(&format!("{url}/api/login"))
        .send_json(json!({"token": BRIDGE_TOKEN}))
        .unwrap();
    assert!(r.header("Set-Cookie").unwrap().contains("HttpOnly"));
    let (st, _) = call(
        anonymous()
            .post(&format!("{url}/api/login"))
            .send_json(json!({"token": "guess"})),
    );
    assert_eq!(st, 401);
    // A foreign Host (a rebound DNS name) is refused even with the token.
    let (st, v) = call(
        agent()
            .get(&format!("{url}/api/status"))
            .set(
                "Host",
                &format!("evil.example:{}", host.rsplit(':').next().unwrap()),
            )
            .call(),
    );
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["code"], "bad_host");
    let (st, _) = call(
        anonymous()
            .get(&format!("{url}/"))
            .set("Host", "evil.example")
            .call(),
    );
    assert_eq!(st, 403);
    // A foreign Origin on a state-changing request, even with the session cookie.
    let (st, v) = call(
        anonymous()
            .post(&format!("{url}/api/backups"))
            .set("Cookie", &pair)
            .set("Origin", "http://evil.example")
            .send_json(json!({"files": [{"path": "y", "size": 1}]})),
    );
    assert_eq!(st, 403, "{v}");
    assert_eq!(v["code"], "bad_origin");
    // Our own origin passes the Origin check (and then validation answers).
    let (st, v) = call(
        anonymous()
            .post(&format!("{url}/api/test-connection"))
            .set("Cookie", &pair)
            .set("Origin", &format!("http://{host}"))
            .send_json(json!({})),
    );
    assert_eq!(st, 200, "{v}");
    // The WebSocket: refused from another origin, and without credentials.
    let ws_url = format!("{}/api/ws", url.replace("http://", "ws://"));
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(ws_url.as_str()).unwrap();
    req.headers_mut().insert("Cookie", pair.parse().unwrap());
    req.headers_mut()
        .insert("Origin", "http://evil.example".parse().unwrap());
    match tungstenite::connect(req) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!(
            "a foreign-origin WebSocket was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    let req = tungstenite::client::IntoClientRequest::into_client_request(ws_url.as_str()).unwrap();
    match tungstenite::connect(req) {
        Err(tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!(
            "an anonymous WebSocket was not refused: {:?}",
            other.map(|_| ())
        ),
    }
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(ws_url.as_str()).unwrap();
    req.headers_mut().insert("Cookie", pair.parse().unwrap());
    req.headers_mut()
        .insert("Origin", format!("http://{host}").parse().unwrap());
    let (mut ws, _) = tungstenite::connect(req).expect("our own page's WebSocket");
    let _ = ws.close(None);
}

/// HTTPS read on a fresh TLS connection that trusts only the test CA.
fn https(host_port: &str, request: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(fixtures.join("bridge-test-ca.crt"))
        .unwrap()
    {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(cfg), "localhost".try_into().unwrap())
            .unwrap();
    let sock = std::net::TcpStream::connect(host_port).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    tls.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            // A peer that closes without close_notify: what was read is whole here.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("TLS read: {e}"),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// With --tls-cert/--tls-key the bridge serves HTTPS: the link is https://, the
/// session cookie is Secure, the API answers over TLS, and plain HTTP gets nothing.
#[test]
fn the_bridge_serves_https_with_a_certificate() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let cert = fixtures.join("bridge-test.crt");
    let key = fixtures.join("bridge-test.key");
    let data = tempfile::tempdir().unwrap();
    let b = Bridge::start_with(
        data.path(),
        "127.0.0.1:9",
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let host = b
        .url
        .strip_prefix("https://")
        .expect("an https URL")
        .to_owned();
    let port = host.rsplit(':').next().unwrap().to_owned();
    let r = https(
        &host,
        &format!("GET /?token={BRIDGE_TOKEN} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 303"), "{r}");
    let cookie = r
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("{r}"));
    assert!(
        cookie.contains("Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let r = https(
        &host,
        &format!("GET /api/status HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {BRIDGE_TOKEN}\r\nConnection: close\r\n\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(r.contains("\"setup\":false"), "{r}");
    // An https Origin is ours; an http one is not.
    let r = https(
        &host,
        &format!("POST /api/lock HTTP/1.1\r\nHost: localhost:{port}\r\nAuthorization: Bearer {BRIDGE_TOKEN}\r\nOrigin: http://localhost:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    // Plain HTTP on the TLS port: no HTTP answer.
    let mut s = std::net::TcpStream::connect(&host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "plain HTTP was served"
    );
    // The bridge still serves TLS clients after that.
    let r = https(
        &host,
        &format!("GET /healthz HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
}
