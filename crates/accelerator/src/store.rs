//! The object store: moka with a byte budget, holding every variant of a URL under its
//! primary key, a surrogate-key index, and the hit-for-miss memo.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderMap;
use moka::notification::RemovalCause;
use moka::ops::compute::Op;
use moka::sync::Cache;
use moka::Expiry;

use crate::key::Keyer;
use crate::object::Object;

/// At most this many variants are kept per URL; the oldest goes first.
const MAX_VARIANTS: usize = 32;

/// The variants stored under one primary key (copy-on-write).
#[derive(Debug, Default)]
pub struct Variants {
    pub objects: Vec<Arc<Object>>,
}

impl Variants {
    fn weight(&self, key: &str) -> u32 {
        let bytes: u64 = self.objects.iter().map(|o| o.weight()).sum::<u64>() + key.len() as u64;
        bytes.min(u64::from(u32::MAX)) as u32
    }

    fn hold(&self) -> Duration {
        let now = SystemTime::now();
        self.objects
            .iter()
            .map(|o| o.hold(now))
            .max()
            .unwrap_or_default()
    }
}

struct Hold;

impl Expiry<Arc<str>, Arc<Variants>> for Hold {
    fn expire_after_create(
        &self,
        _: &Arc<str>,
        value: &Arc<Variants>,
        _: Instant,
    ) -> Option<Duration> {
        Some(value.hold())
    }

    fn expire_after_update(
        &self,
        _: &Arc<str>,
        value: &Arc<Variants>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.hold())
    }
}

/// Evictions by cause, counted by the store's listener.
#[derive(Debug, Default)]
pub struct Evictions {
    pub size: strata_core::metrics::Counter,
    pub expired: strata_core::metrics::Counter,
}

type TagIndex = Arc<Mutex<HashMap<String, HashSet<Arc<str>>>>>;

