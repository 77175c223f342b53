//! The step-1 L4 end-to-end scenario, shared by the `e2e_l4` test and the demo:
//! bring up the [`Topology`] with HTTP servers on the backends, decap on the backends
//! and the agent on the LB ([`L4Bed::start`]); then make real HTTP connections to the
//! VIP while counting, with packet sockets, where frames from the VIP travel
//! ([`L4Bed::measure`]); then judge the result ([`L4Outcome::problems`]).
//!
//! Where replies go is observed at four places, all after any XDP program there:
//! - each backend's router port, incoming: replies leave the backends (DSR);
//! - the router's client port, outgoing: they are forwarded to the client;
//! - the LB's `eth0`, incoming: the LB's stack never sees one;
//! - the LB's router port, incoming: the LB never sends one.

use std::{collections::BTreeMap, net::IpAddr, thread, time::Duration};

use anyhow::Context as _;

use crate::{
    capture::{Capture, CaptureStats, Direction},
    config::LbConfig,
    http::{self, HttpServer, LoadReport},
    topology::{
        AgentOptions, BACKEND_ADDRS, Topology, TopologyOptions, VIP, agent_binary, vip_socket,
    },
};

/// Options of [`L4Bed::start`].
#[derive(Clone, Debug)]
pub struct BedOptions {
    /// How the network is built.
    pub topology: TopologyOptions,
    /// How the agent is run.
    pub agent: AgentOptions,
    /// The agent's config.
    pub config: LbConfig,
}

impl Default for BedOptions {
    fn default() -> Self {
        Self {
            topology: TopologyOptions::default(),
            agent: AgentOptions::default(),
            config: Topology::default_config(),
        }
    }
}

/// Options of [`L4Bed::measure`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Connections to make.
    pub requests: usize,
    /// Client threads.
    pub parallel: usize,
    /// Bound on the whole run.
    pub deadline: Duration,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            requests: 300,
            parallel: 4,
            deadline: Duration::from_secs(120),
        }
    }
}

/// A running step-1 bed: topology, backends' HTTP servers, decap and agent.
#[derive(Debug)]
pub struct L4Bed {
    /// The backends' servers (stopped before the topology goes).
    pub servers: Vec<HttpServer>,
    /// The network and the agent.
    pub topo: Topology,
}

impl L4Bed {
    /// Builds the topology, starts the servers, attaches decap and starts the agent.
    pub fn start(opts: &BedOptions) -> anyhow::Result<Self> {
        // Fail before building anything when there is no agent to run.
        agent_binary()?;
        let mut topo = Topology::build_with(&opts.topology).context("building the topology")?;
        let servers = topo.start_http_servers()?;
        topo.attach_decap()?;
        topo.start_agent(&opts.config, &opts.agent)?;
        Ok(Self { servers, topo })
    }

