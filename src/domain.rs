//! The vocabulary of the ledger: validated card numbers, amounts, references and idempotency keys,
//! the accounts money moves between, and one typed [`Command`] per kind of request. Everything here
//! is pure; a value that exists has passed validation.

use std::fmt;

/// Fewest digits in a card number.
pub const CARD_DIGITS_MIN: usize = 6;
/// Most digits in a card number (ISO/IEC 7812 primary account numbers run to 19).
pub const CARD_DIGITS_MAX: usize = 19;
/// Largest absolute amount of one transaction, in minor units (10^12 cents is ten billion).
pub const AMOUNT_ABS_MAX: i64 = 1_000_000_000_000;

/// Why a field was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidField {
    #[error("card_number must be a string of {CARD_DIGITS_MIN} to {CARD_DIGITS_MAX} ASCII digits")]
    CardNumber,
    #[error("amount must be a non-zero integer number of minor units between -{AMOUNT_ABS_MAX} and {AMOUNT_ABS_MAX}")]
    Amount,
    #[error("amount must be a positive integer number of minor units of at most {AMOUNT_ABS_MAX}")]
    PositiveAmount,
    #[error("reference must be a string of at most {REFERENCE_BYTES_MAX} bytes")]
    Reference,
    #[error(
        "the Idempotency-Key header must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} printable ASCII characters"
    )]
    IdempotencyKey,
}

/// Longest `reference` of a transfer, in bytes of UTF-8.
pub const REFERENCE_BYTES_MAX: usize = 255;
/// Longest `Idempotency-Key`, in bytes (printable ASCII, so also in characters).
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// The name of the system account that stands for the outside world: every deposit is a transfer
/// from it and every withdrawal a transfer to it, so it may go negative. It can never be named as
/// a card (a card number is digits only).
pub const WORLD_ACCOUNT: &str = "@world";

/// An account money moves between: a card, or the outside world.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Account {
    Card(CardNumber),
    World,
}

impl Account {
    /// The account's name as the store and the API show it: the card's digits, or [`WORLD_ACCOUNT`].
    pub fn name(&self) -> &str {
        match self {
            Account::Card(card) => card.as_str(),
            Account::World => WORLD_ACCOUNT,
        }
    }

    /// Reads a stored name back.
    pub fn from_name(name: &str) -> Option<Self> {
        if name == WORLD_ACCOUNT {
            Some(Account::World)
        } else {
            CardNumber::parse(name).ok().map(Account::Card)
        }
    }
}

/// A card number: 6 to 19 ASCII digits, kept as text so that leading zeros survive.
///
/// People write card numbers in groups, `6219 8619 0042 8640` or `6219-8619-0042-8640`, and so did
/// the Flask processor tallyd replaces. [`CardNumber::parse`] accepts exactly that: groups of digits
/// separated by single spaces, or by single dashes, never both in one number, with no separator at
/// either end; any group sizes, 6 to 19 digits in all. It keeps only the digits, so a card is stored,
/// compared and answered as digits however it was written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct CardNumber(String);

/// Longest card number as written, separators included: 19 digits and 18 separators.
pub const CARD_TEXT_BYTES_MAX: usize = 2 * CARD_DIGITS_MAX - 1;

