//! An in-memory [`Store`], for tests of the engine: the same contract as SQLite, without a disk,
//! with a switch that makes commits fail as a full disk would, and one that makes the next commit
//! see another writer's change.

use std::collections::HashMap;

use super::{
    AccountState, Batch, IdempotencyKey, LedgerState, Store, StoreError, StoredAnswer, TransactionRecord,
};
use crate::domain::{Account, CardNumber};

#[derive(Debug, Default)]
pub struct MemoryStore {
    pub balances: HashMap<Account, AccountState>,
    /// Every committed transaction, in commit order.
    pub transactions: Vec<TransactionRecord>,
    /// Idempotency records by (scope, key), with their creation time.
    pub idempotency: HashMap<(String, String), (StoredAnswer, i64)>,
    /// While true, every commit fails and changes nothing.
    pub fail_commits: bool,
    /// While above zero, that many commits are refused as if another writer had changed the data
    /// between the ledger's check and its commit.
    pub conflicts: u32,
    /// Set by a test that changes `balances` behind the ledger, as another writer would; cleared
    /// when the ledger loads.
    pub changed: bool,
}

impl MemoryStore {
    pub fn with_accounts(accounts: impl IntoIterator<Item = (CardNumber, i64)>) -> Self {
        let mut balances: HashMap<Account, AccountState> = accounts
            .into_iter()
            .map(|(card, balance)| {
                (
                    Account::Card(card),
                    AccountState {
                        balance,
                        last_transaction_id: None,
                    },
                )
            })
            .collect();
        balances.insert(Account::World, AccountState::default());
        Self {
            balances,
            ..Self::default()
        }
    }

    pub fn card_balance(&self, card: &CardNumber) -> Option<i64> {
        self.balances
            .get(&Account::Card(card.clone()))
            .map(|state| state.balance)
    }
}

impl Store for MemoryStore {
    fn load(&mut self) -> Result<LedgerState, StoreError> {
        self.changed = false;
        let mut state = LedgerState {
            next_transaction_id: self.transactions.last().map_or(1, |t| t.id + 1),
            ..LedgerState::default()
        };
        for (account, balance) in &self.balances {
            match account {
                Account::Card(card) => state.cards.push((card.clone(), *balance)),
                Account::World => state.world = *balance,
            }
        }
        Ok(state)
    }

    fn changed_outside(&mut self) -> Result<bool, StoreError> {
        Ok(self.changed)
    }

    fn idempotent_answers(
        &mut self,
        keys: &[(&str, &IdempotencyKey)],
    ) -> Result<Vec<Option<StoredAnswer>>, StoreError> {
        Ok(keys
            .iter()
            .map(|(scope, key)| {
                self.idempotency
                    .get(&(scope.to_string(), key.as_str().to_owned()))
                    .map(|(stored, _)| stored.clone())
            })
            .collect())
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        if self.fail_commits {
            return Err(StoreError::Retryable("database or disk is full".into()));
        }
        if self.conflicts > 0 {
            self.conflicts -= 1;
            return Err(StoreError::Conflict("changed by another writer".into()));
        }
        for account in &batch.accounts {
            self.balances
                .insert(Account::Card(account.card.clone()), AccountState::default());
        }
        for record in &batch.transactions {
            for leg in &record.legs {
                let state = AccountState {
                    balance: leg.balance_after,
                    last_transaction_id: Some(record.id),
                };
                self.balances.insert(leg.account.clone(), state);
            }
            self.transactions.push(record.clone());
        }
        for record in &batch.idempotency {
            let key = (record.scope.to_owned(), record.key.as_str().to_owned());
            self.idempotency
                .insert(key, (record.stored.clone(), batch.at_unix_ms));
        }
        Ok(())
    }

    fn prune_idempotency(&mut self, before_unix_ms: i64, rows_max: u32) -> Result<usize, StoreError> {
        let old: Vec<(String, String)> = self
            .idempotency
            .iter()
            .filter(|(_, (_, at))| *at < before_unix_ms)
            .map(|(key, _)| key.clone())
            .take(rows_max as usize)
            .collect();
        for key in &old {
            self.idempotency.remove(key);
        }
        Ok(old.len())
    }
}
