//! The `[cache]` section.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[cache]` section of `strata.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// TCP address of the memcached-protocol listener.
    pub bind: SocketAddr,
    /// Also listen on this Unix socket (Django: `LOCATION = "unix:/path"`).
    pub unix_socket: Option<PathBuf>,
    /// Memory for items (keys, values and per-item overhead), in bytes.
    pub capacity_bytes: u64,
    /// Largest value; larger sets answer `SERVER_ERROR object too large for cache`.
    pub max_item_bytes: u32,
    /// Most simultaneous client connections; more are refused.
    pub max_connections: usize,
    /// The cache nodes `StrataCache` spreads keys over (`host:port` of their memcached
    /// listeners; a host name is every address it resolves to), placed as pymemcache's
    /// `HashClient` places them. Empty: this node's own cache tier.
    pub nodes: Vec<String>,
    /// A node that does not answer within this is down for `dead_time`: its keys miss.
    #[serde(with = "strata_core::duration")]
    pub node_timeout: Duration,
    #[serde(with = "strata_core::duration")]
    pub dead_time: Duration,
    /// How often the host names of `nodes` are looked up again.
    #[serde(with = "strata_core::duration")]
    pub resolve_interval: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 11211)),
            unix_socket: None,
            capacity_bytes: 64 * 1024 * 1024,
            max_item_bytes: 1024 * 1024,
            max_connections: 1024,
            nodes: Vec::new(),
            node_timeout: Duration::from_millis(500),
            dead_time: Duration::from_secs(10),
            resolve_interval: Duration::from_secs(5),
        }
    }
}

impl CacheConfig {
    /// Checks values serde cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_item_bytes < 1024 {
            return Err(format!(
                "cache.max_item_bytes = {}: must be at least 1024",
                self.max_item_bytes
            ));
        }
        if u64::from(self.max_item_bytes) > self.capacity_bytes / 2 {
            return Err(format!(
                "cache.max_item_bytes = {}: must be at most half of capacity_bytes = {}",
                self.max_item_bytes, self.capacity_bytes
            ));
        }
        if self.max_connections == 0 {
            return Err("cache.max_connections = 0: must be at least 1".into());
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let port = node.rsplit_once(':').and_then(|(host, port)| {
                (!host.is_empty())
                    .then(|| port.parse::<u16>().ok())
                    .flatten()
            });
            if port.is_none() {
                return Err(format!(
                    "cache.nodes[{i}] = {node:?}: expected host:port (a memcached listener)"
                ));
            }
        }
        for (key, value) in [
            ("node_timeout", self.node_timeout),
            ("dead_time", self.dead_time),
            ("resolve_interval", self.resolve_interval),
        ] {
            if value.is_zero() {
                return Err(format!("cache.{key} = 0s: must be more than 0"));
            }
        }
        Ok(())
    }
}