impl CardNumber {
    pub fn parse(text: &str) -> Result<Self, InvalidField> {
        let bytes = text.as_bytes();
        if bytes.len() > CARD_TEXT_BYTES_MAX {
            return Err(InvalidField::CardNumber);
        }
        let separator = bytes.iter().copied().find(|b| !b.is_ascii_digit());
        let well_formed = match separator {
            None => true,
            Some(sep @ (b' ' | b'-')) => {
                bytes.first().is_some_and(u8::is_ascii_digit)
                    && bytes.last().is_some_and(u8::is_ascii_digit)
                    && bytes.iter().all(|b| b.is_ascii_digit() || *b == sep)
                    && !bytes.windows(2).any(|pair| pair[0] == sep && pair[1] == sep)
            }
            Some(_) => false,
        };
        let digits: String = text.chars().filter(char::is_ascii_digit).collect();
        if well_formed && (CARD_DIGITS_MIN..=CARD_DIGITS_MAX).contains(&digits.len()) {
            Ok(Self(digits))
        } else {
            Err(InvalidField::CardNumber)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A card number packed into 8 bytes, for the engine's table of millions of accounts: the digits'
/// value offset by how many shorter numbers exist, so that every card number (6 to 19 digits,
/// leading zeros included) has exactly one key, and the keys of numbers of one length keep their
/// order. All of them fit: there are about 1.1 × 10^19 card numbers and 1.8 × 10^19 keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardKey(u64);

/// How many card numbers are shorter than `digits` digits, for each length from 6 to 20.
const fn card_key_offsets() -> [u64; CARD_DIGITS_MAX + 2] {
    let mut offsets = [0u64; CARD_DIGITS_MAX + 2];
    let mut length = CARD_DIGITS_MIN;
    while length <= CARD_DIGITS_MAX {
        offsets[length + 1] = offsets[length] + 10u64.pow(length as u32);
        length += 1;
    }
    offsets
}
const CARD_KEY_OFFSETS: [u64; CARD_DIGITS_MAX + 2] = card_key_offsets();

impl CardKey {
    /// The key of a card number given as its digits alone; `None` for anything else.
    pub fn from_digits(digits: &str) -> Option<Self> {
        let bytes = digits.as_bytes();
        if !(CARD_DIGITS_MIN..=CARD_DIGITS_MAX).contains(&bytes.len())
            || !bytes.iter().all(u8::is_ascii_digit)
        {
            return None;
        }
        // 19 digits fit in a u64 (10^19 - 1 < 2^64), and so does the offset added to them.
        let value = bytes
            .iter()
            .fold(0u64, |value, digit| value * 10 + u64::from(digit - b'0'));
        Some(Self(CARD_KEY_OFFSETS[bytes.len()] + value))
    }

    pub fn of(card: &CardNumber) -> Self {
        Self::from_digits(card.as_str()).expect("a parsed card number is 6 to 19 digits")
    }

    /// The card number back, with its leading zeros.
    pub fn card(self) -> CardNumber {
        let length = (CARD_DIGITS_MIN..=CARD_DIGITS_MAX)
            .find(|length| self.0 < CARD_KEY_OFFSETS[length + 1])
            .expect("every key is below the offset past 19 digits");
        let value = self.0 - CARD_KEY_OFFSETS[length];
        CardNumber(format!("{value:0length$}"))
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A signed amount in minor units: positive deposits, negative withdrawals, never zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Amount(i64);

impl Amount {
    pub fn new(minor_units: i64) -> Result<Self, InvalidField> {
        if minor_units != 0 && minor_units.unsigned_abs() <= AMOUNT_ABS_MAX.unsigned_abs() {
            Ok(Self(minor_units))
        } else {
            Err(InvalidField::Amount)
        }
    }

    pub fn minor_units(self) -> i64 {
        self.0
    }

    pub fn kind(self) -> Kind {
        if self.0 > 0 {
            Kind::Deposit
        } else {
            Kind::Withdrawal
        }
    }
}

/// What a transaction is: how it is stored, shown and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// From the outside world to a card.
    Deposit,
    /// From a card to the outside world.
    Withdrawal,
    /// From one card to another.
    Transfer,
    /// Between a card and the outside world, made by `tallyd import` where an imported history does
    /// not add up to the balance it was imported with.
    Adjustment,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deposit => "deposit",
            Kind::Withdrawal => "withdrawal",
            Kind::Transfer => "transfer",
            Kind::Adjustment => "adjustment",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "deposit" => Kind::Deposit,
            "withdrawal" => Kind::Withdrawal,
            "transfer" => Kind::Transfer,
            "adjustment" => Kind::Adjustment,
            _ => return None,
        })
    }
}

/// A validated `POST /transaction`: a deposit or a withdrawal on one card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionRequest {
    pub card: CardNumber,
    pub amount: Amount,
}

/// A positive amount in minor units, at most [`AMOUNT_ABS_MAX`]: what a transfer moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositiveAmount(i64);

impl PositiveAmount {
    pub fn new(minor_units: i64) -> Result<Self, InvalidField> {
        if (1..=AMOUNT_ABS_MAX).contains(&minor_units) {
            Ok(Self(minor_units))
        } else {
            Err(InvalidField::PositiveAmount)
        }
    }

    pub fn minor_units(self) -> i64 {
        self.0
    }
}

/// Free text a client attaches to a transfer, at most [`REFERENCE_BYTES_MAX`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reference(String);

