//! The request queue the master shares with its workers, in one memory region both map.
//!
//! The master puts each request in a ring of cells; an idle worker takes the oldest one
//! itself, so under load a worker goes from one request to the next without the master
//! running in between and without a system call. One slot per worker says which request it
//! holds and since when: the master reads it to attribute a crash (502) or a timeout (504)
//! to the right request, and the watchdog reads it to find stuck workers.
//!
//! The ring is a bounded multi-producer, multi-consumer queue with a sequence number per
//! cell (the master's exchanges produce, workers consume). Each cell also holds a claim word
//! with its request's id: the worker that takes the cell swaps it to 0, and the master, when
//! the request's queue time runs out, compares it with the id and swaps it to 0 too. Exactly
//! one of them wins, so a request either runs or is answered 503, never both.
//!
//! Small complete responses come back the same way ([`answers`]): each worker has a ring of
//! its own that the master drains, so a hello-world request costs the worker no system call
//! at all under load.
//!
//! An idle worker with nothing to take sleeps on a futex word in its slot. A new request
//! wakes one sleeping worker, and only one: the waker moves that worker's word from asleep to
//! woken, so later requests see it counted out and make no system call while it gets going.
//! A request too large for a cell is queued as a marker; the worker then asks for it over
//! its socket.
//!
//! The region's layout, and all the unsafe code that reads it, is in [`region`]; this
//! module and [`answers`] are the protocol, written against typed fields. `model.rs` runs
//! that protocol under loom (the `loom` feature swaps the atomics, see [`sync`]).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

mod answers;
#[cfg(all(test, feature = "loom"))]
mod model;
mod region;

pub use answers::Answer;
use region::Region;
pub use region::{CELL_DATA, MAX_CAPACITY, SLOTS};
use sync::{fence, Ordering};

/// The atomics the queue is written with: the processor's, or loom's in a model.
mod sync {
    #[cfg(feature = "loom")]
    pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64};
    pub use std::sync::atomic::Ordering;
    #[cfg(not(feature = "loom"))]
    pub use std::sync::atomic::{fence, AtomicU32, AtomicU64};
}

#[cfg(all(feature = "loom", not(test)))]
compile_error!(
    "the `loom` feature swaps the queue's atomics for loom's: it is for `cargo test` only"
);

/// The `len` of a cell whose request is fetched over the socket.
const FETCH: u32 = u32::MAX;
/// A worker's sleep word: running, asleep on it, or woken and not yet running.
const RUNNING: u32 = 0;
const ASLEEP: u32 = 1;
const WOKEN: u32 = 2;

/// Why a region could not be made or mapped.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("shared request queue: {0}")]
    Os(#[from] rustix::io::Errno),
    #[error("shared request queue: the region is not one this binary made")]
    Foreign,
}

/// The ring is at its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// A request a worker took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub id: u64,
    /// The frame did not fit in the cell: ask the master for it.
    pub fetch: bool,
}

/// A mapped region.
pub struct Queue {
    region: Region,
    capacity: u64,
}

impl Queue {
    /// Makes a region with room for `capacity` queued requests (rounded up to a power of
    /// two, at most [`MAX_CAPACITY`]); returns it and the descriptor workers map it from.
    pub fn create(capacity: usize) -> Result<(Self, OwnedFd), QueueError> {
        let capacity = capacity.clamp(2, MAX_CAPACITY).next_power_of_two();
        let (region, fd) = Region::create(capacity)?;
        Ok((Self::new(region), fd))
    }

    /// Maps a region made by [`Queue::create`] in another process.
    pub fn open(fd: BorrowedFd<'_>) -> Result<Self, QueueError> {
        Region::open(fd).map(Self::new)
    }

    fn new(region: Region) -> Self {
        Self {
            capacity: region.capacity(),
            region,
        }
    }

