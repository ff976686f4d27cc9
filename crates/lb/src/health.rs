//! Active health checks of a pool's servers, every `health_interval`. A remote server is sent
//! `GET health_path` (2xx or 3xx within `health_timeout` passes); the local tier is asked
//! through its supervisor's readiness, out of band, so a check never waits behind busy
//! workers and load alone never marks the local server down. `rise` passes in a row bring a
//! server back (with slow start), `fall` failures take it out.

use std::sync::Arc;

use http::{header, Method, Request};
use strata_core::seam::{call, empty};
use strata_core::Shutdown;

use crate::upstream::{Pool, Server};

/// Checks every server of `pool` until `shutdown`.
pub async fn watch(pool: Arc<Pool>, shutdown: Shutdown) {
    let config = &pool.config;
    loop {
        tokio::select! {
            () = tokio::time::sleep(config.health_interval) => {}
            () = shutdown.requested() => return,
        }
        // The servers of a round are checked side by side.
        let round: Vec<_> = pool
            .servers()
            .iter()
            .map(|server| {
                let (server, path) = (server.clone(), config.health_path.clone());
                let (timeout, rise, fall) = (config.health_timeout, config.rise, config.fall);
                let port = config.health_port;
                tokio::spawn(async move {
                    let passed = check(&server, &path, port, timeout).await;
                    server.checked(passed, rise, fall);
                })
            })
            .collect();
        for check in round {
            let _ = check.await;
        }
    }
}

async fn check(
    server: &Server,
    path: &str,
    port: Option<u16>,
    timeout: std::time::Duration,
) -> bool {
    if let Some(local) = &server.local {
        return local.readiness().ready;
    }
    let Some(url) = &server.url else {
        return true;
    };
    let host = url.host().unwrap_or("localhost");
    let (authority, service) = match port {
        // A connection of its own to the other port, for this check.
        Some(port) => {
            let authority = format!("{host}:{port}");
            let Ok(base) = format!("http://{authority}").parse() else {
                return false;
            };
            let service = strata_core::client::upstream(&base, timeout, timeout);
            (authority, service)
        }
        None => (
            url.authority()
                .map_or_else(|| host.to_owned(), |a| a.to_string()),
            server.service.clone(),
        ),
    };
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, authority)
        .header(header::USER_AGENT, "strata-health-check")
        .body(empty());
    let Ok(request) = request else { return false };
    match tokio::time::timeout(timeout, call(&service, request)).await {
        Ok(Ok(response)) => {
            let status = response.status();
            status.is_success() || status.is_redirection()
        }
        _ => false,
    }
}
