//! Backup jobs: one per file. A job is created with its name and size, then its bytes
//! arrive as the body of one HTTP request and are handed, as they arrive, to the client
//! library through a bounded channel (a few chunks at most are buffered; nothing is
//! spooled to disk), which encrypts them and sends them to the backup server.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes as Chunk;
use cyberbackup_client::{
    Cancel, ClientError, ConnectOptions, Credentials, Identity, Phase, Progress, Session,
    UploadOptions,
};
use serde::Serialize;
use tokio::sync::{broadcast, mpsc};

use crate::metrics::Metrics;
use crate::store::Store;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Running,
    Done,
    Failed,
    Cancelled,
    Interrupted,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::Interrupted => "interrupted",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "pending" => Status::Pending,
            "running" => Status::Running,
            "done" => Status::Done,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            "interrupted" => Status::Interrupted,
            _ => return None,
        })
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub id: String,
    pub server: String,
    pub user: String,
    pub file: String,
    pub size: u64,
    pub status: Status,
    pub phase: String,
    pub bytes: u64,
    pub percent: f64,
    pub bytes_per_sec: f64,
    pub eta_seconds: Option<f64>,
    pub cksum: Option<u32>,
    pub error: Option<String>,
    /// Unix milliseconds.
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub duration_ms: Option<u64>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Active {
    job: Job,
    cancel: Cancel,
    content_started: bool,
}

/// The running jobs, the event stream, and what they share.
pub struct Jobs {
    active: Mutex<HashMap<String, Active>>,
    events: broadcast::Sender<Job>,
    pub store: Store,
    pub metrics: Metrics,
    /// One lock per (server, user): registration of a new user happens once.
    user_locks: Mutex<HashMap<UserKey, Arc<Mutex<()>>>>,
    pub connect: ConnectOptions,
}

/// (backup server, user name).
type UserKey = (String, String);

/// How a job's upload ended.
#[derive(Debug)]
pub struct Outcome {
    pub job: Job,
    pub error: Option<ClientError>,
}

