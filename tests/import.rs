//! Moving from the Flask transaction processor: `tallyd import` of its users.db, serving the result
//! with card numbers written as people write them, and `serve` refusing a file that is not tallyd's.
//! Guards against the bug where `serve --db users.db` on a Flask database wrote a second, seeded
//! ledger into the user's file and silently ignored their accounts.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{Rng, Server};
use hyper::StatusCode;
use rusqlite::{params, Connection};

/// The Flask processor's set-up script, as its users have it.
const FLASK_SCHEMA: &str = "CREATE TABLE users (card_number TEXT PRIMARY KEY, balance INTEGER); \
     CREATE TABLE transactions (id INTEGER PRIMARY KEY AUTOINCREMENT, card_number TEXT, amount INTEGER, \
     success INTEGER, timestamp DATETIME DEFAULT CURRENT_TIMESTAMP);";

/// The Flask card format: `6219 8619 NNNN 8640`.
fn flask_card(n: u32) -> String {
    format!("6219 8619 {n:04} 8640")
}

fn digits(n: u32) -> String {
    flask_card(n).replace(' ', "")
}

/// A Flask database: `cards` cards with consistent histories (balance = initial + successful
/// amounts), a few declined rows, and three cards whose history cannot add up to their balance
/// from any opening balance that keeps it non-negative. Returns each card's balance by card index.
fn flask_database(path: &Path, cards: u32, rows_per_card: u32) -> Vec<i64> {
    let mut conn = Connection::open(path).unwrap();
    conn.execute_batch(FLASK_SCHEMA).unwrap();
    let tx = conn.transaction().unwrap();
    let mut rng = Rng(0x0f1a_5c00);
    let mut balances = Vec::new();
    {
        let mut user = tx
            .prepare("INSERT INTO users (card_number, balance) VALUES (?1, ?2)")
            .unwrap();
        let mut row = tx
            .prepare(
                "INSERT INTO transactions (card_number, amount, success, timestamp) VALUES (?1, ?2, ?3, ?4)",
            )
            .unwrap();
        for n in 0..cards {
            let mut balance = 50_000 + rng.below(9_950_001) as i64;
            for k in 0..rows_per_card {
                let amount = rng.below(10_001) as i64 - 5_000;
                let declined = amount == 0 || rng.below(20) == 0;
                let stamp = format!("2026-11-{:02} 12:{:02}:{:02}", 1 + k % 28, n % 60, k % 60);
                row.execute(params![flask_card(n), amount, i64::from(!declined), stamp])
                    .unwrap();
                if !declined {
                    balance += amount;
                }
            }
            balances.push(balance);
            user.execute(params![flask_card(n), balance]).unwrap();
        }
        // Lost updates: histories that no opening balance explains.
        for (n, balance, amounts) in [
            (cards, 1_000_i64, vec![5_000_i64]), // deposited 5,000 yet holds 1,000: implied opening -4,000
            (cards + 1, 0, vec![-500, 500]),     // went to -500 on the way from 0 back to 0
            (cards + 2, 250, vec![300, -4_000, 3_000]), // dips to -3,700 from an implied opening of 950
        ] {
            for amount in amounts {
                row.execute(params![flask_card(n), amount, 1, "2026-11-30 23:59:59"])
                    .unwrap();
            }
            balances.push(balance);
            user.execute(params![flask_card(n), balance]).unwrap();
        }
        // A successful row for a card with no account moved nothing tallyd can hold.
        row.execute(params!["9999 0000 1111 2222", 10, 1, "2026-11-30 23:59:59"])
            .unwrap();
    }
    tx.commit().unwrap();
    balances
}

