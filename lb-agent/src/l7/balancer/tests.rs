//! The pool's schedulers, leases, passive health and sticky lookup, with an explicit
//! clock (`*_at`) so ejection tests do not sleep.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};

use super::*;

const ALL: [Scheduler; 4] = [
    Scheduler::RoundRobin,
    Scheduler::LeastRequest,
    Scheduler::P2c,
    Scheduler::Hash,
];

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([198, 18, 1, u8::try_from(i).unwrap()], 80))
}

fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn http(eject_after: u32, base_ms: u64, max_ms: u64) -> HttpConfig {
    HttpConfig {
        eject_after,
        eject_base_ms: base_ms,
        eject_max_ms: max_ms,
        ..HttpConfig::default()
    }
}

/// A pool of backends addr(1)..=addr(n) with these weights, ejection after 3 failures.
fn pool(s: Scheduler, weights: &[u32]) -> Pool {
    let p = Pool::new(s, HashOn::Client, &http(3, 1000, 4000));
    p.update(&serving(weights));
    p
}

fn serving(weights: &[u32]) -> Vec<(SocketAddr, u32)> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| (addr(i + 1), w))
        .collect()
}

fn pick(p: &Pool, c: u32) -> Option<Lease> {
    let h = HeaderMap::new();
    p.pick(
        &PickKey {
            client: client(c),
            headers: &h,
        },
        &[],
    )
}

fn pick_ex(p: &Pool, c: u32, exclude: &[SocketAddr], now: Instant) -> Option<Lease> {
    let h = HeaderMap::new();
    p.pick_at(
        &PickKey {
            client: client(c),
            headers: &h,
        },
        exclude,
        now,
    )
}

/// Index (1-based) of a backend address.
fn idx(a: SocketAddr) -> usize {
    match a {
        SocketAddr::V4(v4) => usize::from(v4.ip().octets()[3]),
        SocketAddr::V6(_) => unreachable!(),
    }
}

fn state(p: &Pool, a: SocketAddr, now: Instant) -> BackendState {
    p.snapshot_at(now)
        .into_iter()
        .find(|s| s.addr == a)
        .unwrap()
}

#[test]
fn pool_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Pool>();
    check::<Lease>();
}

#[test]
fn round_robin_is_smooth() {
    let p = pool(Scheduler::RoundRobin, &[5, 1, 1]);
    let seq: String = (0..14)
        .map(|_| char::from(b'a' - 1 + u8::try_from(idx(pick(&p, 0).unwrap().addr())).unwrap()))
        .collect();
    assert_eq!(seq, "aabacaaaabacaa");
}

#[test]
fn round_robin_and_hash_shares_match_weights() {
    let weights = [3, 2, 1];
    // Round robin: exact over whole cycles.
    let p = pool(Scheduler::RoundRobin, &weights);
    let mut c = [0usize; 4];
    for _ in 0..6000 {
        c[idx(pick(&p, 0).unwrap().addr())] += 1;
    }
    assert_eq!(c[1..], [3000, 2000, 1000]);
    // Hash: over many clients, within 1.5% of the weight share.
    let p = pool(Scheduler::Hash, &weights);
    let mut c = [0usize; 4];
    let n = 60_000;
    for i in 0..n {
        c[idx(pick(&p, i).unwrap().addr())] += 1;
    }
    for (k, w) in weights.iter().enumerate() {
        let share = c[k + 1] as f64 / f64::from(n);
        let want = f64::from(*w) / 6.0;
        eprintln!("hash share of weight {w}: {share:.4} (want {want:.4})");
        assert!((share - want).abs() < 0.015, "{share} vs {want}");
    }
}

/// A closed loop of `concurrency` requests of equal length: each step ends the oldest
/// request and starts a new one. Returns each backend's share of the new requests.
fn closed_loop(p: &Pool, n: usize, concurrency: usize, steps: usize) -> Vec<f64> {
    let mut held: VecDeque<Lease> = (0..concurrency).map(|_| pick(p, 0).unwrap()).collect();
    let mut c = vec![0usize; n + 1];
    for _ in 0..steps {
        drop(held.pop_front());
        let l = pick(p, 0).unwrap();
        c[idx(l.addr())] += 1;
        held.push_back(l);
    }
    c[1..].iter().map(|&x| x as f64 / steps as f64).collect()
}

