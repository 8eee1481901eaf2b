//! Counters and histograms of every answered request, per model and outcome, kept by the core
//! and read by Prometheus at scrape time (metrics.py): nothing in Python per request.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// Histogram buckets (upper bounds) of the duration metrics, in seconds, as metrics.py names.
pub const SECONDS: [f64; 19] = [
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets of the batch-size histogram.
pub const SIZES: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

#[derive(Clone, Debug, Default)]
pub struct Hist {
    /// Per bucket (not cumulative), the last one for +Inf.
    pub counts: Vec<u64>,
    pub sum: f64,
}

impl Hist {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len() + 1];
        }
        let i = bounds.iter().position(|&b| v <= b).unwrap_or(bounds.len());
        self.counts[i] += 1;
        self.sum += v;
    }
}

#[derive(Clone, Debug, Default)]
pub struct ModelMeter {
    /// "ok" or the SPEC error name -> requests.
    pub outcomes: BTreeMap<&'static str, u64>,
    pub request: Hist,
    pub queue: Hist,
    pub compute: Hist,
    pub batch: Hist,
    pub retries: u64,
}

#[derive(Default)]
pub struct Meters {
    by_model: Mutex<HashMap<String, ModelMeter>>,
}

impl Meters {
    fn with<R>(&self, model: &str, f: impl FnOnce(&mut ModelMeter) -> R) -> R {
        let mut m = self.by_model.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mm) = m.get_mut(model) {
            return f(mm);
        }
        f(m.entry(model.to_string()).or_default())
    }

    /// One answered request: its outcome and, when known, its time from read to answer and
    /// in the queue.
    pub fn request(
        &self,
        model: &str,
        outcome: &'static str,
        total: Option<Duration>,
        queued: Option<Duration>,
    ) {
        self.with(model, |m| {
            *m.outcomes.entry(outcome).or_default() += 1;
            if let Some(t) = total {
                m.request.observe(&SECONDS, t.as_secs_f64());
            }
            if let Some(q) = queued {
                m.queue.observe(&SECONDS, q.as_secs_f64());
            }
        });
    }

    /// Requests of one batch answered with the same outcome: (total, queued) per request.
    pub fn requests(&self, model: &str, outcome: &'static str, times: &[(Duration, Duration)]) {
        self.with(model, |m| {
            *m.outcomes.entry(outcome).or_default() += times.len() as u64;
            for &(t, q) in times {
                m.request.observe(&SECONDS, t.as_secs_f64());
                m.queue.observe(&SECONDS, q.as_secs_f64());
            }
        });
    }

    /// One forward pass over `size` requests.
    pub fn batch(&self, model: &str, size: usize, compute: Duration) {
        self.with(model, |m| {
            m.batch.observe(&SIZES, size as f64);
            m.compute.observe(&SECONDS, compute.as_secs_f64());
        });
    }

    pub fn retry(&self, model: &str) {
        self.with(model, |m| m.retries += 1);
    }

    pub fn snapshot(&self) -> Vec<(String, ModelMeter)> {
        let m = self.by_model.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}
