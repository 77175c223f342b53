//! The agent's netlink side in namespaces, without the agent binary:
//!
//! - the next-hop keeper (`lb_agent::dataplane::neigh`) run inside the LB namespace of
//!   the step-1 test bed makes a managed neighbour entry for each backend's next hop,
//!   makes it again within well under a second after `ip neigh del`, follows a route
//!   change, leaves entries others made alone, leaves its entries in place when stopped
//!   (hitless restart) so that the next keeper adopts them, and removes them on clear;
//! - `lb_agent::l7::vip::LocalVips` adds l7 VIPs to `lo` and removes only those it added.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use anyhow::Context as _;
use lb_agent::{
    dataplane::neigh::{NextHopKeeper, PROTOCOL},
    l7::vip::LocalVips,
};
use tokio::sync::{oneshot, watch};
use xdplb_tests::{
    netns::{self, NetnsGuard},
    topology::{BACKEND_ADDRS, ROUTER_LAN_ADDR, Topology, TopologyOptions},
};

/// How long the keeper may take to make its first entries (routes asked, table read).
const FIRST_PASS: Duration = Duration::from_secs(3);
/// "Promptly": a deleted entry or a route change is handled within this.
const PROMPTLY: Duration = Duration::from_secs(1);

/// `ip -n NS neigh show` lines for `addr`.
fn neigh_line(ns: &str, addr: IpAddr) -> anyhow::Result<Option<String>> {
    let out = netns::run(&["ip", "-n", ns, "neigh", "show", "to", &addr.to_string()])?;
    Ok(out
        .lines()
        .find(|l| l.starts_with(&format!("{addr} ")))
        .map(str::to_owned))
}

/// Whether `ns` has a managed entry made by an xdplb agent for `addr`.
fn has_ours(ns: &str, addr: IpAddr) -> anyhow::Result<bool> {
    Ok(neigh_line(ns, addr)?.is_some_and(|l| {
        l.contains(" managed ") && l.trim_end().ends_with(&format!("proto {PROTOCOL}"))
    }))
}

