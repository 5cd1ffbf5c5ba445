//! What only the PostgreSQL backend promises, against a real server (`TALLYD_TEST_DB`, set by
//! scripts/ci-postgres.sh; without it every test here is skipped): two instances starting together
//! migrate once; two instances moving money on one database never create or lose any, and never
//! let a balance below its floor (the row locks, in one order, are what guard this); one
//! idempotency key sent to both instances at once is executed once and answered alike.

mod common;
#[path = "common/tls.rs"]
mod tls_support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use common::postgres::{assert_every_key_once, assert_ledger_consistent, database_for, query};
use common::{seeded_card, transfer_body, Rng, Server};

/// The database the suites run on, or `None` (and the test is skipped).
fn database(name: &str) -> Option<String> {
    let url = database_for(Path::new(name));
    if url.is_none() {
        eprintln!("skipped: TALLYD_TEST_DB is not set");
    }
    url
}

/// The warnings and errors a server logged, for a failure's message.
fn errors(server: &Server) -> String {
    server
        .log_text()
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How long a revocation, or a first use's write-back, may take to reach the database and every
/// instance (the reload period is 250 ms; the rest is slack for a loaded CI machine).
const REVOCATION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(3);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn one(url: &str, sql: &str) -> String {
    query(url, sql)[0][0].clone().unwrap_or_default()
}

/// Two servers on one database, started at the same moment.
fn two_servers(url: &str, extra: &[&str]) -> (Server, Server) {
    let path = Path::new(url);
    std::thread::scope(|scope| {
        let first = scope.spawn(|| Server::start_with(path, "127.0.0.1:0", extra, "info"));
        let second = scope.spawn(|| Server::start_with(path, "127.0.0.1:0", extra, "info"));
        (first.join().unwrap(), second.join().unwrap())
    })
}

#[test]
fn two_instances_starting_together_migrate_once_and_seed_once() {
    let Some(url) = database("migrate-once") else {
        return;
    };
    let (_a, _b) = two_servers(&url, &[]);
    // Every migration (0001_ledger.sql, 0002_api_keys.sql, 0003_ledger_archive.sql), each once.
    assert_eq!(one(&url, "SELECT count(*) FROM tallyd_migrations"), "3");
    assert_eq!(
        one(
            &url,
            "SELECT count(*) FROM ledger_accounts WHERE name = '1234567890'"
        ),
        "1"
    );
    assert_eq!(one(&url, "SELECT count(*) FROM ledger_accounts"), "100002");
}

#[test]
fn a_version_1_database_gains_the_later_tables_at_start_and_keeps_its_ledger() {
    let Some(url) = database("upgrade-to-keys") else {
        return;
    };
    // A database as a tallyd of schema version 1 left it: its ledger, one account, no api_keys.
    common::postgres::execute(&url, include_str!("../migrations/postgres/0001_ledger.sql"));
    common::postgres::execute(
        &url,
        "CREATE TABLE tallyd_migrations (version integer NOT NULL PRIMARY KEY, name text NOT NULL, \
         applied_at timestamptz NOT NULL DEFAULT now()); \
         INSERT INTO tallyd_migrations (version, name) VALUES (1, '0001_ledger.sql'); \
         INSERT INTO ledger_accounts (name, opening_balance, balance, created_at_ms) \
         VALUES ('1234567890', 500, 500, 1)",
    );
    let server = Server::start_with(Path::new(&url), "127.0.0.1:0", &[], "info");
    assert_eq!(
        one(
            &url,
            "SELECT string_agg(name, ',' ORDER BY version) FROM tallyd_migrations"
        ),
        "0001_ledger.sql,0002_api_keys.sql,0003_ledger_archive.sql"
    );
    assert_eq!(one(&url, "SELECT count(*) FROM ledger_archive"), "0");
    assert_eq!(one(&url, "SELECT count(*) FROM api_keys"), "0");
    // Not seeded again: the one account it had is the only card.
    assert_eq!(one(&url, "SELECT count(*) FROM ledger_accounts"), "2");
    drop(server);
    common::create_key(Path::new(&url), "after-upgrade", "read", &[]);
    assert_eq!(one(&url, "SELECT count(*) FROM api_keys"), "1");
}

/// The first use of `key` on `addr` (a deposit of 1 to the demo card), answered 200.
async fn use_key(addr: std::net::SocketAddr, key: &str) {
    let mut client = common::Client::connect(addr).await.with_bearer(key);
    let reply = client.transaction(common::DEMO_CARD, 1).await;
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.text);
}

