//! The ledger's rules and the state they are decided against.
//!
//! The ledger holds every account's balance in memory, exactly as last committed, loaded once at
//! start-up, so that a batch is decided without reading a balance; the store only appends (and
//! reads back the answers of used idempotency keys). Within a batch each command is decided
//! against the state left by the ones before it, and each succeeds or fails **as a whole and on
//! its own**: a transfer's two legs are staged together or not at all, and a refused command does
//! not undo its neighbours.
//!
//! Every movement is double entry: a [`TransactionRecord`] with two legs that sum to zero. A
//! deposit is a transfer from the outside world ([`Account::World`], which may go negative) to a
//! card, a withdrawal one from a card to the outside world. Ids are assigned here, in order, by the
//! one writer, so a command's whole answer is known when it is decided: a keyed command's answer
//! is rendered then and stored in the same commit as its effect.
//!
//! Idempotency: a keyed command first looks for its key, in this batch and then in the index of
//! live keys ([`KeyIndex`]), whose record the store reads back. The same request under a used key
//! gets the stored answer back and moves nothing; a different request under it is refused. Because
//! a batch is decided and committed before the next one is decided, a retry that arrives while its
//! first request is queued or committing simply finds the first one's answer: there is never a
//! second execution.
//!
//! The committed state ([`Committed`]) is shared with the read routes behind a lock that the
//! writer holds for writing only while it absorbs a committed batch, so a balance read is one map
//! lookup and always the committed one. The accounts' stored rows lag behind it until the
//! write-back ([`Ledger::write_back_step`]) brings them up to date, a chunk between batches.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// The ledger's maps are keyed by card numbers that clients choose (an account can be opened by
/// API), so the hasher must resist crafted collisions; aHash does, at a fraction of SipHash's cost
/// on the writer's path.
type Map<K, V> = HashMap<K, V, ahash::RandomState>;
type Set<K> = HashSet<K, ahash::RandomState>;

mod holds;

use super::accounts::Accounts;
use super::keys::KeyIndex;
use crate::domain::{
    Account, BulkTransferRequest, CardKey, CardNumber, Command, IdempotencyKey, Kind, OpenAccountRequest,
    TransactionRequest, TransferRequest,
};
use crate::store::{
    AccountState, Batch, Credit, CreditRow, Hold, HoldStatus, IdempotencyRecord, LedgerState, Leg,
    NewAccount, Store, StoreError, StoredAnswer, Totals, TransactionRecord,
};

/// What the engine decided for one command. A refusal is an outcome, not an error: the request
/// was valid and the ledger said no. Only `Opened`, `Posted` and `Transferred` changed anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `POST /accounts`: the account exists now, with balance zero.
    Opened { created_at_ms: i64 },
    /// `POST /transaction`: on disk. `balance` is the card's balance after it.
    Posted {
        id: i64,
        balance: i64,
        created_at_ms: i64,
    },
    /// `POST /transfers`: on disk, both legs.
    Transferred {
        id: i64,
        source_balance: i64,
        destination_balance: i64,
        created_at_ms: i64,
    },
    /// `POST /holds`, a capture, a void or an expiry: the hold as it is now, with its card's
    /// balance and what is available on it.
    Held {
        hold: Box<Hold>,
        balance: i64,
        available: i64,
    },
    /// `PATCH /accounts/{card}`: the account's terms now.
    LimitSet {
        balance: i64,
        credit: Credit,
        available: i64,
    },
    /// `POST /batches`: every item took effect, each with its own outcome, in order.
    Batch(Vec<Outcome>),
    /// Decided, and nothing changed.
    Refused(Refusal),
    /// The key was used before by the same request: its first answer, byte for byte.
    Replayed(StoredAnswer),
    /// `POST /transfers/bulk`: one outcome per item, in order, each decided as a single
    /// `POST /transfers` would be (so an item may be `Transferred`, `Refused` or `Replayed`).
    Bulk(Vec<Outcome>),
    /// The batch could not be committed (disk full, read-only, I/O error). Nothing changed.
    StorageFailed,
    /// The connection to the database failed while the batch's commit was in flight (PostgreSQL):
    /// it may or may not have committed. A retry under the same idempotency key finds out.
    OutcomeUnknown,
}

/// Why the ledger said no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The debit (or the hold) is larger than what is available: the balance, less what is held,
    /// plus the overdraft limit.
    InsufficientFunds { balance: i64, available: i64 },
    /// No account has this card number.
    CardNotFound { card: CardNumber },
    /// The credit would push the balance past i64::MAX minor units.
    BalanceLimitExceeded { balance: i64 },
    /// `POST /accounts` for a card that has an account.
    AccountExists,
    /// The idempotency key was used before with a different request.
    IdempotencyKeyReused,
    /// No hold has this id.
    HoldNotFound { id: i64 },
    /// The hold was resolved before (captured, voided or expired), or its time is up.
    HoldResolved { id: i64, status: HoldStatus },
    /// A capture of more than the hold reserved.
    CaptureExceedsHold { held: i64 },
    /// A new overdraft limit below what the account already uses.
    LimitBelowUsage { balance: i64, held: i64 },
    /// One item of an all-or-nothing batch was refused, so none took effect.
    BatchFailed { index: usize, refusal: Box<Refusal> },
}

/// Turns an outcome into what the client is answered (status and body). Given by the HTTP layer at
/// start-up, so that a keyed command's answer is stored with its effect while the engine stays free
/// of HTTP.
pub type Render = fn(&Command, &Outcome) -> (u16, Vec<u8>);

/// An idempotency key with what it is scoped to (the route, or the API key's name and the route):
/// the same key in two scopes is two keys.
pub type ScopedKey<'a> = (&'static str, &'a IdempotencyKey);

/// Why a debit or credit of a card is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardRule {
    InsufficientFunds,
    BalanceLimitExceeded,
}

/// The rule of a card account: its new balance after a signed change of `amount` minor units,
/// or why there is none. A debit may spend what is available (the balance, less what is held,
/// plus the overdraft limit) and no more; a credit is always taken unless it would pass i64::MAX;
/// arithmetic never wraps.
pub fn apply(balance: i64, credit: Credit, amount: i64) -> Result<i64, CardRule> {
    let Some(new) = balance.checked_add(amount) else {
        return Err(if amount > 0 {
            CardRule::BalanceLimitExceeded
        } else {
            CardRule::InsufficientFunds
        });
    };
    if amount < 0 && credit.available(new) < 0 {
        return Err(CardRule::InsufficientFunds);
    }
    Ok(new)
}

/// What is available on an account, as answered (an i64 large enough for any real account; only a
/// balance near i64::MAX with a limit could pass it).
pub fn available(balance: i64, credit: Credit) -> i64 {
    i64::try_from(credit.available(balance)).unwrap_or(i64::MAX)
}

/// What a batch did, for the worker to report.
#[derive(Debug)]
pub struct BatchReport {
    /// One per command, in order.
    pub outcomes: Vec<Outcome>,
    /// Sum and count of all card balances after the batch.
    pub totals: Totals,
    /// Whether the store accepted the batch's commit (true when there was nothing to commit).
    pub commit_ok: bool,
}

/// How often a batch is decided again when the store says another writer changed the database
/// underneath it; past this the batch fails with 503 and nothing changed.
const COMMIT_ATTEMPTS_MAX: u32 = 3;

/// Most accounts written back in one store transaction (one step between two batches), so that
/// a chunk holds up the next batch by a few milliseconds at most: in name order a chunk rewrites a
/// run of neighbouring pages at 100,000 accounts, but at ten million each row is on a page of its
/// own, and 2,048 of them (8 MB of WAL) put 95 ms into the p99 of the requests behind them.
pub const WRITE_BACK_CHUNK_ACCOUNTS: usize = 512;
/// A write-back round starts when the checkpoint is this many transactions behind: it bounds what
/// a start-up after a crash replays (about 0.1 s of reading here).
pub const WRITE_BACK_LAG_TRANSACTIONS: i64 = 200_000;
/// ...or when anything moved and the last round ended this long ago, so that a quiet server's
/// rows catch up soon after its traffic stops.
pub const WRITE_BACK_PERIOD: Duration = Duration::from_secs(5);

