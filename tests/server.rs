//! End-to-end tests of the core server: the real binary, on an ephemeral port, over HTTP, with the
//! database checked afterwards.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{
    parse_prometheus, seeded_card, series_value, Client, Deadline, LedgerDb, Server, DEMO_CARD, DEMO_OPENING,
};
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn journal_count(server: &Server) -> i64 {
    server.sqlite().integer("SELECT count(*) FROM journal")
}

#[tokio::test]
async fn deposits_and_withdrawals_commit_and_are_journaled() {
    // Reads the journal through rusqlite, row by row.
    sqlite_only!();
    let server = Server::start(&[]);
    let mut client = server.client().await;

    let deposit = client.transaction(DEMO_CARD, 150).await;
    assert_eq!(deposit.status, StatusCode::OK, "{}", deposit.text);
    let body = deposit.json();
    assert_eq!(body["card_number"], DEMO_CARD);
    assert_eq!(body["amount"], 150);
    assert_eq!(body["balance"], DEMO_OPENING + 150);
    assert_eq!(body["status"], "committed");

    let withdrawal = client.transaction(DEMO_CARD, -1_000).await;
    assert_eq!(withdrawal.status, StatusCode::OK, "{}", withdrawal.text);
    assert_eq!(withdrawal.json()["balance"], DEMO_OPENING + 150 - 1_000);
    assert!(withdrawal.json()["id"].as_i64() > body["id"].as_i64(), "ids grow");

    assert_eq!(client.balance(DEMO_CARD).await, DEMO_OPENING - 850);
    let rows: Vec<(i64, String, i64, i64)> = server
        .sqlite()
        .prepare("SELECT id, card_number, amount, balance_after FROM journal ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows,
        [
            (
                body["id"].as_i64().unwrap(),
                DEMO_CARD.to_owned(),
                150,
                DEMO_OPENING + 150
            ),
            (
                withdrawal.json()["id"].as_i64().unwrap(),
                DEMO_CARD.to_owned(),
                -1_000,
                DEMO_OPENING - 850
            ),
        ]
    );
    server.verify();
}

#[tokio::test]
async fn a_withdrawal_beyond_the_balance_is_refused_and_changes_nothing() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let (card, opening) = seeded_card(7);

    let refused = client.transaction(&card, -(opening + 1)).await;
    assert_eq!(refused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(refused.error_code(), "insufficient_funds");
    assert_eq!(refused.json()["error"]["balance"], opening);

    let exact = client.transaction(&card, -opening).await;
    assert_eq!(
        exact.status,
        StatusCode::OK,
        "withdrawing the whole balance is allowed"
    );
    assert_eq!(exact.json()["balance"], 0);
    let one_more = client.transaction(&card, -1).await;
    assert_eq!(one_more.error_code(), "insufficient_funds");

    assert_eq!(client.balance(&card).await, 0);
    assert_eq!(
        journal_count(&server),
        1,
        "only the exact withdrawal is journaled"
    );
    server.verify();
}

#[tokio::test]
async fn unknown_cards_are_404() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let reply = client.transaction("999999", 10).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(reply.error_code(), "card_not_found");
    let reply = client.get("/balance?card_number=999999").await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (StatusCode::NOT_FOUND, "card_not_found")
    );
    assert_eq!(journal_count(&server), 0);
}