#[test]
fn load_aware_shares_match_weights_under_load() {
    let weights = [3, 2, 1];
    for s in [Scheduler::LeastRequest, Scheduler::P2c] {
        let p = pool(s, &weights);
        let shares = closed_loop(&p, 3, 60, 60_000);
        eprintln!("{s:?} under 60 concurrent requests, weights 3:2:1: shares {shares:.3?}");
        for (share, w) in shares.iter().zip(weights) {
            let want = f64::from(w) / 6.0;
            assert!((share - want).abs() < 0.03, "{s:?}: {share} vs {want}");
        }
    }
}

#[test]
fn least_request_prefers_idle() {
    let p = pool(Scheduler::LeastRequest, &[1, 1, 1]);
    // Idle and equal: served in turn.
    let mut seen: Vec<usize> = (0..3).map(|_| idx(pick(&p, 0).unwrap().addr())).collect();
    seen.sort_unstable();
    assert_eq!(seen, [1, 2, 3]);
    let a1 = p.lease(addr(1)).unwrap();
    let a2 = p.lease(addr(1)).unwrap();
    let b1 = p.lease(addr(2)).unwrap();
    for _ in 0..10 {
        assert_eq!(pick(&p, 0).unwrap().addr(), addr(3));
    }
    let c1 = pick(&p, 0).unwrap();
    // Loads 2, 1, 1: never the first.
    for _ in 0..10 {
        assert_ne!(pick(&p, 0).unwrap().addr(), addr(1));
    }
    drop((a1, a2, b1, c1));
    // Weighted: 4 in flight on weight 4 is a load of 5/4, worse than 1/1.
    let p = pool(Scheduler::LeastRequest, &[4, 1]);
    let held: Vec<_> = (0..4).map(|_| p.lease(addr(1)).unwrap()).collect();
    assert_eq!(pick(&p, 0).unwrap().addr(), addr(2));
    drop(held);
    // Idle, weight 4 against 1: the heavier (expected load 1/4 < 1/1).
    assert_eq!(pick(&p, 0).unwrap().addr(), addr(1));
}

#[test]
fn p2c_favours_lower_load() {
    let p = pool(Scheduler::P2c, &[1; 10]);
    let held: Vec<_> = (0..3).map(|_| p.lease(addr(1)).unwrap()).collect();
    let mut c = [0usize; 11];
    for _ in 0..20_000 {
        c[idx(pick(&p, 0).unwrap().addr())] += 1;
    }
    // The loaded backend always loses its comparison; the others share evenly.
    assert_eq!(c[1], 0);
    for &x in &c[2..] {
        assert!((1800..2650).contains(&x), "{c:?}");
    }
    drop(held);
    // Two backends: both are always drawn, so the idle one always wins.
    let p = pool(Scheduler::P2c, &[1, 1]);
    let _held = p.lease(addr(1)).unwrap();
    for _ in 0..100 {
        assert_eq!(pick(&p, 0).unwrap().addr(), addr(2));
    }
    // A single backend is still picked.
    let p = pool(Scheduler::P2c, &[5]);
    assert_eq!(pick(&p, 0).unwrap().addr(), addr(1));
}

#[test]
fn exclusion() {
    for s in ALL {
        let p = pool(s, &[1, 2, 3]);
        let now = Instant::now();
        for c in 0..2000 {
            let l = pick_ex(&p, c, &[addr(2)], now).unwrap();
            assert_ne!(l.addr(), addr(2), "{s:?}");
            let l = pick_ex(&p, c, &[addr(1), addr(3)], now).unwrap();
            assert_eq!(l.addr(), addr(2), "{s:?}");
        }
        assert!(pick_ex(&p, 0, &[addr(1), addr(2), addr(3)], now).is_none());
        // An empty pool has nothing.
        let empty = Pool::new(s, HashOn::Client, &HttpConfig::default());
        assert!(pick(&empty, 0).is_none());
        assert!(empty.lease(addr(1)).is_none());
        p.update(&[]);
        assert!(pick(&p, 0).is_none());
    }
}

