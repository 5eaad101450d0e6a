//! The bridge's API against the real bridge and the real server processes: backups
//! streamed through it, identities that reconnect, history that survives a restart,
//! live progress on the WebSocket, health, readiness, metrics, OpenAPI, and bad input
//! answered with JSON errors while nothing half-sent appears on the backup server.

use std::io::Read;
use std::time::Duration;

use cyberbackup_e2e::*;
use serde_json::{json, Value};

/// An HTTP agent signed in with the test bridges' token.
// ureq's middleware signature has ureq's (large) error type.
#[allow(clippy::result_large_err)]
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
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

fn create(url: &str, server: &str, user: &str, name: &str, size: usize) -> (u16, Value) {
    call(agent().post(&format!("{url}/api/jobs")).send_json(json!({
        "server": server, "user": user, "name": name, "size": size
    })))
}

fn put(url: &str, id: &str, data: &[u8]) -> (u16, Value) {
    call(
        agent()
            .put(&format!("{url}/api/jobs/{id}/content"))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(data),
    )
}

/// Backs one file up through the bridge; returns the final job.
fn backup(url: &str, server: &str, user: &str, name: &str, data: &[u8]) -> Value {
    let (st, v) = create(url, server, user, name, data.len());
    assert_eq!(st, 201, "{v}");
    let id = v["job"]["id"].as_str().unwrap().to_owned();
    let (st, v) = put(url, &id, data);
    assert_eq!(st, 200, "{v}");
    v["job"].clone()
}

fn stored_dir(srv: &Server) -> std::path::PathBuf {
    // the bridge's user is the only client of this server in these tests
    let mut dirs: Vec<_> = std::fs::read_dir(srv.storage())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != ".incoming"))
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.pop().unwrap()
}

#[test]
fn backups_through_the_bridge_reconnect_and_survive_a_restart() {
    let srv = Server::start(Runtime::Glommio, &[]);
    let server = srv.addr.to_string();
    let data = tempfile::tempdir().unwrap();
    let mut b = Bridge::start(data.path(), &server);
    let a = cyberbackup_e2e::data(3 << 20, 1);
    let c = cyberbackup_e2e::data(1000, 2);
    let j1 = backup(&b.url, &server, "carol", "a.bin", &a);
    assert_eq!(j1["status"], "done");
    assert_eq!(j1["cksum"], cyberbackup_protocol::v3::cksum(&a));
    assert_eq!(j1["percent"], 100.0);
    // the same user again: the bridge reconnects with the identity it kept
    let j2 = backup(&b.url, &server, "carol", "c.bin", &c);
    assert_eq!(j2["status"], "done", "{j2}");
    assert!(
        srv.log().contains("reconnect=true"),
        "the second backup reconnected"
    );
    let dir = stored_dir(&srv);
    assert_eq!(std::fs::read(dir.join("a.bin")).unwrap(), a);
    assert_eq!(std::fs::read(dir.join("c.bin")).unwrap(), c);
    // an empty file
    let j3 = backup(&b.url, &server, "carol", "empty", b"");
    assert_eq!(j3["cksum"], 4294967295u32);

    // history survives a restart of the bridge, and the identity too
    b.stop();
    let b = Bridge::start(data.path(), &server);
    let (st, v) = call(agent().get(&format!("{}/api/jobs", b.url)).call());
    assert_eq!(st, 200);
    let jobs = v["jobs"].as_array().unwrap();
    let done: Vec<&str> = jobs
        .iter()
        .filter(|j| j["status"] == "done")
        .map(|j| j["file"].as_str().unwrap())
        .collect();
    assert!(done.contains(&"a.bin") && done.contains(&"c.bin"), "{v}");
    let (st, one) = call(
        agent()
            .get(&format!(
                "{}/api/jobs/{}",
                b.url,
                j1["id"].as_str().unwrap()
            ))
            .call(),
    );
    assert_eq!(st, 200);
    assert_eq!(one["job"]["cksum"], j1["cksum"]);
    let j4 = backup(
        &b.url,
        &server,
        "carol",
        "after-restart.txt",
        b"still carol",
    );
    assert_eq!(j4["status"], "done", "{j4}");
    assert_eq!(
        std::fs::read(dir.join("after-restart.txt")).unwrap(),
        b"still carol"
    );
}

