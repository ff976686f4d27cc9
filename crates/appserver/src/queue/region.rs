//! The region's layout, and the one place that turns its bytes into typed references.
//!
//! A region is a header, [`SLOTS`] worker slots, the ring's cells and one answer ring per
//! slot, each a `#[repr(C)]` struct whose size and field offsets are asserted below: master
//! and workers are the same binary, but the layout is a contract between processes and must
//! not move by accident. Fields that both sides touch at once are atomics; byte areas (a
//! cell's frame, an answer ring) are [`Bytes`], owned by one side at a time as the protocol
//! in the parent module says.
//!
//! Built with the `loom` feature (model tests only), the same structs hold loom's atomics
//! and cells and live on the heap instead of in a shared mapping, the sleep word's futex
//! becomes a loom mutex and condition variable, and the sizes shrink so models stay small.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::fs::{fstat, ftruncate, memfd_create, MemfdFlags};

use super::sync::{AtomicU32, AtomicU64, Ordering};
use super::QueueError;

/// Bytes per cell, its header included.
#[cfg(not(feature = "loom"))]
pub const CELL: usize = 4096;
#[cfg(feature = "loom")]
pub const CELL: usize = 128;
/// Bytes of a cell before its data.
const CELL_HEAD: usize = 64;
/// The largest request frame a cell carries; larger ones are fetched over the socket.
pub const CELL_DATA: usize = CELL - CELL_HEAD;
/// Worker slots in a region: more than `app.workers` can be at its limit plus a reload's.
#[cfg(not(feature = "loom"))]
pub const SLOTS: usize = 2048;
#[cfg(feature = "loom")]
pub const SLOTS: usize = 4;
/// Bytes of each worker's answer ring.
#[cfg(not(feature = "loom"))]
pub const ANSWERS: usize = 32 * 1024;
#[cfg(feature = "loom")]
pub const ANSWERS: usize = 256;
/// The most cells a region has.
pub const MAX_CAPACITY: usize = 8192;
const MAGIC: u32 = 0x5354_5251; // "STRQ"

/// The region's first 256 bytes: the producers' and consumers' positions on cache lines of
/// their own, then the words everyone reads.
#[repr(C)]
pub struct Header {
    /// The next position a request is queued at.
    pub enqueue: AtomicU64,
    _line0: [u8; 56],
    /// The next position a worker takes from.
    pub dequeue: AtomicU64,
    _line1: [u8; 56],
    /// Workers asleep on their sleep word and not yet woken.
    pub sleepers: AtomicU32,
    /// One past the highest slot ever handed out: wakers look at slots below it.
    pub high: AtomicU32,
    /// Every worker is to exit once idle.
    pub closed: AtomicU32,
    pub capacity: AtomicU32,
    pub magic: AtomicU32,
    /// The master's doorbell is armed: the next answer rings it.
    pub armed: AtomicU32,
    _rest: [u8; 104],
}

/// One worker's slot (one cache line, so workers do not share lines).
#[repr(C)]
pub struct Slot {
    /// The request it holds (0: none).
    pub request: AtomicU64,
    /// Since when ([`super::monotonic_nanos`]).
    pub started: AtomicU64,
    /// It is to exit once idle.
    pub retire: AtomicU64,
    /// Running, asleep on this word, or woken and not yet running.
    pub sleep: AtomicU32,
    _pad: u32,
    /// Its answer ring's write and read positions (bytes, ever increasing).
    pub written: AtomicU64,
    pub read: AtomicU64,
    _rest: [u8; 16],
    /// The futex the sleep word stands for, in a model.
    #[cfg(feature = "loom")]
    parking: (loom::sync::Mutex<()>, loom::sync::Condvar),
}

/// One cell of the ring.
#[repr(C)]
pub struct Cell {
    /// Its position when free for a producer, that plus one when it holds a request.
    pub seq: AtomicU64,
    /// The queued request's id until a worker takes it or the master expires it (then 0).
    pub claim: AtomicU64,
    /// The frame's length, or [`super::FETCH`].
    pub len: AtomicU32,
    _pad: [u8; 44],
    pub data: Bytes<CELL_DATA>,
}

