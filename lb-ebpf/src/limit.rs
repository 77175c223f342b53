//! `new_flows_per_source`: a token bucket per masked source address, checked only for
//! packets that would create a flow (see [`crate::hashing::choose_backend`]), so an
//! established flow never pays for it.
//!
//! The limit itself is `FLOW_LIMITS[0]` (global, in use while `FILTER_F_FLOW_LIMIT` is
//! set) and `FLOW_LIMITS[service_id + 1]` (a service's, while its VIP has
//! `VIP_F_FLOW_LIMIT`); each keeps its own buckets (the scope of the key). A bucket is
//! the source's theoretical arrival time (GCRA; see `lb_common::types::FlowLimit`): a
//! new flow is admitted while that time is at most `tolerance_ns` ahead of now, and
//! pushes it `interval_ns` further. Buckets live in an LRU map: a source that stops
//! sending is forgotten, and comes back with a full bucket.
//!
//! Concurrent updates of one bucket from two CPUs are not atomic: at worst a flow or
//! two more than the limit is admitted; nothing is ever dropped below it.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    stats::DropReason,
    types::{FAMILY_V4, FilterAddr, FlowKey, FlowLimit, filter_scope},
};

use crate::maps::{FLOW_BUCKETS, FLOW_LIMITS};

/// One limit's verdict on a new flow, before anything is written.
struct Pending {
    bucket: FilterAddr,
    /// The bucket's value if it exists (None: a new source, full bucket).
    tat: Option<*mut u64>,
    /// The value to write when the flow is admitted.
    next: u64,
}

/// Look up the bucket of `key` under the limit at `index`: Ok(None) when that limit
/// is not set, Err when the source is over it.
#[inline(always)]
fn check(index: u32, key: &FlowKey, now: u64) -> Result<Option<Pending>, DropReason> {
    let Some(limit) = FLOW_LIMITS.get(index) else {
        return Ok(None);
    };
    let limit: FlowLimit = *limit;
    let mut bucket = FilterAddr {
        family: key.family,
        scope: filter_scope(index),
        addr: [0; 4],
    };
    if key.family == FAMILY_V4 {
        bucket.addr[0] = key.src[0] & limit.mask_v4;
    } else {
        bucket.addr[0] = key.src[0] & limit.mask_v6[0];
        bucket.addr[1] = key.src[1] & limit.mask_v6[1];
        bucket.addr[2] = key.src[2] & limit.mask_v6[2];
        bucket.addr[3] = key.src[3] & limit.mask_v6[3];
    }
    let tat = FLOW_BUCKETS.get_ptr_mut(bucket);
    let at = match tat {
        // SAFETY: the value of an LRU hash entry, valid during this run.
        Some(p) => unsafe { *p },
        None => now,
    };
    let at = if at > now { at } else { now };
    if at - now > limit.tolerance_ns {
        return Err(DropReason::NewFlowLimit);
    }
    Ok(Some(Pending {
        bucket,
        tat,
        next: at + limit.interval_ns,
    }))
}

#[inline(always)]
fn commit(p: &Pending) {
    match p.tat {
        // SAFETY: as in `check`.
        Some(tat) => unsafe { *tat = p.next },
        None => {
            // A new source starts with a full bucket, less this flow. A failed insert
            // (map busy) admits: the limit never drops what it did not measure.
            let _ = FLOW_BUCKETS.insert(p.bucket, p.next, 0);
        }
    }
}

/// Admit (and account) one new flow of `key` under the global limit (`global`) and
/// the service's (`service`: its `FLOW_LIMITS` index), or refuse it. Both are checked
/// before either is charged, so a flow one limit refuses costs the other nothing.
#[inline(always)]
pub fn admit(global: bool, service: Option<u32>, key: &FlowKey) -> Result<(), DropReason> {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let g = if global { check(0, key, now)? } else { None };
    let s = match service {
        Some(index) => check(index, key, now)?,
        None => None,
    };
    if let Some(g) = &g {
        commit(g);
    }
    if let Some(s) = &s {
        commit(s);
    }
    Ok(())
}
