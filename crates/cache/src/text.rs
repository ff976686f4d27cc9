//! The memcached text protocol: one command at a time out of a connection's read buffer,
//! answers appended to its write buffer. Pipelining falls out of this: the connection runs
//! every whole command it has before it writes.

use std::io::Write;

use bytes::Bytes;

use crate::out::Out;

use crate::meta;
use crate::server::Context;
use crate::stats::Did;
use crate::store::{now_ms, Changed, Counted, Mode, Outcome};

/// Longest command line accepted, but for retrievals (keys are at most 250 bytes).
pub const MAX_LINE: usize = 8192;
/// Longest `get`/`gets`/`gat`/`gats` line: a multi-get may name thousands of keys (memcached's
/// own suite sends 128 KB lines), however TCP splits it.
pub const MAX_RETRIEVAL_LINE: usize = 4 << 20;
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
    /// The connection becomes a log watcher (`watch`) of these kinds.
    Watch(crate::watch::Kinds),
}

/// A command line, split into its tokens, at the front of the connection's read buffer.
#[derive(Debug)]
pub struct Line<'a> {
    /// The command and its arguments.
    pub tokens: Vec<&'a [u8]>,
    /// Bytes of the line, its CRLF included.
    pub len: usize,
    /// The read buffer from the line on (a storage command's value follows the line).
    pub buf: &'a [u8],
    /// The connection's id (`stats conns`, watchers' `cfd`); 0 for the workers' channel.
    pub client: u64,
}

impl Line<'_> {
    pub fn command(&self) -> &[u8] {
        self.tokens.first().copied().unwrap_or_default()
    }
}

/// Whether the line starting `buf` is a retrieval, whose length has its own limit.
fn retrieval(buf: &[u8]) -> bool {
    let start = buf.iter().position(|b| *b != b' ').unwrap_or(buf.len());
    let word = &buf[start..];
    [&b"get "[..], b"gets ", b"gat ", b"gats "]
        .iter()
        .any(|w| word.starts_with(w))
}

