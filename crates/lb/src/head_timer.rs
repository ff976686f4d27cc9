//! The request-head timeout of an HTTP/1.1 connection (`lb.header_read_timeout`): how long
//! it may wait for a whole request head, counted from its start or the end of its last
//! response, so it also bounds idle keep-alive (slowloris and idle connections alike).
//!
//! hyper's own header timer arms a fresh timer for every request head and disarms it when
//! the head is parsed: two visits to the runtime's timer wheel per request. This one is
//! lazy: each request only records, without a clock read, that it began, and its response's
//! end records the time; the connection's one timer looks at those records when it fires and,
//! if the connection is not overdue, sleeps again until the time it would be. A busy
//! connection re-arms it about once per timeout, not once per request.
//!
//! HTTP/2 has no head timeout here (as with hyper's): a connection's first HTTP/2 request
//! switches the timer off.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, Version};
use http_body::{Frame, SizeHint};
use strata_core::seam::ResponseFuture;
use strata_core::{Body, BoxError};
use tokio::time::{Instant, Sleep};

/// `in_flight` while the timer is off for good (an HTTP/2 connection).
const OFF: usize = usize::MAX / 2;

/// What one connection's requests tell its head timer.
#[derive(Debug)]
pub struct Activity {
    /// When the connection started; `idle_since` counts from here.
    base: Instant,
    /// Requests whose responses have not ended.
    in_flight: AtomicUsize,
    /// When the last response ended (microseconds after `base`).
    idle_since: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
        })
    }

    /// A request of `version` has begun; the guard ends it when dropped.
    pub fn begin(self: &Arc<Self>, version: Version) -> Guard {
        if version >= Version::HTTP_2 {
            self.in_flight.store(OFF, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Guard(self.clone())
    }

    /// Completes once the connection has waited `limit` for a request head with no request
    /// in progress; never on a connection that turned out to be HTTP/2.
    pub fn overdue(&self, limit: Duration) -> Overdue<'_> {
        Overdue {
            activity: self,
            limit,
            sleep: Box::pin(tokio::time::sleep_until(self.base + limit)),
            registered: None,
        }
    }

    fn end(&self) {
        let since = u64::try_from(self.base.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.idle_since.store(since, Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The future of [`Activity::overdue`].
///
/// Polled at every wake-up of its connection, it looks at its timer only when the timer
/// may have fired (its deadline has passed) or the waker changed: the timer stays armed in
/// between and wakes the connection itself.
pub struct Overdue<'a> {
    activity: &'a Activity,
    limit: Duration,
    sleep: Pin<Box<Sleep>>,
    registered: Option<Waker>,
}

impl Future for Overdue<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let same_waker = this
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()));
        if same_waker && Instant::now() < this.sleep.deadline() {
            return Poll::Pending;
        }
        this.registered = Some(cx.waker().clone());
        while this.sleep.as_mut().poll(cx).is_ready() {
            let activity = this.activity;
            let busy = activity.in_flight.load(Ordering::Relaxed);
            let now = Instant::now();
            let deadline = if busy >= OFF {
                // HTTP/2: never; the timer is left to sleep for a long time.
                now + Duration::from_secs(86_400 * 365)
            } else if busy > 0 {
                // The head came; waiting for the next one starts when this response ends.
                now + this.limit
            } else {
                let since = Duration::from_micros(activity.idle_since.load(Ordering::Relaxed));
                let deadline = activity.base + since + this.limit;
                if now >= deadline {
                    return Poll::Ready(());
                }
                deadline
            };
            this.sleep.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// One request in progress; its drop (the response's end, or the request abandoned) starts
/// the wait for the next head.
#[derive(Debug)]
pub struct Guard(Arc<Activity>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A request's response future, whose body carries the request's [`Guard`] to its end.
pub struct Tracked {
    inner: ResponseFuture,
    guard: Option<Guard>,
}

impl Tracked {
    pub fn new(inner: ResponseFuture, guard: Guard) -> Self {
        Self {
            inner,
            guard: Some(guard),
        }
    }
}

impl Future for Tracked {
    type Output = Result<Response<TrackedBody>, std::convert::Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = match self.inner.as_mut().poll(cx) {
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => return Poll::Pending,
        };
        let guard = self.guard.take();
        Poll::Ready(Ok(response.map(|body| TrackedBody {
            inner: body,
            _guard: guard,
        })))
    }
}

/// A response body holding its request's [`Guard`] until hyper is done with it.
pub struct TrackedBody {
    inner: Body,
    _guard: Option<Guard>,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_overdue_after_the_limit() {
        let activity = Activity::new();
        let started = Instant::now();
        activity.overdue(Duration::from_secs(2)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_restarts_when_a_response_ends() {
        let activity = Activity::new();
        let started = Instant::now();
        let guard = activity.begin(Version::HTTP_11);
        let later = activity.clone();
        let ends = tokio::spawn(async move {
            // A request in progress past the limit does not make the connection overdue.
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(guard);
            drop(later);
        });
        activity.overdue(Duration::from_secs(2)).await;
        ends.await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(7) && waited < Duration::from_secs(8),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn http2_connections_are_never_overdue() {
        let activity = Activity::new();
        drop(activity.begin(Version::HTTP_2));
        let overdue = tokio::time::timeout(
            Duration::from_secs(60),
            activity.overdue(Duration::from_secs(2)),
        );
        assert!(overdue.await.is_err());
    }
}
