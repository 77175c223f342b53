//! Katran's balancer beside `xdp_lb` in `xdplb-bench xdp`: built from the vendored source
//! (`tests/vendor/katran`, see its README) with Katran's own compiler flags, loaded with
//! aya, its maps filled as Katran's control plane (`katran/lib/KatranLb.cpp`) fills them,
//! and run behind the same `bench_wrap` wrapper as `xdp_lb` and the floors.
//!
//! - Build ([`build`]): Katran's `katran/lib/Makefile-bpf` rule, run by
//!   `build_bpf_modules_opensource.sh`: `clang -I. -D__KERNEL__ -DDEBUG
//!   -Wno-unused-value -Wno-pointer-sign -Wno-compare-distinct-pointer-types -O2
//!   -emit-llvm -c -g balancer.bpf.c -o - | llc -march=bpf -filetype=obj`, with no extra
//!   defines (Katran's default feature set: IPIP encapsulation, no inline decap, no
//!   LPM source routing), once as is and once with `-DMAX_CONN_RATE=...` raised so far
//!   that the new-connection cap never bites. Debian's clang and llc (`cargo xtask bench
//!   xdp` installs `clang`, which brings `llvm-14`'s `llc`).
//! - Maps, as `KatranLb` writes them: `ctl_array[0]` the default router MAC (`kMacAddrPos`);
//!   `vip_map` {VIP address, port, proto} -> {flags 0, vip_num 0} (the first VIP number
//!   of its free list); `reals[1..=N]` the backends (real ids start at 1: 0 is "ring not
//!   filled"); `ch_rings[vip_num * 65537 + i]` the ring (Katran's `RING_SIZE`); one LRU
//!   hash map per CPU (`createLruMap`: key `flow_key`, value `real_pos_lru`, no flags)
//!   put in `lru_mapping[cpu]` (`attachLrus`), sized like `xdp_lb`'s per-CPU share of the
//!   table it is compared with. The ring's contents come from xdplb's Maglev builder
//!   (same size, same members and weights): where a flow lands does not change the cost
//!   per packet, and Katran's own ring builder (`CHHelpers`) is C++.
//! - Checks after every run: verdict XDP_TX (or XDP_PASS, untouched, for a non-VIP
//!   packet), and the output frame a well-formed IPIP packet: Ethernet to the default
//!   MAC from the input's destination MAC, outer IPv4 (version 4, IHL 5, protocol 4, TTL
//!   64, correct checksum, total length) to one of the reals, carrying the input's IP
//!   packet byte for byte (bar the source port the wrapper writes); for an established
//!   flow the outer destination is the real the flow's LRU entry on this CPU names.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail, ensure};
use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray},
    programs::Xdp,
};
use xdplb_tests::packet::{ETH_HLEN, Frame, IPV4_HLEN};

/// The vendored source (its `-I` root).
pub(crate) fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vendor/katran")
}

/// Katran's `RING_SIZE` (balancer_consts.h).
pub(crate) const RING_SIZE: u32 = 65537;
/// Katran's `MAX_VIPS`: the stats map holds `MAX_VIPS` per-VIP slots, then the global counters.
const MAX_VIPS: u32 = 512;
/// Global counters (balancer_consts.h): index `MAX_VIPS + x` of `stats`.
const LRU_CNTRS: u32 = 0;
const XDP_TX_CNTR: u32 = 17;
const XDP_PASS_CNTR: u32 = 19;
/// Katran's default cap on new connections per second per CPU (`MAX_CONN_RATE`).
pub(crate) const DEFAULT_MAX_CONN_RATE: u64 = 125_000;
/// The raised cap: never reached.
pub(crate) const RAISED_MAX_CONN_RATE: u64 = 4_000_000_000;
/// Katran's program.
const PROGRAM: &str = "balancer_ingress";
/// `IPIP_V4_PREFIX` 172.16.0.0/16: the outer source's upper half.
const IPIP_V4_PREFIX: [u8; 2] = [172, 16];

/// `struct vip_definition`.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipDefinition {
    addr: [u32; 4],
    /// Network order.
    port: u16,
    proto: u8,
    _pad: u8,
}
/// `struct vip_meta`.
#[repr(C)]
#[derive(Clone, Copy)]
struct VipMeta {
    flags: u32,
    vip_num: u32,
}
/// `struct real_definition`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RealDefinition {
    addr: [u32; 4],
    flags: u8,
    _pad: [u8; 3],
}
/// `struct ctl_value` (a union of u64, ifindex and MAC).
#[repr(C)]
#[derive(Clone, Copy)]
struct CtlValue {
    mac: [u8; 6],
    _pad: [u8; 2],
}
/// `struct flow_key`: addresses (IPv4 in the first word), ports as on the wire, proto.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct FlowKey {
    src: [u32; 4],
    dst: [u32; 4],
    ports: [u16; 2],
    proto: u8,
    _pad: [u8; 3],
}
/// `struct real_pos_lru`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RealPosLru {
    pos: u32,
    _pad: u32,
    atime: u64,
}
/// `struct lb_stats`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct LbStats {
    pub(crate) v1: u64,
    pub(crate) v2: u64,
}

