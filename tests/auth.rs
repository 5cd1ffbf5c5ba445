//! API keys on the real binary: every route with no key, a wrong key, a revoked key and each scope;
//! revocation while clients are using a key; keys across a restart; idempotency keys that one API
//! key cannot replay for another; the `tallyd keys` commands; and the refusal to serve a
//! non-loopback address without keys.
//!
//! Every test runs on both backends: with `TALLYD_TEST_DB` (scripts/ci-postgres.sh) the harness
//! puts each database on PostgreSQL, and the keys are created, listed and revoked there through
//! the same `tallyd keys` commands.
//!
//! The bugs these guard against: a route forgotten by the door (reachable without a key), a scope
//! check that lets `read` move money, a revocation that needs a restart, one client replaying
//! another's stored answer, and a key that shows up in metrics or logs.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{create_key, keys, revoke_key, series_value, Client, Deadline, LedgerDb, Server, DEMO_CARD};
use hyper::StatusCode;

/// How long a revocation may take to reach a running server (the issue asks for a second; the
/// reload period is 250 ms; the rest is slack for a loaded CI machine).
const REVOCATION_DEADLINE: Duration = Duration::from_secs(3);

/// A database with one key of each scope and one revoked key, and the keys.
struct Keys {
    dir: tempfile::TempDir,
    read: String,
    write: String,
    admin: String,
    revoked: String,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("users.db");
        let read = create_key(&db, "reader", "read", &[]);
        let write = create_key(&db, "checkout", "write", &[]);
        let admin = create_key(&db, "ops", "admin", &[]);
        let revoked = create_key(&db, "old", "write", &[]);
        revoke_key(&db, "old");
        Keys {
            dir,
            read,
            write,
            admin,
            revoked,
        }
    }

    fn db(&self) -> std::path::PathBuf {
        self.dir.path().join("users.db")
    }
}

/// One request to every route, as (method, path, body, the scope it needs or None for public).
fn every_route(unique: &str) -> Vec<(&'static str, String, String, Option<&'static str>)> {
    let card = format!("7{unique:0>9}");
    vec![
        (
            "POST",
            "/transaction".into(),
            format!(r#"{{"card_number":"{DEMO_CARD}","amount":1}}"#),
            Some("write"),
        ),
        (
            "POST",
            "/transfers".into(),
            common::transfer_body(DEMO_CARD, "4000000000000001", 1),
            Some("write"),
        ),
        (
            "POST",
            "/transfers/bulk".into(),
            format!(
                r#"{{"transfers":[{}]}}"#,
                common::transfer_body(DEMO_CARD, "4000000000000001", 1)
            ),
            Some("write"),
        ),
        (
            "POST",
            "/accounts".into(),
            format!(r#"{{"card_number":"{card}"}}"#),
            Some("write"),
        ),
        (
            "GET",
            format!("/accounts/{DEMO_CARD}"),
            String::new(),
            Some("read"),
        ),
        (
            "GET",
            format!("/accounts/{DEMO_CARD}/entries"),
            String::new(),
            Some("read"),
        ),
        (
            "GET",
            "/transactions?idempotency_key=nope".into(),
            String::new(),
            Some("read"),
        ),
        ("GET", "/transactions/1".into(), String::new(), Some("read")),
        (
            "GET",
            format!("/balance?card_number={DEMO_CARD}"),
            String::new(),
            Some("read"),
        ),
        ("GET", "/metrics".into(), String::new(), Some("read")),
        ("GET", "/stats".into(), String::new(), Some("read")),
        ("GET", "/".into(), String::new(), Some("read")),
        ("GET", "/no-such-route".into(), String::new(), Some("read")),
        ("GET", "/healthz".into(), String::new(), None),
        ("GET", "/readyz".into(), String::new(), None),
    ]
}

async fn call(client: &mut Client, method: &str, path: &str, body: &str) -> common::Reply {
    if method == "POST" {
        client.post_json(path, body).await
    } else {
        client.get(path).await
    }
}

fn assert_unauthorized(reply: &common::Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}: {}", reply.text);
    assert_eq!(reply.error_code(), "unauthorized", "{what}");
    let challenge = reply.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "{what}: WWW-Authenticate {challenge:?}"
    );
    assert!(reply.json()["error"]["message"].is_string(), "{what}");
}

