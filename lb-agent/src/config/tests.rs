//! The config tests: whole documents, each rule, the API side, and the reader's
//! plumbing.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use super::model::DEFAULT_MAX_OBJECT_BYTES;
use super::read::{self, position};
use super::rules::{is_prime, next_prime};
use super::*;

/// The example of DESIGN.md, verbatim.
const DESIGN_EXAMPLE: &str = r#"[agent]
interface = "eth0"
api_listen = "127.0.0.1:9090"      # a non-loopback address requires api_token_file
api_token_file = "/etc/lb/token"   # optional on loopback
state_dir = "/var/lib/lb-agent"
bpffs = "/sys/fs/bpf"              # pins under <bpffs>/xdplb/<netns id>/<interface>/: hosts in different namespaces can share one bpffs

[dataplane]
xdp_mode = "auto"
encap = "ipip"                     # ipip | gue
source_ipv4 = "198.18.1.10"        # outer source address of tunnelled packets
source_ipv6 = "fd00:18::10"
ring_size = 65537                  # Maglev table size per service (prime)
flow_table_size = 1000000

[[service]]
name = "web"
vip = "198.18.100.1:80"            # [v6]:port accepted too
protocol = "tcp"                   # tcp | udp
mode = "l4"                        # l4 (XDP) | l7 (HTTP proxy)
scheduler = "maglev"               # maglev | source-ip (affinity) ; l7: round-robin | least-request | p2c | hash
health = { kind = "http", path = "/healthz", interval_ms = 500, timeout_ms = 300, rise = 2, fall = 2 }
backend = [
  { address = "198.18.2.11", port = 80, weight = 100, tier = 0 },
  { address = "198.18.2.12", port = 80, weight = 100, tier = 1 },   # tier 1 serves only when tier 0 has none healthy
]
# l7 only:
sticky = { cookie = "LBSTICKY", ttl_s = 3600 }
cache = { max_bytes = 268435456 }
"#;

const L7_EXTRAS: &str =
    "sticky = { cookie = \"LBSTICKY\", ttl_s = 3600 }\ncache = { max_bytes = 268435456 }\n";

/// A dataplane section that satisfies l4 IPv4 services.
const DP: &str = "[dataplane]\nsource_ipv4 = \"198.18.1.10\"\n";

fn errors(text: &str) -> Vec<ConfigError> {
    match Config::parse(text, "test.toml") {
        Ok(cfg) => panic!("expected errors, parsed {cfg:#?}"),
        Err(ConfigErrors(errors)) => errors,
    }
}

fn parse_ok(text: &str) -> Config {
    Config::parse(text, "test.toml").unwrap_or_else(|e| panic!("unexpected errors:\n{e}"))
}

/// `(line, key)` of each error.
fn places(errors: &[ConfigError]) -> Vec<(usize, &str)> {
    errors
        .iter()
        .map(|e| (e.line.unwrap_or(0), e.key.as_str()))
        .collect()
}

/// Asserts that `text` is rejected with exactly one error, at `key`, whose
/// message contains `needle`.
fn assert_single(text: &str, key: &str, needle: &str) -> ConfigError {
    let errors = errors(text);
    assert_eq!(
        errors.len(),
        1,
        "expected one error, got:\n{}",
        ConfigErrors(errors.clone())
    );
    let error = errors.into_iter().next().expect("one error");
    assert_eq!(error.key, key, "{error}");
    assert!(error.message.contains(needle), "{error:?} lacks {needle:?}");
    assert!(error.line.is_some(), "{error:?} has no line");
    error
}

/// An l4 IPv4 service `web` on 198.18.100.1:80 with extra lines, after [`DP`].
fn l4(body: &str) -> String {
    format!("{DP}[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n{body}\n")
}

/// An l7 service `web` on 198.18.100.1:80 with extra lines.
fn l7(body: &str) -> String {
    format!("[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\nmode = \"l7\"\n{body}\n")
}

fn backend(address: &str, port: u16, weight: u32, tier: u8) -> BackendConfig {
    BackendConfig {
        quic_id: None,
        address: address.parse().expect("address"),
        port,
        weight,
        tier,
    }
}

fn service(name: &str, vip: &str) -> ServiceConfig {
    ServiceConfig {
        quic: false,
        backend_protocol: crate::config::BackendProtocol::Http1,
        backend_tls: None,
        name: name.to_owned(),
        vip: vip.parse().expect("vip"),
        protocol: Protocol::Tcp,
        mode: Mode::L4,
        scheduler: Scheduler::Maglev,
        health: HealthConfig::default(),
        backends: vec![backend("198.18.2.11", 80, 100, 0)],
        sticky: None,
        cache: None,
        slow_start_s: 0,
        on_all_down: AllDown::FailOpen,
        hash_on: HashOn::Client,
        tls: None,
        http: HttpConfig::default(),
        deny: Vec::new(),
        allow: Vec::new(),
        new_flows_per_source: None,
    }
}

fn dp() -> DataplaneConfig {
    DataplaneConfig {
        source_ipv4: Some(Ipv4Addr::new(198, 18, 1, 10)),
        ..DataplaneConfig::default()
    }
}

// --- whole documents -------------------------------------------------------

#[test]
fn l7_and_control_keys_are_checked() {
    let text = l7(concat!(
        "hash_on = \"header:x user\"\n",
        "tls = { cert = \"/nonexistent.pem\", key = \"/nonexistent.key\" }\n",
        "http = { retries = 99, eject_max_ms = 5, max_header_bytes = 10 }\n",
        "on_all_down = \"dorp\"\n",
        "slow_start_s = 100000\n",
    ));
    let errs = errors(&text);
    assert_eq!(
        places(&errs),
        [
            (5, "service[0].hash_on"),
            (6, "service[0].tls.cert"),
            (6, "service[0].tls.key"),
            (7, "service[0].http.retries"),
            (7, "service[0].http.eject_max_ms"),
            (7, "service[0].http.max_header_bytes"),
            (8, "service[0].on_all_down"),
            (9, "service[0].slow_start_s"),
        ],
        "{errs:?}"
    );
    assert!(errs[6].message.contains("did you mean \"drop\""));
    // hash_on needs the hash scheduler; tls and http only in l7.
    let errs = errors(&l7("hash_on = \"cookie:s\""));
    assert_eq!(places(&errs), [(5, "service[0].hash_on")], "{errs:?}");
    let errs = errors(&l4("http = { retries = 1 }"));
    assert!(
        errs.iter()
            .any(|e| e.key == "service[0].http" && e.message.contains("only for mode")),
        "{errs:?}"
    );
    // Good values parse.
    let cfg = parse_ok(&l7(concat!(
        "scheduler = \"hash\"\nhash_on = \"cookie:session\"\n",
        "on_all_down = \"drop\"\nslow_start_s = 30\n",
        "http = { retries = 0, eject_after = 0 }\n",
    )));
    let svc = &cfg.services[0];
    assert_eq!(svc.hash_on, HashOn::Cookie("session".into()));
    assert_eq!(svc.on_all_down, AllDown::Drop);
    assert_eq!(svc.slow_start_s, 30);
    assert_eq!((svc.http.retries, svc.http.eject_after), (0, 0));
    assert_eq!(
        svc.http.connect_timeout_ms,
        HttpConfig::default().connect_timeout_ms
    );
}

#[test]
fn design_example_rejects_only_the_l7_extras_in_its_l4_service() {
    let errors = errors(DESIGN_EXAMPLE);
    assert_eq!(
        places(&errors),
        [(28, "service[0].sticky"), (29, "service[0].cache")],
        "{}",
        ConfigErrors(errors.clone())
    );
    assert!(
        errors
            .iter()
            .all(|e| e.message.contains("only for mode = \"l7\""))
    );
}

#[test]
fn design_example_parses_with_defaults_filled() {
    let text = DESIGN_EXAMPLE.replace(L7_EXTRAS, "")
        + "\n[[service]]\nname = \"shop\"\nvip = \"198.18.100.2:80\"\nmode = \"l7\"\n"
        + L7_EXTRAS;
    let expected = Config {
        agent: AgentConfig {
            interface: Some("eth0".to_owned()),
            api_listen: "127.0.0.1:9090".parse().expect("addr"),
            api_token_file: Some(PathBuf::from("/etc/lb/token")),
            state_dir: PathBuf::from("/var/lib/lb-agent"),
            bpffs: PathBuf::from("/sys/fs/bpf"),
            tls_dir: None,
            workers: None,
        },
        dataplane: DataplaneConfig {
            gue_port: 6080,
            source_ipv4_prefix: None,
            source_ipv6_prefix: None,
            xdp_mode: XdpMode::Auto,
            encap: Encap::Ipip,
            source_ipv4: Some(Ipv4Addr::new(198, 18, 1, 10)),
            source_ipv6: Some("fd00:18::10".parse().expect("v6")),
            ring_size: 65537,
            flow_table_size: 1_000_000,
            max_services: 64,
            max_backends: 4096,
            max_filter_rules: 1024,
            new_flow_table_size: None,
            flow_limit_sources: 65536,
            mtu: 1500,
            max_new_flows_per_cpu: 0,
            icmp_errors_per_cpu: 1000,
        },
        security: SecurityConfig::default(),
        services: vec![
            ServiceConfig {
                quic: false,
                backend_protocol: crate::config::BackendProtocol::Http1,
                backend_tls: None,
                name: "web".to_owned(),
                vip: "198.18.100.1:80".parse().expect("vip"),
                protocol: Protocol::Tcp,
                mode: Mode::L4,
                scheduler: Scheduler::Maglev,
                health: HealthConfig {
                    kind: HealthKind::Http,
                    path: "/healthz".to_owned(),
                    host: None,
                    expect_status: (200, 399),
                    interval_ms: 500,
                    timeout_ms: 300,
                    rise: 2,
                    fall: 2,
                },
                backends: vec![
                    backend("198.18.2.11", 80, 100, 0),
                    backend("198.18.2.12", 80, 100, 1),
                ],
                sticky: None,
                cache: None,
                slow_start_s: 0,
                on_all_down: AllDown::FailOpen,
                hash_on: HashOn::Client,
                tls: None,
                http: HttpConfig::default(),
                deny: Vec::new(),
                allow: Vec::new(),
                new_flows_per_source: None,
            },
            ServiceConfig {
                quic: false,
                backend_protocol: crate::config::BackendProtocol::Http1,
                backend_tls: None,
                name: "shop".to_owned(),
                vip: "198.18.100.2:80".parse().expect("vip"),
                protocol: Protocol::Tcp,
                mode: Mode::L7,
                scheduler: Scheduler::RoundRobin,
                health: HealthConfig::default(),
                backends: Vec::new(),
                sticky: Some(StickyConfig {
                    cookie: "LBSTICKY".to_owned(),
                    ttl_s: 3600,
                }),
                cache: Some(CacheConfig {
                    max_bytes: 268_435_456,
                    max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
                    targets: crate::config::default_cache_targets(),
                    stale_if_unreachable_s: 0,
                }),
                slow_start_s: 0,
                on_all_down: AllDown::FailOpen,
                hash_on: HashOn::Client,
                tls: None,
                http: HttpConfig::default(),
                deny: Vec::new(),
                allow: Vec::new(),
                new_flows_per_source: None,
            },
        ],
        bgp: None,
        cluster: None,
    };
    let cfg = parse_ok(&text);
    assert_eq!(cfg, expected);
    // The serde derive agrees with the manual walk.
    assert_eq!(toml::from_str::<Config>(&text).expect("serde"), expected);
}