#[tokio::test]
async fn every_bad_request_gets_its_json_error_and_changes_nothing() {
    let server = Server::start(&["--body-limit-bytes", "1024"]);
    let mut client = server.client().await;
    let bodies = [
        ("", 400, "invalid_json"),
        ("{not json", 400, "invalid_json"),
        ("[1,2]", 400, "invalid_json"),
        (r#"{"card_number":"1234567890"}"#, 400, "missing_field"),
        (
            r#"{"card_number":"1234567890","amount":5,"note":"x"}"#,
            400,
            "unknown_field",
        ),
        (
            r#"{"card_number":"1234567890","amount":5,"amount":5}"#,
            400,
            "duplicate_field",
        ),
        (
            r#"{"card_number":1234567890,"amount":5}"#,
            400,
            "invalid_card_number",
        ),
        (
            r#"{"card_number":"12ab567890","amount":5}"#,
            400,
            "invalid_card_number",
        ),
        (
            r#"{"card_number":"1234567890","amount":0}"#,
            400,
            "invalid_amount",
        ),
        (
            r#"{"card_number":"1234567890","amount":2.5}"#,
            400,
            "invalid_amount",
        ),
        (
            r#"{"card_number":"1234567890","amount":"5"}"#,
            400,
            "invalid_amount",
        ),
        (
            r#"{"card_number":"1234567890","amount":1000000000001}"#,
            400,
            "invalid_amount",
        ),
    ];
    for (body, status, code) in bodies {
        let reply = client.post_json("/transaction", body).await;
        assert_eq!(
            (reply.status.as_u16(), reply.error_code().as_str()),
            (status, code),
            "{body}"
        );
        assert!(!reply.json()["error"]["message"].as_str().unwrap().is_empty());
    }

    let big = format!(
        r#"{{"card_number":"1234567890","amount":5,"pad":"{}"}}"#,
        "x".repeat(2000)
    );
    let reply = client.post_json("/transaction", &big).await;
    assert_eq!(
        (reply.status, reply.error_code().as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );

    let mut client = server.client().await;
    let form = hyper::Request::post("/transaction")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            b"card_number=1234567890&amount=5",
        )))
        .unwrap();
    let reply = client.request(form).await;
    assert_eq!(
        (reply.status.as_u16(), reply.error_code().as_str()),
        (415, "unsupported_media_type")
    );

    let reply = client.get("/transaction").await;
    assert_eq!(
        (reply.status.as_u16(), reply.error_code().as_str()),
        (405, "method_not_allowed")
    );
    assert_eq!(reply.headers["allow"], "POST");
    let reply = client.post_json("/balance", "{}").await;
    assert_eq!(
        (reply.status.as_u16(), reply.headers["allow"].to_str().unwrap()),
        (405, "GET, HEAD")
    );
    let reply = client.get("/nope").await;
    assert_eq!(
        (reply.status.as_u16(), reply.error_code().as_str()),
        (404, "not_found")
    );
    for query in ["", "?card=1234567890", "?card_number=12", "?card_number=abcdefgh"] {
        let reply = client.get(&format!("/balance{query}")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{query}");
    }

    assert_eq!(journal_count(&server), 0, "no bad request wrote anything");
    assert_eq!(client.balance(DEMO_CARD).await, DEMO_OPENING);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413() {
    let server = Server::start(&["--body-limit-bytes", "1024"]);
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let chunk = "x".repeat(600);
    let request = format!(
        "POST /transaction HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
         {len:x}\r\n{chunk}\r\n{len:x}\r\n{chunk}\r\n0\r\n\r\n",
        len = chunk.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = vec![0; 4096];
    let n = stream.read(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("body_too_large"), "{text}");
}

/// Sixteen clients race deposits and withdrawals on four cards. Afterwards every balance must be
/// its opening balance plus exactly the acknowledged amounts, and agree with the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_on_few_cards_conserve_money() {
    const CLIENTS: u64 = 16;
    const PER_CLIENT: u64 = 150;
    let server = Server::start(&[]);
    let cards: Vec<(String, i64)> = (1..=4).map(seeded_card).collect();
    let mut tasks = Vec::new();
    for client_index in 0..CLIENTS {
        let addr = server.addr;
        let cards = cards.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            let mut acknowledged = Vec::new();
            let mut refused = 0;
            for i in 0..PER_CLIENT {
                // A deterministic spread of cards and signed amounts, withdrawals large enough to
                // hit insufficient funds once balances run low.
                let (card, _) = &cards[((client_index * 7 + i) % 4) as usize];
                let amount = if (client_index + i) % 3 == 0 {
                    5_000
                } else {
                    -17_000
                };
                let reply = client.transaction(card, amount).await;
                match reply.status {
                    StatusCode::OK => {
                        let body = reply.json();
                        assert_eq!(body["amount"], amount);
                        acknowledged.push((body["id"].as_i64().unwrap(), card.clone(), amount));
                    }
                    StatusCode::UNPROCESSABLE_ENTITY => {
                        assert_eq!(reply.error_code(), "insufficient_funds");
                        refused += 1;
                    }
                    other => panic!("unexpected {other}: {}", reply.text),
                }
            }
            (acknowledged, refused)
        }));
    }
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let (acks, refusals) = task.await.unwrap();
        acknowledged.extend(acks);
        refused += refusals;
    }
    assert_eq!(acknowledged.len() as u64 + refused, CLIENTS * PER_CLIENT);
    assert!(refused > 0, "the workload must exercise insufficient funds");

    let mut expected: HashMap<String, i64> = cards.iter().cloned().collect();
    for (_, card, amount) in &acknowledged {
        *expected.get_mut(card).unwrap() += amount;
    }
    let mut client = server.client().await;
    let db = server.sqlite();
    for (card, balance) in &expected {
        assert!(*balance >= 0);
        assert_eq!(
            client.balance(card).await,
            *balance,
            "{card}: opening + acknowledged"
        );
        let journal = db.integer(&format!(
            "SELECT coalesce(sum(amount), 0) FROM journal WHERE card_number = '{card}'"
        ));
        let opening = cards.iter().find(|(c, _)| c == card).unwrap().1;
        assert_eq!(opening + journal, *balance, "{card}: opening + journal");
    }
    let rows: HashMap<i64, (String, i64)> = db
        .pairs("SELECT id || ' ' || card_number, amount FROM journal")
        .into_iter()
        .map(|(id_card, amount)| {
            let (id, card) = id_card.split_once(' ').unwrap();
            (id.parse().unwrap(), (card.to_owned(), amount))
        })
        .collect();
    for (id, card, amount) in &acknowledged {
        assert_eq!(rows.get(id), Some(&(card.clone(), *amount)), "journal row {id}");
    }
    assert_eq!(
        journal_count(&server),
        acknowledged.len() as i64,
        "nothing unacknowledged was written"
    );
    server.verify();
}

