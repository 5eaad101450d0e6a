//! Packs: several small chunks of one account in one blob (`docs/PACKS.md`).
//!
//! On an object store every object costs a request to write, list, read and delete,
//! whatever its size; a tree of small files would be one object per chunk. The
//! committer therefore writes a round's chunks smaller than the repository's
//! `pack_below` as packs of up to [`MAX_PACK_BYTES`]: the chunks' stored bytes one after
//! another, then a trailer that lists them:
//!
//! ```text
//! chunk bytes ... | entries (id 32 B, offset u64 LE, length u64 LE) ... |
//!     entry count u32 LE | "CBPK" | version u8 (1)
//! ```
//!
//! The registry is the index (a chunk row names its pack and offset); the trailer makes
//! a pack self-describing, so that scrub can check a pack holds what the rows say, and
//! a lost registry could be rebuilt from the blobs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::blob::BlobKey;
use super::{ChunkId, RepoError};

/// A pack's id: 16 random bytes.
pub type PackId = [u8; 16];

/// The largest pack the committer writes (its chunks' bytes; the trailer adds 48 bytes
/// a chunk). A chunk is at most 4 MiB + 64 bytes, and only chunks under `pack_below`
/// are packed, so a pack never grows far past this.
pub const MAX_PACK_BYTES: usize = 16 << 20;

/// The trailer's magic, before its version byte.
pub const MAGIC: &[u8; 4] = b"CBPK";
/// The trailer's version.
pub const VERSION: u8 = 1;

/// Bytes of one trailer entry.
const ENTRY: usize = 32 + 8 + 8;
/// Bytes after the entries: count, magic, version.
const TAIL: usize = 4 + 4 + 1;
/// Bytes of one trailer entry, as a count of a pack's length.
pub const ENTRY_BYTES: u64 = ENTRY as u64;
/// Bytes of the trailer after its entries, as a count of a pack's length.
pub const TAIL_BYTES: u64 = TAIL as u64;

/// One chunk in a pack, as the trailer lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub id: ChunkId,
    pub offset: u64,
    pub len: u64,
}

/// A pack being built: chunks appended, then [`finish`](Self::finish)ed.
#[derive(Debug, Default)]
pub struct PackBuilder {
    bytes: Vec<u8>,
    entries: Vec<Entry>,
}

impl PackBuilder {
    pub fn new() -> PackBuilder {
        PackBuilder::default()
    }

    /// Bytes of the chunks so far.
    pub fn data_len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a chunk's stored bytes; returns its offset.
    pub fn push(&mut self, id: ChunkId, data: &[u8]) -> u64 {
        let offset = self.bytes.len() as u64;
        self.bytes.extend_from_slice(data);
        self.entries.push(Entry {
            id,
            offset,
            len: data.len() as u64,
        });
        offset
    }

    /// The pack's bytes: the chunks, then the trailer.
    pub fn finish(self) -> Vec<u8> {
        let mut b = self.bytes;
        b.reserve(self.entries.len() * ENTRY + TAIL);
        for e in &self.entries {
            b.extend_from_slice(&e.id);
            b.extend_from_slice(&e.offset.to_le_bytes());
            b.extend_from_slice(&e.len.to_le_bytes());
        }
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b
    }
}

/// The entries of a whole pack's bytes, checked: the trailer is this format, and every
/// entry lies within the chunk bytes. A pack that is not is [`RepoError::Corrupt`].
pub fn entries(pack: &[u8]) -> Result<Vec<Entry>, RepoError> {
    let bad = |why: &str| RepoError::Corrupt(format!("a pack's trailer: {why}"));
    if pack.len() < TAIL {
        return Err(bad("shorter than its trailer"));
    }
    let (rest, tail) = pack.split_at(pack.len() - TAIL);
    if &tail[4..8] != MAGIC {
        return Err(bad("no CBPK magic"));
    }
    if tail[8] != VERSION {
        return Err(bad(&format!("version {} (this server reads 1)", tail[8])));
    }
    let count = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as usize;
    let table = count
        .checked_mul(ENTRY)
        .filter(|&t| t <= rest.len())
        .ok_or_else(|| bad(&format!("{count} entries do not fit")))?;
    let (data, table) = rest.split_at(rest.len() - table);
    let data_len = data.len() as u64;
    table
        .chunks_exact(ENTRY)
        .map(|e| {
            let id: ChunkId = e[..32].try_into().expect("32 bytes");
            let offset = u64::from_le_bytes(e[32..40].try_into().expect("8 bytes"));
            let len = u64::from_le_bytes(e[40..48].try_into().expect("8 bytes"));
            if offset.checked_add(len).is_none_or(|end| end > data_len) {
                return Err(bad("an entry past the chunk bytes"));
            }
            Ok(Entry { id, offset, len })
        })
        .collect()
}

