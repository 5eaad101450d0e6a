//! The client registry: SQLite (`defensive.db` by default), owned by one dedicated
//! thread so that no SQLite call ever runs on a reactor thread.
//!
//! Shards send [`Request`]s over a channel and await the answer on a oneshot. The
//! thread takes every request waiting in the channel and runs them in one transaction
//! (group commit): many files that finish together cost one durable commit.
//!
//! Tables: `clients` (id, unique name, public key, last seen) and `files` (client,
//! name, stored path, size, checksum, verified, time). The AES session key is never
//! written anywhere.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use cyberbackup_protocol::session::{KeyStored, ReconnectLookup};
use cyberbackup_protocol::{ClientId, PUBLIC_KEY_LEN};
use futures_channel::oneshot;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the registry thread has stopped")]
    Gone,
}

/// A stored file's record.
#[derive(Debug, Clone)]
pub struct FileRecord {
    pub client_id: ClientId,
    pub name: String,
    pub path: String,
    pub size: u64,
    pub cksum: u32,
}

/// What a shard asks of the registry.
#[derive(Debug)]
pub enum Request {
    Register {
        id: ClientId,
        name: String,
        reply: oneshot::Sender<Result<bool, RegistryError>>,
    },
    StoreKey {
        id: ClientId,
        name: String,
        key: Box<[u8; PUBLIC_KEY_LEN]>,
        registered_here: bool,
        reply: oneshot::Sender<Result<KeyStored, RegistryError>>,
    },
    Reconnect {
        id: ClientId,
        name: String,
        reply: oneshot::Sender<Result<ReconnectLookup, RegistryError>>,
    },
    FileStored {
        record: FileRecord,
        reply: oneshot::Sender<Result<(), RegistryError>>,
    },
}

/// A handle for sending requests; cheap to clone, one per shard.
#[derive(Debug, Clone)]
pub struct Registry {
    tx: mpsc::Sender<Request>,
}

/// Joins the registry thread when the last handle is gone.
#[derive(Debug)]
pub struct RegistryThread(thread::JoinHandle<()>);

