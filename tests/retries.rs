//! Crash with retries: clients send keyed transfers (and keyed deposits), tallyd is SIGKILLed
//! mid-flight 10 times, and after each restart every client resends, with the same key and body,
//! every request whose answer it did not see. At the end every intended request took effect
//! exactly once: each key produced exactly one transaction, under the id its client was answered,
//! and every balance is its opening balance plus all the intended movements.
//!
//! Each client also resends its last answered request after every restart and must get the same
//! bytes back, marked as a replay. `TALLYD_RETRIES_SEED` replays a run, `TALLYD_RETRIES_CYCLES`
//! makes a longer one.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    db_balances, db_totals, db_transactions, seeded_card, test_seed, transfer_body, Client, Deadline,
    LedgerDb, Rng, Server,
};

const CYCLES_DEFAULT: u64 = 10;
const CLIENTS: usize = 48;
const CARDS: u32 = 20;
/// Requests each client intends to make. The kills come after 50 to 300 acknowledgements, so
/// most of the work is left for the run after the last kill, and every kill lands mid-flight.
const INTENTS_PER_CLIENT: usize = 200;
/// Amounts are at most this, so no card can be drained (200 × 48 × 10 < the smallest opening
/// balance): every intended transfer must succeed, exactly once.
const AMOUNT_MAX: u64 = 10;

const WORLD: &str = "@world";

/// One request a client means to make, exactly once.
#[derive(Debug, Clone)]
struct Intent {
    path: &'static str,
    body: String,
    key: String,
    /// The legs it moves: (account, signed amount).
    legs: Vec<(String, i64)>,
}

#[derive(Debug, Default)]
struct ClientState {
    intents: Vec<Intent>,
    /// Intents not sent yet start here.
    next: usize,
    /// Sent, answer not seen (in flight at a kill, or a 503): resend with the same key.
    unanswered: Vec<usize>,
    /// The id and bytes of each answer seen.
    answered: BTreeMap<usize, (i64, Bytes)>,
    last_answered: Option<usize>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    acknowledged: u64,
    /// Connections broken with a request in flight.
    in_flight_at_kill: u64,
    /// Resent requests answered with a replay: the first attempt had committed.
    landed_before_kill: u64,
    /// Resent requests that executed now: the first attempt had not committed.
    executed_on_retry: u64,
    /// Answers re-requested after a restart and replayed byte for byte.
    replays_checked: u64,
    unavailable: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.acknowledged += other.acknowledged;
        self.in_flight_at_kill += other.in_flight_at_kill;
        self.landed_before_kill += other.landed_before_kill;
        self.executed_on_retry += other.executed_on_retry;
        self.replays_checked += other.replays_checked;
        self.unavailable += other.unavailable;
    }
}

