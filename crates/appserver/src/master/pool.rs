//! The workers the master knows, and what each is doing.
//!
//! Requests do not pass through here: they wait in the shared queue ([`crate::queue`]) and
//! idle workers take them. The pool keeps each worker's identity and its slot in the shared
//! region, which says whether it holds a request and since when; from that come `/status`,
//! readiness, and the watchdog's list of workers past `app.timeout`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

pub use super::conn::WorkerConn;
use crate::queue::{monotonic_nanos, Queue};

/// A worker's state, as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    Busy,
    /// Marked for recycling, or replaced and finishing its last request.
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
    slot: u32,
    /// Recycle after this many requests.
    #[serde(skip)]
    limit: u64,
    /// Marked for recycling: its replacement is on its way.
    #[serde(skip)]
    retiring: bool,
    /// Told to leave: it takes no more requests and is not replaced when it exits.
    #[serde(skip)]
    retired: bool,
    /// The watchdog found it past its deadline and killed it.
    #[serde(skip)]
    timed_out: bool,
}

/// Why a request got no worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// The queue is at its configured length.
    Full,
    /// No worker took it within the queue timeout.
    Timeout,
    /// The app server is shutting down.
    Closed,
}

/// The workers of every generation.
pub struct Pool {
    queue: Arc<Queue>,
    workers: Mutex<BTreeMap<u32, WorkerInfo>>,
}

impl Pool {
    pub fn new(queue: Arc<Queue>) -> Self {
        Self {
            queue,
            workers: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, WorkerInfo>> {
        // Nothing panics while holding the lock; recover the data if something ever does.
        self.workers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a newly connected worker.
    pub fn add(&self, worker: &WorkerConn) {
        self.lock().insert(
            worker.id,
            WorkerInfo {
                id: worker.id,
                pid: worker.pid,
                generation: worker.generation,
                state: WorkerState::Idle,
                requests: 0,
                slot: worker.slot.index(),
                limit: worker.limit,
                retiring: false,
                retired: false,
                timed_out: false,
            },
        );
    }

    /// Counts a request a worker completed; true when that brings it to its limit (once),
    /// so it is to be recycled.
    pub fn completed(&self, id: u32) -> bool {
        let mut workers = self.lock();
        let Some(info) = workers.get_mut(&id) else {
            return false;
        };
        info.requests += 1;
        if info.requests >= info.limit && !info.retiring && !info.retired {
            info.retiring = true;
            return true;
        }
        false
    }

    /// The worker in `slot`.
    pub fn id_of_slot(&self, slot: u32) -> Option<u32> {
        self.lock().values().find(|w| w.slot == slot).map(|w| w.id)
    }

    /// Marks a worker for recycling; true the first time.
    pub fn mark_retiring(&self, id: u32) -> bool {
        match self.lock().get_mut(&id) {
            Some(info) if !info.retiring && !info.retired => {
                info.retiring = true;
                true
            }
            _ => false,
        }
    }

    /// Tells a worker whose replacement is ready to leave once its current request is done;
    /// false if it has already gone.
    pub fn retire(&self, id: u32) -> bool {
        let mut workers = self.lock();
        let Some(info) = workers.get_mut(&id) else {
            return false;
        };
        info.retired = true;
        self.queue.retire(info.slot);
        true
    }

    /// Forgets a worker that exited; whether it had been retired (`None` if it was already
    /// forgotten). One that was serving and not retired needs a replacement.
    pub fn remove(&self, id: u32) -> Option<bool> {
        self.lock().remove(&id).map(|info| info.retired)
    }

    /// The id of the live worker with `pid`.
    pub fn id_of_pid(&self, pid: u32) -> Option<u32> {
        self.lock().values().find(|w| w.pid == pid).map(|w| w.id)
    }

    /// Workers holding one request longer than `timeout`, each reported once: the watchdog
    /// kills them.
    pub fn expired(&self, timeout: Duration) -> Vec<WorkerInfo> {
        let now = monotonic_nanos();
        let timeout = timeout.as_nanos() as u64;
        let mut expired = Vec::new();
        for info in self.lock().values_mut() {
            let (request, since) = self.queue.holding(info.slot);
            if request != 0 && !info.timed_out && now.saturating_sub(since) >= timeout {
                info.timed_out = true;
                expired.push(info.clone());
            }
        }
        expired
    }

    /// Whether the watchdog killed this worker for passing its deadline.
    pub fn timed_out(&self, id: u32) -> bool {
        self.lock().get(&id).is_some_and(|w| w.timed_out)
    }

    /// Every known worker, with its state now.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.lock()
            .values()
            .map(|info| {
                let mut info = info.clone();
                info.state = self.state(&info);
                info
            })
            .collect()
    }

    fn state(&self, info: &WorkerInfo) -> WorkerState {
        if info.retiring || info.retired {
            WorkerState::Retiring
        } else if self.queue.holding(info.slot).0 != 0 {
            WorkerState::Busy
        } else {
            WorkerState::Idle
        }
    }

    /// Workers that hold no request and are not leaving.
    pub fn idle(&self) -> usize {
        self.count_idle(&self.lock())
    }

    fn count_idle(&self, workers: &BTreeMap<u32, WorkerInfo>) -> usize {
        workers
            .values()
            .filter(|w| self.state(w) == WorkerState::Idle)
            .count()
    }

    /// Whether the pool serves (workers connected) and how many workers are free.
    pub fn readiness(&self, open: bool) -> strata_core::Ready {
        let workers = self.lock();
        strata_core::Ready {
            ready: open && !workers.is_empty(),
            free: self.count_idle(&workers),
        }
    }
}