#[test]
fn empty_document_is_all_defaults() {
    let cfg = parse_ok("");
    assert_eq!(cfg, Config::default());
    assert_eq!(
        cfg.agent.api_listen,
        "127.0.0.1:9090".parse().expect("addr")
    );
    assert_eq!(cfg.agent.state_dir, Path::new("/var/lib/lb-agent"));
    assert_eq!(cfg.agent.bpffs, Path::new("/sys/fs/bpf"));
    assert_eq!(cfg.agent.interface, None, "interface may come from --iface");
    assert_eq!(cfg.dataplane.ring_size, 65537);
    assert_eq!(cfg.dataplane.flow_table_size, 1_000_000);
    assert_eq!(cfg.dataplane.max_services, 64);
    assert_eq!(cfg.dataplane.max_backends, 4096);
    assert!(cfg.services.is_empty());
}

#[test]
fn minimal_config_takes_defaults() {
    let cfg = parse_ok(&l4("backend = [{ address = \"198.18.2.11\" }]"));
    let svc = &cfg.services[0];
    assert_eq!(svc.protocol, Protocol::Tcp);
    assert_eq!(svc.mode, Mode::L4);
    assert_eq!(svc.scheduler, Scheduler::Maglev);
    assert_eq!(svc.health, HealthConfig::default());
    assert_eq!(svc.health.kind, HealthKind::None);
    assert_eq!(
        svc.backends,
        [backend("198.18.2.11", 80, 100, 0)],
        "port from the VIP"
    );
    assert_eq!(svc.sticky, None);

    let cfg = parse_ok(&l7("backend = [{ address = \"fd00:18::2\", port = 8080 }]"));
    assert_eq!(cfg.services[0].scheduler, Scheduler::RoundRobin);
    assert_eq!(
        cfg.services[0].backends,
        [backend("fd00:18::2", 8080, 100, 0)]
    );
}

#[test]
fn array_of_tables_backends_and_ipv6_vip() {
    let cfg = parse_ok(
        "[[service]]\nname = \"v6\"\nvip = \"[fd00:18::1]:443\"\nmode = \"l7\"\n\
         [[service.backend]]\naddress = \"fd00:18::11\"\n\
         [[service.backend]]\naddress = \"198.18.2.12\"\nweight = 0\n\
         [service.health]\nkind = \"tcp\"\n",
    );
    let svc = &cfg.services[0];
    assert_eq!(svc.vip, "[fd00:18::1]:443".parse().expect("vip"));
    assert_eq!(
        svc.backends,
        [
            backend("fd00:18::11", 443, 100, 0),
            backend("198.18.2.12", 443, 0, 0)
        ]
    );
    assert_eq!(svc.health.kind, HealthKind::Tcp);
}

#[test]
fn many_mistakes_are_all_reported_in_file_order() {
    let text = r#"[agent]
api_listen = "0.0.0.0:9090"

[dataplane]
source_ipv4 = "198.18.1.10"
ring_size = 65536
flow_tabel_size = 10

[[service]]
name = "web"
vip = "198.18.100.1:80"
scheduler = "round-robin"
health = { kind = "http", interval_ms = "fast" }
backend = [
  { address = "198.18.2.11", port = 8080 },
  { address = "198.18.2.12", weight = 2000000 },
  { address = "198.18.2.12" },
]

[[service]]
name = "web"
vip = "198.18.100.1:80"
mode = "l7"
sticky = { cookie = "bad cookie", ttl_s = 0 }
"#;
    let errors = errors(text);
    assert_eq!(
        places(&errors),
        [
            (2, "agent.api_listen"),
            (6, "dataplane.ring_size"),
            (7, "dataplane.flow_tabel_size"),
            (12, "service[0].scheduler"),
            (13, "service[0].health.interval_ms"),
            (15, "service[0].backend[0].port"),
            (16, "service[0].backend[1].weight"),
            (17, "service[0].backend[2].address"),
            (21, "service[1].name"),
            (22, "service[1].vip"),
            (24, "service[1].sticky.cookie"),
            (24, "service[1].sticky.ttl_s"),
        ],
        "{}",
        ConfigErrors(errors.clone())
    );
    let message = |key: &str| {
        &errors
            .iter()
            .find(|e| e.key == key)
            .expect("error present")
            .message
    };
    assert!(message("dataplane.ring_size").contains("not a prime"));
    assert!(message("dataplane.flow_tabel_size").contains("did you mean `flow_table_size`"));
    assert_eq!(
        message("service[0].health.interval_ms"),
        "expected an integer, found a string"
    );
    assert!(message("service[0].backend[2].address").contains("backend[1]"));
    assert!(message("service[1].vip").contains("already used by service \"web\""));
    // Columns: the key for rules on the model, the value for type errors.
    let column = |key: &str| errors.iter().find(|e| e.key == key).and_then(|e| e.column);
    assert_eq!(column("service[0].scheduler"), Some(1));
    assert_eq!(column("service[0].health.interval_ms"), Some(41));
    assert_eq!(column("service[1].sticky.ttl_s"), Some(35));

    let shown = ConfigErrors(errors).to_string();
    assert_eq!(shown.lines().count(), 12);
    assert!(shown.starts_with("test.toml:2:1: agent.api_listen: 0.0.0.0:9090 is not a loopback"));
}

#[test]
fn syntax_error_reports_its_line() {
    let errors = errors("[agent]\ninterface = \"eth0\"\napi_listen = \n");
    assert_eq!(errors.len(), 1);
    let error = &errors[0];
    assert_eq!(error.line, Some(3), "{error}");
    assert!(error.column.is_some());
    assert!(error.key.is_empty());
    assert!(error.message.starts_with("TOML syntax error"), "{error}");
    assert!(error.to_string().starts_with("test.toml:3:"), "{error}");
}

#[test]
fn duplicate_key_is_a_syntax_error() {
    let errors = errors("[agent]\ninterface = \"a\"\ninterface = \"b\"\n");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, Some(3), "{}", errors[0]);
}

#[test]
fn unknown_keys_are_reported_everywhere() {
    let error = assert_single("[agnet]\n", "agnet", "did you mean `agent`");
    assert_eq!((error.line, error.column), (Some(1), Some(2)));
    assert_single(
        "[agent]\nfoo = 1\n",
        "agent.foo",
        "expected one of: interface, api_listen",
    );
    assert_single(
        &l4("backend = [{ address = \"198.18.2.11\", wieght = 5 }]"),
        "service[0].backend[0].wieght",
        "did you mean `weight`",
    );
    assert_single(
        &l4("health = { kind = \"tcp\", interval = 5 }"),
        "service[0].health.interval",
        "unknown key",
    );
    assert_single(
        &l4("backends = []"),
        "service[0].backends",
        "did you mean `backend`",
    );
    assert_single(
        "[dataplane]\nring-size = 13\n",
        "dataplane.ring-size",
        "did you mean `ring_size`",
    );
}

#[test]
fn wrong_types_are_reported() {
    assert_single(
        "[dataplane]\nring_size = \"big\"\n",
        "dataplane.ring_size",
        "expected an integer, found a string",
    );
    assert_single(
        "[dataplane]\nring_size = 1.5\n",
        "dataplane.ring_size",
        "expected an integer, found a float",
    );
    assert_single("agent = 3\n", "agent", "expected a table, found an integer");
    assert_single(
        "[agent]\ninterface = true\n",
        "agent.interface",
        "expected a string, found a boolean",
    );
    assert_single(
        &l4("backend = { address = \"198.18.2.11\" }"),
        "service[0].backend",
        "expected an array, found a table",
    );
    assert_single(
        &l4("backend = [{ address = \"198.18.2.11\", port = 70000 }]"),
        "service[0].backend[0].port",
        "between 0 and 65535, found 70000",
    );
    assert_single(
        &l4("backend = [{ address = \"198.18.2.11\", weight = -1 }]"),
        "service[0].backend[0].weight",
        "found -1",
    );
    assert_single(
        &l4("health = { expect_status = [200] }"),
        "service[0].health.expect_status",
        "two status codes",
    );
    assert_single(
        &l4("health = { expect_status = [200, \"x\"] }"),
        "service[0].health.expect_status[1]",
        "expected an integer",
    );
    assert_single(
        "[[service]]\nname = \"web\"\nvip = \"198.18.100.1\"\nmode = \"l7\"\n",
        "service[0].vip",
        "expected an address:port",
    );
    assert_single(
        &l4("backend = [{ address = \"host.example\" }]"),
        "service[0].backend[0].address",
        "expected an IP address",
    );
    assert_single(
        "[dataplane]\nxdp_mode = \"native\"\nencap = \"gre\"\n",
        "dataplane.encap",
        "expected one of: ipip, gue; did you mean \"gue\"?",
    );
    assert_single(
        &l4("scheduler = \"source_ip\""),
        "service[0].scheduler",
        "did you mean \"source-ip\"",
    );
    assert_single(
        "[dataplane]\nsource_ipv4 = \"fd00:18::10\"\n",
        "dataplane.source_ipv4",
        "expected an IPv4 address",
    );
}

