//! Tests of the checker against real sockets on 127.0.0.1: verdicts, timing,
//! jitter and the target diff.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio::time::timeout;

use super::testutil::{Backend, closed_port};
use super::*;
use crate::config::HealthKind;

struct Harness {
    checker: HealthChecker,
    events: UnboundedReceiver<Transition>,
    observed: Arc<AtomicUsize>,
}

impl Harness {
    fn new() -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let observed = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&observed);
        let observe = Arc::new(move |_: Duration| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        Self {
            checker: HealthChecker::new(tx, observe),
            events,
            observed,
        }
    }

    /// The next transition, which must arrive within `within`.
    async fn transition(&mut self, within: Duration) -> Transition {
        timeout(within, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no transition within {within:?}"))
            .expect("channel open")
    }

    fn status(&self, key: &TargetKey) -> Status {
        self.checker
            .status()
            .into_iter()
            .find(|(k, _)| k == key)
            .expect("known target")
            .1
    }
}

fn health(kind: HealthKind, interval_ms: u64, rise: u32, fall: u32) -> HealthConfig {
    HealthConfig {
        kind,
        interval_ms,
        timeout_ms: interval_ms * 4 / 5,
        rise,
        fall,
        ..HealthConfig::default()
    }
}

fn target(service: &str, addr: SocketAddr, config: HealthConfig) -> Target {
    Target {
        key: TargetKey {
            service: service.to_owned(),
            address: addr.ip(),
            port: addr.port(),
        },
        config,
        speaks: super::Speaks::default(),
    }
}

/// Waits until `cond` holds, at most `within`.
async fn eventually(within: Duration, what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        sleep(Duration::from_millis(5)).await;
    }
}

const MARGIN: Duration = Duration::from_millis(300);

#[tokio::test]
async fn tcp_target_with_a_listener_stays_up() {
    let backend = Backend::tcp().await;
    let mut h = Harness::new();
    let t = target("web", backend.addr, health(HealthKind::Tcp, 50, 1, 1));
    h.checker.set_targets(vec![t.clone()]);
    assert_eq!(
        h.checker.is_up(&t.key),
        Some(true),
        "a new target starts up"
    );

    eventually(MARGIN * 2, "3 checks", || h.status(&t.key).checks >= 3).await;
    let status = h.status(&t.key);
    assert!(status.up);
    assert_eq!((status.failures, status.consecutive_fail), (0, 0));
    assert!(status.consecutive_ok >= 3);
    assert_eq!(status.last_reason, "connected");
    assert!(backend.connections() >= 3);
    assert!(h.observed.load(Ordering::SeqCst) >= 3);
    assert!(
        h.events.try_recv().is_err(),
        "no transition for a healthy target"
    );
}

#[tokio::test]
async fn tcp_target_goes_down_after_fall_failures() {
    let addr = closed_port().await;
    let mut h = Harness::new();
    let t = target("web", addr, health(HealthKind::Tcp, 50, 2, 3));
    let started = std::time::Instant::now();
    h.checker.set_targets(vec![t.clone()]);

    // First check within one interval, two more ~1 interval apart each.
    let down = h
        .transition(Duration::from_millis(50 + 2 * 55) + MARGIN)
        .await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2 * 45 - 5),
        "down too early: {took:?}"
    );
    assert_eq!(down.key, t.key);
    assert!(!down.up);
    assert_eq!(down.reason, "connect refused");
    assert!(down.latency < Duration::from_millis(40));
    assert!(down.at >= started);
    assert_eq!(h.checker.is_up(&t.key), Some(false));
    let status = h.status(&t.key);
    assert!(!status.up);
    assert!(status.consecutive_fail >= 3 && status.failures >= 3);
    assert_eq!(status.last_reason, "connect refused");
}

