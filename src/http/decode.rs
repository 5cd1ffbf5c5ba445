//! Turning request bytes into validated commands, or saying exactly what is wrong: bodies, the
//! `Idempotency-Key` header, path and query parameters. Pure and panic-free: this is the code the
//! fuzzer drives.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::error::{ApiError, ErrorCode};
use crate::domain::{
    Amount, BatchItem, BulkItem, BulkTransferRequest, CaptureRequest, CardNumber, Command, HoldRequest,
    IdempotencyKey, InvalidField, OpenAccountRequest, PositiveAmount, Reference, SetLimitRequest,
    TransactionRequest, TransferRequest, VoidRequest, HOLD_EXPIRY_S_MAX, OVERDRAFT_LIMIT_MAX,
};

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransfer<'a> {
    #[serde(borrow)]
    source: &'a RawValue,
    #[serde(borrow)]
    destination: &'a RawValue,
    #[serde(borrow)]
    amount: &'a RawValue,
    #[serde(borrow, default)]
    reference: Option<&'a RawValue>,
}

/// One item of `POST /transfers/bulk`: a transfer's fields and its own idempotency key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBulkItem<'a> {
    #[serde(borrow)]
    source: &'a RawValue,
    #[serde(borrow)]
    destination: &'a RawValue,
    #[serde(borrow)]
    amount: &'a RawValue,
    #[serde(borrow, default)]
    reference: Option<&'a RawValue>,
    #[serde(borrow, default)]
    idempotency_key: Option<&'a RawValue>,
}

/// The body of `POST /transfers/bulk`: the items stay raw until each is decoded on its own, so
/// that a bad one is named by its index. They borrow from the body: nothing is copied.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBulk<'a> {
    #[serde(borrow)]
    transfers: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount<'a> {
    #[serde(borrow)]
    card_number: &'a RawValue,
    #[serde(borrow, default)]
    overdraft_limit: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit<'a> {
    #[serde(borrow)]
    overdraft_limit: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHold<'a> {
    #[serde(borrow)]
    card_number: &'a RawValue,
    #[serde(borrow)]
    amount: &'a RawValue,
    #[serde(borrow, default)]
    destination: Option<&'a RawValue>,
    #[serde(borrow, default)]
    expires_in_s: Option<&'a RawValue>,
    #[serde(borrow, default)]
    reference: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapture<'a> {
    #[serde(borrow, default)]
    amount: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVoid {}

/// A capture or a void as an item of a batch: the hold is named in the item, not the path.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCaptureItem<'a> {
    #[serde(borrow)]
    hold_id: &'a RawValue,
    #[serde(borrow, default)]
    amount: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVoidItem<'a> {
    #[serde(borrow)]
    hold_id: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatch<'a> {
    #[serde(borrow)]
    items: Vec<&'a RawValue>,
}

/// Decodes and validates a `POST /transaction` body.
pub fn transaction(body: &[u8]) -> Result<TransactionRequest, ApiError> {
    let raw: RawTransaction = object(body, "card_number and amount")?;
    let card = card_number(raw.card_number, "card_number")?;
    let amount = signed_amount(raw.amount)
        .map_err(|error| ApiError::new(ErrorCode::InvalidAmount, error.to_string()))?;
    Ok(TransactionRequest { card, amount })
}

/// Decodes and validates a `POST /transfers` body.
pub fn transfer(body: &[u8]) -> Result<TransferRequest, ApiError> {
    let raw: RawTransfer = object(body, "source, destination and amount")?;
    validate_transfer(raw.source, raw.destination, raw.amount, raw.reference)
}

/// A transfer's raw fields, checked (shared by `POST /transfers` and the items of a bulk request).
fn validate_transfer(
    source: &RawValue,
    destination: &RawValue,
    amount: &RawValue,
    raw_reference: Option<&RawValue>,
) -> Result<TransferRequest, ApiError> {
    let source = card_number(source, "source")?;
    let destination = card_number(destination, "destination")?;
    let amount = positive_amount(amount)
        .map_err(|error| ApiError::new(ErrorCode::InvalidAmount, error.to_string()))?;
    let reference = match raw_reference {
        None => None,
        Some(raw) => Some(reference(raw)?),
    };
    if source == destination {
        return Err(ApiError::new(
            ErrorCode::SameAccount,
            "source and destination are the same account",
        ));
    }
    Ok(TransferRequest {
        source,
        destination,
        amount,
        reference,
    })
}

