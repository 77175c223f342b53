//! `xdplb-bench` (run by `cargo xtask bench WHAT`): benchmarks of the fast path, of
//! failover and of the L7 proxy.
//!
//! ```text
//! xdplb-bench xdp [--repeat N] [--runs K]
//! xdplb-bench failover [--runs N]
//! xdplb-bench cluster [--nodes 2,4,8] [--rounds R]
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
//! # `xdp`: nanoseconds per packet through `BPF_PROG_TEST_RUN`
//!
//! Prints one table: `xdp_lb` on a new-flow SYN, an established flow (next hops from
//! the `NEXT_HOPS` map, written as the agent does, and once more with that map empty:
//! `bpf_fib_lookup` for every packet) and a non-VIP packet, beside floor programs built in the same run by the same compiler
//! (`lb-ebpf/src/floors.rs`): XDP_PASS; parse + swap MACs + XDP_TX; parse + one hash
//! lookup + IPIP encapsulation + XDP_TX. Ratios are to the last floor. It is a
//! measurement, not a test: nothing is asserted about speed.
//!
//! Method (DESIGN.md, "Toolchain"): with `repeat = N` the kernel runs the program N
//! times on the same buffer without resetting it, so an encapsulating program would see
//! its own output from the second iteration on. Every program P therefore runs behind
//! the wrapper `bench_wrap` (floors object), which strips the previous iteration's outer
//! IPIP header, restores the original Ethernet header, optionally writes a new TCP
//! source port (new flow every iteration), and tail-calls P from the program array
//! `BENCH_PROGS`. For each P:
//! - raw = T(wrapper -> P), the kernel's own ns per iteration of a `test_run` with
//!   `repeat = N` (default 1,000,000); median of K runs (default 7);
//! - net = raw(P) - raw(wrapper -> `floor_pass`): P's own cost (for the new-flow rows
//!   the baseline is `floor_pass` with the wrapper writing a new port too);
//! - direct = T(P) without the wrapper, for programs whose cost does not depend on
//!   what the previous iteration left (XDP_PASS, the MAC swap, `xdp_lb` on a non-VIP
//!   packet);
//! - wall = wall-clock time of the whole `test_run` syscall / N (fractions of a ns).
//!
//! Runs of the different programs are interleaved (run 1 of every program, then run 2,
//! ...), so slow drift of the machine spreads over all of them. After every run the
//! verdict and output frame of the last iteration are checked (XDP_TX and a correct
//! IPIP packet to the backend the hash oracle predicts, or XDP_PASS and an untouched
//! frame), and so are `xdp_lb`'s counters (every iteration counted; no new flow on
//! the established path): a benchmark of a broken path is worthless, so a failed
//! check aborts.
//!
//! Everything runs on one thread inside a fresh network namespace that gives
//! `bpf_fib_lookup` a route and static neighbours for the backends (forwarding on for
//! the ingress interface), pinned to the CPU it starts on: XDP `test_run` accepts no
//! `BPF_F_TEST_RUN_ON_CPU` (and aya 0.14's `TestRunAttrs` has no CPU field), but it
//! runs on the calling CPU, so pinning the thread pins the measurement. The namespace
//! guard removes everything on exit.
//!
//! Flow tables: the flow table is per-CPU LRU (`BPF_F_NO_COMMON_LRU`), so one CPU sees
//! `size / possible CPUs` entries. The wrapper's source port wraps every 65,536
//! iterations; with a production-sized table (2^20) the same ports come back while still
//! cached, so after the first 65,536 iterations a "SYN" row is a flow-table hit. The
//! table therefore shows the SYN case twice: with 2^20 entries (share of real new flows
//! printed), and with a table of 32,768 entries per CPU, fewer than the ports in one
//! cycle, where every iteration is a miss, a ring lookup and an LRU insert that evicts
//! (as in production once the table is full). The share of new flows is counted by
//! `xdp_lb`'s own `flow_new` counter. A SYN is recorded in the new-flow table (flows
//! enter the flow table on their second packet), which the bench sizes as the flow
//! table, so "table" above is that one for the SYN rows; the established row is
//! primed with two packets and then hits the flow table.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::ExitCode,
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, ProgramArray},
    programs::{ProgramFd, Xdp},
};
use clap::{CommandFactory as _, Parser, Subcommand, error::ErrorKind};
use lb_agent::{
    config::Protocol,
    dataplane::{
        desired::{DesiredBackend, DesiredService, DesiredState},
        forwarding::InterfaceForwarding,
        loader::{Capacities, FLOORS_OBJECT, LB_PROGRAM},
        stats::Counters,
    },
};
use lb_common::{
    stats::Counter,
    types::{NEXT_HOP_F_VALID, NextHopEntry},
};

