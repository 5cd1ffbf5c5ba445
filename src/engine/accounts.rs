//! The engine's table of card accounts: 24 bytes an account, for millions of them.
//!
//! Every account loaded at start-up is a [`PackedAccount`] in one vector sorted by [`CardKey`]: the
//! card number packed into 8 bytes, the balance, and the last transaction's id, whose top bit marks
//! a row the write-back still owes (ids stay far below 2^63). No hash table: its empty buckets and
//! control bytes would cost 40-50 % more at 10 million accounts. A lookup bisects a fence of every
//! 16th key, which stays in the processor's caches, then the one block of 16 slots it points to: a
//! cache miss or two, however the card numbers are spread. (A first draft guessed the position
//! by interpolation between the smallest and the largest key; the demo card, ten digits among
//! sixteen-digit seeded cards, made every guess land at the far end, and the lookup took 10 % of
//! the server's time.)
//!
//! Accounts opened while the server runs go to a small hash map beside the vector and join it at
//! the next load (start-up, or a re-read after another writer's change).

use std::collections::HashMap;

use crate::domain::{CardKey, CardNumber};
use crate::store::{AccountState, PackedAccount};

/// The write-back's mark on `last_transaction_id`.
const DIRTY: u64 = 1 << 63;

fn pack(key: CardKey, state: AccountState, dirty: bool) -> PackedAccount {
    let mut slot = PackedAccount::new(key, state);
    if dirty {
        slot.last_transaction_id |= DIRTY;
    }
    slot
}

fn unpack(slot: &PackedAccount) -> AccountState {
    let last = slot.last_transaction_id & !DIRTY;
    AccountState {
        balance: slot.balance,
        last_transaction_id: (last != 0).then_some(last as i64),
    }
}

/// Slots per block of the fence: the fence costs 8 bytes per block (half a byte an account), and
/// a block is bisected in 4 steps over 384 bytes, six cache lines. (64 slots bisected 1.5 KiB, 24
/// lines; with a bulk request of 8,190 uniform transfers, 32,000 lookups a batch, the lookups
/// were a fifth of the worker's time, nearly all of it cache misses in the block. 16 took a
/// lookup from 95 to 79 ns on 100,000 accounts with the caches cold.)
const FENCE_STRIDE: usize = 16;

/// Fewest accounts [`Accounts::set_all`] sorts first: below it, a sort buys nothing over a few
/// bisections.
const SET_ALL_SORTED_MIN: usize = 64;

#[derive(Default)]
pub struct Accounts {
    /// Sorted by key, keys unique.
    sorted: Vec<PackedAccount>,
    /// The key of every FENCE_STRIDE-th slot: small enough to stay in the processor's caches
    /// (5 MB at ten million accounts), so that a lookup costs a bisection of it plus one of a
    /// block, whatever the card numbers look like.
    fences: Vec<CardKey>,
    /// Opened since the load, by key.
    opened: HashMap<CardKey, PackedAccount, ahash::RandomState>,
}

