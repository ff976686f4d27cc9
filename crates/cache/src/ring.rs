//! Several cache nodes as one store: what the app server's workers send (`StrataCache`'s
//! memcached commands) spread over `cache.nodes` by key.
//!
//! A key lives on the node that pymemcache's `HashClient` picks for it: rendezvous hashing,
//! the highest MurmurHash3 (x86, 32 bits, seed 0) of `"host:port-key"`, ties to the greater
//! name. So Django through Strata and any pymemcache `HashClient` given the same nodes agree
//! on every key, and when a node goes only its keys move.
//!
//! A batch of commands is cut into one batch per node, sent over a kept-alive connection
//! and answered in the caller's order: `get` with keys on several nodes is asked of each and
//! answered as one; `flush_all` and `strata_delete_prefix` go to every node. A node that does
//! not answer within `node_timeout` is down for `dead_time`: its commands answer as misses
//! (nothing found, nothing stored), never errors, and its keys go to the next node in the
//! meantime. Single-flight (`mg ... N`, `get_or_set`'s lease) holds across every worker of
//! every node, as the lease lives on the key's node.
//!
//! A host name in `cache.nodes` stands for every address it resolves to (each `ip:port` a
//! node), looked up again every `resolve_interval`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// MurmurHash3 x86 32-bit of `data` with `seed`, over one byte per character as pymemcache
/// computes it (a character's code point, low 8 bits).
pub fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, byte) in tail.iter().enumerate() {
            k |= u32::from(*byte) << (8 * i);
        }
        h ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The characters of `text` as pymemcache hashes them: one byte each.
fn hashed_bytes(text: &[u8]) -> Vec<u8> {
    match std::str::from_utf8(text) {
        Ok(text) => text.chars().map(|c| c as u32 as u8).collect(),
        Err(_) => text.to_vec(),
    }
}

/// The index in `names` of the node for `key` (rendezvous: highest score wins, ties to the
/// greater name).
pub fn owner<S: AsRef<str>>(names: &[S], key: &[u8]) -> Option<usize> {
    let mut best: Option<(u32, usize)> = None;
    for (i, name) in names.iter().enumerate() {
        let mut text = name.as_ref().as_bytes().to_vec();
        text.push(b'-');
        text.extend_from_slice(key);
        let score = murmur3_32(&hashed_bytes(&text), 0);
        best = match best {
            Some((high, j))
                if score < high || (score == high && names[j].as_ref() > name.as_ref()) =>
            {
                Some((high, j))
            }
            _ => Some((score, i)),
        };
    }
    best.map(|(_, i)| i)
}

/// One node.
struct Node {
    /// `ip:port`: its name for placement, as pymemcache names `(ip, port)`.
    name: String,
    addr: SocketAddr,
    entry: usize,
    idle: Mutex<Vec<BufReader<TcpStream>>>,
    down_until: Mutex<Option<Instant>>,
}

impl Node {
    fn new(entry: usize, addr: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            name: addr.to_string(),
            addr,
            entry,
            idle: Mutex::new(Vec::new()),
            down_until: Mutex::new(None),
        })
    }

    fn up(&self, now: Instant) -> bool {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        match *down {
            Some(until) if now < until => false,
            Some(_) => {
                *down = None;
                true
            }
            None => true,
        }
    }
}

/// What one command expects back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// `VALUE` blocks, then `END`.
    Values,
    /// One line, or `VA <n> ...` and a block.
    Meta,
    /// One line.
    Line,
}

/// One command of a batch, cut out of it.
struct Command<'a> {
    verb: &'a [u8],
    /// The whole command, its data block included.
    bytes: &'a [u8],
    keys: Vec<&'a [u8]>,
    shape: Shape,
}

/// Cuts the next command off `input`; `None` when it is incomplete.
fn next_command(input: &[u8]) -> Option<Command<'_>> {
    let end = input.windows(2).position(|w| w == b"\r\n")?;
    let line = &input[..end];
    let tokens: Vec<&[u8]> = line
        .split(|b| *b == b' ')
        .filter(|t| !t.is_empty())
        .collect();
    let verb = tokens.first().copied().unwrap_or_default();
    let number = |i: usize| {
        tokens
            .get(i)
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| t.parse::<usize>().ok())
    };
    let (data, keys, shape) = match verb {
        b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas" => (
            number(4)? + 2,
            tokens.get(1).into_iter().copied().collect(),
            Shape::Line,
        ),
        b"ms" => (
            number(2)? + 2,
            tokens.get(1).into_iter().copied().collect(),
            Shape::Meta,
        ),
        b"get" | b"gets" => (0, tokens[1..].to_vec(), Shape::Values),
        b"gat" | b"gats" => (
            0,
            tokens.get(2..).unwrap_or_default().to_vec(),
            Shape::Values,
        ),
        b"mg" | b"md" | b"ma" => (0, tokens.get(1).into_iter().copied().collect(), Shape::Meta),
        _ => (0, tokens.get(1).into_iter().copied().collect(), Shape::Line),
    };
    let total = end + 2 + data;
    (input.len() >= total).then(|| Command {
        verb,
        bytes: &input[..total],
        keys,
        shape,
    })
}

