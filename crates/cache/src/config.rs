//! The `[cache]` section.

use std::net::SocketAddr;
use std::path::PathBuf;

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
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 11211)),
            unix_socket: None,
            capacity_bytes: 64 * 1024 * 1024,
            max_item_bytes: 1024 * 1024,
            max_connections: 1024,
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
        Ok(())
    }
}
