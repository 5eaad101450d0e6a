//! `cyberbackup`: back files up to a CyberBackup server. See `--help` and README.md.
//!
//! Exit codes: 0 all files stored; 2 usage; 3 bad input (missing, unreadable or
//! special file, a name the protocol cannot carry, too large); 4 bad identity file;
//! 5 server unreachable, connection lost or timed out; 6 the server refused (name
//! taken, error answer, not a v3 server); 7 checksum mismatch four times (aborted);
//! 130 cancelled.
//!
//! Diagnostics (reconnects, resends) go to standard error as log lines: warnings by
//! default, errors only with `--quiet`, anything `RUST_LOG` asks for (e.g.
//! `RUST_LOG=debug`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand};
use cyberbackup_client::upload::{check_path, DEFAULT_PACKET_SIZE};
use cyberbackup_client::{
    Cancel, ClientError, ConnectOptions, Credentials, Identity, Phase, Progress, Session,
    UploadOptions,
};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(name = "cyberbackup", version, about = "Back files up to a CyberBackup server", long_about = None)]
struct Cli {
    /// Compatibility mode of the CyberBackup 3.0 client: read transfer.info from the
    /// working directory (line 1 host:port, line 2 user name, line 3 file path).
    #[arg(long)]
    batch: bool,
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Back up one or more files in one session.
    Backup {
        /// Files to back up (stored under their file names).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Server address.
        #[arg(
            short,
            long,
            env = "CYBERBACKUP_SERVER",
            default_value = "127.0.0.1:1256"
        )]
        server: String,
        /// User name to register (needed when there is no identity file yet).
        #[arg(short, long, env = "CYBERBACKUP_USER")]
        user: Option<String>,
    },
}

#[derive(Args, Debug)]
struct Common {
    /// Identity file (created on first registration, used to reconnect later).
    #[arg(
        long,
        global = true,
        env = "CYBERBACKUP_IDENTITY",
        default_value = "me.info"
    )]
    identity: PathBuf,
    /// Packet size in bytes (a multiple of 16, at most 16 MiB).
    #[arg(long, global = true, default_value_t = DEFAULT_PACKET_SIZE)]
    packet_size: usize,
    /// Seconds to wait for the server on any read or write.
    #[arg(long, global = true, default_value_t = 60)]
    timeout: u64,
    /// Progress and results as JSON lines on standard output.
    #[arg(long, global = true)]
    json: bool,
    /// No progress output, only the summary lines and errors.
    #[arg(long, short, global = true)]
    quiet: bool,
}

fn exit_code(e: &ClientError) -> i32 {
    match e {
        ClientError::BadInput { .. } | ClientError::File { .. } => 3,
        ClientError::BadIdentity { .. } => 4,
        ClientError::Unreachable { .. }
        | ClientError::BadAddress { .. }
        | ClientError::ConnectionLost(_)
        | ClientError::Timeout(_) => 5,
        ClientError::NameTaken(_)
        | ClientError::Rejected(_)
        | ClientError::ServerError(_)
        | ClientError::Protocol(_)
        | ClientError::Crypto(_) => 6,
        ClientError::ChecksumFailed { .. } => 7,
        ClientError::Cancelled => 130,
        ClientError::Congestion { .. } => 2,
    }
}

fn main() {
    let cli = Cli::parse();
    let quiet = cli.common.quiet;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if quiet { "error" } else { "warn" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cyberbackup: {e:#}");
            e.downcast_ref::<ClientError>().map(exit_code).unwrap_or(2)
        }
    };
    std::process::exit(code);
}

/// Reads transfer.info: (server, user, file).
fn transfer_info(dir: &Path) -> anyhow::Result<(String, String, PathBuf)> {
    let path = dir.join("transfer.info");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().map(|l| l.trim());
    let mut next = |what: &str| {
        lines
            .next()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("{}: missing {what}", path.display()))
    };
    Ok((
        next("line 1 (host:port)")?,
        next("line 2 (user name)")?,
        next("line 3 (file path)")?.into(),
    ))
}

struct Output {
    json: bool,
    quiet: bool,
    tty: bool,
}

