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
//!
//! Also the per-CPU caps of one-second windows ([`over_per_cpu_cap`]): Katran's
//! admission rule (`dataplane.max_new_flows_per_cpu`) and the ICMP errors the balancer
//! sends (`dataplane.icmp_errors_per_cpu`).

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::PerCpuArray};
use lb_common::{
    stats::DropReason,
    types::{
        FAMILY_V4, FilterAddr, FlowKey, FlowLimit, NEW_FLOW_RATE_WINDOW_NS, NewFlowRate,
        filter_scope,
    },
};

use crate::maps::{FLOW_BUCKETS, FLOW_LIMITS};

/// The bucket of `key`'s source under `limit` (the one at `index`).
#[inline(always)]
fn bucket_of(index: u32, limit: &FlowLimit, key: &FlowKey) -> FilterAddr {
    let addr = if key.family == FAMILY_V4 {
        [key.src[0] & limit.mask_v4, 0, 0, 0]
    } else {
        [
            key.src[0] & limit.mask_v6[0],
            key.src[1] & limit.mask_v6[1],
            key.src[2] & limit.mask_v6[2],
            key.src[3] & limit.mask_v6[3],
        ]
    };
    crate::keys::filter_addr(key.family, filter_scope(index), addr)
}

/// Look up the bucket of `key` under the limit at `index`: Err when the source is over
/// it, else what to write when the flow is admitted: the bucket's value (null: a new
/// source, full bucket) and its next value (0: the limit is not set; a set limit's next
/// value is never 0). Only a pointer and a number come back, not the bucket's key
/// ([`commit`] makes it again for a new source): this is `xdp_lb`'s deepest call, and
/// its frame counts against BPF's 512-byte stack together with the entry point's.
#[inline(always)]
fn check(index: u32, key: &FlowKey, now: u64) -> Result<(*mut u64, u64), DropReason> {
    let Some(limit) = FLOW_LIMITS.get(index) else {
        return Ok((core::ptr::null_mut(), 0));
    };
    let tat = FLOW_BUCKETS
        .get_ptr_mut(bucket_of(index, limit, key))
        .unwrap_or_default();
    let at = if tat.is_null() {
        now
    } else {
        // SAFETY: the value of an LRU hash entry, valid during this run.
        unsafe { *tat }
    };
    let at = if at > now { at } else { now };
    if at - now > limit.tolerance_ns {
        return Err(DropReason::NewFlowLimit);
    }
    Ok((tat, at + limit.interval_ns))
}

#[inline(always)]
fn commit(index: u32, key: &FlowKey, tat: *mut u64, next: u64) {
    if next == 0 {
        return;
    }
    if !tat.is_null() {
        // SAFETY: as in `check`.
        unsafe { *tat = next };
        return;
    }
    if let Some(limit) = FLOW_LIMITS.get(index) {
        // A new source starts with a full bucket, less this flow. A failed insert
        // (map busy) admits: the limit never drops what it did not measure.
        let _ = FLOW_BUCKETS.insert(bucket_of(index, limit, key), next, 0);
    }
}

/// Admit (and account) one new flow of `key` under the global limit (`global`) and
/// the service's (`service`: its `FLOW_LIMITS` index), or refuse it. Both are checked
/// before either is charged, so a flow one limit refuses costs the other nothing.
///
/// Not inlined: a BPF subprogram with its own (small) stack frame, entered only by a
/// packet that would create a flow while a limit is set; inlined, its locals took
/// `xdp_lb`'s frame past BPF's 512 bytes once the ICMP paths were in it.
#[inline(never)]
pub fn admit(global: bool, service: Option<u32>, key: &FlowKey) -> Result<(), DropReason> {
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let (g_tat, g_next) = if global {
        check(0, key, now)?
    } else {
        (core::ptr::null_mut(), 0)
    };
    let index = service.unwrap_or(0);
    let (s_tat, s_next) = if service.is_some() {
        check(index, key, now)?
    } else {
        (core::ptr::null_mut(), 0)
    };
    commit(0, key, g_tat, g_next);
    commit(index, key, s_tat, s_next);
    Ok(())
}

/// Count one event in this CPU's current one-second window of `rate` and say whether
/// the window's count is now over `cap` (never with `cap` 0, which costs nothing more
/// than the test). The window restarts when an event comes a second or more after the
/// current window began. The per-CPU entry needs no lock.
#[inline(always)]
pub fn over_per_cpu_cap(rate: &PerCpuArray<NewFlowRate>, cap: u32) -> bool {
    if cap == 0 {
        return false;
    }
    let Some(rate) = rate.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run; no other
    // CPU writes it and the program is not re-entered on one CPU.
    let rate = unsafe { &mut *rate };
    if now.wrapping_sub(rate.window_start_ns) >= NEW_FLOW_RATE_WINDOW_NS {
        rate.window_start_ns = now;
        rate.count = 1;
        return false;
    }
    rate.count += 1;
    rate.count > u64::from(cap)
}
