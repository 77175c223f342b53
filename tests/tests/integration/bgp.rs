//! Announcing VIPs through real BIRD 2 daemons (issue 10, item 1), without the agent
//! binary: the agent's announcer (`lb_agent::bgp::Announcer`) writes the include file of
//! an LB-side BIRD in one namespace, which peers over BGP with a router's BIRD in
//! another; the test reads the router's table with `birdc show route`.
//!
//! - an announced VIP arrives at the router as a BGP route from the LB node;
//! - a node drain withdraws it, undrain brings it back, a changed set follows;
//! - a dead LB BIRD is reported (status `error`) and the next update after it returns
//!   announces again.
//!
//! The BIRDs run in the foreground under [`netns::ChildGuard`]s declared after the
//! [`NetnsGuard`], so they are stopped before the namespaces go, also on a panic.

use std::{collections::BTreeSet, net::IpAddr, path::Path, time::Duration};

use lb_agent::{
    bgp::{Announcer, BirdState, render},
    config::BgpConfig,
};
use xdplb_tests::{
    bird::{self, Bird},
    netns::{self, NetnsGuard},
};

const LB_ADDR: &str = "198.18.50.1";
const RTR_ADDR: &str = "198.18.50.2";
const VIP1: &str = "198.18.100.1";
const VIP2: &str = "198.18.100.2";
/// BGP's first session comes up in a few seconds (connect retry, OPEN, KEEPALIVE).
const SESSION_UP: Duration = Duration::from_secs(30);
/// An UPDATE reaches the router well within this once the session is up.
const PROPAGATE: Duration = Duration::from_secs(10);

/// Whether the router has a BGP route from the LB node for `vip`.
fn router_has(sock: &Path, vip: &str) -> anyhow::Result<bool> {
    bird::has_route(sock, &format!("{vip}/32"), "lbnode")
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().expect("ip")).collect()
}

#[test]
fn announced_vips_reach_the_router_and_drain_withdraws_them() -> anyhow::Result<()> {
    xdplb_tests::require_privileges!();
    bird::require()?;
    let mut guard = NetnsGuard::new()?;
    let lb = guard.create("lb")?;
    let rtr = guard.create("rtr")?;
    netns::run(&[
        "ip", "-n", &lb, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns",
        &rtr,
    ])?;
    for (ns, addr) in [(&lb, LB_ADDR), (&rtr, RTR_ADDR)] {
        netns::run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        netns::run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
    }
    let dir = guard.run_dir().to_path_buf();
    let include = dir.join("xdplb.conf");
    // `include` of a missing file is a config error: the empty announcement first.
    std::fs::write(&include, render(&BTreeSet::new()))?;

    // `router` is a reserved word in BIRD: the protocols are `upstream` and `lbnode`.
    let mut lb_bird = Bird::start(
        &lb,
        &dir,
        "lb",
        &format!(
            "router id {LB_ADDR};\nprotocol device {{}}\ninclude \"{}\";\n\
             protocol bgp upstream {{\n  local {LB_ADDR} as 65001;\n  neighbor {RTR_ADDR} as 65000;\n\
               ipv4 {{ import none; export where proto = \"xdplb_vips\"; }};\n}}\n",
            include.display()
        ),
    )?;
    let rtr_bird = Bird::start(
        &rtr,
        &dir,
        "rtr",
        &format!(
            "router id {RTR_ADDR};\nprotocol device {{}}\n\
             protocol bgp lbnode {{\n  local {RTR_ADDR} as 65000;\n  neighbor {LB_ADDR} as 65001;\n\
               ipv4 {{ import all; export none; }};\n}}\n"
        ),
    )?;
    let (lb_sock, rtr_sock) = (lb_bird.socket.clone(), rtr_bird.socket.clone());
    let up = poll("the BGP session", SESSION_UP, || {
        rtr_bird.established("lbnode")
    })?;
    eprintln!("BGP session established after {up:?}");

    let mut announcer = Announcer::new(BgpConfig {
        bird_socket: lb_sock.clone(),
        include_file: include.clone(),
        drain_s: 0,
        ..BgpConfig::default()
    });
    assert!(!router_has(&rtr_sock, VIP1)?, "nothing announced yet");
    assert_eq!(announcer.update(ips(&[VIP1])), Ok(true));
    let t = poll("VIP1 at the router", PROPAGATE, || {
        router_has(&rtr_sock, VIP1)
    })?;
    eprintln!("announced VIP at the router after {t:?}");
    let route = rtr_bird.birdc(&["show", "route", &format!("{VIP1}/32"), "all"])?;
    assert!(route.contains(&format!("via {LB_ADDR}")), "{route}");
    assert!(route.contains("BGP.as_path: 65001"), "{route}");
    // The same set again: nothing written, nothing reconfigured.
    assert_eq!(announcer.update(ips(&[VIP1])), Ok(false));

    // Node drain: withdrawn; a change while drained announces nothing.
    assert_eq!(announcer.drain(), Ok(true));
    poll("VIP1 withdrawn by the drain", PROPAGATE, || {
        Ok(!router_has(&rtr_sock, VIP1)?)
    })?;
    assert_eq!(announcer.update(ips(&[VIP1, VIP2])), Ok(false));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!router_has(&rtr_sock, VIP2)?, "announced while drained");
    assert!(announcer.status().announced.is_empty());

    // Undrain: both come (back).
    assert_eq!(announcer.undrain(), Ok(true));
    poll("VIP1 and VIP2 after undrain", PROPAGATE, || {
        Ok(router_has(&rtr_sock, VIP1)? && router_has(&rtr_sock, VIP2)?)
    })?;
    // A service that can no longer serve: its VIP alone goes.
    assert_eq!(announcer.update(ips(&[VIP2])), Ok(true));
    poll("VIP1 withdrawn", PROPAGATE, || {
        Ok(!router_has(&rtr_sock, VIP1)? && router_has(&rtr_sock, VIP2)?)
    })?;

    // The LB's BIRD is gone: the update fails clearly and is shown; forwarding is not
    // the announcer's business (nothing else depends on it).
    lb_bird.stop()?;
    let err = announcer
        .update(ips(&[VIP1, VIP2]))
        .expect_err("BIRD is not running");
    assert!(err.contains("Unable to connect"), "{err}");
    let status = announcer.status();
    assert_eq!(status.bird, BirdState::Error);
    assert!(status.error.is_some());
    Ok(())
}

/// [`xdplb_tests::load::wait_for`], polling every 50 ms.
fn poll(
    what: &str,
    limit: Duration,
    cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    xdplb_tests::load::wait_for(what, limit, Duration::from_millis(50), cond)
}
