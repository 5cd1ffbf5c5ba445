//! Every answer that is not a success, and the one mapping from engine outcomes to HTTP.
//!
//! Every error on every route is `{"error": {"code": "...", "message": "..."}}`; codes are an enum
//! ([`ErrorCode`]) whose status and metric label are matched exhaustively, so a new code cannot
//! fall silently into the wrong bucket. Messages are for people; internal details (SQL, paths)
//! never leak.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use crate::analytics::OutcomeLabel;
use crate::config::limits;
use crate::domain::{BatchItem, BulkTransferRequest, Command};
use crate::engine::{Outcome, Refusal, SubmitError};
use crate::store::{Hold, HoldStatus, StoredAnswer};

pub type HttpResponse = Response<Full<Bytes>>;

/// The challenge of a 401 without a key (RFC 6750).
pub const BEARER_CHALLENGE: &str = "Bearer realm=\"tallyd\"";

/// The header that marks an answer replayed from an idempotency key.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// Every error code tallyd answers, stable and meant for programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidJson,
    InvalidBody,
    MissingField,
    UnknownField,
    DuplicateField,
    InvalidCardNumber,
    InvalidAmount,
    InvalidReference,
    SameAccount,
    InvalidIdempotencyKey,
    /// A query or path parameter that is not what the route takes (`limit`, a cursor, an id, `at`).
    InvalidParameter,
    CardNotFound,
    TransactionNotFound,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    AccountExists,
    BodyTooLarge,
    UnsupportedMediaType,
    InsufficientFunds,
    BalanceLimitExceeded,
    IdempotencyKeyReused,
    Internal,
    QueueFull,
    StorageUnavailable,
    ShuttingDown,
    NotReady,
    /// No API key, or one that is unknown, revoked or bound to another client certificate.
    Unauthorized,
    /// A valid API key whose scope does not allow the route.
    Forbidden,
    /// The caller's rate limit is spent; nothing was read or queued.
    RateLimited,
    InvalidExpiry,
    InvalidLimit,
    /// `POST /batches` with no items, too many, or an item that is not an object of a known type.
    InvalidBatch,
    HoldNotFound,
    HoldCaptured,
    HoldVoided,
    HoldExpired,
    CaptureExceedsHold,
    LimitBelowUsage,
    /// One item of an all-or-nothing batch was refused; nothing of the batch took effect.
    BatchFailed,
    /// In a failed batch's results: this item was not the one refused, and did not take effect.
    LinkedItemFailed,
    /// The database connection failed during the commit: the request may or may not have taken
    /// effect; retry it with the same `Idempotency-Key` to find out.
    OutcomeUnknown,
}

