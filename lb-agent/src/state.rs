//! The one desired-state model: what the config asks for, what operators changed
//! through the API (backend drain/disable/weight), and what the health checker knows,
//! combined into the [`DesiredState`](crate::dataplane::sync::DesiredState) the reconciler writes, and into the per-service
//! views the API and metrics show.
//!
//! Rules, per service:
//! - A backend is *eligible* for new flows when it is enabled (not drained or
//!   disabled), healthy, and its weight is above 0.
//! - The service uses its lowest tier with an eligible backend (tier 1 = another zone,
//!   serving only when tier 0 has none); only that tier's eligible backends are in the
//!   ring, at their weights.
//! - Existing flows stay on any backend that is healthy and not disabled (a draining
//!   backend, or one of a tier that just stopped serving, keeps its flows until they
//!   end); a backend that is down or disabled loses them: they are re-hashed.
//! - When no backend of any tier is eligible, the service keeps the last set it had
//!   (fail open) and says so in [`ServiceView::fail_open`]; the fast path never drops a
//!   service's traffic just because every health check failed at once (the checker may
//!   be the one that is cut off).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Mode, ServiceConfig},
    dataplane::sync::{DesiredBackend, DesiredService},
};

/// What an operator set for a backend (`PATCH .../backends/{address}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminState {
    /// Serves according to health and weight.
    #[default]
    Enabled,
    /// No new flows; existing flows continue until they end.
    Drain,
    /// Out at once: existing flows move to other backends.
    Disabled,
}

/// A backend's runtime override, keyed by service name and backend address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AdminState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// How a backend is seen by the fast path right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub address: IpAddr,
    pub port: u16,
    pub tier: u8,
    /// The configured weight, or the operator's override.
    pub weight: u32,
    pub state: AdminState,
    pub healthy: bool,
    /// Takes new flows (in the ring).
    pub serving: bool,
    /// Keeps its established flows.
    pub active: bool,
}

/// How a service is seen by the fast path right now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub name: String,
    /// The tier whose backends take new flows; None when none is eligible.
    pub active_tier: Option<u8>,
    /// No backend is eligible: the last known set keeps serving.
    pub fail_open: bool,
    pub backends: Vec<BackendView>,
}

/// The last ring membership of each service, for fail-open.
#[derive(Debug, Default)]
pub struct LastServing {
    services: BTreeMap<String, BTreeSet<(IpAddr, u16)>>,
}

/// Combine a service's config, the operators' overrides and health into what the fast
/// path should do. `healthy(address, port)` answers for this service's backends.
pub fn desired_service(
    svc: &ServiceConfig,
    overrides: &BTreeMap<IpAddr, BackendOverride>,
    healthy: &dyn Fn(IpAddr, u16) -> bool,
    last: &mut LastServing,
) -> (DesiredService, ServiceView) {
    let mut views: Vec<BackendView> = svc
        .backends
        .iter()
        .map(|b| {
            let o = overrides.get(&b.address).copied().unwrap_or_default();
            BackendView {
                address: b.address,
                port: b.port,
                tier: b.tier,
                weight: o.weight.unwrap_or(b.weight),
                state: o.state.unwrap_or_default(),
                healthy: healthy(b.address, b.port),
                serving: false,
                active: false,
            }
        })
        .collect();
    let eligible = |v: &BackendView| v.state == AdminState::Enabled && v.healthy && v.weight > 0;
    let active_tier = views.iter().filter(|v| eligible(v)).map(|v| v.tier).min();
    let mut fail_open = false;
    match active_tier {
        Some(tier) => {
            for v in &mut views {
                v.serving = v.tier == tier && eligible(v);
            }
            let set = views
                .iter()
                .filter(|v| v.serving)
                .map(|v| (v.address, v.port))
                .collect();
            last.services.insert(svc.name.clone(), set);
        }
        None => {
            // Fail open: keep serving with the last set still configured and not disabled.
            if let Some(set) = last.services.get(&svc.name) {
                for v in &mut views {
                    v.serving = set.contains(&(v.address, v.port))
                        && v.state != AdminState::Disabled
                        && v.weight > 0;
                }
                fail_open = views.iter().any(|v| v.serving);
            }
        }
    }
    for v in &mut views {
        v.active = v.serving || (v.healthy && v.state != AdminState::Disabled);
    }
    let desired = DesiredService {
        name: svc.name.clone(),
        vip: svc.vip,
        protocol: svc.protocol,
        l7: svc.mode == Mode::L7,
        source_hash: svc.scheduler == crate::config::Scheduler::SourceIp,
        backends: views
            .iter()
            .map(|v| DesiredBackend {
                address: v.address,
                port: v.port,
                weight: if v.serving { v.weight } else { 0 },
                active: v.active,
            })
            .collect(),
    };
    let view = ServiceView {
        name: svc.name.clone(),
        active_tier,
        fail_open,
        backends: views,
    };
    (desired, view)
}

