//! The user's v4 repository as the bridge holds it: the device (the CLI's config
//! directory, so the bridge and `cyberbackup` are the same device), the connection to
//! the server, and the repository key once the passphrase has opened it.
//!
//! Everything here blocks (network and disk): the HTTP handlers call it on tokio's
//! blocking pool. A connection that failed (a restarted server, a dropped network) is
//! replaced on the next call; the key stays open in memory until `lock`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cyberbackup_client::v4::conn::{ConnError, Connection};
use cyberbackup_client::v4::profile::{hex, Profile, ProfileError};
use cyberbackup_client::v4::snapshots::{self, SnapshotError, Tree};
use cyberbackup_client::v4::RepoError;
use cyberbackup_protocol::v4::format::{FormatError, RepoKey};
use cyberbackup_protocol::v4::wire::{ErrorCode, SnapshotId};

/// Why a repository call failed, as the API tells it: an HTTP status, a code for
/// scripts, a sentence for a person, and the server's reason code when there is one.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// Technical detail (the server's reason code and message, the error chain).
    pub detail: Option<String>,
}

impl Failure {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            status,
            code,
            message: message.into(),
            detail: None,
        }
    }

    /// The same failure with technical detail attached.
    pub fn with_detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
}

impl From<ConnError> for Failure {
    fn from(e: ConnError) -> Self {
        let detail = e.to_string();
        let f = match (&e, e.code()) {
            (ConnError::KeyMismatch { .. }, _) => Failure::new(
                502,
                "server_key_changed",
                "the backup server's key is not the one this device trusts: it may be another server pretending to be yours",
            ),
            (_, Some(ErrorCode::FORBIDDEN)) => Failure::new(
                403,
                "forbidden",
                "this device is not allowed to do that (an admin device can grant it)",
            ),
            (_, Some(ErrorCode::QUOTA_EXCEEDED)) => Failure::new(
                507,
                "quota_exceeded",
                "your account is full: forget old snapshots, or ask for more space",
            ),
            (_, Some(ErrorCode::STORAGE_FULL)) => Failure::new(
                507,
                "storage_full",
                "the backup server's disk is full; nothing stored was harmed",
            ),
            (_, Some(ErrorCode::DEVICE_REVOKED)) => Failure::new(
                403,
                "device_revoked",
                "this device was revoked: enrol it again with a code from another device",
            ),
            (_, Some(ErrorCode::UNKNOWN_DEVICE)) => Failure::new(
                403,
                "unknown_device",
                "the server does not know this device: set it up again",
            ),
            (_, Some(ErrorCode::BAD_CODE)) => Failure::new(
                400,
                "bad_code",
                "that enrolment code is unknown, used or expired: ask for a new one",
            ),
            (_, Some(ErrorCode::NAME_TAKEN)) => Failure::new(
                409,
                "name_taken",
                "an account with that name already exists on the server",
            ),
            (_, Some(_)) => Failure::new(502, "refused", "the backup server refused the request"),
            (ConnError::BadAddress(_), None) => Failure::new(
                400,
                "bad_server",
                "that is not a backup server address: use host:port, e.g. 127.0.0.1:1256",
            ),
            _ => Failure::new(
                502,
                "unreachable",
                "the backup server cannot be reached, or the connection was lost",
            ),
        };
        f.with_detail(detail)
    }
}

impl From<RepoError> for Failure {
    fn from(e: RepoError) -> Self {
        match e {
            RepoError::Conn(c) => c.into(),
            RepoError::Key(FormatError::Passphrase) => Failure::new(
                401,
                "wrong_passphrase",
                "that passphrase does not open the repository",
            ),
            RepoError::AlreadyInitialised { account, server } => Failure::new(
                409,
                "already_set_up",
                format!("this device already belongs to account {account} on {server}"),
            ),
            RepoError::Profile(p) => p.into(),
            other => Failure::new(500, "repository", "the repository could not be opened")
                .with_detail(other.to_string()),
        }
    }
}

impl From<ProfileError> for Failure {
    fn from(e: ProfileError) -> Self {
        Failure::new(
            409,
            "not_set_up",
            "this device is not set up yet: create an account or enrol it",
        )
        .with_detail(e.to_string())
    }
}

impl From<SnapshotError> for Failure {
    fn from(e: SnapshotError) -> Self {
        match e {
            SnapshotError::Conn(c) => c.into(),
            SnapshotError::NotFound(s) => {
                Failure::new(404, "no_snapshot", format!("there is no snapshot {s}"))
            }
            SnapshotError::Ambiguous(s) => Failure::new(
                400,
                "ambiguous",
                format!("{s} matches more than one snapshot"),
            ),
            other => Failure::new(
                502,
                "integrity",
                "a snapshot failed verification: it was altered or is incomplete on the server",
            )
            .with_detail(other.to_string()),
        }
    }
}