/// Decodes and validates a `POST /transfers/bulk` body of at most `items_max` transfers. Any bad
/// item refuses the whole request, with the item's index in the error.
pub fn bulk(
    body: &[u8],
    items_max: usize,
    item_scope: &'static str,
) -> Result<BulkTransferRequest, ApiError> {
    let raw: RawBulk = object(body, "transfers").map_err(|error| bulk_shape_error(error, items_max))?;
    check_bulk_count(raw.transfers.len(), items_max)?;
    let items = raw
        .transfers
        .iter()
        .enumerate()
        .map(|(index, item)| bulk_item(item.get().as_bytes()).map_err(|error| error.at_index(index)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(BulkTransferRequest { items, item_scope })
}

/// 1 to `items_max` items: more is a body too large (413, the limit named); none is not a request.
pub fn check_bulk_count(count: usize, items_max: usize) -> Result<(), ApiError> {
    if count > items_max {
        return Err(ApiError::new(
            ErrorCode::BodyTooLarge,
            format!(
                "a bulk request holds at most {items_max} transfers (--bulk-items-max); this one has {count}"
            ),
        ));
    }
    if count == 0 {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            format!("transfers must hold 1 to {items_max} transfers"),
        ));
    }
    Ok(())
}

/// serde says "invalid type" for `"transfers": 5` and friends: say what the field must be.
fn bulk_shape_error(error: ApiError, items_max: usize) -> ApiError {
    if error.code == ErrorCode::InvalidJson
        && error.message.starts_with("the body must be a JSON object with")
    {
        return ApiError::new(
            ErrorCode::InvalidJson,
            format!("the body must be a JSON object whose transfers is an array of 1 to {items_max} transfer objects ({})", error.message),
        );
    }
    error
}

/// One transfer of a bulk request (a JSON object, or one line of NDJSON): the fields of
/// `POST /transfers` and an optional `idempotency_key`, checked exactly as that route checks them.
pub fn bulk_item(item: &[u8]) -> Result<BulkItem, ApiError> {
    let raw: RawBulkItem = object(item, "source, destination and amount")?;
    let transfer = validate_transfer(raw.source, raw.destination, raw.amount, raw.reference)?;
    let key = match raw.idempotency_key {
        None => None,
        Some(raw) => {
            let invalid = || {
                ApiError::new(
                    ErrorCode::InvalidIdempotencyKey,
                    "idempotency_key must be a string of 1 to 255 printable ASCII characters",
                )
            };
            if !raw.get().starts_with('"') {
                return Err(invalid());
            }
            let text: String = string(raw)?;
            Some(IdempotencyKey::parse(text.as_bytes()).map_err(|_| invalid())?)
        }
    };
    Ok(BulkItem {
        command: Command::Transfer(transfer),
        key,
    })
}

/// Decodes and validates a `POST /accounts` body.
pub fn open_account(body: &[u8]) -> Result<OpenAccountRequest, ApiError> {
    let raw: RawAccount = object(body, "card_number")?;
    Ok(OpenAccountRequest {
        card: card_number(raw.card_number, "card_number")?,
        overdraft_limit: match raw.overdraft_limit {
            None => 0,
            Some(raw) => overdraft_limit(raw)?,
        },
    })
}

/// Decodes and validates a `PATCH /accounts/{card}` body, for the card in the path.
pub fn set_limit(card: &str, body: &[u8]) -> Result<SetLimitRequest, ApiError> {
    let card = card_parameter(card, Part::Path)?;
    let raw: RawLimit = object(body, "overdraft_limit")?;
    Ok(SetLimitRequest {
        card,
        overdraft_limit: overdraft_limit(raw.overdraft_limit)?,
    })
}

