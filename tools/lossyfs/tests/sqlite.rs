//! SQLite in WAL mode on lossyfs, the configuration tallyd runs: a commit acknowledged under
//! `synchronous=FULL` survives a power cut, one acknowledged under `synchronous=NORMAL` does not
//! (until a checkpoint). If the second test ever stops losing commits, the simulator keeps data a
//! real disk would lose and the power-loss suite proves nothing.

mod common;

use common::{Rig, fuse_available};
use rusqlite::Connection;

/// Rows committed one transaction at a time; few enough that no automatic checkpoint (at 1000
/// WAL pages) runs, so under NORMAL nothing after the setup is ever fsynced.
const COMMITS: i64 = 50;

fn open(rig: &Rig, synchronous: &str) -> Connection {
    let conn = Connection::open(rig.path("test.db")).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    conn.pragma_update(None, "synchronous", synchronous).unwrap();
    conn
}

/// Creates the table and shuts down cleanly, so every test starts from the same durable state.
fn setup(rig: &mut Rig) {
    rig.mount();
    let conn = open(rig, "FULL");
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        .unwrap();
    drop(conn);
    rig.shutdown();
    rig.mount();
}

/// Commits `COMMITS` rows, cuts the power with the connection still open, boots and counts rows.
fn rows_after_cut(synchronous: &str) -> i64 {
    let mut rig = Rig::new(&format!("sqlite-{synchronous}"));
    setup(&mut rig);
    let conn = open(&rig, synchronous);
    for id in 1..=COMMITS {
        conn.execute("INSERT INTO t (id, v) VALUES (?1, 'acknowledged')", [id])
            .unwrap();
    }
    rig.cut_and_boot();
    drop(conn);
    let conn = open(&rig, "FULL");
    let integrity: String = conn
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    conn.query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .unwrap()
}

#[test]
fn wal_full_keeps_every_commit() {
    if !fuse_available() {
        return;
    }
    assert_eq!(rows_after_cut("FULL"), COMMITS);
}

#[test]
fn wal_normal_loses_recent_commits() {
    if !fuse_available() {
        return;
    }
    let kept = rows_after_cut("NORMAL");
    assert!(
        kept < COMMITS,
        "NORMAL kept all {kept} commits: the simulator is too kind"
    );
}

#[test]
fn a_database_created_under_full_survives_a_cut() {
    if !fuse_available() {
        return;
    }
    // No clean shutdown after creation: the names of the database and its WAL must have been
    // made durable by SQLite's own directory syncs.
    let mut rig = Rig::new("sqlite-create");
    rig.mount();
    let conn = open(&rig, "FULL");
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        .unwrap();
    conn.execute("INSERT INTO t (id, v) VALUES (1, 'acknowledged')", [])
        .unwrap();
    rig.cut_and_boot();
    drop(conn);
    let conn = open(&rig, "FULL");
    let count: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |row| row.get(0))
        .unwrap();
    assert_eq!(count, 1);
}
