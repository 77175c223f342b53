//! The control plane's single owner of desired state.
//!
//! Inputs: the config file (the base), the operators' changes made through the API (an
//! overlay persisted under `state_dir`), and the health checker. Every change, from
//! whichever input, goes through [`Control::recompute`], which derives the desired
//! state with [`crate::state`] and hands it to the one reconciler, which writes only
//! the differences into the maps.
//!
//! The overlay holds services created or replaced through the API, services deleted
//! through it, and per-backend overrides (drain/disabled/weight). It is applied on top
//! of the config file at start and at every reload, and written atomically (write to a
//! temporary file, fsync, rename, fsync the directory) before a change is acknowledged.
//! A state file that cannot be read is reported and the agent refuses to start rather
//! than silently replacing it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    cluster::{
        Cluster, HealthView, Shared, StoreError,
        majority::Members,
        shared::{self, Versioned},
    },
    config::{
        BackendConfig, Config, ConfigError, MAX_WEIGHT, Mode, SecurityConfig, ServiceConfig,
        check_api_tls, validate_security, validate_service,
    },
    dataplane::{
        desired::{DesiredState, Sink},
        loader::Capacities,
        retry::{SyncStatus, WriteRetry},
        stats::Snapshot,
    },
    health::{HealthChecker, Status, Target, TargetKey},
    state::{BackendOverride, Memory, ServiceView, desired_service, retain_services},
};

/// Name of the persisted overlay under `state_dir`.
pub const STATE_FILE: &str = "state.json";
pub const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("invalid: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<ConfigError>),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("{0:#}")]
    Apply(anyhow::Error),
    /// With `[cluster]`: etcd did not answer; nothing changed (503).
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for ControlError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => ControlError::Conflict(m),
            e @ StoreError::Unreachable(_) => {
                ControlError::Unavailable(format!("{e}; nothing changed"))
            }
            e @ StoreError::Unknown(_) => ControlError::Unavailable(e.to_string()),
        }
    }
}

/// What the API changed, persisted as `state.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overlay {
    pub version: u32,
    /// Services created or replaced through the API, by name.
    #[serde(default)]
    pub services: BTreeMap<String, ServiceConfig>,
    /// Config-file services deleted through the API.
    #[serde(default)]
    pub deleted: BTreeSet<String>,
    /// Backend overrides: service -> backend address -> override.
    #[serde(default)]
    pub backends: BTreeMap<String, BTreeMap<IpAddr, BackendOverride>>,
    /// `[security]` as last replaced through `PUT /api/v1/filters`: it stands in for
    /// the config file's table (a reload of the file does not change it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<SecurityConfig>,
}

