//! Hostile input, end to end: malformed, oversized, slow and abandoned requests sent byte for byte
//! over raw TCP to the real server. Each must get its documented JSON error, or (when the bytes are
//! not HTTP at all) hyper's bare status line and a closed connection, or just a closed connection;
//! never a panic, a hang, or a balance that moves. Slow and idle clients must hold neither a worker
//! nor the queue, and the timeouts must free their connection slots.
//!
//! The TLS port gets its own hostile cases (at the end): plaintext HTTP, garbage instead of a
//! ClientHello, a handshake that starts and never finishes (bounded by the handshake timeout, and
//! holding a connection slot no longer), and client certificates that are expired or from another CA.

mod common;
#[path = "common/raw.rs"]
mod raw;
#[path = "common/tls.rs"]
mod tls_support;

use std::time::{Duration, Instant};

use common::{seeded_card, Deadline, LedgerDb, Server, DEMO_CARD, DEMO_OPENING};
use raw::{post_json, request, Answer, RawConn};

/// Small limits so that slow clients are cut off within a test's time.
const BODY_LIMIT: usize = 32 * 1024;
const REQUEST_TIMEOUT_MS: u64 = 1000;
const IDLE_TIMEOUT_MS: u64 = 500;
/// How long any single case may take before it counts as a hang. Generous: the machine is shared
/// and the server's own timeouts are under a second.
const CASE_WAIT: Duration = Duration::from_secs(15);

fn hostile_server() -> Server {
    Server::start(&[
        "--body-limit-bytes",
        &BODY_LIMIT.to_string(),
        "--request-timeout-ms",
        &REQUEST_TIMEOUT_MS.to_string(),
        "--idle-timeout-ms",
        &IDLE_TIMEOUT_MS.to_string(),
    ])
}

/// What a case must get back.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A JSON error `{"error":{"code":..}}` with this status and code.
    Json(u16, &'static str),
    /// A JSON error, after which the server closes the connection (the body was never finished).
    JsonThenClose(u16, &'static str),
    /// The head is not HTTP tallyd can route: hyper answers this bare status itself (no body, no
    /// route, so no JSON) and closes the connection.
    Protocol(u16),
    /// As `Protocol`, but the server stops reading part-way through a head too large to buffer,
    /// so the kernel may reset the connection before the status line reaches the client.
    ProtocolOrReset(u16),
    /// No response: the server closes the connection (a head that never completes, or bytes that
    /// are not HTTP/1).
    Closed,
    /// A JSON success with this status: an escape that decodes to a valid request (a read, so
    /// nothing moves).
    Success(u16),
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    expect: Expect,
}

fn case(name: &'static str, bytes: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name,
        bytes: bytes.into(),
        expect,
    }
}

