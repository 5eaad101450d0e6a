//! `cyberbackup`: back files up to a CyberBackup server. See `--help` and README.md.
//!
//! Protocol 4 (the default): encrypted, deduplicated snapshots; the commands are in
//! `cli_v4.rs` with their exit codes. `--protocol 3` (and `--batch`) keep the v3
//! uploader, whose exit codes are: 0 all files stored; 2 usage; 3 bad input (missing,
//! unreadable or special file, a name the protocol cannot carry, too large); 4 bad
//! identity file; 5 server unreachable, connection lost or timed out; 6 the server
//! refused (name taken, error answer, not a v3 server); 7 checksum mismatch four times
//! (aborted); 130 cancelled.
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

mod cli_v4;

#[derive(Parser, Debug)]
#[command(name = "cyberbackup", version, about = "Back files and directories up to a CyberBackup server, and restore them", long_about = None)]
struct Cli {
    /// Protocol version: 4 (encrypted, deduplicated snapshots) or 3 (the CyberBackup
    /// 3.0 file uploader).
    #[arg(long, global = true, env = "CYBERBACKUP_PROTOCOL", default_value_t = 4, value_parser = clap::value_parser!(u8).range(3..=4))]
    protocol: u8,
    /// Compatibility mode of the CyberBackup 3.0 client: read transfer.info from the
    /// working directory (line 1 host:port, line 2 user name, line 3 file path).
    #[arg(long, env = "CYBERBACKUP_BATCH")]
    batch: bool,
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// v4: create an account on a server with this device and a new repository key.
    Init {
        /// Server address (host:port).
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: String,
        /// Account name (1 to 100 bytes).
        #[arg(short, long, env = "CYBERBACKUP_ACCOUNT")]
        account: String,
        /// This device's name [default: the host name].
        #[arg(long, env = "CYBERBACKUP_INIT_DEVICE")]
        device: Option<String>,
        /// The server's key fingerprint (SHA256:...), to check instead of trusting
        /// the first connection.
        #[arg(long, env = "CYBERBACKUP_INIT_SERVER_KEY")]
        server_key: Option<String>,
    },
    /// Back up files and directories (v4: one snapshot; v3: each file by its name).
    Backup {
        /// Files and directories (v4: recursive; v3: files only).
        #[arg(required_unless_present_any = ["files_from", "stdin", "profile"])]
        files: Vec<PathBuf>,
        /// Server address [v3 default: 127.0.0.1:1256; v4: the one given to init].
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
        /// v3: user name to register (needed when there is no identity file yet).
        #[arg(short, long, env = "CYBERBACKUP_USER")]
        user: Option<String>,
        /// v4: a tag for the snapshot (repeatable).
        #[arg(long = "tag", env = "CYBERBACKUP_BACKUP_TAG", value_delimiter = ',')]
        tags: Vec<String>,
        /// v4: the host name recorded [default: this machine's].
        #[arg(long, env = "CYBERBACKUP_BACKUP_HOST")]
        host: Option<String>,
        /// v4: read every file, even those unchanged since the last snapshot.
        #[arg(long, env = "CYBERBACKUP_BACKUP_FORCE")]
        force: bool,
        /// v4: the snapshot's time, UTC ("2026-12-04 10:30:00") [default: now].
        #[arg(long, env = "CYBERBACKUP_BACKUP_TIME")]
        time: Option<String>,
        /// v4: leave out paths matching this glob (a pattern without / matches
        /// names; repeatable).
        #[arg(
            long = "exclude",
            value_name = "PATTERN",
            env = "CYBERBACKUP_BACKUP_EXCLUDE",
            value_delimiter = ','
        )]
        excludes: Vec<String>,
        /// v4: read exclude patterns from a file (one a line, # comments).
        #[arg(
            long = "exclude-file",
            value_name = "FILE",
            env = "CYBERBACKUP_BACKUP_EXCLUDE_FILE",
            value_delimiter = ','
        )]
        exclude_files: Vec<PathBuf>,
        /// v4: leave out the contents of directories tagged with CACHEDIR.TAG.
        #[arg(long, env = "CYBERBACKUP_BACKUP_EXCLUDE_CACHES")]
        exclude_caches: bool,
        /// v4: do not cross into other file systems.
        #[arg(long, short = 'x', env = "CYBERBACKUP_BACKUP_ONE_FILE_SYSTEM")]
        one_file_system: bool,
        /// v4: read more paths to back up from a file (one a line).
        #[arg(long, value_name = "FILE", env = "CYBERBACKUP_BACKUP_FILES_FROM")]
        files_from: Option<PathBuf>,
        /// v4: back up standard input as one file named --stdin-filename.
        #[arg(long, env = "CYBERBACKUP_BACKUP_STDIN")]
        stdin: bool,
        /// v4: the name standard input is stored under.
        #[arg(
            long,
            default_value = "stdin",
            env = "CYBERBACKUP_BACKUP_STDIN_FILENAME"
        )]
        stdin_filename: String,
    },
    /// v4: list the snapshots.
    Snapshots {
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
    /// v4: list what a snapshot holds ("latest" or an id prefix).
    Ls {
        snapshot: String,
        /// Only this path and what is under it.
        path: Option<String>,
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
    /// v4: restore a snapshot ("latest" or an id prefix), or a path in it.
    Restore {
        snapshot: String,
        /// Only this path and what is under it.
        path: Option<String>,
        /// Directory to restore into (made if missing).
        #[arg(short, long, env = "CYBERBACKUP_RESTORE_TARGET")]
        target: PathBuf,
        /// Replace files that exist in the target (files already holding the
        /// snapshot's content are kept either way: running a restore again resumes it).
        #[arg(long, env = "CYBERBACKUP_RESTORE_OVERWRITE")]
        overwrite: bool,
        /// Only entries matching this glob, and what is under them (repeatable).
        #[arg(
            long = "include",
            value_name = "PATTERN",
            env = "CYBERBACKUP_RESTORE_INCLUDE",
            value_delimiter = ','
        )]
        includes: Vec<String>,
        /// Leave out entries matching this glob, and what is under them (repeatable).
        #[arg(
            long = "exclude",
            value_name = "PATTERN",
            env = "CYBERBACKUP_RESTORE_EXCLUDE",
            value_delimiter = ','
        )]
        excludes: Vec<String>,
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
    /// v4: write one file of a snapshot to standard output (verified).
    Dump {
        snapshot: String,
        path: String,
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
    /// v4: forget snapshots, named or by a retention policy (their data is freed by
    /// the server's collection).
    Forget {
        /// Snapshots to forget ("latest" or id prefixes); or none, with --keep-* rules.
        snapshots: Vec<String>,
        /// Keep the N newest snapshots (per host and paths).
        #[arg(
            long,
            value_name = "N",
            default_value_t = 0,
            env = "CYBERBACKUP_FORGET_KEEP_LAST"
        )]
        keep_last: u32,
        /// Keep the newest snapshot of each of the N newest hours that have one.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 0,
            env = "CYBERBACKUP_FORGET_KEEP_HOURLY"
        )]
        keep_hourly: u32,
        /// ... days.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 0,
            env = "CYBERBACKUP_FORGET_KEEP_DAILY"
        )]
        keep_daily: u32,
        /// ... ISO weeks.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 0,
            env = "CYBERBACKUP_FORGET_KEEP_WEEKLY"
        )]
        keep_weekly: u32,
        /// ... months.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 0,
            env = "CYBERBACKUP_FORGET_KEEP_MONTHLY"
        )]
        keep_monthly: u32,
        /// ... years.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 0,
            env = "CYBERBACKUP_FORGET_KEEP_YEARLY"
        )]
        keep_yearly: u32,
        /// Keep snapshots newer than this before the newest (e.g. 30d, 1y6m, 36h).
        #[arg(long, value_name = "DURATION", env = "CYBERBACKUP_FORGET_KEEP_WITHIN")]
        keep_within: Option<String>,
        /// Keep snapshots with this tag (repeatable).
        #[arg(
            long,
            value_name = "TAG",
            env = "CYBERBACKUP_FORGET_KEEP_TAG",
            value_delimiter = ','
        )]
        keep_tag: Vec<String>,
        /// Show what would be kept and forgotten, and why; change nothing.
        #[arg(long, env = "CYBERBACKUP_FORGET_DRY_RUN")]
        dry_run: bool,
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
    /// v4: have the server delete the chunks no snapshot references now (after
    /// `forget`), rather than at its next scheduled collection.
    Prune {
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
    /// v4: files uploaded with protocol v3 (the v3 CLI or the CyberBackup 3.0 client):
    /// list, restore, or import them as a snapshot, proving the v3 identity with its
    /// me.info (--identity) over a v4 connection.
    Legacy {
        #[command(subcommand)]
        cmd: LegacyCmd,
        /// The v3 private key, when it is not line 3 of me.info (base64 or DER).
        #[arg(
            long,
            global = true,
            env = "CYBERBACKUP_PRIVATE_KEY",
            value_name = "FILE"
        )]
        private_key: Option<PathBuf>,
        #[arg(short, long, env = "CYBERBACKUP_SERVER", global = true)]
        server: Option<String>,
    },
    /// v4: what changed between two snapshots (+ added, - removed, M modified,
    /// U metadata only).
    Diff {
        first: String,
        second: String,
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
    /// v4: which snapshots hold a path matching a pattern (`*`, `?`, `**`; a pattern
    /// without `/` matches file names).
    Find {
        pattern: String,
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
    /// v4: check that every snapshot opens and every chunk it names is on the server.
    Check {
        /// Also download and verify chunks (all of them, or --read-data-subset).
        #[arg(long, env = "CYBERBACKUP_CHECK_READ_DATA")]
        read_data: bool,
        /// Verify this share of the chunks, e.g. 10% (implies --read-data).
        #[arg(
            long,
            value_name = "PERCENT",
            env = "CYBERBACKUP_CHECK_READ_DATA_SUBSET"
        )]
        read_data_subset: Option<String>,
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
    /// v4: join this machine to an account with an enrolment code (from `device add`
    /// on another device, or from the server's `enrol-code` when every device is lost).
    Enrol {
        /// The enrolment code.
        code: String,
        /// Server address (host:port).
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: String,
        /// This device's name [default: the host name].
        #[arg(long, env = "CYBERBACKUP_ENROL_DEVICE")]
        device: Option<String>,
        /// The server's key fingerprint (SHA256:...), to check instead of trusting
        /// the first connection.
        #[arg(long, env = "CYBERBACKUP_ENROL_SERVER_KEY")]
        server_key: Option<String>,
    },
    /// v4: the account's devices: list, add (prints an enrolment code), revoke.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
        #[arg(short, long, env = "CYBERBACKUP_SERVER", global = true)]
        server: Option<String>,
    },
    /// v4: the repository key: list it, change its passphrase.
    Key {
        #[command(subcommand)]
        cmd: KeyCmd,
        #[arg(short, long, env = "CYBERBACKUP_SERVER", global = true)]
        server: Option<String>,
    },
    /// v4: what the snapshots hold and what that costs on the server (deduplicated).
    Stats {
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
    /// v4: the space the account holds on the server.
    Usage {
        #[arg(short, long, env = "CYBERBACKUP_SERVER")]
        server: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceCmd {
    /// The account's devices, their capabilities, and which are revoked.
    List,
    /// Make a one-time enrolment code for a new device.
    Add {
        /// What the new device may do: all, or some of backup,read,forget,admin.
        #[arg(
            long,
            default_value = "all",
            env = "CYBERBACKUP_DEVICE_ADD_CAPABILITIES"
        )]
        capabilities: String,
        /// A name to remember the device by.
        #[arg(long, default_value = "", env = "CYBERBACKUP_DEVICE_ADD_NAME")]
        name: String,
        /// Hours the code stays valid (at most 168).
        #[arg(long, default_value_t = 24, env = "CYBERBACKUP_DEVICE_ADD_TTL_HOURS")]
        ttl_hours: u32,
    },
    /// Revoke a device (by its id from `device list`): its logins are refused.
    Revoke { id: u64 },
}