/// One worker's answer ring ([`super::answers`]).
#[repr(C)]
pub struct Ring(pub Bytes<ANSWERS>);

#[cfg(not(feature = "loom"))]
mod layout {
    use super::*;
    use std::mem::offset_of;

    const _: () = assert!(size_of::<Header>() == 256);
    const _: () = assert!(offset_of!(Header, enqueue) == 0);
    const _: () = assert!(offset_of!(Header, dequeue) == 64);
    const _: () = assert!(offset_of!(Header, sleepers) == 128);
    const _: () = assert!(offset_of!(Header, high) == 132);
    const _: () = assert!(offset_of!(Header, closed) == 136);
    const _: () = assert!(offset_of!(Header, capacity) == 140);
    const _: () = assert!(offset_of!(Header, magic) == 144);
    const _: () = assert!(offset_of!(Header, armed) == 148);

    const _: () = assert!(size_of::<Slot>() == 64);
    const _: () = assert!(offset_of!(Slot, request) == 0);
    const _: () = assert!(offset_of!(Slot, started) == 8);
    const _: () = assert!(offset_of!(Slot, retire) == 16);
    const _: () = assert!(offset_of!(Slot, sleep) == 24);
    const _: () = assert!(offset_of!(Slot, written) == 32);
    const _: () = assert!(offset_of!(Slot, read) == 40);

    const _: () = assert!(size_of::<Cell>() == CELL);
    const _: () = assert!(offset_of!(Cell, seq) == 0);
    const _: () = assert!(offset_of!(Cell, claim) == 8);
    const _: () = assert!(offset_of!(Cell, len) == 16);
    const _: () = assert!(offset_of!(Cell, data) == CELL_HEAD);

    const _: () = assert!(size_of::<Ring>() == ANSWERS);
    const _: () = assert!(ANSWERS.is_multiple_of(8) && CELL.is_multiple_of(64));
}

/// Where each part of a region with `capacity` cells starts, and its length.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(feature = "loom", allow(dead_code))]
struct Layout {
    slots: usize,
    cells: usize,
    rings: usize,
    len: usize,
}

impl Layout {
    const fn new(capacity: usize) -> Self {
        let slots = size_of::<Header>();
        let cells = slots + SLOTS * size_of::<Slot>();
        let rings = cells + capacity * size_of::<Cell>();
        let len = rings + SLOTS * size_of::<Ring>();
        Self {
            slots,
            cells,
            rings,
            len,
        }
    }
}

/// A region: its memory, and how many cells it has (a power of two).
pub struct Region {
    memory: Memory,
    capacity: usize,
}

impl Region {
    /// Makes a region with `capacity` cells (a power of two, at most [`MAX_CAPACITY`]);
    /// returns it and the descriptor other processes map it from.
    pub fn create(capacity: usize) -> Result<(Self, OwnedFd), QueueError> {
        debug_assert!(capacity.is_power_of_two() && capacity <= MAX_CAPACITY);
        let layout = Layout::new(capacity);
        let fd = memfd_create("strata-queue", MemfdFlags::CLOEXEC)?;
        ftruncate(&fd, layout.len as u64)?;
        let region = Self {
            memory: Memory::new(fd.as_fd(), layout.len, capacity)?,
            capacity,
        };
        for i in 0..capacity {
            region.cell(i as u64).seq.store(i as u64, Ordering::Relaxed);
        }
        let header = region.header();
        header.capacity.store(capacity as u32, Ordering::Relaxed);
        header.magic.store(MAGIC, Ordering::Release);
        Ok((region, fd))
    }

