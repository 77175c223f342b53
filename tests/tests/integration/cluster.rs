//! `[cluster]` end to end: two LB nodes (agents with XDP attached, in namespaces of the
//! step-1 bed plus a second LB host) share one desired state in a three-member etcd
//! cluster (Debian's etcd-server, members in namespaces, data under the run's folder).
//!
//! One bed, one scenario in steps (starting etcd and two agents costs seconds):
//! an API change on node 1 is applied on node 2 within a second; the rings read back
//! from both fast paths are identical slot for slot; two changes made at once on both
//! nodes: one wins, the other gets 409, both nodes end equal; one etcd member stopped:
//! no effect; a backend unreachable from node 2 only stays in both rings and node 2
//! counts it; unreachable from both: it leaves both rings; every etcd member stopped:
//! writes answer 503 and change nothing, the rings stay, `store: unreachable`, and the
//! nodes resync when etcd returns.
//!
//! Needs root and the release agent (`XDPLB_AGENT_BIN`), like the other namespace tests.

use std::{net::Ipv4Addr, thread, time::Duration};

use anyhow::{Context as _, ensure};
use lb_agent::api::types::RingSlots;
use xdplb_tests::{
    cluster_bed::{
        API, ClusterSection, Node, live_of, log_tail, nft_clear, nft_drop_towards, same_rings,
        start_agent, wait_for, weight_of,
    },
    config::{BackendConfig, LbConfig, ServiceConfig},
    etcd::EtcdCluster,
    http, netns,
    topology::{BACKEND_ADDRS, LB_ADDR, Topology, vip_socket},
};
const LB2_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 20);
const PREFIX: &str = "/xdplb-test";
/// The L7 service with sticky sessions (its VIP is local to each LB node).
const SHOP_VIP: &str = "198.18.100.2:8080";

/// The rings of both nodes, equal slot for slot (named by backend) and in digest.
fn assert_same_rings(a: &Node, b: &Node) -> anyhow::Result<RingSlots> {
    same_rings(a, b, "web", 65537)
}