/// Decodes and validates a `POST /holds` body; a hold without `expires_in_s` lasts
/// `default_expiry_s`.
pub fn hold(body: &[u8], default_expiry_s: i64) -> Result<HoldRequest, ApiError> {
    let raw: RawHold = object(body, "card_number and amount")?;
    let card = card_number(raw.card_number, "card_number")?;
    let amount = positive_amount(raw.amount)
        .map_err(|error| ApiError::new(ErrorCode::InvalidAmount, error.to_string()))?;
    let destination = match raw.destination {
        None => None,
        Some(raw) => Some(card_number(raw, "destination")?),
    };
    if destination.as_ref() == Some(&card) {
        return Err(ApiError::new(
            ErrorCode::SameAccount,
            "the destination is the held card itself",
        ));
    }
    let expires_in_s = match raw.expires_in_s {
        None => default_expiry_s,
        Some(raw) => integer_literal(raw)
            .filter(|s| (1..=HOLD_EXPIRY_S_MAX).contains(s))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidExpiry,
                    format!("expires_in_s must be an integer number of seconds from 1 to {HOLD_EXPIRY_S_MAX} (30 days)"),
                )
            })?,
    };
    Ok(HoldRequest {
        card,
        amount,
        destination,
        expires_in_s,
        reference: optional_reference(raw.reference)?,
    })
}

/// Decodes a `POST /holds/{id}/capture`: the hold in the path, an optional `amount` in the body
/// (which may be empty: all of the hold).
pub fn capture(id: &str, body: &[u8]) -> Result<CaptureRequest, ApiError> {
    let hold_id = id_parameter("the hold id", id)?;
    let raw: RawCapture = object(or_empty_object(body), "an optional amount")?;
    Ok(CaptureRequest {
        hold_id,
        amount: capture_amount(raw.amount)?,
    })
}

/// Decodes a `POST /holds/{id}/void`: the hold in the path; the body is empty or `{}`.
pub fn void(id: &str, body: &[u8]) -> Result<VoidRequest, ApiError> {
    let hold_id = id_parameter("the hold id", id)?;
    let _: RawVoid = object(or_empty_object(body), "no fields")?;
    Ok(VoidRequest { hold_id })
}

/// Decodes a `POST /batches` body: 1 to `items_max` items, each an object with a `type` and the
/// fields of that type's route. A malformed item refuses the whole batch, naming its index.
pub fn batch(body: &[u8], default_expiry_s: i64, items_max: usize) -> Result<Vec<BatchItem>, ApiError> {
    let raw: RawBatch = object(body, "items")?;
    if raw.items.is_empty() || raw.items.len() > items_max {
        return Err(ApiError::new(
            ErrorCode::InvalidBatch,
            format!(
                "items must hold 1 to {items_max} items; this one has {}",
                raw.items.len()
            ),
        ));
    }
    raw.items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            batch_item(item, default_expiry_s).map_err(|mut error| {
                error.message = format!("items[{index}]: {}", error.message);
                error
            })
        })
        .collect()
}

fn batch_item(raw: &RawValue, default_expiry_s: i64) -> Result<BatchItem, ApiError> {
    let invalid = |message: &str| ApiError::new(ErrorCode::InvalidBatch, message.to_owned());
    let fields = match serde_json::from_str::<Fields>(raw.get()) {
        Ok(fields) => fields.0,
        Err(_) => return Err(invalid("an item must be a JSON object with a type")),
    };
    let mut kind = None;
    let mut rest = Vec::with_capacity(fields.len());
    for (name, value) in fields {
        if name == "type" {
            if kind.is_some() {
                return Err(ApiError::new(ErrorCode::DuplicateField, "duplicate field `type`"));
            }
            kind = Some(value);
        } else {
            // The name re-encoded, the value as it was written: the item's own decoder sees
            // exactly what the client sent, less its type.
            rest.push(format!("{}:{}", serde_json::Value::from(name), value.get()));
        }
    }
    let Some(kind) = kind else {
        return Err(ApiError::new(ErrorCode::MissingField, "missing field `type`"));
    };
    let body = format!("{{{}}}", rest.join(","));
    let body = body.as_bytes();
    Ok(match kind.get() {
        r#""transaction""# => BatchItem::Transaction(transaction(body)?),
        r#""transfer""# => BatchItem::Transfer(transfer(body)?),
        r#""hold""# => BatchItem::Hold(hold(body, default_expiry_s)?),
        r#""capture""# => {
            let raw: RawCaptureItem = object(body, "hold_id and an optional amount")?;
            BatchItem::Capture(CaptureRequest {
                hold_id: hold_id(raw.hold_id)?,
                amount: capture_amount(raw.amount)?,
            })
        }
        r#""void""# => {
            let raw: RawVoidItem = object(body, "hold_id")?;
            BatchItem::Void(VoidRequest {
                hold_id: hold_id(raw.hold_id)?,
            })
        }
        _ => {
            return Err(invalid(
                "type must be one of \"transfer\", \"transaction\", \"hold\", \"capture\", \"void\"",
            ))
        }
    })
}

