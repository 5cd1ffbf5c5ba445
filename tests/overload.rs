//! Overload, end to end: offered load far above what one worker behind a queue of eight can
//! commit, from a few hundred keep-alive connections. The surplus must be refused at once with
//! `503 queue_full` and `Retry-After`, the read-only routes must keep answering, resident memory
//! must stay bounded, every `200` must be in the journal and nothing else, and the server must
//! recover by itself when the load stops.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{seeded_card, Client, Deadline, LedgerDb, Server, DEMO_CARD};
use hyper::StatusCode;

const CONNECTIONS: usize = 256;
const PER_CONNECTION: usize = 60;
const QUEUE_DEPTH: &str = "8";
/// A bound on how long any one request or probe may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(60);
/// A generous ceiling on resident memory: a few hundred connections and a queue of eight need a
/// small fraction of it; growth with the offered load would blow through it.
const PEAK_RSS_LIMIT_KIB: u64 = 256 * 1024;

/// Resident memory of a process: (VmRSS, VmHWM) in KiB, from `/proc/<pid>/status`.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// What one loaded connection saw.
#[derive(Default)]
struct Tally {
    /// (journal id, card, amount) of every 200.
    committed: Vec<(i64, String, i64)>,
    queue_full: u64,
    /// The slowest 503: a refusal must not wait for a commit.
    slowest_refusal: Duration,
}

/// One connection sending `PER_CONNECTION` deposits back to back, spread over the seeded cards.
async fn load(server_addr: std::net::SocketAddr, index: usize) -> Tally {
    let mut client = Client::connect(server_addr).await;
    let mut tally = Tally::default();
    for i in 0..PER_CONNECTION {
        let (card, _) = seeded_card(((index * PER_CONNECTION + i) % 1000) as u32 + 1);
        let amount = 1 + (i % 5) as i64;
        let started = Instant::now();
        let reply = tokio::time::timeout(HANG, client.transaction(&card, amount))
            .await
            .expect("a transaction answered within the hang bound");
        match reply.status {
            StatusCode::OK => {
                let id = reply.json()["id"].as_i64().expect("an id");
                tally.committed.push((id, card, amount));
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.error_code(), "queue_full", "{}", reply.text);
                assert_eq!(reply.headers["retry-after"], "1");
                tally.queue_full += 1;
                tally.slowest_refusal = tally.slowest_refusal.max(started.elapsed());
            }
            other => panic!("unexpected {other} under overload: {}", reply.text),
        }
    }
    tally
}

/// What the probe saw while the load ran.
#[derive(Default)]
struct Probes {
    rounds: u64,
    slowest: Duration,
    peak_rss_kib: u64,
}

