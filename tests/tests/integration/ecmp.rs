//! Several LB nodes behind ECMP (issue 10, items 4, 5(a)-(e), 7): the bed of
//! [`xdplb_tests::ecmp_bed`] (a router with BIRD 2, ECMP and BFD; LB nodes each with
//! the agent and its own BIRD; backends with echo servers; for 5(b), (c), (e) a
//! three-member etcd on the store network and `[cluster]` on every node), and
//! long-lived TCP connections that must survive a node's death, a node's drain, the
//! loss of etcd and a backend that one node alone cannot reach.
//!
//! The figures (withdrawal time, longest stall, ...) are printed: run with
//! `-- --nocapture` to see them.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use anyhow::ensure;
use lb_agent::api::types::{NodeStatus, Stats};
use xdplb_tests::{
    bird, capture,
    cluster_bed::{
        live_of, nft_clear, nft_drop_towards, same_rings, slots_of, wait_for, weight_of,
    },
    config::{BackendConfig, ServiceConfig},
    ecmp_bed::{
        EcmpBed, EcmpOptions, FailoverOptions, NODE_AS, SESSION_TIMEOUT, node_failover,
        router_nexthops, vip_socket,
    },
    netns,
    stream::{Probes, StreamOptions, Streams},
    topology::{BACKEND_ADDRS, VIP},
};

/// The bed's ring size (`EcmpBed::node_config`).
const RING: usize = 65537;

fn addrs(bed: &EcmpBed, which: &[usize]) -> BTreeSet<Ipv4Addr> {
    which.iter().map(|&i| bed.nodes[i].addr).collect()
}

/// 5(a): 24 connections stream for 9 s through two nodes; one node dies (link down,
/// BIRD and agent killed) 2.5 s in. No connection may fail, every new connection must
/// succeed, and both nodes must have carried flows before (the digests agree).
#[test]
fn a_dead_lb_node_costs_no_connection() -> anyhow::Result<()> {
    let test = xdplb_tests::require_privileges!();
    let mut bed = EcmpBed::build(&EcmpOptions {
        nodes: 2,
        store_hosts: 1,
    })?;
    // The store network's hook: every node reaches it through the router.
    for n in &bed.nodes {
        capture::ping(&n.ns, bed.store_hosts[0].addr, Duration::from_secs(3))?;
    }
    let announced = bed.start_all()?;
    eprintln!("{test}: VIP routed through both nodes {announced:?} after the agents were ready");
    let opts = FailoverOptions {
        streams: StreamOptions {
            connections: 24,
            duration: Duration::from_secs(9),
            ..StreamOptions::default()
        },
        ..FailoverOptions::default()
    };
    let outcome = node_failover(&mut bed, &opts)?;
    for line in outcome.figures() {
        eprintln!("{test}: {line}");
    }
    let problems = outcome.problems(opts.victim);
    if !problems.is_empty() {
        diagnostics(&bed, test);
    }
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(outcome.streams.resets(), 0);
    assert_eq!(bed.nexthops()?, addrs(&bed, &[1]));
    Ok(())
}

