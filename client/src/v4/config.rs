//! The config file, `config.toml` in the config directory: named profiles that hold
//! what a backup and its retention need, so that `cyberbackup backup --profile home`
//! (and a systemd timer, `contrib/systemd/`) runs without flags.
//!
//! ```toml
//! [profiles.home]
//! server = "backup.example:1256"     # optional: the init's server otherwise
//! paths = ["/home/alice"]
//! excludes = ["*.tmp", "node_modules", "/home/*/.cache"]
//! exclude_files = []
//! exclude_caches = true
//! one_file_system = true
//! tags = ["daily"]
//! host = "laptop"                    # optional
//! keep_daily = 7                     # retention for `forget --profile home`
//! keep_weekly = 4
//! keep_monthly = 12
//! ```
//!
//! Flags given on the command line add to a profile's lists and override its values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::policy::{parse_duration, Policy};
use super::profile::ProfileError;

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub profiles: BTreeMap<String, BackupProfile>,
}

/// One profile.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BackupProfile {
    pub server: Option<String>,
    pub paths: Vec<PathBuf>,
    pub excludes: Vec<String>,
    pub exclude_files: Vec<PathBuf>,
    pub exclude_caches: bool,
    pub one_file_system: bool,
    pub tags: Vec<String>,
    pub host: Option<String>,
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
    pub keep_monthly: u32,
    pub keep_yearly: u32,
    pub keep_within: Option<String>,
    pub keep_tags: Vec<String>,
}

impl BackupProfile {
    /// The profile's retention policy.
    pub fn policy(&self) -> Result<Policy, String> {
        let within = match &self.keep_within {
            None => None,
            Some(d) => Some(
                parse_duration(d).ok_or_else(|| format!("keep_within {d:?}: expected e.g. 30d"))?,
            ),
        };
        Ok(Policy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
            within,
            tags: self.keep_tags.clone(),
        })
    }
}

/// Reads `config.toml` from `dir` (an absent file is an empty configuration).
pub fn load(dir: &Path) -> Result<ConfigFile, ProfileError> {
    let path = dir.join("config.toml");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(source) => return Err(ProfileError::Io { path, source }),
    };
    toml::from_str(&text).map_err(|e| ProfileError::Bad {
        path,
        reason: e.to_string(),
    })
}

/// The profile `name` from `dir`'s config file.
pub fn profile(dir: &Path, name: &str) -> Result<BackupProfile, ProfileError> {
    let cfg = load(dir)?;
    cfg.profiles
        .get(name)
        .cloned()
        .ok_or_else(|| ProfileError::Bad {
            path: dir.join("config.toml"),
            reason: format!(
                "no profile [profiles.{name}] (it has: {})",
                if cfg.profiles.is_empty() {
                    "none".to_string()
                } else {
                    cfg.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
                }
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_and_unknown_keys_are_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path()).unwrap().profiles.is_empty());
        std::fs::write(
            d.path().join("config.toml"),
            "[profiles.home]\npaths = [\"/home/a\"]\nexcludes = [\"*.tmp\"]\nkeep_daily = 7\nkeep_within = \"30d\"\n",
        )
        .unwrap();
        let p = profile(d.path(), "home").unwrap();
        assert_eq!(p.paths, vec![PathBuf::from("/home/a")]);
        let pol = p.policy().unwrap();
        assert_eq!(pol.daily, 7);
        assert_eq!(
            pol.within,
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        let e = profile(d.path(), "work").unwrap_err().to_string();
        assert!(e.contains("it has: home"), "{e}");
        std::fs::write(d.path().join("config.toml"), "[profiles.x]\npath = []\n").unwrap();
        assert!(
            load(d.path()).is_err(),
            "a misspelt key is an error, not ignored"
        );
    }
}
