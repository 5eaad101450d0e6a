//! The v4 client: an end-to-end encrypted, deduplicating snapshot repository on a
//! CyberBackup server (`docs/PROTOCOL-V4.md`).
//!
//! # Layout
//! - [`conn`]: a logged-in connection, pipelined, safe to share between threads.
//! - [`config`]: `config.toml`, named profiles of paths, excludes and retention.
//! - [`profile`]: the config directory: device key, pinned server keys, repository.
//! - [`backup`]: the parallel read, chunk, hash, ask, compress, encrypt, send pipeline.
//! - [`snapshots`]: listing, finding and loading snapshots.
//! - [`restore`]: verified, atomic, sparse-aware restore with modes, times and links.
//! - [`policy`]: retention policies (`forget --keep-...`), restic's rules.
//! - [`inspect`]: `diff`, `find` and `check`.
//! - [`legacy`]: files uploaded with protocol v3, listed, restored or imported over v4.
//!
//! ```no_run
//! use cyberbackup_client::v4::{self, profile::Profile};
//! let profile = Profile::new(v4::profile::default_dir()?);
//! v4::init(&profile, "127.0.0.1:1256", "alice", "laptop", b"passphrase", None, &mut |fp| {
//!     eprintln!("new server key {fp}")
//! })?;
//! let (conn, key) = v4::open(&profile, b"passphrase", None)?;
//! let summary = v4::backup::backup(&conn, &key, &["docs".into()], &Default::default(), &Default::default())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod backup;
pub mod config;
pub mod conn;
pub mod inspect;
pub mod legacy;
pub mod policy;
pub mod profile;
pub mod restore;
pub mod snapshots;

use cyberbackup_protocol::v4::format::{FormatError, KdfCost, RepoKey};
use cyberbackup_protocol::v4::wire::{Answer, ErrorCode, Login, LoginMode, Request, Welcome};

use conn::{ConnError, ConnectOptions, Connection};
use profile::{Profile, ProfileError, Repository};

/// Errors of opening or creating a repository.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("{0}")]
    Key(#[from] FormatError),
    #[error(
        "this device already belongs to account {account:?} on {server}: \
         use another --config-dir for a second repository"
    )]
    AlreadyInitialised { account: String, server: String },
    #[error("the server holds no repository key for this account")]
    NoKey,
}

/// The Argon2id cost for new keys (`CYBERBACKUP_KDF=test` makes it cheap, for tests).
fn kdf_cost() -> KdfCost {
    match std::env::var("CYBERBACKUP_KDF").as_deref() {
        Ok("test") => KdfCost::TEST,
        _ => KdfCost::DEFAULT,
    }
}

/// Creates an account on `server` with this device as its first device, a new
/// repository key wrapped under `passphrase` and stored on the server, and saves the
/// settings in `profile`.
pub fn init(
    profile: &Profile,
    server: &str,
    account: &str,
    device_name: &str,
    passphrase: &[u8],
    server_key: Option<&str>,
    on_new_key: &mut dyn FnMut(&str),
) -> Result<Welcome, RepoError> {
    if let Ok(r) = profile.repository() {
        return Err(RepoError::AlreadyInitialised {
            account: r.account,
            server: r.server,
        });
    }
    let device = profile.device_key_or_create()?;
    let mut check = profile.key_check(server, server_key, |fp| on_new_key(fp));
    let conn = Connection::connect_any(
        server,
        &device,
        Login {
            mode: LoginMode::Create,
            account: account.into(),
            device: device_name.into(),
            code: String::new(),
        },
        &mut check,
        &ConnectOptions::default(),
    )?;
    let key = RepoKey::generate(&mut rand::thread_rng());
    let wrapped = key.wrap(passphrase, kdf_cost(), &mut rand::thread_rng())?;
    match conn.call(&Request::PutKey(wrapped))? {
        Answer::KeyStored => {}
        _ => return Err(ConnError::UnexpectedAnswer("PUT_KEY").into()),
    }
    profile.save_repository(&Repository {
        server: server.into(),
        account: account.into(),
        device: device_name.into(),
    })?;
    Ok(conn.welcome().clone())
}

/// Joins this device to the account of an enrolment `code` (made by `device add` on
/// another device, or by the server's `enrol-code` admin command) and saves the
/// settings in `profile`. The repository key is then opened with the passphrase.
pub fn enrol(
    profile: &Profile,
    server: &str,
    code: &str,
    device_name: &str,
    server_key: Option<&str>,
    on_new_key: &mut dyn FnMut(&str),
) -> Result<Welcome, RepoError> {
    if let Ok(r) = profile.repository() {
        return Err(RepoError::AlreadyInitialised {
            account: r.account,
            server: r.server,
        });
    }
    let device = profile.device_key_or_create()?;
    let mut check = profile.key_check(server, server_key, |fp| on_new_key(fp));
    let conn = Connection::connect_any(
        server,
        &device,
        Login {
            mode: LoginMode::Enrol,
            account: String::new(),
            device: device_name.into(),
            code: code.trim().to_string(),
        },
        &mut check,
        &ConnectOptions::default(),
    )?;
    let w = conn.welcome().clone();
    profile.save_repository(&Repository {
        server: server.into(),
        account: w.account.clone(),
        device: device_name.into(),
    })?;
    Ok(w)
}

