//! `wire`: packets per second forwarded by one LB core on veths with native XDP, beside
//! the same topology balanced by the kernel (nftables `numgen` DNAT, no LB in XDP).
//!
//! Bed (three namespaces of one run, removed on exit, also on error or panic):
//!
//! ```text
//! gen: G ──veth── LI :lb: LX ──veth── BX :be
//!   generator         LB (lb-agent or nftables)  backends 198.18.1.11-14 (one namespace)
//! ```
//!
//! - The generator is the kernel's own: `BPF_PROG_TEST_RUN` in live-frames mode
//!   (`BPF_F_TEST_XDP_LIVE_FRAMES`, the facility xdp-trafficgen is built on) runs
//!   `wire_gen` on a UDP frame from a client (198.18.0.100) with `ingress_ifindex` = G:
//!   XDP_TX sends every frame out of G, so it lands in LI's receive ring as an XDP frame
//!   (`ndo_xdp_xmit`), as a NIC hands frames to its driver. `wire_gen` writes the frame's
//!   first 48 bytes anew every time: the live-frames page pool recycles its pages with
//!   whatever the path after the generator wrote into them. That was why earlier
//!   versions of this bench lost most frames before LI (seen with tcpdump on G: the
//!   frames G received carried the LX->BX MACs and the DNATed destination; the LB's
//!   IPIP encapsulation, the stack's MAC rewrite and DNAT came back in later frames,
//!   which then went nowhere).
//!   Debian's xdp-tools 1.3.1 (xdp-trafficgen, xdp-bench) cannot be used here: its
//!   objects carry a tracepoint program for `xdp_redirect_map_err`, which this kernel no
//!   longer has, and libbpf refuses to load them ("failed to find kernel BTF type ID of
//!   'xdp_redirect_map_err'"); its trafficgen also sends only 64-byte IPv6 UDP.
//! - One flow (fixed 5-tuple, UDP checksum 0), frames of each `--sizes` length (Ethernet
//!   header + IPv4 packet, no FCS): after its first packet the flow is established in
//!   both balancers (xdp_lb's flow table, the kernel's conntrack).
//! - xdplb: the real lb-agent on LI (`--xdp-mode native`, service `wire` on the VIP,
//!   UDP, four backends, IPIP), next hops via LX (static neighbours, MTU 1600 so that a
//!   1500-byte packet plus 20 bytes of IPIP fits): XDP_REDIRECT from LI to LX.
//! - nftables: the agent stopped (XDP detached), `floor_pass` (XDP_PASS) on LI (a veth
//!   drops frames sent into it by XDP unless its receiver has an XDP program: DESIGN.md),
//!   `ip_forward` on, `dnat to numgen inc mod 4 map { ... }` in prerouting: the stack
//!   forwards and rewrites. numgen picks per new connection: the one flow goes to one
//!   backend, as it should.
//! - Backends: BX runs `floor_drop`; what arrives is BX's `rx_packets`: counted where
//!   the backends receive, not where the generator sends. "LB saw" is LI's `rx_packets`;
//!   "ring full" is G's `tx_dropped` (frames LI's 256-frame ring had no room for).
//! - A fresh bed for every balancer and run.
//!
//! One LB core: a veth's NAPI (where its XDP program and, for the stack, GRO and the
//! whole receive path run) is by default polled in the softirq of the CPU that sent the
//! frames (`ndo_xdp_xmit`/`veth_xmit` schedule the peer's NAPI on the current CPU), i.e.
//! the generator's. With threaded NAPI (`/sys/class/net/LI/threaded` = 1) it runs in a
//! kernel thread `napi/LI-<id>` instead, which the bench pins to the LB core (the last
//! CPU) with `sched_setaffinity` and makes SCHED_FIFO (priority 50): like the softirq it
//! replaces, it preempts ordinary processes on that CPU (without it, on a machine busy
//! compiling, the thread waited its turn and the veth's 256-frame ring overflowed). BX's
//! NAPI is threaded, SCHED_FIFO and pinned with the generator too, so the LB core does
//! only the LB's work (XDP program and redirect, or the stack's forwarding). On a 2-CPU
//! machine the generator and the backends' side share the other CPU, and both compete
//! with whatever else runs: the generator's thread is SCHED_FIFO 40 (below the NAPI
//! threads, above every ordinary process), yet it cannot offer enough to keep the LB
//! thread busy (measured with `perf record -a -g`: on the generator's CPU the backends'
//! NAPI thread, returning every forwarded frame's page, takes as much time as the
//! generator, which itself spends much of its time allocating and filling new pages).
//! So the table shows, beside the forwarded rate, the LB's cost per packet (the LB NAPI
//! thread's run time from /proc/PID/schedstat / frames forwarded) and the rate one LB
//! core forwards at that cost: the figure compared between the balancers.
//!
//! Each run: for every size, `--duration` seconds of traffic (the generator calls
//! `test_run` with [`CHUNK`] frames a time until the time is up), counters before and
//! after. Runs interleave the two balancers (run 1: xdplb then nftables, run 2: ...).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use aya::{
    Ebpf, TestRun as _, TestRunOptions,
    maps::Array,
    programs::{TestRunAttrs, Xdp, XdpMode},
};
use lb_agent::dataplane::loader::FLOORS_OBJECT;
use xdplb_tests::{
    config::{BackendConfig, LbConfig, ServiceConfig},
    netns::{self, ChildGuard, NetnsGuard},
    topology::{AGENT_READY, agent_binary},
    xdp_bed::xdp_md,
};

