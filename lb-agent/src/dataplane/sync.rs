//! Desired state -> BPF maps. The one place that converts addresses and ports to the
//! network-order layouts of `lb_common::types`, and the one writer of the balancer's
//! maps. The desired state itself is defined in [`super::desired`].
//!
//! [`Reconciler::apply`] diffs the desired state against what it wrote last and writes
//! only the differences, in an order that never exposes a ring slot pointing to
//! nothing:
//! 1. new `[security]` filter entries and flood limit (`super::filters`), the global
//!    config (with the filter bits), then the filter entries no longer desired are
//!    removed;
//! 2. per service (`WrittenService`): backend entries (marked active), the ring slots
//!    that change (each an in-place write of a valid backend id), the service's new
//!    filter entries and flood limit, then the VIP entry (with the bits that enable
//!    them) and, when it changed, the copy of it in the service's backend entries
//!    (`Backend::service_v4`, what established IPv4 flows read), then its filter
//!    entries no longer desired;
//! 3. services no longer desired: their backend entries' copies are zeroed, their VIP
//!    entries removed, then their filters;
//! 4. only at the end, the entries of backends that left a ring are marked inactive,
//!    which sends their pinned flows back through the ring, and removed backends'
//!    ids are freed, their traffic added to their service's carry
//!    (`stats::retire_backend`);
//! 5. the VIP addresses (`VIP_ADDRS`, for ICMP to them): new and changed entries, then
//!    the addresses no service has any more;
//! 6. the QUIC server ids of `quic` services (`super::quic_ids`): new and changed
//!    entries (their backends were written in step 2), then those no longer desired;
//! 7. after everything else, when the pass changed the source filters (a trie entry,
//!    the global filter flags, a VIP's list flags), the filter generation
//!    (`FILTER_GEN`), so that established flows look their source up again.
//!
//! An apply that fails part-way (a map write refused) leaves the reconciler's record
//! consistent with what is in the maps, so the caller can apply again (the same or a
//! newer desired state) and the maps converge: ids given to new backends are kept at
//! once, a record (ring, VIP entry) is updated only after its write succeeded, and
//! backends to retire stay queued until their entries are written.

use std::{
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    net::{IpAddr, SocketAddr},
};

use aya::maps::MapError;
use lb_common::{
    maps as names,
    types::{
        BACKEND_F_ACTIVE, Backend, FAMILY_V4, FAMILY_V6, GlobalConfig, PROTO_TCP, PROTO_UDP,
        ServiceV4, ServiceV6, VIP_ADDR_F_L4, VIP_ADDR_F_LOCAL, VIP_F_ALLOW, VIP_F_DENY,
        VIP_F_FLOW_LIMIT, VIP_F_L7, VIP_F_QUIC, VIP_F_SOURCE_HASH, VipAddrKey, VipKey, VipKeyV4,
        VipMeta,
    },
};

use super::{
    batch,
    desired::{DesiredService, DesiredState},
    filters::{FilterTable, Rule, Scope},
    loader::Capacities,
    maps::Maps,
    ring::{self, RingMember},
};
use crate::config::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("no free service slot: all {max} are in use (raise dataplane.max_services)")]
    ServicesFull { max: u32 },
    #[error("no free backend slot: all {max} are in use (raise dataplane.max_backends)")]
    BackendsFull { max: u32 },
    #[error("no free filter rule slot: all {max} are in use (raise dataplane.max_filter_rules)")]
    FiltersFull { max: u32 },
    #[error("counting the possible CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("writing {what}: {source}")]
    Write {
        what: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading map {map} ({key}): {source}")]
    Read {
        map: &'static str,
        key: MapKey,
        #[source]
        source: MapError,
    },
    #[error("writing the ring of service id {service_id}{}: {source}",
        .slot.map_or_else(String::new, |s| format!(" (slot {s})")))]
    RingWrite {
        service_id: u32,
        /// The slot whose write failed, when the kernel could tell.
        slot: Option<u32>,
        #[source]
        source: batch::BatchError,
    },
}

/// Which entry of a map a failed read was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKey {
    /// The entry at this index (arrays).
    Index(u32),
    /// Walking all keys (hash maps).
    All,
}

impl fmt::Display for MapKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapKey::Index(i) => write!(f, "key {i}"),
            MapKey::All => f.write_str("iterating its keys"),
        }
    }
}

/// The error of a failed read of `map` at `key`.
fn read_err(map: &'static str, key: MapKey) -> impl FnOnce(MapError) -> SyncError {
    move |source| SyncError::Read { map, key, source }
}

