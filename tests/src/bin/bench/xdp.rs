//! `xdp`: nanoseconds per packet through `BPF_PROG_TEST_RUN`
//!
//! Prints one table: `xdp_lb` on a new-flow SYN, an established flow (next hops from
//! the `NEXT_HOPS` map, written as the agent does, and once more with that map empty:
//! `bpf_fib_lookup` for every packet) and a non-VIP packet, beside floor programs built in the same run by the same compiler
//! (`lb-ebpf/src/floors.rs`): XDP_PASS; parse + swap MACs + XDP_TX; parse + one hash
//! lookup + IPIP encapsulation + XDP_TX. Ratios are to the last floor. It is a
//! measurement, not a test: nothing is asserted about speed.
//!
//! Three more tables (all through report.rs, printed and written to `xdp.json`):
//! - Katran beside `xdp_lb` (module [`crate::katran`]): Katran's balancer built from
//!   `tests/vendor/katran` with its own flags, its maps filled as its control plane
//!   does, behind the same wrapper: established flow, SYN with its new-connection cap
//!   raised and with the default cap, non-VIP packet.
//! - Per-feature rows (module [`crate::xdp_custom`]): an established flow on an `xdp_lb`
//!   with deny/allow lists, a flood limit or a QUIC service loaded; a 6in6 flow (behind
//!   `bench_wrap6`), a GUE flow (behind `bench_wrap_gue`), a QUIC short header routed
//!   by its connection ID. Each wrapper has its own `floor_pass` baseline, and each
//!   tunnel its own floor (`floor_6in6`, `floor_gue`: parse, one lookup, that tunnel,
//!   XDP_TX), so the table shows every row against the floor of its own tunnel ("x own
//!   floor") beside the IPIP floor ("x floor").
//! - Scale rows: 1, 100, 1000 services of 10 backends, 1 of 1000 backends (established
//!   and SYN), and a flow table holding 1,000,000 flows on the measuring CPU (filled by
//!   traffic before the runs; the table is sized 1,000,000 x possible CPUs because each
//!   CPU's LRU list holds size / possible CPUs).
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

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, ProgramArray},
    programs::{ProgramFd, Xdp},
};
use lb_agent::dataplane::ring::{self, RingMember};
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

use crate::{
    katran::{self, Katran},
    report::{self, Cell, Report, Stats},
    xdp_custom::{self, Custom, Env, WRAP_GUE, WRAP_IPV6},
};
use lb_common::types::{ENCAP_GUE, PROTO_TCP};
use xdplb_tests::{
    netns::mac_of,
    packet::{ETH_HLEN, Frame, IPV4_HLEN, PacketBuilder, tcp_flags},
    packet6::{self, IPPROTO_IPV6},
    xdp_bed::{
        LoadedLb, Net, Run, XDP_PASS, XDP_TX, first_difference, flow_key, flow_key_of, in_bed,
        ipip_frame, pin_to_current_cpu, program, program_fd, test_run, verdict_name, xdp_md,
    },
};

pub(crate) const DEFAULT_REPEAT: u32 = 1_000_000;
pub(crate) const DEFAULT_RUNS: usize = 7;
const MAX_REPEAT: u32 = 100_000_000;
const MAX_RUNS: usize = 51;

/// Arguments of `xdp`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Iterations per run, 1000 to 100000000 (`_` separators allowed).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_REPEAT, value_parser = parse_repeat)]
    pub(crate) repeat: u32,
    /// Runs per program, 1 to 51; the figures are medians over them.
    #[arg(long, value_name = "K", default_value_t = DEFAULT_RUNS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_RUNS as u64))]
    pub(crate) runs: usize,
    /// Run only the rows whose label contains this text (or one of several texts
    /// separated by `|`), and the XDP_PASS floors their net figures need (e.g. `--only
    /// "established flow"` under `perf record`, `--only "IPIP|SYN|feature"`).
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
    /// Extra rounds, after the runs, of only the budget's rows (the IPIP floor, its
    /// XDP_PASS baseline and the established IPv4 flow rows): the per-run ratios of the
    /// budget table come from the runs and these rounds together. 0 to 101.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BUDGET_ROUNDS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=101))]
    pub(crate) budget_rounds: usize,
}

/// Rounds of the budget's rows on top of the runs: with the default 7 runs, 38 per-run
/// ratios for the budget's median and quartiles instead of 7 (README, "The budget's
/// figure"); a round is a few 10^6-iteration test runs, well under a second.
pub(crate) const DEFAULT_BUDGET_ROUNDS: usize = 31;

fn parse_repeat(value: &str) -> Result<u32, String> {
    let n: u32 = value.replace('_', "").parse().map_err(|e| format!("{e}"))?;
    if (1_000..=MAX_REPEAT).contains(&n) {
        Ok(n)
    } else {
        Err(format!("--repeat must be between 1000 and {MAX_REPEAT}"))
    }
}

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

/// `xdp_lb` with its maps filled for one TCP service with four backends; `.1`: another
/// build of the object (`XDPLB_BENCH_LB_OBJECTS`), whose counters are not checked (an
/// ablation build may count less).
struct Lb(LoadedLb, bool);

/// `XDPLB_BENCH_LB_OBJECTS`: other builds of the balancer object measured beside the
/// agent's own, as `label=path` separated by `;` (e.g. main's object, or an ablation build
/// with one part of the established path removed): each gets the rows "xdp_lb [label]:
/// established flow" and "xdp_lb [label]: non-VIP packet" in the same interleaved runs,
/// its output checked as the agent's, and the per-feature rows of the source lists and
/// of the IPv6 VIP on balancers of its own ("feature [label]: ...", `extra_specs`).
/// Their maps must be the agent's (same names and layouts).
const LB_OBJECTS_ENV: &str = "XDPLB_BENCH_LB_OBJECTS";

fn other_objects() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let Ok(list) = std::env::var(LB_OBJECTS_ENV) else {
        return Ok(Vec::new());
    };
    list.split(';')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (label, path) = item
                .split_once('=')
                .with_context(|| format!("{LB_OBJECTS_ENV}: {item:?} is not label=path"))?;
            let bytes = std::fs::read(path.trim())
                .with_context(|| format!("{LB_OBJECTS_ENV}: reading {path}"))?;
            Ok((label.trim().to_owned(), bytes))
        })
        .collect()
}

impl Lb {
    fn load(flow_table_size: u32) -> anyhow::Result<Self> {
        Self::load_object(flow_table_size, None)
    }

