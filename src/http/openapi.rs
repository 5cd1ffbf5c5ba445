//! The OpenAPI 3.1 description of the HTTP API, `docs/openapi.json`, compiled into the binary and
//! served at `GET /openapi.json`.
//!
//! The document is written by hand, not generated: the routes are a `matchit` table and the bodies
//! are decoded by hand (`decode`) and written by hand (`error`), so there are no annotated handler
//! signatures or derive-able types for a generator such as `utoipa` to read, and annotations that
//! repeat the code would drift just as a file does. What keeps the file true is the tests below,
//! which read the code's own tables (`Route::ALL`, `ErrorCode::ALL`, the decoders' field lists,
//! `OutcomeLabel::ALL`, every `Kind`), and `tests/openapi.rs`, which checks every answer of a live
//! server against the document's schemas; `scripts/ci-schemathesis.sh` then fuzzes the live server
//! from the document.
//!
//! Adding a route (holds, API keys) therefore means, in one commit: its `Route` variant; its path in
//! the document with every status it can answer, each error body a `$ref` to that status's error
//! schema (`x-tallyd-status`); any new code in `ErrorCode::ALL` and in its status's schema; a new
//! header (`Authorization`) as a parameter or a `securitySchemes` entry; links from the operation
//! that creates a resource to those that use it, for schemathesis's stateful phase; and requests in
//! `tests/openapi.rs` that provoke each new status. The tests say which of these is missing.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;

use super::HttpResponse;

/// The document, byte for byte as it is in the repository.
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

