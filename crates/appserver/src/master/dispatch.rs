//! Requests on their way to a worker: the master's side of the shared queue.
//!
//! An exchange submits its request frame and holds a [`Ticket`]. The request waits in the
//! shared ring until an idle worker takes it; that worker opens its reply with `BEGIN id`.
//! While a worker is idle its socket is held by a watcher task, which reads that `BEGIN` and
//! hands the connection to the ticket's exchange (sending the request over the socket first
//! if it was too large for a cell). When the exchange is done, the connection goes back to a
//! watcher. A watcher that sees the socket close instead answers the request the worker's
//! slot says it held (502, or 504 if the watchdog killed it) and has the worker replaced.
//!
//! A worker whose response was whole and never touched its socket writes it to its answer
//! ring instead (no `BEGIN`); the collector task drains the rings when the doorbell rings and
//! hands each answer to its ticket.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::exchange::{self, Failure};
use super::pool::{Rejected, WorkerConn};
use super::supervisor::{kill_stuck, Cause};
use super::Shared;
use crate::proto::{kind, ProtoError};
use crate::queue::{self, monotonic_nanos, Answer, Queue, QueueError};

/// What a waiting exchange is given.
pub enum Handoff {
    /// No worker took the request within `queue_timeout`.
    Expired,
    /// The worker that took the request, and when the request's `app.timeout` runs out.
    Worker(WorkerConn, Instant),
    /// The whole response, as frames, from a worker's answer ring.
    Answer(Vec<u8>),
    /// The worker that took the request died (or was killed) before answering.
    Gone(Failure),
    /// The app server shut down before a worker took it.
    Closed,
}

/// A request in the shared ring or held by a worker that has not answered yet.
struct Pending {
    tx: oneshot::Sender<Handoff>,
    pos: u64,
    queued: Instant,
    /// The frame, when it was too large for a cell.
    fetch: Option<Vec<u8>>,
}

/// The master's side of the shared queue.
pub struct Dispatch {
    queue: Arc<Queue>,
    /// The region, as workers map it (sent to each at its hello).
    fd: OwnedFd,
    /// The pipe workers write a byte to when an answer is waiting and the collector sleeps;
    /// its read end, until the collector takes it.
    doorbell: OwnedFd,
    doorbell_reader: Mutex<Option<OwnedFd>>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    slots: Arc<Slots>,
    /// A cell the watchdog found held by a taker that never released it: its position and
    /// when it was first seen.
    stuck: Mutex<Option<(u64, Instant)>>,
    /// Held while answer rings are read: each ring has one reader at a time.
    answers: Mutex<()>,
}

impl Dispatch {
    /// Makes the shared region, sized for `queue_length` waiting requests (and at least 64,
    /// so a short queue still leaves room for requests on their way to idle workers).
    pub fn new(queue_length: usize) -> Result<Self, QueueError> {
        let (queue, fd) = Queue::create(queue_length.max(64))?;
        let flags = rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK;
        let (doorbell_reader, doorbell) = rustix::pipe::pipe_with(flags)?;
        Ok(Self {
            queue: Arc::new(queue),
            fd,
            doorbell,
            doorbell_reader: Mutex::new(Some(doorbell_reader)),
            pending: Mutex::default(),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            slots: Arc::new(Slots {
                free: Mutex::new((0..queue::SLOTS as u32).rev().collect()),
            }),
            stuck: Mutex::default(),
            answers: Mutex::default(),
        })
    }

    pub fn queue(&self) -> &Arc<Queue> {
        &self.queue
    }

    /// The descriptor a new worker maps the region from.
    pub fn region(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The doorbell a new worker rings for its answers.
    pub fn doorbell(&self) -> std::os::fd::BorrowedFd<'_> {
        self.doorbell.as_fd()
    }

