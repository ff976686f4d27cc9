//! A backend pool: its servers, what is known of each (health, ejection, latency, requests in
//! flight), the choice of a server for each request, and the shared queue where requests wait
//! when every server is at its `max_conn` (HAProxy's maxconn/maxqueue/timeout queue).
//!
//! Which servers may be chosen: those up (active checks) and not ejected (passive checks);
//! but when fewer than `panic_threshold` of them are, all are — a partial failure is never
//! turned into an outage by the balancer itself.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use strata_core::metrics::Counter;
use strata_core::{HttpService, Readiness};
use tokio::sync::Notify;

use crate::balance::{self, Balance, Candidate, PeakEwma};
use crate::config::BackendConfig;

/// Latency a server starts with, and starts again with when it comes back (seconds): its
/// first answers set the real figure at once (a peak), and slow start keeps it from being
/// flooded meanwhile.
const FIRST_LATENCY: f64 = 0.005;

/// Pools up to this many servers are chosen from without a heap allocation.
const INLINE_SERVERS: usize = 8;

/// What the balancer knows of one server.
#[derive(Debug)]
struct Known {
    up: bool,
    passes: u32,
    fails: u32,
    errors_in_row: u32,
    ejected_until: Option<Instant>,
    /// When it joined or last came back: slow start counts from here.
    since: Instant,
    latency: PeakEwma,
}

impl Known {
    /// Up and not ejected; an ejection that has run out ends here (slow start again).
    fn healthy(&mut self, now: Instant) -> bool {
        if self.ejected_until.is_some_and(|until| now >= until) {
            self.ejected_until = None;
            self.since = now;
            self.latency = PeakEwma::new(FIRST_LATENCY, now);
        }
        self.up && self.ejected_until.is_none()
    }
}

