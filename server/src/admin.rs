//! The administrative commands (`cyberbackup-server accounts`, `quota`, `scrub`, ...),
//! and the admin socket through which they reach a running server.
//!
//! A running server listens on a Unix socket (`--admin-socket`, by default
//! `<repository>/admin.sock`, mode 0600: only the server's user and root can connect).
//! A command connects, sends its [`Admin`] as one JSON line, and gets JSON lines back:
//! `{"out": TEXT}` for standard output, `{"progress": TEXT}` for standard error, and
//! last `{"exit": CODE}` (with `"error"` when it failed). The server runs the command
//! on the repository it serves, so a collection or scrub runs beside the backups in
//! flight and shows its progress.
//!
//! When no server answers on the socket, the command works on the stopped server's
//! data itself (the repository's lock keeps a server from starting meanwhile).
//! `key` and `check-config` never need the server.
//!
//! Exit codes: 0 done; 1 failed (the message says why); 2 bad arguments; 3 `scrub`
//! found damage, or `status` found no server running.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Admin, Config};
use crate::repo::gc::Scope;
use crate::repo::{Repo, RepoError};
use crate::shutdown::Shutdown;

/// Longest request line read from the socket.
const MAX_REQUEST: u64 = 64 * 1024;
/// How often a long command reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// One line of the socket's answer.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Line {
    Out(String),
    Progress(String),
    Exit {
        code: i32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// Where a command's output goes: the terminal, or the socket's client.
trait Output {
    fn out(&mut self, text: &str);
    fn progress(&mut self, text: &str);
}

struct Terminal;

impl Output for Terminal {
    fn out(&mut self, text: &str) {
        println!("{text}");
    }
    fn progress(&mut self, text: &str) {
        eprintln!("{text}");
    }
}

struct Socket<'a>(&'a mut UnixStream);

impl Socket<'_> {
    fn send(&mut self, line: &Line) {
        // The client hung up: the command still runs to its end.
        let mut text = serde_json::to_string(line).unwrap_or_default();
        text.push('\n');
        let _ = self.0.write_all(text.as_bytes());
    }
}

impl Output for Socket<'_> {
    fn out(&mut self, text: &str) {
        self.send(&Line::Out(text.to_owned()));
    }
    fn progress(&mut self, text: &str) {
        self.send(&Line::Progress(text.to_owned()));
    }
}

/// What a running server tells `status`.
#[derive(Debug)]
pub struct ServerInfo {
    pub shutdown: Arc<Shutdown>,
    pub started: Instant,
    /// The configured address (the bound one, once every shard listens, is [`LISTEN`]).
    pub listen: std::net::SocketAddr,
    pub admin_http: Option<std::net::SocketAddr>,
}

/// The address the shards listen on, once they all do.
pub static LISTEN: std::sync::OnceLock<std::net::SocketAddr> = std::sync::OnceLock::new();

// ---- the server's side ----

/// Listens on `path` (a stale socket from a crash is replaced: the caller holds the
/// data directory's lock) and runs each command on `repo` on its own thread. The
/// socket file is removed when the returned guard drops.
pub fn serve(path: &Path, repo: Repo, info: Arc<ServerInfo>) -> Result<SocketGuard> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing a stale {}", path.display())),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot open the admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    std::thread::Builder::new()
        .name("admin-socket".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (repo, info) = (repo.clone(), info.clone());
                let _ = std::thread::Builder::new()
                    .name("admin-cmd".into())
                    .spawn(move || answer(stream, &repo, &info));
            }
        })
        .context("starting the admin socket's thread")?;
    Ok(SocketGuard(path.to_owned()))
}

/// Removes the admin socket's file when dropped.
#[derive(Debug)]
pub struct SocketGuard(std::path::PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn answer(mut stream: UnixStream, repo: &Repo, info: &ServerInfo) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let read = BufReader::new((&stream).take(MAX_REQUEST)).read_line(&mut line);
    let exit = match read {
        Ok(_) if line.ends_with('\n') => match serde_json::from_str::<Admin>(&line) {
            Ok(cmd) => {
                tracing::info!(command = ?cmd, "admin command");
                match execute(&cmd, repo, Some(info), &mut Socket(&mut stream)) {
                    Ok(code) => Line::Exit { code, error: None },
                    Err(e) => Line::Exit {
                        code: 1,
                        error: Some(format!("{e:#}")),
                    },
                }
            }
            Err(e) => Line::Exit {
                code: 2,
                error: Some(format!("not a command this server knows: {e}")),
            },
        },
        _ => Line::Exit {
            code: 2,
            error: Some(format!(
                "expected one JSON line of at most {MAX_REQUEST} bytes"
            )),
        },
    };
    Socket(&mut stream).send(&exit);
}

