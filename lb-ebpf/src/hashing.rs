//! Backend choice: the flow tables first, so established flows keep their backend
//! when the backend set changes; otherwise the service's Maglev ring.

use aya_ebpf::maps::LruHashMap;
use lb_common::{
    hash::{flow_hash, ring_index, ring_slot, source_hash},
    stats::{Counter, DropReason},
    types::{
        BACKEND_F_ACTIVE, Backend, FlowEntry, FlowKey, FlowKeyV4, VIP_F_SOURCE_HASH, VipKey,
        VipKeyV4, VipMeta,
    },
};

use crate::{
    keys::vip_key_eq,
    limit,
    maps::{
        BACKENDS, FILTER_GEN, FLOWS, FLOWS_NEW, FLOWS_NEW_V4, FLOWS_V4, NEW_FLOW_RATE, RINGS,
        SERVICES_V6, VIPS, VIPS_V4,
    },
    stats::count,
};

/// The maps of one address family: its two flow tables (established, new) and their
/// key type, its VIPs and its services' VIP entries. IPv4 flows live in `FLOWS_V4` /
/// `FLOWS_NEW_V4` under a 16-byte [`FlowKeyV4`], IPv4 VIPs in `VIPS_V4` under an 8-byte
/// [`VipKeyV4`] and in each backend's entry (`Backend::service_v4`); IPv6 flows in `FLOWS` / `FLOWS_NEW` under the 40-byte
/// [`FlowKey`], IPv6 VIPs in `VIPS` under the 20-byte [`VipKey`] and `SERVICES_V6` (the
/// kernel hashes and compares the whole key on every lookup: issue 12, item 2). A type,
/// not a value, so each path's code names its maps directly, and the paths of both
/// families are one code ([`established`], `gate::resolve`).
pub trait FlowTables {
    type Key: 'static;
    /// The family's VIP key.
    type VipKey: 'static + Copy;
    /// Flows that have sent at least two packets.
    fn established() -> &'static LruHashMap<Self::Key, FlowEntry>;
    /// Flows seen once.
    fn new() -> &'static LruHashMap<Self::Key, FlowEntry>;
    /// The VIP `key`'s meta in the family's VIP map (a hash lookup): a pointer to the
    /// map's value, valid for the program's run (the whole path copies it,
    /// `gate::resolve`; the IPv4 short path hands it on, `short::Handoff`). The key is
    /// taken by value, as the map's `get_ptr` takes it: borrowed, the IPv4 short path
    /// stored its key before the flow lookup (17 instructions more per established
    /// packet, `tests/tools/bpf_path_count.py`).
    fn vip(key: Self::VipKey) -> Option<*const VipMeta>;
    /// The meta of `backend`'s service if its VIP is `key`: IPv4 from the backend's
    /// own entry (`Backend::service_v4`, a compare), IPv6 from `SERVICES_V6` (an array
    /// read and a compare).
    fn service_vip(backend: &Backend, key: &Self::VipKey) -> Option<VipMeta>;
}

/// IPv4 flows: key [`crate::keys::flow_key_v4`] of the packet's [`FlowKey`].
pub enum V4 {}

impl FlowTables for V4 {
    type Key = FlowKeyV4;
    type VipKey = VipKeyV4;
    #[inline(always)]
    fn established() -> &'static LruHashMap<FlowKeyV4, FlowEntry> {
        &FLOWS_V4
    }
    #[inline(always)]
    fn new() -> &'static LruHashMap<FlowKeyV4, FlowEntry> {
        &FLOWS_NEW_V4
    }
    #[inline(always)]
    fn vip(key: VipKeyV4) -> Option<*const VipMeta> {
        VIPS_V4.get_ptr(key)
    }
    #[inline(always)]
    fn service_vip(backend: &Backend, key: &VipKeyV4) -> Option<VipMeta> {
        if backend.service_v4.key == *key {
            Some(backend.service_v4.meta)
        } else {
            None
        }
    }
}

/// IPv6 flows: key the packet's [`FlowKey`] itself.
pub enum V6 {}