#[tokio::test]
async fn http_target_falls_on_bad_status_and_rises_after_rise_successes() {
    let backend = Backend::http(503).await;
    let mut h = Harness::new();
    let t = target("api", backend.addr, health(HealthKind::Http, 50, 3, 2));
    h.checker.set_targets(vec![t.clone()]);

    let down = h.transition(Duration::from_millis(50 + 55) + MARGIN).await;
    assert!(!down.up);
    assert_eq!(down.reason, "status 503 not in 200..=399");
    assert!(backend.answered().len() >= 2);

    backend.set_status(200);
    let up = h.transition(Duration::from_millis(3 * 55) + MARGIN).await;
    assert!(up.up);
    assert_eq!(up.reason, "status 200");
    let oks = backend.answered().iter().filter(|&&s| s == 200).count();
    assert!(oks >= 3, "up after {oks} successes, rise is 3");
    assert_eq!(h.checker.is_up(&t.key), Some(true));
    assert!(h.status(&t.key).consecutive_ok >= 3);
}

#[tokio::test]
async fn http_target_with_a_silent_backend_times_out() {
    let backend = Backend::silent().await;
    let mut h = Harness::new();
    let mut config = health(HealthKind::Http, 100, 1, 1);
    config.timeout_ms = 50;
    h.checker
        .set_targets(vec![target("api", backend.addr, config)]);

    let down = h.transition(Duration::from_millis(100 + 50) + MARGIN).await;
    assert!(!down.up);
    assert_eq!(down.reason, "timeout reading response");
    assert!(
        down.latency >= Duration::from_millis(50),
        "{:?}",
        down.latency
    );
}

#[tokio::test]
async fn first_checks_are_spread_over_the_interval() {
    let mut backends = Vec::new();
    for _ in 0..20 {
        backends.push(Backend::tcp().await);
    }
    let mut h = Harness::new();
    let targets = backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            target(
                &format!("svc{i}"),
                b.addr,
                health(HealthKind::Tcp, 100, 1, 1),
            )
        })
        .collect();
    let started = Instant::now();
    h.checker.set_targets(targets);

    eventually(
        Duration::from_millis(100) + MARGIN,
        "every first check",
        || backends.iter().all(|b| b.first_at().is_some()),
    )
    .await;
    let firsts: Vec<Duration> = backends
        .iter()
        .map(|b| b.first_at().unwrap().duration_since(started))
        .collect();
    let (min, max) = (firsts.iter().min().unwrap(), firsts.iter().max().unwrap());
    assert!(
        *max - *min > Duration::from_millis(5),
        "all within 5 ms: {firsts:?}"
    );
    assert!(*max < Duration::from_millis(100) + MARGIN, "{firsts:?}");
}

#[test]
fn delays_stay_within_their_bounds() {
    let interval = Duration::from_millis(100);
    for _ in 0..1000 {
        assert!(first_delay(interval) < interval);
        let next = next_delay(interval);
        assert!(next >= Duration::from_millis(90) && next <= Duration::from_millis(110));
    }
    assert_eq!(first_delay(Duration::ZERO), Duration::ZERO);
}

