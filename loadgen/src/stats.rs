//! The collector: one thread receives every event from the clients, keeps the
//! HdrHistograms and the per-second timeline, prints the live line, and builds the
//! final report. Clients only send small events over a channel, so measuring costs
//! them almost nothing.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// What a client reports.
#[derive(Debug)]
pub enum Event {
    /// A file acknowledged: bytes, latency from the first byte sent to the 1603, and
    /// (open loop) from when it was due. `measured` when it started (or was due) in
    /// the window and finished before the window's end.
    File {
        at: Instant,
        /// Started (or due) inside the measured window.
        measured: bool,
        bytes: u64,
        latency_us: u64,
        corrected_us: Option<u64>,
    },
    /// A session established (register or reconnect), or a handshake in handshake mode.
    Handshake {
        at: Instant,
        latency_us: u64,
        corrected_us: Option<u64>,
    },
    /// A 1603 whose checksum (or size) was not ours.
    Mismatch { at: Instant, measured: bool },
    /// Anything that failed, by kind.
    Error { at: Instant, kind: &'static str },
}

impl Event {
    fn at(&self) -> Instant {
        match self {
            Event::File { at, .. }
            | Event::Handshake { at, .. }
            | Event::Mismatch { at, .. }
            | Event::Error { at, .. } => *at,
        }
    }
}

fn hist() -> Histogram<u64> {
    // 1 µs .. 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub p9999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            p9999: h.value_at_quantile(0.9999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// Seconds since the measured window began (negative during the warm-up).
    pub t: i64,
    pub files: u64,
    pub bytes: u64,
    pub handshakes: u64,
    pub errors: u64,
    pub p50_us: u64,
    pub p99_us: u64,
}

#[derive(Default)]
struct Bucket {
    files: u64,
    bytes: u64,
    handshakes: u64,
    errors: u64,
    lat: Option<Histogram<u64>>,
}

/// Everything measured in the window.
pub struct Totals {
    /// Bytes of every acknowledged file, warm-up and stragglers included.
    pub all_bytes: u64,
    pub files: u64,
    pub bytes: u64,
    pub handshakes: u64,
    pub mismatches: u64,
    pub errors: BTreeMap<&'static str, u64>,
    pub file_latency: Histogram<u64>,
    pub file_latency_uncorrected: Histogram<u64>,
    pub handshake_latency: Histogram<u64>,
    pub handshake_latency_uncorrected: Histogram<u64>,
    pub timeline: Vec<Second>,
    /// First and last event time in the window.
    pub first: Option<Instant>,
    pub last: Option<Instant>,
}

/// Runs the collector until every sender is gone. `window` is when measuring starts;
/// events before it are warm-up. `live` prints a line per second to stderr.
pub fn collect(
    rx: mpsc::Receiver<Event>,
    window: Instant,
    live: bool,
    open_loop: bool,
    unit: &'static str,
) -> Totals {
    let mut t = Totals {
        all_bytes: 0,
        files: 0,
        bytes: 0,
        handshakes: 0,
        mismatches: 0,
        errors: BTreeMap::new(),
        file_latency: hist(),
        file_latency_uncorrected: hist(),
        handshake_latency: hist(),
        handshake_latency_uncorrected: hist(),
        timeline: Vec::new(),
        first: None,
        last: None,
    };
    let mut buckets: BTreeMap<i64, Bucket> = BTreeMap::new();
    let mut printed: i64 = i64::MIN;
    let second_of = |at: Instant| -> i64 {
        if at >= window {
            (at - window).as_secs() as i64
        } else {
            -((window - at).as_secs_f64().ceil() as i64)
        }
    };
    loop {
        let ev = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => Some(ev),
            Err(mpsc::RecvTimeoutError::Timeout) => None,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if let Some(ev) = ev {
            let at = ev.at();
            let sec = second_of(at);
            let b = buckets.entry(sec).or_default();
            let measured = match &ev {
                Event::File { measured, .. } | Event::Mismatch { measured, .. } => *measured,
                _ => at >= window,
            };
            if measured {
                t.first = Some(t.first.map_or(at, |f| f.min(at)));
                t.last = Some(t.last.map_or(at, |l| l.max(at)));
            }
            match ev {
                Event::File {
                    bytes,
                    latency_us,
                    corrected_us,
                    ..
                } => {
                    b.files += 1;
                    b.bytes += bytes;
                    t.all_bytes += bytes;
                    let shown = corrected_us.unwrap_or(latency_us).max(1);
                    let _ = b.lat.get_or_insert_with(hist).record(shown);
                    if measured {
                        t.files += 1;
                        t.bytes += bytes;
                        let _ = t.file_latency.record(shown);
                        let _ = t.file_latency_uncorrected.record(latency_us.max(1));
                    }
                }
                Event::Handshake {
                    latency_us,
                    corrected_us,
                    ..
                } => {
                    b.handshakes += 1;
                    if measured {
                        t.handshakes += 1;
                        let _ = t
                            .handshake_latency
                            .record(corrected_us.unwrap_or(latency_us).max(1));
                        let _ = t.handshake_latency_uncorrected.record(latency_us.max(1));
                    }
                }
                Event::Mismatch { .. } => {
                    b.errors += 1;
                    if measured {
                        t.mismatches += 1;
                    }
                }
                Event::Error { kind, .. } => {
                    b.errors += 1;
                    if measured {
                        *t.errors.entry(kind).or_default() += 1;
                    }
                }
            }
        }
        // Print every second that is over.
        let now_sec = second_of(Instant::now());
        if live {
            let due: Vec<i64> = buckets
                .range(printed.saturating_add(1)..now_sec)
                .map(|(k, _)| *k)
                .collect();
            for s in due {
                print_live(s, &buckets[&s], open_loop, unit);
                printed = s;
            }
        }
    }
    for (s, b) in &buckets {
        let (p50, p99) = b
            .lat
            .as_ref()
            .map(|h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99)))
            .unwrap_or((0, 0));
        t.timeline.push(Second {
            t: *s,
            files: b.files,
            bytes: b.bytes,
            handshakes: b.handshakes,
            errors: b.errors,
            p50_us: p50,
            p99_us: p99,
        });
    }
    t
}

