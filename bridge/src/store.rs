//! What the bridge keeps across restarts, in SQLite (`bridge.db` in the data
//! directory): the history of jobs, and one identity per (backup server, user name),
//! in the me.info format, so a second backup by the same user reconnects instead of
//! failing as "name taken".

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::jobs::{Job, Status};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("the database lock is poisoned")]
    Poisoned,
}

/// The bridge's database.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    server TEXT NOT NULL,
    user TEXT NOT NULL,
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    status TEXT NOT NULL,
    cksum INTEGER,
    error TEXT,
    bytes_per_sec REAL NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    finished_at INTEGER,
    duration_ms INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
CREATE TABLE IF NOT EXISTS identities (
    server TEXT NOT NULL,
    user TEXT NOT NULL,
    me_info TEXT NOT NULL,
    PRIMARY KEY (server, user)
);
";

impl Store {
    /// Opens (creating) the database; jobs that were running when the bridge stopped
    /// are marked interrupted.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        conn.execute(
            "UPDATE jobs SET status = 'interrupted', error = 'the bridge stopped during this backup'
             WHERE status IN ('pending', 'running')",
            [],
        )?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let c = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        Ok(f(&c)?)
    }

    /// Inserts or updates a job.
    pub fn save_job(&self, j: &Job) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO jobs (id, server, user, file, size, status, cksum, error, bytes_per_sec, created_at, finished_at, duration_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT(id) DO UPDATE SET status = excluded.status, cksum = excluded.cksum,
                    error = excluded.error, bytes_per_sec = excluded.bytes_per_sec,
                    finished_at = excluded.finished_at, duration_ms = excluded.duration_ms",
                params![
                    j.id,
                    j.server,
                    j.user,
                    j.file,
                    j.size as i64,
                    j.status.as_str(),
                    j.cksum.map(|c| c as i64),
                    j.error,
                    j.bytes_per_sec,
                    j.created_at as i64,
                    j.finished_at.map(|t| t as i64),
                    j.duration_ms.map(|t| t as i64),
                ],
            )
            .map(|_| ())
        })
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
        let status: String = r.get(5)?;
        let status = Status::parse(&status).unwrap_or(Status::Interrupted);
        let size: i64 = r.get(4)?;
        let done = status == Status::Done;
        Ok(Job {
            id: r.get(0)?,
            server: r.get(1)?,
            user: r.get(2)?,
            file: r.get(3)?,
            size: size as u64,
            status,
            phase: if done {
                "done".into()
            } else {
                "waiting".into()
            },
            bytes: if done { size as u64 } else { 0 },
            percent: if done { 100.0 } else { 0.0 },
            cksum: r.get::<_, Option<i64>>(6)?.map(|c| c as u32),
            error: r.get(7)?,
            bytes_per_sec: r.get(8)?,
            eta_seconds: None,
            created_at: r.get::<_, i64>(9)? as u64,
            finished_at: r.get::<_, Option<i64>>(10)?.map(|t| t as u64),
            duration_ms: r.get::<_, Option<i64>>(11)?.map(|t| t as u64),
        })
    }

    /// The newest `limit` jobs.
    pub fn history(&self, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, server, user, file, size, status, cksum, error, bytes_per_sec, created_at, finished_at, duration_ms
                 FROM jobs ORDER BY created_at DESC, rowid DESC LIMIT ?1",
            )?;
            let rows = st.query_map([limit as i64], Self::row)?;
            rows.collect()
        })
    }

    /// One job.
    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT id, server, user, file, size, status, cksum, error, bytes_per_sec, created_at, finished_at, duration_ms
                 FROM jobs WHERE id = ?1",
                [id],
                Self::row,
            )
            .optional()
        })
    }

    /// The saved identity (me.info text) of a user on a server.
    pub fn identity(&self, server: &str, user: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            c.query_row(
                "SELECT me_info FROM identities WHERE server = ?1 AND user = ?2",
                [server, user],
                |r| r.get(0),
            )
            .optional()
        })
    }

    /// Saves an identity.
    pub fn save_identity(&self, server: &str, user: &str, me_info: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO identities (server, user, me_info) VALUES (?1, ?2, ?3)
                 ON CONFLICT(server, user) DO UPDATE SET me_info = excluded.me_info",
                [server, user, me_info],
            )
            .map(|_| ())
        })
    }
}
