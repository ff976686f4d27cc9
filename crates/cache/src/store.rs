//! The item store: memcached's expiry rules, flags, CAS values, and the read-modify-write
//! commands done atomically per key, over shards of [`Lru`] weighed in bytes.
//!
//! A full store evicts the least recently used items, as memcached does, so that a key just
//! stored is readable until newer traffic pushes it out (a session just saved, a value just
//! cached). The shards are the store's own rather than moka's: a hit is a hash, one
//! uncontended lock and a few cache lines, where moka's concurrent map, access log and
//! housekeeping cost the cache tier a fifth of memcached's throughput. A key's shard stays
//! locked through a read-modify-write (`cas`, `incr`, `append`, meta), which makes it atomic.
//! Expired and delayed-flushed items are dropped lazily, when a lookup meets them or the LRU
//! pushes them out; `flush_all` empties the shards at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::{Bytes, BytesMut};
use strata_core::metrics::Counter;

use crate::lru::Lru;

/// Relative expiry times above this are absolute Unix times (memcached's rule).
const RELATIVE_MAX: i64 = 60 * 60 * 24 * 30;

/// Bytes counted per item on top of its key and value.
const OVERHEAD: u64 = 64;

/// One stored value.
#[derive(Debug)]
pub struct Item {
    pub value: Bytes,
    pub flags: u32,
    pub cas: u64,
    /// Unix milliseconds at which it expires; 0: never.
    pub expires_ms: u64,
    /// Unix milliseconds at which it was stored (for delayed `flush_all`).
    stored_ms: u64,
    /// Meta protocol: the right to recompute this item was given to a client (`W`); later
    /// clients are told someone else is on it (`Z`).
    pub won: AtomicBool,
    /// Meta protocol: marked stale (`md ... I`, or `ms ... I` with an old CAS).
    pub stale: bool,
    /// Read since it was stored (meta `h`).
    fetched: AtomicBool,
    /// Unix milliseconds of the last read or store (meta `l`, `me`'s `la`).
    accessed_ms: AtomicU64,
}

impl Item {
    fn new(value: Bytes, flags: u32, cas: u64, expires_ms: u64, stored_ms: u64) -> Self {
        Self {
            value,
            flags,
            cas,
            expires_ms,
            stored_ms,
            won: AtomicBool::new(false),
            stale: false,
            fetched: AtomicBool::new(false),
            accessed_ms: AtomicU64::new(stored_ms),
        }
    }

    /// A read at `now`: whether the item had been read before, and how many seconds since
    /// its last access; counted as an access itself unless `bump` is false (meta `u`).
    ///
    /// The access time is kept to the second (what `l` reports), so a hot item's reads write
    /// nothing: its fields are written at most once a second.
    pub fn access(&self, now_ms: u64, bump: bool) -> (bool, u64) {
        let fetched = self.fetched.load(Ordering::Relaxed);
        let accessed = self.accessed_ms.load(Ordering::Relaxed);
        if bump {
            if !fetched {
                self.fetched.store(true, Ordering::Relaxed);
            }
            if now_ms.saturating_sub(accessed) >= 1000 {
                self.accessed_ms.store(now_ms, Ordering::Relaxed);
            }
        }
        (fetched, now_ms.saturating_sub(accessed) / 1000)
    }

    /// The same item with a new expiry, keeping what the meta protocol knows of it.
    fn renewed(&self, expires_ms: u64) -> Self {
        Self {
            value: self.value.clone(),
            flags: self.flags,
            cas: self.cas,
            expires_ms,
            stored_ms: self.stored_ms,
            won: AtomicBool::new(self.won.load(Ordering::Relaxed)),
            stale: self.stale,
            fetched: AtomicBool::new(self.fetched.load(Ordering::Relaxed)),
            accessed_ms: AtomicU64::new(self.accessed_ms.load(Ordering::Relaxed)),
        }
    }

    /// Seconds of life left, rounded up as memcached's clock of whole seconds counts them
    /// (an item just stored with `T60` has 60 left, not 59); -1 when it never expires (meta
    /// `t`).
    pub fn ttl(&self, now_ms: u64) -> i64 {
        if self.expires_ms == 0 {
            -1
        } else {
            self.expires_ms.saturating_sub(now_ms).div_ceil(1000) as i64
        }
    }
}

