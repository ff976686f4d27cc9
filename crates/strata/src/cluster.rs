//! The cluster: purges that reach every node's accelerator.
//!
//! A node with `[cluster] peers` (other nodes' admin URLs; a host name stands for every
//! address it resolves to, looked up again every `resolve_interval`) wraps its accelerator in
//! a [`Cluster`]. Every purge made here (`strata.purge_url`/`purge_tags` in application code,
//! a `PURGE` request, the admin API) is applied to this node's store, numbered, kept in a log
//! of the last [`LOG`] purges, and pushed to each peer (`POST /cluster/purge` on its admin
//! listener, with `Authorization: Bearer <cluster.secret>`), retried until `purge_timeout`.
//! The purge returns once every reachable peer has applied it, or when the timeout passes;
//! the peers it missed are logged, counted, and named to the caller.
//!
//! A missed peer is never left serving what was purged. Every `sync_interval` each node asks
//! each peer for the purges it has made since the last one this node applied
//! (`GET /cluster/purges?node=N&since=S`): a node that was cut off, or whose pushes were lost,
//! replays what it missed as soon as it can reach the peer again, and drops its whole cache
//! if the peer's log no longer reaches back that far. A node is known by a number drawn when
//! it starts, so a restarted peer is a new one (its old purges missed by nobody it could
//! still tell); a node that finds its own number among its peers (a name that resolves to
//! every node, itself included) leaves itself out.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use strata_core::metrics::Counter;
use strata_core::seam::{call, empty, full, Invalidate, Purge, Purged, Purging};
use strata_core::{Body, HttpService, Shutdown};

/// Purges a node keeps for peers that missed them.
pub const LOG: usize = 4096;

/// The `[cluster]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The other nodes' admin listeners, `http://host:port`; a host name stands for every
    /// address it resolves to (a Kubernetes headless Service).
    pub peers: Vec<String>,
    /// Shared by every node: authenticates purges and catch-up requests between them.
    pub secret: Option<String>,
    /// Longest a purge waits for the peers to apply it.
    #[serde(with = "strata_core::duration")]
    pub purge_timeout: Duration,
    /// How often each node asks each peer for purges it missed.
    #[serde(with = "strata_core::duration")]
    pub sync_interval: Duration,
    /// How often peers' host names are looked up again.
    #[serde(with = "strata_core::duration")]
    pub resolve_interval: Duration,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            secret: None,
            purge_timeout: Duration::from_secs(2),
            sync_interval: Duration::from_secs(1),
            resolve_interval: Duration::from_secs(5),
        }
    }
}

impl ClusterConfig {
    /// Checks what serde cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), String> {
        if self.peers.is_empty() {
            return Ok(());
        }
        if self.secret.as_deref().is_none_or(str::is_empty) {
            return Err("cluster.secret: peers need a shared secret".into());
        }
        for (i, peer) in self.peers.iter().enumerate() {
            let ok = peer.starts_with("http://")
                && peer
                    .parse::<http::Uri>()
                    .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()));
            if !ok {
                return Err(format!(
                    "cluster.peers[{i}] = {peer:?}: expected http://host:port (a node's admin listener)"
                ));
            }
        }
        for (key, value) in [
            ("purge_timeout", self.purge_timeout),
            ("sync_interval", self.sync_interval),
            ("resolve_interval", self.resolve_interval),
        ] {
            if value.is_zero() {
                return Err(format!("cluster.{key} = 0s: must be more than 0"));
            }
        }
        Ok(())
    }
}

/// A purge as it travels to a peer.
#[derive(Debug, Serialize, Deserialize)]
struct Pushed {
    node: u64,
    seq: u64,
    purge: Purge,
}

/// A peer's answer to "what did you purge since S?".
#[derive(Debug, Default, Serialize, Deserialize)]
struct Since {
    node: u64,
    /// Its latest purge.
    seq: u64,
    /// Its purges after S, oldest first.
    entries: Vec<(u64, Purge)>,
    /// Its log no longer reaches back to S: drop everything.
    reset: bool,
}

