//! Listing snapshots, finding one by id prefix, and loading its tree (the root and the
//! manifest it points to), verified chunk by chunk.

use cyberbackup_protocol::v4::format::{Entry, FormatError, RepoKey, Root};
use cyberbackup_protocol::v4::wire::{Answer, ChunkId, Request, SnapshotId, SnapshotInfo};

use super::conn::{ConnError, Connection, Pending};
use super::profile::hex;

/// Errors about snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("no snapshot matches {0:?}")]
    NotFound(String),
    #[error("{0:?} matches more than one snapshot: give more of the id")]
    Ambiguous(String),
    #[error("snapshot {id}: {source}")]
    Format {
        id: String,
        #[source]
        source: FormatError,
    },
    #[error("snapshot {0}: the manifest is not as long as its root says")]
    ManifestLength(String),
}

/// Every snapshot of the account, oldest first.
pub fn list(conn: &Connection) -> Result<Vec<SnapshotInfo>, SnapshotError> {
    match conn.call(&Request::ListSnapshots)? {
        Answer::SnapshotList(mut l) => {
            l.sort_by_key(|s| (s.header.time_ms, s.header.id));
            Ok(l)
        }
        _ => Err(ConnError::UnexpectedAnswer("LIST_SNAPSHOTS").into()),
    }
}

/// The snapshot named by `spec`: "latest", or a prefix of its hex id (refused as
/// ambiguous when it names more than one).
pub fn find(conn: &Connection, spec: &str) -> Result<SnapshotInfo, SnapshotError> {
    let all = list(conn)?;
    if spec == "latest" {
        return all
            .into_iter()
            .last()
            .ok_or_else(|| SnapshotError::NotFound(spec.into()));
    }
    let spec_l = spec.to_ascii_lowercase();
    let mut hits: Vec<SnapshotInfo> = all
        .into_iter()
        .filter(|s| !spec_l.is_empty() && hex(&s.header.id).starts_with(&spec_l))
        .collect();
    match hits.len() {
        0 => Err(SnapshotError::NotFound(spec.into())),
        1 => Ok(hits.remove(0)),
        _ => Err(SnapshotError::Ambiguous(spec.into())),
    }
}

/// A snapshot's decrypted root and manifest.
#[derive(Debug, Clone)]
pub struct Tree {
    pub info: SnapshotInfo,
    pub root: Root,
    pub entries: Vec<Entry>,
}

/// Loads a snapshot's tree.
pub fn load(conn: &Connection, key: &RepoKey, id: &SnapshotId) -> Result<Tree, SnapshotError> {
    let idh = hex(id);
    let fmt = |source| SnapshotError::Format {
        id: idh.clone(),
        source,
    };
    let (info, sealed) = match conn.call(&Request::GetSnapshot(*id))? {
        Answer::Snapshot { info, root } => (info, root),
        _ => return Err(ConnError::UnexpectedAnswer("GET_SNAPSHOT").into()),
    };
    let root = key.open_root(id, &sealed).map_err(fmt)?;
    let mut manifest = Vec::with_capacity(root.manifest_len.min(1 << 30) as usize);
    for (cid, blob) in fetch_chunks(conn, &root.manifest_chunks)? {
        manifest.extend(key.open_chunk(&cid, blob).map_err(fmt)?);
    }
    if manifest.len() as u64 != root.manifest_len {
        return Err(SnapshotError::ManifestLength(idh));
    }
    let entries = Entry::decode_all(&manifest).map_err(fmt)?;
    Ok(Tree {
        info,
        root,
        entries,
    })
}

/// Fetches chunks in order, with up to 16 requests in flight.
pub fn fetch_chunks(
    conn: &Connection,
    ids: &[ChunkId],
) -> Result<Vec<(ChunkId, Vec<u8>)>, ConnError> {
    let mut out = Vec::with_capacity(ids.len());
    let mut pending: std::collections::VecDeque<(ChunkId, Pending)> = Default::default();
    let mut next = 0;
    while out.len() < ids.len() {
        while next < ids.len() && pending.len() < 16 {
            pending.push_back((ids[next], conn.submit(&Request::GetChunk(ids[next]))?));
            next += 1;
        }
        let Some((id, p)) = pending.pop_front() else {
            break;
        };
        match p.wait()? {
            Answer::Chunk(b) => out.push((id, b)),
            _ => return Err(ConnError::UnexpectedAnswer("GET_CHUNK")),
        }
    }
    Ok(out)
}

/// The newest snapshot of `host` made of the same `paths`, with its entries.
pub fn find_parent(
    conn: &Connection,
    key: &RepoKey,
    host: &str,
    paths: &[Vec<u8>],
) -> Result<Option<(SnapshotId, Vec<Entry>)>, SnapshotError> {
    let mut all = list(conn)?;
    all.retain(|s| s.header.host == host);
    for s in all.iter().rev() {
        let sealed = match conn.call(&Request::GetSnapshot(s.header.id))? {
            Answer::Snapshot { root, .. } => root,
            _ => return Err(ConnError::UnexpectedAnswer("GET_SNAPSHOT").into()),
        };
        let Ok(root) = key.open_root(&s.header.id, &sealed) else {
            continue;
        };
        if root.paths == paths {
            let t = load(conn, key, &s.header.id)?;
            return Ok(Some((s.header.id, t.entries)));
        }
    }
    Ok(None)
}