/// The error of a failed write of `what`.
fn write_err(what: &'static str) -> impl FnOnce(MapError) -> SyncError {
    move |source| SyncError::Write { what, source }
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

/// The backend map as written: the entries, their id allocator, and the ids of
/// removed backends waiting for step 4 to be written inactive and freed.
#[derive(Debug)]
struct BackendTable {
    ids: IdPool,
    written: BTreeMap<u32, Backend>,
    retiring: BTreeSet<u32>,
}

impl BackendTable {
    fn new(max: u32) -> Self {
        BackendTable {
            ids: IdPool::new(max),
            written: BTreeMap::new(),
            retiring: BTreeSet::new(),
        }
    }

    fn alloc(&mut self) -> Result<u32, SyncError> {
        self.ids
            .alloc()
            .ok_or(SyncError::BackendsFull { max: self.ids.max })
    }

    /// Write `entry` at `id` unless it is there already.
    fn write(&mut self, maps: &mut Maps, id: u32, entry: Backend) -> Result<(), SyncError> {
        if self.written.get(&id) != Some(&entry) {
            maps.backends
                .set(id, entry, 0)
                .map_err(write_err("backend"))?;
            self.written.insert(id, entry);
        }
        Ok(())
    }

    /// `id` left its service: write it inactive and free it in step 4.
    fn retire(&mut self, id: u32) {
        self.retiring.insert(id);
    }

    /// Step 4 for removed backends: entries written inactive, their traffic moved into
    /// their service's carry (`stats::retire_backend`), ids freed.
    fn retire_queued(&mut self, maps: &mut Maps) -> Result<(), SyncError> {
        while let Some(&id) = self.retiring.first() {
            if let Some(&entry) = self.written.get(&id) {
                self.write(maps, id, Backend { flags: 0, ..entry })?;
                super::stats::retire_backend(maps, id, entry.service_id)
                    .map_err(write_err("retired backend's traffic"))?;
                self.written.remove(&id);
            }
            self.retiring.remove(&id);
            self.ids.release(id);
        }
        Ok(())
    }
}

/// What the reconciler last wrote for a service.
#[derive(Debug)]
struct WrittenService {
    id: u32,
    key: VipKey,
    /// The VIP entry as written under `key` (None: not written yet).
    meta: Option<VipMeta>,
    /// The ring as written (empty = none).
    ring: Vec<u32>,
    backends: BTreeMap<BackendKey, u32>,
    /// [`ring_digest`] of `ring` and the backend ids it was taken with (recomputed when
    /// either changes).
    digest: Option<(BTreeMap<BackendKey, u32>, String)>,
}

/// The digest of a ring as written, comparable between LB nodes: SHA-256 (hex) over
/// each slot's backend as `address:port\n` (IPv6 in brackets), in slot order. Backend
/// ids are each node's own, so the slots are named by backend, not by id. None for an
/// empty ring (the service has no ring in the fast path).
fn ring_digest(ring: &[u32], backends: &BTreeMap<BackendKey, u32>) -> Option<String> {
    use sha2::{Digest as _, Sha256};
    if ring.is_empty() {
        return None;
    }
    let names: BTreeMap<u32, String> = backends
        .iter()
        .map(|(&(address, port), &id)| (id, format!("{}\n", SocketAddr::new(address, port))))
        .collect();
    let mut h = Sha256::new();
    for id in ring {
        // A slot whose id is no backend of the service (never written so) shows as `?`.
        h.update(names.get(id).map_or("?\n", String::as_str).as_bytes());
    }
    Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A backend that takes new flows: (ring key "address:port", backend id, weight).
type Member = (String, u32, u32);

impl WrittenService {
    fn new(id: u32, key: VipKey) -> Self {
        WrittenService {
            id,
            key,
            meta: None,
            ring: Vec::new(),
            backends: BTreeMap::new(),
            digest: None,
        }
    }

    /// Take the ring's digest again when the ring or the backend ids changed.
    fn refresh_digest(&mut self, ring_changed: bool) {
        let stale = ring_changed
            || self
                .digest
                .as_ref()
                .is_none_or(|(ids, _)| *ids != self.backends);
        if stale {
            let digest = ring_digest(&self.ring, &self.backends).unwrap_or_default();
            self.digest = Some((self.backends.clone(), digest));
        }
    }

    /// Step 2, first half: backend entries. New backends get ids (recorded at once, so
    /// an apply retried after a failure reuses them) and active entries are written
    /// now. Entries of backends that are no longer active are queued in `deactivate`,
    /// and removed backends are retired: both are written in step 4, once no ring
    /// points at them. Returns the ring's members.
    fn write_backends(
        &mut self,
        maps: &mut Maps,
        table: &mut BackendTable,
        svc: &DesiredService,
        deactivate: &mut Vec<(u32, Backend)>,
    ) -> Result<Vec<Member>, SyncError> {
        let mut members = Vec::new();
        for b in &svc.backends {
            let bkey = (b.address, b.port);
            let id = match self.backends.get(&bkey) {
                Some(&id) => id,
                None => {
                    let id = table.alloc()?;
                    self.backends.insert(bkey, id);
                    id
                }
            };
            let (addr, family) = addr_words(b.address);
            let entry = Backend {
                addr,
                family,
                flags: if b.active { BACKEND_F_ACTIVE } else { 0 },
                _pad: [0; 2],
                service_id: self.id,
                // The service's VIP as written so far; `write_vip` moves every entry
                // of the service on when it writes another.
                service_v4: self.service_copy(),
            };
            if b.active {
                table.write(maps, id, entry)?;
            } else {
                deactivate.push((id, entry));
            }
            if b.active && b.weight > 0 {
                members.push((format!("{}:{}", b.address, b.port), id, b.weight));
            }
        }
        self.backends.retain(|&(address, port), &mut id| {
            let desired = svc
                .backends
                .iter()
                .any(|b| b.address == address && b.port == port);
            if !desired {
                table.retire(id);
            }
            desired
        });
        Ok(members)
    }

    /// Step 2, second half: the ring, as in-place writes of the slots that change.
    /// Returns how many slots were written.
    fn write_ring(
        &mut self,
        maps: &mut Maps,
        ring_size: u32,
        members: &[Member],
    ) -> Result<u32, SyncError> {
        let members: Vec<RingMember<'_>> = members
            .iter()
            .map(|(key, id, weight)| RingMember {
                id: *id,
                key,
                weight: *weight,
            })
            .collect();
        let new_ring = ring::build(&members, ring_size).unwrap_or_default();
        // Only the slots that change, written in place: one `bpf()` call per batch.
        let (indexes, ids): (Vec<u32>, Vec<u32>) = (0u32..)
            .zip(&new_ring)
            .filter(|&(slot, &id)| self.ring.get(slot as usize) != Some(&id))
            .map(|(slot, &id)| (self.id * ring_size + slot, id))
            .unzip();
        batch::update_array(&mut maps.rings, &indexes, &ids).map_err(|e| SyncError::RingWrite {
            service_id: self.id,
            slot: e.index.map(|i| i - self.id * ring_size),
            source: e,
        })?;
        self.ring = new_ring;
        Ok(indexes.len() as u32)
    }

    /// Step 2, last: the VIP entry (ring_size 0 = no ring: packets are dropped as
    /// no_backend), moved to `key` when the service's VIP changed.
    fn write_vip(
        &mut self,
        maps: &mut Maps,
        table: &mut BackendTable,
        key: VipKey,
        svc: &DesiredService,
        ring_size: u32,
    ) -> Result<(), SyncError> {
        let meta = VipMeta {
            service_id: self.id,
            ring_size: if self.ring.is_empty() { 0 } else { ring_size },
            flags: if svc.l7 { VIP_F_L7 } else { 0 }
                | if svc.source_hash {
                    VIP_F_SOURCE_HASH
                } else {
                    0
                }
                | if svc.filters.deny.is_empty() {
                    0
                } else {
                    VIP_F_DENY
                }
                | if svc.filters.allow.is_empty() {
                    0
                } else {
                    VIP_F_ALLOW
                }
                | if svc.filters.new_flows.is_some() {
                    VIP_F_FLOW_LIMIT
                } else {
                    0
                }
                | if svc.quic { VIP_F_QUIC } else { 0 },
            _pad: 0,
        };
        let key_changed = self.key != key;
        if key_changed || self.meta != Some(meta) {
            maps.vips.insert(key, meta, 0).map_err(write_err("VIP"))?;
            // The IPv4 path's copy, after the record (see `remove_vip` for the order).
            if let Some(short) = VipKeyV4::of(&key) {
                maps.vips_v4
                    .insert(short, meta, 0)
                    .map_err(write_err("VIP"))?;
            }
            // The service's entry for established IPv6 flows (zero for an IPv4 VIP),
            // and the copy in each of its backend entries for established IPv4 flows
            // (`Backend::service_v4`, zero for an IPv6 VIP), before the old VIP goes.
            maps.services_v6
                .set(self.id, service_v6(&key, meta), 0)
                .map_err(write_err("service entry"))?;
            let copy = service_v4(&key, meta);
            for &id in self.backends.values() {
                if let Some(&entry) = table.written.get(&id) {
                    table.write(
                        maps,
                        id,
                        Backend {
                            service_v4: copy,
                            ..entry
                        },
                    )?;
                }
            }
        }
        if key_changed {
            remove_vip(maps, &self.key)?;
            self.key = key;
        }
        self.meta = Some(meta);
        Ok(())
    }

    /// The service's VIP and meta as its backend entries carry them
    /// (`Backend::service_v4`): as last written, zero before that or for an IPv6 VIP.
    fn service_copy(&self) -> ServiceV4 {
        self.meta
            .map_or(ServiceV4::default(), |meta| service_v4(&self.key, meta))
    }

    fn applied(&self, name: &str, slots_changed: u32) -> AppliedService {
        let mut shares: BTreeMap<u32, u32> = BTreeMap::new();
        for &id in &self.ring {
            *shares.entry(id).or_default() += 1;
        }
        AppliedService {
            name: name.to_owned(),
            service_id: self.id,
            backends: self
                .backends
                .iter()
                .map(|(&(a, p), &id)| (a, p, id, shares.get(&id).copied().unwrap_or(0)))
                .collect(),
            slots_changed,
        }
    }
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
    service_ids: IdPool,
    backends: BackendTable,
    filters: FilterTable,
    /// `VIP_ADDRS` as written.
    vip_addrs: BTreeMap<VipAddrKey, u32>,
    /// `QUIC_IDS` as written.
    quic_ids: super::quic_ids::QuicIds,
    /// `SERVICES_V6` slots of ids no service holds that an adopted fast path left
    /// written: cleared by the next apply.
    services_v6_stale: Vec<u32>,
    /// A change of the source filters (a trie entry, the flags that enable a list) was
    /// written, or may have been (an adopted fast path), and the filter generation has
    /// not been bumped since: [`Reconciler::apply`] bumps it at its end.
    filter_gen_pending: bool,
}

impl Reconciler {
    /// A reconciler for empty maps of these capacities (`flow_table_size` is not its
    /// concern).
    pub fn new(caps: &Capacities) -> Self {
        Reconciler {
            ring_size: caps.ring_size,
            config: None,
            services: BTreeMap::new(),
            service_ids: IdPool::new(caps.max_services),
            backends: BackendTable::new(caps.max_backends),
            filters: FilterTable::new(caps),
            vip_addrs: BTreeMap::new(),
            quic_ids: super::quic_ids::QuicIds::default(),
            services_v6_stale: Vec::new(),
            filter_gen_pending: false,
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
        caps: &Capacities,
        desired: &DesiredState,
    ) -> Result<Self, SyncError> {
        let mut r = Reconciler::new(caps);
        r.config = Some(
            maps.config
                .get(&0, 0)
                .map_err(read_err(names::CONFIG, MapKey::Index(0)))?,
        );
        r.filters = FilterTable::adopt(maps, caps)?;
        r.vip_addrs = maps
            .vip_addrs
            .iter()
            .collect::<Result<_, _>>()
            .map_err(read_err(names::VIP_ADDRS, MapKey::All))?;
        r.quic_ids = super::quic_ids::QuicIds::adopt(maps)?;
        let entries = read_backend_entries(maps, caps.max_backends)?;
        let vips: Vec<(VipKey, VipMeta)> = maps
            .vips
            .iter()
            .collect::<Result<_, _>>()
            .map_err(read_err(names::VIPS, MapKey::All))?;
        for (key, meta) in vips {
            r.adopt_service(maps, key, meta, &entries, desired)?;
        }
        // An IPv4 VIP whose copy in VIPS_V4 is missing or differs (an agent stopped
        // between the two writes) is written again by the next apply.
        let short: BTreeMap<VipKeyV4, VipMeta> = maps
            .vips_v4
            .iter()
            .collect::<Result<_, _>>()
            .map_err(read_err(names::VIPS_V4, MapKey::All))?;
        for written in r.services.values_mut() {
            if let Some(k) = VipKeyV4::of(&written.key) {
                if short.get(&k) != written.meta.as_ref() {
                    written.meta = None;
                }
            }
        }
        // So does a service whose SERVICES_V6 entry is not what its VIP says; entries
        // of ids no service holds are cleared by the next apply. (A backend entry whose
        // copy of its service's IPv4 VIP differs is rewritten by the next apply as any
        // backend entry that differs from what it would write.)
        let mut in_use: BTreeMap<u32, &mut WrittenService> =
            r.services.values_mut().map(|w| (w.id, w)).collect();
        let mut stale_v6 = Vec::new();
        for id in 0..caps.max_services {
            let entry_v6 = maps
                .services_v6
                .get(&id, 0)
                .map_err(read_err(names::SERVICES_V6, MapKey::Index(id)))?;
            match in_use.get_mut(&id) {
                Some(w) => {
                    if let Some(meta) = w.meta {
                        if entry_v6 != service_v6(&w.key, meta) {
                            w.meta = None;
                        }
                    }
                }
                None => {
                    if entry_v6 != ServiceV6::default() {
                        stale_v6.push(id);
                    }
                }
            }
        }
        r.services_v6_stale = stale_v6;
        // The previous agent may have stopped between a filter write and its bump of
        // the filter generation: bump it once more (each established flow then looks
        // its source up once).
        r.filter_gen_pending = true;
        Ok(r)
    }

    /// Record the service of the VIP entry `key -> meta` with its ring and backends.
    fn adopt_service(
        &mut self,
        maps: &Maps,
        key: VipKey,
        meta: VipMeta,
        entries: &BTreeMap<u32, Backend>,
        desired: &DesiredState,
    ) -> Result<(), SyncError> {
        let svc = desired
            .services
            .iter()
            .find(|s| vip_key(s.vip, s.protocol) == key);
        let name = svc.map_or_else(
            || format!("\0adopted service {}", meta.service_id),
            |s| s.name.clone(),
        );
        // The ring in BPF_MAP_LOOKUP_BATCH calls of 32768 slots (batch.rs), not one
        // call per slot.
        let ring = if meta.ring_size == self.ring_size && self.ring_size > 0 {
            let base = meta.service_id * self.ring_size;
            super::batch::lookup_array(&maps.rings, base, self.ring_size).map_err(|e| {
                SyncError::Read {
                    map: names::RINGS,
                    key: MapKey::Index(e.index),
                    source: e.into_map_error(),
                }
            })?
        } else {
            Vec::new()
        };
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
                    e.flags & BACKEND_F_ACTIVE != 0 && entries[&other].flags & BACKEND_F_ACTIVE == 0
                }
                None => true,
            };
            if keep {
                backends.insert((address, port), id);
            }
        }
        self.service_ids.reserve(meta.service_id);
        for &id in backends.values() {
            self.backends.ids.reserve(id);
            self.backends.written.insert(id, entries[&id]);
        }
        self.services.insert(
            name,
            WrittenService {
                id: meta.service_id,
                key,
                meta: Some(meta),
                ring,
                backends,
                digest: None,
            },
        );
        Ok(())
    }

    /// The digest of `service`'s ring as last written ([`ring_digest`]); None without a
    /// ring.
    pub fn ring_digest(&self, service: &str) -> Option<String> {
        let written = self.services.get(service)?;
        match &written.digest {
            Some((ids, digest)) if *ids == written.backends => {
                Some(digest.clone()).filter(|d| !d.is_empty())
            }
            // Adopted and not applied yet.
            _ => ring_digest(&written.ring, &written.backends),
        }
    }

    /// `service`'s ring read back from `maps` (not from this record), each slot named
    /// by its backend as in [`ring_digest`]; None without a ring.
    pub fn ring_slots(&self, maps: &Maps, service: &str) -> Option<anyhow::Result<Vec<String>>> {
        let written = self.services.get(service)?;
        if written.ring.is_empty() {
            return None;
        }
        let names: BTreeMap<u32, String> = written
            .backends
            .iter()
            .map(|(&(address, port), &id)| (id, SocketAddr::new(address, port).to_string()))
            .collect();
        let base = written.id * self.ring_size;
        // In BPF_MAP_LOOKUP_BATCH calls (batch.rs), not one call per slot.
        let ids = match super::batch::lookup_array(&maps.rings, base, self.ring_size) {
            Ok(ids) => ids,
            Err(e) => {
                let slot = e.index - base;
                return Some(Err(anyhow::anyhow!(
                    "reading ring slot {slot} of service {service}: {e}"
                )));
            }
        };
        Some(Ok(ids
            .iter()
            .map(|id| names.get(id).cloned().unwrap_or_else(|| "?".to_owned()))
            .collect()))
    }

    /// Backend id of `(service, address, port)` as last written.
    pub fn backend_id(&self, service: &str, address: IpAddr, port: u16) -> Option<u32> {
        self.services
            .get(service)?
            .backends
            .get(&(address, port))
            .copied()
    }

    /// The backend ids whose traffic counts for `service` (`stats::service_traffic`):
    /// its backends' as written, and those removed from it whose id is not freed yet
    /// (an apply that failed before step 4), so its totals never go down.
    pub fn service_backend_ids(&self, service: &str) -> Vec<u32> {
        let Some(w) = self.services.get(service) else {
            return Vec::new();
        };
        let retiring = self.backends.retiring.iter().copied().filter(|id| {
            self.backends
                .written
                .get(id)
                .is_some_and(|e| e.service_id == w.id)
        });
        w.backends.values().copied().chain(retiring).collect()
    }

    /// The global deny rules as written and their counter slots.
    pub fn deny_rules(&self) -> impl Iterator<Item = (ipnet::IpNet, u32)> + '_ {
        self.filters.deny_rules()
    }

    /// Every counted rule of the services' own lists, labelled as in
    /// `xdplb_filter_drops_total{rule}`: `SERVICE:PREFIX` for a deny prefix,
    /// `SERVICE:not_allowed` for what its allow list refuses (service names hold no
    /// `:`); with its counter slot.
    pub fn service_filter_rules(&self) -> Vec<(String, u32)> {
        let names: BTreeMap<u32, &str> = self
            .services
            .iter()
            .map(|(name, w)| (w.id, name.as_str()))
            .collect();
        self.filters
            .service_rules()
            .filter_map(|(sid, rule, slot)| {
                let name = names.get(&sid)?;
                Some(match rule {
                    Rule::Deny(net) => (format!("{name}:{net}"), slot),
                    Rule::NotAllowed => {
                        (format!("{name}:{}", super::stats::NOT_ALLOWED_RULE), slot)
                    }
                })
            })
            .collect()
    }

    /// Every backend entry as last written: backend id -> address (the backends whose
    /// next hops the fast path needs, `super::nexthop`).
    pub fn backend_addresses(&self) -> BTreeMap<u32, IpAddr> {
        self.backends
            .written
            .iter()
            .map(|(id, e)| (*id, entry_address(e)))
            .collect()
    }

    /// Service id of `service` as last written.
    pub fn service_id(&self, service: &str) -> Option<u32> {
        self.services.get(service).map(|s| s.id)
    }

    /// Write the differences between `desired` and the maps, in the order of the
    /// [module docs](self).
    ///
    /// Last, after every write of the pass (also of one that failed part-way), the
    /// filter generation is bumped if the source filters changed: established flows
    /// skip the filter lookups only while their entry carries the current generation
    /// (README, "Filter verdicts of established flows").
    pub fn apply(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredState,
    ) -> Result<Vec<AppliedService>, SyncError> {
        let trie_writes = self.filters.trie_writes();
        let applied = self.apply_steps(maps, desired);
        if self.filters.trie_writes() != trie_writes {
            self.filter_gen_pending = true;
        }
        if self.filter_gen_pending {
            let bumped = self.bump_filter_gen(maps);
            // The pass's own error first: it says what was not written.
            let applied = applied?;
            bumped?;
            return Ok(applied);
        }
        applied
    }

    /// Move the filter generation on (`FILTER_GEN[0]` + 1, read back first: it
    /// survives agent restarts with the pinned maps).
    fn bump_filter_gen(&mut self, maps: &mut Maps) -> Result<(), SyncError> {
        let current = maps
            .filter_gen
            .get(&0, 0)
            .map_err(read_err(names::FILTER_GEN, MapKey::Index(0)))?;
        maps.filter_gen
            .set(0, current.wrapping_add(1), 0)
            .map_err(write_err("filter generation"))?;
        self.filter_gen_pending = false;
        Ok(())
    }

    /// The steps of [`Reconciler::apply`].
    fn apply_steps(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredState,
    ) -> Result<Vec<AppliedService>, SyncError> {
        while let Some(&id) = self.services_v6_stale.last() {
            maps.services_v6
                .set(id, ServiceV6::default(), 0)
                .map_err(write_err("service entry"))?;
            self.services_v6_stale.pop();
        }
        self.filters
            .insert_new(maps, Scope::Global, &desired.filters)?;
        self.write_global_config(maps, desired)?;
        self.filters
            .remove_stale(maps, Scope::Global, Some(&desired.filters))?;
        // Entries of backends that stay but are no longer active, written in step 4.
        let mut deactivate = Vec::new();
        let mut applied = Vec::with_capacity(desired.services.len());
        for svc in &desired.services {
            applied.push(self.apply_service(maps, svc, &mut deactivate)?);
        }
        self.remove_services(maps, desired)?;
        self.deactivate_backends(maps, deactivate)?;
        self.write_vip_addrs(maps, desired)?;
        // Step 6: QUIC server ids -> backend ids (quic_ids.rs).
        let quic = super::quic_ids::wanted(
            desired,
            |s| self.service_id(s),
            |s, a, p| self.backend_id(s, a, p),
        );
        self.quic_ids.write(maps, &quic)?;
        Ok(applied)
    }

    /// Step 1: the global config.
    fn write_global_config(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredState,
    ) -> Result<(), SyncError> {
        let config = GlobalConfig {
            // A source prefix's address is the base of every flow's outer source.
            source_v4: desired
                .source_v4_prefix
                .map(|p| p.network())
                .or(desired.source_v4)
                .map_or(0, |a| u32::from_ne_bytes(a.octets())),
            source_v6: desired
                .source_v6_prefix
                .map(|p| p.network())
                .or(desired.source_v6)
                .map_or([0; 4], |a| addr_words(a.into()).0),
            encap: desired.encap,
            filter_flags: FilterTable::flags(&desired.filters),
            mtu: desired.mtu,
            gue_port: desired.gue_port.to_be(),
            icmp_errors_per_cpu: desired.icmp_errors_per_cpu,
            source_v4_host_mask: desired
                .source_v4_prefix
                .map_or(0, |p| u32::from(p.hostmask())),
            // The last word's host bits (the tunnel varies the last 32 bits at most).
            source_v6_host_mask: desired
                .source_v6_prefix
                .map_or(0, |p| u128::from(p.hostmask()) as u32),
            max_new_flows_per_cpu: desired.max_new_flows_per_cpu,
        };
        if self.config != Some(config) {
            if self.config.map(|c| c.filter_flags) != Some(config.filter_flags) {
                self.filter_gen_pending = true;
            }
            maps.config
                .set(0, config, 0)
                .map_err(write_err("global config"))?;
            self.config = Some(config);
        }
        Ok(())
    }

    /// Step 5: the VIP addresses and what lives on them (for ICMP to them): changed
    /// and new entries, then those no service has any more.
    fn write_vip_addrs(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredState,
    ) -> Result<(), SyncError> {
        let want = vip_addrs(desired);
        for (key, &flags) in &want {
            if self.vip_addrs.get(key) != Some(&flags) {
                maps.vip_addrs
                    .insert(key, flags, 0)
                    .map_err(write_err("VIP address"))?;
                self.vip_addrs.insert(*key, flags);
            }
        }
        let gone: Vec<VipAddrKey> = self
            .vip_addrs
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for key in gone {
            match maps.vip_addrs.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(SyncError::Write {
                        what: "VIP address removal",
                        source,
                    });
                }
            }
            self.vip_addrs.remove(&key);
        }
        Ok(())
    }

    /// Step 2: one service's backends, ring and VIP entry.
    fn apply_service(
        &mut self,
        maps: &mut Maps,
        svc: &DesiredService,
        deactivate: &mut Vec<(u32, Backend)>,
    ) -> Result<AppliedService, SyncError> {
        let key = vip_key(svc.vip, svc.protocol);
        let written = match self.services.entry(svc.name.clone()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let id = self.service_ids.alloc().ok_or(SyncError::ServicesFull {
                    max: self.service_ids.max,
                })?;
                // A service that held the id before left its carry there.
                super::stats::clear_service(maps, id)
                    .map_err(write_err("new service's traffic"))?;
                e.insert(WrittenService::new(id, key))
            }
        };
        let queued = deactivate.len();
        let members = written.write_backends(maps, &mut self.backends, svc, deactivate)?;
        let slots_changed = written.write_ring(maps, self.ring_size, &members)?;
        written.refresh_digest(slots_changed > 0);
        let scope = Scope::Service(written.id);
        self.filters.insert_new(maps, scope, &svc.filters)?;
        let lists = |meta: Option<VipMeta>| meta.map(|m| m.flags & (VIP_F_DENY | VIP_F_ALLOW));
        let lists_before = lists(written.meta);
        if lists_before.is_none() {
            // A new or repaired entry: its flags may enable lists.
            self.filter_gen_pending = true;
        }
        written.write_vip(maps, &mut self.backends, key, svc, self.ring_size)?;
        // Entries written inactive in step 4 carry the VIP as written now, too.
        for (_, entry) in &mut deactivate[queued..] {
            entry.service_v4 = written.service_copy();
        }
        if lists(written.meta) != lists_before {
            self.filter_gen_pending = true;
        }
        self.filters.remove_stale(maps, scope, Some(&svc.filters))?;
        Ok(written.applied(&svc.name, slots_changed))
    }

    /// Step 3: services no longer desired. The VIP entry goes first (nothing reaches
    /// the ring any more), then the backends are retired and the service id freed.
    fn remove_services(
        &mut self,
        maps: &mut Maps,
        desired: &DesiredState,
    ) -> Result<(), SyncError> {
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|name| !desired.services.iter().any(|s| &s.name == *name))
            .cloned()
            .collect();
        for name in gone {
            let key = self.services[&name].key;
            let id = self.services[&name].id;
            // Established flows stop finding the service first (its copy in its
            // backends' entries, its SERVICES_V6 entry), then the VIP goes.
            for bid in self.services[&name].backends.values() {
                if let Some(&entry) = self.backends.written.get(bid) {
                    self.backends.write(
                        maps,
                        *bid,
                        Backend {
                            service_v4: ServiceV4::default(),
                            ..entry
                        },
                    )?;
                }
            }
            maps.services_v6
                .set(id, ServiceV6::default(), 0)
                .map_err(write_err("service entry"))?;
            remove_vip(maps, &key)?;
            self.filters.remove_stale(maps, Scope::Service(id), None)?;
            if let Some(w) = self.services.remove(&name) {
                for &id in w.backends.values() {
                    self.backends.retire(id);
                }
                self.service_ids.release(w.id);
            }
        }
        Ok(())
    }

    /// Step 4: now that no ring points at them, mark entries inactive (their pinned
    /// flows go back through the ring) and free the ids of removed backends.
    fn deactivate_backends(
        &mut self,
        maps: &mut Maps,
        deactivate: Vec<(u32, Backend)>,
    ) -> Result<(), SyncError> {
        for (id, entry) in deactivate {
            self.backends.write(maps, id, entry)?;
        }
        self.backends.retire_queued(maps)
    }
}

