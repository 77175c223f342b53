//! Loading the embedded eBPF object with capacities from the config, attaching its
//! XDP programs, and the bpffs pin layout: `<bpffs>/xdplb/<netns inode>/<iface>/<role>/`,
//! so hosts in different network namespaces can share one bpffs.

use std::{
    ffi::CString,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{LinkError, PinnedLink},
        xdp::XdpLinkId,
    },
};
use lb_common::maps;

use crate::config::DataplaneConfig;

/// The balancer and decap programs (`lb-ebpf`'s main object), built by build.rs.
pub static LB_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
/// The benchmark floors and the `test_run` wrapper (`lb-ebpf/src/floors.rs`); used by the
/// benchmark and the test bed, never attached by the agent.
pub static FLOORS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-floors"));

/// Name of the balancer program in [`LB_OBJECT`].
pub const LB_PROGRAM: &str = "xdp_lb";
/// Name of the backend-side decapsulation program in [`LB_OBJECT`].
pub const DECAP_PROGRAM: &str = "xdp_decap";

/// `statfs` magic of a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error(
        "capacities too large: {max_services} services x ring_size {ring_size} exceeds the 2^32 slots a BPF array can hold"
    )]
    RingsTooLarge { max_services: u32, ring_size: u32 },
    #[error("loading the eBPF object failed (is this root, with BPF enabled in the kernel?): {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no program {name}")]
    NoProgram { name: &'static str },
    #[error("loading program {name} into the kernel failed (verifier log follows): {source}")]
    ProgramLoad {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("no interface {iface} in this network namespace")]
    NoInterface { iface: String },
    #[error("attaching {name} to {iface} in {mode} mode failed: {source}")]
    Attach {
        name: &'static str,
        iface: String,
        mode: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error(
        "{path} is not a bpffs (mount one with `mount -t bpf bpf {path}`): pins there would not be BPF objects"
    )]
    NotBpffs { path: PathBuf },
    #[error("opening the pinned link {path}: {source}")]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: Box<LinkError>,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Map capacities. The agent takes them from `[dataplane]` through the one conversion
/// `Capacities::from(&DataplaneConfig)`; they take effect when the maps are created,
/// so a reload keeps the running ones ([`Capacities::keep_in`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    pub max_services: u32,
    pub max_backends: u32,
    pub ring_size: u32,
    pub flow_table_size: u32,
    /// Entries of each global source filter trie, and user prefixes of each
    /// per-service trie (which have two catch-alls per service more); the per-rule
    /// drop counters have room for all of them ([`Capacities::filter_stats_slots`]).
    pub max_filter_rules: u32,
    /// Entries of the new-flow table (flows seen once).
    pub new_flow_table_size: u32,
    /// Token buckets of `new_flows_per_source` (masked sources).
    pub flow_limit_sources: u32,
}

impl From<&DataplaneConfig> for Capacities {
    fn from(dp: &DataplaneConfig) -> Self {
        Capacities {
            max_services: dp.max_services,
            max_backends: dp.max_backends,
            ring_size: dp.ring_size,
            flow_table_size: dp.flow_table_size,
            max_filter_rules: dp.max_filter_rules,
            new_flow_table_size: dp.new_flow_table_entries(),
            flow_limit_sources: dp.flow_limit_sources,
        }
    }
}

impl Capacities {
    /// Put these capacities back into `dp` (the inverse of the `From` conversion): a
    /// reloaded config keeps the capacities the maps were created with.
    pub fn keep_in(self, dp: &mut DataplaneConfig) {
        let Capacities {
            max_services,
            max_backends,
            ring_size,
            flow_table_size,
            max_filter_rules,
            new_flow_table_size,
            flow_limit_sources,
        } = self;
        dp.max_services = max_services;
        dp.max_backends = max_backends;
        dp.ring_size = ring_size;
        dp.flow_table_size = flow_table_size;
        dp.max_filter_rules = max_filter_rules;
        dp.new_flow_table_size = None;
        if dp.new_flow_table_entries() != new_flow_table_size {
            dp.new_flow_table_size = Some(new_flow_table_size);
        }
        dp.flow_limit_sources = flow_limit_sources;
    }