impl Overlay {
    /// Read the overlay; a missing file is an empty overlay, anything unreadable an error.
    pub fn load(state_dir: &Path) -> Result<Self, ControlError> {
        let path = state_dir.join(STATE_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Overlay {
                    version: STATE_VERSION,
                    ..Default::default()
                });
            }
            Err(e) => {
                return Err(ControlError::State {
                    path,
                    message: e.to_string(),
                });
            }
        };
        let overlay: Overlay = serde_json::from_str(&text).map_err(|e| ControlError::State {
            path: path.clone(),
            message: format!("corrupt ({e}); fix or remove it, it was not replaced"),
        })?;
        if overlay.version != STATE_VERSION {
            return Err(ControlError::State {
                path,
                message: format!("version {} is not {STATE_VERSION}", overlay.version),
            });
        }
        Ok(overlay)
    }

    /// Write atomically: temporary file, fsync, rename over the old one, fsync the dir.
    pub fn save(&self, state_dir: &Path) -> Result<(), ControlError> {
        let path = state_dir.join(STATE_FILE);
        let err = |e: std::io::Error| ControlError::State {
            path: path.clone(),
            message: format!("cannot persist: {e}"),
        };
        fs::create_dir_all(state_dir).map_err(err)?;
        let tmp = state_dir.join(format!(".{STATE_FILE}.tmp"));
        let mut f = fs::File::create(&tmp).map_err(err)?;
        let text = serde_json::to_vec_pretty(self).expect("overlay serialises");
        f.write_all(&text).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        fs::rename(&tmp, &path).map_err(err)?;
        fs::File::open(state_dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(())
    }

    /// The config file's `[security]` table, or the one the API set in its place.
    pub fn security<'a>(&'a self, base: &'a Config) -> &'a SecurityConfig {
        self.security.as_ref().unwrap_or(&base.security)
    }

    /// Run what was read from the state file through the API's rules, against the
    /// config file `base`. An entry that breaks a rule (a service the API would refuse,
    /// a `tls` outside `agent.tls_dir`, a weight above [`MAX_WEIGHT`]) refuses the whole
    /// file: the error names each such entry and the file is left as it is. An entry
    /// that refers to nothing (an override of a service or backend that does not exist,
    /// a deletion of a service that is not in the config file) is dropped with a WARN
    /// naming it; the file keeps it until the next API change rewrites the file.
    pub fn checked(mut self, base: &Config, path: &Path) -> Result<Self, ControlError> {
        let mut errors: Vec<ConfigError> = Vec::new();
        let mut prefixed = |entry: &str, found: Vec<ConfigError>| {
            errors.extend(found.into_iter().map(|mut e| {
                e.key = if e.key.is_empty() {
                    entry.to_owned()
                } else {
                    format!("{entry}.{}", e.key)
                };
                e
            }));
        };
        let warn = |entry: &str, why: &str| {
            tracing::warn!(
                state_file = %path.display(),
                entry,
                "{why}: the entry is ignored (the file keeps it until the next change through the API)"
            );
        };
        if let Some(sec) = &self.security {
            prefixed("security", validate_security(sec, &base.dataplane));
        }
        let combined = self.apply(&base.services);
        for (name, svc) in &self.services {
            let entry = format!("services[{name:?}]");
            if &svc.name != name {
                prefixed(
                    &entry,
                    vec![ConfigError::at_key(
                        "name",
                        format!(
                            "the entry \"{name}\" holds a service named \"{}\"",
                            svc.name
                        ),
                    )],
                );
                continue;
            }
            let others: Vec<ServiceConfig> = combined
                .iter()
                .filter(|s| &s.name != name)
                .cloned()
                .collect();
            let kept = base
                .services
                .iter()
                .find(|s| &s.name == name)
                .and_then(|s| s.tls.as_ref());
            let mut found = validate_service(svc, &others, &base.agent, &base.dataplane);
            found.extend(check_api_tls(svc, &base.agent, kept));
            let kept_backend = base
                .services
                .iter()
                .find(|s| &s.name == name)
                .and_then(|s| s.backend_tls.as_ref());
            found.extend(crate::config::check_api_backend_tls(
                svc,
                &base.agent,
                kept_backend,
            ));
            prefixed(&entry, found);
        }
        self.deleted.retain(|name| {
            let known = base.services.iter().any(|s| &s.name == name);
            if !known {
                warn(
                    &format!("deleted[{name:?}]"),
                    "deletes a service that is not in the config file",
                );
            }
            known
        });
        self.backends.retain(|name, overrides| {
            let Some(svc) = combined.iter().find(|s| &s.name == name) else {
                warn(
                    &format!("backends.{name}"),
                    "overrides backends of a service that does not exist",
                );
                return false;
            };
            overrides.retain(|address, o| {
                let entry = format!("backends[{name:?}][\"{address}\"]");
                if !svc.backends.iter().any(|b| b.address == *address) {
                    warn(&entry, "overrides a backend that the service does not have");
                    return false;
                }
                prefixed(&entry, check_override(o, ""));
                true
            });
            !overrides.is_empty()
        });
        if errors.is_empty() {
            Ok(self)
        } else {
            Err(ControlError::State {
                path: path.to_owned(),
                message: format!(
                    "refused, the file is left as it is; fix or remove these entries: {}",
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            })
        }
    }

    /// The config's services with this overlay applied, in config order then new ones.
    pub fn apply(&self, base: &[ServiceConfig]) -> Vec<ServiceConfig> {
        let mut out: Vec<ServiceConfig> = base
            .iter()
            .filter(|s| !self.deleted.contains(&s.name))
            .map(|s| self.services.get(&s.name).unwrap_or(s).clone())
            .collect();
        for (name, s) in &self.services {
            if !base.iter().any(|b| &b.name == name) {
                out.push(s.clone());
            }
        }
        out
    }
}

/// What a reload changed, and which edits of the file it did not apply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Services served now that were not before.
    pub added: Vec<String>,
    /// Services no longer served.
    pub removed: Vec<String>,
    /// Services served before and now, with another configuration.
    pub changed: Vec<String>,
    /// Edits of the file that the API's changes shadow.
    pub shadowed: Vec<ShadowedEdit>,
}

/// An edit of a service in the config file that does not take effect because the
/// service was replaced, created or deleted through the API (the API's version wins).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShadowedEdit {
    /// The service.
    pub service: String,
    /// What the file did to it: `"added"`, `"changed"` or `"removed"`.
    pub file: String,
    /// What is in force instead: `"api-copy"` (the service as the API last set it) or
    /// `"api-deleted"` (it stays deleted).
    pub kept: String,
}

impl ReloadReport {
    /// Compare the services served before and after, and the file's before and after.
    fn between(
        served: &[ServiceConfig],
        now: &[ServiceConfig],
        file_before: &[ServiceConfig],
        file_now: &[ServiceConfig],
        overlay: &Overlay,
    ) -> Self {
        let find = |list: &'_ [ServiceConfig], name: &str| -> Option<ServiceConfig> {
            list.iter().find(|s| s.name == name).cloned()
        };
        let mut report = ReloadReport::default();
        for svc in now {
            match find(served, &svc.name) {
                None => report.added.push(svc.name.clone()),
                Some(old) if &old != svc => report.changed.push(svc.name.clone()),
                Some(_) => {}
            }
        }
        report.removed = served
            .iter()
            .filter(|s| find(now, &s.name).is_none())
            .map(|s| s.name.clone())
            .collect();
        let names: BTreeSet<&str> = file_before
            .iter()
            .chain(file_now)
            .map(|s| s.name.as_str())
            .collect();
        for name in names {
            let file = match (find(file_before, name), find(file_now, name)) {
                (None, Some(_)) => "added",
                (Some(_), None) => "removed",
                (Some(a), Some(b)) if a != b => "changed",
                _ => continue,
            };
            let kept = if overlay.services.contains_key(name) {
                "api-copy"
            } else if overlay.deleted.contains(name) {
                "api-deleted"
            } else {
                continue;
            };
            report.shadowed.push(ShadowedEdit {
                service: name.to_owned(),
                file: file.to_owned(),
                kept: kept.to_owned(),
            });
        }
        report
    }

    /// One log line per added, removed or changed service and per shadowed edit.
    fn log(&self, services: usize) {
        tracing::info!(
            services,
            added = self.added.len(),
            removed = self.removed.len(),
            changed = self.changed.len(),
            shadowed = self.shadowed.len(),
            "config reloaded"
        );
        for name in &self.added {
            tracing::info!(service = %name, "reload adds the service");
        }
        for name in &self.removed {
            tracing::warn!(service = %name, "reload removes the service");
        }
        for name in &self.changed {
            tracing::info!(service = %name, "reload changes the service");
        }
        for s in &self.shadowed {
            tracing::warn!(
                service = %s.service,
                file = %s.file,
                kept = %s.kept,
                "the file's edit of the service is shadowed by a change made through the API and does not take effect \
                 (the API's version stays; PUT or DELETE the service through the API to change it)"
            );
        }
    }
}

