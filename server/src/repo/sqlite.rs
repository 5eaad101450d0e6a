//! The local [`Registry`]: one SQLite file (`repo.db`, apart from the v3 registry's
//! database), owning its connection.
//!
//! Durability: the database runs in WAL mode with `synchronous = FULL`, so every commit
//! appends its pages to the write-ahead log and `fsync`s the log before it returns; a
//! committed transaction survives a crash or power loss (SQLite replays the log at the
//! next open), and an uncommitted one leaves nothing. `NORMAL` would skip that `fsync`
//! in WAL mode and could lose the last commits on power loss: the repository
//! acknowledges chunks and snapshots after their commit, so it needs `FULL`.
//!
//! The schema is created and migrated at open; its version is `PRAGMA user_version`
//! ([`SCHEMA_VERSION`]). Per-account usage (bytes, chunk and snapshot counts) is kept in
//! the `accounts` row by triggers on `chunks` and `snapshots`, in the same transactions,
//! so a quota check costs one row read.

use std::collections::HashSet;
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::registry::{
    check_name, ChunkMove, ChunkRecord, CommitOutcome, Device, PackLoc, PackRecord, PackUsage,
    Registry, SnapshotStamp, StoredSnapshot, Unreferenced, Usage,
};
use super::{
    AccountId, Capabilities, ChunkId, DeviceId, Hash, PackId, RepoError, SnapshotHeader, SnapshotId,
};

/// The schema this code creates and reads.
pub const SCHEMA_VERSION: i64 = 2;

/// Packs (`docs/PACKS.md`): a chunk row may name the pack that holds its bytes.
const SCHEMA_V2: &str = "
ALTER TABLE chunks ADD COLUMN pack BLOB CHECK (pack IS NULL OR length(pack) = 16);
ALTER TABLE chunks ADD COLUMN pack_offset INTEGER;
CREATE INDEX chunks_by_pack ON chunks(account, pack) WHERE pack IS NOT NULL;
CREATE TABLE packs (
    account INTEGER NOT NULL REFERENCES accounts(id),
    id BLOB NOT NULL CHECK (length(id) = 16),
    stored_len INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (account, id)
) WITHOUT ROWID;
";

