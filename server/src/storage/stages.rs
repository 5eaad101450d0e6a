//! The page-aligned buffers direct writes go out from: [`STAGE`]-byte halves of
//! huge-page [`Block`]s, lent by the shared pool [`Stages`] and given back to it when
//! dropped, so a new file reuses warm memory instead of faulting in fresh pages.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::MmapMut;

/// Bytes staged per file before a direct write. Measured with 64 uploads of 16 MiB
/// (benches/scripts/load.sh glommio -c 64 --size 16MiB -d 8), 1 MiB stages moved
/// 1036-1130 MB/s at 0.98-1.18 core-s/GiB, against 663-958 MB/s at 1.10-1.67 with
/// 256 and 512 KiB, for at most 3 MiB of stages per upload (one filling, two writing).
pub(super) const STAGE: usize = 1 << 20;
/// Free stages kept for the next files (64 MiB at most). A stage that is mapped anew
/// costs a page fault and a zeroed page per 4 KiB on its first fill: with a fresh
/// stage per file, 3 MiB of every 16 MiB upload went through fresh pages (10% of the
/// server's CPU in scenario 2 was page faults and unmaps).
const SPARE_STAGES: usize = 64;

/// Free stages, shared by every file: at most [`SPARE_STAGES`], plus any a ring has
/// registered (those are never unmapped while the pool lives; see
/// [`ring`](super::ring)).
#[derive(Debug, Default)]
pub(super) struct Stages(pub(super) Mutex<Vec<Spare>>);

/// A free stage in the pool.
#[derive(Debug)]
pub(super) struct Spare {
    block: Arc<Block>,
    half: usize,
    pub(super) id: u64,
    pub(super) registered: bool,
}

/// Ids of stages, unique in the process (rings know their registered stages by id).
static STAGE_IDS: AtomicU64 = AtomicU64::new(0);

/// The size of a transparent huge page on x86_64 and of the blocks stages are cut from.
const HUGE_PAGE: usize = 2 << 20;

/// Memory for two stages: [`HUGE_PAGE`] bytes aligned to a huge page, which the
/// kernel is asked to back with one (`MADV_HUGEPAGE`).
///
/// With small pages a 1 MiB direct write is 256 separate pages: the kernel maps each
/// one for the device, and this VM's virtio disk (at most 254 segments a request)
/// splits every such write in two. From a huge page it is one physically contiguous
/// segment. Measured with `-c 64 --size 16MiB -d 8`, `io_uring_enter` fell from 12.6%
/// to 6.9% of the server's samples. Where the kernel has no huge page to give, the
/// block is backed by small pages and works as before.
struct Block {
    /// Mapped with room to spare, so that an aligned [`HUGE_PAGE`] fits inside; only
    /// that part is ever touched.
    _map: MmapMut,
    /// The start of the aligned part. Each half belongs to one [`Stage`] or [`Spare`]
    /// at a time, and nothing else reads or writes through this pointer.
    base: std::ptr::NonNull<u8>,
}

// SAFETY: `Block` only keeps its mapping alive and remembers where the aligned part
// begins; it never reads or writes the memory itself. Access goes through the stage
// that owns a half, one owner per half, so sharing or sending a `Block` between
// threads cannot create aliasing access.
unsafe impl Send for Block {}
// SAFETY: as for `Send`: `&Block` gives no access to the memory.
unsafe impl Sync for Block {}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block").field("base", &self.base).finish()
    }
}

impl Block {
    fn new() -> io::Result<Arc<Block>> {
        let mut map = MmapMut::map_anon(2 * HUGE_PAGE)?;
        let off = (map.as_ptr() as usize).wrapping_neg() & (HUGE_PAGE - 1);
        if let Err(e) = map.advise_range(memmap2::Advice::HugePage, off, HUGE_PAGE) {
            tracing::debug!(error = %e, "no transparent huge pages for direct-write stages");
        }
        let base = std::ptr::NonNull::from(&mut map[off]);
        Ok(Arc::new(Block { _map: map, base }))
    }
}

impl Stages {
    /// A free stage, or a new one; it comes back here when dropped.
    pub(super) fn take(self: &Arc<Self>) -> io::Result<Stage> {
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let spare = match pool.pop() {
            Some(s) => s,
            None => {
                // A new block: one half is taken now, the other waits in the pool.
                let block = Block::new()?;
                pool.push(Spare {
                    block: block.clone(),
                    half: 1,
                    id: STAGE_IDS.fetch_add(1, Ordering::Relaxed),
                    registered: false,
                });
                Spare {
                    block,
                    half: 0,
                    id: STAGE_IDS.fetch_add(1, Ordering::Relaxed),
                    registered: false,
                }
            }
        };
        drop(pool);
        Ok(Stage {
            block: Some(spare.block),
            half: spare.half,
            id: spare.id,
            registered: spare.registered,
            home: self.clone(),
        })
    }
}

