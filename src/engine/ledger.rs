//! The ledger's rules and the state they are decided against.
//!
//! The ledger holds every account's balance in memory, exactly as last committed, loaded once at
//! start-up, so that a batch is decided without a single read; the store only writes. Within a batch each
//! transaction is decided against the balance left by the ones before it, and each succeeds or
//! fails on its own: a refused withdrawal does not undo its neighbours. Memory is about 60
//! bytes per account (6 MB for the 100,000 seeded cards). An account added to the database by hand
//! while tallyd runs is read on first use.

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
    /// Committed balances of every account.
    balances: HashMap<CardNumber, i64>,
    totals: Totals,
}

/// How often a batch is decided again when the store says another writer changed the database
/// underneath it; past this the batch fails with 503 and nothing changed.
const COMMIT_ATTEMPTS_MAX: u32 = 3;

enum Decision {
    Posted(usize),
    Refused(Outcome),
}

impl<S: Store> Ledger<S> {
    /// Loads every balance from `store`.
    pub fn load(store: S) -> Result<Self, StoreError> {
        let mut ledger = Self {
            store,
            balances: HashMap::new(),
            totals: Totals::default(),
        };
        ledger.reload()?;
        Ok(ledger)
    }

    fn reload(&mut self) -> Result<(), StoreError> {
        let balances = self.store.balances()?;
        self.totals = Totals {
            balance_sum: balances.iter().map(|(_, balance)| i128::from(*balance)).sum(),
            accounts: balances.len() as i64,
        };
        self.balances = balances.into_iter().collect();
        Ok(())
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Decides every request, commits the accepted ones in one store transaction, and says what
    /// happened to each.
    pub fn apply_batch<'a>(
        &mut self,
        requests: impl ExactSizeIterator<Item = &'a TransactionRequest> + Clone,
        at_unix_ms: i64,
    ) -> BatchReport {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (decisions, postings, staged) = self.decide(requests.clone());
            let commit = if postings.is_empty() {
                Ok(Vec::new())
            } else {
                self.store.commit(&postings, at_unix_ms)
            };
            let ids = match commit {
                Err(StoreError::ChangedOutside) if attempts < COMMIT_ATTEMPTS_MAX => {
                    // Someone outside tallyd wrote to the database: decide again on what it holds now.
                    tracing::warn!("the database was changed outside tallyd; re-reading balances and deciding the batch again");
                    self.resync();
                    continue;
                }
                Ok(ids) => {
                    let staged: Vec<(CardNumber, i64)> = staged
                        .into_iter()
                        .map(|(card, balance)| (card.clone(), balance))
                        .collect();
                    self.balances.extend(staged);
                    self.totals.balance_sum += postings.iter().map(|p| i128::from(p.amount)).sum::<i128>();
                    Some(ids)
                }
                Err(error) => {
                    tracing::error!(%error, transactions = postings.len(), "a batch failed to commit; nothing of it was written");
                    self.resync();
                    None
                }
            };
            return self.report(decisions, &postings, ids);
        }
    }

    /// Decides each request against the committed balances and the ones staged before it.
    fn decide<'a>(
        &mut self,
        requests: impl ExactSizeIterator<Item = &'a TransactionRequest>,
    ) -> (Vec<Decision>, Vec<Posting>, HashMap<&'a CardNumber, i64>) {
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
        (decisions, postings, staged)
    }

    fn report(&self, decisions: Vec<Decision>, postings: &[Posting], ids: Option<Vec<i64>>) -> BatchReport {
        let outcomes = decisions
            .into_iter()
            .map(|decision| match (decision, &ids) {
                (Decision::Posted(index), Some(ids)) => Outcome::Committed {
                    id: ids[index],
                    balance: postings[index].balance_after,
                },
                // A refusal may have been decided on a balance that the failed batch staged, so only
                // an unknown card keeps its answer; everything else is "failed, nothing changed".
                (Decision::Refused(Outcome::CardNotFound), _) => Outcome::CardNotFound,
                (_, None) => Outcome::StorageFailed,
                (Decision::Refused(outcome), Some(_)) => outcome,
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
    /// may leave the store's state uncertain, and memory must never run ahead of the disk. If the
    /// store cannot even be read, balances are read again one by one as cards come up.
    fn resync(&mut self) {
        if let Err(error) = self.reload() {
            tracing::warn!(%error, "could not re-read balances after a failed commit");
            self.balances.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    fn card(n: u8) -> CardNumber {
        CardNumber::parse(&format!("{n:06}")).unwrap()
    }

    fn request(n: u8, amount: i64) -> TransactionRequest {
        TransactionRequest {
            card: card(n),
            amount: Amount::new(amount).unwrap(),
        }
    }

    fn ledger(accounts: &[(u8, i64)]) -> Ledger<MemoryStore> {
        let store = MemoryStore::with_accounts(accounts.iter().map(|(n, b)| (card(*n), *b)));
        Ledger::load(store).unwrap()
    }

    #[test]
    fn the_rules_at_their_edges() {
        let amount = |a| Amount::new(a).unwrap();
        assert_eq!(
            apply(100, amount(-100)),
            Ok(0),
            "a balance may reach exactly zero"
        );
        assert_eq!(apply(100, amount(-101)), Err(Refusal::InsufficientFunds));
        assert_eq!(apply(0, amount(-1)), Err(Refusal::InsufficientFunds));
        assert_eq!(apply(0, amount(1)), Ok(1));
        assert_eq!(apply(i64::MAX - 1, amount(1)), Ok(i64::MAX));
        assert_eq!(apply(i64::MAX, amount(1)), Err(Refusal::BalanceLimitExceeded));
        assert_eq!(apply(i64::MAX, amount(-1)), Ok(i64::MAX - 1));
    }

    #[test]
    fn each_transaction_of_a_batch_stands_or_falls_on_its_own() {
        let mut ledger = ledger(&[(1, 100), (2, 0)]);
        let batch = [
            request(1, -60), // 40 left
            request(1, -60), // refused: only 40
            request(2, 10),  // 10
            request(3, 5),   // no such card
            request(1, -40), // exactly zero
            request(2, -10), // exactly zero
        ];
        let report = ledger.apply_batch(batch.iter(), 0);
        assert!(report.commit_ok);
        assert_eq!(
            report.outcomes,
            [
                Outcome::Committed { id: 1, balance: 40 },
                Outcome::InsufficientFunds { balance: 40 },
                Outcome::Committed { id: 2, balance: 10 },
                Outcome::CardNotFound,
                Outcome::Committed { id: 3, balance: 0 },
                Outcome::Committed { id: 4, balance: 0 },
            ]
        );
        assert_eq!(
            report.totals,
            Totals {
                balance_sum: 0,
                accounts: 2
            }
        );
        assert_eq!(ledger.store.balances[&card(1)], 0);
        assert_eq!(ledger.store.journal.len(), 4);
    }

    #[test]
    fn a_failed_commit_changes_nothing_and_the_ledger_rereads_the_store() {
        let mut ledger = ledger(&[(1, 100)]);
        ledger.apply_batch([request(1, 50)].iter(), 0);
        ledger.store.fail_commits = true;
        let report = ledger.apply_batch([request(1, -120), request(1, -500), request(7, 1)].iter(), 0);
        assert!(!report.commit_ok);
        // The refusal was decided on the staged 30, which never reached the disk: it fails too.
        assert_eq!(
            report.outcomes,
            [
                Outcome::StorageFailed,
                Outcome::StorageFailed,
                Outcome::CardNotFound
            ]
        );
        assert_eq!(
            report.totals.balance_sum, 150,
            "totals are the store's, not the failed batch's"
        );
        assert_eq!(ledger.store.balances[&card(1)], 150);

        ledger.store.fail_commits = false;
        let report = ledger.apply_batch([request(1, -150)].iter(), 0);
        assert_eq!(report.outcomes, [Outcome::Committed { id: 2, balance: 0 }]);
    }

    #[test]
    fn a_batch_of_refusals_commits_nothing() {
        let mut ledger = ledger(&[(1, 5)]);
        let report = ledger.apply_batch([request(1, -6), request(9, 1)].iter(), 0);
        assert!(report.commit_ok);
        assert_eq!(
            report.outcomes,
            [Outcome::InsufficientFunds { balance: 5 }, Outcome::CardNotFound]
        );
        assert!(ledger.store.journal.is_empty());
    }
}
