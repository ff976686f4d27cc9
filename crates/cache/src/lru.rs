//! One shard of the item store: a hash table of slot numbers over a slab of slots, and the
//! slots linked in least-recently-used order, weighed in bytes against the shard's budget.
//!
//! A lookup touches the table's probe group, the slot (hash, links, item) and the key: few
//! cache lines, no allocation. A read moves an item to the front at most once a second
//! (memcached bumps at most once a minute), so reads of a hot item write nothing. Storing past
//! the budget unlinks items from the back until the shard fits again; the item just stored is
//! never the one pushed out.
//!
//! The shard knows nothing of memcached: expiry, CAS and statistics are the store's.

use hashbrown::HashTable;

/// "No slot" in the links.
const NIL: u32 = u32::MAX;

/// A stored entry and its place in the recency order.
#[derive(Debug)]
struct Slot<V> {
    key: Box<[u8]>,
    hash: u64,
    value: V,
    weight: u64,
    /// Towards the front (more recently used).
    newer: u32,
    /// Towards the back.
    older: u32,
    /// When it last moved to the front, in the caller's seconds.
    bumped: u64,
}

/// An LRU map from byte keys to `V`, bounded by the sum of its entries' weights.
#[derive(Debug)]
pub struct Lru<V> {
    table: HashTable<u32>,
    slots: Vec<Option<Slot<V>>>,
    free: Vec<u32>,
    /// Most recently used.
    front: u32,
    /// Least recently used: the next to go.
    back: u32,
    bytes: u64,
    budget: u64,
}

impl<V> Lru<V> {
    pub fn new(budget: u64) -> Self {
        Self {
            table: HashTable::new(),
            slots: Vec::new(),
            free: Vec::new(),
            front: NIL,
            back: NIL,
            bytes: 0,
            budget,
        }
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// The sum of the entries' weights.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A new budget; entries are pushed out at the next store.
    pub fn set_budget(&mut self, budget: u64) {
        self.budget = budget;
    }

    fn slot(&self, at: u32) -> &Slot<V> {
        match &self.slots[at as usize] {
            Some(slot) => slot,
            None => unreachable!("the table and the links only name occupied slots"),
        }
    }

    fn slot_mut(&mut self, at: u32) -> &mut Slot<V> {
        match &mut self.slots[at as usize] {
            Some(slot) => slot,
            None => unreachable!("the table and the links only name occupied slots"),
        }
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        self.table
            .find(hash, |&at| {
                let slot = self.slot(at);
                slot.hash == hash && *slot.key == *key
            })
            .copied()
    }

    /// The value under `key`; a read at `now` (seconds) moves it to the front when it has
    /// not moved there in the last second.
    pub fn get(&mut self, hash: u64, key: &[u8], now: u64) -> Option<&V> {
        let at = self.find(hash, key)?;
        if self.slot(at).bumped < now {
            self.slot_mut(at).bumped = now;
            self.unlink(at);
            self.link_front(at);
        }
        Some(&self.slot(at).value)
    }

    /// The value under `key`, leaving the order alone.
    pub fn peek(&self, hash: u64, key: &[u8]) -> Option<&V> {
        self.find(hash, key).map(|at| &self.slot(at).value)
    }

    /// Stores `value` under `key` at the front, and returns what it replaced and what was
    /// pushed out of the back to make room (never the entry just stored).
    pub fn insert(
        &mut self,
        hash: u64,
        key: &[u8],
        value: V,
        weight: u64,
        now: u64,
    ) -> (Option<V>, Vec<V>) {
        let replaced = match self.find(hash, key) {
            Some(at) => {
                self.unlink(at);
                self.link_front(at);
                let slot = self.slot_mut(at);
                let old_weight = std::mem::replace(&mut slot.weight, weight);
                slot.bumped = now;
                let old = std::mem::replace(&mut slot.value, value);
                self.bytes = self.bytes - old_weight + weight;
                Some(old)
            }
            None => {
                let slot = Slot {
                    key: key.into(),
                    hash,
                    value,
                    weight,
                    newer: NIL,
                    older: NIL,
                    bumped: now,
                };
                let at = match self.free.pop() {
                    Some(at) => {
                        self.slots[at as usize] = Some(slot);
                        at
                    }
                    None => {
                        self.slots.push(Some(slot));
                        (self.slots.len() - 1) as u32
                    }
                };
                let slots = &self.slots;
                self.table
                    .insert_unique(hash, at, |&other| match &slots[other as usize] {
                        Some(slot) => slot.hash,
                        None => 0,
                    });
                self.link_front(at);
                self.bytes += weight;
                None
            }
        };
        let mut evicted = Vec::new();
        while self.bytes > self.budget && self.back != self.front {
            evicted.push(self.take(self.back));
        }
        (replaced, evicted)
    }

    /// Removes `key`; returns its value.
    pub fn remove(&mut self, hash: u64, key: &[u8]) -> Option<V> {
        let at = self.find(hash, key)?;
        Some(self.take(at))
    }

    /// Removes every entry whose key `doomed` picks; returns how many.
    pub fn remove_where(&mut self, mut doomed: impl FnMut(&[u8]) -> bool) -> usize {
        let picked: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&at| matches!(&self.slots[at as usize], Some(slot) if doomed(&slot.key)))
            .collect();
        picked.iter().for_each(|&at| drop(self.take(at)));
        picked.len()
    }

