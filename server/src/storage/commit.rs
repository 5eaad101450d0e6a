//! Making finished temp files durable and visible under their final names, in the
//! order that survives a crash: data synced, renamed into place, the rename synced,
//! before the answer. Alone ([`Storage::commit`]), as a group that shares one
//! `syncfs` ([`Storage::commit_batch`]), or through the group-commit thread that
//! pipelines such groups ([`Committer`]).

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cyberbackup_protocol::common::ClientId;

use super::{io_err, PendingFile, Storage, StorageError};

impl Storage {
    /// Makes a finished file durable and visible under its final name. The file keeps
    /// `size` bytes (the plaintext; the temp file also held the padding block).
    pub fn commit(
        &self,
        pending: PendingFile,
        client: &ClientId,
        name: &str,
        size: u64,
    ) -> Result<Stored, StorageError> {
        self.commit_batch(vec![CommitItem {
            pending,
            client: *client,
            name: name.to_owned(),
            size,
        }])
        .pop()
        .unwrap_or_else(|| {
            Err(io_err("committing", &self.root)(io::Error::other(
                "empty batch",
            )))
        })
    }

    /// Commits files that finished together (group commit): each is cut to its size;
    /// then their data is made durable, they are renamed into place, and the renames
    /// (and any new client directory) are made durable. For a few files that is
    /// `fdatasync` per file and `fsync` per directory; from [`GROUP_MIN`] files on it is
    /// one `syncfs` before the renames and one after, however many files there are.
    /// Every result is durable and visible before it is returned.
    pub fn commit_batch(&self, items: Vec<CommitItem>) -> Vec<Result<Stored, StorageError>> {
        let t0 = std::time::Instant::now();
        let sizes: Vec<u64> = items.iter().map(|i| i.size).collect();
        let r = self.commit_group(items);
        let (n, bytes) = r
            .iter()
            .zip(&sizes)
            .filter(|(r, _)| r.is_ok())
            .fold((0, 0), |(n, b), (_, s)| (n + 1, b + s));
        if n > 0 {
            crate::metrics::metrics().commit(3, t0.elapsed(), n, bytes);
        }
        r
    }

    fn commit_group(&self, items: Vec<CommitItem>) -> Vec<Result<Stored, StorageError>> {
        let group = items.len() >= GROUP_MIN;
        let mut batch = self.prepare(items, !group);
        // 2. all the data at once
        if group {
            if let Err(e) = self.syncfs() {
                return batch.fail(&e);
            }
        }
        // 3. into place
        batch.rename();
        // 4. the renames (and new directories) durable
        let durable = if group {
            self.syncfs()
        } else {
            let mut dirs: Vec<&PathBuf> = batch
                .files
                .iter()
                .filter_map(|s| s.as_ref().ok().map(|x| &x.1))
                .collect();
            dirs.dedup();
            let mut r = Ok(());
            if !batch.new_dirs.is_empty() {
                r = sync_dir(&self.root);
            }
            for d in dirs {
                if r.is_ok() {
                    r = sync_dir(d);
                }
            }
            r
        };
        self.finish(batch, durable)
    }

    /// Step 1 of a commit: client directories, the stage written out, each file cut to
    /// its size, and synced one by one when `sync_each`.
    fn prepare(&self, items: Vec<CommitItem>, sync_each: bool) -> Batch {
        let mut new_dirs = Vec::new();
        let files = items
            .into_iter()
            .map(|mut it| {
                let dir = self.client_dir(&it.client);
                let known = self
                    .durable_dirs
                    .lock()
                    .map(|d| d.contains(&it.client))
                    .unwrap_or(false);
                if !known {
                    fs::create_dir_all(&dir).map_err(io_err("creating client directory", &dir))?;
                    new_dirs.push(it.client);
                }
                it.pending
                    .flush()
                    .map_err(io_err("writing", &it.pending.path))?;
                drop(it.pending.direct.take());
                let file = it.pending.file.take().expect("a pending file has its file");
                it.pending
                    .cut(&file, it.size)
                    .map_err(io_err("truncating", &it.pending.path))?;
                if sync_each {
                    file.sync_data()
                        .map_err(io_err("syncing", &it.pending.path))?;
                }
                let inode = file
                    .metadata()
                    .map_err(io_err("reading the metadata of", &it.pending.path))?
                    .ino();
                drop(file);
                let target = Stored {
                    path: dir.join(&it.name),
                    inode,
                };
                Ok((it.pending, dir, target, it.client))
            })
            .collect();
        Batch { files, new_dirs }
    }

