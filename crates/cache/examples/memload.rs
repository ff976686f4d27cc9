//! A memcached load generator for the benchmarks: closed-loop connections, each sending one
//! command and waiting for its answer, a get/set mix over a fixed key space (keys are set
//! before the run so gets hit, unless the key space is larger than the store). A get that
//! misses sets the key, as a cache's client does. Prints one JSON line: ops/s, latency
//! percentiles, and the share of gets that hit.
//!
//! `memload HOST:PORT CONNECTIONS SECONDS VALUE_BYTES GET_PERCENT [KEYS]` (10 000 keys by
//! default)

use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = args
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:11211".into());
    let arg = |i: usize, default: u64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (connections, seconds, size, get_percent, keys) = (
        arg(1, 50),
        arg(2, 10),
        arg(3, 100),
        arg(4, 90),
        arg(5, 10_000),
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let value = vec![b'v'; size as usize];
            let mut loader = TcpStream::connect(&addr).await?;
            for key in 0..keys {
                let command = format!("set key:{key} 0 0 {size} noreply\r\n");
                loader.write_all(command.as_bytes()).await?;
                loader.write_all(&value).await?;
                loader.write_all(b"\r\n").await?;
            }
            loader.write_all(b"version\r\n").await?;
            let mut line = String::new();
            BufReader::new(&mut loader).read_line(&mut line).await?;
            let deadline = Instant::now() + Duration::from_secs(seconds);
            let tasks: Vec<_> = (0..connections)
                .map(|seed| {
                    let (addr, value) = (addr.clone(), value.clone());
                    tokio::spawn(run(addr, value, seed + 1, (get_percent, keys), deadline))
                })
                .collect();
            let mut latencies = Vec::new();
            let (mut gets, mut hits) = (0u64, 0u64);
            for task in tasks {
                let done = task.await.map_err(std::io::Error::other)??;
                latencies.extend(done.latencies);
                gets += done.gets;
                hits += done.hits;
            }
            latencies.sort_unstable();
            let pct = |p: f64| {
                let i =
                    ((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1));
                latencies.get(i).copied().unwrap_or(0) as f64 / 1000.0
            };
            println!(
                "{{\"ops\": {:.0}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"hit_rate\": {:.4}}}",
                latencies.len() as f64 / seconds as f64,
                pct(0.50),
                pct(0.99),
                hits as f64 / gets.max(1) as f64
            );
            Ok(())
        })
}

/// What one connection did.
struct Done {
    /// Each command's latency in microseconds.
    latencies: Vec<u32>,
    gets: u64,
    hits: u64,
}

/// One connection's loop.
async fn run(
    addr: String,
    value: Vec<u8>,
    seed: u64,
    (get_percent, keys): (u64, u64),
    deadline: Instant,
) -> std::io::Result<Done> {
    let stream = TcpStream::connect(&addr).await?;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut done = Done {
        latencies: Vec::new(),
        gets: 0,
        hits: 0,
    };
    let mut line = String::new();
    let mut body = vec![0u8; value.len() + 2];
    let set = |key: u64| {
        let mut command = format!("set key:{key} 0 0 {}\r\n", value.len()).into_bytes();
        command.extend_from_slice(&value);
        command.extend_from_slice(b"\r\n");
        command
    };
    while Instant::now() < deadline {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let key = rng % keys;
        let started = Instant::now();
        let mut store = rng / keys % 100 >= get_percent;
        if !store {
            write
                .write_all(format!("get key:{key}\r\n").as_bytes())
                .await?;
            done.gets += 1;
            let mut hit = false;
            loop {
                line.clear();
                read.read_line(&mut line).await?;
                if line.starts_with("END") {
                    break;
                }
                if line.starts_with("VALUE") {
                    let len: usize = line
                        .trim_end()
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    body.resize(len + 2, 0);
                    read.read_exact(&mut body).await?;
                    hit = true;
                } else {
                    return Err(std::io::Error::other(format!("unexpected answer {line:?}")));
                }
            }
            done.hits += u64::from(hit);
            store = !hit;
        }
        if store {
            write.write_all(&set(key)).await?;
            line.clear();
            read.read_line(&mut line).await?;
            if !line.starts_with("STORED") {
                return Err(std::io::Error::other(format!("unexpected answer {line:?}")));
            }
        }
        done.latencies
            .push(started.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    Ok(done)
}
