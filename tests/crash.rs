//! Crash safety: tallyd is killed with SIGKILL at random moments under concurrent load, restarted
//! on the same database, and killed again. Guards against acknowledging before the commit, a
//! balance updated without its journal row (or the reverse), and a half-applied batch after
//! recovery.
//!
//! Every request carries a unique signed amount (derived from its sequence number), so each journal row can be
//! traced back to the one request that made it. After the last restart:
//! * every acknowledged transaction is in the journal, with its id, card and amount (lost: 0);
//! * no transaction that was answered with an error is in the journal;
//! * transactions in flight at a kill are in the journal once or not at all;
//! * `tallyd verify` passes: each balance is its opening balance plus its journal, none negative.
//!
//! SIGKILL leaves the page cache intact, so this proves the ordering (answer after commit), not
//! the fsync; the power-loss suite (`scripts/ci-powerloss.sh`) proves the fsync.
//! `TALLYD_CRASH_CYCLES` and `TALLYD_CRASH_SEED` make longer or repeated runs.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{seeded_card, Client, Deadline, LedgerDb, Server};
use hyper::StatusCode;

const CYCLES_DEFAULT: u64 = 20;
const CLIENTS: usize = 32;
const CARDS: u32 = 300;
/// Requests one client sends at most in one cycle (the kill normally comes much sooner).
const REQUESTS_PER_CLIENT_MAX: u64 = 400;

/// What became of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    Acknowledged {
        id: i64,
    },
    Refused {
        status: u16,
    },
    /// The connection broke: the server died with it in flight.
    Unknown,
}

#[derive(Debug, Clone)]
struct Sent {
    card: String,
    amount: i64,
    fate: Fate,
}

/// xorshift64*: a tiny deterministic generator, seeded and printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// One client's loop: unique amounts, stopping at the first broken connection.
async fn client_loop(
    server: std::net::SocketAddr,
    sequence: Arc<AtomicI64>,
    acknowledged: Arc<AtomicU64>,
    mut rng: Rng,
) -> Vec<Sent> {
    let mut sent = Vec::new();
    let Ok(mut client) = Client::try_connect(server).await else {
        return sent;
    };
    for _ in 0..REQUESTS_PER_CLIENT_MAX {
        let n = sequence.fetch_add(1, Ordering::Relaxed);
        let card = seeded_card(1 + rng.below(u64::from(CARDS)) as u32).0;
        // Withdrawals larger than deposits, so balances drain and refusals happen. Deposits are +n and
        // withdrawals -20n: every signed amount is unique.
        let amount = if rng.below(2) == 0 { n } else { -20 * n };
        let request = client.transaction_request(&card, amount);
        let fate = match client.try_request(request).await {
            Ok(reply) if reply.status == StatusCode::OK => {
                let body = reply.json();
                assert_eq!(body["amount"], amount, "the answer is for this request");
                acknowledged.fetch_add(1, Ordering::Relaxed);
                Fate::Acknowledged {
                    id: body["id"].as_i64().unwrap(),
                }
            }
            Ok(reply) => {
                reply.error_code(); // every refusal is a JSON error
                Fate::Refused {
                    status: reply.status.as_u16(),
                }
            }
            Err(_) => Fate::Unknown,
        };
        let stop = fate == Fate::Unknown;
        sent.push(Sent { card, amount, fate });
        if stop {
            break;
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_never_loses_an_acknowledged_transaction() {
    let cycles = env_u64("TALLYD_CRASH_CYCLES").unwrap_or(CYCLES_DEFAULT);
    let seed = env_u64("TALLYD_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    eprintln!("crash test: {cycles} cycles, seed {seed} (TALLYD_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let sequence = Arc::new(AtomicI64::new(1));
    let mut all: Vec<Sent> = Vec::new();

    for cycle in 0..cycles {
        let mut server = Server::start_on(&db, &[]);
        let acknowledged = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let task_rng = Rng(rng.next() | 1);
                tokio::spawn(client_loop(
                    server.addr,
                    Arc::clone(&sequence),
                    Arc::clone(&acknowledged),
                    task_rng,
                ))
            })
            .collect();
        // Kill after a random number of acknowledgements, so the kill lands at a random point of
        // the commit cycle while 32 connections have requests in flight.
        let kill_after = 20 + rng.below(600);
        let deadline = Deadline::new(Duration::from_secs(60), "acknowledgements before the kill");
        while acknowledged.load(Ordering::Relaxed) < kill_after {
            deadline.tick().await;
        }
        server.kill();
        for client in clients {
            all.extend(client.await.unwrap());
        }
        eprintln!(
            "cycle {cycle}: killed after {} acknowledgements",
            acknowledged.load(Ordering::Relaxed)
        );
    }

    let server = Server::start_on(&db, &[]);
    let journal: Vec<(i64, String, i64)> = server
        .sqlite()
        .texts("SELECT id, card_number, amount FROM journal")
        .into_iter()
        .map(|row| (row[0].parse().unwrap(), row[1].clone(), row[2].parse().unwrap()))
        .collect();

    let by_amount: HashMap<i64, &Sent> = all.iter().map(|s| (s.amount, s)).collect();
    assert_eq!(by_amount.len(), all.len(), "amounts are unique");
    let mut in_journal: HashMap<i64, i64> = HashMap::new(); // amount -> journal id
    let mut landed_in_flight = 0;
    for (id, card, amount) in &journal {
        let sent = by_amount
            .get(amount)
            .unwrap_or_else(|| panic!("journal row {id} matches no request"));
        assert_eq!(&sent.card, card, "journal row {id} has the request's card");
        assert!(
            in_journal.insert(*amount, *id).is_none(),
            "request {amount} is in the journal twice"
        );
        match sent.fate {
            Fate::Acknowledged { id: acked } => {
                assert_eq!(acked, *id, "the acknowledged id is the journal's")
            }
            Fate::Refused { status } => {
                panic!("request {amount} was answered {status} but is in the journal")
            }
            Fate::Unknown => landed_in_flight += 1,
        }
    }
    let acknowledged: Vec<&Sent> = all
        .iter()
        .filter(|s| matches!(s.fate, Fate::Acknowledged { .. }))
        .collect();
    let lost = acknowledged
        .iter()
        .filter(|s| !in_journal.contains_key(&s.amount))
        .count();
    let refused = all
        .iter()
        .filter(|s| matches!(s.fate, Fate::Refused { .. }))
        .count();
    let in_flight = all.iter().filter(|s| s.fate == Fate::Unknown).count();
    eprintln!(
        "crash: {cycles} kill/restart cycles, {} requests: {} acknowledged, {lost} lost, {refused} refused, \
         {in_flight} in flight at a kill ({landed_in_flight} of them committed)",
        all.len(),
        acknowledged.len()
    );
    assert_eq!(lost, 0, "acknowledged transactions were lost");
    assert!(
        acknowledged.len() as u64 >= cycles * 20,
        "the load acknowledged too little to prove anything"
    );
    assert!(refused > 0, "withdrawals should sometimes be refused");
    eprintln!("{}", server.verify());

    // The restarted server agrees with the database it recovered.
    let mut client = server.client().await;
    let db = server.sqlite();
    for n in [1, CARDS / 2, CARDS] {
        let card = seeded_card(n).0;
        // A card number is digits only, so it may be written into the SQL.
        let stored = db.integer(&format!(
            "SELECT balance FROM accounts WHERE card_number = '{card}'"
        ));
        assert_eq!(client.balance(&card).await, stored);
    }
}
