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

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use rustix::fs::{fstat, ftruncate, memfd_create, MemfdFlags};
use rustix::mm::{mmap, munmap, MapFlags, ProtFlags};
use rustix::thread::futex;

mod answers;
pub use answers::Answer;

/// Bytes per cell, its header included.
const CELL: usize = 4096;
/// Bytes of a cell before its data.
const CELL_HEAD: usize = 64;
/// The largest request frame a cell carries; larger ones are fetched over the socket.
pub const CELL_DATA: usize = CELL - CELL_HEAD;
/// Bytes per worker slot (one cache line, so workers do not share lines).
const SLOT: usize = 64;
/// Worker slots in a region: more than `app.workers` can be at its limit plus a reload's.
pub const SLOTS: usize = 2048;
/// Bytes of each worker's answer ring.
const ANSWERS: usize = 32 * 1024;
/// Bytes of the region's header.
const HEADER: usize = 256;
/// The most cells a region has.
pub const MAX_CAPACITY: usize = 8192;
const MAGIC: u32 = 0x5354_5251; // "STRQ"
/// The `len` of a cell whose request is fetched over the socket.
const FETCH: u32 = u32::MAX;
/// A worker's sleep word: running, asleep on it, or woken and not yet running.
const RUNNING: u32 = 0;
const ASLEEP: u32 = 1;
const WOKEN: u32 = 2;

// Header offsets: the producers' and consumers' positions on lines of their own.
const ENQUEUE: usize = 0;
const DEQUEUE: usize = 64;
const SLEEPERS: usize = 128;
/// One past the highest slot ever handed out: wakers look at slots below it.
const HIGH: usize = 132;
const CLOSED: usize = 136;
const CAPACITY: usize = 140;
const MAGIC_AT: usize = 144;
/// The master's doorbell is armed: the next answer rings it.
const ARMED: usize = 148;

// Cell offsets.
const SEQ: usize = 0;
const CLAIM: usize = 8;
const LEN: usize = 16;

// Slot offsets.
const REQUEST: usize = 0;
const STARTED: usize = 8;
const RETIRE: usize = 16;
const SLEEP: usize = 24;
/// The answer ring's write and read positions (bytes, ever increasing).
const WRITTEN: usize = 32;
const READ: usize = 40;

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
    base: NonNull<u8>,
    len: usize,
    capacity: u64,
}

// SAFETY: the region is only read and written through atomics, except a cell's data, which
// one party at a time owns by the ring's sequence protocol (see `push` and `take`).
#[allow(unsafe_code)]
unsafe impl Send for Queue {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Queue {}

impl Queue {
    /// Makes a region with room for `capacity` queued requests (rounded up to a power of
    /// two, at most [`MAX_CAPACITY`]); returns it and the descriptor workers map it from.
    pub fn create(capacity: usize) -> Result<(Self, OwnedFd), QueueError> {
        let capacity = capacity.clamp(2, MAX_CAPACITY).next_power_of_two();
        let fd = memfd_create("strata-queue", MemfdFlags::CLOEXEC)?;
        ftruncate(&fd, region_len(capacity) as u64)?;
        let queue = Self::map(fd.as_fd(), region_len(capacity), capacity as u64)?;
        for i in 0..capacity as u64 {
            queue.cell_u64(i, SEQ).store(i, Ordering::Relaxed);
        }
        queue
            .u32_at(CAPACITY)
            .store(capacity as u32, Ordering::Relaxed);
        queue.u32_at(MAGIC_AT).store(MAGIC, Ordering::Release);
        Ok((queue, fd))
    }

    /// Maps a region made by [`Queue::create`] in another process.
    pub fn open(fd: BorrowedFd<'_>) -> Result<Self, QueueError> {
        let len = fstat(fd)?.st_size as usize;
        if len < HEADER + SLOTS * SLOT {
            return Err(QueueError::Foreign);
        }
        let mut queue = Self::map(fd, len, 0)?;
        let capacity = queue.u32_at(CAPACITY).load(Ordering::Relaxed) as usize;
        if queue.u32_at(MAGIC_AT).load(Ordering::Acquire) != MAGIC
            || !capacity.is_power_of_two()
            || region_len(capacity) != len
        {
            return Err(QueueError::Foreign);
        }
        queue.capacity = capacity as u64;
        Ok(queue)
    }

