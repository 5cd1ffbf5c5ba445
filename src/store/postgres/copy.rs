//! `tallyd migrate --from users.db --to postgres://...`: a whole SQLite ledger copied into a new
//! PostgreSQL database in one transaction, ids kept: the schema is created and every account,
//! transaction, idempotency record, credit term, hold, API key and archive cut copied, then the id
//! blocks start after the largest ids, and it all commits at once or not at all. An archived
//! ledger's old transactions stay in their archive files (SQLite, readable by any tool); what is
//! copied is the ledger that opened at the cut, and the cut itself, so `verify` holds on both.
//!
//! The source is read in one read transaction, so a server may keep running on it; what it commits
//! after the copy started is not copied (stop it first to move a ledger for good). Balances are
//! the journal's (`current_accounts`), not the rows', which may lag behind on SQLite.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::{describe, migrate};
use crate::store::StoreError;

/// Rows per statement: large enough that a million transactions take a hundred statements, small
/// enough that one statement's arrays stay a few megabytes.
const CHUNK_ROWS: usize = 10_000;

/// What was copied.
#[derive(Debug, Default)]
pub struct Copied {
    pub accounts: usize,
    pub transactions: usize,
    pub idempotency_records: usize,
    pub holds: usize,
    pub credit_rows: usize,
    pub api_keys: usize,
    pub archive_cuts: usize,
}

/// Everything read from the source.
#[derive(Default)]
struct Source {
    /// name, opening balance, balance, last transaction, opened at.
    accounts: Vec<(String, i64, i64, Option<i64>, i64)>,
    transactions: Vec<TransactionRow>,
    keys: Vec<KeyRow>,
    credit: Vec<(String, i64, i64)>,
    holds: Vec<HoldRow>,
    /// The API keys (digests only), revoked ones included: their names scope the idempotency
    /// records copied with them.
    api_keys: Vec<crate::store::sqlite::keys::KeyRow>,
    /// The cuts of `tallyd archive` (before id, archive file, transactions, at): the archived
    /// transactions stay in their archive files, and these rows let `verify` accept the first
    /// legs that link into them.
    archive: Vec<(i64, String, i64, i64)>,
}

struct TransactionRow {
    ints: [i64; 2],                             // id, amount
    kind: String,                               //
    legs: [(String, i64, i64, Option<i64>); 2], // account, amount, balance after, previous id
    text: (Option<String>, Option<String>),     // reference, idempotency key
    created_at_ms: i64,
}

struct KeyRow {
    id: i64,
    scope: String,
    key: String,
    fingerprint: String,
    status: i32,
    body: Vec<u8>,
    transaction_id: Option<i64>,
    created_at_ms: i64,
}

struct HoldRow {
    id: i64,
    card: String,
    destination: Option<String>,
    amount: i64,
    status: String,
    captured_amount: Option<i64>,
    transaction_id: Option<i64>,
    reference: Option<String>,
    created_at_ms: i64,
    expires_at_ms: i64,
    resolved_at_ms: Option<i64>,
}

/// What is done with each row of one table.
type Visit<'a> = Box<dyn FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<()> + 'a>;

fn sqlite_error(error: rusqlite::Error) -> StoreError {
    StoreError::Unusable(format!("reading the SQLite ledger: {error}"))
}

