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

use std::fmt::Write as _;
use std::sync::Arc;

use strata_core::listen::accept_until;
use strata_core::Shutdown;
use tokio::net::{TcpListener, UnixListener};

pub use config::DbPoolConfig;

/// Why the pooler could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on dbpool.{key} = {at}: {source}")]
pub struct StartError {
    key: &'static str,
    at: String,
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
                key: "bind",
                at: config.bind.to_string(),
                source,
            })?;
        let unix = match &config.unix_socket_dir {
            Some(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", config.bind.port()));
                let _ = std::fs::remove_file(&path);
                let listener = UnixListener::bind(&path).map_err(|source| StartError {
                    key: "unix_socket_dir",
                    at: path.display().to_string(),
                    source,
                })?;
                tracing::info!(path = %path.display(), "dbpool listening");
                Some(listener)
            }
            None => None,
        };
        tracing::info!(addr = %config.bind, server = %config.server, "dbpool listening");
        let pool = Arc::new(pool::Pool::new(config.clone()));
        let login = Arc::new(client::Login {
            user: config.server_user.clone(),
            password: (config.auth == "scram-sha-256")
                .then(|| config.server_password.clone().unwrap_or_default()),
        });
        if let Some(unix) = unix {
            let handle = serve(pool.clone(), login.clone());
            tokio::spawn(accept_until(unix, shutdown.clone(), "dbpool", handle));
        }
        let handle = serve(pool.clone(), login);
        tokio::spawn(accept_until(listener, shutdown, "dbpool", handle));
        Ok(Self { pool })
    }
}

/// Starts a session for each accepted client.
fn serve<S: client::Stream + 'static>(
    pool: Arc<pool::Pool>,
    login: Arc<client::Login>,
) -> impl FnMut(S) {
    move |stream| {
        tokio::spawn(client::serve(stream, pool.clone(), login.clone()));
    }
}

impl DbPool {
    /// Each database's pool: active, idle and waiting.
    pub fn status(&self) -> Vec<pool::DatabaseStatus> {
        self.pool.status()
    }

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
        let name = "strata_dbpool_connections";
        strata_core::metrics::header(
            out,
            name,
            "Server connections by database and state; clients waiting for one.",
            "gauge",
        );
        for db in self.pool.status() {
            for (state, value) in [
                ("active", db.active),
                ("idle", db.idle),
                ("waiting", db.waiting),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{database=\"{}\",state=\"{state}\"}} {value}",
                    db.database
                );
            }
        }
    }
}
