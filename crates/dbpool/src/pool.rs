//! Server connections per database and role: at most `pool_size` lent at a time (plus a reserve for
//! clients that waited long), idle ones reused newest first, clients queued with a timeout
//! when all are taken, and a database paused for maintenance lends nothing until resumed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_core::metrics::{Counter, Histogram};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::auth::Credential;
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
    /// Boxed, so lending and returning it moves a pointer.
    pub conn: Box<ServerConn>,
    entry: Arc<Entry>,
    _slot: OwnedSemaphorePermit,
}

/// One pool: its key and its state. Clients hold it for their whole session, so the hot path
/// never looks it up.
pub struct Entry {
    pub key: PoolKey,
    db: Mutex<Database>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Entry {
    fn with<T>(&self, f: impl FnOnce(&mut Database) -> T) -> T {
        f(&mut self.db.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

struct Database {
    slots: Arc<Semaphore>,
    reserve: Arc<Semaphore>,
    idle: Vec<(Box<ServerConn>, Instant)>,
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
    /// Clients closed for not logging in within `client_login_timeout`.
    pub login_timeouts: Counter,
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
    /// Each configured role's SCRAM verifier, made at its first login.
    verifiers: Mutex<HashMap<String, Arc<crate::scram::Verifier>>>,
    /// Roles are looked up in PostgreSQL (`auth_query`).
    pub lookup: Option<crate::auth::Lookup>,
    /// What looked-up roles log into PostgreSQL with, from their clients' latest proofs.
    learnt: Mutex<HashMap<String, Credential>>,
    databases: Mutex<HashMap<PoolKey, Arc<Entry>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(config: DbPoolConfig) -> Self {
        Self {
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
                login_timeouts: Counter::default(),
                wait: Histogram::new(WAIT_BOUNDS),
            },
            cancels: Arc::default(),
            statements: Registry::default(),
            health: Default::default(),
            verifiers: Mutex::default(),
            lookup: config.auth_query.clone().map(crate::auth::Lookup::new),
            learnt: Mutex::default(),
            databases: Mutex::default(),
            config,
        }
    }

    /// Keeps what a looked-up role's client proof gave, for that role's server logins.
    pub fn learn(&self, user: &str, credential: Credential) {
        let mut learnt = self.learnt.lock().unwrap_or_else(|e| e.into_inner());
        learnt.insert(user.to_owned(), credential);
    }

    /// What the pooler logs into PostgreSQL with as `user`.
    fn credential_of(&self, user: &str) -> Option<Credential> {
        if let Some(password) = self.config.password_of(user) {
            return Some(Credential::Password(password.to_owned()));
        }
        let learnt = self.learnt.lock().unwrap_or_else(|e| e.into_inner());
        learnt.get(user).cloned()
    }

    /// The SCRAM verifier of role `user` with `password` (made once, with a random salt).
    pub fn verifier(
        &self,
        user: &str,
        password: &str,
    ) -> std::io::Result<Arc<crate::scram::Verifier>> {
        let mut verifiers = self.verifiers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(verifier) = verifiers.get(user) {
            return Ok(verifier.clone());
        }
        let salt: [u8; 16] = crate::client::random_bytes()?;
        let verifier = Arc::new(crate::scram::Verifier::new(password, &salt));
        verifiers.insert(user.to_owned(), verifier.clone());
        Ok(verifier)
    }

    /// The pool of `key`, made on first use.
    pub fn entry(&self, key: &PoolKey) -> Arc<Entry> {
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = databases.get(key) {
            return entry.clone();
        }
        let entry = Arc::new(Entry {
            key: key.clone(),
            db: Mutex::new(Database {
                slots: Arc::new(Semaphore::new(self.config.pool_size)),
                reserve: Arc::new(Semaphore::new(self.config.reserve_pool_size)),
                idle: Vec::new(),
                waiting: 0,
                params: None,
                paused: false,
                resumed: Arc::default(),
            }),
        });
        databases.insert(key.clone(), entry.clone());
        entry
    }

    /// A server connection of pool `entry`: an idle one, or a new one while under
    /// `pool_size`; waits up to `query_wait_timeout` for one to be given back.
    pub async fn acquire(&self, entry: &Arc<Entry>) -> Result<Lent, AcquireError> {
        let mut now = Instant::now();
        let slot = match self.free_slot(entry) {
            Some(slot) => {
                self.counts.wait.observe(Duration::ZERO);
                slot
            }
            None => {
                let deadline = tokio::time::Instant::from_std(now) + self.config.query_wait_timeout;
                let slot = self.slot(entry, deadline).await;
                let started = now;
                now = Instant::now();
                self.counts.wait.observe(now - started);
                slot?
            }
        };
        let home = crate::runners::home();
        loop {
            // Newest first, among those of this thread's runtime when there are any.
            let idle = entry.with(|db| {
                let newest = db.idle.len().checked_sub(1)?;
                let at = db.idle.iter().rposition(|(c, _)| c.home == home);
                Some(db.idle.remove(at.unwrap_or(newest)))
            });
            let Some((conn, _)) = idle else { break };
            if now.saturating_duration_since(conn.born) >= self.config.server_lifetime {
                self.counts.expired.inc();
                continue;
            }
            if !conn.is_quiet() {
                self.counts.stale.inc();
                continue;
            }
            match conn.come_home() {
                Ok(conn) => {
                    self.counts.lent.inc();
                    return Ok(self.lend(conn, entry, slot));
                }
                Err(error) => {
                    tracing::debug!(%error, "dbpool: cannot move a server connection");
                    self.counts.stale.inc();
                }
            }
        }
        let conn = self.open(entry).await?;
        self.counts.lent.inc();
        Ok(self.lend(conn, entry, slot))
    }

    fn lend(&self, conn: Box<ServerConn>, entry: &Arc<Entry>, slot: OwnedSemaphorePermit) -> Lent {
        Lent {
            conn,
            entry: entry.clone(),
            _slot: slot,
        }
    }

    async fn open(&self, entry: &Entry) -> Result<Box<ServerConn>, ServerError> {
        let c = &self.config;
        let key = &entry.key;
        let credential = self.credential_of(&key.user);
        let conn = ServerConn::connect(c, &key.user, &key.database, credential.as_ref())
            .await
            .inspect_err(|_| self.counts.server_errors.inc())?;
        self.counts.opened.inc();
        entry.with(|db| {
            db.params.get_or_insert_with(|| conn.params.clone());
        });
        Ok(Box::new(conn))
    }

    /// A slot under `pool_size` at once, if one is free and the database is not paused.
    fn free_slot(&self, entry: &Entry) -> Option<OwnedSemaphorePermit> {
        let slots = entry.with(|db| (!db.paused).then(|| db.slots.clone()))?;
        slots.try_acquire_owned().ok()
    }

    /// A slot under `pool_size` (or, after `reserve_pool_timeout`, in the reserve), waited
    /// for (also while the database is paused) until `deadline`; for a caller that found
    /// none free ([`Pool::free_slot`]).
    async fn slot(
        &self,
        entry: &Entry,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, AcquireError> {
        let (slots, reserve, paused) = entry.with(|db| {
            (
                db.slots.clone(),
                db.reserve.clone(),
                db.paused.then(|| db.resumed.clone()),
            )
        });
        entry.with(|db| db.waiting += 1);
        let slot = self.wait_for_slot(entry, slots, reserve, paused, deadline);
        let slot = slot.await;
        entry.with(|db| db.waiting -= 1);
        if slot.is_err() {
            self.counts.timeouts.inc();
        }
        slot
    }

    async fn wait_for_slot(
        &self,
        entry: &Entry,
        slots: Arc<Semaphore>,
        reserve: Arc<Semaphore>,
        mut paused: Option<Arc<Notify>>,
        deadline: tokio::time::Instant,
    ) -> Result<OwnedSemaphorePermit, AcquireError> {
        let timeout = AcquireError::Timeout(self.config.query_wait_timeout);
        while let Some(resumed) = paused {
            let notified = resumed.notified();
            if !entry.with(|db| db.paused) {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(AcquireError::Paused(entry.key.database.clone()));
            }
            paused = entry.with(|db| db.paused.then(|| db.resumed.clone()));
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

    /// What PostgreSQL reports to clients of pool `entry` at login (from the first server
    /// connection; opening one if there is none yet, which also checks the database exists).
    pub async fn server_params(
        &self,
        entry: &Arc<Entry>,
    ) -> Result<Vec<(String, String)>, AcquireError> {
        if let Some(params) = entry.with(|db| db.params.clone()) {
            return Ok(params);
        }
        let lent = self.acquire(entry).await?;
        let params = lent.conn.params.clone();
        self.put_back(lent);
        Ok(params)
    }

    /// Takes back a clean connection (at rest, outside a transaction).
    pub fn put_back(&self, lent: Lent) {
        let Lent { conn, entry, .. } = lent;
        let now = Instant::now();
        if now.saturating_duration_since(conn.born) >= self.config.server_lifetime {
            self.counts.expired.inc();
            return;
        }
        entry.with(|db| {
            if !db.paused {
                db.idle.push((conn, now));
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
            .map(|(key, entry)| {
                entry.with(|db| DatabaseStatus {
                    database: key.database.clone(),
                    user: key.user.clone(),
                    active: self.config.pool_size - db.slots.available_permits()
                        + (self.config.reserve_pool_size - db.reserve.available_permits()),
                    idle: db.idle.len(),
                    waiting: db.waiting,
                    paused: db.paused,
                })
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
        databases.retain(|key, entry| {
            key.database != database
                || entry.with(|db| {
                    db.idle.clear();
                    db.slots.available_permits() < size || db.waiting > 0
                })
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
            self.entry(&self.key(name));
        }
        let mut databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = databases
            .iter_mut()
            .filter(|(key, _)| database.is_none_or(|name| key.database == name))
            .map(|(key, entry)| {
                entry.with(&mut f);
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
    pub fn tend(&self) -> Vec<(Arc<Entry>, usize)> {
        let c = &self.config;
        for name in &c.databases {
            self.entry(&self.key(name));
        }
        let databases = self.databases.lock().unwrap_or_else(|e| e.into_inner());
        let mut short = Vec::new();
        for entry in databases.values() {
            let mut db = entry.db.lock().unwrap_or_else(|e| e.into_inner());
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
                short.push((entry.clone(), missing));
            }
        }
        short
    }

    /// Opens a connection of pool `entry` and keeps it idle (warm-up, `min_idle`).
    pub async fn warm(&self, entry: &Entry) -> Result<(), ServerError> {
        let conn = self.open(entry).await?;
        entry.with(|db| db.idle.insert(0, (conn, Instant::now())));
        Ok(())
    }
}