    /// Maps a region [`Region::create`] made in another process.
    pub fn open(fd: BorrowedFd<'_>) -> Result<Self, QueueError> {
        let len = fstat(fd)?.st_size as usize;
        if len < Layout::new(0).len {
            return Err(QueueError::Foreign);
        }
        let region = Self {
            memory: Memory::open(fd, len)?,
            capacity: 0,
        };
        let header = region.header();
        let capacity = header.capacity.load(Ordering::Relaxed) as usize;
        if header.magic.load(Ordering::Acquire) != MAGIC
            || !capacity.is_power_of_two()
            || Layout::new(capacity).len != len
        {
            return Err(QueueError::Foreign);
        }
        Ok(Self { capacity, ..region })
    }

    /// Cells in the ring.
    pub fn capacity(&self) -> u64 {
        self.capacity as u64
    }

    pub fn header(&self) -> &Header {
        #[cfg(not(feature = "loom"))]
        return self.memory.at(0);
        #[cfg(feature = "loom")]
        return &self.memory.0.header;
    }

    pub fn slot(&self, slot: u32) -> &Slot {
        let slot = slot as usize;
        assert!(slot < SLOTS, "slot {slot} of {SLOTS}");
        #[cfg(not(feature = "loom"))]
        return self
            .memory
            .at(self.layout().slots + slot * size_of::<Slot>());
        #[cfg(feature = "loom")]
        return &self.memory.0.slots[slot];
    }

    /// The cell for ring position `pos`.
    pub fn cell(&self, pos: u64) -> &Cell {
        let index = (pos & (self.capacity as u64 - 1)) as usize;
        #[cfg(not(feature = "loom"))]
        return self
            .memory
            .at(self.layout().cells + index * size_of::<Cell>());
        #[cfg(feature = "loom")]
        return &self.memory.0.cells[index];
    }

    /// The answer ring of `slot`.
    pub fn ring(&self, slot: u32) -> &Ring {
        let slot = slot as usize;
        assert!(slot < SLOTS, "slot {slot} of {SLOTS}");
        #[cfg(not(feature = "loom"))]
        return self
            .memory
            .at(self.layout().rings + slot * size_of::<Ring>());
        #[cfg(feature = "loom")]
        return &self.memory.0.rings[slot];
    }

    #[cfg(not(feature = "loom"))]
    fn layout(&self) -> Layout {
        Layout::new(self.capacity)
    }
}

impl Slot {
    /// Sleeps while the sleep word holds `expected`, until woken or `timeout` passes.
    #[cfg(not(feature = "loom"))]
    pub fn sleep_while(&self, expected: u32, timeout: Duration) {
        use rustix::thread::futex;
        let timeout = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as i64,
        };
        // Shared (not process-private): the waker is another process.
        let _ = futex::wait(&self.sleep, futex::Flags::empty(), expected, Some(&timeout));
    }

    /// Wakes the worker asleep on the sleep word.
    #[cfg(not(feature = "loom"))]
    pub fn wake(&self) {
        let _ = rustix::thread::futex::wake(&self.sleep, rustix::thread::futex::Flags::empty(), 1);
    }

    /// The futex in a model: the kernel checks the word and queues the sleeper under one
    /// lock that the waker takes too. No timeout: a lost wake-up is a deadlock loom reports.
    #[cfg(feature = "loom")]
    pub fn sleep_while(&self, expected: u32, _timeout: Duration) {
        let (lock, sleeping) = &self.parking;
        let guard = lock.lock().expect("model lock");
        if self.sleep.load(Ordering::Relaxed) == expected {
            drop(sleeping.wait(guard).expect("model lock"));
        }
    }

    #[cfg(feature = "loom")]
    pub fn wake(&self) {
        let (lock, sleeping) = &self.parking;
        let _guard = lock.lock().expect("model lock");
        sleeping.notify_all();
    }
}

/// `N` bytes that one side at a time owns, by the protocol around them.
#[cfg(not(feature = "loom"))]
#[repr(transparent)]
pub struct Bytes<const N: usize>(std::cell::UnsafeCell<[u8; N]>);

