//! Runs the v4 session's ops against the repository ([`crate::repo::Repo`]), the same
//! way under every runtime: chunk puts and snapshot commits go to the repository's
//! group committer (awaited, so they hold no thread), everything else is a short
//! registry or blob read on the runtime's blocking pool. Repository errors become the
//! reason codes of `docs/PROTOCOL-V4.md` §6 here, and only here.

use std::sync::Arc;

use cyberbackup_protocol::v4::server::{Completion, Op, Principal};
use cyberbackup_protocol::v4::wire::{
    Answer, DeviceInfo, ErrorAnswer, ErrorCode, LoginMode, Request, SnapshotHeader, SnapshotInfo,
    Usage, Welcome,
};
use cyberbackup_protocol::v4::Capabilities;

use crate::legacy::{LegacyError, LegacyStore};
use crate::ops::Blocking;
use crate::repo::{self, CommitOutcome, Repo, RepoError};

/// What v4 ops need.
#[derive(Clone)]
pub struct V4Services {
    pub repo: Arc<Repo>,
    /// Whether a client may create an account (login mode 2).
    pub registration: bool,
    /// The v3 store, read by connections that proved a v3 identity.
    pub legacy: Arc<LegacyStore>,
    /// What PRUNE keeps: chunks stored or asked about this recently.
    pub gc_grace: std::time::Duration,
}

impl std::fmt::Debug for V4Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("V4Services")
            .field("registration", &self.registration)
            .finish_non_exhaustive()
    }
}

/// The answer for a repository error. Refusals are logged at info (the connection's
/// span names the account), failures at error.
pub fn answer_for(e: &RepoError) -> ErrorAnswer {
    let a = answer_inner(e);
    if a.code != ErrorCode::INTERNAL {
        tracing::info!(code = a.code.0, reason = %a.message, "refused");
    }
    a
}

fn answer_inner(e: &RepoError) -> ErrorAnswer {
    match e {
        RepoError::Forbidden { .. } => ErrorAnswer::new(ErrorCode::FORBIDDEN, e.to_string()),
        RepoError::NameTaken => {
            ErrorAnswer::new(ErrorCode::NAME_TAKEN, "an account with this name exists")
        }
        RepoError::KeyTaken => ErrorAnswer::new(
            ErrorCode::NAME_TAKEN,
            "this device key already belongs to an account: log in instead",
        ),
        RepoError::InvalidArgument(m) => ErrorAnswer::new(ErrorCode::BAD_REQUEST, m.clone()),
        RepoError::QuotaExceeded { .. } => {
            ErrorAnswer::new(ErrorCode::QUOTA_EXCEEDED, e.to_string())
        }
        RepoError::DiskFull { .. } => ErrorAnswer::new(
            ErrorCode::STORAGE_FULL,
            "the server's disk is full; nothing stored was harmed",
        ),
        RepoError::MissingChunks(ids) => ErrorAnswer::missing_chunks(ids),
        RepoError::SnapshotExists => ErrorAnswer::new(
            ErrorCode::SNAPSHOT_EXISTS,
            "a different snapshot with this id exists; snapshots are never replaced",
        ),
        RepoError::Stopped => ErrorAnswer::new(ErrorCode::SHUTTING_DOWN, "the server is stopping"),
        other => {
            tracing::error!(error = %other, "repository operation failed");
            ErrorAnswer::new(
                ErrorCode::INTERNAL,
                "the server failed; nothing was acknowledged; try again later",
            )
        }
    }
}

fn header_to_repo(h: &SnapshotHeader, body_len: u64) -> repo::SnapshotHeader {
    repo::SnapshotHeader {
        id: h.id,
        time_unix_ms: h.time_ms,
        host: h.host.clone(),
        tags: h.tags.clone(),
        paths: Vec::new(),
        files: h.files,
        dirs: h.dirs,
        size: h.size,
        device: 0,
        body_len,
        stored: h.stored,
        committed_ms: 0,
    }
}

