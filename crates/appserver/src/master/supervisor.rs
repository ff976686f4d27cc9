//! The supervisor: keeps the configured number of workers alive, replaces crashed, stuck and
//! recycled workers, rolls a new generation in on reload, and stops everything on shutdown.
//!
//! It is one task that owns the zygotes' control channels and the socket workers connect to;
//! the rest of the master talks to it through [`Event`]s. A reload starts a zygote of the next
//! generation beside the running one; only when it is warm are old workers replaced, each by a
//! new worker that is ready before the old one is retired, so capacity never drops.
//!
//! # Reload, step by step
//!
//! SIGHUP, `POST /reload` on the admin listener and `strata reload` all go through the binary's
//! `Reloader` to `AppServer::reload`, which asks the supervisor for generation N+1:
//!
//! 1. A new zygote starts beside the running one, imports the current code and warms it. If that
//!    fails, the traceback goes to the log, to `last_reload` in `/status` and back to the caller;
//!    the running generation was never touched.
//! 2. The new zygote becomes current: every fork from now on (crash replacements included) comes
//!    from it. Old workers are replaced `app.reload_surge` at a time, each by a new worker that has
//!    said hello before the old one is retired; a retired worker finishes its in-flight request
//!    first. Old and new workers take from the same queue until the old ones are retired.
//! 3. When no old worker is left, the pool is grown or shrunk to the new `app.workers`; once
//!    every retired worker has finished its last request and exited (`Event::Left`), the old
//!    zygotes are told to quit (each exits once its last worker has), and the caller hears the
//!    new generation number: no old code runs after a reload reports success.
//!
//! The binary's `Reloader` (crates/strata/src/reload.rs) re-reads the configuration from the
//! same sources before each reload and passes the new `[app]` section along; the app server puts
//! it in force when the new generation's zygote is warm (`Shared::set_config`), so a failed
//! reload changes no setting either. Keys outside `[app]` that changed are reported as needing a
//! restart.
//!
//! If the current zygote dies (killed, out of memory), its workers keep serving and the supervisor
//! starts a new generation the same way, retrying every 5 s until one is warm, so worker crashes
//! can be repaired again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};
use tokio::net::UnixListener;
use tokio::sync::oneshot;

use super::dispatch::watch;
use super::pool::WorkerConn;
use super::zygote::{hello, Zygote};
use super::{ReloadState, Shared, StartError};
use crate::control::{FromZygote, ToZygote};
use crate::AppConfig;

/// Why a worker was replaced, for logs and `strata_app_worker_restarts_total{cause}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Crash,
    Timeout,
    MaxRequests,
    Memory,
    Reload,
}

impl Cause {
    pub const ALL: [Cause; 5] = [
        Cause::Crash,
        Cause::Timeout,
        Cause::MaxRequests,
        Cause::Memory,
        Cause::Reload,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Cause::Crash => "crash",
            Cause::Timeout => "timeout",
            Cause::MaxRequests => "max_requests",
            Cause::Memory => "memory",
            Cause::Reload => "reload",
        }
    }
}

/// The outcome of a reload: the new generation, or why the old one still serves.
pub type ReloadResult = Result<u32, String>;

/// Requests to the supervisor.
pub enum Event {
    /// Fork a worker; once it is ready, retire `replaces`. Forks after crashes are throttled.
    Fork {
        replaces: Option<u32>,
        after_crash: bool,
    },
    /// A worker died or was killed and has been forgotten; replace it unless a replacement is
    /// already on its way.
    Lost { id: u32, after_crash: bool },
    /// A retired worker has exited and been forgotten.
    Left { id: u32 },
    /// A worker connected and said hello.
    Connected(WorkerConn),
    /// A zygote's message; `None` when it exited.
    Zygote {
        generation: u32,
        message: Option<FromZygote>,
    },
    /// Start a new generation (with new settings, if given); `done` hears when every worker
    /// runs it (or why not).
    Reload {
        config: Option<AppConfig>,
        done: oneshot::Sender<ReloadResult>,
    },
    /// The zygote of a new generation is warm, or failed.
    Started(Result<Zygote, StartError>),
    /// Stop the zygotes and every worker; `force` kills busy workers too.
    Stop {
        force: bool,
        done: oneshot::Sender<()>,
    },
}

