//! A logged-in client's messages and their answers. The client borrows a server connection
//! when it sends something the server must see, and gives it back when the transaction is
//! over and nothing is outstanding (transaction mode), or when it leaves (session mode, or a
//! client pinned by session state). On each new connection the client's tracked parameters
//! are set first and its prepared statements prepared as they are used.

use std::collections::HashMap;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cancel::Ticket;
use crate::client::Stream;
use crate::flow::{Flow, Prepared, Step, Verdict};
use crate::pool::{AcquireError, Entry, Lent, Pool};
use crate::prepared::{self, server_name};
use crate::state;
use crate::wire::{self, WireError};

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("unexpected message {0:?} from the client")]
    Unexpected(char),
    #[error("the server connection was lost")]
    ServerLost,
    #[error("the client went away")]
    ClientGone,
}

/// One client's side of the relay.
pub struct Relay<'a> {
    pool: &'a Pool,
    entry: std::sync::Arc<Entry>,
    /// Tracked parameters as the client believes them.
    params: state::Tracked,
    ticket: Ticket,
    transaction_mode: bool,
    link: Option<Lent>,
    flow: Flow,
    /// The client's prepared statements, by its name (transaction mode).
    statements: HashMap<Bytes, u64>,
    /// Why the client keeps its server connection to the end, if it does.
    pinned: Option<&'static str>,
    /// A `BEGIN` already answered, to be sent ahead of the transaction's first statement.
    begun: Option<Bytes>,
    to_server: BytesMut,
    to_client: BytesMut,
}

enum Event {
    Client(std::io::Result<usize>),
    Server(std::io::Result<usize>),
}

impl<'a> Relay<'a> {
    pub fn new(
        pool: &'a Pool,
        entry: std::sync::Arc<Entry>,
        params: state::Tracked,
        ticket: Ticket,
        link: Option<Lent>,
    ) -> Self {
        let mut relay = Self {
            pool,
            entry,
            params,
            ticket,
            transaction_mode: pool.config.transaction_mode(),
            link: None,
            flow: Flow::default(),
            statements: HashMap::new(),
            pinned: None,
            begun: None,
            to_server: BytesMut::new(),
            to_client: BytesMut::new(),
        };
        if let Some(lent) = link {
            relay.adopt(lent);
        }
        relay
    }

    /// Relays until the client leaves, then gives the server connection back.
    pub async fn run<S: Stream>(mut self, client: &mut S) -> Result<(), RelayError> {
        let result = self.serve(client).await;
        if let Err(error) = &result {
            let fatal = match error {
                RelayError::ClientGone => None,
                RelayError::Acquire(error) => Some((error.code().to_owned(), error.to_string())),
                RelayError::ServerLost => Some(("08006".into(), error.to_string())),
                _ => Some(("08P01".into(), error.to_string())),
            };
            if let Some((code, text)) = fatal {
                let mut out = BytesMut::new();
                wire::error_response(&mut out, "FATAL", &code, &text);
                let _ = client.write_all(&out).await;
            }
        }
        self.ticket.hold(None);
        if let Some(lent) = self.link.take() {
            if self.may_give_back() {
                self.pool.put_back(lent);
            } else if !matches!(result, Err(RelayError::ServerLost)) {
                self.pool.release(lent).await;
            }
        }
        result
    }

    async fn serve<S: Stream>(&mut self, client: &mut S) -> Result<(), RelayError> {
        let mut from_client = BytesMut::with_capacity(8192);
        let mut from_server = BytesMut::with_capacity(16384);
        loop {
            room(&mut from_client);
            room(&mut from_server);
            let event = match self.link.as_mut() {
                Some(lent) => tokio::select! {
                    read = lent.conn.stream.read_buf(&mut from_server) => Event::Server(read),
                    read = client.read_buf(&mut from_client) => Event::Client(read),
                },
                None => Event::Client(client.read_buf(&mut from_client).await),
            };
            match event {
                Event::Client(Ok(0) | Err(_)) => return Err(RelayError::ClientGone),
                Event::Client(Ok(_)) => {
                    while let Some(len) = frame(&mut from_client)? {
                        let message = from_client.split_to(len).freeze();
                        if !self.on_client(message).await? {
                            self.flush(client).await?;
                            return Ok(());
                        }
                    }
                }
                Event::Server(Ok(0) | Err(_)) => {
                    self.link = None;
                    self.flush(client).await?;
                    return Err(RelayError::ServerLost);
                }
                Event::Server(Ok(_)) => {
                    self.server_messages(&mut from_server)?;
                    self.flow.pay(&mut self.to_client);
                    if from_server.is_empty() {
                        self.give_back_if_done();
                    }
                }
            }
            self.flush(client).await?;
        }
    }

