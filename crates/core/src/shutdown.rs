//! Shutdown as a value.
//!
//! The binary creates one [`Shutdown`] and hands clones to every `run()`. Tasks await
//! [`Shutdown::requested`] to stop accepting work; a second, forced stage
//! ([`Shutdown::forced`]) tells them to stop waiting for in-flight work.

use tokio::sync::watch;

/// The stages of a shutdown, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Serving normally.
    Running,
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
        Self { tx, rx }
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

    async fn reached(&self, stage: Stage) {
        let mut rx = self.rx.clone();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|current| *current >= stage).await;
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
