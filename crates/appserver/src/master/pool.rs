//! Idle workers and the bounded queue of requests waiting for one.
//!
//! A request only ever goes to an idle worker. When none is idle it waits in a FIFO queue of
//! bounded length and for a bounded time; a released worker goes straight to the oldest
//! waiter. Idle workers are reused last-in first-out, which keeps the hottest caches in use,
//! newest generation first.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use super::conn::WorkerConn;

/// A worker's state, as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    Busy,
    /// Serving until its replacement is ready.
    Retiring,
}

/// One worker in `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    pub id: u32,
    pub pid: u32,
    pub generation: u32,
    pub state: WorkerState,
    pub requests: u64,
    #[serde(skip)]
    busy: bool,
    #[serde(skip)]
    retiring: bool,
    /// When the request the worker is serving passes `app.timeout`.
    #[serde(skip)]
    deadline: Option<Instant>,
    /// The watchdog found it past its deadline and killed it.
    #[serde(skip)]
    timed_out: bool,
}

/// Why a request got no worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The queue is at its configured length.
    Full,
    /// No worker became idle within the queue timeout.
    Timeout,
    /// The app server is shutting down.
    Closed,
}

#[derive(Default)]
struct State {
    idle: Vec<WorkerConn>,
    waiters: VecDeque<oneshot::Sender<WorkerConn>>,
    workers: BTreeMap<u32, WorkerInfo>,
    /// Busy workers whose replacement is ready: closed when released.
    replaced: HashSet<u32>,
    closed: bool,
    queue_length: usize,
    queue_timeout: Duration,
    /// `app.timeout`: how long a worker may hold one request.
    timeout: Duration,
}

/// The pool of workers of every generation.
pub struct Pool {
    state: Mutex<State>,
}

impl Pool {
    pub fn new(queue_length: usize, queue_timeout: Duration, timeout: Duration) -> Self {
        let pool = Self {
            state: Mutex::default(),
        };
        pool.set_limits(queue_length, queue_timeout, timeout);
        pool
    }

