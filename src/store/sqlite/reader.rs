//! The read side: a pool of read-only connections. Each method reads inside one transaction, so it
//! answers from one snapshot of the WAL even while batches commit.

use std::path::Path;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{hold_from_row, HOLD_COLUMNS};
use crate::config::limits;
use crate::domain::{CardNumber, IdempotencyKey, Kind};
use crate::store::{
    AccountState, EntriesPage, EntryView, Hold, HoldStatus, HoldsPage, LegView, Reader, StoreError,
    TransactionView,
};

/// What never changes of an account: its opening balance and when it was opened. (Its balance and
/// head are the engine's: the row may lag behind them.)
const SELECT_ACCOUNT: &str = "SELECT opening_balance, created_at_ms FROM ledger_accounts WHERE name = ?1";
/// An account's current state as the database has it (reads the journal after the checkpoint).
const SELECT_CURRENT: &str = "SELECT balance, last_transaction_id FROM current_accounts WHERE name = ?1";
const SELECT_TRANSACTION: &str = "SELECT kind, amount, source, source_amount, source_balance_after, \
     source_previous_id, destination, destination_amount, destination_balance_after, destination_previous_id, \
     reference, idempotency_key, created_at_ms FROM transactions WHERE id = ?1";
const SELECT_KEY_RECORD: &str =
    "SELECT scope, idempotency_key, transaction_id FROM idempotency_keys WHERE id = ?1";

/// One transaction as stored.
struct Row {
    kind: String,
    amount: i64,
    legs: [StoredLeg; 2],
    reference: Option<String>,
    idempotency_key: Option<String>,
    created_at_ms: i64,
}

struct StoredLeg {
    account: String,
    amount: i64,
    balance_after: i64,
    previous_id: Option<i64>,
}

impl Row {
    /// The leg of `account`, and the other leg's account.
    fn side(&self, account: &str) -> Option<(&StoredLeg, &str)> {
        let [source, destination] = &self.legs;
        if source.account == account {
            Some((source, &destination.account))
        } else if destination.account == account {
            Some((destination, &source.account))
        } else {
            None
        }
    }
}

/// A pool of read-only connections.
pub struct SqliteReader {
    pool: r2d2::Pool<SqliteConnectionManager>,
}

impl From<r2d2::Error> for StoreError {
    fn from(error: r2d2::Error) -> Self {
        StoreError::Retryable(format!("no read connection: {error}"))
    }
}

impl SqliteReader {
    /// Open after [`super::SqliteStore::open`], which creates the database and its WAL.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let manager = SqliteConnectionManager::file(path)
            .with_flags(flags)
            .with_init(|conn| conn.busy_timeout(limits::SQLITE_READ_BUSY_TIMEOUT));
        let pool = r2d2::Pool::builder()
            .max_size(limits::READ_POOL_SIZE)
            .connection_timeout(limits::READ_POOL_WAIT)
            .build(manager)?;
        Ok(Self { pool })
    }

    /// Runs `read` inside one read transaction (one snapshot).
    fn snapshot<T>(&self, read: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let mut conn = self.pool.get()?;
        let tx = conn.transaction()?;
        let value = read(&tx)?;
        tx.finish()?;
        Ok(value)
    }
}

fn kind_of(text: &str) -> &'static str {
    Kind::parse(text).map_or("unknown", Kind::as_str)
}

fn read_row(conn: &Connection, id: i64) -> rusqlite::Result<Option<Row>> {
    conn.prepare_cached(SELECT_TRANSACTION)?
        .query_row([id], |row| {
            let leg = |at: usize| -> rusqlite::Result<StoredLeg> {
                Ok(StoredLeg {
                    account: row.get(at)?,
                    amount: row.get(at + 1)?,
                    balance_after: row.get(at + 2)?,
                    previous_id: row.get(at + 3)?,
                })
            };
            Ok(Row {
                kind: row.get(0)?,
                amount: row.get(1)?,
                legs: [leg(2)?, leg(6)?],
                reference: row.get(10)?,
                idempotency_key: row.get(11)?,
                created_at_ms: row.get(12)?,
            })
        })
        .optional()
}

fn read_transaction(conn: &Connection, id: i64) -> rusqlite::Result<Option<TransactionView>> {
    Ok(read_row(conn, id)?.map(|row| TransactionView {
        id,
        kind: kind_of(&row.kind),
        amount: row.amount,
        legs: row
            .legs
            .iter()
            .map(|leg| LegView {
                card_number: leg.account.clone(),
                amount: leg.amount,
                balance_after: leg.balance_after,
            })
            .collect(),
        reference: row.reference,
        idempotency_key: row.idempotency_key,
        created_at_ms: row.created_at_ms,
    }))
}

/// What a statement needs of an account besides its head.
struct Opened {
    opening_balance: i64,
    created_at_ms: i64,
}

fn read_opened(conn: &Connection, card: &CardNumber) -> rusqlite::Result<Option<Opened>> {
    conn.prepare_cached(SELECT_ACCOUNT)?
        .query_row([card.as_str()], |row| {
            Ok(Opened {
                opening_balance: row.get(0)?,
                created_at_ms: row.get(1)?,
            })
        })
        .optional()
}

/// Walks `account`'s chain from transaction `next` towards older ones, calling `visit` with each of
/// its transactions until it says stop. A link to a transaction that does not name the account, or
/// that does not point to an older one (only possible in a database edited by hand), ends the walk,
/// so a broken chain can never loop.
fn walk(
    conn: &Connection,
    account: &str,
    mut next: Option<i64>,
    mut visit: impl FnMut(i64, &Row) -> bool,
) -> rusqlite::Result<()> {
    while let Some(id) = next {
        let Some(row) = read_row(conn, id)? else { break };
        let Some((leg, _)) = row.side(account) else { break };
        next = leg.previous_id.filter(|previous| *previous < id);
        if !visit(id, &row) {
            break;
        }
    }
    Ok(())
}

