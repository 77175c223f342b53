//! Issue 12, item 1, end to end: the fast path takes its backends' next hops from the
//! agent's `NEXT_HOPS` map, and when a next hop changes while traffic flows the map,
//! and the traffic, follow within milliseconds.
//!
//! The change: backend be1's NIC gets a new MAC (`ip link set eth0 address`, with
//! `arp_notify` on, so be1 announces it with a gratuitous ARP, as a host whose NIC
//! was swapped or whose address moved does). The LB's kernel updates its neighbour
//! entry; the agent's keeper hears the neighbour notification and rewrites be1's
//! entry. Until then the program sends be1's packets to the old MAC, which be1 no
//! longer accepts, so a map that never follows shows up as be1 never serving again.
//!
//! Measured and printed (not asserted as a speed), from just before `ip link set` is
//! started (its own run time is printed too, and is part of both figures): the time to
//! the new MAC in the map (polled from its pin every 100 us) and to the first tunnelled
//! frame to the new MAC seen on be1.
//!
//! Needs root and the agent binary (`XDPLB_AGENT_BIN`, else `target/release/lb-agent`).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::maps::{Array, Map, MapData};
use lb_agent::dataplane::sync::addr_words;
use lb_common::{
    maps as names,
    types::{NEXT_HOP_F_VALID, NextHopEntry},
};
use xdplb_tests::{
    capture::{Capture, Direction},
    load::Load,
    netns::{self, mac_of},
    packet::Frame,
    require_privileges,
    scenario::{BedOptions, L4Bed},
    topology::{self, VIP},
};

/// be1's new MAC.
const NEW_MAC: [u8; 6] = [0x02, 0x4e, 0x48, 0x00, 0x0b, 0x01];

/// The pinned `NEXT_HOPS` map of the LB's fast path under `bpffs`
/// (`xdplb/<netns>/eth0/lb/`).
fn find_pin(bpffs: &Path) -> Option<PathBuf> {
    let netns_dirs = std::fs::read_dir(bpffs.join("xdplb")).ok()?;
    netns_dirs
        .filter_map(Result::ok)
        .map(|d| d.path().join("eth0/lb").join(names::NEXT_HOPS))
        .find(|p| p.exists())
}

fn open_next_hops(bpffs: &Path) -> anyhow::Result<Array<MapData, NextHopEntry>> {
    let pin = find_pin(bpffs)
        .with_context(|| format!("no pinned {} under {}", names::NEXT_HOPS, bpffs.display()))?;
    let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    Ok(Array::try_from(Map::Array(data))?)
}

/// The backend id (slot) and the valid entry written for `backend`, if any.
fn entry_for(map: &Array<MapData, NextHopEntry>, backend: Ipv4Addr) -> Option<(u32, NextHopEntry)> {
    let (addr, family) = addr_words(IpAddr::V4(backend));
    (0..map.len()).find_map(|id| {
        let e = map.get(&id, 0).ok()?;
        (e.flags & NEXT_HOP_F_VALID != 0 && e.addr == addr && e.family == family).then_some((id, e))
    })
}