/// Prints `rows` under `header` as one `|`-separated table, each column as wide as its
/// widest cell; `right[i]` right-aligns column `i` (numbers).
fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]], right: &[bool; N]) {
    let widths: Vec<usize> = (0..N)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str; N]| {
        cells
            .iter()
            .zip(&widths)
            .zip(right)
            .map(|((c, w), r)| {
                if *r {
                    format!("{c:>w$}")
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_owned()
    };
    println!("{}", line(header));
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-|-")
    );
    for r in rows {
        println!("{}", line(&r.each_ref().map(String::as_str)));
    }
}

#[path = "bench/cluster.rs"]
mod cluster;
#[path = "bench/failover.rs"]
mod failover;
#[path = "bench/l7.rs"]
mod l7;

use xdplb_tests::{
    netns::{self, mac_of},
    packet::{ETH_HLEN, Frame, IPV4_HLEN, PacketBuilder, tcp_flags},
    xdp_bed::{
        LoadedLb, Net, Run, XDP_PASS, XDP_TX, first_difference, flow_key_of, in_bed, ipip_frame,
        pin_to_current_cpu, program, program_fd, test_run, verdict_name, xdp_md,
    },
};

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
    Xdp(XdpArgs),
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
    /// (internal) the backend `l7` starts: HTTP/1.1 on 127.0.0.1:P.
    #[command(name = "l7-backend")]
    L7Backend(l7::BackendArgs),
}

const DEFAULT_REPEAT: u32 = 1_000_000;
const DEFAULT_RUNS: usize = 7;
const MAX_REPEAT: u32 = 100_000_000;
const MAX_RUNS: usize = 51;

/// Arguments of `xdp`.
#[derive(Debug, clap::Args)]
struct XdpArgs {
    /// Iterations per run, 1000 to 100000000 (`_` separators allowed).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_REPEAT, value_parser = parse_repeat)]
    repeat: u32,
    /// Runs per program, 1 to 51; the figures are medians over them.
    #[arg(long, value_name = "K", default_value_t = DEFAULT_RUNS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_RUNS as u64))]
    runs: usize,
    /// Run only the rows whose label contains this text, and the XDP_PASS floors their
    /// net figures need (e.g. `--only "established flow"` under `perf record`).
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
}

fn parse_repeat(value: &str) -> Result<u32, String> {
    let n: u32 = value.replace('_', "").parse().map_err(|e| format!("{e}"))?;
    if (1_000..=MAX_REPEAT).contains(&n) {
        Ok(n)
    } else {
        Err(format!("--repeat must be between 1000 and {MAX_REPEAT}"))
    }
}

/// Reference figures measured on these machines with the wrapper method (ns/packet).
const REFERENCE: &str = "reference (these machines, wrapper method): XDP_PASS 9, IPIP floor 35, Katran SYN 90, Katran established 78";

/// Maglev ring size: the production default.
const RING: u32 = 65537;
const MAX_SERVICES: u32 = 4;
const MAX_BACKENDS: u32 = 16;
/// Production-sized flow table.
const FLOW_TABLE_BIG: u32 = 1 << 20;
/// Entries per CPU of the all-miss table: fewer than the 65,536 ports of one cycle.
const FLOWS_PER_CPU_SMALL: u32 = 1 << 15;

const LB_IFACE: &str = "lb0";
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const BACKENDS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 1, 11),
    Ipv4Addr::new(198, 18, 1, 12),
    Ipv4Addr::new(198, 18, 1, 13),
    Ipv4Addr::new(198, 18, 1, 14),
];
const BACKEND_MACS: [[u8; 6]; 4] = [
    [0x02, 0xbe, 0, 0, 0, 0x11],
    [0x02, 0xbe, 0, 0, 0, 0x12],
    [0x02, 0xbe, 0, 0, 0, 0x13],
    [0x02, 0xbe, 0, 0, 0, 0x14],
];
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 1), 80);
/// Not a VIP: the LB's own address (say, SSH to the LB host).
const NON_VIP: SocketAddrV4 = SocketAddrV4::new(LB_ADDR, 22);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40000);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.benchmark {
        Benchmark::Xdp(args) => privileged().and_then(|()| bench_xdp(args)),
        Benchmark::Failover(args) => privileged().and_then(|()| failover::run(args)),
        Benchmark::Cluster(args) => privileged().and_then(|()| cluster::run(args)),
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

// ---------------------------------------------------------------------------------------
// Test bed: one namespace, one veth, static neighbours for the backends.

fn net() -> Net {
    Net {
        links: vec![(LB_IFACE, "198.18.1.10/24")],
        neighbours: BACKENDS
            .iter()
            .zip(BACKEND_MACS)
            .map(|(&b, m)| (b, m, LB_IFACE))
            .collect(),
        routes: Vec::new(),
    }
}

/// Pins the calling thread to the CPU it runs on; returns that CPU.
/// Number of possible CPUs (the kernel sizes per-CPU LRU lists by it).
fn possible_cpus() -> anyhow::Result<u32> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .context("reading /sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in text.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>()? - a.parse::<u32>()? + 1,
            None => {
                part.parse::<u32>()?;
                1
            }
        };
    }
    ensure!(n > 0, "no possible CPUs in {text:?}");
    Ok(n)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

