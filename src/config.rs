//! Command line and environment: every setting and every limit, named, defaulted and
//! range-checked here so that the rest of the program can trust them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// tallyd: a durable, high-throughput HTTP card-transaction server.
#[derive(Debug, Parser)]
#[command(name = "tallyd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server.
    Serve(Config),
    /// Check every invariant of a database file and exit non-zero on any mismatch.
    Verify(VerifyArgs),
    /// Make a new tallyd database from the Flask transaction processor's users.db.
    Import(ImportArgs),
    /// Create, list and revoke API keys (works while `serve` runs on the same database).
    Keys(KeysArgs),
    /// Move the transactions below an id to an archive file; each account's balance just before
    /// becomes its opening balance. `serve` must be stopped.
    Archive(ArchiveArgs),
    /// Copy a whole SQLite ledger into a new PostgreSQL database, in one transaction, ids kept;
    /// then verify the copy.
    Migrate(MigrateArgs),
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The SQLite ledger to copy (only read; stop the server on it first to move it for good).
    #[arg(long)]
    pub from: PathBuf,
    /// The new PostgreSQL database: postgres://user:password@host:port/dbname (it must hold no
    /// tallyd ledger yet).
    #[arg(long)]
    pub to: PathBuf,
}

#[derive(Debug, Args)]
pub struct ArchiveArgs {
    /// The tallyd database to archive from.
    #[arg(long, env = "TALLYD_DB", default_value = "users.db")]
    pub db: PathBuf,
    /// Archive every transaction with an id below this one.
    #[arg(long)]
    pub before_id: i64,
    /// The archive database to create (it must not exist).
    #[arg(long)]
    pub to: PathBuf,
}

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// The tallyd database the keys are kept in (created and seeded if it does not exist).
    #[arg(long, env = "TALLYD_DB", default_value = "users.db", global = true)]
    pub db: PathBuf,
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new key and print it, once, on stdout; only its SHA-256 digest is stored.
    Create {
        /// The key's name: what metrics, logs and `keys list` show (lowercase letters, digits, - _ .).
        #[arg(long)]
        name: String,
        /// What the key may do: read (GET), write (also POST), admin (also account limits).
        #[arg(long, value_enum)]
        scope: crate::auth::keys::Scope,
        /// Accept the key only over mutual TLS from a client certificate with this subject common name.
        #[arg(long)]
        client_cert_cn: Option<String>,
    },
    /// Show every key: name, scope, first characters, created, last used, revoked.
    List,
    /// Revoke a key by name; a running server refuses it within a second.
    Revoke {
        /// The key's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The Flask processor's SQLite database (tables users and transactions); only read.
    #[arg(long)]
    pub from: PathBuf,
    /// The tallyd database to create; it must not exist yet.
    #[arg(long, env = "TALLYD_DB", default_value = "tallyd.db")]
    pub db: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The SQLite database to check, or a postgres:// URL.
    #[arg(long, env = "TALLYD_DB", default_value = "users.db")]
    pub db: PathBuf,
}

/// How far a commit must reach before a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    /// fsync the write-ahead log before answering: an answered transaction survives power loss.
    Full,
    /// Answer once the commit is in the operating system's cache. Survives a crash of tallyd,
    /// but the last batches before a power loss or kernel crash may be lost.
    Normal,
}