/// Holds SQLite's write lock from outside so the worker cannot commit, sends more transactions
/// than the worker and the queue can hold, and checks that the surplus is refused at once with 503
/// and Retry-After while the rest wait; then releases the lock and checks that the rest commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_at_once_and_recovers() {
    // Blocks the worker with SQLite's exclusive lock.
    sqlite_only!();
    const SENT: u64 = 24;
    const QUEUE_DEPTH: u64 = 4;
    let server = Server::start(&[
        "--workers",
        "1",
        "--queue-depth",
        "4",
        "--busy-timeout-ms",
        "120000",
    ]);
    let blocker = server.sqlite();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();

    let (done, mut replies) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..SENT {
        let mut client = server.client().await;
        let done = done.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = client.transaction(DEMO_CARD, 1).await;
            let _ = done.send((reply, started.elapsed()));
        });
    }
    // The blocked worker holds the batch it took and the queue what was left. How many of each
    // depends on when the worker drained the queue, which on a loaded machine may be after the
    // first refusals; so the test asserts only what always holds: nothing is refused before four
    // are queued, and every other request comes back refused, without waiting for the lock.
    let mut probe = server.client().await;
    let mut refused = Vec::new();
    let deadline = Deadline::new(Duration::from_secs(30), "every request to be queued or refused");
    let held = loop {
        while let Ok(reply) = replies.try_recv() {
            refused.push(reply);
        }
        let queue = probe.get("/stats").await.json()["queue"].clone();
        let held = queue["depth"].as_u64().unwrap() + queue["in_progress"].as_u64().unwrap();
        if held + refused.len() as u64 == SENT {
            assert!(queue["depth"].as_u64().unwrap() <= QUEUE_DEPTH, "{queue}");
            assert!(held >= QUEUE_DEPTH, "refused before the queue was full: {queue}");
            break held;
        }
        deadline.tick().await;
    };
    assert!(!refused.is_empty());
    for (reply, took) in &refused {
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text);
        assert_eq!(reply.error_code(), "queue_full");
        assert_eq!(reply.headers["retry-after"], "1");
        assert!(
            *took < Duration::from_secs(5),
            "refused at once, not after a wait ({took:?})"
        );
    }
    assert!(
        replies.try_recv().is_err(),
        "nothing held was answered before the commit"
    );
    assert_eq!(
        probe.get("/readyz").await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "not ready while full"
    );
    assert_eq!(
        probe.get("/healthz").await.status,
        StatusCode::OK,
        "alive while full"
    );
    assert_eq!(
        probe.balance(DEMO_CARD).await,
        DEMO_OPENING,
        "reads are not blocked by the stuck writer"
    );

    blocker.execute_batch("COMMIT").unwrap();
    for _ in 0..held {
        let (reply, _) = tokio::time::timeout(Duration::from_secs(30), replies.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    }
    assert_eq!(probe.balance(DEMO_CARD).await, DEMO_OPENING + held as i64);
    assert_eq!(probe.get("/readyz").await.status, StatusCode::OK);
    let stats = probe.get("/stats").await.json();
    assert_eq!(stats["transactions"]["queue_full"], refused.len() as u64);
    assert_eq!(stats["transactions"]["committed"], held);
    assert_eq!(journal_count(&server), held as i64);
}