    /// Queues a request; returns its position (for [`Queue::expire`]). A frame larger than
    /// a cell is queued as a marker: the worker that takes it asks for the frame.
    pub fn push(&self, id: u64, frame: &[u8]) -> Result<u64, Full> {
        debug_assert_ne!(id, 0, "0 is the claim word of a taken cell");
        let header = self.region.header();
        let mut pos = header.enqueue.load(Ordering::Relaxed);
        let cell = loop {
            let cell = self.region.cell(pos);
            let seq = cell.seq.load(Ordering::Acquire);
            match seq.cmp(&pos) {
                std::cmp::Ordering::Equal => {
                    match header.enqueue.compare_exchange_weak(
                        pos,
                        pos + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break cell,
                        Err(now) => pos = now,
                    }
                }
                // The cell still holds the request from one lap ago: the ring is full.
                std::cmp::Ordering::Less => return Err(Full),
                std::cmp::Ordering::Greater => pos = header.enqueue.load(Ordering::Relaxed),
            }
        };
        // This producer owns the cell until it publishes `seq` below.
        cell.claim.store(id, Ordering::Relaxed);
        if frame.len() <= CELL_DATA {
            cell.data.write(0, frame);
            cell.len.store(frame.len() as u32, Ordering::Relaxed);
        } else {
            cell.len.store(FETCH, Ordering::Relaxed);
        }
        cell.seq.store(pos + 1, Ordering::Release);
        // Pairs with the fence in `wait`: either that worker sees this cell, or this sees it
        // counted among the sleepers.
        fence(Ordering::SeqCst);
        if header.sleepers.load(Ordering::Relaxed) > 0 {
            self.wake(None);
        }
        Ok(pos)
    }

