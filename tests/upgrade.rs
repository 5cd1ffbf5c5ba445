//! Opening databases tallyd did not just create: a version-1 database (built here from the
//! version-1 schema kept as `tests/fixtures/users-v1.sql`, with history) is upgraded in place once,
//! ids and balances unchanged, and `verify` passes; a database of a newer version, a version-1 file
//! whose books do not balance, another program's database and a file that is not SQLite at all are
//! refused with a clear message and left byte for byte as they were.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{db_totals, seeded_card, Server, DEMO_CARD, DEMO_OPENING};
use serde_json::json;

const V1_SCHEMA: &str = include_str!("fixtures/users-v1.sql");
/// How long a refused `serve` may take to exit.
const REFUSAL_WAIT: Duration = Duration::from_secs(60);

/// One version-1 journal row: (id, card, amount, balance_after, created_at_ms).
type V1Row = (i64, String, i64, i64, i64);

/// Builds a version-1 database at `db` with a history: deposits and withdrawals on a few cards,
/// ids with gaps, balances that match the journal. Returns the journal rows.
fn build_v1(db: &Path) -> Vec<V1Row> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(V1_SCHEMA).unwrap();
    let cards: Vec<(String, i64)> = vec![
        (DEMO_CARD.to_owned(), DEMO_OPENING),
        seeded_card(1),
        seeded_card(2),
        seeded_card(99_999),
    ];
    let mut balances: Vec<i64> = cards.iter().map(|(_, opening)| *opening).collect();
    let mut rows = Vec::new();
    let mut id = 0;
    for step in 0..40i64 {
        let which = (step % cards.len() as i64) as usize;
        let amount = if step % 3 == 2 {
            -(balances[which] / 4).max(1)
        } else {
            150 + step
        };
        balances[which] += amount;
        id += 1 + step % 4; // gaps, as rolled-back ids would leave
        rows.push((
            id,
            cards[which].0.clone(),
            amount,
            balances[which],
            1_700_000_000_000 + step * 1000,
        ));
    }
    let tx = conn.unchecked_transaction().unwrap();
    for (id, card, amount, balance_after, at) in &rows {
        tx.execute(
            "INSERT INTO journal (id, card_number, amount, balance_after, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            rusqlite::params![id, card, amount, balance_after, at],
        )
        .unwrap();
    }
    for ((card, _), balance) in cards.iter().zip(&balances) {
        tx.execute(
            "UPDATE accounts SET balance = ?2 WHERE card_number = ?1",
            rusqlite::params![card, balance],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    rows
}

/// `tallyd serve` on a file it must refuse: waits (bounded) for it to exit and returns whether it
/// succeeded and what it said.
fn serve_refused(db: &Path) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["serve", "--listen", "127.0.0.1:0", "--db"])
        .arg(db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + REFUSAL_WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "serve on {} did not exit: it should refuse the file",
                db.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (status.success(), said)
}

