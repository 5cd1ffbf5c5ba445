//! The engine: a bounded queue in front of a fixed pool of worker threads that decide commands
//! and commit them in batches (group commit).
//!
//! How many workers, and why they do not fight over SQLite: SQLite has one writer at a time. The
//! workers share one [`Ledger`] (balances in memory plus the store's write connection) behind a
//! mutex, so exactly one of them writes at any moment and `SQLITE_BUSY` can only come from outside
//! the process. What the pool buys is overlap: while one worker holds the ledger and waits for
//! fsync, another has already taken the next transaction off the queue and is waiting for the
//! lock; when it gets it, it drains everything that piled up meanwhile into one batch. Replies and
//! metrics are sent after the lock is released.
//!
//! One worker is the default, by measurement (`bench/run.sh`, two runs of 3 × 15 s on 2026-11-25,
//! on these 2-core machines). At 64 connections one worker beat two in all six pairings (43-50k
//! against 40-44k durable transactions/s, p99 9-11 ms against 11-15 ms); at 256 connections the two
//! were within the noise of each other (42-56k against 47-56k) and four was never better. With one
//! worker every transaction that arrives during a commit lands in the next batch, and no thread is
//! woken only to wait for the lock; the overlap a second worker buys is worth less than the CPU it
//! takes from HTTP on 2 cores. `--workers` is there for machines with more cores.
//!
//! A worker never waits for a batch to fill when the queue is empty (`--batch-wait-us` is 0 by
//! default): with fewer clients than the batch limit, waiting only adds latency, and batches grow
//! by themselves under load because requests pile up during each fsync.

mod accounts;
mod keys;
pub mod ledger;
mod postgres;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

pub use ledger::{Committed, Ledger, Outcome, Refusal, Render, SharedState};
pub use postgres::Pools;

use crate::config::Config;
use crate::domain::{CardNumber, Command, IdempotencyKey};
use crate::store::{AccountState, Store, StoreError, Totals};

/// A command waiting in the queue, with the channel its answer goes back on.
pub struct Job {
    pub command: Command,
    /// The client's `Idempotency-Key`, if it sent one.
    pub key: Option<IdempotencyKey>,
    /// What the key is scoped to: the route ([`Command::scope`]), prefixed with the API key's name
    /// when the caller used one (`"checkout/transaction"`), so that callers never share answers.
    pub scope: &'static str,
    pub reply: oneshot::Sender<Outcome>,
}

/// Why a transaction was not queued. Nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the transaction queue is full")]
    QueueFull,
    #[error("the engine is shutting down")]
    ShuttingDown,
}

/// What the engine shares with observers: totals for the average balance, and write health.
#[derive(Debug, Default)]
pub struct EngineState {
    /// Updated after every commit; a std mutex because it is held for nanoseconds and never across
    /// an await or an fsync.
    pub totals: Mutex<Totals>,
    /// False after a batch failed to commit, true again after one succeeds (drives `/readyz`).
    pub writable: AtomicBool,
    /// Transactions taken off the queue by workers and not yet answered.
    pub in_progress: AtomicUsize,
    /// Transactions committed after the balance checkpoint, as of the last batch or write-back.
    pub write_back_lag: AtomicU64,
}

impl EngineState {
    /// The average committed balance (a derived float, for display).
    pub fn average_balance(&self) -> f64 {
        self.totals.lock().map_or(0.0, |totals| totals.average())
    }
}

/// The handle HTTP handlers use to queue transactions. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    queue: flume::Sender<Job>,
    /// Bulk requests wait in a queue of their own, so that a worker takes the single requests
    /// waiting before each one (see [`worker`]): a stream of bulk requests then delays a single
    /// transfer by about one batch, not by every bulk request queued before it.
    bulk_queue: flume::Sender<Job>,
    capacity: usize,
    state: Arc<EngineState>,
    committed: SharedState,
    /// True on PostgreSQL: nothing is kept in `committed`, and every read asks the database.
    database_decides: bool,
    /// On PostgreSQL, where an account's credit terms are read from (the database's).
    credit_lookup: Option<CreditLookup>,
}

/// Reads an account's credit terms from the database (PostgreSQL keeps none in memory).
pub type CreditLookup = Arc<dyn Fn(&CardNumber) -> crate::store::Credit + Send + Sync>;

/// The worker threads; join them after every [`Engine`] handle is dropped.
pub struct Workers {
    handles: Vec<JoinHandle<()>>,
}

