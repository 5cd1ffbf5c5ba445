//! The thread that keeps a running server's keys current: every [`limits::KEY_RELOAD_PERIOD`] it
//! re-reads the `api_keys` table (a few rows), installs a new [`KeySet`] when anything but a use
//! time changed, and writes back when keys were last used.
//!
//! One thread and one loop for both backends; what differs is the table behind [`KeyTable`]:
//! [`SqliteKeys`] reads from a WAL snapshot that never waits for the writer and hands use times to
//! the engine's connection; [`PgKeys`] reads and writes on a connection of its own.
//!
//! Why polling and not `PRAGMA data_version` (or PostgreSQL's `LISTEN`): the version changes with
//! every batch the engine commits, so under load it would say "changed" on every poll anyway;
//! reading the table is as cheap as asking. On PostgreSQL a notification would also be lost while
//! the connection is down; a poll just tries again.
//!
//! Use times are written at most once per [`limits::KEY_LAST_USED_RESOLUTION`] per key (and on a
//! key's first use): on SQLite every write from this connection makes the engine re-read its
//! balances once (it cannot tell a key's row from a balance edited in a `sqlite3` shell), so a
//! write per request would cost a reload per request; on PostgreSQL it would be a write per
//! request per instance for a timestamp nobody needs to the millisecond.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rusqlite::Connection;

use super::{KeyRing, KeySet};
use crate::config::limits;
use crate::store::postgres::{self, keys as pg_table};
use crate::store::sqlite::keys as table;
use crate::store::StoreError;

/// A table of keys the reload thread can poll. Both methods block (the thread is not async).
pub trait KeyTable: Send + 'static {
    /// Every key, revoked ones included (at most [`limits::KEYS_MAX`]), in an order that is the
    /// same from one read to the next.
    fn read(&mut self) -> Result<Vec<table::KeyRow>, StoreError>;
    /// Records these (key name, Unix ms) use times, never moving a stored time backwards. Once it
    /// returns `Ok`, the caller takes them as written.
    fn record_use(&mut self, used: &[(String, i64)]) -> Result<(), StoreError>;
}

/// The SQLite file's table: read on a connection of its own, use times queued for the engine's
/// connection, which writes them inside its next write transaction (see [`table`]).
pub struct SqliteKeys {
    conn: Connection,
    touches: table::KeyTouches,
}

impl SqliteKeys {
    /// Opens the table (creating it when the file has none yet).
    pub fn open(path: &Path, touches: table::KeyTouches) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(limits::KEYS_BUSY_TIMEOUT)?;
        table::ensure_table(&conn)?;
        Ok(Self { conn, touches })
    }
}

impl KeyTable for SqliteKeys {
    fn read(&mut self) -> Result<Vec<table::KeyRow>, StoreError> {
        Ok(table::all(&self.conn, limits::KEYS_MAX)?)
    }

    fn record_use(&mut self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if let Ok(mut pending) = self.touches.lock() {
            pending.extend(used.iter().cloned());
        }
        Ok(())
    }
}

/// The PostgreSQL database's table, on a pool of one connection (made again by the pool when the
/// database restarts), driven by the server's runtime.
pub struct PgKeys {
    pool: deadpool_postgres::Pool,
    /// The server's runtime, which the pool's connection runs on.
    runtime: tokio::runtime::Handle,
}

impl PgKeys {
    pub fn new(url: &str, runtime: tokio::runtime::Handle) -> Result<Self, StoreError> {
        Ok(Self {
            pool: postgres::pool(url, 1)?,
            runtime,
        })
    }
}

impl KeyTable for PgKeys {
    fn read(&mut self) -> Result<Vec<table::KeyRow>, StoreError> {
        self.runtime.block_on(bounded(async {
            let client = self.pool.get().await?;
            pg_table::all(&client, limits::KEYS_MAX)
                .await
                .map_err(|error| postgres::store_error(&error))
        }))
    }

    fn record_use(&mut self, used: &[(String, i64)]) -> Result<(), StoreError> {
        self.runtime.block_on(bounded(async {
            let client = self.pool.get().await?;
            pg_table::touch(&client, used)
                .await
                .map_err(|error| postgres::store_error(&error))
        }))
    }
}

/// `work`, given up after [`limits::KEY_TABLE_TIMEOUT`]: a database that stopped answering must
/// not stall the thread (the keys in force stay in force, and the next period tries again).
async fn bounded<T>(work: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(limits::KEY_TABLE_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Retryable(format!(
                "the API keys were not read or written within {:?}",
                limits::KEY_TABLE_TIMEOUT
            )))
        })
}

/// Dropping it stops the thread and waits for it: at once, or when the read or write under way
/// ends (bounded by [`limits::KEY_TABLE_TIMEOUT`] on PostgreSQL). Waiting matters there: the
/// thread drives its connection on the server's runtime, which must outlive it.
pub struct Reloader {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Reloader {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads the keys once (so that the server starts with them) and starts the thread. Blocks: call
/// it off the runtime's worker threads (`spawn_blocking`) when `keys` is a [`PgKeys`].
pub fn start(mut keys: impl KeyTable) -> Result<(Arc<KeyRing>, Reloader), StoreError> {
    let ring = Arc::new(KeyRing::new(KeySet::build(keys.read()?, &KeySet::default())));
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let shared = Arc::clone(&ring);
    let thread = std::thread::Builder::new()
        .name("tallyd-keys".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(limits::KEY_RELOAD_PERIOD)
            {
                if let Err(error) = reload_once(&mut keys, &shared) {
                    // The keys in force stay in force; the next period tries again.
                    tracing::warn!(%error, "re-reading the API keys failed");
                }
            }
        })
        .map_err(|error| StoreError::Unusable(format!("cannot start the key reload thread: {error}")))?;
    Ok((
        ring,
        Reloader {
            stop: Some(stop),
            thread: Some(thread),
        },
    ))
}

/// One period's work: write back use times that are due, then re-read the table.
fn reload_once(keys: &mut impl KeyTable, ring: &KeyRing) -> Result<(), StoreError> {
    let set = ring.current();
    let due = due_uses(&set);
    if !due.is_empty() {
        // A failed write must not keep the table from being read: a revocation is what matters.
        match keys.record_use(&due) {
            Ok(()) => {
                for key in set.keys() {
                    if let Some((_, at)) = due.iter().find(|(name, _)| **name == *key.name) {
                        key.stored_last_used_ms.store(*at, Ordering::Relaxed);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "writing the API keys' use times failed; the next period tries again")
            }
        }
    }
    let rows = keys.read()?;
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

/// The use times to write now: a key's first use, and any use a resolution past the stored one.
fn due_uses(set: &KeySet) -> Vec<(String, i64)> {
    let resolution = i64::try_from(limits::KEY_LAST_USED_RESOLUTION.as_millis()).unwrap_or(i64::MAX);
    set.keys()
        .filter_map(|key| {
            let used = key.last_used_ms.load(Ordering::Relaxed);
            let stored = key.stored_last_used_ms.load(Ordering::Relaxed);
            let first = stored == 0 && used > 0;
            (first || used.saturating_sub(stored) >= resolution).then(|| (key.name.to_string(), used))
        })
        .collect()
}
