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
//! - `upstream`: the connection to PostgreSQL, TCP or TLS (`server_sslmode = "verify-full"`;
//!   a TLS session stays on the runtime that made it).
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
//!
//! # How it works
//!
//! PgBouncer's job, on TCP and (with `unix_socket_dir`) a Unix socket named as PostgreSQL names
//! its own; a client's session is one task, on one of the pooler's own single-threaded
//! runtimes (`runners.rs`, `threads`, one by default; sessions dealt in turn) or, with
//! `threads = 0`, on the master's multi-threaded runtime. A server connection's socket belongs
//! to the runtime of the session that borrows it: `pool.rs` hands out the newest idle
//! connection of the caller's runtime (`runners::home`) first, and one from another runtime is
//! registered anew with the caller's (`ServerConn::come_home`), so no message of a transaction
//! crosses threads. `wire.rs` frames the
//! protocol (untyped startup packets: SSL/GSS requests, cancel requests, protocol 3.x
//! parameters, a newer minor answered with NegotiateProtocolVersion 3.0; typed messages
//! bounded) and writes the messages the pooler originates. `client.rs` runs a client's startup (bounded by
//! `client_login_timeout` until the client has proven its role):
//! TLS when asked and configured (`tls.rs`, rustls with the ring provider), role check
//! (`server_user` or `[[users]]`, else `auth_query` on a tokio-postgres control connection,
//! `auth.rs`), refused startup parameters, SCRAM or md5 login (`scram.rs`,
//! the server side, one verifier per configured role made once as PostgreSQL keeps it, or the
//! stored verifier of a looked-up role, checked against `postgres-protocol`'s client; a
//! looked-up role's proof leaves its ClientKey or md5 hash in the pool for that role's server
//! logins), the server's
//! `ParameterStatus` (from the pool's first connection, with the client's tracked values) and a
//! cancel key of the pooler's own (`cancel.rs`). Then `relay.rs` takes over:
//!
//! - Every message sent to the server pushes what it will be answered with onto `flow.rs`'s
//!   queue (a Query or Sync: up to ReadyForQuery; Parse/Bind/Describe/Execute/Close: their
//!   completion; an error skips to the Sync). The queue tells when a transaction is over with
//!   nothing outstanding (`at_rest`): in transaction mode the server connection then goes back
//!   to the pool (`put_back`, no reset).
//! - On each new server connection, tracked parameters (`state::TRACKED`: those PostgreSQL
//!   reports) that differ from the client's are set first by a query whose answers the queue
//!   drops.
//! - Named protocol-level statements (`prepared.rs`) become `strata_<id>`, one id per distinct
//!   text and parameter types for the whole pooler; each server connection knows which it has
//!   (LRU beyond `max_prepared_statements`). A Bind or Describe of a statement the connection
//!   lacks first sends its Parse (answer dropped); a Parse of a statement some server already
//!   accepted is answered by the pooler (`Owed` in the queue) without a server; Close and
//!   `DEALLOCATE name` only make the client forget.
//! - `state.rs` spots SQL that would leave session state (plain `SET` of an untracked setting,
//!   session advisory locks, `LISTEN`, temporary tables, `WITH HOLD`, SQL `PREPARE`, `LOAD`):
//!   the client is pinned to its connection (`on_session_state = "pin"`) or it is reported.
//! - A `BEGIN` without options (`state::plain_begin`) from a client that holds no connection
//!   and has no transaction open is answered by the pooler at once; the statement waits in
//!   `begun` and goes to the server ahead of the transaction's first statement (its answers
//!   dropped), so a transaction borrows a connection one round trip later. Options
//!   (`ISOLATION LEVEL`, `READ ONLY`...) go to the server as they are: only a bare `BEGIN`
//!   cannot fail on a live connection.
//! - Session mode is the same relay with the connection lent at login and kept.
//!
//! `pool.rs` keeps idle connections per (database, role) (`PoolKey`; an `Entry` a client holds
//! for its session, so a transaction's borrow touches only that entry; newest first) behind a semaphore of
//! `pool_size` plus a reserve semaphore used after `reserve_pool_timeout`, with
//! `query_wait_timeout` and a wait-time histogram; an idle connection is checked with a
//! non-blocking read when taken (a closed or talking socket is dropped), closed past
//! `server_lifetime` or `idle_timeout` (down to `min_idle`, which a once-a-second task refills,
//! opening `databases` at start); a paused database lends nothing and closes connections as they
//! come back. `server.rs` logs into PostgreSQL with `postgres-protocol`'s encoders and `scram.rs`'s
//! client (from the password or from a client's ClientKey; md5 from the password or the
//! stored hash; cleartext too) and resets a connection (`ROLLBACK`, then `DISCARD ALL`, learning
//! the `ParameterStatus` values the reset reports, so the next client is told the connection's
//! true parameters).
//! `health.rs` checks the server with `SELECT 1` on a tokio-postgres control connection;
//! pooled connections are raw sockets, as no client library can relay another's protocol.

mod auth;
mod cancel;
mod client;
pub mod config;
mod flow;
#[cfg(fuzzing)]
pub mod fuzz;
mod health;
mod pool;
mod prepared;
mod relay;
mod runners;
mod scram;
mod server;
mod state;
mod upstream;
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