#[cfg(not(feature = "loom"))]
#[allow(unsafe_code)]
impl<const N: usize> Bytes<N> {
    /// Copies `from` to `at..`; the caller owns those bytes now.
    pub fn write(&self, at: usize, from: &[u8]) {
        assert!(at <= N && from.len() <= N - at);
        // SAFETY: in bounds (checked above); by the queue's protocol no one else reads or
        // writes these bytes until the caller publishes them with a release store, and
        // `from` is not in the region.
        unsafe {
            std::ptr::copy_nonoverlapping(
                from.as_ptr(),
                self.0.get().cast::<u8>().add(at),
                from.len(),
            );
        }
    }

    /// Fills `to` from `at..`; the caller owns those bytes now.
    pub fn read_into(&self, at: usize, to: &mut [u8]) {
        assert!(at <= N && to.len() <= N - at);
        // SAFETY: in bounds (checked above); the writer published these bytes before the
        // caller's acquire load and no one writes them until the caller hands them back.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.0.get().cast::<u8>().add(at),
                to.as_mut_ptr(),
                to.len(),
            );
        }
    }

    /// Replaces `to` with the `len` bytes at `at..`; the caller owns them now.
    pub fn read(&self, at: usize, len: usize, to: &mut Vec<u8>) {
        assert!(at <= N && len <= N - at);
        to.clear();
        to.reserve(len);
        // SAFETY: in bounds (checked above), `to` has room for `len` bytes; the writer
        // published these bytes before the caller's acquire load and no one writes them
        // until the caller hands them back.
        unsafe {
            std::ptr::copy_nonoverlapping(self.0.get().cast::<u8>().add(at), to.as_mut_ptr(), len);
            to.set_len(len);
        }
    }
}

/// In a model, bytes are tracked eight at a time (records and frames start on multiples of
/// eight), so loom reports any access that the protocol does not order.
#[cfg(feature = "loom")]
pub struct Bytes<const N: usize>(Vec<loom::cell::UnsafeCell<[u8; 8]>>);

// SAFETY: shared between a model's threads like the mapping between processes; loom checks
// that the protocol orders every access.
#[cfg(feature = "loom")]
#[allow(unsafe_code)]
unsafe impl<const N: usize> Sync for Bytes<N> {}

#[cfg(feature = "loom")]
impl<const N: usize> Bytes<N> {
    fn new() -> Self {
        Self(
            (0..N / 8)
                .map(|_| loom::cell::UnsafeCell::new([0; 8]))
                .collect(),
        )
    }

    pub fn write(&self, at: usize, from: &[u8]) {
        assert!(at <= N && from.len() <= N - at);
        for (i, byte) in from.iter().enumerate() {
            let at = at + i;
            // SAFETY: loom checks this access against every other one to the same word.
            #[allow(unsafe_code)]
            self.0[at / 8].with_mut(|word| unsafe { (*word)[at % 8] = *byte });
        }
    }

    pub fn read_into(&self, at: usize, to: &mut [u8]) {
        assert!(at <= N && to.len() <= N - at);
        for (i, byte) in to.iter_mut().enumerate() {
            let at = at + i;
            // SAFETY: as in `write`.
            #[allow(unsafe_code)]
            let value = self.0[at / 8].with(|word| unsafe { (*word)[at % 8] });
            *byte = value;
        }
    }

    pub fn read(&self, at: usize, len: usize, to: &mut Vec<u8>) {
        assert!(at <= N && len <= N - at);
        to.clear();
        for at in at..at + len {
            // SAFETY: as in `write`.
            #[allow(unsafe_code)]
            to.push(self.0[at / 8].with(|word| unsafe { (*word)[at % 8] }));
        }
    }
}

/// The region's memory: a shared mapping.
#[cfg(not(feature = "loom"))]
struct Memory {
    base: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is only read and written through atomics, except `Bytes`, which one
// party at a time owns by the queue's protocol.
#[cfg(not(feature = "loom"))]
#[allow(unsafe_code)]
unsafe impl Send for Memory {}
// SAFETY: as above.
#[cfg(not(feature = "loom"))]
#[allow(unsafe_code)]
unsafe impl Sync for Memory {}

#[cfg(not(feature = "loom"))]
#[allow(unsafe_code)]
impl Memory {
    fn new(fd: BorrowedFd<'_>, len: usize, _cells: usize) -> Result<Self, QueueError> {
        Self::open(fd, len)
    }

