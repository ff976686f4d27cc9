//! Server connections per database and role: at most `pool_size` lent at a time (plus a reserve for
//! clients that waited long), idle ones reused newest first, clients queued with a timeout
//! when all are taken, and a database paused for maintenance lends nothing until resumed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_core::metrics::{Counter, Histogram};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::cancel::Cancels;
use crate::config::DbPoolConfig;
use crate::prepared::Registry;
use crate::server::{ServerConn, ServerError};

/// Why a client got no server connection.
#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("no server connection became free within {0:?}")]
    Timeout(Duration),
    #[error("database {0:?} is paused and was not resumed within the wait")]
    Paused(String),
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl AcquireError {
    /// The SQLSTATE a client is told.
    pub fn code(&self) -> &str {
        match self {
            AcquireError::Timeout(_) | AcquireError::Paused(_) => "53300",
            AcquireError::Server(ServerError::Refused { code, .. }) => code,
            AcquireError::Server(_) => "08006",
        }
    }
}

/// Whose connections a pool holds: one database, as one role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
}

/// A server connection lent to one client; give it back with [`Pool::put_back`] (clean, at a
/// transaction's end) or [`Pool::release`] (reset first).
#[derive(Debug)]
pub struct Lent {
    pub conn: ServerConn,
    key: PoolKey,
    _slot: OwnedSemaphorePermit,
}

struct Database {
    slots: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    idle: Vec<(ServerConn, Instant)>,
    waiting: usize,
    /// What the first server connection reported, for clients logging in.
    params: Option<Vec<(String, String)>>,
    paused: bool,
    resumed: Arc<Notify>,
}

/// One pool, as `/status` and `/metrics` show it.
#[derive(Debug, serde::Serialize)]
pub struct DatabaseStatus {
    pub database: String,
    pub user: String,
    /// Server connections lent to clients (or being opened for them).
    pub active: usize,
    pub idle: usize,
    pub waiting: usize,
    pub paused: bool,
}

/// What the pool counts, for `/metrics`.
#[derive(Debug)]
pub struct Counts {
    pub opened: Counter,
    pub lent: Counter,
    pub timeouts: Counter,
    pub server_errors: Counter,
    pub discarded: Counter,
    /// Idle connections found closed or talking when taken.
    pub stale: Counter,
    pub expired: Counter,
    pub reserve: Counter,
    pub pinned: Counter,
    pub session_state: Counter,
    /// How long clients waited for a server connection.
    pub wait: Histogram,
}

const WAIT_BOUNDS: &[f64] = &[0.0001, 0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10.0];

