//! `cluster`: how long N LB nodes sharing one state in etcd take to converge on one
//! ring after an API change, and how much of the ring a node that joins differs from
//! the others' (the share of flows that would change backend when ECMP moves them to
//! it: 0 when rings are identical).
//!
//! For N in `--nodes` (default 2, 4, 8): the step-1 bed (router, three backends) with
//! N LB hosts on its LAN, each running the real lb-agent with XDP attached and
//! `[cluster]`, and a three-member etcd (Debian's etcd-server) in namespaces. Then
//! `--rounds` times: a weight change through node 1's API (`PATCH`), t0 just before
//! the request; the time until every node's `ring_digest` equals the new ring's (node
//! 1's answer holds it), polled every few ms over all nodes (each poll costs about a
//! millisecond per node, which bounds the resolution). Last, node N+1 joins: its ring,
//! read back from its map slot by slot, is compared with node 1's. Each N builds and
//! removes its own bed (also on error or panic); nothing is asserted about time.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use xdplb_tests::{
    cluster_bed::{API, ClusterSection, Node, start_agent, wait_for},
    config::{BackendConfig, LbConfig, ServiceConfig},
    etcd::EtcdCluster,
    netns::ChildGuard,
    topology::{BACKEND_ADDRS, LB_ADDR, Topology, vip_socket},
};

use crate::report::{Cell, Report};

/// Arguments of `cluster`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Node counts to measure, 2 to 12 each (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = vec![2usize, 4, 8],
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..=12))]
    nodes: Vec<usize>,
    /// API changes per node count, 1 to 50; the table shows median and max.
    #[arg(long, default_value_t = 10,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=50))]
    rounds: usize,
}

/// The measurement of one node count.
struct Outcome {
    nodes: usize,
    converge_ms: Vec<f64>,
    joined_differs: usize,
    ring_size: usize,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &n in &args.nodes {
        eprintln!("cluster: {n} nodes ...");
        rows.push(measure(n, args.rounds).with_context(|| format!("{n} nodes"))?);
    }
    let mut report = Report::new(
        "cluster",
        format!(
            "N LB nodes sharing one state in etcd; {} weight changes through node 1's API per N, \
             figures are median (min-max)",
            args.rounds
        ),
    );
    let table = report.table(
        "",
        &[
            ("nodes", true),
            ("API change → every node's ring", true),
            ("rounds", true),
            ("slots of a joining node's ring that differ", true),
        ],
    );
    for r in &rows {
        table.row(vec![
            Cell::text(r.nodes.to_string()),
            Cell::samples("ms", 1, &r.converge_ms),
            Cell::text(r.converge_ms.len().to_string()),
            Cell::text(format!(
                "{} of {} ({:.4} %)",
                r.joined_differs,
                r.ring_size,
                100.0 * r.joined_differs as f64 / r.ring_size as f64
            )),
        ]);
    }
    report.note(
        "Method: per N, the step-1 bed with N LB hosts running lb-agent with XDP and [cluster], \
         a three-member etcd; t0 just before a PATCH of be2's weight on node 1, then every node's \
         ring_digest polled (about 1 ms per node per poll, which bounds the resolution) until all \
         equal node 1's. Last, node N+1 joins: its ring read back slot by slot against node 1's.",
    );
    report.finish()?;
    Ok(())
}

fn lb_addr(i: usize) -> Ipv4Addr {
    if i == 0 {
        LB_ADDR
    } else {
        Ipv4Addr::new(198, 18, 1, 40 + u8::try_from(i).expect("few nodes"))
    }
}

fn measure(n: usize, rounds: usize) -> anyhow::Result<Outcome> {
    let mut topo = Topology::build()?;
    let stores = (1..=3u8)
        .map(|i| {
            topo.add_lan_host(&format!("e{i}"), Ipv4Addr::new(198, 18, 1, 30 + i), false)
                .map(|h| (h.ns, h.addr))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Hosts of nodes 2..=N, and one more that joins at the end.
    let hosts = (1..=n)
        .map(|i| topo.add_lan_host(&format!("lb{}", i + 1), lb_addr(i), true))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let _servers = topo.start_http_servers()?;
    topo.attach_decap()?;
    let etcd = EtcdCluster::start(&stores, topo.run_dir(), topo.prefix())?;
    let service = BACKEND_ADDRS
        .iter()
        .fold(ServiceConfig::new("web", vip_socket()), |s, &a| {
            s.backend(BackendConfig::new(a))
        });
    let config = |i: usize| {
        LbConfig::new("eth0")
            .source_ipv4(lb_addr(i))
            .sizes(65537, 65536)
            .api_listen(API)
            .service(service.clone())
            .section(
                "cluster",
                ClusterSection {
                    node: format!("lb{}", i + 1),
                    etcd: etcd.endpoints(),
                    prefix: "/xdplb-bench".into(),
                },
            )
    };
    topo.start_agent(&config(0), &Default::default())?;
    let (bpffs, run_dir) = (topo.bpffs().to_owned(), topo.run_dir().to_owned());
    let mut agents: Vec<ChildGuard> = Vec::new();
    let mut nodes = vec![Node {
        name: "lb1".into(),
        ns: topo.lb.ns.clone(),
    }];
    for (i, h) in hosts.iter().enumerate().take(n - 1) {
        let name = format!("lb{}", i + 2);
        agents.push(start_agent(&name, &h.ns, &config(i + 1), &run_dir, &bpffs)?.0);
        nodes.push(Node {
            name,
            ns: h.ns.clone(),
        });
    }
    for node in &nodes {
        wait_for(
            &format!("{} sees {n} members", node.name),
            Duration::from_secs(20),
            || {
                let c = node.cluster()?;
                Ok(c.store == "connected" && c.members.len() == n)
            },
        )?;
    }
    let be = BACKEND_ADDRS[1];
    let mut converge_ms = Vec::new();
    for round in 0..rounds {
        let weight = 150 + 10 * (round % 2) as u32 + round as u32;
        let t0 = Instant::now();
        let (status, body) = nodes[0].patch("web", be, &format!(r#"{{"weight": {weight}}}"#))?;
        ensure!(status == 200, "PATCH: {status} {body}");
        let want = nodes[0].service("web")?.ring_digest;
        ensure!(want.is_some(), "node 1 has no ring");
        wait_for(
            "every node on the new ring",
            Duration::from_secs(10),
            || {
                for node in &nodes[1..] {
                    if node.service("web")?.ring_digest != want {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
        )?;
        converge_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    // A node joins: its ring against node 1's, slot by slot.
    let joining = &hosts[n - 1];
    let name = format!("lb{}", n + 1);
    agents.push(start_agent(&name, &joining.ns, &config(n), &run_dir, &bpffs)?.0);
    let joined = Node {
        name,
        ns: joining.ns.clone(),
    };
    let want = nodes[0].service("web")?.ring_digest;
    wait_for(
        "the joining node on the shared ring",
        Duration::from_secs(10),
        || Ok(joined.service("web")?.ring_digest == want),
    )?;
    let (a, b) = (nodes[0].ring("web")?, joined.ring("web")?);
    let joined_differs = a.slots.iter().zip(&b.slots).filter(|(x, y)| x != y).count();
    drop(agents);
    Ok(Outcome {
        nodes: n,
        converge_ms,
        joined_differs,
        ring_size: a.slots.len(),
    })
}