/// Signals a stuck worker: SIGUSR1 makes it print every thread's Python stack, SIGKILL follows.
pub fn kill_stuck(pid: u32) {
    let Some(pid) = Pid::from_raw(pid as i32) else {
        return;
    };
    let _ = kill_process(pid, Signal::USR1);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = kill_process(pid, Signal::KILL);
    });
}

/// A reload in progress.
struct Rollout {
    generation: u32,
    /// Old workers whose replacement is being forked.
    in_flight: HashSet<u32>,
    /// Whether the worker count was brought to the new `app.workers`.
    resized: bool,
    /// Workers forked to grow the pool, not yet connected.
    extra: HashSet<u32>,
    done: Option<oneshot::Sender<ReloadResult>>,
}

/// The supervisor's state.
struct Supervisor {
    shared: Arc<Shared>,
    zygotes: BTreeMap<u32, Zygote>,
    /// The generation new workers are forked from.
    current: u32,
    next_id: u32,
    /// Forks in flight: worker id → the worker it replaces.
    pending: HashMap<u32, Option<u32>>,
    /// Forked but not yet connected: pid → worker id.
    forked: HashMap<u32, u32>,
    /// Old workers already retired (closed once idle).
    retired: HashSet<u32>,
    crashes: CrashThrottle,
    /// A new generation's zygote is starting with these settings; the caller waits here.
    starting: Option<(Arc<AppConfig>, oneshot::Sender<ReloadResult>)>,
    rollout: Option<Rollout>,
}

/// Runs until stopped.
pub async fn supervise(
    shared: Arc<Shared>,
    zygote: Zygote,
    listener: UnixListener,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    next_id: u32,
) {
    let mut supervisor = Supervisor {
        current: zygote.generation,
        zygotes: BTreeMap::from([(zygote.generation, zygote)]),
        shared,
        next_id,
        pending: HashMap::new(),
        forked: HashMap::new(),
        retired: HashSet::new(),
        crashes: CrashThrottle::default(),
        starting: None,
        rollout: None,
    };
    let mut rss_tick = tokio::time::interval(Duration::from_secs(1));
    let mut watchdog = tokio::time::interval(Duration::from_millis(100));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Stop { force, done }) => {
                    supervisor.stop(force).await;
                    let _ = done.send(());
                    return;
                }
                Some(event) => supervisor.handle(event).await,
                None => return,
            },
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = supervisor.shared.clone();
                    tokio::spawn(async move {
                        match hello(stream, &shared).await {
                            Ok(worker) => {
                                let _ = shared.events.send(Event::Connected(worker));
                            }
                            Err(error) => tracing::warn!(%error, "a worker failed to say hello"),
                        }
                    });
                }
                Err(error) => tracing::warn!(%error, "worker socket accept failed"),
            },
            _ = rss_tick.tick(), if supervisor.shared.config().max_rss_mb > 0 => {
                check_memory(&supervisor.shared)
            }
            _ = watchdog.tick() => {
                kill_expired(&supervisor.shared);
                let dispatch = &supervisor.shared.dispatch;
                dispatch.expire_overdue(supervisor.shared.config().queue_timeout);
                dispatch.unjam();
                if dispatch.queue().has_answers() {
                    super::collect::drain(&supervisor.shared, &mut Vec::new());
                }
            }
        }
    }
}

