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
//! * `cache_size` of 4 MiB and no memory map: see [`WRITE_CACHE_KIB`].
//!
//! What a batch writes: one `transactions` row per movement, both legs in it, and one
//! `idempotency_keys` row per keyed request, both appended (ids grow, so the tables only ever gain
//! pages at their end); new accounts. Nothing is updated in place: the transactions are the durable
//! record, each leg with its account's balance after it. The accounts' rows are brought up to date
//! later by [`Store::write_back`], in name order, so that a chunk of rows rewrites consecutive
//! pages, and an account that moved a hundred times since is written once. An account's history is
//! the chain of its legs' `previous_id`s, so no index on account has to be kept. (Version 2 updated
//! every touched account in every commit: at random pages, that was most of what a commit wrote.
//! An earlier draft clustered the legs by account in their own table: every commit then split pages
//! at random, and SQLite's page reordering during a split makes the commit scan the whole page
//! cache; it measured 2.1 times slower per batch.)
//!
//! Start-up ([`Store::load`]) reads the transactions after the balance checkpoint (the last leg of
//! each account there is its state) and then every account row, so its time grows with the number
//! of accounts plus the write-back's lag, which [`crate::engine`] bounds.

pub mod archive;
pub mod import;
pub mod keys;
mod reader;
mod schema;
mod verify;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior};

pub use reader::SqliteReader;
pub use schema::VERSION as SCHEMA_VERSION;
pub use verify::{verify, Check, CHECKS};

use super::lock::WriterLock;
use super::{
    AccountState, Batch, Credit, CreditRow, Hold, HoldStatus, KeyName, LedgerState, PackedAccount, Store,
    StoreError, StoredAnswer, StoredKey, TransactionRecord,
};
use crate::config::Durability;
use crate::domain::{Account, CardKey, CardNumber, Reference, WORLD_ACCOUNT};

/// The seed accounts used when no `--seed` file is given.
pub const BUILTIN_SEED: &str = include_str!("../../../users.db.sql");

/// The page cache of the write connection, in KiB (a negative `cache_size` means KiB). A commit
/// only appends, so it needs the last pages of two tables; the write-back walks the accounts in
/// name order, so it needs the pages of one run at a time; the operating system's page cache holds
/// the rest of the file. (Version 2 ran with a 1 GiB memory map beside this cache, for random
/// reads: every page it touches counts in the process's resident memory, which at ten million
/// accounts was the whole 430 MB file, read once by the start-up scan. Without random writes it
/// has nothing left to buy.)
const WRITE_CACHE_KIB: i64 = 4 * 1024;

/// The page size of a new database (an existing one keeps its own). Version 2 used 1 KiB, because
/// every commit rewrote one accounts page per card it touched, at random, and bytes written grew
/// with the page size. Commits only append now, and 4 KiB pages make a commit a quarter of the
/// WAL frames and a start-up's scan a quarter of the reads (10M accounts: 1.8 s of CPU to load
/// instead of 2.3 s). The write-back still rewrites whole pages, but in name order, many rows each.
const PAGE_SIZE_BYTES: i64 = 4096;

/// WAL pages between checkpoints. A checkpoint copies each distinct page once, however often it
/// changed, so a long WAL (64 MiB of 1 KiB pages) turns thousands of rewrites of the same hot pages into one.
const WAL_AUTOCHECKPOINT_PAGES: i64 = 16_384;

const INSERT_ACCOUNT: &str = "INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms) \
     VALUES (?1, 0, 0, ?2)";
const INSERT_TRANSACTION: &str = "INSERT INTO transactions (id, kind, amount, \
     source, source_amount, source_balance_after, source_previous_id, \
     destination, destination_amount, destination_balance_after, destination_previous_id, \
     reference, idempotency_key, created_at_ms) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";
const UPDATE_ACCOUNT: &str =
    "UPDATE ledger_accounts SET balance = ?2, last_transaction_id = ?3 WHERE name = ?1";
