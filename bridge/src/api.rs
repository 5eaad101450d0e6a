//! The HTTP API, the WebSocket and the embedded UI.
//!
//! Every error is JSON, `{"error": "a sentence for a person", "code": "for_scripts"}`,
//! with a 4xx status for the caller's mistakes and 5xx for the backup server's.
//! The machine-readable description is `openapi.json`, served at `/api/openapi.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use cyberbackup_client::ClientError;
use cyberbackup_protocol::v3::name;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::jobs::{Job, Jobs};

/// Settings the handlers need.
#[derive(Debug, Clone)]
pub struct Settings {
    pub default_server: String,
    pub max_upload_bytes: u64,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub jobs: Arc<Jobs>,
    pub settings: Arc<Settings>,
    /// Turns true when the bridge shuts down: WebSockets close so that the graceful
    /// shutdown does not wait on them forever.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// A JSON error response.
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    job: Option<Box<Job>>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            job: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.message, "code": self.code});
        if let Some(j) = self.job {
            body["job"] = json!(*j);
        }
        (self.status, Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError::new(
            r.status(),
            "bad_request",
            format!("the request body is not valid: {}", r.body_text()),
        )
    }
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
        .route("/api/config", get(config))
        .route("/api/jobs", post(create_job).get(list_jobs))
        .route("/api/jobs/{id}", get(get_job))
        .route("/api/jobs/{id}/content", put(upload_content))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route("/api/test-connection", post(test_connection))
        .route("/api/ws", get(ws))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such page or endpoint",
            )
        })
        // JSON requests are small; file bytes go through the streamed PUT, which reads
        // the body itself and bounds it by the announced size.
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(state)
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

async fn config(State(st): State<AppState>) -> Json<Value> {
    Json(json!({
        "default_server": st.settings.default_server,
        "max_upload_bytes": st.settings.max_upload_bytes,
    }))
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.jobs.metrics.render(),
    )
        .into_response()
}

/// The server a request names (trimmed), else the bridge's default; checked.
fn pick_server(named: Option<String>, st: &AppState) -> Result<String, ApiError> {
    let server = named
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| st.settings.default_server.clone());
    check_server(&server)?;
    Ok(server)
}

/// Checks that `server` is `host:port`.
fn check_server(server: &str) -> Result<(), ApiError> {
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_server",
            format!(
                "{server:?} is not a backup server address: use host:port, e.g. 127.0.0.1:1256"
            ),
        )
    };
    let (host, port) = server.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.len() > 253 || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

#[derive(Deserialize)]
struct NewJob {
    #[serde(default)]
    server: Option<String>,
    user: String,
    name: String,
    size: u64,
}

async fn create_job(
    State(st): State<AppState>,
    body: Result<Json<NewJob>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let server = pick_server(req.server, &st)?;
    name::check_user_name(req.user.as_bytes()).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_user",
            format!("the user name {:?} cannot be used: {e}", req.user),
        )
    })?;
    name::check_file_name(req.name.as_bytes()).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_name",
            format!("the file name {:?} cannot be backed up: {e}", req.name),
        )
    })?;
    if req.size > st.settings.max_upload_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "{} is {} bytes; the largest file this bridge accepts is {} bytes",
                req.name, req.size, st.settings.max_upload_bytes
            ),
        ));
    }
    let job = st.jobs.create(server, req.user, req.name, req.size);
    tracing::info!(job = %job.id, file = %job.file, size = job.size, "job created");
    Ok((StatusCode::CREATED, Json(json!({"job": job}))).into_response())
}

async fn list_jobs(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut jobs = st.jobs.active();
    let active: std::collections::HashSet<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let history =
        st.jobs.store.history(200).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "store", e.to_string())
        })?;
    jobs.extend(history.into_iter().filter(|j| !active.contains(&j.id)));
    Ok(Json(json!({"jobs": jobs})))
}

async fn get_job(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    st.jobs
        .get(&id)
        .map(|j| Json(json!({"job": j})))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_job",
                format!("there is no job {id}"),
            )
        })
}

async fn cancel_job(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match st.jobs.cancel(&id) {
        Some(j) => Ok(Json(json!({"job": j}))),
        None => match st.jobs.get(&id) {
            Some(j) => Err(ApiError {
                job: Some(Box::new(j)),
                ..ApiError::new(
                    StatusCode::CONFLICT,
                    "finished",
                    "this job has already finished",
                )
            }),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "no_job",
                format!("there is no job {id}"),
            )),
        },
    }
}

