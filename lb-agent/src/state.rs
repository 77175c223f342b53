//! The one desired-state model: what the config asks for, what operators changed
//! through the API (backend drain/disable/weight), and what the health checker knows,
//! combined into the [`DesiredState`](crate::dataplane::desired::DesiredState) the reconciler writes, and into the per-service
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
//!   be the one that is cut off). With `on_all_down = "drop"` it serves nobody instead
//!   ([`ServiceView::all_down`] either way).
//! - Slow start (`slow_start_s`): a backend that becomes eligible (added, back up,
//!   re-enabled, weight raised from 0) enters the ring at [`SLOW_START_MIN`] of its
//!   weight and ramps linearly to the full weight over `slow_start_s`; backends already
//!   eligible when the agent first sees a service do not ramp. While any backend
//!   ramps, [`Memory::ramping`] asks the caller to recompute periodically.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{AllDown, Mode, ServiceConfig},
    dataplane::desired::{DesiredBackend, DesiredService},
};

/// What an operator set for a backend (`PATCH .../backends/{address}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
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
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendView {
    pub address: IpAddr,
    pub port: u16,
    pub tier: u8,
    /// The configured weight, or the operator's override.
    pub weight: u32,
    /// The weight in the ring now: lower than `weight` while slow start ramps it.
    pub effective_weight: u32,
    /// Slow start progress (0 to 1) while ramping; None otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slow_start: Option<f64>,
    pub state: AdminState,
    pub healthy: bool,
    /// Takes new flows (in the ring).
    pub serving: bool,
    /// Keeps its established flows.
    pub active: bool,
    /// With `[cluster]`: this node's own checks find it down while the cluster's
    /// majority does not, so it stays in the rings (false without `[cluster]`).
    pub local_down: bool,
    /// The backend's QUIC server id (`quic_id`), if configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quic_id: Option<u32>,
}

/// How a service is seen by the fast path right now.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceView {
    pub name: String,
    /// The tier whose backends take new flows; None when none is eligible.
    pub active_tier: Option<u8>,
    /// No backend is eligible: the last known set keeps serving.
    pub fail_open: bool,
    /// No backend of any tier is eligible (fail open, or dropping with
    /// `on_all_down = "drop"`).
    pub all_down: bool,
    pub backends: Vec<BackendView>,
}

/// Fraction of its weight a slow-starting backend enters the ring with.
pub const SLOW_START_MIN: f64 = 0.1;

/// What the model remembers between two computations, per service: the last ring
/// membership (for fail open) and since when each backend is eligible (slow start).
#[derive(Debug, Default)]
pub struct Memory {
    services: BTreeMap<String, BTreeSet<(IpAddr, u16)>>,
    /// Eligible backends: since when, or None when eligible since the service was first
    /// seen (no ramp).
    eligible: BTreeMap<String, BTreeMap<(IpAddr, u16), Option<Instant>>>,
    /// Whether the last computation left a backend ramping.
    ramping: BTreeSet<String>,
}

impl Memory {
    /// A memory that knows `service` was last served by `set` and that its eligible
    /// backends have been eligible since it was first seen (no slow start): with
    /// `[cluster]`, the control plane derives fail open from the shared state alone
    /// rather than from this node's history.
    #[must_use]
    pub fn stateless(service: &str, set: BTreeSet<(IpAddr, u16)>) -> Self {
        Memory {
            services: BTreeMap::from([(service.to_owned(), set)]),
            ..Memory::default()
        }
    }

    /// Some backend is still slow-starting: recompute again soon.
    #[must_use]
    pub fn ramping(&self) -> bool {
        !self.ramping.is_empty()
    }

    /// Track eligibility and return each eligible backend's ramp fraction (None: full).
    fn ramp(
        &mut self,
        svc: &ServiceConfig,
        eligible: &[(IpAddr, u16)],
        now: Instant,
    ) -> BTreeMap<(IpAddr, u16), f64> {
        let first_sight = !self.eligible.contains_key(&svc.name);
        let since = self.eligible.entry(svc.name.clone()).or_default();
        since.retain(|k, _| eligible.contains(k));
        for &k in eligible {
            since
                .entry(k)
                .or_insert(if first_sight { None } else { Some(now) });
        }
        let mut out = BTreeMap::new();
        if svc.slow_start_s > 0 {
            let period = Duration::from_secs(svc.slow_start_s).as_secs_f64();
            for (&k, t) in since.iter() {
                if let Some(t) = t {
                    let done = now.saturating_duration_since(*t).as_secs_f64() / period;
                    if done < 1.0 {
                        out.insert(k, SLOW_START_MIN + (1.0 - SLOW_START_MIN) * done);
                    }
                }
            }
        }
        if out.is_empty() {
            self.ramping.remove(&svc.name);
        } else {
            self.ramping.insert(svc.name.clone());
        }
        out
    }
}

