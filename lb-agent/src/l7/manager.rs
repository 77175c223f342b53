//! Runs the L7 services the control plane asks for: starts a [`L7Service`] per l7
//! service (after making its VIP local), feeds it the serving backends whenever health,
//! drain, weights or slow start change, and stops it when the service goes. The API
//! reaches running services (cache purge, stats) through an [`L7Registry`].
//!
//! No change refuses a connection or fails a request in flight:
//! - new settings, same VIP: a successor with the new settings serves the same
//!   listening socket at once (new connections get the new settings), the old service
//!   drains in the background (see [`super::server`]); the cache is kept when its
//!   settings did not change;
//! - a new VIP: the new listener is bound before the old one drains and closes;
//! - at a hand-off to a new agent ([`crate::handoff`]), the listening sockets go to the
//!   new agent ([`L7Manager::listeners`]), which serves them ([`L7Manager::inherit`])
//!   before this one stops accepting and drains ([`L7Manager::release`]); the VIPs
//!   this agent added to `lo` become the new agent's.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
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

    /// Insert or replace; returns the service replaced.
    fn insert(&self, name: String, svc: Arc<L7Service>) -> Option<Arc<L7Service>> {
        self.services
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name, svc)
    }

    fn remove(&self, name: &str) -> Option<Arc<L7Service>> {
        self.services
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)
    }
}

/// A service's settings apart from its backends: a change starts a successor.
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
    /// Listening sockets inherited from the previous agent, by VIP, until a service
    /// takes them.
    inherited: BTreeMap<SocketAddr, std::net::TcpListener>,
    /// Services replaced or removed, draining.
    draining: tokio_util::task::TaskTracker,
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
            inherited: BTreeMap::new(),
            draining: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Serve these listening sockets (from the previous agent) for the services with
    /// their VIPs, and own the VIPs it had added to `lo`. Call before the first
    /// [`L7Manager::sync`]; sockets no service takes there are closed.
    pub fn inherit(
        &mut self,
        listeners: BTreeMap<SocketAddr, std::net::TcpListener>,
        vips_added: impl IntoIterator<Item = IpAddr>,
    ) {
        self.inherited = listeners;
        self.vips.adopt(vips_added);
    }

    /// A duplicate of every running service's listening socket, by VIP (for the next
    /// agent), and the VIPs this agent added to `lo`.
    pub fn listeners(&self) -> (Vec<(SocketAddr, OwnedFd)>, Vec<IpAddr>) {
        let mut fds = Vec::new();
        for name in self.running.keys() {
            let Some(svc) = self.registry.get(name) else {
                continue;
            };
            match svc.listener_fd() {
                Ok(fd) => fds.push((svc.local_addr(), fd)),
                Err(e) => {
                    tracing::error!(service = %name, error = %e, "cannot duplicate the listening socket for the next agent");
                }
            }
        }
        (fds, self.vips.added().iter().copied().collect())
    }

    /// After a hand-off: stop accepting, drain every service, and leave the VIPs on
    /// `lo` (the next agent owns them now).
    pub async fn release(mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            if let Some(svc) = self.registry.remove(&name) {
                self.draining.spawn(stop(svc));
            }
        }
        self.draining.close();
        self.draining.wait().await;
        let _ = self.vips.forget();
    }

    /// Make the running services match `desired`.
    pub async fn sync(&mut self, desired: &[L7Desired]) {
        let wanted: BTreeMap<&str, &L7Desired> = desired
            .iter()
            .map(|d| (d.config.name.as_str(), d))
            .collect();
        // Stop what is gone (it drains in the background).
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|name| !wanted.contains_key(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.running.remove(&name);
            if let Some(svc) = self.registry.remove(&name) {
                tracing::info!(service = %name, "stopping the L7 service (removed); its connections drain");
                self.draining.spawn(stop(svc));
            }
        }
        self.failed.retain(|name, cfg| {
            wanted
                .get(name.as_str())
                .is_some_and(|d| settings(&d.config) == *cfg)
        });
        // New settings: a successor takes over the listener (or a new one, for a new VIP).
        for d in desired {
            let name = &d.config.name;
            let Some(started) = self.running.get(name) else {
                continue;
            };
            if settings(&d.config) == *started {
                continue;
            }
            let Some(old) = self.registry.get(name) else {
                continue;
            };
            let next = if old.local_addr() == d.config.vip {
                old.successor(&d.config, &self.state_dir, self.stats.clone(), &d.serving)
            } else {
                match self.vips.ensure(d.config.vip.ip()).await {
                    Ok(()) => {
                        L7Service::start_on(
                            &d.config,
                            &self.state_dir,
                            self.stats.clone(),
                            None,
                            &d.serving,
                        )
                        .await
                    }
                    Err(e) => {
                        self.failed_once(
                            &d.config,
                            "new VIP not served; the old settings stay",
                            &e,
                        );
                        continue;
                    }
                }
            };
            match next {
                Ok(svc) => {
                    tracing::info!(service = %name, addr = %svc.local_addr(), "new settings: serving them, the previous connections drain");
                    self.failed.remove(name);
                    self.running.insert(name.clone(), settings(&d.config));
                    drop(old);
                    if let Some(old) = self.registry.insert(name.clone(), Arc::new(svc)) {
                        self.draining.spawn(stop(old));
                    }
                }
                Err(e) => {
                    self.failed_once(
                        &d.config,
                        "new settings not applied; the old settings stay",
                        &e,
                    );
                }
            }
        }
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
            let inherited = self.inherited.remove(&d.config.vip);
            let from_previous = inherited.is_some();
            match L7Service::start_on(
                &d.config,
                &self.state_dir,
                self.stats.clone(),
                inherited,
                &d.serving,
            )
            .await
            {
                Ok(svc) => {
                    if from_previous {
                        tracing::info!(service = %name, addr = %svc.local_addr(), "serving the listening socket of the previous agent");
                    }
                    self.failed.remove(name);
                    self.running.insert(name.clone(), settings(&d.config));
                    let _ = self.registry.insert(name.clone(), Arc::new(svc));
                }
                Err(e) => self.failed_once(&d.config, "the L7 service is not served", &e),
            }
        }
        // Inherited sockets no service wants any more close here.
        self.inherited.clear();
        // Backends of every running service.
        for d in desired {
            if let Some(svc) = self.registry.get(&d.config.name) {
                svc.update_backends(&d.serving);
            }
        }
        let keep: BTreeSet<IpAddr> = desired.iter().map(|d| d.config.vip.ip()).collect();
        self.vips.retain(&keep).await;
    }

    /// Note that `cfg` failed (retried later), logging `what` the first time.
    fn failed_once(&mut self, cfg: &ServiceConfig, what: &str, e: &dyn std::fmt::Display) {
        if self
            .failed
            .insert(cfg.name.clone(), settings(cfg))
            .is_none()
        {
            tracing::error!(service = %cfg.name, error = %e, "{what}");
        }
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
        self.draining.close();
        self.draining.wait().await;
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