    /// Entries of the per-service tries: the services' prefixes, and room for the
    /// catch-all `/0` of each family per service with an allow list.
    pub fn service_filter_entries(self) -> u32 {
        self.max_filter_rules
            .saturating_add(self.max_services.saturating_mul(2))
    }

    /// Slots of the per-rule drop counters: slot 0 (global `not_allowed`), the global
    /// deny rules, the services' deny rules, and one `not_allowed` per service.
    pub fn filter_stats_slots(self) -> u32 {
        self.max_filter_rules
            .saturating_mul(2)
            .saturating_add(self.max_services)
            .saturating_add(1)
    }

    /// Smallest maps, for hosts that only decapsulate: the balancer's tables are unused.
    pub const DECAP_ONLY: Capacities = Capacities {
        max_services: 1,
        max_backends: 1,
        ring_size: 1,
        flow_table_size: 1,
        max_filter_rules: 1,
        new_flow_table_size: 1,
        flow_limit_sources: 1,
    };
}

/// Load [`LB_OBJECT`] with the given capacities. Programs are not loaded yet.
pub fn load(caps: &Capacities) -> Result<Ebpf, LoaderError> {
    load_with(caps, None, LB_OBJECT)
}

/// Load another build of the balancer object (`object`: its bytes) with the given
/// capacities, as [`load`] does [`LB_OBJECT`]: for `xdplb-bench xdp`'s rows of other
/// builds (`XDPLB_BENCH_LB_OBJECTS`). Its maps must be [`LB_OBJECT`]'s.
pub fn load_object(caps: &Capacities, object: &[u8]) -> Result<Ebpf, LoaderError> {
    load_with(caps, None, object)
}

/// Load [`LB_OBJECT`] with its maps pinned under `pin_dir` (one file per map, named as
/// in `lb_common::maps`): a map already pinned there is reused, with its contents, and
/// the others are created and pinned. This is how a restarted agent takes over the
/// maps of the fast path that kept running while it was away.
pub fn load_pinned(caps: &Capacities, pin_dir: &Path) -> Result<Ebpf, LoaderError> {
    load_with(caps, Some(pin_dir), LB_OBJECT)
}

