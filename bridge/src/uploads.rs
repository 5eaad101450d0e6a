//! Backups from the browser: a set of files (a folder, or files picked or dropped)
//! announced up front, their bytes sent one file per request, and one snapshot
//! committed when every file is in.
//!
//! Each file's bytes go from the request body through a bounded channel into the
//! client library, which cuts, names, compresses, encrypts and sends the chunks the
//! server does not hold: nothing is kept on the bridge's disk. A file is done when all
//! its chunks are durable on the server; its chunk list is kept (in memory) until the
//! commit. An upload interrupted by a reload, a closed tab or a dropped network stays
//! open: the page asks which files are done and sends the others, and a file that was
//! cut off midway is sent again whole, but its chunks the server already holds are not
//! sent to the server again (the library asks first).

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use cyberbackup_protocol::v4::wire::ChunkId;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// Most files in one backup.
pub const MAX_FILES: usize = 200_000;
/// Longest path of a file in a backup, in bytes.
pub const MAX_PATH: usize = 4096;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One announced file.
#[derive(Debug, Clone, Serialize)]
pub struct UpFile {
    pub path: String,
    pub size: u64,
    pub mtime_ms: i64,
    pub done: bool,
    /// A request is sending it now.
    #[serde(skip)]
    pub sending: bool,
    #[serde(skip)]
    pub chunks: Vec<ChunkId>,
}

/// Where an upload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Taking files.
    Open,
    Committing,
    Done,
    Failed,
}

/// One backup from the browser.
#[derive(Debug, Clone, Serialize)]
pub struct Upload {
    pub id: String,
    pub label: String,
    pub tag: String,
    pub created_ms: i64,
    pub state: State,
    #[serde(skip)]
    pub files: Vec<UpFile>,
    pub files_total: u64,
    pub files_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    /// Bytes of files being sent now (received so far).
    pub bytes_in_flight: u64,
    /// Chunk bytes sent to the server (new to it), and chunks it already held.
    pub bytes_sent: u64,
    pub chunks_held: u64,
    /// Files sent again after an interruption.
    pub files_resent: u64,
    pub bytes_per_sec: f64,
    pub eta_seconds: Option<u64>,
    pub snapshot: Option<String>,
    pub error: Option<String>,
    #[serde(skip)]
    started: Option<Instant>,
    /// Bytes received since `started`, for the rate.
    #[serde(skip)]
    received: u64,
}

impl Upload {
    fn refresh(&mut self) {
        self.files_done = self.files.iter().filter(|f| f.done).count() as u64;
        self.bytes_done = self.files.iter().filter(|f| f.done).map(|f| f.size).sum();
        if let Some(t) = self.started {
            let secs = t.elapsed().as_secs_f64().max(0.001);
            self.bytes_per_sec = self.received as f64 / secs;
            let left = self
                .bytes_total
                .saturating_sub(self.bytes_done + self.bytes_in_flight);
            self.eta_seconds = (self.bytes_per_sec > 0.0 && self.state == State::Open)
                .then(|| (left as f64 / self.bytes_per_sec) as u64);
        }
    }

    /// The upload with its files' paths, sizes and whether each is done (for a page
    /// that resumes it).
    pub fn with_files(&self) -> Value {
        let mut v = json!(self);
        v["files"] = json!(self.files);
        v
    }
}

/// The open and recent uploads, and the events the WebSocket forwards.
pub struct Uploads {
    map: Mutex<HashMap<String, Upload>>,
    events: broadcast::Sender<Value>,
}

impl std::fmt::Debug for Uploads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploads").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What was announced, checked.
#[derive(Debug)]
pub struct NewFile {
    pub path: String,
    pub size: u64,
    pub mtime_ms: i64,
}

impl Default for Uploads {
    fn default() -> Self {
        Uploads {
            map: Mutex::new(HashMap::new()),
            events: broadcast::channel(1024).0,
        }
    }
}

impl Uploads {
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    pub fn publish(&self, u: &Upload) {
        let _ = self.events.send(json!({"type": "backup", "backup": u}));
    }

