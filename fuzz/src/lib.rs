//! The properties every answer of `tallyd::http::decode::transaction` must have, and an independent
//! model of the API's rules to check each answer against (as redb's fuzzer checks against a
//! `BTreeMap`). Shared by the libFuzzer target (`fuzz/fuzz_targets/decode_transaction.rs`) and by
//! `tests/fuzz_corpus.rs`, which replays the corpus and every regression input under plain
//! `cargo test`. A broken property panics, which libFuzzer records as a crash.
//!
//! The model reads the body with its own small JSON reader (RFC 8259, no depth limit, numbers as
//! written), applies the README's rules by hand in the order the decoder meets them, and predicts
//! the exact answer for every valid JSON text; for text that is not JSON it predicts a refusal.
//!
//! The model's numbers are the README's (6 to 19 digits, at most 10^12), written out here on
//! purpose rather than taken from `tallyd::domain`, so that a change to those constants is noticed.

use serde_json::Value;
use tallyd::domain::{Amount, CardNumber, Command, Kind, PositiveAmount, Reference, TransactionRequest};
use tallyd::http::decode;
use tallyd::http::ApiError;

/// Fewest and most digits in a card number, from the README.
const CARD_DIGITS: std::ops::RangeInclusive<usize> = 6..=19;
/// Largest absolute amount, from the README.
const AMOUNT_ABS_MAX: u64 = 1_000_000_000_000;

/// Every code the README documents for a refused `POST /transaction` body.
pub const DOCUMENTED_CODES: [&str; 6] = [
    "invalid_json",
    "missing_field",
    "unknown_field",
    "duplicate_field",
    "invalid_card_number",
    "invalid_amount",
];

/// Codes a body that is not valid JSON may get: serde reports a field problem as soon as it reads
/// the key (unknown, duplicate) or the closing brace (missing), before it sees the broken rest.
/// Never `invalid_card_number` or `invalid_amount`: those are judged only after the whole body
/// was read as JSON.
const MALFORMED_CODES: [&str; 4] = [
    "invalid_json",
    "missing_field",
    "unknown_field",
    "duplicate_field",
];