/// A JSON object's fields in order, duplicates kept (so that the item's decoder refuses them).
struct Fields<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Visitor<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    fields.push(entry);
                }
                Ok(Fields(fields))
            }
        }
        deserializer.deserialize_map(Visitor(std::marker::PhantomData))
    }
}

fn hold_id(raw: &RawValue) -> Result<i64, ApiError> {
    integer_literal(raw)
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidParameter, "hold_id must be a positive integer"))
}

fn capture_amount(raw: Option<&RawValue>) -> Result<Option<PositiveAmount>, ApiError> {
    match raw {
        None => Ok(None),
        Some(raw) => positive_amount(raw)
            .map(Some)
            .map_err(|error| ApiError::new(ErrorCode::InvalidAmount, error.to_string())),
    }
}

fn overdraft_limit(raw: &RawValue) -> Result<i64, ApiError> {
    integer_literal(raw)
        .filter(|limit| (0..=OVERDRAFT_LIMIT_MAX).contains(limit))
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidLimit,
                format!("overdraft_limit must be an integer number of minor units from 0 to {OVERDRAFT_LIMIT_MAX}"),
            )
        })
}

fn optional_reference(raw: Option<&RawValue>) -> Result<Option<Reference>, ApiError> {
    match raw {
        None => Ok(None),
        Some(raw) => reference(raw).map(Some),
    }
}

/// An empty body stands for `{}` where every field is optional.
fn or_empty_object(body: &[u8]) -> &[u8] {
    if body.trim_ascii().is_empty() {
        b"{}"
    } else {
        body
    }
}

/// The `Idempotency-Key` header, if present.
pub fn idempotency_key(header: Option<&[u8]>) -> Result<Option<IdempotencyKey>, ApiError> {
    header
        .map(|bytes| {
            IdempotencyKey::parse(bytes)
                .map_err(|error| ApiError::new(ErrorCode::InvalidIdempotencyKey, error.to_string()))
        })
        .transpose()
}

/// Where a parameter came from: a query string's values also spell a space as `+`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Path,
    Query,
}

/// A card number in a path or query string, percent-decoded first (so `6219%208619%200042%208640`
/// is the grouped card `6219 8619 0042 8640`).
pub fn card_parameter(text: &str, part: Part) -> Result<CardNumber, ApiError> {
    let invalid = || ApiError::new(ErrorCode::InvalidCardNumber, InvalidField::CardNumber.to_string());
    let decoded = percent_decode(text, part).ok_or_else(invalid)?;
    let text = std::str::from_utf8(&decoded).map_err(|_| invalid())?;
    CardNumber::parse(text).map_err(|_| invalid())
}

/// `%XX` escapes (and, in a query, `+` as a space); `None` for a broken escape.
pub fn percent_decode(text: &str, part: Part) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' if part == Part::Query => {
                out.push(b' ');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    Some(out)
}