fn info_from_repo(h: &repo::SnapshotHeader) -> SnapshotInfo {
    SnapshotInfo {
        header: SnapshotHeader {
            id: h.id,
            time_ms: h.time_unix_ms,
            files: h.files,
            dirs: h.dirs,
            size: h.size,
            stored: h.stored,
            host: h.host.clone(),
            tags: h.tags.clone(),
        },
        device: h.device as u64,
        committed_ms: h.committed_ms.max(0) as u64,
    }
}

/// Runs one v4 op.
pub async fn run_v4_op<B: Blocking>(svc: &V4Services, blocking: &B, op: Op) -> Completion {
    match op {
        Op::Login { device_key, login } => {
            let repo = svc.repo.clone();
            let registration = svc.registration;
            let r = blocking
                .run(move || login_blocking(&repo, registration, device_key, login))
                .await;
            if let Err(e) = &r {
                tracing::info!(code = e.code.0, reason = %e.message, "login refused");
            }
            Completion::LoggedIn(r)
        }
        Op::Request {
            request_id,
            principal,
            request,
        } => {
            let answer = match request_answer(svc, blocking, principal, request).await {
                Ok(a) => a,
                Err(e) => Answer::Error(answer_for(&e)),
            };
            Completion::Answered { request_id, answer }
        }
    }
}

fn login_blocking(
    repo: &Repo,
    registration: bool,
    key: [u8; 32],
    login: cyberbackup_protocol::v4::wire::Login,
) -> Result<Welcome, ErrorAnswer> {
    match login.mode {
        LoginMode::Create => {
            if !registration {
                return Err(ErrorAnswer::new(
                    ErrorCode::REGISTRATION_CLOSED,
                    "this server does not create accounts",
                ));
            }
            let (account, device) = repo
                .create_account(&login.account, &key, &login.device)
                .map_err(|e| answer_for(&e))?;
            tracing::info!(account_name = %login.account, account_id = account, device, "account created");
            Ok(Welcome {
                account_id: account as u64,
                device_id: device as u64,
                capabilities: Capabilities::ALL.0,
                account: login.account,
            })
        }
        LoginMode::Enrol => {
            let d = repo
                .redeem_enrolment(&login.code, &key, &login.device)
                .map_err(|e| answer_for(&e))?
                .ok_or_else(|| {
                    ErrorAnswer::new(
                        ErrorCode::BAD_CODE,
                        "the enrolment code is unknown, used or expired: ask for a new one",
                    )
                })?;
            let name = repo
                .account_name(d.account)
                .ok()
                .flatten()
                .unwrap_or_default();
            tracing::info!(account_id = d.account, device = d.id, "device enrolled");
            Ok(Welcome {
                account_id: d.account as u64,
                device_id: d.id as u64,
                capabilities: d.caps.0,
                account: name,
            })
        }
        LoginMode::Device => {
            let d = repo
                .device_by_key(&key)
                .map_err(|e| answer_for(&e))?
                .ok_or_else(|| {
                    ErrorAnswer::new(
                        ErrorCode::UNKNOWN_DEVICE,
                        "no account knows this device key: run init, or enrol this device",
                    )
                })?;
            if d.revoked() {
                return Err(ErrorAnswer::new(
                    ErrorCode::DEVICE_REVOKED,
                    "this device was revoked",
                ));
            }
            let name = repo
                .account_name(d.account)
                .ok()
                .flatten()
                .unwrap_or_default();
            Ok(Welcome {
                account_id: d.account as u64,
                device_id: d.id as u64,
                capabilities: d.caps.0,
                account: name,
            })
        }
    }
}

