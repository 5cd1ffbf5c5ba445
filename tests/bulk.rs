//! `POST /transfers/bulk` against the real binary: a request at the item limit and one over it;
//! malformed items at the first, middle and last index refusing the whole request; per-item
//! idempotency keys that are `POST /transfers` keys, and the request's own key replaying the whole
//! answer; every item taking effect exactly once when the whole request is resent after a SIGKILL;
//! conservation of money with 16 clients mixing bulk requests of random sizes with single
//! transfers and deposits; and single transfers that keep completing under a stream of bulk
//! requests (the worker counts a batch in transactions, so a bulk request never starves them).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{
    db_balances, db_totals, db_transactions, seeded_card, test_seed, transfer_body, Client, LedgerDb, Reply,
    Rng, Server,
};
use serde_json::Value;

/// The default `--bulk-items-max`.
const ITEMS_MAX: usize = 8190;

fn bulk_body(items: &[String]) -> String {
    format!(r#"{{"transfers":[{}]}}"#, items.join(","))
}

fn keyed_item(source: &str, destination: &str, amount: i64, key: &str) -> String {
    format!(
        r#"{{"source":"{source}","destination":"{destination}","amount":{amount},"idempotency_key":"{key}"}}"#
    )
}

async fn post_bulk(client: &mut Client, items: &[String]) -> Reply {
    client.post_json("/transfers/bulk", &bulk_body(items)).await
}

/// The results of a 200, each checked to be at its index.
#[track_caller]
fn item_results(reply: &Reply, expected: usize) -> Vec<Value> {
    assert_eq!(reply.status, 200, "{}", reply.text);
    let results = reply.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), expected);
    for (index, result) in results.iter().enumerate() {
        assert_eq!(result["index"], index, "{result}");
    }
    results
}

