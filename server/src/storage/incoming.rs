//! The `.incoming` directory under the storage root: where temp files live (spread
//! over [`SPREAD`] subdirectories), the run marker that tells the next start whether
//! this run ended cleanly, and the sweep at start-up of whatever a crash left there.

use std::fs::{self, File};
use std::path::Path;

use super::{io_err, StorageError};

/// Name of the temp directory under the root; client directories are 32 hex digits, so
/// it cannot collide with one.
pub const INCOMING: &str = ".incoming";

/// Marker in `.incoming` while a server runs on the root: found at start-up, it means
/// the last run did not end cleanly.
const RUNNING: &str = "RUNNING";

/// Temp files are spread over this many subdirectories of `.incoming` (`00`..`3f`):
/// creating them all in one directory serialises every upload on that directory's
/// lock and crowds ext4's inode allocator into one block group.
pub const SPREAD: usize = 64;

/// Temp files now in `.incoming` (for tests and checks).
pub fn temp_files(root: &Path) -> usize {
    let Ok(dirs) = fs::read_dir(root.join(INCOMING)) else {
        return 0;
    };
    dirs.filter_map(|d| d.ok())
        .filter(|d| d.file_name() != RUNNING)
        .map(|d| {
            if d.path().is_dir() {
                fs::read_dir(d.path()).map(|f| f.count()).unwrap_or(0)
            } else {
                1
            }
        })
        .sum()
}

/// Starts a run on `incoming` (creating it if needed): removes the temp files a crash
/// left, makes the [`SPREAD`] subdirectories and sets the run marker. Returns whether
/// the last run did not end cleanly (its marker was still there, or it left temp
/// files).
pub(super) fn start_run(incoming: &Path) -> Result<bool, StorageError> {
    fs::create_dir_all(incoming).map_err(io_err("creating", incoming))?;
    let mut removed = 0usize;
    let marker = incoming.join(RUNNING);
    let unclean = marker.exists();
    for entry in fs::read_dir(incoming).map_err(io_err("reading", incoming))? {
        let entry = entry.map_err(io_err("reading", incoming))?;
        let path = entry.path();
        if path == marker {
            continue;
        }
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let fan_out = is_dir
            && entry
                .file_name()
                .to_str()
                .and_then(|n| u8::from_str_radix(n, 16).ok().filter(|_| n.len() == 2))
                .is_some_and(|i| (i as usize) < SPREAD);
        if fan_out {
            for inner in fs::read_dir(&path).map_err(io_err("reading", &path))? {
                let inner = inner.map_err(io_err("reading", &path))?.path();
                let r = if inner.is_dir() {
                    fs::remove_dir_all(&inner)
                } else {
                    fs::remove_file(&inner)
                };
                r.map_err(io_err("removing leftover", &inner))?;
                removed += 1;
            }
        } else {
            let r = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            r.map_err(io_err("removing leftover", &path))?;
            removed += 1;
        }
    }
    for i in 0..SPREAD {
        let d = incoming.join(format!("{i:02x}"));
        fs::create_dir_all(&d).map_err(io_err("creating", &d))?;
    }
    if removed > 0 {
        tracing::warn!(removed, dir = %incoming.display(), "removed unfinished uploads left by a crash");
        nix::unistd::sync();
    }
    File::create(&marker).map_err(io_err("creating", &marker))?;
    Ok(unclean || removed > 0)
}

/// Marks a clean end of the run: removes the marker.
pub(super) fn end_run(incoming: &Path) {
    let marker = incoming.join(RUNNING);
    if let Err(e) = fs::remove_file(&marker) {
        tracing::warn!(error = %e, path = %marker.display(), "cannot remove the run marker");
    }
}

#[cfg(test)]
mod tests {
    use super::super::Storage;
    use super::*;

    #[test]
    fn a_run_that_did_not_close_is_unclean_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!Storage::open(dir.path(), 1 << 30).unwrap().unclean_start());
        // dropped without close: a crash, as far as the next run can tell
        let s = Storage::open(dir.path(), 1 << 30).unwrap();
        assert!(s.unclean_start());
        s.close();
        assert!(!Storage::open(dir.path(), 1 << 30).unwrap().unclean_start());
        assert_eq!(temp_files(dir.path()), 0, "the marker is no temp file");
    }

    #[test]
    fn leftovers_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join(INCOMING).join("07")).unwrap();
        fs::write(dir.path().join(INCOMING).join("1-0.part"), b"junk").unwrap();
        fs::write(
            dir.path().join(INCOMING).join("07").join("1-7.part"),
            b"junk",
        )
        .unwrap();
        let _s = Storage::open(dir.path(), 1 << 30).unwrap();
        assert_eq!(temp_files(dir.path()), 0);
    }
}