impl Supervisor {
    async fn handle(&mut self, event: Event) {
        match event {
            Event::Fork {
                replaces,
                after_crash,
            } => {
                if after_crash {
                    if let Some(delay) = self.crashes.delay() {
                        tracing::warn!(?delay, "workers keep crashing; delaying the next fork");
                        let events = self.shared.events.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = events.send(Event::Fork {
                                replaces,
                                after_crash: false,
                            });
                        });
                        return;
                    }
                }
                self.fork(replaces).await;
            }
            Event::Left { id } => {
                self.retired.remove(&id);
                self.advance_rollout().await;
            }
            Event::Lost { id, after_crash } => {
                if let Some(rollout) = &mut self.rollout {
                    rollout.in_flight.remove(&id);
                }
                let replacement_pending = self.pending.values().any(|r| *r == Some(id));
                if !replacement_pending {
                    let _ = self.shared.events.send(Event::Fork {
                        replaces: None,
                        after_crash,
                    });
                }
                self.advance_rollout().await;
            }
            Event::Connected(worker) => self.connected(worker).await,
            Event::Zygote {
                generation,
                message,
            } => self.zygote_message(generation, message).await,
            Event::Reload { config, done } => self.reload(config, done),
            Event::Started(result) => self.started(result).await,
            Event::Stop { .. } => unreachable!("handled by the loop"),
        }
    }

    /// Asks the current zygote for a worker; returns its id.
    async fn fork(&mut self, replaces: Option<u32>) -> u32 {
        self.next_id += 1;
        let id = self.next_id;
        self.pending.insert(id, replaces);
        let sent = match self.zygotes.get_mut(&self.current) {
            Some(zygote) => zygote.send(&ToZygote::Fork { id }).await.is_ok(),
            None => false,
        };
        if !sent {
            self.pending.remove(&id);
            tracing::error!("cannot fork a worker: the zygote is gone");
        }
        id
    }

    async fn connected(&mut self, worker: WorkerConn) {
        self.forked.remove(&worker.pid);
        let replaces = self.pending.remove(&worker.id).flatten();
        if let Some(rollout) = &mut self.rollout {
            rollout.extra.remove(&worker.id);
        }
        tracing::info!(
            worker = worker.id,
            pid = worker.pid,
            generation = worker.generation,
            "worker ready"
        );
        self.shared.pool.add(&worker);
        watch(self.shared.clone(), worker);
        if let Some(old) = replaces {
            self.retire(old);
        }
        self.advance_rollout().await;
    }

    /// Retires worker `old`; it stays in `retired` until it has left (`Event::Left`), unless
    /// it is gone already.
    fn retire(&mut self, old: u32) {
        if self.shared.pool.retire(old) {
            self.retired.insert(old);
        }
        if let Some(rollout) = &mut self.rollout {
            rollout.in_flight.remove(&old);
        }
    }

    async fn zygote_message(&mut self, generation: u32, message: Option<FromZygote>) {
        match message {
            Some(FromZygote::Exited { pid, status }) => self.worker_exited(pid, status),
            Some(FromZygote::Forked { id, pid }) => {
                tracing::debug!(worker = id, pid, "worker forked");
                // The worker may have said hello already; then it is not in flight.
                if self.pending.contains_key(&id) {
                    self.forked.insert(pid, id);
                }
            }
            Some(other) => tracing::debug!(?other, "zygote message"),
            None => {
                if let Some(zygote) = self.zygotes.remove(&generation) {
                    tokio::spawn(zygote.finish(Duration::from_secs(5)));
                }
                if generation == self.current {
                    tracing::error!(generation, "the zygote exited; starting a new generation");
                    self.replace_zygote();
                } else {
                    tracing::info!(generation, "the old generation's zygote exited");
                }
            }
        }
    }

    fn worker_exited(&mut self, pid: u32, status: String) {
        if let Some(id) = self.shared.pool.id_of_pid(pid) {
            tracing::warn!(worker = id, pid, %status, "worker exited unexpectedly");
            self.shared.worker_gone(id, Cause::Crash);
            return;
        }
        match self.forked.remove(&pid) {
            // It died between fork and hello: nobody else will replace it.
            Some(id) => {
                tracing::warn!(worker = id, pid, %status, "worker exited before it was ready");
                let replaces = self.pending.remove(&id).flatten();
                if let Some(rollout) = &mut self.rollout {
                    rollout.extra.remove(&id);
                }
                self.shared.metrics.restart(Cause::Crash);
                let _ = self.shared.events.send(Event::Fork {
                    replaces,
                    after_crash: true,
                });
            }
            None if status == "exit code 0" => tracing::debug!(pid, %status, "worker exited"),
            None => tracing::warn!(pid, %status, "worker exited"),
        }
    }

    /// The current zygote died (killed, out of memory): without it no worker can be replaced,
    /// so a new generation is started and rolled in, retried every few seconds until it works.
    fn replace_zygote(&mut self) {
        let (done, outcome) = oneshot::channel();
        self.reload(None, done);
        let events = self.shared.events.clone();
        let generation = self.current;
        tokio::spawn(async move {
            match outcome.await {
                Ok(Ok(new)) => tracing::info!(generation = new, "zygote replaced"),
                _ => {
                    tracing::error!("could not replace the zygote; retrying in 5s");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let _ = events.send(Event::Zygote {
                        generation,
                        message: None,
                    });
                }
            }
        });
    }

    /// Starts the next generation's zygote in the background; the old one keeps serving.
    fn reload(&mut self, config: Option<AppConfig>, done: oneshot::Sender<ReloadResult>) {
        if self.starting.is_some() || self.rollout.is_some() {
            let _ = done.send(Err("a reload is already in progress".into()));
            return;
        }
        let generation = self.zygotes.keys().max().copied().unwrap_or(self.current) + 1;
        tracing::info!(generation, "reload: starting a new generation");
        self.shared.set_reload(ReloadState::Starting { generation });
        let config = config.map_or_else(|| self.shared.config(), Arc::new);
        let spec = self.shared.spec(generation, AppConfig::clone(&config));
        self.starting = Some((config, done));
        let events = self.shared.events.clone();
        tokio::spawn(async move {
            let _ = events.send(Event::Started(Zygote::start(&spec).await));
        });
    }

    async fn started(&mut self, result: Result<Zygote, StartError>) {
        let (config, done) = match self.starting.take() {
            Some((config, done)) => (Some(config), Some(done)),
            None => (None, None),
        };
        let mut zygote = match result {
            Ok(zygote) => zygote,
            Err(error) => {
                let error = error.to_string();
                tracing::error!("reload failed; the running generation keeps serving:\n{error}");
                self.shared.set_reload(ReloadState::Failed {
                    error: error.clone(),
                });
                if let Some(done) = done {
                    let _ = done.send(Err(error));
                }
                return;
            }
        };
        let generation = zygote.generation;
        if let Some(config) = config {
            self.shared.set_config(AppConfig::clone(&config));
        }
        zygote.forward_messages(self.shared.events.clone());
        self.zygotes.insert(generation, zygote);
        self.current = generation;
        self.shared.set_generation(generation);
        self.shared.set_reload(ReloadState::Rolling { generation });
        tracing::info!(generation, "reload: new generation warm; replacing workers");
        self.rollout = Some(Rollout {
            generation,
            in_flight: HashSet::new(),
            resized: false,
            extra: HashSet::new(),
            done,
        });
        self.advance_rollout().await;
    }

    /// Replaces old-generation workers, `reload_surge` at a time; when none is left, retires the
    /// old zygotes and reports the reload done.
    async fn advance_rollout(&mut self) {
        let Some(rollout) = &self.rollout else { return };
        let generation = rollout.generation;
        let surge = self.shared.config().reload_surge.max(1);
        let mut in_flight = rollout.in_flight.len();
        let old: Vec<u32> = self
            .shared
            .pool
            .workers()
            .into_iter()
            .filter(|w| w.generation < generation && !self.retired.contains(&w.id))
            .filter(|w| !rollout.in_flight.contains(&w.id))
            .map(|w| w.id)
            .collect();
        let mut to_start = Vec::new();
        for id in old.iter().copied() {
            if in_flight >= surge {
                break;
            }
            to_start.push(id);
            in_flight += 1;
        }
        if old.is_empty() && in_flight == 0 {
            if !rollout.resized {
                let extra = self.resize().await;
                let rollout = self.rollout.as_mut().expect("checked above");
                rollout.resized = true;
                rollout.extra = extra;
            }
            if self.rollout.as_ref().is_some_and(|r| !r.extra.is_empty()) {
                return; // Waiting for the added workers.
            }
            if !self.retired.is_empty() {
                // Waiting for the retired workers to finish their last requests and leave:
                // once the reload is reported done, no old code is running.
                return;
            }
            let rollout = self.rollout.take().expect("checked above");
            for (gen, zygote) in self.zygotes.iter_mut() {
                if *gen < generation {
                    let _ = zygote.send(&ToZygote::Quit).await;
                }
            }
            tracing::info!(generation, "reload complete");
            self.shared.set_reload(ReloadState::Done { generation });
            if let Some(done) = rollout.done {
                let _ = done.send(Ok(generation));
            }
            return;
        }
        for id in to_start {
            if let Some(rollout) = &mut self.rollout {
                rollout.in_flight.insert(id);
            }
            self.shared.metrics.restart(Cause::Reload);
            self.fork(Some(id)).await;
        }
    }

    /// Brings the number of workers to `app.workers` after a reload changed it; returns the
    /// ids of the workers it forked.
    async fn resize(&mut self) -> HashSet<u32> {
        let target = self.shared.config().workers;
        let live: Vec<u32> = self
            .shared
            .pool
            .workers()
            .into_iter()
            .filter(|w| !self.retired.contains(&w.id))
            .map(|w| w.id)
            .collect();
        let count = live.len() + self.pending.len();
        let mut forked = HashSet::new();
        for _ in count..target {
            forked.insert(self.fork(None).await);
        }
        for id in live.into_iter().take(count.saturating_sub(target)) {
            self.retire(id);
        }
        forked
    }

    async fn stop(&mut self, force: bool) {
        self.shared.dispatch.close();
        if force {
            for worker in self.shared.pool.workers() {
                if let Some(pid) = Pid::from_raw(worker.pid as i32) {
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
        }
        let wait = if force {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(10)
        };
        for (_, mut zygote) in std::mem::take(&mut self.zygotes) {
            let _ = zygote.send(&ToZygote::Quit).await;
            zygote.finish(wait).await;
        }
    }
}

/// Slows re-forking when workers crash in a loop (a bad deploy, a poisoned request), so the
/// zygote does not spin: five crashes within ten seconds delay each further fork by a second.
#[derive(Default)]
struct CrashThrottle {
    recent: std::collections::VecDeque<tokio::time::Instant>,
}

impl CrashThrottle {
    const WINDOW: Duration = Duration::from_secs(10);
    const BURST: usize = 5;

    fn delay(&mut self) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        self.recent
            .retain(|at| now.duration_since(*at) < Self::WINDOW);
        self.recent.push_back(now);
        (self.recent.len() > Self::BURST).then_some(Duration::from_secs(1))
    }
}