impl ErrorCode {
    /// Every code, in declaration order: what `docs/openapi.json` must list (its test compares).
    pub const ALL: [ErrorCode; 42] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidBody,
        ErrorCode::MissingField,
        ErrorCode::UnknownField,
        ErrorCode::DuplicateField,
        ErrorCode::InvalidCardNumber,
        ErrorCode::InvalidAmount,
        ErrorCode::InvalidReference,
        ErrorCode::SameAccount,
        ErrorCode::InvalidIdempotencyKey,
        ErrorCode::InvalidParameter,
        ErrorCode::CardNotFound,
        ErrorCode::TransactionNotFound,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTimeout,
        ErrorCode::AccountExists,
        ErrorCode::BodyTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::InsufficientFunds,
        ErrorCode::BalanceLimitExceeded,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::Internal,
        ErrorCode::QueueFull,
        ErrorCode::StorageUnavailable,
        ErrorCode::ShuttingDown,
        ErrorCode::NotReady,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::InvalidExpiry,
        ErrorCode::InvalidLimit,
        ErrorCode::InvalidBatch,
        ErrorCode::HoldNotFound,
        ErrorCode::HoldCaptured,
        ErrorCode::HoldVoided,
        ErrorCode::HoldExpired,
        ErrorCode::CaptureExceedsHold,
        ErrorCode::LimitBelowUsage,
        ErrorCode::BatchFailed,
        ErrorCode::LinkedItemFailed,
        ErrorCode::OutcomeUnknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::UnknownField => "unknown_field",
            ErrorCode::DuplicateField => "duplicate_field",
            ErrorCode::InvalidCardNumber => "invalid_card_number",
            ErrorCode::InvalidAmount => "invalid_amount",
            ErrorCode::InvalidReference => "invalid_reference",
            ErrorCode::SameAccount => "same_account",
            ErrorCode::InvalidIdempotencyKey => "invalid_idempotency_key",
            ErrorCode::InvalidParameter => "invalid_parameter",
            ErrorCode::CardNotFound => "card_not_found",
            ErrorCode::TransactionNotFound => "transaction_not_found",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::AccountExists => "account_exists",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::InsufficientFunds => "insufficient_funds",
            ErrorCode::BalanceLimitExceeded => "balance_limit_exceeded",
            ErrorCode::IdempotencyKeyReused => "idempotency_key_reused",
            ErrorCode::Internal => "internal",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InvalidExpiry => "invalid_expiry",
            ErrorCode::InvalidLimit => "invalid_limit",
            ErrorCode::InvalidBatch => "invalid_batch",
            ErrorCode::HoldNotFound => "hold_not_found",
            ErrorCode::HoldCaptured => "hold_captured",
            ErrorCode::HoldVoided => "hold_voided",
            ErrorCode::HoldExpired => "hold_expired",
            ErrorCode::CaptureExceedsHold => "capture_exceeds_hold",
            ErrorCode::LimitBelowUsage => "limit_below_usage",
            ErrorCode::BatchFailed => "batch_failed",
            ErrorCode::LinkedItemFailed => "linked_item_failed",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::InvalidJson
            | ErrorCode::InvalidBody
            | ErrorCode::MissingField
            | ErrorCode::UnknownField
            | ErrorCode::DuplicateField
            | ErrorCode::InvalidCardNumber
            | ErrorCode::InvalidAmount
            | ErrorCode::InvalidReference
            | ErrorCode::SameAccount
            | ErrorCode::InvalidIdempotencyKey
            | ErrorCode::InvalidParameter
            | ErrorCode::InvalidExpiry
            | ErrorCode::InvalidLimit
            | ErrorCode::InvalidBatch => StatusCode::BAD_REQUEST,
            ErrorCode::CardNotFound
            | ErrorCode::TransactionNotFound
            | ErrorCode::NotFound
            | ErrorCode::HoldNotFound => StatusCode::NOT_FOUND,
            ErrorCode::HoldCaptured | ErrorCode::HoldVoided | ErrorCode::HoldExpired => StatusCode::CONFLICT,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden => StatusCode::FORBIDDEN,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorCode::AccountExists => StatusCode::CONFLICT,
            ErrorCode::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::InsufficientFunds
            | ErrorCode::BalanceLimitExceeded
            | ErrorCode::IdempotencyKeyReused
            | ErrorCode::CaptureExceedsHold
            | ErrorCode::LimitBelowUsage
            | ErrorCode::BatchFailed
            | ErrorCode::LinkedItemFailed => StatusCode::UNPROCESSABLE_ENTITY,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::QueueFull
            | ErrorCode::StorageUnavailable
            | ErrorCode::OutcomeUnknown
            | ErrorCode::ShuttingDown
            | ErrorCode::NotReady => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// How a refusal with this code is counted in `tallyd_transactions_total` and `/stats`.
    pub fn outcome_label(self) -> OutcomeLabel {
        match self {
            ErrorCode::InsufficientFunds => OutcomeLabel::InsufficientFunds,
            ErrorCode::CardNotFound => OutcomeLabel::CardNotFound,
            ErrorCode::QueueFull => OutcomeLabel::QueueFull,
            ErrorCode::Internal
            | ErrorCode::StorageUnavailable
            | ErrorCode::OutcomeUnknown
            | ErrorCode::ShuttingDown
            | ErrorCode::NotReady => OutcomeLabel::Error,
            ErrorCode::InvalidJson
            | ErrorCode::InvalidBody
            | ErrorCode::MissingField
            | ErrorCode::UnknownField
            | ErrorCode::DuplicateField
            | ErrorCode::InvalidCardNumber
            | ErrorCode::InvalidAmount
            | ErrorCode::InvalidReference
            | ErrorCode::SameAccount
            | ErrorCode::InvalidIdempotencyKey
            | ErrorCode::InvalidParameter
            | ErrorCode::TransactionNotFound
            | ErrorCode::NotFound
            | ErrorCode::MethodNotAllowed
            | ErrorCode::RequestTimeout
            | ErrorCode::AccountExists
            | ErrorCode::BodyTooLarge
            | ErrorCode::UnsupportedMediaType
            | ErrorCode::BalanceLimitExceeded
            | ErrorCode::IdempotencyKeyReused
            | ErrorCode::Unauthorized
            | ErrorCode::Forbidden
            | ErrorCode::RateLimited
            | ErrorCode::InvalidExpiry
            | ErrorCode::InvalidLimit
            | ErrorCode::InvalidBatch
            | ErrorCode::HoldNotFound
            | ErrorCode::HoldCaptured
            | ErrorCode::HoldVoided
            | ErrorCode::HoldExpired
            | ErrorCode::CaptureExceedsHold
            | ErrorCode::LimitBelowUsage
            | ErrorCode::BatchFailed
            | ErrorCode::LinkedItemFailed => OutcomeLabel::Rejected,
        }
    }
}