/// 5(d): a drained node's flows move to the other node with no reset, and it carries
/// nothing afterwards; undrain brings it back into the route.
#[test]
fn a_drained_node_hands_its_flows_over_without_resets() -> anyhow::Result<()> {
    let test = xdplb_tests::require_privileges!();
    let mut bed = EcmpBed::build(&EcmpOptions::default())?;
    bed.start_all()?;
    let digests = [bed.ring_digest(0)?, bed.ring_digest(1)?];
    assert_eq!(digests[0], digests[1], "the nodes' rings differ");
    let p0 = [bed.vip_packets(0)?, bed.vip_packets(1)?];
    let streams = Streams::start(
        &bed.client.ns,
        vip_socket(),
        &StreamOptions {
            connections: 24,
            duration: Duration::from_secs(8),
            ..StreamOptions::default()
        },
    )?;
    let probes = Probes::start(
        &bed.client.ns,
        vip_socket(),
        Duration::from_millis(50),
        Duration::from_secs(5),
    )?;
    thread::sleep(Duration::from_secs(2));
    let p1 = [bed.vip_packets(0)?, bed.vip_packets(1)?];
    assert!(
        p1[0] > p0[0] && p1[1] > p0[1],
        "both nodes carry flows before the drain: {p0:?} -> {p1:?}"
    );

    let t = std::time::Instant::now();
    let (router, want) = (bed.router.clone(), addrs(&bed, &[1]));
    let watcher = thread::spawn(move || {
        xdplb_tests::load::wait_for(
            "the drained node out of the router's route",
            Duration::from_secs(10),
            Duration::from_millis(5),
            || Ok(router_nexthops(&router)? == want),
        )
    });
    let node: NodeStatus = bed.api_json(0, "POST", "/api/v1/node/drain", None)?;
    let answered = t.elapsed();
    let withdrawn = watcher.join().expect("watcher")?;
    let bgp = node.bgp.expect("[bgp] is configured");
    assert!(bgp.drained && bgp.announced.is_empty(), "{bgp:?}");
    // drain_s = 1: the answer comes after the router has moved the flows.
    assert!(
        withdrawn < answered,
        "drain answered ({answered:?}) before the route lost the node ({withdrawn:?})"
    );
    eprintln!(
        "{test}: the router's route lost the drained node {:.0} ms after the POST; the drain answered after {:.0} ms (drain_s = 1)",
        withdrawn.as_secs_f64() * 1000.0,
        answered.as_secs_f64() * 1000.0
    );
    let q0 = bed.vip_packets(0)?;
    thread::sleep(Duration::from_millis(1500));
    let q1 = bed.vip_packets(0)?;
    assert_eq!(q1, q0, "the drained node still carries VIP packets");

    let report = streams.finish()?;
    let probes = probes.finish()?;
    eprintln!("{test}: {}", report.summary());
    let failed: Vec<_> = report.failed();
    assert!(
        failed.is_empty(),
        "connections failed across the drain: {failed:#?}"
    );
    let bad: Vec<_> = probes.iter().filter(|p| p.outcome.is_err()).collect();
    assert!(
        bad.is_empty() && !probes.is_empty(),
        "{} of {} new connections failed: {bad:?}",
        bad.len(),
        probes.len()
    );
    let p2 = bed.vip_packets(1)?;
    assert!(p2 > p1[1], "the other node took the flows");

    // Undrain: announced again, both nodes in the route.
    let node: NodeStatus = bed.api_json(0, "POST", "/api/v1/node/undrain", None)?;
    assert!(!node.bgp.expect("bgp").drained);
    bed.wait_nexthops(&addrs(&bed, &[0, 1]), Duration::from_secs(5))?;
    Ok(())
}

/// What helps to understand a failure: the survivors' counters, the router's routes,
/// the client's sockets.
fn diagnostics(bed: &EcmpBed, test: &str) {
    let show = |what: &str, r: anyhow::Result<String>| {
        eprintln!(
            "{test}: {what}:\n{}",
            r.unwrap_or_else(|e| format!("{e:#}"))
        );
    };
    for i in 1..bed.nodes.len() {
        show(
            &format!("{} stats", bed.nodes[i].name),
            bed.api(i, "GET", "/api/v1/stats", None).map(|r| r.1),
        );
    }
    show(
        "router routes",
        netns::run(&["ip", "-n", &bed.router, "route"]),
    );
    show(
        "client sockets",
        netns::exec(&bed.client.ns, &["ss", "-tni"]),
    );
}