/// A transaction body for the demo card with `amount` spliced in as raw JSON text.
fn with_amount(amount: &str) -> Vec<u8> {
    format!(r#"{{"card_number":"{DEMO_CARD}","amount":{amount}}}"#).into_bytes()
}

/// A transaction body with `card` spliced in as raw JSON text.
fn with_card(card: &[u8]) -> Vec<u8> {
    [b"{\"card_number\":", card, b",\"amount\":5}"].concat()
}

/// A refused-but-well-formed body (amount 0) padded with spaces to exactly `length` bytes.
fn padded_refused_body(length: usize) -> Vec<u8> {
    let mut body = with_amount("0");
    assert!(body.len() <= length);
    body.resize(length, b' ');
    body
}

/// `body` sent with chunked transfer encoding in pieces of `piece` bytes.
fn chunked(body: &[u8], piece: usize) -> Vec<u8> {
    let mut out = b"POST /transaction HTTP/1.1\r\nhost: tallyd\r\ncontent-type: application/json\r\n\
                    transfer-encoding: chunked\r\n\r\n"
        .to_vec();
    for part in body.chunks(piece) {
        out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A head (no body) with the given raw header lines, for `POST /transaction`.
fn head_with(lines: &[&[u8]]) -> Vec<u8> {
    let mut out = b"POST /transaction HTTP/1.1\r\nhost: tallyd\r\n".to_vec();
    for line in lines {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A complete request with an empty JSON object (answered `400 missing_field`) and extra header
/// lines given as raw bytes.
fn empty_object_with_headers(lines: &[&[u8]]) -> Vec<u8> {
    let mut out = head_with(lines);
    out.extend_from_slice(b"content-length: 2\r\n\r\n{}");
    out
}

fn body_cases() -> Vec<Case> {
    use Expect::Json;
    // Nesting is bounded only by the body limit: fields are kept as raw JSON text, which serde
    // skims without recursion, so depth cannot overflow a stack; a deep but balanced value is just
    // the wrong type, an unbalanced one is malformed JSON.
    let deep_array = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(5_000), "}".repeat(5_000));
    let unbalanced = format!("{}1{}", "[".repeat(10_000), "]".repeat(9_999));
    vec![
        case("empty body", post_json(b""), Json(400, "invalid_json")),
        case(
            "POST without a body or length",
            request("POST", "/transaction", &[], None),
            Json(400, "invalid_json"),
        ),
        case("not JSON", post_json(b"{not json"), Json(400, "invalid_json")),
        case("JSON null", post_json(b"null"), Json(400, "invalid_json")),
        case("JSON array", post_json(b"[1,2]"), Json(400, "invalid_json")),
        case(
            "JSON string",
            post_json(br#""a string""#),
            Json(400, "invalid_json"),
        ),
        case("JSON number", post_json(b"150"), Json(400, "invalid_json")),
        case(
            "trailing garbage after the object",
            post_json(&[with_amount("5").as_slice(), b" trailing"].concat()),
            Json(400, "invalid_json"),
        ),
        case(
            "two objects",
            post_json(&[with_amount("5"), with_amount("5")].concat()),
            Json(400, "invalid_json"),
        ),
        case(
            "truncated object",
            post_json(br#"{"card_number":"1234567890","amount":"#),
            Json(400, "invalid_json"),
        ),
        case(
            "10,000-deep array nesting as the amount",
            post_json(&with_amount(&deep_array)),
            Json(400, "invalid_amount"),
        ),
        case(
            "5,000-deep object nesting as the card",
            post_json(&with_card(deep_object.as_bytes())),
            Json(400, "invalid_card_number"),
        ),
        case(
            "10,000-deep unbalanced nesting as the amount",
            post_json(&with_amount(&unbalanced)),
            Json(400, "invalid_json"),
        ),
        case(
            "amount 1e400",
            post_json(&with_amount("1e400")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount -1e400",
            post_json(&with_amount("-1e400")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount of 400 digits",
            post_json(&with_amount(&format!("1{}", "0".repeat(399)))),
            Json(400, "invalid_amount"),
        ),
        case(
            "card 1e400",
            post_json(&with_card(b"1e400")),
            Json(400, "invalid_card_number"),
        ),
        case(
            "a grouped card with two spaces in a row",
            post_json(&with_card(br#""6219  8619 0042 8640""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "a grouped card with spaces and dashes mixed",
            post_json(&with_card(br#""6219 8619-0042 8640""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "a grouped card with a leading space",
            post_json(&with_card(br#"" 6219861900428640""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "a grouped card with a trailing dash",
            post_json(&with_card(br#""6219861900428640-""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "a card grouped by tabs",
            post_json(&with_card(br#""6219\t8619\t0042\t8640""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "a card grouped by underscores",
            post_json(&with_card(br#""6219_8619_0042_8640""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "a card grouped by a non-breaking space",
            post_json(&with_card(br#""6219\u00a08619\u00a00042\u00a08640""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "20 digits in groups",
            post_json(&with_card(br#""6219 8619 0042 8640 1234""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "5 digits in groups",
            post_json(&with_card(br#""12 345""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "10,000 unclosed brackets",
            post_json("[".repeat(10_000).as_bytes()),
            Json(400, "invalid_json"),
        ),
        case(
            "amount -0",
            post_json(&with_amount("-0")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount 0",
            post_json(&with_amount("0")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount i64::MAX + 1",
            post_json(&with_amount("9223372036854775808")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount i64::MIN - 1",
            post_json(&with_amount("-9223372036854775809")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount i64::MIN",
            post_json(&with_amount("-9223372036854775808")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount u64::MAX + 1",
            post_json(&with_amount("18446744073709551616")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount 10^12 + 1",
            post_json(&with_amount("1000000000001")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount 1e3",
            post_json(&with_amount("1e3")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount 1.5",
            post_json(&with_amount("1.5")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount 100.0",
            post_json(&with_amount("100.0")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount NaN",
            post_json(&with_amount("NaN")),
            Json(400, "invalid_json"),
        ),
        case(
            "amount Infinity",
            post_json(&with_amount("Infinity")),
            Json(400, "invalid_json"),
        ),
        case(
            "amount 0x10",
            post_json(&with_amount("0x10")),
            Json(400, "invalid_json"),
        ),
        case(
            "amount +5",
            post_json(&with_amount("+5")),
            Json(400, "invalid_json"),
        ),
        case(
            "amount 05",
            post_json(&with_amount("05")),
            Json(400, "invalid_json"),
        ),
        case(
            "amount as a string",
            post_json(&with_amount(r#""150""#)),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount null",
            post_json(&with_amount("null")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount true",
            post_json(&with_amount("true")),
            Json(400, "invalid_amount"),
        ),
        case(
            "amount an object",
            post_json(&with_amount(r#"{"value":5}"#)),
            Json(400, "invalid_amount"),
        ),
        case(
            "card as a number",
            post_json(&with_card(b"1234567890")),
            Json(400, "invalid_card_number"),
        ),
        case(
            "card of 20 digits",
            post_json(&with_card(br#""12345678901234567890""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "card of 5 digits",
            post_json(&with_card(br#""12345""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "card with an escaped NUL",
            post_json(&with_card(br#""12345\u00007890""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "card with full-width digits",
            post_json(&with_card("\"１２３４５６７８９０\"".as_bytes())),
            Json(400, "invalid_card_number"),
        ),
        case(
            "card with spaces",
            post_json(&with_card(br#"" 1234567890""#)),
            Json(400, "invalid_card_number"),
        ),
        case(
            "card with a lone surrogate escape",
            post_json(&with_card(br#""\ud800""#)),
            Json(400, "invalid_json"),
        ),
        case(
            "raw NUL byte between tokens",
            post_json(b"{\"card_number\":\"1234567890\",\0\"amount\":5}"),
            Json(400, "invalid_json"),
        ),
        case(
            "raw NUL byte inside the card string",
            post_json(b"{\"card_number\":\"12345\x0067890\",\"amount\":5}"),
            Json(400, "invalid_json"),
        ),
        case(
            "invalid UTF-8 inside the card string",
            post_json(b"{\"card_number\":\"12345\xff\xfe890\",\"amount\":5}"),
            Json(400, "invalid_json"),
        ),
        case(
            "invalid UTF-8 in a key",
            post_json(b"{\"card_\xc3\x28number\":\"1234567890\",\"amount\":5}"),
            Json(400, "invalid_json"),
        ),
        case(
            "overlong UTF-8 encoding",
            post_json(b"{\"card_number\":\"\xc0\xb11234567890\",\"amount\":5}"),
            Json(400, "invalid_json"),
        ),
        case(
            "a UTF-8 byte-order mark",
            post_json(&[b"\xef\xbb\xbf".as_slice(), &with_amount("5")].concat()),
            Json(400, "invalid_json"),
        ),
        case(
            "a UTF-16 body",
            post_json(
                &String::from_utf8(with_amount("5"))
                    .unwrap()
                    .encode_utf16()
                    .flat_map(u16::to_le_bytes)
                    .collect::<Vec<u8>>(),
            ),
            Json(400, "invalid_json"),
        ),
        case(
            "duplicate amount",
            post_json(br#"{"card_number":"1234567890","amount":5,"amount":-5}"#),
            Json(400, "duplicate_field"),
        ),
        case(
            "duplicate card",
            post_json(br#"{"card_number":"1234567890","card_number":"4000000000000001","amount":5}"#),
            Json(400, "duplicate_field"),
        ),
        case(
            "unknown field",
            post_json(br#"{"card_number":"1234567890","amount":5,"currency":"EUR"}"#),
            Json(400, "unknown_field"),
        ),
        case(
            "a key differing in case",
            post_json(br#"{"card_number":"1234567890","Amount":5}"#),
            Json(400, "unknown_field"),
        ),
        case(
            "missing amount",
            post_json(br#"{"card_number":"1234567890"}"#),
            Json(400, "missing_field"),
        ),
        case("empty object", post_json(b"{}"), Json(400, "missing_field")),
    ]
}

fn size_cases() -> Vec<Case> {
    use Expect::{Json, JsonThenClose, Protocol};
    let over = padded_refused_body(BODY_LIMIT + 1);
    vec![
        case(
            "a body exactly at the limit",
            post_json(&padded_refused_body(BODY_LIMIT)),
            Json(400, "invalid_amount"),
        ),
        case(
            "a body one byte over the limit",
            post_json(&over),
            JsonThenClose(413, "body_too_large"),
        ),
        case(
            "a chunked body exactly at the limit, in 64-byte chunks",
            chunked(&padded_refused_body(BODY_LIMIT), 64),
            Json(400, "invalid_amount"),
        ),
        case(
            "a chunked body one byte over the limit",
            chunked(&over, 1000),
            JsonThenClose(413, "body_too_large"),
        ),
        case(
            "a declared length of 10^12 and no body",
            head_with(&[
                b"content-type: application/json",
                b"content-length: 1000000000000",
                b"",
            ]),
            JsonThenClose(413, "body_too_large"),
        ),
        case(
            "a declared length past u64",
            head_with(&[b"content-length: 99999999999999999999999", b""]),
            Protocol(400),
        ),
        case(
            "a negative declared length",
            head_with(&[b"content-length: -1", b""]),
            Protocol(400),
        ),
        case(
            "two different declared lengths",
            head_with(&[b"content-length: 2", b"content-length: 3", b"", b"{}"]),
            Protocol(400),
        ),
        case(
            "a declared length shorter than the body",
            head_with(&[
                b"content-length: 10",
                b"",
                br#"{"card_number":"1234567890","amount":5}"#,
            ]),
            Json(400, "invalid_json"),
        ),
        // Transfer-Encoding overrides Content-Length, and the connection must not be reused
        // (RFC 9112 section 6.3), which is what closes request smuggling.
        case(
            "both a length and chunked encoding",
            [
                head_with(&[b"content-length: 4", b"transfer-encoding: chunked", b""]),
                b"2\r\n{}\r\n0\r\n\r\n".to_vec(),
            ]
            .concat(),
            JsonThenClose(400, "missing_field"),
        ),
        case(
            "a transfer encoding other than chunked",
            head_with(&[b"transfer-encoding: gzip", b"", b"{}"]),
            Protocol(400),
        ),
        case(
            "a malformed chunk size",
            [
                head_with(&[b"transfer-encoding: chunked", b""]),
                b"zz\r\n{}\r\n0\r\n\r\n".to_vec(),
            ]
            .concat(),
            JsonThenClose(400, "invalid_body"),
        ),
        case(
            "a chunk size past u64",
            [
                head_with(&[b"transfer-encoding: chunked", b""]),
                b"fffffffffffffffffffff\r\n{}\r\n".to_vec(),
            ]
            .concat(),
            JsonThenClose(400, "invalid_body"),
        ),
        case(
            "an endless chunk extension",
            [
                head_with(&[b"transfer-encoding: chunked", b""]),
                format!("2;{}", "x".repeat(100_000)).into_bytes(),
            ]
            .concat(),
            JsonThenClose(400, "invalid_body"),
        ),
    ]
}

fn head_cases() -> Vec<Case> {
    use Expect::{Closed, Json, Protocol, ProtocolOrReset};
    let many_headers = |n: usize| -> Vec<String> { (0..n).map(|i| format!("x-filler-{i}: {i}")).collect() };
    let with_lines = |lines: &[String]| {
        let lines: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        empty_object_with_headers(&lines)
    };
    let big_value = format!("x-big: {}", "a".repeat(64 * 1024));
    let huge_value = format!("x-big: {}", "a".repeat(1024 * 1024));
    let long_path = format!("/transaction?{}", "a".repeat(100 * 1024));
    vec![
        case(
            "content type text/plain",
            request("POST", "/transaction", &["content-type: text/plain"], Some(b"{}")),
            Json(415, "unsupported_media_type"),
        ),
        case(
            "content type form",
            request(
                "POST",
                "/transaction",
                &["content-type: application/x-www-form-urlencoded"],
                Some(b"card_number=1234567890&amount=5"),
            ),
            Json(415, "unsupported_media_type"),
        ),
        case(
            "content type application/jsonx",
            request(
                "POST",
                "/transaction",
                &["content-type: application/jsonx"],
                Some(b"{}"),
            ),
            Json(415, "unsupported_media_type"),
        ),
        case(
            "content type with invalid UTF-8",
            empty_object_with_headers(&[b"content-type: application/json\xff"]),
            Json(415, "unsupported_media_type"),
        ),
        case(
            "content type JSON with a charset (accepted)",
            request(
                "POST",
                "/transaction",
                &["content-type: Application/JSON; charset=utf-8"],
                Some(b"{}"),
            ),
            Json(400, "missing_field"),
        ),
        case(
            "invalid UTF-8 in another header (accepted)",
            empty_object_with_headers(&[b"x-note: \xff\xfe\xfd"]),
            Json(400, "missing_field"),
        ),
        case(
            "a NUL byte in a header value",
            empty_object_with_headers(&[b"x-note: a\0b"]),
            Protocol(400),
        ),
        case(
            "a space in a header name",
            empty_object_with_headers(&[b"x note: a"]),
            Protocol(400),
        ),
        case(
            "a folded header line",
            empty_object_with_headers(&[b"x-note: a", b" continued"]),
            Protocol(400),
        ),
        case(
            "100 headers in all (accepted)",
            with_lines(&many_headers(98)),
            Json(400, "missing_field"),
        ),
        case("101 headers in all", with_lines(&many_headers(99)), Protocol(431)),
        case(
            "10,000 headers",
            with_lines(&many_headers(10_000)),
            ProtocolOrReset(431),
        ),
        case(
            "a 64 KiB header value (accepted)",
            with_lines(&[big_value]),
            Json(400, "missing_field"),
        ),
        case(
            "a 1 MiB header value",
            with_lines(&[huge_value]),
            ProtocolOrReset(431),
        ),
        case(
            "a 100 KiB request line",
            request("GET", &long_path, &[], None),
            Protocol(414),
        ),
        case(
            "GET /transaction",
            request("GET", "/transaction", &[], None),
            Json(405, "method_not_allowed"),
        ),
        case(
            "DELETE /transaction",
            request("DELETE", "/transaction", &[], None),
            Json(405, "method_not_allowed"),
        ),
        case(
            "an invented method",
            request("FROB", "/transaction", &[], Some(b"{}")),
            Json(405, "method_not_allowed"),
        ),
        case(
            "an unknown path",
            request("POST", "/transaction/1", &[], Some(b"{}")),
            Json(404, "not_found"),
        ),
        case(
            "a path escaping upwards",
            request("GET", "/../../etc/passwd", &[], None),
            Json(404, "not_found"),
        ),
        case(
            "an encoded NUL in the path",
            request("GET", "/healthz%00", &[], None),
            Json(404, "not_found"),
        ),
        case(
            "an absolute-form target",
            request(
                "POST",
                "http://elsewhere.example/transaction",
                &["content-type: application/json"],
                Some(b"{}"),
            ),
            Json(400, "missing_field"),
        ),
        case(
            "OPTIONS *",
            request("OPTIONS", "*", &[], None),
            Json(404, "not_found"),
        ),
        case(
            "an encoded NUL in the card of /balance",
            request("GET", "/balance?card_number=1234567890%00", &[], None),
            Json(400, "invalid_card_number"),
        ),
        case(
            "invalid UTF-8 in the target",
            b"GET /balance?card_number=\xff\xfe HTTP/1.1\r\nhost: t\r\n\r\n".to_vec(),
            Protocol(400),
        ),
        case(
            "a control character in the target",
            b"GET /bal\x01ance HTTP/1.1\r\nhost: t\r\n\r\n".to_vec(),
            Protocol(400),
        ),
        case("an HTTP/0.9 request", b"GET /healthz\r\n".to_vec(), Protocol(400)),
        case(
            "HTTP version 9.9",
            b"GET /healthz HTTP/9.9\r\nhost: t\r\n\r\n".to_vec(),
            Protocol(400),
        ),
        case(
            "the HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
            Closed,
        ),
        case(
            "a TLS ClientHello",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03".to_vec(),
            Protocol(400),
        ),
        case(
            "binary garbage",
            (0u8..=255).rev().cycle().take(2000).collect::<Vec<u8>>(),
            Protocol(400),
        ),
        case("a lone LF", b"\n".to_vec(), Closed),
        case(
            "a request line without a target",
            b"GET HTTP/1.1\r\nhost: t\r\n\r\n".to_vec(),
            Protocol(400),
        ),
    ]
}

/// A `POST` of a JSON body to `path` with extra raw header lines.
fn post_to(path: &str, lines: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut out =
        format!("POST {path} HTTP/1.1\r\nhost: tallyd\r\ncontent-type: application/json\r\n").into_bytes();
    for line in lines {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

fn get(path: &str) -> Vec<u8> {
    request("GET", path, &[], None)
}

/// The ledger's routes: path parameters too long, not digits, percent-encoded tricks; limits and
/// cursors that are not what they must be; malformed idempotency keys and transfer bodies. Every
/// one is refused (or, where an escape decodes to a valid card, read) and nothing moves.
fn ledger_cases() -> Vec<Case> {
    use Expect::{Json, Success};
    let card = DEMO_CARD;
    let entries = |query: &str| get(&format!("/accounts/{card}/entries?{query}"));
    let transfer = |lines: &[&[u8]]| {
        post_to(
            "/transfers",
            lines,
            format!(r#"{{"source":"{card}","destination":"4000000000000001","amount":5}}"#).as_bytes(),
        )
    };
    let long_key = format!("idempotency-key: {}", "k".repeat(256));
    let long_lookup = format!("/transactions?idempotency_key={}", "k".repeat(256));
    vec![
        case("an account of 20 digits", get("/accounts/12345678901234567890"), Json(400, "invalid_card_number")),
        case(
            "an account of 10,000 digits",
            get(&format!("/accounts/{}", "1".repeat(10_000))),
            Json(400, "invalid_card_number"),
        ),
        case(
            "an account of 60,000 letters",
            get(&format!("/accounts/{}", "x".repeat(60_000))),
            Json(400, "invalid_card_number"),
        ),
        case("an account of letters", get("/accounts/abcdefgh"), Json(400, "invalid_card_number")),
        case("an account of 5 digits", get("/accounts/12345"), Json(400, "invalid_card_number")),
        case("an account -1234567", get("/accounts/-1234567"), Json(400, "invalid_card_number")),
        case("an account %2e%2e", get("/accounts/%2e%2e"), Json(400, "invalid_card_number")),
        case(
            "an account ..%2f..%2fetc%2fpasswd",
            get("/accounts/..%2f..%2fetc%2fpasswd"),
            Json(400, "invalid_card_number"),
        ),
        case("an account .. in the path", get("/accounts/../healthz"), Json(404, "not_found")),
        case("an account with an encoded NUL", get("/accounts/1234567890%00"), Json(400, "invalid_card_number")),
        case("an account with an encoded slash", get("/accounts/1234567890%2F"), Json(400, "invalid_card_number")),
        case("an account with a broken escape", get("/accounts/1234567890%"), Json(400, "invalid_card_number")),
        case("an account with a bad escape", get("/accounts/1234567890%g0"), Json(400, "invalid_card_number")),
        case("an account with an escaped é", get("/accounts/1234567890%C3%A9"), Json(400, "invalid_card_number")),
        case("an account with invalid escaped UTF-8", get("/accounts/123456%FF"), Json(400, "invalid_card_number")),
        case("an account with a plus in the path", get("/accounts/1234+567890"), Json(400, "invalid_card_number")),
        case(
            "an account in escaped fullwidth digits",
            get("/accounts/%EF%BC%91%EF%BC%92%EF%BC%93%EF%BC%94%EF%BC%95%EF%BC%96"),
            Json(400, "invalid_card_number"),
        ),
        case("an unknown account", get("/accounts/9999999999"), Json(404, "card_not_found")),
        case("an account %31234567890 (escaped digit, decoded)", get("/accounts/%31234567890"), Success(200)),
        case("an account in groups, %20-escaped (decoded)", get("/accounts/1234%20567890"), Success(200)),
        case("an account with a trailing slash", get(&format!("/accounts/{card}/")), Json(404, "not_found")),
        case("an empty account", get("/accounts/"), Json(404, "not_found")),
        case("entries of an empty account", get("/accounts//entries"), Json(404, "not_found")),
        case("entries of letters", get("/accounts/abcdefgh/entries"), Json(400, "invalid_card_number")),
        case(
            "entries of 10,000 digits",
            get(&format!("/accounts/{}/entries", "9".repeat(10_000))),
            Json(400, "invalid_card_number"),
        ),
        case("entries with limit -1", entries("limit=-1"), Json(400, "invalid_parameter")),
        case("entries with limit 0", entries("limit=0"), Json(400, "invalid_parameter")),
        case("entries with limit 101", entries("limit=101"), Json(400, "invalid_parameter")),
        case("entries with limit 2^64", entries("limit=18446744073709551616"), Json(400, "invalid_parameter")),
        case(
            "entries with a 1,000-digit limit",
            entries(&format!("limit={}", "9".repeat(1000))),
            Json(400, "invalid_parameter"),
        ),
        case("entries with limit 1e2", entries("limit=1e2"), Json(400, "invalid_parameter")),
        case("entries with limit +5", entries("limit=+5"), Json(400, "invalid_parameter")),
        case("entries with limit %35", entries("limit=%35"), Json(400, "invalid_parameter")),
        case("entries with limit 5.0", entries("limit=5.0"), Json(400, "invalid_parameter")),
        case("entries with an empty limit", entries("limit="), Json(400, "invalid_parameter")),
        case("entries with limit 0x10", entries("limit=0x10"), Json(400, "invalid_parameter")),
        case("entries with limit 100 (accepted)", entries("limit=100"), Success(200)),
        case("entries with a cursor abc", entries("starting_after=abc"), Json(400, "invalid_parameter")),
        case("entries with a cursor -1", entries("starting_after=-1"), Json(400, "invalid_parameter")),
        case("entries with a cursor 0", entries("starting_after=0"), Json(400, "invalid_parameter")),
        case("entries with a cursor 1.5", entries("starting_after=1.5"), Json(400, "invalid_parameter")),
        case(
            "entries with a cursor past i64",
            entries("starting_after=9223372036854775808"),
            Json(400, "invalid_parameter"),
        ),
        case("entries with a cursor %00", entries("starting_after=%00"), Json(400, "invalid_parameter")),
        case("entries with an empty cursor", entries("starting_after="), Json(400, "invalid_parameter")),
        case(
            "entries with a cursor that names no transaction (accepted)",
            entries("starting_after=9223372036854775807"),
            Success(200),
        ),
        case("a transaction id abc", get("/transactions/abc"), Json(400, "invalid_parameter")),
        case("a transaction id -1", get("/transactions/-1"), Json(400, "invalid_parameter")),
        case("a transaction id 0", get("/transactions/0"), Json(400, "invalid_parameter")),
        case("a transaction id %31", get("/transactions/%31"), Json(400, "invalid_parameter")),
        case("a transaction id 1%00", get("/transactions/1%00"), Json(400, "invalid_parameter")),
        case("a transaction id %2e%2e", get("/transactions/%2e%2e"), Json(400, "invalid_parameter")),
        case(
            "a transaction id past i64",
            get("/transactions/9223372036854775808"),
            Json(400, "invalid_parameter"),
        ),
        case(
            "a transaction id of 10,000 digits",
            get(&format!("/transactions/{}", "1".repeat(10_000))),
            Json(400, "invalid_parameter"),
        ),
        case(
            "an unknown transaction",
            get("/transactions/9223372036854775807"),
            Json(404, "transaction_not_found"),
        ),
        case("a transaction under a path", get("/transactions/1/legs"), Json(404, "not_found")),
        case("a lookup without a key", get("/transactions"), Json(400, "missing_field")),
        case(
            "a lookup with an empty key",
            get("/transactions?idempotency_key="),
            Json(400, "invalid_idempotency_key"),
        ),
        case(
            "a lookup with an escaped NUL",
            get("/transactions?idempotency_key=a%00b"),
            Json(400, "invalid_idempotency_key"),
        ),
        case(
            "a lookup with an escaped 0xff",
            get("/transactions?idempotency_key=%ff"),
            Json(400, "invalid_idempotency_key"),
        ),
        case(
            "a lookup with a broken escape",
            get("/transactions?idempotency_key=%zz"),
            Json(400, "invalid_idempotency_key"),
        ),
        case("a lookup with a 256-byte key", get(&long_lookup), Json(400, "invalid_idempotency_key")),
        case(
            "a lookup of an unused key",
            get("/transactions?idempotency_key=nobody"),
            Json(404, "transaction_not_found"),
        ),
        case(
            "a balance at -1",
            get(&format!("/balance?card_number={card}&at=-1")),
            Json(400, "invalid_parameter"),
        ),
        case(
            "a balance at abc",
            get(&format!("/balance?card_number={card}&at=abc")),
            Json(400, "invalid_parameter"),
        ),
        case(
            "a balance at a time past i64",
            get(&format!("/balance?card_number={card}&at=99999999999999999999")),
            Json(400, "invalid_parameter"),
        ),
        case(
            "a balance of an escaped card (decoded)",
            get("/balance?card_number=%31234567890"),
            Success(200),
        ),
        case("an empty idempotency key", transfer(&[b"idempotency-key: "]), Json(400, "invalid_idempotency_key")),
        case(
            "a 256-byte idempotency key",
            transfer(&[long_key.as_bytes()]),
            Json(400, "invalid_idempotency_key"),
        ),
        case(
            "an idempotency key with DEL (hyper refuses the head)",
            transfer(&[b"idempotency-key: a\x7fb"]),
            Expect::Protocol(400),
        ),
        case(
            "an idempotency key with 0xff",
            transfer(&[b"idempotency-key: a\xffb"]),
            Json(400, "invalid_idempotency_key"),
        ),
        case(
            "an idempotency key with a tab",
            transfer(&[b"idempotency-key: a\tb"]),
            Json(400, "invalid_idempotency_key"),
        ),
        case(
            "an idempotency key in UTF-8",
            transfer(&["idempotency-key: clé".as_bytes()]),
            Json(400, "invalid_idempotency_key"),
        ),
        case(
            "an invalid key before a broken body",
            post_to("/transfers", &[b"idempotency-key: "], b"{not json"),
            Json(400, "invalid_idempotency_key"),
        ),
        case(
            "an idempotency key on a refused body",
            post_to("/transfers", &[b"idempotency-key: k-1"], b"{}"),
            Json(400, "missing_field"),
        ),
        case(
            "an invalid idempotency key on /accounts",
            post_to("/accounts", &[b"idempotency-key: "], br#"{"card_number":"4111111111111111"}"#),
            Json(400, "invalid_idempotency_key"),
        ),
        case(
            "a transfer to the same card in two spellings",
            post_to(
                "/transfers",
                &[],
                br#"{"source":"1234567890","destination":"12345-67890","amount":5}"#,
            ),
            Json(400, "same_account"),
        ),
        case(
            "a transfer to @world",
            post_to("/transfers", &[], br#"{"source":"1234567890","destination":"@world","amount":5}"#),
            Json(400, "invalid_card_number"),
        ),
        case(
            "a transfer of -1e400",
            post_to(
                "/transfers",
                &[],
                br#"{"source":"1234567890","destination":"4000000000000001","amount":-1e400}"#,
            ),
            Json(400, "invalid_amount"),
        ),
        case(
            "a transfer of i64::MIN",
            post_to(
                "/transfers",
                &[],
                br#"{"source":"1234567890","destination":"4000000000000001","amount":-9223372036854775808}"#,
            ),
            Json(400, "invalid_amount"),
        ),
        case(
            "a transfer with a 10,000-deep reference",
            post_to(
                "/transfers",
                &[],
                format!(
                    r#"{{"source":"1234567890","destination":"4000000000000001","amount":5,"reference":{}1{}}}"#,
                    "[".repeat(10_000),
                    "]".repeat(10_000)
                )
                .as_bytes(),
            ),
            Json(400, "invalid_reference"),
        ),
        case(
            "a transfer with a lone surrogate in the reference",
            post_to(
                "/transfers",
                &[],
                br#"{"source":"1234567890","destination":"4000000000000001","amount":5,"reference":"\ud800"}"#,
            ),
            Json(400, "invalid_json"),
        ),
        case(
            "a transfer with a 256-byte reference",
            post_to(
                "/transfers",
                &[],
                format!(
                    r#"{{"source":"1234567890","destination":"4000000000000001","amount":5,"reference":"{}"}}"#,
                    "r".repeat(256)
                )
                .as_bytes(),
            ),
            Json(400, "invalid_reference"),
        ),
        case(
            "a transfer from a card that does not exist",
            post_to(
                "/transfers",
                &[],
                br#"{"source":"9999999999","destination":"1234567890","amount":5}"#,
            ),
            Json(404, "card_not_found"),
        ),
        case(
            "a transfer larger than the balance",
            post_to(
                "/transfers",
                &[],
                br#"{"source":"1234567890","destination":"4000000000000001","amount":1000000000000}"#,
            ),
            Json(422, "insufficient_funds"),
        ),
        case(
            "an account that exists",
            post_to("/accounts", &[], br#"{"card_number":"1234567890"}"#),
            Json(409, "account_exists"),
        ),
        case(
            "an account with a balance",
            post_to("/accounts", &[], br#"{"card_number":"4111111111111111","balance":100}"#),
            Json(400, "unknown_field"),
        ),
        case(
            "PUT /transfers",
            request("PUT", "/transfers", &[], Some(b"{}")),
            Json(405, "method_not_allowed"),
        ),
        case(
            "DELETE an account",
            request("DELETE", &format!("/accounts/{card}"), &[], None),
            Json(405, "method_not_allowed"),
        ),
        case(
            "POST to a statement",
            request("POST", &format!("/accounts/{card}/entries"), &[], Some(b"{}")),
            Json(405, "method_not_allowed"),
        ),
        case("GET /transfers", get("/transfers"), Json(405, "method_not_allowed")),
    ]
}

fn slow_cases() -> Vec<Case> {
    use Expect::{Closed, JsonThenClose};
    vec![
        case(
            "a body that stops half-way",
            head_with(&[
                b"content-type: application/json",
                b"content-length: 100",
                b"",
                br#"{"card_number":"12345"#,
            ]),
            JsonThenClose(408, "request_timeout"),
        ),
        case(
            "a chunked body without its last chunk",
            [
                head_with(&[b"transfer-encoding: chunked", b""]),
                b"5\r\n{\"car\r\n".to_vec(),
            ]
            .concat(),
            JsonThenClose(408, "request_timeout"),
        ),
        case(
            "Expect: 100-continue and no body",
            head_with(&[b"expect: 100-continue", b"content-length: 40", b""]),
            JsonThenClose(408, "request_timeout"),
        ),
        case(
            "a head that stops half-way",
            b"POST /transaction HTTP/1.1\r\nhost: tallyd\r\ncontent-le".to_vec(),
            Closed,
        ),
        case(
            "a request line that stops half-way",
            b"POST /transac".to_vec(),
            Closed,
        ),
        case("a connection that sends nothing", Vec::new(), Closed),
        case("only blank lines", b"\r\n\r\n\r\n".to_vec(), Closed),
    ]
}

/// Sends one case on a fresh connection and returns what was wrong, if anything.
fn run_case(server: &Server, case: &Case) -> Result<(), String> {
    let mut conn = RawConn::connect(server.addr);
    let sent = conn.send(&case.bytes);
    let answer = conn.read_answer(CASE_WAIT);
    let closes = |conn: &mut RawConn| -> Result<(), String> {
        if conn.wait_closed(CASE_WAIT) {
            Ok(())
        } else {
            Err("the connection stayed open".into())
        }
    };
    match (case.expect, answer) {
        (Expect::Json(status, code) | Expect::JsonThenClose(status, code), Answer::Response(r)) => {
            let got = (r.status, r.error_code());
            if got != (status, Some(code.to_owned())) {
                return Err(format!("expected {status} {code}, got {} {}", r.status, r.text()));
            }
            if r.header("content-type") != Some("application/json") {
                return Err(format!("content type {:?}", r.header("content-type")));
            }
            if matches!(case.expect, Expect::JsonThenClose(..)) {
                closes(&mut conn)?;
            }
            Ok(())
        }
        (Expect::Protocol(status) | Expect::ProtocolOrReset(status), Answer::Response(r)) => {
            if r.status != status || !r.body.is_empty() {
                return Err(format!("expected a bare {status}, got {} {}", r.status, r.text()));
            }
            closes(&mut conn)
        }
        (Expect::Success(status), Answer::Response(r)) => {
            if r.status != status || r.json().is_none() || r.error_code().is_some() {
                return Err(format!("expected a JSON {status}, got {} {}", r.status, r.text()));
            }
            Ok(())
        }
        (Expect::ProtocolOrReset(_) | Expect::Closed, Answer::Closed) => Ok(()),
        (_, Answer::Silent) => Err(format!(
            "no answer and no close within {CASE_WAIT:?} (sent whole: {sent})"
        )),
        (expect, answer) => Err(format!(
            "expected {expect:?}, got {answer:?} (sent whole: {sent})"
        )),
    }
}

fn journal_count(server: &Server) -> i64 {
    server.sqlite().integer("SELECT count(*) FROM journal")
}

/// The server answers `GET path` with 200 on a new connection.
fn get_ok(server: &Server, path: &str) -> raw::RawResponse {
    let mut conn = RawConn::connect(server.addr);
    assert!(conn.send(&request("GET", path, &[], None)));
    match conn.read_answer(CASE_WAIT) {
        Answer::Response(r) if r.status == 200 => r,
        other => panic!("GET {path}: {other:?}"),
    }
}

fn demo_balance(server: &Server) -> i64 {
    let reply = get_ok(server, &format!("/balance?card_number={DEMO_CARD}"));
    reply.json().unwrap()["balance"].as_i64().unwrap()
}

/// The whole table, one fresh connection per case. Every mismatch is collected so that one run
/// shows them all.
#[test]
fn every_malformed_request_gets_its_documented_answer_and_moves_nothing() {
    let server = hostile_server();
    let cases: Vec<Case> = [
        body_cases(),
        size_cases(),
        head_cases(),
        ledger_cases(),
        slow_cases(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let started = Instant::now();
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(problem) = run_case(&server, case) {
            failures.push(format!("{}: {problem}", case.name));
        }
    }
    eprintln!(
        "hostile: {} malformed inputs tried in {:.1?}",
        cases.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    assert_eq!(get_ok(&server, "/healthz").json().unwrap()["status"], "ok");
    assert_eq!(
        journal_count(&server),
        0,
        "no malformed request wrote a journal row"
    );
    assert_eq!(demo_balance(&server), DEMO_OPENING);
    let keys = server.sqlite().integer("SELECT count(*) FROM idempotency_keys");
    assert_eq!(
        keys, 0,
        "a request refused before execution stored its idempotency key"
    );
    let stats = get_ok(&server, "/stats").json().unwrap();
    assert_eq!(stats["transactions"]["committed"], 0);
    server.verify();
}

/// Sends `bytes` one at a time, `gap` apart, until the server answers or closes, at most
/// `bytes.len()` steps. Returns the answer and how many bytes went out before it.
fn dribble(conn: &mut RawConn, bytes: &[u8], gap: Duration) -> (Answer, usize) {
    for (sent, byte) in bytes.iter().enumerate() {
        if !conn.send(std::slice::from_ref(byte)) {
            return (conn.read_answer(CASE_WAIT), sent);
        }
        match conn.read_answer(gap) {
            Answer::Silent => {}
            answer => return (answer, sent + 1),
        }
    }
    (conn.read_answer(CASE_WAIT), bytes.len())
}

/// The header and body timeouts are totals, not gaps between bytes: a client that keeps trickling
/// bytes (slowloris) is cut off as surely as one that stops.
#[test]
fn trickled_heads_and_bodies_are_cut_off_by_total_timeouts() {
    let server = hostile_server();
    let gap = Duration::from_millis(25);
    // 400 bytes at 25 ms each is ten seconds, twenty times the header timeout.
    let endless_head = [
        b"POST /transaction HTTP/1.1\r\nhost: tallyd\r\n".as_slice(),
        &b"x-a: b\r\n".repeat(50),
    ]
    .concat();
    let mut conn = RawConn::connect(server.addr);
    let (answer, sent) = dribble(&mut conn, &endless_head, gap);
    assert!(matches!(answer, Answer::Closed), "trickled head: {answer:?}");
    assert!(sent < endless_head.len(), "closed before the head could finish");
    eprintln!("hostile: a trickled head was closed after {sent} bytes");

    let mut conn = RawConn::connect(server.addr);
    assert!(conn.send(&head_with(&[
        b"content-type: application/json",
        b"content-length: 400",
        b"",
    ])));
    let (answer, sent) = dribble(&mut conn, &[b' '; 400], gap);
    match answer {
        Answer::Response(r) => {
            assert_eq!(
                (r.status, r.error_code().as_deref()),
                (408, Some("request_timeout"))
            );
        }
        other => panic!("trickled body: {other:?}"),
    }
    assert!(conn.wait_closed(CASE_WAIT), "closed after the 408");
    eprintln!("hostile: a trickled body got 408 after {sent} bytes");
    assert_eq!(journal_count(&server), 0);
}

/// Stalled clients of every kind (idle, half a head, half a body, a chunked body without its end,
/// `Expect: 100-continue` without a body), with timeouts far longer than the test, on one worker and
/// a queue of one: transactions from another client must still commit one after another, and the
/// stalled clients must still be stalled afterwards. So a slow client holds a connection and a
/// tokio task, but neither a worker nor a queue slot.
#[test]
fn stalled_clients_hold_neither_a_worker_nor_the_queue() {
    const PER_KIND: usize = 16;
    const TRANSACTIONS: i64 = 40;
    let server = Server::start(&[
        "--workers",
        "1",
        "--queue-depth",
        "1",
        "--request-timeout-ms",
        "120000",
        "--idle-timeout-ms",
        "120000",
    ]);
    let stalls: [Vec<u8>; 5] = [
        Vec::new(),
        b"POST /transaction HTTP/1.1\r\nhost: tallyd\r\ncontent-".to_vec(),
        head_with(&[
            b"content-type: application/json",
            b"content-length: 100",
            b"",
            br#"{"card"#,
        ]),
        [
            head_with(&[b"transfer-encoding: chunked", b""]),
            b"4\r\n{\"ca\r\n".to_vec(),
        ]
        .concat(),
        head_with(&[b"expect: 100-continue", b"content-length: 40", b""]),
    ];
    let mut stalled = Vec::new();
    for bytes in &stalls {
        for _ in 0..PER_KIND {
            let mut conn = RawConn::connect(server.addr);
            assert!(conn.send(bytes));
            stalled.push(conn);
        }
    }
    let (card, opening) = seeded_card(11);
    let mut client = RawConn::connect(server.addr);
    let started = Instant::now();
    for i in 1..=TRANSACTIONS {
        assert!(client.send(&post_json(
            format!(r#"{{"card_number":"{card}","amount":{i}}}"#).as_bytes()
        )));
        match client.read_answer(CASE_WAIT) {
            Answer::Response(r) => assert_eq!(r.status, 200, "transaction {i}: {}", r.text()),
            other => panic!("transaction {i}: {other:?}"),
        }
    }
    let took = started.elapsed();
    eprintln!(
        "hostile: {TRANSACTIONS} transactions committed in {took:.1?} beside {} stalled clients",
        stalled.len()
    );
    for (i, conn) in stalled.iter_mut().enumerate() {
        // The 100-continue clients were told to go on; that interim answer is all they may have.
        let interim_only = i / PER_KIND == 4;
        assert!(
            interim_only || conn.still_open_and_silent(),
            "stalled client {i} was answered or closed: the commits did not happen beside it"
        );
    }
    let expected = opening + TRANSACTIONS * (TRANSACTIONS + 1) / 2;
    let reply = get_ok(&server, &format!("/balance?card_number={card}"));
    assert_eq!(reply.json().unwrap()["balance"], expected);
    assert_eq!(journal_count(&server), TRANSACTIONS);
    drop(stalled);
    server.verify();
}

/// With every connection slot taken by idle clients, a new client waits in the listen backlog;
/// the idle timeout closes the idle ones and frees their slots, so the new client is served
/// without anyone stepping in.
#[test]
fn the_idle_timeout_frees_connection_slots_held_by_idle_clients() {
    let server = Server::start(&["--max-connections", "4", "--idle-timeout-ms", "500"]);
    let mut idle: Vec<RawConn> = (0..4).map(|_| RawConn::connect(server.addr)).collect();
    let mut waiting = RawConn::connect(server.addr);
    assert!(waiting.send(&request("GET", "/healthz", &[], None)));
    match waiting.read_answer(Duration::from_secs(30)) {
        Answer::Response(r) => assert_eq!(r.status, 200),
        other => panic!("the fifth client was not served: {other:?}"),
    }
    for conn in &mut idle {
        assert!(
            conn.wait_closed(CASE_WAIT),
            "an idle connection was closed by the server"
        );
    }
}

/// Open file descriptors of the server process (its sockets among them).
/// The server's sockets on its own listening port (the accepted client connections and the
/// listener), from /proc: unlike a count of all its descriptors, not moved by the database connections a pool opens
/// when it first needs them (on PostgreSQL, a read or id connection may open at any time).
fn client_sockets(server: &Server) -> usize {
    let port = format!("{:04X}", server.addr.port());
    let mut inodes = std::collections::HashSet::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{}/net/{table}", server.pid())) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields.get(1).and_then(|local| local.rsplit(':').next());
            if local_port == Some(port.as_str()) {
                if let Some(inode) = fields.get(9) {
                    inodes.insert(format!("socket:[{inode}]"));
                }
            }
        }
    }
    std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .expect("the server's /proc entry")
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| inodes.contains(target.to_string_lossy().as_ref()))
        .count()
}

/// Connections abandoned at every stage, some closed politely and some reset: the server must
/// shrug them all off (no panic, no leaked socket), stay healthy, and keep the books straight. A
/// complete transaction whose client vanished may or may not have been committed, but if it was,
/// its journal row and its balance agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_dropped_at_every_stage_leave_no_trace() {
    use tokio::io::AsyncWriteExt;
    const ROUNDS: usize = 20;
    let server = hostile_server();
    let baseline = client_sockets(&server);
    let (card, opening) = seeded_card(21);
    let deposit = post_json(format!(r#"{{"card_number":"{card}","amount":7}}"#).as_bytes());
    let stages: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"POST /transac".to_vec(),
        b"POST /transaction HTTP/1.1\r\nhost: tallyd\r\ncontent-length: 40\r\n".to_vec(),
        head_with(&[
            b"content-type: application/json",
            b"content-length: 100",
            b"",
            br#"{"card"#,
        ]),
        [
            head_with(&[b"transfer-encoding: chunked", b""]),
            b"4\r\n{\"ca".to_vec(),
        ]
        .concat(),
        post_json(b"{not json"),
        deposit.clone(),
        [deposit.clone(), deposit.clone(), deposit].concat(),
    ];
    let mut tasks = Vec::new();
    for round in 0..ROUNDS {
        for (stage, bytes) in stages.iter().enumerate() {
            let bytes = bytes.clone();
            let addr = server.addr;
            let reset = (round + stage) % 2 == 0;
            tasks.push(tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
                let _ = stream.write_all(&bytes).await;
                if reset {
                    // SO_LINGER 0: closing sends RST instead of FIN.
                    let _ = stream.set_zero_linger();
                }
                drop(stream);
            }));
        }
    }
    for task in tasks {
        task.await.expect("a dropping client");
    }
    eprintln!(
        "hostile: {} connections dropped at {} stages",
        ROUNDS * stages.len(),
        stages.len()
    );
    // The listen backlog is first in, first out: once a new connection is served, every abandoned
    // one has been accepted. Each must then be noticed (EOF, reset, or a timeout under a second)
    // and closed.
    get_ok(&server, "/healthz");
    let deadline = Deadline::new(Duration::from_secs(30), "the abandoned sockets to be closed");
    while client_sockets(&server) > baseline + 2 {
        deadline.tick().await;
    }

    let mut client = server.client().await;
    assert_eq!(client.get("/healthz").await.status, hyper::StatusCode::OK);
    let reply = client.transaction(DEMO_CARD, 1).await;
    assert_eq!(reply.status, hyper::StatusCode::OK, "{}", reply.text);
    assert_eq!(client.balance(DEMO_CARD).await, DEMO_OPENING + 1);
    let db = server.sqlite();
    // A card number is digits only, so it may be written into the SQL.
    let row = db.integers(&format!(
        "SELECT count(*), coalesce(sum(amount), 0) FROM journal WHERE card_number = '{card}'"
    ));
    let (rows, sum) = (row[0][0], row[0][1]);
    assert_eq!(sum, rows * 7);
    assert_eq!(client.balance(&card).await, opening + sum);
    eprintln!("hostile: {rows} deposits from vanished clients were committed anyway (each journaled)");
    server.verify();
}

/// A client that pipelines requests and never reads the answers (a slow reader): once the socket
/// buffers are full, hyper waits to write forever. No timeout covers a stalled write (the header
/// timeout only runs while a head is being read, the body timeout only while a body is), so the
/// connection and its slot are held for as long as the client likes; `--max-connections` of them
/// lock every other client out. The limit is set to one here so that one slow reader shows it.
#[test]
fn a_client_that_never_reads_cannot_hold_a_connection_slot() {
    const MAX_PIPELINED: usize = 200_000;
    let server = Server::start(&[
        "--max-connections",
        "1",
        "--idle-timeout-ms",
        &IDLE_TIMEOUT_MS.to_string(),
        "--request-timeout-ms",
        &REQUEST_TIMEOUT_MS.to_string(),
    ]);
    let mut reader_that_never_reads = RawConn::connect(server.addr);
    let metrics = request("GET", "/metrics", &[], None);
    let mut pipelined = 0;
    while pipelined < MAX_PIPELINED
        && reader_that_never_reads.send_within(&metrics, Duration::from_millis(500))
    {
        pipelined += 1;
    }
    eprintln!("hostile: the slow reader pipelined {pipelined} requests before the server stopped reading");
    let mut waiting = RawConn::connect(server.addr);
    assert!(waiting.send(&request("GET", "/healthz", &[], None)));
    match waiting.read_answer(CASE_WAIT) {
        Answer::Response(r) => assert_eq!(r.status, 200),
        other => panic!(
            "another client was not served within {CASE_WAIT:?} while a slow reader held the only slot: {other:?}"
        ),
    }
}

/// The handshake timeout of the TLS cases: short, so that a stalled handshake is cut off quickly.
const TLS_HANDSHAKE_TIMEOUT_MS: u64 = 500;

/// A TLS server with a client CA, allowing 2 connections at once, and what it was made with.
fn hostile_tls_server(dir: &std::path::Path) -> (Server, tls_support::Ca, tls_support::Ca) {
    let server_ca = tls_support::Ca::new("server CA");
    let client_ca = tls_support::Ca::new("client CA");
    let files = tls_support::TlsFiles::write(dir, &server_ca.server(), Some(&client_ca));
    let mut args = files.mutual_args();
    args.extend([
        "--tls-handshake-timeout-ms".to_owned(),
        TLS_HANDSHAKE_TIMEOUT_MS.to_string(),
        "--max-connections".to_owned(),
        "2".to_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_on(&dir.join("users.db"), &args);
    (server, server_ca, client_ca)
}

/// A request over a fresh mutual-TLS connection succeeds: the server is alive and has a free slot.
async fn tls_request_succeeds(server: &Server, server_ca: &tls_support::Ca, client_ca: &tls_support::Ca) {
    let identity = client_ca.client("ok");
    let mut client = tls_support::connect(server.addr, server_ca, Some(&identity))
        .await
        .expect("a good client connects");
    assert_eq!(client.get("/healthz").await.status, hyper::StatusCode::OK);
}

#[tokio::test]
async fn the_tls_port_closes_plaintext_garbage_and_stalled_handshakes_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (server, server_ca, client_ca) = hostile_tls_server(dir.path());
    let cases: [(&str, Vec<u8>); 4] = [
        ("plaintext HTTP", request("GET", "/healthz", &[], None)),
        ("garbage", (0..2048u32).map(|i| (i * 7919 % 251) as u8).collect()),
        (
            "a TLS record header claiming 16 KiB and nothing after it",
            vec![0x16, 0x03, 0x01, 0x40, 0x00],
        ),
        (
            "half a ClientHello",
            vec![0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03],
        ),
    ];
    for (name, bytes) in cases {
        let mut conn = RawConn::connect(server.addr);
        let started = Instant::now();
        conn.send(&bytes);
        match conn.read_answer(CASE_WAIT) {
            Answer::Closed => {}
            Answer::Response(response) => {
                panic!("{name}: an HTTP answer on the TLS port: {}", response.status)
            }
            Answer::Silent => panic!("{name}: still open after {CASE_WAIT:?}"),
        }
        eprintln!("{name}: closed after {:?}", started.elapsed());
    }
    // Two stalled handshakes fill both connection slots; the timeout frees them for a real client.
    let mut stalled: Vec<RawConn> = (0..2).map(|_| RawConn::connect(server.addr)).collect();
    for conn in &mut stalled {
        conn.send(&[0x16, 0x03, 0x01]);
    }
    let started = Instant::now();
    for conn in &mut stalled {
        assert!(
            conn.wait_closed(CASE_WAIT),
            "a stalled handshake was never cut off"
        );
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(TLS_HANDSHAKE_TIMEOUT_MS / 2),
        "closed after {waited:?}: before the timeout, so not by it"
    );
    tls_request_succeeds(&server, &server_ca, &client_ca).await;
    let identity = client_ca.client("metrics");
    let mut client = tls_support::connect(server.addr, &server_ca, Some(&identity))
        .await
        .unwrap();
    let series = common::parse_prometheus(&client.get("/metrics").await.text);
    let timeouts = common::series_value(
        &series,
        "tallyd_tls_handshake_failures_total",
        &[("reason", "timeout")],
    );
    assert!(timeouts.is_some_and(|n| n >= 2.0), "{timeouts:?}");
}

#[tokio::test]
async fn expired_and_foreign_client_certificates_are_refused_and_the_server_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (server, server_ca, client_ca) = hostile_tls_server(dir.path());
    let expired = client_ca.expired_client("gateway");
    let foreign = tls_support::Ca::new("rogue CA").client("gateway");
    // A self-signed certificate that claims the client CA's name but was not signed by it.
    let impostor = tls_support::Ca::new("client CA").client("gateway");
    for (name, identity) in [
        ("expired", &expired),
        ("another CA's", &foreign),
        ("an impostor CA's", &impostor),
    ] {
        let refused = match tls_support::connect(server.addr, &server_ca, Some(identity)).await {
            Err(_) => true,
            Ok(mut client) => {
                let request = client.transaction_request(DEMO_CARD, 1);
                client.try_request(request).await.is_err()
            }
        };
        assert!(refused, "{name} certificate was let in");
    }
    tls_request_succeeds(&server, &server_ca, &client_ca).await;
    assert_eq!(common::db_transactions(&server.sqlite()), 0, "nothing moved");
}
