//! Holds, credit limits and all-or-nothing batches: the rules of two-phase payments.
//!
//! A hold reserves an amount on a card: it counts against what is available (`balance - held +
//! overdraft_limit`, against which every debit and every new hold is decided) until it is resolved,
//! exactly once, by a capture (a transfer of at most the held amount to the hold's destination, or
//! to the outside world; the rest is released), a void, or its expiry. A capture or a void that
//! arrives at or after `expires_at_ms` is refused as expired even before the sweeper has run.
//!
//! An overdraft limit lets the balance go down to `-overdraft_limit`; pending holds count against
//! it, and a new limit below what the account already uses is refused.
//!
//! A `POST /batches` decides its items in order against the state the earlier ones leave, on a
//! savepoint of the batch being staged: when one item is refused, the staging goes back to the
//! savepoint, so nothing of the batch reaches the commit and the other commands of the group
//! commit are untouched.

use super::{
    after, apply, available, credit, refused, stage, state, Committed, Map, Outcome, Refusal, Staging,
};
use crate::domain::{
    Account, BatchItem, CaptureRequest, CardKey, Command, HoldRequest, Kind, SetLimitRequest,
};
use crate::store::{AccountState, Credit, Hold, HoldStatus, Leg};

/// The holds a command names by id (to find the status of those that are not pending).
pub(super) fn named(command: &Command) -> Vec<i64> {
    let of_item = |item: &BatchItem| match item {
        BatchItem::Capture(capture) => Some(capture.hold_id),
        BatchItem::Void(void) => Some(void.hold_id),
        _ => None,
    };
    match command {
        Command::CaptureHold(capture) => vec![capture.hold_id],
        Command::VoidHold(void) => vec![void.hold_id],
        Command::Batch(items) => items.iter().filter_map(of_item).collect(),
        _ => Vec::new(),
    }
}

/// `PATCH /accounts/{card}`.
pub(super) fn set_limit(
    committed: &Committed,
    staging: &mut Staging<'_>,
    request: &SetLimitRequest,
) -> Result<Outcome, Refusal> {
    let account = state(committed, staging, &request.card)?;
    let old = credit(committed, staging, &request.card);
    let new = Credit {
        overdraft_limit: request.overdraft_limit,
        ..old
    };
    if new.available(account.balance) < 0 {
        return Err(Refusal::LimitBelowUsage {
            balance: account.balance,
            held: old.held,
        });
    }
    staging.credit.insert(CardKey::of(&request.card), new);
    Ok(Outcome::LimitSet {
        balance: account.balance,
        credit: new,
        available: available(account.balance, new),
    })
}

/// `POST /holds`.
pub(super) fn place(
    committed: &Committed,
    staging: &mut Staging<'_>,
    request: &HoldRequest,
) -> Result<Outcome, Refusal> {
    let card = state(committed, staging, &request.card)?;
    if let Some(destination) = &request.destination {
        state(committed, staging, destination)?;
    }
    let amount = request.amount.minor_units();
    let terms = credit(committed, staging, &request.card);
    if terms.available(card.balance) < i128::from(amount) {
        return Err(Refusal::InsufficientFunds {
            balance: card.balance,
            available: available(card.balance, terms),
        });
    }
    // Held stays below the balance plus the limit, which only a balance near i64::MAX can pass.
    let held = terms
        .held
        .checked_add(amount)
        .ok_or(Refusal::BalanceLimitExceeded {
            balance: card.balance,
        })?;
    let terms = Credit { held, ..terms };
    let at = staging.batch.at_unix_ms;
    let id = staging.next_hold_id;
    staging.next_hold_id += 1;
    let hold = Hold {
        id,
        card: request.card.clone(),
        destination: request.destination.clone(),
        amount,
        status: HoldStatus::Pending,
        captured_amount: None,
        transaction_id: None,
        reference: request.reference.clone(),
        created_at_ms: at,
        expires_at_ms: at.saturating_add(request.expires_in_s.saturating_mul(1000)),
        resolved_at_ms: None,
    };
    staging.credit.insert(CardKey::of(&request.card), terms);
    staging.holds.insert(id, hold.clone());
    Ok(Outcome::Held {
        hold: Box::new(hold),
        balance: card.balance,
        available: available(card.balance, terms),
    })
}

