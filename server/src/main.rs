//! `cyberbackup-server`: see `--help` and README.md.

use std::io::IsTerminal;

use anyhow::Result;
use clap::Parser;
use cyberbackup_server::config::{Args, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() {
    match real_main() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("cyberbackup-server: error: {e:#}");
            std::process::exit(1);
        }
    }
}

fn real_main() -> Result<i32> {
    let mut args = Args::parse();
    let admin = args.admin.take();
    let cwd = std::env::current_dir()?;
    // A value the server cannot take is a bad argument (exit 2), as clap's are,
    // wherever it came from (flag, variable or configuration file).
    let cfg = match args.resolve(&cwd) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("cyberbackup-server: error: {e:#}");
            return Ok(2);
        }
    };
    let filter = EnvFilter::try_new(&cfg.log)
        .map_err(|e| anyhow::anyhow!("bad --log filter {:?}: {e}", cfg.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (the log's disk is full) is dropped. By
        // default tracing-subscriber reports it with `eprintln!`, which fails the same
        // way and panics: a shard that logged then died, and its leaked tasks kept
        // the server from ever exiting.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal());
    match cfg.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
    cyberbackup_protocol::v3::crypto::use_portable_aes(
        cfg.aes == cyberbackup_server::config::AesKind::Portable,
    );
    match admin {
        Some(a) => cyberbackup_server::admin::run(a, &cfg),
        None => cyberbackup_server::run(cfg).map(|()| 0),
    }
}