/// A refused request: its code (which fixes the status), message, and any extra the client needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// The current balance, for `insufficient_funds` and `balance_limit_exceeded`.
    pub balance: Option<i64>,
    /// The card that was not found, for `card_not_found` on a route that names two.
    pub card_number: Option<String>,
    /// Methods the route accepts, for 405.
    pub allow: Option<&'static str>,
    /// Seconds to wait, for `queue_full` and `rate_limited`.
    pub retry_after: Option<u32>,
    /// The `WWW-Authenticate` challenge, for `unauthorized` (and `forbidden`: which scope is needed).
    pub www_authenticate: Option<&'static str>,
    /// What bulk requests, holds and batches add; boxed, as most errors have none of it.
    pub detail: Option<Box<ErrorDetail>>,
}

/// The parts of an error body that only bulk requests, holds, limits and batches have.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ErrorDetail {
    /// The item of a bulk request that is malformed (0-based), for a 400 that refuses the whole
    /// request because of it; and the refused item of an all-or-nothing batch, for `batch_failed`.
    pub index: Option<u32>,
    /// What is available on the account, for `insufficient_funds` when it is not the balance.
    pub available: Option<i64>,
    /// One result per item, for `batch_failed` (beside `error` in the body).
    pub results: Option<Vec<serde_json::Value>>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            balance: None,
            card_number: None,
            allow: None,
            retry_after: None,
            www_authenticate: None,
            detail: None,
        }
    }

    /// This error, as the error of item `index` of a bulk request.
    pub fn at_index(mut self, index: usize) -> Self {
        self.message = format!("transfers[{index}]: {}", self.message);
        // At most 65,536 items (--bulk-items-max); an NDJSON line number saturates.
        self.detail.get_or_insert_with(Box::default).index = Some(u32::try_from(index).unwrap_or(u32::MAX));
        self
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// The item this error is about, in a bulk request or a batch.
    pub fn index(&self) -> Option<u32> {
        self.detail.as_ref().and_then(|detail| detail.index)
    }

    pub fn not_found() -> Self {
        Self::new(ErrorCode::NotFound, "no such route")
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        let mut error = Self::new(ErrorCode::MethodNotAllowed, format!("this route accepts {allow}"));
        error.allow = Some(allow);
        error
    }

    pub fn storage_unavailable() -> Self {
        Self::new(
            ErrorCode::StorageUnavailable,
            "the database could not be written or read; nothing was changed, try again later",
        )
    }

    pub fn outcome_unknown() -> Self {
        Self::new(
            ErrorCode::OutcomeUnknown,
            "the database connection failed while the request was committing; it may or may not have \
             taken effect: retry it with the same Idempotency-Key",
        )
    }

    pub fn outcome_label(&self) -> OutcomeLabel {
        self.code.outcome_label()
    }

    /// The JSON body of this error.
    pub fn body(&self) -> Vec<u8> {
        let mut error = json!({ "code": self.code.as_str(), "message": self.message });
        if let Some(balance) = self.balance {
            error["balance"] = balance.into();
        }
        if let Some(card) = &self.card_number {
            error["card_number"] = card.as_str().into();
        }
        let detail = self.detail.as_deref();
        if let Some(index) = detail.and_then(|detail| detail.index) {
            error["index"] = index.into();
        }
        if let Some(available) = detail.and_then(|detail| detail.available) {
            error["available"] = available.into();
        }
        /// The body, borrowing a batch's results rather than copying them into a `Value`.
        #[derive(Serialize)]
        struct Body<'a> {
            error: serde_json::Value,
            #[serde(skip_serializing_if = "Option::is_none")]
            results: Option<&'a [serde_json::Value]>,
        }
        to_json(&Body {
            error,
            results: detail.and_then(|detail| detail.results.as_deref()),
        })
    }

    pub fn into_response(self) -> HttpResponse {
        let mut response = bytes_response(self.status(), self.body());
        let headers = response.headers_mut();
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        // RFC 6750: a 401 always says how to authenticate.
        let challenge = match (self.code, self.www_authenticate) {
            (_, Some(challenge)) => Some(challenge),
            (ErrorCode::Unauthorized, None) => Some(BEARER_CHALLENGE),
            _ => None,
        };
        if let Some(challenge) = challenge {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> Self {
        match error {
            SubmitError::QueueFull => {
                let mut error = Self::new(
                    ErrorCode::QueueFull,
                    "too many requests are waiting; nothing was changed, retry after the delay",
                );
                error.retry_after = Some(limits::RETRY_AFTER_SECONDS);
                error
            }
            SubmitError::ShuttingDown => Self::new(
                ErrorCode::ShuttingDown,
                "the server is shutting down; nothing was changed",
            ),
        }
    }
}

/// The 200 body of a committed `POST /transaction` (its field order is the contract).
#[derive(Debug, Serialize)]
struct Posted<'a> {
    id: i64,
    card_number: &'a str,
    amount: i64,
    balance: i64,
    status: &'static str,
}

