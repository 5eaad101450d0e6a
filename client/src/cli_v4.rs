//! The v4 commands of `cyberbackup`: init, backup, snapshots, ls, restore, dump,
//! forget, prune, diff, find, check, stats, usage, enrol, device, key, legacy. See
//! README.md ("The backup CLI") for the exit codes.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use cyberbackup_client::v4::backup::{self, BackupError, BackupOptions, BackupProgress};
use cyberbackup_client::v4::conn::ConnError;
use cyberbackup_client::v4::inspect;
use cyberbackup_client::v4::legacy::{self, LegacyError};
use cyberbackup_client::v4::policy::Policy;
use cyberbackup_client::v4::profile::{default_dir, hex, Profile, ProfileError};
use cyberbackup_client::v4::restore::{self, RestoreError, RestoreOptions, RestoreProgress};
use cyberbackup_client::v4::snapshots::{self, SnapshotError};
use cyberbackup_client::v4::{self, RepoError};
use cyberbackup_protocol::v4::format::{EntryKind, FormatError};
use cyberbackup_protocol::v4::noise::fingerprint;
use cyberbackup_protocol::v4::wire::{Answer, ErrorCode, Request, SnapshotInfo};
use cyberbackup_protocol::v4::Capabilities;

/// Exit codes of the v4 commands.
pub mod code {
    pub const OK: i32 = 0;
    /// An internal error (a bug); nothing was committed.
    pub const INTERNAL: i32 = 1;
    pub const USAGE: i32 = 2;
    /// A backup finished but some files could not be read (they are not in it).
    pub const PARTIAL: i32 = 3;
    /// The device is not set up, or its files are unreadable.
    pub const CONFIG: i32 = 4;
    /// The server cannot be reached, or the connection was lost.
    pub const NETWORK: i32 = 5;
    /// The server refused (a reason code is printed).
    pub const REFUSED: i32 = 6;
    /// Wrong passphrase, or the server's key is not the pinned one.
    pub const KEY: i32 = 7;
    /// Data failed verification (a chunk or a snapshot was altered or is missing).
    pub const INTEGRITY: i32 = 8;
    /// A restore would replace an existing file.
    pub const EXISTS: i32 = 9;
    pub const CANCELLED: i32 = 130;
}

/// Options every v4 command shares.
#[derive(Debug, Clone)]
pub struct V4Common {
    pub config_dir: Option<PathBuf>,
    pub server: Option<String>,
    pub password_file: Option<PathBuf>,
    pub json: bool,
    pub quiet: bool,
}

impl V4Common {
    fn profile(&self) -> anyhow::Result<Profile> {
        Ok(Profile::new(match &self.config_dir {
            Some(d) => d.clone(),
            None => default_dir()?,
        }))
    }

    /// The passphrase: CYBERBACKUP_PASSWORD, --password-file, or a prompt.
    fn passphrase(&self, confirm: bool) -> anyhow::Result<Vec<u8>> {
        self.passphrase_from(confirm, false)
    }

    fn passphrase_from(&self, confirm: bool, skip_env: bool) -> anyhow::Result<Vec<u8>> {
        // A file named explicitly wins, and a missing one is an error (never a silent
        // fall back to the environment).
        if let Some(f) = &self.password_file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading the password file {}", f.display()))?;
            let p = text.strip_suffix('\n').unwrap_or(&text);
            let p = p.strip_suffix('\r').unwrap_or(p);
            if p.is_empty() {
                bail!("the password file {} is empty", f.display());
            }
            return Ok(p.as_bytes().to_vec());
        }
        if let (false, Ok(p)) = (skip_env, std::env::var("CYBERBACKUP_PASSWORD")) {
            if !p.is_empty() {
                return Ok(p.into_bytes());
            }
        }
        if !std::io::stdin().is_terminal() {
            bail!("no passphrase: set CYBERBACKUP_PASSWORD or --password-file (standard input is not a terminal)");
        }
        let p = rpassword::prompt_password("repository passphrase: ")?;
        if p.is_empty() {
            bail!("an empty passphrase is not allowed");
        }
        if confirm && rpassword::prompt_password("again: ")? != p {
            bail!("the passphrases differ");
        }
        Ok(p.into_bytes())
    }
}

/// The server's reason code behind an error, if it has one (e.g. `FORBIDDEN`).
pub fn reason(e: &anyhow::Error) -> Option<ErrorCode> {
    e.chain().find_map(|c| conn_of(c).and_then(ConnError::code))
}