// ---- the command's side ----

/// Runs `cmd`; returns the process exit code.
pub fn run(cmd: Admin, cfg: &Config) -> Result<i32> {
    // The configured grace period, unless the command names one.
    let cmd = match cmd {
        Admin::Gc { grace_hours: None } => Admin::Gc {
            grace_hours: Some(cfg.gc_grace.as_secs().div_ceil(3600)),
        },
        cmd => cmd,
    };
    match &cmd {
        Admin::CheckConfig => return check_config(cfg),
        Admin::Key => return key(cfg),
        Admin::RemoveV3Clients {
            name_prefix,
            dry_run,
        } => return remove_v3_clients(cfg, name_prefix, *dry_run),
        Admin::RemoveAccounts {
            name_prefix,
            dry_run,
        } => return remove_accounts(cfg, name_prefix, *dry_run),
        Admin::Quota { bytes, .. } if parse_bytes(bytes).is_none() => {
            eprintln!("--bytes {bytes:?}: expected e.g. 50G, 1048576, or none");
            return Ok(2);
        }
        Admin::EnrolCode { ttl_hours, .. } if *ttl_hours == 0 || *ttl_hours > 24 * 30 => {
            eprintln!("--ttl-hours must be between 1 and 720");
            return Ok(2);
        }
        Admin::EnrolCode { capabilities, .. }
            if crate::repo::Capabilities::parse(capabilities)
                .is_none_or(|c| c == crate::repo::Capabilities::NONE) =>
        {
            eprintln!("--capabilities {capabilities:?}: expected all, or backup,read,forget,admin");
            return Ok(2);
        }
        _ => {}
    }
    match UnixStream::connect(&cfg.admin_socket) {
        Ok(stream) => return relay(stream, &cmd),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) => {}
        Err(e) => bail!(
            "cannot reach the running server's admin socket {}: {e} (run as the server's user or root)",
            cfg.admin_socket.display()
        ),
    }
    if let Admin::Status = cmd {
        println!(
            "not running (nothing answers on {})",
            cfg.admin_socket.display()
        );
        return Ok(3);
    }
    let db = cfg.repository.join("repo.db");
    if cfg.registry.is_none() && !db.exists() {
        bail!(
            "{}: no v4 repository here (check --repository or the config file)",
            db.display()
        );
    }
    let repo = match Repo::open(
        &cfg.repository,
        cfg.registry.as_deref(),
        cfg.registry_connections,
        cfg.s3.as_ref(),
    ) {
        Ok(r) => r,
        Err(RepoError::Locked { path }) => bail!(
            "{} is held by a running server whose admin socket {} does not answer",
            path.display(),
            cfg.admin_socket.display()
        ),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening the v4 repository {}", cfg.repository.display()))
        }
    };
    execute(&cmd, &repo, None, &mut Terminal)
}

/// Sends `cmd` to the running server and prints its answer.
fn relay(mut stream: UnixStream, cmd: &Admin) -> Result<i32> {
    let mut req = serde_json::to_string(cmd)?;
    req.push('\n');
    stream
        .write_all(req.as_bytes())
        .context("sending the command to the server")?;
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading the server's answer")?;
        match serde_json::from_str::<Line>(&line) {
            Ok(Line::Out(t)) => println!("{t}"),
            Ok(Line::Progress(t)) => eprintln!("{t}"),
            Ok(Line::Exit { code, error }) => {
                if let Some(e) = error {
                    eprintln!("cyberbackup-server: error: {e}");
                }
                return Ok(code);
            }
            Err(e) => bail!("the server answered {line:?}: {e}"),
        }
    }
    bail!("the server closed the admin socket before the command finished (it stopped?)")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

use cyberbackup_protocol::civil::iec_bytes as human;

/// Parses "10G", "512M", "1048576", or "none".
fn parse_bytes(s: &str) -> Option<Option<u64>> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("none") {
        return Some(None);
    }
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult).map(Some)
}

fn account_id(repo: &Repo, name: &str) -> Result<crate::repo::AccountId> {
    repo.account_by_name(name)?
        .with_context(|| format!("no account named {name:?} (see `cyberbackup-server accounts`)"))
}

