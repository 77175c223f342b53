//! The balancer's lifecycle on one interface: load the object with its maps pinned
//! (adopting the maps of a fast path a previous agent left running), fill the maps
//! through [`MapsSink`], attach (or swap the new program into the running link), keep
//! the backends' next hops resolved, and at the end either leave it all running for
//! the next agent (hitless restart) or detach and unpin it.
//!
//! The order is: [`FastPath::load`] gives a [`Loaded`] object and the [`MapsSink`] the
//! control plane writes the first desired state through; only then
//! [`Loaded::attach`] attaches the program, so it never runs on half-filled maps.
//!
//! Pins: `<bpffs>/xdplb/<netns>/<iface>/lb/`, one file per map plus [`LINK_PIN`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    },
};

use super::{
    desired::{DesiredState, Sink},
    forwarding,
    loader::{self, AttachMode, Capacities, LB_PROGRAM, LINK_PIN, Role},
    maps::Maps,
    neigh::{HopsMap, NextHopKeeper},
    nexthop::NextHopTable,
    stats::{self, ServiceTraffic, Snapshot, Traffic},
    sync::Reconciler,
};
use crate::config::{Mode, ServiceConfig};

/// The balancer's maps and their one writer.
pub struct MapsSink {
    maps: Maps,
    capacities: Capacities,
    /// None until the first apply when maps left by a previous agent are to be adopted
    /// (recognising its services needs the first desired state).
    reconciler: Option<Reconciler>,
    /// Backend id -> address of every backend entry written, for the next-hop keeper.
    backend_ids: tokio::sync::watch::Sender<BTreeMap<u32, IpAddr>>,
}

impl Sink for MapsSink {
    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<()> {
        let reconciler = match &mut self.reconciler {
            Some(r) => r,
            None => {
                let r = Reconciler::adopt(&self.maps, &self.capacities, desired)
                    .context("reading back the maps of the running fast path")?;
                self.reconciler.insert(r)
            }
        };
        let applied = reconciler.apply(&mut self.maps, desired);
        // Published even after a failed apply: what was written needs its next hops.
        let ids = reconciler.backend_addresses();
        self.backend_ids.send_if_modified(|old| {
            let changed = *old != ids;
            *old = ids;
            changed
        });
        for s in applied? {
            if s.slots_changed > 0 {
                tracing::info!(service = %s.name, id = s.service_id, backends = ?s.backends, slots_changed = s.slots_changed, "ring written");
            }
        }
        Ok(())
    }

    fn snapshot(&self, services: &[ServiceConfig]) -> Option<Snapshot> {
        let c = stats::counters(&self.maps).ok()?;
        let mut snap = Snapshot {
            counters: c.counters.iter().map(|(k, v)| (k.label(), *v)).collect(),
            drops: c.drops.iter().map(|(k, v)| (k.label(), *v)).collect(),
            ..Default::default()
        };
        let reconciler = self.reconciler.as_ref()?;
        snap.filter_drops.insert(
            stats::NOT_ALLOWED_RULE.to_owned(),
            stats::filter_drops(&self.maps, lb_common::types::FILTER_RULE_NOT_ALLOWED).ok()?,
        );
        for (net, id) in reconciler.deny_rules() {
            snap.filter_drops
                .insert(net.to_string(), stats::filter_drops(&self.maps, id).ok()?);
        }
        for (rule, id) in reconciler.service_filter_rules() {
            snap.filter_drops
                .insert(rule, stats::filter_drops(&self.maps, id).ok()?);
        }
        for svc in services.iter().filter(|s| s.mode == Mode::L4) {
            let Some(id) = reconciler.service_id(&svc.name) else {
                continue;
            };
            let t =
                stats::service_traffic(&self.maps, id, reconciler.service_backend_ids(&svc.name))
                    .ok()?;
            let mut st = ServiceTraffic {
                packets: t.packets,
                bytes: t.bytes,
                backends: Default::default(),
            };
            for b in &svc.backends {
                if let Some(bid) = reconciler.backend_id(&svc.name, b.address, b.port) {
                    let t = stats::backend_traffic(&self.maps, bid).ok()?;
                    st.backends.insert(
                        SocketAddr::new(b.address, b.port).to_string(),
                        Traffic {
                            packets: t.packets,
                            bytes: t.bytes,
                        },
                    );
                }
            }
            snap.services.insert(svc.name.clone(), st);
        }
        Some(snap)
    }

    fn ring_digest(&self, service: &str) -> Option<String> {
        self.reconciler.as_ref()?.ring_digest(service)
    }

    fn ring_slots(&self, service: &str) -> Option<anyhow::Result<Vec<String>>> {
        self.reconciler.as_ref()?.ring_slots(&self.maps, service)
    }
}