/// Every backend entry ever written (family 0 = never used), by id.
fn read_backend_entries(
    maps: &Maps,
    max_backends: u32,
) -> Result<BTreeMap<u32, Backend>, SyncError> {
    let mut entries = BTreeMap::new();
    for id in 0..max_backends {
        let e = maps
            .backends
            .get(&id, 0)
            .map_err(read_err(names::BACKENDS, MapKey::Index(id)))?;
        if e.family != 0 {
            entries.insert(id, e);
        }
    }
    Ok(entries)
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

/// The `VIP_ADDRS` entries of `desired`: every VIP address, flagged `VIP_ADDR_F_L4`
/// when an L4 service lives there and `VIP_ADDR_F_LOCAL` when an L7 one does.
pub fn vip_addrs(desired: &DesiredState) -> BTreeMap<VipAddrKey, u32> {
    let mut out = BTreeMap::new();
    for svc in &desired.services {
        let (addr, family) = addr_words(svc.vip.ip());
        let key = VipAddrKey {
            addr,
            family,
            _pad: [0; 3],
        };
        *out.entry(key).or_insert(0) |= if svc.l7 {
            VIP_ADDR_F_LOCAL
        } else {
            VIP_ADDR_F_L4
        };
    }
    out
}

/// The copy of a service with VIP `key` and `meta` in its backend entries
/// (`Backend::service_v4`): all zero for an IPv6 VIP (its entry is in `SERVICES_V6`).
fn service_v4(key: &VipKey, meta: VipMeta) -> ServiceV4 {
    VipKeyV4::of(key).map_or(ServiceV4::default(), |key| ServiceV4 { key, meta })
}

/// The `SERVICES_V6` entry of a service with VIP `key` and `meta`: all zero for an
/// IPv4 VIP (its copy is in its backend entries, `Backend::service_v4`).
fn service_v6(key: &VipKey, meta: VipMeta) -> ServiceV6 {
    if key.family == FAMILY_V6 {
        ServiceV6 { key: *key, meta }
    } else {
        ServiceV6::default()
    }
}

/// Removes `key` from `VIPS_V4` (IPv4) and then from `VIPS`; `write_vip` writes them
/// the other way round, so every key of `VIPS_V4` is always in `VIPS` (the record read
/// back on adoption), whatever write an agent dies before.
fn remove_vip(maps: &mut Maps, key: &VipKey) -> Result<(), SyncError> {
    if let Some(short) = VipKeyV4::of(key) {
        match maps.vips_v4.remove(&short) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(SyncError::Write {
                    what: "VIP removal",
                    source,
                });
            }
        }
    }
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
    fn ring_digests_name_slots_by_backend_not_by_id() {
        let a: IpAddr = "198.18.2.11".parse().unwrap();
        let b: IpAddr = "fd00:18::2:12".parse().unwrap();
        let node1 = BTreeMap::from([((a, 80), 0), ((b, 80), 1)]);
        let node2 = BTreeMap::from([((a, 80), 7), ((b, 80), 3)]);
        let d1 = ring_digest(&[0, 1, 1, 0, 1], &node1).unwrap();
        // The same ring with other ids: the same digest.
        assert_eq!(ring_digest(&[7, 3, 3, 7, 3], &node2).unwrap(), d1);
        // SHA-256 of "198.18.2.11:80\n[fd00:18::2:12]:80\n..." (sha256sum).
        assert_eq!(
            d1,
            "9afc5d0a1c846c64be9906594de6f24562ca69c01b81c52a163d358603e93b38"
        );
        // Another ring: another digest; no ring: none.
        assert_ne!(ring_digest(&[0, 1, 0, 0, 1], &node1).unwrap(), d1);
        assert_eq!(ring_digest(&[], &node1), None);
    }

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
    fn read_errors_name_the_map_and_key() {
        let e = read_err(names::BACKENDS, MapKey::Index(7))(MapError::KeyNotFound);
        assert!(
            matches!(e, SyncError::Read { map, key: MapKey::Index(7), .. } if map == names::BACKENDS)
        );
        let text = e.to_string();
        assert!(text.starts_with("reading map "), "{text}");
        assert!(
            text.contains(names::BACKENDS) && text.contains("key 7"),
            "{text}"
        );
        let text = read_err(names::VIPS, MapKey::All)(MapError::KeyNotFound).to_string();
        assert!(
            text.contains(names::VIPS) && text.contains("iterating its keys"),
            "{text}"
        );
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
