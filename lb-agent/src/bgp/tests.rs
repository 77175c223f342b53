use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use super::*;
use crate::config::{BgpConfig, Config};
use crate::state::ServiceView;

fn config() -> Config {
    toml::from_str(
        r#"
[[service]]
name = "web"
vip = "198.18.100.1:80"
backend = [{ address = "198.18.2.1" }]

[[service]]
name = "web6"
vip = "[fd00:18::100]:80"
backend = [{ address = "fd00:18::2:1" }]

[[service]]
name = "site"
vip = "198.18.100.2:80"
mode = "l7"
backend = [{ address = "198.18.2.1" }]

[[service]]
name = "dns"
vip = "198.18.100.1:53"
protocol = "udp"
backend = [{ address = "198.18.2.1" }]
"#,
    )
    .expect("test config")
}

fn view(name: &str, all_down: bool) -> ServiceView {
    ServiceView {
        name: name.into(),
        active_tier: (!all_down).then_some(0),
        fail_open: all_down,
        all_down,
        backends: Vec::new(),
    }
}

fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
    list.iter().map(|s| s.parse().expect("ip")).collect()
}

#[test]
fn announce_set_follows_fast_path_health_and_l7_proxy() {
    let cfg = config();
    let all_up = [
        view("web", false),
        view("web6", false),
        view("site", false),
        view("dns", false),
    ];
    assert_eq!(
        announce_set(&cfg, &all_up, true, |_| true),
        ips(&["198.18.100.1", "198.18.100.2", "fd00:18::100"])
    );
    // Without a fast path only the running l7 service's VIP.
    assert_eq!(
        announce_set(&cfg, &all_up, false, |_| true),
        ips(&["198.18.100.2"])
    );
    // An l7 service whose proxy does not run is not announced.
    assert_eq!(
        announce_set(&cfg, &all_up, true, |name| name != "site"),
        ips(&["198.18.100.1", "fd00:18::100"])
    );
    // A VIP stays while one service on it can serve; all down withdraws it.
    let web_down = [
        view("web", true),
        view("web6", true),
        view("site", false),
        view("dns", false),
    ];
    assert_eq!(
        announce_set(&cfg, &web_down, true, |_| true),
        ips(&["198.18.100.1", "198.18.100.2"])
    );
    let both_down = [view("web", true), view("site", true), view("dns", true)];
    assert!(announce_set(&cfg, &both_down, true, |_| true).is_empty());
    // A service without a view (not computed) is not announced.
    assert!(announce_set(&cfg, &[], true, |_| true).is_empty());
}

#[test]
fn site_prepend_puts_the_nodes_as_on_every_route() {
    let cfg = BgpConfig {
        site_prepend: 2,
        local_as: Some(65001),
        ..BgpConfig::default()
    };
    assert_eq!(site_prepend(&cfg), Some((65001, 2)));
    assert_eq!(site_prepend(&BgpConfig::default()), None);
    let text = render_with(&ips(&["198.18.100.1", "fd00:18::100"]), site_prepend(&cfg));
    let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        body,
        [
            "protocol static xdplb_vips {",
            "  ipv4;",
            "  route 198.18.100.1/32 blackhole { bgp_path.prepend(65001); bgp_path.prepend(65001); };",
            "}",
            "protocol static xdplb_vips6 {",
            "  ipv6;",
            "  route fd00:18::100/128 blackhole { bgp_path.prepend(65001); bgp_path.prepend(65001); };",
            "}",
        ]
    );
    assert!(text.contains("# bgp.site_prepend = 2: AS 65001"), "{text}");
    // No prepend: exactly the plain rendering.
    let set = ips(&["198.18.100.1"]);
    assert_eq!(render_with(&set, None), render(&set));
}

#[test]
fn render_writes_one_static_protocol_per_family() {
    let text = render(&ips(&["198.18.100.2", "fd00:18::100", "198.18.100.1"]));
    let body: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        body,
        [
            "protocol static xdplb_vips {",
            "  ipv4;",
            "  route 198.18.100.1/32 blackhole;",
            "  route 198.18.100.2/32 blackhole;",
            "}",
            "protocol static xdplb_vips6 {",
            "  ipv6;",
            "  route fd00:18::100/128 blackhole;",
            "}",
        ]
    );
    let empty = render(&BTreeSet::new());
    let body: Vec<&str> = empty.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        body,
        [
            "protocol static xdplb_vips {",
            "  ipv4;",
            "}",
            "protocol static xdplb_vips6 {",
            "  ipv6;",
            "}",
        ]
    );
}