// ---------------------------------------------------------------------------------------
// Programs.

/// `xdp_lb` with its maps filled for one TCP service with four backends.
struct Lb(LoadedLb);

impl Lb {
    fn load(flow_table_size: u32) -> anyhow::Result<Self> {
        let caps = Capacities {
            max_services: MAX_SERVICES,
            max_backends: MAX_BACKENDS,
            ring_size: RING,
            flow_table_size,
            max_filter_rules: 16,
            // As large as the flow table: the SYN rows measure a miss and an insert
            // that evicts (the small table) or finds room (2^20), as before.
            new_flow_table_size: flow_table_size,
            flow_limit_sources: 1024,
        };
        let desired = DesiredState {
            gue_port: 6080,
            source_v4_prefix: None,
            source_v4: Some(LB_ADDR),
            source_v6: None,
            encap: 0,
            mtu: 1500,
            filters: Default::default(),
            services: vec![DesiredService {
                quic: false,
                name: "web".into(),
                vip: VIP.into(),
                protocol: Protocol::Tcp,
                l7: false,
                source_hash: false,
                backends: BACKENDS
                    .iter()
                    .map(|&b| DesiredBackend {
                        quic_id: None,
                        address: b.into(),
                        port: VIP.port(),
                        weight: 100,
                        active: true,
                    })
                    .collect(),
                filters: Default::default(),
            }],
        };
        Ok(Lb(LoadedLb::load(&caps, &desired, &[LB_PROGRAM])?))
    }

    fn program(&self) -> anyhow::Result<&Xdp> {
        self.0.program(LB_PROGRAM)
    }

    fn counters(&self) -> anyhow::Result<Counters> {
        self.0.counters()
    }

    /// Writes each backend's next hop into `NEXT_HOPS` as the agent does (`on`: the
    /// MACs of the static neighbours and of `lb0`, so the output is the same frame), or
    /// clears them (`bpf_fib_lookup` for every packet, as before the map).
    fn next_hops(&mut self, on: bool, ifindex: u32, lb_mac: [u8; 6]) -> anyhow::Result<()> {
        for (&b, mac) in BACKENDS.iter().zip(BACKEND_MACS) {
            let id = self
                .0
                .reconciler
                .backend_id("web", b.into(), VIP.port())
                .context("backend id")?;
            let (addr, family) = lb_agent::dataplane::sync::addr_words(b.into());
            let entry = if on {
                NextHopEntry {
                    addr,
                    ifindex,
                    mtu: 1500,
                    family,
                    flags: NEXT_HOP_F_VALID,
                    dmac: mac,
                    smac: lb_mac,
                }
            } else {
                NextHopEntry::default()
            };
            self.0.maps.next_hops.set(id, entry, 0)?;
        }
        Ok(())
    }

    /// Oracle: the backend (index into [`BACKENDS`]) the ring gives the flow of `frame`,
    /// from `lb_common::hash` and the ring the reconciler wrote.
    fn predicted(&self, frame: &[u8]) -> anyhow::Result<usize> {
        let b = self
            .0
            .ring_pick("web", &flow_key_of(frame)?, false, &BACKENDS, VIP.port())?;
        BACKENDS
            .iter()
            .position(|&c| c == b)
            .context("not a backend")
    }
}

/// The floors object: floor programs, the wrapper and its maps.
struct Floors {
    ebpf: Ebpf,
    progs: ProgramArray<MapData>,
    eth: Array<MapData, [u8; 16]>,
    mode: Array<MapData, u32>,
}

