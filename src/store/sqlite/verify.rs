//! `tallyd verify`'s checks: SQLite's own integrity check, then every invariant of the double-entry
//! ledger as a query counting the rows that break it. Read-only: it works on a live database.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::schema;
use crate::store::StoreError;

/// One invariant: what it says, and how many rows break it.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub violations: i64,
    /// How long the check took: each is one pass over a table or two, so it grows with the data.
    pub seconds: f64,
}

/// How long verify waits on SQLite (only during WAL recovery by another process).
const VERIFY_BUSY_TIMEOUT: Duration = Duration::from_secs(30);

const INVARIANTS: &[(&str, &str)] = &[
    (
        "the legs of every transaction sum to zero: the source debited and the destination credited by its amount",
        "SELECT count(*) FROM transactions WHERE source_amount + destination_amount <> 0 \
           OR destination_amount <> amount",
    ),
    (
        "a transaction's kind matches its accounts (deposits from @world, withdrawals to it, transfers between cards, adjustments with @world)",
        "SELECT count(*) FROM transactions WHERE NOT ( \
           (kind = 'deposit' AND source = '@world' AND destination <> '@world') OR \
           (kind = 'withdrawal' AND destination = '@world' AND source <> '@world') OR \
           (kind = 'transfer' AND source <> '@world' AND destination <> '@world') OR \
           (kind = 'adjustment' AND (source = '@world') <> (destination = '@world')))",
    ),
    (
        "every leg names an existing account",
        "SELECT count(*) FROM entries WHERE account NOT IN (SELECT name FROM ledger_accounts)",
    ),
    (
        "every leg's balance_after = opening balance + running sum of the account's legs",
        "SELECT count(*) FROM (SELECT e.balance_after, a.opening_balance + SUM(e.amount) OVER \
           (PARTITION BY e.account ORDER BY e.transaction_id) AS expected \
           FROM entries e JOIN ledger_accounts a ON a.name = e.account) WHERE balance_after <> expected",
    ),
    (
        "every leg links to its account's previous transaction (the chains are the whole history, or reach into the archive)",
        "SELECT count(*) FROM (SELECT previous_id, LAG(transaction_id) OVER \
           (PARTITION BY account ORDER BY transaction_id) AS expected FROM entries) \
         WHERE previous_id IS NOT expected \
           AND NOT (expected IS NULL AND previous_id < \
                    (SELECT coalesce(max(archived_before_id), 0) FROM ledger_archive))",
    ),
    (
        "every account's current balance and last transaction are its last leg's (its opening balance before any)",
        "SELECT count(*) FROM current_accounts a LEFT JOIN \
           (SELECT account, max(transaction_id) AS last FROM entries GROUP BY account) l ON l.account = a.name \
         WHERE a.last_transaction_id IS NOT l.last \
            OR a.balance <> coalesce((SELECT e.balance_after FROM entries e \
                 WHERE e.account = a.name AND e.transaction_id = l.last), a.opening_balance)",
    ),
    (
        "every account's stored row is its state at one of its legs, at the balance checkpoint or later",
        "SELECT count(*) FROM ledger_accounts a LEFT JOIN \
           (SELECT account, max(transaction_id) AS last FROM entries \
            WHERE transaction_id <= (SELECT transaction_id FROM ledger_checkpoint) GROUP BY account) c \
           ON c.account = a.name \
         WHERE a.balance <> coalesce((SELECT e.balance_after FROM entries e \
                 WHERE e.account = a.name AND e.transaction_id = a.last_transaction_id), a.opening_balance) \
            OR coalesce(a.last_transaction_id, 0) < coalesce(c.last, 0) \
            OR (a.last_transaction_id IS NOT NULL \
                AND a.last_transaction_id NOT IN (SELECT id FROM transactions))",
    ),
    (
        "no card below zero, ever, unless it has credit terms (then never past the largest overdraft limit)",
        "SELECT (SELECT count(*) FROM entries WHERE account <> '@world' AND balance_after < 0 \
                   AND (balance_after < -1000000000000 OR account NOT IN (SELECT name FROM account_credit))) + \
                (SELECT count(*) FROM current_accounts WHERE opening_balance < 0 AND name <> '@world')",
    ),
    (
        "no account below -overdraft_limit",
        "SELECT count(*) FROM account_availability WHERE balance < -overdraft_limit",
    ),
    (
        "available (balance - held + overdraft_limit) >= 0 for every account",
        "SELECT count(*) FROM account_availability WHERE available < 0",
    ),
    (
        "each account's held amount equals the sum of its pending holds",
        "SELECT (SELECT count(*) FROM account_credit c LEFT JOIN \
                   (SELECT card_number, sum(amount) AS pending FROM holds WHERE status = 'pending' \
                    GROUP BY card_number) h ON h.card_number = c.name \
                 WHERE c.held <> coalesce(h.pending, 0)) + \
                (SELECT count(DISTINCT card_number) FROM holds WHERE status = 'pending' \
                   AND card_number NOT IN (SELECT name FROM account_credit))",
    ),
    (
        "every hold is on an existing account, and pays an existing one",
        "SELECT count(*) FROM holds WHERE card_number NOT IN (SELECT name FROM ledger_accounts) \
           OR (destination IS NOT NULL AND destination NOT IN (SELECT name FROM ledger_accounts))",
    ),
    (
        "no hold is both captured and voided: only a captured hold has a captured amount and a transaction",
        "SELECT count(*) FROM holds WHERE (status = 'captured') <> \
           (captured_amount IS NOT NULL AND transaction_id IS NOT NULL) \
           OR (status <> 'captured' AND (captured_amount IS NOT NULL OR transaction_id IS NOT NULL))",
    ),
    (
        "every captured hold has exactly one transaction with its amount, from its card to its destination",
        "SELECT (SELECT count(*) FROM holds h LEFT JOIN transactions t ON t.id = h.transaction_id \
                 WHERE h.status = 'captured' \
                   AND h.transaction_id >= (SELECT coalesce(max(archived_before_id), 0) FROM ledger_archive) \
                   AND (t.id IS NULL OR t.amount <> h.captured_amount OR t.source <> h.card_number \
                        OR t.destination <> coalesce(h.destination, '@world'))) + \
                (SELECT count(*) FROM (SELECT transaction_id FROM holds WHERE transaction_id IS NOT NULL \
                   GROUP BY transaction_id HAVING count(*) > 1))",
    ),
    (
        "every amount is positive and within the per-transaction limit",
        "SELECT count(*) FROM transactions WHERE amount <= 0 OR amount > 1000000000000",
    ),
    (
        "no two idempotency records share a route and a key",
        "SELECT count(*) FROM (SELECT 1 FROM idempotency_keys GROUP BY scope, idempotency_key HAVING count(*) > 1)",
    ),
    (
        "every idempotency record of a transaction names one that exists",
        "SELECT count(*) FROM idempotency_keys WHERE transaction_id IS NOT NULL \
           AND transaction_id NOT IN (SELECT id FROM transactions)",
    ),
];