#[tokio::test]
async fn every_route_with_no_key_a_wrong_key_a_revoked_key_and_each_scope() {
    let keys = Keys::new();
    let server = Server::start_on(&keys.db(), &[]);
    let scopes = [
        ("read", &keys.read),
        ("write", &keys.write),
        ("admin", &keys.admin),
    ];
    for (n, (method, path, body, needed)) in every_route("1").into_iter().enumerate() {
        let what = format!("{method} {path}");
        let mut anonymous = server.client().await;
        let reply = call(&mut anonymous, method, &path, &body).await;
        match needed {
            None => assert_eq!(reply.status, StatusCode::OK, "{what} is public: {}", reply.text),
            Some(_) => assert_unauthorized(&reply, &format!("{what} without a key")),
        }
        for bad in [
            "tly_0000000000000000000000000000000000000000000000000000000000000000",
            &keys.revoked,
            "garbage",
        ] {
            let mut client = server.client().await.with_bearer(bad);
            let reply = call(&mut client, method, &path, &body).await;
            if needed.is_some() {
                assert_unauthorized(&reply, &format!("{what} with {bad:.8}"));
                assert!(
                    reply
                        .header("www-authenticate")
                        .unwrap()
                        .contains("invalid_token"),
                    "{what}"
                );
            }
        }
        for (i, (scope, key)) in scopes.iter().enumerate() {
            // Each scope opens its own account, so that POST /accounts is a fresh card every time.
            let (method, path, body, _) = every_route(&format!("{n}{i}")).swap_remove(n);
            let mut client = server.client().await.with_bearer(key);
            let reply = call(&mut client, method, &path, &body).await;
            let allowed = match needed {
                None | Some("read") => true,
                Some(_) => *scope != "read",
            };
            if allowed {
                assert!(
                    reply.status != StatusCode::UNAUTHORIZED && reply.status != StatusCode::FORBIDDEN,
                    "{what} with scope {scope}: {} {}",
                    reply.status,
                    reply.text
                );
            } else {
                assert_eq!(
                    reply.status,
                    StatusCode::FORBIDDEN,
                    "{what} with scope {scope}: {}",
                    reply.text
                );
                assert_eq!(reply.error_code(), "forbidden");
                assert!(reply
                    .header("www-authenticate")
                    .unwrap()
                    .contains("scope=\"write\""));
            }
        }
    }
    // The allowed calls did what they say, and the refused ones nothing: a deposit, a transfer and
    // a bulk request of one transfer each from write and admin, none from read or anyone without
    // a valid key.
    assert_eq!(common::db_transactions(&server.sqlite()), 6);
    let mut reader = server.client().await.with_bearer(&keys.read);
    assert_eq!(reader.balance(DEMO_CARD).await, common::DEMO_OPENING + 2 - 2 - 2);
}

#[tokio::test]
async fn metrics_public_opens_only_the_observability_routes() {
    let keys = Keys::new();
    let server = Server::start_on(&keys.db(), &["--metrics-public"]);
    let mut anonymous = server.client().await;
    for path in ["/metrics", "/stats", "/"] {
        assert_eq!(anonymous.get(path).await.status, StatusCode::OK, "{path}");
    }
    let reply = anonymous.get(&format!("/balance?card_number={DEMO_CARD}")).await;
    assert_unauthorized(&reply, "/balance");
    let reply = anonymous.transaction(DEMO_CARD, 5).await;
    assert_unauthorized(&reply, "/transaction");
}

#[tokio::test]
async fn metrics_count_requests_by_key_name_and_never_show_or_log_a_key() {
    let keys = Keys::new();
    let server = Server::start_with(&keys.db(), "127.0.0.1:0", &[], "debug");
    let mut writer = server.client().await.with_bearer(&keys.write);
    for _ in 0..3 {
        assert_eq!(writer.transaction(DEMO_CARD, 1).await.status, StatusCode::OK);
    }
    let mut reader = server.client().await.with_bearer(&keys.read);
    assert_eq!(
        reader.transaction(DEMO_CARD, 1).await.status,
        StatusCode::FORBIDDEN
    );
    let mut stranger = server.client().await.with_bearer(&keys.revoked);
    assert_eq!(stranger.get("/stats").await.status, StatusCode::UNAUTHORIZED);
    let text = reader.get("/metrics").await.text;
    let series = common::parse_prometheus(&text);
    let count = |key: &str, outcome: &str| {
        series_value(
            &series,
            "tallyd_api_requests_total",
            &[("key", key), ("outcome", outcome)],
        )
    };
    assert_eq!(count("checkout", "ok"), Some(3.0), "{text}");
    assert_eq!(count("reader", "forbidden"), Some(1.0));
    assert_eq!(count("(invalid)", "unauthorized"), Some(1.0));
    for key in [&keys.read, &keys.write, &keys.admin, &keys.revoked] {
        assert!(!text.contains(key.as_str()), "a key in /metrics");
        assert!(!text.contains(&key[4..20]), "part of a key in /metrics");
        assert!(
            !server.log_text().contains(&key[4..20]),
            "part of a key in the log"
        );
    }
}