#[derive(Subcommand, Debug)]
enum LegacyCmd {
    /// The v3 client's stored files: time stored, size, name.
    List,
    /// Download v3 files (all, or those matching the NAME globs), each checked
    /// against the checksum v3 verified.
    Restore {
        /// File names or globs (default: all).
        names: Vec<String>,
        /// Directory to restore into.
        #[arg(long, short = 't', env = "CYBERBACKUP_LEGACY_RESTORE_TARGET")]
        target: PathBuf,
        /// Replace files that exist with other content.
        #[arg(long, env = "CYBERBACKUP_LEGACY_RESTORE_OVERWRITE")]
        overwrite: bool,
    },
    /// Make the v3 files (all, or those matching NAME globs) one v4 snapshot, tagged
    /// legacy-import.
    Import {
        /// File names or globs (default: all).
        names: Vec<String>,
        /// Another tag for the snapshot (repeatable).
        #[arg(
            long = "tag",
            env = "CYBERBACKUP_LEGACY_IMPORT_TAG",
            value_delimiter = ','
        )]
        tags: Vec<String>,
        /// The host name recorded [default: this machine's].
        #[arg(long, env = "CYBERBACKUP_LEGACY_IMPORT_HOST")]
        host: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCmd {
    /// The account's wrapped repository key: its id and Argon2id cost.
    List,
    /// Wrap the repository key under a new passphrase (CYBERBACKUP_NEW_PASSWORD,
    /// --new-password-file, or a prompt); the old one stops working.
    Passwd {
        #[arg(long, env = "CYBERBACKUP_NEW_PASSWORD_FILE")]
        new_password_file: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
struct Common {
    /// v3 and `legacy`: the v3 identity file, me.info (made on first v3 registration).
    #[arg(
        long,
        global = true,
        env = "CYBERBACKUP_IDENTITY",
        default_value = "me.info"
    )]
    identity: PathBuf,
    /// v3: packet size in bytes (a multiple of 16, at most 16 MiB).
    #[arg(long, global = true, default_value_t = DEFAULT_PACKET_SIZE, env = "CYBERBACKUP_PACKET_SIZE")]
    packet_size: usize,
    /// v3: seconds to wait for the server on any read or write.
    #[arg(long, global = true, default_value_t = 60, env = "CYBERBACKUP_TIMEOUT")]
    timeout: u64,
    /// Progress and results as JSON lines on standard output.
    #[arg(long, global = true, env = "CYBERBACKUP_JSON")]
    json: bool,
    /// No progress and no summary lines: only errors, and what a command exists to
    /// print (a listing, a code).
    #[arg(long, short, global = true, env = "CYBERBACKUP_QUIET")]
    quiet: bool,
    /// v4: the config directory (device key, pinned server keys, repository)
    /// [default: $XDG_CONFIG_HOME/cyberbackup or ~/.config/cyberbackup].
    #[arg(long, global = true, env = "CYBERBACKUP_CONFIG_DIR")]
    config_dir: Option<PathBuf>,
    /// v4: read the repository passphrase from this file (else CYBERBACKUP_PASSWORD,
    /// else a prompt).
    #[arg(long, global = true, env = "CYBERBACKUP_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// v4: a profile of config.toml in the config directory (paths, excludes, tags,
    /// retention) for backup and forget; flags add to it.
    #[arg(long, global = true, env = "CYBERBACKUP_PROFILE")]
    profile: Option<String>,
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
        // No colour codes in a log file, cron's mail or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let v4 = cli.protocol == 4 && !cli.batch;
    let json = cli.common.json;
    let code = match if v4 { run_v4(cli) } else { run(cli) } {
        Ok(code) => code,
        Err(e) => {
            // The chain of causes, each said once (a cause whose text is already in
            // the message is not repeated).
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let t = cause.to_string();
                if !msg.contains(&t) {
                    msg.push_str(": ");
                    msg.push_str(&t);
                }
            }
            eprintln!("cyberbackup: {msg}");
            let code = if v4 {
                cli_v4::exit_code(&e)
            } else {
                e.downcast_ref::<ClientError>().map(exit_code).unwrap_or(2)
            };
            if json && v4 {
                // The error as the last JSON line, with the server's reason code when
                // there is one.
                let reason = cli_v4::reason(&e);
                let (name, number) = (reason.map(|r| r.name()), reason.map(|r| r.0));
                let mut o = std::io::stdout().lock();
                let _ = writeln!(
                    o,
                    "{}",
                    serde_json::json!({"event": "error", "message": msg, "reason": name, "reason_code": number, "exit_code": code})
                );
            }
            code
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

fn run_v4(cli: Cli) -> anyhow::Result<i32> {
    let c = cli.common;
    let profile = match &c.profile {
        None => None,
        Some(name) => {
            let dir = match &c.config_dir {
                Some(d) => d.clone(),
                None => cyberbackup_client::v4::profile::default_dir()?,
            };
            Some(cyberbackup_client::v4::config::profile(&dir, name)?)
        }
    };
    let mut common = cli_v4::V4Common {
        config_dir: c.config_dir,
        server: None,
        password_file: c.password_file,
        json: c.json,
        quiet: c.quiet,
    };
    let Some(cmd) = cli.command else {
        return Err(anyhow!(
            "nothing to do: `cyberbackup init`, then `cyberbackup backup PATH...` (see --help)"
        ));
    };
    match cmd {
        Command::Init {
            server,
            account,
            device,
            server_key,
        } => cli_v4::init(&common, &server, &account, device, server_key.as_deref()),
        Command::Backup {
            files,
            server,
            user,
            tags,
            host,
            force,
            time,
            excludes,
            exclude_files,
            exclude_caches,
            one_file_system,
            files_from,
            stdin,
            stdin_filename,
        } => {
            if user.is_some() {
                return Err(anyhow!(
                    "--user is for protocol 3 (add --protocol 3); v4 uses the account given to init"
                ));
            }
            let mut files = files;
            let mut tags = tags;
            let mut excludes = excludes;
            let mut exclude_files = exclude_files;
            let (mut exclude_caches, mut one_file_system, mut host, mut server) =
                (exclude_caches, one_file_system, host, server);
            if let Some(p) = &profile {
                if files.is_empty() && files_from.is_none() && !stdin {
                    files = p.paths.clone();
                }
                if tags.is_empty() {
                    tags = p.tags.clone();
                }
                excludes.extend(p.excludes.iter().cloned());
                exclude_files.extend(p.exclude_files.iter().cloned());
                exclude_caches |= p.exclude_caches;
                one_file_system |= p.one_file_system;
                host = host.or_else(|| p.host.clone());
                server = server.or_else(|| p.server.clone());
            }
            if files.is_empty() && files_from.is_none() && !stdin {
                return Err(anyhow!(
                    "nothing to back up: give paths, or a profile with paths"
                ));
            }
            common.server = server;
            let time_ms =
                match time {
                    None => None,
                    Some(t) => Some(cyberbackup_client::v4::policy::parse_time(&t).ok_or_else(
                        || anyhow!("--time {t:?}: expected YYYY-MM-DD HH:MM:SS (UTC)"),
                    )?),
                };
            for f in &exclude_files {
                excludes.extend(
                    cyberbackup_client::v4::backup::read_patterns(f)
                        .with_context(|| format!("reading the exclude file {}", f.display()))?,
                );
            }
            if let Some(f) = &files_from {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                files.extend(
                    text.lines()
                        .map(str::trim_end)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(PathBuf::from),
                );
            }
            let opts = cyberbackup_client::v4::backup::BackupOptions {
                host: host.unwrap_or_else(cyberbackup_client::v4::backup::hostname),
                tags,
                force,
                time_ms,
                filter: cyberbackup_client::v4::backup::Filter {
                    excludes,
                    exclude_caches,
                    one_file_system,
                },
                stdin_name: stdin.then_some(stdin_filename),
                ..Default::default()
            };
            if stdin && !files.is_empty() {
                return Err(anyhow!(
                    "--stdin backs up standard input alone: give no paths"
                ));
            }
            cli_v4::backup(&common, &files, opts)
        }
        Command::Snapshots { server } => {
            common.server = server;
            cli_v4::list(&common)
        }
        Command::Ls {
            snapshot,
            path,
            server,
        } => {
            common.server = server;
            cli_v4::ls(&common, &snapshot, path.as_deref())
        }
        Command::Restore {
            snapshot,
            path,
            target,
            overwrite,
            includes,
            excludes,
            server,
        } => {
            common.server = server;
            let ropts = cyberbackup_client::v4::restore::RestoreOptions {
                overwrite,
                include: path,
                includes,
                excludes,
            };
            cli_v4::restore(&common, &snapshot, &target, ropts)
        }
        Command::Dump {
            snapshot,
            path,
            server,
        } => {
            common.server = server;
            cli_v4::dump(&common, &snapshot, &path)
        }
        Command::Forget {
            snapshots,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            keep_within,
            keep_tag,
            dry_run,
            server,
        } => {
            common.server = server;
            let within = match keep_within {
                None => None,
                Some(d) => Some(
                    cyberbackup_client::v4::policy::parse_duration(&d).ok_or_else(|| {
                        anyhow!("--keep-within {d:?}: expected e.g. 30d, 1y6m, 36h")
                    })?,
                ),
            };
            let mut policy = cyberbackup_client::v4::policy::Policy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
                within,
                tags: keep_tag,
            };
            // With a profile's rules, only that profile's snapshots (same paths) are
            // judged: another profile's are not its to forget.
            let mut only_paths = None;
            if let (Some(p), true, true) = (&profile, policy.is_empty(), snapshots.is_empty()) {
                policy = p.policy().map_err(|e| anyhow!("profile: {e}"))?;
                if common.server.is_none() {
                    common.server = p.server.clone();
                }
                use std::os::unix::ffi::OsStrExt;
                only_paths = Some(
                    p.paths
                        .iter()
                        .map(|x| x.as_os_str().as_bytes().to_vec())
                        .collect::<Vec<_>>(),
                );
            }
            match (snapshots.is_empty(), policy.is_empty()) {
                (false, true) if !dry_run => cli_v4::forget(&common, &snapshots),
                (true, false) => {
                    cli_v4::forget_policy(&common, &policy, dry_run, only_paths.as_deref())
                }
                (true, true) => Err(anyhow!(
                    "forget what? name snapshots, or give --keep-* rules (see --help)"
                )),
                _ => Err(anyhow!(
                    "give either snapshots or --keep-* rules, not both (--dry-run goes with rules)"
                )),
            }
        }
        Command::Diff {
            first,
            second,
            server,
        } => {
            common.server = server;
            cli_v4::diff(&common, &first, &second)
        }
        Command::Find { pattern, server } => {
            common.server = server;
            cli_v4::find(&common, &pattern)
        }
        Command::Check {
            read_data,
            read_data_subset,
            server,
        } => {
            common.server = server;
            let pct = match (read_data, read_data_subset) {
                (_, Some(s)) => Some(
                    s.trim_end_matches('%')
                        .parse::<u8>()
                        .ok()
                        .filter(|p| (1..=100).contains(p))
                        .ok_or_else(|| anyhow!("--read-data-subset {s:?}: expected 1% to 100%"))?,
                ),
                (true, None) => Some(100),
                (false, None) => None,
            };
            cli_v4::check(&common, pct)
        }
        Command::Usage { server } => {
            common.server = server;
            cli_v4::usage(&common)
        }
        Command::Prune { server } => {
            common.server = server;
            cli_v4::prune(&common)
        }
        Command::Legacy {
            cmd,
            private_key,
            server,
        } => {
            common.server = server;
            let identity = cli_v4::legacy_identity(&c.identity, private_key.as_deref())?;
            match cmd {
                LegacyCmd::List => cli_v4::legacy_list(&common, &identity),
                LegacyCmd::Restore {
                    names,
                    target,
                    overwrite,
                } => cli_v4::legacy_restore(&common, &identity, &names, &target, overwrite),
                LegacyCmd::Import { names, tags, host } => {
                    let mut opts = cyberbackup_client::v4::backup::BackupOptions {
                        tags,
                        ..Default::default()
                    };
                    if let Some(h) = host {
                        opts.host = h;
                    }
                    cli_v4::legacy_import(&common, &identity, &names, opts)
                }
            }
        }
        Command::Stats { server } => {
            common.server = server;
            cli_v4::stats(&common)
        }
        Command::Enrol {
            code,
            server,
            device,
            server_key,
        } => cli_v4::enrol(&common, &server, &code, device, server_key.as_deref()),
        Command::Device { cmd, server } => {
            common.server = server;
            match cmd {
                DeviceCmd::List => cli_v4::device_list(&common),
                DeviceCmd::Add {
                    capabilities,
                    name,
                    ttl_hours,
                } => cli_v4::device_add(&common, &capabilities, &name, ttl_hours),
                DeviceCmd::Revoke { id } => cli_v4::device_revoke(&common, id),
            }
        }
        Command::Key { cmd, server } => {
            common.server = server;
            match cmd {
                KeyCmd::List => cli_v4::key_list(&common),
                KeyCmd::Passwd { new_password_file } => {
                    cli_v4::key_passwd(&common, new_password_file.as_deref())
                }
            }
        }
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
                ..
            }),
        ) => (
            files,
            server.unwrap_or_else(|| "127.0.0.1:1256".into()),
            user,
        ),
        (false, Some(_)) => {
            return Err(anyhow!(
                "protocol 3 only backs files up: use `cyberbackup --protocol 3 backup FILE...`"
            ));
        }
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