/// The connection error a command's error is, or wraps (the wrappers are transparent:
/// their `source` skips the connection error itself).
fn conn_of<'a>(c: &'a (dyn std::error::Error + 'static)) -> Option<&'a ConnError> {
    if let Some(x) = c.downcast_ref::<ConnError>() {
        return Some(x);
    }
    match (
        c.downcast_ref::<BackupError>(),
        c.downcast_ref::<RestoreError>(),
        c.downcast_ref::<SnapshotError>(),
        c.downcast_ref::<RepoError>(),
        c.downcast_ref::<LegacyError>(),
    ) {
        (Some(BackupError::Conn(x)), ..)
        | (_, Some(RestoreError::Conn(x)), ..)
        | (_, _, Some(SnapshotError::Conn(x)), ..)
        | (.., Some(RepoError::Conn(x)), _)
        | (.., Some(LegacyError::Conn(x))) => Some(x),
        _ => None,
    }
}

/// The exit code for an error of a v4 command.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<ConnError>() {
            return conn_code(c);
        }
        if let Some(r) = cause.downcast_ref::<RepoError>() {
            return match r {
                RepoError::Profile(_) | RepoError::AlreadyInitialised { .. } => code::CONFIG,
                RepoError::Conn(c) => conn_code(c),
                RepoError::Key(FormatError::Passphrase) => code::KEY,
                RepoError::Key(_) => code::INTEGRITY,
                RepoError::NoKey => code::REFUSED,
            };
        }
        if cause.downcast_ref::<ProfileError>().is_some() {
            return code::CONFIG;
        }
        if let Some(b) = cause.downcast_ref::<BackupError>() {
            return match b {
                BackupError::Conn(c) => conn_code(c),
                BackupError::Key(FormatError::Passphrase) => code::KEY,
                BackupError::Key(_) => code::INTEGRITY,
                BackupError::Cancelled => code::CANCELLED,
                BackupError::Internal(_) => code::INTERNAL,
                BackupError::Empty(_) => code::USAGE,
                BackupError::Snapshot(s) => snapshot_code(s),
                _ => code::PARTIAL,
            };
        }
        if let Some(r) = cause.downcast_ref::<RestoreError>() {
            return match r {
                RestoreError::Conn(c) => conn_code(c),
                RestoreError::Chunk { .. }
                | RestoreError::MissingChunk { .. }
                | RestoreError::Size { .. } => code::INTEGRITY,
                RestoreError::Exists(_) => code::EXISTS,
                RestoreError::Cancelled => code::CANCELLED,
                RestoreError::NoMatch(_)
                | RestoreError::NotAFile(_)
                | RestoreError::TargetNotDir(_) => code::USAGE,
                RestoreError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotADirectory =>
                {
                    code::USAGE
                }
                RestoreError::Io { .. } => code::PARTIAL,
            };
        }
        if let Some(s) = cause.downcast_ref::<SnapshotError>() {
            return snapshot_code(s);
        }
        if let Some(l) = cause.downcast_ref::<LegacyError>() {
            return match l {
                LegacyError::Conn(c) => conn_code(c),
                LegacyError::Sign(_) => code::CONFIG,
                LegacyError::Exists(_) => code::EXISTS,
                LegacyError::NoMatch(_) => code::USAGE,
                LegacyError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::InvalidData
                        || source.kind() == std::io::ErrorKind::UnexpectedEof =>
                {
                    code::INTEGRITY
                }
                LegacyError::Io { source, .. }
                    if source.kind() == std::io::ErrorKind::NotADirectory =>
                {
                    code::USAGE
                }
                LegacyError::Io { .. } => code::PARTIAL,
            };
        }
        if cause
            .downcast_ref::<cyberbackup_client::ClientError>()
            .is_some_and(|e| matches!(e, cyberbackup_client::ClientError::BadIdentity { .. }))
        {
            return code::CONFIG;
        }
    }
    code::USAGE
}

fn snapshot_code(s: &SnapshotError) -> i32 {
    match s {
        SnapshotError::Conn(c) => conn_code(c),
        SnapshotError::NotFound(_) | SnapshotError::Ambiguous(_) => code::USAGE,
        SnapshotError::Format { .. } | SnapshotError::ManifestLength(_) => code::INTEGRITY,
    }
}

fn conn_code(c: &ConnError) -> i32 {
    match c {
        ConnError::KeyMismatch { .. } | ConnError::KeyNotExpected { .. } => code::KEY,
        ConnError::BadAddress(_) => code::USAGE,
        ConnError::Server(_) => code::REFUSED,
        c if c.code().is_some() => code::REFUSED,
        _ => code::NETWORK,
    }
}

fn out_json(v: serde_json::Value) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{v}");
}

use cyberbackup_protocol::civil::iec_bytes as iec;

fn when(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, m, d) = cyberbackup_protocol::civil::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// `init`: creates the account, the device key and the repository key.
pub fn init(
    c: &V4Common,
    server: &str,
    account: &str,
    device: Option<String>,
    server_key: Option<&str>,
) -> anyhow::Result<i32> {
    if let Some(k) = server_key {
        if !cyberbackup_client::v4::profile::is_key_spec(k) {
            bail!("--server-key {k:?}: expected SHA256: and 64 hex characters (the fingerprint the server logs)");
        }
    }
    let profile = c.profile()?;
    let pass = c.passphrase(true)?;
    let device = device.unwrap_or_else(backup::hostname);
    let quiet = c.quiet || c.json;
    let w = v4::init(
        &profile,
        server,
        account,
        &device,
        &pass,
        server_key,
        &mut |fp| {
            if !quiet {
                eprintln!("server {server}: key {fp} (pinned on first use)");
            }
        },
    )?;
    if c.json {
        out_json(
            serde_json::json!({"event": "initialised", "account": w.account, "account_id": w.account_id, "device_id": w.device_id, "config_dir": profile.dir()}),
        );
    } else {
        println!(
            "created account {} on {server}; this device ({device}) may do everything; settings in {}",
            w.account,
            profile.dir().display()
        );
    }
    Ok(code::OK)
}

fn open(
    c: &V4Common,
) -> anyhow::Result<(
    v4::conn::Connection,
    cyberbackup_protocol::v4::format::RepoKey,
)> {
    let profile = c.profile()?;
    let pass = c.passphrase(false)?;
    Ok(v4::open(&profile, &pass, c.server.as_deref())?)
}

fn cancel_on_sigint(flag: Arc<std::sync::atomic::AtomicBool>) {
    let _ = signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        130,
        flag.clone(),
    );
    let _ = signal_hook::flag::register(signal_hook::consts::SIGINT, flag);
}

/// `backup PATH...`: one snapshot of the paths.
pub fn backup(c: &V4Common, paths: &[PathBuf], opts: BackupOptions) -> anyhow::Result<i32> {
    // The key is unwrapped (Argon2id) while the walk starts.
    let profile = c.profile()?;
    let pass = c.passphrase(false)?;
    let (conn, key) = v4::open_unlocking(&profile, &pass, c.server.as_deref())?;
    // An account at its quota is told so before any data is sent.
    if let Ok(Answer::UsageInfo(u)) = conn.call(&Request::Usage) {
        if u.quota > 0 && u.stored_bytes >= u.quota {
            return Err(ConnError::Server(cyberbackup_protocol::v4::wire::ErrorAnswer::new(
                ErrorCode::QUOTA_EXCEEDED,
                format!(
                    "the account is at its quota ({} of {} stored): forget snapshots (and wait for the server's collection) or ask for more space",
                    iec(u.stored_bytes),
                    iec(u.quota)
                ),
            ))
            .into());
        }
    }
    // The server may be a list of a cluster's nodes: when the connection is lost in
    // the middle, the backup starts again on the next node that answers. What the
    // lost node acknowledged is stored (the nodes share the repository), so it is
    // asked about, not sent again.
    let nodes = c
        .server
        .clone()
        .or_else(|| profile.repository().ok().map(|r| r.server))
        .map_or(1, |s| s.split(',').filter(|a| !a.trim().is_empty()).count());
    run_backup(c, |p| {
        let mut r = backup::backup_unlocking(&conn, &key, paths, &opts, p);
        let mut tries = 1;
        while tries < nodes && r.as_ref().is_err_and(connection_lost) {
            tries += 1;
            if !c.quiet {
                if let Err(e) = &r {
                    eprintln!("cyberbackup: {e}; going on with the next server of the list");
                }
            }
            let next = match v4::connect(&profile, c.server.as_deref()) {
                Ok(n) => n,
                Err(_) => break,
            };
            r = backup::backup_unlocking(&next, &key, paths, &opts, p);
        }
        r
    })
}

