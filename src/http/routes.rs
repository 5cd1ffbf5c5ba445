//! Routes and handlers. Paths are matched by `matchit` (the router inside axum); every `POST`
//! decodes its body into one typed command, queues it, and answers what the engine decided; every
//! `GET` of the ledger reads a committed snapshot from the read pool.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Body;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::auth::{admit, Identity, Peer};
use super::error::{
    bytes_response, json_response, outcome_result, ApiError, ErrorCode, HttpResponse, IDEMPOTENT_REPLAYED,
};
use super::{decode, ndjson, openapi, App};
use crate::analytics::OutcomeLabel;
use crate::auth::keys::Scope;
use crate::auth::{Caller, IdempotencyScopes};
use crate::domain::{CardNumber, Command, Kind, BULK_SCOPE, MONEY_SCOPES};
use crate::engine::{ledger, Outcome};
use crate::store::{AccountState, AccountView, HoldStatus, Reader, StoreError};
use crate::telemetry;

/// The live page, compiled into the binary so that it needs no files and no network.
const DASHBOARD_HTML: &str = include_str!("../../assets/dashboard.html");

/// Most entries on one page of a statement, and how many when `limit` is not given.
const ENTRIES_LIMIT_MAX: i64 = 100;
const ENTRIES_LIMIT_DEFAULT: u32 = 20;

/// The routes tallyd serves. `docs/openapi.json` describes each one; `openapi::tests` fails when
/// the two disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    Transaction,
    Transfers,
    Accounts,
    /// `POST /transfers/bulk`: many transfers, each decided on its own, in one commit.
    TransfersBulk,
    Account,
    AccountEntries,
    Transactions,
    TransactionById,
    Balance,
    Metrics,
    Stats,
    Healthz,
    Readyz,
    Dashboard,
    OpenApi,
    Holds,
    HoldById,
    HoldCapture,
    HoldVoid,
    AccountHolds,
    Batches,
}

impl Route {
    pub(super) const ALL: [Route; 21] = [
        Route::Transaction,
        Route::Transfers,
        Route::Accounts,
        Route::TransfersBulk,
        Route::Account,
        Route::AccountEntries,
        Route::Transactions,
        Route::TransactionById,
        Route::Balance,
        Route::Metrics,
        Route::Stats,
        Route::Healthz,
        Route::Readyz,
        Route::Dashboard,
        Route::OpenApi,
        Route::Holds,
        Route::HoldById,
        Route::HoldCapture,
        Route::HoldVoid,
        Route::AccountHolds,
        Route::Batches,
    ];

    /// The route's pattern: how `matchit` matches it and how `tallyd_http_requests_total` labels it.
    pub(super) fn pattern(self) -> &'static str {
        match self {
            Route::Transaction => "/transaction",
            Route::Transfers => "/transfers",
            Route::Accounts => "/accounts",
            Route::TransfersBulk => "/transfers/bulk",
            Route::Account => "/accounts/{card}",
            Route::AccountEntries => "/accounts/{card}/entries",
            Route::Transactions => "/transactions",
            Route::TransactionById => "/transactions/{id}",
            Route::Balance => "/balance",
            Route::Metrics => "/metrics",
            Route::Stats => "/stats",
            Route::Healthz => "/healthz",
            Route::Readyz => "/readyz",
            Route::Dashboard => "/",
            Route::OpenApi => "/openapi.json",
            Route::Holds => "/holds",
            Route::HoldById => "/holds/{id}",
            Route::HoldCapture => "/holds/{id}/capture",
            Route::HoldVoid => "/holds/{id}/void",
            Route::AccountHolds => "/accounts/{card}/holds",
            Route::Batches => "/batches",
        }
    }

    pub(super) fn is_post(self) -> bool {
        matches!(
            self,
            Route::Transaction
                | Route::Transfers
                | Route::Accounts
                | Route::TransfersBulk
                | Route::Holds
                | Route::HoldCapture
                | Route::HoldVoid
                | Route::Batches
        )
    }

    /// The methods this route accepts besides `GET` and `HEAD` or `POST`: an account's limits are
    /// changed with `PATCH` on the account.
    pub(super) fn also_patch(self) -> bool {
        self == Route::Account
    }

    /// The methods this route accepts, as an `Allow` header says them.
    fn allow(self) -> &'static str {
        if self.is_post() {
            "POST"
        } else if self.also_patch() {
            "GET, HEAD, PATCH"
        } else {
            "GET, HEAD"
        }
    }

    /// The scope a caller needs, or `None` for a route anyone may call. `/healthz` and `/readyz`
    /// are for probes, which carry no key; `/openapi.json` describes the API and holds no data,
    /// and a client needs it before it has a key; the observability routes are public only when
    /// the operator says so (`--metrics-public`), since they show volumes and balances.
    /// Changing an account's limit (`PATCH /accounts/{card}`) needs `admin`.
    fn needed_scope(self, method: &Method, metrics_public: bool) -> Option<Scope> {
        match self {
            Route::Healthz | Route::Readyz | Route::OpenApi => None,
            Route::Metrics | Route::Stats | Route::Dashboard if metrics_public => None,
            Route::Account if method == Method::PATCH => Some(Scope::Admin),
            // Every POST route changes the ledger; `is_post` is the one list of them.
            _ if self.is_post() => Some(Scope::Write),
            _ => Some(Scope::Read),
        }
    }

    fn accepts(self, method: &Method) -> bool {
        if self.is_post() {
            method == Method::POST
        } else {
            method == Method::GET || method == Method::HEAD || (self.also_patch() && method == Method::PATCH)
        }
    }
}

