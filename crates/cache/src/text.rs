//! The memcached text protocol: one command at a time out of a connection's read buffer,
//! answers appended to its write buffer. Pipelining falls out of this: the connection runs
//! every whole command it has before it writes.

use std::io::Write;

use bytes::{Bytes, BytesMut};

use crate::meta;
use crate::server::Context;
use crate::store::{now_ms, Counted, Mode, Outcome};

/// Longest command line accepted (keys are at most 250 bytes; `get` may name many).
pub const MAX_LINE: usize = 8192;
/// Longest key.
pub const MAX_KEY: usize = 250;

/// What the connection does after one step.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// The buffer does not hold a whole command yet.
    Need,
    /// A command of this many bytes was handled.
    Done(usize),
    /// The line (this many bytes) was handled; the next `skip` bytes are a value that is
    /// thrown away as it arrives, never buffered.
    Swallow { consumed: usize, skip: usize },
    /// Answer what was written, then close.
    Close,
}

/// Handles the first command in `buf`.
pub fn step(buf: &[u8], ctx: &Context, out: &mut BytesMut) -> Step {
    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
        if buf.len() > MAX_LINE {
            out.extend_from_slice(b"CLIENT_ERROR line too long\r\n");
            return Step::Close;
        }
        return Step::Need;
    };
    let line_len = end + 1;
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let tokens: Vec<&[u8]> = line
        .split(|b| *b == b' ')
        .filter(|t| !t.is_empty())
        .collect();
    let Some(command) = tokens.first() else {
        out.extend_from_slice(b"ERROR\r\n");
        return Step::Done(line_len);
    };
    match *command {
        b"get" | b"gets" => {
            retrieve(&tokens[1..], None, command == b"gets", ctx, out);
            Step::Done(line_len)
        }
        b"gat" | b"gats" => {
            match tokens.get(1).and_then(|t| number::<i64>(t)) {
                Some(exptime) if tokens.len() > 2 => {
                    retrieve(&tokens[2..], Some(exptime), command == b"gats", ctx, out)
                }
                _ => out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n"),
            }
            Step::Done(line_len)
        }
        b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas" => {
            storage(command, &tokens, line_len, buf, ctx, out)
        }
        b"delete" => {
            let reply = match tokens.get(1) {
                Some(key) if valid_key(key) && tokens.len() <= 3 => {
                    if ctx.store.delete(key) {
                        &b"DELETED\r\n"[..]
                    } else {
                        b"NOT_FOUND\r\n"
                    }
                }
                _ => b"CLIENT_ERROR bad command line format\r\n",
            };
            reply_unless_noreply(&tokens, 2, reply, out);
            Step::Done(line_len)
        }
        b"incr" | b"decr" => {
            arithmetic(command == b"incr", &tokens, ctx, out);
            Step::Done(line_len)
        }
        b"touch" => {
            let reply = match (tokens.get(1), tokens.get(2).and_then(|t| number::<i64>(t))) {
                (Some(key), Some(exptime)) if valid_key(key) => {
                    if ctx.store.touch(key, exptime).is_some() {
                        &b"TOUCHED\r\n"[..]
                    } else {
                        b"NOT_FOUND\r\n"
                    }
                }
                _ => b"CLIENT_ERROR bad command line format\r\n",
            };
            reply_unless_noreply(&tokens, 3, reply, out);
            Step::Done(line_len)
        }
        b"flush_all" => {
            let delay = tokens
                .get(1)
                .filter(|t| **t != b"noreply")
                .map(|t| number::<u64>(t));
            match delay {
                Some(None) => out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n"),
                Some(Some(delay)) => {
                    ctx.store.flush(delay);
                    reply_unless_noreply(&tokens, 2, b"OK\r\n", out);
                }
                None => {
                    ctx.store.flush(0);
                    reply_unless_noreply(&tokens, 1, b"OK\r\n", out);
                }
            }
            Step::Done(line_len)
        }
        b"version" => {
            out.extend_from_slice(b"VERSION ");
            out.extend_from_slice(crate::VERSION.as_bytes());
            out.extend_from_slice(b"\r\n");
            Step::Done(line_len)
        }
        b"verbosity" => {
            // As memcached: one or two arguments (the last may be noreply); the level itself
            // changes nothing here.
            if matches!(tokens.len(), 2 | 3) {
                reply_unless_noreply(&tokens, tokens.len() - 1, b"OK\r\n", out);
            } else {
                out.extend_from_slice(b"ERROR\r\n");
            }
            Step::Done(line_len)
        }
        b"stats" => {
            crate::stats::write(tokens.get(1).copied(), ctx, out);
            Step::Done(line_len)
        }
        b"quit" => Step::Close,
        b"cache_memlimit" => {
            // moka cannot change its budget while running; say so rather than pretend.
            out.extend_from_slice(
                b"SERVER_ERROR cache_memlimit is not supported: set cache.capacity_bytes\r\n",
            );
            Step::Done(line_len)
        }
        // Strata's extension (the Django backend's `delete_prefix`); memcached says ERROR.
        b"strata_delete_prefix" => {
            match tokens.get(1).filter(|p| valid_key(p)) {
                Some(prefix) => {
                    let removed = ctx.store.delete_prefix(prefix);
                    let _ = write!(Writer(out), "DELETED {removed}\r\n");
                }
                None => out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n"),
            }
            Step::Done(line_len)
        }
        b"mn" => {
            out.extend_from_slice(b"MN\r\n");
            Step::Done(line_len)
        }
        b"mg" | b"ms" | b"md" | b"ma" => meta::step(command, &tokens, line_len, buf, ctx, out),
        _ => {
            out.extend_from_slice(b"ERROR\r\n");
            Step::Done(line_len)
        }
    }
}

