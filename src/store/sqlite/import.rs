//! `tallyd import`: a database of the Flask transaction processor becomes a new tallyd database.
//!
//! The Flask schema is `users(card_number TEXT PRIMARY KEY, balance INTEGER)` and
//! `transactions(id INTEGER PRIMARY KEY AUTOINCREMENT, card_number TEXT, amount INTEGER,
//! success INTEGER, timestamp DATETIME)`. What becomes of it:
//! * every `users` row is an account whose balance is exactly the one it had (the truth), its card
//!   number normalised to digits (`6219 8619 0042 8640` is `6219861900428640`);
//! * every `success = 1` row is a deposit or a withdrawal with its Flask id and original time;
//! * `success = 0` rows moved no money: they are counted and reported, not imported;
//! * the Flask processor lost updates (20 threads read and wrote balances), so a history often does
//!   not add up to its balance. Each account opens with the balance its history implies
//!   (`balance - sum(history)`), raised where that would take the replayed history below zero; what
//!   that raise adds is taken off again by one explicit `adjustment` transaction to `@world` after
//!   the history, so the final balance is the imported one. Accounts needing one, and their total,
//!   are reported.
//!
//! Everything is written into `<db>.importing` in one transaction, then renamed to `<db>`: an import
//! that is interrupted leaves no output file. The target's writer lock is held throughout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, TransactionBehavior};

use super::schema;
use crate::domain::{CardNumber, AMOUNT_ABS_MAX, WORLD_ACCOUNT};
use crate::store::lock::WriterLock;
use crate::store::StoreError;

/// Problems listed by name before an import is refused; the rest are counted.
const PROBLEMS_SHOWN_MAX: usize = 10;

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportReport {
    pub accounts: u64,
    /// Successful Flask transactions imported as deposits and withdrawals.
    pub transactions: u64,
    /// `success = 0` rows: counted, not imported.
    pub declined: u64,
    /// Successful rows that moved nothing tallyd can hold (amount zero or beyond the limit, a card
    /// with no `users` row): counted, not imported.
    pub skipped: u64,
    /// Sum of the opening balances: what the balances were before the imported history, by the
    /// history's own account (`balance - sum(history)`, raised where needed).
    pub opening_total: i128,
    /// Accounts whose history could not be replayed from any non-negative opening balance.
    pub adjusted_accounts: u64,
    /// Sum of the adjustments' absolute amounts, minor units.
    pub adjusted_total: i128,
}

/// One successful Flask transaction.
struct History {
    id: i64,
    card: usize,
    amount: i64,
    at_ms: i64,
}

fn unusable(message: String) -> StoreError {
    StoreError::Unusable(message)
}

/// Imports the Flask database at `from` into a new tallyd database at `to`.
pub fn import(from: &Path, to: &Path) -> Result<ImportReport, StoreError> {
    if !from.exists() {
        return Err(unusable(format!("no database at {}", from.display())));
    }
    if std::fs::metadata(to).is_ok_and(|meta| meta.len() > 0) {
        return Err(unusable(format!(
            "{} exists; tallyd import writes a new database (choose another --db, or remove it)",
            to.display()
        )));
    }
    let _lock = WriterLock::acquire(to, Duration::ZERO)?;
    let source = Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    check_flask_schema(&source, from)?;
    let now_ms = crate::unix_ms_now();
    let (cards, balances) = read_users(&source)?;
    let mut report = ImportReport {
        accounts: cards.len() as u64,
        ..ImportReport::default()
    };
    let history = read_history(&source, &cards, now_ms, &mut report)?;
    drop(source);

    let partial = importing_path(to);
    let _ = std::fs::remove_file(&partial);
    let result = write(&partial, &cards, &balances, &history, now_ms, &mut report);
    if let Err(error) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(error);
    }
    std::fs::rename(&partial, to).map_err(|error| {
        unusable(format!(
            "cannot move {} to {}: {error}",
            partial.display(),
            to.display()
        ))
    })?;
    Ok(report)
}

fn importing_path(to: &Path) -> PathBuf {
    let mut name = to.as_os_str().to_owned();
    name.push(".importing");
    PathBuf::from(name)
}

fn columns(conn: &Connection, table: &str) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let names = stmt
        .query_map([table], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(names)
}