    /// Starts an upload of `files` (checked by the caller).
    pub fn create(&self, label: String, tag: String, files: Vec<NewFile>) -> Upload {
        let mut idb = [0u8; 12];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut idb);
        let id = cyberbackup_client::v4::profile::hex(&idb);
        let files: Vec<UpFile> = files
            .into_iter()
            .map(|f| UpFile {
                path: f.path,
                size: f.size,
                mtime_ms: f.mtime_ms,
                done: false,
                sending: false,
                chunks: Vec::new(),
            })
            .collect();
        let mut u = Upload {
            id: id.clone(),
            label,
            tag,
            created_ms: now_ms(),
            state: State::Open,
            files_total: files.len() as u64,
            bytes_total: files.iter().map(|f| f.size).sum(),
            files,
            files_done: 0,
            bytes_done: 0,
            bytes_in_flight: 0,
            bytes_sent: 0,
            chunks_held: 0,
            files_resent: 0,
            bytes_per_sec: 0.0,
            eta_seconds: None,
            snapshot: None,
            error: None,
            started: None,
            received: 0,
        };
        u.refresh();
        lock(&self.map).insert(id, u.clone());
        self.publish(&u);
        u
    }

    pub fn get(&self, id: &str) -> Option<Upload> {
        let mut m = lock(&self.map);
        let u = m.get_mut(id)?;
        u.refresh();
        Some(u.clone())
    }

    /// Uploads not yet committed or dropped, newest first.
    pub fn open(&self) -> Vec<Upload> {
        let mut v: Vec<Upload> = lock(&self.map)
            .values_mut()
            .filter(|u| matches!(u.state, State::Open | State::Committing | State::Failed))
            .map(|u| {
                u.refresh();
                u.clone()
            })
            .collect();
        v.sort_by_key(|u| std::cmp::Reverse(u.created_ms));
        v
    }

    pub fn remove(&self, id: &str) -> Option<Upload> {
        lock(&self.map).remove(id)
    }

    /// Marks file `index` as being sent; the error says why it cannot be.
    pub fn begin_file(
        &self,
        id: &str,
        index: usize,
    ) -> Result<UpFile, (u16, &'static str, String)> {
        let mut m = lock(&self.map);
        let u = m
            .get_mut(id)
            .ok_or((404, "no_backup", format!("there is no backup {id}")))?;
        if u.state != State::Open {
            return Err((409, "not_open", "this backup takes no more files".into()));
        }
        let f = u.files.get_mut(index).ok_or((
            404,
            "no_file",
            format!("this backup has no file {index}"),
        ))?;
        if f.done {
            return Err((
                409,
                "already_done",
                format!("{} is already backed up", f.path),
            ));
        }
        if f.sending {
            return Err((409, "busy", format!("{} is being sent already", f.path)));
        }
        f.sending = true;
        let f = f.clone();
        if u.started.is_none() {
            u.started = Some(Instant::now());
        }
        Ok(f)
    }

    /// `n` more bytes of a file arrived.
    pub fn progress(&self, id: &str, n: u64, publish: bool) {
        let mut m = lock(&self.map);
        if let Some(u) = m.get_mut(id) {
            u.bytes_in_flight += n;
            u.received += n;
            if publish {
                u.refresh();
                let u = u.clone();
                drop(m);
                self.publish(&u);
            }
        }
    }

    /// A file's request ended: with its chunks when it is stored, else not.
    pub fn end_file(
        &self,
        id: &str,
        index: usize,
        received: u64,
        result: Result<cyberbackup_client::v4::backup::StreamUpload, String>,
    ) -> Option<Upload> {
        let mut m = lock(&self.map);
        let u = m.get_mut(id)?;
        u.bytes_in_flight = u.bytes_in_flight.saturating_sub(received);
        let f = u.files.get_mut(index)?;
        f.sending = false;
        match result {
            Ok(s) => {
                f.done = true;
                f.chunks = s.chunks;
                u.bytes_sent += s.bytes_sent;
                u.chunks_held += s.chunks_held;
            }
            Err(e) => {
                // The file is sent again whole on resume.
                u.received = u.received.saturating_sub(received);
                if received > 0 {
                    u.files_resent += 1;
                }
                tracing::info!(backup = id, file = index, error = %e, "a file did not arrive whole");
            }
        }
        u.refresh();
        let u = u.clone();
        drop(m);
        self.publish(&u);
        Some(u)
    }

    /// Moves an upload whose files are all done to Committing; returns its files.
    pub fn begin_commit(&self, id: &str) -> Result<Upload, (u16, &'static str, String)> {
        let mut m = lock(&self.map);
        let u = m
            .get_mut(id)
            .ok_or((404, "no_backup", format!("there is no backup {id}")))?;
        if !matches!(u.state, State::Open | State::Failed) {
            return Err((409, "not_open", "this backup is already committed".into()));
        }
        let missing = u.files.iter().filter(|f| !f.done).count();
        if missing > 0 {
            return Err((
                409,
                "incomplete",
                format!("{missing} files are not backed up yet: send them first"),
            ));
        }
        u.state = State::Committing;
        Ok(u.clone())
    }

    /// The commit's outcome.
    pub fn end_commit(&self, id: &str, r: Result<String, String>) -> Option<Upload> {
        let mut m = lock(&self.map);
        let u = m.get_mut(id)?;
        match r {
            Ok(snap) => {
                u.state = State::Done;
                u.snapshot = Some(snap);
                u.error = None;
            }
            Err(e) => {
                u.state = State::Failed;
                u.error = Some(e);
            }
        }
        u.refresh();
        let u = u.clone();
        drop(m);
        self.publish(&u);
        Some(u)
    }
}

/// A blocking reader over the chunks of a request body; ends with an error when the
/// body stops before `size` bytes, so that a cut-off file is never stored as whole.
pub struct BodyReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    buf: Bytes,
    got: u64,
    size: u64,
}

impl BodyReader {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Bytes>, size: u64) -> Self {
        BodyReader {
            rx,
            buf: Bytes::new(),
            got: 0,
            size,
        }
    }
}

impl Read for BodyReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => {
                    self.got += b.len() as u64;
                    if self.got > self.size {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "the body is longer than the file's announced size",
                        ));
                    }
                    self.buf = b;
                }
                None if self.got == self.size => return Ok(0),
                None => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the body stopped after {} of {} bytes", self.got, self.size),
                    ))
                }
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        Ok(n)
    }
}
