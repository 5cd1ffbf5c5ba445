//! The benchmark's ceiling: a hyper 1 server that does nothing but HTTP.
//!
//! It reads each request's body whole (as tallyd must) and answers every request with the same fixed JSON that
//! a committed `POST /transaction` returns, without parsing, queueing or storing anything. `bench/run.sh`
//! drives it with the same wrk load as tallyd, so tallyd's throughput can be stated as a share of what HTTP
//! alone allows on the same two cores.
//!
//! Usage: `cargo run --release --example noop -- [ADDR]` (default `127.0.0.1:8081`; port 0 picks a free one).
//! Prints `listening addr=IP:PORT` to stderr once bound, like tallyd. Exits 0 on SIGINT or SIGTERM.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

/// The listen address when none is given.
const LISTEN_DEFAULT: &str = "127.0.0.1:8081";

/// The largest body read, as tallyd's default `--body-limit-bytes`.
const BODY_LIMIT_BYTES: usize = 1_048_576;

/// The answer to every request: what tallyd answers a committed transaction, so both send the same bytes.
const ANSWER: &[u8] =
    br#"{"id":1,"card_number":"1234567890","amount":150,"balance":100150,"status":"committed"}"#;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| LISTEN_DEFAULT.to_string());
    let listener = TcpListener::bind(&addr).await?;
    eprintln!("listening addr={}", listener.local_addr()?);
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = accept_loop(listener) => result,
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
    }
}

/// Serves each accepted connection on its own task until the listener fails.
async fn accept_loop(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        // Small answers on a keep-alive connection: don't let Nagle hold them back.
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            // A client that hangs up mid-request is not the server's error; there is nothing to report.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service_fn(answer))
                .await;
        });
    }
}

/// Reads the body, then answers the fixed JSON (or 413 when the body is over the limit).
async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let read = Limited::new(request.into_body(), BODY_LIMIT_BYTES)
        .collect()
        .await;
    let (status, body) = match read {
        Ok(_) => (StatusCode::OK, Bytes::from_static(ANSWER)),
        Err(_) => (StatusCode::PAYLOAD_TOO_LARGE, Bytes::new()),
    };
    let response = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .expect("a fixed status and header always build a response");
    Ok(response)
}