async fn request_answer<B: Blocking>(
    svc: &V4Services,
    blocking: &B,
    p: Principal,
    request: Request,
) -> Result<Answer, RepoError> {
    let account = p.account_id as i64;
    let repo = svc.repo.clone();
    Ok(match request {
        Request::PutChunk { id, blob } => {
            repo.put_chunk(account, id, blob).await?;
            Answer::ChunkStored { already: false }
        }
        Request::CommitSnapshot { header, refs, root } => {
            let h = header_to_repo(&header, root.len() as u64);
            match repo
                .commit_snapshot(account, p.device_id as i64, h, refs, root)
                .await?
            {
                CommitOutcome::Committed => {
                    tracing::info!(
                        account_id = account,
                        files = header.files,
                        size = header.size,
                        "snapshot committed"
                    );
                    Answer::SnapshotCommitted { already: false }
                }
                CommitOutcome::AlreadyCommitted => Answer::SnapshotCommitted { already: true },
            }
        }
        Request::LegacyLogin {
            client_id,
            signature,
        } => {
            let legacy = svc.legacy.clone();
            let hh = p.handshake_hash;
            let found = blocking
                .run(move || -> Result<_, LegacyError> {
                    let acct = legacy.account(&client_id)?;
                    Ok(acct.filter(|a| {
                        cyberbackup_protocol::v4::legacy::verify(
                            &a.public_key,
                            &hh,
                            &client_id,
                            &signature,
                        )
                    }))
                })
                .await;
            match found {
                Ok(Some(a)) => {
                    tracing::info!(account_id = account, legacy = %a.name, "v3 identity proven");
                    Answer::LegacyAccount {
                        name: a.name,
                        files: a.files,
                        bytes: a.bytes,
                    }
                }
                Ok(None) => Answer::Error(ErrorAnswer::new(
                    ErrorCode::FORBIDDEN,
                    "no v3 client on this server matches this id and key",
                )),
                Err(e) => legacy_failed(e),
            }
        }
        Request::LegacyList { after } => {
            let (legacy, Some(id)) = (svc.legacy.clone(), p.legacy) else {
                return Ok(not_proven());
            };
            match blocking.run(move || legacy.list(&id, &after)).await {
                Ok((files, more)) => Answer::LegacyFiles { files, more },
                Err(e) => legacy_failed(e),
            }
        }
        Request::LegacyRead { name, offset, max } => {
            let (legacy, Some(id)) = (svc.legacy.clone(), p.legacy) else {
                return Ok(not_proven());
            };
            match blocking
                .run(move || legacy.read(&id, &name, offset, max))
                .await
            {
                Ok(Some(b)) => {
                    crate::metrics::metrics().served(3, b.len() as u64);
                    Answer::LegacyData(b)
                }
                Ok(None) => Answer::Error(ErrorAnswer::new(
                    ErrorCode::NOT_FOUND,
                    "this v3 client has no stored file of that name",
                )),
                Err(e) => legacy_failed(e),
            }
        }
        Request::Prune => {
            let grace = svc.gc_grace;
            let r = blocking
                .run(move || {
                    repo.collect_garbage(repo::Scope::Account(account), grace, repo::now_unix_ms())
                })
                .await?;
            tracing::info!(
                account,
                chunks = r.chunks_deleted,
                bytes = r.bytes_freed,
                "prune asked by a device"
            );
            Answer::Pruned {
                chunks: r.chunks_deleted,
                bytes: r.bytes_freed,
                grace_s: grace.as_secs(),
            }
        }
        other => {
            let device = p.device_id as i64;
            blocking
                .run(move || blocking_answer(&repo, account, device, other))
                .await?
        }
    })
}

fn not_proven() -> Answer {
    Answer::Error(ErrorAnswer::new(
        ErrorCode::FORBIDDEN,
        "prove a v3 identity first (LEGACY_LOGIN)",
    ))
}

fn legacy_failed(e: LegacyError) -> Answer {
    tracing::error!(error = %e, "reading the v3 store failed");
    Answer::Error(ErrorAnswer::new(
        ErrorCode::INTERNAL,
        "the server failed to read its v3 store; try again later",
    ))
}

fn not_found(what: &str) -> Answer {
    Answer::Error(ErrorAnswer::new(
        ErrorCode::NOT_FOUND,
        format!("no such {what} in this account"),
    ))
}

