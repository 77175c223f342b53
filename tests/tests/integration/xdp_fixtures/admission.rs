//! The admission rule (`dataplane.max_new_flows_per_cpu`, Katran's rate cap) on the
//! fixture bed of the parent module: above the cap a new flow is sent by the ring and
//! not recorded (counted `flow_not_inserted`); a flow that was not recorded follows the
//! ring, so when a backend leaves, it moves exactly when its ring slot changed, while a
//! recorded flow stays where it is unless its own backend left. The test counts those
//! moves against the ring oracle and prints them (README, "Admission rule").

use std::time::Instant;

use super::*;

/// Flows opened: more than the fixture's new-flow table holds per CPU (1024 / CPUs)
/// would evict; the cap keeps all but a few out of it.
const FLOWS: u16 = 400;

#[test]
fn over_the_admission_cap_new_flows_follow_the_ring_unrecorded() -> anyhow::Result<()> {
    let test = require_privileges!();
    with_fixture(test, |fx| {
        // One CPU: the cap and its window are per CPU.
        pin_to_current_cpu()?;
        let mut d = desired();
        d.max_new_flows_per_cpu = 1;
        fx.lb.apply(&d)?;
        let web: Vec<Ipv4Addr> = BACKENDS.to_vec();
        let flows: Vec<SocketAddrV4> = (0..FLOWS)
            .map(|i| SocketAddrV4::new(CLIENT, 20000 + i))
            .collect();
        let before = fx.counters();
        let started = Instant::now();
        let mut first = Vec::new();
        for &src in &flows {
            let frame = syn(src, VIP_WEB).build();
            let (v, out) = fx.run(LB_PROGRAM, &frame)?;
            ensure!(v == XDP_TX, "SYN from {src}: {}", verdict_name(v));
            // Recorded or not, a new flow goes where the ring says, byte for byte.
            let want = fx.ring_pick("web", &frame, &web, 80)?;
            ensure!(
                out == fx.encapsulated(&frame, want)?,
                "SYN from {src}: not the encapsulated input to the ring's backend {want}"
            );
            first.push(want);
        }
        let elapsed = started.elapsed().as_secs();
        let recorded: Vec<bool> = flows
            .iter()
            .map(|&src| {
                fx.lb
                    .flow_entry(&flow_key(src, VIP_WEB, PROTO_TCP), true)
                    .is_some()
            })
            .collect();
        let n_recorded = recorded.iter().filter(|&&r| r).count() as u64;
        let after = fx.counters();
        let delta = |c: Counter| after.get(c) - before.get(c);
        ensure!(
            delta(Counter::FlowNew) == u64::from(FLOWS),
            "flow_new counted {} of {FLOWS} new flows",
            delta(Counter::FlowNew)
        );
        ensure!(
            delta(Counter::FlowNotInserted) + n_recorded == u64::from(FLOWS),
            "flow_not_inserted {} + flows in the new-flow table {n_recorded} != {FLOWS}",
            delta(Counter::FlowNotInserted)
        );
        // Cap 1: one flow per one-second window is recorded (the first of each window).
        ensure!(
            (1..=elapsed + 1).contains(&n_recorded),
            "{n_recorded} flows recorded in {elapsed} s (+1) of windows under a cap of 1/s"
        );
        ensure!(
            delta(Counter::FlowInsertFailed) == 0,
            "an insert failed: the cap, not the table, must keep flows out"
        );

        // A backend leaves. Unrecorded flows follow the new ring; recorded ones stay,
        // unless their backend left.
        let removed = BACKENDS[0];
        let mut d2 = d.clone();
        d2.services[0]
            .backends
            .retain(|b| b.address != IpAddr::V4(removed));
        fx.lb.apply(&d2)?;
        let live = &web[1..];
        let (mut moved, mut on_live, mut on_removed, mut slot_changed) = (0u32, 0u32, 0u32, 0u32);
        for (i, &src) in flows.iter().enumerate() {
            let ack = PacketBuilder::tcp(src, VIP_WEB)
                .flags(tcp_flags::ACK)
                .build();
            let now_pick = fx.ring_pick("web", &ack, live, 80)?;
            let want = if recorded[i] && first[i] != removed {
                first[i]
            } else {
                now_pick
            };
            let (v, out) = fx.run(LB_PROGRAM, &ack)?;
            ensure!(v == XDP_TX, "ACK from {src}: {}", verdict_name(v));
            ensure!(
                out == fx.encapsulated(&ack, want)?,
                "ACK from {src} (recorded: {}, first {}): not the encapsulated input to {want}",
                recorded[i],
                first[i]
            );
            if first[i] == removed {
                on_removed += 1;
                continue;
            }
            on_live += 1;
            if now_pick != first[i] {
                slot_changed += 1;
            }
            if want != first[i] {
                moved += 1;
            }
        }
        ensure!(on_removed > 0, "some flows were on the removed backend");
        // Every unrecorded flow on a live backend moved exactly when its slot changed
        // (Maglev's extra disruption); the recorded ones did not move.
        let recorded_live_changed = flows
            .iter()
            .enumerate()
            .filter(|&(i, _)| recorded[i] && first[i] != removed)
            .filter(|&(i, &src)| {
                let ack = PacketBuilder::tcp(src, VIP_WEB)
                    .flags(tcp_flags::ACK)
                    .build();
                fx.ring_pick("web", &ack, live, 80)
                    .is_ok_and(|p| p != first[i])
            })
            .count() as u32;
        ensure!(
            moved == slot_changed - recorded_live_changed,
            "{moved} flows on live backends moved, the ring oracle says {slot_changed} \
             slots changed ({recorded_live_changed} of them recorded flows)"
        );
        eprintln!(
            "admission cap 1/s/CPU, {FLOWS} flows, {n_recorded} recorded; backend {removed} \
             of 3 removed (ring {RING} slots): {on_removed} flows were on it and moved \
             (as without the cap); of the {on_live} on live backends {moved} moved \
             ({:.1}%: their ring slot changed; with every flow recorded, none would)",
            f64::from(moved) * 100.0 / f64::from(on_live)
        );
        Ok(())
    })
}
