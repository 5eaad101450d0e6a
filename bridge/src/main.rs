//! `cyberbackup-bridge`: the user's own agent. It holds their device key and, once
//! unlocked, their repository key, and serves the browser UI and its HTTP + WebSocket
//! API: status, backups of files and folders from the browser, snapshots to browse,
//! download, diff, restore and forget, and devices. See `--help` and README.md.
//!
//! # Layout
//! - [`api`]: routes, handlers, WebSocket, the embedded UI and OpenAPI document.
//! - [`auth`]: the sign-in token and session cookie, Host and Origin checks, and the
//!   security headers of every response.
//! - [`repo`]: the v4 repository: device, connection, opened key, loaded trees.
//! - [`uploads`]: backups from the browser, file by file, resumable, one snapshot each.
//! - [`metrics`]: Prometheus metrics.
//! - [`tls`]: optional TLS (rustls) for a bridge reached over a network.

mod api;
mod auth;
mod metrics;
mod repo;
mod tls;
mod uploads;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;

/// The CyberBackup bridge: serves the browser UI and its API, and backs files and
/// folders up to your CyberBackup repository on the browser's behalf.
#[derive(Debug, Parser)]
#[command(name = "cyberbackup-bridge", version, about, long_about = None)]
struct Args {
    /// Address to serve HTTP on (use 0.0.0.0:9090 to serve other machines).
    #[arg(
        long,
        env = "CYBERBACKUP_BRIDGE_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    listen: SocketAddr,
    /// The backup server offered when this device is set up from the browser (and
    /// checked by /readyz until then).
    #[arg(long, env = "CYBERBACKUP_SERVER", default_value = "127.0.0.1:1256")]
    server: String,
    /// The device's config directory (device key, pinned server keys, repository),
    /// shared with the `cyberbackup` CLI [default: $XDG_CONFIG_HOME/cyberbackup or
    /// ~/.config/cyberbackup].
    #[arg(long, env = "CYBERBACKUP_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// Read the repository passphrase from this file at start, so the bridge starts
    /// unlocked (else the page asks for it).
    #[arg(long, env = "CYBERBACKUP_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// Largest file a browser may back up, in bytes.
    #[arg(long, env = "CYBERBACKUP_BRIDGE_MAX_FILE_BYTES", default_value_t = 1 << 40)]
    max_file_bytes: u64,
    /// A file holding the sign-in token (at least 16 characters) [default: a new
    /// random one at each start]. The bridge prints a link that signs in with it.
    #[arg(long, env = "CYBERBACKUP_BRIDGE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Another host name the bridge answers to (repeatable; it always answers to
    /// localhost, 127.0.0.1, `[::1]` and its listen address, with its port). Requests
    /// naming any other host are refused, so a web page cannot reach the bridge by
    /// rebinding a DNS name to 127.0.0.1.
    #[arg(
        long = "allow-host",
        value_name = "NAME",
        env = "CYBERBACKUP_BRIDGE_ALLOW_HOST",
        value_delimiter = ','
    )]
    allow_hosts: Vec<String>,
    /// Serve HTTPS with this certificate chain (PEM), for a bridge reached over a
    /// network; needs --tls-key.
    #[arg(long, env = "CYBERBACKUP_BRIDGE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "CYBERBACKUP_BRIDGE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Log filter (RUST_LOG also works).
    #[arg(long, env = "CYBERBACKUP_LOG", default_value = "info")]
    log: String,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("cyberbackup-bridge: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args = Args::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| args.log.clone());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).context("bad --log filter")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let token = match &args.token_file {
        Some(p) => {
            let t = std::fs::read_to_string(p)
                .with_context(|| format!("reading the token file {}", p.display()))?
                .trim()
                .to_owned();
            if t.len() < 16 || !t.bytes().all(|b| b.is_ascii_graphic()) {
                anyhow::bail!(
                    "the token in {} must be at least 16 printable characters, without spaces",
                    p.display()
                );
            }
            t
        }
        None => auth::random_token(),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls::config(c, k)?),
        _ => None,
    };
    let dir = match &args.config_dir {
        Some(d) => d.clone(),
        None => cyberbackup_client::v4::profile::default_dir()?,
    };
    let repo = Arc::new(repo::Repo::new(dir.clone()));
    if let Some(p) = &args.password_file {
        let pass = std::fs::read(p)
            .with_context(|| format!("reading the passphrase file {}", p.display()))?;
        let pass = String::from_utf8_lossy(&pass)
            .trim_end_matches(['\n', '\r'])
            .to_owned();
        repo.unlock(pass.as_bytes())
            .map_err(|f| anyhow::anyhow!("{} ({})", f.message, f.detail.unwrap_or_default()))?;
        tracing::info!("repository unlocked with the passphrase file");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state = api::AppState {
        shutdown: stop_rx,
        repo,
        uploads: Arc::new(uploads::Uploads::default()),
        metrics: Arc::new(metrics::Metrics::default()),
        settings: Arc::new(api::Settings {
            default_server: args.server.clone(),
            max_file_bytes: args.max_file_bytes,
        }),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr()?;
        let auth = auth::Auth::new(
            token.clone(),
            &addr.ip().to_string(),
            addr.port(),
            &args.allow_hosts,
            tls.is_some(),
        );
        tracing::info!(%addr, config = %dir.display(), "bridge ready");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let link_host = if addr.ip().is_unspecified() {
            format!("127.0.0.1:{}", addr.port())
        } else {
            addr.to_string()
        };
        {
            // One write, and no panic when nobody reads standard output any more.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = write!(
                out,
                "cyberbackup-bridge listening on {scheme}://{addr}/\nopen {scheme}://{link_host}/?token={token} to sign in\n"
            );
            let _ = out.flush();
        }
        let app = api::router(state)
            .layer(axum::middleware::from_fn_with_state(auth, auth::guard));
        match tls {
            None => axum::serve(listener, app)
                .with_graceful_shutdown(shutdown(stop_tx))
                .await
                .context("serving HTTP"),
            Some(cfg) => axum::serve(tls::TlsListener::new(listener, cfg)?, app)
                .with_graceful_shutdown(shutdown(stop_tx))
                .await
                .context("serving HTTPS"),
        }
    })
}

/// Resolves on SIGINT or SIGTERM, after telling the WebSockets to close.
async fn shutdown(stop_tx: tokio::sync::watch::Sender<bool>) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
}
