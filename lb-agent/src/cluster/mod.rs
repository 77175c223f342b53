//! `[cluster]`: several LB nodes share one desired state in etcd (README "Several LB
//! nodes: one desired state in etcd").
//!
//! - [`keys`]: the key layout under the prefix.
//! - [`shared`]: the shared state as last read ([`Shared`]), what an API change writes
//!   ([`shared::Change`]) and the local copy under `state_dir`.
//! - [`store`]: etcd itself: read, watch, compare-and-swap, seed, lease, sticky key.
//! - [`majority`]: the cluster's health view and its majority rule.
//! - this file: the node's link to the store ([`Cluster`]: status, members) and the
//!   task that keeps the control plane fed ([`spawn`]).
//!
//! Data flows one way: the store task reads etcd and hands the state to
//! [`Control`](crate::control::Control) (`apply_shared`), the single owner of desired
//! state, the way the state file feeds it without `[cluster]`. An API change goes from
//! `Control` to etcd (a transaction comparing each changed key's revision) and is
//! applied locally once etcd took it.

pub mod keys;
pub mod majority;
pub mod shared;
pub mod store;

use std::{
    sync::{Arc, Mutex as StdMutex},
    time::{Duration, Instant},
};

use tokio::sync::{Mutex, watch};

pub use shared::{HealthView, Shared};
pub use store::{Store, StoreError};

use crate::{config::ClusterConfig, control::Control};

/// TTL of a node's lease: its health view disappears this long after it stops.
pub const LEASE_TTL_S: i64 = 3;
/// How often the lease is renewed (and etcd's answer checked).
const KEEPALIVE: Duration = Duration::from_secs(1);
/// Wait between two attempts to reach etcd.
const RECONNECT: Duration = Duration::from_secs(1);

/// Whether the store answers, as `GET /api/v1/cluster` and `xdplb_cluster_store_up`
/// show it.
#[derive(Clone, Debug, Default)]
pub struct StoreStatus {
    pub connected: bool,
    /// The last error while unreachable.
    pub error: Option<String>,
    /// Since when in this state.
    pub since: Option<Instant>,
}

/// This node's link to the cluster: its name, the store, the store's status.
pub struct Cluster {
    pub node: String,
    pub store: Store,
    status: StdMutex<StoreStatus>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.node)
            .field("keys", &self.store.keys)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub async fn connect(cfg: &ClusterConfig) -> Result<Arc<Self>, StoreError> {
        Ok(Arc::new(Cluster {
            node: cfg.node.clone(),
            store: Store::connect(cfg).await?,
            status: StdMutex::new(StoreStatus::default()),
        }))
    }

    pub fn status(&self) -> StoreStatus {
        self.status.lock().expect("status lock").clone()
    }

    pub fn connected(&self) -> bool {
        self.status.lock().expect("status lock").connected
    }

    /// Record the store's state; one log line per transition.
    fn set(&self, connected: bool, error: Option<String>) {
        let mut s = self.status.lock().expect("status lock");
        let changed = s.connected != connected || s.since.is_none();
        if changed {
            s.since = Some(Instant::now());
            if connected {
                tracing::info!(node = %self.node, "cluster store (etcd) connected: following the shared state");
            } else {
                tracing::error!(
                    node = %self.node,
                    error = error.as_deref().unwrap_or(""),
                    "cluster store (etcd) unreachable: serving the last shared state; API changes answer 503 until it returns"
                );
            }
        }
        s.connected = connected;
        s.error = error;
    }
}

/// What the store task needs from the agent.
pub struct Feed {
    pub control: Arc<Mutex<Control>>,
    /// This node's own health view, republished by the control plane when it changes.
    pub own_view: watch::Receiver<HealthView>,
    /// The file's services and `[security]`: seeded where etcd has none.
    pub seed: (
        Vec<crate::config::ServiceConfig>,
        crate::config::SecurityConfig,
    ),
}

