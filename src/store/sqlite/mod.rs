//! SQLite, the store of a single machine: one write connection (owned by whichever engine worker
//! holds the ledger), a pool of read-only connections for the read routes ([`reader`]), the
//! schema and its upgrades ([`schema`]), and the invariant checks of `tallyd verify` ([`verify`]).
//!
//! Pragmas, and why:
//! * `journal_mode=WAL`: readers never block the writer and the writer never blocks readers, so
//!   reads stay fast while batches commit; a commit appends to one file.
//! * `synchronous=FULL` (durability `full`, the default): the WAL is fsynced at every commit, so
//!   an answered transaction survives power loss. `NORMAL` fsyncs only at checkpoints: it survives a
//!   crash of the process but may lose the last commits on power loss.
//! * `busy_timeout` (`--busy-timeout-ms`): one tallyd writes a file (the writer lock, [`super::lock`])
//!   and one worker at a time (the ledger's mutex), so our own workers never meet `SQLITE_BUSY`; the
//!   timeout covers an outside writer such as a `sqlite3` shell, and past it the batch fails as a
//!   whole with 503 and nothing changed.
//! * checkpoints: a background thread copies the WAL into the database file every 250 ms with a
//!   passive checkpoint, which blocks no one; the writer's automatic checkpoint (every 64 MiB of
//!   WAL) then has little left to copy. Measured at 256 connections, this took p99 from 14 to 10 ms
//!   with `full` and from 54 to 11 ms with `normal`, where checkpoints had stalled commits.
//! * `cache_size` of 4 MiB and `mmap_size` of 1 GiB: see [`WRITE_CACHE_KIB`] for why the cache is small.
//!
//! What a batch writes: one `transactions` row per movement, both legs in it (appended: ids grow, so
//! the table only ever gains pages at its end), then each touched account's balance and last
//! transaction, updated in place once, in key order; new accounts; idempotency records. An account's
//! history is the chain of its legs' `previous_id`s, so no index on account has to be kept: a deposit
//! dirties one accounts page and the end of the transactions table, as version 1 dirtied one accounts
//! page and the end of the journal. (An earlier draft clustered the legs by account in their own
//! table: every commit then split pages at random, and SQLite's page reordering during a split makes
//! the commit scan the whole page cache; it measured 2.1 times slower per batch.)

pub mod import;
pub mod keys;
mod reader;
mod schema;
mod verify;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

pub use reader::SqliteReader;
pub use verify::{verify, Check};

use super::lock::WriterLock;
use super::{AccountState, Batch, IdempotencyKey, LedgerState, Store, StoreError, StoredAnswer};
use crate::config::Durability;
use crate::domain::Account;

/// The seed accounts used when no `--seed` file is given.
pub const BUILTIN_SEED: &str = include_str!("../../../users.db.sql");

/// The page cache of the write connection, in KiB (a negative `cache_size` means KiB). Small on
/// purpose: when a random insert (an idempotency key) splits a B-tree page, SQLite's page
/// reordering passes through the lock page's number, and the commit then scans the whole cache's
/// hash table (`pcache1TruncateUnsafe`, 15% of the writer's time with 64 MiB). Reads that miss it are
/// served from the memory map below, without a system call. Measured (8 s runs, 256 connections,
/// alternating): keyed POST /transaction 33-34k/s with 64 MiB, 35-40k/s with 4 MiB and the map;
/// unkeyed the same (48-54k/s) either way.
const WRITE_CACHE_KIB: i64 = 4 * 1024;

/// Database-file pages read through a memory map (reads only: writes still go through the WAL).
const MMAP_SIZE_BYTES: i64 = 1 << 30;

/// Small pages, because a batch dirties one entries page per card it touches, at random: every
/// commit writes each dirty page whole into the WAL, so bytes written per transaction scale with
/// the page size while appends barely notice it.
const PAGE_SIZE_BYTES: i64 = 1024;

/// WAL pages between checkpoints. A checkpoint copies each distinct page once, however often it
/// changed, so a long WAL (64 MiB of 1 KiB pages) turns thousands of rewrites of the same hot pages into one.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 65_536;

const INSERT_ACCOUNT: &str = "INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms) \
     VALUES (?1, 0, 0, ?2)";
const INSERT_TRANSACTION: &str = "INSERT INTO transactions (id, kind, amount, \
     source, source_amount, source_balance_after, source_previous_id, \
     destination, destination_amount, destination_balance_after, destination_previous_id, \
     reference, idempotency_key, created_at_ms) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";
const UPDATE_ACCOUNT: &str =
    "UPDATE ledger_accounts SET balance = ?2, last_transaction_id = ?3 WHERE name = ?1";