    /// Makes the connections of `load` from the client to the VIP and observes them.
    pub fn measure(&self, load: &LoadOptions) -> anyhow::Result<L4Outcome> {
        let t = &self.topo;
        let before: Vec<u64> = self.servers.iter().map(HttpServer::requests).collect();
        let mut from_backends = Vec::new();
        for b in &t.backends {
            from_backends.push((
                b.role.clone(),
                Capture::ipv4_source(&t.router, &b.router_port, Direction::Incoming, VIP)?,
            ));
        }
        let from_lb = Capture::ipv4_source(&t.router, &t.lb.router_port, Direction::Incoming, VIP)?;
        let into_lb = Capture::ipv4_source(&t.lb.ns, "eth0", Direction::Incoming, VIP)?;
        let to_client =
            Capture::ipv4_source(&t.router, &t.client.router_port, Direction::Outgoing, VIP)?;

        let report = http::run_load(
            &t.client.ns,
            vip_socket(),
            load.requests,
            load.parallel,
            load.deadline,
        )?;
        // Let the last FINs and ACKs pass the capture points.
        thread::sleep(Duration::from_millis(300));

        let served = self
            .servers
            .iter()
            .zip(before)
            .map(|(s, b)| (s.name().to_owned(), s.requests() - b))
            .collect();
        let replies_from_backends = from_backends
            .into_iter()
            .map(|(r, c)| Ok((r, c.finish()?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(L4Outcome {
            load: report,
            served,
            replies_from_backends,
            vip_frames_from_lb: from_lb.finish()?,
            vip_frames_into_lb: into_lb.finish()?,
            vip_frames_to_client: to_client.finish()?,
        })
    }
}

/// What [`L4Bed::measure`] observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Outcome {
    /// The client's view.
    pub load: LoadReport,
    /// Requests each backend's server answered during the run.
    pub served: BTreeMap<String, u64>,
    /// Frames from the VIP entering the router from each backend.
    pub replies_from_backends: BTreeMap<String, CaptureStats>,
    /// Frames from the VIP entering the router from the LB (expected: none).
    pub vip_frames_from_lb: CaptureStats,
    /// Frames from the VIP reaching the LB's stack (expected: none).
    pub vip_frames_into_lb: CaptureStats,
    /// Frames from the VIP the router sent to the client.
    pub vip_frames_to_client: CaptureStats,
}

impl L4Outcome {
    /// Everything that violates step 1's acceptance, as readable sentences; empty if all
    /// is well. `expected` is each backend's expected share (see [`expected_shares`]).
    pub fn problems(&self, expected: &BTreeMap<String, f64>) -> Vec<String> {
        let mut p = Vec::new();
        let l = &self.load;
        if !l.all_ok() {
            p.push(format!(
                "{} of {} requests did not succeed ({} failed, {} not attempted before the deadline); first failures: {:?}",
                l.requested - l.ok,
                l.requested,
                l.failed,
                l.not_attempted,
                &l.failures[..l.failures.len().min(3)]
            ));
        }
        for (name, &share) in expected {
            let got = l.per_backend.get(name).copied().unwrap_or(0);
            let (lo, hi) = share_bounds(l.requested, share);
            if (got as f64) < lo || (got as f64) > hi {
                p.push(format!(
                    "{name} answered {got} of {} requests, expected {:.1} (bounds {lo:.1}..={hi:.1})",
                    l.requested,
                    share * l.requested as f64
                ));
            }
            if share > 0.0
                && self
                    .replies_from_backends
                    .get(name)
                    .is_none_or(|c| c.matched == 0)
            {
                p.push(format!(
                    "no frame from the VIP left {name} towards the router"
                ));
            }
        }
        for name in l.per_backend.keys().filter(|n| !expected.contains_key(*n)) {
            p.push(format!("unexpected backend {name:?} answered"));
        }
        for (name, &served) in &self.served {
            let seen = l.per_backend.get(name).copied().unwrap_or(0) as u64;
            if served != seen {
                p.push(format!("{name}'s server counted {served} requests, the client saw {seen} answers from it"));
            }
        }
        if self.vip_frames_into_lb.matched > 0 {
            p.push(format!(
                "the LB's stack received {} frames from the VIP: replies went through the LB",
                self.vip_frames_into_lb.matched
            ));
        }
        if self.vip_frames_from_lb.matched > 0 {
            p.push(format!(
                "the LB sent {} frames from the VIP",
                self.vip_frames_from_lb.matched
            ));
        }
        if l.ok > 0 && self.vip_frames_to_client.matched == 0 {
            p.push("the router forwarded no frame from the VIP to the client".to_owned());
        }
        let captures = self.replies_from_backends.values().chain([
            &self.vip_frames_from_lb,
            &self.vip_frames_into_lb,
            &self.vip_frames_to_client,
        ]);
        if captures.clone().any(|c| c.kernel_drops > 0) {
            p.push(format!(
                "packet captures dropped frames, counts are not complete: {:?}",
                captures.map(|c| c.kernel_drops).collect::<Vec<_>>()
            ));
        }
        p
    }
}

/// Bounds for how many of `n` independent requests land on a backend with share `p`:
/// `n*p ± (4 sigma + 2% of n)`, sigma the binomial standard deviation.
pub fn share_bounds(n: usize, p: f64) -> (f64, f64) {
    let n = n as f64;
    let mean = n * p;
    let slack = 4.0 * (n * p * (1.0 - p)).sqrt() + 0.02 * n;
    ((mean - slack).max(0.0), (mean + slack).min(n))
}

/// Each backend's expected share of `service` in `config`, by role (`be1`..): the
/// backends of the lowest tier share by weight (the agent's default where unset);
/// other tiers get 0.
/// Backends that are not one of the topology's get their address as name.
pub fn expected_shares(config: &LbConfig, service: &str) -> BTreeMap<String, f64> {
    let model = config
        .model()
        .unwrap_or_else(|e| panic!("the agent cannot read the test's config: {e}"));
    let Some(svc) = model.services.iter().find(|s| s.name == service) else {
        return BTreeMap::new();
    };
    let role = |a: IpAddr| {
        BACKEND_ADDRS
            .iter()
            .position(|&b| IpAddr::V4(b) == a)
            .map_or_else(|| a.to_string(), |i| format!("be{}", i + 1))
    };
    let top = svc.backends.iter().map(|b| b.tier).min().unwrap_or(0);
    let weight = |b: &lb_agent::config::BackendConfig| {
        if b.tier == top {
            f64::from(b.weight)
        } else {
            0.0
        }
    };
    let total: f64 = svc.backends.iter().map(weight).sum();
    svc.backends
        .iter()
        .map(|b| {
            (
                role(b.address),
                if total > 0.0 { weight(b) / total } else { 0.0 },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, ServiceConfig};

    #[test]
    fn bounds_for_300_requests_over_three() {
        let (lo, hi) = share_bounds(300, 1.0 / 3.0);
        assert!(
            (61.0..62.0).contains(&lo) && (138.0..139.0).contains(&hi),
            "{lo} {hi}"
        );
        assert_eq!(share_bounds(10, 1.0), (9.8, 10.0));
        assert_eq!(share_bounds(10, 0.0), (0.0, 0.2));
    }

    #[test]
    fn shares_follow_weights_and_tiers() {
        let even = expected_shares(&Topology::default_config(), "web");
        assert_eq!(even.len(), 3);
        assert!(even.values().all(|&s| (s - 1.0 / 3.0).abs() < 1e-9));

        let svc = ServiceConfig::new("web", vip_socket())
            .backend(BackendConfig::new(BACKEND_ADDRS[0]).weight(300))
            .backend(BackendConfig::new(BACKEND_ADDRS[1]))
            .backend(BackendConfig::new(BACKEND_ADDRS[2]).tier(1));
        let shares = expected_shares(&LbConfig::new("eth0").service(svc), "web");
        assert_eq!(shares["be1"], 0.75);
        assert_eq!(shares["be2"], 0.25);
        assert_eq!(shares["be3"], 0.0);
    }

    #[test]
    fn problems_name_every_violation() {
        let expected = expected_shares(&Topology::default_config(), "web");
        let caps = |m| CaptureStats {
            matched: m,
            seen: m,
            kernel_drops: 0,
        };
        let mut good = L4Outcome {
            load: LoadReport {
                requested: 300,
                ok: 300,
                per_backend: [("be1", 100), ("be2", 95), ("be3", 105)]
                    .map(|(n, c)| (n.to_owned(), c))
                    .into(),
                ..LoadReport::default()
            },
            served: [("be1", 100), ("be2", 95), ("be3", 105)]
                .map(|(n, c)| (n.to_owned(), c))
                .into(),
            replies_from_backends: ["be1", "be2", "be3"]
                .map(|n| (n.to_owned(), caps(500)))
                .into(),
            vip_frames_from_lb: caps(0),
            vip_frames_into_lb: caps(0),
            vip_frames_to_client: caps(1500),
        };
        assert_eq!(good.problems(&expected), Vec::<String>::new());
        good.vip_frames_into_lb = caps(3);
        good.load.per_backend.insert("be1".into(), 10);
        let problems = good.problems(&expected);
        assert!(
            problems.iter().any(|p| p.contains("LB's stack received 3")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("be1 answered 10")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("be1's server counted 100")),
            "{problems:?}"
        );
    }
}
