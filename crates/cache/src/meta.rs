//! The memcached meta protocol: `mg`, `ms`, `md`, `ma` (and `mn`, answered in `text.rs`),
//! with the flags clients use, including the recache flags behind leases: `N<ttl>` creates a
//! placeholder on a miss and gives the caller the right to compute the value (`W`), later
//! callers see `Z`; `R<ttl>` hands out that right early when little life is left; a value
//! marked stale (`md ... I`) answers `X` and `W` to its next reader.

use std::io::Write;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};

use crate::server::Context;
use crate::store::{now_ms, Changed, Counted, Item, Mode, Outcome};
use crate::text::{data_block, number, valid_key, Step, Writer};

/// The flags of one meta command: single letters, some with a token.
struct Flags<'a> {
    flags: Vec<(u8, &'a [u8])>,
}

impl<'a> Flags<'a> {
    fn parse(tokens: &[&'a [u8]]) -> Option<Self> {
        let mut flags = Vec::with_capacity(tokens.len());
        for token in tokens {
            let (first, rest) = token.split_first()?;
            if !first.is_ascii_alphabetic() {
                return None;
            }
            flags.push((*first, rest));
        }
        Some(Self { flags })
    }

    fn has(&self, flag: u8) -> bool {
        self.flags.iter().any(|(f, _)| *f == flag)
    }

    fn token(&self, flag: u8) -> Option<&'a [u8]> {
        self.flags.iter().find(|(f, _)| *f == flag).map(|(_, t)| *t)
    }

    fn number<T: std::str::FromStr>(&self, flag: u8) -> Option<Option<T>> {
        self.token(flag).map(number::<T>)
    }

    /// `C<cas>`: the CAS an item must have for the command to act on it; an error when the
    /// token is not a number.
    fn cas(&self) -> Result<Option<u64>, ()> {
        match self.number::<u64>(b'C') {
            Some(None) => Err(()),
            Some(cas) => Ok(cas),
            None => Ok(None),
        }
    }

    /// `O<opaque>` and `k`: echoed on every answer that asks for them.
    fn echo(&self, key: &[u8], out: &mut BytesMut) {
        if let Some(opaque) = self.token(b'O') {
            out.extend_from_slice(b" O");
            out.extend_from_slice(opaque);
        }
        if self.has(b'k') {
            out.extend_from_slice(b" k");
            out.extend_from_slice(key);
        }
    }
}

fn client_error(out: &mut BytesMut) -> Step {
    out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n");
    Step::Close
}

/// Handles one meta command.
pub fn step(
    command: &[u8],
    tokens: &[&[u8]],
    line_len: usize,
    buf: &[u8],
    ctx: &Context,
    out: &mut BytesMut,
) -> Step {
    let Some(key) = tokens.get(1).copied().filter(|k| valid_key(k)) else {
        return client_error(out);
    };
    match command {
        b"mg" => match Flags::parse(&tokens[2..]) {
            Some(flags) => {
                get(key, &flags, ctx, out);
                Step::Done(line_len)
            }
            None => client_error(out),
        },
        b"ms" => {
            let Some(len) = tokens.get(2).and_then(|t| number::<usize>(t)) else {
                return client_error(out);
            };
            let Some(flags) = Flags::parse(&tokens[3..]) else {
                return client_error(out);
            };
            let noreply = flags.has(b'q');
            match data_block(key, len, noreply, line_len, buf, ctx, out) {
                Ok((data, total)) => {
                    set(key, Bytes::copy_from_slice(data), &flags, ctx, out);
                    Step::Done(total)
                }
                Err(step) => step,
            }
        }
        b"md" => match Flags::parse(&tokens[2..]) {
            Some(flags) => {
                delete(key, &flags, ctx, out);
                Step::Done(line_len)
            }
            None => client_error(out),
        },
        _ => match Flags::parse(&tokens[2..]) {
            Some(flags) => {
                arithmetic(key, &flags, ctx, out);
                Step::Done(line_len)
            }
            None => client_error(out),
        },
    }
}

fn get(key: &[u8], flags: &Flags<'_>, ctx: &Context, out: &mut BytesMut) {
    let now = now_ms();
    let touch = flags.number::<i64>(b'T');
    let item = match touch {
        Some(Some(exptime)) => ctx.store.touch(key, exptime),
        Some(None) => {
            client_error(out);
            return;
        }
        None => ctx.store.get(key),
    };
    let (item, mut won) = match item {
        Some(item) => (item, false),
        None => match flags.number::<i64>(b'N') {
            Some(Some(exptime)) => match ctx.store.vivify(key, exptime) {
                Some(created) => (created, true),
                None => match ctx.store.get(key) {
                    Some(item) => (item, false),
                    None => return miss(key, flags, out),
                },
            },
            _ => return miss(key, flags, out),
        },
    };
    if !won {
        let recache = flags
            .number::<i64>(b'R')
            .flatten()
            .is_some_and(|threshold| item.expires_ms != 0 && item.ttl(now) < threshold);
        if item.stale || recache {
            won = !item.won.swap(true, Ordering::Relaxed);
        }
    }
    let others_won = !won && item.won.load(Ordering::Relaxed);
    if won {
        ctx.store.stats.lease_wins.inc();
    } else if others_won {
        ctx.store.stats.lease_waits.inc();
    }
    if flags.has(b'v') {
        let _ = write!(Writer(out), "VA {}", item.value.len());
    } else {
        out.extend_from_slice(b"HD");
    }
    returned(&item, key, flags, now, out);
    if won {
        out.extend_from_slice(b" W");
    }
    if others_won {
        out.extend_from_slice(b" Z");
    }
    if item.stale {
        out.extend_from_slice(b" X");
    }
    out.extend_from_slice(b"\r\n");
    if flags.has(b'v') {
        out.extend_from_slice(&item.value);
        out.extend_from_slice(b"\r\n");
    }
}