/// Wraps the repository key under a new passphrase and stores it on the server
/// (needs the admin capability). The old passphrase stops working.
pub fn change_passphrase(
    conn: &Connection,
    key: &RepoKey,
    new_passphrase: &[u8],
) -> Result<(), RepoError> {
    let wrapped = key.wrap(new_passphrase, kdf_cost(), &mut rand::thread_rng())?;
    match conn.call(&Request::PutKey(wrapped))? {
        Answer::KeyStored => Ok(()),
        _ => Err(ConnError::UnexpectedAnswer("PUT_KEY").into()),
    }
}

/// Connects with this device and opens the repository key with `passphrase`.
/// `server` overrides the saved server address.
pub fn open(
    profile: &Profile,
    passphrase: &[u8],
    server: Option<&str>,
) -> Result<(Connection, RepoKey), RepoError> {
    let conn = connect(profile, server)?;
    let wrapped = wrapped_key(&conn)?;
    let key = RepoKey::unwrap(&wrapped, passphrase)?;
    Ok((conn, key))
}

/// Like [`open`], but the key is unwrapped on a thread of its own: Argon2id costs a
/// tenth of a second or more, which a backup spends walking its tree instead
/// ([`backup::backup_unlocking`]). A wrong passphrase shows when the key is first
/// needed.
pub fn open_unlocking(
    profile: &Profile,
    passphrase: &[u8],
    server: Option<&str>,
) -> Result<(Connection, PendingKey<'static>), RepoError> {
    let conn = connect(profile, server)?;
    let wrapped = wrapped_key(&conn)?;
    // The cost is checked here, so a key the client refuses fails at once.
    RepoKey::wrapped_cost(&wrapped)?;
    let passphrase = zeroize::Zeroizing::new(passphrase.to_vec());
    let thread = std::thread::Builder::new()
        .name("key".into())
        .spawn(move || RepoKey::unwrap(&wrapped, &passphrase))
        .map_err(|e| RepoError::Key(FormatError::Kdf(format!("no thread for the key: {e}"))))?;
    Ok((
        conn,
        PendingKey {
            borrowed: None,
            cell: std::sync::OnceLock::new(),
            thread: std::sync::Mutex::new(Some(thread)),
        },
    ))
}

/// The account's wrapped repository key, from the server.
fn wrapped_key(conn: &Connection) -> Result<Vec<u8>, RepoError> {
    match conn.call(&Request::GetKey) {
        Ok(Answer::Key(k)) => Ok(k),
        Ok(_) => Err(ConnError::UnexpectedAnswer("GET_KEY").into()),
        Err(e) if e.code() == Some(ErrorCode::NOT_FOUND) => Err(RepoError::NoKey),
        Err(e) => Err(e.into()),
    }
}

/// The repository key, or the thread still unwrapping it ([`open_unlocking`]). The
/// first [`get`](PendingKey::get) waits for the thread; every later one answers at
/// once.
pub struct PendingKey<'a> {
    borrowed: Option<&'a RepoKey>,
    cell: std::sync::OnceLock<Result<RepoKey, FormatError>>,
    #[allow(clippy::type_complexity)]
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<Result<RepoKey, FormatError>>>>,
}

impl<'a> PendingKey<'a> {
    /// A key already open.
    pub fn ready(key: &'a RepoKey) -> Self {
        PendingKey {
            borrowed: Some(key),
            cell: std::sync::OnceLock::new(),
            thread: std::sync::Mutex::new(None),
        }
    }

    /// The key, once unwrapped (waiting for that), or why it could not be.
    pub fn get(&self) -> Result<&RepoKey, FormatError> {
        if let Some(k) = self.borrowed {
            return Ok(k);
        }
        self.cell
            .get_or_init(|| {
                let t = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
                match t.map(std::thread::JoinHandle::join) {
                    Some(Ok(r)) => r,
                    Some(Err(_)) => Err(FormatError::Kdf("the key thread failed".into())),
                    None => Err(FormatError::Kdf("no key".into())),
                }
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl std::fmt::Debug for PendingKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = if self.borrowed.is_some() || self.cell.get().is_some() {
            "open"
        } else {
            "unlocking"
        };
        f.debug_struct("PendingKey").field("state", &state).finish()
    }
}

/// Connects with this device (no key needed: listings, usage).
pub fn connect(profile: &Profile, server: Option<&str>) -> Result<Connection, RepoError> {
    let repo = profile.repository()?;
    let device = profile.device_key()?.ok_or(ProfileError::NotInitialised)?;
    let server = server.unwrap_or(&repo.server).to_string();
    let mut check = profile.key_check(&server, None, |_| {});
    Ok(Connection::connect_any(
        &server,
        &device,
        Login {
            mode: LoginMode::Device,
            account: String::new(),
            device: String::new(),
            code: String::new(),
        },
        &mut check,
        &ConnectOptions::default(),
    )?)
}