impl FlowTables for V6 {
    type Key = FlowKey;
    type VipKey = VipKey;
    #[inline(always)]
    fn established() -> &'static LruHashMap<FlowKey, FlowEntry> {
        &FLOWS
    }
    #[inline(always)]
    fn new() -> &'static LruHashMap<FlowKey, FlowEntry> {
        &FLOWS_NEW
    }
    #[inline(always)]
    fn vip(key: VipKey) -> Option<*const VipMeta> {
        VIPS.get_ptr(key)
    }
    /// A 20-byte compare field by field ([`vip_key_eq`]: no `bcmp` call).
    #[inline(always)]
    fn service_vip(backend: &Backend, key: &VipKey) -> Option<VipMeta> {
        let service = SERVICES_V6.get(backend.service_id)?;
        if vip_key_eq(&service.key, key) {
            Some(service.meta)
        } else {
            None
        }
    }
}

/// The backend chosen for a packet.
pub struct Choice {
    pub backend_id: u32,
    pub backend: Backend,
}

#[inline(always)]
fn usable(backend: &Backend, service_id: u32) -> bool {
    backend.flags & BACKEND_F_ACTIVE != 0 && backend.service_id == service_id
}

/// Which `new_flows_per_source` limits apply to a packet: the global one and/or its
/// service's (`FLOW_LIMITS` index `service_id + 1`); and the admission rule's cap
/// (`dataplane.max_new_flows_per_cpu`, 0 = none); and the filter generation the
/// packet's source filters were checked under ([`filter_gen`], read before them),
/// stored in every flow entry the packet writes.
#[derive(Clone, Copy)]
pub struct Limits {
    pub global: bool,
    pub service: bool,
    pub max_new_flows: u32,
    pub filter_gen: u32,
}

/// The current filter generation (`FILTER_GEN[0]`, bumped by the agent after every
/// change of the source filters): a flow entry that carries it was admitted, or last
/// checked, against the lists as they are now.
#[inline(always)]
pub fn filter_gen() -> u32 {
    FILTER_GEN.get(0).map_or(0, |g| *g)
}

/// Katran's admission rule (`is_under_flood` in its balancer): count one new flow on
/// this CPU and say whether this second's count is over `cap` (never with `cap` 0,
/// which costs nothing more than the test).
#[inline(always)]
fn over_new_flow_cap(cap: u32) -> bool {
    limit::over_per_cpu_cap(&NEW_FLOW_RATE, cap)
}

/// Look the flow up; on a miss, or when its backend is no longer active in this
/// service, pick from the ring and record the choice.
///
/// Two tables: `FLOWS` holds flows that have sent at least two packets, `FLOWS_NEW`
/// flows seen once (a SYN, a first datagram). A flow enters `FLOWS_NEW` on its first
/// packet and is promoted on its second, so a flood of one-packet flows (spoofed SYNs
/// from many sources) churns `FLOWS_NEW` and never evicts an established flow. An
/// established packet costs one lookup in `FLOWS`, as before; the promotion costs the
/// second packet of a flow one lookup in each table, an insert and a delete.
///
/// A TCP SYN (without ACK) starts a new connection: it always takes the ring's choice
/// and overwrites any entry, as Katran does (here: it goes to `FLOWS_NEW` and removes
/// a stale entry of the same 5-tuple from `FLOWS`). Otherwise a client reusing a
/// source port would follow the previous connection's entry to a backend that no
/// longer takes new flows (a draining backend, or a tier-1 backend after tier 0 came
/// back); measured in the namespace tests at about 95 connections/s.
///
/// Only a packet that would create a flow (a SYN, or a miss in both tables) is
/// checked against the `new_flows_per_source` limits in `limits`.
///
/// `key` is the flow (hashed onto the ring, limited), `fkey` its key in the family's
/// tables `T`.
#[inline(always)]
pub fn choose_backend<T: FlowTables>(
    key: &FlowKey,
    fkey: &T::Key,
    vip: &VipMeta,
    new_connection: bool,
    limits: Limits,
) -> Result<Choice, DropReason> {
    if !new_connection {
        // SAFETY: the flow tables are preallocated (no BPF_F_NO_PREALLOC), and a racing
        // update can at worst hand us another valid backend id, which is checked below.
        if let Some(entry) = unsafe { T::established().get(fkey) } {
            let backend_id = entry.backend_id;
            if let Some(backend) = active(backend_id, vip.service_id) {
                return Ok(Choice {
                    backend_id,
                    backend,
                });
            }
            count(Counter::FlowRehash);
            return pick_from_ring::<T>(key, fkey, vip, Table::Established, limits.filter_gen);
        }
        // SAFETY: as above.
        if let Some(entry) = unsafe { T::new().get(fkey) } {
            let backend_id = entry.backend_id;
            // This packet passed the filters under `filter_gen`.
            let entry = FlowEntry {
                backend_id,
                filter_gen: limits.filter_gen,
            };
            // A failed delete only leaves the entry to age out of the LRU.
            let _ = T::new().remove(fkey);
            count(Counter::FlowPromoted);
            if let Some(backend) = active(backend_id, vip.service_id) {
                if T::established().insert(fkey, entry, 0).is_err() {
                    count(Counter::FlowInsertFailed);
                }
                return Ok(Choice {
                    backend_id,
                    backend,
                });
            }
            count(Counter::FlowRehash);
            return pick_from_ring::<T>(key, fkey, vip, Table::Established, limits.filter_gen);
        }
    }
    if limits.global || limits.service {
        let service = if limits.service {
            Some(vip.service_id + 1)
        } else {
            None
        };
        limit::admit(limits.global, service, key)?;
    }
    count(Counter::FlowNew);
    if new_connection {
        // A stale entry of a previous connection on this 5-tuple must not catch the
        // next packets. Usually there is none: a lookup (lock-free) finds that out; a
        // delete would take the bucket's lock and save and restore interrupts for
        // nothing on every SYN (issue 12, item 2: the SYN's cost).
        // SAFETY: as above.
        if unsafe { T::established().get(fkey) }.is_some() {
            let _ = T::established().remove(fkey);
        }
    }
    // Above the admission cap the flow is sent by the ring and recorded nowhere: its
    // later packets follow the ring until one of them comes under the cap and is
    // recorded. Katran's rule; its price is that such flows move when their ring slot
    // changes (README, "Admission rule"). The stale entry above is removed all the
    // same: a SYN's next packets must not follow a previous connection's entry.
    if over_new_flow_cap(limits.max_new_flows) {
        count(Counter::FlowNotInserted);
        return ring_choice(key, vip);
    }
    pick_from_ring::<T>(key, fkey, vip, Table::New, limits.filter_gen)
}