/// The n-th seeded card's number.
fn card(n: u32) -> String {
    seeded_card(n).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_at_the_item_limit_commits_whole_and_one_over_it_changes_nothing() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let items: Vec<String> = (0..ITEMS_MAX as u32)
        .map(|i| transfer_body(&card(1 + i % 1000), &card(1 + (i + 1) % 1000), 1))
        .collect();
    let reply = post_bulk(&mut client, &items).await;
    let results = item_results(&reply, ITEMS_MAX);
    let ids: Vec<i64> = results
        .iter()
        .map(|result| {
            assert_eq!(result["status"], 200, "{result}");
            result["id"].as_i64().unwrap()
        })
        .collect();
    assert!(
        ids.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "one commit, ids in input order"
    );
    let db = server.sqlite();
    assert_eq!(db_transactions(&db), ITEMS_MAX as i64);

    let mut over = items.clone();
    over.push(transfer_body(&card(1), &card(2), 1));
    let reply = post_bulk(&mut client, &over).await;
    assert_eq!(
        (reply.status.as_u16(), reply.error_code().as_str()),
        (413, "body_too_large"),
        "{}",
        reply.text
    );
    let reply = post_bulk(&mut client, &[]).await;
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(db_transactions(&db), ITEMS_MAX as i64, "nothing more committed");
    let (opening, current) = db_totals(&db);
    assert_eq!(opening, current);
    server.verify();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_item_anywhere_refuses_the_whole_request_with_its_index() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let good = |i: u32| transfer_body(&card(1 + i), &card(2 + i), 1);
    let bad = [
        (transfer_body(&card(1), &card(1), 1), "same_account"),
        (transfer_body(&card(1), &card(2), -5), "invalid_amount"),
        (
            format!(
                r#"{{"source":"{}","destination":"{}","amount":1,"memo":"x"}}"#,
                card(1),
                card(2)
            ),
            "unknown_field",
        ),
        (keyed_item(&card(1), &card(2), 1, ""), "invalid_idempotency_key"),
        (
            r#"{"source":"12","destination":"4000000000000002","amount":1}"#.to_owned(),
            "invalid_card_number",
        ),
        ("[1]".to_owned(), "invalid_json"),
    ];
    for (at, (item, code)) in [0, 50, 99]
        .into_iter()
        .flat_map(|at| bad.iter().map(move |b| (at, b)))
    {
        let mut items: Vec<String> = (0..100).map(good).collect();
        items[at] = item.clone();
        let reply = post_bulk(&mut client, &items).await;
        assert_eq!(
            (reply.status.as_u16(), reply.error_code().as_str()),
            (400, *code),
            "item {at}: {}",
            reply.text
        );
        let error = &reply.json()["error"];
        assert_eq!(error["index"], at, "{}", reply.text);
        assert!(
            error["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("transfers[{at}]: ")),
            "{}",
            reply.text
        );
    }
    // A body that is not the shape at all has no index.
    let reply = client.post_json("/transfers/bulk", r#"{"transfers":5}"#).await;
    assert_eq!(reply.error_code(), "invalid_json");
    assert!(reply.json()["error"].get("index").is_none());
    assert_eq!(db_transactions(&server.sqlite()), 0, "nothing was queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_keys_are_transfer_keys_and_the_request_key_replays_the_whole_answer() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (a, b) = (card(1), card(2));
    // Within one request: the same key and transfer replays, another transfer under it is refused.
    let reply = post_bulk(
        &mut client,
        &[
            keyed_item(&a, &b, 10, "k-1"),
            keyed_item(&a, &b, 10, "k-1"),
            keyed_item(&a, &b, 11, "k-1"),
            transfer_body(&a, &b, 1_000_000_000),
            transfer_body(&a, "4000000000999999", 1),
        ],
    )
    .await;
    let results = item_results(&reply, 5);
    let id = results[0]["id"].as_i64().unwrap();
    assert_eq!(results[1]["replayed"], true);
    assert_eq!(results[1]["id"], id);
    assert_eq!(
        (
            results[2]["status"].as_i64(),
            results[2]["error"]["code"].as_str()
        ),
        (Some(422), Some("idempotency_key_reused"))
    );
    assert_eq!(results[3]["error"]["code"], "insufficient_funds");
    assert_eq!(results[3]["error"]["balance"], 100_100 - 10);
    assert_eq!(
        (
            results[4]["status"].as_i64(),
            results[4]["error"]["card_number"].as_str()
        ),
        (Some(404), Some("4000000000999999"))
    );
    // A single POST /transfers under the item's key is the same request.
    let single = client
        .post_keyed("/transfers", &transfer_body(&a, &b, 10), "k-1")
        .await;
    assert!(single.replayed(), "{}", single.text);
    assert_eq!(single.i64("id"), id);
    let other = client
        .post_keyed("/transfers", &transfer_body(&a, &b, 12), "k-1")
        .await;
    assert_eq!(other.error_code(), "idempotency_key_reused");
    // And the other way round; and a refusal stored under a key is replayed as that item's.
    let single = client
        .post_keyed("/transfers", &transfer_body(&b, &a, 3), "k-2")
        .await;
    assert_eq!(single.status, 200, "{}", single.text);
    let reply = post_bulk(
        &mut client,
        &[
            keyed_item(&b, &a, 3, "k-2"),
            keyed_item(&a, &b, 1_000_000_000, "k-3"),
        ],
    )
    .await;
    let first = item_results(&reply, 2);
    assert_eq!(
        (first[0]["replayed"].as_bool(), first[0]["id"].as_i64()),
        (Some(true), Some(single.i64("id")))
    );
    let reply = post_bulk(&mut client, &[keyed_item(&a, &b, 1_000_000_000, "k-3")]).await;
    let again = item_results(&reply, 1);
    assert_eq!(again[0]["replayed"], true);
    assert_eq!(again[0]["error"], first[1]["error"]);
    // The request's own key: the whole answer again, byte for byte, and nothing moved.
    let items = [transfer_body(&a, &b, 5), transfer_body(&b, &a, 7)];
    let whole = [("idempotency-key", "bulk-1")];
    let before = db_transactions(&server.sqlite());
    let first = client
        .post_with("/transfers/bulk", &bulk_body(&items), &whole)
        .await;
    let replay = client
        .post_with("/transfers/bulk", &bulk_body(&items), &whole)
        .await;
    assert!(replay.replayed() && replay.body == first.body, "{}", replay.text);
    assert_eq!(db_transactions(&server.sqlite()), before + 2);
    let reused = client
        .post_with("/transfers/bulk", &bulk_body(&items[..1]), &whole)
        .await;
    assert_eq!(
        (reused.status.as_u16(), reused.error_code().as_str()),
        (422, "idempotency_key_reused")
    );
    // The request key is its route's: the same key on POST /transfers is another key.
    let single = client.post_with("/transfers", &items[0], &whole).await;
    assert!(!single.replayed() && single.status == 200, "{}", single.text);
    server.verify();
}

/// The bug this guards against: a client that lost its answer to a crash resends the whole bulk
/// request, and an item that had committed moves money a second time (or one that had not is
/// skipped). With a key on every item, the resend must replay exactly the items that committed
/// and execute the rest, so that every item takes effect once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resending_a_keyed_bulk_request_after_sigkill_applies_every_item_exactly_once() {
    const REQUESTS: u32 = 6;
    const ITEMS: u32 = 400;
    const CARDS: u32 = 40;
    let seed = test_seed("bulk_sigkill", "TALLYD_BULK_SEED");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let mut server = Server::start_on(&db, &[]);
    let mut legs: BTreeMap<String, i64> = BTreeMap::new();
    let bodies: Vec<String> = (0..REQUESTS)
        .map(|request| {
            let items: Vec<String> = (0..ITEMS)
                .map(|i| {
                    let source = 1 + rng.below(u64::from(CARDS)) as u32;
                    let destination = 1 + (source + rng.below(u64::from(CARDS) - 1) as u32) % CARDS;
                    let amount = 1 + rng.below(100) as i64;
                    *legs.entry(card(source)).or_default() -= amount;
                    *legs.entry(card(destination)).or_default() += amount;
                    keyed_item(
                        &card(source),
                        &card(destination),
                        amount,
                        &format!("r{request}-i{i}"),
                    )
                })
                .collect();
            bulk_body(&items)
        })
        .collect();
    // All requests at once; the first answer kills the server while the others are in flight.
    let (answered, mut first_answer) = tokio::sync::mpsc::channel::<()>(REQUESTS as usize);
    let tasks: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|body| {
            let addr = server.addr;
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let request = client.post_request("/transfers/bulk", &body, &[]);
                let reply = client.try_request(request).await;
                let _ = answered.send(()).await;
                reply.ok().map(|reply| reply.status.as_u16())
            })
        })
        .collect();
    first_answer.recv().await;
    server.kill();
    let mut answered_before = 0;
    for task in tasks {
        if task.await.unwrap() == Some(200) {
            answered_before += 1;
        }
    }
    let committed_before = db_transactions(&server.sqlite());
    assert!(answered_before >= 1 && committed_before >= i64::from(ITEMS));

    let server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    let mut replayed = 0;
    for body in &bodies {
        let reply = client.post_json("/transfers/bulk", body).await;
        for result in item_results(&reply, ITEMS as usize) {
            assert_eq!(result["status"], 200, "{result}");
            if result["replayed"] == true {
                replayed += 1;
            }
        }
    }
    assert_eq!(
        i64::from(replayed),
        committed_before,
        "exactly what had committed is replayed"
    );
    let conn = server.sqlite();
    assert_eq!(
        db_transactions(&conn),
        i64::from(REQUESTS * ITEMS),
        "every item once"
    );
    let keys = conn.integer("SELECT count(DISTINCT idempotency_key) FROM transactions");
    assert_eq!(keys, i64::from(REQUESTS * ITEMS), "one transaction per key");
    let balances = db_balances(&conn);
    for n in 1..=CARDS {
        let (number, opening) = seeded_card(n);
        let expected = opening + legs.get(&number).copied().unwrap_or(0);
        assert_eq!(balances[&number], expected, "{number} (seed {seed})");
        assert_eq!(client.account_balance(&number).await, expected);
    }
    eprintln!(
        "bulk after SIGKILL: {answered_before} of {REQUESTS} answered before the kill, {committed_before} items committed, \
         all {} replayed or executed once (seed {seed})",
        REQUESTS * ITEMS
    );
    server.verify();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn money_is_conserved_with_16_clients_mixing_bulk_and_single_requests() {
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 25;
    const CARDS: u32 = 12;
    let seed = test_seed("bulk_conservation", "TALLYD_BULK_SEED");
    let mut rng = Rng(seed);
    let server = Server::start(&[]);
    let cards: Vec<(String, i64)> = (1..=CARDS).map(seeded_card).collect();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let mut rng = rng.split();
            let cards = cards.clone();
            let addr = server.addr;
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let mut legs: BTreeMap<String, i64> = BTreeMap::new();
                let mut committed = 0_i64;
                let pick = |rng: &mut Rng| cards[rng.below(cards.len() as u64) as usize].0.clone();
                let pair = |rng: &mut Rng| {
                    let source = pick(rng);
                    let mut destination = pick(rng);
                    while destination == source {
                        destination = pick(rng);
                    }
                    (source, destination)
                };
                for _ in 0..ROUNDS {
                    match rng.below(4) {
                        0 => {
                            let (source, destination) = pair(&mut rng);
                            let amount = 1 + rng.below(40_000) as i64;
                            let reply = client.transfer(&source, &destination, amount).await;
                            match reply.status.as_u16() {
                                200 => {
                                    *legs.entry(source).or_default() -= amount;
                                    *legs.entry(destination).or_default() += amount;
                                    committed += 1;
                                }
                                422 => assert_eq!(reply.error_code(), "insufficient_funds"),
                                _ => panic!("transfer: {}", reply.text),
                            }
                        }
                        1 => {
                            let target = pick(&mut rng);
                            let amount = 1 + rng.below(20_000) as i64;
                            let amount = if rng.below(2) == 0 { amount } else { -amount };
                            let reply = client.transaction(&target, amount).await;
                            if reply.status == 200 {
                                *legs.entry(target).or_default() += amount;
                                *legs.entry("@world".to_owned()).or_default() -= amount;
                                committed += 1;
                            }
                        }
                        _ => {
                            let size = 1 + rng.below(300) as usize;
                            let items: Vec<(String, String, i64)> = (0..size)
                                .map(|_| {
                                    let (source, destination) = pair(&mut rng);
                                    (source, destination, 1 + rng.below(40_000) as i64)
                                })
                                .collect();
                            let bodies: Vec<String> =
                                items.iter().map(|(s, d, a)| transfer_body(s, d, *a)).collect();
                            let reply = post_bulk(&mut client, &bodies).await;
                            for ((source, destination, amount), result) in
                                items.into_iter().zip(item_results(&reply, size))
                            {
                                match result["status"].as_i64() {
                                    Some(200) => {
                                        *legs.entry(source).or_default() -= amount;
                                        *legs.entry(destination).or_default() += amount;
                                        committed += 1;
                                    }
                                    Some(422) => assert_eq!(result["error"]["code"], "insufficient_funds"),
                                    _ => panic!("bulk item: {result}"),
                                }
                            }
                        }
                    }
                }
                (legs, committed)
            })
        })
        .collect();
    let mut legs: BTreeMap<String, i64> = BTreeMap::new();
    let mut committed = 0;
    for task in tasks {
        let (client_legs, count) = task.await.unwrap();
        for (account, sum) in client_legs {
            *legs.entry(account).or_default() += sum;
        }
        committed += count;
    }
    let mut client = server.client().await;
    let db = server.sqlite();
    let balances = db_balances(&db);
    for (number, opening) in &cards {
        let expected = opening + legs.get(number).copied().unwrap_or(0);
        assert!(expected >= 0);
        assert_eq!(
            balances[number], expected,
            "{number} in the journal (seed {seed})"
        );
        assert_eq!(client.account_balance(number).await, expected, "{number}");
    }
    assert_eq!(balances["@world"], legs.get("@world").copied().unwrap_or(0));
    let (opening, current) = db_totals(&db);
    assert_eq!(opening, current, "money was created or destroyed");
    assert_eq!(
        db_transactions(&db),
        committed,
        "exactly the acknowledged items committed"
    );
    eprintln!(
        "bulk conservation: {committed} transactions from {CLIENTS} clients over {CARDS} cards (seed {seed})"
    );
    server.verify();
}