impl Jobs {
    pub fn new(store: Store, metrics: Metrics, connect: ConnectOptions) -> Arc<Jobs> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Jobs {
            active: Mutex::new(HashMap::new()),
            events,
            store,
            metrics,
            user_locks: Mutex::new(HashMap::new()),
            connect,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Job> {
        self.events.subscribe()
    }

    fn publish(&self, job: &Job) {
        let _ = self.events.send(job.clone());
    }

    /// The running jobs, newest first.
    pub fn active(&self) -> Vec<Job> {
        let mut v: Vec<Job> = self
            .active
            .lock()
            .map(|a| a.values().map(|x| x.job.clone()).collect())
            .unwrap_or_default();
        v.sort_by_key(|j| std::cmp::Reverse(j.created_at));
        v
    }

    /// A running job, or one from the history.
    pub fn get(&self, id: &str) -> Option<Job> {
        if let Some(j) = self
            .active
            .lock()
            .ok()
            .and_then(|a| a.get(id).map(|x| x.job.clone()))
        {
            return Some(j);
        }
        self.store.job(id).ok().flatten()
    }

    /// Registers a new job waiting for its content.
    pub fn create(self: &Arc<Self>, server: String, user: String, file: String, size: u64) -> Job {
        let mut idb = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut idb);
        let id: String = idb.iter().map(|b| format!("{b:02x}")).collect();
        let job = Job {
            id: id.clone(),
            server,
            user,
            file,
            size,
            status: Status::Pending,
            phase: "waiting".into(),
            bytes: 0,
            percent: 0.0,
            bytes_per_sec: 0.0,
            eta_seconds: None,
            cksum: None,
            error: None,
            created_at: now_ms(),
            finished_at: None,
            duration_ms: None,
        };
        if let Err(e) = self.store.save_job(&job) {
            tracing::warn!(error = %e, "cannot record a job");
        }
        if let Ok(mut a) = self.active.lock() {
            a.insert(
                id.clone(),
                Active {
                    job: job.clone(),
                    cancel: Cancel::new(),
                    content_started: false,
                },
            );
        }
        self.publish(&job);
        // A job whose content never comes does not wait forever.
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(120)).await;
            let stale = me
                .active
                .lock()
                .map(|a| a.get(&id).is_some_and(|x| !x.content_started))
                .unwrap_or(false);
            if stale {
                me.finish(
                    &id,
                    Status::Failed,
                    Some("no file content arrived within 2 minutes".into()),
                    None,
                );
            }
        });
        job
    }

    /// Takes a pending job for its upload: its cancel flag, or why not.
    pub fn start(&self, id: &str) -> Result<(Job, Cancel), &'static str> {
        let mut a = self.active.lock().map_err(|_| "internal error")?;
        let x = a.get_mut(id).ok_or("no such pending job")?;
        if x.content_started || x.job.status != Status::Pending {
            return Err("this job already has its content");
        }
        x.content_started = true;
        x.job.status = Status::Running;
        x.job.phase = "connecting".into();
        let job = x.job.clone();
        let cancel = x.cancel.clone();
        drop(a);
        self.metrics.in_progress.inc();
        self.publish(&job);
        Ok((job, cancel))
    }

    /// Cancels a job; returns it.
    pub fn cancel(&self, id: &str) -> Option<Job> {
        let (pending, job) = {
            let a = self.active.lock().ok()?;
            let x = a.get(id)?;
            x.cancel.cancel();
            (!x.content_started, x.job.clone())
        };
        if pending {
            return self.finish(id, Status::Cancelled, Some("cancelled".into()), None);
        }
        Some(job)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) -> Option<Job> {
        let mut a = self.active.lock().ok()?;
        let x = a.get_mut(id)?;
        f(&mut x.job);
        Some(x.job.clone())
    }

    /// Ends a job: out of the active set, into the history, announced.
    pub fn finish(
        &self,
        id: &str,
        status: Status,
        error: Option<String>,
        cksum: Option<u32>,
    ) -> Option<Job> {
        let x = self.active.lock().ok()?.remove(id)?;
        let mut job = x.job;
        let now = now_ms();
        job.status = status;
        job.error = error;
        job.cksum = cksum.or(job.cksum);
        job.finished_at = Some(now);
        job.duration_ms = Some(now.saturating_sub(job.created_at));
        job.eta_seconds = None;
        if status == Status::Done {
            job.phase = "done".into();
            job.bytes = job.size;
            job.percent = 100.0;
        }
        if let Err(e) = self.store.save_job(&job) {
            tracing::warn!(error = %e, "cannot record a finished job");
        }
        self.publish(&job);
        Some(job)
    }

    fn user_lock(&self, server: &str, user: &str) -> Arc<Mutex<()>> {
        let mut m = match self.user_locks.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry((server.to_owned(), user.to_owned()))
            .or_default()
            .clone()
    }

    /// Runs a started job's upload (blocking: call from a blocking thread). `rx` gives
    /// the file's bytes as they arrive.
    pub fn run_upload(&self, job: &Job, cancel: Cancel, rx: mpsc::Receiver<Chunk>) -> Outcome {
        let started = Instant::now();
        let result = self.upload(job, cancel.clone(), rx);
        let (status, error, cksum) = match &result {
            Ok(s) => (Status::Done, None, Some(s.cksum)),
            Err(ClientError::Cancelled) => (Status::Cancelled, Some("cancelled".to_string()), None),
            Err(e) => (Status::Failed, Some(e.report()), None),
        };
        self.metrics.in_progress.dec();
        self.metrics.finished(status, job.size, started.elapsed());
        let job = self
            .finish(&job.id, status, error, cksum)
            .unwrap_or_else(|| job.clone());
        Outcome {
            job,
            error: result.err(),
        }
    }

    fn upload(
        &self,
        job: &Job,
        cancel: Cancel,
        rx: mpsc::Receiver<Chunk>,
    ) -> Result<cyberbackup_client::UploadSummary, ClientError> {
        let mut session = {
            let lock = self.user_lock(&job.server, &job.user);
            let _held = lock.lock().unwrap_or_else(|p| p.into_inner());
            let saved = self
                .store
                .identity(&job.server, &job.user)
                .ok()
                .flatten()
                .and_then(|text| Identity::parse(&text, "bridge.db".as_ref()).ok());
            let creds = match saved {
                Some(i) => Credentials::Existing(Box::new(i)),
                None => Credentials::New(job.user.clone()),
            };
            // A new identity is kept as soon as the server assigns its id.
            let (session, _) =
                Session::open_saving(&job.server, creds, &self.connect, &mut |identity| {
                    if let Err(e) =
                        self.store
                            .save_identity(&job.server, &job.user, &identity.to_text())
                    {
                        tracing::warn!(error = %e, "cannot save an identity");
                    }
                    Ok(())
                })?;
            session
        };
        let mut reader = Some(ChannelReader {
            rx,
            chunk: Chunk::new(),
        });
        let opts = UploadOptions {
            cancel,
            ..UploadOptions::default()
        };
        let mut last = Instant::now() - Duration::from_secs(1);
        let id = job.id.clone();
        let mut on_progress = |p: &Progress<'_>| {
            let final_phase = matches!(
                p.phase,
                Phase::Verifying | Phase::Done | Phase::Retrying | Phase::Reconnecting
            );
            if !final_phase && last.elapsed() < Duration::from_millis(100) {
                return;
            }
            last = Instant::now();
            let phase = match p.phase {
                Phase::Sending => "sending",
                Phase::Verifying => "verifying",
                Phase::Retrying => "retrying",
                Phase::Reconnecting => "reconnecting",
                Phase::Done => "done",
            };
            if let Some(j) = self.update(&id, |j| {
                j.phase = phase.into();
                j.bytes = p.bytes;
                j.percent = if p.total == 0 {
                    100.0
                } else {
                    p.bytes as f64 * 100.0 / p.total as f64
                };
                j.bytes_per_sec = p.bytes_per_sec;
                j.eta_seconds =
                    (p.bytes_per_sec > 0.0).then(|| (p.total - p.bytes) as f64 / p.bytes_per_sec);
            }) {
                self.publish(&j);
            }
        };
        session.upload(
            &job.file,
            job.size,
            || {
                reader.take().ok_or_else(|| {
                    std::io::Error::other(
                        "the file was streamed from the browser and cannot be sent a second time",
                    )
                })
            },
            &opts,
            &mut on_progress,
        )
    }
}

/// The file's bytes as a `Read`, from the channel the HTTP body feeds.
struct ChannelReader {
    rx: mpsc::Receiver<Chunk>,
    chunk: Chunk,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.chunk = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}