/// Whether a backup failed because its connection was lost (not refused).
fn connection_lost(e: &BackupError) -> bool {
    match e {
        BackupError::Conn(c) | BackupError::Snapshot(SnapshotError::Conn(c)) => {
            c.is_connection_loss()
        }
        _ => false,
    }
}

/// Runs a backup with progress on standard error (or JSON lines), then prints its
/// summary; returns the exit code (0, or 3 when files were skipped).
fn run_backup(
    c: &V4Common,
    run: impl FnOnce(&BackupProgress) -> Result<backup::BackupSummary, BackupError>,
) -> anyhow::Result<i32> {
    let progress = Arc::new(BackupProgress::default());
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    cancel_on_sigint(cancel.clone());
    let show = !c.quiet && !c.json && std::io::stderr().is_terminal();
    let json = c.json && !c.quiet;
    let (done, stop) = std::sync::mpsc::channel::<()>();
    let ticker = {
        let (p, cancel) = (progress.clone(), cancel.clone());
        std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let mut ticks = 0u64;
            // Every 200 ms, until the backup ends (then at once: its end is not
            // delayed to the next tick).
            while stop.recv_timeout(Duration::from_millis(200))
                == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            {
                ticks += 1;
                if cancel.load(Ordering::Relaxed) {
                    p.cancel.store(true, Ordering::Relaxed);
                }
                let (fd, ft) = (
                    p.files_done.load(Ordering::Relaxed),
                    p.files_total.load(Ordering::Relaxed),
                );
                let (bd, bt) = (
                    p.bytes_done.load(Ordering::Relaxed),
                    p.bytes_total.load(Ordering::Relaxed),
                );
                let secs = start.elapsed().as_secs_f64().max(0.001);
                let rate = bd as f64 / secs;
                let eta = if rate > 0.0 && bt > bd {
                    Some(((bt - bd) as f64 / rate) as u64)
                } else {
                    None
                };
                let current = p
                    .current
                    .lock()
                    .map(|c| c.display().to_string())
                    .unwrap_or_default();
                if show {
                    let line = format!(
                        "{fd}/{ft} files, {} / {}, {}/s, ETA {}, {}",
                        iec(bd),
                        iec(bt),
                        iec(rate as u64),
                        eta.map_or("-".to_string(), |e| format!("{}:{:02}", e / 60, e % 60)),
                        current
                    );
                    let line: String = line.chars().take(160).collect();
                    eprint!("\r{line}\x1b[K");
                }
                if json && ticks.is_multiple_of(5) {
                    out_json(
                        serde_json::json!({"event": "progress", "files_done": fd, "files_total": ft, "bytes_done": bd, "bytes_total": bt, "bytes_sent": p.bytes_sent.load(Ordering::Relaxed), "bytes_per_sec": rate as u64, "eta_secs": eta, "current": current}),
                    );
                }
            }
            if show {
                eprint!("\r\x1b[K");
            }
        })
    };
    let r = run(&progress);
    drop(done);
    let _ = ticker.join();
    let s = r?;
    for (p, why) in &s.skipped {
        if c.json {
            out_json(serde_json::json!({"event": "skipped", "path": p, "error": why}));
        }
        eprintln!("cyberbackup: skipped {}: {why}", p.display());
    }
    if c.json {
        out_json(serde_json::json!({
            "event": "snapshot", "id": hex(&s.snapshot), "parent": s.parent.map(|p| hex(&p)),
            "files": s.files, "dirs": s.dirs, "symlinks": s.symlinks, "size": s.size,
            "files_unchanged": s.files_unchanged, "chunks_sent": s.chunks_sent,
            "chunks_held": s.chunks_held, "bytes_sent": s.bytes_sent,
            "skipped": s.skipped.iter().map(|(p, w)| serde_json::json!({"path": p, "error": w})).collect::<Vec<_>>(),
            "seconds": s.seconds,
            "exit_code": if s.skipped.is_empty() { code::OK } else { code::PARTIAL },
        }));
    } else if !c.quiet {
        println!(
            "snapshot {} saved: {}, {}, {}, {} ({} unchanged); sent {} in {} ({} already on the server) in {:.2} s",
            &hex(&s.snapshot)[..8],
            count(s.files, "file"),
            count(s.dirs, "dir"),
            count(s.symlinks, "symlink"),
            iec(s.size),
            s.files_unchanged,
            iec(s.bytes_sent),
            count(s.chunks_sent, "new chunk"),
            s.chunks_held,
            s.seconds
        );
    }
    Ok(if s.skipped.is_empty() {
        code::OK
    } else {
        code::PARTIAL
    })
}

fn snapshot_json(s: &SnapshotInfo) -> serde_json::Value {
    serde_json::json!({
        "id": hex(&s.header.id), "time_ms": s.header.time_ms, "time": when(s.header.time_ms),
        "host": s.header.host, "tags": s.header.tags, "files": s.header.files,
        "dirs": s.header.dirs, "size": s.header.size, "stored": s.header.stored,
        "device": s.device, "committed_ms": s.committed_ms,
    })
}

