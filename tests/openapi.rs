//! `docs/openapi.json` against the real server: the bug this guards against is a document that
//! drifts from what tallyd answers. Every operation is called with its examples and with the
//! requests that provoke each of its documented statuses; every answer must have a documented
//! status, content type and headers, and its body must validate against the documented schema
//! (with `additionalProperties: false` on every object, so that a field added to or dropped from a
//! response fails here). Every documented status must be provoked here, or be listed in
//! [`NOT_PROVOKED_HERE`] with the suite that provokes it. Every documented query parameter and
//! header must be read by its route, and every example in the document must fit its own schema.
//!
//! The structural half (routes, error codes and their statuses, request fields) is in
//! `src/http/openapi.rs`'s unit tests, which read the code's own tables.

mod common;
#[path = "common/raw.rs"]
mod raw;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, StatusCode};
use serde_json::{json, Value};

use common::{Client, Reply, Server, DEMO_CARD};

const DOCUMENT: &str = include_str!("../docs/openapi.json");
/// Small, so that a 413 costs little to provoke.
const BODY_LIMIT: usize = 4096;
/// Short, so that a 408 costs little to provoke; long enough for a whole body on a busy machine.
const REQUEST_TIMEOUT_MS: u64 = 1000;

/// Small, so that a bulk request over the item limit (413) is short; with it the bulk body limit is
/// `BODY_LIMIT` too (1,024 bytes an item, at least --body-limit-bytes).
const BULK_ITEMS_MAX: usize = 4;

/// Documented statuses that need a condition this file does not make, and where they are made.
const NOT_PROVOKED_HERE: &[(&str, &str)] = &[
    ("500", "a worker that stopped: a bug, never provoked"),
    (
        "503",
        "a full queue (tests/overload.rs), a full disk (tests/disk.rs), a failed commit",
    ),
];

/// Headers tallyd adds to some answers that the document must describe where they appear.
const API_HEADERS: &[&str] = &["idempotent-replayed", "retry-after", "www-authenticate"];

fn document() -> Value {
    serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON")
}

/// Follows a local `$ref` until a value that is not one.
fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => resolve(doc, doc.pointer(&reference[1..]).expect("the $ref exists")),
        None => value,
    }
}

/// Validates `instance` against `schema`, which may `$ref` the document's components.
fn schema_errors(doc: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    let mut root = schema.clone();
    root.as_object_mut()
        .expect("a schema object")
        .insert("components".into(), doc["components"].clone());
    let validator = jsonschema::draft202012::new(&root).expect("a valid JSON Schema");
    validator
        .iter_errors(instance)
        .map(|error| format!("{} at {}", error, error.instance_path()))
        .collect()
}

/// What one run has seen: (METHOD, template, status) of every answer checked.
struct Checker {
    doc: Value,
    seen: BTreeSet<(String, String, String)>,
}

impl Checker {
    fn new() -> Self {
        Checker {
            doc: document(),
            seen: BTreeSet::new(),
        }
    }

    /// The documented path template that `path` (without its query) falls under.
    fn template(&self, path: &str) -> String {
        let path = path.split('?').next().unwrap();
        let segments: Vec<&str> = path.split('/').collect();
        self.doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .find(|template| {
                let parts: Vec<&str> = template.split('/').collect();
                parts.len() == segments.len()
                    && parts.iter().zip(&segments).all(|(part, segment)| {
                        part == segment || (part.starts_with('{') && !segment.is_empty())
                    })
            })
            .unwrap_or_else(|| panic!("{path} is under no documented path"))
            .clone()
    }

    /// Checks one answer against the document and records it.
    fn check(&mut self, method: &Method, path: &str, reply: &Reply) {
        let template = self.template(path);
        let method = method.as_str().to_ascii_lowercase();
        let status = reply.status.as_str().to_owned();
        let what = format!("{} {path} -> {status} {}", method.to_uppercase(), reply.text);
        let operation = &self.doc["paths"][&template][&method];
        assert!(operation.is_object(), "{what}: the operation is not documented");
        let response = resolve(&self.doc, &operation["responses"][&status]);
        assert!(response.is_object(), "{what}: the status is not documented");
        let content_type = reply.header("content-type").expect("a content-type");
        let media = content_type.split(';').next().unwrap().trim();
        let body = &response["content"][media];
        assert!(
            body.is_object(),
            "{what}: content-type {content_type} is not documented"
        );
        if media == "application/json" {
            let errors = schema_errors(&self.doc, &body["schema"], &reply.json());
            assert!(errors.is_empty(), "{what}: does not fit its schema: {errors:#?}");
        }
        for header in API_HEADERS {
            if reply.header(header).is_some() {
                let documented = response["headers"]
                    .as_object()
                    .is_some_and(|headers| headers.keys().any(|h| h.eq_ignore_ascii_case(header)));
                assert!(
                    documented,
                    "{what}: sends {header}, which its response does not document"
                );
            }
        }
        self.seen.insert((method, template, status));
    }

