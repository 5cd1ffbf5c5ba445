//! Rows as PostgreSQL returns them, turned into the store's types. A row that does not parse (a
//! database edited by hand) is an error, never a guess.

use tokio_postgres::Row;

use crate::domain::{CardNumber, Reference};
use crate::store::{Hold, HoldStatus, StoreError};

/// The columns of a hold, in [`hold`]'s order.
pub const HOLD_COLUMNS: &str = "id, card_number, destination, amount, status, captured_amount, \
     transaction_id, reference, created_at_ms, expires_at_ms, resolved_at_ms";

fn bad(what: &str, text: &str) -> StoreError {
    StoreError::Unusable(format!(
        "the database holds {what} {text:?}, which tallyd never writes"
    ))
}

/// A stored card number.
pub fn card(text: &str) -> Result<CardNumber, StoreError> {
    CardNumber::parse(text).map_err(|_| bad("the card number", text))
}

/// A hold from a row of [`HOLD_COLUMNS`].
pub fn hold(row: &Row) -> Result<Hold, StoreError> {
    let status: &str = row.get(4);
    let destination: Option<&str> = row.get(2);
    let reference: Option<String> = row.get(7);
    Ok(Hold {
        id: row.get(0),
        card: card(row.get(1))?,
        destination: destination.map(card).transpose()?,
        amount: row.get(3),
        status: HoldStatus::parse(status).ok_or_else(|| bad("the hold status", status))?,
        captured_amount: row.get(5),
        transaction_id: row.get(6),
        reference: reference.and_then(|text| Reference::new(text).ok()),
        created_at_ms: row.get(8),
        expires_at_ms: row.get(9),
        resolved_at_ms: row.get(10),
    })
}
