//! Writing a decided batch inside its open transaction: one multi-row statement per table, each
//! taking its rows as arrays (`UNNEST`), all sent at once (tokio-postgres pipelines the
//! statements of one connection), so that a batch of a thousand transactions costs the same few
//! round trips as a batch of one.
//!
//! Why `UNNEST` and not `COPY`: `COPY` cannot say `ON CONFLICT` (holds and credit terms are
//! upserts) nor update rows (balances), and for the tens to thousands of rows of one batch its
//! setup costs as much as it saves; one statement per table keeps every write in a single
//! prepared plan.

use std::collections::BTreeMap;

use deadpool_postgres::Transaction;
use tokio_postgres::error::SqlState;

use super::store_error;
use crate::domain::{Account, CardNumber};
use crate::store::{Batch, StoreError};

const INSERT_ACCOUNTS: &str = "INSERT INTO ledger_accounts (name, opening_balance, balance, last_transaction_id, created_at_ms) \
     SELECT name, 0, balance, last_id, $4 FROM UNNEST($1::text[], $2::int8[], $3::int8[]) AS u(name, balance, last_id)";
const UPDATE_BALANCES: &str =
    "UPDATE ledger_accounts AS a SET balance = u.balance, last_transaction_id = u.last_id \
     FROM UNNEST($1::text[], $2::int8[], $3::int8[]) AS u(name, balance, last_id) WHERE a.name = u.name";
const INSERT_TRANSACTIONS: &str = "INSERT INTO transactions (id, kind, amount, \
     source, source_amount, source_balance_after, source_previous_id, \
     destination, destination_amount, destination_balance_after, destination_previous_id, \
     reference, idempotency_key, created_at_ms) \
     SELECT u.*, $14 FROM UNNEST($1::int8[], $2::text[], $3::int8[], $4::text[], $5::int8[], $6::int8[], $7::int8[], \
     $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::text[], $13::text[]) AS u";
const INSERT_KEYS: &str = "INSERT INTO idempotency_keys (id, scope, idempotency_key, fingerprint, status, body, \
     transaction_id, created_at_ms) \
     SELECT u.*, $8 FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::bytea[], $7::int8[]) AS u";
const UPSERT_HOLDS: &str = "INSERT INTO holds (id, card_number, destination, amount, status, captured_amount, \
     transaction_id, reference, created_at_ms, expires_at_ms, resolved_at_ms) \
     SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::int8[], $5::text[], $6::int8[], $7::int8[], \
     $8::text[], $9::int8[], $10::int8[], $11::int8[]) \
     ON CONFLICT (id) DO UPDATE SET status = excluded.status, captured_amount = excluded.captured_amount, \
     transaction_id = excluded.transaction_id, resolved_at_ms = excluded.resolved_at_ms";
const UPSERT_CREDIT: &str = "INSERT INTO account_credit (name, overdraft_limit, held) \
     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[]) \
     ON CONFLICT (name) DO UPDATE SET overdraft_limit = excluded.overdraft_limit, held = excluded.held";

/// Every account the batch moved, with its balance and last transaction after the batch (a
/// later leg of one account replaces an earlier one: legs are in id order).
pub fn final_states(batch: &Batch) -> BTreeMap<String, (i64, i64)> {
    let mut states = BTreeMap::new();
    for record in &batch.transactions {
        for leg in &record.legs {
            states.insert(leg.account.name().to_owned(), (leg.balance_after, record.id));
        }
    }
    states
}

