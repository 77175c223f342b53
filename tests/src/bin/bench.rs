//! `xdplb-bench` (run by `cargo xtask bench WHAT`): benchmarks of the fast path, of
//! failover and of the L7 proxy.
//!
//! ```text
//! xdplb-bench xdp [--repeat N] [--runs K]
//! xdplb-bench failover [--runs N]
//! xdplb-bench cluster [--nodes 2,4,8] [--rounds R]
//! xdplb-bench wire [--runs N] [--duration S] [--sizes 64,1514]
//! xdplb-bench control [--runs N]
//! xdplb-bench l7 [--duration S] [--connections N] [--threads T] [--warmup S]
//! ```
//!
//! `failover` (module [`failover`]): for a few health-check settings, a backend dies
//! under client traffic through the real agent in the namespace test bed; prints the
//! time to the agent's reaction and to the last failed connection, and how many failed.
//!
//! `l7` (module [`l7`]): requests/s and p50/p99 latency (wrk) of the agent's HTTP
//! reverse proxy, HAProxy and nginx on loopback in front of the same two backends,
//! without and with cache hits, and wrk straight at a backend; one table with ratios.
//! Needs haproxy, nginx and wrk (`cargo xtask bench l7` installs them from Debian), not
//! root. `xdplb-bench l7-backend --port P [--name N]` is its backend (internal).
//!
//!
//! `xdp` (module [`xdp`]): ns per packet of `xdp_lb` beside floor programs through
//! `BPF_PROG_TEST_RUN`; its module documentation explains the method.

use std::process::ExitCode;

use anyhow::ensure;
use clap::{CommandFactory as _, Parser, Subcommand, error::ErrorKind};
use xdplb_tests::netns;

#[path = "bench/cluster.rs"]
mod cluster;
#[path = "bench/control.rs"]
mod control;
#[path = "bench/failover.rs"]
mod failover;
#[path = "bench/katran.rs"]
mod katran;
#[path = "bench/l7.rs"]
mod l7;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/wire.rs"]
mod wire;
#[path = "bench/xdp.rs"]
mod xdp;
#[path = "bench/xdp_custom.rs"]
mod xdp_custom;

/// `xdplb-bench`: benchmarks of the fast path, of failover and of the L7 proxy.
#[derive(Debug, Parser)]
#[command(
    name = "xdplb-bench",
    about = "Benchmarks of xdplb's fast path, of failover and of the L7 proxy (run by `cargo xtask bench WHAT`)"
)]
struct Cli {
    #[command(subcommand)]
    benchmark: Benchmark,
}

#[derive(Debug, Subcommand)]
enum Benchmark {
    /// ns/packet of xdp_lb beside floor programs, through BPF_PROG_TEST_RUN (needs root).
    ///
    /// N iterations per run; the figures are medians of K runs.
    Xdp(xdp::Args),
    /// A backend dies under traffic, for a few health settings (needs root).
    ///
    /// Prints the time to the agent's reaction and to the last failed connection, and the
    /// connections failed: median and min of N runs per setting.
    Failover(failover::Args),
    /// req/s and p50/p99 latency of xdplb's L7 proxy beside HAProxy and nginx (not root).
    ///
    /// wrk against each proxy on loopback in front of the same two backends, without and
    /// with cache hits, beside wrk straight at a backend; one table with ratios. Needs
    /// haproxy, nginx and wrk: `cargo xtask bench l7` installs them from Debian.
    L7(l7::Args),
    /// N LB nodes sharing one state in etcd: API change → every node's ring (needs root).
    ///
    /// For N = 2, 4, 8 (`--nodes`): agents with XDP in namespaces, a three-member etcd;
    /// the time until every node has the new ring, and how much of a joining node's
    /// ring differs from the others'.
    Cluster(cluster::Args),
    /// Packets/s forwarded by one LB core on veths, xdplb beside nftables DNAT (needs root).
    ///
    /// Three namespaces (generator, LB, backends), the kernel's live-frames generator,
    /// the LB's NAPI thread pinned to one CPU; arrivals counted at the backends' side.
    Wire(wire::Args),
    /// Control plane: ring builds, API change → map, 10,000 backends (needs root).
    ///
    /// Ring builds in this process; the rest against the real agent in the step-1 bed,
    /// reading its pinned maps.
    Control(control::Args),
    /// (internal) the backend `l7` starts: HTTP/1.1 on 127.0.0.1:P.
    #[command(name = "l7-backend")]
    L7Backend(l7::BackendArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.benchmark {
        Benchmark::Xdp(args) => privileged().and_then(|()| xdp::run(args)),
        Benchmark::Failover(args) => privileged().and_then(|()| failover::run(args)),
        Benchmark::Cluster(args) => privileged().and_then(|()| cluster::run(args)),
        Benchmark::Wire(args) => privileged().and_then(|()| wire::run(args)),
        Benchmark::Control(args) => privileged().and_then(|()| control::run(args)),
        Benchmark::L7(args) => {
            if let Err(e) = args.check() {
                Cli::command().error(ErrorKind::ValueValidation, e).exit();
            }
            l7::run(args)
        }
        Benchmark::L7Backend(args) => l7::run_backend(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Fails with a clear message unless this process may load BPF programs and build a
/// namespace.
fn privileged() -> anyhow::Result<()> {
    let missing = netns::missing_privileges();
    ensure!(
        missing.is_empty(),
        "the benchmark loads BPF programs into network namespaces it builds and needs root; missing: {}",
        missing.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent_and_parses_xdp_flags() {
        Cli::command().debug_assert();
        let xdp = |v: &[&str]| {
            let argv = ["xdplb-bench", "xdp"].iter().chain(v);
            Cli::try_parse_from(argv).map(|cli| match cli.benchmark {
                Benchmark::Xdp(a) => (a.repeat, a.runs),
                other => panic!("parsed as {other:?}"),
            })
        };
        assert_eq!(xdp(&[]).unwrap(), (xdp::DEFAULT_REPEAT, xdp::DEFAULT_RUNS));
        assert_eq!(xdp(&["--repeat", "2_000", "--runs=3"]).unwrap(), (2000, 3));
        assert!(xdp(&["--repeat", "999"]).is_err());
        assert!(xdp(&["--runs", "52"]).is_err());
        assert!(xdp(&["--bogus"]).is_err());
        assert!(Cli::try_parse_from(["xdplb-bench"]).is_err());
        assert!(Cli::try_parse_from(["xdplb-bench", "nope"]).is_err());
    }
}
