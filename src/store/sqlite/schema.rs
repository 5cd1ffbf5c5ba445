//! What a database file holds, and making it the current schema: a new file is created and
//! seeded, a file of versions 1 to 3 is upgraded in place (in one transaction), and anything
//! else is refused untouched.

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use crate::store::StoreError;

/// The schema this binary writes (`PRAGMA user_version`).
pub const VERSION: i64 = 4;

pub(super) const SCHEMA: &str = concat!(include_str!("schema.sql"), include_str!("holds.sql"));
const MIGRATE_V1_TO_V2: &str = include_str!("migrate_v1_to_v2.sql");
const MIGRATE_V2_TO_V3: &str = include_str!("migrate_v2_to_v3.sql");
const HOLDS: &str = include_str!("holds.sql");

/// The CHECKs of version 3 that kept every card at zero or above; an overdraft limit may take a
/// balance below zero, so version 4 has none (tallyd decides, `tallyd verify` checks).
const V3_NONNEGATIVE_CHECKS: [&str; 3] = [
    "CHECK (balance >= 0 OR name = '@world')",
    "CHECK (source_balance_after >= 0 OR source = '@world')",
    "CHECK (destination_balance_after >= 0 OR destination = '@world')",
];

/// The first step of the version-1 upgrade: move the old tables out of the new names' way.
const V1_SET_ASIDE: &str = "DROP TRIGGER journal_rows_are_immutable; \
     DROP TRIGGER journal_rows_are_permanent; \
     ALTER TABLE accounts RENAME TO v1_accounts; \
     ALTER TABLE journal RENAME TO v1_journal;";

/// Version 1's invariants, which the upgrade relies on: balances match the journal, row by row.
const V1_BROKEN_ROWS: &str = "SELECT \
     (SELECT count(*) FROM accounts a LEFT JOIN \
        (SELECT card_number, SUM(amount) AS total FROM journal GROUP BY card_number) j \
        ON j.card_number = a.card_number \
      WHERE a.balance <> a.opening_balance + coalesce(j.total, 0)) + \
     (SELECT count(*) FROM (SELECT j.balance_after, a.opening_balance + SUM(j.amount) OVER \
        (PARTITION BY j.card_number ORDER BY j.id) AS expected \
        FROM journal j JOIN accounts a ON a.card_number = j.card_number) WHERE balance_after <> expected) + \
     (SELECT count(*) FROM journal WHERE card_number NOT IN (SELECT card_number FROM accounts))";

/// What a file holds.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// No tables and no schema version: a new or empty file.
    Empty,
    /// A database of the releases before the double-entry ledger.
    Version1,
    /// The ledger with balances written in every commit and idempotency keys in a B-tree.
    Version2,
    /// The ledger before holds and credit limits.
    Version3,
    Current,
    Newer(i64),
    /// Tables, but not tallyd's: another program's database.
    Foreign(Vec<String>),
}

fn inspect(conn: &Connection) -> Result<Found, StoreError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_schema WHERE type IN ('table', 'view') \
         AND name NOT LIKE 'sqlite_%' ORDER BY name",
    )?;
    let names: Vec<String> = stmt.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
    let has = |wanted: &[&str]| wanted.iter().all(|name| names.iter().any(|n| n == name));
    Ok(if version > VERSION {
        Found::Newer(version)
    } else if names.is_empty() && version == 0 {
        Found::Empty
    } else if version == VERSION && has(&["ledger_accounts", "transactions", "entries", "idempotency_keys"]) {
        Found::Current
    } else if version == 3 && has(&["ledger_accounts", "transactions", "entries", "idempotency_keys"]) {
        Found::Version3
    } else if version == 2 && has(&["ledger_accounts", "transactions", "entries", "idempotency_keys"]) {
        Found::Version2
    } else if version == 1 && has(&["accounts", "journal"]) {
        Found::Version1
    } else {
        Found::Foreign(names)
    })
}

/// Makes the file at `path` a current tallyd database, or says why it will not.
pub fn prepare(conn: &mut Connection, path: &Path, seed: Option<&Path>) -> Result<(), StoreError> {
    let db = path.display();
    match inspect(conn)? {
        Found::Current => Ok(()),
        Found::Empty => {
            let seed_sql = match seed {
                Some(file) => std::fs::read_to_string(file).map_err(|error| {
                    StoreError::Unusable(format!("cannot read the seed file {}: {error}", file.display()))
                })?,
                None => super::BUILTIN_SEED.to_owned(),
            };
            // A seed that brings its own tables is a version-1 seed: load it alone, then upgrade.
            let own_schema = seed_sql.to_ascii_uppercase().contains("CREATE TABLE");
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !own_schema {
                tx.execute_batch(SCHEMA)?;
            }
            tx.execute_batch(&seed_sql).map_err(|error| {
                let reason = error.to_string();
                let reason = reason.lines().next().unwrap_or_default().to_owned();
                StoreError::Unusable(format!(
                    "the seed does not load into schema version {VERSION}: {reason}"
                ))
            })?;
            tx.commit()?;
            tracing::info!(db = %db, "created a new database from the seed");
            if own_schema {
                return prepare(conn, path, None);
            }
            Ok(())
        }
        Found::Version1 => upgrade_from_v1(conn, path),
        Found::Version2 => upgrade_from_v2(conn, path),
        Found::Version3 => upgrade_from_v3(conn, path),
        Found::Newer(version) => Err(StoreError::Unusable(format!(
            "{db} has schema version {version}, newer than this tallyd's ({VERSION}); run a newer release"
        ))),
        Found::Foreign(tables) => Err(StoreError::Unusable(format!(
            "{db} is not a tallyd database (it holds {}); tallyd will not write to it. \
             If it is the Flask transaction processor's database, import it into a new file: \
             tallyd import --from {db} --db tallyd.db",
            list(&tables)
        ))),
    }
}