use crate::report::{Cell, Report};

/// Arguments of `wire`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs per balancer and size, 1 to 10; the table shows median (min-max).
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    runs: u32,
    /// Seconds of traffic per measurement, 1 to 10.
    #[arg(long = "duration", value_name = "S", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..=10))]
    duration_s: u64,
    /// Frame sizes in bytes (Ethernet header + IPv4 packet, no FCS), 60 to 1514.
    #[arg(long, value_delimiter = ',', default_values_t = vec![64u16, 1514],
          value_parser = clap::value_parser!(u16).range(60..=1514))]
    sizes: Vec<u16>,
}

const MAC_G: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];
const MAC_LI: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x02];
const MAC_LX: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x03];
const MAC_BX: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x04];
const GEN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The clients behind the generator host: the frames' source.
const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const LB_IN_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const BACKENDS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(198, 18, 1, 11),
    Ipv4Addr::new(198, 18, 1, 12),
    Ipv4Addr::new(198, 18, 1, 13),
    Ipv4Addr::new(198, 18, 1, 14),
];
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 18, 100, 1), 7000);
const CLIENT_PORT: u16 = 40000;
/// MTU of LX and BX: room for IPIP around a 1500-byte packet.
const BACKEND_MTU: u32 = 1600;
/// Frames per `test_run` call of the generator. Each call sets up and tears down a page
/// pool; measured here: at 100,000 frames a call the generator offered 1.1-1.5 Mpps, at
/// 1,000,000 1.4-2.6 (a call then lasts about half a second, so a window is up to that
/// much longer than `--duration`; the rate is over the real window).
const CHUNK: u32 = 1_000_000;
/// Frames the generator hands to the kernel per batch (`batch_size`). Measured here: 256
/// (the kernel's maximum) offers a little more but in bursts that found LI's ring full
/// for 28-38 % of the frames (12-16 % at 64), with the LB thread no busier.
const BATCH: u32 = 64;
/// `xdp_action::XDP_TX`: `wire_gen`'s verdict, out of G into LI.
const XDP_TX: u32 = 3;
/// SCHED_FIFO priority of the NAPI threads.
const NAPI_PRIORITY: i32 = 50;
/// SCHED_FIFO priority of the generator's thread: above every ordinary process (the
/// machine may be busy compiling), below the NAPI threads (the backends' NAPI thread
/// shares its CPU and must not wait for it).
const GEN_PRIORITY: i32 = 40;
/// Wait after the generator stops before counters are read.
const SETTLE: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Balancer {
    Xdplb,
    Nftables,
}

impl Balancer {
    fn label(self) -> &'static str {
        match self {
            Self::Xdplb => "xdplb (XDP, IPIP, redirect)",
            Self::Nftables => "kernel: nftables numgen DNAT",
        }
    }
}

/// One measurement.
#[derive(Clone, Copy, Debug)]
struct Sample {
    window_s: f64,
    sent: u64,
    /// Frames LI's XDP program saw.
    lb_rx: u64,
    /// Frames that reached BX.
    arrived: u64,
    /// Frames G could not hand to LI because LI's receive ring was full.
    ring_full: u64,
    /// Share of the LB core's time not idle during the window.
    lb_busy: f64,
    /// Share of the window LI's NAPI thread ran.
    lb_thread: f64,
    /// Share of the generator's CPU not idle.
    gen_busy: f64,
    /// Share of the window the generator's thread ran.
    gen_thread: f64,
}

impl Sample {
    /// Share of the offered frames that entered LI.
    fn reached(&self) -> f64 {
        self.lb_rx as f64 / self.sent.max(1) as f64
    }

    /// Frames per second one LB core forwards: forwarded frames per second of the LB's
    /// NAPI thread's run time (all of the LB's per-packet work runs in that thread).
    fn core_pps(&self) -> f64 {
        self.arrived as f64 / (self.lb_thread * self.window_s).max(1e-9)
    }
}

