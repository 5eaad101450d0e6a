//! Where a v4 client keeps what it must remember: the device key, the servers' pinned
//! keys and the repository it belongs to, in the user's config directory (XDG), every
//! file written atomically with mode 0600.
//!
//! ```text
//! $XDG_CONFIG_HOME/cyberbackup/        (or ~/.config/cyberbackup, or $CYBERBACKUP_CONFIG_DIR)
//!   device.key        the device's X25519 private key, 64 hex characters
//!   known_servers     one line per server: "ADDRESS HEX-KEY" (pinned on first use)
//!   repository.json   {"server": "...", "account": "...", "device": "..."}
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use cyberbackup_protocol::v4::noise::{fingerprint, StaticKey};
use serde::{Deserialize, Serialize};

use super::conn::ConnError;

/// Profile errors.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
    #[error("no config directory: set CYBERBACKUP_CONFIG_DIR, XDG_CONFIG_HOME or HOME")]
    NoConfigDir,
    #[error("this device is not set up: run `cyberbackup init` (or pass --config-dir)")]
    NotInitialised,
    #[error("cannot make a device key: {0}")]
    Key(String),
}

/// The config directory: `$CYBERBACKUP_CONFIG_DIR`, else `$XDG_CONFIG_HOME/cyberbackup`,
/// else `$HOME/.config/cyberbackup`.
pub fn default_dir() -> Result<PathBuf, ProfileError> {
    if let Some(d) = std::env::var_os("CYBERBACKUP_CONFIG_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("cyberbackup"));
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(h).join(".config").join("cyberbackup"));
    }
    Err(ProfileError::NoConfigDir)
}

/// The repository this device backs up to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    pub server: String,
    pub account: String,
    pub device: String,
}

/// A config directory.
#[derive(Debug, Clone)]
pub struct Profile {
    dir: PathBuf,
}

