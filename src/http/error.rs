//! Every answer that is not a success, and the one mapping from engine outcomes to HTTP.
//!
//! Every error on every route is `{"error": {"code": "...", "message": "..."}}`; codes are stable
//! and meant for programs, messages are for people. Internal details (SQL, paths) never leak.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use crate::analytics::OutcomeLabel;
use crate::config::limits;
use crate::domain::TransactionRequest;
use crate::engine::{Outcome, SubmitError};

pub type HttpResponse = Response<Full<Bytes>>;

/// A refused request: its status, stable code and message, and any extra the client needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The current balance, for `insufficient_funds`.
    pub balance: Option<i64>,
    /// Methods the route accepts, for 405.
    pub allow: Option<&'static str>,
    /// Seconds to wait, for `queue_full`.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            balance: None,
            allow: None,
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such route")
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut error = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("this route accepts {allow}"),
        );
        error.allow = Some(allow);
        error
    }

    pub fn storage_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_unavailable",
            "the database could not be written or read; nothing was changed, try again later",
        )
    }

    /// How this refusal is counted, when it answers a `POST /transaction`.
    pub fn outcome_label(&self) -> OutcomeLabel {
        match self.code {
            "insufficient_funds" => OutcomeLabel::InsufficientFunds,
            "card_not_found" => OutcomeLabel::CardNotFound,
            "queue_full" => OutcomeLabel::QueueFull,
            _ if self.status.is_server_error() => OutcomeLabel::Error,
            _ => OutcomeLabel::Rejected,
        }
    }

    pub fn into_response(self) -> HttpResponse {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(balance) = self.balance {
            error["balance"] = balance.into();
        }
        let mut response = json_response(self.status, &json!({ "error": error }));
        let headers = response.headers_mut();
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> Self {
        match error {
            SubmitError::QueueFull => {
                let mut error = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "queue_full",
                    "too many transactions are waiting; nothing was changed, retry after the delay",
                );
                error.retry_after = Some(limits::RETRY_AFTER_SECONDS);
                error
            }
            SubmitError::ShuttingDown => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the server is shutting down; nothing was changed",
            ),
        }
    }
}

/// The 200 body of a committed transaction.
#[derive(Debug, Serialize)]
struct Committed<'a> {
    id: i64,
    card_number: &'a str,
    amount: i64,
    balance: i64,
    status: &'static str,
}

/// The one mapping from what the engine decided to what the client sees.
pub fn outcome_response(request: &TransactionRequest, outcome: Outcome) -> Result<HttpResponse, ApiError> {
    match outcome {
        Outcome::Committed { id, balance } => Ok(json_response(
            StatusCode::OK,
            &Committed {
                id,
                card_number: request.card.as_str(),
                amount: request.amount.minor_units(),
                balance,
                status: "committed",
            },
        )),
        Outcome::InsufficientFunds { balance } => {
            let mut error = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "insufficient_funds",
                format!(
                    "the withdrawal of {} exceeds the balance of {balance}; nothing was changed",
                    request.amount.minor_units().unsigned_abs()
                ),
            );
            error.balance = Some(balance);
            Err(error)
        }
        Outcome::CardNotFound => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "card_not_found",
            format!("no account has card number {}", request.card),
        )),
        Outcome::BalanceLimitExceeded { balance } => {
            let mut error = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "balance_limit_exceeded",
                "the deposit would take the balance past the largest representable amount",
            );
            error.balance = Some(balance);
            Err(error)
        }
        Outcome::StorageFailed => Err(ApiError::storage_unavailable()),
    }
}

pub fn json_response(status: StatusCode, body: &impl Serialize) -> HttpResponse {
    // Serializing our own plain structs cannot fail; an empty object is the safe fallback.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