    /// The doorbell's read end, for the collector (once).
    pub fn take_doorbell_reader(&self) -> Option<OwnedFd> {
        self.doorbell_reader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A free slot for a new worker, cleared.
    pub fn slot(&self) -> Option<Slot> {
        let index = self
            .slots
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()?;
        self.queue.reset_slot(index);
        Some(Slot {
            slots: self.slots.clone(),
            index,
        })
    }

    /// Whether requests are still taken.
    pub fn is_open(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// Requests waiting for a worker.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The right to read answer rings (the collector, the supervisor's tick, a watcher whose
    /// worker exited), one at a time.
    pub fn answer_reader(&self) -> std::sync::MutexGuard<'_, ()> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the pending request a worker says it took.
    fn claim(&self, id: u64) -> Option<Pending> {
        self.lock().remove(&id)
    }

    /// Hands a worker's answer to its exchange (none if the client left).
    pub fn deliver(&self, answer: Answer, frames: Vec<u8>, metrics: &super::Metrics) {
        if let Some(pending) = self.claim(answer.id) {
            metrics
                .queue_wait
                .observe(instant_of(answer.started).saturating_duration_since(pending.queued));
            let _ = pending.tx.send(Handoff::Answer(frames));
        }
    }

    /// Gives up a request no worker has taken; true if it will never run.
    fn expire(&self, id: u64, pos: u64) -> bool {
        let mut pending = self.lock();
        if self.queue.expire(pos, id) {
            pending.remove(&id);
            return true;
        }
        false
    }

    /// Answers 503 to requests no worker took within `queue_timeout` (called by the
    /// supervisor's 100 ms tick, so the wait is bounded to within a tick).
    pub fn expire_overdue(&self, queue_timeout: Duration) {
        let Some(cutoff) = Instant::now().checked_sub(queue_timeout) else {
            return;
        };
        let mut pending = self.lock();
        let overdue: Vec<u64> = pending
            .iter()
            .filter(|(id, p)| p.queued <= cutoff && self.queue.expire(p.pos, **id))
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some(p) = pending.remove(&id) {
                let _ = p.tx.send(Handoff::Expired);
            }
        }
    }

    /// Stops taking requests: waiting ones are answered 503, workers leave once idle.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let mut pending = self.lock();
        let expired: Vec<u64> = pending
            .iter()
            .filter(|(id, p)| self.queue.expire(p.pos, **id))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(p) = pending.remove(&id) {
                let _ = p.tx.send(Handoff::Closed);
            }
        }
        drop(pending);
        self.queue.close();
    }

    /// Releases the ring's next cell if a worker died while taking it and the watchdog has
    /// seen it held for a second (a live taker holds a cell for microseconds).
    pub fn unjam(&self) {
        let mut stuck = self.stuck.lock().unwrap_or_else(|p| p.into_inner());
        match (self.queue.stuck(), *stuck) {
            (Some(pos), Some((seen, since)))
                if pos == seen && since.elapsed() >= Duration::from_secs(1) =>
            {
                tracing::warn!(pos, "releasing a queue cell left by a worker that died");
                self.queue.release_stuck(pos);
                *stuck = None;
            }
            (Some(pos), Some((seen, _))) if pos == seen => {}
            (Some(pos), _) => *stuck = Some((pos, Instant::now())),
            (None, _) => *stuck = None,
        }
    }
}

/// Free worker slots.
struct Slots {
    free: Mutex<Vec<u32>>,
}

/// A worker's slot in the shared region, freed when its connection is dropped.
pub struct Slot {
    slots: Arc<Slots>,
    index: u32,
}

impl Slot {
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.index);
    }
}

/// An exchange's place in the shared queue. Dropped before a worker was handed over (the
/// client left), it expires the request, or, if a worker took it already, lets the watcher
/// finish that exchange without a client.
pub struct Ticket {
    shared: Arc<Shared>,
    id: u64,
    pos: u64,
    rx: Option<oneshot::Receiver<Handoff>>,
}

impl Ticket {
    /// Queues a request frame (header included): a cell carries its payload, the socket the
    /// whole frame when the payload is too large for a cell.
    pub fn submit(shared: &Arc<Shared>, frame: &[u8], limit: usize) -> Result<Self, Rejected> {
        let payload = &frame[5..];
        let dispatch = &shared.dispatch;
        if !dispatch.is_open() {
            return Err(Rejected::Closed);
        }
        // Requests on their way to idle workers do not count against the limit.
        let queued = dispatch.queue.len();
        if queued >= limit && queued >= limit + shared.pool.idle() {
            return Err(Rejected::Full);
        }
        let id = dispatch.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        // Registered before it is pushed: a worker on another core may answer at once.
        let mut pending = dispatch.lock();
        let pos = match dispatch.queue.push(id, payload) {
            Ok(pos) => pos,
            Err(queue::Full) => return Err(Rejected::Full),
        };
        pending.insert(
            id,
            Pending {
                tx,
                pos,
                queued: Instant::now(),
                fetch: (payload.len() > queue::CELL_DATA).then(|| frame.to_vec()),
            },
        );
        drop(pending);
        Ok(Self {
            shared: shared.clone(),
            id,
            pos,
            rx: Some(rx),
        })
    }

