//! Shutdown as a value.
//!
//! The binary creates one [`Shutdown`] and hands clones to every `run()`. Tasks await
//! [`Shutdown::requested`] to stop accepting work; a second, forced stage
//! ([`Shutdown::forced`]) tells them to stop waiting for in-flight work.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::sync::watch;

/// The stages of a shutdown, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Serving normally.
    Running,
    /// Leaving soon (`lb.shutdown_delay`): not ready (`/readyz` says so, responses close their
    /// connections) but still accepting, so that balancers in front stop sending first.
    Leaving,
    /// Stop accepting; finish in-flight work within the grace period.
    Graceful,
    /// Stop now.
    Forced,
}

/// A cloneable handle that observes and triggers shutdown.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: watch::Sender<Stage>,
    rx: watch::Receiver<Stage>,
    /// Another process holds this node's listening sockets too (a binary upgrade under
    /// way or done): stopping must leave them listening for it.
    shared: Arc<AtomicBool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A handle in the [`Stage::Running`] stage.
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(Stage::Running);
        Self {
            tx,
            rx,
            shared: Arc::default(),
        }
    }

    /// Says whether another process now holds this node's listening sockets too (set before
    /// they are handed to a new master, cleared if it gives up).
    pub fn share_listeners(&self, shared: bool) {
        self.shared.store(shared, Ordering::SeqCst);
    }

    /// Whether the listening sockets are shared with another process.
    pub fn listeners_shared(&self) -> bool {
        self.shared.load(Ordering::SeqCst)
    }

    /// Moves to `stage` if it is later than the current one.
    pub fn trigger(&self, stage: Stage) {
        self.tx.send_if_modified(|current| {
            let later = stage > *current;
            if later {
                *current = stage;
            }
            later
        });
    }

    /// The current stage.
    pub fn stage(&self) -> Stage {
        *self.rx.borrow()
    }

    /// Completes once shutdown has been requested (graceful or forced).
    pub async fn requested(&self) {
        self.reached(Stage::Graceful).await
    }

    /// Completes once shutdown has been forced.
    pub async fn forced(&self) {
        self.reached(Stage::Forced).await
    }

    /// Runs `work` until it completes (`Some` of its output) or shutdown reaches `stage`
    /// (`None`), whichever is first.
    ///
    /// Unlike a `select!` of the two, which registers with the shutdown channel at every
    /// wake-up of `work` (a lock per poll), this registers once per waker and afterwards
    /// only reads the stage: what a busy connection pays per request is one atomic read.
    pub fn unless<F: Future + Unpin>(&self, stage: Stage, work: F) -> Unless<'_, F> {
        Unless {
            work,
            reached: Box::pin(self.reached(stage)),
            shutdown: self,
            registered: None,
        }
    }

    async fn reached(&self, stage: Stage) {
        let mut rx = self.rx.clone();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|current| *current >= stage).await;
    }
}

/// The future of [`Shutdown::unless`].
pub struct Unless<'a, F> {
    work: F,
    reached: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    shutdown: &'a Shutdown,
    /// The waker the shutdown channel knows; another one must register again.
    registered: Option<Waker>,
}

impl<F: Future + Unpin> Future for Unless<'_, F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(output) = Pin::new(&mut this.work).poll(cx) {
            return Poll::Ready(Some(output));
        }
        let fresh = this
            .registered
            .as_ref()
            .is_none_or(|waker| !waker.will_wake(cx.waker()));
        // Once any stage of shutdown began, `reached` is polled every time: a change to an
        // earlier stage than ours (`Leaving`) used up its registration, and only a poll
        // registers it again for the next change.
        if fresh || this.shutdown.stage() != Stage::Running {
            this.registered = Some(cx.waker().clone());
            if this.reached.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stages_only_move_forward() {
        let shutdown = Shutdown::new();
        shutdown.trigger(Stage::Forced);
        shutdown.trigger(Stage::Graceful);
        assert_eq!(shutdown.stage(), Stage::Forced);
        shutdown.requested().await;
        shutdown.forced().await;
    }

    /// Waits, in a task of its own, on work that never ends unless `Graceful` comes.
    fn never_unless_graceful(shutdown: &Shutdown) -> tokio::task::JoinHandle<Option<()>> {
        let observer = shutdown.clone();
        tokio::spawn(async move {
            let never = std::pin::pin!(std::future::pending::<()>());
            observer.unless(Stage::Graceful, never).await
        })
    }

    /// What such a wait ended with, within 5 s.
    async fn ended(waiting: tokio::task::JoinHandle<Option<()>>) -> Option<()> {
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("shutdown ends the wait")
            .expect("the task")
    }

    #[tokio::test]
    async fn unless_returns_the_work_or_gives_way_to_shutdown() {
        let shutdown = Shutdown::new();
        assert_eq!(
            shutdown
                .unless(Stage::Graceful, std::pin::pin!(async { 7 }))
                .await,
            Some(7)
        );
        let waiting = never_unless_graceful(&shutdown);
        tokio::task::yield_now().await;
        shutdown.trigger(Stage::Graceful);
        assert_eq!(ended(waiting).await, None);
        // Already past the stage: the work still gets its first poll, then gives way.
        assert_eq!(ended(never_unless_graceful(&shutdown)).await, None);
    }

    #[tokio::test]
    async fn unless_gives_way_after_an_earlier_stage_came_first() {
        let shutdown = Shutdown::new();
        let waiting = never_unless_graceful(&shutdown);
        tokio::task::yield_now().await;
        // Leaving wakes the wait without ending it; Graceful must still reach it.
        shutdown.trigger(Stage::Leaving);
        tokio::task::yield_now().await;
        shutdown.trigger(Stage::Graceful);
        assert_eq!(ended(waiting).await, None);
    }

    #[tokio::test]
    async fn clones_observe_trigger() {
        let shutdown = Shutdown::new();
        let observer = shutdown.clone();
        let waiter = tokio::spawn(async move { observer.requested().await });
        shutdown.trigger(Stage::Graceful);
        waiter.await.unwrap();
        assert_eq!(shutdown.stage(), Stage::Graceful);
    }
}
