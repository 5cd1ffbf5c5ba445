//! Holds, credit limits and all-or-nothing batches over HTTP, against the real binary: a hotel's
//! authorization and capture, voids, expiry by the sweeper and across a restart, overdraft limits
//! that holds count against, batches that fund and spend and fail whole, idempotent retries, a
//! crash between them, and `tallyd verify` after each.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{
    create_key, db_transactions, Client, Deadline, LedgerDb, Reply, Server, DEMO_CARD, DEMO_OPENING,
};
use http_body_util::Full;
use hyper::Request;
use serde_json::{json, Value};

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

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

async fn open(client: &mut Client, card: &str, limit: Option<i64>) {
    let body = match limit {
        Some(limit) => json!({ "card_number": card, "overdraft_limit": limit }),
        None => json!({ "card_number": card }),
    };
    assert_status(&client.post_json("/accounts", &body.to_string()).await, 201);
}

async fn hold(client: &mut Client, body: Value) -> Reply {
    client.post_json("/holds", &body.to_string()).await
}

async fn account(client: &mut Client, card: &str) -> Value {
    let reply = client.get(&format!("/accounts/{card}")).await;
    assert_status(&reply, 200);
    reply.json()
}

/// `(balance, held, available)` of an account.
async fn position(client: &mut Client, card: &str) -> (i64, i64, i64) {
    let account = account(client, card).await;
    let field = |name: &str| account[name].as_i64().unwrap();
    (field("balance"), field("held"), field("available"))
}

async fn patch(client: &mut Client, path: &str, body: &str) -> Reply {
    let request = Request::patch(path)
        .header("host", "tallyd")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    client.request(request).await
}

#[tokio::test]
async fn a_hotel_holds_300_captures_270_and_the_rest_is_released() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let hotel = "5000000000000001";
    open(&mut client, hotel, None).await;

    let held = hold(
        &mut client,
        json!({ "card_number": DEMO_CARD, "amount": 30_000, "destination": hotel, "reference": "room 12" }),
    )
    .await;
    assert_status(&held, 200);
    let held = held.json();
    assert_eq!(held["status"], "pending");
    assert_eq!(held["amount"], 30_000);
    assert_eq!(held["destination"], hotel);
    assert_eq!(held["balance"], DEMO_OPENING);
    assert_eq!(held["available"], DEMO_OPENING - 30_000);
    let week_ms = 7 * 24 * 3600 * 1000;
    assert_eq!(
        held["expires_at_ms"].as_i64().unwrap() - held["created_at_ms"].as_i64().unwrap(),
        week_ms,
        "the default expiry is 7 days"
    );
    let id = held["id"].as_i64().unwrap();
    assert_eq!(
        position(&mut client, DEMO_CARD).await,
        (DEMO_OPENING, 30_000, DEMO_OPENING - 30_000)
    );

    // Every debit is decided against what is available, not the balance.
    let too_much = client.transaction(DEMO_CARD, -(DEMO_OPENING - 29_999)).await;
    assert_error(&too_much, 422, "insufficient_funds");
    assert_eq!(too_much.json()["error"]["available"], DEMO_OPENING - 30_000);
    let second = hold(
        &mut client,
        json!({ "card_number": DEMO_CARD, "amount": DEMO_OPENING }),
    )
    .await;
    assert_error(&second, 422, "insufficient_funds");

    let captured = client
        .post_json(&format!("/holds/{id}/capture"), r#"{"amount":27000}"#)
        .await;
    assert_status(&captured, 200);
    let captured = captured.json();
    assert_eq!(captured["status"], "captured");
    assert_eq!(captured["captured_amount"], 27_000);
    assert_eq!(captured["balance"], DEMO_OPENING - 27_000);
    assert_eq!(
        captured["available"],
        DEMO_OPENING - 27_000,
        "the rest is released"
    );
    let transaction = captured["transaction_id"].as_i64().unwrap();
    let posted = client.get(&format!("/transactions/{transaction}")).await;
    assert_status(&posted, 200);
    let posted = posted.json();
    assert_eq!(posted["kind"], "transfer");
    assert_eq!(posted["amount"], 27_000);
    assert_eq!(posted["reference"], "room 12");
    assert_eq!(posted["legs"][0]["card_number"], DEMO_CARD);
    assert_eq!(posted["legs"][1]["card_number"], hotel);
    assert_eq!(client.balance(hotel).await, 27_000);
    assert_eq!(
        position(&mut client, DEMO_CARD).await,
        (DEMO_OPENING - 27_000, 0, DEMO_OPENING - 27_000)
    );

    // Resolved once.
    let again = client.post_json(&format!("/holds/{id}/capture"), "").await;
    assert_error(&again, 409, "hold_captured");
    assert_error(
        &client.post_json(&format!("/holds/{id}/void"), "").await,
        409,
        "hold_captured",
    );
    let stored = client.get(&format!("/holds/{id}")).await;
    assert_status(&stored, 200);
    assert_eq!(stored.json()["status"], "captured");
    assert_eq!(stored.json()["transaction_id"], transaction);
    assert_eq!(
        db_transactions(&server.sqlite()),
        1,
        "one capture, one transaction"
    );
    server.verify();
}