/// Runs a command on `repo`, in the server (`server` set) or on a stopped one's data.
fn execute(
    cmd: &Admin,
    repo: &Repo,
    server: Option<&ServerInfo>,
    out: &mut dyn Output,
) -> Result<i32> {
    match cmd {
        Admin::Status => {
            let Some(s) = server else {
                out.out("not running");
                return Ok(3);
            };
            out.out(&format!(
                "running: pid {}, up {} s, serving {}{}",
                std::process::id(),
                s.started.elapsed().as_secs(),
                LISTEN.get().unwrap_or(&s.listen),
                match s.admin_http {
                    Some(a) => format!(", metrics on http://{a}/metrics"),
                    None => String::new(),
                }
            ));
            out.out(&format!(
                "connections open: {}{}",
                s.shutdown
                    .connections
                    .load(std::sync::atomic::Ordering::Relaxed),
                if s.shutdown.is_triggered() {
                    " (draining: shutting down)"
                } else {
                    ""
                }
            ));
            let running = repo.maintenance();
            if running.is_empty() {
                out.out("maintenance: none running");
            }
            for p in running {
                out.out(&format!("maintenance: {}", describe(&p, repo)));
            }
            Ok(0)
        }
        Admin::Accounts => {
            out.out(&format!(
                "{:>4}  {:<24} {:>7} {:>9} {:>10} {:>10}  {}",
                "ID", "NAME", "DEVICES", "SNAPSHOTS", "STORED", "QUOTA", "LAST BACKUP (UTC)"
            ));
            for id in repo.accounts()? {
                let name = repo.account_name(id)?.unwrap_or_default();
                let u = repo.usage(id)?;
                let devices = repo
                    .list_devices(id)?
                    .iter()
                    .filter(|d| !d.revoked())
                    .count();
                let last = repo
                    .list_snapshots(id)?
                    .iter()
                    .map(|h| h.committed_ms)
                    .max()
                    .map(cyberbackup_protocol::civil::format_utc_ms)
                    .unwrap_or_else(|| "never".into());
                out.out(&format!(
                    "{id:>4}  {name:<24} {devices:>7} {:>9} {:>10} {:>10}  {last}",
                    u.snapshots,
                    human(u.stored_bytes),
                    u.quota.map(human).unwrap_or_else(|| "none".into()),
                ));
            }
            Ok(0)
        }
        Admin::Devices { account } => {
            let id = account_id(repo, account)?;
            out.out(&format!(
                "{:>4}  {:<24} {:<26} {:<21} {}",
                "ID", "NAME", "CAPABILITIES", "ENROLLED (UTC)", "REVOKED (UTC)"
            ));
            for d in repo.list_devices(id)? {
                out.out(&format!(
                    "{:>4}  {:<24} {:<26} {:<21} {}",
                    d.id,
                    d.name,
                    d.caps.names(),
                    cyberbackup_protocol::civil::format_utc_ms(d.created_ms),
                    d.revoked_ms
                        .map(cyberbackup_protocol::civil::format_utc_ms)
                        .unwrap_or_else(|| "-".into())
                ));
            }
            Ok(0)
        }
        Admin::Revoke { account, device } => {
            let id = account_id(repo, account)?;
            let Some(d) = repo
                .list_devices(id)?
                .into_iter()
                .find(|d| d.id == *device as i64)
            else {
                bail!("account {account:?} has no device {device} (see `cyberbackup-server devices --account {account}`)");
            };
            if d.revoked() {
                out.out(&format!(
                    "device {device} ({}) of {account:?} was revoked already",
                    d.name
                ));
                return Ok(0);
            }
            repo.revoke_device(id, d.id)?;
            out.out(&format!(
                "device {device} ({}) of {account:?} revoked: its connections are refused from now on",
                d.name
            ));
            Ok(0)
        }
        Admin::Quota { account, bytes } => {
            let q = parse_bytes(bytes).with_context(|| {
                format!("--bytes {bytes:?}: expected e.g. 50G, 1048576, or none")
            })?;
            let id = account_id(repo, account)?;
            repo.set_quota(id, q)?;
            out.out(&match q {
                Some(b) => format!("quota of {account:?}: {b} bytes ({})", human(b)),
                None => format!("quota of {account:?}: none"),
            });
            Ok(0)
        }
        Admin::EnrolCode {
            account,
            capabilities,
            ttl_hours,
        } => {
            use crate::repo::Capabilities;
            let caps = Capabilities::parse(capabilities)
                .filter(|c| *c != Capabilities::NONE)
                .with_context(|| {
                    format!("--capabilities {capabilities:?}: expected all, or backup,read,forget,admin")
                })?;
            if *ttl_hours == 0 || *ttl_hours > 24 * 30 {
                bail!("--ttl-hours must be between 1 and 720");
            }
            let id = account_id(repo, account)?;
            let (code, _expires) =
                repo.new_enrolment(id, caps, Duration::from_secs(ttl_hours * 3600))?;
            out.out(&code);
            out.progress(&format!(
                "enrolment code for account {account:?} ({}), valid {ttl_hours} h: on the new machine run\n  cyberbackup enrol --server HOST:PORT {code}",
                caps.names()
            ));
            Ok(0)
        }
        Admin::Gc { grace_hours } => {
            let grace = Duration::from_secs(grace_hours.unwrap_or(24).saturating_mul(3600));
            let r = with_progress(repo, out, move |repo| {
                repo.collect_garbage(Scope::All, grace, crate::repo::now_unix_ms())
            })
            .context("collecting garbage")?;
            out.out(&format!(
                "gc: {} accounts; {} unreferenced chunks deleted ({} bytes freed); {} orphan chunk blobs and {} orphan snapshot bodies removed; packs: {} removed, {} repacked, {} orphans removed",
                r.accounts, r.chunks_deleted, r.bytes_freed, r.orphan_chunk_blobs, r.orphan_bodies,
                r.packs_deleted, r.packs_repacked, r.orphan_packs
            ));
            Ok(0)
        }
        Admin::Scrub => {
            let r = with_progress(repo, out, |repo| repo.scrub(Scope::All)).context("scrubbing")?;
            for (a, id) in &r.damaged {
                out.out(&format!("damaged chunk: account {a} chunk {}", hex(id)));
            }
            for (a, id) in &r.missing {
                out.out(&format!("missing chunk: account {a} chunk {}", hex(id)));
            }
            for (a, id) in &r.damaged_bodies {
                out.out(&format!(
                    "damaged snapshot: account {a} snapshot {}",
                    hex(id)
                ));
            }
            out.out(&format!(
                "scrub: {} accounts, {} chunks ({} bytes) and {} snapshot bodies checked; {} damaged, {} missing, {} bad snapshot bodies",
                r.accounts,
                r.chunks_checked,
                r.bytes_checked,
                r.bodies_checked,
                r.damaged.len(),
                r.missing.len(),
                r.damaged_bodies.len()
            ));
            let bad =
                !r.damaged.is_empty() || !r.missing.is_empty() || !r.damaged_bodies.is_empty();
            Ok(if bad { 3 } else { 0 })
        }
        // Answered without the repository (see `run`); a server asked for them answers
        // the same way.
        Admin::Key
        | Admin::CheckConfig
        | Admin::RemoveV3Clients { .. }
        | Admin::RemoveAccounts { .. } => {
            bail!("this command runs where it is typed, not in the server")
        }
    }
}