    /// `METHOD path` whose body never arrives: the server answers 408 once --request-timeout-ms passes.
    fn stalled(&mut self, addr: std::net::SocketAddr, method: &Method, path: &str) {
        let mut conn = raw::RawConn::connect(addr);
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: tallyd\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
        );
        assert!(conn.send(head.as_bytes()), "sending the head of {path}");
        let raw::Answer::Response(response) = conn.read_answer(Duration::from_secs(15)) else {
            panic!("{method} {path} with a stalled body got no answer");
        };
        let mut headers = HeaderMap::new();
        for (name, value) in &response.headers {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        let reply = Reply {
            status: StatusCode::from_u16(response.status).unwrap(),
            headers,
            text: response.text(),
            body: Bytes::from(response.body),
        };
        assert_eq!(reply.status, 408, "{method} {path}: {}", reply.text);
        self.check(method, path, &reply);
    }

    async fn get(&mut self, client: &mut Client, path: &str) -> Reply {
        let reply = client.get(path).await;
        self.check(&Method::GET, path, &reply);
        reply
    }

    async fn post(&mut self, client: &mut Client, path: &str, body: &str, headers: &[(&str, &str)]) -> Reply {
        let reply = client.post_with(path, body, headers).await;
        self.check(&Method::POST, path, &reply);
        reply
    }

    async fn patch(
        &mut self,
        client: &mut Client,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = client.post_request(path, body, headers);
        *request.method_mut() = Method::PATCH;
        let reply = client.request(request).await;
        self.check(&Method::PATCH, path, &reply);
        reply
    }

    /// `POST /holds` of `amount` on the demo card, which must be placed: its id.
    async fn place_hold(&mut self, client: &mut Client, amount: i64) -> i64 {
        let body = format!(r#"{{"card_number":"{DEMO_CARD}","amount":{amount}}}"#);
        let reply = self.post(client, "/holds", &body, &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        reply.i64("id")
    }

    /// Every documented (METHOD, template, status) this run has not seen.
    fn unseen(&self) -> BTreeSet<(String, String, String)> {
        let mut unseen = BTreeSet::new();
        for (template, item) in self.doc["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                for status in operation["responses"].as_object().unwrap().keys() {
                    let key = (method.clone(), template.clone(), status.clone());
                    if !self.seen.contains(&key) {
                        unseen.insert(key);
                    }
                }
            }
        }
        unseen
    }
}

fn body_examples(doc: &Value, path: &str) -> Vec<(String, Value)> {
    body_examples_of(doc, "post", path)
}

fn body_examples_of(doc: &Value, method: &str, path: &str) -> Vec<(String, Value)> {
    doc["paths"][path][method]["requestBody"]["content"]["application/json"]["examples"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, example)| (name.clone(), example["value"].clone()))
        .collect()
}

