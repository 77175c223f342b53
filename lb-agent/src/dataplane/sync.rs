//! Desired state -> BPF maps. The one place that converts addresses and ports to the
//! network-order layouts of `lb_common::types`, and the one writer of the balancer's
//! maps.
//!
//! [`Reconciler::apply`] diffs the desired state against what it wrote last and writes
//! only the differences, in an order that never exposes a ring slot pointing to
//! nothing: backend entries first (marked active), then the ring slots that change
//! (each an in-place write of a valid backend id), then the VIP entry, and only at
//! the end the entries of removed backends are marked inactive, which sends their
//! pinned flows back through the ring.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use aya::maps::MapError;
use lb_common::types::{
    BACKEND_F_ACTIVE, Backend, ENCAP_GUE, ENCAP_IPIP, FAMILY_V4, FAMILY_V6, GlobalConfig,
    PROTO_TCP, PROTO_UDP, VIP_F_L7, VIP_F_SOURCE_HASH, VipKey, VipMeta,
};

use super::{
    maps::Maps,
    ring::{self, RingMember},
};
use crate::config::{DataplaneConfig, Encap, Protocol};

/// A service as the fast path should see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    /// Passed to the kernel (the L7 proxy serves it).
    pub l7: bool,
    /// Hash the client address only (source-IP affinity).
    pub source_hash: bool,
    pub backends: Vec<DesiredBackend>,
}

/// A backend as the fast path should see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub address: IpAddr,
    pub port: u16,
    /// Ring weight: its share of new flows. 0 = no new flows.
    pub weight: u32,
    /// Flows already pinned to it may continue (set while in the ring or draining).
    pub active: bool,
}

/// Everything the reconciler writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub source_v4: Option<std::net::Ipv4Addr>,
    pub source_v6: Option<std::net::Ipv6Addr>,
    pub encap: u32,
    pub services: Vec<DesiredService>,
}

impl DesiredState {
    /// The global settings of `dataplane` with the given services (as derived by
    /// `crate::state` from config, overrides and health).
    pub fn new(dataplane: &DataplaneConfig, services: Vec<DesiredService>) -> Self {
        DesiredState {
            source_v4: dataplane.source_ipv4,
            source_v6: dataplane.source_ipv6,
            encap: match dataplane.encap {
                Encap::Ipip => ENCAP_IPIP,
                Encap::Gue => ENCAP_GUE,
            },
            services,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("no free service slot: all {max} are in use (raise dataplane.max_services)")]
    ServicesFull { max: u32 },
    #[error("no free backend slot: all {max} are in use (raise dataplane.max_backends)")]
    BackendsFull { max: u32 },
    #[error("writing {what}: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: MapError,
    },
}

