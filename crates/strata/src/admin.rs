//! The admin listener: `GET /status` (JSON), `GET /metrics` (Prometheus text), `GET /healthz`,
//! `POST /reload` (a new generation of workers; answers when the rollout is done), and the
//! accelerator's invalidation: `POST /cache/purge?url=U`, `?tag=T` (repeatable) or
//! `?ban=PATTERN`, each with `&soft=1` to mark stale instead of removing; the pooler's
//! `POST /dbpool/pause?database=D` (every database without one) and `POST /dbpool/resume`.
//!
//! It listens on loopback by default; elsewhere every request must carry
//! `Authorization: Bearer <admin.token>`, except the probes, which carry none: `GET /livez`
//! (and its old name `/healthz`: the process answers) and `GET /readyz` (200 when every tier
//! this node runs can serve: not stopping, warm workers, PostgreSQL reachable for the
//! pooler; 503 with the reasons otherwise).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderValue, Request, Response, StatusCode};
use strata_core::seam::{full, status_response, Purge, Purged};
use strata_core::{Body, HttpService, Shutdown};
use strata_lb::LbConfig;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::reload::{Reloaded, Reloader};
use crate::stack::Stack;

/// Serves the admin API until shutdown.
pub async fn serve(
    listener: TcpListener,
    stack: Arc<Stack>,
    reloader: Arc<Reloader>,
    config: Config,
    shutdown: Shutdown,
) {
    let started = Instant::now();
    let token = config.admin.token.clone().map(|t| format!("Bearer {t}"));
    let secret = config.cluster.secret.clone().map(|s| format!("Bearer {s}"));
    let tiers = config.tiers.clone();
    let stopping = shutdown.clone();
    let service = HttpService::from_fn(move |request: Request<Body>| {
        let stack = stack.clone();
        let reloader = reloader.clone();
        let token = token.clone();
        let secret = secret.clone();
        let tiers = tiers.clone();
        let stopping = stopping.clone();
        async move {
            // Probes (kubelet, a balancer's health check) carry no token.
            if request.method() == http::Method::GET {
                match request.uri().path() {
                    "/livez" | "/healthz" => return Ok(typed("ok\n".into(), "text/plain")),
                    "/readyz" => return Ok(readiness(&stack, &stopping)),
                    _ => {}
                }
            }
            // Other nodes of the cluster carry its shared secret, and reach only this.
            if request.uri().path().starts_with("/cluster/") {
                return Ok(cluster_route(&stack, secret.as_deref(), request).await);
            }
            let authorized = token.as_deref().is_none_or(|expected| {
                request
                    .headers()
                    .get(header::AUTHORIZATION)
                    .map(|v| v.as_bytes())
                    == Some(expected.as_bytes())
            });
            if !authorized {
                return Ok::<_, Infallible>(status_response(
                    StatusCode::UNAUTHORIZED,
                    "admin token required",
                ));
            }
            let (method, path) = (request.method().clone(), request.uri().path().to_owned());
            let query = request.uri().query().unwrap_or("").to_owned();
            Ok(route(&method, &path, &query, &stack, &reloader, &tiers, started).await)
        }
    });
    let limits = LbConfig {
        bind: config.admin.bind,
        ..LbConfig::default()
    };
    strata_lb::serve(listener, None, service, limits, shutdown).await;
}

