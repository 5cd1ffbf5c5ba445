//! API keys themselves: their format, digest, names and scopes, and the `tallyd keys` commands
//! that create, list and revoke them in a database, a SQLite file or a PostgreSQL URL (also while
//! `serve` runs on it).
//!
//! A key is `tly_` and 64 lowercase hex digits: 256 bits from the operating system's random source
//! (`getrandom`). The prefix makes a leaked key easy to recognise (in a log, a repository, a secret
//! scanner). Only its SHA-256 digest is stored: a key has far too much entropy to be guessed from
//! its digest, so a slow password hash would only cost time on every request.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use sha2::{Digest, Sha256};

use crate::config::{limits, KeysArgs, KeysCommand};
use crate::store::postgres::{self as pg, keys as pg_table};
use crate::store::sqlite::keys as table;
pub use crate::store::sqlite::keys::KeyRow;

/// The SHA-256 digest of a key: what is stored and looked up.
pub type KeyDigest = [u8; 32];

/// What every key starts with.
pub const KEY_PREFIX: &str = "tly_";
/// Random bytes in a key (256 bits; the issue asks for at least 128).
pub const KEY_RANDOM_BYTES: usize = 32;
/// Characters of a key shown by `tallyd keys list` after the prefix (16 of its 256 bits).
const KEY_SHOWN_HEX: usize = 4;
/// Longest key name. Names are labels in metrics and parts of idempotency scopes, so they are
/// short and plain: lowercase letters, digits, `-`, `_` and `.`, starting with a letter or digit.
pub const KEY_NAME_BYTES_MAX: usize = 64;
/// Longest common name a key may be bound to.
const CERT_CN_BYTES_MAX: usize = 255;

/// What a key may do. Each scope allows everything the one before it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scope {
    /// `GET` every read route, `/metrics`, `/stats` and the live page.
    Read,
    /// Also every `POST`: move money, open accounts, place and resolve holds, batches.
    Write,
    /// Also change accounts' overdraft limits (`PATCH /accounts/{card}`).
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "read" => Scope::Read,
            "write" => Scope::Write,
            "admin" => Scope::Admin,
            _ => return None,
        })
    }

    /// Whether a key of this scope may call a route that needs `needed`.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

/// The digest a key is stored and found under.
pub fn digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// A new key from the operating system's random source.
pub fn generate() -> Result<String, getrandom::Error> {
    let mut random = [0u8; KEY_RANDOM_BYTES];
    getrandom::fill(&mut random)?;
    let mut key = String::with_capacity(KEY_PREFIX.len() + 2 * KEY_RANDOM_BYTES);
    key.push_str(KEY_PREFIX);
    for byte in random {
        key.push_str(&format!("{byte:02x}"));
    }
    Ok(key)
}