/// Combine a service's config, the operators' overrides and health into what the fast
/// path should do. `healthy(address, port)` answers for this service's backends.
pub fn desired_service(
    svc: &ServiceConfig,
    overrides: &BTreeMap<IpAddr, BackendOverride>,
    healthy: &dyn Fn(IpAddr, u16) -> bool,
    last: &mut Memory,
    now: Instant,
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
                effective_weight: 0,
                slow_start: None,
                state: o.state.unwrap_or_default(),
                healthy: healthy(b.address, b.port),
                serving: false,
                active: false,
                local_down: false,
                quic_id: b.quic_id,
            }
        })
        .collect();
    let eligible = |v: &BackendView| v.state == AdminState::Enabled && v.healthy && v.weight > 0;
    let active_tier = views.iter().filter(|v| eligible(v)).map(|v| v.tier).min();
    let eligible_now: Vec<(IpAddr, u16)> = views
        .iter()
        .filter(|v| eligible(v))
        .map(|v| (v.address, v.port))
        .collect();
    let ramps = last.ramp(svc, &eligible_now, now);
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
        None if svc.on_all_down == AllDown::Drop => {}
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
        v.slow_start = ramps.get(&(v.address, v.port)).copied();
        v.effective_weight = match (v.serving, v.slow_start) {
            (false, _) => 0,
            (true, None) => v.weight,
            // At least 1, so a ramping backend is in the ring at all.
            (true, Some(f)) => ((f64::from(v.weight) * f).round() as u32).max(1),
        };
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
                weight: v.effective_weight,
                active: v.active,
                quic_id: v.quic_id,
            })
            .collect(),
        filters: crate::dataplane::desired::DesiredFilters::of_service(svc),
        quic: svc.quic,
    };
    let view = ServiceView {
        name: svc.name.clone(),
        active_tier,
        fail_open,
        all_down: active_tier.is_none(),
        backends: views,
    };
    (desired, view)
}