/// An expiry time as a client gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expires {
    Never,
    At(u64),
    /// Negative, or an absolute time in the past: gone at once.
    Already,
}

impl Expires {
    /// memcached's rule: 0 never, up to 30 days relative seconds, beyond that an absolute
    /// Unix time, negative already expired.
    pub fn from_exptime(exptime: i64, now_ms: u64) -> Self {
        match exptime {
            0 => Expires::Never,
            e if e < 0 => Expires::Already,
            e if e <= RELATIVE_MAX => Expires::At(now_ms + e as u64 * 1000),
            e if (e as u64) * 1000 <= now_ms => Expires::Already,
            e => Expires::At(e as u64 * 1000),
        }
    }

    fn ms(self) -> u64 {
        match self {
            Expires::Never => 0,
            Expires::At(ms) => ms,
            Expires::Already => 1,
        }
    }
}

/// What a storage command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stored,
    NotStored,
    Exists,
    NotFound,
}

/// What an arithmetic command did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    Value(u64),
    NotFound,
    NonNumeric,
    /// The item's CAS is not the one the command named; nothing changed.
    Exists,
}

/// What a command on an existing item (`delete`, a stale mark) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Changed {
    Done,
    NotFound,
    /// The item's CAS is not the one the command named; nothing changed.
    Exists,
}

/// How a storage command combines with what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Set,
    Add,
    Replace,
    Append,
    Prepend,
    /// Compare-and-swap against this CAS value.
    Cas(u64),
    /// Meta `ms ... C<cas> I`: as `Cas`, and a CAS older than the item's stores the value
    /// marked stale, keeping the item's expiry and its recache token.
    CasOrStale(u64),
}

/// Counters the `stats` command and `/metrics` report.
#[derive(Debug, Default)]
pub struct Stats {
    pub get_hits: Counter,
    pub get_misses: Counter,
    pub get_expired: Counter,
    pub cmd_set: Counter,
    pub cmd_touch: Counter,
    pub touch_hits: Counter,
    pub delete_hits: Counter,
    pub delete_misses: Counter,
    pub incr_hits: Counter,
    pub incr_misses: Counter,
    pub decr_hits: Counter,
    pub decr_misses: Counter,
    pub cas_hits: Counter,
    pub cas_misses: Counter,
    pub cas_badval: Counter,
    pub evictions: Counter,
    pub expired: Counter,
    pub flushes: Counter,
    /// Meta reads told that another client is computing the value (`Z`): lease waits.
    pub lease_waits: Counter,
    /// Recompute rights handed out (`W`).
    pub lease_wins: Counter,
}

/// What a read-modify-write command does with the live item it found.
pub(crate) enum Op {
    Keep,
    Put(Arc<Item>),
    Remove,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Each shard's share of the budget is at least this, so that a large item fits in one.
const SHARD_MIN_BYTES: u64 = 4 * 1024 * 1024;

/// The store: shards of [`Lru`], each behind its own lock, a key's shard chosen by its hash.
pub struct Store {
    shards: Box<[Mutex<Lru<Arc<Item>>>]>,
    hasher: RandomState,
    /// The whole budget (each shard has its share); `cache_memlimit` changes it.
    capacity: AtomicU64,
    next_cas: AtomicU64,
    /// A delayed `flush_all`: items stored before this Unix millisecond are gone once it
    /// passes; 0 when none is pending.
    flush_at: AtomicU64,
    pub stats: Arc<Stats>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("shards", &self.shards.len())
            .finish()
    }
}

/// Bytes an item weighs against the budget.
fn weight(key: &[u8], item: &Item) -> u64 {
    (key.len() + item.value.len()) as u64 + OVERHEAD
}

impl Store {
    pub fn new(capacity_bytes: u64) -> Self {
        let count = (capacity_bytes / SHARD_MIN_BYTES)
            .clamp(1, 64)
            .next_power_of_two()
            .min(64);
        Self {
            shards: (0..count)
                .map(|_| Mutex::new(Lru::new(capacity_bytes / count)))
                .collect(),
            hasher: RandomState::new(),
            capacity: AtomicU64::new(capacity_bytes),
            next_cas: AtomicU64::new(1),
            flush_at: AtomicU64::new(0),
            stats: Arc::new(Stats::default()),
        }
    }

