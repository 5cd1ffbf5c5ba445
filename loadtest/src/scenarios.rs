//! The three scenarios and the checks each applies to tallyd's answers (docs/CONTRACT.md).
//!
//! goose counts any non-2xx status as a failed request. The checks here turn the answers the contract allows
//! for a valid request (422 `insufficient_funds` always, 503 `queue_full` in the overload scenario) into
//! successes, and turn 200s whose body is wrong into failures, so that a run's error count is exactly the
//! number of answers tallyd should not have given.

use crate::cards;
use crate::tally::{self, Answer};
use goose::goose::GooseResponse;
use goose::metrics::GooseRequestMetric;
use goose::prelude::*;
use serde_json::{json, Value};

/// How a scenario treats `503 queue_full`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backpressure {
    /// The server should never be full under this load: a 503 is a failure.
    Unexpected,
    /// The scenario is meant to fill the queue: a well-formed 503 is an expected answer.
    Expected,
}

/// The realistic mix: `POST /transaction` 10 : `GET /balance` 2 : `GET /metrics` 1 over all seeded cards.
pub fn mix() -> Result<Scenario, GooseError> {
    Ok(scenario!("mix")
        .register_transaction(
            transaction!(mix_transaction)
                .set_name("transaction")
                .set_weight(10)?,
        )
        .register_transaction(transaction!(random_balance).set_name("balance").set_weight(2)?)
        .register_transaction(transaction!(scrape_metrics).set_name("metrics").set_weight(1)?))
}

/// Most transactions on a handful of cards ([`cards::HOT_CARDS`]), with balance reads of the same cards.
pub fn hot_card() -> Result<Scenario, GooseError> {
    Ok(scenario!("hotcard")
        .register_transaction(
            transaction!(hot_transaction)
                .set_name("transaction")
                .set_weight(10)?,
        )
        .register_transaction(transaction!(hot_balance).set_name("balance").set_weight(2)?))
}

/// The Flask processor's Locust file against a database imported from it: `POST /transaction` with its
/// card format (`6219 8619 NNNN 8640`) and amounts (-5,000 to 5,000), `GET /metrics` and `GET /`.
pub fn flask() -> Result<Scenario, GooseError> {
    Ok(scenario!("flask")
        .register_transaction(
            transaction!(flask_transaction)
                .set_name("transaction")
                .set_weight(10)?,
        )
        .register_transaction(transaction!(scrape_metrics).set_name("metrics").set_weight(1)?)
        .register_transaction(transaction!(live_page).set_name("live page").set_weight(1)?))
}

/// Transactions only, as fast as every user can send them, where `503 queue_full` is expected.
pub fn overload() -> Result<Scenario, GooseError> {
    Ok(
        scenario!("overload")
            .register_transaction(transaction!(overload_transaction).set_name("transaction")),
    )
}

async fn mix_transaction(user: &mut GooseUser) -> TransactionResult {
    post_transaction(user, cards::random_card(), Backpressure::Unexpected).await
}

async fn hot_transaction(user: &mut GooseUser) -> TransactionResult {
    post_transaction(user, cards::hot_or_random_card(), Backpressure::Unexpected).await
}

async fn flask_transaction(user: &mut GooseUser) -> TransactionResult {
    let (written, digits) = cards::random_flask_card();
    send_transaction(
        user,
        written,
        digits,
        cards::flask_amount(),
        Backpressure::Unexpected,
    )
    .await
}

/// The live page, which the Flask load test also fetched.
async fn live_page(user: &mut GooseUser) -> TransactionResult {
    let response = user.get("/").await?;
    let (mut request, reply) = read_reply(response).await;
    match reply {
        Some(reply) if reply.status == 200 && !reply.body.contains("<html") => user.set_failure(
            "GET / is not the live page",
            &mut request,
            None,
            Some(&reply.body),
        ),
        _ => Ok(()),
    }
}

async fn overload_transaction(user: &mut GooseUser) -> TransactionResult {
    tally::record_overload_sent();
    post_transaction(user, cards::random_card(), Backpressure::Expected).await
}

async fn random_balance(user: &mut GooseUser) -> TransactionResult {
    get_balance(user, cards::random_card()).await
}

async fn hot_balance(user: &mut GooseUser) -> TransactionResult {
    get_balance(user, cards::hot_or_random_card()).await
}

/// What the checks need of one HTTP answer, read whole.
struct Reply {
    status: u16,
    has_retry_after: bool,
    body: String,
}

/// Reads the answer's body. `None` means there was no answer (refused, reset, timed out): goose has already
/// counted that request as failed.
async fn read_reply(response: GooseResponse) -> (GooseRequestMetric, Option<Reply>) {
    let GooseResponse { request, response } = response;
    let Ok(response) = response else {
        return (request, None);
    };
    let status = response.status().as_u16();
    let has_retry_after = response.headers().contains_key("retry-after");
    let body = response.text().await.unwrap_or_default();
    let reply = Reply {
        status,
        has_retry_after,
        body,
    };
    (request, Some(reply))
}

/// The `error.code` of a contract error body, if the body is one.
fn error_code(body: &Value) -> Option<&str> {
    body.get("error")?.get("code")?.as_str()
}

/// Sends one deposit or withdrawal and checks the answer.
async fn post_transaction(
    user: &mut GooseUser,
    card_number: String,
    backpressure: Backpressure,
) -> TransactionResult {
    let digits = card_number.clone();
    send_transaction(user, card_number, digits, cards::random_amount(), backpressure).await
}

