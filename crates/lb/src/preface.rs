//! The HTTP/2 connection preface on a connection whose ALPN chose `h2` (RFC 9113 §3.4): read
//! and checked before hyper sees the connection. A client that sends anything else (an
//! HTTP/1.1 request, garbage) gets `SETTINGS` and a `GOAWAY` with `PROTOCOL_ERROR`, so it
//! learns why the connection closes; hyper's HTTP/2 side would close without a word, which
//! the RFC allows but leaves a client guessing. A good preface is handed back to hyper in
//! front of the rest of the stream ([`Prefixed`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// What every HTTP/2 client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An empty `SETTINGS` frame, then `GOAWAY` (last stream 0, `PROTOCOL_ERROR`).
const REFUSAL: [u8; 26] = [
    0, 0, 0, 0x4, 0, 0, 0, 0, 0, // SETTINGS, no payload
    0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY, 8 bytes
    0, 0, 0, 0, // last stream id
    0, 0, 0, 0x1, // PROTOCOL_ERROR
];

/// Reads the preface from `io` within `timeout`. `Ok(Some)` is the stream with the preface
/// put back; `Ok(None)` means the client sent something else and was told so, or went
/// silent or away.
pub async fn expect<I>(mut io: I, timeout: Duration) -> io::Result<Option<Prefixed<I>>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut got = Vec::with_capacity(PREFACE.len());
    let read = async {
        let mut chunk = [0u8; PREFACE.len()];
        while got.len() < PREFACE.len() {
            let want = PREFACE.len() - got.len();
            let n = io.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Ok(false);
            }
            got.extend_from_slice(&chunk[..n]);
            // Stop at the first byte that cannot be the preface.
            if !PREFACE.starts_with(&got) {
                return Ok(false);
            }
        }
        Ok::<_, io::Error>(true)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(true)) => Ok(Some(Prefixed {
            prefix: got,
            at: 0,
            io,
        })),
        Ok(Ok(false)) => {
            if !got.is_empty() {
                let _ = io.write_all(&REFUSAL).await;
                let _ = io.shutdown().await;
            }
            Ok(None)
        }
        Ok(Err(error)) => Err(error),
        Err(_) => Ok(None),
    }
}

/// A stream that reads `prefix` before the rest of `io`.
pub struct Prefixed<I> {
    prefix: Vec<u8>,
    at: usize,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.prefix.len() {
            let rest = &this.prefix[this.at..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn a_good_preface_is_handed_back_and_anything_else_is_refused() {
        let (mut client, server) = duplex(1024);
        client.write_all(PREFACE).await.unwrap();
        client.write_all(b"frames").await.unwrap();
        let mut stream = expect(server, Duration::from_secs(5))
            .await
            .unwrap()
            .expect("a preface");
        let mut all = vec![0u8; PREFACE.len() + 6];
        stream.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..24], PREFACE);
        assert_eq!(&all[24..], b"frames");

        let (mut client, server) = duplex(1024);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(expect(server, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none());
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, REFUSAL);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_let_go_at_the_timeout() {
        let (_client, server) = duplex(1024);
        assert!(expect(server, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none());
    }
}
