//! One virtual client of protocol v4: its account, its connection, and its loop of
//! snapshots (`--mode v4-backup`) or handshakes (`--mode v4-handshake`).
//!
//! Set-up, before the window: a device key and an account of its own
//! (`<prefix>-<index>`, created by the login itself), and a repository key made in
//! memory (never stored on the server: the run needs no passphrase). Each snapshot
//! backs up `--files-per-snapshot` files of `--size` bytes from memory through the
//! client library's whole pipeline (chunk, hash, ask, compress, encrypt, send, commit).
//! Their content is new for every snapshot unless `--dedup`, when every snapshot after
//! the first holds what the server has already: the cost of an unchanged backup. A
//! handshake is a connection, the Noise handshake and the login, then a close.
//!
//! At the end each client forgets its snapshots, so that the server's next collection
//! frees their chunks; the accounts stay (see the report's `left_on_server`, which
//! names the command that removes them: `cyberbackup-server remove-accounts`).

use std::io::Cursor;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use cyberbackup_client::v4::backup::{self, BackupOptions, BackupProgress, NamedStream};
use cyberbackup_client::v4::conn::{ConnError, ConnectOptions, Connection};
use cyberbackup_protocol::v4::format::RepoKey;
use cyberbackup_protocol::v4::noise::StaticKey;
use cyberbackup_protocol::v4::wire::{Answer, Login, LoginMode, Request};
use rand::{RngCore, SeedableRng};

use crate::config::Mode;
use crate::stats::Event;
use crate::worker::Shared;

fn kind(e: &ConnError) -> &'static str {
    match e {
        ConnError::Connect { .. } | ConnError::BadAddress(_) => "connect",
        ConnError::Server(_) => "server error",
        ConnError::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
            ) =>
        {
            "timeout"
        }
        ConnError::Io(_) | ConnError::Closed => "connection lost",
        _ => "protocol",
    }
}

fn connect(
    server: &str,
    device: &StaticKey,
    login: Login,
    opts: &ConnectOptions,
) -> Result<Connection, ConnError> {
    // The generator trusts whatever key the server shows (it pins nothing).
    let mut any = |_: &[u8; 32]| Ok(());
    Connection::connect(server, device, login, &mut any, opts)
}

fn device_login() -> Login {
    Login {
        mode: LoginMode::Device,
        account: String::new(),
        device: String::new(),
        code: String::new(),
    }
}

/// Fills `buf` with bytes that depend on `seed` (fast: the generator must not be what
/// is measured).
fn fill(buf: &mut [u8], seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    rng.fill_bytes(buf);
}

/// Runs client `idx` until the run stops.
pub fn run(idx: usize, sh: Arc<Shared>, tx: mpsc::Sender<Event>) {
    let a = &sh.args;
    let opts = ConnectOptions {
        connect_timeout: a.io_timeout(),
        io_timeout: a.io_timeout(),
    };
    let name = format!("{}-{idx}", sh.user_prefix);
    let set_up = (|| {
        let device = StaticKey::generate().map_err(|e| e.to_string())?;
        let conn = connect(
            &a.server,
            &device,
            Login {
                mode: LoginMode::Create,
                account: name.clone(),
                device: "loadgen".into(),
                code: String::new(),
            },
            &opts,
        )
        .map_err(|e| format!("{e} ({})", kind(&e)))?;
        Ok::<_, String>((device, conn))
    })();
    let (device, mut conn) = match set_up {
        Ok((d, c)) => (Some(d), Some(c)),
        Err(e) => {
            sh.setup_failed.fetch_add(1, Ordering::Relaxed);
            let mut first = sh.setup_error.lock().unwrap_or_else(|p| p.into_inner());
            if first.is_none() {
                *first = Some(e);
            }
            (None, None)
        }
    };
    if a.mode == Mode::V4Handshake {
        conn = None; // each handshake opens its own connection
    }
    let key = RepoKey::generate(&mut rand::thread_rng());
    let files = a.files_per_snapshot.max(1) as usize;
    let size = a.size.max as usize;
    let mut bufs: Vec<Vec<u8>> = if a.mode == Mode::V4Backup && device.is_some() {
        vec![vec![0u8; size]; files]
    } else {
        Vec::new()
    };
    let bopts = BackupOptions {
        host: "loadgen".into(),
        workers: 1,
        compress: false,
        ..BackupOptions::default()
    };
    sh.ready.wait();
    sh.go.wait();
    let Some(device) = device else { return };
    let mut n = 0u64;
    while !sh.stop.load(Ordering::Relaxed) {
        let Some(slot) = sh.next_slot() else { break };
        let corrected = |now: Instant| slot.corrected(now);
        if a.mode == Mode::V4Handshake {
            let r = connect(&a.server, &device, device_login(), &opts);
            slot.handshake_done(&tx, r.map(drop).map_err(|e| kind(&e)));
            sh.finished(&slot);
            continue;
        }

        // A snapshot: new content unless --dedup (then the first snapshot's again).
        if n == 0 || !a.dedup {
            for (i, b) in bufs.iter_mut().enumerate() {
                fill(b, (idx as u64) << 40 ^ n << 20 ^ i as u64);
            }
        }
        n += 1;
        if conn.as_ref().is_none_or(Connection::is_failed) {
            match connect(&a.server, &device, device_login(), &opts) {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    let _ = tx.send(Event::Error {
                        at: Instant::now(),
                        kind: kind(&e),
                    });
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        let streams: Vec<NamedStream<'_>> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| NamedStream {
                path: format!("f{i}"),
                mtime_ns: 0,
                mode: 0o644,
                reader: Box::new(Cursor::new(&b[..])),
            })
            .collect();
        let named = vec![b"loadgen".to_vec()];
        let t0 = Instant::now();
        let r = backup::backup_streams(c, &key, streams, named, &bopts, &BackupProgress::default());
        let done = Instant::now();
        let measured = sh.counts(&slot, done);
        match r {
            Ok(s) => {
                let _ = tx.send(Event::File {
                    at: done,
                    measured,
                    bytes: s.size,
                    latency_us: (done - t0).as_micros() as u64,
                    corrected_us: corrected(done),
                });
            }
            Err(e) => {
                let _ = tx.send(Event::Error {
                    at: done,
                    kind: match &e {
                        backup::BackupError::Conn(c) => kind(c),
                        _ => "backup",
                    },
                });
                conn = None;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        sh.finished(&slot);
    }
    // Clean up: forget this client's snapshots (the server collects their chunks).
    if let Some(c) = conn.filter(|c| !c.is_failed()) {
        if let Ok(Answer::SnapshotList(list)) = c.call(&Request::ListSnapshots) {
            for s in list {
                let _ = c.call(&Request::ForgetSnapshot(s.header.id));
            }
        }
    }
}