impl Reference {
    pub fn new(text: String) -> Result<Self, InvalidField> {
        if text.len() <= REFERENCE_BYTES_MAX {
            Ok(Self(text))
        } else {
            Err(InvalidField::Reference)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated `POST /transfers`: source and destination are different cards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest {
    pub source: CardNumber,
    pub destination: CardNumber,
    pub amount: PositiveAmount,
    pub reference: Option<Reference>,
}

/// Largest overdraft limit of an account, in minor units (the same bound as one amount).
pub const OVERDRAFT_LIMIT_MAX: i64 = AMOUNT_ABS_MAX;
/// Longest a hold may be kept before it expires, in seconds (30 days).
pub const HOLD_EXPIRY_S_MAX: i64 = 30 * 24 * 3600;

/// A validated `POST /accounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAccountRequest {
    pub card: CardNumber,
    /// How far below zero the balance may go, 0 to [`OVERDRAFT_LIMIT_MAX`].
    pub overdraft_limit: i64,
}

/// A validated `PATCH /accounts/{card}`: a new overdraft limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetLimitRequest {
    pub card: CardNumber,
    pub overdraft_limit: i64,
}

/// A validated `POST /holds`: reserve `amount` on `card` until it is captured, voided or expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    pub card: CardNumber,
    pub amount: PositiveAmount,
    /// The card a capture pays; `None`: the outside world (like a withdrawal).
    pub destination: Option<CardNumber>,
    /// Seconds from the hold's creation to its expiry, 1 to [`HOLD_EXPIRY_S_MAX`] (the default
    /// is filled in when the request is decoded, so that a retry means the same thing).
    pub expires_in_s: i64,
    pub reference: Option<Reference>,
}

/// A validated `POST /holds/{id}/capture`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRequest {
    pub hold_id: i64,
    /// `None`: all of the held amount.
    pub amount: Option<PositiveAmount>,
}

/// A validated `POST /holds/{id}/void`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidRequest {
    pub hold_id: i64,
}

/// One item of an all-or-nothing `POST /batches`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchItem {
    Transaction(TransactionRequest),
    Transfer(TransferRequest),
    Hold(HoldRequest),
    Capture(CaptureRequest),
    Void(VoidRequest),
}

impl BatchItem {
    /// The item's `type` in the request.
    pub fn type_name(&self) -> &'static str {
        match self {
            BatchItem::Transaction(_) => "transaction",
            BatchItem::Transfer(_) => "transfer",
            BatchItem::Hold(_) => "hold",
            BatchItem::Capture(_) => "capture",
            BatchItem::Void(_) => "void",
        }
    }

    /// The command the item would be on its own route.
    pub fn command(&self) -> Command {
        match self.clone() {
            BatchItem::Transaction(request) => Command::Transaction(request),
            BatchItem::Transfer(request) => Command::Transfer(request),
            BatchItem::Hold(request) => Command::PlaceHold(request),
            BatchItem::Capture(request) => Command::CaptureHold(request),
            BatchItem::Void(request) => Command::VoidHold(request),
        }
    }
}

/// One request the engine decides, typed by kind; each has its own outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    OpenAccount(OpenAccountRequest),
    Transaction(TransactionRequest),
    Transfer(TransferRequest),
    SetLimit(SetLimitRequest),
    PlaceHold(HoldRequest),
    CaptureHold(CaptureRequest),
    VoidHold(VoidRequest),
    /// `POST /batches`: every item takes effect, or none does.
    Batch(Vec<BatchItem>),
    /// The sweeper's: release a pending hold whose time is up. No route makes it.
    ExpireHold(i64),
    /// `POST /transfers/bulk`: behind an `Arc` because the HTTP layer keeps it to render the answer
    /// while the engine decides it, and 8,190 items are not worth a copy.
    BulkTransfer(std::sync::Arc<BulkTransferRequest>),
}

/// One item of a bulk request: a transfer and its own idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkItem {
    /// Always a [`Command::Transfer`], so that the engine decides it exactly as a single
    /// `POST /transfers` (same rules, same stored answer, same key scope).
    pub command: Command,
    pub key: Option<IdempotencyKey>,
}

/// A validated `POST /transfers/bulk`: 1 to `--bulk-items-max` transfers, each decided on its
/// own, in order, all in one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkTransferRequest {
    pub items: Vec<BulkItem>,
    /// What the items' keys are scoped to: the scope of a single `POST /transfers` for the same
    /// caller, so that an item and a single transfer under one key are the same request.
    pub item_scope: &'static str,
}

/// The scope of a bulk request's own `Idempotency-Key` header (the whole response).
pub const BULK_SCOPE: &str = "/transfers/bulk";

