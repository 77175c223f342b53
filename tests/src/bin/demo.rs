//! `xdplb-demo` (run by `cargo xtask demo`): builds the step-1 test bed in network
//! namespaces, starts the agent on the LB, sends HTTP requests from the client to the
//! VIP, prints what happened, and removes everything again.
//!
//! ```text
//! xdplb-demo [--xdp-mode auto|native|skb] [--requests N] [--parallel N]
//! ```
//!
//! The agent binary comes from `XDPLB_AGENT_BIN` (else `target/release/lb-agent`).
//! Exit status 0 when every check passed, 1 when one failed, 2 on a usage error.

use std::{process::ExitCode, time::Duration};

use clap::{Parser, ValueEnum};
use xdplb_tests::{
    capture::CaptureStats,
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
    match run(&args) {
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
    }
}
