//! The ledger over HTTP, against the real binary: accounts, transfers between them, transaction
//! lookups, statements and point-in-time balances, and that they all tell the same story; every
//! documented refusal of the new routes; conservation of money under contention; and a statement
//! walked page by page while transfers commit.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    db_balances, db_totals, db_transactions, seeded_card, test_seed, transfer_body, Client, Deadline,
    LedgerDb, Reply, Rng, Server, DEMO_CARD, DEMO_OPENING,
};
use serde_json::{json, Value};

const WORLD: &str = "@world";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn assert_status(reply: &Reply, status: u16) {
    assert_eq!(reply.status.as_u16(), status, "{}", reply.text);
}

/// A refusal with this status and code.
#[track_caller]
fn assert_error(reply: &Reply, status: u16, code: &str) {
    assert_eq!(
        (reply.status.as_u16(), reply.error_code().as_str()),
        (status, code),
        "{}",
        reply.text
    );
    assert_eq!(reply.header("content-type"), Some("application/json"));
}

/// Every entry of a card, newest first, walked page by page.
async fn all_entries(client: &mut Client, card: &str, limit: u32) -> Vec<Value> {
    let mut entries: Vec<Value> = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let path = match cursor {
            None => format!("/accounts/{card}/entries?limit={limit}"),
            Some(id) => format!("/accounts/{card}/entries?limit={limit}&starting_after={id}"),
        };
        let page = client.get(&path).await;
        assert_status(&page, 200);
        let page = page.json();
        let data = page["data"].as_array().unwrap().clone();
        let has_more = page["has_more"].as_bool().unwrap();
        assert!(data.len() <= limit as usize);
        assert!(
            cursor.is_none() || !data.is_empty(),
            "the page before promised more, this one after {cursor:?} is empty"
        );
        assert!(
            !has_more || data.len() == limit as usize,
            "a short page with more after it"
        );
        cursor = data.last().map(|e| e["id"].as_i64().unwrap());
        entries.extend(data);
        if !has_more {
            return entries;
        }
    }
}