/// A keeper running on its own thread (and tokio runtime) inside namespace `ns`.
struct KeeperThread {
    end: Option<oneshot::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl KeeperThread {
    fn start(ns: &str, backends: watch::Receiver<BTreeSet<IpAddr>>) -> anyhow::Result<Self> {
        let (end, ended) = oneshot::channel::<bool>();
        let thread = netns::spawn_in_netns(ns, "next-hop-keeper", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let keeper = NextHopKeeper::spawn(backends, None)?;
                // The test thread decides how the keeper ends: clear (detach) or stop.
                if ended.await.unwrap_or(false) {
                    keeper.clear().await;
                } else {
                    keeper.stop().await;
                }
                Ok(())
            })
        })?;
        Ok(Self {
            end: Some(end),
            thread: Some(thread),
        })
    }

    fn finish(mut self, clear: bool) -> anyhow::Result<()> {
        if let Some(end) = self.end.take() {
            let _ = end.send(clear);
        }
        match self.thread.take().expect("joined once").join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for KeeperThread {
    fn drop(&mut self) {
        // On a failed assertion: end the keeper (its namespace goes with the topology).
        if let Some(end) = self.end.take() {
            let _ = end.send(false);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn next_hop_keeper_makes_keeps_follows_and_clears_managed_entries() -> anyhow::Result<()> {
    xdplb_tests::require_privileges!();
    let topo = Topology::build_with(&TopologyOptions {
        peer_xdp_pass: false,
        ..TopologyOptions::default()
    })?;
    let lb = topo.lb.ns.clone();
    let [be1, be2, be3] = BACKEND_ADDRS.map(IpAddr::V4);
    let router = IpAddr::V4(ROUTER_LAN_ADDR);

    // be3's next hop has a static entry someone else made: it does the job and stays.
    netns::static_neighbour(&lb, be3, [0x02, 0, 0, 0, 0, 0x13], "eth0")?;
    let static_be3 = neigh_line(&lb, be3)?.context("the static entry for be3")?;

    let (backends, watched) = watch::channel(BTreeSet::from([be1, be2, be3]));
    let keeper = KeeperThread::start(&lb, watched)?;
    for b in [be1, be2] {
        let took = poll(&format!("managed entry for {b}"), FIRST_PASS, || {
            has_ours(&lb, b)
        })?;
        eprintln!("managed entry for {b} after {took:?}");
    }
    assert_eq!(neigh_line(&lb, be3)?.as_deref(), Some(static_be3.as_str()));

    // Deleted under the keeper: made again at once (neighbour notification).
    netns::run(&[
        "ip",
        "-n",
        &lb,
        "neigh",
        "del",
        &be1.to_string(),
        "dev",
        "eth0",
    ])?;
    let took = poll("managed entry for be1 made again", PROMPTLY, || {
        has_ours(&lb, be1)
    })?;
    eprintln!("entry for {be1} made again {took:?} after `ip neigh del`");

    // Replaced by an ordinary entry (which the kernel may let go): made managed again.
    netns::run(&[
        "ip",
        "-n",
        &lb,
        "neigh",
        "replace",
        &be1.to_string(),
        "dev",
        "eth0",
        "lladdr",
        "02:00:00:00:00:11",
        "nud",
        "stale",
    ])?;
    let took = poll("be1's entry managed again after replace", PROMPTLY, || {
        has_ours(&lb, be1)
    })?;
    eprintln!("entry for {be1} managed again {took:?} after `ip neigh replace ... nud stale`");

    // A route change: be2 is now reached through the router, whose entry is kept
    // instead, and be2's own entry (ours, no longer needed) goes.
    netns::run(&[
        "ip",
        "-n",
        &lb,
        "route",
        "add",
        &format!("{be2}/32"),
        "via",
        &router.to_string(),
        "dev",
        "eth0",
    ])?;
    let took = poll(
        "the router kept resolved after the route change",
        PROMPTLY,
        || Ok(has_ours(&lb, router)? && neigh_line(&lb, be2)?.is_none()),
    )?;
    eprintln!("route change followed in {took:?}");

    // A backend removed: its entry goes; the static entry stays.
    backends.send_replace(BTreeSet::from([be2, be3]));
    poll("be1's entry removed with its backend", PROMPTLY, || {
        Ok(neigh_line(&lb, be1)?.is_none())
    })?;
    assert!(has_ours(&lb, router)?);
    assert_eq!(neigh_line(&lb, be3)?.as_deref(), Some(static_be3.as_str()));

    // Stopped (hitless restart): the entries stay for the next agent...
    keeper.finish(false)?;
    assert!(
        has_ours(&lb, router)?,
        "entry gone after stop: {:?}",
        neigh_line(&lb, router)?
    );
    // ...whose keeper adopts them, and removes them on clear (detach).
    let (_backends, watched) = watch::channel(BTreeSet::from([be2, be3]));
    let keeper = KeeperThread::start(&lb, watched)?;
    // Its first pass has run once an entry it must make is there: delete one to see it.
    netns::run(&[
        "ip",
        "-n",
        &lb,
        "neigh",
        "del",
        &router.to_string(),
        "dev",
        "eth0",
    ])?;
    poll(
        "the second keeper keeps the router resolved",
        FIRST_PASS,
        || has_ours(&lb, router),
    )?;
    keeper.finish(true)?;
    assert_eq!(neigh_line(&lb, router)?, None, "entry left after clear");
    assert_eq!(neigh_line(&lb, be3)?.as_deref(), Some(static_be3.as_str()));
    Ok(())
}

/// `ip -n NS addr show dev lo`.
fn lo_addrs(ns: &str) -> anyhow::Result<String> {
    netns::run(&["ip", "-n", ns, "addr", "show", "dev", "lo"])
}

#[test]
fn l7_vips_are_added_to_lo_and_only_those_removed() -> anyhow::Result<()> {
    xdplb_tests::require_privileges!();
    let mut guard = NetnsGuard::new()?;
    let ns = guard.create("vip")?;
    // An address someone else put on lo: already local, never removed by the agent.
    netns::run(&[
        "ip",
        "-n",
        &ns,
        "addr",
        "add",
        "198.18.100.2/32",
        "dev",
        "lo",
    ])?;
    let v4: IpAddr = "198.18.100.1".parse()?;
    let v6: IpAddr = "fd00:18::100".parse()?;
    let theirs: IpAddr = "198.18.100.2".parse()?;
    let check = ns.clone();
    netns::in_netns(&ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut vips = LocalVips::default();
            for vip in [v4, v6, theirs, "127.0.0.1".parse()?] {
                vips.ensure(vip).await?;
            }
            assert_eq!(vips.added(), &BTreeSet::from([v4, v6]));
            let lo = lo_addrs(&check)?;
            for a in ["198.18.100.1/32", "fd00:18::100/128", "198.18.100.2/32"] {
                assert!(lo.contains(a), "{a} not on lo: {lo}");
            }

            vips.retain(&BTreeSet::from([v6, theirs])).await;
            let lo = lo_addrs(&check)?;
            assert!(!lo.contains("198.18.100.1/32"), "{lo}");
            assert!(lo.contains("fd00:18::100/128"), "{lo}");

            vips.clear().await;
            let lo = lo_addrs(&check)?;
            assert!(!lo.contains("fd00:18::100/128"), "{lo}");
            assert!(
                lo.contains("198.18.100.2/32"),
                "not ours, yet removed: {lo}"
            );
            assert!(vips.added().is_empty());
            anyhow::Ok(())
        })
    })
}

/// [`xdplb_tests::load::wait_for`], polling every 5 ms.
fn poll(
    what: &str,
    limit: Duration,
    cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    xdplb_tests::load::wait_for(what, limit, Duration::from_millis(5), cond)
}