/// Writes `batch` in `tx`. A conflict (another instance opened the same account, or used the
/// same key, a moment ago) is [`StoreError::Conflict`]: roll back and decide again.
pub async fn batch(tx: &Transaction<'_>, batch: &Batch) -> Result<(), StoreError> {
    let at = batch.at_unix_ms;
    let mut states = final_states(batch);
    // Accounts opened now are inserted at their state after the batch, the rest updated.
    let mut opened = (Vec::new(), Vec::new(), Vec::<Option<i64>>::new());
    for account in &batch.accounts {
        let name = account.card.as_str();
        let (balance, last) = states
            .remove(name)
            .map_or((0, None), |(balance, id)| (balance, Some(id)));
        opened.0.push(name.to_owned());
        opened.1.push(balance);
        opened.2.push(last);
    }
    let moved = (
        states.keys().cloned().collect::<Vec<String>>(),
        states.values().map(|state| state.0).collect::<Vec<i64>>(),
        states.values().map(|state| state.1).collect::<Vec<i64>>(),
    );
    let accounts = async {
        if opened.0.is_empty() {
            return Ok(0);
        }
        let statement = tx.prepare_cached(INSERT_ACCOUNTS).await?;
        tx.execute(&statement, &[&opened.0, &opened.1, &opened.2, &at])
            .await
    };
    let balances = async {
        if moved.0.is_empty() {
            return Ok(0);
        }
        let statement = tx.prepare_cached(UPDATE_BALANCES).await?;
        tx.execute(&statement, &[&moved.0, &moved.1, &moved.2]).await
    };
    let (transactions, keys, holds, credit) = tokio::join!(
        transactions(tx, batch),
        keys(tx, batch),
        holds(tx, batch),
        credit(tx, batch)
    );
    let (accounts, balances) = tokio::join!(accounts, balances);
    // The statements are pipelined: after the first one fails, the rest fail with 25P02 (the
    // transaction is aborted), so the error that says what happened is the one that is not that.
    let errors: Vec<&tokio_postgres::Error> = [&accounts, &balances, &transactions, &keys, &holds, &credit]
        .into_iter()
        .filter_map(|result| result.as_ref().err())
        .collect();
    let aborted = |error: &&tokio_postgres::Error| error.code() == Some(&SqlState::IN_FAILED_SQL_TRANSACTION);
    if let Some(error) = errors.iter().find(|error| !aborted(error)).or(errors.first()) {
        return Err(store_error(error));
    }
    // Every account a leg names was locked and read by this batch, so each update finds its row.
    let updated = balances.map_err(|error| store_error(&error))?;
    if updated != moved.0.len() as u64 {
        return Err(StoreError::Retryable(format!(
            "{} of the {} accounts the batch moved are gone",
            moved.0.len() as u64 - updated,
            moved.0.len()
        )));
    }
    Ok(())
}

async fn transactions(tx: &Transaction<'_>, batch: &Batch) -> Result<u64, tokio_postgres::Error> {
    if batch.transactions.is_empty() {
        return Ok(0);
    }
    let records = &batch.transactions;
    let column =
        |f: &dyn Fn(&crate::store::TransactionRecord) -> i64| records.iter().map(f).collect::<Vec<i64>>();
    let ids = column(&|r| r.id);
    let amounts = column(&|r| r.amount);
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    let names = |side: usize| {
        records
            .iter()
            .map(|r| r.legs[side].account.name())
            .collect::<Vec<&str>>()
    };
    let leg_amounts = |side: usize| records.iter().map(|r| r.legs[side].amount).collect::<Vec<i64>>();
    let afters = |side: usize| {
        records
            .iter()
            .map(|r| r.legs[side].balance_after)
            .collect::<Vec<i64>>()
    };
    let previous = |side: usize| {
        records
            .iter()
            .map(|r| r.legs[side].previous_id)
            .collect::<Vec<Option<i64>>>()
    };
    let references: Vec<Option<&str>> = records
        .iter()
        .map(|r| r.reference.as_ref().map(|text| text.as_str()))
        .collect();
    let keys: Vec<Option<&str>> = records
        .iter()
        .map(|r| r.idempotency_key.as_ref().map(|key| key.as_str()))
        .collect();
    let statement = tx.prepare_cached(INSERT_TRANSACTIONS).await?;
    tx.execute(
        &statement,
        &[
            &ids,
            &kinds,
            &amounts,
            &names(0),
            &leg_amounts(0),
            &afters(0),
            &previous(0),
            &names(1),
            &leg_amounts(1),
            &afters(1),
            &previous(1),
            &references,
            &keys,
            &batch.at_unix_ms,
        ],
    )
    .await
}

