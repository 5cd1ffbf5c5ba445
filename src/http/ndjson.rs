//! `POST /transfers/bulk` with `Content-Type: application/x-ndjson`: one transfer per line, for
//! files too large for one JSON body, read and answered in bounded memory.
//!
//! The body is read a frame at a time and cut into lines; at most `--bulk-items-max` decoded lines
//! are held at once. Each run of that many lines is one bulk job, decided and committed as a JSON
//! bulk request is, and its results are written to the response, one NDJSON line per transfer, as
//! soon as its commit is durable; then the next run is read. So an NDJSON request is **not atomic**:
//! when it stops early (a broken line, a full queue, a failed commit, a client that went away),
//! every result line already sent is durable and nothing after it was decided; a client resumes by
//! sending the lines without a result again, with their `idempotency_key`s making a resend of a line
//! that did commit a replay.
//!
//! Memory per request: one run of decoded transfers, one pending line of at most
//! [`BULK_ITEM_BYTES_MAX`] bytes plus the frame being read, and [`RESPONSE_CHUNKS_MAX`] runs of
//! results waiting for a client that reads slowly; past those, reading the request waits too.
//!
//! The status line is that of the first run: a broken first line is a 400 (with its `index`), a full
//! queue a 503, as for a JSON body. Once a run has committed the status is 200, and a later
//! problem is the last line of the body, `{"index", "status", "error"}` for the line it concerns.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{HeaderMap, Request, Response, StatusCode};

use super::error::{write_bulk_result, ApiError, ErrorCode};
use super::{decode, App};
use crate::auth::IdempotencyScopes;
use crate::config::limits::BULK_ITEM_BYTES_MAX;
use crate::domain::{BulkItem, BulkTransferRequest, Command, BULK_SCOPE};
use crate::engine::Outcome;

/// The media type of a streamed bulk request and of its answer.
pub const NDJSON: &str = "application/x-ndjson";

/// Runs of results a slow client may leave unread before the request's reading waits for it.
const RESPONSE_CHUNKS_MAX: usize = 2;

/// Whether the request's body is NDJSON.
pub fn is_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(NDJSON))
}

/// An answer body written while the request is still being read: each run's results as they are
/// durable. The channel is bounded, so a client that stops reading stops the reading of its request.
pub struct ChannelBody {
    chunks: tokio::sync::mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.chunks
            .poll_recv(cx)
            .map(|chunk| chunk.map(|bytes| Ok(Frame::data(bytes))))
    }
}

/// The lines of a body, read a frame at a time, blank ones skipped.
struct Lines<B> {
    body: Pin<Box<B>>,
    /// Bytes read and not yet cut into lines (at most one partial line and one frame).
    pending: Vec<u8>,
    /// Where in `pending` the unread part starts.
    start: usize,
    ended: bool,
    /// The index the next transfer gets.
    next_index: usize,
    request_timeout: std::time::Duration,
}