/// Where the answer to one command comes from.
enum Part {
    /// The next answer of node `.0`'s batch.
    One(usize),
    /// A `get` over several nodes: the next answer of each, merged.
    Gets(Vec<usize>),
    /// Every node's next answer, combined (`flush_all`, `strata_delete_prefix`).
    All(Vec<usize>, Vec<u8>),
    /// Answered here.
    Here(Vec<u8>),
}

/// Several cache nodes as one store.
pub struct Ring {
    config: crate::CacheConfig,
    nodes: RwLock<Vec<Arc<Node>>>,
}

impl Ring {
    /// The ring over `config.nodes`, resolved once here; [`Ring::follow`] keeps it current.
    pub fn new(config: &crate::CacheConfig) -> Arc<Self> {
        let mut nodes = Vec::new();
        for (entry, node) in config.nodes.iter().enumerate() {
            let found = strata_core::resolve::split(node)
                .ok_or_else(|| std::io::Error::other("not host:port"))
                .and_then(|(host, port)| strata_core::resolve::addresses_now(host, port));
            match found {
                Ok(addrs) => nodes.extend(addrs.into_iter().map(|a| Node::new(entry, a))),
                Err(error) => {
                    tracing::warn!(node = %node, %error, "cache node does not resolve yet")
                }
            }
        }
        Arc::new(Self {
            config: config.clone(),
            nodes: RwLock::new(nodes),
        })
    }

