//! Disk trouble: the database's filesystem fills up under tallyd. Requests must fail with a clear
//! 503 JSON error and change nothing, nothing acknowledged may be lost, and service must resume by
//! itself, without a restart, once space is freed. Guards against a failed commit that leaves the
//! ledger's in-memory balances ahead of the disk, and against a server that stays broken.
//!
//! The filesystem is a small tmpfs mounted for the test, so this needs root (CI runs as root).
//! Outside CI, a non-root run skips with a message; in CI (`CI=true`) not being able to mount fails.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Server, DEMO_CARD, DEMO_OPENING};
use hyper::StatusCode;

/// Small enough to fill in a moment, large enough for the seeded database (about 4 MiB).
const TMPFS_SIZE: &str = "24m";

/// A tmpfs mounted for the test's lifetime.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount() -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|status| status.success());
        mounted.then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes a file until the filesystem is full.
fn fill(path: &Path) -> PathBuf {
    let filler = path.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    // Top up the last partial chunk byte by byte.
    while file.write_all(&[0]).is_ok() {}
    let _ = file.sync_all();
    filler
}

#[tokio::test]
async fn a_full_disk_fails_requests_cleanly_and_service_resumes_when_space_returns() {
    let Some(fs) = Tmpfs::mount() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must be able to mount a tmpfs (run as root)"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root); CI runs this test");
        return;
    };
    let db = fs.path().join("users.db");
    let mut server = Server::start_on(&db, &[]);
    let mut client = server.client().await;
    assert_eq!(client.transaction(DEMO_CARD, 1).await.status, StatusCode::OK);
    let mut balance = DEMO_OPENING + 1;

    let filler = fill(fs.path());
    // Send deposits of distinct amounts until the disk refuses one; remember every answer.
    let mut acknowledged = Vec::new();
    let mut failed = Vec::new();
    for amount in 2..=2_000 {
        let reply = client.transaction(DEMO_CARD, amount).await;
        match reply.status {
            StatusCode::OK => {
                balance += amount;
                assert_eq!(reply.json()["balance"], balance);
                acknowledged.push(amount);
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.error_code(), "storage_unavailable", "{}", reply.text);
                failed.push(amount);
                if failed.len() == 3 {
                    break;
                }
            }
            other => panic!("unexpected {other}: {}", reply.text),
        }
    }
    assert_eq!(failed.len(), 3, "the full disk never refused a commit");
    let ready = client.get("/readyz").await;
    assert_eq!(
        (ready.status, ready.error_code().as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    );
    assert_eq!(client.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(
        client.balance(DEMO_CARD).await,
        balance,
        "a failed commit moved no balance"
    );

    std::fs::remove_file(filler).unwrap();
    let resumed = client.transaction(DEMO_CARD, 5_000).await;
    assert_eq!(
        resumed.status,
        StatusCode::OK,
        "service resumes without a restart: {}",
        resumed.text
    );
    balance += 5_000;
    assert_eq!(
        resumed.json()["balance"],
        balance,
        "the ledger re-read the disk after the failure"
    );
    assert_eq!(client.get("/readyz").await.status, StatusCode::OK);

    // After a crash and restart, exactly the acknowledged deposits are there.
    server.kill();
    let server = Server::start_on(&db, &[]);
    let amounts: Vec<i64> = server
        .sqlite()
        .prepare("SELECT amount FROM journal ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut expected = vec![1];
    expected.extend(&acknowledged);
    expected.push(5_000);
    assert_eq!(
        amounts, expected,
        "every acknowledged deposit, and none that failed"
    );
    eprintln!(
        "disk full: {} acknowledged before the refusal, {} refused with 503, resumed without restart, 0 lost",
        acknowledged.len() + 1,
        failed.len()
    );
    server.verify();
    drop(server);
}