const INSERT_IDEMPOTENCY: &str = "INSERT INTO idempotency_keys \
     (scope, idempotency_key, fingerprint, status, body, transaction_id, created_at_ms) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";
const SELECT_IDEMPOTENCY: &str =
    "SELECT fingerprint, status, body FROM idempotency_keys WHERE scope = ?1 AND idempotency_key = ?2";
const PRUNE_IDEMPOTENCY: &str = "DELETE FROM idempotency_keys WHERE (scope, idempotency_key) IN \
     (SELECT scope, idempotency_key FROM idempotency_keys WHERE created_at_ms < ?1 \
      ORDER BY created_at_ms LIMIT ?2)";
const SELECT_ACCOUNTS: &str = "SELECT name, balance, last_transaction_id FROM ledger_accounts";
const SELECT_NEXT_ID: &str = "SELECT coalesce(max(id), 0) + 1, \
     coalesce((SELECT created_at_ms FROM transactions ORDER BY id DESC LIMIT 1), 0) FROM transactions";

/// The write side of SQLite.
pub struct SqliteStore {
    conn: Connection,
    /// `PRAGMA data_version` after our last commit: it changes only when another connection
    /// commits, which is how a write from outside tallyd is noticed.
    data_version: i64,
    /// This process is the database's only tallyd writer while it holds this.
    _lock: WriterLock,
    /// Copies committed WAL frames into the database file in the background; stops when dropped.
    _checkpointer: Checkpointer,
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        match error.sqlite_error_code() {
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
                StoreError::Unusable(error.to_string())
            }
            // Busy, locked, full, read-only, I/O, a refused constraint: nothing was written.
            _ => StoreError::Retryable(error.to_string()),
        }
    }
}

/// How often the background checkpointer copies the WAL into the database file.
const CHECKPOINT_PERIOD: Duration = Duration::from_millis(250);

/// A thread with its own connection that runs `PRAGMA wal_checkpoint(PASSIVE)` every
/// `CHECKPOINT_PERIOD`. A passive checkpoint never blocks the writer or readers, so the copying and
/// the database file's fsync happen beside commits instead of inside one: when the writer's own
/// automatic checkpoint comes due, almost everything is already copied and it finishes quickly
/// (which lets the WAL start over from its beginning).
struct Checkpointer {
    /// Dropping it disconnects the channel, which ends the thread.
    _stop: std::sync::mpsc::Sender<()>,
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("tallyd-checkpointer".into())
            .spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_PERIOD)
                {
                    let result: rusqlite::Result<(i64, i64, i64)> =
                        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                        });
                    if let Err(error) = result {
                        tracing::debug!(%error, "a background checkpoint failed; the next one retries");
                    }
                }
            })
            .map_err(|error| {
                StoreError::Unusable(format!("cannot start the checkpointer thread: {error}"))
            })?;
        Ok(Self { _stop: stop })
    }
}

