//! The storage boundary. The engine decides; a store only persists and reads back.
//!
//! [`Store`] is the write side, owned by the engine's workers (one at a time); [`BalanceReader`]
//! is the read side, shared by HTTP handlers. SQLite implements both today ([`sqlite`]); [`memory`]
//! implements the write side for engine tests; a
//! PostgreSQL store would implement the same two traits and nothing above this module would change.
//!
//! What each backend guarantees about writers, and how:
//! * SQLite: **one writing tallyd per database file.** [`sqlite::SqliteStore::open`] takes an
//!   exclusive `flock` on `<db>.lock` ([`lock`]) before it touches the file, and holds it until the
//!   store is dropped or the process dies; a second `serve` is refused (or waits, with
//!   `--lock-wait-ms`) before it listens. The engine may therefore decide against balances it holds
//!   in memory. Writers outside tallyd (a `sqlite3` shell) are not locked out, so every commit
//!   checks `PRAGMA data_version` under SQLite's write lock: if another connection committed since
//!   our last commit, the batch is refused whole, the ledger re-reads every balance and decides the
//!   batch again, so an outside change is never overwritten.
//! * PostgreSQL (to come): many tallyd instances on one database; the database decides, under row
//!   locks taken in one global order, and no instance trusts balances it holds in memory.

pub mod lock;
pub mod memory;
pub mod sqlite;

use serde::Serialize;

use crate::domain::{Account, CardNumber, IdempotencyKey, Kind, Reference};

/// One account's committed state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountState {
    pub balance: i64,
    /// The account's last transaction: the head of its chain (`None` before its first).
    pub last_transaction_id: Option<i64>,
}

/// What the engine needs at start-up (and after a failed commit) to decide batches without reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerState {
    /// Every card account and its committed state.
    pub cards: Vec<(CardNumber, AccountState)>,
    /// The outside world's: its balance is minus everything ever deposited net of withdrawals.
    pub world: AccountState,
    /// The id the next committed transaction gets (ids are assigned by the one writer, in order).
    pub next_transaction_id: i64,
    /// When the last committed transaction was made: new ones are never dated earlier, so that ids
    /// and times agree even if the clock stepped back across a restart.
    pub last_at_unix_ms: i64,
}

/// One side of a transaction: the account, its signed change, and its balance afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    pub account: Account,
    /// Signed minor units, never zero; the legs of a transaction sum to zero.
    pub amount: i64,
    /// The account's balance after this leg (and after every earlier leg of the batch).
    pub balance_after: i64,
    /// The account's transaction before this one (`None` for its first): its chain's next link.
    pub previous_id: Option<i64>,
}

/// A committed movement: `amount` from `source` to `destination`, as two legs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionRecord {
    pub id: i64,
    pub kind: Kind,
    /// Positive minor units.
    pub amount: i64,
    pub reference: Option<Reference>,
    pub idempotency_key: Option<IdempotencyKey>,
    /// The debit of the source, then the credit of the destination.
    pub legs: [Leg; 2],
}

/// An account opened by this batch, with balance zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAccount {
    pub card: CardNumber,
}

/// A decided request's answer, kept under its idempotency key so that a retry gets it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyRecord {
    /// The route the key belongs to.
    pub scope: &'static str,
    pub key: IdempotencyKey,
    /// The parsed request, canonical: a retry must match it.
    pub stored: StoredAnswer,
    /// The transaction the request produced, if it moved money.
    pub transaction_id: Option<i64>,
}

/// The status and exact body first answered to a keyed request, and what that request was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub fingerprint: String,
    pub status: u16,
    pub body: Vec<u8>,
}

/// Everything one batch writes, in one store transaction: all of it or none of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub at_unix_ms: i64,
    pub accounts: Vec<NewAccount>,
    /// In id order.
    pub transactions: Vec<TransactionRecord>,
    pub idempotency: Vec<IdempotencyRecord>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty() && self.transactions.is_empty() && self.idempotency.is_empty()
    }
}

/// Sum and number of all card balances (the outside world is not a card), kept up to date as
/// batches commit so that the average balance never needs a table scan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// i128 because 100k balances near i64::MAX would overflow an i64 sum.
    pub balance_sum: i128,
    pub accounts: i64,
}

impl Totals {
    /// The one derived float in tallyd: reported, never stored or used for money.
    pub fn average(&self) -> f64 {
        if self.accounts == 0 {
            0.0
        } else {
            self.balance_sum as f64 / self.accounts as f64
        }
    }
}

