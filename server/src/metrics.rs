//! The server's Prometheus metrics: one process-wide set of counters and histograms
//! that the connection drivers, the op runners and the committers update as they work
//! ([`metrics`]), and the gauges read when a scrape asks ([`Scrape`]).
//!
//! Names follow the Prometheus conventions: a `cyberbackup_` prefix, base units
//! (`_bytes`, `_seconds`), `_total` on counters, and labels of small fixed sets
//! (`protocol` is "3" or "4"; `reason` a reason code or a named cause). Per-account
//! series are opt-in (`--metrics-per-account`): one series per account and metric.
//! CI checks the output with `promtool check metrics`.

use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `protocol="3"` or `"4"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Proto {
    pub protocol: &'static str,
}

/// `protocol` and `result` ("ok", "failed").
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtoResult {
    pub protocol: &'static str,
    pub result: &'static str,
}

/// `protocol` and `reason` (a reason code's number, or a named cause such as
/// "handshake" or "timeout").
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtoReason {
    pub protocol: &'static str,
    pub reason: String,
}

/// `volume`: "storage" (v3 files) or "repository" (v4 blobs).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Volume {
    pub volume: &'static str,
}

/// `account`: an account's name (opt-in series).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AccountLabel {
    pub account: String,
}

/// `version` of the running build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: &'static str,
}

/// `kind`: "gc" or "scrub".
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

fn proto(v: u8) -> &'static str {
    if v == 3 {
        "3"
    } else {
        "4"
    }
}

/// Every metric the server exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub connections_accepted: Counter,
    pub connections_refused: Counter,
    connections_open: Gauge,
    handshakes: Family<ProtoResult, Counter>,
    received: Family<Proto, Counter>,
    sent: Family<Proto, Counter>,
    ingested_bytes: Family<Proto, Counter>,
    served_bytes: Family<Proto, Counter>,
    pub files_ingested: Counter,
    pub chunks_ingested: Counter,
    pub chunks_deduplicated: Counter,
    pub chunks_served: Counter,
    pub snapshots_committed: Counter,
    errors: Family<ProtoReason, Counter>,
    commit_seconds: Family<Proto, Histogram>,
    commit_items: Family<Proto, Histogram>,
    commit_bytes: Family<Proto, Histogram>,
    maintenance_runs: Family<KindLabel, Counter>,
    pub gc_freed_bytes: Counter,
    maintenance_last: Family<KindLabel, Gauge<f64, AtomicU64>>,
    free_bytes: Family<Volume, Gauge>,
    size_bytes: Family<Volume, Gauge>,
    accounts: Gauge,
    stored_bytes: Gauge,
    snapshots: Gauge,
    account_stored: Family<AccountLabel, Gauge>,
    account_snapshots: Family<AccountLabel, Gauge>,
    account_last_backup: Family<AccountLabel, Gauge>,
    draining: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn seconds_buckets() -> Histogram {
    // 0.5 ms .. about 16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn items_buckets() -> Histogram {
    // 1 .. 32768 items in one durable group
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

fn bytes_buckets() -> Histogram {
    // 4 KiB .. 512 MiB in one durable group
    Histogram::new(exponential_buckets(4096.0, 2.0, 18))
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static M: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &M
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("cyberbackup");
        let m = Metrics {
            registry: Mutex::new(Registry::default()),
            connections_accepted: Counter::default(),
            connections_refused: Counter::default(),
            connections_open: Gauge::default(),
            handshakes: Family::default(),
            received: Family::default(),
            sent: Family::default(),
            ingested_bytes: Family::default(),
            served_bytes: Family::default(),
            files_ingested: Counter::default(),
            chunks_ingested: Counter::default(),
            chunks_deduplicated: Counter::default(),
            chunks_served: Counter::default(),
            snapshots_committed: Counter::default(),
            errors: Family::default(),
            commit_seconds: Family::new_with_constructor(seconds_buckets),
            commit_items: Family::new_with_constructor(items_buckets),
            commit_bytes: Family::new_with_constructor(bytes_buckets),
            maintenance_runs: Family::default(),
            gc_freed_bytes: Counter::default(),
            maintenance_last: Family::default(),
            free_bytes: Family::default(),
            size_bytes: Family::default(),
            accounts: Gauge::default(),
            stored_bytes: Gauge::default(),
            snapshots: Gauge::default(),
            account_stored: Family::default(),
            account_snapshots: Family::default(),
            account_last_backup: Family::default(),
            draining: Gauge::default(),
        };
        let build = Family::<BuildLabel, Gauge>::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        r.register("build_info", "The running build (value 1)", build);
        let started = Gauge::<f64, AtomicU64>::default();
        started.set(crate::repo::now_unix_ms() as f64 / 1000.0);
        r.register_with_unit(
            "start_time",
            "When the server started, in seconds since the epoch",
            prometheus_client::registry::Unit::Seconds,
            started,
        );
        r.register(
            "connections_accepted",
            "Connections accepted",
            m.connections_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed on accept because --max-connections were open",
            m.connections_refused.clone(),
        );
        r.register(
            "connections_open",
            "Connections open now",
            m.connections_open.clone(),
        );
        r.register(
            "handshakes",
            "Connections that logged in (ok) or ended before (failed), by protocol",
            m.handshakes.clone(),
        );
        r.register_with_unit(
            "received",
            "Bytes read from clients' sockets, by protocol",
            prometheus_client::registry::Unit::Bytes,
            m.received.clone(),
        );
        r.register_with_unit(
            "sent",
            "Bytes written to clients' sockets, by protocol",
            prometheus_client::registry::Unit::Bytes,
            m.sent.clone(),
        );
        r.register_with_unit(
            "ingested",
            "Bytes made durable: v3 files' plaintext, v4 chunks and snapshot bodies as stored (encrypted)",
            prometheus_client::registry::Unit::Bytes,
            m.ingested_bytes.clone(),
        );
        r.register_with_unit(
            "served",
            "Bytes of stored data read for clients: v4 chunks and snapshot bodies, v3 files read over v4's legacy requests (protocol 3)",
            prometheus_client::registry::Unit::Bytes,
            m.served_bytes.clone(),
        );
        r.register(
            "files_ingested",
            "v3 files stored",
            m.files_ingested.clone(),
        );
        r.register(
            "chunks_ingested",
            "v4 chunks written and recorded",
            m.chunks_ingested.clone(),
        );
        r.register(
            "chunks_deduplicated",
            "v4 chunks the account held already when a client asked (HAS_CHUNKS, so they were not sent) or sent them (so they were not written again)",
            m.chunks_deduplicated.clone(),
        );
        r.register(
            "chunks_served",
            "v4 chunks read for clients",
            m.chunks_served.clone(),
        );
        r.register(
            "snapshots_committed",
            "v4 snapshots committed",
            m.snapshots_committed.clone(),
        );
        r.register(
            "errors",
            "Errors answered or ending a connection, by protocol and reason code (or cause)",
            m.errors.clone(),
        );
        r.register_with_unit(
            "commit_duration",
            "Time of one durable commit group (sync and registry transaction), by protocol",
            prometheus_client::registry::Unit::Seconds,
            m.commit_seconds.clone(),
        );
        r.register(
            "commit_items",
            "Files (v3) or chunks and snapshots (v4) made durable by one commit group",
            m.commit_items.clone(),
        );
        r.register_with_unit(
            "commit_size",
            "Bytes made durable by one commit group",
            prometheus_client::registry::Unit::Bytes,
            m.commit_bytes.clone(),
        );
        r.register(
            "maintenance_runs",
            "Collections (gc) and scrubs finished",
            m.maintenance_runs.clone(),
        );
        r.register_with_unit(
            "gc_freed",
            "Bytes of unreferenced chunks deleted by collections",
            prometheus_client::registry::Unit::Bytes,
            m.gc_freed_bytes.clone(),
        );
        r.register_with_unit(
            "maintenance_last_success",
            "When the last collection (gc) or scrub finished, in seconds since the epoch",
            prometheus_client::registry::Unit::Seconds,
            m.maintenance_last.clone(),
        );
        r.register_with_unit(
            "volume_free",
            "Bytes available to the server on the file system of its storage or repository",
            prometheus_client::registry::Unit::Bytes,
            m.free_bytes.clone(),
        );
        r.register_with_unit(
            "volume_size",
            "Size of the file system of the storage or repository",
            prometheus_client::registry::Unit::Bytes,
            m.size_bytes.clone(),
        );
        r.register("accounts", "v4 accounts", m.accounts.clone());
        r.register_with_unit(
            "repository_stored",
            "Bytes of v4 chunks and snapshot bodies stored, all accounts",
            prometheus_client::registry::Unit::Bytes,
            m.stored_bytes.clone(),
        );
        r.register(
            "snapshots",
            "v4 snapshots kept, all accounts",
            m.snapshots.clone(),
        );
        r.register_with_unit(
            "account_stored",
            "Bytes stored by an account (with --metrics-per-account)",
            prometheus_client::registry::Unit::Bytes,
            m.account_stored.clone(),
        );
        r.register(
            "account_snapshots",
            "Snapshots kept by an account (with --metrics-per-account)",
            m.account_snapshots.clone(),
        );
        r.register(
            "account_last_backup_timestamp_seconds",
            "When an account's newest snapshot was committed, in seconds since the epoch (with --metrics-per-account)",
            m.account_last_backup.clone(),
        );
        r.register(
            "draining",
            "1 while the server drains after SIGINT/SIGTERM, else 0",
            m.draining.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = r;
        m
    }

    /// Bytes read from a socket of a connection of protocol `v` (0: not known yet, counted
    /// as v4's preamble never is; v3 once detected).
    pub fn received(&self, v: u8, n: usize) {
        self.received
            .get_or_create(&Proto { protocol: proto(v) })
            .inc_by(n as u64);
    }

    pub fn sent(&self, v: u8, n: usize) {
        self.sent
            .get_or_create(&Proto { protocol: proto(v) })
            .inc_by(n as u64);
    }

    pub fn handshake(&self, v: u8, ok: bool) {
        self.handshakes
            .get_or_create(&ProtoResult {
                protocol: proto(v),
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    pub fn error(&self, v: u8, reason: impl Into<String>) {
        self.errors_n(v, reason, 1);
    }

    /// `n` errors of one reason.
    pub fn errors_n(&self, v: u8, reason: impl Into<String>, n: u64) {
        self.errors
            .get_or_create(&ProtoReason {
                protocol: proto(v),
                reason: reason.into(),
            })
            .inc_by(n);
    }

    pub fn ingested(&self, v: u8, bytes: u64) {
        self.ingested_bytes
            .get_or_create(&Proto { protocol: proto(v) })
            .inc_by(bytes);
    }

    pub fn served(&self, v: u8, bytes: u64) {
        self.served_bytes
            .get_or_create(&Proto { protocol: proto(v) })
            .inc_by(bytes);
    }

    /// One durable commit group of protocol `v`: its time, items and bytes.
    pub fn commit(&self, v: u8, took: Duration, items: usize, bytes: u64) {
        let l = Proto { protocol: proto(v) };
        self.commit_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
        self.commit_items.get_or_create(&l).observe(items as f64);
        self.commit_bytes.get_or_create(&l).observe(bytes as f64);
    }

    /// A collection ("gc") or scrub finished.
    pub fn maintenance_done(&self, kind: &'static str) {
        let l = KindLabel { kind };
        self.maintenance_runs.get_or_create(&l).inc();
        self.maintenance_last
            .get_or_create(&l)
            .set(crate::repo::now_unix_ms() as f64 / 1000.0);
    }

    /// The text exposition, after setting the gauges from `now`.
    pub fn render(&self, now: &Scrape) -> String {
        self.connections_open.set(now.connections_open as i64);
        self.draining.set(i64::from(now.draining));
        for (volume, free, size) in &now.volumes {
            self.free_bytes
                .get_or_create(&Volume { volume })
                .set(*free as i64);
            self.size_bytes
                .get_or_create(&Volume { volume })
                .set(*size as i64);
        }
        self.accounts.set(now.accounts.len() as i64);
        self.stored_bytes
            .set(now.accounts.iter().map(|a| a.stored_bytes).sum::<u64>() as i64);
        self.snapshots
            .set(now.accounts.iter().map(|a| a.snapshots).sum::<u64>() as i64);
        if now.per_account {
            self.account_stored.clear();
            self.account_snapshots.clear();
            self.account_last_backup.clear();
            for a in &now.accounts {
                let l = AccountLabel {
                    account: escape_label(&a.name),
                };
                self.account_stored
                    .get_or_create(&l)
                    .set(a.stored_bytes as i64);
                self.account_snapshots
                    .get_or_create(&l)
                    .set(a.snapshots as i64);
                if let Some(t) = a.last_backup_ms {
                    self.account_last_backup.get_or_create(&l).set(t / 1000);
                }
            }
        }
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// A label value as the text formats want it: backslash, double quote and line feed
/// escaped (prometheus-client writes values as they are, and an account's name is the
/// user's choice: one quote would break every scrape).
pub fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// What a scrape reads at the moment it asks.
#[derive(Debug, Default)]
pub struct Scrape {
    pub connections_open: usize,
    pub draining: bool,
    /// (volume, free bytes, size bytes)
    pub volumes: Vec<(&'static str, u64, u64)>,
    pub accounts: Vec<AccountUsage>,
    pub per_account: bool,
}

/// One account's usage, for the gauges.
#[derive(Debug, Clone)]
pub struct AccountUsage {
    pub name: String,
    pub stored_bytes: u64,
    pub snapshots: u64,
    pub last_backup_ms: Option<i64>,
}

/// Free and total bytes of the file system holding `path` (for the unprivileged user:
/// `f_bavail`).
pub fn volume(path: &std::path::Path) -> Option<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    let frsize = st.fragment_size() as u64;
    Some((
        st.blocks_available() as u64 * frsize,
        st.blocks() as u64 * frsize,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_are_escaped() {
        assert_eq!(super::escape_label(r#"ev"il\x"#), r#"ev\"il\\x"#);
        assert_eq!(super::escape_label("a\nb"), "a\\nb");
        assert_eq!(super::escape_label("plain"), "plain");
    }
}
