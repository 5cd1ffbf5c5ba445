//! Turning request bytes into a validated [`TransactionRequest`], or saying exactly what is wrong.
//! Pure and panic-free: this is the code the fuzzer drives.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::ApiError;
use crate::domain::{Amount, CardNumber, InvalidField, TransactionRequest};

/// The body as JSON, before its values are checked. Fields are kept as their raw JSON text so that
/// each wrong type gets its own precise error and the amount is read as an integer literal, never
/// through a float; serde refuses unknown and duplicate fields.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransaction<'a> {
    #[serde(borrow)]
    card_number: &'a RawValue,
    #[serde(borrow)]
    amount: &'a RawValue,
}

/// Decodes and validates a `POST /transaction` body.
pub fn transaction(body: &[u8]) -> Result<TransactionRequest, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body is empty; send a JSON object",
        ));
    }
    // serde would also read a struct from a JSON array; only an object is a transaction.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    }
    let raw: RawTransaction = serde_json::from_slice(body).map_err(|error| json_error(&error))?;
    let card = card_number(raw.card_number)?;
    let amount =
        amount(raw.amount).map_err(|error| ApiError::bad_request("invalid_amount", error.to_string()))?;
    Ok(TransactionRequest { card, amount })
}

/// A card number is a JSON string (escapes allowed) of 6 to 19 ASCII digits.
fn card_number(raw: &RawValue) -> Result<CardNumber, ApiError> {
    let invalid = |error: InvalidField| ApiError::bad_request("invalid_card_number", error.to_string());
    if !raw.get().starts_with('"') {
        return Err(invalid(InvalidField::CardNumber));
    }
    // A string that does not decode is broken JSON (a lone surrogate escape, say), not a bad card.
    let text: String = serde_json::from_str(raw.get()).map_err(|error| json_error(&error))?;
    CardNumber::parse(&text).map_err(invalid)
}

/// An amount is a JSON integer literal: an optional minus and digits only, so `1.0`, `1e3` and
/// numbers beyond any float are refused as amounts, not as malformed JSON.
fn amount(raw: &RawValue) -> Result<Amount, InvalidField> {
    let text = raw.get();
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidField::Amount);
    }
    text.parse::<i64>()
        .map_err(|_| InvalidField::Amount)
        .and_then(Amount::new)
}

/// Sorts serde's errors into our codes. serde reports field problems only in its message, so the
/// message's stable prefix decides; everything else is malformed JSON.
fn json_error(error: &serde_json::Error) -> ApiError {
    let message = error.to_string();
    let code = if !error.is_data() {
        "invalid_json"
    } else if message.starts_with("unknown field") {
        "unknown_field"
    } else if message.starts_with("missing field") {
        "missing_field"
    } else if message.starts_with("duplicate field") {
        "duplicate_field"
    } else {
        "invalid_json"
    };
    let message = match code {
        "invalid_json" if error.is_data() => {
            format!("the body must be a JSON object with card_number and amount ({message})")
        }
        "invalid_json" => format!("the body is not valid JSON ({message})"),
        _ => message,
    };
    ApiError::bad_request(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(body: &str) -> &'static str {
        transaction(body.as_bytes()).expect_err(body).code
    }

    #[test]
    fn accepts_a_deposit_and_a_withdrawal() {
        let deposit = transaction(br#"{"card_number":"1234567890","amount":150}"#).unwrap();
        assert_eq!(deposit.card.as_str(), "1234567890");
        assert_eq!(deposit.amount.minor_units(), 150);
        let withdrawal =
            transaction(br#" { "amount" : -1000000000000 , "card_number" : "123456" } "#).unwrap();
        assert_eq!(withdrawal.amount.minor_units(), -1_000_000_000_000);
    }

    #[test]
    fn refuses_each_malformed_body_with_its_own_code() {
        let cases = [
            ("", "invalid_json"),
            ("{", "invalid_json"),
            ("null", "invalid_json"),
            ("[]", "invalid_json"),
            (r#""a string""#, "invalid_json"),
            (
                r#"{"card_number":"1234567890","amount":5} trailing"#,
                "invalid_json",
            ),
            (r#"{"card_number":"1234567890"}"#, "missing_field"),
            (r#"{"amount":5}"#, "missing_field"),
            (
                r#"{"card_number":"1234567890","amount":5,"currency":"EUR"}"#,
                "unknown_field",
            ),
            (
                r#"{"card_number":"1234567890","amount":5,"amount":6}"#,
                "duplicate_field",
            ),
            (r#"{"card_number":1234567890,"amount":5}"#, "invalid_card_number"),
            (r#"{"card_number":"12345","amount":5}"#, "invalid_card_number"),
            (
                r#"{"card_number":"12345678901234567890","amount":5}"#,
                "invalid_card_number",
            ),
            (
                r#"{"card_number":"12345678a0","amount":5}"#,
                "invalid_card_number",
            ),
            (r#"{"card_number":null,"amount":5}"#, "invalid_card_number"),
            (r#"{"card_number":"1234567890","amount":0}"#, "invalid_amount"),
            (r#"{"card_number":"1234567890","amount":1.5}"#, "invalid_amount"),
            (r#"{"card_number":"1234567890","amount":1.0}"#, "invalid_amount"),
            (r#"{"card_number":"1234567890","amount":1e3}"#, "invalid_amount"),
            (r#"{"card_number":"1234567890","amount":"150"}"#, "invalid_amount"),
            (
                r#"{"card_number":"1234567890","amount":1000000000001}"#,
                "invalid_amount",
            ),
            (
                r#"{"card_number":"1234567890","amount":-1000000000001}"#,
                "invalid_amount",
            ),
            (
                r#"{"card_number":"1234567890","amount":99999999999999999999}"#,
                "invalid_amount",
            ),
            (r#"{"card_number":"1234567890","amount":true}"#, "invalid_amount"),
            (r#"{"card_number":"1234567890","amount":1e400}"#, "invalid_amount"),
            (r#"{"card_number":"1234567890","amount":-0}"#, "invalid_amount"),
            (
                r#"{"card_number":"1234567890","amount":9223372036854775808}"#,
                "invalid_amount",
            ),
            (r#"{"card_number":1e400,"amount":5}"#, "invalid_card_number"),
            (r#"{"card_number":"\ud800123456","amount":5}"#, "invalid_json"),
        ];
        for (body, code) in cases {
            assert_eq!(code_of(body), code, "{body}");
        }
    }

    #[test]
    fn refuses_invalid_utf8_and_deep_nesting_without_panicking() {
        assert_eq!(
            transaction(b"{\"card_number\":\"12345\xff7890\",\"amount\":5}")
                .unwrap_err()
                .code,
            "invalid_json"
        );
        let deep = format!(
            "{{\"card_number\":\"1234567890\",\"amount\":{}1{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(
            code_of(&deep),
            "invalid_amount",
            "the amount is not an integer literal"
        );
        let deep_card = deep.replacen("\"1234567890\"", &"[".repeat(100_000), 1);
        assert_eq!(
            code_of(&deep_card),
            "invalid_json",
            "unbalanced nesting is malformed JSON"
        );
        assert_eq!(code_of(&"[".repeat(100_000)), "invalid_json");
    }
}