    /// The last step: the outcome of each file, given whether its rename is durable.
    fn finish(
        &self,
        batch: Batch,
        durable: Result<(), StorageError>,
    ) -> Vec<Result<Stored, StorageError>> {
        if let Err(e) = durable {
            return batch.fail(&e);
        }
        if let Ok(mut d) = self.durable_dirs.lock() {
            d.extend(batch.new_dirs);
        }
        batch
            .files
            .into_iter()
            .map(|s| s.map(|(_, _, target, _)| target))
            .collect()
    }

    /// The committer thread's loop, a pipeline of group commits. Each file needs two
    /// syncs: one for its data before its rename, one for the rename. Files that
    /// arrived while the last sync ran are cut to size, the files whose data that
    /// sync made durable are renamed, and then one `syncfs` serves both: the new
    /// files' data and the renames. One `syncfs` per round instead of two, so twice
    /// the files per second for the same sync time, and each file still waits for
    /// two syncs before its answer.
    ///
    /// A batch of fewer than [`GROUP_MIN`] files with no other in the pipeline is
    /// committed on its own ([`commit_batch`](Self::commit_batch): `fdatasync` per
    /// file and `fsync` per directory), so a lone upload does not sync the whole
    /// file system.
    fn run_committer(&self, rx: &std::sync::mpsc::Receiver<(CommitItem, CommitReply)>) {
        // Files whose data is durable, to be renamed in the next round.
        let mut synced: Option<(Batch, Vec<CommitReply>)> = None;
        loop {
            let arrived = if synced.is_some() {
                let mut more = Vec::new();
                while let Ok(x) = rx.try_recv() {
                    more.push(x);
                }
                more
            } else {
                match crate::queue::recv_batch(rx, 1024) {
                    Some(batch) => batch,
                    None => return,
                }
            };
            let (items, replies): (Vec<_>, Vec<_>) = arrived.into_iter().unzip();
            if synced.is_none() && items.len() < GROUP_MIN {
                for (r, reply) in self.commit_batch(items).into_iter().zip(replies) {
                    let _ = reply.send(r);
                }
                continue;
            }
            let fresh = (!items.is_empty()).then(|| (self.prepare(items, false), replies));
            let renamed = synced.take().map(|(mut batch, replies)| {
                batch.rename();
                (batch, replies)
            });
            let r = self.syncfs();
            if let Some((batch, replies)) = renamed {
                let durable = r.as_ref().map(|_| ()).map_err(StorageError::duplicate);
                for (r, reply) in self.finish(batch, durable).into_iter().zip(replies) {
                    let _ = reply.send(r);
                }
            }
            match (fresh, r) {
                (Some(f), Ok(())) => synced = Some(f),
                (Some((batch, replies)), Err(e)) => {
                    for (r, reply) in batch.fail(&e).into_iter().zip(replies) {
                        let _ = reply.send(r);
                    }
                }
                (None, _) => {}
            }
        }
    }

    fn syncfs(&self) -> Result<(), StorageError> {
        let root = File::open(&self.root).map_err(io_err("opening", &self.root))?;
        nix::unistd::syncfs(root.as_raw_fd())
            .map_err(|e| io_err("syncing the file system of", &self.root)(io::Error::from(e)))
    }

    /// Starts the group-commit thread: files that finish together are committed
    /// together, see `Storage::run_committer`.
    pub fn start_committer(self: &Arc<Self>) -> Committer {
        let (tx, rx) = std::sync::mpsc::channel::<(CommitItem, CommitReply)>();
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || me.run_committer(&rx));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the committer thread");
        }
        Committer { tx }
    }
}

/// A committed file: where it is, and its inode number (for the registry row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub path: PathBuf,
    pub inode: u64,
}

/// A file to commit.
#[derive(Debug)]
pub struct CommitItem {
    pub pending: PendingFile,
    pub client: ClientId,
    pub name: String,
    pub size: u64,
}

type CommitReply = futures_channel::oneshot::Sender<Result<Stored, StorageError>>;

/// Files on their way through a commit: (temp file, client directory, final path and
/// inode, client), or why one failed; and the client directories it created.
struct Batch {
    files: Vec<Result<(PendingFile, PathBuf, Stored, ClientId), StorageError>>,
    new_dirs: Vec<ClientId>,
}

impl Batch {
    /// Step 3: every file still in the running into place.
    fn rename(&mut self) {
        for st in self.files.iter_mut() {
            if let Ok((pending, _, target, _)) = st {
                match fs::rename(&pending.path, &target.path) {
                    // Renamed: the temp path no longer exists, nothing to clean.
                    Ok(()) => pending.path = PathBuf::new(),
                    Err(e) => *st = Err(io_err("renaming to", &target.path)(e)),
                }
            }
        }
    }