#[test]
fn ejection_backs_off_and_returns() {
    let p = pool(Scheduler::RoundRobin, &[1, 1]);
    let t0 = Instant::now();
    let ms = |m: u64| t0 + Duration::from_millis(m);
    let fail3 = |at: Instant, o: Outcome| {
        for _ in 0..3 {
            p.report_at(addr(1), o, at);
        }
    };
    // Two failures: counted, not ejected.
    p.report_at(addr(1), Outcome::ConnectError, t0);
    p.report_at(addr(1), Outcome::Status5xx, t0);
    assert_eq!(state(&p, addr(1), t0).consecutive_failures, 2);
    assert!(!state(&p, addr(1), t0).ejected);
    p.report_at(addr(1), Outcome::Timeout, t0);
    let s = state(&p, addr(1), t0);
    assert!(s.ejected && s.consecutive_failures == 0, "{s:?}");
    for _ in 0..10 {
        assert_eq!(pick_ex(&p, 0, &[], ms(500)).unwrap().addr(), addr(2));
    }
    assert!(p.lease_at(addr(1), ms(999)).is_none());
    // Results of requests already in flight do not count while ejected.
    fail3(ms(10), Outcome::Reset);
    assert_eq!(state(&p, addr(1), ms(10)).consecutive_failures, 0);
    // 1 s, then 2 s, 4 s, and 4 s (the cap).
    let mut at = 0;
    for len in [1000, 2000, 4000, 4000] {
        assert!(state(&p, addr(1), ms(at + len - 1)).ejected, "{at} {len}");
        assert!(!state(&p, addr(1), ms(at + len)).ejected, "{at} {len}");
        assert!(p.lease_at(addr(1), ms(at + len)).is_some());
        at += len;
        fail3(ms(at), Outcome::Reset);
    }
    // A success after returning resets the backoff: the next ejection is 1 s again.
    at += 4000;
    p.report_at(addr(1), Outcome::Success, ms(at));
    fail3(ms(at), Outcome::Status5xx);
    assert!(state(&p, addr(1), ms(at + 999)).ejected);
    assert!(!state(&p, addr(1), ms(at + 1000)).ejected);
}

#[test]
fn success_resets_the_count() {
    let p = pool(Scheduler::RoundRobin, &[1, 1]);
    let t0 = Instant::now();
    for _ in 0..10 {
        p.report_at(addr(1), Outcome::ConnectError, t0);
        p.report_at(addr(1), Outcome::Timeout, t0);
        p.report_at(addr(1), Outcome::Success, t0);
    }
    let s = state(&p, addr(1), t0);
    assert!(!s.ejected && s.consecutive_failures == 0, "{s:?}");
}

#[test]
fn eject_after_zero_never_ejects() {
    let p = Pool::new(Scheduler::RoundRobin, HashOn::Client, &http(0, 1000, 4000));
    p.update(&serving(&[1, 1]));
    let t0 = Instant::now();
    for _ in 0..100 {
        p.report_at(addr(1), Outcome::Status5xx, t0);
    }
    let s = state(&p, addr(1), t0);
    assert!(!s.ejected && s.consecutive_failures == 100, "{s:?}");
}

#[test]
fn panic_mode_ignores_ejection_when_nothing_else_is_left() {
    for s in ALL {
        let p = pool(s, &[1, 1, 1]);
        let t0 = Instant::now();
        for a in [addr(1), addr(2)] {
            for _ in 0..3 {
                p.report_at(a, Outcome::ConnectError, t0);
            }
        }
        // One healthy backend: always it.
        for c in 0..100 {
            assert_eq!(pick_ex(&p, c, &[], t0).unwrap().addr(), addr(3), "{s:?}");
        }
        // The healthy one already tried: an ejected one rather than nothing.
        let l = pick_ex(&p, 0, &[addr(3)], t0).unwrap();
        assert!(l.addr() == addr(1) || l.addr() == addr(2), "{s:?}");
        drop(l);
        // All ejected: still served, spread over the backends.
        for _ in 0..3 {
            p.report_at(addr(3), Outcome::ConnectError, t0);
        }
        let mut seen = std::collections::HashSet::new();
        for c in 0..300 {
            seen.insert(pick_ex(&p, c, &[], t0).unwrap().addr());
        }
        assert_eq!(seen.len(), 3, "{s:?}");
        // But a specific lease on an ejected backend is refused.
        assert!(p.lease_at(addr(3), t0).is_none());
        assert!(pick_ex(&p, 0, &[addr(1), addr(2), addr(3)], t0).is_none());
    }
}