/// One peer: an address of a configured entry.
struct Peer {
    /// Its admin URL, as shown in logs and `/status`.
    name: String,
    entry: usize,
    addr: Option<SocketAddr>,
    service: HttpService,
    authority: String,
    /// Its node number, once it answered.
    node: AtomicU64,
    /// It answered the last catch-up request.
    reachable: AtomicBool,
    /// It is this node (a name that resolves to every node).
    itself: AtomicBool,
}

/// A peer as `/status` shows it.
#[derive(Debug, Serialize)]
pub struct PeerStatus {
    pub name: String,
    pub reachable: bool,
}

/// The cluster's state on this node.
pub struct Cluster {
    node: u64,
    config: ClusterConfig,
    local: Arc<dyn Invalidate>,
    log: Mutex<VecDeque<(u64, Purge)>>,
    seq: AtomicU64,
    peers: RwLock<Vec<Arc<Peer>>>,
    /// For each origin node, the purges applied here without a gap, up to this one.
    applied: Mutex<HashMap<u64, u64>>,
    purges: Counter,
    missed: Counter,
    replayed: Counter,
    resets: Counter,
}

impl Cluster {
    /// Starts following `config.peers` for purges applied to `local` (this node's
    /// accelerator).
    pub fn start(
        config: &ClusterConfig,
        local: Arc<dyn Invalidate>,
        shutdown: &Shutdown,
    ) -> Arc<Self> {
        let cluster = Self::new(config, local);
        let started = cluster.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { started.run(shutdown).await });
        cluster
    }

    fn new(config: &ClusterConfig, local: Arc<dyn Invalidate>) -> Arc<Self> {
        Arc::new(Self {
            node: RandomState::new().hash_one(std::process::id()) | 1,
            config: config.clone(),
            local,
            log: Mutex::new(VecDeque::new()),
            seq: AtomicU64::new(0),
            peers: RwLock::new(Vec::new()),
            applied: Mutex::new(HashMap::new()),
            purges: Counter::default(),
            missed: Counter::default(),
            replayed: Counter::default(),
            resets: Counter::default(),
        })
    }

    fn peers(&self) -> Vec<Arc<Peer>> {
        self.peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|p| !p.itself.load(Ordering::Relaxed))
            .cloned()
            .collect()
    }

    /// Resolves the peers now and then, and catches up with them every `sync_interval`.
    async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut resolved = tokio::time::Instant::now();
        self.resolve().await;
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.config.sync_interval) => {}
                () = shutdown.requested() => return,
            }
            if resolved.elapsed() >= self.config.resolve_interval {
                resolved = tokio::time::Instant::now();
                self.resolve().await;
            }
            let rounds: Vec<_> = self
                .peers()
                .into_iter()
                .map(|peer| {
                    let cluster = self.clone();
                    tokio::spawn(async move { cluster.catch_up(&peer).await })
                })
                .collect();
            for round in rounds {
                let _ = round.await;
            }
        }
    }

    /// Looks every peer entry up; keeps the peers whose address is still there.
    async fn resolve(&self) {
        let current: Vec<Arc<Peer>> = self.peers.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut next = Vec::new();
        for (entry, url) in self.config.peers.iter().enumerate() {
            let Ok(uri) = url.parse::<http::Uri>() else {
                continue;
            };
            let host = uri.host().unwrap_or_default();
            let port = uri.port_u16().unwrap_or(80);
            let addrs = match strata_core::resolve::addresses(host, port).await {
                Ok(addrs) => addrs,
                Err(error) => {
                    tracing::warn!(peer = %url, %error, "cluster peer did not resolve: its addresses are kept");
                    next.extend(current.iter().filter(|p| p.entry == entry).cloned());
                    continue;
                }
            };
            for addr in addrs {
                match current
                    .iter()
                    .find(|p| p.entry == entry && p.addr == Some(addr))
                {
                    Some(peer) => next.push(peer.clone()),
                    None => next.push(Arc::new(self.peer(entry, addr, &uri))),
                }
            }
        }
        *self.peers.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    fn peer(&self, entry: usize, addr: SocketAddr, uri: &http::Uri) -> Peer {
        let base: http::Uri = format!("http://{addr}")
            .parse()
            .expect("an address is an authority");
        let connect = self.config.purge_timeout.min(Duration::from_secs(1));
        Peer {
            name: format!("http://{addr}"),
            entry,
            addr: Some(addr),
            service: strata_core::client::upstream(&base, self.config.purge_timeout, connect),
            authority: uri
                .authority()
                .map_or_else(|| addr.to_string(), |a| a.to_string()),
            node: AtomicU64::new(0),
            // Until it answers once, a purge waits for it like any other.
            reachable: AtomicBool::new(true),
            itself: AtomicBool::new(false),
        }
    }

    /// Sends one request to `peer`'s admin listener; the body of a 200, or why not.
    async fn ask(
        &self,
        peer: &Peer,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, String> {
        let secret = self.config.secret.clone().unwrap_or_default();
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &peer.authority)
            .header(header::AUTHORIZATION, format!("Bearer {secret}"));
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(body.map_or_else(empty, full))
            .map_err(|e| e.to_string())?;
        let response = call(&peer.service, request)
            .await
            .unwrap_or_else(|never| match never {});
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(format!(
                "{status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ));
        }
        Ok(bytes.to_vec())
    }

    /// Asks `peer` for the purges made there since the last one applied here, and applies
    /// them (or drops everything when its log no longer reaches back).
    async fn catch_up(&self, peer: &Peer) {
        let known = peer.node.load(Ordering::Relaxed);
        let since = self.applied_from(known);
        let path = format!("/cluster/purges?node={known}&since={since}");
        let answer = self
            .ask(peer, Method::GET, &path, None)
            .await
            .and_then(|bytes| serde_json::from_slice::<Since>(&bytes).map_err(|e| e.to_string()));
        let answer = match answer {
            Ok(answer) => answer,
            Err(error) => {
                if peer.reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(peer = %peer.name, %error, "cluster peer unreachable");
                }
                return;
            }
        };
        if answer.node == self.node {
            peer.itself.store(true, Ordering::Relaxed);
            return;
        }
        if !peer.reachable.swap(true, Ordering::Relaxed) {
            tracing::info!(peer = %peer.name, "cluster peer reachable again");
        }
        peer.node.store(answer.node, Ordering::Relaxed);
        if answer.reset {
            self.resets.inc();
            tracing::warn!(peer = %peer.name, "missed more purges than the peer keeps: dropping the whole cache");
            self.local
                .invalidate(Purge {
                    all: true,
                    ..Purge::default()
                })
                .await;
        } else {
            for (_, purge) in answer.entries {
                self.replayed.inc();
                self.local.invalidate(purge).await;
            }
        }
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        let last = applied.entry(answer.node).or_insert(0);
        *last = (*last).max(answer.seq);
    }

    fn applied_from(&self, node: u64) -> u64 {
        self.applied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .copied()
            .unwrap_or(0)
    }

    /// Pushes purge `seq` to `peer` until it applied it or the purge timeout passed.
    async fn push(&self, peer: &Peer, body: Vec<u8>, deadline: tokio::time::Instant) -> bool {
        loop {
            match self
                .ask(peer, Method::POST, "/cluster/purge", Some(body.clone()))
                .await
            {
                Ok(_) => return true,
                Err(error) => {
                    let pause = Duration::from_millis(100);
                    if tokio::time::Instant::now() + pause >= deadline {
                        tracing::debug!(peer = %peer.name, %error, "purge not delivered");
                        return false;
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// What a peer answers to `POST /cluster/purge`: applies it here.
    pub async fn receive(&self, body: &[u8]) -> Response<Body> {
        let Ok(Pushed { node, seq, purge }) = serde_json::from_slice(body) else {
            return strata_core::seam::status_response(StatusCode::BAD_REQUEST, "expected a purge");
        };
        let fresh = {
            let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
            match applied.get(&node).copied() {
                Some(last) if seq <= last => false,
                Some(last) if seq == last + 1 => {
                    applied.insert(node, seq);
                    true
                }
                // A gap, or a node not heard from yet: applied now, and the next catch-up
                // fills in whatever came before.
                _ => true,
            }
        };
        let count = if fresh {
            self.local.invalidate(purge).await.count
        } else {
            0
        };
        json(&serde_json::json!({ "purged": count }))
    }

    /// What a peer answers to `GET /cluster/purges?node=N&since=S`.
    pub fn since(&self, query: &str) -> Response<Body> {
        let mut node = 0;
        let mut since = 0;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("node", value)) => node = value.parse().unwrap_or(0),
                Some(("since", value)) => since = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        // Asked about another life of this node (or none): everything this one did.
        if node != self.node {
            since = 0;
        }
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.seq.load(Ordering::Relaxed);
        let oldest = log.front().map_or(seq + 1, |(first, _)| *first);
        let answer = if since + 1 < oldest {
            Since {
                node: self.node,
                seq,
                entries: Vec::new(),
                reset: true,
            }
        } else {
            Since {
                node: self.node,
                seq,
                entries: log.iter().filter(|(s, _)| *s > since).cloned().collect(),
                reset: false,
            }
        };
        drop(log);
        json(&answer)
    }

    /// The peers, for `/status`.
    pub fn status(&self) -> serde_json::Value {
        let peers: Vec<PeerStatus> = self
            .peers()
            .iter()
            .map(|p| PeerStatus {
                name: p.name.clone(),
                reachable: p.reachable.load(Ordering::Relaxed),
            })
            .collect();
        serde_json::json!({ "node": self.node, "purges": self.seq.load(Ordering::Relaxed), "peers": peers })
    }

    /// The cluster's metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        let peers = self.peers();
        let up = peers
            .iter()
            .filter(|p| p.reachable.load(Ordering::Relaxed))
            .count();
        let _ = writeln!(out, "# HELP strata_cluster_peers Peers by whether the last catch-up reached them.\n# TYPE strata_cluster_peers gauge");
        let _ = writeln!(out, "strata_cluster_peers{{state=\"reachable\"}} {up}");
        let _ = writeln!(
            out,
            "strata_cluster_peers{{state=\"unreachable\"}} {}",
            peers.len() - up
        );
        let _ = writeln!(out, "# HELP strata_cluster_purges_total Purges made here, pushes a peer missed, and purges caught up from peers (replayed one by one, or by dropping the whole cache).\n# TYPE strata_cluster_purges_total counter");
        for (event, count) in [
            ("made", self.purges.get()),
            ("missed_by_peer", self.missed.get()),
            ("replayed", self.replayed.get()),
            ("reset", self.resets.get()),
        ] {
            let _ = writeln!(
                out,
                "strata_cluster_purges_total{{event=\"{event}\"}} {count}"
            );
        }
    }
}

/// Where this node's purges go in a cluster: applied here, logged, and pushed to every peer.
pub struct Broadcast(pub Arc<Cluster>);

impl Invalidate for Broadcast {
    fn invalidate(&self, purge: Purge) -> Purging {
        let cluster = self.0.clone();
        Box::pin(async move {
            let count = cluster.local.invalidate(purge.clone()).await.count;
            let seq = {
                let mut log = cluster.log.lock().unwrap_or_else(|e| e.into_inner());
                let seq = cluster.seq.fetch_add(1, Ordering::Relaxed) + 1;
                log.push_back((seq, purge.clone()));
                if log.len() > LOG {
                    log.pop_front();
                }
                seq
            };
            cluster.purges.inc();
            let body = serde_json::to_vec(&Pushed {
                node: cluster.node,
                seq,
                purge,
            })
            .unwrap_or_default();
            let deadline = tokio::time::Instant::now() + cluster.config.purge_timeout;
            let mut missed = Vec::new();
            let mut pushes = Vec::new();
            for peer in cluster.peers() {
                if peer.reachable.load(Ordering::Relaxed) {
                    let (cluster, body) = (cluster.clone(), body.clone());
                    pushes.push((
                        peer.name.clone(),
                        tokio::spawn(async move { cluster.push(&peer, body, deadline).await }),
                    ));
                } else {
                    // Known to be unreachable: not waited for; it catches up when it can.
                    missed.push(peer.name.clone());
                }
            }
            for (name, push) in pushes {
                if !push.await.unwrap_or(false) {
                    missed.push(name);
                }
            }
            for _ in &missed {
                cluster.missed.inc();
            }
            if !missed.is_empty() {
                tracing::warn!(
                    seq,
                    missed = missed.join(", "),
                    "purge not applied on every peer in time; they catch up when they can reach this node"
                );
            }
            Purged { count, missed }
        })
    }
}

fn json(value: &impl Serialize) -> Response<Body> {
    let mut response = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that records what it was asked to purge.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<Purge>>);

    impl Invalidate for Recorder {
        fn invalidate(&self, purge: Purge) -> Purging {
            self.0.lock().expect("recorder").push(purge);
            Box::pin(std::future::ready(Purged {
                count: 1,
                missed: Vec::new(),
            }))
        }
    }

    fn url(u: &str) -> Purge {
        Purge {
            urls: vec![u.into()],
            ..Purge::default()
        }
    }

    fn cluster() -> (Arc<Cluster>, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        (
            Cluster::new(&ClusterConfig::default(), recorder.clone()),
            recorder,
        )
    }

    async fn since(cluster: &Cluster, query: &str) -> Since {
        let body = cluster
            .since(query)
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        serde_json::from_slice(&body).expect("json")
    }

    #[tokio::test]
    async fn a_peer_gets_what_it_missed_or_a_reset_when_the_log_has_moved_on() {
        let (origin, _) = cluster();
        let total = LOG as u64 + 10;
        for i in 1..=total {
            Broadcast(origin.clone())
                .invalidate(url(&format!("h/{i}")))
                .await;
        }
        let node = origin.node;
        let recent = since(&origin, &format!("node={node}&since={}", total - 5)).await;
        assert_eq!(recent.seq, total);
        assert!(!recent.reset);
        assert_eq!(recent.entries.len(), 5);
        assert_eq!(
            recent.entries[0],
            (total - 4, url(&format!("h/{}", total - 4)))
        );
        // The log holds the last LOG purges (11 on): from 10 on is all there, 9 is not.
        assert!(!since(&origin, &format!("node={node}&since=10")).await.reset);
        assert!(since(&origin, &format!("node={node}&since=9")).await.reset);
        // Asked about another life of this node: everything, which no longer fits.
        let other = since(&origin, &format!("node={}&since={}", node + 2, total - 1)).await;
        assert!(other.reset);
    }

    #[tokio::test]
    async fn a_pushed_purge_is_applied_once() {
        let (peer, store) = cluster();
        let push = |seq: u64| {
            serde_json::to_vec(&Pushed {
                node: 7,
                seq,
                purge: url(&format!("h/{seq}")),
            })
            .expect("json")
        };
        // Not heard from node 7 yet: applied (the next catch-up brings anything earlier).
        peer.receive(&push(1)).await;
        peer.applied.lock().expect("applied").insert(7, 1);
        peer.receive(&push(2)).await;
        peer.receive(&push(2)).await;
        peer.receive(&push(1)).await;
        // A gap: applied now, and the catch-up fills in.
        peer.receive(&push(5)).await;
        let applied: Vec<_> = store
            .0
            .lock()
            .expect("store")
            .iter()
            .map(|p| p.urls[0].clone())
            .collect();
        assert_eq!(applied, ["h/1", "h/2", "h/5"]);
        assert_eq!(peer.applied_from(7), 2);
        assert_eq!(
            peer.receive(b"nonsense").await.status(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn peers_need_a_secret_and_http_urls() {
        let mut config = ClusterConfig {
            peers: vec!["http://apps.svc:9000".into()],
            ..ClusterConfig::default()
        };
        assert!(config.validate().unwrap_err().contains("cluster.secret"));
        config.secret = Some("s".into());
        assert_eq!(config.validate(), Ok(()));
        config.peers.push("apps.svc:9000".into());
        assert!(config.validate().unwrap_err().contains("cluster.peers[1]"));
    }
}