const FLOOR_PASS: &str = "floor_pass";
const FLOOR_TX: &str = "floor_tx";
const FLOOR_IPIP: &str = "floor_ipip";
const WRAPPER: &str = "bench_wrap";

impl Floors {
    fn load() -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(FLOORS_OBJECT).context("loading the floors object")?;
        for name in [FLOOR_PASS, FLOOR_TX, FLOOR_IPIP, WRAPPER] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            prog.load().with_context(|| format!("loading {name}"))?;
        }
        {
            let map = ebpf
                .map_mut("FLOOR_BACKENDS")
                .context("no map FLOOR_BACKENDS")?;
            let mut backends: HashMap<_, u32, u32> = HashMap::try_from(map)?;
            backends.insert(
                u32::from_ne_bytes(VIP.ip().octets()),
                u32::from_ne_bytes(BACKENDS[0].octets()),
                0,
            )?;
        }
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("no map {name}"))
        };
        let progs = ProgramArray::try_from(take("BENCH_PROGS")?)?;
        let eth = Array::try_from(take("BENCH_ETH")?)?;
        let mode = Array::try_from(take("BENCH_MODE")?)?;
        Ok(Floors {
            ebpf,
            progs,
            eth,
            mode,
        })
    }

    /// Points the wrapper at `target` for `frame` in `mode` (1 = new source port every
    /// iteration).
    fn arm(&mut self, target: &ProgramFd, frame: &[u8], mode: u32) -> anyhow::Result<()> {
        self.progs
            .set(0, target, 0)
            .context("BENCH_PROGS[0] = program under test (a tail call across objects)")?;
        let mut eth = [0u8; 16];
        eth[..ETH_HLEN].copy_from_slice(&frame[..ETH_HLEN]);
        self.eth.set(0, eth, 0)?;
        self.mode.set(0, mode, 0)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Running.

/// Which program a row measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Floor(&'static str),
    /// Index into the loaded balancers.
    Lb(usize),
}

/// What the packet is for `xdp_lb`, and what must come out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    FloorPass,
    /// XDP_PASS with the wrapper's new source port every iteration: the baseline of
    /// the new-flow rows.
    FloorPassNewPort,
    FloorTx,
    FloorIpip,
    /// Every iteration gets a new source port from the wrapper.
    LbNewFlow,
    /// The flow is put in the table first.
    LbEstablished,
    LbNonVip,
}

impl Case {
    /// The wrapper writes a new TCP source port every iteration (`BENCH_MODE` 1).
    fn new_port(self) -> bool {
        matches!(self, Case::FloorPassNewPort | Case::LbNewFlow)
    }
}

struct Row {
    label: &'static str,
    target: Target,
    case: Case,
    /// Also measured without the wrapper.
    direct: bool,
    raw: Vec<Run>,
    direct_samples: Vec<Run>,
    /// Flow-table misses / iterations, summed over runs (balancer VIP rows).
    new_flows: u64,
    iterations: u64,
    /// Balancer rows: `NEXT_HOPS` left empty, every next hop from `bpf_fib_lookup`.
    fib: bool,
}

impl Row {
    fn new(label: &'static str, target: Target, case: Case, direct: bool) -> Self {
        Row {
            label,
            target,
            case,
            direct,
            raw: Vec::new(),
            direct_samples: Vec::new(),
            new_flows: 0,
            iterations: 0,
            fib: false,
        }
    }

    /// The same row with `NEXT_HOPS` empty (next hops from `bpf_fib_lookup`).
    fn fib(self) -> Self {
        Row { fib: true, ..self }
    }
}

/// The input frame of `case` in run `run` (each run of a SYN row starts from a client
/// address no earlier run used, so its first ports are new to the flow table).
fn frame_for(case: Case, run: usize) -> Vec<u8> {
    match case {
        Case::LbNewFlow | Case::FloorPassNewPort => {
            let src = Ipv4Addr::new(198, 18, 0, 10 + (run % 200) as u8);
            PacketBuilder::tcp(SocketAddrV4::new(src, 1), VIP)
                .flags(tcp_flags::SYN)
                .build()
        }
        Case::LbNonVip => PacketBuilder::tcp(CLIENT, NON_VIP)
            .flags(tcp_flags::SYN)
            .build(),
        Case::FloorPass | Case::FloorTx | Case::FloorIpip | Case::LbEstablished => {
            PacketBuilder::tcp(CLIENT, VIP).build()
        }
    }
}

