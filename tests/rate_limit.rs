//! Rate limits on the real binary: one API key flooding while another key's traffic still commits
//! with normal latency; callers without a key limited by address; probes never limited; and a
//! refused request never reaches the queue (the database holds exactly the 200s).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{create_key, Server, DEMO_CARD};
use hyper::StatusCode;

/// The flood's and the calm key's rate: generous enough that the calm key's requests fit its burst.
const RATE_PER_S: u64 = 100;
const BURST: u64 = 100;
/// Requests the calm key makes one after another while the flood goes on.
const CALM_REQUESTS: u32 = 50;
/// The slowest a calm request may be answered: a commit takes milliseconds; the flood must not
/// add its queue in front of it. Generous for a debug build on a shared 2-core machine.
const CALM_LATENCY_MAX: Duration = Duration::from_millis(1500);

#[tokio::test]
async fn one_key_flooding_while_another_keys_traffic_still_commits_with_normal_latency() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let flood_key = create_key(&db, "flood", "write", &[]);
    let calm_key = create_key(&db, "calm", "write", &[]);
    let rate = RATE_PER_S.to_string();
    let burst = BURST.to_string();
    let server = Server::start_on(&db, &["--rate-limit-per-s", &rate, "--rate-limit-burst", &burst]);

    let done = Arc::new(AtomicBool::new(false));
    let flood_ok = Arc::new(AtomicU64::new(0));
    let flood_limited = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut flooders = Vec::new();
    for _ in 0..16 {
        let mut client = server.client().await.with_bearer(&flood_key);
        let (done, ok, limited) = (
            Arc::clone(&done),
            Arc::clone(&flood_ok),
            Arc::clone(&flood_limited),
        );
        flooders.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let reply = client.transaction(DEMO_CARD, 1).await;
                match reply.status {
                    StatusCode::OK => ok.fetch_add(1, Ordering::Relaxed),
                    StatusCode::TOO_MANY_REQUESTS => {
                        assert_eq!(reply.error_code(), "rate_limited");
                        let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
                        assert!(retry >= 1, "Retry-After {retry}");
                        limited.fetch_add(1, Ordering::Relaxed)
                    }
                    other => panic!("flood: unexpected {other}: {}", reply.text),
                };
            }
        }));
    }
    // Only once the flood is being refused does the calm key start: it runs against a full flood.
    let deadline = common::Deadline::new(Duration::from_secs(30), "the flood to be rate limited");
    while flood_limited.load(Ordering::Relaxed) == 0 {
        deadline.tick().await;
    }
    let mut calm = server.client().await.with_bearer(&calm_key);
    let mut slowest = Duration::ZERO;
    for _ in 0..CALM_REQUESTS {
        let sent = Instant::now();
        let reply = calm.transaction(DEMO_CARD, 1).await;
        slowest = slowest.max(sent.elapsed());
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "the calm key is never limited by the flood: {}",
            reply.text
        );
    }
    done.store(true, Ordering::Relaxed);
    for flooder in flooders {
        flooder.await.unwrap();
    }
    let elapsed = started.elapsed();
    let (ok, limited) = (
        flood_ok.load(Ordering::Relaxed),
        flood_limited.load(Ordering::Relaxed),
    );
    eprintln!("flood: {ok} committed, {limited} refused in {elapsed:?}; calm: slowest {slowest:?}");
    assert!(slowest < CALM_LATENCY_MAX, "a calm request took {slowest:?}");
    let allowed = BURST + RATE_PER_S * (elapsed.as_millis() as u64 + 999) / 1000;
    assert!(
        ok <= allowed,
        "the flood committed {ok}, more than its {allowed} tokens"
    );
    assert!(
        limited > ok,
        "most of the flood is refused ({limited} refused, {ok} committed)"
    );
    // Refused requests never reached the queue: the database holds exactly the answered 200s.
    let committed = common::db_transactions(&server.sqlite());
    assert_eq!(committed, (ok + u64::from(CALM_REQUESTS)) as i64);
}

#[tokio::test]
async fn callers_without_a_key_are_limited_by_address_and_probes_never_are() {
    let server = Server::start(&["--rate-limit-per-s", "1", "--rate-limit-burst", "5"]);
    let mut client = server.client().await;
    for n in 0..5 {
        let reply = client.transaction(DEMO_CARD, 1).await;
        assert_eq!(reply.status, StatusCode::OK, "request {n} is within the burst");
    }
    let reply = client.get(&format!("/balance?card_number={DEMO_CARD}")).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text);
    assert_eq!(reply.error_code(), "rate_limited");
    assert_eq!(reply.header("retry-after"), Some("1"));
    for _ in 0..20 {
        assert_eq!(client.get("/healthz").await.status, StatusCode::OK);
        assert_eq!(client.get("/readyz").await.status, StatusCode::OK);
    }
    assert_eq!(common::db_transactions(&server.sqlite()), 5);
}