/// `GET /openapi.json`.
pub fn document() -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from_static(DOCUMENT.as_bytes())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::Value;

    use super::super::decode;
    use super::super::error::ErrorCode;
    use super::super::routes::Route;
    use super::DOCUMENT;
    use crate::analytics::OutcomeLabel;
    use crate::domain::Kind;

    fn document() -> Value {
        serde_json::from_str(DOCUMENT).expect("docs/openapi.json is JSON")
    }

    /// Follows a local `$ref` (`#/components/...`) until a value that is not one.
    fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
        match value.get("$ref").and_then(Value::as_str) {
            Some(reference) => {
                let pointer = reference.strip_prefix('#').expect("a local $ref");
                resolve(
                    doc,
                    doc.pointer(pointer)
                        .unwrap_or_else(|| panic!("{reference} exists")),
                )
            }
            None => value,
        }
    }

    fn names(values: &Value) -> BTreeSet<String> {
        values
            .as_array()
            .expect("an array")
            .iter()
            .map(|v| v.as_str().expect("a string").to_owned())
            .collect()
    }

    /// Every (method, path template) the document describes.
    fn operations(doc: &Value) -> BTreeSet<(String, String)> {
        let paths = doc["paths"].as_object().expect("paths");
        paths
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .expect("a path item")
                    .keys()
                    .filter(|key| !matches!(key.as_str(), "parameters" | "summary" | "description"))
                    .map(move |method| (method.clone(), path.clone()))
            })
            .collect()
    }

    #[test]
    fn the_document_is_openapi_3_1_with_this_crates_version() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn every_route_is_documented_and_every_documented_path_is_routed() {
        let doc = document();
        // A GET route also answers HEAD; OpenAPI leaves HEAD implicit, as do most servers' documents.
        let mut routed: BTreeSet<(String, String)> = Route::ALL
            .iter()
            .map(|route| {
                let method = if route.is_post() { "post" } else { "get" };
                (method.to_owned(), route.pattern().to_owned())
            })
            .collect();
        routed.extend(
            Route::ALL
                .iter()
                .filter(|route| route.also_patch())
                .map(|route| ("patch".to_owned(), route.pattern().to_owned())),
        );
        assert_eq!(
            operations(&doc),
            routed,
            "docs/openapi.json's operations and Route::ALL differ"
        );
    }

    #[test]
    fn every_operation_has_an_id_a_tag_and_an_example_per_body() {
        let doc = document();
        for (method, path) in operations(&doc) {
            let operation = &doc["paths"][&path][&method];
            assert!(
                operation["operationId"].is_string(),
                "{method} {path}: no operationId"
            );
            assert!(operation["tags"].is_array(), "{method} {path}: no tags");
            if let Some(body) = operation.get("requestBody") {
                let examples = &body["content"]["application/json"]["examples"];
                assert!(examples.is_object(), "{method} {path}: no request example");
            }
            let success = operation["responses"]
                .as_object()
                .unwrap()
                .iter()
                .find(|(status, _)| status.starts_with('2'))
                .unwrap_or_else(|| panic!("{method} {path}: no 2xx response"));
            let content = success.1["content"].as_object().expect("a 2xx body");
            for (media, body) in content {
                assert!(
                    body.get("example").is_some() || body.get("examples").is_some(),
                    "{method} {path}: no {media} example for {}",
                    success.0
                );
            }
        }
    }

    #[test]
    fn every_error_code_is_documented_with_its_status() {
        let doc = document();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let in_code: BTreeSet<String> = ErrorCode::ALL.iter().map(|c| c.as_str().to_owned()).collect();
        assert_eq!(
            names(&schemas["ErrorCode"]["enum"]),
            in_code,
            "the ErrorCode schema and ErrorCode::ALL differ"
        );
        // One error schema per status; its `code` enum is exactly the codes with that status.
        let mut by_status: BTreeMap<u16, BTreeSet<String>> = BTreeMap::new();
        for code in ErrorCode::ALL {
            by_status
                .entry(code.status().as_u16())
                .or_default()
                .insert(code.as_str().to_owned());
        }
        let mut documented = BTreeMap::new();
        for (name, schema) in schemas {
            if let Some(status) = schema.get("x-tallyd-status").and_then(Value::as_u64) {
                let codes = names(&schema["properties"]["error"]["properties"]["code"]["enum"]);
                assert_eq!(
                    Some(&codes),
                    by_status.get(&(status as u16)),
                    "{name}: its codes are not those ErrorCode gives status {status}"
                );
                documented.insert(status as u16, format!("#/components/schemas/{name}"));
            }
        }
        assert_eq!(
            documented.keys().collect::<Vec<_>>(),
            by_status.keys().collect::<Vec<_>>(),
            "a status has codes and no error schema, or the reverse"
        );
        // Every documented error answer uses its status's schema.
        for (method, path) in operations(&doc) {
            let responses = doc["paths"][&path][&method]["responses"].as_object().unwrap();
            for (status, response) in responses {
                let status: u16 = status.parse().expect("a numeric status");
                if status < 400 {
                    continue;
                }
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(
                    schema.as_str(),
                    documented.get(&status).map(String::as_str),
                    "{method} {path} {status}"
                );
            }
        }
    }

    /// A decoder, as a refusal's message (`None` when it accepts the body).
    type Decoder = fn(&[u8]) -> Option<String>;

    /// The fields a decoder takes, read from serde's refusal of an unknown one ("expected one of
    /// `a`, `b`"; "there are no fields" for one that takes none), so that the list comes from the
    /// decoder's own struct.
    fn decoder_fields(decode: Decoder) -> BTreeSet<String> {
        let message = decode(br#"{"zz_not_a_field":1}"#).expect("an unknown field is refused");
        if message.contains("there are no fields") {
            return BTreeSet::new();
        }
        let expected = message.split("expected").nth(1).expect("serde lists the fields");
        expected
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    fn refusal<T>(result: Result<T, super::super::ApiError>) -> Option<String> {
        result.err().map(|error| error.message)
    }

    /// One item of a `POST /batches` body, decoded as the batch decodes it, its message without the
    /// `items[0]: ` that the batch puts before an item's refusal.
    fn batch_item(kind: &str, item: &[u8]) -> Option<String> {
        let mut item: Value = serde_json::from_slice(item).expect("an item is a JSON object");
        item["type"] = kind.into();
        let body = serde_json::to_vec(&serde_json::json!({ "items": [item] })).unwrap();
        refusal(decode::batch(&body, 3600, 100)).map(|m| m.trim_start_matches("items[0]: ").to_owned())
    }

    #[test]
    fn every_request_body_field_is_documented_and_every_example_decodes() {
        let doc = document();
        // (path, method, schema, decoder); a path parameter is given to the decoder as its example.
        let decoders: [(&str, &str, &str, Decoder); 9] = [
            ("/transfers/bulk", "post", "BulkTransferRequest", |b| {
                refusal(decode::bulk(b, 8190, "/transfers"))
            }),
            ("/transaction", "post", "TransactionRequest", |b| {
                refusal(decode::transaction(b))
            }),
            ("/transfers", "post", "TransferRequest", |b| {
                refusal(decode::transfer(b))
            }),
            ("/accounts", "post", "OpenAccountRequest", |b| {
                refusal(decode::open_account(b))
            }),
            ("/accounts/{card}", "patch", "SetLimitRequest", |b| {
                refusal(decode::set_limit("1234567890", b))
            }),
            ("/holds", "post", "HoldRequest", |b| {
                refusal(decode::hold(b, 3600))
            }),
            ("/holds/{id}/capture", "post", "CaptureRequest", |b| {
                refusal(decode::capture("1", b))
            }),
            ("/holds/{id}/void", "post", "VoidRequest", |b| {
                refusal(decode::void("1", b))
            }),
            ("/batches", "post", "BatchRequest", |b| {
                refusal(decode::batch(b, 3600, 100))
            }),
        ];
        let mut bodies: Vec<(String, String, Decoder, Vec<Value>)> = Vec::new();
        for (path, method, schema_name, decode) in decoders {
            let body = &doc["paths"][path][method]["requestBody"]["content"]["application/json"];
            assert_eq!(
                body["schema"]["$ref"],
                format!("#/components/schemas/{schema_name}"),
                "{method} {path}"
            );
            let examples = body["examples"]
                .as_object()
                .unwrap()
                .values()
                .map(|e| e["value"].clone());
            bodies.push((
                format!("{method} {path}"),
                schema_name.to_owned(),
                decode,
                examples.collect(),
            ));
        }
        // Each kind of batch item is its route's body with a `type`, decoded by the batch: its
        // schema against the decoder's fields, and the items of the batch examples against both.
        let items: [(&str, &str, Decoder); 5] = [
            ("transaction", "BatchTransactionItem", |b| {
                batch_item("transaction", b)
            }),
            ("transfer", "BatchTransferItem", |b| batch_item("transfer", b)),
            ("hold", "BatchHoldItem", |b| batch_item("hold", b)),
            ("capture", "BatchCaptureItem", |b| batch_item("capture", b)),
            ("void", "BatchVoidItem", |b| batch_item("void", b)),
        ];
        let batch_items: Vec<Value> = bodies
            .iter()
            .filter(|(at, ..)| at == "post /batches")
            .flat_map(|(.., examples)| examples.iter())
            .flat_map(|example| example["items"].as_array().unwrap().iter().cloned())
            .collect();
        let item_schemas: BTreeSet<String> = doc["components"]["schemas"]["BatchRequest"]["properties"]
            ["items"]["items"]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|schema| {
                schema["$ref"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            item_schemas,
            items.iter().map(|(_, name, _)| (*name).to_owned()).collect(),
            "the batch item schemas"
        );
        for (kind, schema_name, decode) in items {
            let schema = &doc["components"]["schemas"][schema_name];
            assert_eq!(
                schema["properties"]["type"]["const"], kind,
                "{schema_name}: its type"
            );
            let of_kind: Vec<Value> = batch_items
                .iter()
                .filter(|item| item["type"] == kind)
                .map(|item| {
                    let mut item = item.clone();
                    item.as_object_mut().unwrap().remove("type");
                    item
                })
                .collect();
            assert!(!of_kind.is_empty(), "no batch example has a {kind} item");
            bodies.push((format!("a {kind} item"), schema_name.to_owned(), decode, of_kind));
        }
        for (at, schema_name, decode, examples) in bodies {
            let path = at.as_str();
            let schema = &doc["components"]["schemas"][&schema_name];
            let mut properties: BTreeSet<String> = schema["properties"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            // A batch item's `type` is read by the batch, not by the item's decoder.
            let is_item = schema_name.starts_with("Batch") && schema_name.ends_with("Item");
            if is_item {
                assert!(properties.remove("type"), "{path}: no type");
            }
            assert_eq!(properties, decoder_fields(decode), "{path}: fields");
            assert_eq!(
                schema["additionalProperties"], false,
                "{path}: unknown fields are refused"
            );
            let mut required = schema.get("required").map(names).unwrap_or_default();
            if is_item {
                assert!(required.remove("type"), "{path}: type is required");
            }
            for value in &examples {
                let name = value.to_string();
                let bytes = serde_json::to_vec(value).unwrap();
                assert_eq!(decode(&bytes), None, "{path}: example {name} must decode");
                // Without each field in turn: refused as missing exactly when the schema requires it.
                for field in value.as_object().unwrap().keys() {
                    let mut without = value.clone();
                    without.as_object_mut().unwrap().remove(field);
                    let refused = decode(&serde_json::to_vec(&without).unwrap());
                    let missing = refused.as_deref().is_some_and(|m| m.starts_with("missing field"));
                    assert_eq!(
                        missing,
                        required.contains(field),
                        "{path}: without {field}: {refused:?}"
                    );
                }
            }
        }
    }

    /// Links drive schemathesis's stateful phase; one that names a missing operation or parameter is
    /// skipped there, and one whose body lacks a required field makes a request the server must
    /// refuse (a body from a link is sent as written by some runners, not merged with generated data).
    #[test]
    fn every_link_targets_a_documented_operation_with_complete_inputs() {
        let doc = document();
        let mut by_id = BTreeMap::new();
        for (method, path) in operations(&doc) {
            let operation = &doc["paths"][&path][&method];
            by_id.insert(
                operation["operationId"].as_str().unwrap().to_owned(),
                operation.clone(),
            );
        }
        let mut links = 0;
        for (method, path) in operations(&doc) {
            let responses = doc["paths"][&path][&method]["responses"].as_object().unwrap();
            for (status, response) in responses {
                for (name, link) in response["links"].as_object().into_iter().flatten() {
                    let at = format!("{method} {path} {status} link {name}");
                    let target = &by_id[link["operationId"].as_str().expect("an operationId")];
                    let parameters: BTreeSet<String> = target["parameters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            let p = resolve(&doc, p);
                            format!("{}.{}", p["in"].as_str().unwrap(), p["name"].as_str().unwrap())
                        })
                        .collect();
                    for parameter in link["parameters"].as_object().into_iter().flatten().map(|p| p.0) {
                        assert!(parameters.contains(parameter), "{at}: no parameter {parameter}");
                    }
                    if let Some(body) = link.get("requestBody") {
                        let schema = &target["requestBody"]["content"]["application/json"]["schema"];
                        for field in names(&resolve(&doc, schema)["required"]) {
                            assert!(body.get(&field).is_some(), "{at}: the body lacks {field}");
                        }
                    }
                    links += 1;
                }
            }
        }
        assert!(links >= 10, "only {links} links");
    }

    #[test]
    fn kinds_and_outcome_labels_are_documented() {
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        // The match makes a new Kind a compile error here until it is listed (and documented).
        let kinds = [Kind::Deposit, Kind::Withdrawal, Kind::Transfer, Kind::Adjustment].map(|kind| {
            match kind {
                Kind::Deposit | Kind::Withdrawal | Kind::Transfer | Kind::Adjustment => {}
            }
            kind.as_str().to_owned()
        });
        assert_eq!(names(&schemas["Kind"]["enum"]), BTreeSet::from(kinds));
        let labels: BTreeSet<String> = OutcomeLabel::ALL.iter().map(|l| l.as_str().to_owned()).collect();
        let stats = &schemas["Stats"]["properties"]["transactions"];
        assert_eq!(names(&stats["required"]), labels);
        let documented: BTreeSet<String> = stats["properties"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(documented, labels);
    }
}
