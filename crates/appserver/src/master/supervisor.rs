//! The supervisor: starts the zygote, keeps the configured number of workers alive, replaces
//! crashed, stuck and recycled workers, and stops everything on shutdown.
//!
//! It is one task that owns the zygote's control channel and the socket workers connect to;
//! the rest of the master talks to it through [`Event`]s.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::process::{kill_process, Pid, Signal};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};

use super::pool::WorkerConn;
use super::{Shared, StartError};
use crate::control::{self, FromZygote, ToZygote, ZygoteSpec};
use crate::proto::{self, kind};
use crate::{proctitle, python};

/// Why a worker was replaced, for logs and `strata_app_worker_restarts_total{cause}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Crash,
    Timeout,
    MaxRequests,
    Memory,
}

impl Cause {
    pub const ALL: [Cause; 4] = [
        Cause::Crash,
        Cause::Timeout,
        Cause::MaxRequests,
        Cause::Memory,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Cause::Crash => "crash",
            Cause::Timeout => "timeout",
            Cause::MaxRequests => "max_requests",
            Cause::Memory => "memory",
        }
    }
}

/// Requests to the supervisor.
pub enum Event {
    /// Fork a worker; once it is ready, retire `replaces`. Forks after crashes are throttled.
    Fork {
        replaces: Option<u32>,
        after_crash: bool,
    },
    /// A worker connected and said hello.
    Connected(WorkerConn),
    /// Stop the zygote and every worker; `force` kills busy workers too.
    Stop {
        force: bool,
        done: oneshot::Sender<()>,
    },
}

/// A running zygote.
pub struct Zygote {
    child: Child,
    writer: OwnedWriteHalf,
    lines: Lines<BufReader<OwnedReadHalf>>,
}

impl Zygote {
    /// Starts a zygote and waits until the application is imported and warm.
    pub async fn start(spec: &ZygoteSpec) -> Result<Self, StartError> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(StartError::Spawn)?;
        let (title, padding) = proctitle::zygote_args(spec.generation);
        let exe = std::env::current_exe().map_err(StartError::Spawn)?;
        let mut command = tokio::process::Command::new(exe);
        command
            .arg0(title)
            .arg(padding)
            .env(control::ROLE_ENV, "zygote")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            // Ctrl-C reaches the master only; it decides what the children do.
            .process_group(0)
            .kill_on_drop(true);
        if std::env::var_os("PYTHONHOME").is_none() {
            command.env("PYTHONHOME", python::PYTHON_HOME);
        }
        if std::env::var_os("PYTHONUNBUFFERED").is_none() {
            command.env("PYTHONUNBUFFERED", "1");
        }
        let child = command.spawn().map_err(StartError::Spawn)?;
        ours.set_nonblocking(true).map_err(StartError::Spawn)?;
        let (reader, writer) = UnixStream::from_std(ours)
            .map_err(StartError::Spawn)?
            .into_split();
        let mut zygote = Self {
            child,
            writer,
            lines: BufReader::new(reader).lines(),
        };
        zygote.send_line(control::to_line(spec)).await?;
        loop {
            match zygote.next().await {
                Some(FromZygote::Ready) => return Ok(zygote),
                Some(FromZygote::Failed { error }) => return Err(StartError::AppLoad(error)),
                Some(other) => tracing::debug!(?other, "zygote message before ready"),
                None => {
                    let status = zygote.child.wait().await.map_err(StartError::Spawn)?;
                    return Err(StartError::AppLoad(format!(
                        "the zygote exited during start-up ({status})"
                    )));
                }
            }
        }
    }

    async fn send_line(&mut self, line: String) -> Result<(), StartError> {
        self.writer
            .write_all(line.as_bytes())
            .await
            .map_err(StartError::Spawn)
    }

    async fn send(&mut self, message: &ToZygote) -> Result<(), StartError> {
        self.send_line(control::to_line(message)).await
    }

    /// The next message; `None` once the zygote is gone.
    async fn next(&mut self) -> Option<FromZygote> {
        loop {
            let line = self.lines.next_line().await.ok()??;
            match control::from_line(&line) {
                Ok(message) => return Some(message),
                Err(error) => tracing::warn!(%error, %line, "bad message from zygote"),
            }
        }
    }

    /// Asks for `count` workers and waits until each has connected.
    pub async fn first_workers(
        &mut self,
        shared: &Shared,
        listener: &UnixListener,
        count: usize,
        next_id: &mut u32,
    ) -> Result<(), StartError> {
        for _ in 0..count {
            *next_id += 1;
            self.send(&ToZygote::Fork { id: *next_id }).await?;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for _ in 0..count {
            let accepted = tokio::time::timeout_at(deadline, listener.accept()).await;
            let (stream, _) = accepted
                .map_err(|_| StartError::Workers("workers did not connect within 60s".into()))?
                .map_err(StartError::Spawn)?;
            let worker = hello(stream, &shared.config)
                .await
                .map_err(|e| StartError::Workers(e.to_string()))?;
            shared.pool.add(worker);
        }
        Ok(())
    }
}