    /// Sends what is due to the server, then to the client.
    async fn flush<S: Stream>(&mut self, client: &mut S) -> Result<(), RelayError> {
        if !self.to_server.is_empty() {
            if let Some(lent) = self.link.as_mut() {
                if lent.conn.stream.write_all(&self.to_server).await.is_err() {
                    self.link = None;
                    return Err(RelayError::ServerLost);
                }
            }
            self.to_server.clear();
        }
        if !self.to_client.is_empty() {
            client
                .write_all(&self.to_client)
                .await
                .map_err(|_| RelayError::ClientGone)?;
            self.to_client.clear();
        }
        Ok(())
    }

    /// Whether the held connection may go back to the pool as it is: transaction mode, no
    /// pin, the transaction over with nothing outstanding.
    fn may_give_back(&self) -> bool {
        self.transaction_mode && self.pinned.is_none() && self.flow.at_rest()
    }

    /// Whether a `BEGIN` can be answered before the transaction has a server connection:
    /// transaction mode, no connection held, no transaction open.
    fn may_begin_early(&self) -> bool {
        self.transaction_mode
            && self.link.is_none()
            && self.pinned.is_none()
            && self.flow.is_empty()
            && self.flow.status == b'I'
    }

    /// In transaction mode, a connection whose transaction is over goes back to the pool.
    fn give_back_if_done(&mut self) {
        if self.may_give_back() {
            if let Some(lent) = self.link.take() {
                self.ticket.hold(None);
                self.pool.put_back(lent);
            }
        }
    }

    /// Makes sure the client holds a server connection, sending it the `BEGIN` answered
    /// early, if any (its answer is dropped: the client has had it).
    async fn link(&mut self) -> Result<&mut Lent, RelayError> {
        if self.link.is_none() {
            let lent = self.pool.acquire(&self.entry).await?;
            self.adopt(lent);
            if let Some(begin) = self.begun.take() {
                self.forward(&begin);
                self.flow.sent_ready(true, false);
            }
        }
        Ok(self.link.as_mut().expect("linked above"))
    }

    /// Takes a server connection, first giving it the client's tracked parameters.
    fn adopt(&mut self, lent: Lent) {
        let differ = self.params.differing(&lent.conn.tracked);
        if !differ.is_empty() {
            wire::query(&mut self.to_server, &state::set_query(&differ));
            self.flow.sent_ready(true, false);
        }
        self.ticket.hold(Some((lent.conn.pid, lent.conn.key)));
        self.link = Some(lent);
    }

    fn renames(&self) -> bool {
        self.transaction_mode && self.pool.config.max_prepared_statements > 0
    }

    /// Handles one client message; false when the client said goodbye.
    async fn on_client(&mut self, message: Bytes) -> Result<bool, RelayError> {
        match message[0] {
            b'X' => return Ok(false),
            b'Q' => self.query(message).await?,
            b'F' => {
                self.link().await?;
                self.forward(&message);
                self.flow.sent_ready(false, false);
            }
            b'S' => {
                if self.link.is_none() {
                    // Nothing is pending on any server: the pooler can say it is ready.
                    self.flow.owe(ready(self.flow.status));
                } else {
                    self.forward(&message);
                    self.flow.sent_ready(false, true);
                }
            }
            b'H' => {
                if self.link.is_some() {
                    self.forward(&message);
                }
            }
            b'P' => self.parse(message).await?,
            b'B' => self.bind(message).await?,
            b'D' => self.describe(message).await?,
            b'E' => self.step(&message, Step::Execute).await?,
            b'C' => self.close(message).await?,
            b'd' | b'c' | b'f' => {
                if self.link.is_some() {
                    self.forward(&message);
                }
            }
            other => return Err(RelayError::Unexpected(other as char)),
        }
        self.flow.pay(&mut self.to_client);
        Ok(true)
    }

    fn forward(&mut self, message: &[u8]) {
        self.to_server.extend_from_slice(message);
    }

    /// Forwards an extended-protocol message as it is.
    async fn step(&mut self, message: &[u8], step: Step) -> Result<(), RelayError> {
        self.link().await?;
        self.forward(message);
        self.flow.sent_step(step, false, None);
        Ok(())
    }

    /// Notes SQL that leaves session state (the client is pinned, or the use reported) or
    /// drops a database (the pool's idle connections to it are closed first, as PostgreSQL
    /// refuses to drop a database anyone is connected to). Only SQL that is not
    /// [`state::ordinary`] needs this look.
    fn watch(&mut self, sql: &[u8]) {
        if let Some(database) = state::drops_database(sql) {
            self.pool.forget(&database);
        }
        if !self.transaction_mode || self.pinned.is_some() {
            return;
        }
        let Some(what) = state::session_state(sql) else {
            return;
        };
        self.pool.counts.session_state.inc();
        if self.pool.config.on_session_state == "pin" {
            tracing::debug!(what, "dbpool: client pinned to its server connection");
            self.pool.counts.pinned.inc();
            self.pinned = Some(what);
        } else {
            tracing::warn!(
                what,
                "dbpool: a client left session state on a pooled server connection"
            );
        }
    }