#[test]
fn missing_required_keys_are_reported() {
    let error = assert_single(
        "[[service]]\nname = \"web\"\nmode = \"l7\"\n",
        "service[0].vip",
        "required key is missing",
    );
    assert_eq!(error.line, Some(1), "points at the [[service]] header");
    assert_single(
        &l4("backend = [{ port = 80 }]"),
        "service[0].backend[0].address",
        "missing",
    );
    assert_single(
        &l7("sticky = { cookie = \"S\" }"),
        "service[0].sticky.ttl_s",
        "missing",
    );
    assert_single(&l7("cache = {}"), "service[0].cache.max_bytes", "missing");
}

#[test]
fn an_unreadable_backend_keeps_the_others_checked_under_their_own_index() {
    let errors = errors(&l4(
        "backend = [{ address = \"nope\" }, { address = \"198.18.2.12\", tier = 9 }]",
    ));
    assert_eq!(
        places(&errors),
        [
            (6, "service[0].backend[0].address"),
            (6, "service[0].backend[1].tier")
        ]
    );
}

#[test]
fn an_unreadable_service_keeps_the_others_checked_under_their_own_index() {
    let text = format!(
        "{DP}[[service]]\nname = \"a\"\nvip = \"bad\"\n\
         [[service]]\nname = \"b\"\nvip = \"198.18.100.1:80\"\nscheduler = \"p2c\"\n"
    );
    let errors = errors(&text);
    assert_eq!(
        places(&errors),
        [(5, "service[0].vip"), (9, "service[1].scheduler")]
    );
}

// --- rules: service identity ----------------------------------------------

#[test]
fn service_name_rules() {
    let named =
        |name: &str| format!("{DP}[[service]]\nname = \"{name}\"\nvip = \"198.18.100.1:80\"\n");
    assert_single(&named(""), "service[0].name", "must not be empty");
    assert_single(&named("web site"), "service[0].name", "may only contain");
    assert_single(
        &named(&"a".repeat(65)),
        "service[0].name",
        "the most allowed is 64",
    );
    parse_ok(&named(&"a".repeat(64)));
    parse_ok(&named("Web_1.example-2"));
    // The name is a URL path segment, a metric label and part of file names.
    for bad in [
        ".",
        "..",
        "a/b",
        "../etc",
        ".hidden",
        "-rf",
        "_x",
        "caf\u{e9}",
    ] {
        assert_single(
            &named(bad),
            "service[0].name",
            "must start with a letter or digit",
        );
    }
    parse_ok(&named("9lives"));
    parse_ok(&named("a..b"));
    let dup = format!(
        "{}[[service]]\nname = \"web\"\nvip = \"198.18.100.2:80\"\n",
        named("web")
    );
    let error = assert_single(&dup, "service[1].name", "already used");
    assert_eq!(error.line, Some(7));
}

#[test]
fn vip_rules() {
    let error = assert_single(
        &format!("{DP}[[service]]\nname = \"web\"\nvip = \"198.18.100.1:0\"\n"),
        "service[0].vip",
        "port must not be 0",
    );
    assert_eq!((error.line, error.column), (Some(5), Some(1)));
    assert_single(
        &format!("{DP}[[service]]\nname = \"web\"\nvip = \"0.0.0.0:80\"\n"),
        "service[0].vip",
        "unicast",
    );
    let two = |second: &str| {
        format!(
            "{DP}[[service]]\nname = \"a\"\nvip = \"198.18.100.1:53\"\n\
             [[service]]\nname = \"b\"\nvip = \"198.18.100.1:53\"\n{second}\n"
        )
    };
    assert_single(
        &two(""),
        "service[1].vip",
        "VIP 198.18.100.1:53/tcp is already used by service \"a\"",
    );
    parse_ok(&two("protocol = \"udp\""));
}

// --- rules: dataplane -------------------------------------------------------

#[test]
fn ring_size_must_be_a_prime_in_range() {
    let ring = |n: u64| format!("[dataplane]\nring_size = {n}\n");
    assert!(
        assert_single(&ring(65536), "dataplane.ring_size", "not a prime")
            .message
            .contains("65537")
    );
    assert_single(&ring(11), "dataplane.ring_size", "between 13 and 16777213");
    assert_single(
        &ring(16_777_259),
        "dataplane.ring_size",
        "between 13 and 16777213",
    );
    assert_single(&ring(15), "dataplane.ring_size", "not a prime");
    for prime in [13, 65537, 16_777_213] {
        assert_eq!(parse_ok(&ring(u64::from(prime))).dataplane.ring_size, prime);
    }
}

#[test]
fn is_prime_is_right() {
    let small: Vec<u32> = (0..50).filter(|&n| is_prime(n)).collect();
    assert_eq!(
        small,
        [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]
    );
    assert!(is_prime(65537));
    assert!(is_prime(16_777_213));
    assert!(!is_prime(16_777_215));
    assert!(is_prime(4_294_967_291));
    assert!(!is_prime(u32::MAX));
    assert_eq!(next_prime(65536), Some(65537));
}

#[test]
fn capacity_rules() {
    assert_single(
        "[dataplane]\nflow_table_size = 0\n",
        "dataplane.flow_table_size",
        "at least 1",
    );
    assert_single(
        "[dataplane]\nmax_services = 0\n",
        "dataplane.max_services",
        "between 1 and 4096",
    );
    assert_single(
        "[dataplane]\nmax_services = 4097\n",
        "dataplane.max_services",
        "between 1 and 4096",
    );
    assert_single(
        "[dataplane]\nmax_backends = 0\n",
        "dataplane.max_backends",
        "at least 1",
    );

    let services = format!(
        "{DP}max_services = 1\nmax_backends = 2\n\
         [[service]]\nname = \"a\"\nvip = \"198.18.100.1:80\"\n\
         backend = [{{ address = \"198.18.2.11\" }}, {{ address = \"198.18.2.12\" }}]\n\
         [[service]]\nname = \"b\"\nvip = \"198.18.100.2:80\"\n\
         backend = [{{ address = \"198.18.2.13\" }}]\n"
    );
    let errors = errors(&services);
    assert_eq!(
        places(&errors),
        [(9, "service[1]"), (12, "service[1].backend[0]")],
        "{}",
        ConfigErrors(errors.clone())
    );
    assert!(errors[0].message.contains("max_services = 1"));
    assert!(errors[1].message.contains("3 backends"));
}

#[test]
fn source_addresses_must_be_unicast() {
    assert_single(
        "[dataplane]\nsource_ipv4 = \"224.0.0.1\"\n",
        "dataplane.source_ipv4",
        "multicast",
    );
    assert_single(
        "[dataplane]\nsource_ipv6 = \"::\"\n",
        "dataplane.source_ipv6",
        "unspecified",
    );
}

// --- rules: l4 ---------------------------------------------------------------

#[test]
fn l4_scheduler_must_be_maglev_or_source_ip() {
    assert_single(
        &l4("scheduler = \"hash\""),
        "service[0].scheduler",
        "use one of: maglev, source-ip",
    );
    assert_eq!(
        parse_ok(&l4("scheduler = \"source-ip\"")).services[0].scheduler,
        Scheduler::SourceIp
    );
}

#[test]
fn l4_backend_port_must_be_the_vip_port() {
    let error = assert_single(
        &l4("backend = [{ address = \"198.18.2.11\", port = 8080 }]"),
        "service[0].backend[0].port",
        "does not rewrite ports",
    );
    assert!(
        error
            .message
            .contains("port 8080 differs from the VIP port 80")
    );
}

#[test]
fn l4_ipv6_services_need_the_ipv6_tunnel_source() {
    // An IPv6 VIP needs dataplane.source_ipv6 (the outer source of its tunnels).
    let v6 = format!("{DP}[[service]]\nname = \"web\"\nvip = \"[fd00:18::1]:80\"\n");
    assert_single(&v6, "service[0].vip", "needs dataplane.source_ipv6");
    // An IPv6 backend of an IPv4 VIP (IPv4 in IPv6) too.
    assert_single(
        &l4("backend = [{ address = \"fd00:18::11\" }]"),
        "service[0].backend[0].address",
        "needs dataplane.source_ipv6",
    );
    // With it: IPv6 VIPs with IPv6 backends, IPv4 VIPs with IPv6 backends, and IPv6
    // VIPs with IPv4 backends (IPv6 in IPv4, which uses source_ipv4) are accepted.
    let both = "[dataplane]\nsource_ipv4 = \"198.18.1.10\"\nsource_ipv6 = \"fd00:18:1::10\"\n";
    let cfg = parse_ok(&format!(
        "{both}[[service]]\nname = \"v6\"\nvip = \"[fd00:18:100::1]:80\"\n\
         backend = [{{ address = \"fd00:18:1::11\" }}, {{ address = \"198.18.1.11\" }}]\n\
         [[service]]\nname = \"mixed\"\nvip = \"198.18.100.1:80\"\n\
         backend = [{{ address = \"fd00:18:1::12\" }}]\n"
    ));
    assert_eq!(cfg.services.len(), 2);
    assert_eq!(cfg.services[0].backends[0].port, 80);
    // An IPv6 VIP with an IPv4 backend but no source_ipv4.
    let only6 = "[dataplane]\nsource_ipv6 = \"fd00:18:1::10\"\n";
    assert_single(
        &format!(
            "{only6}[[service]]\nname = \"v6\"\nvip = \"[fd00:18:100::1]:80\"\n\
             backend = [{{ address = \"198.18.1.11\" }}]\n"
        ),
        "service[0].backend[0].address",
        "needs dataplane.source_ipv4",
    );
    // Without a fast path nothing is tunnelled: no source needed.
    parse_ok(
        "[dataplane]\nxdp_mode = \"off\"\n[[service]]\nname = \"v6\"\nvip = \"[fd00:18:100::1]:80\"\n\
         backend = [{ address = \"fd00:18:1::11\" }]\n",
    );
}