/// Most table slots one write-back step scans for accounts it owes, so that a step over ten
/// million accounts of which few moved stays a millisecond or so.
pub const WRITE_BACK_SCAN_SLOTS: usize = 1 << 18;

/// The committed state, shared with the read routes.
#[derive(Default)]
pub struct Committed {
    /// Balance and last transaction of every card account, with the write-back's marks.
    cards: Accounts,
    /// The outside world's.
    world: AccountState,
    /// The live idempotency keys.
    keys: KeyIndex,
    /// The accounts with an overdraft limit or a pending hold; the rest have neither.
    credit: Map<CardKey, Credit>,
    /// Every pending hold, by id.
    holds: Map<i64, Hold>,
    /// The pending holds by expiry: (expires_at_ms, id), for the sweeper.
    expiries: BTreeSet<(i64, i64)>,
}

impl Committed {
    /// A card account's committed state; `None` without such an account.
    pub fn card(&self, card: &CardNumber) -> Option<AccountState> {
        self.cards.get(card)
    }

    /// A card account's credit terms and held amount (none for most).
    pub fn credit(&self, card: &CardNumber) -> Credit {
        self.credit_of(CardKey::of(card))
    }

    fn credit_of(&self, key: CardKey) -> Credit {
        self.credit.get(&key).copied().unwrap_or_default()
    }

    /// How many holds are pending.
    pub fn pending_holds(&self) -> usize {
        self.holds.len()
    }

    /// Card accounts, and the bytes their table holds.
    pub fn accounts_memory(&self) -> (usize, usize) {
        (self.cards.len(), self.cards.heap_bytes())
    }

    /// The idempotency record that may hold `key` on the route `scope` (see [`KeyIndex::candidate`]).
    pub fn key_candidate(&self, scope: &str, key: &IdempotencyKey) -> Option<i64> {
        self.keys.candidate(scope, key.as_str())
    }

    pub fn live_keys(&self) -> usize {
        self.keys.len()
    }
}

/// The committed state behind its lock. Poisoning cannot leave it half-written (the writer only
/// replaces whole entries), so a poisoned lock is used as it is.
#[derive(Clone, Default)]
pub struct SharedState(Arc<RwLock<Committed>>);

impl SharedState {
    pub fn read(&self) -> RwLockReadGuard<'_, Committed> {
        self.0.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Committed> {
        self.0.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The write-back round under way. Which card rows are behind is marked in the table itself.
#[derive(Default)]
struct WriteBack {
    /// The outside world's row is behind (it moved since the current round began).
    dirty_world: bool,
    /// Where the round's scan of the table is; `None` between rounds.
    cursor: Option<usize>,
    /// The outside world's row is this round's to write.
    world_in_round: bool,
    /// The checkpoint the round moves to when its last chunk is written.
    through: i64,
    /// The checkpoint now in the store.
    checkpoint: i64,
    last_round: Option<Instant>,
}

impl WriteBack {
    fn is_idle(&self) -> bool {
        self.cursor.is_none()
    }
}

/// Balances in memory in front of a store.
pub struct Ledger<S> {
    store: S,
    committed: SharedState,
    next_id: i64,
    next_key_id: i64,
    next_hold_id: i64,
    /// Timestamps never go backwards, so that ids and times agree (`/balance?at=` relies on it).
    last_at_ms: i64,
    totals: Totals,
    render: Render,
    /// True after the store could not be read back: nothing is decided until a reload succeeds.
    stale: bool,
    write_back: WriteBack,
}

/// One batch being decided: its writes, and the balances it has staged over the committed ones.
struct Staging<'a> {
    batch: Batch,
    cards: Map<CardKey, AccountState>,
    opened: Set<CardKey>,
    world: AccountState,
    next_id: i64,
    next_key_id: i64,
    /// Credit terms changed by this batch (a limit set, a hold placed or released).
    credit: Map<CardKey, Credit>,
    /// Holds placed or resolved by this batch, in their new state.
    holds: Map<i64, Hold>,
    next_hold_id: i64,
    /// The status of the resolved holds this batch's commands name (read from the store: the
    /// engine keeps only pending holds in memory).
    resolved: Map<i64, HoldStatus>,
    /// Keys used before (found in the store) or earlier in this batch, with the answer they got.
    keys: Map<(&'static str, &'a IdempotencyKey), StoredAnswer>,
    /// The store could not say which keys were used: every keyed command fails, nothing decided.
    keys_unknown: bool,
}

impl<S: Store> Ledger<S> {
    /// Loads every balance from `store`.
    pub fn load(store: S, render: Render) -> Result<Self, StoreError> {
        let mut ledger = Self {
            store,
            committed: SharedState::default(),
            next_id: 1,
            next_key_id: 1,
            next_hold_id: 1,
            last_at_ms: 0,
            totals: Totals::default(),
            render,
            stale: false,
            write_back: WriteBack::default(),
        };
        ledger.reload()?;
        Ok(ledger)
    }