/// The rules of a backend override, for `PATCH .../backends/{address}` and the state
/// file alike; `whole` names the override itself (the request's body, the file's entry).
fn check_override(o: &BackendOverride, whole: &str) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if o.state.is_none() && o.weight.is_none() {
        errors.push(ConfigError::at_key(
            whole,
            "give \"weight\" and/or \"state\"",
        ));
    }
    if let Some(w) = o.weight
        && w > MAX_WEIGHT
    {
        errors.push(ConfigError::at_key(
            "weight",
            format!("{w} is above the maximum {MAX_WEIGHT}"),
        ));
    }
    errors
}

/// The single owner of desired state.
pub struct Control {
    base: Config,
    overlay: Overlay,
    /// base + overlay: what is being served.
    config: Config,
    state_dir: PathBuf,
    health: HealthChecker,
    last: Memory,
    views: Vec<ServiceView>,
    sink: Box<dyn Sink>,
    /// Whether the last desired state is in the sink, and when to retry if not.
    writes: WriteRetry,
    /// When the next retry of a failed write is due (the agent's loop sleeps on it).
    retry_at: tokio::sync::watch::Sender<Option<Instant>>,
    /// Where the L7 services' desired state is published (the L7 manager watches it).
    l7: tokio::sync::watch::Sender<Vec<L7Desired>>,
    /// Where the L4 backends' addresses are published (the next-hop keeper watches it).
    l4_backends: tokio::sync::watch::Sender<BTreeSet<IpAddr>>,
    /// With `[cluster]`: the shared state in etcd stands in for the state file.
    cluster: Option<ClusterLink>,
}

/// The control plane's side of `[cluster]`: the shared state as last applied (with
/// the revisions API writes compare), and this node's own health view.
struct ClusterLink {
    cluster: Arc<Cluster>,
    shared: Shared,
    /// This node's own checks (the store task publishes it under the node's lease).
    own_view: tokio::sync::watch::Sender<HealthView>,
}

/// `GET /api/v1/cluster`'s facts, as the control plane knows them.
#[derive(Clone, Debug)]
pub struct ClusterFacts {
    pub node: String,
    pub connected: bool,
    pub error: Option<String>,
    pub revision: i64,
    /// Live members (nodes with a health view under a live lease) and their views.
    pub members: BTreeMap<String, HealthView>,
}

/// An l7 service as the proxy should run it: its config and the backends that take
/// new requests, with their weights now (slow start included).
#[derive(Clone, Debug, PartialEq)]
pub struct L7Desired {
    pub config: ServiceConfig,
    pub serving: Vec<(std::net::SocketAddr, u32)>,
}

impl Control {
    /// Load the overlay from `base.agent.state_dir`, start health checks and write the
    /// first desired state.
    pub fn new(
        base: Config,
        health: HealthChecker,
        sink: Box<dyn Sink>,
    ) -> Result<Self, ControlError> {
        Self::new_with(base, health, sink, None)
    }