fn router() -> &'static matchit::Router<Route> {
    static ROUTER: OnceLock<matchit::Router<Route>> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let mut router = matchit::Router::new();
        for route in Route::ALL {
            router
                .insert(route.pattern(), route)
                .expect("the route patterns do not overlap");
        }
        router
    })
}

/// What a route answers with: a whole body, or one written while the request is still being read
/// (an NDJSON `POST /transfers/bulk`).
pub type ResponseBody = Either<Full<Bytes>, ndjson::ChannelBody>;

/// Answers one request from `peer`. Never fails: every problem becomes a JSON error response.
pub async fn handle<B>(
    app: Arc<App>,
    peer: Arc<Peer>,
    request: Request<B>,
) -> Result<Response<ResponseBody>, std::convert::Infallible>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = request.uri().path().to_owned();
    let matched = router().at(&path).ok();
    let route = matched.as_ref().map(|m| *m.value);
    // An unknown path needs a key like any route, so that a caller without one cannot map the API.
    let needed = route.map_or(Some(Scope::Read), |route| {
        route.needed_scope(request.method(), app.metrics_public)
    });
    let (identity, caller) = match needed {
        None => (None, Caller::Anonymous),
        Some(needed) => match admit(&app, &peer, request.headers(), needed) {
            (identity, Ok(caller)) => (Some(identity), caller),
            (identity, Err(error)) => {
                let response = error.into_response();
                record(route, Some(&identity), response.status().as_u16());
                return Ok(response.map(Either::Left));
            }
        },
    };
    let scopes = match &caller {
        Caller::Key(key) => Some(key.idempotency_scopes),
        Caller::Anonymous => None,
    };
    let param = |name: &str| {
        matched
            .as_ref()
            .and_then(|m| m.params.get(name))
            .unwrap_or("")
            .to_owned()
    };
    let query = request.uri().query().map(str::to_owned);
    let query = query.as_deref();
    let response = match route {
        None => ApiError::not_found().into_response(),
        Some(route) if !route.accepts(request.method()) => {
            ApiError::method_not_allowed(route.allow()).into_response()
        }
        Some(Route::Transaction) => {
            post(&app, request, scopes, |body| {
                decode::transaction(body).map(Command::Transaction)
            })
            .await
        }
        Some(Route::Transfers) => {
            post(&app, request, scopes, |body| {
                decode::transfer(body).map(Command::Transfer)
            })
            .await
        }
        Some(Route::Accounts) => {
            post(&app, request, scopes, |body| {
                decode::open_account(body).map(Command::OpenAccount)
            })
            .await
        }
        Some(Route::Account) if request.method() == Method::PATCH => {
            let card = param("card");
            post(&app, request, scopes, |body| {
                decode::set_limit(&card, body).map(Command::SetLimit)
            })
            .await
        }
        Some(Route::Holds) => {
            let expiry = app.hold_expiry_s;
            post(&app, request, scopes, |body| {
                decode::hold(body, expiry).map(Command::PlaceHold)
            })
            .await
        }
        Some(Route::HoldCapture) => {
            let id = param("id");
            post(&app, request, scopes, |body| {
                decode::capture(&id, body).map(Command::CaptureHold)
            })
            .await
        }
        Some(Route::HoldVoid) => {
            let id = param("id");
            post(&app, request, scopes, |body| {
                decode::void(&id, body).map(Command::VoidHold)
            })
            .await
        }
        Some(Route::Batches) => {
            let (expiry, items_max) = (app.hold_expiry_s, app.batch_items_max);
            post(&app, request, scopes, |body| {
                decode::batch(body, expiry, items_max).map(Command::Batch)
            })
            .await
        }
        Some(Route::HoldById) => hold_by_id(&app, &param("id")).await,
        Some(Route::AccountHolds) => account_holds(&app, &param("card"), query).await,
        Some(Route::TransfersBulk) if ndjson::is_ndjson(request.headers()) => {
            let response = ndjson::bulk(Arc::clone(&app), request, scopes).await;
            record(route, identity.as_ref(), response.status().as_u16());
            return Ok(response);
        }
        Some(Route::TransfersBulk) => bulk(&app, request, scopes).await,
        Some(Route::Account) => account(&app, &param("card")).await,
        Some(Route::AccountEntries) => entries(&app, &param("card"), query).await,
        Some(Route::Transactions) => {
            let prefix = match &caller {
                Caller::Key(key) => Arc::clone(&key.name),
                Caller::Anonymous => Arc::from(""),
            };
            transaction_by_key(&app, prefix, query).await
        }
        Some(Route::TransactionById) => transaction_by_id(&app, &param("id")).await,
        Some(Route::Balance) => balance(&app, query).await,
        Some(Route::Metrics) => metrics(&app),
        Some(Route::Stats) => stats(&app),
        Some(Route::Healthz) => healthz(),
        Some(Route::Readyz) => readyz(&app),
        Some(Route::Dashboard) => dashboard(),
        Some(Route::OpenApi) => openapi::document(),
    };
    record(route, identity.as_ref(), response.status().as_u16());
    Ok(response.map(Either::Left))
}