    /// The committed state, for the read routes.
    pub fn shared(&self) -> SharedState {
        self.committed.clone()
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        let LedgerState {
            cards,
            world,
            next_transaction_id,
            last_at_unix_ms,
            behind,
            keys,
            next_key_id,
            checkpoint,
            credit,
            pending_holds,
            next_hold_id,
        } = self.store.load()?;
        self.last_at_ms = self.last_at_ms.max(last_at_unix_ms);
        self.totals = Totals {
            balance_sum: cards.iter().map(|card| i128::from(card.balance)).sum(),
            accounts: cards.len() as i64,
        };
        let mut index = KeyIndex::default();
        for name in &keys {
            index.insert(name.id, &name.scope, &name.key);
        }
        // The rows that are behind are exactly the accounts the replay moved; a round under way
        // starts over from them.
        let mut write_back = WriteBack {
            last_round: self.write_back.last_round,
            checkpoint,
            ..WriteBack::default()
        };
        {
            let mut committed = self.committed.write();
            // The old table first: two of them at once would double the peak.
            committed.cards = Accounts::default();
            committed.cards = Accounts::new(cards);
            for account in behind {
                match account {
                    Account::Card(card) => committed.cards.mark_behind(&card),
                    Account::World => write_back.dirty_world = true,
                }
            }
            committed.world = world;
            committed.keys = index;
            committed.credit = credit
                .into_iter()
                .map(|row| (CardKey::of(&row.card), row.credit))
                .collect();
            committed.expiries = pending_holds
                .iter()
                .map(|hold| (hold.expires_at_ms, hold.id))
                .collect();
            committed.holds = pending_holds.into_iter().map(|hold| (hold.id, hold)).collect();
        }
        self.next_id = next_transaction_id;
        self.next_key_id = next_key_id;
        self.next_hold_id = next_hold_id;
        self.write_back = write_back;
        self.stale = false;
        Ok(())
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Transactions committed after the balance checkpoint.
    pub fn write_back_lag(&self) -> u64 {
        (self.next_id - 1 - self.write_back.checkpoint).max(0) as u64
    }

    /// Re-reads the store if another writer changed it (or a reload is owed), so that an idle
    /// server's reads catch up with an operator's edit without waiting for the next batch.
    pub fn catch_up(&mut self) -> Result<(), StoreError> {
        if !self.stale && self.store.changed_outside()? {
            tracing::warn!("the database was changed outside tallyd; re-reading balances");
            self.stale = true;
        }
        if self.stale {
            self.reload()?;
        }
        Ok(())
    }

    /// Decides every command, commits what they change in one store transaction, and says what
    /// happened to each.
    pub fn apply_batch<'a, I>(&mut self, commands: I, at_unix_ms: i64) -> BatchReport
    where
        I: Iterator<Item = (&'a Command, Option<ScopedKey<'a>>)> + Clone,
    {
        let at = at_unix_ms.max(self.last_at_ms);
        self.last_at_ms = at;
        if !self.stale && self.store.changed_outside().unwrap_or(true) {
            tracing::warn!("the database was changed outside tallyd; re-reading balances");
            self.stale = true;
        }
        if self.stale && self.reload().is_err() {
            let outcomes = commands.map(|_| Outcome::StorageFailed).collect();
            return self.report(outcomes, false);
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (outcomes, staging) = self.decide(commands.clone(), at);
            let commit = if staging.batch.is_empty() {
                Ok(())
            } else {
                self.store.commit(&staging.batch)
            };
            match commit {
                Err(StoreError::Conflict(_)) if attempts < COMMIT_ATTEMPTS_MAX => {
                    // Someone outside tallyd wrote to the database: decide again on what it holds now.
                    tracing::warn!("the database was changed outside tallyd; re-reading balances and deciding the batch again");
                    self.resync();
                }
                Ok(()) => {
                    self.absorb(staging);
                    return self.report(outcomes, true);
                }
                Err(error) => {
                    tracing::error!(%error, commands = outcomes.len(), "a batch failed to commit; nothing of it was written");
                    self.resync();
                    return self.report(outcomes, false);
                }
            }
        }
    }

    /// Deletes idempotency records older than `before_unix_ms`, at most `rows_max` of them, and
    /// forgets their keys; returns how many.
    pub fn prune_idempotency(&mut self, before_unix_ms: i64, rows_max: u32) -> Result<usize, StoreError> {
        let pruned = self
            .store
            .prune_idempotency(before_unix_ms, rows_max)
            .inspect_err(|error| self.noticed(error))?;
        let mut committed = self.committed.write();
        for name in &pruned {
            committed.keys.remove(name.id, &name.scope, &name.key);
        }
        Ok(pruned.len())
    }

    /// Expires up to `max` pending holds whose time is up at `now_unix_ms`, in one batch through
    /// the same rules as every command; returns how many were expired (0 when the batch failed:
    /// the next sweep tries again).
    pub fn expire_due(&mut self, now_unix_ms: i64, max: usize) -> usize {
        let due: Vec<Command> = self
            .committed
            .read()
            .expiries
            .iter()
            .take_while(|(expires_at, _)| *expires_at <= now_unix_ms)
            .take(max)
            .map(|(_, id)| Command::ExpireHold(*id))
            .collect();
        if due.is_empty() {
            return 0;
        }
        let report = self.apply_batch(due.iter().map(|command| (command, None)), now_unix_ms);
        report
            .outcomes
            .iter()
            .filter(|outcome| matches!(outcome, Outcome::Held { .. }))
            .count()
    }

    /// Writes back one chunk of the accounts whose rows are behind, if a round is under way or
    /// due (see [`WRITE_BACK_LAG_TRANSACTIONS`] and [`WRITE_BACK_PERIOD`]). Returns whether the
    /// round has more to write.
    pub fn write_back_step(&mut self, now: Instant) -> Result<bool, StoreError> {
        if self.stale {
            return Ok(false);
        }
        if self.write_back.is_idle() {
            let lag = self.next_id - 1 - self.write_back.checkpoint;
            let quiet_for = self.write_back.last_round.map(|at| now.duration_since(at));
            let due = lag >= WRITE_BACK_LAG_TRANSACTIONS
                || (lag > 0 && quiet_for.is_none_or(|quiet| quiet >= WRITE_BACK_PERIOD));
            if !due {
                return Ok(false);
            }
            self.start_round();
        }
        let wb = &mut self.write_back;
        let mut cards = Vec::new();
        let next = {
            let mut committed = self.committed.write();
            let cursor = wb.cursor.unwrap_or(0);
            committed.cards.take_behind(
                cursor,
                WRITE_BACK_CHUNK_ACCOUNTS,
                WRITE_BACK_SCAN_SLOTS,
                &mut cards,
            )
        };
        let mut chunk: Vec<(Account, AccountState)> = Vec::with_capacity(cards.len() + 1);
        let world = std::mem::take(&mut wb.world_in_round);
        if world {
            chunk.push((Account::World, self.committed.read().world));
        }
        chunk.extend(
            cards
                .into_iter()
                .map(|(card, state)| (Account::Card(card), state)),
        );
        let last = next.is_none();
        if chunk.is_empty() && !last {
            // A stretch of the table with nothing owed: nothing to write yet.
            wb.cursor = next;
            return Ok(true);
        }
        let checkpoint = last.then_some(wb.through);
        if let Err(error) = self.store.write_back(&chunk, checkpoint) {
            // Nothing was written: mark the chunk's rows as owed again, and go over it again.
            let wb = &mut self.write_back;
            wb.world_in_round |= world;
            let mut committed = self.committed.write();
            for (account, _) in &chunk {
                if let Account::Card(card) = account {
                    committed.cards.mark_behind(card);
                }
            }
            drop(committed);
            self.noticed(&error);
            return Err(error);
        }
        let wb = &mut self.write_back;
        wb.cursor = next;
        if last {
            wb.checkpoint = wb.through;
            wb.last_round = Some(now);
        }
        Ok(!last)
    }

    /// Writes back every account whose row is behind and moves the checkpoint to the last
    /// transaction, so that the next start-up replays nothing (at a clean stop).
    pub fn write_back_all(&mut self) -> Result<(), StoreError> {
        if self.write_back.is_idle() && self.next_id - 1 == self.write_back.checkpoint {
            return Ok(());
        }
        if self.write_back.is_idle() {
            self.start_round();
        }
        let far_future = Instant::now() + WRITE_BACK_PERIOD;
        while self.write_back_step(far_future)? {}
        Ok(())
    }

    /// A round writes every row marked behind when it starts (and any marked while it scans),
    /// in the table's order, which is the rows' order for card numbers of one length, so that each
    /// chunk rewrites neighbouring pages.
    fn start_round(&mut self) {
        let wb = &mut self.write_back;
        wb.world_in_round = std::mem::take(&mut wb.dirty_world);
        wb.cursor = Some(0);
        wb.through = self.next_id - 1;
    }

    /// After the store refused a write for another writer's change, re-read before deciding more.
    fn noticed(&mut self, error: &StoreError) {
        if matches!(error, StoreError::Conflict(_) | StoreError::OutcomeUnknown(_)) {
            self.stale = true;
        }
    }

    fn decide<'a, I>(&mut self, commands: I, at: i64) -> (Vec<Outcome>, Staging<'a>)
    where
        I: Iterator<Item = (&'a Command, Option<ScopedKey<'a>>)>,
    {
        let committed = self.committed.read();
        let mut staging = Staging {
            batch: Batch {
                at_unix_ms: at,
                ..Batch::default()
            },
            cards: Map::default(),
            opened: Set::default(),
            world: committed.world,
            next_id: self.next_id,
            next_key_id: self.next_key_id,
            keys: Map::default(),
            keys_unknown: false,
            credit: Map::default(),
            holds: Map::default(),
            next_hold_id: self.next_hold_id,
            resolved: Map::default(),
        };
        let commands: Vec<(&'a Command, Option<ScopedKey<'a>>)> = commands.collect();
        // The records that may hold this batch's keys, read back at once; a record whose name is
        // another key's (a hash collision) does not count.
        let wanted: Vec<(ScopedKey<'a>, i64)> = commands
            .iter()
            .flat_map(|(command, key)| key.iter().copied().chain(bulk_item_keys(command)))
            .filter_map(|(scope, key)| committed.key_candidate(scope, key).map(|id| ((scope, key), id)))
            .collect();
        let ids: Vec<i64> = wanted.iter().map(|(_, id)| *id).collect();
        match self.store.idempotent_answers(&ids) {
            Ok(found) => {
                for (((scope, key), _), record) in wanted.into_iter().zip(found) {
                    if let Some(record) = record.filter(|r| r.scope == scope && r.key == key.as_str()) {
                        staging.keys.insert((scope, key), record.answer);
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, "looking up idempotency keys failed");
                staging.keys_unknown = true;
            }
        }
        // The holds named by captures and voids that are not pending: resolved ones, whose status
        // the store has (an id the store does not have is no hold).
        let named: Vec<i64> = commands
            .iter()
            .flat_map(|(command, _)| holds::named(command))
            .filter(|id| !committed.holds.contains_key(id) && *id < self.next_hold_id)
            .collect();
        if !named.is_empty() {
            match self.store.hold_statuses(&named) {
                Ok(found) => staging.resolved.extend(
                    named
                        .iter()
                        .zip(found)
                        .filter_map(|(id, status)| Some((*id, status?))),
                ),
                Err(error) => {
                    tracing::error!(%error, "looking up holds failed");
                    let outcomes = commands.iter().map(|_| Outcome::StorageFailed).collect();
                    return (outcomes, staging);
                }
            }
        }
        let render = self.render;
        let outcomes = commands
            .into_iter()
            .map(|(command, key)| decide_keyed(&committed, &mut staging, render, command, key))
            .collect();
        // What the holds and terms are after the batch is what the store keeps.
        let mut placed: Vec<Hold> = staging.holds.values().cloned().collect();
        placed.sort_unstable_by_key(|hold| hold.id);
        staging.batch.holds = placed;
        staging.batch.credit = staging
            .credit
            .iter()
            .map(|(key, credit)| CreditRow {
                card: key.card(),
                credit: *credit,
            })
            .collect();
        (outcomes, staging)
    }

    /// After a successful commit, the staged balances are the committed ones.
    fn absorb(&mut self, staging: Staging<'_>) {
        let card_delta: i128 = staging
            .batch
            .transactions
            .iter()
            .flat_map(|record| &record.legs)
            .filter(|leg| matches!(leg.account, Account::Card(_)))
            .map(|leg| i128::from(leg.amount))
            .sum();
        self.totals.balance_sum += card_delta;
        self.totals.accounts += staging.batch.accounts.len() as i64;
        let mut committed = self.committed.write();
        // Marks the rows for the write-back of the accounts that moved.
        committed.cards.set_all(staging.cards);
        for (card, credit) in staging.credit {
            if credit.is_none() {
                committed.credit.remove(&card);
            } else {
                committed.credit.insert(card, credit);
            }
        }
        for (id, hold) in staging.holds {
            committed.expiries.remove(&(hold.expires_at_ms, id));
            if hold.status == HoldStatus::Pending {
                committed.expiries.insert((hold.expires_at_ms, id));
                committed.holds.insert(id, hold);
            } else {
                committed.holds.remove(&id);
            }
        }
        if committed.world != staging.world {
            self.write_back.dirty_world = true;
        }
        committed.world = staging.world;
        for record in &staging.batch.idempotency {
            committed
                .keys
                .insert(record.id, record.scope, record.key.as_str());
        }
        drop(committed);
        self.next_id = staging.next_id;
        self.next_key_id = staging.next_key_id;
        self.next_hold_id = staging.next_hold_id;
    }

    fn report(&self, outcomes: Vec<Outcome>, commit_ok: bool) -> BatchReport {
        // A failed batch changed nothing, and every answer in it may have been decided on state it
        // staged: all of them are "failed, nothing changed", and a retry may run.
        let outcomes = if commit_ok {
            outcomes
        } else {
            vec![Outcome::StorageFailed; outcomes.len()]
        };
        BatchReport {
            outcomes,
            totals: self.totals,
            commit_ok,
        }
    }

    /// After a failed commit, forget what memory says and trust the store again: an I/O error
    /// may leave the store's state uncertain, and memory must never run ahead of the disk. If the
    /// store cannot even be read, nothing is decided until it can be (every batch fails with 503).
    fn resync(&mut self) {
        if let Err(error) = self.reload() {
            tracing::warn!(%error, "could not re-read balances after a failed commit");
            self.stale = true;
        }
    }
}

/// One command under its idempotency key, if it has one.
fn decide_keyed<'a>(
    committed: &Committed,
    staging: &mut Staging<'a>,
    render: Render,
    command: &'a Command,
    key: Option<ScopedKey<'a>>,
) -> Outcome {
    let Some((scope, key)) = key else {
        return execute(committed, staging, render, command);
    };
    if staging.keys_unknown {
        return Outcome::StorageFailed;
    }
    let earlier = staging.keys.get(&(scope, key)).cloned();
    let fingerprint = command.fingerprint();
    if let Some(answer) = earlier {
        return if answer.fingerprint == fingerprint {
            Outcome::Replayed(answer)
        } else {
            Outcome::Refused(Refusal::IdempotencyKeyReused)
        };
    }
    let outcome = execute(committed, staging, render, command);
    let transaction_id = match &outcome {
        Outcome::Posted { id, .. } | Outcome::Transferred { id, .. } => Some(*id),
        Outcome::Held { hold, .. } => hold.transaction_id,
        // A bulk request's own key keeps its whole answer; each item's key names its transaction.
        Outcome::Opened { .. }
        | Outcome::LimitSet { .. }
        | Outcome::Batch(_)
        | Outcome::Bulk(_)
        | Outcome::Refused(_) => None,
        // Nothing was decided: a retry must be free to run.
        Outcome::Replayed(_) | Outcome::StorageFailed | Outcome::OutcomeUnknown => return outcome,
    };
    if let (Some(id), Some(record)) = (transaction_id, staging.batch.transactions.last_mut()) {
        debug_assert_eq!(record.id, id);
        record.idempotency_key = Some(key.clone());
    }
    let (status, body) = render(command, &outcome);
    let stored = StoredAnswer {
        fingerprint,
        status,
        body,
    };
    staging.keys.insert((scope, key), stored.clone());
    let id = staging.next_key_id;
    staging.next_key_id += 1;
    staging.batch.idempotency.push(IdempotencyRecord {
        id,
        scope,
        key: key.clone(),
        stored,
        transaction_id,
    });
    outcome
}

fn execute<'a>(
    committed: &Committed,
    staging: &mut Staging<'a>,
    render: Render,
    command: &'a Command,
) -> Outcome {
    let decided = match command {
        Command::OpenAccount(open) => open_account(committed, staging, open),
        Command::Transaction(transaction) => post(committed, staging, transaction),
        Command::Transfer(transfer) => transfer_between(committed, staging, transfer),
        Command::SetLimit(limit) => holds::set_limit(committed, staging, limit),
        Command::PlaceHold(hold) => holds::place(committed, staging, hold),
        Command::CaptureHold(capture) => holds::capture(committed, staging, capture),
        Command::VoidHold(void) => holds::release(committed, staging, void.hold_id, HoldStatus::Voided),
        Command::ExpireHold(id) => holds::release(committed, staging, *id, HoldStatus::Expired),
        Command::Batch(items) => holds::all_or_nothing(committed, staging, items),
        Command::BulkTransfer(bulk) => Ok(bulk_transfer(committed, staging, render, bulk)),
    };
    decided.unwrap_or_else(Outcome::Refused)
}

/// Each item of a bulk request in order, under its own key, exactly as if it were a single
/// `POST /transfers` at this point of the batch: one item's refusal leaves its neighbours alone
/// (this is not the all-or-nothing `POST /batches`).
fn bulk_transfer<'a>(
    committed: &Committed,
    staging: &mut Staging<'a>,
    render: Render,
    bulk: &'a BulkTransferRequest,
) -> Outcome {
    let outcomes = bulk
        .items
        .iter()
        .map(|item| {
            let key = item.key.as_ref().map(|key| (bulk.item_scope, key));
            decide_keyed(committed, staging, render, &item.command, key)
        })
        .collect();
    Outcome::Bulk(outcomes)
}

