//! The index of live idempotency keys, in memory: which stored record each (scope, key) is kept
//! under. The store appends records and never looks a key up (an index on the key would be a
//! random B-tree insert in every keyed commit); the engine is the one writer, so it can keep the
//! index itself, loaded at start-up and updated as batches commit and old records are pruned.
//!
//! A key is held by a 64-bit hash of (scope, key), keyed per process, so clients cannot aim
//! collisions at it: 16 bytes a live key instead of the key itself. A hash says which record to
//! read; the record's own name says whether it is the key asked for. Two live keys with one hash
//! (about one in 10^12 pairs) are both kept: the second by its whole name, beside the hash map.

use std::collections::HashMap;

type Map<K, V> = HashMap<K, V, ahash::RandomState>;

#[derive(Default)]
pub struct KeyIndex {
    hasher: ahash::RandomState,
    by_hash: Map<u64, i64>,
    /// Keys whose hash another live key holds, by their whole name.
    collided: Map<String, i64>,
}

impl KeyIndex {
    fn hash(&self, scope: &str, key: &str) -> u64 {
        self.hasher.hash_one((scope, key))
    }

    fn name(scope: &str, key: &str) -> String {
        format!("{scope} {key}")
    }

    /// The record that may hold (scope, key): read it and compare its name before trusting it.
    pub fn candidate(&self, scope: &str, key: &str) -> Option<i64> {
        if !self.collided.is_empty() {
            if let Some(id) = self.collided.get(&Self::name(scope, key)) {
                return Some(*id);
            }
        }
        self.by_hash.get(&self.hash(scope, key)).copied()
    }

    /// Records that (scope, key) is kept under record `id`. The caller has checked it is not in use.
    pub fn insert(&mut self, id: i64, scope: &str, key: &str) {
        let hash = self.hash(scope, key);
        match self.by_hash.entry(hash) {
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(id);
            }
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(Self::name(scope, key), id);
            }
        }
    }

    /// Forgets record `id`, kept under (scope, key), after it was pruned.
    pub fn remove(&mut self, id: i64, scope: &str, key: &str) {
        if !self.collided.is_empty() {
            let name = Self::name(scope, key);
            if self.collided.get(&name) == Some(&id) {
                self.collided.remove(&name);
                return;
            }
        }
        let hash = self.hash(scope, key);
        if self.by_hash.get(&hash) == Some(&id) {
            self.by_hash.remove(&hash);
        }
    }

    pub fn len(&self) -> usize {
        self.by_hash.len() + self.collided.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_keys_with_one_hash_are_both_found_and_pruned_apart() {
        let mut index = KeyIndex::default();
        index.insert(1, "/transfers", "a");
        // Pretend a's record also holds b's hash, as a collision would: b is kept by its name.
        let hash_b = index.hash("/transfers", "b");
        index.by_hash.insert(hash_b, 1);
        index.insert(2, "/transfers", "b");
        assert_eq!(index.candidate("/transfers", "a"), Some(1));
        assert_eq!(index.candidate("/transfers", "b"), Some(2));
        index.by_hash.remove(&hash_b);
        assert_eq!(index.len(), 2);
        index.remove(1, "/transfers", "a");
        assert_eq!(index.candidate("/transfers", "b"), Some(2), "b outlives a");
        index.remove(2, "/transfers", "b");
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn a_removal_of_an_older_record_keeps_the_newer_one() {
        let mut index = KeyIndex::default();
        index.insert(7, "/transaction", "k");
        index.remove(3, "/transaction", "k");
        assert_eq!(index.candidate("/transaction", "k"), Some(7));
        assert_eq!(index.candidate("/transfers", "k"), None, "scopes are apart");
    }
}