const UPDATE_CHECKPOINT: &str = "UPDATE ledger_checkpoint SET transaction_id = ?1 WHERE id = 1";
const SELECT_CHECKPOINT: &str = "SELECT transaction_id FROM ledger_checkpoint WHERE id = 1";
/// The transactions after the checkpoint, whose legs are newer than the accounts' rows.
const SELECT_TAIL: &str = "SELECT id, source, source_balance_after, destination, destination_balance_after \
     FROM transactions WHERE id > ?1 ORDER BY id";
const INSERT_IDEMPOTENCY: &str = "INSERT INTO idempotency_keys \
     (id, scope, idempotency_key, fingerprint, status, body, transaction_id, created_at_ms) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
const SELECT_IDEMPOTENCY: &str =
    "SELECT scope, idempotency_key, fingerprint, status, body FROM idempotency_keys WHERE id = ?1";
const SELECT_KEYS: &str = "SELECT id, scope, idempotency_key FROM idempotency_keys ORDER BY id";
const SELECT_NEXT_KEY_ID: &str = "SELECT coalesce(max(id), 0) + 1 FROM idempotency_keys";
/// The oldest first: ids grow with time (the engine never dates a record earlier than the one
/// before), so the expired records are the first rows of the table, and only the first `?2` rows
/// are read. (Filtering the whole table by age instead would read all of it every second, as
/// there is no index on the age.)
const PRUNE_IDEMPOTENCY: &str = "DELETE FROM idempotency_keys WHERE id IN \
     (SELECT id FROM (SELECT id, created_at_ms FROM idempotency_keys ORDER BY id LIMIT ?2) \
      WHERE created_at_ms < ?1) \
     RETURNING id, scope, idempotency_key";
/// The accounts in name order, and in reverse, for the two scans of a start-up.
const SELECT_ACCOUNTS_UP: &str =
    "SELECT name, balance, last_transaction_id FROM ledger_accounts ORDER BY name";
const SELECT_ACCOUNTS_DOWN: &str =
    "SELECT name, balance, last_transaction_id FROM ledger_accounts ORDER BY name DESC";
const SELECT_CREDIT: &str = "SELECT name, overdraft_limit, held FROM account_credit \
     WHERE overdraft_limit <> 0 OR held <> 0";
const UPSERT_CREDIT: &str = "INSERT INTO account_credit (name, overdraft_limit, held) VALUES (?1, ?2, ?3) \
     ON CONFLICT (name) DO UPDATE SET overdraft_limit = excluded.overdraft_limit, held = excluded.held";
/// The columns of a hold, in [`hold_from_row`]'s order.
pub(super) const HOLD_COLUMNS: &str = "id, card_number, destination, amount, status, captured_amount, \
     transaction_id, reference, created_at_ms, expires_at_ms, resolved_at_ms";
const UPSERT_HOLD: &str =
    "INSERT INTO holds (id, card_number, destination, amount, status, captured_amount, \
     transaction_id, reference, created_at_ms, expires_at_ms, resolved_at_ms) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
     ON CONFLICT (id) DO UPDATE SET status = excluded.status, captured_amount = excluded.captured_amount, \
     transaction_id = excluded.transaction_id, resolved_at_ms = excluded.resolved_at_ms";
const SELECT_HOLD_STATUS: &str = "SELECT status FROM holds WHERE id = ?1";
const SELECT_NEXT_HOLD_ID: &str = "SELECT coalesce(max(id), 0) + 1 FROM holds";
const SELECT_NEXT_ID: &str = "SELECT coalesce(max(id), 0) + 1, \
     coalesce((SELECT created_at_ms FROM transactions ORDER BY id DESC LIMIT 1), 0) FROM transactions";

/// The write side of SQLite.
pub struct SqliteStore {
    conn: Connection,
    /// For the second connection of a start-up's scan.
    path: std::path::PathBuf,
    /// As configured; the write-back relaxes it for the chunks that do not move the checkpoint.
    durability: Durability,
    /// True while `synchronous` is relaxed for a write-back chunk.
    sync_relaxed: bool,
    /// API key use times to write in our next write transaction ([`keys`]).
    key_touches: keys::KeyTouches,
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
        conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
        let checkpointer = Checkpointer::start(path)?;
        let data_version = data_version(&conn)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
            durability,
            sync_relaxed: false,
            key_touches: keys::KeyTouches::default(),
            data_version,
            _lock: lock,
            _checkpointer: checkpointer,
        })
    }
}