    /// `key`'s hash and its shard, locked.
    fn shard(&self, key: &[u8]) -> (u64, MutexGuard<'_, Lru<Arc<Item>>>) {
        let hash = self.hasher.hash_one(key);
        let at = (hash >> 40) as usize & (self.shards.len() - 1);
        (hash, lock(&self.shards[at]))
    }

    fn cas(&self) -> u64 {
        self.next_cas.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether `item` is still alive at `now`.
    fn live(&self, item: &Item, now: u64) -> bool {
        if item.expires_ms != 0 && item.expires_ms <= now {
            return false;
        }
        let flush = self.flush_at.load(Ordering::Relaxed);
        !(flush != 0 && now >= flush && item.stored_ms <= flush)
    }

    /// Counts what a store pushed out: expired items as such, live ones as evictions.
    fn evicted(&self, items: &[Arc<Item>], now: u64) {
        for item in items {
            if self.live(item, now) {
                self.stats.evictions.inc();
            } else {
                self.stats.expired.inc();
            }
        }
    }

    fn item(&self, value: Bytes, flags: u32, expires: Expires, now: u64) -> Arc<Item> {
        Arc::new(Item::new(value, flags, self.cas(), expires.ms(), now))
    }

    /// The live item under `key`, counted as read.
    pub fn get(&self, key: &[u8]) -> Option<Arc<Item>> {
        let (item, now) = self.lookup(key)?;
        item.access(now, true);
        Some(item)
    }

    /// The live item under `key`, counted in the statistics but not marked as read.
    pub fn peek(&self, key: &[u8]) -> Option<Arc<Item>> {
        self.lookup(key).map(|(item, _)| item)
    }

    /// The live item under `key`, and the time it was looked up at. A dead one found on the
    /// way is unlinked.
    fn lookup(&self, key: &[u8]) -> Option<(Arc<Item>, u64)> {
        let now = now_ms();
        let (hash, mut shard) = self.shard(key);
        let found = shard.get(hash, key, now / 1000).cloned();
        let dead = found.as_ref().is_some_and(|item| !self.live(item, now));
        if dead {
            shard.remove(hash, key);
        }
        drop(shard);
        match found {
            Some(item) if !dead => {
                self.stats.get_hits.inc();
                Some((item, now))
            }
            Some(_) => {
                self.stats.expired.inc();
                self.stats.get_expired.inc();
                self.stats.get_misses.inc();
                None
            }
            None => {
                self.stats.get_misses.inc();
                None
            }
        }
    }

    /// Stores `item` under `key`.
    fn put(&self, key: &[u8], item: Arc<Item>, now: u64) {
        let weight = weight(key, &item);
        let (hash, mut shard) = self.shard(key);
        let (_, evicted) = shard.insert(hash, key, item, weight, now / 1000);
        drop(shard);
        self.evicted(&evicted, now);
    }

    /// A storage command (`set`, `add`, `replace`, `append`, `prepend`, `cas`).
    pub fn store(&self, key: &[u8], value: Bytes, flags: u32, exptime: i64, mode: Mode) -> Outcome {
        self.store_cas(key, value, flags, exptime, mode).0
    }

    /// A storage command, with the CAS of what it stored (0 when it stored nothing).
    pub fn store_cas(
        &self,
        key: &[u8],
        value: Bytes,
        flags: u32,
        exptime: i64,
        mode: Mode,
    ) -> (Outcome, u64) {
        self.stats.cmd_set.inc();
        let now = now_ms();
        let expires = Expires::from_exptime(exptime, now);
        if mode == Mode::Set {
            if expires == Expires::Already {
                self.remove(key);
                return (Outcome::Stored, 0);
            }
            let item = self.item(value, flags, expires, now);
            let cas = item.cas;
            self.put(key, item, now);
            return (Outcome::Stored, cas);
        }
        let mut outcome = Outcome::NotStored;
        let mut stored_cas = 0;
        self.compute(key, now, |current| {
            let (result, op) = match (mode, current) {
                (Mode::Add, Some(_)) | (Mode::Replace | Mode::Append | Mode::Prepend, None) => {
                    (Outcome::NotStored, Op::Keep)
                }
                (Mode::Cas(_) | Mode::CasOrStale(_), None) => (Outcome::NotFound, Op::Keep),
                (Mode::CasOrStale(expected), Some(item)) if expected < item.cas => {
                    let stale = Item {
                        stale: true,
                        won: AtomicBool::new(item.won.load(Ordering::Relaxed)),
                        ..Item::new(value.clone(), flags, self.cas(), item.expires_ms, now)
                    };
                    (Outcome::Stored, Op::Put(Arc::new(stale)))
                }
                (Mode::Cas(expected) | Mode::CasOrStale(expected), Some(item))
                    if item.cas != expected =>
                {
                    (Outcome::Exists, Op::Keep)
                }
                (Mode::Append | Mode::Prepend, Some(item)) => {
                    let mut joined = BytesMut::with_capacity(item.value.len() + value.len());
                    let (first, second) = if mode == Mode::Append {
                        (&item.value, &value)
                    } else {
                        (&value, &item.value)
                    };
                    joined.extend_from_slice(first);
                    joined.extend_from_slice(second);
                    let kept = Arc::new(Item::new(
                        joined.freeze(),
                        item.flags,
                        self.cas(),
                        item.expires_ms,
                        now,
                    ));
                    (Outcome::Stored, Op::Put(kept))
                }
                (_, _) if expires == Expires::Already => (Outcome::Stored, Op::Remove),
                (_, _) => (
                    Outcome::Stored,
                    Op::Put(self.item(value.clone(), flags, expires, now)),
                ),
            };
            outcome = result;
            if let Op::Put(item) = &op {
                stored_cas = item.cas;
            }
            op
        });
        if matches!(mode, Mode::Cas(_) | Mode::CasOrStale(_)) {
            match outcome {
                Outcome::Stored => self.stats.cas_hits.inc(),
                Outcome::Exists => self.stats.cas_badval.inc(),
                Outcome::NotFound => self.stats.cas_misses.inc(),
                Outcome::NotStored => {}
            }
        }
        (outcome, stored_cas)
    }

    /// Unlinks `key` (what a failed set does, so no stale value survives it).
    pub fn remove(&self, key: &[u8]) {
        let (hash, mut shard) = self.shard(key);
        let removed = shard.remove(hash, key);
        drop(shard);
        drop(removed);
    }

    /// `delete`: removes the live item under `key`, if its CAS is `cas` when one is given.
    pub fn delete(&self, key: &[u8], cas: Option<u64>) -> Changed {
        let now = now_ms();
        let mut changed = Changed::NotFound;
        self.update(key, now, |item| match cas {
            Some(expected) if item.cas != expected => {
                changed = Changed::Exists;
                Op::Keep
            }
            _ => {
                changed = Changed::Done;
                Op::Remove
            }
        });
        if changed == Changed::Done {
            self.stats.delete_hits.inc();
        } else {
            self.stats.delete_misses.inc();
        }
        changed
    }

    /// `incr` (`decr` when `up` is false): the new value. Increments wrap at 2^64,
    /// decrements stop at 0; the item keeps its flags and expiry. With `cas`, only an item of
    /// that CAS is changed.
    pub fn count(&self, key: &[u8], delta: u64, up: bool, cas: Option<u64>) -> Counted {
        let now = now_ms();
        let mut outcome = Counted::NotFound;
        self.update(key, now, |item| {
            if cas.is_some_and(|expected| expected != item.cas) {
                outcome = Counted::Exists;
                return Op::Keep;
            }
            let number = std::str::from_utf8(&item.value)
                .ok()
                .map(str::trim_end)
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u64>().ok());
            let Some(number) = number else {
                outcome = Counted::NonNumeric;
                return Op::Keep;
            };
            let next = if up {
                number.wrapping_add(delta)
            } else {
                number.saturating_sub(delta)
            };
            outcome = Counted::Value(next);
            Op::Put(Arc::new(Item::new(
                Bytes::from(next.to_string()),
                item.flags,
                self.cas(),
                item.expires_ms,
                now,
            )))
        });
        let (hits, misses) = if up {
            (&self.stats.incr_hits, &self.stats.incr_misses)
        } else {
            (&self.stats.decr_hits, &self.stats.decr_misses)
        };
        match outcome {
            Counted::Value(_) => hits.inc(),
            Counted::NotFound => misses.inc(),
            Counted::NonNumeric | Counted::Exists => {}
        }
        outcome
    }

