//! Protocol-level prepared statements under transaction pooling. A client's statement names
//! stand for pooler-wide statements keyed by their text and parameter types: the same
//! statement prepared by many clients is prepared once per server connection under the
//! pooler's name (`strata_<id>`), and prepared again, unseen by the client, on whichever
//! server connection the client lands on next.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::{BufMut, Bytes};

use crate::wire::framed as message;

/// Every statement any client prepared, by text and parameter types.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Statements>,
}

#[derive(Debug, Default)]
struct Statements {
    ids: HashMap<Bytes, u64>,
    /// The Parse message under the pooler's name, by id.
    parses: HashMap<u64, Bytes>,
    /// Statements a server has accepted: a client's Parse of one is answered at once, and
    /// the statement prepared when a Bind or Describe needs it.
    accepted: std::collections::HashSet<u64>,
}

impl Registry {
    /// The id of the statement whose Parse body after the name is `key`, and its Parse
    /// message under the pooler's name.
    pub fn intern(&self, key: &[u8]) -> (u64, Bytes) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = inner.ids.get(key) {
            return (id, inner.parses[&id].clone());
        }
        let id = inner.ids.len() as u64 + 1;
        let parse = message(b'P', |b| {
            b.put_slice(server_name(id).as_bytes());
            b.put_u8(0);
            b.put_slice(key);
        });
        inner.ids.insert(Bytes::copy_from_slice(key), id);
        inner.parses.insert(id, parse.clone());
        (id, parse)
    }

    /// The Parse message of statement `id`.
    pub fn parse(&self, id: u64) -> Option<Bytes> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.parses.get(&id).cloned()
    }

    /// Records that a server accepted statement `id`.
    pub fn accept(&self, id: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.accepted.insert(id);
    }

    /// Whether a server has accepted statement `id`.
    pub fn accepted(&self, id: u64) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.accepted.contains(&id)
    }

    /// How many distinct statements clients have prepared.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ids
            .len()
    }
}

/// The name a statement has on server connections.
pub fn server_name(id: u64) -> String {
    format!("strata_{id}")
}

/// Statements prepared on one server connection, with when each was last used, so the least
/// recently used goes first when there are too many.
#[derive(Debug, Default)]
pub struct OnServer {
    used: HashMap<u64, u64>,
    clock: u64,
}

impl OnServer {
    pub fn contains(&self, id: u64) -> bool {
        self.used.contains_key(&id)
    }

    /// Marks `id` used (and prepared, or about to be).
    pub fn touch(&mut self, id: u64) {
        self.clock += 1;
        self.used.insert(id, self.clock);
    }

    pub fn forget(&mut self, id: u64) {
        self.used.remove(&id);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    /// With more than `limit` statements, the least recently used one to close.
    pub fn evict(&mut self, limit: usize) -> Option<u64> {
        if self.used.len() <= limit {
            return None;
        }
        let (&id, _) = self.used.iter().min_by_key(|(_, used)| **used)?;
        self.used.remove(&id);
        Some(id)
    }
}

/// Splits a NUL-terminated string off the front of `bytes`.
pub fn cstr(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = bytes.iter().position(|b| *b == 0)?;
    Some((&bytes[..end], &bytes[end + 1..]))
}

/// A Parse: the statement name, and what follows it (text and parameter types).
pub fn parse_parts(msg: &[u8]) -> Option<(&[u8], &[u8])> {
    cstr(msg.get(5..)?)
}

/// The text of a Parse's statement.
pub fn parse_text(msg: &[u8]) -> Option<&[u8]> {
    let (_, rest) = parse_parts(msg)?;
    Some(cstr(rest)?.0)
}

/// A Bind: the portal name, the statement name, and the rest.
pub fn bind_parts(msg: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (portal, rest) = cstr(msg.get(5..)?)?;
    let (statement, rest) = cstr(rest)?;
    Some((portal, statement, rest))
}

/// A Bind with its statement renamed to statement `id`.
pub fn rebind(portal: &[u8], id: u64, rest: &[u8]) -> Bytes {
    message(b'B', |b| {
        b.put_slice(portal);
        b.put_u8(0);
        b.put_slice(server_name(id).as_bytes());
        b.put_u8(0);
        b.put_slice(rest);
    })
}

/// A Describe or Close: the kind (`S` statement, `P` portal) and the name.
pub fn target(msg: &[u8]) -> Option<(u8, &[u8])> {
    let kind = *msg.get(5)?;
    Some((kind, cstr(msg.get(6..)?)?.0))
}

/// A Describe or Close (`tag`) of statement `id`.
pub fn retarget(tag: u8, id: u64) -> Bytes {
    message(tag, |b| {
        b.put_u8(b'S');
        b.put_slice(server_name(id).as_bytes());
        b.put_u8(0);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_statement_gets_the_same_id_and_a_renamed_parse() {
        let registry = Registry::default();
        let (a, parse) = registry.intern(b"select $1\0\0\x01\0\0\0\x17");
        let (b, _) = registry.intern(b"select $1\0\0\x01\0\0\0\x17");
        let (c, _) = registry.intern(b"select $1\0\0\0");
        assert_eq!(a, b);
        assert_ne!(a, c);
        let (name, rest) = parse_parts(&parse).unwrap();
        assert_eq!(name, b"strata_1");
        assert_eq!(rest, b"select $1\0\0\x01\0\0\0\x17");
        assert_eq!(parse_text(&parse).unwrap(), b"select $1");
        assert_eq!(registry.parse(a).unwrap(), parse);
    }

    #[test]
    fn binds_and_describes_are_renamed() {
        let bind = message(b'B', |b| b.put_slice(b"p1\0_pg3_0\0\0\0\0\0\0\0"));
        let (portal, statement, rest) = bind_parts(&bind).unwrap();
        assert_eq!((portal, statement), (&b"p1"[..], &b"_pg3_0"[..]));
        let renamed = rebind(portal, 4, rest);
        assert_eq!(
            bind_parts(&renamed).unwrap(),
            (&b"p1"[..], &b"strata_4"[..], rest)
        );
        let describe = retarget(b'D', 9);
        assert_eq!(target(&describe).unwrap(), (b'S', &b"strata_9"[..]));
    }

    #[test]
    fn the_least_recently_used_statement_is_evicted() {
        let mut on = OnServer::default();
        on.touch(1);
        on.touch(2);
        on.touch(1);
        assert_eq!(on.evict(2), None);
        on.touch(3);
        assert_eq!(on.evict(2), Some(2));
        assert!(on.contains(1) && on.contains(3) && !on.contains(2));
    }
}