/// Version 1 to the current schema, in one transaction: every journal row becomes a deposit or a
/// withdrawal with the same id; nothing is changed if anything fails.
fn upgrade_from_v1(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let broken: i64 = tx.query_row(V1_BROKEN_ROWS, [], |row| row.get(0))?;
    if broken != 0 {
        return Err(StoreError::Unusable(format!(
            "{} is a version-1 database whose balances do not match its journal ({broken} rows); \
             it was not upgraded. Run `tallyd verify` with the release that wrote it",
            path.display()
        )));
    }
    let rows: i64 = tx.query_row("SELECT count(*) FROM journal", [], |row| row.get(0))?;
    tx.execute_batch(V1_SET_ASIDE)?;
    tx.execute_batch(SCHEMA)?;
    tx.execute_batch(MIGRATE_V1_TO_V2)?;
    tx.commit()?;
    tracing::info!(db = %path.display(), journal_rows = rows, "upgraded the database from schema version 1 to {VERSION}");
    Ok(())
}

/// Version 2 to the current schema, in one transaction: the balance checkpoint is set at the last
/// transaction (version 2 wrote every balance in its commit) and the idempotency records are
/// appended anew; then as from version 3.
fn upgrade_from_v2(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(MIGRATE_V2_TO_V3)?;
    add_holds(&tx, path)?;
    tx.commit()?;
    tracing::info!(db = %path.display(), "upgraded the database from schema version 2 to {VERSION}");
    Ok(())
}

/// Version 3 to 4, in one transaction: see [`add_holds`].
fn upgrade_from_v3(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    add_holds(&tx, path)?;
    tx.commit()?;
    tracing::info!(db = %path.display(), "upgraded the database from schema version 3 to {VERSION}");
    Ok(())
}

/// The tables of holds and credit limits, and the nonnegative CHECKs gone. Removing a CHECK
/// changes nothing on disk, so it is done the way SQLite documents for that case (an edit of the
/// table's text in `sqlite_schema`, with the schema version bumped) instead of copying tables of
/// millions of rows.
fn add_holds(tx: &rusqlite::Transaction<'_>, path: &Path) -> Result<(), StoreError> {
    let schema_version: i64 = tx.query_row("PRAGMA schema_version", [], |row| row.get(0))?;
    tx.execute_batch("PRAGMA writable_schema = ON")?;
    let mut edit = String::from("sql");
    for check in V3_NONNEGATIVE_CHECKS {
        edit = format!("replace({edit}, '{}', '')", check.replace('\'', "''"));
    }
    let edited = tx.execute(
        &format!("UPDATE sqlite_schema SET sql = {edit} WHERE type = 'table' AND name IN ('ledger_accounts', 'transactions')"),
        [],
    );
    tx.execute_batch(&format!(
        "PRAGMA schema_version = {}; PRAGMA writable_schema = OFF;",
        schema_version + 1
    ))?;
    edited?;
    let left: i64 = tx.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' \
         AND name IN ('ledger_accounts', 'transactions') \
         AND (instr(sql, 'CHECK (balance >= 0') > 0 OR instr(sql, 'balance_after >= 0') > 0)",
        [],
        |row| row.get(0),
    )?;
    if left != 0 {
        return Err(StoreError::Unusable(format!(
            "{}: the accounts' CHECK constraints are not version 3's; it was not upgraded",
            path.display()
        )));
    }
    tx.execute_batch(HOLDS)?;
    tx.execute_batch(&format!("PRAGMA user_version = {VERSION}"))?;
    Ok(())
}

fn list(tables: &[String]) -> String {
    const SHOWN_MAX: usize = 8;
    let shown: Vec<&str> = tables.iter().take(SHOWN_MAX).map(String::as_str).collect();
    let more = tables.len().saturating_sub(SHOWN_MAX);
    if tables.is_empty() {
        return "no tables, but a schema version another program set".to_owned();
    }
    let mut text = format!("tables {}", shown.join(", "));
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(conn: &Connection) -> i64 {
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
            .unwrap()
    }

    #[test]
    fn a_version_1_seed_makes_a_database_that_is_upgraded_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/users-v1.sql");
        let mut conn = Connection::open(&path).unwrap();
        prepare(&mut conn, &path, Some(&seed)).unwrap();
        assert_eq!(inspect(&conn).unwrap(), Found::Current);
        let cards: i64 = conn
            .query_row("SELECT count(*) FROM accounts", [], |row| row.get(0))
            .unwrap();
        assert_eq!(cards, 100_001);
    }

    #[test]
    fn newer_and_foreign_databases_are_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE users (card_number TEXT PRIMARY KEY, balance INTEGER);")
            .unwrap();
        let before = tables(&conn);
        let error = prepare(&mut conn, &path, None).unwrap_err().to_string();
        assert!(
            error.contains("not a tallyd database") && error.contains("users"),
            "{error}"
        );
        assert_eq!(tables(&conn), before);
        conn.execute_batch("DROP TABLE users; PRAGMA user_version = 5; CREATE TABLE t (x);")
            .unwrap();
        let error = prepare(&mut conn, &path, None).unwrap_err().to_string();
        assert!(error.contains("schema version 5"), "{error}");
    }
}
