//! Creating and upgrading the schema: the files of `migrations/postgres/`, one per version, applied
//! in order in one transaction under an advisory lock, each recorded in `tallyd_migrations`.
//!
//! Why a transaction-scoped advisory lock and not a lock on `tallyd_migrations`: on a new database
//! the table does not exist yet, and two instances starting together would both create it. The
//! advisory lock exists before any table does; the second instance waits for it, then finds the
//! first one's versions recorded and applies nothing. PostgreSQL's DDL is transactional, so a
//! migration that fails leaves the database as it was.

use deadpool_postgres::Pool;

use super::describe;
use crate::store::StoreError;

/// One schema version: its number, name and SQL.
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every version, in order. A new version is a new file here and nothing else.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "0001_ledger.sql",
        sql: include_str!("../../../migrations/postgres/0001_ledger.sql"),
    },
    Migration {
        version: 2,
        name: "0002_api_keys.sql",
        sql: include_str!("../../../migrations/postgres/0002_api_keys.sql"),
    },
    Migration {
        version: 3,
        name: "0003_ledger_archive.sql",
        sql: include_str!("../../../migrations/postgres/0003_ledger_archive.sql"),
    },
];

/// The accounts a new database starts with (as `users.db.sql` on SQLite).
pub const SEED: &str = include_str!("../../../migrations/postgres/seed.sql");

/// The advisory lock's key: "tallyd" in ASCII, so that it is unlikely to collide with another
/// program's on a shared database.
pub const MIGRATION_LOCK_KEY: i64 = 0x7461_6c6c_7964;

/// What [`prepare`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The versions applied now (empty when the schema was current).
    pub applied: Vec<i32>,
    /// The schema version now.
    pub version: i32,
}

/// Brings the database to the newest version, seeding it (with `seed`, or [`SEED`]) when it was
/// empty. Refuses a database of a newer version than this binary knows.
pub async fn prepare(pool: &Pool, seed: Option<&str>) -> Result<Prepared, StoreError> {
    let mut client = pool.get().await?;
    let tx = client
        .transaction()
        .await
        .map_err(|error| unusable("cannot start the migration", error))?;
    let prepared = prepare_in(&tx, seed).await?;
    tx.commit()
        .await
        .map_err(|error| unusable("cannot commit the migration", error))?;
    if !prepared.applied.is_empty() {
        tracing::info!(versions = ?prepared.applied, "migrated the PostgreSQL schema");
    }
    Ok(prepared)
}

fn unusable(what: &str, error: tokio_postgres::Error) -> StoreError {
    StoreError::Unusable(format!("{what}: {}", describe(&error)))
}

/// [`prepare`] inside the caller's transaction (`tallyd migrate` creates the schema and copies a
/// ledger into it in one). Takes the advisory lock, held until that transaction ends.
pub async fn prepare_in(
    tx: &tokio_postgres::Transaction<'_>,
    seed: Option<&str>,
) -> Result<Prepared, StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(|error| unusable("cannot take the migration lock", error))?;
    // A current database answers the CREATE below with a NOTICE ("already exists, skipping"),
    // which tokio-postgres logs at info on every start and every `tallyd keys`: it says nothing.
    tx.batch_execute("SET LOCAL client_min_messages = warning")
        .await
        .map_err(|error| unusable("cannot prepare the migration", error))?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tallyd_migrations (
             version    integer     NOT NULL PRIMARY KEY,
             name       text        NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(|error| unusable("cannot record migrations", error))?;
    let current: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM tallyd_migrations", &[])
        .await
        .map_err(|error| unusable("cannot read the schema version", error))?
        .get(0);
    let newest = MIGRATIONS.last().map_or(0, |migration| migration.version);
    if current > newest {
        return Err(StoreError::Unusable(format!(
            "the database has schema version {current}, newer than this tallyd knows ({newest}): upgrade tallyd"
        )));
    }
    let mut applied = Vec::new();
    for migration in MIGRATIONS.iter().filter(|migration| migration.version > current) {
        tx.batch_execute(migration.sql)
            .await
            .map_err(|error| unusable(&format!("migration {} failed", migration.name), error))?;
        tx.execute(
            "INSERT INTO tallyd_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await
        .map_err(|error| unusable("cannot record a migration", error))?;
        applied.push(migration.version);
    }
    if current == 0 {
        tx.batch_execute(seed.unwrap_or(SEED))
            .await
            .map_err(|error| unusable("the seed does not load", error))?;
    }
    Ok(Prepared {
        applied,
        version: newest,
    })
}
