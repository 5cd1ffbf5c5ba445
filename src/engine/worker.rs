//! One worker thread: take a batch off the queue, commit it through the ledger, answer it.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{EngineState, Job, Ledger};
use crate::store::Store;
use crate::telemetry;

#[derive(Debug, Clone, Copy)]
pub(super) struct BatchLimits {
    /// Most transactions in one batch.
    pub max: usize,
    /// Longest wait for more transactions once a batch has one (zero: take only what is waiting).
    pub wait: Duration,
}

/// Runs until the queue is closed (every sender dropped) and empty, so that shutdown commits and
/// answers everything that was accepted.
pub(super) fn run<S: Store>(
    queue: flume::Receiver<Job>,
    ledger: Arc<Mutex<Ledger<S>>>,
    limits: BatchLimits,
    state: Arc<EngineState>,
) {
    let mut batch = Vec::with_capacity(limits.max);
    while let Ok(first) = queue.recv() {
        batch.push(first);
        state.in_progress.fetch_add(1, Ordering::Relaxed);
        let Ok(mut ledger) = ledger.lock() else {
            tracing::error!("the ledger is poisoned by a panic in another worker; this worker stops");
            return;
        };
        // Take what piled up while we waited for the lock: this is where batches grow under load.
        fill(&queue, &mut batch, limits);
        state.in_progress.fetch_add(batch.len() - 1, Ordering::Relaxed);
        let started = Instant::now();
        let report = ledger.apply_batch(batch.iter().map(|job| &job.request), crate::unix_ms_now());
        drop(ledger);
        telemetry::record_batch(batch.len(), started.elapsed(), report.commit_ok);
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
    }
}

fn fill(queue: &flume::Receiver<Job>, batch: &mut Vec<Job>, limits: BatchLimits) {
    let deadline = Instant::now() + limits.wait;
    while batch.len() < limits.max {
        let next = if limits.wait.is_zero() {
            queue.try_recv().ok()
        } else {
            queue.recv_deadline(deadline).ok()
        };
        match next {
            Some(job) => batch.push(job),
            None => break,
        }
    }
}