/// No time is measured: single transfers must all complete while bulk requests of 8,190 keep
/// arriving, which is only guaranteed because a batch is counted in transactions (a bulk request
/// is a commit of its own, and the single requests queued behind it form the next one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_transfers_complete_under_a_stream_of_bulk_requests() {
    const BULK_CLIENTS: usize = 3;
    const SINGLES: u32 = 100;
    let server = Server::start(&[]);
    let done = Arc::new(AtomicBool::new(false));
    let bulks: Vec<_> = (0..BULK_CLIENTS as u32)
        .map(|client_index| {
            let (addr, done) = (server.addr, Arc::clone(&done));
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let items: Vec<String> = (0..ITEMS_MAX as u32)
                    .map(|i| {
                        transfer_body(
                            &card(100 + (i + client_index) % 900),
                            &card(100 + (i + client_index + 7) % 900),
                            1,
                        )
                    })
                    .collect();
                let body = bulk_body(&items);
                let mut sent = 0;
                while !done.load(Ordering::Relaxed) {
                    let reply = client.post_json("/transfers/bulk", &body).await;
                    assert_eq!(reply.status, 200, "{}", &reply.text[..reply.text.len().min(300)]);
                    sent += 1;
                }
                sent
            })
        })
        .collect();
    let mut client = server.client().await;
    let mut ids = HashSet::new();
    for i in 0..SINGLES {
        let reply = client.transfer(&card(1 + i % 50), &card(51 + i % 50), 1).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        ids.insert(reply.i64("id"));
    }
    done.store(true, Ordering::Relaxed);
    let mut bulk_requests = 0;
    for task in bulks {
        bulk_requests += task.await.unwrap();
    }
    assert_eq!(ids.len(), SINGLES as usize);
    eprintln!("{SINGLES} single transfers completed beside {bulk_requests} bulk requests of {ITEMS_MAX}");
    let (opening, current) = db_totals(&server.sqlite());
    assert_eq!(opening, current);
}

