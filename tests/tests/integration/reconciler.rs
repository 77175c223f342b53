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
        ring,
        sync::{Reconciler, SyncError},
    },
};
use lb_common::types::{
    BACKEND_F_ACTIVE, FAMILY_V4, ServiceV4, VIP_ADDR_F_L4, VIP_ADDR_F_LOCAL, VipAddrKey, VipKeyV4,
};

const CAPS: Capacities = Capacities {
    max_services: 2,
    max_backends: 4,
    ring_size: 13,
    flow_table_size: 64,
    max_filter_rules: 16,
    new_flow_table_size: 16,
    flow_limit_sources: 16,
};

fn addr(last: u8) -> IpAddr {
    Ipv4Addr::new(198, 18, 2, last).into()
}

/// The service `web` with backends 198.18.2.<last> for each of `lasts`.
fn web(lasts: &[u8]) -> DesiredState {
    DesiredState {
        gue_port: 6080,
        source_v4_prefix: None,
        source_v6_prefix: None,
        max_new_flows_per_cpu: 0,
        icmp_errors_per_cpu: 0,
        source_v4: Some(Ipv4Addr::new(198, 18, 1, 10)),
        source_v6: None,
        encap: 0,
        mtu: 1500,
        filters: Default::default(),
        services: vec![DesiredService {
            quic: false,
            name: "web".into(),
            vip: "198.18.100.1:80".parse().expect("vip"),
            protocol: Protocol::Tcp,
            l7: false,
            source_hash: false,
            backends: lasts
                .iter()
                .map(|&l| DesiredBackend {
                    quic_id: None,
                    address: addr(l),
                    port: 80,
                    weight: 100,
                    active: true,
                })
                .collect(),
            filters: Default::default(),
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

/// `sha256sum` of `text`: an oracle outside the agent.
fn sha256sum(text: &str) -> String {
    use std::io::Write as _;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8(out.stdout).expect("utf-8")[..64].to_owned()
}

#[test]
fn ring_digests_agree_between_nodes_whose_ids_differ() {
    xdplb_tests::require_privileges!();
    let mut ebpf1 = loader::load(&CAPS).expect("load the object (root, BPF)");
    let mut maps1 = Maps::take(&mut ebpf1, None).expect("maps");
    let mut ebpf2 = loader::load(&CAPS).expect("load the object (root, BPF)");
    let mut maps2 = Maps::take(&mut ebpf2, None).expect("maps");
    let mut r1 = Reconciler::new(&CAPS);
    let mut r2 = Reconciler::new(&CAPS);
    assert_eq!(r1.ring_digest("web"), None, "nothing written yet");

    r1.apply(&mut maps1, &web(&[11, 12, 13])).expect("node 1");
    // Node 2 saw another history: its backends have other ids.
    r2.apply(&mut maps2, &web(&[14, 13]))
        .expect("node 2, before");
    r2.apply(&mut maps2, &web(&[11, 12, 13])).expect("node 2");
    assert_ne!(
        r1.backend_id("web", addr(13), 80),
        r2.backend_id("web", addr(13), 80),
        "the test needs different ids on the two nodes"
    );
    let d1 = r1.ring_digest("web").expect("a ring");
    assert_eq!(r2.ring_digest("web"), Some(d1.clone()));

    // The digest is SHA-256 of the slots named by backend, as read back from the map.
    let names: std::collections::BTreeMap<u32, String> = [11, 12, 13]
        .iter()
        .map(|&l| {
            (
                r1.backend_id("web", addr(l), 80).expect("id"),
                format!("198.18.2.{l}:80\n"),
            )
        })
        .collect();
    let sid = r1.service_id("web").expect("service id");
    let text: String = (0..CAPS.ring_size)
        .map(|slot| {
            let id = maps1
                .rings
                .get(&(sid * CAPS.ring_size + slot), 0)
                .expect("ring slot");
            names[&id].clone()
        })
        .collect();
    assert_eq!(d1, sha256sum(&text));

    // A reconciler that adopts node 1's maps shows the same digest before applying.
    let adopted = Reconciler::adopt(&maps1, &CAPS, &web(&[11, 12, 13])).expect("adopt");
    assert_eq!(adopted.ring_digest("web"), Some(d1.clone()));

    // Another backend set: another digest, on both nodes alike.
    r1.apply(&mut maps1, &web(&[11, 13]))
        .expect("node 1, one less");
    r2.apply(&mut maps2, &web(&[11, 13]))
        .expect("node 2, one less");
    let d2 = r1.ring_digest("web").expect("a ring");
    assert_ne!(d2, d1);
    assert_eq!(r2.ring_digest("web"), Some(d2));
    // No backend: no ring, no digest.
    r1.apply(&mut maps1, &web(&[])).expect("node 1, none");
    assert_eq!(r1.ring_digest("web"), None);
}

/// `VIP_ADDRS` as the program sees it: (address, flags), sorted.
fn vip_addrs(maps: &Maps) -> Vec<(Ipv4Addr, u32)> {
    let mut out: Vec<(Ipv4Addr, u32)> = maps
        .vip_addrs
        .iter()
        .map(|e| {
            let (k, v) = e.expect("VIP_ADDRS entry");
            assert_eq!((k.family, k.addr[1..].to_vec()), (FAMILY_V4, vec![0; 3]));
            (Ipv4Addr::from(k.addr[0].to_ne_bytes()), v)
        })
        .collect();
    out.sort_unstable();
    out
}

#[test]
fn vip_addresses_follow_the_services_and_are_adopted() {
    xdplb_tests::require_privileges!();
    let mut ebpf = loader::load(&CAPS).expect("load the object (root, BPF)");
    let mut maps = Maps::take(&mut ebpf, None).expect("maps");
    let mut r = Reconciler::new(&CAPS);
    let vip = Ipv4Addr::new(198, 18, 100, 1);

    r.apply(&mut maps, &web(&[11])).expect("apply");
    assert_eq!(vip_addrs(&maps), [(vip, VIP_ADDR_F_L4)]);

    // An L7 service on the same address (another port): the address is also local.
    let mut both = web(&[11]);
    let mut l7 = both.services[0].clone();
    l7.name = "shop".into();
    l7.vip = "198.18.100.1:443".parse().expect("vip");
    l7.l7 = true;
    both.services.push(l7);
    r.apply(&mut maps, &both).expect("apply with l7");
    assert_eq!(vip_addrs(&maps), [(vip, VIP_ADDR_F_L4 | VIP_ADDR_F_LOCAL)]);

    // Adopted as written: an apply of the same state writes nothing, and removing the
    // L4 service leaves the address local only.
    let mut adopted = Reconciler::adopt(&maps, &CAPS, &both).expect("adopt");
    adopted
        .apply(&mut maps, &both)
        .expect("apply after adopting");
    let mut only_l7 = both.clone();
    only_l7.services.remove(0);
    adopted.apply(&mut maps, &only_l7).expect("remove web");
    assert_eq!(vip_addrs(&maps), [(vip, VIP_ADDR_F_LOCAL)]);

    // No service: no address.
    only_l7.services.clear();
    adopted.apply(&mut maps, &only_l7).expect("remove all");
    assert_eq!(vip_addrs(&maps), []);
    let key = VipAddrKey {
        addr: [u32::from_ne_bytes(vip.octets()), 0, 0, 0],
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    assert!(maps.vip_addrs.get(&key, 0).is_err(), "removed from the map");
}

/// The IPv4 copies of the VIP entries (`VIPS_V4`, and each backend entry's
/// `service_v4`, read by established IPv4 flows) follow `VIPS`: a change of the
/// service's meta or VIP reaches every backend entry, and an adopting agent repairs a
/// copy an agent stopped between two writes left wrong; when the service goes, every
/// copy goes with it.
#[test]
fn ipv4_vip_copies_follow_the_vips_and_are_repaired_on_adoption() {
    xdplb_tests::require_privileges!();
    let mut ebpf = loader::load(&CAPS).expect("load the object (root, BPF)");
    let mut maps = Maps::take(&mut ebpf, None).expect("maps");
    let mut r = Reconciler::new(&CAPS);
    let state = web(&[11, 12]);
    r.apply(&mut maps, &state).expect("apply");
    let key = lb_agent::dataplane::sync::vip_key(state.services[0].vip, state.services[0].protocol);
    let short = VipKeyV4::of(&key).expect("an IPv4 VIP");
    let meta = maps.vips.get(&key, 0).expect("VIPS entry");
    assert_eq!(maps.vips_v4.get(&short, 0).expect("VIPS_V4 entry"), meta);
    let want = ServiceV4 { key: short, meta };
    // Each backend entry carries the copy (what established IPv4 flows read).
    let b11 = r.backend_id("web", addr(11), 80).expect("backend id");
    let b12 = r.backend_id("web", addr(12), 80).expect("backend id");
    let copies = |maps: &Maps| -> Vec<ServiceV4> {
        [b11, b12]
            .iter()
            .map(|b| maps.backends.get(b, 0).expect("entry").service_v4)
            .collect()
    };
    assert_eq!(copies(&maps), [want, want]);

    // The service's meta changes (an own deny list): every copy follows.
    let mut denied = state.clone();
    denied.services[0].filters.deny = vec!["198.18.9.0/24".parse().expect("prefix")];
    r.apply(&mut maps, &denied).expect("apply");
    let meta_denied = maps.vips.get(&key, 0).expect("VIPS entry");
    assert_ne!(meta_denied, meta);
    let with_deny = ServiceV4 {
        key: short,
        meta: meta_denied,
    };
    assert_eq!(copies(&maps), [with_deny, with_deny]);
    // The VIP moves (another port): every copy names the new VIP.
    let mut moved = state.clone();
    moved.services[0].vip = "198.18.100.1:8080".parse().expect("vip");
    r.apply(&mut maps, &moved).expect("apply");
    let moved_key =
        lb_agent::dataplane::sync::vip_key(moved.services[0].vip, moved.services[0].protocol);
    let moved_short = VipKeyV4::of(&moved_key).expect("an IPv4 VIP");
    let moved_meta = maps.vips.get(&moved_key, 0).expect("VIPS entry");
    let moved_copy = ServiceV4 {
        key: moved_short,
        meta: moved_meta,
    };
    assert_eq!(copies(&maps), [moved_copy, moved_copy]);
    r.apply(&mut maps, &state).expect("apply");
    assert_eq!(copies(&maps), [want, want]);

    // A stopped agent's leftover: a backend entry's copy says another VIP.
    let mut wrong = want;
    wrong.key.addr ^= 1;
    let mut entry = maps.backends.get(&b12, 0).expect("entry");
    entry.service_v4 = wrong;
    maps.backends.set(b12, entry, 0).expect("write");
    let mut adopted = Reconciler::adopt(&maps, &CAPS, &state).expect("adopt");
    adopted
        .apply(&mut maps, &state)
        .expect("apply after adopting");
    assert_eq!(copies(&maps), [want, want], "rewritten");

    // The service goes: every copy goes with it.
    let mut none = state.clone();
    none.services.clear();
    adopted.apply(&mut maps, &none).expect("remove");
    assert!(
        maps.vips_v4.get(&short, 0).is_err(),
        "VIPS_V4 entry removed"
    );
    assert_eq!(copies(&maps), [ServiceV4::default(), ServiceV4::default()]);
    for b in [b11, b12] {
        let e = maps.backends.get(&b, 0).expect("entry");
        assert_eq!(e.flags & BACKEND_F_ACTIVE, 0, "backend {b} inactive");
    }
}

/// A forwarded packet is counted only to its backend (`BACKEND_STATS`); a service's
/// traffic is its backends' plus the carry of those it had (`SERVICE_STATS`): removing
/// a backend moves its traffic into the carry (the service's totals stay), its id
/// starts again from zero for the next backend, and a new service on a freed service
/// id starts from zero.
#[test]
fn service_traffic_is_its_backends_and_survives_their_removal() {
    use aya::maps::PerCpuValues;
    use lb_agent::dataplane::stats;
    use lb_common::types::TrafficCounters;
    xdplb_tests::require_privileges!();
    let mut ebpf = loader::load(&CAPS).expect("load the object (root, BPF)");
    let mut maps = Maps::take(&mut ebpf, None).expect("maps");
    let mut r = Reconciler::new(&CAPS);
    let both = web(&[11, 12]);
    r.apply(&mut maps, &both).expect("apply");
    let id = r.service_id("web").expect("service id");
    let b11 = r.backend_id("web", addr(11), 80).expect("backend id");
    let b12 = r.backend_id("web", addr(12), 80).expect("backend id");
    // What the program would have counted: on two CPUs when there are two.
    let cpus = aya::util::nr_cpus().expect("cpus");
    let counted = |packets: u64| {
        let mut v = vec![TrafficCounters::default(); cpus];
        v[0] = TrafficCounters {
            packets,
            bytes: packets * 100,
        };
        if cpus > 1 {
            v[cpus - 1].packets += 1;
            v[cpus - 1].bytes += 100;
        }
        PerCpuValues::try_from(v).expect("values")
    };
    maps.backend_stats.set(b11, counted(10), 0).expect("write");
    maps.backend_stats.set(b12, counted(20), 0).expect("write");
    let extra = u64::from(cpus > 1);
    let total = |r: &Reconciler, maps: &Maps| {
        stats::service_traffic(maps, id, r.service_backend_ids("web")).expect("read")
    };
    let all = TrafficCounters {
        packets: 30 + 2 * extra,
        bytes: (30 + 2 * extra) * 100,
    };
    assert_eq!(total(&r, &maps), all);

    // Backend .12 goes: the service keeps its traffic, the freed id reads zero.
    r.apply(&mut maps, &web(&[11])).expect("apply");
    assert_eq!(total(&r, &maps), all, "the service's totals stay");
    assert_eq!(
        stats::backend_traffic(&maps, b12).expect("read"),
        TrafficCounters::default()
    );
    // A new backend takes the freed id and starts from zero; the service goes on.
    r.apply(&mut maps, &web(&[11, 13])).expect("apply");
    let b13 = r.backend_id("web", addr(13), 80).expect("backend id");
    assert_eq!(b13, b12, "the lowest free id is reused");
    assert_eq!(
        stats::backend_traffic(&maps, b13).expect("read"),
        TrafficCounters::default()
    );
    assert_eq!(total(&r, &maps), all);
    // An adopting agent reads the same totals (the carry is in the pinned map).
    let adopted = Reconciler::adopt(&maps, &CAPS, &web(&[11, 13])).expect("adopt");
    assert_eq!(total(&adopted, &maps), all);

    // The service goes and comes back on the same id: it starts from zero.
    let mut none = both.clone();
    none.services.clear();
    r.apply(&mut maps, &none).expect("remove");
    r.apply(&mut maps, &both).expect("again");
    assert_eq!(r.service_id("web"), Some(id));
    assert_eq!(
        stats::service_traffic(&maps, id, r.service_backend_ids("web")).expect("read"),
        TrafficCounters::default()
    );
}

/// The filter generation (`FILTER_GEN`, issue 12 item 2) moves after every apply that
/// changed the source filters (global or a service's, added or removed), and only then:
/// an apply of the same state, or one that changes backends, leaves it (established
/// flows keep skipping the filter lookups). An adopting agent bumps it once (its
/// predecessor may have stopped between a filter write and the bump). IPv6 VIPs get
/// their `SERVICES_V6` entry, cleared when the service goes.
#[test]
fn filter_generation_moves_with_filter_changes_only() {
    use lb_common::types::{FAMILY_V6, ServiceV6};
    xdplb_tests::require_privileges!();
    let mut ebpf = loader::load(&CAPS).expect("load the object (root, BPF)");
    let mut maps = Maps::take(&mut ebpf, None).expect("maps");
    let generation = |maps: &Maps| maps.filter_gen.get(&0, 0).expect("FILTER_GEN");
    let mut r = Reconciler::new(&CAPS);
    let state = web(&[11, 12]);
    r.apply(&mut maps, &state).expect("apply");
    let g = generation(&maps);
    r.apply(&mut maps, &state).expect("apply again");
    assert_eq!(generation(&maps), g, "nothing changed");
    r.apply(&mut maps, &web(&[11, 12, 13]))
        .expect("a backend more");
    assert_eq!(generation(&maps), g, "backends are no filter");

    let mut deny = web(&[11, 12, 13]);
    deny.filters.deny = vec!["203.0.113.0/24".parse().expect("prefix")];
    r.apply(&mut maps, &deny).expect("deny list");
    assert_eq!(generation(&maps), g + 1, "a deny list");
    r.apply(&mut maps, &deny).expect("same");
    assert_eq!(generation(&maps), g + 1, "the same deny list");
    let mut own = deny.clone();
    own.services[0].filters.allow = vec!["198.18.0.0/16".parse().expect("prefix")];
    r.apply(&mut maps, &own).expect("service allow list");
    assert_eq!(generation(&maps), g + 2, "a service's allow list");
    r.apply(&mut maps, &web(&[11, 12, 13])).expect("no lists");
    assert_eq!(generation(&maps), g + 3, "lists removed");

    let mut adopted = Reconciler::adopt(&maps, &CAPS, &web(&[11, 12, 13])).expect("adopt");
    adopted
        .apply(&mut maps, &web(&[11, 12, 13]))
        .expect("apply after adopting");
    assert_eq!(generation(&maps), g + 4, "adoption bumps once");
    adopted
        .apply(&mut maps, &web(&[11, 12, 13]))
        .expect("again");
    assert_eq!(generation(&maps), g + 4, "and only once");

    // An IPv6 VIP: its SERVICES_V6 entry, no IPv4 copy in its backend's entry; gone
    // with the service.
    let mut v6 = web(&[11]);
    v6.services[0].vip = "[fd00:18::100]:80".parse().expect("vip");
    v6.services[0].backends[0].address = "fd00:18::11".parse().expect("address");
    adopted.apply(&mut maps, &v6).expect("IPv6 VIP");
    let id = adopted.service_id("web").expect("service id");
    let key = lb_agent::dataplane::sync::vip_key(v6.services[0].vip, v6.services[0].protocol);
    assert_eq!(key.family, FAMILY_V6);
    let meta = maps.vips.get(&key, 0).expect("VIPS entry");
    assert_eq!(
        maps.services_v6.get(&id, 0).expect("slot"),
        ServiceV6 { key, meta }
    );
    let b = adopted
        .backend_id("web", v6.services[0].backends[0].address, 80)
        .expect("backend id");
    assert_eq!(
        maps.backends.get(&b, 0).expect("entry").service_v4,
        ServiceV4::default()
    );
    let mut none = v6.clone();
    none.services.clear();
    adopted.apply(&mut maps, &none).expect("remove");
    assert_eq!(
        maps.services_v6.get(&id, 0).expect("slot"),
        ServiceV6::default()
    );
}

/// Rings of 65537 slots, two services: the reconciler writes a ring's changed slots in
/// batches (`dataplane::batch`), at the service's offset in `XDPLB_RINGS`.
const BIG: Capacities = Capacities {
    max_services: 3,
    max_backends: 16,
    ring_size: 65537,
    ..CAPS
};

/// `web` (198.18.100.1:80) and `api` (198.18.100.2:80) with backends 198.18.2.<last>
/// of the given weights.
fn two_services(web_backends: &[(u8, u32)], api_backends: &[(u8, u32)]) -> DesiredState {
    let mut state = web(&[]);
    let template = state.services[0].clone();
    state.services = [
        ("web", "198.18.100.1:80", web_backends),
        ("api", "198.18.100.2:80", api_backends),
    ]
    .iter()
    .map(|&(name, vip, backends)| DesiredService {
        name: name.into(),
        vip: vip.parse().expect("vip"),
        backends: backends
            .iter()
            .map(|&(l, weight)| DesiredBackend {
                quic_id: None,
                address: addr(l),
                port: 80,
                weight,
                active: true,
            })
            .collect(),
        ..template.clone()
    })
    .collect();
    state
}

/// The ring `ring::build` makes for `service` of `state` with the reconciler's ids
/// (the oracle), and the ring read back from the map.
fn oracle_and_map(
    r: &Reconciler,
    maps: &Maps,
    state: &DesiredState,
    service: &str,
) -> (Vec<u32>, Vec<u32>) {
    let svc = state
        .services
        .iter()
        .find(|s| s.name == service)
        .expect("service");
    let keys: Vec<String> = svc
        .backends
        .iter()
        .map(|b| format!("{}:{}", b.address, b.port))
        .collect();
    let members: Vec<ring::RingMember<'_>> = svc
        .backends
        .iter()
        .zip(&keys)
        .map(|(b, key)| ring::RingMember {
            id: r
                .backend_id(service, b.address, b.port)
                .expect("backend id"),
            key,
            weight: b.weight,
        })
        .collect();
    let oracle = ring::build(&members, BIG.ring_size).expect("a ring");
    let base = r.service_id(service).expect("service id") * BIG.ring_size;
    let in_map = (base..base + BIG.ring_size)
        .map(|i| maps.rings.get(&i, 0).expect("ring slot"))
        .collect();
    (oracle, in_map)
}

#[test]
fn batched_ring_writes_match_the_oracle_after_build_weight_change_and_removal() {
    xdplb_tests::require_privileges!();
    let mut ebpf = loader::load(&BIG).expect("load the object (root, BPF)");
    let mut maps = Maps::take(&mut ebpf, None).expect("maps");
    let mut r = Reconciler::new(&BIG);
    let api = [(21, 100), (22, 100), (23, 100)];
    let changed = |applied: &[lb_agent::dataplane::sync::AppliedService], name: &str| {
        applied
            .iter()
            .find(|a| a.name == name)
            .expect("applied")
            .slots_changed
    };

    // Build: every slot of both rings written.
    let built = two_services(&[(11, 100), (12, 100), (13, 100), (14, 100)], &api);
    let applied = r.apply(&mut maps, &built).expect("build");
    assert_eq!(changed(&applied, "web"), BIG.ring_size);
    assert_eq!(changed(&applied, "api"), BIG.ring_size);
    let (oracle, in_map) = oracle_and_map(&r, &maps, &built, "web");
    assert!(oracle == in_map, "web's ring after the build");
    let (api_oracle, api_map) = oracle_and_map(&r, &maps, &built, "api");
    assert!(api_oracle == api_map, "api's ring after the build");
    let mut before = oracle;

    // A weight change, then a removal: only the slots that move are written, and the
    // map holds the oracle's ring; the other service's ring is not touched.
    let weighted = two_services(&[(11, 100), (12, 50), (13, 100), (14, 100)], &api);
    let removed = two_services(&[(11, 100), (12, 50), (14, 100)], &api);
    for (step, state) in [("weight change", &weighted), ("removal", &removed)] {
        let applied = r.apply(&mut maps, state).expect(step);
        let (oracle, in_map) = oracle_and_map(&r, &maps, state, "web");
        assert!(oracle == in_map, "web's ring after the {step}");
        let moved = before.iter().zip(&oracle).filter(|(a, b)| a != b).count() as u32;
        assert!(moved > 0, "the {step} moves slots");
        assert_eq!(changed(&applied, "web"), moved, "{step}: only moved slots");
        assert_eq!(changed(&applied, "api"), 0, "{step}: api untouched");
        let (_, api_now) = oracle_and_map(&r, &maps, state, "api");
        assert!(api_now == api_map, "api's ring after the {step}");
        before = oracle;
    }

    // A reconciler that adopts the maps finds the rings as written.
    let mut adopted = Reconciler::adopt(&maps, &BIG, &removed).expect("adopt");
    let applied = adopted
        .apply(&mut maps, &removed)
        .expect("apply after adopting");
    assert!(applied.iter().all(|a| a.slots_changed == 0), "{applied:?}");
    // (Adopting read the rings in BPF_MAP_LOOKUP_BATCH calls: had a slot come back
    // wrong, the apply above would have written it.) The API's slot list, read in
    // batches too, names the backends single reads find.
    for name in ["web", "api"] {
        let (_, in_map) = oracle_and_map(&r, &maps, &removed, name);
        let svc = removed
            .services
            .iter()
            .find(|s| s.name == name)
            .expect("service");
        let names: std::collections::BTreeMap<u32, String> = svc
            .backends
            .iter()
            .map(|b| {
                let id = r.backend_id(name, b.address, b.port).expect("backend id");
                (id, std::net::SocketAddr::new(b.address, b.port).to_string())
            })
            .collect();
        let want: Vec<String> = in_map.iter().map(|id| names[id].clone()).collect();
        let got = adopted
            .ring_slots(&maps, name)
            .expect("a ring")
            .expect("read the ring");
        assert!(
            got == want,
            "{name}: batched slot list differs from single reads"
        );
    }
}

/// An agent whose map layout differs from the pinned fast path's (session 22: the
/// backend entries grew from 24 to 48 bytes, `XDPLB_SVC_V4` went) does not adopt it:
/// `pinned_capacities` refuses the pins, and the pin directory is removed whole (a map
/// this agent no longer knows included) before its own maps are pinned, empty.
#[test]
fn pins_of_another_layout_are_replaced_not_adopted() -> anyhow::Result<()> {
    use aya::maps::MapData;
    use lb_common::maps as names;
    xdplb_tests::require_privileges!();
    let mut guard = xdplb_tests::netns::NetnsGuard::new()?;
    let bpffs = guard.mount_bpffs()?;
    let dir = loader::pin_dir(&bpffs, "lb0", loader::Role::Balancer)?;
    loader::create_pin_dir(&dir)?;
    let ebpf = loader::load_pinned(&CAPS, &dir)?;
    drop(ebpf);
    assert_eq!(
        loader::pinned_capacities(&dir),
        Some(CAPS),
        "our own pins adopt"
    );

    // An older agent's pins: XDPLB_BACKENDS with 4-byte values (any other size than
    // this agent's 48), and a map this agent does not have.
    let other = MapData::from_pin(dir.join(names::RINGS))?;
    std::fs::remove_file(dir.join(names::BACKENDS))?;
    other.pin(dir.join(names::BACKENDS))?;
    other.pin(dir.join("XDPLB_SVC_V4"))?;
    assert_eq!(loader::pinned_capacities(&dir), None, "another layout");
    assert!(loader::remove_pin_dir(&dir)?, "removed");
    assert!(!dir.exists());
    loader::create_pin_dir(&dir)?;
    let mut ebpf = loader::load_pinned(&CAPS, &dir)?;
    let maps = Maps::take(&mut ebpf, None)?;
    assert_eq!(
        maps.backends.get(&0, 0)?,
        lb_common::types::Backend::default(),
        "a fresh backend map"
    );
    assert!(!dir.join("XDPLB_SVC_V4").exists());
    assert_eq!(loader::pinned_capacities(&dir), Some(CAPS));
    drop(maps);
    drop(ebpf);
    loader::remove_pin_dir(&dir)?;
    Ok(())
}