    async fn query(&mut self, message: Bytes) -> Result<(), RelayError> {
        let sql = &message[5..message.len().saturating_sub(1)];
        if self.may_begin_early() {
            if let Some(tag) = state::plain_begin(sql) {
                // Answered now; the transaction takes a server connection with its first
                // statement, which saves it a round trip on a borrowed connection.
                self.flow.owe(wire::framed(b'C', |b| {
                    b.extend_from_slice(tag.as_bytes());
                    b.extend_from_slice(b"\0");
                }));
                self.flow.status = b'T';
                self.flow.owe(ready(b'T'));
                self.begun = Some(message);
                return Ok(());
            }
        }
        let ordinary = state::ordinary(sql);
        if !ordinary {
            self.watch(sql);
        }
        let mut drops_all = false;
        if self.renames() && !ordinary {
            drops_all = state::drops_all_statements(sql);
            if drops_all {
                self.statements.clear();
            } else if let Some(name) = state::deallocates(sql) {
                if self.flow.is_empty() && self.statements.remove(name.as_bytes()).is_some() {
                    // The statement is the client's alone to forget; the server keeps its own.
                    self.flow
                        .owe(wire::framed(b'C', |b| b.extend_from_slice(b"DEALLOCATE\0")));
                    self.flow.owe(ready(self.flow.status));
                    return Ok(());
                }
            }
        }
        let lent = self.link().await?;
        if drops_all {
            lent.conn.prepared.clear();
        }
        self.forward(&message);
        self.flow.sent_ready(false, false);
        Ok(())
    }

    async fn parse(&mut self, message: Bytes) -> Result<(), RelayError> {
        if let Some(text) = prepared::parse_text(&message).filter(|t| !state::ordinary(t)) {
            self.watch(text);
        }
        let named = prepared::parse_parts(&message).filter(|(name, _)| !name.is_empty());
        let Some((name, key)) = named.filter(|_| self.renames() && !self.flow.skipping()) else {
            return self.step(&message, Step::Parse).await;
        };
        let name = Bytes::copy_from_slice(name);
        let (id, parse) = self.pool.statements.intern(key);
        if self.link.is_none()
            && !self.statements.contains_key(&name)
            && self.pool.statements.accepted(id)
        {
            // Known good: answered now, prepared on a server when a Bind needs it. A client
            // that prepares between transactions never waits for a connection to do so.
            self.statements.insert(name, id);
            self.flow.owe(wire::framed(b'1', |_| {}));
            return Ok(());
        }
        self.link().await?;
        if let Some(&existing) = self.statements.get(&name) {
            // A second statement under one name: PostgreSQL refuses it, and says so.
            self.ensure(existing);
            let again = wire::framed(b'P', |b| {
                b.extend_from_slice(server_name(existing).as_bytes());
                b.extend_from_slice(b"\0");
                b.extend_from_slice(key);
            });
            self.forward(&again);
            self.flow.sent_step(Step::Parse, false, None);
            return Ok(());
        }
        self.statements.insert(name.clone(), id);
        let lent = self.link.as_mut().expect("linked");
        if lent.conn.prepared.contains(id) {
            lent.conn.prepared.touch(id);
            self.flow.owe(wire::framed(b'1', |_| {}));
            return Ok(());
        }
        self.evict();
        let lent = self.link.as_mut().expect("linked");
        lent.conn.prepared.touch(id);
        self.forward(&parse);
        let prepares = Prepared {
            id,
            client_name: Some(name),
        };
        self.flow.sent_step(Step::Parse, false, Some(prepares));
        Ok(())
    }

    /// Prepares statement `id` on the linked connection if it is not there yet.
    fn ensure(&mut self, id: u64) {
        let lent = self.link.as_mut().expect("linked");
        if lent.conn.prepared.contains(id) {
            lent.conn.prepared.touch(id);
            return;
        }
        self.evict();
        let Some(parse) = self.pool.statements.parse(id) else {
            return;
        };
        self.link.as_mut().expect("linked").conn.prepared.touch(id);
        self.forward(&parse);
        let prepares = Prepared {
            id,
            client_name: None,
        };
        self.flow.sent_step(Step::Parse, true, Some(prepares));
    }