    /// Empties the shard; returns what it held, to be dropped outside the lock.
    pub fn take_all(&mut self) -> Self {
        std::mem::replace(self, Self::new(self.budget))
    }

    fn take(&mut self, at: u32) -> V {
        let hash = self.slot(at).hash;
        if let Ok(entry) = self.table.find_entry(hash, |&other| other == at) {
            entry.remove();
        }
        self.unlink(at);
        self.free.push(at);
        match self.slots[at as usize].take() {
            Some(slot) => {
                self.bytes -= slot.weight;
                slot.value
            }
            None => unreachable!("the table and the links only name occupied slots"),
        }
    }

    fn unlink(&mut self, at: u32) {
        let (newer, older) = {
            let slot = self.slot(at);
            (slot.newer, slot.older)
        };
        match newer {
            NIL => self.front = older,
            n => self.slot_mut(n).older = older,
        }
        match older {
            NIL => self.back = newer,
            o => self.slot_mut(o).newer = newer,
        }
        let slot = self.slot_mut(at);
        slot.newer = NIL;
        slot.older = NIL;
    }

    fn link_front(&mut self, at: u32) {
        let old_front = self.front;
        {
            let slot = self.slot_mut(at);
            slot.newer = NIL;
            slot.older = old_front;
        }
        match old_front {
            NIL => self.back = at,
            f => self.slot_mut(f).newer = at,
        }
        self.front = at;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

    fn hash(key: &str) -> u64 {
        BuildHasherDefault::<DefaultHasher>::default().hash_one(key.as_bytes())
    }

    fn keys<V>(lru: &Lru<V>) -> Vec<String> {
        let mut order = Vec::new();
        let mut at = lru.front;
        while at != NIL {
            let slot = lru.slot(at);
            order.push(String::from_utf8_lossy(&slot.key).into_owned());
            at = slot.older;
        }
        order
    }

    #[test]
    fn the_least_recently_used_go_first_and_the_newest_never() {
        let mut lru = Lru::new(30);
        for (i, key) in ["a", "b", "c"].iter().enumerate() {
            lru.insert(hash(key), key.as_bytes(), i, 10, 0);
        }
        assert_eq!(keys(&lru), ["c", "b", "a"]);
        // A read one second later moves "a" to the front; a second read that second doesn't.
        assert_eq!(lru.get(hash("a"), b"a", 1), Some(&0));
        assert_eq!(keys(&lru), ["a", "c", "b"]);
        lru.get(hash("c"), b"c", 0);
        assert_eq!(keys(&lru), ["a", "c", "b"], "c was bumped at 0 already");
        let (replaced, evicted) = lru.insert(hash("d"), b"d", 3, 10, 1);
        assert_eq!(
            (replaced, evicted),
            (None, vec![1]),
            "b was least recently used"
        );
        let (replaced, evicted) = lru.insert(hash("c"), b"c", 4, 25, 1);
        assert_eq!(replaced, Some(2));
        assert_eq!(evicted, vec![0, 3], "a and d go; c, just stored, stays");
        assert_eq!((lru.len(), lru.bytes()), (1, 25));
        let (_, evicted) = lru.insert(hash("e"), b"e", 5, 100, 2);
        assert_eq!(evicted, vec![4], "an entry over the budget alone stays");
        assert_eq!(keys(&lru), ["e"]);
    }

    #[test]
    fn removals_keep_the_table_links_and_weights_true() {
        let mut lru = Lru::new(1_000_000);
        for i in 0..1000 {
            let key = format!("k{i}");
            lru.insert(hash(&key), key.as_bytes(), i, 7, 0);
        }
        assert_eq!(lru.remove_where(|key| key.ends_with(b"7")), 100);
        for i in (0..1000).step_by(2) {
            let key = format!("k{i}");
            assert_eq!(lru.remove(hash(&key), key.as_bytes()), Some(i));
        }
        let order = keys(&lru);
        assert_eq!(order.len(), 400);
        assert_eq!((lru.len(), lru.bytes()), (400, 400 * 7));
        assert!(order
            .iter()
            .all(|k| !k.ends_with('7') && k[1..].parse::<u32>().unwrap() % 2 == 1));
        // Freed slots are reused and found again.
        for i in 0..1000 {
            let key = format!("n{i}");
            lru.insert(hash(&key), key.as_bytes(), i, 7, 0);
        }
        assert_eq!(
            lru.slots.len(),
            1400,
            "600 freed slots taken again, 400 new"
        );
        assert_eq!(lru.peek(hash("n999"), b"n999"), Some(&999));
        assert_eq!(lru.peek(hash("k1"), b"k1"), Some(&1));
        drop(lru.take_all());
        assert_eq!((lru.len(), lru.bytes(), keys(&lru).len()), (0, 0, 0));
    }
}