    fn open(fd: BorrowedFd<'_>, len: usize) -> Result<Self, QueueError> {
        use rustix::mm::{mmap, MapFlags, ProtFlags};
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
        let base = std::ptr::NonNull::new(ptr.cast::<u8>()).ok_or(QueueError::Foreign)?;
        Ok(Self { base, len })
    }

    /// The one accessor: the `T` at `offset`.
    fn at<T>(&self, offset: usize) -> &T {
        assert!(
            offset <= self.len
                && size_of::<T>() <= self.len - offset
                && offset.is_multiple_of(std::mem::align_of::<T>()),
            "{offset} is not a place for a {}",
            std::any::type_name::<T>()
        );
        // SAFETY: in bounds and aligned (checked above; the mapping is page-aligned). Every
        // `T` here is a `#[repr(C)]` struct of atomics, padding bytes and `Bytes`, for which
        // any bit pattern (the mapping starts zeroed) is valid; all mutation goes through
        // atomics or `Bytes`, so shared references are sound; the memory lives as long as
        // `self`.
        unsafe { &*self.base.as_ptr().add(offset).cast::<T>() }
    }
}

#[cfg(not(feature = "loom"))]
impl Drop for Memory {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, unmapped once; no reference into it outlives
        // `self` (accessors borrow it).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// The region's memory in a model: the same structs on the heap, shared by clones.
#[cfg(feature = "loom")]
struct Memory(std::sync::Arc<Heap>);

#[cfg(feature = "loom")]
struct Heap {
    header: Header,
    slots: Vec<Slot>,
    cells: Vec<Cell>,
    rings: Vec<Ring>,
}

#[cfg(feature = "loom")]
impl Memory {
    fn new(_fd: BorrowedFd<'_>, _len: usize, capacity: usize) -> Result<Self, QueueError> {
        let header = Header {
            enqueue: AtomicU64::new(0),
            _line0: [0; 56],
            dequeue: AtomicU64::new(0),
            _line1: [0; 56],
            sleepers: AtomicU32::new(0),
            high: AtomicU32::new(0),
            closed: AtomicU32::new(0),
            capacity: AtomicU32::new(0),
            magic: AtomicU32::new(0),
            armed: AtomicU32::new(0),
            _rest: [0; 104],
        };
        let slot = || Slot {
            request: AtomicU64::new(0),
            started: AtomicU64::new(0),
            retire: AtomicU64::new(0),
            sleep: AtomicU32::new(0),
            _pad: 0,
            written: AtomicU64::new(0),
            read: AtomicU64::new(0),
            _rest: [0; 16],
            parking: Default::default(),
        };
        let cell = || Cell {
            seq: AtomicU64::new(0),
            claim: AtomicU64::new(0),
            len: AtomicU32::new(0),
            _pad: [0; 44],
            data: Bytes::new(),
        };
        Ok(Self(std::sync::Arc::new(Heap {
            header,
            slots: (0..SLOTS).map(|_| slot()).collect(),
            cells: (0..capacity).map(|_| cell()).collect(),
            rings: (0..SLOTS).map(|_| Ring(Bytes::new())).collect(),
        })))
    }

    /// A model has one process: its threads share the region by [`Region::share`].
    fn open(_fd: BorrowedFd<'_>, _len: usize) -> Result<Self, QueueError> {
        Err(QueueError::Foreign)
    }
}

#[cfg(feature = "loom")]
impl Region {
    /// Another handle on the same region, for another thread of a model.
    pub fn share(&self) -> Self {
        Self {
            memory: Memory(self.memory.0.clone()),
            capacity: self.capacity,
        }
    }
}
