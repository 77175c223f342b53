//! `xdplb-demo` (run by `cargo xtask demo`): builds the step-1 test bed in network
//! namespaces, starts the agent on the LB, sends HTTP requests from the client to the
//! VIP, prints what happened, and removes everything again.
//!
//! ```text
//! xdplb-demo [--xdp-mode auto|native|skb] [--requests N] [--parallel N]
//! xdplb-demo --cluster
//! ```
//!
//! `--cluster` (`cargo xtask demo --cluster`) shows several LB nodes instead: two
//! nodes behind a router that spreads flows over them by ECMP (BGP and BFD through
//! BIRD 2), long-lived TCP connections through both, then one node dies and the
//! connections carry on through the other (see `xdplb_tests::ecmp_bed`).
//!
//! The agent binary comes from `XDPLB_AGENT_BIN` (else `target/release/lb-agent`).
//! Exit status 0 when every check passed, 1 when one failed, 2 on a usage error.

use std::{process::ExitCode, time::Duration};

use clap::{Parser, ValueEnum};
use xdplb_tests::{
    capture::CaptureStats,
    ecmp_bed::{EcmpBed, EcmpOptions, FailoverOptions, node_failover},
    netns,
    scenario::{self, BedOptions, L4Bed, L4Outcome, LoadOptions},
    topology::{VIP, vip_socket},
};

/// Builds the step-1 test bed in network namespaces, starts the agent on the LB, sends
/// HTTP requests from the client to the VIP, prints what happened, and removes
/// everything again. Needs root. Exit status 0 when every check passed, 1 when one
/// failed, 2 on a usage error.
#[derive(Debug, Parser)]
#[command(name = "xdplb-demo")]
struct Args {
    /// How the agent attaches XDP (the agent's default when not given).
    #[arg(long, value_enum, value_name = "MODE")]
    xdp_mode: Option<XdpMode>,
    /// HTTP GETs to send, each on its own TCP connection.
    #[arg(long, value_name = "N", default_value_t = 300,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    requests: usize,
    /// Requests in flight at a time.
    #[arg(long, value_name = "N", default_value_t = 4,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    parallel: usize,
    /// Show several LB nodes behind ECMP instead: two nodes, long-lived connections,
    /// one node killed (needs bird2: `cargo xtask setup`).
    #[arg(long, conflicts_with_all = ["xdp_mode", "requests", "parallel"])]
    cluster: bool,
}

/// `--xdp-mode` values (the agent's `--xdp-mode` without `off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum XdpMode {
    Auto,
    Native,
    Skb,
}

