//! Counts of what tallyd answered to `POST /transaction`, across all users, for the closing summary line.
//!
//! goose's own metrics are reset once every user has started; these are not, so `committed` can be compared
//! with the number of journal rows the run left in the database.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

static COMMITTED: AtomicU64 = AtomicU64::new(0);
static INSUFFICIENT_FUNDS: AtomicU64 = AtomicU64::new(0);
static QUEUE_FULL: AtomicU64 = AtomicU64::new(0);
static UNEXPECTED: AtomicU64 = AtomicU64::new(0);
static OVERLOAD_SENT: AtomicU64 = AtomicU64::new(0);

/// One answer to `POST /transaction`, as the scenarios classify it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// 200 with `"status":"committed"`: the transaction is durable.
    Committed,
    /// 422 `insufficient_funds`: a refusal the ledger is right to give.
    InsufficientFunds,
    /// 503 `queue_full` with `Retry-After`: back-pressure.
    QueueFull,
    /// Anything else: a failure of the run.
    Unexpected,
}

/// Counts one answer.
pub fn record(answer: Answer) {
    let counter = match answer {
        Answer::Committed => &COMMITTED,
        Answer::InsufficientFunds => &INSUFFICIENT_FUNDS,
        Answer::QueueFull => &QUEUE_FULL,
        Answer::Unexpected => &UNEXPECTED,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counts one transaction sent by the overload scenario.
pub fn record_overload_sent() {
    OVERLOAD_SENT.fetch_add(1, Ordering::Relaxed);
}

/// The counts at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Totals {
    pub committed: u64,
    pub insufficient_funds: u64,
    pub queue_full: u64,
    pub unexpected: u64,
    pub overload_sent: u64,
}

/// Reads every counter.
pub fn snapshot() -> Totals {
    Totals {
        committed: COMMITTED.load(Ordering::Relaxed),
        insufficient_funds: INSUFFICIENT_FUNDS.load(Ordering::Relaxed),
        queue_full: QUEUE_FULL.load(Ordering::Relaxed),
        unexpected: UNEXPECTED.load(Ordering::Relaxed),
        overload_sent: OVERLOAD_SENT.load(Ordering::Relaxed),
    }
}

impl fmt::Display for Totals {
    /// One line that scripts parse: `tallyd-loadtest: committed=N insufficient_funds=N queue_full=N ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tallyd-loadtest: committed={} insufficient_funds={} queue_full={} unexpected={} overload_sent={}",
            self.committed, self.insufficient_funds, self.queue_full, self.unexpected, self.overload_sent
        )
    }
}