/// How many checks [`verify`] runs.
pub const CHECKS: usize = INVARIANTS.len() + 2;

/// Runs SQLite's own integrity check, then every invariant, over the database at `path` (opened
/// read-only), calling `starting` with each check's name before it runs. Returns the number of
/// transactions and each check.
pub fn verify(path: &Path, starting: &mut dyn FnMut(&'static str)) -> Result<(i64, Vec<Check>), StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(VERIFY_BUSY_TIMEOUT)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version != schema::VERSION {
        return Err(StoreError::Unusable(format!(
            "{} has schema version {version}; this tallyd verifies version {} (serve upgrades a version-1 file)",
            path.display(),
            schema::VERSION
        )));
    }
    // One snapshot for every check, so that a live server's commits cannot make them disagree.
    conn.execute_batch("BEGIN")?;
    let mut checks = Vec::with_capacity(CHECKS);
    let mut run = |name: &'static str, check: &dyn Fn() -> Result<i64, StoreError>| {
        starting(name);
        let started = std::time::Instant::now();
        let violations = check()?;
        checks.push(Check {
            name,
            violations,
            seconds: started.elapsed().as_secs_f64(),
        });
        Ok::<(), StoreError>(())
    };
    run("SQLite integrity_check", &|| {
        let integrity: String = conn.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
        Ok(i64::from(integrity != "ok"))
    })?;
    for (name, sql) in INVARIANTS {
        run(name, &|| Ok(conn.query_row(sql, [], |row| row.get(0))?))?;
    }
    run(
        "all balances together, @world's included, sum to the opening total",
        &|| Ok(i64::from(!conserved(&conn)?)),
    )?;
    let transactions = conn.query_row("SELECT count(*) FROM transactions", [], |row| row.get(0))?;
    conn.execute_batch("COMMIT")?;
    Ok((transactions, checks))
}

/// Whether every balance together equals every opening balance together, summed as i128: SQLite's
/// `SUM` stops at i64, and balances near i64::MAX are legal.
fn conserved(conn: &Connection) -> Result<bool, StoreError> {
    let mut stmt = conn.prepare("SELECT opening_balance, balance FROM current_accounts")?;
    let mut rows = stmt.query([])?;
    let (mut opening, mut now) = (0_i128, 0_i128);
    while let Some(row) = rows.next()? {
        opening += i128::from(row.get::<_, i64>(0)?);
        now += i128::from(row.get::<_, i64>(1)?);
    }
    Ok(opening == now)
}