fn read_source(from: &Path) -> Result<Source, StoreError> {
    if !from.exists() {
        return Err(StoreError::Unusable(format!("no database at {}", from.display())));
    }
    let mut conn =
        Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sqlite_error)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(sqlite_error)?;
    if version != crate::store::sqlite::SCHEMA_VERSION {
        return Err(StoreError::Unusable(format!(
            "{} has schema version {version}; start `tallyd serve` on it once to upgrade it to version {}, then migrate",
            from.display(),
            crate::store::sqlite::SCHEMA_VERSION
        )));
    }
    let tx = conn.transaction().map_err(sqlite_error)?;
    let mut source = Source::default();
    let rows = |sql: &str, mut each: Visit<'_>| {
        let mut statement = tx.prepare(sql)?;
        let mut result = statement.query([])?;
        while let Some(row) = result.next()? {
            each(row)?;
        }
        Ok::<(), rusqlite::Error>(())
    };
    rows(
        "SELECT name, opening_balance, balance, last_transaction_id, created_at_ms FROM current_accounts ORDER BY name",
        Box::new(|row| {
            source
                .accounts
                .push((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?));
            Ok(())
        }),
    )
    .map_err(sqlite_error)?;
    rows(
        "SELECT id, kind, amount, source, source_amount, source_balance_after, source_previous_id, destination, \
         destination_amount, destination_balance_after, destination_previous_id, reference, idempotency_key, \
         created_at_ms FROM transactions ORDER BY id",
        Box::new(|row| {
            source.transactions.push(TransactionRow {
                ints: [row.get(0)?, row.get(2)?],
                kind: row.get(1)?,
                legs: [
                    (row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?),
                    (row.get(7)?, row.get(8)?, row.get(9)?, row.get(10)?),
                ],
                text: (row.get(11)?, row.get(12)?),
                created_at_ms: row.get(13)?,
            });
            Ok(())
        }),
    )
    .map_err(sqlite_error)?;
    rows(
        "SELECT id, scope, idempotency_key, fingerprint, status, body, transaction_id, created_at_ms \
         FROM idempotency_keys ORDER BY id",
        Box::new(|row| {
            source.keys.push(KeyRow {
                id: row.get(0)?,
                scope: row.get(1)?,
                key: row.get(2)?,
                fingerprint: row.get(3)?,
                status: row.get(4)?,
                body: row.get(5)?,
                transaction_id: row.get(6)?,
                created_at_ms: row.get(7)?,
            });
            Ok(())
        }),
    )
    .map_err(sqlite_error)?;
    rows(
        "SELECT name, overdraft_limit, held FROM account_credit ORDER BY name",
        Box::new(|row| {
            source.credit.push((row.get(0)?, row.get(1)?, row.get(2)?));
            Ok(())
        }),
    )
    .map_err(sqlite_error)?;
    rows(
        "SELECT id, card_number, destination, amount, status, captured_amount, transaction_id, reference, \
         created_at_ms, expires_at_ms, resolved_at_ms FROM holds ORDER BY id",
        Box::new(|row| {
            source.holds.push(HoldRow {
                id: row.get(0)?,
                card: row.get(1)?,
                destination: row.get(2)?,
                amount: row.get(3)?,
                status: row.get(4)?,
                captured_amount: row.get(5)?,
                transaction_id: row.get(6)?,
                reference: row.get(7)?,
                created_at_ms: row.get(8)?,
                expires_at_ms: row.get(9)?,
                resolved_at_ms: row.get(10)?,
            });
            Ok(())
        }),
    )
    .map_err(sqlite_error)?;
    rows(
        "SELECT archived_before_id, archive_file, transactions, archived_at_ms FROM ledger_archive \
         ORDER BY archived_before_id",
        Box::new(|row| {
            source
                .archive
                .push((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?));
            Ok(())
        }),
    )
    .map_err(sqlite_error)?;
    // The table is made when serve or `tallyd keys` first opens a file: a file neither opened
    // since keys exist has none.
    let has_keys: bool = tx
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'api_keys'",
            [],
            |row| row.get(0),
        )
        .map_err(sqlite_error)?;
    if has_keys {
        source.api_keys =
            crate::store::sqlite::keys::all(&tx, crate::config::limits::KEYS_MAX).map_err(sqlite_error)?;
    }
    Ok(source)
}

