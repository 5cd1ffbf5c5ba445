//! The read side on PostgreSQL: a pool of its own (on the primary, or on a replica with
//! `--read-db`), each method one statement or one read-only transaction. The [`Reader`] trait is
//! blocking (the HTTP layer calls it from `spawn_blocking`), so each method blocks on the async
//! client through the server runtime's handle.
//!
//! An account's current state comes from its row, which is always current here (the database
//! decides); the head a caller passes is ignored in favour of the row's, which is never older.

use deadpool_postgres::Pool;
use tokio::runtime::Handle;
use tokio_postgres::Row;

use super::rows::{self, HOLD_COLUMNS};
use super::store_error;
use crate::domain::{CardNumber, IdempotencyKey, Kind};
use crate::store::{
    AccountState, Credit, EntriesPage, EntryView, Hold, HoldStatus, HoldsPage, LegView, Reader, StoreError,
    TransactionView,
};

const SELECT_TRANSACTION: &str = "SELECT id, kind, amount, source, source_amount, source_balance_after, \
     destination, destination_amount, destination_balance_after, reference, idempotency_key, created_at_ms \
     FROM transactions WHERE id = $1";

/// The read connections.
pub struct PgReader {
    pool: Pool,
    /// The server's runtime, which the pool's connections run on.
    runtime: Handle,
}

impl PgReader {
    pub fn new(pool: Pool, runtime: Handle) -> Self {
        Self { pool, runtime }
    }

    /// An account's overdraft limit and held amount (zero without a row of terms). Callable from
    /// async code on the server's runtime: it blocks in place.
    pub fn credit(&self, card: &CardNumber) -> Result<Credit, StoreError> {
        let rows = tokio::task::block_in_place(|| {
            self.query(
                "SELECT overdraft_limit, held FROM account_credit WHERE name = $1",
                &[&card.as_str()],
            )
        })?;
        Ok(rows.first().map_or_else(Credit::default, |row| Credit {
            overdraft_limit: row.get(0),
            held: row.get(1),
        }))
    }

    fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        self.runtime.block_on(async {
            let client = self.pool.get().await?;
            let statement = client.prepare_cached(sql).await.map_err(|e| store_error(&e))?;
            client
                .query(&statement, params)
                .await
                .map_err(|e| store_error(&e))
        })
    }
}

fn kind_of(text: &str) -> &'static str {
    Kind::parse(text).map_or("unknown", Kind::as_str)
}

fn transaction_view(row: &Row) -> TransactionView {
    let leg = |at: usize| LegView {
        card_number: row.get(at),
        amount: row.get(at + 1),
        balance_after: row.get(at + 2),
    };
    TransactionView {
        id: row.get(0),
        kind: kind_of(row.get(1)),
        amount: row.get(2),
        legs: vec![leg(3), leg(6)],
        reference: row.get(9),
        idempotency_key: row.get(10),
        created_at_ms: row.get(11),
    }
}

impl Reader for PgReader {
    fn balance_at(&self, card: &CardNumber, _head: Option<i64>, at: i64) -> Result<Option<i64>, StoreError> {
        // The last leg committed at or before `at`; before any, the opening balance. Ids and
        // times increase together along an account's history, so the newest leg by id at or
        // before `at` is the one.
        let rows = self.query(
            "SELECT coalesce((SELECT balance_after FROM entries WHERE account = a.name AND created_at_ms <= $2 \
             ORDER BY transaction_id DESC LIMIT 1), a.opening_balance) FROM ledger_accounts a WHERE a.name = $1",
            &[&card.as_str(), &at],
        )?;
        Ok(rows.first().map(|row| row.get(0)))
    }

    fn current(&self, card: &CardNumber) -> Result<Option<AccountState>, StoreError> {
        let rows = self.query(
            "SELECT balance, last_transaction_id FROM ledger_accounts WHERE name = $1",
            &[&card.as_str()],
        )?;
        Ok(rows.first().map(|row| AccountState {
            balance: row.get(0),
            last_transaction_id: row.get(1),
        }))
    }

