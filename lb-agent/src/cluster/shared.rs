//! The shared desired state as this node last read it from etcd ([`Shared`]), what an
//! API change writes there ([`Change`], from the difference of two overlays), and the
//! local copy under `state_dir` that a node serves when it starts without etcd.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{SecurityConfig, ServiceConfig},
    control::Overlay,
    state::BackendOverride,
};

/// The value of `<prefix>/services/<name>`: the service and its backends' overrides
/// (drain/disabled/weight set through `PATCH .../backends/{address}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDoc {
    pub service: ServiceConfig,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<IpAddr, BackendOverride>,
}

/// A value with the etcd revision of its last change (`mod_revision`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versioned<T> {
    pub value: T,
    pub mod_revision: i64,
}

/// The value of `<prefix>/health/<node>`: the backends this node's own checks find
/// down, by service, and when it published this (milliseconds since the Unix epoch).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthView {
    #[serde(default)]
    pub down: BTreeMap<String, BTreeSet<SocketAddr>>,
    #[serde(default)]
    pub published_ms: u64,
}

impl HealthView {
    pub fn is_down(&self, service: &str, backend: SocketAddr) -> bool {
        self.down.get(service).is_some_and(|s| s.contains(&backend))
    }
}

/// Everything of the cluster this node knows, at `revision`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Shared {
    /// The etcd revision this state was read at (0: never read from etcd).
    pub revision: i64,
    pub services: BTreeMap<String, Versioned<ServiceDoc>>,
    #[serde(default)]
    pub security: Option<Versioned<SecurityConfig>>,
    /// The health views of the live members (nodes whose lease holds their key), this
    /// node's own included once it has published.
    #[serde(default)]
    pub health: BTreeMap<String, HealthView>,
}

impl Shared {
    /// The state as the control plane's overlay: every service is "created through the
    /// API" (in name order), with its overrides; `[security]` when etcd has one.
    pub fn to_overlay(&self) -> Overlay {
        Overlay {
            version: crate::control::STATE_VERSION,
            services: self
                .services
                .iter()
                .map(|(n, d)| (n.clone(), d.value.service.clone()))
                .collect(),
            deleted: BTreeSet::new(),
            backends: self
                .services
                .iter()
                .filter(|(_, d)| !d.value.overrides.is_empty())
                .map(|(n, d)| (n.clone(), d.value.overrides.clone()))
                .collect(),
            security: self.security.as_ref().map(|s| s.value.clone()),
        }
    }

    /// The revision a write of `change` compares against: the key's last change as this
    /// node knows it, 0 when it knows no such key (the write then requires that etcd
    /// has none either).
    pub fn known_revision(&self, change: &Change) -> i64 {
        match change {
            Change::PutService(doc) => self
                .services
                .get(&doc.service.name)
                .map_or(0, |d| d.mod_revision),
            Change::DeleteService(name) => self.services.get(name).map_or(0, |d| d.mod_revision),
            Change::PutSecurity(_) => self.security.as_ref().map_or(0, |s| s.mod_revision),
        }
    }

    /// Apply changes that etcd accepted at `revision`.
    pub fn accept(&mut self, changes: &[Change], revision: i64) {
        for c in changes {
            match c {
                Change::PutService(doc) => {
                    self.services.insert(
                        doc.service.name.clone(),
                        Versioned {
                            value: (**doc).clone(),
                            mod_revision: revision,
                        },
                    );
                }
                Change::DeleteService(name) => {
                    self.services.remove(name);
                }
                Change::PutSecurity(sec) => {
                    self.security = Some(Versioned {
                        value: sec.clone(),
                        mod_revision: revision,
                    });
                }
            }
        }
        self.revision = self.revision.max(revision);
    }
}

/// One key written by an API change.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// Boxed: a service is large beside the other variants.
    PutService(Box<ServiceDoc>),
    DeleteService(String),
    PutSecurity(SecurityConfig),
}

/// What turns overlay `old` into `new`, one change per service whose config or
/// overrides differ, in name order; `[security]` last.
pub fn diff(old: &Overlay, new: &Overlay) -> Vec<Change> {
    let names: BTreeSet<&String> = old.services.keys().chain(new.services.keys()).collect();
    let mut out = Vec::new();
    let empty = BTreeMap::new();
    for name in names {
        let overrides = |o: &Overlay| o.backends.get(name).cloned().unwrap_or_default();
        match (old.services.get(name), new.services.get(name)) {
            (Some(_), None) => out.push(Change::DeleteService(name.clone())),
            (a, Some(b))
                if a != Some(b)
                    || old.backends.get(name).unwrap_or(&empty)
                        != new.backends.get(name).unwrap_or(&empty) =>
            {
                out.push(Change::PutService(Box::new(ServiceDoc {
                    service: b.clone(),
                    overrides: overrides(new),
                })));
            }
            _ => {}
        }
    }
    if old.security != new.security
        && let Some(sec) = &new.security
    {
        out.push(Change::PutSecurity(sec.clone()));
    }
    out
}

