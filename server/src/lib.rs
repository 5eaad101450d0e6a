//! The CyberBackup server.
//!
//! # Layout
//! - [`config`]: flags, environment, TOML file and port.info, checked into a `Config`.
//! - [`admin`]: the administrative commands (accounts, quotas, enrolment codes,
//!   devices, gc, scrub, status, key, check-config) and the admin socket through which
//!   they reach a running server.
//! - [`admin_http`]: the admin HTTP listener: Prometheus metrics, `/healthz`, `/readyz`.
//! - [`metrics`]: the server's metrics, updated where the work happens.
//! - [`datadir`]: one server per data directory (a held lock naming its pid) and per
//!   port.
//! - [`conn`]: the connection driver both runtimes share (buffer, session, next step).
//! - [`glommio_rt`]: the io_uring runtime, one executor and SO_REUSEPORT listener per
//!   shard; it only moves bytes between sockets and the protocol session.
//! - [`mio_rt`]: the epoll fallback, same shape, chosen where io_uring cannot run.
//! - [`ops`]: runs the session's registry and storage operations off the reactor.
//! - [`storage`]: temp files for reassembly (direct I/O for large ones), atomic and
//!   durable finalize, the run marker that tells a crash.
//! - [`registry`]: the SQLite registry of clients and files, on its own thread.
//! - [`notify`]: readiness and stopping notifications to systemd (sd_notify).
//! - [`shutdown`]: the shutdown flag, the connection count, shard start-up and end.
//! - [`queue`]: draining a channel in batches (group commit).
//! - [`repo`]: the protocol v4 repository: encrypted chunks and snapshots in a blob
//!   store, their metadata in a registry, group commit, garbage collection and scrub.
//! - [`legacy`]: read-only access to the v3 store for v4 connections that proved a v3
//!   identity (legacy list, restore and import).
//! - [`v4ops`]: runs the v4 session's ops against the repository; reason codes.
//! - [`server_key`]: the server's static X25519 key, made on first start.
//!
//! The protocol itself (codecs, crypto, the per-connection state machine) lives in the
//! `cyberbackup-protocol` crate.

pub mod admin;
pub mod admin_http;
pub mod config;
pub mod conn;
pub mod datadir;
pub mod glommio_rt;
pub mod legacy;
pub mod metrics;
pub mod mio_rt;
pub mod notify;
pub mod ops;
pub mod queue;
pub mod registry;
pub mod repo;
pub mod server_key;
pub mod shutdown;
pub mod storage;
pub mod v4ops;

use std::sync::Arc;

use anyhow::{Context, Result};
use config::RuntimeKind;