/// The pending hold `id` as this batch has left it, or why it cannot be resolved now.
fn pending(committed: &Committed, staging: &Staging<'_>, id: i64) -> Result<Hold, Refusal> {
    let hold = staging
        .holds
        .get(&id)
        .or_else(|| committed.holds.get(&id))
        .cloned();
    let Some(hold) = hold else {
        return Err(match staging.resolved.get(&id) {
            Some(status) => Refusal::HoldResolved { id, status: *status },
            None => Refusal::HoldNotFound { id },
        });
    };
    if hold.status != HoldStatus::Pending {
        return Err(Refusal::HoldResolved {
            id,
            status: hold.status,
        });
    }
    if staging.batch.at_unix_ms >= hold.expires_at_ms {
        return Err(Refusal::HoldResolved {
            id,
            status: HoldStatus::Expired,
        });
    }
    Ok(hold)
}

/// Gives a hold's amount back to its card's available funds; the card's terms after it.
fn unreserve(committed: &Committed, staging: &mut Staging<'_>, hold: &Hold) -> Credit {
    let terms = credit(committed, staging, &hold.card);
    let terms = Credit {
        held: terms.held - hold.amount,
        ..terms
    };
    staging.credit.insert(CardKey::of(&hold.card), terms);
    terms
}

/// `POST /holds/{id}/capture`: posts the captured amount from the card to the hold's destination
/// (the outside world without one) and releases the rest, in one step.
pub(super) fn capture(
    committed: &Committed,
    staging: &mut Staging<'_>,
    request: &CaptureRequest,
) -> Result<Outcome, Refusal> {
    let mut hold = pending(committed, staging, request.hold_id)?;
    let amount = request.amount.map_or(hold.amount, |a| a.minor_units());
    if amount > hold.amount {
        return Err(Refusal::CaptureExceedsHold { held: hold.amount });
    }
    let card = state(committed, staging, &hold.card)?;
    let destination = match &hold.destination {
        Some(destination) => Some((destination.clone(), state(committed, staging, destination)?)),
        None => None,
    };
    // Decided on the released terms, but staged only once the transfer is certain.
    let released = Credit {
        held: credit(committed, staging, &hold.card).held - hold.amount,
        ..credit(committed, staging, &hold.card)
    };
    let card_after =
        apply(card.balance, released, -amount).map_err(|rule| refused(rule, card.balance, released))?;
    let (kind, destination_leg) = match &destination {
        Some((card_number, to)) => {
            let terms = credit(committed, staging, card_number);
            let to_after =
                apply(to.balance, terms, amount).map_err(|rule| refused(rule, to.balance, terms))?;
            let leg = Leg {
                account: Account::Card(card_number.clone()),
                amount,
                balance_after: to_after,
                previous_id: to.last_transaction_id,
            };
            (Kind::Transfer, leg)
        }
        None => {
            let world_after =
                staging
                    .world
                    .balance
                    .checked_add(amount)
                    .ok_or(Refusal::BalanceLimitExceeded {
                        balance: staging.world.balance,
                    })?;
            let leg = Leg {
                account: Account::World,
                amount,
                balance_after: world_after,
                previous_id: staging.world.last_transaction_id,
            };
            (Kind::Withdrawal, leg)
        }
    };
    let terms = unreserve(committed, staging, &hold);
    let source_leg = Leg {
        account: Account::Card(hold.card.clone()),
        amount: -amount,
        balance_after: card_after,
        previous_id: card.last_transaction_id,
    };
    let destination_after = destination_leg.balance_after;
    let id = stage(
        staging,
        kind,
        amount,
        hold.reference.clone(),
        [source_leg, destination_leg],
    );
    staging
        .cards
        .insert(CardKey::of(&hold.card), after(card_after, id));
    match &destination {
        Some((card_number, _)) => {
            staging
                .cards
                .insert(CardKey::of(card_number), after(destination_after, id));
        }
        None => staging.world = after(destination_after, id),
    }
    hold.status = HoldStatus::Captured;
    hold.captured_amount = Some(amount);
    hold.transaction_id = Some(id);
    hold.resolved_at_ms = Some(staging.batch.at_unix_ms);
    staging.holds.insert(hold.id, hold.clone());
    Ok(Outcome::Held {
        hold: Box::new(hold),
        balance: card_after,
        available: available(card_after, terms),
    })
}

