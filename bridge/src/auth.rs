//! Who may use the bridge, and from where.
//!
//! The bridge holds the user's keys, so every request but the static UI files and the
//! health probes must prove it comes from the user:
//!
//! - **A secret token**, random at each start (or read from `--token-file`), printed as
//!   a link that opens the UI already signed in (the Jupyter way). The link's
//!   `?token=` is exchanged for a **session cookie** (`HttpOnly`, `SameSite=Strict`,
//!   `Secure` under TLS) and the browser is redirected to a URL without it. Scripts
//!   send `Authorization: Bearer TOKEN` instead.
//! - **The Host header** must name the bridge itself (`localhost`, a loopback address
//!   or the listen address, with its port; more with `--allow-host`): a page on another
//!   site that rebinds its DNS name to 127.0.0.1 gets 403, not the API.
//! - **The Origin header**, when a browser sends one (every state-changing request and
//!   every WebSocket), must be the bridge's own origin.
//! - Every response carries a strict Content-Security-Policy, `nosniff`, no referrer
//!   (the token may be in the URL) and no framing.
//!
//! Refusals are JSON like every other error: 401 `unauthorized`, 403 `bad_host` or
//! `bad_origin`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Name of the session cookie.
pub const COOKIE: &str = "cyberbackup_session";

/// The Content-Security-Policy of every response: only the bridge's own scripts,
/// styles and connections (`'self'` covers its WebSocket), no inline code, no framing.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; \
frame-ancestors 'none'";

/// The secret, the sessions it opened, and the hosts the bridge answers to.
pub struct Auth {
    token: String,
    sessions: Mutex<HashSet<String>>,
    /// `host:port` values (lowercase) a request's Host may hold.
    hosts: Vec<String>,
    secure: bool,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// A new random secret: 128 bits, hex.
pub fn random_token() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
    cyberbackup_client::v4::profile::hex(&b)
}

impl Auth {
    /// `port` is the bound port; `listen_host` the bound address; `extra` more host
    /// names (`--allow-host`), with or without a port.
    pub fn new(
        token: String,
        listen_host: &str,
        port: u16,
        extra: &[String],
        secure: bool,
    ) -> Arc<Auth> {
        let mut hosts = Vec::new();
        for h in ["localhost", "127.0.0.1", "[::1]", listen_host] {
            hosts.push(format!("{}:{port}", h.to_ascii_lowercase()));
        }
        for h in extra {
            let h = h.to_ascii_lowercase();
            if h.contains(':') && !h.ends_with(']') {
                hosts.push(h);
            } else {
                hosts.push(format!("{h}:{port}"));
            }
        }
        hosts.sort();
        hosts.dedup();
        Arc::new(Auth {
            token,
            sessions: Mutex::new(HashSet::new()),
            hosts,
            secure,
        })
    }

    fn host_ok(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| self.hosts.iter().any(|a| a.eq_ignore_ascii_case(h)))
    }

    /// An Origin header, if present, must be one of ours.
    fn origin_ok(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let scheme = if self.secure { "https://" } else { "http://" };
        origin
            .strip_prefix(scheme)
            .is_some_and(|h| self.hosts.iter().any(|a| a.eq_ignore_ascii_case(h)))
    }

    fn token_ok(&self, given: &str) -> bool {
        // Constant time in the token's length.
        let (a, b) = (given.as_bytes(), self.token.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    fn signed_in(&self, headers: &HeaderMap) -> bool {
        if let Some(bearer) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        {
            return self.token_ok(bearer.trim());
        }
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        cookies(headers).any(|(k, v)| k == COOKIE && sessions.contains(v))
    }

    /// Opens a session; returns its Set-Cookie value.
    fn open_session(&self) -> String {
        let id = random_token() + &random_token();
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{}",
            if self.secure { "; Secure" } else { "" }
        )
    }
}

fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            Some((k.trim(), v.trim()))
        })
}

fn refuse(status: StatusCode, code: &'static str, message: &str) -> Response {
    (status, Json(json!({"error": message, "code": code}))).into_response()
}

