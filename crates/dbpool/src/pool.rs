//! Server connections per database: at most `pool_size` at a time, idle ones reused, clients
//! queued (with a timeout) when all are taken.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_core::metrics::Counter;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::DbPoolConfig;
use crate::server::{ServerConn, ServerError};

/// Why a client got no server connection.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("no server connection became free within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Server(#[from] ServerError),
}

/// A server connection lent to one client; give it back with [`Pool::release`].
#[derive(Debug)]
pub struct Lent {
    pub conn: ServerConn,
    database: String,
    _slot: OwnedSemaphorePermit,
}

#[derive(Default)]
struct Database {
    idle: Vec<ServerConn>,
    /// Clients waiting for a connection to this database.
    waiting: usize,
}

/// One database's pool, as `/status` and `/metrics` show it.
#[derive(Debug, serde::Serialize)]
pub struct DatabaseStatus {
    pub database: String,
    /// Server connections lent to clients (or being opened for them).
    pub active: usize,
    pub idle: usize,
    pub waiting: usize,
}

/// What the pool counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counts {
    pub opened: Counter,
    pub lent: Counter,
    pub timeouts: Counter,
    pub server_errors: Counter,
    pub discarded: Counter,
}

/// The pools, one per database.
pub struct Pool {
    config: DbPoolConfig,
    pub counts: Counts,
    databases: Mutex<HashMap<String, (Arc<Semaphore>, Database)>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(config: DbPoolConfig) -> Self {
        Self {
            config,
            counts: Counts::default(),
            databases: Mutex::default(),
        }
    }

    fn slots(&self, database: &str) -> Arc<Semaphore> {
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        databases
            .entry(database.to_owned())
            .or_insert_with(|| {
                (
                    Arc::new(Semaphore::new(self.config.pool_size)),
                    Database::default(),
                )
            })
            .0
            .clone()
    }

    /// A server connection to `database`: an idle one, or a new one while under `pool_size`;
    /// waits up to `query_wait_timeout` for one to be given back.
    pub async fn acquire(&self, database: &str) -> Result<Lent, AcquireError> {
        let wait = self.config.query_wait_timeout;
        let slots = self.slots(database);
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                self.count_waiting(database, true);
                let slot = tokio::time::timeout(wait, slots.acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok);
                self.count_waiting(database, false);
                slot
            }
        };
        let Some(slot) = slot else {
            self.counts.timeouts.inc();
            return Err(AcquireError::Timeout(wait));
        };
        let idle = {
            let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
            databases
                .get_mut(database)
                .and_then(|(_, db)| db.idle.pop())
        };
        let conn = match idle {
            Some(conn) => conn,
            None => {
                let conn = ServerConn::connect(
                    &self.config.server,
                    &self.config.server_user,
                    database,
                    self.config.server_password.as_deref(),
                )
                .await
                .inspect_err(|_| self.counts.server_errors.inc())?;
                self.counts.opened.inc();
                conn
            }
        };
        self.counts.lent.inc();
        Ok(Lent {
            conn,
            database: database.to_owned(),
            _slot: slot,
        })
    }

    fn count_waiting(&self, database: &str, arriving: bool) {
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, db)) = databases.get_mut(database) {
            if arriving {
                db.waiting += 1;
            } else {
                db.waiting = db.waiting.saturating_sub(1);
            }
        }
    }

    /// Every database's pool, by name.
    pub fn status(&self) -> Vec<DatabaseStatus> {
        let databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<DatabaseStatus> = databases
            .iter()
            .map(|(name, (slots, db))| DatabaseStatus {
                database: name.clone(),
                active: self.config.pool_size - slots.available_permits(),
                idle: db.idle.len(),
                waiting: db.waiting,
            })
            .collect();
        out.sort_by(|a, b| a.database.cmp(&b.database));
        out
    }

    /// Forwards a cancel request for backend `pid` to PostgreSQL.
    pub async fn cancel(&self, pid: i32, key: i32) -> std::io::Result<()> {
        let mut stream = tokio::net::TcpStream::connect(&self.config.server).await?;
        let packet = crate::wire::cancel_request(pid, key);
        tokio::io::AsyncWriteExt::write_all(&mut stream, &packet).await
    }

    /// Takes a connection back after resetting it; a connection that fails its reset is
    /// closed, never handed to another client.
    pub async fn release(&self, mut lent: Lent) {
        match lent.conn.reset().await {
            Ok(()) => {
                let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((_, db)) = databases.get_mut(&lent.database) {
                    db.idle.push(lent.conn);
                }
            }
            Err(error) => {
                self.counts.discarded.inc();
                tracing::debug!(%error, "dropping a server connection");
            }
        }
    }
}
