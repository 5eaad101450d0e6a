//! Prometheus metrics at `/metrics`, named after the Prometheus conventions (base
//! units, `_total` for counters, a `cyberbackup_bridge_` prefix).

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// The bridge's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    files: Family<ResultLabel, Counter>,
    received: Counter,
    sent: Counter,
    snapshots: Family<ResultLabel, Counter>,
    duration: Histogram,
    pub in_progress: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cyberbackup_bridge");
        let files = Family::<ResultLabel, Counter>::default();
        let received = Counter::default();
        let sent = Counter::default();
        let snapshots = Family::<ResultLabel, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let in_progress = Gauge::default();
        registry.register(
            "files",
            "Files sent from the browser, by result (stored, failed)",
            files.clone(),
        );
        registry.register(
            "received_bytes",
            "Bytes of files received from the browser",
            received.clone(),
        );
        registry.register(
            "sent_bytes",
            "Bytes of encrypted chunks sent to the backup server (those it did not hold)",
            sent.clone(),
        );
        registry.register(
            "snapshots",
            "Snapshots committed from browser backups, by result (done, failed)",
            snapshots.clone(),
        );
        registry.register(
            "file_duration_seconds",
            "Time from a file's first byte to its last chunk being durable on the server",
            duration.clone(),
        );
        registry.register(
            "files_in_progress",
            "Files being received now",
            in_progress.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            files,
            received,
            sent,
            snapshots,
            duration,
            in_progress,
        }
    }
}

impl Metrics {
    /// Counts a file's request.
    pub fn file(&self, stored: bool, received: u64, sent: u64, took: Duration) {
        let result = if stored { "stored" } else { "failed" };
        self.files
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
        self.received.inc_by(received);
        self.sent.inc_by(sent);
        self.duration.observe(took.as_secs_f64());
    }

    /// Counts a commit.
    pub fn snapshot(&self, done: bool) {
        let result = if done { "done" } else { "failed" };
        self.snapshots
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}
