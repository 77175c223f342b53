//! The test bed itself, without the agent: the step-1 topology routes (client to every
//! LAN host through the router), its pitfall workarounds are in place (TX checksum
//! offload off on host veths, XDP_PASS in native mode on the LB's router-side peer, a
//! bpffs, forwarding on in the router only), HTTP works across namespaces, packet
//! captures count what they should, and everything is removed afterwards.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use xdplb_tests::require_privileges;
use xdplb_tests::{
    capture::{self, Capture, Direction},
    http, netns,
    topology::{BACKEND_ADDRS, LB_ADDR, ROUTER_CLIENT_ADDR, ROUTER_LAN_ADDR, Topology, VIP},
};

fn read_sysctl(ns: &str, key: &str) -> anyhow::Result<String> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    netns::in_netns(ns, move || {
        Ok(std::fs::read_to_string(&path)?.trim().to_owned())
    })
}

#[test]
fn topology_routes_serves_and_cleans_up() -> anyhow::Result<()> {
    require_privileges!();
    let (names, bpffs);
    {
        let topo = Topology::build()?;
        names = topo.namespaces();
        bpffs = topo.bpffs().to_path_buf();
        assert_eq!(names.len(), 6);
        assert!(
            names
                .iter()
                .all(|n| n.len() <= netns::MAX_NAME_LEN && n.starts_with(topo.prefix()))
        );

        // Routing: the client reaches the router, the LB and every backend via the router.
        let timeout = Duration::from_secs(2);
        for target in [ROUTER_CLIENT_ADDR, ROUTER_LAN_ADDR, LB_ADDR]
            .into_iter()
            .chain(BACKEND_ADDRS)
        {
            let rtt = capture::ping(&topo.client.ns, target, timeout)?;
            eprintln!("ping {target} from client: {rtt:?}");
        }

        // Forwarding: on in the router, left at the default (off) in the LB.
        assert_eq!(read_sysctl(&topo.router, "net.ipv4.ip_forward")?, "1");
        assert_eq!(read_sysctl(&topo.lb.ns, "net.ipv4.ip_forward")?, "0");
        for b in &topo.backends {
            assert_eq!(read_sysctl(&b.ns, "net.ipv4.conf.all.arp_ignore")?, "1");
            assert_eq!(read_sysctl(&b.ns, "net.ipv4.conf.all.arp_announce")?, "2");
            let lo = netns::run(&["ip", "-n", &b.ns, "-4", "addr", "show", "dev", "lo"])?;
            assert!(
                lo.contains(&format!("{VIP}/32")),
                "VIP not on {}'s lo: {lo}",
                b.role
            );
        }

        // TX checksum offload off on every host-side veth.
        for h in topo.hosts() {
            let k = netns::exec(&h.ns, &["ethtool", "-k", "eth0"])?;
            assert!(
                k.lines().any(|l| l.trim() == "tx-checksumming: off"),
                "{}: {k}",
                h.role
            );
        }

        // XDP_PASS attached in native mode on the LB's router-side peer.
        let link = netns::run(&[
            "ip",
            "-n",
            &topo.router,
            "-d",
            "link",
            "show",
            "dev",
            &topo.lb.router_port,
        ])?;
        assert!(
            link.contains("prog/xdp id"),
            "no native XDP program on {}: {link}",
            topo.lb.router_port
        );
        assert!(
            !link.contains("xdpgeneric"),
            "XDP attached in generic mode: {link}"
        );

        // bpffs mounted.
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        assert!(
            mounts.lines().any(
                |l| l.split_whitespace().nth(1) == Some(&*bpffs.to_string_lossy())
                    && l.contains(" bpf ")
            ),
            "{} is not a bpffs mount",
            bpffs.display()
        );

        // HTTP across namespaces: client -> each backend's LAN address, through the router,
        // while a capture on the backend's router port counts its replies.
        let servers = topo.start_http_servers()?;
        for (b, server) in topo.backends.iter().zip(&servers) {
            let replies =
                Capture::ipv4_source(&topo.router, &b.router_port, Direction::Incoming, b.addr)?;
            let at_lb = Capture::ipv4_source(&topo.lb.ns, "eth0", Direction::Incoming, b.addr)?;
            let target = SocketAddr::new(IpAddr::V4(b.addr), 80);
            let report = http::run_load(&topo.client.ns, target, 10, 2, Duration::from_secs(30))?;
            assert!(report.all_ok(), "{report:?}");
            assert_eq!(report.per_backend.get(&b.role), Some(&10), "{report:?}");
            assert_eq!(server.requests(), 10);
            std::thread::sleep(Duration::from_millis(100));
            let replies = replies.finish()?;
            let at_lb = at_lb.finish()?;
            // 10 connections: at least SYN-ACK, data and FIN each.
            assert!(
                replies.matched >= 30,
                "{} replies counted: {replies:?}",
                b.role
            );
            assert_eq!(replies.kernel_drops, 0);
            // Unicast to the router: the LB's port on the bridge does not see it (learned MACs),
            // and in any case its stack must not take it.
            assert_eq!(at_lb.matched, 0, "{at_lb:?}");
        }
        assert_eq!(
            http::probe(
                &topo.client.ns,
                SocketAddr::new(IpAddr::V4(BACKEND_ADDRS[2]), 80)
            )?,
            "be3"
        );
    }
    let left: Vec<String> = netns::list_namespaces()?
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    assert!(!bpffs.exists(), "{} left behind", bpffs.display());
    Ok(())
}

#[test]
fn parallel_topologies_do_not_collide() -> anyhow::Result<()> {
    require_privileges!();
    let a = Topology::build()?;
    let b = Topology::build()?;
    assert_ne!(a.prefix(), b.prefix());
    capture::ping(&a.client.ns, BACKEND_ADDRS[0], Duration::from_secs(2))?;
    capture::ping(&b.client.ns, BACKEND_ADDRS[0], Duration::from_secs(2))?;
    let names_a = a.namespaces();
    drop(a);
    // b is unaffected by a's teardown.
    capture::ping(&b.client.ns, BACKEND_ADDRS[1], Duration::from_secs(2))?;
    let listed = netns::list_namespaces()?;
    assert!(names_a.iter().all(|n| !listed.contains(n)));
    assert!(b.namespaces().iter().all(|n| listed.contains(n)));
    Ok(())
}