#[test]
fn two_nodes_share_one_state_in_etcd_and_build_identical_rings() -> anyhow::Result<()> {
    xdplb_tests::require_privileges!();
    // Declared first, dropped last: the namespaces go after every process below.
    let mut topo = Topology::build()?;
    let lb2 = topo.add_lan_host("lb2", LB2_ADDR, true)?;
    let stores = (1..=3u8)
        .map(|i| {
            topo.add_lan_host(&format!("e{i}"), Ipv4Addr::new(198, 18, 1, 30 + i), false)
                .map(|h| (h.ns, h.addr))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let _servers = topo.start_http_servers()?;
    topo.attach_decap()?;
    let mut etcd = EtcdCluster::start(&stores, topo.run_dir(), topo.prefix())?;

    let service = BACKEND_ADDRS.iter().fold(
        ServiceConfig::new("web", vip_socket())
            .health("{ kind = \"tcp\", interval_ms = 200, timeout_ms = 150, rise = 1, fall = 2 }"),
        |s, &a| s.backend(BackendConfig::new(a)),
    );
    let shop = BACKEND_ADDRS.iter().fold(
        ServiceConfig::new("shop", SHOP_VIP.parse()?)
            .mode("l7")
            .extra("sticky = { cookie = \"LBSTICKY\", ttl_s = 3600 }"),
        |s, &a| s.backend(BackendConfig::new(a).port(80)),
    );
    let config = |node: &str, source: Ipv4Addr| {
        LbConfig::new("eth0")
            .source_ipv4(source)
            .sizes(65537, 65536)
            .api_listen(API)
            .service(service.clone())
            .service(shop.clone())
            .section(
                "cluster",
                ClusterSection {
                    node: node.to_owned(),
                    etcd: etcd.endpoints(),
                    prefix: PREFIX.to_owned(),
                },
            )
    };
    topo.start_agent(&config("lb1", LB_ADDR), &Default::default())?;
    let (bpffs, run_dir) = (topo.bpffs().to_owned(), topo.run_dir().to_owned());
    // Declared after the topology: stopped before its namespaces go.
    let (_agent2, log2) = start_agent("lb2", &lb2.ns, &config("lb2", LB2_ADDR), &run_dir, &bpffs)?;
    let n1 = Node {
        name: "lb1".into(),
        ns: topo.lb.ns.clone(),
    };
    let n2 = Node {
        name: "lb2".into(),
        ns: lb2.ns.clone(),
    };
    let [be1, be2, be3] = BACKEND_ADDRS;

    let result = (|| -> anyhow::Result<()> {
        // Both connected, both members of the cluster.
        for n in [&n1, &n2] {
            wait_for(
                &format!("{} connected with 2 members", n.name),
                Duration::from_secs(10),
                || {
                    let c = n.cluster()?;
                    Ok(c.store == "connected" && c.members.len() == 2 && c.revision > 0)
                },
            )?;
        }
        let c = n1.cluster()?;
        ensure!(c.node == "lb1", "{c:?}");
        let names: Vec<&str> = c.members.iter().map(|m| m.node.as_str()).collect();
        ensure!(names == ["lb1", "lb2"], "members {names:?}");
        let m = n1.metrics()?;
        ensure!(
            m.contains("xdplb_cluster_store_up 1"),
            "store_up metric:\n{m}"
        );
        // The file seeded etcd: the service is there, once.
        let keys = etcd.etcdctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{PREFIX}/services/"),
        ])?;
        ensure!(
            keys.split_whitespace().collect::<Vec<_>>()
                == [
                    format!("{PREFIX}/services/shop"),
                    format!("{PREFIX}/services/web")
                ],
            "keys in etcd: {keys}"
        );
        let before = assert_same_rings(&n1, &n2)?;
        println!(
            "rings identical at start: digest {}",
            before.digest.clone().unwrap_or_default()
        );

        // A sticky cookie issued through node 1 is honoured by node 2 (one key, from
        // etcd): the same backend every time, and no new cookie.
        let shop_request = |node: &Node, cookie: Option<String>| {
            netns::in_netns(&node.ns, move || {
                let headers: Vec<(&str, &str)> =
                    cookie.iter().map(|c| ("Cookie", c.as_str())).collect();
                http::request(
                    SHOP_VIP.parse()?,
                    "GET",
                    "/",
                    &headers,
                    None,
                    Duration::from_secs(3),
                )
            })
        };
        let first = shop_request(&n1, None)?;
        ensure!(first.status == 200, "shop through lb1: {}", first.status);
        let cookie = first
            .header("set-cookie")
            .and_then(|c| c.split(';').next())
            .context("lb1 set no sticky cookie")?
            .to_owned();
        let pinned = first.backend().to_owned();
        for _ in 0..5 {
            let r = shop_request(&n2, Some(cookie.clone()))?;
            ensure!(
                r.status == 200 && r.backend() == pinned && r.header("set-cookie").is_none(),
                "lb2 did not honour lb1's cookie {cookie}: {} from {} (pinned {pinned}), set-cookie {:?}",
                r.status,
                r.backend(),
                r.header("set-cookie")
            );
        }
        println!("sticky cookie from lb1 honoured by lb2 (backend {pinned})");

        // An API change on node 1 is applied on node 2 within a second.
        let (status, body) = n1.patch("web", be2, r#"{"weight": 300}"#)?;
        ensure!(status == 200, "PATCH on lb1: {status} {body}");
        let took = wait_for("lb2 applies lb1's change", Duration::from_secs(1), || {
            Ok(weight_of(&n2.service("web")?, be2) == Some(300))
        })?;
        println!("lb1's change applied on lb2 after {} ms", took.as_millis());
        wait_for(
            "rings equal after the change",
            Duration::from_secs(1),
            || Ok(n1.service("web")?.ring_digest == n2.service("web")?.ring_digest),
        )?;
        let after = assert_same_rings(&n1, &n2)?;
        ensure!(
            after.digest != before.digest,
            "the weight change did not change the ring"
        );
        let share = after
            .slots
            .iter()
            .filter(|s| s.starts_with(&be2.to_string()))
            .count();
        ensure!(
            share > 65537 * 55 / 100,
            "be2 (weight 300 of 500) holds {share} slots"
        );

        // Changes made at once on both nodes: never both applied over each other; at
        // least one round shows the 409; both nodes end with the winner's value.
        let mut conflicts = 0;
        for round in 0..20u32 {
            let (w1, w2) = (100 + round, 200 + round);
            let (a, b) = (n1.clone(), n2.clone());
            let t1 = thread::spawn(move || a.patch("web", be1, &format!(r#"{{"weight": {w1}}}"#)));
            let t2 = thread::spawn(move || b.patch("web", be1, &format!(r#"{{"weight": {w2}}}"#)));
            let (r1, r2) = (t1.join().expect("thread")?, t2.join().expect("thread")?);
            for (s, body) in [&r1, &r2] {
                ensure!(
                    *s == 200 || *s == 409,
                    "concurrent PATCH answered {s} {body}"
                );
                if *s == 409 {
                    ensure!(body.contains("changed concurrently"), "409 body: {body}");
                }
            }
            ensure!(r1.0 == 200 || r2.0 == 200, "round {round}: both refused");
            let winner = match (r1.0, r2.0) {
                (200, 409) => Some(w1),
                (409, 200) => Some(w2),
                _ => None, // both succeeded, one after the other: the later one holds
            };
            if winner.is_some() {
                conflicts += 1;
            }
            wait_for(
                "both nodes agree on be1's weight",
                Duration::from_secs(2),
                || {
                    let (x, y) = (
                        weight_of(&n1.service("web")?, be1),
                        weight_of(&n2.service("web")?, be1),
                    );
                    Ok(x == y && winner.is_none_or(|w| x == Some(w)))
                },
            )?;
            if conflicts >= 3 {
                break;
            }
        }
        println!("concurrent changes: {conflicts} round(s) ended in 409 for one node");
        ensure!(
            conflicts > 0,
            "20 rounds of simultaneous changes never met a 409"
        );
        let (s, b) = n1.patch("web", be1, r#"{"weight": 100}"#)?;
        ensure!(s == 200, "{s} {b}");

        // One etcd member stopped: no effect on writes or their spread.
        etcd.stop(0)?;
        let (s, b) = n2.patch("web", be2, r#"{"weight": 200}"#)?;
        ensure!(s == 200, "PATCH with one etcd member down: {s} {b}");
        let took = wait_for(
            "lb1 applies lb2's change with one member down",
            Duration::from_secs(1),
            || Ok(weight_of(&n1.service("web")?, be2) == Some(200)),
        )?;
        println!(
            "one etcd member down: change applied on the other node after {} ms",
            took.as_millis()
        );
        for n in [&n1, &n2] {
            ensure!(
                n.cluster()?.store == "connected",
                "{} lost the store with one member down",
                n.name
            );
        }
        etcd.restart(0)?;
        etcd.wait_healthy(Duration::from_secs(15))?;
        assert_same_rings(&n1, &n2)?;

        // be3 unreachable from lb2 only: it stays in both rings, lb2 counts it.
        nft_drop_towards(&n2.ns, be3)?;
        wait_for("lb2 sees be3 down locally", Duration::from_secs(5), || {
            Ok(live_of(&n2.service("web")?, be3).local_down)
        })?;
        thread::sleep(Duration::from_millis(500));
        for n in [&n1, &n2] {
            let live = live_of(&n.service("web")?, be3);
            ensure!(
                live.serving && live.healthy,
                "{}: be3 left the ring on one node's view: {live:?}",
                n.name
            );
        }
        ensure!(
            !live_of(&n1.service("web")?, be3).local_down,
            "lb1 counts be3 down"
        );
        let ring = assert_same_rings(&n1, &n2)?;
        ensure!(
            ring.slots.iter().any(|s| s.starts_with(&be3.to_string())),
            "be3 has no slot"
        );
        let m = n2.metrics()?;
        let line = format!("xdplb_backend_local_down{{service=\"web\",backend=\"{be3}:80\"}} 1");
        ensure!(m.contains(&line), "lb2's metrics lack {line}");
        // lb2 publishes its view through etcd; its session may still be setting itself
        // up again after the member restart above (a new lease, then the view), so lb1
        // sees it within a while, not at once.
        let down = [format!("web/{be3}:80")];
        let mut last = None;
        let took = wait_for(
            "lb1 sees lb2's published view",
            Duration::from_secs(10),
            || {
                let c = n1.cluster()?;
                let seen = c.members.iter().any(|m| m.node == "lb2" && m.down == down);
                last = Some(c);
                Ok(seen)
            },
        )
        .with_context(|| format!("lb2's published view, as lb1 last read it: {last:?}"))?;
        println!(
            "lb2's view (be3 down) seen by lb1 after {} ms",
            took.as_millis()
        );

        // Unreachable from both: a majority, it leaves both rings.
        nft_drop_towards(&n1.ns, be3)?;
        let took = wait_for("be3 leaves both rings", Duration::from_secs(5), || {
            Ok(!live_of(&n1.service("web")?, be3).serving
                && !live_of(&n2.service("web")?, be3).serving)
        })?;
        println!(
            "be3 down on both nodes: out of both rings after {} ms",
            took.as_millis()
        );
        wait_for("rings equal without be3", Duration::from_secs(1), || {
            Ok(n1.service("web")?.ring_digest == n2.service("web")?.ring_digest)
        })?;
        let ring = assert_same_rings(&n1, &n2)?;
        ensure!(
            !ring.slots.iter().any(|s| s.starts_with(&be3.to_string())),
            "be3 still has slots"
        );
        nft_clear(&n1.ns)?;
        nft_clear(&n2.ns)?;
        wait_for("be3 back in both rings", Duration::from_secs(5), || {
            Ok(live_of(&n1.service("web")?, be3).serving
                && live_of(&n2.service("web")?, be3).serving)
        })?;
        wait_for("rings equal with be3", Duration::from_secs(1), || {
            Ok(n1.service("web")?.ring_digest == n2.service("web")?.ring_digest)
        })?;
        let kept = assert_same_rings(&n1, &n2)?;

        // Every etcd member stopped: unreachable, writes 503 and nothing changes.
        for i in 0..3 {
            etcd.stop(i)?;
        }
        let took = wait_for(
            "both nodes say the store is unreachable",
            Duration::from_secs(10),
            || Ok(n1.cluster()?.store == "unreachable" && n2.cluster()?.store == "unreachable"),
        )?;
        println!(
            "all etcd members down: both nodes report it after {} ms",
            took.as_millis()
        );
        ensure!(
            n1.metrics()?.contains("xdplb_cluster_store_up 0"),
            "store_up metric not 0"
        );
        let before = n1.service("web")?;
        let (s, b) = n1.patch("web", be2, r#"{"weight": 50}"#)?;
        ensure!(s == 503, "PATCH without etcd: {s} {b}");
        let (s, b) = n2.call("DELETE", "/api/v1/services/web", None)?;
        ensure!(s == 503, "DELETE without etcd: {s} {b}");
        ensure!(
            weight_of(&n1.service("web")?, be2) == weight_of(&before, be2),
            "the refused change changed the weight"
        );
        let ring = assert_same_rings(&n1, &n2)?;
        ensure!(
            ring.slots == kept.slots,
            "the rings changed while etcd was away"
        );

        // etcd back: both resync and take writes again.
        for i in 0..3 {
            etcd.restart(i)?;
        }
        etcd.wait_healthy(Duration::from_secs(20))?;
        let took = wait_for("both nodes reconnect", Duration::from_secs(10), || {
            Ok(n1.cluster()?.store == "connected" && n2.cluster()?.store == "connected")
        })?;
        println!(
            "etcd back: both nodes connected again after {} ms",
            took.as_millis()
        );
        let (s, b) = n2.patch("web", be2, r#"{"weight": 120}"#)?;
        ensure!(s == 200, "PATCH after etcd returned: {s} {b}");
        wait_for("lb1 applies it", Duration::from_secs(1), || {
            Ok(weight_of(&n1.service("web")?, be2) == Some(120))
        })?;
        wait_for("rings equal at the end", Duration::from_secs(1), || {
            Ok(n1.service("web")?.ring_digest == n2.service("web")?.ring_digest)
        })?;
        assert_same_rings(&n1, &n2)?;
        Ok(())
    })();
    if let Err(e) = &result {
        eprintln!(
            "--- lb1's log (tail):\n{}\n--- lb2's log (tail):\n{}",
            topo.agent_log_tail(40),
            log_tail(&log2, 40)
        );
        eprintln!("error: {e:#}");
    }
    result
}
