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

use cyberbackup_protocol::common::ClientId;
use cyberbackup_protocol::v3::session::{KeyStored, ReconnectLookup};
use cyberbackup_protocol::v3::PUBLIC_KEY_LEN;
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
    #[error("reconciling {path}: {source}")]
    Reconcile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`reconcile`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    /// Files in client directories that were looked at.
    pub files: usize,
    /// Rows written for files that had none or an outdated one.
    pub rows_written: usize,
}

/// After a run that did not end cleanly: gives every file in a client directory its
/// registry row. A file is renamed into place only after the client's CRC_OK and made
/// durable before its row is written (and the ACK goes out after both), so a crash in
/// between leaves a confirmed file without a row, or, for a file replaced under the
/// same name, with the old file's row. Such files are found by a missing row, a size
/// that differs from the row's, or a modification time after the row's; their checksum
/// is computed from the bytes on disk (those the client confirmed) and the row written.
pub fn reconcile(db: &Path, root: &Path) -> Result<Reconciled, RegistryError> {
    use std::collections::{HashMap, HashSet};
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| RegistryError::Reconcile { path, source }
    };
    let conn = Connection::open(db).map_err(|source| RegistryError::Open {
        path: db.to_owned(),
        source,
    })?;
    migrate(&conn)?;
    type Row = (i64, i64, Option<i64>);
    let mut rows: HashMap<(Vec<u8>, String), Row> = HashMap::new();
    {
        let mut st = conn.prepare("SELECT client_id, name, size, stored_at, inode FROM files")?;
        let it = st.query_map([], |r| {
            Ok(((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?, r.get(4)?)))
        })?;
        for row in it {
            let (k, v) = row?;
            rows.insert(k, v);
        }
    }
    let clients: HashSet<Vec<u8>> = {
        let mut st = conn.prepare("SELECT id FROM clients")?;
        let it = st.query_map([], |r| r.get(0))?;
        it.collect::<Result<_, _>>()?
    };
    let mut found = Reconciled::default();
    for dir in std::fs::read_dir(root).map_err(io(root))? {
        let dir = dir.map_err(io(root))?;
        let Some(id) = dir.file_name().to_str().and_then(parse_client_hex) else {
            continue; // .incoming, or nothing of ours
        };
        if !dir.file_type().map_err(io(&dir.path()))?.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(dir.path()).map_err(io(&dir.path()))? {
            let file = file.map_err(io(&dir.path()))?;
            let path = file.path();
            let Some(name) = file.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let meta = file.metadata().map_err(io(&path))?;
            if !meta.is_file() {
                continue;
            }
            found.files += 1;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64);
            // The row describes this file if the sizes match and it names this inode
            // (every upload is a new inode renamed into place). Rows written before
            // the inode column existed fall back to the time: a file no newer than
            // its row (which misses a replacement of the same size within the same
            // second as the row).
            let described = match rows.get(&(id.to_vec(), name.clone())) {
                Some(&(size, _, Some(inode))) => {
                    size == meta.len() as i64 && inode as u64 == meta.ino()
                }
                Some(&(size, stored_at, None)) => size == meta.len() as i64 && mtime <= stored_at,
                None => false,
            };
            if described {
                continue;
            }
            if !clients.contains(id.as_slice()) {
                tracing::warn!(path = %path.display(), "a file of an unknown client; left alone");
                continue;
            }
            let mut ck = cyberbackup_protocol::v3::cksum::Cksum::new();
            let mut f = std::fs::File::open(&path).map_err(io(&path))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf).map_err(io(&path))?;
                if n == 0 {
                    break;
                }
                ck.update(&buf[..n]);
            }
            conn.execute(
                UPSERT_FILE,
                params![
                    &id[..],
                    name,
                    path.to_string_lossy(),
                    ck.len() as i64,
                    ck.finalize() as i64,
                    now_secs(),
                    meta.ino() as i64
                ],
            )?;
            tracing::warn!(path = %path.display(), "registry row written for a file stored just before a crash");
            found.rows_written += 1;
        }
    }
    Ok(found)
}

/// A client directory's name (32 lowercase hex digits) as the client's id.
fn parse_client_hex(s: &str) -> Option<ClientId> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    (cyberbackup_protocol::common::client_id_hex(&id) == s).then_some(id)
}

