//! `cyberbackup-loadgen`: how much can a CyberBackup server take, and how fast does it
//! answer while it does. See `--help` and README.md.
//!
//! # Layout
//! - [`config`]: options and the checks that refuse impossible ones up front.
//! - [`worker`]: one virtual client of protocol v3 (a thread with its own connection).
//! - [`worker_v4`]: one virtual client of protocol v4 (its own account).
//! - [`stats`]: the collector thread, HdrHistograms, timeline and report.
//!
//! Exit codes: 0 done and the error rate within `--max-error-rate`; 1 the error rate
//! was above it; 2 bad options or set-up failure.

mod config;
mod stats;
mod worker;
mod worker_v4;

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use cyberbackup_protocol::v3::crypto::ClientKeypair;
use rand::RngCore;

use config::{Args, Mode};

fn cpu_seconds() -> (f64, f64) {
    use nix::sys::resource::{getrusage, UsageWho};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            (tv(u.user_time()), tv(u.system_time()))
        }
        Err(_) => (0.0, 0.0),
    }
}

fn main() {
    let args = Args::parse();
    match run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("cyberbackup-loadgen: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run(args: Args) -> Result<i32> {
    args.check()?;
    let live = !args.quiet;
    if live {
        if args.mode.is_v4() {
            eprintln!(
                "setting up {} v4 clients against {} (an account and a device key each)...",
                args.connections, args.server
            );
        } else {
            eprintln!(
                "setting up {} clients against {} ({} RSA keys, {} bytes of payload)...",
                args.connections, args.server, args.keys, args.size.max
            );
        }
    }
    // Key generation and payload, before anything is measured (v3 only).
    let v3_keys = if args.mode.is_v4() { 0 } else { args.keys };
    let keys: Vec<ClientKeypair> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..v3_keys)
            .map(|_| s.spawn(|| ClientKeypair::generate(&mut rand::thread_rng())))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("key generation panicked"))?
                    .map_err(anyhow::Error::from)
            })
            .collect::<Result<Vec<_>>>()
    })
    .context("generating RSA keys")?;
    let mut plain = vec![
        0u8;
        if args.mode == Mode::Upload {
            args.size.max as usize
        } else {
            0
        }
    ];
    rand::thread_rng().fill_bytes(&mut plain);
    let user_prefix = args
        .user_prefix
        .clone()
        .unwrap_or_else(|| format!("loadgen-{:08x}", rand::random::<u32>()));

    let connections = args.connections;
    let shared = Arc::new(worker::Shared {
        ready: Barrier::new(connections + 1),
        go: Barrier::new(connections + 1),
        start: OnceLock::new(),
        stop: Default::default(),
        next_slot: Default::default(),
        started: Default::default(),
        finished: Default::default(),
        setup_failed: Default::default(),
        setup_error: Default::default(),
        plain,
        keys,
        user_prefix,
        args,
    });
    let (tx, rx) = mpsc::channel();
    let mut threads = Vec::with_capacity(connections);
    for i in 0..connections {
        let (sh, tx) = (shared.clone(), tx.clone());
        threads.push(
            std::thread::Builder::new()
                .name(format!("client-{i}"))
                .stack_size(if shared.args.mode == Mode::V4Backup {
                    4 << 20
                } else {
                    256 * 1024
                })
                .spawn(move || {
                    if sh.args.mode.is_v4() {
                        worker_v4::run(i, sh, tx)
                    } else {
                        worker::run(i, sh, tx)
                    }
                })
                .context("starting a client thread")?,
        );
    }
    drop(tx);
    shared.ready.wait();
    let setup_failed = shared.setup_failed.load(Ordering::Relaxed);
    let setup_error = shared
        .setup_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    if setup_failed as usize == connections {
        // Nothing can be measured: say why, and fail (exit 2), rather than report a run
        // of no files and no errors.
        shared.stop.store(true, Ordering::Relaxed);
        let _ = shared.start.set(Instant::now());
        shared.go.wait();
        for t in threads {
            let _ = t.join();
        }
        anyhow::bail!(
            "none of the {connections} clients could set up against {}: {setup_error}",
            shared.args.server
        );
    }
    if setup_failed > 0 {
        eprintln!(
            "cyberbackup-loadgen: {setup_failed} of {connections} clients could not set up (counted as errors): {setup_error}"
        );
    }
    let start = Instant::now();
    let _ = shared.start.set(start);
    let a = &shared.args;
    let window = start + a.warmup;
    let open = a.rate.is_some();
    // What the live lines count: a v4 backup's unit is a snapshot of several files.
    let unit = if a.mode == Mode::V4Backup {
        "snapshots/s"
    } else {
        "files/s"
    };
    let collector = std::thread::spawn(move || stats::collect(rx, window, live, open, unit));
    shared.go.wait();

    // Wait out the warm-up, then measure.
    std::thread::sleep(window.saturating_duration_since(Instant::now()));
    let cpu0 = cpu_seconds();
    let measured_end = match a.files {
        None => {
            std::thread::sleep(a.duration);
            Instant::now()
        }
        Some(n) => {
            // Until n measured files are done (or every client has given up).
            while shared.finished.load(Ordering::Relaxed) < n
                && threads.iter().any(|t| !t.is_finished())
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Instant::now()
        }
    };
    // Let what was due in the window finish (at a constant rate, the backlog of a
    // server that stalled near the end), for at most the I/O timeout; what is still
    // unstarted after that is dropped and shows in the files/s.
    let drain_until = Instant::now() + a.timeout.min(Duration::from_secs(10));
    while Instant::now() < drain_until && threads.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let cpu1 = cpu_seconds();
    shared.stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let totals = collector
        .join()
        .map_err(|_| anyhow::anyhow!("the collector panicked"))?;
    let measured = match a.files {
        None => a.duration,
        Some(_) => totals
            .last
            .unwrap_or(measured_end)
            .saturating_duration_since(window),
    };
    let report = stats::Report::build(
        a,
        &totals,
        measured,
        (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1),
        setup_failed,
        &shared.user_prefix,
    );
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    if let Some(path) = &a.hdr_out {
        save_histograms(path, &totals).with_context(|| format!("writing {}", path.display()))?;
    }
    if report.error_rate > a.max_error_rate {
        eprintln!(
            "cyberbackup-loadgen: error rate {:.4}% is above --max-error-rate {:.4}%",
            report.error_rate * 100.0,
            a.max_error_rate * 100.0
        );
        return Ok(1);
    }
    Ok(0)
}

/// Writes the histograms as an HdrHistogram interval log (one interval per histogram,
/// tagged), readable by HdrHistogram's log tools.
fn save_histograms(path: &std::path::Path, t: &stats::Totals) -> Result<()> {
    use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
    use hdrhistogram::serialization::V2Serializer;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut ser = V2Serializer::new();
    let mut w = IntervalLogWriterBuilder::new()
        .add_comment("cyberbackup-loadgen latencies in microseconds")
        .with_max_value_divisor(1.0)
        .begin_log_with(&mut file, &mut ser)?;
    let span = t
        .first
        .zip(t.last)
        .map(|(f, l)| l.saturating_duration_since(f))
        .unwrap_or_default();
    for (tag, h) in [
        ("file", &t.file_latency),
        ("file-uncorrected", &t.file_latency_uncorrected),
        ("handshake", &t.handshake_latency),
        ("handshake-uncorrected", &t.handshake_latency_uncorrected),
    ] {
        w.write_histogram(h, Duration::ZERO, span, Tag::new(tag))?;
    }
    drop(w);
    use std::io::Write;
    file.flush()?;
    Ok(())
}