/// Every file in `dir` whose name starts with the database's, with its bytes.
fn files_of(db: &Path) -> Vec<(String, Vec<u8>)> {
    let name = db.file_name().unwrap().to_string_lossy().into_owned();
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(db.parent().unwrap())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            let file = path.file_name().unwrap().to_string_lossy();
            // The writer lock beside the database is tallyd's own and holds no data.
            file.starts_with(&name) && !file.ends_with(".lock")
        })
        .map(|path| {
            (
                path.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&path).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[track_caller]
fn assert_refused_untouched(db: &Path, says: &[&str]) -> String {
    let before = files_of(db);
    let (succeeded, said) = serve_refused(db);
    assert!(!succeeded, "serve accepted {}:\n{said}", db.display());
    for word in says {
        assert!(said.contains(word), "the refusal does not say {word:?}:\n{said}");
    }
    assert!(
        files_of(db) == before,
        "the refused file (or a -wal/-journal beside it) changed"
    );
    said
}

/// `accounts` (a table in version 1, a view since), ordered by card.
fn accounts_of(conn: &rusqlite::Connection) -> Vec<(String, i64, i64)> {
    let mut stmt = conn
        .prepare("SELECT card_number, opening_balance, balance FROM accounts ORDER BY card_number")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_database_is_upgraded_in_place_with_its_ids_and_balances() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let rows = build_v1(&db);
    let v1_accounts = accounts_of(&rusqlite::Connection::open(&db).unwrap());
    let mut server = Server::start_on(&db, &[]);
    let conn = server.sqlite();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 4);
    // The old tables' names are views now, and read exactly as before.
    let journal: Vec<V1Row> = conn
        .prepare("SELECT id, card_number, amount, balance_after, created_at_ms FROM journal ORDER BY id")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(journal, rows, "the journal view is the version-1 journal");
    let accounts = accounts_of(&conn);
    assert!(
        accounts == v1_accounts,
        "the accounts view is the version-1 accounts table"
    );
    let (opening, current) = db_totals(&conn);
    assert_eq!(opening, current);

    // Over HTTP, each row is a deposit or a withdrawal with @world under its old id.
    let mut client = server.client().await;
    let mut world = 0;
    for (id, card, amount, balance_after, at) in &rows {
        world -= amount;
        let view = client.get(&format!("/transactions/{id}")).await;
        assert_eq!(view.status.as_u16(), 200, "{}", view.text);
        let card_leg = json!({"card_number": card, "amount": amount, "balance_after": balance_after});
        let world_leg = json!({"card_number": "@world", "amount": -amount, "balance_after": world});
        let (kind, legs) = if *amount > 0 {
            ("deposit", json!([world_leg, card_leg]))
        } else {
            ("withdrawal", json!([card_leg, world_leg]))
        };
        assert_eq!(
            view.json(),
            json!({"id": id, "kind": kind, "amount": amount.abs(), "reference": null,
                   "created_at_ms": at, "legs": legs, "idempotency_key": null})
        );
    }
    for (card, opening, balance) in v1_accounts
        .iter()
        .filter(|(c, ..)| rows.iter().any(|r| &r.1 == c))
    {
        assert_eq!(client.balance(card).await, *balance);
        let entries = client
            .get(&format!("/accounts/{card}/entries?limit=100"))
            .await
            .json();
        let entries = entries["data"].as_array().unwrap();
        let expected: Vec<i64> = rows.iter().rev().filter(|r| &r.1 == card).map(|r| r.0).collect();
        let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
        assert_eq!(ids, expected);
        let oldest = entries.last().unwrap();
        assert_eq!(
            oldest["balance_after"].as_i64().unwrap() - oldest["amount"].as_i64().unwrap(),
            *opening
        );
        // Point-in-time balances read the upgraded history.
        let first_at = rows.iter().find(|r| &r.1 == card).unwrap().4;
        let before = client
            .get(&format!("/balance?card_number={card}&at={}", first_at - 1))
            .await;
        assert_eq!(before.i64("balance"), *opening);
    }

    // New transactions continue after the highest old id.
    let last_id = rows.last().unwrap().0;
    let (card, _) = seeded_card(1);
    let deposit = client.transaction(&card, 1).await;
    assert_eq!(deposit.status.as_u16(), 200, "{}", deposit.text);
    assert_eq!(deposit.i64("id"), last_id + 1);
    let transfer = client.transfer(&card, DEMO_CARD, 1).await;
    assert_eq!(transfer.i64("id"), last_id + 2);
    eprintln!(
        "upgrade: {} version-1 journal rows over 100,001 accounts upgraded; {}",
        rows.len(),
        server.verify().lines().last().unwrap_or("")
    );

    // Once: a second start finds a current database and changes nothing.
    server.terminate();
    let server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    assert_eq!(
        client
            .get(&format!("/transactions/{}", rows[0].0))
            .await
            .i64("id"),
        rows[0].0
    );
    assert_eq!(common::db_transactions(&server.sqlite()), rows.len() as i64 + 2);
    server.verify();
}

#[test]
fn a_version_1_database_whose_books_do_not_balance_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    build_v1(&db);
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "UPDATE accounts SET balance = balance + 1 WHERE card_number = ?1",
        [DEMO_CARD],
    )
    .unwrap();
    drop(conn);
    assert_refused_untouched(&db, &["version-1", "not upgraded"]);
}

