//! Ring buffers and counters behind `/stats`: the latencies of the last N transactions, the
//! average balance sampled once a second for the last M seconds, and totals by outcome.
//!
//! Each buffer sits behind its own std mutex, held only to push or copy a few thousand numbers,
//! never across an await.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What became of a `POST /transaction`, as counted in `/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeLabel {
    Committed,
    InsufficientFunds,
    CardNotFound,
    /// Invalid input, or refused by a rule other than funds; nothing was queued or written.
    Rejected,
    QueueFull,
    /// Storage failure or shutdown; nothing was written.
    Error,
}

impl OutcomeLabel {
    pub const ALL: [OutcomeLabel; 6] = [
        OutcomeLabel::Committed,
        OutcomeLabel::InsufficientFunds,
        OutcomeLabel::CardNotFound,
        OutcomeLabel::Rejected,
        OutcomeLabel::QueueFull,
        OutcomeLabel::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeLabel::Committed => "committed",
            OutcomeLabel::InsufficientFunds => "insufficient_funds",
            OutcomeLabel::CardNotFound => "card_not_found",
            OutcomeLabel::Rejected => "rejected",
            OutcomeLabel::QueueFull => "queue_full",
            OutcomeLabel::Error => "error",
        }
    }
}

/// The last `capacity` latencies, oldest dropped first.
#[derive(Debug)]
pub struct LatencyRing {
    micros: VecDeque<u64>,
    capacity: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencySummary {
    pub window: usize,
    pub count: usize,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl LatencyRing {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a ring buffer needs room for one sample");
        Self {
            micros: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn push(&mut self, latency: Duration) {
        if self.micros.len() == self.capacity {
            self.micros.pop_front();
        }
        self.micros
            .push_back(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// Nearest-rank percentiles over the buffer; all zero when it is empty.
    pub fn summary(&self) -> LatencySummary {
        let mut sorted: Vec<u64> = self.micros.iter().copied().collect();
        sorted.sort_unstable();
        let ms = |micros: u64| micros as f64 / 1000.0;
        let rank = |p: f64| match sorted.len() {
            0 => 0,
            n => sorted[((p * n as f64).ceil() as usize).clamp(1, n) - 1],
        };
        let total: u128 = sorted.iter().map(|&m| u128::from(m)).sum();
        LatencySummary {
            window: self.capacity,
            count: sorted.len(),
            mean_ms: if sorted.is_empty() {
                0.0
            } else {
                total as f64 / sorted.len() as f64 / 1000.0
            },
            p50_ms: ms(rank(0.50)),
            p90_ms: ms(rank(0.90)),
            p99_ms: ms(rank(0.99)),
            max_ms: ms(sorted.last().copied().unwrap_or(0)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BalanceSample {
    pub unix_ms: i64,
    /// Minor units; a derived float, for display only.
    pub average: f64,
}

/// The last `capacity` average-balance samples.
#[derive(Debug)]
pub struct BalanceRing {
    samples: VecDeque<BalanceSample>,
    capacity: usize,
}

impl BalanceRing {
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a ring buffer needs room for one sample");
        Self {
            samples: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    pub fn push(&mut self, sample: BalanceSample) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    pub fn samples(&self) -> Vec<BalanceSample> {
        self.samples.iter().copied().collect()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Everything `/stats` reports, shared by the HTTP handlers and the sampler.
#[derive(Debug)]
pub struct Analytics {
    started: Instant,
    latencies: Mutex<LatencyRing>,
    balances: Mutex<BalanceRing>,
    counts: [AtomicU64; OutcomeLabel::ALL.len()],
}

impl Analytics {
    pub fn new(latency_capacity: usize, balance_capacity: usize) -> Self {
        Self {
            started: Instant::now(),
            latencies: Mutex::new(LatencyRing::new(latency_capacity)),
            balances: Mutex::new(BalanceRing::new(balance_capacity)),
            counts: Default::default(),
        }
    }

    pub fn record(&self, outcome: OutcomeLabel, latency: Duration) {
        self.counts[outcome as usize].fetch_add(1, Ordering::Relaxed);
        lock(&self.latencies).push(latency);
    }

    /// `count` transactions of one request (the items of a bulk request) with one outcome: each
    /// is counted, the request's latency is kept once.
    pub fn record_many(&self, outcome: OutcomeLabel, count: u64, latency: Duration) {
        self.counts[outcome as usize].fetch_add(count, Ordering::Relaxed);
        lock(&self.latencies).push(latency);
    }

    pub fn sample_balance(&self, sample: BalanceSample) {
        lock(&self.balances).push(sample);
    }

    pub fn count(&self, outcome: OutcomeLabel) -> u64 {
        self.counts[outcome as usize].load(Ordering::Relaxed)
    }

    pub fn latency_summary(&self) -> LatencySummary {
        lock(&self.latencies).summary()
    }

    /// The samples, and the ring's capacity.
    pub fn balance_samples(&self) -> (Vec<BalanceSample>, usize) {
        let ring = lock(&self.balances);
        (ring.samples(), ring.capacity())
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A panic while pushing a number leaves a ring buffer still usable, so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_latency_ring_reports_zeros() {
        let summary = LatencyRing::new(4).summary();
        assert_eq!(summary.count, 0);
        assert_eq!(
            (summary.p50_ms, summary.p99_ms, summary.max_ms, summary.mean_ms),
            (0.0, 0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn latency_ring_keeps_only_the_newest_samples() {
        let mut ring = LatencyRing::new(3);
        for ms in [100, 1, 2, 3] {
            ring.push(Duration::from_millis(ms));
        }
        let summary = ring.summary();
        assert_eq!(summary.count, 3);
        assert_eq!(summary.max_ms, 3.0, "the 100 ms sample fell out of the window");
        assert_eq!(summary.mean_ms, 2.0);
    }

    #[test]
    fn latency_percentiles_use_nearest_rank() {
        let mut ring = LatencyRing::new(100);
        for ms in 1..=100 {
            ring.push(Duration::from_millis(ms));
        }
        let summary = ring.summary();
        assert_eq!(
            (summary.p50_ms, summary.p90_ms, summary.p99_ms, summary.max_ms),
            (50.0, 90.0, 99.0, 100.0)
        );
        ring.push(Duration::from_millis(1000));
        assert_eq!(ring.summary().max_ms, 1000.0);
        assert_eq!(
            ring.summary().p50_ms,
            51.0,
            "the oldest sample (1 ms) was dropped"
        );
    }

    #[test]
    fn one_sample_is_every_percentile() {
        let mut ring = LatencyRing::new(10);
        ring.push(Duration::from_micros(1500));
        let summary = ring.summary();
        assert_eq!((summary.p50_ms, summary.p99_ms, summary.max_ms), (1.5, 1.5, 1.5));
    }

    #[test]
    fn balance_ring_drops_the_oldest_sample() {
        let mut ring = BalanceRing::new(2);
        for unix_ms in [1, 2, 3] {
            ring.push(BalanceSample {
                unix_ms,
                average: unix_ms as f64,
            });
        }
        let kept: Vec<i64> = ring.samples().iter().map(|s| s.unix_ms).collect();
        assert_eq!(kept, [2, 3]);
    }

    #[test]
    fn counts_are_kept_per_outcome() {
        let analytics = Analytics::new(10, 10);
        analytics.record(OutcomeLabel::Committed, Duration::from_millis(1));
        analytics.record(OutcomeLabel::Committed, Duration::from_millis(1));
        analytics.record(OutcomeLabel::QueueFull, Duration::from_millis(1));
        assert_eq!(analytics.count(OutcomeLabel::Committed), 2);
        assert_eq!(analytics.count(OutcomeLabel::QueueFull), 1);
        assert_eq!(analytics.count(OutcomeLabel::Error), 0);
        assert_eq!(analytics.latency_summary().count, 3);
    }
}
