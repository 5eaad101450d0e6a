//! Looking into snapshots without restoring them: `diff` (what changed between two),
//! `find` (which snapshots hold a path matching a pattern) and `check` (every
//! snapshot's root and manifest open, every chunk they name is on the server, and
//! optionally every chunk, or a share of them, downloads and verifies).

use std::collections::{BTreeMap, HashMap, HashSet};

use cyberbackup_protocol::v4::format::{Entry, EntryKind, RepoKey};
use cyberbackup_protocol::v4::wire::{Answer, ChunkId, Request, SnapshotInfo, MAX_HAS_CHUNKS};

use super::conn::{ConnError, Connection};
use super::profile::hex;
use super::snapshots::{self, SnapshotError, Tree};

/// How an entry differs between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Only in the second.
    Added,
    /// Only in the first.
    Removed,
    /// Content (a file's chunks, a link's target) or type differs.
    Modified,
    /// Only the mode or modification time differs.
    Metadata,
}

impl ChangeKind {
    /// restic's one-letter marks: `+`, `-`, `M`, `U`.
    pub fn mark(self) -> char {
        match self {
            ChangeKind::Added => '+',
            ChangeKind::Removed => '-',
            ChangeKind::Modified => 'M',
            ChangeKind::Metadata => 'U',
        }
    }
}

/// One difference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub kind: ChangeKind,
    /// Size in the first snapshot (0 if absent or not a file).
    pub before: u64,
    /// Size in the second.
    pub after: u64,
}

fn content_eq(a: &Entry, b: &Entry) -> bool {
    match (&a.kind, &b.kind) {
        (EntryKind::File { chunks: x }, EntryKind::File { chunks: y }) => {
            x == y && a.size == b.size
        }
        (EntryKind::Dir, EntryKind::Dir) => true,
        (EntryKind::Symlink { target: x }, EntryKind::Symlink { target: y }) => x == y,
        _ => false,
    }
}

/// The differences from `a` to `b`, in path order.
pub fn diff(a: &Tree, b: &Tree) -> Vec<Change> {
    let am: BTreeMap<&[u8], &Entry> = a.entries.iter().map(|e| (&e.path[..], e)).collect();
    let bm: BTreeMap<&[u8], &Entry> = b.entries.iter().map(|e| (&e.path[..], e)).collect();
    let mut keys: Vec<&[u8]> = am.keys().chain(bm.keys()).copied().collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        let path = String::from_utf8_lossy(k).into_owned();
        match (am.get(k), bm.get(k)) {
            (Some(x), None) => out.push(Change {
                path,
                kind: ChangeKind::Removed,
                before: x.size,
                after: 0,
            }),
            (None, Some(y)) => out.push(Change {
                path,
                kind: ChangeKind::Added,
                before: 0,
                after: y.size,
            }),
            (Some(x), Some(y)) => {
                let kind = if !content_eq(x, y) {
                    ChangeKind::Modified
                } else if x.mode != y.mode || x.mtime_ns != y.mtime_ns {
                    ChangeKind::Metadata
                } else {
                    continue;
                };
                out.push(Change {
                    path,
                    kind,
                    before: x.size,
                    after: y.size,
                });
            }
            (None, None) => {}
        }
    }
    out
}

/// Whether `name` matches a glob of `*` (any run of characters but `/`), `**` (any
/// run, `/` included) and `?` (one character but `/`).
pub fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') if p.get(1) == Some(&'*') => (0..=n.len()).any(|i| go(&p[2..], &n[i..])),
            Some('*') => {
                let mut i = 0;
                loop {
                    if go(&p[1..], &n[i..]) {
                        return true;
                    }
                    if i == n.len() || n[i] == '/' {
                        return false;
                    }
                    i += 1;
                }
            }
            Some('?') => !n.is_empty() && n[0] != '/' && go(&p[1..], &n[1..]),
            Some(c) => n.first() == Some(c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// A match of `find`.
#[derive(Debug, Clone)]
pub struct Found {
    pub snapshot: SnapshotInfo,
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub kind: &'static str,
}

/// The entries of every snapshot whose path (if the pattern holds a `/`) or name
/// matches `pattern`, oldest snapshot first.
pub fn find(conn: &Connection, key: &RepoKey, pattern: &str) -> Result<Vec<Found>, SnapshotError> {
    let mut out = Vec::new();
    let whole = pattern.contains('/');
    for s in snapshots::list(conn)? {
        let t = snapshots::load(conn, key, &s.header.id)?;
        for e in &t.entries {
            let path = String::from_utf8_lossy(&e.path).into_owned();
            let subject = if whole {
                path.as_str()
            } else {
                path.rsplit('/').next().unwrap_or(&path)
            };
            if glob(pattern, subject) {
                out.push(Found {
                    snapshot: s.clone(),
                    path: path.clone(),
                    size: e.size,
                    mtime_ns: e.mtime_ns,
                    kind: match e.kind {
                        EntryKind::File { .. } => "file",
                        EntryKind::Dir => "dir",
                        EntryKind::Symlink { .. } => "symlink",
                    },
                });
            }
        }
    }
    Ok(out)
}

/// What `check` found.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub snapshots: u64,
    pub chunks: u64,
    /// Chunks downloaded and verified (`--read-data`).
    pub chunks_read: u64,
    pub bytes_read: u64,
    /// Problems, one line each ("snapshot 3fa9c2e1: ...", "chunk ab12...: ...").
    pub errors: Vec<String>,
}