/// Kills workers whose request passed `app.timeout`, after asking for their Python stack.
/// One timer for all workers, instead of one per request on the hot path.
fn kill_expired(shared: &Shared) {
    for worker in shared.pool.expired(shared.config().timeout) {
        tracing::error!(
            worker = worker.id,
            pid = worker.pid,
            "a request passed the {} timeout; the worker's Python stack follows, then it is killed",
            strata_core::duration::format(shared.config().timeout)
        );
        kill_stuck(worker.pid);
    }
}

/// Recycles workers whose resident memory passed `max_rss_mb`.
fn check_memory(shared: &Shared) {
    let limit = shared.config().max_rss_mb * 1024 * 1024;
    for worker in shared.pool.workers() {
        let Some(rss) = resident_bytes(worker.pid) else {
            continue;
        };
        if rss > limit && shared.pool.mark_retiring(worker.id) {
            tracing::info!(
                worker = worker.id,
                rss_mb = rss / (1024 * 1024),
                "recycling worker over app.max_rss_mb"
            );
            shared.recycle(worker.id, Cause::Memory);
        }
    }
}

/// Resident set size of `pid` in bytes.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::super::zygote::request_limit;
    use super::*;

    #[test]
    fn crash_throttle_delays_after_a_burst() {
        let mut throttle = CrashThrottle::default();
        for _ in 0..CrashThrottle::BURST {
            assert_eq!(throttle.delay(), None);
        }
        assert_eq!(throttle.delay(), Some(Duration::from_secs(1)));
    }

    #[test]
    fn request_limit_adds_jitter_within_bounds() {
        let mut config = crate::AppConfig::default();
        assert_eq!(request_limit(&config, 1), u64::MAX);
        config.max_requests = 100;
        config.max_requests_jitter = 10;
        let limits: Vec<u64> = (0..50).map(|id| request_limit(&config, id)).collect();
        assert!(limits.iter().all(|l| (100..=110).contains(l)));
        assert!(
            limits.iter().any(|l| *l != limits[0]),
            "jitter varies between workers"
        );
    }
}