#[tokio::test]
async fn voids_release_everything_and_refusals_say_why() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let placed = hold(&mut client, json!({ "card_number": DEMO_CARD, "amount": 500 })).await;
    assert_status(&placed, 200);
    assert_eq!(placed.json()["destination"], Value::Null);
    let id = placed.json()["id"].as_i64().unwrap();

    let over = client
        .post_json(&format!("/holds/{id}/capture"), r#"{"amount":501}"#)
        .await;
    assert_error(&over, 422, "capture_exceeds_hold");
    let voided = client.post_json(&format!("/holds/{id}/void"), "{}").await;
    assert_status(&voided, 200);
    assert_eq!(voided.json()["status"], "voided");
    assert_eq!(voided.json()["available"], DEMO_OPENING);
    assert_error(
        &client.post_json(&format!("/holds/{id}/capture"), "").await,
        409,
        "hold_voided",
    );
    assert_error(
        &client.post_json(&format!("/holds/{id}/void"), "").await,
        409,
        "hold_voided",
    );
    assert_error(
        &client.post_json("/holds/999/capture", "").await,
        404,
        "hold_not_found",
    );
    assert_error(&client.get("/holds/999").await, 404, "hold_not_found");
    assert_error(&client.get("/holds/abc").await, 400, "invalid_parameter");
    let cases = [
        (
            json!({ "card_number": DEMO_CARD, "amount": 5, "expires_in_s": 0 }),
            "invalid_expiry",
        ),
        (
            json!({ "card_number": DEMO_CARD, "amount": 5, "expires_in_s": 2_592_001 }),
            "invalid_expiry",
        ),
        (json!({ "card_number": DEMO_CARD, "amount": 0 }), "invalid_amount"),
        (
            json!({ "card_number": DEMO_CARD, "amount": 5, "destination": DEMO_CARD }),
            "same_account",
        ),
        (json!({ "card_number": DEMO_CARD }), "missing_field"),
    ];
    for (body, code) in cases {
        assert_error(&hold(&mut client, body.clone()).await, 400, code);
    }
    assert_error(
        &hold(&mut client, json!({ "card_number": "9999999999", "amount": 5 })).await,
        404,
        "card_not_found",
    );
    assert_error(
        &client
            .post_json(&format!("/holds/{id}/capture"), r#"{"amount":1.5}"#)
            .await,
        400,
        "invalid_amount",
    );
    // A capture without a destination pays the outside world, like a withdrawal.
    let placed = hold(&mut client, json!({ "card_number": DEMO_CARD, "amount": 700 })).await;
    let id = placed.json()["id"].as_i64().unwrap();
    let captured = client.post_json(&format!("/holds/{id}/capture"), "").await;
    assert_status(&captured, 200);
    assert_eq!(captured.json()["captured_amount"], 700);
    let transaction = captured.json()["transaction_id"].as_i64().unwrap();
    let posted = client.get(&format!("/transactions/{transaction}")).await.json();
    assert_eq!(posted["kind"], "withdrawal");
    assert_eq!(client.balance(DEMO_CARD).await, DEMO_OPENING - 700);

    // The list, newest first, filtered and paged.
    let all = client.get(&format!("/accounts/{DEMO_CARD}/holds?limit=1")).await;
    assert_status(&all, 200);
    assert_eq!(all.json()["data"][0]["id"], id);
    assert_eq!(all.json()["has_more"], true);
    let older = client
        .get(&format!("/accounts/{DEMO_CARD}/holds?starting_after={id}"))
        .await
        .json();
    assert_eq!(older["data"].as_array().unwrap().len(), 1);
    assert_eq!(older["data"][0]["status"], "voided");
    let pending = client
        .get(&format!("/accounts/{DEMO_CARD}/holds?status=pending"))
        .await
        .json();
    assert_eq!(pending["data"], json!([]));
    assert_error(
        &client
            .get(&format!("/accounts/{DEMO_CARD}/holds?status=open"))
            .await,
        400,
        "invalid_parameter",
    );
    assert_error(
        &client.get("/accounts/9999999999/holds").await,
        404,
        "card_not_found",
    );
    server.verify();
}

#[tokio::test]
async fn the_sweeper_expires_holds_and_a_late_capture_is_refused() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let placed = hold(
        &mut client,
        json!({ "card_number": DEMO_CARD, "amount": 1_000, "expires_in_s": 1 }),
    )
    .await;
    assert_status(&placed, 200);
    let id = placed.json()["id"].as_i64().unwrap();
    let deadline = Deadline::new(Duration::from_secs(20), "the sweeper to expire the hold");
    while client.get(&format!("/holds/{id}")).await.json()["status"] != "expired" {
        deadline.tick().await;
    }
    assert_eq!(
        position(&mut client, DEMO_CARD).await,
        (DEMO_OPENING, 0, DEMO_OPENING),
        "the funds are released"
    );
    assert_error(
        &client.post_json(&format!("/holds/{id}/capture"), "").await,
        409,
        "hold_expired",
    );
    server.verify();
}