/// The store.
pub struct Store {
    cache: Cache<Arc<str>, Arc<Variants>>,
    /// How long soft-purged objects stay servable while they are refreshed.
    soft_grace: Duration,
    tags: TagIndex,
    hit_for_miss: Cache<Arc<str>, ()>,
    pub evictions: Arc<Evictions>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl Store {
    pub fn new(capacity_bytes: u64, hit_for_miss: Duration, soft_grace: Duration) -> Self {
        let tags: TagIndex = Arc::default();
        let evictions = Arc::new(Evictions::default());
        let listener = {
            let tags = tags.clone();
            let evictions = evictions.clone();
            move |key: Arc<Arc<str>>, value: Arc<Variants>, cause: RemovalCause| {
                match cause {
                    RemovalCause::Size => evictions.size.inc(),
                    RemovalCause::Expired => evictions.expired.inc(),
                    RemovalCause::Explicit | RemovalCause::Replaced => {}
                }
                if cause != RemovalCause::Replaced {
                    unindex(&tags, &key, &value);
                }
            }
        };
        let cache = Cache::builder()
            .max_capacity(capacity_bytes)
            .weigher(|key: &Arc<str>, value: &Arc<Variants>| value.weight(key))
            .expire_after(Hold)
            .eviction_listener(listener)
            .build();
        Self {
            cache,
            soft_grace,
            tags,
            hit_for_miss: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(hit_for_miss.max(Duration::from_millis(1)))
                .build(),
            evictions,
        }
    }

    /// The newest variant under `key` that `request` selects (RFC 9111 §4.1).
    pub fn lookup(&self, key: &str, keyer: &Keyer, request: &HeaderMap) -> Option<Arc<Object>> {
        let variants = self.cache.get(key)?;
        variants
            .objects
            .iter()
            .rev()
            .find(|o| keyer.vary_values(&o.vary_names, request) == o.vary_values)
            .cloned()
    }

    /// Stores `object` under `key`, replacing the variant with the same `Vary` values.
    pub fn insert(&self, key: &str, object: Arc<Object>) {
        let key: Arc<str> = Arc::from(key);
        index(&self.tags, &key, &object.tags);
        self.hit_for_miss.invalidate(&key);
        self.cache.entry(key).and_compute_with(|existing| {
            let mut objects: Vec<Arc<Object>> = existing
                .map(|e| e.into_value().objects.clone())
                .unwrap_or_default();
            objects.retain(|o| {
                o.vary_names != object.vary_names || o.vary_values != object.vary_values
            });
            if objects.len() >= MAX_VARIANTS {
                objects.remove(0);
            }
            objects.push(object.clone());
            Op::Put(Arc::new(Variants { objects }))
        });
    }

    /// Re-weighs `key` after `object`'s body completed (moka weighs on insert only).
    pub fn settle(&self, key: &str, object: &Arc<Object>) {
        self.cache
            .entry(Arc::from(key))
            .and_compute_with(|existing| match existing {
                Some(e) if e.value().objects.iter().any(|o| Arc::ptr_eq(o, object)) => {
                    Op::Put(Arc::new(Variants {
                        objects: e.value().objects.clone(),
                    }))
                }
                _ => Op::Nop,
            });
    }

    /// Removes `object` (one variant) if it is still stored.
    pub fn remove_object(&self, key: &str, object: &Arc<Object>) {
        self.cache
            .entry(Arc::from(key))
            .and_compute_with(|existing| match existing {
                Some(e) if e.value().objects.iter().any(|o| Arc::ptr_eq(o, object)) => {
                    let objects: Vec<_> = e
                        .value()
                        .objects
                        .iter()
                        .filter(|o| !Arc::ptr_eq(o, object))
                        .cloned()
                        .collect();
                    if objects.is_empty() {
                        Op::Remove
                    } else {
                        Op::Put(Arc::new(Variants { objects }))
                    }
                }
                _ => Op::Nop,
            });
    }

    /// Removes every variant under `key` (hard) or marks them stale (soft); returns how many
    /// objects were affected.
    pub fn purge(&self, key: &str, soft: bool) -> usize {
        if soft {
            return self.cache.get(key).map_or(0, |v| {
                v.objects.iter().for_each(|o| o.soft_purge(self.soft_grace));
                v.objects.len()
            });
        }
        self.hit_for_miss.invalidate(key);
        self.cache.remove(key).map_or(0, |v| v.objects.len())
    }

    /// Purges every URL whose objects carry any of `tags`.
    pub fn purge_tags(&self, tags: &[String], soft: bool) -> usize {
        let keys: HashSet<Arc<str>> = {
            let index = self.tags.lock().unwrap_or_else(|e| e.into_inner());
            tags.iter()
                .filter_map(|t| index.get(t))
                .flat_map(|keys| keys.iter().cloned())
                .collect()
        };
        keys.iter().map(|k| self.purge(k, soft)).sum()
    }

    /// Purges every URL whose primary key matches `pattern` (`*` matches any run).
    pub fn ban(&self, pattern: &str, soft: bool) -> usize {
        let keys: Vec<Arc<str>> = self
            .cache
            .iter()
            .filter(|(k, _)| glob(pattern, k))
            .map(|(k, _)| (*k).clone())
            .collect();
        keys.iter().map(|k| self.purge(k, soft)).sum()
    }

    /// Remembers that `key` answered something uncacheable.
    pub fn mark_hit_for_miss(&self, key: &str) {
        self.hit_for_miss.insert(Arc::from(key), ());
    }

    pub fn is_hit_for_miss(&self, key: &str) -> bool {
        self.hit_for_miss.contains_key(key)
    }

    /// Stored bytes (as weighed) and URLs.
    pub fn size(&self) -> (u64, u64) {
        self.cache.run_pending_tasks();
        (self.cache.weighted_size(), self.cache.entry_count())
    }
}

fn index(tags: &TagIndex, key: &Arc<str>, object_tags: &[String]) {
    if object_tags.is_empty() {
        return;
    }
    let mut index = tags.lock().unwrap_or_else(|e| e.into_inner());
    for tag in object_tags {
        index.entry(tag.clone()).or_default().insert(key.clone());
    }
}

fn unindex(tags: &TagIndex, key: &Arc<str>, variants: &Variants) {
    let mut index = tags.lock().unwrap_or_else(|e| e.into_inner());
    for tag in variants.objects.iter().flat_map(|o| o.tags.iter()) {
        if let Some(keys) = index.get_mut(tag) {
            keys.remove(key);
            if keys.is_empty() {
                index.remove(tag);
            }
        }
    }
}

/// Glob match where `*` matches any run of characters (including none).
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != b'*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            pi += 1;
            mark = ti;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|b| *b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_runs() {
        assert!(glob("example.com/blog/*", "example.com/blog/a?b=1"));
        assert!(glob("*/blog/*", "x/blog/"));
        assert!(!glob("*/blog/*", "x/blo"));
        assert!(glob("a*c*e", "abcde"));
        assert!(!glob("a*c*e", "abcd"));
        assert!(glob("exact", "exact") && !glob("exact", "exactly"));
    }
}