impl RegistryThread {
    /// Waits for the thread to finish its last transaction.
    pub fn join(self) {
        let _ = self.0.join();
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = FULL;
PRAGMA foreign_keys = ON;
CREATE TABLE IF NOT EXISTS clients (
    id BLOB PRIMARY KEY CHECK (length(id) = 16),
    name TEXT NOT NULL UNIQUE,
    public_key BLOB,
    last_seen INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    client_id BLOB NOT NULL REFERENCES clients(id),
    name TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    cksum INTEGER NOT NULL,
    verified INTEGER NOT NULL,
    stored_at INTEGER NOT NULL,
    UNIQUE (client_id, name)
);
";

impl Registry {
    /// Opens (creating if needed) the database and starts its thread.
    pub fn open(path: &Path) -> Result<(Registry, RegistryThread), RegistryError> {
        let conn = Connection::open(path).map_err(|source| RegistryError::Open {
            path: path.to_owned(),
            source,
        })?;
        conn.execute_batch(SCHEMA)
            .map_err(|source| RegistryError::Open {
                path: path.to_owned(),
                source,
            })?;
        let (tx, rx) = mpsc::channel();
        let handle = thread::Builder::new()
            .name("registry".into())
            .spawn(move || run(conn, rx))
            .map_err(|e| RegistryError::Open {
                path: path.to_owned(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok((Registry { tx }, RegistryThread(handle)))
    }

    fn send<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, RegistryError>>) -> Request,
    ) -> oneshot::Receiver<Result<T, RegistryError>> {
        let (reply, rx) = oneshot::channel();
        // If the thread is gone the reply sender is dropped and the receiver says so.
        let _ = self.tx.send(make(reply));
        rx
    }

    pub async fn register(&self, id: ClientId, name: String) -> Result<bool, RegistryError> {
        self.send(|reply| Request::Register { id, name, reply })
            .await
            .unwrap_or(Err(RegistryError::Gone))
    }

    pub async fn store_key(
        &self,
        id: ClientId,
        name: String,
        key: Box<[u8; PUBLIC_KEY_LEN]>,
        registered_here: bool,
    ) -> Result<KeyStored, RegistryError> {
        self.send(|reply| Request::StoreKey {
            id,
            name,
            key,
            registered_here,
            reply,
        })
        .await
        .unwrap_or(Err(RegistryError::Gone))
    }

    pub async fn reconnect(
        &self,
        id: ClientId,
        name: String,
    ) -> Result<ReconnectLookup, RegistryError> {
        self.send(|reply| Request::Reconnect { id, name, reply })
            .await
            .unwrap_or(Err(RegistryError::Gone))
    }

    pub async fn file_stored(&self, record: FileRecord) -> Result<(), RegistryError> {
        self.send(|reply| Request::FileStored { record, reply })
            .await
            .unwrap_or(Err(RegistryError::Gone))
    }
}

/// The registry thread: batches whatever is queued into one transaction.
fn run(mut conn: Connection, rx: mpsc::Receiver<Request>) {
    while let Some(batch) = crate::queue::recv_batch(&rx, 1024) {
        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(e) => {
                tracing::error!(error = %e, "cannot begin a registry transaction");
                for r in batch {
                    fail(r, &e);
                }
                continue;
            }
        };
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        for req in batch {
            replies.push(apply(&tx, req));
        }
        let commit = tx.commit();
        if let Err(e) = &commit {
            tracing::error!(error = %e, "registry commit failed");
        }
        for r in replies {
            r(commit.as_ref().err());
        }
    }
}

fn fail(r: Request, e: &rusqlite::Error) {
    let err = || RegistryError::Sql(clone_err(e));
    match r {
        Request::Register { reply, .. } => drop(reply.send(Err(err()))),
        Request::StoreKey { reply, .. } => drop(reply.send(Err(err()))),
        Request::Reconnect { reply, .. } => drop(reply.send(Err(err()))),
        Request::FileStored { reply, .. } => drop(reply.send(Err(err()))),
    }
}

fn clone_err(e: &rusqlite::Error) -> rusqlite::Error {
    rusqlite::Error::InvalidParameterName(e.to_string())
}

type Reply = Box<dyn FnOnce(Option<&rusqlite::Error>)>;

/// Runs one request inside the batch's transaction; the returned closure answers it
/// once the commit is known (an answer is never given for an uncommitted write).
fn apply(tx: &rusqlite::Transaction<'_>, req: Request) -> Reply {
    fn answer<T: 'static>(
        reply: oneshot::Sender<Result<T, RegistryError>>,
        r: Result<T, rusqlite::Error>,
    ) -> Reply {
        Box::new(move |commit_err| {
            let v = match (r, commit_err) {
                (Err(e), _) => Err(RegistryError::Sql(e)),
                (Ok(_), Some(e)) => Err(RegistryError::Sql(clone_err(e))),
                (Ok(v), None) => Ok(v),
            };
            let _ = reply.send(v);
        })
    }
    match req {
        Request::Register { id, name, reply } => {
            let r = tx
                .execute(
                    "INSERT INTO clients (id, name, public_key, last_seen) VALUES (?1, ?2, NULL, ?3)
                     ON CONFLICT(name) DO NOTHING",
                    params![&id[..], name, now_secs()],
                )
                .map(|n| n == 1);
            answer(reply, r)
        }
        Request::StoreKey {
            id,
            name,
            key,
            registered_here,
            reply,
        } => {
            let r = (|| {
                let row: Option<(String, Option<Vec<u8>>)> = tx
                    .query_row(
                        "SELECT name, public_key FROM clients WHERE id = ?1",
                        params![&id[..]],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                Ok(match row {
                    None => KeyStored::UnknownClient,
                    Some((stored, key_on_file))
                        if stored == name && (registered_here || key_on_file.is_none()) =>
                    {
                        tx.execute(
                            "UPDATE clients SET public_key = ?2, last_seen = ?3 WHERE id = ?1",
                            params![&id[..], &key[..], now_secs()],
                        )?;
                        KeyStored::Stored
                    }
                    Some(_) => KeyStored::Refused,
                })
            })();
            answer(reply, r)
        }
        Request::Reconnect { id, name, reply } => {
            let r = (|| {
                let by_name: Option<(Vec<u8>, Option<Vec<u8>>)> = tx
                    .query_row(
                        "SELECT id, public_key FROM clients WHERE name = ?1",
                        params![name],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let id_known = tx
                    .query_row(
                        "SELECT 1 FROM clients WHERE id = ?1",
                        params![&id[..]],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                let by_name = by_name.and_then(|(stored, key)| {
                    let stored: ClientId = stored.as_slice().try_into().ok()?;
                    Some((stored, key))
                });
                if by_name
                    .as_ref()
                    .is_some_and(|(s, k)| *s == id && k.is_some())
                {
                    tx.execute(
                        "UPDATE clients SET last_seen = ?2 WHERE id = ?1",
                        params![&id[..], now_secs()],
                    )?;
                }
                Ok(ReconnectLookup { by_name, id_known })
            })();
            answer(reply, r)
        }
        Request::FileStored { record, reply } => {
            let r = tx
                .execute(
                    "INSERT INTO files (client_id, name, path, size, cksum, verified, stored_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6)
                     ON CONFLICT(client_id, name) DO UPDATE SET
                        path = excluded.path, size = excluded.size, cksum = excluded.cksum,
                        verified = 1, stored_at = excluded.stored_at",
                    params![
                        &record.client_id[..],
                        record.name,
                        record.path,
                        record.size as i64,
                        record.cksum as i64,
                        now_secs()
                    ],
                )
                .map(|_| ());
            answer(reply, r)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures_lite::future::block_on(f)
    }

    #[test]
    fn register_key_reconnect_and_files_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        {
            let (r, t) = Registry::open(&db).unwrap();
            assert!(block_on(r.register([1; 16], "alice".into())).unwrap());
            assert!(!block_on(r.register([2; 16], "alice".into())).unwrap());
            let key = Box::new([7u8; 160]);
            assert_eq!(
                block_on(r.store_key([1; 16], "alice".into(), key.clone(), true)).unwrap(),
                KeyStored::Stored
            );
            // a second key from another connection is refused
            assert_eq!(
                block_on(r.store_key([1; 16], "alice".into(), key.clone(), false)).unwrap(),
                KeyStored::Refused
            );
            assert_eq!(
                block_on(r.store_key([9; 16], "x".into(), key, false)).unwrap(),
                KeyStored::UnknownClient
            );
            block_on(r.file_stored(FileRecord {
                client_id: [1; 16],
                name: "f".into(),
                path: "p".into(),
                size: 3,
                cksum: 42,
            }))
            .unwrap();
            drop(r);
            t.join();
        }
        let (r, t) = Registry::open(&db).unwrap();
        let look = block_on(r.reconnect([1; 16], "alice".into())).unwrap();
        assert_eq!(look.by_name, Some(([1; 16], Some(vec![7u8; 160]))));
        assert!(look.id_known);
        let look = block_on(r.reconnect([3; 16], "bob".into())).unwrap();
        assert_eq!(look.by_name, None);
        assert!(!look.id_known);
        drop(r);
        t.join();
        let conn = Connection::open(&db).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM files WHERE verified = 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 1);
    }
}
