//! The `api_keys` table: who may call tallyd. Only a SHA-256 digest of each key is stored, never
//! the key.
//!
//! The table lives in the ledger's database (so a backup of the file carries its keys) but stands
//! apart from the ledger's schema: it is created with `CREATE TABLE IF NOT EXISTS` whenever tallyd
//! or `tallyd keys` opens the file, and does not change `PRAGMA user_version`, so the ledger's
//! schema upgrades never have to know about it. A revoked key keeps its row (and its name, which
//! is never given to another key: idempotency keys are scoped by key name, so a new key under an
//! old name could replay the old key's answers).
//!
//! `tallyd keys` writes from another process, which bumps the engine's `PRAGMA data_version` and
//! makes it re-read every balance once (seconds at ten million accounts), so it happens only when
//! an operator creates or revokes a key. The server's own writes here (`last_used_at_ms`, coarse:
//! [`crate::config::limits::KEY_LAST_USED_RESOLUTION`]) go through the engine's connection
//! instead, queued in [`KeyTouches`] and written inside its next write transaction, so they are
//! never taken for an outside change.

use rusqlite::{params, Connection, OptionalExtension};

/// The table. `name` is the key's public identity (in metrics, logs and idempotency scopes).
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS api_keys (
    name             TEXT    PRIMARY KEY NOT NULL,
    scope            TEXT    NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    key_sha256       BLOB    NOT NULL UNIQUE CHECK (length(key_sha256) = 32),
    key_prefix       TEXT    NOT NULL,
    client_cert_cn   TEXT,
    created_at_ms    INTEGER NOT NULL,
    last_used_at_ms  INTEGER,
    revoked_at_ms    INTEGER
) STRICT";

/// One row of `api_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    pub name: String,
    /// `read`, `write` or `admin` (the CHECK admits nothing else).
    pub scope: String,
    pub key_sha256: [u8; 32],
    /// The first characters of the key, to tell keys apart in `tallyd keys list`.
    pub key_prefix: String,
    /// When set, the key is only accepted over mutual TLS from a certificate with this common name.
    pub client_cert_cn: Option<String>,
    pub created_at_ms: i64,
    pub last_used_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

const SELECT_KEYS: &str = "SELECT name, scope, key_sha256, key_prefix, client_cert_cn, created_at_ms, \
     last_used_at_ms, revoked_at_ms FROM api_keys ORDER BY name LIMIT ?1";
const INSERT_KEY: &str = "INSERT INTO api_keys \
     (name, scope, key_sha256, key_prefix, client_cert_cn, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
const REVOKE_KEY: &str = "UPDATE api_keys SET revoked_at_ms = ?2 WHERE name = ?1 AND revoked_at_ms IS NULL";
const TOUCH_KEY: &str = "UPDATE api_keys SET last_used_at_ms = ?2 \
     WHERE name = ?1 AND (last_used_at_ms IS NULL OR last_used_at_ms < ?2)";

/// Creates the table if this file does not have it yet.
pub fn ensure_table(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(CREATE_TABLE)
}

/// Every key, revoked ones included, at most `rows_max` of them, by name.
pub fn all(conn: &Connection, rows_max: usize) -> rusqlite::Result<Vec<KeyRow>> {
    let mut stmt = conn.prepare_cached(SELECT_KEYS)?;
    let rows = stmt.query_map([i64::try_from(rows_max).unwrap_or(i64::MAX)], |row| {
        let digest: Vec<u8> = row.get(2)?;
        let mut key_sha256 = [0u8; 32];
        // The CHECK keeps it 32 bytes; a row edited by hand into another length matches no key.
        if digest.len() == 32 {
            key_sha256.copy_from_slice(&digest);
        }
        Ok(KeyRow {
            name: row.get(0)?,
            scope: row.get(1)?,
            key_sha256,
            key_prefix: row.get(3)?,
            client_cert_cn: row.get(4)?,
            created_at_ms: row.get(5)?,
            last_used_at_ms: row.get(6)?,
            revoked_at_ms: row.get(7)?,
        })
    })?;
    rows.collect()
}

/// How many keys exist, revoked ones included.
pub fn count(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT count(*) FROM api_keys", [], |row| row.get(0))
}

/// Whether a key (revoked or not) already has this name.
pub fn exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    Ok(conn
        .query_row("SELECT 1 FROM api_keys WHERE name = ?1", [name], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Inserts a new key (the caller checked that the name is free and the row is valid).
pub fn insert(conn: &Connection, row: &KeyRow) -> rusqlite::Result<()> {
    conn.execute(
        INSERT_KEY,
        params![
            row.name,
            row.scope,
            &row.key_sha256[..],
            row.key_prefix,
            row.client_cert_cn,
            row.created_at_ms
        ],
    )?;
    Ok(())
}

/// Marks the key revoked; false if there is no such key or it was revoked already.
pub fn revoke(conn: &Connection, name: &str, at_unix_ms: i64) -> rusqlite::Result<bool> {
    Ok(conn.execute(REVOKE_KEY, params![name, at_unix_ms])? == 1)
}

/// Records when each key was last used, in one transaction; never moves a time backwards.
/// Use times waiting to be written by the engine's connection: (key name, Unix ms).
pub type KeyTouches = std::sync::Arc<std::sync::Mutex<Vec<(String, i64)>>>;

/// Writes the queued use times inside `tx` (the engine's write transaction).
pub fn apply_touches(tx: &rusqlite::Transaction<'_>, touches: &KeyTouches) -> rusqlite::Result<()> {
    let pending = match touches.lock() {
        Ok(mut pending) if !pending.is_empty() => std::mem::take(&mut *pending),
        _ => return Ok(()),
    };
    let mut stmt = tx.prepare_cached(TOUCH_KEY)?;
    for (name, at) in &pending {
        stmt.execute(params![name, at])?;
    }
    Ok(())
}

pub fn touch(conn: &mut Connection, used: &[(String, i64)]) -> rusqlite::Result<()> {
    if used.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(TOUCH_KEY)?;
        for (name, at) in used {
            stmt.execute(params![name, at])?;
        }
    }
    tx.commit()
}
