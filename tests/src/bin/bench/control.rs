//! `control`: how fast the control plane turns a change into forwarding state.
//!
//! 1. Maglev ring build (`lb_agent::dataplane::ring::build`, in this process): 10, 100
//!    and 1,000 equally weighted backends, at 65,537 slots (the default `ring_size`) and
//!    at 655,373; `--runs` builds each, wall-clock time.
//! 2. API call → map written: the step-1 namespace bed (client, router, LB running the
//!    real lb-agent with XDP, three backends), service `web`. `--runs` times: a `PATCH`
//!    of be2's weight, alternating 100 and 50, through the API in the LB's namespace.
//!    Measured: request → HTTP response, and HTTP response → every ring slot that the
//!    change moves holds its new value in the pinned `XDPLB_RINGS` map (the rings of both
//!    weights are read from the map once beforehand; a poll reads 64 of the moving slots
//!    spread over the set, then, once they all match, every moving slot). A poll costs
//!    about a microsecond per slot read, which bounds the resolution; 0 means the map was
//!    already written when the response came.
//! 3. 10,000 backends: `--big-runs` times, `POST /api/v1/services` of one service with
//!    10,000 backends (198.19.0.0/16, no health checks) to the same agent: request →
//!    response, → its VIP in `XDPLB_VIPS` with a ring (written last: the service is
//!    complete in the maps), → the API lists all 10,000 backends; the ring is then
//!    checked to hold 10,000 distinct backend ids. Then `DELETE` and the time until the
//!    VIP is gone from the map.
//! 4. API call on one node → every node's maps: `xdplb-bench cluster` measures it (up to
//!    12 nodes sharing etcd); not repeated here.
//!
//! Nothing is asserted about time; the bed is removed at the end, also on error or panic.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_agent::dataplane::{maps::Maps, ring};
use lb_common::types::{VipKey, VipMeta};
use xdplb_tests::{
    cluster_bed::{API, Node},
    config::{BackendConfig, LbConfig, ServiceConfig},
    http,
    topology::{BACKEND_ADDRS, LB_ADDR, Topology, VIP, vip_socket},
};

use crate::report::{Cell, Report};

/// Arguments of `control`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Ring builds per size and API changes, 1 to 51; the tables show median (min-max).
    #[arg(long, value_name = "N", default_value_t = 11,
          value_parser = clap::value_parser!(u32).range(1..=51))]
    runs: u32,
    /// Loads of the 10,000-backend service, 1 to 10.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    big_runs: u32,
}

const RING_SIZES: [u32; 2] = [65_537, 655_373];
const RING_BACKENDS: [usize; 3] = [10, 100, 1000];
const BIG: usize = 10_000;
const BIG_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 2), 80);
/// Poll interval of the map checks.
const POLL: Duration = Duration::from_micros(200);
/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut report = Report::new(
        "control",
        format!(
            "control plane: Maglev ring builds, API change → map, 10,000 backends; figures are median (min-max) of {} run(s) ({} for 10,000 backends)",
            args.runs, args.big_runs
        ),
    );
    eprintln!("control: ring builds ...");
    let rings = report.table(
        "Maglev ring build (lb_agent::dataplane::ring::build, equal weights, one thread)",
        &[("backends", true), ("slots", true), ("build time", true)],
    );
    for &n in &RING_BACKENDS {
        let keys: Vec<String> = (0..n)
            .map(|i| format!("198.19.{}.{}:80", i / 250, i % 250 + 1))
            .collect();
        let members: Vec<ring::RingMember<'_>> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| ring::RingMember {
                id: u32::try_from(i).expect("few members"),
                key: k,
                weight: 100,
            })
            .collect();
        for &size in &RING_SIZES {
            let mut samples = Vec::new();
            for _ in 0..args.runs {
                let t = Instant::now();
                let built = ring::build(&members, size).context("no ring built")?;
                samples.push(ms(t.elapsed()));
                ensure!(
                    built.len() == size as usize,
                    "ring of {} slots",
                    built.len()
                );
            }
            rings.row(vec![
                Cell::text(n.to_string()),
                Cell::text(size.to_string()),
                Cell::samples("ms", 2, &samples),
            ]);
        }
    }

    eprintln!("control: building the namespace bed ...");
    let bed = Bed::start()?;
    eprintln!("control: {} weight changes through the API ...", args.runs);
    let (resp, after) = bed.weight_changes(args.runs)?;
    let api = report.table(
        "API call → map written (step-1 bed, real agent with XDP; PATCH of a backend's weight, 100 ↔ 50, 3 backends, 65,537 slots)",
        &[("change", false), ("request → response", true), ("response → every moved ring slot in the pinned map", true)],
    );
    api.row(vec![
        Cell::text("PATCH weight"),
        Cell::samples("ms", 2, &resp),
        Cell::samples("ms", 2, &after),
    ]);
    eprintln!("control: {} loads of {BIG} backends ...", args.big_runs);
    let big = bed.big_loads(args.big_runs)?;
    let t = report.table(
        "10,000 backends in one service (POST through the API to the running agent; 65,537 slots)",
        &[
            ("request → response", true),
            ("→ VIP with its ring in the map", true),
            ("→ API lists all 10,000", true),
            ("DELETE → VIP gone from the map", true),
        ],
    );
    t.row(vec![
        Cell::samples("ms", 0, &big.iter().map(|b| b.0).collect::<Vec<_>>()),
        Cell::samples("ms", 0, &big.iter().map(|b| b.1).collect::<Vec<_>>()),
        Cell::samples("ms", 0, &big.iter().map(|b| b.2).collect::<Vec<_>>()),
        Cell::samples("ms", 0, &big.iter().map(|b| b.3).collect::<Vec<_>>()),
    ]);
    drop(bed);
    report.note(
        "Ring build: wall-clock time of one `ring::build` call in this process (release build). \
         API → map: t0 before the PATCH is sent (HTTP/1.1 to 127.0.0.1:9090 inside the LB's \
         namespace, one connection per request); the map is read through its pins under the \
         bed's bpffs, polled every 0.2 ms; each poll reads 64 moving slots (about a microsecond \
         each), the final one all of them. 10,000 backends: the VIP entry is written after the \
         service's ring and backends (sync.rs's order), so its presence with a ring means the \
         service is complete in the maps; the ring is then read back and holds 10,000 distinct ids. \
         API call on one node → every node's maps: `cargo xtask bench cluster`.",
    );
    report.finish()?;
    Ok(())
}