/// Name of the local copy of the shared state under `state_dir`.
pub const LOCAL_COPY: &str = "cluster.json";

/// The local copy's path.
pub fn local_copy(state_dir: &Path) -> PathBuf {
    state_dir.join(LOCAL_COPY)
}

/// Read the local copy; None when there is none. A copy that cannot be read is an
/// error (named), not silently replaced.
pub fn load_local(state_dir: &Path) -> Result<Option<Shared>, String> {
    let path = local_copy(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            format!(
                "{}: corrupt ({e}); remove it (the node reads etcd again)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Write the local copy atomically (temporary file in `state_dir`, fsync, rename).
pub fn save_local(state_dir: &Path, shared: &Shared) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(state_dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(state_dir)?;
    tmp.write_all(&serde_json::to_vec_pretty(shared).expect("the shared state serialises"))?;
    tmp.as_file().sync_all()?;
    tmp.persist(local_copy(state_dir)).map_err(|e| e.error)?;
    std::fs::File::open(state_dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::AdminState;

    fn svc(name: &str, backends: &[&str]) -> ServiceConfig {
        let text = format!(
            "[[service]]\nname = \"{name}\"\nvip = \"198.18.100.1:80\"\nbackend = [{}]\n",
            backends
                .iter()
                .map(|b| format!("{{ address = \"{b}\" }}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let c: crate::config::Config = toml::from_str(&text).unwrap();
        c.services.into_iter().next().unwrap()
    }

    fn overlay(services: &[ServiceConfig]) -> Overlay {
        Overlay {
            version: crate::control::STATE_VERSION,
            services: services
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn diff_writes_one_key_per_changed_service() {
        let web = svc("web", &["198.18.1.11"]);
        let api = svc("api", &["198.18.1.12"]);
        let old = overlay(&[web.clone(), api.clone()]);
        // Nothing changed: nothing written.
        assert!(diff(&old, &old).is_empty());
        // A backend added to web: web only.
        let web2 = svc("web", &["198.18.1.11", "198.18.1.13"]);
        let new = overlay(&[web2.clone(), api.clone()]);
        assert_eq!(
            diff(&old, &new),
            [Change::PutService(Box::new(ServiceDoc {
                service: web2,
                overrides: BTreeMap::new()
            }))]
        );
        // An override (PATCH) rewrites the service's key with it.
        let mut new = old.clone();
        let o = BackendOverride {
            state: Some(AdminState::Drain),
            weight: None,
        };
        new.backends.insert(
            "api".into(),
            BTreeMap::from([("198.18.1.12".parse().unwrap(), o)]),
        );
        let d = diff(&old, &new);
        assert!(
            matches!(&d[..], [Change::PutService(doc)] if doc.service.name == "api" && doc.overrides.len() == 1)
        );
        // A deletion, and the filters.
        let mut new = overlay(&[api]);
        new.security = Some(SecurityConfig::default());
        assert_eq!(
            diff(&old, &new),
            [
                Change::DeleteService("web".into()),
                Change::PutSecurity(SecurityConfig::default())
            ]
        );
    }

    #[test]
    fn revisions_compared_are_the_known_ones_and_accepting_moves_them() {
        let web = svc("web", &["198.18.1.11"]);
        let mut shared = Shared::default();
        let put = Change::PutService(Box::new(ServiceDoc {
            service: web.clone(),
            overrides: BTreeMap::new(),
        }));
        // Unknown key: compared with 0 (create only if absent).
        assert_eq!(shared.known_revision(&put), 0);
        shared.accept(std::slice::from_ref(&put), 42);
        assert_eq!(shared.known_revision(&put), 42);
        assert_eq!(shared.revision, 42);
        assert_eq!(shared.to_overlay().services["web"], web);
        shared.accept(&[Change::DeleteService("web".into())], 43);
        assert!(shared.services.is_empty());
        assert_eq!(shared.known_revision(&put), 0);
    }

    #[test]
    fn the_local_copy_round_trips_and_a_corrupt_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_local(dir.path()).unwrap(), None);
        let mut shared = Shared::default();
        shared.accept(
            &[Change::PutService(Box::new(ServiceDoc {
                service: svc("web", &["198.18.1.11"]),
                overrides: BTreeMap::new(),
            }))],
            7,
        );
        save_local(dir.path(), &shared).unwrap();
        assert_eq!(load_local(dir.path()).unwrap(), Some(shared));
        std::fs::write(local_copy(dir.path()), "{").unwrap();
        let e = load_local(dir.path()).unwrap_err();
        assert!(e.contains("cluster.json: corrupt"), "{e}");
    }
}
