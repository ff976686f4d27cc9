//! `stats` as memcached answers it (the fields monitoring tools read), and the same figures
//! on `/metrics`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use strata_core::metrics::{render_labeled, render_value};

use crate::out::Out;
use crate::server::Context;
use crate::text::{unix_now, Line};

/// Per-prefix counts (`stats detail on`): keys up to their first `:`, as memcached's default
/// delimiter; keys without one are not counted.
#[derive(Debug, Default)]
pub struct Detail {
    enabled: AtomicBool,
    prefixes: Mutex<HashMap<Vec<u8>, PrefixCounts>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct PrefixCounts {
    gets: u64,
    hits: u64,
    sets: u64,
    deletes: u64,
}

/// What a command did to a key, for [`Detail::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Did {
    Get { hit: bool },
    Set,
    Delete,
}

impl Detail {
    /// Counts `did` on `key`'s prefix, when collection is on.
    pub fn record(&self, key: &[u8], did: Did) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let Some(end) = key.iter().position(|b| *b == b':') else {
            return;
        };
        let mut prefixes = self.prefixes.lock().unwrap_or_else(PoisonError::into_inner);
        let counts = prefixes.entry(key[..end].to_vec()).or_default();
        match did {
            Did::Get { hit } => {
                counts.gets += 1;
                counts.hits += u64::from(hit);
            }
            Did::Set => counts.sets += 1,
            Did::Delete => counts.deletes += 1,
        }
    }

    /// `stats detail on|off|dump`.
    fn command(&self, what: Option<&[u8]>, out: &mut Out) {
        match what {
            Some(b"on") => self.enabled.store(true, Ordering::Relaxed),
            Some(b"off") => self.enabled.store(false, Ordering::Relaxed),
            Some(b"dump") => {
                let prefixes = self.prefixes.lock().unwrap_or_else(PoisonError::into_inner);
                let mut sorted: Vec<_> = prefixes.iter().collect();
                sorted.sort_by(|a, b| a.0.cmp(b.0));
                for (prefix, c) in sorted {
                    out.extend_from_slice(b"PREFIX ");
                    out.extend_from_slice(prefix);
                    let _ = write!(
                        out,
                        " get {} hit {} set {} del {}\r\n",
                        c.gets, c.hits, c.sets, c.deletes
                    );
                }
                out.extend_from_slice(b"END\r\n");
                return;
            }
            _ => {
                out.extend_from_slice(b"CLIENT_ERROR usage: stats detail on|off|dump\r\n");
                return;
            }
        }
        out.extend_from_slice(b"OK\r\n");
    }

    fn clear(&self) {
        self.prefixes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }
}