    fn load_object(flow_table_size: u32, object: Option<&[u8]>) -> anyhow::Result<Self> {
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
            source_v6_prefix: None,
            max_new_flows_per_cpu: 0,
            icmp_errors_per_cpu: 0,
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
        Ok(Lb(
            LoadedLb::load_object(&caps, &desired, &[LB_PROGRAM], object)?,
            object.is_some(),
        ))
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
const FLOOR_6IN6: &str = "floor_6in6";
const FLOOR_GUE: &str = "floor_gue";
const WRAPPER: &str = "bench_wrap";
/// `floor_6in6`'s backend (its one entry in `FLOOR_BACKEND6`, for [`VIP6`]).
const FLOOR_BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x11);

impl Floors {
    fn load() -> anyhow::Result<Self> {
        let mut ebpf = Ebpf::load(FLOORS_OBJECT).context("loading the floors object")?;
        for name in [
            FLOOR_PASS, FLOOR_TX, FLOOR_IPIP, FLOOR_6IN6, FLOOR_GUE, WRAPPER, WRAP_IPV6, WRAP_GUE,
        ] {
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
        {
            let map = ebpf
                .map_mut("FLOOR_BACKEND6")
                .context("no map FLOOR_BACKEND6")?;
            let mut backends: HashMap<_, [u32; 4], [u32; 4]> = HashMap::try_from(map)?;
            let words = |a: Ipv6Addr| lb_agent::dataplane::sync::addr_words(a.into()).0;
            backends.insert(words(*VIP6.ip()), words(FLOOR_BACKEND6), 0)?;
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
    /// Index into the loaded Katran balancers.
    Katran(usize),
    /// Index into the per-feature and scale balancers.
    Custom(usize),
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
    /// `floor_6in6` on the IPv6 frame (behind `bench_wrap6`).
    Floor6in6,
    /// `floor_gue` (behind `bench_wrap_gue`).
    FloorGue,
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
    label: String,
    /// Which table it is printed in.
    group: Group,
    /// The wrapper that undoes this row's tunnel (and whose `floor_pass` row is its baseline).
    wrapper: &'static str,
    /// A fixed input frame instead of [`frame_for`]'s.
    frame: Option<Vec<u8>>,
    /// [`frame_for`] with this VIP instead of [`VIP`] (scale rows).
    vip: Option<SocketAddrV4>,
    /// Established per-feature rows: the two packets that put the flow in the flow
    /// tables, when not the row's own frame (a QUIC flow: long headers).
    prime: Option<Vec<u8>>,
    target: Target,
    case: Case,
    /// Also measured without the wrapper.
    direct: bool,
    raw: Vec<Run>,
    /// The budget rounds' samples (`--budget-rounds`), budget rows only.
    budget: Vec<Run>,
    direct_samples: Vec<Run>,
    /// Flow-table misses / iterations, summed over runs (balancer VIP rows).
    new_flows: u64,
    iterations: u64,
    /// Balancer rows: `NEXT_HOPS` left empty, every next hop from `bpf_fib_lookup`.
    fib: bool,
    /// Per-feature rows: whether the measured packet uses the row's feature
    /// ([`Use`]): the budget is about packets that do not.
    uses: Use,
}

/// Per-feature rows: what the measured packet does with the feature in the state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Not a per-feature row.
    None,
    /// The feature is configured; this packet does not use it (the 1.5x budget).
    No,
    /// The packet uses the feature (IPv6, GUE, a QUIC CID, a SYN over the cap).
    Yes,
    /// The same balancer without the feature, beside a row that uses it.
    Baseline,
}

/// What one measured run of a row is for ([`Bench::run_row`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Record {
    /// A warm-up: measured and checked, kept nowhere.
    Warm,
    /// One of the runs: every column's sample.
    Run,
    /// A budget round (`--budget-rounds`): the wrapper's sample only, into [`Row::budget`].
    Budget,
}

impl Row {
    /// Keep a wrapper run's `sample` (`new`: its flow-table misses over `repeat`
    /// iterations) as `record` says.
    fn keep(&mut self, record: Record, sample: Run, new: u64, repeat: u32) {
        match record {
            Record::Warm => {}
            Record::Run => {
                self.new_flows += new;
                self.iterations += u64::from(repeat);
                self.raw.push(sample);
            }
            Record::Budget => self.budget.push(sample),
        }
    }

    fn new(label: impl Into<String>, target: Target, case: Case, direct: bool) -> Self {
        Row {
            label: label.into(),
            group: Group::Main,
            wrapper: WRAPPER,
            frame: None,
            vip: None,
            prime: None,
            target,
            case,
            direct,
            raw: Vec::new(),
            budget: Vec::new(),
            direct_samples: Vec::new(),
            new_flows: 0,
            iterations: 0,
            fib: false,
            uses: Use::None,
        }
    }

    /// The same per-feature row with what its packet does with the feature.
    fn uses(self, uses: Use) -> Self {
        Row { uses, ..self }
    }

    /// The same row with `NEXT_HOPS` empty (next hops from `bpf_fib_lookup`).
    fn fib(self) -> Self {
        Row { fib: true, ..self }
    }

    /// The same row in table `group`.
    fn group(self, group: Group) -> Self {
        Row { group, ..self }
    }

    /// The same row behind `wrapper` with the fixed input `frame`.
    fn wrapped(self, wrapper: &'static str, frame: Option<Vec<u8>>) -> Self {
        Row {
            wrapper,
            frame,
            ..self
        }
    }

    /// The same row primed with `frame` (twice) instead of its own frame.
    fn primed(self, frame: Vec<u8>) -> Self {
        Row {
            prime: Some(frame),
            ..self
        }
    }

    /// The same row with its frames to `vip`.
    fn for_vip(self, vip: SocketAddrV4) -> Self {
        Row {
            vip: Some(vip),
            ..self
        }
    }

