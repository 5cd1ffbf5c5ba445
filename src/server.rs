//! Starting and stopping: open the store, start the engine, accept connections, and shut down in
//! one fixed order.
//!
//! Shutdown order, written once: stop accepting; ask every connection to finish its current request
//! and close (hyper's graceful shutdown), waiting at most `SHUTDOWN_GRACE`; drop the last engine
//! handle, which closes the queue; the workers drain it, commit, answer, and exit; join them; the
//! store closes when its last worker lets go of it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_io_timeout::TimeoutStream;

use crate::analytics::{Analytics, BalanceSample};
use crate::auth::{self, rate::Limiter};
use crate::config::{limits, Config};
use crate::engine::{Engine, EngineState, Workers};
use crate::http::{self, App, Peer};
use crate::store::sqlite::{SqliteReader, SqliteStore};
use crate::store::StoreError;
use crate::telemetry;
use crate::tls::{self, Tls, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen: {0}")]
    Listen(#[source] std::io::Error),
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Unprotected(String),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(#[source] std::io::Error),
}

/// How long to back off after `accept` fails (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The binary's entry point: a tokio runtime, a listener, and SIGINT/SIGTERM as the shutdown signal.
pub fn serve_until_signal(config: Config) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let started = std::time::Instant::now();
    runtime.block_on(async {
        // Registered before anything is logged, so that a SIGTERM right after `listening` drains too.
        let shutdown = shutdown_signal()?;
        if crate::store::postgres::is_url(&config.db) {
            // The schema first: a database tallyd cannot use is refused before we listen.
            let backend = crate::server_postgres::open(&config).await?;
            let listener = TcpListener::bind(config.listen)
                .await
                .map_err(ServerError::Listen)?;
            crate::server_postgres::run(listener, backend, config, shutdown, started).await?;
            return Ok(ExitCode::SUCCESS);
        }
        // The store first: a database held by another tallyd is refused before we listen.
        let store = open_store(&config).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(ServerError::Listen)?;
        run(listener, store, config, shutdown, started).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Takes the database's writer lock and opens it (creating and seeding a new one), off the reactor.
pub async fn open_store(config: &Config) -> Result<SqliteStore, ServerError> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        SqliteStore::open(
            &config.db,
            config.durability,
            config.busy_timeout(),
            config.seed.as_deref(),
            config.lock_wait(),
        )
    })
    .await
    .expect("opening the store does not panic")
    .map_err(ServerError::Store)
}

/// Serves `store` on `listener` until `shutdown` completes, then drains and returns.
pub async fn run(
    listener: TcpListener,
    store: SqliteStore,
    config: Config,
    shutdown: impl Future<Output = ()>,
    started: std::time::Instant,
) -> Result<(), ServerError> {
    let address = listener.local_addr().map_err(ServerError::Listen)?;
    // Keys first: a server that would be open to the network refuses before it does anything else.
    let table = auth::reload::SqliteKeys::open(&config.db, store.key_touches())?;
    let (keys, reloader) = auth::reload::start(table)?;
    check_exposure(&config, address, keys.current().required())?;
    let (engine, workers) = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Engine::start(store, &config, http::render))
            .await
            .expect("starting the engine does not panic")?
    };
    let reader = SqliteReader::open(&config.db)?;
    let backend = Backend {
        engine,
        workers,
        reader: Arc::new(reader),
        keys,
        _guard: Box::new(reloader),
    };
    serve(listener, backend, config, shutdown, started).await
}

/// A started engine and what the handlers read from, whichever the database.
pub(crate) struct Backend {
    pub engine: Engine,
    pub workers: Workers,
    pub reader: Arc<dyn crate::store::Reader>,
    pub keys: Arc<auth::KeyRing>,
    /// Whatever must live as long as the server (the API keys' reload thread).
    pub _guard: Box<dyn std::any::Any + Send>,
}

