//! PostgreSQL itself crashes under load: `pg_ctl stop -m immediate` while keyed clients send
//! transfers, and a start again a moment later. Meanwhile tallyd must answer 503 (never a 200 it
//! cannot keep, never a dropped connection), and it must recover by itself once the database is
//! back: the same process then serves every request to the end. Each client retries with the same
//! key until it is answered, so in the end every key moved money exactly once, under the id its
//! client was answered.
//!
//! A binary of its own, because it stops the one cluster every suite runs on: cargo runs test
//! binaries one after another, so no other test sees the cluster down. It needs the cluster of
//! scripts/ci-postgres.sh (`TALLYD_TEST_DB`, `PG_BIN`, `PG_WORK`, `PG_PORT`); without it, skipped.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::postgres::{assert_every_key_once, assert_ledger_consistent, database_for, Cluster};
use common::{seeded_card, transfer_body, Client, Deadline, Server};

const CLIENTS: usize = 8;
const REQUESTS: usize = 60;
const CARDS: u32 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_crashing_under_load_costs_503s_only_and_tallyd_recovers_by_itself() {
    let (Some(url), Some(cluster)) = (database_for(Path::new("pg-restart")), Cluster::from_env()) else {
        eprintln!("skipped: needs the cluster of scripts/ci-postgres.sh");
        return;
    };
    // A checkpoint first, so that the recovery after the crash replays this test's WAL only, not
    // that of every suite before it on the shared cluster (a minute and more on a loaded machine).
    common::postgres::execute(&url, "CHECKPOINT");
    let server = Server::start_with(Path::new(&url), "127.0.0.1:0", &["--workers", "2"], "info");
    let acks = Arc::new(AtomicU64::new(0));
    let unavailable = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client_index in 0..CLIENTS {
        let (addr, acks, unavailable) = (server.addr, Arc::clone(&acks), Arc::clone(&unavailable));
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            let mut answered = Vec::new();
            for n in 0..REQUESTS {
                let source = seeded_card(1 + (client_index as u32 + n as u32) % CARDS).0;
                let destination = seeded_card(1 + (client_index as u32 + n as u32 + 1) % CARDS).0;
                let key = format!("restart-{client_index}-{n}");
                let body = transfer_body(&source, &destination, 1 + n as i64);
                let deadline = Deadline::new(Duration::from_secs(120), "an answer after the restart");
                let id = loop {
                    let request = client.post_request("/transfers", &body, &[("idempotency-key", &key)]);
                    let reply = client
                        .try_request(request)
                        .await
                        .unwrap_or_else(|error| panic!("{key}: tallyd dropped the connection: {error}"));
                    match reply.status.as_u16() {
                        200 => break reply.i64("id"),
                        // storage_unavailable or outcome_unknown: retry with the same key.
                        503 => {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                        }
                        other => panic!("{key}: {other} {}", reply.text),
                    }
                    deadline.tick().await;
                };
                acks.fetch_add(1, Ordering::Relaxed);
                answered.push((key, id));
            }
            answered
        }));
    }
    let deadline = Deadline::new(Duration::from_secs(60), "acknowledgements before the crash");
    while acks.load(Ordering::Relaxed) < 100 {
        deadline.tick().await;
    }
    let stopper = cluster_in_thread(cluster, |cluster| cluster.stop_immediately()).await;
    let acked_at_crash = acks.load(Ordering::Relaxed);
    // Down until tallyd has refused a few requests for it.
    let deadline = Deadline::new(Duration::from_secs(60), "503s while PostgreSQL is down");
    while unavailable.load(Ordering::Relaxed) < CLIENTS as u64 {
        deadline.tick().await;
    }
    let acked_while_down = acks.load(Ordering::Relaxed) - acked_at_crash;
    let refused_while_down = unavailable.load(Ordering::Relaxed);
    cluster_in_thread(stopper, |cluster| cluster.start()).await;

    let mut answered: BTreeMap<String, i64> = BTreeMap::new();
    for task in tasks {
        answered.extend(task.await.unwrap());
    }
    assert_every_key_once(&url, &answered);
    assert_ledger_consistent(&url);
    common::verify(Path::new(&url));
    eprintln!(
        "PostgreSQL stopped -m immediate after {acked_at_crash} acknowledgements ({acked_while_down} more \
         answered as it went down, {refused_while_down} 503s before it was started again), then every one \
         of {} keyed transfers answered by the same tallyd, each executed once",
        answered.len()
    );
}

/// Runs a blocking pg_ctl step off the runtime and gives the cluster back.
async fn cluster_in_thread(cluster: Cluster, step: fn(&Cluster)) -> Cluster {
    tokio::task::spawn_blocking(move || {
        step(&cluster);
        cluster
    })
    .await
    .unwrap()
}