/// A stored file's record.
#[derive(Debug, Clone)]
pub struct FileRecord {
    pub client_id: ClientId,
    pub name: String,
    pub path: String,
    pub size: u64,
    pub cksum: u32,
    /// The stored file's inode number: a file that later replaces it under the same
    /// name has another one (see [`reconcile`]).
    pub inode: Option<u64>,
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
    /// Answers once a transaction has begun and committed (the readiness probe).
    Ping {
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

/// A verified file's row, new or replacing the row of an earlier file of that name:
/// client id, name, path, size, checksum, time, inode.
const UPSERT_FILE: &str =
    "INSERT INTO files (client_id, name, path, size, cksum, verified, stored_at, inode)
     VALUES (?1, ?2, ?3, ?4, ?5, 1, ?6, ?7)
     ON CONFLICT(client_id, name) DO UPDATE SET
        path = excluded.path, size = excluded.size, cksum = excluded.cksum,
        verified = 1, stored_at = excluded.stored_at, inode = excluded.inode";

/// Brings a database of an earlier version up to this one, and a new one from
/// [`SCHEMA`] to the current shape: the `inode` column of `files` (NULL in rows
/// written before it existed).
fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
    let has_inode = conn
        .prepare("SELECT 1 FROM pragma_table_info('files') WHERE name = 'inode'")?
        .exists([])?;
    if !has_inode {
        conn.execute_batch("ALTER TABLE files ADD COLUMN inode INTEGER")?;
    }
    Ok(())
}

impl Registry {
    /// Opens (creating if needed) the database and starts its thread.
    pub fn open(path: &Path) -> Result<(Registry, RegistryThread), RegistryError> {
        let conn = Connection::open(path).map_err(|source| RegistryError::Open {
            path: path.to_owned(),
            source,
        })?;
        conn.execute_batch(SCHEMA)
            .and_then(|()| migrate(&conn))
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

    /// Whether the registry thread runs and its database takes a write transaction.
    pub async fn ping(&self) -> Result<(), RegistryError> {
        self.send(|reply| Request::Ping { reply })
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
        Request::Ping { reply } => drop(reply.send(Err(err()))),
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
        Request::Ping { reply } => answer(reply, Ok(())),
        Request::Register { id, name, reply } => {
            let r = tx
                .prepare_cached(
                    "INSERT INTO clients (id, name, public_key, last_seen) VALUES (?1, ?2, NULL, ?3)
                     ON CONFLICT(name) DO NOTHING",
                )
                .and_then(|mut st| st.execute(params![&id[..], name, now_secs()]))
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
                    .prepare_cached("SELECT name, public_key FROM clients WHERE id = ?1")?
                    .query_row(params![&id[..]], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                Ok(match row {
                    None => KeyStored::UnknownClient,
                    Some((stored, key_on_file))
                        if stored == name && (registered_here || key_on_file.is_none()) =>
                    {
                        tx.prepare_cached(
                            "UPDATE clients SET public_key = ?2, last_seen = ?3 WHERE id = ?1",
                        )?
                        .execute(params![
                            &id[..],
                            &key[..],
                            now_secs()
                        ])?;
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
                    .prepare_cached("SELECT id, public_key FROM clients WHERE name = ?1")?
                    .query_row(params![name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let id_known = tx
                    .prepare_cached("SELECT 1 FROM clients WHERE id = ?1")?
                    .query_row(params![&id[..]], |_| Ok(()))
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
                    tx.prepare_cached("UPDATE clients SET last_seen = ?2 WHERE id = ?1")?
                        .execute(params![&id[..], now_secs()])?;
                }
                Ok(ReconnectLookup { by_name, id_known })
            })();
            answer(reply, r)
        }
        Request::FileStored { record, reply } => {
            let r = tx
                .prepare_cached(UPSERT_FILE)
                .and_then(|mut st| {
                    st.execute(params![
                        &record.client_id[..],
                        record.name,
                        record.path,
                        record.size as i64,
                        record.cksum as i64,
                        now_secs(),
                        record.inode.map(|i| i as i64)
                    ])
                })
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
    fn reconcile_writes_the_rows_a_crash_left_out() {
        use cyberbackup_protocol::common::client_id_hex;
        use cyberbackup_protocol::v3::cksum::cksum;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let root = dir.path().join("files");
        let (alice, bob) = ([1u8; 16], [2u8; 16]);
        let path = |id: &ClientId, n: &str| root.join(client_id_hex(id)).join(n);
        {
            let (r, t) = Registry::open(&db).unwrap();
            assert!(block_on(r.register(alice, "alice".into())).unwrap());
            for (name, body) in [("kept", &b"kept"[..]), ("replaced", b"old")] {
                block_on(r.file_stored(FileRecord {
                    client_id: alice,
                    name: name.into(),
                    path: path(&alice, name).to_string_lossy().into_owned(),
                    size: body.len() as u64,
                    cksum: cksum(body),
                    inode: None,
                }))
                .unwrap();
            }
            drop(r);
            t.join();
        }
        std::fs::create_dir_all(root.join(client_id_hex(&alice))).unwrap();
        std::fs::create_dir_all(root.join(client_id_hex(&bob))).unwrap();
        std::fs::create_dir_all(root.join(".incoming")).unwrap();
        std::fs::write(path(&alice, "kept"), b"kept").unwrap();
        // written before its row, as the server does
        std::fs::File::options()
            .write(true)
            .open(path(&alice, "kept"))
            .unwrap()
            .set_modified(UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            .unwrap();
        // renamed into place, row never written / still the old file's
        std::fs::write(path(&alice, "new"), b"confirmed bytes").unwrap();
        std::fs::write(path(&alice, "replaced"), b"the new version").unwrap();
        // a client the registry does not know: left alone
        std::fs::write(path(&bob, "stray"), b"?").unwrap();

        let r = reconcile(&db, &root).unwrap();
        assert_eq!(
            r,
            Reconciled {
                files: 4,
                rows_written: 2
            }
        );
        let conn = Connection::open(&db).unwrap();
        let row = |name: &str| -> Option<(String, i64, i64)> {
            conn.query_row(
                "SELECT path, size, cksum FROM files WHERE client_id = ?1 AND name = ?2",
                params![&alice[..], name],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .unwrap()
        };
        for (name, body) in [
            ("kept", &b"kept"[..]),
            ("new", b"confirmed bytes"),
            ("replaced", b"the new version"),
        ] {
            assert_eq!(
                row(name),
                Some((
                    path(&alice, name).to_string_lossy().into_owned(),
                    body.len() as i64,
                    cksum(body) as i64
                )),
                "{name}"
            );
        }
        let bobs: i64 = conn
            .query_row(
                "SELECT count(*) FROM files WHERE client_id = ?1",
                [&bob[..]],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(bobs, 0);
        // a second pass finds nothing more to do
        assert_eq!(reconcile(&db, &root).unwrap().rows_written, 0);
    }

    /// A row that names the file's inode is trusted only for that inode: a file of the
    /// same size put in its place within the same second (the time rule cannot tell)
    /// gets its row rewritten.
    #[test]
    fn reconcile_tells_a_same_size_replacement_by_its_inode() {
        use cyberbackup_protocol::common::client_id_hex;
        use cyberbackup_protocol::v3::cksum::cksum;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let root = dir.path().join("files");
        let alice = [1u8; 16];
        let cdir = root.join(client_id_hex(&alice));
        std::fs::create_dir_all(&cdir).unwrap();
        let (same, other) = (cdir.join("same"), cdir.join("other"));
        std::fs::write(&same, b"version 1").unwrap();
        std::fs::write(&other, b"version 1").unwrap();
        {
            let (r, t) = Registry::open(&db).unwrap();
            assert!(block_on(r.register(alice, "alice".into())).unwrap());
            for p in [&same, &other] {
                block_on(r.file_stored(FileRecord {
                    client_id: alice,
                    name: p.file_name().unwrap().to_str().unwrap().into(),
                    path: p.to_string_lossy().into_owned(),
                    size: 9,
                    cksum: cksum(b"version 1"),
                    inode: Some(std::fs::metadata(p).unwrap().ino()),
                }))
                .unwrap();
            }
            drop(r);
            t.join();
        }
        // "other" is replaced the way the server does it (a new file renamed over it),
        // same size, and dated no later than its row.
        let tmp = root.join("tmp");
        std::fs::write(&tmp, b"version 2").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            .unwrap();
        std::fs::rename(&tmp, &other).unwrap();

        let r = reconcile(&db, &root).unwrap();
        assert_eq!(
            r,
            Reconciled {
                files: 2,
                rows_written: 1
            }
        );
        let conn = Connection::open(&db).unwrap();
        let row = |name: &str| -> (i64, i64) {
            conn.query_row(
                "SELECT cksum, inode FROM files WHERE client_id = ?1 AND name = ?2",
                params![&alice[..], name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap()
        };
        let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino() as i64;
        assert_eq!(row("same"), (cksum(b"version 1") as i64, ino(&same)));
        assert_eq!(row("other"), (cksum(b"version 2") as i64, ino(&other)));
        assert_eq!(reconcile(&db, &root).unwrap().rows_written, 0);
    }

    /// A database from before the inode column opens, gains the column, and keeps its
    /// rows (with no inode, so reconcile uses the time rule for them).
    #[test]
    fn an_older_database_gains_the_inode_column() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("old.db");
        {
            let conn = Connection::open(&db).unwrap();
            // (SCHEMA is the table as it was; `migrate` adds the column)
            conn.execute_batch(SCHEMA).unwrap();
            assert!(!conn
                .prepare("SELECT 1 FROM pragma_table_info('files') WHERE name = 'inode'")
                .unwrap()
                .exists([])
                .unwrap());
            conn.execute(
                "INSERT INTO clients (id, name, last_seen) VALUES (?1, 'a', 0)",
                [&[1u8; 16][..]],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO files (client_id, name, path, size, cksum, verified, stored_at)
                 VALUES (?1, 'f', 'p', 1, 2, 1, 3)",
                [&[1u8; 16][..]],
            )
            .unwrap();
        }
        let (r, t) = Registry::open(&db).unwrap();
        drop(r);
        t.join();
        let conn = Connection::open(&db).unwrap();
        let (size, inode): (i64, Option<i64>) = conn
            .query_row("SELECT size, inode FROM files WHERE name = 'f'", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((size, inode), (1, None));
        // opening again does not try to add it twice
        let (r, t) = Registry::open(&db).unwrap();
        drop(r);
        t.join();
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
                inode: Some(7),
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