/// The HTTP status and code for a failed upload.
fn failure(e: &ClientError) -> (StatusCode, &'static str) {
    match e {
        ClientError::Unreachable { .. } | ClientError::BadAddress { .. } => {
            (StatusCode::BAD_GATEWAY, "unreachable")
        }
        ClientError::ConnectionLost(_) => (StatusCode::BAD_GATEWAY, "connection_lost"),
        ClientError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        ClientError::NameTaken(_) => (StatusCode::CONFLICT, "name_taken"),
        ClientError::Rejected(_) => (StatusCode::BAD_GATEWAY, "rejected"),
        ClientError::ServerError(_) => (StatusCode::BAD_GATEWAY, "server_error"),
        ClientError::Protocol(_) => (StatusCode::BAD_GATEWAY, "not_cyberbackup"),
        ClientError::ChecksumFailed { .. } => (StatusCode::BAD_GATEWAY, "checksum_failed"),
        ClientError::Cancelled => (StatusCode::CONFLICT, "cancelled"),
        ClientError::BadInput { .. } | ClientError::File { .. } => {
            (StatusCode::BAD_REQUEST, "incomplete_body")
        }
        ClientError::BadIdentity { .. }
        | ClientError::Crypto(_)
        | ClientError::Congestion { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

async fn upload_content(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(job) = st.jobs.get(&id) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no_job",
            format!("there is no job {id}"),
        ));
    };
    let len = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "length_required",
                "send the file with a Content-Length header equal to its size",
            )
        })?;
    if len != job.size {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "size_mismatch",
            format!(
                "the job announced {} bytes but the request carries {len}",
                job.size
            ),
        ));
    }
    let (job, cancel) = st
        .jobs
        .start(&id)
        .map_err(|m| ApiError::new(StatusCode::CONFLICT, "not_pending", m))?;
    // A few chunks in flight at most: the browser is slowed to the backup server's pace.
    let (tx, rx) = mpsc::channel(8);
    let jobs = st.jobs.clone();
    let job2 = job.clone();
    let cancel2 = cancel.clone();
    let upload = tokio::task::spawn_blocking(move || jobs.run_upload(&job2, cancel2, rx));
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                received += c.len() as u64;
                if tx.send(c).await.is_err() {
                    break; // the upload ended (error or cancel); its outcome says why
                }
            }
            Err(e) => {
                tracing::info!(job = %id, error = %e, "the browser stopped sending");
                cancel.cancel();
                break;
            }
        }
    }
    drop(tx);
    let outcome = upload.await.map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the upload task failed",
        )
    })?;
    tracing::info!(job = %id, status = outcome.job.status.as_str(), received, "job finished");
    match outcome.error {
        None => Ok(Json(json!({"job": outcome.job})).into_response()),
        Some(e) => {
            let (status, code) = failure(&e);
            Err(ApiError {
                job: Some(Box::new(outcome.job)),
                ..ApiError::new(status, code, e.report())
            })
        }
    }
}

#[derive(Deserialize)]
struct TestReq {
    #[serde(default)]
    server: Option<String>,
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

async fn test_connection(
    State(st): State<AppState>,
    body: Result<Json<TestReq>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(req) = body?;
    let server = pick_server(req.server, &st)?;
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

async fn readyz(State(st): State<AppState>) -> Response {
    let server = st.settings.default_server.clone();
    let r = tokio::task::spawn_blocking(move || probe_server(&server, Duration::from_secs(2)))
        .await
        .unwrap_or_else(|_| Err("internal error".into()));
    match r {
        Ok(_) => Json(json!({"ready": true, "server": st.settings.default_server})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "server": st.settings.default_server, "error": e})),
        )
            .into_response(),
    }
}

async fn ws(State(st): State<AppState>, up: WebSocketUpgrade) -> Response {
    up.on_upgrade(move |socket| ws_session(socket, st))
}

async fn ws_session(mut socket: WebSocket, st: AppState) {
    let mut rx = st.jobs.subscribe();
    let mut shutdown = st.shutdown.clone();
    let snapshot = json!({"type": "snapshot", "jobs": st.jobs.active()});
    if socket
        .send(Message::Text(snapshot.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(job) => {
                    let msg = json!({"type": "job", "job": job}).to_string();
                    if socket.send(Message::Text(msg.into())).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    let snapshot = json!({"type": "snapshot", "jobs": st.jobs.active()});
                    if socket.send(Message::Text(snapshot.to_string().into())).await.is_err() {
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
        for line in src.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix(".route(\"") else {
                continue;
            };
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
