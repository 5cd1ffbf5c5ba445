//! The `api_keys` table on PostgreSQL (migration `0002_api_keys.sql`): the same rows and the same
//! functions as SQLite's ([`crate::store::sqlite::keys`]), so that `tallyd keys` and the server's
//! reload thread treat both backends alike. Only a SHA-256 digest of each key is stored.
//!
//! Unlike SQLite's, the table is part of the migrated schema (there is no `CREATE TABLE IF NOT
//! EXISTS` at every open): PostgreSQL's migrations are versioned and applied under a lock, so the
//! table exists on every database a current tallyd has opened. And unlike SQLite's, a write here
//! costs the engine nothing (it keeps no balances between batches), so use times are written
//! straight from the reload thread, one statement per period for all keys that are due. Several
//! instances write them; `GREATEST` keeps each key's time from moving backwards whichever
//! instance writes last.

use deadpool_postgres::ClientWrapper as Client;
use tokio_postgres::Row;

pub use crate::store::sqlite::keys::KeyRow;

const SELECT_KEYS: &str = "SELECT name, scope, key_sha256, key_prefix, client_cert_cn, created_at_ms, \
     last_used_at_ms, revoked_at_ms FROM api_keys ORDER BY name COLLATE \"C\" LIMIT $1";
const INSERT_KEY: &str = "INSERT INTO api_keys \
     (name, scope, key_sha256, key_prefix, client_cert_cn, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6)";
const REVOKE_KEY: &str = "UPDATE api_keys SET revoked_at_ms = $2 WHERE name = $1 AND revoked_at_ms IS NULL";
/// The WHERE leaves a row alone that another instance already moved as far (no new row version
/// for nothing); GREATEST, which ignores a NULL, keeps the time monotonic even so.
const TOUCH_KEYS: &str = "UPDATE api_keys AS k SET last_used_at_ms = GREATEST(k.last_used_at_ms, u.at) \
     FROM UNNEST($1::text[], $2::bigint[]) AS u(name, at) \
     WHERE k.name = u.name AND (k.last_used_at_ms IS NULL OR k.last_used_at_ms < u.at)";

fn key_row(row: &Row) -> KeyRow {
    let digest: &[u8] = row.get(2);
    let mut key_sha256 = [0u8; 32];
    // The CHECK keeps it 32 bytes; a row edited by hand into another length matches no key.
    if digest.len() == 32 {
        key_sha256.copy_from_slice(digest);
    }
    KeyRow {
        name: row.get(0),
        scope: row.get(1),
        key_sha256,
        key_prefix: row.get(3),
        client_cert_cn: row.get(4),
        created_at_ms: row.get(5),
        last_used_at_ms: row.get(6),
        revoked_at_ms: row.get(7),
    }
}

/// Every key, revoked ones included, at most `rows_max` of them, by name (bytewise, as SQLite
/// orders them, so that a re-read compares equal to the set in force).
pub async fn all(client: &Client, rows_max: usize) -> Result<Vec<KeyRow>, tokio_postgres::Error> {
    let limit = i64::try_from(rows_max).unwrap_or(i64::MAX);
    let statement = client.prepare_cached(SELECT_KEYS).await?;
    Ok(client
        .query(&statement, &[&limit])
        .await?
        .iter()
        .map(key_row)
        .collect())
}

/// How many keys exist, revoked ones included.
pub async fn count(client: &Client) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one("SELECT count(*) FROM api_keys", &[])
        .await?
        .get(0))
}

/// Whether a key (revoked or not) already has this name.
pub async fn exists(client: &Client, name: &str) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_opt("SELECT 1 FROM api_keys WHERE name = $1", &[&name])
        .await?
        .is_some())
}

/// Inserts a new key (the caller checked that the name is free and the row is valid; a name
/// taken meanwhile by another `tallyd keys` fails on the primary key).
pub async fn insert(client: &Client, row: &KeyRow) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            INSERT_KEY,
            &[
                &row.name,
                &row.scope,
                &&row.key_sha256[..],
                &row.key_prefix,
                &row.client_cert_cn,
                &row.created_at_ms,
            ],
        )
        .await?;
    Ok(())
}

/// Marks the key revoked; false if there is no such key or it was revoked already.
pub async fn revoke(client: &Client, name: &str, at_unix_ms: i64) -> Result<bool, tokio_postgres::Error> {
    Ok(client.execute(REVOKE_KEY, &[&name, &at_unix_ms]).await? == 1)
}

/// Copies whole rows (use and revocation times too) in one statement, for `tallyd migrate`.
pub async fn copy_in(
    client: &impl tokio_postgres::GenericClient,
    rows: &[KeyRow],
) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let texts = |pick: fn(&KeyRow) -> &str| rows.iter().map(pick).collect::<Vec<_>>();
    let names = texts(|row| &row.name);
    let scopes = texts(|row| &row.scope);
    let prefixes = texts(|row| &row.key_prefix);
    let cns: Vec<Option<&str>> = rows.iter().map(|row| row.client_cert_cn.as_deref()).collect();
    let digests: Vec<&[u8]> = rows.iter().map(|row| &row.key_sha256[..]).collect();
    let created: Vec<i64> = rows.iter().map(|row| row.created_at_ms).collect();
    let used: Vec<Option<i64>> = rows.iter().map(|row| row.last_used_at_ms).collect();
    let revoked: Vec<Option<i64>> = rows.iter().map(|row| row.revoked_at_ms).collect();
    client
        .execute(
            "INSERT INTO api_keys (name, scope, key_sha256, key_prefix, client_cert_cn, created_at_ms, \
             last_used_at_ms, revoked_at_ms) SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], \
             $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[])",
            &[
                &names, &scopes, &digests, &prefixes, &cns, &created, &used, &revoked,
            ],
        )
        .await?;
    Ok(())
}

/// Records when each key was last used, in one statement; never moves a time backwards.
pub async fn touch(client: &Client, used: &[(String, i64)]) -> Result<(), tokio_postgres::Error> {
    if used.is_empty() {
        return Ok(());
    }
    let (names, times): (Vec<&str>, Vec<i64>) = used.iter().map(|(name, at)| (name.as_str(), *at)).unzip();
    let statement = client.prepare_cached(TOUCH_KEYS).await?;
    client.execute(&statement, &[&names, &times]).await?;
    Ok(())
}