/// The scopes (see [`Command::scope`]) whose keyed requests move money: where a lookup of a
/// transaction by its idempotency key searches.
pub const MONEY_SCOPES: &[&str] = &["/transaction", "/transfers", "/holds/capture"];

impl Command {
    /// The route an idempotency key is scoped to: the same key on two routes is two keys.
    pub fn scope(&self) -> &'static str {
        match self {
            Command::OpenAccount(_) => "/accounts",
            Command::Transaction(_) => "/transaction",
            Command::Transfer(_) => "/transfers",
            Command::SetLimit(_) => "/accounts/limit",
            Command::PlaceHold(_) => "/holds",
            Command::CaptureHold(_) => "/holds/capture",
            Command::VoidHold(_) => "/holds/void",
            Command::Batch(_) => "/batches",
            Command::ExpireHold(_) => "(expiry)",
            Command::BulkTransfer(_) => BULK_SCOPE,
        }
    }

    /// The parsed request as canonical text: a retry under the same idempotency key must have the
    /// same fingerprint (however its JSON was spaced or ordered), and a different request never does.
    pub fn fingerprint(&self) -> String {
        let text = |value: &str| serde_json::Value::from(value).to_string();
        let reference = |reference: &Option<Reference>| {
            reference
                .as_ref()
                .map_or_else(|| "null".to_owned(), |r| text(r.as_str()))
        };
        match self {
            // Version 3's fingerprint when there is no limit, so that keys used before still match.
            Command::OpenAccount(open) if open.overdraft_limit == 0 => format!("open {}", open.card),
            Command::OpenAccount(open) => format!("open {} limit {}", open.card, open.overdraft_limit),
            Command::Transaction(tx) => format!("transaction {} {}", tx.card, tx.amount.minor_units()),
            Command::Transfer(transfer) => format!(
                "transfer {} {} {} {}",
                transfer.source,
                transfer.destination,
                transfer.amount.minor_units(),
                reference(&transfer.reference)
            ),
            Command::SetLimit(limit) => format!("limit {} {}", limit.card, limit.overdraft_limit),
            Command::PlaceHold(hold) => format!(
                "hold {} {} {} {} {}",
                hold.card,
                hold.amount.minor_units(),
                hold.destination.as_ref().map_or("null", CardNumber::as_str),
                hold.expires_in_s,
                reference(&hold.reference)
            ),
            Command::CaptureHold(capture) => format!(
                "capture {} {}",
                capture.hold_id,
                capture
                    .amount
                    .map_or_else(|| "all".to_owned(), |a| a.minor_units().to_string())
            ),
            Command::VoidHold(void) => format!("void {}", void.hold_id),
            Command::Batch(items) => {
                let items: Vec<String> = items.iter().map(|item| item.command().fingerprint()).collect();
                format!("batch [{}]", items.join(", "))
            }
            Command::ExpireHold(id) => format!("expire {id}"),
            Command::BulkTransfer(bulk) => bulk_fingerprint(bulk),
        }
    }
}

/// A bulk request's fingerprint: the SHA-256 of its items' fingerprints and keys, in order, so
/// that the stored record stays 70 bytes however many items the request had.
fn bulk_fingerprint(bulk: &BulkTransferRequest) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for item in &bulk.items {
        hash.update(item.command.fingerprint().as_bytes());
        // The key's length first, so that no key and item text can run into each other.
        match &item.key {
            Some(key) => hash.update(format!("\n{} {}\n", key.as_str().len(), key.as_str()).as_bytes()),
            None => hash.update(b"\n-\n"),
        }
    }
    let digest = hash.finalize();
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("bulk {} {hex}", bulk.items.len())
}