/// One line about a running collection or scrub.
fn describe(p: &crate::repo::Progress, repo: &Repo) -> String {
    let _ = repo;
    let secs = (crate::repo::now_unix_ms() - p.started_ms).max(0) / 1000;
    match p.kind {
        "scrub" => format!(
            "scrub running for {secs} s: {}/{} accounts, {} chunks ({}) read back",
            p.accounts_done,
            p.accounts_total,
            p.chunks_checked,
            human(p.bytes_checked)
        ),
        _ => format!(
            "gc running for {secs} s: {}/{} accounts, {} chunks deleted",
            p.accounts_done, p.accounts_total, p.chunks_deleted
        ),
    }
}

/// Runs `f` on its own thread and reports the repository's maintenance progress every
/// [`PROGRESS_EVERY`] until it ends.
fn with_progress<T: Send + 'static>(
    repo: &Repo,
    out: &mut dyn Output,
    f: impl FnOnce(&Repo) -> Result<T, RepoError> + Send + 'static,
) -> Result<T, RepoError> {
    let (tx, rx) = std::sync::mpsc::channel();
    let r2 = repo.clone();
    std::thread::Builder::new()
        .name("admin-task".into())
        .spawn(move || {
            let _ = tx.send(f(&r2));
        })
        .map_err(|e| RepoError::Io {
            what: "starting a maintenance thread",
            path: Default::default(),
            source: Arc::new(e),
        })?;
    loop {
        match rx.recv_timeout(PROGRESS_EVERY) {
            Ok(r) => return r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if let Some(p) = repo.maintenance().last() {
                    out.progress(&describe(p, repo));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err(RepoError::Stopped),
        }
    }
}

/// Removes the v3 clients named `prefix*`: rows and files, on a stopped server (the
/// data directory's lock proves it is stopped, and keeps one from starting meanwhile).
fn remove_v3_clients(cfg: &Config, prefix: &str, dry_run: bool) -> Result<i32> {
    if prefix.chars().count() < 3 {
        eprintln!("--name-prefix must have at least 3 characters (it selects clients to delete)");
        return Ok(2);
    }
    let _lock = crate::datadir::lock(&cfg.storage)
        .context("remove-v3-clients runs only while the server is stopped")?;
    if !cfg.database.exists() {
        bail!(
            "{}: no v3 registry here (check --database)",
            cfg.database.display()
        );
    }
    let mut db = rusqlite::Connection::open(&cfg.database)
        .with_context(|| format!("opening {}", cfg.database.display()))?;
    let tx = db.transaction()?;
    let victims: Vec<(Vec<u8>, String, u64, u64)> = {
        let mut st = tx.prepare(
            "SELECT c.id, c.name, count(f.id), coalesce(sum(f.size), 0)
             FROM clients c LEFT JOIN files f ON f.client_id = c.id
             WHERE substr(c.name, 1, length(?1)) = ?1 GROUP BY c.id ORDER BY c.name",
        )?;
        let rows = st.query_map([prefix], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get::<_, i64>(2)? as u64,
                r.get::<_, i64>(3)? as u64,
            ))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let (files, bytes) = victims.iter().fold((0, 0), |(f, b), v| (f + v.2, b + v.3));
    if dry_run {
        for (_, name, n, b) in &victims {
            println!("would remove {name}: {n} files, {}", human(*b));
        }
        println!(
            "would remove {} v3 clients, {files} files, {}",
            victims.len(),
            human(bytes)
        );
        return Ok(0);
    }
    for (id, ..) in &victims {
        tx.execute("DELETE FROM files WHERE client_id = ?1", [id])?;
        tx.execute("DELETE FROM clients WHERE id = ?1", [id])?;
    }
    tx.commit()?;
    // Rows first: a crash between leaves files no row names, which nobody serves.
    for (id, name, ..) in &victims {
        let dir = cfg.storage.join(hex(id));
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!("{name}: removing {}: {e}", dir.display()),
        }
    }
    println!(
        "removed {} v3 clients, {files} files, {}",
        victims.len(),
        human(bytes)
    );
    Ok(0)
}

