//! Files uploaded with protocol v3 (the v3 CLI or the original CyberBackup 3.0 client),
//! read over v4 (`docs/PROTOCOL-V4.md` §5.1): prove the v3 identity with its RSA key
//! (`me.info`), list the files, restore them, or import them as a v4 snapshot.
//!
//! v3 stored each file in the clear with the POSIX `cksum` both ends agreed on; every
//! file read here is checked against its size and that checksum before it is kept.

use std::collections::VecDeque;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use cyberbackup_protocol::v3::cksum::Cksum;
use cyberbackup_protocol::v3::crypto::CryptoError;
use cyberbackup_protocol::v4::format::RepoKey;
use cyberbackup_protocol::v4::wire::{Answer, LegacyFile, Request, MAX_LEGACY_READ};

use super::backup::{self, BackupError, BackupOptions, BackupProgress, BackupSummary};
use super::conn::{ConnError, Connection, Pending};
use super::restore::RestoreProgress;
use crate::identity::Identity;

/// Legacy errors.
#[derive(Debug, thiserror::Error)]
pub enum LegacyError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("signing the v3 proof: {0}")]
    Sign(#[from] CryptoError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} already exists (use --overwrite to replace it)")]
    Exists(PathBuf),
    #[error("no v3 file named {0:?}")]
    NoMatch(String),
}

/// The v3 client a connection proved it holds the key of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyAccount {
    pub name: String,
    pub files: u64,
    pub bytes: u64,
}

/// Proves `identity` on this connection; from then on the connection reads its files.
pub fn login(conn: &Connection, identity: &Identity) -> Result<LegacyAccount, LegacyError> {
    let signature = cyberbackup_protocol::v4::legacy::sign(
        &identity.keypair,
        &conn.handshake_hash(),
        &identity.id,
    )?;
    match conn.call(&Request::LegacyLogin {
        client_id: identity.id,
        signature,
    })? {
        Answer::LegacyAccount { name, files, bytes } => Ok(LegacyAccount { name, files, bytes }),
        _ => Err(ConnError::UnexpectedAnswer("LEGACY_LOGIN").into()),
    }
}

/// Every stored file of the proven v3 client, in byte order of their names.
pub fn list(conn: &Connection) -> Result<Vec<LegacyFile>, LegacyError> {
    let mut all = Vec::new();
    let mut after = String::new();
    loop {
        match conn.call(&Request::LegacyList {
            after: after.clone(),
        })? {
            Answer::LegacyFiles { files, more } => {
                let Some(last) = files.last() else { break };
                if last.name <= after && !after.is_empty() {
                    // A server that does not move forward would loop forever.
                    return Err(ConnError::UnexpectedAnswer("LEGACY_FILES").into());
                }
                after = last.name.clone();
                all.extend(files);
                if !more {
                    break;
                }
            }
            _ => return Err(ConnError::UnexpectedAnswer("LEGACY_LIST").into()),
        }
    }
    Ok(all)
}

/// The files of `all` whose names match one of `patterns` (globs; none: all), or an
/// error naming a pattern that matches nothing.
pub fn select(all: Vec<LegacyFile>, patterns: &[String]) -> Result<Vec<LegacyFile>, LegacyError> {
    if patterns.is_empty() {
        return Ok(all);
    }
    for p in patterns {
        if !all.iter().any(|f| super::inspect::glob(p, &f.name)) {
            return Err(LegacyError::NoMatch(p.clone()));
        }
    }
    Ok(all
        .into_iter()
        .filter(|f| patterns.iter().any(|p| super::inspect::glob(p, &f.name)))
        .collect())
}

/// Pieces read ahead of the one being consumed.
const AHEAD: usize = 4;

/// One v3 file as a reader: pieces are fetched ahead, and the end of the file is an
/// error unless the bytes match the stored size and checksum.
pub struct LegacyReader<'a> {
    conn: &'a Connection,
    file: LegacyFile,
    /// Next offset to ask for.
    asked: u64,
    pending: VecDeque<Pending>,
    buf: Vec<u8>,
    pos: usize,
    got: u64,
    ck: Cksum,
    checked: bool,
}

impl<'a> LegacyReader<'a> {
    pub fn new(conn: &'a Connection, file: LegacyFile) -> Self {
        LegacyReader {
            conn,
            file,
            asked: 0,
            pending: VecDeque::new(),
            buf: Vec::new(),
            pos: 0,
            got: 0,
            ck: Cksum::new(),
            checked: false,
        }
    }

    fn fill(&mut self) -> std::io::Result<()> {
        while self.pending.len() < AHEAD && self.asked < self.file.size {
            let max = (self.file.size - self.asked).min(MAX_LEGACY_READ as u64) as u32;
            let p = self
                .conn
                .submit(&Request::LegacyRead {
                    name: self.file.name.clone(),
                    offset: self.asked,
                    max,
                })
                .map_err(std::io::Error::other)?;
            self.pending.push_back(p);
            self.asked += max as u64;
        }
        Ok(())
    }
}