/// A client's `Idempotency-Key`: 1 to [`IDEMPOTENCY_KEY_BYTES_MAX`] printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(bytes: &[u8]) -> Result<Self, InvalidField> {
        let printable = bytes.iter().all(|b| (0x20..=0x7e).contains(b));
        if !bytes.is_empty() && bytes.len() <= IDEMPOTENCY_KEY_BYTES_MAX && printable {
            // Printable ASCII is UTF-8.
            Ok(Self(String::from_utf8_lossy(bytes).into_owned()))
        } else {
            Err(InvalidField::IdempotencyKey)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_card_number_has_one_key_and_comes_back_from_it() {
        for text in [
            "000000",
            "999999",
            "0000000",
            "123456",
            "4000000000000001",
            "0000000000000000001",
            "9999999999999999999",
        ] {
            let card = CardNumber::parse(text).unwrap();
            assert_eq!(CardKey::of(&card).card(), card, "{text}");
        }
        let key = |text| CardKey::from_digits(text).unwrap();
        assert!(key("999999") < key("0000000"), "shorter numbers first");
        assert_ne!(key("000001"), key("0000001"), "leading zeros count");
        assert!(key("4000000000000001") < key("4000000000000002"));
        assert_eq!(key("000000").get(), 0);
        assert_eq!(
            key("9999999999999999999").get(),
            CARD_KEY_OFFSETS[CARD_DIGITS_MAX + 1] - 1
        );
        for bad in ["12345", "12345678901234567890", "12a456", ""] {
            assert_eq!(CardKey::from_digits(bad), None, "{bad}");
        }
    }

    #[test]
    fn card_numbers_are_six_to_nineteen_ascii_digits() {
        assert!(CardNumber::parse("123456").is_ok());
        assert!(CardNumber::parse("1234567890123456789").is_ok());
        assert!(
            CardNumber::parse("0000001").is_ok(),
            "leading zeros are digits too"
        );
        for bad in [
            "",
            "12345",
            "12345678901234567890",
            "12345a",
            " 123456",
            "123456 ",
            "123  456",
            "123--456",
            "123 456-789",
            "١٢٣٤٥٦",
            "-123456",
            "123456-",
            "12 3",
            "1234 5678 9012 3456 7890",
            "123\t456",
            "123_456",
        ] {
            assert_eq!(CardNumber::parse(bad), Err(InvalidField::CardNumber), "{bad:?}");
        }
    }

    #[test]
    fn grouped_card_numbers_are_normalised_to_their_digits() {
        for (written, digits) in [
            ("6219 8619 0042 8640", "6219861900428640"),
            ("6219-8619-0042-8640", "6219861900428640"),
            ("123 456", "123456"),
            ("1-2-3-4-5-6", "123456"),
            ("1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9", "1234567890123456789"),
        ] {
            assert_eq!(
                CardNumber::parse(written).unwrap().as_str(),
                digits,
                "{written:?}"
            );
        }
        assert_eq!(
            CardNumber::parse("6219 8619 0042 8640"),
            CardNumber::parse("6219861900428640"),
            "one card however it is written"
        );
    }

    #[test]
    fn idempotency_keys_are_printable_ascii_of_bounded_length() {
        assert!(IdempotencyKey::parse(b"a").is_ok());
        assert!(IdempotencyKey::parse(b" ~ key with spaces ~ ").is_ok());
        assert!(IdempotencyKey::parse(&[b'k'; IDEMPOTENCY_KEY_BYTES_MAX]).is_ok());
        for bad in [
            &b""[..],
            &[b'k'; IDEMPOTENCY_KEY_BYTES_MAX + 1],
            b"tab\there",
            b"\x7f",
            "é".as_bytes(),
        ] {
            assert_eq!(
                IdempotencyKey::parse(bad),
                Err(InvalidField::IdempotencyKey),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn fingerprints_tell_requests_apart_and_nothing_else() {
        let transfer = |reference: Option<&str>| {
            Command::Transfer(TransferRequest {
                source: CardNumber::parse("111111").unwrap(),
                destination: CardNumber::parse("222222").unwrap(),
                amount: PositiveAmount::new(5).unwrap(),
                reference: reference.map(|r| Reference::new(r.to_owned()).unwrap()),
            })
        };
        assert_eq!(transfer(None).fingerprint(), transfer(None).fingerprint());
        assert_ne!(transfer(None).fingerprint(), transfer(Some("null")).fingerprint());
        assert_ne!(
            transfer(Some("a b")).fingerprint(),
            transfer(Some("a")).fingerprint()
        );
    }

    #[test]
    fn amounts_are_nonzero_and_within_the_limit() {
        assert_eq!(Amount::new(1).unwrap().kind(), Kind::Deposit);
        assert_eq!(Amount::new(-1).unwrap().kind(), Kind::Withdrawal);
        assert!(Amount::new(AMOUNT_ABS_MAX).is_ok());
        assert!(Amount::new(-AMOUNT_ABS_MAX).is_ok());
        for bad in [0, AMOUNT_ABS_MAX + 1, -AMOUNT_ABS_MAX - 1, i64::MIN, i64::MAX] {
            assert_eq!(Amount::new(bad), Err(InvalidField::Amount), "{bad}");
        }
    }
}