const NDJSON: [(&str, &str); 1] = [("content-type", "application/x-ndjson")];

/// The result lines of an NDJSON answer, each checked to be at its index.
fn result_lines(reply: &Reply) -> Vec<Value> {
    assert_eq!(
        reply.header("content-type"),
        Some("application/x-ndjson"),
        "{}",
        reply.text
    );
    let lines: Vec<Value> = reply
        .text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    for (index, line) in lines.iter().enumerate() {
        assert_eq!(line["index"], index, "{line}");
    }
    lines
}

/// A stream larger than any JSON body the server takes, cut into commits of --bulk-items-max lines:
/// every line answered in order, once, with the stream's own limit on memory (not on size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ndjson_stream_larger_than_the_body_limit_commits_run_by_run() {
    const LINES: u32 = 30_000;
    let server = Server::start(&["--bulk-items-max", "1000", "--body-limit-bytes", "65536"]);
    let mut client = server.client().await;
    let mut body = String::new();
    for i in 0..LINES {
        body.push_str(&keyed_item(
            &card(1 + i % 500),
            &card(1 + (i + 1) % 500),
            1,
            &format!("line-{i}"),
        ));
        body.push_str(if i % 1000 == 7 { "\r\n\n" } else { "\n" });
    }
    assert!(body.len() > 1000 * 1024, "larger than the JSON bulk limit");
    let reply = client.post_with("/transfers/bulk", &body, &NDJSON).await;
    assert_eq!(reply.status, 200);
    let lines = result_lines(&reply);
    assert_eq!(
        lines.len(),
        LINES as usize,
        "blank lines are skipped, \\r\\n is a line end"
    );
    assert!(lines.iter().all(|line| line["status"] == 200));
    assert_eq!(db_transactions(&server.sqlite()), i64::from(LINES));
    // The same stream again: every line replayed by its key, nothing moves.
    let again = client.post_with("/transfers/bulk", &body, &NDJSON).await;
    assert!(result_lines(&again).iter().all(|line| line["replayed"] == true));
    assert_eq!(db_transactions(&server.sqlite()), i64::from(LINES));
    // The request's own key has no meaning for a stream that is not stored whole.
    let keyed = [NDJSON[0], ("idempotency-key", "whole")];
    let refused = client.post_with("/transfers/bulk", &body[..200], &keyed).await;
    assert_eq!(refused.error_code(), "invalid_idempotency_key");
    server.verify();
}