impl Read for LegacyReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            self.fill()?;
            let Some(p) = self.pending.pop_front() else {
                if !self.checked {
                    self.checked = true;
                    let sum = self.ck.finalize();
                    if self.got != self.file.size || sum != self.file.cksum {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!(
                                "the server's copy is not what v3 verified ({} bytes, cksum {}; \
                                 expected {} bytes, cksum {})",
                                self.got, sum, self.file.size, self.file.cksum
                            ),
                        ));
                    }
                }
                return Ok(0);
            };
            match p.wait().map_err(std::io::Error::other)? {
                Answer::LegacyData(b) if !b.is_empty() => {
                    self.got += b.len() as u64;
                    if self.got > self.file.size {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the server sent more bytes than the file holds",
                        ));
                    }
                    self.ck.update(&b);
                    self.buf = b;
                    self.pos = 0;
                }
                Answer::LegacyData(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file ended early on the server",
                    ))
                }
                _ => return Err(std::io::Error::other("unexpected answer to LEGACY_READ")),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What a legacy restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegacyRestoreSummary {
    pub files: u64,
    /// Files already in place with the same bytes (not fetched again).
    pub skipped: u64,
    pub bytes: u64,
}

fn same_content(path: &Path, f: &LegacyFile) -> bool {
    let Ok(md) = fs::symlink_metadata(path) else {
        return false;
    };
    if !md.is_file() || md.len() != f.size {
        return false;
    }
    let Ok(mut file) = fs::File::open(path) else {
        return false;
    };
    let mut ck = Cksum::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => ck.update(&buf[..n]),
            Err(_) => return false,
        }
    }
    ck.finalize() == f.cksum
}

/// Downloads `files` into `target` (created if needed). Each is written to a temp file,
/// checked, synced and renamed into place, with the time v3 stored it as its mtime. A
/// file already there with the same bytes is kept (a restore run again resumes); any
/// other existing file is refused before anything is written, unless `overwrite`.
pub fn restore(
    conn: &Connection,
    files: &[LegacyFile],
    target: &Path,
    overwrite: bool,
    progress: &RestoreProgress,
) -> Result<LegacyRestoreSummary, LegacyError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| LegacyError::Io { path, source }
    };
    if fs::metadata(target).is_ok_and(|m| !m.is_dir()) {
        return Err(LegacyError::Io {
            path: target.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "the target exists and is not a directory",
            ),
        });
    }
    fs::create_dir_all(target).map_err(io(target))?;
    let mut todo = Vec::new();
    let mut summary = LegacyRestoreSummary::default();
    for f in files {
        let dest = target.join(&f.name);
        if fs::symlink_metadata(&dest).is_ok() {
            if same_content(&dest, f) {
                summary.skipped += 1;
                continue;
            }
            if !overwrite {
                return Err(LegacyError::Exists(dest));
            }
        }
        progress.files_total.fetch_add(1, Ordering::Relaxed);
        progress.bytes_total.fetch_add(f.size, Ordering::Relaxed);
        todo.push((f, dest));
    }
    for (f, dest) in todo {
        if progress.cancel.load(Ordering::Relaxed) {
            break;
        }
        let tmp = super::restore::tmp_name(&dest);
        let r = (|| -> std::io::Result<()> {
            let mut out = fs::File::create(&tmp)?;
            let mut reader = LegacyReader::new(conn, f.clone());
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
                progress.bytes_done.fetch_add(n as u64, Ordering::Relaxed);
            }
            out.sync_all()?;
            drop(out);
            let ms = f.stored_ms as i64;
            super::restore::set_mtime(&tmp, ms.saturating_mul(1_000_000), true)?;
            fs::rename(&tmp, &dest)
        })();
        if let Err(source) = r {
            let _ = fs::remove_file(&tmp);
            return Err(LegacyError::Io { path: dest, source });
        }
        summary.files += 1;
        summary.bytes += f.size;
        progress.files_done.fetch_add(1, Ordering::Relaxed);
    }
    if let Ok(d) = fs::File::open(target) {
        let _ = d.sync_all();
    }
    Ok(summary)
}

/// Makes `files` one v4 snapshot (tagged `legacy-import`, with `named` as its path),
/// each file at its v3 name, with the time v3 stored it as its mtime. The chunks are
/// encrypted and deduplicated like any backup; the v3 store is not changed.
pub fn import(
    conn: &Connection,
    key: &RepoKey,
    account: &LegacyAccount,
    files: &[LegacyFile],
    opts: &BackupOptions,
    progress: &BackupProgress,
) -> Result<BackupSummary, BackupError> {
    let streams = files
        .iter()
        .map(|f| {
            progress.bytes_total.fetch_add(f.size, Ordering::Relaxed);
            backup::NamedStream {
                path: f.name.clone(),
                mtime_ns: (f.stored_ms as i64).saturating_mul(1_000_000),
                mode: 0o644,
                reader: Box::new(LegacyReader::new(conn, f.clone())),
            }
        })
        .collect();
    let mut o = opts.clone();
    if !o.tags.iter().any(|t| t == "legacy-import") {
        o.tags.push("legacy-import".into());
    }
    let named = vec![format!("(v3) {}", account.name).into_bytes()];
    backup::backup_streams(conn, key, streams, named, &o, progress)
}
