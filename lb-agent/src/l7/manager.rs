//! Runs the L7 services the control plane asks for: starts a [`L7Service`] per l7
//! service (after making its VIP local), feeds it the serving backends whenever health,
//! drain, weights or slow start change, restarts it when its settings change, and
//! stops it when the service goes. The API reaches running services (cache purge,
//! stats) through an [`L7Registry`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use crate::{
    config::ServiceConfig,
    control::L7Desired,
    l7::{service::L7Service, stats::HttpStats, vip::LocalVips},
};

/// How long a stopping service may take to finish its in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The running L7 services by name, shared with the API.
#[derive(Clone, Debug, Default)]
pub struct L7Registry {
    services: Arc<RwLock<BTreeMap<String, Arc<L7Service>>>>,
}

impl L7Registry {
    /// The running service `name`, if any.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<Arc<L7Service>> {
        self.services
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn insert(&self, name: String, svc: Arc<L7Service>) {
        self.services
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name, svc);
    }

    fn remove(&self, name: &str) -> Option<Arc<L7Service>> {
        self.services
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)
    }
}

/// A service's settings apart from its backends: a change restarts the listener.
fn settings(cfg: &ServiceConfig) -> ServiceConfig {
    ServiceConfig {
        backends: Vec::new(),
        ..cfg.clone()
    }
}

/// See the [module docs](self).
#[derive(Debug)]
pub struct L7Manager {
    state_dir: PathBuf,
    stats: HttpStats,
    vips: LocalVips,
    registry: L7Registry,
    /// Settings each running service was started with.
    running: BTreeMap<String, ServiceConfig>,
    /// Services that failed to start, with the settings that failed (retried when
    /// anything changes).
    failed: BTreeMap<String, ServiceConfig>,
}

impl L7Manager {
    #[must_use]
    pub fn new(state_dir: PathBuf, stats: HttpStats, registry: L7Registry) -> Self {
        Self {
            state_dir,
            stats,
            vips: LocalVips::default(),
            registry,
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
        }
    }

    /// Make the running services match `desired`.
    pub async fn sync(&mut self, desired: &[L7Desired]) {
        let wanted: BTreeMap<&str, &L7Desired> = desired
            .iter()
            .map(|d| (d.config.name.as_str(), d))
            .collect();
        // Stop what is gone or changed.
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, started)| {
                wanted
                    .get(name.as_str())
                    .is_none_or(|d| settings(&d.config) != **started)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.running.remove(&name);
            if let Some(svc) = self.registry.remove(&name) {
                tracing::info!(service = %name, "stopping the L7 service (removed or changed)");
                stop(svc).await;
            }
        }
        self.failed.retain(|name, cfg| {
            wanted
                .get(name.as_str())
                .is_some_and(|d| settings(&d.config) == *cfg)
        });
        // Start what is missing.
        for d in desired {
            let name = &d.config.name;
            if self.running.contains_key(name) {
                continue;
            }
            if let Err(e) = self.vips.ensure(d.config.vip.ip()).await {
                tracing::error!(service = %name, error = %e, "the L7 service is not served");
                self.failed.insert(name.clone(), settings(&d.config));
                continue;
            }
            match L7Service::start(&d.config, &self.state_dir, self.stats.clone()).await {
                Ok(svc) => {
                    self.failed.remove(name);
                    self.running.insert(name.clone(), settings(&d.config));
                    self.registry.insert(name.clone(), Arc::new(svc));
                }
                Err(e) => {
                    if self
                        .failed
                        .insert(name.clone(), settings(&d.config))
                        .is_none()
                    {
                        tracing::error!(service = %name, error = %e, "the L7 service is not served");
                    }
                }
            }
        }
        // Backends of every running service.
        for d in desired {
            if let Some(svc) = self.registry.get(&d.config.name) {
                svc.update_backends(&d.serving);
            }
        }
        let keep: BTreeSet<IpAddr> = desired.iter().map(|d| d.config.vip.ip()).collect();
        self.vips.retain(&keep).await;
    }

    /// Whether some service failed to start (the caller may retry later).
    #[must_use]
    pub fn has_failures(&self) -> bool {
        !self.failed.is_empty()
    }

    /// Stop every service (finishing in-flight requests) and remove the VIPs added to lo.
    pub async fn shutdown(mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            if let Some(svc) = self.registry.remove(&name) {
                stop(svc).await;
            }
        }
        self.running.clear();
        self.vips.clear().await;
    }
}

/// Shut a service down once nobody else (an API call in progress) holds it.
async fn stop(svc: Arc<L7Service>) {
    let mut svc = svc;
    for _ in 0..100 {
        match Arc::try_unwrap(svc) {
            Ok(owned) => {
                owned.shutdown(SHUTDOWN_GRACE).await;
                return;
            }
            Err(shared) => {
                svc = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tracing::warn!(service = %svc.name(), "still in use after 1 s; its listener closes when the last user lets go");
}