/// Copies the SQLite ledger at `from` into the new PostgreSQL database `to`, in one transaction.
pub async fn copy(from: &Path, to: &str) -> Result<Copied, StoreError> {
    let source = {
        let from = from.to_owned();
        tokio::task::spawn_blocking(move || read_source(&from))
            .await
            .map_err(|error| StoreError::Unusable(format!("reading the SQLite ledger: {error}")))??
    };
    let failed = |error: tokio_postgres::Error| StoreError::Unusable(describe(&error));
    let (mut client, connection) = super::connect(to).await?;
    let tx = client.transaction().await.map_err(failed)?;
    let prepared = migrate::prepare_in(&tx, Some("")).await?;
    if prepared.applied.first() != Some(&1) {
        return Err(StoreError::Unusable(
            "the PostgreSQL database already has a tallyd ledger; migrate copies into a new one only".into(),
        ));
    }
    // The migration made the outside world's row; the source has its own.
    tx.execute("DELETE FROM ledger_accounts", &[])
        .await
        .map_err(failed)?;
    write_accounts(&tx, &source).await.map_err(failed)?;
    write_transactions(&tx, &source).await.map_err(failed)?;
    write_keys(&tx, &source).await.map_err(failed)?;
    write_credit_and_holds(&tx, &source).await.map_err(failed)?;
    super::keys::copy_in(&tx, &source.api_keys)
        .await
        .map_err(failed)?;
    for (before_id, file, transactions, at) in &source.archive {
        tx.execute(
            "INSERT INTO ledger_archive (archived_before_id, archive_file, transactions, archived_at_ms) \
             VALUES ($1, $2, $3, $4)",
            &[before_id, file, transactions, at],
        )
        .await
        .map_err(failed)?;
    }
    // New ids follow the largest kept one, and never reuse an archived one (an archive may have
    // taken every transaction there was).
    tx.batch_execute(
        "UPDATE tallyd_ids SET \
         next_transaction_id = greatest((SELECT coalesce(max(id), 0) + 1 FROM transactions), \
                                        (SELECT coalesce(max(archived_before_id), 1) FROM ledger_archive)), \
         next_key_id = (SELECT coalesce(max(id), 0) + 1 FROM idempotency_keys), \
         next_hold_id = (SELECT coalesce(max(id), 0) + 1 FROM holds)",
    )
    .await
    .map_err(failed)?;
    tx.commit().await.map_err(failed)?;
    drop(client);
    let _ = connection.await;
    Ok(Copied {
        accounts: source.accounts.len(),
        transactions: source.transactions.len(),
        idempotency_records: source.keys.len(),
        holds: source.holds.len(),
        credit_rows: source.credit.len(),
        api_keys: source.api_keys.len(),
        archive_cuts: source.archive.len(),
    })
}

type Tx<'a> = tokio_postgres::Transaction<'a>;

async fn write_accounts(tx: &Tx<'_>, source: &Source) -> Result<(), tokio_postgres::Error> {
    for chunk in source.accounts.chunks(CHUNK_ROWS) {
        let names: Vec<&str> = chunk.iter().map(|a| a.0.as_str()).collect();
        let opening: Vec<i64> = chunk.iter().map(|a| a.1).collect();
        let balance: Vec<i64> = chunk.iter().map(|a| a.2).collect();
        let last: Vec<Option<i64>> = chunk.iter().map(|a| a.3).collect();
        let created: Vec<i64> = chunk.iter().map(|a| a.4).collect();
        tx.execute(
            "INSERT INTO ledger_accounts (name, opening_balance, balance, last_transaction_id, created_at_ms) \
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[])",
            &[&names, &opening, &balance, &last, &created],
        )
        .await?;
    }
    Ok(())
}

async fn write_transactions(tx: &Tx<'_>, source: &Source) -> Result<(), tokio_postgres::Error> {
    for chunk in source.transactions.chunks(CHUNK_ROWS) {
        let ids: Vec<i64> = chunk.iter().map(|t| t.ints[0]).collect();
        let kinds: Vec<&str> = chunk.iter().map(|t| t.kind.as_str()).collect();
        let amounts: Vec<i64> = chunk.iter().map(|t| t.ints[1]).collect();
        let names = |side: usize| {
            chunk
                .iter()
                .map(|t| t.legs[side].0.as_str())
                .collect::<Vec<&str>>()
        };
        let legs = |side: usize| chunk.iter().map(|t| t.legs[side].1).collect::<Vec<i64>>();
        let afters = |side: usize| chunk.iter().map(|t| t.legs[side].2).collect::<Vec<i64>>();
        let previous = |side: usize| chunk.iter().map(|t| t.legs[side].3).collect::<Vec<Option<i64>>>();
        let references: Vec<Option<&str>> = chunk.iter().map(|t| t.text.0.as_deref()).collect();
        let keys: Vec<Option<&str>> = chunk.iter().map(|t| t.text.1.as_deref()).collect();
        let created: Vec<i64> = chunk.iter().map(|t| t.created_at_ms).collect();
        tx.execute(
            "INSERT INTO transactions (id, kind, amount, source, source_amount, source_balance_after, \
             source_previous_id, destination, destination_amount, destination_balance_after, \
             destination_previous_id, reference, idempotency_key, created_at_ms) \
             SELECT * FROM UNNEST($1::int8[], $2::text[], $3::int8[], $4::text[], $5::int8[], $6::int8[], \
             $7::int8[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::text[], $13::text[], $14::int8[])",
            &[
                &ids,
                &kinds,
                &amounts,
                &names(0),
                &legs(0),
                &afters(0),
                &previous(0),
                &names(1),
                &legs(1),
                &afters(1),
                &previous(1),
                &references,
                &keys,
                &created,
            ],
        )
        .await?;
    }
    Ok(())
}