/// Checks that `output` is the IPIP frame to `backend` with the given Ethernet addresses
/// carrying `input`'s packet, byte for byte (bar the TCP source port when `new_port`: the
/// wrapper writes a new one every iteration, without touching the checksum).
fn check_ipip(
    input: &[u8],
    output: &[u8],
    backend: Ipv4Addr,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    new_port: bool,
) -> anyhow::Result<()> {
    let mut inner_in = input.to_vec();
    if new_port {
        let inner_out = Frame::parse(output)?.ipv4()?.payload;
        let sport = ETH_HLEN + IPV4_HLEN;
        inner_in[sport..sport + 2].copy_from_slice(&inner_out[IPV4_HLEN..IPV4_HLEN + 2]);
    }
    let want = ipip_frame(&inner_in, LB_ADDR, backend, dst_mac, src_mac)?;
    if let Some(diff) = first_difference(&want, output) {
        bail!("not the IPIP frame to {backend}: {diff}");
    }
    Ok(())
}

fn swapped_macs(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[..6].copy_from_slice(&frame[6..12]);
    f[6..12].copy_from_slice(&frame[..6]);
    f
}

struct Bench {
    floors: Floors,
    lbs: Vec<Lb>,
    ctx: [u8; 24],
    lb_mac: [u8; 6],
    ifindex: u32,
    _forwarding: InterfaceForwarding,
}

impl Bench {
    fn program(&self, target: Target) -> anyhow::Result<&Xdp> {
        match target {
            Target::Floor(name) => program(&self.floors.ebpf, name),
            Target::Lb(i) => self.lbs[i].program(),
        }
    }

    /// Verdict and last output of one run of `row`, and for the balancer its counters
    /// over the run; returns the number of new flows it counted.
    fn check(
        &self,
        row: &Row,
        frame: &[u8],
        sample: &Run,
        wrapped: bool,
        repeat: u32,
        before: Option<&Counters>,
    ) -> anyhow::Result<u64> {
        let want = match row.case {
            Case::FloorPass | Case::FloorPassNewPort | Case::LbNonVip => XDP_PASS,
            _ => XDP_TX,
        };
        ensure!(
            sample.verdict == want,
            "last iteration returned {}, want {}",
            verdict_name(sample.verdict),
            verdict_name(want)
        );
        match row.case {
            Case::FloorPass | Case::LbNonVip => {
                ensure!(sample.out == frame, "a passed frame came out changed")
            }
            Case::FloorPassNewPort => {
                let sport = ETH_HLEN + IPV4_HLEN;
                ensure!(
                    sample.out.len() == frame.len(),
                    "a passed frame changed its length"
                );
                let mut want = frame.to_vec();
                want[sport..sport + 2].copy_from_slice(&sample.out[sport..sport + 2]);
                ensure!(
                    sample.out == want,
                    "a passed frame changed beyond its source port"
                );
            }
            Case::FloorTx => {
                // Without the wrapper the MACs are swapped back and forth.
                let want = if wrapped || repeat % 2 == 1 {
                    swapped_macs(frame)
                } else {
                    frame.to_vec()
                };
                ensure!(sample.out == want, "MACs not swapped as expected");
            }
            Case::FloorIpip => {
                let f = Frame::parse(frame)?;
                check_ipip(frame, &sample.out, BACKENDS[0], f.src_mac, f.dst_mac, false)?;
            }
            Case::LbNewFlow | Case::LbEstablished => {
                let Target::Lb(i) = row.target else {
                    bail!("balancer case on a floor")
                };
                let lb = &self.lbs[i];
                // The backend is predicted from the inner packet as it came out (the
                // wrapper may have given it a new source port).
                let out_inner = Frame::parse(&sample.out)?.ipv4()?.payload;
                let inner_frame = [&frame[..ETH_HLEN], &out_inner].concat();
                let key = flow_key_of(&inner_frame)?;
                let idx = lb.predicted(&inner_frame)?;
                check_ipip(
                    frame,
                    &sample.out,
                    BACKENDS[idx],
                    BACKEND_MACS[idx],
                    self.lb_mac,
                    row.case == Case::LbNewFlow,
                )?;
                // A SYN waits in the new-flow table for its second packet; an
                // established flow is in the flow table.
                let entry =
                    lb.0.flow_entry(&key, row.case == Case::LbNewFlow)
                        .context("the flow is not in its flow table after the run")?;
                ensure!(
                    lb.0.reconciler
                        .backend_id("web", BACKENDS[idx].into(), VIP.port())
                        == Some(entry.backend_id),
                    "flow table entry points at backend id {}, the packet went to {}",
                    entry.backend_id,
                    BACKENDS[idx]
                );
            }
        }
        let (Target::Lb(i), Some(before)) = (row.target, before) else {
            return Ok(0);
        };
        let after = self.lbs[i].counters()?;
        let delta = |c: Counter| after.get(c) - before.get(c);
        let n = u64::from(repeat);
        ensure!(
            delta(Counter::Rx) == n,
            "rx counted {} of {n} iterations",
            delta(Counter::Rx)
        );
        match row.case {
            Case::LbNonVip => ensure!(
                delta(Counter::PassNotVip) == n,
                "pass_not_vip counted {} of {n}",
                delta(Counter::PassNotVip)
            ),
            _ => ensure!(
                delta(Counter::Tx) == n,
                "tx counted {} of {n}",
                delta(Counter::Tx)
            ),
        }
        if row.case == Case::LbEstablished {
            ensure!(
                delta(Counter::FlowNew) == 0 && delta(Counter::FlowRehash) == 0,
                "the established flow was not in the flow table ({} new, {} rehashed)",
                delta(Counter::FlowNew),
                delta(Counter::FlowRehash)
            );
        }
        Ok(delta(Counter::FlowNew))
    }