    /// Looks the node names up every `resolve_interval` until `shutdown`.
    pub async fn follow(self: Arc<Self>, shutdown: strata_core::Shutdown) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.config.resolve_interval) => {}
                () = shutdown.requested() => return,
            }
            let current = self.nodes();
            let mut next = Vec::new();
            for (entry, node) in self.config.nodes.iter().enumerate() {
                let found = match strata_core::resolve::split(node) {
                    Some((host, port)) => strata_core::resolve::addresses(host, port).await.ok(),
                    None => None,
                };
                let Some(addrs) = found else {
                    next.extend(current.iter().filter(|n| n.entry == entry).cloned());
                    continue;
                };
                for addr in addrs {
                    match current.iter().find(|n| n.entry == entry && n.addr == addr) {
                        Some(known) => next.push(known.clone()),
                        None => next.push(Node::new(entry, addr)),
                    }
                }
            }
            let names =
                |nodes: &[Arc<Node>]| nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
            if names(&next) != names(&current) {
                tracing::info!(nodes = names(&next).join(", "), "cache nodes changed");
                *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = next;
            }
        }
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Runs a batch of commands across the nodes; the answers in the batch's order.
    pub async fn run(&self, input: &[u8]) -> Vec<u8> {
        let now = Instant::now();
        let all = self.nodes();
        let live: Vec<Arc<Node>> = all.iter().filter(|n| n.up(now)).cloned().collect();
        if live.is_empty() {
            return misses_for(input);
        }
        let names: Vec<&str> = live.iter().map(|n| n.name.as_str()).collect();
        let mut batches: Vec<Vec<u8>> = vec![Vec::new(); live.len()];
        let mut shapes: Vec<Vec<Shape>> = vec![Vec::new(); live.len()];
        let mut plan = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let Some(command) = next_command(rest) else {
                plan.push(Part::Here(b"CLIENT_ERROR incomplete command\r\n".to_vec()));
                break;
            };
            rest = &rest[command.bytes.len()..];
            match command.verb {
                b"flush_all" | b"strata_delete_prefix" => {
                    for (i, batch) in batches.iter_mut().enumerate() {
                        batch.extend_from_slice(command.bytes);
                        shapes[i].push(Shape::Line);
                    }
                    plan.push(Part::All((0..live.len()).collect(), command.verb.to_vec()));
                }
                _ if command.shape == Shape::Values && command.keys.len() > 1 => {
                    let mut by_node: Vec<Vec<&[u8]>> = vec![Vec::new(); live.len()];
                    for key in &command.keys {
                        let at = owner(&names, key).unwrap_or(0);
                        by_node[at].push(key);
                    }
                    let mut asked = Vec::new();
                    for (at, keys) in by_node
                        .into_iter()
                        .enumerate()
                        .filter(|(_, k)| !k.is_empty())
                    {
                        batches[at].extend_from_slice(command.verb);
                        for key in keys {
                            batches[at].push(b' ');
                            batches[at].extend_from_slice(key);
                        }
                        batches[at].extend_from_slice(b"\r\n");
                        shapes[at].push(Shape::Values);
                        asked.push(at);
                    }
                    plan.push(Part::Gets(asked));
                }
                _ => {
                    let key = command.keys.first().copied().unwrap_or_default();
                    let at = owner(&names, key).unwrap_or(0);
                    batches[at].extend_from_slice(command.bytes);
                    shapes[at].push(command.shape);
                    plan.push(Part::One(at));
                }
            }
        }
        // Each node's batch at once, side by side.
        let answers = futures_join(
            live.iter()
                .zip(batches.iter().zip(&shapes))
                .map(|(node, (batch, shapes))| self.exchange(node, batch, shapes))
                .collect(),
        )
        .await;
        let mut answers: Vec<std::collections::VecDeque<Vec<u8>>> =
            answers.into_iter().map(Into::into).collect();
        let mut out = Vec::new();
        for part in plan {
            match part {
                Part::Here(bytes) => out.extend_from_slice(&bytes),
                Part::One(at) => out.extend(answers[at].pop_front().unwrap_or_default()),
                Part::Gets(ats) => {
                    for at in ats {
                        let answer = answers[at].pop_front().unwrap_or_default();
                        out.extend_from_slice(answer.strip_suffix(b"END\r\n").unwrap_or(&answer));
                    }
                    out.extend_from_slice(b"END\r\n");
                }
                Part::All(ats, verb) => {
                    let replies: Vec<Vec<u8>> = ats
                        .iter()
                        .map(|at| answers[*at].pop_front().unwrap_or_default())
                        .collect();
                    out.extend(combine(&verb, &replies));
                }
            }
        }
        out
    }

    /// Sends `batch` to `node` and cuts its answers; misses if the node fails.
    async fn exchange(&self, node: &Node, batch: &[u8], shapes: &[Shape]) -> Vec<Vec<u8>> {
        if batch.is_empty() {
            return Vec::new();
        }
        let attempt = tokio::time::timeout(self.config.node_timeout, async {
            let idle = node.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut conn = match idle {
                Some(conn) => conn,
                None => {
                    let stream = TcpStream::connect(node.addr).await?;
                    stream.set_nodelay(true)?;
                    BufReader::new(stream)
                }
            };
            conn.get_mut().write_all(batch).await?;
            let mut answers = Vec::with_capacity(shapes.len());
            for shape in shapes {
                answers.push(read_answer(&mut conn, *shape).await?);
            }
            Ok::<_, std::io::Error>((conn, answers))
        })
        .await;
        match attempt {
            Ok(Ok((conn, answers))) => {
                let mut idle = node.idle.lock().unwrap_or_else(|e| e.into_inner());
                if idle.len() < 64 {
                    idle.push(conn);
                }
                answers
            }
            failed => {
                let why = match failed {
                    Ok(Err(error)) => error.to_string(),
                    _ => "no answer in time".to_owned(),
                };
                let mut down = node.down_until.lock().unwrap_or_else(|e| e.into_inner());
                if down.is_none() {
                    tracing::warn!(node = %node.name, error = %why, dead_for = ?self.config.dead_time, "cache node down: its keys miss, then go to the other nodes");
                }
                *down = Some(Instant::now() + self.config.dead_time);
                node.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
                per_command_misses(batch)
            }
        }
    }
}

/// Each command's answer as if its node had nothing: a miss, not an error.
fn per_command_misses(batch: &[u8]) -> Vec<Vec<u8>> {
    let mut rest = batch;
    let mut answers = Vec::new();
    while let Some(command) = next_command(rest) {
        rest = &rest[command.bytes.len()..];
        answers.push(miss(&command).to_vec());
    }
    answers
}

fn misses_for(batch: &[u8]) -> Vec<u8> {
    per_command_misses(batch).concat()
}