/// What one scan of the accounts found.
struct Scanned {
    cards: Vec<PackedAccount>,
    world: Option<AccountState>,
    behind: Vec<Account>,
}

/// The cards of the two scans, in key order, each once. Each scan is in name order, and they
/// overlap by a few rows where they met: the rows of `low` from `high`'s first name on are the
/// overlap. When every name has one length (seeded cards), name order is key order and the
/// result is sorted already: a cut and an append, not a sort of ten million.
fn join_scans(mut low: Vec<PackedAccount>, high: Vec<PackedAccount>) -> Vec<PackedAccount> {
    if let Some(first_high) = high.first() {
        let first_name = first_high.key.card();
        let overlap = low.partition_point(|card| card.key.card().as_str() < first_name.as_str());
        low.truncate(overlap);
    }
    low.extend_from_slice(&high);
    if !low.is_sorted_by_key(|card| card.key) {
        low.sort_unstable_by_key(|card| card.key);
    }
    low
}

/// Which way a scan of the accounts walks the names.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

/// Where the two scans of a start-up are: each publishes the last name it read and stops once
/// it reaches the other's (everything between has been read by one or the other).
#[derive(Default)]
struct Meeting {
    up: std::sync::Mutex<Option<String>>,
    down: std::sync::Mutex<Option<String>>,
}

/// Rows a scan reads between two looks at where the other one is.
const MEETING_ROWS: usize = 4_096;

/// The accounts from one end of the name order until the other scan is met, each overridden by
/// its last leg after the checkpoint (`newer`).
fn scan_accounts(
    conn: &Connection,
    direction: Direction,
    meeting: &Meeting,
    newer: &HashMap<String, AccountState>,
) -> Result<Scanned, StoreError> {
    let mut found = Scanned {
        cards: Vec::new(),
        world: None,
        behind: Vec::new(),
    };
    let mut stmt = conn.prepare(match direction {
        Direction::Up => SELECT_ACCOUNTS_UP,
        Direction::Down => SELECT_ACCOUNTS_DOWN,
    })?;
    let (mine, theirs) = match direction {
        Direction::Up => (&meeting.up, &meeting.down),
        Direction::Down => (&meeting.down, &meeting.up),
    };
    let lock =
        |slot: &std::sync::Mutex<Option<String>>| slot.lock().map(|guard| guard.clone()).unwrap_or_default();
    let mut rows = stmt.query([])?;
    let mut read = 0_usize;
    while let Some(row) = rows.next()? {
        // Borrowed, not copied: this loop runs once per account, ten million times for ten
        // million accounts.
        let name = row.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?;
        read += 1;
        if read.is_multiple_of(MEETING_ROWS) {
            // Met when this name is at or past the last one the other scan read: everything from
            // there on is the other's (what each publishes it has already read).
            let met = lock(theirs).is_some_and(|other| match direction {
                Direction::Up => name >= other.as_str(),
                Direction::Down => name <= other.as_str(),
            });
            if met {
                break;
            }
        }
        let publish = read.is_multiple_of(MEETING_ROWS);
        let replayed = newer.get(name).copied();
        let account = replayed.unwrap_or(AccountState {
            balance: row.get(1)?,
            last_transaction_id: row.get(2)?,
        });
        if let Some(key) = CardKey::from_digits(name) {
            found.cards.push(PackedAccount::new(key, account));
        } else if name == WORLD_ACCOUNT {
            found.world = Some(account);
        } else {
            // The schema's CHECK admits only valid names; anything else was put there by hand.
            tracing::warn!(account = %name, "ignoring an account whose name is invalid");
            continue;
        }
        if replayed.is_some() {
            found.behind.push(Account::from_name(name).expect("a valid name"));
        }
        if publish {
            if let Ok(mut published) = mine.lock() {
                *published = Some(name.to_owned());
            }
        }
    }
    Ok(found)
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA data_version", [], |row| row.get(0))
}