#[test]
fn the_websocket_reports_live_progress_and_the_result() {
    let srv = Server::start(Runtime::Mio, &[]);
    let server = srv.addr.to_string();
    let data = tempfile::tempdir().unwrap();
    let b = Bridge::start(data.path(), &server);
    let ws_url = format!("{}/api/ws", b.url.replace("http://", "ws://"));
    let mut req =
        tungstenite::client::IntoClientRequest::into_client_request(ws_url.as_str()).unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {BRIDGE_TOKEN}").parse().unwrap(),
    );
    let (mut ws, _) = tungstenite::connect(req).expect("websocket");
    let first: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(first["type"], "snapshot");
    let big = cyberbackup_e2e::data(64 << 20, 3);
    let b2url = b.url.clone();
    let server2 = server.clone();
    let uploader = std::thread::spawn(move || backup(&b2url, &server2, "dave", "big.bin", &big));
    let mut phases = Vec::new();
    let mut percents = Vec::new();
    let done = loop {
        let msg = ws.read().expect("websocket message");
        let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        if v["type"] != "job" {
            continue;
        }
        let j = &v["job"];
        phases.push(j["phase"].as_str().unwrap().to_owned());
        percents.push(j["percent"].as_f64().unwrap());
        if j["status"] == "done" {
            break j.clone();
        }
        assert!(j["status"] != "failed", "{j}");
    };
    let final_job = uploader.join().unwrap();
    assert_eq!(done["cksum"], final_job["cksum"]);
    assert!(phases.iter().any(|p| p == "sending"), "{phases:?}");
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]),
        "percent never goes back: {percents:?}"
    );
    assert!(
        percents.iter().any(|&p| p > 0.0 && p < 100.0),
        "intermediate progress: {percents:?}"
    );
}

#[test]
fn bad_input_gets_json_errors_and_nothing_half_sent_is_stored() {
    let srv = Server::start(Runtime::Glommio, &[]);
    let server = srv.addr.to_string();
    let data = tempfile::tempdir().unwrap();
    let b = Bridge::start(data.path(), &server);
    let expect_err = |(st, v): (u16, Value), status: u16, code: &str| {
        assert_eq!(st, status, "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert!(
            v["error"].as_str().is_some_and(|m| m.len() > 10),
            "a human message: {v}"
        );
    };
    expect_err(
        create(&b.url, &server, "erin", "../etc/passwd", 10),
        400,
        "bad_name",
    );
    expect_err(create(&b.url, &server, "erin", "a/b", 10), 400, "bad_name");
    expect_err(create(&b.url, &server, "", "x", 10), 400, "bad_user");
    expect_err(
        create(&b.url, &server, "erin", "x", 1 << 40),
        413,
        "too_large",
    );
    expect_err(
        create(&b.url, "no-port", "erin", "x", 10),
        400,
        "bad_server",
    );
    expect_err(
        call(
            agent()
                .post(&format!("{}/api/jobs", b.url))
                .set("Content-Type", "application/json")
                .send_string("{not json"),
        ),
        400,
        "bad_request",
    );
    // an oversized JSON request: refused without being read (413 JSON); a client
    // still writing when the bridge answers may see the connection close instead
    let huge = format!("{{\"user\":\"{}\"}}", "x".repeat(200_000));
    match agent()
        .post(&format!("{}/api/jobs", b.url))
        .set("Content-Type", "application/json")
        .send_string(&huge)
    {
        Err(ureq::Error::Status(st, r)) => {
            assert_eq!(st, 413);
            let v: Value = r.into_json().unwrap();
            assert!(v["error"].is_string(), "{v}");
        }
        Err(ureq::Error::Transport(_)) => {}
        Ok(r) => panic!("an oversized request was accepted: {}", r.status()),
    }
    // a body shorter than announced: refused, nothing stored
    let (st, v) = create(&b.url, &server, "erin", "short.bin", 1000);
    assert_eq!(st, 201);
    let id = v["job"]["id"].as_str().unwrap().to_owned();
    expect_err(put(&b.url, &id, &[1u8; 999]), 400, "size_mismatch");
    // unknown job
    expect_err(put(&b.url, "nope", b"x"), 404, "no_job");
    // an unreachable backup server: 502 with a message, the job failed
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (st, v) = create(&b.url, &down, "erin", "lost.bin", 5);
    assert_eq!(st, 201);
    let id = v["job"]["id"].as_str().unwrap().to_owned();
    let (st, v) = put(&b.url, &id, b"hello");
    assert_eq!(st, 502, "{v}");
    assert_eq!(v["code"], "unreachable");
    assert_eq!(v["job"]["status"], "failed");
    assert!(v["error"].as_str().unwrap().contains("cannot reach"), "{v}");
    // the bridge is still up
    let (st, _) = call(agent().get(&format!("{}/healthz", b.url)).call());
    assert_eq!(st, 200);
    // nothing of these reached the backup server
    assert!(!srv.storage().join("short.bin").exists());
    let stored: usize = std::fs::read_dir(srv.storage())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != ".incoming")
        .map(|e| std::fs::read_dir(e.path()).map(|d| d.count()).unwrap_or(0))
        .sum();
    assert_eq!(stored, 0);
    assert!(srv.wait_no_temp_files());
}