/// Serves a started backend on `listener` until `shutdown` completes, then drains and returns.
pub(crate) async fn serve(
    listener: TcpListener,
    backend: Backend,
    config: Config,
    shutdown: impl Future<Output = ()>,
    started: std::time::Instant,
) -> Result<(), ServerError> {
    let Backend {
        engine,
        workers,
        reader,
        keys,
        _guard,
    } = backend;
    // Certificates are checked before anything starts: a typo in a path fails at once.
    let tls = config.tls_files().map(Tls::load).transpose()?.map(Arc::new);
    let metrics = telemetry::metrics_handle();
    telemetry::describe(usize::from(config.workers), engine.queue_capacity());
    let analytics = Arc::new(Analytics::new(
        config.latency_ring as usize,
        config.balance_ring as usize,
    ));
    let sampler = tokio::spawn(sample_every_second(
        Arc::clone(engine.state()),
        Arc::clone(&analytics),
        metrics.clone(),
    ));
    let limiter = config
        .rate_limit()
        .map(|(per_second, burst)| Limiter::new(per_second, burst));
    let app = Arc::new(App {
        engine,
        reader,
        analytics,
        metrics,
        workers: usize::from(config.workers),
        body_limit_bytes: config.body_limit_bytes as usize,
        bulk_items_max: config.bulk_items_max as usize,
        bulk_body_limit_bytes: config.bulk_body_limit_bytes(),
        bulk_slots: Arc::new(tokio::sync::Semaphore::new(limits::BULK_REQUESTS_IN_FLIGHT_MAX)),
        request_timeout: config.request_timeout(),
        keys,
        limiter,
        metrics_public: config.metrics_public,
        hold_expiry_s: i64::from(config.hold_expiry_s),
        batch_items_max: config.batch_items_max as usize,
    });
    let sweeper = tokio::spawn(sweep_rate_limits(Arc::clone(&app)));
    // Installed before `listening` is logged, so that a SIGHUP from then on reloads, never kills.
    let reloader = reload_on_hangup(tls.clone())?;

    let address = listener.local_addr().map_err(ServerError::Listen)?;
    let scheme = match &tls {
        Some(tls) if tls.mutual() => "https+mtls",
        Some(_) => "https",
        None => "http",
    };
    // How long the start took (the database opened, every account loaded, the journal replayed):
    // the benchmark reads it.
    let started_in_ms = started.elapsed().as_millis() as u64;
    tracing::info!(addr = %address, scheme, db = %crate::store::postgres::redacted(&config.db), durability = ?config.durability, started_in_ms, "listening");
    let connections = accept_until(listener, &app, tls, &config, shutdown).await;
    drain(connections).await;

    tracing::info!("stopped accepting; committing what is queued");
    sampler.abort();
    sweeper.abort();
    reloader.abort();
    drop(app);
    let _ = tokio::task::spawn_blocking(move || workers.join()).await;
    // Off the reactor: the key reload thread is joined, and may be finishing a read.
    let _ = tokio::task::spawn_blocking(move || drop(_guard)).await;
    tracing::info!("every queued transaction is committed and answered; bye");
    Ok(())
}

/// Refuses to serve a non-loopback address with no API key unless `--allow-unauthenticated`.
pub(crate) fn check_exposure(
    config: &Config,
    address: SocketAddr,
    keys_exist: bool,
) -> Result<(), ServerError> {
    if keys_exist || address.ip().is_loopback() {
        return Ok(());
    }
    if !config.allow_unauthenticated {
        return Err(ServerError::Unprotected(format!(
            "refusing to serve {address} without API keys: anyone who can reach it could move money. \
             Create a key first: `tallyd keys create --db {db} --name NAME --scope write` (clients then send \
             `Authorization: Bearer <key>`), or listen on 127.0.0.1, or pass --allow-unauthenticated \
             (TALLYD_ALLOW_UNAUTHENTICATED=true) to serve without keys until the first one is created",
            db = crate::store::postgres::redacted(&config.db)
        )));
    }
    tracing::warn!(
        addr = %address,
        "serving without API keys on a non-loopback address (--allow-unauthenticated): anyone who can reach \
         this port can move money; create a key with `tallyd keys create` and every request will need one"
    );
    Ok(())
}

/// Forgets the rate-limit buckets of callers that have gone quiet, so memory follows active callers.
async fn sweep_rate_limits(app: Arc<App>) -> Infallible {
    let mut ticker = tokio::time::interval(limits::RATE_LIMIT_SWEEP_PERIOD);
    loop {
        ticker.tick().await;
        if let Some(limiter) = &app.limiter {
            limiter.sweep();
        }
    }
}

/// Accepts connections until `shutdown`, at most `max_connections` at once. Returns the open
/// connections, already told to finish.
async fn accept_until(
    listener: TcpListener,
    app: &Arc<App>,
    tls: Option<Arc<Tls>>,
    config: &Config,
    shutdown: impl Future<Output = ()>,
) -> JoinSet<()> {
    let slots = Arc::new(Semaphore::new(config.max_connections as usize));
    let (stop, stopping) = watch::channel(false);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.idle_timeout());
    let conn = Conn {
        app: Arc::clone(app),
        builder,
        write_timeout: config.idle_timeout(),
        handshake_timeout: config.tls_handshake_timeout(),
        tls,
        stopping,
    };
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(serve_connection(stream, peer, conn.clone(), slot));
    }
    let _ = stop.send(true);
    connections
}