/// Address in the map layout: network order, IPv4 in word 0.
pub fn addr_words(addr: IpAddr) -> ([u32; 4], u8) {
    match addr {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// The VIP map key of a service.
pub fn vip_key(vip: SocketAddr, protocol: Protocol) -> VipKey {
    let (addr, family) = addr_words(vip.ip());
    VipKey {
        addr,
        port: vip.port().to_be(),
        proto: match protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        },
        family,
    }
}

/// A small allocator of map indices: lowest free first, so ids stay dense.
#[derive(Debug)]
struct IdPool {
    max: u32,
    free: BTreeSet<u32>,
    next: u32,
}

impl IdPool {
    fn new(max: u32) -> Self {
        IdPool {
            max,
            free: BTreeSet::new(),
            next: 0,
        }
    }
    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
    /// Mark `id` as taken (adopting ids written by a previous agent).
    fn reserve(&mut self, id: u32) {
        if id >= self.max {
            return;
        }
        while self.next <= id {
            self.free.insert(self.next);
            self.next += 1;
        }
        self.free.remove(&id);
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}

type BackendKey = (IpAddr, u16);

/// What the reconciler last wrote for a service.
#[derive(Debug)]
struct WrittenService {
    id: u32,
    key: VipKey,
    meta: VipMeta,
    /// The ring as written (empty = none).
    ring: Vec<u32>,
    backends: BTreeMap<BackendKey, u32>,
}

/// Per-service result of an apply, for logs and the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedService {
    pub name: String,
    pub service_id: u32,
    /// (address, port, backend id, ring slots held)
    pub backends: Vec<(IpAddr, u16, u32, u32)>,
    /// Ring slots rewritten by this apply.
    pub slots_changed: u32,
}

/// The one writer of the balancer's maps.
#[derive(Debug)]
pub struct Reconciler {
    ring_size: u32,
    config: Option<GlobalConfig>,
    services: BTreeMap<String, WrittenService>,
    backend_entries: BTreeMap<u32, Backend>,
    service_ids: IdPool,
    backend_ids: IdPool,
}

impl Reconciler {
    pub fn new(ring_size: u32, max_services: u32, max_backends: u32) -> Self {
        Reconciler {
            ring_size,
            config: None,
            services: BTreeMap::new(),
            backend_entries: BTreeMap::new(),
            service_ids: IdPool::new(max_services),
            backend_ids: IdPool::new(max_backends),
        }
    }

    /// Take over the maps a previous agent filled (hitless restart): read back what is
    /// written (global config, VIPs, their rings and backends) as if this reconciler
    /// had written it, so that the next [`Reconciler::apply`] writes only differences.
    /// Services are recognised by their VIP key among `desired`; a backend entry by
    /// its address among the desired service's backends. Whatever is not recognised
    /// is kept under a placeholder name, and so removed by the next apply.
    pub fn adopt(
        maps: &Maps,
        ring_size: u32,
        max_services: u32,
        max_backends: u32,
        desired: &DesiredState,
    ) -> Result<Self, SyncError> {
        let read_err = |what: &'static str| move |source| SyncError::Write { what, source };
        let mut r = Reconciler::new(ring_size, max_services, max_backends);
        r.config = Some(
            maps.config
                .get(&0, 0)
                .map_err(read_err("reading global config"))?,
        );

        // Every backend entry ever written (family 0 = never used).
        let mut entries: BTreeMap<u32, Backend> = BTreeMap::new();
        for id in 0..max_backends {
            let e = maps
                .backends
                .get(&id, 0)
                .map_err(read_err("reading backend"))?;
            if e.family != 0 {
                entries.insert(id, e);
            }
        }
        let vips: Vec<(VipKey, VipMeta)> = maps
            .vips
            .iter()
            .collect::<Result<_, _>>()
            .map_err(read_err("reading VIPs"))?;
        for (key, meta) in vips {
            let svc = desired
                .services
                .iter()
                .find(|s| vip_key(s.vip, s.protocol) == key);
            let name = svc.map_or_else(
                || format!("\0adopted service {}", meta.service_id),
                |s| s.name.clone(),
            );
            let mut ring = Vec::new();
            if meta.ring_size == ring_size && ring_size > 0 {
                ring.reserve(ring_size as usize);
                let base = meta.service_id * ring_size;
                for slot in 0..ring_size {
                    ring.push(
                        maps.rings
                            .get(&(base + slot), 0)
                            .map_err(read_err("reading ring"))?,
                    );
                }
            }
            let mut backends: BTreeMap<BackendKey, u32> = BTreeMap::new();
            for (&id, e) in entries
                .iter()
                .filter(|(_, e)| e.service_id == meta.service_id)
            {
                let address = entry_address(e);
                let port = svc
                    .and_then(|s| s.backends.iter().find(|b| b.address == address))
                    .map_or(key_port(&key), |b| b.port);
                // Two entries for one backend (an old, inactive one left behind):
                // keep the active one; the other stays free.
                let keep = match backends.get(&(address, port)) {
                    Some(&other) => {
                        e.flags & BACKEND_F_ACTIVE != 0
                            && entries[&other].flags & BACKEND_F_ACTIVE == 0
                    }
                    None => true,
                };
                if keep {
                    backends.insert((address, port), id);
                }
            }
            r.service_ids.reserve(meta.service_id);
            for &id in backends.values() {
                r.backend_ids.reserve(id);
                r.backend_entries.insert(id, entries[&id]);
            }
            r.services.insert(
                name,
                WrittenService {
                    id: meta.service_id,
                    key,
                    meta,
                    ring,
                    backends,
                },
            );
        }
        Ok(r)
    }

    /// Backend id of `(service, address, port)` as last written.
    pub fn backend_id(&self, service: &str, address: IpAddr, port: u16) -> Option<u32> {
        self.services
            .get(service)?
            .backends
            .get(&(address, port))
            .copied()
    }

    /// Service id of `service` as last written.
    pub fn service_id(&self, service: &str) -> Option<u32> {
        self.services.get(service).map(|s| s.id)
    }

    /// Write the differences between `desired` and the maps.
    pub fn apply(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredState,
    ) -> Result<Vec<AppliedService>, SyncError> {
        let config = GlobalConfig {
            source_v4: desired
                .source_v4
                .map_or(0, |a| u32::from_ne_bytes(a.octets())),
            source_v6: desired.source_v6.map_or([0; 4], |a| addr_words(a.into()).0),
            encap: desired.encap,
            _pad: 0,
        };
        if self.config != Some(config) {
            maps.config
                .set(0, config, 0)
                .map_err(|source| SyncError::Write {
                    what: "global config",
                    source,
                })?;
            self.config = Some(config);
        }

        let mut applied = Vec::with_capacity(desired.services.len());
        let mut still_used: BTreeSet<u32> = BTreeSet::new();
        // Entries to write inactive once no ring points at them.
        let mut deactivate: Vec<(u32, Backend)> = Vec::new();

        for svc in &desired.services {
            let key = vip_key(svc.vip, svc.protocol);
            let written = match self.services.get_mut(&svc.name) {
                Some(w) => w,
                None => {
                    let id = self.service_ids.alloc().ok_or(SyncError::ServicesFull {
                        max: self.service_ids.max,
                    })?;
                    self.services
                        .entry(svc.name.clone())
                        .or_insert(WrittenService {
                            id,
                            key,
                            meta: VipMeta::default(),
                            ring: Vec::new(),
                            backends: BTreeMap::new(),
                        })
                }
            };

            // 1. Backend entries: allocate ids, write new/changed active entries now.
            let mut members = Vec::new();
            let mut ids = BTreeMap::new();
            for b in &svc.backends {
                let bkey = (b.address, b.port);
                let id = match written.backends.get(&bkey) {
                    Some(&id) => id,
                    None => self.backend_ids.alloc().ok_or(SyncError::BackendsFull {
                        max: self.backend_ids.max,
                    })?,
                };
                ids.insert(bkey, id);
                let (addr, family) = addr_words(b.address);
                let entry = Backend {
                    addr,
                    family,
                    flags: if b.active { BACKEND_F_ACTIVE } else { 0 },
                    _pad: [0; 2],
                    service_id: written.id,
                };
                if b.active {
                    write_backend(maps, &mut self.backend_entries, id, entry)?;
                } else {
                    deactivate.push((id, entry));
                }
                if b.active && b.weight > 0 {
                    members.push((format!("{}:{}", b.address, b.port), id, b.weight));
                }
            }
            for (bkey, &id) in &written.backends {
                if !ids.contains_key(bkey) {
                    deactivate.extend(inactive(&self.backend_entries, id));
                }
            }

            // 2. The ring: in-place writes of the slots that change.
            let ring_members: Vec<RingMember<'_>> = members
                .iter()
                .map(|(k, id, w)| RingMember {
                    id: *id,
                    key: k,
                    weight: *w,
                })
                .collect();
            let new_ring = ring::build(&ring_members, self.ring_size).unwrap_or_default();
            let mut slots_changed = 0;
            for (slot, &id) in new_ring.iter().enumerate() {
                if written.ring.get(slot) != Some(&id) {
                    let index = written.id * self.ring_size + slot as u32;
                    maps.rings
                        .set(index, id, 0)
                        .map_err(|source| SyncError::Write {
                            what: "ring slot",
                            source,
                        })?;
                    slots_changed += 1;
                }
            }

            // 3. The VIP entry (ring_size 0 = no ring: packets are dropped as no_backend).
            let meta = VipMeta {
                service_id: written.id,
                ring_size: if new_ring.is_empty() {
                    0
                } else {
                    self.ring_size
                },
                flags: if svc.l7 { VIP_F_L7 } else { 0 }
                    | if svc.source_hash {
                        VIP_F_SOURCE_HASH
                    } else {
                        0
                    },
                _pad: 0,
            };
            let key_changed = written.key != key;
            if key_changed || written.meta != meta {
                maps.vips
                    .insert(key, meta, 0)
                    .map_err(|source| SyncError::Write {
                        what: "VIP",
                        source,
                    })?;
            }
            if key_changed {
                remove_vip(maps, &written.key)?;
                written.key = key;
            }
            written.meta = meta;

            let mut shares: BTreeMap<u32, u32> = BTreeMap::new();
            for &id in &new_ring {
                *shares.entry(id).or_default() += 1;
            }
            written.ring = new_ring;
            written.backends = ids;
            still_used.extend(written.backends.values().copied());
            applied.push(AppliedService {
                name: svc.name.clone(),
                service_id: written.id,
                backends: written
                    .backends
                    .iter()
                    .map(|(&(a, p), &id)| (a, p, id, shares.get(&id).copied().unwrap_or(0)))
                    .collect(),
                slots_changed,
            });
        }

        // Services no longer desired: remove the VIP first, then their backends.
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|name| !desired.services.iter().any(|s| &s.name == *name))
            .cloned()
            .collect();
        for name in gone {
            if let Some(w) = self.services.remove(&name) {
                remove_vip(maps, &w.key)?;
                for &id in w.backends.values() {
                    deactivate.extend(inactive(&self.backend_entries, id));
                }
                self.service_ids.release(w.id);
            }
        }

        // 4. Now nothing new points at them: mark inactive, free removed ids.
        for (id, entry) in deactivate {
            write_backend(maps, &mut self.backend_entries, id, entry)?;
            if !still_used.contains(&id) {
                self.backend_entries.remove(&id);
                self.backend_ids.release(id);
            }
        }
        Ok(applied)
    }
}