/// What the established IPv4 short path (`short::established_v4`, run before `lb_v4`)
/// already learnt of a packet's flow before it handed the packet to the whole path
/// (`gate::resolve`), so that the flow table is not probed twice.
pub enum Probe {
    /// Nothing: probe the flow table (every packet the short path did not look up).
    Todo,
    /// No usable entry (none, or one whose backend or VIP no longer holds; or not
    /// probed: a new connection), and the VIP lookup found the packet's VIP: its
    /// `VIPS_V4` value, which the whole path takes instead of looking it up again. (A
    /// packet to no VIP never gets here: the short path passes it up itself.)
    Vip(&'static VipMeta),
    /// [`flow_entry`]'s entry, usable ([`established_entry`] checks it again) but for a
    /// packet the short path does not finish (filters, L7, QUIC, an IPv6 backend, over
    /// the MTU).
    Hit(&'static mut FlowEntry),
}

/// An established flow's flow-table hit on the short path: its VIP's meta, the choice,
/// and its entry (whose `filter_gen` the caller compares and refreshes, `gate::established`).
pub struct Established {
    pub vip: VipMeta,
    pub choice: Choice,
    /// The entry in the flow table (the map's value, valid for the program's run).
    pub entry: &'static mut FlowEntry,
}

/// The established flow `fkey` of family `T` to the VIP `vip_key`, if the flow table
/// has it and its backend is active in the service that owns that VIP now: the
/// service's meta and the choice, found with one hash lookup (the flow) and one array
/// read (the backend, whose entry carries its service's IPv4 VIP and meta: an IPv4 key
/// compare) for IPv4, two for IPv6 (then its service's `SERVICES_V6` entry: 20 bytes
/// compared field by field), without hashing the VIP key.
/// Anything else (no entry, a backend no longer active, a service whose VIP is another
/// one or gone) is None, and the packet takes the whole path: VIP lookup, then
/// [`choose_backend`]. A hit of a QUIC service is one too, but its choice is not the
/// packet's: a short header goes by its connection ID first (`gate::resolve` hands on
/// only the VIP). Nothing is counted or written here.
#[inline(always)]
pub fn established<T: FlowTables>(fkey: &T::Key, vip_key: &T::VipKey) -> Option<Established> {
    established_entry::<T>(flow_entry::<T>(fkey)?, vip_key)
}

/// The entry of the established flow `fkey` in family `T`'s flow table, if any (one
/// hash lookup, nothing checked).
#[inline(always)]
pub fn flow_entry<T: FlowTables>(fkey: &T::Key) -> Option<&'static mut FlowEntry> {
    // SAFETY: a preallocated flow table's value, valid for the program's run (as the
    // `&'static` of `LruHashMap::get`); a racing update can at worst hand us another
    // valid backend id, which [`established_entry`] checks.
    Some(unsafe { &mut *T::established().get_ptr_mut(fkey)? })
}

/// [`established`] for a flow-table entry already looked up ([`flow_entry`]): the
/// checks of its backend and VIP, without the hash lookup.
#[inline(always)]
pub fn established_entry<T: FlowTables>(
    entry: &'static mut FlowEntry,
    vip_key: &T::VipKey,
) -> Option<Established> {
    let backend_id = entry.backend_id;
    let backend = BACKENDS.get(backend_id)?;
    if backend.flags & BACKEND_F_ACTIVE == 0 {
        return None;
    }
    let meta = T::service_vip(backend, vip_key)?;
    if meta.service_id != backend.service_id {
        return None;
    }
    Some(Established {
        vip: meta,
        choice: Choice {
            backend_id,
            backend: *backend,
        },
        entry,
    })
}

#[inline(always)]
fn active(backend_id: u32, service_id: u32) -> Option<Backend> {
    let backend = BACKENDS.get(backend_id)?;
    if usable(backend, service_id) {
        Some(*backend)
    } else {
        None
    }
}

/// Where [`pick_from_ring`] records its choice.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    /// `FLOWS`: the flow has sent packets before (a re-hash or a promotion).
    Established,
    /// `FLOWS_NEW`: the flow's first packet.
    New,
}

