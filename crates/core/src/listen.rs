//! Accept loops for the tiers that serve protocols of their own (cache, dbpool), over TCP and
//! Unix listeners alike, until shutdown.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::Shutdown;

/// A listener a tier accepts connections on.
pub trait Accept: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for TcpListener {
    type Stream = TcpStream;

    async fn accept_one(&self) -> std::io::Result<TcpStream> {
        let (stream, _) = self.accept().await?;
        // Request-response protocols: never wait to fill a segment.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Accept for UnixListener {
    type Stream = UnixStream;

    async fn accept_one(&self) -> std::io::Result<UnixStream> {
        Ok(self.accept().await?.0)
    }
}

/// Hands every connection accepted on `listener` to `handle` until `shutdown` is requested.
/// A failed accept (out of file descriptors, say) pauses the loop briefly instead of spinning.
pub async fn accept_until<L: Accept>(
    listener: L,
    shutdown: Shutdown,
    what: &'static str,
    mut handle: impl FnMut(L::Stream),
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept_one() => accepted,
            () = shutdown.requested() => return,
        };
        match accepted {
            Ok(stream) => handle(stream),
            Err(error) => {
                tracing::warn!(%error, "{what}: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