#[test]
fn a_database_newer_than_the_binary_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let mut server = Server::start_on(&db, &[]);
    assert!(server.terminate().success());
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA user_version = 5; CREATE TABLE disputes (id INTEGER PRIMARY KEY);")
        .unwrap();
    drop(conn);
    let said = assert_refused_untouched(&db, &["schema version 5", "newer"]);
    eprintln!(
        "upgrade: a version-5 file is refused: {}",
        said.lines().last().unwrap_or("")
    );
}

#[test]
fn another_programs_database_is_refused_and_left_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("payments.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT NOT NULL, card_number TEXT, balance REAL); \
         INSERT INTO users (username, card_number, balance) VALUES ('alice', '4111111111111111', 12.5); \
         CREATE TABLE transactions (id INTEGER PRIMARY KEY, user_id INTEGER, amount REAL, status TEXT);",
    )
    .unwrap();
    drop(conn);
    let said = assert_refused_untouched(&db, &["not a tallyd database", "users"]);
    eprintln!(
        "upgrade: a Flask database is refused: {}",
        said.lines().last().unwrap_or("")
    );

    // A file that is not SQLite at all, too.
    let text = dir.path().join("notes.db");
    std::fs::write(&text, "these are not the pages you are looking for\n".repeat(100)).unwrap();
    assert_refused_untouched(&text, &[]);
}

/// A file stamped with a newer `user_version` is a newer database even before it has tables (or
/// another program's, which uses `user_version` for its own migrations): tallyd must not seed it as
/// a new one, which would also stamp it back to the current version.
#[test]
fn an_empty_file_stamped_with_a_newer_version_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch("PRAGMA user_version = 5;").unwrap();
    drop(conn);
    assert_refused_untouched(&db, &["schema version 5", "newer"]);
}

/// An upgraded account cannot have been opened after its own history: version 1 kept no opening
/// time, so whatever the upgrade picks must not be later than the account's first journal row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_account_is_not_created_after_its_own_history() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let rows = build_v1(&db);
    let server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    let card = &rows[0].1;
    let first_at = rows.iter().filter(|r| &r.1 == card).map(|r| r.4).min().unwrap();
    let account = client.get(&format!("/accounts/{card}")).await;
    let created = account.i64("created_at_ms");
    assert!(
        created <= first_at,
        "{card} was created at {created}, after its first transaction at {first_at}: {}",
        account.text
    );
}

/// The upgrade is one transaction: `serve` killed (SIGKILL) at moments sweeping the upgrade
/// leaves either the untouched version-1 file or the whole version-2 one, never a mix, and the
/// next start finishes the job.
#[test]
fn an_upgrade_killed_part_way_leaves_version_1_or_version_2_whole() {
    const KILLS: usize = 12;
    let seed = common::test_seed("upgrade kill", "TALLYD_UPGRADE_SEED");
    let mut rng = common::Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let rows = build_v1(&db);
    let v1_accounts = accounts_of(&rusqlite::Connection::open(&db).unwrap());
    let mut outcomes = Vec::new();
    for kill in 0..KILLS as u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .args(["serve", "--listen", "127.0.0.1:0", "--db"])
            .arg(&db)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Not synchronisation: a moment to crash at, later each time (with jitter), so that the
        // kills sweep the upgrade from its start.
        std::thread::sleep(Duration::from_millis(10 + kill * 40 + rng.below(40)));
        let _ = child.kill();
        let _ = child.wait();
        let conn = rusqlite::Connection::open(&db).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        let journal: Vec<V1Row> = conn
            .prepare("SELECT id, card_number, amount, balance_after, created_at_ms FROM journal ORDER BY id")
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(version == 1 || version == 2, "version {version} after a kill");
        assert_eq!(journal, rows, "the journal after a kill at version {version}");
        assert!(
            accounts_of(&conn) == v1_accounts,
            "the accounts after a kill at version {version}"
        );
        outcomes.push(version);
        if version == 2 {
            common::verify(&db);
            break;
        }
    }
    eprintln!("upgrade: versions after each kill: {outcomes:?}");
    let server = Server::start_on(&db, &[]);
    assert_eq!(common::db_transactions(&server.sqlite()), rows.len() as i64);
    server.verify();
}

