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

use crate::domain::CardNumber;

/// One committed change to one account, as the engine decided it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Posting {
    pub card: CardNumber,
    /// Signed minor units, never zero.
    pub amount: i64,
    /// The account's balance after this posting (and after every earlier posting of the batch).
    pub balance_after: i64,
}

/// Sum and number of all balances, kept up to date as batches commit so that the average balance
/// never needs a table scan.
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("read pool: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("cannot start a store thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Locked(#[from] lock::LockError),
    /// Another connection committed since our last commit; nothing of this batch was written.
    #[error("the database was changed by another writer since the last commit")]
    ChangedOutside,
    #[error("seed file {path}: {source}")]
    Seed { path: String, source: std::io::Error },
}

/// The write side. Every method may block on disk; call it from a worker thread, never from async code.
pub trait Store: Send + 'static {
    /// The committed balance of `card`, or `None` if there is no such account.
    fn balance(&mut self, card: &CardNumber) -> Result<Option<i64>, StoreError>;

    /// Applies every posting (the account's new balance and one journal row each) in one
    /// transaction and makes it durable as configured. All or nothing: on `Err` nothing changed.
    /// Returns the journal ids in the order of `postings`.
    fn commit(&mut self, postings: &[Posting], at_unix_ms: i64) -> Result<Vec<i64>, StoreError>;

    /// Every account's committed balance, read at start-up (and after a failed commit) so that
    /// batches are decided without reads.
    fn balances(&mut self) -> Result<Vec<(CardNumber, i64)>, StoreError>;
}

/// The read side: committed balances, never blocked by a writer.
pub trait BalanceReader: Send + Sync + 'static {
    /// May block; call it from a blocking thread.
    fn balance(&self, card: &CardNumber) -> Result<Option<i64>, StoreError>;
}