/// Counts an answer by route and status, and by caller when the route takes a key.
fn record(route: Option<Route>, identity: Option<&Identity>, status: u16) {
    telemetry::record_http(route.map_or("other", Route::pattern), status);
    let Some(identity) = identity else { return };
    static STAND_INS: OnceLock<[telemetry::CallerCounters; 3]> = OnceLock::new();
    let stand_ins = || {
        STAND_INS
            .get_or_init(|| ["(anonymous)", "(missing)", "(invalid)"].map(telemetry::CallerCounters::new))
    };
    match identity {
        Identity::Key(key) => key.counters().record(status),
        Identity::Anonymous => stand_ins()[0].record(status),
        Identity::Missing => stand_ins()[1].record(status),
        Identity::Invalid => stand_ins()[2].record(status),
    }
}

/// Every `POST`: the idempotency key, the body, one command; queue it, wait for the commit,
/// answer; and count it.
async fn post<B>(
    app: &App,
    request: Request<B>,
    scopes: Option<IdempotencyScopes>,
    decode: impl FnOnce(&[u8]) -> Result<Command, ApiError>,
) -> HttpResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let mut kind = "unknown";
    let mut replayed = false;
    // The route's pattern, for the metrics (a hold's id must not become a label).
    let post_label = router()
        .at(request.uri().path())
        .map_or("other", |matched| matched.value.pattern());
    let result = async {
        let mut keys = request.headers().get_all("idempotency-key").iter();
        let key = keys.next().map(HeaderValue::as_bytes);
        if keys.next().is_some() {
            // With two, a retry, a proxy or a log may each go by another one.
            return Err(ApiError::new(
                ErrorCode::InvalidIdempotencyKey,
                "send one Idempotency-Key header, not several",
            ));
        }
        let key = decode::idempotency_key(key)?;
        let body = read_body(app, request).await?;
        let command = decode(&body)?;
        kind = match &command {
            Command::Transaction(transaction) => transaction.amount.kind().as_str(),
            Command::Transfer(_) => Kind::Transfer.as_str(),
            Command::OpenAccount(_) | Command::SetLimit(_) => "account",
            Command::BulkTransfer(_) => Kind::Transfer.as_str(),
            Command::PlaceHold(_) => "hold",
            Command::CaptureHold(_) => "capture",
            Command::VoidHold(_) | Command::ExpireHold(_) => "void",
            Command::Batch(_) => "batch",
        };
        // Idempotency keys are scoped per API key as well as per route: two callers never share
        // (or replay) each other's answers. Without keys the scope is the route, as before.
        let scope = scopes.map_or(command.scope(), |scopes| scopes.of(command.scope()));
        let answer = app.engine.submit(command.clone(), key, scope)?;
        // Once queued, the command will be decided whatever happens to this request, so there is
        // no timeout here: a worker always answers, after at most one commit's time.
        let outcome = answer
            .await
            .map_err(|_| ApiError::new(ErrorCode::Internal, "the command's worker stopped"))?;
        replayed = matches!(outcome, Outcome::Replayed(_));
        let (status, body) = outcome_result(&command, &outcome)?;
        let mut response = bytes_response(status, body);
        if replayed {
            response
                .headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        Ok::<_, ApiError>(response)
    }
    .await;
    let (label, response) = match result {
        Ok(response) if response.status().is_success() => (OutcomeLabel::Committed, response),
        Ok(response) => (OutcomeLabel::Rejected, response),
        Err(error) => (error.outcome_label(), error.into_response()),
    };
    if replayed {
        // A replay moved nothing: it is counted apart, never as a commit or a refusal.
        telemetry::record_replay(post_label);
    } else if matches!(post_label, "/transaction" | "/transfers") {
        // What moves money alone: holds and batches are counted by route in the HTTP counters.
        let latency = started.elapsed();
        app.analytics.record(label, latency);
        telemetry::record_transaction(kind, label, latency);
    }
    response
}