/// Forget the fail-open memory of services that no longer exist.
pub fn retain_services(last: &mut Memory, names: &BTreeSet<String>) {
    last.services.retain(|n, _| names.contains(n));
    last.eligible.retain(|n, _| names.contains(n));
    last.ramping.retain(|n| names.contains(n));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{
        AllDown, BackendConfig, HashOn, HealthConfig, HttpConfig, Protocol, Scheduler,
    };

    fn svc(backends: &[(&str, u8, u32)]) -> ServiceConfig {
        ServiceConfig {
            quic: false,
            backend_protocol: crate::config::BackendProtocol::Http1,
            backend_tls: None,
            name: "web".into(),
            vip: "198.18.100.1:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            mode: Mode::L4,
            scheduler: Scheduler::Maglev,
            health: HealthConfig::default(),
            backends: backends
                .iter()
                .map(|(a, tier, weight)| BackendConfig {
                    quic_id: None,
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
            deny: Vec::new(),
            allow: Vec::new(),
            new_flows_per_source: None,
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
        let mut last = Memory::default();
        let none = BTreeMap::new();
        let (d, v) = desired_service(&s, &none, &|_, _| true, &mut last, Instant::now());
        assert_eq!(serving(&d), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(v.active_tier, Some(0));
        // Tier 0 all down: tier 1 takes over; tier 0 loses its flows (down).
        let (d, v) = desired_service(
            &s,
            &none,
            &|a, _| a == ip("10.0.1.1"),
            &mut last,
            Instant::now(),
        );
        assert_eq!(serving(&d), ["10.0.1.1"]);
        assert_eq!(v.active_tier, Some(1));
        assert!(!d.backends[0].active && !d.backends[1].active);
        // One tier-0 backend back: tier 0 again; tier 1 keeps its flows (healthy).
        let (d, _) = desired_service(
            &s,
            &none,
            &|a, _| a != ip("10.0.0.2"),
            &mut last,
            Instant::now(),
        );
        assert_eq!(serving(&d), ["10.0.0.1"]);
        assert!(d.backends[2].active && d.backends[2].weight == 0);
    }

    #[test]
    fn drain_keeps_flows_disabled_drops_them() {
        let s = svc(&[("10.0.0.1", 0, 100), ("10.0.0.2", 0, 100)]);
        let mut last = Memory::default();
        let mut o = BTreeMap::new();
        o.insert(
            ip("10.0.0.1"),
            BackendOverride {
                state: Some(AdminState::Drain),
                weight: None,
            },
        );
        let (d, v) = desired_service(&s, &o, &|_, _| true, &mut last, Instant::now());
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
        let (d, _) = desired_service(&s, &o, &|_, _| true, &mut last, Instant::now());
        assert!(!d.backends[0].active, "disabled drops established flows");
        // Weight 0 drains too.
        o.insert(
            ip("10.0.0.1"),
            BackendOverride {
                state: None,
                weight: Some(0),
            },
        );
        let (d, _) = desired_service(&s, &o, &|_, _| true, &mut last, Instant::now());
        assert_eq!(serving(&d), ["10.0.0.2"]);
        assert!(d.backends[0].active);
    }

    #[test]
    fn all_down_fails_open_with_the_last_set() {
        let s = svc(&[("10.0.0.1", 0, 100), ("10.0.0.2", 0, 100)]);
        let mut last = Memory::default();
        let none = BTreeMap::new();
        desired_service(
            &s,
            &none,
            &|a, _| a == ip("10.0.0.2"),
            &mut last,
            Instant::now(),
        );
        let (d, v) = desired_service(&s, &none, &|_, _| false, &mut last, Instant::now());
        assert!(v.fail_open);
        assert_eq!(v.active_tier, None);
        assert_eq!(
            serving(&d),
            ["10.0.0.2"],
            "the last serving set, not every backend"
        );
        assert!(d.backends[1].active);
        // Never served before: nothing to fall back to.
        let mut fresh = Memory::default();
        let (d, v) = desired_service(&s, &none, &|_, _| false, &mut fresh, Instant::now());
        assert!(!v.fail_open);
        assert!(serving(&d).is_empty());
    }

    #[test]
    fn all_down_drops_when_asked() {
        let mut s = svc(&[("10.0.0.1", 0, 100), ("10.0.0.2", 0, 100)]);
        s.on_all_down = AllDown::Drop;
        let mut last = Memory::default();
        let none = BTreeMap::new();
        let (d, v) = desired_service(&s, &none, &|_, _| true, &mut last, Instant::now());
        assert_eq!(serving(&d).len(), 2);
        assert!(!v.all_down);
        let (d, v) = desired_service(&s, &none, &|_, _| false, &mut last, Instant::now());
        assert!(serving(&d).is_empty(), "drop: nobody serves");
        assert!(v.all_down && !v.fail_open);
        assert!(d.backends.iter().all(|b| !b.active));
    }

    #[test]
    fn slow_start_ramps_a_returning_backend() {
        let mut s = svc(&[("10.0.0.1", 0, 100), ("10.0.0.2", 0, 100)]);
        s.slow_start_s = 10;
        let mut m = Memory::default();
        let none = BTreeMap::new();
        let t0 = Instant::now();
        // First sight: no ramp.
        let (d, v) = desired_service(&s, &none, &|_, _| true, &mut m, t0);
        assert_eq!(d.backends[1].weight, 100);
        assert_eq!(v.backends[1].slow_start, None);
        assert!(!m.ramping());
        // be2 goes down, then comes back at t0 + 1 s.
        let down = |a: IpAddr, _| a != ip("10.0.0.2");
        desired_service(&s, &none, &down, &mut m, t0);
        let back = t0 + Duration::from_secs(1);
        let at = |m: &mut Memory, secs: f64| {
            let (d, v) = desired_service(
                &s,
                &none,
                &|_, _| true,
                m,
                back + Duration::from_secs_f64(secs),
            );
            (
                d.backends[1].weight,
                v.backends[1].slow_start,
                d.backends[0].weight,
            )
        };
        assert_eq!(at(&mut m, 0.0), (10, Some(0.1), 100));
        assert!(m.ramping());
        let (w, f, _) = at(&mut m, 5.0);
        assert_eq!(w, 55);
        assert!((f.unwrap() - 0.55).abs() < 1e-9);
        assert_eq!(at(&mut m, 10.0), (100, None, 100));
        assert!(!m.ramping());
        // Without slow_start_s a returning backend takes its full weight at once.
        s.slow_start_s = 0;
        let mut m = Memory::default();
        desired_service(&s, &none, &down, &mut m, t0);
        let (d, v) = desired_service(&s, &none, &|_, _| true, &mut m, t0);
        assert_eq!(
            (d.backends[1].weight, v.backends[1].slow_start),
            (100, None)
        );
    }

    #[test]
    fn slow_start_applies_to_added_and_reenabled_backends() {
        let mut s = svc(&[("10.0.0.1", 0, 100)]);
        s.slow_start_s = 4;
        let mut m = Memory::default();
        let t0 = Instant::now();
        let mut o = BTreeMap::new();
        desired_service(&s, &o, &|_, _| true, &mut m, t0);
        // Added later (API or reload).
        s.backends.push(BackendConfig {
            quic_id: None,
            address: ip("10.0.0.2"),
            port: 80,
            weight: 200,
            tier: 0,
        });
        let (d, _) = desired_service(&s, &o, &|_, _| true, &mut m, t0);
        assert_eq!(d.backends[1].weight, 20);
        // Drained, then enabled again: ramps again.
        let (d, _) = desired_service(&s, &o, &|_, _| true, &mut m, t0 + Duration::from_secs(4));
        assert_eq!(d.backends[1].weight, 200);
        o.insert(
            ip("10.0.0.2"),
            BackendOverride {
                state: Some(AdminState::Drain),
                weight: None,
            },
        );
        desired_service(&s, &o, &|_, _| true, &mut m, t0 + Duration::from_secs(5));
        o.clear();
        let (d, _) = desired_service(&s, &o, &|_, _| true, &mut m, t0 + Duration::from_secs(6));
        assert_eq!(d.backends[1].weight, 20);
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
        let (d, v) = desired_service(&s, &o, &|_, _| true, &mut Memory::default(), Instant::now());
        assert_eq!(d.backends[0].weight, 7);
        assert_eq!(v.backends[0].weight, 7);
    }
}
