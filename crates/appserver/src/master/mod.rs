//! The master side of the app server: runs inside the multi-threaded tokio process, never
//! forks (children are spawned with exec), and offers the app server as a tier service.

mod cgi;
mod collect;
mod conn;
mod dispatch;
mod exchange;
mod pool;
mod supervisor;
mod zygote;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use serde::Serialize;
use strata_core::metrics::{self, Counter, Histogram, StatusCounter, LATENCY_BOUNDS};
use strata_core::seam::{Invalidate, Memcache};
use strata_core::HttpService;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::control::{LogSpec, ZygoteSpec};
use crate::AppConfig;
#[cfg(fuzzing)]
pub(crate) use exchange::head_response;
pub use pool::{WorkerInfo, WorkerState};
pub use supervisor::ReloadResult;
use supervisor::{Cause, Event};
use zygote::Zygote;

/// Why the app server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the application failed to load:\n{0}")]
    AppLoad(String),
    #[error("cannot start the zygote: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot create the worker socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("workers did not start: {0}")]
    Workers(String),
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
}

/// App server metrics, rendered on `/metrics`.
pub struct Metrics {
    pub requests: StatusCounter,
    pub latency: Histogram,
    pub queue_wait: Histogram,
    restarts: [Counter; 5],
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: StatusCounter::default(),
            latency: Histogram::new(LATENCY_BOUNDS),
            queue_wait: Histogram::new(LATENCY_BOUNDS),
            restarts: Default::default(),
        }
    }
}

impl Metrics {
    fn restart(&self, cause: Cause) {
        self.restarts[Cause::ALL.iter().position(|c| *c == cause).expect("listed")].inc();
    }
}

/// State shared by the service, the exchanges and the supervisor.
pub(crate) struct Shared {
    /// The settings in force; a reload may replace them.
    config: RwLock<Arc<AppConfig>>,
    pool: pool::Pool,
    /// The shared request queue and the requests waiting for a worker.
    dispatch: dispatch::Dispatch,
    metrics: Metrics,
    events: mpsc::UnboundedSender<Event>,
    /// The generation new workers come from.
    generation: AtomicU32,
    reload: Mutex<Option<ReloadState>>,
    /// What every zygote is started with, but its generation.
    spec: ZygoteSpec,
    /// Where `strata.purge_url`/`purge_tags` from application code go (the accelerator).
    invalidate: OnceLock<Arc<dyn Invalidate>>,
    /// Where `strata.django.StrataCache` commands go (the cache tier).
    memcache: OnceLock<Arc<dyn Memcache>>,
}

/// The last reload, as `/status` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReloadState {
    /// The new generation's zygote is importing and warming the application.
    Starting { generation: u32 },
    /// Old workers are being replaced by new ones.
    Rolling { generation: u32 },
    /// Every worker runs this generation.
    Done { generation: u32 },
    /// The new generation could not start; the running one kept serving.
    Failed { error: String },
}

impl Shared {
    /// A worker died or was killed: forget it and have it replaced (once per worker).
    fn worker_gone(&self, id: u32, cause: Cause) {
        let Some(retired) = self.pool.remove(id) else {
            return;
        };
        if retired {
            let _ = self.events.send(Event::Left { id });
        } else {
            self.metrics.restart(cause);
            let _ = self.events.send(Event::Lost {
                id,
                after_crash: cause == Cause::Crash,
            });
        }
    }

    /// A worker completed a request: recycle it once it has served its share.
    fn completed(&self, id: u32) {
        if self.pool.completed(id) {
            self.recycle(id, Cause::MaxRequests);
        }
    }