async fn keys(tx: &Transaction<'_>, batch: &Batch) -> Result<u64, tokio_postgres::Error> {
    if batch.idempotency.is_empty() {
        return Ok(0);
    }
    let records = &batch.idempotency;
    let ids: Vec<i64> = records.iter().map(|r| r.id).collect();
    let scopes: Vec<&str> = records.iter().map(|r| r.scope).collect();
    let names: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    let fingerprints: Vec<&str> = records.iter().map(|r| r.stored.fingerprint.as_str()).collect();
    let statuses: Vec<i32> = records.iter().map(|r| i32::from(r.stored.status)).collect();
    let bodies: Vec<&[u8]> = records.iter().map(|r| r.stored.body.as_slice()).collect();
    let transactions: Vec<Option<i64>> = records.iter().map(|r| r.transaction_id).collect();
    let statement = tx.prepare_cached(INSERT_KEYS).await?;
    tx.execute(
        &statement,
        &[
            &ids,
            &scopes,
            &names,
            &fingerprints,
            &statuses,
            &bodies,
            &transactions,
            &batch.at_unix_ms,
        ],
    )
    .await
}

async fn holds(tx: &Transaction<'_>, batch: &Batch) -> Result<u64, tokio_postgres::Error> {
    if batch.holds.is_empty() {
        return Ok(0);
    }
    let holds = &batch.holds;
    let ids: Vec<i64> = holds.iter().map(|h| h.id).collect();
    let cards: Vec<&str> = holds.iter().map(|h| h.card.as_str()).collect();
    let destinations: Vec<Option<&str>> = holds
        .iter()
        .map(|h| h.destination.as_ref().map(CardNumber::as_str))
        .collect();
    let amounts: Vec<i64> = holds.iter().map(|h| h.amount).collect();
    let statuses: Vec<&str> = holds.iter().map(|h| h.status.as_str()).collect();
    let captured: Vec<Option<i64>> = holds.iter().map(|h| h.captured_amount).collect();
    let transactions: Vec<Option<i64>> = holds.iter().map(|h| h.transaction_id).collect();
    let references: Vec<Option<&str>> = holds
        .iter()
        .map(|h| h.reference.as_ref().map(|text| text.as_str()))
        .collect();
    let created: Vec<i64> = holds.iter().map(|h| h.created_at_ms).collect();
    let expires: Vec<i64> = holds.iter().map(|h| h.expires_at_ms).collect();
    let resolved: Vec<Option<i64>> = holds.iter().map(|h| h.resolved_at_ms).collect();
    let statement = tx.prepare_cached(UPSERT_HOLDS).await?;
    tx.execute(
        &statement,
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
    .await
}

async fn credit(tx: &Transaction<'_>, batch: &Batch) -> Result<u64, tokio_postgres::Error> {
    if batch.credit.is_empty() {
        return Ok(0);
    }
    let names: Vec<&str> = batch.credit.iter().map(|row| row.card.as_str()).collect();
    let limits: Vec<i64> = batch
        .credit
        .iter()
        .map(|row| row.credit.overdraft_limit)
        .collect();
    let held: Vec<i64> = batch.credit.iter().map(|row| row.credit.held).collect();
    let statement = tx.prepare_cached(UPSERT_CREDIT).await?;
    tx.execute(&statement, &[&names, &limits, &held]).await
}

/// The accounts a batch's legs name, for the check that each of them was locked.
pub fn leg_accounts(batch: &Batch) -> impl Iterator<Item = &Account> {
    batch
        .transactions
        .iter()
        .flat_map(|record| record.legs.iter().map(|leg| &leg.account))
}