#[test]
fn l4_rejects_sticky_and_cache() {
    assert_single(
        &l4("sticky = { cookie = \"S\", ttl_s = 60 }"),
        "service[0].sticky",
        "only for mode = \"l7\"",
    );
    assert_single(
        &l4("cache = { max_bytes = 1024 }"),
        "service[0].cache",
        "only for mode = \"l7\"",
    );
}

#[test]
fn l4_ipv4_needs_source_ipv4_unless_xdp_is_off() {
    let service = "[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n";
    let error = assert_single(service, "service[0].vip", "dataplane.source_ipv4");
    assert_eq!(error.line, Some(3));
    parse_ok(&format!("[dataplane]\nxdp_mode = \"off\"\n{service}"));
    parse_ok(&format!("{service}mode = \"l7\"\n"));
    parse_ok("[dataplane]\nxdp_mode = \"native\"\n");
}

// --- rules: l7 ---------------------------------------------------------------

#[test]
fn l7_needs_tcp() {
    assert_single(
        &l7("protocol = \"udp\""),
        "service[0].protocol",
        "protocol = \"tcp\"",
    );
}

#[test]
fn l7_scheduler_rules() {
    assert_single(
        &l7("scheduler = \"maglev\""),
        "service[0].scheduler",
        "round-robin, least-request, p2c, hash",
    );
    for scheduler in ["round-robin", "least-request", "p2c", "hash"] {
        let cfg = parse_ok(&l7(&format!("scheduler = \"{scheduler}\"")));
        assert_eq!(cfg.services[0].scheduler.as_str(), scheduler);
    }
}

#[test]
fn l7_allows_ipv6_and_other_ports() {
    let cfg = parse_ok(&l7(
        "backend = [{ address = \"fd00:18::11\", port = 8080 }, { address = \"198.18.2.11\", port = 8081 }]",
    ));
    assert_eq!(cfg.services[0].backends.len(), 2);
}

// --- rules: backends ------------------------------------------------------------

#[test]
fn a_service_may_start_without_backends() {
    assert!(parse_ok(&l4("")).services[0].backends.is_empty());
    assert!(
        parse_ok(&l4("backend = []")).services[0]
            .backends
            .is_empty()
    );
}

#[test]
fn backend_rules() {
    assert_single(
        &l4("backend = [{ address = \"198.18.2.11\" }, { address = \"198.18.2.11\", port = 80 }]"),
        "service[0].backend[1].address",
        "duplicate backend 198.18.2.11:80: already listed as backend[0]",
    );
    assert_single(
        &l4("backend = [{ address = \"198.18.2.11\", weight = 1000001 }]"),
        "service[0].backend[0].weight",
        "between 0 (drain) and 1000000",
    );
    let cfg = parse_ok(&l4(
        "backend = [{ address = \"198.18.2.11\", weight = 0 }, { address = \"198.18.2.12\", weight = 1000000, tier = 7 }]",
    ));
    assert_eq!(cfg.services[0].backends[0].weight, 0);
    assert_single(
        &l4("backend = [{ address = \"198.18.2.11\", tier = 8 }]"),
        "service[0].backend[0].tier",
        "between 0 and 7",
    );
    assert_single(
        &l4("backend = [{ address = \"0.0.0.0\" }]"),
        "service[0].backend[0].address",
        "unspecified",
    );
    assert_single(
        &l4("backend = [{ address = \"239.1.1.1\" }]"),
        "service[0].backend[0].address",
        "multicast",
    );
    assert_single(
        &l7("backend = [{ address = \"ff02::1\" }]"),
        "service[0].backend[0].address",
        "multicast",
    );
    assert_single(
        &l4("backend = [{ address = \"255.255.255.255\" }]"),
        "service[0].backend[0].address",
        "broadcast",
    );
}

// --- rules: health ---------------------------------------------------------------

#[test]
fn health_rules() {
    let health = |h: &str| l4(&format!("health = {{ kind = \"http\", {h} }}"));
    assert_single(
        &health("interval_ms = 49, timeout_ms = 10"),
        "service[0].health.interval_ms",
        "at least 50",
    );
    assert_single(
        &health("timeout_ms = 0"),
        "service[0].health.timeout_ms",
        "at least 1",
    );
    assert_single(
        &health("interval_ms = 100, timeout_ms = 101"),
        "service[0].health.timeout_ms",
        "must not exceed the interval",
    );
    parse_ok(&health("interval_ms = 100, timeout_ms = 100"));
    assert_single(
        &health("rise = 0"),
        "service[0].health.rise",
        "between 1 and 100",
    );
    assert_single(
        &health("fall = 101"),
        "service[0].health.fall",
        "between 1 and 100",
    );
    assert_single(
        &health("path = \"healthz\""),
        "service[0].health.path",
        "must start with '/'",
    );
    assert_single(
        &health("host = \"\""),
        "service[0].health.host",
        "non-empty",
    );
    assert_single(
        &health("expect_status = [200, 600]"),
        "service[0].health.expect_status",
        "between 100 and 599",
    );
    assert_single(
        &health("expect_status = [99, 200]"),
        "service[0].health.expect_status",
        "between 100 and 599",
    );
    assert_single(
        &health("expect_status = [300, 200]"),
        "service[0].health.expect_status",
        "not be greater",
    );
    let cfg = parse_ok(&health(
        "expect_status = [200, 200], host = \"web.example\", rise = 100",
    ));
    assert_eq!(cfg.services[0].health.expect_status, (200, 200));
}

#[test]
fn a_defaulted_key_is_placed_at_its_table() {
    // timeout_ms defaults to 500, more than this interval: the error names the
    // defaulted key and points at the health table that omits it.
    let error = assert_single(
        &l4("\nhealth = { interval_ms = 100 }"),
        "service[0].health.timeout_ms",
        "interval",
    );
    assert_eq!((error.line, error.column), (Some(7), Some(1)));
}

// --- rules: sticky and cache -------------------------------------------------------

#[test]
fn sticky_and_cache_rules() {
    for bad in ["", "a b", "a;b", "a=b", "é", "a\\u0001"] {
        assert_single(
            &l7(&format!("sticky = {{ cookie = \"{bad}\", ttl_s = 1 }}")),
            "service[0].sticky.cookie",
            "cookie name",
        );
    }
    parse_ok(&l7(
        "sticky = { cookie = \"__Host-lb_sticky.1\", ttl_s = 1 }",
    ));
    assert_single(
        &l7("sticky = { cookie = \"S\", ttl_s = 0 }"),
        "service[0].sticky.ttl_s",
        "at least 1",
    );
    assert_single(
        &l7("cache = { max_bytes = 0 }"),
        "service[0].cache.max_bytes",
        "at least 1",
    );
}

#[test]
fn cache_targets_and_stale_if_unreachable_rules() {
    // default: CDN-Cache-Control; an empty list turns targeted fields off
    let cfg = parse_ok(&l7("cache = { max_bytes = 1 }"));
    let cache = cfg.services[0].cache.as_ref().expect("cache");
    assert_eq!(cache.targets, vec!["CDN-Cache-Control".to_owned()]);
    assert_eq!(cache.stale_if_unreachable_s, 0);
    let cfg = parse_ok(&l7(
        "cache = { max_bytes = 1, targets = [\"xdplb-Cache-Control\", \"CDN-Cache-Control\"], stale_if_unreachable_s = 86400 }",
    ));
    let cache = cfg.services[0].cache.as_ref().expect("cache");
    assert_eq!(cache.targets.len(), 2);
    assert_eq!(cache.stale_if_unreachable_s, 86400);
    parse_ok(&l7("cache = { max_bytes = 1, targets = [] }"));
    for (bad, needle) in [
        ("\"\"", "not a header field name"),
        ("\"CDN Cache-Control\"", "not a header field name"),
        ("\"x:y\"", "not a header field name"),
        ("\"Cache-Control\"", "read anyway"),
        ("\"expires\"", "read anyway"),
        ("\"A-CC\", \"a-cc\"", "listed twice"),
        (
            "\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\"",
            "at most 8",
        ),
    ] {
        assert_single(
            &l7(&format!("cache = {{ max_bytes = 1, targets = [{bad}] }}")),
            "service[0].cache.targets",
            needle,
        );
    }
    assert_single(
        &l7("cache = { max_bytes = 1, stale_if_unreachable_s = 40000000 }"),
        "service[0].cache.stale_if_unreachable_s",
        "one year",
    );
}

// --- rules: agent ---------------------------------------------------------------------

#[test]
fn non_loopback_api_needs_a_token_file() {
    let error = assert_single(
        "[agent]\n\napi_listen = \"198.18.1.10:9090\"\n",
        "agent.api_listen",
        "api_token_file",
    );
    assert_eq!(error.line, Some(3));
    assert_single(
        "[agent]\napi_listen = \"[::]:9090\"\n",
        "agent.api_listen",
        "api_token_file",
    );
    parse_ok("[agent]\napi_listen = \"0.0.0.0:9090\"\napi_token_file = \"/etc/lb/token\"\n");
    parse_ok("[agent]\napi_listen = \"[::1]:9090\"\n");
    parse_ok("[agent]\napi_listen = \"127.0.0.2:9090\"\n");
}

#[test]
fn interface_is_optional_but_must_be_a_valid_name() {
    assert_eq!(parse_ok("[agent]\n").agent.interface, None);
    assert_single(
        "[agent]\ninterface = \"a-very-long-interface\"\n",
        "agent.interface",
        "15 bytes",
    );
    assert_single(
        "[agent]\ninterface = \"eth 0\"\n",
        "agent.interface",
        "not a valid",
    );
    assert_single("[agent]\ninterface = \"\"\n", "agent.interface", "--iface");
}

// --- API side ---------------------------------------------------------------------------

