//! One worker thread: take a batch off the queue, commit it through the ledger, answer it; and
//! between batches, expire the holds whose time is up, prune expired idempotency keys and write a
//! chunk of balances back to the accounts' rows. At a clean stop, the last worker out writes back everything, so that the next
//! start replays nothing.
//!
//! Single requests and bulk requests wait in two queues. A batch takes every single request waiting
//! (up to `--batch-max`) first, then bulk requests: as many as fit in `--batch-max` transactions (a
//! bulk request counts its items), or one if it is bigger than that. A bulk job that does not fit
//! waits for the next batch, first in line among the bulk jobs. So a bulk request of 8,190 is a
//! commit of its own with the single requests that were waiting beside it, and a single transfer
//! waits at most for the batch being committed when it arrives, however many bulk requests are
//! queued (with one queue it waited behind all of them: p99 1.4 s beside 16 connections of bulk
//! requests, bench/run.sh bulk_mixed); bulk requests are taken in arrival order, one batch after
//! another, so neither kind starves the other.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{EngineState, Job, Ledger};
use crate::domain::Command;
use crate::store::Store;
use crate::telemetry;

#[derive(Debug, Clone, Copy)]
pub(super) struct BatchLimits {
    /// Most transactions in one batch (a bulk request counts its items; one bigger than this is a
    /// batch on its own).
    pub max: usize,
    /// Longest wait for more commands once a batch has one (zero: take only what is waiting).
    pub wait: Duration,
    /// How long an idempotency key is kept at least.
    pub idempotency_retention: Duration,
}

/// How often a worker prunes expired idempotency keys, busy or idle.
const PRUNE_PERIOD: Duration = Duration::from_secs(1);
/// Most idempotency records deleted at once, so that pruning holds up the next batch by a
/// millisecond or so at most. While a chunk comes back full there is a backlog, and another chunk
/// follows every batch until it is gone: pruning keeps up with any rate the engine commits keys at.
const PRUNE_ROWS_MAX: u32 = 2_000;
/// Most holds expired in one batch of the sweeper (which runs with the pruning, once a second, and
/// after every batch while it comes back full), so that it holds up the next batch by one commit.
pub(super) const HOLD_SWEEP_MAX: usize = 1_000;

/// The two queues a worker takes jobs from.
pub(super) struct Queues {
    /// Single requests (`POST /transaction`, `/transfers`, `/accounts`).
    pub singles: flume::Receiver<Job>,
    /// `POST /transfers/bulk` requests, one job each.
    pub bulk: flume::Receiver<Job>,
}

/// What the worker does next.
enum Next {
    Job(Job),
    /// Nothing arrived for a prune period.
    Idle,
    /// Both queues are closed and empty.
    Closed,
}

impl Queues {
    fn is_empty(&self) -> bool {
        self.singles.is_empty() && self.bulk.is_empty()
    }

    /// The next job, a single request before a bulk one, waiting up to `timeout` for either.
    fn next(&self, timeout: Duration) -> Next {
        loop {
            if let Ok(job) = self.singles.try_recv() {
                return Next::Job(job);
            }
            if let Ok(job) = self.bulk.try_recv() {
                return Next::Job(job);
            }
            if self.singles.is_disconnected() && self.bulk.is_disconnected() {
                return Next::Closed;
            }
            let waited = flume::Selector::new()
                .recv(&self.singles, Result::ok)
                .recv(&self.bulk, Result::ok)
                .wait_timeout(timeout);
            match waited {
                Ok(Some(job)) => return Next::Job(job),
                // One queue closed: both are, once the engine's last handle is gone; look again.
                Ok(None) => continue,
                Err(_) => return Next::Idle,
            }
        }
    }
}

/// Runs until both queues are closed (every sender dropped) and empty, so that shutdown commits
/// and answers everything that was accepted.
pub(super) fn run<S: Store>(
    queues: Queues,
    ledger: Arc<Mutex<Ledger<S>>>,
    limits: BatchLimits,
    state: Arc<EngineState>,
) {
    let mut batch = Vec::with_capacity(limits.max);
    let mut pruned_at = Instant::now();
    let mut backlog = false;
    // The bulk job that did not fit into the last batch: the first of the next one.
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take().map_or_else(|| queues.next(PRUNE_PERIOD), Next::Job) {
            Next::Job(job) => Some(job),
            Next::Idle => None,
            Next::Closed => return write_back_all(&ledger),
        };
        if backlog || pruned_at.elapsed() >= PRUNE_PERIOD {
            let keys_left = prune(&ledger, limits.idempotency_retention) == PRUNE_ROWS_MAX as usize;
            let holds_left = sweep_holds(&ledger) == HOLD_SWEEP_MAX;
            backlog = keys_left || holds_left;
            pruned_at = Instant::now();
        }
        let Some(first) = first else {
            idle(&ledger, &queues, &state);
            continue;
        };
        batch.push(first);
        state.in_progress.fetch_add(1, Ordering::Relaxed);
        let Ok(mut locked) = ledger.lock() else {
            tracing::error!("the ledger is poisoned by a panic in another worker; this worker stops");
            return;
        };
        // Take what piled up while we waited for the lock: this is where batches grow under load.
        held = fill(&queues, &mut batch, limits);
        state.in_progress.fetch_add(batch.len() - 1, Ordering::Relaxed);
        let started = Instant::now();
        let report = locked.apply_batch(
            batch
                .iter()
                .map(|job| (&job.command, job.key.as_ref().map(|key| (job.scope, key)))),
            crate::unix_ms_now(),
        );
        drop(locked);
        let transactions = batch.iter().map(weight).sum();
        telemetry::record_batch(transactions, started.elapsed(), report.commit_ok);
        *state
            .totals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = report.totals;
        state.writable.store(report.commit_ok, Ordering::Relaxed);
        let answered = batch.len();
        for (job, outcome) in batch.drain(..).zip(report.outcomes) {
            // The client may have gone away; its transaction stands either way.
            let _ = job.reply.send(outcome);
        }
        state.in_progress.fetch_sub(answered, Ordering::Relaxed);
        write_back(&ledger, &queues, &state);
    }
}