/// Item 7, sites: lb1 and lb2 are site A, lb3 is site B with `site_prepend = 2`. The
/// router prefers A (shorter AS path; B's route is known but not used); with both A
/// nodes dead, B takes the flows (no connection lost: same rings); when an A node
/// returns, the flows go back to it.
#[test]
fn a_standby_site_serves_only_while_the_primary_site_is_gone() -> anyhow::Result<()> {
    let test = xdplb_tests::require_privileges!();
    let mut bed = EcmpBed::build(&EcmpOptions {
        nodes: 3,
        store_hosts: 0,
    })?;
    let site_b = |bed: &EcmpBed| {
        bed.node_config(2)
            .table("bgp", "site_prepend", 2)
            .table("bgp", "local_as", NODE_AS)
    };
    for i in 0..2 {
        let config = bed.node_config(i);
        bed.start_agent(i, &config)?;
    }
    let config = site_b(&bed);
    bed.start_agent(2, &config)?;
    bed.wait_nexthops(&addrs(&bed, &[0, 1]), SESSION_TIMEOUT)?;
    // B announces, with the longer path; the router knows it but does not use it.
    let vip = format!("{VIP}/32");
    xdplb_tests::load::wait_for(
        "site B's route at the router",
        SESSION_TIMEOUT,
        Duration::from_millis(20),
        || bird::has_route(&bed.router_bird.socket, &vip, "lb3"),
    )?;
    let routes = bed.router_bird.birdc(&["show", "route", &vip, "all"])?;
    assert!(
        routes.contains(&format!("BGP.as_path: {NODE_AS} {NODE_AS} {NODE_AS}")),
        "{routes}"
    );
    let status: NodeStatus = bed.api_json(2, "GET", "/api/v1/node", None)?;
    assert_eq!(
        status.bgp.expect("bgp").announced,
        vec![std::net::IpAddr::V4(VIP)]
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        bed.nexthops()?,
        addrs(&bed, &[0, 1]),
        "site B in the ECMP route"
    );

    let b0 = bed.vip_packets(2)?;
    let streams = Streams::start(
        &bed.client.ns,
        vip_socket(),
        &StreamOptions {
            connections: 20,
            duration: Duration::from_secs(16),
            ..StreamOptions::default()
        },
    )?;
    thread::sleep(Duration::from_secs(2));
    let a = [bed.vip_packets(0)?, bed.vip_packets(1)?];
    assert!(
        a[0] > 0 && a[1] > 0,
        "site A's nodes carry the flows: {a:?}"
    );
    assert_eq!(
        bed.vip_packets(2)?,
        b0,
        "site B carried traffic while A was up"
    );

    // Site A dies.
    let died = bed.kill_node(0)?;
    bed.kill_node(1)?;
    bed.wait_nexthops(&addrs(&bed, &[2]), Duration::from_secs(10))?;
    let to_b = died.elapsed();
    thread::sleep(Duration::from_secs(2));
    let b1 = bed.vip_packets(2)?;
    assert!(b1 > b0, "site B took the flows");

    // lb1 returns: the flows go back to site A.
    let t = std::time::Instant::now();
    let config = bed.node_config(0);
    bed.revive_node(0, &config)?;
    bed.wait_nexthops(&addrs(&bed, &[0]), SESSION_TIMEOUT)?;
    let back = t.elapsed();
    let q0 = bed.vip_packets(2)?;
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        bed.vip_packets(2)?,
        q0,
        "site B still carries traffic with lb1 back"
    );
    let report = streams.finish()?;
    eprintln!(
        "{test}: site A dead -> route via site B after {:.0} ms; lb1 revived (link, BIRD, agent) -> route via lb1 after {:.0} ms",
        to_b.as_secs_f64() * 1000.0,
        back.as_secs_f64() * 1000.0
    );
    eprintln!("{test}: {}", report.summary());
    let failed = report.failed();
    if !failed.is_empty() {
        diagnostics(&bed, test);
    }
    assert!(failed.is_empty(), "connections failed: {failed:#?}");
    Ok(())
}

// --- one desired state in etcd, in the ECMP bed (5(b), 5(c), 5(e)) -------------------

/// `web` on the VIP with `backends` and TCP health checks (200 ms, down after 2 misses).
fn web_with(backends: &[Ipv4Addr]) -> ServiceConfig {
    backends.iter().fold(
        ServiceConfig::new("web", vip_socket())
            .health("{ kind = \"tcp\", interval_ms = 200, timeout_ms = 150, rise = 1, fall = 2 }"),
        |s, &a| s.backend(BackendConfig::new(a)),
    )
}

