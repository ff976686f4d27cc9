//! Answers: each worker's ring of small complete responses, drained by the master.
//!
//! A worker whose response is whole when the application returns (head, body, end; nothing
//! sent over its socket yet) writes it here as one record instead of over the socket. The
//! master's collector drains every worker's ring when its doorbell (a pipe) rings; the
//! doorbell is armed only while the collector waits, so under load answers cost the worker
//! no system call. Each ring has one writer (its worker) and one reader (the collector).
//!
//! A record is a 24-byte header (record length padded to 8, frames length, request id, when
//! the worker took the request) and the response's frames. A record never wraps: the writer
//! fills the ring's end with a skip record (id 0), or leaves it if even a header does not fit.

use super::region::ANSWERS;
use super::sync::{fence, Ordering};
use super::Queue;

const RECORD_HEAD: usize = 24;
/// The largest response (its frames) a record carries; larger ones go over the socket.
pub const MAX_ANSWER: usize = ANSWERS / 4 - RECORD_HEAD;

/// A response the collector took from a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub id: u64,
    /// When the worker took the request ([`super::monotonic_nanos`]).
    pub started: u64,
}

/// A record's header: its length (padded to 8), its frames' length, the request's id (0 for
/// a skip record) and when the worker took the request, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RecordHead {
    len: u32,
    frames: u32,
    id: u64,
    started: u64,
}

impl RecordHead {
    fn encode(self) -> [u8; RECORD_HEAD] {
        let mut head = [0; RECORD_HEAD];
        head[..4].copy_from_slice(&self.len.to_le_bytes());
        head[4..8].copy_from_slice(&self.frames.to_le_bytes());
        head[8..16].copy_from_slice(&self.id.to_le_bytes());
        head[16..].copy_from_slice(&self.started.to_le_bytes());
        head
    }

    fn decode(head: &[u8; RECORD_HEAD]) -> Self {
        let word = |range: std::ops::Range<usize>| {
            let mut bytes = [0; 8];
            bytes[..range.len()].copy_from_slice(&head[range]);
            u64::from_le_bytes(bytes)
        };
        Self {
            len: word(0..4) as u32,
            frames: word(4..8) as u32,
            id: word(8..16),
            started: word(16..24),
        }
    }
}

impl Queue {
    /// Writes the response to request `id` into `slot`'s ring. `None` if it does not fit (the
    /// caller sends it over the socket instead); otherwise whether the caller must ring the
    /// master's doorbell.
    pub fn answer(&self, slot: u32, id: u64, started: u64, frames: &[u8]) -> Option<bool> {
        let need = (RECORD_HEAD + frames.len()).next_multiple_of(8);
        if frames.len() > MAX_ANSWER {
            return None;
        }
        let positions = self.region.slot(slot);
        let head = positions.written.load(Ordering::Relaxed);
        let tail = positions.read.load(Ordering::Acquire);
        let at = head as usize % ANSWERS;
        let to_end = ANSWERS - at;
        let skip = if to_end < need { to_end } else { 0 };
        if (ANSWERS as u64) - (head - tail) < (skip + need) as u64 {
            return None;
        }
        // The bytes between the read and write positions are this writer's until it
        // publishes `written` below.
        let ring = &self.region.ring(slot).0;
        if skip >= RECORD_HEAD {
            let filler = RecordHead {
                len: skip as u32,
                frames: 0,
                id: 0,
                started: 0,
            };
            ring.write(at, &filler.encode());
        }
        let at = (head as usize + skip) % ANSWERS;
        let record = RecordHead {
            len: need as u32,
            frames: frames.len() as u32,
            id,
            started,
        };
        ring.write(at, &record.encode());
        ring.write(at + RECORD_HEAD, frames);
        positions
            .written
            .store(head + (skip + need) as u64, Ordering::Release);
        // Pairs with the fence in `arm`: either the collector sees this record, or this sees
        // it armed.
        fence(Ordering::SeqCst);
        let armed = &self.region.header().armed;
        Some(armed.load(Ordering::Relaxed) != 0 && armed.swap(0, Ordering::AcqRel) != 0)
    }