async fn write_keys(tx: &Tx<'_>, source: &Source) -> Result<(), tokio_postgres::Error> {
    for chunk in source.keys.chunks(CHUNK_ROWS) {
        let ids: Vec<i64> = chunk.iter().map(|k| k.id).collect();
        let scopes: Vec<&str> = chunk.iter().map(|k| k.scope.as_str()).collect();
        let keys: Vec<&str> = chunk.iter().map(|k| k.key.as_str()).collect();
        let fingerprints: Vec<&str> = chunk.iter().map(|k| k.fingerprint.as_str()).collect();
        let statuses: Vec<i32> = chunk.iter().map(|k| k.status).collect();
        let bodies: Vec<&[u8]> = chunk.iter().map(|k| k.body.as_slice()).collect();
        let transactions: Vec<Option<i64>> = chunk.iter().map(|k| k.transaction_id).collect();
        let created: Vec<i64> = chunk.iter().map(|k| k.created_at_ms).collect();
        tx.execute(
            "INSERT INTO idempotency_keys (id, scope, idempotency_key, fingerprint, status, body, transaction_id, \
             created_at_ms) SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::int4[], \
             $6::bytea[], $7::int8[], $8::int8[])",
            &[&ids, &scopes, &keys, &fingerprints, &statuses, &bodies, &transactions, &created],
        )
        .await?;
    }
    Ok(())
}

async fn write_credit_and_holds(tx: &Tx<'_>, source: &Source) -> Result<(), tokio_postgres::Error> {
    for chunk in source.credit.chunks(CHUNK_ROWS) {
        let names: Vec<&str> = chunk.iter().map(|c| c.0.as_str()).collect();
        let limits: Vec<i64> = chunk.iter().map(|c| c.1).collect();
        let held: Vec<i64> = chunk.iter().map(|c| c.2).collect();
        tx.execute(
            "INSERT INTO account_credit (name, overdraft_limit, held) \
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[])",
            &[&names, &limits, &held],
        )
        .await?;
    }
    for chunk in source.holds.chunks(CHUNK_ROWS) {
        let ids: Vec<i64> = chunk.iter().map(|h| h.id).collect();
        let cards: Vec<&str> = chunk.iter().map(|h| h.card.as_str()).collect();
        let destinations: Vec<Option<&str>> = chunk.iter().map(|h| h.destination.as_deref()).collect();
        let amounts: Vec<i64> = chunk.iter().map(|h| h.amount).collect();
        let statuses: Vec<&str> = chunk.iter().map(|h| h.status.as_str()).collect();
        let captured: Vec<Option<i64>> = chunk.iter().map(|h| h.captured_amount).collect();
        let transactions: Vec<Option<i64>> = chunk.iter().map(|h| h.transaction_id).collect();
        let references: Vec<Option<&str>> = chunk.iter().map(|h| h.reference.as_deref()).collect();
        let created: Vec<i64> = chunk.iter().map(|h| h.created_at_ms).collect();
        let expires: Vec<i64> = chunk.iter().map(|h| h.expires_at_ms).collect();
        let resolved: Vec<Option<i64>> = chunk.iter().map(|h| h.resolved_at_ms).collect();
        tx.execute(
            "INSERT INTO holds (id, card_number, destination, amount, status, captured_amount, transaction_id, \
             reference, created_at_ms, expires_at_ms, resolved_at_ms) \
             SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[], \
             $7::int8[], $8::text[], $9::int8[], $10::int8[], $11::int8[])",
            &[
                &ids,
                &cards,
                &destinations,
                &amounts,
                &statuses,
                &captured,
                &transactions,
                &references,
                &created,
                &expires,
                &resolved,
            ],
        )
        .await?;
    }
    Ok(())
}