/// The keys of a bulk request's items (none for any other command), looked up with the batch's.
pub(super) fn bulk_item_keys<'a>(command: &'a Command) -> impl Iterator<Item = ScopedKey<'a>> + 'a {
    let items = match command {
        Command::BulkTransfer(bulk) => Some(bulk.as_ref()),
        _ => None,
    };
    items.into_iter().flat_map(|bulk| {
        bulk.items
            .iter()
            .filter_map(move |item| item.key.as_ref().map(|key| (bulk.item_scope, key)))
    })
}

fn state(committed: &Committed, staging: &Staging<'_>, card: &CardNumber) -> Result<AccountState, Refusal> {
    let key = CardKey::of(card);
    staging
        .cards
        .get(&key)
        .copied()
        .or_else(|| committed.cards.get_key(key))
        .ok_or_else(|| Refusal::CardNotFound { card: card.clone() })
}

/// An account's credit terms as this batch has left them.
fn credit(committed: &Committed, staging: &Staging<'_>, card: &CardNumber) -> Credit {
    credit_of(committed, staging, CardKey::of(card))
}

fn credit_of(committed: &Committed, staging: &Staging<'_>, key: CardKey) -> Credit {
    staging
        .credit
        .get(&key)
        .copied()
        .unwrap_or_else(|| committed.credit_of(key))
}

