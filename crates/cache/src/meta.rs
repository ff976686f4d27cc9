//! The memcached meta protocol: `mg`, `ms`, `md`, `ma` and `me` (`mn` is answered in
//! `text.rs`), as memcached 1.6 answers them: return flags in the order the client gave
//! them, errors that leave the connection open, and the recache flags behind leases:
//! `N<ttl>` creates a placeholder on a miss and gives the caller the right to compute the
//! value (`W`), later callers see `Z`; `R<ttl>` hands out that right early when little life
//! is left; a value marked stale (`md ... I`, or `ms ... I` with an older CAS) answers `X`
//! and `W` to its next reader.

use std::io::Write;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::out::Out;
use crate::server::Context;
use crate::store::{now_ms, Changed, Counted, Item, Mode, Outcome};
use crate::text::{data_block, number, valid_key, Line, Step};

/// Most tokens a meta command may have (command, key and flags), as memcached.
const MAX_TOKENS: usize = 19;
/// Longest opaque token (`O` included), as memcached.
const MAX_OPAQUE: usize = 32;

/// The flags of one meta command: single letters, each at most once, some with a token, in
/// the order the client gave them.
struct Flags<'a> {
    flags: Vec<(u8, &'a [u8])>,
}

impl<'a> Flags<'a> {
    /// Checks every flag as memcached does: an unknown or repeated flag is refused at once,
    /// a flag whose token is not the number it needs is refused once all are read.
    fn parse(tokens: &[&'a [u8]]) -> Result<Self, &'static str> {
        const BAD_TOKEN: &str = "CLIENT_ERROR bad token in command line format";
        let mut seen = [false; 128];
        let mut flags = Vec::with_capacity(tokens.len());
        let mut error = None;
        for token in tokens {
            let Some((&flag, rest)) = token.split_first() else {
                continue;
            };
            if flag >= 127 || seen[usize::from(flag)] {
                return Err("CLIENT_ERROR duplicate flag");
            }
            seen[usize::from(flag)] = true;
            let fails = match flag {
                b'N' | b'T' | b'R' => number::<i32>(rest).is_none().then_some(BAD_TOKEN),
                b'C' => number::<u64>(rest).is_none().then_some(BAD_TOKEN),
                b'F' => number::<u32>(rest)
                    .is_none()
                    .then_some("CLIENT_ERROR bad command line format"),
                b'M' => (rest.len() != 1).then_some("CLIENT_ERROR incorrect length for M token"),
                b'J' => number::<u64>(rest)
                    .is_none()
                    .then_some("CLIENT_ERROR invalid numeric initial value"),
                b'D' => number::<u64>(rest)
                    .is_none()
                    .then_some("CLIENT_ERROR invalid numeric delta value"),
                b'b' | b'l' | b'O' | b'P' | b'L' | b'k' | b's' | b't' | b'c' | b'f' | b'v'
                | b'h' | b'u' | b'q' | b'I' => None,
                _ => return Err("CLIENT_ERROR invalid flag"),
            };
            if fails.is_some() {
                error = fails;
            }
            flags.push((flag, rest));
        }
        match error {
            Some(error) => Err(error),
            None => Ok(Self { flags }),
        }
    }

    fn has(&self, flag: u8) -> bool {
        self.flags.iter().any(|(f, _)| *f == flag)
    }

    fn token(&self, flag: u8) -> Option<&'a [u8]> {
        self.flags.iter().find(|(f, _)| *f == flag).map(|(_, t)| *t)
    }

    /// The number after `flag` (checked by `parse`).
    fn number<T: std::str::FromStr>(&self, flag: u8) -> Option<T> {
        self.token(flag).and_then(number::<T>)
    }

    /// `O<opaque>` and `k` where the client put them, for answers without an item.
    fn echo(&self, key: &[u8], out: &mut Out) {
        for (flag, token) in &self.flags {
            echoed(*flag, token, key, out);
        }
    }

    /// Whether the opaque token is longer than memcached allows.
    fn opaque_too_long(&self) -> bool {
        self.token(b'O').is_some_and(|o| o.len() + 1 > MAX_OPAQUE)
    }
}

/// Writes return flag `O` (the opaque token) or `k` (the key); false for any other flag.
fn echoed(flag: u8, token: &[u8], key: &[u8], out: &mut Out) -> bool {
    match flag {
        b'O' => {
            out.extend_from_slice(b" O");
            out.extend_from_slice(token);
        }
        b'k' => {
            out.extend_from_slice(b" k");
            out.extend_from_slice(key);
        }
        _ => return false,
    }
    true
}

/// Answers an error; the connection stays open.
fn error(text: &str, out: &mut Out) {
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Handles one meta command.
pub fn step(line: &Line<'_>, ctx: &Context, out: &mut Out) -> Step {
    let (command, tokens, line_len) = (line.command(), &line.tokens, line.len);
    let Some(key) = tokens.get(1).copied().filter(|k| valid_key(k)) else {
        error(
            if tokens.len() < 2 {
                "ERROR"
            } else {
                "CLIENT_ERROR bad command line format"
            },
            out,
        );
        return Step::Done(line_len);
    };
    if command == b"ms" {
        return set(key, line, ctx, out);
    }
    if tokens.len() > MAX_TOKENS {
        error(
            if command == b"mg" {
                "CLIENT_ERROR options flags are too long"
            } else {
                "CLIENT_ERROR options flags too long"
            },
            out,
        );
        return Step::Done(line_len);
    }
    match (command, Flags::parse(&tokens[2..])) {
        (b"me", _) => debug(key, ctx, out),
        (b"mg", Ok(flags)) => get(key, &flags, ctx, out),
        (b"mg", Err(text)) => error(text, out),
        (_, Err(_)) => error("CLIENT_ERROR invalid or duplicate flag", out),
        (b"md", Ok(flags)) => delete(key, &flags, ctx, out),
        (_, Ok(flags)) => arithmetic(key, &flags, ctx, out),
    }
    Step::Done(line_len)
}

fn get(key: &[u8], flags: &Flags<'_>, ctx: &Context, out: &mut Out) {
    if flags.opaque_too_long() {
        return error("CLIENT_ERROR opaque token too long", out);
    }
    let now = now_ms();
    let found = match flags.number::<i64>(b'T') {
        Some(exptime) => ctx.store.touch(key, exptime),
        None => ctx.store.peek(key),
    };
    let (item, created) = match (found, flags.number::<i64>(b'N')) {
        (Some(item), _) => (item, false),
        (None, Some(exptime)) => match ctx.store.vivify(key, exptime) {
            Some(created) => (created, true),
            None => match ctx.store.peek(key) {
                Some(item) => (item, false),
                None => return miss(key, flags, out),
            },
        },
        (None, None) => return miss(key, flags, out),
    };
    let (fetched, idle) = item.access(now, !flags.has(b'u'));
    // A placeholder's creator holds its token; anyone else sees it taken.
    let token_sent = !created && item.won.load(Ordering::Relaxed);
    let mut won = created;
    if flags.has(b'v') {
        let _ = write!(out, "VA {}", item.value.len());
    } else {
        out.extend_from_slice(b"HD");
    }
    for (flag, token) in &flags.flags {
        match flag {
            b'R' => {
                let threshold = number::<i64>(token).unwrap_or(0);
                if !token_sent && !created && item.expires_ms != 0 && item.ttl(now) < threshold {
                    won = true;
                }
            }
            b'l' => {
                let _ = write!(out, " l{idle}");
            }
            b'h' => {
                let _ = write!(out, " h{}", u8::from(fetched));
            }
            _ => returned(*flag, token, &item, key, now, out),
        }
    }
    if token_sent {
        out.extend_from_slice(b" Z");
    }
    if item.stale {
        out.extend_from_slice(b" X");
        won |= !token_sent;
    }
    if won {
        out.extend_from_slice(b" W");
        item.won.store(true, Ordering::Relaxed);
        ctx.store.stats.lease_wins.inc();
    } else if token_sent {
        ctx.store.stats.lease_waits.inc();
    }
    out.extend_from_slice(b"\r\n");
    if flags.has(b'v') {
        out.value(&item.value);
        out.extend_from_slice(b"\r\n");
    }
}

/// One return flag of an item: `c`, `f`, `s`, `t`, `O`, `k` (others say nothing here).
fn returned(flag: u8, token: &[u8], item: &Item, key: &[u8], now: u64, out: &mut Out) {
    match flag {
        b'c' => {
            let _ = write!(out, " c{}", item.cas);
        }
        b'f' => {
            let _ = write!(out, " f{}", item.flags);
        }
        b's' => {
            let _ = write!(out, " s{}", item.value.len());
        }
        b't' => {
            let _ = write!(out, " t{}", item.ttl(now));
        }
        _ => {
            echoed(flag, token, key, out);
        }
    }
}

/// A miss: `EN`, unless quiet.
fn miss(key: &[u8], flags: &Flags<'_>, out: &mut Out) {
    if flags.has(b'q') {
        return;
    }
    out.extend_from_slice(b"EN");
    flags.echo(key, out);
    out.extend_from_slice(b"\r\n");
}

/// `ms <key> <datalen> <flags>*` and its data block.
fn set(key: &[u8], line: &Line<'_>, ctx: &Context, out: &mut Out) -> Step {
    let (tokens, line_len) = (&line.tokens, line.len);
    let refuse = |text: &str, out: &mut Out| {
        error(text, out);
        Step::Done(line_len)
    };
    if tokens.len() == 2 {
        return refuse("CLIENT_ERROR bad command line format", out);
    }
    if tokens.len() > MAX_TOKENS {
        return refuse("CLIENT_ERROR options flags too long", out);
    }
    let Some(len) = tokens
        .get(2)
        .and_then(|t| number::<i32>(t))
        .filter(|n| (0..=i32::MAX - 2).contains(n))
    else {
        return refuse("CLIENT_ERROR bad command line format", out);
    };
    let len = len as usize;
    // Past this point the value's length is known: an error throws the value away.
    let swallow = |text: &str, out: &mut Out| {
        error(text, out);
        Step::Swallow {
            consumed: line_len,
            skip: len + 2,
        }
    };
    let flags = match Flags::parse(&tokens[3..]) {
        Ok(flags) => flags,
        Err(text) => return swallow(text, out),
    };
    if flags.opaque_too_long() {
        return swallow("CLIENT_ERROR opaque token too long", out);
    }
    let cas = flags.number::<u64>(b'C');
    let mode = match (flags.token(b'M').and_then(|m| m.first()), cas) {
        (None | Some(b'S' | b'R'), Some(expected)) if flags.has(b'I') => Mode::CasOrStale(expected),
        (None | Some(b'S' | b'R'), Some(expected)) => Mode::Cas(expected),
        (None | Some(b'S'), None) => Mode::Set,
        (Some(b'E'), _) => Mode::Add,
        (Some(b'A'), _) => Mode::Append,
        (Some(b'P'), _) => Mode::Prepend,
        (Some(b'R'), None) => Mode::Replace,
        _ => return swallow("CLIENT_ERROR invalid mode for ms M token", out),
    };
    let (data, total) = match data_block(key, len, line, ctx, out) {
        Ok(block) => block,
        Err(step) => return step,
    };
    let exptime = flags.number::<i64>(b'T').unwrap_or(0);
    let client_flags = flags.number::<u32>(b'F').unwrap_or(0);
    let (outcome, stored_cas) = ctx.store.store_cas(
        key,
        Bytes::copy_from_slice(data),
        client_flags,
        exptime,
        mode,
    );
    if flags.has(b'q') && outcome == Outcome::Stored {
        return Step::Done(total);
    }
    out.extend_from_slice(match outcome {
        Outcome::Stored => b"HD",
        Outcome::NotStored => b"NS",
        Outcome::Exists => b"EX",
        Outcome::NotFound => b"NF",
    });
    for (flag, token) in &flags.flags {
        // The CAS of what was stored; 0 when nothing was (as memcached).
        if *flag == b'c' {
            let _ = write!(out, " c{stored_cas}");
        } else {
            echoed(*flag, token, key, out);
        }
    }
    out.extend_from_slice(b"\r\n");
    Step::Done(total)
}

fn delete(key: &[u8], flags: &Flags<'_>, ctx: &Context, out: &mut Out) {
    // `C<cas>`: only an item of that CAS is deleted (or marked); another answers `EX`.
    let cas = flags.number::<u64>(b'C');
    let changed = if flags.has(b'I') {
        ctx.store.mark_stale(key, flags.number::<i64>(b'T'), cas)
    } else {
        ctx.store.delete(key, cas)
    };
    // Quiet mode hides only the nominal answer.
    if flags.has(b'q') && changed == Changed::Done {
        return;
    }
    out.extend_from_slice(match changed {
        Changed::Done => b"HD",
        Changed::NotFound => b"NF",
        Changed::Exists => b"EX",
    });
    flags.echo(key, out);
    out.extend_from_slice(b"\r\n");
}

fn arithmetic(key: &[u8], flags: &Flags<'_>, ctx: &Context, out: &mut Out) {
    if flags.opaque_too_long() {
        return error("CLIENT_ERROR opaque token too long", out);
    }
    let up = match flags.token(b'M').and_then(|m| m.first()) {
        None | Some(b'I' | b'+') => true,
        Some(b'D' | b'-') => false,
        Some(_) => return error("CLIENT_ERROR invalid mode for ma M token", out),
    };
    let delta = flags.number::<u64>(b'D').unwrap_or(1);
    let cas = flags.number::<u64>(b'C');
    let mut outcome = ctx.store.count(key, delta, up, cas);
    if outcome == Counted::NotFound {
        if let Some(exptime) = flags.number::<i64>(b'N') {
            let initial = flags.number::<u64>(b'J').unwrap_or(0);
            let stored = ctx
                .store
                .store(key, initial.to_string().into(), 0, exptime, Mode::Add);
            outcome = match stored {
                Outcome::Stored => Counted::Value(initial),
                _ => ctx.store.count(key, delta, up, cas),
            };
        }
    }
    let value = match outcome {
        Counted::NonNumeric => {
            return error(
                "CLIENT_ERROR cannot increment or decrement non-numeric value",
                out,
            )
        }
        Counted::NotFound | Counted::Exists => {
            out.extend_from_slice(if outcome == Counted::Exists {
                b"EX"
            } else {
                b"NF"
            });
            flags.echo(key, out);
            out.extend_from_slice(b"\r\n");
            return;
        }
        Counted::Value(value) => value,
    };
    if flags.has(b'q') {
        // Quiet: a new TTL still applies.
        if let Some(exptime) = flags.number::<i64>(b'T') {
            ctx.store.touch(key, exptime);
        }
        return;
    }
    let text = value.to_string();
    if flags.has(b'v') {
        let _ = write!(out, "VA {}", text.len());
    } else {
        out.extend_from_slice(b"HD");
    }
    let now = now_ms();
    let mut item = ctx.store.peek(key);
    for (flag, token) in &flags.flags {
        match (flag, &item) {
            (b'T', _) => {
                let exptime = number::<i64>(token).unwrap_or(0);
                item = ctx.store.touch(key, exptime).or(item);
            }
            (b'c' | b't', Some(item)) => returned(*flag, token, item, key, now, out),
            _ => {
                echoed(*flag, token, key, out);
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    if flags.has(b'v') {
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// `me <key>`: what the store knows of an item, for debugging: its expiry (`-1`: never),
/// seconds since last access, CAS, whether it was read, and its size.
fn debug(key: &[u8], ctx: &Context, out: &mut Out) {
    let Some(item) = ctx.store.peek(key) else {
        out.extend_from_slice(b"EN\r\n");
        return;
    };
    let now = now_ms();
    let (fetched, idle) = item.access(now, false);
    out.extend_from_slice(b"ME ");
    out.extend_from_slice(key);
    let _ = write!(
        out,
        " exp={} la={idle} cas={} fetch={} cls=1 size={}\r\n",
        item.ttl(now),
        item.cas,
        if fetched { "yes" } else { "no" },
        key.len() + item.value.len(),
    );
}