/// SIGTERM while transactions wait in the queue: the server must commit and answer every one of
/// them, then exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_commits_and_answers_what_was_queued() {
    // Blocks the worker with SQLite's exclusive lock.
    sqlite_only!();
    const QUEUED: u64 = 8;
    let mut server = Server::start(&["--workers", "1", "--busy-timeout-ms", "120000"]);
    let blocker = server.sqlite();
    blocker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let mut pending = Vec::new();
    for _ in 0..QUEUED {
        let mut client = server.client().await;
        pending.push(tokio::spawn(
            async move { client.transaction(DEMO_CARD, 10).await },
        ));
    }
    let mut stats = server.client().await;
    let deadline = Deadline::new(Duration::from_secs(30), "every transaction to reach the engine");
    loop {
        let queue = stats.get("/stats").await.json()["queue"].clone();
        if queue["depth"].as_u64().unwrap() + queue["in_progress"].as_u64().unwrap() == QUEUED {
            break;
        }
        deadline.tick().await;
    }
    drop(stats);

    server.signal("-TERM");
    blocker.execute_batch("COMMIT").unwrap();
    for attempt in pending {
        let reply = attempt.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    }
    let status = server.wait();
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(journal_count(&server), QUEUED as i64);
    let balance: i64 = server
        .sqlite()
        .query_row(
            "SELECT balance FROM accounts WHERE card_number = ?1",
            [DEMO_CARD],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(balance, DEMO_OPENING + 10 * QUEUED as i64);
    server.verify();
}