#[test]
fn update_keeps_state() {
    let p = pool(Scheduler::RoundRobin, &[1, 1]);
    let t0 = Instant::now();
    let held = p.lease(addr(1)).unwrap();
    for _ in 0..3 {
        p.report_at(addr(2), Outcome::Reset, t0);
    }
    p.report_at(addr(1), Outcome::Reset, t0);
    p.update(&[(addr(1), 2), (addr(2), 1), (addr(3), 1)]);
    let snap = p.snapshot_at(t0);
    assert_eq!(
        snap,
        vec![
            BackendState {
                addr: addr(1),
                weight: 2,
                in_flight: 1,
                ejected: false,
                consecutive_failures: 1
            },
            BackendState {
                addr: addr(2),
                weight: 1,
                in_flight: 0,
                ejected: true,
                consecutive_failures: 0
            },
            BackendState {
                addr: addr(3),
                weight: 1,
                in_flight: 0,
                ejected: false,
                consecutive_failures: 0
            },
        ]
    );
    // Removed while a lease is held: the lease stays valid, results are ignored.
    p.update(&[(addr(2), 1), (addr(3), 1)]);
    assert_eq!(held.addr(), addr(1));
    p.report(addr(1), Outcome::Reset);
    assert!(p.lease(addr(1)).is_none());
    assert_eq!(p.snapshot().len(), 2);
    drop(held);
    // Back again: a fresh state.
    p.update(&[(addr(1), 1), (addr(2), 1), (addr(3), 1)]);
    let s = state(&p, addr(1), t0);
    assert_eq!((s.in_flight, s.consecutive_failures), (0, 0));
    // Zero weights and repeats are ignored.
    p.update(&[(addr(1), 1), (addr(2), 0), (addr(1), 5)]);
    let snap = p.snapshot();
    assert_eq!(snap.len(), 1);
    assert_eq!((snap[0].addr, snap[0].weight), (addr(1), 1));
}

#[test]
fn round_robin_position_survives_updates() {
    // Updating with the same set each pick does not restart the cycle.
    let p = pool(Scheduler::RoundRobin, &[5, 1, 1]);
    let mut c = [0usize; 4];
    for _ in 0..700 {
        p.update(&serving(&[5, 1, 1]));
        c[idx(pick(&p, 0).unwrap().addr())] += 1;
    }
    assert_eq!(c[1..], [500, 100, 100]);
}

fn hash_pick_of(p: &Pool, headers: &HeaderMap, client: IpAddr) -> SocketAddr {
    p.pick(&PickKey { client, headers }, &[]).unwrap().addr()
}

#[test]
fn hash_is_stable_and_order_independent() {
    let weights = [1, 2, 3, 4, 5, 6, 7];
    let a = pool(Scheduler::Hash, &weights);
    let b = Pool::new(Scheduler::Hash, HashOn::Client, &HttpConfig::default());
    let mut rev = serving(&weights);
    rev.reverse();
    b.update(&rev);
    let h = HeaderMap::new();
    for i in 0..2000 {
        let x = hash_pick_of(&a, &h, client(i));
        assert_eq!(x, hash_pick_of(&a, &h, client(i)));
        assert_eq!(x, hash_pick_of(&b, &h, client(i)));
    }
    // Pinned values: the mapping is fixed across restarts and builds (a change of
    // hash or table size would move most clients).
    let pinned: Vec<usize> = (0..8)
        .map(|i| idx(hash_pick_of(&a, &h, client(i))))
        .collect();
    assert_eq!(pinned, [5, 3, 4, 5, 4, 7, 4, 7]);
    // IPv4-mapped IPv6 hashes as IPv4.
    for i in 0..100 {
        let v4 = Ipv4Addr::from(0x0a00_0000 + i);
        assert_eq!(
            hash_pick_of(&a, &h, IpAddr::V6(v4.to_ipv6_mapped())),
            hash_pick_of(&a, &h, IpAddr::V4(v4))
        );
    }
    // IPv6 clients spread too.
    let mut seen = std::collections::HashSet::new();
    for i in 0..200u128 {
        seen.insert(hash_pick_of(
            &a,
            &h,
            IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | i)),
        ));
    }
    assert_eq!(seen.len(), 7);
}