    /// `touch`: a new expiry for a live item; returns it with its new expiry.
    pub fn touch(&self, key: &[u8], exptime: i64) -> Option<Arc<Item>> {
        self.stats.cmd_touch.inc();
        let now = now_ms();
        let expires = Expires::from_exptime(exptime, now);
        let mut touched = None;
        self.update(key, now, |item| {
            if expires == Expires::Already {
                touched = Some(item);
                return Op::Remove;
            }
            let renewed = Arc::new(item.renewed(expires.ms()));
            touched = Some(renewed.clone());
            Op::Put(renewed)
        });
        if touched.is_some() {
            self.stats.touch_hits.inc();
        }
        touched
    }

    /// `flush_all [delay]`: every item stored until then is gone (after `delay` seconds).
    pub fn flush(&self, delay: u64) {
        self.stats.flushes.inc();
        if delay == 0 {
            self.flush_at.store(0, Ordering::Relaxed);
            for shard in &self.shards {
                let gone = lock(shard).take_all();
                drop(gone);
            }
        } else {
            self.flush_at
                .store(now_ms() + delay * 1000, Ordering::Relaxed);
        }
    }

    /// Meta `mg ... N<ttl>` on a miss: creates an empty placeholder that lives `exptime`,
    /// whose recache right goes to the caller. Returns `None` when someone else created one
    /// first (the caller then reads theirs).
    pub fn vivify(&self, key: &[u8], exptime: i64) -> Option<Arc<Item>> {
        let now = now_ms();
        let expires = Expires::from_exptime(exptime, now);
        let mut created = None;
        self.compute(key, now, |existing| {
            if existing.is_some() {
                return Op::Keep;
            }
            let item = self.item(Bytes::new(), 0, expires, now);
            item.won.store(true, Ordering::Relaxed);
            created = Some(item.clone());
            Op::Put(item)
        });
        created
    }

