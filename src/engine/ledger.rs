//! The ledger's rules and the state they are decided against.
//!
//! The ledger holds every account's balance in memory, exactly as last committed, loaded once at
//! start-up, so that a batch is decided without reading a balance; the store only writes (and
//! looks up idempotency keys). Within a batch each command is decided against the state left by
//! the ones before it, and each succeeds or fails **as a whole and on its own**: a transfer's two
//! legs are staged together or not at all, and a refused command does not undo its neighbours.
//!
//! Every movement is double entry: a [`TransactionRecord`] with two legs that sum to zero. A
//! deposit is a transfer from the outside world ([`Account::World`], which may go negative) to a
//! card, a withdrawal one from a card to the outside world. Ids are assigned here, in order, by the
//! one writer, so a command's whole answer is known when it is decided: a keyed command's answer
//! is rendered then and stored in the same commit as its effect.
//!
//! Idempotency: a keyed command first looks for its key, in this batch and then in the store. The
//! same request under a used key gets the stored answer back and moves nothing; a different request
//! under it is refused. Because a batch is decided and committed before the next one is decided, a
//! retry that arrives while its first request is queued or committing simply finds the first one's
//! answer: there is never a second execution.
//!
//! Memory is about 60 bytes per account (6 MB for the 100,000 seeded cards).

use std::collections::{HashMap, HashSet};

use crate::domain::{
    Account, Amount, CardNumber, Command, IdempotencyKey, Kind, OpenAccountRequest, TransactionRequest,
    TransferRequest,
};
use crate::store::{
    Batch, IdempotencyRecord, LedgerState, Leg, NewAccount, Store, StoreError, StoredAnswer, Totals,
    TransactionRecord,
};

/// What the engine decided for one command. A refusal is an outcome, not an error: the request
/// was valid and the ledger said no. Only `Opened`, `Posted` and `Transferred` changed anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `POST /accounts`: the account exists now, with balance zero.
    Opened { created_at_ms: i64 },
    /// `POST /transaction`: on disk. `balance` is the card's balance after it.
    Posted {
        id: i64,
        balance: i64,
        created_at_ms: i64,
    },
    /// `POST /transfers`: on disk, both legs.
    Transferred {
        id: i64,
        source_balance: i64,
        destination_balance: i64,
        created_at_ms: i64,
    },
    /// Decided, and nothing changed.
    Refused(Refusal),
    /// The key was used before by the same request: its first answer, byte for byte.
    Replayed(StoredAnswer),
    /// The batch could not be committed (disk full, read-only, I/O error). Nothing changed.
    StorageFailed,
}

/// Why the ledger said no.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The debit is larger than the balance.
    InsufficientFunds { balance: i64 },
    /// No account has this card number.
    CardNotFound { card: CardNumber },
    /// The credit would push the balance past i64::MAX minor units.
    BalanceLimitExceeded { balance: i64 },
    /// `POST /accounts` for a card that has an account.
    AccountExists,
    /// The idempotency key was used before with a different request.
    IdempotencyKeyReused,
}

/// Turns an outcome into what the client is answered (status and body). Given by the HTTP layer at
/// start-up, so that a keyed command's answer is stored with its effect while the engine stays free
/// of HTTP.
pub type Render = fn(&Command, &Outcome) -> (u16, Vec<u8>);

/// Why a debit or credit of a card is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardRule {
    InsufficientFunds,
    BalanceLimitExceeded,
}

/// The rule of a card account: the new balance, or why there is none. Balances never go below
/// zero and arithmetic never wraps.
pub fn apply(balance: i64, amount: Amount) -> Result<i64, CardRule> {
    match balance.checked_add(amount.minor_units()) {
        None => Err(if amount.minor_units() > 0 {
            CardRule::BalanceLimitExceeded
        } else {
            // Only reachable from a negative balance, which the store's CHECK forbids.
            CardRule::InsufficientFunds
        }),
        Some(new) if new < 0 => Err(CardRule::InsufficientFunds),
        Some(new) => Ok(new),
    }
}

/// What a batch did, for the worker to report.
#[derive(Debug)]
pub struct BatchReport {
    /// One per command, in order.
    pub outcomes: Vec<Outcome>,
    /// Sum and count of all card balances after the batch.
    pub totals: Totals,
    /// Whether the store accepted the batch's commit (true when there was nothing to commit).
    pub commit_ok: bool,
}