/// A broken line: every line before it decided and durable (answered), the broken one answered with
/// its 400 as the last line, nothing after it decided, so that the client resends from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ndjson_stream_with_a_broken_line_stops_there_with_everything_before_it_durable() {
    let server = Server::start(&["--bulk-items-max", "100"]);
    let mut client = server.client().await;
    let line = |i: u32| transfer_body(&card(1 + i % 50), &card(51 + i % 50), 1);
    for broken_at in [0_u32, 150, 299] {
        let before = db_transactions(&server.sqlite());
        let body: String = (0..300)
            .map(|i| {
                if i == broken_at {
                    r#"{"source":"4000000000000001","amount":1"#.to_owned()
                } else {
                    line(i)
                }
            })
            .map(|line| line + "\n")
            .collect();
        let reply = client.post_with("/transfers/bulk", &body, &NDJSON).await;
        if broken_at == 0 {
            // Nothing was decided: an ordinary refusal with the line's index.
            assert_eq!(
                (reply.status.as_u16(), reply.error_code().as_str()),
                (400, "invalid_json")
            );
            assert_eq!(reply.json()["error"]["index"], 0);
            assert_eq!(db_transactions(&server.sqlite()), before);
            continue;
        }
        assert_eq!(reply.status, 200, "{}", reply.text);
        let lines = result_lines(&reply);
        assert_eq!(lines.len(), broken_at as usize + 1, "the broken line is the last");
        assert!(lines[..broken_at as usize]
            .iter()
            .all(|line| line["status"] == 200));
        let last = &lines[broken_at as usize];
        assert_eq!(
            (last["status"].as_i64(), last["error"]["code"].as_str()),
            (Some(400), Some("invalid_json")),
            "{last}"
        );
        assert_eq!(
            db_transactions(&server.sqlite()),
            before + i64::from(broken_at),
            "nothing after the broken line"
        );
    }
    let (opening, current) = db_totals(&server.sqlite());
    assert_eq!(opening, current);
    server.verify();
}