    /// Waits for the worker that takes the request. No timer per request: the supervisor's
    /// tick expires requests queued past `queue_timeout` ([`Dispatch::expire_overdue`]);
    /// once a worker has one, `app.timeout` and the watchdog bound the wait.
    pub async fn wait(mut self) -> Result<Handoff, Rejected> {
        let rx = self.rx.as_mut().expect("waited once");
        let result = (&mut *rx).await.map_err(|_| Rejected::Closed);
        self.rx = None;
        result
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        if self.shared.dispatch.expire(self.id, self.pos) {
            return;
        }
        rx.close();
        if let Ok(Handoff::Worker(worker, deadline)) = rx.try_recv() {
            exchange::abandon(&self.shared, worker, deadline);
        }
    }
}

/// Holds an idle worker's socket until the worker begins its next exchange or goes away.
pub fn watch(shared: Arc<Shared>, worker: WorkerConn) {
    tokio::spawn(watch_idle(shared, worker));
}

async fn watch_idle(shared: Arc<Shared>, mut worker: WorkerConn) {
    let (id, fetch) = match worker.read_begin().await {
        Ok(begin) => begin,
        Err(error) => return gone(&shared, worker, error),
    };
    let Some(pending) = shared.dispatch.claim(id) else {
        tracing::error!(worker = worker.id, id, "worker began an unknown request");
        kill_stuck(worker.pid);
        return shared.worker_gone(worker.id, Cause::Crash);
    };
    let started = instant_of(shared.dispatch.queue.holding(worker.slot.index()).1);
    shared
        .metrics
        .queue_wait
        .observe(started.saturating_duration_since(pending.queued));
    let deadline = started + shared.config().timeout;
    if fetch {
        let sent = match &pending.fetch {
            Some(frame) => worker.send(frame).await.map_err(ProtoError::from),
            None => Err(ProtoError::UnexpectedKind(kind::BEGIN)),
        };
        if let Err(error) = sent {
            let _ = pending.tx.send(Handoff::Gone(Failure::Died(error)));
            kill_stuck(worker.pid);
            return shared.worker_gone(worker.id, Cause::Crash);
        }
    }
    if let Err(Handoff::Worker(worker, deadline)) =
        pending.tx.send(Handoff::Worker(worker, deadline))
    {
        exchange::abandon(&shared, worker, deadline);
    }
}

/// The `Instant` of a [`monotonic_nanos`] reading (the same clock).
fn instant_of(nanos: u64) -> Instant {
    let age = Duration::from_nanos(monotonic_nanos().saturating_sub(nanos));
    let now = Instant::now();
    now.checked_sub(age).unwrap_or(now)
}

/// An idle worker's socket closed (or carried garbage): answer the request its slot says it
/// held, if it had taken one, and have it replaced.
fn gone(shared: &Shared, worker: WorkerConn, error: ProtoError) {
    // Answers it wrote before it went are delivered before its slot is freed.
    super::collect::drain_slot(shared, worker.slot.index(), &mut Vec::new());
    let timed_out = shared.pool.timed_out(worker.id);
    let (held, _) = shared.dispatch.queue.holding(worker.slot.index());
    if held != 0 {
        if let Some(pending) = shared.dispatch.claim(held) {
            tracing::error!(worker = worker.id, pid = worker.pid, %error, "worker died during a request");
            let failure = if timed_out {
                Failure::TimedOut
            } else {
                Failure::Died(error)
            };
            let _ = pending.tx.send(Handoff::Gone(failure));
        }
    } else if !matches!(&error, ProtoError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof)
    {
        tracing::error!(worker = worker.id, %error, "idle worker sent garbage");
        kill_stuck(worker.pid);
    }
    let cause = if timed_out {
        Cause::Timeout
    } else {
        Cause::Crash
    };
    shared.worker_gone(worker.id, cause);
}