/// A page-aligned buffer of [`STAGE`] bytes (half of a [`Block`]), lent by [`Stages`].
#[derive(Debug)]
pub(super) struct Stage {
    /// `None` only while being dropped.
    block: Option<Arc<Block>>,
    half: usize,
    pub(super) id: u64,
    /// A ring holds this stage's pages registered: it must stay mapped while the pool
    /// lives (the ring holds the pool).
    pub(super) registered: bool,
    pub(super) home: Arc<Stages>,
}

impl Stage {
    fn ptr(&self) -> Option<*mut u8> {
        let b = self.block.as_ref()?;
        // SAFETY: `half` is 0 or 1, so this stays inside the block's aligned part.
        Some(unsafe { b.base.as_ptr().add(self.half * STAGE) })
    }
}

impl std::ops::Deref for Stage {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self.ptr() {
            // SAFETY: this stage owns these `STAGE` bytes (one half of its block, which
            // the `Arc` keeps mapped); no other stage or spare holds the same half.
            Some(p) => unsafe { std::slice::from_raw_parts(p, STAGE) },
            None => &[],
        }
    }
}

impl std::ops::DerefMut for Stage {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self.ptr() {
            // SAFETY: as in `deref`; `&mut self` makes this the only borrow of the half.
            Some(p) => unsafe { std::slice::from_raw_parts_mut(p, STAGE) },
            None => &mut [],
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            let mut spare = self.home.0.lock().unwrap_or_else(|p| p.into_inner());
            if spare.len() < SPARE_STAGES || self.registered {
                spare.push(Spare {
                    block,
                    half: self.half,
                    id: self.id,
                    registered: self.registered,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Storage;
    use super::*;
    use cyberbackup_protocol::v3::session::FileSink;

    #[test]
    fn stages_are_halves_of_aligned_blocks() {
        let pool = Arc::new(Stages::default());
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
        assert_eq!(pa % HUGE_PAGE, 0, "the first stage starts a huge page");
        assert_eq!(
            pb,
            pa + STAGE,
            "the second is the other half of the same block"
        );
        assert_eq!((a.len(), b.len()), (STAGE, STAGE));
        // The halves do not overlap: each keeps what was written to it.
        let (mut a, mut b) = (a, b);
        a.fill(1);
        b.fill(2);
        assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2));
        // A block outlives the half given back first.
        drop(a);
        b[STAGE - 1] = 3;
        assert_eq!(b[STAGE - 1], 3);
        let c = pool.take().unwrap();
        assert_eq!(c.as_ptr() as usize, pa, "the freed half is lent again");
    }

    #[test]
    fn stages_are_shared_by_files_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), 1 << 30)
            .unwrap()
            .with_direct_io(1);
        let spare = |s: &Storage| -> Vec<usize> {
            let v = s.writers.stages.0.lock().unwrap();
            v.iter()
                .map(|m| m.block.base.as_ptr() as usize + m.half * STAGE)
                .collect()
        };
        let len = 3 * STAGE as u64;
        let data = vec![5u8; len as usize];
        let mut p = s.create_pending(len).unwrap();
        p.write_at(0, &data).unwrap();
        s.commit(p, &[4; 16], "a", len).unwrap();
        let after_first = spare(&s);
        assert!(
            !after_first.is_empty(),
            "a finished file gives its stages back"
        );
        let p = s.create_pending(len).unwrap();
        let taken = p.direct.as_ref().unwrap().stage.as_ptr() as usize;
        assert!(after_first.contains(&taken), "the next file reuses a stage");
        drop(p);
        assert_eq!(spare(&s).len(), after_first.len());
        // No more than SPARE_STAGES are kept, however many were out at once.
        let many: Vec<Stage> = (0..SPARE_STAGES + 5)
            .map(|_| s.writers.stages.take().unwrap())
            .collect();
        drop(many);
        assert_eq!(spare(&s).len(), SPARE_STAGES);
        // A stage a ring registered is kept (mapped) even past that.
        let mut many: Vec<Stage> = (0..SPARE_STAGES + 5)
            .map(|_| s.writers.stages.take().unwrap())
            .collect();
        // (the last one dropped, when the pool is full)
        let last = many.last_mut().unwrap();
        last.registered = true;
        let kept = last.id;
        drop(many);
        let pool = s.writers.stages.0.lock().unwrap();
        assert_eq!(pool.len(), SPARE_STAGES + 1);
        assert!(pool.iter().any(|p| p.id == kept && p.registered));
    }
}