#[tokio::test]
async fn a_key_revoked_while_16_clients_use_it_is_refused_by_all_of_them_within_a_deadline() {
    let keys = Keys::new();
    let server = Server::start_on(&keys.db(), &[]);
    let (started, mut all_started) = tokio::sync::mpsc::channel::<()>(16);
    let mut clients = Vec::new();
    for _ in 0..16 {
        let mut client = server.client().await.with_bearer(&keys.write);
        let started = started.clone();
        clients.push(tokio::spawn(async move {
            let mut ok = 0u32;
            loop {
                let reply = client.transaction(DEMO_CARD, 1).await;
                match reply.status {
                    StatusCode::OK => {
                        ok += 1;
                        if ok == 1 {
                            let _ = started.send(()).await;
                        }
                    }
                    StatusCode::UNAUTHORIZED => return (ok, Instant::now()),
                    other => panic!("unexpected {other}: {}", reply.text),
                }
            }
        }));
    }
    drop(started);
    for _ in 0..16 {
        all_started
            .recv()
            .await
            .expect("every client's key worked before the revocation");
    }
    revoke_key(&keys.db(), "checkout");
    let revoked_at = Instant::now();
    let deadline = tokio::time::timeout(REVOCATION_DEADLINE, async {
        let mut latest = revoked_at;
        for client in clients {
            let (ok, refused_at) = client.await.unwrap();
            assert!(ok >= 1);
            latest = latest.max(refused_at);
        }
        latest
    })
    .await;
    let latest = deadline.expect("every client got 401 within the deadline");
    eprintln!(
        "all 16 clients refused {:?} after the revocation",
        latest - revoked_at
    );
    // Every deposit answered 200 before the revocation is in the database, none after it.
    server.verify();
}

