//! HTTPS on the real binary, with certificates this test makes (rcgen): end to end; mutual TLS
//! accepted and refused (no certificate, another CA's, an expired one); an API key bound to a
//! client certificate; and a SIGHUP reload of the certificate while clients stay connected.
//!
//! The bugs these guard against: a TLS port that also answers plaintext, a client CA that is not
//! enforced, an expired certificate let in, a reload that drops open connections or never takes
//! effect, and a broken file on reload that takes the server down.

mod common;
#[path = "common/tls.rs"]
mod tls_support;

use std::time::Duration;

use common::{create_key, Deadline, Server, DEMO_CARD};
use hyper::StatusCode;
use tls_support::{connect, Ca, TlsFiles};

/// How long a SIGHUP may take to show (polled, never slept).
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);

fn start(db: &std::path::Path, args: &[String], extra: &[&str]) -> Server {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend_from_slice(extra);
    Server::start_on(db, &all)
}

#[tokio::test]
async fn https_end_to_end_with_api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let ca = Ca::new("tallyd test CA");
    let files = TlsFiles::write(dir.path(), &ca.server(), None);
    let key = create_key(&db, "checkout", "write", &[]);
    let server = start(&db, &files.args(), &[]);
    assert!(server.log_text().contains("scheme=\"https\"") || server.log_text().contains("scheme=https"));

    let mut client = connect(server.addr, &ca, None).await.unwrap().with_bearer(&key);
    let reply = client.transaction(DEMO_CARD, 250).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.i64("balance"), common::DEMO_OPENING + 250);
    // Keep-alive: many requests on the one TLS connection.
    for _ in 0..20 {
        assert_eq!(client.get("/healthz").await.status, StatusCode::OK);
    }
    let mut anonymous = connect(server.addr, &ca, None).await.unwrap();
    assert_eq!(
        anonymous.transaction(DEMO_CARD, 1).await.status,
        StatusCode::UNAUTHORIZED
    );
    // A client that does not trust this CA refuses the server.
    let stranger = Ca::new("another CA");
    assert!(connect(server.addr, &stranger, None).await.is_err());
    // Plain HTTP to the TLS port gets no HTTP answer.
    assert!(common::Client::try_connect(server.addr).await.is_ok());
    let mut plain = common::Client::try_connect(server.addr).await.unwrap();
    let request = hyper::Request::get("/healthz").body(Default::default()).unwrap();
    assert!(
        plain.try_request(request).await.is_err(),
        "plaintext must not be answered"
    );
}

/// Whether a request over a TLS connection with `identity` succeeds (the handshake, or with TLS 1.3
/// the first read after it, fails when the server refuses the client's certificate).
async fn mutual_ok(
    server: &Server,
    ca: &Ca,
    identity: Option<&tls_support::Leaf>,
    key: Option<&str>,
) -> Option<StatusCode> {
    let client = connect(server.addr, ca, identity).await.ok()?;
    let mut client = match key {
        Some(key) => client.with_bearer(key),
        None => client,
    };
    let request = hyper::Request::get(format!("/balance?card_number={DEMO_CARD}"))
        .header("host", "localhost")
        .body(Default::default())
        .unwrap();
    client.try_request(request).await.ok().map(|reply| reply.status)
}

#[tokio::test]
async fn mutual_tls_accepts_the_ca_s_clients_and_refuses_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = TlsFiles::write(dir.path(), &server_ca.server(), Some(&client_ca));
    let bound = create_key(&db, "gateway", "write", &["--client-cert-cn", "gateway"]);
    let free = create_key(&db, "reader", "read", &[]);
    let server = start(&db, &files.mutual_args(), &[]);

    let gateway = client_ca.client("gateway");
    let other = client_ca.client("other-service");
    assert_eq!(
        mutual_ok(&server, &server_ca, Some(&gateway), Some(&free)).await,
        Some(StatusCode::OK)
    );
    assert_eq!(
        mutual_ok(&server, &server_ca, Some(&gateway), Some(&bound)).await,
        Some(StatusCode::OK)
    );
    assert_eq!(
        mutual_ok(&server, &server_ca, Some(&other), Some(&bound)).await,
        Some(StatusCode::UNAUTHORIZED),
        "a key bound to the gateway's certificate is refused with another certificate"
    );
    assert_eq!(
        mutual_ok(&server, &server_ca, None, Some(&free)).await,
        None,
        "no client certificate"
    );
    let rogue = Ca::new("rogue CA").client("gateway");
    assert_eq!(
        mutual_ok(&server, &server_ca, Some(&rogue), Some(&bound)).await,
        None,
        "another CA's certificate"
    );
    let expired = client_ca.expired_client("gateway");
    assert_eq!(
        mutual_ok(&server, &server_ca, Some(&expired), Some(&bound)).await,
        None,
        "an expired certificate"
    );
    // The refusals were counted, and the server still serves.
    let mut client = connect(server.addr, &server_ca, Some(&gateway))
        .await
        .unwrap()
        .with_bearer(&free);
    let series = common::parse_prometheus(&client.get("/metrics").await.text);
    let failures = common::series_value(
        &series,
        "tallyd_tls_handshake_failures_total",
        &[("reason", "error")],
    );
    assert!(failures.is_some_and(|n| n >= 3.0), "{failures:?}");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_without_dropping_connected_clients() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let files = TlsFiles::write(dir.path(), &old_ca.server(), None);
    let server = start(&db, &files.args(), &[]);

    let mut connected = Vec::new();
    for _ in 0..8 {
        let mut client = connect(server.addr, &old_ca, None).await.unwrap();
        assert_eq!(client.transaction(DEMO_CARD, 1).await.status, StatusCode::OK);
        connected.push(client);
    }
    files.replace(&new_ca.server());
    server.signal("-HUP");
    let deadline = Deadline::new(RELOAD_DEADLINE, "new connections to get the new certificate");
    while connect(server.addr, &new_ca, None).await.is_err() {
        deadline.tick().await;
    }
    assert!(
        connect(server.addr, &old_ca, None).await.is_err(),
        "the old certificate is gone"
    );
    // Every client connected before the reload goes on, on the same connection.
    for client in &mut connected {
        let request = client.transaction_request(DEMO_CARD, 1);
        let reply = client
            .try_request(request)
            .await
            .expect("the connection survived the reload");
        assert_eq!(reply.status, StatusCode::OK);
    }
    // A broken file on the next SIGHUP changes nothing: the server keeps the certificate in force.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    server.signal("-HUP");
    let deadline = Deadline::new(RELOAD_DEADLINE, "the failed reload to be logged");
    while !server.log_text().contains("were not reloaded") {
        deadline.tick().await;
    }
    let mut client = connect(server.addr, &new_ca, None).await.unwrap();
    assert_eq!(client.transaction(DEMO_CARD, 1).await.status, StatusCode::OK);
    assert_eq!(common::db_transactions(&server.sqlite()), 8 + 8 + 1);
}

#[test]
fn serve_refuses_to_start_with_unreadable_tls_files() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    std::fs::write(dir.path().join("bad.pem"), "nothing here").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(&db)
        .arg("--tls-cert")
        .arg(dir.path().join("bad.pem"))
        .arg("--tls-key")
        .arg(dir.path().join("missing.key"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("TLS") && stderr.contains("bad.pem"), "{stderr}");
}