/// What a row's samples say about themselves (medians over the runs).
fn flags(v: &[Sample]) -> String {
    let med = |f: fn(&Sample) -> f64| crate::report::median(&v.iter().map(f).collect::<Vec<_>>());
    let reached = med(Sample::reached);
    let full = med(|s| s.ring_full as f64 / s.sent.max(1) as f64);
    let thread = med(|s| s.lb_thread);
    let kept = med(|s| s.arrived as f64 / s.lb_rx.max(1) as f64);
    let gen_thread = med(|s| s.gen_thread);
    let mut out = Vec::new();
    if thread >= 0.85 {
        out.push(format!(
            "LB saturated: its thread ran {:.0} %, {:.0} % of the offered frames found LI's ring full",
            thread * 100.0,
            full * 100.0
        ));
    } else {
        out.push(format!(
            "generator-bound: the LB thread ran {:.0} %, the generator's {:.0} % (its CPU also runs the backends' NAPI)",
            thread * 100.0,
            gen_thread * 100.0
        ));
        if full > 0.05 {
            out.push(format!(
                "{:.0} % of the offered frames found LI's 256-frame ring full in bursts",
                full * 100.0
            ));
        }
    }
    if reached + full < 0.95 {
        out.push(format!(
            "! {:.1} % of the offered frames neither reached LI nor were counted as ring-full drops",
            (1.0 - reached - full) * 100.0
        ));
    }
    if kept < 0.95 {
        out.push(format!(
            "! only {:.1} % of what reached LI arrived at the backends",
            kept * 100.0
        ));
    }
    out.join("; ")
}

/// The bed: namespaces and interface names; processes and programs live in [`Wire`].
struct Names {
    gen_ns: String,
    lb_ns: String,
    be_ns: String,
    g: String,
    li: String,
    lx: String,
    bx: String,
}

/// Everything of one benchmark run. Field order is drop order: programs and the agent
/// go before the namespaces.
struct Wire {
    agent: Option<ChildGuard>,
    pass_on_li: Option<Ebpf>,
    _drop_on_bx: Ebpf,
    n: Names,
    bpffs: std::path::PathBuf,
    run_dir: std::path::PathBuf,
    lb_cpu: usize,
    gen_cpu: usize,
    /// LI's NAPI thread (the LB's work), set by `switch_to`.
    lb_napi: i32,
    _guard: NetnsGuard,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let cpus = thread::available_parallelism().map_or(1, usize::from);
    let (lb_cpu, gen_cpu) = (cpus.saturating_sub(1), 0);
    eprintln!(
        "wire: {} run(s) x 2 balancers x {} size(s), {} s each; LB core CPU {}, generator and backends CPU {}",
        args.runs,
        args.sizes.len(),
        args.duration_s,
        lb_cpu,
        gen_cpu
    );
    let duration = Duration::from_secs(args.duration_s);
    // samples[balancer][size]
    let mut samples = vec![vec![Vec::<Sample>::new(); args.sizes.len()]; 2];
    for run in 0..args.runs {
        for (bi, balancer) in [Balancer::Xdplb, Balancer::Nftables]
            .into_iter()
            .enumerate()
        {
            // A fresh bed for every balancer and run: nothing of the other one is left.
            let mut w = Wire::build(cpus).context("building the bed")?;
            w.switch_to(balancer)
                .with_context(|| format!("setting up {}", balancer.label()))?;
            for (si, &size) in args.sizes.iter().enumerate() {
                let frame = udp_frame(usize::from(size));
                // A short warm-up: the flow gets established, the path checked.
                let warm = w.measure(&frame, Duration::from_millis(300))?;
                ensure!(
                    warm.arrived > 0,
                    "{}: nothing reached the backends in the warm-up ({} sent, {} seen by LI's XDP){}",
                    balancer.label(),
                    warm.sent,
                    warm.lb_rx,
                    w.agent_log_tail()
                );
                let s = w.measure(&frame, duration)?;
                eprintln!(
                    "  run {} {:<30} {size:>5} B: sent {:>6.2} Mpps, LB saw {:>6.2} (ring full {:>6.2}), backends got {:>6.2} Mpps; LB thread {:.0} % (LB core busy {:.0} %), generator thread {:.0} % (its CPU busy {:.0} %)",
                    run + 1,
                    balancer.label(),
                    s.sent as f64 / s.window_s / 1e6,
                    s.lb_rx as f64 / s.window_s / 1e6,
                    s.ring_full as f64 / s.window_s / 1e6,
                    s.arrived as f64 / s.window_s / 1e6,
                    s.lb_thread * 100.0,
                    s.lb_busy * 100.0,
                    s.gen_thread * 100.0,
                    s.gen_busy * 100.0
                );
                samples[bi][si].push(s);
            }
        }
    }
    report(args, (lb_cpu, gen_cpu), cpus, &samples)
}