    /// Puts new queue limits and request timeout in force (a reload may change them).
    pub fn set_limits(&self, queue_length: usize, queue_timeout: Duration, timeout: Duration) {
        let mut state = self.lock();
        state.queue_length = queue_length;
        state.queue_timeout = queue_timeout;
        state.timeout = timeout;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover the data if something ever does.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for an idle worker.
    pub async fn acquire(&self) -> Result<WorkerConn, Rejected> {
        let (rx, queue_timeout) = {
            let mut state = self.lock();
            if state.closed {
                return Err(Rejected::Closed);
            }
            if let Some(worker) = take_idle(&mut state.idle) {
                self.mark(&mut state, worker.id, true);
                return Ok(worker);
            }
            if state.waiters.len() >= state.queue_length {
                state.waiters.retain(|tx| !tx.is_closed());
                if state.waiters.len() >= state.queue_length {
                    return Err(Rejected::Full);
                }
            }
            let (tx, rx) = oneshot::channel();
            state.waiters.push_back(tx);
            (rx, state.queue_timeout)
        };
        let mut waiter = Waiter {
            pool: self,
            rx: Some(rx),
        };
        let rx = waiter.rx.as_mut().expect("set above");
        let result = match tokio::time::timeout(queue_timeout, rx).await {
            Ok(Ok(worker)) => Ok(worker),
            Ok(Err(_)) => Err(Rejected::Closed),
            Err(_) => Err(Rejected::Timeout),
        };
        waiter.rx = None;
        result
    }

    /// Adds a newly connected worker.
    pub fn add(&self, worker: WorkerConn) {
        {
            let mut state = self.lock();
            state.workers.insert(
                worker.id,
                WorkerInfo {
                    id: worker.id,
                    pid: worker.pid,
                    generation: worker.generation,
                    state: WorkerState::Busy,
                    requests: 0,
                    busy: true,
                    retiring: false,
                    deadline: None,
                    timed_out: false,
                },
            );
        }
        self.release(worker);
    }

    /// Returns a worker after a complete exchange: to the oldest waiter, else to the idle set.
    pub fn release(&self, mut worker: WorkerConn) {
        let mut state = self.lock();
        if let Some(info) = state.workers.get_mut(&worker.id) {
            info.requests = worker.served;
        }
        if state.closed
            || state.replaced.remove(&worker.id)
            || !state.workers.contains_key(&worker.id)
        {
            state.workers.remove(&worker.id);
            return; // Dropping the connection tells the worker to exit.
        }
        while let Some(waiter) = state.waiters.pop_front() {
            let id = worker.id;
            match waiter.send(worker) {
                Ok(()) => return self.mark(&mut state, id, true),
                Err(back) => worker = back,
            }
        }
        self.mark(&mut state, worker.id, false);
        state.idle.push(worker);
    }

    /// Marks a worker for recycling; true the first time.
    pub fn mark_retiring(&self, id: u32) -> bool {
        let mut state = self.lock();
        match state.workers.get_mut(&id) {
            Some(info) if !info.retiring => {
                info.retiring = true;
                info.state = WorkerState::Retiring;
                true
            }
            _ => false,
        }
    }

    /// Closes a worker whose replacement is ready: now if idle, else when released.
    pub fn retire(&self, id: u32) {
        let mut state = self.lock();
        if let Some(i) = state.idle.iter().position(|w| w.id == id) {
            state.idle.swap_remove(i);
            state.workers.remove(&id);
        } else if state.workers.contains_key(&id) {
            state.replaced.insert(id);
        }
    }

    /// Forgets a worker that died; true if it was known (so exactly one caller replaces it).
    pub fn remove(&self, id: u32) -> bool {
        let mut state = self.lock();
        state.idle.retain(|w| w.id != id);
        state.replaced.remove(&id);
        state.workers.remove(&id).is_some()
    }

    /// The id of the live worker with `pid`.
    pub fn id_of_pid(&self, pid: u32) -> Option<u32> {
        self.lock()
            .workers
            .values()
            .find(|w| w.pid == pid)
            .map(|w| w.id)
    }

    /// Busy workers past their deadline, each reported once: the watchdog kills them.
    pub fn expired(&self, now: Instant) -> Vec<WorkerInfo> {
        let mut state = self.lock();
        let mut expired = Vec::new();
        for info in state.workers.values_mut() {
            if info.busy && !info.timed_out && info.deadline.is_some_and(|d| d <= now) {
                info.timed_out = true;
                expired.push(info.clone());
            }
        }
        expired
    }

    /// Whether the watchdog killed this worker for passing its deadline.
    pub fn timed_out(&self, id: u32) -> bool {
        self.lock().workers.get(&id).is_some_and(|w| w.timed_out)
    }

    /// Every known worker.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.lock().workers.values().cloned().collect()
    }

    /// Whether the pool serves (open, with workers connected) and how many workers are free.
    pub fn readiness(&self) -> strata_core::Ready {
        let state = self.lock();
        let free = state
            .workers
            .values()
            .filter(|w| matches!(w.state, WorkerState::Idle))
            .count();
        strata_core::Ready {
            ready: !state.closed && !state.workers.is_empty(),
            free,
        }
    }

    /// Requests waiting for a worker.
    pub fn queued(&self) -> usize {
        self.lock()
            .waiters
            .iter()
            .filter(|tx| !tx.is_closed())
            .count()
    }

    /// Stops handing out workers; idle ones are closed now, busy ones when released.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.idle.clear();
        state.waiters.clear();
    }
}

/// The most recently idle worker of the newest generation: during a reload, requests go to
/// the new code as soon as one of its workers is ready.
fn take_idle(idle: &mut Vec<WorkerConn>) -> Option<WorkerConn> {
    let newest = idle.iter().map(|w| w.generation).max()?;
    let at = idle.iter().rposition(|w| w.generation == newest)?;
    Some(idle.remove(at))
}

/// A place in the queue. If the request gives up (timeout, or the client left and its future
/// was dropped) just as a worker was handed to it, the worker goes back to the pool instead of
/// being dropped with the channel.
struct Waiter<'a> {
    pool: &'a Pool,
    rx: Option<oneshot::Receiver<WorkerConn>>,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            if let Ok(worker) = rx.try_recv() {
                self.pool.release(worker);
            }
        }
    }
}

impl Pool {
    /// Records a worker handed out (its request's deadline starts now) or given back.
    fn mark(&self, state: &mut State, id: u32, busy: bool) {
        if let Some(info) = state.workers.get_mut(&id) {
            info.busy = busy;
            info.deadline = busy.then(|| Instant::now() + state.timeout);
            if !info.retiring {
                info.state = if busy {
                    WorkerState::Busy
                } else {
                    WorkerState::Idle
                };
            }
        }
    }
}
