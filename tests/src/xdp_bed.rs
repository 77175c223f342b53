//! The XDP bed shared by the fixture tests (`tests/integration/xdp_fixtures.rs`) and the benchmark
//! (`xdplb-bench xdp`): load the balancer object, fill its maps through the agent's
//! reconciler, run a program with `BPF_PROG_TEST_RUN`, and predict what must come out.
//!
//! - [`Net`] describes the network namespace that gives `bpf_fib_lookup` its answers:
//!   veth interfaces with an address, static neighbours, routes. [`in_bed`] builds it
//!   in a fresh namespace (removed afterwards, also on panic) and runs a closure inside.
//! - [`LoadedLb`]: the balancer object with the given capacities, its maps filled from a
//!   [`DesiredState`], the named programs loaded; [`LoadedLb::ring_pick`] is the oracle
//!   (the backend `lb_common::hash` and the written ring give a flow).
//! - [`xdp_md`] and [`test_run`]: one `test_run` call with its verdict, output frame and
//!   times.
//! - [`flow_key`] / [`flow_key_of`]: the flow key of a 5-tuple or of a built frame, as
//!   the program computes it.
//! - [`ipip_frame`]: the frame the balancer must send for an input frame, byte for byte.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, TestRun as _, TestRunOptions,
    programs::{ProgramFd, Xdp},
};
use lb_agent::dataplane::{
    desired::DesiredState,
    loader::{self, Capacities},
    maps::Maps,
    stats::{self, Counters},
    sync::{Reconciler, addr_words},
};
use lb_common::{
    hash::{flow_hash, ring_index, ring_slot, source_hash},
    types::{FAMILY_V4, FlowEntry, FlowKey, FlowKeyV4, PROTO_TCP, PROTO_UDP},
};

use crate::{
    netns::{NetnsGuard, exec, in_netns, static_neighbour},
    packet::{Frame, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP, PacketBuilder},
};

/// XDP verdicts (`enum xdp_action`).
pub const XDP_ABORTED: u32 = 0;
/// See [`XDP_ABORTED`].
pub const XDP_DROP: u32 = 1;
/// See [`XDP_ABORTED`].
pub const XDP_PASS: u32 = 2;
/// See [`XDP_ABORTED`].
pub const XDP_TX: u32 = 3;
/// See [`XDP_ABORTED`].
pub const XDP_REDIRECT: u32 = 4;

/// The name of a verdict, for messages.
pub fn verdict_name(verdict: u32) -> String {
    match verdict {
        XDP_ABORTED => "XDP_ABORTED".to_owned(),
        XDP_DROP => "XDP_DROP".to_owned(),
        XDP_PASS => "XDP_PASS".to_owned(),
        XDP_TX => "XDP_TX".to_owned(),
        XDP_REDIRECT => "XDP_REDIRECT".to_owned(),
        v => format!("verdict {v}"),
    }
}

