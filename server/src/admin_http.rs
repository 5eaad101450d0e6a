//! The admin HTTP listener (`--admin-listen`, 127.0.0.1:9256 by default): Prometheus
//! metrics at `/metrics`, and the probes Kubernetes and load balancers expect.
//!
//! - `/healthz`: 200 while the process serves (it answers at all).
//! - `/readyz`: 200 when it should be sent work: not draining, the v3 storage directory
//!   takes a new file, the v4 blob store takes writes (its directory a new file, or its
//!   object store's bucket answers), and both registries answer. Otherwise
//!   503 with one line per failed check.
//!
//! It is read-only and answers GET and HEAD only; the administrative commands that
//! change things go through the admin socket ([`crate::admin`]), which file
//! permissions protect. One thread accepts; each request gets its own short-lived
//! thread (at most [`MAX_CLIENTS`] at once), five seconds in all to send its head (at
//! most [`MAX_HEAD`] bytes), and the connection closes after the answer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::metrics::{metrics, AccountUsage, Scrape};
use crate::repo::Repo;
use crate::shutdown::Shutdown;

/// Longest request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// Requests served at once; more get 503 at once.
pub const MAX_CLIENTS: usize = 64;
/// Time a client has to send its head, and a check has to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The admin listener's bound address, once it listens (printed after the
/// "listening on" line).
pub static ADDR: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

/// What the probes and the scrape look at.
pub struct AdminState {
    pub shutdown: Arc<Shutdown>,
    pub repo: Repo,
    /// The v3 registry's handle; taken away at shutdown, so that the registry thread
    /// (which ends when its last handle goes) can finish.
    pub registry: std::sync::Mutex<Option<crate::registry::Registry>>,
    pub storage: PathBuf,
    pub repository: PathBuf,
    pub per_account: bool,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// Binds the admin listener (before the server touches its data, so that a taken
/// address stops a start cleanly).
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| {
        format!(
            "cannot open the admin listener on {addr} (another server's? set --admin-listen to another address, or off)"
        )
    })
}

/// Serves `listener` on its own thread until the process exits. Returns the bound
/// address (port 0 picks one).
pub fn start(listener: TcpListener, state: Arc<AdminState>) -> Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let _ = ADDR.set(bound);
    let busy = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("admin-http".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    busy.fetch_sub(1, Ordering::SeqCst);
                    let _ = respond(&stream, 503, "text/plain", "busy\n", false);
                    continue;
                }
                let (state, held) = (state.clone(), busy.clone());
                let spawned = std::thread::Builder::new()
                    .name("admin-http-req".into())
                    .spawn(move || {
                        serve(stream, &state);
                        held.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    busy.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .context("starting the admin listener's thread")?;
    Ok(bound)
}

/// Reads one request head and answers it.
fn serve(mut stream: TcpStream, state: &AdminState) {
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut buf = vec![0u8; MAX_HEAD];
    let mut len = 0;
    let (method, path, openmetrics) = loop {
        if len == buf.len() {
            let _ = respond(
                &stream,
                431,
                "text/plain",
                "request head too large\n",
                false,
            );
            return;
        }
        // The whole head within the deadline: a byte now and then does not keep a slot.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                let openmetrics = req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("accept")
                        && String::from_utf8_lossy(h.value).contains("application/openmetrics-text")
                });
                break (
                    req.method.unwrap_or("").to_owned(),
                    req.path.unwrap_or("").to_owned(),
                    openmetrics,
                );
            }
            Ok(httparse::Status::Partial) => continue,
            Err(e) => {
                let _ = respond(
                    &stream,
                    400,
                    "text/plain",
                    &format!("bad request: {e}\n"),
                    false,
                );
                return;
            }
        }
    };
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let _ = respond(
            &stream,
            405,
            "text/plain",
            "only GET and HEAD: this listener is read-only (admin commands use the admin socket)\n",
            false,
        );
        return;
    }
    let path = path.split('?').next().unwrap_or("");
    let (status, ctype, body) = match path {
        "/metrics" if openmetrics => (
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics().render(&scrape(state)),
        ),
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            prometheus_text(&metrics().render(&scrape(state))),
        ),
        "/healthz" => (200, "text/plain", "ok\n".to_owned()),
        "/readyz" => {
            let failed = readiness(state);
            if failed.is_empty() {
                (200, "text/plain", "ready\n".to_owned())
            } else {
                (503, "text/plain", failed.join("\n") + "\n")
            }
        }
        _ => (
            404,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".to_owned(),
        ),
    };
    let _ = respond(&stream, status, ctype, &body, head_only);
}

