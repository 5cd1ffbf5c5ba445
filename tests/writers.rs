//! One writer per database. Guards against the bug where two `tallyd serve` on one file each
//! decided against their own balances in memory and overwrote each other's commits, losing
//! acknowledged money, and against an outside writer (a `sqlite3` shell) being overwritten the
//! same way.
//!
//! * A second `serve` on a held file exits non-zero before it listens, naming the file and the
//!   holder's pid; with `--lock-wait-ms` it waits and starts only once the first has exited.
//! * SIGKILL releases the lock: a new `serve` starts at once.
//! * 16 clients write through the holder while a second `serve` tries to start in a loop: every
//!   attempt is refused, every acknowledged deposit is in the journal, and `verify` passes.
//! * A write from outside tallyd while it runs is noticed at the next commit and kept: tallyd
//!   re-reads the balances and decides against them.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{Server, DEMO_CARD, DEMO_OPENING};
use hyper::StatusCode;

/// How long a refused `serve` may take to exit.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a second `tallyd serve` on `db` that must refuse to start; returns its stderr.
fn refused_serve(db: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(db)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("running a second tallyd");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "the second serve started:\n{stderr}");
    assert!(
        !stderr.contains("listening addr="),
        "the second serve listened:\n{stderr}"
    );
    stderr
}

#[test]
fn a_second_serve_on_a_held_database_is_refused_naming_the_file_and_the_holder() {
    let first = Server::start(&[]);
    let stderr = refused_serve(&first.db);
    assert!(
        stderr.contains(&format!("pid {}", first.pid())),
        "the holder's pid is named:\n{stderr}"
    );
    assert!(
        stderr.contains(&first.db.display().to_string()),
        "the file is named:\n{stderr}"
    );
    assert!(stderr.contains("--lock-wait-ms"), "{stderr}");
}