/// Handles the first command in `buf`.
///
/// A line's limit holds whether or not its end has arrived, so the same line is accepted or
/// refused however TCP splits it.
pub fn step(buf: &[u8], client: u64, ctx: &Context, out: &mut Out) -> Step {
    let end = memchr::memchr(b'\n', buf);
    let limit = if retrieval(buf) {
        MAX_RETRIEVAL_LINE
    } else {
        MAX_LINE
    };
    if end.unwrap_or(buf.len()) > limit {
        out.extend_from_slice(b"CLIENT_ERROR line too long\r\n");
        return Step::Close;
    }
    let Some(end) = end else {
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
    // As memcached: a known command with the wrong number of tokens is not that command.
    if !token_count_fits(command, tokens.len()) {
        out.extend_from_slice(b"ERROR\r\n");
        return Step::Done(line_len);
    }
    // A command that takes `noreply` says nothing at all with it, errors included (as
    // memcached: a client that asked for silence reads no answer).
    let honours_noreply = matches!(
        *command,
        b"set"
            | b"add"
            | b"replace"
            | b"append"
            | b"prepend"
            | b"cas"
            | b"delete"
            | b"incr"
            | b"decr"
            | b"touch"
            | b"verbosity"
            | b"flush_all"
            | b"cache_memlimit"
    );
    let quiet = honours_noreply && tokens.last() == Some(&&b"noreply"[..]);
    let line = Line {
        tokens,
        len: line_len,
        buf,
        client,
    };
    if quiet {
        return run(&line, ctx, &mut Out::default());
    }
    run(&line, ctx, out)
}

/// Runs the command of `line`.
fn run(line: &Line<'_>, ctx: &Context, out: &mut Out) -> Step {
    let (command, tokens, line_len) = (line.command(), &line.tokens, line.len);
    match command {
        b"get" | b"gets" => {
            retrieve(line, 1, None, ctx, out);
            Step::Done(line_len)
        }
        b"gat" | b"gats" => {
            match tokens.get(1).and_then(|t| number::<i64>(t)) {
                Some(exptime) if tokens.len() > 2 => retrieve(line, 2, Some(exptime), ctx, out),
                _ => out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n"),
            }
            Step::Done(line_len)
        }
        b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas" => storage(line, ctx, out),
        b"delete" => {
            delete(tokens, ctx, out);
            Step::Done(line_len)
        }
        b"incr" | b"decr" => {
            arithmetic(command == b"incr", tokens, ctx, out);
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
            out.extend_from_slice(reply);
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
                    out.extend_from_slice(b"OK\r\n");
                }
                None => {
                    ctx.store.flush(0);
                    out.extend_from_slice(b"OK\r\n");
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
            // As memcached: a level, and maybe noreply; the level itself changes nothing here
            // (the log's level is `log.level`).
            out.extend_from_slice(match tokens.get(1).and_then(|t| number::<u32>(t)) {
                Some(_) => b"OK\r\n",
                None => b"CLIENT_ERROR bad command line format\r\n",
            });
            Step::Done(line_len)
        }
        // `slabs automove <0|1|2>` is accepted as memcached accepts it, and changes nothing:
        // this store has no slab classes to rebalance.
        b"slabs" if tokens.get(1) == Some(&&b"automove"[..]) => {
            out.extend_from_slice(match tokens.get(2).and_then(|t| number::<u32>(t)) {
                Some(0..=2) => b"OK\r\n",
                Some(_) => b"ERROR\r\n",
                None => b"CLIENT_ERROR bad command line format\r\n",
            });
            Step::Done(line_len)
        }
        b"stats" => {
            crate::stats::write(line, ctx, out);
            Step::Done(line_len)
        }
        b"quit" => Step::Close,
        b"cache_memlimit" => {
            // memcached's answers; the budget changes at once, the excess goes as items are
            // stored.
            let megabytes = match tokens.len() {
                2 | 3 => number::<u32>(tokens[1]),
                _ => None,
            };
            out.extend_from_slice(match megabytes {
                None => b"ERROR\r\n".as_slice(),
                Some(m) if m < 8 => b"MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n",
                Some(m) if m > 1_000_000_000 => {
                    b"MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n"
                }
                Some(m) => {
                    let bytes = u64::from(m) * 1024 * 1024;
                    ctx.store.set_capacity(bytes);
                    b"OK\r\n"
                }
            });
            Step::Done(line_len)
        }
        // Strata's extension (the Django backend's `delete_prefix`); memcached says ERROR.
        b"strata_delete_prefix" => {
            match tokens.get(1).filter(|p| valid_key(p)) {
                Some(prefix) => {
                    let removed = ctx.store.delete_prefix(prefix);
                    let _ = write!(out, "DELETED {removed}\r\n");
                }
                None => out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n"),
            }
            Step::Done(line_len)
        }
        b"watch" => match crate::watch::Kinds::parse(&tokens[1..]) {
            Some(kinds) => Step::Watch(kinds),
            None => {
                out.extend_from_slice(b"ERROR\r\n");
                Step::Done(line_len)
            }
        },
        b"mn" => {
            out.extend_from_slice(b"MN\r\n");
            Step::Done(line_len)
        }
        b"mg" | b"ms" | b"md" | b"ma" | b"me" => meta::step(line, ctx, out),
        // Someone speaking HTTP to the cache port is not a memcached client: close, as
        // memcached does.
        _ if tokens.last().is_some_and(|t| t.starts_with(b"HTTP/")) => Step::Close,
        _ => {
            out.extend_from_slice(b"ERROR\r\n");
            Step::Done(line_len)
        }
    }
}

/// Whether `count` tokens (the command's own included) can be `command`.
fn token_count_fits(command: &[u8], count: usize) -> bool {
    match command {
        b"get" | b"gets" | b"gat" | b"gats" => count >= 2,
        b"set" | b"add" | b"replace" | b"append" | b"prepend" => matches!(count, 5 | 6),
        b"cas" => matches!(count, 6 | 7),
        b"incr" | b"decr" | b"touch" => matches!(count, 3 | 4),
        b"delete" => (2..=4).contains(&count),
        b"flush_all" => count <= 3,
        b"verbosity" => matches!(count, 2 | 3),
        _ => true,
    }
}

/// `delete <key> [0] [noreply]`: the `0` is an old hold time, the only one accepted.
fn delete(tokens: &[&[u8]], ctx: &Context, out: &mut Out) {
    let well_formed = match tokens.get(2..).unwrap_or_default() {
        [] => true,
        [only] => *only == b"0" || *only == b"noreply",
        [hold, noreply] => *hold == b"0" && *noreply == b"noreply",
        _ => false,
    };
    if !well_formed {
        out.extend_from_slice(
            b"CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n",
        );
        return;
    }
    let key = tokens.get(1).copied().unwrap_or_default();
    if !valid_key(key) {
        out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n");
        return;
    }
    ctx.detail.record(key, Did::Delete);
    let reply: &[u8] = if ctx.store.delete(key, None) == Changed::Done {
        b"DELETED\r\n"
    } else {
        b"NOT_FOUND\r\n"
    };
    out.extend_from_slice(reply);
}

/// A key memcached accepts: 1–250 bytes, no control characters or spaces.
pub fn valid_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY && key.iter().all(|b| *b > 32 && *b != 127)
}