const SCHEMA_V1: &str = "
CREATE TABLE accounts (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_ms INTEGER NOT NULL,
    quota_bytes INTEGER,
    wrapped_key BLOB,
    stored_bytes INTEGER NOT NULL DEFAULT 0,
    chunk_count INTEGER NOT NULL DEFAULT 0,
    snapshot_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE devices (
    id INTEGER PRIMARY KEY,
    account INTEGER NOT NULL REFERENCES accounts(id),
    public_key BLOB NOT NULL UNIQUE CHECK (length(public_key) = 32),
    name TEXT NOT NULL,
    capabilities INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
CREATE INDEX devices_by_account ON devices(account);
CREATE TABLE chunks (
    account INTEGER NOT NULL REFERENCES accounts(id),
    id BLOB NOT NULL CHECK (length(id) = 32),
    stored_len INTEGER NOT NULL,
    hash BLOB NOT NULL CHECK (length(hash) = 32),
    stored_ms INTEGER NOT NULL,
    touched_ms INTEGER NOT NULL,
    damaged_ms INTEGER,
    PRIMARY KEY (account, id)
) WITHOUT ROWID;
CREATE TABLE snapshots (
    account INTEGER NOT NULL REFERENCES accounts(id),
    id BLOB NOT NULL CHECK (length(id) = 16),
    time_ms INTEGER NOT NULL,
    host TEXT NOT NULL,
    tags BLOB NOT NULL,
    paths BLOB NOT NULL,
    files INTEGER NOT NULL,
    dirs INTEGER NOT NULL,
    size INTEGER NOT NULL,
    device INTEGER NOT NULL,
    body_len INTEGER NOT NULL,
    body_hash BLOB NOT NULL CHECK (length(body_hash) = 32),
    chunk_ids BLOB NOT NULL CHECK (length(chunk_ids) % 32 = 0),
    created_ms INTEGER NOT NULL,
    stored INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (account, id)
) WITHOUT ROWID;
CREATE TABLE enrolments (
    code_hash BLOB PRIMARY KEY CHECK (length(code_hash) = 32),
    account INTEGER NOT NULL REFERENCES accounts(id),
    capabilities INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    used_ms INTEGER
) WITHOUT ROWID;
CREATE TRIGGER chunk_added AFTER INSERT ON chunks BEGIN
    UPDATE accounts SET stored_bytes = stored_bytes + NEW.stored_len,
        chunk_count = chunk_count + 1 WHERE id = NEW.account;
END;
CREATE TRIGGER chunk_removed AFTER DELETE ON chunks BEGIN
    UPDATE accounts SET stored_bytes = stored_bytes - OLD.stored_len,
        chunk_count = chunk_count - 1 WHERE id = OLD.account;
END;
CREATE TRIGGER chunk_resized AFTER UPDATE OF stored_len ON chunks BEGIN
    UPDATE accounts SET stored_bytes = stored_bytes - OLD.stored_len + NEW.stored_len
        WHERE id = NEW.account;
END;
CREATE TRIGGER snapshot_added AFTER INSERT ON snapshots BEGIN
    UPDATE accounts SET stored_bytes = stored_bytes + NEW.body_len,
        snapshot_count = snapshot_count + 1 WHERE id = NEW.account;
END;
CREATE TRIGGER snapshot_removed AFTER DELETE ON snapshots BEGIN
    UPDATE accounts SET stored_bytes = stored_bytes - OLD.body_len,
        snapshot_count = snapshot_count - 1 WHERE id = OLD.account;
END;
";

/// The registry in a SQLite file.
#[derive(Debug)]
pub struct SqliteRegistry {
    conn: Connection,
}

impl SqliteRegistry {
    /// Opens (creating if needed) the database at `path` and brings its schema to
    /// [`SCHEMA_VERSION`].
    pub fn open(path: &Path) -> Result<SqliteRegistry, RepoError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // journal_mode answers with a row, so it is read rather than executed.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(RepoError::Corrupt(format!(
                "{}: cannot use WAL mode (got {mode})",
                path.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
        migrate(&mut conn)?;
        Ok(SqliteRegistry { conn })
    }
}

fn migrate(conn: &mut Connection) -> Result<(), RepoError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(RepoError::SchemaTooNew {
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version < 1 {
        tx.execute_batch(SCHEMA_V1)?;
    }
    if version < 2 {
        tx.execute_batch(SCHEMA_V2)?;
    }
    // Later versions: `if version < 3 { ... }`, each step in this transaction.
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

pub(super) fn to_i64(what: &str, v: u64) -> Result<i64, RepoError> {
    i64::try_from(v).map_err(|_| RepoError::InvalidArgument(format!("{what} {v} is too large")))
}

pub(super) fn to_u64(v: i64) -> u64 {
    v.max(0) as u64
}

/// Strings as one blob: each a little-endian u32 length and its bytes.
fn pack_strings(items: &[String]) -> Result<Vec<u8>, RepoError> {
    let mut out = Vec::new();
    for s in items {
        let len = u32::try_from(s.len())
            .map_err(|_| RepoError::InvalidArgument("a string over 4 GiB".into()))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    Ok(out)
}

fn unpack_strings(mut b: &[u8]) -> Result<Vec<String>, RepoError> {
    let bad = || RepoError::Corrupt("a packed string list".into());
    let mut out = Vec::new();
    while !b.is_empty() {
        let (len, rest) = b.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = u32::from_le_bytes(*len) as usize;
        let s = rest.get(..len).ok_or_else(bad)?;
        out.push(String::from_utf8(s.to_vec()).map_err(|_| bad())?);
        b = &rest[len..];
    }
    Ok(out)
}

fn pack_ids(ids: &[ChunkId]) -> Vec<u8> {
    ids.concat()
}

pub(super) fn unpack_ids(b: &[u8]) -> Result<Vec<ChunkId>, RepoError> {
    let (ids, rest) = b.as_chunks::<32>();
    if !rest.is_empty() {
        return Err(RepoError::Corrupt("a packed chunk id list".into()));
    }
    Ok(ids.to_vec())
}

fn blob_array<const N: usize>(v: Vec<u8>) -> Result<[u8; N], RepoError> {
    v.try_into()
        .map_err(|_| RepoError::Corrupt(format!("a {N}-byte field of another length")))
}

const DEVICE_COLS: &str = "id, account, name, capabilities, created_ms, revoked_ms";

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Device> {
    Ok(Device {
        id: r.get(0)?,
        account: r.get(1)?,
        name: r.get(2)?,
        caps: Capabilities::from_bits_truncate(r.get::<_, i64>(3)? as u32),
        created_ms: r.get(4)?,
        revoked_ms: r.get(5)?,
    })
}

const CHUNK_COLS: &str =
    "id, stored_len, hash, stored_ms, touched_ms, damaged_ms, pack, pack_offset";

type RawChunk = (
    (Vec<u8>, i64, Vec<u8>, i64, i64, Option<i64>),
    (Option<Vec<u8>>, Option<i64>),
);

fn raw_chunk(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawChunk> {
    Ok((
        (
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
        ),
        (r.get(6)?, r.get(7)?),
    ))
}

fn chunk_record(raw: RawChunk) -> Result<ChunkRecord, RepoError> {
    let ((id, len, hash, stored_ms, touched_ms, damaged_ms), (pack, offset)) = raw;
    Ok(ChunkRecord {
        id: blob_array(id)?,
        stored_len: to_u64(len),
        hash: blob_array(hash)?,
        stored_ms,
        touched_ms,
        damaged_ms,
        pack: match (pack, offset) {
            (Some(p), Some(o)) => Some(PackLoc {
                pack: blob_array(p)?,
                offset: to_u64(o),
            }),
            (None, _) => None,
            (Some(_), None) => {
                return Err(RepoError::Corrupt(
                    "a packed chunk without an offset".into(),
                ))
            }
        },
    })
}

const SNAPSHOT_COLS: &str =
    "id, time_ms, host, tags, paths, files, dirs, size, device, body_len, body_hash, chunk_ids, created_ms, stored";
/// The same columns without the chunk list, which a listing does not need.
const SNAPSHOT_LIST_COLS: &str =
    "id, time_ms, host, tags, paths, files, dirs, size, device, body_len, body_hash, x'' AS chunk_ids, created_ms, stored";

struct RawSnapshot {
    id: Vec<u8>,
    time_ms: i64,
    host: String,
    tags: Vec<u8>,
    paths: Vec<u8>,
    files: i64,
    dirs: i64,
    size: i64,
    device: i64,
    body_len: i64,
    body_hash: Vec<u8>,
    chunk_ids: Vec<u8>,
    created_ms: i64,
    stored: i64,
}

fn raw_snapshot(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawSnapshot> {
    Ok(RawSnapshot {
        id: r.get(0)?,
        time_ms: r.get(1)?,
        host: r.get(2)?,
        tags: r.get(3)?,
        paths: r.get(4)?,
        files: r.get(5)?,
        dirs: r.get(6)?,
        size: r.get(7)?,
        device: r.get(8)?,
        body_len: r.get(9)?,
        body_hash: r.get(10)?,
        chunk_ids: r.get(11)?,
        created_ms: r.get(12)?,
        stored: r.get(13)?,
    })
}

impl RawSnapshot {
    fn header(&self) -> Result<SnapshotHeader, RepoError> {
        Ok(SnapshotHeader {
            id: blob_array(self.id.clone())?,
            time_unix_ms: self.time_ms,
            host: self.host.clone(),
            tags: unpack_strings(&self.tags)?,
            paths: unpack_strings(&self.paths)?,
            files: to_u64(self.files),
            dirs: to_u64(self.dirs),
            size: to_u64(self.size),
            device: self.device,
            body_len: to_u64(self.body_len),
            stored: to_u64(self.stored),
            committed_ms: self.created_ms,
        })
    }
}

/// The set of chunk ids the account's snapshots name.
fn referenced(conn: &Connection, account: AccountId) -> Result<HashSet<ChunkId>, RepoError> {
    let mut st = conn.prepare_cached("SELECT chunk_ids FROM snapshots WHERE account = ?1")?;
    let mut rows = st.query([account])?;
    let mut set = HashSet::new();
    while let Some(r) = rows.next()? {
        let packed: Vec<u8> = r.get(0)?;
        set.extend(unpack_ids(&packed)?);
    }
    Ok(set)
}

fn unreferenced(
    conn: &Connection,
    account: AccountId,
    touched_before: i64,
) -> Result<Vec<ChunkRecord>, RepoError> {
    let refs = referenced(conn, account)?;
    let mut st = conn.prepare_cached(&format!(
        "SELECT {CHUNK_COLS} FROM chunks WHERE account = ?1 AND touched_ms < ?2"
    ))?;
    let raws = st
        .query_map(params![account, touched_before], raw_chunk)?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::new();
    for raw in raws {
        let rec = chunk_record(raw)?;
        if !refs.contains(&rec.id) {
            out.push(rec);
        }
    }
    Ok(out)
}

/// Every snapshot of the account, by its stamp.
fn snapshot_hashes(conn: &Connection, account: AccountId) -> Result<Vec<SnapshotStamp>, RepoError> {
    let mut st =
        conn.prepare_cached("SELECT id, body_hash, created_ms FROM snapshots WHERE account = ?1")?;
    let rows = st
        .query_map([account], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(id, hash, created_ms)| {
            Ok(SnapshotStamp {
                id: blob_array(id)?,
                body_hash: blob_array(hash)?,
                created_ms,
            })
        })
        .collect()
}

fn account_exists(conn: &Connection, account: AccountId) -> Result<(), RepoError> {
    let found = conn
        .prepare_cached("SELECT 1 FROM accounts WHERE id = ?1")?
        .exists([account])?;
    if found {
        Ok(())
    } else {
        Err(RepoError::NoSuchAccount(account))
    }
}

impl Registry for SqliteRegistry {
    fn remove_account(&mut self, account: AccountId) -> Result<bool, RepoError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for table in ["enrolments", "snapshots", "chunks", "packs", "devices"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE account = ?1"),
                [account],
            )?;
        }
        let n = tx.execute("DELETE FROM accounts WHERE id = ?1", [account])?;
        tx.commit()?;
        Ok(n == 1)
    }

    fn create_account(
        &mut self,
        name: &str,
        device_key: &[u8; 32],
        device_name: &str,
        now_ms: i64,
    ) -> Result<(AccountId, DeviceId), RepoError> {
        check_name("an account name", name)?;
        check_name("a device name", device_name)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if tx
            .prepare_cached("SELECT 1 FROM accounts WHERE name = ?1")?
            .exists([name])?
        {
            return Err(RepoError::NameTaken);
        }
        if tx
            .prepare_cached("SELECT 1 FROM devices WHERE public_key = ?1")?
            .exists([&device_key[..]])?
        {
            return Err(RepoError::KeyTaken);
        }
        tx.execute(
            "INSERT INTO accounts (name, created_ms) VALUES (?1, ?2)",
            params![name, now_ms],
        )?;
        let account = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO devices (account, public_key, name, capabilities, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                account,
                &device_key[..],
                device_name,
                Capabilities::ALL.0,
                now_ms
            ],
        )?;
        let device = tx.last_insert_rowid();
        tx.commit()?;
        Ok((account, device))
    }

    fn account_by_name(&mut self, name: &str) -> Result<Option<AccountId>, RepoError> {
        Ok(self
            .conn
            .prepare_cached("SELECT id FROM accounts WHERE name = ?1")?
            .query_row([name], |r| r.get(0))
            .optional()?)
    }

    fn account_name(&mut self, id: AccountId) -> Result<Option<String>, RepoError> {
        Ok(self
            .conn
            .prepare_cached("SELECT name FROM accounts WHERE id = ?1")?
            .query_row([id], |r| r.get(0))
            .optional()?)
    }

    fn accounts(&mut self) -> Result<Vec<AccountId>, RepoError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT id FROM accounts ORDER BY id")?;
        let ids = st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(ids)
    }

    fn ping(&mut self) -> Result<(), RepoError> {
        self.conn
            .prepare_cached("SELECT count(*) FROM accounts WHERE id = 0")?
            .query_row([], |_| Ok(()))?;
        Ok(())
    }

    fn device_by_key(&mut self, key: &[u8; 32]) -> Result<Option<Device>, RepoError> {
        Ok(self
            .conn
            .prepare_cached(&format!(
                "SELECT {DEVICE_COLS} FROM devices WHERE public_key = ?1"
            ))?
            .query_row([&key[..]], device_row)
            .optional()?)
    }

    fn add_device(
        &mut self,
        account: AccountId,
        key: &[u8; 32],
        name: &str,
        caps: Capabilities,
        now_ms: i64,
    ) -> Result<DeviceId, RepoError> {
        check_name("a device name", name)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        account_exists(&tx, account)?;
        if tx
            .prepare_cached("SELECT 1 FROM devices WHERE public_key = ?1")?
            .exists([&key[..]])?
        {
            return Err(RepoError::KeyTaken);
        }
        tx.execute(
            "INSERT INTO devices (account, public_key, name, capabilities, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                account,
                &key[..],
                name,
                Capabilities::from_bits_truncate(caps.0).0,
                now_ms
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    fn add_enrolment(
        &mut self,
        account: AccountId,
        code_hash: &[u8; 32],
        caps: Capabilities,
        now_ms: i64,
        expires_ms: i64,
    ) -> Result<(), RepoError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        account_exists(&tx, account)?;
        tx.execute(
            "INSERT INTO enrolments (code_hash, account, capabilities, created_ms, expires_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                &code_hash[..],
                account,
                Capabilities::from_bits_truncate(caps.0).0,
                now_ms,
                expires_ms
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn redeem_enrolment(
        &mut self,
        code_hash: &[u8; 32],
        key: &[u8; 32],
        name: &str,
        now_ms: i64,
    ) -> Result<Option<Device>, RepoError> {
        check_name("a device name", name)?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(AccountId, u32)> = tx
            .query_row(
                "SELECT account, capabilities FROM enrolments
                 WHERE code_hash = ?1 AND used_ms IS NULL AND expires_ms > ?2",
                params![&code_hash[..], now_ms],
                |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u32)),
            )
            .optional()?;
        let Some((account, caps)) = row else {
            return Ok(None);
        };
        tx.execute(
            "UPDATE enrolments SET used_ms = ?2 WHERE code_hash = ?1",
            params![&code_hash[..], now_ms],
        )?;
        let inserted = tx.execute(
            "INSERT INTO devices (account, public_key, name, capabilities, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![account, &key[..], name, caps as i64, now_ms],
        );
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(RepoError::KeyTaken);
            }
            Err(e) => return Err(e.into()),
        }
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(Some(Device {
            id,
            account,
            name: name.to_string(),
            caps: Capabilities::from_bits_truncate(caps),
            created_ms: now_ms,
            revoked_ms: None,
        }))
    }

    fn list_devices(&mut self, account: AccountId) -> Result<Vec<Device>, RepoError> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {DEVICE_COLS} FROM devices WHERE account = ?1 ORDER BY id"
        ))?;
        let devices = st
            .query_map([account], device_row)?
            .collect::<Result<_, _>>()?;
        Ok(devices)
    }

    fn revoke_device(
        &mut self,
        account: AccountId,
        device: DeviceId,
        now_ms: i64,
    ) -> Result<bool, RepoError> {
        let n = self.conn.execute(
            "UPDATE devices SET revoked_ms = coalesce(revoked_ms, ?3)
             WHERE id = ?1 AND account = ?2",
            params![device, account, now_ms],
        )?;
        Ok(n == 1)
    }

    fn set_wrapped_key(&mut self, account: AccountId, key: &[u8]) -> Result<(), RepoError> {
        let n = self.conn.execute(
            "UPDATE accounts SET wrapped_key = ?2 WHERE id = ?1",
            params![account, key],
        )?;
        if n == 0 {
            return Err(RepoError::NoSuchAccount(account));
        }
        Ok(())
    }

    fn wrapped_key(&mut self, account: AccountId) -> Result<Option<Vec<u8>>, RepoError> {
        let key: Option<Option<Vec<u8>>> = self
            .conn
            .prepare_cached("SELECT wrapped_key FROM accounts WHERE id = ?1")?
            .query_row([account], |r| r.get(0))
            .optional()?;
        key.ok_or(RepoError::NoSuchAccount(account))
    }

    fn set_quota(&mut self, account: AccountId, quota: Option<u64>) -> Result<(), RepoError> {
        let quota = quota.map(|q| to_i64("a quota", q)).transpose()?;
        let n = self.conn.execute(
            "UPDATE accounts SET quota_bytes = ?2 WHERE id = ?1",
            params![account, quota],
        )?;
        if n == 0 {
            return Err(RepoError::NoSuchAccount(account));
        }
        Ok(())
    }

    fn usage(&mut self, account: AccountId) -> Result<Usage, RepoError> {
        self.conn
            .prepare_cached(
                "SELECT chunk_count, stored_bytes, snapshot_count, quota_bytes
                 FROM accounts WHERE id = ?1",
            )?
            .query_row([account], |r| {
                Ok(Usage {
                    chunks: to_u64(r.get(0)?),
                    stored_bytes: to_u64(r.get(1)?),
                    snapshots: to_u64(r.get(2)?),
                    quota: r.get::<_, Option<i64>>(3)?.map(to_u64),
                })
            })
            .optional()?
            .ok_or(RepoError::NoSuchAccount(account))
    }

    fn chunks_held(
        &mut self,
        account: AccountId,
        ids: &[ChunkId],
        now_ms: i64,
    ) -> Result<Vec<bool>, RepoError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut held = Vec::with_capacity(ids.len());
        {
            let mut touch = tx.prepare_cached(
                "UPDATE chunks SET touched_ms = max(touched_ms, ?3)
                 WHERE account = ?1 AND id = ?2 AND damaged_ms IS NULL",
            )?;
            for id in ids {
                held.push(touch.execute(params![account, &id[..], now_ms])? == 1);
            }
        }
        tx.commit()?;
        Ok(held)
    }

    fn chunks_sound(
        &mut self,
        account: AccountId,
        ids: &[ChunkId],
    ) -> Result<Vec<bool>, RepoError> {
        let mut st = self.conn.prepare_cached(
            "SELECT 1 FROM chunks WHERE account = ?1 AND id = ?2 AND damaged_ms IS NULL",
        )?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(st.exists(params![account, &id[..]])?);
        }
        Ok(out)
    }

    fn chunks_recorded(
        &mut self,
        account: AccountId,
        ids: &[ChunkId],
    ) -> Result<Vec<bool>, RepoError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM chunks WHERE account = ?1 AND id = ?2")?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(st.exists(params![account, &id[..]])?);
        }
        Ok(out)
    }

    fn insert_chunks(
        &mut self,
        packs: &[(AccountId, PackRecord)],
        records: &[(AccountId, ChunkRecord)],
    ) -> Result<(), RepoError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT INTO packs (account, id, stored_len, created_ms) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (account, p) in packs {
                account_exists(&tx, *account)?;
                ins.execute(params![
                    account,
                    &p.id[..],
                    to_i64("a pack length", p.stored_len)?,
                    p.created_ms
                ])?;
            }
            let mut ins = tx.prepare_cached(
                "INSERT INTO chunks (account, id, stored_len, hash, stored_ms, touched_ms,
                                     pack, pack_offset)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (account, id) DO UPDATE SET stored_len = excluded.stored_len,
                     hash = excluded.hash, stored_ms = excluded.stored_ms,
                     touched_ms = max(touched_ms, excluded.touched_ms), damaged_ms = NULL,
                     pack = excluded.pack, pack_offset = excluded.pack_offset",
            )?;
            for (account, r) in records {
                account_exists(&tx, *account)?;
                let offset = match &r.pack {
                    Some(l) => Some(to_i64("a pack offset", l.offset)?),
                    None => None,
                };
                ins.execute(params![
                    account,
                    &r.id[..],
                    to_i64("a chunk length", r.stored_len)?,
                    &r.hash[..],
                    r.stored_ms,
                    r.touched_ms,
                    r.pack.as_ref().map(|l| &l.pack[..]),
                    offset,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn chunk_record(
        &mut self,
        account: AccountId,
        id: &ChunkId,
    ) -> Result<Option<ChunkRecord>, RepoError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {CHUNK_COLS} FROM chunks WHERE account = ?1 AND id = ?2"
            ))?
            .query_row(params![account, &id[..]], raw_chunk)
            .optional()?
            .map(chunk_record)
            .transpose()
    }

    fn packs(&mut self, account: AccountId) -> Result<Vec<PackUsage>, RepoError> {
        let mut st = self.conn.prepare_cached(
            "SELECT p.id, p.stored_len, p.created_ms, count(c.id), coalesce(sum(c.stored_len), 0)
             FROM packs p LEFT JOIN chunks c ON c.account = p.account AND c.pack = p.id
             WHERE p.account = ?1 GROUP BY p.id ORDER BY p.id",
        )?;
        let raws = st
            .query_map([account], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        raws.into_iter()
            .map(|(id, len, created_ms, n, bytes)| {
                Ok(PackUsage {
                    pack: PackRecord {
                        id: blob_array(id)?,
                        stored_len: to_u64(len),
                        created_ms,
                    },
                    live_chunks: to_u64(n),
                    live_bytes: to_u64(bytes),
                })
            })
            .collect()
    }

    fn chunks_in_pack(
        &mut self,
        account: AccountId,
        pack: &PackId,
    ) -> Result<Vec<ChunkRecord>, RepoError> {
        self.conn
            .prepare_cached(&format!(
                "SELECT {CHUNK_COLS} FROM chunks WHERE account = ?1 AND pack = ?2
                 ORDER BY pack_offset"
            ))?
            .query_map(params![account, &pack[..]], raw_chunk)?
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .map(chunk_record)
            .collect()
    }

    fn packs_recorded(
        &mut self,
        account: AccountId,
        ids: &[PackId],
    ) -> Result<Vec<bool>, RepoError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT 1 FROM packs WHERE account = ?1 AND id = ?2")?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(st.exists(params![account, &id[..]])?);
        }
        Ok(out)
    }

    fn delete_unnamed_packs(
        &mut self,
        account: AccountId,
        ids: &[PackId],
    ) -> Result<Vec<PackId>, RepoError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = Vec::new();
        {
            let mut del = tx.prepare_cached(
                "DELETE FROM packs WHERE account = ?1 AND id = ?2 AND NOT EXISTS
                     (SELECT 1 FROM chunks WHERE account = ?1 AND pack = ?2)",
            )?;
            for id in ids {
                if del.execute(params![account, &id[..]])? == 1 {
                    out.push(*id);
                }
            }
        }
        tx.commit()?;
        Ok(out)
    }

    fn move_chunks(
        &mut self,
        account: AccountId,
        to: &PackRecord,
        moves: &[ChunkMove],
    ) -> Result<u64, RepoError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        account_exists(&tx, account)?;
        tx.execute(
            "INSERT INTO packs (account, id, stored_len, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![
                account,
                &to.id[..],
                to_i64("a pack length", to.stored_len)?,
                to.created_ms
            ],
        )?;
        let mut moved = 0;
        {
            let mut mv = tx.prepare_cached(
                "UPDATE chunks SET pack = ?5, pack_offset = ?6
                 WHERE account = ?1 AND id = ?2 AND pack = ?3 AND pack_offset = ?4
                   AND damaged_ms IS NULL",
            )?;
            for m in moves {
                moved += mv.execute(params![
                    account,
                    &m.id[..],
                    &m.from.pack[..],
                    to_i64("a pack offset", m.from.offset)?,
                    &to.id[..],
                    to_i64("a pack offset", m.to_offset)?,
                ])? as u64;
            }
        }
        tx.commit()?;
        Ok(moved)
    }

    fn commit_snapshot(
        &mut self,
        account: AccountId,
        header: &SnapshotHeader,
        chunks: &[ChunkId],
        body_hash: &Hash,
        now_ms: i64,
    ) -> Result<CommitOutcome, RepoError> {
        let packed = pack_ids(chunks);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        account_exists(&tx, account)?;
        let existing: Option<(Vec<u8>, Vec<u8>)> = tx
            .prepare_cached(
                "SELECT body_hash, chunk_ids FROM snapshots WHERE account = ?1 AND id = ?2",
            )?
            .query_row(params![account, &header.id[..]], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        if let Some((hash, ids)) = existing {
            return if hash == body_hash[..] && ids == packed {
                Ok(CommitOutcome::AlreadyCommitted)
            } else {
                Err(RepoError::SnapshotExists)
            };
        }
        let mut missing = Vec::new();
        {
            // Checked, not touched (`Registry::commit_snapshot`): reads only.
            let mut sound = tx.prepare_cached(
                "SELECT 1 FROM chunks WHERE account = ?1 AND id = ?2 AND damaged_ms IS NULL",
            )?;
            let mut seen = HashSet::with_capacity(chunks.len());
            for id in chunks {
                if seen.insert(id) && !sound.exists(params![account, &id[..]])? {
                    missing.push(*id);
                }
            }
        }
        if !missing.is_empty() {
            return Err(RepoError::MissingChunks(missing)); // the transaction rolls back
        }
        tx.execute(
            &format!(
                "INSERT INTO snapshots (account, {SNAPSHOT_COLS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
            ),
            params![
                account,
                &header.id[..],
                header.time_unix_ms,
                header.host,
                pack_strings(&header.tags)?,
                pack_strings(&header.paths)?,
                to_i64("a file count", header.files)?,
                to_i64("a directory count", header.dirs)?,
                to_i64("a size", header.size)?,
                header.device,
                to_i64("a body length", header.body_len)?,
                &body_hash[..],
                packed,
                now_ms,
                to_i64("a stored size", header.stored)?
            ],
        )?;
        tx.commit()?;
        Ok(CommitOutcome::Committed)
    }

    fn list_snapshots(&mut self, account: AccountId) -> Result<Vec<SnapshotHeader>, RepoError> {
        let mut st = self.conn.prepare_cached(&format!(
            "SELECT {SNAPSHOT_LIST_COLS} FROM snapshots WHERE account = ?1 ORDER BY time_ms, id"
        ))?;
        let raws = st
            .query_map([account], raw_snapshot)?
            .collect::<Result<Vec<_>, _>>()?;
        raws.iter().map(RawSnapshot::header).collect()
    }

    fn get_snapshot(
        &mut self,
        account: AccountId,
        id: &SnapshotId,
    ) -> Result<Option<StoredSnapshot>, RepoError> {
        let raw = self
            .conn
            .prepare_cached(&format!(
                "SELECT {SNAPSHOT_COLS} FROM snapshots WHERE account = ?1 AND id = ?2"
            ))?
            .query_row(params![account, &id[..]], raw_snapshot)
            .optional()?;
        let Some(raw) = raw else { return Ok(None) };
        Ok(Some(StoredSnapshot {
            header: raw.header()?,
            chunks: unpack_ids(&raw.chunk_ids)?,
            body_hash: blob_array(raw.body_hash)?,
            created_ms: raw.created_ms,
        }))
    }

    fn forget_snapshot(&mut self, account: AccountId, id: &SnapshotId) -> Result<bool, RepoError> {
        let n = self.conn.execute(
            "DELETE FROM snapshots WHERE account = ?1 AND id = ?2",
            params![account, &id[..]],
        )?;
        Ok(n == 1)
    }

    fn unreferenced_chunks(
        &mut self,
        account: AccountId,
        touched_before: i64,
    ) -> Result<Unreferenced, RepoError> {
        let tx = self.conn.transaction()?;
        let mut chunks = unreferenced(&tx, account, touched_before)?;
        let snapshots = snapshot_hashes(&tx, account)?;
        tx.commit()?;
        chunks.sort_unstable_by_key(|r| r.id);
        Ok(Unreferenced { chunks, snapshots })
    }

    fn delete_unreferenced_chunks(
        &mut self,
        account: AccountId,
        ids: &[ChunkId],
        touched_before: i64,
        checked: &[SnapshotStamp],
    ) -> Result<Vec<ChunkRecord>, RepoError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let known: HashSet<SnapshotStamp> = checked.iter().copied().collect();
        let mut named = HashSet::new();
        for stamp in snapshot_hashes(&tx, account)? {
            if !known.contains(&stamp) {
                let sid = stamp.id;
                let packed: Vec<u8> = tx
                    .prepare_cached(
                        "SELECT chunk_ids FROM snapshots WHERE account = ?1 AND id = ?2",
                    )?
                    .query_row(params![account, &sid[..]], |r| r.get(0))?;
                named.extend(unpack_ids(&packed)?);
            }
        }
        let mut doomed = Vec::new();
        {
            let mut find = tx.prepare_cached(&format!(
                "SELECT {CHUNK_COLS} FROM chunks WHERE account = ?1 AND id = ?2 AND touched_ms < ?3"
            ))?;
            let mut del = tx.prepare_cached("DELETE FROM chunks WHERE account = ?1 AND id = ?2")?;
            let mut seen = HashSet::new();
            for id in ids {
                if named.contains(id) || !seen.insert(*id) {
                    continue;
                }
                let Some(raw) = find
                    .query_row(params![account, &id[..], touched_before], raw_chunk)
                    .optional()?
                else {
                    continue;
                };
                del.execute(params![account, &id[..]])?;
                doomed.push(chunk_record(raw)?);
            }
        }
        tx.commit()?;
        doomed.sort_unstable_by_key(|r| r.id);
        Ok(doomed)
    }

    fn chunk_records(
        &mut self,
        account: AccountId,
        after: Option<&ChunkId>,
        limit: usize,
    ) -> Result<Vec<ChunkRecord>, RepoError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let raws = match after {
            Some(after) => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {CHUNK_COLS} FROM chunks WHERE account = ?1 AND id > ?2
                     ORDER BY id LIMIT ?3"
                ))?
                .query_map(params![account, &after[..], limit], raw_chunk)?
                .collect::<Result<Vec<_>, _>>()?,
            None => self
                .conn
                .prepare_cached(&format!(
                    "SELECT {CHUNK_COLS} FROM chunks WHERE account = ?1 ORDER BY id LIMIT ?2"
                ))?
                .query_map(params![account, limit], raw_chunk)?
                .collect::<Result<Vec<_>, _>>()?,
        };
        raws.into_iter().map(chunk_record).collect()
    }

    fn mark_damaged(
        &mut self,
        account: AccountId,
        id: &ChunkId,
        hash: &Hash,
        now_ms: i64,
    ) -> Result<bool, RepoError> {
        let n = self.conn.execute(
            "UPDATE chunks SET damaged_ms = ?4
             WHERE account = ?1 AND id = ?2 AND hash = ?3 AND damaged_ms IS NULL",
            params![account, &id[..], &hash[..], now_ms],
        )?;
        Ok(n == 1)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::repo::conformance::RegistryHarness;

    pub(crate) struct SqliteHarness {
        pub dir: tempfile::TempDir,
    }

    impl RegistryHarness for SqliteHarness {
        type Registry = SqliteRegistry;
        fn new() -> Self {
            SqliteHarness {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn open(&mut self) -> SqliteRegistry {
            SqliteRegistry::open(&self.dir.path().join("repo.db")).unwrap()
        }
    }

    crate::registry_conformance!(SqliteHarness);

    #[test]
    fn a_version_1_database_is_migrated_and_keeps_its_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute_batch(
                "INSERT INTO accounts (id, name, created_ms) VALUES (1, 'old', 0);
                 INSERT INTO chunks (account, id, stored_len, hash, stored_ms, touched_ms)
                 VALUES (1, zeroblob(32), 5, zeroblob(32), 0, 0);",
            )
            .unwrap();
        }
        let mut r = SqliteRegistry::open(&path).unwrap();
        let rec = r.chunk_record(1, &[0; 32]).unwrap().unwrap();
        assert_eq!((rec.stored_len, rec.pack), (5, None));
        assert!(r.packs(1).unwrap().is_empty());
        let v: i64 = r
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    #[test]
    fn schema_version_is_set_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo.db");
        drop(SqliteRegistry::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        assert!(matches!(
            SqliteRegistry::open(&path),
            Err(RepoError::SchemaTooNew { .. })
        ));
    }

    #[test]
    fn packed_strings_round_trip_and_reject_garbage() {
        let v = vec!["".to_owned(), "a\nb".to_owned(), "ünï".to_owned()];
        assert_eq!(unpack_strings(&pack_strings(&v).unwrap()).unwrap(), v);
        assert!(unpack_strings(&[5, 0, 0, 0, b'a']).is_err());
        assert!(unpack_ids(&[0; 33]).is_err());
    }
}