    /// Closes the least recently used statements beyond `max_prepared_statements`.
    fn evict(&mut self) {
        let limit = self.pool.config.max_prepared_statements.saturating_sub(1);
        loop {
            let lent = self.link.as_mut().expect("linked");
            let Some(old) = lent.conn.prepared.evict(limit) else {
                return;
            };
            self.forward(&prepared::retarget(b'C', old));
            self.flow.sent_step(Step::Close, true, None);
        }
    }

    /// The pooler-wide id of the client's statement `name`, when names are rewritten.
    fn statement(&self, name: &[u8]) -> Option<u64> {
        if !self.renames() || self.flow.skipping() || name.is_empty() {
            return None;
        }
        self.statements.get(name).copied()
    }

    async fn bind(&mut self, message: Bytes) -> Result<(), RelayError> {
        let Some((portal, statement, rest)) = prepared::bind_parts(&message) else {
            return self.step(&message, Step::Bind).await;
        };
        let Some(id) = self.statement(statement) else {
            return self.step(&message, Step::Bind).await;
        };
        self.link().await?;
        self.ensure(id);
        self.forward(&prepared::rebind(portal, id, rest));
        self.flow.sent_step(Step::Bind, false, None);
        Ok(())
    }

    async fn describe(&mut self, message: Bytes) -> Result<(), RelayError> {
        let id = match prepared::target(&message) {
            Some((b'S', name)) => self.statement(name),
            _ => None,
        };
        let Some(id) = id else {
            return self.step(&message, Step::Describe).await;
        };
        self.link().await?;
        self.ensure(id);
        self.forward(&prepared::retarget(b'D', id));
        self.flow.sent_step(Step::Describe, false, None);
        Ok(())
    }

    async fn close(&mut self, message: Bytes) -> Result<(), RelayError> {
        match prepared::target(&message) {
            Some((b'S', name)) if self.renames() && !self.flow.skipping() => {
                // The server keeps the statement for other clients; this client forgets it.
                self.statements.remove(name);
                self.flow.owe(wire::framed(b'3', |_| {}));
                Ok(())
            }
            _ => self.step(&message, Step::Close).await,
        }
    }

    /// Handles the whole server messages at the front of `buf`. Messages forwarded one
    /// after another are copied to the client's buffer in one piece; an answer the pooler
    /// owes the client, or a message it drops, ends such a piece.
    fn server_messages(&mut self, buf: &mut BytesMut) -> Result<(), RelayError> {
        let (mut at, mut piece) = (0, 0);
        while let Some(len) = wire::frame_len(&buf[at..]).map_err(|_| RelayError::ServerLost)? {
            if self.flow.owes_now() {
                self.to_client.extend_from_slice(&buf[piece..at]);
                piece = at;
                self.flow.pay(&mut self.to_client);
            }
            if !self.on_server(&buf[at..at + len]) {
                self.to_client.extend_from_slice(&buf[piece..at]);
                piece = at + len;
            }
            at += len;
        }
        self.to_client.extend_from_slice(&buf[piece..at]);
        buf.advance(at);
        frame(buf).map_err(|_| RelayError::ServerLost)?;
        Ok(())
    }

    /// Accounts for one whole server message; true when it goes on to the client.
    fn on_server(&mut self, message: &[u8]) -> bool {
        let Some(lent) = self.link.as_mut() else {
            return false;
        };
        let tag = message[0];
        let status = if tag == b'Z' { message[5] } else { 0 };
        let mut reported = None;
        if tag == b'S' {
            if let Some((name, value)) = wire::parameter_status_fields(message) {
                lent.conn.set_param(&name, &value);
                reported = Some((name, value));
            }
        }
        let statements = &mut self.statements;
        let registry = &self.pool.statements;
        let verdict = self.flow.received(tag, status, |p, ok| {
            if ok {
                registry.accept(p.id);
            } else {
                lent.conn.prepared.forget(p.id);
                if let Some(name) = p.client_name {
                    if statements.get(&name) == Some(&p.id) {
                        statements.remove(&name);
                    }
                }
            }
        });
        if verdict == Verdict::Drop {
            return false;
        }
        if let Some((name, value)) = reported {
            self.params.set(&name, &value);
        }
        true
    }
}

/// ReadyForQuery with `status`.
fn ready(status: u8) -> Bytes {
    wire::framed(b'Z', |b| b.extend_from_slice(&[status]))
}

/// The length of the whole message at the front of `buf`, making room for the rest of it.
fn frame(buf: &mut BytesMut) -> Result<Option<usize>, WireError> {
    let len = wire::frame_len(buf)?;
    if len.is_none() && buf.len() >= 5 {
        let total = 1 + i32::from_be_bytes(buf[1..5].try_into().expect("4 bytes")) as usize;
        buf.reserve(total - buf.len());
    }
    Ok(len)
}

/// Keeps some free space for the next read.
fn room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16384);
    }
}
