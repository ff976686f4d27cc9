//! The tiers of one node, wired together: the only place that knows which tier calls which.
//!
//! The listener's service is its routes (static directories) in front of the accelerator
//! wrapping the app server when both run here; the accelerator alone fronts
//! `accelerator.upstream` through the seam's HTTP client; the app server alone is served
//! directly.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use strata_accelerator::Accelerator;
use strata_appserver::{AppServer, LogSpec};
use strata_cache::ring::{Nodes, Ring};
use strata_cache::Cache;
use strata_core::seam::Invalidate;
use strata_core::{HttpService, Shutdown};
use strata_dbpool::DbPool;

use crate::cluster::{Broadcast, Cluster};
use crate::config::Config;

/// How long the accelerator waits for an upstream's response head.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(60);

/// The running tiers of a node.
pub struct Stack {
    pub app: Option<Arc<AppServer>>,
    pub accelerator: Option<Accelerator>,
    pub cache: Option<Cache>,
    pub dbpool: Option<DbPool>,
    /// The listener's backend pools.
    pub balancer: Option<strata_lb::Balancer>,
    /// Where purges go: the accelerator, or with `[cluster] peers` every node's.
    pub invalidate: Option<Arc<dyn Invalidate>>,
    pub cluster: Option<Arc<Cluster>>,
    /// What the HTTP listener hands every request to; `None` on a node of non-HTTP tiers.
    pub front: Option<HttpService>,
}

impl Stack {
    /// Starts the selected tiers; the app server's first generation is warm on return.
    pub async fn start(config: &Config, log: LogSpec, shutdown: &Shutdown) -> anyhow::Result<Self> {
        let runs = |tier: &str| config.tiers.iter().any(|t| t == tier);
        let cache = if runs("cache") {
            Some(Cache::start(&config.cache, shutdown.clone()).await?)
        } else {
            None
        };
        let dbpool = if runs("dbpool") {
            Some(DbPool::start(&config.dbpool, shutdown.clone()).await?)
        } else {
            None
        };
        let app = if runs("app") {
            Some(Arc::new(AppServer::start(config.app.clone(), log).await?))
        } else {
            None
        };
        let backend = match (&app, &config.accelerator.upstream) {
            (Some(app), _) => Some(app.service()),
            (None, Some(upstream)) if runs("accelerator") => {
                let uri: http::Uri = upstream
                    .parse()
                    .with_context(|| format!("accelerator.upstream = {upstream:?}"))?;
                let tls = if uri.scheme_str() == Some("https") {
                    let connector = strata_core::tls::Connector::new(
                        &config.accelerator.upstream_tls,
                        &[b"h2", b"http/1.1"],
                    )
                    .context("accelerator.upstream_tls")?;
                    tokio::spawn(connector.clone().watch(shutdown.clone()));
                    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
                    Some((connector, host.to_owned()))
                } else {
                    None
                };
                Some(strata_core::client::upstream_tls(
                    &uri,
                    UPSTREAM_TIMEOUT,
                    strata_core::client::CONNECT_TIMEOUT,
                    tls,
                ))
            }
            _ => None,
        };
        let accelerator = backend
            .as_ref()
            .filter(|_| runs("accelerator"))
            .map(|backend| Accelerator::new(config.accelerator.clone(), backend.clone()));
        let cluster = accelerator
            .as_ref()
            .filter(|_| !config.cluster.peers.is_empty())
            .map(|accelerator| {
                Cluster::start(&config.cluster, Arc::new(accelerator.clone()), shutdown)
            });
        let invalidate: Option<Arc<dyn Invalidate>> = match (&cluster, &accelerator) {
            (Some(cluster), Some(accelerator)) => {
                let broadcast: Arc<dyn Invalidate> = Arc::new(Broadcast(cluster.clone()));
                accelerator.set_invalidate(broadcast.clone());
                Some(broadcast)
            }
            (None, Some(accelerator)) => Some(Arc::new(accelerator.clone())),
            _ => None,
        };
        if let (Some(app), Some(invalidate)) = (&app, &invalidate) {
            app.set_invalidate(invalidate.clone());
        }
        // StrataCache: spread over `cache.nodes` when given, else this node's own tier.
        if let Some(app) = &app {
            if !config.cache.nodes.is_empty() {
                let ring = Ring::new(&config.cache);
                tokio::spawn(ring.clone().follow(shutdown.clone()));
                app.set_memcache(Arc::new(Nodes(ring)));
            } else if let Some(cache) = &cache {
                app.set_memcache(Arc::new(cache.clone()));
            }
        }
        let front = accelerator.as_ref().map(Accelerator::service).or(backend);
        // A balancer alone (`--tiers lb` with lb.default_backend) has no next tier of its own.
        let front = front.or_else(|| {
            runs("lb").then(|| {
                HttpService::from_fn(|_| async {
                    Ok(strata_core::seam::status_response(
                        http::StatusCode::BAD_GATEWAY,
                        "this node runs no tier behind its balancer",
                    ))
                })
            })
        });
        // The listener's routes (static directories, backend pools) go in front of it all.
        let (front, balancer) = match front {
            Some(next) => {
                let readiness = app
                    .clone()
                    .map(|app| app as Arc<dyn strata_core::Readiness>);
                let balancer = strata_lb::Balancer::start(
                    &config.lb,
                    &next,
                    readiness,
                    config.admin.token.clone(),
                    shutdown,
                )?;
                let front = strata_lb::router(&config.lb, next, &balancer)?;
                (Some(front), Some(balancer))
            }
            None => (None, None),
        };
        Ok(Self {
            app,
            accelerator,
            cache,
            dbpool,
            balancer,
            invalidate,
            cluster,
            front,
        })
    }

    /// Every tier's metrics, in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        if let Some(app) = &self.app {
            app.render_metrics(out);
        }
        if let Some(accelerator) = &self.accelerator {
            accelerator.render_metrics(out);
        }
        if let Some(cache) = &self.cache {
            cache.render_metrics(out);
        }
        if let Some(dbpool) = &self.dbpool {
            dbpool.render_metrics(out);
        }
        if let Some(balancer) = &self.balancer {
            balancer.render_metrics(out);
        }
        if let Some(cluster) = &self.cluster {
            cluster.render_metrics(out);
        }
    }

    pub async fn stop(&self, forced: bool) {
        if let Some(app) = &self.app {
            app.stop(forced).await;
        }
    }
}