/// Reads the whole body within the size and time limits.
async fn read_body<B>(app: &App, request: Request<B>) -> Result<Bytes, ApiError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    read_body_within(app, request, app.body_limit_bytes).await
}

/// Reads the whole body within `limit_bytes` and the time limit. The frames are gathered and
/// copied once into one buffer (none at all when the body came in one frame).
async fn read_body_within<B>(app: &App, request: Request<B>, limit_bytes: usize) -> Result<Bytes, ApiError>
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
                ErrorCode::UnsupportedMediaType,
                "send the body as application/json",
            ));
        }
    }
    let too_large = || {
        ApiError::new(
            ErrorCode::BodyTooLarge,
            format!("the body is larger than {limit_bytes} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit_bytes as u64) {
        return Err(too_large());
    }
    let limited = Limited::new(request.into_body(), limit_bytes);
    match tokio::time::timeout(app.request_timeout, limited.collect()).await {
        Err(_) => Err(ApiError::new(
            ErrorCode::RequestTimeout,
            format!(
                "the body did not arrive within {} ms",
                app.request_timeout.as_millis()
            ),
        )),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(error)) => Err(ApiError::new(
            ErrorCode::InvalidBody,
            format!("the body could not be read: {error}"),
        )),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// The request's one `Idempotency-Key` header, if it has one.
fn request_key(headers: &hyper::HeaderMap) -> Result<Option<crate::domain::IdempotencyKey>, ApiError> {
    let mut keys = headers.get_all("idempotency-key").iter();
    let key = keys.next().map(HeaderValue::as_bytes);
    if keys.next().is_some() {
        // With two, a retry, a proxy or a log may each go by another one.
        return Err(ApiError::new(
            ErrorCode::InvalidIdempotencyKey,
            "send one Idempotency-Key header, not several",
        ));
    }
    decode::idempotency_key(key)
}

/// `POST /transfers/bulk`: every item decoded first (one bad item refuses the request with its
/// index, and nothing is queued), then the whole request queued as one job, decided item by item
/// in one batch, and answered once that batch is durable. The request's own `Idempotency-Key`
/// replays the whole answer; each item's `idempotency_key` is a `POST /transfers` key.
async fn bulk<B>(app: &App, request: Request<B>, scopes: Option<IdempotencyScopes>) -> HttpResponse
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let started = Instant::now();
    let mut counted: Option<(Command, Outcome)> = None;
    let result = async {
        let _slot = bulk_slot(app)?;
        let key = request_key(request.headers())?;
        let body = read_body_within(app, request, app.bulk_body_limit_bytes).await?;
        let item_scope = scopes.map_or("/transfers", |scopes| scopes.of("/transfers"));
        let bulk = decode::bulk(&body, app.bulk_items_max, item_scope)?;
        drop(body);
        let command = Command::BulkTransfer(Arc::new(bulk));
        let scope = scopes.map_or(BULK_SCOPE, |scopes| scopes.of(BULK_SCOPE));
        let answer = app.engine.submit(command.clone(), key, scope)?;
        // Queued: it will be decided whatever happens to this request (see `post`).
        let outcome = answer
            .await
            .map_err(|_| ApiError::new(ErrorCode::Internal, "the command's worker stopped"))?;
        let replayed = matches!(outcome, Outcome::Replayed(_));
        let (status, body) = outcome_result(&command, &outcome)?;
        let mut response = bytes_response(status, body);
        if replayed {
            response
                .headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
        }
        counted = Some((command, outcome));
        Ok::<_, ApiError>(response)
    }
    .await;
    let latency = started.elapsed();
    match result {
        Ok(response) => {
            if let Some((command, outcome)) = counted {
                record_bulk(app, &command, &outcome, latency);
            }
            response
        }
        Err(error) => {
            let label = error.outcome_label();
            app.analytics.record(label, latency);
            telemetry::record_transaction(Kind::Transfer.as_str(), label, latency);
            error.into_response()
        }
    }
}

/// A place among the bulk requests in flight, or 503 `queue_full` before the body is read.
pub(super) fn bulk_slot(app: &App) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    Arc::clone(&app.bulk_slots)
        .try_acquire_owned()
        .map_err(|_| ApiError::from(crate::engine::SubmitError::QueueFull))
}