/// Every setting of `tallyd serve`. Ranges are enforced while parsing, so a `Config` that exists
/// is valid.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "TALLYD_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// SQLite database file; created from the seed if it does not exist. A
    /// `postgres://user:password@host:port/dbname` URL chooses PostgreSQL instead (schema created
    /// or migrated at start).
    #[arg(long, env = "TALLYD_DB", default_value = "users.db")]
    pub db: PathBuf,

    /// PostgreSQL only: a `postgres://` URL of a replica that the read routes use (they may lag
    /// the writes by the replica's replay lag); by default reads use `--db`.
    #[arg(long, env = "TALLYD_READ_DB")]
    pub read_db: Option<String>,

    /// SQL file that creates the schema and seed accounts of a new database
    /// [default: the users.db.sql built into the binary].
    #[arg(long, env = "TALLYD_SEED")]
    pub seed: Option<PathBuf>,

    /// Worker threads that commit batches (they take turns on SQLite's single writer).
    #[arg(long, env = "TALLYD_WORKERS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,

    /// Transactions that may wait in the queue; beyond it requests get 503 queue_full.
    #[arg(long, env = "TALLYD_QUEUE_DEPTH", default_value_t = 8192,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub queue_depth: u32,

    /// Most transactions committed together in one batch.
    #[arg(long, env = "TALLYD_BATCH_MAX", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub batch_max: u32,

    /// Longest a worker waits for more transactions before committing a batch that is not full,
    /// in microseconds (0: commit whatever is waiting at once).
    #[arg(long, env = "TALLYD_BATCH_WAIT_US", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub batch_wait_us: u32,

    /// `full` fsyncs before answering; `normal` may lose the last batches on power loss.
    #[arg(long, env = "TALLYD_DURABILITY", value_enum, default_value_t = Durability::Full)]
    pub durability: Durability,

    /// Most transfers in one `POST /transfers/bulk` (and in each commit of an NDJSON one); more get
    /// 413. Its body limit grows with it: see [`Config::bulk_body_limit_bytes`].
    #[arg(long, env = "TALLYD_BULK_ITEMS_MAX", default_value_t = 8190,
          value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub bulk_items_max: u32,

    /// Largest request body accepted; larger ones get 413.
    #[arg(long, env = "TALLYD_BODY_LIMIT_BYTES", default_value_t = 1 << 20,
          value_parser = clap::value_parser!(u32).range(64..=(16 << 20)))]
    pub body_limit_bytes: u32,

    /// How long a hold lasts when `POST /holds` gives no `expires_in_s`, in seconds (7 days; at
    /// most 30 days, as for `expires_in_s`).
    #[arg(long, env = "TALLYD_HOLD_EXPIRY_S", default_value_t = 7 * 24 * 3600,
          value_parser = clap::value_parser!(u32).range(1..=30 * 24 * 3600))]
    pub hold_expiry_s: u32,

    /// Most items in one all-or-nothing `POST /batches`.
    #[arg(long, env = "TALLYD_BATCH_ITEMS_MAX", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub batch_items_max: u32,

    /// Longest time a client may take to send a request body, in milliseconds.
    #[arg(long, env = "TALLYD_REQUEST_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(10..=600_000))]
    pub request_timeout_ms: u32,

    /// Longest a connection may sit idle, take to send a request's headers, or leave a response
    /// unread, in milliseconds.
    #[arg(long, env = "TALLYD_IDLE_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u32).range(10..=3_600_000))]
    pub idle_timeout_ms: u32,

    /// How long a batch waits for SQLite's write lock when something outside tallyd (a sqlite3
    /// shell, a backup) holds it, in milliseconds; past it the batch fails with 503 and changes nothing.
    #[arg(long, env = "TALLYD_BUSY_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u32).range(0..=600_000))]
    pub busy_timeout_ms: u32,

    /// How long `serve` waits for another tallyd holding the same database to exit, in
    /// milliseconds (0: refuse to start at once). Useful for a rolling restart; two processes
    /// never write one database at the same time either way.
    #[arg(long, env = "TALLYD_LOCK_WAIT_MS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=600_000))]
    pub lock_wait_ms: u32,

    /// How long an idempotency key and its stored answer are kept at least, in seconds; then it
    /// is pruned in the background and the same key is a new key.
    #[arg(long, env = "TALLYD_IDEMPOTENCY_RETENTION_S", default_value_t = 86_400,
          value_parser = clap::value_parser!(u32).range(1..=31_536_000))]
    pub idempotency_retention_s: u32,

    /// Most connections served at once; further ones wait in the listen backlog.
    #[arg(long, env = "TALLYD_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Transaction latencies kept for /stats.
    #[arg(long, env = "TALLYD_LATENCY_RING", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub latency_ring: u32,

    /// Once-a-second average-balance samples kept for /stats.
    #[arg(long, env = "TALLYD_BALANCE_RING", default_value_t = 3600,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub balance_ring: u32,

    /// Serve without API keys on a non-loopback address while the database holds none (once a key
    /// is created, every request needs one). Without it, such a `serve` refuses to start.
    #[arg(long, env = "TALLYD_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Serve /metrics, /stats and the live page without a key (for a scraper on a private network).
    #[arg(long, env = "TALLYD_METRICS_PUBLIC")]
    pub metrics_public: bool,

    /// Requests per second each API key (or each client address without a key) may make, sustained;
    /// beyond it, 429 rate_limited. Off when not given.
    #[arg(long, env = "TALLYD_RATE_LIMIT_PER_S",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub rate_limit_per_s: Option<u32>,

    /// Requests a caller may make at once above the sustained rate [default: one second's worth].
    #[arg(long, env = "TALLYD_RATE_LIMIT_BURST", requires = "rate_limit_per_s",
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub rate_limit_burst: Option<u32>,

    /// PEM certificate chain: serve HTTPS (with --tls-key). SIGHUP re-reads both files.
    #[arg(long, env = "TALLYD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TALLYD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: require a client certificate signed by one of them (mutual TLS).
    #[arg(long, env = "TALLYD_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Longest a client may take to complete the TLS handshake, in milliseconds.
    #[arg(long, env = "TALLYD_TLS_HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(10..=600_000))]
    pub tls_handshake_timeout_ms: u32,
}