    /// Takes the oldest request, copying its frame into `frame`, and records it in `slot`.
    /// Requests the master has expired are skipped. `None` when the ring is empty.
    pub fn take(&self, slot: u32, frame: &mut Vec<u8>) -> Option<Taken> {
        let dequeue = &self.region.header().dequeue;
        let held = self.region.slot(slot);
        loop {
            let pos = dequeue.load(Ordering::Relaxed);
            let cell = self.region.cell(pos);
            let seq = cell.seq.load(Ordering::Acquire);
            match seq.cmp(&(pos + 1)) {
                std::cmp::Ordering::Less => return None,
                std::cmp::Ordering::Greater => continue,
                std::cmp::Ordering::Equal => {}
            }
            if dequeue
                .compare_exchange_weak(pos, pos + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // This consumer owns the cell until it publishes `seq` below.
            let id = cell.claim.load(Ordering::Relaxed);
            // Say which request this worker holds before claiming it, so that if it dies
            // right after, the master still knows whose request that was.
            held.started.store(monotonic_nanos(), Ordering::Relaxed);
            held.request.store(id, Ordering::Release);
            let claimed = cell.claim.swap(0, Ordering::AcqRel) == id && id != 0;
            let len = cell.len.load(Ordering::Relaxed);
            let fetch = len == FETCH;
            if claimed && !fetch {
                cell.data.read(0, (len as usize).min(CELL_DATA), frame);
            }
            cell.seq.store(pos + self.capacity, Ordering::Release);
            if claimed {
                return Some(Taken { id, fetch });
            }
            // The master expired it (its queue time ran out, or the client left).
            held.request.store(0, Ordering::Release);
        }
    }

    /// The worker in `slot` finished its request.
    pub fn done(&self, slot: u32) {
        self.region.slot(slot).request.store(0, Ordering::Release);
    }

    /// Gives up a queued request unless a worker has taken it; true if it will never run.
    pub fn expire(&self, pos: u64, id: u64) -> bool {
        self.region
            .cell(pos)
            .claim
            .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Requests queued and not yet taken (expired ones included until a worker skips them).
    pub fn len(&self) -> usize {
        let header = self.region.header();
        let enqueue = header.enqueue.load(Ordering::Relaxed);
        let dequeue = header.dequeue.load(Ordering::Relaxed);
        enqueue.saturating_sub(dequeue) as usize
    }

    /// Which request the worker in `slot` holds (0: none) and since when
    /// ([`monotonic_nanos`]).
    pub fn holding(&self, slot: u32) -> (u64, u64) {
        let held = self.region.slot(slot);
        let id = held.request.load(Ordering::Acquire);
        let since = held.started.load(Ordering::Relaxed);
        (id, since)
    }

    /// Prepares a slot for a new worker.
    pub fn reset_slot(&self, slot: u32) {
        let fresh = self.region.slot(slot);
        fresh.request.store(0, Ordering::Relaxed);
        fresh.sleep.store(RUNNING, Ordering::Relaxed);
        fresh.written.store(0, Ordering::Relaxed);
        fresh.read.store(0, Ordering::Relaxed);
        fresh.retire.store(0, Ordering::Release);
        self.region
            .header()
            .high
            .fetch_max(slot + 1, Ordering::AcqRel);
    }

    /// One past the highest slot handed out.
    pub fn high(&self) -> u32 {
        self.region.header().high.load(Ordering::Acquire)
    }

    /// Tells the worker in `slot` to exit once its current request is done.
    pub fn retire(&self, slot: u32) {
        self.region.slot(slot).retire.store(1, Ordering::Release);
        // Pairs with the fence in `wait`: the worker sees the flag, or this sees it asleep.
        fence(Ordering::SeqCst);
        self.wake(Some(slot));
    }

    /// Tells every worker to exit once its current request is done.
    pub fn close(&self) {
        self.region.header().closed.store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        for slot in 0..self.high() {
            self.wake(Some(slot));
        }
    }

    /// Whether the worker in `slot` should exit now that it is idle.
    pub fn leaving(&self, slot: u32) -> bool {
        self.region.header().closed.load(Ordering::Acquire) != 0
            || self.region.slot(slot).retire.load(Ordering::Acquire) != 0
    }

    /// Sleeps until this worker is woken (a request was queued, or it is told to leave) or
    /// `timeout` passes; false if it was not woken (the caller may check on the master).
    /// Either way the caller tries `take` again.
    pub fn wait(&self, slot: u32, timeout: Duration) -> bool {
        let sleeper = self.region.slot(slot);
        let sleepers = &self.region.header().sleepers;
        sleeper.sleep.store(ASLEEP, Ordering::SeqCst);
        sleepers.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.is_empty() && !self.leaving(slot) {
            sleeper.sleep_while(ASLEEP, timeout);
        }
        // Not woken (timed out, or there was work after all): count itself out, unless a
        // waker did that a moment ago.
        let woken = sleeper
            .sleep
            .compare_exchange(ASLEEP, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err();
        if !woken {
            sleepers.fetch_sub(1, Ordering::AcqRel);
        }
        sleeper.sleep.store(RUNNING, Ordering::Release);
        woken
    }

    fn is_empty(&self) -> bool {
        let pos = self.region.header().dequeue.load(Ordering::Relaxed);
        self.region.cell(pos).seq.load(Ordering::Acquire) != pos + 1
    }

    /// Wakes one sleeping worker (the first found), or the one in `only`.
    fn wake(&self, only: Option<u32>) {
        let slots = match only {
            Some(slot) => slot..slot + 1,
            None => 0..self.high(),
        };
        for slot in slots {
            let sleeper = self.region.slot(slot);
            if sleeper
                .sleep
                .compare_exchange(ASLEEP, WOKEN, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.region.header().sleepers.fetch_sub(1, Ordering::AcqRel);
                sleeper.wake();
                return;
            }
        }
    }

    /// The cell the next request goes into, if it is held by a taker that never released
    /// it (a worker killed while taking it): the position, for [`Queue::release_stuck`].
    pub fn stuck(&self) -> Option<u64> {
        let header = self.region.header();
        let pos = header.enqueue.load(Ordering::Relaxed);
        let previous = pos.checked_sub(self.capacity)?;
        let seq = self.region.cell(pos).seq.load(Ordering::Acquire);
        let taken = header.dequeue.load(Ordering::Relaxed) > previous;
        (seq == previous + 1 && taken).then_some(pos)
    }

    /// Releases a cell [`Queue::stuck`] reported twice, long apart.
    pub fn release_stuck(&self, pos: u64) {
        let previous = pos - self.capacity;
        let _ = self.region.cell(pos).seq.compare_exchange(
            previous + 1,
            pos,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }

    /// Another handle on the same region, for another thread of a model.
    #[cfg(feature = "loom")]
    fn share(&self) -> Self {
        Self::new(self.region.share())
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of the machine.
pub fn monotonic_nanos() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::Arc;

    fn queue(capacity: usize) -> Queue {
        let (queue, fd) = Queue::create(capacity).unwrap();
        // A second mapping of the same memory, as a worker has.
        let other = Queue::open(fd.as_fd()).unwrap();
        drop(queue);
        other
    }

    #[test]
    fn requests_come_out_in_order_with_their_frames() {
        let q = queue(4);
        let mut frame = Vec::new();
        assert_eq!(q.take(0, &mut frame), None);
        for id in 1..=4u64 {
            q.push(id, format!("request {id}").as_bytes()).unwrap();
        }
        assert_eq!(q.push(5, b"x"), Err(Full), "capacity 4");
        assert_eq!(q.len(), 4);
        for id in 1..=4u64 {
            let taken = q.take(3, &mut frame).unwrap();
            assert_eq!(taken, Taken { id, fetch: false });
            assert_eq!(frame, format!("request {id}").as_bytes());
            assert_eq!(q.holding(3).0, id);
            q.done(3);
        }
        assert_eq!(q.holding(3).0, 0);
        // The ring wraps.
        q.push(9, b"again").unwrap();
        assert_eq!(q.take(0, &mut frame).unwrap().id, 9);
    }

    #[test]
    fn an_expired_request_never_runs_and_a_taken_one_cannot_expire() {
        let q = queue(8);
        let mut frame = Vec::new();
        let first = q.push(1, b"a").unwrap();
        let second = q.push(2, b"b").unwrap();
        assert!(q.expire(first, 1));
        assert_eq!(q.take(0, &mut frame).unwrap().id, 2, "1 is skipped");
        assert!(!q.expire(second, 2), "2 was taken");
        // Cells are reused with new ids: an old id never expires a new request.
        for id in 3..20 {
            let pos = q.push(id, b"c").unwrap();
            assert!(!q.expire(pos, 1));
            assert_eq!(q.take(0, &mut frame).unwrap().id, id);
        }
    }

    #[test]
    fn large_frames_are_fetched() {
        let q = queue(2);
        let mut frame = Vec::new();
        q.push(1, &vec![7u8; CELL_DATA]).unwrap();
        q.push(2, &vec![7u8; CELL_DATA + 1]).unwrap();
        assert!(!q.take(0, &mut frame).unwrap().fetch);
        assert_eq!(frame.len(), CELL_DATA);
        assert!(q.take(0, &mut frame).unwrap().fetch);
    }

    #[test]
    fn a_cell_left_by_a_dead_taker_is_found_and_released() {
        let q = queue(2);
        let mut frame = Vec::new();
        q.push(1, b"a").unwrap();
        q.push(2, b"b").unwrap();
        assert_eq!(q.stuck(), None);
        // A taker that advanced the position and died before releasing the cell.
        q.region.header().dequeue.store(1, Ordering::Relaxed);
        assert_eq!(q.take(0, &mut frame).unwrap().id, 2);
        assert_eq!(q.push(3, b"c"), Err(Full));
        let pos = q.stuck().expect("cell 0 is held");
        q.release_stuck(pos);
        q.push(3, b"c").unwrap();
        assert_eq!(q.take(0, &mut frame).unwrap().id, 3);
    }

    #[test]
    fn sleeping_takers_wake_for_requests_and_exactly_one_gets_each() {
        // A lost wake-up would leave a taker asleep for its whole 30 s timeout.
        let started = std::time::Instant::now();
        let (queue, fd) = Queue::create(64).unwrap();
        let queue = Arc::new(queue);
        let _other = Queue::open(fd.as_fd()).unwrap();
        let total = 2000u64;
        for slot in 0..3 {
            queue.reset_slot(slot);
        }
        let takers: Vec<_> = (0..3u32)
            .map(|slot| {
                let q = queue.clone();
                std::thread::spawn(move || {
                    let mut frame = Vec::new();
                    let mut got = Vec::new();
                    while !q.leaving(slot) || !q.is_empty() {
                        match q.take(slot, &mut frame) {
                            Some(taken) => {
                                assert_eq!(frame, taken.id.to_le_bytes());
                                got.push(taken.id);
                                q.done(slot);
                            }
                            None => {
                                q.wait(slot, Duration::from_secs(30));
                            }
                        }
                    }
                    got
                })
            })
            .collect();
        let mut id = 1;
        while id <= total {
            match queue.push(id, &id.to_le_bytes()) {
                Ok(_) => id += 1,
                Err(Full) => std::thread::yield_now(),
            }
        }
        while !queue.is_empty() {
            std::thread::yield_now();
        }
        queue.close();
        let mut all: Vec<u64> = takers.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort_unstable();
        assert_eq!(all, (1..=total).collect::<Vec<_>>());
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a wake-up was lost"
        );
    }
}