#[tokio::test]
async fn every_answer_of_every_operation_matches_the_document() {
    let server = Server::start(&[
        "--body-limit-bytes",
        &BODY_LIMIT.to_string(),
        "--request-timeout-ms",
        &REQUEST_TIMEOUT_MS.to_string(),
        "--bulk-items-max",
        &BULK_ITEMS_MAX.to_string(),
    ]);
    let mut client = server.client().await;
    let mut check = Checker::new();
    let doc = check.doc.clone();
    let too_large = format!(
        r#"{{"card_number":"{DEMO_CARD}","amount":1{}}}"#,
        " ".repeat(BODY_LIMIT)
    );
    let form = [("content-type", "application/x-www-form-urlencoded")];

    // The document describes itself, byte for byte.
    let served = check.get(&mut client, "/openapi.json").await;
    assert_eq!(
        served.text, DOCUMENT,
        "GET /openapi.json is not docs/openapi.json"
    );

    // POST /transaction: its examples, then each refusal.
    for (name, body) in body_examples(&doc, "/transaction") {
        let reply = check
            .post(&mut client, "/transaction", &body.to_string(), &[])
            .await;
        assert!(
            matches!(reply.status.as_u16(), 200 | 422),
            "example {name}: {}",
            reply.text
        );
    }
    let deposit = |card: &str, amount: i64| format!(r#"{{"card_number":"{card}","amount":{amount}}}"#);
    check
        .post(&mut client, "/transaction", &deposit("4000000000999999", 5), &[])
        .await;
    check.post(&mut client, "/transaction", "{}", &[]).await;
    check.post(&mut client, "/transaction", &too_large, &[]).await;
    check
        .post(&mut client, "/transaction", &deposit(DEMO_CARD, 5), &form)
        .await;
    let keyed = [("idempotency-key", "deposit-7")];
    let first = check
        .post(&mut client, "/transaction", &deposit(DEMO_CARD, 7), &keyed)
        .await;
    let again = check
        .post(&mut client, "/transaction", &deposit(DEMO_CARD, 7), &keyed)
        .await;
    assert!(again.replayed() && again.body == first.body, "{}", again.text);
    let reused = check
        .post(&mut client, "/transaction", &deposit(DEMO_CARD, 8), &keyed)
        .await;
    assert_eq!(reused.error_code(), "idempotency_key_reused");

    // POST /accounts.
    let card = r#"{"card_number":"4111111111111111"}"#;
    let opened = check
        .post(&mut client, "/accounts", card, &[("idempotency-key", "open-1")])
        .await;
    assert_eq!(opened.status, 201, "{}", opened.text);
    let replayed = check
        .post(&mut client, "/accounts", card, &[("idempotency-key", "open-1")])
        .await;
    assert!(replayed.replayed() && replayed.status == 201);
    check.post(&mut client, "/accounts", card, &[]).await;
    let other = r#"{"card_number":"4111111111111112"}"#;
    check
        .post(&mut client, "/accounts", other, &[("idempotency-key", "open-1")])
        .await;
    check.post(&mut client, "/accounts", r#"{"card":"1"}"#, &[]).await;
    check.post(&mut client, "/accounts", &too_large, &[]).await;
    check.post(&mut client, "/accounts", card, &form).await;

    // POST /transfers: the examples, a replay (the key the README uses), each refusal.
    for (name, body) in body_examples(&doc, "/transfers") {
        let reply = check
            .post(&mut client, "/transfers", &body.to_string(), &[])
            .await;
        assert_eq!(reply.status, 200, "example {name}: {}", reply.text);
    }
    let order =
        r#"{"source":"1234567890","destination":"4111111111111111","amount":2500,"reference":"order 1001"}"#;
    let key = [("idempotency-key", "order-1001")];
    check.post(&mut client, "/transfers", order, &key).await;
    assert!(check
        .post(&mut client, "/transfers", order, &key)
        .await
        .replayed());
    let transfer = |source: &str, destination: &str, amount: i64| {
        format!(r#"{{"source":"{source}","destination":"{destination}","amount":{amount}}}"#)
    };
    let missing = check
        .post(
            &mut client,
            "/transfers",
            &transfer(DEMO_CARD, "4000000000999999", 1),
            &[],
        )
        .await;
    assert_eq!(missing.json()["error"]["card_number"], "4000000000999999");
    let poor = transfer("4111111111111111", DEMO_CARD, 1_000_000_000);
    check.post(&mut client, "/transfers", &poor, &[]).await;
    check
        .post(&mut client, "/transfers", &transfer(DEMO_CARD, DEMO_CARD, 1), &[])
        .await;
    check.post(&mut client, "/transfers", &too_large, &[]).await;
    check
        .post(
            &mut client,
            "/transfers",
            &transfer(DEMO_CARD, "4111111111111111", 1),
            &form,
        )
        .await;

    // PATCH /accounts/{card}: the examples on the account opened above, then each refusal.
    let limit = |limit: i64| format!(r#"{{"overdraft_limit":{limit}}}"#);
    let opened_card = "/accounts/4111111111111111";
    for (name, body) in body_examples_of(&doc, "patch", "/accounts/{card}") {
        let reply = check
            .patch(&mut client, opened_card, &body.to_string(), &[])
            .await;
        assert_eq!(reply.status, 200, "example {name}: {}", reply.text);
        assert_eq!(
            reply.json()["overdraft_limit"],
            body["overdraft_limit"],
            "{}",
            reply.text
        );
    }
    let keyed = [("idempotency-key", "limit-1")];
    let first = check.patch(&mut client, opened_card, &limit(2000), &keyed).await;
    let again = check.patch(&mut client, opened_card, &limit(2000), &keyed).await;
    assert!(again.replayed() && again.body == first.body, "{}", again.text);
    let reused = check.patch(&mut client, opened_card, &limit(3000), &keyed).await;
    assert_eq!(reused.error_code(), "idempotency_key_reused");
    // An account opened with a limit, overdrawn within it: a limit below what it uses is refused.
    let credit_card = "4111111111111113";
    let opened = check
        .post(
            &mut client,
            "/accounts",
            &format!(r#"{{"card_number":"{credit_card}","overdraft_limit":1000}}"#),
            &[],
        )
        .await;
    assert_eq!(opened.status, 201, "{}", opened.text);
    assert_eq!(
        (opened.i64("overdraft_limit"), opened.i64("available")),
        (1000, 1000),
        "{}",
        opened.text
    );
    let invalid = check
        .post(
            &mut client,
            "/accounts",
            r#"{"card_number":"4111111111111114","overdraft_limit":-1}"#,
            &[],
        )
        .await;
    assert_eq!(invalid.error_code(), "invalid_limit");
    let overdrawn = check
        .post(&mut client, "/transaction", &deposit(credit_card, -600), &[])
        .await;
    assert_eq!(overdrawn.i64("balance"), -600, "{}", overdrawn.text);
    let account = check.get(&mut client, &format!("/accounts/{credit_card}")).await;
    assert_eq!(
        (
            account.i64("held"),
            account.i64("overdraft_limit"),
            account.i64("available")
        ),
        (0, 1000, 400),
        "{}",
        account.text
    );
    let below = check
        .patch(&mut client, &format!("/accounts/{credit_card}"), &limit(100), &[])
        .await;
    assert_eq!(below.error_code(), "limit_below_usage");
    assert_eq!(below.json()["error"]["balance"], -600, "{}", below.text);
    let invalid = check
        .patch(&mut client, &format!("/accounts/{credit_card}"), &limit(-1), &[])
        .await;
    assert_eq!(invalid.error_code(), "invalid_limit");
    check
        .patch(&mut client, "/accounts/4000000000999999", &limit(1), &[])
        .await;
    check.patch(&mut client, "/accounts/12ab", &limit(1), &[]).await;
    check.patch(&mut client, opened_card, &too_large, &[]).await;
    check.patch(&mut client, opened_card, &limit(1), &form).await;

    // POST /holds: the examples (one pays 4111111111111111 on capture), a hold that expires in a
    // second (captured and voided below, once it has), then each refusal.
    let hold = |card: &str, amount: i64, extra: &str| {
        format!(r#"{{"card_number":"{card}","amount":{amount}{extra}}}"#)
    };
    let mut examples = Vec::new();
    for (name, body) in body_examples(&doc, "/holds") {
        let reply = check.post(&mut client, "/holds", &body.to_string(), &[]).await;
        assert_eq!(reply.status, 200, "example {name}: {}", reply.text);
        assert_eq!(reply.json()["status"], "pending", "{}", reply.text);
        examples.push(reply.json());
    }
    let expiring = check
        .post(
            &mut client,
            "/holds",
            &hold(DEMO_CARD, 10, r#","expires_in_s":1"#),
            &[],
        )
        .await;
    let expires_at_ms = expiring.i64("expires_at_ms");
    let expiring = expiring.i64("id");
    let keyed = [("idempotency-key", "hold-1")];
    let first = check
        .post(&mut client, "/holds", &hold(DEMO_CARD, 5, ""), &keyed)
        .await;
    let again = check
        .post(&mut client, "/holds", &hold(DEMO_CARD, 5, ""), &keyed)
        .await;
    assert!(again.replayed() && again.body == first.body, "{}", again.text);
    let reused = check
        .post(&mut client, "/holds", &hold(DEMO_CARD, 6, ""), &keyed)
        .await;
    assert_eq!(reused.error_code(), "idempotency_key_reused");
    check
        .post(&mut client, "/holds", &hold("4000000000999999", 1, ""), &[])
        .await;
    let nowhere = check
        .post(
            &mut client,
            "/holds",
            &hold(DEMO_CARD, 1, r#","destination":"4000000000999999""#),
            &[],
        )
        .await;
    assert_eq!(nowhere.error_code(), "card_not_found");
    let poor = check
        .post(&mut client, "/holds", &hold(DEMO_CARD, 1_000_000_000, ""), &[])
        .await;
    assert_eq!(poor.error_code(), "insufficient_funds");
    assert!(
        poor.json()["error"]["available"].is_i64(),
        "with holds pending, available differs from the balance: {}",
        poor.text
    );
    let never = check
        .post(
            &mut client,
            "/holds",
            &hold(DEMO_CARD, 1, r#","expires_in_s":0"#),
            &[],
        )
        .await;
    assert_eq!(never.error_code(), "invalid_expiry");
    let itself = check
        .post(
            &mut client,
            "/holds",
            &hold(DEMO_CARD, 1, &format!(r#","destination":"{DEMO_CARD}""#)),
            &[],
        )
        .await;
    assert_eq!(itself.error_code(), "same_account");
    check.post(&mut client, "/holds", &too_large, &[]).await;
    check
        .post(&mut client, "/holds", &hold(DEMO_CARD, 1, ""), &form)
        .await;

    // POST /holds/{id}/capture and /void: each example on a hold of its own, an empty body, a
    // capture that pays a card, then each refusal.
    let mut captured = 0;
    for (name, body) in body_examples(&doc, "/holds/{id}/capture") {
        let id = check.place_hold(&mut client, 2000).await;
        let reply = check
            .post(
                &mut client,
                &format!("/holds/{id}/capture"),
                &body.to_string(),
                &[],
            )
            .await;
        assert_eq!(reply.status, 200, "example {name}: {}", reply.text);
        assert_eq!(reply.json()["status"], "captured", "{}", reply.text);
        captured = id;
    }
    let id = check.place_hold(&mut client, 300).await;
    let whole = check
        .post(&mut client, &format!("/holds/{id}/capture"), "", &[])
        .await;
    assert_eq!(
        whole.i64("captured_amount"),
        300,
        "an empty body captures all: {}",
        whole.text
    );
    let order = examples
        .iter()
        .find(|hold| hold["destination"].is_string())
        .expect("an example of POST /holds pays a card");
    let paid = check
        .post(
            &mut client,
            &format!("/holds/{}/capture", order["id"]),
            r#"{"amount":1500}"#,
            &[],
        )
        .await;
    assert_eq!(paid.i64("captured_amount"), 1500, "{}", paid.text);
    let transfer_id = paid.i64("transaction_id");
    let posted = check
        .get(&mut client, &format!("/transactions/{transfer_id}"))
        .await;
    assert_eq!(posted.json()["kind"], "transfer", "{}", posted.text);
    let twice = check
        .post(&mut client, &format!("/holds/{captured}/capture"), "{}", &[])
        .await;
    assert_eq!(twice.error_code(), "hold_captured");
    let late = check
        .post(&mut client, &format!("/holds/{captured}/void"), "", &[])
        .await;
    assert_eq!(late.error_code(), "hold_captured");
    let mut voided = 0;
    for (name, body) in body_examples(&doc, "/holds/{id}/void") {
        let id = check.place_hold(&mut client, 100).await;
        let reply = check
            .post(&mut client, &format!("/holds/{id}/void"), &body.to_string(), &[])
            .await;
        assert_eq!(reply.status, 200, "example {name}: {}", reply.text);
        assert_eq!(reply.json()["status"], "voided", "{}", reply.text);
        voided = id;
    }
    let after_void = check
        .post(&mut client, &format!("/holds/{voided}/capture"), "", &[])
        .await;
    assert_eq!(after_void.error_code(), "hold_voided");
    let id = check.place_hold(&mut client, 100).await;
    let more = check
        .post(
            &mut client,
            &format!("/holds/{id}/capture"),
            r#"{"amount":101}"#,
            &[],
        )
        .await;
    assert_eq!(more.error_code(), "capture_exceeds_hold");
    let keyed = [("idempotency-key", "void-1")];
    let first = check
        .post(&mut client, &format!("/holds/{id}/void"), "", &keyed)
        .await;
    let again = check
        .post(&mut client, &format!("/holds/{id}/void"), "", &keyed)
        .await;
    assert!(again.replayed() && again.body == first.body, "{}", again.text);
    let reused = check
        .post(&mut client, &format!("/holds/{voided}/void"), "", &keyed)
        .await;
    assert_eq!(reused.error_code(), "idempotency_key_reused");
    for action in ["capture", "void"] {
        let at = |id: &str| format!("/holds/{id}/{action}");
        check.post(&mut client, &at("999999"), "", &[]).await;
        let not_an_id = check.post(&mut client, &at("x"), "", &[]).await;
        assert_eq!(not_an_id.error_code(), "invalid_parameter");
        check.post(&mut client, &at("1"), &too_large, &[]).await;
        check.post(&mut client, &at("1"), "{}", &form).await;
    }
    let zero = check
        .post(
            &mut client,
            &format!("/holds/{id}/capture"),
            r#"{"amount":0}"#,
            &[],
        )
        .await;
    assert_eq!(zero.error_code(), "invalid_amount");
    let field = check
        .post(&mut client, &format!("/holds/{id}/void"), r#"{"amount":1}"#, &[])
        .await;
    assert_eq!(field.error_code(), "unknown_field");
    // The hold placed with a second to live: refused as expired, whether or not the sweeper has
    // marked it yet.
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let wait_ms = (expires_at_ms - now_ms() + 20).max(0);
    tokio::time::sleep(Duration::from_millis(wait_ms as u64)).await;
    for action in ["capture", "void"] {
        let reply = check
            .post(&mut client, &format!("/holds/{expiring}/{action}"), "", &[])
            .await;
        assert_eq!(reply.error_code(), "hold_expired", "{action}");
    }

    // GET /holds/{id} and an account's holds.
    let shown = check.get(&mut client, &format!("/holds/{captured}")).await;
    assert_eq!(shown.json()["status"], "captured", "{}", shown.text);
    let pending = check
        .get(&mut client, "/accounts/1234567890/holds?status=pending&limit=1")
        .await;
    assert_eq!(pending.json()["data"][0]["status"], "pending", "{}", pending.text);
    assert_eq!(pending.json()["has_more"], true, "{}", pending.text);
    let newest = pending.json()["data"][0]["id"].clone();
    for path in [
        "/holds/x".to_owned(),
        "/holds/999999".to_owned(),
        "/accounts/1234567890/holds".to_owned(),
        format!("/accounts/1234567890/holds?limit=2&starting_after={newest}"),
        "/accounts/1234567890/holds?status=captured".to_owned(),
        "/accounts/1234567890/holds?status=open".to_owned(),
        "/accounts/1234567890/holds?limit=101".to_owned(),
        "/accounts/12ab/holds".to_owned(),
        "/accounts/4000000000999999/holds".to_owned(),
    ] {
        check.get(&mut client, &path).await;
    }

    // POST /batches: the examples, a hold placed and captured in one batch, all or nothing, and
    // each refusal.
    for (name, body) in body_examples(&doc, "/batches") {
        let reply = check.post(&mut client, "/batches", &body.to_string(), &[]).await;
        let expected: &[u16] = if name == "payout" { &[200] } else { &[200, 422] };
        assert!(
            expected.contains(&reply.status.as_u16()),
            "example {name}: {}",
            reply.text
        );
    }
    let next_hold = check.place_hold(&mut client, 1).await + 1;
    let together = format!(
        r#"{{"items":[{},{{"type":"capture","hold_id":{next_hold},"amount":20}}]}}"#,
        hold(DEMO_CARD, 50, r#","type":"hold""#)
    );
    let both = check.post(&mut client, "/batches", &together, &[]).await;
    assert_eq!(both.status, 200, "{}", both.text);
    assert_eq!(both.json()["results"][1]["status"], "captured", "{}", both.text);
    let before = client.balance(DEMO_CARD).await;
    let failing = format!(
        r#"{{"items":[{},{}]}}"#,
        r#"{"type":"transaction","card_number":"1234567890","amount":5}"#,
        r#"{"type":"transfer","source":"1234567890","destination":"4000000000999999","amount":1}"#
    );
    let failed = check.post(&mut client, "/batches", &failing, &[]).await;
    let body = failed.json();
    assert_eq!(
        (&body["error"]["code"], &body["error"]["index"]),
        (&json!("batch_failed"), &json!(1)),
        "{}",
        failed.text
    );
    assert_eq!(body["results"][0]["error"]["code"], "linked_item_failed");
    assert_eq!(body["results"][1]["error"]["card_number"], "4000000000999999");
    assert_eq!(
        client.balance(DEMO_CARD).await,
        before,
        "a failed batch moved money"
    );
    let poor = check
        .post(
            &mut client,
            "/batches",
            &format!(
                r#"{{"items":[{}]}}"#,
                hold(DEMO_CARD, 1_000_000_000, r#","type":"hold""#)
            ),
            &[],
        )
        .await;
    assert_eq!(poor.json()["results"][0]["error"]["code"], "insufficient_funds");
    let keyed = [("idempotency-key", "batch-1")];
    let one = |amount: i64| {
        format!(r#"{{"items":[{{"type":"transaction","card_number":"{DEMO_CARD}","amount":{amount}}}]}}"#)
    };
    let first = check.post(&mut client, "/batches", &one(3), &keyed).await;
    let again = check.post(&mut client, "/batches", &one(3), &keyed).await;
    assert!(again.replayed() && again.body == first.body, "{}", again.text);
    let reused = check.post(&mut client, "/batches", &one(4), &keyed).await;
    assert_eq!(reused.error_code(), "idempotency_key_reused");
    for (body, code) in [
        (r#"{"items":[]}"#.to_owned(), "invalid_batch"),
        (r#"{"items":[{"type":"refund"}]}"#.to_owned(), "invalid_batch"),
        (r#"{"items":[7]}"#.to_owned(), "invalid_batch"),
        (
            format!(
                r#"{{"items":[{}]}}"#,
                hold(DEMO_CARD, 1, r#","type":"hold","expires_in_s":0"#)
            ),
            "invalid_expiry",
        ),
    ] {
        let reply = check.post(&mut client, "/batches", &body, &[]).await;
        assert_eq!(reply.error_code(), code, "{body}: {}", reply.text);
    }
    let item = check
        .post(
            &mut client,
            "/batches",
            r#"{"items":[{"type":"void","hold_id":0}]}"#,
            &[],
        )
        .await;
    assert!(
        item.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("items[0]: "),
        "{}",
        item.text
    );
    check.post(&mut client, "/batches", &too_large, &[]).await;
    check.post(&mut client, "/batches", &one(1), &form).await;

    // POST /transfers/bulk: the examples, a whole replay, the request key reused, a bad item, too
    // many items, a refused media type.
    for (name, body) in body_examples_of(&doc, "post", "/transfers/bulk") {
        let reply = check
            .post(&mut client, "/transfers/bulk", &body.to_string(), &[])
            .await;
        assert_eq!(reply.status, 200, "example {name}: {}", reply.text);
    }
    let bulk = |items: &[String]| format!(r#"{{"transfers":[{}]}}"#, items.join(","));
    let payment = transfer(DEMO_CARD, "4111111111111111", 3);
    let refused = transfer("4111111111111111", DEMO_CARD, 1_000_000_000);
    let lost = transfer(DEMO_CARD, "4000000000999999", 1);
    let keyed_item = r#"{"source":"1234567890","destination":"4111111111111111","amount":4,"idempotency_key":"order-1001-b"}"#;
    let mixed = bulk(&[payment.clone(), refused, lost, keyed_item.to_owned()]);
    let whole = [("idempotency-key", "bulk-1")];
    let first = check.post(&mut client, "/transfers/bulk", &mixed, &whole).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let again = check.post(&mut client, "/transfers/bulk", &mixed, &whole).await;
    assert!(again.replayed() && again.body == first.body, "{}", again.text);
    let items_again = check
        .post(
            &mut client,
            "/transfers/bulk",
            &bulk(&[keyed_item.to_owned()]),
            &[],
        )
        .await;
    assert_eq!(
        items_again.json()["results"][0]["replayed"],
        true,
        "{}",
        items_again.text
    );
    let reused = check
        .post(
            &mut client,
            "/transfers/bulk",
            &bulk(std::slice::from_ref(&payment)),
            &whole,
        )
        .await;
    assert_eq!(reused.error_code(), "idempotency_key_reused");
    let bad = check
        .post(
            &mut client,
            "/transfers/bulk",
            &bulk(&[payment.clone(), transfer(DEMO_CARD, DEMO_CARD, 1)]),
            &[],
        )
        .await;
    assert_eq!(bad.json()["error"]["index"], 1, "{}", bad.text);
    check
        .post(&mut client, "/transfers/bulk", r#"{"transfers":[]}"#, &[])
        .await;
    let over = vec![payment.clone(); BULK_ITEMS_MAX + 1];
    let over = check
        .post(&mut client, "/transfers/bulk", &bulk(&over), &[])
        .await;
    assert_eq!(over.status, 413, "{}", over.text);
    check
        .post(
            &mut client,
            "/transfers/bulk",
            &bulk(std::slice::from_ref(&payment)),
            &form,
        )
        .await;

    // Every GET, found and not found and refused.
    for path in [
        "/accounts/1234567890",
        "/accounts/4111111111111111",
        "/accounts/12ab",
        "/accounts/4000000000999999",
        "/accounts/1234567890/entries?limit=2",
        "/accounts/1234567890/entries?limit=2&starting_after=2",
        "/accounts/1234567890/entries?limit=0",
        "/accounts/4000000000999999/entries",
        "/transactions?idempotency_key=order-1001",
        "/transactions",
        "/transactions?idempotency_key=order-9",
        "/transactions/1",
        "/transactions/x",
        "/transactions/999999",
        "/balance?card_number=1234567890",
        "/balance?card_number=1234567890&at=1",
        "/balance",
        "/balance?card_number=4000000000999999",
        "/metrics",
        "/stats",
        "/healthz",
        "/readyz",
        "/",
    ] {
        check.get(&mut client, path).await;
    }
    for (method, path) in [
        (Method::POST, "/transaction"),
        (Method::POST, "/transfers"),
        (Method::POST, "/accounts"),
        (Method::PATCH, "/accounts/1234567890"),
        (Method::POST, "/holds"),
        (Method::POST, "/holds/1/capture"),
        (Method::POST, "/holds/1/void"),
        (Method::POST, "/batches"),
        (Method::POST, "/transfers/bulk"),
    ] {
        check.stalled(server.addr, &method, path);
    }
    let legs = check.get(&mut client, "/transactions/1").await.json()["legs"].clone();
    assert_eq!(
        legs[0]["card_number"], "@world",
        "a deposit comes from @world: {legs}"
    );

    // With API keys and a rate limit: 401 without a key on every operation that needs one, 403
    // for a read key on each POST and for a write key on the PATCH (which needs admin), 429 on
    // every operation once the key is over its limit.
    let keyed_dir = tempfile::tempdir().unwrap();
    let keyed_db = keyed_dir.path().join("users.db");
    let read_key = common::create_key(&keyed_db, "reader", "read", &[]);
    let write_key = common::create_key(&keyed_db, "writer", "write", &[]);
    let admin_key = common::create_key(&keyed_db, "admin", "admin", &[]);
    let keyed = Server::start_on(
        &keyed_db,
        &["--rate-limit-per-s", "1", "--rate-limit-burst", "40"],
    );
    let transfer = common::transfer_body(DEMO_CARD, "4000000000000001", 1);
    let posts = [
        ("/transaction", deposit(DEMO_CARD, 1)),
        ("/transfers/bulk", format!(r#"{{"transfers":[{transfer}]}}"#)),
        ("/transfers", transfer),
        ("/accounts", r#"{"card_number":"5555444433332222"}"#.to_owned()),
        ("/holds", deposit(DEMO_CARD, 1)),
        ("/holds/1/capture", "{}".to_owned()),
        ("/holds/1/void", "{}".to_owned()),
        ("/batches", one(1)),
    ];
    let account = format!("/accounts/{DEMO_CARD}");
    let gets = [
        format!("/accounts/{DEMO_CARD}"),
        format!("/accounts/{DEMO_CARD}/entries"),
        format!("/accounts/{DEMO_CARD}/holds"),
        "/holds/1".to_owned(),
        "/transactions?idempotency_key=k".to_owned(),
        "/transactions/1".to_owned(),
        format!("/balance?card_number={DEMO_CARD}"),
        "/metrics".to_owned(),
        "/stats".to_owned(),
        "/".to_owned(),
    ];
    let mut anonymous = keyed.client().await;
    for (path, body) in &posts {
        let reply = check.post(&mut anonymous, path, body, &[]).await;
        assert_eq!(reply.status, 401, "POST {path}: {}", reply.text);
    }
    for path in &gets {
        let reply = check.get(&mut anonymous, path).await;
        assert_eq!(reply.status, 401, "GET {path}: {}", reply.text);
    }
    let reply = check.patch(&mut anonymous, &account, &limit(1), &[]).await;
    assert_eq!(reply.status, 401, "PATCH {account}: {}", reply.text);
    let mut reader = keyed.client().await.with_bearer(&read_key);
    for (path, body) in &posts {
        let reply = check.post(&mut reader, path, body, &[]).await;
        assert_eq!(reply.status, 403, "POST {path}: {}", reply.text);
    }
    let reply = check.patch(&mut reader, &account, &limit(1), &[]).await;
    assert_eq!(reply.status, 403, "PATCH {account}: {}", reply.text);
    let mut writer = keyed.client().await.with_bearer(&write_key);
    let reply = check.patch(&mut writer, &account, &limit(1), &[]).await;
    assert_eq!(
        reply.status, 403,
        "PATCH {account} with a write key: {}",
        reply.text
    );
    assert!(
        reply
            .header("www-authenticate")
            .is_some_and(|h| h.contains("scope=\"admin\"")),
        "{:?}",
        reply.headers
    );
    let mut admin = keyed.client().await.with_bearer(&admin_key);
    let reply = check.patch(&mut admin, &account, &limit(1), &[]).await;
    assert_eq!(
        reply.status, 200,
        "PATCH {account} with an admin key: {}",
        reply.text
    );
    // Spend the rest of the burst, then every operation is refused with 429.
    let mut spent = 0;
    while reader.get("/stats").await.status != 429 {
        spent += 1;
        assert!(spent <= 100, "the rate limit never refused");
    }
    for (path, body) in &posts {
        let reply = check.post(&mut reader, path, body, &[]).await;
        assert_eq!(reply.status, 429, "POST {path}: {}", reply.text);
    }
    let reply = check.patch(&mut reader, &account, &limit(1), &[]).await;
    assert_eq!(reply.status, 429, "PATCH {account}: {}", reply.text);
    for path in &gets {
        let reply = check.get(&mut reader, path).await;
        assert_eq!(reply.status, 429, "GET {path}: {}", reply.text);
    }

    let unseen = check.unseen();
    let excused: BTreeSet<&str> = NOT_PROVOKED_HERE.iter().map(|(status, _)| *status).collect();
    let unexplained: Vec<_> = unseen
        .iter()
        .filter(|(_, _, s)| !excused.contains(s.as_str()))
        .collect();
    assert!(
        unexplained.is_empty(),
        "documented and never provoked: {unexplained:?}"
    );
    let stale: Vec<_> = excused
        .iter()
        .filter(|status| !unseen.iter().any(|(_, _, s)| s == *status))
        .collect();
    assert!(
        stale.is_empty(),
        "NOT_PROVOKED_HERE lists statuses that were provoked: {stale:?}"
    );
}

/// A documented query parameter or header that its route ignored would be a lie: each is sent
/// twice, which every route refuses with 400 naming it, so a 400 proves the route reads it.
#[tokio::test]
async fn every_documented_parameter_is_read_by_its_route() {
    let server = Server::start(&[]);
    let mut client = server.client().await;
    let doc = document();
    let mut tried = 0;
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let parameters: Vec<&Value> = operation["parameters"]
                .as_array()
                .map(|list| list.iter().map(|p| resolve(&doc, p)).collect())
                .unwrap_or_default();
            let example = |p: &Value| match &p["example"] {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            let mut path = template.clone();
            for p in parameters.iter().filter(|p| p["in"] == "path") {
                path = path.replace(&format!("{{{}}}", p["name"].as_str().unwrap()), &example(p));
            }
            let required: Vec<String> = parameters
                .iter()
                .filter(|p| p["in"] == "query" && p["required"] == true)
                .map(|p| format!("{}={}", p["name"].as_str().unwrap(), example(p)))
                .collect();
            for p in &parameters {
                let name = p["name"].as_str().unwrap();
                let twice = format!("{name}={}", example(p));
                let mut builder = Request::builder()
                    .method(method.to_uppercase().as_str())
                    .header("host", server.addr.to_string())
                    .header("content-type", "application/json");
                let uri = match p["in"].as_str().unwrap() {
                    "query" => {
                        let mut query = required.clone();
                        query.retain(|pair| !pair.starts_with(&format!("{name}=")));
                        query.extend([twice.clone(), twice]);
                        format!("{path}?{}", query.join("&"))
                    }
                    "header" => {
                        builder = builder.header(name, example(p)).header(name, example(p));
                        format!("{path}?{}", required.join("&"))
                    }
                    "path" => continue,
                    other => panic!("{template}: a parameter in {other}"),
                };
                let body = if method == "post" {
                    let examples = body_examples(&doc, template);
                    examples[0].1.to_string()
                } else {
                    String::new()
                };
                let request = builder.uri(&uri).body(Full::new(Bytes::from(body))).unwrap();
                let reply = client.request(request).await;
                assert_eq!(reply.status, 400, "{method} {uri}: {}", reply.text);
                let message = reply.json()["error"]["message"]
                    .as_str()
                    .unwrap()
                    .to_ascii_lowercase();
                assert!(
                    message.contains(&name.to_ascii_lowercase()),
                    "{method} {uri}: the refusal does not name {name}: {}",
                    reply.text
                );
                tried += 1;
            }
        }
    }
    assert!(tried >= 8, "only {tried} parameters were tried");
}

#[test]
fn every_example_in_the_document_fits_its_schema() {
    let doc = document();
    let mut checked = 0;
    let mut fits = |what: String, schema: &Value, value: &Value| {
        let errors = schema_errors(&doc, schema, value);
        assert!(errors.is_empty(), "{what}: {errors:#?}");
        checked += 1;
    };
    for (template, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let at = format!("{method} {template}");
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                let parameter = resolve(&doc, parameter);
                fits(
                    format!("{at} {}", parameter["name"]),
                    &parameter["schema"],
                    &parameter["example"],
                );
            }
            let mut bodies = vec![("request".to_owned(), &operation["requestBody"])];
            for (status, response) in operation["responses"].as_object().unwrap() {
                bodies.push((status.clone(), response));
            }
            for (label, body) in bodies {
                let Some(json) = body["content"].get("application/json") else {
                    continue;
                };
                for (name, example) in json["examples"].as_object().into_iter().flatten() {
                    fits(
                        format!("{at} {label} example {name}"),
                        &json["schema"],
                        &example["value"],
                    );
                }
            }
        }
    }
    // A schema's own `examples`, the component schemas' too.
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        for example in schema["examples"].as_array().into_iter().flatten() {
            fits(
                format!("schema {name}"),
                &json!({"$ref": format!("#/components/schemas/{name}")}),
                example,
            );
        }
    }
    assert!(checked > 40, "only {checked} examples were checked");
}