/// A positive 63-bit integer parameter (an id, a cursor, a time): digits only, no sign, no spaces.
pub fn id_parameter(name: &str, text: &str) -> Result<i64, ApiError> {
    let invalid = || {
        ApiError::new(
            ErrorCode::InvalidParameter,
            format!("{name} must be a positive integer"),
        )
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    text.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(invalid)
}

/// The pairs of a query string, undecoded; a parameter given twice is refused by the caller.
pub fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// A JSON object of the given shape (only an object: serde would also read a struct from an array).
fn object<'a, T: Deserialize<'a>>(body: &'a [u8], fields: &str) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "the body is empty; send a JSON object",
        ));
    }
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "the body must be a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|error| json_error(&error, fields))
}

/// A card number is a JSON string (escapes allowed) of 6 to 19 ASCII digits.
fn card_number(raw: &RawValue, field: &str) -> Result<CardNumber, ApiError> {
    let invalid = |error: InvalidField| {
        let message = error.to_string().replacen("card_number", field, 1);
        ApiError::new(ErrorCode::InvalidCardNumber, message)
    };
    if !raw.get().starts_with('"') {
        return Err(invalid(InvalidField::CardNumber));
    }
    let text: String = string(raw)?;
    CardNumber::parse(&text).map_err(invalid)
}

fn reference(raw: &RawValue) -> Result<Reference, ApiError> {
    let invalid = || ApiError::new(ErrorCode::InvalidReference, InvalidField::Reference.to_string());
    if !raw.get().starts_with('"') {
        return Err(invalid());
    }
    Reference::new(string(raw)?).map_err(|_| invalid())
}

/// A JSON string's value. One that does not decode is broken JSON (a lone surrogate escape, say),
/// not a bad value.
fn string<T: DeserializeOwned>(raw: &RawValue) -> Result<T, ApiError> {
    serde_json::from_str(raw.get()).map_err(|error| json_error(&error, "its fields"))
}

/// An integer literal: an optional minus and digits only, so `1.0`, `1e3` and numbers beyond any
/// float are refused as amounts, not as malformed JSON.
fn integer_literal(raw: &RawValue) -> Option<i64> {
    let text = raw.get();
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<i64>().ok()
}

fn signed_amount(raw: &RawValue) -> Result<Amount, InvalidField> {
    integer_literal(raw)
        .ok_or(InvalidField::Amount)
        .and_then(Amount::new)
}

fn positive_amount(raw: &RawValue) -> Result<PositiveAmount, InvalidField> {
    integer_literal(raw)
        .ok_or(InvalidField::PositiveAmount)
        .and_then(PositiveAmount::new)
}

