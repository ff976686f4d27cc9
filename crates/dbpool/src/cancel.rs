//! Cancel keys. Each client gets a key of the pooler's own at login (its server connection
//! may change with every transaction); a cancel request with that key goes to the server
//! connection the client holds at that moment, under that connection's real key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

/// The server connection (backend pid and key) a client holds, if any.
pub type Slot = Arc<Mutex<Option<(i32, i32)>>>;

/// Every logged-in client's key.
#[derive(Debug, Default)]
pub struct Cancels {
    next: AtomicI32,
    clients: Mutex<HashMap<i32, (i32, Slot)>>,
}

/// A client's key, withdrawn when dropped.
#[derive(Debug)]
pub struct Ticket {
    pub pid: i32,
    pub key: i32,
    pub slot: Slot,
    cancels: Arc<Cancels>,
}

impl Cancels {
    /// A new key for a client logging in; `secret` makes it unguessable.
    pub fn issue(self: &Arc<Self>, secret: i32) -> Ticket {
        let pid = self.next.fetch_add(1, Ordering::Relaxed).wrapping_add(1) & i32::MAX;
        let slot = Slot::default();
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.insert(pid, (secret, slot.clone()));
        Ticket {
            pid,
            key: secret,
            slot,
            cancels: self.clone(),
        }
    }

    /// The server connection to cancel for a request with `pid` and `key`, if the key is
    /// right and its client holds one.
    pub fn target(&self, pid: i32, key: i32) -> Option<(i32, i32)> {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let (secret, slot) = clients.get(&pid)?;
        if *secret != key {
            return None;
        }
        let target = *slot.lock().unwrap_or_else(|e| e.into_inner());
        target
    }
}

impl Ticket {
    /// Records the server connection the client now holds (`None`: it holds none).
    pub fn hold(&self, server: Option<(i32, i32)>) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = server;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut clients = self
            .cancels
            .clients
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        clients.remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_reaches_the_held_connection_only_with_the_right_key() {
        let cancels = Arc::new(Cancels::default());
        let ticket = cancels.issue(42);
        assert_eq!(cancels.target(ticket.pid, 42), None);
        ticket.hold(Some((1000, 7)));
        assert_eq!(cancels.target(ticket.pid, 42), Some((1000, 7)));
        assert_eq!(cancels.target(ticket.pid, 41), None);
        let pid = ticket.pid;
        drop(ticket);
        assert_eq!(cancels.target(pid, 42), None);
    }
}
