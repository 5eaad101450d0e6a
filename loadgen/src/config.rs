//! Command-line options, and the checks that refuse impossible ones before any load
//! starts.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use cyberbackup_client::upload::MAX_FILE_SIZE;

/// What each virtual client does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Upload files back to back (each: packets, 1603, CRC_OK, ACK).
    Upload,
    /// Connect, RECONNECT, disconnect: connection-rate tests.
    Handshake,
    /// Protocol v4: snapshots of --files-per-snapshot files of --size bytes each, back
    /// to back, through the client library's whole backup pipeline (new content each
    /// time, or the same with --dedup).
    #[value(name = "v4-backup")]
    #[serde(rename = "v4-backup")]
    V4Backup,
    /// Protocol v4: connect, Noise handshake, login, close.
    #[value(name = "v4-handshake")]
    #[serde(rename = "v4-handshake")]
    V4Handshake,
}

impl Mode {
    /// A mode whose unit of work is a handshake.
    pub fn is_handshake(self) -> bool {
        matches!(self, Mode::Handshake | Mode::V4Handshake)
    }

    pub fn is_v4(self) -> bool {
        matches!(self, Mode::V4Backup | Mode::V4Handshake)
    }
}

/// Load generator for CyberBackup servers (protocols v3 and v4).
///
/// Virtual clients register (before the measured window, with a pool of RSA keys made
/// once) and then upload files back to back over their own connections; in the v4
/// modes each client creates an account and takes snapshots (or handshakes). Closed loop by
/// default (each client starts its next file when the last one is acknowledged); with
/// --rate, an open loop at a constant rate whose latencies are measured from when each
/// file was due (coordinated omission corrected, as wrk2 does).
#[derive(Debug, Parser)]
#[command(name = "cyberbackup-loadgen", version, about, long_about)]
pub struct Args {
    /// Server address.
    #[arg(short, long, default_value = "127.0.0.1:1256")]
    pub server: String,
    /// Virtual clients, one connection each.
    #[arg(short, long, default_value_t = 16)]
    pub connections: usize,
    /// File size, fixed ("4KiB", "1MiB", "1000") or a range ("4KiB..16MiB", log-uniform).
    #[arg(long, default_value = "64KiB", value_parser = parse_size_range)]
    pub size: SizeRange,
    /// Packet size.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    pub packet_size: u64,
    /// What the clients do.
    #[arg(long, value_enum, default_value_t = Mode::Upload)]
    pub mode: Mode,
    /// Open loop: this many files (or handshakes) per second in all, at a constant rate.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured time after the warm-up: "10s", "500ms", "2m", "1h", or seconds ("10").
    #[arg(short, long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop after this many measured files (or handshakes) instead of after --duration.
    #[arg(short = 'n', long)]
    pub files: Option<u64>,
    /// Load before the measured window, excluded from the results ("1s", "0", ...).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Share of new sessions (after --files-per-session) that register a new user
    /// instead of reconnecting, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub register_ratio: f64,
    /// Files per session before the client disconnects and starts a new session
    /// (0: one session for the whole run).
    #[arg(long, default_value_t = 0)]
    pub files_per_session: u64,
    /// RSA key pairs generated before the run and shared by the clients.
    #[arg(long, default_value_t = 4)]
    pub keys: usize,
    /// How long to wait for the server on any connect, read or write ("30s", ...).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Exit with status 1 when errors / (files + errors) is above this.
    #[arg(long, default_value_t = 0.0)]
    pub max_error_rate: f64,
    /// Print the whole report as JSON on standard output (with a per-second timeline).
    #[arg(long)]
    pub json: bool,
    /// Save the histograms in HdrHistogram interval-log format to this file.
    #[arg(long)]
    pub hdr_out: Option<std::path::PathBuf>,
    /// No live line each second.
    #[arg(short, long)]
    pub quiet: bool,
    /// Prefix of the user (v3) or account (v4) names the clients register.
    #[arg(long)]
    pub user_prefix: Option<String>,
    /// v4-backup: files in each snapshot (each of --size bytes).
    #[arg(long, default_value_t = 1)]
    pub files_per_snapshot: u64,
    /// v4-backup: every snapshot holds the same content as the client's first (the
    /// deduplicated path: chunks the server holds are not sent again).
    #[arg(long)]
    pub dedup: bool,
    /// TCP congestion control of the upload connections (e.g. "cubic"; default: the
    /// system's). On 127.0.0.1 a pacing algorithm such as BBR sends the generator's
    /// data from kernel timers that fire on whichever CPU armed them, often the
    /// server's, which is then billed for the generator's transmissions; a server with
    /// remote clients never pays that.
    #[arg(long, value_name = "NAME")]
    pub congestion: Option<String>,
}

/// A fixed size or a log-uniform range, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SizeRange {
    pub min: u64,
    pub max: u64,
}

/// "1.5MiB" as (1.5, "MiB"); `what` names the kind of value in the error.
fn number_and_unit<'a>(s: &'a str, what: &str) -> Result<(f64, &'a str), String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n = num.parse().map_err(|_| format!("{s:?} is not a {what}"))?;
    Ok((n, unit.trim()))
}

/// Parses "4096", "4KiB", "4KB", "1.5MiB", "16M".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (n, unit) = number_and_unit(s, "size (e.g. 4096, 4KiB, 16MiB)")?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        u => return Err(format!("unknown size unit {u:?} in {s:?}")),
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v.round() as u64)
}