/// Paths anyone who can reach the bridge may get: the UI's static files (which hold
/// no data) and the probes.
fn public(path: &str) -> bool {
    matches!(
        path,
        "/" | "/app.js" | "/style.css" | "/healthz" | "/readyz" | "/favicon.ico"
    )
}

/// The middleware: Host, Origin, sign-in, then the headers every response carries.
pub async fn guard(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let mut resp = check(&auth, req, next).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

async fn check(auth: &Auth, req: Request, next: Next) -> Response {
    let headers = req.headers();
    if !auth.host_ok(headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "bad_host",
            "this bridge does not serve that host name (start it with --allow-host NAME to add one)",
        );
    }
    let changes = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let websocket = headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if (changes || websocket || headers.contains_key(header::ORIGIN)) && !auth.origin_ok(headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "bad_origin",
            "requests from another site are refused",
        );
    }
    let path = req.uri().path().to_owned();
    // The sign-in link: /?token=... sets the session cookie and drops the token from
    // the address bar.
    if path == "/" {
        if let Some(t) = req.uri().query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "token")
                .map(|(_, v)| v.to_owned())
        }) {
            if !auth.token_ok(&t) {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this sign-in link is not valid (the bridge prints a new one at each start)",
                );
            }
            let cookie = auth.open_session();
            let mut r = StatusCode::SEE_OTHER.into_response();
            r.headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/"));
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            return r;
        }
    }
    if path == "/api/login" && req.method() == Method::POST {
        return login(auth, req).await;
    }
    if public(&path) || auth.signed_in(req.headers()) {
        return next.run(req).await;
    }
    refuse(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "sign in with the link the bridge printed when it started (or send Authorization: Bearer TOKEN)",
    )
}

/// `POST /api/login {"token": "..."}`: the sign-in form's way to a session.
async fn login(auth: &Auth, req: Request) -> Response {
    let body = match axum::body::to_bytes(req.into_body(), 4096).await {
        Ok(b) => b,
        Err(_) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "bad_request",
                "the body is too large",
            )
        }
    };
    let token = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["token"].as_str().map(str::to_owned))
        .unwrap_or_default();
    if !auth.token_ok(token.trim()) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "that is not the token this bridge printed",
        );
    }
    let cookie = auth.open_session();
    let mut r = Json(json!({"ok": true})).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hosts_origins_tokens_and_cookies() {
        let a = Auth::new(
            "s3cret".into(),
            "127.0.0.1",
            9090,
            &["nas.lan".into()],
            false,
        );
        assert!(a.host_ok(&headers(&[(header::HOST, "localhost:9090")])));
        assert!(a.host_ok(&headers(&[(header::HOST, "NAS.lan:9090")])));
        assert!(!a.host_ok(&headers(&[(header::HOST, "evil.example:9090")])));
        assert!(!a.host_ok(&headers(&[(header::HOST, "localhost:9091")])));
        assert!(!a.host_ok(&HeaderMap::new()));
        assert!(a.origin_ok(&HeaderMap::new()));
        assert!(a.origin_ok(&headers(&[(header::ORIGIN, "http://127.0.0.1:9090")])));
        assert!(!a.origin_ok(&headers(&[(header::ORIGIN, "https://127.0.0.1:9090")])));
        assert!(!a.origin_ok(&headers(&[(header::ORIGIN, "http://evil.example")])));
        assert!(!a.origin_ok(&headers(&[(header::ORIGIN, "null")])));
        assert!(a.token_ok("s3cret") && !a.token_ok("s3cre") && !a.token_ok("s3creT"));
        assert!(a.signed_in(&headers(&[(header::AUTHORIZATION, "Bearer s3cret")])));
        assert!(!a.signed_in(&headers(&[(header::AUTHORIZATION, "Bearer nope")])));
        let set = a.open_session();
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
        let pair = set.split(';').next().unwrap();
        assert!(a.signed_in(&headers(&[(header::COOKIE, &format!("a=b; {pair}"))])));
        assert!(!a.signed_in(&headers(&[(header::COOKIE, "cyberbackup_session=forged")])));
        assert_eq!(random_token().len(), 32);
        assert_ne!(random_token(), random_token());
    }
}
