//! The suites on PostgreSQL: with `TALLYD_TEST_DB=postgres://user:password@host:port/dbname` set
//! (scripts/ci-postgres.sh sets it), every server the harness starts gets a fresh database of its
//! own on that server, made by cloning nothing: `CREATE DATABASE`, and tallyd migrates and seeds
//! it at start. Unset, everything runs on SQLite as before.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// The PostgreSQL server the suites run against, if any.
pub fn base_url() -> Option<String> {
    std::env::var("TALLYD_TEST_DB").ok().filter(|url| !url.is_empty())
}

/// True when the suites run on PostgreSQL.
pub fn enabled() -> bool {
    base_url().is_some()
}

/// Skips the rest of a test that checks something only SQLite has (the file, its lock, its
/// write-back), saying so, when the suites run on PostgreSQL.
#[macro_export]
macro_rules! sqlite_only {
    () => {
        if $crate::common::postgres::enabled() {
            eprintln!("skipped on PostgreSQL: this test checks the SQLite store itself");
            return;
        }
    };
}

static DATABASES: Mutex<Option<HashMap<PathBuf, String>>> = Mutex::new(None);
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The URL of the database that stands for the SQLite file `db` (made on first use); `None` when
/// the suites run on SQLite.
pub fn database_for(db: &Path) -> Option<String> {
    let base = base_url()?;
    if let Some(url) = db.to_str().filter(|text| text.starts_with("postgres://")) {
        // Already a database of its own (a test that starts two servers on one).
        return Some(url.to_owned());
    }
    let mut databases = DATABASES.lock().unwrap();
    let databases = databases.get_or_insert_with(HashMap::new);
    if let Some(url) = databases.get(db) {
        return Some(url.clone());
    }
    let name = format!(
        "tallyd_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    execute(&base, &format!("CREATE DATABASE {name}"));
    let url = with_database(&base, &name);
    databases.insert(db.to_owned(), url.clone());
    Some(url)
}

/// `base` with its database name replaced by `name`.
pub fn with_database(base: &str, name: &str) -> String {
    let (server, _) = base.rsplit_once('/').expect("a URL with a database name");
    format!("{server}/{name}")
}

/// Runs one statement on `url`, off any runtime the caller is in.
pub fn execute(url: &str, sql: &str) {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|error| panic!("connecting to {url}: {error}"));
            tokio::spawn(connection);
            client
                .batch_execute(&sql)
                .await
                .unwrap_or_else(|error| panic!("{sql}: {error:?}"));
        });
    })
    .join()
    .expect("the statement ran");
}

/// Runs a query on `url` and returns its rows as text (simple protocol), off any runtime.
pub fn query(url: &str, sql: &str) -> Vec<Vec<Option<String>>> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|error| panic!("connecting to {url}: {error}"));
            tokio::spawn(connection);
            client
                .simple_query(&sql)
                .await
                .unwrap_or_else(|error| panic!("{sql}: {error:?}"))
                .into_iter()
                .filter_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        Some((0..row.len()).map(|at| row.get(at).map(str::to_owned)).collect())
                    }
                    _ => None,
                })
                .collect()
        })
    })
    .join()
    .expect("the query ran")
}