#[tokio::test]
async fn a_hold_that_expired_while_tallyd_was_down_is_expired_before_the_first_request() {
    // Checks SQLite's start-up sweep, which runs before the server listens.
    sqlite_only!();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let mut server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    let placed = hold(
        &mut client,
        json!({ "card_number": DEMO_CARD, "amount": 2_000, "expires_in_s": 1 }),
    )
    .await;
    let id = placed.json()["id"].as_i64().unwrap();
    let expires_at = placed.json()["expires_at_ms"].as_i64().unwrap();
    let keeps = hold(&mut client, json!({ "card_number": DEMO_CARD, "amount": 3_000 })).await;
    assert_status(&keeps, 200);
    // Killed, most likely before the sweeper's next round sees the first hold's time run out (on
    // a slow machine it may have: then only the outcome is checked, not who expired it).
    server.kill();
    let status_at_kill: String = server
        .sqlite()
        .query_row("SELECT status FROM holds WHERE id = ?1", [id], |r| r.get(0))
        .unwrap();
    let deadline = Deadline::new(Duration::from_secs(10), "the hold's expiry time");
    while now_ms() <= expires_at {
        deadline.tick().await;
    }
    let server = Server::start_on(&db, &[]);
    if status_at_kill == "pending" {
        assert!(
            server.log_text().contains("expired the holds"),
            "{}",
            server.log_text()
        );
    } else {
        eprintln!("the sweeper expired the hold before the kill; the start-up had nothing to expire");
    }
    let mut client = server.client().await;
    assert_eq!(
        client.get(&format!("/holds/{id}")).await.json()["status"],
        "expired"
    );
    assert_eq!(
        position(&mut client, DEMO_CARD).await,
        (DEMO_OPENING, 3_000, DEMO_OPENING - 3_000),
        "the other hold survived the crash"
    );
    server.verify();
}