    /// Its input frame in run `run`.
    fn input(&self, run: usize) -> Vec<u8> {
        match (&self.frame, self.vip) {
            (Some(f), _) => f.clone(),
            (None, Some(vip)) => frame_to(self.case, run, vip),
            (None, None) => frame_for(self.case, run),
        }
    }
}

/// The tables of the report.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Group {
    /// Floors, xdp_lb, Katran.
    Main,
    /// Per-feature rows: established flows with a feature loaded or used.
    Features,
    /// Scale rows.
    Scale,
}

/// The input frame of `case` in run `run` (each run of a SYN row starts from a client
/// address no earlier run used, so its first ports are new to the flow table).
fn frame_for(case: Case, run: usize) -> Vec<u8> {
    frame_to(case, run, VIP)
}

/// [`frame_for`] with `vip` as the VIP.
fn frame_to(case: Case, run: usize, vip: SocketAddrV4) -> Vec<u8> {
    match case {
        Case::LbNewFlow | Case::FloorPassNewPort => {
            let src = Ipv4Addr::new(198, 18, 0, 10 + (run % 200) as u8);
            PacketBuilder::tcp(SocketAddrV4::new(src, 1), vip)
                .flags(tcp_flags::SYN)
                .build()
        }
        Case::LbNonVip => PacketBuilder::tcp(CLIENT, NON_VIP)
            .flags(tcp_flags::SYN)
            .build(),
        Case::FloorPass
        | Case::FloorTx
        | Case::FloorIpip
        | Case::Floor6in6
        | Case::FloorGue
        | Case::LbEstablished => PacketBuilder::tcp(CLIENT, vip).build(),
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
    /// Katran's balancer: `[0]` with its default new-connection cap, `[1]` with the cap
    /// raised (empty when it could not be built or loaded: `katran_error` says why).
    katrans: Vec<Katran>,
    /// The per-feature and scale balancers.
    customs: Vec<Custom>,
    /// The CPU the thread is pinned to (Katran's LRU of this CPU holds the flows).
    cpu: usize,
    lb_mac: [u8; 6],
    ifindex: u32,
    _forwarding: InterfaceForwarding,
}

impl Bench {
    fn program(&self, target: Target) -> anyhow::Result<&Xdp> {
        match target {
            Target::Floor(name) => program(&self.floors.ebpf, name),
            Target::Lb(i) => self.lbs[i].program(),
            Target::Katran(i) => self.katrans[i].program(),
            Target::Custom(i) => self.customs[i].lb.program(LB_PROGRAM),
        }
    }

    /// Katran's counters: (packets on the VIP path and their LRU misses, (XDP_TX, XDP_PASS)).
    fn katran_counters(&self, i: usize) -> anyhow::Result<(katran::LbStats, (u64, u64))> {
        let k = &self.katrans[i];
        Ok((k.lru_counters()?, k.verdict_counts()?))
    }

    /// [`Bench::check`] for Katran: verdict, output frame (IPIP to a real; for an
    /// established flow the real its LRU entry names) and Katran's own counters over the
    /// run; returns its LRU misses.
    fn check_katran(
        &self,
        i: usize,
        row: &Row,
        frame: &[u8],
        sample: &Run,
        repeat: u32,
        before: &(katran::LbStats, (u64, u64)),
    ) -> anyhow::Result<u64> {
        let k = &self.katrans[i];
        let n = u64::from(repeat);
        let (lru, (tx, pass)) = self.katran_counters(i)?;
        if row.case == Case::LbNonVip {
            ensure!(
                sample.verdict == XDP_PASS,
                "last iteration returned {}, want XDP_PASS",
                verdict_name(sample.verdict)
            );
            ensure!(sample.out == frame, "a passed frame came out changed");
            ensure!(
                pass - before.1.1 == n,
                "Katran counted {} of {n} iterations as XDP_PASS",
                pass - before.1.1
            );
            return Ok(0);
        }
        ensure!(
            sample.verdict == XDP_TX,
            "last iteration returned {}, want XDP_TX",
            verdict_name(sample.verdict)
        );
        let want = if row.case == Case::LbEstablished {
            Some(
                k.lru_real(self.cpu, CLIENT, VIP)?
                    .context("the established flow is not in Katran's LRU of this CPU")?,
            )
        } else {
            None
        };
        k.check_ipip(frame, &sample.out, want, row.case.new_port())?;
        ensure!(
            tx - before.1.0 == n && lru.v1 - before.0.v1 == n,
            "Katran counted {} XDP_TX and {} VIP packets of {n} iterations",
            tx - before.1.0,
            lru.v1 - before.0.v1
        );
        let misses = lru.v2 - before.0.v2;
        match row.case {
            Case::LbEstablished => {
                ensure!(misses == 0, "{misses} LRU misses on the established flow")
            }
            _ => ensure!(misses == n, "{misses} LRU misses of {n} SYNs"),
        }
        Ok(misses)
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
            Case::Floor6in6 | Case::FloorGue => {
                let want = floor_tunnel_frame(row.case, frame)?;
                ensure!(
                    sample.out == want,
                    "not the tunnelled frame {} must send",
                    row.label
                );
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
        if self.lbs[i].1 {
            return Ok(0);
        }
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
        record: Record,
    ) -> anyhow::Result<()> {
        let frame = row.input(run);
        if let Target::Katran(i) = row.target {
            return self.run_katran_row(i, row, &frame, run, repeat, record);
        }
        if let Target::Custom(i) = row.target {
            return self.run_custom_row(i, row, &frame, run, repeat, record);
        }
        let ctx = xdp_md(frame.len(), self.ifindex, 0);
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
                let prime = test_run(self.program(row.target)?, &frame, &ctx, 1)
                    .context("priming the established flow")?;
                ensure!(
                    prime.verdict == XDP_TX,
                    "priming the established flow: verdict {}",
                    prime.verdict
                );
            }
        }
        let target = row.target;
        let counters = |b: &Self| match target {
            Target::Lb(i) => b.lbs[i].counters().map(Some),
            Target::Floor(_) | Target::Katran(_) | Target::Custom(_) => Ok(None),
        };
        let before = counters(self)?;
        let sample = test_run(
            program(&self.floors.ebpf, row.wrapper)?,
            &frame,
            &ctx,
            repeat,
        )?;
        let new = self
            .check(row, &frame, &sample, true, repeat, before.as_ref())
            .with_context(|| format!("{}: wrapper run {run} produced a wrong result", row.label))?;
        row.keep(record, sample, new, repeat);
        // A budget round measures the wrapper only: the direct column is a figure of the runs.
        if row.direct && record != Record::Budget {
            let before = counters(self)?;
            let sample = test_run(self.program(row.target)?, &frame, &ctx, repeat)?;
            self.check(row, &frame, &sample, false, repeat, before.as_ref())
                .with_context(|| {
                    format!("{}: direct run {run} produced a wrong result", row.label)
                })?;
            if record == Record::Run {
                row.direct_samples.push(sample);
            }
        }
        Ok(())
    }
}

impl Bench {
    /// [`Bench::run_row`] for the per-feature and scale balancers (through the wrapper
    /// only).
    fn run_custom_row(
        &mut self,
        i: usize,
        row: &mut Row,
        frame: &[u8],
        run: usize,
        repeat: u32,
        record: Record,
    ) -> anyhow::Result<()> {
        let ctx = xdp_md(frame.len(), self.ifindex, 0);
        let c = &self.customs[i];
        let target_fd = program_fd(c.lb.program(LB_PROGRAM)?)?;
        self.floors
            .arm(&target_fd, frame, u32::from(row.case.new_port()))?;
        let established = row.case == Case::LbEstablished;
        if established {
            // Two packets: new-flow table, then the flow table.
            let first = row.prime.as_deref().unwrap_or(frame);
            let first_ctx = xdp_md(first.len(), self.ifindex, 0);
            for _ in 0..2 {
                let before = c.counters()?;
                let prime = test_run(c.lb.program(LB_PROGRAM)?, first, &first_ctx, 1)
                    .context("priming the established flow")?;
                if prime.verdict != XDP_TX {
                    let after = c.counters()?;
                    let moved: Vec<String> = Counter::ALL
                        .iter()
                        .filter(|&&k| after.get(k) != before.get(k))
                        .map(|k| format!("{k:?}"))
                        .collect();
                    bail!(
                        "priming the established flow: verdict {} (counted: {})",
                        verdict_name(prime.verdict),
                        moved.join(", ")
                    );
                }
            }
        }
        let before = c.counters()?;
        let sample = test_run(
            program(&self.floors.ebpf, row.wrapper)?,
            frame,
            &ctx,
            repeat,
        )?;
        let new = c
            .check(
                frame,
                &sample,
                repeat,
                &before,
                established,
                row.case.new_port(),
            )
            .with_context(|| format!("{}: wrapper run {run} produced a wrong result", row.label))?;
        row.keep(record, sample, new, repeat);
        Ok(())
    }

