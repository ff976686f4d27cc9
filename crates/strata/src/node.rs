//! A running node: start the app server, then listen; stop on signals.
//!
//! Order matters: sockets are bound first (a taken port fails at once), the first generation
//! of workers is warmed next, and only then do the sockets listen, so no client ever meets a
//! cold worker. On SIGTERM (or a first SIGINT) the listener stops accepting and in-flight
//! requests get `app.graceful_timeout` to finish; a second SIGINT stops at once.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use strata_appserver::{AppServer, LogSpec};
use strata_core::shutdown::{Shutdown, Stage};
use tokio::net::{TcpListener, TcpSocket};
use tokio::signal::unix::{signal, SignalKind};

use crate::admin;
use crate::config::Config;
use crate::reload::{LoadConfig, Reloader};

/// Runs the node until it is stopped; returns the process exit code.
pub fn run(config: Config, load: LoadConfig) -> anyhow::Result<ExitCode> {
    strata_core::logging::init(&config.log.level, config.log.format == "json");
    strata_appserver::proctitle::set("strata master");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(serve(config, load))
}

async fn serve(config: Config, load: LoadConfig) -> anyhow::Result<ExitCode> {
    let http = bind(config.lb.bind)
        .with_context(|| format!("cannot bind lb.bind = {}", config.lb.bind))?;
    let admin_socket = bind(config.admin.bind)
        .with_context(|| format!("cannot bind admin.bind = {}", config.admin.bind))?;
    let log = LogSpec {
        level: config.log.level.clone(),
        json: config.log.format == "json",
    };
    let app = Arc::new(AppServer::start(config.app.clone(), log).await?);
    let http = http.listen(1024).context("cannot listen on lb.bind")?;
    let admin_listener = admin_socket
        .listen(128)
        .context("cannot listen on admin.bind")?;
    tracing::info!(
        http = %local(&http),
        admin = %local(&admin_listener),
        "listening"
    );

    let shutdown = Shutdown::new();
    tokio::spawn(handle_signals(
        shutdown.clone(),
        config.app.graceful_timeout,
    ));
    let reloader = Arc::new(Reloader::new(app.clone(), config.clone(), load));
    tokio::spawn(reload_on_hangup(reloader.clone()));
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        app.clone(),
        reloader,
        config.clone(),
        shutdown.clone(),
    ));
    strata_lb::serve(http, app.service(), config.lb.clone(), shutdown.clone()).await;
    let forced = shutdown.stage() == Stage::Forced;
    tracing::info!(forced, "listener drained; stopping the app server");
    let _ = admin.await;
    app.stop(forced).await;
    tracing::info!("stopped");
    Ok(if forced {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
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

/// SIGTERM or SIGINT: graceful; a second SIGINT or the grace period running out: forced.
async fn handle_signals(shutdown: Shutdown, grace: std::time::Duration) {
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
    shutdown.trigger(Stage::Graceful);
    tokio::select! {
        _ = int.recv() => tracing::warn!("second SIGINT: stopping now"),
        () = tokio::time::sleep(grace) => tracing::warn!("grace period over: stopping now"),
    }
    shutdown.trigger(Stage::Forced);
}
