//! The admin listener: `GET /status` (JSON), `GET /metrics` (Prometheus text), `GET /healthz`,
//! `POST /reload` (a new generation of workers; answers when the rollout is done).
//!
//! It listens on loopback by default; elsewhere every request must carry
//! `Authorization: Bearer <admin.token>`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderValue, Request, Response, StatusCode};
use strata_appserver::AppServer;
use strata_core::seam::{full, status_response};
use strata_core::{Body, Shutdown};
use strata_lb::LbConfig;
use tokio::net::TcpListener;
use tower::util::BoxCloneSyncService;

use crate::config::Config;
use crate::reload::{Reloaded, Reloader};

/// Serves the admin API until shutdown.
pub async fn serve(
    listener: TcpListener,
    app: Arc<AppServer>,
    reloader: Arc<Reloader>,
    config: Config,
    shutdown: Shutdown,
) {
    let started = Instant::now();
    let token = config.admin.token.clone().map(|t| format!("Bearer {t}"));
    let tiers = config.tiers.clone();
    let service = tower::service_fn(move |request: Request<Body>| {
        let app = app.clone();
        let reloader = reloader.clone();
        let token = token.clone();
        let tiers = tiers.clone();
        async move {
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
            Ok(route(&method, &path, &app, &reloader, &tiers, started).await)
        }
    });
    let limits = LbConfig {
        bind: config.admin.bind,
        ..LbConfig::default()
    };
    strata_lb::serve(
        listener,
        BoxCloneSyncService::new(service),
        limits,
        shutdown,
    )
    .await;
}

async fn route(
    method: &http::Method,
    path: &str,
    app: &AppServer,
    reloader: &Reloader,
    tiers: &[String],
    started: Instant,
) -> Response<Body> {
    match (method.as_str(), path) {
        ("GET", "/status") => {
            let status = serde_json::json!({
                "tiers": tiers,
                "uptime_seconds": started.elapsed().as_secs(),
                "app": app.status(),
            });
            typed(status.to_string(), "application/json")
        }
        ("GET", "/metrics") => {
            let mut out = String::new();
            app.render_metrics(&mut out);
            typed(out, "text/plain; version=0.0.4")
        }
        ("GET", "/healthz") => typed("ok\n".into(), "text/plain"),
        ("POST", "/reload") => reload_response(reloader.reload().await),
        (_, "/status" | "/metrics" | "/healthz") => {
            status_response(StatusCode::METHOD_NOT_ALLOWED, "use GET")
        }
        (_, "/reload") => status_response(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
        _ => status_response(StatusCode::NOT_FOUND, "no such admin endpoint"),
    }
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

fn typed(body: String, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(full(body));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