#[tokio::test]
async fn an_overdraft_limit_lets_the_balance_go_below_zero_and_holds_count_against_it() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let card = "5100000000000001";
    open(&mut client, card, Some(500)).await;
    let opened = account(&mut client, card).await;
    assert_eq!(
        (opened["overdraft_limit"].as_i64(), opened["available"].as_i64()),
        (Some(500), Some(500))
    );

    assert_status(&client.transaction(card, -300).await, 200);
    assert_eq!(position(&mut client, card).await, (-300, 0, 200));
    assert_status(
        &hold(&mut client, json!({ "card_number": card, "amount": 150 })).await,
        200,
    );
    assert_eq!(position(&mut client, card).await, (-300, 150, 50));
    let refused = client.transfer(card, DEMO_CARD, 51).await;
    assert_error(&refused, 422, "insufficient_funds");
    assert_eq!(refused.json()["error"]["available"], 50);
    assert_status(&client.transfer(card, DEMO_CARD, 50).await, 200);
    assert_eq!(position(&mut client, card).await, (-350, 150, 0));

    // Lowering the limit below what is used is refused; to exactly it, accepted.
    let lower = patch(
        &mut client,
        &format!("/accounts/{card}"),
        r#"{"overdraft_limit":499}"#,
    )
    .await;
    assert_error(&lower, 422, "limit_below_usage");
    let exact = patch(
        &mut client,
        &format!("/accounts/{card}"),
        r#"{"overdraft_limit":500}"#,
    )
    .await;
    assert_status(&exact, 200);
    let raised = patch(
        &mut client,
        &format!("/accounts/{card}"),
        r#"{"overdraft_limit":1000}"#,
    )
    .await;
    assert_status(&raised, 200);
    assert_eq!(raised.json()["available"], 500);
    assert_error(
        &patch(
            &mut client,
            &format!("/accounts/{card}"),
            r#"{"overdraft_limit":-1}"#,
        )
        .await,
        400,
        "invalid_limit",
    );
    assert_error(
        &patch(
            &mut client,
            &format!("/accounts/{card}"),
            r#"{"overdraft_limit":1000000000001}"#,
        )
        .await,
        400,
        "invalid_limit",
    );
    assert_error(
        &patch(&mut client, "/accounts/9999999999", r#"{"overdraft_limit":1}"#).await,
        404,
        "card_not_found",
    );
    // A card without a limit still stops at zero, with the old message.
    let plain = client.transaction(DEMO_CARD, -(DEMO_OPENING + 51)).await;
    assert_error(&plain, 422, "insufficient_funds");
    assert!(plain.json()["error"].get("available").is_none(), "{}", plain.text);
    server.verify();
}

#[tokio::test]
async fn the_terms_and_holds_survive_a_restart_and_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let card = "5200000000000001";
    let mut server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    open(&mut client, card, Some(1_000)).await;
    assert_status(&client.transaction(card, -400).await, 200);
    let placed = hold(&mut client, json!({ "card_number": card, "amount": 250 })).await;
    let id = placed.json()["id"].as_i64().unwrap();
    server.terminate();

    let mut server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    assert_eq!(position(&mut client, card).await, (-400, 250, 350));
    let captured = client.post_json(&format!("/holds/{id}/capture"), "").await;
    assert_status(&captured, 200);
    server.kill();

    let server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    assert_eq!(position(&mut client, card).await, (-650, 0, 350));
    assert_error(
        &client.post_json(&format!("/holds/{id}/capture"), "").await,
        409,
        "hold_captured",
    );
    let next = hold(&mut client, json!({ "card_number": card, "amount": 1 })).await;
    assert_eq!(next.json()["id"].as_i64(), Some(id + 1), "hold ids continue");
    server.verify();
}