impl Store for SqliteStore {
    fn load(&mut self) -> Result<LedgerState, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (next_transaction_id, last_at_unix_ms) =
            tx.query_row(SELECT_NEXT_ID, [], |row| Ok((row.get(0)?, row.get(1)?)))?;
        let next_key_id = tx.query_row(SELECT_NEXT_KEY_ID, [], |row| row.get(0))?;
        let mut state = LedgerState {
            next_transaction_id,
            last_at_unix_ms,
            next_key_id,
            ..LedgerState::default()
        };
        // The replay: each account's last leg after the checkpoint is its state (legs carry the
        // balance after them), and wins over its row.
        let checkpoint: i64 = tx.query_row(SELECT_CHECKPOINT, [], |row| row.get(0))?;
        let mut newer: HashMap<String, AccountState> = HashMap::new();
        {
            let mut stmt = tx.prepare(SELECT_TAIL)?;
            let mut rows = stmt.query([checkpoint])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                for at in [1, 3] {
                    let state = AccountState {
                        balance: row.get(at + 1)?,
                        last_transaction_id: Some(id),
                    };
                    newer.insert(row.get(at)?, state);
                }
            }
        }
        // The accounts, read from both ends of the name order at once, one scan on this connection
        // and one on another, until they meet: on two cores that nearly halves a start-up over
        // millions of them, however the names are spread. The write lock this transaction holds
        // keeps both readers on the same committed state.
        let meeting = Meeting::default();
        let (low, high) = std::thread::scope(|scope| {
            let (newer, path, meeting) = (&newer, &self.path, &meeting);
            let high = scope.spawn(move || {
                // No mutex: the connection lives on this one thread (a serialized connection spent
                // a sixth of the scan locking and unlocking).
                let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
                let conn = Connection::open_with_flags(path, flags)?;
                scan_accounts(&conn, Direction::Down, meeting, newer)
            });
            let low = scan_accounts(&tx, Direction::Up, meeting, newer);
            (low, high.join().expect("the scan thread panicked"))
        });
        let mut low = low?;
        let mut high = high?;
        high.cards.reverse();
        low.behind.extend(high.behind);
        low.world = low.world.or(high.world);
        low.cards = join_scans(low.cards, high.cards);
        state.cards = low.cards;
        state.behind = low.behind;
        state.world = low.world.unwrap_or_default();
        {
            let mut stmt = tx.prepare(SELECT_KEYS)?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                state.keys.push(KeyName {
                    id: row.get(0)?,
                    scope: row.get(1)?,
                    key: row.get(2)?,
                });
            }
        }
        state.checkpoint = checkpoint;
        state.next_hold_id = tx.query_row(SELECT_NEXT_HOLD_ID, [], |row| row.get(0))?;
        {
            let mut stmt = tx.prepare(SELECT_CREDIT)?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let name: String = row.get(0)?;
                // A row of a name that is no card (edited by hand) has no account to apply to.
                let Ok(card) = CardNumber::parse(&name) else {
                    continue;
                };
                state.credit.push(CreditRow {
                    card,
                    credit: Credit {
                        overdraft_limit: row.get(1)?,
                        held: row.get(2)?,
                    },
                });
            }
            let mut stmt = tx.prepare(&format!(
                "SELECT {HOLD_COLUMNS} FROM holds WHERE status = 'pending' ORDER BY id"
            ))?;
            let holds = stmt.query_map([], hold_from_row)?;
            state.pending_holds = holds.collect::<rusqlite::Result<_>>()?;
        }
        tx.commit()?;
        if !newer.is_empty() {
            tracing::info!(
                transactions = next_transaction_id - 1 - checkpoint,
                accounts = newer.len(),
                "replayed the transactions after the balance checkpoint"
            );
        }
        self.data_version = data_version(&self.conn)?;
        Ok(state)
    }

    fn changed_outside(&mut self) -> Result<bool, StoreError> {
        Ok(data_version(&self.conn)? != self.data_version)
    }

    fn idempotent_answers(&mut self, ids: &[i64]) -> Result<Vec<Option<StoredKey>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One read transaction for the whole batch's keys, instead of one per lookup.
        let tx = self.conn.transaction()?;
        let mut found = Vec::with_capacity(ids.len());
        {
            let mut stmt = tx.prepare_cached(SELECT_IDEMPOTENCY)?;
            for id in ids {
                let record = stmt
                    .query_row([id], |row| {
                        Ok(StoredKey {
                            scope: row.get(0)?,
                            key: row.get(1)?,
                            answer: StoredAnswer {
                                fingerprint: row.get(2)?,
                                status: row.get(3)?,
                                body: row.get(4)?,
                            },
                        })
                    })
                    .optional()?;
                found.push(record);
            }
        }
        tx.commit()?;
        Ok(found)
    }

    fn hold_statuses(&mut self, ids: &[i64]) -> Result<Vec<Option<HoldStatus>>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut found = Vec::with_capacity(ids.len());
        {
            let mut stmt = tx.prepare_cached(SELECT_HOLD_STATUS)?;
            for id in ids {
                let status: Option<String> = stmt.query_row([id], |row| row.get(0)).optional()?;
                found.push(status.as_deref().and_then(HoldStatus::parse));
            }
        }
        tx.commit()?;
        Ok(found)
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        // A batch is only ever committed as durable as configured.
        self.restore_sync()?;
        let tx = self.begin_write()?;
        write_batch(&tx, batch)?;
        finish(tx)
    }

    fn write_back(
        &mut self,
        accounts: &[(Account, AccountState)],
        checkpoint: Option<i64>,
    ) -> Result<(), StoreError> {
        // A chunk that does not move the checkpoint need not reach the disk at its commit: if the
        // power fails before a later commit's fsync carries it there, its rows are simply behind
        // again and the replay covers them. The WAL keeps commits in order, so the chunk that
        // moves the checkpoint (fsynced, with durability full) makes every chunk before it durable
        // too. This spares an fsync per chunk, which at ten million accounts was most of a chunk.
        let relaxed = checkpoint.is_none() && self.durability == Durability::Full;
        if relaxed {
            self.conn.pragma_update(None, "synchronous", "NORMAL")?;
            self.sync_relaxed = true;
        }
        let written = self.write_rows(accounts, checkpoint);
        self.restore_sync()?;
        written
    }

    fn prune_idempotency(&mut self, before_unix_ms: i64, rows_max: u32) -> Result<Vec<KeyName>, StoreError> {
        let tx = self.begin_write()?;
        let pruned = {
            let mut stmt = tx.prepare_cached(PRUNE_IDEMPOTENCY)?;
            let rows = stmt.query_map(params![before_unix_ms, rows_max], |row| {
                Ok(KeyName {
                    id: row.get(0)?,
                    scope: row.get(1)?,
                    key: row.get(2)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        };
        finish(tx)?;
        Ok(pruned)
    }
}

impl SqliteStore {
    /// Starts a write transaction, refused with `Conflict` if another connection committed since
    /// our last commit. Under the write lock nobody else can commit, so this is the moment to ask
    /// whether anyone did (a sqlite3 shell, say): what we are about to write was decided on state
    /// that may be stale, so nothing is written and the ledger re-reads first.
    fn begin_write(&mut self) -> Result<rusqlite::Transaction<'_>, StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version = data_version(&tx)?;
        if version != self.data_version {
            self.data_version = version;
            return Err(StoreError::Conflict(
                "the database was changed by another writer since the last commit".into(),
            ));
        }
        keys::apply_touches(&tx, &self.key_touches)?;
        Ok(tx)
    }

    /// Back to `synchronous = FULL` after a relaxed write-back chunk; until that succeeds, no batch
    /// commits.
    fn restore_sync(&mut self) -> Result<(), StoreError> {
        if self.sync_relaxed {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
            self.sync_relaxed = false;
        }
        Ok(())
    }

    fn write_rows(
        &mut self,
        accounts: &[(Account, AccountState)],
        checkpoint: Option<i64>,
    ) -> Result<(), StoreError> {
        let tx = self.begin_write()?;
        {
            let mut update = tx.prepare_cached(UPDATE_ACCOUNT)?;
            for (account, state) in accounts {
                // An account deleted by hand has no row to update; verify reports its legs.
                update.execute(params![account.name(), state.balance, state.last_transaction_id])?;
            }
        }
        if let Some(through) = checkpoint {
            tx.prepare_cached(UPDATE_CHECKPOINT)?.execute([through])?;
        }
        finish(tx)
    }

    /// Where the server's API key use times go to be written by this connection.
    pub fn key_touches(&self) -> keys::KeyTouches {
        std::sync::Arc::clone(&self.key_touches)
    }
}

/// A row of `holds` selected as [`HOLD_COLUMNS`].
pub(super) fn hold_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Hold> {
    let card = |at: usize| -> rusqlite::Result<Option<CardNumber>> {
        let text: Option<String> = row.get(at)?;
        text.map(|text| {
            CardNumber::parse(&text).map_err(|error| {
                rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Text, Box::new(error))
            })
        })
        .transpose()
    };
    let status: String = row.get(4)?;
    let reference: Option<String> = row.get(7)?;
    Ok(Hold {
        id: row.get(0)?,
        card: card(1)?.ok_or(rusqlite::Error::InvalidColumnType(
            1,
            "card_number".into(),
            rusqlite::types::Type::Null,
        ))?,
        destination: card(2)?,
        amount: row.get(3)?,
        status: HoldStatus::parse(&status).ok_or_else(|| {
            rusqlite::Error::InvalidColumnType(4, "status".into(), rusqlite::types::Type::Text)
        })?,
        captured_amount: row.get(5)?,
        transaction_id: row.get(6)?,
        reference: reference.and_then(|text| Reference::new(text).ok()),
        created_at_ms: row.get(8)?,
        expires_at_ms: row.get(9)?,
        resolved_at_ms: row.get(10)?,
    })
}

fn finish(tx: rusqlite::Transaction<'_>) -> Result<(), StoreError> {
    tx.commit().map_err(|error| match error.sqlite_error_code() {
        // The frames may be in the WAL even though making them durable failed.
        Some(ErrorCode::SystemIoFailure) => StoreError::OutcomeUnknown(error.to_string()),
        _ => error.into(),
    })
}

/// Rows of `transactions` one statement inserts, when a batch has that many left. Each execution
/// of an insert builds an ephemeral table for the `kind IN (...)` CHECK and pays a step, a reset
/// and a cursor open; with 64 rows a statement, a bulk request of 8,190 transfers paid them 128
/// times instead of 8,190 (perf: 17 % of the worker's time went to the ephemeral tables alone).
/// 64 × 14 parameters stay far below SQLite's limit of 32,766.
const INSERT_TRANSACTION_ROWS: usize = 64;

/// The multi-row form of [`INSERT_TRANSACTION`], for [`INSERT_TRANSACTION_ROWS`] rows.
fn insert_transactions_sql() -> &'static str {
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let (head, one) = INSERT_TRANSACTION
            .split_once("VALUES ")
            .expect("INSERT_TRANSACTION has a VALUES clause");
        let rows: Vec<String> = (0..INSERT_TRANSACTION_ROWS)
            .map(|row| {
                let params: Vec<String> = (1..=14).map(|n| format!("?{}", row * 14 + n)).collect();
                format!("({})", params.join(", "))
            })
            .collect();
        debug_assert_eq!(one.matches('?').count(), 14);
        format!("{head}VALUES {}", rows.join(", "))
    })
}

