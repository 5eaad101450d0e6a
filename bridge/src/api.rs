//! The HTTP API, the WebSocket and the embedded UI, on the user's v4 repository.
//!
//! Every error is JSON, `{"error": "a sentence for a person", "code": "for_scripts",
//! "detail": "the server's reason code and the technical chain, or null"}`, with a
//! 4xx status for the caller's mistakes and 5xx for the backup server's. The
//! machine-readable description is `openapi.json`, served at `/api/openapi.json`.
//! Who may call it is [`crate::auth`]'s business.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cyberbackup_client::v4::backup::{self, BackupOptions, BackupProgress, UploadedFile};
use cyberbackup_client::v4::policy::{parse_duration, Policy};
use cyberbackup_client::v4::profile::hex;
use cyberbackup_client::v4::restore::{self, RestoreOptions, RestoreProgress};
use cyberbackup_client::v4::{inspect, snapshots};
use cyberbackup_protocol::v4::format::EntryKind;
use cyberbackup_protocol::v4::noise::fingerprint;
use cyberbackup_protocol::v4::wire::{Answer, Request, SnapshotInfo};
use cyberbackup_protocol::v4::Capabilities;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::repo::{Failure, Repo};
use crate::uploads::{self, BodyReader, NewFile, Uploads};

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server offered on the setup form.
    pub default_server: String,
    /// Largest file accepted, in bytes.
    pub max_file_bytes: u64,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub repo: Arc<Repo>,
    pub uploads: Arc<Uploads>,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<Settings>,
    /// Turns true when the bridge shuts down: WebSockets close so that the graceful
    /// shutdown does not wait on them forever.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (
            status,
            Json(json!({"error": self.message, "code": self.code, "detail": self.detail})),
        )
            .into_response()
    }
}

fn bad(code: &'static str, message: impl Into<String>) -> Failure {
    Failure::new(400, code, message)
}

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, Failure> {
    b.map(|Json(t)| t).map_err(|r| {
        Failure::new(
            r.status().as_u16(),
            "bad_request",
            format!("the request body is not valid: {}", r.body_text()),
        )
    })
}

/// Runs repository work on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|_| Err(Failure::new(500, "internal", "the bridge failed")))
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| asset("index.html")))
        .route("/app.js", get(|| asset("app.js")))
        .route("/style.css", get(|| asset("style.css")))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/openapi.json", get(openapi))
        .route("/api/status", get(status))
        .route("/api/setup", post(setup))
        .route("/api/enrol", post(enrol))
        .route("/api/unlock", post(unlock))
        .route("/api/lock", post(lock_repo))
        .route("/api/snapshots", get(list_snapshots))
        .route("/api/snapshots/{id}/tree", get(tree))
        .route("/api/snapshots/{id}/file", get(download_file))
        .route("/api/snapshots/{id}/archive", get(download_archive))
        .route("/api/snapshots/{id}/restore", post(restore_to_path))
        .route("/api/diff", get(diff))
        .route("/api/forget", post(forget))
        .route("/api/devices", get(devices).post(add_device))
        .route("/api/devices/{id}/revoke", post(revoke_device))
        .route(
            "/api/backups",
            get(open_backups)
                .post(create_backup)
                .layer(DefaultBodyLimit::max(FILE_LIST_LIMIT)),
        )
        .route("/api/backups/{id}", get(get_backup).delete(drop_backup))
        .route("/api/backups/{id}/files/{index}", put(upload_file))
        .route("/api/backups/{id}/commit", post(commit_backup))
        .route("/api/test-connection", post(test_connection))
        .route("/api/ws", get(ws))
        .fallback(|| async { Failure::new(404, "not_found", "no such page or endpoint") })
        // JSON requests are small (a backup's file list has its own limit above); file
        // bytes go through the streamed PUT, bounded by the announced size.
        .layer(DefaultBodyLimit::max(JSON_LIMIT))
        .layer(axum::middleware::from_fn(refuse_oversized))
        .with_state(state)
}

/// The largest JSON request body but a backup's file list.
const JSON_LIMIT: usize = 64 * 1024;
/// The largest backup file list.
const FILE_LIST_LIMIT: usize = 64 << 20;
/// An oversized body up to this many bytes is read (and dropped) before the 413 goes.
const DRAIN_LIMIT: usize = 1 << 20;