#[tokio::test]
async fn a_retried_hold_or_capture_with_its_key_has_one_effect() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let body = json!({ "card_number": DEMO_CARD, "amount": 900 }).to_string();
    let first = client.post_keyed("/holds", &body, "hold-1").await;
    let again = client.post_keyed("/holds", &body, "hold-1").await;
    assert_status(&first, 200);
    assert!(again.replayed());
    assert_eq!(first.text, again.text);
    let other = json!({ "card_number": DEMO_CARD, "amount": 901 }).to_string();
    assert_error(
        &client.post_keyed("/holds", &other, "hold-1").await,
        422,
        "idempotency_key_reused",
    );
    assert_eq!(position(&mut client, DEMO_CARD).await.1, 900, "one hold");
    let id = first.json()["id"].as_i64().unwrap();
    let path = format!("/holds/{id}/capture");
    let captured = client.post_keyed(&path, "", "capture-1").await;
    let retried = client.post_keyed(&path, "", "capture-1").await;
    assert_status(&captured, 200);
    assert!(retried.replayed());
    assert_eq!(captured.text, retried.text);
    assert_eq!(client.balance(DEMO_CARD).await, DEMO_OPENING - 900, "one capture");
    let lookup = client.get("/transactions?idempotency_key=capture-1").await;
    assert_status(&lookup, 200);
    assert_eq!(lookup.json()["id"], captured.json()["transaction_id"]);
    server.verify();
}

#[tokio::test]
async fn a_batch_funds_and_spends_in_one_commit_or_changes_nothing() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, b) = ("5300000000000001", "5300000000000002");
    open(&mut client, a, None).await;
    open(&mut client, b, None).await;

    // Items are decided in order against what the earlier ones leave.
    let batch = json!({ "items": [
        { "type": "transaction", "card_number": a, "amount": 1_000 },
        { "type": "transfer", "source": a, "destination": b, "amount": 600 },
        { "type": "hold", "card_number": a, "amount": 400, "destination": b },
    ]});
    let done = client.post_json("/batches", &batch.to_string()).await;
    assert_status(&done, 200);
    let results = done.json()["results"].clone();
    assert_eq!(results[0]["type"], "transaction");
    assert_eq!(results[1]["source_balance"], 400);
    assert_eq!(results[2]["available"], 0);
    let hold_id = results[2]["id"].as_i64().unwrap();
    assert_eq!(position(&mut client, a).await, (400, 400, 0));

    // One refusal and nothing of the batch happens: not the deposit before it, not the void.
    let transactions = db_transactions(&server.sqlite());
    let failing = json!({ "items": [
        { "type": "transaction", "card_number": b, "amount": 50 },
        { "type": "void", "hold_id": hold_id },
        { "type": "transfer", "source": b, "destination": a, "amount": 10_000 },
    ]});
    let refused = client.post_json("/batches", &failing.to_string()).await;
    assert_error(&refused, 422, "batch_failed");
    let body = refused.json();
    assert_eq!(body["error"]["index"], 2);
    let codes: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["error"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        ["linked_item_failed", "linked_item_failed", "insufficient_funds"]
    );
    assert_eq!(
        db_transactions(&server.sqlite()),
        transactions,
        "nothing was written"
    );
    assert_eq!(position(&mut client, a).await, (400, 400, 0));
    assert_eq!(client.balance(b).await, 600);

    // Capturing and voiding several holds in one batch.
    let h2 = hold(&mut client, json!({ "card_number": b, "amount": 100 }))
        .await
        .json()["id"]
        .as_i64()
        .unwrap();
    let settle = json!({ "items": [
        { "type": "capture", "hold_id": hold_id, "amount": 300 },
        { "type": "void", "hold_id": h2 },
    ]});
    let settled = client.post_json("/batches", &settle.to_string()).await;
    assert_status(&settled, 200);
    assert_eq!(position(&mut client, a).await, (100, 0, 100));
    assert_eq!(position(&mut client, b).await, (900, 0, 900));
    // The same hold twice in one batch: the second is refused, so neither happens.
    let h3 = hold(&mut client, json!({ "card_number": b, "amount": 100 }))
        .await
        .json()["id"]
        .as_i64()
        .unwrap();
    let twice = json!({ "items": [
        { "type": "capture", "hold_id": h3 },
        { "type": "void", "hold_id": h3 },
    ]});
    let refused = client.post_json("/batches", &twice.to_string()).await;
    assert_error(&refused, 422, "batch_failed");
    assert_eq!(refused.json()["results"][1]["error"]["code"], "hold_captured");
    assert_eq!(position(&mut client, b).await, (900, 100, 800));

    // Malformed batches are refused whole, naming the item.
    let item = |extra: Value| json!({ "items": [ { "type": "transaction", "card_number": a, "amount": 1 }, extra ] });
    let cases = [
        (json!({ "items": [] }), "invalid_batch"),
        (
            item(json!({ "type": "refund", "card_number": a })),
            "invalid_batch",
        ),
        (item(json!(5)), "invalid_batch"),
        (item(json!({ "card_number": a, "amount": 1 })), "missing_field"),
        (
            item(json!({ "type": "transaction", "card_number": a, "amount": 0 })),
            "invalid_amount",
        ),
        (
            item(json!({ "type": "capture", "hold_id": -1 })),
            "invalid_parameter",
        ),
        (
            item(json!({ "type": "void", "hold_id": 1, "amount": 5 })),
            "unknown_field",
        ),
    ];
    for (body, code) in cases {
        let reply = client.post_json("/batches", &body.to_string()).await;
        assert_error(&reply, 400, code);
        if code != "invalid_batch" || body["items"].as_array().unwrap().len() == 2 {
            assert!(
                reply.json()["error"]["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("items[1]"),
                "{}",
                reply.text
            );
        }
    }
    let too_many: Vec<Value> = (0..101)
        .map(|_| json!({ "type": "transaction", "card_number": a, "amount": 1 }))
        .collect();
    let reply = client
        .post_json("/batches", &json!({ "items": too_many }).to_string())
        .await;
    assert_error(&reply, 400, "invalid_batch");
    // A retried batch with its key is replayed, not run twice.
    let deposit =
        json!({ "items": [ { "type": "transaction", "card_number": a, "amount": 5 } ] }).to_string();
    let first = client.post_keyed("/batches", &deposit, "batch-1").await;
    let again = client.post_keyed("/batches", &deposit, "batch-1").await;
    assert_status(&first, 200);
    assert!(again.replayed());
    assert_eq!(client.balance(a).await, 105);
    server.verify();
}

