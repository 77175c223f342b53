//! The backend side (`lb-agent decap attach|detach`): an XDP program that removes the
//! outer header of tunnelled packets addressed to this host (IPv4-in-IPv4,
//! IPv6-in-IPv4, IPv6-in-IPv6, IPv4-in-IPv6, and the outer IPv4 and UDP headers of GUE
//! packets to `--gue-port`, `lb-ebpf/src/gue.rs`) and hands the inner packet to the
//! local stack, where the VIP is configured on `lo`. The kernels this runs on may
//! have no `ipip` module, so the decapsulation is ours.
//!
//! The program's link and its maps are pinned under
//! `<bpffs>/xdplb/<netns>/<iface>/decap/`, so it stays attached after the command exits;
//! `detach` removes the pins, which detaches it.

use std::{collections::BTreeSet, net::IpAddr, path::Path};

use anyhow::{Context as _, bail};
use aya::{
    maps::{Array, HashMap},
    programs::links::FdLink,
};
use lb_common::{
    maps as names,
    types::{DecapKey, GlobalConfig},
};

use crate::{
    cli::XdpModeArg,
    dataplane::{
        loader::{self, AttachMode, Capacities, DECAP_PROGRAM, LINK_PIN, Role},
        sync::addr_words,
    },
};

/// Every address of this host (this network namespace) but loopback ones.
pub fn local_addresses() -> anyhow::Result<BTreeSet<IpAddr>> {
    let mut out = BTreeSet::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getifaddrs");
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it names.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            let addr = match family {
                libc::AF_INET => {
                    // SAFETY: AF_INET means sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    Some(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()))
                }
                libc::AF_INET6 => {
                    // SAFETY: AF_INET6 means sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                _ => None,
            };
            if let Some(a) = addr.filter(|a| !a.is_loopback()) {
                out.insert(a);
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// An IPv6 link-local address (fe80::/10).
fn is_link_local(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

pub(crate) fn attach_mode(mode: XdpModeArg) -> anyhow::Result<AttachMode> {
    Ok(match mode {
        XdpModeArg::Auto => AttachMode::Auto,
        XdpModeArg::Native => AttachMode::Native,
        XdpModeArg::Skb => AttachMode::Skb,
        XdpModeArg::Off => bail!("--xdp-mode off makes no sense for the decapsulator"),
    })
}

/// `lb-agent decap attach`.
pub fn attach(
    iface: &str,
    bpffs: &Path,
    addresses: &[IpAddr],
    mode: XdpModeArg,
    gue_port: u16,
) -> anyhow::Result<()> {
    let mode = attach_mode(mode)?;
    let dir = loader::pin_dir(bpffs, iface, Role::Decap)?;
    let addresses: BTreeSet<IpAddr> = if addresses.is_empty() {
        // Both families: the balancer tunnels to IPv4 backends over IPv4 and to IPv6
        // backends over IPv6. Link-local IPv6 addresses are no tunnel destinations.
        local_addresses()?
            .into_iter()
            .filter(|a| !is_link_local(a))
            .collect()
    } else {
        addresses.iter().copied().collect()
    };
    if addresses.is_empty() {
        bail!("no address to accept tunnels for: this host has none but loopback; pass --address");
    }
    let replaced = loader::remove_pin_dir(&dir)?;
    if replaced {
        tracing::info!(dir = %dir.display(), "replaced the decapsulator attached before");
    }

    let mut ebpf = loader::load(&Capacities::DECAP_ONLY)?;
    let mut dsts: HashMap<_, DecapKey, u32> = ebpf
        .take_map(names::DECAP_DSTS)
        .context("the eBPF object has no decap map")?
        .try_into()?;
    for a in &addresses {
        let (addr, family) = addr_words(*a);
        dsts.insert(
            DecapKey {
                addr,
                family,
                _pad: [0; 3],
            },
            1,
            0,
        )
        .with_context(|| format!("adding {a} to the decap map"))?;
    }
    write_gue_port(&mut ebpf, gue_port)?;
    let counters = ebpf
        .take_map(names::COUNTERS)
        .context("the eBPF object has no counters map")?;
    let program = loader::load_program(&mut ebpf, DECAP_PROGRAM)?;
    let (link_id, mode_used) = attach_after(program, iface, mode, replaced)?;
    let link: FdLink = program
        .take_link(link_id)?
        .try_into()
        .context("the kernel attached XDP through netlink, which cannot be pinned (needs bpf_link, Linux 5.9+)")?;

    loader::create_pin_dir(&dir)?;
    let pin = || -> anyhow::Result<()> {
        dsts.pin(dir.join(names::DECAP_DSTS))?;
        counters.pin(dir.join(names::COUNTERS))?;
        link.pin(dir.join(LINK_PIN))?;
        Ok(())
    };
    if let Err(e) = pin() {
        let _ = loader::remove_pin_dir(&dir);
        return Err(e.context(format!("pinning under {}", dir.display())));
    }
    let list: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    println!(
        "decap attached to {iface} ({mode_used} mode) for {} (IPIP, and GUE on UDP port \
         {gue_port}); pinned under {}",
        list.join(", "),
        dir.display()
    );
    Ok(())
}

/// Attach the decapsulator. When one was just unpinned (`replaced`), the kernel releases
/// its link a moment later: an attach at once can fail with "File exists" (measured
/// here when `decap attach` is run again, e.g. with another `--gue-port`), so the
/// attach is tried again for up to a second.
fn attach_after(
    program: &mut aya::programs::Xdp,
    iface: &str,
    mode: AttachMode,
    replaced: bool,
) -> anyhow::Result<(aya::programs::xdp::XdpLinkId, &'static str)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match loader::attach(program, DECAP_PROGRAM, iface, mode) {
            Ok(attached) => return Ok(attached),
            Err(e) if replaced && std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "the replaced decapsulator is still attached; trying again");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The decapsulator reads the GUE port from the global config entry (the rest of it is
/// the balancer's and unused here).
fn write_gue_port(ebpf: &mut aya::Ebpf, gue_port: u16) -> anyhow::Result<()> {
    let mut config: Array<_, GlobalConfig> = ebpf
        .map_mut(names::CONFIG)
        .context("the eBPF object has no config map")?
        .try_into()?;
    let entry = GlobalConfig {
        gue_port: gue_port.to_be(),
        ..GlobalConfig::default()
    };
    config
        .set(0, entry, 0)
        .context("writing the GUE port to the config map")?;
    Ok(())
}

/// `lb-agent decap detach`.
pub fn detach(iface: &str, bpffs: &Path) -> anyhow::Result<()> {
    let dir = loader::pin_dir(bpffs, iface, Role::Decap)?;
    if loader::remove_pin_dir(&dir)? {
        println!("decap detached from {iface}");
    } else {
        println!(
            "no decapsulator pinned for {iface} under {}",
            bpffs.display()
        );
    }
    Ok(())
}
