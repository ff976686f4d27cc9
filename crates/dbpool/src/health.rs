//! The pooler's own view of PostgreSQL: a control connection, apart from the pooled ones and
//! made with tokio-postgres, runs `SELECT 1` every `health_check_interval`. A failed check
//! marks the server down (on `/status` and `/metrics`) and closes the idle pooled
//! connections, which would only fail their next client; the next passing check marks the
//! server up again. Pooled connections stay raw sockets: a client library cannot relay
//! another client's protocol.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use strata_core::metrics::Counter;
use strata_core::Shutdown;
use tokio_postgres::{Client, NoTls};

use crate::config::DbPoolConfig;
use crate::pool::Pool;

/// What the last checks found.
#[derive(Debug, Default)]
pub struct Health {
    up: AtomicBool,
    checked: AtomicBool,
    latency_us: AtomicU64,
    pub passed: Counter,
    pub failed: Counter,
    error: Mutex<Option<String>>,
}

/// The health of the server, as `/status` shows it.
#[derive(Debug, serde::Serialize)]
pub struct HealthStatus {
    /// `None` until the first check.
    pub up: Option<bool>,
    pub latency_ms: f64,
    pub error: Option<String>,
}

impl Health {
    pub fn up(&self) -> Option<bool> {
        self.checked
            .load(Ordering::Relaxed)
            .then(|| self.up.load(Ordering::Relaxed))
    }

    pub fn status(&self) -> HealthStatus {
        HealthStatus {
            up: self.up(),
            latency_ms: self.latency_us.load(Ordering::Relaxed) as f64 / 1000.0,
            error: self.error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    fn record(&self, outcome: &Result<Duration, String>) {
        self.checked.store(true, Ordering::Relaxed);
        self.up.store(outcome.is_ok(), Ordering::Relaxed);
        let mut error = self.error.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(latency) => {
                self.passed.inc();
                self.latency_us
                    .store(latency.as_micros() as u64, Ordering::Relaxed);
                *error = None;
            }
            Err(text) => {
                self.failed.inc();
                *error = Some(text.clone());
            }
        }
    }
}

/// Checks the server every `health_check_interval` until shutdown.
pub async fn watch(pool: Arc<Pool>, shutdown: Shutdown) {
    let interval = pool.config.health_check_interval;
    if interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<Client> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.requested() => return,
        }
        let outcome = check(&pool.config, &mut client).await;
        let was_up = pool.health.up();
        if let Err(error) = &outcome {
            client = None;
            if was_up != Some(false) {
                tracing::warn!(%error, "dbpool: PostgreSQL failed its health check");
            }
            pool.close_idle();
        } else if was_up == Some(false) {
            tracing::info!("dbpool: PostgreSQL passes its health check again");
        }
        pool.health.record(&outcome);
    }
}

/// One `SELECT 1` on the control connection (opened first if need be), within 5 seconds.
async fn check(config: &DbPoolConfig, client: &mut Option<Client>) -> Result<Duration, String> {
    let started = Instant::now();
    let attempt = async {
        if client.as_ref().is_none_or(Client::is_closed) {
            *client = Some(connect(config, "strata-dbpool-health").await?);
        }
        let control = client.as_ref().expect("connected above");
        control
            .simple_query("SELECT 1")
            .await
            .map_err(|e| e.to_string())?;
        Ok(started.elapsed())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 5s".into()))
}

/// A control connection as `server_user` to `health_check_database`.
/// Made over the pooler's own connection to the server (TLS as `server_sslmode` says).
pub(crate) async fn connect(config: &DbPoolConfig, name: &str) -> Result<Client, String> {
    let mut pg = tokio_postgres::Config::new();
    pg.user(&config.server_user)
        .dbname(&config.health_check_database)
        .application_name(name)
        .ssl_mode(tokio_postgres::config::SslMode::Disable);
    if let Some(password) = &config.server_password {
        pg.password(password);
    }
    let login = async {
        let stream = crate::upstream::open(config)
            .await
            .map_err(|e| e.to_string())?;
        pg.connect_raw(stream, NoTls)
            .await
            .map_err(|e| e.to_string())
    };
    let (client, connection) = tokio::time::timeout(Duration::from_secs(5), login)
        .await
        .map_err(|_| "no answer within 5s".to_owned())??;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "dbpool: health connection closed");
        }
    });
    Ok(client)
}