/// How often a batch is decided again when the store says another writer changed the database
/// underneath it; past this the batch fails with 503 and nothing changed.
const COMMIT_ATTEMPTS_MAX: u32 = 3;

/// Balances in memory in front of a store.
pub struct Ledger<S> {
    store: S,
    /// Committed balances of every card account.
    cards: HashMap<CardNumber, i64>,
    /// The outside world's committed balance.
    world: i64,
    next_id: i64,
    /// Timestamps never go backwards, so that ids and times agree (`/balance?at=` relies on it).
    last_at_ms: i64,
    totals: Totals,
    render: Render,
    /// True after the store could not be read back: nothing is decided until a reload succeeds.
    stale: bool,
}

/// One batch being decided: its writes, and the balances it has staged over the committed ones.
struct Staging<'a> {
    batch: Batch,
    cards: HashMap<&'a CardNumber, i64>,
    opened: HashSet<&'a CardNumber>,
    world: i64,
    next_id: i64,
    /// Keys used earlier in this batch, with the answer they got.
    keys: HashMap<(&'static str, &'a IdempotencyKey), StoredAnswer>,
}

impl<S: Store> Ledger<S> {
    /// Loads every balance from `store`.
    pub fn load(store: S, render: Render) -> Result<Self, StoreError> {
        let mut ledger = Self {
            store,
            cards: HashMap::new(),
            world: 0,
            next_id: 1,
            last_at_ms: 0,
            totals: Totals::default(),
            render,
            stale: false,
        };
        ledger.reload()?;
        Ok(ledger)
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        let LedgerState {
            cards,
            world,
            next_transaction_id,
        } = self.store.load()?;
        self.totals = Totals {
            balance_sum: cards.iter().map(|(_, balance)| i128::from(*balance)).sum(),
            accounts: cards.len() as i64,
        };
        self.cards = cards.into_iter().collect();
        self.world = world;
        self.next_id = next_transaction_id;
        self.stale = false;
        Ok(())
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Decides every command, commits what they change in one store transaction, and says what
    /// happened to each.
    pub fn apply_batch<'a, I>(&mut self, commands: I, at_unix_ms: i64) -> BatchReport
    where
        I: Iterator<Item = (&'a Command, Option<&'a IdempotencyKey>)> + Clone,
    {
        let at = at_unix_ms.max(self.last_at_ms);
        self.last_at_ms = at;
        if !self.stale && self.store.changed_outside().unwrap_or(true) {
            tracing::warn!("the database was changed outside tallyd; re-reading balances");
            self.stale = true;
        }
        if self.stale && self.reload().is_err() {
            let outcomes = commands.map(|_| Outcome::StorageFailed).collect();
            return self.report(outcomes, false);
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (outcomes, staging) = self.decide(commands.clone(), at);
            let commit = if staging.batch.is_empty() {
                Ok(())
            } else {
                self.store.commit(&staging.batch)
            };
            match commit {
                Err(StoreError::Conflict(_)) if attempts < COMMIT_ATTEMPTS_MAX => {
                    // Someone outside tallyd wrote to the database: decide again on what it holds now.
                    tracing::warn!("the database was changed outside tallyd; re-reading balances and deciding the batch again");
                    self.resync();
                }
                Ok(()) => {
                    self.absorb(staging);
                    return self.report(outcomes, true);
                }
                Err(error) => {
                    tracing::error!(%error, commands = outcomes.len(), "a batch failed to commit; nothing of it was written");
                    self.resync();
                    return self.report(outcomes, false);
                }
            }
        }
    }

    /// Deletes idempotency records older than `before_unix_ms`, at most `rows_max` of them.
    pub fn prune_idempotency(&mut self, before_unix_ms: i64, rows_max: u32) -> Result<usize, StoreError> {
        self.store.prune_idempotency(before_unix_ms, rows_max)
    }

    fn decide<'a, I>(&mut self, commands: I, at: i64) -> (Vec<Outcome>, Staging<'a>)
    where
        I: Iterator<Item = (&'a Command, Option<&'a IdempotencyKey>)>,
    {
        let mut staging = Staging {
            batch: Batch {
                at_unix_ms: at,
                ..Batch::default()
            },
            cards: HashMap::new(),
            opened: HashSet::new(),
            world: self.world,
            next_id: self.next_id,
            keys: HashMap::new(),
        };
        let outcomes = commands
            .map(|(command, key)| self.decide_keyed(&mut staging, command, key))
            .collect();
        (outcomes, staging)
    }