/// Removes the v4 accounts named `prefix*` with everything they hold: each account's
/// rows in one transaction, then its blobs ([`Repo::remove_account`]). A local
/// repository (SQLite and files) only while the server is stopped: opening it takes its
/// lock, which proves that and keeps one from starting meanwhile. A shared one
/// (PostgreSQL, with an object store) while the nodes run: the removal holds the
/// cluster's round lock, so no node's round is midway, and a round after it finds no
/// account and writes nothing.
fn remove_accounts(cfg: &Config, prefix: &str, dry_run: bool) -> Result<i32> {
    if prefix.chars().count() < 3 {
        eprintln!("--name-prefix must have at least 3 characters (it selects accounts to delete)");
        return Ok(2);
    }
    let db_path = cfg.repository.join("repo.db");
    if cfg.registry.is_none() && !db_path.exists() {
        bail!(
            "{}: no v4 repository here (check --repository or the config file)",
            db_path.display()
        );
    }
    let repo = match Repo::open(
        &cfg.repository,
        cfg.registry.as_deref(),
        cfg.registry_connections,
        cfg.s3.as_ref(),
    ) {
        Ok(r) => r,
        Err(RepoError::Locked { path }) => bail!(
            "remove-accounts runs only while the server is stopped ({} is held)",
            path.display()
        ),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening the v4 repository {}", cfg.repository.display()))
        }
    };
    let mut victims: Vec<(i64, String, u64, u64)> = Vec::new();
    for id in repo.accounts()? {
        let Some(name) = repo.account_name(id)? else {
            continue; // removed meanwhile
        };
        if name.starts_with(prefix) {
            let u = repo.usage(id)?;
            victims.push((id, name, u.snapshots, u.stored_bytes));
        }
    }
    victims.sort_by(|a, b| a.1.cmp(&b.1));
    let (snapshots, bytes) = victims.iter().fold((0, 0), |(n, b), v| (n + v.2, b + v.3));
    if dry_run {
        for (_, name, n, b) in &victims {
            println!("would remove {name}: {n} snapshots, {}", human(*b));
        }
        println!(
            "would remove {} v4 accounts, {snapshots} snapshots, {}",
            victims.len(),
            human(bytes)
        );
        return Ok(0);
    }
    let mut code = 0;
    let mut removed = 0;
    for (id, name, ..) in &victims {
        match repo.remove_account(*id) {
            Ok(true) => removed += 1,
            Ok(false) => {} // removed meanwhile (another remove-accounts)
            Err(e) => {
                eprintln!(
                    "{name}: {e} (if its rows are gone, its blobs may remain: the store's \
                     {id}/ prefix or directory)"
                );
                code = 1;
            }
        }
    }
    println!(
        "removed {removed} v4 accounts, {snapshots} snapshots, {}",
        human(bytes)
    );
    Ok(code)
}