/// Sends one transaction for the card as written; a 200 must answer the card as `digits`.
async fn send_transaction(
    user: &mut GooseUser,
    written: String,
    card_number: String,
    amount: i64,
    backpressure: Backpressure,
) -> TransactionResult {
    let sent = json!({ "card_number": written, "amount": amount });
    let response = user.post_json("/transaction", &sent).await?;
    let (mut request, reply) = read_reply(response).await;
    let Some(reply) = reply else {
        tally::record(Answer::Unexpected);
        return Ok(());
    };
    let answer = classify_transaction(&reply, &card_number, amount, backpressure);
    tally::record(answer);
    match answer {
        Answer::Committed => Ok(()),
        Answer::InsufficientFunds | Answer::QueueFull => user.set_success(&mut request),
        Answer::Unexpected => {
            let tag = format!("POST /transaction answered {}", reply.status);
            user.set_failure(&tag, &mut request, None, Some(&reply.body))
        }
    }
}

/// Decides what one answer to `POST /transaction` means, per docs/CONTRACT.md.
fn classify_transaction(reply: &Reply, card_number: &str, amount: i64, backpressure: Backpressure) -> Answer {
    let Ok(body) = serde_json::from_str::<Value>(&reply.body) else {
        return Answer::Unexpected;
    };
    match reply.status {
        200 => {
            let committed = body["status"] == "committed"
                && body["card_number"] == card_number
                && body["amount"] == amount
                && body["id"].is_i64()
                && body["balance"].as_i64().is_some_and(|balance| balance >= 0);
            if committed {
                Answer::Committed
            } else {
                Answer::Unexpected
            }
        }
        422 if error_code(&body) == Some("insufficient_funds") && amount < 0 => Answer::InsufficientFunds,
        503 if backpressure == Backpressure::Expected
            && error_code(&body) == Some("queue_full")
            && reply.has_retry_after =>
        {
            Answer::QueueFull
        }
        _ => Answer::Unexpected,
    }
}

/// Reads one card's balance and checks the answer.
async fn get_balance(user: &mut GooseUser, card_number: String) -> TransactionResult {
    let path = format!("/balance?card_number={card_number}");
    let response = user.get_named(&path, "/balance").await?;
    let (mut request, reply) = read_reply(response).await;
    let Some(reply) = reply else {
        return Ok(());
    };
    if reply.status != 200 {
        // goose has already counted the status as a failure.
        return Ok(());
    }
    let body = serde_json::from_str::<Value>(&reply.body).unwrap_or_default();
    let well_formed = body["card_number"] == card_number.as_str()
        && body["balance"].as_i64().is_some_and(|balance| balance >= 0);
    if well_formed {
        Ok(())
    } else {
        user.set_failure("GET /balance body", &mut request, None, Some(&reply.body))
    }
}

/// Scrapes the Prometheus endpoint and checks that it speaks for tallyd.
async fn scrape_metrics(user: &mut GooseUser) -> TransactionResult {
    let response = user.get("/metrics").await?;
    let (mut request, reply) = read_reply(response).await;
    let Some(reply) = reply else {
        return Ok(());
    };
    if reply.status != 200 || reply.body.contains("tallyd_") {
        return Ok(());
    }
    user.set_failure(
        "GET /metrics without tallyd_ metrics",
        &mut request,
        None,
        Some(&reply.body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, has_retry_after: bool, body: &str) -> Reply {
        Reply {
            status,
            has_retry_after,
            body: body.to_string(),
        }
    }

    const CARD: &str = "4000000000000001";

    #[test]
    fn a_committed_answer_must_echo_the_request() {
        let good =
            r#"{"id":1,"card_number":"4000000000000001","amount":-5,"balance":100095,"status":"committed"}"#;
        assert_eq!(
            classify_transaction(&reply(200, false, good), CARD, -5, Backpressure::Unexpected),
            Answer::Committed
        );
        assert_eq!(
            classify_transaction(&reply(200, false, good), CARD, 5, Backpressure::Unexpected),
            Answer::Unexpected
        );
        let queued = r#"{"id":1,"card_number":"4000000000000001","amount":-5,"balance":1,"status":"queued"}"#;
        assert_eq!(
            classify_transaction(&reply(200, false, queued), CARD, -5, Backpressure::Unexpected),
            Answer::Unexpected
        );
    }

    #[test]
    fn insufficient_funds_is_expected_only_for_withdrawals() {
        let body = r#"{"error":{"code":"insufficient_funds","message":"no","balance":3}}"#;
        assert_eq!(
            classify_transaction(&reply(422, false, body), CARD, -5, Backpressure::Unexpected),
            Answer::InsufficientFunds
        );
        assert_eq!(
            classify_transaction(&reply(422, false, body), CARD, 5, Backpressure::Unexpected),
            Answer::Unexpected
        );
    }

    #[test]
    fn queue_full_is_expected_only_under_overload_and_with_retry_after() {
        let body = r#"{"error":{"code":"queue_full","message":"busy"}}"#;
        assert_eq!(
            classify_transaction(&reply(503, true, body), CARD, 5, Backpressure::Expected),
            Answer::QueueFull
        );
        assert_eq!(
            classify_transaction(&reply(503, false, body), CARD, 5, Backpressure::Expected),
            Answer::Unexpected
        );
        assert_eq!(
            classify_transaction(&reply(503, true, body), CARD, 5, Backpressure::Unexpected),
            Answer::Unexpected
        );
        let storage = r#"{"error":{"code":"storage_unavailable","message":"disk"}}"#;
        assert_eq!(
            classify_transaction(&reply(503, true, storage), CARD, 5, Backpressure::Expected),
            Answer::Unexpected
        );
    }
}
