//! Model tests: loom runs the queue's own code under every interleaving of the master and
//! its workers (up to a bound on preemptions) and every outcome the memory model allows.
//!
//! Run them with `cargo test -p strata-appserver --features loom --release --lib
//! queue::model` (`make test` does, unoptimised: about 30 s). `LOOM_MAX_PREEMPTIONS`
//! (default 2 here) widens the search: at 3 all five pass too (641 s in a release build,
//! 2026-12-03). What they show:
//!
//! - a request runs at most once, and is answered exactly once: by the worker that took it,
//!   or by the master's 503 when it expired first, never both and never neither;
//! - a queued request wakes a sleeping worker, and retiring or closing wakes one that must
//!   leave: the sleep word's futex is modelled without a timeout, so a lost wake-up is a
//!   deadlock, which loom reports;
//! - an answer written to a worker's ring rings the collector's armed doorbell, so the
//!   collector never waits on an answer it missed (a deadlock again);
//! - no byte of a cell or a ring is read while another thread may write it (loom tracks
//!   every eight bytes).
//!
//! The worker and collector loops below follow `worker::serve` and `master::collect` step
//! for step, with their sockets, pipe and Python taken out.

use std::collections::HashMap;
use std::time::Duration;

use loom::sync::mpsc::{channel, Receiver, Sender};
use loom::thread;

use super::{Queue, Taken};

/// Runs `body` under loom, two preemptions deep unless `LOOM_MAX_PREEMPTIONS` says more.
fn check(body: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.check(body);
}

/// What the application answers to a request: its frame, reversed.
fn respond(frame: &[u8]) -> Vec<u8> {
    frame.iter().rev().copied().collect()
}

/// A worker's loop: take a request, run it, answer it through the ring (ringing the doorbell
/// when the ring says so), until told to leave. Returns the ids it ran.
fn worker(queue: Queue, slot: u32, doorbell: Sender<()>) -> Vec<u64> {
    let mut ran = Vec::new();
    let mut frame = Vec::new();
    loop {
        if queue.leaving(slot) {
            break;
        }
        let Some(Taken { id, fetch }) = queue.take(slot, &mut frame) else {
            queue.wait(slot, Duration::from_secs(1));
            continue;
        };
        assert!(!fetch, "every model frame fits in a cell");
        ran.push(id);
        let started = queue.holding(slot).1;
        let rings = queue
            .answer(slot, id, started, &respond(&frame))
            .expect("a model answer fits in the ring");
        if rings {
            doorbell.send(()).expect("the collector listens");
        }
        queue.done(slot);
    }
    ran
}

/// The collector: drains every ring into `answers` until `want` requests are answered,
/// arming the doorbell and looking once more before each wait. An id answered twice fails.
fn collect(
    queue: &Queue,
    doorbell: &Receiver<()>,
    answers: &mut HashMap<u64, Vec<u8>>,
    want: usize,
) {
    let mut frames = Vec::new();
    loop {
        loop {
            for slot in 0..queue.high() {
                while let Some(answer) = queue.next_answer(slot, &mut frames) {
                    let again = answers.insert(answer.id, std::mem::take(&mut frames));
                    assert_eq!(again, None, "request {} answered twice", answer.id);
                }
            }
            queue.arm();
            if !queue.has_answers() {
                break;
            }
            queue.disarm();
        }
        if answers.len() >= want {
            return;
        }
        doorbell.recv().expect("workers hold the doorbell");
        queue.disarm();
    }
}