/// `snapshots`: the list, oldest first.
pub fn list(c: &V4Common) -> anyhow::Result<i32> {
    let conn = v4::connect(&c.profile()?, c.server.as_deref())?;
    let all = snapshots::list(&conn)?;
    if c.json {
        out_json(serde_json::Value::Array(
            all.iter().map(snapshot_json).collect(),
        ));
        return Ok(code::OK);
    }
    println!(
        "{:<10} {:<23} {:<16} {:>8} {:>10}  tags",
        "id", "time", "host", "files", "size"
    );
    for s in &all {
        println!(
            "{:<10} {:<23} {:<16} {:>8} {:>10}  {}",
            &hex(&s.header.id)[..8],
            when(s.header.time_ms),
            s.header.host,
            s.header.files,
            iec(s.header.size),
            s.header.tags.join(",")
        );
    }
    println!("{}", count(all.len() as u64, "snapshot"));
    Ok(code::OK)
}

/// `ls SNAPSHOT [PATH]`: the tree of a snapshot.
pub fn ls(c: &V4Common, snap: &str, path: Option<&str>) -> anyhow::Result<i32> {
    let (conn, key) = open(c)?;
    let info = snapshots::find(&conn, snap)?;
    let tree = snapshots::load(&conn, &key, &info.header.id)?;
    let prefix = path.map(|p| p.trim_matches('/').to_string());
    let mut matched = 0u64;
    for e in &tree.entries {
        let p = String::from_utf8_lossy(&e.path);
        if let Some(pre) = &prefix {
            if !pre.is_empty() && p != *pre && !p.starts_with(&format!("{pre}/")) {
                continue;
            }
        }
        matched += 1;
        let (t, extra) = match &e.kind {
            EntryKind::Dir => ("dir", String::new()),
            EntryKind::File { .. } => ("file", String::new()),
            EntryKind::Symlink { target } => (
                "symlink",
                format!(" -> {}", String::from_utf8_lossy(target)),
            ),
        };
        if c.json {
            out_json(
                serde_json::json!({"path": p, "type": t, "mode": format!("{:o}", e.mode), "size": e.size, "mtime_ns": e.mtime_ns, "target": if let EntryKind::Symlink { target } = &e.kind { Some(String::from_utf8_lossy(target).into_owned()) } else { None }}),
            );
        } else {
            println!(
                "{:<7} {:>5o} {:>10} {}  {p}{extra}",
                t,
                e.mode,
                e.size,
                when(e.mtime_ns.div_euclid(1_000_000))
            );
        }
    }
    if matched == 0 {
        if let Some(p) = path {
            return Err(RestoreError::NoMatch(p.to_string()).into());
        }
    }
    Ok(code::OK)
}

/// Refuses at once, with the capability named, what this device may not do (rather
/// than failing on the first request the command happens to make).
fn require(
    conn: &v4::conn::Connection,
    cap: cyberbackup_protocol::v4::Capabilities,
    what: &str,
) -> anyhow::Result<()> {
    if conn.welcome().capabilities & cap.0 == 0 {
        return Err(ConnError::Server(cyberbackup_protocol::v4::wire::ErrorAnswer::new(
            ErrorCode::FORBIDDEN,
            format!(
                "this device may not {what}: it lacks the {} capability (ask an admin device for it: `device add`, `enrol`)",
                cap.names()
            ),
        ))
        .into());
    }
    Ok(())
}

/// `restore SNAPSHOT [PATH] --target DIR`.
pub fn restore(
    c: &V4Common,
    snap: &str,
    target: &Path,
    ropts: RestoreOptions,
) -> anyhow::Result<i32> {
    let (conn, key) = open(c)?;
    let info = snapshots::find(&conn, snap)?;
    let tree = snapshots::load(&conn, &key, &info.header.id)?;
    let progress = Arc::new(RestoreProgress::default());
    // Ctrl-C stops after the file being written is removed (a second one exits).
    let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
    cancel_on_sigint(cancel.clone());
    let (done, stop) = std::sync::mpsc::channel::<()>();
    let show = !c.quiet && !c.json && std::io::stderr().is_terminal();
    let watcher = {
        let (p, cancel) = (progress.clone(), cancel.clone());
        std::thread::spawn(move || {
            while stop.recv_timeout(Duration::from_millis(200))
                == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            {
                if cancel.load(Ordering::Relaxed) {
                    p.cancel.store(true, Ordering::Relaxed);
                }
                if show {
                    eprint!(
                        "\r{} of {} files, {} of {}   ",
                        p.files_done.load(Ordering::Relaxed),
                        p.files_total.load(Ordering::Relaxed),
                        iec(p.bytes_done.load(Ordering::Relaxed)),
                        iec(p.bytes_total.load(Ordering::Relaxed)),
                    );
                }
            }
            if show {
                eprint!("\r\x1b[K");
            }
        })
    };
    let r = restore::restore(&conn, &key, &tree, target, &ropts, &progress);
    drop(done);
    let _ = watcher.join();
    let s = r?;
    if c.json {
        out_json(
            serde_json::json!({"event": "restored", "snapshot": hex(&info.header.id), "files": s.files, "already_restored": s.skipped, "dirs": s.dirs, "symlinks": s.symlinks, "bytes": s.bytes, "target": target}),
        );
    } else if !c.quiet {
        println!(
            "restored snapshot {} to {}: {} ({} already in place), {}, {}, {}",
            &hex(&info.header.id)[..8],
            target.display(),
            count(s.files, "file"),
            s.skipped,
            count(s.dirs, "dir"),
            count(s.symlinks, "symlink"),
            iec(s.bytes)
        );
    }
    Ok(code::OK)
}

/// `dump SNAPSHOT PATH`: one file to standard output.
pub fn dump(c: &V4Common, snap: &str, path: &str) -> anyhow::Result<i32> {
    let (conn, key) = open(c)?;
    let info = snapshots::find(&conn, snap)?;
    let tree = snapshots::load(&conn, &key, &info.header.id)?;
    let mut out = std::io::stdout().lock();
    restore::dump(&conn, &key, &tree, path, &mut out)?;
    Ok(code::OK)
}