/// Reads a worker's greeting and wraps its socket.
async fn hello(
    stream: UnixStream,
    config: &crate::AppConfig,
) -> Result<WorkerConn, proto::ProtoError> {
    let (reader, writer) = stream.into_split();
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut header = [0u8; 5];
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_exact(&mut reader, &mut header),
    )
    .await
    .map_err(|_| std::io::Error::other("no hello within 10s"))??;
    let (frame, len) = proto::parse_header(header)?;
    if frame != kind::HELLO || len != 12 {
        return Err(proto::ProtoError::UnexpectedKind(frame));
    }
    let mut payload = [0u8; 12];
    tokio::io::AsyncReadExt::read_exact(&mut reader, &mut payload).await?;
    let mut dec = proto::Decoder::new(&payload);
    let (id, generation, pid) = (dec.u32()?, dec.u32()?, dec.u32()?);
    Ok(WorkerConn {
        id,
        pid,
        generation,
        reader,
        writer,
        served: 0,
        limit: request_limit(config, id),
    })
}

/// `max_requests` plus this worker's share of the jitter; never for 0.
fn request_limit(config: &crate::AppConfig, id: u32) -> u64 {
    if config.max_requests == 0 {
        return u64::MAX;
    }
    let jitter = match config.max_requests_jitter {
        0 => 0,
        j => std::collections::hash_map::RandomState::new().hash_one(id) % (j + 1),
    };
    config.max_requests + jitter
}

/// Signals a stuck worker: SIGUSR1 makes it print every thread's Python stack, SIGKILL follows.
pub fn kill_stuck(pid: u32) {
    let Some(pid) = Pid::from_raw(pid as i32) else {
        return;
    };
    let _ = kill_process(pid, Signal::USR1);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = kill_process(pid, Signal::KILL);
    });
}

/// Runs until stopped.
pub async fn supervise(
    shared: Arc<Shared>,
    mut zygote: Zygote,
    listener: UnixListener,
    mut events: mpsc::UnboundedReceiver<Event>,
    mut next_id: u32,
) {
    // Forks in flight: worker id → the worker it replaces; and pid → id once forked.
    let mut pending: HashMap<u32, Option<u32>> = HashMap::new();
    let mut forked: HashMap<u32, u32> = HashMap::new();
    let mut zygote_alive = true;
    let mut rss_tick = tokio::time::interval(Duration::from_secs(1));
    let mut crashes = CrashThrottle::default();
    let mut watchdog = tokio::time::interval(Duration::from_millis(100));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(Event::Fork { replaces, after_crash }) => {
                    if after_crash {
                        if let Some(delay) = crashes.delay() {
                            tracing::warn!(?delay, "workers keep crashing; delaying the next fork");
                            let events = shared.events.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = events.send(Event::Fork { replaces, after_crash: false });
                            });
                            continue;
                        }
                    }
                    next_id += 1;
                    pending.insert(next_id, replaces);
                    if !zygote_alive || zygote.send(&ToZygote::Fork { id: next_id }).await.is_err() {
                        tracing::error!("cannot fork a worker: the zygote is gone");
                    }
                }
                Some(Event::Connected(worker)) => {
                    forked.remove(&worker.pid);
                    let replaces = pending.remove(&worker.id).flatten();
                    tracing::info!(worker = worker.id, pid = worker.pid, "worker ready");
                    shared.pool.add(worker);
                    if let Some(old) = replaces {
                        shared.pool.retire(old);
                    }
                }
                Some(Event::Stop { force, done }) => {
                    stop(&shared, &mut zygote, force).await;
                    let _ = done.send(());
                    return;
                }
                None => return,
            },
            message = zygote.next(), if zygote_alive => match message {
                Some(FromZygote::Exited { pid, status }) => match shared.pool.id_of_pid(pid) {
                    Some(id) => {
                        tracing::warn!(worker = id, pid, %status, "worker exited unexpectedly");
                        shared.worker_gone(id, Cause::Crash);
                    }
                    None => match forked.remove(&pid) {
                        // It died between fork and hello: nobody else will replace it.
                        Some(id) => {
                            tracing::warn!(worker = id, pid, %status, "worker exited before it was ready");
                            let replaces = pending.remove(&id).flatten();
                            shared.metrics.restart(Cause::Crash);
                            let _ = shared.events.send(Event::Fork { replaces, after_crash: true });
                        }
                        None if status == "exit code 0" => tracing::debug!(pid, %status, "worker exited"),
                        None => tracing::warn!(pid, %status, "worker exited"),
                    },
                },
                Some(FromZygote::Forked { id, pid }) => {
                    tracing::debug!(worker = id, pid, "worker forked");
                    // The worker may have said hello already; then it is not in flight.
                    if pending.contains_key(&id) {
                        forked.insert(pid, id);
                    }
                }
                Some(other) => tracing::debug!(?other, "zygote message"),
                None => {
                    zygote_alive = false;
                    tracing::error!("the zygote exited; workers that die cannot be replaced");
                }
            },
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        match hello(stream, &shared.config).await {
                            Ok(worker) => {
                                let _ = shared.events.send(Event::Connected(worker));
                            }
                            Err(error) => tracing::warn!(%error, "a worker failed to say hello"),
                        }
                    });
                }
                Err(error) => tracing::warn!(%error, "worker socket accept failed"),
            },
            _ = rss_tick.tick(), if shared.config.max_rss_mb > 0 => check_memory(&shared),
            now = watchdog.tick() => kill_expired(&shared, now),
        }
    }
}

