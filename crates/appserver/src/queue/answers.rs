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

use std::sync::atomic::{fence, Ordering};

use super::{cells_end, Queue, ANSWERS, ARMED, READ, SLOTS, WRITTEN};

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

impl Queue {
    fn ring_offset(&self, slot: u32) -> usize {
        assert!((slot as usize) < SLOTS);
        self.answers_start() + slot as usize * ANSWERS
    }

    fn answers_start(&self) -> usize {
        cells_end(self.capacity as usize)
    }

    /// Writes the response to request `id` into `slot`'s ring. `None` if it does not fit (the
    /// caller sends it over the socket instead); otherwise whether the caller must ring the
    /// master's doorbell.
    #[allow(unsafe_code)]
    pub fn answer(&self, slot: u32, id: u64, started: u64, frames: &[u8]) -> Option<bool> {
        let need = (RECORD_HEAD + frames.len()).next_multiple_of(8);
        if frames.len() > MAX_ANSWER {
            return None;
        }
        let written = self.slot_u64(slot, WRITTEN);
        let head = written.load(Ordering::Relaxed);
        let tail = self.slot_u64(slot, READ).load(Ordering::Acquire);
        let at = head as usize % ANSWERS;
        let to_end = ANSWERS - at;
        let skip = if to_end < need { to_end } else { 0 };
        if (ANSWERS as u64) - (head - tail) < (skip + need) as u64 {
            return None;
        }
        let ring = self.ring_offset(slot);
        if skip >= RECORD_HEAD {
            self.u32_at(ring + at).store(skip as u32, Ordering::Relaxed);
            self.u64_at(ring + at + 8).store(0, Ordering::Relaxed);
        }
        let at = (head as usize + skip) % ANSWERS;
        self.u32_at(ring + at).store(need as u32, Ordering::Relaxed);
        self.u32_at(ring + at + 4)
            .store(frames.len() as u32, Ordering::Relaxed);
        self.u64_at(ring + at + 8).store(id, Ordering::Relaxed);
        self.u64_at(ring + at + 16)
            .store(started, Ordering::Relaxed);
        // SAFETY: the bytes between the read and write positions are this writer's until it
        // publishes `written` below; the record lies inside this slot's ring (it fits before
        // the ring's end, checked above) and does not overlap `frames`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                frames.as_ptr(),
                self.base.as_ptr().add(ring + at + RECORD_HEAD),
                frames.len(),
            );
        }
        written.store(head + (skip + need) as u64, Ordering::Release);
        // Pairs with the fence in `arm`: either the collector sees this record, or this sees
        // it armed.
        fence(Ordering::SeqCst);
        let armed = self.u32_at(ARMED);
        Some(armed.load(Ordering::Relaxed) != 0 && armed.swap(0, Ordering::AcqRel) != 0)
    }

    /// Takes the next answer from `slot`'s ring into `frames`.
    #[allow(unsafe_code)]
    pub fn next_answer(&self, slot: u32, frames: &mut Vec<u8>) -> Option<Answer> {
        let read = self.slot_u64(slot, READ);
        let ring = self.ring_offset(slot);
        loop {
            let tail = read.load(Ordering::Relaxed);
            let head = self.slot_u64(slot, WRITTEN).load(Ordering::Acquire);
            if head <= tail {
                return None;
            }
            let at = tail as usize % ANSWERS;
            let to_end = ANSWERS - at;
            if to_end < RECORD_HEAD {
                read.store(tail + to_end as u64, Ordering::Release);
                continue;
            }
            let len = self.u32_at(ring + at).load(Ordering::Relaxed) as usize;
            let frames_len = self.u32_at(ring + at + 4).load(Ordering::Relaxed) as usize;
            let id = self.u64_at(ring + at + 8).load(Ordering::Relaxed);
            let started = self.u64_at(ring + at + 16).load(Ordering::Relaxed);
            let sane = len >= RECORD_HEAD.min(to_end)
                && len <= to_end
                && (len as u64) <= head - tail
                && (id == 0 || RECORD_HEAD + frames_len <= len);
            if !sane {
                // Only a broken worker writes this; drop what it wrote.
                read.store(head, Ordering::Release);
                return None;
            }
            if id != 0 {
                frames.clear();
                frames.reserve(frames_len);
                // SAFETY: the record lies between the read and write positions (checked
                // above), which the writer no longer touches, inside this slot's ring;
                // `frames` has room for it.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.base.as_ptr().add(ring + at + RECORD_HEAD),
                        frames.as_mut_ptr(),
                        frames_len,
                    );
                    frames.set_len(frames_len);
                }
            }
            read.store(tail + len as u64, Ordering::Release);
            if id != 0 {
                return Some(Answer { id, started });
            }
        }
    }

    /// Whether any worker's ring holds an answer.
    pub fn has_answers(&self) -> bool {
        (0..self.high()).any(|slot| {
            self.slot_u64(slot, WRITTEN).load(Ordering::Acquire)
                > self.slot_u64(slot, READ).load(Ordering::Relaxed)
        })
    }

    /// The collector is about to wait: the next answer rings the doorbell.
    pub fn arm(&self) {
        self.u32_at(ARMED).store(1, Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// Stops the doorbell (the collector is draining anyway).
    pub fn disarm(&self) {
        self.u32_at(ARMED).store(0, Ordering::Release);
    }
}

#[cfg(test)]
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