/// `forget SNAPSHOT...`.
pub fn forget(c: &V4Common, snaps: &[String]) -> anyhow::Result<i32> {
    let conn = v4::connect(&c.profile()?, c.server.as_deref())?;
    require(&conn, Capabilities::FORGET, "forget snapshots")?;
    require(&conn, Capabilities::READ, "find the snapshots to forget")?;
    for spec in snaps {
        let info = snapshots::find(&conn, spec)?;
        match conn.call(&Request::ForgetSnapshot(info.header.id)) {
            Ok(Answer::Forgotten) => {
                if !c.quiet {
                    println!("forgot snapshot {}", &hex(&info.header.id)[..8]);
                }
            }
            Ok(_) => return Err(ConnError::UnexpectedAnswer("FORGET_SNAPSHOT").into()),
            Err(e) if e.code() == Some(ErrorCode::FORBIDDEN) => {
                return Err(anyhow::Error::new(e).context("this device may not forget snapshots"))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(code::OK)
}

/// `forget --keep-...`: applies a retention policy per group of host and paths.
pub fn forget_policy(
    c: &V4Common,
    policy: &Policy,
    dry_run: bool,
    only_paths: Option<&[Vec<u8>]>,
) -> anyhow::Result<i32> {
    let (conn, key) = open(c)?;
    require(&conn, Capabilities::FORGET, "forget snapshots")?;
    require(
        &conn,
        Capabilities::READ,
        "read the snapshots a policy decides on",
    )?;
    let planned = v4::policy::plan(&conn, &key, policy, only_paths)?;
    let mut forget = Vec::new();
    let mut report = Vec::new();
    let mut group: Option<(&str, &[String])> = None;
    for p in &planned {
        if group != Some((&p.host, &p.paths)) {
            group = Some((&p.host, &p.paths));
            if !c.json && !c.quiet {
                println!("host {}, paths {}:", p.host, p.paths.join(", "));
            }
        }
        let s = &p.info;
        if !p.keep {
            forget.push(s.header.id);
        }
        report.push(serde_json::json!({"id": hex(&s.header.id), "time": when(s.header.time_ms), "host": p.host, "paths": p.paths, "keep": p.keep, "reasons": p.reasons}));
        if !c.json && !c.quiet {
            println!(
                "  {} {}  {}  {}",
                if p.keep { "keep  " } else { "forget" },
                &hex(&s.header.id)[..8],
                when(s.header.time_ms),
                p.reasons.join(", ")
            );
        }
    }
    if !dry_run {
        for id in &forget {
            match conn.call(&Request::ForgetSnapshot(*id)) {
                Ok(Answer::Forgotten) => {}
                Ok(_) => bail!("the server answered FORGET_SNAPSHOT with something else"),
                Err(e) if e.code() == Some(ErrorCode::FORBIDDEN) => {
                    return Err(
                        anyhow::Error::new(e).context("this device may not forget snapshots")
                    )
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    if c.json {
        out_json(
            serde_json::json!({"event": if dry_run { "forget_dry_run" } else { "forgot" }, "snapshots": report, "forgotten": forget.len()}),
        );
    } else if !c.quiet {
        println!(
            "{} {} of {}",
            if dry_run { "would forget" } else { "forgot" },
            forget.len(),
            count(planned.len() as u64, "snapshot")
        );
    }
    Ok(code::OK)
}

/// `diff A B`.
pub fn diff(c: &V4Common, a: &str, b: &str) -> anyhow::Result<i32> {
    let (conn, key) = open(c)?;
    let sa = snapshots::find(&conn, a)?;
    let sb = snapshots::find(&conn, b)?;
    let ta = snapshots::load(&conn, &key, &sa.header.id)?;
    let tb = snapshots::load(&conn, &key, &sb.header.id)?;
    let changes = inspect::diff(&ta, &tb);
    let (mut added, mut removed, mut modified) = (0u64, 0u64, 0u64);
    for ch in &changes {
        match ch.kind {
            inspect::ChangeKind::Added => added += ch.after,
            inspect::ChangeKind::Removed => removed += ch.before,
            _ => modified += 1,
        }
        if c.json {
            out_json(
                serde_json::json!({"change": ch.kind.mark().to_string(), "path": ch.path, "before": ch.before, "after": ch.after}),
            );
        } else {
            let size = match ch.kind {
                inspect::ChangeKind::Added => iec(ch.after),
                inspect::ChangeKind::Removed => iec(ch.before),
                _ if ch.before != ch.after => format!("{} -> {}", iec(ch.before), iec(ch.after)),
                _ => iec(ch.after),
            };
            println!("{}  {}  ({size})", ch.kind.mark(), ch.path);
        }
    }
    if !c.json && !c.quiet {
        println!(
            "{}: {} added, {} removed, {} modified",
            count(changes.len() as u64, "change"),
            iec(added),
            iec(removed),
            if modified == 1 {
                "1 entry".to_string()
            } else {
                format!("{modified} entries")
            }
        );
    }
    Ok(code::OK)
}

/// `find PATTERN`.
pub fn find(c: &V4Common, pattern: &str) -> anyhow::Result<i32> {
    let (conn, key) = open(c)?;
    let found = inspect::find(&conn, &key, pattern)?;
    for f in &found {
        if c.json {
            out_json(
                serde_json::json!({"snapshot": hex(&f.snapshot.header.id), "time": when(f.snapshot.header.time_ms), "path": f.path, "type": f.kind, "size": f.size, "mtime_ns": f.mtime_ns}),
            );
        } else {
            println!(
                "{}  {}  {:<7} {:>10}  {}",
                &hex(&f.snapshot.header.id)[..8],
                when(f.snapshot.header.time_ms),
                f.kind,
                iec(f.size),
                f.path
            );
        }
    }
    if !c.json && !c.quiet {
        println!("{} matches", found.len());
    }
    Ok(code::OK)
}

/// `check [--read-data[-subset N%]]`: exit code 8 when anything is wrong.
pub fn check(c: &V4Common, read_percent: Option<u8>) -> anyhow::Result<i32> {
    let (conn, key) = open(c)?;
    let r = inspect::check(&conn, &key, read_percent)?;
    for e in &r.errors {
        eprintln!("cyberbackup: {e}");
    }
    if c.json {
        out_json(
            serde_json::json!({"event": "check", "snapshots": r.snapshots, "chunks": r.chunks, "chunks_read": r.chunks_read, "bytes_read": r.bytes_read, "errors": r.errors}),
        );
    } else if !c.quiet {
        println!(
            "checked {} and {}{}: {}",
            count(r.snapshots as u64, "snapshot"),
            count(r.chunks as u64, "chunk"),
            if read_percent.is_some() {
                format!(
                    " ({} chunks, {} read and verified)",
                    r.chunks_read,
                    iec(r.bytes_read)
                )
            } else {
                String::new()
            },
            if r.errors.is_empty() {
                "no errors".to_string()
            } else {
                format!("{} errors", r.errors.len())
            }
        );
    }
    Ok(if r.errors.is_empty() {
        code::OK
    } else {
        code::INTEGRITY
    })
}

/// `enrol CODE`: joins this machine to an account.
pub fn enrol(
    c: &V4Common,
    server: &str,
    code: &str,
    device: Option<String>,
    server_key: Option<&str>,
) -> anyhow::Result<i32> {
    if let Some(k) = server_key {
        if !cyberbackup_client::v4::profile::is_key_spec(k) {
            bail!("--server-key {k:?}: expected SHA256: and 64 hex characters (the fingerprint the server logs)");
        }
    }
    let profile = c.profile()?;
    let device = device.unwrap_or_else(backup::hostname);
    let quiet = c.quiet || c.json;
    let w = v4::enrol(&profile, server, code, &device, server_key, &mut |fp| {
        if !quiet {
            eprintln!("server {server}: key {fp} (pinned on first use)");
        }
    })?;
    let caps = cyberbackup_protocol::v4::Capabilities(w.capabilities);
    if c.json {
        out_json(
            serde_json::json!({"event": "enrolled", "account": w.account, "device_id": w.device_id, "capabilities": caps.names()}),
        );
    } else {
        println!(
            "this device ({device}) joined account {} with capabilities {}; settings in {}",
            w.account,
            caps.names(),
            profile.dir().display()
        );
    }
    Ok(code::OK)
}

/// `device list`.
pub fn device_list(c: &V4Common) -> anyhow::Result<i32> {
    let conn = v4::connect(&c.profile()?, c.server.as_deref())?;
    let Answer::DeviceList(list) = conn.call(&Request::ListDevices)? else {
        bail!("the server answered LIST_DEVICES with something else");
    };
    if c.json {
        out_json(serde_json::Value::Array(list.iter().map(|d| serde_json::json!({"id": d.id, "name": d.name, "capabilities": cyberbackup_protocol::v4::Capabilities(d.capabilities).names(), "created_ms": d.created_ms, "revoked_ms": if d.revoked_ms == 0 { None } else { Some(d.revoked_ms) }, "this": d.this})).collect()));
        return Ok(code::OK);
    }
    println!(
        "{:>4}  {:<20} {:<26} {:<23} state",
        "id", "name", "capabilities", "added"
    );
    for d in &list {
        println!(
            "{:>4}  {:<20} {:<26} {:<23} {}{}",
            d.id,
            d.name,
            cyberbackup_protocol::v4::Capabilities(d.capabilities).names(),
            when(d.created_ms as i64),
            if d.revoked_ms > 0 {
                format!("revoked {}", when(d.revoked_ms as i64))
            } else {
                "active".into()
            },
            if d.this { " (this device)" } else { "" }
        );
    }
    Ok(code::OK)
}

/// `device add`: prints a one-time enrolment code.
pub fn device_add(c: &V4Common, caps: &str, name: &str, ttl_hours: u32) -> anyhow::Result<i32> {
    let caps = cyberbackup_protocol::v4::Capabilities::parse(caps)
        .filter(|c| c.0 != 0)
        .ok_or_else(|| {
            anyhow!("--capabilities {caps:?}: expected all, or backup,read,forget,admin")
        })?;
    if !(1..=168).contains(&ttl_hours) {
        bail!("--ttl-hours must be between 1 and 168");
    }
    let conn = v4::connect(&c.profile()?, c.server.as_deref())?;
    let Answer::Enrolment { code, expires_ms } = conn.call(&Request::DeviceAdd {
        capabilities: caps.0,
        name: name.into(),
        ttl_s: ttl_hours * 3600,
    })?
    else {
        bail!("the server answered DEVICE_ADD with something else");
    };
    if c.json {
        out_json(
            serde_json::json!({"event": "enrolment", "code": code, "expires_ms": expires_ms, "capabilities": caps.names()}),
        );
    } else {
        println!("{code}");
        eprintln!(
            "one-time code for a new device ({}), valid until {}: on the new machine run\n  cyberbackup enrol --server {} {code}",
            caps.names(),
            when(expires_ms as i64),
            conn_server(c)?
        );
    }
    Ok(code::OK)
}

fn conn_server(c: &V4Common) -> anyhow::Result<String> {
    Ok(match &c.server {
        Some(s) => s.clone(),
        None => c.profile()?.repository()?.server,
    })
}

/// `device revoke ID`.
pub fn device_revoke(c: &V4Common, id: u64) -> anyhow::Result<i32> {
    let conn = v4::connect(&c.profile()?, c.server.as_deref())?;
    match conn.call(&Request::RevokeDevice(id))? {
        Answer::DeviceRevoked => {
            if !c.quiet {
                println!("device {id} revoked");
            }
            Ok(code::OK)
        }
        _ => bail!("the server answered REVOKE_DEVICE with something else"),
    }
}

/// `key passwd`.
pub fn key_passwd(c: &V4Common, new_file: Option<&Path>) -> anyhow::Result<i32> {
    let (conn, key) = open(c)?;
    let new = if let Ok(p) = std::env::var("CYBERBACKUP_NEW_PASSWORD").map(String::into_bytes) {
        p
    } else {
        let c2 = V4Common {
            password_file: new_file.map(Path::to_path_buf),
            ..c.clone()
        };
        // Not the old passphrase's environment variable.
        if new_file.is_none() && !std::io::stdin().is_terminal() {
            bail!("no new passphrase: set CYBERBACKUP_NEW_PASSWORD or --new-password-file");
        }
        c2.passphrase_from(true, true)?
    };
    if new.is_empty() {
        bail!("an empty passphrase is not allowed");
    }
    v4::change_passphrase(&conn, &key, &new)?;
    if !c.quiet {
        println!("the repository key is now wrapped under the new passphrase");
    }
    Ok(code::OK)
}

/// `key list`: the account's wrapped repository key and how it is protected.
pub fn key_list(c: &V4Common) -> anyhow::Result<i32> {
    let conn = v4::connect(&c.profile()?, c.server.as_deref())?;
    let wrapped = match conn.call(&Request::GetKey)? {
        Answer::Key(k) => k,
        _ => return Err(ConnError::UnexpectedAnswer("GET_KEY").into()),
    };
    let cost = cyberbackup_protocol::v4::format::RepoKey::wrapped_cost(&wrapped)?;
    // Names this wrapping by its random salt (new with every `key passwd`); it says
    // nothing of the key inside.
    let id = hex(&wrapped[13..21]);
    if c.json {
        out_json(serde_json::json!({
            "event": "key", "id": id, "kdf": "argon2id", "memory_kib": cost.m_kib,
            "passes": cost.t, "lanes": cost.p, "cipher": "aes-256-gcm",
            "account": conn.welcome().account,
        }));
    } else {
        println!(
            "account {}: 1 repository key, wrapped under one passphrase\n  id {id}  Argon2id {} MiB, {} passes, {} lanes; AES-256-GCM\n(`key passwd` re-wraps it under a new passphrase; the key itself, and so every snapshot, stays the same)",
            conn.welcome().account,
            cost.m_kib / 1024,
            cost.t,
            cost.p
        );
    }
    Ok(code::OK)
}

/// `stats`: the snapshots' logical size against what the server stores.
pub fn stats(c: &V4Common) -> anyhow::Result<i32> {
    let conn = v4::connect(&c.profile()?, c.server.as_deref())?;
    let all = snapshots::list(&conn)?;
    let Answer::UsageInfo(u) = conn.call(&Request::Usage)? else {
        bail!("the server answered USAGE with something else");
    };
    let logical: u64 = all.iter().map(|s| s.header.size).sum();
    let ratio = if u.stored_bytes > 0 {
        logical as f64 / u.stored_bytes as f64
    } else {
        0.0
    };
    if c.json {
        out_json(
            serde_json::json!({"snapshots": all.len(), "logical_bytes": logical, "stored_bytes": u.stored_bytes, "chunks": u.chunks, "dedup_ratio": ratio, "quota": u.quota}),
        );
    } else {
        println!("snapshots:          {}", all.len());
        println!(
            "size of snapshots:  {} (the files as backed up, every snapshot counted)",
            iec(logical)
        );
        println!(
            "stored on server:   {} in {} chunks (deduplicated, compressed, encrypted)",
            iec(u.stored_bytes),
            u.chunks
        );
        println!("ratio:              {ratio:.2}x");
        if u.quota > 0 {
            println!(
                "quota:              {} ({:.0}% used)",
                iec(u.quota),
                100.0 * u.stored_bytes as f64 / u.quota as f64
            );
        } else {
            println!("quota:              none");
        }
    }
    Ok(code::OK)
}

/// `usage`: what the account holds on the server.
pub fn usage(c: &V4Common) -> anyhow::Result<i32> {
    let conn = v4::connect(&c.profile()?, c.server.as_deref())?;
    let Answer::UsageInfo(u) = conn.call(&Request::Usage)? else {
        return Err(anyhow!("the server answered USAGE with something else"));
    };
    if c.json {
        out_json(
            serde_json::json!({"account": conn.welcome().account, "chunks": u.chunks, "stored_bytes": u.stored_bytes, "snapshots": u.snapshots, "quota": u.quota, "server_key": fingerprint(conn.server_key())}),
        );
    } else {
        println!(
            "account {}: {}, {}, {} stored{}; server key {}",
            conn.welcome().account,
            count(u.snapshots, "snapshot"),
            count(u.chunks, "chunk"),
            iec(u.stored_bytes),
            if u.quota > 0 {
                format!(" of a {} quota", iec(u.quota))
            } else {
                String::new()
            },
            fingerprint(conn.server_key())
        );
    }
    Ok(code::OK)
}

/// `prune`: the server deletes the account's unreferenced chunks now.
pub fn prune(c: &V4Common) -> anyhow::Result<i32> {
    let conn = v4::connect(&c.profile()?, c.server.as_deref())?;
    require(&conn, Capabilities::FORGET, "prune")?;
    let (chunks, bytes, grace_s) = match conn.call(&Request::Prune) {
        Ok(Answer::Pruned {
            chunks,
            bytes,
            grace_s,
        }) => (chunks, bytes, grace_s),
        Ok(_) => return Err(ConnError::UnexpectedAnswer("PRUNE").into()),
        Err(e) if e.code() == Some(ErrorCode::FORBIDDEN) => {
            return Err(anyhow::Error::new(e).context(
                "this device may not prune (it lacks the forget capability; backup-only devices never remove data)",
            ))
        }
        Err(e) => return Err(e.into()),
    };
    let Answer::UsageInfo(u) = conn.call(&Request::Usage)? else {
        return Err(ConnError::UnexpectedAnswer("USAGE").into());
    };
    if c.json {
        out_json(serde_json::json!({
            "event": "pruned", "chunks_deleted": chunks, "bytes_freed": bytes,
            "grace_secs": grace_s, "stored_bytes": u.stored_bytes, "chunks": u.chunks,
            "exit_code": code::OK,
        }));
    } else if !c.quiet {
        println!(
            "pruned {} {}, freeing {}; the account now holds {} in {} {}{}",
            chunks,
            plural(chunks, "chunk", "chunks"),
            iec(bytes),
            iec(u.stored_bytes),
            u.chunks,
            plural(u.chunks, "chunk", "chunks"),
            if grace_s > 0 {
                format!(
                    " (chunks stored or asked about in the last {} are kept, for backups in flight)",
                    duration_words(grace_s)
                )
            } else {
                String::new()
            }
        );
    }
    Ok(code::OK)
}

/// "1 file", "2 files".
fn count(n: u64, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

fn plural<'a>(n: u64, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

fn duration_words(s: u64) -> String {
    match s {
        s if s % 86_400 == 0 => format!("{} {}", s / 86_400, plural(s / 86_400, "day", "days")),
        s if s % 3600 == 0 => format!("{} {}", s / 3600, plural(s / 3600, "hour", "hours")),
        s if s % 60 == 0 => format!("{} {}", s / 60, plural(s / 60, "minute", "minutes")),
        s => format!("{s} {}", plural(s, "second", "seconds")),
    }
}

/// The v3 identity for `legacy`: me.info, with its key line replaced by `private_key`'s
/// contents (base64 or DER) when given.
pub fn legacy_identity(
    me_info: &Path,
    private_key: Option<&Path>,
) -> anyhow::Result<cyberbackup_client::Identity> {
    use base64::Engine;
    let bad = |path: &Path, e: std::io::Error| cyberbackup_client::ClientError::BadIdentity {
        path: path.to_owned(),
        reason: format!("cannot be read ({e}); give the v3 client's me.info with --identity"),
    };
    let text = std::fs::read_to_string(me_info).map_err(|e| bad(me_info, e))?;
    let text = match private_key {
        None => text,
        Some(p) => {
            let raw = std::fs::read(p).map_err(|e| bad(p, e))?;
            let b64 = match std::str::from_utf8(&raw) {
                Ok(t)
                    if base64::engine::general_purpose::STANDARD
                        .decode(t.split_whitespace().collect::<String>())
                        .is_ok() =>
                {
                    t.split_whitespace().collect::<String>()
                }
                _ => base64::engine::general_purpose::STANDARD.encode(&raw),
            };
            let mut lines: Vec<&str> = text.lines().take(2).collect();
            lines.push(&b64);
            lines.join("\n")
        }
    };
    Ok(cyberbackup_client::Identity::parse(&text, me_info)?)
}

fn legacy_open(
    c: &V4Common,
    identity: &cyberbackup_client::Identity,
    with_key: bool,
) -> anyhow::Result<(
    v4::conn::Connection,
    Option<cyberbackup_protocol::v4::format::RepoKey>,
    legacy::LegacyAccount,
)> {
    let (conn, key) = if with_key {
        let (conn, key) = open(c)?;
        (conn, Some(key))
    } else {
        (v4::connect(&c.profile()?, c.server.as_deref())?, None)
    };
    let acct = legacy::login(&conn, identity).map_err(|e| match e {
        LegacyError::Conn(ConnError::Server(s)) if s.code == ErrorCode::FORBIDDEN => {
            anyhow::Error::new(ConnError::Server(s)).context(format!(
                "the server has no v3 client {:?} with this key (or this device lacks the read capability)",
                identity.name
            ))
        }
        other => other.into(),
    })?;
    Ok((conn, key, acct))
}

/// `legacy list`: the files a v3 identity uploaded.
pub fn legacy_list(c: &V4Common, identity: &cyberbackup_client::Identity) -> anyhow::Result<i32> {
    let (conn, _, acct) = legacy_open(c, identity, false)?;
    let files = legacy::list(&conn)?;
    if c.json {
        for f in &files {
            out_json(
                serde_json::json!({"event": "legacy_file", "name": f.name, "size": f.size, "cksum": f.cksum, "stored_ms": f.stored_ms, "stored": when(f.stored_ms as i64)}),
            );
        }
        out_json(
            serde_json::json!({"event": "summary", "v3_client": acct.name, "files": files.len(), "bytes": acct.bytes, "exit_code": code::OK}),
        );
    } else {
        for f in &files {
            println!(
                "{}  {:>10}  {}",
                when(f.stored_ms as i64),
                iec(f.size),
                f.name
            );
        }
        if !c.quiet {
            println!(
                "v3 client {}: {} {}, {}",
                acct.name,
                files.len(),
                plural(files.len() as u64, "file", "files"),
                iec(acct.bytes)
            );
        }
    }
    Ok(code::OK)
}

/// `legacy restore [NAME...] --target DIR`: downloads v3 files, verified.
pub fn legacy_restore(
    c: &V4Common,
    identity: &cyberbackup_client::Identity,
    names: &[String],
    target: &Path,
    overwrite: bool,
) -> anyhow::Result<i32> {
    let (conn, _, acct) = legacy_open(c, identity, false)?;
    let files = legacy::select(legacy::list(&conn)?, names)?;
    let progress = RestoreProgress::default();
    let s = legacy::restore(&conn, &files, target, overwrite, &progress)?;
    if c.json {
        out_json(
            serde_json::json!({"event": "restored", "v3_client": acct.name, "files": s.files, "already_restored": s.skipped, "bytes": s.bytes, "target": target, "exit_code": code::OK}),
        );
    } else if !c.quiet {
        println!(
            "restored {} {} of v3 client {} to {} ({} already in place), {}",
            s.files,
            plural(s.files, "file", "files"),
            acct.name,
            target.display(),
            s.skipped,
            iec(s.bytes)
        );
    }
    Ok(code::OK)
}

/// `legacy import [NAME...]`: the v3 files as one v4 snapshot.
pub fn legacy_import(
    c: &V4Common,
    identity: &cyberbackup_client::Identity,
    names: &[String],
    opts: BackupOptions,
) -> anyhow::Result<i32> {
    let (conn, key, acct) = legacy_open(c, identity, true)?;
    let key = key.ok_or_else(|| anyhow!("no repository key"))?;
    let files = legacy::select(legacy::list(&conn)?, names)?;
    if files.is_empty() {
        bail!("v3 client {} has no stored files to import", acct.name);
    }
    run_backup(c, |p| legacy::import(&conn, &key, &acct, &files, &opts, p))
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_and_sizes() {
        assert_eq!(super::when(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::when(1_764_806_400_000), "2025-12-04 00:00:00 UTC");
        assert_eq!(super::when(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::iec(1023), "1023 B");
        assert_eq!(super::iec(1536), "1.5 KiB");
        assert_eq!(super::iec(5 << 30), "5.0 GiB");
    }
}
