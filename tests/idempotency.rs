//! Idempotency keys over HTTP, against the real binary: concurrent duplicates execute once, replays
//! are the first answer byte for byte (also after a restart), a reused key with another request is
//! refused, stored refusals stay refusals, keys are scoped per route, requests refused before
//! execution store nothing, and a pruned key is a new key.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    db_transactions, seeded_card, transfer_body, Client, Deadline, LedgerDb, Reply, Server, DEMO_CARD,
};
use serde_json::Value;
use tokio::sync::Barrier;

#[track_caller]
fn assert_status(reply: &Reply, status: u16) {
    assert_eq!(reply.status.as_u16(), status, "{}", reply.text);
}

#[track_caller]
fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(
        (reply.status.as_u16(), reply.error_code().as_str()),
        (status, code),
        "{}",
        reply.text
    );
}

/// `reply` is `first` replayed: same status, same bytes, and marked as a replay.
#[track_caller]
fn assert_replay_of(reply: &Reply, first: &Reply) {
    assert_eq!(reply.status, first.status, "{}", reply.text);
    assert_eq!(
        reply.body, first.body,
        "the replay is the first answer byte for byte"
    );
    assert!(reply.replayed(), "no Idempotent-Replayed: true on {}", reply.text);
    assert!(!first.replayed(), "the first answer is not a replay");
}

/// Transactions in the database produced under `key`.
fn transactions_with_key(server: &Server, key: &str) -> i64 {
    let quoted = key.replace('\'', "''");
    server.sqlite().integer(&format!(
        "SELECT count(*) FROM transactions WHERE idempotency_key = '{quoted}'"
    ))
}

/// `clients` connections send their `(path, body)` under one key at the same moment; returns the
/// replies in client order.
async fn at_once(server: &Server, key: &str, requests: Vec<(&'static str, String)>) -> Vec<Reply> {
    let barrier = Arc::new(Barrier::new(requests.len()));
    let mut tasks = Vec::new();
    for (path, body) in requests {
        let mut client = Client::connect(server.addr).await;
        let barrier = Arc::clone(&barrier);
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move {
            let request = client.post_request(path, &body, &[("idempotency-key", &key)]);
            barrier.wait().await;
            client.request(request).await
        }));
    }
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

/// 16 clients send the same keyed request at the same moment, 20 times over and on 1 and 4
/// workers: each time exactly one executes, the other 15 get its answer replayed byte for byte,
/// every 200 carries the same id, and the money moved once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_duplicates_make_one_effect_and_share_one_id() {
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 20;
    for workers in ["1", "4"] {
        let server = Server::start(&["--workers", workers]);
        let (a, a_open) = seeded_card(1);
        let (b, b_open) = seeded_card(2);
        let mut replayed = 0;
        for round in 0..ROUNDS {
            let key = format!("dup-{round}");
            let (path, body) = if round % 2 == 0 {
                ("/transfers", transfer_body(&a, &b, 100 + round as i64))
            } else {
                (
                    "/transaction",
                    format!(r#"{{"card_number":"{a}","amount":{}}}"#, 100 + round as i64),
                )
            };
            let replies = at_once(&server, &key, vec![(path, body); CLIENTS]).await;
            let ids: HashSet<i64> = replies
                .iter()
                .map(|reply| {
                    assert_status(reply, 200);
                    reply.i64("id")
                })
                .collect();
            assert_eq!(
                ids.len(),
                1,
                "round {round}: every 200 carries the same id: {ids:?}"
            );
            let first: Vec<&Reply> = replies.iter().filter(|r| !r.replayed()).collect();
            assert_eq!(first.len(), 1, "round {round}: exactly one request executed");
            for reply in &replies {
                assert_eq!(reply.body, first[0].body, "round {round}: the same bytes");
            }
            replayed += replies.len() - 1;
            assert_eq!(transactions_with_key(&server, &key), 1, "round {round}");
        }
        let mut client = server.client().await;
        let moved_out: i64 = (0..ROUNDS as i64).filter(|r| r % 2 == 0).map(|r| 100 + r).sum();
        let deposited: i64 = (0..ROUNDS as i64).filter(|r| r % 2 == 1).map(|r| 100 + r).sum();
        assert_eq!(client.balance(&a).await, a_open - moved_out + deposited);
        assert_eq!(client.balance(&b).await, b_open + moved_out);
        assert_eq!(db_transactions(&server.sqlite()), ROUNDS as i64);
        eprintln!(
            "idempotency: {workers} worker(s): {ROUNDS} rounds of {CLIENTS} simultaneous duplicates: \
             {ROUNDS} executions, {replayed} replays"
        );
        server.verify();
    }
}