/// Prints the server's v4 key fingerprint (what clients pin).
fn key(cfg: &Config) -> Result<i32> {
    let path = cfg.repository.join("server.key");
    if !path.exists() {
        bail!(
            "{}: no server key yet (the server makes it on its first start)",
            path.display()
        );
    }
    let key = crate::server_key::load_or_create(&path)?;
    println!(
        "{}",
        cyberbackup_protocol::v4::noise::fingerprint(key.public())
    );
    Ok(0)
}

/// Whether a file or directory could be made at `p`: the nearest existing ancestor
/// is a directory this process may write (for the user it runs as, and not on a
/// read-only file system).
fn creatable(p: &Path) -> Result<(), String> {
    let parent = p
        .ancestors()
        .skip(1)
        .map(|a| {
            if a.as_os_str().is_empty() {
                Path::new(".")
            } else {
                a
            }
        })
        .find(|a| a.exists())
        .ok_or_else(|| "no existing parent directory".to_owned())?;
    if !parent.is_dir() {
        return Err(format!("{} is not a directory", parent.display()));
    }
    nix::unistd::access(parent, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| format!("cannot write in {}: {e}", parent.display()))
}

/// What is at `p`, which must be (or could become) a writable directory (`dir`) or a
/// file: a description, or the problem.
fn path_state(p: &Path, dir: bool) -> Result<&'static str, String> {
    match std::fs::metadata(p) {
        Ok(m) if dir && !m.is_dir() => Err("not a directory".into()),
        Ok(m) if !dir && m.is_dir() => Err("a directory, not a database file".into()),
        Ok(_) if !dir => Ok("exists"),
        Ok(_) => nix::unistd::access(p, nix::unistd::AccessFlags::W_OK)
            .map(|()| "a writable directory")
            .map_err(|e| format!("not writable: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => creatable(p)
            .map(|()| "missing: made on first start")
            .map_err(|why| format!("missing, and cannot be made: {why}")),
        Err(e) => Err(e.to_string()),
    }
}

/// The pid of a server holding `<storage>/.lock` now, if one does (without making
/// anything).
fn running_server(storage: &Path) -> Option<String> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(storage.join(crate::datadir::LOCK)).ok()?;
    match nix::fcntl::flock(f.as_raw_fd(), nix::fcntl::FlockArg::LockSharedNonblock) {
        Err(nix::errno::Errno::EWOULDBLOCK) => {
            let pid =
                std::fs::read_to_string(storage.join(crate::datadir::LOCK)).unwrap_or_default();
            Some(pid.trim().to_owned())
        }
        _ => None,
    }
}