/// A key memcached accepts: 1–250 bytes, no control characters or spaces.
pub fn valid_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY && key.iter().all(|b| *b > 32 && *b != 127)
}

/// Parses a decimal token.
pub fn number<T: std::str::FromStr>(token: &[u8]) -> Option<T> {
    std::str::from_utf8(token).ok()?.parse().ok()
}

/// Writes `reply` unless the token at `index` is `noreply`.
fn reply_unless_noreply(tokens: &[&[u8]], index: usize, reply: &[u8], out: &mut BytesMut) {
    if tokens.get(index) != Some(&&b"noreply"[..]) {
        out.extend_from_slice(reply);
    }
}

fn retrieve(keys: &[&[u8]], touch: Option<i64>, with_cas: bool, ctx: &Context, out: &mut BytesMut) {
    if keys.is_empty() || !keys.iter().all(|k| valid_key(k)) {
        out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n");
        return;
    }
    for key in keys {
        let item = match touch {
            Some(exptime) => ctx.store.touch(key, exptime),
            None => ctx.store.get(key),
        };
        if let Some(item) = item {
            out.extend_from_slice(b"VALUE ");
            out.extend_from_slice(key);
            let _ = write!(Writer(out), " {} {}", item.flags, item.value.len());
            if with_cas {
                let _ = write!(Writer(out), " {}", item.cas);
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&item.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"END\r\n");
}

/// `<cmd> <key> <flags> <exptime> <bytes> [<cas>] [noreply]` and its data block.
fn storage(
    command: &[u8],
    tokens: &[&[u8]],
    line_len: usize,
    buf: &[u8],
    ctx: &Context,
    out: &mut BytesMut,
) -> Step {
    let is_cas = command == b"cas";
    let fields = if is_cas { 6 } else { 5 };
    let bytes = tokens.get(4).and_then(|t| number::<usize>(t));
    let Some(bytes) = bytes else {
        out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n");
        return Step::Done(line_len);
    };
    let key = tokens[1];
    let flags = tokens.get(2).and_then(|t| number::<u32>(t));
    let exptime = tokens.get(3).and_then(|t| number::<i64>(t));
    let cas = if is_cas {
        tokens.get(5).and_then(|t| number::<u64>(t))
    } else {
        Some(0)
    };
    let well_formed = valid_key(key)
        && flags.is_some()
        && exptime.is_some()
        && cas.is_some()
        && tokens.len() <= fields + 1;
    if !well_formed {
        out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n");
        return Step::Swallow {
            consumed: line_len,
            skip: bytes + 2,
        };
    }
    let noreply = tokens.get(fields) == Some(&&b"noreply"[..]);
    let (data, total) = match data_block(key, bytes, noreply, line_len, buf, ctx, out) {
        Ok(block) => block,
        Err(step) => return step,
    };
    let mode = match command {
        b"add" => Mode::Add,
        b"replace" => Mode::Replace,
        b"append" => Mode::Append,
        b"prepend" => Mode::Prepend,
        b"cas" => Mode::Cas(cas.unwrap_or(0)),
        _ => Mode::Set,
    };
    let outcome = ctx.store.store(
        key,
        Bytes::copy_from_slice(data),
        flags.unwrap_or(0),
        exptime.unwrap_or(0),
        mode,
    );
    if !noreply {
        out.extend_from_slice(match outcome {
            Outcome::Stored => b"STORED\r\n",
            Outcome::NotStored => b"NOT_STORED\r\n",
            Outcome::Exists => b"EXISTS\r\n",
            Outcome::NotFound => b"NOT_FOUND\r\n",
        });
    }
    Step::Done(total)
}

/// The `bytes`-long data block after a storage command's line, with the command's total
/// length; or the step to take instead: a value over the limit is refused (and the key
/// unlinked, as memcached does, so no stale value outlives a failed set) and thrown away as it
/// arrives; a block not ending in CRLF is a bad chunk.
pub fn data_block<'a>(
    key: &[u8],
    bytes: usize,
    noreply: bool,
    line_len: usize,
    buf: &'a [u8],
    ctx: &Context,
    out: &mut BytesMut,
) -> Result<(&'a [u8], usize), Step> {
    if bytes > ctx.max_item_bytes {
        ctx.store.remove(key);
        if !noreply {
            out.extend_from_slice(b"SERVER_ERROR object too large for cache\r\n");
        }
        return Err(Step::Swallow {
            consumed: line_len,
            skip: bytes + 2,
        });
    }
    let total = line_len + bytes + 2;
    if buf.len() < total {
        return Err(Step::Need);
    }
    if &buf[line_len + bytes..total] != b"\r\n" {
        out.extend_from_slice(b"CLIENT_ERROR bad data chunk\r\n");
        ctx.store.remove(key);
        return Err(Step::Done(total));
    }
    Ok((&buf[line_len..line_len + bytes], total))
}

fn arithmetic(up: bool, tokens: &[&[u8]], ctx: &Context, out: &mut BytesMut) {
    let noreply = tokens.get(3) == Some(&&b"noreply"[..]);
    let key = match tokens.get(1) {
        Some(key) if valid_key(key) && tokens.len() <= 4 => *key,
        _ => {
            out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n");
            return;
        }
    };
    let Some(delta) = tokens.get(2).and_then(|t| number::<u64>(t)) else {
        out.extend_from_slice(b"CLIENT_ERROR invalid numeric delta argument\r\n");
        return;
    };
    let outcome = ctx.store.count(key, delta, up);
    if noreply {
        return;
    }
    match outcome {
        Counted::Value(value) => {
            let _ = write!(Writer(out), "{value}\r\n");
        }
        Counted::NotFound => out.extend_from_slice(b"NOT_FOUND\r\n"),
        Counted::NonNumeric => out
            .extend_from_slice(b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
    }
}

/// `io::Write` over a `BytesMut`, for `write!`.
pub struct Writer<'a>(pub &'a mut BytesMut);

impl std::io::Write for Writer<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Seconds since the epoch, for `stats time`.
pub fn unix_now() -> u64 {
    now_ms() / 1000
}
