//! Coalescing: one origin fetch per primary key at a time; the requests that arrive meanwhile
//! wait for its outcome instead of reaching the origin.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::object::Object;

/// What a fetch ended with, as its waiters see it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A stored (or stale-but-usable) object: serve it if its `Vary` matches.
    Object(Arc<Object>),
    /// Not storable: go to the origin yourself, without waiting for anyone.
    Uncacheable,
}

type Slot = watch::Sender<Option<Outcome>>;

/// The fetches in progress.
#[derive(Debug, Default)]
pub struct Flights {
    map: Arc<Mutex<HashMap<Arc<str>, Slot>>>,
}

/// Being first for a key: fetch, then [`Lead::publish`].
#[derive(Debug)]
pub struct Lead {
    key: Arc<str>,
    map: Arc<Mutex<HashMap<Arc<str>, Slot>>>,
    slot: Slot,
    published: bool,
}

/// Joining a fetch in progress.
pub type Wait = watch::Receiver<Option<Outcome>>;

/// Either lead a fetch or wait for the one in progress.
#[derive(Debug)]
pub enum Join {
    Lead(Lead),
    Wait(Wait),
}

impl Flights {
    pub fn join(&self, key: &str) -> Join {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = map.get(key) {
            return Join::Wait(slot.subscribe());
        }
        let key: Arc<str> = Arc::from(key);
        let (slot, _) = watch::channel(None);
        map.insert(key.clone(), slot.clone());
        Join::Lead(Lead {
            key,
            map: self.map.clone(),
            slot,
            published: false,
        })
    }
}

impl Lead {
    /// Releases the waiters with `outcome` and ends the flight.
    pub fn publish(mut self, outcome: Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: Outcome) {
        if self.published {
            return;
        }
        self.published = true;
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        self.slot.send_replace(Some(outcome));
    }
}

impl Drop for Lead {
    /// A leader that goes away without an outcome (its task was cancelled) must not leave its
    /// waiters hanging: they go to the origin themselves.
    fn drop(&mut self) {
        self.end(Outcome::Uncacheable);
    }
}

/// Waits for the fetch's outcome.
pub async fn outcome(mut wait: Wait) -> Outcome {
    match wait.wait_for(Option::is_some).await {
        Ok(value) => value.clone().unwrap_or(Outcome::Uncacheable),
        Err(_) => Outcome::Uncacheable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_second_waits_and_a_dropped_lead_releases_it() {
        let flights = Flights::default();
        let Join::Lead(lead) = flights.join("k") else {
            panic!("first must lead")
        };
        let Join::Wait(wait) = flights.join("k") else {
            panic!("second must wait")
        };
        drop(lead);
        assert!(matches!(outcome(wait).await, Outcome::Uncacheable));
        assert!(matches!(flights.join("k"), Join::Lead(_)));
    }
}