    /// [`Bench::run_row`] for Katran (through the wrapper only).
    fn run_katran_row(
        &mut self,
        i: usize,
        row: &mut Row,
        frame: &[u8],
        run: usize,
        repeat: u32,
        record: Record,
    ) -> anyhow::Result<()> {
        let ctx = xdp_md(frame.len(), self.ifindex, 0);
        let target_fd = program_fd(self.katrans[i].program()?)?;
        self.floors
            .arm(&target_fd, frame, u32::from(row.case.new_port()))?;
        if row.case == Case::LbEstablished {
            // One packet (not a SYN): an LRU miss that inserts the flow.
            let prime = test_run(self.katrans[i].program()?, frame, &ctx, 1)
                .context("priming Katran's established flow")?;
            ensure!(
                prime.verdict == XDP_TX,
                "priming Katran's established flow: verdict {}",
                verdict_name(prime.verdict)
            );
        }
        let before = self.katran_counters(i)?;
        let sample = test_run(program(&self.floors.ebpf, WRAPPER)?, frame, &ctx, repeat)?;
        let misses = self
            .check_katran(i, row, frame, &sample, repeat, &before)
            .with_context(|| format!("{}: wrapper run {run} produced a wrong result", row.label))?;
        row.keep(record, sample, misses, repeat);
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

pub(crate) fn run(args: &Args) -> anyhow::Result<()> {
    let cpus = possible_cpus()?;
    let small_table = FLOWS_PER_CPU_SMALL * cpus;
    let repeat = args.repeat;
    let runs = args.runs;
    let budget_rounds = args.budget_rounds;
    let only = args.only.clone();
    // Katran's balancer, built from the vendored source before entering the bed: with its
    // default new-connection cap and with the cap raised.
    let katran_objects = build_katran();
    let others = other_objects()?;
    let (cpu, rows, load, katran_error) = in_bed("bench", &net(), move || {
        let cpu = pin_to_current_cpu()?;
        let ifindex = lb_agent::dataplane::loader::if_index(LB_IFACE)?;
        let (katrans, mut katran_error) = match katran_objects {
            Ok(objects) => match load_katrans(&objects, cpus) {
                Ok(k) => (k, None),
                Err(e) => (Vec::new(), Some(format!("{e:#}"))),
            },
            Err(e) => (Vec::new(), Some(e)),
        };
        let mut bench = Bench {
            floors: Floors::load()?,
            lbs: vec![Lb::load(FLOW_TABLE_BIG)?, Lb::load(small_table)?],
            katrans,
            customs: Vec::new(),
            cpu,
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
            Row::new(ESTABLISHED, Target::Lb(0), Case::LbEstablished, false),
            Row::new(
                "xdp_lb: established, FIB lookup",
                Target::Lb(0),
                Case::LbEstablished,
                false,
            )
            .fib(),
            Row::new(NON_VIP_ROW, Target::Lb(0), Case::LbNonVip, true),
            // On the raised-cap build: the default one, just after its SYN row went over
            // the cap, would not insert the flow being primed (the established path
            // itself is the same code in both builds).
            Row::new(
                KATRAN_ESTABLISHED,
                Target::Katran(KATRAN_RAISED),
                Case::LbEstablished,
                false,
            ),
            Row::new(
                KATRAN_SYN_RAISED,
                Target::Katran(KATRAN_RAISED),
                Case::LbNewFlow,
                false,
            ),
            Row::new(
                KATRAN_SYN_DEFAULT,
                Target::Katran(KATRAN_DEFAULT),
                Case::LbNewFlow,
                false,
            ),
            Row::new(
                KATRAN_NON_VIP,
                Target::Katran(KATRAN_DEFAULT),
                Case::LbNonVip,
                false,
            ),
        ];
        // Other builds of the object: their established row right after the agent's,
        // their non-VIP row right after the agent's.
        let after = |rows: &[Row], label: &str| {
            rows.iter()
                .position(|r| r.label == label)
                .map_or(rows.len(), |i| i + 1)
        };
        for (k, (label, object)) in others.iter().enumerate() {
            bench.lbs.push(
                Lb::load_object(FLOW_TABLE_BIG, Some(object))
                    .with_context(|| format!("loading the object \"{label}\""))?,
            );
            let lb = Target::Lb(bench.lbs.len() - 1);
            let at = after(&rows, ESTABLISHED) + k;
            rows.insert(
                at,
                Row::new(
                    format!("xdp_lb [{label}]: established flow"),
                    lb,
                    Case::LbEstablished,
                    false,
                ),
            );
            let at = after(&rows, NON_VIP_ROW) + k;
            rows.insert(
                at,
                Row::new(
                    format!("xdp_lb [{label}]: non-VIP packet"),
                    lb,
                    Case::LbNonVip,
                    true,
                ),
            );
        }
        if bench.katrans.is_empty() {
            rows.retain(|r| !matches!(r.target, Target::Katran(_)));
        }
        let env = Env {
            lb_addr: LB_ADDR,
            lb_addr6: LB_ADDR6,
            lb_mac: bench.lb_mac,
            ifindex,
        };
        // Per-feature and scale balancers: each spec's rows, and the balancer they run
        // on, loaded only when a row of it is left after `--only`.
        let mut specs = extra_specs(cpus, small_table, &others);
        let keep = |r: &Row| match &only {
            Some(only) => {
                only.split('|').any(|text| r.label.contains(text))
                    || matches!(
                        r.case,
                        Case::FloorPass | Case::FloorPassNewPort | Case::Floor6in6 | Case::FloorGue
                    )
            }
            None => true,
        };
        rows.retain(keep);
        for spec in &mut specs {
            spec.rows.retain(keep);
            if spec.rows.is_empty() {
                continue;
            }
            let i = bench.customs.len();
            if let Some(load) = spec.load.take() {
                let started = std::time::Instant::now();
                let c = load(&env, &bench).with_context(|| {
                    format!("loading the balancer of \"{}\"", spec.rows[0].label)
                })?;
                eprintln!(
                    "bench xdp: loaded the balancer of \"{}\" in {:.1} s",
                    spec.rows[0].label,
                    started.elapsed().as_secs_f64()
                );
                bench.customs.push(c);
            }
            for mut r in spec.rows.drain(..) {
                if r.target == Target::Custom(usize::MAX) {
                    r.target = Target::Custom(i);
                }
                rows.push(r);
            }
        }
        // Warm-up round (also fills the small flow table, so its runs evict): checked,
        // not recorded.
        for row in &mut rows {
            let warm = if row.target == Target::Lb(1)
                || (matches!(row.target, Target::Katran(_) | Target::Custom(_))
                    && row.case == Case::LbNewFlow)
            {
                200_000
            } else {
                (repeat / 10).max(1_000)
            };
            let result = bench
                .run_row(row, 199, warm, Record::Warm)
                .with_context(|| format!("warm-up of {}", row.label));
            match result {
                // Katran's rows go, with the reason; xdp_lb's figures still count.
                Err(e) if matches!(row.target, Target::Katran(_)) => {
                    katran_error.get_or_insert(format!("{e:#}"));
                }
                r => r?,
            }
        }
        if katran_error.is_some() {
            rows.retain(|r| !matches!(r.target, Target::Katran(_)));
        }
        let start = cpu_times();
        for run in 0..runs {
            for row in &mut rows {
                bench.run_row(row, run, repeat, Record::Run)?;
            }
        }
        // The budget rounds: the floor, its baseline and the established rows again.
        for round in 0..budget_rounds {
            // The main table's rows only: the per-feature and scale rows keep the runs'
            // pairs (their balancers would add seconds to every round).
            for row in rows
                .iter_mut()
                .filter(|r| in_budget(r) && r.group == Group::Main)
            {
                bench.run_row(row, runs + round, repeat, Record::Budget)?;
            }
        }
        let load = Load::between(&start, &cpu_times(), cpu);
        Ok((cpu, rows, load, katran_error))
    })?;
    report(
        &rows,
        args,
        cpu,
        cpus,
        small_table,
        &load,
        katran_error.as_deref(),
    )
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

/// The LB's IPv6 address (outer source of 6in6).
const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x10);
/// The IPv6 VIP and client of the 6in6 row.
const VIP6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, 1), 80, 0, 0);
const CLIENT6: SocketAddrV6 =
    SocketAddrV6::new(Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2), 40000, 0, 0);
/// The QUIC service of the per-feature rows, and the `quic_id` its packets name
/// (backend 1's).
const QUIC_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 2), 443);
const QUIC_ID: u32 = 0x0102;
/// The client of the QUIC row whose flow is in the flow table.
const QUIC_CLIENT2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 40001);
/// Flows of the full-table scale rows, on the measuring CPU.
const FULL_TABLE: u32 = 1_000_000;

/// How a spec's balancer is loaded.
type LoadFn = Box<dyn FnOnce(&Env, &Bench) -> anyhow::Result<Custom> + Send>;

/// Rows on one balancer of their own (per-feature, scale), or baseline rows (`load` None).
struct Spec {
    load: Option<LoadFn>,
    rows: Vec<Row>,
}

/// The per-feature row of the source lists, after "feature: " (or "feature [label]: ").
const LISTS_ROW: &str = "established, deny 1000 + allow 1000 prefixes";
/// The per-feature row of the IPv6 VIP, likewise.
const IPV6_ROW: &str = "IPv6 VIP, established (6in6)";

/// The state of the lists row: a deny list of 1000 /24s that do not hold the client,
/// an allow list of 1000 whose last holds it.
fn with_lists(d: &mut DesiredState) {
    d.filters.deny = xdp_custom::prefixes(1000, Ipv4Addr::new(203, 0, 0, 0));
    let mut allow = xdp_custom::prefixes(999, Ipv4Addr::new(100, 64, 0, 0));
    allow.push("198.18.0.0/24".parse().expect("prefix"));
    d.filters.allow = allow;
}

