//! `stats` as memcached answers it (the fields monitoring tools read), and the same figures
//! on `/metrics`.

use std::io::Write;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use strata_core::metrics::{render_labeled, render_value};

use crate::server::Context;
use crate::text::{unix_now, Writer};

/// Answers `stats` (general), `stats settings`, and (empty) `items`, `slabs`, `sizes`,
/// `conns`, `cachedump`; anything else is an `ERROR`, as memcached answers it.
pub fn write(group: Option<&[u8]>, ctx: &Context, out: &mut BytesMut) {
    let mut stat = |name: &str, value: &dyn std::fmt::Display| {
        let _ = write!(Writer(out), "STAT {name} {value}\r\n");
    };
    match group {
        None => {
            let s = &ctx.store.stats;
            let (items, bytes) = ctx.store.size();
            let hits = s.get_hits.get();
            let misses = s.get_misses.get();
            stat("pid", &std::process::id());
            stat("uptime", &ctx.started.elapsed().as_secs());
            stat("time", &unix_now());
            stat("version", &crate::VERSION);
            stat("pointer_size", &64);
            stat(
                "curr_connections",
                &ctx.connections.current.load(Ordering::Relaxed),
            );
            stat("total_connections", &ctx.connections.total.get());
            stat("rejected_connections", &ctx.connections.rejected.get());
            stat("cmd_get", &(hits + misses));
            stat("cmd_set", &s.cmd_set.get());
            stat("cmd_flush", &s.flushes.get());
            stat("cmd_touch", &s.cmd_touch.get());
            stat("get_hits", &hits);
            stat("get_misses", &misses);
            stat("get_expired", &s.get_expired.get());
            stat("delete_misses", &s.delete_misses.get());
            stat("delete_hits", &s.delete_hits.get());
            stat("incr_misses", &s.incr_misses.get());
            stat("incr_hits", &s.incr_hits.get());
            stat("decr_misses", &s.decr_misses.get());
            stat("decr_hits", &s.decr_hits.get());
            stat("cas_misses", &s.cas_misses.get());
            stat("cas_hits", &s.cas_hits.get());
            stat("cas_badval", &s.cas_badval.get());
            stat("touch_hits", &s.touch_hits.get());
            stat("touch_misses", &(s.cmd_touch.get() - s.touch_hits.get()));
            stat("limit_maxbytes", &ctx.capacity_bytes);
            stat("threads", &1);
            stat("bytes", &bytes);
            stat("curr_items", &items);
            stat("evictions", &s.evictions.get());
            stat("expired_unfetched", &s.expired.get());
            stat("lease_wins", &s.lease_wins.get());
            stat("lease_waits", &s.lease_waits.get());
        }
        Some(b"settings") => {
            stat("maxbytes", &ctx.capacity_bytes);
            stat("maxconns", &ctx.max_connections);
            stat("item_size_max", &ctx.max_item_bytes);
            stat("evictions", &"on");
            stat("cas_enabled", &"yes");
        }
        Some(b"items" | b"slabs" | b"sizes" | b"conns" | b"cachedump") => {}
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