    /// One run of `row` through the wrapper (and directly, if the row has that).
    fn run_row(
        &mut self,
        row: &mut Row,
        run: usize,
        repeat: u32,
        record: bool,
    ) -> anyhow::Result<()> {
        let frame = frame_for(row.case, run);
        if let Target::Lb(i) = row.target {
            let (ifindex, lb_mac) = (self.ifindex, self.lb_mac);
            self.lbs[i].next_hops(!row.fib, ifindex, lb_mac)?;
        }
        let target_fd = program_fd(self.program(row.target)?)?;
        let mode = u32::from(row.case.new_port());
        self.floors.arm(&target_fd, &frame, mode)?;
        if row.case == Case::LbEstablished {
            // Two packets: the first puts the flow in the new-flow table, the second
            // promotes it into the flow table.
            for _ in 0..2 {
                let prime = test_run(self.program(row.target)?, &frame, &self.ctx, 1)
                    .context("priming the established flow")?;
                ensure!(
                    prime.verdict == XDP_TX,
                    "priming the established flow: verdict {}",
                    prime.verdict
                );
            }
        }
        let counters = |b: &Self| match row.target {
            Target::Lb(i) => b.lbs[i].counters().map(Some),
            Target::Floor(_) => Ok(None),
        };
        let before = counters(self)?;
        let sample = test_run(
            program(&self.floors.ebpf, WRAPPER)?,
            &frame,
            &self.ctx,
            repeat,
        )?;
        let new = self
            .check(row, &frame, &sample, true, repeat, before.as_ref())
            .with_context(|| format!("{}: wrapper run {run} produced a wrong result", row.label))?;
        if record {
            row.new_flows += new;
            row.iterations += u64::from(repeat);
            row.raw.push(sample);
        }
        if row.direct {
            let before = counters(self)?;
            let sample = test_run(self.program(row.target)?, &frame, &self.ctx, repeat)?;
            self.check(row, &frame, &sample, false, repeat, before.as_ref())
                .with_context(|| {
                    format!("{}: direct run {run} produced a wrong result", row.label)
                })?;
            if record {
                row.direct_samples.push(sample);
            }
        }
        Ok(())
    }
}

fn median_u64(v: &[u64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2] as f64
    } else {
        (s[n / 2 - 1] + s[n / 2]) as f64 / 2.0
    }
}

