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
    let conn = Connection::connect(
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
    let conn = Connection::connect(
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
    let wrapped = match conn.call(&Request::GetKey) {
        Ok(Answer::Key(k)) => k,
        Ok(_) => return Err(ConnError::UnexpectedAnswer("GET_KEY").into()),
        Err(e) if e.code() == Some(ErrorCode::NOT_FOUND) => return Err(RepoError::NoKey),
        Err(e) => return Err(e.into()),
    };
    let key = RepoKey::unwrap(&wrapped, passphrase)?;
    Ok((conn, key))
}

/// Connects with this device (no key needed: listings, usage).
pub fn connect(profile: &Profile, server: Option<&str>) -> Result<Connection, RepoError> {
    let repo = profile.repository()?;
    let device = profile.device_key()?.ok_or(ProfileError::NotInitialised)?;
    let server = server.unwrap_or(&repo.server).to_string();
    let mut check = profile.key_check(&server, None, |_| {});
    Ok(Connection::connect(
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
