//! The engine on PostgreSQL: the same bounded queue and the same rules, but no balances kept in
//! memory between batches, because another instance may move them (see
//! [`crate::store::postgres`] for what this backend guarantees).
//!
//! Each worker thread runs its own single-threaded runtime and takes a batch off the queue as on
//! SQLite. It opens a transaction, locks the holds and then the accounts the batch names (one
//! global order), reads their credit terms and the batch's idempotency keys, takes a block of ids,
//! and builds a [`Ledger`] over a [`Snapshot`]: a [`Store`] that answers `load` with just those
//! locked rows and keeps what `commit` is given. The ledger decides every command exactly as it
//! does on SQLite; the worker then writes the batch it decided with one statement per table and
//! commits. Several workers have several batches in flight on several connections; batches that
//! touch the same accounts queue on the row locks, the others proceed side by side.
//!
//! Why a snapshot [`Store`] and not a second set of rules: the rules are the ledger's, tested
//! there once; what changes with PostgreSQL is only where the committed state comes from (locked
//! rows instead of the in-memory table) and who writes it. The ledger needed no change for this.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Pool, Transaction};

use super::ledger::{Ledger, Outcome, Render, ScopedKey};
use super::{Engine, EngineState, Job, SharedState, Workers};
use crate::config::Config;
use crate::domain::{Account, BatchItem, CardKey, CardNumber, Command, WORLD_ACCOUNT};
use crate::store::postgres::{self, rows, write};
use crate::store::{
    AccountState, Batch, Credit, CreditRow, Hold, HoldStatus, KeyName, LedgerState, PackedAccount, Store,
    StoreError, StoredAnswer, StoredKey,
};
use crate::telemetry;

/// How often a batch is decided again after a deadlock, a serialization failure or a unique key
/// taken by another instance; past it the batch fails with 503 and nothing changed.
pub const ATTEMPTS_MAX: u32 = 6;
/// The first backoff between attempts; it doubles each time (2, 4, 8, 16, 32 ms), with jitter.
const BACKOFF_FIRST: Duration = Duration::from_millis(2);
/// How often a worker expires due holds and prunes old idempotency keys.
const BACKGROUND_PERIOD: Duration = Duration::from_secs(1);
/// Most holds one sweep expires, and most keys one prune deletes.
const SWEEP_MAX: i64 = 1_000;
const PRUNE_ROWS_MAX: i64 = 2_000;

/// The pools the workers use: one for the batches' transactions, one for the id blocks (taken
/// while a batch holds its transaction's connection, so from another pool: a worker never waits
/// for a second connection of the pool it already holds one of).
#[derive(Clone)]
pub struct Pools {
    pub write: Pool,
    pub ids: Pool,
}