/// Counts a decided bulk request's items by outcome, as if each were a `POST /transfers`; a
/// request replayed whole counts as one replay.
pub(super) fn record_bulk(app: &App, command: &Command, outcome: &Outcome, latency: std::time::Duration) {
    let route = Route::TransfersBulk.pattern();
    let (Command::BulkTransfer(bulk), Outcome::Bulk(outcomes)) = (command, outcome) else {
        if matches!(outcome, Outcome::Replayed(_)) {
            telemetry::record_replay(route);
        }
        return;
    };
    let mut counts = [0_u64; OutcomeLabel::ALL.len()];
    let mut replays = 0;
    for (item, outcome) in bulk.items.iter().zip(outcomes) {
        let label = match outcome {
            Outcome::Transferred { .. } => OutcomeLabel::Committed,
            Outcome::Replayed(_) => {
                replays += 1;
                continue;
            }
            _ => match outcome_result(&item.command, outcome) {
                Ok(_) => OutcomeLabel::Committed,
                Err(error) => error.outcome_label(),
            },
        };
        counts[label as usize] += 1;
    }
    for (label, count) in OutcomeLabel::ALL.into_iter().zip(counts) {
        if count > 0 {
            app.analytics.record_many(label, count, latency);
            telemetry::record_transactions(Kind::Transfer.as_str(), label, count, latency);
        }
    }
    if replays > 0 {
        telemetry::record_replays(Route::Transfers.pattern(), replays);
    }
}

/// Runs a blocking read of the store on the blocking pool, never on a reactor thread.
async fn read<T: Send + 'static>(
    app: &App,
    read: impl FnOnce(&dyn Reader) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let reader = Arc::clone(&app.reader);
    tokio::task::spawn_blocking(move || read(reader.as_ref()))
        .await
        .map_err(|_| ApiError::storage_unavailable())?
        .map_err(|error| {
            tracing::warn!(%error, "a read failed");
            ApiError::storage_unavailable()
        })
}

/// A card account's committed state: the engine's, or, for an account opened outside tallyd that
/// the engine has not re-read yet (it does before its next batch), the database's.
async fn head(app: &App, card: &CardNumber) -> Result<Option<AccountState>, ApiError> {
    if let Some(state) = app.engine.account(card) {
        return Ok(Some(state));
    }
    let lookup = card.clone();
    read(app, move |reader| reader.current(&lookup)).await
}

fn card_not_found(card: &str) -> ApiError {
    ApiError::new(
        ErrorCode::CardNotFound,
        format!("no account has card number {card}"),
    )
}