#[tokio::test]
async fn the_first_key_created_while_serving_turns_authentication_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    assert_eq!(
        client.transaction(DEMO_CARD, 1).await.status,
        StatusCode::OK,
        "no key: open, as before"
    );
    let key = create_key(&db, "first", "write", &[]);
    let deadline = Deadline::new(REVOCATION_DEADLINE, "authentication to turn on");
    while client.transaction(DEMO_CARD, 1).await.status != StatusCode::UNAUTHORIZED {
        deadline.tick().await;
    }
    let mut keyed = server.client().await.with_bearer(&key);
    assert_eq!(keyed.transaction(DEMO_CARD, 1).await.status, StatusCode::OK);
    // Revoking the only key must not open the server again.
    revoke_key(&db, "first");
    let deadline = Deadline::new(REVOCATION_DEADLINE, "the revocation");
    while keyed.transaction(DEMO_CARD, 1).await.status != StatusCode::UNAUTHORIZED {
        deadline.tick().await;
    }
    assert_eq!(
        client.transaction(DEMO_CARD, 1).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn keys_survive_a_restart_and_record_when_they_were_used() {
    let keys = Keys::new();
    let mut server = Server::start_on(&keys.db(), &[]);
    let mut client = server.client().await.with_bearer(&keys.write);
    assert_eq!(client.transaction(DEMO_CARD, 7).await.status, StatusCode::OK);
    // The first use is written back within a reload period or two.
    let deadline = Deadline::new(REVOCATION_DEADLINE, "last_used to be recorded");
    loop {
        let list = String::from_utf8(common::list_keys(&keys.db())).unwrap();
        let line = list
            .lines()
            .find(|l| l.starts_with("checkout "))
            .unwrap()
            .to_owned();
        if line.split_whitespace().nth(4) != Some("-") {
            break;
        }
        deadline.tick().await;
    }
    assert!(server.terminate().success());
    let server = Server::start_on(&keys.db(), &[]);
    let mut client = server.client().await.with_bearer(&keys.write);
    assert_eq!(client.transaction(DEMO_CARD, 7).await.status, StatusCode::OK);
    let mut revoked = server.client().await.with_bearer(&keys.revoked);
    assert_eq!(
        revoked.transaction(DEMO_CARD, 7).await.status,
        StatusCode::UNAUTHORIZED
    );
    let mut anonymous = server.client().await;
    assert_eq!(
        anonymous.transaction(DEMO_CARD, 7).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn an_idempotency_key_of_one_api_key_is_never_replayed_for_another() {
    let keys = Keys::new();
    let server = Server::start_on(&keys.db(), &[]);
    let body = format!(r#"{{"card_number":"{DEMO_CARD}","amount":-100}}"#);
    let mut checkout = server.client().await.with_bearer(&keys.write);
    let mut ops = server.client().await.with_bearer(&keys.admin);
    let first = checkout.post_keyed("/transaction", &body, "order-1").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let again = checkout.post_keyed("/transaction", &body, "order-1").await;
    assert!(again.replayed(), "the same caller's retry is a replay");
    assert_eq!(again.body, first.body);
    let other = ops.post_keyed("/transaction", &body, "order-1").await;
    assert_eq!(other.status, StatusCode::OK, "{}", other.text);
    assert!(!other.replayed(), "another key's answer is never replayed");
    assert_ne!(other.i64("id"), first.i64("id"));
    assert_eq!(
        other.i64("balance"),
        first.i64("balance") - 100,
        "it moved money again"
    );
    // A lookup by idempotency key finds the caller's own transaction.
    let mine = checkout.get("/transactions?idempotency_key=order-1").await;
    assert_eq!(mine.i64("id"), first.i64("id"));
    let theirs = ops.get("/transactions?idempotency_key=order-1").await;
    assert_eq!(theirs.i64("id"), other.i64("id"));
    let mut reader = server.client().await.with_bearer(&keys.read);
    let reply = reader.get("/transactions?idempotency_key=order-1").await;
    assert_eq!(
        reply.status,
        StatusCode::NOT_FOUND,
        "the reader made no request under it"
    );
}

#[test]
fn the_keys_commands_create_list_and_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let key = create_key(&db, "checkout", "write", &[]);
    assert_eq!(key.len(), 4 + 64);
    let bound = create_key(&db, "gateway", "admin", &["--client-cert-cn", "gateway.internal"]);
    assert_ne!(key, bound);
    let list = String::from_utf8(common::list_keys(&db)).unwrap();
    assert!(
        list.contains("checkout") && list.contains("write") && list.contains("gateway.internal"),
        "{list}"
    );
    assert!(
        !list.contains(&key[4..]) && !list.contains(&bound[4..]),
        "the list never shows a key"
    );
    let refused = |args: &[&str], says: &str| {
        let output = keys(&db, args);
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    refused(&["create", "--name", "checkout", "--scope", "read"], "exists");
    refused(&["create", "--name", "Bad Name", "--scope", "read"], "key name");
    refused(&["create", "--name", "x", "--scope", "root"], "invalid value");
    refused(&["revoke", "nobody"], "no key named nobody");
    revoke_key(&db, "checkout");
    refused(&["revoke", "checkout"], "revoked already");
    refused(
        &["create", "--name", "checkout", "--scope", "write"],
        "never reused",
    );
    // Only digests are stored.
    let hex = if common::postgres::enabled() {
        "encode(key_sha256, 'hex')"
    } else {
        "hex(key_sha256)"
    };
    let dump = common::Db::open(&db).texts(&format!(
        "SELECT name || scope || key_prefix || {hex} FROM api_keys"
    ));
    assert_eq!(dump.len(), 2);
    for row in dump {
        let row = row[0].to_lowercase();
        assert!(!row.contains(&key[8..]) && !row.contains(&bound[8..]));
    }
    // The database is a tallyd database like any other, and verify still passes.
    common::verify(&common::target(&db));
}

#[test]
fn serve_refuses_a_non_loopback_address_without_keys_and_says_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let output = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["serve", "--listen", "0.0.0.0:0", "--db"])
        .arg(common::target(&db))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("tallyd keys create"), "{stderr}");
    assert!(stderr.contains("--allow-unauthenticated"), "{stderr}");
    // With the flag it starts (and warns); with a key it starts without the flag.
    let server = Server::start_with(&db, "0.0.0.0:0", &["--allow-unauthenticated"], "info");
    assert!(
        server.log_text().contains("without API keys"),
        "{}",
        server.log_text()
    );
    drop(server);
    create_key(&db, "k", "read", &[]);
    let server = Server::start_with(&db, "0.0.0.0:0", &[], "info");
    assert_ne!(server.addr.port(), 0);
}
