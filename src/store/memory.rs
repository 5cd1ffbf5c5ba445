//! An in-memory [`Store`], for tests of the engine: the same contract as SQLite, without a disk,
//! and with a switch that makes commits fail as a full disk would.

use std::collections::HashMap;

use super::{Posting, Store, StoreError};
use crate::domain::CardNumber;

#[derive(Debug, Default)]
pub struct MemoryStore {
    pub balances: HashMap<CardNumber, i64>,
    /// Every committed posting with its id, in commit order.
    pub journal: Vec<(i64, Posting)>,
    /// While true, every commit fails and changes nothing.
    pub fail_commits: bool,
}

impl MemoryStore {
    pub fn with_accounts(accounts: impl IntoIterator<Item = (CardNumber, i64)>) -> Self {
        Self {
            balances: accounts.into_iter().collect(),
            ..Self::default()
        }
    }
}

impl Store for MemoryStore {
    fn balance(&mut self, card: &CardNumber) -> Result<Option<i64>, StoreError> {
        Ok(self.balances.get(card).copied())
    }

    fn commit(&mut self, postings: &[Posting], _at_unix_ms: i64) -> Result<Vec<i64>, StoreError> {
        if self.fail_commits {
            return Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
                Some("database or disk is full".into()),
            )));
        }
        let mut ids = Vec::with_capacity(postings.len());
        for posting in postings {
            let id = self.journal.len() as i64 + 1;
            self.balances.insert(posting.card.clone(), posting.balance_after);
            self.journal.push((id, posting.clone()));
            ids.push(id);
        }
        Ok(ids)
    }

    fn balances(&mut self) -> Result<Vec<(CardNumber, i64)>, StoreError> {
        Ok(self
            .balances
            .iter()
            .map(|(card, balance)| (card.clone(), *balance))
            .collect())
    }
}
