//! The vocabulary of a card transaction: validated card numbers and amounts, and the request
//! that carries them. Everything here is pure; a value that exists has passed validation.

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
}

/// A card number: 6 to 19 ASCII digits, kept as text so that leading zeros survive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CardNumber(String);

impl CardNumber {
    pub fn parse(text: &str) -> Result<Self, InvalidField> {
        let length_ok = (CARD_DIGITS_MIN..=CARD_DIGITS_MAX).contains(&text.len());
        if length_ok && text.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Self(text.to_owned()))
        } else {
            Err(InvalidField::CardNumber)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
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

/// Deposits and withdrawals are counted apart in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Deposit,
    Withdrawal,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Deposit => "deposit",
            Kind::Withdrawal => "withdrawal",
        }
    }
}

/// A validated `POST /transaction`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionRequest {
    pub card: CardNumber,
    pub amount: Amount,
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "123 456",
            "١٢٣٤٥٦",
            "-123456",
        ] {
            assert_eq!(CardNumber::parse(bad), Err(InvalidField::CardNumber), "{bad:?}");
        }
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
