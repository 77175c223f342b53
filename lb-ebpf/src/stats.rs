//! Per-CPU counter updates. Per-CPU arrays need no atomics: each CPU owns its slot and
//! the agent sums over CPUs.

use lb_common::stats::{Counter, DropReason};

use crate::maps::{BACKEND_STATS, COUNTERS};

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

/// Account one forwarded packet of `bytes` to its backend (the agent sums a service's
/// traffic from its backends': one counter update per packet). Call it only once the
/// packet is encapsulated and about to leave: a packet dropped on the way is not traffic.
#[inline(always)]
pub fn count_forwarded(backend_id: u32, bytes: u64) {
    if let Some(slot) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe {
            (*slot).packets += 1;
            (*slot).bytes += bytes;
        }
    }
}
