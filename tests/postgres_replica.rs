//! `--read-db`: the read routes on a streaming replica, and what a reader may see there. A hot
//! standby of the CI cluster (`pg_basebackup -R`) serves `/balance` and the transaction lookups
//! while every batch commits on the primary. With the standby's replay paused, a deposit answered
//! 200 is on the primary and not yet visible through the replica (the lag the README describes);
//! once replay resumes, the replica catches up by itself.
//!
//! A binary of its own: it makes a replica of the whole cluster, which no other suite should be
//! copying databases into at that moment. It needs the cluster of scripts/ci-postgres.sh
//! (`TALLYD_TEST_DB`, `PG_BIN`, `PG_WORK`, `PG_PORT`); without it, skipped.

mod common;

use std::path::Path;
use std::time::Duration;

use common::postgres::{assert_ledger_consistent, database_for, execute, query, Cluster};
use common::{seeded_card, Client, Deadline, Server};

/// The balance `/balance` answers for `card` (from the replica).
async fn balance(client: &mut Client, card: &str) -> Option<i64> {
    let reply = client.get(&format!("/balance?card_number={card}")).await;
    (reply.status.as_u16() == 200).then(|| reply.i64("balance"))
}

/// Polls `/balance` until it says `expected`.
async fn wait_for_balance(client: &mut Client, card: &str, expected: i64, what: &'static str) {
    let deadline = Deadline::new(Duration::from_secs(60), what);
    while balance(client, card).await != Some(expected) {
        deadline.tick().await;
    }
}

fn one(url: &str, sql: &str) -> String {
    query(url, sql)[0][0].clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_from_a_replica_lag_while_its_replay_is_paused_and_catch_up_by_themselves() {
    let (Some(url), Some(cluster)) = (database_for(Path::new("pg-replica")), Cluster::from_env()) else {
        eprintln!("skipped: needs the cluster of scripts/ci-postgres.sh");
        return;
    };
    // The database exists on the primary before the base backup, so the standby has it; tallyd
    // migrates and seeds it on the primary, and the standby replays that.
    let replica = cluster.replica("replica-data");
    let read_url = replica.url_for(&url);
    assert_eq!(one(&read_url, "SELECT pg_is_in_recovery()"), "t", "a standby");
    let mut server = Server::start_with(Path::new(&url), "127.0.0.1:0", &["--read-db", &read_url], "info");
    let mut client = server.client().await;
    let (card, opening) = seeded_card(3);
    wait_for_balance(&mut client, &card, opening, "the replica to replay the seed").await;

    let deposit = |amount: i64| format!(r#"{{"card_number":"{card}","amount":{amount}}}"#);
    let first = client.post_json("/transaction", &deposit(500)).await;
    assert_eq!(first.status.as_u16(), 200, "{}", first.text);
    wait_for_balance(
        &mut client,
        &card,
        opening + 500,
        "the replica to replay a deposit",
    )
    .await;
    let active = one(
        &read_url,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
         AND datname = current_database() AND pid <> pg_backend_pid()",
    );
    assert_ne!(active, "0", "tallyd's read pool is connected to the replica");

    // Replay paused: the primary commits, the replica shows the state before.
    execute(&read_url, "SELECT pg_wal_replay_pause()");
    let deadline = Deadline::new(Duration::from_secs(30), "the replica's replay to pause");
    while one(&read_url, "SELECT pg_get_wal_replay_pause_state()") != "paused" {
        deadline.tick().await;
    }
    let second = client.post_json("/transaction", &deposit(700)).await;
    assert_eq!(second.status.as_u16(), 200, "{}", second.text);
    assert_eq!(
        second.i64("balance"),
        opening + 1200,
        "the answer is the primary's"
    );
    let on_primary = one(
        &url,
        &format!("SELECT balance FROM ledger_accounts WHERE name = '{card}'"),
    );
    assert_eq!(
        on_primary,
        (opening + 1200).to_string(),
        "committed on the primary"
    );
    assert_eq!(
        balance(&mut client, &card).await,
        Some(opening + 500),
        "a read through the paused replica sees the state before the deposit"
    );
    let lookup = client.get(&format!("/transactions/{}", second.i64("id"))).await;
    assert_eq!(
        lookup.status.as_u16(),
        404,
        "the replica has not replayed the transaction yet: {}",
        lookup.text
    );

    execute(&read_url, "SELECT pg_wal_replay_resume()");
    wait_for_balance(&mut client, &card, opening + 1200, "the replica to catch up").await;
    let lookup = client.get(&format!("/transactions/{}", second.i64("id"))).await;
    assert_eq!(lookup.status.as_u16(), 200, "{}", lookup.text);
    drop(client);
    assert!(server.terminate().success(), "a clean stop");
    assert_ledger_consistent(&url);
}
