//! Strata's cache tier: an LRU store served over the memcached protocol (text and meta),
//! on TCP and a Unix socket.
//!
//! # Layout
//! - [`config`]: the `[cache]` section.
//! - `store`: items, memcached's expiry rules, CAS, atomic read-modify-write commands;
//!   `lru`: one shard of it (hash table, slab, recency list, byte budget).
//! - `out`: a connection's answers, large values written by reference (`writev`).
//! - `text`, `meta`: the two protocols, as steps over a connection's read buffer.
//! - `server`: listeners and connections; `stats`: `stats` and `/metrics`; `watch`: log
//!   watchers.
//!
//! # How it works
//!
//! memcached's job. `store.rs` maps key → item (value, flags, CAS, expiry) in shards of
//! `lru.rs`, each under its own lock and weighed in bytes against its share of the budget,
//! evicting the least recently used; every read-modify-write command (`add`, `cas`,
//! `append`, `incr`, `touch`, the meta protocol's vivify and stale marks) runs with the key's
//! shard locked, atomic per key. `text.rs` and `meta.rs` are the two protocols as
//! pure steps over a connection's read buffer (a step handles one whole command, asks for more
//! bytes, or throws a refused value away as it arrives); `server.rs` runs the TCP and Unix
//! listeners and one task per connection, answering everything a read brought before writing
//! (pipelining), values of 1 KiB or more handed to the kernel in place (`out.rs`); `stats.rs` answers `stats` (with `stats detail` per-prefix counts and a
//! baseline for `stats reset`) and `/metrics`; `watch.rs` is memcached's log watchers, a broadcast
//! of `item_get`/`item_store` lines that costs one atomic load while nobody watches. The same
//! steps serve the app server's workers in-process: `Cache` implements
//! `strata_core::seam::Memcache`, and `strata.django.StrataCache` sends protocol commands over
//! the worker's connection (`CACHE`/`CACHE_REPLY` frames).

pub mod config;
#[cfg(fuzzing)]
pub mod fuzz;
mod lru;
mod meta;
mod out;
pub mod ring;
mod server;
mod stats;
mod store;
mod text;
mod watch;

use std::sync::Arc;

use strata_core::Shutdown;
use tokio::net::{TcpListener, TcpSocket, UnixListener};

pub use config::CacheConfig;

/// The version `version` and `stats` report (memcached-compatible clients parse it).
pub const VERSION: &str = "1.6.21-strata";

/// Why the cache tier could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on cache.bind = {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on cache.unix_socket = {path}: {source}")]
    Unix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// A TCP listener that a new master can bind beside the old one during a binary upgrade
/// (`SO_REUSEPORT`): the old one stops accepting when it drains.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// The running cache tier.
#[derive(Debug, Clone)]
pub struct Cache {
    ctx: Arc<server::Context>,
}

impl Cache {
    /// Binds the listeners and serves until `shutdown`.
    pub async fn start(config: &CacheConfig, shutdown: Shutdown) -> Result<Self, StartError> {
        let ctx = Arc::new(server::Context::new(
            config.capacity_bytes,
            config.max_item_bytes as usize,
            config.max_connections,
        ));
        let tcp = listen(config.bind).map_err(|source| StartError::Bind {
            addr: config.bind,
            source,
        })?;
        tracing::info!(addr = %config.bind, "cache listening");
        tokio::spawn(server::serve(tcp, ctx.clone(), shutdown.clone()));
        if let Some(path) = &config.unix_socket {
            let _ = std::fs::remove_file(path);
            let unix = UnixListener::bind(path).map_err(|source| StartError::Unix {
                path: path.clone(),
                source,
            })?;
            tracing::info!(path = %path.display(), "cache listening");
            tokio::spawn(server::serve(unix, ctx.clone(), shutdown));
        }
        Ok(Self { ctx })
    }

    /// Appends the cache's metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        stats::render(&self.ctx, out);
    }
}

impl strata_core::seam::Memcache for Cache {
    fn execute(&self, commands: Vec<u8>) -> strata_core::seam::Answering {
        Box::pin(std::future::ready(self.execute_here(&commands)))
    }
}

impl Cache {
    /// Runs `commands` on this node's store; the answers as memcached writes them.
    pub fn execute_here(&self, commands: &[u8]) -> Vec<u8> {
        let mut out = out::Out::default();
        let mut rest = commands;
        while !rest.is_empty() {
            match text::step(rest, 0, &self.ctx, &mut out) {
                text::Step::Done(n) => rest = &rest[n..],
                text::Step::Swallow { consumed, skip } => {
                    rest = &rest[(consumed + skip).min(rest.len())..];
                }
                text::Step::Need => {
                    out.extend_from_slice(b"CLIENT_ERROR incomplete command\r\n");
                    break;
                }
                text::Step::Close => break,
                text::Step::Watch(_) => {
                    out.extend_from_slice(b"CLIENT_ERROR watch needs a connection of its own\r\n");
                    break;
                }
            }
        }
        out.to_vec()
    }
}