/// Key and value sizes of every map, as this agent's object declares them.
fn layouts() -> [(&'static str, usize, usize); 28] {
    use core::mem::size_of;
    use lb_common::types::{
        Backend, DecapKey, FilterAddr, FilterRule, FlowEntry, FlowKey, FlowKeyV4, FlowLimit,
        GlobalConfig, NewFlowRate, NextHopEntry, QuicKey, ServiceV6, TrafficCounters, VipAddrKey,
        VipKey, VipKeyV4, VipMeta,
    };
    // An LPM trie key is a u32 prefix length and the data.
    let filter_key = 4 + size_of::<FilterAddr>();
    [
        (maps::VIPS, size_of::<VipKey>(), size_of::<VipMeta>()),
        (maps::RINGS, 4, 4),
        (maps::BACKENDS, 4, size_of::<Backend>()),
        (maps::FLOWS, size_of::<FlowKey>(), size_of::<FlowEntry>()),
        (maps::CONFIG, 4, size_of::<GlobalConfig>()),
        (maps::SERVICE_STATS, 4, size_of::<TrafficCounters>()),
        (maps::BACKEND_STATS, 4, size_of::<TrafficCounters>()),
        (maps::COUNTERS, 4, 8),
        (maps::DECAP_DSTS, size_of::<DecapKey>(), 4),
        (maps::DENY, filter_key, size_of::<FilterRule>()),
        (maps::ALLOW, filter_key, size_of::<FilterRule>()),
        (maps::FILTER_STATS, 4, 8),
        (maps::SVC_DENY, filter_key, size_of::<FilterRule>()),
        (maps::SVC_ALLOW, filter_key, size_of::<FilterRule>()),
        (maps::FLOW_LIMITS, 4, size_of::<FlowLimit>()),
        (maps::FLOW_BUCKETS, size_of::<FilterAddr>(), 8),
        (
            maps::FLOWS_NEW,
            size_of::<FlowKey>(),
            size_of::<FlowEntry>(),
        ),
        (maps::VIP_ADDRS, size_of::<VipAddrKey>(), 4),
        (maps::QUIC_IDS, size_of::<QuicKey>(), 4),
        (maps::NEXT_HOPS, 4, size_of::<NextHopEntry>()),
        (maps::VIPS_V4, size_of::<VipKeyV4>(), size_of::<VipMeta>()),
        (
            maps::FLOWS_V4,
            size_of::<FlowKeyV4>(),
            size_of::<FlowEntry>(),
        ),
        (
            maps::FLOWS_NEW_V4,
            size_of::<FlowKeyV4>(),
            size_of::<FlowEntry>(),
        ),
        (maps::SCRATCH, 4, 516),
        (maps::NEW_FLOW_RATE, 4, size_of::<NewFlowRate>()),
        (maps::FILTER_GEN, 4, 4),
        (maps::SERVICES_V6, 4, size_of::<ServiceV6>()),
        (maps::QUIC_SLOTS, 4, 8),
    ]
}

/// The capacities of the maps pinned under `pin_dir`, or None when not all of them
/// are there or one has another key or value layout than this agent's (an agent of
/// another version pinned them: they cannot be reused).
pub fn pinned_capacities(pin_dir: &Path) -> Option<Capacities> {
    for (name, key, value) in layouts() {
        let data = aya::maps::MapData::from_pin(pin_dir.join(name)).ok()?;
        let info = data.info().ok()?;
        if info.key_size() as usize != key || info.value_size() as usize != value {
            tracing::warn!(
                map = name,
                pinned = ?(info.key_size(), info.value_size()),
                expected = ?(key, value),
                "a pinned map has another layout than this agent's"
            );
            return None;
        }
    }
    let max = |name: &str| -> Option<u32> {
        let data = aya::maps::MapData::from_pin(pin_dir.join(name)).ok()?;
        data.info().ok().map(|i| i.max_entries())
    };
    // Counters and drop reasons added by a newer agent lengthen the counter array:
    // indices would mean other things.
    if max(maps::COUNTERS)? != lb_common::stats::COUNTERS_LEN {
        tracing::warn!(
            map = maps::COUNTERS,
            "the pinned counter array has another length than this agent's"
        );
        return None;
    }
    let max_services = max(maps::VIPS)?;
    let rings = max(maps::RINGS)?;
    Some(Capacities {
        max_services,
        max_backends: max(maps::BACKENDS)?,
        ring_size: rings.checked_div(max_services)?,
        flow_table_size: max(maps::FLOWS)?,
        max_filter_rules: max(maps::DENY)?,
        new_flow_table_size: max(maps::FLOWS_NEW)?,
        flow_limit_sources: max(maps::FLOW_BUCKETS)?,
    })
}

fn load_with(
    caps: &Capacities,
    pin_dir: Option<&Path>,
    object: &[u8],
) -> Result<Ebpf, LoaderError> {
    let ring_slots =
        caps.max_services
            .checked_mul(caps.ring_size)
            .ok_or(LoaderError::RingsTooLarge {
                max_services: caps.max_services,
                ring_size: caps.ring_size,
            })?;
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(maps::VIPS, caps.max_services)
        .map_max_entries(maps::SERVICE_STATS, caps.max_services)
        .map_max_entries(maps::RINGS, ring_slots)
        .map_max_entries(maps::BACKENDS, caps.max_backends)
        .map_max_entries(maps::BACKEND_STATS, caps.max_backends)
        .map_max_entries(maps::FLOWS, caps.flow_table_size)
        .map_max_entries(maps::DENY, caps.max_filter_rules)
        .map_max_entries(maps::ALLOW, caps.max_filter_rules)
        .map_max_entries(maps::FILTER_STATS, caps.filter_stats_slots())
        .map_max_entries(maps::SVC_DENY, caps.service_filter_entries())
        .map_max_entries(maps::SVC_ALLOW, caps.service_filter_entries())
        .map_max_entries(maps::FLOW_LIMITS, caps.max_services.saturating_add(1))
        .map_max_entries(maps::FLOW_BUCKETS, caps.flow_limit_sources)
        .map_max_entries(maps::FLOWS_NEW, caps.new_flow_table_size)
        .map_max_entries(maps::VIP_ADDRS, caps.max_services)
        .map_max_entries(maps::QUIC_IDS, caps.max_backends)
        .map_max_entries(maps::NEXT_HOPS, caps.max_backends)
        .map_max_entries(maps::VIPS_V4, caps.max_services)
        .map_max_entries(maps::FLOWS_V4, caps.flow_table_size)
        .map_max_entries(maps::FLOWS_NEW_V4, caps.new_flow_table_size)
        .map_max_entries(maps::SERVICES_V6, caps.max_services);
    if let Some(dir) = pin_dir {
        for &name in maps::ALL {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    loader
        .load(object)
        .map_err(|e| LoaderError::Load(Box::new(e)))
}

/// Load (verify) the XDP program `name` of `ebpf` and return it.
pub fn load_program<'e>(
    ebpf: &'e mut Ebpf,
    name: &'static str,
) -> Result<&'e mut Xdp, LoaderError> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or(LoaderError::NoProgram { name })?
        .try_into()
        .map_err(|source| LoaderError::ProgramLoad {
            name,
            source: Box::new(source),
        })?;
    program.load().map_err(|source| LoaderError::ProgramLoad {
        name,
        source: Box::new(source),
    })?;
    Ok(program)
}

/// How to attach, from `--xdp-mode` / `dataplane.xdp_mode` (`off` never gets here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic (skb) mode.
    Auto,
    Native,
    Skb,
}