/// A fake `birdc` that logs each call and answers like BIRD 2 (`answer`).
fn fake_birdc(dir: &Path, answer: &str) -> PathBuf {
    let path = dir.join("birdc");
    let log = dir.join("calls");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nprintf '%s\\n' '{answer}'\n",
            log.display()
        ),
    )
    .expect("write fake birdc");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn calls(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn bgp(dir: &Path) -> BgpConfig {
    BgpConfig {
        bird_socket: dir.join("bird.ctl"),
        include_file: dir.join("xdplb.conf"),
        drain_s: 0,
        ..BgpConfig::default()
    }
}

#[test]
fn announcer_configures_only_on_change_and_drains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let birdc = fake_birdc(
        dir.path(),
        "Reading configuration from /x/bird.conf\nReconfigured",
    );
    let cfg = bgp(dir.path());
    let mut a = Announcer::with_birdc(cfg.clone(), birdc);
    assert_eq!(a.status().bird, BirdState::Pending);
    let set = ips(&["198.18.100.1"]);
    assert_eq!(a.update(set.clone()), Ok(true));
    let sock = cfg.bird_socket.display().to_string();
    assert_eq!(calls(dir.path()), [format!("-s {sock} configure")]);
    assert_eq!(
        std::fs::read_to_string(&cfg.include_file).expect("file"),
        render(&set)
    );
    let mode = std::fs::metadata(&cfg.include_file)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    // Same set: no write, no configure.
    assert_eq!(a.update(set.clone()), Ok(false));
    assert_eq!(calls(dir.path()).len(), 1);
    // Drain: the file without routes.
    assert_eq!(a.drain(), Ok(true));
    assert_eq!(
        std::fs::read_to_string(&cfg.include_file).expect("file"),
        render(&BTreeSet::new())
    );
    let st = a.status();
    assert!(st.drained);
    assert!(st.announced.is_empty());
    assert_eq!(st.wanted, ["198.18.100.1".parse::<IpAddr>().expect("ip")]);
    // Changes while drained announce nothing.
    assert_eq!(a.update(ips(&["198.18.100.1", "198.18.100.2"])), Ok(false));
    assert_eq!(calls(dir.path()).len(), 2);
    assert_eq!(a.undrain(), Ok(true));
    assert_eq!(
        a.status().announced,
        ips(&["198.18.100.1", "198.18.100.2"])
            .into_iter()
            .collect::<Vec<_>>()
    );
    assert_eq!(calls(dir.path()).len(), 3);
    assert_eq!(a.status().bird, BirdState::Configured);
}

#[test]
fn a_refusing_or_absent_bird_is_an_error_retried_at_the_next_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let birdc = fake_birdc(
        dir.path(),
        "Reading configuration from /x/bird.conf\n/x/xdplb.conf:3:3 syntax error, unexpected CF_SYM_UNDEFINED",
    );
    let mut a = Announcer::with_birdc(bgp(dir.path()), birdc);
    let set = ips(&["198.18.100.1"]);
    let err = a.update(set.clone()).expect_err("refused");
    assert!(err.contains("syntax error"), "{err}");
    let st = a.status();
    assert_eq!(st.bird, BirdState::Error);
    assert!(
        st.error
            .as_deref()
            .is_some_and(|e| e.contains("syntax error"))
    );
    assert!(st.announced.is_empty());
    assert!(a.failed());
    // The same set is tried again (the last try failed).
    assert!(a.update(set.clone()).is_err());
    assert_eq!(calls(dir.path()).len(), 2);

    // No birdc at all.
    let mut a = Announcer::with_birdc(bgp(dir.path()), dir.path().join("no-such-birdc"));
    let err = a.update(set).expect_err("absent");
    assert!(err.contains("is bird2 installed"), "{err}");

    // The include file's directory does not exist.
    let mut cfg = bgp(dir.path());
    cfg.include_file = dir.path().join("missing/xdplb.conf");
    let mut a = Announcer::with_birdc(cfg, dir.path().join("birdc"));
    let err = a.update(ips(&["198.18.100.1"])).expect_err("no dir");
    assert!(err.contains("writing bgp.include_file"), "{err}");
}
