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
//!   in memory, and it does: a commit appends the batch's transactions (the durable record, with
//!   each leg's balance after it) and its idempotency records, and writes the few rows of holds
//!   placed or resolved and of accounts whose limit or held sum changed (small tables, read whole
//!   at start-up), and nothing else; the engine writes
//!   the balances of the accounts that moved back to their rows later, in key order, in chunks
//!   between batches ([`Store::write_back`]), and moves the balance checkpoint forward with the last
//!   chunk. [`Store::load`] reads the rows and replays the transactions after the checkpoint, so a
//!   crash at any point between a commit and its write-back loses nothing. Writers outside tallyd (a `sqlite3` shell) are not locked out, so every commit
//!   checks `PRAGMA data_version` under SQLite's write lock: if another connection committed since
//!   our last commit, the batch is refused whole, the ledger re-reads every balance and decides the
//!   batch again, so an outside change is never overwritten.
//! * PostgreSQL (to come): many tallyd instances on one database; the database decides, under row
//!   locks taken in one global order, and no instance trusts balances it holds in memory.

pub mod lock;
pub mod memory;
pub mod postgres;
pub mod sqlite;

use serde::Serialize;

use crate::domain::{Account, CardKey, CardNumber, IdempotencyKey, Kind, Reference};

/// One account's committed state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccountState {
    pub balance: i64,
    /// The account's last transaction: the head of its chain (`None` before its first).
    pub last_transaction_id: Option<i64>,
}

/// One card account as loaded: its packed card number, balance and last transaction (0 before
/// any), 24 bytes, so that ten million of them load into one vector without another copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedAccount {
    pub key: CardKey,
    pub balance: i64,
    pub last_transaction_id: u64,
}

impl PackedAccount {
    pub fn new(key: CardKey, state: AccountState) -> Self {
        Self {
            key,
            balance: state.balance,
            last_transaction_id: state.last_transaction_id.map_or(0, |id| id as u64),
        }
    }
}

/// An account's credit terms and reservations, kept only for accounts that have either (most
/// have neither, and ten million of them must stay 24 bytes each).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Credit {
    /// How far below zero the balance may go (0 to [`crate::domain::OVERDRAFT_LIMIT_MAX`]).
    pub overdraft_limit: i64,
    /// The sum of the account's pending holds.
    pub held: i64,
}

impl Credit {
    /// What may still be spent: `balance - held + overdraft_limit`. In i128, because the sum of
    /// three i64 may not fit one.
    pub fn available(self, balance: i64) -> i128 {
        i128::from(balance) - i128::from(self.held) + i128::from(self.overdraft_limit)
    }

    pub fn is_none(self) -> bool {
        self == Credit::default()
    }
}

/// Where a hold is in its life: pending until it is resolved once, by a capture, a void or its
/// expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldStatus {
    Pending,
    Captured,
    Voided,
    Expired,
}

impl HoldStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Pending => "pending",
            HoldStatus::Captured => "captured",
            HoldStatus::Voided => "voided",
            HoldStatus::Expired => "expired",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            HoldStatus::Pending,
            HoldStatus::Captured,
            HoldStatus::Voided,
            HoldStatus::Expired,
        ]
        .into_iter()
        .find(|status| status.as_str() == text)
    }
}

/// A hold: `amount` reserved on `card` for a later capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Hold {
    pub id: i64,
    #[serde(rename = "card_number")]
    pub card: CardNumber,
    /// The card a capture pays; `None`: the outside world.
    pub destination: Option<CardNumber>,
    pub amount: i64,
    #[serde(serialize_with = "hold_status")]
    pub status: HoldStatus,
    /// What the capture posted (at most `amount`); set only when captured.
    pub captured_amount: Option<i64>,
    /// The transaction the capture produced.
    pub transaction_id: Option<i64>,
    pub reference: Option<Reference>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// When it was captured, voided or expired.
    pub resolved_at_ms: Option<i64>,
}

fn hold_status<S: serde::Serializer>(status: &HoldStatus, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(status.as_str())
}

/// An account's new credit terms, written by a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditRow {
    pub card: CardNumber,
    pub credit: Credit,
}

/// What the engine needs at start-up (and after a failed commit) to decide batches without reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerState {
    /// Every card account and its committed state (the journal replayed past the checkpoint).
    pub cards: Vec<PackedAccount>,
    /// The accounts whose stored row is behind their committed state: the next write-back's.
    pub behind: Vec<Account>,
    /// The balance checkpoint: every account's row has every leg up to this transaction id.
    pub checkpoint: i64,
    /// The live idempotency keys, in id order (oldest first).
    pub keys: Vec<KeyName>,
    /// The id the next idempotency record gets.
    pub next_key_id: i64,
    /// The accounts with an overdraft limit or a pending hold.
    pub credit: Vec<CreditRow>,
    /// Every pending hold.
    pub pending_holds: Vec<Hold>,
    /// The id the next hold gets.
    pub next_hold_id: i64,
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
    /// Assigned by the engine, in order, like transaction ids.
    pub id: i64,
    /// The route the key belongs to.
    pub scope: &'static str,
    pub key: IdempotencyKey,
    /// The parsed request, canonical: a retry must match it.
    pub stored: StoredAnswer,
    /// The transaction the request produced, if it moved money.
    pub transaction_id: Option<i64>,
}