/// The value of query parameter `name`, if given; given twice, it is refused (a proxy or a log that
/// reads the other one would see another request than the one answered).
fn query_value<'a>(query: Option<&'a str>, name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = decode::query_pairs(query)
        .filter(|(key, _)| *key == name)
        .map(|(_, value)| value);
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidParameter,
            format!("the query parameter {name} is given more than once"),
        ));
    }
    Ok(first)
}

/// `GET /balance?card_number=...[&at=UNIX_MS]`: a committed balance, now or as of a moment.
async fn balance(app: &App, query: Option<&str>) -> HttpResponse {
    let result = async {
        let text = query_value(query, "card_number")?
            .ok_or_else(|| ApiError::new(ErrorCode::MissingField, "give the card as ?card_number=..."))?;
        let card = decode::card_parameter(text, decode::Part::Query)?;
        let at = query_value(query, "at")?
            .map(|at| decode::id_parameter("at", at))
            .transpose()?;
        // Now: the engine's committed state, one lookup. As of a moment: a walk down the
        // account's chain from the head the engine knows.
        let Some(head) = head(app, &card).await? else {
            return Err(card_not_found(card.as_str()));
        };
        let balance = match at {
            None => Some(head.balance),
            Some(at) => {
                let lookup = card.clone();
                read(app, move |reader| {
                    reader.balance_at(&lookup, head.last_transaction_id, at)
                })
                .await?
            }
        };
        match balance {
            Some(balance) => Ok(json_response(
                StatusCode::OK,
                &json!({ "card_number": card.as_str(), "balance": balance }),
            )),
            None => Err(card_not_found(card.as_str())),
        }
    }
    .await;
    result.unwrap_or_else(ApiError::into_response)
}

/// `GET /accounts/{card}`.
async fn account(app: &App, card: &str) -> HttpResponse {
    let result = async {
        let card = decode::card_parameter(card, decode::Part::Path)?;
        let Some(head) = head(app, &card).await? else {
            return Err(card_not_found(card.as_str()));
        };
        let lookup = card.clone();
        read(app, move |reader| reader.opened_at(&lookup))
            .await?
            .map(|created_at_ms| {
                let credit = app.engine.credit(&card);
                let account = AccountView {
                    card_number: card.as_str().to_owned(),
                    balance: head.balance,
                    held: credit.held,
                    overdraft_limit: credit.overdraft_limit,
                    available: ledger::available(head.balance, credit),
                    created_at_ms,
                };
                json_response(StatusCode::OK, &account)
            })
            .ok_or_else(|| card_not_found(card.as_str()))
    }
    .await;
    result.unwrap_or_else(ApiError::into_response)
}

/// `GET /holds/{id}`.
async fn hold_by_id(app: &App, id: &str) -> HttpResponse {
    let result = async {
        let id = decode::id_parameter("the hold id", id)?;
        read(app, move |reader| reader.hold(id))
            .await?
            .map(|hold| json_response(StatusCode::OK, &hold))
            .ok_or_else(|| ApiError::new(ErrorCode::HoldNotFound, format!("no hold has id {id}")))
    }
    .await;
    result.unwrap_or_else(ApiError::into_response)
}

/// `GET /accounts/{card}/holds?status=pending&limit=20&starting_after=ID`: newest first.
async fn account_holds(app: &App, card: &str, query: Option<&str>) -> HttpResponse {
    let result = async {
        let card = decode::card_parameter(card, decode::Part::Path)?;
        let limit = page_limit(query)?;
        let cursor = query_value(query, "starting_after")?
            .map(|text| decode::id_parameter("starting_after", text))
            .transpose()?;
        let status = query_value(query, "status")?
            .map(|text| {
                HoldStatus::parse(text).ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidParameter,
                        "status must be pending, captured, voided or expired",
                    )
                })
            })
            .transpose()?;
        if head(app, &card).await?.is_none() {
            return Err(card_not_found(card.as_str()));
        }
        let page = read(app, move |reader| reader.holds(&card, status, limit, cursor)).await?;
        Ok(json_response(StatusCode::OK, &page))
    }
    .await;
    result.unwrap_or_else(ApiError::into_response)
}