/// Checks the configuration and the data paths, and prints the settings in effect.
/// Exit 0 when a server could start with them (once the one running on this data, if
/// any, stops), 1 with one `problem:` line each otherwise.
fn check_config(cfg: &Config) -> Result<i32> {
    let mut problems = Vec::new();
    println!(
        "config file: {}",
        cfg.config_file
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none (flags, environment and defaults)".into())
    );
    let running = running_server(&cfg.storage);
    if let Some(pid) = &running {
        println!("a server (pid {pid}) runs on this data now: the ports and data it holds are not problems");
    }
    println!("listen: {}", cfg.listen);
    if running.is_none() {
        if let Err(e) = crate::datadir::check_port(cfg.listen) {
            problems.push(format!("listen {}: {e:#}", cfg.listen));
        }
    }
    println!(
        "admin listener: {}",
        cfg.admin_listen
            .map(|a| format!("http://{a}/metrics"))
            .unwrap_or_else(|| "off".into())
    );
    if let (Some(a), None) = (cfg.admin_listen, &running) {
        if let Err(e) = std::net::TcpListener::bind(a) {
            problems.push(format!("admin listener {a}: {e}"));
        }
    }
    println!("admin socket: {}", cfg.admin_socket.display());
    let runtime = format!("{:?}", cfg.runtime).to_lowercase();
    println!("runtime: {runtime}, shards: {}", cfg.shards);
    for (what, p, dir) in [
        ("storage (v3 files)", &cfg.storage, true),
        ("repository (v4)", &cfg.repository, true),
        ("database (v3)", &cfg.database, false),
    ] {
        let state = match path_state(p, dir) {
            Ok(state) => state.to_owned(),
            Err(problem) => {
                problems.push(format!("{what} {}: {problem}", p.display()));
                problem
            }
        };
        println!("{what}: {} ({state})", p.display());
    }
    println!(
        "v4: registration {}, collection {}, grace {} s",
        if cfg.registration { "open" } else { "closed" },
        cfg.gc_interval
            .map(|d| format!("every {} s", d.as_secs()))
            .unwrap_or_else(|| "off".into()),
        cfg.gc_grace.as_secs()
    );
    // The shared stores are reached (read-only: no migration, no object written).
    match &cfg.registry {
        None => println!(
            "v4 registry: SQLite ({})",
            cfg.repository.join("repo.db").display()
        ),
        Some(url) => {
            use crate::repo::Registry as _;
            let state = match crate::repo::PostgresRegistry::connect(url).and_then(|mut r| {
                r.ping()?;
                let tls = if r.encrypted() {
                    "TLS"
                } else {
                    "not encrypted"
                };
                Ok(match r.cluster_key() {
                    Ok(Some(k)) => format!(
                        "answers, {tls}; the cluster's server key {}",
                        cyberbackup_protocol::v4::noise::fingerprint(&k)
                    ),
                    _ => format!("answers, {tls}; no cluster key yet"),
                })
            }) {
                Ok(state) => state,
                Err(e) => {
                    problems.push(format!("v4 registry: {e}"));
                    format!("does not answer: {e}")
                }
            };
            println!(
                "v4 registry: PostgreSQL, up to {} connections ({state})",
                cfg.registry_connections
            );
        }
    }
    match &cfg.s3 {
        None => println!(
            "v4 blobs: files ({})",
            cfg.repository.join("blobs").display()
        ),
        Some(s3) => {
            let state = match crate::repo::s3::S3BlobStore::open(s3) {
                Ok(_) => "the bucket answers".to_owned(),
                Err(e) => {
                    problems.push(format!("v4 blobs: {e}"));
                    e.to_string()
                }
            };
            println!(
                "v4 blobs: S3 at {}, bucket {}, prefix {:?} ({state})",
                s3.endpoint, s3.bucket, s3.prefix
            );
        }
    }
    match cfg.pack_below {
        0 => println!("v4 packs: off (each chunk a blob of its own; collection still repacks packs written before)"),
        n => println!("v4 packs: chunks under {n} bytes share packs of up to 16 MiB"),
    }
    println!(
        "limits: {} connections, idle {} s, header {} s, shutdown grace {} s",
        cfg.max_connections,
        cfg.session.idle_timeout.as_secs(),
        cfg.session.header_timeout.as_secs(),
        cfg.shutdown_grace.as_secs()
    );
    if problems.is_empty() {
        println!("configuration OK");
        Ok(0)
    } else {
        for p in &problems {
            eprintln!("problem: {p}");
        }
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_sizes() {
        assert_eq!(super::parse_bytes("none"), Some(None));
        assert_eq!(super::parse_bytes("10G"), Some(Some(10 << 30)));
        assert_eq!(super::parse_bytes("512m"), Some(Some(512 << 20)));
        assert_eq!(super::parse_bytes("4096"), Some(Some(4096)));
        assert_eq!(super::parse_bytes("ten"), None);
        assert_eq!(super::parse_bytes("99999999999T"), None);
    }
}