/// The 200 body of a committed `POST /transfers`.
#[derive(Debug, Serialize)]
struct Transferred<'a> {
    id: i64,
    source: &'a str,
    destination: &'a str,
    amount: i64,
    reference: Option<&'a str>,
    status: &'static str,
    source_balance: i64,
    destination_balance: i64,
    created_at_ms: i64,
}

/// The 201 body of `POST /accounts`.
#[derive(Debug, Serialize)]
struct Opened<'a> {
    card_number: &'a str,
    balance: i64,
    held: i64,
    overdraft_limit: i64,
    available: i64,
    created_at_ms: i64,
}

/// What the engine decided, as a status and body: the one mapping from outcomes to HTTP. The engine
/// calls it too (as its [`crate::engine::Render`]) to store a keyed request's answer with its effect.
pub fn render(command: &Command, outcome: &Outcome) -> (u16, Vec<u8>) {
    match outcome_result(command, outcome) {
        Ok((status, body)) => (status.as_u16(), body),
        Err(error) => (error.status().as_u16(), error.body()),
    }
}

/// The answer to a decided command: a success's status and body, or the refusal.
pub fn outcome_result(command: &Command, outcome: &Outcome) -> Result<(StatusCode, Vec<u8>), ApiError> {
    match (outcome, command) {
        (Outcome::Replayed(stored), _) => Ok((
            StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK),
            stored.body.clone(),
        )),
        (Outcome::Posted { id, balance, .. }, Command::Transaction(request)) => Ok((
            StatusCode::OK,
            to_json(&Posted {
                id: *id,
                card_number: request.card.as_str(),
                amount: request.amount.minor_units(),
                balance: *balance,
                status: "committed",
            }),
        )),
        (
            Outcome::Transferred {
                id,
                source_balance,
                destination_balance,
                created_at_ms,
            },
            Command::Transfer(request),
        ) => Ok((
            StatusCode::OK,
            to_json(&Transferred {
                id: *id,
                source: request.source.as_str(),
                destination: request.destination.as_str(),
                amount: request.amount.minor_units(),
                reference: request.reference.as_ref().map(|r| r.as_str()),
                status: "committed",
                source_balance: *source_balance,
                destination_balance: *destination_balance,
                created_at_ms: *created_at_ms,
            }),
        )),
        (Outcome::Opened { created_at_ms }, Command::OpenAccount(request)) => Ok((
            StatusCode::CREATED,
            to_json(&Opened {
                card_number: request.card.as_str(),
                balance: 0,
                held: 0,
                overdraft_limit: request.overdraft_limit,
                available: request.overdraft_limit,
                created_at_ms: *created_at_ms,
            }),
        )),
        (
            Outcome::Held {
                hold,
                balance,
                available,
            },
            Command::PlaceHold(_) | Command::CaptureHold(_) | Command::VoidHold(_) | Command::ExpireHold(_),
        ) => Ok((
            StatusCode::OK,
            to_json(&HoldAnswer {
                hold,
                balance: *balance,
                available: *available,
            }),
        )),
        (
            Outcome::LimitSet {
                balance,
                credit,
                available,
            },
            Command::SetLimit(request),
        ) => Ok((
            StatusCode::OK,
            to_json(&LimitSet {
                card_number: request.card.as_str(),
                balance: *balance,
                held: credit.held,
                overdraft_limit: credit.overdraft_limit,
                available: *available,
            }),
        )),
        (Outcome::Batch(outcomes), Command::Batch(items)) if outcomes.len() == items.len() => {
            let mut results = Vec::with_capacity(items.len());
            for (index, (item, outcome)) in items.iter().zip(outcomes).enumerate() {
                let (_, body) = outcome_result(&item.command(), outcome)?;
                let mut result: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
                result["index"] = index.into();
                result["type"] = item.type_name().into();
                results.push(result);
            }
            Ok((
                StatusCode::OK,
                to_json(&json!({ "status": "committed", "results": results })),
            ))
        }
        (Outcome::Refused(Refusal::BatchFailed { index, refusal }), Command::Batch(items)) => {
            Err(batch_failed(items, *index, refusal))
        }
        (Outcome::Bulk(outcomes), Command::BulkTransfer(bulk)) => {
            Ok((StatusCode::OK, bulk_results(bulk, outcomes)))
        }
        (Outcome::Refused(refusal), _) => Err(refusal_error(command, refusal)),
        (Outcome::StorageFailed, _) => Err(ApiError::storage_unavailable()),
        (Outcome::OutcomeUnknown, _) => Err(ApiError::outcome_unknown()),
        // A success of one kind for a command of another: a bug in the engine, never a silent 200.
        (
            Outcome::Posted { .. }
            | Outcome::Transferred { .. }
            | Outcome::Opened { .. }
            | Outcome::Held { .. }
            | Outcome::LimitSet { .. }
            | Outcome::Batch(_)
            | Outcome::Bulk(_),
            _,
        ) => {
            tracing::error!(?outcome, ?command, "an outcome that does not fit its command");
            Err(ApiError::new(ErrorCode::Internal, "internal error"))
        }
    }
}