impl Accounts {
    /// The table of `loaded` accounts; those in `behind` are marked for the write-back.
    pub fn new(mut loaded: Vec<PackedAccount>) -> Self {
        // Usually sorted already or nearly (the store reads them in name order), which the sort
        // notices in one pass.
        loaded.sort_unstable_by_key(|slot| slot.key);
        loaded.dedup_by_key(|slot| slot.key);
        loaded.shrink_to_fit();
        let fences = loaded.iter().step_by(FENCE_STRIDE).map(|slot| slot.key).collect();
        Self {
            sorted: loaded,
            fences,
            opened: HashMap::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.sorted.len() + self.opened.len()
    }

    /// The bytes the table holds, for the per-account figure the benchmark prints.
    pub fn heap_bytes(&self) -> usize {
        self.sorted.capacity() * std::mem::size_of::<PackedAccount>()
            + self.fences.capacity() * std::mem::size_of::<CardKey>()
            + self.opened.capacity() * (std::mem::size_of::<(CardKey, PackedAccount)>() + 1)
    }

    fn position(&self, key: CardKey) -> Option<usize> {
        // The fence (every FENCE_STRIDE-th key) says which block of the table can hold the key;
        // a bisection of that block finds it.
        let block = self
            .fences
            .partition_point(|fence| *fence <= key)
            .checked_sub(1)?;
        let start = block * FENCE_STRIDE;
        let end = (start + FENCE_STRIDE).min(self.sorted.len());
        let slots = &self.sorted[start..end];
        slots
            .binary_search_by_key(&key, |slot| slot.key)
            .ok()
            .map(|at| start + at)
    }

    pub fn get(&self, card: &CardNumber) -> Option<AccountState> {
        self.get_key(CardKey::of(card))
    }

    pub fn get_key(&self, key: CardKey) -> Option<AccountState> {
        match self.position(key) {
            Some(at) => Some(unpack(&self.sorted[at])),
            None => self.opened.get(&key).map(unpack),
        }
    }

    pub fn contains(&self, card: &CardNumber) -> bool {
        self.get(card).is_some()
    }

    /// Sets an account's committed state, opening it if it is new; a state with a transaction
    /// marks the row for the write-back.
    #[cfg(test)]
    pub fn set(&mut self, card: &CardNumber, state: AccountState) {
        self.set_key(CardKey::of(card), state);
    }

    /// [`Accounts::set`] by the card's key.
    pub fn set_key(&mut self, key: CardKey, state: AccountState) {
        let dirty = state.last_transaction_id.is_some();
        match self.position(key) {
            Some(at) => self.sorted[at] = pack(key, state, dirty),
            None => {
                self.opened.insert(key, pack(key, state, dirty));
            }
        }
    }

    /// [`Accounts::set`] for every account of a committed batch, in key order: each key is then at
    /// or after the one before, so it is found by galloping forward from there through slots that
    /// are in the cache already, instead of by a bisection that misses it. (A batch of 8,190 uniform
    /// transfers sets 16,000 accounts; set one by one in the order a hash map gives them, they were
    /// a sixth of the worker's time.)
    pub fn set_all(&mut self, states: impl IntoIterator<Item = (CardKey, AccountState)>) {
        let mut keyed: Vec<(CardKey, AccountState)> = states.into_iter().collect();
        if keyed.len() < SET_ALL_SORTED_MIN {
            for (key, state) in keyed {
                self.set_key(key, state);
            }
            return;
        }
        keyed.sort_unstable_by_key(|(key, _)| *key);
        let mut from = 0;
        for (key, state) in keyed {
            let dirty = state.last_transaction_id.is_some();
            let at = self.gallop(from, key);
            if self.sorted.get(at).is_some_and(|slot| slot.key == key) {
                self.sorted[at] = pack(key, state, dirty);
            } else {
                self.opened.insert(key, pack(key, state, dirty));
            }
            from = at;
        }
    }

    /// The first slot at or after `from` whose key is not below `key`: steps of 1, 2, 4, ... from
    /// `from` until one is past it, then a bisection of the last step.
    fn gallop(&self, from: usize, key: CardKey) -> usize {
        let rest = &self.sorted[from.min(self.sorted.len())..];
        let mut step = 1;
        let mut low = 0;
        while step <= rest.len() && rest[step - 1].key < key {
            low = step;
            step *= 2;
        }
        let high = step.min(rest.len());
        from + low + rest[low..high].partition_point(|slot| slot.key < key)
    }

    /// Marks an account's row as owed to the write-back (after a replay).
    pub fn mark_behind(&mut self, card: &CardNumber) {
        let key = CardKey::of(card);
        let slot = match self.position(key) {
            Some(at) => Some(&mut self.sorted[at]),
            None => self.opened.get_mut(&key),
        };
        if let Some(slot) = slot {
            slot.last_transaction_id |= DIRTY;
        }
    }

    #[cfg(test)]
    fn has_behind(&self) -> bool {
        self.sorted
            .iter()
            .chain(self.opened.values())
            .any(|slot| slot.last_transaction_id & DIRTY != 0)
    }

    /// Takes up to `max` of the accounts owed to the write-back, scanning at most `scan_max` slots
    /// from `cursor` (a place in the sorted table; past its end, the opened ones), clearing their
    /// marks. Returns where to go on, or `None` when the scan is through.
    pub fn take_behind(
        &mut self,
        cursor: usize,
        max: usize,
        scan_max: usize,
        out: &mut Vec<(CardNumber, AccountState)>,
    ) -> Option<usize> {
        let mut at = cursor;
        let scan_end = cursor.saturating_add(scan_max);
        while at < self.sorted.len() {
            if at == scan_end {
                return Some(at);
            }
            let slot = &mut self.sorted[at];
            at += 1;
            if slot.last_transaction_id & DIRTY != 0 {
                slot.last_transaction_id &= !DIRTY;
                out.push((slot.key.card(), unpack(slot)));
                if out.len() == max {
                    return Some(at);
                }
            }
        }
        // The opened accounts are few: take them in one go, in key order.
        let mut opened: Vec<&mut PackedAccount> = self
            .opened
            .values_mut()
            .filter(|slot| slot.last_transaction_id & DIRTY != 0)
            .collect();
        opened.sort_unstable_by_key(|slot| slot.key);
        for slot in opened {
            slot.last_transaction_id &= !DIRTY;
            out.push((slot.key.card(), unpack(slot)));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(text: &str) -> CardNumber {
        CardNumber::parse(text).unwrap()
    }

    fn state(balance: i64, last: Option<i64>) -> AccountState {
        AccountState {
            balance,
            last_transaction_id: last,
        }
    }

    fn table(cards: &[String]) -> Accounts {
        Accounts::new(
            cards
                .iter()
                .enumerate()
                .map(|(i, c)| pack(CardKey::of(&card(c)), state(i as i64, None), false))
                .collect(),
        )
    }

    /// Dense, sparse, clustered and mixed-length keys are all found, and absent ones are not.
    #[test]
    fn every_loaded_account_is_found_however_the_keys_are_spread() {
        let layouts: Vec<Vec<String>> = vec![
            (1..=5_000).map(|n| format!("4{n:015}")).collect(),
            (1..=5_000)
                .map(|n| format!("{:016}", n * 1_999_999_937_u64))
                .collect(),
            (1..=5_000)
                .map(|n| {
                    if n % 2 == 0 {
                        format!("{n:06}")
                    } else {
                        format!("9{n:018}")
                    }
                })
                .collect(),
            (1..=3).map(|n| format!("5{n:06}")).collect(),
        ];
        for cards in layouts {
            let accounts = table(&cards);
            for c in &cards {
                assert!(accounts.get(&card(c)).is_some(), "{c}");
            }
            for absent in ["000000", "4000000000000000", "9999999999999999999", "5000000"] {
                if !cards.iter().any(|c| c == absent) {
                    assert_eq!(accounts.get(&card(absent)), None, "{absent}");
                }
            }
        }
    }

    #[test]
    fn the_write_back_takes_each_marked_account_once_in_chunks() {
        let cards: Vec<String> = (1..=10).map(|n| format!("4{n:015}")).collect();
        let mut accounts = table(&cards);
        accounts.set(&card(&cards[2]), state(7, Some(3)));
        accounts.set(&card(&cards[8]), state(9, Some(4)));
        accounts.set(&card("123456"), state(0, None));
        accounts.set(&card("123456"), state(1, Some(5)));
        assert_eq!(accounts.len(), 11);
        assert!(accounts.has_behind());
        let mut out = Vec::new();
        let next = accounts.take_behind(0, 1, 100, &mut out);
        assert_eq!(out, vec![(card(&cards[2]), state(7, Some(3)))]);
        let next = accounts.take_behind(next.unwrap(), 5, 100, &mut out);
        assert_eq!(next, None);
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(out[2], (card("123456"), state(1, Some(5))));
        assert!(!accounts.has_behind());
        assert_eq!(
            accounts.get(&card(&cards[8])),
            Some(state(9, Some(4))),
            "the mark is not the state"
        );
    }

    #[test]
    fn setting_a_batch_of_accounts_in_key_order_sets_each_one() {
        let cards: Vec<String> = (0..1000).map(|n| format!("4{:015}", n * 7)).collect();
        let mut accounts = table(&cards);
        let mut updates: Vec<(CardNumber, AccountState)> = (0..1000)
            .step_by(3)
            .map(|n| (card(&cards[n]), state(n as i64, Some(n as i64 + 1))))
            .collect();
        updates.push((card("5000000000000000"), state(5, Some(9))));
        updates.reverse();
        accounts.set_all(updates.iter().map(|(card, state)| (CardKey::of(card), *state)));
        for (card, expected) in &updates {
            assert_eq!(accounts.get(card), Some(*expected), "{card}");
        }
        assert_eq!(accounts.get(&card(&cards[1])), Some(state(1, None)), "untouched");
        assert_eq!(accounts.len(), 1001, "the new card is opened");
    }

    #[test]
    fn an_account_is_24_bytes() {
        assert_eq!(std::mem::size_of::<PackedAccount>(), 24);
    }
}