/// The counters' values at the last `stats reset`: `stats` reports counts since then, while
/// `/metrics` keeps counting from the start, as Prometheus expects of a counter.
#[derive(Debug, Default)]
pub struct Baseline(Mutex<HashMap<&'static str, u64>>);

/// One line of `stats`: a counter (reset by `stats reset`) or a reading.
enum Stat {
    Counter(u64),
    Reading(String),
}

/// The general statistics, by memcached's names.
fn general(ctx: &Context) -> Vec<(&'static str, Stat)> {
    use Stat::{Counter, Reading};
    let s = &ctx.store.stats;
    let (items, bytes) = ctx.store.size();
    let hits = s.get_hits.get();
    let misses = s.get_misses.get();
    vec![
        ("pid", Reading(std::process::id().to_string())),
        (
            "uptime",
            Reading(ctx.started.elapsed().as_secs().to_string()),
        ),
        ("time", Reading(unix_now().to_string())),
        ("version", Reading(crate::VERSION.to_owned())),
        ("pointer_size", Reading("64".into())),
        (
            "curr_connections",
            Reading(ctx.connections.current.load(Ordering::Relaxed).to_string()),
        ),
        ("total_connections", Counter(ctx.connections.total.get())),
        (
            "rejected_connections",
            Counter(ctx.connections.rejected.get()),
        ),
        ("cmd_get", Counter(hits + misses)),
        ("cmd_set", Counter(s.cmd_set.get())),
        ("cmd_flush", Counter(s.flushes.get())),
        ("cmd_touch", Counter(s.cmd_touch.get())),
        ("get_hits", Counter(hits)),
        ("get_misses", Counter(misses)),
        ("get_expired", Counter(s.get_expired.get())),
        ("delete_misses", Counter(s.delete_misses.get())),
        ("delete_hits", Counter(s.delete_hits.get())),
        ("incr_misses", Counter(s.incr_misses.get())),
        ("incr_hits", Counter(s.incr_hits.get())),
        ("decr_misses", Counter(s.decr_misses.get())),
        ("decr_hits", Counter(s.decr_hits.get())),
        ("cas_misses", Counter(s.cas_misses.get())),
        ("cas_hits", Counter(s.cas_hits.get())),
        ("cas_badval", Counter(s.cas_badval.get())),
        ("touch_hits", Counter(s.touch_hits.get())),
        (
            "touch_misses",
            Counter(s.cmd_touch.get() - s.touch_hits.get()),
        ),
        ("limit_maxbytes", Reading(ctx.store.capacity().to_string())),
        ("threads", Reading("1".into())),
        ("bytes", Reading(bytes.to_string())),
        ("curr_items", Reading(items.to_string())),
        ("evictions", Counter(s.evictions.get())),
        ("expired_unfetched", Counter(s.expired.get())),
        ("lease_wins", Counter(s.lease_wins.get())),
        ("lease_waits", Counter(s.lease_waits.get())),
    ]
}

/// Answers `stats` (general), `stats settings`, `stats reset`, `stats detail`, `stats conns`
/// (each open connection's id and peer), and (empty) `items`, `slabs`, `sizes`, `cachedump`; anything else is an `ERROR`, as
/// memcached answers it.
pub fn write(line: &Line<'_>, ctx: &Context, out: &mut Out) {
    let group = line.tokens.get(1).copied();
    let argument = line.tokens.get(2).copied();
    let mut stat = |name: &str, value: &dyn std::fmt::Display| {
        let _ = write!(out, "STAT {name} {value}\r\n");
    };
    match group {
        None => {
            let baseline = ctx
                .baseline
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (name, value) in general(ctx) {
                match value {
                    Stat::Counter(n) => {
                        let since = n.saturating_sub(baseline.get(name).copied().unwrap_or(0));
                        stat(name, &since);
                    }
                    Stat::Reading(text) => stat(name, &text),
                }
            }
        }
        Some(b"settings") => {
            stat("maxbytes", &ctx.store.capacity());
            stat("maxconns", &ctx.max_connections);
            stat("item_size_max", &ctx.max_item_bytes);
            stat("evictions", &"on");
            stat("cas_enabled", &"yes");
            stat(
                "detail_enabled",
                &if ctx.detail.enabled.load(Ordering::Relaxed) {
                    "yes"
                } else {
                    "no"
                },
            );
        }
        Some(b"reset") => {
            let mut baseline = ctx
                .baseline
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (name, value) in general(ctx) {
                if let Stat::Counter(n) = value {
                    baseline.insert(name, n);
                }
            }
            ctx.detail.clear();
            out.extend_from_slice(b"RESET\r\n");
            return;
        }
        Some(b"detail") => return ctx.detail.command(argument, out),
        Some(b"conns") => {
            for (id, peer) in ctx.connections.list() {
                stat(&format!("{id}:addr"), &peer);
            }
        }
        Some(b"items" | b"slabs" | b"sizes" | b"cachedump") => {}
        Some(_) => {
            out.extend_from_slice(b"ERROR\r\n");
            return;
        }
    }
    out.extend_from_slice(b"END\r\n");
}

/// Appends the cache's figures in Prometheus text format.
pub fn render(ctx: &Context, out: &mut String) {
    let s = &ctx.store.stats;
    render_labeled(
        out,
        "strata_cache_commands_total",
        "Cache commands by outcome.",
        "counter",
        "outcome",
        [
            ("get_hit", s.get_hits.get()),
            ("get_miss", s.get_misses.get()),
            ("set", s.cmd_set.get()),
            ("delete_hit", s.delete_hits.get()),
            ("delete_miss", s.delete_misses.get()),
            ("touch", s.cmd_touch.get()),
            ("flush", s.flushes.get()),
        ],
    );
    render_labeled(
        out,
        "strata_cache_leases_total",
        "get_or_set leases: rights to compute handed out, and reads told to wait for them.",
        "counter",
        "result",
        [("won", s.lease_wins.get()), ("waited", s.lease_waits.get())],
    );
    render_labeled(
        out,
        "strata_cache_evictions_total",
        "Items the store dropped, by cause.",
        "counter",
        "cause",
        [("size", s.evictions.get()), ("expired", s.expired.get())],
    );
    let (items, bytes) = ctx.store.size();
    for (name, help, value) in [
        ("strata_cache_items", "Items stored.", items),
        (
            "strata_cache_bytes",
            "Bytes held by items, as weighed.",
            bytes,
        ),
        (
            "strata_cache_connections",
            "Open client connections.",
            ctx.connections.current.load(Ordering::Relaxed),
        ),
    ] {
        render_value(out, name, help, "gauge", value);
    }
}