fn mode_name(mode: XdpMode) -> &'static str {
    match mode {
        XdpMode::Driver => "native",
        XdpMode::Skb => "skb",
        XdpMode::Hardware => "offload",
        XdpMode::Default => "default",
    }
}

/// Attach a loaded program to `iface`; returns the link and the mode that worked.
pub fn attach(
    program: &mut Xdp,
    name: &'static str,
    iface: &str,
    mode: AttachMode,
) -> Result<(XdpLinkId, &'static str), LoaderError> {
    if_index(iface)?;
    let tries: &[XdpMode] = match mode {
        AttachMode::Auto => &[XdpMode::Driver, XdpMode::Skb],
        AttachMode::Native => &[XdpMode::Driver],
        AttachMode::Skb => &[XdpMode::Skb],
    };
    let mut last = None;
    for &m in tries {
        match program.attach(iface, m) {
            Ok(id) => return Ok((id, mode_name(m))),
            Err(source) => {
                tracing::warn!(iface, mode = mode_name(m), error = %source, "XDP attach failed");
                last = Some((m, source));
            }
        }
    }
    let (m, source) = last.expect("at least one mode is tried");
    Err(LoaderError::Attach {
        name,
        iface: iface.to_owned(),
        mode: mode_name(m),
        source: Box::new(source),
    })
}

/// The interface index of `iface` in the current network namespace.
pub fn if_index(iface: &str) -> Result<u32, LoaderError> {
    let c = CString::new(iface).map_err(|_| LoaderError::NoInterface {
        iface: iface.to_owned(),
    })?;
    // SAFETY: c is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(LoaderError::NoInterface {
            iface: iface.to_owned(),
        });
    }
    Ok(index)
}

/// What a pin directory is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Balancer,
    Decap,
}

impl Role {
    fn dir(self) -> &'static str {
        match self {
            Role::Balancer => "lb",
            Role::Decap => "decap",
        }
    }
}