/// A version-2 database (balances written in every commit, idempotency keys in a B-tree by key) is
/// upgraded to version 3 in place: its balances are the checkpoint, and a key it stored still
/// replays its exact answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_database_is_upgraded_with_its_balances_and_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let (a, b) = ("4000000000000001", "4000000000000002");
    let stored_body = r#"{"answered":"by version 2"}"#;
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(include_str!("fixtures/schema-v2.sql"))
            .unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO ledger_accounts VALUES ('{a}', 1000, 900, 1, 0), ('{b}', 0, 100, 1, 0);
             INSERT INTO transactions VALUES (1, 'transfer', 100, '{a}', -100, 900, NULL,
                                              '{b}', 100, 100, NULL, NULL, 'k-1', 1000);
             INSERT INTO idempotency_keys VALUES ('/transfers', 'k-1', 'transfer {a} {b} 100 null', 200,
                                                  CAST('{stored_body}' AS BLOB), 1, 1000);"
        ))
        .unwrap();
    }
    let server = Server::start_on(&db, &[]);
    let conn = server.sqlite();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 4);
    let checkpoint: i64 = conn
        .query_row("SELECT transaction_id FROM ledger_checkpoint", [], |r| r.get(0))
        .unwrap();
    assert_eq!(checkpoint, 1, "version 2's rows were current");
    let mut client = server.client().await;
    assert_eq!(client.balance(a).await, 900);
    assert_eq!(client.balance(b).await, 100);
    let replay = client
        .post_keyed("/transfers", &common::transfer_body(a, b, 100), "k-1")
        .await;
    assert_eq!(replay.status.as_u16(), 200);
    assert!(replay.replayed());
    assert_eq!(replay.text, stored_body, "the version-2 answer, byte for byte");
    let reused = client
        .post_keyed("/transfers", &common::transfer_body(a, b, 5), "k-1")
        .await;
    assert_eq!(reused.error_code(), "idempotency_key_reused");
    let found = client.get("/transactions?idempotency_key=k-1").await;
    assert_eq!(found.i64("id"), 1);
    let next = client.transfer(a, b, 1).await;
    assert_eq!(next.i64("id"), 2);
    assert_eq!(client.balance(b).await, 101);
    server.verify();
}

/// Version 3 (before holds and credit limits) to 4: the nonnegative CHECKs go without a copy of
/// the tables, the new tables arrive, and an overdraft can then take a card below zero.
#[tokio::test]
async fn a_version_3_database_gains_holds_and_limits_and_keeps_its_books() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let (a, b) = ("4000000000000001", "4000000000000002");
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(include_str!("fixtures/schema-v3.sql"))
            .unwrap();
        conn.execute_batch(&format!(
            "INSERT INTO ledger_accounts VALUES ('{a}', 1000, 1000, NULL, 0), ('{b}', 0, 0, NULL, 0);
             INSERT INTO transactions VALUES (1, 'transfer', 100, '{a}', -100, 900, NULL,
                                              '{b}', 100, 100, NULL, NULL, NULL, 1000);"
        ))
        .unwrap();
        let refused = conn.execute(
            &format!("UPDATE ledger_accounts SET balance = -1 WHERE name = '{a}'"),
            [],
        );
        assert!(refused.is_err(), "version 3 refuses a negative balance");
    }
    let server = Server::start_on(&db, &[]);
    let conn = server.sqlite();
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 4);
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let mut client = server.client().await;
    assert_eq!(client.balance(a).await, 900, "the replayed history");
    let request = hyper::Request::patch(format!("/accounts/{b}"))
        .header("host", "tallyd")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(
            br#"{"overdraft_limit":500}"#,
        )))
        .unwrap();
    assert_eq!(client.request(request).await.status.as_u16(), 200);
    let overdrawn = client.transaction(b, -600).await;
    assert_eq!(overdrawn.status.as_u16(), 200, "{}", overdrawn.text);
    assert_eq!(client.balance(b).await, -500);
    server.verify();
}
