//! The thread that keeps a running server's keys current: every [`limits::KEY_RELOAD_PERIOD`] it
//! re-reads the `api_keys` table (a few rows, from a WAL snapshot that never waits for the writer),
//! installs a new [`KeySet`] when anything but a use time changed, and writes back when keys were
//! last used.
//!
//! Why polling and not `PRAGMA data_version`: the version changes with every batch the engine
//! commits, so under load it would say "changed" on every poll anyway; reading the table is as
//! cheap as asking.
//!
//! Use times are written at most once per [`limits::KEY_LAST_USED_RESOLUTION`] per key (and on a
//! key's first use): every write from this connection makes the engine re-read its balances once
//! (it cannot tell a key's row from a balance edited in a `sqlite3` shell), so a write per request
//! would cost a reload per request.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rusqlite::Connection;

use super::{KeyRing, KeySet};
use crate::config::limits;
use crate::store::sqlite::keys as table;
use crate::store::StoreError;

/// Dropping it stops the thread (within one period).
pub struct Reloader {
    _stop: std::sync::mpsc::Sender<()>,
}

/// Reads the keys once (so that the server starts with them) and starts the thread.
/// Use times are handed to `touches`, for the engine's connection to write.
pub fn start(path: &Path, touches: table::KeyTouches) -> Result<(Arc<KeyRing>, Reloader), StoreError> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(limits::KEYS_BUSY_TIMEOUT)?;
    table::ensure_table(&conn)?;
    let ring = Arc::new(KeyRing::new(KeySet::build(
        table::all(&conn, limits::KEYS_MAX)?,
        &KeySet::default(),
    )));
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let shared = Arc::clone(&ring);
    std::thread::Builder::new()
        .name("tallyd-keys".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(limits::KEY_RELOAD_PERIOD)
            {
                if let Err(error) = reload_once(&mut conn, &shared, &touches) {
                    // The keys in force stay in force; the next period tries again.
                    tracing::warn!(%error, "re-reading the API keys failed");
                }
            }
        })
        .map_err(|error| StoreError::Unusable(format!("cannot start the key reload thread: {error}")))?;
    Ok((ring, Reloader { _stop: stop }))
}

/// One period's work: write back use times that are due, then re-read the table.
fn reload_once(conn: &mut Connection, ring: &KeyRing, touches: &table::KeyTouches) -> rusqlite::Result<()> {
    let set = ring.current();
    let resolution = i64::try_from(limits::KEY_LAST_USED_RESOLUTION.as_millis()).unwrap_or(i64::MAX);
    let due: Vec<(String, i64)> = set
        .keys()
        .filter_map(|key| {
            let used = key.last_used_ms.load(Ordering::Relaxed);
            let stored = key.stored_last_used_ms.load(Ordering::Relaxed);
            let first = stored == 0 && used > 0;
            (first || used.saturating_sub(stored) >= resolution).then(|| (key.name.to_string(), used))
        })
        .collect();
    if !due.is_empty() {
        if let Ok(mut pending) = touches.lock() {
            pending.extend(due.iter().cloned());
        }
        for key in set.keys() {
            if let Some((_, at)) = due.iter().find(|(name, _)| **name == *key.name) {
                key.stored_last_used_ms.store(*at, Ordering::Relaxed);
            }
        }
    }
    let rows = table::all(conn, limits::KEYS_MAX)?;
    let before = set.keys().count();
    if ring.update(rows) {
        let after = ring.current();
        tracing::info!(
            keys = after.keys().count(),
            before,
            "the API keys changed; the new set is in force"
        );
    }
    Ok(())
}