/// How [`FastPath::load`] found the pin directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// Nothing running: attach anew.
    Fresh,
    /// A fast path pinned by a previous agent, with the same capacities: reuse its maps
    /// and swap the new program into its link.
    Adopt,
}

/// The object loaded with its maps pinned, not attached yet.
pub struct Loaded {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    takeover: Takeover,
    iface: String,
    backend_ids: tokio::sync::watch::Receiver<BTreeMap<u32, IpAddr>>,
}

/// The attached program. It is pinned (maps and link) under its pin directory, so it
/// keeps forwarding when the agent stops; the next agent adopts it.
pub struct FastPath {
    /// The program as loaded by this agent (the link is pinned, so dropping this does
    /// not detach).
    ebpf: Ebpf,
    /// Keeps the L4 backends' next hops resolved (None until started, or when netlink
    /// failed).
    next_hops: Option<NextHopKeeper>,
    pin_dir: PathBuf,
    iface: String,
    /// What the next-hop keeper writes into the `NEXT_HOPS` map.
    backend_ids: tokio::sync::watch::Receiver<BTreeMap<u32, IpAddr>>,
}

impl FastPath {
    /// Load the object for `iface` with its maps pinned under `bpffs`, reusing those of
    /// a running fast path when there is one with the same capacities (otherwise that
    /// one is replaced, and established flows are re-hashed).
    pub fn load(caps: Capacities, iface: &str, bpffs: &Path) -> anyhow::Result<(Loaded, MapsSink)> {
        let pin_dir = loader::pin_dir(bpffs, iface, Role::Balancer)?;
        let running = pin_dir.join(LINK_PIN).exists();
        let takeover = match (running, loader::pinned_capacities(&pin_dir)) {
            (true, Some(pinned)) if pinned == caps => Takeover::Adopt,
            (true, pinned) => {
                tracing::warn!(?pinned, wanted = ?caps, "the running fast path's maps have other capacities or layouts: replacing it (established flows are re-hashed)");
                Takeover::Fresh
            }
            (false, _) => Takeover::Fresh,
        };
        if takeover == Takeover::Fresh && loader::remove_pin_dir(&pin_dir)? {
            tracing::warn!(dir = %pin_dir.display(), "removed pins a previous agent left behind");
        }
        loader::create_pin_dir(&pin_dir)?;
        let mut ebpf = loader::load_pinned(&caps, &pin_dir)?;
        let maps = Maps::take(&mut ebpf, None).context("taking the balancer's maps")?;
        let (ids_tx, ids_rx) = tokio::sync::watch::channel(BTreeMap::new());
        let sink = MapsSink {
            maps,
            capacities: caps,
            reconciler: (takeover == Takeover::Fresh).then(|| Reconciler::new(&caps)),
            backend_ids: ids_tx,
        };
        let loaded = Loaded {
            ebpf,
            pin_dir,
            takeover,
            iface: iface.to_owned(),
            backend_ids: ids_rx,
        };
        Ok((loaded, sink))
    }

