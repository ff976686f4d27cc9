//! Strata's PostgreSQL pooler: clients speak the PostgreSQL protocol to Strata, which lends
//! them connections from a pool per database.
//!
//! In transaction mode (the default) a client holds a server connection for one transaction
//! at a time; its tracked parameters and protocol-level prepared statements follow it from
//! connection to connection, and SQL that would leave session state behind pins it (or is
//! reported). In session mode a client keeps one server connection until it disconnects,
//! then the connection is reset (`ROLLBACK`, `DISCARD ALL`) and lent to the next client.
//! Clients log in with SCRAM-SHA-256 against the configured password (or are trusted, with
//! `auth = "trust"`); the pooler logs into PostgreSQL with SCRAM-SHA-256, md5 or cleartext.
//!
//! # Layout
//! - [`config`]: the `[dbpool]` section.
//! - `wire`: startup packets, message framing, the messages the pooler writes itself.
//! - `server`: logging into PostgreSQL, resetting a connection.
//! - `pool`: connections per database, bounded, with a wait timeout, a reserve, lifetimes,
//!   `min_idle` and pausing.
//! - `flow`: the answers a server owes a client, to know where a transaction ends.
//! - `prepared`: prepared statements under pooler-wide names.
//! - `state`: session state and tracked parameters.
//! - `cancel`: the pooler's cancel keys.
//! - `health`: a control connection (tokio-postgres) that checks the server.
//! - `relay`: a logged-in client's messages and their answers.
//! - `scram`: SCRAM-SHA-256 on the server side, for client logins.
//! - `client`: a client's startup and login.
//! - `runners`: the shared runtime, or the pooler's own threads, that run sessions.

mod auth;
mod cancel;
mod client;
pub mod config;
mod flow;
mod health;
mod pool;
mod prepared;
mod relay;
mod runners;
mod scram;
mod server;
mod state;
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
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => {
                let (acceptor, certificate) =
                    strata_core::tls::acceptor(cert, key, &[]).map_err(|error| StartError {
                        key: "tls_cert_file",
                        at: cert.display().to_string(),
                        source: std::io::Error::other(error),
                    })?;
                tokio::spawn(certificate.watch(shutdown.clone()));
                Some(acceptor)
            }
            _ => None,
        };
        let login = Arc::new(client::Login {
            tls,
            tls_required: config.tls_required,
        });
        let runners =
            runners::Runners::start(config.threads, &shutdown).map_err(|source| StartError {
                key: "threads",
                at: config.threads.to_string(),
                source,
            })?;
        let runners = Arc::new(runners);
        if let Some(unix) = unix {
            let handle = serve(pool.clone(), login.clone(), runners.clone());
            tokio::spawn(accept_until(unix, shutdown.clone(), "dbpool", handle));
        }
        let handle = serve(pool.clone(), login, runners);
        tokio::spawn(accept_until(listener, shutdown.clone(), "dbpool", handle));
        tokio::spawn(tend(pool.clone(), shutdown.clone()));
        tokio::spawn(health::watch(pool.clone(), shutdown));
        Ok(Self { pool })
    }
}

/// Starts a session for each accepted client.
fn serve<S: runners::Portable>(
    pool: Arc<pool::Pool>,
    login: Arc<client::Login>,
    runners: Arc<runners::Runners>,
) -> impl FnMut(S) {
    move |stream| {
        let (pool, login) = (pool.clone(), login.clone());
        runners.spawn(stream, move |stream| client::serve(stream, pool, login));
    }
}

/// Once a second: closes connections idle too long, opens those `min_idle` asks for.
async fn tend(pool: Arc<pool::Pool>, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.requested() => return,
        }
        for (entry, missing) in pool.tend() {
            for _ in 0..missing {
                if let Err(error) = pool.warm(&entry).await {
                    let database = &entry.key.database;
                    tracing::warn!(%database, %error, "dbpool: cannot open an idle connection");
                    break;
                }
            }
        }
    }
}

impl DbPool {
    /// Stops lending server connections for `database` (every database when `None`) and
    /// closes them as they come back, for database maintenance; returns those paused.
    pub fn pause(&self, database: Option<&str>) -> Vec<String> {
        self.pool.pause(database)
    }

    /// Undoes [`DbPool::pause`].
    pub fn resume(&self, database: Option<&str>) -> Vec<String> {
        self.pool.resume(database)
    }

    /// What the last health check of the server found.
    pub fn health(&self) -> health::HealthStatus {
        self.pool.health.status()
    }

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
            "Server connections opened, lent to clients, discarded after a failed reset, found dead when taken (stale), closed for age or idleness (expired), lent from the reserve; clients that waited too long, that left session state behind, that were pinned for it, and that did not log in within client_login_timeout; failed logins to PostgreSQL.",
            "counter",
            "event",
            [
                ("opened", c.opened.get()),
                ("lent", c.lent.get()),
                ("discarded", c.discarded.get()),
                ("stale", c.stale.get()),
                ("expired", c.expired.get()),
                ("reserve", c.reserve.get()),
                ("wait_timeout", c.timeouts.get()),
                ("session_state", c.session_state.get()),
                ("pinned", c.pinned.get()),
                ("login_timeout", c.login_timeouts.get()),
                ("server_error", c.server_errors.get()),
            ],
        );
        c.wait.render(
            out,
            "strata_dbpool_wait_seconds",
            "How long clients waited for a server connection.",
        );
        let health = &self.pool.health;
        strata_core::metrics::render_value(
            out,
            "strata_dbpool_server_up",
            "1 when PostgreSQL passed its last health check (SELECT 1 on a control connection).",
            "gauge",
            u64::from(health.up().unwrap_or(false)),
        );
        strata_core::metrics::render_labeled(
            out,
            "strata_dbpool_health_checks_total",
            "Health checks of PostgreSQL, by outcome.",
            "counter",
            "outcome",
            [
                ("passed", health.passed.get()),
                ("failed", health.failed.get()),
            ],
        );
        strata_core::metrics::render_value(
            out,
            "strata_dbpool_prepared_statements",
            "Distinct protocol-level prepared statements clients have prepared.",
            "gauge",
            self.pool.statements.len() as u64,
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
                    "{name}{{database=\"{}\",user=\"{}\",state=\"{state}\"}} {value}",
                    db.database, db.user
                );
            }
        }
    }
}