#[test]
fn service_json_round_trip() {
    let mut svc = service("web", "198.18.100.1:80");
    svc.mode = Mode::L7;
    svc.scheduler = Scheduler::LeastRequest;
    svc.health.host = Some("web.example".to_owned());
    svc.sticky = Some(StickyConfig {
        cookie: "S".to_owned(),
        ttl_s: 60,
    });
    svc.cache = Some(CacheConfig {
        max_bytes: 1 << 20,
        max_object_bytes: 1 << 16,
        targets: crate::config::default_cache_targets(),
        stale_if_unreachable_s: 0,
    });
    svc.backends.push(backend("fd00:18::11", 8080, 0, 3));
    let json = serde_json::to_string(&svc).expect("serialize");
    assert!(json.contains("\"backend\":["), "{json}");
    assert!(json.contains("\"scheduler\":\"least-request\""), "{json}");
    assert!(json.contains("\"vip\":\"198.18.100.1:80\""), "{json}");
    assert_eq!(
        serde_json::from_str::<ServiceConfig>(&json).expect("deserialize"),
        svc
    );
}

#[test]
fn service_json_takes_the_toml_defaults() {
    let svc: ServiceConfig = serde_json::from_str(
        r#"{"name": "web", "vip": "198.18.100.1:80", "backend": [{"address": "198.18.2.11"}]}"#,
    )
    .expect("deserialize");
    assert_eq!(svc, service("web", "198.18.100.1:80"));
    let l7: ServiceConfig =
        serde_json::from_str(r#"{"name": "s", "vip": "[fd00:18::1]:80", "mode": "l7"}"#)
            .expect("l7");
    assert_eq!(l7.scheduler, Scheduler::RoundRobin);
    let typo = serde_json::from_str::<ServiceConfig>(
        r#"{"name": "s", "vip": "198.18.100.1:80", "wieght": 1}"#,
    );
    assert!(
        typo.expect_err("unknown field")
            .to_string()
            .contains("wieght")
    );
}

#[test]
fn validate_service_catches_a_duplicate_vip() {
    let others = [service("web", "198.18.100.1:80")];
    let mut new = service("web2", "198.18.100.1:80");
    new.backends.push(backend("198.18.2.12", 80, 2_000_000, 0));
    let errors = validate_service(&new, &others, &AgentConfig::default(), &dp());
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["vip", "backend[1].weight"], "{errors:?}");
    assert!(
        errors[0]
            .message
            .contains("already used by service \"web\"")
    );
    assert!(errors.iter().all(|e| e.line.is_none() && e.file.is_empty()));
    assert_eq!(errors[0].to_string(), format!("vip: {}", errors[0].message));

    new.protocol = Protocol::Udp;
    new.backends.pop();
    assert!(validate_service(&new, &others, &AgentConfig::default(), &dp()).is_empty());
}

#[test]
fn validate_service_checks_names_and_capacities() {
    let others = [service("web", "198.18.100.1:80")];
    let keys = |svc: &ServiceConfig, dp: &DataplaneConfig| -> Vec<String> {
        validate_service(svc, &others, &AgentConfig::default(), dp)
            .into_iter()
            .map(|e| e.key)
            .collect()
    };
    assert_eq!(keys(&service("web", "198.18.100.2:80"), &dp()), ["name"]);
    let full = DataplaneConfig {
        max_services: 1,
        max_backends: 1,
        ..dp()
    };
    assert_eq!(
        keys(&service("b", "198.18.100.2:80"), &full),
        ["name", "backend"]
    );
    let bare = DataplaneConfig::default();
    assert_eq!(keys(&service("b", "198.18.100.2:80"), &bare), ["vip"]);
}

#[test]
fn validate_on_the_model_matches_parse() {
    let mut cfg = parse_ok(&l4(""));
    assert!(cfg.validate().is_empty());
    cfg.dataplane.source_ipv4 = None;
    let errors = cfg.validate();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].key, "service[0].vip");
    cfg.dataplane.xdp_mode = XdpMode::Off;
    assert!(cfg.validate().is_empty());
}

// --- consistency and plumbing -----------------------------------------------------------

#[test]
fn enum_names_match_serde() {
    macro_rules! check {
        ($($t:ty),+) => {$(
            for v in <$t>::ALL {
                assert_eq!(serde_json::to_value(v).expect("json"), v.as_str());
            }
        )+};
    }
    check!(
        XdpMode, Encap, Protocol, Mode, Scheduler, HealthKind, AllDown
    );
}

#[test]
fn toml_serialization_reads_back_unchanged() {
    // Every field serde writes is a key the walk knows and reads.
    let mut cfg = parse_ok(
        &(DESIGN_EXAMPLE.replace(L7_EXTRAS, "")
            + "[[service]]\nname = \"shop\"\nvip = \"198.18.100.2:80\"\nmode = \"l7\"\n"
            + L7_EXTRAS),
    );
    cfg.dataplane.max_services = 10;
    cfg.dataplane.encap = Encap::Gue;
    cfg.services[1].health.host = Some("shop.example".to_owned());
    let text = toml::to_string(&cfg).expect("to toml");
    assert_eq!(parse_ok(&text), cfg, "{text}");
}

#[test]
fn display_formats() {
    let mut error = ConfigError {
        file: "lb.toml".to_owned(),
        line: Some(3),
        column: Some(7),
        key: "agent.api_listen".to_owned(),
        message: "why".to_owned(),
    };
    assert_eq!(error.to_string(), "lb.toml:3:7: agent.api_listen: why");
    error.column = None;
    assert_eq!(error.to_string(), "lb.toml:3: agent.api_listen: why");
    error.line = None;
    assert_eq!(error.to_string(), "lb.toml: agent.api_listen: why");
    error.key.clear();
    assert_eq!(error.to_string(), "lb.toml: why");
    let both = ConfigErrors(vec![error.clone(), error]);
    assert_eq!(both.to_string(), "lb.toml: why\nlb.toml: why");
}

#[test]
fn load_names_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("lb.toml");
    fs::write(&path, "[dataplane]\nring_size = 12\n").expect("write");
    let ConfigErrors(errors) = Config::load(&path).expect_err("invalid");
    assert_eq!(errors[0].file, path.display().to_string());
    assert_eq!(errors[0].line, Some(2));
    fs::write(&path, l4("")).expect("write");
    assert_eq!(Config::load(&path).expect("valid").services[0].name, "web");

    let missing = dir.path().join("missing.toml");
    let ConfigErrors(errors) = Config::load(&missing).expect_err("missing");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]
            .to_string()
            .starts_with(&format!("{}: cannot read", missing.display()))
    );
}

#[test]
fn positions_count_characters() {
    assert_eq!(position("", 0), (1, 1));
    assert_eq!(position("ab\ncd", 4), (2, 2));
    assert_eq!(position("é = 1\nx", 2), (1, 2));
    assert_eq!(position("a\n", 99), (2, 1));
}

// --- the model is the single source of keys -----------------------------------------

/// A model grown by one key the way a later step adds one: a field with its default
/// (here `dataplane.gue_port`) and a rule. The reader is not edited: it learns the
/// key, its type and its default from the struct.
#[derive(Debug, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Grown {
    #[serde(default)]
    dataplane: GrownDataplane,
    #[serde(default, rename = "service")]
    services: Vec<ServiceConfig>,
}

#[derive(Debug, PartialEq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GrownDataplane {
    encap: Encap,
    /// The new key.
    gue_port: u16,
}

impl Default for GrownDataplane {
    fn default() -> Self {
        Self {
            encap: Encap::default(),
            gue_port: 6080,
        }
    }
}

/// The new key's rule.
fn grown_rules(grown: &Grown) -> Vec<ConfigError> {
    let dp = &grown.dataplane;
    if dp.encap == Encap::Gue && dp.gue_port < 1024 {
        vec![ConfigError::at_key(
            "dataplane.gue_port",
            format!("{} is below 1024", dp.gue_port),
        )]
    } else {
        Vec::new()
    }
}

/// Reads `text` as a [`Grown`] the way [`Config::parse`] reads a [`Config`].
fn read_grown(text: &str) -> Result<Grown, Vec<ConfigError>> {
    let root = toml::de::DeTable::parse(text).expect("TOML");
    let read = read::read::<Grown>(&root, text, "grown.toml");
    let mut errors = read.errors.clone();
    if let Some(grown) = &read.value {
        for mut error in grown_rules(grown) {
            read.place(&mut error);
            errors.push(error);
        }
    }
    match read.value {
        Some(grown) if errors.is_empty() => Ok(grown),
        _ => Err(errors),
    }
}

#[test]
fn a_key_added_to_the_model_is_read_defaulted_and_checked() {
    // Defaulted when left out, read when given.
    assert_eq!(read_grown("").expect("empty").dataplane.gue_port, 6080);
    let grown = read_grown("[dataplane]\nencap = \"gue\"\ngue_port = 7000\n").expect("valid");
    assert_eq!(grown.dataplane.gue_port, 7000);
    assert_eq!(grown.dataplane.encap, Encap::Gue);

    let single = |text: &str| -> ConfigError {
        let errors = read_grown(text).expect_err("invalid");
        assert_eq!(errors.len(), 1, "{errors:?}");
        errors.into_iter().next().expect("one")
    };
    // A wrong type or range, at the value.
    let error = single("[dataplane]\ngue_port = \"x\"\n");
    assert_eq!(
        error.to_string(),
        "grown.toml:2:12: dataplane.gue_port: expected an integer, found a string"
    );
    let error = single("[dataplane]\ngue_port = 70000\n");
    assert_eq!(error.key, "dataplane.gue_port");
    assert!(
        error.message.contains("between 0 and 65535, found 70000"),
        "{error}"
    );
    // Known to the unknown-key check, with a suggestion.
    let error = single("[dataplane]\ngue_prot = 7000\n");
    assert_eq!(error.key, "dataplane.gue_prot");
    assert!(error.message.contains("did you mean `gue_port`"), "{error}");
    let error = single("[dataplane]\nfoo = 1\n");
    assert!(
        error.message.ends_with("expected one of: encap, gue_port"),
        "{error}"
    );
    // Its rule's error is placed at the key ...
    let error = single("[dataplane]\nencap = \"gue\"\n\ngue_port = 80\n");
    assert_eq!(
        (error.key.as_str(), error.line, error.column),
        ("dataplane.gue_port", Some(4), Some(1))
    );
    // ... and the rest of the model is read as ever, errors and all.
    let errors = read_grown(
        "[dataplane]\ngue_port = -1\n[[service]]\nname = \"a\"\nvip = \"198.18.100.1\"\n",
    )
    .expect_err("invalid");
    let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys.len(), 2, "{errors:?}");
    assert!(keys.contains(&"dataplane.gue_port") && keys.contains(&"service[0].vip"));
}