fn median_f64(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_unstable_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn kernel_median(samples: &[Run]) -> f64 {
    median_u64(&samples.iter().map(|s| s.kernel_ns).collect::<Vec<_>>())
}

fn bench_xdp(args: &XdpArgs) -> anyhow::Result<()> {
    let cpus = possible_cpus()?;
    let small_table = FLOWS_PER_CPU_SMALL * cpus;
    let repeat = args.repeat;
    let runs = args.runs;
    let only = args.only.clone();
    let (cpu, rows, load) = in_bed("bench", &net(), move || {
        let cpu = pin_to_current_cpu()?;
        let ifindex = lb_agent::dataplane::loader::if_index(LB_IFACE)?;
        let len = frame_for(Case::LbEstablished, 0).len();
        let ctx = xdp_md(len, ifindex, 0);
        let mut bench = Bench {
            floors: Floors::load()?,
            lbs: vec![Lb::load(FLOW_TABLE_BIG)?, Lb::load(small_table)?],
            ctx,
            lb_mac: mac_of(LB_IFACE)?,
            ifindex,
            _forwarding: InterfaceForwarding::enable(LB_IFACE)?,
        };
        let mut rows = vec![
            Row::new(
                "floor: XDP_PASS",
                Target::Floor(FLOOR_PASS),
                Case::FloorPass,
                true,
            ),
            Row::new(
                "floor: XDP_PASS, new port/iter",
                Target::Floor(FLOOR_PASS),
                Case::FloorPassNewPort,
                false,
            ),
            Row::new(
                "floor: parse+swap MACs+XDP_TX",
                Target::Floor(FLOOR_TX),
                Case::FloorTx,
                true,
            ),
            Row::new(
                "floor: parse+lookup+IPIP+TX",
                Target::Floor(FLOOR_IPIP),
                Case::FloorIpip,
                false,
            ),
            Row::new(
                "xdp_lb: new-flow SYN",
                Target::Lb(1),
                Case::LbNewFlow,
                false,
            ),
            Row::new(
                "xdp_lb: SYN, 2^20 table",
                Target::Lb(0),
                Case::LbNewFlow,
                false,
            ),
            Row::new(
                "xdp_lb: established flow",
                Target::Lb(0),
                Case::LbEstablished,
                false,
            ),
            Row::new(
                "xdp_lb: established, FIB lookup",
                Target::Lb(0),
                Case::LbEstablished,
                false,
            )
            .fib(),
            Row::new(
                "xdp_lb: non-VIP packet",
                Target::Lb(0),
                Case::LbNonVip,
                true,
            ),
        ];
        if let Some(only) = &only {
            rows.retain(|r| {
                r.label.contains(only.as_str())
                    || matches!(r.case, Case::FloorPass | Case::FloorPassNewPort)
            });
        }
        // Every frame has the same length (the ctx's data_end): check it.
        for row in &rows {
            ensure!(
                frame_for(row.case, 0).len() == len,
                "{}: frame length differs",
                row.label
            );
        }
        // Warm-up round (also fills the small flow table, so its runs evict): checked,
        // not recorded.
        for row in &mut rows {
            let warm = if row.target == Target::Lb(1) {
                200_000
            } else {
                (repeat / 10).max(1_000)
            };
            bench
                .run_row(row, 199, warm, false)
                .with_context(|| format!("warm-up of {}", row.label))?;
        }
        let start = cpu_times();
        for run in 0..runs {
            for row in &mut rows {
                bench.run_row(row, run, repeat, true)?;
            }
        }
        let load = Load::between(&start, &cpu_times(), cpu);
        Ok((cpu, rows, load))
    })?;
    report(&rows, args, cpu, cpus, small_table, &load);
    Ok(())
}

/// Per-CPU `(busy, total, steal)` jiffies from `/proc/stat` (empty if unreadable).
fn cpu_times() -> Vec<(u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            // user nice system idle iowait irq softirq steal
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .take(8)
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            let total: u64 = f.iter().sum();
            let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
            (total - idle, total, f.get(7).copied().unwrap_or(0))
        })
        .collect()
}

/// How busy the machine was while the runs were measured.
struct Load {
    /// Busy share of the other CPUs (their work shares caches, and on a VM perhaps
    /// the core, with the measuring CPU).
    others_busy: f64,
    /// Share of the measuring CPU's time the hypervisor gave to someone else.
    steal: f64,
}

impl Load {
    fn between(a: &[(u64, u64, u64)], b: &[(u64, u64, u64)], cpu: usize) -> Self {
        let (mut busy, mut total) = (0, 0);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            if i != cpu {
                busy += y.0 - x.0;
                total += y.1 - x.1;
            }
        }
        let steal = match (a.get(cpu), b.get(cpu)) {
            (Some(x), Some(y)) if y.1 > x.1 => (y.2 - x.2) as f64 / (y.1 - x.1) as f64,
            _ => 0.0,
        };
        Load {
            others_busy: if total == 0 {
                0.0
            } else {
                busy as f64 / total as f64
            },
            steal,
        }
    }
}