    /// Takes the next answer from `slot`'s ring into `frames`.
    pub fn next_answer(&self, slot: u32, frames: &mut Vec<u8>) -> Option<Answer> {
        let positions = self.region.slot(slot);
        let ring = &self.region.ring(slot).0;
        loop {
            let tail = positions.read.load(Ordering::Relaxed);
            let head = positions.written.load(Ordering::Acquire);
            if head <= tail {
                return None;
            }
            let at = tail as usize % ANSWERS;
            let to_end = ANSWERS - at;
            if to_end < RECORD_HEAD {
                positions
                    .read
                    .store(tail + to_end as u64, Ordering::Release);
                continue;
            }
            // Between the read and write positions: the writer no longer touches it.
            let mut record = [0; RECORD_HEAD];
            ring.read_into(at, &mut record);
            let record = RecordHead::decode(&record);
            let len = record.len as usize;
            let sane = len >= RECORD_HEAD
                && len <= to_end
                && (len as u64) <= head - tail
                && (record.id == 0 || RECORD_HEAD + record.frames as usize <= len);
            if !sane {
                // Only a broken worker writes this; drop what it wrote.
                positions.read.store(head, Ordering::Release);
                return None;
            }
            if record.id != 0 {
                ring.read(at + RECORD_HEAD, record.frames as usize, frames);
            }
            positions.read.store(tail + len as u64, Ordering::Release);
            if record.id != 0 {
                return Some(Answer {
                    id: record.id,
                    started: record.started,
                });
            }
        }
    }

    /// Whether any worker's ring holds an answer.
    pub fn has_answers(&self) -> bool {
        (0..self.high()).any(|slot| {
            let positions = self.region.slot(slot);
            positions.written.load(Ordering::Acquire) > positions.read.load(Ordering::Relaxed)
        })
    }

    /// The collector is about to wait: the next answer rings the doorbell.
    pub fn arm(&self) {
        self.region.header().armed.store(1, Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// Stops the doorbell (the collector is draining anyway).
    pub fn disarm(&self) {
        self.region.header().armed.store(0, Ordering::Release);
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::super::Queue;
    use super::*;

    #[test]
    fn answers_come_back_in_order_across_the_ring_end() {
        let (q, _fd) = Queue::create(2).unwrap();
        q.reset_slot(5);
        let mut frames = Vec::new();
        assert_eq!(q.next_answer(5, &mut frames), None);
        q.arm();
        // Sizes that do not divide the ring, so records meet its end at every offset.
        for round in 0..200u64 {
            let body = vec![round as u8; 1000 + (round as usize * 37) % 3000];
            let rang = q.answer(5, round + 1, round * 10, &body).expect("room");
            assert_eq!(
                rang,
                round == 0,
                "only the first answer rings the armed doorbell"
            );
            let answer = q.next_answer(5, &mut frames).expect("an answer");
            assert_eq!(
                answer,
                Answer {
                    id: round + 1,
                    started: round * 10
                }
            );
            assert_eq!(frames, body);
        }
        assert!(!q.has_answers());
    }

    #[test]
    fn a_full_ring_or_a_large_answer_is_refused() {
        let (q, _fd) = Queue::create(2).unwrap();
        q.reset_slot(0);
        assert_eq!(q.answer(0, 1, 0, &vec![0; MAX_ANSWER + 1]), None);
        let mut written = 0;
        while q.answer(0, written + 1, 0, &vec![1; MAX_ANSWER]).is_some() {
            written += 1;
        }
        assert!((3..=4).contains(&written), "{written}");
        assert!(q.has_answers());
        let mut frames = Vec::new();
        for id in 1..=written {
            assert_eq!(q.next_answer(0, &mut frames).unwrap().id, id);
        }
        assert!(q.answer(0, 99, 0, b"fits again").is_some());
    }
}