/// Answers a request that announces a body over its route's limit with 413 after
/// reading that body (up to [`DRAIN_LIMIT`]): a connection closed with the body
/// unread is reset, and a client still sending it then sees a broken pipe instead of
/// the answer. File uploads (PUT) are streamed and bounded by their own rules.
async fn refuse_oversized(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if req.method() == axum::http::Method::PUT {
        return next.run(req).await;
    }
    let limit = if req.uri().path() == "/api/backups" {
        FILE_LIST_LIMIT
    } else {
        JSON_LIMIT
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match announced {
        Some(n) if n > limit as u64 => {
            if n <= DRAIN_LIMIT as u64 {
                let _ = axum::body::to_bytes(req.into_body(), DRAIN_LIMIT).await;
            }
            Failure::new(
                413,
                "too_large",
                format!("the request body is {n} bytes; this endpoint takes up to {limit}"),
            )
            .into_response()
        }
        _ => next.run(req).await,
    }
}

const INDEX: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/style.css");
const OPENAPI: &str = include_str!("../openapi.json");

async fn asset(name: &str) -> Response {
    let (body, ctype) = match name {
        "index.html" => (INDEX, "text/html; charset=utf-8"),
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        _ => (STYLE, "text/css; charset=utf-8"),
    };
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

fn snapshot_json(s: &SnapshotInfo) -> Value {
    let id = hex(&s.header.id);
    json!({
        "id": id, "short": &id[..8], "time_ms": s.header.time_ms, "host": s.header.host,
        "tags": s.header.tags, "files": s.header.files, "dirs": s.header.dirs,
        "size": s.header.size, "stored": s.header.stored,
        "partial": s.header.tags.iter().any(|t| t == "partial"),
    })
}

/// `GET /api/status`: what the page shows at a glance.
async fn status(State(st): State<AppState>) -> Result<Json<Value>, Failure> {
    let repo = st.repo.clone();
    let uploads: Vec<Value> = st.uploads.open().iter().map(|u| json!(u)).collect();
    let default_server = st.settings.default_server.clone();
    blocking(move || {
        let profile = repo.profile();
        let Ok(r) = profile.repository() else {
            return Ok(Json(json!({
                "setup": false, "unlocked": false, "default_server": default_server,
                "uploads": uploads,
            })));
        };
        let mut v = json!({
            "setup": true, "unlocked": repo.unlocked(), "server": r.server,
            "account": r.account, "device": r.device, "uploads": uploads,
            "config_dir": repo.dir,
        });
        let conn = match repo.conn() {
            Ok(c) => c,
            Err(f) => {
                v["error"] = json!({"error": f.message, "code": f.code, "detail": f.detail});
                return Ok(Json(v));
            }
        };
        v["server_key"] = json!(fingerprint(conn.server_key()));
        let caps = Capabilities(conn.welcome().capabilities);
        v["capabilities"] = json!(caps.names().split('+').collect::<Vec<_>>());
        if let Ok(Answer::UsageInfo(u)) = conn.call(&Request::Usage) {
            v["usage"] = json!({"stored_bytes": u.stored_bytes, "chunks": u.chunks,
                "snapshots": u.snapshots, "quota": if u.quota > 0 { Some(u.quota) } else { None }});
        }
        if caps.0 & Capabilities::READ.0 != 0 {
            let all = snapshots::list(&conn)?;
            let logical: u64 = all.iter().map(|s| s.header.size).sum();
            v["snapshots_size"] = json!(logical);
            if let Some(last) = all.iter().max_by_key(|s| s.header.time_ms) {
                v["last_backup"] = snapshot_json(last);
            }
        }
        Ok(Json(v))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetupReq {
    server: String,
    #[serde(default)]
    account: String,
    #[serde(default)]
    code: String,
    passphrase: String,
    #[serde(default)]
    device: Option<String>,
}

fn device_name(d: Option<String>) -> String {
    d.map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{} (browser)", backup::hostname()))
}

/// `POST /api/setup`: creates an account on a server with this device.
async fn setup(
    State(st): State<AppState>,
    b: Result<Json<SetupReq>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let r = body(b)?;
    check_server(&r.server)?;
    if r.passphrase.chars().count() < 8 {
        return Err(bad(
            "weak_passphrase",
            "choose a passphrase of at least 8 characters: it is the only way to read your backups",
        ));
    }
    let repo = st.repo.clone();
    blocking(move || {
        repo.setup(
            r.server.trim(),
            r.account.trim(),
            &device_name(r.device),
            r.passphrase.as_bytes(),
        )?;
        Ok(Json(json!({"ok": true})))
    })
    .await
}

/// `POST /api/enrol`: joins this device to an account with an enrolment code.
async fn enrol(
    State(st): State<AppState>,
    b: Result<Json<SetupReq>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let r = body(b)?;
    check_server(&r.server)?;
    let repo = st.repo.clone();
    blocking(move || {
        repo.enrol(
            r.server.trim(),
            r.code.trim(),
            &device_name(r.device),
            r.passphrase.as_bytes(),
        )?;
        Ok(Json(json!({"ok": true})))
    })
    .await
}

#[derive(Deserialize)]
struct UnlockReq {
    passphrase: String,
}

async fn unlock(
    State(st): State<AppState>,
    b: Result<Json<UnlockReq>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let r = body(b)?;
    let repo = st.repo.clone();
    blocking(move || {
        repo.unlock(r.passphrase.as_bytes())?;
        Ok(Json(json!({"ok": true})))
    })
    .await
}

async fn lock_repo(State(st): State<AppState>) -> Json<Value> {
    st.repo.lock();
    Json(json!({"ok": true}))
}

async fn list_snapshots(State(st): State<AppState>) -> Result<Json<Value>, Failure> {
    let repo = st.repo.clone();
    blocking(move || {
        let conn = repo.conn()?;
        let mut all = snapshots::list(&conn)?;
        all.sort_by_key(|s| std::cmp::Reverse(s.header.time_ms));
        Ok(Json(
            json!({"snapshots": all.iter().map(snapshot_json).collect::<Vec<_>>()}),
        ))
    })
    .await
}

#[derive(Deserialize)]
struct PathQuery {
    #[serde(default)]
    path: String,
}

fn clean(p: &str) -> String {
    p.trim_matches('/').to_owned()
}

/// `GET /api/snapshots/{id}/tree?path=DIR`: the entries directly in a directory.
async fn tree(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Json<Value>, Failure> {
    let repo = st.repo.clone();
    blocking(move || {
        let t = repo.tree(&id)?;
        let dir = clean(&q.path);
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut found_dir = dir.is_empty();
        let mut entries = Vec::new();
        for e in &t.entries {
            let p = String::from_utf8_lossy(&e.path);
            if p == dir {
                found_dir = matches!(e.kind, EntryKind::Dir);
                continue;
            }
            let Some(rest) = p.strip_prefix(&prefix) else {
                continue;
            };
            found_dir = true;
            if rest.contains('/') {
                continue;
            }
            let (kind, target) = match &e.kind {
                EntryKind::Dir => ("dir", None),
                EntryKind::File { .. } => ("file", None),
                EntryKind::Symlink { target } => {
                    ("symlink", Some(String::from_utf8_lossy(target).into_owned()))
                }
            };
            entries.push(json!({
                "name": rest, "path": p, "type": kind, "size": e.size,
                "mode": format!("{:o}", e.mode), "mtime_ms": e.mtime_ns.div_euclid(1_000_000),
                "target": target,
            }));
        }
        if !found_dir {
            return Err(Failure::new(
                404,
                "no_path",
                format!("the snapshot has no directory {dir:?}"),
            ));
        }
        Ok(Json(json!({
            "snapshot": snapshot_json(&t.info), "path": dir, "entries": entries,
            "paths": t.root.paths.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>(),
        })))
    })
    .await
}

/// A `Content-Disposition: attachment` header for a file name (RFC 6266 / 5987).
fn attachment(name: &str) -> HeaderValue {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut enc = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"._-~".contains(&b) {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{enc}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("attachment"))
}

/// A writer whose bytes become the response body (bounded: the producer waits for the
/// browser).
struct ChannelWriter(mpsc::Sender<Result<axum::body::Bytes, std::io::Error>>);

impl std::io::Write for ChannelWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(axum::body::Bytes::copy_from_slice(b)))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the browser left"))?;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn streamed(
    headers: Vec<(header::HeaderName, HeaderValue)>,
    produce: impl FnOnce(&mut ChannelWriter) -> Result<(), String> + Send + 'static,
) -> Response {
    let (tx, rx) = mpsc::channel(16);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter(tx.clone());
        if let Err(e) = produce(&mut w) {
            // The body ends with an error: the browser shows a failed download, never
            // a short file that looks whole.
            tracing::warn!(error = %e, "a download stopped");
            let _ = tx.blocking_send(Err(std::io::Error::other(e)));
        }
    });
    let stream = tokio_stream(rx);
    let mut r = Response::new(Body::from_stream(stream));
    for (k, v) in headers {
        r.headers_mut().insert(k, v);
    }
    r
}

fn tokio_stream(
    mut rx: mpsc::Receiver<Result<axum::body::Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// `GET /api/snapshots/{id}/file?path=P`: one file, verified chunk by chunk as it
/// streams.
async fn download_file(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, Failure> {
    let repo = st.repo.clone();
    let path = clean(&q.path);
    let (t, key, conn) = blocking(move || Ok((repo.tree(&id)?, repo.key()?, repo.conn()?))).await?;
    let idx = t
        .entries
        .iter()
        .position(|e| e.path == path.as_bytes())
        .ok_or_else(|| Failure::new(404, "no_path", format!("the snapshot has no {path:?}")))?;
    let e = &t.entries[idx];
    if !matches!(e.kind, EntryKind::File { .. }) {
        return Err(bad(
            "not_a_file",
            format!("{path} is not a file: download it as an archive"),
        ));
    }
    let name = path.rsplit('/').next().unwrap_or(&path).to_owned();
    let headers = vec![
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        (header::CONTENT_LENGTH, HeaderValue::from(e.size)),
        (header::CONTENT_DISPOSITION, attachment(&name)),
    ];
    Ok(streamed(headers, move |w| {
        restore::dump_entry(&conn, &key, &t.entries[idx], w)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }))
}

/// `GET /api/snapshots/{id}/archive?path=DIR`: a directory (or the whole snapshot) as a
/// tar stream, every chunk verified before it is sent.
async fn download_archive(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Result<Response, Failure> {
    let repo = st.repo.clone();
    let dir = clean(&q.path);
    let (t, key, conn) = blocking(move || Ok((repo.tree(&id)?, repo.key()?, repo.conn()?))).await?;
    let prefix = format!("{dir}/");
    let members: Vec<usize> = t
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| {
            let p = String::from_utf8_lossy(&e.path);
            dir.is_empty() || p == dir || p.starts_with(&prefix)
        })
        .map(|(i, _)| i)
        .collect();
    if members.is_empty() {
        return Err(Failure::new(
            404,
            "no_path",
            format!("the snapshot has no {dir:?}"),
        ));
    }
    let base = if dir.is_empty() {
        format!("snapshot-{}", &hex(&t.info.header.id)[..8])
    } else {
        dir.rsplit('/').next().unwrap_or(&dir).to_owned()
    };
    // Paths in the archive start at the directory's own name.
    let strip = dir.rfind('/').map_or(0, |i| i + 1);
    let headers = vec![
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-tar"),
        ),
        (
            header::CONTENT_DISPOSITION,
            attachment(&format!("{base}.tar")),
        ),
    ];
    Ok(streamed(headers, move |w| {
        let mut ar = tar::Builder::new(w);
        for i in members {
            let e = &t.entries[i];
            let full = String::from_utf8_lossy(&e.path).into_owned();
            let name = if dir.is_empty() {
                format!("{base}/{full}")
            } else {
                full[strip..].to_owned()
            };
            let mut h = tar::Header::new_gnu();
            h.set_mode(e.mode);
            h.set_mtime(e.mtime_ns.div_euclid(1_000_000_000).max(0) as u64);
            let r = match &e.kind {
                EntryKind::Dir => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    ar.append_data(&mut h, &name, std::io::empty())
                }
                EntryKind::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    ar.append_link(&mut h, &name, String::from_utf8_lossy(target).as_ref())
                }
                EntryKind::File { .. } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(e.size);
                    let reader = restore::EntryReader::new(&conn, &key, e, &full)
                        .map_err(|e| e.to_string())?;
                    ar.append_data(&mut h, &name, reader)
                }
            };
            r.map_err(|e| format!("{full}: {e}"))?;
        }
        ar.finish().map_err(|e| e.to_string())
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreReq {
    #[serde(default)]
    path: String,
    target: String,
    #[serde(default)]
    overwrite: bool,
}

/// `POST /api/snapshots/{id}/restore`: restores (a path of) a snapshot to a directory
/// on the bridge's machine.
async fn restore_to_path(
    State(st): State<AppState>,
    Path(id): Path<String>,
    b: Result<Json<RestoreReq>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let r = body(b)?;
    let target = std::path::PathBuf::from(r.target.trim());
    if !target.is_absolute() {
        return Err(bad(
            "bad_target",
            "give the folder to restore into as a full path, e.g. /home/alice/restored",
        ));
    }
    let repo = st.repo.clone();
    blocking(move || {
        let t = repo.tree(&id)?;
        let (key, conn) = (repo.key()?, repo.conn()?);
        let path = clean(&r.path);
        let opts = RestoreOptions {
            overwrite: r.overwrite,
            include: (!path.is_empty()).then_some(path),
            ..Default::default()
        };
        let s = restore::restore(&conn, &key, &t, &target, &opts, &RestoreProgress::default())
            .map_err(|e| {
                let (status, code, msg) = match &e {
                    restore::RestoreError::Exists(p) => (
                        409,
                        "exists",
                        format!("{} already exists: tick \"replace existing files\" to overwrite it", p.display()),
                    ),
                    restore::RestoreError::TargetNotDir(p) => {
                        (400, "bad_target", format!("{} is not a folder", p.display()))
                    }
                    restore::RestoreError::NoMatch(p) => {
                        (404, "no_path", format!("the snapshot has no {p:?}"))
                    }
                    restore::RestoreError::Io { path, .. } => (
                        500,
                        "io",
                        format!("cannot write {}", path.display()),
                    ),
                    _ => (
                        502,
                        "integrity",
                        "a chunk failed verification: the restore stopped and wrote no damaged file".into(),
                    ),
                };
                Failure::new(status, code, msg).with_detail(e.to_string())
            })?;
        Ok(Json(json!({
            "files": s.files, "already_restored": s.skipped, "dirs": s.dirs,
            "symlinks": s.symlinks, "bytes": s.bytes, "target": target,
        })))
    })
    .await
}

#[derive(Deserialize)]
struct DiffQuery {
    a: String,
    b: String,
}

/// `GET /api/diff?a=ID&b=ID`: what changed from snapshot a to b.
async fn diff(
    State(st): State<AppState>,
    Query(q): Query<DiffQuery>,
) -> Result<Json<Value>, Failure> {
    let repo = st.repo.clone();
    blocking(move || {
        let ta = repo.tree(&q.a)?;
        let tb = repo.tree(&q.b)?;
        let changes: Vec<Value> = inspect::diff(&ta, &tb)
            .iter()
            .map(|c| {
                let kind = match c.kind {
                    inspect::ChangeKind::Added => "added",
                    inspect::ChangeKind::Removed => "removed",
                    inspect::ChangeKind::Modified => "modified",
                    _ => "metadata",
                };
                json!({"path": c.path, "kind": kind, "before": c.before, "after": c.after})
            })
            .collect();
        Ok(Json(json!({
            "a": snapshot_json(&ta.info), "b": snapshot_json(&tb.info), "changes": changes,
        })))
    })
    .await
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ForgetReq {
    #[serde(default)]
    keep_last: u32,
    #[serde(default)]
    keep_hourly: u32,
    #[serde(default)]
    keep_daily: u32,
    #[serde(default)]
    keep_weekly: u32,
    #[serde(default)]
    keep_monthly: u32,
    #[serde(default)]
    keep_yearly: u32,
    #[serde(default)]
    keep_within: Option<String>,
    #[serde(default)]
    keep_tags: Vec<String>,
    /// Only show what would happen (the default: a caller must ask to delete).
    #[serde(default = "yes")]
    dry_run: bool,
}

fn yes() -> bool {
    true
}

/// `POST /api/forget`: a retention policy, shown (dry run) or applied.
async fn forget(
    State(st): State<AppState>,
    b: Result<Json<ForgetReq>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let r = body(b)?;
    let within = match r
        .keep_within
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => None,
        Some(s) => Some(parse_duration(s).ok_or_else(|| {
            bad(
                "bad_duration",
                format!("{s:?} is not a duration: e.g. 30d, 1y6m, 36h"),
            )
        })?),
    };
    let policy = Policy {
        last: r.keep_last,
        hourly: r.keep_hourly,
        daily: r.keep_daily,
        weekly: r.keep_weekly,
        monthly: r.keep_monthly,
        yearly: r.keep_yearly,
        within,
        tags: r.keep_tags.clone(),
    };
    if policy.is_empty() {
        return Err(bad(
            "empty_policy",
            "choose at least one rule of what to keep (a policy that keeps nothing would forget every snapshot)",
        ));
    }
    let repo = st.repo.clone();
    let dry_run = r.dry_run;
    blocking(move || {
        let (key, conn) = (repo.key()?, repo.conn()?);
        let planned = cyberbackup_client::v4::policy::plan(&conn, &key, &policy, None)?;
        let mut forgotten = 0;
        if !dry_run {
            for p in planned.iter().filter(|p| !p.keep) {
                match conn.call(&Request::ForgetSnapshot(p.info.header.id))? {
                    Answer::Forgotten => forgotten += 1,
                    _ => {
                        return Err(Failure::new(
                            502,
                            "refused",
                            "the server did not forget a snapshot",
                        ))
                    }
                }
            }
            repo.forget_trees();
        }
        let plan: Vec<Value> = planned
            .iter()
            .map(|p| {
                let mut v = snapshot_json(&p.info);
                v["paths"] = json!(p.paths);
                v["keep"] = json!(p.keep);
                v["reasons"] = json!(p.reasons);
                v
            })
            .collect();
        Ok(Json(
            json!({"dry_run": dry_run, "plan": plan, "forgotten": forgotten}),
        ))
    })
    .await
}

async fn devices(State(st): State<AppState>) -> Result<Json<Value>, Failure> {
    let repo = st.repo.clone();
    blocking(move || {
        let conn = repo.conn()?;
        let Answer::DeviceList(list) = conn.call(&Request::ListDevices)? else {
            return Err(Failure::new(502, "refused", "the server sent no device list"));
        };
        let v: Vec<Value> = list
            .iter()
            .map(|d| {
                json!({"id": d.id, "name": d.name, "this": d.this,
                    "capabilities": Capabilities(d.capabilities).names().split('+').collect::<Vec<_>>(),
                    "created_ms": d.created_ms,
                    "revoked_ms": if d.revoked_ms > 0 { Some(d.revoked_ms) } else { None }})
            })
            .collect();
        Ok(Json(json!({"devices": v})))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDevice {
    #[serde(default = "all")]
    capabilities: String,
    #[serde(default)]
    name: String,
    #[serde(default = "day")]
    ttl_hours: u32,
}

fn all() -> String {
    "all".into()
}

fn day() -> u32 {
    24
}

async fn add_device(
    State(st): State<AppState>,
    b: Result<Json<AddDevice>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let r = body(b)?;
    let caps = Capabilities::parse(&r.capabilities)
        .filter(|c| *c != Capabilities::NONE)
        .ok_or_else(|| {
            bad(
                "bad_capabilities",
                format!(
                    "{:?}: give all, or some of backup, read, forget, admin",
                    r.capabilities
                ),
            )
        })?;
    if !(1..=168).contains(&r.ttl_hours) {
        return Err(bad("bad_ttl", "a code is valid for 1 to 168 hours"));
    }
    let repo = st.repo.clone();
    blocking(move || {
        let conn = repo.conn()?;
        match conn.call(&Request::DeviceAdd {
            capabilities: caps.0,
            name: r.name,
            ttl_s: r.ttl_hours * 3600,
        })? {
            Answer::Enrolment { code, expires_ms } => {
                Ok(Json(json!({"code": code, "expires_ms": expires_ms})))
            }
            _ => Err(Failure::new(502, "refused", "the server made no code")),
        }
    })
    .await
}

async fn revoke_device(
    State(st): State<AppState>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, Failure> {
    let repo = st.repo.clone();
    blocking(move || {
        let conn = repo.conn()?;
        match conn.call(&Request::RevokeDevice(id))? {
            Answer::DeviceRevoked => Ok(Json(json!({"ok": true}))),
            _ => Err(Failure::new(
                502,
                "refused",
                "the server did not revoke the device",
            )),
        }
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackupFile {
    path: String,
    size: u64,
    /// When the file was last modified [default: now].
    #[serde(default)]
    mtime_ms: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackup {
    #[serde(default)]
    label: String,
    #[serde(default)]
    tag: String,
    files: Vec<NewBackupFile>,
}

/// `POST /api/backups`: announces the files of a backup.
async fn create_backup(
    State(st): State<AppState>,
    b: Result<Json<NewBackup>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), Failure> {
    let r = body(b)?;
    st.repo.key()?;
    if r.files.is_empty() {
        return Err(bad("no_files", "choose at least one file or folder"));
    }
    if r.files.len() > uploads::MAX_FILES {
        return Err(bad(
            "too_many_files",
            format!(
                "{} files: a backup from the browser takes at most {}",
                r.files.len(),
                uploads::MAX_FILES
            ),
        ));
    }
    let tag = r.tag.trim().to_owned();
    if tag.len() > 128 || tag.chars().any(char::is_control) {
        return Err(bad(
            "bad_tag",
            "a tag is at most 128 bytes, without control characters",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    let mut files = Vec::with_capacity(r.files.len());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for f in r.files {
        let path = clean(&f.path);
        if path.len() > uploads::MAX_PATH
            || !cyberbackup_protocol::v4::format::safe_path(path.as_bytes())
        {
            return Err(bad(
                "bad_path",
                format!("{:?} cannot be a path in a snapshot", f.path),
            ));
        }
        if f.size > st.settings.max_file_bytes {
            return Err(Failure::new(
                413,
                "too_large",
                format!(
                    "{path} is {} bytes; this bridge takes files up to {}",
                    f.size, st.settings.max_file_bytes
                ),
            ));
        }
        if !seen.insert(path.clone()) {
            return Err(bad("duplicate_path", format!("{path} is listed twice")));
        }
        files.push(NewFile {
            path,
            size: f.size,
            mtime_ms: f.mtime_ms.unwrap_or(now),
        });
    }
    // A path may not be both a file and a folder of other files.
    if let Some(p) = files.iter().find(|f| {
        let mut d = f.path.as_str();
        while let Some(i) = d.rfind('/') {
            d = &d[..i];
            if seen.contains(d) {
                return true;
            }
        }
        false
    }) {
        return Err(bad(
            "file_and_dir",
            format!(
                "{} is inside a folder that is also listed as a file",
                p.path
            ),
        ));
    }
    let label = r.label.trim().chars().take(200).collect::<String>();
    let u = st.uploads.create(label, tag, files);
    tracing::info!(backup = %u.id, files = u.files_total, bytes = u.bytes_total, "backup announced");
    Ok((StatusCode::CREATED, Json(json!({"backup": u.with_files()}))))
}

async fn open_backups(State(st): State<AppState>) -> Json<Value> {
    Json(json!({"backups": st.uploads.open()}))
}

async fn get_backup(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    st.uploads
        .get(&id)
        .map(|u| Json(json!({"backup": u.with_files()})))
        .ok_or_else(|| Failure::new(404, "no_backup", format!("there is no backup {id}")))
}

async fn drop_backup(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    st.uploads
        .remove(&id)
        .map(|_| Json(json!({"ok": true})))
        .ok_or_else(|| Failure::new(404, "no_backup", format!("there is no backup {id}")))
}

/// `PUT /api/backups/{id}/files/{index}`: one file's bytes (Content-Length = its
/// announced size), streamed into the client library.
async fn upload_file(
    State(st): State<AppState>,
    Path((id, index)): Path<(String, usize)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, Failure> {
    let (key, conn) = {
        let repo = st.repo.clone();
        blocking(move || Ok((repo.key()?, repo.conn()?))).await?
    };
    let f = st
        .uploads
        .begin_file(&id, index)
        .map_err(|(s, c, m)| Failure::new(s, c, m))?;
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if len != Some(f.size) {
        st.uploads
            .end_file(&id, index, 0, Err("wrong length".into()));
        return Err(Failure::new(
            if len.is_none() { 411 } else { 400 },
            "size_mismatch",
            format!(
                "send {} with a Content-Length of its size, {} bytes",
                f.path, f.size
            ),
        ));
    }
    // The rest runs in a task of its own: if the browser goes away (a reload), axum
    // drops this handler, but the file's end must still be recorded, or it would stay
    // "being sent" for ever.
    let st2 = st.clone();
    let id2 = id.clone();
    tokio::spawn(receive_file(st2, id2, index, f, key, conn, body))
        .await
        .unwrap_or_else(|_| Err(Failure::new(500, "internal", "the upload task failed")))
}

async fn receive_file(
    st: AppState,
    id: String,
    index: usize,
    f: uploads::UpFile,
    key: Arc<cyberbackup_protocol::v4::format::RepoKey>,
    conn: Arc<cyberbackup_client::v4::conn::Connection>,
    body: Body,
) -> Result<Json<Value>, Failure> {
    let started = Instant::now();
    st.metrics.in_progress.inc();
    let (tx, rx) = mpsc::channel(8);
    let path = f.path.clone();
    let size = f.size;
    let task = tokio::task::spawn_blocking(move || {
        let mut reader = BodyReader::new(rx, size);
        backup::upload_stream(
            &conn,
            &key,
            &mut reader,
            std::path::Path::new(&path),
            true,
            &BackupProgress::default(),
        )
        .map_err(|e| e.to_string())
    });
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    let mut last = Instant::now();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                received += c.len() as u64;
                let publish = last.elapsed() > Duration::from_millis(250);
                if publish {
                    last = Instant::now();
                }
                st.uploads.progress(&id, c.len() as u64, publish);
                if tx.send(c).await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::info!(backup = %id, error = %e, "the browser stopped sending");
                break;
            }
        }
    }
    drop(tx);
    let r = task
        .await
        .unwrap_or_else(|_| Err("the upload task failed".into()));
    st.metrics.in_progress.dec();
    let sent = r.as_ref().map_or(0, |s| s.bytes_sent);
    st.metrics
        .file(r.is_ok(), received, sent, started.elapsed());
    let err = r.as_ref().err().cloned();
    let u = st
        .uploads
        .end_file(&id, index, received, r)
        .ok_or_else(|| Failure::new(404, "no_backup", "the backup was dropped meanwhile"))?;
    match err {
        None => Ok(Json(json!({"backup": u}))),
        Some(e) => Err(Failure::new(
            502,
            "upload_failed",
            format!("{} was not stored; send it again", f.path),
        )
        .with_detail(e)),
    }
}

/// `POST /api/backups/{id}/commit`: one snapshot of the backup's files.
async fn commit_backup(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, Failure> {
    let u = st
        .uploads
        .begin_commit(&id)
        .map_err(|(s, c, m)| Failure::new(s, c, m))?;
    // In a task of its own, so that the outcome is recorded even if the browser leaves.
    let st2 = st.clone();
    tokio::spawn(async move { commit_files_task(st2, id, u).await })
        .await
        .unwrap_or_else(|_| Err(Failure::new(500, "internal", "the commit task failed")))
}

async fn commit_files_task(
    st: AppState,
    id: String,
    u: uploads::Upload,
) -> Result<Json<Value>, Failure> {
    let repo = st.repo.clone();
    let label = u.label.clone();
    let r = blocking(move || {
        let (key, conn) = (repo.key()?, repo.conn()?);
        let files = u
            .files
            .into_iter()
            .map(|f| UploadedFile {
                path: f.path,
                mode: 0o644,
                mtime_ns: f.mtime_ms.saturating_mul(1_000_000),
                size: f.size,
                chunks: f.chunks,
            })
            .collect();
        let mut opts = BackupOptions::default();
        if !u.tag.is_empty() {
            opts.tags.push(u.tag.clone());
        }
        let named = vec![format!(
            "(browser) {}",
            if label.is_empty() { "files" } else { &label }
        )
        .into_bytes()];
        let s = backup::commit_files(&conn, &key, files, named, &opts).map_err(|e| {
            Failure::new(502, "commit_failed", "the snapshot could not be saved")
                .with_detail(e.to_string())
        })?;
        Ok(hex(&s.snapshot))
    })
    .await;
    st.metrics.snapshot(r.is_ok());
    let u = st
        .uploads
        .end_commit(&id, r.clone().map_err(|f| f.message))
        .ok_or_else(|| Failure::new(404, "no_backup", "the backup was dropped meanwhile"))?;
    r?;
    tracing::info!(backup = %id, snapshot = ?u.snapshot, "snapshot committed from the browser");
    Ok(Json(json!({"backup": u})))
}

/// Checks that `server` is `host:port`.
fn check_server(server: &str) -> Result<(), Failure> {
    let server = server.trim();
    let e = || {
        bad(
            "bad_server",
            format!(
                "{server:?} is not a backup server address: use host:port, e.g. 127.0.0.1:1256"
            ),
        )
    };
    let (host, port) = server.rsplit_once(':').ok_or_else(e)?;
    if host.is_empty() || host.len() > 253 || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(e());
    }
    Ok(())
}

#[derive(Deserialize)]
struct TestReq {
    #[serde(default)]
    server: Option<String>,
}

async fn test_connection(
    State(st): State<AppState>,
    b: Result<Json<TestReq>, JsonRejection>,
) -> Result<Json<Value>, Failure> {
    let r = body(b)?;
    let server = r
        .server
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| st.settings.default_server.clone());
    check_server(&server)?;
    let s2 = server.clone();
    let r = tokio::task::spawn_blocking(move || probe_server(&s2, Duration::from_secs(3)))
        .await
        .unwrap_or_else(|_| Err("internal error".into()));
    Ok(Json(match r {
        Ok(d) => {
            json!({"ok": true, "server": server, "latency_ms": d.as_secs_f64() * 1e3, "error": null})
        }
        Err(e) => json!({"ok": false, "server": server, "latency_ms": null, "error": e}),
    }))
}

/// Ready when the backup server this device uses (or the default one) answers.
async fn readyz(State(st): State<AppState>) -> Response {
    let server = st
        .repo
        .profile()
        .repository()
        .map(|r| r.server)
        .unwrap_or_else(|_| st.settings.default_server.clone());
    let s2 = server.clone();
    let r = tokio::task::spawn_blocking(move || probe_server(&s2, Duration::from_secs(2)))
        .await
        .unwrap_or_else(|_| Err("internal error".into()));
    match r {
        Ok(_) => Json(json!({"ready": true, "server": server})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "server": server, "error": e})),
        )
            .into_response(),
    }
}

async fn ws(State(st): State<AppState>, up: WebSocketUpgrade) -> Response {
    up.on_upgrade(move |socket| ws_session(socket, st))
}

async fn ws_session(mut socket: WebSocket, st: AppState) {
    let mut rx = st.uploads.subscribe();
    let mut shutdown = st.shutdown.clone();
    let hello = json!({"type": "backups", "backups": st.uploads.open()});
    if socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(v) => {
                    if socket.send(Message::Text(v.to_string().into())).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let v = json!({"type": "backups", "backups": st.uploads.open()});
                    if socket.send(Message::Text(v.to_string().into())).await.is_err() {
                        return;
                    }
                }
                Err(_) => return,
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            _ = shutdown.changed() => {
                let _ = socket.send(Message::Close(None)).await;
                return;
            }
        }
    }
}

/// Connects and sends a RECONNECT for a name nobody has: a v3 server answers 1606.
pub fn probe_server(server: &str, timeout: Duration) -> Result<Duration, String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let t0 = Instant::now();
    let addr = server
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {server}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {server}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot reach the backup server at {server}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut req = Vec::new();
    let probe_name = format!("probe-{:08x}", rand::random::<u32>());
    cyberbackup_protocol::v3::message::encode_name_request(
        &mut req,
        &[0; 16],
        cyberbackup_protocol::v3::RequestCode::Reconnect,
        &probe_name,
    )
    .map_err(|e| e.to_string())?;
    s.write_all(&req)
        .map_err(|e| format!("the backup server closed the connection: {e}"))?;
    let mut h = [0u8; 7];
    s.read_exact(&mut h)
        .map_err(|e| format!("{server} did not answer like a CyberBackup server: {e}"))?;
    let h = cyberbackup_protocol::v3::ResponseHeader::parse(&h).map_err(|e| e.to_string())?;
    if h.version != 3 || u16::from(h.code) < 1600 || u16::from(h.code) > 1607 {
        return Err(format!("{server} does not speak CyberBackup v3"));
    }
    Ok(t0.elapsed())
}

#[cfg(test)]
mod openapi_tests {
    /// Every API route the router serves is in openapi.json with its methods, and
    /// every path there is served: the document cannot drift from the code.
    #[test]
    fn the_openapi_document_matches_the_routes() {
        let spec: serde_json::Value = serde_json::from_str(super::OPENAPI).unwrap();
        let paths = spec["paths"].as_object().unwrap();
        let src = include_str!("api.rs");
        let mut served = std::collections::BTreeMap::new();
        let router = &src[src.find("Router::new()").unwrap()..src.find(".fallback(").unwrap()];
        for piece in router.split(".route(").skip(1) {
            let rest = piece.trim_start().strip_prefix('"').unwrap();
            let (path, handlers) = rest.split_once('"').unwrap();
            if matches!(path, "/" | "/app.js" | "/style.css") {
                continue;
            }
            let methods: Vec<&str> = ["get", "post", "put", "delete"]
                .into_iter()
                .filter(|m| handlers.contains(&format!("{m}(")))
                .collect();
            served.insert(path.to_string(), methods);
        }
        // The login route is the auth layer's, not the router's.
        served.insert("/api/login".into(), vec!["post"]);
        for (path, methods) in &served {
            let doc = paths
                .get(path)
                .unwrap_or_else(|| panic!("{path} is served but not in openapi.json"));
            for m in methods {
                assert!(doc.get(*m).is_some(), "{m} {path} is not in openapi.json");
            }
        }
        for path in paths.keys() {
            assert!(
                served.contains_key(path),
                "openapi.json has {path}, which is not served"
            );
        }
    }
}