/// The return flags of a hit: `c`, `f`, `s`, `t`, then `O` and `k`.
fn returned(item: &Item, key: &[u8], flags: &Flags<'_>, now: u64, out: &mut BytesMut) {
    if flags.has(b'c') {
        let _ = write!(Writer(out), " c{}", item.cas);
    }
    if flags.has(b'f') {
        let _ = write!(Writer(out), " f{}", item.flags);
    }
    if flags.has(b's') {
        let _ = write!(Writer(out), " s{}", item.value.len());
    }
    if flags.has(b't') {
        let _ = write!(Writer(out), " t{}", item.ttl(now));
    }
    flags.echo(key, out);
}

fn miss(key: &[u8], flags: &Flags<'_>, out: &mut BytesMut) {
    if flags.has(b'q') {
        return;
    }
    out.extend_from_slice(b"EN");
    flags.echo(key, out);
    out.extend_from_slice(b"\r\n");
}

fn set(key: &[u8], value: Bytes, flags: &Flags<'_>, ctx: &Context, out: &mut BytesMut) {
    let exptime = flags.number::<i64>(b'T').map_or(Some(0), |t| t);
    let client_flags = flags.number::<u32>(b'F').map_or(Some(0), |f| f);
    let cas = flags.number::<u64>(b'C');
    let (Some(exptime), Some(client_flags), None | Some(Some(_))) = (exptime, client_flags, cas)
    else {
        client_error(out);
        return;
    };
    let mode = match (flags.token(b'M').and_then(|m| m.first()), cas.flatten()) {
        (_, Some(expected)) => Mode::Cas(expected),
        (None | Some(b'S' | b's'), None) => Mode::Set,
        (Some(b'E' | b'e'), None) => Mode::Add,
        (Some(b'A' | b'a'), None) => Mode::Append,
        (Some(b'P' | b'p'), None) => Mode::Prepend,
        (Some(b'R' | b'r'), None) => Mode::Replace,
        _ => {
            client_error(out);
            return;
        }
    };
    let outcome = ctx.store.store(key, value, client_flags, exptime, mode);
    let code: &[u8] = match outcome {
        Outcome::Stored => b"HD",
        Outcome::NotStored => b"NS",
        Outcome::Exists => b"EX",
        Outcome::NotFound => b"NF",
    };
    if flags.has(b'q') && outcome == Outcome::Stored {
        return;
    }
    out.extend_from_slice(code);
    if flags.has(b'c') {
        if let Some(item) = ctx.store.get(key) {
            let _ = write!(Writer(out), " c{}", item.cas);
        }
    }
    flags.echo(key, out);
    out.extend_from_slice(b"\r\n");
}

fn delete(key: &[u8], flags: &Flags<'_>, ctx: &Context, out: &mut BytesMut) {
    // `C<cas>`: only an item of that CAS is deleted (or marked); another answers `EX`.
    let Ok(cas) = flags.cas() else {
        client_error(out);
        return;
    };
    let changed = if flags.has(b'I') {
        let exptime = flags.number::<i64>(b'T').flatten();
        ctx.store.mark_stale(key, exptime, cas)
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

fn arithmetic(key: &[u8], flags: &Flags<'_>, ctx: &Context, out: &mut BytesMut) {
    let delta = flags.number::<u64>(b'D').map_or(Some(1), |d| d);
    let Some(delta) = delta else {
        out.extend_from_slice(b"CLIENT_ERROR invalid numeric delta argument\r\n");
        return;
    };
    let up = !matches!(
        flags.token(b'M').and_then(|m| m.first()),
        Some(b'D' | b'd' | b'-')
    );
    let Ok(cas) = flags.cas() else {
        client_error(out);
        return;
    };
    let mut outcome = ctx.store.count(key, delta, up, cas);
    if outcome == Counted::NotFound {
        if let Some(Some(exptime)) = flags.number::<i64>(b'N') {
            let initial = flags.number::<u64>(b'J').flatten().unwrap_or(0);
            let stored = ctx
                .store
                .store(key, initial.to_string().into(), 0, exptime, Mode::Add);
            outcome = match stored {
                Outcome::Stored => Counted::Value(initial),
                _ => ctx.store.count(key, delta, up, cas),
            };
        }
    }
    match outcome {
        Counted::NotFound | Counted::Exists => {
            out.extend_from_slice(if outcome == Counted::Exists {
                b"EX"
            } else {
                b"NF"
            });
            flags.echo(key, out);
            out.extend_from_slice(b"\r\n");
        }
        Counted::NonNumeric => out
            .extend_from_slice(b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
        Counted::Value(value) => {
            if flags.has(b'q') {
                return;
            }
            let text = value.to_string();
            if flags.has(b'v') {
                let _ = write!(Writer(out), "VA {}", text.len());
            } else {
                out.extend_from_slice(b"HD");
            }
            if let Some(item) = ctx.store.get(key) {
                returned(&item, key, flags, now_ms(), out);
            }
            out.extend_from_slice(b"\r\n");
            if flags.has(b'v') {
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}