/// One chunk of the write-back if it is due, and more while nobody is waiting: a chunk holds up
/// the next batch by a few milliseconds at most.
fn write_back<S: Store>(ledger: &Mutex<Ledger<S>>, queues: &Queues, state: &EngineState) {
    let Ok(mut ledger) = ledger.lock() else { return };
    loop {
        let step = ledger.write_back_step(Instant::now());
        state
            .write_back_lag
            .store(ledger.write_back_lag(), Ordering::Relaxed);
        match step {
            Ok(true) if queues.is_empty() => continue,
            Ok(_) => return,
            Err(error) => {
                tracing::warn!(%error, "writing balances back failed; the next batch retries");
                return;
            }
        }
    }
}

/// Nothing arrived for a while: catch up with outside writes, then write back.
fn idle<S: Store>(ledger: &Mutex<Ledger<S>>, queues: &Queues, state: &EngineState) {
    if let Ok(mut ledger) = ledger.lock() {
        if let Err(error) = ledger.catch_up() {
            tracing::warn!(%error, "re-reading the database failed; the next batch retries");
        }
    }
    write_back(ledger, queues, state);
}

fn write_back_all<S: Store>(ledger: &Mutex<Ledger<S>>) {
    let Ok(mut ledger) = ledger.lock() else { return };
    if let Err(error) = ledger.write_back_all() {
        tracing::warn!(%error, "writing balances back at the stop failed; the next start replays the journal");
    }
}

/// Expires one batch of the holds whose time is up; returns how many.
fn sweep_holds<S: Store>(ledger: &Mutex<Ledger<S>>) -> usize {
    let Ok(mut ledger) = ledger.lock() else { return 0 };
    let expired = ledger.expire_due(crate::unix_ms_now(), HOLD_SWEEP_MAX);
    if expired > 0 {
        tracing::debug!(holds = expired, "expired holds");
    }
    expired
}

/// Deletes one chunk of idempotency records older than the retention; returns how many.
fn prune<S: Store>(ledger: &Mutex<Ledger<S>>, retention: Duration) -> usize {
    let Ok(mut ledger) = ledger.lock() else { return 0 };
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let before = crate::unix_ms_now().saturating_sub(retention_ms);
    match ledger.prune_idempotency(before, PRUNE_ROWS_MAX) {
        Ok(rows) => {
            if rows > 0 {
                tracing::debug!(rows, "pruned expired idempotency keys");
            }
            rows
        }
        Err(error) => {
            tracing::warn!(%error, "pruning idempotency keys failed; the next period retries");
            0
        }
    }
}

/// How many transactions a job asks for: its weight against [`BatchLimits::max`].
/// How many transactions a job may make: a bulk request's items, one for anything else.
pub(super) fn weight(job: &Job) -> usize {
    match &job.command {
        Command::BulkTransfer(bulk) => bulk.items.len(),
        _ => 1,
    }
}

fn is_bulk(job: &Job) -> bool {
    matches!(job.command, Command::BulkTransfer(_))
}

/// Adds what is waiting to `batch` (which holds its first job): single requests up to
/// `limits.max`, then bulk jobs up to `limits.max` transactions (or one, if none is in the batch
/// yet); returns the bulk job that would have gone past the limit, for the next batch.
fn fill(queues: &Queues, batch: &mut Vec<Job>, limits: BatchLimits) -> Option<Job> {
    let deadline = Instant::now() + limits.wait;
    let mut singles = batch.iter().filter(|job| !is_bulk(job)).count();
    while singles < limits.max {
        let next = if limits.wait.is_zero() {
            queues.singles.try_recv().ok()
        } else {
            queues.singles.recv_deadline(deadline).ok()
        };
        match next {
            Some(job) => {
                singles += 1;
                batch.push(job);
            }
            None => break,
        }
    }
    let mut bulk: usize = batch.iter().filter(|job| is_bulk(job)).map(weight).sum();
    while bulk < limits.max {
        let Ok(job) = queues.bulk.try_recv() else { break };
        if bulk > 0 && bulk + weight(&job) > limits.max {
            return Some(job);
        }
        bulk += weight(&job);
        batch.push(job);
    }
    None
}
