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

use crate::jobs::Status;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// The bridge's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    uploads: Family<ResultLabel, Counter>,
    bytes: Counter,
    duration: Histogram,
    pub in_progress: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cyberbackup_bridge");
        let uploads = Family::<ResultLabel, Counter>::default();
        let bytes = Counter::default();
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let in_progress = Gauge::default();
        registry.register(
            "uploads",
            "Uploads finished, by result (done, failed, cancelled)",
            uploads.clone(),
        );
        registry.register(
            "uploaded_bytes",
            "Bytes of files stored on backup servers",
            bytes.clone(),
        );
        registry.register(
            "upload_duration_seconds",
            "Time from the first byte of a file to its acknowledgement or failure",
            duration.clone(),
        );
        registry.register(
            "uploads_in_progress",
            "Uploads running now",
            in_progress.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            uploads,
            bytes,
            duration,
            in_progress,
        }
    }
}

impl Metrics {
    /// Counts a finished upload.
    pub fn finished(&self, status: Status, size: u64, took: Duration) {
        self.uploads
            .get_or_create(&ResultLabel {
                result: status.as_str().to_owned(),
            })
            .inc();
        if status == Status::Done {
            self.bytes.inc_by(size);
        }
        self.duration.observe(took.as_secs_f64());
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