fn miss(command: &Command<'_>) -> &'static [u8] {
    match command.verb {
        b"get" | b"gets" | b"gat" | b"gats" => b"END\r\n",
        b"mg" => b"EN\r\n",
        b"md" | b"ma" => b"NF\r\n",
        b"ms" => b"NS\r\n",
        b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas" => b"NOT_STORED\r\n",
        b"flush_all" => b"OK\r\n",
        b"strata_delete_prefix" => b"DELETED 0\r\n",
        _ => b"NOT_FOUND\r\n",
    }
}

/// One answer to a `flush_all` or `strata_delete_prefix` that went to every node.
fn combine(verb: &[u8], replies: &[Vec<u8>]) -> Vec<u8> {
    if verb == b"strata_delete_prefix" {
        let deleted: u64 = replies
            .iter()
            .filter_map(|r| std::str::from_utf8(r).ok())
            .filter_map(|r| r.trim().strip_prefix("DELETED "))
            .filter_map(|n| n.parse::<u64>().ok())
            .sum();
        return format!("DELETED {deleted}\r\n").into_bytes();
    }
    b"OK\r\n".to_vec()
}

/// Reads one answer of `shape` from a node.
async fn read_answer(conn: &mut BufReader<TcpStream>, shape: Shape) -> std::io::Result<Vec<u8>> {
    let mut answer = Vec::new();
    loop {
        let start = answer.len();
        read_line(conn, &mut answer).await?;
        let line = &answer[start..];
        let block = if line.starts_with(b"VALUE ") {
            line.split(|b| *b == b' ').nth(3)
        } else if line.starts_with(b"VA ") {
            line.split(|b| *b == b' ').nth(1)
        } else {
            None
        };
        if let Some(size) = block {
            let size: usize = std::str::from_utf8(size)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| std::io::Error::other("a cache node sent a bad block size"))?;
            let at = answer.len();
            answer.resize(at + size + 2, 0);
            conn.read_exact(&mut answer[at..]).await?;
        }
        let last = &answer[start..];
        let done = match shape {
            Shape::Values => {
                last == b"END\r\n"
                    || last.starts_with(b"SERVER_ERROR")
                    || last.starts_with(b"CLIENT_ERROR")
                    || last == b"ERROR\r\n"
            }
            Shape::Meta | Shape::Line => true,
        };
        if done {
            return Ok(answer);
        }
    }
}

async fn read_line(conn: &mut BufReader<TcpStream>, out: &mut Vec<u8>) -> std::io::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let read = conn.read_until(b'\n', out).await?;
    if read == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Awaits every future, side by side.
async fn futures_join<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// The ring as the app server's workers reach it.
pub struct Nodes(pub Arc<Ring>);

impl strata_core::seam::Memcache for Nodes {
    fn execute(&self, commands: Vec<u8>) -> strata_core::seam::Answering {
        let ring = self.0.clone();
        Box::pin(async move { ring.run(&commands).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_pymemcache() {
        // Figures from pymemcache.client.murmur3.murmur3_32.
        for (text, expected) in [
            ("", 0u32),
            ("a", 1_009_084_850),
            ("ab", 2_613_040_991),
            ("abc", 3_017_643_002),
            ("abcd", 1_139_631_978),
            ("hello world", 1_586_663_183),
            (
                "10.0.0.5:11211-:1:views.decorators.cache.cache_page",
                1_738_325_856,
            ),
            ("é", 1_153_881_266),
        ] {
            assert_eq!(
                murmur3_32(&hashed_bytes(text.as_bytes()), 0),
                expected,
                "{text:?}"
            );
        }
    }

    #[test]
    fn only_a_removed_nodes_keys_move() {
        let three = ["10.0.0.5:11211", "10.0.0.6:11211", "10.0.0.7:11211"];
        let two = ["10.0.0.5:11211", "10.0.0.7:11211"];
        let mut moved = 0;
        let mut spread = [0; 3];
        for i in 0..3000 {
            let key = format!(":1:key-{i}");
            let before = three[owner(&three, key.as_bytes()).expect("nodes")];
            spread[owner(&three, key.as_bytes()).expect("nodes")] += 1;
            let after = two[owner(&two, key.as_bytes()).expect("nodes")];
            if before != "10.0.0.6:11211" {
                assert_eq!(before, after, "{key} moved though its node stayed");
            } else {
                moved += 1;
            }
        }
        assert!(spread.iter().all(|n| (800..1200).contains(n)), "{spread:?}");
        assert_eq!(moved, spread[1]);
    }

    #[test]
    fn commands_are_cut_with_their_data() {
        let batch = b"set a 0 0 3\r\nx\r\n\r\nget a b\r\nmg c v\r\nflush_all\r\n";
        let mut rest = &batch[..];
        let mut seen = Vec::new();
        while let Some(command) = next_command(rest) {
            rest = &rest[command.bytes.len()..];
            seen.push((
                command.verb.to_vec(),
                command.keys.len(),
                command.bytes.len(),
            ));
        }
        assert_eq!(
            seen,
            [
                (b"set".to_vec(), 1, 18),
                (b"get".to_vec(), 2, 9),
                (b"mg".to_vec(), 1, 8),
                (b"flush_all".to_vec(), 0, 11)
            ]
        );
        assert_eq!(
            misses_for(b"get a\r\nset b 0 0 1\r\nx\r\nmg c v\r\n"),
            b"END\r\nNOT_STORED\r\nEN\r\n"
        );
    }
}
