//! Helpers of the `[cluster]` tests and benchmark: an agent's API reached inside its
//! namespace ([`Node`]), the `[cluster]` table of a config ([`ClusterSection`]), an
//! agent started on a further LB host ([`start_agent`]), polling ([`wait_for`]), two
//! nodes' rings compared slot by slot ([`same_rings`]), and a backend cut off from one
//! node's health checks by nftables ([`nft_drop_towards`]). Used by the step-1 bed's
//! `tests/cluster.rs` and the ECMP bed's `tests/ecmp.rs`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_agent::api::types::{BackendLive, ClusterStatus, RingSlots, Service};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    config::LbConfig,
    http,
    netns::{self, ChildGuard},
    topology::{AGENT_READY, agent_binary},
};

/// Where every agent of the bed serves its API (each in its own namespace).
pub const API: &str = "127.0.0.1:9090";

/// `[cluster]` of an agent's config.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterSection {
    pub node: String,
    pub etcd: Vec<String>,
    pub prefix: String,
}

/// One agent's API, reached inside its namespace.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub ns: String,
}

impl Node {
    /// (status, body) of one request.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let addr: SocketAddr = API.parse()?;
        http::json_call_in(&self.ns, addr, method, path, body, Duration::from_secs(5))
            .with_context(|| format!("{method} {path} on {}", self.name))
    }

    /// A 200 answer's body as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let (status, body) = self.call("GET", path, None)?;
        ensure!(
            status == 200,
            "GET {path} on {}: {status} {body}",
            self.name
        );
        serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))
    }

    pub fn service(&self, name: &str) -> anyhow::Result<Service> {
        self.get(&format!("/api/v1/services/{name}"))
    }

    pub fn ring(&self, name: &str) -> anyhow::Result<RingSlots> {
        self.get(&format!("/api/v1/services/{name}/ring"))
    }

    pub fn cluster(&self) -> anyhow::Result<ClusterStatus> {
        self.get("/api/v1/cluster")
    }

    pub fn metrics(&self) -> anyhow::Result<String> {
        let (status, body) = self.call("GET", "/metrics", None)?;
        ensure!(status == 200, "GET /metrics: {status}");
        Ok(body)
    }

    /// `PATCH /api/v1/services/{service}/backends/{backend}`.
    pub fn patch(
        &self,
        service: &str,
        backend: impl std::fmt::Display,
        body: &str,
    ) -> anyhow::Result<(u16, String)> {
        self.call(
            "PATCH",
            &format!("/api/v1/services/{service}/backends/{backend}"),
            Some(body),
        )
    }
}