    /// Meta `md ... I`: keeps the item but marks it stale with a new CAS (and expiry, when
    /// given), so the next reader recomputes it while others may still use it. With `cas`,
    /// only an item of that CAS is marked.
    pub fn mark_stale(&self, key: &[u8], exptime: Option<i64>, cas: Option<u64>) -> Changed {
        let now = now_ms();
        let mut changed = Changed::NotFound;
        self.update(key, now, |item| {
            if cas.is_some_and(|expected| expected != item.cas) {
                changed = Changed::Exists;
                return Op::Keep;
            }
            changed = Changed::Done;
            let expires_ms =
                exptime.map_or(item.expires_ms, |e| Expires::from_exptime(e, now).ms());
            Op::Put(Arc::new(Item {
                stale: true,
                ..Item::new(
                    item.value.clone(),
                    item.flags,
                    self.cas(),
                    expires_ms,
                    item.stored_ms,
                )
            }))
        });
        changed
    }

    /// Replaces the live item under `key` with what `change` makes of it, atomically;
    /// `change` is not called when there is no live item.
    fn update(&self, key: &[u8], now: u64, change: impl FnOnce(Arc<Item>) -> Op) {
        self.compute(key, now, |current| match current {
            Some(item) => change(item),
            None => Op::Keep,
        });
    }

    /// Replaces what is under `key` with what `change` makes of the live item (`None` when
    /// there is none), atomically: the key's shard stays locked throughout. A dead item found
    /// is unlinked first.
    fn compute(&self, key: &[u8], now: u64, change: impl FnOnce(Option<Arc<Item>>) -> Op) {
        let (hash, mut shard) = self.shard(key);
        let mut dead = None;
        let current = match shard.peek(hash, key) {
            Some(item) if self.live(item, now) => Some(item.clone()),
            Some(_) => {
                dead = shard.remove(hash, key);
                None
            }
            None => None,
        };
        let (mut replaced, mut evicted) = (None, Vec::new());
        match change(current) {
            Op::Keep => {}
            Op::Remove => replaced = shard.remove(hash, key),
            Op::Put(item) => {
                let weight = weight(key, &item);
                (replaced, evicted) = shard.insert(hash, key, item, weight, now / 1000);
            }
        }
        drop(shard);
        if dead.is_some() {
            self.stats.expired.inc();
        }
        self.evicted(&evicted, now);
        drop((dead, replaced, evicted));
    }

