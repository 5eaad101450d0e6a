//! Garbage collection and scrub, run by an operator or a schedule (or a device with
//! the forget capability, for collection).
//!
//! **Collection** ([`Repo::collect_garbage`]) deletes, per account, the chunks no
//! snapshot names that nobody touched within the grace period. What to delete is read
//! first without holding anything up; then [`GC_BATCH`] chunks at a time, their rows
//! in one registry transaction that checks both conditions again, then their blobs,
//! while holding the repository's lock exclusively (the argument for why no chunk a
//! backup may still commit is ever deleted is in the [module documentation](super)).
//! Backups wait for one batch at most, not for a whole account's delete. It then
//! removes orphan blobs: chunk blobs without a row (a crash between a blob's write and
//! its row, or a delete that did not survive a crash) and snapshot bodies without a
//! snapshot (a crash between the body and the row, a failed forget). Orphans are listed
//! without the lock and checked again under it, so a put that finished in between
//! keeps its blob.
//!
//! **Scrub** ([`Repo::scrub`]) reads every chunk back and compares its BLAKE3 with the
//! hash recorded at ingest; a missing or damaged chunk is reported and marked damaged,
//! so the registry answers "not held" for it and the next backup that has it sends it
//! again (which makes it sound). Snapshot bodies are checked against their hash too;
//! a damaged body cannot be repaired by the server, only reported.

use std::collections::HashSet;
use std::sync::PoisonError;
use std::time::Duration;

use super::blob::{BlobKey, BlobKind};
use super::pack::{PackBuilder, PackId, MAX_PACK_BYTES};
use super::registry::{ChunkMove, ChunkRecord, PackRecord, PackUsage};
use super::service::{new_pack_id, Repo};
use super::{AccountId, ChunkId, RepoError, SnapshotId};

/// Which accounts an operation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Account(AccountId),
    All,
}

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub accounts: u64,
    /// Unreferenced chunks deleted (rows and blobs).
    pub chunks_deleted: u64,
    /// Their stored bytes.
    pub bytes_freed: u64,
    /// Chunk blobs that had no row, removed.
    pub orphan_chunk_blobs: u64,
    /// Snapshot bodies that had no snapshot, removed.
    pub orphan_bodies: u64,
    /// Packs no chunk named any more, removed (those emptied by repacking too).
    pub packs_deleted: u64,
    /// Packs under half live, whose live chunks were written to a new pack.
    pub packs_repacked: u64,
    /// Pack blobs that had no record, removed.
    pub orphan_packs: u64,
}

/// What a scrub found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScrubReport {
    pub accounts: u64,
    /// Chunks read back (sound or not).
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Chunks whose bytes do not match their recorded hash (now marked damaged).
    pub damaged: Vec<(AccountId, ChunkId)>,
    /// Chunks whose blob is gone (now marked damaged).
    pub missing: Vec<(AccountId, ChunkId)>,
    pub bodies_checked: u64,
    /// Snapshots whose body is missing or does not match its hash.
    pub damaged_bodies: Vec<(AccountId, SnapshotId)>,
}

/// The id just before `id` in byte order (`None` for the first), to page to one id.
fn predecessor(id: &ChunkId) -> Option<ChunkId> {
    let mut p = *id;
    for b in p.iter_mut().rev() {
        if *b > 0 {
            *b -= 1;
            return Some(p);
        }
        *b = 0xff;
    }
    None
}

/// Packs with less than this share (in percent) of their bytes live are repacked.
pub const REPACK_BELOW_PERCENT: u64 = 50;

/// The most bytes of old packs one repack reads (its new pack holds at most
/// [`MAX_PACK_BYTES`] of live chunks).
const REPACK_READ_BYTES: u64 = 64 << 20;

/// The bytes of the packed chunk `rec` in its whole pack `bytes`, if the pack is long
/// enough.
fn slice_of<'a>(bytes: &'a [u8], rec: &ChunkRecord) -> Option<&'a [u8]> {
    let (_, start, len) = rec.pack_range(0, u64::MAX)?;
    super::service::slice(bytes, start, len)
}

/// Chunk records read per registry call during a scrub or a sweep.
const PAGE: usize = 1000;

/// Chunks a collection deletes per hold of the repository's lock: commit rounds (on
/// this node, and with a shared registry on every node) go on between batches, rather
/// than wait for a whole account's delete.
pub const GC_BATCH: usize = 500;

/// How far a running collection or scrub has come (`cyberbackup-server status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// "gc" or "scrub".
    pub kind: &'static str,
    pub started_ms: i64,
    pub accounts_done: u64,
    pub accounts_total: u64,
    /// Scrub: chunks and bytes read back so far.
    pub chunks_checked: u64,
    pub bytes_checked: u64,
    /// Collection: chunks deleted so far.
    pub chunks_deleted: u64,
}

/// The running collections and scrubs, newest last.
#[derive(Debug, Default)]
pub(crate) struct Maintenance {
    running: std::sync::Mutex<Vec<(u64, Progress)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Maintenance {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Progress)>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One task's entry in [`Maintenance`]; removed when dropped.
struct Tracked<'a> {
    m: &'a Maintenance,
    id: u64,
}

impl Tracked<'_> {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        if let Some((_, p)) = self.m.lock().iter_mut().find(|(i, _)| *i == self.id) {
            f(p);
        }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        self.m.lock().retain(|(i, _)| *i != self.id);
    }
}

impl Repo {
    /// The collections and scrubs running now, oldest first.
    pub fn maintenance(&self) -> Vec<Progress> {
        self.shared
            .maintenance
            .lock()
            .iter()
            .map(|(_, p)| p.clone())
            .collect()
    }