fn tallyd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running tallyd")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flask_database_imports_exactly_and_serves_its_old_card_format() {
    const CARDS: u32 = 2_000;
    let dir = tempfile::tempdir().unwrap();
    let flask = dir.path().join("users.db");
    let db = dir.path().join("tallyd.db");
    let balances = flask_database(&flask, CARDS, 8);

    let output = tallyd(&[
        "import",
        "--from",
        flask.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}");
    assert!(stdout.contains(&format!("{} accounts", CARDS + 3)), "{stdout}");
    assert!(stdout.contains("1 skipped"), "{stdout}");
    assert!(
        stdout.contains(&format!("all {} checks hold", tallyd::store::sqlite::CHECKS)),
        "verify ran on the result: {stdout}"
    );
    // Implied openings -4,000, 0 (dip to -500) and 950 (dip to -3,700): raised by 4,000, 500 and 2,750.
    assert!(
        stdout
            .contains("3 accounts' histories did not add up to their balances: adjusted by 7250 minor units"),
        "{stdout}"
    );

    let conn = Connection::open(&db).unwrap();
    for (n, balance) in balances.iter().enumerate() {
        let stored: i64 = conn
            .query_row(
                "SELECT balance FROM accounts WHERE card_number = ?1",
                [digits(n as u32)],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(stored, *balance, "card {n}");
    }
    let declined: i64 = Connection::open(&flask)
        .unwrap()
        .query_row("SELECT count(*) FROM transactions WHERE success = 0", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert!(stdout.contains(&format!("{declined} declined")), "{stdout}");
    let kept_time: i64 = conn
        .query_row("SELECT created_at_ms FROM transactions WHERE id = 1", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(
        kept_time, 1_793_534_400_000,
        "the Flask row's own time (2026-11-01 12:00:00 UTC)"
    );
    drop(conn);

    let server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    let card = flask_card(7);
    let reply = client.transaction(&card, -5).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json()["card_number"], digits(7), "answered as digits");
    assert_eq!(reply.json()["balance"], balances[7] - 5);
    let dashed = digits(7)
        .as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join("-");
    assert_eq!(client.balance(&dashed).await, balances[7] - 5);
    assert_eq!(client.balance(&card.replace(' ', "+")).await, balances[7] - 5);
    let reply = client
        .get(&format!("/accounts/{}", card.replace(' ', "%20")))
        .await;
    assert_eq!(reply.json()["balance"], balances[7] - 5, "{}", reply.text);
    for bad in [
        "6219  8619 0007 8640",
        "6219 8619-0007 8640",
        " 6219861900078640",
        "6219861900078640-",
    ] {
        assert_eq!(
            client.transaction(bad, 1).await.error_code(),
            "invalid_card_number",
            "{bad:?}"
        );
    }
    server.verify();
}

#[test]
fn serve_refuses_a_foreign_database_and_leaves_it_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let flask = dir.path().join("users.db");
    flask_database(&flask, 50, 3);
    let before = std::fs::read(&flask).unwrap();
    let output = tallyd(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--db",
        flask.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("not a tallyd database"), "{stderr}");
    assert!(
        stderr.contains("transactions, users"),
        "says what it found: {stderr}"
    );
    assert!(
        stderr.contains("tallyd import --from"),
        "names the import: {stderr}"
    );
    assert!(!stderr.contains("listening"), "{stderr}");
    assert_eq!(std::fs::read(&flask).unwrap(), before, "the file is unchanged");
    assert!(!dir.path().join("users.db-wal").exists());

    // Neither tallyd's nor Flask's: import refuses it too.
    let other = dir.path().join("other.db");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE things (x);")
        .unwrap();
    let target = dir.path().join("new.db");
    let output = tallyd(&[
        "import",
        "--from",
        other.to_str().unwrap(),
        "--db",
        target.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("not a database of the Flask transaction processor"),
        "{stderr}"
    );
    assert!(!target.exists());
}

#[test]
fn an_import_killed_halfway_leaves_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let flask = dir.path().join("users.db");
    let db = dir.path().join("tallyd.db");
    flask_database(&flask, 10_000, 30);
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args([
            "import",
            "--from",
            flask.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let partial = dir.path().join("tallyd.db.importing");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !partial.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the import never started writing"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import ended before it wrote"
        );
        std::thread::yield_now();
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!db.exists(), "a killed import left {}", db.display());
    // The next import starts over and succeeds.
    let output = tallyd(&[
        "import",
        "--from",
        flask.to_str().unwrap(),
        "--db",
        db.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!partial.exists());
}