/// Newest first, each entry's `balance_after` minus its amount is the next (older) entry's
/// `balance_after`, and the oldest starts from `opening`.
#[track_caller]
fn assert_chain(entries: &[Value], opening: i64) {
    for pair in entries.windows(2) {
        let (newer, older) = (&pair[0], &pair[1]);
        assert!(
            newer["id"].as_i64() > older["id"].as_i64(),
            "not newest first: {newer} then {older}"
        );
        assert_eq!(
            newer["balance_after"].as_i64().unwrap() - newer["amount"].as_i64().unwrap(),
            older["balance_after"].as_i64().unwrap(),
            "{newer} does not follow {older}"
        );
    }
    if let Some(oldest) = entries.last() {
        assert_eq!(
            oldest["balance_after"].as_i64().unwrap() - oldest["amount"].as_i64().unwrap(),
            opening,
            "the oldest entry {oldest} does not start from the opening balance"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_agree_with_balances_legs_lookups_entries_and_point_in_time_balances() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, a_open) = seeded_card(1);
    let (b, b_open) = seeded_card(2);
    let before = now_ms();

    let body = r#"{"source":"SRC","destination":"DST","amount":2500,"reference":"rent, march"}"#
        .replace("SRC", &a)
        .replace("DST", &b);
    let reply = client.post_json("/transfers", &body).await;
    assert_status(&reply, 200);
    let transfer = reply.json();
    let id = transfer["id"].as_i64().unwrap();
    let at = transfer["created_at_ms"].as_i64().unwrap();
    assert!(at >= before && at <= now_ms(), "created_at_ms {at} is not now");
    assert_eq!(
        transfer,
        json!({"id": id, "source": a, "destination": b, "amount": 2500, "reference": "rent, march",
               "status": "committed", "source_balance": a_open - 2500,
               "destination_balance": b_open + 2500, "created_at_ms": at})
    );
    // The field order is part of the contract, as for /transaction.
    let keys: Vec<&str> = transfer.as_object().unwrap().keys().map(String::as_str).collect();
    let order = [
        "id",
        "source",
        "destination",
        "amount",
        "reference",
        "status",
        "source_balance",
        "destination_balance",
        "created_at_ms",
    ];
    let text_order: Vec<usize> = order
        .iter()
        .map(|k| reply.text.find(&format!("\"{k}\"")).unwrap())
        .collect();
    assert!(
        text_order.windows(2).all(|w| w[0] < w[1]),
        "field order: {}",
        reply.text
    );
    assert_eq!(keys.len(), order.len());

    // The accounts.
    let account = client.get(&format!("/accounts/{a}")).await;
    assert_status(&account, 200);
    let account = account.json();
    assert_eq!(account["card_number"], a.as_str());
    assert_eq!(account["balance"], a_open - 2500);
    assert_eq!(account["available"], a_open - 2500);
    assert!(account["created_at_ms"].as_i64().unwrap() <= before);
    assert_eq!(client.account_balance(&b).await, b_open + 2500);
    assert_eq!(client.balance(&a).await, a_open - 2500);

    // The transaction, by id: two legs, the source's first.
    let lookup = client.get(&format!("/transactions/{id}")).await;
    assert_status(&lookup, 200);
    assert_eq!(
        lookup.json(),
        json!({"id": id, "kind": "transfer", "amount": 2500, "reference": "rent, march",
               "created_at_ms": at,
               "legs": [{"card_number": a, "amount": -2500, "balance_after": a_open - 2500},
                        {"card_number": b, "amount": 2500, "balance_after": b_open + 2500}],
               "idempotency_key": null})
    );

    // A deposit and a withdrawal are transactions with @world, under the same ids.
    let deposit = client.transaction(&a, 700).await;
    assert_status(&deposit, 200);
    let deposit_id = deposit.i64("id");
    assert_eq!(deposit.i64("balance"), a_open - 2500 + 700);
    let withdrawal = client.transaction(&a, -300).await;
    assert_status(&withdrawal, 200);
    let withdrawal_id = withdrawal.i64("id");
    assert!(
        id < deposit_id && deposit_id < withdrawal_id,
        "ids grow in commit order"
    );
    let a_now = a_open - 2500 + 700 - 300;
    assert_eq!(withdrawal.i64("balance"), a_now);

    let deposit_view = client.get(&format!("/transactions/{deposit_id}")).await.json();
    assert_eq!(deposit_view["kind"], "deposit");
    assert_eq!(deposit_view["amount"], 700);
    assert_eq!(deposit_view["reference"], Value::Null);
    assert_eq!(
        deposit_view["legs"],
        json!([{"card_number": WORLD, "amount": -700, "balance_after": -700},
               {"card_number": a, "amount": 700, "balance_after": a_open - 1800}])
    );
    let withdrawal_view = client.get(&format!("/transactions/{withdrawal_id}")).await.json();
    assert_eq!(withdrawal_view["kind"], "withdrawal");
    assert_eq!(withdrawal_view["amount"], 300);
    assert_eq!(
        withdrawal_view["legs"],
        json!([{"card_number": a, "amount": -300, "balance_after": a_now},
               {"card_number": WORLD, "amount": 300, "balance_after": -400}])
    );

    // The statement: newest first, signed for this account, counterparties named.
    let entries = all_entries(&mut client, &a, 20).await;
    assert_eq!(entries.len(), 3);
    let summary: Vec<(i64, &str, i64, i64, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["id"].as_i64().unwrap(),
                e["kind"].as_str().unwrap(),
                e["amount"].as_i64().unwrap(),
                e["balance_after"].as_i64().unwrap(),
                e["counterparty"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (withdrawal_id, "withdrawal", -300, a_now, WORLD),
            (deposit_id, "deposit", 700, a_open - 1800, WORLD),
            (id, "transfer", -2500, a_open - 2500, b.as_str()),
        ]
    );
    assert_chain(&entries, a_open);
    assert_eq!(entries[2]["created_at_ms"], at);
    // Pages of one agree with the whole.
    assert_eq!(all_entries(&mut client, &a, 1).await, entries);
    let b_entries = all_entries(&mut client, &b, 20).await;
    assert_eq!(b_entries.len(), 1);
    assert_eq!(b_entries[0]["amount"], 2500);
    assert_eq!(b_entries[0]["counterparty"], a.as_str());
    assert_eq!(b_entries[0]["kind"], "transfer");
    // A card without entries has an empty statement.
    let (c, _) = seeded_card(3);
    let empty = client.get(&format!("/accounts/{c}/entries")).await;
    assert_status(&empty, 200);
    assert_eq!(empty.json(), json!({"data": [], "has_more": false}));

    // The balance at a moment is the last entry at or before it, the opening balance before any.
    let mut moments: Vec<i64> = vec![1, at - 1, at, now_ms() + 3_600_000];
    moments.extend(entries.iter().map(|e| e["created_at_ms"].as_i64().unwrap()));
    for moment in moments {
        let expected = entries
            .iter()
            .find(|e| e["created_at_ms"].as_i64().unwrap() <= moment)
            .map_or(a_open, |e| e["balance_after"].as_i64().unwrap());
        let reply = client.get(&format!("/balance?card_number={a}&at={moment}")).await;
        assert_status(&reply, 200);
        assert_eq!(
            reply.json(),
            json!({"card_number": a, "balance": expected}),
            "at {moment}"
        );
    }

    // The database says the same, and its invariants hold.
    let db = server.sqlite();
    let balances = db_balances(&db);
    assert_eq!(balances[&a], a_now);
    assert_eq!(balances[&b], b_open + 2500);
    assert_eq!(balances[WORLD], -400);
    let (opening, current) = db_totals(&db);
    assert_eq!(opening, current);
    eprintln!("{}", server.verify());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_open_once_start_at_zero_and_take_transfers() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let card = "4111111111111111";
    let before = now_ms();
    let opened = client
        .post_json("/accounts", &format!(r#"{{"card_number":"{card}"}}"#))
        .await;
    assert_status(&opened, 201);
    let at = opened.i64("created_at_ms");
    assert!(at >= before && at <= now_ms());
    assert_eq!(
        opened.json(),
        json!({"card_number": card, "balance": 0, "held": 0, "overdraft_limit": 0, "available": 0, "created_at_ms": at})
    );
    let again = client
        .post_json("/accounts", &format!(r#"{{"card_number":"{card}"}}"#))
        .await;
    assert_error(&again, 409, "account_exists");
    let account = client.get(&format!("/accounts/{card}")).await;
    assert_status(&account, 200);
    assert_eq!(account.json(), opened.json());
    assert_eq!(client.balance(card).await, 0);
    // Leading zeros are digits: another card.
    let zeros = client.post_json("/accounts", r#"{"card_number":"000000"}"#).await;
    assert_status(&zeros, 201);

    // An empty account cannot pay, but can be paid, and then pay.
    let refused = client.transfer(card, DEMO_CARD, 1).await;
    assert_error(&refused, 422, "insufficient_funds");
    assert_eq!(refused.json()["error"]["balance"], 0);
    let paid = client.transfer(DEMO_CARD, card, 1000).await;
    assert_status(&paid, 200);
    assert_eq!(paid.i64("destination_balance"), 1000);
    let back = client.transfer(card, "000000", 1000).await;
    assert_status(&back, 200);
    assert_eq!(back.i64("source_balance"), 0);
    assert_eq!(back.i64("destination_balance"), 1000);
    let entries = all_entries(&mut client, card, 20).await;
    assert_chain(&entries, 0);
    assert_eq!(entries.len(), 2);

    for (body, status, code) in [
        (r#"{"card_number":"12345"}"#, 400, "invalid_card_number"),
        (r#"{"card_number":4111111111111112}"#, 400, "invalid_card_number"),
        (
            r#"{"card_number":"4111111111111112","balance":5}"#,
            400,
            "unknown_field",
        ),
        (r#"{}"#, 400, "missing_field"),
        (r#"["4111111111111112"]"#, 400, "invalid_json"),
    ] {
        assert_error(&client.post_json("/accounts", body).await, status, code);
    }
    let db = server.sqlite();
    let opened_by_hand =
        db.integer("SELECT count(*) FROM ledger_accounts WHERE opening_balance = 0 AND name <> '@world'");
    assert_eq!(opened_by_hand, 2, "only the two accounts opened");
    server.verify();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_of_the_new_routes_has_its_code_and_moves_nothing() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, a_open) = seeded_card(1);
    let (b, b_open) = seeded_card(2);
    let unknown = "9999999999";

    // Decided refusals.
    let reply = client.transfer(&a, &b, a_open + 1).await;
    assert_error(&reply, 422, "insufficient_funds");
    assert_eq!(reply.json()["error"]["balance"], a_open);
    for (source, destination) in [
        (unknown, b.as_str()),
        (a.as_str(), unknown),
        (unknown, "8888888888"),
    ] {
        let reply = client.transfer(source, destination, 5).await;
        assert_error(&reply, 404, "card_not_found");
        let missing = if source == unknown { source } else { destination };
        assert_eq!(reply.json()["error"]["card_number"], missing, "{}", reply.text);
    }
    // An unknown destination is named even when the source could not pay either.
    let reply = client.transfer(&a, unknown, a_open + 1).await;
    assert_error(&reply, 404, "card_not_found");
    assert_eq!(reply.json()["error"]["card_number"], unknown);

    // Refusals of the body.
    let long = "r".repeat(256);
    let exactly = format!("{}r", "é".repeat(127));
    let cases: Vec<(String, &str)> = vec![
        (transfer_body(&a, &a, 5), "same_account"),
        (transfer_body(&a, &b, 0), "invalid_amount"),
        (transfer_body(&a, &b, -5), "invalid_amount"),
        (transfer_body(&a, &b, 1_000_000_000_001), "invalid_amount"),
        (
            format!(r#"{{"source":"{a}","destination":"{b}","amount":1.5}}"#),
            "invalid_amount",
        ),
        (
            format!(r#"{{"source":"{a}","destination":"{b}","amount":"5"}}"#),
            "invalid_amount",
        ),
        (
            format!(r#"{{"source":"{a}","destination":"{b}","amount":1e3}}"#),
            "invalid_amount",
        ),
        (transfer_body("12345", &b, 5), "invalid_card_number"),
        (
            transfer_body(&a, "12345678901234567890", 5),
            "invalid_card_number",
        ),
        (
            format!(r#"{{"source":{a},"destination":"{b}","amount":5}}"#),
            "invalid_card_number",
        ),
        (
            format!(r#"{{"source":"{a}","destination":"@world","amount":5}}"#),
            "invalid_card_number",
        ),
        (
            format!(r#"{{"source":"{a}","destination":"{b}","amount":5,"reference":"{long}"}}"#),
            "invalid_reference",
        ),
        (
            format!(r#"{{"source":"{a}","destination":"{b}","amount":5,"reference":5}}"#),
            "invalid_reference",
        ),
        (
            format!(r#"{{"source":"{a}","destination":"{b}","amount":5,"reference":["x"]}}"#),
            "invalid_reference",
        ),
        (format!(r#"{{"source":"{a}","amount":5}}"#), "missing_field"),
        (
            format!(r#"{{"source":"{a}","destination":"{b}"}}"#),
            "missing_field",
        ),
        (
            format!(r#"{{"source":"{a}","destination":"{b}","amount":5,"currency":"EUR"}}"#),
            "unknown_field",
        ),
        (
            format!(r#"{{"source":"{a}","destination":"{b}","amount":5,"amount":6}}"#),
            "duplicate_field",
        ),
        (format!(r#"["{a}","{b}",5]"#), "invalid_json"),
        (
            format!(r#"{{"source":"{a}","destination":"{b}","amount":5"#),
            "invalid_json",
        ),
        (String::new(), "invalid_json"),
    ];
    for (body, code) in &cases {
        let reply = client.post_json("/transfers", body).await;
        assert_error(&reply, 400, code);
    }
    let text = client
        .post_with("/transfers", "{}", &[("content-type", "text/plain")])
        .await;
    assert_error(&text, 415, "unsupported_media_type");

    // Read routes.
    assert_error(
        &client.get(&format!("/accounts/{unknown}")).await,
        404,
        "card_not_found",
    );
    assert_error(&client.get("/accounts/12345").await, 400, "invalid_card_number");
    assert_error(
        &client.get("/accounts/abcdefgh").await,
        400,
        "invalid_card_number",
    );
    assert_error(
        &client.get(&format!("/accounts/{unknown}/entries")).await,
        404,
        "card_not_found",
    );
    assert_error(
        &client.get("/accounts/x/entries").await,
        400,
        "invalid_card_number",
    );
    for query in [
        "limit=0",
        "limit=101",
        "limit=-1",
        "limit=abc",
        "limit=",
        "limit=99999999999999999999",
        "limit=1.5",
        "starting_after=abc",
        "starting_after=-1",
        "starting_after=0",
        "starting_after=",
        "starting_after=1e3",
    ] {
        let reply = client.get(&format!("/accounts/{a}/entries?{query}")).await;
        assert_error(&reply, 400, "invalid_parameter");
    }
    assert_status(
        &client.get(&format!("/accounts/{a}/entries?limit=100")).await,
        200,
    );
    assert_status(&client.get(&format!("/accounts/{a}/entries?limit=1")).await, 200);
    assert_status(
        &client
            .get(&format!(
                "/accounts/{a}/entries?starting_after=9223372036854775807"
            ))
            .await,
        200,
    );
    assert_error(&client.get("/transactions/1").await, 404, "transaction_not_found");
    assert_error(
        &client.get("/transactions/999999999").await,
        404,
        "transaction_not_found",
    );
    assert_error(&client.get("/transactions/abc").await, 400, "invalid_parameter");
    assert_error(&client.get("/transactions/-1").await, 400, "invalid_parameter");
    assert_error(&client.get("/transactions/1.0").await, 400, "invalid_parameter");
    assert_error(
        &client.get("/transactions?idempotency_key=nope").await,
        404,
        "transaction_not_found",
    );
    assert_error(&client.get("/transactions").await, 400, "missing_field");
    assert_error(
        &client.get(&format!("/balance?card_number={a}&at=abc")).await,
        400,
        "invalid_parameter",
    );
    assert_error(
        &client.get(&format!("/balance?card_number={a}&at=-5")).await,
        400,
        "invalid_parameter",
    );
    assert_error(
        &client.get(&format!("/balance?card_number={unknown}&at=5")).await,
        404,
        "card_not_found",
    );
    assert_error(&client.get("/transfers").await, 405, "method_not_allowed");
    assert_error(&client.get("/accounts").await, 405, "method_not_allowed");
    assert_error(
        &client.post_json(&format!("/accounts/{a}"), "{}").await,
        405,
        "method_not_allowed",
    );

    // Nothing moved. The one transfer that passes checks the reference limit is exact.
    let db = server.sqlite();
    assert_eq!(db_transactions(&db), 0, "a refused request wrote a transaction");
    assert_eq!(client.balance(&a).await, a_open);
    assert_eq!(client.balance(&b).await, b_open);
    let ok = client
        .post_json(
            "/transfers",
            &format!(r#"{{"source":"{a}","destination":"{b}","amount":5,"reference":"{exactly}"}}"#),
        )
        .await;
    assert_status(&ok, 200);
    assert_eq!(ok.json()["reference"], exactly.as_str());
    let null_reference = client
        .post_json(
            "/transfers",
            &format!(r#"{{"reference":null,"amount":5,"destination":"{b}","source":"{a}"}}"#),
        )
        .await;
    assert_status(&null_reference, 200);
    assert_eq!(null_reference.json()["reference"], Value::Null);
    assert_eq!(db_transactions(&db), 2);
    server.verify();
}

/// A transfer or deposit that would take a balance past i64::MAX minor units is refused, whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_past_the_largest_balance_is_refused_whole() {
    // Starts from a SQLite seed file.
    sqlite_only!();
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.sql");
    std::fs::write(
        &seed,
        "INSERT INTO accounts (card_number, opening_balance, created_at_ms) VALUES \
         ('5000000000000001', 9223372036854775000, 0), ('5000000000000002', 100000, 0);",
    )
    .unwrap();
    let server = Server::start(&["--seed", seed.to_str().unwrap()]);
    let mut client = server.client().await;
    let (rich, poor) = ("5000000000000001", "5000000000000002");
    let ok = client.transfer(poor, rich, 807).await;
    assert_status(&ok, 200);
    assert_eq!(ok.i64("destination_balance"), i64::MAX);
    let refused = client.transfer(poor, rich, 1).await;
    assert_error(&refused, 422, "balance_limit_exceeded");
    assert_eq!(refused.json()["error"]["balance"], i64::MAX);
    let refused = client.transaction(rich, 1).await;
    assert_error(&refused, 422, "balance_limit_exceeded");
    assert_eq!(client.balance(poor).await, 100_000 - 807);
    assert_eq!(client.balance(rich).await, i64::MAX);
    // Paying out of the full account still works.
    assert_status(&client.transfer(rich, poor, 1).await, 200);
    assert_eq!(db_transactions(&server.sqlite()), 2);
}

/// Balances of up to i64::MAX each are legal, so their total may pass i64::MAX: `tallyd verify`
/// must still add them up (the engine keeps its totals in i128 for the same reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_adds_up_balances_whose_total_passes_i64() {
    // Starts from a SQLite seed file.
    sqlite_only!();
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.sql");
    std::fs::write(
        &seed,
        "INSERT INTO accounts (card_number, opening_balance, created_at_ms) VALUES \
         ('5000000000000001', 9223372036854775000, 0), ('5000000000000002', 100000, 0);",
    )
    .unwrap();
    let server = Server::start(&["--seed", seed.to_str().unwrap()]);
    let mut client = server.client().await;
    assert_status(
        &client.transfer("5000000000000002", "5000000000000001", 5).await,
        200,
    );
    eprintln!("{}", server.verify());
}

/// 64 clients move money at random among 8 cards (transfers, deposits, withdrawals, some refused).
/// Afterwards every balance is its opening balance plus the legs that were acknowledged, none is
/// negative, the sum over every account (`@world` included) is the opening total, and the
/// database holds exactly the acknowledged transactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conservation_under_contention_64_clients_8_cards() {
    const CLIENTS: usize = 64;
    const REQUESTS_PER_CLIENT: usize = 40;
    const CARDS: u32 = 8;
    let seed = test_seed("conservation", "TALLYD_LEDGER_SEED");
    let mut rng = Rng(seed);
    let server = Server::start(&["--workers", "2"]);
    let cards: Vec<(String, i64)> = (1..=CARDS).map(seeded_card).collect();

    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let mut rng = rng.split();
            let cards = cards.clone();
            let addr = server.addr;
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                // Per account: the sum of acknowledged legs; and counts of (acknowledged, refused).
                let mut legs: BTreeMap<String, i64> = BTreeMap::new();
                let (mut acknowledged, mut refused) = (0u64, 0u64);
                for _ in 0..REQUESTS_PER_CLIENT {
                    let card = |rng: &mut Rng| cards[rng.below(cards.len() as u64) as usize].0.clone();
                    let roll = rng.below(10);
                    if roll < 7 {
                        let source = card(&mut rng);
                        let mut destination = card(&mut rng);
                        while destination == source {
                            destination = card(&mut rng);
                        }
                        let amount = 1 + rng.below(30_000) as i64;
                        let reply = client.transfer(&source, &destination, amount).await;
                        match reply.status.as_u16() {
                            200 => {
                                let body = reply.json();
                                assert_eq!(body["amount"], amount);
                                assert!(body["source_balance"].as_i64().unwrap() >= 0);
                                *legs.entry(source).or_default() -= amount;
                                *legs.entry(destination).or_default() += amount;
                                acknowledged += 1;
                            }
                            422 => {
                                assert_eq!(reply.error_code(), "insufficient_funds");
                                refused += 1;
                            }
                            _ => panic!("transfer: {} {}", reply.status, reply.text),
                        }
                    } else {
                        let target = card(&mut rng);
                        let amount = if roll < 8 {
                            1 + rng.below(25_000) as i64
                        } else {
                            -(1 + rng.below(25_000) as i64)
                        };
                        let reply = client.transaction(&target, amount).await;
                        match reply.status.as_u16() {
                            200 => {
                                assert!(reply.i64("balance") >= 0);
                                *legs.entry(target).or_default() += amount;
                                *legs.entry(WORLD.to_owned()).or_default() -= amount;
                                acknowledged += 1;
                            }
                            422 => {
                                assert_eq!(reply.error_code(), "insufficient_funds");
                                refused += 1;
                            }
                            _ => panic!("transaction: {} {}", reply.status, reply.text),
                        }
                    }
                }
                (legs, acknowledged, refused)
            })
        })
        .collect();
    let mut legs: BTreeMap<String, i64> = BTreeMap::new();
    let (mut acknowledged, mut refused) = (0, 0);
    for task in tasks {
        let (client_legs, acked, refusals) = task.await.unwrap();
        for (account, sum) in client_legs {
            *legs.entry(account).or_default() += sum;
        }
        acknowledged += acked;
        refused += refusals;
    }

    let mut client = server.client().await;
    let db = server.sqlite();
    let balances = db_balances(&db);
    for (card, opening) in &cards {
        let expected = opening + legs.get(card).copied().unwrap_or(0);
        assert_eq!(client.account_balance(card).await, expected, "{card}");
        assert_eq!(balances[card], expected, "{card} in the database");
        assert!(expected >= 0);
        assert_chain(&all_entries(&mut client, card, 100).await, *opening);
    }
    assert_eq!(balances[WORLD], legs.get(WORLD).copied().unwrap_or(0));
    let (opening, current) = db_totals(&db);
    assert_eq!(opening, current, "money was created or destroyed");
    assert_eq!(
        db_transactions(&db),
        acknowledged as i64,
        "only acknowledged requests committed"
    );
    let negative = db.integer("SELECT count(*) FROM entries WHERE balance_after < 0 AND account <> '@world'");
    assert_eq!(negative, 0);
    eprintln!(
        "conservation: {} requests from {CLIENTS} clients over {CARDS} cards: {acknowledged} acknowledged, \
         {refused} refused (insufficient funds); @world at {}",
        CLIENTS * REQUESTS_PER_CLIENT,
        balances[WORLD]
    );
    assert!(
        refused > 0 && acknowledged > 0,
        "the load should both commit and refuse"
    );
    eprintln!("{}", server.verify());
}

/// A statement walked page by page while transfers on the same card commit between every two
/// pages: no entry missing, none repeated, each `balance_after` following from the next (older)
/// one, and the walk equal to the card's history as of its first page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_a_statement_while_transfers_commit_misses_and_repeats_nothing() {
    const HISTORY: i64 = 120;
    const PAGE: u32 = 7;
    const WRITERS: usize = 4;
    let seed = test_seed("pagination", "TALLYD_LEDGER_SEED");
    let mut rng = Rng(seed);
    let server = Server::start(&[]);
    let (card, opening) = seeded_card(5);
    let others: Vec<String> = (6..=9).map(|n| seeded_card(n).0).collect();
    let mut client = server.client().await;
    for i in 1..=HISTORY {
        let reply = if i % 3 == 0 {
            client
                .transfer(&card, &others[i as usize % others.len()], i)
                .await
        } else {
            client.transaction(&card, i).await
        };
        assert_status(&reply, 200);
    }

    // Without `limit`, a page is 20 entries.
    let default_page = client.get(&format!("/accounts/{card}/entries")).await.json();
    assert_eq!(default_page["data"].as_array().unwrap().len(), 20);
    assert_eq!(default_page["has_more"], true);
    assert_eq!(default_page["data"][0]["id"], HISTORY);

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (stop, committed, others, card) = (
                Arc::clone(&stop),
                Arc::clone(&committed),
                others.clone(),
                card.clone(),
            );
            let mut rng = rng.split();
            let addr = server.addr;
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                while !stop.load(Ordering::Relaxed) {
                    let other = &others[rng.below(others.len() as u64) as usize];
                    let amount = 1 + rng.below(50) as i64;
                    let reply = match rng.below(3) {
                        0 => client.transfer(&card, other, amount).await,
                        1 => client.transfer(other, &card, amount).await,
                        _ => client.transaction(&card, amount).await,
                    };
                    assert_status(&reply, 200);
                    committed.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut walked: Vec<Value> = Vec::new();
    let mut cursor: Option<i64> = None;
    let mut pages = 0;
    loop {
        // At least one more commit on the card before each page.
        let seen = committed.load(Ordering::Relaxed);
        let deadline = Deadline::new(Duration::from_secs(30), "a commit between two pages");
        while committed.load(Ordering::Relaxed) == seen {
            deadline.tick().await;
        }
        let path = match cursor {
            None => format!("/accounts/{card}/entries?limit={PAGE}"),
            Some(id) => format!("/accounts/{card}/entries?limit={PAGE}&starting_after={id}"),
        };
        let page = client.get(&path).await;
        assert_status(&page, 200);
        let page = page.json();
        let data = page["data"].as_array().unwrap();
        pages += 1;
        walked.extend(data.iter().cloned());
        cursor = data.last().map(|e| e["id"].as_i64().unwrap());
        if !page["has_more"].as_bool().unwrap() {
            break;
        }
        assert_eq!(data.len(), PAGE as usize);
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }

    let ids: Vec<i64> = walked.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    let unique: HashSet<i64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "an entry was repeated");
    assert_chain(&walked, opening);
    // Entries are immutable, so the card's history up to the first page's newest entry is exactly
    // what the walk must have seen.
    let newest = ids[0];
    let db = server.sqlite();
    let history: Vec<(i64, i64, i64)> = db
        .integers(&format!(
            "SELECT transaction_id, amount, balance_after FROM entries WHERE account = '{card}' \
             AND transaction_id <= {newest} ORDER BY transaction_id DESC"
        ))
        .into_iter()
        .map(|row| (row[0], row[1], row[2]))
        .collect();
    let seen: Vec<(i64, i64, i64)> = walked
        .iter()
        .map(|e| {
            (
                e["id"].as_i64().unwrap(),
                e["amount"].as_i64().unwrap(),
                e["balance_after"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen, history,
        "the walk is the card's history as of its first page"
    );
    let total = db.integer(&format!("SELECT count(*) FROM entries WHERE account = '{card}'"));
    eprintln!(
        "pagination: walked {} entries in {pages} pages of {PAGE} while {} requests committed ({} entries on the card at the end)",
        walked.len(),
        committed.load(Ordering::Relaxed),
        total
    );
    assert!(walked.len() as i64 > HISTORY);
    assert!(total > walked.len() as i64, "transfers committed during the walk");
    assert_eq!(client.balance(DEMO_CARD).await, DEMO_OPENING);
    server.verify();
}

/// A query parameter given twice is ambiguous (a proxy or a log may read the other value), and the
/// decoder says such a query "is refused by the caller", as a JSON body's duplicate key is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_parameter_given_twice_is_refused() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, _) = seeded_card(1);
    for query in [
        format!("/balance?card_number={a}&card_number={DEMO_CARD}"),
        format!("/balance?card_number={a}&at=1&at=99999999999999"),
        format!("/accounts/{a}/entries?limit=5&limit=500"),
        format!("/accounts/{a}/entries?starting_after=5&starting_after=abc"),
        "/transactions?idempotency_key=a&idempotency_key=b".to_owned(),
    ] {
        let reply = client.get(&query).await;
        assert_eq!(reply.status.as_u16(), 400, "{query}: {}", reply.text);
        let code = reply.error_code();
        assert!(
            code == "invalid_parameter" || code == "duplicate_field",
            "{query}: {code}"
        );
    }
}