    #[allow(unsafe_code)]
    fn map(fd: BorrowedFd<'_>, len: usize, capacity: u64) -> Result<Self, QueueError> {
        // SAFETY: a fresh shared mapping of the whole descriptor, placed by the kernel; it
        // aliases nothing in this process and is unmapped only by `Drop`.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(QueueError::Foreign)?;
        Ok(Self {
            base,
            len,
            capacity,
        })
    }

    #[allow(unsafe_code)]
    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        assert!(offset + 8 <= self.len && offset.is_multiple_of(8));
        // SAFETY: in bounds and aligned (checked above; the mapping is page-aligned); the
        // memory lives as long as `self` and is only accessed atomically.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    #[allow(unsafe_code)]
    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        assert!(offset + 4 <= self.len && offset.is_multiple_of(4));
        // SAFETY: as in `u64_at`.
        unsafe { &*self.base.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn cell_offset(&self, pos: u64) -> usize {
        HEADER + SLOTS * SLOT + (pos & (self.capacity - 1)) as usize * CELL
    }

    fn cell_u64(&self, pos: u64, field: usize) -> &AtomicU64 {
        self.u64_at(self.cell_offset(pos) + field)
    }

    fn slot_u64(&self, slot: u32, field: usize) -> &AtomicU64 {
        assert!((slot as usize) < SLOTS);
        self.u64_at(HEADER + slot as usize * SLOT + field)
    }

    /// Queues a request; returns its position (for [`Queue::expire`]). A frame larger than
    /// a cell is queued as a marker: the worker that takes it asks for the frame.
    #[allow(unsafe_code)]
    pub fn push(&self, id: u64, frame: &[u8]) -> Result<u64, Full> {
        debug_assert_ne!(id, 0, "0 is the claim word of a taken cell");
        let enqueue = self.u64_at(ENQUEUE);
        let mut pos = enqueue.load(Ordering::Relaxed);
        loop {
            let seq = self.cell_u64(pos, SEQ).load(Ordering::Acquire);
            match seq.cmp(&pos) {
                std::cmp::Ordering::Equal => {
                    match enqueue.compare_exchange_weak(
                        pos,
                        pos + 1,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break,
                        Err(now) => pos = now,
                    }
                }
                // The cell still holds the request from one lap ago: the ring is full.
                std::cmp::Ordering::Less => return Err(Full),
                std::cmp::Ordering::Greater => pos = enqueue.load(Ordering::Relaxed),
            }
        }
        let at = self.cell_offset(pos);
        self.u64_at(at + CLAIM).store(id, Ordering::Relaxed);
        if frame.len() <= CELL_DATA {
            // SAFETY: this producer owns the cell until it publishes `seq` below; the data
            // area lies inside the mapping and does not overlap `frame`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    frame.as_ptr(),
                    self.base.as_ptr().add(at + CELL_HEAD),
                    frame.len(),
                );
            }
            self.u32_at(at + LEN)
                .store(frame.len() as u32, Ordering::Relaxed);
        } else {
            self.u32_at(at + LEN).store(FETCH, Ordering::Relaxed);
        }
        self.u64_at(at + SEQ).store(pos + 1, Ordering::Release);
        // Pairs with the fence in `wait`: either that worker sees this cell, or this sees it
        // counted among the sleepers.
        fence(Ordering::SeqCst);
        if self.u32_at(SLEEPERS).load(Ordering::Relaxed) > 0 {
            self.wake(None);
        }
        Ok(pos)
    }

