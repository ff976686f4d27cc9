//! memcached's log watchers: a connection that sends `watch fetchers mutations` is answered
//! `OK` and from then on reads one line per read (`item_get`) or store (`item_store`) that any
//! client makes, as memcached writes them, with the client's connection id (`cfd`, the id
//! `stats conns` lists). With no watcher, commands pay one atomic load.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::store::Outcome;

/// What a watcher asked to see.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kinds {
    pub fetchers: bool,
    pub mutations: bool,
}

impl Kinds {
    /// The kinds named after `watch` (none: fetchers, as memcached); `None` for a name this
    /// cache does not log.
    pub fn parse(names: &[&[u8]]) -> Option<Self> {
        if names.is_empty() {
            return Some(Self {
                fetchers: true,
                mutations: false,
            });
        }
        let mut kinds = Self::default();
        for name in names {
            match *name {
                b"fetchers" => kinds.fetchers = true,
                b"mutations" => kinds.mutations = true,
                _ => return None,
            }
        }
        Some(kinds)
    }
}

/// An event as the watchers get it: which kind, and its line.
type Entry = (Kind, Arc<str>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fetch,
    Mutation,
}

/// The watchers of one cache.
#[derive(Debug)]
pub struct Watch {
    fetchers: AtomicUsize,
    mutations: AtomicUsize,
    /// memcached's global id of log entries.
    gid: AtomicU64,
    tx: broadcast::Sender<Entry>,
}

impl Default for Watch {
    fn default() -> Self {
        Self {
            fetchers: AtomicUsize::new(0),
            mutations: AtomicUsize::new(0),
            gid: AtomicU64::new(0),
            tx: broadcast::channel(4096).0,
        }
    }
}

impl Watch {
    /// Whether anyone watches reads.
    pub fn fetching(&self) -> bool {
        self.fetchers.load(Ordering::Relaxed) > 0
    }

    /// Whether anyone watches stores.
    pub fn mutating(&self) -> bool {
        self.mutations.load(Ordering::Relaxed) > 0
    }

    /// A read of `key` by client `client`: found or not, and the value's size.
    pub fn item_get(&self, key: &[u8], found: Option<usize>, client: u64) {
        if !self.fetching() {
            return;
        }
        let status = if found.is_some() {
            "found"
        } else {
            "not_found"
        };
        let size = found.unwrap_or(0);
        let line = format!(
            "type=item_get key={} status={status} clsid=1 cfd={client} size={size}",
            uriencode(key)
        );
        self.send(Kind::Fetch, &line);
    }

    /// A store of `size` bytes under `key` by `command`, with what it did.
    pub fn item_store(&self, store: Store<'_>) {
        if !self.mutating() {
            return;
        }
        let status = match store.outcome {
            Outcome::Stored => "stored",
            Outcome::NotStored => "not_stored",
            Outcome::Exists => "exists",
            Outcome::NotFound => "not_found",
        };
        let line = format!(
            "type=item_store key={} status={status} cmd={} ttl={} clsid=1 cfd={} size={}",
            uriencode(store.key),
            String::from_utf8_lossy(store.command),
            store.ttl,
            store.client,
            store.size
        );
        self.send(Kind::Mutation, &line);
    }

    fn send(&self, kind: Kind, what: &str) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let gid = self.gid.fetch_add(1, Ordering::Relaxed) + 1;
        let line = format!(
            "ts={}.{} gid={gid} {what}\n",
            now.as_secs(),
            now.subsec_micros()
        );
        let _ = self.tx.send((kind, line.into()));
    }

    /// Starts watching `kinds`; the watcher counts until the subscription is dropped.
    pub fn subscribe(self: &Arc<Self>, kinds: Kinds) -> Subscription {
        if kinds.fetchers {
            self.fetchers.fetch_add(1, Ordering::Relaxed);
        }
        if kinds.mutations {
            self.mutations.fetch_add(1, Ordering::Relaxed);
        }
        Subscription {
            watch: self.clone(),
            kinds,
            rx: self.tx.subscribe(),
        }
    }
}

/// A store, as a watcher sees it.
#[derive(Debug)]
pub struct Store<'a> {
    pub key: &'a [u8],
    pub command: &'a [u8],
    pub outcome: Outcome,
    /// Seconds to live; 0: never expires.
    pub ttl: u64,
    pub size: usize,
    pub client: u64,
}

/// One watcher's feed.
#[derive(Debug)]
pub struct Subscription {
    watch: Arc<Watch>,
    kinds: Kinds,
    rx: broadcast::Receiver<Entry>,
}

impl Subscription {
    /// The next line this watcher asked for; `None` once the cache is gone. A watcher that
    /// fell behind is told how many lines it missed, as memcached's `skipped=` line.
    pub async fn next(&mut self) -> Option<Arc<str>> {
        loop {
            match self.rx.recv().await {
                Ok((Kind::Fetch, line)) if self.kinds.fetchers => return Some(line),
                Ok((Kind::Mutation, line)) if self.kinds.mutations => return Some(line),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return Some(format!("skipped={missed}\n").into());
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.kinds.fetchers {
            self.watch.fetchers.fetch_sub(1, Ordering::Relaxed);
        }
        if self.kinds.mutations {
            self.watch.mutations.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A key as memcached's log shows it: bytes other than letters, digits and `-_.~` as `%XX`.
fn uriencode(key: &[u8]) -> String {
    let mut out = String::with_capacity(key.len());
    for &b in key {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_see_what_they_asked_for() {
        let watch = Arc::new(Watch::default());
        watch.item_get(b"nobody", None, 1);
        let kinds = Kinds::parse(&[b"mutations"]).unwrap_or_default();
        let mut sub = watch.subscribe(kinds);
        assert!(watch.mutating() && !watch.fetching());
        watch.item_get(b"k", Some(3), 7);
        watch.item_store(Store {
            key: b"a:b",
            command: b"set",
            outcome: Outcome::Stored,
            ttl: 0,
            size: 2,
            client: 7,
        });
        let line = sub.next().await.unwrap_or_default();
        assert!(
            line.contains(" type=item_store key=a%3Ab status=stored cmd=set ttl=0 clsid=1 cfd=7"),
            "{line}"
        );
        drop(sub);
        assert!(!watch.mutating());
        assert_eq!(Kinds::parse(&[b"rawcmds"]), None);
    }
}
