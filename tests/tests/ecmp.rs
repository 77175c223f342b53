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
    capture,
    ecmp_bed::{EcmpBed, EcmpOptions, FailoverOptions, node_failover, vip_socket},
    stream::{Probes, StreamOptions, Streams},
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
    let node: NodeStatus = bed.api_json(0, "POST", "/api/v1/node/drain", None)?;
    let answered = t.elapsed();
    let bgp = node.bgp.expect("[bgp] is configured");
    assert!(bgp.drained && bgp.announced.is_empty(), "{bgp:?}");
    // drain_s = 1: the answer comes after the router has moved the flows.
    let moved = bed.wait_nexthops(&addrs(&bed, &[1]), Duration::from_secs(5))?;
    eprintln!(
        "{test}: drain answered after {:.0} ms; the router's route had lost the node {:.0} ms after that",
        answered.as_secs_f64() * 1000.0,
        moved.as_secs_f64() * 1000.0
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
