//! `tallyd verify --db postgres://...`: every invariant of the ledger, each one query that counts
//! its violations, all in one repeatable-read snapshot (so that a server committing meanwhile
//! cannot make a consistent ledger look broken).

use std::time::Instant;

use super::describe;
use crate::store::sqlite::Check;
use crate::store::StoreError;

/// Each check: its name, and a query whose one integer is the number of violations.
pub const CHECKS: &[(&str, &str)] = &[
    (
        "every account's current balance is its opening balance plus the sum of its legs",
        "SELECT count(*) FROM ledger_accounts a \
         LEFT JOIN (SELECT account, sum(amount) AS total FROM entries GROUP BY account) s ON s.account = a.name \
         WHERE a.balance <> a.opening_balance + coalesce(s.total, 0)",
    ),
    (
        "all balances together, @world's included, sum to the opening total",
        "SELECT CASE WHEN coalesce(sum(balance), 0) = coalesce(sum(opening_balance), 0) THEN 0 ELSE 1 END \
         FROM ledger_accounts",
    ),
    (
        "every account's current balance and last transaction are its last leg's (its opening balance before any)",
        "SELECT count(*) FROM ledger_accounts a \
         LEFT JOIN (SELECT DISTINCT ON (account) account, transaction_id, balance_after FROM entries \
                    ORDER BY account, transaction_id DESC) h ON h.account = a.name \
         WHERE a.last_transaction_id IS DISTINCT FROM h.transaction_id \
            OR (h.transaction_id IS NOT NULL AND h.balance_after <> a.balance)",
    ),
    (
        "every leg links to its account's previous transaction (or, the first, into the archive), and its balance_after = the previous one + its amount",
        "SELECT count(*) FROM (SELECT previous_id, balance_after, amount, a.opening_balance, \
                lag(transaction_id) OVER w AS previous, lag(balance_after) OVER w AS previous_balance \
             FROM entries e JOIN ledger_accounts a ON a.name = e.account \
             WINDOW w AS (PARTITION BY account ORDER BY transaction_id)) l \
         WHERE (previous_id IS DISTINCT FROM previous \
                AND NOT (previous IS NULL AND previous_id < \
                         (SELECT coalesce(max(archived_before_id), 0) FROM ledger_archive))) \
            OR balance_after <> coalesce(previous_balance, opening_balance) + amount",
    ),
    (
        "no account below -overdraft_limit",
        "SELECT count(*) FROM ledger_accounts a LEFT JOIN account_credit c ON c.name = a.name \
         WHERE a.name <> '@world' AND a.balance < -coalesce(c.overdraft_limit, 0)",
    ),
    (
        "each account's held amount equals the sum of its pending holds",
        "SELECT count(*) FROM (SELECT name, held FROM account_credit) c \
         FULL JOIN (SELECT card_number, sum(amount) AS pending FROM holds WHERE status = 'pending' \
                    GROUP BY card_number) h ON h.card_number = c.name \
         WHERE coalesce(c.held, 0) <> coalesce(h.pending, 0)",
    ),
    (
        "every hold is on an existing account, and a captured one names an existing (or archived) transaction",
        "SELECT count(*) FROM holds h LEFT JOIN transactions t ON t.id = h.transaction_id \
         LEFT JOIN ledger_accounts a ON a.name = h.card_number \
         WHERE a.name IS NULL OR (h.transaction_id IS NOT NULL AND t.id IS NULL \
               AND h.transaction_id >= (SELECT coalesce(max(archived_before_id), 0) FROM ledger_archive))",
    ),
    (
        "every idempotency record of a transaction names one that exists",
        "SELECT count(*) FROM idempotency_keys k LEFT JOIN transactions t ON t.id = k.transaction_id \
         WHERE k.transaction_id IS NOT NULL AND t.id IS NULL",
    ),
    (
        "every leg names an existing account",
        "SELECT count(*) FROM entries e LEFT JOIN ledger_accounts a ON a.name = e.account WHERE a.name IS NULL",
    ),
    (
        "available (balance - held + overdraft_limit) >= 0 for every account",
        "SELECT count(*) FROM ledger_accounts a JOIN account_credit c ON c.name = a.name \
         WHERE a.balance - c.held + c.overdraft_limit < 0",
    ),
    (
        "every id handed out is below the next one",
        "SELECT (SELECT count(*) FROM transactions WHERE id >= (SELECT next_transaction_id FROM tallyd_ids)) \
              + (SELECT count(*) FROM holds WHERE id >= (SELECT next_hold_id FROM tallyd_ids)) \
              + (SELECT count(*) FROM idempotency_keys WHERE id >= (SELECT next_key_id FROM tallyd_ids))",
    ),
];

/// Runs every check; returns the number of transactions and each check's result.
pub async fn verify(url: &str) -> Result<(i64, Vec<Check>), StoreError> {
    let unusable = |error: tokio_postgres::Error| StoreError::Unusable(describe(&error));
    let (mut client, connection) = super::connect(url).await?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(unusable)?;
    let transactions: i64 = tx
        .query_one("SELECT count(*) FROM transactions", &[])
        .await
        .map_err(unusable)?
        .get(0);
    let mut checks = Vec::with_capacity(CHECKS.len());
    for (name, sql) in CHECKS {
        let started = Instant::now();
        // Whatever integer type the check's query yields, as a bigint.
        let violations: i64 = tx
            .query_one(&format!("SELECT ({sql})::bigint"), &[])
            .await
            .map_err(unusable)?
            .get(0);
        checks.push(Check {
            name,
            violations,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    tx.commit().await.map_err(unusable)?;
    drop(client);
    let _ = connection.await;
    Ok((transactions, checks))
}