/// The per-feature and scale rows (items 2 and 3 of issue 12); `others`: the other
/// builds of the object (`XDPLB_BENCH_LB_OBJECTS`), which get the rows of the source
/// lists and of the IPv6 VIP too ("feature [label]: ..."), each on a balancer of its
/// own loaded from that build, right after the agent's row: the code those rows
/// measure is what builds of the short paths change.
fn extra_specs(cpus: u32, small_table: u32, others: &[(String, Vec<u8>)]) -> Vec<Spec> {
    let custom = Target::Custom(usize::MAX);
    let est = |label: &str| {
        Row::new(label, custom, Case::LbEstablished, false)
            .group(Group::Features)
            .uses(Use::No)
    };
    let frame6 = xdp_custom::frame6(CLIENT6, VIP6);
    let mut specs = vec![
        Spec {
            load: None,
            rows: vec![
                Row::new(
                    "floor: XDP_PASS, IPv6 wrapper",
                    Target::Floor(FLOOR_PASS),
                    Case::FloorPass,
                    false,
                )
                .group(Group::Features)
                .wrapped(WRAP_IPV6, Some(frame6.clone())),
                Row::new(
                    "floor: XDP_PASS, GUE wrapper",
                    Target::Floor(FLOOR_PASS),
                    Case::FloorPass,
                    false,
                )
                .group(Group::Features)
                .wrapped(WRAP_GUE, None),
                // The floors of the other tunnels, behind the wrappers that undo them:
                // the 6in6 and GUE rows are compared with these as well as with IPIP's.
                Row::new(
                    FLOOR_6IN6_LABEL,
                    Target::Floor(FLOOR_6IN6),
                    Case::Floor6in6,
                    false,
                )
                .group(Group::Features)
                .wrapped(WRAP_IPV6, Some(frame6.clone())),
                Row::new(
                    FLOOR_GUE_LABEL,
                    Target::Floor(FLOOR_GUE),
                    Case::FloorGue,
                    false,
                )
                .group(Group::Features)
                .wrapped(WRAP_GUE, None),
            ],
        },
        Spec {
            load: Some(Box::new(|env, _| {
                Custom::feature(env, VIP, FLOW_TABLE_BIG, with_lists)
            })),
            rows: vec![est(&format!("feature: {LISTS_ROW}"))],
        },
        Spec {
            load: Some(Box::new(|env, _| {
                Custom::feature(env, VIP, FLOW_TABLE_BIG, |d| {
                    d.filters.new_flows = Some(xdp_custom::flood_limit());
                })
            })),
            rows: vec![est("feature: established, flood limit set")],
        },
        Spec {
            load: Some(Box::new(|env, _| {
                Custom::feature(env, VIP, FLOW_TABLE_BIG, |d| {
                    xdp_custom::add_quic(d, QUIC_VIP);
                })
            })),
            rows: vec![est("feature: established, QUIC service present")],
        },
        Spec {
            load: Some(Box::new(|env, _| {
                Custom::feature(env, VIP, FLOW_TABLE_BIG, |d| {
                    xdp_custom::add_ipv6(d, VIP6);
                })
            })),
            rows: vec![est("feature: established, IPv6 service present")],
        },
        // The admission rule (`max_new_flows_per_cpu`): a SYN over the cap (1/s: every
        // iteration is over it) is sent by the ring and not recorded; beside it the same
        // balancer without a cap (every SYN recorded, evicting: the small table), and an
        // established flow with a cap set that it never reaches.
        Spec {
            load: Some(Box::new(move |env, _| {
                Custom::feature(env, VIP, small_table, |_| {})
            })),
            rows: vec![
                Row::new(
                    "feature: new-flow SYN, no cap (every SYN recorded)",
                    custom,
                    Case::LbNewFlow,
                    false,
                )
                .group(Group::Features)
                .uses(Use::Baseline),
            ],
        },
        Spec {
            load: Some(Box::new(move |env, _| {
                Custom::feature(env, VIP, small_table, |d| d.max_new_flows_per_cpu = 1)
            })),
            rows: vec![
                Row::new(
                    "feature: new-flow SYN over max_new_flows_per_cpu (not recorded)",
                    custom,
                    Case::LbNewFlow,
                    false,
                )
                .group(Group::Features)
                .uses(Use::Yes),
            ],
        },
        Spec {
            load: Some(Box::new(|env, _| {
                Custom::feature(env, VIP, FLOW_TABLE_BIG, |d| {
                    d.max_new_flows_per_cpu = 125_000;
                })
            })),
            rows: vec![est(
                "feature: established, max_new_flows_per_cpu = 125000 set",
            )],
        },
        Spec {
            load: Some(Box::new(|env, _| {
                Custom::ipv6(env, VIP6, FLOW_TABLE_BIG, None)
            })),
            rows: vec![
                est(&format!("feature: {IPV6_ROW}"))
                    .uses(Use::Yes)
                    .wrapped(WRAP_IPV6, Some(frame6.clone())),
            ],
        },
        Spec {
            load: Some(Box::new(|env, _| {
                Custom::feature(env, VIP, FLOW_TABLE_BIG, |d| d.encap = ENCAP_GUE)
            })),
            rows: vec![
                est("feature: GUE, established")
                    .uses(Use::Yes)
                    .wrapped(WRAP_GUE, None),
            ],
        },
        Spec {
            load: Some(Box::new(|env, _| {
                Custom::quic(env, VIP, QUIC_VIP, FLOW_TABLE_BIG)
            })),
            rows: vec![
                est("feature: QUIC short header, routed by CID")
                    .uses(Use::Yes)
                    .wrapped(
                        WRAPPER,
                        Some(xdp_custom::quic_frame(CLIENT, QUIC_VIP, QUIC_ID)),
                    ),
                // The usual case: a connection whose handshake (long headers) put its
                // 5-tuple in the flow table; its short headers still go by CID. Another
                // client port, so the row above stays a flow-table miss (a migrated
                // connection).
                est("feature: QUIC short header of a flow in the table, routed by CID")
                    .uses(Use::Yes)
                    .wrapped(
                        WRAPPER,
                        Some(xdp_custom::quic_frame(QUIC_CLIENT2, QUIC_VIP, QUIC_ID)),
                    )
                    .primed(xdp_custom::quic_long_frame(QUIC_CLIENT2, QUIC_VIP)),
            ],
        },
    ];
    // The other builds' rows, right after the agent's (in the order given).
    let after = |specs: &[Spec], row: &str| {
        let label = format!("feature: {row}");
        specs
            .iter()
            .position(|s| s.rows.iter().any(|r| r.label == label))
            .map_or(specs.len(), |i| i + 1)
    };
    for (k, (label, object)) in others.iter().enumerate() {
        let bytes = object.clone();
        specs.insert(
            after(&specs, LISTS_ROW) + k,
            Spec {
                load: Some(Box::new(move |env, _| {
                    Custom::feature_object(env, VIP, FLOW_TABLE_BIG, Some(&bytes), with_lists)
                })),
                rows: vec![est(&format!("feature [{label}]: {LISTS_ROW}"))],
            },
        );
        let bytes = object.clone();
        specs.insert(
            after(&specs, IPV6_ROW) + k,
            Spec {
                load: Some(Box::new(move |env, _| {
                    Custom::ipv6(env, VIP6, FLOW_TABLE_BIG, Some(&bytes))
                })),
                rows: vec![
                    est(&format!("feature [{label}]: {IPV6_ROW}"))
                        .uses(Use::Yes)
                        .wrapped(WRAP_IPV6, Some(frame6.clone())),
                ],
            },
        );
    }
    for (services, backends) in [(1, 10), (100, 10), (1000, 10), (1, 1000)] {
        let name = format!("scale: {services} svc x {backends} backends");
        specs.push(Spec {
            load: Some(Box::new(move |env, _| {
                Custom::scale(services, backends, small_table, small_table, env)
            })),
            rows: vec![
                Row::new(
                    format!("{name}: established"),
                    custom,
                    Case::LbEstablished,
                    false,
                )
                .group(Group::Scale)
                .for_vip(xdp_custom::scale_vip(0)),
                Row::new(
                    format!("{name}: new-flow SYN"),
                    custom,
                    Case::LbNewFlow,
                    false,
                )
                .group(Group::Scale)
                .for_vip(xdp_custom::scale_vip(0)),
            ],
        });
    }
    specs.push(Spec {
        load: Some(Box::new(move |env, bench| {
            let c = Custom::scale(1, 10, FULL_TABLE * cpus, small_table, env)?;
            fill_flow_table(&c, bench, FULL_TABLE)?;
            Ok(c)
        })),
        rows: vec![
            Row::new(
                "scale: flow table full (1M): established",
                custom,
                Case::LbEstablished,
                false,
            )
            .group(Group::Scale)
            .for_vip(xdp_custom::scale_vip(0)),
            Row::new(
                "scale: flow table full (1M): new flow every packet",
                custom,
                Case::LbNewFlow,
                false,
            )
            .group(Group::Scale)
            .for_vip(xdp_custom::scale_vip(0)),
        ],
    });
    specs
}