impl Profile {
    pub fn new(dir: impl Into<PathBuf>) -> Profile {
        Profile { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, name: &str) -> impl FnOnce(std::io::Error) -> ProfileError {
        let path = self.dir.join(name);
        move |source| ProfileError::Io { path, source }
    }

    /// Writes `name` atomically with mode 0600 (the directory made 0700 if new).
    pub fn write_private(&self, name: &str, data: &[u8]) -> Result<(), ProfileError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if !self.dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(self.io(""))?;
        }
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(self.io(name))?;
        f.write_all(data).map_err(self.io(name))?;
        f.sync_all().map_err(self.io(name))?;
        std::fs::rename(&tmp, self.dir.join(name)).map_err(self.io(name))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// The device key, if there is one.
    pub fn device_key(&self) -> Result<Option<StaticKey>, ProfileError> {
        let path = self.dir.join("device.key");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ProfileError::Io { path, source }),
        };
        let bytes = parse_hex32(text.trim()).ok_or_else(|| ProfileError::Bad {
            path: path.clone(),
            reason: "expected 64 hex characters (an X25519 private key)".into(),
        })?;
        Ok(Some(StaticKey::from_private(bytes)))
    }

    /// The device key, made and saved if there is none yet.
    pub fn device_key_or_create(&self) -> Result<StaticKey, ProfileError> {
        if let Some(k) = self.device_key()? {
            return Ok(k);
        }
        let k = StaticKey::generate().map_err(|e| ProfileError::Key(e.to_string()))?;
        self.write_private("device.key", format!("{}\n", hex(k.private())).as_bytes())?;
        Ok(k)
    }

    /// The repository settings.
    pub fn repository(&self) -> Result<Repository, ProfileError> {
        let path = self.dir.join("repository.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ProfileError::NotInitialised)
            }
            Err(source) => return Err(ProfileError::Io { path, source }),
        };
        serde_json::from_str(&text).map_err(|e| ProfileError::Bad {
            path,
            reason: e.to_string(),
        })
    }

    pub fn save_repository(&self, r: &Repository) -> Result<(), ProfileError> {
        let text = serde_json::to_string_pretty(r).map_err(|e| ProfileError::Bad {
            path: self.dir.join("repository.json"),
            reason: e.to_string(),
        })?;
        self.write_private("repository.json", format!("{text}\n").as_bytes())
    }

    /// The pinned key of `server`, if any.
    pub fn pinned(&self, server: &str) -> Result<Option<[u8; 32]>, ProfileError> {
        let path = self.dir.join("known_servers");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ProfileError::Io { path, source }),
        };
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            if let (Some(addr), Some(key)) = (parts.next(), parts.next()) {
                if addr == server {
                    return parse_hex32(key).map(Some).ok_or(ProfileError::Bad {
                        path,
                        reason: format!("the key for {server} is not 64 hex characters"),
                    });
                }
            }
        }
        Ok(None)
    }

    /// Pins `key` for `server` (replacing an older pin).
    pub fn pin(&self, server: &str, key: &[u8; 32]) -> Result<(), ProfileError> {
        let path = self.dir.join("known_servers");
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let mut text: String = old
            .lines()
            .filter(|l| l.split_whitespace().next() != Some(server))
            .map(|l| format!("{l}\n"))
            .collect();
        text.push_str(&format!("{server} {}\n", hex(key)));
        self.write_private("known_servers", text.as_bytes())
    }

    /// A key check for [`super::conn::Connection::connect`]: trust on first use (the
    /// key is pinned, and `on_new` told its fingerprint), refuse a different key later.
    /// `expected` (a fingerprint or hex key given by the user) overrides the pin.
    pub fn key_check<'a>(
        &'a self,
        server: &'a str,
        expected: Option<&'a str>,
        mut on_new: impl FnMut(&str) + 'a,
    ) -> impl FnMut(&[u8; 32]) -> Result<(), ConnError> + 'a {
        move |key: &[u8; 32]| {
            let fp = fingerprint(key);
            if let Some(want) = expected {
                let want = want.trim();
                if want.eq_ignore_ascii_case(&fp) || want.eq_ignore_ascii_case(&hex(key)) {
                    let _ = self.pin(server, key);
                    return Ok(());
                }
                return Err(ConnError::KeyNotExpected {
                    got: fp,
                    expected: want.to_string(),
                });
            }
            match self.pinned(server) {
                Ok(Some(p)) if &p == key => Ok(()),
                Ok(Some(p)) => Err(ConnError::KeyMismatch {
                    got: fp,
                    pinned: fingerprint(&p),
                    pins: self.dir.join("known_servers").display().to_string(),
                }),
                Ok(None) => {
                    on_new(&fp);
                    self.pin(server, key)
                        .map_err(|e| ConnError::Io(std::io::Error::other(e.to_string())))
                }
                Err(e) => Err(ConnError::Io(std::io::Error::other(e.to_string()))),
            }
        }
    }
}

/// Whether `s` looks like a key given by a user: `SHA256:` and 64 hex characters (a
/// fingerprint), or 64 hex characters (the key itself).
pub fn is_key_spec(s: &str) -> bool {
    let h = s.trim();
    let h = h.strip_prefix("SHA256:").unwrap_or(h);
    h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Lowercase hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// 64 hex characters into 32 bytes.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn device_key_is_made_once_with_mode_0600() {
        let d = tempfile::tempdir().unwrap();
        let p = Profile::new(d.path().join("cfg"));
        assert!(p.device_key().unwrap().is_none());
        let k = p.device_key_or_create().unwrap();
        let again = p.device_key_or_create().unwrap();
        assert_eq!(k.public(), again.public());
        let mode = std::fs::metadata(p.dir().join("device.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(p.dir()).unwrap().permissions().mode();
        assert_eq!(dmode & 0o777, 0o700);
    }

    #[test]
    fn pins_are_per_server_and_a_changed_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = Profile::new(d.path());
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let mut told = Vec::new();
        {
            let mut check = p.key_check("h:1", None, |fp| told.push(fp.to_string()));
            check(&a).unwrap();
            check(&a).unwrap();
            assert!(matches!(check(&b), Err(ConnError::KeyMismatch { .. })));
        }
        assert_eq!(told.len(), 1, "told once, on first use");
        p.pin("h:2", &b).unwrap();
        assert_eq!(p.pinned("h:1").unwrap(), Some(a));
        assert_eq!(p.pinned("h:2").unwrap(), Some(b));
        // An explicit expected key wins over the pin.
        let fp = fingerprint(&b);
        let mut check = p.key_check("h:1", Some(&fp), |_| {});
        check(&b).unwrap();
        assert_eq!(p.pinned("h:1").unwrap(), Some(b));
    }
}
