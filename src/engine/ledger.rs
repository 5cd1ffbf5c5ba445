//! The ledger's rules and the state they are decided against.
//!
//! The ledger keeps every balance it has seen in memory, exactly as last committed, so that a
//! batch is decided without a read per transaction; the store only writes. Within a batch each
//! transaction is decided against the balance left by the ones before it, and each succeeds or
//! fails on its own: a refused withdrawal does not undo its neighbours. The cache holds one entry
//! per account touched (about 60 bytes each), bounded by the number of accounts.

use std::collections::HashMap;

use crate::domain::{Amount, CardNumber, TransactionRequest};
use crate::store::{Posting, Store, StoreError, Totals};

/// The answer to one transaction. A refusal is an outcome, not an error: the request was valid
/// and the ledger said no. Every variant but `Committed` means nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// On disk, as durable as configured. `balance` is the account's balance after it.
    Committed { id: i64, balance: i64 },
    /// A withdrawal larger than the balance.
    InsufficientFunds { balance: i64 },
    /// No account has this card number.
    CardNotFound,
    /// A deposit that would push the balance past i64::MAX minor units.
    BalanceLimitExceeded { balance: i64 },
    /// The batch could not be committed (disk full, read-only, I/O error). Nothing changed.
    StorageFailed,
}

/// Why the rules refuse an amount on a balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    InsufficientFunds,
    BalanceLimitExceeded,
}

/// The rule of a card account: the new balance, or why there is none. Balances never go below
/// zero and arithmetic never wraps.
pub fn apply(balance: i64, amount: Amount) -> Result<i64, Refusal> {
    match balance.checked_add(amount.minor_units()) {
        None => Err(if amount.minor_units() > 0 {
            Refusal::BalanceLimitExceeded
        } else {
            // Only reachable from a negative balance, which the store's CHECK forbids.
            Refusal::InsufficientFunds
        }),
        Some(new) if new < 0 => Err(Refusal::InsufficientFunds),
        Some(new) => Ok(new),
    }
}

/// What a batch did, for the worker to report.
#[derive(Debug)]
pub struct BatchReport {
    /// One per request, in order.
    pub outcomes: Vec<Outcome>,
    /// Sum and count of all balances after the batch.
    pub totals: Totals,
    /// Whether the store accepted the batch's commit (true when there was nothing to commit).
    pub commit_ok: bool,
}

/// Balances in memory in front of a store.
pub struct Ledger<S> {
    store: S,
    /// Committed balances of the accounts seen so far.
    balances: HashMap<CardNumber, i64>,
    totals: Totals,
}

enum Decision {
    Posted(usize),
    Refused(Outcome),
}

impl<S: Store> Ledger<S> {
    pub fn new(store: S, totals: Totals) -> Self {
        Self {
            store,
            balances: HashMap::new(),
            totals,
        }
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Decides every request, commits the accepted ones in one store transaction, and says what
    /// happened to each.
    pub fn apply_batch<'a>(
        &mut self,
        requests: impl ExactSizeIterator<Item = &'a TransactionRequest>,
        at_unix_ms: i64,
    ) -> BatchReport {
        let mut decisions = Vec::with_capacity(requests.len());
        let mut postings: Vec<Posting> = Vec::new();
        let mut staged: HashMap<&CardNumber, i64> = HashMap::new();
        for request in requests {
            let current = match staged.get(&request.card) {
                Some(balance) => *balance,
                None => match self.committed_balance(&request.card) {
                    Ok(Some(balance)) => balance,
                    Ok(None) => {
                        decisions.push(Decision::Refused(Outcome::CardNotFound));
                        continue;
                    }
                    Err(error) => {
                        tracing::error!(%error, "reading a balance failed");
                        decisions.push(Decision::Refused(Outcome::StorageFailed));
                        continue;
                    }
                },
            };
            decisions.push(match apply(current, request.amount) {
                Ok(balance_after) => {
                    staged.insert(&request.card, balance_after);
                    postings.push(Posting {
                        card: request.card.clone(),
                        amount: request.amount.minor_units(),
                        balance_after,
                    });
                    Decision::Posted(postings.len() - 1)
                }
                Err(Refusal::InsufficientFunds) => {
                    Decision::Refused(Outcome::InsufficientFunds { balance: current })
                }
                Err(Refusal::BalanceLimitExceeded) => {
                    Decision::Refused(Outcome::BalanceLimitExceeded { balance: current })
                }
            });
        }
        let commit = if postings.is_empty() {
            Ok(Vec::new())
        } else {
            self.store.commit(&postings, at_unix_ms)
        };
        let ids = match commit {
            Ok(ids) => {
                for (card, balance) in staged {
                    self.balances.insert(card.clone(), balance);
                }
                self.totals.balance_sum += postings.iter().map(|p| i128::from(p.amount)).sum::<i128>();
                Some(ids)
            }
            Err(error) => {
                tracing::error!(%error, transactions = postings.len(), "a batch failed to commit; nothing of it was written");
                self.resync();
                None
            }
        };
        let outcomes = decisions
            .into_iter()
            .map(|decision| match (decision, &ids) {
                (Decision::Posted(index), Some(ids)) => Outcome::Committed {
                    id: ids[index],
                    balance: postings[index].balance_after,
                },
                (Decision::Posted(_), None) => Outcome::StorageFailed,
                (Decision::Refused(outcome), _) => outcome,
            })
            .collect();
        BatchReport {
            outcomes,
            totals: self.totals,
            commit_ok: ids.is_some(),
        }
    }

    fn committed_balance(&mut self, card: &CardNumber) -> Result<Option<i64>, StoreError> {
        if let Some(balance) = self.balances.get(card) {
            return Ok(Some(*balance));
        }
        let balance = self.store.balance(card)?;
        if let Some(balance) = balance {
            self.balances.insert(card.clone(), balance);
        }
        Ok(balance)
    }

    /// After a failed commit, forget what memory says and trust the store again: an I/O error
    /// may leave the store's state uncertain, and the cache must never run ahead of the disk.
    fn resync(&mut self) {
        self.balances.clear();
        match self.store.totals() {
            Ok(totals) => self.totals = totals,
            Err(error) => tracing::warn!(%error, "could not re-read totals after a failed commit"),
        }
    }
}
