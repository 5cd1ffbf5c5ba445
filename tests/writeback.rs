//! The balance write-back: a commit only appends transactions, and the accounts' rows catch up
//! later, a chunk at a time, with the checkpoint moved by the last chunk of a round. These tests
//! cut that process where it can be cut: a clean stop must leave every row current and nothing to
//! replay; SIGKILL between commits and their write-back, and in the middle of a round of many
//! chunks (thousands of accounts behind after each restart's replay), must lose nothing and leave a
//! database `verify` accepts.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{seeded_card, Client, Deadline, Rng, Server};
use hyper::StatusCode;

/// More accounts than one write-back chunk holds (2,048), so that a round takes several.
const CARDS: u32 = 6_000;
const CLIENTS: usize = 16;

/// Rows that differ from the account's current state (its row overridden by the journal's tail).
fn rows_behind(conn: &rusqlite::Connection) -> i64 {
    conn.query_row(
        "SELECT count(*) FROM ledger_accounts a JOIN current_accounts c ON c.name = a.name \
         WHERE a.balance <> c.balance OR a.last_transaction_id IS NOT c.last_transaction_id",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

fn checkpoint_and_last_id(conn: &rusqlite::Connection) -> (i64, i64) {
    conn.query_row(
        "SELECT (SELECT transaction_id FROM ledger_checkpoint), \
                (SELECT coalesce(max(id), 0) FROM transactions)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// Deposits of 1 to `count` distinct cards starting at `first`, 16 at a time; returns the ids.
async fn deposit_to_each(server: &Server, first: u32, count: u32) -> Vec<i64> {
    let mut tasks = Vec::new();
    for lane in 0..CLIENTS as u32 {
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            let mut ids = Vec::new();
            for n in (first + lane..first + count).step_by(CLIENTS) {
                let reply = client.transaction(&seeded_card(n).0, 1).await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
                ids.push(reply.i64("id"));
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.extend(task.await.unwrap());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_writes_every_balance_back_and_the_next_start_replays_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let mut server = Server::start_on(&db, &[]);
    let ids = deposit_to_each(&server, 1, CARDS).await;
    assert_eq!(ids.len(), CARDS as usize);
    assert!(server.terminate().success());
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (checkpoint, last) = checkpoint_and_last_id(&conn);
    assert_eq!(
        checkpoint, last,
        "a clean stop moves the checkpoint to the last transaction"
    );
    assert_eq!(rows_behind(&conn), 0, "and leaves every row current");
    for n in [1, CARDS / 2, CARDS] {
        let (card, opening) = seeded_card(n);
        let row: i64 = conn
            .query_row(
                "SELECT balance FROM ledger_accounts WHERE name = ?1",
                [&card],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(row, opening + 1);
    }
    drop(conn);
    let server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    assert_eq!(
        client.balance(&seeded_card(CARDS).0).await,
        seeded_card(CARDS).1 + 1
    );
    server.verify();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_writes_balances_back_without_being_stopped() {
    let server = Server::start(&[]);
    deposit_to_each(&server, 1, CARDS).await;
    // The first round is due at once after a start; later ones after a short quiet period.
    let conn = server.sqlite();
    let deadline = Deadline::new(Duration::from_secs(60), "the write-back to catch up");
    loop {
        let (checkpoint, last) = checkpoint_and_last_id(&conn);
        if checkpoint == last && rows_behind(&conn) == 0 {
            break;
        }
        deadline.tick().await;
    }
    server.verify();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_the_middle_of_write_back_rounds_loses_nothing() {
    const CYCLES: u64 = 8;
    let seed = common::test_seed("write-back crash test", "TALLYD_WRITEBACK_SEED");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    // (id, card, amount) of every acknowledged deposit.
    let mut acknowledged: Vec<(i64, String, i64)> = Vec::new();
    let (mut cut_behind, mut cut_mid_round) = (0, 0);
    for cycle in 0..CYCLES {
        let mut server = Server::start_on(&db, &[]);
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let (addr, count, mut rng) = (server.addr, Arc::clone(&count), rng.split());
            tasks.push(tokio::spawn(async move {
                let mut seen = Vec::new();
                let Ok(mut client) = Client::try_connect(addr).await else {
                    return seen;
                };
                // Bounded: the kill normally comes long before.
                for _ in 0..5_000 {
                    let card = seeded_card(1 + rng.below(u64::from(CARDS)) as u32).0;
                    let amount = 1 + rng.below(1_000) as i64;
                    let request = client.transaction_request(&card, amount);
                    match client.try_request(request).await {
                        Ok(reply) if reply.status == StatusCode::OK => {
                            seen.push((reply.i64("id"), card, amount));
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(reply) => panic!("a deposit was refused: {}", reply.text),
                        Err(_) => break,
                    }
                }
                seen
            }));
        }
        // Kill after a random number of acknowledgements: early in a cycle the round that writes
        // back the previous cycle's accounts is under way, later commits run ahead of the rows.
        let kill_after = if rng.below(3) == 0 {
            1 + rng.below(30)
        } else {
            50 + rng.below(6_000)
        };
        let deadline = Deadline::new(Duration::from_secs(60), "acknowledged deposits");
        while count.load(Ordering::Relaxed) < kill_after {
            deadline.tick().await;
        }
        server.kill();
        for task in tasks {
            acknowledged.extend(task.await.unwrap());
        }
        // Where the kill cut: rows behind the journal, and rows a round wrote past the checkpoint
        // before its last chunk (a round cut in the middle).
        let conn = rusqlite::Connection::open(&db).unwrap();
        let (checkpoint, _) = checkpoint_and_last_id(&conn);
        let ahead: i64 = conn
            .query_row(
                "SELECT count(*) FROM ledger_accounts WHERE last_transaction_id > ?1",
                [checkpoint],
                |r| r.get(0),
            )
            .unwrap();
        let behind = rows_behind(&conn);
        cut_behind += u64::from(behind > 0);
        cut_mid_round += u64::from(behind > 0 && ahead > 0);
        eprintln!("cycle {cycle}: killed after {kill_after} acknowledgements; {behind} rows behind, {ahead} past the checkpoint");
    }
    assert!(
        cut_behind > 0,
        "no kill left rows behind the journal: the test cut nothing"
    );
    eprintln!("{cut_behind} kills left rows behind, {cut_mid_round} of them in the middle of a round");
    let server = Server::start_on(&db, &[]);
    let conn = server.sqlite();
    let mut expected: HashMap<String, i64> = HashMap::new();
    for (id, card, amount) in &acknowledged {
        let stored: (String, i64) = conn
            .query_row(
                "SELECT destination, amount FROM transactions WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap_or_else(|e| panic!("acknowledged id {id} is missing (seed {seed}): {e}"));
        assert_eq!(stored, (card.clone(), *amount), "seed {seed}");
        *expected.entry(card.clone()).or_default() += amount;
    }
    // Balances served after the last replay are the journal's, checked independently of the rows.
    let from_legs = common::db_balances(&conn);
    let mut client = server.client().await;
    for (card, _) in expected.iter().take(200) {
        assert_eq!(client.balance(card).await, from_legs[card], "seed {seed}");
    }
    eprintln!(
        "write-back crash test: {} acknowledged deposits over {CYCLES} kills; {}",
        acknowledged.len(),
        server.verify().lines().last().unwrap_or("")
    );
}
