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
use tallyd::domain::{Amount, CardNumber, Kind, TransactionRequest};
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
            Ok(card) => {
                assert!(card_is_valid(text), "CardNumber::parse accepted {text:?}");
                assert_eq!(card.as_str(), text, "CardNumber::parse changed {text:?}");
            }
            Err(_) => assert!(!card_is_valid(text), "CardNumber::parse refused {text:?}"),
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
    let Some(document) = document else {
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
        Item::String(Some(card)) if card_is_valid(&card) => card,
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

/// A top-level member's value, as far as the rules look at it.
enum Item<'a> {
    /// A string, decoded; `None` when an escape is a lone surrogate.
    String(Option<String>),
    /// A number's literal text.
    Number(&'a str),
    /// `true`, `false`, `null`, an array or an object.
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
            _ => {
                self.literal()?;
                Some(Item::Other)
            }
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

    fn literal(&mut self) -> Option<()> {
        let rest = &self.text[self.at..];
        let literal = ["true", "false", "null"]
            .into_iter()
            .find(|literal| rest.starts_with(literal))?;
        self.at += literal.len();
        Some(())
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
