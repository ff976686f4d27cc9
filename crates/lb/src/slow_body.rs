//! A request body that must keep coming: no frame for `lb.body_read_timeout` ends it with
//! [`BodyStalled`] (the tier reading it answers 408), so a client trickling a body cannot
//! hold a connection, or a worker reading it, for ever.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use strata_core::{Body, BodyStalled, BoxError};
use tokio::time::{Instant, Sleep};

/// `inner`, cut short when it stalls for `limit`.
pub struct Timed {
    inner: Body,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Timed {
    pub fn new(inner: Body, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl http_body::Body for Timed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let limit = this.limit;
                this.deadline.as_mut().reset(Instant::now() + limit);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(Box::new(BodyStalled { after: this.limit }))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
