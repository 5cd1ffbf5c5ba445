//! The PostgreSQL backend: many tallyd instances on one database, and **the database decides**.
//!
//! `tallyd serve --db postgres://user:password@host:port/dbname` chooses it (a path keeps SQLite).
//!
//! What this backend guarantees, and how:
//! * **Schema.** tallyd creates or upgrades its schema at start, in one transaction, under a
//!   transaction-scoped advisory lock ([`migrate`]): two instances starting together apply each
//!   migration once, and the second sees the first's result. The migrations are the SQL files in
//!   `migrations/postgres/`, one per version, applied in order and recorded in `tallyd_migrations`;
//!   a database of a newer version than the binary knows is refused.
//! * **No balance is trusted from memory.** An instance keeps no balances between batches. A batch
//!   is one PostgreSQL transaction ([`crate::engine`]'s PostgreSQL workers): it locks the holds it
//!   names (`FOR UPDATE`, by id), then every account it touches (`FOR UPDATE`, by name in the "C"
//!   collation, the outside world included when it moves), always in that one global order, so
//!   batches on different instances wait for each other but never deadlock on each other. It
//!   reads the locked rows, their credit terms and its idempotency keys, builds a snapshot of just
//!   those rows and decides every command with the same rules as on SQLite
//!   ([`crate::engine::ledger`]), then writes with one multi-row statement per table (`UNNEST` of
//!   arrays, pipelined on the connection) and commits. Deadlocks (40P01), serialization failures
//!   (40001) and unique violations (23505: another instance opened the same account or used the
//!   same key at the same moment) roll the batch back and decide it again after a backoff, up to
//!   a bound; past it every command of the batch is answered 503 and nothing changed.
//! * **The outside world is one row.** Every deposit, withdrawal and capture to the outside world
//!   moves `@world`, whose balance and chain each leg records, so the batches that move it queue
//!   on its row lock, whichever instance they are on: across instances, such batches commit one
//!   at a time (each carrying as many commands as piled up meanwhile), while transfers between
//!   cards proceed side by side. Keeping the outside world's per-leg balance (as SQLite does, and
//!   as `verify` checks) is what costs this; spreading it over several rows would change the data
//!   model and is left for later.
//! * **Ids.** Transaction, key and hold ids are handed out in contiguous blocks from one row
//!   (`tallyd_ids`), on a second connection, after the batch holds its account locks: a batch that
//!   touches an account another batch holds takes its ids after that batch committed, so ids and
//!   times increase along every account's history as on SQLite. Ids are unique but not gapless
//!   (a refused command or a rolled-back batch leaves a gap). The block's own commit is
//!   asynchronous (`synchronous_commit = off`): the batch's commit record comes later in the WAL,
//!   so when the batch is durable its block is too, and a block lost in a crash was used by nothing
//!   durable.
//! * **Idempotency across instances.** `(scope, idempotency_key)` is unique. Two instances that get
//!   the same key at once both decide it; the second one's `INSERT` waits for the first one's
//!   transaction and fails with 23505 when it commits; its batch is decided again and replays the
//!   first one's answer, byte for byte. The key is stored in the same transaction as its effect.
//! * **A commit whose outcome is unknown** (the connection drops while `COMMIT` is in flight) is
//!   answered 503 and logged as such; clients retry with the same `Idempotency-Key`, which replays
//!   the answer if the commit did land.
//! * **Background jobs** (the holds sweeper and the idempotency-key pruning) run on every
//!   instance; each takes its rows with `FOR UPDATE SKIP LOCKED`, so instances share the work
//!   instead of queueing behind each other, and a hold is expired once.
//! * **TLS** when the URL says `sslmode=require`, the server's certificate always verified
//!   (chain and host name) against `PGSSLROOTCERT`'s CAs: see `tls_connector`.
//! * **Reads** come from a pool of their own, on the primary, or on a replica with `--read-db`
//!   (then a read may lag the writes it follows by the replica's replay lag).
//!
//! * **API keys** live in the database's `api_keys` table ([`keys`], schema version 2), as on
//!   SQLite: `tallyd keys --db postgres://...` manages them, and every instance re-reads the
//!   table every [`crate::config::limits::KEY_RELOAD_PERIOD`] ([`crate::auth::reload`]), so a key
//!   revoked through any instance's database is refused by all of them within a second.
//!
//! What it does not do yet: `/stats`' average balance is re-read once a second by one worker per instance
//! (a scan of the accounts), not kept up to date by each batch.

pub mod copy;
pub mod keys;
pub mod migrate;
pub mod reader;
pub mod rows;
pub mod verify;
pub mod write;

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use super::StoreError;

pub use reader::PgReader;

/// How long a batch waits for a pooled connection before it fails with 503.
pub const POOL_WAIT: Duration = Duration::from_secs(5);
/// Read connections per instance.
pub const READ_POOL_SIZE: usize = 16;
/// Longest a statement waits for a row lock (another instance's batch, or an operator's
/// transaction left open) before it fails with 55P03 and its batch is decided again; after
/// [`crate::engine`]'s attempts run out, 503. Without it a stuck lock holder would stall a
/// worker for good.
pub const LOCK_TIMEOUT_MS: u32 = 5_000;

/// Whether `--db` names a PostgreSQL database (a URL) rather than a SQLite file (a path).
pub fn is_url(db: &std::path::Path) -> bool {
    db.to_str()
        .is_some_and(|text| text.starts_with("postgres://") || text.starts_with("postgresql://"))
}