/// The 200 body of `PATCH /accounts/{card}`: the account's spending position, in the order
/// `GET /accounts/{card}` gives it.
#[derive(Debug, Serialize)]
struct LimitSet<'a> {
    card_number: &'a str,
    balance: i64,
    held: i64,
    overdraft_limit: i64,
    available: i64,
}

/// The answer of `POST /holds`, a capture and a void: the hold, with its card's balance and
/// what is available on it now.
#[derive(Debug, Serialize)]
struct HoldAnswer<'a> {
    #[serde(flatten)]
    hold: &'a Hold,
    balance: i64,
    available: i64,
}

/// A refused all-or-nothing batch: the refused item's own error, and `linked_item_failed` for every
/// other item (none of them took effect).
fn batch_failed(items: &[BatchItem], index: usize, refusal: &Refusal) -> ApiError {
    let cause = items.get(index).map_or_else(
        || ApiError::new(ErrorCode::Internal, "internal error"),
        |item| refusal_error(&item.command(), refusal),
    );
    let results = (0..items.len())
        .map(|at| {
            let error = if at == index {
                serde_json::from_slice::<serde_json::Value>(&cause.body())
                    .map(|body| body["error"].clone())
                    .unwrap_or_default()
            } else {
                json!({
                    "code": ErrorCode::LinkedItemFailed.as_str(),
                    "message": format!("item {index} was refused, so this item did not take effect"),
                })
            };
            json!({ "index": at, "error": error })
        })
        .collect();
    let mut error = ApiError::new(
        ErrorCode::BatchFailed,
        format!(
            "item {index} was refused ({}: {}); nothing of the batch was changed",
            cause.code.as_str(),
            cause.message
        ),
    );
    error.detail = Some(Box::new(ErrorDetail {
        index: u32::try_from(index).ok(),
        results: Some(results),
        ..ErrorDetail::default()
    }));
    error
}