fn report(
    args: &Args,
    (lb_cpu, gen_cpu): (usize, usize),
    cpus: usize,
    samples: &[Vec<Vec<Sample>>],
) -> anyhow::Result<()> {
    let mut report = Report::new(
        "wire",
        format!(
            "packets per second forwarded by one LB core, veths with native XDP, one UDP flow; \
             {} run(s) of {} s per row, figures are median (min-max)",
            args.runs, args.duration_s
        ),
    );
    let table = report.table(
        "",
        &[
            ("frame", true),
            ("balancer", false),
            ("offered (Mpps)", true),
            ("reached LI (%)", true),
            ("forwarded to backends (Mpps)", true),
            ("Gbit/s (frames)", true),
            ("LB NAPI thread ran (%)", true),
            ("LB core per packet (ns)", true),
            ("one LB core (Mpps)", true),
            ("vs nftables", true),
            ("generator thread ran (%)", true),
            ("flags", false),
        ],
    );
    for (si, &size) in args.sizes.iter().enumerate() {
        let kernel_core = crate::report::median(
            &samples[1][si]
                .iter()
                .map(Sample::core_pps)
                .collect::<Vec<_>>(),
        );
        for (bi, balancer) in [Balancer::Xdplb, Balancer::Nftables]
            .into_iter()
            .enumerate()
        {
            let v = &samples[bi][si];
            let per = |f: &dyn Fn(&Sample) -> f64| v.iter().map(f).collect::<Vec<_>>();
            let core: Vec<f64> = per(&Sample::core_pps);
            table.row(vec![
                Cell::text(format!("{size} B")),
                Cell::text(balancer.label()),
                Cell::samples("", 2, &per(&|s| s.sent as f64 / s.window_s / 1e6)),
                Cell::samples("", 0, &per(&|s| s.reached() * 100.0)),
                Cell::samples("", 2, &per(&|s| s.arrived as f64 / s.window_s / 1e6)),
                Cell::samples(
                    "",
                    2,
                    &per(&|s| s.arrived as f64 / s.window_s * f64::from(size) * 8.0 / 1e9),
                ),
                Cell::samples("", 0, &per(&|s| s.lb_thread * 100.0)),
                Cell::samples("", 0, &per(&|s| 1e9 / s.core_pps())),
                Cell::samples("", 2, &core.iter().map(|p| p / 1e6).collect::<Vec<_>>()),
                if balancer == Balancer::Nftables {
                    Cell::text("1")
                } else {
                    Cell::samples(
                        "",
                        2,
                        &core.iter().map(|p| p / kernel_core).collect::<Vec<_>>(),
                    )
                },
                Cell::samples("", 0, &per(&|s| s.gen_thread * 100.0)),
                Cell::text(flags(v)),
            ]);
        }
    }
    report.note(format!(
        "Method: a fresh bed per balancer and run. Generator = BPF_PROG_TEST_RUN live frames \
         (wire_gen: writes the frame's header anew on every frame, XDP_TX: out of G into LI's \
         receive ring as an XDP frame, as a NIC hands frames to its driver) on CPU {gen}, pinned, \
         SCHED_FIFO 40; LI's threaded NAPI (the LB: xdp_lb, or XDP_PASS + the stack) pinned to CPU {lb}, \
         SCHED_FIFO 50; BX's threaded NAPI (floor_drop, counting arrivals) on CPU {gen} with the \
         generator{shared}. offered = frames the generator produced / window; reached LI = frames \
         LI received / offered (the rest found LI's 256-frame veth ring full: G's tx_dropped); \
         forwarded = frames that reached BX / window; Gbit/s = forwarded x frame bytes (no FCS, \
         preamble or gap); LB NAPI thread ran = its run time (/proc/PID/schedstat) / window; \
         LB core per packet = that run time / forwarded frames; one LB core = forwarded / that run \
         time, the rate one fully used LB core would forward at that per-packet cost (where the LB \
         thread ran well under 100 % the generator could not saturate it, and the core's capacity \
         is derived from its cost, not observed); vs nftables = one LB core / the nftables median of the same size. \
         xdplb: lb-agent, native XDP on LI, IPIP to 4 backends via XDP_REDIRECT to LX (next hops \
         from the agent's map). nftables: agent stopped, XDP_PASS on LI, ip_forward on, \
         prerouting `dnat to numgen inc mod 4 map {{...}}` (one flow: one conntrack entry, one \
         backend). Debian's xdp-trafficgen (xdp-tools 1.3.1) does not load on this kernel (its \
         object has a tracepoint program for xdp_redirect_map_err, gone from the kernel), hence \
         the kernel's live-frames generator it is built on, driven directly.",
        gen = gen_cpu,
        lb = lb_cpu,
        shared = if cpus <= 2 {
            format!(" (this machine has {cpus} CPUs: the generator competes with the backends' side and every other process for its CPU)")
        } else {
            String::new()
        }
    ));
    report.finish()?;
    Ok(())
}