/// A card's key, state and terms as this batch has left them: what a debit or a credit of it is
/// decided on (the key computed once, on the hot path).
fn account(
    committed: &Committed,
    staging: &Staging<'_>,
    card: &CardNumber,
) -> Result<(CardKey, AccountState, Credit), Refusal> {
    let key = CardKey::of(card);
    let state = staging
        .cards
        .get(&key)
        .copied()
        .or_else(|| committed.cards.get_key(key))
        .ok_or_else(|| Refusal::CardNotFound { card: card.clone() })?;
    Ok((key, state, credit_of(committed, staging, key)))
}

/// The refusal of a debit of `card`: what the rule says, with the balance and what is available.
fn refused(rule: CardRule, balance: i64, credit: Credit) -> Refusal {
    match rule {
        CardRule::InsufficientFunds => Refusal::InsufficientFunds {
            balance,
            available: available(balance, credit),
        },
        CardRule::BalanceLimitExceeded => Refusal::BalanceLimitExceeded { balance },
    }
}

fn open_account(
    committed: &Committed,
    staging: &mut Staging<'_>,
    open: &OpenAccountRequest,
) -> Result<Outcome, Refusal> {
    let key = CardKey::of(&open.card);
    if committed.cards.contains(&open.card) || staging.opened.contains(&key) {
        return Err(Refusal::AccountExists);
    }
    staging.opened.insert(key);
    staging.cards.insert(key, AccountState::default());
    if open.overdraft_limit > 0 {
        let terms = Credit {
            overdraft_limit: open.overdraft_limit,
            held: 0,
        };
        staging.credit.insert(key, terms);
    }
    staging.batch.accounts.push(NewAccount {
        card: open.card.clone(),
    });
    Ok(Outcome::Opened {
        created_at_ms: staging.batch.at_unix_ms,
    })
}

/// A deposit (from the outside world) or a withdrawal (to it).
fn post(
    committed: &Committed,
    staging: &mut Staging<'_>,
    request: &TransactionRequest,
) -> Result<Outcome, Refusal> {
    let (key, card, terms) = account(committed, staging, &request.card)?;
    let current = card.balance;
    let card_after =
        apply(current, terms, request.amount.minor_units()).map_err(|rule| refused(rule, current, terms))?;
    let amount = request.amount.minor_units();
    // The outside world moves the other way; it may go negative but never wraps.
    let world_after = staging
        .world
        .balance
        .checked_sub(amount)
        .ok_or(Refusal::BalanceLimitExceeded { balance: current })?;
    let card_leg = Leg {
        account: Account::Card(request.card.clone()),
        amount,
        balance_after: card_after,
        previous_id: card.last_transaction_id,
    };
    let world_leg = Leg {
        account: Account::World,
        amount: -amount,
        balance_after: world_after,
        previous_id: staging.world.last_transaction_id,
    };
    let (kind, legs) = match request.amount.kind() {
        Kind::Withdrawal => (Kind::Withdrawal, [card_leg, world_leg]),
        _ => (Kind::Deposit, [world_leg, card_leg]),
    };
    let id = stage(staging, kind, amount.abs(), None, legs);
    staging.cards.insert(key, after(card_after, id));
    staging.world = after(world_after, id);
    Ok(Outcome::Posted {
        id,
        balance: card_after,
        created_at_ms: staging.batch.at_unix_ms,
    })
}

fn transfer_between(
    committed: &Committed,
    staging: &mut Staging<'_>,
    request: &TransferRequest,
) -> Result<Outcome, Refusal> {
    let (source_key, source, source_terms) = account(committed, staging, &request.source)?;
    let (destination_key, destination, destination_terms) =
        account(committed, staging, &request.destination)?;
    let amount = request.amount.minor_units();
    let source_after = apply(source.balance, source_terms, -amount)
        .map_err(|rule| refused(rule, source.balance, source_terms))?;
    let destination_after = apply(destination.balance, destination_terms, amount)
        .map_err(|rule| refused(rule, destination.balance, destination_terms))?;
    let legs = [
        Leg {
            account: Account::Card(request.source.clone()),
            amount: -amount,
            balance_after: source_after,
            previous_id: source.last_transaction_id,
        },
        Leg {
            account: Account::Card(request.destination.clone()),
            amount,
            balance_after: destination_after,
            previous_id: destination.last_transaction_id,
        },
    ];
    let id = stage(staging, Kind::Transfer, amount, request.reference.clone(), legs);
    staging.cards.insert(source_key, after(source_after, id));
    staging
        .cards
        .insert(destination_key, after(destination_after, id));
    Ok(Outcome::Transferred {
        id,
        source_balance: source_after,
        destination_balance: destination_after,
        created_at_ms: staging.batch.at_unix_ms,
    })
}

/// An account's state after a leg of transaction `id`.
fn after(balance: i64, id: i64) -> AccountState {
    AccountState {
        balance,
        last_transaction_id: Some(id),
    }
}