/// Polls `f` every millisecond until it is true; the time it took.
fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(1));
    }
    None
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[test]
fn traffic_follows_a_backend_mac_change_within_milliseconds() -> anyhow::Result<()> {
    require_privileges!();
    let bed = L4Bed::start(&BedOptions::default())?;
    let t = &bed.topo;
    let be1 = t.backends[0].clone();
    let be1_name = bed.servers[0].name().to_owned();
    let map = open_next_hops(t.bpffs())?;
    let old_mac = netns::in_netns(&be1.ns, || mac_of("eth0"))?;

    // The keeper writes every backend's next hop once resolved (managed neighbours).
    for b in &t.backends {
        let want = netns::in_netns(&b.ns, || mac_of("eth0"))?;
        wait_until(Duration::from_secs(5), || {
            entry_for(&map, b.addr).is_some_and(|(_, e)| e.dmac == want)
        })
        .with_context(|| {
            format!(
                "{} never got its next hop ({}) in {}: agent log:\n{}",
                b.addr,
                mac_str(want),
                names::NEXT_HOPS,
                t.agent_log_tail(30)
            )
        })?;
    }
    let lb_mac = netns::in_netns(&t.lb.ns, || mac_of("eth0"))?;
    let (be1_id, e) = entry_for(&map, be1.addr).context("be1's entry")?;
    ensure!(
        e.smac == lb_mac && e.mtu == 1500,
        "be1's entry: {e:?}, want source MAC {} and MTU 1500",
        mac_str(lb_mac)
    );

    topology::sysctl(&be1.ns, "net.ipv4.conf.eth0.arp_notify", "1")?;
    let load = Load::start(
        &t.client.ns,
        4,
        Duration::from_secs(6),
        Duration::from_millis(5),
    )?;
    thread::sleep(Duration::from_millis(1500));

    // Tunnelled frames reach be1's eth0 (decapsulated by be1's XDP before the tap):
    // the first one addressed to the new MAC is when traffic followed.
    let first_frame: Arc<Mutex<Option<Instant>>> = Arc::default();
    let capture = {
        let first = first_frame.clone();
        Capture::start(&be1.ns, "eth0", Direction::Incoming, move |frame| {
            let hit = Frame::parse(frame)
                .is_ok_and(|f| f.dst_mac == NEW_MAC && f.ipv4().is_ok_and(|ip| ip.dst == VIP));
            if hit {
                first
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
            }
            hit
        })?
    };
    // The map is polled from its own thread (a slot read every 100 us), started before
    // the change: the keeper may well be done before `ip` has returned.
    let poller = {
        let pin = find_pin(t.bpffs()).context("the pin")?;
        thread::spawn(move || -> anyhow::Result<Option<Instant>> {
            let map: Array<MapData, NextHopEntry> =
                Array::try_from(Map::Array(MapData::from_pin(&pin)?))?;
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                // be1 keeps its backend id.
                if map
                    .get(&be1_id, 0)
                    .is_ok_and(|e| e.flags & NEXT_HOP_F_VALID != 0 && e.dmac == NEW_MAC)
                {
                    return Ok(Some(Instant::now()));
                }
                thread::sleep(Duration::from_micros(100));
            }
            Ok(None)
        })
    };
    thread::sleep(Duration::from_millis(50));
    let changed = Instant::now();
    netns::exec(
        &be1.ns,
        &[
            "ip",
            "link",
            "set",
            "dev",
            "eth0",
            "address",
            &mac_str(NEW_MAC),
        ],
    )?;
    let command = changed.elapsed();
    let to_map = poller
        .join()
        .map_err(|_| anyhow::anyhow!("the map poller panicked"))??
        .map(|at| at.saturating_duration_since(changed));
    let samples = load.finish()?;
    let frames = capture.finish()?;
    let first = *first_frame.lock().unwrap_or_else(|e| e.into_inner());

    let Some(to_map) = to_map else {
        bail!(
            "be1's next hop never changed to {} in {} (old {}): agent log:\n{}",
            mac_str(NEW_MAC),
            names::NEXT_HOPS,
            mac_str(old_mac),
            t.agent_log_tail(40)
        );
    };
    let to_traffic = first.map(|f| f.saturating_duration_since(changed));
    let settled = changed + to_map;
    let after: Vec<_> = samples.iter().filter(|s| s.start >= settled).collect();
    let failed_between = samples
        .iter()
        .filter(|s| s.start >= changed && s.start < settled && !s.ok())
        .count();
    let be1_after = after
        .iter()
        .filter(|s| s.backend() == Some(be1_name.as_str()))
        .count();
    println!(
        "be1's MAC {} -> {} (`ip link set` took {:.1} ms): in {} after {:.1} ms; first tunnelled \
         frame to the new MAC after {}; {} requests started in between failed; after: {} \
         requests, {} served by be1, {} failed",
        mac_str(old_mac),
        mac_str(NEW_MAC),
        command.as_secs_f64() * 1e3,
        names::NEXT_HOPS,
        to_map.as_secs_f64() * 1e3,
        to_traffic.map_or("(none)".to_owned(), |d| format!(
            "{:.1} ms",
            d.as_secs_f64() * 1e3
        )),
        failed_between,
        after.len(),
        be1_after,
        after.iter().filter(|s| !s.ok()).count(),
    );
    ensure!(
        frames.matched > 0 && to_traffic.is_some(),
        "no tunnelled frame reached be1 at its new MAC ({frames:?})"
    );
    ensure!(
        be1_after > 0,
        "be1 served none of the {} requests after its next hop changed",
        after.len()
    );
    let failures: Vec<_> = after.iter().filter(|s| !s.ok()).collect();
    ensure!(
        failures.is_empty(),
        "{} of {} requests started after the map followed failed, e.g. {:?}",
        failures.len(),
        after.len(),
        failures.first()
    );
    Ok(())
}