    /// The same error for every file (temp files not yet renamed are removed).
    fn fail(self, e: &StorageError) -> Vec<Result<Stored, StorageError>> {
        self.files.into_iter().map(|_| Err(e.duplicate())).collect()
    }
}

/// From this many files finishing together on, a commit syncs the file system once
/// instead of each file.
pub const GROUP_MIN: usize = 3;

/// The handle of the group-commit thread; clone it freely.
#[derive(Debug, Clone)]
pub struct Committer {
    tx: std::sync::mpsc::Sender<(CommitItem, CommitReply)>,
}

impl Committer {
    /// Queues a file; the answer comes when it is durable and visible (or failed).
    pub async fn commit(&self, item: CommitItem) -> Result<Stored, StorageError> {
        let (reply, rx) = futures_channel::oneshot::channel();
        if self.tx.send((item, reply)).is_err() {
            return Err(StorageError::Io {
                what: "committing",
                path: PathBuf::new(),
                source: io::Error::other("the committer thread has stopped"),
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(StorageError::Io {
                what: "committing",
                path: PathBuf::new(),
                source: io::Error::other("the committer thread has stopped"),
            })
        })
    }
}

impl StorageError {
    /// The same error for another file of a failed group.
    fn duplicate(&self) -> StorageError {
        match self {
            StorageError::Busy { requested, limit } => StorageError::Busy {
                requested: *requested,
                limit: *limit,
            },
            StorageError::Io { what, path, source } => StorageError::Io {
                what,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::super::temp_files;
    use super::*;
    use cyberbackup_protocol::v3::session::FileSink;

    #[test]
    fn a_group_commit_stores_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), 1 << 30).unwrap();
        let items: Vec<CommitItem> = (0..5u8)
            .map(|i| {
                let mut p = s.create_pending(16).unwrap();
                p.write_at(0, &[i]).unwrap();
                CommitItem {
                    pending: p,
                    client: [i % 2; 16],
                    name: format!("f{i}"),
                    size: 1,
                }
            })
            .collect();
        let paths: Vec<PathBuf> = s
            .commit_batch(items)
            .into_iter()
            .map(|r| r.unwrap().path)
            .collect();
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(fs::read(p).unwrap(), vec![i as u8]);
        }
        assert_eq!(temp_files(dir.path()), 0);
        assert_eq!(s.pending_bytes(), 0);
    }

    #[test]
    fn the_committer_pipeline_stores_every_file() {
        /// Runs a future on this thread (the committer's answers come from its thread).
        fn block_on<F: std::future::Future>(f: F) -> F::Output {
            struct Unpark(std::thread::Thread);
            impl std::task::Wake for Unpark {
                fn wake(self: Arc<Self>) {
                    self.0.unpark();
                }
            }
            let waker = Arc::new(Unpark(std::thread::current())).into();
            let mut cx = std::task::Context::from_waker(&waker);
            let mut f = std::pin::pin!(f);
            loop {
                if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                    return v;
                }
                std::thread::park();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(Storage::open(dir.path(), 1 << 30).unwrap());
        let committer = s.start_committer();
        // 16 threads commit 20 files each, so that rounds of the pipeline overlap.
        let threads: Vec<_> = (0..16u8)
            .map(|t| {
                let (s, committer) = (s.clone(), committer.clone());
                std::thread::spawn(move || {
                    for i in 0..20u8 {
                        let body = vec![t ^ i; 100 + i as usize];
                        let len = (body.len() as u64 / 16 + 1) * 16;
                        let mut p = s.create_pending(len).unwrap();
                        let mut padded = body.clone();
                        padded.resize(len as usize, (len - body.len() as u64) as u8);
                        p.write_at(0, &padded).unwrap();
                        let item = CommitItem {
                            pending: p,
                            client: [t; 16],
                            name: format!("f{i}"),
                            size: body.len() as u64,
                        };
                        let path = block_on(committer.commit(item)).unwrap().path;
                        assert_eq!(fs::read(path).unwrap(), body);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for t in 0..16u8 {
            for i in 0..20u8 {
                let path = s.client_dir(&[t; 16]).join(format!("f{i}"));
                assert_eq!(fs::read(path).unwrap(), vec![t ^ i; 100 + i as usize]);
            }
        }
        assert_eq!(temp_files(dir.path()), 0);
        assert_eq!(s.pending_bytes(), 0);
    }
}
