//! A body fed through a channel: chunks already at hand first, then whatever the producing
//! task sends until it closes the channel. An `Err` item cuts the body short.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::mpsc;

use crate::seam::BoxError;

/// One item of a channel body.
pub type Chunk = Result<Bytes, BoxError>;

/// A receiving end a [`ChannelBody`] can read: tokio's bounded or unbounded receiver.
pub trait Source: Send + Unpin + 'static {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk>>;
}

impl Source for mpsc::Receiver<Chunk> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        self.poll_recv(cx)
    }
}

impl Source for mpsc::UnboundedReceiver<Chunk> {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Chunk>> {
        self.poll_recv(cx)
    }
}

/// A body that yields `first`, then what arrives on its channel.
pub struct ChannelBody<R> {
    first: VecDeque<Bytes>,
    rx: R,
    /// Bytes still to come, when the total is known.
    remaining: Option<u64>,
}

impl<R: Source> ChannelBody<R> {
    /// `total`, when known, is the length of the whole body (`first` included).
    pub fn new(first: impl Into<VecDeque<Bytes>>, rx: R, total: Option<u64>) -> Self {
        Self {
            first: first.into(),
            rx,
            remaining: total,
        }
    }
}

impl<R: Source> http_body::Body for ChannelBody<R> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let next = match self.first.pop_front() {
            Some(chunk) => Poll::Ready(Some(Ok(chunk))),
            None => self.rx.poll_chunk(cx),
        };
        if let Poll::Ready(Some(Ok(chunk))) = &next {
            if let Some(remaining) = &mut self.remaining {
                *remaining = remaining.saturating_sub(chunk.len() as u64);
            }
        }
        next.map(|item| item.map(|chunk| chunk.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn first_chunks_then_the_channel_until_it_closes() {
        let (tx, rx) = mpsc::unbounded_channel::<Chunk>();
        let body = ChannelBody::new(vec![Bytes::from_static(b"ab")], rx, Some(5));
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(5));
        tx.send(Ok(Bytes::from_static(b"cde"))).unwrap();
        drop(tx);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "abcde");
    }

    #[tokio::test]
    async fn an_error_item_cuts_the_body_short() {
        let (tx, rx) = mpsc::channel::<Chunk>(1);
        let body = ChannelBody::new(Vec::new(), rx, None);
        tx.send(Err("broken".into())).await.unwrap();
        assert!(body.collect().await.is_err());
    }
}