/// Puts `n` flows into the flow table of `c` as traffic does: two packets of each
/// (the first enters the new-flow table, the second the flow table), all from this
/// CPU, sources 10.0.0.0 + i (port 1000); checks the count and a sample.
fn fill_flow_table(c: &Custom, bench: &Bench, n: u32) -> anyhow::Result<()> {
    let vip = xdp_custom::scale_vip(0);
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    let mut frame = PacketBuilder::tcp(SocketAddrV4::new(Ipv4Addr::from(base), 1000), vip).build();
    let ctx = xdp_md(frame.len(), bench.ifindex, 0);
    let prog = c.lb.program(LB_PROGRAM)?;
    let ip = ETH_HLEN;
    let before = c.counters()?;
    for i in 0..n {
        let src = Ipv4Addr::from(base + i);
        frame[ip + 12..ip + 16].copy_from_slice(&src.octets());
        frame[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
        let sum = xdplb_tests::packet::internet_checksum(&frame[ip..ip + IPV4_HLEN]);
        frame[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
        for _ in 0..2 {
            let r = test_run(prog, &frame, &ctx, 1)?;
            ensure!(
                r.verdict == XDP_TX,
                "filling the flow table: flow {i}: verdict {}",
                verdict_name(r.verdict)
            );
        }
    }
    let after = c.counters()?;
    let new = after.get(Counter::FlowNew) - before.get(Counter::FlowNew);
    ensure!(
        new == u64::from(n),
        "filling the flow table: {new} new flows counted for {n} flows"
    );
    for i in [0, n / 2, n - 1] {
        let key = flow_key(
            SocketAddrV4::new(Ipv4Addr::from(base + i), 1000),
            vip,
            PROTO_TCP,
        );
        ensure!(
            c.lb.flow_entry(&key, false).is_some(),
            "filling the flow table: flow {i} of {n} is not in it"
        );
    }
    Ok(())
}

const FLOOR_6IN6_LABEL: &str = "floor: parse IPv6+lookup+6in6+TX";
const FLOOR_GUE_LABEL: &str = "floor: parse+lookup+GUE+TX";

/// The frame `floor_6in6` (`case` [`Case::Floor6in6`]) or `floor_gue` sends for `input`:
/// MACs swapped, the outer header of its tunnel (`floors.rs`), the inner packet as it came.
fn floor_tunnel_frame(case: Case, input: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (dst, src) = (
        <[u8; 6]>::try_from(&input[6..12])?,
        <[u8; 6]>::try_from(&input[..6])?,
    );
    if case == Case::Floor6in6 {
        let inner = &input[ETH_HLEN..];
        let tc = (inner[0] << 4) | (inner[1] >> 4);
        let len = u16::try_from(inner.len())?;
        let mut l3 =
            packet6::ipv6_header(LB_ADDR6, FLOOR_BACKEND6, IPPROTO_IPV6, len, tc, 64).to_vec();
        l3.extend_from_slice(inner);
        return Ok(packet6::eth(dst, src, None, 0x86dd, &l3));
    }
    let ip = Frame::parse(input)?.ipv4()?;
    let mut inner = ip.header.clone();
    inner.extend_from_slice(&ip.payload);
    let entropy = lb_common::hash::tunnel_entropy(&flow_key_of(input)?);
    let mut udp = Vec::with_capacity(8 + inner.len());
    udp.extend_from_slice(&lb_common::hash::gue_source_port(entropy).to_be_bytes());
    udp.extend_from_slice(&xdp_custom::GUE_PORT.to_be_bytes());
    udp.extend_from_slice(&u16::try_from(8 + inner.len())?.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&inner);
    let l3 = packet6::ipv4_tunnel(LB_ADDR, BACKENDS[0], 17, ip.tos, &udp);
    Ok(packet6::eth(dst, src, None, 0x0800, &l3))
}

/// Katran's rows.
const KATRAN_ESTABLISHED: &str = "Katran: established flow";
const KATRAN_SYN_RAISED: &str = "Katran: new-flow SYN, cap raised";
const KATRAN_SYN_DEFAULT: &str = "Katran: SYN, default cap";
const KATRAN_NON_VIP: &str = "Katran: non-VIP packet";
/// Indices into [`Bench::katrans`].
const KATRAN_DEFAULT: usize = 0;
const KATRAN_RAISED: usize = 1;

/// Builds Katran's balancer twice (default cap, raised cap); the error says why not.
fn build_katran() -> Result<[Vec<u8>; 2], String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let one = |rate: Option<u64>, name: &str| {
        katran::build(&dir.path().join(name), rate).map_err(|e| format!("{e:#}"))
    };
    Ok([
        one(None, "balancer.o")?,
        one(Some(katran::RAISED_MAX_CONN_RATE), "balancer_raised.o")?,
    ])
}

/// Loads both Katran objects, maps filled for the bench's VIP and backends; the LRU of
/// every CPU as large as `xdp_lb`'s per-CPU share of the all-miss table.
fn load_katrans(objects: &[Vec<u8>; 2], cpus: u32) -> anyhow::Result<Vec<Katran>> {
    let keys: Vec<String> = BACKENDS
        .iter()
        .map(|b| SocketAddrV4::new(*b, VIP.port()).to_string())
        .collect();
    let members: Vec<RingMember<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| RingMember {
            id: u32::try_from(i + 1).expect("4 backends"),
            key,
            weight: 100,
        })
        .collect();
    let ring = ring::build(&members, katran::RING_SIZE).context("empty ring")?;
    objects
        .iter()
        .map(|o| {
            Katran::load(
                o,
                VIP,
                &BACKENDS,
                &ring,
                ROUTER_MAC,
                cpus,
                FLOWS_PER_CPU_SMALL,
            )
        })
        .collect()
}

/// Katran's default router MAC (`ctl_array[0]`).
const ROUTER_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x01];

/// Net ns of `r` per run (each run's raw figure minus the median of its baseline).
fn net_samples(rows: &[Row], r: &Row) -> Vec<f64> {
    let base = baseline(rows, r).map_or(f64::NAN, |b| kernel_median(&b.raw));
    r.raw.iter().map(|s| s.kernel_ns as f64 - base).collect()
}

/// Share of iterations that missed the flow table, for balancer VIP rows.
fn new_flows_cell(r: &Row) -> Cell {
    match r.case {
        Case::LbNewFlow | Case::LbEstablished => Cell::text(format!(
            "{:.1}%",
            100.0 * r.new_flows as f64 / r.iterations.max(1) as f64
        )),
        _ => Cell::text(""),
    }
}

/// `a / b` with two decimals, or "-".
fn ratio(a: f64, b: f64) -> String {
    if a.is_finite() && b.is_finite() && b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".to_owned()
    }
}

/// The side-by-side table: `xdp_lb` and Katran, net ns, ratio.
fn report_katran(report: &mut Report, rows: &[Row], error: Option<&str>, cpus: u32) {
    if let Some(e) = error {
        report.note(format!("Katran: not measured: {e}"));
        return;
    }
    if !rows.iter().any(|r| matches!(r.target, Target::Katran(_))) {
        return;
    }
    let net = |label: &str| {
        rows.iter()
            .find(|r| r.label == label)
            .map(|r| net_samples(rows, r))
    };
    let cases = [
        (
            "established flow (flow-table hit)",
            "xdp_lb: established flow",
            KATRAN_ESTABLISHED,
        ),
        (
            "new-flow SYN, both inserting",
            "xdp_lb: new-flow SYN",
            KATRAN_SYN_RAISED,
        ),
        (
            "new-flow SYN, Katran's default cap (no LRU insert above 125k new flows/s/CPU)",
            "xdp_lb: new-flow SYN",
            KATRAN_SYN_DEFAULT,
        ),
        ("non-VIP packet", NON_VIP_ROW, KATRAN_NON_VIP),
    ];
    let table = report.table(
        "xdp_lb beside Katran: same process, same wrapper, same runs; net ns per packet, median (min-max) over runs",
        &[
            ("case", false),
            ("xdp_lb", true),
            ("Katran", true),
            ("ratio xdp_lb/Katran", true),
        ],
    );
    for (case, lb, k) in cases {
        let (Some(a), Some(b)) = (net(lb), net(k)) else {
            continue;
        };
        let a = Cell::samples("ns", 0, &a);
        let b = Cell::samples("ns", 0, &b);
        let r = ratio(
            a.median().unwrap_or(f64::NAN),
            b.median().unwrap_or(f64::NAN),
        );
        table.row(vec![Cell::text(case), a, b, Cell::text(r)]);
    }
    report.note(format!(
        "Katran: {} (commit {KATRAN_COMMIT}), built by the bench with its own Makefile rule: {};\n\
         \x20 once as is (MAX_CONN_RATE {} new flows/s/CPU) and once with -DMAX_CONN_RATE={}ULL (\"cap raised\").\n\
         \x20 Maps as its control plane fills them: one VIP, 4 reals, a {}-slot ring, one LRU of {} entries\n\
         \x20 per CPU ({cpus} CPUs) in lru_mapping, the default router MAC in ctl_array. Every run's last output\n\
         \x20 was checked (IPIP to a real; established: the real its LRU names) and its counters\n\
         \x20 (Katran's new flows column = its LRU misses). The SYN rows compare with xdp_lb's all-miss\n\
         \x20 table ({} entries per CPU, evicting); with the default cap Katran stops inserting after\n\
         \x20 125,000 SYNs in a second, so most of its SYNs skip the LRU write.",
        katran::source_dir().display(),
        katran::build_command(None),
        katran::DEFAULT_MAX_CONN_RATE,
        katran::RAISED_MAX_CONN_RATE,
        katran::RING_SIZE,
        FLOWS_PER_CPU_SMALL,
        FLOWS_PER_CPU_SMALL,
    ));
}

