//! Routes and handlers.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Body;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::error::{json_response, outcome_response, ApiError, HttpResponse};
use super::{decode, App};
use crate::analytics::OutcomeLabel;
use crate::domain::CardNumber;
use crate::telemetry;

/// The live page, compiled into the binary so that it needs no files and no network.
const DASHBOARD_HTML: &str = include_str!("../../assets/dashboard.html");

/// The routes tallyd serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Transaction,
    Balance,
    Metrics,
    Stats,
    Healthz,
    Readyz,
    Dashboard,
}

impl Route {
    fn parse(path: &str) -> Option<Self> {
        Some(match path {
            "/transaction" => Route::Transaction,
            "/balance" => Route::Balance,
            "/metrics" => Route::Metrics,
            "/stats" => Route::Stats,
            "/healthz" => Route::Healthz,
            "/readyz" => Route::Readyz,
            "/" => Route::Dashboard,
            _ => return None,
        })
    }

    /// The label of this route in `tallyd_http_requests_total`.
    fn label(self) -> &'static str {
        match self {
            Route::Transaction => "/transaction",
            Route::Balance => "/balance",
            Route::Metrics => "/metrics",
            Route::Stats => "/stats",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Dashboard => "/",
        }
    }

    /// The methods this route accepts, as an `Allow` header says them.
    fn allow(self) -> &'static str {
        match self {
            Route::Transaction => "POST",
            _ => "GET, HEAD",
        }
    }

    fn accepts(self, method: &Method) -> bool {
        match self {
            Route::Transaction => method == Method::POST,
            _ => method == Method::GET || method == Method::HEAD,
        }
    }
}

/// Answers one request. Never fails: every problem becomes a JSON error response.
pub async fn handle<B>(app: Arc<App>, request: Request<B>) -> Result<HttpResponse, std::convert::Infallible>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let route = Route::parse(request.uri().path());
    let response = match route {
        None => ApiError::not_found().into_response(),
        Some(route) if !route.accepts(request.method()) => {
            ApiError::method_not_allowed(route.allow()).into_response()
        }
        Some(Route::Transaction) => transaction(&app, request).await,
        Some(Route::Balance) => balance(&app, request.uri().query()).await,
        Some(Route::Metrics) => metrics(&app),
        Some(Route::Stats) => stats(&app),
        Some(Route::Healthz) => healthz(),
        Some(Route::Readyz) => readyz(&app),
        Some(Route::Dashboard) => dashboard(),
    };
    telemetry::record_http(route.map_or("other", Route::label), response.status().as_u16());
    Ok(response)
}

/// `POST /transaction`: read, validate, queue, wait for the commit, answer; and count it.
async fn transaction<B>(app: &App, request: Request<B>) -> HttpResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let mut kind = "unknown";
    let result = async {
        let body = read_body(app, request).await?;
        let transaction = decode::transaction(&body)?;
        kind = transaction.amount.kind().as_str();
        let answer = app.engine.submit(transaction.clone())?;
        // Once queued, the transaction will be decided whatever happens to this request, so there is
        // no timeout here: a worker always answers, after at most one commit's time.
        let outcome = answer.await.map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the transaction's worker stopped",
            )
        })?;
        outcome_response(&transaction, outcome)
    }
    .await;
    let (label, response) = match result {
        Ok(response) => (OutcomeLabel::Committed, response),
        Err(error) => (error.outcome_label(), error.into_response()),
    };
    let latency = started.elapsed();
    app.analytics.record(label, latency);
    telemetry::record_transaction(kind, label, latency);
    response
}

/// Reads the whole body within the size and time limits.
async fn read_body<B>(app: &App, request: Request<B>) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if let Some(content_type) = request.headers().get(CONTENT_TYPE) {
        let is_json = content_type
            .to_str()
            .map(|value| {
                value
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("application/json")
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ));
        }
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is larger than {} bytes", app.body_limit_bytes),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > app.body_limit_bytes as u64) {
        return Err(too_large());
    }
    let limited = Limited::new(request.into_body(), app.body_limit_bytes);
    match tokio::time::timeout(app.request_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the body did not arrive within {} ms",
                app.request_timeout.as_millis()
            ),
        )),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(error)) => Err(ApiError::bad_request(
            "invalid_body",
            format!("the body could not be read: {error}"),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// `GET /balance?card_number=...`: a committed balance from the read pool.
async fn balance(app: &App, query: Option<&str>) -> HttpResponse {
    let result = async {
        let text = query
            .unwrap_or("")
            .split('&')
            .find_map(|pair| pair.strip_prefix("card_number="))
            .ok_or_else(|| ApiError::bad_request("missing_field", "give the card as ?card_number=..."))?;
        let card = CardNumber::parse(text)
            .map_err(|e| ApiError::bad_request("invalid_card_number", e.to_string()))?;
        let reader = Arc::clone(&app.reader);
        let lookup = card.clone();
        // Pooled SQLite reads block, so they run on the blocking pool, never on a reactor thread.
        let found = tokio::task::spawn_blocking(move || reader.balance(&lookup))
            .await
            .map_err(|_| ApiError::storage_unavailable())?
            .map_err(|error| {
                tracing::warn!(%error, "a balance read failed");
                ApiError::storage_unavailable()
            })?;
        match found {
            Some(balance) => Ok(json_response(
                StatusCode::OK,
                &json!({ "card_number": card.as_str(), "balance": balance }),
            )),
            None => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "card_not_found",
                format!("no account has card number {card}"),
            )),
        }
    }
    .await;
    result.unwrap_or_else(ApiError::into_response)
}

fn metrics(app: &App) -> HttpResponse {
    let average = app.engine.state().average_balance();
    telemetry::set_gauges(app.engine.queue_depth(), average, app.analytics.uptime());
    let mut response = Response::new(Full::new(Bytes::from(app.metrics.render())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

fn stats(app: &App) -> HttpResponse {
    let analytics = &app.analytics;
    let transactions: serde_json::Map<String, serde_json::Value> = OutcomeLabel::ALL
        .iter()
        .map(|label| (label.as_str().to_owned(), analytics.count(*label).into()))
        .collect();
    let (samples, window) = analytics.balance_samples();
    let current = app.engine.state().average_balance();
    json_response(
        StatusCode::OK,
        &json!({
            "uptime_seconds": analytics.uptime().as_secs_f64(),
            "queue": {
                "depth": app.engine.queue_depth(),
                "capacity": app.engine.queue_capacity(),
                "in_progress": app.engine.in_progress(),
            },
            "workers": app.workers,
            "transactions": transactions,
            "latency": analytics.latency_summary(),
            "average_balance": { "window": window, "current": current, "samples": samples },
        }),
    )
}

fn healthz() -> HttpResponse {
    json_response(StatusCode::OK, &json!({ "status": "ok" }))
}

/// Ready when the last commit succeeded and the queue has room.
fn readyz(app: &App) -> HttpResponse {
    let writable = app
        .engine
        .state()
        .writable
        .load(std::sync::atomic::Ordering::Relaxed);
    let has_room = app.engine.queue_depth() < app.engine.queue_capacity();
    if writable && has_room {
        json_response(StatusCode::OK, &json!({ "status": "ready" }))
    } else {
        let reason = if writable {
            "the transaction queue is full"
        } else {
            "the last commit failed"
        };
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", reason).into_response()
    }
}

fn dashboard() -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(DASHBOARD_HTML.as_bytes())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    response
}
