//! `tallyd archive`: old history leaves the live database for an archive file, every balance
//! stays what it was, `verify` still holds, and the server goes on from the cut.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{seeded_card, Server, DEMO_CARD};
use hyper::StatusCode;

fn archive(db: &Path, before_id: i64, to: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["archive", "--db"])
        .arg(db)
        .args(["--before-id", &before_id.to_string(), "--to"])
        .arg(to)
        .output()
        .expect("running tallyd archive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archiving_keeps_every_balance_and_verify_and_the_server_goes_on_from_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let old = dir.path().join("archive-1.db");
    let cards: Vec<String> = (1..=5).map(|n| seeded_card(n).0).collect();
    let mut server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    // A keyed request before the cut: its record goes with its transaction.
    let keyed = client
        .post_keyed(
            "/transfers",
            &common::transfer_body(&cards[0], &cards[1], 1),
            "before-cut",
        )
        .await;
    assert_eq!(keyed.status, StatusCode::OK);
    let mut ids = vec![keyed.i64("id")];
    for i in 0..200_usize {
        let (a, b) = (&cards[i % 5], &cards[(i + 2) % 5]);
        let reply = if i % 3 == 0 {
            client.transaction(a, 7 + i as i64).await
        } else {
            client.transfer(a, b, 3 + i as i64).await
        };
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        ids.push(reply.i64("id"));
    }
    let cut = ids[120];
    let mut balances = Vec::new();
    for card in cards.iter().chain([&DEMO_CARD.to_owned()]) {
        balances.push(client.balance(card).await);
    }
    let world_before = common::db_balances(&server.sqlite())["@world"];

    // Not while serve holds the database.
    let refused = archive(&db, cut, &old);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("in use by another tallyd"));
    assert!(!old.exists());
    assert!(server.terminate().success());

    let done = archive(&db, cut, &old);
    let said = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        said.contains(&format!("archived {} transactions", cut - 1)),
        "{said}"
    );
    assert!(
        said.contains("checks hold"),
        "verify ran after the archive: {said}"
    );
    eprintln!("archive: {}", said.lines().next().unwrap_or(""));
    let archived = rusqlite::Connection::open(&old).unwrap();
    let (count, max): (i64, i64) = archived
        .query_row("SELECT count(*), max(id) FROM transactions", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((count, max), (cut - 1, cut - 1));

    // Again below the cut: refused, nothing changed.
    let again = archive(&db, cut - 1, &dir.path().join("archive-2.db"));
    assert!(!again.status.success());

    let server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    for (card, balance) in cards.iter().chain([&DEMO_CARD.to_owned()]).zip(&balances) {
        assert_eq!(client.balance(card).await, *balance, "{card}");
    }
    assert_eq!(common::db_balances(&server.sqlite())["@world"], world_before);
    let (opening, current) = common::db_totals(&server.sqlite());
    assert_eq!(opening, current, "money is neither made nor lost by an archive");
    assert_eq!(
        client.get(&format!("/transactions/{}", cut - 1)).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(client.get(&format!("/transactions/{cut}")).await.i64("id"), cut);
    let by_key = client.get("/transactions?idempotency_key=before-cut").await;
    assert_eq!(
        by_key.status,
        StatusCode::NOT_FOUND,
        "its record was archived with it"
    );
    let entries = client
        .get(&format!("/accounts/{}/entries?limit=100", cards[0]))
        .await
        .json();
    let entry_ids: Vec<i64> = entries["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert!(
        !entry_ids.is_empty() && entry_ids.iter().all(|id| *id >= cut),
        "{entry_ids:?}"
    );
    // The server goes on: new transactions chain onto the remaining history.
    let next = client.transfer(&cards[0], &cards[1], 5).await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.text);
    assert_eq!(client.balance(&cards[0]).await, balances[0] - 5);
    server.verify();
}
