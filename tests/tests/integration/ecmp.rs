//! Several LB nodes behind ECMP (issue 10, items 4, 5(a), 5(d)): the bed of
//! [`xdplb_tests::ecmp_bed`] (a router with BIRD 2, ECMP and BFD; LB nodes each with
//! the agent and its own BIRD; backends with echo servers), and long-lived TCP
//! connections that must survive a node's death and a node's drain.
//!
//! The figures (withdrawal time, longest stall, ...) are printed: run with
//! `-- --nocapture` to see them.

use std::{collections::BTreeSet, net::Ipv4Addr, thread, time::Duration};

use lb_agent::api::types::NodeStatus;
use xdplb_tests::{
    bird, capture,
    ecmp_bed::{
        EcmpBed, EcmpOptions, FailoverOptions, NODE_AS, SESSION_TIMEOUT, node_failover,
        router_nexthops, vip_socket,
    },
    netns,
    stream::{Probes, StreamOptions, Streams},
    topology::VIP,
};

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