/// Appends the batch's transactions: full groups of [`INSERT_TRANSACTION_ROWS`] with the
/// multi-row statement, the rest one at a time.
fn insert_transactions(
    tx: &rusqlite::Transaction<'_>,
    records: &[TransactionRecord],
    at: i64,
) -> rusqlite::Result<()> {
    let mut groups = records.chunks_exact(INSERT_TRANSACTION_ROWS);
    if groups.len() > 0 {
        let mut insert = tx.prepare_cached(insert_transactions_sql())?;
        for group in &mut groups {
            for (row, record) in group.iter().enumerate() {
                bind_transaction(&mut insert, row * 14, record, at)?;
            }
            insert.raw_execute()?;
        }
    }
    let rest = groups.remainder();
    if !rest.is_empty() {
        let mut insert = tx.prepare_cached(INSERT_TRANSACTION)?;
        for record in rest {
            bind_transaction(&mut insert, 0, record, at)?;
            insert.raw_execute()?;
        }
    }
    Ok(())
}

/// Binds one transaction's 14 columns from parameter `offset + 1` on, in [`INSERT_TRANSACTION`]'s order.
fn bind_transaction(
    insert: &mut rusqlite::CachedStatement<'_>,
    offset: usize,
    record: &TransactionRecord,
    at: i64,
) -> rusqlite::Result<()> {
    let [source, destination] = &record.legs;
    let values: [&dyn rusqlite::ToSql; 14] = [
        &record.id,
        &record.kind.as_str(),
        &record.amount,
        &source.account.name(),
        &source.amount,
        &source.balance_after,
        &source.previous_id,
        &destination.account.name(),
        &destination.amount,
        &destination.balance_after,
        &destination.previous_id,
        &record.reference.as_ref().map(|r| r.as_str()),
        &record.idempotency_key.as_ref().map(|k| k.as_str()),
        &at,
    ];
    for (n, value) in values.into_iter().enumerate() {
        insert.raw_bind_parameter(offset + n + 1, value)?;
    }
    Ok(())
}