/// Numbers servers for as long as the process lives, so a retry can tell which servers it
/// tried even when the pool's members change in between.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One server of a pool.
pub struct Server {
    /// Unique in the process.
    pub id: u64,
    pub name: String,
    /// The `[[lb.backends.servers]]` entry it comes from (one entry can be several members).
    pub entry: usize,
    /// The address it was resolved to, for a member of an entry that names a DNS name.
    pub addr: Option<std::net::SocketAddr>,
    pub service: HttpService,
    /// The remote server's base URL for active checks; `None` for the local tier.
    pub url: Option<http::Uri>,
    /// The local tier's supervisor, asked instead of a check request.
    pub local: Option<Arc<dyn Readiness>>,
    weight: f64,
    max_conn: Option<usize>,
    in_flight: AtomicUsize,
    known: Mutex<Known>,
    pub requests: Counter,
    pub failures: Counter,
    pub ejections: Counter,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A server as `/status` shows it.
#[derive(Debug, serde::Serialize)]
pub struct ServerStatus {
    pub name: String,
    pub up: bool,
    pub ejected: bool,
    pub in_flight: usize,
    pub latency_ms: f64,
    pub weight_now: f64,
    pub requests: u64,
    pub failures: u64,
}

impl Server {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        entry: usize,
        addr: Option<std::net::SocketAddr>,
        service: HttpService,
        url: Option<http::Uri>,
        local: Option<Arc<dyn Readiness>>,
        weight: u32,
        max_conn: Option<usize>,
    ) -> Self {
        let now = Instant::now();
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name,
            entry,
            addr,
            service,
            url,
            local,
            weight: f64::from(weight),
            max_conn,
            in_flight: AtomicUsize::new(0),
            known: Mutex::new(Known {
                up: true,
                passes: 0,
                fails: 0,
                errors_in_row: 0,
                ejected_until: None,
                since: now,
                latency: PeakEwma::new(FIRST_LATENCY, now),
            }),
            requests: Counter::default(),
            failures: Counter::default(),
            ejections: Counter::default(),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has_room(&self) -> bool {
        self.max_conn
            .is_none_or(|max| self.in_flight.load(Ordering::SeqCst) < max)
    }

    /// Up and not ejected; an ejection that has run out ends here (slow start again).
    fn healthy(&self, now: Instant) -> bool {
        self.known().healthy(now)
    }

    /// Whether the server is healthy, and what choosing it weighs now (one lock).
    fn observe(&self, now: Instant, slow_start: Duration) -> (bool, Candidate) {
        let mut known = self.known();
        let healthy = known.healthy(now);
        let candidate = Candidate {
            weight: self.weight * balance::slow_start(now - known.since, slow_start),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            latency: known.latency.get(now),
        };
        (healthy, candidate)
    }

    /// The result of an active check, counted against `rise`/`fall`.
    pub fn checked(&self, passed: bool, rise: u32, fall: u32) {
        let mut known = self.known();
        if passed {
            known.fails = 0;
            known.passes = known.passes.saturating_add(1);
            if !known.up && known.passes >= rise {
                let now = Instant::now();
                known.up = true;
                // A server that went down and came back starts afresh: an ejection from
                // the failures that took it down does not outlive them.
                known.ejected_until = None;
                known.errors_in_row = 0;
                known.since = now;
                known.latency = PeakEwma::new(FIRST_LATENCY, now);
                tracing::info!(server = %self.name, "backend server is up");
            }
        } else {
            known.passes = 0;
            known.fails = known.fails.saturating_add(1);
            if known.up && known.fails >= fall {
                known.up = false;
                tracing::warn!(server = %self.name, "backend server is down");
            }
        }
    }

    pub fn status(&self, slow_start: Duration) -> ServerStatus {
        let now = Instant::now();
        let healthy = self.healthy(now);
        let known = self.known();
        ServerStatus {
            name: self.name.clone(),
            up: known.up,
            ejected: known.ejected_until.is_some(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            latency_ms: known.latency.get(now) * 1000.0,
            weight_now: if healthy {
                self.weight * balance::slow_start(now - known.since, slow_start)
            } else {
                0.0
            },
            requests: self.requests.get(),
            failures: self.failures.get(),
        }
    }
}

/// Why no server was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("every server is busy and the queue is full")]
    QueueFull,
    #[error("no server became free in time")]
    QueueTimeout,
    #[error("no such server")]
    Unknown,
    #[error("no server left to try")]
    Exhausted,
}

/// One backend pool.
pub struct Pool {
    pub name: String,
    /// Its members now; replaced whole when a DNS name resolves to other addresses.
    members: RwLock<Arc<[Arc<Server>]>>,
    pub config: BackendConfig,
    balance: Balance,
    turn: AtomicUsize,
    waiting: AtomicUsize,
    freed: Notify,
    in_flight: AtomicUsize,
    retrying: AtomicUsize,
    pub panics: Counter,
    pub queue_timeouts: Counter,
    pub retries: Counter,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A server lent to one request; given back when dropped.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    server: Arc<Server>,
    started: Instant,
}

impl Lease {
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Records how the request went: its latency, and whether it failed (passive checks).
    pub fn finish(self, failed: bool) {
        let server = self.server();
        let now = Instant::now();
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let mut known = server.known();
        if failed {
            server.failures.inc();
            // A fast failure must not look like a fast server.
            let penalty = (known.latency.get(now) * 4.0).max(0.25);
            known.latency.observe(penalty.max(elapsed), now);
            known.errors_in_row = known.errors_in_row.saturating_add(1);
            if known.errors_in_row >= self.pool.config.eject_after && known.ejected_until.is_none()
            {
                drop(known);
                self.pool.eject(server, now);
            }
        } else {
            known.latency.observe(elapsed, now);
            known.errors_in_row = 0;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.server().in_flight.fetch_sub(1, Ordering::SeqCst);
        self.pool.in_flight.fetch_sub(1, Ordering::Relaxed);
        // SeqCst pairs with the waiter's: either it sees the room made above, or this sees
        // it waiting.
        if self.pool.waiting.load(Ordering::SeqCst) > 0 {
            self.pool.freed.notify_one();
        }
    }
}

impl Pool {
    pub fn new(config: BackendConfig, servers: Vec<Arc<Server>>) -> Self {
        Self {
            name: config.name.clone(),
            balance: Balance::parse(&config.balance),
            members: RwLock::new(servers.into()),
            config,
            turn: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            freed: Notify::new(),
            in_flight: AtomicUsize::new(0),
            retrying: AtomicUsize::new(0),
            panics: Counter::default(),
            queue_timeouts: Counter::default(),
            retries: Counter::default(),
        }
    }