/// Bytes of whole packs a node keeps for reads ([`PackCache`]).
pub const PACK_CACHE_BYTES: usize = 256 << 20;

/// Whole packs recently read, least recently used out first, up to a byte budget.
///
/// A restore asks for a snapshot's chunks in the order the backup stored them, so the
/// chunks of one pack come one after another; on an object store a range read of each
/// would be a request per chunk. The first read of a pack here says no (the caller
/// reads its one range: a single file's restore reads only what it needs); from the
/// second, the pack is read whole, once, and kept. Readers of a pack being loaded wait
/// for that one load. A pack's bytes never change once written (a repack writes a new
/// pack, and ids are random), so nothing kept is ever stale.
pub struct PackCache {
    inner: Mutex<CacheInner>,
    budget: usize,
}

struct CacheInner {
    map: HashMap<BlobKey, Slot>,
    tick: u64,
    bytes: usize,
}

struct Slot {
    used: u64,
    len: usize,
    /// `None` until the second read loads it; the lock is held during the load.
    bytes: Arc<Mutex<Option<Arc<Vec<u8>>>>>,
}

/// Packs only asked about once are forgotten beyond this many.
const MAX_SLOTS: usize = 4096;

impl PackCache {
    pub fn new(budget: usize) -> PackCache {
        PackCache {
            inner: Mutex::new(CacheInner {
                map: HashMap::new(),
                tick: 0,
                bytes: 0,
            }),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The whole pack of `key` if this is not the first read of it (`load` reads it
    /// from the store, once); `None` for a first read, or a pack the store does not
    /// have. An error of `load` is returned and nothing kept.
    pub fn get(
        &self,
        key: BlobKey,
        load: impl FnOnce() -> Result<Option<Vec<u8>>, RepoError>,
    ) -> Result<Option<Arc<Vec<u8>>>, RepoError> {
        if self.budget == 0 {
            return Ok(None);
        }
        let slot = {
            let mut g = self.lock();
            g.tick += 1;
            let tick = g.tick;
            match g.map.get_mut(&key) {
                Some(s) => {
                    s.used = tick;
                    s.bytes.clone()
                }
                None => {
                    if g.map.len() >= MAX_SLOTS {
                        evict(&mut g, self.budget, true);
                    }
                    g.map.insert(
                        key,
                        Slot {
                            used: tick,
                            len: 0,
                            bytes: Arc::new(Mutex::new(None)),
                        },
                    );
                    return Ok(None);
                }
            }
        };
        let mut held = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = &*held {
            return Ok(Some(b.clone()));
        }
        let Some(bytes) = load()? else {
            return Ok(None);
        };
        let bytes = Arc::new(bytes);
        if bytes.len() > self.budget / 4 {
            return Ok(Some(bytes)); // too large to keep
        }
        *held = Some(bytes.clone());
        drop(held);
        let mut g = self.lock();
        // Counted only in the slot loaded: it may have been dropped while loading, and
        // another made for the same pack since.
        if let Some(s) = g.map.get_mut(&key).filter(|s| Arc::ptr_eq(&s.bytes, &slot)) {
            let grown = bytes
                .len()
                .saturating_sub(std::mem::replace(&mut s.len, bytes.len()));
            g.bytes += grown;
        }
        evict(&mut g, self.budget, false);
        Ok(Some(bytes))
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// Drops the least recently used loaded packs until the budget holds (and, with
/// `slots`, the least recently used half of the packs asked about once).
fn evict(g: &mut CacheInner, budget: usize, slots: bool) {
    if slots {
        let mut ticks: Vec<u64> = g
            .map
            .values()
            .filter(|s| s.len == 0)
            .map(|s| s.used)
            .collect();
        ticks.sort_unstable();
        if let Some(&cut) = ticks.get(ticks.len() / 2) {
            g.map.retain(|_, s| s.len > 0 || s.used > cut);
        }
    }
    while g.bytes > budget {
        let Some((&key, _)) = g
            .map
            .iter()
            .filter(|(_, s)| s.len > 0)
            .min_by_key(|(_, s)| s.used)
        else {
            break;
        };
        if let Some(s) = g.map.remove(&key) {
            g.bytes -= s.len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_loads_a_pack_on_its_second_read_and_keeps_to_its_budget() {
        let c = PackCache::new(100);
        let key = |n: u8| BlobKey::Pack(1, [n; 16]);
        let loads = std::cell::Cell::new(0);
        let load = |len: usize| {
            loads.set(loads.get() + 1);
            Ok(Some(vec![7u8; len]))
        };
        assert!(c.get(key(1), || load(20)).unwrap().is_none(), "first read");
        assert_eq!(loads.get(), 0);
        assert_eq!(c.get(key(1), || load(20)).unwrap().unwrap().len(), 20);
        assert_eq!(c.get(key(1), || load(20)).unwrap().unwrap().len(), 20);
        assert_eq!(loads.get(), 1, "loaded once");
        assert_eq!(c.bytes(), 20);
        // Another account's pack of the same id is another pack.
        assert!(c
            .get(BlobKey::Pack(2, [1; 16]), || load(20))
            .unwrap()
            .is_none());
        // A failed load keeps nothing and is tried again.
        let failed = c.get(key(2), || load(20));
        assert!(failed.unwrap().is_none());
        assert!(c
            .get(key(2), || Err(RepoError::ObjectStore("down".into())))
            .is_err());
        assert_eq!(c.get(key(2), || load(20)).unwrap().unwrap().len(), 20);
        // Past the budget the least recently used goes: 1 was used after 2 was loaded.
        c.get(key(1), || load(20)).unwrap();
        for n in 3..=5 {
            c.get(key(n), || load(20)).unwrap();
            c.get(key(n), || load(20)).unwrap();
        }
        assert_eq!(c.bytes(), 100);
        c.get(key(6), || load(20)).unwrap();
        c.get(key(6), || load(20)).unwrap();
        assert_eq!(c.bytes(), 100);
        let before = loads.get();
        c.get(key(1), || load(20)).unwrap();
        assert_eq!(loads.get(), before, "1 was kept");
        assert!(
            c.get(key(2), || load(20)).unwrap().is_none(),
            "2 was the least recently used: gone, and read by its range again"
        );
        assert_eq!(loads.get(), before);
        // A pack larger than a quarter of the budget is handed back, not kept.
        c.get(key(9), || load(60)).unwrap();
        assert_eq!(c.get(key(9), || load(60)).unwrap().unwrap().len(), 60);
        assert_eq!(c.bytes(), 100);
        assert!(PackCache::new(0).get(key(1), || load(1)).unwrap().is_none());
    }

    #[test]
    fn a_pack_lists_its_chunks_and_a_damaged_trailer_is_refused() {
        let mut b = PackBuilder::new();
        assert_eq!(b.push([1; 32], b"first"), 0);
        assert_eq!(b.push([2; 32], b""), 5);
        assert_eq!(b.push([3; 32], b"third!"), 5);
        assert_eq!(b.data_len(), 11);
        let pack = b.finish();
        assert_eq!(pack.len(), 11 + 3 * ENTRY + TAIL);
        let e = entries(&pack).unwrap();
        assert_eq!(
            e,
            vec![
                Entry {
                    id: [1; 32],
                    offset: 0,
                    len: 5
                },
                Entry {
                    id: [2; 32],
                    offset: 5,
                    len: 0
                },
                Entry {
                    id: [3; 32],
                    offset: 5,
                    len: 6
                },
            ]
        );
        assert_eq!(&pack[5..11], b"third!");
        assert_eq!(entries(&PackBuilder::new().finish()).unwrap(), vec![]);

        // Every way a trailer can be wrong is an error, never a panic.
        for n in 0..pack.len() {
            let _ = entries(&pack[..n]);
        }
        let mut bad = pack.clone();
        *bad.last_mut().unwrap() = 2;
        assert!(matches!(entries(&bad), Err(RepoError::Corrupt(m)) if m.contains("version 2")));
        let mut bad = pack.clone();
        let n = bad.len();
        bad[n - 5] = b'X';
        assert!(entries(&bad).is_err());
        let mut bad = pack.clone();
        bad[n - TAIL..n - TAIL + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(entries(&bad).is_err());
        // An entry whose length runs past the chunk bytes.
        let mut bad = pack.clone();
        let last = n - TAIL - ENTRY;
        bad[last + 40..last + 48].copy_from_slice(&7u64.to_le_bytes());
        assert!(entries(&bad).unwrap_err().to_string().contains("past"));
        let mut bad = pack;
        bad[last + 32..last + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(entries(&bad).is_err());
    }
}
