//! The listeners (TCP and, when configured, a Unix socket) and one task per connection:
//! read, run every whole command in the buffer, write the answers in one go.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use strata_core::listen::{accept_until, Accept};
use strata_core::metrics::Counter;
use strata_core::Shutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::out::Out;
use crate::store::Store;
use crate::text::{self, Step};

/// What every connection shares.
#[derive(Debug)]
pub struct Context {
    pub store: Arc<Store>,
    pub max_item_bytes: usize,
    pub max_connections: usize,
    pub started: Instant,
    pub connections: Connections,
    /// Per-prefix counts (`stats detail`).
    pub detail: crate::stats::Detail,
    /// Counter values at the last `stats reset`.
    pub baseline: crate::stats::Baseline,
    /// Log watchers (`watch`).
    pub watch: Arc<crate::watch::Watch>,
}

impl Context {
    /// A store of `capacity_bytes` and the limits its connections are held to.
    pub fn new(capacity_bytes: u64, max_item_bytes: usize, max_connections: usize) -> Self {
        Self {
            store: Arc::new(Store::new(capacity_bytes)),
            max_item_bytes,
            max_connections,
            started: Instant::now(),
            connections: Connections::default(),
            detail: Default::default(),
            baseline: Default::default(),
            watch: Default::default(),
        }
    }
}

/// Connection counters for `stats`, and the open connections for `stats conns`.
#[derive(Debug, Default)]
pub struct Connections {
    pub current: AtomicU64,
    pub total: Counter,
    pub rejected: Counter,
    /// The last id given to a connection (ids start at 1, in order of arrival).
    last_id: AtomicU64,
    /// Open connections by id: the peer's address.
    open: Mutex<BTreeMap<u64, String>>,
}

impl Connections {
    /// Registers a new connection from `peer`; returns its id.
    fn opened(&self, peer: String) -> u64 {
        let id = self.last_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.total.inc();
        self.current.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, peer);
        id
    }

    fn closed(&self, id: u64) {
        self.current.fetch_sub(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// Each open connection's id and peer, oldest first.
    pub fn list(&self) -> Vec<(u64, String)> {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.iter().map(|(id, peer)| (*id, peer.clone())).collect()
    }
}

/// A client connection's peer, as `stats conns` names it.
pub trait Peer {
    fn peer(&self) -> String;
}

impl Peer for tokio::net::TcpStream {
    fn peer(&self) -> String {
        self.peer_addr()
            .map_or_else(|_| "tcp:unknown".into(), |a| format!("tcp:{a}"))
    }
}

impl Peer for tokio::net::UnixStream {
    fn peer(&self) -> String {
        "unix:".into()
    }
}

/// Serves the connections of `listener` (TCP or Unix) until shutdown, at most
/// `max_connections` at a time.
pub async fn serve<L: Accept>(listener: L, ctx: Arc<Context>, shutdown: Shutdown)
where
    L::Stream: Peer,
{
    let slots = Arc::new(Semaphore::new(ctx.max_connections));
    let stop = shutdown.clone();
    accept_until(listener, stop, "cache", |stream| {
        spawn(stream, &ctx, &slots, &shutdown)
    })
    .await;
}

fn spawn<S>(mut stream: S, ctx: &Arc<Context>, slots: &Arc<Semaphore>, shutdown: &Shutdown)
where
    S: AsyncRead + AsyncWrite + Peer + Unpin + Send + 'static,
{
    let Ok(slot) = slots.clone().try_acquire_owned() else {
        ctx.connections.rejected.inc();
        tokio::spawn(async move {
            let _ = stream
                .write_all(b"SERVER_ERROR too many open connections\r\n")
                .await;
            close_gently(stream).await;
        });
        return;
    };
    let (ctx, shutdown) = (ctx.clone(), shutdown.clone());
    tokio::spawn(async move {
        let id = ctx.connections.opened(stream.peer());
        if let Err(error) = connection(stream, id, &ctx, shutdown).await {
            tracing::debug!(%error, "cache connection ended");
        }
        ctx.connections.closed(id);
        drop(slot);
    });
}

/// Closes after the last answer. Closing with the client's bytes unread would reset the
/// connection, and the client could lose the answer: read what it still sends, for a moment.
async fn close_gently<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drain).await;
}

async fn connection<S>(
    mut stream: S,
    id: u64,
    ctx: &Context,
    shutdown: Shutdown,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = Out::default();
    // Bytes of a refused value still to be thrown away as they arrive.
    let mut skip = 0usize;
    loop {
        match run_buffered(&mut buf, &mut skip, id, ctx, &mut out) {
            Flow::Read => {}
            Flow::Close => {
                out.write_to(&mut stream).await?;
                close_gently(stream).await;
                return Ok(());
            }
            Flow::Watch(kinds) => {
                out.extend_from_slice(b"OK\r\n");
                out.write_to(&mut stream).await?;
                return watch(stream, ctx.watch.subscribe(kinds), shutdown).await;
            }
        }
        if !out.is_empty() {
            out.write_to(&mut stream).await?;
        }
        buf.reserve(16 * 1024);
        let read = tokio::select! {
            read = stream.read_buf(&mut buf) => read?,
            () = shutdown.requested() => return Ok(()),
        };
        if read == 0 {
            return Ok(());
        }
    }
}

/// What a connection does once the commands in its buffer have run.
pub(crate) enum Flow {
    /// Write the answers, read more.
    Read,
    /// Write the answers, close.
    Close,
    /// Write the answers and `OK`, then serve log lines.
    Watch(crate::watch::Kinds),
}

/// Runs every whole command in `buf` (after throwing away `skip` bytes of a refused value),
/// answers into `out`: the connection's work between two reads, without the socket.
pub(crate) fn run_buffered(
    buf: &mut BytesMut,
    skip: &mut usize,
    id: u64,
    ctx: &Context,
    out: &mut Out,
) -> Flow {
    loop {
        if *skip > 0 {
            let n = (*skip).min(buf.len());
            buf.advance(n);
            *skip -= n;
            if *skip > 0 {
                return Flow::Read;
            }
        }
        if buf.is_empty() {
            return Flow::Read;
        }
        match text::step(buf, id, ctx, out) {
            Step::Need => return Flow::Read,
            Step::Done(n) => buf.advance(n),
            Step::Swallow { consumed, skip: s } => {
                buf.advance(consumed);
                *skip = s;
            }
            Step::Close => return Flow::Close,
            Step::Watch(kinds) => return Flow::Watch(kinds),
        }
    }
}

/// A watcher's connection: the log lines it asked for, until it closes (what it sends is
/// ignored, as memcached does).
async fn watch<S>(
    mut stream: S,
    mut feed: crate::watch::Subscription,
    shutdown: Shutdown,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut sink = [0u8; 1024];
    loop {
        tokio::select! {
            line = feed.next() => match line {
                Some(line) => stream.write_all(line.as_bytes()).await?,
                None => return Ok(()),
            },
            read = stream.read(&mut sink) => {
                if read? == 0 {
                    return Ok(());
                }
            }
            () = shutdown.requested() => return Ok(()),
        }
    }
}