/// `db` as it may be logged: a URL's password replaced by `***`.
pub fn redacted(db: &std::path::Path) -> String {
    let text = db.display().to_string();
    if !is_url(db) {
        return text;
    }
    let Some((scheme, rest)) = text.split_once("://") else {
        return text;
    };
    match rest.split_once('@') {
        Some((user_info, host)) => {
            let user = user_info.split(':').next().unwrap_or_default();
            let hidden = if user_info.contains(':') { ":***" } else { "" };
            format!("{scheme}://{user}{hidden}@{host}")
        }
        None => text,
    }
}

/// A pool of `size` connections to `url`. Connections are made when first needed.
pub fn pool(url: &str, size: usize) -> Result<Pool, StoreError> {
    let mut config = tokio_postgres::Config::from_str(url)
        .map_err(|error| StoreError::Unusable(format!("not a PostgreSQL URL: {error}")))?;
    let options = format!(
        "{} -c lock_timeout={LOCK_TIMEOUT_MS}",
        config.get_options().unwrap_or_default()
    );
    config.options(options.trim_start());
    let manager_config = || ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls_connector(&config)? {
        Some(tls) => Manager::from_config(config, tls, manager_config()),
        None => Manager::from_config(config, NoTls, manager_config()),
    };
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(POOL_WAIT))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|error| StoreError::Unusable(format!("cannot make a connection pool: {error}")))
}

/// Where the CA certificates that a PostgreSQL server's certificate must chain to are read from,
/// as libpq reads them: `PGSSLROOTCERT`, else `~/.postgresql/root.crt`, else the system's bundle.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The TLS connector for `config`: `None` (plaintext) unless the URL says `sslmode=require`.
/// With TLS the server's certificate is always verified (chain and host name), stricter than
/// libpq's `require`, which encrypts without checking whom to: a payment ledger does not send its
/// writes to a server it has not authenticated.
fn tls_connector(
    config: &tokio_postgres::Config,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, StoreError> {
    if config.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
        return Ok(None);
    }
    let path = std::env::var_os("PGSSLROOTCERT")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            let path = std::path::Path::new(&home).join(".postgresql/root.crt");
            path.exists().then_some(path)
        })
        .unwrap_or_else(|| std::path::PathBuf::from(SYSTEM_CA_BUNDLE));
    let unusable = |what: String| {
        StoreError::Unusable(format!(
            "sslmode=require: {what} (set PGSSLROOTCERT to the CA's PEM file)"
        ))
    };
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let certificates = CertificateDer::pem_file_iter(&path)
        .map_err(|error| unusable(format!("cannot read {}: {error}", path.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates {
        let certificate = certificate.map_err(|error| unusable(format!("{}: {error}", path.display())))?;
        roots
            .add(certificate)
            .map_err(|error| unusable(format!("{}: {error}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(unusable(format!("{} holds no certificate", path.display())));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| unusable(error.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)))
}

/// One connection to `url` (plaintext or TLS, as [`pool`]'s), its driver spawned on the current
/// runtime; the handle ends when the connection does.
pub async fn connect(url: &str) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), StoreError> {
    let config = tokio_postgres::Config::from_str(url)
        .map_err(|error| StoreError::Unusable(format!("not a PostgreSQL URL: {error}")))?;
    let failed = |error: tokio_postgres::Error| StoreError::Unusable(describe(&error));
    match tls_connector(&config)? {
        Some(tls) => {
            let (client, connection) = config.connect(tls).await.map_err(failed)?;
            Ok((client, tokio::spawn(async move { drop(connection.await) })))
        }
        None => {
            let (client, connection) = config.connect(NoTls).await.map_err(failed)?;
            Ok((client, tokio::spawn(async move { drop(connection.await) })))
        }
    }
}

/// Whether the error says "decide the batch again": a deadlock, a serialization failure, or a
/// unique key another transaction took at the same moment. Nothing was written.
pub fn is_conflict(error: &tokio_postgres::Error) -> bool {
    matches!(
        error.code(),
        Some(code) if *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::UNIQUE_VIOLATION
            || *code == SqlState::LOCK_NOT_AVAILABLE
    )
}

/// The store error for a failed statement (not a failed `COMMIT`, whose outcome may be unknown).
pub fn store_error(error: &tokio_postgres::Error) -> StoreError {
    if is_conflict(error) {
        StoreError::Conflict(describe(error))
    } else {
        StoreError::Retryable(describe(error))
    }
}

/// The server's message when it sent one (the `Display` of tokio-postgres says only "db error").
pub fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => with_causes(error),
    }
}

/// An error and its causes, outermost first ("error performing TLS handshake: invalid peer
/// certificate: UnknownIssuer"): tokio-postgres' own message says only the first.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.ends_with(&inner_text) {
            text = format!("{text}: {inner_text}");
        }
        cause = inner.source();
    }
    text
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        StoreError::Retryable(format!("no PostgreSQL connection: {}", with_causes(&error)))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_url_is_logged_without_its_password() {
        let url = Path::new("postgres://tallyd:secret@127.0.0.1:5432/ledger");
        assert_eq!(redacted(url), "postgres://tallyd:***@127.0.0.1:5432/ledger");
        assert_eq!(redacted(Path::new("users.db")), "users.db");
        assert!(is_url(url) && !is_url(Path::new("postgres.db")));
    }
}