/// Limits that are not worth a flag, named in one place.
pub mod limits {
    use std::time::Duration;

    /// How long a `/balance` read waits on SQLite (readers only wait during WAL recovery).
    pub const SQLITE_READ_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
    /// Connections in the read pool that serves `/balance`.
    pub const READ_POOL_SIZE: u32 = 4;
    /// How long `/balance` waits for a pooled read connection.
    pub const READ_POOL_WAIT: Duration = Duration::from_secs(2);
    /// How long shutdown waits for open connections to finish their requests.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// Seconds a client is told to wait after `503 queue_full`.
    pub const RETRY_AFTER_SECONDS: u32 = 1;
    /// How often the average balance is sampled into its ring buffer.
    pub const BALANCE_SAMPLE_PERIOD: Duration = Duration::from_secs(1);
    /// Most API keys a database may hold, revoked ones included (they stay, to keep their names).
    pub const KEYS_MAX: usize = 10_000;
    /// How often a running server re-reads its API keys: a revocation is in force within this.
    pub const KEY_RELOAD_PERIOD: Duration = Duration::from_millis(250);
    /// How stale a key's stored "last used" may get. Each write of it makes the engine re-read
    /// its balances once (it is a write from another connection), so it is written rarely.
    pub const KEY_LAST_USED_RESOLUTION: Duration = Duration::from_secs(3600);
    /// How long key management waits for SQLite's write lock (the engine holds it for one commit).
    pub const KEYS_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
    /// Longest one read or write of the API keys may take on PostgreSQL (the reload thread's, and
    /// each of `tallyd keys`' statements): past it the keys in force stay in force, and the next
    /// period tries again.
    pub const KEY_TABLE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Longest `Authorization` token read; anything longer is not a key.
    pub const KEY_TEXT_BYTES_MAX: usize = 256;
    /// Largest item of a bulk request, in bytes of JSON: the longest valid transfer (two grouped
    /// card numbers, a 13-digit amount, a reference and a key of 255 bytes each) with room for
    /// spacing, as long as the reference and key are not written as `\u` escapes.
    pub const BULK_ITEM_BYTES_MAX: usize = 1024;
    /// Bulk requests (JSON or NDJSON) being read, decoded, decided or streamed at once; one more
    /// is 503 `queue_full` before its body is read. One job in the queue may be 8,190 transfers,
    /// so the queue's depth alone does not bound their memory: this does, at about 10 MB each
    /// (an 8 MiB body and its decoded items). 32 keeps two cores' worker busy many times over.
    pub const BULK_REQUESTS_IN_FLIGHT_MAX: usize = 32;
    /// How often the rate limiter forgets callers whose buckets are full again.
    pub const RATE_LIMIT_SWEEP_PERIOD: Duration = Duration::from_secs(10);
}

impl Config {
    /// The body limit of a JSON `POST /transfers/bulk`: [`limits::BULK_ITEM_BYTES_MAX`] for each
    /// of `--bulk-items-max` items, and never less than `--body-limit-bytes` (8 MiB by default).
    /// An NDJSON body has no total limit: it is read a line at a time, each line within
    /// [`limits::BULK_ITEM_BYTES_MAX`].
    pub fn bulk_body_limit_bytes(&self) -> usize {
        (self.bulk_items_max as usize * limits::BULK_ITEM_BYTES_MAX).max(self.body_limit_bytes as usize)
    }
    pub fn batch_wait(&self) -> Duration {
        Duration::from_micros(u64::from(self.batch_wait_us))
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.request_timeout_ms))
    }
    pub fn busy_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.busy_timeout_ms))
    }
    pub fn idempotency_retention(&self) -> Duration {
        Duration::from_secs(u64::from(self.idempotency_retention_s))
    }
    pub fn lock_wait(&self) -> Duration {
        Duration::from_millis(u64::from(self.lock_wait_ms))
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.idle_timeout_ms))
    }
    /// The TLS files, when `--tls-cert` (and so `--tls-key`) is given.
    pub fn tls_files(&self) -> Option<crate::tls::TlsFiles> {
        Some(crate::tls::TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            client_ca: self.tls_client_ca.clone(),
        })
    }
    pub fn tls_handshake_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.tls_handshake_timeout_ms))
    }
    /// The rate limit as (per second, burst), if one is set.
    pub fn rate_limit(&self) -> Option<(std::num::NonZeroU32, std::num::NonZeroU32)> {
        let per_s = std::num::NonZeroU32::new(self.rate_limit_per_s?)?;
        let burst = self
            .rate_limit_burst
            .and_then(std::num::NonZeroU32::new)
            .unwrap_or(per_s);
        Some((per_s, burst))
    }

    /// The defaults, as `tallyd serve` with no flag would have them (tests start from here).
    pub fn defaults() -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            config: Config,
        }
        Only::parse_from(["tallyd"]).config
    }
}