/// A void (`POST /holds/{id}/void`) or the sweeper's expiry: releases all of the hold.
pub(super) fn release(
    committed: &Committed,
    staging: &mut Staging<'_>,
    id: i64,
    status: HoldStatus,
) -> Result<Outcome, Refusal> {
    let mut hold = if status == HoldStatus::Expired {
        // The sweeper's: only a hold still pending, whose time is up (which `pending` refuses).
        staging
            .holds
            .get(&id)
            .or_else(|| committed.holds.get(&id))
            .filter(|hold| hold.status == HoldStatus::Pending)
            .cloned()
            .ok_or(Refusal::HoldNotFound { id })?
    } else {
        pending(committed, staging, id)?
    };
    let card = state(committed, staging, &hold.card)?;
    let terms = unreserve(committed, staging, &hold);
    hold.status = status;
    hold.resolved_at_ms = Some(staging.batch.at_unix_ms);
    staging.holds.insert(id, hold.clone());
    Ok(Outcome::Held {
        hold: Box::new(hold),
        balance: card.balance,
        available: available(card.balance, terms),
    })
}

/// What a batch's staging is at a savepoint: enough to put it back.
struct Savepoint {
    cards: Map<CardKey, AccountState>,
    world: AccountState,
    next_id: i64,
    transactions: usize,
    credit: Map<CardKey, Credit>,
    holds: Map<i64, Hold>,
    next_hold_id: i64,
}

impl Savepoint {
    fn take(staging: &Staging<'_>) -> Self {
        Self {
            cards: staging.cards.clone(),
            world: staging.world,
            next_id: staging.next_id,
            transactions: staging.batch.transactions.len(),
            credit: staging.credit.clone(),
            holds: staging.holds.clone(),
            next_hold_id: staging.next_hold_id,
        }
    }

    fn restore(self, staging: &mut Staging<'_>) {
        staging.cards = self.cards;
        staging.world = self.world;
        staging.next_id = self.next_id;
        staging.batch.transactions.truncate(self.transactions);
        staging.credit = self.credit;
        staging.holds = self.holds;
        staging.next_hold_id = self.next_hold_id;
    }
}

/// `POST /batches`: every item in order, against what the ones before it left; all of them take
/// effect, or (when one is refused) none.
pub(super) fn all_or_nothing(
    committed: &Committed,
    staging: &mut Staging<'_>,
    items: &[BatchItem],
) -> Result<Outcome, Refusal> {
    let savepoint = Savepoint::take(staging);
    let mut outcomes = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let decided = match item {
            BatchItem::Transaction(request) => super::post(committed, staging, request),
            BatchItem::Transfer(request) => super::transfer_between(committed, staging, request),
            BatchItem::Hold(request) => place(committed, staging, request),
            BatchItem::Capture(request) => capture(committed, staging, request),
            BatchItem::Void(request) => release(committed, staging, request.hold_id, HoldStatus::Voided),
        };
        match decided {
            Ok(outcome) => outcomes.push(outcome),
            Err(refusal) => {
                savepoint.restore(staging);
                return Err(Refusal::BatchFailed {
                    index,
                    refusal: Box::new(refusal),
                });
            }
        }
    }
    Ok(Outcome::Batch(outcomes))
}