/// A stored idempotency record's identity: its id and the (scope, key) it is kept under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyName {
    pub id: i64,
    pub scope: String,
    pub key: String,
}

/// A stored idempotency record, read back by id: what it is kept under, and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub scope: String,
    pub key: String,
    pub answer: StoredAnswer,
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
    /// Holds placed or resolved, each in its state after the batch (a hold placed and captured in
    /// one batch appears once, captured).
    pub holds: Vec<Hold>,
    /// Accounts whose limit or held amount changed, with their terms after the batch.
    pub credit: Vec<CreditRow>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
            && self.transactions.is_empty()
            && self.idempotency.is_empty()
            && self.holds.is_empty()
            && self.credit.is_empty()
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

    /// The idempotency records with these ids (`None` for one that is gone), in the order asked:
    /// a batch asks for all of its keys' records at once, in one read transaction. The engine
    /// finds the ids in its own index of live keys and checks the names it gets back.
    fn idempotent_answers(&mut self, ids: &[i64]) -> Result<Vec<Option<StoredKey>>, StoreError>;

    /// The status of the holds with these ids (`None` for an id no hold has), in the order asked:
    /// the engine keeps only pending holds in memory, and asks for the others a batch names.
    fn hold_statuses(&mut self, ids: &[i64]) -> Result<Vec<Option<HoldStatus>>, StoreError>;

    /// Writes the whole batch in one transaction and makes it durable as configured. All or
    /// nothing: on `Err` nothing changed (except for `OutcomeUnknown`, after which the caller
    /// re-reads the state). `Conflict` means another writer committed since our last commit.
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;

    /// Writes these accounts' committed states to their rows, in one transaction, and when
    /// `checkpoint` is given moves the balance checkpoint to it in the same transaction: the caller
    /// promises every account with a leg up to that id is written by now. `Conflict` when another
    /// writer committed since our last commit (nothing written: the engine re-reads first).
    fn write_back(
        &mut self,
        accounts: &[(Account, AccountState)],
        checkpoint: Option<i64>,
    ) -> Result<(), StoreError>;

    /// Deletes at most `rows_max` of the oldest idempotency records created before
    /// `before_unix_ms`, and says which. Small, so that it never holds up a batch for long.
    fn prune_idempotency(&mut self, before_unix_ms: i64, rows_max: u32) -> Result<Vec<KeyName>, StoreError>;
}

/// An account as `GET /accounts/{card}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccountView {
    pub card_number: String,
    pub balance: i64,
    /// The sum of the account's pending holds.
    pub held: i64,
    pub overdraft_limit: i64,
    /// What may be spent: `balance - held + overdraft_limit`.
    pub available: i64,
    pub created_at_ms: i64,
}

/// A page of an account's holds, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HoldsPage {
    pub data: Vec<Hold>,
    pub has_more: bool,
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

/// The read side: committed history, never blocked by a writer. Every method may block; call it
/// from a blocking thread. Each answers from one consistent snapshot.
///
/// An account's current state is the engine's (it is in memory, exactly as committed; the stored
/// row may lag behind it until the write-back): callers pass the head of the account's chain they
/// got from the engine, and the reader walks the history from there. Everything the engine has
/// absorbed is committed, so the snapshot always holds the head.
pub trait Reader: Send + Sync + 'static {
    /// The balance of `card` as of `at_unix_ms`, walking its chain from `head`; `None` without
    /// such a card.
    fn balance_at(
        &self,
        card: &CardNumber,
        head: Option<i64>,
        at_unix_ms: i64,
    ) -> Result<Option<i64>, StoreError>;
    /// `card`'s current state as the database has it (its row and the journal after the
    /// checkpoint), for an account the engine does not know yet because it was opened outside
    /// tallyd a moment ago; `None` without such a card.
    fn current(&self, card: &CardNumber) -> Result<Option<AccountState>, StoreError>;
    /// When `card`'s account was opened; `None` without such a card.
    fn opened_at(&self, card: &CardNumber) -> Result<Option<i64>, StoreError>;
    fn transaction(&self, id: i64) -> Result<Option<TransactionView>, StoreError>;
    /// The newest transaction produced by one of these idempotency records (the engine's
    /// candidates for `key`, each with the scope it was found under), checking that each really
    /// is kept under that scope and `key`.
    fn transaction_by_key(
        &self,
        key: &IdempotencyKey,
        records: &[(String, i64)],
    ) -> Result<Option<TransactionView>, StoreError>;
    /// Up to `limit` entries of `card` older than the transaction `starting_after` (newest first),
    /// walking its chain from `head`; `None` without such a card.
    fn entries(
        &self,
        card: &CardNumber,
        head: Option<i64>,
        limit: u32,
        starting_after: Option<i64>,
    ) -> Result<Option<EntriesPage>, StoreError>;
    /// A hold as committed; `None` without one of this id.
    fn hold(&self, id: i64) -> Result<Option<Hold>, StoreError>;
    /// Up to `limit` of `card`'s holds with ids below `starting_after` (newest first), only those
    /// in `status` when given.
    fn holds(
        &self,
        card: &CardNumber,
        status: Option<HoldStatus>,
        limit: u32,
        starting_after: Option<i64>,
    ) -> Result<HoldsPage, StoreError>;
}
