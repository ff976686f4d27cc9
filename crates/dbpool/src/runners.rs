//! Where client sessions run: on the node's shared runtime, or (with `dbpool.threads`) on
//! threads of the pooler's own, each a single-threaded runtime like PgBouncer's event loop,
//! with accepted connections dealt to them in turn. A session never moves between threads,
//! so its wake-ups stay on one core; a server connection it borrows from another thread is
//! moved to its thread first ([`home`]).

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use strata_core::Shutdown;
use tokio::net::{TcpStream, UnixStream};
use tokio::runtime::Handle;

use crate::client::Stream;

/// A connection that can leave the runtime that accepted it for another.
pub trait Portable: Stream + Sized + 'static {
    type Detached: Send + 'static;
    fn detach(self) -> std::io::Result<Self::Detached>;
    fn attach(detached: Self::Detached) -> std::io::Result<Self>;
}

impl Portable for TcpStream {
    type Detached = std::net::TcpStream;
    fn detach(self) -> std::io::Result<Self::Detached> {
        self.into_std()
    }
    fn attach(detached: Self::Detached) -> std::io::Result<Self> {
        TcpStream::from_std(detached)
    }
}

impl Portable for UnixStream {
    type Detached = std::os::unix::net::UnixStream;
    fn detach(self) -> std::io::Result<Self::Detached> {
        self.into_std()
    }
    fn attach(detached: Self::Detached) -> std::io::Result<Self> {
        UnixStream::from_std(detached)
    }
}

thread_local! {
    static HOME: Cell<usize> = const { Cell::new(0) };
}

/// The runtime the calling thread runs: 0 for the node's shared runtime, `n` for the
/// pooler's thread `n - 1`. A socket belongs to the runtime whose reactor it is registered
/// with, and one used from another runtime's task costs a wake-up across threads for
/// every message.
pub fn home() -> usize {
    HOME.with(Cell::get)
}

/// The pooler's own threads (none: sessions run on the shared runtime).
#[derive(Debug, Default)]
pub struct Runners {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Runners {
    /// Starts `threads` single-threaded runtimes that run until `shutdown`.
    pub fn start(threads: usize, shutdown: &Shutdown) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(threads);
        for index in 0..threads {
            let (tx, rx) = std::sync::mpsc::channel();
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name(format!("strata-dbpool-{index}"))
                .spawn(move || {
                    HOME.with(|home| home.set(index + 1));
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(runtime) => {
                            let _ = tx.send(Ok(runtime.handle().clone()));
                            runtime.block_on(shutdown.requested());
                        }
                        Err(error) => {
                            let _ = tx.send(Err(error));
                        }
                    }
                })?;
            handles.push(rx.recv().map_err(std::io::Error::other)??);
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `session` for `stream`: on the next of the pooler's threads, or here.
    pub fn spawn<S, F>(&self, stream: S, session: impl FnOnce(S) -> F + Send + 'static)
    where
        S: Portable,
        F: Future<Output = ()> + Send + 'static,
    {
        if self.handles.is_empty() {
            tokio::spawn(session(stream));
            return;
        }
        let detached = match stream.detach() {
            Ok(detached) => detached,
            Err(error) => {
                tracing::warn!(%error, "dbpool: cannot hand a connection to a pooler thread");
                return;
            }
        };
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[at].spawn(async move {
            match S::attach(detached) {
                Ok(stream) => session(stream).await,
                Err(error) => tracing::warn!(%error, "dbpool: cannot adopt a connection"),
            }
        });
    }
}