    fn track(&self, kind: &'static str, accounts_total: u64) -> Tracked<'_> {
        let m = &self.shared.maintenance;
        let id = m.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m.lock().push((
            id,
            Progress {
                kind,
                started_ms: self.shared.now(),
                accounts_done: 0,
                accounts_total,
                chunks_checked: 0,
                bytes_checked: 0,
                chunks_deleted: 0,
            },
        ));
        Tracked { m, id }
    }

    fn accounts_in(&self, scope: Scope) -> Result<Vec<AccountId>, RepoError> {
        match scope {
            Scope::Account(a) => {
                self.shared.registry()?.usage(a)?; // NoSuchAccount
                Ok(vec![a])
            }
            Scope::All => self.shared.registry()?.accounts(),
        }
    }

    /// Deletes the chunks of the accounts in `scope` that no snapshot names and that
    /// were not touched (asked about and held, or put) in the `grace` before
    /// `now_ms`, then the orphan blobs.
    pub fn collect_garbage(
        &self,
        scope: Scope,
        grace: Duration,
        now_ms: i64,
    ) -> Result<GcReport, RepoError> {
        let cutoff = now_ms.saturating_sub(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
        let mut report = GcReport::default();
        let accounts = self.accounts_in(scope)?;
        let tracked = self.track("gc", accounts.len() as u64);
        for account in accounts {
            self.collect_account(account, cutoff, &mut report)?;
            report.accounts += 1;
            tracked.update(|p| {
                p.accounts_done = report.accounts;
                p.chunks_deleted = report.chunks_deleted;
            });
        }
        tracing::info!(?report, "garbage collection done");
        let m = crate::metrics::metrics();
        m.maintenance_done("gc");
        m.gc_freed_bytes.inc_by(report.bytes_freed);
        Ok(report)
    }

    fn collect_account(
        &self,
        account: AccountId,
        cutoff: i64,
        report: &mut GcReport,
    ) -> Result<(), RepoError> {
        let store = &self.shared.store;
        // Orphan candidates, listed without holding up ingest.
        let chunk_blobs = store.list(account, BlobKind::Chunk)?;
        let recorded = self.recorded_chunks(account)?;
        let chunk_candidates: Vec<ChunkId> = chunk_blobs
            .iter()
            .filter_map(|id| <ChunkId>::try_from(&id[..]).ok())
            .filter(|id| !recorded.contains(id))
            .collect();
        let snapshots: HashSet<SnapshotId> = self
            .shared
            .registry()?
            .list_snapshots(account)?
            .into_iter()
            .map(|h| h.id)
            .collect();
        let body_candidates: Vec<SnapshotId> = store
            .list(account, BlobKind::SnapshotBody)?
            .iter()
            .filter_map(|id| <SnapshotId>::try_from(&id[..]).ok())
            .filter(|id| !snapshots.contains(id))
            .collect();

        // What to delete, read without holding up ingest, then deleted a batch at a
        // time under the lock, each batch checked again as it is deleted: commit
        // rounds (on every node sharing the registry) go on between batches.
        let found = self
            .shared
            .registry()?
            .unreferenced_chunks(account, cutoff)?;
        for batch in found.chunks.chunks(GC_BATCH) {
            let ids: Vec<ChunkId> = batch.iter().map(|r| r.id).collect();
            // This node's rounds and, with a shared registry, every node's are kept out:
            // a round could otherwise write a blob collection is about to delete.
            let mut all = self.shared.exclusive()?;
            // Rows first: a crash before the blobs are gone leaves orphans, not rows
            // without blobs.
            let doomed = all.registry()?.delete_unreferenced_chunks(
                account,
                &ids,
                cutoff,
                &found.snapshots,
            )?;
            // A packed chunk's bytes go with its pack, once no row names it (below).
            let keys: Vec<BlobKey> = doomed
                .iter()
                .filter(|r| r.pack.is_none())
                .map(|r| BlobKey::Chunk(account, r.id))
                .collect();
            for part in keys.chunks(64) {
                // A shared registry refuses every call once the connection holding
                // the lock is lost: stop deleting then, before another node's round
                // (no longer kept out) writes a blob this would delete.
                all.registry()?.ping()?;
                store.delete_batch(part)?;
                self.still_locked(&mut all, account, part)?;
            }
            report.chunks_deleted += doomed.len() as u64;
            report.bytes_freed += doomed.iter().map(|r| r.stored_len).sum::<u64>();
        }
        // Orphans: checked again under the lock (a round may be between a blob and
        // its row), a batch at a time.
        for part in chunk_candidates.chunks(GC_BATCH) {
            // This node's rounds and, with a shared registry, every node's are kept out:
            // a round could otherwise write a blob collection is about to delete.
            let mut all = self.shared.exclusive()?;
            for part in part.chunks(64) {
                let mut deleted = Vec::new();
                for id in part {
                    // A chunk whose row names a pack has no use for a blob of its own
                    // (one left from before it was put again, packed).
                    let as_blob = all
                        .registry()?
                        .chunk_record(account, id)?
                        .is_some_and(|r| r.pack.is_none());
                    let key = BlobKey::Chunk(account, *id);
                    if !as_blob && store.delete(&key)? {
                        report.orphan_chunk_blobs += 1;
                        deleted.push(key);
                    }
                }
                self.still_locked(&mut all, account, &deleted)?;
            }
        }
        for part in body_candidates.chunks(GC_BATCH) {
            // This node's rounds and, with a shared registry, every node's are kept out:
            // a round could otherwise write a blob collection is about to delete.
            let mut all = self.shared.exclusive()?;
            for id in part {
                // The lock's connection answers for the check; losing it is noticed
                // at the next check, one body later at most.
                let committed = all.registry()?.get_snapshot(account, id)?.is_some();
                if !committed && store.delete(&BlobKey::SnapshotBody(account, *id))? {
                    report.orphan_bodies += 1;
                }
            }
        }
        self.collect_packs(account, report)
    }

    /// Removes the account's orphan pack blobs and the packs no chunk names any more,
    /// and repacks those under
    /// half live: their live chunks are written to a new pack, the rows moved to it
    /// (each only if it still points where it was read), and the old packs removed.
    /// Each step under the repository's lock, a few packs at a time.
    fn collect_packs(&self, account: AccountId, report: &mut GcReport) -> Result<(), RepoError> {
        let store = &self.shared.store;
        let packs = self.shared.registry()?.packs(account)?;
        // Orphans: pack blobs without a record. A pack written since the reading above
        // is listed too, and kept by the check under the lock (a round holds its lock
        // from writing a pack to recording it).
        let recorded: HashSet<PackId> = packs.iter().map(|p| p.pack.id).collect();
        let candidates: Vec<PackId> = store
            .list(account, BlobKind::Pack)?
            .iter()
            .filter_map(|id| <PackId>::try_from(&id[..]).ok())
            .filter(|id| !recorded.contains(id))
            .collect();
        for part in candidates.chunks(GC_BATCH) {
            let mut all = self.shared.exclusive()?;
            let still = all.registry()?.packs_recorded(account, part)?;
            let orphans: Vec<BlobKey> = part
                .iter()
                .zip(still)
                .filter(|(_, recorded)| !recorded)
                .map(|(id, _)| BlobKey::Pack(account, *id))
                .collect();
            store.delete_batch(&orphans)?;
            report.orphan_packs += orphans.len() as u64;
        }
        let (empty, live): (Vec<PackUsage>, Vec<PackUsage>) =
            packs.into_iter().partition(|p| p.live_chunks == 0);
        let empty: Vec<PackId> = empty.iter().map(|p| p.pack.id).collect();
        for part in empty.chunks(GC_BATCH) {
            let mut all = self.shared.exclusive()?;
            self.delete_packs(&mut all, account, part, report)?;
        }
        // Repacking: the sparse packs (their live chunks with their trailer entries
        // under half the pack, so a pack of tiny chunks all live is not rewritten for
        // ever), in groups of up to a pack's worth of live bytes and 64 MiB read.
        let sparse = live.into_iter().filter(|p| {
            let live = p
                .live_bytes
                .saturating_add(p.live_chunks.saturating_mul(super::pack::ENTRY_BYTES))
                .saturating_add(super::pack::TAIL_BYTES);
            live.saturating_mul(100) < p.pack.stored_len.saturating_mul(REPACK_BELOW_PERCENT)
        });
        let mut group: Vec<PackId> = Vec::new();
        let (mut live_bytes, mut read_bytes) = (0u64, 0u64);
        for p in sparse {
            if !group.is_empty()
                && (live_bytes + p.live_bytes > MAX_PACK_BYTES as u64
                    || read_bytes + p.pack.stored_len > REPACK_READ_BYTES)
            {
                self.repack(account, &std::mem::take(&mut group), report)?;
                (live_bytes, read_bytes) = (0, 0);
            }
            group.push(p.pack.id);
            live_bytes += p.live_bytes;
            read_bytes += p.pack.stored_len;
        }
        if !group.is_empty() {
            self.repack(account, &group, report)?;
        }
        Ok(())
    }

    /// Deletes the records of those of `ids` no chunk names, then their blobs.
    fn delete_packs(
        &self,
        all: &mut super::service::CrossLock<'_>,
        account: AccountId,
        ids: &[PackId],
        report: &mut GcReport,
    ) -> Result<(), RepoError> {
        let gone = all.registry()?.delete_unnamed_packs(account, ids)?;
        let keys: Vec<BlobKey> = gone.iter().map(|id| BlobKey::Pack(account, *id)).collect();
        // No round ever points a row at a pack that exists, so a pack no row named at
        // the delete stays unnamed: no check after, as chunk blobs need.
        self.shared.store.delete_batch(&keys)?;
        report.packs_deleted += gone.len() as u64;
        Ok(())
    }

    /// Rewrites the live chunks of the packs `ids` into one new pack. The old packs are
    /// read and checked without the lock (every row move is checked against where it
    /// was read); the new pack is written, the rows moved and the old packs deleted
    /// under it, so the orphan sweep never takes the new pack before its rows.
    fn repack(
        &self,
        account: AccountId,
        ids: &[PackId],
        report: &mut GcReport,
    ) -> Result<(), RepoError> {
        let store = &self.shared.store;
        let mut builder = PackBuilder::new();
        let new_id = new_pack_id();
        let mut moves = Vec::new();
        for old in ids {
            let recs = self.shared.registry()?.chunks_in_pack(account, old)?;
            if recs.is_empty() {
                continue;
            }
            let Some(bytes) = store.get(&BlobKey::Pack(account, *old))? else {
                // Scrub reports and marks them; nothing to move.
                continue;
            };
            for rec in recs {
                let Some(loc) = rec.pack else { continue };
                let Some(data) = slice_of(&bytes, &rec) else {
                    continue;
                };
                // Damaged bytes are not copied: the row stays on the old pack, which
                // then stays too, until scrub marks it and a backup sends it again.
                if rec.damaged_ms.is_some() || *blake3::hash(data).as_bytes() != rec.hash {
                    continue;
                }
                let to_offset = builder.push(rec.id, data);
                moves.push(ChunkMove {
                    id: rec.id,
                    from: loc,
                    to_offset,
                });
            }
        }
        let mut all = self.shared.exclusive()?;
        if !moves.is_empty() {
            let bytes = builder.finish();
            let to = PackRecord {
                id: new_id,
                stored_len: bytes.len() as u64,
                created_ms: self.shared.now(),
            };
            // Durable before any row names it.
            store.put_batch(&[(BlobKey::Pack(account, new_id), &bytes)])?;
            all.registry()?.move_chunks(account, &to, &moves)?;
        }
        let before = report.packs_deleted;
        self.delete_packs(&mut all, account, ids, report)?;
        report.packs_repacked += report.packs_deleted - before;
        Ok(())
    }

    /// After blobs were deleted under the lock: `Ok` if its connection still answers.
    /// If it was lost meanwhile (PostgreSQL released the lock with it), a round on
    /// another node may have stored one of these chunks again, blob and row, before
    /// this deleted the blob: such a chunk, recorded now but without its blob, is
    /// marked damaged (so it is answered "not held", sent again by the next backup that
    /// has it, and reported by scrub), and the lost connection's error returned.
    fn still_locked(
        &self,
        all: &mut super::service::CrossLock<'_>,
        account: AccountId,
        deleted: &[BlobKey],
    ) -> Result<(), RepoError> {
        let lost = match all.registry().and_then(|mut r| r.ping()) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        tracing::error!(error = %lost, "the registry connection holding collection's lock was lost while it deleted blobs; checking them again");
        let ids: Vec<ChunkId> = deleted
            .iter()
            .filter_map(|k| <ChunkId>::try_from(k.id()).ok())
            .collect();
        let mut reg = self.shared.registry()?;
        let recorded = reg.chunks_recorded(account, &ids)?;
        let now = self.shared.now();
        for (id, recorded) in ids.iter().zip(recorded) {
            if !recorded
                || self
                    .shared
                    .store
                    .len(&BlobKey::Chunk(account, *id))?
                    .is_some()
            {
                continue;
            }
            let before = predecessor(id);
            let rec = reg.chunk_records(account, before.as_ref(), 1)?;
            // A packed chunk's bytes are in its pack: the blob deleted was a leftover.
            if let Some(rec) = rec.into_iter().find(|r| r.id == *id && r.pack.is_none()) {
                reg.mark_damaged(account, id, &rec.hash, now)?;
                tracing::error!(account_id = account, chunk = %super::hex(id), "a chunk stored again while collection deleted its blob: marked damaged, to be sent again");
            }
        }
        Err(lost)
    }

    /// Reads each of the account's packs once and checks every chunk its rows place in
    /// it: the bytes against the recorded hash, and the place against the pack's own
    /// trailer.
    fn scrub_packs(
        &self,
        account: AccountId,
        report: &mut ScrubReport,
        tracked: &Tracked<'_>,
    ) -> Result<(), RepoError> {
        let packs = self.shared.registry()?.packs(account)?;
        for p in packs {
            tracked.update(|pr| {
                pr.chunks_checked = report.chunks_checked;
                pr.bytes_checked = report.bytes_checked;
            });
            let id = p.pack.id;
            let recs = self.shared.registry()?.chunks_in_pack(account, &id)?;
            if recs.is_empty() {
                continue;
            }
            let bytes = self.shared.store.get(&BlobKey::Pack(account, id))?;
            let listed: Option<HashSet<(ChunkId, u64, u64)>> = match bytes.as_deref() {
                None => None,
                Some(b) => match super::pack::entries(b) {
                    Ok(e) => Some(e.into_iter().map(|e| (e.id, e.offset, e.len)).collect()),
                    Err(e) => {
                        tracing::error!(account_id = account, pack = %super::hex(&id), error = %e, "a pack's trailer is damaged");
                        Some(HashSet::new())
                    }
                },
            };
            if let Some(b) = &bytes {
                report.bytes_checked += b.len() as u64;
            }
            for rec in recs {
                let Some(loc) = rec.pack else { continue };
                report.chunks_checked += 1;
                let verdict = match (&bytes, &listed) {
                    (Some(b), Some(listed)) => {
                        let ok = slice_of(b, &rec)
                            .is_some_and(|d| *blake3::hash(d).as_bytes() == rec.hash)
                            && listed.contains(&(rec.id, loc.offset, rec.stored_len));
                        if ok {
                            continue;
                        }
                        false
                    }
                    _ => true, // missing
                };
                // A repack may have moved the row since it was read: only a row that
                // still points here is marked, checked and marked under the round lock
                // (shared), which a repack holds exclusively.
                let _round = self
                    .shared
                    .gc_lock
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                let mut all = self.shared.cross_lock(false)?;
                let now_rec = all.registry()?.chunk_record(account, &rec.id)?;
                if now_rec.is_none_or(|r| r.pack != rec.pack) {
                    continue;
                }
                if verdict {
                    report.missing.push((account, rec.id));
                } else {
                    report.damaged.push((account, rec.id));
                }
                let now = self.shared.now();
                all.registry()?
                    .mark_damaged(account, &rec.id, &rec.hash, now)?;
                tracing::error!(account_id = account, chunk = %super::hex(&rec.id), pack = %super::hex(&id), "a damaged or missing packed chunk, marked for upload");
            }
        }
        Ok(())
    }

    /// Every chunk id the account has a row for that keeps its bytes in a blob of its
    /// own (not in a pack).
    fn recorded_chunks(&self, account: AccountId) -> Result<HashSet<ChunkId>, RepoError> {
        let mut ids = HashSet::new();
        let mut after = None;
        loop {
            let page = self
                .shared
                .registry()?
                .chunk_records(account, after.as_ref(), PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            ids.extend(page.into_iter().filter(|r| r.pack.is_none()).map(|r| r.id));
        }
        Ok(ids)
    }

    /// Reads back every chunk and snapshot body of the accounts in `scope`, compares
    /// each with the hash recorded at ingest, and marks missing or damaged chunks
    /// damaged (not held, so they are sent again).
    pub fn scrub(&self, scope: Scope) -> Result<ScrubReport, RepoError> {
        let mut report = ScrubReport::default();
        let accounts = self.accounts_in(scope)?;
        let tracked = self.track("scrub", accounts.len() as u64);
        for account in accounts {
            self.scrub_account(account, &mut report, &tracked)?;
            report.accounts += 1;
            tracked.update(|p| p.accounts_done = report.accounts);
        }
        crate::metrics::metrics().maintenance_done("scrub");
        if report.damaged.is_empty()
            && report.missing.is_empty()
            && report.damaged_bodies.is_empty()
        {
            tracing::info!(
                chunks = report.chunks_checked,
                bytes = report.bytes_checked,
                "scrub found nothing wrong"
            );
        } else {
            tracing::error!(
                damaged = report.damaged.len(),
                missing = report.missing.len(),
                damaged_bodies = report.damaged_bodies.len(),
                "scrub found damaged data"
            );
        }
        Ok(report)
    }

    fn scrub_account(
        &self,
        account: AccountId,
        report: &mut ScrubReport,
        tracked: &Tracked<'_>,
    ) -> Result<(), RepoError> {
        let store = &self.shared.store;
        let mut after = None;
        loop {
            let page = self
                .shared
                .registry()?
                .chunk_records(account, after.as_ref(), PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            tracked.update(|p| {
                p.chunks_checked = report.chunks_checked;
                p.bytes_checked = report.bytes_checked;
            });
            for rec in page {
                if rec.pack.is_some() {
                    continue; // checked a pack at a time, below
                }
                report.chunks_checked += 1;
                let sound = match store.get(&BlobKey::Chunk(account, rec.id))? {
                    None => {
                        report.missing.push((account, rec.id));
                        false
                    }
                    Some(bytes) => {
                        report.bytes_checked += bytes.len() as u64;
                        let ok = bytes.len() as u64 == rec.stored_len
                            && *blake3::hash(&bytes).as_bytes() == rec.hash;
                        if !ok {
                            report.damaged.push((account, rec.id));
                        }
                        ok
                    }
                };
                if !sound {
                    let now = self.shared.now();
                    // Only if the record is still the one checked: a put that rewrote
                    // the chunk meanwhile has made it sound.
                    self.shared
                        .registry()?
                        .mark_damaged(account, &rec.id, &rec.hash, now)?;
                    tracing::error!(account_id = account, chunk = %super::hex(&rec.id), "a damaged or missing chunk, marked for upload");
                }
            }
        }
        self.scrub_packs(account, report, tracked)?;
        let headers = self.shared.registry()?.list_snapshots(account)?;
        for h in headers {
            let Some(snap) = self.shared.registry()?.get_snapshot(account, &h.id)? else {
                continue; // forgotten meanwhile
            };
            report.bodies_checked += 1;
            let sound = store
                .get(&BlobKey::SnapshotBody(account, h.id))?
                .is_some_and(|b| *blake3::hash(&b).as_bytes() == snap.body_hash);
            if !sound {
                report.damaged_bodies.push((account, h.id));
                tracing::error!(account_id = account, snapshot = %super::hex(&h.id), "a snapshot body is damaged or missing");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::conformance::header;
    use crate::repo::service::tests::{account, cid, data, Fixture};
    use crate::repo::CommitOutcome;
    use futures_lite::future::block_on;

    const HOUR: Duration = Duration::from_secs(3600);
    const HOUR_MS: i64 = 3_600_000;

    #[test]
    fn predecessor_is_the_id_just_before() {
        let mut id = [0u8; 32];
        assert_eq!(predecessor(&id), None);
        id[0] = 5;
        let mut want = [0xffu8; 32];
        want[0] = 4;
        assert_eq!(predecessor(&id), Some(want));
        assert_eq!(predecessor(&want).unwrap()[31], 0xfe);
    }

    /// More garbage than one batch: every batch is deleted, rows and blobs, and the
    /// chunks a snapshot names stay, wherever they fall among the batches.
    #[test]
    fn collection_deletes_batch_after_batch() {
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        let t0 = 1_000_000;
        fx.set_time(t0);
        let n = (2 * GC_BATCH + 7) as u32;
        let puts: Vec<_> = (1..=n)
            .map(|i| repo.put_chunk(a, cid(i), data(i)))
            .collect();
        for p in puts {
            block_on(p).unwrap();
        }
        let kept: Vec<ChunkId> = (1..=n).filter(|i| i % 97 == 0).map(cid).collect();
        block_on(repo.commit_snapshot(a, 1, header(1, 1), kept.clone(), vec![1])).unwrap();
        let r = repo
            .collect_garbage(Scope::Account(a), HOUR, t0 + 2 * HOUR_MS)
            .unwrap();
        assert_eq!(r.chunks_deleted, u64::from(n) - kept.len() as u64);
        assert_eq!(repo.usage(a).unwrap().chunks, kept.len() as u64);
        for i in 1..=n {
            let there = repo.get_chunk(a, &cid(i)).unwrap().is_some();
            assert_eq!(there, i % 97 == 0, "chunk {i}");
        }
    }

    #[test]
    fn collection_deletes_only_unreferenced_chunks_untouched_past_the_grace() {
        let fx = Fixture::new();
        let repo = fx.open();
        let (a, b) = (account(&repo, 1), account(&repo, 2));
        let t0 = 1_000_000;
        fx.set_time(t0);
        for n in 1..=5 {
            block_on(repo.put_chunk(a, cid(n), data(n))).unwrap();
        }
        block_on(repo.put_chunk(b, cid(2), data(2))).unwrap();
        // Snapshot 1 names chunk 1; snapshot 2 names chunk 5 and is forgotten.
        for (s, c) in [(1u8, 1u32), (2, 5)] {
            let body = vec![s; 10];
            let hdr = header(s, 10);
            assert_eq!(
                block_on(repo.commit_snapshot(a, 1, hdr, vec![cid(c)], body)).unwrap(),
                CommitOutcome::Committed
            );
        }
        assert!(repo.forget_snapshot(a, &[2; 16]).unwrap());
        // Two hours on, a backup asks about chunk 3 (held: touched now), and chunk 4
        // is put again (touched now).
        fx.set_time(t0 + 2 * HOUR_MS);
        assert_eq!(repo.chunks_held(a, &[cid(3)]).unwrap(), vec![true]);
        block_on(repo.put_chunk(a, cid(4), data(4))).unwrap();
        let r = repo
            .collect_garbage(Scope::Account(a), HOUR, t0 + 2 * HOUR_MS)
            .unwrap();
        // Chunk 2 (never named) and 5 (named only by a forgotten snapshot) go.
        assert_eq!(
            (r.chunks_deleted, r.orphan_chunk_blobs, r.orphan_bodies),
            (2, 0, 0)
        );
        assert_eq!(r.bytes_freed, (data(2).len() + data(5).len()) as u64);
        let ids = [cid(1), cid(2), cid(3), cid(4), cid(5)];
        assert_eq!(
            repo.chunks_held(a, &ids).unwrap(),
            vec![true, false, true, true, false]
        );
        assert_eq!(repo.get_chunk(a, &cid(2)).unwrap(), None);
        assert_eq!(repo.get_chunk(a, &cid(5)).unwrap(), None);
        assert_eq!(repo.get_chunk(a, &cid(1)).unwrap(), Some(data(1)));
        // Bob's chunk 2 is his own, and another account's collection leaves it.
        assert_eq!(repo.get_chunk(b, &cid(2)).unwrap(), Some(data(2)));
        // Much later everything unreferenced goes, the referenced chunk never.
        let r = repo
            .collect_garbage(Scope::All, HOUR, t0 + 100 * HOUR_MS)
            .unwrap();
        assert_eq!((r.accounts, r.chunks_deleted), (2, 3)); // a: 3, 4; b: 2
        assert_eq!(repo.get_chunk(a, &cid(1)).unwrap(), Some(data(1)));
        assert_eq!(repo.chunks_held(a, &[cid(1)]).unwrap(), vec![true]);
        assert_eq!(repo.usage(a).unwrap().chunks, 1);
        // The snapshot is whole: its body and every chunk it names.
        let s = repo.get_snapshot(a, &[1; 16]).unwrap().unwrap();
        for c in &s.chunks {
            assert!(repo.get_chunk(a, c).unwrap().is_some());
        }
        assert!(repo.get_snapshot_body(a, &[1; 16]).unwrap().is_some());
    }

    #[test]
    fn collection_removes_orphan_blobs_and_keeps_recorded_ones() {
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        block_on(repo.put_chunk(a, cid(1), data(1))).unwrap();
        block_on(repo.commit_snapshot(a, 1, header(1, 3), vec![cid(1)], vec![1, 2, 3])).unwrap();
        // What a crash between blob and row leaves: blobs nobody recorded.
        repo.shared
            .store
            .put_batch(&[
                (BlobKey::Chunk(a, cid(9)), b"orphan chunk"),
                (BlobKey::SnapshotBody(a, [9; 16]), b"orphan body"),
            ])
            .unwrap();
        let r = repo
            .collect_garbage(
                Scope::All,
                HOUR,
                fx.time.load(std::sync::atomic::Ordering::Relaxed),
            )
            .unwrap();
        assert_eq!(
            (r.chunks_deleted, r.orphan_chunk_blobs, r.orphan_bodies),
            (0, 1, 1)
        );
        assert_eq!(
            repo.shared.store.get(&BlobKey::Chunk(a, cid(9))).unwrap(),
            None
        );
        assert_eq!(
            repo.shared
                .store
                .get(&BlobKey::SnapshotBody(a, [9; 16]))
                .unwrap(),
            None
        );
        assert_eq!(repo.get_chunk(a, &cid(1)).unwrap(), Some(data(1)));
        assert_eq!(
            repo.get_snapshot_body(a, &[1; 16]).unwrap(),
            Some(vec![1, 2, 3])
        );
    }

    #[test]
    fn collection_racing_puts_and_commits_never_loses_a_committed_chunk() {
        // Puts, held-questions and commits of one account run while collections with a
        // zero grace run on another thread: every committed snapshot must stay whole.
        let fx = Fixture::new();
        let repo = fx.open();
        fx.set_time(crate::repo::now_unix_ms());
        let time = fx.time.clone();
        let a = account(&repo, 1);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let gc = {
            let (repo, stop) = (repo.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut runs = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || runs == 0 {
                    let now = time.load(std::sync::atomic::Ordering::Relaxed);
                    repo.collect_garbage(Scope::All, Duration::ZERO, now + 1)
                        .unwrap();
                    runs += 1;
                    // Room for a put and its commit between two collections, even on a
                    // loaded machine (a commit that loses the race is simply retried).
                    std::thread::sleep(Duration::from_millis(3));
                }
                runs
            })
        };
        let mut committed = 0;
        for s in 0..30u8 {
            let ids: Vec<ChunkId> = (0..6).map(|i| cid((s as u32 % 4) * 3 + i)).collect();
            for attempt in 0.. {
                assert!(attempt < 20_000, "no commit got through");
                let held = repo.chunks_held(a, &ids).unwrap();
                for (id, held) in ids.iter().zip(held) {
                    if !held {
                        let n = u32::from_be_bytes(id[..4].try_into().unwrap());
                        block_on(repo.put_chunk(a, *id, data(n))).unwrap();
                    }
                }
                match block_on(repo.commit_snapshot(a, 1, header(s, 0), ids.clone(), vec![])) {
                    Ok(_) => break,
                    Err(RepoError::MissingChunks(_)) => continue, // collected meanwhile
                    Err(e) => panic!("{e}"),
                }
            }
            committed += 1;
            if s % 3 == 0 {
                repo.forget_snapshot(a, &[s.wrapping_sub(3); 16]).unwrap();
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(gc.join().unwrap() > 0);
        assert_eq!(committed, 30);
        for h in repo.list_snapshots(a).unwrap() {
            let s = repo.get_snapshot(a, &h.id).unwrap().unwrap();
            for c in &s.chunks {
                let n = u32::from_be_bytes(c[..4].try_into().unwrap());
                assert_eq!(
                    repo.get_chunk(a, c).unwrap(),
                    Some(data(n)),
                    "snapshot {:?}",
                    h.id[0]
                );
            }
        }
    }

    #[test]
    fn scrub_finds_a_flipped_byte_and_a_missing_blob_and_they_are_put_again() {
        let fx = Fixture::new();
        let repo = fx.open();
        let (a, b) = (account(&repo, 1), account(&repo, 2));
        for n in 1..=3 {
            block_on(repo.put_chunk(a, cid(n), data(n))).unwrap();
        }
        block_on(repo.put_chunk(b, cid(1), data(1))).unwrap();
        block_on(repo.commit_snapshot(a, 1, header(1, 4), vec![cid(1), cid(2)], vec![4; 4]))
            .unwrap();
        let clean = repo.scrub(Scope::All).unwrap();
        assert_eq!((clean.chunks_checked, clean.bodies_checked), (4, 1));
        assert!(clean.damaged.is_empty() && clean.missing.is_empty());

        let flipped = fx.blob_path(&BlobKey::Chunk(a, cid(1)));
        let mut bytes = std::fs::read(&flipped).unwrap();
        bytes[17] ^= 0x01;
        std::fs::write(&flipped, &bytes).unwrap();
        std::fs::remove_file(fx.blob_path(&BlobKey::Chunk(a, cid(2)))).unwrap();
        let body = fx.blob_path(&BlobKey::SnapshotBody(a, [1; 16]));
        std::fs::write(&body, [5; 4]).unwrap();

        let r = repo.scrub(Scope::All).unwrap();
        assert_eq!(r.damaged, vec![(a, cid(1))]);
        assert_eq!(r.missing, vec![(a, cid(2))]);
        assert_eq!(r.damaged_bodies, vec![(a, [1; 16])]);
        assert_eq!(r.chunks_checked, 4);
        assert_eq!(
            repo.chunks_held(a, &[cid(1), cid(2), cid(3)]).unwrap(),
            vec![false, false, true]
        );
        assert_eq!(
            repo.chunks_held(b, &[cid(1)]).unwrap(),
            vec![true],
            "Bob's copy is sound"
        );
        // A commit naming them is refused until they are sent again...
        assert!(matches!(
            block_on(repo.commit_snapshot(a, 1, header(2, 0), vec![cid(1), cid(3)], vec![])),
            Err(RepoError::MissingChunks(m)) if m == vec![cid(1)]
        ));
        // ...which repairs them.
        block_on(repo.put_chunk(a, cid(1), data(1))).unwrap();
        block_on(repo.put_chunk(a, cid(2), data(2))).unwrap();
        assert_eq!(repo.get_chunk(a, &cid(1)).unwrap(), Some(data(1)));
        assert_eq!(
            repo.chunks_held(a, &[cid(1), cid(2)]).unwrap(),
            vec![true, true]
        );
        let r = repo.scrub(Scope::Account(a)).unwrap();
        assert!(r.damaged.is_empty() && r.missing.is_empty());
        assert_eq!(
            r.damaged_bodies,
            vec![(a, [1; 16])],
            "a body is only reported"
        );
        assert!(matches!(
            repo.scrub(Scope::Account(99)),
            Err(RepoError::NoSuchAccount(99))
        ));
    }
}

#[cfg(test)]
mod pack_tests {
    use super::*;
    use crate::repo::conformance::header;
    use crate::repo::hooked::{HookedStore, Moment};
    use crate::repo::service::tests::{account, cid, data, Fixture};
    use futures_lite::future::{block_on, poll_once};

    const HOUR: Duration = Duration::from_secs(3600);
    const HOUR_MS: i64 = 3_600_000;

    /// Puts every chunk in as few rounds as the committer takes them: the puts are all
    /// queued while the round lock is held, so at most the first is a round alone.
    fn put_together(repo: &Repo, a: AccountId, ns: impl IntoIterator<Item = u32>) {
        let mut futs: Vec<_> = ns
            .into_iter()
            .map(|n| Box::pin(repo.put_chunk(a, cid(n), data(n))))
            .collect();
        {
            let _hold = repo.shared.gc_lock.write().unwrap();
            for f in &mut futs {
                assert!(block_on(poll_once(f)).is_none()); // queued, not answered
            }
        }
        for f in futs {
            block_on(f).unwrap();
        }
    }

    fn pack_ids(repo: &Repo, a: AccountId) -> Vec<Vec<u8>> {
        let mut ids = repo.shared.store.list(a, BlobKind::Pack).unwrap();
        ids.sort();
        ids
    }

    #[test]
    fn small_chunks_go_in_packs_and_read_back_whichever_the_setting() {
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        block_on(repo.put_chunk(a, cid(100), data(100))).unwrap(); // before packing
        repo.set_pack_below(1 << 20);
        put_together(&repo, a, 1..=40);
        let big = vec![7u8; 1 << 20];
        block_on(repo.put_chunk(a, cid(200), big.clone())).unwrap();
        let packs = pack_ids(&repo, a);
        assert!(
            (1..=2).contains(&packs.len()),
            "40 chunks in {} packs",
            packs.len()
        );
        let blobs = repo.shared.store.list(a, BlobKind::Chunk).unwrap();
        assert_eq!(blobs.len(), 2, "the chunk from before and the large one");
        for n in 1..=40 {
            assert_eq!(repo.get_chunk(a, &cid(n)).unwrap(), Some(data(n)), "{n}");
            assert_eq!(
                repo.get_chunk_range(a, &cid(n), 2, 3).unwrap(),
                Some(data(n)[2..5].to_vec())
            );
        }
        assert_eq!(repo.get_chunk(a, &cid(200)).unwrap(), Some(big));
        // Packing off again: what is packed still reads, and new chunks are blobs.
        repo.set_pack_below(0);
        assert_eq!(repo.get_chunk(a, &cid(7)).unwrap(), Some(data(7)));
        assert_eq!(repo.get_chunk(a, &cid(100)).unwrap(), Some(data(100)));
        assert_eq!(repo.get_chunk(a, &cid(999)).unwrap(), None);
        // Another account sees none of it.
        let b = account(&repo, 2);
        assert_eq!(repo.get_chunk(b, &cid(7)).unwrap(), None);
        // A pack's trailer lists what the rows say.
        let bytes = repo
            .shared
            .store
            .get(&BlobKey::Pack(a, packs[0].clone().try_into().unwrap()))
            .unwrap()
            .unwrap();
        for e in crate::repo::pack::entries(&bytes).unwrap() {
            let n = u32::from_be_bytes(e.id[..4].try_into().unwrap());
            let at = e.offset as usize;
            assert_eq!(&bytes[at..at + e.len as usize], &data(n)[..]);
        }
        let clean = repo.scrub(Scope::All).unwrap();
        assert_eq!(clean.chunks_checked, 42);
        assert!(clean.damaged.is_empty() && clean.missing.is_empty());
    }

    #[test]
    fn collection_deletes_empty_packs_and_repacks_sparse_ones() {
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        let t0 = 1_000_000;
        fx.set_time(t0);
        repo.set_pack_below(1 << 20);
        // Chunks 1-60 in one or two packs, 61-70 in another that nothing will name.
        put_together(&repo, a, 1..=60);
        put_together(&repo, a, 61..=70);
        let before = pack_ids(&repo, a);
        let kept: Vec<ChunkId> = (1..=60).filter(|n| n % 4 == 0).map(cid).collect();
        block_on(repo.commit_snapshot(a, 1, header(1, 1), kept.clone(), vec![1])).unwrap();
        let r = repo
            .collect_garbage(Scope::Account(a), HOUR, t0 + 2 * HOUR_MS)
            .unwrap();
        assert_eq!(r.chunks_deleted, 70 - kept.len() as u64);
        assert!(r.packs_repacked >= 1, "{r:?}");
        assert_eq!(
            r.packs_deleted,
            before.len() as u64,
            "the emptied pack and the repacked ones: {r:?}"
        );
        let after = pack_ids(&repo, a);
        assert_eq!(after.len(), 1, "the kept chunks in one new pack");
        assert!(!before.contains(&after[0]));
        for n in 1..=70 {
            let want = (n % 4 == 0 && n <= 60).then(|| data(n));
            assert_eq!(repo.get_chunk(a, &cid(n)).unwrap(), want, "chunk {n}");
        }
        let usage = repo.shared.registry().unwrap().packs(a).unwrap();
        assert_eq!(usage[0].live_chunks, kept.len() as u64);
        // Nothing left to do: a second collection changes nothing.
        let again = repo
            .collect_garbage(Scope::Account(a), HOUR, t0 + 2 * HOUR_MS)
            .unwrap();
        assert_eq!((again.packs_deleted, again.packs_repacked), (0, 0));
        let s = repo.scrub(Scope::All).unwrap();
        assert!(s.damaged.is_empty() && s.missing.is_empty());
        assert_eq!(s.chunks_checked, kept.len() as u64);
    }

    /// What a repack on another node does between a read's row lookup and its pack
    /// read: moves the pack's chunks to a new pack and deletes the old one.
    fn move_pack_away(db: &std::path::Path, inner: &crate::repo::FsBlobStore, key: &BlobKey) {
        use crate::repo::{BlobStore as _, Registry as _};
        let BlobKey::Pack(a, old) = *key else { return };
        let mut reg = crate::repo::SqliteRegistry::open(db).unwrap();
        let bytes = inner.get(key).unwrap().unwrap();
        let to = PackRecord {
            id: new_pack_id(),
            stored_len: bytes.len() as u64,
            created_ms: 1,
        };
        inner
            .put_batch(&[(BlobKey::Pack(a, to.id), &bytes)])
            .unwrap();
        let moves: Vec<ChunkMove> = reg
            .chunks_in_pack(a, &old)
            .unwrap()
            .iter()
            .map(|r| ChunkMove {
                id: r.id,
                from: r.pack.unwrap(),
                to_offset: r.pack.unwrap().offset,
            })
            .collect();
        assert!(reg.move_chunks(a, &to, &moves).unwrap() > 0);
        assert_eq!(reg.delete_unnamed_packs(a, &[old]).unwrap(), vec![old]);
        inner.delete(key).unwrap();
    }

    #[test]
    fn a_read_follows_a_chunk_its_pack_was_repacked_from_meanwhile() {
        let fx = Fixture::new();
        // Armed, the next read of a pack finds it just moved away.
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (trigger, db) = (armed.clone(), fx.dir.path().join("repo.db"));
        let store = HookedStore {
            inner: crate::repo::FsBlobStore::open(&fx.dir.path().join("blobs")).unwrap(),
            hook: Box::new(move |at, keys, inner| {
                let pack = keys.first().filter(|k| k.kind() == BlobKind::Pack);
                if let Some(key) = pack.filter(|_| at == Moment::Reading) {
                    if trigger.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        move_pack_away(&db, inner, key);
                    }
                }
                Ok(())
            }),
        };
        let repo = Repo::new(
            Box::new(store),
            Box::new(crate::repo::SqliteRegistry::open(&fx.dir.path().join("repo.db")).unwrap()),
        )
        .unwrap();
        let a = account(&repo, 1);
        repo.set_pack_below(1 << 20);
        put_together(&repo, a, 1..=5);
        for n in [3, 1] {
            // (The first read of a pack is a range read, the second a whole one.)
            armed.store(true, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(repo.get_chunk(a, &cid(n)).unwrap(), Some(data(n)), "{n}");
            assert!(!armed.load(std::sync::atomic::Ordering::SeqCst), "it moved");
        }
        assert_eq!(repo.get_chunk(a, &cid(99)).unwrap(), None);
    }

    /// A repack stopped after writing its new pack, or after moving the rows: the
    /// next collection (after a restart) leaves every kept chunk readable, no pack
    /// behind, and scrub clean.
    #[test]
    fn a_repack_stopped_half_way_is_finished_by_the_next_collection() {
        for at in [1u8, 2] {
            let fx = Fixture::new();
            let t0 = 1_000_000;
            fx.set_time(t0);
            let crash = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
            let open = || {
                let time = fx.time.clone();
                let crash = crash.clone();
                Repo::with_clock(
                    Box::new(HookedStore {
                        inner: crate::repo::FsBlobStore::open(&fx.dir.path().join("blobs"))
                            .unwrap(),
                        // 1: a pack's put is stored, then fails (before its rows move);
                        // 2: deleting packs fails (after the rows moved and the old
                        // packs' records went): what a crash there leaves.
                        hook: Box::new(move |at, keys, _| {
                            let packs = keys.iter().any(|k| k.kind() == BlobKind::Pack);
                            match (crash.load(std::sync::atomic::Ordering::SeqCst), at) {
                                (1, Moment::Stored) if packs => {
                                    Err(RepoError::ObjectStore("crash after the new pack".into()))
                                }
                                (2, Moment::Deleting) if packs => Err(RepoError::ObjectStore(
                                    "crash before the old packs go".into(),
                                )),
                                _ => Ok(()),
                            }
                        }),
                    }),
                    Box::new(
                        crate::repo::SqliteRegistry::open(&fx.dir.path().join("repo.db")).unwrap(),
                    ),
                    std::sync::Arc::new(move || time.load(std::sync::atomic::Ordering::Relaxed)),
                )
                .unwrap()
            };
            let repo = open();
            let a = account(&repo, 1);
            repo.set_pack_below(1 << 20);
            put_together(&repo, a, 1..=40);
            let kept: Vec<ChunkId> = (1..=40).filter(|n| n % 5 == 0).map(cid).collect();
            block_on(repo.commit_snapshot(a, 1, header(1, 1), kept.clone(), vec![1])).unwrap();
            let before = pack_ids(&repo, a);
            crash.store(at, std::sync::atomic::Ordering::SeqCst);
            let later = t0 + 2 * HOUR_MS;
            let err = repo.collect_garbage(Scope::All, HOUR, later).unwrap_err();
            assert!(matches!(err, RepoError::ObjectStore(_)), "{err}");
            let mid = pack_ids(&repo, a);
            assert!(mid.len() > 1, "crash {at}: {} packs", mid.len());
            for id in &kept {
                assert!(repo.get_chunk(a, id).unwrap().is_some(), "crash {at}");
            }
            drop(repo);
            crash.store(0, std::sync::atomic::Ordering::SeqCst);
            let repo = open();
            let r = repo.collect_garbage(Scope::All, HOUR, later).unwrap();
            assert!(r.orphan_packs + r.packs_deleted >= 1, "crash {at}: {r:?}");
            let after = pack_ids(&repo, a);
            assert_eq!(after.len(), 1, "crash {at}: {after:?}");
            assert!(!before.contains(&after[0]), "crash {at}");
            for n in 1..=40 {
                let want = (n % 5 == 0).then(|| data(n));
                assert_eq!(repo.get_chunk(a, &cid(n)).unwrap(), want, "crash {at}: {n}");
            }
            let s = repo.scrub(Scope::All).unwrap();
            assert!(
                s.damaged.is_empty() && s.missing.is_empty(),
                "crash {at}: {s:?}"
            );
            assert_eq!(s.chunks_checked, kept.len() as u64);
        }
    }

    #[test]
    fn orphan_packs_and_superseded_chunk_blobs_are_swept() {
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        block_on(repo.put_chunk(a, cid(1), data(1))).unwrap();
        block_on(repo.commit_snapshot(a, 1, header(1, 1), vec![cid(1), cid(2)], vec![1]))
            .unwrap_err();
        repo.set_pack_below(1 << 20);
        put_together(&repo, a, 2..=3);
        let packs = repo.shared.store.list(a, BlobKind::Pack).unwrap().len();
        block_on(repo.commit_snapshot(a, 1, header(1, 1), vec![cid(1), cid(2)], vec![1])).unwrap();
        // What a crash between a pack and its rows leaves; and chunk 2 also as a blob of
        // its own, as if it was stored unpacked once and later packed.
        repo.shared
            .store
            .put_batch(&[
                (BlobKey::Pack(a, [9; 16]), b"an orphan pack"),
                (BlobKey::Chunk(a, cid(2)), &data(2)),
            ])
            .unwrap();
        let now = fx.time.load(std::sync::atomic::Ordering::Relaxed);
        let r = repo.collect_garbage(Scope::All, HOUR, now).unwrap();
        assert_eq!((r.orphan_packs, r.orphan_chunk_blobs), (1, 1), "{r:?}");
        assert_eq!(
            repo.shared.store.get(&BlobKey::Pack(a, [9; 16])).unwrap(),
            None
        );
        assert_eq!(
            repo.shared.store.get(&BlobKey::Chunk(a, cid(2))).unwrap(),
            None
        );
        assert_eq!(
            repo.shared.store.list(a, BlobKind::Pack).unwrap().len(),
            packs,
            "recorded packs stay"
        );
        for n in 1..=3 {
            assert_eq!(repo.get_chunk(a, &cid(n)).unwrap(), Some(data(n)));
        }
    }

    #[test]
    fn scrub_finds_a_flipped_byte_and_a_missing_pack_and_they_are_put_again() {
        let fx = Fixture::new();
        let repo = fx.open();
        let a = account(&repo, 1);
        repo.set_pack_below(1 << 20);
        put_together(&repo, a, 1..=3);
        put_together(&repo, a, 11..=13);
        let pack_of = |n| {
            repo.shared
                .registry()
                .unwrap()
                .chunk_record(a, &cid(n))
                .unwrap()
                .unwrap()
                .pack
                .unwrap()
        };
        let (p2, p12) = (pack_of(2), pack_of(12));
        assert_ne!(p2.pack, p12.pack);
        // A byte of chunk 2 flipped; chunk 12's pack gone (and 11 and 13 with it, unless
        // they were a round apart).
        let path = fx.blob_path(&BlobKey::Pack(a, p2.pack));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[p2.offset as usize + 3] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        std::fs::remove_file(fx.blob_path(&BlobKey::Pack(a, p12.pack))).unwrap();
        let r = repo.scrub(Scope::All).unwrap();
        assert_eq!(r.damaged, vec![(a, cid(2))]);
        assert!(r.missing.contains(&(a, cid(12))), "{r:?}");
        assert_eq!(r.chunks_checked, 6);
        assert_eq!(
            repo.chunks_held(a, &[cid(1), cid(2), cid(12)]).unwrap(),
            vec![true, false, false],
            "only the damaged chunk of a pack is marked"
        );
        // Sent again, they land in a new pack and read back.
        put_together(&repo, a, [2, 11, 12, 13]);
        for n in [1, 2, 3, 11, 12, 13] {
            assert_eq!(repo.get_chunk(a, &cid(n)).unwrap(), Some(data(n)), "{n}");
        }
        let r = repo.scrub(Scope::All).unwrap();
        assert!(r.damaged.is_empty() && r.missing.is_empty(), "{r:?}");
    }
}
