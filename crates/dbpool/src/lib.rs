//! Strata's PostgreSQL pooler: clients speak the PostgreSQL protocol to Strata, which lends
//! them connections from a pool per database.
//!
//! This build pools by session: a client keeps one server connection until it disconnects,
//! then the connection is reset (`ROLLBACK`, `DISCARD ALL`) and lent to the next client.
//! Clients log in with SCRAM-SHA-256 against the configured password (or are trusted, with
//! `auth = "trust"`); the pooler logs into PostgreSQL with SCRAM-SHA-256, md5 or cleartext.
//!
//! # Layout
//! - [`config`]: the `[dbpool]` section.
//! - `wire`: startup packets, message framing, the messages the pooler writes itself.
//! - `server`: logging into PostgreSQL, resetting a connection.
//! - `pool`: connections per database, bounded, with a wait timeout.
//! - `scram`: SCRAM-SHA-256 on the server side, for client logins.
//! - `client`: one client session.

mod client;
pub mod config;
mod pool;
mod scram;
mod server;
mod wire;

use std::sync::Arc;

use strata_core::Shutdown;
use tokio::net::TcpListener;

pub use config::DbPoolConfig;

/// Why the pooler could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on dbpool.bind = {addr}: {source}")]
pub struct StartError {
    addr: std::net::SocketAddr,
    source: std::io::Error,
}

/// The running pooler.
#[derive(Debug, Clone)]
pub struct DbPool {
    pool: Arc<pool::Pool>,
}

impl DbPool {
    /// Listens on `dbpool.bind` and serves clients until `shutdown`.
    pub async fn start(config: &DbPoolConfig, shutdown: Shutdown) -> Result<Self, StartError> {
        let listener = TcpListener::bind(config.bind)
            .await
            .map_err(|source| StartError {
                addr: config.bind,
                source,
            })?;
        tracing::info!(addr = %config.bind, server = %config.server, "dbpool listening");
        let pool = Arc::new(pool::Pool::new(config.clone()));
        let login = Arc::new(client::Login {
            user: config.server_user.clone(),
            password: (config.auth == "scram-sha-256")
                .then(|| config.server_password.clone().unwrap_or_default()),
        });
        let accepting = pool.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = shutdown.requested() => return,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(client::serve(stream, accepting.clone(), login.clone()));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "dbpool: accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
        Ok(Self { pool })
    }
}

impl DbPool {
    /// Appends the pooler's metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let c = &self.pool.counts;
        strata_core::metrics::render_labeled(
            out,
            "strata_dbpool_events_total",
            "Server connections opened, lent to clients, discarded after a failed reset; clients that waited too long; failed logins to PostgreSQL.",
            "counter",
            "event",
            [
                ("opened", c.opened.get()),
                ("lent", c.lent.get()),
                ("discarded", c.discarded.get()),
                ("wait_timeout", c.timeouts.get()),
                ("server_error", c.server_errors.get()),
            ],
        );
    }
}
