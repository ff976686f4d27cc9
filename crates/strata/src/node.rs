//! A running node: start the tiers, then listen; stop on signals.
//!
//! Order matters: sockets are bound first (a taken port fails at once), the first generation
//! of workers is warmed next, and only then do the sockets listen, so no client ever meets a
//! cold worker. On SIGTERM (or a first SIGINT) the listener stops accepting and in-flight
//! requests get `app.graceful_timeout` to finish; a second SIGINT stops at once.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use strata_appserver::LogSpec;
use strata_core::shutdown::{Shutdown, Stage};
use tokio::net::{TcpListener, TcpSocket};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::reload::{LoadConfig, Reloader};
use crate::stack::Stack;
use crate::{admin, handoff};

/// Runs the node until it is stopped; returns the process exit code.
pub fn run(config: Config, load: LoadConfig, upgrade: bool) -> anyhow::Result<ExitCode> {
    strata_core::logging::init(&config.log.level, config.log.format == "json");
    strata_appserver::proctitle::set("strata master");
    raise_open_files_limit();
    let runtime = runtime().context("cannot start the runtime")?;
    runtime.block_on(serve(config, load, upgrade))
}

/// The node's runtime: a thread per CPU the process may run on (its affinity and its cgroup's
/// CPU quota). With one CPU (a balancer pinned to a core, a container given one CPU) it is a
/// single-threaded runtime: a multi-threaded one with one worker would add only cross-thread
/// wake-ups and queue hand-offs.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

/// Raises the soft limit on open files to the hard one, as a server holding thousands of
/// client connections needs (the soft limit is often 1,024); what remains is logged.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, "cannot raise the open files limit");
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    tracing::debug!(open_files = ?now, "open files limit");
}