fn report(rows: &[Row], args: &XdpArgs, cpu: usize, cpus: u32, small_table: u32, load: &Load) {
    let median_of = |case: Case| {
        rows.iter()
            .find(|r| r.case == case)
            .map_or(f64::NAN, |r| kernel_median(&r.raw))
    };
    let base = median_of(Case::FloorPass);
    let base_new_port = median_of(Case::FloorPassNewPort);
    let floor = median_of(Case::FloorIpip) - base;
    println!(
        "xdplb-bench xdp: ns per packet through BPF_PROG_TEST_RUN; kernel {}, {}, thread pinned to CPU {cpu} ({cpus} possible CPUs)",
        kernel_release(),
        cpu_model()
    );
    println!(
        "{} runs x {} iterations per program, runs interleaved; figures are medians of the kernel's ns/iteration\n",
        args.runs, args.repeat
    );
    println!(
        "{:<32} {:>8} {:>6} {:>8} {:>7} {:>8} {:>10}  new flows",
        "program", "ns (net)", "raw", "raw wall", "direct", "ratio*", "raw range"
    );
    for r in rows {
        let raw = kernel_median(&r.raw);
        let wall = median_f64(&r.raw.iter().map(|s| s.wall_ns).collect::<Vec<_>>());
        let net = raw
            - if r.case.new_port() {
                base_new_port
            } else {
                base
            };
        let direct = if r.direct_samples.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.0}", kernel_median(&r.direct_samples))
        };
        let lo = r.raw.iter().map(|s| s.kernel_ns).min().unwrap_or(0);
        let hi = r.raw.iter().map(|s| s.kernel_ns).max().unwrap_or(0);
        let flows = match r.case {
            Case::LbNewFlow | Case::LbEstablished => {
                format!(
                    "{:.1}%",
                    100.0 * r.new_flows as f64 / r.iterations.max(1) as f64
                )
            }
            _ => String::new(),
        };
        println!(
            "{:<32} {:>8.0} {:>6.0} {:>8.1} {:>7} {:>8.2} {:>10}  {}",
            r.label,
            net,
            raw,
            wall,
            direct,
            net / floor,
            format!("{lo}-{hi}"),
            flows
        );
    }
    println!("{REFERENCE}");
    println!(
        "\nwhile measuring: other CPUs {:.0}% busy, steal on CPU {cpu} {:.1}%{}",
        100.0 * load.others_busy,
        100.0 * load.steal,
        if load.others_busy > 0.2 || load.steal > 0.02 {
            " (other work shares caches and, on a VM, perhaps the core: figures are inflated; \
             compare ratios, or rerun on an idle machine)"
        } else {
            ""
        }
    );
    println!(
        "\n* ratio = net / net of \"floor: parse+lookup+IPIP+TX\".\n\
         net = raw - raw of \"floor: XDP_PASS\" (the wrapper's own cost: un-encapsulate, restore\n\
         \x20 the Ethernet header, tail call); for SYN rows raw - raw of \"XDP_PASS, new port/iter\"\n\
         \x20 (the wrapper also writes a new source port). raw = wrapper -> program with\n\
         \x20 repeat = N (the kernel does not reset the packet between iterations; the wrapper undoes\n\
         \x20 the previous iteration). direct = the program alone with repeat = N, only where its\n\
         \x20 cost does not depend on the previous iteration. raw wall = wall clock of the test_run\n\
         \x20 syscall / N. raw range = fastest-slowest run. Kernel figures are whole ns (truncated).\n\
         Every run's last iteration was checked: verdict, output frame (IPIP to the backend the hash\n\
         \x20 oracle predicts, correct outer header), and xdp_lb's counters.\n\
         new flows = share of iterations that missed the flow table (xdp_lb's flow_new counter).\n\
         \x20 The wrapper gives SYN rows a new source port every iteration; ports wrap every 65536.\n\
         \x20 \"new-flow SYN\": new-flow table (where a SYN waits for its flow's second packet) of {small_table} entries = {FLOWS_PER_CPU_SMALL} per CPU (per-CPU LRU), fewer than\n\
         \x20 one port cycle, so every SYN misses, takes a ring slot and evicts (a full table in\n\
         \x20 production). \"SYN, 2^20 table\": the production size ({} per CPU) keeps a whole port\n\
         \x20 cycle, so after the first 65536 iterations of a run the reused ports hit the table.",
        FLOW_TABLE_BIG / cpus
    );
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
        assert_eq!(xdp(&[]).unwrap(), (DEFAULT_REPEAT, DEFAULT_RUNS));
        assert_eq!(xdp(&["--repeat", "2_000", "--runs=3"]).unwrap(), (2000, 3));
        assert!(xdp(&["--repeat", "999"]).is_err());
        assert!(xdp(&["--runs", "52"]).is_err());
        assert!(xdp(&["--bogus"]).is_err());
        assert!(Cli::try_parse_from(["xdplb-bench"]).is_err());
        assert!(Cli::try_parse_from(["xdplb-bench", "nope"]).is_err());
    }
}
