//! A connection's answers waiting to be written: small text copied into one buffer, large
//! stored values kept by reference and handed to the kernel as they are (one `writev`), as
//! memcached does with its iovecs. A 10 KB hit then costs one copy (into the socket), not two.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Values shorter than this are copied: a slice of their own costs the kernel more than the
/// copy would.
const BY_REFERENCE: usize = 1024;

/// At most this many slices per `writev` (Linux allows 1024).
const SLICES: usize = 64;

/// Answers in order: the sealed `chunks`, then what `text` holds.
#[derive(Debug, Default)]
pub struct Out {
    chunks: VecDeque<Bytes>,
    text: BytesMut,
}

impl Out {
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.text.extend_from_slice(bytes);
    }

    /// A stored value: copied when small, otherwise queued by reference.
    pub fn value(&mut self, value: &Bytes) {
        if value.len() < BY_REFERENCE {
            self.text.extend_from_slice(value);
        } else {
            self.seal();
            self.chunks.push_back(value.clone());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.text.is_empty()
    }

    /// Everything, in one vector (the in-process seam, tests).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.chunks.iter().map(Bytes::len).sum::<usize>());
        self.chunks.iter().for_each(|c| all.extend_from_slice(c));
        all.extend_from_slice(&self.text);
        all
    }

    fn seal(&mut self) {
        if !self.text.is_empty() {
            self.chunks.push_back(self.text.split().freeze());
        }
    }

    /// Writes everything to `stream`; empty afterwards.
    pub async fn write_to<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> io::Result<()> {
        if self.chunks.is_empty() {
            stream.write_all(&self.text).await?;
            self.text.clear();
            return Ok(());
        }
        self.seal();
        while !self.chunks.is_empty() {
            let mut slices = [IoSlice::new(&[]); SLICES];
            let count = self
                .chunks
                .iter()
                .zip(slices.iter_mut())
                .map(|(chunk, slice)| *slice = IoSlice::new(chunk))
                .count();
            let written = stream.write_vectored(&slices[..count]).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.consumed(written);
        }
        // The sealed text is dropped by now: `text` can take its allocation back.
        self.text.clear();
        Ok(())
    }

    fn consumed(&mut self, mut written: usize) {
        while let Some(front) = self.chunks.front_mut() {
            if written < front.len() {
                front.advance(written);
                return;
            }
            written -= front.len();
            self.chunks.pop_front();
        }
    }
}

impl io::Write for Out {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.text.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes at most `limit` bytes per write, to exercise partial writes.
    struct Trickle {
        got: Vec<u8>,
        limit: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.got.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.limit - n);
                self.got.extend_from_slice(&buf[..take]);
                n += take;
                if n == self.limit {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn answers_arrive_whole_and_in_order_however_the_writes_are_cut() {
        let big = Bytes::from(vec![b'v'; 5000]);
        let small = Bytes::from_static(b"tiny");
        for limit in [1, 7, 1000, 4096, 100_000] {
            let mut out = Out::default();
            let mut expected = Vec::new();
            for i in 0..100 {
                let head = format!("VALUE k{i} 0\r\n");
                out.extend_from_slice(head.as_bytes());
                let value = if i % 3 == 0 { &small } else { &big };
                out.value(value);
                out.extend_from_slice(b"\r\n");
                expected.extend_from_slice(head.as_bytes());
                expected.extend_from_slice(value);
                expected.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"END\r\n");
            expected.extend_from_slice(b"END\r\n");
            assert_eq!(out.to_vec(), expected);
            let mut sink = Trickle {
                got: Vec::new(),
                limit,
            };
            out.write_to(&mut sink).await.expect("written");
            assert!(out.is_empty());
            assert_eq!(sink.got, expected, "limit {limit}");
        }
    }
}