/// Whether `name` may name a key.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=KEY_NAME_BYTES_MAX).contains(&bytes.len())
        && bytes[0].is_ascii_lowercase() | bytes[0].is_ascii_digit()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{0}")]
    Invalid(String),
    #[error("the database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("the database: {0}")]
    Postgres(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

/// `tallyd keys ...`: prints what it did; the new key alone on stdout, everything else on stderr.
pub fn run(args: &KeysArgs) -> Result<std::process::ExitCode, KeysError> {
    let table = open(&args.db)?;
    // A URL's password is never printed.
    let shown = crate::store::postgres::redacted(&args.db);
    let mut out = std::io::stdout().lock();
    match &args.command {
        KeysCommand::Create {
            name,
            scope,
            client_cert_cn,
        } => {
            let key = create(&table, name, *scope, client_cert_cn.as_deref())?;
            writeln!(out, "{key}")?;
            eprintln!(
                "created key {name} (scope {}) in {shown}; this is the only time it is shown: store it now",
                scope.as_str(),
            );
        }
        KeysCommand::List => {
            writeln!(
                out,
                "{:<24} {:<6} {:<10} {:<24} {:<24} {:<24} client_cert_cn",
                "name", "scope", "key", "created", "last_used", "revoked"
            )?;
            for row in table.all()? {
                let time = |ms: Option<i64>| ms.map_or_else(|| "-".to_owned(), format_unix_ms);
                writeln!(
                    out,
                    "{:<24} {:<6} {:<10} {:<24} {:<24} {:<24} {}",
                    row.name,
                    row.scope,
                    format!("{}…", row.key_prefix),
                    format_unix_ms(row.created_at_ms),
                    time(row.last_used_at_ms),
                    time(row.revoked_at_ms),
                    row.client_cert_cn.as_deref().unwrap_or("-"),
                )?;
            }
        }
        KeysCommand::Revoke { name } => {
            if !table.revoke(name, crate::unix_ms_now())? {
                return Err(KeysError::Invalid(if table.exists(name)? {
                    format!("the key {name} is revoked already")
                } else {
                    format!("there is no key named {name}")
                }));
            }
            eprintln!(
                "revoked key {name}; a running tallyd refuses it within {} ms",
                limits::KEY_RELOAD_PERIOD.as_millis() * 2
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Makes a key and stores its digest; returns the key, which exists nowhere else.
pub fn create(
    table: &Table,
    name: &str,
    scope: Scope,
    client_cert_cn: Option<&str>,
) -> Result<String, KeysError> {
    if !valid_name(name) {
        return Err(KeysError::Invalid(format!(
            "a key name is 1 to {KEY_NAME_BYTES_MAX} lowercase letters, digits, '-', '_' or '.', \
             starting with a letter or digit; {name:?} is not"
        )));
    }
    if let Some(cn) = client_cert_cn {
        if cn.is_empty() || cn.len() > CERT_CN_BYTES_MAX || cn.chars().any(char::is_control) {
            return Err(KeysError::Invalid(format!(
                "--client-cert-cn must be 1 to {CERT_CN_BYTES_MAX} bytes without control characters"
            )));
        }
    }
    if table.exists(name)? {
        return Err(KeysError::Invalid(format!(
            "a key named {name} exists (or existed: a revoked key's name is never reused, so that its \
             idempotency keys stay its own); choose another name"
        )));
    }
    if table.count()? >= limits::KEYS_MAX as i64 {
        return Err(KeysError::Invalid(format!(
            "the database holds {} keys, the most tallyd serves; revoked keys count too",
            limits::KEYS_MAX
        )));
    }
    let key = generate().map_err(|error| KeysError::Random(error.to_string()))?;
    table.insert(&KeyRow {
        name: name.to_owned(),
        scope: scope.as_str().to_owned(),
        key_sha256: digest(key.as_bytes()),
        key_prefix: key[..KEY_PREFIX.len() + KEY_SHOWN_HEX].to_owned(),
        client_cert_cn: client_cert_cn.map(str::to_owned),
        created_at_ms: crate::unix_ms_now(),
        last_used_at_ms: None,
        revoked_at_ms: None,
    })?;
    Ok(key)
}

/// The `api_keys` table that `tallyd keys` works on: in the SQLite file, or in the PostgreSQL
/// database a `postgres://` URL names (as `serve --db` chooses).
pub enum Table {
    Sqlite(Connection),
    Postgres(PgTable),
}

/// A PostgreSQL database's key table: one connection, and the runtime it runs on (the command is
/// otherwise synchronous, as the SQLite one is).
pub struct PgTable {
    /// Declared first, so that it closes while the runtime still runs.
    client: deadpool_postgres::Object,
    runtime: tokio::runtime::Runtime,
}

impl PgTable {
    /// Runs one of [`pg_table`]'s statements, bounded by [`limits::KEY_TABLE_TIMEOUT`].
    fn block_on<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, KeysError> {
        self.runtime.block_on(async {
            match tokio::time::timeout(limits::KEY_TABLE_TIMEOUT, work).await {
                Ok(result) => result.map_err(|error| KeysError::Postgres(pg::describe(&error))),
                Err(_) => Err(KeysError::Postgres(format!(
                    "no answer within {:?}",
                    limits::KEY_TABLE_TIMEOUT
                ))),
            }
        })
    }
}

impl Table {
    /// Every key, revoked ones included, by name.
    pub fn all(&self) -> Result<Vec<KeyRow>, KeysError> {
        match self {
            Table::Sqlite(conn) => Ok(table::all(conn, limits::KEYS_MAX)?),
            Table::Postgres(pg) => pg.block_on(pg_table::all(&pg.client, limits::KEYS_MAX)),
        }
    }

    /// How many keys exist, revoked ones included.
    pub fn count(&self) -> Result<i64, KeysError> {
        match self {
            Table::Sqlite(conn) => Ok(table::count(conn)?),
            Table::Postgres(pg) => pg.block_on(pg_table::count(&pg.client)),
        }
    }

    /// Whether a key (revoked or not) already has this name.
    pub fn exists(&self, name: &str) -> Result<bool, KeysError> {
        match self {
            Table::Sqlite(conn) => Ok(table::exists(conn, name)?),
            Table::Postgres(pg) => pg.block_on(pg_table::exists(&pg.client, name)),
        }
    }

    fn insert(&self, row: &KeyRow) -> Result<(), KeysError> {
        match self {
            Table::Sqlite(conn) => Ok(table::insert(conn, row)?),
            Table::Postgres(pg) => pg.block_on(pg_table::insert(&pg.client, row)),
        }
    }

    /// Marks the key revoked; false if there is no such key or it was revoked already.
    pub fn revoke(&self, name: &str, at_unix_ms: i64) -> Result<bool, KeysError> {
        match self {
            Table::Sqlite(conn) => Ok(table::revoke(conn, name, at_unix_ms)?),
            Table::Postgres(pg) => pg.block_on(pg_table::revoke(&pg.client, name, at_unix_ms)),
        }
    }
}

/// Opens the database for key management, a SQLite file or a PostgreSQL URL: a database that is
/// not a tallyd database yet is first made one (seeded, exactly as `serve` would), so that keys
/// can be created before the first start.
pub fn open(db: &Path) -> Result<Table, KeysError> {
    if pg::is_url(db) {
        return open_postgres(db).map(Table::Postgres);
    }
    open_sqlite(db).map(Table::Sqlite)
}

/// A missing or empty file is made a tallyd database first. A running server holds the writer
/// lock, but then the file exists and is never re-created here.
fn open_sqlite(path: &Path) -> Result<Connection, KeysError> {
    let empty = std::fs::metadata(path).map_or(true, |meta| meta.len() == 0);
    if empty {
        let store = crate::store::sqlite::SqliteStore::open(
            path,
            crate::config::Durability::Full,
            limits::KEYS_BUSY_TIMEOUT,
            None,
            Duration::ZERO,
        )?;
        drop(store);
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(limits::KEYS_BUSY_TIMEOUT)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version < 1 {
        return Err(KeysError::Invalid(format!(
            "{} is not a tallyd database; keys are kept in tallyd's own database",
            path.display()
        )));
    }
    table::ensure_table(&conn)?;
    Ok(conn)
}

/// The schema is brought to the newest version first, as `serve` does at start (under the same
/// advisory lock, so a server starting meanwhile is no problem): a new database gets its ledger
/// and seed, an older one the `api_keys` table.
fn open_postgres(db: &Path) -> Result<PgTable, KeysError> {
    let url = db
        .to_str()
        .ok_or_else(|| KeysError::Invalid("the database URL is not UTF-8".into()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| KeysError::Postgres(format!("cannot start a runtime: {error}")))?;
    let client = runtime.block_on(async {
        let pool = pg::pool(url, 1)?;
        pg::migrate::prepare(&pool, None).await?;
        Ok::<_, crate::store::StoreError>(pool.get().await?)
    })?;
    Ok(PgTable { client, runtime })
}

/// A Unix time in milliseconds as `YYYY-MM-DDTHH:MM:SSZ` (UTC), without a date library.
pub fn format_unix_ms(ms: i64) -> String {
    let seconds = ms.div_euclid(1000);
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_random_hex_and_never_repeat() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_PREFIX.len() + 2 * KEY_RANDOM_BYTES);
        assert!(a.starts_with(KEY_PREFIX));
        assert!(a[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_ne!(digest(a.as_bytes()), digest(b.as_bytes()));
    }

    #[test]
    fn names_are_short_plain_labels() {
        for good in [
            "checkout",
            "a",
            "ci-1",
            "svc_2.prod",
            &"x".repeat(KEY_NAME_BYTES_MAX),
        ] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            "Checkout",
            "-a",
            "a b",
            "a/b",
            "a\"b",
            "é",
            &"x".repeat(KEY_NAME_BYTES_MAX + 1),
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn scopes_are_ordered() {
        assert!(Scope::Admin.allows(Scope::Write) && Scope::Write.allows(Scope::Read));
        assert!(!Scope::Read.allows(Scope::Write) && !Scope::Write.allows(Scope::Admin));
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(format_unix_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_unix_ms(1_767_225_599_000), "2025-12-31T23:59:59Z");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29T00:00:00Z");
    }
}
