//! A response body being filled from the origin while any number of clients read it.
//!
//! The fetch task pushes chunks; each reader gets the chunks so far, then the rest as they
//! arrive, so coalesced waiters and streaming hits start receiving before the origin has
//! finished. Once complete the chunks become one `Bytes`, and every later hit is a reference
//! count, not a copy.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use strata_core::channel_body::{ChannelBody, Chunk};
use strata_core::{seam, Body};
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Open,
    Done,
    Failed,
}

struct Inner {
    chunks: Vec<Bytes>,
    len: u64,
    state: State,
    /// Whether chunks are kept for readers that join later (false once over the size limit).
    retain: bool,
    complete: Option<Bytes>,
    readers: Vec<mpsc::UnboundedSender<Chunk>>,
}

/// A body shared between its filler and its readers.
pub struct Fill {
    inner: Mutex<Inner>,
    /// The origin's `Content-Length`, when it gave one.
    expected: Option<u64>,
}

impl std::fmt::Debug for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fill").field("len", &self.len()).finish()
    }
}

impl Fill {
    /// An empty body still to be filled.
    pub fn new(expected: Option<u64>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                chunks: Vec::new(),
                len: 0,
                state: State::Open,
                retain: true,
                complete: None,
                readers: Vec::new(),
            }),
            expected,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves consistent data behind; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes received so far.
    pub fn len(&self) -> u64 {
        self.lock().len
    }

    /// Whether the body arrived whole.
    pub fn is_complete(&self) -> bool {
        self.lock().state == State::Done
    }

    /// The whole body, once complete and kept.
    pub fn whole(&self) -> Option<Bytes> {
        self.lock().complete.clone()
    }

    /// Appends a chunk and hands it to every reader; returns how many readers remain.
    pub fn push(&self, chunk: Bytes) -> usize {
        let mut inner = self.lock();
        inner.len += chunk.len() as u64;
        if inner.retain {
            inner.chunks.push(chunk.clone());
        }
        inner
            .readers
            .retain(|reader| reader.send(Ok(chunk.clone())).is_ok());
        inner.readers.len()
    }

    /// Stops keeping chunks for later readers: the body will not be stored. Readers already
    /// attached still receive everything.
    pub fn detach(&self) {
        let mut inner = self.lock();
        inner.retain = false;
        inner.chunks = Vec::new();
    }

    /// The body is whole.
    pub fn finish(&self) {
        let mut inner = self.lock();
        inner.state = State::Done;
        if inner.retain {
            let mut whole = BytesMut::with_capacity(inner.len as usize);
            for chunk in inner.chunks.drain(..) {
                whole.extend_from_slice(&chunk);
            }
            inner.complete = Some(whole.freeze());
        }
        // Closing the channels ends the readers' bodies.
        inner.readers.clear();
    }

    /// The origin's body broke off: readers get an error.
    pub fn fail(&self) {
        let mut inner = self.lock();
        inner.state = State::Failed;
        inner.chunks = Vec::new();
        for reader in inner.readers.drain(..) {
            let _ = reader.send(Err(Box::new(BrokenBody)));
        }
    }

    /// A body reading this fill from the start; `None` when it can no longer be read whole.
    pub fn reader(&self) -> Option<Body> {
        let mut inner = self.lock();
        if let Some(whole) = &inner.complete {
            return Some(seam::full(whole.clone()));
        }
        if !inner.retain || inner.state == State::Failed {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        inner.readers.push(tx);
        let first: Vec<Bytes> = inner.chunks.clone();
        Some(ChannelBody::new(first, rx, self.expected).boxed_unsync())
    }
}

/// Copies `body` into `fill` until it ends; gives up keeping it past `limit` bytes and stops
/// reading altogether when it is over the limit and nobody is reading. Returns whether the
/// body arrived whole and within the limit.
pub async fn pump(mut body: Body, fill: Arc<Fill>, limit: u64) -> bool {
    let mut kept = true;
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let readers = fill.push(data);
                    if kept && fill.len() > limit {
                        fill.detach();
                        kept = false;
                    }
                    if !kept && readers == 0 {
                        return false;
                    }
                }
            }
            Some(Err(error)) => {
                tracing::debug!(%error, "origin body failed");
                fill.fail();
                return false;
            }
            None => {
                fill.finish();
                return kept;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the origin's response body broke off")]
struct BrokenBody;

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(body: Body) -> Result<Bytes, strata_core::BoxError> {
        body.collect().await.map(|c| c.to_bytes())
    }

    #[tokio::test]
    async fn readers_joining_early_and_late_get_the_whole_body() {
        let fill = Arc::new(Fill::new(None));
        let early = fill.reader().unwrap();
        fill.push(Bytes::from_static(b"hello "));
        let late = fill.reader().unwrap();
        fill.push(Bytes::from_static(b"world"));
        fill.finish();
        assert_eq!(read(early).await.unwrap(), "hello world");
        assert_eq!(read(late).await.unwrap(), "hello world");
        assert_eq!(read(fill.reader().unwrap()).await.unwrap(), "hello world");
        assert!(fill.is_complete());
    }

    #[tokio::test]
    async fn a_failed_fill_errors_its_readers_and_takes_no_more() {
        let fill = Fill::new(Some(10));
        let reader = fill.reader().unwrap();
        fill.push(Bytes::from_static(b"part"));
        fill.fail();
        assert!(read(reader).await.is_err());
        assert!(fill.reader().is_none());
    }

    #[tokio::test]
    async fn over_the_limit_attached_readers_finish_but_nothing_is_kept() {
        let fill = Arc::new(Fill::new(None));
        let reader = fill.reader().unwrap();
        let body = seam::full(Bytes::from(vec![b'x'; 100]));
        let stored = pump(body, fill.clone(), 10).await;
        assert!(!stored);
        assert_eq!(read(reader).await.unwrap().len(), 100);
        assert!(fill.reader().is_none());
    }
}
