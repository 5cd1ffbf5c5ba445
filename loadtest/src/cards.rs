//! The seeded cards (docs/CONTRACT.md) and the random choices the scenarios make among them.

/// How many `4...` cards the seed holds; `TALLYD_LOADTEST_CARDS` lowers it for a server seeded with fewer.
const SEEDED_CARDS_DEFAULT: u64 = 100_000;

/// How many cards the hot-card scenario concentrates on.
pub const HOT_CARDS: u64 = 8;

/// The share of hot-card transactions, in percent, that go to one of the [`HOT_CARDS`].
pub const HOT_SHARE_PERCENT: u32 = 90;

/// The largest amount, in minor units, of one deposit or withdrawal: small beside the seeded opening balances
/// (100,000 and up), so that `insufficient_funds` stays rare except on the hot cards.
const AMOUNT_MAX: i64 = 5_000;

/// The share of transactions, in percent, that are deposits; above 50 so that hot cards drift up, not to zero.
const DEPOSIT_PERCENT: u32 = 55;

/// How many cards a database imported from the Flask processor holds (`6219 8619 0000 8640` ..);
/// `TALLYD_LOADTEST_FLASK_CARDS` changes it.
const FLASK_CARDS_DEFAULT: u64 = 10_000;

/// The Flask load test's amounts: -5,000 to 5,000 minor units (tallyd refuses 0, so it is not sent).
const FLASK_AMOUNT_MAX: i64 = 5_000;

/// The number of seeded cards to draw from.
pub fn seeded_cards() -> u64 {
    std::env::var("TALLYD_LOADTEST_CARDS")
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|&count| count >= 1)
        .unwrap_or(SEEDED_CARDS_DEFAULT)
}

/// The seeded card number `n` (1-based), as the seed spells it: `printf('4%015d', n)`.
pub fn card(n: u64) -> String {
    format!("4{n:015}")
}

/// A card drawn uniformly from the whole seeded range.
pub fn random_card() -> String {
    card(rand::random_range(1..=seeded_cards()))
}

/// A card from the hot-card distribution: one of the first [`HOT_CARDS`] most of the time, any card otherwise.
pub fn hot_or_random_card() -> String {
    if rand::random_range(0..100) < HOT_SHARE_PERCENT {
        card(rand::random_range(1..=HOT_CARDS.min(seeded_cards())))
    } else {
        random_card()
    }
}

/// A card of an imported Flask database as the Flask load test wrote it, `6219 8619 NNNN 8640`, and
/// the digits tallyd stores and answers for it.
pub fn random_flask_card() -> (String, String) {
    let cards = std::env::var("TALLYD_LOADTEST_FLASK_CARDS")
        .ok()
        .and_then(|value| value.parse::<u64>().ok())
        .filter(|&count| (1..=10_000).contains(&count))
        .unwrap_or(FLASK_CARDS_DEFAULT);
    flask_card(rand::random_range(0..cards))
}

/// The Flask card `n` (0-based), written with spaces, and its digits.
pub fn flask_card(n: u64) -> (String, String) {
    let written = format!("6219 8619 {n:04} 8640");
    let digits = written.replace(' ', "");
    (written, digits)
}

/// The Flask load test's amount: uniform in -5,000..=5,000 without 0.
pub fn flask_amount() -> i64 {
    loop {
        let amount = rand::random_range(-FLASK_AMOUNT_MAX..=FLASK_AMOUNT_MAX);
        if amount != 0 {
            return amount;
        }
    }
}

/// A signed, non-zero amount: a deposit (positive) or a withdrawal (negative).
pub fn random_amount() -> i64 {
    let magnitude = rand::random_range(1..=AMOUNT_MAX);
    if rand::random_range(0..100) < DEPOSIT_PERCENT {
        magnitude
    } else {
        -magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_numbers_match_the_seed() {
        assert_eq!(card(1), "4000000000000001");
        assert_eq!(card(100_000), "4000000000100000");
    }

    #[test]
    fn flask_cards_are_written_in_groups_and_answered_as_digits() {
        assert_eq!(
            flask_card(42),
            ("6219 8619 0042 8640".to_owned(), "6219861900428640".to_owned())
        );
    }

    #[test]
    fn amounts_are_signed_non_zero_and_bounded() {
        for _ in 0..10_000 {
            let amount = random_amount();
            assert!(amount != 0 && amount.abs() <= AMOUNT_MAX);
        }
    }
}