/// Asks for `/healthz`, `/balance` and `/metrics` over and over on one connection until the load
/// is over (at most `max_rounds`), asserting 200 each time and sampling resident memory.
async fn probe(server_addr: std::net::SocketAddr, pid: u32, done: Arc<AtomicBool>) -> Probes {
    const MAX_ROUNDS: u64 = 100_000;
    let mut client = Client::connect(server_addr).await;
    let mut probes = Probes::default();
    let balance_path = format!("/balance?card_number={DEMO_CARD}");
    while !done.load(Ordering::Relaxed) && probes.rounds < MAX_ROUNDS {
        for path in ["/healthz", balance_path.as_str(), "/metrics"] {
            let started = Instant::now();
            let reply = tokio::time::timeout(HANG, client.get(path))
                .await
                .unwrap_or_else(|_| panic!("{path} hung under overload"));
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{path} under overload: {}",
                reply.text
            );
            probes.slowest = probes.slowest.max(started.elapsed());
        }
        probes.peak_rss_kib = probes.peak_rss_kib.max(memory_kib(pid).0);
        probes.rounds += 1;
    }
    probes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_and_the_server_recovers_by_itself() {
    let server = Server::start(&["--workers", "1", "--queue-depth", QUEUE_DEPTH]);
    let pid = server.pid();
    let (rss_before, _) = memory_kib(pid);

    let done = Arc::new(AtomicBool::new(false));
    let prober = tokio::spawn(probe(server.addr, pid, Arc::clone(&done)));
    let started = Instant::now();
    let loaders: Vec<_> = (0..CONNECTIONS)
        .map(|index| tokio::spawn(load(server.addr, index)))
        .collect();
    let mut committed = Vec::new();
    let mut queue_full = 0;
    let mut slowest_refusal = Duration::ZERO;
    for loader in loaders {
        let tally = loader.await.expect("a loading connection");
        committed.extend(tally.committed);
        queue_full += tally.queue_full;
        slowest_refusal = slowest_refusal.max(tally.slowest_refusal);
    }
    let took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let probes = prober.await.expect("the probe");
    let (rss_after_load, hwm) = memory_kib(pid);

    let sent = (CONNECTIONS * PER_CONNECTION) as u64;
    let ok = committed.len() as u64;
    eprintln!(
        "overload: {sent} transactions from {CONNECTIONS} connections in {took:.1?}: {ok} committed (200), \
         {queue_full} refused (503 queue_full), slowest refusal {slowest_refusal:.1?}"
    );
    eprintln!(
        "overload: {} probe rounds of /healthz, /balance, /metrics, all 200, slowest {:.1?}",
        probes.rounds, probes.slowest
    );
    assert_eq!(
        ok + queue_full,
        sent,
        "every request was either committed or refused"
    );
    assert!(queue_full > 0, "the load must overflow the queue");
    assert!(ok > 0, "the worker must keep committing under overload");
    assert!(probes.rounds > 0, "the probe ran during the load");

    // Recovery, with nobody stepping in: ready again, and a new transaction commits.
    let mut client = server.client().await;
    let deadline = Deadline::new(HANG, "/readyz to say ready again");
    while client.get("/readyz").await.status != StatusCode::OK {
        deadline.tick().await;
    }
    let reply = client.transaction(DEMO_CARD, 1).await;
    assert_eq!(reply.status, StatusCode::OK, "after the load: {}", reply.text);
    let (rss_after, _) = memory_kib(pid);
    // The kernel updates VmHWM lazily, so the peak is the larger of it and the sampled VmRSS.
    let peak = hwm.max(probes.peak_rss_kib);
    eprintln!(
        "overload: resident memory before {:.1} MiB, peak {:.1} MiB (VmHWM {:.1}, largest sampled VmRSS {:.1}), \
         after the load {:.1} MiB, after recovery {:.1} MiB",
        mib(rss_before),
        mib(peak),
        mib(hwm),
        mib(probes.peak_rss_kib),
        mib(rss_after_load),
        mib(rss_after)
    );
    assert!(
        peak < PEAK_RSS_LIMIT_KIB,
        "peak resident memory {:.1} MiB is over {} MiB",
        mib(peak),
        PEAK_RSS_LIMIT_KIB / 1024
    );

    // The books: exactly the 200s are journaled, each as acknowledged, and the counters agree.
    let stats = client.get("/stats").await.json();
    assert_eq!(stats["transactions"]["queue_full"], queue_full);
    assert_eq!(stats["transactions"]["committed"], ok + 1);
    let db = server.sqlite();
    let rows: HashMap<i64, (String, i64)> = db
        .texts("SELECT id, card_number, amount FROM journal")
        .into_iter()
        .map(|row| (row[0].parse().unwrap(), (row[1].clone(), row[2].parse().unwrap())))
        .collect();
    assert_eq!(
        rows.len() as u64,
        ok + 1,
        "journal rows == 200s (and the one after)"
    );
    for (id, card, amount) in &committed {
        assert_eq!(rows.get(id), Some(&(card.clone(), *amount)), "journal row {id}");
    }
    server.verify();
}
