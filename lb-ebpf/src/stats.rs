//! Per-CPU counter updates. Per-CPU arrays need no atomics: each CPU owns its slot and
//! the agent sums over CPUs.

use lb_common::{
    stats::{Counter, DropReason},
    types::TrafficCounters,
};

use crate::maps::{BACKEND_STATS, COUNTERS, SERVICE_STATS};

#[inline(always)]
fn bump_index(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot, valid for the program's run on this CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    bump_index(counter.index());
}

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    bump_index(reason.index());
}

#[inline(always)]
fn add_traffic(slot: Option<*mut TrafficCounters>, bytes: u64) {
    if let Some(slot) = slot {
        // SAFETY: as above.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes;
        }
    }
}

/// Account one forwarded packet of `bytes` to its service and backend. Call it only once
/// the packet is encapsulated and about to leave: a packet dropped on the way is not traffic.
#[inline(always)]
pub fn count_forwarded(service_id: u32, backend_id: u32, bytes: u64) {
    add_traffic(SERVICE_STATS.get_ptr_mut(service_id), bytes);
    add_traffic(BACKEND_STATS.get_ptr_mut(backend_id), bytes);
}