/// What the rules say a body must produce.
#[derive(Debug, PartialEq, Eq)]
pub enum Expected {
    /// A valid request with these values.
    Accept { card: String, amount: i64 },
    /// A valid JSON document refused with exactly this code.
    Refuse(&'static str),
    /// Not JSON at all: refused, with one of [`MALFORMED_CODES`].
    Malformed,
}

/// Checks every property of `decode::transaction(body)` and of the domain parsers on the same
/// bytes; panics with the input and the broken property.
pub fn check(body: &[u8]) {
    let result = decode::transaction(body);
    match &result {
        Ok(request) => check_accepted(body, request),
        Err(error) => check_refused(body, error),
    }
    match (model(body), &result) {
        (Expected::Accept { card, amount }, Ok(request)) => {
            assert_eq!(request.card.as_str(), card, "card of {}", shown(body));
            assert_eq!(request.amount.minor_units(), amount, "amount of {}", shown(body));
        }
        (Expected::Refuse(code), Err(error)) => {
            assert_eq!(error.code.as_str(), code, "code for {}: {error:?}", shown(body));
        }
        (Expected::Malformed, Err(error)) => assert!(
            MALFORMED_CODES.contains(&error.code.as_str()),
            "{} is not JSON but was refused with {:?}",
            shown(body),
            error.code
        ),
        (expected, result) => panic!(
            "decode::transaction({}) = {result:?}, but the rules say {expected:?}",
            shown(body)
        ),
    }
    check_domain(body);
}

/// An accepted request holds values the rules allow, and encoding them again decodes to the same
/// request, whatever the key order and spacing.
fn check_accepted(body: &[u8], request: &TransactionRequest) {
    let card = request.card.as_str();
    let amount = request.amount.minor_units();
    assert!(card_is_valid(card), "accepted card {card:?} from {}", shown(body));
    assert!(
        amount_is_valid(amount),
        "accepted amount {amount} from {}",
        shown(body)
    );
    let kind = if amount > 0 {
        Kind::Deposit
    } else {
        Kind::Withdrawal
    };
    assert_eq!(request.amount.kind(), kind, "kind of {amount}");

    let forward = serde_json::json!({ "card_number": card, "amount": amount });
    let encodings = [
        serde_json::to_vec(&forward).expect("a JSON value encodes"),
        serde_json::to_vec_pretty(&forward).expect("a JSON value encodes"),
        format!(r#" {{ "amount" : {amount} , "card_number" : "{card}" }} "#).into_bytes(),
    ];
    for encoded in encodings {
        let again = decode::transaction(&encoded);
        assert_eq!(
            again.as_ref(),
            Ok(request),
            "{} re-encoded as {} decodes differently",
            shown(body),
            shown(&encoded)
        );
    }
}

/// A refusal is a 400 with a documented code, a message for people, and none of the extras that
/// belong to other errors.
fn check_refused(body: &[u8], error: &ApiError) {
    assert_eq!(
        error.status().as_u16(),
        400,
        "status for {}: {error:?}",
        shown(body)
    );
    assert!(
        DOCUMENTED_CODES.contains(&error.code.as_str()),
        "undocumented code for {}: {error:?}",
        shown(body)
    );
    assert!(!error.message.is_empty(), "empty message for {}", shown(body));
    assert_eq!(error.balance, None, "balance on {error:?}");
    assert_eq!(error.allow, None, "allow on {error:?}");
    assert_eq!(error.retry_after, None, "retry_after on {error:?}");
    assert_eq!(error.card_number, None, "card_number on {error:?}");
}

/// The domain parsers agree with the rules on the same bytes: the whole input as a card number,
/// its first eight bytes as an amount, and its text as a decimal amount.
fn check_domain(body: &[u8]) {
    if let Ok(text) = std::str::from_utf8(body) {
        match CardNumber::parse(text) {
            Ok(card) => assert_eq!(
                Some(card.as_str()),
                card_digits(text).as_deref(),
                "CardNumber::parse accepted {text:?}"
            ),
            Err(_) => assert_eq!(card_digits(text), None, "CardNumber::parse refused {text:?}"),
        }
        if let Ok(amount) = text.trim().parse::<i64>() {
            check_amount(amount);
        }
    }
    if let Some(first) = body.first_chunk::<8>() {
        check_amount(i64::from_le_bytes(*first));
    }
}

fn check_amount(amount: i64) {
    match Amount::new(amount) {
        Ok(valid) => {
            assert!(amount_is_valid(amount), "Amount::new accepted {amount}");
            assert_eq!(valid.minor_units(), amount, "Amount::new changed {amount}");
        }
        Err(_) => assert!(!amount_is_valid(amount), "Amount::new refused {amount}"),
    }
}

/// The rules applied by hand to the body read with this file's own JSON reader.
pub fn model(body: &[u8]) -> Expected {
    let Some(document) = read_document(body) else {
        return Expected::Malformed;
    };
    let Some(members) = document else {
        return Expected::Refuse("invalid_json");
    };
    let (mut card, mut amount) = (None, None);
    for (key, item) in members {
        // A key is decoded to be compared; one with a lone surrogate escape does not decode.
        let Some(key) = key else {
            return Expected::Refuse("invalid_json");
        };
        let slot = match key.as_str() {
            "card_number" => &mut card,
            "amount" => &mut amount,
            _ => return Expected::Refuse("unknown_field"),
        };
        if slot.is_some() {
            return Expected::Refuse("duplicate_field");
        }
        *slot = Some(item);
    }
    let (Some(card), Some(amount)) = (card, amount) else {
        return Expected::Refuse("missing_field");
    };
    let card = match card {
        Item::String(None) => return Expected::Refuse("invalid_json"),
        Item::String(Some(card)) => match card_digits(&card) {
            Some(digits) => digits,
            None => return Expected::Refuse("invalid_card_number"),
        },
        _ => return Expected::Refuse("invalid_card_number"),
    };
    // Only an integer literal is an amount: `1.0`, `1e3` and `-0` are not, nor is any nesting.
    let amount = match amount {
        Item::Number(text) if !text.contains(['.', 'e', 'E']) => text.parse::<i64>().ok(),
        _ => None,
    };
    match amount {
        Some(amount) if amount_is_valid(amount) => Expected::Accept { card, amount },
        _ => Expected::Refuse("invalid_amount"),
    }
}

/// The body read with this file's JSON reader: `None` if it is not JSON, `Some(None)` for JSON
/// that is not an object.
fn read_document(body: &[u8]) -> Option<Option<Members<'_>>> {
    let document = std::str::from_utf8(body)
        .ok()
        .and_then(|text| Json::new(text).document());
    // serde_json's own reader is stricter (depth 128, numbers that fit an f64, paired surrogates
    // in every string), so whatever it reads this model's reader must read too.
    assert!(
        document.is_some() || serde_json::from_slice::<Value>(body).is_err(),
        "serde_json reads {} but the model's JSON reader refuses it",
        shown(body)
    );
    document
}

/// A top-level member's value, as far as the rules look at it.
enum Item<'a> {
    /// A string, decoded; `None` when an escape is a lone surrogate.
    String(Option<String>),
    /// A number's literal text.
    Number(&'a str),
    /// `null` (an optional field's way of saying "none").
    Null,
    /// `true`, `false`, an array or an object.
    Other,
}

/// A top-level object's members in document order, repeated keys included; keys decoded (`None`
/// for a lone surrogate escape).
type Members<'a> = Vec<(Option<String>, Item<'a>)>;