/// The step-1 bed with the agent, and its maps opened from their pins.
struct Bed {
    maps: Maps,
    node: Node,
    ring_size: u32,
    _topo: Topology,
}

impl Bed {
    fn start() -> anyhow::Result<Self> {
        let mut topo = Topology::build()?;
        let service = BACKEND_ADDRS
            .iter()
            .fold(ServiceConfig::new("web", vip_socket()), |s, &a| {
                s.backend(BackendConfig::new(a))
            });
        let ring_size = 65_537;
        let config = LbConfig::new("eth0")
            .source_ipv4(LB_ADDR)
            .sizes(ring_size, 65_536)
            .dataplane("max_backends", 16_384)
            .api_listen(API)
            .service(service);
        topo.start_agent(&config, &Default::default())?;
        let ino = {
            use std::os::unix::fs::MetadataExt as _;
            std::fs::metadata(PathBuf::from("/run/netns").join(&topo.lb.ns))?.ino()
        };
        let dir = topo
            .bpffs()
            .join("xdplb")
            .join(ino.to_string())
            .join("eth0")
            .join("lb");
        let maps = Maps::from_pins(&dir)
            .with_context(|| format!("opening the agent's maps under {}", dir.display()))?;
        let node = Node {
            name: "lb".into(),
            ns: topo.lb.ns.clone(),
        };
        Ok(Self {
            maps,
            node,
            ring_size,
            _topo: topo,
        })
    }

    /// The VIP entry of `vip` (TCP), if the map has one.
    fn vip_meta(&self, vip: SocketAddrV4) -> Option<VipMeta> {
        let (addr, family) = lb_agent::dataplane::sync::addr_words(IpAddr::V4(*vip.ip()));
        let key = VipKey {
            addr,
            port: vip.port().to_be(),
            proto: lb_common::types::PROTO_TCP,
            family,
        };
        self.maps.vips.get(&key, 0).ok()
    }

    fn ring_slots(&self, service_id: u32, slots: &[u32]) -> anyhow::Result<Vec<u32>> {
        let base = service_id * self.ring_size;
        slots
            .iter()
            .map(|&s| Ok(self.maps.rings.get(&(base + s), 0)?))
            .collect()
    }