impl SqliteStore {
    /// Takes the database's writer lock (waiting up to `lock_wait` for another tallyd to exit),
    /// then opens the database at `path`: creates and seeds a new one, upgrades an older one, and
    /// refuses anything else.
    pub fn open(
        path: &Path,
        durability: Durability,
        busy_timeout: Duration,
        seed: Option<&Path>,
        lock_wait: Duration,
    ) -> Result<Self, StoreError> {
        let lock = WriterLock::acquire(path, lock_wait)?;
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(busy_timeout)?;
        // Only takes effect on a new, empty database; an existing one keeps its page size.
        conn.pragma_update(None, "page_size", PAGE_SIZE_BYTES)?;
        schema::prepare(&mut conn, path, seed)?;
        // API keys keep to their own table, outside the ledger's versioned schema (see [`keys`]).
        keys::ensure_table(&conn)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(%mode, "SQLite refused WAL mode; writes will block reads");
        }
        let synchronous = match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", synchronous)?;
        conn.pragma_update(None, "cache_size", -WRITE_CACHE_KIB)?;
        let _: i64 = conn.query_row(&format!("PRAGMA mmap_size = {MMAP_SIZE_BYTES}"), [], |row| {
            row.get(0)
        })?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        let checkpointer = Checkpointer::start(path)?;
        let data_version = data_version(&conn)?;
        Ok(Self {
            conn,
            data_version,
            _lock: lock,
            _checkpointer: checkpointer,
        })
    }
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA data_version", [], |row| row.get(0))
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<LedgerState, StoreError> {
        let tx = self.conn.transaction()?;
        let (next_transaction_id, last_at_unix_ms) =
            tx.query_row(SELECT_NEXT_ID, [], |row| Ok((row.get(0)?, row.get(1)?)))?;
        let mut state = LedgerState {
            next_transaction_id,
            last_at_unix_ms,
            ..LedgerState::default()
        };
        {
            let mut stmt = tx.prepare(SELECT_ACCOUNTS)?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let name: String = row.get(0)?;
                let account = AccountState {
                    balance: row.get(1)?,
                    last_transaction_id: row.get(2)?,
                };
                // The schema's CHECK admits only valid names; anything else was put there by hand.
                match Account::from_name(&name) {
                    Some(Account::Card(card)) => state.cards.push((card, account)),
                    Some(Account::World) => state.world = account,
                    None => tracing::warn!(account = %name, "ignoring an account whose name is invalid"),
                }
            }
        }
        tx.commit()?;
        self.data_version = data_version(&self.conn)?;
        Ok(state)
    }

    fn changed_outside(&mut self) -> Result<bool, StoreError> {
        Ok(data_version(&self.conn)? != self.data_version)
    }

    fn idempotent_answers(
        &mut self,
        keys: &[(&str, &IdempotencyKey)],
    ) -> Result<Vec<Option<StoredAnswer>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // One read transaction for the whole batch's keys, instead of one per lookup.
        let tx = self.conn.transaction()?;
        let mut found = Vec::with_capacity(keys.len());
        {
            let mut stmt = tx.prepare_cached(SELECT_IDEMPOTENCY)?;
            for (scope, key) in keys {
                let answer = stmt
                    .query_row(params![scope, key.as_str()], |row| {
                        Ok(StoredAnswer {
                            fingerprint: row.get(0)?,
                            status: row.get(1)?,
                            body: row.get(2)?,
                        })
                    })
                    .optional()?;
                found.push(answer);
            }
        }
        tx.commit()?;
        Ok(found)
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Under the write lock nobody else can commit, so this is the moment to ask whether anyone
        // did since our last commit (a sqlite3 shell, say): the batch was decided on balances
        // that may be stale, so it is refused whole and the ledger re-reads and decides again.
        let version = data_version(&tx)?;
        if version != self.data_version {
            self.data_version = version;
            return Err(StoreError::Conflict(
                "the database was changed by another writer since the last commit".into(),
            ));
        }
        write_batch(&tx, batch)?;
        tx.commit().map_err(|error| match error.sqlite_error_code() {
            // The frames may be in the WAL even though making them durable failed.
            Some(ErrorCode::SystemIoFailure) => StoreError::OutcomeUnknown(error.to_string()),
            _ => error.into(),
        })
    }

    fn prune_idempotency(&mut self, before_unix_ms: i64, rows_max: u32) -> Result<usize, StoreError> {
        let mut stmt = self.conn.prepare_cached(PRUNE_IDEMPOTENCY)?;
        Ok(stmt.execute(params![before_unix_ms, rows_max])?)
    }
}

fn write_batch(tx: &rusqlite::Transaction<'_>, batch: &Batch) -> rusqlite::Result<()> {
    let at = batch.at_unix_ms;
    {
        let mut insert = tx.prepare_cached(INSERT_ACCOUNT)?;
        for account in &batch.accounts {
            insert.execute(params![account.card.as_str(), at])?;
        }
    }
    // Each account's state after the batch: its last leg's balance and transaction.
    let mut finals: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    {
        let mut insert = tx.prepare_cached(INSERT_TRANSACTION)?;
        for record in &batch.transactions {
            let [source, destination] = &record.legs;
            insert.execute(params![
                record.id,
                record.kind.as_str(),
                record.amount,
                source.account.name(),
                source.amount,
                source.balance_after,
                source.previous_id,
                destination.account.name(),
                destination.amount,
                destination.balance_after,
                destination.previous_id,
                record.reference.as_ref().map(|r| r.as_str()),
                record.idempotency_key.as_ref().map(|k| k.as_str()),
                at,
            ])?;
            for leg in &record.legs {
                finals.insert(leg.account.name(), (leg.balance_after, record.id));
            }
        }
    }
    {
        // In key order, so that the updates walk the accounts B-tree once instead of jumping around it.
        let mut update = tx.prepare_cached(UPDATE_ACCOUNT)?;
        for (name, (balance, last)) in finals {
            if update.execute(params![name, balance, last])? != 1 {
                // The engine only posts to accounts it has loaded; one that vanished means someone
                // deleted it by hand. Refuse the whole batch.
                return Err(rusqlite::Error::QueryReturnedNoRows);
            }
        }
    }
    let mut insert = tx.prepare_cached(INSERT_IDEMPOTENCY)?;
    for record in &batch.idempotency {
        insert.execute(params![
            record.scope,
            record.key.as_str(),
            record.stored.fingerprint,
            record.stored.status,
            record.stored.body,
            record.transaction_id,
            at,
        ])?;
    }
    Ok(())
}