/// A reader of RFC 8259 JSON text written for this model, independent of serde_json: no depth
/// limit and no number range, as the grammar has none. Iterative, so deep nesting cannot overflow
/// the stack. Every method returns `None` for text that breaks the grammar.
struct Json<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Json<'a> {
    fn new(text: &'a str) -> Self {
        Self { text, at: 0 }
    }

    /// The whole text as one JSON value: `Some(Some(members))` for an object, `Some(None)` for
    /// any other value, `None` if it is not JSON.
    fn document(&mut self) -> Option<Option<Members<'a>>> {
        self.whitespace();
        let members = if self.eat(b'{') {
            Some(self.members()?)
        } else {
            self.value()?;
            None
        };
        self.whitespace();
        (self.at == self.text.len()).then_some(members)
    }

    /// An object's members, after its `{`.
    fn members(&mut self) -> Option<Members<'a>> {
        let mut members = Vec::new();
        self.whitespace();
        if self.eat(b'}') {
            return Some(members);
        }
        loop {
            let key = self.key()?;
            members.push((key, self.value()?));
            self.whitespace();
            if self.eat(b'}') {
                return Some(members);
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    /// A member's key and its colon.
    fn key(&mut self) -> Option<Option<String>> {
        self.whitespace();
        if !self.eat(b'"') {
            return None;
        }
        let key = self.string()?;
        self.whitespace();
        self.eat(b':').then_some(key)
    }

    /// One value, nesting included, with the whitespace before it.
    fn value(&mut self) -> Option<Item<'a>> {
        self.whitespace();
        match self.peek()? {
            b'"' => {
                self.at += 1;
                Some(Item::String(self.string()?))
            }
            b'-' | b'0'..=b'9' => Some(Item::Number(self.number()?)),
            b'[' | b'{' => {
                self.nesting()?;
                Some(Item::Other)
            }
            _ => match self.literal()? {
                "null" => Some(Item::Null),
                _ => Some(Item::Other),
            },
        }
    }

    /// An array or object and everything in it, with an explicit stack of what closes next.
    fn nesting(&mut self) -> Option<()> {
        let mut closers: Vec<u8> = Vec::new();
        loop {
            // Here a value starts: open a container, or read a scalar.
            self.whitespace();
            match self.peek()? {
                b'[' => {
                    self.at += 1;
                    self.whitespace();
                    if !self.eat(b']') {
                        closers.push(b']');
                        continue;
                    }
                }
                b'{' => {
                    self.at += 1;
                    self.whitespace();
                    if !self.eat(b'}') {
                        self.key()?;
                        closers.push(b'}');
                        continue;
                    }
                }
                _ => {
                    self.value()?;
                }
            }
            // A value ended: close what it ends, or go on to the next element.
            loop {
                let Some(&closer) = closers.last() else {
                    return Some(());
                };
                self.whitespace();
                if self.eat(closer) {
                    closers.pop();
                } else if self.eat(b',') {
                    if closer == b'}' {
                        self.key()?;
                    }
                    break;
                } else {
                    return None;
                }
            }
        }
    }

    /// A string's contents after its opening quote, decoded; `Some(None)` if it holds a lone
    /// surrogate escape (valid grammar, but no Unicode text).
    fn string(&mut self) -> Option<Option<String>> {
        let mut units: Vec<u16> = Vec::new();
        let mut chars = self.text[self.at..].char_indices();
        loop {
            let (offset, c) = chars.next()?;
            match c {
                '"' => {
                    self.at += offset + 1;
                    return Some(String::from_utf16(&units).ok());
                }
                '\\' => {
                    let (_, escape) = chars.next()?;
                    let unit = match escape {
                        '"' | '\\' | '/' => escape as u16,
                        'b' => 0x08,
                        'f' => 0x0c,
                        'n' => u16::from(b'\n'),
                        'r' => u16::from(b'\r'),
                        't' => u16::from(b'\t'),
                        'u' => {
                            let mut unit = 0u16;
                            for _ in 0..4 {
                                let digit = chars.next()?.1.to_digit(16)?;
                                unit = unit * 16 + digit as u16;
                            }
                            unit
                        }
                        _ => return None,
                    };
                    units.push(unit);
                }
                c if u32::from(c) < 0x20 => return None,
                c => units.extend(c.encode_utf16(&mut [0; 2]).iter()),
            }
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, returned as written.
    fn number(&mut self) -> Option<&'a str> {
        let start = self.at;
        self.eat(b'-');
        if !self.eat(b'0') {
            if !matches!(self.peek(), Some(b'1'..=b'9')) {
                return None;
            }
            self.digits();
        }
        if self.eat(b'.') && self.digits() == 0 {
            return None;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(&self.text[start..self.at])
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        self.at - start
    }

    fn literal(&mut self) -> Option<&'static str> {
        let rest = &self.text[self.at..];
        let literal = ["true", "false", "null"]
            .into_iter()
            .find(|literal| rest.starts_with(literal))?;
        self.at += literal.len();
        Some(literal)
    }

    /// JSON's four whitespace bytes; not form feed, which `trim_ascii_start` would skip.
    fn whitespace(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> bool {
        let matched = self.peek() == Some(byte);
        if matched {
            self.at += 1;
        }
        matched
    }
}

fn card_is_valid(card: &str) -> bool {
    CARD_DIGITS.contains(&card.len()) && card.bytes().all(|byte| byte.is_ascii_digit())
}

/// The README's rule for a card number as written: 6 to 19 ASCII digits, optionally in groups
/// separated by single spaces or by single dashes (one kind per number, none at either end). The
/// card is its digits.
fn card_digits(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let separator = bytes.iter().copied().find(|byte| !byte.is_ascii_digit());
    if let Some(separator) = separator {
        let grouped = matches!(separator, b' ' | b'-')
            && text
                .split(separator as char)
                .all(|group| !group.is_empty() && group.bytes().all(|byte| byte.is_ascii_digit()));
        if !grouped {
            return None;
        }
    }
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    card_is_valid(&digits).then_some(digits)
}

fn amount_is_valid(amount: i64) -> bool {
    amount != 0 && amount.unsigned_abs() <= AMOUNT_ABS_MAX
}

/// The input for a failure message: as text where it is UTF-8, short enough to read.
fn shown(body: &[u8]) -> String {
    const SHOWN_BYTES_MAX: usize = 300;
    let text = String::from_utf8_lossy(&body[..body.len().min(SHOWN_BYTES_MAX)]);
    let more = body.len().saturating_sub(SHOWN_BYTES_MAX);
    if more > 0 {
        format!("{text:?} (and {more} more bytes)")
    } else {
        format!("{text:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// The ledger's decoders: `decode::transfer`, `decode::open_account`, `decode::idempotency_key`,
// and the path and query parameters (`decode::card_parameter`, `decode::id_parameter`), driven
// by the `decode_ledger` target. Its first byte picks the decoder (`0`..`3` in the seeds, any
// byte modulo 4), the rest is the input.
// ---------------------------------------------------------------------------------------------

/// Every code the README documents for a refused `POST /transfers` body.
pub const TRANSFER_CODES: [&str; 8] = [
    "invalid_json",
    "missing_field",
    "unknown_field",
    "duplicate_field",
    "invalid_card_number",
    "invalid_amount",
    "invalid_reference",
    "same_account",
];

/// Every code the README documents for a refused `POST /accounts` body.
pub const ACCOUNT_CODES: [&str; 5] = [
    "invalid_json",
    "missing_field",
    "unknown_field",
    "duplicate_field",
    "invalid_card_number",
];

/// Longest `reference`, in bytes of UTF-8, and the `Idempotency-Key`'s lengths, from the README.
const REFERENCE_BYTES_MAX: usize = 255;
const KEY_BYTES: std::ops::RangeInclusive<usize> = 1..=255;

/// What the rules say a `POST /transfers` body must produce.
#[derive(Debug, PartialEq, Eq)]
pub enum ExpectedTransfer {
    Accept {
        source: String,
        destination: String,
        amount: i64,
        reference: Option<String>,
    },
    Refuse(&'static str),
    Malformed,
}

/// The `decode_ledger` target's checks: the first byte picks the decoder (`b` a bulk body; any
/// other byte, modulo 4, one of the others, as before the bulk decoder existed, so that the corpus
/// keeps its meaning).
pub fn check_ledger(data: &[u8]) {
    let Some((selector, input)) = data.split_first() else {
        return;
    };
    if *selector == b'b' {
        return check_bulk(input);
    }
    match selector % 4 {
        0 => check_transfer(input),
        1 => check_open_account(input),
        2 => check_idempotency_key(input),
        _ => check_parameters(input),
    }
}

/// `decode::transfer` agrees with the model, keeps its values within the rules, and decodes the
/// same request however it is re-encoded; the fingerprint tells requests apart.
pub fn check_transfer(body: &[u8]) {
    let result = decode::transfer(body);
    match &result {
        Ok(request) => {
            let (source, destination) = (request.source.as_str(), request.destination.as_str());
            assert!(
                card_is_valid(source) && card_is_valid(destination),
                "cards of {}",
                shown(body)
            );
            assert_ne!(source, destination, "a transfer to itself from {}", shown(body));
            let amount = request.amount.minor_units();
            assert!(
                amount > 0 && amount.unsigned_abs() <= AMOUNT_ABS_MAX,
                "amount {amount}"
            );
            let reference = request.reference.as_ref().map(|r| r.as_str());
            assert!(reference.is_none_or(|r| r.len() <= REFERENCE_BYTES_MAX));
            let forward = serde_json::json!({
                "source": source, "destination": destination, "amount": amount, "reference": reference,
            });
            let mut encodings = vec![
                serde_json::to_vec(&forward).expect("a JSON value encodes"),
                serde_json::to_vec_pretty(&forward).expect("a JSON value encodes"),
            ];
            if reference.is_none() {
                encodings.push(
                    format!(r#"{{ "amount":{amount}, "destination":"{destination}", "source":"{source}" }}"#)
                        .into_bytes(),
                );
            }
            for encoded in encodings {
                assert_eq!(
                    decode::transfer(&encoded).as_ref(),
                    Ok(request),
                    "{} re-encoded",
                    shown(body)
                );
            }
            let fingerprint = Command::Transfer(request.clone()).fingerprint();
            let mut other = request.clone();
            other.amount = PositiveAmount::new(if amount > 1 { amount - 1 } else { 2 }).unwrap();
            assert_ne!(Command::Transfer(other).fingerprint(), fingerprint);
            let mut other = request.clone();
            other.reference = match reference {
                None => Some(Reference::new("null".to_owned()).unwrap()),
                Some(_) => None,
            };
            assert_ne!(Command::Transfer(other).fingerprint(), fingerprint);
        }
        Err(error) => check_refused_with(body, error, &TRANSFER_CODES),
    }
    match (model_transfer(body), &result) {
        (
            ExpectedTransfer::Accept {
                source,
                destination,
                amount,
                reference,
            },
            Ok(request),
        ) => {
            assert_eq!(request.source.as_str(), source, "source of {}", shown(body));
            assert_eq!(
                request.destination.as_str(),
                destination,
                "destination of {}",
                shown(body)
            );
            assert_eq!(request.amount.minor_units(), amount, "amount of {}", shown(body));
            assert_eq!(
                request.reference.as_ref().map(|r| r.as_str()),
                reference.as_deref(),
                "reference of {}",
                shown(body)
            );
        }
        (ExpectedTransfer::Refuse(code), Err(error)) => {
            assert_eq!(error.code.as_str(), code, "code for {}: {error:?}", shown(body));
        }
        (ExpectedTransfer::Malformed, Err(error)) => assert!(
            MALFORMED_CODES.contains(&error.code.as_str()),
            "{} is not JSON but was refused with {:?}",
            shown(body),
            error.code
        ),
        (expected, result) => panic!(
            "decode::transfer({}) = {result:?}, but the rules say {expected:?}",
            shown(body)
        ),
    }
}

/// Most items the fuzzed bulk decoder takes: small, so that the limit is reached by inputs the
/// fuzzer can make.
const BULK_ITEMS_MAX: usize = 4;

/// Codes a refused bulk body may get: a transfer's, a bad item key, too many items (413).
const BULK_CODES: [&str; 10] = [
    "invalid_json",
    "missing_field",
    "unknown_field",
    "duplicate_field",
    "invalid_card_number",
    "invalid_amount",
    "invalid_reference",
    "same_account",
    "invalid_idempotency_key",
    "body_too_large",
];

/// `decode::bulk` (a `POST /transfers/bulk` body; each item is also an NDJSON line): an accepted
/// body has 1 to [`BULK_ITEMS_MAX`] items, each exactly what `decode::bulk_item` makes of its text
/// and, without a key, what `POST /transfers` makes of it; a refused one names, when it blames an
/// item, the first item that `decode::bulk_item` refuses, with the same code.
pub fn check_bulk(body: &[u8]) {
    #[derive(serde::Deserialize)]
    struct Shape<'a> {
        #[serde(borrow)]
        transfers: Vec<&'a serde_json::value::RawValue>,
    }
    let result = decode::bulk(body, BULK_ITEMS_MAX, "/transfers");
    // The items as the decoder saw them, when the body is the right shape at all. serde would
    // also read a struct from an array (`[[{...}]]`); the decoder refuses anything but an object.
    let is_object = body.trim_ascii_start().first() == Some(&b'{');
    let items: Option<Vec<&[u8]>> = serde_json::from_slice::<Shape>(body)
        .ok()
        .filter(|_| is_object)
        .map(|shape| shape.transfers.iter().map(|item| item.get().as_bytes()).collect());
    match &result {
        Ok(bulk) => {
            let items = items
                .as_deref()
                .unwrap_or_else(|| panic!("accepted {} of the wrong shape", shown(body)));
            assert!(
                (1..=BULK_ITEMS_MAX).contains(&bulk.items.len()),
                "{} items",
                bulk.items.len()
            );
            assert_eq!(items.len(), bulk.items.len());
            assert_eq!(bulk.item_scope, "/transfers");
            for (item, decoded) in items.iter().zip(&bulk.items) {
                assert_eq!(
                    decode::bulk_item(item).as_ref(),
                    Ok(decoded),
                    "item {}",
                    shown(item)
                );
                check_bulk_item(item, decoded);
            }
        }
        Err(error) => {
            let status = error.status().as_u16();
            assert!(
                matches!(status, 400 | 413),
                "status for {}: {error:?}",
                shown(body)
            );
            assert!(
                BULK_CODES.contains(&error.code.as_str()),
                "undocumented code {error:?}"
            );
            assert!(!error.message.is_empty());
            assert_eq!(
                (error.balance, error.allow, error.retry_after),
                (None, None, None)
            );
            if let Some(index) = error.index() {
                let items = items
                    .as_deref()
                    .unwrap_or_else(|| panic!("an item blamed in {}", shown(body)));
                let index = index as usize;
                assert!(
                    error.message.starts_with(&format!("transfers[{index}]: ")),
                    "{error:?}"
                );
                assert!(
                    items.len() <= BULK_ITEMS_MAX,
                    "{} items decoded one by one",
                    items.len()
                );
                for item in &items[..index] {
                    assert!(
                        decode::bulk_item(item).is_ok(),
                        "an earlier item {} is bad",
                        shown(item)
                    );
                }
                let blamed = decode::bulk_item(items[index]).expect_err("the blamed item is bad");
                assert_eq!(blamed.code, error.code, "item {}", shown(items[index]));
            } else if let Some(items) = items.as_deref().filter(|items| !items.is_empty()) {
                // Refused without an index, the shape being right: only for the item count.
                assert_eq!(
                    error.code.as_str(),
                    "body_too_large",
                    "{error:?} for {}",
                    shown(body)
                );
                assert!(items.len() > BULK_ITEMS_MAX);
            }
        }
    }
    // Every item's text, on its own, as an NDJSON line would be.
    for item in items.into_iter().flatten() {
        if let Ok(decoded) = decode::bulk_item(item) {
            check_bulk_item(item, &decoded);
        }
    }
}

/// An accepted item is a valid transfer with a valid key, and is what `POST /transfers` makes of
/// the same text when that text has no key.
fn check_bulk_item(text: &[u8], item: &tallyd::domain::BulkItem) {
    let Command::Transfer(transfer) = &item.command else {
        panic!("a bulk item that is not a transfer: {:?}", item.command);
    };
    if let Some(key) = &item.key {
        check_idempotency_key(key.as_str().as_bytes());
    }
    match decode::transfer(text) {
        Ok(single) => assert_eq!(&single, transfer, "{}", shown(text)),
        // POST /transfers refuses exactly the idempotency_key field it does not take.
        Err(error) => {
            assert_eq!(error.code.as_str(), "unknown_field", "{}: {error:?}", shown(text));
            assert!(error.message.contains("idempotency_key"), "{error:?}");
        }
    }
}

/// The rules of `POST /transfers` applied by hand, in the decoder's order: the members (unknown,
/// duplicate, missing), the source, the destination, the amount, the reference, then whether
/// source and destination are one card.
pub fn model_transfer(body: &[u8]) -> ExpectedTransfer {
    use ExpectedTransfer::{Malformed, Refuse};
    let Some(document) = read_document(body) else {
        return Malformed;
    };
    let Some(members) = document else {
        return Refuse("invalid_json");
    };
    let (mut source, mut destination, mut amount, mut reference) = (None, None, None, None);
    for (key, item) in members {
        let Some(key) = key else {
            return Refuse("invalid_json");
        };
        let slot = match key.as_str() {
            "source" => &mut source,
            "destination" => &mut destination,
            "amount" => &mut amount,
            "reference" => &mut reference,
            _ => return Refuse("unknown_field"),
        };
        if slot.is_some() {
            return Refuse("duplicate_field");
        }
        *slot = Some(item);
    }
    let (Some(source), Some(destination), Some(amount)) = (source, destination, amount) else {
        return Refuse("missing_field");
    };
    let card = |item: Item| match item {
        Item::String(None) => Err("invalid_json"),
        Item::String(Some(text)) => card_digits(&text).ok_or("invalid_card_number"),
        _ => Err("invalid_card_number"),
    };
    let source = match card(source) {
        Ok(card) => card,
        Err(code) => return Refuse(code),
    };
    let destination = match card(destination) {
        Ok(card) => card,
        Err(code) => return Refuse(code),
    };
    let amount = match amount {
        Item::Number(text) if !text.contains(['.', 'e', 'E']) => text.parse::<i64>().ok(),
        _ => None,
    };
    let Some(amount) = amount.filter(|a| *a > 0 && a.unsigned_abs() <= AMOUNT_ABS_MAX) else {
        return Refuse("invalid_amount");
    };
    let reference = match reference {
        None | Some(Item::Null) => None,
        Some(Item::String(None)) => return Refuse("invalid_json"),
        Some(Item::String(Some(text))) if text.len() <= REFERENCE_BYTES_MAX => Some(text),
        Some(_) => return Refuse("invalid_reference"),
    };
    if source == destination {
        return Refuse("same_account");
    }
    ExpectedTransfer::Accept {
        source,
        destination,
        amount,
        reference,
    }
}

/// `decode::open_account` agrees with the rules: one member, `card_number`, a valid card.
pub fn check_open_account(body: &[u8]) {
    let result = decode::open_account(body);
    if let Err(error) = &result {
        check_refused_with(body, error, &ACCOUNT_CODES);
    }
    let expected: Result<String, Option<&str>> = match read_document(body) {
        None => Err(None),
        Some(None) => Err(Some("invalid_json")),
        Some(Some(members)) => {
            let mut card = None;
            let mut problem = None;
            for (key, item) in members {
                match key.as_deref() {
                    None => problem = Some("invalid_json"),
                    Some("card_number") if card.is_some() => problem = Some("duplicate_field"),
                    Some("card_number") => card = Some(item),
                    Some(_) => problem = Some("unknown_field"),
                }
                if problem.is_some() {
                    break;
                }
            }
            match (problem, card) {
                (Some(code), _) => Err(Some(code)),
                (None, None) => Err(Some("missing_field")),
                (None, Some(Item::String(None))) => Err(Some("invalid_json")),
                (None, Some(Item::String(Some(text)))) => {
                    card_digits(&text).ok_or(Some("invalid_card_number"))
                }
                (None, Some(_)) => Err(Some("invalid_card_number")),
            }
        }
    };
    match (expected, &result) {
        (Ok(card), Ok(request)) => assert_eq!(request.card.as_str(), card, "card of {}", shown(body)),
        (Err(Some(code)), Err(error)) => {
            assert_eq!(error.code.as_str(), code, "code for {}: {error:?}", shown(body))
        }
        (Err(None), Err(error)) => assert!(
            MALFORMED_CODES.contains(&error.code.as_str()),
            "{} is not JSON but was refused with {:?}",
            shown(body),
            error.code
        ),
        (expected, result) => panic!(
            "decode::open_account({}) = {result:?}, but the rules say {expected:?}",
            shown(body)
        ),
    }
}

/// The `Idempotency-Key` header: accepted exactly when it is 1 to 255 printable ASCII bytes, and
/// then kept byte for byte.
pub fn check_idempotency_key(header: &[u8]) {
    let valid = KEY_BYTES.contains(&header.len()) && header.iter().all(|b| (0x20..=0x7e).contains(b));
    match decode::idempotency_key(Some(header)) {
        Ok(Some(key)) => {
            assert!(valid, "accepted the key {}", shown(header));
            assert_eq!(key.as_str().as_bytes(), header, "the key was changed");
        }
        Ok(None) => panic!("a header {} read as no key", shown(header)),
        Err(error) => {
            assert!(!valid, "refused the key {}: {error:?}", shown(header));
            assert_eq!(error.code.as_str(), "invalid_idempotency_key");
            assert_eq!(error.status().as_u16(), 400);
            assert!(!error.message.is_empty());
        }
    }
    assert_eq!(decode::idempotency_key(None).ok(), Some(None));
}

/// Path and query parameters: an id, limit or cursor is a positive i64 in plain digits; a card in
/// a path or query is percent-decoded (and in a query `+` is a space) and then a card number.
pub fn check_parameters(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let id = (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse::<i64>().ok())
        .flatten()
        .filter(|n| *n > 0);
    match decode::id_parameter("limit", text) {
        Ok(n) => assert_eq!(Some(n), id, "id_parameter accepted {text:?}"),
        Err(error) => {
            assert_eq!(id, None, "id_parameter refused {text:?}");
            assert_eq!(error.code.as_str(), "invalid_parameter");
        }
    }
    for (part, plus_is_space) in [(decode::Part::Path, false), (decode::Part::Query, true)] {
        let expected = model_percent_decode(text, plus_is_space)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .and_then(|decoded| card_digits(&decoded));
        match decode::card_parameter(text, part) {
            Ok(card) => assert_eq!(Some(card.as_str()), expected.as_deref(), "{part:?} card {text:?}"),
            Err(error) => {
                assert_eq!(expected, None, "{part:?} card {text:?} refused");
                assert_eq!(error.code.as_str(), "invalid_card_number");
            }
        }
    }
    check_domain(input);
}

/// `%XX` (two hex digits) is a byte, and in a query `+` is a space; any other `%` is broken.
fn model_percent_decode(text: &str, plus_is_space: bool) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        match byte {
            b'%' => {
                let hex = std::str::from_utf8(rest.get(..2)?).ok()?;
                if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(hex, 16).ok()?);
                rest = &rest[2..];
            }
            b'+' if plus_is_space => out.push(b' '),
            byte => out.push(byte),
        }
    }
    Some(out)
}

/// A refusal of a body: a 400 with one of `codes`, a message, no extras.
fn check_refused_with(body: &[u8], error: &ApiError, codes: &[&str]) {
    assert_eq!(
        error.status().as_u16(),
        400,
        "status for {}: {error:?}",
        shown(body)
    );
    assert!(
        codes.contains(&error.code.as_str()),
        "undocumented code for {}: {error:?}",
        shown(body)
    );
    assert!(!error.message.is_empty(), "empty message for {}", shown(body));
    assert_eq!(error.balance, None, "balance on {error:?}");
    assert_eq!(error.allow, None, "allow on {error:?}");
    assert_eq!(error.retry_after, None, "retry_after on {error:?}");
    assert_eq!(error.card_number, None, "card_number on {error:?}");
}