/// An Ethernet + IPv4 + UDP frame of `size` bytes from the client to the VIP, from G's
/// MAC to LI's (it leaves G for LI as it is), UDP checksum 0 (none).
fn udp_frame(size: usize) -> Vec<u8> {
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&MAC_LI);
    f[6..12].copy_from_slice(&MAC_G);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = u16::try_from(size - 14).expect("size <= 1514");
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&CLIENT_ADDR.octets());
    ip[16..20].copy_from_slice(&VIP.ip().octets());
    let sum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&CLIENT_PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&VIP.port().to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Pins the calling thread (pid 0) or task `pid` to `cpu`.
fn pin(pid: i32, cpu: usize) -> anyhow::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, size_of::<libc::cpu_set_t>(), &set)
    };
    ensure!(
        rc == 0,
        "sched_setaffinity({pid}, CPU {cpu}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Gives task `pid` SCHED_FIFO priority [`NAPI_PRIORITY`]: a NAPI thread then preempts
/// ordinary processes on its CPU as the softirq it replaces would.
fn realtime(pid: i32, priority: i32) -> anyhow::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: param is a valid sched_param for the duration of the call.
    let rc = unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) };
    ensure!(
        rc == 0,
        "sched_setscheduler({pid}, SCHED_FIFO): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Nanoseconds task `pid` has run (first field of /proc/PID/schedstat).
fn run_ns(pid: i32) -> anyhow::Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .with_context(|| format!("reading /proc/{pid}/schedstat"))?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/schedstat: {text:?}"))
}

/// Nanoseconds the calling thread has run.
fn thread_run_ns() -> anyhow::Result<u64> {
    let text = fs::read_to_string("/proc/thread-self/schedstat")
        .context("reading /proc/thread-self/schedstat")?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("/proc/thread-self/schedstat: {text:?}"))
}

/// Per-CPU (busy, total) jiffies from /proc/stat.
fn cpu_times() -> Vec<(u64, u64)> {
    let text = fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

fn busy_share(a: &[(u64, u64)], b: &[(u64, u64)], cpu: usize) -> f64 {
    match (a.get(cpu), b.get(cpu)) {
        (Some(x), Some(y)) if y.1 > x.1 => (y.0 - x.0) as f64 / (y.1 - x.1) as f64,
        _ => f64::NAN,
    }
}

/// Packets `dev` of `ns` received (its `rx_packets`: frames its XDP program saw and
/// frames that went straight to the stack alike).
fn rx_packets(ns: &str, dev: &str) -> anyhow::Result<u64> {
    let out = sh(
        ns,
        &format!("cat /sys/class/net/{dev}/statistics/rx_packets"),
    )?;
    out.trim()
        .parse()
        .with_context(|| format!("rx_packets of {dev}: {out:?}"))
}

/// Frames veth `dev` of `ns` dropped because its peer's receive ring was full: its
/// `tx_dropped`, which counts skbs and XDP frames (`xdp_xmit_errors`) alike.
fn ring_full(ns: &str, dev: &str) -> anyhow::Result<u64> {
    let out = sh(
        ns,
        &format!("cat /sys/class/net/{dev}/statistics/tx_dropped"),
    )?;
    out.trim()
        .parse()
        .with_context(|| format!("tx_dropped of {dev}: {out:?}"))
}

/// Loads `program` from the floors object and attaches it natively to `dev` in `ns`.
fn attach_floor(ns: &str, dev: &str, program: &'static str) -> anyhow::Result<Ebpf> {
    let dev = dev.to_owned();
    netns::in_netns(ns, move || {
        let mut ebpf = Ebpf::load(FLOORS_OBJECT).context("loading the floors object")?;
        let prog: &mut Xdp = ebpf
            .program_mut(program)
            .ok_or_else(|| anyhow!("no program {program} in the floors object"))?
            .try_into()?;
        prog.load().with_context(|| format!("loading {program}"))?;
        prog.attach(&dev, XdpMode::Driver)
            .with_context(|| format!("attaching {program} to {dev} in native mode"))?;
        Ok(ebpf)
    })
}

/// Turns on threaded NAPI for `dev` in `ns` and pins its kernel thread to `cpu`.
fn thread_napi(ns: &str, dev: &str, cpu: usize) -> anyhow::Result<i32> {
    netns::exec(
        ns,
        &[
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{dev}/threaded"),
        ],
    )
    .with_context(|| format!("threaded NAPI on {dev}"))?;
    // The thread is `napi/<dev>-<napi id>`, cut to 15 characters.
    let want: String = format!("napi/{dev}-").chars().take(15).collect();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut found = Vec::new();
        for e in fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            if comm.trim_end().starts_with(&want) {
                found.push(pid);
            }
        }
        match found[..] {
            [pid] => {
                pin(pid, cpu)?;
                realtime(pid, NAPI_PRIORITY)?;
                return Ok(pid);
            }
            [] if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            [] => bail!("no kernel thread {want}* after turning on threaded NAPI on {dev}"),
            _ => bail!("several kernel threads {want}*: {found:?}"),
        }
    }
}