const _: () = {
    assert!(size_of::<VipDefinition>() == 20);
    assert!(size_of::<VipMeta>() == 8);
    assert!(size_of::<RealDefinition>() == 20);
    assert!(size_of::<CtlValue>() == 8);
    assert!(size_of::<FlowKey>() == 40);
    assert!(size_of::<RealPosLru>() == 16);
    assert!(size_of::<LbStats>() == 16);
};

// SAFETY: plain #[repr(C)] structs of integers with explicit padding, no invalid bit
// patterns: what aya needs to copy them to and from maps.
unsafe impl Pod for VipDefinition {}
// SAFETY: as above.
unsafe impl Pod for VipMeta {}
// SAFETY: as above.
unsafe impl Pod for RealDefinition {}
// SAFETY: as above.
unsafe impl Pod for CtlValue {}
// SAFETY: as above.
unsafe impl Pod for FlowKey {}
// SAFETY: as above.
unsafe impl Pod for RealPosLru {}
// SAFETY: as above.
unsafe impl Pod for LbStats {}

/// The compile command for one build (for the report, and run by [`build`]).
pub(crate) fn build_command(max_conn_rate: Option<u64>) -> String {
    let define = max_conn_rate.map_or(String::new(), |r| format!(" -DMAX_CONN_RATE={r}ULL"));
    format!(
        "clang -I. -D__KERNEL__ -DDEBUG{define} -Wno-unused-value -Wno-pointer-sign \
         -Wno-compare-distinct-pointer-types -O2 -emit-llvm -c -g \
         katran/lib/bpf/balancer.bpf.c -o - | llc -march=bpf -filetype=obj -o OUT"
    )
}