impl<B> Lines<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// The next non-blank line with its transfer's index, `None` at the end, or why the body
    /// cannot be read on (the index is that of the line it stopped at).
    async fn next(&mut self) -> Result<Option<(usize, Vec<u8>)>, ApiError> {
        loop {
            if let Some(at) = self.pending[self.start..].iter().position(|b| *b == b'\n') {
                let line = self.pending[self.start..self.start + at].to_vec();
                self.start += at + 1;
                if line.trim_ascii().is_empty() {
                    continue;
                }
                return Ok(Some(self.item(line)?));
            }
            if self.pending.len() - self.start > BULK_ITEM_BYTES_MAX {
                return Err(line_too_long().at_index(self.next_index));
            }
            if self.ended {
                let line = self.pending.split_off(self.start);
                self.start = self.pending.len();
                if line.trim_ascii().is_empty() {
                    return Ok(None);
                }
                return Ok(Some(self.item(line)?));
            }
            // Keep only the unread part before reading more, so the buffer never grows past a
            // line and a frame.
            self.pending.drain(..self.start);
            self.start = 0;
            match tokio::time::timeout(self.request_timeout, self.body.frame()).await {
                Err(_) => {
                    let message = format!(
                        "no part of the body arrived for {} ms",
                        self.request_timeout.as_millis()
                    );
                    return Err(ApiError::new(ErrorCode::RequestTimeout, message).at_index(self.next_index));
                }
                Ok(None) => self.ended = true,
                Ok(Some(Err(error))) => {
                    let message = format!("the body could not be read: {}", error.into());
                    return Err(ApiError::new(ErrorCode::InvalidBody, message).at_index(self.next_index));
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    fn item(&mut self, line: Vec<u8>) -> Result<(usize, Vec<u8>), ApiError> {
        let index = self.next_index;
        self.next_index += 1;
        if line.len() > BULK_ITEM_BYTES_MAX {
            return Err(line_too_long().at_index(index));
        }
        Ok((index, line))
    }
}

fn line_too_long() -> ApiError {
    ApiError::new(
        ErrorCode::BodyTooLarge,
        format!("a line is longer than {BULK_ITEM_BYTES_MAX} bytes"),
    )
}

/// One run of lines: the transfers decoded (with the index of the first), and what stopped it
/// early, if anything.
struct Run {
    first_index: usize,
    items: Vec<BulkItem>,
    stopped: Option<ApiError>,
    ended: bool,
}

async fn read_run<B>(lines: &mut Lines<B>, items_max: usize) -> Run
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut run = Run {
        first_index: lines.next_index,
        items: Vec::with_capacity(items_max.min(1024)),
        stopped: None,
        ended: false,
    };
    while run.items.len() < items_max {
        match lines.next().await {
            Ok(Some((index, line))) => match decode::bulk_item(&line) {
                Ok(item) => run.items.push(item),
                Err(error) => {
                    run.stopped = Some(error.at_index(index));
                    return run;
                }
            },
            Ok(None) => {
                run.ended = true;
                return run;
            }
            Err(error) => {
                run.stopped = Some(error);
                return run;
            }
        }
    }
    run
}

/// The run queued as one bulk job and its results rendered as NDJSON lines, or why it was not
/// decided (nothing of it happened).
async fn commit_run(
    app: &App,
    items: Vec<BulkItem>,
    first_index: usize,
    item_scope: &'static str,
) -> Result<Vec<u8>, ApiError> {
    let started = Instant::now();
    let command = Command::BulkTransfer(Arc::new(BulkTransferRequest { items, item_scope }));
    let answer = app.engine.submit(command.clone(), None, BULK_SCOPE)?;
    let outcome = answer
        .await
        .map_err(|_| ApiError::new(ErrorCode::Internal, "the command's worker stopped"))?;
    let (Command::BulkTransfer(bulk), Outcome::Bulk(outcomes)) = (&command, &outcome) else {
        return Err(match outcome {
            Outcome::StorageFailed => ApiError::storage_unavailable(),
            _ => ApiError::new(ErrorCode::Internal, "internal error"),
        });
    };
    super::routes::record_bulk(app, &command, &outcome, started.elapsed());
    let mut lines = Vec::with_capacity(outcomes.len() * 48);
    for (offset, (item, outcome)) in bulk.items.iter().zip(outcomes).enumerate() {
        write_bulk_result(&mut lines, first_index + offset, &item.command, outcome);
        lines.push(b'\n');
    }
    Ok(lines)
}

/// The last line of a stream that stopped at item `index`.
fn error_line(error: &ApiError) -> Bytes {
    let mut line = Vec::new();
    write_error_line(&mut line, error);
    Bytes::from(line)
}

fn write_error_line(line: &mut Vec<u8>, error: &ApiError) {
    use std::io::Write;
    let index = error
        .index()
        .map_or_else(|| "null".to_owned(), |index| index.to_string());
    let _ = write!(
        line,
        "{{\"index\":{index},\"status\":{},",
        error.status().as_u16()
    );
    line.extend_from_slice(&error.body()[1..]);
    line.push(b'\n');
}

/// `POST /transfers/bulk` with an NDJSON body. The request's own `Idempotency-Key` is refused:
/// the answer of a stream is not stored whole (it may be gigabytes); each line's key is.
pub async fn bulk<B>(
    app: Arc<App>,
    request: Request<B>,
    scopes: Option<IdempotencyScopes>,
) -> Response<http_body_util::Either<http_body_util::Full<Bytes>, ChannelBody>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::Either;
    let slot = match super::routes::bulk_slot(&app) {
        Ok(slot) => slot,
        Err(error) => return error.into_response().map(Either::Left),
    };
    if request.headers().contains_key("idempotency-key") {
        let error = ApiError::new(
            ErrorCode::InvalidIdempotencyKey,
            "an NDJSON bulk request is not stored whole: give each line its own idempotency_key instead of the header",
        );
        return error.into_response().map(Either::Left);
    }
    let item_scope = scopes.map_or("/transfers", |scopes| scopes.of("/transfers"));
    let mut lines = Lines {
        body: Box::pin(request.into_body()),
        pending: Vec::new(),
        start: 0,
        ended: false,
        next_index: 0,
        request_timeout: app.request_timeout,
    };
    // The first run decides the status line.
    let run = read_run(&mut lines, app.bulk_items_max).await;
    if run.items.is_empty() {
        let error = run.stopped.unwrap_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidJson,
                "the body has no lines; send one transfer per line",
            )
        });
        return error.into_response().map(Either::Left);
    }
    let mut first = match commit_run(&app, run.items, run.first_index, item_scope).await {
        Ok(first) => first,
        Err(error) => return error.into_response().map(Either::Left),
    };
    let (sender, chunks) = tokio::sync::mpsc::channel(RESPONSE_CHUNKS_MAX);
    if let Some(error) = &run.stopped {
        write_error_line(&mut first, error);
    }
    // The channel has room for the first run; the rest are written by a task of their own.
    let _ = sender.try_send(Bytes::from(first));
    if run.stopped.is_none() && !run.ended {
        tokio::spawn(async move {
            // The request's place among the bulk requests in flight, until its stream ends.
            let _slot = slot;
            loop {
                let run = read_run(&mut lines, app.bulk_items_max).await;
                if !run.items.is_empty() {
                    let (written, failed) =
                        match commit_run(&app, run.items, run.first_index, item_scope).await {
                            Ok(results) => (Bytes::from(results), false),
                            // Nothing of this run happened: the stream stops at its first line.
                            Err(error) => (error_line(&error.at_index(run.first_index)), true),
                        };
                    // A send fails when the client went away: what it was answered is durable,
                    // the rest undecided.
                    if sender.send(written).await.is_err() || failed {
                        return;
                    }
                }
                if let Some(error) = &run.stopped {
                    let _ = sender.send(error_line(error)).await;
                    return;
                }
                if run.ended {
                    return;
                }
            }
        });
    }
    let mut response = Response::new(Either::Right(ChannelBody { chunks }));
    *response.status_mut() = StatusCode::OK;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    response
}