impl Reader for SqliteReader {
    fn balance_at(&self, card: &CardNumber, head: Option<i64>, at: i64) -> Result<Option<i64>, StoreError> {
        self.snapshot(|conn| {
            let Some(opened) = read_opened(conn, card)? else {
                return Ok(None);
            };
            // The last leg committed at or before `at`; before any, the opening balance.
            let mut balance = opened.opening_balance;
            walk(conn, card.as_str(), head, |_, row| {
                if row.created_at_ms <= at {
                    balance = row
                        .side(card.as_str())
                        .map_or(balance, |(leg, _)| leg.balance_after);
                    return false;
                }
                true
            })?;
            Ok(Some(balance))
        })
    }

    fn current(&self, card: &CardNumber) -> Result<Option<AccountState>, StoreError> {
        self.snapshot(|conn| {
            // The row first: the view reads the journal's tail, which a card that does not exist
            // should not cost.
            if read_opened(conn, card)?.is_none() {
                return Ok(None);
            }
            conn.prepare_cached(SELECT_CURRENT)?
                .query_row([card.as_str()], |row| {
                    Ok(AccountState {
                        balance: row.get(0)?,
                        last_transaction_id: row.get(1)?,
                    })
                })
                .optional()
        })
    }

    fn opened_at(&self, card: &CardNumber) -> Result<Option<i64>, StoreError> {
        self.snapshot(|conn| Ok(read_opened(conn, card)?.map(|opened| opened.created_at_ms)))
    }

    fn transaction(&self, id: i64) -> Result<Option<TransactionView>, StoreError> {
        self.snapshot(|conn| read_transaction(conn, id))
    }

    fn transaction_by_key(
        &self,
        key: &IdempotencyKey,
        records: &[(String, i64)],
    ) -> Result<Option<TransactionView>, StoreError> {
        self.snapshot(|conn| {
            let mut newest: Option<(i64, i64)> = None;
            for (scope, record) in records {
                let found: Option<(String, String, Option<i64>)> = conn
                    .prepare_cached(SELECT_KEY_RECORD)?
                    .query_row([record], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                    .optional()?;
                if let Some((stored_scope, name, Some(transaction))) = found {
                    let same = stored_scope == *scope && name == key.as_str();
                    if same && newest.is_none_or(|(at, _)| *record > at) {
                        newest = Some((*record, transaction));
                    }
                }
            }
            match newest {
                Some((_, id)) => read_transaction(conn, id),
                None => Ok(None),
            }
        })
    }

    fn entries(
        &self,
        card: &CardNumber,
        head: Option<i64>,
        limit: u32,
        starting_after: Option<i64>,
    ) -> Result<Option<EntriesPage>, StoreError> {
        let account = card.as_str();
        self.snapshot(|conn| {
            if read_opened(conn, card)?.is_none() {
                return Ok(None);
            }
            // Where the page starts: right after the cursor when it is one of this account's
            // transactions (one lookup), else after the newest one older than it (a walk).
            let mut start = head;
            if let Some(cursor) = starting_after {
                match read_row(conn, cursor)?.as_ref().and_then(|row| row.side(account)) {
                    Some((leg, _)) => start = leg.previous_id,
                    None => {
                        let mut first_older = None;
                        walk(conn, account, head, |id, _| {
                            if id < cursor {
                                first_older = Some(id);
                                return false;
                            }
                            true
                        })?;
                        start = first_older;
                    }
                }
            }
            let wanted = limit as usize + 1; // one more than asked, to know whether there is a next page
            let mut data = Vec::with_capacity(wanted);
            walk(conn, account, start, |id, row| {
                if let Some((leg, counterparty)) = row.side(account) {
                    data.push(EntryView {
                        id,
                        kind: kind_of(&row.kind),
                        amount: leg.amount,
                        balance_after: leg.balance_after,
                        counterparty: counterparty.to_owned(),
                        created_at_ms: row.created_at_ms,
                    });
                }
                data.len() < wanted
            })?;
            let has_more = data.len() > limit as usize;
            data.truncate(limit as usize);
            Ok(Some(EntriesPage { data, has_more }))
        })
    }

    fn hold(&self, id: i64) -> Result<Option<Hold>, StoreError> {
        self.snapshot(|conn| {
            conn.prepare_cached(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = ?1"))?
                .query_row([id], hold_from_row)
                .optional()
        })
    }

    fn holds(
        &self,
        card: &CardNumber,
        status: Option<HoldStatus>,
        limit: u32,
        starting_after: Option<i64>,
    ) -> Result<HoldsPage, StoreError> {
        self.snapshot(|conn| {
            // The index (card_number, id) walks the card's holds newest first; a status filter
            // reads past the others, which a card has few of.
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {HOLD_COLUMNS} FROM holds WHERE card_number = ?1 AND id < ?2 \
                 AND (?3 IS NULL OR status = ?3) ORDER BY id DESC LIMIT ?4"
            ))?;
            let rows = stmt.query_map(
                rusqlite::params![
                    card.as_str(),
                    starting_after.unwrap_or(i64::MAX),
                    status.map(HoldStatus::as_str),
                    i64::from(limit) + 1
                ],
                hold_from_row,
            )?;
            let mut data = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            let has_more = data.len() > limit as usize;
            data.truncate(limit as usize);
            Ok(HoldsPage { data, has_more })
        })
    }
}