#[test]
fn a_backend_port_is_given_or_the_vips() {
    assert_single(
        &l7("backend = [{ address = \"198.18.2.11\", port = 0 }]"),
        "service[0].backend[0].port",
        "leave port out to take the VIP's port",
    );
    // The API reads a backend on its own, then fills in the VIP's port.
    let read = |json: &str| serde_json::from_str::<BackendConfig>(json);
    let b = read(r#"{"address": "198.18.2.11"}"#).expect("no port");
    assert_eq!(
        b.with_default_port(443),
        backend("198.18.2.11", 443, 100, 0)
    );
    let b = read(r#"{"address": "198.18.2.11", "port": 8080, "tier": 2}"#).expect("port");
    assert_eq!(
        b.with_default_port(443),
        backend("198.18.2.11", 8080, 100, 2)
    );
    assert!(read(r#"{"address": "198.18.2.11", "port": 0}"#).is_err());
    assert!(read(r#"{"address": "198.18.2.11", "wieght": 1}"#).is_err());
}

#[test]
fn an_unreadable_mode_keeps_its_service_out_of_the_rules() {
    // Read with the default mode (l4), the l7 keys would be errors too.
    assert_single(
        &format!(
            "{DP}[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\nmode = \"l8\"\n\
             sticky = {{ cookie = \"S\", ttl_s = 60 }}\n"
        ),
        "service[0].mode",
        "expected one of: l4, l7",
    );
}

#[test]
fn the_known_keys_are_the_models() {
    // The unknown-key check lists a service's fields as serde knows them.
    let error = assert_single(&l4("foo = 1"), "service[0].foo", "expected one of: ");
    assert!(
        error.message.ends_with(
            "name, vip, protocol, mode, scheduler, health, backend, sticky, cache, \
             slow_start_s, on_all_down, hash_on, tls, http, deny, allow, new_flows_per_source, \
             quic, backend_protocol, backend_tls"
        ),
        "{error}"
    );
    let error = assert_single(
        &l7("cache = { max_bytes = 1, foo = 1 }"),
        "service[0].cache.foo",
        "",
    );
    assert!(
        error
            .message
            .ends_with("max_bytes, max_object_bytes, targets, stale_if_unreachable_s"),
        "{error}"
    );
}

// --- bad input (issue 9) ---------------------------------------------------

#[test]
fn an_l7_service_must_not_send_requests_to_this_agent() {
    // Its own VIP, another l7 VIP, the API: every request would loop through the proxy.
    assert_single(
        &l7("backend = [{ address = \"198.18.100.1\", port = 80 }]"),
        "service[0].backend[0].address",
        "this service's own VIP",
    );
    assert_single(
        &l7("backend = [{ address = \"127.0.0.1\", port = 9090 }]"),
        "service[0].backend[0].address",
        "the agent's own API (agent.api_listen = 127.0.0.1:9090)",
    );
    let two = |backend: &str| {
        format!(
            "[[service]]\nname = \"a\"\nvip = \"198.18.100.1:80\"\nmode = \"l7\"\n\
             backend = [{{ address = \"198.18.2.11\" }}]\n\
             [[service]]\nname = \"b\"\nvip = \"198.18.100.2:80\"\nmode = \"l7\"\n\
             backend = [{backend}]\n"
        )
    };
    let error = assert_single(
        &two("{ address = \"198.18.100.1\" }"),
        "service[1].backend[0].address",
        "the VIP of l7 service \"a\" on this agent",
    );
    assert_eq!(error.line, Some(10));
    // The same address on another port, or an l4 VIP (not a local listener), is not a loop.
    parse_ok(&two("{ address = \"198.18.100.1\", port = 8080 }"));
    parse_ok(&format!(
        "{DP}[[service]]\nname = \"a\"\nvip = \"198.18.100.1:80\"\n\
         [[service]]\nname = \"b\"\nvip = \"198.18.100.2:80\"\nmode = \"l7\"\n\
         backend = [{{ address = \"198.18.100.1\" }}]\n"
    ));
    // A wildcard API address listens on every local address of its port.
    let wild = format!(
        "[agent]\napi_listen = \"0.0.0.0:9090\"\napi_token_file = \"/t\"\n{}",
        l7("backend = [{ address = \"198.18.2.11\", port = 9090 }]")
    );
    assert_single(
        &wild,
        "service[0].backend[0].address",
        "agent.api_listen = 0.0.0.0:9090",
    );
}

#[test]
fn an_l7_vip_must_not_be_the_api_address() {
    let text = "[agent]\napi_listen = \"198.18.100.1:80\"\napi_token_file = \"/t\"\n\
                [[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\nmode = \"l7\"\n";
    let error = assert_single(text, "service[0].vip", "agent.api_listen = 198.18.100.1:80");
    assert!(
        error.message.contains("the agent's own API address"),
        "{error}"
    );
    // Through the API, with the listeners named by the agent's config.
    let agent = AgentConfig::default();
    let mut svc = service("shop", "127.0.0.1:9090");
    svc.mode = Mode::L7;
    svc.scheduler = Scheduler::RoundRobin;
    let keys: Vec<String> = validate_service(&svc, &[], &agent, &dp())
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["vip"]);
}

#[test]
fn validate_service_refuses_a_vip_that_another_l7_service_sends_to() {
    let mut a = service("a", "198.18.100.1:80");
    a.mode = Mode::L7;
    a.scheduler = Scheduler::RoundRobin;
    a.backends = vec![backend("198.18.100.2", 80, 100, 0)];
    let mut b = service("b", "198.18.100.2:80");
    b.mode = Mode::L7;
    b.scheduler = Scheduler::RoundRobin;
    let errors = validate_service(&b, &[a.clone()], &AgentConfig::default(), &dp());
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].key, "vip");
    assert!(
        errors[0].message.contains("a backend of l7 service \"a\""),
        "{errors:?}"
    );
    // Its own backends against its own VIP, through the API too.
    let mut c = service("c", "198.18.100.3:80");
    c.mode = Mode::L7;
    c.scheduler = Scheduler::RoundRobin;
    c.backends = vec![backend("198.18.100.3", 80, 100, 0)];
    let keys: Vec<String> = validate_service(&c, &[a], &AgentConfig::default(), &dp())
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(keys, ["backend[0].address"]);
}

/// A temporary directory with a certificate, its key, another key and a file that is
/// not PEM.
fn tls_files() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("xdplb-config-tls-")
        .tempdir()
        .expect("temporary dir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let other = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).expect("rcgen");
    std::fs::write(dir.path().join("c.pem"), ck.cert.pem()).expect("write");
    std::fs::write(dir.path().join("k.pem"), ck.key_pair.serialize_pem()).expect("write");
    std::fs::write(dir.path().join("other.pem"), other.key_pair.serialize_pem()).expect("write");
    std::fs::write(dir.path().join("junk"), "not pem at all").expect("write");
    dir
}

#[test]
fn tls_files_are_loaded_as_the_proxy_loads_them() {
    let dir = tls_files();
    let tls = |cert: &str, key: &str| {
        l7(&format!(
            "tls = {{ cert = \"{}\", key = \"{}\" }}",
            dir.path().join(cert).display(),
            dir.path().join(key).display()
        ))
    };
    parse_ok(&tls("c.pem", "k.pem"));
    assert_single(
        &tls("junk", "k.pem"),
        "service[0].tls.cert",
        "no PEM certificate",
    );
    assert_single(
        &tls("c.pem", "junk"),
        "service[0].tls.key",
        "no PEM private key",
    );
    // A key that is not the certificate's.
    assert_single(&tls("c.pem", "other.pem"), "service[0].tls", "other.pem");
}

#[test]
fn workers_default_to_one_per_cpu_and_are_bounded() {
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    assert_eq!(parse_ok("").agent.worker_threads(), cpus);
    assert_eq!(parse_ok("[agent]\nworkers = 3\n").agent.worker_threads(), 3);
    assert_single(
        "[agent]\nworkers = 0\n",
        "agent.workers",
        "must be 1 to 1024",
    );
    assert_single(
        "[agent]\nworkers = 1025\n",
        "agent.workers",
        "must be 1 to 1024",
    );
    assert_single("[agent]\nworkers = -1\n", "agent.workers", "");
}

#[test]
fn tls_dir_must_be_absolute() {
    assert_single(
        "[agent]\ntls_dir = \"certs\"\n",
        "agent.tls_dir",
        "must be an absolute path",
    );
    parse_ok("[agent]\ntls_dir = \"/etc/lb/tls\"\n");
}

#[test]
fn api_tls_paths_are_confined_to_tls_dir() {
    let dir = tls_files();
    let outside = tls_files();
    let mut svc = service("shop", "198.18.100.2:443");
    svc.mode = Mode::L7;
    let tls = |d: &Path, cert: &str, key: &str| TlsConfig {
        cert: d.join(cert),
        key: d.join(key),
    };
    let keys = |svc: &ServiceConfig, agent: &AgentConfig, kept: Option<&TlsConfig>| {
        check_api_tls(svc, agent, kept)
            .into_iter()
            .map(|e| format!("{}: {}", e.key, e.message))
            .collect::<Vec<_>>()
    };
    let mut agent = AgentConfig::default();
    assert!(
        keys(&svc, &agent, None).is_empty(),
        "no tls, nothing to confine"
    );
    svc.tls = Some(tls(dir.path(), "c.pem", "k.pem"));
    let errors = keys(&svc, &agent, None);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("tls: ") && errors[0].contains("agent.tls_dir"),
        "{errors:?}"
    );
    // What the service has already (from the config file) may stay.
    assert!(keys(&svc, &agent, svc.tls.clone().as_ref()).is_empty());

    agent.tls_dir = Some(dir.path().to_owned());
    assert!(keys(&svc, &agent, None).is_empty(), "inside tls_dir");
    svc.tls = Some(tls(outside.path(), "c.pem", "k.pem"));
    let errors = keys(&svc, &agent, None);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("tls.cert: ") && errors[0].contains("outside agent.tls_dir"));
    assert!(errors[1].starts_with("tls.key: "));
    // `..` and symbolic links are followed before the comparison.
    let escape = dir
        .path()
        .join("..")
        .join(outside.path().file_name().expect("name"));
    svc.tls = Some(tls(&escape, "c.pem", "k.pem"));
    assert_eq!(keys(&svc, &agent, None).len(), 2);
    std::os::unix::fs::symlink(outside.path().join("k.pem"), dir.path().join("link.pem"))
        .expect("symlink");
    svc.tls = Some(tls(dir.path(), "c.pem", "link.pem"));
    let errors = keys(&svc, &agent, None);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("tls.key: "), "{errors:?}");
    svc.tls = Some(TlsConfig {
        cert: PathBuf::from("c.pem"),
        key: dir.path().join("k.pem"),
    });
    let errors = keys(&svc, &agent, None);
    assert!(errors[0].contains("must be an absolute path"), "{errors:?}");
    svc.tls = Some(tls(dir.path(), "missing.pem", "k.pem"));
    let errors = keys(&svc, &agent, None);
    assert!(errors[0].contains("cannot read"), "{errors:?}");
}

