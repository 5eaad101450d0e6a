//! The server's static X25519 key for protocol v4: made on first start, kept in the
//! repository directory with mode 0600, and never changed by the server afterwards
//! (clients pin it; a new key makes every pinned client refuse the server).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context, Result};
use cyberbackup_protocol::v4::noise::StaticKey;

/// Loads the key at `path`, or makes one and writes it there (atomically, 0600).
pub fn load_or_create(path: &Path) -> Result<StaticKey> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let md = std::fs::metadata(path)?;
            if md.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "the server key is readable by others; chmod 600 it");
            }
            let t = text.trim();
            if t.len() != 64 {
                bail!(
                    "{}: expected 64 hex characters (an X25519 private key)",
                    path.display()
                );
            }
            let mut k = [0u8; 32];
            for (i, pair) in t.as_bytes().chunks_exact(2).enumerate() {
                let s = std::str::from_utf8(pair).unwrap_or("zz");
                k[i] = u8::from_str_radix(s, 16)
                    .with_context(|| format!("{}: not hex", path.display()))?;
            }
            Ok(StaticKey::from_private(k))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = StaticKey::generate().context("making the server key")?;
            let hex: String = key.private().iter().map(|b| format!("{b:02x}")).collect();
            let tmp = path.with_extension("key.tmp");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(format!("{hex}\n").as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
            if let Some(dir) = path.parent() {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            tracing::info!(path = %path.display(), "made a new v4 server key");
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_then_loaded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("server.key");
        let a = load_or_create(&p).unwrap();
        let b = load_or_create(&p).unwrap();
        assert_eq!(a.public(), b.public());
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&p, "nothex").unwrap();
        assert!(load_or_create(&p).is_err());
    }
}