fn check_flask_schema(conn: &Connection, from: &Path) -> Result<(), StoreError> {
    let users = columns(conn, "users")?;
    let transactions = columns(conn, "transactions")?;
    let has = |found: &[String], wanted: &[&str]| wanted.iter().all(|w| found.iter().any(|f| f == w));
    if has(&users, &["card_number", "balance"])
        && has(
            &transactions,
            &["id", "card_number", "amount", "success", "timestamp"],
        )
    {
        return Ok(());
    }
    Err(unusable(format!(
        "{} is not a database of the Flask transaction processor: it needs tables \
         users(card_number, balance) and transactions(id, card_number, amount, success, timestamp)",
        from.display()
    )))
}

/// The accounts, in card order, with their balances; refuses the import on any row tallyd cannot hold.
fn read_users(conn: &Connection) -> Result<(Vec<CardNumber>, Vec<i64>), StoreError> {
    let mut stmt = conn.prepare("SELECT card_number, balance FROM users ORDER BY rowid")?;
    let mut rows = stmt.query([])?;
    let mut problems = Vec::new();
    let mut seen: HashMap<CardNumber, String> = HashMap::new();
    let mut accounts = Vec::new();
    while let Some(row) = rows.next()? {
        let written = match row.get_ref(0)? {
            ValueRef::Text(text) => String::from_utf8_lossy(text).into_owned(),
            other => {
                problems.push(format!(
                    "a card number that is not text ({:?})",
                    other.data_type()
                ));
                continue;
            }
        };
        let Ok(card) = CardNumber::parse(&written) else {
            problems.push(format!("card {written:?} is not a card number tallyd accepts"));
            continue;
        };
        let balance = match row.get_ref(1)? {
            ValueRef::Integer(balance) if balance >= 0 => balance,
            ValueRef::Integer(balance) => {
                problems.push(format!("card {written:?} has a negative balance ({balance})"));
                continue;
            }
            other => {
                problems.push(format!(
                    "card {written:?} has a balance that is not an integer ({:?})",
                    other.data_type()
                ));
                continue;
            }
        };
        if let Some(first) = seen.insert(card.clone(), written.clone()) {
            problems.push(format!("cards {first:?} and {written:?} are the same number"));
            continue;
        }
        accounts.push((card, balance));
    }
    if !problems.is_empty() {
        let shown: Vec<&str> = problems
            .iter()
            .take(PROBLEMS_SHOWN_MAX)
            .map(String::as_str)
            .collect();
        return Err(unusable(format!(
            "nothing was imported: {} users row(s) cannot be accounts: {}{}",
            problems.len(),
            shown.join("; "),
            if problems.len() > PROBLEMS_SHOWN_MAX {
                "; ..."
            } else {
                ""
            }
        )));
    }
    accounts.sort();
    Ok(accounts.into_iter().unzip())
}

/// The successful history in id order, with times that never go backwards.
fn read_history(
    conn: &Connection,
    cards: &[CardNumber],
    now_ms: i64,
    report: &mut ImportReport,
) -> Result<Vec<History>, StoreError> {
    let index: HashMap<&str, usize> = cards.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let mut stmt = conn.prepare(
        "SELECT id, card_number, amount, success, \
         CAST(unixepoch(timestamp, 'subsec') * 1000 AS INTEGER) FROM transactions ORDER BY id",
    )?;
    let mut rows = stmt.query([])?;
    let mut history = Vec::new();
    let mut last_ms = 0;
    while let Some(row) = rows.next()? {
        let success = matches!(row.get_ref(3)?, ValueRef::Integer(1));
        if !success {
            report.declined += 1;
            continue;
        }
        let card = match row.get_ref(1)? {
            ValueRef::Text(text) => CardNumber::parse(&String::from_utf8_lossy(text)).ok(),
            _ => None,
        };
        let card = card.and_then(|card| index.get(card.as_str()).copied());
        let amount = match row.get_ref(2)? {
            ValueRef::Integer(amount) if amount != 0 && amount.unsigned_abs() <= AMOUNT_ABS_MAX as u64 => {
                Some(amount)
            }
            _ => None,
        };
        let (Some(card), Some(amount), ValueRef::Integer(id)) = (card, amount, row.get_ref(0)?) else {
            report.skipped += 1;
            continue;
        };
        let at_ms: Option<i64> = row.get(4)?;
        last_ms = at_ms.unwrap_or(now_ms).max(last_ms);
        history.push(History {
            id,
            card,
            amount,
            at_ms: last_ms,
        });
    }
    Ok(history)
}

