//! Starting a server on PostgreSQL: the schema migrated before we listen, the pools, the API keys
//! and their reload thread, the engine's PostgreSQL workers; then the same accept loop and
//! shutdown order as on SQLite ([`crate::server::serve`]).

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::auth::reload::{self, PgKeys};
use crate::config::Config;
use crate::engine::{Engine, Pools};
use crate::http;
use crate::server::{check_exposure, serve, Backend, ServerError};
use crate::store::postgres::{self, migrate, PgReader};
use crate::store::StoreError;

/// The pools of a migrated database.
pub struct Opened {
    pools: Pools,
    read: deadpool_postgres::Pool,
}

/// Migrates the schema (seeding a new database) and makes the pools.
pub async fn open(config: &Config) -> Result<Opened, ServerError> {
    let url = url_of(&config.db)?;
    let workers = usize::from(config.workers);
    // One connection per worker for its transactions, one for the id blocks it takes.
    let write = postgres::pool(url, workers)?;
    let ids = postgres::pool(url, workers)?;
    let read = match &config.read_db {
        Some(replica) => postgres::pool(replica, postgres::READ_POOL_SIZE)?,
        None => postgres::pool(url, postgres::READ_POOL_SIZE)?,
    };
    let seed = match &config.seed {
        Some(file) => Some(std::fs::read_to_string(file).map_err(|error| {
            StoreError::Unusable(format!("cannot read the seed file {}: {error}", file.display()))
        })?),
        None => None,
    };
    let prepared = migrate::prepare(&write, seed.as_deref()).await?;
    tracing::info!(version = prepared.version, "the PostgreSQL schema is current");
    Ok(Opened {
        pools: Pools { write, ids },
        read,
    })
}

fn url_of(db: &std::path::Path) -> Result<&str, StoreError> {
    db.to_str()
        .ok_or_else(|| StoreError::Unusable("the database URL is not UTF-8".into()))
}

/// Serves the opened database on `listener` until `shutdown`.
pub async fn run(
    listener: TcpListener,
    opened: Opened,
    config: Config,
    shutdown: impl Future<Output = ()>,
    started: std::time::Instant,
) -> Result<(), ServerError> {
    let address = listener.local_addr().map_err(ServerError::Listen)?;
    // Keys first, from the database's api_keys table, as on SQLite: a server that would be open to
    // the network refuses before it does anything else. Every instance on the database polls the
    // table, so a key created or revoked through any of them is in force on all within a period.
    let (keys, reloader) = {
        let table = PgKeys::new(url_of(&config.db)?, tokio::runtime::Handle::current())?;
        // The first read blocks on the runtime's handle, which a worker thread may not do.
        tokio::task::spawn_blocking(move || reload::start(table))
            .await
            .expect("reading the API keys does not panic")?
    };
    check_exposure(&config, address, keys.current().required())?;
    let reader = Arc::new(PgReader::new(opened.read, tokio::runtime::Handle::current()));
    let credit = {
        let reader = Arc::clone(&reader);
        Arc::new(move |card: &crate::domain::CardNumber| {
            reader.credit(card).unwrap_or_else(|error| {
                tracing::warn!(%error, "reading an account's credit terms failed");
                crate::store::Credit::default()
            })
        })
    };
    let (engine, workers) = Engine::start_postgres(opened.pools, &config, http::render, credit);
    let backend = Backend {
        engine,
        workers,
        reader,
        keys,
        _guard: Box::new(reloader),
    };
    serve(listener, backend, config, shutdown, started).await
}
