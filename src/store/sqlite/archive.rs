//! `tallyd archive`: moves old history out of a live database, keeping `verify` true.
//!
//! The journal grows forever (about 200 bytes a transaction with its leg data; see the README).
//! Archiving cuts it at a transaction id: every transaction below the cut is copied to an archive
//! file (a SQLite database with the same `transactions` table, readable by any tool), each
//! account's opening balance becomes its balance just before the cut (a snapshot of balances at a
//! journal id), and the archived rows leave the live database, all in one transaction. The
//! remaining history is then exactly a ledger that opened at the cut: the legs after it still sum
//! to zero, each running balance is the new opening balance plus the legs, and all balances still
//! sum to the opening total. An account's first remaining leg may link to an archived transaction;
//! `ledger_archive` records the cut, so `verify` accepts that link and a statement ends there.
//!
//! It takes the writer lock, so `serve` cannot run meanwhile, and refuses a cut above the
//! balance checkpoint's reach only in the sense that it first brings every row up to date.

use std::path::Path;

use rusqlite::{params, Connection, TransactionBehavior};

use super::schema;
use crate::store::lock::WriterLock;
use crate::store::StoreError;

/// What an archive did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveReport {
    pub transactions: i64,
    pub accounts_reopened: i64,
    pub idempotency_records_dropped: i64,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

fn unusable(message: String) -> StoreError {
    StoreError::Unusable(message)
}

fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |meta| meta.len())
}

/// Moves every transaction with an id below `before_id` from the database at `db` to a new
/// archive database at `to`.
pub fn archive(db: &Path, before_id: i64, to: &Path) -> Result<ArchiveReport, StoreError> {
    if to.exists() {
        return Err(unusable(format!(
            "{} exists; archive into a new file",
            to.display()
        )));
    }
    let _lock = WriterLock::acquire(db, std::time::Duration::ZERO)?;
    let mut conn = Connection::open(db)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version != schema::VERSION {
        return Err(unusable(format!(
            "{} has schema version {version}; archive works on version {} (start serve once to upgrade it)",
            db.display(),
            schema::VERSION
        )));
    }
    let bytes_before = file_bytes(db);
    let archive_path = to
        .to_str()
        .ok_or_else(|| unusable(format!("{} is not a UTF-8 path", to.display())))?;
    conn.execute("ATTACH DATABASE ?1 AS archive", [archive_path])?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let last: i64 = tx.query_row("SELECT coalesce(max(id), 0) FROM transactions", [], |row| {
        row.get(0)
    })?;
    let already: i64 = tx.query_row(
        "SELECT coalesce(max(archived_before_id), 1) FROM ledger_archive",
        [],
        |row| row.get(0),
    )?;
    if before_id <= already || before_id > last + 1 {
        return Err(unusable(format!(
            "--before-id must be above {already} (what is archived already) and at most {} (one past the last transaction)",
            last + 1
        )));
    }
    // Every row current first (tallyd writes balances back in the background; it is stopped now).
    tx.execute_batch(
        "UPDATE ledger_accounts SET balance = c.balance, last_transaction_id = c.last_transaction_id \
         FROM current_accounts c WHERE c.name = ledger_accounts.name \
           AND (ledger_accounts.balance <> c.balance \
                OR ledger_accounts.last_transaction_id IS NOT c.last_transaction_id); \
         UPDATE ledger_checkpoint SET transaction_id = (SELECT coalesce(max(id), 0) FROM transactions);",
    )?;
    // The archive: the same transactions table, and each account's opening balance before the cut.
    let table: String = tx.query_row(
        "SELECT sql FROM main.sqlite_schema WHERE type = 'table' AND name = 'transactions'",
        [],
        |row| row.get(0),
    )?;
    tx.execute_batch(&table.replacen(
        "CREATE TABLE transactions",
        "CREATE TABLE archive.transactions",
        1,
    ))?;
    tx.execute_batch(
        "CREATE TABLE archive.opening_balances (name TEXT NOT NULL PRIMARY KEY, opening_balance INTEGER NOT NULL) STRICT; \
         INSERT INTO archive.opening_balances SELECT name, opening_balance FROM main.ledger_accounts;",
    )?;
    let transactions = tx.execute(
        "INSERT INTO archive.transactions SELECT * FROM main.transactions WHERE id < ?1",
        [before_id],
    )? as i64;
    // The snapshot: each account's balance just before the cut is its new opening balance.
    let accounts_reopened = tx.execute(
        "UPDATE ledger_accounts SET opening_balance = cut.balance_after \
         FROM (SELECT account, balance_after, max(transaction_id) FROM entries \
               WHERE transaction_id < ?1 GROUP BY account) cut \
         WHERE cut.account = ledger_accounts.name",
        [before_id],
    )? as i64;
    // An account whose whole history is archived starts a new chain.
    tx.execute(
        "UPDATE ledger_accounts SET last_transaction_id = NULL WHERE last_transaction_id < ?1",
        [before_id],
    )?;
    let idempotency_records_dropped = tx.execute(
        "DELETE FROM idempotency_keys WHERE transaction_id < ?1",
        [before_id],
    )? as i64;
    // The one place history is deleted: the trigger that forbids it is lifted inside this
    // transaction and put back exactly as the schema has it.
    let trigger: String = tx.query_row(
        "SELECT sql FROM sqlite_schema WHERE type = 'trigger' AND name = 'transactions_are_permanent'",
        [],
        |row| row.get(0),
    )?;
    tx.execute_batch("DROP TRIGGER transactions_are_permanent")?;
    tx.execute("DELETE FROM transactions WHERE id < ?1", [before_id])?;
    tx.execute_batch(&trigger)?;
    tx.execute(
        "INSERT INTO ledger_archive (archived_before_id, archive_file, transactions, archived_at_ms) \
         VALUES (?1, ?2, ?3, CAST(unixepoch('subsec') * 1000 AS INTEGER))",
        params![before_id, archive_path, transactions],
    )?;
    tx.commit()?;
    conn.execute_batch("DETACH DATABASE archive")?;
    // Give the space back: the file is rewritten without the archived pages.
    conn.execute_batch("VACUUM")?;
    drop(conn);
    Ok(ArchiveReport {
        transactions,
        accounts_reopened,
        idempotency_records_dropped,
        bytes_before,
        bytes_after: file_bytes(db),
    })
}