#[test]
fn hash_on_header_and_cookie() {
    let weights = [1; 8];
    let by_client = pool(Scheduler::Hash, &weights);
    for hash_on in [
        HashOn::Header("x-user".to_owned()),
        HashOn::Cookie("sess".to_owned()),
    ] {
        let p = Pool::new(Scheduler::Hash, hash_on.clone(), &HttpConfig::default());
        p.update(&serving(&weights));
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            match &hash_on {
                HashOn::Header(n) => {
                    h.insert(
                        http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                        HeaderValue::from_str(v).unwrap(),
                    );
                }
                HashOn::Cookie(n) => {
                    h.insert(
                        http::header::COOKIE,
                        HeaderValue::from_str(&format!("a=1; {n}={v}")).unwrap(),
                    );
                }
                HashOn::Client => unreachable!(),
            }
            h
        };
        let mut spread = std::collections::HashSet::new();
        for u in 0..200 {
            let h = with(&format!("user-{u}"));
            let first = hash_pick_of(&p, &h, client(0));
            // The same value from any client: the same backend.
            for c in 1..5 {
                assert_eq!(hash_pick_of(&p, &h, client(c)), first, "{hash_on}");
            }
            spread.insert(first);
        }
        assert_eq!(spread.len(), 8, "{hash_on}");
        // Absent or empty: the client address, as a client-hash pool does.
        let none = HeaderMap::new();
        let empty = with("");
        for c in 0..200 {
            let want = hash_pick_of(&by_client, &none, client(c));
            assert_eq!(hash_pick_of(&p, &none, client(c)), want, "{hash_on}");
            assert_eq!(hash_pick_of(&p, &empty, client(c)), want, "{hash_on}");
        }
    }
}

#[test]
fn hash_minimal_disruption() {
    let n = 10;
    let keys = 10_000;
    let p = pool(Scheduler::Hash, &vec![1; n]);
    let h = HeaderMap::new();
    let before: Vec<SocketAddr> = (0..keys).map(|i| hash_pick_of(&p, &h, client(i))).collect();
    let gone = addr(4);
    let rest: Vec<_> = serving(&vec![1; n])
        .into_iter()
        .filter(|&(a, _)| a != gone)
        .collect();
    p.update(&rest);
    let after: Vec<SocketAddr> = (0..keys).map(|i| hash_pick_of(&p, &h, client(i))).collect();
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let owned = before.iter().filter(|&&b| b == gone).count();
    let others_moved = before
        .iter()
        .zip(&after)
        .filter(|&(b, a)| *b != gone && b != a)
        .count();
    eprintln!(
        "remove 1 of {n}: {moved} of {keys} keys moved ({:.2}%), {owned} were its own, {others_moved} of the others' ({:.3}%)",
        moved as f64 * 100.0 / f64::from(keys),
        others_moved as f64 * 100.0 / f64::from(keys)
    );
    assert!((700..1300).contains(&owned), "{owned}");
    // Its keys all move; of the others' keys, under 1% do.
    assert!(after.iter().all(|&a| a != gone));
    assert!(others_moved * 100 < keys as usize, "{others_moved}");
    // Adding it back restores the original mapping exactly.
    p.update(&serving(&vec![1; n]));
    let again: Vec<SocketAddr> = (0..keys).map(|i| hash_pick_of(&p, &h, client(i))).collect();
    assert_eq!(again, before);
}

#[test]
fn hash_fallback_is_deterministic_and_spread() {
    let p = pool(Scheduler::Hash, &[1; 10]);
    let h = HeaderMap::new();
    let t0 = Instant::now();
    let mut fallbacks: HashMap<SocketAddr, std::collections::HashSet<SocketAddr>> = HashMap::new();
    let mut by_key = Vec::new();
    for c in 0..3000 {
        let primary = hash_pick_of(&p, &h, client(c));
        let f1 = pick_ex(&p, c, &[primary], t0).unwrap().addr();
        let f2 = pick_ex(&p, c, &[primary], t0).unwrap().addr();
        assert_eq!(f1, f2);
        assert_ne!(f1, primary);
        fallbacks.entry(primary).or_default().insert(f1);
        by_key.push((primary, f1));
    }
    // A primary's keys fall back to many backends, not all onto one.
    for (primary, set) in &fallbacks {
        assert!(set.len() >= 6, "{primary}: {set:?}");
    }
    // Ejecting the primary sends its keys where excluding it does.
    let victim = addr(5);
    for _ in 0..3 {
        p.report_at(victim, Outcome::ConnectError, t0);
    }
    for (c, &(primary, f1)) in (0..).zip(&by_key) {
        let got = pick_ex(&p, c, &[], t0).unwrap().addr();
        assert_eq!(got, if primary == victim { f1 } else { primary });
    }
}