/// Each key's stored last use, by name (`None` while it has none).
fn last_used(url: &str) -> std::collections::BTreeMap<String, Option<i64>> {
    query(url, "SELECT name, last_used_at_ms FROM api_keys")
        .into_iter()
        .map(|row| {
            let at = row[1].as_deref().map(|at| at.parse().unwrap());
            (row[0].clone().unwrap(), at)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_record_use_times_and_a_revoked_key_is_refused_by_both_within_a_deadline() {
    let Some(url) = database("keys-two-instances") else {
        return;
    };
    let db = Path::new(&url);
    // Created before either instance starts (the command migrates and seeds the new database).
    let shared = common::create_key(db, "shared", "write", &[]);
    let only_a = common::create_key(db, "only-a", "write", &[]);
    let only_b = common::create_key(db, "only-b", "write", &[]);
    let future = common::create_key(db, "future", "write", &[]);
    let probe = common::create_key(db, "probe", "write", &[]);
    // On a non-loopback address: the keys in the database are what let them start.
    let (a, b) = std::thread::scope(|scope| {
        let first = scope.spawn(|| Server::start_with(db, "0.0.0.0:0", &[], "info"));
        let second = scope.spawn(|| Server::start_with(db, "0.0.0.0:0", &[], "info"));
        (first.join().unwrap(), second.join().unwrap())
    });
    // A use time later than any this test makes, stored after both instances read the table (so
    // both still take the key as never used, and write its first use): it must not move backwards.
    const FUTURE_MS: i64 = 9_000_000_000_000;
    common::postgres::execute(
        &url,
        &format!("UPDATE api_keys SET last_used_at_ms = {FUTURE_MS} WHERE name = 'future'"),
    );
    let (a_addr, b_addr) = (
        std::net::SocketAddr::from(([127, 0, 0, 1], a.addr.port())),
        std::net::SocketAddr::from(([127, 0, 0, 1], b.addr.port())),
    );
    let mut anonymous = common::Client::connect(a_addr).await;
    assert_eq!(
        anonymous.transaction(common::DEMO_CARD, 1).await.status.as_u16(),
        401
    );

    let started_ms = now_ms();
    use_key(a_addr, &only_a).await;
    use_key(b_addr, &only_b).await;
    use_key(a_addr, &shared).await;
    use_key(b_addr, &shared).await;
    // The future key first, then the probe, on one instance: once the probe's use is stored, the
    // future key's (due no later) was written too, in the same statement or an earlier one.
    use_key(a_addr, &future).await;
    use_key(a_addr, &probe).await;
    let deadline = common::Deadline::new(REVOCATION_DEADLINE, "both instances to write use times");
    let stored = loop {
        let stored = last_used(&url);
        if ["only-a", "only-b", "shared", "probe"]
            .iter()
            .all(|name| stored[*name].is_some())
        {
            break stored;
        }
        deadline.tick().await;
    };
    for name in ["only-a", "only-b", "shared", "probe"] {
        let at = stored[name].unwrap();
        assert!(
            at >= started_ms && at <= now_ms(),
            "{name}: {at} not in [{started_ms}, now]"
        );
    }
    assert_eq!(stored["future"], Some(FUTURE_MS), "a use time moved backwards");

    common::revoke_key(db, "shared");
    let revoked = std::time::Instant::now();
    let mut on_a = common::Client::connect(a_addr).await.with_bearer(&shared);
    let mut on_b = common::Client::connect(b_addr).await.with_bearer(&shared);
    let deadline = common::Deadline::new(REVOCATION_DEADLINE, "both instances to refuse the key");
    let (mut a_refused, mut b_refused) = (false, false);
    while !(a_refused && b_refused) {
        if !a_refused {
            a_refused = on_a.transaction(common::DEMO_CARD, 1).await.status.as_u16() == 401;
        }
        if !b_refused {
            b_refused = on_b.transaction(common::DEMO_CARD, 1).await.status.as_u16() == 401;
        }
        if !(a_refused && b_refused) {
            deadline.tick().await;
        }
    }
    eprintln!(
        "both instances refused the revoked key {:?} after it was revoked",
        revoked.elapsed()
    );
    // The other keys still work on both.
    use_key(b_addr, &only_a).await;
    use_key(a_addr, &only_b).await;
    for server in [&a, &b] {
        let log = errors(server);
        assert!(!log.contains("API keys"), "{log}");
    }
    assert_ledger_consistent(&url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_database_conserve_money_under_contention() {
    let Some(url) = database("conservation-two-instances") else {
        return;
    };
    let (a, b) = two_servers(&url, &["--workers", "3"]);
    const CLIENTS: usize = 16;
    const REQUESTS: usize = 150;
    const CARDS: u32 = 6;
    let cards: Arc<Vec<String>> = Arc::new((1..=CARDS).map(|n| seeded_card(n).0).collect());
    let seed = common::test_seed("pg-conservation", "TALLYD_PG_SEED");
    let mut tasks = Vec::new();
    for client_index in 0..CLIENTS {
        let addr = if client_index % 2 == 0 { a.addr } else { b.addr };
        let cards = Arc::clone(&cards);
        let mut rng = Rng((seed ^ client_index as u64) | 1);
        tasks.push(tokio::spawn(async move {
            let mut client = common::Client::connect(addr).await;
            let mut committed = 0;
            for _ in 0..REQUESTS {
                let source = &cards[rng.below(CARDS as u64) as usize];
                let destination = &cards[rng.below(CARDS as u64) as usize];
                // Large amounts, so that many transfers are refused for want of funds.
                let amount = 1 + rng.below(60_000) as i64;
                let reply = match rng.below(3) {
                    0 => client.transaction(source, -amount).await,
                    1 => client.transaction(source, amount).await,
                    _ if source != destination => {
                        client
                            .post_json("/transfers", &transfer_body(source, destination, amount))
                            .await
                    }
                    _ => continue,
                };
                match reply.status.as_u16() {
                    200 | 201 => committed += 1,
                    422 | 409 => {}
                    other => panic!("unexpected {other}: {}", reply.text),
                }
            }
            committed
        }));
    }
    let mut committed = 0;
    for task in tasks {
        committed += task.await.unwrap();
    }
    let transactions: i64 = one(&url, "SELECT count(*) FROM transactions").parse().unwrap();
    assert_eq!(
        transactions, committed,
        "every acknowledged transaction, and no other, is stored"
    );
    assert_ledger_consistent(&url);
    // Both instances answer every balance as the database has it.
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    for card in cards.iter() {
        let stored = one(
            &url,
            &format!("SELECT balance FROM ledger_accounts WHERE name = '{card}'"),
        );
        assert_eq!(ca.balance(card).await.to_string(), stored);
        assert_eq!(cb.balance(card).await.to_string(), stored);
    }
    eprintln!("two instances: {committed} transactions committed by {CLIENTS} clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_sent_to_two_instances_at_once_is_executed_once() {
    let Some(url) = database("idempotency-two-instances") else {
        return;
    };
    let (a, b) = two_servers(&url, &["--workers", "2"]);
    let (card, _) = seeded_card(7);
    const KEYS: usize = 40;
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let mut ids = HashSet::new();
    for n in 0..KEYS {
        let key = format!("race-{n}");
        let body = format!(r#"{{"card_number":"{card}","amount":-{}}}"#, 100 + n);
        let (first, second) = tokio::join!(
            ca.post_keyed("/transaction", &body, &key),
            cb.post_keyed("/transaction", &body, &key)
        );
        assert_eq!(
            first.status.as_u16(),
            second.status.as_u16(),
            "{} / {}\n{}\n{}",
            first.text,
            second.text,
            errors(&a),
            errors(&b)
        );
        assert_eq!(
            first.body, second.body,
            "a replay is the first answer, byte for byte"
        );
        assert!(
            first.replayed() || second.replayed(),
            "one of the two is a replay"
        );
        ids.insert(first.i64("id"));
    }
    assert_eq!(ids.len(), KEYS);
    let stored = one(&url, "SELECT count(*) FROM transactions");
    assert_eq!(stored, KEYS.to_string(), "each key moved money once");
    assert_eq!(
        one(&url, "SELECT count(*) FROM idempotency_keys"),
        KEYS.to_string()
    );
    assert_ledger_consistent(&url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_ledger_migrates_whole_with_its_ids_and_keys_and_serves_on() {
    let Some(url) = database("migrate-from-sqlite") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.db");
    // Keys in the SQLite file itself (the harness's create_key would make them on PostgreSQL).
    let sqlite_keys = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .arg("keys")
            .args(args)
            .arg("--db")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    let key = sqlite_keys(&["create", "--name", "mover", "--scope", "write"]);
    let gone = sqlite_keys(&["create", "--name", "gone", "--scope", "write"]);
    sqlite_keys(&["revoke", "gone"]);
    let mut sqlite = Server::start_on_sqlite(&file, &[]);
    let mut client = sqlite.client().await.with_bearer(&key);
    let (card, _) = seeded_card(3);
    let body = format!(r#"{{"card_number":"{card}","amount":-250}}"#);
    let first = client.post_keyed("/transaction", &body, "moved-key").await;
    assert_eq!(first.status.as_u16(), 200, "{}", first.text);
    let transfer = client
        .post_json("/transfers", &transfer_body(&card, common::DEMO_CARD, 40))
        .await;
    assert_eq!(transfer.status.as_u16(), 200, "{}", transfer.text);
    let hold = client
        .post_json("/holds", &format!(r#"{{"card_number":"{card}","amount":15}}"#))
        .await;
    assert_eq!(hold.status.as_u16(), 200, "{}", hold.text);
    drop(client);
    sqlite.terminate();

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["migrate", "--from"])
        .arg(&file)
        .args(["--to", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("all 11 checks hold"), "{text}");
    assert!(text.contains("2 API keys"), "{text}");
    assert_eq!(one(&url, "SELECT count(*) FROM transactions"), "2");
    assert_ledger_consistent(&url);

    // The copy serves on: the API keys came along (the revoked one still refused, a caller
    // without one refused), the same idempotency key of the same API key replays the same bytes,
    // and new ids follow the old ones.
    let server = Server::start_with(Path::new(&url), "127.0.0.1:0", &[], "info");
    let mut anonymous = server.client().await;
    assert_eq!(anonymous.transaction(&card, 5).await.status.as_u16(), 401);
    let mut revoked = server.client().await.with_bearer(&gone);
    assert_eq!(revoked.transaction(&card, 5).await.status.as_u16(), 401);
    let mut client = server.client().await.with_bearer(&key);
    let replay = client.post_keyed("/transaction", &body, "moved-key").await;
    assert!(replay.replayed(), "{}", replay.text);
    assert_eq!(replay.body, first.body);
    let next = client.transaction(&card, 5).await;
    // (Not necessarily the very next: the replay's batch took a block too, and ids have gaps.)
    assert!(next.i64("id") > transfer.i64("id"), "{}", next.text);
    assert_eq!(client.account_balance(&card).await, next.i64("balance"));
    let account = client.get(&format!("/accounts/{card}")).await.json();
    assert_eq!(account["held"], 15);

    // A second migrate into the same database is refused and changes nothing.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["migrate", "--from"])
        .arg(&file)
        .args(["--to", &url])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(one(&url, "SELECT count(*) FROM transactions"), "3");
}

/// `tallyd migrate` of a ledger that `tallyd archive` cut: what is copied is the ledger that opened
/// at the cut (the archived transactions stay in their archive file) and the cut itself, so that
/// `verify` accepts the first legs that link into the archive and a captured hold that names an
/// archived transaction; balances are the same, archived ids are 404 and never handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archived_sqlite_ledger_migrates_with_its_cut_and_verify_holds_on_both() {
    let Some(url) = database("migrate-archived") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("users.db");
    let mut sqlite = Server::start_on_sqlite(&file, &[]);
    let mut client = sqlite.client().await;
    let (card, _) = seeded_card(5);
    let hold = client
        .post_json("/holds", &format!(r#"{{"card_number":"{card}","amount":7}}"#))
        .await;
    assert_eq!(hold.status.as_u16(), 200, "{}", hold.text);
    let hold_id = hold.i64("id");
    let capture = client.post_json(&format!("/holds/{hold_id}/capture"), "").await;
    assert_eq!(capture.status.as_u16(), 200, "{}", capture.text);
    let mut ids = Vec::new();
    for n in 0..6 {
        let reply = client
            .post_json("/transfers", &transfer_body(&card, common::DEMO_CARD, 10 + n))
            .await;
        assert_eq!(reply.status.as_u16(), 200, "{}", reply.text);
        ids.push(reply.i64("id"));
    }
    let balances = (
        client.account_balance(&card).await,
        client.account_balance(common::DEMO_CARD).await,
    );
    drop(client);
    sqlite.terminate();
    let tallyd = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "tallyd {args:?}: {text}");
        text
    };
    let (db, archive) = (file.to_str().unwrap(), dir.path().join("archive-1.db"));
    let cut = ids[3];
    tallyd(&[
        "archive",
        "--db",
        db,
        "--before-id",
        &cut.to_string(),
        "--to",
        archive.to_str().unwrap(),
    ]);

    let text = tallyd(&["migrate", "--from", db, "--to", &url]);
    assert!(text.contains("1 archive cuts"), "{text}");
    assert!(text.contains("all 11 checks hold"), "{text}");
    assert_eq!(
        one(&url, "SELECT count(*) FROM transactions"),
        "3",
        "the kept ones only"
    );
    assert_eq!(
        one(&url, "SELECT archived_before_id FROM ledger_archive"),
        cut.to_string()
    );
    assert_ledger_consistent(&url);

    let mut server = Server::start_with(Path::new(&url), "127.0.0.1:0", &[], "info");
    let mut client = server.client().await;
    assert_eq!(
        (
            client.account_balance(&card).await,
            client.account_balance(common::DEMO_CARD).await
        ),
        balances
    );
    assert_eq!(
        client
            .get(&format!("/transactions/{}", ids[0]))
            .await
            .status
            .as_u16(),
        404
    );
    assert_eq!(
        client
            .get(&format!("/transactions/{}", ids[5]))
            .await
            .status
            .as_u16(),
        200
    );
    let next = client
        .post_json("/transfers", &transfer_body(&card, common::DEMO_CARD, 1))
        .await;
    assert_eq!(next.status.as_u16(), 200, "{}", next.text);
    assert!(next.i64("id") > ids[5], "{}", next.text);
    drop(client);
    assert!(server.terminate().success());
    let text = tallyd(&["verify", "--db", &url]);
    assert!(text.contains("all 11 checks hold"), "{text}");
    // The same cut on the SQLite file still verifies too (nothing was changed there).
    let text = tallyd(&["verify", "--db", db]);
    assert!(text.contains("checks hold"), "{text}");
}

#[test]
fn verify_on_postgresql_finds_a_balance_changed_behind_the_ledger() {
    let Some(url) = database("verify-tampered") else {
        return;
    };
    let server = Server::start_with(Path::new(&url), "127.0.0.1:0", &[], "info");
    drop(server);
    common::postgres::execute(
        &url,
        "UPDATE ledger_accounts SET balance = balance + 1 WHERE name = '1234567890'",
    );
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["verify", "--db", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("FAILED every account's current balance is its opening balance plus the sum of its legs (1 violations"),
        "{text}"
    );
    assert!(!text.contains(":tallyd@"), "the password is not printed: {text}");
}

/// The guard against losing or doubling money when the database connection fails mid-batch: while
/// keyed clients send transfers, every connection of the server to PostgreSQL is terminated again
/// and again (some batches fail before COMMIT: 503 storage_unavailable; some during it: 503
/// outcome_unknown). Each client retries its request with the same key until it gets an answer
/// that is not a 503; in the end every key moved money exactly once and the books balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_under_keyed_load_lose_and_double_nothing() {
    let Some(url) = database("connections-killed") else {
        return;
    };
    let server = Server::start_with(Path::new(&url), "127.0.0.1:0", &["--workers", "2"], "info");
    const CLIENTS: usize = 8;
    const REQUESTS: usize = 40;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let (url, stop) = (url.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut kills = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(150));
                common::postgres::execute(
                    &url,
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                );
                kills += 1;
            }
            kills
        })
    };
    let mut tasks = Vec::new();
    for client_index in 0..CLIENTS {
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut client = common::Client::connect(addr).await;
            let (mut unknown, mut unavailable) = (0, 0);
            for n in 0..REQUESTS {
                let source = seeded_card(1 + (client_index as u32 * 2) % 10).0;
                let destination = seeded_card(2 + (n as u32 * 3) % 9).0;
                if source == destination {
                    continue;
                }
                let key = format!("kill-{client_index}-{n}");
                let body = transfer_body(&source, &destination, 1 + n as i64);
                loop {
                    let reply = client.post_keyed("/transfers", &body, &key).await;
                    let code = serde_json::from_str::<serde_json::Value>(&reply.text)
                        .ok()
                        .and_then(|body| body["error"]["code"].as_str().map(str::to_owned));
                    match (reply.status.as_u16(), code.as_deref()) {
                        (503, Some("outcome_unknown")) => unknown += 1,
                        (503, _) => unavailable += 1,
                        (200, _) => break,
                        (status, _) => panic!("unexpected {status}: {}", reply.text),
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
            (unknown, unavailable)
        }));
    }
    let (mut unknown, mut unavailable) = (0, 0);
    for task in tasks {
        let (u, a) = task.await.unwrap();
        unknown += u;
        unavailable += a;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kills = killer.join().unwrap();
    let keys: i64 = one(&url, "SELECT count(DISTINCT idempotency_key) FROM transactions")
        .parse()
        .unwrap();
    let transactions: i64 = one(&url, "SELECT count(*) FROM transactions").parse().unwrap();
    assert_eq!(transactions, keys, "no key moved money twice");
    let answered: i64 = one(&url, "SELECT count(*) FROM idempotency_keys")
        .parse()
        .unwrap();
    assert_eq!(
        answered, transactions,
        "every key that moved money keeps its answer, and only those"
    );
    assert_ledger_consistent(&url);
    eprintln!(
        "connections killed {kills} times: {transactions} transfers, {unavailable} retries after 503 \
         storage_unavailable, {unknown} after 503 outcome_unknown"
    );
}

/// A keyed request answered: its key, the id it was answered, and the legs it moved.
type Moved = (String, i64, Vec<(String, i64)>);

/// The HTTP tier scales out and survives losing a member: three instances on one database, 48
/// clients spread over them sending keyed transfers and deposits, and one instance SIGKILLed in
/// the middle. A client whose instance is gone (or that gets a 503) sends the same request with
/// the same key to the next instance, until it is answered. In the end every key moved money
/// exactly once, under the id its client was answered, every balance is its opening balance plus
/// the intended movements, and `tallyd verify` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_one_killed_under_keyed_load_execute_every_key_once() {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    let Some(url) = database("three-instances") else {
        return;
    };
    const INSTANCES: usize = 3;
    const CLIENTS: usize = 48;
    const REQUESTS: usize = 40;
    const CARDS: u32 = 12;
    // Small amounts against seeded openings: no request is refused for want of funds, so every
    // intended movement must happen exactly once.
    const AMOUNT_MAX: u64 = 20;
    let path = Path::new(&url);
    let mut servers: Vec<Server> = std::thread::scope(|scope| {
        let starting: Vec<_> = (0..INSTANCES)
            .map(|_| scope.spawn(|| Server::start_with(path, "127.0.0.1:0", &["--workers", "2"], "info")))
            .collect();
        starting
            .into_iter()
            .map(|server| server.join().unwrap())
            .collect()
    });
    let addrs: Arc<Vec<std::net::SocketAddr>> = Arc::new(servers.iter().map(|server| server.addr).collect());
    let cards: Vec<(String, i64)> = (1..=CARDS).map(seeded_card).collect();
    let seed = common::test_seed("pg-three-instances", "TALLYD_PG_SEED");
    let acks = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for client_index in 0..CLIENTS {
        let mut rng = Rng((seed ^ (client_index as u64).wrapping_mul(0x9e37_79b9)) | 1);
        let names: Vec<String> = cards.iter().map(|(card, _)| card.clone()).collect();
        let (addrs, acks) = (Arc::clone(&addrs), Arc::clone(&acks));
        tasks.push(tokio::spawn(async move {
            let mut at = client_index % INSTANCES;
            let mut client = None;
            // (key, id answered, legs moved)
            let mut moved: Vec<Moved> = Vec::new();
            let (mut switches, mut unavailable) = (0_u64, 0_u64);
            for n in 0..REQUESTS {
                let key = format!("three-{client_index}-{n}");
                let amount = 1 + rng.below(AMOUNT_MAX) as i64;
                let source = names[rng.below(u64::from(CARDS)) as usize].clone();
                let (path, body, legs) = if rng.below(4) == 0 {
                    let body = format!(r#"{{"card_number":"{source}","amount":{amount}}}"#);
                    (
                        "/transaction",
                        body,
                        vec![("@world".to_owned(), -amount), (source, amount)],
                    )
                } else {
                    let mut destination = names[rng.below(u64::from(CARDS)) as usize].clone();
                    while destination == source {
                        destination = names[rng.below(u64::from(CARDS)) as usize].clone();
                    }
                    let body = transfer_body(&source, &destination, amount);
                    ("/transfers", body, vec![(source, -amount), (destination, amount)])
                };
                let deadline = common::Deadline::new(std::time::Duration::from_secs(120), "an answer");
                let id = loop {
                    if client.is_none() {
                        client = common::Client::try_connect(addrs[at]).await.ok();
                    }
                    let reply = match client.as_mut() {
                        Some(connected) => {
                            let request = connected.post_request(path, &body, &[("idempotency-key", &key)]);
                            connected.try_request(request).await.ok()
                        }
                        None => None,
                    };
                    match reply {
                        Some(reply) if reply.status == 200 => break reply.i64("id"),
                        Some(reply) if reply.status == 503 => unavailable += 1,
                        Some(reply) => panic!("{key}: {} {}", reply.status, reply.text),
                        // The instance is gone: the same request, same key, to the next one.
                        None => {
                            client = None;
                            at = (at + 1) % INSTANCES;
                            switches += 1;
                        }
                    }
                    deadline.tick().await;
                };
                acks.fetch_add(1, Ordering::Relaxed);
                moved.push((key, id, legs));
            }
            (moved, switches, unavailable)
        }));
    }
    // Kill the first instance once a third of the work is acknowledged.
    let deadline = common::Deadline::new(
        std::time::Duration::from_secs(120),
        "acknowledgements before the kill",
    );
    while acks.load(Ordering::Relaxed) < (CLIENTS * REQUESTS / 3) as u64 {
        deadline.tick().await;
    }
    servers[0].kill();
    let killed_at = acks.load(Ordering::Relaxed);
    let mut answered: BTreeMap<String, i64> = BTreeMap::new();
    let mut expected: BTreeMap<String, i64> = cards.iter().cloned().collect();
    let (mut switches, mut unavailable) = (0, 0);
    for task in tasks {
        let (moved, client_switches, client_unavailable) = task.await.unwrap();
        switches += client_switches;
        unavailable += client_unavailable;
        for (key, id, legs) in moved {
            answered.insert(key, id);
            for (account, amount) in legs {
                if account != "@world" {
                    *expected.entry(account).or_default() += amount;
                }
            }
        }
    }
    assert!(switches > 0, "no client lost its instance");
    assert_every_key_once(&url, &answered);
    for (card, balance) in &expected {
        assert_eq!(
            one(
                &url,
                &format!("SELECT balance FROM ledger_accounts WHERE name = '{card}'")
            ),
            balance.to_string(),
            "{card} (seed {seed})"
        );
    }
    assert_ledger_consistent(&url);
    common::verify(path);
    eprintln!(
        "three instances: {} keyed requests from {CLIENTS} clients, instance 0 killed after {killed_at}; \
         {switches} moves to another instance, {unavailable} answers 503; each key executed once",
        answered.len()
    );
}

/// A deadlock is retried, never answered as an error: another session locks the destination of a
/// transfer, tallyd's batch locks the source and waits for the destination, and the session then
/// asks for the source. PostgreSQL's deadlock detector aborts tallyd's transaction (it waited
/// first) with 40P01; tallyd decides the batch again once the session lets go, and the client gets
/// its 200, the money moved once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadlock_with_another_session_is_retried_and_answered_200() {
    let Some(url) = database("deadlock") else {
        return;
    };
    let server = Server::start_with(Path::new(&url), "127.0.0.1:0", &[], "info,tallyd=debug");
    let (source, source_opening) = seeded_card(1);
    let (destination, destination_opening) = seeded_card(2);
    let (session, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let lock = |name: &str| format!("SELECT 1 FROM ledger_accounts WHERE name = '{name}' FOR UPDATE");
    session.batch_execute("BEGIN").await.unwrap();
    session.batch_execute(&lock(&destination)).await.unwrap();

    let addr = server.addr;
    let body = transfer_body(&source, &destination, 5);
    let transfer = tokio::spawn(async move {
        let mut client = common::Client::connect(addr).await;
        client.post_keyed("/transfers", &body, "deadlock-1").await
    });
    // tallyd's batch holds the source and waits for the destination.
    let deadline = common::Deadline::new(
        std::time::Duration::from_secs(30),
        "tallyd to wait for the row lock",
    );
    while one(
        &url,
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'",
    ) == "0"
    {
        deadline.tick().await;
    }
    // The cycle: PostgreSQL aborts one side after deadlock_timeout (1 s).
    let second = session.batch_execute(&lock(&source)).await;
    session.batch_execute("ROLLBACK").await.unwrap();
    let reply = transfer.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    let log = server.log_text();
    eprintln!(
        "deadlock: {}",
        if second.is_ok() {
            "tallyd's batch was aborted (40P01) and decided again"
        } else {
            "the other session was aborted"
        }
    );
    assert!(
        second.is_err() || log.contains("40P01"),
        "neither side was aborted for a deadlock: {}",
        errors(&server)
    );
    if second.is_ok() {
        assert!(
            log.contains("deciding it again"),
            "the deadlock was not retried: {log}"
        );
    }
    assert_eq!(
        one(
            &url,
            "SELECT count(*) FROM transactions WHERE idempotency_key = 'deadlock-1'"
        ),
        "1"
    );
    let balance = |name: &str| {
        one(
            &url,
            &format!("SELECT balance FROM ledger_accounts WHERE name = '{name}'"),
        )
    };
    assert_eq!(balance(&source), (source_opening - 5).to_string());
    assert_eq!(balance(&destination), (destination_opening + 5).to_string());
    assert_ledger_consistent(&url);
}

/// TLS to PostgreSQL: with `sslmode=require` in the URL every connection of tallyd (batches, ids,
/// reads) is encrypted and the server's certificate is checked against `PGSSLROOTCERT`; `verify`
/// connects the same way; a CA that did not sign the server's certificate keeps `serve` from
/// starting, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_postgresql_is_used_when_the_url_requires_it_and_the_certificate_is_checked() {
    let (Some(url), Some(ca)) = (database("tls"), std::env::var("PG_CA").ok()) else {
        eprintln!("skipped: needs the cluster of scripts/ci-postgres.sh (PG_CA)");
        return;
    };
    let tls_url = format!("{url}?sslmode=require");
    let env = [("PGSSLROOTCERT", ca.as_str())];
    let server = Server::start_with_env(Path::new(&tls_url), &[], &env);
    let mut client = server.client().await;
    let (source, opening) = seeded_card(1);
    let reply = client
        .post_json("/transfers", &transfer_body(&source, &seeded_card(2).0, 7))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(client.account_balance(&source).await, opening - 7);
    let connections = |encrypted: bool| {
        one(
            &url,
            &format!(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.datname = current_database() AND a.backend_type = 'client backend' \
                 AND a.pid <> pg_backend_pid() AND s.ssl = {encrypted}"
            ),
        )
    };
    assert_ne!(connections(true), "0", "no encrypted connection of tallyd's");
    assert_eq!(connections(false), "0", "a plaintext connection of tallyd's");

    let verified = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["verify", "--db", &tls_url])
        .env("PGSSLROOTCERT", &ca)
        .output()
        .unwrap();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let stranger = dir.path().join("other-ca.pem");
    std::fs::write(&stranger, tls_support::Ca::new("not the cluster's CA").cert_pem).unwrap();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db", &tls_url])
        .env("PGSSLROOTCERT", &stranger)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "served with an unknown CA: {stderr}");
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "the refusal does not say why: {stderr}"
    );
}