/// Forget the fail-open memory of services that no longer exist.
pub fn retain_services(last: &mut LastServing, names: &BTreeSet<String>) {
    last.services.retain(|n, _| names.contains(n));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        AllDown, BackendConfig, HashOn, HealthConfig, HttpConfig, Protocol, Scheduler,
    };

    fn svc(backends: &[(&str, u8, u32)]) -> ServiceConfig {
        ServiceConfig {
            name: "web".into(),
            vip: "198.18.100.1:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            mode: Mode::L4,
            scheduler: Scheduler::Maglev,
            health: HealthConfig::default(),
            backends: backends
                .iter()
                .map(|(a, tier, weight)| BackendConfig {
                    address: a.parse().unwrap(),
                    port: 80,
                    weight: *weight,
                    tier: *tier,
                })
                .collect(),
            sticky: None,
            cache: None,
            slow_start_s: 0,
            on_all_down: AllDown::FailOpen,
            hash_on: HashOn::Client,
            tls: None,
            http: HttpConfig::default(),
        }
    }

    fn serving(d: &DesiredService) -> Vec<String> {
        d.backends
            .iter()
            .filter(|b| b.weight > 0)
            .map(|b| b.address.to_string())
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lowest_healthy_tier_serves() {
        let s = svc(&[
            ("10.0.0.1", 0, 100),
            ("10.0.0.2", 0, 100),
            ("10.0.1.1", 1, 100),
        ]);
        let mut last = LastServing::default();
        let none = BTreeMap::new();
        let (d, v) = desired_service(&s, &none, &|_, _| true, &mut last);
        assert_eq!(serving(&d), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(v.active_tier, Some(0));
        // Tier 0 all down: tier 1 takes over; tier 0 loses its flows (down).
        let (d, v) = desired_service(&s, &none, &|a, _| a == ip("10.0.1.1"), &mut last);
        assert_eq!(serving(&d), ["10.0.1.1"]);
        assert_eq!(v.active_tier, Some(1));
        assert!(!d.backends[0].active && !d.backends[1].active);
        // One tier-0 backend back: tier 0 again; tier 1 keeps its flows (healthy).
        let (d, _) = desired_service(&s, &none, &|a, _| a != ip("10.0.0.2"), &mut last);
        assert_eq!(serving(&d), ["10.0.0.1"]);
        assert!(d.backends[2].active && d.backends[2].weight == 0);
    }

    #[test]
    fn drain_keeps_flows_disabled_drops_them() {
        let s = svc(&[("10.0.0.1", 0, 100), ("10.0.0.2", 0, 100)]);
        let mut last = LastServing::default();
        let mut o = BTreeMap::new();
        o.insert(
            ip("10.0.0.1"),
            BackendOverride {
                state: Some(AdminState::Drain),
                weight: None,
            },
        );
        let (d, v) = desired_service(&s, &o, &|_, _| true, &mut last);
        assert_eq!(serving(&d), ["10.0.0.2"]);
        assert!(d.backends[0].active, "draining keeps established flows");
        assert_eq!(v.backends[0].state, AdminState::Drain);
        o.insert(
            ip("10.0.0.1"),
            BackendOverride {
                state: Some(AdminState::Disabled),
                weight: None,
            },
        );
        let (d, _) = desired_service(&s, &o, &|_, _| true, &mut last);
        assert!(!d.backends[0].active, "disabled drops established flows");
        // Weight 0 drains too.
        o.insert(
            ip("10.0.0.1"),
            BackendOverride {
                state: None,
                weight: Some(0),
            },
        );
        let (d, _) = desired_service(&s, &o, &|_, _| true, &mut last);
        assert_eq!(serving(&d), ["10.0.0.2"]);
        assert!(d.backends[0].active);
    }

    #[test]
    fn all_down_fails_open_with_the_last_set() {
        let s = svc(&[("10.0.0.1", 0, 100), ("10.0.0.2", 0, 100)]);
        let mut last = LastServing::default();
        let none = BTreeMap::new();
        desired_service(&s, &none, &|a, _| a == ip("10.0.0.2"), &mut last);
        let (d, v) = desired_service(&s, &none, &|_, _| false, &mut last);
        assert!(v.fail_open);
        assert_eq!(v.active_tier, None);
        assert_eq!(
            serving(&d),
            ["10.0.0.2"],
            "the last serving set, not every backend"
        );
        assert!(d.backends[1].active);
        // Never served before: nothing to fall back to.
        let mut fresh = LastServing::default();
        let (d, v) = desired_service(&s, &none, &|_, _| false, &mut fresh);
        assert!(!v.fail_open);
        assert!(serving(&d).is_empty());
    }

    #[test]
    fn override_weight_applies() {
        let s = svc(&[("10.0.0.1", 0, 100)]);
        let mut o = BTreeMap::new();
        o.insert(
            ip("10.0.0.1"),
            BackendOverride {
                state: None,
                weight: Some(7),
            },
        );
        let (d, v) = desired_service(&s, &o, &|_, _| true, &mut LastServing::default());
        assert_eq!(d.backends[0].weight, 7);
        assert_eq!(v.backends[0].weight, 7);
    }
}