/// Each account's opening balance and end-of-history adjustment (zero when the history adds up).
fn openings(balances: &[i64], history: &[History]) -> Result<Vec<(i64, i64)>, StoreError> {
    let mut sums = vec![0_i128; balances.len()];
    let mut lowest = vec![0_i128; balances.len()];
    for row in history {
        sums[row.card] += i128::from(row.amount);
        lowest[row.card] = lowest[row.card].min(sums[row.card]);
    }
    balances
        .iter()
        .zip(sums.iter().zip(&lowest))
        .map(|(balance, (sum, lowest))| {
            let implied = i128::from(*balance) - sum;
            let opening = implied.max(-lowest);
            let fits = |value: i128| {
                i64::try_from(value).map_err(|_| unusable("an opening balance beyond i64".into()))
            };
            Ok((fits(opening)?, fits(implied - opening)?))
        })
        .collect()
}

fn write(
    path: &Path,
    cards: &[CardNumber],
    balances: &[i64],
    history: &[History],
    now_ms: i64,
    report: &mut ImportReport,
) -> Result<(), StoreError> {
    let openings = openings(balances, history)?;
    report.opening_total = openings.iter().map(|(opening, _)| i128::from(*opening)).sum();
    let mut conn = Connection::open(path)?;
    conn.pragma_update(None, "page_size", 1024)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(schema::SCHEMA)?;
    let mut running: Vec<i64> = openings.iter().map(|(opening, _)| *opening).collect();
    let mut last: Vec<Option<i64>> = vec![None; cards.len()];
    let (mut world, mut world_last): (i64, Option<i64>) = (0, None);
    {
        let mut transaction = tx.prepare(
            "INSERT INTO transactions (id, kind, amount, \
             source, source_amount, source_balance_after, source_previous_id, \
             destination, destination_amount, destination_balance_after, destination_previous_id, \
             reference, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
        )?;
        let overflow = || unusable("a running balance beyond i64".into());
        let mut post = |id: i64,
                        kind: &str,
                        card: usize,
                        amount: i64,
                        reference: Option<&str>,
                        at: i64|
         -> Result<(), StoreError> {
            let name = cards[card].as_str();
            running[card] = running[card].checked_add(amount).ok_or_else(overflow)?;
            world = world.checked_sub(amount).ok_or_else(overflow)?;
            let card_leg = (name, amount, running[card], last[card]);
            let world_leg = (WORLD_ACCOUNT, -amount, world, world_last);
            let (source, destination) = if amount > 0 {
                (world_leg, card_leg)
            } else {
                (card_leg, world_leg)
            };
            transaction.execute(params![
                id,
                kind,
                amount.abs(),
                source.0,
                source.1,
                source.2,
                source.3,
                destination.0,
                destination.1,
                destination.2,
                destination.3,
                reference,
                at
            ])?;
            last[card] = Some(id);
            world_last = Some(id);
            Ok(())
        };
        for row in history {
            let kind = if row.amount > 0 { "deposit" } else { "withdrawal" };
            post(row.id, kind, row.card, row.amount, None, row.at_ms)?;
        }
        let mut next_id = history.last().map_or(1, |row| row.id + 1);
        let at = history.last().map_or(now_ms, |row| row.at_ms).max(now_ms);
        for (card, (_, adjustment)) in openings.iter().enumerate() {
            if *adjustment == 0 {
                continue;
            }
            post(
                next_id,
                "adjustment",
                card,
                *adjustment,
                Some("tallyd import: the Flask history did not add up to the balance"),
                at,
            )?;
            next_id += 1;
            report.adjusted_accounts += 1;
            report.adjusted_total += i128::from(*adjustment).abs();
        }
    }
    {
        let mut account = tx.prepare(
            "INSERT INTO ledger_accounts (name, opening_balance, balance, last_transaction_id, created_at_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let first_at = history.first().map_or(now_ms, |row| row.at_ms);
        for (i, card) in cards.iter().enumerate() {
            account.execute(params![
                card.as_str(),
                openings[i].0,
                running[i],
                last[i],
                first_at
            ])?;
        }
        tx.execute(
            "UPDATE ledger_accounts SET balance = ?1, last_transaction_id = ?2 WHERE name = ?3",
            params![world, world_last, WORLD_ACCOUNT],
        )?;
        // Every row above is current: nothing to replay at the first start.
        tx.execute(
            "UPDATE ledger_checkpoint SET transaction_id = (SELECT coalesce(max(id), 0) FROM transactions)",
            [],
        )?;
    }
    for (card, balance) in running.iter().zip(balances) {
        debug_assert_eq!(card, balance, "every account ends at its imported balance");
    }
    report.transactions = history.len() as u64;
    tx.commit()?;
    conn.close().map_err(|(_, error)| StoreError::from(error))?;
    std::fs::File::open(path)
        .and_then(|file| file.sync_all())
        .map_err(|error| unusable(format!("cannot sync {}: {error}", path.display())))?;
    Ok(())
}