/// Sorts serde's errors into our codes. serde reports field problems only in its message, so the
/// message's stable prefix decides; everything else is malformed JSON.
fn json_error(error: &serde_json::Error, fields: &str) -> ApiError {
    let message = error.to_string();
    let code = if !error.is_data() {
        ErrorCode::InvalidJson
    } else if message.starts_with("unknown field") {
        ErrorCode::UnknownField
    } else if message.starts_with("missing field") {
        ErrorCode::MissingField
    } else if message.starts_with("duplicate field") {
        ErrorCode::DuplicateField
    } else {
        ErrorCode::InvalidJson
    };
    let message = match code {
        ErrorCode::InvalidJson if error.is_data() => {
            format!("the body must be a JSON object with {fields} ({message})")
        }
        ErrorCode::InvalidJson => format!("the body is not valid JSON ({message})"),
        _ => message,
    };
    ApiError::new(code, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(body: &str) -> &'static str {
        transaction(body.as_bytes()).expect_err(body).code.as_str()
    }

    fn transfer_code(body: &str) -> &'static str {
        transfer(body.as_bytes()).expect_err(body).code.as_str()
    }

    #[test]
    fn a_null_optional_field_is_the_field_left_out() {
        // serde reads `null` into `None` for an `Option<&RawValue>`, so no decoder sees it.
        let hold = hold(
            br#"{"card_number":"111111","amount":5,"destination":null,"reference":null,"expires_in_s":null}"#,
            60,
        )
        .unwrap();
        assert_eq!(
            (hold.destination, hold.reference, hold.expires_in_s),
            (None, None, 60)
        );
        assert_eq!(capture("7", br#"{"amount":null}"#).unwrap().amount, None);
        let item =
            bulk_item(br#"{"source":"111111","destination":"222222","amount":5,"idempotency_key":null}"#);
        assert!(item.unwrap().key.is_none());
    }

    #[test]
    fn transfers_are_two_different_cards_a_positive_amount_and_an_optional_reference() {
        let ok =
            transfer(br#"{"source":"111111","destination":"222222","amount":5,"reference":"rent"}"#).unwrap();
        assert_eq!(ok.amount.minor_units(), 5);
        assert_eq!(ok.reference.unwrap().as_str(), "rent");
        let no_reference =
            transfer(br#"{"source":"111111","destination":"222222","amount":5,"reference":null}"#);
        assert!(no_reference.unwrap().reference.is_none());
        let long = format!(
            r#"{{"source":"111111","destination":"222222","amount":5,"reference":"{}"}}"#,
            "r".repeat(256)
        );
        let cases = [
            (
                r#"{"source":"111111","destination":"111111","amount":5}"#,
                "same_account",
            ),
            (
                r#"{"source":"111111","destination":"222222","amount":-5}"#,
                "invalid_amount",
            ),
            (
                r#"{"source":"111111","destination":"222222","amount":0}"#,
                "invalid_amount",
            ),
            (
                r#"{"source":"111111","destination":"222222","amount":1.5}"#,
                "invalid_amount",
            ),
            (
                r#"{"source":"111111","destination":"222222","amount":1000000000001}"#,
                "invalid_amount",
            ),
            (
                r#"{"source":"11111","destination":"222222","amount":5}"#,
                "invalid_card_number",
            ),
            (
                r#"{"source":"111111","destination":222222,"amount":5}"#,
                "invalid_card_number",
            ),
            (
                r#"{"source":"111111","destination":"222222","amount":5,"reference":5}"#,
                "invalid_reference",
            ),
            (long.as_str(), "invalid_reference"),
            (r#"{"source":"111111","amount":5}"#, "missing_field"),
            (
                r#"{"source":"111111","destination":"222222","amount":5,"memo":"x"}"#,
                "unknown_field",
            ),
            (r#"["111111"]"#, "invalid_json"),
        ];
        for (body, code) in cases {
            assert_eq!(transfer_code(body), code, "{body}");
        }
        let exactly_255 = format!(
            r#"{{"source":"111111","destination":"222222","amount":5,"reference":"{}"}}"#,
            "é".repeat(127) + "r"
        );
        assert!(
            transfer(exactly_255.as_bytes()).is_ok(),
            "255 bytes of UTF-8 is the limit"
        );
    }

    #[test]
    fn parameters_are_positive_integers_and_card_numbers() {
        assert_eq!(id_parameter("limit", "20").unwrap(), 20);
        for bad in [
            "",
            "0",
            "-1",
            "+1",
            "1.0",
            " 1",
            "1e3",
            "99999999999999999999",
            "%31",
        ] {
            assert_eq!(
                id_parameter("limit", bad).unwrap_err().code,
                ErrorCode::InvalidParameter,
                "{bad:?}"
            );
        }
        assert!(card_parameter("1234567890", Part::Path).is_ok());
        let grouped = card_parameter("6219%208619%200042%208640", Part::Path).unwrap();
        assert_eq!(grouped.as_str(), "6219861900428640");
        assert_eq!(
            card_parameter("6219+8619+0042+8640", Part::Query).unwrap(),
            grouped
        );
        assert!(
            card_parameter("6219+8619+0042+8640", Part::Path).is_err(),
            "a plus is a plus in a path"
        );
        for bad in [
            "%",
            "%3",
            "%zz1234567",
            "%+31234567",
            "123456%00",
            "%2e%2e%2f123456",
        ] {
            assert!(card_parameter(bad, Part::Query).is_err(), "{bad:?}");
        }
        assert_eq!(idempotency_key(None).unwrap(), None);
        assert!(idempotency_key(Some(b"")).is_err());
        assert!(idempotency_key(Some(b"abc")).unwrap().is_some());
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
            ErrorCode::InvalidJson
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
