//! Logs and Prometheus metrics: the metric names, their buckets, and the one place each is recorded.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::analytics::OutcomeLabel;

pub const TRANSACTIONS_TOTAL: &str = "tallyd_transactions_total";
pub const TRANSACTION_DURATION: &str = "tallyd_transaction_duration_seconds";
pub const BATCH_SIZE: &str = "tallyd_batch_size";
pub const BATCH_COMMIT_DURATION: &str = "tallyd_batch_commit_duration_seconds";
pub const BATCH_FAILURES_TOTAL: &str = "tallyd_batch_failures_total";
pub const QUEUE_DEPTH: &str = "tallyd_queue_depth";
pub const QUEUE_CAPACITY: &str = "tallyd_queue_capacity";
pub const WORKERS: &str = "tallyd_workers";
pub const AVERAGE_BALANCE: &str = "tallyd_average_balance";
pub const UPTIME: &str = "tallyd_uptime_seconds";
pub const HTTP_REQUESTS_TOTAL: &str = "tallyd_http_requests_total";
pub const IDEMPOTENT_REPLAYS_TOTAL: &str = "tallyd_idempotent_replays_total";
pub const ACCOUNTS: &str = "tallyd_accounts";
pub const ACCOUNT_TABLE_BYTES: &str = "tallyd_account_table_bytes";
pub const IDEMPOTENCY_KEYS_LIVE: &str = "tallyd_idempotency_keys_live";
pub const WRITE_BACK_LAG: &str = "tallyd_write_back_lag_transactions";
pub const API_REQUESTS_TOTAL: &str = "tallyd_api_requests_total";
pub const TLS_HANDSHAKE_FAILURES_TOTAL: &str = "tallyd_tls_handshake_failures_total";

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`), coloured only on a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|builder| {
                    builder.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_SIZE_BUCKETS)
                })
                .and_then(|builder| builder.install_recorder())
                .expect("installing the Prometheus recorder (buckets are non-empty constants)")
        })
        .clone()
}

/// Registers every series at zero so that a fresh server already exports them all.
pub fn describe(workers: usize, queue_capacity: usize) {
    describe_counter!(
        TRANSACTIONS_TOTAL,
        "POST /transaction and POST /transfers answers by kind and outcome"
    );
    describe_histogram!(
        TRANSACTION_DURATION,
        "POST /transaction, receipt to answer, in seconds"
    );
    describe_histogram!(BATCH_SIZE, "Transactions per committed batch");
    describe_histogram!(BATCH_COMMIT_DURATION, "Time to commit one batch, in seconds");
    describe_counter!(BATCH_FAILURES_TOTAL, "Batches whose commit failed");
    describe_gauge!(QUEUE_DEPTH, "Transactions waiting in the queue");
    describe_gauge!(QUEUE_CAPACITY, "Capacity of the transaction queue");
    describe_gauge!(WORKERS, "Worker threads committing batches");
    describe_gauge!(AVERAGE_BALANCE, "Average account balance in minor units");
    describe_gauge!(UPTIME, "Seconds since start");
    describe_gauge!(ACCOUNTS, "Card accounts held in memory");
    describe_gauge!(
        ACCOUNT_TABLE_BYTES,
        "Bytes of the engine's table of card accounts (divide by tallyd_accounts for bytes per account)"
    );
    describe_gauge!(
        IDEMPOTENCY_KEYS_LIVE,
        "Idempotency keys kept and indexed in memory"
    );
    describe_gauge!(
        WRITE_BACK_LAG,
        "Transactions committed after the balance checkpoint (what a start-up would replay)"
    );
    describe_counter!(HTTP_REQUESTS_TOTAL, "HTTP requests by route and status");
    describe_counter!(
        IDEMPOTENT_REPLAYS_TOTAL,
        "POSTs answered with the stored answer of their Idempotency-Key (nothing moved), by route"
    );
    for route in ["/transaction", "/transfers", "/accounts"] {
        counter!(IDEMPOTENT_REPLAYS_TOTAL, "route" => route).absolute(0);
    }
    for outcome in OutcomeLabel::ALL {
        for kind in ["deposit", "withdrawal", "transfer", "unknown"] {
            counter!(TRANSACTIONS_TOTAL, "kind" => kind, "outcome" => outcome.as_str()).absolute(0);
        }
    }
    describe_counter!(
        API_REQUESTS_TOTAL,
        "Requests to routes that take an API key, by key name (never the key) and outcome; \
         (anonymous): no key needed, (missing): none sent, (invalid): not valid here"
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES_TOTAL,
        "TLS handshakes that failed (error: refused or garbled; timeout: not finished in time)"
    );
    for reason in ["error", "timeout"] {
        counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "reason" => reason).absolute(0);
    }
    let _ = stand_in_counters();
    counter!(BATCH_FAILURES_TOTAL).absolute(0);
    gauge!(WORKERS).set(workers as f64);
    gauge!(QUEUE_CAPACITY).set(queue_capacity as f64);
    gauge!(QUEUE_DEPTH).set(0.0);
}

/// A `POST /transaction` was answered.
pub fn record_transaction(kind: &'static str, outcome: OutcomeLabel, latency: Duration) {
    counter!(TRANSACTIONS_TOTAL, "kind" => kind, "outcome" => outcome.as_str()).increment(1);
    histogram!(TRANSACTION_DURATION).record(latency.as_secs_f64());
}

/// `count` transactions of one bulk request ended with `outcome`: counted one by one, their
/// latency (the request's) recorded once.
pub fn record_transactions(kind: &'static str, outcome: OutcomeLabel, count: u64, latency: Duration) {
    counter!(TRANSACTIONS_TOTAL, "kind" => kind, "outcome" => outcome.as_str()).increment(count);
    histogram!(TRANSACTION_DURATION).record(latency.as_secs_f64());
}

/// `count` items of one bulk request were answered from their stored answers.
pub fn record_replays(route: &'static str, count: u64) {
    counter!(IDEMPOTENT_REPLAYS_TOTAL, "route" => route).increment(count);
}

/// A worker finished a batch.
pub fn record_batch(size: usize, took: Duration, commit_ok: bool) {
    histogram!(BATCH_SIZE).record(size as f64);
    histogram!(BATCH_COMMIT_DURATION).record(took.as_secs_f64());
    if !commit_ok {
        counter!(BATCH_FAILURES_TOTAL).increment(1);
    }
}

/// A keyed `POST` was answered from its stored answer.
pub fn record_replay(route: &'static str) {
    counter!(IDEMPOTENT_REPLAYS_TOTAL, "route" => route).increment(1);
}

/// A TLS handshake failed, for `reason` `error` or `timeout`.
pub fn record_tls_handshake_failure(reason: &'static str) {
    counter!(TLS_HANDSHAKE_FAILURES_TOTAL, "reason" => reason).increment(1);
}

/// Any HTTP request was answered.
pub fn record_http(route: &'static str, status: u16) {
    counter!(HTTP_REQUESTS_TOTAL, "route" => route, "status" => status_label(status)).increment(1);
}

/// The statuses tallyd answers, as static labels so that counting a request allocates nothing.
fn status_label(status: u16) -> metrics::SharedString {
    let known = match status {
        200 => "200",
        400 => "400",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        415 => "415",
        422 => "422",
        500 => "500",
        503 => "503",
        201 => "201",
        401 => "401",
        403 => "403",
        429 => "429",
        other => return other.to_string().into(),
    };
    known.into()
}

/// What the gauges show, read just before each scrape.
pub struct Gauges {
    pub queue_depth: usize,
    pub average_balance: f64,
    pub uptime: Duration,
    pub accounts: usize,
    pub account_table_bytes: usize,
    pub idempotency_keys_live: usize,
    pub write_back_lag: u64,
}

/// Gauges that are read rather than counted, refreshed just before each scrape.
pub fn set_gauges(gauges: &Gauges) {
    gauge!(QUEUE_DEPTH).set(gauges.queue_depth as f64);
    gauge!(AVERAGE_BALANCE).set(gauges.average_balance);
    gauge!(UPTIME).set(gauges.uptime.as_secs_f64());
    gauge!(ACCOUNTS).set(gauges.accounts as f64);
    gauge!(ACCOUNT_TABLE_BYTES).set(gauges.account_table_bytes as f64);
    gauge!(IDEMPOTENCY_KEYS_LIVE).set(gauges.idempotency_keys_live as f64);
    gauge!(WRITE_BACK_LAG).set(gauges.write_back_lag as f64);
}

/// How a request that went through the door ended, for `tallyd_api_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiOutcome {
    Ok,
    Unauthorized,
    Forbidden,
    RateLimited,
    /// Any other 4xx: the request was let in and refused by its route.
    ClientError,
    ServerError,
}