/// An ECMP bed of two nodes sharing one desired state in a three-member etcd on the
/// store network: etcd started, both agents started with `[cluster]` and `web` =
/// `backends` (lb1 seeds etcd, lb2 finds it there), both in the router's route, both
/// connected with two members.
fn cluster_bed(test: &str, backends: &[Ipv4Addr]) -> anyhow::Result<EcmpBed> {
    let mut bed = EcmpBed::build(&EcmpOptions {
        nodes: 2,
        store_hosts: 3,
    })?;
    let etcd = bed.start_etcd()?;
    for i in 0..2 {
        let mut config = bed.node_config(i);
        config.services = vec![web_with(backends)];
        bed.start_agent(i, &config)?;
    }
    let routed = bed.wait_nexthops(&addrs(&bed, &[0, 1]), SESSION_TIMEOUT)?;
    for i in 0..2 {
        let n = bed.node_api(i);
        wait_for(
            &format!("{} connected with 2 members", n.name),
            Duration::from_secs(10),
            || {
                let c = n.cluster()?;
                Ok(c.store == "connected" && c.members.len() == 2)
            },
        )?;
    }
    eprintln!(
        "{test}: etcd healthy after {:.0} ms; VIP routed through both nodes {:.0} ms after the agents were ready",
        ms(etcd),
        ms(routed)
    );
    Ok(bed)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Packets node `i`'s fast path sent to `backend` (port 80) for `web` so far.
fn backend_packets(bed: &EcmpBed, i: usize, backend: Ipv4Addr) -> anyhow::Result<u64> {
    let stats: Stats = bed.api_json(i, "GET", "/api/v1/stats", None)?;
    Ok(stats
        .traffic
        .and_then(|t| {
            t.services
                .get("web")
                .and_then(|s| s.backends.get(&format!("{backend}:80")).map(|b| b.packets))
        })
        .unwrap_or(0))
}

fn backend_packets_all(bed: &EcmpBed, backend: Ipv4Addr) -> anyhow::Result<[u64; 2]> {
    Ok([
        backend_packets(bed, 0, backend)?,
        backend_packets(bed, 1, backend)?,
    ])
}

/// Prints what the agents logged about the cluster store so far (how each node went
/// through a member's loss).
fn cluster_log_lines(bed: &EcmpBed, test: &str) {
    for n in &bed.nodes {
        for line in n
            .agent_log()
            .lines()
            .filter(|l| l.contains("lb_agent::cluster"))
        {
            eprintln!(
                "{test}: {}: {}",
                n.name,
                line.chars().take(300).collect::<String>()
            );
        }
    }
}

/// `result`, after printing both agents' log tails (and [`diagnostics`]) if it failed.
fn with_logs(bed: &EcmpBed, test: &str, result: anyhow::Result<()>) -> anyhow::Result<()> {
    if let Err(e) = &result {
        for n in &bed.nodes {
            let log = n.agent_log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "--- {}'s log (tail):\n{}",
                n.name,
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
        diagnostics(bed, test);
        eprintln!("{test}: error: {e:#}");
    }
    result
}

/// 5(b): with `[cluster]`, `web` starts with be1 and be2; be3 is added through lb1's
/// API only. lb2 applies it through etcd, both rings are identical slot for slot (be3
/// in them), and 48 connections through both nodes reach be3 through each node (both
/// nodes' stats count packets to be3), none failing.
#[test]
fn a_backend_added_through_one_node_serves_through_both() -> anyhow::Result<()> {
    let test = xdplb_tests::require_privileges!();
    let [be1, be2, be3] = BACKEND_ADDRS;
    let bed = cluster_bed(test, &[be1, be2])?;
    let (n1, n2) = (bed.node_api(0), bed.node_api(1));
    let scenario = (|| -> anyhow::Result<()> {
        let before = same_rings(&n1, &n2, "web", RING)?;
        ensure!(
            slots_of(&before, be3) == 0,
            "be3 in the ring before it was added"
        );
        let p0 = backend_packets_all(&bed, be3)?;

        let t = Instant::now();
        let (status, body) = n1.call(
            "POST",
            "/api/v1/services/web/backends",
            Some(&format!(r#"{{"address": "{be3}"}}"#)),
        )?;
        ensure!(status == 201, "POST backend on lb1: {status} {body}");
        let answered = t.elapsed();
        let applied = wait_for("lb2 has be3 in its ring", Duration::from_secs(2), || {
            Ok(
                n2.service("web")?.ring_digest == n1.service("web")?.ring_digest
                    && weight_of(&n2.service("web")?, be3).is_some(),
            )
        })?;
        let ring = same_rings(&n1, &n2, "web", RING)?;
        ensure!(ring.digest != before.digest, "the ring did not change");
        let share = slots_of(&ring, be3);
        ensure!(
            (RING / 4..RING * 5 / 12).contains(&share),
            "be3 (weight 100 of 300) holds {share} of {RING} slots"
        );
        eprintln!(
            "{test}: POST on lb1 answered after {:.0} ms; lb2's ring equal to lb1's {:.0} ms after the POST; {} slots identical, be3 holds {share}, digest {}",
            ms(answered),
            ms(answered + applied),
            ring.slots.len(),
            ring.digest.as_deref().unwrap_or_default()
        );

        let report = Streams::start(
            &bed.client.ns,
            vip_socket(),
            &StreamOptions {
                connections: 48,
                duration: Duration::from_secs(4),
                ..StreamOptions::default()
            },
        )?
        .finish()?;
        let p1 = backend_packets_all(&bed, be3)?;
        let through = [p1[0] - p0[0], p1[1] - p0[1]];
        eprintln!("{test}: {}", report.summary());
        eprintln!("{test}: packets to be3 through lb1, lb2: {through:?}");
        let failed = report.failed();
        ensure!(failed.is_empty(), "connections failed: {failed:#?}");
        ensure!(
            report.per_server().get("be3").copied().unwrap_or(0) > 0,
            "no connection reached be3: {:?}",
            report.per_server()
        );
        ensure!(
            through[0] > 0 && through[1] > 0,
            "be3 did not get traffic through both nodes: {through:?}"
        );
        same_rings(&n1, &n2, "web", RING)?;
        Ok(())
    })();
    with_logs(&bed, test, scenario)
}

/// 5(c): 24 connections stream through both nodes while etcd loses one member, its
/// leader (a write on lb2 succeeds and reaches lb1, both stay connected), then every member (both nodes
/// say `store: unreachable`, writes answer 503 and change nothing, rings unchanged,
/// both nodes keep forwarding), then etcd returns (both resync, a write spreads again).
/// No connection fails through any of it.
#[test]
fn losing_etcd_costs_no_connection_and_writes_wait_for_it() -> anyhow::Result<()> {
    let test = xdplb_tests::require_privileges!();
    let [be1, be2, _] = BACKEND_ADDRS;
    let mut bed = cluster_bed(test, &BACKEND_ADDRS)?;
    let (n1, n2) = (bed.node_api(0), bed.node_api(1));
    // Long enough for the whole scenario (checked below); it stops by itself.
    let duration = Duration::from_secs(16);
    let started = Instant::now();
    let streams = Streams::start(
        &bed.client.ns,
        vip_socket(),
        &StreamOptions {
            connections: 24,
            duration,
            ..StreamOptions::default()
        },
    )?;
    let scenario = (|| -> anyhow::Result<()> {
        let q0 = [bed.vip_packets(0)?, bed.vip_packets(1)?];
        thread::sleep(Duration::from_millis(1500));
        let q1 = [bed.vip_packets(0)?, bed.vip_packets(1)?];
        ensure!(
            q1[0] > q0[0] && q1[1] > q0[1],
            "both nodes carry flows: {q0:?} -> {q1:?}"
        );

        // One member lost: the leader, the harder case (the others have no leader
        // until they elect one).
        let leader = bed.etcd_mut().leader()?;
        bed.etcd_mut().stop(leader)?;
        let t = Instant::now();
        let (s, b) = n2.patch("web", be1, r#"{"weight": 110}"#)?;
        let answered = t.elapsed();
        ensure!(s == 200, "PATCH on lb2 with one etcd member down: {s} {b}");
        // Bounded by the agent's request timeout (2 s): lb1's watch was on the
        // stopped member and its session is set up again over the others first
        // (measured here: ~0.93 s; the README has the figures).
        let took = wait_for(
            "lb1 applies lb2's change with one member down",
            Duration::from_secs(2),
            || Ok(weight_of(&n1.service("web")?, be1) == Some(110)),
        )?;
        wait_for("rings equal", Duration::from_secs(1), || {
            Ok(n1.service("web")?.ring_digest == n2.service("web")?.ring_digest)
        })?;
        same_rings(&n1, &n2, "web", RING)?;
        for n in [&n1, &n2] {
            ensure!(
                n.cluster()?.store == "connected",
                "{} lost the store with one member down",
                n.name
            );
        }
        eprintln!(
            "{test}: one etcd member down (e{}, the leader): a write on lb2 answered 200 after {:.0} ms, applied on lb1 {:.0} ms later, rings equal",
            leader + 1,
            ms(answered),
            ms(took)
        );
        cluster_log_lines(&bed, test);
        bed.etcd_mut().restart(leader)?;
        bed.etcd_mut().wait_healthy(Duration::from_secs(15))?;

        // Every member lost.
        let kept = same_rings(&n1, &n2, "web", RING)?;
        let lost = Instant::now();
        for i in 0..3 {
            bed.etcd_mut().stop(i)?;
        }
        let noticed = wait_for(
            "both nodes say the store is unreachable",
            Duration::from_secs(10),
            || Ok(n1.cluster()?.store == "unreachable" && n2.cluster()?.store == "unreachable"),
        )?;
        for n in [&n1, &n2] {
            let m = n.metrics()?;
            ensure!(
                m.contains("xdplb_cluster_store_up 0"),
                "{}: xdplb_cluster_store_up not 0",
                n.name
            );
        }
        let w = weight_of(&n1.service("web")?, be2);
        let (s, b) = n1.patch("web", be2, r#"{"weight": 50}"#)?;
        ensure!(s == 503, "PATCH on lb1 without etcd: {s} {b}");
        let (s, b) = n2.call(
            "POST",
            "/api/v1/services/web/backends",
            Some(r#"{"address": "198.18.1.14"}"#),
        )?;
        ensure!(s == 503, "POST backend on lb2 without etcd: {s} {b}");
        let p0 = [bed.vip_packets(0)?, bed.vip_packets(1)?];
        thread::sleep(Duration::from_millis(1000));
        let p1 = [bed.vip_packets(0)?, bed.vip_packets(1)?];
        ensure!(
            p1[0] > p0[0] && p1[1] > p0[1],
            "a node stopped forwarding without etcd: {p0:?} -> {p1:?}"
        );
        ensure!(
            weight_of(&n1.service("web")?, be2) == w && weight_of(&n2.service("web")?, be2) == w,
            "the refused PATCH changed be2's weight"
        );
        let ring = same_rings(&n1, &n2, "web", RING)?;
        ensure!(
            ring.slots == kept.slots,
            "the rings changed while etcd was away"
        );
        eprintln!(
            "{test}: all etcd members down: both nodes said `unreachable` after {:.0} ms; writes 503, rings unchanged, VIP packets per node in 1 s without etcd: {:?}",
            ms(noticed),
            [p1[0] - p0[0], p1[1] - p0[1]]
        );

        // etcd back: both resync and take writes again.
        let etcd = bed.etcd_mut();
        for i in 0..3 {
            etcd.restart(i)?;
        }
        let t = Instant::now();
        etcd.wait_healthy(Duration::from_secs(20))?;
        let healthy = t.elapsed();
        let resynced = wait_for(
            "both nodes connected again",
            Duration::from_secs(10),
            || Ok(n1.cluster()?.store == "connected" && n2.cluster()?.store == "connected"),
        )?;
        let (s, b) = n2.patch("web", be2, r#"{"weight": 120}"#)?;
        ensure!(s == 200, "PATCH after etcd returned: {s} {b}");
        wait_for("lb1 applies it", Duration::from_secs(1), || {
            Ok(weight_of(&n1.service("web")?, be2) == Some(120))
        })?;
        wait_for("rings equal at the end", Duration::from_secs(1), || {
            Ok(n1.service("web")?.ring_digest == n2.service("web")?.ring_digest)
        })?;
        same_rings(&n1, &n2, "web", RING)?;
        eprintln!(
            "{test}: etcd restarted: healthy after {:.0} ms, both nodes connected {:.0} ms later; etcd was away {:.1} s in all; a write spreads again",
            ms(healthy),
            ms(resynced),
            lost.elapsed().as_secs_f64()
        );
        let elapsed = started.elapsed();
        ensure!(
            elapsed + Duration::from_millis(500) < duration,
            "the streams ended before etcd returned ({elapsed:?}): lengthen them"
        );
        eprintln!(
            "{test}: the scenario took {:.1} s of the streams' {:.0} s",
            elapsed.as_secs_f64(),
            duration.as_secs_f64()
        );
        Ok(())
    })();
    let scenario = with_logs(&bed, test, scenario);
    let report = streams.finish()?;
    scenario?;
    eprintln!("{test}: {}", report.summary());
    let failed = report.failed();
    if !failed.is_empty() {
        diagnostics(&bed, test);
    }
    assert!(failed.is_empty(), "connections failed: {failed:#?}");
    assert_eq!(report.resets(), 0);
    Ok(())
}

/// 5(e): be3 cut off from lb2's health checks only (nftables in lb2's namespace drops
/// what lb2 itself sends to be3:80; the fast path's IPIP packets leave by XDP_TX and
/// never pass nftables): lb2 counts it (`local_down`, `xdplb_backend_local_down 1`) and
/// publishes it, but one node of two is no majority, so both rings stay as they were,
/// digest and slots, and 48 connections keep streaming, those to be3 through both
/// nodes included.
#[test]
fn a_backend_one_node_cannot_reach_stays_in_both_rings() -> anyhow::Result<()> {
    let test = xdplb_tests::require_privileges!();
    let [_, _, be3] = BACKEND_ADDRS;
    let bed = cluster_bed(test, &BACKEND_ADDRS)?;
    let (n1, n2) = (bed.node_api(0), bed.node_api(1));
    let before = same_rings(&n1, &n2, "web", RING)?;
    ensure!(slots_of(&before, be3) > 0, "be3 has no slot");
    let streams = Streams::start(
        &bed.client.ns,
        vip_socket(),
        &StreamOptions {
            connections: 48,
            duration: Duration::from_secs(7),
            ..StreamOptions::default()
        },
    )?;
    let mut cut = false;
    let scenario = (|| -> anyhow::Result<()> {
        thread::sleep(Duration::from_millis(1000));
        nft_drop_towards(&n2.ns, be3)?;
        cut = true;
        let p0 = backend_packets_all(&bed, be3)?;
        let noticed = wait_for("lb2 sees be3 down locally", Duration::from_secs(5), || {
            Ok(live_of(&n2.service("web")?, be3).local_down)
        })?;
        // Published and seen by lb1: lb2's view names be3.
        wait_for("lb1 sees lb2's view", Duration::from_secs(2), || {
            Ok(n1
                .cluster()?
                .members
                .iter()
                .any(|m| m.node == "lb2" && m.down == [format!("web/{be3}:80")]))
        })?;
        // For 2 s the rings stay what they were on both nodes.
        let mut samples = 0;
        let watch = Instant::now();
        while watch.elapsed() < Duration::from_secs(2) {
            for n in [&n1, &n2] {
                let svc = n.service("web")?;
                ensure!(
                    svc.ring_digest == before.digest,
                    "{}'s ring changed with be3 down on lb2 only",
                    n.name
                );
                let live = live_of(&svc, be3);
                ensure!(
                    live.serving && live.healthy,
                    "{}: be3 left the ring on one node's view: {live:?}",
                    n.name
                );
            }
            samples += 1;
            thread::sleep(Duration::from_millis(100));
        }
        let ring = same_rings(&n1, &n2, "web", RING)?;
        ensure!(ring.slots == before.slots, "the rings changed");
        ensure!(
            !live_of(&n1.service("web")?, be3).local_down,
            "lb1 counts be3 down"
        );
        let line = format!("xdplb_backend_local_down{{service=\"web\",backend=\"{be3}:80\"}} 1");
        ensure!(n2.metrics()?.contains(&line), "lb2's metrics lack {line}");
        let p1 = backend_packets_all(&bed, be3)?;
        let through = [p1[0] - p0[0], p1[1] - p0[1]];
        ensure!(
            through[0] > 0 && through[1] > 0,
            "be3 did not keep getting traffic through both nodes: {through:?}"
        );
        eprintln!(
            "{test}: be3 cut off from lb2: lb2 counted it down after {:.0} ms; rings equal to before on both nodes in {samples} samples over 2 s and slot by slot ({} slots, be3 holds {}); packets to be3 meanwhile through lb1, lb2: {through:?}",
            ms(noticed),
            ring.slots.len(),
            slots_of(&ring, be3)
        );
        Ok(())
    })();
    let scenario = with_logs(&bed, test, scenario);
    if cut {
        nft_clear(&n2.ns)?;
    }
    let back = wait_for("lb2 sees be3 up again", Duration::from_secs(5), || {
        Ok(!live_of(&n2.service("web")?, be3).local_down)
    });
    let report = streams.finish()?;
    scenario?;
    eprintln!("{test}: {}", report.summary());
    let failed = report.failed();
    assert!(failed.is_empty(), "connections failed: {failed:#?}");
    assert!(
        report.per_server().get("be3").copied().unwrap_or(0) > 0,
        "no connection went to be3: {:?}",
        report.per_server()
    );
    let back = back?;
    eprintln!(
        "{test}: nftables rule removed: lb2 sees be3 up again after {:.0} ms",
        ms(back)
    );
    same_rings(&n1, &n2, "web", RING)?;
    Ok(())
}
