//! The reconciler against real BPF maps (no program runs, no network): an apply that
//! fails part-way is followed by another apply that converges, without leaking ids,
//! and a reconciler that adopts the maps finds what the first one wrote.

use std::net::{IpAddr, Ipv4Addr};

use lb_agent::{
    config::Protocol,
    dataplane::{
        desired::{DesiredBackend, DesiredService, DesiredState},
        loader::{self, Capacities},
        maps::Maps,
        sync::{Reconciler, SyncError},
    },
};
use lb_common::types::BACKEND_F_ACTIVE;

const CAPS: Capacities = Capacities {
    max_services: 2,
    max_backends: 4,
    ring_size: 13,
    flow_table_size: 64,
    max_filter_rules: 16,
};

fn addr(last: u8) -> IpAddr {
    Ipv4Addr::new(198, 18, 2, last).into()
}

/// The service `web` with backends 198.18.2.<last> for each of `lasts`.
fn web(lasts: &[u8]) -> DesiredState {
    DesiredState {
        source_v4: Some(Ipv4Addr::new(198, 18, 1, 10)),
        source_v6: None,
        encap: 0,
        filters: Default::default(),
        services: vec![DesiredService {
            name: "web".into(),
            vip: "198.18.100.1:80".parse().expect("vip"),
            protocol: Protocol::Tcp,
            l7: false,
            source_hash: false,
            backends: lasts
                .iter()
                .map(|&l| DesiredBackend {
                    address: addr(l),
                    port: 80,
                    weight: 100,
                    active: true,
                })
                .collect(),
        }],
    }
}

/// The backend ids the ring of service 0 holds.
fn ring_ids(maps: &Maps) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..CAPS.ring_size)
        .map(|slot| maps.rings.get(&slot, 0).expect("ring slot"))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn active(maps: &Maps, id: u32) -> bool {
    maps.backends.get(&id, 0).expect("backend entry").flags & BACKEND_F_ACTIVE != 0
}

#[test]
fn a_failed_apply_is_followed_by_one_that_converges() {
    xdplb_tests::require_privileges!();
    let mut ebpf = loader::load(&CAPS).expect("load the object (root, BPF)");
    let mut maps = Maps::take(&mut ebpf, None).expect("maps");
    let mut r = Reconciler::new(&CAPS);

    r.apply(&mut maps, &web(&[11, 12])).expect("first apply");
    let id = |r: &Reconciler, last: u8| r.backend_id("web", addr(last), 80);
    assert_eq!((id(&r, 11), id(&r, 12)), (Some(0), Some(1)));
    assert_eq!(ring_ids(&maps), [0, 1]);

    // Five backends do not fit in four slots: the apply stops at the fifth, after
    // writing the entries of the third and fourth, before touching the ring.
    match r.apply(&mut maps, &web(&[11, 12, 13, 14, 15])) {
        Err(SyncError::BackendsFull { max: 4 }) => {}
        other => panic!("expected BackendsFull, got {other:?}"),
    }
    assert_eq!(ring_ids(&maps), [0, 1], "the ring is as before");

    // The next apply (a newer desired state) converges: .13 keeps the id it was
    // given, .12 and .14 leave (written inactive, ids freed), the ring holds .11 and .13.
    r.apply(&mut maps, &web(&[11, 13]))
        .expect("apply after the failure");
    assert_eq!((id(&r, 11), id(&r, 13)), (Some(0), Some(2)));
    assert_eq!((id(&r, 12), id(&r, 14)), (None, None));
    assert_eq!(ring_ids(&maps), [0, 2]);
    assert!(active(&maps, 0) && active(&maps, 2));
    assert!(!active(&maps, 1), ".12 left: inactive");
    assert!(!active(&maps, 3), ".14 never served: inactive");

    // No id leaked: two more backends fit.
    let applied = r
        .apply(&mut maps, &web(&[11, 13, 16, 17]))
        .expect("the freed ids are free");
    assert_eq!(applied[0].backends.len(), 4);
    assert_eq!(ring_ids(&maps), [0, 1, 2, 3]);

    // A reconciler that adopts these maps finds the same ids and writes nothing.
    let mut adopted = Reconciler::adopt(&maps, &CAPS, &web(&[11, 13, 16, 17])).expect("adopt");
    for last in [11, 13, 16, 17] {
        assert_eq!(id(&adopted, last), id(&r, last), "198.18.2.{last}");
    }
    let applied = adopted
        .apply(&mut maps, &web(&[11, 13, 16, 17]))
        .expect("apply after adopting");
    assert_eq!(applied[0].slots_changed, 0);
}