impl Engine {
    /// Starts `config.workers` PostgreSQL workers. Nothing is loaded: every batch reads what it
    /// decides on.
    pub fn start_postgres(
        pools: Pools,
        config: &Config,
        render: Render,
        credit_lookup: super::CreditLookup,
    ) -> (Engine, Workers) {
        let state = Arc::new(EngineState {
            writable: true.into(),
            ..EngineState::default()
        });
        let capacity = config.queue_depth as usize;
        let (queue, receiver) = flume::bounded(capacity);
        let limits = Limits {
            batch_max: config.batch_max as usize,
            idempotency_retention_ms: i64::from(config.idempotency_retention_s) * 1000,
            keeps_totals: false,
        };
        let handles = (0..config.workers)
            .map(|index| {
                let receiver = receiver.clone();
                let state = Arc::clone(&state);
                let pools = pools.clone();
                let limits = Limits {
                    keeps_totals: index == 0,
                    ..limits
                };
                std::thread::Builder::new()
                    .name(format!("tallyd-pg-worker-{index}"))
                    .spawn(move || run(receiver, pools, limits, state, render))
                    .expect("spawning a worker thread")
            })
            .collect();
        (
            Engine {
                // One queue for both: a worker's batch is bounded by the transactions it may make
                // (see `run`), and the bulk slots bound how many bulk requests wait in it.
                bulk_queue: queue.clone(),
                queue,
                capacity,
                state,
                committed: SharedState::default(),
                database_decides: true,
                credit_lookup: Some(credit_lookup),
            },
            Workers { handles },
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    batch_max: usize,
    idempotency_retention_ms: i64,
    /// This worker re-reads the sum and count of the card balances for `/stats` once a period
    /// (one worker per instance does: it is a scan of every account).
    keeps_totals: bool,
}

/// One worker: until the queue is closed and empty, take a batch, decide and commit it, answer it;
/// once a period, the background jobs.
fn run(queue: flume::Receiver<Job>, pools: Pools, limits: Limits, state: Arc<EngineState>, render: Render) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start a worker's runtime; this worker stops");
            return;
        }
    };
    runtime.block_on(async move {
        let mut batch: Vec<Job> = Vec::with_capacity(limits.batch_max);
        let mut background_at = Instant::now();
        // The bulk request that would have taken the last batch past `batch_max` transactions:
        // the first of the next one.
        let mut held: Option<Job> = None;
        if limits.keeps_totals {
            read_totals(&pools.write, &state).await;
        }
        loop {
            let first = match held.take() {
                Some(job) => Some(job),
                None => match tokio::time::timeout(BACKGROUND_PERIOD, queue.recv_async()).await {
                    Ok(Ok(job)) => Some(job),
                    Ok(Err(_)) => return,
                    Err(_) => None,
                },
            };
            if background_at.elapsed() >= BACKGROUND_PERIOD {
                background(&pools, limits, render).await;
                if limits.keeps_totals {
                    read_totals(&pools.write, &state).await;
                }
                background_at = Instant::now();
            }
            let Some(first) = first else { continue };
            let mut weight = super::worker::weight(&first);
            batch.push(first);
            while weight < limits.batch_max {
                let Ok(job) = queue.try_recv() else { break };
                let more = super::worker::weight(&job);
                if weight + more > limits.batch_max {
                    held = Some(job);
                    break;
                }
                weight += more;
                batch.push(job);
            }
            state.in_progress.fetch_add(batch.len(), Ordering::Relaxed);
            let started = Instant::now();
            let commands: Vec<(&Command, Option<ScopedKey<'_>>)> = batch
                .iter()
                .map(|job| (&job.command, job.key.as_ref().map(|key| (job.scope, key))))
                .collect();
            let (outcomes, ok) = decide_and_commit(&pools, &commands, render, None).await;
            drop(commands);
            telemetry::record_batch(batch.len(), started.elapsed(), ok);
            state.writable.store(ok, Ordering::Relaxed);
            let answered = batch.len();
            for (job, outcome) in batch.drain(..).zip(outcomes) {
                let _ = job.reply.send(outcome);
            }
            state.in_progress.fetch_sub(answered, Ordering::Relaxed);
        }
    });
}