/// `<bpffs>/xdplb/<netns inode>/<iface>/<role>`, after checking `bpffs` is a bpffs.
pub fn pin_dir(bpffs: &Path, iface: &str, role: Role) -> Result<PathBuf, LoaderError> {
    check_bpffs(bpffs)?;
    let netns = std::fs::metadata("/proc/self/ns/net").map_err(|source| LoaderError::Io {
        what: "reading the network namespace of",
        path: "/proc/self/ns/net".into(),
        source,
    })?;
    Ok(bpffs
        .join("xdplb")
        .join(netns.ino().to_string())
        .join(iface)
        .join(role.dir()))
}

/// Fail clearly when `path` is not a mounted bpffs.
pub fn check_bpffs(path: &Path) -> Result<(), LoaderError> {
    let c =
        CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| LoaderError::NotBpffs {
            path: path.to_owned(),
        })?;
    // SAFETY: statfs fills the zeroed struct; c is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(LoaderError::Io {
            what: "checking the bpffs at",
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    // f_type's integer type differs between architectures.
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(LoaderError::NotBpffs {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Create `dir` (and parents) inside the bpffs.
pub fn create_pin_dir(dir: &Path) -> Result<(), LoaderError> {
    std::fs::create_dir_all(dir).map_err(|source| LoaderError::Io {
        what: "creating pin directory",
        path: dir.to_owned(),
        source,
    })
}

/// The file under a role's pin directory that pins its XDP link: while it exists the
/// program stays attached with no process holding it.
pub const LINK_PIN: &str = "link";

/// Remove everything pinned under `dir` (files are pins) and the directory itself, plus
/// its now-empty parents up to `xdplb/`.
///
/// The XDP program is detached when this returns. Removing the last reference to a link
/// through its pin (an unlink in bpffs) frees the link from a kernel work queue, later:
/// on a loaded machine the program went on forwarding packets after `lb-agent detach` had
/// returned. So the link pin is opened first and that descriptor closed last: closing the
/// last file of a link frees it before `close` returns.
pub fn remove_pin_dir(dir: &Path) -> Result<bool, LoaderError> {
    let link_pin = dir.join(LINK_PIN);
    let _held_link = if link_pin.exists() {
        Some(
            PinnedLink::from_pin(&link_pin).map_err(|source| LoaderError::PinnedLink {
                path: link_pin.clone(),
                source: Box::new(source),
            })?,
        )
    } else {
        None
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(LoaderError::Io {
                what: "reading pin directory",
                path: dir.to_owned(),
                source,
            });
        }
    };
    for entry in entries {
        let path = entry
            .map_err(|source| LoaderError::Io {
                what: "reading pin directory",
                path: dir.to_owned(),
                source,
            })?
            .path();
        std::fs::remove_file(&path).map_err(|source| LoaderError::Io {
            what: "removing pin",
            path: path.clone(),
            source,
        })?;
    }
    std::fs::remove_dir(dir).map_err(|source| LoaderError::Io {
        what: "removing pin directory",
        path: dir.to_owned(),
        source,
    })?;
    // Tidy empty parents (<iface>, <netns>, xdplb); stop at the first that is not empty.
    let mut parent = dir.parent();
    for _ in 0..3 {
        match parent {
            Some(p) if std::fs::remove_dir(p).is_ok() => parent = p.parent(),
            _ => break,
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_come_from_the_dataplane_config_and_go_back() {
        let dp = DataplaneConfig {
            ring_size: 13,
            flow_table_size: 1000,
            max_services: 3,
            max_backends: 9,
            max_filter_rules: 5,
            ..DataplaneConfig::default()
        };
        let caps = Capacities::from(&dp);
        assert_eq!(
            caps,
            Capacities {
                max_services: 3,
                max_backends: 9,
                ring_size: 13,
                flow_table_size: 1000,
                max_filter_rules: 5,
                new_flow_table_size: 250,
                flow_limit_sources: lb_common::maps::DEFAULT_FLOW_LIMIT_SOURCES,
            }
        );
        let mut other = DataplaneConfig::default();
        caps.keep_in(&mut other);
        assert_eq!(other, dp);
    }
}
