//! Runs the session's operations, the same way under every runtime.
//!
//! Registry work goes to the registry thread; storage work (create, allocate and map a
//! temp file; sync, rename and sync a finished one; remove a dropped one) goes to the
//! runtime's blocking pool through [`Blocking`]. A runtime only moves bytes between its
//! sockets and the session and calls [`run_any_op`]; nothing about the protocol lives
//! in a runtime module. v4 ops are run by [`crate::v4ops`].

use std::future::Future;
use std::sync::Arc;

use cyberbackup_protocol::v3::session::{Completion, Op, OpError, OpErrorKind};

use crate::conn::{AnyCompletion, AnyOp};
use crate::metrics::metrics;
use crate::registry::{FileRecord, Registry};
use crate::storage::{CommitItem, Committer, PendingFile, Storage, StorageError};
use crate::v4ops::V4Services;

/// Runs a closure off the reactor thread.
pub trait Blocking {
    fn run<F, R>(&self, f: F) -> impl Future<Output = R>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static;
}

/// What every shard shares: the storage root, its group committer and a registry
/// handle.
#[derive(Debug, Clone)]
pub struct Services {
    pub storage: Arc<Storage>,
    pub committer: Committer,
    pub registry: Registry,
    /// Files up to this size are committed in groups by the committer thread; larger
    /// ones are synced one by one, in parallel (0: no grouping).
    pub group_commit_max_size: u64,
    /// The v4 repository.
    pub v4: V4Services,
    /// The settings of every v4 session (the server's key among them).
    pub v4_session: Arc<cyberbackup_protocol::v4::server::ServerConfig>,
}

/// Runs an op of either version; returns the completion the session waits for, if any.
pub async fn run_any_op<B: Blocking>(
    svc: &Services,
    blocking: &B,
    op: AnyOp,
) -> Option<AnyCompletion> {
    match op {
        AnyOp::V3(op) => run_op(svc, blocking, op).await.map(AnyCompletion::V3),
        AnyOp::V4(op) => Some(AnyCompletion::V4(
            crate::v4ops::run_v4_op(&svc.v4, blocking, op).await,
        )),
    }
}

/// The session's view of a storage failure: a full budget is [`OpErrorKind::Busy`],
/// anything else [`OpErrorKind::Storage`]; the message is the error's text.
fn storage_error(e: StorageError) -> OpError {
    let kind = match e {
        StorageError::Busy { .. } => OpErrorKind::Busy,
        StorageError::Io { .. } => OpErrorKind::Storage,
    };
    OpError::new(kind, e.to_string())
}

/// Runs one op; returns the completion the session waits for, if any.
pub async fn run_op<B: Blocking>(
    svc: &Services,
    blocking: &B,
    op: Op<PendingFile>,
) -> Option<Completion<PendingFile>> {
    Some(match op {
        Op::Register { client_id, name } => {
            Completion::Registered(match svc.registry.register(client_id, name).await {
                Ok(ok) => ok,
                Err(e) => {
                    // A registry failure must not look like "name taken" to the peer
                    // forever, but v3 has no better answer than 1601 here.
                    tracing::error!(error = %e, "register failed in the registry");
                    false
                }
            })
        }
        Op::StorePublicKey {
            client_id,
            name,
            public_key,
            registered_here,
        } => Completion::PublicKeyStored(
            match svc
                .registry
                .store_key(client_id, name, public_key, registered_here)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "storing a public key failed");
                    cyberbackup_protocol::v3::session::KeyStored::Refused
                }
            },
        ),
        Op::Reconnect { client_id, name } => {
            Completion::Reconnect(match svc.registry.reconnect(client_id, name).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "reconnect lookup failed");
                    cyberbackup_protocol::v3::session::ReconnectLookup {
                        by_name: None,
                        id_known: true,
                    }
                }
            })
        }
        Op::OpenFile { len, .. } => {
            let storage = svc.storage.clone();
            let r = blocking.run(move || storage.create_pending(len)).await;
            Completion::FileOpened(r.map_err(storage_error))
        }
        Op::Commit {
            client_id,
            file_name,
            sink,
            size,
            cksum,
        } => {
            let stored = if size <= svc.group_commit_max_size {
                // Small files: the committer thread groups the fsyncs of files that
                // finish together (one syncfs for many).
                svc.committer
                    .commit(CommitItem {
                        pending: sink,
                        client: client_id,
                        name: file_name.clone(),
                        size,
                    })
                    .await
            } else {
                // Large files: their own fdatasync, in parallel on the blocking pool (a
                // file-system-wide sync would wait for every other upload's data).
                let storage = svc.storage.clone();
                let name = file_name.clone();
                let t0 = std::time::Instant::now();
                let r = blocking
                    .run(move || storage.commit(sink, &client_id, &name, size))
                    .await;
                if r.is_ok() {
                    // A commit group of one (grouped ones are timed by the committer).
                    metrics().commit(3, t0.elapsed(), 1, size);
                }
                r
            };
            let r = match stored {
                Ok(stored) => svc
                    .registry
                    .file_stored(FileRecord {
                        client_id,
                        name: file_name.clone(),
                        path: stored.path.to_string_lossy().into_owned(),
                        size,
                        cksum,
                        inode: Some(stored.inode),
                    })
                    .await
                    .map_err(OpError::registry),
                Err(e) => Err(storage_error(e)),
            };
            if r.is_ok() {
                metrics().files_ingested.inc();
                metrics().ingested(3, size);
                tracing::info!(file = %file_name, size, cksum, "file stored");
            }
            Completion::Committed(r)
        }
        Op::Discard { sink } => {
            blocking.run(move || drop(sink)).await;
            return None;
        }
    })
}