    /// Removes every item whose key starts with `prefix`; returns how many.
    pub fn delete_prefix(&self, prefix: &[u8]) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).remove_where(|key| key.starts_with(prefix)))
            .sum()
    }

    /// Items and bytes held (as weighed).
    pub fn size(&self) -> (u64, u64) {
        self.shards.iter().fold((0, 0), |(items, bytes), shard| {
            let shard = lock(shard);
            (items + shard.len() as u64, bytes + shard.bytes())
        })
    }

    /// The whole budget in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Relaxed)
    }

    /// A new budget for the whole store (`cache_memlimit`); the excess goes as items are
    /// stored.
    pub fn set_capacity(&self, capacity_bytes: u64) {
        self.capacity.store(capacity_bytes, Ordering::Relaxed);
        let share = capacity_bytes / self.shards.len() as u64;
        for shard in &self.shards {
            lock(shard).set_budget(share);
        }
    }
}

/// A shard, locked (a panic elsewhere while it was held leaves it usable: its links are
/// changed only by code that cannot panic half-way).
fn lock<V>(shard: &Mutex<Lru<V>>) -> MutexGuard<'_, Lru<V>> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::new(1024 * 1024)
    }

    fn value(s: &Store, key: &str) -> Option<String> {
        s.get(key.as_bytes())
            .map(|i| String::from_utf8_lossy(&i.value).into_owned())
    }

    #[test]
    fn expiry_rules() {
        let now = 1_000_000_000_000;
        assert_eq!(Expires::from_exptime(0, now), Expires::Never);
        assert_eq!(Expires::from_exptime(-1, now), Expires::Already);
        assert_eq!(Expires::from_exptime(10, now), Expires::At(now + 10_000));
        let absolute = now / 1000 + 100;
        assert_eq!(
            Expires::from_exptime(absolute as i64, now),
            Expires::At(absolute * 1000)
        );
        assert_eq!(
            Expires::from_exptime(RELATIVE_MAX + 1, now),
            Expires::Already
        );
    }

    #[test]
    fn ttl_counts_whole_seconds_up() {
        let item = Item::new(Bytes::new(), 0, 1, 100_000, 0);
        assert_eq!(item.ttl(40_000), 60);
        assert_eq!(
            item.ttl(40_001),
            60,
            "59.999 s left is reported as 60, as memcached does"
        );
        assert_eq!(item.ttl(99_999), 1);
        assert_eq!(item.ttl(100_000), 0);
        assert_eq!(Item::new(Bytes::new(), 0, 1, 0, 0).ttl(5), -1);
    }

    #[test]
    fn storage_modes() {
        let s = store();
        assert_eq!(s.store(b"k", "a".into(), 5, 0, Mode::Add), Outcome::Stored);
        assert_eq!(
            s.store(b"k", "b".into(), 5, 0, Mode::Add),
            Outcome::NotStored
        );
        assert_eq!(
            s.store(b"x", "b".into(), 5, 0, Mode::Replace),
            Outcome::NotStored
        );
        assert_eq!(
            s.store(b"k", "b".into(), 0, 0, Mode::Append),
            Outcome::Stored
        );
        assert_eq!(
            s.store(b"k", "0".into(), 0, 0, Mode::Prepend),
            Outcome::Stored
        );
        assert_eq!(value(&s, "k").as_deref(), Some("0ab"));
        assert_eq!(s.get(b"k").unwrap().flags, 5, "append keeps the flags");
        let cas = s.get(b"k").unwrap().cas;
        assert_eq!(
            s.store(b"k", "c".into(), 0, 0, Mode::Cas(cas + 100)),
            Outcome::Exists
        );
        assert_eq!(
            s.store(b"k", "c".into(), 0, 0, Mode::Cas(cas)),
            Outcome::Stored
        );
        assert_eq!(
            s.store(b"z", "c".into(), 0, 0, Mode::Cas(cas)),
            Outcome::NotFound
        );
        assert_eq!(
            s.store(b"k", "gone".into(), 0, -1, Mode::Set),
            Outcome::Stored
        );
        assert_eq!(value(&s, "k"), None, "a negative exptime expires at once");
    }

    #[test]
    fn counters() {
        let s = store();
        assert_eq!(s.count(b"n", 1, true, None), Counted::NotFound);
        s.store(b"n", "10".into(), 2, 0, Mode::Set);
        assert_eq!(s.count(b"n", 5, true, None), Counted::Value(15));
        assert_eq!(s.count(b"n", 100, false, None), Counted::Value(0));
        s.store(b"n", u64::MAX.to_string().into(), 2, 0, Mode::Set);
        assert_eq!(s.count(b"n", 2, true, None), Counted::Value(1));
        assert_eq!(s.get(b"n").unwrap().flags, 2);
        s.store(b"t", "abc".into(), 0, 0, Mode::Set);
        assert_eq!(s.count(b"t", 1, true, None), Counted::NonNumeric);
        let cas = s.get(b"n").unwrap().cas;
        assert_eq!(s.count(b"n", 1, true, Some(cas + 1)), Counted::Exists);
        assert_eq!(
            value(&s, "n").as_deref(),
            Some("1"),
            "a wrong CAS changes nothing"
        );
        assert_eq!(s.count(b"n", 1, true, Some(cas)), Counted::Value(2));
    }

    #[test]
    fn prefix_delete() {
        let s = store();
        for key in ["p:1", "p:2", "q:1"] {
            s.store(key.as_bytes(), "v".into(), 0, 0, Mode::Set);
        }
        assert_eq!(s.delete_prefix(b"p:"), 2);
        assert_eq!(value(&s, "q:1").as_deref(), Some("v"));
        assert_eq!(value(&s, "p:1"), None);
    }

    #[test]
    fn a_full_store_keeps_the_newest_writes() {
        // 16 MiB written into a 1 MiB store, 10 KB at a time: the last keys written remain,
        // the first ones are gone.
        let s = store();
        let value = Bytes::from(vec![b'x'; 10_000]);
        for i in 0..1600 {
            let key = format!("key:{i}");
            assert_eq!(
                s.store(key.as_bytes(), value.clone(), 0, 0, Mode::Set),
                Outcome::Stored
            );
            assert!(s.get(key.as_bytes()).is_some(), "{key} readable at once");
        }
        let newest = (1500..1600)
            .filter(|i| s.get(format!("key:{i}").as_bytes()).is_some())
            .count();
        let oldest = (0..100)
            .filter(|i| s.get(format!("key:{i}").as_bytes()).is_some())
            .count();
        assert_eq!((newest, oldest), (100, 0));
        assert!(s.size().1 <= 1024 * 1024);
        assert!(s.stats.evictions.get() > 1400);
    }

    #[test]
    fn touch_delete_and_flush() {
        let s = store();
        s.store(b"a", "1".into(), 0, 0, Mode::Set);
        assert!(s.touch(b"a", 100).unwrap().expires_ms > now_ms());
        assert!(s.touch(b"missing", 100).is_none());
        let cas = s.get(b"a").unwrap().cas;
        assert_eq!(s.delete(b"a", Some(cas + 1)), Changed::Exists);
        assert_eq!(s.mark_stale(b"a", None, Some(cas + 1)), Changed::Exists);
        assert!(!s.get(b"a").unwrap().stale, "a wrong CAS marks nothing");
        assert_eq!(s.delete(b"a", Some(cas)), Changed::Done);
        assert_eq!(s.delete(b"a", None), Changed::NotFound);
        s.store(b"b", "1".into(), 0, 0, Mode::Set);
        s.flush(0);
        assert_eq!(value(&s, "b"), None);
        assert_eq!(
            s.delete(b"b", None),
            Changed::NotFound,
            "a flushed item is not there to delete"
        );
        assert_eq!(s.store(b"b", "2".into(), 0, 0, Mode::Add), Outcome::Stored);
        s.store(b"c", "1".into(), 0, 0, Mode::Set);
        assert_eq!(
            value(&s, "c").as_deref(),
            Some("1"),
            "a set after a flush is kept"
        );
    }
}
