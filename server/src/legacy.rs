//! Read access to the v3 store for v4 connections that proved a v3 identity
//! (`docs/PROTOCOL-V4.md` §5.1): the v3 client's public key, its stored files, and
//! pieces of them.
//!
//! Everything here only reads. The v3 registry database is opened read-only for each
//! call (WAL mode lets it read beside the registry thread's writes), on the runtime's
//! blocking pool; a file is read at the path v3's storage gives it, and only if the
//! registry holds a verified row for it.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use cyberbackup_protocol::common::{client_id_hex, ClientId};
use cyberbackup_protocol::v3::name::check_file_name;
use cyberbackup_protocol::v4::wire::{LegacyFile, MAX_LEGACY_PAGE};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

/// Legacy store errors (all of them the server's: the peer's mistakes are answers).
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error("v3 registry {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("reading v3 file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A v3 client as a legacy login sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyAccount {
    pub name: String,
    pub public_key: Vec<u8>,
    pub files: u64,
    pub bytes: u64,
}

/// The v3 registry and storage root, read-only.
#[derive(Debug, Clone)]
pub struct LegacyStore {
    db: PathBuf,
    root: PathBuf,
}

impl LegacyStore {
    pub fn new(db: &Path, root: &Path) -> Self {
        LegacyStore {
            db: db.to_owned(),
            root: root.to_owned(),
        }
    }

    fn open(&self) -> Result<Option<Connection>, LegacyError> {
        if !self.db.exists() {
            return Ok(None);
        }
        Connection::open_with_flags(
            &self.db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map(Some)
        .map_err(|e| self.db_err(e))
    }

    fn db_err(&self, source: rusqlite::Error) -> LegacyError {
        LegacyError::Db {
            path: self.db.clone(),
            source,
        }
    }

    /// The client's name, registered public key and stored files (`None`: no such
    /// client, or it never sent a key).
    pub fn account(&self, id: &ClientId) -> Result<Option<LegacyAccount>, LegacyError> {
        let Some(conn) = self.open()? else {
            return Ok(None);
        };
        let row: Option<(String, Option<Vec<u8>>)> = conn
            .query_row(
                "SELECT name, public_key FROM clients WHERE id = ?1",
                params![&id[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.db_err(e))?;
        let Some((name, Some(public_key))) = row else {
            return Ok(None);
        };
        let (files, bytes): (i64, i64) = conn
            .query_row(
                "SELECT count(*), coalesce(sum(size), 0) FROM files
                 WHERE client_id = ?1 AND verified = 1",
                params![&id[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.db_err(e))?;
        Ok(Some(LegacyAccount {
            name,
            public_key,
            files: files.max(0) as u64,
            bytes: bytes.max(0) as u64,
        }))
    }

    /// Up to [`MAX_LEGACY_PAGE`] of the client's verified files whose names sort after
    /// `after` (byte order), and whether more follow.
    pub fn list(&self, id: &ClientId, after: &str) -> Result<(Vec<LegacyFile>, bool), LegacyError> {
        let Some(conn) = self.open()? else {
            return Ok((Vec::new(), false));
        };
        let mut st = conn
            .prepare(
                "SELECT name, size, cksum, stored_at FROM files
                 WHERE client_id = ?1 AND verified = 1 AND CAST(name AS BLOB) > CAST(?2 AS BLOB)
                 ORDER BY CAST(name AS BLOB) LIMIT ?3",
            )
            .map_err(|e| self.db_err(e))?;
        let mut files = st
            .query_map(params![&id[..], after, MAX_LEGACY_PAGE as i64 + 1], |r| {
                Ok(LegacyFile {
                    name: r.get(0)?,
                    size: r.get::<_, i64>(1)?.max(0) as u64,
                    cksum: r.get::<_, i64>(2)? as u32,
                    stored_ms: (r.get::<_, i64>(3)?.max(0) as u64).saturating_mul(1000),
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.db_err(e))?;
        let more = files.len() > MAX_LEGACY_PAGE as usize;
        files.truncate(MAX_LEGACY_PAGE as usize);
        Ok((files, more))
    }

    /// Up to `max` bytes of the file `name` from `offset` (`None`: the client holds no
    /// verified file of that name).
    pub fn read(
        &self,
        id: &ClientId,
        name: &str,
        offset: u64,
        max: u32,
    ) -> Result<Option<Vec<u8>>, LegacyError> {
        if check_file_name(name.as_bytes()).is_err() {
            return Ok(None);
        }
        let Some(conn) = self.open()? else {
            return Ok(None);
        };
        let size: Option<i64> = conn
            .query_row(
                "SELECT size FROM files WHERE client_id = ?1 AND name = ?2 AND verified = 1",
                params![&id[..], name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db_err(e))?;
        let Some(size) = size else {
            return Ok(None);
        };
        let path = self.root.join(client_id_hex(id)).join(name);
        let io = |source| LegacyError::Io {
            path: path.clone(),
            source,
        };
        let mut f = File::open(&path).map_err(io)?;
        let want = (size.max(0) as u64).saturating_sub(offset).min(max as u64);
        let mut buf = Vec::with_capacity(want as usize);
        if want > 0 {
            f.seek(SeekFrom::Start(offset)).map_err(io)?;
            f.take(want).read_to_end(&mut buf).map_err(io)?;
        }
        Ok(Some(buf))
    }
}