    /// The settings in force.
    fn config(&self) -> Arc<AppConfig> {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts reloaded settings in force.
    fn set_config(&self, config: AppConfig) {
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    fn set_generation(&self, generation: u32) {
        self.generation.store(generation, Ordering::Relaxed);
    }

    fn set_reload(&self, state: ReloadState) {
        *self.reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }

    /// The zygote spec for `generation`, running `app`.
    fn spec(&self, generation: u32, app: AppConfig) -> ZygoteSpec {
        ZygoteSpec {
            generation,
            app,
            ..self.spec.clone()
        }
    }

    /// A worker should be replaced: fork its successor, then retire it.
    fn recycle(&self, id: u32, cause: Cause) {
        self.metrics.restart(cause);
        let _ = self.events.send(Event::Fork {
            replaces: Some(id),
            after_crash: false,
        });
    }
}

/// A running app server tier.
pub struct AppServer {
    shared: Arc<Shared>,
    socket_dir: PathBuf,
}

/// What `GET /status` shows of the app server.
#[derive(Debug, Serialize)]
pub struct Status {
    pub generation: u32,
    pub workers: Vec<WorkerInfo>,
    pub queue_length: usize,
    pub last_reload: Option<ReloadState>,
}

impl AppServer {
    /// Starts the zygote, waits until the application is warm and every worker is connected.
    pub async fn start(config: AppConfig, log: LogSpec) -> Result<Self, StartError> {
        let socket_dir = private_dir().map_err(|source| StartError::Socket {
            path: std::env::temp_dir(),
            source,
        })?;
        let socket = socket_dir.join("workers.sock");
        let listener = UnixListener::bind(&socket).map_err(|source| StartError::Socket {
            path: socket.clone(),
            source,
        })?;
        let generation = 1;
        let spec = ZygoteSpec {
            generation,
            app: config.clone(),
            socket,
            log,
        };
        let (events, events_rx) = mpsc::unbounded_channel();
        let dispatch = dispatch::Dispatch::new(config.queue_length)?;
        let shared = Arc::new(Shared {
            pool: pool::Pool::new(dispatch.queue().clone()),
            dispatch,
            config: RwLock::new(Arc::new(config)),
            metrics: Metrics::default(),
            events,
            generation: AtomicU32::new(generation),
            reload: Mutex::new(None),
            spec: spec.clone(),
            invalidate: OnceLock::new(),
            memcache: OnceLock::new(),
        });
        tokio::spawn(collect::collect(shared.clone()));
        let result = async {
            let mut zygote = Zygote::start(&spec).await?;
            let mut next_id = 0;
            zygote
                .first_workers(&shared, &listener, shared.config().workers, &mut next_id)
                .await?;
            zygote.forward_messages(shared.events.clone());
            Ok::<_, StartError>((zygote, next_id))
        }
        .await;
        let (zygote, next_id) = match result {
            Ok(started) => started,
            Err(error) => {
                let _ = std::fs::remove_dir_all(&socket_dir);
                return Err(error);
            }
        };
        tracing::info!(
            workers = shared.config().workers,
            module = %shared.config().module,
            "app server ready"
        );
        tokio::spawn(supervisor::supervise(
            shared.clone(),
            zygote,
            listener,
            events_rx,
            next_id,
        ));
        Ok(Self { shared, socket_dir })
    }

    /// The app server as a tier service.
    pub fn service(&self) -> HttpService {
        let shared = self.shared.clone();
        HttpService::from_fn(move |request| {
            let shared = shared.clone();
            async move { Ok(exchange::run(shared, request).await) }
        })
    }

    /// Sends the application's `strata.purge_url`/`purge_tags` calls to `target` (set once,
    /// when the node wires its tiers).
    pub fn set_invalidate(&self, target: Arc<dyn Invalidate>) {
        let _ = self.shared.invalidate.set(target);
    }

    /// Sends the application's cache commands (`strata.django.StrataCache`) to `target`.
    pub fn set_memcache(&self, target: Arc<dyn Memcache>) {
        let _ = self.shared.memcache.set(target);
    }

    /// Generation, workers and queue.
    pub fn status(&self) -> Status {
        Status {
            generation: self.shared.generation.load(Ordering::Relaxed),
            workers: self.shared.pool.workers(),
            queue_length: self.shared.dispatch.queued(),
            last_reload: self
                .shared
                .reload
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Starts a new generation from the application's current code and rolls every worker
    /// over to it; with `config`, the new generation runs those (validated) settings, which
    /// take effect when it starts. Returns once all workers run it, or with the reason the old
    /// generation still serves (the import failed, a reload is already running).
    pub async fn reload(&self, config: Option<AppConfig>) -> ReloadResult {
        let (done, outcome) = oneshot::channel();
        self.shared
            .events
            .send(Event::Reload { config, done })
            .map_err(|_| "the app server is stopping".to_string())?;
        outcome
            .await
            .unwrap_or_else(|_| Err("the app server is stopping".into()))
    }

    /// Appends the app server's metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        let m = &self.shared.metrics;
        m.requests.render(
            out,
            "strata_app_requests_total",
            "Responses of the app server by status.",
        );
        m.latency.render(
            out,
            "strata_app_request_duration_seconds",
            "Time from request arrival to the end of the response's head.",
        );
        m.queue_wait.render(
            out,
            "strata_app_queue_wait_seconds",
            "Time requests waited for an idle worker.",
        );
        metrics::render_labeled(
            out,
            "strata_app_worker_restarts_total",
            "Workers replaced, by cause.",
            "counter",
            "cause",
            Cause::ALL
                .iter()
                .zip(&m.restarts)
                .map(|(c, n)| (c.label(), n.get())),
        );
        let workers = self.shared.pool.workers();
        metrics::header(out, "strata_app_workers", "Workers by state.", "gauge");
        for state in [WorkerState::Idle, WorkerState::Busy, WorkerState::Retiring] {
            let n = workers.iter().filter(|w| w.state == state).count();
            let label = serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned));
            out.push_str(&format!(
                "strata_app_workers{{state=\"{}\"}} {n}\n",
                label.unwrap_or_default()
            ));
        }
        metrics::header(
            out,
            "strata_app_queue_length",
            "Requests waiting for a worker.",
            "gauge",
        );
        out.push_str(&format!(
            "strata_app_queue_length {}\n",
            self.shared.dispatch.queued()
        ));
    }

    /// Stops the zygotes and the workers. Call after the listener has drained; `force` kills
    /// workers that are still busy.
    pub async fn stop(&self, force: bool) {
        let (done, wait) = oneshot::channel();
        if self.shared.events.send(Event::Stop { force, done }).is_ok() {
            let _ = wait.await;
        }
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}

/// A directory only this user can enter, for the worker socket.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for attempt in 0..100u32 {
        let dir = base.join(format!("strata-{}-{attempt}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free socket directory name"))
}

impl strata_core::Readiness for AppServer {
    /// The supervisor's own answer to a health check: no request goes to a worker for it.
    fn readiness(&self) -> strata_core::Ready {
        self.shared.pool.readiness(self.shared.dispatch.is_open())
    }
}
