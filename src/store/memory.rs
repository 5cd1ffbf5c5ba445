//! An in-memory [`Store`], for tests of the engine: the same contract as SQLite, without a disk,
//! with a switch that makes commits fail as a full disk would, and one that makes the next commit
//! see another writer's change. Like SQLite it keeps account rows that only [`Store::write_back`]
//! updates, and a load replays the transactions after the checkpoint, so the engine's tests
//! exercise the write-back and the replay too.

use std::collections::{BTreeMap, HashMap};

use super::{
    AccountState, Batch, CreditRow, Hold, HoldStatus, KeyName, LedgerState, PackedAccount, Store, StoreError,
    StoredAnswer, StoredKey, TransactionRecord,
};
use crate::domain::{Account, CardKey, CardNumber};

#[derive(Debug, Default)]
pub struct MemoryStore {
    /// The account rows: each account's state as of the checkpoint or later.
    pub rows: HashMap<Account, AccountState>,
    /// Every row has every leg up to this transaction id.
    pub checkpoint: i64,
    /// Every committed transaction, in commit order.
    pub transactions: Vec<TransactionRecord>,
    /// Idempotency records by id: (scope, key, answer, created at).
    pub idempotency: BTreeMap<i64, (String, String, StoredAnswer, i64)>,
    /// While true, every commit fails and changes nothing.
    pub fail_commits: bool,
    /// While above zero, that many commits are refused as if another writer had changed the data
    /// between the ledger's check and its commit.
    pub conflicts: u32,
    /// Set by a test that changes `rows` behind the ledger, as another writer would; cleared
    /// when the ledger loads.
    pub changed: bool,
    /// Every hold by id, in its last committed state.
    pub holds: BTreeMap<i64, Hold>,
    /// The accounts' credit terms as last written.
    pub credit: BTreeMap<CardNumber, CreditRow>,
}

impl MemoryStore {
    pub fn with_accounts(accounts: impl IntoIterator<Item = (CardNumber, i64)>) -> Self {
        let mut rows: HashMap<Account, AccountState> = accounts
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
        rows.insert(Account::World, AccountState::default());
        Self {
            rows,
            ..Self::default()
        }
    }

    /// Every account's current state: its row, overridden by its last leg after the checkpoint.
    pub fn current(&self) -> HashMap<Account, AccountState> {
        let mut current = self.rows.clone();
        for record in self.transactions.iter().filter(|t| t.id > self.checkpoint) {
            for leg in &record.legs {
                let state = AccountState {
                    balance: leg.balance_after,
                    last_transaction_id: Some(record.id),
                };
                current.insert(leg.account.clone(), state);
            }
        }
        current
    }

    pub fn balance(&self, account: &Account) -> Option<i64> {
        self.current().get(account).map(|state| state.balance)
    }

    pub fn card_balance(&self, card: &CardNumber) -> Option<i64> {
        self.balance(&Account::Card(card.clone()))
    }

    /// Brings every row up to date and the checkpoint to the end, as a finished write-back would.
    pub fn settle(&mut self) {
        self.rows = self.current();
        self.checkpoint = self.transactions.last().map_or(0, |t| t.id);
    }

    fn refuse(&mut self) -> Result<(), StoreError> {
        if self.fail_commits {
            return Err(StoreError::Retryable("database or disk is full".into()));
        }
        if self.conflicts > 0 {
            self.conflicts -= 1;
            return Err(StoreError::Conflict("changed by another writer".into()));
        }
        Ok(())
    }
}

impl Store for MemoryStore {
    fn load(&mut self) -> Result<LedgerState, StoreError> {
        self.changed = false;
        let mut state = LedgerState {
            next_transaction_id: self.transactions.last().map_or(1, |t| t.id + 1),
            next_key_id: self.idempotency.keys().next_back().map_or(1, |id| id + 1),
            checkpoint: self.checkpoint,
            next_hold_id: self.holds.keys().next_back().map_or(1, |id| id + 1),
            pending_holds: self
                .holds
                .values()
                .filter(|hold| hold.status == HoldStatus::Pending)
                .cloned()
                .collect(),
            credit: self.credit.values().cloned().collect(),
            ..LedgerState::default()
        };
        for (account, current) in self.current() {
            if self.rows.get(&account) != Some(&current) {
                state.behind.push(account.clone());
            }
            match account {
                Account::Card(card) => state.cards.push(PackedAccount::new(CardKey::of(&card), current)),
                Account::World => state.world = current,
            }
        }
        state.keys = self
            .idempotency
            .iter()
            .map(|(id, (scope, key, _, _))| KeyName {
                id: *id,
                scope: scope.clone(),
                key: key.clone(),
            })
            .collect();
        Ok(state)
    }

    fn changed_outside(&mut self) -> Result<bool, StoreError> {
        Ok(self.changed)
    }

    fn idempotent_answers(&mut self, ids: &[i64]) -> Result<Vec<Option<StoredKey>>, StoreError> {
        Ok(ids
            .iter()
            .map(|id| {
                self.idempotency.get(id).map(|(scope, key, answer, _)| StoredKey {
                    scope: scope.clone(),
                    key: key.clone(),
                    answer: answer.clone(),
                })
            })
            .collect())
    }

    fn hold_statuses(&mut self, ids: &[i64]) -> Result<Vec<Option<HoldStatus>>, StoreError> {
        Ok(ids
            .iter()
            .map(|id| self.holds.get(id).map(|hold| hold.status))
            .collect())
    }

    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.refuse()?;
        for hold in &batch.holds {
            if let Some(old) = self.holds.get(&hold.id) {
                assert_eq!(old.status, HoldStatus::Pending, "a hold is resolved once");
            }
            self.holds.insert(hold.id, hold.clone());
        }
        for row in &batch.credit {
            self.credit.insert(row.card.clone(), row.clone());
        }
        for account in &batch.accounts {
            self.rows
                .insert(Account::Card(account.card.clone()), AccountState::default());
        }
        self.transactions.extend(batch.transactions.iter().cloned());
        for record in &batch.idempotency {
            let stored = (
                record.scope.to_owned(),
                record.key.as_str().to_owned(),
                record.stored.clone(),
                batch.at_unix_ms,
            );
            assert!(
                self.idempotency.insert(record.id, stored).is_none(),
                "idempotency record ids are never reused"
            );
        }
        Ok(())
    }

    fn write_back(
        &mut self,
        accounts: &[(Account, AccountState)],
        checkpoint: Option<i64>,
    ) -> Result<(), StoreError> {
        self.refuse()?;
        for (account, state) in accounts {
            if let Some(row) = self.rows.get_mut(account) {
                *row = *state;
            }
        }
        if let Some(through) = checkpoint {
            self.checkpoint = through;
        }
        Ok(())
    }

    fn prune_idempotency(&mut self, before_unix_ms: i64, rows_max: u32) -> Result<Vec<KeyName>, StoreError> {
        let old: Vec<i64> = self
            .idempotency
            .iter()
            .filter(|(_, (_, _, _, at))| *at < before_unix_ms)
            .map(|(id, _)| *id)
            .take(rows_max as usize)
            .collect();
        Ok(old
            .into_iter()
            .filter_map(|id| {
                self.idempotency
                    .remove(&id)
                    .map(|(scope, key, _, _)| KeyName { id, scope, key })
            })
            .collect())
    }
}