/// The pools, one per database and role.
pub struct Pool {
    pub config: DbPoolConfig,
    pub counts: Counts,
    pub cancels: Arc<Cancels>,
    pub statements: Registry,
    pub health: crate::health::Health,
    databases: Mutex<HashMap<PoolKey, Database>>,
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
            counts: Counts {
                opened: Counter::default(),
                lent: Counter::default(),
                timeouts: Counter::default(),
                server_errors: Counter::default(),
                discarded: Counter::default(),
                stale: Counter::default(),
                expired: Counter::default(),
                reserve: Counter::default(),
                pinned: Counter::default(),
                session_state: Counter::default(),
                wait: Histogram::new(WAIT_BOUNDS),
            },
            cancels: Arc::default(),
            statements: Registry::default(),
            health: Default::default(),
            databases: Mutex::default(),
        }
    }

    fn with<T>(&self, key: &PoolKey, f: impl FnOnce(&mut Database) -> T) -> T {
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        let db = databases.entry(key.clone()).or_insert_with(|| Database {
            slots: Arc::new(Semaphore::new(self.config.pool_size)),
            reserve: Arc::new(Semaphore::new(self.config.reserve_pool_size)),
            idle: Vec::new(),
            waiting: 0,
            params: None,
            paused: false,
            resumed: Arc::default(),
        });
        f(db)
    }

    /// A server connection of pool `key`: an idle one, or a new one while under `pool_size`;
    /// waits up to `query_wait_timeout` for one to be given back.
    pub async fn acquire(&self, key: &PoolKey) -> Result<Lent, AcquireError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.config.query_wait_timeout;
        let slot = self.slot(key, deadline).await;
        self.counts.wait.observe(started.elapsed());
        let slot = slot?;
        loop {
            let idle = self.with(key, |db| db.idle.pop());
            let Some((conn, _)) = idle else { break };
            if conn.born.elapsed() >= self.config.server_lifetime {
                self.counts.expired.inc();
                continue;
            }
            if conn.is_quiet() {
                self.counts.lent.inc();
                return Ok(self.lend(conn, key, slot));
            }
            self.counts.stale.inc();
        }
        let conn = self.open(key).await?;
        self.counts.lent.inc();
        Ok(self.lend(conn, key, slot))
    }

    fn lend(&self, conn: ServerConn, key: &PoolKey, slot: OwnedSemaphorePermit) -> Lent {
        Lent {
            conn,
            key: key.clone(),
            _slot: slot,
        }
    }

    async fn open(&self, key: &PoolKey) -> Result<ServerConn, ServerError> {
        let c = &self.config;
        let conn = ServerConn::connect(
            &c.server,
            &key.user,
            &key.database,
            c.password_of(&key.user),
        )
        .await
        .inspect_err(|_| self.counts.server_errors.inc())?;
        self.counts.opened.inc();
        self.with(key, |db| {
            db.params.get_or_insert_with(|| conn.params.clone());
        });
        Ok(conn)
    }

    /// A slot under `pool_size` (or, after `reserve_pool_timeout`, in the reserve), waiting
    /// while the database is paused, until `deadline`.
    async fn slot(
        &self,
        key: &PoolKey,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, AcquireError> {
        let (slots, reserve, paused) = self.with(key, |db| {
            (
                db.slots.clone(),
                db.reserve.clone(),
                db.paused.then(|| db.resumed.clone()),
            )
        });
        if paused.is_none() {
            if let Ok(slot) = slots.clone().try_acquire_owned() {
                return Ok(slot);
            }
        }
        self.with(key, |db| db.waiting += 1);
        let slot = self.wait_for_slot(key, slots, reserve, paused, deadline);
        let slot = slot.await;
        self.with(key, |db| db.waiting -= 1);
        if slot.is_err() {
            self.counts.timeouts.inc();
        }
        slot
    }

    async fn wait_for_slot(
        &self,
        key: &PoolKey,
        slots: Arc<Semaphore>,
        reserve: Arc<Semaphore>,
        mut paused: Option<Arc<Notify>>,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, AcquireError> {
        let timeout = AcquireError::Timeout(self.config.query_wait_timeout);
        while let Some(resumed) = paused {
            let notified = resumed.notified();
            if !self.with(key, |db| db.paused) {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(AcquireError::Paused(key.database.clone()));
            }
            paused = self.with(key, |db| db.paused.then(|| db.resumed.clone()));
        }
        let reserve_at = tokio::time::Instant::now() + self.config.reserve_pool_timeout;
        if self.config.reserve_pool_size > 0 && reserve_at < deadline {
            if let Ok(slot) =
                tokio::time::timeout_at(reserve_at, slots.clone().acquire_owned()).await
            {
                return slot.map_err(|_| timeout);
            }
            let either = async {
                tokio::select! {
                    slot = slots.acquire_owned() => slot,
                    slot = reserve.acquire_owned() => {
                        self.counts.reserve.inc();
                        slot
                    }
                }
            };
            return match tokio::time::timeout_at(deadline, either).await {
                Ok(Ok(slot)) => Ok(slot),
                _ => Err(timeout),
            };
        }
        match tokio::time::timeout_at(deadline, slots.acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(timeout),
        }
    }

    /// What PostgreSQL reports to clients of pool `key` at login (from the first server
    /// connection; opening one if there is none yet, which also checks the database exists).
    pub async fn server_params(
        &self,
        key: &PoolKey,
    ) -> Result<Vec<(String, String)>, AcquireError> {
        if let Some(params) = self.with(key, |db| db.params.clone()) {
            return Ok(params);
        }
        let lent = self.acquire(key).await?;
        let params = lent.conn.params.clone();
        self.put_back(lent);
        Ok(params)
    }

    /// Takes back a clean connection (at rest, outside a transaction).
    pub fn put_back(&self, lent: Lent) {
        let Lent { conn, key, .. } = lent;
        if conn.born.elapsed() >= self.config.server_lifetime {
            self.counts.expired.inc();
            return;
        }
        self.with(&key, |db| {
            if !db.paused {
                db.idle.push((conn, Instant::now()));
            }
        });
    }

    /// Takes a connection back after resetting it; a connection that fails its reset is
    /// closed, never handed to another client.
    pub async fn release(&self, mut lent: Lent) {
        match lent.conn.reset().await {
            Ok(()) => self.put_back(lent),
            Err(error) => {
                self.counts.discarded.inc();
                tracing::debug!(%error, "dropping a server connection");
            }
        }
    }

    /// Forwards a cancel request for the client with `pid` and `key` to the server
    /// connection it holds.
    pub async fn cancel(&self, pid: i32, key: i32) -> std::io::Result<()> {
        let Some((pid, key)) = self.cancels.target(pid, key) else {
            return Ok(());
        };
        let mut stream = tokio::net::TcpStream::connect(&self.config.server).await?;
        let packet = crate::wire::cancel_request(pid, key);
        tokio::io::AsyncWriteExt::write_all(&mut stream, &packet).await
    }

    /// Every database's pool, by name.
    pub fn status(&self) -> Vec<DatabaseStatus> {
        let databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<DatabaseStatus> = databases
            .iter()
            .map(|(key, db)| DatabaseStatus {
                database: key.database.clone(),
                user: key.user.clone(),
                active: self.config.pool_size - db.slots.available_permits()
                    + (self.config.reserve_pool_size - db.reserve.available_permits()),
                idle: db.idle.len(),
                waiting: db.waiting,
                paused: db.paused,
            })
            .collect();
        out.sort_by(|a, b| (&a.database, &a.user).cmp(&(&b.database, &b.user)));
        out
    }

    /// Pauses `database` (or every database): no new server connection is lent, idle ones
    /// are closed, and lent ones are closed as they come back. Returns the databases paused.
    pub fn pause(&self, database: Option<&str>) -> Vec<String> {
        self.each(database, |db| {
            db.paused = true;
            db.idle.clear();
        })
    }

    /// Closes every idle connection (the server failed a health check).
    pub fn close_idle(&self) {
        self.each(None, |db| db.idle.clear());
    }

    /// Forgets `database` (about to be dropped: PostgreSQL refuses to drop a database anyone
    /// is connected to): its idle connections are closed, and its pools go unless a
    /// connection is lent, so the next client's login asks PostgreSQL about it again.
    pub fn forget(&self, database: &str) {
        let size = self.config.pool_size;
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        databases.retain(|key, db| {
            if key.database != database {
                return true;
            }
            db.idle.clear();
            db.slots.available_permits() < size || db.waiting > 0
        });
    }

    /// Lets clients of `database` (or every database) have server connections again.
    pub fn resume(&self, database: Option<&str>) -> Vec<String> {
        self.each(database, |db| {
            db.paused = false;
            db.resumed.notify_waiters();
        })
    }

    fn each(&self, database: Option<&str>, mut f: impl FnMut(&mut Database)) -> Vec<String> {
        if let Some(name) = database {
            // A database no client has used yet is paused for the pooler's own role.
            self.with(&self.key(name), |_| ());
        }
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = databases
            .iter_mut()
            .filter(|(key, _)| database.is_none_or(|name| key.database == name))
            .map(|(key, db)| {
                f(db);
                key.database.clone()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The pool of `database` for the pooler's own role (`server_user`).
    pub fn key(&self, database: &str) -> PoolKey {
        PoolKey {
            database: database.to_owned(),
            user: self.config.server_user.clone(),
        }
    }

    /// Closes idle connections unused for `idle_timeout` (keeping `min_idle`) and returns
    /// the pools short of `min_idle` idle connections, with how many to open.
    pub fn tend(&self) -> Vec<(PoolKey, usize)> {
        let c = &self.config;
        for name in &c.databases {
            self.with(&self.key(name), |_| ());
        }
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        let mut short = Vec::new();
        for (key, db) in databases.iter_mut() {
            if db.paused {
                continue;
            }
            // Oldest first: the stack's bottom is the longest idle.
            while db.idle.len() > c.min_idle
                && db
                    .idle
                    .first()
                    .is_some_and(|(_, at)| at.elapsed() >= c.idle_timeout)
            {
                db.idle.remove(0);
                self.counts.expired.inc();
            }
            let active = c.pool_size - db.slots.available_permits();
            let room = c.pool_size.saturating_sub(active + db.idle.len());
            let missing = c.min_idle.saturating_sub(db.idle.len()).min(room);
            if missing > 0 {
                short.push((key.clone(), missing));
            }
        }
        short
    }

    /// Opens a connection of pool `key` and keeps it idle (warm-up, `min_idle`).
    pub async fn warm(&self, key: &PoolKey) -> Result<(), ServerError> {
        let conn = self.open(key).await?;
        self.with(key, |db| db.idle.insert(0, (conn, Instant::now())));
        Ok(())
    }
}