    /// [`Control::new`], with `[cluster]`: the desired state is the shared one. Until
    /// etcd answers, the node serves its local copy of it (`state_dir/cluster.json`),
    /// or, on its very first start, its config file's services (what it will seed).
    pub fn new_with(
        base: Config,
        health: HealthChecker,
        sink: Box<dyn Sink>,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Self, ControlError> {
        let state_dir = base.agent.state_dir.clone();
        let (overlay, link) = match cluster {
            None => (
                Overlay::load(&state_dir)?.checked(&base, &state_dir.join(STATE_FILE))?,
                None,
            ),
            Some(cluster) => {
                let shared = shared::load_local(&state_dir)
                    .map_err(|message| ControlError::State {
                        path: shared::local_copy(&state_dir),
                        message,
                    })?
                    .unwrap_or_else(|| Shared {
                        services: base
                            .services
                            .iter()
                            .map(|s| {
                                (
                                    s.name.clone(),
                                    Versioned {
                                        value: shared::ServiceDoc {
                                            service: s.clone(),
                                            overrides: BTreeMap::new(),
                                        },
                                        mod_revision: 0,
                                    },
                                )
                            })
                            .collect(),
                        ..Shared::default()
                    });
                (
                    shared.to_overlay(),
                    Some(ClusterLink {
                        cluster,
                        shared,
                        own_view: tokio::sync::watch::Sender::new(HealthView::default()),
                    }),
                )
            }
        };
        let mut config = base.clone();
        config.services = if link.is_some() {
            overlay.apply(&[])
        } else {
            overlay.apply(&base.services)
        };
        config.security = overlay.security(&base).clone();
        let mut c = Control {
            base,
            overlay,
            config,
            state_dir,
            health,
            last: Memory::default(),
            views: Vec::new(),
            sink,
            writes: WriteRetry::default(),
            retry_at: tokio::sync::watch::Sender::new(None),
            l7: tokio::sync::watch::Sender::new(Vec::new()),
            l4_backends: tokio::sync::watch::Sender::new(BTreeSet::new()),
            cluster: link,
        };
        let errors = c.config.validate();
        if !errors.is_empty() {
            let file = if c.cluster.is_some() {
                shared::LOCAL_COPY
            } else {
                STATE_FILE
            };
            return Err(ControlError::State {
                path: c.state_dir.join(file),
                message: format!(
                    "with the config it gives an invalid state: {}",
                    errors
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            });
        }
        c.sync_health();
        c.recompute()?;
        Ok(c)
    }

    /// The services `overlay` gives: on top of the config file's, or, with
    /// `[cluster]`, the shared ones alone (the file only seeds etcd).
    fn services_of(&self, overlay: &Overlay) -> Vec<ServiceConfig> {
        if self.cluster.is_some() {
            overlay.apply(&[])
        } else {
            overlay.apply(&self.base.services)
        }
    }

    /// This node's own health view: the backends its checks find down.
    fn own_view(&self) -> HealthView {
        let mut view = HealthView::default();
        if self.cluster.is_none() {
            return view;
        }
        for svc in &self.config.services {
            for b in &svc.backends {
                let key = TargetKey {
                    service: svc.name.clone(),
                    address: b.address,
                    port: b.port,
                };
                if self.health.is_up(&key) == Some(false) {
                    view.down
                        .entry(svc.name.clone())
                        .or_default()
                        .insert(std::net::SocketAddr::new(b.address, b.port));
                }
            }
        }
        view.published_ms = crate::cluster::now_ms();
        view
    }

    /// With `[cluster]`: this node's own health view, republished when it changes (the
    /// store task publishes it in etcd). None without `[cluster]`.
    pub fn watch_own_view(&self) -> Option<tokio::sync::watch::Receiver<HealthView>> {
        self.cluster.as_ref().map(|l| l.own_view.subscribe())
    }

    /// With `[cluster]`: the node, the store's state, the revision and the members.
    pub fn cluster_facts(&self) -> Option<ClusterFacts> {
        let link = self.cluster.as_ref()?;
        let status = link.cluster.status();
        let mut members = link.shared.health.clone();
        if !members.contains_key(&link.cluster.node) {
            // Not published yet (or etcd unreachable): this node is a member all the same.
            members.insert(link.cluster.node.clone(), link.own_view.borrow().clone());
        }
        Some(ClusterFacts {
            node: link.cluster.node.clone(),
            connected: status.connected,
            error: status.error,
            revision: link.shared.revision,
            members,
        })
    }

    /// With `[cluster]`: the shared state as the store task read it (`full`: a whole
    /// read after (re)connecting, else the watch's next state). Services and filters
    /// replace the running ones when they differ, the health views feed the majority
    /// rule, and the local copy is rewritten. A state older than one this node wrote
    /// itself (its own change is ahead of the watch) is skipped: the watch brings it.
    /// Shared services this node's config cannot serve (e.g. a `tls` path missing
    /// here) keep the running state and are logged.
    pub fn apply_shared(&mut self, shared: Shared, full: bool) {
        let Some(link) = &mut self.cluster else {
            return;
        };
        if !full && shared.revision < link.shared.revision {
            return;
        }
        let overlay = shared.to_overlay();
        let mut config = self.base.clone();
        config.services = overlay.apply(&[]);
        config.security = overlay.security(&self.base).clone();
        let errors = config.validate();
        link.shared.health = shared.health.clone();
        if errors.is_empty() {
            link.shared = shared;
            save_local_copy(&self.state_dir, &link.shared);
            if overlay != self.overlay || config != self.config {
                tracing::info!(
                    revision = link.shared.revision,
                    services = config.services.len(),
                    "shared state applied"
                );
                self.overlay = overlay;
                self.config = config;
                self.sync_health();
            }
        } else {
            tracing::error!(
                revision = shared.revision,
                errors = %errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                "the shared state in etcd is not valid on this node: keeping the running state"
            );
        }
        if let Err(e) = self.recompute() {
            tracing::error!(error = %e, "applying the shared state");
        }
    }

    /// The effective config (file + API changes).
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn views(&self) -> &[ServiceView] {
        &self.views
    }

    /// A backend is slow-starting: [`Control::recompute`] should run again soon to
    /// raise its weight.
    pub fn ramping(&self) -> bool {
        self.last.ramping()
    }

    pub fn view(&self, name: &str) -> Option<&ServiceView> {
        self.views.iter().find(|v| v.name == name)
    }

    /// The digest of `service`'s ring as written to the fast path (None without one).
    pub fn ring_digest(&self, service: &str) -> Option<String> {
        self.sink.ring_digest(service)
    }

    /// `service`'s ring read back from the fast path, slots named by backend (None
    /// without a fast path or a ring).
    pub fn ring_slots(&self, service: &str) -> Option<anyhow::Result<Vec<String>>> {
        self.sink.ring_slots(service)
    }

    /// Fast-path counters (None without a fast path).
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.sink.snapshot(&self.config.services)
    }

    pub fn health_status(&self) -> Vec<(TargetKey, Status)> {
        self.health.status()
    }

    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.config.services.iter().find(|s| s.name == name)
    }

