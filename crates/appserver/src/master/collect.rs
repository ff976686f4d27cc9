//! The collector: one task that drains the workers' answer rings when the doorbell rings.
//!
//! It drains every ring, arms the doorbell, and looks once more before it waits, so an
//! answer written while it was draining is never left waiting for the next ring. Under load
//! it is woken once per batch of answers, not once per answer. The supervisor's tick drains
//! too, so no answer waits longer than a tick even if a ring of the doorbell were lost, and a
//! worker's ring is drained once more when it exits, before its slot can be handed on.

use std::sync::Arc;

use tokio::net::unix::pipe;

use super::Shared;

/// Runs for the life of the app server.
pub async fn collect(shared: Arc<Shared>) {
    let Some(reader) = shared.dispatch.take_doorbell_reader() else {
        return;
    };
    let bell = match pipe::Receiver::from_owned_fd(reader) {
        Ok(bell) => bell,
        Err(error) => {
            // Workers still ring it; answers would wait. This cannot happen for a new pipe.
            tracing::error!(%error, "cannot watch the answer doorbell");
            return;
        }
    };
    let queue = shared.dispatch.queue().clone();
    let mut frames = Vec::new();
    loop {
        loop {
            drain(&shared, &mut frames);
            queue.arm();
            if !queue.has_answers() {
                break;
            }
            queue.disarm();
        }
        if bell.readable().await.is_err() {
            return;
        }
        let mut rings = [0u8; 64];
        while let Ok(1..) = bell.try_read(&mut rings) {}
        queue.disarm();
    }
}

/// Hands every waiting answer to its exchange.
pub fn drain(shared: &Shared, frames: &mut Vec<u8>) {
    let _reader = shared.dispatch.answer_reader();
    for slot in 0..shared.dispatch.queue().high() {
        drain_one(shared, slot, frames);
    }
}

/// Hands the answers in one worker's ring to their exchanges.
pub fn drain_slot(shared: &Shared, slot: u32, frames: &mut Vec<u8>) {
    let _reader = shared.dispatch.answer_reader();
    drain_one(shared, slot, frames);
}

/// Drains one ring; the caller is its one reader ([`super::dispatch::Dispatch::answer_reader`]).
fn drain_one(shared: &Shared, slot: u32, frames: &mut Vec<u8>) {
    let queue = shared.dispatch.queue();
    while let Some(answer) = queue.next_answer(slot, frames) {
        shared
            .dispatch
            .deliver(answer, std::mem::take(frames), &shared.metrics);
        if let Some(id) = shared.pool.id_of_slot(slot) {
            shared.completed(id);
        }
    }
}