#[tokio::test]
async fn changing_a_limit_needs_the_admin_scope() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    // The database exists before the keys do.
    drop(Server::start_on(&db, &[]));
    let writer = create_key(&db, "checkout", "write", &[]);
    let admin = create_key(&db, "ops", "admin", &[]);
    let server = Server::start_on(&db, &[]);
    let path = format!("/accounts/{DEMO_CARD}");
    let mut client = server.client().await.with_bearer(&writer);
    assert_error(
        &patch(&mut client, &path, r#"{"overdraft_limit":10}"#).await,
        403,
        "forbidden",
    );
    assert_status(
        &hold(&mut client, json!({ "card_number": DEMO_CARD, "amount": 1 })).await,
        200,
    );
    let mut client = server.client().await.with_bearer(&admin);
    assert_status(&patch(&mut client, &path, r#"{"overdraft_limit":10}"#).await, 200);
    assert_eq!(
        position(&mut client, DEMO_CARD).await,
        (DEMO_OPENING, 1, DEMO_OPENING + 9)
    );
}

/// 16 clients at once on 6 cards (two with overdraft limits): holds, partial captures, voids,
/// transfers and batches, some refused. Afterwards the books balance, every held amount is its
/// pending holds, no card is past what its limit allows, every success the clients saw is in the
/// database as they saw it, and `verify` holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_hold_capture_void_and_batch_at_once_and_the_books_balance() {
    let server = Server::start(&[]);
    let mut setup = server.client().await;
    let cards: Vec<String> = (1..=6).map(|n| format!("54000000000000{n:02}")).collect();
    for (index, card) in cards.iter().enumerate() {
        open(&mut setup, card, (index < 2).then_some(5_000)).await;
        assert_status(&setup.transaction(card, 10_000).await, 200);
    }
    let mut rng = common::Rng(common::test_seed("holds-contention", "TALLYD_TEST_SEED"));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut rng = rng.split();
        let cards = cards.clone();
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut mine: Vec<i64> = Vec::new();
            // (hold id, amount captured) as answered.
            let mut captured: Vec<(i64, i64)> = Vec::new();
            for _ in 0..40 {
                let card = &cards[rng.below(6) as usize];
                let other = &cards[rng.below(6) as usize];
                match rng.below(5) {
                    0 | 1 => {
                        let destination = if other == card { Value::Null } else { json!(other) };
                        let body = json!({ "card_number": card, "amount": 1 + rng.below(3_000), "destination": destination });
                        let reply = hold(&mut client, body).await;
                        match reply.status.as_u16() {
                            200 => mine.push(reply.json()["id"].as_i64().unwrap()),
                            422 => assert_eq!(reply.error_code(), "insufficient_funds"),
                            _ => panic!("{}", reply.text),
                        }
                    }
                    2 if !mine.is_empty() => {
                        let id = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                        let (path, body) = if rng.below(2) == 0 {
                            (format!("/holds/{id}/capture"), json!({ "amount": 1 + rng.below(1_000) }).to_string())
                        } else {
                            (format!("/holds/{id}/void"), String::new())
                        };
                        let reply = client.post_json(&path, &body).await;
                        if reply.status == 200 {
                            if let Some(amount) = reply.json()["captured_amount"].as_i64() {
                                captured.push((id, amount));
                            }
                        } else {
                            assert_error(&reply, 422, "capture_exceeds_hold");
                            mine.push(id);
                        }
                    }
                    3 if other != card => {
                        let reply = client.transfer(card, other, 1 + rng.below(4_000) as i64).await;
                        assert!(
                            reply.status == 200 || reply.error_code() == "insufficient_funds",
                            "{}",
                            reply.text
                        );
                    }
                    _ if other != card => {
                        let amount = 1 + rng.below(2_000);
                        let batch = json!({ "items": [
                            { "type": "transfer", "source": card, "destination": other, "amount": amount },
                            { "type": "hold", "card_number": other, "amount": amount },
                        ]});
                        let reply = client.post_json("/batches", &batch.to_string()).await;
                        match reply.status.as_u16() {
                            200 => mine.push(reply.json()["results"][1]["id"].as_i64().unwrap()),
                            422 => assert_eq!(reply.error_code(), "batch_failed"),
                            _ => panic!("{}", reply.text),
                        }
                    }
                    _ => {}
                }
            }
            captured
        }));
    }
    let mut captured = Vec::new();
    for task in tasks {
        captured.extend(task.await.unwrap());
    }
    let db = server.sqlite();
    let (opening, current) = common::db_totals(&db);
    assert_eq!(opening, current, "double entry: nothing created or destroyed");
    for (id, amount) in &captured {
        let stored = db.pairs(&format!(
            "SELECT h.status, t.amount FROM holds h JOIN transactions t ON t.id = h.transaction_id WHERE h.id = {id}"
        ))[0]
            .clone();
        assert_eq!(stored, ("captured".to_owned(), *amount), "hold {id}");
    }
    for card in &cards {
        let (balance, held, available) = position(&mut setup, card).await;
        let pending = db.integer(&format!(
            "SELECT coalesce(sum(amount), 0) FROM holds WHERE card_number = '{card}' AND status = 'pending'"
        ));
        assert_eq!(held, pending, "{card}");
        assert!(available >= 0, "{card}: {balance} - {held}");
    }
    eprintln!("holds-contention: {} captures", captured.len());
    server.verify();
}

#[tokio::test]
async fn verify_finds_a_held_amount_that_is_not_its_pending_holds() {
    let mut server = Server::start(&[]);
    let mut client = server.client().await;
    assert_status(
        &hold(&mut client, json!({ "card_number": DEMO_CARD, "amount": 10 })).await,
        200,
    );
    server.terminate();
    server
        .sqlite()
        .change("UPDATE account_credit SET held = held + 1");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["verify", "--db"])
        .arg(&server.db)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("FAILED each account's held amount equals the sum of its pending holds (1 violations"),
        "{text}"
    );
}