#[tokio::test]
async fn set_targets_keeps_unchanged_state_and_stops_removed_targets() {
    let dead = closed_port().await;
    let removed = Backend::tcp().await;
    let added = Backend::tcp().await;
    let mut h = Harness::new();
    let a = target("web", dead, health(HealthKind::Tcp, 50, 1, 1));
    let b = target("web", removed.addr, health(HealthKind::Tcp, 50, 1, 1));
    let c = target("web", added.addr, health(HealthKind::Tcp, 50, 1, 1));
    h.checker.set_targets(vec![a.clone(), b.clone()]);
    let down = h.transition(Duration::from_millis(50) + MARGIN).await;
    assert_eq!((&down.key, down.up), (&a.key, false));
    eventually(MARGIN, "b checked", || removed.connections() > 0).await;

    // A unchanged, B removed, C added.
    let checks_before = h.status(&a.key).checks;
    h.checker.set_targets(vec![a.clone(), c.clone()]);
    assert_eq!(
        h.checker.is_up(&a.key),
        Some(false),
        "unchanged target keeps its state"
    );
    assert!(
        h.status(&a.key).checks >= checks_before,
        "counters are kept"
    );
    assert_eq!(h.checker.is_up(&b.key), None);
    assert_eq!(h.checker.is_up(&c.key), Some(true));
    assert_eq!(h.checker.status().len(), 2);
    // A check that was already connecting may still land; then nothing.
    sleep(Duration::from_millis(20)).await;
    let seen = removed.connections();
    eventually(MARGIN, "c checked", || added.connections() > 0).await;
    sleep(Duration::from_millis(250)).await;
    assert_eq!(
        removed.connections(),
        seen,
        "removed target is still checked"
    );

    // A's check changes: restarted, still down, no transition while it keeps failing.
    let mut changed = a.clone();
    changed.config.interval_ms = 60;
    h.checker.set_targets(vec![changed.clone(), c.clone()]);
    assert_eq!(
        h.checker.is_up(&a.key),
        Some(false),
        "restart keeps the verdict"
    );
    let checks = h.status(&a.key).checks;
    eventually(MARGIN, "a checked again", || {
        h.status(&a.key).checks > checks
    })
    .await;
    sleep(Duration::from_millis(150)).await;
    assert!(h.events.try_recv().is_err());
    assert_eq!(h.checker.is_up(&a.key), Some(false));
}

#[tokio::test]
async fn kind_none_never_checks_and_is_up() {
    let backend = Backend::tcp().await;
    let mut h = Harness::new();
    let t = target("web", backend.addr, health(HealthKind::None, 50, 1, 1));
    h.checker.set_targets(vec![t.clone()]);
    sleep(Duration::from_millis(250)).await;
    assert_eq!(backend.connections(), 0);
    assert_eq!(h.checker.is_up(&t.key), Some(true));
    let status = h.status(&t.key);
    assert_eq!(
        (status.checks, status.last_reason.as_str()),
        (0, DISABLED_REASON)
    );
    assert_eq!(h.observed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn switching_a_down_target_to_none_brings_it_up() {
    let addr = closed_port().await;
    let mut h = Harness::new();
    let mut t = target("web", addr, health(HealthKind::Tcp, 50, 1, 1));
    h.checker.set_targets(vec![t.clone()]);
    assert!(!h.transition(Duration::from_millis(50) + MARGIN).await.up);

    t.config.kind = HealthKind::None;
    h.checker.set_targets(vec![t.clone()]);
    let up = h.transition(Duration::from_millis(10)).await;
    assert!(up.up);
    assert_eq!(up.reason, DISABLED_REASON);
    assert_eq!(h.checker.is_up(&t.key), Some(true));
}

#[tokio::test]
async fn unknown_targets_are_none() {
    let h = Harness::new();
    let key = TargetKey {
        service: "x".into(),
        address: [127, 0, 0, 1].into(),
        port: 1,
    };
    assert_eq!(h.checker.is_up(&key), None);
    assert!(h.checker.status().is_empty());
}

#[tokio::test]
async fn shutdown_and_drop_stop_every_task() {
    let first = Backend::tcp().await;
    let second = Backend::tcp().await;
    let mut h = Harness::new();
    let t = target("web", first.addr, health(HealthKind::Tcp, 50, 1, 1));
    h.checker.set_targets(vec![t.clone()]);
    let mut other = Harness::new();
    other.checker.set_targets(vec![target(
        "web",
        second.addr,
        health(HealthKind::Tcp, 50, 1, 1),
    )]);
    eventually(MARGIN, "both checked", || {
        first.connections() > 0 && second.connections() > 0
    })
    .await;

    h.checker.shutdown();
    drop(other);
    assert_eq!(h.checker.is_up(&t.key), None);
    sleep(Duration::from_millis(20)).await;
    let seen = (first.connections(), second.connections());
    sleep(Duration::from_millis(200)).await;
    assert_eq!((first.connections(), second.connections()), seen);
}