#[test]
fn sigkill_releases_the_lock_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let mut first = Server::start_on(&db, &[]);
    first.kill();
    // No --lock-wait-ms: the lock must already be free when the killed process is gone.
    let mut second = Server::start_on(&db, &[]);
    assert!(second.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_serve_starts_only_after_the_holder_exits() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let mut first = Server::start_on(&db, &[]);
    let mut client = first.client().await;
    assert_eq!(client.transaction(DEMO_CARD, 100).await.status, StatusCode::OK);

    let mut second = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--lock-wait-ms",
            "60000",
            "--db",
        ])
        .arg(&db)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting a waiting tallyd");
    let (lines, received) = mpsc::channel::<String>();
    let stderr = second.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let next_line = || received.recv_timeout(REFUSAL_TIMEOUT).expect("a log line");
    let mut line = next_line();
    while !line.contains("waiting for it to exit") {
        assert!(!line.contains("listening addr="), "listened while held: {line}");
        line = next_line();
    }
    // While it waits the first keeps serving, and the waiting one has not listened.
    assert_eq!(client.transaction(DEMO_CARD, 100).await.status, StatusCode::OK);
    assert!(
        received.try_iter().all(|line| !line.contains("listening addr=")),
        "the second listened while the first held the database"
    );
    drop(client);
    assert!(first.terminate().success());
    let mut line = next_line();
    while !line.contains("listening addr=") {
        line = next_line();
    }
    second.kill().unwrap();
    second.wait().unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let balance: i64 = conn
        .query_row(
            "SELECT balance FROM accounts WHERE card_number = ?1",
            [DEMO_CARD],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(balance, DEMO_OPENING + 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_lose_nothing_while_a_second_serve_keeps_trying_to_start() {
    const CLIENTS: i64 = 16;
    const DEPOSITS: i64 = 60;
    let server = Server::start(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let intruder = {
        let (db, stop) = (server.db.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut attempts = 0;
            while !stop.load(Ordering::Relaxed) || attempts == 0 {
                refused_serve(&db);
                attempts += 1;
            }
            attempts
        })
    };
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client_index| {
            let addr = server.addr;
            tokio::spawn(async move {
                let mut client = common::Client::connect(addr).await;
                let mut acknowledged = Vec::new();
                for n in 0..DEPOSITS {
                    // A unique amount per request, so each journal row names its request.
                    let amount = 1 + client_index * DEPOSITS + n;
                    let reply = client.transaction(DEMO_CARD, amount).await;
                    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
                    acknowledged.push((reply.json()["id"].as_i64().unwrap(), amount));
                }
                acknowledged
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for task in tasks {
        acknowledged.extend(task.await.unwrap());
    }
    stop.store(true, Ordering::Relaxed);
    let attempts = intruder.join().unwrap();
    assert!(attempts >= 1);

    let conn = server.sqlite();
    for (id, amount) in &acknowledged {
        let stored: i64 = conn
            .query_row("SELECT amount FROM journal WHERE id = ?1", [id], |row| row.get(0))
            .unwrap_or_else(|e| panic!("acknowledged id {id} is not in the journal: {e}"));
        assert_eq!(stored, *amount);
    }
    let total: i64 = acknowledged.iter().map(|(_, amount)| amount).sum();
    let mut client = server.client().await;
    assert_eq!(client.balance(DEMO_CARD).await, DEMO_OPENING + total);
    server.verify();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_write_while_tallyd_runs_is_noticed_and_kept() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    assert_eq!(client.transaction(DEMO_CARD, 100).await.status, StatusCode::OK);

    // What the README allows an operator: open an account by hand, as a sqlite3 shell would.
    let outside = server.sqlite();
    outside
        .execute(
            "INSERT INTO accounts (card_number, opening_balance, balance) VALUES ('5555000011112222', 700, 700)",
            [],
        )
        .unwrap();
    // Known at once, even to a batch that would otherwise write nothing.
    let reply = client.get("/accounts/5555000011112222").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let reply = client.transaction("5555000011112222", -800).await;
    assert_eq!(reply.error_code(), "insufficient_funds", "{}", reply.text);

    // And an adjustment to an account tallyd holds in memory (every seeded card is loaded at
    // start): without noticing it, tallyd would write its cached balance plus the next deposit
    // and erase the 500.
    let (card, opening) = common::seeded_card(1);
    outside
        .execute(
            "UPDATE ledger_accounts SET opening_balance = opening_balance + 500, balance = balance + 500 \
             WHERE name = ?1",
            [&card],
        )
        .unwrap();
    let reply = client.transaction(&card, 1).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json()["balance"], opening + 500 + 1);
    let reply = client.transaction("5555000011112222", -200).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json()["balance"], 500);
    server.verify();

    // What the schema refuses to anyone: rewriting or deleting history.
    for sql in [
        "UPDATE entries SET amount = amount + 1",
        "DELETE FROM transactions",
        "UPDATE accounts SET balance = 0",
    ] {
        assert!(outside.execute(sql, []).is_err(), "{sql} was allowed");
    }
    server.verify();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_broken_by_hand_ends_a_statement_instead_of_looping() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    for amount in [100, 200, 300] {
        assert_eq!(client.transaction(DEMO_CARD, amount).await.status, StatusCode::OK);
    }
    // An operator who drops the guard and points a leg at its own transaction makes a cycle.
    let outside = server.sqlite();
    outside
        .execute_batch(
            "DROP TRIGGER transactions_are_immutable; \
             UPDATE transactions SET destination_previous_id = id WHERE id = 2;",
        )
        .unwrap();
    let reply = client
        .get(&format!("/accounts/{DEMO_CARD}/entries?limit=100"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    let ids: Vec<i64> = reply.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [3, 2], "the walk stops at the broken link");
    let reply = client
        .get(&format!("/balance?card_number={DEMO_CARD}&at=1"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    // And verify says so.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["verify", "--db"])
        .arg(&server.db)
        .output()
        .unwrap();
    assert!(!output.status.success(), "verify must report the broken chain");
}