/// Duplicates that race with a *different* request under the same key: exactly one of them
/// executes; the others get its answer if they are the same request and `idempotency_key_reused`
/// if not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_different_requests_under_one_key_execute_once() {
    const ROUNDS: usize = 10;
    let server = Server::start(&[]);
    let (a, _) = seeded_card(1);
    let (b, _) = seeded_card(2);
    for round in 0..ROUNDS {
        let key = format!("race-{round}");
        let requests: Vec<(&'static str, String)> = (0..16)
            .map(|i| ("/transfers", transfer_body(&a, &b, 1 + (i % 2))))
            .collect();
        let replies = at_once(&server, &key, requests).await;
        let winners: Vec<(usize, &Reply)> = replies
            .iter()
            .enumerate()
            .filter(|(_, r)| r.status.as_u16() == 200)
            .collect();
        let parity = winners[0].0 % 2;
        for (i, reply) in replies.iter().enumerate() {
            if i % 2 == parity {
                assert_status(reply, 200);
                assert_eq!(reply.body, winners[0].1.body);
            } else {
                assert_error(reply, 422, "idempotency_key_reused");
                assert!(!reply.replayed());
            }
        }
        assert_eq!(transactions_with_key(&server, &key), 1);
    }
    assert_eq!(db_transactions(&server.sqlite()), ROUNDS as i64);
    server.verify();
}

