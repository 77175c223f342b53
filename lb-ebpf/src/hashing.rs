//! Backend choice: the flow table first, so established flows keep their backend
//! when the backend set changes; otherwise the service's Maglev ring.

use lb_common::{
    hash::{flow_hash, ring_index, ring_slot, source_hash},
    stats::{Counter, DropReason},
    types::{BACKEND_F_ACTIVE, Backend, FlowEntry, FlowKey, VIP_F_SOURCE_HASH, VipMeta},
};

use crate::{
    maps::{BACKENDS, FLOWS, RINGS},
    stats::count,
};

/// The backend chosen for a packet.
pub struct Choice {
    pub backend_id: u32,
    pub backend: Backend,
}

#[inline(always)]
fn usable(backend: &Backend, service_id: u32) -> bool {
    backend.flags & BACKEND_F_ACTIVE != 0 && backend.service_id == service_id
}

/// Look the flow up; on a miss, or when its backend is no longer active in this
/// service, pick from the ring and record the choice.
///
/// A TCP SYN (without ACK) starts a new connection: it always takes the ring's choice
/// and overwrites any entry, as Katran does. Otherwise a client reusing a source port
/// would follow the previous connection's entry to a backend that no longer takes new
/// flows (a draining backend, or a tier-1 backend after tier 0 came back); measured
/// in the namespace tests at about 95 connections/s.
#[inline(always)]
pub fn choose_backend(
    key: &FlowKey,
    vip: &VipMeta,
    new_connection: bool,
) -> Result<Choice, DropReason> {
    if new_connection {
        count(Counter::FlowNew);
        return pick_from_ring(key, vip);
    }
    // SAFETY: the flow table is preallocated (no BPF_F_NO_PREALLOC), and a racing
    // update can at worst hand us another valid backend id, which is checked below.
    if let Some(entry) = unsafe { FLOWS.get(key) } {
        let backend_id = entry.backend_id;
        if let Some(backend) = BACKENDS.get(backend_id)
            && usable(backend, vip.service_id)
        {
            return Ok(Choice {
                backend_id,
                backend: *backend,
            });
        }
        count(Counter::FlowRehash);
    } else {
        count(Counter::FlowNew);
    }
    pick_from_ring(key, vip)
}

/// The ring's backend for `key`, recorded in the flow table.
#[inline(always)]
fn pick_from_ring(key: &FlowKey, vip: &VipMeta) -> Result<Choice, DropReason> {
    let hash = if vip.flags & VIP_F_SOURCE_HASH != 0 {
        source_hash(&key.src)
    } else {
        flow_hash(key)
    };
    let slot = ring_slot(hash, vip.ring_size).ok_or(DropReason::NoBackend)?;
    let backend_id = *RINGS
        .get(ring_index(vip.service_id, vip.ring_size, slot))
        .ok_or(DropReason::NoBackend)?;
    let backend = BACKENDS.get(backend_id).ok_or(DropReason::NoBackend)?;
    if !usable(backend, vip.service_id) {
        return Err(DropReason::NoBackend);
    }
    let entry = FlowEntry {
        backend_id,
        _pad: 0,
    };
    // A full table evicts its least recently used flow; a failed insert only means the
    // next packet of the flow hashes again, to the same slot while the ring is unchanged.
    if FLOWS.insert(key, entry, 0).is_err() {
        count(Counter::FlowInsertFailed);
    }
    Ok(Choice {
        backend_id,
        backend: *backend,
    })
}
