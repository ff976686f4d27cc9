//! The response body of a streamed worker response: chunks arrive over a channel from the task
//! that reads the worker's frames.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use strata_core::BoxError;
use tokio::sync::mpsc;

/// A body fed by a channel; an `Err` item cuts the response short.
pub struct ChannelBody {
    first: Vec<Bytes>,
    rx: mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl ChannelBody {
    /// A body that yields `first`, then whatever arrives on `rx` until it closes.
    pub fn new(mut first: Vec<Bytes>, rx: mpsc::Receiver<Result<Bytes, BoxError>>) -> Self {
        first.reverse();
        Self { first, rx }
    }
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.first.pop() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        self.rx
            .poll_recv(cx)
            .map(|item| item.map(|result| result.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