fn print_live(s: i64, b: &Bucket, open_loop: bool, unit: &str) {
    let (p50, p99) = b
        .lat
        .as_ref()
        .map(|h| (h.value_at_quantile(0.5), h.value_at_quantile(0.99)))
        .unwrap_or((0, 0));
    let tag = if s < 0 { " (warm-up)" } else { "" };
    let lat = if open_loop {
        "corrected latency"
    } else {
        "latency"
    };
    if b.files > 0 || b.handshakes == 0 {
        eprintln!(
            "[{s:>4}s] {:>8} {unit} {:>9.1} MB/s  errors {:<4} {lat} p50 {} p99 {}{tag}",
            b.files,
            b.bytes as f64 / 1e6,
            b.errors,
            fmt_us(p50),
            fmt_us(p99)
        );
    } else {
        eprintln!(
            "[{s:>4}s] {:>8} handshakes/s  errors {}{tag}",
            b.handshakes, b.errors
        );
    }
}

/// Microseconds, human-readable.
pub fn fmt_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.2}s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{us}µs")
    }
}

/// The final report.
#[derive(Debug, Serialize)]
pub struct Report {
    pub server: String,
    pub mode: crate::config::Mode,
    pub connections: usize,
    pub size: crate::config::SizeRange,
    pub packet_size: u64,
    /// TCP congestion control of the upload connections (`None`: the system's).
    pub congestion: Option<String>,
    pub schedule: String,
    pub rate_target: Option<f64>,
    pub measured_seconds: f64,
    pub files: u64,
    pub bytes: u64,
    /// Bytes of every acknowledged file of the run, warm-up and files finishing after
    /// the window included (what the server ingested, for CPU per byte).
    pub all_acked_bytes: u64,
    pub files_per_sec: f64,
    pub mb_per_sec: f64,
    pub handshakes: u64,
    pub handshakes_per_sec: f64,
    pub checksum_mismatches: u64,
    /// Errors by kind; "setup" is the clients that could not connect or register
    /// before the run (they never started).
    pub errors: BTreeMap<&'static str, u64>,
    pub error_count: u64,
    pub error_rate: f64,
    /// What the run left on the server, and how to remove it.
    pub left_on_server: String,
    /// Microseconds from the first byte sent to the 1603 received (from when the file
    /// was due, in open loop).
    pub file_latency_us: Percentiles,
    /// Open loop only: from the first byte actually sent.
    pub file_latency_uncorrected_us: Option<Percentiles>,
    pub handshake_latency_us: Percentiles,
    pub handshake_latency_uncorrected_us: Option<Percentiles>,
    pub generator_cpu_user_s: f64,
    pub generator_cpu_system_s: f64,
    pub timeline: Vec<Second>,
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        args: &crate::config::Args,
        t: &Totals,
        measured: Duration,
        cpu: (f64, f64),
        setup_failed: u64,
        user_prefix: &str,
    ) -> Report {
        let secs = measured.as_secs_f64().max(1e-9);
        let mut errors = t.errors.clone();
        if setup_failed > 0 {
            *errors.entry("setup").or_default() += setup_failed;
        }
        let error_count: u64 = errors.values().sum::<u64>() + t.mismatches;
        let users = args.connections as u64 - setup_failed;
        let done = t.files + t.handshakes_in_mode(args.mode);
        let open = args.rate.is_some();
        Report {
            server: args.server.clone(),
            mode: args.mode,
            connections: args.connections,
            size: args.size,
            packet_size: args.packet_size,
            congestion: args.congestion.clone(),
            schedule: if open {
                "open loop, constant rate".into()
            } else {
                "closed loop".into()
            },
            rate_target: args.rate,
            measured_seconds: secs,
            files: t.files,
            bytes: t.bytes,
            all_acked_bytes: t.all_bytes,
            files_per_sec: t.files as f64 / secs,
            mb_per_sec: t.bytes as f64 / 1e6 / secs,
            handshakes: t.handshakes,
            handshakes_per_sec: t.handshakes as f64 / secs,
            checksum_mismatches: t.mismatches,
            errors,
            error_count,
            left_on_server: if args.mode.is_v4() {
                format!(
                    "{users} v4 accounts named {user_prefix}-*, their snapshots forgotten at the end (the server's collection frees the chunks after its grace); the accounts stay. With the server stopped: cyberbackup-server remove-accounts --name-prefix {user_prefix}-"
                )
            } else {
                format!(
                    "{users} v3 users named {user_prefix}-*{} and their files (lg-0 .. lg-63); protocol v3 cannot delete them. With the server stopped: cyberbackup-server remove-v3-clients --name-prefix {user_prefix}-",
                    if args.register_ratio > 0.0 {
                        " (and more from --register-ratio)"
                    } else {
                        ""
                    }
                )
            },
            error_rate: if done + error_count == 0 {
                0.0
            } else {
                error_count as f64 / (done + error_count) as f64
            },
            file_latency_us: Percentiles::of(&t.file_latency),
            file_latency_uncorrected_us: open.then(|| Percentiles::of(&t.file_latency_uncorrected)),
            handshake_latency_us: Percentiles::of(&t.handshake_latency),
            handshake_latency_uncorrected_us: open
                .then(|| Percentiles::of(&t.handshake_latency_uncorrected)),
            generator_cpu_user_s: cpu.0,
            generator_cpu_system_s: cpu.1,
            timeline: t.timeline.clone(),
        }
    }

    /// The report as text.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let size = if self.size.min == self.size.max {
            format!("{} bytes", self.size.min)
        } else {
            format!("{}..{} bytes (log-uniform)", self.size.min, self.size.max)
        };
        let _ = writeln!(
            s,
            "cyberbackup-loadgen: {} | {} | {} connections | {} | {}{}",
            self.server,
            clap::ValueEnum::to_possible_value(&self.mode)
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default(),
            self.connections,
            size,
            self.schedule,
            self.rate_target
                .map(|r| format!(" at {r}/s"))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "measured      {:.2} s", self.measured_seconds);
        let upload = !self.mode.is_handshake();
        let unit = if self.mode == crate::config::Mode::V4Backup {
            "snapshots"
        } else {
            "files"
        };
        if upload {
            let _ = writeln!(
                s,
                "{unit:<13} {} ({:.1} {unit}/s)",
                self.files, self.files_per_sec
            );
            let _ = writeln!(
                s,
                "throughput    {:.1} MB/s ({} bytes)",
                self.mb_per_sec, self.bytes
            );
        }
        if !upload || self.handshakes > 0 {
            let _ = writeln!(
                s,
                "handshakes    {} ({:.1}/s)",
                self.handshakes, self.handshakes_per_sec
            );
        }
        let _ = writeln!(s, "mismatches    {}", self.checksum_mismatches);
        let _ = writeln!(
            s,
            "errors        {} ({:.4}%){}",
            self.error_count,
            self.error_rate * 100.0,
            if self.errors.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    self.errors
                        .iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
        let row = |s: &mut String, name: &str, p: &Percentiles| {
            let _ = writeln!(
                s,
                "{name:<34} p50 {:>9} p90 {:>9} p99 {:>9} p99.9 {:>9} p99.99 {:>9} max {:>9}  (n={})",
                fmt_us(p.p50),
                fmt_us(p.p90),
                fmt_us(p.p99),
                fmt_us(p.p999),
                fmt_us(p.p9999),
                fmt_us(p.max),
                p.count
            );
        };
        if !self.mode.is_handshake() {
            let name = match (self.mode, self.rate_target.is_some()) {
                (crate::config::Mode::V4Backup, false) => "snapshot latency (start -> committed)",
                (crate::config::Mode::V4Backup, true) => "snapshot latency (from due time)",
                (_, true) => "file latency (from due time)",
                (_, false) => "file latency (first byte -> 1603)",
            };
            row(&mut s, name, &self.file_latency_us);
            if let Some(p) = &self.file_latency_uncorrected_us {
                row(&mut s, "file latency (uncorrected)", p);
            }
        }
        if self.handshake_latency_us.count > 0 {
            row(&mut s, "handshake latency", &self.handshake_latency_us);
        }
        if let Some(p) = &self.handshake_latency_uncorrected_us {
            if self.mode.is_handshake() {
                row(&mut s, "handshake latency (uncorrected)", p);
            }
        }
        let _ = writeln!(
            s,
            "generator CPU user {:.2} s, system {:.2} s ({:.2} cores)",
            self.generator_cpu_user_s,
            self.generator_cpu_system_s,
            (self.generator_cpu_user_s + self.generator_cpu_system_s) / self.measured_seconds
        );
        let _ = writeln!(s, "left on server {}", self.left_on_server);
        s
    }
}

impl Totals {
    fn handshakes_in_mode(&self, mode: crate::config::Mode) -> u64 {
        if mode.is_handshake() {
            self.handshakes
        } else {
            0
        }
    }
}
