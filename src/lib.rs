//! tallyd: a durable, high-throughput HTTP server for card transactions.
//!
//! Data flows one way, `http -> engine -> store`:
//!
//! * [`http`] accepts connections (hyper on tokio), validates each request into a
//!   [`domain::TransactionRequest`] and `try_send`s it onto the engine's bounded queue. A full queue
//!   is answered `503 queue_full` at once.
//! * [`engine`] owns a fixed pool of worker threads. A worker takes everything waiting (up to
//!   `--batch-max`), decides each transaction against the balances it holds in memory
//!   ([`engine::ledger`]), writes the whole batch to the store in one durable commit, and only
//!   then answers every request in the batch (group commit).
//! * [`store`] is the storage boundary: the [`store::Store`] trait, implemented today by SQLite in
//!   WAL mode. Every committed transaction updates its account and appends one row to an
//!   immutable journal in the same SQLite transaction.
//!
//! [`auth`] stands at the door, before anything is read or queued: API keys and their scopes,
//! and per-caller rate limits. [`tls`] serves HTTPS (and mutual TLS) with certificates that
//! SIGHUP re-reads.
//!
//! [`analytics`] and [`telemetry`] only observe: ring buffers for `/stats`, Prometheus metrics
//! for `/metrics`, and logs.

pub mod analytics;
pub mod auth;
pub mod config;
pub mod domain;
pub mod engine;
pub mod http;
pub mod server;
mod server_postgres;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod verify;

pub use server::{run, serve_until_signal};

/// Milliseconds since the Unix epoch: journal timestamps and balance samples.
pub(crate) fn unix_ms_now() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| {
        i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
    })
}