impl XdpMode {
    fn as_str(self) -> &'static str {
        match self {
            XdpMode::Auto => "auto",
            XdpMode::Native => "native",
            XdpMode::Skb => "skb",
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let missing = netns::missing_privileges();
    if !missing.is_empty() {
        eprintln!(
            "error: the demo builds network namespaces and needs root; missing: {}",
            missing.join(", ")
        );
        return ExitCode::FAILURE;
    }
    let result = if args.cluster {
        run_cluster()
    } else {
        run(&args)
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the demo; `Ok(false)` when a check failed.
fn run(args: &Args) -> anyhow::Result<bool> {
    let mut opts = BedOptions::default();
    opts.agent.xdp_mode = args.xdp_mode.map(|m| m.as_str().to_owned());
    let expected = scenario::expected_shares(&opts.config, "web");

    println!("xdplb demo: step 1, an L4 load balancer with direct server return\n");
    println!(
        "Building the test bed (network namespaces, veths, a bridge; nothing in the root namespace)..."
    );
    let bed = L4Bed::start(&opts)?;
    let namespaces = bed.topo.namespaces();
    println!("\n{}", bed.topo.diagram());
    println!(
        "Agent running in {} (xdp mode: {}); backends decapsulate IPIP with `lb-agent decap`.\n",
        bed.topo.lb.ns,
        args.xdp_mode.map_or("default", XdpMode::as_str)
    );
    println!(
        "Sending {} HTTP GETs to {} from {} ({} at a time, each its own TCP connection)...",
        args.requests,
        vip_socket(),
        bed.topo.client.ns,
        args.parallel
    );
    let load = LoadOptions {
        requests: args.requests,
        parallel: args.parallel,
        deadline: Duration::from_secs(300),
    };
    let outcome = bed.measure(&load)?;
    let log_tail = bed.topo.agent_log_tail(15);
    drop(bed);
    let leftover: Vec<String> = netns::list_namespaces()?
        .into_iter()
        .filter(|n| namespaces.contains(n))
        .collect();

    print_report(&outcome, &expected);
    println!("\nAgent log (last lines):");
    for line in log_tail.lines() {
        println!("  | {line}");
    }
    let mut problems = outcome.problems(&expected);
    if !leftover.is_empty() {
        problems.push(format!("namespaces left behind: {leftover:?}"));
    }
    println!(
        "\nCleanup: {} namespaces removed{}",
        namespaces.len(),
        if leftover.is_empty() {
            ", none left"
        } else {
            ""
        }
    );
    if problems.is_empty() {
        println!(
            "\nRESULT: PASS, every request answered, shared as expected, replies bypassed the LB."
        );
        Ok(true)
    } else {
        println!("\nRESULT: FAIL");
        for p in &problems {
            println!("  - {p}");
        }
        Ok(false)
    }
}

/// `--cluster`: the ECMP story; `Ok(false)` when a check failed.
fn run_cluster() -> anyhow::Result<bool> {
    println!("xdplb demo: several LB nodes behind ECMP, and one of them dies\n");
    println!(
        "Building the test bed: a router running BIRD 2 (BGP + BFD, ECMP over a 5-tuple hash), \
         two LB nodes each running lb-agent and its own BIRD, three backends..."
    );
    let mut bed = EcmpBed::build(&EcmpOptions::default())?;
    let namespaces = bed.namespaces();
    println!("\n{}", bed.diagram());
    let announced = bed.start_all()?;
    println!(
        "Both agents are up and announce {VIP}/32 through their BIRD; the router's kernel route \
         has both nodes as next hops ({:.0} ms after the second agent was ready):",
        announced.as_secs_f64() * 1000.0
    );
    let route = netns::run(&[
        "ip",
        "-n",
        &bed.router,
        "route",
        "show",
        &format!("{VIP}/32"),
    ])?;
    for line in route.lines() {
        println!("  | {line}");
    }
    let opts = FailoverOptions::default();
    let (conns, secs) = (
        opts.streams.connections,
        opts.streams.duration.as_secs_f64(),
    );
    println!(
        "\nOpening {conns} TCP connections from the client to {} that stream data for {secs:.0} s \
         (every byte echoed by the backend and checked); a new connection every {} ms meanwhile.",
        vip_socket(),
        opts.probe_every.as_millis()
    );
    println!(
        "After {:.1} s, {} dies: its link goes down, its BIRD and its agent are killed.",
        opts.before.as_secs_f64(),
        bed.nodes[opts.victim].name
    );
    let outcome = node_failover(&mut bed, &opts)?;
    let names: Vec<String> = bed.nodes.iter().map(|n| n.name.clone()).collect();
    let log_tail: Vec<String> = bed.nodes[1]
        .agent_log()
        .lines()
        .rev()
        .take(5)
        .map(str::to_owned)
        .collect();
    drop(bed);
    let leftover: Vec<String> = netns::list_namespaces()?
        .into_iter()
        .filter(|n| namespaces.contains(n))
        .collect();

    println!(
        "\nBoth nodes carried flows before (VIP packets through each node's XDP, from its agent's /api/v1/stats):"
    );
    for (name, (before, after)) in names
        .iter()
        .zip(outcome.packets_before.iter().zip(&outcome.packets_after))
    {
        let after = after.map_or_else(|| "dead".to_owned(), |n| n.to_string());
        println!("  {name:<4} before the death {before:>7}   after {after:>7}");
    }
    println!(
        "Both nodes have the same ring for service web (ring_digest): {}",
        if outcome.digests.windows(2).all(|w| w[0] == w[1]) {
            format!("yes, {}", outcome.digests[0].get(..16).unwrap_or_default())
        } else {
            format!("NO: {:?}", outcome.digests)
        }
    );
    println!("\nWhat happened:");
    for line in outcome.figures() {
        println!("  - {line}");
    }
    println!(
        "\nThe flows of the dead node reached the other node, which has the same Maglev ring, \
         so they landed on the same backends and the backends' TCP connections carried on."
    );
    println!("\nSurviving agent's log (last lines):");
    for line in log_tail.iter().rev() {
        println!("  | {line}");
    }
    let mut problems = outcome.problems(opts.victim);
    if !leftover.is_empty() {
        problems.push(format!("namespaces left behind: {leftover:?}"));
    }
    println!(
        "\nCleanup: {} namespaces removed{}",
        namespaces.len(),
        if leftover.is_empty() {
            ", none left"
        } else {
            ""
        }
    );
    if problems.is_empty() {
        println!(
            "\nRESULT: PASS, no connection lost when a node died; new connections succeeded throughout."
        );
        Ok(true)
    } else {
        println!("\nRESULT: FAIL");
        for p in &problems {
            println!("  - {p}");
        }
        Ok(false)
    }
}

fn print_report(o: &L4Outcome, expected: &std::collections::BTreeMap<String, f64>) {
    let l = &o.load;
    println!(
        "\nRequests: {} sent, {} answered, {} failed, {} not attempted, in {:.2} s",
        l.requested,
        l.ok,
        l.failed,
        l.not_attempted,
        l.elapsed.as_secs_f64()
    );
    for (n, e) in &l.failures {
        println!("  failure #{n}: {e}");
    }
    println!(
        "\nPer backend:      answers  expected (bounds)        served  VIP frames sent to router"
    );
    for (name, share) in expected {
        let got = l.per_backend.get(name).copied().unwrap_or(0);
        let (lo, hi) = scenario::share_bounds(l.requested, *share);
        let bar = "#".repeat(got * 40 / l.requested.max(1));
        println!(
            "  {name:<6} {got:>14}  {:>8.1} ({lo:>5.1}..{hi:>5.1})  {:>8}  {:>8}  {bar}",
            share * l.requested as f64,
            o.served.get(name).copied().unwrap_or(0),
            o.replies_from_backends.get(name).map_or(0, |c| c.matched)
        );
    }
    let show = |c: &CaptureStats| format!("{} (of {} frames seen)", c.matched, c.seen);
    println!("\nWhere frames from the VIP {VIP} went (counted with packet sockets, after XDP):");
    println!("  backends -> router:            {}", show_sum(o));
    println!(
        "  router -> client:              {}",
        show(&o.vip_frames_to_client)
    );
    println!(
        "  LB -> router:                  {}   (expected 0)",
        show(&o.vip_frames_from_lb)
    );
    println!(
        "  into the LB's stack:           {}   (expected 0)",
        show(&o.vip_frames_into_lb)
    );
}

fn show_sum(o: &L4Outcome) -> String {
    let m: u64 = o.replies_from_backends.values().map(|c| c.matched).sum();
    format!("{m}")
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn arguments_parse_as_before() {
        Args::command().debug_assert();
        let a = |v: &[&str]| Args::try_parse_from(["xdplb-demo"].iter().chain(v));
        let d = a(&[]).unwrap();
        assert_eq!((d.xdp_mode, d.requests, d.parallel), (None, 300, 4));
        let s = a(&["--xdp-mode=skb", "--requests", "10", "--parallel=2"]).unwrap();
        assert_eq!(
            (s.xdp_mode, s.requests, s.parallel),
            (Some(XdpMode::Skb), 10, 2)
        );
        assert!(a(&["--xdp-mode", "off"]).is_err());
        assert!(a(&["--requests", "0"]).is_err());
        assert!(a(&["--parallel", "0"]).is_err());
        assert!(a(&["--bogus"]).is_err());
        assert!(a(&["--cluster"]).unwrap().cluster);
        assert!(!d.cluster);
        assert!(a(&["--cluster", "--requests", "5"]).is_err());
    }
}