/// Answers stored under keys (a transfer, a deposit, an opened account, a refusal) are replayed
/// byte for byte after a SIGKILL and a restart, move nothing, and the transactions can be looked
/// up by key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_after_a_restart_returns_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let (a, a_open) = seeded_card(1);
    let (b, b_open) = seeded_card(2);
    let requests: Vec<(&str, String, &str)> = vec![
        (
            "/transfers",
            format!(r#"{{"source":"{a}","destination":"{b}","amount":2500,"reference":"inv 7"}}"#),
            "restart-transfer",
        ),
        (
            "/transaction",
            format!(r#"{{"card_number":"{a}","amount":-400}}"#),
            "restart-withdrawal",
        ),
        (
            "/accounts",
            r#"{"card_number":"4111111111111111"}"#.to_owned(),
            "restart-open",
        ),
        ("/transfers", transfer_body(&b, &a, 10_000_000), "restart-refused"),
    ];
    let mut server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    let mut first = Vec::new();
    for (path, body, key) in &requests {
        first.push(client.post_keyed(path, body, key).await);
    }
    assert_status(&first[0], 200);
    assert_status(&first[1], 200);
    assert_status(&first[2], 201);
    assert_error(&first[3], 422, "insufficient_funds");
    server.kill();

    let server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    for ((path, body, key), first) in requests.iter().zip(&first) {
        let reply = client.post_keyed(path, body, key).await;
        assert_replay_of(&reply, first);
        // And the same request spelled differently is still the same request.
        let value: Value = serde_json::from_str(body).unwrap();
        let pretty = serde_json::to_string_pretty(&value).unwrap();
        assert_replay_of(&client.post_keyed(path, &pretty, key).await, first);
    }
    assert_eq!(client.balance(&a).await, a_open - 2500 - 400);
    assert_eq!(client.balance(&b).await, b_open + 2500);
    assert_eq!(db_transactions(&server.sqlite()), 2);

    // Looking a key up gives the transaction it produced; a refusal produced none.
    let transfer_id = first[0].i64("id");
    let found = client.get("/transactions?idempotency_key=restart-transfer").await;
    assert_status(&found, 200);
    let found = found.json();
    assert_eq!(found["id"], transfer_id);
    assert_eq!(found["kind"], "transfer");
    assert_eq!(found["reference"], "inv 7");
    assert_eq!(found["idempotency_key"], "restart-transfer");
    let by_id = client.get(&format!("/transactions/{transfer_id}")).await.json();
    assert_eq!(by_id, found);
    let withdrawal = client
        .get("/transactions?idempotency_key=restart-withdrawal")
        .await
        .json();
    assert_eq!(withdrawal["id"], first[1].i64("id"));
    assert_eq!(withdrawal["kind"], "withdrawal");
    assert_error(
        &client.get("/transactions?idempotency_key=restart-refused").await,
        404,
        "transaction_not_found",
    );
    assert_error(
        &client.get("/transactions?idempotency_key=restart-open").await,
        404,
        "transaction_not_found",
    );
    server.verify();
}

/// The same key with a different request is refused and moves nothing; the same request however
/// spelled (key order, spaces, an explicit null reference) is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_key_with_another_request_is_refused_and_moves_nothing() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, a_open) = seeded_card(1);
    let (b, b_open) = seeded_card(2);
    let (c, c_open) = seeded_card(3);
    let key = "order-1001";
    let first = client
        .post_keyed("/transfers", &transfer_body(&a, &b, 100), key)
        .await;
    assert_status(&first, 200);

    let same = [
        format!(r#"{{"amount":100,"destination":"{b}","source":"{a}"}}"#),
        format!(" {{ \"source\" : \"{a}\" ,\n\"destination\":\"{b}\", \"amount\" : 100 }} "),
        format!(r#"{{"source":"{a}","destination":"{b}","amount":100,"reference":null}}"#),
        format!(
            r#"{{"source":"\u00{:x}{}","destination":"{b}","amount":100}}"#,
            a.as_bytes()[0],
            &a[1..]
        ),
    ];
    // A card written in groups is the same card.
    let grouped = |card: &str| format!("{} {} {} {}", &card[..4], &card[4..8], &card[8..12], &card[12..]);
    let same: Vec<String> = same
        .into_iter()
        .chain([format!(
            r#"{{"source":"{}","destination":"{b}","amount":100}}"#,
            grouped(&a)
        )])
        .collect();
    for body in &same {
        assert_replay_of(&client.post_keyed("/transfers", body, key).await, &first);
    }
    let different = [
        transfer_body(&a, &b, 101),
        transfer_body(&b, &a, 100),
        transfer_body(&a, &c, 100),
        format!(r#"{{"source":"{a}","destination":"{b}","amount":100,"reference":"x"}}"#),
        format!(r#"{{"source":"{a}","destination":"{b}","amount":100,"reference":"null"}}"#),
        format!(r#"{{"source":"{a}","destination":"{b}","amount":100,"reference":""}}"#),
    ];
    for body in &different {
        let reply = client.post_keyed("/transfers", body, key).await;
        assert_error(&reply, 422, "idempotency_key_reused");
        assert!(!reply.replayed());
    }
    // A body that does not decode is refused as such before its key is looked at.
    let broken = client
        .post_keyed("/transfers", &transfer_body(&a, &b, 0), key)
        .await;
    assert_error(&broken, 400, "invalid_amount");
    // The first request still replays after all that.
    assert_replay_of(
        &client
            .post_keyed("/transfers", &transfer_body(&a, &b, 100), key)
            .await,
        &first,
    );

    assert_eq!(client.balance(&a).await, a_open - 100);
    assert_eq!(client.balance(&b).await, b_open + 100);
    assert_eq!(client.balance(&c).await, c_open);
    assert_eq!(db_transactions(&server.sqlite()), 1);
    server.verify();
}

/// A decided refusal is stored and replayed as such, even once the ledger would now accept the
/// request: a 422 after a deposit, a 404 after the account is opened, a 409 of `POST /accounts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_refusal_is_replayed_even_after_the_ledger_would_accept_it() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, a_open) = seeded_card(1);
    let (b, b_open) = seeded_card(2);
    let too_much = transfer_body(&a, &b, a_open + 1000);
    let refused = client.post_keyed("/transfers", &too_much, "k-422").await;
    assert_error(&refused, 422, "insufficient_funds");
    assert_eq!(refused.json()["error"]["balance"], a_open);
    let withdrawal = format!(r#"{{"card_number":"{a}","amount":{}}}"#, -(a_open + 1));
    let refused_withdrawal = client.post_keyed("/transaction", &withdrawal, "k-422").await;
    assert_error(&refused_withdrawal, 422, "insufficient_funds");

    assert_status(&client.transaction(&a, 5000).await, 200);
    let replay = client.post_keyed("/transfers", &too_much, "k-422").await;
    assert_replay_of(&replay, &refused);
    assert_replay_of(
        &client.post_keyed("/transaction", &withdrawal, "k-422").await,
        &refused_withdrawal,
    );
    // Without the key the same request now passes.
    assert_status(&client.post_json("/transfers", &too_much).await, 200);

    let new_card = "4111111111111111";
    let to_nowhere = transfer_body(&b, new_card, 10);
    let not_found = client.post_keyed("/transfers", &to_nowhere, "k-404").await;
    assert_error(&not_found, 404, "card_not_found");
    assert_eq!(not_found.json()["error"]["card_number"], new_card);
    let open = format!(r#"{{"card_number":"{new_card}"}}"#);
    assert_status(&client.post_json("/accounts", &open).await, 201);
    assert_replay_of(
        &client.post_keyed("/transfers", &to_nowhere, "k-404").await,
        &not_found,
    );

    let exists = format!(r#"{{"card_number":"{DEMO_CARD}"}}"#);
    let conflict = client.post_keyed("/accounts", &exists, "k-409").await;
    assert_error(&conflict, 409, "account_exists");
    assert_replay_of(&client.post_keyed("/accounts", &exists, "k-409").await, &conflict);

    assert_eq!(client.balance(&a).await, a_open + 5000 - (a_open + 1000));
    assert_eq!(client.balance(&b).await, b_open + a_open + 1000);
    assert_eq!(client.balance(new_card).await, 0);
    assert_eq!(transactions_with_key(&server, "k-422"), 0);
    assert_eq!(transactions_with_key(&server, "k-404"), 0);
    assert_eq!(db_transactions(&server.sqlite()), 2);
    server.verify();
}

/// One key on `/transfers`, `/transaction` and `/accounts` is three keys: each executes once and
/// replays its own answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_scoped_per_route() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, a_open) = seeded_card(1);
    let (b, b_open) = seeded_card(2);
    let key = "same-key-everywhere";
    let requests = [
        ("/transfers", transfer_body(&a, &b, 300)),
        ("/transaction", format!(r#"{{"card_number":"{a}","amount":50}}"#)),
        ("/accounts", r#"{"card_number":"4111111111111111"}"#.to_owned()),
    ];
    let mut first = Vec::new();
    for (path, body) in &requests {
        let reply = client.post_keyed(path, body, key).await;
        assert!(reply.status.is_success(), "{path}: {}", reply.text);
        assert!(!reply.replayed(), "{path} executed");
        first.push(reply);
    }
    for ((path, body), first) in requests.iter().zip(&first) {
        assert_replay_of(&client.post_keyed(path, body, key).await, first);
    }
    assert_ne!(first[0].i64("id"), first[1].i64("id"));
    assert_eq!(client.balance(&a).await, a_open - 300 + 50);
    assert_eq!(client.balance(&b).await, b_open + 300);
    assert_eq!(transactions_with_key(&server, key), 2);
    // A lookup by this key finds one of the two transactions it produced.
    let found = client.get(&format!("/transactions?idempotency_key={key}")).await;
    assert_status(&found, 200);
    let id = found.i64("id");
    assert!(
        id == first[0].i64("id") || id == first[1].i64("id"),
        "{}",
        found.text
    );
    server.verify();
}

/// Nothing is stored for a request refused before execution (a 400 of its body, a 415), so the
/// key is still free; malformed keys are refused and move nothing; a key's lookup is
/// percent-decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_refused_before_execution_store_nothing_and_bad_keys_are_refused() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, a_open) = seeded_card(1);
    let (b, _) = seeded_card(2);
    let key = "free after 400 & 415 = ok?+%";
    assert_error(
        &client
            .post_keyed("/transfers", &transfer_body(&a, &a, 5), key)
            .await,
        400,
        "same_account",
    );
    let text = client
        .post_with(
            "/transfers",
            &transfer_body(&a, &b, 5),
            &[("idempotency-key", key), ("content-type", "text/plain")],
        )
        .await;
    assert_error(&text, 415, "unsupported_media_type");
    let executed = client
        .post_keyed("/transfers", &transfer_body(&a, &b, 7), key)
        .await;
    assert_status(&executed, 200);
    assert!(!executed.replayed());

    // The lookup decodes %XX; a literal '+' is a space, as in any query string.
    let encoded = "free%20after%20400%20%26%20415%20%3D%20ok%3F%2B%25";
    let found = client
        .get(&format!("/transactions?idempotency_key={encoded}"))
        .await;
    assert_status(&found, 200);
    assert_eq!(found.i64("id"), executed.i64("id"));
    assert_eq!(found.json()["idempotency_key"], key);
    let plus = client
        .get("/transactions?idempotency_key=free+after+400+%26+415+%3D+ok%3F%2B%25")
        .await;
    assert_eq!(plus.i64("id"), executed.i64("id"), "'+' decodes to a space");
    assert_error(
        &client.get("/transactions?idempotency_key=free%").await,
        400,
        "invalid_idempotency_key",
    );
    assert_error(
        &client.get("/transactions?idempotency_key=%zz").await,
        400,
        "invalid_idempotency_key",
    );
    assert_error(
        &client.get("/transactions?idempotency_key=").await,
        400,
        "invalid_idempotency_key",
    );
    assert_error(
        &client.get("/transactions?idempotency_key=%09").await,
        400,
        "invalid_idempotency_key",
    );

    let long_ok = "k".repeat(255);
    assert_status(
        &client
            .post_keyed("/transfers", &transfer_body(&a, &b, 1), &long_ok)
            .await,
        200,
    );
    let too_long = "k".repeat(256);
    for bad in ["", too_long.as_str(), "tab\there"] {
        let reply = client
            .post_keyed("/transfers", &transfer_body(&a, &b, 1), bad)
            .await;
        assert_error(&reply, 400, "invalid_idempotency_key");
    }
    let non_ascii = client
        .request(
            hyper::Request::post("/transaction")
                .header("host", server.addr.to_string())
                .header("content-type", "application/json")
                .header(
                    "idempotency-key",
                    hyper::header::HeaderValue::from_bytes("clé".as_bytes()).unwrap(),
                )
                .body(http_body_util::Full::new(bytes::Bytes::from(format!(
                    r#"{{"card_number":"{a}","amount":5}}"#
                ))))
                .unwrap(),
        )
        .await;
    assert_error(&non_ascii, 400, "invalid_idempotency_key");
    assert_eq!(client.balance(&a).await, a_open - 7 - 1);
    assert_eq!(db_transactions(&server.sqlite()), 2);
    server.verify();
}

/// With `--idempotency-retention-s 1`, a key is replayed while it is kept, then pruned in the
/// background: its lookup stops finding it, and the same request under it is a new request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_key_is_a_new_key() {
    let server = Server::start(&["--idempotency-retention-s", "1"]);
    let mut client = server.client().await;
    let (a, a_open) = seeded_card(1);
    let body = format!(r#"{{"card_number":"{a}","amount":25}}"#);
    let key = "short-lived";
    let started = Instant::now();
    let first = client.post_keyed("/transaction", &body, key).await;
    assert_status(&first, 200);
    let replay = client.post_keyed("/transaction", &body, key).await;
    if started.elapsed() < Duration::from_millis(900) {
        assert_replay_of(&replay, &first);
    }
    let deadline = Deadline::new(Duration::from_secs(20), "the key to be pruned");
    loop {
        let lookup = client.get(&format!("/transactions?idempotency_key={key}")).await;
        if lookup.status.as_u16() == 404 {
            break;
        }
        assert_status(&lookup, 200);
        deadline.tick().await;
    }
    let pruned_after = started.elapsed();
    assert!(
        pruned_after >= Duration::from_secs(1),
        "pruned after {pruned_after:?}, before the retention"
    );
    let again = client.post_keyed("/transaction", &body, key).await;
    assert_status(&again, 200);
    assert!(!again.replayed(), "a pruned key is a new key");
    assert_ne!(again.i64("id"), first.i64("id"));
    assert_replay_of(&client.post_keyed("/transaction", &body, key).await, &again);
    // The lookup now finds the new transaction; the old one keeps its key in its own record.
    let found = client.get(&format!("/transactions?idempotency_key={key}")).await;
    assert_eq!(found.i64("id"), again.i64("id"));
    let old = client.get(&format!("/transactions/{}", first.i64("id"))).await;
    assert_eq!(old.json()["idempotency_key"], key);
    assert_eq!(client.balance(&a).await, a_open + 50);
    assert_eq!(transactions_with_key(&server, key), 2);
    eprintln!("idempotency: a key kept for 1 s was pruned after {pruned_after:.1?}");
    server.verify();
}

/// A 503 decided nothing, so nothing is stored under its key: with SQLite's write lock held from
/// outside, a keyed transfer fails with `503 storage_unavailable`; once the lock is gone the same
/// request under the same key executes (once), and is replayed after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_stores_nothing_so_the_retry_executes_once() {
    // Makes the commit fail with SQLite's write lock held from outside.
    sqlite_only!();
    let server = Server::start(&["--busy-timeout-ms", "100"]);
    let mut client = server.client().await;
    let (a, a_open) = seeded_card(1);
    let (b, b_open) = seeded_card(2);
    let body = transfer_body(&a, &b, 321);
    let outside = server.sqlite();
    outside.execute_batch("BEGIN IMMEDIATE").unwrap();
    let failed = client.post_keyed("/transfers", &body, "k-503").await;
    assert_error(&failed, 503, "storage_unavailable");
    outside.execute_batch("ROLLBACK").unwrap();
    drop(outside);
    assert_error(
        &client.get("/transactions?idempotency_key=k-503").await,
        404,
        "transaction_not_found",
    );
    let executed = client.post_keyed("/transfers", &body, "k-503").await;
    assert_status(&executed, 200);
    assert!(!executed.replayed(), "the 503 was stored under the key");
    assert_replay_of(&client.post_keyed("/transfers", &body, "k-503").await, &executed);
    assert_eq!(client.balance(&a).await, a_open - 321);
    assert_eq!(client.balance(&b).await, b_open + 321);
    assert_eq!(transactions_with_key(&server, "k-503"), 1);
    server.verify();
}

/// With a queue of one, most of 64 simultaneous keyed requests are turned away with `503
/// queue_full`; each client retries under its key until it gets a 200, and each request takes
/// effect exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_retries_after_queue_full_take_effect_once() {
    const CLIENTS: usize = 64;
    let server = Server::start(&["--queue-depth", "1", "--workers", "1"]);
    let (a, a_open) = seeded_card(1);
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let mut client = Client::connect(server.addr).await;
        let barrier = Arc::clone(&barrier);
        let (a, b) = (a.clone(), seeded_card(2 + i as u32).0);
        tasks.push(tokio::spawn(async move {
            let key = format!("full-{i}");
            let body = transfer_body(&a, &b, 10);
            barrier.wait().await;
            let mut turned_away = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let reply = client.post_keyed("/transfers", &body, &key).await;
                match reply.status.as_u16() {
                    200 => return (turned_away, reply.replayed()),
                    503 => {
                        assert_eq!(reply.error_code(), "queue_full");
                        assert!(!reply.replayed());
                        turned_away += 1;
                    }
                    _ => panic!("{key}: {} {}", reply.status, reply.text),
                }
                assert!(
                    Instant::now() < deadline,
                    "{key}: still turned away after a minute"
                );
                // Retry-After says 1 s; a test cannot wait that long 64 times over, and a retry
                // sooner is allowed: nothing was decided.
                tokio::task::yield_now().await;
            }
        }));
    }
    let mut turned_away = 0;
    for task in tasks {
        let (count, replayed) = task.await.unwrap();
        assert!(!replayed, "a request turned away was stored under its key");
        turned_away += count;
    }
    let mut client = server.client().await;
    assert_eq!(client.balance(&a).await, a_open - 10 * CLIENTS as i64);
    for i in 0..CLIENTS {
        assert_eq!(transactions_with_key(&server, &format!("full-{i}")), 1);
    }
    eprintln!("idempotency: {CLIENTS} keyed transfers through a queue of one: {turned_away} turned away with 503 and retried, each committed once");
    server.verify();
}

/// A replay moved nothing, so it is not counted as a commit: after one keyed transfer and three
/// replays of it, `/stats` and `tallyd_transactions_total` count one committed transaction (and a
/// replayed refusal is not a second refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_not_counted_as_commits() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, a_open) = seeded_card(1);
    let (b, _) = seeded_card(2);
    let body = transfer_body(&a, &b, 5);
    let too_much = transfer_body(&a, &b, a_open + 1);
    for _ in 0..4 {
        assert_status(&client.post_keyed("/transfers", &body, "counted").await, 200);
        assert_error(
            &client.post_keyed("/transfers", &too_much, "counted-422").await,
            422,
            "insufficient_funds",
        );
    }
    let stats = client.get("/stats").await.json();
    let metrics = common::parse_prometheus(&client.get("/metrics").await.text);
    let committed = common::series_value(
        &metrics,
        "tallyd_transactions_total",
        &[("kind", "transfer"), ("outcome", "committed")],
    );
    let refused = common::series_value(
        &metrics,
        "tallyd_transactions_total",
        &[("kind", "transfer"), ("outcome", "insufficient_funds")],
    );
    eprintln!(
        "idempotency: after 1 transfer + 3 replays and 1 refusal + 3 replays: /stats {}, metrics committed {committed:?}, insufficient_funds {refused:?}",
        stats["transactions"]
    );
    assert_eq!(db_transactions(&server.sqlite()), 1);
    assert_eq!(stats["transactions"]["committed"], 1, "{}", stats["transactions"]);
    assert_eq!(
        stats["transactions"]["insufficient_funds"], 1,
        "{}",
        stats["transactions"]
    );
    assert_eq!(committed, Some(1.0));
    assert_eq!(refused, Some(1.0));
}

/// Two `Idempotency-Key` headers are two keys for one request: which one a proxy, a log or a retry
/// library means is anyone's guess, so the request is refused (as a malformed key) and moves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_idempotency_key_headers_are_refused() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, a_open) = seeded_card(1);
    let (b, _) = seeded_card(2);
    let body = transfer_body(&a, &b, 5);
    let reply = client
        .post_with(
            "/transfers",
            &body,
            &[("idempotency-key", "first"), ("idempotency-key", "second")],
        )
        .await;
    assert_error(&reply, 400, "invalid_idempotency_key");
    assert_eq!(client.balance(&a).await, a_open);
    assert_eq!(db_transactions(&server.sqlite()), 0);
}