    fn opened_at(&self, card: &CardNumber) -> Result<Option<i64>, StoreError> {
        let rows = self.query(
            "SELECT created_at_ms FROM ledger_accounts WHERE name = $1",
            &[&card.as_str()],
        )?;
        Ok(rows.first().map(|row| row.get(0)))
    }

    fn transaction(&self, id: i64) -> Result<Option<TransactionView>, StoreError> {
        Ok(self
            .query(SELECT_TRANSACTION, &[&id])?
            .first()
            .map(transaction_view))
    }

    fn transaction_by_key(
        &self,
        key: &IdempotencyKey,
        records: &[(String, i64)],
    ) -> Result<Option<TransactionView>, StoreError> {
        // The engine keeps no index of keys with PostgreSQL: the scopes are what it passes, and
        // the key is looked up by name in each of them.
        let scopes: Vec<&str> = records.iter().map(|(scope, _)| scope.as_str()).collect();
        let rows = self.query(
            "SELECT transaction_id FROM idempotency_keys WHERE scope = ANY($1) AND idempotency_key = $2 \
             AND transaction_id IS NOT NULL ORDER BY id DESC LIMIT 1",
            &[&scopes, &key.as_str()],
        )?;
        match rows.first() {
            Some(row) => self.transaction(row.get(0)),
            None => Ok(None),
        }
    }

    fn entries(
        &self,
        card: &CardNumber,
        _head: Option<i64>,
        limit: u32,
        starting_after: Option<i64>,
    ) -> Result<Option<EntriesPage>, StoreError> {
        if self.opened_at(card)?.is_none() {
            return Ok(None);
        }
        let account = card.as_str();
        let rows = self.query(
            "SELECT e.transaction_id, t.kind, e.amount, e.balance_after, \
             CASE WHEN t.source = $1 THEN t.destination ELSE t.source END, t.created_at_ms \
             FROM (SELECT id AS transaction_id, source_amount AS amount, source_balance_after AS balance_after \
                   FROM transactions WHERE source = $1 AND id < $2 ORDER BY id DESC LIMIT $3) e \
             JOIN transactions t ON t.id = e.transaction_id \
             UNION ALL \
             SELECT e.transaction_id, t.kind, e.amount, e.balance_after, t.source, t.created_at_ms \
             FROM (SELECT id AS transaction_id, destination_amount AS amount, destination_balance_after AS balance_after \
                   FROM transactions WHERE destination = $1 AND id < $2 ORDER BY id DESC LIMIT $3) e \
             JOIN transactions t ON t.id = e.transaction_id \
             ORDER BY 1 DESC LIMIT $3",
            &[&account, &starting_after.unwrap_or(i64::MAX), &(i64::from(limit) + 1)],
        )?;
        let mut data: Vec<EntryView> = rows
            .iter()
            .map(|row| EntryView {
                id: row.get(0),
                kind: kind_of(row.get(1)),
                amount: row.get(2),
                balance_after: row.get(3),
                counterparty: row.get(4),
                created_at_ms: row.get(5),
            })
            .collect();
        let has_more = data.len() > limit as usize;
        data.truncate(limit as usize);
        Ok(Some(EntriesPage { data, has_more }))
    }

    fn hold(&self, id: i64) -> Result<Option<Hold>, StoreError> {
        self.query(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = $1"), &[&id])?
            .first()
            .map(rows::hold)
            .transpose()
    }

    fn holds(
        &self,
        card: &CardNumber,
        status: Option<HoldStatus>,
        limit: u32,
        starting_after: Option<i64>,
    ) -> Result<HoldsPage, StoreError> {
        let rows = self.query(
            &format!(
                "SELECT {HOLD_COLUMNS} FROM holds WHERE card_number = $1 AND id < $2 \
                 AND ($3::text IS NULL OR status = $3) ORDER BY id DESC LIMIT $4"
            ),
            &[
                &card.as_str(),
                &starting_after.unwrap_or(i64::MAX),
                &status.map(HoldStatus::as_str),
                &(i64::from(limit) + 1),
            ],
        )?;
        let mut data = rows.iter().map(rows::hold).collect::<Result<Vec<_>, _>>()?;
        let has_more = data.len() > limit as usize;
        data.truncate(limit as usize);
        Ok(HoldsPage { data, has_more })
    }
}