/// A page's `limit` query parameter, as statements and hold lists take it.
fn page_limit(query: Option<&str>) -> Result<u32, ApiError> {
    Ok(match query_value(query, "limit")? {
        None => ENTRIES_LIMIT_DEFAULT,
        Some(text) => {
            let limit = decode::id_parameter("limit", text)
                .ok()
                .filter(|limit| *limit <= ENTRIES_LIMIT_MAX)
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::InvalidParameter,
                        format!("limit must be an integer from 1 to {ENTRIES_LIMIT_MAX}"),
                    )
                })?;
            limit as u32
        }
    })
}

/// `GET /accounts/{card}/entries?limit=20&starting_after=ID`: newest first.
async fn entries(app: &App, card: &str, query: Option<&str>) -> HttpResponse {
    let result = async {
        let card = decode::card_parameter(card, decode::Part::Path)?;
        let limit = page_limit(query)?;
        let cursor = query_value(query, "starting_after")?
            .map(|text| decode::id_parameter("starting_after", text))
            .transpose()?;
        let Some(head) = head(app, &card).await? else {
            return Err(card_not_found(card.as_str()));
        };
        let lookup = card.clone();
        read(app, move |reader| {
            reader.entries(&lookup, head.last_transaction_id, limit, cursor)
        })
        .await?
        .map(|page| json_response(StatusCode::OK, &page))
        .ok_or_else(|| card_not_found(card.as_str()))
    }
    .await;
    result.unwrap_or_else(ApiError::into_response)
}

fn transaction_not_found(what: String) -> ApiError {
    ApiError::new(ErrorCode::TransactionNotFound, what)
}

/// `GET /transactions/{id}`.
async fn transaction_by_id(app: &App, id: &str) -> HttpResponse {
    let result = async {
        let id = decode::id_parameter("the transaction id", id)?;
        read(app, move |reader| reader.transaction(id))
            .await?
            .map(|transaction| json_response(StatusCode::OK, &transaction))
            .ok_or_else(|| transaction_not_found(format!("no transaction has id {id}")))
    }
    .await;
    result.unwrap_or_else(ApiError::into_response)
}

/// `GET /transactions?idempotency_key=K`: what a keyed request produced, for a client that lost
/// its answer. The key is percent-decoded, as a query string's values are.
/// Keys are scoped per API key: `scope_prefix` is the caller's key name ("" without keys).
async fn transaction_by_key(app: &App, scope_prefix: Arc<str>, query: Option<&str>) -> HttpResponse {
    let result = async {
        let text = query_value(query, "idempotency_key")?.ok_or_else(|| {
            ApiError::new(ErrorCode::MissingField, "give the key as ?idempotency_key=...")
        })?;
        let bytes = decode::percent_decode(text, decode::Part::Query)
            .ok_or_else(|| ApiError::new(ErrorCode::InvalidIdempotencyKey, "the key is not percent-encoded properly"))?;
        let key = decode::idempotency_key(Some(&bytes))?.expect("a key was given");
        let lookup = key.clone();
        let scopes: Vec<String> = MONEY_SCOPES
            .iter()
            .map(|route| format!("{scope_prefix}{route}"))
            .collect();
        let scopes: Vec<&str> = scopes.iter().map(String::as_str).collect();
        let candidates = app.engine.key_candidates(&key, &scopes);
        read(app, move |reader| reader.transaction_by_key(&lookup, &candidates))
            .await?
            .map(|transaction| json_response(StatusCode::OK, &transaction))
            .ok_or_else(|| {
                transaction_not_found(format!(
                    "no transaction was produced under the key {:?} (it is unused, was pruned, or its request was refused)",
                    key.as_str()
                ))
            })
    }
    .await;
    result.unwrap_or_else(ApiError::into_response)
}

fn metrics(app: &App) -> HttpResponse {
    let (accounts, account_table_bytes) = app.engine.accounts_memory();
    telemetry::set_gauges(&telemetry::Gauges {
        queue_depth: app.engine.queue_depth(),
        average_balance: app.engine.state().average_balance(),
        uptime: app.analytics.uptime(),
        accounts,
        account_table_bytes,
        idempotency_keys_live: app.engine.live_keys(),
        write_back_lag: app
            .engine
            .state()
            .write_back_lag
            .load(std::sync::atomic::Ordering::Relaxed),
    });
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
        ApiError::new(ErrorCode::NotReady, reason).into_response()
    }
}

fn dashboard() -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(DASHBOARD_HTML.as_bytes())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    response
}