impl Engine {
    /// Loads every balance from `store` and starts `config.workers` workers on it. `render` says
    /// how an outcome is answered, for the answers stored under idempotency keys.
    pub fn start<S: Store>(
        store: S,
        config: &Config,
        render: Render,
    ) -> Result<(Engine, Workers), StoreError> {
        let loading = std::time::Instant::now();
        let mut ledger = Ledger::load(store, render)?;
        tracing::info!(
            accounts = ledger.totals().accounts,
            ms = loading.elapsed().as_millis() as u64,
            "loaded every balance"
        );
        // The holds that expired while tallyd was down are expired before any request is decided
        // (a capture of one would be refused as expired anyway: the rules read the clock).
        let now = crate::unix_ms_now();
        let mut expired = 0;
        loop {
            let batch = ledger.expire_due(now, worker::HOLD_SWEEP_MAX);
            expired += batch;
            if batch < worker::HOLD_SWEEP_MAX {
                break;
            }
        }
        if expired > 0 {
            tracing::info!(
                holds = expired,
                "expired the holds whose time ran out while tallyd was down"
            );
        }
        let committed = ledger.shared();
        let totals = ledger.totals();
        let state = Arc::new(EngineState {
            totals: Mutex::new(totals),
            writable: true.into(),
            in_progress: AtomicUsize::new(0),
            write_back_lag: AtomicU64::new(0),
        });
        let capacity = config.queue_depth as usize;
        let (queue, receiver) = flume::bounded(capacity);
        // Bulk requests in flight are bounded before they are queued; the queue holds them all.
        let (bulk_queue, bulk_receiver) = flume::bounded(crate::config::limits::BULK_REQUESTS_IN_FLIGHT_MAX);
        let ledger = Arc::new(Mutex::new(ledger));
        let limits = worker::BatchLimits {
            max: config.batch_max as usize,
            wait: config.batch_wait(),
            idempotency_retention: config.idempotency_retention(),
        };
        let handles = (0..config.workers)
            .map(|index| {
                let queues = worker::Queues {
                    singles: receiver.clone(),
                    bulk: bulk_receiver.clone(),
                };
                let ledger = Arc::clone(&ledger);
                let state = Arc::clone(&state);
                std::thread::Builder::new()
                    .name(format!("tallyd-worker-{index}"))
                    .spawn(move || worker::run(queues, ledger, limits, state))
                    .expect("spawning a worker thread")
            })
            .collect();
        Ok((
            Engine {
                queue,
                bulk_queue,
                capacity,
                state,
                committed,
                database_decides: false,
                credit_lookup: None,
            },
            Workers { handles },
        ))
    }

    /// Queues a command without waiting; the answer arrives on the returned receiver once its
    /// batch is committed (or refused).
    pub fn submit(
        &self,
        command: Command,
        key: Option<IdempotencyKey>,
        scope: &'static str,
    ) -> Result<oneshot::Receiver<Outcome>, SubmitError> {
        let (reply, answer) = oneshot::channel();
        let queue = match command {
            Command::BulkTransfer(_) => &self.bulk_queue,
            _ => &self.queue,
        };
        match queue.try_send(Job {
            command,
            key,
            scope,
            reply,
        }) {
            Ok(()) => Ok(answer),
            Err(flume::TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(flume::TrySendError::Disconnected(_)) => Err(SubmitError::ShuttingDown),
        }
    }

    /// A card account's committed state (what every read of its balance answers); `None` without
    /// such an account.
    pub fn account(&self, card: &CardNumber) -> Option<AccountState> {
        self.committed.read().card(card)
    }

    /// A card account's overdraft limit and held amount (zero for most accounts).
    pub fn credit(&self, card: &CardNumber) -> crate::store::Credit {
        if let Some(lookup) = &self.credit_lookup {
            return lookup(card);
        }
        self.committed.read().credit(card)
    }

    /// The idempotency records that may hold `key` on any of `scopes`, each with its scope (to
    /// be checked against the record's own name).
    pub fn key_candidates(&self, key: &IdempotencyKey, scopes: &[&str]) -> Vec<(String, i64)> {
        if self.database_decides {
            // No index in memory: the reader looks the key up by name in each scope.
            return scopes.iter().map(|scope| ((*scope).to_owned(), 0)).collect();
        }
        let committed = self.committed.read();
        scopes
            .iter()
            .filter_map(|scope| {
                committed
                    .key_candidate(scope, key)
                    .map(|id| ((*scope).to_owned(), id))
            })
            .collect()
    }

    /// Card accounts in memory, and the bytes their table holds.
    pub fn accounts_memory(&self) -> (usize, usize) {
        self.committed.read().accounts_memory()
    }

    /// How many idempotency keys are live (kept, and indexed in memory).
    pub fn live_keys(&self) -> usize {
        self.committed.read().live_keys()
    }

    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    /// Transactions in workers' hands: taken off the queue, not yet answered.
    pub fn in_progress(&self) -> usize {
        self.state.in_progress.load(Ordering::Relaxed)
    }

    pub fn queue_capacity(&self) -> usize {
        self.capacity
    }

    pub fn state(&self) -> &Arc<EngineState> {
        &self.state
    }
}

impl Workers {
    /// Waits until every worker has drained the queue and exited. Workers exit once every
    /// [`Engine`] handle is gone and the queue is empty.
    pub fn join(self) {
        for handle in self.handles {
            if handle.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    }
}
