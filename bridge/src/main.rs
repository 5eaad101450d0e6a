//! `cyberbackup-bridge`: the HTTP + WebSocket API that serves the browser UI and drives
//! backups through the client library. See `--help` and README.md.
//!
//! # Layout
//! - [`api`]: routes, handlers, WebSocket, the embedded UI and OpenAPI document.
//! - [`auth`]: the sign-in token and session cookie, Host and Origin checks, and the
//!   security headers of every response.
//! - [`jobs`]: backup jobs, streamed from the HTTP body into the client library.
//! - [`store`]: job history and per-user identities in SQLite.
//! - [`metrics`]: Prometheus metrics.

mod api;
mod auth;
mod jobs;
mod metrics;
mod store;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use cyberbackup_client::upload::MAX_FILE_SIZE;
use cyberbackup_client::ConnectOptions;

/// The CyberBackup bridge: serves the browser UI and its API, and backs files up to
/// CyberBackup servers on the browser's behalf.
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
    /// The backup server used when a request names none (and checked by /readyz).
    #[arg(long, env = "CYBERBACKUP_SERVER", default_value = "127.0.0.1:1256")]
    server: String,
    /// Directory for bridge.db (job history and user identities).
    #[arg(long, env = "CYBERBACKUP_BRIDGE_DATA", default_value = "bridge-data")]
    data_dir: PathBuf,
    /// Largest file accepted, in bytes.
    #[arg(long, default_value_t = MAX_FILE_SIZE)]
    max_upload_bytes: u64,
    /// Seconds to wait for a backup server on any read or write.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// A file holding the sign-in token (at least 16 characters) [default: a new
    /// random one at each start]. The bridge prints a link that signs in with it.
    #[arg(long, env = "CYBERBACKUP_BRIDGE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Another host name the bridge answers to (repeatable; it always answers to
    /// localhost, 127.0.0.1, [::1] and its listen address, with its port). Requests
    /// naming any other host are refused, so a web page cannot reach the bridge by
    /// rebinding a DNS name to 127.0.0.1.
    #[arg(
        long = "allow-host",
        value_name = "NAME",
        env = "CYBERBACKUP_BRIDGE_ALLOW_HOST",
        value_delimiter = ','
    )]
    allow_hosts: Vec<String>,
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
    if args.max_upload_bytes > MAX_FILE_SIZE {
        anyhow::bail!("--max-upload-bytes is at most {MAX_FILE_SIZE} (protocol v3)");
    }
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
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let db = args.data_dir.join("bridge.db");
    let store = store::Store::open(&db).with_context(|| format!("opening {}", db.display()))?;
    let jobs = jobs::Jobs::new(
        store,
        metrics::Metrics::default(),
        ConnectOptions {
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(args.timeout.max(1)),
            congestion: None,
        },
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let state = api::AppState {
        shutdown: stop_rx,
        jobs,
        settings: Arc::new(api::Settings {
            default_server: args.server.clone(),
            max_upload_bytes: args.max_upload_bytes,
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
            false,
        );
        tracing::info!(%addr, server = %args.server, data = %args.data_dir.display(), "bridge ready");
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
                "cyberbackup-bridge listening on http://{addr}/\nopen http://{link_host}/?token={token} to sign in\n"
            );
            let _ = out.flush();
        }
        let app = api::router(state)
            .layer(axum::middleware::from_fn_with_state(auth, auth::guard));
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
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
            })
            .await
            .context("serving HTTP")
    })
}