    /// Takes the oldest request, copying its frame into `frame`, and records it in `slot`.
    /// Requests the master has expired are skipped. `None` when the ring is empty.
    #[allow(unsafe_code)]
    pub fn take(&self, slot: u32, frame: &mut Vec<u8>) -> Option<Taken> {
        let dequeue = self.u64_at(DEQUEUE);
        loop {
            let pos = dequeue.load(Ordering::Relaxed);
            let seq = self.cell_u64(pos, SEQ).load(Ordering::Acquire);
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
            let at = self.cell_offset(pos);
            let id = self.u64_at(at + CLAIM).load(Ordering::Relaxed);
            // Say which request this worker holds before claiming it, so that if it dies
            // right after, the master still knows whose request that was.
            self.slot_u64(slot, STARTED)
                .store(monotonic_nanos(), Ordering::Relaxed);
            self.slot_u64(slot, REQUEST).store(id, Ordering::Release);
            let claimed = self.u64_at(at + CLAIM).swap(0, Ordering::AcqRel) == id && id != 0;
            let len = self.u32_at(at + LEN).load(Ordering::Relaxed);
            let fetch = len == FETCH;
            if claimed && !fetch {
                let len = (len as usize).min(CELL_DATA);
                frame.clear();
                frame.reserve(len);
                // SAFETY: this consumer owns the cell until it publishes `seq` below; `len`
                // is bounded by the data area, and `frame` has room for it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.base.as_ptr().add(at + CELL_HEAD),
                        frame.as_mut_ptr(),
                        len,
                    );
                    frame.set_len(len);
                }
            }
            self.u64_at(at + SEQ)
                .store(pos + self.capacity, Ordering::Release);
            if claimed {
                return Some(Taken { id, fetch });
            }
            // The master expired it (its queue time ran out, or the client left).
            self.slot_u64(slot, REQUEST).store(0, Ordering::Release);
        }
    }

    /// The worker in `slot` finished its request.
    pub fn done(&self, slot: u32) {
        self.slot_u64(slot, REQUEST).store(0, Ordering::Release);
    }

    /// Gives up a queued request unless a worker has taken it; true if it will never run.
    pub fn expire(&self, pos: u64, id: u64) -> bool {
        self.cell_u64(pos, CLAIM)
            .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Requests queued and not yet taken (expired ones included until a worker skips them).
    pub fn len(&self) -> usize {
        let enqueue = self.u64_at(ENQUEUE).load(Ordering::Relaxed);
        let dequeue = self.u64_at(DEQUEUE).load(Ordering::Relaxed);
        enqueue.saturating_sub(dequeue) as usize
    }

    /// Which request the worker in `slot` holds (0: none) and since when
    /// ([`monotonic_nanos`]).
    pub fn holding(&self, slot: u32) -> (u64, u64) {
        let id = self.slot_u64(slot, REQUEST).load(Ordering::Acquire);
        let since = self.slot_u64(slot, STARTED).load(Ordering::Relaxed);
        (id, since)
    }

    /// Prepares a slot for a new worker.
    pub fn reset_slot(&self, slot: u32) {
        self.slot_u64(slot, REQUEST).store(0, Ordering::Relaxed);
        self.slot_u32(slot, SLEEP).store(RUNNING, Ordering::Relaxed);
        self.slot_u64(slot, WRITTEN).store(0, Ordering::Relaxed);
        self.slot_u64(slot, READ).store(0, Ordering::Relaxed);
        self.slot_u64(slot, RETIRE).store(0, Ordering::Release);
        self.u32_at(HIGH).fetch_max(slot + 1, Ordering::AcqRel);
    }

    /// One past the highest slot handed out.
    pub fn high(&self) -> u32 {
        self.u32_at(HIGH).load(Ordering::Acquire)
    }

    fn slot_u32(&self, slot: u32, field: usize) -> &AtomicU32 {
        assert!((slot as usize) < SLOTS);
        self.u32_at(HEADER + slot as usize * SLOT + field)
    }

    /// Tells the worker in `slot` to exit once its current request is done.
    pub fn retire(&self, slot: u32) {
        self.slot_u64(slot, RETIRE).store(1, Ordering::Release);
        // Pairs with the fence in `wait`: the worker sees the flag, or this sees it asleep.
        fence(Ordering::SeqCst);
        self.wake_slot(slot);
    }

    /// Tells every worker to exit once its current request is done.
    pub fn close(&self) {
        self.u32_at(CLOSED).store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        for slot in 0..self.u32_at(HIGH).load(Ordering::Acquire) {
            self.wake_slot(slot);
        }
    }

    /// Whether the worker in `slot` should exit now that it is idle.
    pub fn leaving(&self, slot: u32) -> bool {
        self.u32_at(CLOSED).load(Ordering::Acquire) != 0
            || self.slot_u64(slot, RETIRE).load(Ordering::Acquire) != 0
    }

    /// Sleeps until this worker is woken (a request was queued, or it is told to leave) or
    /// `timeout` passes; false if it was not woken (the caller may check on the master).
    /// Either way the caller tries `take` again.
    pub fn wait(&self, slot: u32, timeout: Duration) -> bool {
        let word = self.slot_u32(slot, SLEEP);
        let sleepers = self.u32_at(SLEEPERS);
        word.store(ASLEEP, Ordering::SeqCst);
        sleepers.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if self.is_empty() && !self.leaving(slot) {
            let timeout = rustix::time::Timespec {
                tv_sec: timeout.as_secs() as i64,
                tv_nsec: timeout.subsec_nanos() as i64,
            };
            // Shared (not process-private): the waker is another process.
            let _ = futex::wait(word, futex::Flags::empty(), ASLEEP, Some(&timeout));
        }
        // Not woken (timed out, or there was work after all): count itself out, unless a
        // waker did that a moment ago.
        let woken = word
            .compare_exchange(ASLEEP, RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err();
        if !woken {
            sleepers.fetch_sub(1, Ordering::AcqRel);
        }
        word.store(RUNNING, Ordering::Release);
        woken
    }

    fn is_empty(&self) -> bool {
        let pos = self.u64_at(DEQUEUE).load(Ordering::Relaxed);
        self.cell_u64(pos, SEQ).load(Ordering::Acquire) != pos + 1
    }

    /// Wakes one sleeping worker (the first found), or the one in `only`.
    fn wake(&self, only: Option<u32>) {
        let slots = match only {
            Some(slot) => slot..slot + 1,
            None => 0..self.u32_at(HIGH).load(Ordering::Acquire),
        };
        for slot in slots {
            let word = self.slot_u32(slot, SLEEP);
            if word
                .compare_exchange(ASLEEP, WOKEN, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.u32_at(SLEEPERS).fetch_sub(1, Ordering::AcqRel);
                let _ = futex::wake(word, futex::Flags::empty(), 1);
                return;
            }
        }
    }

    fn wake_slot(&self, slot: u32) {
        self.wake(Some(slot));
    }

    /// The cell the next request goes into, if it is held by a taker that never released
    /// it (a worker killed while taking it): the position, for [`Queue::release_stuck`].
    pub fn stuck(&self) -> Option<u64> {
        let pos = self.u64_at(ENQUEUE).load(Ordering::Relaxed);
        let previous = pos.checked_sub(self.capacity)?;
        let seq = self.cell_u64(pos, SEQ).load(Ordering::Acquire);
        let taken = self.u64_at(DEQUEUE).load(Ordering::Relaxed) > previous;
        (seq == previous + 1 && taken).then_some(pos)
    }

    /// Releases a cell [`Queue::stuck`] reported twice, long apart.
    pub fn release_stuck(&self, pos: u64) {
        let previous = pos - self.capacity;
        let _ = self.cell_u64(pos, SEQ).compare_exchange(
            previous + 1,
            pos,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
}

impl Drop for Queue {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; no reference into it outlives
        // `self` (accessors borrow `self`).
        let _ = unsafe { munmap(self.base.as_ptr().cast(), self.len) };
    }
}

fn region_len(capacity: usize) -> usize {
    cells_end(capacity) + SLOTS * ANSWERS
}

/// Where the cells end (and the answer rings begin).
fn cells_end(capacity: usize) -> usize {
    HEADER + SLOTS * SLOT + capacity * CELL
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of the machine.
pub fn monotonic_nanos() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
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
        q.u64_at(DEQUEUE).store(1, Ordering::Relaxed);
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