fn blocking_answer(
    repo: &Repo,
    account: i64,
    device: i64,
    request: Request,
) -> Result<Answer, RepoError> {
    Ok(match request {
        Request::HasChunks(ids) => {
            let held = repo.chunks_held(account, &ids)?;
            let n = held.iter().filter(|h| **h).count();
            crate::metrics::metrics()
                .chunks_deduplicated
                .inc_by(n as u64);
            Answer::ChunksHeld(held)
        }
        Request::GetChunk(id) => match repo.get_chunk(account, &id)? {
            Some(b) => {
                let m = crate::metrics::metrics();
                m.chunks_served.inc();
                m.served(4, b.len() as u64);
                Answer::Chunk(b)
            }
            None => not_found("chunk"),
        },
        Request::ListSnapshots => {
            let list = repo.list_snapshots(account)?;
            Answer::SnapshotList(list.iter().map(info_from_repo).collect())
        }
        Request::GetSnapshot(id) => {
            let Some(s) = repo.get_snapshot(account, &id)? else {
                return Ok(not_found("snapshot"));
            };
            let Some(root) = repo.get_snapshot_body(account, &id)? else {
                return Ok(not_found("snapshot"));
            };
            crate::metrics::metrics().served(4, root.len() as u64);
            Answer::Snapshot {
                info: info_from_repo(&s.header),
                root,
            }
        }
        Request::ForgetSnapshot(id) => {
            if repo.forget_snapshot(account, &id)? {
                tracing::info!(account_id = account, "snapshot forgotten");
                Answer::Forgotten
            } else {
                not_found("snapshot")
            }
        }
        Request::Usage => {
            let u = repo.usage(account)?;
            Answer::UsageInfo(Usage {
                chunks: u.chunks,
                stored_bytes: u.stored_bytes,
                snapshots: u.snapshots,
                quota: u.quota.unwrap_or(0),
            })
        }
        Request::PutKey(k) => {
            repo.set_wrapped_key(account, &k)?;
            Answer::KeyStored
        }
        Request::GetKey => match repo.wrapped_key(account)? {
            Some(k) => Answer::Key(k),
            None => not_found("repository key"),
        },
        Request::DeviceAdd {
            capabilities,
            name,
            ttl_s,
        } => {
            let caps = Capabilities::from_bits_truncate(capabilities);
            if caps == Capabilities::NONE {
                return Ok(Answer::Error(ErrorAnswer::new(
                    ErrorCode::BAD_REQUEST,
                    "a device needs at least one capability",
                )));
            }
            let (code, expires) =
                repo.new_enrolment(account, caps, std::time::Duration::from_secs(ttl_s as u64))?;
            tracing::info!(account_id = account, caps = %caps.names(), device_name = %name, "enrolment code issued");
            Answer::Enrolment {
                code,
                expires_ms: expires.max(0) as u64,
            }
        }
        Request::ListDevices => Answer::DeviceList(
            repo.list_devices(account)?
                .into_iter()
                .map(|d| DeviceInfo {
                    id: d.id as u64,
                    capabilities: d.caps.0,
                    created_ms: d.created_ms.max(0) as u64,
                    revoked_ms: d.revoked_ms.unwrap_or(0).max(0) as u64,
                    this: d.id == device,
                    name: d.name,
                })
                .collect(),
        ),
        Request::RevokeDevice(id) => {
            if id as i64 == device {
                return Ok(Answer::Error(ErrorAnswer::new(
                    ErrorCode::BAD_REQUEST,
                    "a device cannot revoke itself: revoke it from another device",
                )));
            }
            if repo.revoke_device(account, id as i64)? {
                tracing::info!(account_id = account, device = id, "device revoked");
                Answer::DeviceRevoked
            } else {
                not_found("device")
            }
        }
        // Handled above.
        Request::PutChunk { .. }
        | Request::CommitSnapshot { .. }
        | Request::LegacyLogin { .. }
        | Request::LegacyList { .. }
        | Request::LegacyRead { .. }
        | Request::Prune => {
            Answer::Error(ErrorAnswer::new(ErrorCode::INTERNAL, "misrouted request"))
        }
    })
}