    /// Start keeping the next hops of the L4 backends `backends` publishes resolved
    /// ([`crate::control::Control::watch_l4_backends`]); the keeper follows every later
    /// change by itself (netlink notifications, no polling), and writes the next hops
    /// of the backend ids the maps hold into the `NEXT_HOPS` map (without it, or when
    /// that map cannot be opened, the program looks every next hop up in the FIB).
    pub fn keep_next_hops(&mut self, backends: tokio::sync::watch::Receiver<BTreeSet<IpAddr>>) {
        let pin = self.pin_dir.join(lb_common::maps::NEXT_HOPS);
        let hops = aya::maps::MapData::from_pin(&pin)
            .and_then(|data| aya::maps::Array::try_from(aya::maps::Map::Array(data)))
            .map(|map| HopsMap {
                table: NextHopTable::new(map),
                ids: self.backend_ids.clone(),
            });
        let hops = match hops {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, pin = %pin.display(), "cannot open the next-hop map; every packet's next hop is looked up in the kernel's FIB");
                None
            }
        };
        match NextHopKeeper::spawn(backends, hops) {
            Ok(k) => self.next_hops = Some(k),
            Err(e) => {
                tracing::warn!(error = %e, "cannot keep next hops resolved; packets to unresolved next hops go up to the kernel");
            }
        }
    }

    /// Wait, at most `within`, until the next hops of every backend in the maps are written
    /// (see [`NextHopKeeper::resolved`]); says which are not when the time is up. Without
    /// a keeper (netlink failed) there is nothing to wait for.
    pub async fn next_hops_resolved(&self, within: Duration) {
        let Some(k) = &self.next_hops else {
            return;
        };
        let start = std::time::Instant::now();
        match k.resolved(within).await {
            Ok(()) => tracing::debug!(
                waited_ms = start.elapsed().as_millis(),
                "next hops of every backend resolved"
            ),
            Err(unresolved) => {
                let list: Vec<String> = unresolved.iter().map(ToString::to_string).collect();
                tracing::warn!(backends = %list.join(" "), waited_ms = start.elapsed().as_millis(), "next hops not resolved yet: these backends' packets go up to the kernel until they are");
            }
        }
    }

    /// The agent is stopping: log the counters and leave the fast path running (its
    /// next hops and the interface's forwarding setting with it), or remove it all
    /// when `detach_too`.
    pub async fn stop(mut self, snapshot: Option<Snapshot>, detach_too: bool) {
        if let Some(s) = snapshot {
            let nonzero: Vec<String> = s
                .counters
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .chain(
                    s.drops
                        .iter()
                        .filter(|(_, v)| **v > 0)
                        .map(|(k, v)| format!("drop_{k}={v}")),
                )
                .collect();
            tracing::info!(iface = %self.iface, counters = %nonzero.join(" "), "fast path counters");
        }
        if detach_too {
            if let Some(k) = self.next_hops.take() {
                k.clear().await;
            }
            drop(self.ebpf);
            if let Err(e) = remove_fast_path(&self.pin_dir, &self.iface) {
                tracing::warn!(error = %e, "removing the fast path");
            } else {
                tracing::info!(iface = %self.iface, "fast path detached, pins removed");
            }
        } else {
            if let Some(k) = self.next_hops.take() {
                k.stop().await;
            }
            tracing::info!(iface = %self.iface, pins = %self.pin_dir.display(), "fast path left running for the next agent; `lb-agent detach --iface {}` removes it", self.iface);
        }
    }
}

impl Loaded {
    /// Attach the program (call once the maps hold the first desired state): swap it
    /// into the running fast path's link when adopting, else attach it anew in `mode`
    /// and pin the link. Forwarding is enabled on the interface first.
    pub fn attach(self, mode: AttachMode) -> anyhow::Result<FastPath> {
        let Loaded {
            mut ebpf,
            pin_dir,
            takeover,
            iface,
            backend_ids,
        } = self;
        forwarding::enable(&iface)?;
        let program = loader::load_program(&mut ebpf, LB_PROGRAM)?;
        let link_pin = pin_dir.join(LINK_PIN);
        match takeover {
            Takeover::Adopt => {
                let pinned = PinnedLink::from_pin(&link_pin)
                    .with_context(|| format!("opening the pinned link {}", link_pin.display()))?;
                let link = XdpLink::try_from(FdLink::from(pinned))
                    .context("the pinned link is not an XDP link")?;
                program
                    .attach_to_link(link)
                    .context("swapping the new program into the running fast path's link")?;
                tracing::info!(iface, pins = %pin_dir.display(), "adopted the running fast path: maps kept, program swapped in place");
            }
            Takeover::Fresh => {
                let (id, mode_used) = loader::attach(program, LB_PROGRAM, &iface, mode)?;
                let link: FdLink = program.take_link(id)?.try_into().context(
                    "the kernel attached XDP through netlink, which cannot be pinned \
                     (needs bpf_link, Linux 5.9+)",
                )?;
                // The pin holds the link: it stays attached after this process ends.
                link.pin(&link_pin)
                    .with_context(|| format!("pinning the XDP link at {}", link_pin.display()))?;
                tracing::info!(iface, mode = mode_used, pins = %pin_dir.display(), "fast path attached");
            }
        }
        Ok(FastPath {
            ebpf,
            next_hops: None,
            pin_dir,
            iface,
            backend_ids,
        })
    }
}

/// Unpin everything (the link goes with its last pin: detached) and put the
/// interface's forwarding setting back.
fn remove_fast_path(pin_dir: &Path, iface: &str) -> anyhow::Result<bool> {
    let removed = loader::remove_pin_dir(pin_dir)?;
    forwarding::restore(iface)?;
    Ok(removed)
}

/// `lb-agent detach`: remove the balancer's pins for `iface` (a running agent detaches
/// itself when it stops with `--detach-on-exit`).
pub fn detach(iface: &str, bpffs: &Path) -> anyhow::Result<()> {
    let dir = loader::pin_dir(bpffs, iface, Role::Balancer)?;
    if remove_fast_path(&dir, iface)? {
        println!("removed the fast path pinned for {iface}");
    } else {
        println!("nothing pinned for {iface} under {}", bpffs.display());
    }
    Ok(())
}