/// Parses "10s", "500ms", "1.5s", "2m", "1h", "100us", or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = number_and_unit(s, "duration (e.g. 10s, 500ms, 2m, 1h)")?;
    let secs = match unit {
        "" | "s" | "sec" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "unknown duration unit {u:?} in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is out of range"))
}

/// Parses a size or "MIN..MAX".
pub fn parse_size_range(s: &str) -> Result<SizeRange, String> {
    match s.split_once("..") {
        Some((a, b)) => {
            let (min, max) = (parse_size(a)?, parse_size(b)?);
            if min > max {
                return Err(format!(
                    "size range {s:?} is reversed (the first bound is larger)"
                ));
            }
            Ok(SizeRange { min, max })
        }
        None => {
            let v = parse_size(s)?;
            Ok(SizeRange { min: v, max: v })
        }
    }
}

impl Args {
    /// Refuses impossible options, with the reason; raises the open-files limit if the
    /// connections need it and the hard limit allows.
    pub fn check(&self) -> Result<()> {
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                bail!("--rate must be a positive number of files per second, not {r}");
            }
        }
        if self.duration.is_zero() && self.files.is_none() {
            bail!("--duration must be positive");
        }
        if self.files == Some(0) {
            bail!("--files must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.register_ratio) {
            bail!("--register-ratio must be between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            bail!("--max-error-rate must be between 0 and 1");
        }
        if self.size.max > MAX_FILE_SIZE {
            bail!("--size is at most {MAX_FILE_SIZE} bytes in protocol v3");
        }
        if self.mode == Mode::V4Backup {
            if self.size.min != self.size.max {
                bail!("--mode v4-backup takes a fixed --size");
            }
            if !(1..=10_000).contains(&self.files_per_snapshot) {
                bail!("--files-per-snapshot must be between 1 and 10000");
            }
            // Each client holds its snapshot's content in memory.
            let held = self
                .size
                .max
                .saturating_mul(self.files_per_snapshot)
                .saturating_mul(self.connections as u64);
            if held > 8 << 30 {
                bail!(
                    "{} connections x {} files of {} bytes hold {} MiB in memory, over the 8192 MiB budget",
                    self.connections,
                    self.files_per_snapshot,
                    self.size.max,
                    held >> 20
                );
            }
        }
        if !(16..=16 * 1024 * 1024).contains(&self.packet_size)
            || !self.packet_size.is_multiple_of(16)
        {
            bail!("--packet-size must be a multiple of 16 between 16 bytes and 16 MiB");
        }
        if self.keys == 0 {
            bail!("--keys must be at least 1");
        }
        if self.timeout < Duration::from_millis(10) {
            bail!("--timeout must be at least 10ms");
        }
        if let Some(name) = &self.congestion {
            if let Err(e) = cyberbackup_client::session::check_congestion(name) {
                let available =
                    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
                        .unwrap_or_default();
                bail!(
                    "--congestion: {} (available here: {})",
                    e.report(),
                    available.trim()
                );
            }
        }
        // Each client keeps the ciphertext of the largest file of its session.
        let cache = self
            .size
            .max
            .saturating_add(16)
            .saturating_mul(self.connections as u64);
        let budget = 8u64 << 30;
        if self.mode == Mode::Upload && cache > budget {
            bail!(
                "{} connections x files up to {} bytes need {} MiB of cached ciphertext, over the {} MiB budget; use fewer connections or smaller files",
                self.connections,
                self.size.max,
                cache >> 20,
                budget >> 20
            );
        }
        self.check_open_files()
    }

    fn check_open_files(&self) -> Result<()> {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let need = self.connections as u64 + 64;
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("reading RLIMIT_NOFILE")?;
        if need <= soft {
            return Ok(());
        }
        if need <= hard {
            setrlimit(Resource::RLIMIT_NOFILE, need, hard).context("raising RLIMIT_NOFILE")?;
            return Ok(());
        }
        bail!(
            "{} connections need about {need} open files, but this process may open at most {hard} (ulimit -n)",
            self.connections
        )
    }

    pub fn io_timeout(&self) -> Duration {
        self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("4kb").unwrap(), 4000);
        assert_eq!(parse_size("1.5MiB").unwrap(), 1_572_864);
        assert_eq!(parse_size("16M").unwrap(), 16 << 20);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("4XB").is_err());
        assert_eq!(
            parse_size_range("4KiB..16MiB").unwrap(),
            SizeRange {
                min: 4096,
                max: 16 << 20
            }
        );
        assert_eq!(
            parse_size_range("1KiB").unwrap(),
            SizeRange {
                min: 1024,
                max: 1024
            }
        );
        assert!(parse_size_range("16MiB..4KiB")
            .unwrap_err()
            .contains("reversed"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("5x").unwrap_err().contains("unit"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert_eq!(args(&["--duration", "5s"]).duration, Duration::from_secs(5));
    }

    fn args(v: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("lg").chain(v.iter().copied())).unwrap()
    }

    #[test]
    fn impossible_options_are_refused() {
        assert!(args(&[]).check().is_ok());
        for bad in [
            &["--rate", "0"][..],
            &["--rate=-5"],
            &["--connections", "0"],
            &["--register-ratio", "2"],
            &["--packet-size", "100"],
            &["--files", "0"],
            &["--duration", "0s"],
            &["--timeout", "0"],
            &["--connections", "100000000"],
            &["--connections", "1000", "--size", "1GiB"],
        ] {
            assert!(args(bad).check().is_err(), "{bad:?}");
        }
        let e = args(&["--connections", "100000000"]).check().unwrap_err();
        assert!(
            format!("{e:#}").contains("open files") || format!("{e:#}").contains("budget"),
            "{e:#}"
        );
    }
}