#[test]
fn lease_by_token_finds_serving_backends() {
    let key = StickyKey::from_bytes([9; 32]);
    let p = pool(Scheduler::RoundRobin, &[1, 1, 1]);
    let t0 = Instant::now();
    for i in 1..=3 {
        let l = p.lease_by_token(&key, key.backend_token(addr(i))).unwrap();
        assert_eq!(l.addr(), addr(i));
        assert_eq!(state(&p, addr(i), t0).in_flight, 1);
    }
    assert!(p.lease_by_token(&key, [0; 8]).is_none());
    assert!(p.lease_by_token(&key, key.backend_token(addr(9))).is_none());
    // Another key: computed afresh, still right.
    let other = StickyKey::from_bytes([10; 32]);
    let l = p
        .lease_by_token(&other, other.backend_token(addr(2)))
        .unwrap();
    assert_eq!(l.addr(), addr(2));
    assert!(
        p.lease_by_token(&other, key.backend_token(addr(2)))
            .is_none()
    );
    // Ejected or removed: none.
    for _ in 0..3 {
        p.report_at(addr(2), Outcome::Status5xx, t0);
    }
    assert!(
        p.lease_by_token_at(&key, key.backend_token(addr(2)), t0)
            .is_none()
    );
    p.update(&serving(&[1]));
    assert!(p.lease_by_token(&key, key.backend_token(addr(3))).is_none());
    assert_eq!(
        p.lease_by_token(&key, key.backend_token(addr(1)))
            .unwrap()
            .addr(),
        addr(1)
    );
}

#[test]
fn concurrency_smoke() {
    for s in ALL {
        let p = Arc::new(pool(s, &[1, 2, 3, 4]));
        let threads: Vec<_> = (0..4u32)
            .map(|t| {
                let p = Arc::clone(&p);
                std::thread::spawn(move || {
                    let h = HeaderMap::new();
                    let mut held = VecDeque::new();
                    for i in 0..20_000u32 {
                        if t == 0 && i % 500 == 0 {
                            // Weights change and a backend comes and goes.
                            let w = 1 + i / 500 % 4;
                            if i % 1000 == 0 {
                                p.update(&serving(&[w, 2, 3, 4]));
                            } else {
                                p.update(&serving(&[w, 2, 3]));
                            }
                        }
                        let k = PickKey {
                            client: client(i),
                            headers: &h,
                        };
                        if let Some(l) = p.pick(&k, &[]) {
                            let o = if i % 97 == 0 {
                                Outcome::Reset
                            } else {
                                Outcome::Success
                            };
                            p.report(l.addr(), o);
                            held.push_back(l);
                        }
                        if held.len() > 8 {
                            drop(held.pop_front());
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        p.update(&serving(&[1, 2, 3, 4]));
        for st in p.snapshot() {
            assert_eq!(st.in_flight, 0, "{s:?}: {st:?}");
        }
    }
}

/// Each worker picks from its own slot: its own smooth round robin (the weights'
/// shares on every worker), and an update reaches every slot.
#[test]
fn every_worker_schedules_from_its_own_slot() {
    let n = crate::l7::workers::on_each(|| ()).len();
    let p = Arc::new(pool(Scheduler::RoundRobin, &[1, 2]));
    let counts = |p: &Arc<Pool>| {
        let p = Arc::clone(p);
        crate::l7::workers::on_each(move || {
            let mut c = [0usize; 4];
            for i in 0..30 {
                c[idx(pick(&p, i).unwrap().addr())] += 1;
            }
            c
        })
    };
    assert_eq!(counts(&p), vec![[0, 10, 20, 0]; n]);
    p.update(&serving(&[1, 1, 1]));
    assert_eq!(counts(&p), vec![[0, 10, 10, 10]; n]);
    // Health is one per backend whatever the worker: a failure on one worker is
    // reset by a success on the next, failures add up across workers.
    let q = Arc::clone(&p);
    crate::l7::workers::on_each(move || {
        q.report(addr(1), Outcome::Success);
        q.report(addr(1), Outcome::Reset);
    });
    assert_eq!(state(&p, addr(1), Instant::now()).consecutive_failures, 1);
    let q = Arc::clone(&p);
    crate::l7::workers::on_each(move || q.report(addr(2), Outcome::Status5xx));
    let failures = u32::try_from(n).unwrap();
    let s = state(&p, addr(2), Instant::now());
    if failures < 3 {
        assert_eq!(s.consecutive_failures, failures, "{s:?}");
    } else {
        assert!(s.ejected, "{s:?}");
    }
}
