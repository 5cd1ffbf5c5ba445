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

/// Every account's balance is its opening balance plus its legs, the last leg says the balance,
/// no card is below its floor, and money is conserved (the outside world balances the cards).
pub fn assert_ledger_consistent(url: &str) {
    let wrong = query(
        url,
        "SELECT a.name, a.balance, a.opening_balance + coalesce(sum(e.amount), 0) \
         FROM ledger_accounts a LEFT JOIN entries e ON e.account = a.name \
         GROUP BY a.name HAVING a.balance <> a.opening_balance + coalesce(sum(e.amount), 0) LIMIT 5",
    );
    assert!(
        wrong.is_empty(),
        "balances that are not their legs' sum: {wrong:?}"
    );
    let heads = query(
        url,
        "SELECT a.name FROM ledger_accounts a JOIN entries e ON e.account = a.name \
         AND e.transaction_id = a.last_transaction_id WHERE e.balance_after <> a.balance LIMIT 5",
    );
    assert!(heads.is_empty(), "heads whose leg disagrees: {heads:?}");
    let below = query(
        url,
        "SELECT a.name FROM ledger_accounts a LEFT JOIN account_credit c ON c.name = a.name \
         WHERE a.name <> '@world' AND a.balance < -coalesce(c.overdraft_limit, 0) LIMIT 5",
    );
    assert!(below.is_empty(), "cards below their floor: {below:?}");
    let total = query(
        url,
        "SELECT sum(balance) - sum(opening_balance) FROM ledger_accounts",
    )[0][0]
        .clone()
        .unwrap_or_default();
    assert_eq!(total, "0", "money was created or lost");
}

/// How long `pg_ctl start` may wait for a cluster to accept connections (crash recovery included).
const START_WAIT_S: &str = "300";

/// The throwaway cluster of scripts/lib/postgres.sh (which exports `PG_BIN`, `PG_WORK` and
/// `PG_PORT`), for a test that stops PostgreSQL under load and starts it again.
pub struct Cluster {
    bin: PathBuf,
    work: PathBuf,
    port: String,
}

impl Cluster {
    pub fn from_env() -> Option<Cluster> {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        Some(Cluster {
            bin: PathBuf::from(var("PG_BIN")?),
            work: PathBuf::from(var("PG_WORK")?),
            port: var("PG_PORT")?,
        })
    }

    /// `pg_ctl stop -m immediate`: the server processes are killed, as in a crash; the next start
    /// recovers from the WAL.
    pub fn stop_immediately(&self) {
        self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
    }

    /// Starts the cluster again, as scripts/lib/postgres.sh first started it, waiting up to
    /// [`START_WAIT_S`] for its crash recovery.
    pub fn start(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c max_connections=200",
            self.port,
            self.work.display()
        );
        let log = self.work.join("server.log");
        self.pg_ctl(&[
            "start",
            "-w",
            "-t",
            START_WAIT_S,
            "-l",
            log.to_str().unwrap(),
            "-o",
            &options,
        ]);
    }

    /// Runs pg_ctl on the cluster as the postgres user (it refuses to run as root).
    fn pg_ctl(&self, args: &[&str]) {
        self.pg_ctl_on(&self.work.join("data"), args);
    }

    fn pg_ctl_on(&self, data: &Path, args: &[&str]) {
        assert!(self.try_pg_ctl_on(data, args), "pg_ctl {args:?} failed");
    }

    fn try_pg_ctl_on(&self, data: &Path, args: &[&str]) -> bool {
        self.as_postgres("pg_ctl")
            .arg("-D")
            .arg(data)
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }

    /// One of the cluster's binaries, run as the postgres user when the test runs as root.
    fn as_postgres(&self, binary: &str) -> std::process::Command {
        let path = self.bin.join(binary);
        if is_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            std::process::Command::new(path)
        }
    }

    /// A hot standby streaming from this cluster: `pg_basebackup -R` into the work directory
    /// (over the cluster's socket, where initdb's `local replication` rule lets it in), started on
    /// a free port. Stopped and removed when dropped.
    pub fn replica(&self, name: &str) -> Replica {
        let data = self.work.join(name);
        let status = self
            .as_postgres("pg_basebackup")
            .arg("-h")
            .arg(&self.work)
            .args(["-p", &self.port, "-U", "tallyd", "-X", "stream", "-R", "-D"])
            .arg(&data)
            .status()
            .expect("running pg_basebackup");
        assert!(status.success(), "pg_basebackup failed");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port()
            .to_string();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {port} -k {} -c max_connections=200",
            self.work.display()
        );
        let log = self.work.join(format!("{name}.log"));
        self.pg_ctl_on(
            &data,
            &[
                "start",
                "-w",
                "-t",
                "60",
                "-l",
                log.to_str().unwrap(),
                "-o",
                &options,
            ],
        );
        Replica {
            cluster: Cluster {
                bin: self.bin.clone(),
                work: self.work.clone(),
                port: self.port.clone(),
            },
            data,
            port,
        }
    }
}

/// A standby made by [`Cluster::replica`].
pub struct Replica {
    cluster: Cluster,
    data: PathBuf,
    pub port: String,
}

impl Replica {
    /// `url` (a database on the primary) with the replica's port instead.
    pub fn url_for(&self, url: &str) -> String {
        let (before, after) = url.split_once("@127.0.0.1:").expect("a URL on 127.0.0.1");
        let (_, database) = after.split_once('/').expect("a URL with a database");
        format!("{before}@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // No assertion here: a drop during a failing test's unwinding must not panic again.
        self.cluster
            .try_pg_ctl_on(&self.data, &["stop", "-m", "immediate", "-w"]);
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0")
}

/// Every key in `answered` (key -> the transaction id its client was answered) produced exactly one
/// transaction, under that id, and no other key produced any.
pub fn assert_every_key_once(url: &str, answered: &std::collections::BTreeMap<String, i64>) {
    let stored: std::collections::BTreeMap<String, (i64, i64)> = query(
        url,
        "SELECT idempotency_key, count(*), min(id) FROM transactions GROUP BY idempotency_key",
    )
    .into_iter()
    .map(|row| {
        let number = |at: usize| row[at].as_deref().unwrap().parse::<i64>().unwrap();
        (row[0].clone().unwrap_or_default(), (number(1), number(2)))
    })
    .collect();
    assert_eq!(
        stored.len(),
        answered.len(),
        "a transaction for every key, and no other"
    );
    for (key, id) in answered {
        assert_eq!(
            stored.get(key),
            Some(&(1, *id)),
            "{key}: once, under the id answered"
        );
    }
}