/// The address of a backend entry (inverse of [`addr_words`]).
fn entry_address(e: &Backend) -> IpAddr {
    if e.family == FAMILY_V6 {
        let mut o = [0u8; 16];
        for (i, w) in e.addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    } else {
        IpAddr::from(e.addr[0].to_ne_bytes())
    }
}

/// The host-order port of a VIP key.
fn key_port(key: &VipKey) -> u16 {
    u16::from_be(key.port)
}

/// The written entry of `id` with its active bit cleared.
fn inactive(written: &BTreeMap<u32, Backend>, id: u32) -> Option<(u32, Backend)> {
    written.get(&id).map(|&e| (id, Backend { flags: 0, ..e }))
}

fn write_backend(
    maps: &mut Maps,
    written: &mut BTreeMap<u32, Backend>,
    id: u32,
    entry: Backend,
) -> Result<(), SyncError> {
    if written.get(&id) != Some(&entry) {
        maps.backends
            .set(id, entry, 0)
            .map_err(|source| SyncError::Write {
                what: "backend",
                source,
            })?;
        written.insert(id, entry);
    }
    Ok(())
}

fn remove_vip(maps: &mut Maps, key: &VipKey) -> Result<(), SyncError> {
    match maps.vips.remove(key) {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(SyncError::Write {
            what: "VIP removal",
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_network_order_words() {
        let (w, f) = addr_words("198.18.1.11".parse().unwrap());
        assert_eq!(f, FAMILY_V4);
        assert_eq!(w[0].to_ne_bytes(), [198, 18, 1, 11]);
        assert_eq!(&w[1..], &[0, 0, 0]);
        let (w, f) = addr_words("fd00:18::1".parse().unwrap());
        assert_eq!(f, FAMILY_V6);
        assert_eq!(w[0].to_ne_bytes(), [0xfd, 0, 0, 0x18]);
        assert_eq!(w[3].to_ne_bytes(), [0, 0, 0, 1]);
        let k = vip_key("198.18.100.1:80".parse().unwrap(), Protocol::Tcp);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.proto, PROTO_TCP);
    }

    #[test]
    fn id_pool_reuses_lowest_free() {
        let mut p = IdPool::new(3);
        assert_eq!(
            (p.alloc(), p.alloc(), p.alloc(), p.alloc()),
            (Some(0), Some(1), Some(2), None)
        );
        p.release(1);
        p.release(0);
        assert_eq!(p.alloc(), Some(0));
        assert_eq!(p.alloc(), Some(1));
    }
}
