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
    /// TLS to the server, as libpq's `sslmode`: `disable` (the default) or `verify-full`
    /// (TLS required, the certificate checked against `server_tls.ca_file` and valid for
    /// the host in `server`).
    pub server_sslmode: String,
    /// The CAs for `verify-full`, and a client certificate if the server asks for one.
    pub server_tls: strata_core::tls::ClientTls,
    /// The role the pooler logs into PostgreSQL as; clients name it too.
    pub server_user: String,
    /// Its password (SCRAM-SHA-256, md5 or cleartext, whichever the server asks for).
    pub server_password: Option<String>,
    /// More roles clients may log in as; the pooler logs into PostgreSQL as the same role
    /// with the same password, and each (database, role) has its own pool.
    pub users: Vec<User>,
    /// How clients log in: `scram-sha-256` or `md5` (against the role's password) or `trust`
    /// (any client naming a known role; for loopback only).
    pub auth: String,
    /// Roles not configured here are looked up in PostgreSQL with this query, run on the
    /// control connection with the role name as `$1`; it returns the name and what
    /// `pg_authid.rolpassword` holds (SCRAM verifier or md5 hash), as PgBouncer's does.
    /// Clients prove the password against that; the pooler then logs into PostgreSQL as
    /// their role with what the proof gave it, never knowing the password.
    pub auth_query: Option<String>,
    /// `transaction`: a client holds a server connection for one transaction at a time;
    /// `session`: until it disconnects.
    pub pool_mode: String,
    /// Server connections per database.
    pub pool_size: usize,
    /// Extra server connections for clients that waited longer than `reserve_pool_timeout`.
    pub reserve_pool_size: usize,
    #[serde(with = "strata_core::duration")]
    pub reserve_pool_timeout: Duration,
    /// Idle server connections kept open per database (opened at start for `databases`).
    pub min_idle: usize,
    /// Databases whose pools are opened at start (`min_idle` connections each).
    pub databases: Vec<String>,
    /// A server connection older than this is closed when it comes back to the pool.
    #[serde(with = "strata_core::duration")]
    pub server_lifetime: Duration,
    /// An idle server connection unused this long is closed (down to `min_idle`).
    #[serde(with = "strata_core::duration")]
    pub idle_timeout: Duration,
    /// Protocol-level prepared statements kept per server connection in transaction mode
    /// (least recently used closed first); 0 passes statement names through untouched.
    pub max_prepared_statements: usize,
    /// What to do, in transaction mode, when a client leaves state on its server connection
    /// that would outlive the transaction (`SET`, session advisory locks, `LISTEN`, temporary
    /// tables, `WITH HOLD` cursors, SQL `PREPARE`): `pin` the client to that connection until
    /// it disconnects, or `report` it (a warning and a count) and go on pooling.
    pub on_session_state: String,
    /// Startup parameters accepted from clients and ignored; any other than the tracked ones
    /// (`client_encoding`, `DateStyle`, `IntervalStyle`, `TimeZone`, `application_name`,
    /// `standard_conforming_strings`) is refused.
    pub ignore_startup_parameters: Vec<String>,
    /// Certificate chain and private key (PEM) offered to clients that ask for TLS.
    pub tls_cert_file: Option<std::path::PathBuf>,
    pub tls_key_file: Option<std::path::PathBuf>,
    /// Refuse clients that do not use TLS.
    pub tls_required: bool,
    /// Threads of the pooler's own that run client sessions, each a single-threaded event
    /// loop (connections dealt in turn); 0 runs them on the node's shared runtime. One, the
    /// default, costs the least per transaction on a machine that also runs PostgreSQL;
    /// more pay off only when the pooler's work outgrows a core.
    pub threads: usize,
    /// How often a control connection checks the server with `SELECT 1` ("0s": never).
    #[serde(with = "strata_core::duration")]
    pub health_check_interval: Duration,
    /// The database that control connection logs into.
    pub health_check_database: String,
    /// Longest a client waits for a server connection; then it gets an error.
    #[serde(with = "strata_core::duration")]
    pub query_wait_timeout: Duration,
    /// A client that has not logged in this long after connecting (TLS, startup packet and
    /// password) is closed, so idle sockets cannot hold the pooler ("0s": never).
    #[serde(with = "strata_core::duration")]
    pub client_login_timeout: Duration,
}