fn respond(
    mut stream: &TcpStream,
    status: u16,
    ctype: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Service Unavailable",
    };
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out)?;
    stream.flush()
}

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition, for scrapers that
/// do not ask for OpenMetrics (and `promtool check metrics`): a counter's family is
/// named with its `_total` suffix, and the `# UNIT` and `# EOF` lines go.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    out.push_str(&format!("{prefix}{name}_total {tail}"));
                } else {
                    out.push_str(line);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Runs `f` on its own thread and waits at most [`TIMEOUT`] for it: a wedged disk or
/// registry makes the probe fail, not hang.
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("admin-check".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .ok()?;
    rx.recv_timeout(TIMEOUT).ok()
}

/// Whether a new file can be made (and removed) in `dir`.
fn writable(dir: &std::path::Path) -> std::io::Result<()> {
    let p = dir.join(format!(".readyz-{}", std::process::id()));
    std::fs::write(&p, b"")?;
    std::fs::remove_file(&p)
}

/// The readiness checks that failed (empty: ready).
pub fn readiness(state: &AdminState) -> Vec<String> {
    let mut failed = Vec::new();
    if state.shutdown.is_triggered() {
        failed.push("draining: the server is shutting down".to_owned());
    }
    // Where new files go: v3 temp files; v4 blobs (a directory, or an object store).
    let dir = state.storage.join(".incoming");
    match within(move || writable(&dir)) {
        Some(Ok(())) => {}
        Some(Err(e)) => failed.push(format!("storage not writable: {e}")),
        None => failed.push(format!("storage: no answer within {TIMEOUT:?}")),
    }
    let repo = state.repo.clone();
    match within(move || repo.store_ready()) {
        Some(Ok(())) => {}
        Some(Err(e)) => failed.push(format!("v4 blob store: {e}")),
        None => failed.push(format!("v4 blob store: no answer within {TIMEOUT:?}")),
    }
    let repo = state.repo.clone();
    match within(move || repo.ping()) {
        Some(Ok(())) => {}
        Some(Err(e)) => failed.push(format!("v4 registry: {e}")),
        None => failed.push(format!("v4 registry: no answer within {TIMEOUT:?}")),
    }
    let reg = state
        .registry
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match reg.map(|reg| within(move || futures_lite::future::block_on(reg.ping()))) {
        Some(Some(Ok(()))) => {}
        Some(Some(Err(e))) => failed.push(format!("v3 registry: {e}")),
        Some(None) => failed.push(format!("v3 registry: no answer within {TIMEOUT:?}")),
        None => failed.push("v3 registry: closed (shutting down)".to_owned()),
    }
    failed
}

/// The gauges' values now.
fn scrape(state: &AdminState) -> Scrape {
    let mut volumes = Vec::new();
    for (volume, dir) in [
        ("storage", &state.storage),
        ("repository", &state.repository),
    ] {
        if let Some((free, size)) = crate::metrics::volume(dir) {
            volumes.push((volume, free, size));
        }
    }
    let repo = state.repo.clone();
    let per_account = state.per_account;
    let accounts = within(move || account_usage(&repo, per_account))
        .and_then(Result::ok)
        .unwrap_or_default();
    Scrape {
        connections_open: state.shutdown.connections.load(Ordering::Relaxed),
        draining: state.shutdown.is_triggered(),
        volumes,
        accounts,
        per_account,
    }
}

/// Every account's usage; names and last backups only when they are exported.
fn account_usage(repo: &Repo, detail: bool) -> Result<Vec<AccountUsage>, crate::repo::RepoError> {
    let mut out = Vec::new();
    for id in repo.accounts()? {
        let u = repo.usage(id)?;
        let (name, last_backup_ms) = if detail {
            (
                repo.account_name(id)?.unwrap_or_else(|| id.to_string()),
                repo.list_snapshots(id)?
                    .iter()
                    .map(|h| h.committed_ms)
                    .max(),
            )
        } else {
            (String::new(), None)
        };
        out.push(AccountUsage {
            name,
            stored_bytes: u.stored_bytes,
            snapshots: u.snapshots,
            last_backup_ms,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP x_requests Requests.\n# TYPE x_requests counter\n# UNIT x_requests bytes\nx_requests_total 3\n# HELP x_open Open.\n# TYPE x_open gauge\nx_open 1\n# EOF\n";
        assert_eq!(
            super::prometheus_text(om),
            "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total 3\n# HELP x_open Open.\n# TYPE x_open gauge\nx_open 1\n"
        );
    }
}
