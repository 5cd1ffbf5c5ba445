//! The read side: a pool of read-only connections. Each method reads inside one transaction, so it
//! answers from one snapshot of the WAL even while batches commit.

use std::path::Path;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::config::limits;
use crate::domain::{CardNumber, IdempotencyKey, Kind};
use crate::store::{AccountView, EntriesPage, EntryView, LegView, Reader, StoreError, TransactionView};

/// A card's balance now, and when its account was opened.
const SELECT_ACCOUNT: &str =
    "SELECT balance, created_at_ms, opening_balance, last_transaction_id FROM ledger_accounts WHERE name = ?1";
const SELECT_TRANSACTION: &str = "SELECT kind, amount, source, source_amount, source_balance_after, \
     source_previous_id, destination, destination_amount, destination_balance_after, destination_previous_id, \
     reference, idempotency_key, created_at_ms FROM transactions WHERE id = ?1";
/// Keys are scoped per route (and per API key: `?2` is its name, or "" without keys); a lookup by
/// key alone searches the routes that move money.
const SELECT_TRANSACTION_BY_KEY: &str = "SELECT transaction_id FROM idempotency_keys \
     WHERE scope IN (?2 || '/transaction', ?2 || '/transfers') AND idempotency_key = ?1 \
     AND transaction_id IS NOT NULL \
     ORDER BY created_at_ms DESC LIMIT 1";

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

/// What a statement needs of an account: its opening balance and the head of its chain.
struct Head {
    balance: i64,
    created_at_ms: i64,
    opening_balance: i64,
    last_transaction_id: Option<i64>,
}

fn read_head(conn: &Connection, card: &CardNumber) -> rusqlite::Result<Option<Head>> {
    conn.prepare_cached(SELECT_ACCOUNT)?
        .query_row([card.as_str()], |row| {
            Ok(Head {
                balance: row.get(0)?,
                created_at_ms: row.get(1)?,
                opening_balance: row.get(2)?,
                last_transaction_id: row.get(3)?,
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
    fn balance(&self, card: &CardNumber, at_unix_ms: Option<i64>) -> Result<Option<i64>, StoreError> {
        self.snapshot(|conn| {
            let Some(head) = read_head(conn, card)? else {
                return Ok(None);
            };
            let Some(at) = at_unix_ms else {
                return Ok(Some(head.balance));
            };
            // The last leg committed at or before `at`; before any, the opening balance.
            let mut balance = head.opening_balance;
            walk(conn, card.as_str(), head.last_transaction_id, |_, row| {
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

    fn account(&self, card: &CardNumber) -> Result<Option<AccountView>, StoreError> {
        self.snapshot(|conn| {
            Ok(read_head(conn, card)?.map(|head| AccountView {
                card_number: card.as_str().to_owned(),
                balance: head.balance,
                available: head.balance,
                created_at_ms: head.created_at_ms,
            }))
        })
    }

    fn transaction(&self, id: i64) -> Result<Option<TransactionView>, StoreError> {
        self.snapshot(|conn| read_transaction(conn, id))
    }

    fn transaction_by_key(
        &self,
        scope_prefix: &str,
        key: &IdempotencyKey,
    ) -> Result<Option<TransactionView>, StoreError> {
        self.snapshot(|conn| {
            let id: Option<i64> = conn
                .prepare_cached(SELECT_TRANSACTION_BY_KEY)?
                .query_row([key.as_str(), scope_prefix], |row| row.get(0))
                .optional()?;
            match id {
                Some(id) => read_transaction(conn, id),
                None => Ok(None),
            }
        })
    }

    fn entries(
        &self,
        card: &CardNumber,
        limit: u32,
        starting_after: Option<i64>,
    ) -> Result<Option<EntriesPage>, StoreError> {
        let account = card.as_str();
        self.snapshot(|conn| {
            let Some(head) = read_head(conn, card)? else {
                return Ok(None);
            };
            // Where the page starts: right after the cursor when it is one of this account's
            // transactions (one lookup), else after the newest one older than it (a walk).
            let mut start = head.last_transaction_id;
            if let Some(cursor) = starting_after {
                match read_row(conn, cursor)?.as_ref().and_then(|row| row.side(account)) {
                    Some((leg, _)) => start = leg.previous_id,
                    None => {
                        let mut first_older = None;
                        walk(conn, account, head.last_transaction_id, |id, _| {
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
}