/// Opens storage and registry, starts the shards, and returns when they have stopped
/// (after a signal, with in-flight files finished or discarded).
pub fn run(cfg: config::Config) -> Result<()> {
    // Before anything touches the data: a second server on it exits here.
    let _lock = datadir::lock(&cfg.storage)?;
    datadir::check_port(cfg.listen)?;
    let admin_listener = cfg.admin_listen.map(admin_http::bind).transpose()?;
    let storage = Arc::new(
        storage::Storage::open(&cfg.storage, cfg.max_pending_bytes)
            .with_context(|| format!("opening storage {}", cfg.storage.display()))?
            .with_direct_io(cfg.direct_io_min_size),
    );
    let (registry, registry_thread) = registry::Registry::open(&cfg.database)?;
    if storage.unclean_start() {
        let r = registry::reconcile(&cfg.database, storage.root())?;
        tracing::warn!(
            files = r.files,
            rows_written = r.rows_written,
            "the last run did not end cleanly; checked the registry against the stored files"
        );
    }
    // From here until the shards start nothing is in flight: a start that fails
    // removes the run marker, so that the next start does not take it for a crash.
    let mut setup = CloseIfSetupFails(Some(storage.clone()));
    let shutdown = Arc::new(shutdown::Shutdown::default());
    shutdown
        .install_signal_handlers()
        .context("installing signal handlers")?;
    tracing::info!(
        storage = %cfg.storage.display(),
        database = %cfg.database.display(),
        max_connections = cfg.max_connections,
        pack_below = cfg.pack_below,
        "starting"
    );
    let repo = repo::Repo::open(
        &cfg.repository,
        cfg.registry.as_deref(),
        cfg.registry_connections,
        cfg.s3.as_ref(),
    )
    .with_context(|| format!("opening the v4 repository {}", cfg.repository.display()))?;
    repo.set_pack_below(cfg.pack_below);
    if cfg.registry.is_some() && cfg.s3.is_none() {
        tracing::warn!(
            "a PostgreSQL registry with the blobs in this node's own directory: run one node \
             on this database, or keep the blobs in an object store (--s3-endpoint)"
        );
    }
    let started = std::time::Instant::now();
    let key_path = cfg.repository.join("server.key");
    // Nodes sharing a registry serve with one key, the one clients pin: a node without
    // it does not make a key of its own, and one with another key does not serve.
    let fp = cyberbackup_protocol::v4::noise::fingerprint;
    if !key_path.exists() {
        if let Some(cluster) = repo.cluster_key()? {
            anyhow::bail!(
                "{} is missing, and the nodes sharing this registry serve with key {}: copy \
                 server.key from one of them (docs/DEPLOYMENT.md)",
                key_path.display(),
                fp(&cluster)
            );
        }
    }
    let key = server_key::load_or_create(&key_path)?;
    if let Some(cluster) = repo.claim_server_key(key.public())? {
        anyhow::bail!(
            "{} is key {}, but the nodes sharing this registry serve with key {}: copy \
             server.key from one of them (docs/DEPLOYMENT.md)",
            key_path.display(),
            fp(key.public()),
            fp(&cluster)
        );
    }
    tracing::info!(
        repository = %cfg.repository.display(),
        registry = if cfg.registry.is_some() { "postgresql" } else { "sqlite" },
        blobs = if cfg.s3.is_some() { "s3" } else { "files" },
        key = %cyberbackup_protocol::v4::noise::fingerprint(key.public()),
        "v4 server key (clients pin it on first use)"
    );
    let mut v4_session = cyberbackup_protocol::v4::server::ServerConfig::new(key);
    v4_session.window = cfg.v4_window;
    let svc_storage = storage.clone();
    let admin_registry = registry.clone();
    let svc = ops::Services {
        committer: storage.start_committer(),
        storage,
        registry,
        group_commit_max_size: cfg.group_commit_max_size,
        v4: v4ops::V4Services {
            repo: Arc::new(repo),
            registration: cfg.registration,
            legacy: Arc::new(legacy::LegacyStore::new(&cfg.database, &cfg.storage)),
            gc_grace: cfg.gc_grace,
        },
        v4_session: Arc::new(v4_session),
    };
    let admin_state = Arc::new(admin_http::AdminState {
        shutdown: shutdown.clone(),
        repo: (*svc.v4.repo).clone(),
        registry: std::sync::Mutex::new(Some(admin_registry)),
        storage: cfg.storage.clone(),
        repository: cfg.repository.clone(),
        per_account: cfg.metrics_per_account,
    });
    let admin_http = match admin_listener {
        Some(l) => Some(admin_http::start(l, admin_state.clone())?),
        None => None,
    };
    let _admin_socket = admin::serve(
        &cfg.admin_socket,
        (*svc.v4.repo).clone(),
        Arc::new(admin::ServerInfo {
            shutdown: shutdown.clone(),
            started,
            listen: cfg.listen,
            admin_http,
        }),
    )?;
    if let Some(a) = admin_http {
        tracing::info!(addr = %a, "admin listener: /metrics, /healthz, /readyz");
    }
    let gc = cfg.gc_interval.map(|every| {
        let (repo, sd, grace) = (svc.v4.repo.clone(), shutdown.clone(), cfg.gc_grace);
        std::thread::Builder::new()
            .name("v4-gc".into())
            .spawn(move || collect_every(&repo, every, grace, &sd))
    });
    let runtime = match cfg.runtime {
        RuntimeKind::Mio => RuntimeKind::Mio,
        RuntimeKind::Glommio => {
            glommio_rt::probe().context(
                "io_uring (glommio) cannot run on this host; use --runtime mio (or auto)",
            )?;
            RuntimeKind::Glommio
        }
        RuntimeKind::Auto => match glommio_rt::probe() {
            Ok(()) => RuntimeKind::Glommio,
            Err(e) => {
                tracing::warn!(
                    reason = %format!("{e:#}"),
                    "io_uring (glommio) cannot run on this host; falling back to the mio (epoll) runtime"
                );
                RuntimeKind::Mio
            }
        },
    };
    let cfg = Arc::new(cfg);
    setup.0 = None;
    let result = match runtime {
        RuntimeKind::Mio => mio_rt::run(cfg, svc, shutdown),
        _ => glommio_rt::run(cfg, svc, shutdown),
    };
    // After a shard panicked, its tasks may still hold the registry's channel: the
    // registry thread would wait for them forever. Everything acknowledged is already
    // in the database (a client's ACK waits for its row).
    if let Some(Ok(t)) = gc {
        let _ = t.join();
    }
    // The registry thread ends when its last handle goes: the probes' one too.
    admin_state
        .registry
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if result.is_ok() {
        registry_thread.join();
    }
    if result.is_ok() {
        svc_storage.close();
        tracing::info!("stopped");
    }
    result
}

/// Removes the run marker when dropped while still holding the storage: the start
/// failed before anything could be in flight.
struct CloseIfSetupFails(Option<Arc<storage::Storage>>);

impl Drop for CloseIfSetupFails {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.close();
        }
    }
}

/// Collects the v4 repository's unreferenced chunks every `every` while the server
/// runs (until shutdown). Collection is safe against backups in flight: it keeps every
/// chunk stored or asked about within `grace`, takes the repository's collection lock
/// only while it deletes, and a commit naming a chunk it removed is refused, never
/// accepted incomplete (see [`repo`]).
fn collect_every(
    repo: &repo::Repo,
    every: std::time::Duration,
    grace: std::time::Duration,
    shutdown: &shutdown::Shutdown,
) {
    let tick = std::time::Duration::from_millis(100).min(every);
    let mut next = std::time::Instant::now() + every;
    while !shutdown.is_triggered() {
        std::thread::sleep(tick);
        if std::time::Instant::now() < next {
            continue;
        }
        next = std::time::Instant::now() + every;
        match repo.collect_garbage(repo::Scope::All, grace, repo::now_unix_ms()) {
            Ok(r) => {
                if r.chunks_deleted
                    + r.orphan_chunk_blobs
                    + r.orphan_bodies
                    + r.packs_deleted
                    + r.orphan_packs
                    > 0
                {
                    tracing::info!(
                        chunks = r.chunks_deleted,
                        bytes = r.bytes_freed,
                        orphan_blobs = r.orphan_chunk_blobs,
                        orphan_bodies = r.orphan_bodies,
                        packs_deleted = r.packs_deleted,
                        packs_repacked = r.packs_repacked,
                        orphan_packs = r.orphan_packs,
                        "v4 collection freed space"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "v4 collection failed"),
        }
    }
}