fn refusal_error(command: &Command, refusal: &Refusal) -> ApiError {
    match refusal {
        Refusal::InsufficientFunds { balance, available } => {
            let (what, amount) = match command {
                Command::Transaction(request) => ("withdrawal", request.amount.minor_units().unsigned_abs()),
                Command::Transfer(request) => ("transfer", request.amount.minor_units().unsigned_abs()),
                Command::PlaceHold(request) => ("hold", request.amount.minor_units().unsigned_abs()),
                _ => ("debit", 0),
            };
            // An account with no hold and no limit is answered as before holds existed.
            let message = if available == balance {
                format!("the {what} of {amount} exceeds the balance of {balance}; nothing was changed")
            } else {
                format!(
                    "the {what} of {amount} exceeds the {available} available (the balance of {balance}, \
                     less what is held, plus the overdraft limit); nothing was changed"
                )
            };
            let mut error = ApiError::new(ErrorCode::InsufficientFunds, message);
            error.balance = Some(*balance);
            if available != balance {
                error.detail = Some(Box::new(ErrorDetail {
                    available: Some(*available),
                    ..ErrorDetail::default()
                }));
            }
            error
        }
        Refusal::HoldNotFound { id } => {
            ApiError::new(ErrorCode::HoldNotFound, format!("no hold has id {id}"))
        }
        Refusal::HoldResolved { id, status } => {
            let code = match status {
                HoldStatus::Captured => ErrorCode::HoldCaptured,
                HoldStatus::Voided => ErrorCode::HoldVoided,
                HoldStatus::Expired | HoldStatus::Pending => ErrorCode::HoldExpired,
            };
            let message = match status {
                HoldStatus::Expired | HoldStatus::Pending => {
                    format!("hold {id} has expired and its funds are released; nothing was changed")
                }
                _ => format!(
                    "hold {id} was {} already; a hold is resolved once, nothing was changed",
                    status.as_str()
                ),
            };
            ApiError::new(code, message)
        }
        Refusal::CaptureExceedsHold { held } => {
            let amount = match command {
                Command::CaptureHold(request) => request.amount.map_or(0, |a| a.minor_units()),
                _ => 0,
            };
            ApiError::new(
                ErrorCode::CaptureExceedsHold,
                format!("the capture of {amount} exceeds the {held} held; nothing was changed"),
            )
        }
        Refusal::LimitBelowUsage { balance, held } => {
            let limit = match command {
                Command::SetLimit(request) => request.overdraft_limit,
                _ => 0,
            };
            let mut error = ApiError::new(
                ErrorCode::LimitBelowUsage,
                format!(
                    "the account's balance of {balance} with {held} held needs an overdraft limit of at \
                     least {}; {limit} is below it, nothing was changed",
                    i128::from(*held) - i128::from(*balance)
                ),
            );
            error.balance = Some(*balance);
            error
        }
        Refusal::BatchFailed { index, refusal } => match command {
            Command::Batch(items) => batch_failed(items, *index, refusal),
            _ => refusal_error(command, refusal),
        },
        Refusal::CardNotFound { card } => {
            let mut error = ApiError::new(
                ErrorCode::CardNotFound,
                format!("no account has card number {card}"),
            );
            // A route that names two cards says which one has no account.
            if let Command::Transfer(_) | Command::PlaceHold(_) = command {
                error.card_number = Some(card.as_str().to_owned());
            }
            error
        }
        Refusal::BalanceLimitExceeded { balance } => {
            let message = match command {
                Command::Transfer(_) => {
                    "the transfer would take the destination's balance past the largest representable amount"
                }
                Command::PlaceHold(_) => {
                    "the hold would take the card's held sum past the largest representable amount"
                }
                Command::CaptureHold(_) => {
                    "the capture would take the destination's balance past the largest representable amount"
                }
                _ => "the deposit would take the balance past the largest representable amount",
            };
            let mut error = ApiError::new(ErrorCode::BalanceLimitExceeded, message);
            error.balance = Some(*balance);
            error
        }
        Refusal::AccountExists => {
            let card = match command {
                Command::OpenAccount(request) => request.card.as_str(),
                _ => "",
            };
            ApiError::new(
                ErrorCode::AccountExists,
                format!("an account with card number {card} exists"),
            )
        }
        Refusal::IdempotencyKeyReused => ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "this Idempotency-Key was used with a different request; nothing was changed",
        ),
    }
}