fn sh(ns: &str, script: &str) -> anyhow::Result<String> {
    netns::exec(ns, &["sh", "-c", script])
}

impl Wire {
    fn build(cpus: usize) -> anyhow::Result<Self> {
        let mut guard = NetnsGuard::new()?;
        let n = Names {
            gen_ns: guard.create("wgen")?,
            lb_ns: guard.create("wlb")?,
            be_ns: guard.create("wbe")?,
            g: guard.name("g"),
            li: guard.name("li"),
            lx: guard.name("lx"),
            bx: guard.name("bx"),
        };
        let bpffs = guard.mount_bpffs()?;
        let run_dir = guard.run_dir().to_owned();
        netns::run(&[
            "ip",
            "link",
            "add",
            &n.g,
            "address",
            &mac(MAC_G),
            "netns",
            &n.gen_ns,
            "type",
            "veth",
            "peer",
            "name",
            &n.li,
            "address",
            &mac(MAC_LI),
            "netns",
            &n.lb_ns,
        ])?;
        netns::run(&[
            "ip",
            "link",
            "add",
            &n.lx,
            "address",
            &mac(MAC_LX),
            "mtu",
            &BACKEND_MTU.to_string(),
            "netns",
            &n.lb_ns,
            "type",
            "veth",
            "peer",
            "name",
            &n.bx,
            "address",
            &mac(MAC_BX),
            "mtu",
            &BACKEND_MTU.to_string(),
            "netns",
            &n.be_ns,
        ])?;
        sh(
            &n.gen_ns,
            &format!(
                "ip addr add {GEN_ADDR}/24 dev {g} && ip link set {g} up",
                g = n.g,
            ),
        )?;
        let mut lb = format!(
            "ip addr add {LB_IN_ADDR}/24 dev {li} && ip link set {li} up && \
             ip addr add {LB_ADDR}/24 dev {lx} && ip link set {lx} up && \
             ethtool -K {lx} tx off >/dev/null",
            li = n.li,
            lx = n.lx,
        );
        for b in BACKENDS {
            lb.push_str(&format!(
                " && ip neigh replace {b} lladdr {m} dev {lx} nud permanent",
                m = mac(MAC_BX),
                lx = n.lx
            ));
        }
        sh(&n.lb_ns, &lb)?;
        let mut be = format!("ip link set {bx} up", bx = n.bx);
        for b in BACKENDS {
            be.push_str(&format!(" && ip addr add {b}/24 dev {bx}", bx = n.bx));
        }
        sh(&n.be_ns, &be)?;
        let lb_cpu = cpus.saturating_sub(1);
        let gen_cpu = 0;
        let drop_on_bx = attach_floor(&n.be_ns, &n.bx, "floor_drop")?;
        thread_napi(&n.be_ns, &n.bx, gen_cpu)?;
        Ok(Self {
            agent: None,
            pass_on_li: None,
            _drop_on_bx: drop_on_bx,
            n,
            bpffs,
            run_dir,
            lb_cpu,
            gen_cpu,
            lb_napi: 0,
            _guard: guard,
        })
    }

    fn agent_log(&self) -> std::path::PathBuf {
        self.run_dir.join("agent-wire.log")
    }

    fn agent_log_tail(&self) -> String {
        if self.agent.is_none() {
            return String::new();
        }
        let text = fs::read_to_string(self.agent_log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "\nagent log (last lines):\n{}",
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    fn stop_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            let _ = a.stop(Duration::from_secs(5));
        }
    }