/// Adds a transaction with the next id to the batch and returns the id.
fn stage(
    staging: &mut Staging<'_>,
    kind: Kind,
    amount: i64,
    reference: Option<crate::domain::Reference>,
    legs: [Leg; 2],
) -> i64 {
    debug_assert_eq!(legs[0].amount + legs[1].amount, 0, "legs sum to zero");
    let id = staging.next_id;
    staging.next_id += 1;
    staging.batch.transactions.push(TransactionRecord {
        id,
        kind,
        amount,
        reference,
        idempotency_key: None,
        legs,
    });
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Amount, PositiveAmount, Reference};
    use crate::store::memory::MemoryStore;

    fn card(n: u8) -> CardNumber {
        CardNumber::parse(&format!("{n:06}")).unwrap()
    }

    fn deposit(n: u8, amount: i64) -> Command {
        Command::Transaction(TransactionRequest {
            card: card(n),
            amount: Amount::new(amount).unwrap(),
        })
    }

    fn transfer(from: u8, to: u8, amount: i64) -> Command {
        Command::Transfer(TransferRequest {
            source: card(from),
            destination: card(to),
            amount: PositiveAmount::new(amount).unwrap(),
            reference: Some(Reference::new("test".into()).unwrap()),
        })
    }

    fn open(n: u8) -> Command {
        Command::OpenAccount(OpenAccountRequest {
            card: card(n),
            overdraft_limit: 0,
        })
    }

    /// A stand-in for the HTTP rendering: deterministic, and different for different outcomes.
    fn render(_: &Command, outcome: &Outcome) -> (u16, Vec<u8>) {
        let status = match outcome {
            Outcome::Refused(_) => 422,
            _ => 200,
        };
        (status, format!("{outcome:?}").into_bytes())
    }

    fn ledger(accounts: &[(u8, i64)]) -> Ledger<MemoryStore> {
        let store = MemoryStore::with_accounts(accounts.iter().map(|(n, b)| (card(*n), *b)));
        Ledger::load(store, render).unwrap()
    }

    fn run(ledger: &mut Ledger<MemoryStore>, commands: &[Command]) -> BatchReport {
        ledger.apply_batch(commands.iter().map(|c| (c, None)), 1_000)
    }

    fn world(ledger: &Ledger<MemoryStore>) -> i64 {
        ledger.store.balance(&Account::World).unwrap()
    }

    #[test]
    fn the_card_rule_at_its_edges() {
        let none = Credit::default();
        assert_eq!(apply(100, none, -100), Ok(0), "a balance may reach exactly zero");
        assert_eq!(apply(100, none, -101), Err(CardRule::InsufficientFunds));
        assert_eq!(apply(0, none, -1), Err(CardRule::InsufficientFunds));
        assert_eq!(apply(i64::MAX - 1, none, 1), Ok(i64::MAX));
        assert_eq!(apply(i64::MAX, none, 1), Err(CardRule::BalanceLimitExceeded));
        let limit = |overdraft_limit, held| Credit {
            overdraft_limit,
            held,
        };
        assert_eq!(apply(0, limit(50, 0), -50), Ok(-50), "down to the limit");
        assert_eq!(apply(0, limit(50, 0), -51), Err(CardRule::InsufficientFunds));
        assert_eq!(
            apply(100, limit(50, 120), -30),
            Ok(70),
            "holds count against the limit"
        );
        assert_eq!(apply(100, limit(50, 120), -31), Err(CardRule::InsufficientFunds));
        assert_eq!(apply(-50, limit(50, 0), 10), Ok(-40), "a credit is always taken");
        assert_eq!(
            apply(i64::MIN + 1, limit(0, 0), -2),
            Err(CardRule::InsufficientFunds)
        );
    }

    #[test]
    fn each_command_of_a_batch_stands_or_falls_whole_and_on_its_own() {
        let mut ledger = ledger(&[(1, 100), (2, 0)]);
        let report = run(
            &mut ledger,
            &[
                transfer(1, 2, 60), // 40 / 60
                transfer(1, 2, 60), // refused: only 40, and 2 keeps its 60
                deposit(3, 5),      // no such card
                open(3),            // opened with zero
                open(3),            // exists already, within the batch
                transfer(2, 3, 60), // 0 / 60
                deposit(1, -40),    // exactly zero
                transfer(9, 1, 1),  // no source
            ],
        );
        assert!(report.commit_ok);
        let at = 1_000;
        assert_eq!(
            report.outcomes,
            [
                Outcome::Transferred {
                    id: 1,
                    source_balance: 40,
                    destination_balance: 60,
                    created_at_ms: at
                },
                Outcome::Refused(Refusal::InsufficientFunds {
                    balance: 40,
                    available: 40
                }),
                Outcome::Refused(Refusal::CardNotFound { card: card(3) }),
                Outcome::Opened { created_at_ms: at },
                Outcome::Refused(Refusal::AccountExists),
                Outcome::Transferred {
                    id: 2,
                    source_balance: 0,
                    destination_balance: 60,
                    created_at_ms: at
                },
                Outcome::Posted {
                    id: 3,
                    balance: 0,
                    created_at_ms: at
                },
                Outcome::Refused(Refusal::CardNotFound { card: card(9) }),
            ]
        );
        assert_eq!(ledger.store.card_balance(&card(3)), Some(60));
        assert_eq!(world(&ledger), 40, "the withdrawal went to the outside world");
        assert_eq!(
            report.totals,
            Totals {
                balance_sum: 60,
                accounts: 3
            }
        );
        for record in &ledger.store.transactions {
            assert_eq!(record.legs[0].amount + record.legs[1].amount, 0);
        }
    }

    fn place(n: u8, amount: i64) -> Command {
        Command::PlaceHold(crate::domain::HoldRequest {
            card: card(n),
            amount: PositiveAmount::new(amount).unwrap(),
            destination: None,
            expires_in_s: 60,
            reference: None,
        })
    }

    #[test]
    fn a_refused_batch_goes_back_to_its_savepoint_and_leaves_its_neighbours_alone() {
        use crate::domain::{BatchItem, CaptureRequest, TransferRequest};
        let mut ledger = ledger(&[(1, 100), (2, 0)]);
        let item = |from: u8, to: u8, amount: i64| {
            BatchItem::Transfer(TransferRequest {
                source: card(from),
                destination: card(to),
                amount: PositiveAmount::new(amount).unwrap(),
                reference: None,
            })
        };
        let failing = Command::Batch(vec![
            item(1, 2, 60),
            BatchItem::Capture(CaptureRequest {
                hold_id: 1,
                amount: None,
            }),
            item(1, 2, 60), // 40 left after the first, and the capture took 30 more: refused
        ]);
        let report = run(
            &mut ledger,
            &[place(1, 30), failing, transfer(1, 2, 70), place(1, 1)],
        );
        assert!(report.commit_ok);
        assert!(matches!(&report.outcomes[0], Outcome::Held { hold, available: 70, .. } if hold.id == 1));
        assert!(
            matches!(&report.outcomes[1], Outcome::Refused(Refusal::BatchFailed { index: 2, refusal })
                if **refusal == Refusal::InsufficientFunds { balance: 10, available: 10 }),
            "{:?}",
            report.outcomes[1]
        );
        // The batch's staged transfer, capture and release are gone: the hold is pending again
        // and its 30 still count against what the neighbour may spend.
        assert_eq!(
            report.outcomes[2],
            Outcome::Transferred {
                id: 1,
                source_balance: 30,
                destination_balance: 70,
                created_at_ms: 1_000
            }
        );
        assert!(
            matches!(
                &report.outcomes[3],
                Outcome::Refused(Refusal::InsufficientFunds {
                    balance: 30,
                    available: 0
                })
            ),
            "{:?}",
            report.outcomes[3]
        );
        assert_eq!(ledger.store.transactions.len(), 1);
        let held = &ledger.store.holds[&1];
        assert_eq!(held.status, HoldStatus::Pending);
        assert_eq!(ledger.store.credit[&card(1)].credit.held, 30);
        // And the hold ids the refused batch did not use are not skipped.
        let report = run(&mut ledger, &[place(2, 5)]);
        assert!(matches!(&report.outcomes[0], Outcome::Held { hold, .. } if hold.id == 2));
    }

    #[test]
    fn expiry_releases_only_pending_holds_whose_time_is_up() {
        let mut ledger = ledger(&[(1, 100)]);
        run(&mut ledger, &[place(1, 40), place(1, 50)]);
        assert_eq!(ledger.expire_due(1_000 + 59_999, 10), 0, "not yet");
        let void = Command::VoidHold(crate::domain::VoidRequest { hold_id: 2 });
        run(&mut ledger, &[void]);
        assert_eq!(
            ledger.expire_due(1_000 + 60_000, 10),
            1,
            "the voided one is not expired again"
        );
        assert_eq!(ledger.store.holds[&1].status, HoldStatus::Expired);
        assert_eq!(ledger.store.holds[&2].status, HoldStatus::Voided);
        assert_eq!(ledger.store.credit[&card(1)].credit.held, 0);
        assert_eq!(ledger.expire_due(i64::MAX, 10), 0);
    }

    #[test]
    fn a_failed_commit_changes_nothing_and_the_ledger_rereads_the_store() {
        let mut ledger = ledger(&[(1, 100), (2, 0)]);
        run(&mut ledger, &[deposit(1, 50)]);
        ledger.store.fail_commits = true;
        let report = run(&mut ledger, &[transfer(1, 2, 120), transfer(1, 2, 500), open(7)]);
        assert!(!report.commit_ok);
        assert_eq!(report.outcomes, vec![Outcome::StorageFailed; 3]);
        assert_eq!(
            report.totals.balance_sum, 150,
            "totals are the store's, not the failed batch's"
        );
        ledger.store.fail_commits = false;
        let report = run(&mut ledger, &[transfer(1, 2, 150), open(7)]);
        assert_eq!(
            report.outcomes,
            [
                Outcome::Transferred {
                    id: 2,
                    source_balance: 0,
                    destination_balance: 150,
                    created_at_ms: 1_000
                },
                Outcome::Opened { created_at_ms: 1_000 },
            ],
            "ids continue from the store, not from the failed batch"
        );
    }

    #[test]
    fn a_batch_refused_for_another_writers_change_is_decided_again() {
        let mut ledger = ledger(&[(1, 100)]);
        // Another writer deposits 900 behind the ledger's back, noticed before the batch is decided:
        // the withdrawal, refused on the stale 100, passes on the 1,000.
        let state = AccountState {
            balance: 1_000,
            last_transaction_id: None,
        };
        ledger.store.rows.insert(Account::Card(card(1)), state);
        ledger.store.changed = true;
        let report = run(&mut ledger, &[deposit(1, -600)]);
        assert_eq!(
            report.outcomes,
            [Outcome::Posted {
                id: 1,
                balance: 400,
                created_at_ms: 1_000
            }]
        );
        // And between the check and the commit: the store refuses the commit, the batch is decided again.
        let state = AccountState {
            balance: 2_000,
            last_transaction_id: Some(1),
        };
        ledger.store.settle();
        ledger.store.rows.insert(Account::Card(card(1)), state);
        ledger.store.conflicts = 1;
        let report = run(&mut ledger, &[deposit(1, 1)]);
        assert_eq!(
            report.outcomes,
            [Outcome::Posted {
                id: 2,
                balance: 2_001,
                created_at_ms: 1_000
            }]
        );
        ledger.store.conflicts = COMMIT_ATTEMPTS_MAX;
        let report = run(&mut ledger, &[deposit(1, 1)]);
        assert_eq!(
            report.outcomes,
            [Outcome::StorageFailed],
            "conflicts without end fail the batch"
        );
    }

    #[test]
    fn a_key_replays_its_first_answer_and_refuses_another_request() {
        let mut ledger = ledger(&[(1, 100), (2, 0)]);
        let key = IdempotencyKey::parse(b"k-1").unwrap();
        let first = transfer(1, 2, 30);
        let other = transfer(1, 2, 31);
        // Three in one batch: the first executes, the same request replays it, another is refused.
        let batch = [
            (&first, Some((first.scope(), &key))),
            (&first, Some((first.scope(), &key))),
            (&other, Some((other.scope(), &key))),
        ];
        let report = ledger.apply_batch(batch.into_iter(), 1_000);
        let executed = Outcome::Transferred {
            id: 1,
            source_balance: 70,
            destination_balance: 30,
            created_at_ms: 1_000,
        };
        assert_eq!(report.outcomes[0], executed);
        let stored = StoredAnswer {
            fingerprint: first.fingerprint(),
            status: 200,
            body: format!("{executed:?}").into_bytes(),
        };
        assert_eq!(report.outcomes[1], Outcome::Replayed(stored.clone()));
        assert_eq!(
            report.outcomes[2],
            Outcome::Refused(Refusal::IdempotencyKeyReused)
        );
        // A later batch finds it in the store; the same key on another route is another key.
        let deposit_keyed = deposit(1, 5);
        let batch = [
            (&first, Some((first.scope(), &key))),
            (&deposit_keyed, Some((deposit_keyed.scope(), &key))),
        ];
        let report = ledger.apply_batch(batch.into_iter(), 2_000);
        assert_eq!(report.outcomes[0], Outcome::Replayed(stored));
        assert!(matches!(report.outcomes[1], Outcome::Posted { id: 2, .. }));
        assert_eq!(ledger.store.transactions.len(), 2, "one transfer, one deposit");
        assert_eq!(ledger.store.transactions[0].idempotency_key.as_ref(), Some(&key));
    }

    fn bulk(items: &[(Command, Option<&str>)]) -> Command {
        let items = items
            .iter()
            .map(|(command, key)| crate::domain::BulkItem {
                command: command.clone(),
                key: key.map(|key| IdempotencyKey::parse(key.as_bytes()).unwrap()),
            })
            .collect();
        Command::BulkTransfer(Arc::new(BulkTransferRequest {
            items,
            item_scope: "/transfers",
        }))
    }

    #[test]
    fn a_bulk_request_decides_each_item_on_its_own_under_its_key_and_replays_whole_under_its_own() {
        let mut ledger = ledger(&[(1, 100), (2, 0)]);
        let single = transfer(1, 2, 10);
        let key = IdempotencyKey::parse(b"item").unwrap();
        // A single transfer first, under the key an item will use.
        let report = ledger.apply_batch([(&single, Some(("/transfers", &key)))].into_iter(), 1_000);
        assert!(matches!(report.outcomes[0], Outcome::Transferred { id: 1, .. }));
        let request = bulk(&[
            (transfer(1, 2, 10), Some("item")), // the single transfer's key and request: replayed
            (transfer(1, 2, 500), None),        // refused, and leaves its neighbours alone
            (transfer(2, 1, 5), Some("new")),   // executes
            (transfer(2, 1, 6), Some("new")),   // the same key, another transfer: refused
            (transfer(1, 9, 1), None),          // no such card
        ]);
        let whole = IdempotencyKey::parse(b"whole").unwrap();
        let report = ledger.apply_batch(
            [(&request, Some((crate::domain::BULK_SCOPE, &whole)))].into_iter(),
            2_000,
        );
        let Outcome::Bulk(items) = &report.outcomes[0] else {
            panic!("{:?}", report.outcomes[0]);
        };
        assert!(matches!(&items[0], Outcome::Replayed(stored) if stored.status == 200));
        assert_eq!(
            items[1],
            Outcome::Refused(Refusal::InsufficientFunds {
                balance: 90,
                available: 90
            })
        );
        assert!(matches!(
            items[2],
            Outcome::Transferred {
                id: 2,
                source_balance: 5,
                ..
            }
        ));
        assert_eq!(items[3], Outcome::Refused(Refusal::IdempotencyKeyReused));
        assert_eq!(
            items[4],
            Outcome::Refused(Refusal::CardNotFound { card: card(9) })
        );
        assert_eq!(ledger.store.transactions.len(), 2, "one new transaction");
        // The whole request again under its key: its first answer, and nothing moves.
        let report = ledger.apply_batch(
            [(&request, Some((crate::domain::BULK_SCOPE, &whole)))].into_iter(),
            3_000,
        );
        assert!(matches!(&report.outcomes[0], Outcome::Replayed(_)));
        assert_eq!(ledger.store.transactions.len(), 2);
        // A failed commit fails the whole bulk request.
        ledger.store.fail_commits = true;
        let report = run(&mut ledger, &[bulk(&[(transfer(1, 2, 1), None)])]);
        assert_eq!(report.outcomes, [Outcome::StorageFailed]);
    }

    #[test]
    fn a_decided_refusal_is_stored_and_replayed_even_when_it_would_now_pass() {
        let mut ledger = ledger(&[(1, 10), (2, 0)]);
        let key = IdempotencyKey::parse(b"refused").unwrap();
        let big = transfer(1, 2, 50);
        let report = ledger.apply_batch([(&big, Some((big.scope(), &key)))].into_iter(), 1_000);
        assert_eq!(
            report.outcomes[0],
            Outcome::Refused(Refusal::InsufficientFunds {
                balance: 10,
                available: 10
            })
        );
        run(&mut ledger, &[deposit(1, 100)]);
        let report = ledger.apply_batch([(&big, Some((big.scope(), &key)))].into_iter(), 2_000);
        assert!(matches!(&report.outcomes[0], Outcome::Replayed(stored) if stored.status == 422));
        assert_eq!(ledger.store.card_balance(&card(1)), Some(110));
    }

    #[test]
    fn rows_lag_until_the_write_back_and_a_restart_replays_what_they_lack() {
        let mut ledger = ledger(&[(1, 100), (2, 0)]);
        run(&mut ledger, &[transfer(1, 2, 30), deposit(2, 5)]);
        let row = |ledger: &Ledger<MemoryStore>, n| ledger.store.rows[&Account::Card(card(n))];
        assert_eq!(row(&ledger, 2).balance, 0, "a commit only appends");
        assert_eq!(ledger.store.card_balance(&card(2)), Some(35));
        // A restart before any write-back: the replay gives the same balances and chain heads.
        let store = std::mem::take(&mut ledger.store);
        let mut ledger = Ledger::load(store, render).unwrap();
        assert_eq!(ledger.shared().read().card(&card(2)), Some(after(35, 2)));
        let report = run(&mut ledger, &[transfer(2, 1, 35)]);
        assert!(matches!(report.outcomes[0], Outcome::Transferred { id: 3, .. }));
        // The write-back writes each account once, in chunks, and the checkpoint last.
        ledger.write_back_all().unwrap();
        assert_eq!(ledger.store.checkpoint, 3);
        assert_eq!(row(&ledger, 1), after(105, 3));
        assert_eq!(row(&ledger, 2), after(0, 3));
        assert_eq!(ledger.store.rows[&Account::World].balance, -5);
        // Nothing left to write: a step is a no-op even when the period has passed.
        let later = Instant::now() + WRITE_BACK_PERIOD * 2;
        assert!(!ledger.write_back_step(later).unwrap());
        assert_eq!(ledger.store.checkpoint, 3);
    }

    #[test]
    fn a_failed_write_back_moves_no_checkpoint_and_is_retried() {
        let mut ledger = ledger(&[(1, 100)]);
        run(&mut ledger, &[deposit(1, 1)]);
        let later = Instant::now() + WRITE_BACK_PERIOD * 2;
        ledger.store.fail_commits = true;
        assert!(ledger.write_back_step(later).is_err());
        assert_eq!(ledger.store.checkpoint, 0);
        ledger.store.fail_commits = false;
        assert!(
            !ledger.write_back_step(later).unwrap(),
            "one chunk finishes the round"
        );
        assert_eq!(ledger.store.checkpoint, 1);
        assert_eq!(ledger.store.rows[&Account::Card(card(1))].balance, 101);
    }

    /// xorshift64*: deterministic, printed, replayable.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    /// Random commands and keys against a model of the rules, with failing commits and conflicts
    /// now and then: after every batch the store's balances equal the model's, every transaction's
    /// legs sum to zero, and all balances together (the outside world's included) sum to the
    /// opening total.
    #[test]
    fn random_batches_agree_with_a_model_of_the_rules() {
        const CARDS: u8 = 6;
        let seed = 0x5eed_1e55_u64;
        let mut rng = Rng(seed);
        let opening: Vec<(u8, i64)> = (1..=CARDS).map(|n| (n, i64::from(n) * 1_000)).collect();
        let opening_total: i64 = opening.iter().map(|(_, b)| b).sum();
        let mut ledger = ledger(&opening[..CARDS as usize - 1]);
        let mut model: HashMap<u8, i64> = opening[..CARDS as usize - 1].iter().copied().collect();
        let mut model_world = 0_i64;
        let mut keys_seen: HashMap<String, String> = HashMap::new();
        let mut next_id = 1;
        for round in 0..400 {
            let size = 1 + rng.below(12) as usize;
            let commands: Vec<(Command, Option<IdempotencyKey>)> = (0..size)
                .map(|_| {
                    let a = 1 + rng.below(u64::from(CARDS)) as u8;
                    let b = 1 + rng.below(u64::from(CARDS)) as u8;
                    let amount = 1 + rng.below(3_000) as i64;
                    let command = match rng.below(10) {
                        0 => open(a),
                        1..=3 => deposit(a, if rng.below(2) == 0 { amount } else { -amount }),
                        _ if a == b => deposit(a, amount),
                        _ => transfer(a, b, amount),
                    };
                    let key = (rng.below(4) == 0)
                        .then(|| IdempotencyKey::parse(format!("k{}", rng.below(40)).as_bytes()).unwrap());
                    (command, key)
                })
                .collect();
            ledger.store.fail_commits = rng.below(15) == 0;
            ledger.store.conflicts = u32::from(rng.below(15) == 0);
            let report = ledger.apply_batch(
                commands
                    .iter()
                    .map(|(c, k)| (c, k.as_ref().map(|k| (c.scope(), k)))),
                round,
            );
            // Now and then a chunk of write-back (which may fail too), or a restart, which replays
            // whatever the rows lack: neither may change what the ledger decides next.
            ledger.store.fail_commits = rng.below(4) == 0;
            ledger.store.conflicts = 0;
            if rng.below(3) == 0 {
                let _ = ledger.write_back_step(Instant::now() + WRITE_BACK_PERIOD * 2);
            }
            ledger.store.fail_commits = false;
            if rng.below(25) == 0 {
                let store = std::mem::take(&mut ledger.store);
                ledger = Ledger::load(store, render).unwrap();
            }
            if !report.commit_ok {
                assert!(
                    report.outcomes.iter().all(|o| *o == Outcome::StorageFailed),
                    "seed {seed}"
                );
                continue;
            }
            // The model decides the same commands in order.
            let mut batch_keys: HashMap<String, String> = HashMap::new();
            for ((command, key), outcome) in commands.iter().zip(&report.outcomes) {
                if let Some(key) = key {
                    let scoped = format!("{} {}", command.scope(), key.as_str());
                    if let Some(fingerprint) = keys_seen.get(&scoped).or(batch_keys.get(&scoped)) {
                        if *fingerprint == command.fingerprint() {
                            assert!(
                                matches!(outcome, Outcome::Replayed(_)),
                                "round {round}: {outcome:?}"
                            );
                        } else {
                            assert_eq!(*outcome, Outcome::Refused(Refusal::IdempotencyKeyReused));
                        }
                        continue;
                    }
                    batch_keys.insert(scoped, command.fingerprint());
                }
                let expected_id = match command {
                    Command::OpenAccount(open) => {
                        let n: u8 = open.card.as_str().parse().unwrap();
                        let exists = model.contains_key(&n);
                        if !exists {
                            model.insert(n, 0);
                        }
                        assert_eq!(
                            matches!(outcome, Outcome::Opened { .. }),
                            !exists,
                            "round {round}"
                        );
                        None
                    }
                    Command::Transaction(tx) => {
                        let n: u8 = tx.card.as_str().parse().unwrap();
                        match model.get_mut(&n) {
                            Some(balance) if *balance + tx.amount.minor_units() >= 0 => {
                                *balance += tx.amount.minor_units();
                                model_world -= tx.amount.minor_units();
                                Some(*balance)
                            }
                            _ => None,
                        }
                    }
                    Command::SetLimit(_)
                    | Command::PlaceHold(_)
                    | Command::CaptureHold(_)
                    | Command::VoidHold(_)
                    | Command::Batch(_)
                    | Command::ExpireHold(_) => unreachable!("the model makes none of these"),
                    Command::Transfer(t) => {
                        let (s, d): (u8, u8) = (
                            t.source.as_str().parse().unwrap(),
                            t.destination.as_str().parse().unwrap(),
                        );
                        let amount = t.amount.minor_units();
                        match (model.get(&s).copied(), model.get(&d).copied()) {
                            (Some(sb), Some(_)) if sb >= amount => {
                                *model.get_mut(&s).unwrap() -= amount;
                                *model.get_mut(&d).unwrap() += amount;
                                Some(model[&s])
                            }
                            _ => None,
                        }
                    }
                    Command::BulkTransfer(_) => unreachable!("this model sends no bulk requests"),
                };
                match (expected_id, outcome) {
                    (Some(balance), Outcome::Posted { id, balance: got, .. }) => {
                        assert_eq!((*id, *got), (next_id, balance), "round {round}");
                        next_id += 1;
                    }
                    (
                        Some(balance),
                        Outcome::Transferred {
                            id, source_balance, ..
                        },
                    ) => {
                        assert_eq!((*id, *source_balance), (next_id, balance), "round {round}");
                        next_id += 1;
                    }
                    (None, Outcome::Refused(_) | Outcome::Opened { .. }) => {}
                    (expected, got) => {
                        panic!("round {round} (seed {seed}): model says {expected:?}, ledger {got:?}")
                    }
                }
            }
            keys_seen.extend(batch_keys);
            for (n, balance) in &model {
                assert_eq!(
                    ledger.store.card_balance(&card(*n)),
                    Some(*balance),
                    "round {round}: card {n}"
                );
            }
            assert_eq!(world(&ledger), model_world);
            let total: i64 = ledger.store.current().values().map(|state| state.balance).sum();
            let opened_total: i64 = opening[..CARDS as usize - 1].iter().map(|(_, b)| b).sum();
            assert_eq!(
                total, opened_total,
                "money is neither made nor lost (round {round})"
            );
            assert!(opening_total > opened_total);
        }
        // Each leg links to its account's previous transaction: the chains are exactly the history.
        let mut last: HashMap<Account, i64> = HashMap::new();
        for record in &ledger.store.transactions {
            assert_eq!(record.legs[0].amount + record.legs[1].amount, 0);
            for leg in &record.legs {
                assert_eq!(
                    leg.previous_id,
                    last.get(&leg.account).copied(),
                    "chain of {:?}",
                    leg.account
                );
                last.insert(leg.account.clone(), record.id);
            }
        }
        assert!(next_id > 100, "the workload commits something ({next_id})");
    }
}