    /// One command under its idempotency key, if it has one.
    fn decide_keyed<'a>(
        &mut self,
        staging: &mut Staging<'a>,
        command: &'a Command,
        key: Option<&'a IdempotencyKey>,
    ) -> Outcome {
        let Some(key) = key else {
            return self.execute(staging, command);
        };
        let scope = command.scope();
        let earlier = match staging.keys.get(&(scope, key)) {
            Some(answer) => Some(answer.clone()),
            None => match self.store.idempotent_answer(scope, key) {
                Ok(found) => found,
                Err(error) => {
                    tracing::error!(%error, "looking up an idempotency key failed");
                    return Outcome::StorageFailed;
                }
            },
        };
        let fingerprint = command.fingerprint();
        if let Some(answer) = earlier {
            return if answer.fingerprint == fingerprint {
                Outcome::Replayed(answer)
            } else {
                Outcome::Refused(Refusal::IdempotencyKeyReused)
            };
        }
        let outcome = self.execute(staging, command);
        let transaction_id = match outcome {
            Outcome::Posted { id, .. } | Outcome::Transferred { id, .. } => Some(id),
            Outcome::Opened { .. } | Outcome::Refused(_) => None,
            // Nothing was decided: a retry must be free to run.
            Outcome::Replayed(_) | Outcome::StorageFailed => return outcome,
        };
        if let (Some(id), Some(record)) = (transaction_id, staging.batch.transactions.last_mut()) {
            debug_assert_eq!(record.id, id);
            record.idempotency_key = Some(key.clone());
        }
        let (status, body) = (self.render)(command, &outcome);
        let stored = StoredAnswer {
            fingerprint,
            status,
            body,
        };
        staging.keys.insert((scope, key), stored.clone());
        staging.batch.idempotency.push(IdempotencyRecord {
            scope,
            key: key.clone(),
            stored,
            transaction_id,
        });
        outcome
    }

    fn execute<'a>(&mut self, staging: &mut Staging<'a>, command: &'a Command) -> Outcome {
        let decided = match command {
            Command::OpenAccount(open) => self.open(staging, open),
            Command::Transaction(transaction) => self.post(staging, transaction),
            Command::Transfer(transfer) => self.transfer(staging, transfer),
        };
        decided.unwrap_or_else(Outcome::Refused)
    }

    fn balance(&self, staging: &Staging<'_>, card: &CardNumber) -> Result<i64, Refusal> {
        staging
            .cards
            .get(card)
            .or_else(|| self.cards.get(card))
            .copied()
            .ok_or_else(|| Refusal::CardNotFound { card: card.clone() })
    }

    fn open<'a>(&self, staging: &mut Staging<'a>, open: &'a OpenAccountRequest) -> Result<Outcome, Refusal> {
        if self.cards.contains_key(&open.card) || staging.opened.contains(&open.card) {
            return Err(Refusal::AccountExists);
        }
        staging.opened.insert(&open.card);
        staging.cards.insert(&open.card, 0);
        staging.batch.accounts.push(NewAccount {
            card: open.card.clone(),
        });
        Ok(Outcome::Opened {
            created_at_ms: staging.batch.at_unix_ms,
        })
    }

    /// A deposit (from the outside world) or a withdrawal (to it).
    fn post<'a>(
        &self,
        staging: &mut Staging<'a>,
        request: &'a TransactionRequest,
    ) -> Result<Outcome, Refusal> {
        let current = self.balance(staging, &request.card)?;
        let card_after = apply(current, request.amount).map_err(|rule| match rule {
            CardRule::InsufficientFunds => Refusal::InsufficientFunds { balance: current },
            CardRule::BalanceLimitExceeded => Refusal::BalanceLimitExceeded { balance: current },
        })?;
        let amount = request.amount.minor_units();
        // The outside world moves the other way; it may go negative but never wraps.
        let world_after = staging
            .world
            .checked_sub(amount)
            .ok_or(Refusal::BalanceLimitExceeded { balance: current })?;
        let card_leg = Leg {
            account: Account::Card(request.card.clone()),
            amount,
            balance_after: card_after,
        };
        let world_leg = Leg {
            account: Account::World,
            amount: -amount,
            balance_after: world_after,
        };
        let (kind, legs) = match request.amount.kind() {
            Kind::Withdrawal => (Kind::Withdrawal, [card_leg, world_leg]),
            _ => (Kind::Deposit, [world_leg, card_leg]),
        };
        let id = stage(staging, kind, amount.abs(), None, legs);
        staging.cards.insert(&request.card, card_after);
        staging.world = world_after;
        Ok(Outcome::Posted {
            id,
            balance: card_after,
            created_at_ms: staging.batch.at_unix_ms,
        })
    }

    fn transfer<'a>(
        &self,
        staging: &mut Staging<'a>,
        request: &'a TransferRequest,
    ) -> Result<Outcome, Refusal> {
        let source = self.balance(staging, &request.source)?;
        let destination = self.balance(staging, &request.destination)?;
        let amount = request.amount.minor_units();
        let source_after = source
            .checked_sub(amount)
            .filter(|after| *after >= 0)
            .ok_or(Refusal::InsufficientFunds { balance: source })?;
        let destination_after = destination
            .checked_add(amount)
            .ok_or(Refusal::BalanceLimitExceeded { balance: destination })?;
        let legs = [
            Leg {
                account: Account::Card(request.source.clone()),
                amount: -amount,
                balance_after: source_after,
            },
            Leg {
                account: Account::Card(request.destination.clone()),
                amount,
                balance_after: destination_after,
            },
        ];
        let id = stage(staging, Kind::Transfer, amount, request.reference.clone(), legs);
        staging.cards.insert(&request.source, source_after);
        staging.cards.insert(&request.destination, destination_after);
        Ok(Outcome::Transferred {
            id,
            source_balance: source_after,
            destination_balance: destination_after,
            created_at_ms: staging.batch.at_unix_ms,
        })
    }

    /// After a successful commit, the staged balances are the committed ones.
    fn absorb(&mut self, staging: Staging<'_>) {
        let card_delta: i128 = staging
            .batch
            .transactions
            .iter()
            .flat_map(|record| &record.legs)
            .filter(|leg| matches!(leg.account, Account::Card(_)))
            .map(|leg| i128::from(leg.amount))
            .sum();
        self.totals.balance_sum += card_delta;
        self.totals.accounts += staging.batch.accounts.len() as i64;
        for (card, balance) in staging.cards {
            self.cards.insert(card.clone(), balance);
        }
        self.world = staging.world;
        self.next_id = staging.next_id;
    }

    fn report(&self, outcomes: Vec<Outcome>, commit_ok: bool) -> BatchReport {
        // A failed batch changed nothing, and every answer in it may have been decided on state it
        // staged: all of them are "failed, nothing changed", and a retry may run.
        let outcomes = if commit_ok {
            outcomes
        } else {
            vec![Outcome::StorageFailed; outcomes.len()]
        };
        BatchReport {
            outcomes,
            totals: self.totals,
            commit_ok,
        }
    }

    /// After a failed commit, forget what memory says and trust the store again: an I/O error
    /// may leave the store's state uncertain, and memory must never run ahead of the disk. If the
    /// store cannot even be read, nothing is decided until it can be (every batch fails with 503).
    fn resync(&mut self) {
        if let Err(error) = self.reload() {
            tracing::warn!(%error, "could not re-read balances after a failed commit");
            self.stale = true;
        }
    }
}

/// Adds a transaction with the next id to the batch and returns the id.
fn stage(
    staging: &mut Staging<'_>,
    kind: Kind,
    amount: i64,
    reference: Option<crate::domain::Reference>,
    legs: [Leg; 2],
) -> i64 {
    debug_assert_eq!(legs[0].amount + legs[1].amount, 0, "legs sum to zero");
    debug_assert!(
        legs.iter()
            .all(|leg| leg.account == Account::World || leg.balance_after >= 0),
        "no card below zero"
    );
    let id = staging.next_id;
    staging.next_id += 1;
    staging.batch.transactions.push(TransactionRecord {
        id,
        kind,
        amount,
        reference,
        idempotency_key: None,
        legs,
    });
    id
}
