//! The CyberBackup client library: connect to a server, register or reconnect, and
//! upload files over protocol v3 with progress events.
//!
//! # Layout
//! - [`error`]: [`ClientError`], one variant per thing that can go wrong.
//! - [`identity`]: the saved identity (`me.info`: name, client id, private key).
//! - [`session`]: a connection with an agreed session key ([`Session::open`]).
//! - [`upload`]: streaming uploads in constant memory, checksum retries, reconnects.
//! - [`progress`]: the events an upload reports, and cancellation.
//! - [`v4`]: the v4 client: encrypted, deduplicated snapshots, backup and restore.
//!
//! Everything here is blocking (std sockets with timeouts on every read and write), so
//! it fits a CLI thread, a blocking pool in an async server, or a load generator's
//! worker threads alike.
//!
//! ```no_run
//! use cyberbackup_client::{Credentials, Session, UploadOptions};
//! let (mut session, identity) = Session::open("127.0.0.1:1256", Credentials::New("alice".into()), &Default::default())?;
//! identity.save("me.info".as_ref())?;
//! let summary = session.upload_path("notes.txt".as_ref(), &UploadOptions::default(), &mut |p| eprintln!("{p:?}"))?;
//! println!("{} bytes, cksum {}", summary.size, summary.cksum);
//! # Ok::<(), cyberbackup_client::ClientError>(())
//! ```

pub mod error;
pub mod identity;
pub mod progress;
pub mod session;
pub mod upload;
pub mod v4;

pub use error::ClientError;
pub use identity::Identity;
pub use progress::{Cancel, Phase, Progress};
pub use session::{ConnectOptions, Credentials, Session};
pub use upload::{UploadOptions, UploadSummary};