impl Output {
    fn json_line(&self, v: serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let (files, server, user) = match (cli.batch, cli.command) {
        (true, Some(_)) => return Err(anyhow!("--batch reads transfer.info; it takes no command")),
        (true, None) => {
            let (server, user, file) = transfer_info(&std::env::current_dir()?)?;
            (vec![file], server, Some(user))
        }
        (
            false,
            Some(Command::Backup {
                files,
                server,
                user,
            }),
        ) => (files, server, user),
        (false, None) => {
            return Err(anyhow!(
                "nothing to do: use `cyberbackup backup FILE...` or `--batch` (see --help)"
            ));
        }
    };
    let c = cli.common;
    let out = Output {
        json: c.json,
        quiet: c.quiet,
        tty: std::io::stderr().is_terminal(),
    };

    // Every file is checked before anything goes on the wire.
    let mut bad = None;
    for f in &files {
        if let Err(e) = check_path(f) {
            if out.json {
                out.json_line(
                    serde_json::json!({"event": "error", "file": f, "error": e.report()}),
                );
            }
            eprintln!("cyberbackup: {}", e.report());
            bad.get_or_insert(e);
        }
    }
    if let Some(e) = bad {
        return Ok(exit_code(&e));
    }

    let creds = match Identity::load(&c.identity)? {
        Some(id) => {
            if let Some(u) = &user {
                if *u != id.name {
                    return Err(ClientError::BadIdentity {
                        path: c.identity.clone(),
                        reason: format!(
                            "belongs to user {:?}, not {u:?} (use --identity for another file)",
                            id.name
                        ),
                    }
                    .into());
                }
            }
            Credentials::Existing(Box::new(id))
        }
        None => match user {
            Some(u) => Credentials::New(u),
            None => {
                return Err(anyhow!(
                    "no identity file {} yet: give --user NAME to register",
                    c.identity.display()
                ))
            }
        },
    };
    let before = match &creds {
        Credentials::Existing(i) => Some(i.id),
        Credentials::New(_) => None,
    };
    let copts = ConnectOptions {
        io_timeout: Duration::from_secs(c.timeout.max(1)),
        congestion: None,
        ..ConnectOptions::default()
    };
    // A new identity is saved as soon as the server assigns its id.
    let id_path = c.identity.clone();
    let (mut session, identity) =
        Session::open_saving(&server, creds, &copts, &mut |id| id.save(&id_path))?;
    // A new registration (first run, or the server did not know the saved identity).
    if before != Some(identity.id) && !out.quiet && !out.json {
        eprintln!(
            "registered as {} (client id {}), identity saved in {}",
            identity.name,
            cyberbackup_protocol::common::client_id_hex(&identity.id),
            c.identity.display()
        );
    }

    let cancel = Cancel::new();
    let _ = signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        cancel.flag(),
    );
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, cancel.flag());
    let opts = UploadOptions {
        packet_size: c.packet_size,
        cancel,
        ..UploadOptions::default()
    };

    let mut first_err: Option<ClientError> = None;
    for f in &files {
        let result = upload_one(&mut session, f, &opts, &out);
        match result {
            Ok(s) => {
                if out.json {
                    out.json_line(serde_json::json!({
                        "event": "stored", "file": s.name, "size": s.size, "cksum": s.cksum,
                        "seconds": s.elapsed.as_secs_f64(), "mb_per_sec": s.mb_per_sec(),
                        "attempts": s.attempts, "packets": s.packets, "packet_size": s.packet_size,
                    }));
                } else {
                    println!(
                        "stored {}: {} bytes, cksum {}, {:.2} s, {:.1} MB/s",
                        s.name,
                        s.size,
                        s.cksum,
                        s.elapsed.as_secs_f64(),
                        s.mb_per_sec()
                    );
                }
            }
            Err(e) => {
                if out.json {
                    out.json_line(serde_json::json!({"event": "error", "file": f, "error": e.report(), "exit_code": exit_code(&e)}));
                }
                eprintln!("cyberbackup: {}: {}", f.display(), e.report());
                let fatal = !matches!(
                    e,
                    ClientError::ChecksumFailed { .. }
                        | ClientError::BadInput { .. }
                        | ClientError::File { .. }
                );
                first_err.get_or_insert(e);
                if fatal {
                    break;
                }
            }
        }
    }
    Ok(first_err.as_ref().map(exit_code).unwrap_or(0))
}

fn upload_one(
    session: &mut Session,
    path: &Path,
    opts: &UploadOptions,
    out: &Output,
) -> Result<cyberbackup_client::UploadSummary, ClientError> {
    let bar = (out.tty && !out.quiet && !out.json).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{msg:20!} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    });
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let mut last_phase = None;
    let mut on_progress = |p: &Progress<'_>| {
        if let Some(b) = &bar {
            b.set_length(p.total);
            b.set_position(p.bytes);
            b.set_message(format!("{} {:?}", p.file, p.phase).to_lowercase());
            return;
        }
        if out.quiet {
            return;
        }
        let phase_changed = last_phase != Some(p.phase);
        if !phase_changed
            && last_line.elapsed() < Duration::from_millis(if out.json { 200 } else { 2000 })
        {
            return;
        }
        last_phase = Some(p.phase);
        last_line = Instant::now();
        if out.json {
            out.json_line(serde_json::json!({"event": "progress", "progress": p}));
        } else if p.phase != Phase::Done {
            eprintln!(
                "{}: {:?} {}/{} bytes, packet {}/{}, {:.1} MB/s",
                p.file,
                p.phase,
                p.bytes,
                p.total,
                p.packet,
                p.total_packets,
                p.bytes_per_sec / 1e6
            );
        }
    };
    let r = session.upload_path(path, opts, &mut on_progress);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