/// Parses a decimal token.
pub fn number<T: std::str::FromStr>(token: &[u8]) -> Option<T> {
    std::str::from_utf8(token).ok()?.parse().ok()
}

/// `get`/`gets` (`touch` none) and `gat`/`gats`, whose keys are the line's tokens from `first`.
fn retrieve(line: &Line<'_>, first: usize, touch: Option<i64>, ctx: &Context, out: &mut Out) {
    let keys = line.tokens.get(first..).unwrap_or_default();
    let with_cas = matches!(line.command(), b"gets" | b"gats");
    if keys.is_empty() || !keys.iter().all(|k| valid_key(k)) {
        out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n");
        return;
    }
    for key in keys {
        let item = match touch {
            Some(exptime) => ctx.store.touch(key, exptime),
            None => ctx.store.get(key),
        };
        ctx.detail.record(
            key,
            Did::Get {
                hit: item.is_some(),
            },
        );
        ctx.watch
            .item_get(key, item.as_ref().map(|i| i.value.len()), line.client);
        if let Some(item) = item {
            out.extend_from_slice(b"VALUE ");
            out.extend_from_slice(key);
            let _ = write!(out, " {} {}", item.flags, item.value.len());
            if with_cas {
                let _ = write!(out, " {}", item.cas);
            }
            out.extend_from_slice(b"\r\n");
            out.value(&item.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"END\r\n");
}

/// `<cmd> <key> <flags> <exptime> <bytes> [<cas>] [noreply]` and its data block (`noreply`
/// is honoured by [`step`], which throws the answer away).
fn storage(line: &Line<'_>, ctx: &Context, out: &mut Out) -> Step {
    let (command, tokens, line_len) = (line.command(), &line.tokens, line.len);
    let is_cas = command == b"cas";
    let fields = if is_cas { 6 } else { 5 };
    // As memcached: a malformed line is answered and nothing after it is swallowed (there is
    // no telling how long a value it announced); a length is a 32-bit signed number.
    let bytes = tokens
        .get(4)
        .and_then(|t| number::<i32>(t))
        .filter(|n| (0..=i32::MAX - 2).contains(n));
    let key = tokens.get(1).copied().unwrap_or_default();
    let flags = tokens.get(2).and_then(|t| number::<u32>(t));
    let exptime = tokens.get(3).and_then(|t| number::<i64>(t));
    let cas = if is_cas {
        tokens.get(5).and_then(|t| number::<u64>(t))
    } else {
        Some(0)
    };
    let (true, Some(bytes), Some(flags), Some(exptime), Some(cas)) = (
        valid_key(key) && tokens.len() <= fields + 1,
        bytes,
        flags,
        exptime,
        cas,
    ) else {
        out.extend_from_slice(b"CLIENT_ERROR bad command line format\r\n");
        return Step::Done(line_len);
    };
    let bytes = bytes as usize;
    ctx.detail.record(key, Did::Set);
    let (data, total) = match data_block(key, bytes, line, ctx, out) {
        Ok(block) => block,
        Err(step) => return step,
    };
    let mode = match command {
        b"add" => Mode::Add,
        b"replace" => Mode::Replace,
        b"append" => Mode::Append,
        b"prepend" => Mode::Prepend,
        b"cas" => Mode::Cas(cas),
        _ => Mode::Set,
    };
    if ctx.watch.fetching() {
        // memcached's store looks the key up first, and its log says so.
        let found = ctx.store.peek(key).map(|i| i.value.len());
        ctx.watch.item_get(key, found, line.client);
    }
    let outcome = ctx
        .store
        .store(key, Bytes::copy_from_slice(data), flags, exptime, mode);
    ctx.watch.item_store(crate::watch::Store {
        key,
        command,
        outcome,
        ttl: u64::try_from(exptime).unwrap_or(0),
        size: data.len(),
        client: line.client,
    });
    out.extend_from_slice(match outcome {
        Outcome::Stored => b"STORED\r\n",
        Outcome::NotStored => b"NOT_STORED\r\n",
        Outcome::Exists => b"EXISTS\r\n",
        Outcome::NotFound => b"NOT_FOUND\r\n",
    });
    Step::Done(total)
}

/// The `bytes`-long data block after a storage command's line, with the command's total
/// length; or the step to take instead: a value over the limit is refused (and the key
/// unlinked, as memcached does, so no stale value outlives a failed set) and thrown away as it
/// arrives; a block not ending in CRLF is a bad chunk.
pub fn data_block<'a>(
    key: &[u8],
    bytes: usize,
    line: &Line<'a>,
    ctx: &Context,
    out: &mut Out,
) -> Result<(&'a [u8], usize), Step> {
    if bytes > ctx.max_item_bytes {
        ctx.store.remove(key);
        out.extend_from_slice(b"SERVER_ERROR object too large for cache\r\n");
        return Err(Step::Swallow {
            consumed: line.len,
            skip: bytes + 2,
        });
    }
    let total = line.len + bytes + 2;
    if line.buf.len() < total {
        return Err(Step::Need);
    }
    if &line.buf[line.len + bytes..total] != b"\r\n" {
        out.extend_from_slice(b"CLIENT_ERROR bad data chunk\r\n");
        ctx.store.remove(key);
        return Err(Step::Done(total));
    }
    Ok((&line.buf[line.len..line.len + bytes], total))
}

fn arithmetic(up: bool, tokens: &[&[u8]], ctx: &Context, out: &mut Out) {
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
    match ctx.store.count(key, delta, up, None) {
        Counted::Value(value) => {
            let _ = write!(out, "{value}\r\n");
        }
        Counted::NotFound | Counted::Exists => out.extend_from_slice(b"NOT_FOUND\r\n"),
        Counted::NonNumeric => out
            .extend_from_slice(b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"),
    }
}

/// Seconds since the epoch, for `stats time`.
pub fn unix_now() -> u64 {
    now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> Context {
        Context::new(64 << 20, 1 << 20, 16)
    }

    /// Runs every whole command of `input` as a connection would; the answers, and whether
    /// the connection was closed.
    fn run(ctx: &Context, input: &[u8]) -> (String, bool) {
        let mut buf = input;
        let mut out = Out::default();
        loop {
            if buf.is_empty() {
                return (String::from_utf8_lossy(&out.to_vec()).into_owned(), false);
            }
            match step(buf, 1, ctx, &mut out) {
                Step::Need => return (String::from_utf8_lossy(&out.to_vec()).into_owned(), false),
                Step::Done(n) => buf = &buf[n..],
                Step::Swallow { consumed, skip } => buf = &buf[(consumed + skip).min(buf.len())..],
                Step::Close | Step::Watch(_) => {
                    return (String::from_utf8_lossy(&out.to_vec()).into_owned(), true)
                }
            }
        }
    }

    #[test]
    fn a_multi_get_of_any_length_works_however_it_is_split() {
        let ctx = context();
        run(&ctx, b"set key8 0 0 1\r\nx\r\n");
        let mut line = b"get".to_vec();
        for i in 0..12_000 {
            line.extend_from_slice(format!(" key{i}").as_bytes());
            line.extend_from_slice(if i % 2 == 0 { b"" } else { b"-padding" });
        }
        line.extend_from_slice(b"\r\n");
        assert!(line.len() > 100_000);
        // Every prefix asks for more; the whole line answers.
        for cut in [10, MAX_LINE, MAX_LINE + 1, 100_000, line.len() - 1] {
            let mut out = Out::default();
            assert_eq!(
                step(&line[..cut], 1, &ctx, &mut out),
                Step::Need,
                "cut at {cut}"
            );
            assert!(out.is_empty());
        }
        assert_eq!(
            run(&ctx, &line),
            ("VALUE key8 0 1\r\nx\r\nEND\r\n".into(), false)
        );
    }

    #[test]
    fn other_lines_are_limited_whether_or_not_their_end_has_come() {
        let ctx = context();
        let mut line = b"set ".to_vec();
        line.resize(MAX_LINE + 100, b'k');
        let mut whole = line.clone();
        whole.extend_from_slice(b" 0 0 1\r\nx\r\n");
        for input in [&line[..], &whole[..]] {
            assert_eq!(
                run(&ctx, input),
                ("CLIENT_ERROR line too long\r\n".into(), true)
            );
        }
    }

    #[test]
    fn delete_takes_an_old_zero_hold_time_and_noreply() {
        let ctx = context();
        run(&ctx, b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n1\r\n");
        assert_eq!(run(&ctx, b"delete a 0 noreply\r\nget a\r\n").0, "END\r\n");
        assert_eq!(run(&ctx, b"delete b 0\r\n").0, "DELETED\r\n");
        let usage = "CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n";
        for line in [&b"delete b 10\r\n"[..], b"delete b 0 x\r\n"] {
            assert_eq!(run(&ctx, line).0, usage);
        }
        // With noreply even the error is silent, and the key stays.
        assert_eq!(
            run(&ctx, b"delete b x noreply\r\nadd b 0 0 1\r\n2\r\n").0,
            "STORED\r\n"
        );
        assert_eq!(
            run(&ctx, b"delete b 10 noreply\r\nadd b 0 0 1\r\n3\r\n").0,
            "NOT_STORED\r\n"
        );
        // A known command with the wrong number of tokens is not that command.
        for line in [
            &b"delete\r\n"[..],
            b"delete b 0 noreply x\r\n",
            b"cas k 0 0 1\r\n",
        ] {
            assert_eq!(run(&ctx, line).0, "ERROR\r\n");
        }
    }

    #[test]
    fn a_malformed_storage_line_swallows_nothing() {
        let ctx = context();
        for line in [
            &b"set k 0 0 abc\r\n"[..],
            b"set k x 0 1\r\n",
            b"set k 0 0 -1\r\n",
            b"set k 0 0 4294967295\r\n",
            b"cas k 0 0 1 x\r\n",
        ] {
            let mut input = line.to_vec();
            input.extend_from_slice(b"version\r\n");
            let (out, closed) = run(&ctx, &input);
            assert!(!closed);
            assert!(
                out.starts_with("CLIENT_ERROR bad command line format\r\nVERSION "),
                "{out:?}"
            );
        }
        // A value over the item limit is refused and thrown away as it arrives.
        let step = step(b"set k 0 0 2000000\r\n", 1, &ctx, &mut Out::default());
        assert_eq!(
            step,
            Step::Swallow {
                consumed: 19,
                skip: 2_000_002
            }
        );
    }

    #[test]
    fn an_http_request_closes_the_connection() {
        let ctx = context();
        assert_eq!(run(&ctx, b"GET / HTTP/1.0\r\n\r\n"), (String::new(), true));
        assert_eq!(run(&ctx, b"bogus\r\n"), ("ERROR\r\n".into(), false));
    }

    #[test]
    fn cache_memlimit_changes_the_budget_as_memcached_does() {
        let ctx = context();
        for (line, answer) in [
            (
                "cache_memlimit 7\r\n",
                "MEMLIMIT_TOO_SMALL cannot set maxbytes to less than 8m\r\n",
            ),
            (
                "cache_memlimit 2000000000\r\n",
                "MEMLIMIT_ADJUST_FAILED input value is megabytes not bytes\r\n",
            ),
            ("cache_memlimit x\r\n", "ERROR\r\n"),
            ("cache_memlimit\r\n", "ERROR\r\n"),
            ("cache_memlimit 8 noreply\r\nmn\r\n", "MN\r\n"),
        ] {
            assert_eq!(run(&ctx, line.as_bytes()).0, answer, "{line:?}");
        }
        assert_eq!(ctx.store.capacity(), 8 << 20);
        // 48 MB of values into what is now an 8 MiB store: the newest remain, within 8 MiB.
        // (Each of the 16 shards holds 5 of these values and gets 30 on average: the first
        // is gone from its shard whatever the hash seed.)
        let value = "v".repeat(100_000);
        for i in 0..480 {
            let set = format!("set k{i} 0 0 {}\r\n{value}\r\n", value.len());
            assert_eq!(run(&ctx, set.as_bytes()).0, "STORED\r\n");
        }
        let (_, bytes) = ctx.store.size();
        assert!(bytes <= 8 << 20, "{bytes} bytes held");
        assert!(run(&ctx, b"get k479\r\n").0.starts_with("VALUE k479 "));
        assert_eq!(run(&ctx, b"get k0\r\n").0, "END\r\n");
        assert!(run(&ctx, b"stats settings\r\n")
            .0
            .contains("STAT maxbytes 8388608\r\n"));
    }

    #[test]
    fn a_fresh_items_ttl_is_what_it_was_given() {
        // memcached counts whole seconds: just after `T60`, 60 are left (a found fuzz
        // difference: rounding down said 59 once a millisecond had passed).
        let ctx = context();
        let (answer, _) = run(&ctx, b"ms k 1 T60\r\nx\r\nmg k t\r\n");
        assert_eq!(answer, "HD\r\nHD t60\r\n");
    }

    #[test]
    fn meta_commands_honour_cas() {
        let ctx = context();
        run(&ctx, b"set n 0 0 2\r\n10\r\n");
        let cas = ctx.store.get(b"n").map(|i| i.cas).unwrap_or_default();
        let wrong = cas + 7;
        assert_eq!(
            run(&ctx, format!("md n C{wrong}\r\n").as_bytes()).0,
            "EX\r\n"
        );
        assert_eq!(
            run(&ctx, format!("md n I C{wrong}\r\n").as_bytes()).0,
            "EX\r\n"
        );
        assert_eq!(
            run(&ctx, format!("ma n C{wrong}\r\n").as_bytes()).0,
            "EX\r\n"
        );
        assert_eq!(run(&ctx, b"get n\r\n").0, "VALUE n 0 2\r\n10\r\nEND\r\n");
        assert_eq!(
            run(&ctx, format!("ma n C{cas} v\r\n").as_bytes()).0,
            "VA 2\r\n11\r\n"
        );
        let cas = ctx.store.get(b"n").map(|i| i.cas).unwrap_or_default();
        assert_eq!(run(&ctx, format!("md n C{cas}\r\n").as_bytes()).0, "HD\r\n");
        assert_eq!(run(&ctx, b"mg n v\r\n").0, "EN\r\n");
    }
}
