//! The CyberBackup server.
//!
//! # Layout
//! - [`config`]: flags, environment, TOML file and port.info, checked into a `Config`.
//! - [`glommio_rt`]: the io_uring runtime, one executor and SO_REUSEPORT listener per
//!   shard; it only moves bytes between sockets and the protocol session.
//! - [`ops`]: runs the session's registry and storage operations off the reactor.
//! - [`storage`]: temp files mapped for reassembly, atomic and durable finalize.
//! - [`registry`]: the SQLite registry of clients and files, on its own thread.
//! - [`shutdown`]: the shutdown flag and the connection count.
//!
//! The protocol itself (codecs, crypto, the per-connection state machine) lives in the
//! `cyberbackup-protocol` crate.

pub mod config;
pub mod glommio_rt;
pub mod ops;
pub mod registry;
pub mod shutdown;
pub mod storage;

use std::sync::Arc;

use anyhow::{Context, Result};

/// Opens storage and registry, starts the shards, and returns when they have stopped
/// (after a signal, with in-flight files finished or discarded).
pub fn run(cfg: config::Config) -> Result<()> {
    let storage = storage::Storage::open(&cfg.storage)
        .with_context(|| format!("opening storage {}", cfg.storage.display()))?;
    let (registry, registry_thread) = registry::Registry::open(&cfg.database)?;
    let shutdown = Arc::new(shutdown::Shutdown::default());
    shutdown
        .install_signal_handlers()
        .context("installing signal handlers")?;
    tracing::info!(
        storage = %cfg.storage.display(),
        database = %cfg.database.display(),
        max_connections = cfg.max_connections,
        "starting"
    );
    let svc = ops::Services {
        storage: Arc::new(storage),
        registry,
    };
    let cfg = Arc::new(cfg);
    let result = glommio_rt::run(cfg, svc, shutdown);
    registry_thread.join();
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}