/// The ring's backend for `key`, recorded in `table`.
#[inline(always)]
fn pick_from_ring<T: FlowTables>(
    key: &FlowKey,
    fkey: &T::Key,
    vip: &VipMeta,
    table: Table,
    filter_gen: u32,
) -> Result<Choice, DropReason> {
    let Choice {
        backend_id,
        backend,
    } = ring_choice(key, vip)?;
    let entry = FlowEntry {
        backend_id,
        filter_gen,
    };
    // A full table evicts its least recently used flow; a failed insert only means the
    // next packet of the flow hashes again, to the same slot while the ring is unchanged.
    let inserted = match table {
        Table::Established => T::established().insert(fkey, entry, 0),
        Table::New => T::new().insert(fkey, entry, 0),
    };
    if inserted.is_err() {
        count(Counter::FlowInsertFailed);
    }
    Ok(Choice {
        backend_id,
        backend,
    })
}

/// The ring's backend for `key`, nothing recorded.
#[inline(always)]
fn ring_choice(key: &FlowKey, vip: &VipMeta) -> Result<Choice, DropReason> {
    let hash = if vip.flags & VIP_F_SOURCE_HASH != 0 {
        source_hash(&key.src)
    } else {
        flow_hash(key)
    };
    let slot = ring_slot(hash, vip.ring_size).ok_or(DropReason::NoBackend)?;
    let backend_id = *RINGS
        .get(ring_index(vip.service_id, vip.ring_size, slot))
        .ok_or(DropReason::NoBackend)?;
    let backend = active(backend_id, vip.service_id).ok_or(DropReason::NoBackend)?;
    Ok(Choice {
        backend_id,
        backend,
    })
}

/// The backend that owns the flow `key` (as a packet of it would find it: the flow
/// table, the new-flow table, else the ring), changing nothing: for packets about a
/// flow that are not part of it (ICMP errors), which must neither create, promote nor
/// re-hash a flow, nor be limited as new flows.
#[inline(always)]
pub fn owner<T: FlowTables>(
    key: &FlowKey,
    fkey: &T::Key,
    vip: &VipMeta,
) -> Result<Choice, DropReason> {
    // SAFETY: as in choose_backend.
    let entry = match unsafe { T::established().get(fkey) } {
        Some(e) => Some(*e),
        // SAFETY: as above.
        None => unsafe { T::new().get(fkey) }.copied(),
    };
    if let Some(entry) = entry {
        if let Some(backend) = active(entry.backend_id, vip.service_id) {
            return Ok(Choice {
                backend_id: entry.backend_id,
                backend,
            });
        }
    }
    ring_choice(key, vip)
}