/// Bytes one result of a bulk answer takes, about (`{"index":8189,"status":200,"id":123456789}`),
/// so that the answer is written into one allocation of the right size.
const BULK_RESULT_BYTES: usize = 48;

/// The 200 body of `POST /transfers/bulk`: `{"results":[...]}`, one result per item in input
/// order, written straight into one buffer (an 8,190-item answer is about 400 KB).
fn bulk_results(bulk: &BulkTransferRequest, outcomes: &[Outcome]) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + outcomes.len() * BULK_RESULT_BYTES);
    body.extend_from_slice(b"{\"results\":[");
    for (index, (item, outcome)) in bulk.items.iter().zip(outcomes).enumerate() {
        if index > 0 {
            body.push(b',');
        }
        write_bulk_result(&mut body, index, &item.command, outcome);
    }
    body.extend_from_slice(b"]}");
    body
}

/// The part of a stored `POST /transfers` answer that a bulk result repeats.
#[derive(serde::Deserialize)]
struct StoredTransfer {
    id: i64,
}

/// One item's result, `{"index","status","id"}` or `{"index","status","error"}`, with
/// `"replayed":true` when its idempotency key gave back an earlier answer. The status and error
/// are exactly what a single `POST /transfers` would have answered.
pub fn write_bulk_result(body: &mut Vec<u8>, index: usize, command: &Command, outcome: &Outcome) {
    use std::io::Write;
    // Writing into a Vec cannot fail.
    match outcome {
        Outcome::Transferred { id, .. } => {
            let _ = write!(body, "{{\"index\":{index},\"status\":200,\"id\":{id}}}");
        }
        Outcome::Replayed(stored) => match replayed_part(stored) {
            Some(ReplayedPart::Id(id)) => {
                let _ = write!(
                    body,
                    "{{\"index\":{index},\"status\":200,\"replayed\":true,\"id\":{id}}}"
                );
            }
            Some(ReplayedPart::Error(error)) => {
                // A stored refusal is `{"error":{...}}`: the result is that object, its index and
                // status in front.
                let _ = write!(
                    body,
                    "{{\"index\":{index},\"status\":{},\"replayed\":true,",
                    stored.status
                );
                body.extend_from_slice(error);
            }
            None => {
                tracing::error!(
                    status = stored.status,
                    "a stored answer a bulk result cannot repeat"
                );
                write_error_result(body, index, &ApiError::new(ErrorCode::Internal, "internal error"));
            }
        },
        _ => {
            let error = match outcome_result(command, outcome) {
                Err(error) => error,
                Ok(_) => {
                    tracing::error!(?outcome, "a bulk item's outcome that is not a transfer's");
                    ApiError::new(ErrorCode::Internal, "internal error")
                }
            };
            write_error_result(body, index, &error);
        }
    }
}