/// Bulk requests in flight are bounded (32, `limits::BULK_REQUESTS_IN_FLIGHT_MAX`), so that their
/// bodies and items cannot take memory without end: of 33 requests whose bodies stall, exactly one
/// is answered 503 `queue_full` before its body is read; while the 32 others hold their slots a
/// whole bulk request is refused too, and single transfers are not; once they are gone bulk
/// requests are served again.
// The stalled requests alone must fill the slots: a probe sent while their heads are still being
// read would take a slot of its own and leave one of them refused instead (which is how an earlier
// version of this test timed out now and then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_requests_in_flight_are_bounded_and_one_more_is_refused_before_its_body() {
    use tokio::io::AsyncWriteExt;
    const IN_FLIGHT_MAX: usize = 32;
    let server = Server::start(&["--request-timeout-ms", "600000"]);
    let mut stalled = Vec::new();
    for _ in 0..=IN_FLIGHT_MAX {
        let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let head = "POST /transfers/bulk HTTP/1.1\r\nhost: tallyd\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"transfers\":[";
        stream.write_all(head.as_bytes()).await.unwrap();
        stalled.push(stream);
    }
    let deadline = common::Deadline::new(
        std::time::Duration::from_secs(60),
        "one of 33 stalled bulk requests to be refused",
    );
    let (refused, answer) = 'answered: loop {
        for (index, stream) in stalled.iter().enumerate() {
            let mut buf = [0_u8; 1024];
            match stream.try_read(&mut buf) {
                Ok(read) => break 'answered (index, String::from_utf8_lossy(&buf[..read]).into_owned()),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(error) => panic!("stalled request {index}: {error}"),
            }
        }
        deadline.tick().await;
    };
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("\"queue_full\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{answer}"
    );
    drop(stalled.remove(refused));

    let mut client = server.client().await;
    let items = [transfer_body(&card(1), &card(2), 1)];
    let reply = post_bulk(&mut client, &items).await;
    assert_eq!(reply.status, 503, "{}", reply.text);
    assert_eq!(reply.error_code(), "queue_full");
    assert_eq!(reply.header("retry-after"), Some("1"));
    // Single transfers are not held up by it.
    assert_eq!(client.transfer(&card(3), &card(4), 1).await.status, 200);
    for stream in &stalled {
        let mut buf = [0_u8; 16];
        assert!(
            matches!(stream.try_read(&mut buf), Err(error) if error.kind() == std::io::ErrorKind::WouldBlock),
            "a request holding a slot was answered"
        );
    }
    drop(stalled);
    let deadline = common::Deadline::new(
        std::time::Duration::from_secs(60),
        "bulk requests to be served again once the stalled ones are gone",
    );
    while post_bulk(&mut client, &items).await.status != 200 {
        deadline.tick().await;
    }
}