    pub fn overrides(&self, service: &str) -> Option<&BTreeMap<IpAddr, BackendOverride>> {
        self.overlay.backends.get(service)
    }

    fn sync_health(&mut self) {
        let targets = self
            .config
            .services
            .iter()
            .flat_map(|s| {
                s.backends.iter().map(move |b| Target {
                    key: TargetKey {
                        service: s.name.clone(),
                        address: b.address,
                        port: b.port,
                    },
                    config: s.health.clone(),
                    speaks: crate::health::Speaks {
                        protocol: s.backend_protocol,
                        tls: s.backend_tls.clone(),
                    },
                })
            })
            .collect();
        self.health.set_targets(targets);
    }

    /// Derive the desired state from config, overlay and health, and write it. The
    /// views and the L7 services follow the desired state at once; when the write to
    /// the fast path fails, it is retried with backoff ([`Control::retry_writes_at`])
    /// and shown as pending ([`Control::dataplane_status`]) until a write succeeds.
    pub fn recompute(&mut self) -> Result<(), ControlError> {
        let now = std::time::Instant::now();
        let empty = BTreeMap::new();
        let mut services = Vec::with_capacity(self.config.services.len());
        let mut views = Vec::with_capacity(self.config.services.len());
        let own = self.own_view();
        let members = self.cluster.as_ref().map(|link| {
            Members::new(
                &link.shared.health,
                &link.cluster.node,
                &own,
                link.cluster.connected(),
            )
        });
        for svc in &self.config.services {
            let overrides = self.overlay.backends.get(&svc.name).unwrap_or(&empty);
            let health = &self.health;
            let locally_up = |address: IpAddr, port: u16| {
                health
                    .is_up(&TargetKey {
                        service: svc.name.clone(),
                        address,
                        port,
                    })
                    .unwrap_or(true)
            };
            let (d, mut v) = match &members {
                None => desired_service(svc, overrides, &locally_up, &mut self.last, now),
                Some(members) => {
                    // With [cluster] the rings are a pure function of the shared state
                    // and the cluster's health view: the majority decides health, fail
                    // open serves the tier that would serve with every backend healthy,
                    // and nothing ramps (slow start's clock would be this node's own).
                    let healthy = |address: IpAddr, port: u16| {
                        !members.down(&svc.name, std::net::SocketAddr::new(address, port))
                    };
                    let mut memory = Memory::stateless(&svc.name, fail_open_set(svc, overrides));
                    desired_service(svc, overrides, &healthy, &mut memory, now)
                }
            };
            if members.is_some() {
                for b in &mut v.backends {
                    b.local_down = b.healthy && !locally_up(b.address, b.port);
                }
            }
            services.push(d);
            views.push(v);
        }
        if let Some(link) = &self.cluster {
            link.own_view.send_if_modified(|cur| {
                if cur.down == own.down {
                    false
                } else {
                    *cur = own;
                    true
                }
            });
        }
        retain_services(
            &mut self.last,
            &self
                .config
                .services
                .iter()
                .map(|s| s.name.clone())
                .collect(),
        );
        let desired =
            DesiredState::new(&self.config.dataplane, services).with_filters(&self.config.security);
        self.views = views;
        self.publish_l7();
        let l4 = self.l4_backends();
        self.l4_backends.send_if_modified(|old| {
            let changed = *old != l4;
            *old = l4;
            changed
        });
        self.write(&desired)
    }

    /// Hand `desired` to the sink, recording a failure for retry or the end of one.
    fn write(&mut self, desired: &DesiredState) -> Result<(), ControlError> {
        let result = self.sink.apply(desired);
        match &result {
            Ok(()) => {
                if let Some(attempts) = self.writes.succeeded() {
                    tracing::info!(
                        failed_attempts = attempts,
                        "the fast path caught up: the desired state is written"
                    );
                }
            }
            Err(e) => {
                let now = Instant::now();
                let next = self.writes.failed(e, now);
                tracing::error!(
                    error = %format!("{e:#}"),
                    attempts = self.writes.status(now).attempts,
                    retry_in_ms = next.saturating_duration_since(now).as_millis(),
                    "writing the desired state to the fast path failed; retrying with backoff until it succeeds"
                );
            }
        }
        let next = self.writes.next_attempt();
        self.retry_at.send_if_modified(|cur| {
            let changed = *cur != next;
            *cur = next;
            changed
        });
        result.map_err(ControlError::Apply)
    }

    /// Write the desired state again if a failed write is due at `now`. None when
    /// nothing was due, else the outcome of the attempt.
    pub fn retry_writes_at(&mut self, now: Instant) -> Option<Result<(), ControlError>> {
        self.writes.due(now).then(|| self.recompute())
    }

    /// When the next retry of a failed write is due (None: the maps are in sync).
    pub fn watch_retry(&self) -> tokio::sync::watch::Receiver<Option<Instant>> {
        self.retry_at.subscribe()
    }