impl ApiOutcome {
    pub const ALL: [ApiOutcome; 6] = [
        ApiOutcome::Ok,
        ApiOutcome::Unauthorized,
        ApiOutcome::Forbidden,
        ApiOutcome::RateLimited,
        ApiOutcome::ClientError,
        ApiOutcome::ServerError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ApiOutcome::Ok => "ok",
            ApiOutcome::Unauthorized => "unauthorized",
            ApiOutcome::Forbidden => "forbidden",
            ApiOutcome::RateLimited => "rate_limited",
            ApiOutcome::ClientError => "client_error",
            ApiOutcome::ServerError => "server_error",
        }
    }

    pub fn of_status(status: u16) -> Self {
        match status {
            401 => ApiOutcome::Unauthorized,
            403 => ApiOutcome::Forbidden,
            429 => ApiOutcome::RateLimited,
            400..=499 => ApiOutcome::ClientError,
            500..=599 => ApiOutcome::ServerError,
            _ => ApiOutcome::Ok,
        }
    }
}

/// The `tallyd_api_requests_total` series of one caller, registered once so that counting a
/// request is one atomic add (no label formatting or registry lookup per request).
pub struct CallerCounters([metrics::Counter; 6]);

impl CallerCounters {
    /// `label` is a key's name or one of the bracketed stand-ins, never a key.
    pub fn new(label: &str) -> Self {
        Self(ApiOutcome::ALL.map(
            |outcome| counter!(API_REQUESTS_TOTAL, "key" => label.to_owned(), "outcome" => outcome.as_str()),
        ))
    }

    pub fn record(&self, status: u16) {
        let outcome = ApiOutcome::of_status(status);
        let index = ApiOutcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.0[index].increment(1);
    }
}

impl std::fmt::Debug for CallerCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallerCounters")
    }
}

/// The series of callers without a valid key: `(anonymous)` (no key needed, none sent),
/// `(missing)` (a key was needed) and `(invalid)` (one was sent that is not valid here). Key names
/// start with a letter or digit, so these can never be a key's name.
pub fn stand_in_counters() -> &'static [CallerCounters; 3] {
    static STAND_INS: OnceLock<[CallerCounters; 3]> = OnceLock::new();
    STAND_INS.get_or_init(|| ["(anonymous)", "(missing)", "(invalid)"].map(CallerCounters::new))
}