/// Checks every snapshot: its root and manifest open, every chunk it names is on the
/// server; with `read_percent`, that share of the chunks (chosen by id, so the same
/// share always covers the same chunks) is downloaded and verified against its id.
pub fn check(
    conn: &Connection,
    key: &RepoKey,
    read_percent: Option<u8>,
) -> Result<CheckReport, ConnError> {
    let mut r = CheckReport::default();
    // chunk -> (snapshot id, path) of one place that uses it, for the error message.
    let mut used: HashMap<ChunkId, (String, String)> = HashMap::new();
    let list = match snapshots::list(conn) {
        Ok(l) => l,
        Err(SnapshotError::Conn(e)) => return Err(e),
        Err(e) => {
            r.errors.push(e.to_string());
            return Ok(r);
        }
    };
    for s in &list {
        r.snapshots += 1;
        let sid = hex(&s.header.id)[..8].to_string();
        match snapshots::load(conn, key, &s.header.id) {
            Ok(t) => {
                for c in &t.root.manifest_chunks {
                    used.entry(*c)
                        .or_insert_with(|| (sid.clone(), "(manifest)".into()));
                }
                for e in &t.entries {
                    if let EntryKind::File { chunks } = &e.kind {
                        for c in chunks {
                            used.entry(*c).or_insert_with(|| {
                                (sid.clone(), String::from_utf8_lossy(&e.path).into_owned())
                            });
                        }
                    }
                }
            }
            Err(SnapshotError::Conn(ConnError::Server(a))) => {
                r.errors.push(format!("snapshot {sid}: {a}"));
            }
            Err(SnapshotError::Conn(e)) => return Err(e),
            Err(e) => r.errors.push(format!("snapshot {sid}: {e}")),
        }
    }
    let ids: Vec<ChunkId> = {
        let mut v: Vec<ChunkId> = used.keys().copied().collect();
        v.sort_unstable();
        v
    };
    r.chunks = ids.len() as u64;
    let mut missing = HashSet::new();
    for part in ids.chunks(MAX_HAS_CHUNKS as usize) {
        match conn.call(&Request::HasChunks(part.to_vec()))? {
            Answer::ChunksHeld(h) if h.len() == part.len() => {
                for (id, held) in part.iter().zip(h) {
                    if !held {
                        missing.insert(*id);
                        let (s, p) = &used[id];
                        r.errors.push(format!(
                            "chunk {} is missing on the server (snapshot {s}, {p})",
                            &hex(id)[..16]
                        ));
                    }
                }
            }
            _ => return Err(ConnError::UnexpectedAnswer("HAS_CHUNKS")),
        }
    }
    if let Some(pct) = read_percent {
        let pct = pct.min(100) as u32;
        let chosen: Vec<ChunkId> = ids
            .iter()
            .filter(|id| !missing.contains(*id))
            .filter(|id| (u16::from_le_bytes([id[0], id[1]]) as u32) * 100 < pct * 65_536)
            .copied()
            .collect();
        for part in chosen.chunks(64) {
            for (id, res) in fetch_each(conn, part)? {
                let (s, p) = &used[&id];
                match res {
                    Ok(blob) => {
                        r.chunks_read += 1;
                        r.bytes_read += blob.len() as u64;
                        if let Err(e) = key.open_chunk(&id, blob) {
                            r.errors.push(format!(
                                "chunk {} does not verify: {e} (snapshot {s}, {p})",
                                &hex(&id)[..16]
                            ));
                        }
                    }
                    Err(e) => r.errors.push(format!(
                        "chunk {} cannot be read: {e} (snapshot {s}, {p})",
                        &hex(&id)[..16]
                    )),
                }
            }
        }
    }
    Ok(r)
}

/// A chunk's blob, or the server's answer when it has none.
type Fetched = (ChunkId, Result<Vec<u8>, String>);

/// Fetches chunks (pipelined), keeping per-chunk server errors.
fn fetch_each(conn: &Connection, ids: &[ChunkId]) -> Result<Vec<Fetched>, ConnError> {
    let pend: Vec<_> = ids
        .iter()
        .map(|id| conn.submit(&Request::GetChunk(*id)).map(|p| (*id, p)))
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(pend.len());
    for (id, p) in pend {
        match p.wait() {
            Ok(Answer::Chunk(b)) => out.push((id, Ok(b))),
            Ok(_) => return Err(ConnError::UnexpectedAnswer("GET_CHUNK")),
            Err(ConnError::Server(a)) => out.push((id, Err(a.to_string()))),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob("*.txt", "notes.txt"));
        assert!(!glob("*.txt", "a/notes.txt"));
        assert!(glob("**/notes.txt", "a/b/notes.txt"));
        assert!(glob("a/*/c", "a/b/c"));
        assert!(!glob("a/*/c", "a/b/x/c"));
        assert!(glob("a/**/c", "a/b/x/c"));
        assert!(glob("n?tes*", "notes.txt"));
        assert!(!glob("n?tes", "nootes"));
        assert!(glob("exact", "exact"));
        assert!(!glob("", "x"));
    }
}
