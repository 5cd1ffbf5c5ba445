//! The HTTP front end: routing, request reading with limits, and the handlers. Handlers validate,
//! hand commands to the engine, and turn its outcomes into responses; they never touch storage
//! for writes.

mod auth;
pub mod decode;
pub mod error;
mod ndjson;
pub mod openapi;
mod routes;

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::analytics::Analytics;
use crate::auth::rate::Limiter;
use crate::auth::KeyRing;
use crate::engine::Engine;
use crate::store::Reader;

pub use auth::Peer;
pub use error::{render, ApiError, ErrorCode, HttpResponse};
pub use routes::handle;

/// Everything a handler needs, shared by every connection.
pub struct App {
    pub engine: Engine,
    /// Committed state for the read routes, never blocked by the writer.
    pub reader: Arc<dyn Reader>,
    pub analytics: Arc<Analytics>,
    pub metrics: PrometheusHandle,
    pub workers: usize,
    /// Largest request body accepted.
    pub body_limit_bytes: usize,
    /// Most transfers in one `POST /transfers/bulk`.
    pub bulk_items_max: usize,
    /// Largest body of a JSON `POST /transfers/bulk` ([`crate::config::Config::bulk_body_limit_bytes`]).
    pub bulk_body_limit_bytes: usize,
    /// One permit per bulk request in flight ([`crate::config::limits::BULK_REQUESTS_IN_FLIGHT_MAX`]).
    pub bulk_slots: Arc<tokio::sync::Semaphore>,
    /// Longest a client may take to send a request body.
    pub request_timeout: Duration,
    /// The API keys in force, swapped by the reload thread.
    pub keys: Arc<KeyRing>,
    /// Per-caller token buckets, when `--rate-limit-per-s` is set.
    pub limiter: Option<Limiter>,
    /// Serve /metrics, /stats and the live page without a key.
    pub metrics_public: bool,
    /// A hold's life when its request gives none, in seconds.
    pub hold_expiry_s: i64,
    /// Most items in one `POST /batches`.
    pub batch_items_max: usize,
}
