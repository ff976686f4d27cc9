//! The app server tier: Gunicorn's job, with a warm zygote.
//!
//! # Layout
//! - [`master`] (runs in the tokio master): the tier service, the bounded queue in front of
//!   idle workers, the supervisor that keeps workers alive.
//! - [`zygote`] (a re-executed, single-threaded process): imports and warms the application,
//!   forks workers.
//! - `worker` (forked from the zygote): runs WSGI requests framed by [`proto`].
//! - [`control`]: the master ↔ zygote line protocol; [`proto`]: the master ↔ worker frames.
//!
//! Only this crate links libpython; the master never initialises it.
//!
//! # How it works
//!
//! Gunicorn's job. Three roles live in this crate:
//!
//! - `master/` runs in the master process. `AppServer::start` spawns the zygote, waits for
//!   `Ready`, asks for `workers` forks and waits for each worker's hello; only then does the
//!   binary start listening. `exchange.rs` carries one request: it reads a small body whole
//!   (`buffer_body_bytes`), queues the request frame (`dispatch.rs`), and once a worker has taken
//!   it answers the worker's body reads and turns the worker's frames into a response. A
//!   response whose frames are already buffered when the head arrives is returned whole;
//!   anything longer streams through a channel. The worker is held by a `Lease`: if the client
//!   goes away and hyper drops the exchange, the lease finishes the exchange in a task of its own
//!   (body reads fail, output is discarded, the worker goes back to its watcher) instead of
//!   dropping the worker's socket. `dispatch.rs` is the master's side of the shared queue
//!   (`queue/`): an exchange submits its frame and holds a `Ticket` (bounded by
//!   `queue_length`; past `queue_timeout` the request is expired, unless a worker took it
//!   first); while a worker is idle a watcher task holds its socket, reads the `BEGIN id` that
//!   opens the worker's next exchange and hands the connection to that ticket (sending the frame
//!   over the socket first when it was too large for a cell); a watcher that sees the socket
//!   close answers the request the worker's slot says it held. It also hands out worker slots
//!   and releases a ring cell left held by a worker killed while taking it. `collect.rs` is one
//!   task that drains the workers' answer rings when their doorbell (a pipe) rings, and hands
//!   each answer to its ticket; it arms the doorbell only when it is about to sleep, so under
//!   load answers cost no system call. The supervisor's tick drains the rings too, and a
//!   watcher whose worker exited drains that worker's ring before its slot is freed; one reader
//!   at a time (`Dispatch::answer_reader`). `pool.rs` is the
//!   registry of workers (`/status`, readiness, the watchdog's list of workers past
//!   `app.timeout`, read from their slots). `conn.rs` is the master's end of a
//!   worker socket (frame reads and writes). `supervisor.rs` is one task
//!   owning the zygotes' control channels and the worker socket: it forks replacements, retires
//!   recycled workers once their successor is ready, kills workers past `app.timeout` (one
//!   100 ms watchdog for all of them), samples resident memory, runs reloads, and stops
//!   everything on shutdown. `master/zygote.rs` is a zygote as the master sees it: start it,
//!   wait for `Ready`, then forward its messages to the supervisor as events; and each worker's
//!   hello, answered with `WELCOME`: the worker's slot, with the shared region's descriptor and
//!   the answer doorbell's write end attached (`SCM_RIGHTS`).
//! - `zygote.rs` (crate root) runs in the zygote: initialise CPython (`python.rs`), import and warm the
//!   application, `gc.collect(); gc.disable(); gc.freeze()`, then loop: fork on request
//!   (`os.fork()` through pyo3, so CPython's at-fork handlers run), reap children and report
//!   their exit status.
//! - `worker/` runs in each worker: run `app.warmup_paths` again for what is per process (its
//!   own connections and caches), connect to the master, map the shared region, then loop: take
//!   the oldest queued request (or sleep on the ring's futex until the master rings it; once a
//!   second it checks that the master is still there), open the exchange with `BEGIN` (buffered,
//!   so it leaves with the reply), serve the request through the WSGI callable, and end it: a
//!   response that is whole and never touched the socket goes to the worker's answer ring
//!   without the `BEGIN`; anything else is written to the socket. The
//!   WSGI callable (`wsgi.rs`: environ, `start_response` with `exc_info`, `write()`, iteration,
//!   `close()`; `io.rs`: `wsgi.input` and `wsgi.errors`). The objects handed to the application
//!   share the worker's connection through a mutex (`worker::lock`, which waits with the
//!   interpreter released), so they may be used and freed on any of the application's threads;
//!   no Python code runs while it is held.
//!
//! `queue/` is the shared region, mapped by the master and every worker: a bounded ring of
//! 4 KiB cells (a multi-producer, multi-consumer queue with a sequence number per cell), a claim
//! word per cell that the taking worker and the master's expiry race for with one atomic swap
//! each, so a request either runs or is answered 503, never both; a 64-byte slot per worker
//! (the request it holds, since when, told to leave, its sleep word, its answer ring's
//! positions); each worker's answer ring (`queue/answers.rs`, 32 KiB, one writer and one
//! reader, records of a head and frames up to 8 KiB). An idle worker sleeps on the futex word in
//! its slot; a new request wakes one sleeper, moving its word from asleep to woken, so requests
//! queued before it runs make no further system call. `proto.rs` is the master ↔ worker frame format; `control.rs` the master ↔ zygote JSON lines;
//! `proctitle.rs` the process titles. The embedded `strata` Python package
//! (`python/strata/__init__.py`, compiled in with `include_str!`) holds `wsgi.file_wrapper`, the
//! warm-up, and `purge_url`/`purge_tags`, which send a `PURGE` side request over the worker's
//! connection (`worker/side.rs`) while a request is being served; the master applies it through
//! the `Invalidate` target the stack gave it (paths are taken relative to the request's host) and
//! answers `PURGED` with the count. `strata.django` (the `StrataCache` backend) is compiled in
//! too and imported on demand; its commands travel as `CACHE` frames to the `Memcache` target
//! the stack gave the app server. The same package installs outside Strata
//! (`python/pyproject.toml`), where purges warn and do nothing and `StrataCache` uses a local
//! store.
//!
//! # Processes and signals
//!
//! | process | title | started by | threads |
//! |---|---|---|---|
//! | master | `strata master` | the user | tokio runtime |
//! | zygote | `strata zygote gen=N` (one per live generation) | master, spawn + exec | one |
//! | worker | `strata worker id=K gen=N` | zygote, `os.fork()` | one (unless the app starts more) |
//!
//! Work done before serving runs at `app.warmup_nice` (default 10): the zygote imports, warms
//! and forks at that niceness, a new worker runs its warm-up paths at it and returns to normal
//! priority just before its hello, and retired workers and old zygotes drop to 19 to exit. So a
//! reload or a respawn takes CPU only when the serving workers leave some. Raising priority back
//! needs root or `RLIMIT_NICE`; the zygote lowers it only when that is allowed.
//!
//! Workers run under `SCHED_BATCH`: waking a worker does not preempt the master, so on a busy
//! core the master finishes its round of client I/O (queuing every request it read) before the
//! worker runs, and the worker then takes those requests one after another without sleeping.
//! CPU shares are unchanged.
//!
//! The zygote runs in its own process group, so a terminal's Ctrl-C reaches the master only. It
//! dies with the master (`PR_SET_PDEATHSIG`); workers exit when their socket to the master
//! closes (an idle one checks once a second), and outlive their zygote. `app.timeout` counts from the moment a worker takes the request (queue time is
//! bounded separately by `app.queue_timeout`). SIGTERM or a first SIGINT: stop accepting, let in-flight requests finish within
//! `app.graceful_timeout` (keep-alive connections are answered with `Connection: close` for
//! `lb.drain_linger` before idle ones are shut), stop the zygote and the workers, exit 0. A second SIGINT (or the end of
//! the grace period) kills what is left and exits 130. A request past `app.timeout` gets its
//! worker SIGUSR1 (the embedded `faulthandler` prints every thread's Python stack to the log)
//! and, 300 ms later, SIGKILL.

pub mod config;
pub mod control;
#[cfg(fuzzing)]
pub mod fuzz;
pub mod master;
pub mod proctitle;
pub mod proto;
mod python;
mod queue;
mod worker;
pub mod zygote;

pub use config::AppConfig;
pub use control::LogSpec;
pub use master::{AppServer, ReloadResult, StartError, Status, WorkerState};

/// Whether this process was started as a zygote (checked by `main` before anything else).
pub fn is_zygote() -> bool {
    std::env::var_os(control::ROLE_ENV).is_some_and(|role| role == "zygote")
}