#[test]
fn bgp_table_takes_defaults_and_checks_its_keys() {
    let cfg = parse_ok("[bgp]\n");
    assert_eq!(cfg.bgp, Some(BgpConfig::default()));
    assert_eq!(cfg.bgp.as_ref().map(|b| b.drain_s), Some(5));
    assert_eq!(parse_ok("").bgp, None);
    let cfg = parse_ok(
        "[bgp]\nbird_socket = \"/tmp/b.ctl\"\ninclude_file = \"/tmp/x.conf\"\ndrain_s = 0\n",
    );
    assert_eq!(
        cfg.bgp,
        Some(BgpConfig {
            bird_socket: "/tmp/b.ctl".into(),
            include_file: "/tmp/x.conf".into(),
            drain_s: 0,
            ..BgpConfig::default()
        })
    );
    assert_single(
        "[bgp]\ninclude_file = \"xdplb.conf\"\n",
        "bgp.include_file",
        "absolute",
    );
    assert_single(
        "[bgp]\nbird_socket = \"bird.ctl\"\n",
        "bgp.bird_socket",
        "absolute",
    );
    assert_single("[bgp]\ndrain_s = 601\n", "bgp.drain_s", "maximum 600");
    assert_single("[bgp]\nasn = 1\n", "bgp.asn", "");
    let cfg = parse_ok("[bgp]\nsite_prepend = 3\nlocal_as = 65001\n");
    let bgp = cfg.bgp.expect("bgp");
    assert_eq!((bgp.site_prepend, bgp.local_as), (3, Some(65001)));
    assert_single(
        "[bgp]\nsite_prepend = 2\n",
        "bgp.site_prepend",
        "need bgp.local_as",
    );
    assert_single(
        "[bgp]\nsite_prepend = 11\nlocal_as = 65001\n",
        "bgp.site_prepend",
        "maximum 10",
    );
    assert_single("[bgp]\nlocal_as = 23456\n", "bgp.local_as", "reserved");
    assert_single("[bgp]\nlocal_as = 0\n", "bgp.local_as", "reserved");
    // local_as alone is accepted (no prepend).
    assert_eq!(
        parse_ok("[bgp]\nlocal_as = 4200000000\n")
            .bgp
            .map(|b| b.site_prepend),
        Some(0)
    );
}

#[test]
fn security_prefixes_parse_v4_and_v6() {
    let cfg = parse_ok(
        "[dataplane]\nmax_filter_rules = 8\n[security]\n\
         deny = [\"203.0.113.0/24\", \"2001:db8:bad::/48\", \"198.51.100.7/32\"]\n\
         allow = [\"198.18.0.0/15\", \"fd00:18::/32\"]\n",
    );
    assert_eq!(
        cfg.security.deny,
        ["203.0.113.0/24", "2001:db8:bad::/48", "198.51.100.7/32"]
    );
    assert_eq!(cfg.security.allow, ["198.18.0.0/15", "fd00:18::/32"]);
    assert_eq!(cfg.dataplane.max_filter_rules, 8);
    assert_eq!(parse_ok("").security, SecurityConfig::default());
    assert_eq!(
        parse_ok("").dataplane.max_filter_rules,
        lb_common::maps::DEFAULT_MAX_FILTER_RULES
    );
}

#[test]
fn security_prefix_errors_name_the_entry() {
    let e = assert_single(
        "[security]\ndeny = [\"203.0.113.0/24\", \"203.0.113.9/24\"]\n",
        "security.deny[1]",
        "host bits set after /24: did you mean 203.0.113.0/24?",
    );
    assert_eq!(e.line, Some(2));
    assert_single(
        "[security]\nallow = [\"2001:db8::1/64\"]\n",
        "security.allow[0]",
        "did you mean 2001:db8::/64?",
    );
    assert_single(
        "[security]\ndeny = [\"203.0.113.0\"]\n",
        "security.deny[0]",
        "is not a prefix",
    );
    assert_single(
        "[security]\ndeny = [\"2001:db8::/129\"]\n",
        "security.deny[0]",
        "is not a prefix",
    );
    assert_single(
        "[security]\ndeny = [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n",
        "security.deny[1]",
        "listed twice (also security.deny[0])",
    );
    assert_single(
        "[dataplane]\nmax_filter_rules = 1\n[security]\nallow = [\"10.0.0.0/8\", \"11.0.0.0/8\"]\n",
        "security.allow",
        "more than dataplane.max_filter_rules = 1",
    );
    assert_single(
        "[dataplane]\nmax_filter_rules = 0\n",
        "dataplane.max_filter_rules",
        "out of range",
    );
    // A flood limit needs its rate and burst.
    let errs = errors("[security]\nnew_flows_per_source = { rate = 1 }\n");
    assert_eq!(
        places(&errs),
        [(2, "security.new_flows_per_source.burst")],
        "{errs:?}"
    );
    assert_eq!(errs[0].message, "required key is missing");
}

/// A `[[service]]` (l4, on the VIP 198.18.100.N:80) with the given extra lines.
fn filtered_service(n: u8, extra: &str) -> String {
    format!(
        "[[service]]\nname = \"s{n}\"\nvip = \"198.18.100.{n}:80\"\n{extra}\
         backend = [{{ address = \"198.18.2.11\" }}]\n"
    )
}

#[test]
fn per_service_filters_and_flood_limits_parse() {
    let cfg = parse_ok(&format!(
        "{DP}[security]\nnew_flows_per_source = {{ rate = 1000, burst = 2000 }}\n{}",
        filtered_service(
            1,
            "deny = [\"203.0.113.0/24\", \"2001:db8:bad::/48\"]\n\
             allow = [\"198.18.0.0/15\"]\n\
             new_flows_per_source = { rate = 10, burst = 20, prefix_v4 = 24, prefix_v6 = 48 }\n"
        )
    ));
    let global = cfg.security.new_flows_per_source.expect("global limit");
    assert_eq!(
        (
            global.rate,
            global.burst,
            global.prefix_v4,
            global.prefix_v6
        ),
        (1000, 2000, 32, 64),
        "prefixes default to /32 and /64"
    );
    let svc = &cfg.services[0];
    assert_eq!(svc.deny, ["203.0.113.0/24", "2001:db8:bad::/48"]);
    assert_eq!(svc.allow, ["198.18.0.0/15"]);
    let own = svc.new_flows_per_source.expect("service limit");
    assert_eq!(
        (own.rate, own.burst, own.prefix_v4, own.prefix_v6),
        (10, 20, 24, 48)
    );
    // Defaults: no lists, no limits; the new-flow table is a quarter of the flow table.
    let plain = parse_ok(&format!("{DP}{}", filtered_service(1, "")));
    assert!(plain.services[0].deny.is_empty() && plain.services[0].new_flows_per_source.is_none());
    assert_eq!(plain.dataplane.new_flow_table_entries(), 250_000);
    assert_eq!(plain.dataplane.flow_limit_sources, 65_536);
}

#[test]
fn per_service_filter_and_flood_limit_errors_name_the_entry() {
    assert_single(
        &format!(
            "{DP}{}",
            filtered_service(1, "deny = [\"203.0.113.9/24\"]\n")
        ),
        "service[0].deny[0]",
        "did you mean 203.0.113.0/24?",
    );
    assert_single(
        &format!(
            "{DP}{}",
            filtered_service(1, "allow = [\"10.0.0.0/8\", \"10.0.0.0/8\"]\n")
        ),
        "service[0].allow[1]",
        "listed twice (also service[0].allow[0])",
    );
    for (limit, key, needle) in [
        ("rate = 0, burst = 1", "rate", "out of range"),
        ("rate = 1, burst = 0", "burst", "at least 1"),
        (
            "rate = 1, burst = 1, prefix_v4 = 33",
            "prefix_v4",
            "32 bits",
        ),
        (
            "rate = 1, burst = 1, prefix_v6 = 129",
            "prefix_v6",
            "128 bits",
        ),
    ] {
        assert_single(
            &format!(
                "{DP}{}",
                filtered_service(1, &format!("new_flows_per_source = {{ {limit} }}\n"))
            ),
            &format!("service[0].new_flows_per_source.{key}"),
            needle,
        );
        assert_single(
            &format!("{DP}[security]\nnew_flows_per_source = {{ {limit} }}\n"),
            &format!("security.new_flows_per_source.{key}"),
            needle,
        );
    }
    // The services' own lists share one trie of max_filter_rules prefixes.
    assert_single(
        &format!(
            "{DP}max_filter_rules = 2\n{}{}",
            filtered_service(1, "deny = [\"10.0.0.0/8\", \"11.0.0.0/8\"]\n"),
            filtered_service(2, "deny = [\"12.0.0.0/8\"]\n"),
        ),
        "service[1].deny",
        "hold 3 prefixes up to here, more than dataplane.max_filter_rules = 2",
    );
    assert_single(
        &l7("new_flows_per_source = { rate = 1, burst = 1 }"),
        "service[0].new_flows_per_source",
        "for mode = \"l4\" services",
    );
    assert_single(
        &format!("{DP}flow_limit_sources = 0\n"),
        "dataplane.flow_limit_sources",
        "out of range",
    );
    assert_single(
        &format!("{DP}new_flow_table_size = 0\n"),
        "dataplane.new_flow_table_size",
        "out of range",
    );
}