/// What every connection is served with, fixed at start.
#[derive(Clone)]
struct Conn {
    app: Arc<App>,
    builder: http1::Builder,
    /// Longest a write may make no progress (a client that never reads its answers).
    write_timeout: Duration,
    /// Longest a TLS handshake may take (a client that starts one and stops).
    handshake_timeout: Duration,
    tls: Option<Arc<Tls>>,
    stopping: watch::Receiver<bool>,
}

async fn serve_connection(stream: TcpStream, peer: SocketAddr, conn: Conn, _slot: OwnedSemaphorePermit) {
    let _ = stream.set_nodelay(true);
    // hyper bounds reading a request head (header_read_timeout) but not writing a response: a
    // client that never reads would hold its connection slot forever. A write that makes no
    // progress for the idle timeout closes the connection.
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(conn.write_timeout));
    let stream = Box::pin(stream);
    let Some(tls) = &conn.tls else {
        let peer = Peer {
            address: peer.ip(),
            client_cert_cn: None,
        };
        return serve_http(stream, peer, conn).await;
    };
    // The handshake is bounded as a whole: a client that sends half a ClientHello, or none, holds
    // its connection slot for the handshake timeout at most.
    let stream = match tokio::time::timeout(conn.handshake_timeout, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            telemetry::record_tls_handshake_failure("error");
            tracing::debug!(%error, peer = %peer, "TLS handshake failed");
            return;
        }
        Err(_) => {
            telemetry::record_tls_handshake_failure("timeout");
            tracing::debug!(peer = %peer, "TLS handshake timed out");
            return;
        }
    };
    let peer = Peer {
        address: peer.ip(),
        client_cert_cn: tls::client_cert_cn(stream.get_ref().1).map(Arc::from),
    };
    serve_http(stream, peer, conn).await;
}

/// Serves HTTP/1.1 on one connection, plain or TLS, until it closes or shutdown finishes it.
async fn serve_http<S>(stream: S, peer: Peer, conn: Conn)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Conn {
        app,
        builder,
        mut stopping,
        ..
    } = conn;
    let peer = Arc::new(peer);
    let service = service_fn(move |request| http::handle(Arc::clone(&app), Arc::clone(&peer), request));
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stopping.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%error, "connection ended with an error");
    }
}

/// Waits for open connections to finish their requests, then cuts off any that are still going.
async fn drain(mut connections: JoinSet<()>) {
    let finished = tokio::time::timeout(limits::SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the grace period; closing them"
        );
        connections.abort_all();
        while connections.join_next().await.is_some() {}
    }
}

/// Samples the average balance into its ring buffer once a second and runs the exporter's upkeep.
async fn sample_every_second(
    state: Arc<EngineState>,
    analytics: Arc<Analytics>,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Infallible {
    let mut ticker = tokio::time::interval(limits::BALANCE_SAMPLE_PERIOD);
    loop {
        ticker.tick().await;
        let average = state.average_balance();
        analytics.sample_balance(BalanceSample {
            unix_ms: crate::unix_ms_now(),
            average,
        });
        metrics.run_upkeep();
    }
}

/// Reloads the TLS files on every SIGHUP (and says so when there is no TLS to reload), for as long
/// as the returned task runs.
#[cfg(unix)]
fn reload_on_hangup(tls: Option<Arc<Tls>>) -> Result<tokio::task::JoinHandle<()>, ServerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup()).map_err(ServerError::Signal)?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let Some(tls) = &tls else {
                tracing::info!("SIGHUP: no TLS configured, nothing to reload");
                continue;
            };
            let tls = Arc::clone(tls);
            match tokio::task::spawn_blocking(move || tls.reload()).await {
                Ok(Ok(())) => {
                    tracing::info!("SIGHUP: reloaded the TLS certificate and key; new connections use them")
                }
                Ok(Err(error)) => {
                    tracing::error!(%error, "SIGHUP: the TLS files were not reloaded; the ones in force stay")
                }
                Err(error) => tracing::error!(%error, "SIGHUP: the TLS reload did not finish"),
            }
        }
    }))
}

#[cfg(not(unix))]
fn reload_on_hangup(_tls: Option<Arc<Tls>>) -> Result<tokio::task::JoinHandle<()>, ServerError> {
    Ok(tokio::spawn(async {}))
}

/// Installs the SIGINT and SIGTERM handlers now and returns a future that completes on either.
/// (An `async fn` would install them only when first polled, and a signal before that would kill
/// the process instead of draining it.)
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
        tracing::info!("shutdown signal received");
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received");
    })
}
