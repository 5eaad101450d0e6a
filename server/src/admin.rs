//! Administrative commands on the v4 repository (`cyberbackup-server scrub`, `gc`),
//! run while the server is stopped: the repository's lock file keeps a running server
//! and a command from opening it at once.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::config::{Admin, Config};
use crate::repo::gc::Scope;
use crate::repo::{Repo, RepoError};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs `cmd`; returns the process exit code.
pub fn run(cmd: Admin, cfg: &Config) -> Result<i32> {
    if let Admin::EnrolCode {
        account,
        capabilities,
        ttl_hours,
    } = &cmd
    {
        return enrol_code(cfg, account, capabilities, *ttl_hours);
    }
    if let Admin::Quota { account, bytes } = &cmd {
        return quota(cfg, account, bytes);
    }
    let repo = match Repo::open_local(&cfg.repository) {
        Ok(r) => r,
        Err(RepoError::Locked { path }) => anyhow::bail!(
            "{} is in use: stop the server first (scrub and gc run on a stopped server)",
            path.display()
        ),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening the v4 repository {}", cfg.repository.display()))
        }
    };
    match cmd {
        Admin::Scrub => {
            let r = repo.scrub(Scope::All).context("scrubbing")?;
            for (a, id) in &r.damaged {
                println!("damaged chunk: account {a} chunk {}", hex(id));
            }
            for (a, id) in &r.missing {
                println!("missing chunk: account {a} chunk {}", hex(id));
            }
            for (a, id) in &r.damaged_bodies {
                println!("damaged snapshot: account {a} snapshot {}", hex(id));
            }
            println!(
                "scrub: {} accounts, {} chunks ({} bytes) and {} snapshot bodies checked; {} damaged, {} missing, {} bad snapshot bodies",
                r.accounts,
                r.chunks_checked,
                r.bytes_checked,
                r.bodies_checked,
                r.damaged.len(),
                r.missing.len(),
                r.damaged_bodies.len()
            );
            let bad =
                !r.damaged.is_empty() || !r.missing.is_empty() || !r.damaged_bodies.is_empty();
            Ok(if bad { 3 } else { 0 })
        }
        Admin::EnrolCode { .. } | Admin::Quota { .. } => unreachable!("handled above"),
        Admin::Gc { grace_hours } => {
            let now = crate::repo::now_unix_ms();
            let r = repo
                .collect_garbage(Scope::All, Duration::from_secs(grace_hours * 3600), now)
                .context("collecting garbage")?;
            println!(
                "gc: {} accounts; {} unreferenced chunks deleted ({} bytes freed); {} orphan chunk blobs and {} orphan snapshot bodies removed",
                r.accounts, r.chunks_deleted, r.bytes_freed, r.orphan_chunk_blobs, r.orphan_bodies
            );
            Ok(0)
        }
    }
}

fn open_registry(cfg: &Config) -> Result<crate::repo::SqliteRegistry> {
    let db = cfg.repository.join("repo.db");
    if !db.exists() {
        anyhow::bail!(
            "{}: no v4 repository here (check --repository)",
            db.display()
        );
    }
    crate::repo::SqliteRegistry::open(&db).with_context(|| format!("opening {}", db.display()))
}

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

fn quota(cfg: &Config, account: &str, bytes: &str) -> Result<i32> {
    use crate::repo::Registry;
    let q = parse_bytes(bytes)
        .with_context(|| format!("--bytes {bytes:?}: expected e.g. 50G, 1048576, or none"))?;
    let mut reg = open_registry(cfg)?;
    let id = reg
        .account_by_name(account)?
        .with_context(|| format!("no account named {account:?}"))?;
    reg.set_quota(id, q)?;
    match q {
        Some(b) => println!("quota of {account:?}: {b} bytes"),
        None => println!("quota of {account:?}: none"),
    }
    Ok(0)
}

/// Issues an enrolment code through the registry alone (SQLite allows it beside a
/// running server, which holds the blob store's lock, not the database's).
fn enrol_code(cfg: &Config, account: &str, caps: &str, ttl_hours: u64) -> Result<i32> {
    use crate::repo::{Capabilities, Registry};
    let caps = Capabilities::parse(caps)
        .filter(|c| *c != Capabilities::NONE)
        .with_context(|| {
            format!("--capabilities {caps:?}: expected all, or backup,read,forget,admin")
        })?;
    if ttl_hours == 0 || ttl_hours > 24 * 30 {
        anyhow::bail!("--ttl-hours must be between 1 and 720");
    }
    let mut reg = open_registry(cfg)?;
    let id = reg
        .account_by_name(account)?
        .with_context(|| format!("no account named {account:?}"))?;
    let (code, hash) = crate::repo::service::enrolment_code();
    let now = crate::repo::now_unix_ms();
    let expires = now + (ttl_hours as i64) * 3_600_000;
    reg.add_enrolment(id, &hash, caps, now, expires)?;
    println!("{code}");
    eprintln!(
        "enrolment code for account {account:?} ({}), valid {ttl_hours} h: on the new machine run\n  cyberbackup enrol --server HOST:PORT {code}",
        caps.names()
    );
    Ok(0)
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