#[test]
fn dataplane_mtu_defaults_to_1500_and_is_range_checked() {
    assert_eq!(parse_ok("").dataplane.mtu, 1500);
    assert_eq!(parse_ok("[dataplane]\nmtu = 9000\n").dataplane.mtu, 9000);
    assert_eq!(parse_ok("[dataplane]\nmtu = 576\n").dataplane.mtu, 576);
    for bad in [0, 575, 9217] {
        assert_single(
            &format!("[dataplane]\nmtu = {bad}\n"),
            "dataplane.mtu",
            "out of range: must be between 576 and 9216",
        );
    }
}

#[test]
fn max_new_flows_per_cpu_defaults_to_no_cap_and_is_range_checked() {
    assert_eq!(parse_ok("").dataplane.max_new_flows_per_cpu, 0);
    let cfg = parse_ok("[dataplane]\nmax_new_flows_per_cpu = 125000\n");
    assert_eq!(cfg.dataplane.max_new_flows_per_cpu, 125_000);
    assert_eq!(
        crate::dataplane::desired::DesiredState::new(&cfg.dataplane, Vec::new())
            .max_new_flows_per_cpu,
        125_000
    );
    assert_eq!(
        parse_ok("[dataplane]\nmax_new_flows_per_cpu = 100000000\n")
            .dataplane
            .max_new_flows_per_cpu,
        100_000_000
    );
    assert_single(
        "[dataplane]\nmax_new_flows_per_cpu = 100000001\n",
        "dataplane.max_new_flows_per_cpu",
        "out of range: must be between 0 (no cap) and 100000000",
    );
}

#[test]
fn icmp_errors_per_cpu_defaults_to_linux_rate_and_is_range_checked() {
    let default = parse_ok("");
    assert_eq!(default.dataplane.icmp_errors_per_cpu, 1000);
    assert_eq!(
        crate::dataplane::desired::DesiredState::new(&default.dataplane, Vec::new())
            .icmp_errors_per_cpu,
        1000
    );
    for (value, want) in [(0u32, 0u16), (1, 1), (65535, 65535)] {
        let cfg = parse_ok(&format!("[dataplane]\nicmp_errors_per_cpu = {value}\n"));
        assert_eq!(cfg.dataplane.icmp_errors_per_cpu, value);
        assert_eq!(
            crate::dataplane::desired::DesiredState::new(&cfg.dataplane, Vec::new())
                .icmp_errors_per_cpu,
            want
        );
    }
    assert_single(
        "[dataplane]\nicmp_errors_per_cpu = 65536\n",
        "dataplane.icmp_errors_per_cpu",
        "65536 is out of range: must be between 0 (no limit) and 65535",
    );
}

#[test]
fn gue_port_and_source_prefix_are_read_and_checked() {
    let cfg = parse_ok("");
    assert_eq!(cfg.dataplane.gue_port, 6080);
    assert_eq!(cfg.dataplane.source_ipv4_prefix, None);
    let cfg = parse_ok(
        "[dataplane]\nencap = \"gue\"\ngue_port = 7000\nsource_ipv4_prefix = \"198.18.4.0/24\"\n",
    );
    assert_eq!(cfg.dataplane.encap, Encap::Gue);
    assert_eq!(cfg.dataplane.gue_port, 7000);
    assert_eq!(
        cfg.dataplane.source_ipv4_prefix.as_deref(),
        Some("198.18.4.0/24")
    );
    // The prefix alone satisfies an l4 IPv4 service; source_ipv4 inside it is fine.
    parse_ok(
        "[dataplane]\nsource_ipv4_prefix = \"198.18.4.0/24\"\n[[service]]\nname = \"web\"\n\
         vip = \"198.18.100.1:80\"\n",
    );
    parse_ok(&format!("{DP}source_ipv4_prefix = \"198.18.1.0/24\"\n"));

    let prefix = "dataplane.source_ipv4_prefix";
    assert_single(
        "[dataplane]\ngue_port = 0\n",
        "dataplane.gue_port",
        "out of range",
    );
    for (bad, needle) in [
        ("198.18.4.1/24", "host bits set"),
        ("198.18.0.0/15", "too wide"),
        ("fd00:18::/64", "IPv6 prefix"),
        ("224.0.0.0/24", "multicast"),
        ("banana", "not a prefix"),
    ] {
        assert_single(
            &format!("[dataplane]\nsource_ipv4_prefix = \"{bad}\"\n"),
            prefix,
            needle,
        );
    }
    assert_single(
        &format!("{DP}source_ipv4_prefix = \"198.18.4.0/24\"\n"),
        prefix,
        "does not contain dataplane.source_ipv4 (198.18.1.10)",
    );
}

#[test]
fn source_ipv6_prefix_is_read_and_checked() {
    assert_eq!(parse_ok("").dataplane.source_ipv6_prefix, None);
    let cfg = parse_ok("[dataplane]\nsource_ipv6_prefix = \"fd00:18:4::/64\"\n");
    assert_eq!(
        cfg.dataplane.source_ipv6_prefix.as_deref(),
        Some("fd00:18:4::/64")
    );
    // The prefix alone satisfies an l4 IPv6 service and an IPv6 backend of an IPv4
    // VIP; source_ipv6 inside it is fine; /128 is one fixed source.
    parse_ok(
        "[dataplane]\nsource_ipv6_prefix = \"fd00:18:4::/96\"\n[[service]]\nname = \"v6\"\n\
         vip = \"[fd00:18:100::1]:80\"\nbackend = [{ address = \"fd00:18:1::11\" }]\n",
    );
    parse_ok(&format!(
        "{DP}source_ipv6_prefix = \"fd00:18:4::/64\"\n[[service]]\nname = \"mixed\"\n\
         vip = \"198.18.100.1:80\"\nbackend = [{{ address = \"fd00:18:1::12\" }}]\n"
    ));
    parse_ok(
        "[dataplane]\nsource_ipv6 = \"fd00:18:4::10\"\nsource_ipv6_prefix = \"fd00:18:4::/64\"\n",
    );
    parse_ok("[dataplane]\nsource_ipv6_prefix = \"fd00:18:4::10/128\"\n");
    // And source_ipv4_prefix alone serves an IPv4 backend of an IPv6 VIP (6in4).
    parse_ok(
        "[dataplane]\nsource_ipv4_prefix = \"198.18.4.0/24\"\n\
         source_ipv6_prefix = \"fd00:18:4::/64\"\n[[service]]\nname = \"v6\"\n\
         vip = \"[fd00:18:100::1]:80\"\nbackend = [{ address = \"198.18.1.11\" }]\n",
    );

    let prefix = "dataplane.source_ipv6_prefix";
    for (bad, needle) in [
        ("fd00:18:4::1/64", "host bits set"),
        ("fd00:18::/48", "too wide: /64 to /128"),
        ("198.18.4.0/24", "IPv4 prefix"),
        ("ff02::/64", "multicast"),
        ("::/64", "unspecified"),
        ("fd00:18:4::/129", "not a prefix"),
        ("banana", "not a prefix"),
    ] {
        assert_single(
            &format!("[dataplane]\nsource_ipv6_prefix = \"{bad}\"\n"),
            prefix,
            needle,
        );
    }
    assert_single(
        "[dataplane]\nsource_ipv6 = \"fd00:18:1::10\"\nsource_ipv6_prefix = \"fd00:18:4::/64\"\n",
        prefix,
        "does not contain dataplane.source_ipv6 (fd00:18:1::10)",
    );
}

#[test]
fn quic_routing_is_for_l4_udp_with_unique_ids() {
    let udp = |body: &str| {
        l4(&format!(
            "protocol = \"udp\"\n{body}\nbackend = [ {{ address = \"198.18.1.11\", quic_id = 7 }}, \
             {{ address = \"198.18.1.12\", quic_id = 8 }}, {{ address = \"198.18.1.13\" }} ]"
        ))
    };
    let cfg = parse_ok(&udp("quic = true"));
    assert!(cfg.services[0].quic);
    let ids: Vec<Option<u32>> = cfg.services[0].backends.iter().map(|b| b.quic_id).collect();
    assert_eq!(ids, [Some(7), Some(8), None]);

    assert_single(
        &l4("quic = true\nbackend = [ { address = \"198.18.1.11\" } ]"),
        "service[0].quic",
        "protocol = \"udp\"",
    );
    assert_single(
        &l4("protocol = \"udp\"\nbackend = [ { address = \"198.18.1.11\", quic_id = 7 } ]"),
        "service[0].backend[0].quic_id",
        "quic = true",
    );
    assert_single(
        &l4(
            "protocol = \"udp\"\nquic = true\nbackend = [ { address = \"198.18.1.11\", quic_id = 3 }, \
             { address = \"198.18.1.12\", quic_id = 3 } ]",
        ),
        "service[0].backend[1].quic_id",
        "already backend[0]'s",
    );
    assert_single(
        &l4(
            "protocol = \"udp\"\nquic = true\nbackend = [ { address = \"198.18.1.11\", quic_id = 0 } ]",
        ),
        "service[0].backend[0].quic_id",
        "out of range",
    );
}
