//! The saved identity, `me.info`, in the format of the CyberBackup 3.0 client:
//!
//! ```text
//! line 1: user name
//! line 2: client id, 32 lowercase hex characters
//! line 3: base64 of the private key (DER; PKCS#8, PKCS#1 also read)
//! ```
//!
//! It is written atomically (temp file, fsync, rename) with mode 0600: it holds a
//! private key.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use cyberbackup_protocol::common::{client_id_hex, parse_client_id_hex, ClientId};
use cyberbackup_protocol::v3::crypto::ClientKeypair;
use cyberbackup_protocol::v3::name;

use crate::ClientError;

/// A registered client: name, id and key pair.
#[derive(Clone)]
pub struct Identity {
    pub name: String,
    pub id: ClientId,
    pub keypair: ClientKeypair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("id", &client_id_hex(&self.id))
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Parses the text of a me.info file.
    pub fn parse(text: &str, path: &Path) -> Result<Identity, ClientError> {
        let bad = |reason: &str| ClientError::BadIdentity {
            path: path.to_owned(),
            reason: reason.to_owned(),
        };
        let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
        let name = lines
            .next()
            .ok_or_else(|| bad("empty file (line 1 should be the user name)"))?;
        name::check_user_name(name.as_bytes())
            .map_err(|e| bad(&format!("line 1 is not a valid user name: {e}")))?;
        let id = lines
            .next()
            .and_then(|l| parse_client_id_hex(l.trim()))
            .ok_or_else(|| bad("line 2 should be the client id as 32 hex characters"))?;
        let key = lines
            .next()
            .ok_or_else(|| bad("line 3 should be the base64 private key"))?;
        let der = base64::engine::general_purpose::STANDARD
            .decode(key.trim())
            .map_err(|e| bad(&format!("line 3 is not base64: {e}")))?;
        let keypair = ClientKeypair::from_private_der(&der)
            .map_err(|e| bad(&format!("line 3 is not a usable RSA private key: {e}")))?;
        Ok(Identity {
            name: name.to_owned(),
            id,
            keypair,
        })
    }

    /// Loads me.info; `Ok(None)` when the file does not exist.
    pub fn load(path: &Path) -> Result<Option<Identity>, ClientError> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| ClientError::BadIdentity {
                    path: path.to_owned(),
                    reason: "not UTF-8 text".into(),
                })?;
                Identity::parse(&text, path).map(Some)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ClientError::File {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// The text of a me.info file.
    pub fn to_text(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.name,
            client_id_hex(&self.id),
            base64::engine::general_purpose::STANDARD.encode(self.keypair.private_der())
        )
    }

    /// Saves me.info atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), ClientError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| ClientError::File {
            path: path.to_owned(),
            source,
        };
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("me.info"),
            std::process::id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(self.to_text().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corrupt_files() {
        let kp = ClientKeypair::generate(&mut rand::thread_rng()).unwrap();
        let id = Identity {
            name: "alice".into(),
            id: [0xAB; 16],
            keypair: kp,
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("me.info");
        id.save(&p).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "alice");
        assert_eq!(lines[1], "abababababababababababababababab");
        let back = Identity::load(&p).unwrap().unwrap();
        assert_eq!(back.name, "alice");
        assert_eq!(back.id, [0xAB; 16]);
        assert_eq!(back.keypair.public_der(), id.keypair.public_der());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );

        assert!(Identity::load(&dir.path().join("absent"))
            .unwrap()
            .is_none());
        for bad in [
            "",
            "alice\n",
            "alice\nnothex\nAAAA\n",
            "alice\nabababababababababababababababab\n",
            "alice\nabababababababababababababababab\n!!!notbase64\n",
            "alice\nabababababababababababababababab\nAAAA\n",
        ] {
            let e = Identity::parse(bad, &p).unwrap_err();
            assert!(matches!(e, ClientError::BadIdentity { .. }), "{bad:?}: {e}");
        }
    }
}