/// Why an attempt at a batch did not commit.
enum Failure {
    /// Rolled back; deciding again may succeed (a deadlock, a key or an account taken meanwhile).
    Conflict(String),
    /// Rolled back, or never begun; nothing changed.
    Failed(String),
    /// `COMMIT` was sent and no answer came: the batch may or may not be committed.
    Unknown(String),
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Conflict(text) => Failure::Conflict(text),
            StoreError::OutcomeUnknown(text) => Failure::Unknown(text),
            other => Failure::Failed(other.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for Failure {
    fn from(error: tokio_postgres::Error) -> Self {
        postgres::store_error(&error).into()
    }
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        Failure::Failed(format!(
            "no PostgreSQL connection: {}",
            postgres::with_causes(&error)
        ))
    }
}

/// Decides and commits one batch, deciding it again after a conflict (up to [`ATTEMPTS_MAX`]).
/// `sweep` makes it the holds sweeper's batch: the due holds it can lock are its commands.
/// Returns one outcome per command and whether the batch committed.
async fn decide_and_commit(
    pools: &Pools,
    commands: &[(&Command, Option<ScopedKey<'_>>)],
    render: Render,
    sweep: Option<i64>,
) -> (Vec<Outcome>, bool) {
    let mut backoff = BACKOFF_FIRST;
    let mut failed = Outcome::StorageFailed;
    for attempt in 1..=ATTEMPTS_MAX {
        match attempt_batch(pools, commands, render, sweep).await {
            Ok(outcomes) => return (outcomes, true),
            Err(Failure::Conflict(reason)) if attempt < ATTEMPTS_MAX => {
                tracing::debug!(%reason, attempt, "a batch met another instance's; deciding it again");
                tokio::time::sleep(jittered(backoff)).await;
                backoff *= 2;
            }
            Err(Failure::Conflict(reason)) | Err(Failure::Failed(reason)) => {
                tracing::error!(%reason, commands = commands.len(), "a batch failed to commit; nothing of it was written");
                break;
            }
            Err(Failure::Unknown(reason)) => {
                tracing::error!(%reason, commands = commands.len(), "the connection failed during COMMIT: the batch may or may not be committed (clients retry with their Idempotency-Key)");
                failed = Outcome::OutcomeUnknown;
                break;
            }
        }
    }
    (vec![failed; commands.len()], false)
}

/// Between 1/2 and 3/2 of `base`, so that two instances that met do not meet again in step.
fn jittered(base: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    base / 2 + base * u32::from(byte[0]) / 255
}

/// One attempt: BEGIN, decide on locked rows, write, COMMIT.
async fn attempt_batch(
    pools: &Pools,
    commands: &[(&Command, Option<ScopedKey<'_>>)],
    render: Render,
    sweep: Option<i64>,
) -> Result<Vec<Outcome>, Failure> {
    let mut client = pools.write.get().await?;
    let tx = client.transaction().await?;
    let swept: Vec<Command>;
    let commands: Vec<(&Command, Option<ScopedKey<'_>>)> = match sweep {
        None => commands.to_vec(),
        Some(now) => {
            swept = due_holds(&tx, now).await?;
            if swept.is_empty() {
                return Ok(Vec::new());
            }
            swept.iter().map(|command| (command, None)).collect()
        }
    };
    let (outcomes, batch) = decide(&tx, &pools.ids, &commands, render).await?;
    if let Some(batch) = &batch {
        write::batch(&tx, batch).await?;
    }
    tx.commit().await.map_err(|error| {
        if error.as_db_error().is_some() {
            // The server answered: it refused the commit, and nothing of it happened.
            Failure::from(error)
        } else {
            Failure::Unknown(postgres::describe(&error))
        }
    })?;
    Ok(outcomes)
}

/// The holds due at `now` that no other instance is expiring (`SKIP LOCKED`), as commands.
async fn due_holds(tx: &Transaction<'_>, now: i64) -> Result<Vec<Command>, Failure> {
    let statement = tx
        .prepare_cached(
            "SELECT id FROM holds WHERE status = 'pending' AND expires_at_ms <= $1 \
             ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .await?;
    let rows = tx.query(&statement, &[&now, &SWEEP_MAX]).await?;
    Ok(rows.iter().map(|row| Command::ExpireHold(row.get(0))).collect())
}

/// The background jobs of one period: expire due holds, prune old keys. Safe on every instance
/// at once; a failure is logged and the next period tries again.
async fn background(pools: &Pools, limits: Limits, render: Render) {
    let now = crate::unix_ms_now();
    let (outcomes, ok) = decide_and_commit(pools, &[], render, Some(now)).await;
    if ok && !outcomes.is_empty() {
        tracing::debug!(holds = outcomes.len(), "expired holds");
    }
    let before = now.saturating_sub(limits.idempotency_retention_ms);
    let pruned = async {
        let client = pools.write.get().await?;
        let statement = client
            .prepare_cached(
                "DELETE FROM idempotency_keys WHERE id IN (SELECT id FROM idempotency_keys \
                 WHERE created_at_ms < $1 ORDER BY created_at_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED)",
            )
            .await?;
        Ok::<u64, Failure>(client.execute(&statement, &[&before, &PRUNE_ROWS_MAX]).await?)
    };
    match pruned.await {
        Ok(0) => {}
        Ok(rows) => tracing::debug!(rows, "pruned expired idempotency keys"),
        Err(Failure::Conflict(reason) | Failure::Failed(reason) | Failure::Unknown(reason)) => {
            tracing::warn!(%reason, "pruning idempotency keys failed; the next period retries");
        }
    }
}

/// The sum and count of the card balances, for the average `/stats` shows (the database's, as of
/// the last period: no instance knows it otherwise).
async fn read_totals(pool: &Pool, state: &EngineState) {
    let read = async {
        let client = pool.get().await?;
        let row = client
            .query_one(
                "SELECT coalesce(sum(balance), 0)::text, count(*) FROM ledger_accounts WHERE name <> '@world'",
                &[],
            )
            .await?;
        Ok::<_, Failure>((row.get::<_, String>(0), row.get::<_, i64>(1)))
    };
    if let Ok((sum, accounts)) = read.await {
        if let Ok(balance_sum) = sum.parse::<i128>() {
            *state
                .totals
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = crate::store::Totals {
                balance_sum,
                accounts,
            };
        }
    }
}

/// What a batch names: the holds (by id), the cards, whether the outside world may move, and an
/// upper bound of the transactions, holds and keys it can make.
#[derive(Debug, Default)]
struct Named {
    holds: BTreeSet<i64>,
    cards: BTreeSet<String>,
    world: bool,
    transactions: i64,
    new_holds: i64,
    keys: i64,
}

fn named(commands: &[(&Command, Option<ScopedKey<'_>>)]) -> Named {
    let mut named = Named::default();
    for (command, key) in commands {
        named.keys += i64::from(key.is_some());
        match command {
            Command::OpenAccount(open) => name_card(&mut named, &open.card),
            Command::SetLimit(limit) => name_card(&mut named, &limit.card),
            Command::VoidHold(void) => {
                named.holds.insert(void.hold_id);
            }
            Command::ExpireHold(id) => {
                named.holds.insert(*id);
            }
            Command::Transaction(_)
            | Command::Transfer(_)
            | Command::PlaceHold(_)
            | Command::CaptureHold(_) => {
                name_item(&mut named, command_item(command));
            }
            Command::Batch(items) => {
                for item in items {
                    name_item(&mut named, ItemRef::from(item));
                }
            }
            Command::BulkTransfer(bulk) => {
                for item in &bulk.items {
                    named.keys += i64::from(item.key.is_some());
                    name_item(&mut named, command_item(&item.command));
                }
            }
        }
    }
    named
}

/// A money-moving command or batch item, seen the same way.
enum ItemRef<'a> {
    Transaction(&'a crate::domain::TransactionRequest),
    Transfer(&'a crate::domain::TransferRequest),
    Hold(&'a crate::domain::HoldRequest),
    Capture(i64),
    Void(i64),
}

impl<'a> From<&'a BatchItem> for ItemRef<'a> {
    fn from(item: &'a BatchItem) -> Self {
        match item {
            BatchItem::Transaction(request) => ItemRef::Transaction(request),
            BatchItem::Transfer(request) => ItemRef::Transfer(request),
            BatchItem::Hold(request) => ItemRef::Hold(request),
            BatchItem::Capture(capture) => ItemRef::Capture(capture.hold_id),
            BatchItem::Void(void) => ItemRef::Void(void.hold_id),
        }
    }
}

fn command_item(command: &Command) -> ItemRef<'_> {
    match command {
        Command::Transaction(request) => ItemRef::Transaction(request),
        Command::Transfer(request) => ItemRef::Transfer(request),
        Command::PlaceHold(request) => ItemRef::Hold(request),
        Command::CaptureHold(capture) => ItemRef::Capture(capture.hold_id),
        _ => unreachable!("only money-moving commands are items"),
    }
}

fn name_item(named: &mut Named, item: ItemRef<'_>) {
    match item {
        ItemRef::Transaction(request) => {
            name_card(named, &request.card);
            named.world = true;
            named.transactions += 1;
        }
        ItemRef::Transfer(request) => {
            name_card(named, &request.source);
            name_card(named, &request.destination);
            named.transactions += 1;
        }
        ItemRef::Hold(request) => {
            name_card(named, &request.card);
            if let Some(destination) = &request.destination {
                name_card(named, destination);
            }
            named.new_holds += 1;
        }
        ItemRef::Capture(id) => {
            named.holds.insert(id);
            // A capture without a destination pays the outside world.
            named.world = true;
            named.transactions += 1;
        }
        ItemRef::Void(id) => {
            named.holds.insert(id);
        }
    }
}

fn name_card(named: &mut Named, card: &CardNumber) {
    named.cards.insert(card.as_str().to_owned());
}

/// Locks and reads what the batch names, takes its ids, and decides it through the ledger.
/// Returns the outcomes and the batch to write (`None` when nothing changes).
async fn decide(
    tx: &Transaction<'_>,
    ids: &Pool,
    commands: &[(&Command, Option<ScopedKey<'_>>)],
    render: Render,
) -> Result<(Vec<Outcome>, Option<Batch>), Failure> {
    let mut named = named(commands);
    // 1. The holds, by id: their cards are the accounts a capture or a void moves.
    let mut pending_holds = Vec::new();
    let mut statuses = HashMap::new();
    if !named.holds.is_empty() {
        let wanted: Vec<i64> = named.holds.iter().copied().collect();
        let statement = tx
            .prepare_cached(&format!(
                "SELECT {} FROM holds WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                rows::HOLD_COLUMNS
            ))
            .await?;
        for row in tx.query(&statement, &[&wanted]).await? {
            let hold = rows::hold(&row)?;
            if hold.status == HoldStatus::Pending {
                named.cards.insert(hold.card.as_str().to_owned());
                if let Some(destination) = &hold.destination {
                    named.cards.insert(destination.as_str().to_owned());
                }
                pending_holds.push(hold);
            } else {
                statuses.insert(hold.id, hold.status);
            }
        }
    }
    // 2. The accounts, by name in one order, and 3. the keys, read together.
    if named.world {
        named.cards.insert(WORLD_ACCOUNT.to_owned());
    }
    let names: Vec<&str> = named.cards.iter().map(String::as_str).collect();
    let (accounts, keys) = tokio::join!(lock_accounts(tx, &names), read_keys(tx, commands));
    let (accounts, keys) = (accounts?, keys?);
    // 4. The ids, now that every account the batch moves is ours until it commits.
    let blocks = take_ids(ids, &named).await?;
    let locked: BTreeSet<String> = accounts.iter().map(|row| row.name.clone()).collect();
    let state = snapshot_state(accounts, &keys, pending_holds, blocks)?;
    let written = Arc::new(Mutex::new(None));
    let snapshot = Snapshot {
        state: Some(state),
        answers: keys.into_iter().collect(),
        statuses,
        written: Arc::clone(&written),
    };
    let mut ledger = Ledger::load(snapshot, render)?;
    let report = ledger.apply_batch(commands.iter().copied(), crate::unix_ms_now());
    if !report.commit_ok {
        return Err(Failure::Failed("the batch could not be decided".into()));
    }
    let batch = written
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    if let Some(batch) = &batch {
        check_locked(batch, &locked, &blocks)?;
    }
    Ok((report.outcomes, batch))
}

/// One locked account row.
struct AccountRow {
    name: String,
    state: AccountState,
    credit: Credit,
    /// When its last transaction was made.
    last_at_ms: Option<i64>,
}

async fn lock_accounts(tx: &Transaction<'_>, names: &[&str]) -> Result<Vec<AccountRow>, Failure> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx
        .prepare_cached(
            "SELECT a.name, a.balance, a.last_transaction_id, coalesce(c.overdraft_limit, 0), coalesce(c.held, 0), \
             t.created_at_ms FROM ledger_accounts a \
             LEFT JOIN account_credit c ON c.name = a.name \
             LEFT JOIN transactions t ON t.id = a.last_transaction_id \
             WHERE a.name = ANY($1) ORDER BY a.name COLLATE \"C\" FOR UPDATE OF a",
        )
        .await?;
    let rows = tx.query(&statement, &[&names]).await?;
    Ok(rows
        .iter()
        .map(|row| AccountRow {
            name: row.get(0),
            state: AccountState {
                balance: row.get(1),
                last_transaction_id: row.get(2),
            },
            credit: Credit {
                overdraft_limit: row.get(3),
                held: row.get(4),
            },
            last_at_ms: row.get(5),
        })
        .collect())
}

/// The stored records of the batch's keys, by id.
async fn read_keys(
    tx: &Transaction<'_>,
    commands: &[(&Command, Option<ScopedKey<'_>>)],
) -> Result<Vec<(i64, StoredKey)>, Failure> {
    let (scopes, names): (Vec<&str>, Vec<&str>) = commands
        .iter()
        .flat_map(|(command, key)| key.iter().copied().chain(super::ledger::bulk_item_keys(command)))
        .map(|(scope, key)| (scope, key.as_str()))
        .unzip();
    if scopes.is_empty() {
        return Ok(Vec::new());
    }
    let statement = tx
        .prepare_cached(
            "SELECT id, scope, idempotency_key, fingerprint, status, body FROM idempotency_keys \
             WHERE (scope, idempotency_key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
        )
        .await?;
    let rows = tx.query(&statement, &[&scopes, &names]).await?;
    rows.iter()
        .map(|row| {
            let status: i32 = row.get(4);
            Ok((
                row.get(0),
                StoredKey {
                    scope: row.get(1),
                    key: row.get(2),
                    answer: StoredAnswer {
                        fingerprint: row.get(3),
                        status: u16::try_from(status)
                            .map_err(|_| Failure::Failed(format!("a stored status of {status}")))?,
                        body: row.get(5),
                    },
                },
            ))
        })
        .collect()
}

/// The first id of each block the batch took, and how many it took.
#[derive(Debug, Clone, Copy)]
struct Blocks {
    transactions: (i64, i64),
    holds: (i64, i64),
    keys: (i64, i64),
}

/// Far above any id, for a block of none: nothing is numbered from it, and every existing hold
/// is below it (the ledger asks the store about the named holds below its next hold id).
const NO_BLOCK: i64 = i64::MAX / 2;

/// Takes contiguous blocks of ids for what the batch may make, in one short transaction of its
/// own on another connection (see the module doc of [`crate::store::postgres`] for why it may
/// commit asynchronously).
async fn take_ids(ids: &Pool, named: &Named) -> Result<Blocks, Failure> {
    let wanted = (named.transactions, named.new_holds, named.keys);
    if wanted == (0, 0, 0) {
        return Ok(Blocks {
            transactions: (NO_BLOCK, 0),
            holds: (NO_BLOCK, 0),
            keys: (NO_BLOCK, 0),
        });
    }
    let client = ids.get().await?;
    // Integers only, so formatting them into the text is safe; one round trip.
    let sql = format!(
        "BEGIN; SET LOCAL synchronous_commit = off; \
         UPDATE tallyd_ids SET next_transaction_id = next_transaction_id + {}, next_hold_id = next_hold_id + {}, \
         next_key_id = next_key_id + {} WHERE id = 1 \
         RETURNING next_transaction_id - {}, next_hold_id - {}, next_key_id - {}; COMMIT",
        wanted.0, wanted.1, wanted.2, wanted.0, wanted.1, wanted.2
    );
    let messages = client.simple_query(&sql).await?;
    let row = messages
        .iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or_else(|| Failure::Failed("tallyd_ids has no row".into()))?;
    let first = |at: usize| -> Result<i64, Failure> {
        row.get(at)
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| Failure::Failed("tallyd_ids returned no id".into()))
    };
    Ok(Blocks {
        transactions: (first(0)?, wanted.0),
        holds: (first(1)?, wanted.1),
        keys: (first(2)?, wanted.2),
    })
}

/// The ledger's view of the locked rows.
fn snapshot_state(
    accounts: Vec<AccountRow>,
    keys: &[(i64, StoredKey)],
    pending_holds: Vec<Hold>,
    blocks: Blocks,
) -> Result<LedgerState, Failure> {
    let mut state = LedgerState {
        keys: keys
            .iter()
            .map(|(id, key)| KeyName {
                id: *id,
                scope: key.scope.clone(),
                key: key.key.clone(),
            })
            .collect(),
        pending_holds,
        next_transaction_id: blocks.transactions.0,
        next_hold_id: blocks.holds.0,
        next_key_id: blocks.keys.0,
        ..LedgerState::default()
    };
    for row in accounts {
        state.last_at_unix_ms = state.last_at_unix_ms.max(row.last_at_ms.unwrap_or(0));
        if row.name == WORLD_ACCOUNT {
            state.world = row.state;
            continue;
        }
        let card = rows::card(&row.name)?;
        if !row.credit.is_none() {
            state.credit.push(CreditRow {
                card: card.clone(),
                credit: row.credit,
            });
        }
        state
            .cards
            .push(PackedAccount::new(CardKey::of(&card), row.state));
    }
    Ok(state)
}

/// Checks what the writes rely on: every account a leg moves was locked (or opened) by this
/// batch, and every id is from the batch's blocks. A failure is a bug in this module; the batch
/// fails whole (503) rather than write what was decided on rows it did not hold.
fn check_locked(batch: &Batch, locked: &BTreeSet<String>, blocks: &Blocks) -> Result<(), Failure> {
    let opened: BTreeSet<&str> = batch
        .accounts
        .iter()
        .map(|account| account.card.as_str())
        .collect();
    let within = |id: i64, (first, count): (i64, i64)| id >= first && id < first + count;
    let unlocked = write::leg_accounts(batch).find(|account| {
        let name = account.name();
        !locked.contains(name) && !opened.contains(name)
    });
    // A hold placed now is numbered from the block; one resolved now is older than the block.
    let stray_hold = |id: i64| id >= blocks.holds.0 && !within(id, blocks.holds);
    let stray_id = batch
        .transactions
        .iter()
        .any(|record| !within(record.id, blocks.transactions))
        || batch
            .idempotency
            .iter()
            .any(|record| !within(record.id, blocks.keys))
        || batch.holds.iter().any(|hold| stray_hold(hold.id));
    if let Some(account) = unlocked {
        return Err(Failure::Failed(format!(
            "the batch moved {}, which it did not lock",
            account.name()
        )));
    }
    if stray_id {
        return Err(Failure::Failed(
            "the batch numbered a record outside its blocks".into(),
        ));
    }
    Ok(())
}

/// A [`Store`] over one batch's locked rows: `load` answers with them, the look-ups with what was
/// read with them, and `commit` keeps the batch for the worker to write in the same transaction.
struct Snapshot {
    state: Option<LedgerState>,
    answers: HashMap<i64, StoredKey>,
    statuses: HashMap<i64, HoldStatus>,
    written: Arc<Mutex<Option<Batch>>>,
}

impl Store for Snapshot {
    fn load(&mut self) -> Result<LedgerState, StoreError> {
        // The ledger loads once; a second load would mean it wants to re-read after a failed
        // commit, which a snapshot cannot serve.
        self.state
            .take()
            .ok_or_else(|| StoreError::Retryable("a batch's snapshot is read once".into()))
    }

    fn changed_outside(&mut self) -> Result<bool, StoreError> {
        // Everything the batch decides on is locked by its transaction.
        Ok(false)
    }

    fn idempotent_answers(&mut self, ids: &[i64]) -> Result<Vec<Option<StoredKey>>, StoreError> {
        Ok(ids.iter().map(|id| self.answers.get(id).cloned()).collect())
    }

    fn hold_statuses(&mut self, ids: &[i64]) -> Result<Vec<Option<HoldStatus>>, StoreError> {
        Ok(ids.iter().map(|id| self.statuses.get(id).copied()).collect())
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        *self
            .written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(batch.clone());
        Ok(())
    }

    fn write_back(
        &mut self,
        _accounts: &[(Account, AccountState)],
        _checkpoint: Option<i64>,
    ) -> Result<(), StoreError> {
        // The batch's writes update the rows themselves.
        Ok(())
    }

    fn prune_idempotency(
        &mut self,
        _before_unix_ms: i64,
        _rows_max: u32,
    ) -> Result<Vec<crate::store::KeyName>, StoreError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{
        Amount, CaptureRequest, IdempotencyKey, PositiveAmount, TransactionRequest, TransferRequest,
        VoidRequest,
    };
    use crate::store::{Leg, NewAccount, TransactionRecord};

    fn card(n: u8) -> CardNumber {
        CardNumber::parse(&format!("40000000{n:02}")).unwrap()
    }

    fn transfer(from: u8, to: u8) -> Command {
        Command::Transfer(TransferRequest {
            source: card(from),
            destination: card(to),
            amount: PositiveAmount::new(5).unwrap(),
            reference: None,
        })
    }

    #[test]
    fn a_batch_names_its_cards_holds_and_the_world_and_bounds_what_it_makes() {
        let key = IdempotencyKey::parse(b"k-1").unwrap();
        let deposit = Command::Transaction(TransactionRequest {
            card: card(3),
            amount: Amount::new(10).unwrap(),
        });
        let capture = Command::CaptureHold(CaptureRequest {
            hold_id: 9,
            amount: None,
        });
        let batch = Command::Batch(vec![
            BatchItem::Transfer(TransferRequest {
                source: card(4),
                destination: card(5),
                amount: PositiveAmount::new(1).unwrap(),
                reference: None,
            }),
            BatchItem::Void(VoidRequest { hold_id: 7 }),
        ]);
        let commands = [
            (&transfer(1, 2), None),
            (&deposit, Some(("/transaction", &key))),
            (&capture, None),
            (&batch, None),
        ];
        let named = named(&commands);
        let cards: Vec<String> = (1..=5).map(|n| card(n).as_str().to_owned()).collect();
        assert_eq!(named.cards.into_iter().collect::<Vec<_>>(), cards);
        assert_eq!(named.holds.into_iter().collect::<Vec<_>>(), [7, 9]);
        assert!(named.world, "a deposit and a capture may move the outside world");
        assert_eq!((named.transactions, named.new_holds, named.keys), (4, 0, 1));
    }

    #[test]
    fn transfers_between_cards_leave_the_world_unlocked() {
        let commands = [(&transfer(1, 2), None), (&transfer(2, 1), None)];
        let named = named(&commands);
        assert!(
            !named.world,
            "the outside world's row is the hottest: locked only when it may move"
        );
        assert_eq!(named.transactions, 2);
    }

    #[test]
    fn a_batch_that_moves_an_account_it_did_not_lock_is_refused() {
        let leg = |account: Account, amount| Leg {
            account,
            amount,
            balance_after: amount,
            previous_id: None,
        };
        let batch = Batch {
            accounts: vec![NewAccount { card: card(2) }],
            transactions: vec![TransactionRecord {
                id: 100,
                kind: crate::domain::Kind::Transfer,
                amount: 1,
                reference: None,
                idempotency_key: None,
                legs: [leg(Account::Card(card(1)), -1), leg(Account::Card(card(2)), 1)],
            }],
            ..Batch::default()
        };
        let blocks = Blocks {
            transactions: (100, 1),
            holds: (NO_BLOCK, 0),
            keys: (NO_BLOCK, 0),
        };
        let locked: BTreeSet<String> = [card(1).as_str().to_owned()].into();
        assert!(
            check_locked(&batch, &locked, &blocks).is_ok(),
            "opened now counts as locked"
        );
        let outside = Blocks {
            transactions: (101, 1),
            ..blocks
        };
        assert!(
            check_locked(&batch, &locked, &outside).is_err(),
            "an id outside the block"
        );
        let nothing_locked = BTreeSet::new();
        let unopened = Batch {
            accounts: Vec::new(),
            ..batch
        };
        assert!(
            check_locked(&unopened, &nothing_locked, &blocks).is_err(),
            "a leg on an unlocked account"
        );
    }

    #[test]
    fn backoff_is_jittered_around_its_base() {
        for _ in 0..100 {
            let wait = jittered(Duration::from_millis(8));
            assert!(
                wait >= Duration::from_millis(4) && wait <= Duration::from_millis(12),
                "{wait:?}"
            );
        }
    }
}