/// The main table's established-flow row: the budget's numerator.
const ESTABLISHED: &str = "xdp_lb: established flow";
/// The agent's own build on a TCP SYN to no VIP (passed up).
const NON_VIP_ROW: &str = "xdp_lb: non-VIP packet";

/// The Katran commit vendored under `tests/vendor/katran`.
const KATRAN_COMMIT: &str = "19f08fec82fb7b5fb14d935a80057bdc0897c8de";

/// The `floor_pass` row behind the same wrapper as `r` (with the new-port mode when `r`
/// has it): `r`'s baseline.
fn baseline<'a>(rows: &'a [Row], r: &Row) -> Option<&'a Row> {
    let case = if r.case.new_port() {
        Case::FloorPassNewPort
    } else {
        Case::FloorPass
    };
    rows.iter()
        .find(|b| b.case == case && b.wrapper == r.wrapper)
}

/// The per-feature and scale tables.
fn report_groups(report: &mut Report, rows: &[Row]) {
    let median_net = |pred: &dyn Fn(&Row) -> bool| {
        rows.iter()
            .find(|r| pred(r))
            .map_or(f64::NAN, |r| median_f64(&net_samples(rows, r)))
    };
    let floor = median_net(&|r: &Row| r.case == Case::FloorIpip);
    let floor6 = median_net(&|r: &Row| r.case == Case::Floor6in6);
    let floor_gue = median_net(&|r: &Row| r.case == Case::FloorGue);
    // Each row's floor of the same encapsulation: the wrapper names the tunnel.
    let own_floor = |r: &Row| match r.wrapper {
        WRAP_IPV6 => floor6,
        WRAP_GUE => floor_gue,
        _ => floor,
    };
    let established = median_net(&|r: &Row| r.label == "xdp_lb: established flow");
    for (group, title, note) in [
        (
            Group::Features,
            "Per-feature rows (issue 12 item 2): an established flow with a feature loaded, or using it; net ns per packet, median (min-max) over runs",
            "Per-feature rows: packet = whether the measured packet uses the row's feature (the budget,\n\
             \x20 1.5x the floor, is for packets that do not: the feature configured, the packet not using it);\n\
             \x20 x floor = net / net of \"floor: parse+lookup+IPIP+TX\" (the budget is 1.5);\n\
             \x20 x own floor = net / net of the floor of the row's own tunnel: \"floor: parse IPv6+lookup+6in6+TX\"\n\
             \x20 for the 6in6 rows, \"floor: parse+lookup+GUE+TX\" for the GUE rows (GUE source port from the\n\
             \x20 flow's tunnel_entropy, UDP checksum 0), IPIP's for the rest (floors.rs);\n\
             \x20 vs est. = net / net of \"xdp_lb: established flow\" (main table). Each row is its own xdp_lb\n\
             \x20 (flow table 2^20) with one feature in its state: deny list of 1000 /24s that do not hold\n\
             \x20 the client and an allow list of 1000 that do; new_flows_per_source 1000/s burst 2000; a\n\
             \x20 second service, UDP with quic = true; a second service on an IPv6 VIP (IPv6 backends),\n\
             \x20 the packet IPv4; an IPv6 VIP with IPv6 backends (6in6); encap = gue;\n\
             \x20 a QUIC short header whose connection ID names backend 1 (quic_cid_routed counted), of a\n\
             \x20 5-tuple not in the flow table (a migrated connection) and of one two long headers put there;\n\
             \x20 max_new_flows_per_cpu: SYN rows on a flow table of 32768 per CPU (every SYN misses), the\n\
             \x20 cap at 0 (every SYN recorded, evicting) and at 1/s (every SYN over it: ring only, counted\n\
             \x20 flow_not_inserted), and an established flow with the cap at 125000 (never reached).\n\
             \x20 net = raw - raw of floor_pass behind the same wrapper: the 6in6 row runs behind bench_wrap6\n\
             \x20 (undoes 40 bytes), the GUE row behind bench_wrap_gue (28 bytes), the rest behind bench_wrap\n\
             \x20 (20 bytes of IPIP, as in the main table). Every run's output was checked: verdict, outer\n\
             \x20 header, inner packet byte for byte, backend (ring oracle; IPv6: one of the service's),\n\
             \x20 next-hop MACs, counters.",
        ),
        (
            Group::Scale,
            "Scale rows (issue 12 item 3): services, backends per service, a full flow table; net ns per packet, median (min-max) over runs",
            "Scale rows: each configuration is its own xdp_lb, every service's Maglev ring (65537 slots)\n\
             \x20 written by the agent's reconciler and every backend's next hop in NEXT_HOPS; packets go\n\
             \x20 to the first service. Flow and new-flow tables of the service/backend rows: 32768 entries\n\
             \x20 per CPU, so every SYN misses and evicts. Full table: the flow table sized 1,000,000 x possible\n\
             \x20 CPUs (it is a per-CPU LRU: each CPU's list holds size / possible CPUs), filled with 1,000,000\n\
             \x20 flows from the measuring CPU (two packets each, checked by flow_new and a sample lookup)\n\
             \x20 before the runs; \"new flow every packet\" is a SYN with a new source port every iteration\n\
             \x20 (a miss in the full table, an insert into the new-flow table). Loading 1000 services takes\n\
             \x20 about a minute here: the reconciler builds 1000 rings and writes their 65.5 million slots\n\
             \x20 in batches of 32768 (BPF_MAP_UPDATE_BATCH).",
        ),
    ] {
        let list: Vec<&Row> = rows.iter().filter(|r| r.group == group).collect();
        if list.iter().all(|r| matches!(r.target, Target::Floor(_))) {
            continue;
        }
        let table = report.table(
            title,
            &[
                ("row", false),
                ("packet", false),
                ("ns (net)", true),
                ("x floor", true),
                ("x own floor", true),
                ("vs est.", true),
                ("new flows", true),
            ],
        );
        for r in list {
            let net = Cell::samples("ns", 0, &net_samples(rows, r));
            let m = net.median().unwrap_or(f64::NAN);
            let packet = match r.uses {
                Use::None => "",
                Use::No => "does not use it",
                Use::Yes => "uses it",
                Use::Baseline => "baseline (feature off)",
            };
            table.row(vec![
                Cell::text(r.label.clone()),
                Cell::text(packet),
                net,
                Cell::text(ratio(m, floor)),
                Cell::text(ratio(m, own_floor(r))),
                Cell::text(ratio(m, established)),
                new_flows_cell(r),
            ]);
        }
        report.note(note);
    }
}

/// Net ns of `r` in each run, paired: run k's raw figure minus run k's raw figure of
/// its baseline (the same round of the interleaved runs), so that what slowed a whole
/// round (steal, other work, frequency) cancels in ratios of two rows.
fn paired_net(rows: &[Row], r: &Row) -> Vec<f64> {
    let Some(base) = baseline(rows, r) else {
        return Vec::new();
    };
    r.raw
        .iter()
        .chain(&r.budget)
        .zip(base.raw.iter().chain(&base.budget))
        .map(|(a, b)| a.kernel_ns as f64 - b.kernel_ns as f64)
        .collect()
}

/// The budget's rows: the IPIP floor, `floor_pass` behind its wrapper, and every
/// established IPv4 flow row behind that wrapper whose packet does not use its row's
/// feature.
fn in_budget(r: &Row) -> bool {
    r.wrapper == WRAPPER
        && (r.case == Case::FloorIpip
            || r.case == Case::FloorPass
            || (r.case == Case::LbEstablished && r.uses != Use::Yes))
}