/// Trees kept loaded for browsing.
const TREES: usize = 4;

#[derive(Default)]
struct Open {
    conn: Option<Arc<Connection>>,
    key: Option<Arc<RepoKey>>,
    trees: HashMap<SnapshotId, Arc<Tree>>,
    tree_order: Vec<SnapshotId>,
}

/// The device, its connection and the opened key.
pub struct Repo {
    pub dir: PathBuf,
    open: Mutex<Open>,
}

impl std::fmt::Debug for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repo").field("dir", &self.dir).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Repo {
    pub fn new(dir: PathBuf) -> Repo {
        Repo {
            dir,
            open: Mutex::new(Open::default()),
        }
    }

    pub fn profile(&self) -> Profile {
        Profile::new(&self.dir)
    }

    /// True once a passphrase has opened the key.
    pub fn unlocked(&self) -> bool {
        lock(&self.open).key.is_some()
    }

    /// A live connection (a failed one is replaced).
    pub fn conn(&self) -> Result<Arc<Connection>, Failure> {
        if let Some(c) = lock(&self.open).conn.clone() {
            if !c.is_failed() {
                return Ok(c);
            }
        }
        let c = Arc::new(cyberbackup_client::v4::connect(&self.profile(), None)?);
        lock(&self.open).conn = Some(c.clone());
        Ok(c)
    }

    /// The opened key, or 401 `locked`.
    pub fn key(&self) -> Result<Arc<RepoKey>, Failure> {
        lock(&self.open).key.clone().ok_or_else(|| {
            Failure::new(
                401,
                "locked",
                "the repository is locked: enter your passphrase",
            )
        })
    }

    /// Opens the key with the passphrase.
    pub fn unlock(&self, passphrase: &[u8]) -> Result<(), Failure> {
        let (conn, key) = cyberbackup_client::v4::open(&self.profile(), passphrase, None)?;
        let mut o = lock(&self.open);
        o.conn = Some(Arc::new(conn));
        o.key = Some(Arc::new(key));
        Ok(())
    }

    /// Forgets the key (and the trees read with it).
    pub fn lock(&self) {
        let mut o = lock(&self.open);
        o.key = None;
        o.trees.clear();
        o.tree_order.clear();
    }

    /// Creates an account with this device, then opens it.
    pub fn setup(
        &self,
        server: &str,
        account: &str,
        device: &str,
        passphrase: &[u8],
    ) -> Result<(), Failure> {
        cyberbackup_client::v4::init(
            &self.profile(),
            server,
            account,
            device,
            passphrase,
            None,
            &mut |fp| tracing::info!(server, key = fp, "pinned the server's key"),
        )?;
        self.unlock(passphrase)
    }

    /// Joins an account with an enrolment code, then opens it.
    pub fn enrol(
        &self,
        server: &str,
        code: &str,
        device: &str,
        passphrase: &[u8],
    ) -> Result<(), Failure> {
        cyberbackup_client::v4::enrol(&self.profile(), server, code, device, None, &mut |fp| {
            tracing::info!(server, key = fp, "pinned the server's key")
        })?;
        self.unlock(passphrase)
    }

    /// A snapshot's tree, from the cache or loaded (and verified).
    pub fn tree(&self, spec: &str) -> Result<Arc<Tree>, Failure> {
        let key = self.key()?;
        // A full id already loaded needs no listing (browsing asks again per folder).
        if let Some(id) = cyberbackup_protocol::common::parse_client_id_hex(spec) {
            if let Some(t) = lock(&self.open).trees.get(&id) {
                return Ok(t.clone());
            }
        }
        let conn = self.conn()?;
        let info = snapshots::find(&conn, spec)?;
        let id = info.header.id;
        if let Some(t) = lock(&self.open).trees.get(&id) {
            return Ok(t.clone());
        }
        let t = Arc::new(snapshots::load(&conn, &key, &id)?);
        let mut o = lock(&self.open);
        if o.tree_order.len() >= TREES {
            let old = o.tree_order.remove(0);
            o.trees.remove(&old);
        }
        o.tree_order.push(id);
        o.trees.insert(id, t.clone());
        tracing::debug!(snapshot = %hex(&id), "tree loaded");
        Ok(t)
    }

    /// Drops cached trees of snapshots that are gone.
    pub fn forget_trees(&self) {
        let mut o = lock(&self.open);
        o.trees.clear();
        o.tree_order.clear();
    }
}