async fn serve(config: Config, load: LoadConfig, upgrade: bool) -> anyhow::Result<ExitCode> {
    let upgrade_path = config
        .admin
        .upgrade_socket
        .clone()
        .unwrap_or_else(|| handoff::default_path(config.admin.bind));
    if !upgrade && handoff::in_use(&upgrade_path) {
        anyhow::bail!(
            "another Strata master is running with the upgrade socket {} (stop it, upgrade it \
             with `strata run --upgrade`, or give this node its own admin.upgrade_socket)",
            upgrade_path.display()
        );
    }
    let sockets = if upgrade {
        let inherited = handoff::receive(&upgrade_path).with_context(|| {
            format!(
                "cannot take the listeners over from {}",
                upgrade_path.display()
            )
        })?;
        tracing::info!("upgrade: took the listeners over; warming up");
        Sockets::Inherited(inherited)
    } else {
        let http = if config.runs_http() {
            Some(
                bind(config.lb.bind)
                    .with_context(|| format!("cannot bind lb.bind = {}", config.lb.bind))?,
            )
        } else {
            None
        };
        let https = match config.lb.tls_bind {
            Some(addr) if config.runs_http() => {
                Some(bind(addr).with_context(|| format!("cannot bind lb.tls_bind = {addr}"))?)
            }
            _ => None,
        };
        Sockets::Bound {
            http,
            https,
            admin: bind(config.admin.bind)
                .with_context(|| format!("cannot bind admin.bind = {}", config.admin.bind))?,
        }
    };
    let log = LogSpec {
        level: config.log.level.clone(),
        json: config.log.format == "json",
    };
    let shutdown = Shutdown::new();
    let tls = tls_acceptor(&config, &shutdown)?;
    let stack = Arc::new(Stack::start(&config, log, &shutdown).await?);
    let (http, https, admin_listener) = sockets.listen(&config).await?;
    tracing::info!(
        http = %http.as_ref().map_or_else(|| "-".to_owned(), local),
        https = %https.as_ref().map_or_else(|| "-".to_owned(), local),
        admin = %local(&admin_listener),
        "listening"
    );

    let offered = {
        let listeners = handoff::Listeners {
            http: http.as_ref().map(rustix::io::dup).transpose()?,
            https: https.as_ref().map(rustix::io::dup).transpose()?,
            admin: rustix::io::dup(&admin_listener)?,
        };
        let shutdown = shutdown.clone();
        let path = upgrade_path.clone();
        std::thread::spawn(move || handoff::offer(path, listeners, shutdown))
    };
    tokio::spawn(handle_signals(
        shutdown.clone(),
        config.lb.shutdown_delay,
        config.app.graceful_timeout,
    ));
    let reloader = Arc::new(Reloader::new(stack.app.clone(), config.clone(), load));
    tokio::spawn(reload_on_hangup(reloader.clone()));
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        stack.clone(),
        reloader,
        config.clone(),
        shutdown.clone(),
    ));
    match stack.front.clone() {
        Some(front) => {
            let serve = |listener, tls| {
                strata_lb::serve(
                    listener,
                    tls,
                    front.clone(),
                    config.lb.clone(),
                    shutdown.clone(),
                )
            };
            let plain = http.map(|listener| serve(listener, None));
            let secure = https.map(|listener| serve(listener, tls));
            tokio::join!(
                async {
                    if let Some(plain) = plain {
                        plain.await;
                    }
                },
                async {
                    if let Some(secure) = secure {
                        secure.await;
                    }
                }
            );
        }
        // A node of non-HTTP tiers (cache) runs until it is told to stop.
        None => shutdown.requested().await,
    }
    let forced = shutdown.stage() == Stage::Forced;
    tracing::info!(forced, "listener drained; stopping the tiers");
    let _ = admin.await;
    stack.stop(forced).await;
    // After a handoff the upgrade socket path belongs to the new master.
    if !offered.is_finished() || !offered.join().unwrap_or(false) {
        let _ = std::fs::remove_file(&upgrade_path);
    }
    tracing::info!("stopped");
    Ok(if forced {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// The node's listening sockets before they serve: bound here (listening only once the app is
/// warm), or taken over, already listening, from the master being upgraded. A node that runs
/// no HTTP tier has no HTTP listener.
enum Sockets {
    Bound {
        http: Option<TcpSocket>,
        https: Option<TcpSocket>,
        admin: TcpSocket,
    },
    Inherited(handoff::Inherited),
}

impl Sockets {
    async fn listen(self, config: &Config) -> anyhow::Result<Listening> {
        match self {
            Sockets::Bound { http, https, admin } => Ok((
                http.map(|h| h.listen(1024))
                    .transpose()
                    .context("cannot listen on lb.bind")?,
                https
                    .map(|h| h.listen(1024))
                    .transpose()
                    .context("cannot listen on lb.tls_bind")?,
                admin.listen(128).context("cannot listen on admin.bind")?,
            )),
            Sockets::Inherited(inherited) => {
                let adopt = |listener: std::net::TcpListener| {
                    listener.set_nonblocking(true)?;
                    TcpListener::from_std(listener)
                };
                // The new master's tiers decide: an inherited HTTP listener it does not need is
                // closed; one it needs but did not inherit is bound.
                let take = |inherited: &Option<std::net::TcpListener>,
                            wanted: Option<SocketAddr>,
                            key: &str|
                 -> anyhow::Result<Option<TcpListener>> {
                    match (inherited, wanted) {
                        (Some(listener), Some(_)) => Ok(Some(adopt(listener.try_clone()?)?)),
                        (None, Some(addr)) => Ok(Some(
                            bind(addr)
                                .and_then(|s| s.listen(1024))
                                .with_context(|| format!("cannot bind {key} = {addr}"))?,
                        )),
                        (_, None) => Ok(None),
                    }
                };
                let runs = config.runs_http();
                let http = take(&inherited.http, runs.then_some(config.lb.bind), "lb.bind")?;
                let https = take(
                    &inherited.https,
                    config.lb.tls_bind.filter(|_| runs),
                    "lb.tls_bind",
                )?;
                let admin = adopt(inherited.admin.try_clone()?)?;
                // Serving from here on (the kernel queues for both masters); let the old go.
                tokio::task::spawn_blocking(move || inherited.confirm())
                    .await?
                    .context("the old master did not acknowledge the upgrade")?;
                tracing::info!("upgrade: the old master is draining");
                Ok((http, https, admin))
            }
        }
    }
}

/// The HTTP, HTTPS and admin listeners, listening.
type Listening = (Option<TcpListener>, Option<TcpListener>, TcpListener);

/// The HTTPS listener's TLS (ALPN: HTTP/2, then HTTP/1.1), its certificate files watched for
/// changes; `None` without `lb.tls_bind`.
fn tls_acceptor(
    config: &Config,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<strata_core::tls::TlsAcceptor>> {
    let lb = &config.lb;
    let (Some(_), Some(cert), Some(key)) = (lb.tls_bind, &lb.tls_cert_file, &lb.tls_key_file)
    else {
        return Ok(None);
    };
    let (acceptor, certificate) = strata_core::tls::acceptor(cert, key, &[b"h2", b"http/1.1"])
        .context("lb.tls_cert_file / lb.tls_key_file")?;
    tokio::spawn(certificate.watch(shutdown.clone()));
    Ok(Some(acceptor))
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

fn local(listener: &TcpListener) -> String {
    listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// SIGHUP: roll a new generation of workers in, as `POST /reload` does.
async fn reload_on_hangup(reloader: Arc<Reloader>) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot install the SIGHUP handler");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading");
        match reloader.reload().await {
            Ok(done) => tracing::info!(
                generation = done.generation,
                restart_needed = ?done.restart_needed,
                "SIGHUP reload done"
            ),
            Err(error) => tracing::error!("SIGHUP reload failed: {error}"),
        }
    }
}

/// SIGTERM or SIGINT: leaving for `delay` (not ready, still accepting), then graceful; a
/// second SIGINT or the grace period running out: forced.
async fn handle_signals(
    shutdown: Shutdown,
    delay: std::time::Duration,
    grace: std::time::Duration,
) {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
        _ = int.recv() => tracing::info!("SIGINT: finishing in-flight requests (again to stop now)"),
    }
    if !delay.is_zero() {
        shutdown.trigger(Stage::Leaving);
        tracing::info!(
            ?delay,
            "not ready: still accepting while balancers take this node out"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = int.recv() => {
                tracing::warn!("second SIGINT: stopping now");
                shutdown.trigger(Stage::Forced);
                return;
            }
        }
    }
    shutdown.trigger(Stage::Graceful);
    tokio::select! {
        _ = int.recv() => tracing::warn!("second SIGINT: stopping now"),
        () = tokio::time::sleep(grace) => tracing::warn!("grace period over: stopping now"),
    }
    shutdown.trigger(Stage::Forced);
}