fn write_batch(tx: &rusqlite::Transaction<'_>, batch: &Batch) -> rusqlite::Result<()> {
    let at = batch.at_unix_ms;
    {
        let mut insert = tx.prepare_cached(INSERT_ACCOUNT)?;
        for account in &batch.accounts {
            insert.execute(params![account.card.as_str(), at])?;
        }
    }
    insert_transactions(tx, &batch.transactions, at)?;
    if !batch.holds.is_empty() {
        let mut upsert = tx.prepare_cached(UPSERT_HOLD)?;
        for hold in &batch.holds {
            upsert.execute(params![
                hold.id,
                hold.card.as_str(),
                hold.destination.as_ref().map(CardNumber::as_str),
                hold.amount,
                hold.status.as_str(),
                hold.captured_amount,
                hold.transaction_id,
                hold.reference.as_ref().map(|r| r.as_str()),
                hold.created_at_ms,
                hold.expires_at_ms,
                hold.resolved_at_ms,
            ])?;
        }
    }
    if !batch.credit.is_empty() {
        let mut upsert = tx.prepare_cached(UPSERT_CREDIT)?;
        for row in &batch.credit {
            upsert.execute(params![
                row.card.as_str(),
                row.credit.overdraft_limit,
                row.credit.held
            ])?;
        }
    }
    let mut insert = tx.prepare_cached(INSERT_IDEMPOTENCY)?;
    for record in &batch.idempotency {
        insert.execute(params![
            record.id,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(names: &[&str]) -> Vec<PackedAccount> {
        names
            .iter()
            .map(|name| PackedAccount::new(CardKey::from_digits(name).unwrap(), AccountState::default()))
            .collect()
    }

    #[test]
    fn the_two_scans_join_into_every_card_once_in_key_order() {
        // Name order with mixed lengths: '1000000' (7 digits) sorts before '200000' (6) by name
        // and after it by key; the scans overlap on '200000' and '2000000'.
        let low = packed(&["100000", "1000000", "200000", "2000000"]);
        let high = packed(&["200000", "2000000", "300000", "999999"]);
        let mut expected = packed(&["100000", "1000000", "200000", "2000000", "300000", "999999"]);
        expected.sort_unstable_by_key(|card| card.key);
        assert_eq!(join_scans(low, high), expected);
        // One length: already in key order, nothing sorted.
        let low = packed(&["4000000000000001", "4000000000000002", "4000000000000003"]);
        let high = packed(&["4000000000000003", "4000000000000004"]);
        assert_eq!(join_scans(low, high).len(), 4);
        assert_eq!(join_scans(packed(&["123456"]), Vec::new()), packed(&["123456"]));
    }
}