/// Builds Katran's balancer object from the vendored source into `out` (Katran's own
/// flags; `max_conn_rate` overrides its `MAX_CONN_RATE`); returns the object's bytes.
pub(crate) fn build(out: &Path, max_conn_rate: Option<u64>) -> anyhow::Result<Vec<u8>> {
    for tool in ["clang", "llc"] {
        which::which(tool).with_context(|| {
            format!(
                "{tool} is not installed: Katran's balancer is built from source with Debian's clang \
                 and llc (`cargo xtask bench xdp` installs the clang package)"
            )
        })?;
    }
    let src = source_dir();
    let mut clang = Command::new("clang");
    clang
        .current_dir(&src)
        .args(["-I.", "-D__KERNEL__", "-DDEBUG"])
        .args(max_conn_rate.map(|r| format!("-DMAX_CONN_RATE={r}ULL")))
        .args([
            "-Wno-unused-value",
            "-Wno-pointer-sign",
            "-Wno-compare-distinct-pointer-types",
            "-O2",
            "-emit-llvm",
            "-c",
            "-g",
            "katran/lib/bpf/balancer.bpf.c",
            "-o",
            "-",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = clang.spawn().context("running clang")?;
    let bitcode = child.stdout.take().context("clang's stdout")?;
    let llc = Command::new("llc")
        .args(["-march=bpf", "-filetype=obj", "-o"])
        .arg(out)
        .stdin(bitcode)
        .output()
        .context("running llc")?;
    let clang_out = child.wait_with_output().context("waiting for clang")?;
    ensure!(
        clang_out.status.success(),
        "clang failed on Katran's balancer.bpf.c ({}):\n{}",
        clang_out.status,
        String::from_utf8_lossy(&clang_out.stderr)
    );
    ensure!(
        llc.status.success(),
        "llc failed on Katran's balancer ({}):\n{}",
        llc.status,
        String::from_utf8_lossy(&llc.stderr)
    );
    std::fs::read(out).with_context(|| format!("reading {}", out.display()))
}

/// Katran's balancer, loaded, its maps filled for one TCP VIP.
pub(crate) struct Katran {
    ebpf: Ebpf,
    /// One LRU per CPU, as `lru_mapping` holds them (index = CPU).
    lrus: Vec<HashMap<MapData, FlowKey, RealPosLru>>,
    /// `reals[i + 1]`.
    reals: Vec<Ipv4Addr>,
    /// `ctl_array[0]`: the default router MAC.
    pub(crate) router_mac: [u8; 6],
}

fn words(a: Ipv4Addr) -> [u32; 4] {
    [u32::from_ne_bytes(a.octets()), 0, 0, 0]
}

impl Katran {
    /// Loads `object` and fills its maps: one VIP (TCP) with `reals`, `ring` (real ids
    /// 1..=N, `RING_SIZE` slots), one LRU of `lru_per_cpu` entries for each of `cpus`.
    pub(crate) fn load(
        object: &[u8],
        vip: SocketAddrV4,
        reals: &[Ipv4Addr],
        ring: &[u32],
        router_mac: [u8; 6],
        cpus: u32,
        lru_per_cpu: u32,
    ) -> anyhow::Result<Self> {
        ensure!(
            ring.len() == RING_SIZE as usize,
            "ring of {} slots",
            ring.len()
        );
        let mut ebpf = EbpfLoader::new()
            .load(object)
            .context("loading Katran's balancer object (maps)")?;
        {
            let prog: &mut Xdp = ebpf
                .program_mut(PROGRAM)
                .with_context(|| format!("Katran's object has no program {PROGRAM}"))?
                .try_into()?;
            prog.load()
                .context("loading Katran's balancer_ingress (the verifier log follows)")?;
        }
        let map = |ebpf: &mut Ebpf, name: &str| -> anyhow::Result<aya::maps::Map> {
            ebpf.take_map(name)
                .with_context(|| format!("Katran's object has no map {name}"))
        };
        let mut ctl: Array<_, CtlValue> = Array::try_from(map(&mut ebpf, "ctl_array")?)?;
        ctl.set(
            0,
            CtlValue {
                mac: router_mac,
                _pad: [0; 2],
            },
            0,
        )?;
        let mut vips: HashMap<_, VipDefinition, VipMeta> =
            HashMap::try_from(map(&mut ebpf, "vip_map")?)?;
        vips.insert(
            VipDefinition {
                addr: words(*vip.ip()),
                port: vip.port().to_be(),
                proto: 6,
                _pad: 0,
            },
            VipMeta {
                flags: 0,
                vip_num: 0,
            },
            0,
        )?;
        let mut reals_map: Array<_, RealDefinition> = Array::try_from(map(&mut ebpf, "reals")?)?;
        for (i, &r) in reals.iter().enumerate() {
            reals_map.set(
                u32::try_from(i + 1)?,
                RealDefinition {
                    addr: words(r),
                    flags: 0,
                    _pad: [0; 3],
                },
                0,
            )?;
        }
        let mut rings: Array<_, u32> = Array::try_from(map(&mut ebpf, "ch_rings")?)?;
        for (i, &id) in ring.iter().enumerate() {
            ensure!(
                (1..=reals.len() as u32).contains(&id),
                "ring slot {i} holds real id {id}"
            );
            // vip_num 0: slots 0..RING_SIZE.
            rings.set(u32::try_from(i)?, id, 0)?;
        }
        let mut mapping: ArrayOfMaps<_, MapData> =
            ArrayOfMaps::try_from(map(&mut ebpf, "lru_mapping")?)?;
        let mut lrus = Vec::new();
        for cpu in 0..cpus {
            // createLruMap: BPF_MAP_TYPE_LRU_HASH, flow_key -> real_pos_lru, no flags.
            let obj = aya_obj::Map::new_from_params(
                aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32,
                size_of::<FlowKey>() as u32,
                size_of::<RealPosLru>() as u32,
                lru_per_cpu,
                0,
            );
            let lru = MapData::create(obj, &format!("katran_lru{cpu}"), None)
                .with_context(|| format!("creating Katran's LRU for CPU {cpu}"))?;
            mapping
                .set(cpu, &lru, 0)
                .with_context(|| format!("lru_mapping[{cpu}]"))?;
            lrus.push(HashMap::try_from(aya::maps::Map::LruHashMap(lru))?);
        }
        ensure!(
            ebpf.map("stats").is_some(),
            "Katran's object has no map stats"
        );
        Ok(Katran {
            ebpf,
            lrus,
            reals: reals.to_vec(),
            router_mac,
        })
    }

    /// The loaded `balancer_ingress`.
    pub(crate) fn program(&self) -> anyhow::Result<&Xdp> {
        xdplb_tests::xdp_bed::program(&self.ebpf, PROGRAM)
    }

    /// Global counter `MAX_VIPS + index` of `stats`, summed over CPUs.
    pub(crate) fn counter(&self, index: u32) -> anyhow::Result<LbStats> {
        let map = self.ebpf.map("stats").context("no map stats")?;
        let stats: PerCpuArray<_, LbStats> = PerCpuArray::try_from(map)?;
        let values = stats.get(&(MAX_VIPS + index), 0)?;
        Ok(values.iter().fold(LbStats::default(), |a, v| LbStats {
            v1: a.v1 + v.v1,
            v2: a.v2 + v.v2,
        }))
    }

    /// (packets, LRU misses) through the VIP path: `stats[MAX_VIPS + LRU_CNTRS]`.
    pub(crate) fn lru_counters(&self) -> anyhow::Result<LbStats> {
        self.counter(LRU_CNTRS)
    }

    /// Packets that left with XDP_TX / XDP_PASS.
    pub(crate) fn verdict_counts(&self) -> anyhow::Result<(u64, u64)> {
        Ok((
            self.counter(XDP_TX_CNTR)?.v1,
            self.counter(XDP_PASS_CNTR)?.v1,
        ))
    }

    /// The real the LRU of `cpu` holds for the TCP flow `src -> dst`, if any.
    pub(crate) fn lru_real(
        &self,
        cpu: usize,
        src: SocketAddrV4,
        dst: SocketAddrV4,
    ) -> anyhow::Result<Option<Ipv4Addr>> {
        let key = FlowKey {
            src: words(*src.ip()),
            dst: words(*dst.ip()),
            ports: [src.port().to_be(), dst.port().to_be()],
            proto: 6,
            _pad: [0; 3],
        };
        let lru = self.lrus.get(cpu).context("no LRU for this CPU")?;
        match lru.get(&key, 0) {
            Ok(v) => Ok(self.reals.get(v.pos as usize - 1).copied()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks that `output` is Katran's IPIP frame for `input` (a TCP frame; `new_port`:
    /// the wrapper gave it a new source port, taken from the output) to a real (`want`,
    /// when known); returns the real.
    pub(crate) fn check_ipip(
        &self,
        input: &[u8],
        output: &[u8],
        want: Option<Ipv4Addr>,
        new_port: bool,
    ) -> anyhow::Result<Ipv4Addr> {
        let f = Frame::parse(output)?;
        let input_eth = Frame::parse(input)?;
        ensure!(
            f.dst_mac == self.router_mac,
            "Ethernet destination {:02x?}, want the default router MAC",
            f.dst_mac
        );
        ensure!(
            f.src_mac == input_eth.dst_mac,
            "Ethernet source is not the input's destination MAC"
        );
        ensure!(
            output.len() == input.len() + IPV4_HLEN,
            "{} bytes out for {} in: not one 20-byte outer header",
            output.len(),
            input.len()
        );
        let outer = &output[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
        ensure!(output[12..14] == [8, 0], "EtherType is not IPv4");
        ensure!(outer[0] == 0x45, "outer version/IHL {:#04x}", outer[0]);
        ensure!(outer[9] == 4, "outer protocol {}, want IPIP", outer[9]);
        ensure!(outer[8] == 64, "outer TTL {}", outer[8]);
        let tot = u16::from_be_bytes([outer[2], outer[3]]) as usize;
        ensure!(
            tot == output.len() - ETH_HLEN,
            "outer total length {tot}, the packet has {}",
            output.len() - ETH_HLEN
        );
        ensure!(
            internet_checksum(outer) == 0,
            "outer IPv4 header checksum is wrong"
        );
        ensure!(
            outer[12..14] == IPIP_V4_PREFIX,
            "outer source {}.{}.x.x, want Katran's 172.16.0.0/16",
            outer[12],
            outer[13]
        );
        let dst = Ipv4Addr::new(outer[16], outer[17], outer[18], outer[19]);
        ensure!(
            self.reals.contains(&dst),
            "outer destination {dst} is not a real"
        );
        if let Some(w) = want {
            ensure!(dst == w, "sent to {dst}, the flow's LRU entry names {w}");
        }
        let mut inner_want = input[ETH_HLEN..].to_vec();
        let inner_got = &output[ETH_HLEN + IPV4_HLEN..];
        if new_port {
            inner_want[IPV4_HLEN..IPV4_HLEN + 2]
                .copy_from_slice(&inner_got[IPV4_HLEN..IPV4_HLEN + 2]);
        }
        if inner_want != inner_got {
            bail!("the inner packet changed");
        }
        Ok(dst)
    }
}

/// The Internet checksum of `bytes` (0 over a header whose checksum is right).
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_correct_header_is_zero_and_the_vendored_source_is_there() {
        // RFC 1071's example header with its checksum (0xb861).
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&header), 0);
        let mut bad = header;
        bad[11] ^= 1;
        assert_ne!(internet_checksum(&bad), 0);
        assert!(source_dir().join("katran/lib/bpf/balancer.bpf.c").is_file());
        assert!(source_dir().join("LICENSE").is_file());
        assert!(build_command(Some(7)).contains("-DMAX_CONN_RATE=7ULL"));
        assert!(!build_command(None).contains("MAX_CONN_RATE"));
    }
}