/// A role of `[[dbpool.users]]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub password: String,
}

impl Default for DbPoolConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 6432)),
            unix_socket_dir: None,
            server: "127.0.0.1:5432".into(),
            server_user: "postgres".into(),
            server_sslmode: "disable".into(),
            server_tls: strata_core::tls::ClientTls::default(),
            server_password: None,
            users: Vec::new(),
            auth: "scram-sha-256".into(),
            auth_query: None,
            pool_mode: "transaction".into(),
            pool_size: 20,
            reserve_pool_size: 0,
            reserve_pool_timeout: Duration::from_secs(5),
            min_idle: 0,
            databases: Vec::new(),
            server_lifetime: Duration::from_secs(3600),
            idle_timeout: Duration::from_secs(600),
            max_prepared_statements: 200,
            on_session_state: "pin".into(),
            ignore_startup_parameters: vec!["extra_float_digits".into()],
            tls_cert_file: None,
            tls_key_file: None,
            tls_required: false,
            threads: 1,
            health_check_interval: Duration::from_secs(10),
            health_check_database: "postgres".into(),
            query_wait_timeout: Duration::from_secs(30),
            client_login_timeout: Duration::from_secs(60),
        }
    }
}

impl DbPoolConfig {
    /// Whether clients may log in as `user`.
    pub fn knows(&self, user: &str) -> bool {
        user == self.server_user || self.users.iter().any(|u| u.name == user)
    }

    /// The password of role `user`, for its logins to PostgreSQL and its clients' proofs.
    pub fn password_of(&self, user: &str) -> Option<&str> {
        match self.users.iter().find(|u| u.name == user) {
            Some(u) => Some(&u.password),
            None if user == self.server_user => self.server_password.as_deref(),
            None => None,
        }
    }

    /// Whether server connections change hands at each transaction's end.
    pub fn transaction_mode(&self) -> bool {
        self.pool_mode == "transaction"
    }

    /// Checks values serde cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(self.pool_mode.as_str(), "transaction" | "session") {
            return Err(format!(
                "dbpool.pool_mode = {:?}: expected \"transaction\" or \"session\"",
                self.pool_mode
            ));
        }
        if !matches!(self.on_session_state.as_str(), "pin" | "report") {
            return Err(format!(
                "dbpool.on_session_state = {:?}: expected \"pin\" or \"report\"",
                self.on_session_state
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("dbpool.tls_cert_file and dbpool.tls_key_file go together".into());
        }
        if self.tls_required && self.tls_cert_file.is_none() {
            return Err("dbpool.tls_required needs dbpool.tls_cert_file and tls_key_file".into());
        }
        if self.min_idle > self.pool_size {
            return Err(format!(
                "dbpool.min_idle = {}: more than dbpool.pool_size ({})",
                self.min_idle, self.pool_size
            ));
        }
        if !matches!(self.server_sslmode.as_str(), "disable" | "verify-full") {
            return Err(format!(
                "dbpool.server_sslmode = {:?}: expected \"disable\" or \"verify-full\"",
                self.server_sslmode
            ));
        }
        self.server_tls.validate("dbpool.server_tls")?;
        match self.auth.as_str() {
            "trust" => {}
            "scram-sha-256" | "md5" if self.server_password.is_some() => {}
            "scram-sha-256" | "md5" => {
                return Err(format!(
                    "dbpool.auth = {:?} needs dbpool.server_password",
                    self.auth
                ))
            }
            other => {
                return Err(format!(
                    "dbpool.auth = {other:?}: expected \"scram-sha-256\", \"md5\" or \"trust\""
                ))
            }
        }
        if self.auth_query.is_some() && self.auth == "trust" {
            return Err(
                "dbpool.auth_query needs dbpool.auth = \"scram-sha-256\" or \"md5\": the pooler logs in as a looked-up role with what its client's proof gives"
                    .into(),
            );
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