    /// Whether the last desired state is in the fast path (`"dataplane"` in the stats).
    pub fn dataplane_status(&self) -> SyncStatus {
        self.writes.status(Instant::now())
    }

    /// The L7 services' desired state, republished at every recompute that changes it.
    pub fn watch_l7(&self) -> tokio::sync::watch::Receiver<Vec<L7Desired>> {
        self.l7.subscribe()
    }

    /// The L4 backends' addresses ([`Control::l4_backends`]), republished at every
    /// recompute that changes them.
    pub fn watch_l4_backends(&self) -> tokio::sync::watch::Receiver<BTreeSet<IpAddr>> {
        self.l4_backends.subscribe()
    }

    fn publish_l7(&self) {
        let l7: Vec<L7Desired> = self
            .config
            .services
            .iter()
            .filter(|s| s.mode == crate::config::Mode::L7)
            .map(|s| L7Desired {
                config: s.clone(),
                serving: self
                    .view(&s.name)
                    .map(|v| {
                        v.backends
                            .iter()
                            .filter(|b| b.serving && b.effective_weight > 0)
                            .map(|b| {
                                (
                                    std::net::SocketAddr::new(b.address, b.port),
                                    b.effective_weight,
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect();
        self.l7.send_if_modified(|cur| {
            if *cur == l7 {
                false
            } else {
                *cur = l7;
                true
            }
        });
    }

    /// Accept a candidate overlay: validate the config it gives, write it, persist it.
    /// A rejected candidate changes nothing.
    ///
    /// With `[cluster]` the candidate goes to etcd first, one key per changed service,
    /// each compared with the revision this node knows (409 when another node changed
    /// it since, 503 when etcd does not answer: nothing changes either way), and is
    /// applied here once etcd took it (the watch brings it to the other nodes).
    async fn commit(&mut self, mut overlay: Overlay) -> Result<(), ControlError> {
        let mut config = self.base.clone();
        config.services = self.services_of(&overlay);
        config.security = overlay.security(&self.base).clone();
        let errors = config.validate();
        if !errors.is_empty() {
            return Err(ControlError::Invalid(errors));
        }
        if let Some(link) = &mut self.cluster {
            overlay.deleted.clear();
            if !link.cluster.connected() {
                let why = link.cluster.status().error.unwrap_or_default();
                return Err(ControlError::Unavailable(format!(
                    "the cluster store (etcd) is unreachable ({why}); nothing changed"
                )));
            }
            let changes = shared::diff(&self.overlay, &overlay);
            if !changes.is_empty() {
                let revision = link.cluster.store.commit(&changes, &link.shared).await?;
                link.shared.accept(&changes, revision);
                save_local_copy(&self.state_dir, &link.shared);
            }
        } else {
            overlay.save(&self.state_dir)?;
        }
        self.config = config;
        self.overlay = overlay;
        self.sync_health();
        // A failed write is retried (see `recompute`); the caller learns of it.
        self.recompute().map_err(|e| match e {
            ControlError::Apply(e) => ControlError::Apply(e.context(
                "the change is accepted and saved, but writing it to the fast path failed; \
                 it is retried until it succeeds (GET /api/v1/stats shows \"dataplane\")",
            )),
            e => e,
        })
    }

    fn check_service(
        &self,
        svc: &ServiceConfig,
        replacing: Option<&str>,
    ) -> Result<(), ControlError> {
        let others: Vec<ServiceConfig> = self
            .config
            .services
            .iter()
            .filter(|s| Some(s.name.as_str()) != replacing)
            .cloned()
            .collect();
        let mut errors = validate_service(svc, &others, &self.config.agent, &self.config.dataplane);
        // The files an API client names must be in agent.tls_dir, unless the service
        // keeps the ones it has.
        let kept = replacing
            .and_then(|name| self.service(name))
            .and_then(|s| s.tls.as_ref());
        errors.extend(check_api_tls(svc, &self.config.agent, kept));
        let kept_backend = replacing
            .and_then(|name| self.service(name))
            .and_then(|s| s.backend_tls.as_ref());
        errors.extend(crate::config::check_api_backend_tls(
            svc,
            &self.config.agent,
            kept_backend,
        ));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ControlError::Invalid(errors))
        }
    }

    pub async fn create_service(&mut self, svc: ServiceConfig) -> Result<(), ControlError> {
        if self.service(&svc.name).is_some() {
            return Err(ControlError::Conflict(format!(
                "service {} exists already",
                svc.name
            )));
        }
        self.check_service(&svc, None)?;
        let mut o = self.overlay.clone();
        o.deleted.remove(&svc.name);
        o.backends.remove(&svc.name);
        o.services.insert(svc.name.clone(), svc);
        self.commit(o).await
    }

    pub async fn replace_service(
        &mut self,
        name: &str,
        svc: ServiceConfig,
    ) -> Result<(), ControlError> {
        if svc.name != name {
            return Err(ControlError::Invalid(vec![ConfigError::at_key(
                "name",
                format!("the body names {} but the path names {name}", svc.name),
            )]));
        }
        if self.service(name).is_none() {
            return Err(ControlError::NotFound(format!("service {name}")));
        }
        self.check_service(&svc, Some(name))?;
        let mut o = self.overlay.clone();
        if let Some(ov) = o.backends.get_mut(name) {
            ov.retain(|a, _| svc.backends.iter().any(|b| b.address == *a));
        }
        o.services.insert(name.to_owned(), svc);
        self.commit(o).await
    }

    pub async fn delete_service(&mut self, name: &str) -> Result<(), ControlError> {
        if self.service(name).is_none() {
            return Err(ControlError::NotFound(format!("service {name}")));
        }
        let mut o = self.overlay.clone();
        o.services.remove(name);
        o.backends.remove(name);
        if self.base.services.iter().any(|s| s.name == name) {
            o.deleted.insert(name.to_owned());
        }
        self.commit(o).await
    }

    fn modified_service(&self, name: &str) -> Result<ServiceConfig, ControlError> {
        self.service(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("service {name}")))
    }

    pub async fn add_backend(
        &mut self,
        name: &str,
        backend: BackendConfig,
    ) -> Result<(), ControlError> {
        let mut svc = self.modified_service(name)?;
        if svc
            .backends
            .iter()
            .any(|b| b.address == backend.address && b.port == backend.port)
        {
            return Err(ControlError::Conflict(format!(
                "backend {}:{} exists already in {name}",
                backend.address, backend.port
            )));
        }
        svc.backends.push(backend);
        self.check_service(&svc, Some(name))?;
        let mut o = self.overlay.clone();
        o.services.insert(name.to_owned(), svc);
        self.commit(o).await
    }

    pub async fn remove_backend(
        &mut self,
        name: &str,
        address: IpAddr,
    ) -> Result<(), ControlError> {
        let mut svc = self.modified_service(name)?;
        let before = svc.backends.len();
        svc.backends.retain(|b| b.address != address);
        if svc.backends.len() == before {
            return Err(ControlError::NotFound(format!(
                "backend {address} in {name}"
            )));
        }
        let mut o = self.overlay.clone();
        if let Some(ov) = o.backends.get_mut(name) {
            ov.remove(&address);
        }
        o.services.insert(name.to_owned(), svc);
        self.commit(o).await
    }

    /// Set a backend's state and/or weight (PATCH).
    pub async fn patch_backend(
        &mut self,
        name: &str,
        address: IpAddr,
        patch: BackendOverride,
    ) -> Result<(), ControlError> {
        let svc = self.modified_service(name)?;
        if !svc.backends.iter().any(|b| b.address == address) {
            return Err(ControlError::NotFound(format!(
                "backend {address} in {name}"
            )));
        }
        let errors = check_override(&patch, "body");
        if !errors.is_empty() {
            return Err(ControlError::Invalid(errors));
        }
        let mut o = self.overlay.clone();
        let entry = o
            .backends
            .entry(name.to_owned())
            .or_default()
            .entry(address)
            .or_default();
        if patch.state.is_some() {
            entry.state = patch.state;
        }
        if patch.weight.is_some() {
            entry.weight = patch.weight;
        }
        self.commit(o).await
    }

    /// The source filters in force (`GET /api/v1/filters`).
    pub fn filters(&self) -> &SecurityConfig {
        &self.config.security
    }

    /// Replace the source filters whole (`PUT /api/v1/filters`): validated with the
    /// config's rules, persisted in the overlay, then written to the fast path.
    pub async fn replace_filters(&mut self, sec: SecurityConfig) -> Result<(), ControlError> {
        let errors = validate_security(&sec, &self.config.dataplane);
        if !errors.is_empty() {
            return Err(ControlError::Invalid(errors));
        }
        let mut o = self.overlay.clone();
        o.security = Some(sec);
        self.commit(o).await
    }

    /// Re-read the config file; an invalid one is rejected and the running state kept.
    /// `[agent]` settings and the dataplane's capacities and mode need a restart: the
    /// running values are kept (and a warning says so when the file changed them).
    ///
    /// A reload that would leave no service while some are served is refused
    /// ([`ControlError::Conflict`]) unless `allow_empty` (an emptied or truncated file
    /// is more often a mistake than an intent). Every service the reload adds, removes
    /// or changes is logged and reported; so is every edit of the file that the API's
    /// changes shadow: the API's version of a service (or its deletion through the API)
    /// stays in force over the file's, and the reload says so rather than merging.
    ///
    /// With `[cluster]` the file's services and `[security]` only seed etcd: a reload
    /// creates there the services the file has and etcd does not (`added`; every node
    /// applies them through the watch), and reports the file's services that differ
    /// from the shared ones as shadowed (`"kept": "cluster"`). Nothing is removed or
    /// replaced: change shared services through the API. 503 when etcd is unreachable.
    pub async fn reload(
        &mut self,
        path: &Path,
        allow_empty: bool,
    ) -> Result<ReloadReport, ControlError> {
        let mut base = Config::load(path).map_err(|e| ControlError::Invalid(e.0))?;
        let running = Capacities::from(&self.base.dataplane);
        let restart_only = running != Capacities::from(&base.dataplane)
            || self.base.dataplane.xdp_mode != base.dataplane.xdp_mode;
        if base.agent.interface.is_none() {
            base.agent.interface.clone_from(&self.base.agent.interface);
        }
        if restart_only || base.agent != self.base.agent {
            tracing::warn!(
                "[agent] settings and dataplane capacities/xdp_mode changed: they take effect at the next start"
            );
        }
        base.agent = self.base.agent.clone();
        running.keep_in(&mut base.dataplane);
        base.dataplane.xdp_mode = self.base.dataplane.xdp_mode;
        if let Some(link) = &self.cluster {
            if !link.cluster.connected() {
                return Err(ControlError::Unavailable(
                    "the cluster store (etcd) is unreachable: the reload would seed it; nothing changed"
                        .to_owned(),
                ));
            }
            let added = link
                .cluster
                .store
                .seed(&base.services, &base.security)
                .await?;
            let shadowed = base
                .services
                .iter()
                .filter(|s| {
                    !added.contains(&s.name)
                        && link
                            .shared
                            .services
                            .get(&s.name)
                            .is_some_and(|d| d.value.service != **s)
                })
                .map(|s| ShadowedEdit {
                    service: s.name.clone(),
                    file: "changed".to_owned(),
                    kept: "cluster".to_owned(),
                })
                .collect();
            let report = ReloadReport {
                added,
                shadowed,
                ..ReloadReport::default()
            };
            report.log(self.config.services.len());
            self.base = base;
            return Ok(report);
        }
        let mut config = base.clone();
        config.services = self.overlay.apply(&base.services);
        if self.overlay.security.is_some() && base.security != self.base.security {
            tracing::warn!(
                "[security] in the file changed, but the filters set through the API stay in force"
            );
        }
        config.security = self.overlay.security(&base).clone();
        let errors = config.validate();
        if !errors.is_empty() {
            return Err(ControlError::Invalid(errors));
        }
        if config.services.is_empty() && !self.config.services.is_empty() && !allow_empty {
            let names: Vec<&str> = self
                .config
                .services
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            return Err(ControlError::Conflict(format!(
                "{} gives no service: the reload would remove every service ({}); nothing \
                 changed. To remove them all, POST /api/v1/reload with {{\"allow_empty\": true}} \
                 (SIGHUP never does)",
                path.display(),
                names.join(", ")
            )));
        }
        let report = ReloadReport::between(
            &self.config.services,
            &config.services,
            &self.base.services,
            &base.services,
            &self.overlay,
        );
        report.log(self.config.services.len());
        self.base = base;
        self.config = config;
        self.sync_health();
        self.recompute()?;
        Ok(report)
    }

    /// L4 backend addresses, for next-hop resolution.
    pub fn l4_backends(&self) -> BTreeSet<IpAddr> {
        self.config
            .services
            .iter()
            .filter(|s| s.mode == Mode::L4)
            .flat_map(|s| s.backends.iter().map(|b| b.address))
            .collect()
    }

    pub fn shutdown(&mut self) {
        self.health.shutdown();
    }
}

/// With `[cluster]`, fail open without memory: the backends of the lowest tier that
/// would serve if every backend were healthy (enabled, weight above 0).
fn fail_open_set(
    svc: &ServiceConfig,
    overrides: &BTreeMap<IpAddr, BackendOverride>,
) -> BTreeSet<(IpAddr, u16)> {
    let usable: Vec<(u8, IpAddr, u16)> = svc
        .backends
        .iter()
        .filter(|b| {
            let o = overrides.get(&b.address).copied().unwrap_or_default();
            o.state.unwrap_or_default() == crate::state::AdminState::Enabled
                && o.weight.unwrap_or(b.weight) > 0
        })
        .map(|b| (b.tier, b.address, b.port))
        .collect();
    let tier = usable.iter().map(|u| u.0).min();
    usable
        .into_iter()
        .filter(|u| Some(u.0) == tier)
        .map(|(_, a, p)| (a, p))
        .collect()
}

/// Rewrite the local copy of the shared state; a failure is logged (etcd has the
/// change; the copy only serves a restart without etcd).
fn save_local_copy(state_dir: &Path, shared: &Shared) {
    if let Err(e) = crate::cluster::shared::save_local(state_dir, shared) {
        tracing::error!(
            path = %crate::cluster::shared::local_copy(state_dir).display(),
            error = %e,
            "cannot write the local copy of the shared state (a restart without etcd would serve an older one)"
        );
    }
}

/// How long the API waits for the control lock before answering 503.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod cluster_tests {
    use super::*;
    use crate::state::AdminState;

    #[test]
    fn fail_open_in_a_cluster_is_the_tier_that_would_serve_all_healthy() {
        let text = "[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\nbackend = [\
            { address = \"198.18.1.11\", port = 80 }, { address = \"198.18.1.12\", port = 80 }, \
            { address = \"198.18.1.13\", port = 80, weight = 0 }, { address = \"198.18.1.21\", port = 80, tier = 1 }]\n";
        let config: Config = toml::from_str(text).expect("config");
        let svc = &config.services[0];
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let none = BTreeMap::new();
        // Tier 0's enabled backends with a weight; the weight-0 one and tier 1 are not.
        assert_eq!(
            fail_open_set(svc, &none),
            BTreeSet::from([(ip("198.18.1.11"), 80), (ip("198.18.1.12"), 80)])
        );
        // Tier 0 all drained or disabled by the operators: tier 1 is what would serve.
        let overrides = BTreeMap::from([
            (
                ip("198.18.1.11"),
                BackendOverride {
                    state: Some(AdminState::Drain),
                    weight: None,
                },
            ),
            (
                ip("198.18.1.12"),
                BackendOverride {
                    state: Some(AdminState::Disabled),
                    weight: None,
                },
            ),
        ]);
        assert_eq!(
            fail_open_set(svc, &overrides),
            BTreeSet::from([(ip("198.18.1.21"), 80)])
        );
    }
}
