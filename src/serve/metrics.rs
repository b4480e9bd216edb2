//! Prometheus text metrics (`GET /metrics`): requests by endpoint and status, the queue size,
//! batch sizes, and queue-wait and inference latencies as histograms. Plain counters behind one
//! mutex: a few updates per request, far below a forward pass.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;

/// Latency bucket bounds in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];
/// Batch-size bucket bounds (inputs per forward pass).
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

/// A cumulative histogram over fixed bounds.
#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

struct Inner {
    requests: BTreeMap<(String, u16), u64>,
    batch_size: Histogram,
    queue_seconds: Histogram,
    inference_seconds: Histogram,
}

/// The server's metrics.
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Jobs queued for the model thread and not yet taken.
    pub queue_size: AtomicI64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                batch_size: Histogram::new(&BATCH_BUCKETS),
                queue_seconds: Histogram::new(&LATENCY_BUCKETS),
                inference_seconds: Histogram::new(&LATENCY_BUCKETS),
            }),
            queue_size: AtomicI64::new(0),
        }
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave these counters inconsistent: keep counting.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn request(&self, endpoint: &str, status: u16) {
        *self
            .lock()
            .requests
            .entry((endpoint.to_string(), status))
            .or_default() += 1;
    }

    /// One forward pass over `inputs` inputs that took `seconds`.
    pub fn batch(&self, inputs: usize, seconds: f64) {
        let mut m = self.lock();
        m.batch_size.observe(inputs as f64);
        m.inference_seconds.observe(seconds);
    }

    /// A job's wait between being queued and being taken by the model thread.
    pub fn queued(&self, seconds: f64) {
        self.lock().queue_seconds.observe(seconds);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        out.push_str("# HELP vlalign_requests_total Requests answered, by endpoint and status.\n");
        out.push_str("# TYPE vlalign_requests_total counter\n");
        for ((endpoint, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "vlalign_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP vlalign_queue_size Jobs waiting for the model thread.\n\
             # TYPE vlalign_queue_size gauge\nvlalign_queue_size {}",
            self.queue_size.load(Ordering::Relaxed)
        );
        m.batch_size
            .write(&mut out, "vlalign_batch_size", "Inputs per forward pass.");
        m.queue_seconds.write(
            &mut out,
            "vlalign_queue_seconds",
            "Time a job waited for the model thread.",
        );
        m.inference_seconds.write(
            &mut out,
            "vlalign_inference_seconds",
            "Time of one forward pass.",
        );
        out
    }
}