/// Slows re-forking when workers crash in a loop (a bad deploy, a poisoned request), so the
/// zygote does not spin: five crashes within ten seconds delay each further fork by a second.
#[derive(Default)]
struct CrashThrottle {
    recent: std::collections::VecDeque<tokio::time::Instant>,
}

impl CrashThrottle {
    const WINDOW: Duration = Duration::from_secs(10);
    const BURST: usize = 5;

    fn delay(&mut self) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        self.recent
            .retain(|at| now.duration_since(*at) < Self::WINDOW);
        self.recent.push_back(now);
        (self.recent.len() > Self::BURST).then_some(Duration::from_secs(1))
    }
}

/// Kills workers whose request passed `app.timeout`, after asking for their Python stack.
/// One timer for all workers, instead of one per request on the hot path.
fn kill_expired(shared: &Shared, now: tokio::time::Instant) {
    for worker in shared.pool.expired(now) {
        tracing::error!(
            worker = worker.id,
            pid = worker.pid,
            "a request passed the {} timeout; the worker's Python stack follows, then it is killed",
            strata_core::duration::format(shared.config.timeout)
        );
        kill_stuck(worker.pid);
    }
}

/// Recycles workers whose resident memory passed `max_rss_mb`.
fn check_memory(shared: &Shared) {
    let limit = shared.config.max_rss_mb * 1024 * 1024;
    for worker in shared.pool.workers() {
        let Some(rss) = resident_bytes(worker.pid) else {
            continue;
        };
        if rss > limit && shared.pool.mark_retiring(worker.id) {
            tracing::info!(
                worker = worker.id,
                rss_mb = rss / (1024 * 1024),
                "recycling worker over app.max_rss_mb"
            );
            shared.recycle(worker.id, Cause::Memory);
        }
    }
}

/// Resident set size of `pid` in bytes.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

async fn stop(shared: &Shared, zygote: &mut Zygote, force: bool) {
    shared.pool.close();
    if force {
        for worker in shared.pool.workers() {
            if let Some(pid) = Pid::from_raw(worker.pid as i32) {
                let _ = kill_process(pid, Signal::KILL);
            }
        }
    }
    let _ = zygote.send(&ToZygote::Quit).await;
    let wait = if force {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(10)
    };
    if tokio::time::timeout(wait, zygote.child.wait())
        .await
        .is_err()
    {
        tracing::warn!("the zygote did not exit in time; killing it");
        let _ = zygote.child.kill().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_throttle_delays_after_a_burst() {
        let mut throttle = CrashThrottle::default();
        for _ in 0..CrashThrottle::BURST {
            assert_eq!(throttle.delay(), None);
        }
        assert_eq!(throttle.delay(), Some(Duration::from_secs(1)));
    }

    #[test]
    fn request_limit_adds_jitter_within_bounds() {
        let mut config = crate::AppConfig::default();
        assert_eq!(request_limit(&config, 1), u64::MAX);
        config.max_requests = 100;
        config.max_requests_jitter = 10;
        let limits: Vec<u64> = (0..50).map(|id| request_limit(&config, id)).collect();
        assert!(limits.iter().all(|l| (100..=110).contains(l)));
        assert!(
            limits.iter().any(|l| *l != limits[0]),
            "jitter varies between workers"
        );
    }
}