    /// Sets up `balancer` on the LB, tearing down the other.
    fn switch_to(&mut self, balancer: Balancer) -> anyhow::Result<()> {
        if balancer == Balancer::Nftables {
            self.stop_agent();
        }
        let n = &self.n;
        match balancer {
            Balancer::Xdplb => {
                self.pass_on_li = None;
                sh(
                    &n.lb_ns,
                    "nft delete table ip wire 2>/dev/null; sysctl -qw net.ipv4.ip_forward=0",
                )?;
                let service = BACKENDS.iter().fold(
                    ServiceConfig::new("wire", SocketAddr::V4(VIP)).protocol("udp"),
                    |s, &b| s.backend(BackendConfig::new(b)),
                );
                let config = LbConfig::new(&n.li)
                    .source_ipv4(LB_ADDR)
                    .sizes(65537, 65536)
                    .xdp_mode("native")
                    .dataplane("mtu", BACKEND_MTU)
                    .service(service);
                let state_dir = self.run_dir.join("state-wire");
                fs::create_dir_all(&state_dir)?;
                let path = self.run_dir.join("wire.toml");
                fs::write(&path, config.to_toml(&state_dir))?;
                let log = self.agent_log();
                let _ = fs::remove_file(&log);
                let bin = agent_binary()?;
                let args = [
                    bin.to_string_lossy().into_owned(),
                    "run".into(),
                    "--config".into(),
                    path.to_string_lossy().into_owned(),
                    "--bpffs".into(),
                    self.bpffs.to_string_lossy().into_owned(),
                    "--detach-on-exit".into(),
                ];
                let mut child = netns::spawn(&n.lb_ns, &args, Some(&log))?;
                wait_ready(&mut child, &log)?;
                self.agent = Some(child);
            }
            Balancer::Nftables => {
                self.pass_on_li = Some(attach_floor(&n.lb_ns, &n.li, "floor_pass")?);
                let map = BACKENDS
                    .iter()
                    .enumerate()
                    .map(|(i, b)| format!("{i} : {b}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let rules = format!(
                    "table ip wire {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n  \
                     ip daddr {vip} udp dport {port} dnat to numgen inc mod {k} map {{ {map} }}\n }}\n}}\n",
                    vip = VIP.ip(),
                    port = VIP.port(),
                    k = BACKENDS.len()
                );
                let file = self.run_dir.join("wire.nft");
                fs::write(&file, rules)?;
                sh(
                    &n.lb_ns,
                    &format!(
                        "sysctl -qw net.ipv4.ip_forward=1 && nft -f {}",
                        file.display()
                    ),
                )?;
            }
        }
        self.lb_napi = thread_napi(&self.n.lb_ns, &self.n.li, self.lb_cpu)?;
        Ok(())
    }

    /// Sends `frame` for `duration` and counts.
    fn measure(&self, frame: &[u8], duration: Duration) -> anyhow::Result<Sample> {
        let n = &self.n;
        let arrived0 = rx_packets(&n.be_ns, &n.bx)?;
        let lb0 = rx_packets(&n.lb_ns, &n.li)?;
        let full0 = ring_full(&n.gen_ns, &n.g)?;
        let cpu0 = cpu_times();
        let napi0 = run_ns(self.lb_napi)?;
        let (sent, window_s, gen_run_s) =
            generate(&n.gen_ns, &n.g, frame.to_vec(), duration, self.gen_cpu)?;
        let cpu1 = cpu_times();
        let napi1 = run_ns(self.lb_napi)?;
        thread::sleep(SETTLE);
        let arrived1 = rx_packets(&n.be_ns, &n.bx)?;
        let lb1 = rx_packets(&n.lb_ns, &n.li)?;
        let full1 = ring_full(&n.gen_ns, &n.g)?;
        Ok(Sample {
            ring_full: full1.saturating_sub(full0),
            window_s,
            sent,
            lb_rx: lb1.saturating_sub(lb0),
            arrived: arrived1.saturating_sub(arrived0),
            lb_busy: busy_share(&cpu0, &cpu1, self.lb_cpu),
            lb_thread: (napi1 - napi0) as f64 / 1e9 / window_s,
            gen_busy: busy_share(&cpu0, &cpu1, self.gen_cpu),
            gen_thread: gen_run_s / window_s,
        })
    }
}

fn wait_ready(child: &mut ChildGuard, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = fs::read_to_string(log).unwrap_or_default();
        if text.contains(AGENT_READY) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the agent exited ({status}):\n{text}");
        }
        ensure!(
            Instant::now() < deadline,
            "the agent is not ready after 30 s:\n{text}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// The generator: `wire_gen` (header from `frame`, XDP_TX) in live-frames mode out of
/// `dev` of `ns`, from a SCHED_FIFO thread pinned to `cpu`, `CHUNK` frames a call until
/// `duration` is over. Returns (frames, seconds, seconds the thread ran).
fn generate(
    ns: &str,
    dev: &str,
    frame: Vec<u8>,
    duration: Duration,
    cpu: usize,
) -> anyhow::Result<(u64, f64, f64)> {
    let dev = dev.to_owned();
    netns::in_netns(ns, move || {
        pin(0, cpu)?;
        realtime(0, GEN_PRIORITY)?;
        let name = std::ffi::CString::new(dev.clone())?;
        // SAFETY: name is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        ensure!(ifindex != 0, "no interface {dev}");
        let mut ebpf = Ebpf::load(FLOORS_OBJECT).context("loading the floors object")?;
        let mut head = [0u64; 6];
        for (w, b) in head.iter_mut().zip(frame.chunks(8)) {
            let mut bytes = [0u8; 8];
            bytes[..b.len()].copy_from_slice(b);
            *w = u64::from_ne_bytes(bytes);
        }
        Array::<_, [u64; 6]>::try_from(
            ebpf.map_mut("WIRE_HEAD")
                .ok_or_else(|| anyhow!("no map WIRE_HEAD in the floors object"))?,
        )?
        .set(0, head, 0)?;
        Array::<_, u32>::try_from(
            ebpf.map_mut("WIRE_VERDICT")
                .ok_or_else(|| anyhow!("no map WIRE_VERDICT in the floors object"))?,
        )?
        .set(0, XDP_TX, 0)?;
        let prog: &mut Xdp = ebpf
            .program_mut("wire_gen")
            .ok_or_else(|| anyhow!("no program wire_gen in the floors object"))?
            .try_into()?;
        prog.load().context("loading wire_gen")?;
        let ctx = xdp_md(frame.len(), ifindex, 0);
        let mut sent = 0u64;
        let ran0 = thread_run_ns()?;
        let start = Instant::now();
        while start.elapsed() < duration {
            let opts = TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: CHUNK,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..Default::default()
            };
            prog.test_run(opts)
                .context("test_run in live-frames mode (the generator)")?;
            sent += u64::from(CHUNK);
        }
        let ran = thread_run_ns()? - ran0;
        Ok((sent, start.elapsed().as_secs_f64(), ran as f64 / 1e9))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_core_rate_and_flags_follow_the_counters() {
        let s = Sample {
            window_s: 2.0,
            sent: 4_000_000,
            lb_rx: 3_000_000,
            arrived: 3_000_000,
            ring_full: 1_000_000,
            lb_busy: 1.0,
            lb_thread: 0.5,
            gen_busy: 1.0,
            gen_thread: 0.4,
        };
        // 3 M frames in 1 s of LB thread time.
        assert!((s.core_pps() - 3e6).abs() < 1.0);
        let f = flags(&[s]);
        assert!(
            f.starts_with("generator-bound: the LB thread ran 50 %, the generator's 40 %"),
            "{f}"
        );
        assert!(
            f.contains("25 % of the offered frames found LI's 256-frame ring full"),
            "{f}"
        );
        assert!(!f.contains('!'), "{f}");
        let lost = Sample {
            lb_rx: 1_000_000,
            arrived: 500_000,
            lb_thread: 0.95,
            ..s
        };
        let f = flags(&[lost]);
        assert!(f.starts_with("LB saturated: its thread ran 95 %"), "{f}");
        assert!(
            f.contains("! 50.0 % of the offered frames neither reached LI"),
            "{f}"
        );
        assert!(
            f.contains("! only 50.0 % of what reached LI arrived"),
            "{f}"
        );
    }

    #[test]
    fn frames_have_the_size_and_a_valid_header() {
        for size in [60usize, 64, 1514] {
            let f = udp_frame(size);
            assert_eq!(f.len(), size);
            assert_eq!(ipv4_checksum(&f[14..34]), 0, "header checksum of {size}");
            assert_eq!(usize::from(u16::from_be_bytes([f[16], f[17]])), size - 14);
            assert_eq!(usize::from(u16::from_be_bytes([f[38], f[39]])), size - 34);
            // From G to LI: the frame enters LI as it left the generator.
            assert_eq!((&f[0..6], &f[6..12]), (&MAC_LI[..], &MAC_G[..]));
        }
        use clap::Parser as _;
        let a = |v: &[&str]| {
            let argv = ["xdplb-bench", "wire"].iter().chain(v);
            crate::Cli::try_parse_from(argv).map(|cli| match cli.benchmark {
                crate::Benchmark::Wire(args) => (args.runs, args.duration_s, args.sizes),
                other => panic!("parsed as {other:?}"),
            })
        };
        assert_eq!(a(&[]).unwrap(), (3, 2, vec![64, 1514]));
        assert_eq!(a(&["--sizes", "128", "--runs", "1"]).unwrap().2, vec![128]);
        assert!(a(&["--sizes", "1515"]).is_err());
        assert!(a(&["--duration", "0"]).is_err());
    }
}