    fn patch_weight(&self, weight: u32) -> anyhow::Result<()> {
        let (status, body) = self.node.patch(
            "web",
            BACKEND_ADDRS[1],
            &format!(r#"{{"weight": {weight}}}"#),
        )?;
        ensure!(status == 200, "PATCH weight {weight}: {status} {body}");
        Ok(())
    }

    /// Waits until slots `which` of service `sid`'s ring hold `want` (same order).
    fn wait_ring(&self, sid: u32, which: &[u32], want: &[u32]) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if self.ring_slots(sid, which)? == want {
                return Ok(());
            }
            ensure!(
                start.elapsed() < WAIT,
                "the ring did not change within {WAIT:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// `runs` weight changes: (request → response, response → map) in ms.
    fn weight_changes(&self, runs: u32) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let sid = self
            .vip_meta(SocketAddrV4::new(VIP, 80))
            .context("no VIP entry for web")?
            .service_id;
        let all: Vec<u32> = (0..self.ring_size).collect();
        // The ring at each weight, read once the agent has surely applied it.
        let settled = |weight: u32| -> anyhow::Result<Vec<u32>> {
            self.patch_weight(weight)?;
            let digest = self.node.service("web")?.ring_digest;
            let start = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(300));
                let ring = self.ring_slots(sid, &all)?;
                let again = self.ring_slots(sid, &all)?;
                if ring == again {
                    return Ok(ring);
                }
                ensure!(start.elapsed() < WAIT, "ring not settled ({digest:?})");
            }
        };
        let half = settled(50)?;
        let full = settled(100)?;
        let moving: Vec<u32> = all
            .iter()
            .copied()
            .filter(|&s| half[s as usize] != full[s as usize])
            .collect();
        ensure!(!moving.is_empty(), "weights 100 and 50 give the same ring");
        let step = (moving.len() / 64).max(1);
        let sample: Vec<u32> = moving.iter().copied().step_by(step).collect();
        let (mut resp, mut after) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let (weight, ring) = if i % 2 == 0 {
                (50, &half)
            } else {
                (100, &full)
            };
            let want = |slots: &[u32]| slots.iter().map(|&s| ring[s as usize]).collect::<Vec<_>>();
            let t0 = Instant::now();
            self.patch_weight(weight)?;
            let t1 = Instant::now();
            self.wait_ring(sid, &sample, &want(&sample))?;
            self.wait_ring(sid, &moving, &want(&moving))?;
            let t2 = Instant::now();
            resp.push(ms(t1 - t0));
            after.push(ms(t2 - t1));
            // Let the agent finish whatever follows the write (state file) before the next.
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok((resp, after))
    }

    /// `runs` loads of the 10,000-backend service: (response, VIP in map, API lists all,
    /// DELETE → VIP gone), ms from the request.
    fn big_loads(&self, runs: u32) -> anyhow::Result<Vec<(f64, f64, f64, f64)>> {
        let backends: Vec<String> = (0..BIG)
            .map(|i| {
                format!(
                    r#"{{"address": "198.19.{}.{}", "port": 80}}"#,
                    i / 250,
                    i % 250 + 1
                )
            })
            .collect();
        let body = format!(
            r#"{{"name": "big", "vip": "{BIG_VIP}", "backend": [{}]}}"#,
            backends.join(", ")
        );
        let api: SocketAddr = API.parse()?;
        let call = |method: &str, path: &str, body: Option<&str>| {
            http::json_call_in(&self.node.ns, api, method, path, body, WAIT)
                .with_context(|| format!("{method} {path}"))
        };
        let mut out = Vec::new();
        for _ in 0..runs {
            let t0 = Instant::now();
            let (status, text) = call("POST", "/api/v1/services", Some(&body))?;
            let t_resp = t0.elapsed();
            ensure!(
                status == 200 || status == 201,
                "POST of {BIG} backends: {status} {}",
                &text[..text.len().min(300)]
            );
            let start = Instant::now();
            let meta = loop {
                if let Some(m) = self.vip_meta(BIG_VIP).filter(|m| m.ring_size > 0) {
                    break m;
                }
                ensure!(
                    start.elapsed() < WAIT,
                    "no VIP entry for big within {WAIT:?}"
                );
                std::thread::sleep(POLL);
            };
            let t_map = t0.elapsed();
            let t_api = loop {
                let svc = self.node.service("big")?;
                if svc.backends.len() == BIG {
                    break t0.elapsed();
                }
                ensure!(
                    start.elapsed() < WAIT,
                    "the API lists {} backends",
                    svc.backends.len()
                );
            };
            let all: Vec<u32> = (0..self.ring_size).collect();
            let ids: BTreeSet<u32> = self
                .ring_slots(meta.service_id, &all)?
                .into_iter()
                .collect();
            if ids.len() != BIG {
                bail!(
                    "the ring of big holds {} distinct backend ids, not {BIG}",
                    ids.len()
                );
            }
            let t_del = Instant::now();
            let (status, text) = call("DELETE", "/api/v1/services/big", None)?;
            ensure!(
                status == 200 || status == 204,
                "DELETE big: {status} {text}"
            );
            while self.vip_meta(BIG_VIP).is_some() {
                ensure!(t_del.elapsed() < WAIT, "the VIP of big is still in the map");
                std::thread::sleep(POLL);
            }
            let deleted = t_del.elapsed();
            eprintln!(
                "  {BIG} backends: response {:.0} ms, in the map {:.0} ms, API {:.0} ms; delete {:.0} ms",
                ms(t_resp),
                ms(t_map),
                ms(t_api),
                ms(deleted)
            );
            out.push((ms(t_resp), ms(t_map), ms(t_api), ms(deleted)));
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn args_parse() {
        use clap::Parser as _;
        let a = |v: &[&str]| {
            let argv = ["xdplb-bench", "control"].iter().chain(v);
            crate::Cli::try_parse_from(argv).map(|cli| match cli.benchmark {
                crate::Benchmark::Control(args) => (args.runs, args.big_runs),
                other => panic!("parsed as {other:?}"),
            })
        };
        assert_eq!(a(&[]).unwrap(), (11, 3));
        assert_eq!(a(&["--runs", "3", "--big-runs", "1"]).unwrap(), (3, 1));
        assert!(a(&["--runs", "0"]).is_err());
    }
}