/// The budget table (issue 12, item 2): every established IPv4 flow row over the
/// parse+lookup+IPIP floor, as the median of the per-run ratios (each run's row and
/// floor from the same round, each net of the same round's `floor_pass`) with its
/// quartiles, beside the ratio of the row medians.
fn report_budget(report: &mut Report, rows: &[Row]) {
    let Some(floor) = rows.iter().find(|r| r.case == Case::FloorIpip) else {
        return;
    };
    let floor_net = paired_net(rows, floor);
    let floor_median = median_f64(&net_samples(rows, floor));
    let est = rows
        .iter()
        .find(|r| r.label == ESTABLISHED)
        .map(|r| paired_net(rows, r));
    let list: Vec<&Row> = rows
        .iter()
        .filter(|r| r.case == Case::LbEstablished && in_budget(r))
        .collect();
    if list.is_empty() || floor_net.is_empty() {
        return;
    }
    let table = report.table(
        format!(
            "Budget (issue 12 item 2: established flow <= 1.5x the parse+lookup+IPIP floor): per-run ratios over {} rounds ({} runs + {} budget rounds), each round's row over the same round's floor",
            floor_net.len(),
            floor.raw.len(),
            floor.budget.len()
        ),
        &[
            ("row", false),
            ("ns (net)", true),
            ("x floor (medians)", true),
            ("per-run x floor: median", true),
            ("quartiles", true),
            ("min-max", true),
            ("rounds <= 1.5", true),
            ("vs est. (paired ns)", true),
        ],
    );
    for r in list {
        let net = paired_net(rows, r);
        let ratios: Vec<f64> = net
            .iter()
            .zip(&floor_net)
            .map(|(a, f)| if *f > 0.0 { a / f } else { f64::NAN })
            .collect();
        let under = ratios.iter().filter(|x| **x <= 1.5).count();
        let vs_est = match &est {
            Some(e) if r.label != ESTABLISHED => {
                let d: Vec<f64> = net.iter().zip(e).map(|(a, b)| a - b).collect();
                format!("{:+.1}", report::median(&d))
            }
            _ => String::new(),
        };
        // NaN where no round had a positive floor.
        let stats = Stats::of(&ratios);
        let s = |get: fn(&Stats) -> f64| stats.as_ref().map_or(f64::NAN, get);
        table.row(vec![
            Cell::text(r.label.clone()),
            Cell::samples("ns", 0, &net_samples(rows, r)),
            Cell::text(ratio(median_f64(&net_samples(rows, r)), floor_median)),
            Cell::text(format!("{:.2}", s(|s| s.median))),
            Cell::text(format!("{:.2}-{:.2}", s(|s| s.p25), s(|s| s.p75))),
            Cell::text(format!("{:.2}-{:.2}", s(|s| s.min), s(|s| s.max))),
            Cell::text(format!("{under}/{}", ratios.len())),
            Cell::text(vs_est),
        ]);
    }
    report.note(
        "Budget: per-run x floor = (raw of the row - raw of floor_pass) / (raw of the IPIP floor - raw of\n\
         \x20 floor_pass), all three from the same round of the interleaved runs: a round slowed as a\n\
         \x20 whole (steal, other work) cancels, where the ratio of two medians taken over different\n\
         \x20 rounds wanders with it. Median and quartiles over the rounds; \"rounds <= 1.5\" counts the\n\
         \x20 rounds within the budget. Rounds: the runs of every row, then --budget-rounds more of the\n\
         \x20 main table's rows among these (the floor, floor_pass, the established rows, Katran's;\n\
         \x20 per-feature and scale rows: the runs alone). ns (net) and\n\
         \x20 x floor (medians) are over the runs alone, as in the tables above. Rows: every established\n\
         \x20 IPv4 flow row behind bench_wrap whose packet does not use its row's feature. vs est. =\n\
         \x20 median over the rounds of (row - \"xdp_lb: established flow\"), paired per round: what a\n\
         \x20 per-feature balancer or another build (XDPLB_BENCH_LB_OBJECTS) adds or saves.",
    );
}

/// The main table (floors, xdp_lb, Katran's rows) and its notes.
fn report_main(report: &mut Report, rows: &[Row], args: &Args, cpus: u32, small_table: u32) {
    let floor_row = rows.iter().find(|r| r.case == Case::FloorIpip);
    let floor = floor_row.map_or(f64::NAN, |r| median_f64(&net_samples(rows, r)));
    let table = report.table(
        format!(
            "ns per packet, {} runs x {} iterations per program, runs interleaved; median (min-max) over runs",
            args.runs, args.repeat
        ),
        &[
            ("program", false),
            ("ns (net)", true),
            ("raw", true),
            ("raw wall", true),
            ("direct", true),
            ("ratio*", true),
            ("new flows", true),
        ],
    );
    for r in rows.iter().filter(|r| r.group == Group::Main) {
        let net = Cell::samples("ns", 0, &net_samples(rows, r));
        let m = net.median().unwrap_or(f64::NAN);
        let raw: Vec<f64> = r.raw.iter().map(|s| s.kernel_ns as f64).collect();
        let wall: Vec<f64> = r.raw.iter().map(|s| s.wall_ns).collect();
        let direct: Vec<f64> = r
            .direct_samples
            .iter()
            .map(|s| s.kernel_ns as f64)
            .collect();
        table.row(vec![
            Cell::text(r.label.clone()),
            net,
            Cell::samples("", 0, &raw),
            Cell::samples("", 1, &wall).with_shown(format!("{:.1}", median_f64(&wall))),
            if direct.is_empty() {
                Cell::text("-")
            } else {
                Cell::samples("", 0, &direct)
            },
            Cell::text(ratio(m, floor)),
            new_flows_cell(r),
        ]);
    }
    report.note(format!(
        "* ratio = net / net of \"floor: parse+lookup+IPIP+TX\".\n\
         net = raw - raw of \"floor: XDP_PASS\" (the wrapper's own cost: un-encapsulate, restore\n\
         \x20 the Ethernet header, tail call); for SYN rows raw - raw of \"XDP_PASS, new port/iter\"\n\
         \x20 (the wrapper also writes a new source port). raw = wrapper -> program with\n\
         \x20 repeat = N (the kernel does not reset the packet between iterations; the wrapper undoes\n\
         \x20 the previous iteration). direct = the program alone with repeat = N, only where its\n\
         \x20 cost does not depend on the previous iteration. raw wall = wall clock of the test_run\n\
         \x20 syscall / N (median). Kernel figures are whole ns (truncated).\n\
         Every run's last iteration was checked: verdict, output frame (IPIP to the backend the hash\n\
         \x20 oracle predicts, correct outer header), and xdp_lb's counters.\n\
         new flows = share of iterations that missed the flow table (xdp_lb's flow_new counter).\n\
         \x20 The wrapper gives SYN rows a new source port every iteration; ports wrap every 65536.\n\
         \x20 \"new-flow SYN\": new-flow table (where a SYN waits for its flow's second packet) of\n\
         \x20 {small_table} entries = {FLOWS_PER_CPU_SMALL} per CPU (per-CPU LRU), fewer than one port cycle, so every\n\
         \x20 SYN misses, takes a ring slot and evicts (a full table in production). \"SYN, 2^20 table\":\n\
         \x20 the production size ({} per CPU) keeps a whole port cycle, so after the first 65536\n\
         \x20 iterations of a run the reused ports hit the table.",
        FLOW_TABLE_BIG / cpus
    ));
}

/// Everything measured: printed, and written as `xdp.json` (report.rs).
fn report(
    rows: &[Row],
    args: &Args,
    cpu: usize,
    cpus: u32,
    small_table: u32,
    load: &Load,
    katran_error: Option<&str>,
) -> anyhow::Result<()> {
    let mut report = Report::new(
        "xdp",
        format!(
            "ns per packet through BPF_PROG_TEST_RUN; kernel {}, {}, thread pinned to CPU {cpu} ({cpus} possible CPUs)",
            kernel_release(),
            cpu_model()
        ),
    );
    report_main(&mut report, rows, args, cpus, small_table);
    report_budget(&mut report, rows);
    report_katran(&mut report, rows, katran_error, cpus);
    report_groups(&mut report, rows);
    report.note(format!(
        "While measuring: other CPUs {:.0}% busy, steal on CPU {cpu} {:.1}%{}",
        100.0 * load.others_busy,
        100.0 * load.steal,
        if load.others_busy > 0.2 || load.steal > 0.02 {
            " (other work shares caches and, on a VM, perhaps the core: figures are inflated; \
             compare ratios, or rerun on an idle machine)"
        } else {
            ""
        }
    ));
    report.finish()?;
    Ok(())
}