#[tokio::test]
async fn metrics_and_stats_count_what_was_sent() {
    // Counts the accounts in the engine's memory, which PostgreSQL does not keep.
    sqlite_only!();
    let server = Server::start(&["--workers", "3"]);
    let mut client = server.client().await;
    for _ in 0..3 {
        assert_eq!(client.transaction(DEMO_CARD, 100).await.status, StatusCode::OK);
    }
    assert_eq!(client.transaction(DEMO_CARD, -50).await.status, StatusCode::OK);
    assert_eq!(
        client.transaction(DEMO_CARD, -10_000_000).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        client.transaction("999999", 5).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        client.post_json("/transaction", "{}").await.status,
        StatusCode::BAD_REQUEST
    );

    let reply = client.get("/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let series = parse_prometheus(&reply.text);
    let count = |kind: &str, outcome: &str| {
        series_value(
            &series,
            "tallyd_transactions_total",
            &[("kind", kind), ("outcome", outcome)],
        )
        .unwrap_or_else(|| panic!("no series for {kind}/{outcome}"))
    };
    assert_eq!(count("deposit", "committed"), 3.0);
    assert_eq!(count("withdrawal", "committed"), 1.0);
    assert_eq!(count("withdrawal", "insufficient_funds"), 1.0);
    assert_eq!(count("deposit", "card_not_found"), 1.0);
    assert_eq!(count("unknown", "rejected"), 1.0);
    assert_eq!(count("deposit", "queue_full"), 0.0);
    assert_eq!(
        series_value(&series, "tallyd_transaction_duration_seconds_count", &[]),
        Some(7.0)
    );
    assert_eq!(
        series_value(&series, "tallyd_workers", &[]),
        Some(3.0),
        "--workers reaches the engine"
    );
    assert_eq!(series_value(&series, "tallyd_queue_capacity", &[]), Some(8192.0));
    assert!(series_value(&series, "tallyd_queue_depth", &[]).is_some());
    assert!(series_value(&series, "tallyd_uptime_seconds", &[]).unwrap() > 0.0);
    // The seeded cards, 24 bytes each in the engine's table (the demo card included).
    assert_eq!(series_value(&series, "tallyd_accounts", &[]), Some(100_001.0));
    let table = series_value(&series, "tallyd_account_table_bytes", &[]).unwrap();
    assert!(
        (100_001.0 * 24.0..100_001.0 * 32.0).contains(&table),
        "{table} bytes"
    );
    assert!(series_value(&series, "tallyd_write_back_lag_transactions", &[]).is_some());
    assert!(series_value(&series, "tallyd_idempotency_keys_live", &[]).is_some());
    assert!(series_value(&series, "tallyd_batch_size_count", &[]).unwrap() >= 4.0);
    assert!(series
        .iter()
        .any(|(name, _)| name.starts_with("tallyd_transaction_duration_seconds_bucket{le=")));
    let average = series_value(&series, "tallyd_average_balance", &[]).unwrap();

    let stats = client.get("/stats").await.json();
    let transactions = &stats["transactions"];
    assert_eq!(transactions["committed"], 4);
    assert_eq!(transactions["insufficient_funds"], 1);
    assert_eq!(transactions["card_not_found"], 1);
    assert_eq!(transactions["rejected"], 1);
    assert_eq!(transactions["queue_full"], 0);
    assert_eq!(stats["latency"]["count"], 7);
    assert_eq!(stats["latency"]["window"], 1000);
    let latency = &stats["latency"];
    let p50 = latency["p50_ms"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= latency["p99_ms"].as_f64().unwrap());
    assert!(latency["p99_ms"].as_f64().unwrap() <= latency["max_ms"].as_f64().unwrap());

    // The average balance is the seed's average plus what committed, over all accounts.
    let db = server.sqlite();
    let (sum, count): (i64, i64) = db
        .query_row("SELECT sum(balance), count(*) FROM accounts", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let exact = sum as f64 / count as f64;
    assert!((stats["average_balance"]["current"].as_f64().unwrap() - exact).abs() < 1e-6);
    assert!((average - exact).abs() < 1e-6);
    assert_eq!(stats["average_balance"]["window"], 3600);
}

#[tokio::test]
async fn the_average_balance_is_sampled_every_second() {
    let server = Server::start(&["--balance-ring", "2"]);
    let mut client = server.client().await;
    let deadline = Deadline::new(Duration::from_secs(30), "the ring to wrap");
    loop {
        let stats = client.get("/stats").await.json();
        if stats["uptime_seconds"].as_f64().unwrap() > 2.5 {
            break;
        }
        deadline.tick().await;
    }
    let stats = client.get("/stats").await.json();
    let samples = stats["average_balance"]["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2, "the ring keeps only its window");
    assert!(samples[0]["unix_ms"].as_i64() < samples[1]["unix_ms"].as_i64());
}

#[tokio::test]
async fn health_readiness_and_the_live_page() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    assert_eq!(client.get("/healthz").await.json()["status"], "ok");
    assert_eq!(client.get("/readyz").await.json()["status"], "ready");
    let page = client.get("/").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text.contains("/stats"), "the page polls /stats");
}