/// Poll `f` every 5 ms until it holds; the time it took, or an error after `within`.
pub fn wait_for(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut last = None;
    loop {
        match f() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) => last = Some(format!("{e:#}")),
        }
        if start.elapsed() > within {
            bail!("{what}: not within {within:?} (last error: {last:?})");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Start `lb-agent run` in namespace `ns` (a host added with
/// [`Topology::add_lan_host`](crate::topology::Topology::add_lan_host)) with `config`,
/// its state and log under `run_dir` (named after `name`), pins under `bpffs`, and
/// `--detach-on-exit` so nothing of its fast path outlives it; waits for its
/// `agent ready` line. Returns the process (stopped on drop) and its log's path.
pub fn start_agent(
    name: &str,
    ns: &str,
    config: &LbConfig,
    run_dir: &Path,
    bpffs: &Path,
) -> anyhow::Result<(ChildGuard, PathBuf)> {
    let state_dir = run_dir.join(format!("state-{name}"));
    std::fs::create_dir_all(&state_dir)?;
    let config_path = run_dir.join(format!("{name}.toml"));
    std::fs::write(&config_path, config.to_toml(&state_dir))?;
    let log = run_dir.join(format!("agent-{name}.log"));
    let bin = agent_binary()?;
    let args = [
        bin.to_string_lossy().into_owned(),
        "run".into(),
        "--config".into(),
        config_path.to_string_lossy().into_owned(),
        "--iface".into(),
        "eth0".into(),
        "--bpffs".into(),
        bpffs.to_string_lossy().into_owned(),
        "--detach-on-exit".into(),
    ];
    let mut child = netns::spawn(ns, &args, Some(&log))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(AGENT_READY) {
            return Ok((child, log));
        }
        if let Some(status) = child.try_wait()? {
            bail!("{name}'s agent exited ({status}):\n{text}");
        }
        ensure!(
            Instant::now() < deadline,
            "{name}'s agent not ready:\n{text}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The weight of `backend` in `svc` (None: not a backend of it).
pub fn weight_of(svc: &Service, backend: Ipv4Addr) -> Option<u32> {
    svc.backends
        .iter()
        .find(|b| b.address == IpAddr::V4(backend))
        .map(|b| b.weight)
}

/// The live view of `backend` in `svc`.
///
/// # Panics
///
/// `backend` is not in `svc`, or has no live view: the test's premise is wrong.
pub fn live_of(svc: &Service, backend: Ipv4Addr) -> BackendLive {
    svc.backends
        .iter()
        .find(|b| b.address == IpAddr::V4(backend))
        .and_then(|b| b.live.clone())
        .expect("the backend has a live view")
}

/// The rings of `service` on both nodes (`GET /api/v1/services/{service}/ring`, read
/// back from each fast path): `ring_size` slots, equal slot for slot (named by backend)
/// and in digest, and the digest is the service's `ring_digest`.
pub fn same_rings(
    a: &Node,
    b: &Node,
    service: &str,
    ring_size: usize,
) -> anyhow::Result<RingSlots> {
    let (ra, rb) = (a.ring(service)?, b.ring(service)?);
    ensure!(ra.slots.len() == ring_size, "ring size {}", ra.slots.len());
    let differ = ra
        .slots
        .iter()
        .zip(&rb.slots)
        .filter(|(x, y)| x != y)
        .count();
    ensure!(
        ra.slots == rb.slots,
        "the rings of {service} on {} and {} differ in {differ} of {} slots",
        a.name,
        b.name,
        ra.slots.len()
    );
    ensure!(
        ra.digest == rb.digest && ra.digest.is_some(),
        "digests {:?} {:?}",
        ra.digest,
        rb.digest
    );
    let svc = a.service(service)?;
    ensure!(
        svc.ring_digest == ra.digest,
        "ring_digest of the service is not the ring's"
    );
    Ok(ra)
}

/// Slots of `ring` held by `backend` (any port).
pub fn slots_of(ring: &RingSlots, backend: Ipv4Addr) -> usize {
    let prefix = format!("{backend}:");
    ring.slots.iter().filter(|s| s.starts_with(&prefix)).count()
}

/// In namespace `ns`, nftables drops what the host itself sends to `backend`'s TCP
/// port 80 (table `inet xdplbtest`, output hook): the agent's health checks from there
/// fail. Packets the fast path sends (XDP_TX, encapsulated) never pass nftables.
pub fn nft_drop_towards(ns: &str, backend: Ipv4Addr) -> anyhow::Result<()> {
    netns::exec(ns, &["nft", "add", "table", "inet", "xdplbtest"])?;
    netns::exec(
        ns,
        &[
            "nft",
            "add",
            "chain",
            "inet",
            "xdplbtest",
            "out",
            "{ type filter hook output priority 0 ; }",
        ],
    )?;
    netns::exec(
        ns,
        &[
            "nft",
            "add",
            "rule",
            "inet",
            "xdplbtest",
            "out",
            "ip",
            "daddr",
            &backend.to_string(),
            "tcp",
            "dport",
            "80",
            "drop",
        ],
    )
    .map(drop)
}

/// Removes what [`nft_drop_towards`] added in `ns`.
pub fn nft_clear(ns: &str) -> anyhow::Result<()> {
    netns::exec(ns, &["nft", "delete", "table", "inet", "xdplbtest"]).map(drop)
}
