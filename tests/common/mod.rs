//! Test harness: runs the real `tallyd` binary on an ephemeral port with a fresh database, and a
//! small HTTP/1.1 client over keep-alive connections.

#![allow(dead_code)] // each test binary uses part of the harness

pub mod postgres;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// How long to wait for the server to say where it listens.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for the server to exit after a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The demo card and its opening balance in the built-in seed.
pub const DEMO_CARD: &str = "1234567890";
pub const DEMO_OPENING: i64 = 100_000;

/// The n-th seeded load-test card (1-based) and its opening balance, as `users.db.sql` makes them.
pub fn seeded_card(n: u32) -> (String, i64) {
    (format!("4{n:015}"), 100_000 + i64::from(n % 1000) * 100)
}

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub db: PathBuf,
    /// Every line the server has logged so far.
    pub log: Arc<Mutex<String>>,
    /// Keeps the database directory alive as long as the server (none when the caller owns it).
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts `tallyd serve` on 127.0.0.1:0 with a new database and the given extra flags.
    pub fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = dir.path().join("users.db");
        let mut server = Self::start_on(&db, extra);
        server._dir = Some(dir);
        server
    }

    /// Starts the server on a database the caller keeps (so that it survives restarts).
    pub fn start_on(db: &Path, extra: &[&str]) -> Server {
        Self::start_with(db, "127.0.0.1:0", extra, "info")
    }

    /// Starts `tallyd serve --listen LISTEN` with `RUST_LOG=log_filter`. With `TALLYD_TEST_DB`
    /// set, the server runs on a PostgreSQL database of its own instead of the file `db` (the
    /// same one each time it is given the same `db`, so restarts keep their ledger).
    pub fn start_with(db: &Path, listen: &str, extra: &[&str], log_filter: &str) -> Server {
        Self::spawn(target(db), listen, extra, log_filter)
    }

    /// Starts the server on the SQLite file `db` whatever `TALLYD_TEST_DB` says (a test that
    /// moves a SQLite ledger to PostgreSQL needs both).
    pub fn start_on_sqlite(db: &Path, extra: &[&str]) -> Server {
        Self::spawn(db.to_owned(), "127.0.0.1:0", extra, "info")
    }

    /// Starts the server on `db` with extra environment variables (for example `PGSSLROOTCERT`).
    pub fn start_with_env(db: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        Self::spawn_with(target(db), "127.0.0.1:0", extra, "info", env)
    }

    fn spawn(db: PathBuf, listen: &str, extra: &[&str], log_filter: &str) -> Server {
        Self::spawn_with(db, listen, extra, log_filter, &[])
    }

    fn spawn_with(
        db: PathBuf,
        listen: &str,
        extra: &[&str],
        log_filter: &str,
        env: &[(&str, &str)],
    ) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .args(["serve", "--listen", listen, "--db"])
            .arg(&db)
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", log_filter)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tallyd");
        let log = Arc::new(Mutex::new(String::new()));
        let addr = listening_address(child.stderr.take().expect("piped stderr"), Arc::clone(&log));
        Server {
            child,
            addr,
            db,
            log,
            _dir: None,
        }
    }

    /// What the server has logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash: no drain, no clean close.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("-TERM");
        self.wait()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status();
        assert!(status.expect("running kill").success(), "kill {signal} failed");
    }

    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tallyd did not exit within {EXIT_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's database: the SQLite file, or its PostgreSQL database.
    pub fn sqlite(&self) -> Db {
        Db::open(&self.db)
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Runs `tallyd verify` on this server's database and returns its output, asserting success.
    pub fn verify(&self) -> String {
        verify(&self.db)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `--db` is for the file `db`: the file, or with `TALLYD_TEST_DB` the PostgreSQL database
/// that stands for it (the one a server started on `db` runs on).
pub fn target(db: &Path) -> PathBuf {
    postgres::database_for(db).map_or_else(|| db.to_owned(), PathBuf::from)
}

/// Runs `tallyd keys ARGS --db DB` and returns its output (not asserting success). With
/// `TALLYD_TEST_DB` it works on the database a server started on `db` runs on.
pub fn keys(db: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .arg("keys")
        .args(args)
        .arg("--db")
        .arg(target(db))
        .output()
        .expect("running tallyd keys")
}

/// `tallyd keys create --name NAME --scope SCOPE [EXTRA...]`: the new key, asserting success.
pub fn create_key(db: &Path, name: &str, scope: &str, extra: &[&str]) -> String {
    let mut args = vec!["create", "--name", name, "--scope", scope];
    args.extend_from_slice(extra);
    let output = keys(db, &args);
    assert!(
        output.status.success(),
        "keys create failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let key = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("tly_"), "{key}");
    key
}

/// `tallyd keys list`'s output, asserting success.
pub fn list_keys(db: &Path) -> Vec<u8> {
    let output = keys(db, &["list"]);
    assert!(output.status.success(), "keys list failed");
    output.stdout
}

/// `tallyd keys revoke NAME`, asserting success.
pub fn revoke_key(db: &Path, name: &str) {
    let output = keys(db, &["revoke", name]);
    assert!(
        output.status.success(),
        "keys revoke failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

pub fn verify(db: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["verify", "--db"])
        .arg(db)
        .output()
        .expect("running tallyd verify");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "tallyd verify failed:\n{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// Reads the server's log until it says where it listens; keeps draining it afterwards so that the
/// server never blocks on a full pipe.
fn listening_address(stderr: std::process::ChildStderr, log: Arc<Mutex<String>>) -> SocketAddr {
    let (found, address) = mpsc::channel();
    std::thread::spawn(move || {
        let mut found = Some(found);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            {
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
            if std::env::var_os("TALLYD_TEST_LOG").is_some() {
                eprintln!("[tallyd] {line}");
            }
            if let Some(rest) = line.split("listening addr=").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                if let Some(found) = found.take() {
                    let _ = found.send(addr);
                }
            }
        }
    });
    let text = address
        .recv_timeout(STARTUP_TIMEOUT)
        .expect("tallyd said where it listens");
    text.parse().expect("a socket address")
}

/// One keep-alive HTTP/1.1 connection.
pub struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
    /// Sent as `Authorization: Bearer <key>` with every request that does not carry its own.
    bearer: Option<String>,
}

/// A response, with the body parsed as JSON when it is JSON.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    /// The body exactly as it came off the wire (for byte-for-byte comparisons of replays).
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The `error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", self.text))
            .to_owned()
    }

    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// Whether the server says this answer is a replay of an idempotent request's first answer.
    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    /// `body[field]` as an integer, panicking with the body when it is not one.
    pub fn i64(&self, field: &str) -> i64 {
        self.json()[field]
            .as_i64()
            .unwrap_or_else(|| panic!("no integer {field} in {}", self.text))
    }
}

/// The JSON body of `POST /transfers`.
pub fn transfer_body(source: &str, destination: &str, amount: i64) -> String {
    format!(r#"{{"source":"{source}","destination":"{destination}","amount":{amount}}}"#)
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Self::try_connect(addr).await.expect("connecting to tallyd")
    }

    pub async fn try_connect(addr: SocketAddr) -> Result<Client, Box<dyn std::error::Error>> {
        let stream = TcpStream::connect(addr).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Client {
            sender,
            addr,
            bearer: None,
        })
    }

    /// Over any stream (a TLS one, say).
    pub async fn over<S>(stream: S, addr: SocketAddr) -> Result<Client, Box<dyn std::error::Error>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Client {
            sender,
            addr,
            bearer: None,
        })
    }

    /// This client sends `Authorization: Bearer key` from now on.
    pub fn with_bearer(mut self, key: &str) -> Client {
        self.bearer = Some(key.to_owned());
        self
    }

    pub async fn request(&mut self, request: Request<Full<Bytes>>) -> Reply {
        self.try_request(request).await.expect("a response")
    }

    /// Like `request`, but a broken connection is an `Err` rather than a panic (for crash tests).
    pub async fn try_request(&mut self, mut request: Request<Full<Bytes>>) -> Result<Reply, hyper::Error> {
        if let Some(key) = &self.bearer {
            if !request.headers().contains_key("authorization") {
                request
                    .headers_mut()
                    .insert("authorization", format!("Bearer {key}").parse().unwrap());
            }
        }
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status,
            headers: parts.headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
            body: bytes,
        })
    }

    /// A JSON `POST` with extra headers (an `Idempotency-Key`, say; a `content-type` given here
    /// replaces the JSON one).
    pub fn post_request(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
        let mut builder = Request::post(path).header("host", self.addr.to_string());
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
        {
            builder = builder.header("content-type", "application/json");
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
    }

    pub async fn post_with(&mut self, path: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let request = self.post_request(path, body, headers);
        self.request(request).await
    }

    /// `POST path` with `Idempotency-Key: key`.
    pub async fn post_keyed(&mut self, path: &str, body: &str, key: &str) -> Reply {
        self.post_with(path, body, &[("idempotency-key", key)]).await
    }

    pub async fn transfer(&mut self, source: &str, destination: &str, amount: i64) -> Reply {
        self.post_json("/transfers", &transfer_body(source, destination, amount))
            .await
    }

    /// `GET /accounts/{card}`'s balance, asserting a 200.
    pub async fn account_balance(&mut self, card: &str) -> i64 {
        let reply = self.get(&format!("/accounts/{card}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.i64("balance")
    }

    pub fn transaction_request(&self, card: &str, amount: i64) -> Request<Full<Bytes>> {
        Request::post("/transaction")
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"card_number":"{card}","amount":{amount}}}"#
            ))))
            .unwrap()
    }

    pub async fn get(&mut self, path: &str) -> Reply {
        let request = Request::get(path)
            .header("host", self.addr.to_string())
            .body(Full::default())
            .unwrap();
        self.request(request).await
    }

    pub async fn post_json(&mut self, path: &str, body: &str) -> Reply {
        let request = Request::post(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap();
        self.request(request).await
    }

    pub async fn transaction(&mut self, card: &str, amount: i64) -> Reply {
        self.post_json(
            "/transaction",
            &format!(r#"{{"card_number":"{card}","amount":{amount}}}"#),
        )
        .await
    }

    pub async fn balance(&mut self, card: &str) -> i64 {
        let reply = self.get(&format!("/balance?card_number={card}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        reply.json()["balance"].as_i64().expect("an integer balance")
    }
}

/// A bounded wait for an observable state of the server (a queue depth), polled every few
/// milliseconds: `while !condition { deadline.tick().await }`. Never a stand-in for a condition.
pub struct Deadline {
    until: Instant,
    what: &'static str,
}

impl Deadline {
    pub fn new(limit: Duration, what: &'static str) -> Self {
        Deadline {
            until: Instant::now() + limit,
            what,
        }
    }

    pub async fn tick(&self) {
        assert!(Instant::now() < self.until, "timed out waiting for {}", self.what);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Parses Prometheus text exposition into (series, value) pairs, checking every line's syntax.
pub fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    let mut series = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            if words.first() == Some(&"TYPE") {
                assert!(
                    matches!(
                        words.get(2),
                        Some(&("counter" | "gauge" | "histogram" | "summary" | "untyped"))
                    ),
                    "bad TYPE line: {line}"
                );
            }
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
        let metric = name.split('{').next().unwrap();
        assert!(
            metric
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !metric.is_empty(),
            "bad metric name: {line}"
        );
        if let Some(labels) = name.strip_prefix(metric) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels: {line}"
            );
        }
        series.push((name.to_owned(), value));
    }
    series
}

/// The value of one exact series, e.g. `tallyd_transactions_total{kind="deposit",outcome="committed"}`,
/// comparing label sets regardless of order.
pub fn series_value(series: &[(String, f64)], metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    series.iter().find_map(|(name, value)| {
        let (base, rest) = name.split_once('{').unwrap_or((name, "}"));
        if base != metric {
            return None;
        }
        let mut found: Vec<(String, String)> = rest
            .trim_end_matches('}')
            .split(',')
            .filter(|pair| !pair.is_empty())
            .map(|pair| {
                let (k, v) = pair.split_once('=').expect("label=value");
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        let mut wanted: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        found.sort();
        wanted.sort();
        (found == wanted).then_some(*value)
    })
}

/// xorshift64*: a tiny deterministic generator, seeded and printed so that a failure can be replayed.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A new generator for a task, drawn from this one.
    pub fn split(&mut self) -> Rng {
        Rng(self.next() | 1)
    }
}

/// The seed for a randomized test: `$var` if set, otherwise the clock; printed with how to replay it.
pub fn test_seed(test: &str, var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("{test}: seed {seed} ({var}={seed} replays it)");
    seed
}

/// A ledger database as the suites read it: SQLite's file, or the PostgreSQL database a server
/// runs on (with `TALLYD_TEST_DB`). The helpers below read both; a test that reads SQLite's own
/// tables through `Deref` says so by failing on PostgreSQL, loudly.
pub enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(String),
}

impl Db {
    /// The database that stands for the file `db` (see [`target`]), without a server.
    pub fn open(db: &Path) -> Db {
        let db = target(db);
        match db.to_str().filter(|db| db.starts_with("postgres://")) {
            Some(url) => Db::Postgres(url.to_owned()),
            None => Db::Sqlite(rusqlite::Connection::open(&db).expect("opening the database")),
        }
    }
}

impl std::ops::Deref for Db {
    type Target = rusqlite::Connection;

    fn deref(&self) -> &rusqlite::Connection {
        match self {
            Db::Sqlite(conn) => conn,
            Db::Postgres(url) => panic!("this test reads the SQLite file itself; it cannot run on {url}"),
        }
    }
}

impl std::ops::DerefMut for Db {
    fn deref_mut(&mut self) -> &mut rusqlite::Connection {
        match self {
            Db::Sqlite(conn) => conn,
            Db::Postgres(url) => panic!("this test reads the SQLite file itself; it cannot run on {url}"),
        }
    }
}

/// What the helpers need of a database: rows of (text, integer), in either dialect's common SQL.
pub trait LedgerDb {
    fn pairs(&self, sql: &str) -> Vec<(String, i64)>;
    fn integer(&self, sql: &str) -> i64;
    /// Rows of integers only.
    fn integers(&self, sql: &str) -> Vec<Vec<i64>>;
    /// A statement that changes rows (a test's own tampering).
    fn change(&self, sql: &str);
    /// Rows of any columns, each as text (NULL as the empty string), for the reader to parse.
    fn texts(&self, sql: &str) -> Vec<Vec<String>>;
}

impl LedgerDb for rusqlite::Connection {
    fn pairs(&self, sql: &str) -> Vec<(String, i64)> {
        self.prepare(sql)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn integer(&self, sql: &str) -> i64 {
        self.query_row(sql, [], |r| r.get(0)).unwrap()
    }

    fn integers(&self, sql: &str) -> Vec<Vec<i64>> {
        let mut statement = self.prepare(sql).unwrap();
        let columns = statement.column_count();
        statement
            .query_map([], |r| (0..columns).map(|at| r.get(at)).collect())
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn change(&self, sql: &str) {
        self.execute_batch(sql).unwrap();
    }

    fn texts(&self, sql: &str) -> Vec<Vec<String>> {
        use rusqlite::types::ValueRef;
        let mut statement = self.prepare(sql).unwrap();
        let columns = statement.column_count();
        statement
            .query_map([], |r| {
                (0..columns)
                    .map(|at| {
                        Ok(match r.get_ref(at)? {
                            ValueRef::Null => String::new(),
                            ValueRef::Integer(value) => value.to_string(),
                            ValueRef::Real(value) => value.to_string(),
                            ValueRef::Text(text) | ValueRef::Blob(text) => {
                                String::from_utf8_lossy(text).into_owned()
                            }
                        })
                    })
                    .collect()
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }
}

impl LedgerDb for Db {
    fn pairs(&self, sql: &str) -> Vec<(String, i64)> {
        match self {
            Db::Sqlite(conn) => conn.pairs(sql),
            Db::Postgres(url) => postgres::query(url, sql)
                .into_iter()
                .map(|row| {
                    let name = row[0].clone().unwrap_or_default();
                    (name, row[1].as_deref().unwrap_or("0").parse().unwrap())
                })
                .collect(),
        }
    }

    fn integer(&self, sql: &str) -> i64 {
        match self {
            Db::Sqlite(conn) => conn.integer(sql),
            Db::Postgres(url) => postgres::query(url, sql)[0][0]
                .as_deref()
                .unwrap_or("0")
                .parse()
                .unwrap(),
        }
    }

    fn integers(&self, sql: &str) -> Vec<Vec<i64>> {
        match self {
            Db::Sqlite(conn) => conn.integers(sql),
            Db::Postgres(url) => postgres::query(url, sql)
                .into_iter()
                .map(|row| {
                    row.iter()
                        .map(|v| v.as_deref().unwrap_or("0").parse().unwrap())
                        .collect()
                })
                .collect(),
        }
    }

    fn change(&self, sql: &str) {
        match self {
            Db::Sqlite(conn) => conn.change(sql),
            Db::Postgres(url) => postgres::execute(url, sql),
        }
    }

    fn texts(&self, sql: &str) -> Vec<Vec<String>> {
        match self {
            Db::Sqlite(conn) => conn.texts(sql),
            Db::Postgres(url) => postgres::query(url, sql)
                .into_iter()
                .map(|row| row.into_iter().map(Option::unwrap_or_default).collect())
                .collect(),
        }
    }
}

/// Every account's balance, `@world` included, recomputed from the database as its opening balance
/// plus the sum of its legs (`entries`), independently of any balance the store keeps: one pass
/// over the legs, whatever `entries` is (a table or a view).
pub fn db_balances(db: &impl LedgerDb) -> std::collections::BTreeMap<String, i64> {
    db.pairs(
        "SELECT a.name, a.opening_balance + coalesce(s.total, 0) FROM ledger_accounts a \
         LEFT JOIN (SELECT account, SUM(amount) AS total FROM entries GROUP BY account) s \
         ON s.account = a.name",
    )
    .into_iter()
    .collect()
}

/// The sum of every account's opening balance, and of every account's current balance, `@world`'s
/// included: double entry keeps them equal.
pub fn db_totals(db: &impl LedgerDb) -> (i128, i128) {
    let opening = db.integer("SELECT coalesce(sum(opening_balance), 0) FROM ledger_accounts");
    let current: i128 = db_balances(db).values().map(|b| i128::from(*b)).sum();
    (i128::from(opening), current)
}

/// How many transactions the database holds.
pub fn db_transactions(db: &impl LedgerDb) -> i64 {
    db.integer("SELECT count(*) FROM transactions")
}
