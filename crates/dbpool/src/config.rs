//! The `[dbpool]` section.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[dbpool]` section of `strata.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DbPoolConfig {
    /// Address clients (psycopg, psql) connect to.
    pub bind: SocketAddr,
    /// Also listen in this directory on a Unix socket named as PostgreSQL names its own
    /// (`.s.PGSQL.<bind port>`): clients give the directory as their host.
    pub unix_socket_dir: Option<std::path::PathBuf>,
    /// The PostgreSQL server, as `host:port`.
    pub server: String,
    /// The role the pooler logs into PostgreSQL as; clients name it too.
    pub server_user: String,
    /// Its password (SCRAM-SHA-256, md5 or cleartext, whichever the server asks for).
    pub server_password: Option<String>,
    /// How clients log in: `scram-sha-256` (with `server_user` and `server_password`) or
    /// `trust` (any client that names `server_user`; for loopback only).
    pub auth: String,
    /// `session`: a client keeps one server connection until it disconnects.
    pub pool_mode: String,
    /// Server connections per database.
    pub pool_size: usize,
    /// Longest a client waits for a server connection; then it gets an error.
    #[serde(with = "strata_core::duration")]
    pub query_wait_timeout: Duration,
}

impl Default for DbPoolConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 6432)),
            unix_socket_dir: None,
            server: "127.0.0.1:5432".into(),
            server_user: "postgres".into(),
            server_password: None,
            auth: "scram-sha-256".into(),
            pool_mode: "session".into(),
            pool_size: 20,
            query_wait_timeout: Duration::from_secs(30),
        }
    }
}

impl DbPoolConfig {
    /// Checks values serde cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.pool_mode != "session" {
            return Err(format!(
                "dbpool.pool_mode = {:?}: this build pools by session only",
                self.pool_mode
            ));
        }
        match self.auth.as_str() {
            "trust" => {}
            "scram-sha-256" if self.server_password.is_some() => {}
            "scram-sha-256" => {
                return Err("dbpool.auth = \"scram-sha-256\" needs dbpool.server_password".into())
            }
            other => {
                return Err(format!(
                    "dbpool.auth = {other:?}: expected \"scram-sha-256\" or \"trust\""
                ))
            }
        }
        if self.pool_size == 0 {
            return Err("dbpool.pool_size = 0: must be at least 1".into());
        }
        if !self.server.contains(':') {
            return Err(format!(
                "dbpool.server = {:?}: expected host:port",
                self.server
            ));
        }
        Ok(())
    }
}