/// Runs `requests` through a queue with `workers` workers. The master expires the ids in
/// `expire` while the workers may be taking them, answering 503 for each it wins.
fn serve(workers: u32, requests: &'static [(u64, &'static [u8])], expire: &'static [u64]) {
    check(move || {
        let (queue, _fd) = Queue::create(2).expect("a model region");
        let (ring, doorbell) = channel();
        let handles: Vec<_> = (0..workers)
            .map(|slot| {
                queue.reset_slot(slot);
                let (queue, ring) = (queue.share(), ring.clone());
                thread::spawn(move || worker(queue, slot, ring))
            })
            .collect();
        drop(ring);

        let mut positions = HashMap::new();
        for &(id, frame) in requests {
            positions.insert(id, queue.push(id, frame).expect("room in the ring"));
        }
        let mut answers = HashMap::new();
        for id in expire {
            if queue.expire(positions[id], *id) {
                answers.insert(*id, b"503".to_vec());
            }
        }
        collect(&queue, &doorbell, &mut answers, requests.len());
        queue.close();

        let mut ran: Vec<u64> = handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("a worker"))
            .collect();
        ran.sort_unstable();
        let runs = ran.len();
        ran.dedup();
        assert_eq!(ran.len(), runs, "a request ran twice: {ran:?}");
        for &(id, frame) in requests {
            let answer = &answers[&id];
            if ran.contains(&id) {
                assert_eq!(
                    answer,
                    &respond(frame),
                    "request {id} ran, so its answer is its own"
                );
            } else {
                assert_eq!(
                    answer, b"503",
                    "request {id} did not run, so it was expired"
                );
            }
        }
        assert_eq!(answers.len(), requests.len(), "every request answered");
    });
}

#[test]
fn a_request_runs_at_most_once_and_is_answered_exactly_once() {
    // Two workers race for two requests while the master expires the first.
    serve(2, &[(1, b"first"), (2, b"second")], &[1]);
}

#[test]
fn an_expired_request_is_skipped_and_the_next_one_still_runs() {
    serve(1, &[(1, b"one"), (2, b"two")], &[1, 2]);
}

#[test]
fn a_queued_request_wakes_a_sleeping_worker_and_the_ring_wraps() {
    // One worker, more requests than cells: the producer waits for the worker to free a
    // cell, and each cell is used twice.
    check(|| {
        let (queue, _fd) = Queue::create(2).expect("a model region");
        let (ring, doorbell) = channel();
        queue.reset_slot(0);
        let handle = {
            let queue = queue.share();
            thread::spawn(move || worker(queue, 0, ring))
        };
        let mut answers = HashMap::new();
        for id in 1..=3u64 {
            let frame = [id as u8; 9];
            while queue.push(id, &frame).is_err() {
                collect(&queue, &doorbell, &mut answers, id as usize - 1);
                thread::yield_now();
            }
        }
        collect(&queue, &doorbell, &mut answers, 3);
        queue.close();
        assert_eq!(handle.join().expect("the worker"), vec![1, 2, 3]);
        for id in 1..=3u64 {
            assert_eq!(answers[&id], respond(&[id as u8; 9]));
        }
    });
}

#[test]
fn retiring_a_sleeping_worker_wakes_it_and_closing_wakes_the_rest() {
    check(|| {
        let (queue, _fd) = Queue::create(2).expect("a model region");
        let (ring, _doorbell) = channel();
        let mut handles: Vec<_> = (0..2)
            .map(|slot| {
                queue.reset_slot(slot);
                let (queue, ring) = (queue.share(), ring.clone());
                thread::spawn(move || worker(queue, slot, ring))
            })
            .collect();
        queue.retire(1);
        let retired = handles.pop().expect("two workers");
        assert_eq!(retired.join().expect("worker 1"), Vec::<u64>::new());
        queue.close();
        assert_eq!(
            handles.pop().expect("worker 0").join().expect("worker 0"),
            Vec::<u64>::new()
        );
    });
}

#[test]
fn answers_cross_the_ring_end_whole_and_in_order() {
    // One writer, one reader, records of sizes that meet the ring's end at other offsets
    // each lap (the model's ring is 256 bytes; a record's head is 24).
    check(|| {
        let (queue, _fd) = Queue::create(2).expect("a model region");
        queue.reset_slot(0);
        let writer = {
            let queue = queue.share();
            thread::spawn(move || {
                for id in 1..=5u64 {
                    let frames = vec![id as u8; 20 + 3 * id as usize];
                    while queue.answer(0, id, id * 10, &frames).is_none() {
                        thread::yield_now();
                    }
                }
            })
        };
        let mut frames = Vec::new();
        let mut next = 1u64;
        while next <= 5 {
            match queue.next_answer(0, &mut frames) {
                Some(answer) => {
                    assert_eq!((answer.id, answer.started), (next, next * 10));
                    assert_eq!(frames, vec![next as u8; 20 + 3 * next as usize]);
                    next += 1;
                }
                None => thread::yield_now(),
            }
        }
        writer.join().expect("the writer");
    });
}