fn intents(client: usize, rng: &mut Rng, cards: &[String]) -> Vec<Intent> {
    (0..INTENTS_PER_CLIENT)
        .map(|n| {
            let key = format!("client-{client}-request-{n}");
            let amount = 1 + rng.below(AMOUNT_MAX) as i64;
            let card = |rng: &mut Rng| cards[rng.below(cards.len() as u64) as usize].clone();
            if rng.below(5) == 0 {
                let target = card(rng);
                Intent {
                    path: "/transaction",
                    body: format!(r#"{{"card_number":"{target}","amount":{amount}}}"#),
                    key,
                    legs: vec![(WORLD.to_owned(), -amount), (target, amount)],
                }
            } else {
                let source = card(rng);
                let mut destination = card(rng);
                while destination == source {
                    destination = card(rng);
                }
                Intent {
                    path: "/transfers",
                    body: transfer_body(&source, &destination, amount),
                    key,
                    legs: vec![(source, -amount), (destination, amount)],
                }
            }
        })
        .collect()
}

/// One client's run against one server lifetime: replay-check its last answer, resend what it has
/// not seen answered, then go on with new requests, until the connection breaks or all is done.
async fn run_client(
    addr: std::net::SocketAddr,
    mut state: ClientState,
    acks: Arc<AtomicU64>,
) -> (ClientState, Counts) {
    let mut counts = Counts::default();
    let Ok(mut client) = Client::try_connect(addr).await else {
        return (state, counts);
    };
    if let Some(i) = state.last_answered {
        let intent = &state.intents[i];
        let request = client.post_request(intent.path, &intent.body, &[("idempotency-key", &intent.key)]);
        match client.try_request(request).await {
            Ok(reply) => {
                assert_eq!(reply.status.as_u16(), 200, "{}: {}", intent.key, reply.text);
                assert!(
                    reply.replayed(),
                    "{}: an answered request executed again",
                    intent.key
                );
                assert_eq!(
                    reply.body, state.answered[&i].1,
                    "{}: the replay differs",
                    intent.key
                );
                counts.replays_checked += 1;
            }
            Err(_) => return (state, counts),
        }
    }
    loop {
        let (i, retry) = match state.unanswered.first() {
            Some(&i) => (i, true),
            None if state.next < state.intents.len() => {
                state.next += 1;
                state.unanswered.push(state.next - 1);
                (state.next - 1, false)
            }
            None => return (state, counts),
        };
        let intent = &state.intents[i];
        let request = client.post_request(intent.path, &intent.body, &[("idempotency-key", &intent.key)]);
        match client.try_request(request).await {
            Ok(reply) if reply.status.as_u16() == 200 => {
                let id = reply.i64("id");
                if retry {
                    if reply.replayed() {
                        counts.landed_before_kill += 1;
                    } else {
                        counts.executed_on_retry += 1;
                    }
                } else {
                    assert!(!reply.replayed(), "{}: a new key was replayed", intent.key);
                }
                state.unanswered.remove(0);
                state.answered.insert(i, (id, reply.body));
                state.last_answered = Some(i);
                counts.acknowledged += 1;
                acks.fetch_add(1, Ordering::Relaxed);
            }
            Ok(reply) if reply.status.as_u16() == 503 => {
                // Nothing was decided; the same key may run again. Go on and come back to it.
                counts.unavailable += 1;
                assert!(
                    counts.unavailable < 10_000,
                    "tallyd keeps answering 503: {}",
                    reply.text
                );
                let first = state.unanswered.remove(0);
                state.unanswered.push(first);
            }
            Ok(reply) => panic!("{}: {} {}", intent.key, reply.status, reply.text),
            Err(_) => {
                counts.in_flight_at_kill += 1;
                return (state, counts);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_retries_across_ten_sigkills_take_effect_exactly_once() {
    let cycles = std::env::var("TALLYD_RETRIES_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CYCLES_DEFAULT);
    let seed = test_seed("retries", "TALLYD_RETRIES_SEED");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let cards: Vec<(String, i64)> = (1..=CARDS).map(seeded_card).collect();
    let names: Vec<String> = cards.iter().map(|(card, _)| card.clone()).collect();
    let mut states: Vec<ClientState> = (0..CLIENTS)
        .map(|client| ClientState {
            intents: intents(client, &mut rng, &names),
            ..ClientState::default()
        })
        .collect();
    let mut counts = Counts::default();

    for cycle in 0..=cycles {
        let last = cycle == cycles;
        let mut server = Server::start_on(&db, &[]);
        let acks = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = states
            .drain(..)
            .map(|state| tokio::spawn(run_client(server.addr, state, Arc::clone(&acks))))
            .collect();
        if !last {
            let kill_after = 50 + rng.below(250);
            let deadline = Deadline::new(Duration::from_secs(60), "acknowledgements before the kill");
            while acks.load(Ordering::Relaxed) < kill_after {
                assert!(
                    tasks.iter().any(|t| !t.is_finished()),
                    "every client finished before the kill"
                );
                deadline.tick().await;
            }
            server.kill();
        }
        for task in tasks {
            let (state, client_counts) = task.await.unwrap();
            counts.add(client_counts);
            states.push(state);
        }
        if last {
            for state in &states {
                assert!(state.unanswered.is_empty() && state.next == state.intents.len());
            }
            check_exactly_once(&server, &cards, &states);
        } else {
            eprintln!(
                "retries: cycle {cycle}: killed after {} acknowledgements",
                acks.load(Ordering::Relaxed)
            );
        }
    }
    eprintln!(
        "retries: {cycles} SIGKILLs, {} intended requests from {CLIENTS} clients: {} in flight at a kill, resent with \
         their keys: {} had committed (replayed), {} had not (executed on the retry); {} answers replayed byte for \
         byte after restarts; {} answered 503; each took effect exactly once ({:.1?})",
        CLIENTS * INTENTS_PER_CLIENT,
        counts.in_flight_at_kill,
        counts.landed_before_kill,
        counts.executed_on_retry,
        counts.replays_checked,
        counts.unavailable,
        started.elapsed()
    );
    assert!(
        counts.in_flight_at_kill > 0,
        "no kill landed with a request in flight"
    );
}

fn check_exactly_once(server: &Server, cards: &[(String, i64)], states: &[ClientState]) {
    let db = server.sqlite();
    let by_key: BTreeMap<String, (i64, i64)> = db
        .texts("SELECT idempotency_key, count(*), min(id) FROM transactions GROUP BY idempotency_key")
        .into_iter()
        .map(|row| (row[0].clone(), (row[1].parse().unwrap(), row[2].parse().unwrap())))
        .collect();
    let mut expected: BTreeMap<String, i64> = cards.iter().cloned().collect();
    let mut intended = 0;
    for state in states {
        for (i, intent) in state.intents.iter().enumerate() {
            intended += 1;
            let (count, id) = by_key.get(&intent.key).copied().unwrap_or((0, 0));
            assert_eq!(count, 1, "{} took effect {count} times", intent.key);
            assert_eq!(
                id, state.answered[&i].0,
                "{}: the answered id is the committed one",
                intent.key
            );
            for (account, amount) in &intent.legs {
                *expected.entry(account.clone()).or_default() += amount;
            }
        }
    }
    assert_eq!(by_key.len(), intended, "a transaction without an intended key");
    assert_eq!(db_transactions(&db), intended as i64);
    let balances = db_balances(&db);
    for (account, balance) in &expected {
        assert_eq!(balances[account], *balance, "{account}");
    }
    let (opening, current) = db_totals(&db);
    assert_eq!(opening, current);
    eprintln!("{}", server.verify());
}

/// A supervisor may stop tallyd the moment it says it listens (a restart loop, a deploy rolled
/// back): SIGTERM then must still be the clean shutdown (drain, commit, exit 0), never the
/// default disposition of an uninstalled handler.
#[test]
fn a_sigterm_right_after_listening_is_a_clean_shutdown() {
    const STARTS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let mut unclean = Vec::new();
    for start in 0..STARTS {
        let mut server = Server::start_on(&db, &[]);
        let status = server.terminate();
        if !status.success() {
            unclean.push((start, status));
        }
    }
    assert!(
        unclean.is_empty(),
        "{} of {STARTS} SIGTERMs right after `listening` did not exit cleanly: {unclean:?}",
        unclean.len()
    );
}