#[test]
fn cancelling_a_running_job_leaves_nothing_on_the_server() {
    let srv = Server::start(Runtime::Glommio, &[]);
    let server = srv.addr.to_string();
    let data = tempfile::tempdir().unwrap();
    let b = Bridge::start(data.path(), &server);
    let size = 256usize << 20;
    let (st, v) = create(&b.url, &server, "frank", "cancel-me.bin", size);
    assert_eq!(st, 201);
    let id = v["job"]["id"].as_str().unwrap().to_owned();
    // a slow body: 1 MiB, then a pause long enough to cancel
    struct Slow {
        left: usize,
        sent: usize,
    }
    impl Read for Slow {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.left == 0 {
                return Ok(0);
            }
            if self.sent >= 1 << 20 {
                std::thread::sleep(Duration::from_millis(50));
            }
            let n = buf.len().min(self.left).min(64 * 1024);
            buf[..n].fill(7);
            self.left -= n;
            self.sent += n;
            Ok(n)
        }
    }
    let url = format!("{}/api/jobs/{id}/content", b.url);
    let up = std::thread::spawn(move || {
        agent()
            .put(&url)
            .set("Content-Length", &size.to_string())
            .send(Slow {
                left: size,
                sent: 0,
            })
            .map_err(Box::new)
    });
    std::thread::sleep(Duration::from_millis(800));
    let (st, v) = call(
        agent()
            .post(&format!("{}/api/jobs/{id}/cancel", b.url))
            .call(),
    );
    assert_eq!(st, 200, "{v}");
    // The bridge answers 409 and stops reading the body: the client sees that answer,
    // or (as here, mid-body) a closed connection.
    match up.join().unwrap().map_err(|e| *e) {
        Err(ureq::Error::Status(code, r)) => {
            assert_eq!(code, 409);
            let v: Value = r.into_json().unwrap();
            assert_eq!(v["job"]["status"], "cancelled", "{v}");
        }
        Err(ureq::Error::Transport(_)) => {}
        Ok(r) => panic!("a cancelled upload succeeded: {}", r.status()),
    }
    let (st, v) = call(agent().get(&format!("{}/api/jobs/{id}", b.url)).call());
    assert_eq!(st, 200);
    assert_eq!(v["job"]["status"], "cancelled", "{v}");
    assert!(srv.wait_no_temp_files(), "the partial file was discarded");
    let any_file = std::fs::read_dir(srv.storage())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name() != ".incoming")
        .any(|e| e.path().join("cancel-me.bin").exists());
    assert!(!any_file);
}

#[test]
fn health_readiness_connection_test_metrics_and_openapi() {
    let srv = Server::start(Runtime::Mio, &[]);
    let server = srv.addr.to_string();
    let data = tempfile::tempdir().unwrap();
    let b = Bridge::start(data.path(), &server);
    assert_eq!(
        call(agent().get(&format!("{}/healthz", b.url)).call()).0,
        200
    );
    let (st, v) = call(agent().get(&format!("{}/readyz", b.url)).call());
    assert_eq!(st, 200, "{v}");
    let (st, v) = call(
        agent()
            .post(&format!("{}/api/test-connection", b.url))
            .send_json(json!({"server": server})),
    );
    assert_eq!(st, 200);
    assert_eq!(v["ok"], true, "{v}");
    // something that is not a CyberBackup server
    let (st, v) = call(
        agent()
            .post(&format!("{}/api/test-connection", b.url))
            .send_json(json!({"server": b.url.trim_start_matches("http://")})),
    );
    assert_eq!(st, 200);
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["error"].as_str().unwrap().len() > 10);

    backup(&b.url, &server, "gina", "m.txt", b"metrics");
    let text = agent()
        .get(&format!("{}/metrics", b.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        text.contains("cyberbackup_bridge_uploads_total{result=\"done\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("cyberbackup_bridge_uploaded_bytes_total 7"),
        "{text}"
    );
    assert!(
        text.contains("cyberbackup_bridge_upload_duration_seconds_count 1"),
        "{text}"
    );
    let (st, spec) = call(agent().get(&format!("{}/api/openapi.json", b.url)).call());
    assert_eq!(st, 200);
    assert_eq!(spec["openapi"], "3.0.3");
    assert!(spec["paths"]["/api/jobs/{id}/content"]["put"].is_object());
    let html = agent().get(&format!("{}/", b.url)).call().unwrap();
    assert!(html.content_type().starts_with("text/html"));

    // readiness follows the default backup server
    drop(srv);
    let (st, v) = call(agent().get(&format!("{}/readyz", b.url)).call());
    assert_eq!(st, 503, "{v}");
    assert_eq!(v["ready"], false);
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
    for path in ["/api/jobs", "/api/config", "/metrics", "/api/openapi.json"] {
        let (st, v) = call(anonymous().get(&format!("{url}{path}")).call());
        assert_eq!(st, 401, "{path}: {v}");
        assert_eq!(v["code"], "unauthorized", "{path}");
    }
    let (st, _) = call(
        anonymous()
            .post(&format!("{url}/api/jobs"))
            .send_json(json!({"user": "x", "name": "y", "size": 1})),
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
            .get(&format!("{url}/api/jobs"))
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
            .get(&format!("{url}/api/jobs"))
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
            .get(&format!("{url}/api/jobs"))
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
            .post(&format!("{url}/api/jobs"))
            .set("Cookie", &pair)
            .set("Origin", "http://evil.example")
            .send_json(json!({"user": "x", "name": "y", "size": 1})),
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
