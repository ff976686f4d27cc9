//! The listeners (TCP and, when configured, a Unix socket) and one task per connection:
//! read, run every whole command in the buffer, write the answers in one go.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use strata_core::listen::{accept_until, Accept};
use strata_core::metrics::Counter;
use strata_core::Shutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::store::Store;
use crate::text::{self, Step};

/// What every connection shares.
#[derive(Debug)]
pub struct Context {
    pub store: Arc<Store>,
    pub max_item_bytes: usize,
    pub capacity_bytes: u64,
    pub max_connections: usize,
    pub started: Instant,
    pub connections: Connections,
    /// Per-prefix counts (`stats detail`).
    pub detail: crate::stats::Detail,
    /// Counter values at the last `stats reset`.
    pub baseline: crate::stats::Baseline,
}

/// Connection counters for `stats`.
#[derive(Debug, Default)]
pub struct Connections {
    pub current: AtomicU64,
    pub total: Counter,
    pub rejected: Counter,
}

/// Serves the connections of `listener` (TCP or Unix) until shutdown, at most
/// `max_connections` at a time.
pub async fn serve<L: Accept>(listener: L, ctx: Arc<Context>, shutdown: Shutdown) {
    let slots = Arc::new(Semaphore::new(ctx.max_connections));
    let stop = shutdown.clone();
    accept_until(listener, stop, "cache", |stream| {
        spawn(stream, &ctx, &slots, &shutdown)
    })
    .await;
}

fn spawn<S>(mut stream: S, ctx: &Arc<Context>, slots: &Arc<Semaphore>, shutdown: &Shutdown)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
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
        ctx.connections.total.inc();
        ctx.connections.current.fetch_add(1, Ordering::Relaxed);
        if let Err(error) = connection(stream, &ctx, shutdown).await {
            tracing::debug!(%error, "cache connection ended");
        }
        ctx.connections.current.fetch_sub(1, Ordering::Relaxed);
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

async fn connection<S>(mut stream: S, ctx: &Context, shutdown: Shutdown) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut out = BytesMut::with_capacity(16 * 1024);
    // Bytes of a refused value still to be thrown away as they arrive.
    let mut skip = 0usize;
    loop {
        loop {
            if skip > 0 {
                let n = skip.min(buf.len());
                buf.advance(n);
                skip -= n;
                if skip > 0 {
                    break;
                }
            }
            if buf.is_empty() {
                break;
            }
            match text::step(&buf, ctx, &mut out) {
                Step::Need => break,
                Step::Done(n) => buf.advance(n),
                Step::Swallow { consumed, skip: s } => {
                    buf.advance(consumed);
                    skip = s;
                }
                Step::Close => {
                    stream.write_all(&out).await?;
                    close_gently(stream).await;
                    return Ok(());
                }
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await?;
            out.clear();
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