    /// The members now (a snapshot: a request keeps the one it started with).
    pub fn servers(&self) -> Arc<[Arc<Server>]> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many members there are now.
    pub fn len(&self) -> usize {
        self.members.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Makes `servers` the members; requests in flight keep the servers they hold.
    pub fn set_servers(&self, servers: Vec<Arc<Server>>) {
        *self.members.write().unwrap_or_else(|e| e.into_inner()) = servers.into();
    }

    /// Ejects `server` for `ejection_time`, unless that would eject more than
    /// `max_ejection` of the pool.
    fn eject(&self, server: &Server, now: Instant) {
        let servers = self.servers();
        let ejected = servers
            .iter()
            .filter(|s| s.known().ejected_until.is_some_and(|until| now < until))
            .count();
        let limit = (self.config.max_ejection * servers.len() as f64).floor() as usize;
        if ejected + 1 > limit {
            tracing::warn!(server = %server.name, "backend server failing, but max_ejection reached: kept");
            return;
        }
        let mut known = server.known();
        known.ejected_until = Some(now + self.config.ejection_time);
        known.errors_in_row = 0;
        server.ejections.inc();
        tracing::warn!(server = %server.name, "backend server ejected after repeated failures");
    }

    /// The server for one request (not one of `tried`, by [`Server::id`]), waiting in the
    /// pool's queue while every candidate is at its `max_conn`.
    pub async fn lease(self: &Arc<Self>, tried: &[u64]) -> Result<Lease, Refused> {
        match self.try_lease(tried) {
            Pick::Leased(lease) => Ok(lease),
            Pick::Nobody => Err(Refused::Exhausted),
            // Boxed: waiting (a timer and a notification) is rare, and inline its state
            // would grow every request's future.
            Pick::Busy => Box::pin(self.queue(tried)).await,
        }
    }

    /// Waits in the pool's queue for a server with room.
    async fn queue(self: &Arc<Self>, tried: &[u64]) -> Result<Lease, Refused> {
        if self.waiting.load(Ordering::Relaxed) >= self.config.max_queue {
            return Err(Refused::QueueFull);
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + self.config.queue_timeout;
        let outcome = loop {
            let freed = self.freed.notified();
            match self.try_lease(tried) {
                Pick::Leased(lease) => break Ok(lease),
                Pick::Nobody => break Err(Refused::Exhausted),
                Pick::Busy => {}
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                self.queue_timeouts.inc();
                break Err(Refused::QueueTimeout);
            }
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        outcome
    }

    /// The server named `name`, whatever its health (direct access, for debugging it).
    pub fn lease_named(self: &Arc<Self>, name: &str) -> Result<Lease, Refused> {
        let servers = self.servers();
        let server = servers
            .iter()
            .find(|s| s.name == name)
            .ok_or(Refused::Unknown)?;
        Ok(self.take(server, Instant::now()))
    }

    /// Lends `server`; `now` is when its request starts.
    fn take(self: &Arc<Self>, server: &Arc<Server>, now: Instant) -> Lease {
        server.in_flight.fetch_add(1, Ordering::Relaxed);
        server.requests.inc();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease {
            pool: self.clone(),
            server: server.clone(),
            started: now,
        }
    }

    fn try_lease(self: &Arc<Self>, tried: &[u64]) -> Pick {
        // Read in place (no await while it is held): cheaper than a snapshot per request.
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        let servers: &[Arc<Server>] = &members;
        let n = servers.len();
        if n <= INLINE_SERVERS {
            let mut seen = [Seen::default(); INLINE_SERVERS];
            let mut candidates = [Candidate::default(); INLINE_SERVERS];
            self.choose(servers, tried, &mut seen[..n], &mut candidates[..n])
        } else {
            self.choose(
                servers,
                tried,
                &mut vec![Seen::default(); n],
                &mut vec![Candidate::default(); n],
            )
        }
    }

    /// [`Pool::try_lease`] among `servers`, with room for what it reads of each (`seen`) and
    /// for the candidates, one slot per server each.
    fn choose(
        self: &Arc<Self>,
        servers: &[Arc<Server>],
        tried: &[u64],
        seen: &mut [Seen],
        candidates: &mut [Candidate],
    ) -> Pick {
        let now = Instant::now();
        // Each server read once, under its lock once: healthy, and what choosing it weighs.
        for (slot, server) in seen.iter_mut().zip(servers) {
            (slot.healthy, slot.candidate) = server.observe(now, self.config.slow_start);
        }
        let count = seen.iter().filter(|s| s.healthy).count();
        let panic = (count as f64) < self.config.panic_threshold * servers.len() as f64;
        if panic {
            self.panics.inc();
        }
        let mut eligible = false;
        let mut kept = 0;
        for index in 0..seen.len() {
            if tried.contains(&servers[index].id) || !(panic || seen[index].healthy) {
                continue;
            }
            eligible = true;
            if !servers[index].has_room() {
                continue;
            }
            candidates[kept] = seen[index].candidate;
            // `kept <= index`: the slot of an earlier server is free to say who this is.
            seen[kept].index = index;
            kept += 1;
        }
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        match balance::pick(self.balance, &candidates[..kept], turn) {
            Some(chosen) => Pick::Leased(self.take(&servers[seen[chosen].index], now)),
            None if eligible => Pick::Busy,
            None => Pick::Nobody,
        }
    }

    /// Whether one more retry fits the budget: 20 % of requests in flight, at least 3.
    pub fn retry_permit(self: &Arc<Self>) -> Option<RetryPermit> {
        let budget = (self.in_flight.load(Ordering::Relaxed) / 5).max(3);
        if self.retrying.fetch_add(1, Ordering::Relaxed) >= budget {
            self.retrying.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.retries.inc();
        Some(RetryPermit(self.clone()))
    }
}

/// What choosing reads of one server.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    healthy: bool,
    candidate: Candidate,
    /// Once compacted: which server the candidate in the same place is.
    index: usize,
}

/// What one attempt to choose a server found.
enum Pick {
    Leased(Lease),
    /// Servers may be chosen, but all are at their `max_conn`: wait.
    Busy,
    /// None may be chosen (all tried, or none healthy outside panic).
    Nobody,
}

/// A retry in the budget; given back when dropped.
#[derive(Debug)]
pub struct RetryPermit(Arc<Pool>);

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.0.retrying.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_core::seam::status_response;

    fn server() -> Server {
        let service =
            HttpService::from_fn(|_| async { Ok(status_response(http::StatusCode::OK, "")) });
        Server::new("a".into(), 0, None, service, None, None, 1, None)
    }

    #[test]
    fn a_server_that_comes_back_up_is_no_longer_ejected() {
        let server = server();
        let now = Instant::now();
        server.known().ejected_until = Some(now + Duration::from_secs(30));
        assert!(!server.healthy(now));
        // Down (two failed checks), then up again (two passes).
        for passed in [false, false, true] {
            server.checked(passed, 2, 2);
        }
        assert!(!server.healthy(Instant::now()), "one pass is not enough");
        server.checked(true, 2, 2);
        assert!(
            server.healthy(Instant::now()),
            "back up: the old ejection is over"
        );
    }

    #[test]
    fn passing_checks_do_not_end_an_ejection_of_a_server_that_stayed_up() {
        let server = server();
        let now = Instant::now();
        server.known().ejected_until = Some(now + Duration::from_secs(30));
        for _ in 0..5 {
            server.checked(true, 2, 2);
        }
        assert!(!server.healthy(Instant::now()));
    }
}