/// The network of a bed: what `bpf_fib_lookup` sees from inside the namespace.
#[derive(Clone, Debug, Default)]
pub struct Net {
    /// Veth interfaces (each with its peer `<name>p`, both up) and the address with
    /// prefix length given to the first end, e.g. `("lb0", "198.18.1.10/24")`.
    pub links: Vec<(&'static str, &'static str)>,
    /// Static (permanent) neighbour entries: address, MAC, interface.
    pub neighbours: Vec<(Ipv4Addr, [u8; 6], &'static str)>,
    /// Routes, as the arguments of `ip route add`, e.g. `"unreachable 198.18.3.0/24"`.
    pub routes: Vec<&'static str>,
}

impl Net {
    /// Creates all of it in namespace `ns` (loopback up first).
    pub fn build(&self, ns: &str) -> anyhow::Result<()> {
        exec(ns, &["ip", "link", "set", "lo", "up"])?;
        for &(link, addr) in &self.links {
            let peer = format!("{link}p");
            exec(
                ns,
                &[
                    "ip", "link", "add", link, "type", "veth", "peer", "name", &peer,
                ],
            )?;
            exec(ns, &["ip", "addr", "add", addr, "dev", link])?;
            exec(ns, &["ip", "link", "set", link, "up"])?;
            exec(ns, &["ip", "link", "set", &peer, "up"])?;
        }
        for route in &self.routes {
            let mut args = vec!["ip", "route", "add"];
            args.extend(route.split(' '));
            exec(ns, &args)?;
        }
        for &(addr, mac, dev) in &self.neighbours {
            static_neighbour(ns, addr.into(), mac, dev)?;
        }
        Ok(())
    }
}

/// Builds `net` in a fresh namespace named after `role`, runs `body` on a thread inside
/// it and removes the namespace afterwards (whatever `body` returned).
pub fn in_bed<T, F>(role: &str, net: &Net, body: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    let mut guard = NetnsGuard::new()?;
    let ns = guard.create(role)?;
    net.build(&ns)?;
    let result = in_netns(&ns, body);
    drop(guard);
    result
}

/// The balancer object loaded with `caps`, its maps filled from a desired state by the
/// agent's own reconciler.
pub struct LoadedLb {
    /// The object; the programs named at load time are loaded (verified).
    pub ebpf: Ebpf,
    /// Its maps, as the agent holds them.
    pub maps: Maps,
    /// The reconciler that wrote them (service and backend ids).
    pub reconciler: Reconciler,
    ring_size: u32,
}

impl LoadedLb {
    /// Loads the object, applies `desired` to its maps, then loads `programs`.
    pub fn load(
        caps: &Capacities,
        desired: &DesiredState,
        programs: &[&'static str],
    ) -> anyhow::Result<Self> {
        Self::load_object(caps, desired, programs, None)
    }

    /// [`LoadedLb::load`] of another build of the balancer object (its bytes; None: the
    /// agent's own), whose maps are the agent's.
    pub fn load_object(
        caps: &Capacities,
        desired: &DesiredState,
        programs: &[&'static str],
        object: Option<&[u8]>,
    ) -> anyhow::Result<Self> {
        let mut ebpf = match object {
            Some(object) => loader::load_object(caps, object),
            None => loader::load(caps),
        }
        .context("loading the balancer object")?;
        let mut maps = Maps::take(&mut ebpf, None)?;
        let mut reconciler = Reconciler::new(caps);
        reconciler
            .apply(&mut maps, desired)
            .context("filling the balancer's maps")?;
        for &name in programs {
            loader::load_program(&mut ebpf, name)?;
        }
        Ok(Self {
            ebpf,
            maps,
            reconciler,
            ring_size: caps.ring_size,
        })
    }

    /// The loaded program `name`.
    pub fn program(&self, name: &str) -> anyhow::Result<&Xdp> {
        program(&self.ebpf, name)
    }

    /// The global counters, summed over CPUs.
    pub fn counters(&self) -> anyhow::Result<Counters> {
        Ok(stats::counters(&self.maps)?)
    }

    /// Replaces the desired state (the reconciler diffs it against the maps).
    pub fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<()> {
        self.reconciler.apply(&mut self.maps, desired)?;
        Ok(())
    }

    /// Oracle: the backend id the ring of `service` gives `key` (by the 5-tuple hash, or
    /// by the source address when the service has source affinity), from `lb_common::hash`
    /// and the ring the reconciler wrote; not by asking the program.
    pub fn ring_backend_id(
        &self,
        service: &str,
        key: &FlowKey,
        source_affinity: bool,
    ) -> anyhow::Result<u32> {
        let id = self
            .reconciler
            .service_id(service)
            .with_context(|| format!("no service {service}"))?;
        let hash = if source_affinity {
            source_hash(&key.src)
        } else {
            flow_hash(key)
        };
        let slot = ring_slot(hash, self.ring_size).context("empty ring")?;
        Ok(self
            .maps
            .rings
            .get(&ring_index(id, self.ring_size, slot), 0)?)
    }

    /// The entry of the flow `key` in the flow table of its family (`new`: the new-flow
    /// table, where a flow waits for its second packet): IPv4 flows live in `FLOWS_V4` /
    /// `FLOWS_NEW_V4` under a 16-byte key, IPv6 flows in `FLOWS` / `FLOWS_NEW`.
    pub fn flow_entry(&self, key: &FlowKey, new: bool) -> Option<FlowEntry> {
        if key.family == FAMILY_V4 {
            let short = FlowKeyV4::of(key);
            let table = if new {
                &self.maps.flows_new_v4
            } else {
                &self.maps.flows_v4
            };
            table.get(&short, 0).ok()
        } else {
            let table = if new {
                &self.maps.flows_new
            } else {
                &self.maps.flows
            };
            table.get(key, 0).ok()
        }
    }

    /// Oracle: which of `candidates` (backends of `service` on `port`) the ring gives `key`.
    pub fn ring_pick(
        &self,
        service: &str,
        key: &FlowKey,
        source_affinity: bool,
        candidates: &[Ipv4Addr],
        port: u16,
    ) -> anyhow::Result<Ipv4Addr> {
        let backend_id = self.ring_backend_id(service, key, source_affinity)?;
        candidates
            .iter()
            .copied()
            .find(|&c| self.reconciler.backend_id(service, c.into(), port) == Some(backend_id))
            .with_context(|| {
                format!(
                    "the ring of {service} holds backend id {backend_id}, none of {candidates:?}"
                )
            })
    }
}

/// The XDP program `name` of `ebpf`.
pub fn program<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a Xdp> {
    let prog = ebpf
        .program(name)
        .with_context(|| format!("no program {name}"))?;
    Ok(prog.try_into()?)
}

/// The file descriptor of a loaded program (for a program array).
pub fn program_fd(prog: &Xdp) -> anyhow::Result<ProgramFd> {
    Ok(prog.fd()?.try_clone()?)
}

/// A `struct xdp_md` for `test_run`: a frame of `frame_len` bytes received on
/// `ifindex`, preceded by `meta_len` bytes of XDP metadata (which the kernel takes from
/// the packet's headroom; `data_in` then starts with those bytes).
///
/// Layout: `{ data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }`.
pub fn xdp_md(frame_len: usize, ifindex: u32, meta_len: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    let end = meta_len + u32::try_from(frame_len).expect("frame fits u32");
    ctx[0..4].copy_from_slice(&meta_len.to_ne_bytes());
    ctx[4..8].copy_from_slice(&end.to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

/// What one `test_run` gave.
#[derive(Clone, Debug)]
pub struct Run {
    /// The program's return value (of the last iteration).
    pub verdict: u32,
    /// The packet as it was after the last iteration (metadata included, if any).
    pub out: Vec<u8>,
    /// The kernel's ns per iteration (whole ns, truncated).
    pub kernel_ns: u64,
    /// Wall-clock time of the syscall / `repeat`.
    pub wall_ns: f64,
}

/// Runs `prog` `repeat` times on `data` (metadata + frame, as `ctx` describes). The
/// kernel does not reset the buffer between iterations.
pub fn test_run(prog: &Xdp, data: &[u8], ctx: &[u8; 24], repeat: u32) -> anyhow::Result<Run> {
    // Room for what the program may prepend (encapsulation headers).
    let mut out = vec![0u8; data.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(data),
        data_out: Some(&mut out),
        ctx_in: Some(ctx),
        repeat,
        ..Default::default()
    };
    let start = Instant::now();
    let res = prog.test_run(opts).context("test_run")?;
    let wall = start.elapsed();
    out.truncate(res.data_size_out as usize);
    Ok(Run {
        verdict: res.return_value,
        out,
        kernel_ns: u64::try_from(res.duration.as_nanos()).unwrap_or(u64::MAX),
        wall_ns: wall.as_nanos() as f64 / f64::from(repeat),
    })
}

/// The flow key of an IPv4 5-tuple, as the program builds it (ports in network order).
pub fn flow_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey {
        src: addr_words(IpAddr::V4(*src.ip())).0,
        dst: addr_words(IpAddr::V4(*dst.ip())).0,
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// The flow key of the TCP or UDP packet in an Ethernet frame.
pub fn flow_key_of(frame: &[u8]) -> anyhow::Result<FlowKey> {
    let ip = Frame::parse(frame)?.ipv4()?;
    let (sport, dport, proto) = match ip.protocol {
        IPPROTO_TCP => {
            let t = ip.tcp()?;
            (t.sport, t.dport, PROTO_TCP)
        }
        IPPROTO_UDP => {
            let u = ip.udp()?;
            (u.sport, u.dport, PROTO_UDP)
        }
        p => bail!("protocol {p} has no flow key"),
    };
    Ok(flow_key(
        SocketAddrV4::new(ip.src, sport),
        SocketAddrV4::new(ip.dst, dport),
        proto,
    ))
}

/// The frame the balancer sends for `input` (a frame carrying IPv4, tagged or not):
/// an untagged Ethernet header from `src_mac` to the next hop `dst_mac`, an outer IPv4
/// header `source -> backend` (protocol IPIP, TTL 64, identification 0, no flags, the
/// inner TOS copied, checksum computed), then the inner packet unchanged. Nothing in it
/// varies from run to run: the program writes identification 0 and no DF bit (so the
/// outer checksum is fixed too), and the input's bytes past the inner `tot_len` (padding)
/// are not sent.
pub fn ipip_frame(
    input: &[u8],
    source: Ipv4Addr,
    backend: Ipv4Addr,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
) -> anyhow::Result<Vec<u8>> {
    let inner = Frame::parse(input)?.ipv4()?;
    let mut bytes = inner.header.clone();
    bytes.extend_from_slice(&inner.payload);
    Ok(PacketBuilder::raw(source, backend, IPPROTO_IPIP)
        .macs(src_mac, dst_mac)
        .tos(inner.tos)
        .id(0)
        .fragment(false, false, 0)
        .ttl(64)
        .payload(&bytes)
        .build())
}

/// Where two frames first differ, named by field for an Ethernet + IPv4 frame (used in
/// failure messages); `None` when they are equal.
pub fn first_difference(want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    let Some(at) = want.iter().zip(got).position(|(a, b)| a != b) else {
        return Some(format!(
            "length {} bytes, want {} (equal up to the shorter)",
            got.len(),
            want.len()
        ));
    };
    let tagged = want.get(12..14) == Some(&[0x81, 0x00][..]);
    let l3 = if tagged { 18 } else { 14 };
    let field = match at {
        0..=5 => "Ethernet destination".to_owned(),
        6..=11 => "Ethernet source".to_owned(),
        12 | 13 => "EtherType".to_owned(),
        a if a < l3 => "VLAN tag".to_owned(),
        a => match a - l3 {
            0 => "IPv4 version/IHL".to_owned(),
            1 => "IPv4 TOS".to_owned(),
            2 | 3 => "IPv4 total length".to_owned(),
            4 | 5 => "IPv4 identification".to_owned(),
            6 | 7 => "IPv4 flags/fragment offset".to_owned(),
            8 => "IPv4 TTL".to_owned(),
            9 => "IPv4 protocol".to_owned(),
            10 | 11 => "IPv4 header checksum".to_owned(),
            12..=15 => "IPv4 source".to_owned(),
            16..=19 => "IPv4 destination".to_owned(),
            n => format!("IPv4 payload byte {}", n - 20),
        },
    };
    Some(format!(
        "first difference at byte {at} ({field}): {:#04x}, want {:#04x}",
        got[at], want[at]
    ))
}

/// Pins the calling thread to the CPU it runs on and returns that CPU. `test_run` runs
/// the program on the calling CPU, and the per-CPU LRU tables (`BPF_F_NO_COMMON_LRU`)
/// keep one list per CPU: pinned, every run sees the same CPU's lists (and timings).
pub fn pin_to_current_cpu() -> anyhow::Result<usize> {
    // SAFETY: sched_getcpu has no preconditions; the cpu_set_t is zeroed, then one bit
    // set with CPU_SET, and passed with its own size.
    unsafe {
        let cpu = libc::sched_getcpu();
        anyhow::ensure!(
            cpu >= 0,
            "sched_getcpu: {}",
            std::io::Error::last_os_error()
        );
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        anyhow::ensure!(
            rc == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
        Ok(cpu as usize)
    }
}