/// The store task: (re)connect, seed, read, hand the state to the control plane,
/// publish this node's health view under its lease, follow the watch; on any failure
/// mark the store unreachable (the node keeps serving what it has) and try again
/// every [`RECONNECT`].
pub fn spawn(
    cluster: Arc<Cluster>,
    mut feed: Feed,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let mut established = false;
            let result = tokio::select! {
                r = session(&cluster, &mut feed, &mut established) => r,
                _ = stop.changed() => break,
            };
            if let Err(e) = result {
                if established {
                    // A session that was up broke (e.g. the member it watched on
                    // stopped): try again at once over the other members before saying
                    // the store is gone; only a session that cannot be set up again
                    // makes the node "unreachable".
                    tracing::warn!(error = %e, "cluster store session lost; setting it up again");
                    continue;
                }
                cluster.set(false, Some(e.to_string()));
            }
            tokio::select! {
                () = tokio::time::sleep(RECONNECT) => {}
                _ = stop.changed() => break,
            }
        }
    })
}

async fn session(
    cluster: &Cluster,
    feed: &mut Feed,
    established: &mut bool,
) -> Result<(), StoreError> {
    let store = &cluster.store;
    let created = store.seed(&feed.seed.0, &feed.seed.1).await?;
    if !created.is_empty() {
        tracing::info!(services = ?created, "seeded etcd with the config file's services it did not have");
    }
    let mut shared = store.load().await?;
    let lease = store.grant(LEASE_TTL_S).await?;
    let (mut keeper, mut answers) = store.keep_alive(lease).await?;
    let own = feed.own_view.borrow_and_update().clone();
    store.publish(&cluster.node, &own, lease).await?;
    shared.health.insert(cluster.node.clone(), own);
    let mut watch = store.watch(shared.revision + 1).await?;
    feed.control.lock().await.apply_shared(shared.clone(), true);
    cluster.set(true, None);
    *established = true;
    let mut tick = tokio::time::interval(KEEPALIVE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = watch.message() => {
                let resp = msg
                    .map_err(|e| StoreError::Unreachable(format!("watch: {e}")))?
                    .ok_or_else(|| StoreError::Unreachable("the watch ended".into()))?;
                if resp.canceled() {
                    return Err(StoreError::Unreachable(format!(
                        "the watch was cancelled ({}); reading everything again",
                        resp.cancel_reason()
                    )));
                }
                if resp.events().is_empty() {
                    continue;
                }
                store::apply_events(&mut shared, &store.keys, &resp);
                feed.control.lock().await.apply_shared(shared.clone(), false);
            }
            _ = tick.tick() => {
                keeper
                    .keep_alive()
                    .await
                    .map_err(|e| StoreError::Unreachable(format!("lease keep-alive: {e}")))?;
                match tokio::time::timeout(store::REQUEST_TIMEOUT, answers.message()).await {
                    Ok(Ok(Some(a))) if a.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => {
                        return Err(StoreError::Unreachable("the lease expired".into()));
                    }
                    Ok(Ok(None)) => return Err(StoreError::Unreachable("the lease stream ended".into())),
                    Ok(Err(e)) => return Err(StoreError::Unreachable(format!("lease keep-alive: {e}"))),
                    Err(_) => return Err(StoreError::Unreachable("no lease keep-alive answer within 2 s".into())),
                }
            }
            changed = feed.own_view.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let own = feed.own_view.borrow_and_update().clone();
                store.publish(&cluster.node, &own, lease).await?;
            }
        }
    }
}

/// Milliseconds since the Unix epoch (health views carry it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;

    use super::StoreError;
    use crate::{api::ApiError, control::ControlError};

    #[test]
    fn store_errors_map_to_409_and_503() {
        let conflict = ControlError::from(StoreError::Conflict(
            "service web changed concurrently".into(),
        ));
        assert!(matches!(conflict, ControlError::Conflict(_)));
        let e = ApiError::from(conflict);
        assert_eq!(e.status, StatusCode::CONFLICT);
        assert!(e.message.contains("changed concurrently"), "{}", e.message);
        let down = ControlError::from(StoreError::Unreachable(
            "writing the change: no answer".into(),
        ));
        let e = ApiError::from(down);
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            e.message.contains("unreachable") && e.message.ends_with("nothing changed"),
            "{}",
            e.message
        );
    }
}