/// What a replayed item's stored answer gives its result.
enum ReplayedPart<'a> {
    Id(i64),
    /// `"error":{...}}`: the stored refusal without its opening brace.
    Error(&'a [u8]),
}

fn replayed_part(stored: &StoredAnswer) -> Option<ReplayedPart<'_>> {
    if stored.status == 200 {
        let transfer: StoredTransfer = serde_json::from_slice(&stored.body).ok()?;
        return Some(ReplayedPart::Id(transfer.id));
    }
    stored
        .body
        .strip_prefix(b"{")
        .filter(|rest| rest.starts_with(b"\"error\":"))
        .map(ReplayedPart::Error)
}

fn write_error_result(body: &mut Vec<u8>, index: usize, error: &ApiError) {
    use std::io::Write;
    let _ = write!(
        body,
        "{{\"index\":{index},\"status\":{},",
        error.status().as_u16()
    );
    // `{"error":{...}}` without its opening brace closes the result.
    body.extend_from_slice(&error.body()[1..]);
}

fn to_json(body: &impl Serialize) -> Vec<u8> {
    // Serializing our own plain structs cannot fail; an empty object is the safe fallback.
    serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec())
}

pub fn bytes_response(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub fn json_response(status: StatusCode, body: &impl Serialize) -> HttpResponse {
    bytes_response(status, to_json(body))
}

#[cfg(test)]
mod tests {
    use super::ErrorCode;

    /// A code's place in [`ErrorCode::ALL`]. The match is exhaustive, so a new code does not
    /// compile until it has a place here, and the test below fails until `ALL` has it there.
    fn position(code: ErrorCode) -> usize {
        match code {
            ErrorCode::InvalidJson => 0,
            ErrorCode::InvalidBody => 1,
            ErrorCode::MissingField => 2,
            ErrorCode::UnknownField => 3,
            ErrorCode::DuplicateField => 4,
            ErrorCode::InvalidCardNumber => 5,
            ErrorCode::InvalidAmount => 6,
            ErrorCode::InvalidReference => 7,
            ErrorCode::SameAccount => 8,
            ErrorCode::InvalidIdempotencyKey => 9,
            ErrorCode::InvalidParameter => 10,
            ErrorCode::CardNotFound => 11,
            ErrorCode::TransactionNotFound => 12,
            ErrorCode::NotFound => 13,
            ErrorCode::MethodNotAllowed => 14,
            ErrorCode::RequestTimeout => 15,
            ErrorCode::AccountExists => 16,
            ErrorCode::BodyTooLarge => 17,
            ErrorCode::UnsupportedMediaType => 18,
            ErrorCode::InsufficientFunds => 19,
            ErrorCode::BalanceLimitExceeded => 20,
            ErrorCode::IdempotencyKeyReused => 21,
            ErrorCode::Internal => 22,
            ErrorCode::QueueFull => 23,
            ErrorCode::StorageUnavailable => 24,
            ErrorCode::ShuttingDown => 25,
            ErrorCode::NotReady => 26,
            ErrorCode::Unauthorized => 27,
            ErrorCode::Forbidden => 28,
            ErrorCode::RateLimited => 29,
            ErrorCode::InvalidExpiry => 30,
            ErrorCode::InvalidLimit => 31,
            ErrorCode::InvalidBatch => 32,
            ErrorCode::HoldNotFound => 33,
            ErrorCode::HoldCaptured => 34,
            ErrorCode::HoldVoided => 35,
            ErrorCode::HoldExpired => 36,
            ErrorCode::CaptureExceedsHold => 37,
            ErrorCode::LimitBelowUsage => 38,
            ErrorCode::BatchFailed => 39,
            ErrorCode::LinkedItemFailed => 40,
            ErrorCode::OutcomeUnknown => 41,
        }
    }

    #[test]
    fn all_lists_every_code_once() {
        for (index, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(
                position(*code),
                index,
                "{code:?} is out of place in ErrorCode::ALL"
            );
        }
        let names: std::collections::BTreeSet<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len(), "two codes share a name");
    }
}
