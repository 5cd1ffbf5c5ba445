//! The read side: a pool of read-only connections. Each method reads inside one transaction, so it
//! answers from one snapshot of the WAL even while batches commit.

use std::path::Path;

use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::config::limits;
use crate::domain::{CardNumber, IdempotencyKey, Kind};
use crate::store::{AccountView, EntriesPage, EntryView, LegView, Reader, StoreError, TransactionView};

/// A card's balance now: its last entry's, or its opening balance before any.
const SELECT_BALANCE: &str = "SELECT coalesce((SELECT e.balance_after FROM entries e \
     WHERE e.account = a.name ORDER BY e.transaction_id DESC LIMIT 1), a.opening_balance), a.created_at_ms \
     FROM ledger_accounts a WHERE a.name = ?1";
/// A card's balance as of a moment: its last entry committed at or before it.
const SELECT_BALANCE_AT: &str = "SELECT coalesce((SELECT e.balance_after FROM entries e \
     JOIN transactions t ON t.id = e.transaction_id \
     WHERE e.account = a.name AND t.created_at_ms <= ?2 ORDER BY e.transaction_id DESC LIMIT 1), \
     a.opening_balance) FROM ledger_accounts a WHERE a.name = ?1";
const SELECT_TRANSACTION: &str = "SELECT kind, source, destination, amount, reference, idempotency_key, \
     created_at_ms FROM transactions WHERE id = ?1";
const SELECT_LEG: &str =
    "SELECT amount, balance_after FROM entries WHERE account = ?1 AND transaction_id = ?2";
/// Keys are scoped per route; a lookup by key alone searches the routes that move money.
const SELECT_TRANSACTION_BY_KEY: &str = "SELECT transaction_id FROM idempotency_keys \
     WHERE scope IN ('/transaction', '/transfers') AND idempotency_key = ?1 AND transaction_id IS NOT NULL \
     ORDER BY created_at_ms DESC LIMIT 1";
const SELECT_ENTRIES: &str = "SELECT e.transaction_id, t.kind, e.amount, e.balance_after, t.source, \
     t.destination, t.created_at_ms FROM entries e JOIN transactions t ON t.id = e.transaction_id \
     WHERE e.account = ?1 AND e.transaction_id < ?2 ORDER BY e.transaction_id DESC LIMIT ?3";

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

fn read_transaction(conn: &Connection, id: i64) -> rusqlite::Result<Option<TransactionView>> {
    let mut stmt = conn.prepare_cached(SELECT_TRANSACTION)?;
    let row = stmt
        .query_row([id], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, Option<String>>(4)?,
                row.get::<_, Option<String>>(5)?,
                row.get::<_, i64>(6)?,
            ))
        })
        .optional()?;
    let Some((kind, source, destination, amount, reference, idempotency_key, created_at_ms)) = row else {
        return Ok(None);
    };
    let mut leg = conn.prepare_cached(SELECT_LEG)?;
    let mut legs = Vec::with_capacity(2);
    for account in [source, destination] {
        if let Some((amount, balance_after)) = leg
            .query_row(params![account, id], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?
        {
            legs.push(LegView {
                card_number: account,
                amount,
                balance_after,
            });
        }
    }
    Ok(Some(TransactionView {
        id,
        kind: kind_of(&kind),
        amount,
        reference,
        created_at_ms,
        legs,
        idempotency_key,
    }))
}

impl Reader for SqliteReader {
    fn balance(&self, card: &CardNumber, at_unix_ms: Option<i64>) -> Result<Option<i64>, StoreError> {
        self.snapshot(|conn| match at_unix_ms {
            None => conn
                .prepare_cached(SELECT_BALANCE)?
                .query_row([card.as_str()], |row| row.get(0))
                .optional(),
            Some(at) => conn
                .prepare_cached(SELECT_BALANCE_AT)?
                .query_row(params![card.as_str(), at], |row| row.get(0))
                .optional(),
        })
    }

    fn account(&self, card: &CardNumber) -> Result<Option<AccountView>, StoreError> {
        self.snapshot(|conn| {
            conn.prepare_cached(SELECT_BALANCE)?
                .query_row([card.as_str()], |row| {
                    let balance: i64 = row.get(0)?;
                    Ok(AccountView {
                        card_number: card.as_str().to_owned(),
                        balance,
                        available: balance,
                        created_at_ms: row.get(1)?,
                    })
                })
                .optional()
        })
    }

    fn transaction(&self, id: i64) -> Result<Option<TransactionView>, StoreError> {
        self.snapshot(|conn| read_transaction(conn, id))
    }

    fn transaction_by_key(&self, key: &IdempotencyKey) -> Result<Option<TransactionView>, StoreError> {
        self.snapshot(|conn| {
            let id: Option<i64> = conn
                .prepare_cached(SELECT_TRANSACTION_BY_KEY)?
                .query_row([key.as_str()], |row| row.get(0))
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
        self.snapshot(|conn| {
            let exists = conn
                .prepare_cached(SELECT_BALANCE)?
                .query_row([card.as_str()], |_| Ok(()))
                .optional()?;
            if exists.is_none() {
                return Ok(None);
            }
            let mut stmt = conn.prepare_cached(SELECT_ENTRIES)?;
            // One more than asked, to know whether there is a next page.
            let rows = stmt.query_map(
                params![
                    card.as_str(),
                    starting_after.unwrap_or(i64::MAX),
                    i64::from(limit) + 1
                ],
                |row| {
                    let source: String = row.get(4)?;
                    let destination: String = row.get(5)?;
                    let counterparty = if source == card.as_str() {
                        destination
                    } else {
                        source
                    };
                    Ok(EntryView {
                        id: row.get(0)?,
                        kind: kind_of(&row.get::<_, String>(1)?),
                        amount: row.get(2)?,
                        balance_after: row.get(3)?,
                        counterparty,
                        created_at_ms: row.get(6)?,
                    })
                },
            )?;
            let mut data: Vec<EntryView> = rows.collect::<Result<_, _>>()?;
            let has_more = data.len() > limit as usize;
            data.truncate(limit as usize);
            Ok(Some(EntriesPage { data, has_more }))
        })
    }
}