async fn route(
    method: &http::Method,
    path: &str,
    query: &str,
    stack: &Stack,
    reloader: &Reloader,
    tiers: &[String],
    started: Instant,
) -> Response<Body> {
    match (method.as_str(), path) {
        ("GET", "/status") => {
            let status = serde_json::json!({
                "tiers": tiers,
                "uptime_seconds": started.elapsed().as_secs(),
                "app": stack.app.as_ref().map(|app| app.status()),
                "accelerator": stack.accelerator.as_ref().map(|a| serde_json::json!({
                    "routes": a.routes(),
                })),
                "dbpool": stack.dbpool.as_ref().map(|d| serde_json::json!({
                    "server": d.health(),
                    "databases": d.status(),
                })),
                "lb": stack.balancer.as_ref().map(|b| serde_json::json!({
                    "backends": b.status(),
                })),
                "cluster": stack.cluster.as_ref().map(|c| c.status()),
            });
            typed(status.to_string(), "application/json")
        }
        ("GET", "/metrics") => {
            let mut out = String::new();
            stack.render_metrics(&mut out);
            typed(out, "text/plain; version=0.0.4")
        }
        ("POST", "/reload") => reload_response(reloader.reload().await),
        ("POST", "/cache/purge") => purge(stack, query).await,
        ("POST", "/dbpool/pause" | "/dbpool/resume") => pause(stack, path, query),
        (_, "/status" | "/metrics" | "/healthz" | "/livez" | "/readyz") => {
            status_response(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        (_, "/reload" | "/cache/purge" | "/dbpool/pause" | "/dbpool/resume") => {
            status_response(StatusCode::METHOD_NOT_ALLOWED, "use POST")
        }
        _ => status_response(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
}

/// `/readyz`: 200 `ready` when this node can serve; otherwise 503 and one line per reason.
fn readiness(stack: &Stack, shutdown: &Shutdown) -> Response<Body> {
    let mut not_ready = Vec::new();
    if shutdown.stage() != strata_core::shutdown::Stage::Running {
        not_ready.push("stopping".to_owned());
    }
    if let Some(app) = &stack.app {
        let workers = app.status().workers;
        if !workers
            .iter()
            .any(|w| w.state != strata_appserver::WorkerState::Retiring)
        {
            not_ready.push("app: no worker ready".to_owned());
        }
    }
    if let Some(dbpool) = &stack.dbpool {
        let health = dbpool.health();
        match health.up {
            Some(true) => {}
            Some(false) => not_ready.push(format!(
                "dbpool: PostgreSQL unreachable ({})",
                health.error.unwrap_or_default()
            )),
            None => not_ready.push("dbpool: PostgreSQL not checked yet".to_owned()),
        }
    }
    if not_ready.is_empty() {
        return typed("ready\n".into(), "text/plain");
    }
    let mut response = typed(format!("{}\n", not_ready.join("\n")), "text/plain");
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response
}

/// `{"ok": true, "generation": N, "restart_needed": [...]}`, or 500 with the reason the old
/// generation still serves.
fn reload_response(outcome: Result<Reloaded, String>) -> Response<Body> {
    let (status, body) = match outcome {
        Ok(reloaded) => (
            StatusCode::OK,
            serde_json::json!({
                "ok": true,
                "generation": reloaded.generation,
                "restart_needed": reloaded.restart_needed,
            }),
        ),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            serde_json::json!({ "ok": false, "error": error }),
        ),
    };
    let mut response = typed(body.to_string(), "application/json");
    *response.status_mut() = status;
    response
}

/// `POST /cache/purge`: `url=`, `tag=` (repeatable) or `ban=`, optionally `soft=1`. In a
/// cluster it answers once every reachable node applied it (or `cluster.purge_timeout`
/// passed), naming the nodes it missed.
async fn purge(stack: &Stack, query: &str) -> Response<Body> {
    let Some(target) = &stack.invalidate else {
        return status_response(
            StatusCode::CONFLICT,
            "this node does not run the accelerator",
        );
    };
    let mut soft = false;
    let (mut urls, mut tags, mut bans) = (Vec::new(), Vec::new(), Vec::new());
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value);
        match key {
            "url" => urls.push(value),
            "tag" => tags.push(value),
            "ban" => bans.push(value),
            "soft" => soft = matches!(value.as_str(), "1" | "true" | "yes"),
            _ => {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    &format!("unknown parameter {key:?} (url, tag, ban, soft)"),
                )
            }
        }
    }
    if urls.is_empty() && tags.is_empty() && bans.is_empty() {
        return status_response(StatusCode::BAD_REQUEST, "give url=, tag= or ban=");
    }
    let purge = Purge {
        urls,
        tags,
        bans,
        soft,
        all: false,
    };
    let Purged { count, missed } = target.invalidate(purge).await;
    typed(
        serde_json::json!({ "purged": count, "soft": soft, "missed": missed }).to_string(),
        "application/json",
    )
}

/// `/cluster/...`: what the other nodes of the cluster ask, with the cluster's secret.
async fn cluster_route(
    stack: &Stack,
    secret: Option<&str>,
    request: Request<Body>,
) -> Response<Body> {
    let (Some(cluster), Some(secret)) = (&stack.cluster, secret) else {
        return status_response(StatusCode::NOT_FOUND, "this node is not in a cluster");
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if given != Some(secret.as_bytes()) {
        return status_response(StatusCode::UNAUTHORIZED, "cluster secret required");
    }
    let query = request.uri().query().unwrap_or("").to_owned();
    match (request.method().as_str(), request.uri().path()) {
        ("GET", "/cluster/purges") => cluster.since(&query),
        ("POST", "/cluster/purge") => {
            let mut body = request.into_body();
            let mut bytes = Vec::new();
            while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
                let Ok(data) = frame.map(|f| f.into_data().unwrap_or_default()) else {
                    return status_response(StatusCode::BAD_REQUEST, "unreadable purge");
                };
                if bytes.len() + data.len() > 1 << 20 {
                    return status_response(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "a purge is under 1 MiB",
                    );
                }
                bytes.extend_from_slice(&data);
            }
            cluster.receive(&bytes).await
        }
        _ => status_response(StatusCode::NOT_FOUND, "no such cluster endpoint"),
    }
}

/// `POST /dbpool/pause` or `/dbpool/resume`, for one `database=` or all of them.
fn pause(stack: &Stack, path: &str, query: &str) -> Response<Body> {
    let Some(dbpool) = &stack.dbpool else {
        return status_response(StatusCode::CONFLICT, "this node does not run the dbpool");
    };
    let mut database = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("database", value)) => database = Some(percent_decode(value)),
            _ => {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    &format!("unknown parameter {pair:?} (database)"),
                )
            }
        }
    }
    let (key, databases) = if path.ends_with("pause") {
        ("paused", dbpool.pause(database.as_deref()))
    } else {
        ("resumed", dbpool.resume(database.as_deref()))
    };
    typed(
        serde_json::json!({ key: databases }).to_string(),
        "application/json",
    )
}

/// Decodes `%XX` escapes and `+` of a query value.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push((high * 16 + low) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn typed(body: String, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(percent_decode("a%2Fb+c%3f"), "a/b c?");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%é"), "%zz%é");
    }
}