/// What went wrong, said the way the engine must react to it, not by which library raised it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Nothing was written, and the same work may succeed later (disk full, busy, I/O error).
    #[error("storage unavailable: {0}")]
    Retryable(String),
    /// Another writer changed what the batch was decided on; nothing was written: decide again.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The commit may or may not be on disk (an error while making it durable): re-read the state.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The store cannot be used as it is (a database of another program, a newer schema, a seed
    /// that does not load, a corrupt file); no retry will help.
    #[error("{0}")]
    Unusable(String),
    /// Another tallyd holds the database.
    #[error(transparent)]
    Locked(#[from] lock::LockError),
}

/// The write side. Every method may block on disk; call it from a worker thread, never from async code.
pub trait Store: Send + 'static {
    /// Every account's committed balance and the next transaction id, read at start-up (and after a
    /// failed commit) so that batches are decided without reads.
    fn load(&mut self) -> Result<LedgerState, StoreError>;

    /// Whether another writer committed since our last commit or load. Cheap; asked before each
    /// batch so that even a batch that writes nothing is decided on current state.
    fn changed_outside(&mut self) -> Result<bool, StoreError>;

    /// The answer stored under each (scope, key), if the key was used and not yet pruned, in the
    /// order asked: a batch asks for all of its keys at once, in one read transaction.
    fn idempotent_answers(
        &mut self,
        keys: &[(&str, &IdempotencyKey)],
    ) -> Result<Vec<Option<StoredAnswer>>, StoreError>;

    /// Writes the whole batch in one transaction and makes it durable as configured. All or
    /// nothing: on `Err` nothing changed (except for `OutcomeUnknown`, after which the caller
    /// re-reads the state). `Conflict` means another writer committed since our last commit.
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;

    /// Deletes at most `rows_max` idempotency records created before `before_unix_ms`; returns how
    /// many. Small, so that it never holds up a batch for long.
    fn prune_idempotency(&mut self, before_unix_ms: i64, rows_max: u32) -> Result<usize, StoreError>;
}

/// An account as `GET /accounts/{card}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountView {
    pub card_number: String,
    pub balance: i64,
    /// What may be spent: the balance, until holds exist.
    pub available: i64,
    pub created_at_ms: i64,
}

/// One leg as `GET /transactions/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LegView {
    /// A card number, or the outside world's name.
    pub card_number: String,
    pub amount: i64,
    pub balance_after: i64,
}

/// A committed transaction with its legs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransactionView {
    pub id: i64,
    pub kind: &'static str,
    pub amount: i64,
    pub reference: Option<String>,
    pub created_at_ms: i64,
    pub legs: Vec<LegView>,
    pub idempotency_key: Option<String>,
}

/// One line of an account's statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntryView {
    /// The transaction's id (also the pagination cursor).
    pub id: i64,
    pub kind: &'static str,
    /// Signed, for this account.
    pub amount: i64,
    pub balance_after: i64,
    /// The other leg's account.
    pub counterparty: String,
    pub created_at_ms: i64,
}

/// A page of a statement, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EntriesPage {
    pub data: Vec<EntryView>,
    pub has_more: bool,
}

/// The read side: committed state, never blocked by a writer. Every method may block; call it
/// from a blocking thread. Each answers from one consistent snapshot.
pub trait Reader: Send + Sync + 'static {
    /// The balance of `card` now, or as of `at_unix_ms` (from the journal); `None` without such a card.
    fn balance(&self, card: &CardNumber, at_unix_ms: Option<i64>) -> Result<Option<i64>, StoreError>;
    fn account(&self, card: &CardNumber) -> Result<Option<AccountView>, StoreError>;
    fn transaction(&self, id: i64) -> Result<Option<TransactionView>, StoreError>;
    /// The transaction a request with this idempotency key produced, on any route that moves money,
    /// under the scopes that start with `scope_prefix` (the caller's API key name; "" without keys).
    fn transaction_by_key(
        &self,
        scope_prefix: &str,
        key: &IdempotencyKey,
    ) -> Result<Option<TransactionView>, StoreError>;
    /// Up to `limit` entries of `card` older than the transaction `starting_after` (newest first);
    /// `None` without such a card.
    fn entries(
        &self,
        card: &CardNumber,
        limit: u32,
        starting_after: Option<i64>,
    ) -> Result<Option<EntriesPage>, StoreError>;
}
