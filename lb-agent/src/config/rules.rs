//! The rules a configuration must follow beyond the types of its values: ranges,
//! names, addresses, and the rules between keys (mode and scheduler, VIP clashes,
//! capacities). They run on the model, so they apply alike to a file
//! ([`super::Config::parse`]), a model changed in code ([`super::Config::validate`])
//! and a service given through the API ([`validate_service`]). Errors carry key
//! paths; the reader places them in the file.

use std::collections::HashMap;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::ConfigError;
use super::model::{
    AgentConfig, BgpConfig, ClusterConfig, Config, DEFAULT_RING_SIZE, DataplaneConfig,
    FlowLimitConfig, HashOn, HealthConfig, HttpConfig, MAX_WORKERS, Mode, Protocol, Scheduler,
    SecurityConfig, ServiceConfig, TlsConfig, XdpMode,
};

/// Longest slow start accepted (one day).
const MAX_SLOW_START_S: u64 = 86_400;
const RING_SIZE_MIN: u32 = 13;
const RING_SIZE_MAX: u32 = 16_777_213;
const MAX_SERVICES_LIMIT: u32 = 4096;
const MAX_NAME_LEN: usize = 64;
/// Largest backend weight accepted.
pub const MAX_WEIGHT: u32 = 1_000_000;
const MAX_TIER: u8 = 7;
const MIN_INTERVAL_MS: u64 = 50;
const MAX_RISE_FALL: u32 = 100;
/// `IFNAMSIZ` - 1.
const MAX_IFNAME_LEN: usize = 15;
/// Largest `dataplane.max_filter_rules` (each rule is a trie node in kernel memory).
const MAX_FILTER_RULES_LIMIT: u32 = 1 << 20;
/// Largest `new_flows_per_source.rate` (new flows per second per source).
const MAX_FLOW_RATE: u32 = 100_000_000;
/// Largest `dataplane.max_new_flows_per_cpu`: well above what one CPU can take
/// (a few million packets per second), below the point where the cap means nothing.
pub const MAX_NEW_FLOWS_PER_CPU: u32 = 100_000_000;
/// Largest `dataplane.flow_limit_sources` and `dataplane.new_flow_table_size`.
const MAX_TABLE_LIMIT: u32 = 1 << 26;

/// The keys of a service that the other rules stand on (names and VIPs must be
/// unique, the mode decides what else is allowed): a service whose value for one of
/// them could not be read is left out of the rules rather than checked with a default.
const SERVICE_IDENTITY: &[&str] = &["name", "vip", "protocol", "mode", "scheduler"];

/// Where a model service (and each of its backends) came from in the file: entries
/// that could not be read are left out of the model, so indices can differ.
pub(super) struct ServiceIds {
    pub(super) index: usize,
    pub(super) backends: Vec<usize>,
}

/// The part of a model read from a file that the rules can check, and where its
/// entries are in the file.
///
/// `file_index(array)` gives the file index of each element read into the model from
/// the array at that key path; `read_errors` are the errors found while reading. A
/// service is left out when a key of [`SERVICE_IDENTITY`] could not be read; a
/// backend, when anything in it could not be (its address, port and weight are what
/// the backend rules compare).
pub(super) fn checkable(
    cfg: &Config,
    read_errors: &[ConfigError],
    file_index: impl Fn(&str) -> Vec<usize>,
) -> (Config, Vec<ServiceIds>) {
    let failed = |key: &str| {
        read_errors.iter().any(|e| {
            e.key
                .strip_prefix(key)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    };
    let mut checked = Config {
        services: Vec::new(),
        ..cfg.clone()
    };
    let mut ids = Vec::new();
    for (svc, index) in cfg.services.iter().zip(file_index("service")) {
        let prefix = format!("service[{index}]");
        if SERVICE_IDENTITY
            .iter()
            .any(|key| failed(&format!("{prefix}.{key}")))
        {
            continue;
        }
        let mut svc = svc.clone();
        let mut backends = Vec::new();
        svc.backends = std::mem::take(&mut svc.backends)
            .into_iter()
            .zip(file_index(&format!("{prefix}.backend")))
            .filter(|(_, i)| !failed(&format!("{prefix}.backend[{i}]")))
            .map(|(b, i)| {
                backends.push(i);
                b
            })
            .collect();
        checked.services.push(svc);
        ids.push(ServiceIds { index, backends });
    }
    (checked, ids)
}

/// Every rule over a model built in code: key paths with the model's indices.
pub(super) fn validate_config(cfg: &Config) -> Vec<ConfigError> {
    let ids: Vec<ServiceIds> = cfg
        .services
        .iter()
        .enumerate()
        .map(|(index, svc)| ServiceIds {
            index,
            backends: (0..svc.backends.len()).collect(),
        })
        .collect();
    validate_model(cfg, &ids)
}

/// Validate one service on its own (REST API) and against the others (name/VIP
/// clashes, capacities); key paths like `backend[2].weight`, line None.
///
/// `others` are the services it must coexist with: when replacing a service, leave
/// the one being replaced out. `agent` gives the agent's own listeners (an l7
/// service must not send its requests to one of them).
#[must_use]
pub fn validate_service(
    svc: &ServiceConfig,
    others: &[ServiceConfig],
    agent: &AgentConfig,
    dp: &DataplaneConfig,
) -> Vec<ConfigError> {
    let keys = Keys {
        prefix: String::new(),
        backends: None,
    };
    let mut errors = check_service(svc, others, dp, &keys);
    let mut report = Report {
        keys: &keys,
        errors: Vec::new(),
    };
    let all: Vec<&ServiceConfig> = others.iter().chain([svc]).collect();
    check_local_targets(svc, &all, agent, true, &mut report);
    errors.extend(report.errors);
    if (1..=MAX_SERVICES_LIMIT).contains(&dp.max_services)
        && others.len() >= dp.max_services as usize
    {
        errors.push(ConfigError::at_key(
            "name",
            format!(
                "{} services exist already, the most dataplane.max_services = {} allows",
                others.len(),
                dp.max_services
            ),
        ));
    }
    errors.extend(check_service_filter_totals(
        others
            .iter()
            .map(|o| (o, format!("(service {:?}) ", o.name)))
            .chain([(svc, String::new())]),
        dp,
    ));
    let others_backends: usize = others.iter().map(|o| o.backends.len()).sum();
    let total = others_backends + svc.backends.len();
    if dp.max_backends >= 1 && total > dp.max_backends as usize {
        errors.push(ConfigError::at_key(
            "backend",
            format!(
                "{} backends here and {others_backends} in other services make {total}, \
                 more than dataplane.max_backends = {}",
                svc.backends.len(),
                dp.max_backends
            ),
        ));
    }
    errors
}

/// Everything that can be checked on the model; `ids` maps model services to the
/// indices used in key paths.
pub(super) fn validate_model(cfg: &Config, ids: &[ServiceIds]) -> Vec<ConfigError> {
    let mut errors = check_agent(&cfg.agent);
    errors.extend(check_dataplane(&cfg.dataplane));
    if let Some(bgp) = &cfg.bgp {
        errors.extend(check_bgp(bgp));
    }
    if let Some(cluster) = &cfg.cluster {
        errors.extend(check_cluster(cluster));
    }
    errors.extend(validate_security(&cfg.security, &cfg.dataplane));
    for (i, (svc, id)) in cfg.services.iter().zip(ids).enumerate() {
        let keys = Keys {
            prefix: format!("service[{}].", id.index),
            backends: Some(&id.backends),
        };
        errors.extend(check_service(
            svc,
            &cfg.services[..i],
            &cfg.dataplane,
            &keys,
        ));
        let mut report = Report {
            keys: &keys,
            errors: Vec::new(),
        };
        let all: Vec<&ServiceConfig> = cfg.services.iter().collect();
        check_local_targets(svc, &all, &cfg.agent, false, &mut report);
        errors.extend(report.errors);
    }
    errors.extend(check_capacity(cfg, ids));
    errors
}

/// Builds key paths for a service's errors: relative (API) or `service[N].` (file).
struct Keys<'a> {
    prefix: String,
    /// File index of each model backend; `None` when they are the same.
    backends: Option<&'a [usize]>,
}

impl Keys<'_> {
    fn field(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn backend_id(&self, i: usize) -> usize {
        self.backends.map_or(i, |ids| ids[i])
    }

    fn backend(&self, i: usize, field: &str) -> String {
        format!("{}backend[{}].{field}", self.prefix, self.backend_id(i))
    }
}

fn check_agent(agent: &AgentConfig) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if let Some(interface) = &agent.interface {
        if let Some(why) = interface_name_problem(interface) {
            errors.push(ConfigError::at_key("agent.interface", why));
        }
    }
    if let Some(n) = agent.workers {
        if n == 0 || n > MAX_WORKERS {
            errors.push(ConfigError::at_key(
                "agent.workers",
                format!("{n} worker threads: must be 1 to {MAX_WORKERS} (omit it for one per CPU)"),
            ));
        }
    }
    let listen = agent.api_listen.ip().to_canonical();
    if !listen.is_loopback() && agent.api_token_file.is_none() {
        errors.push(ConfigError::at_key(
            "agent.api_listen",
            format!(
                "{} is not a loopback address: set agent.api_token_file so the API \
                 is not open to anyone who can reach it",
                agent.api_listen
            ),
        ));
    }
    if agent
        .api_token_file
        .as_ref()
        .is_some_and(|p| p.as_os_str().is_empty())
    {
        errors.push(ConfigError::at_key(
            "agent.api_token_file",
            "must not be empty",
        ));
    }
    for (key, path) in [
        ("agent.state_dir", &agent.state_dir),
        ("agent.bpffs", &agent.bpffs),
    ] {
        if path.as_os_str().is_empty() {
            errors.push(ConfigError::at_key(key, "must not be empty"));
        }
    }
    if let Some(dir) = &agent.tls_dir {
        if !dir.is_absolute() {
            errors.push(ConfigError::at_key(
                "agent.tls_dir",
                format!("\"{}\" must be an absolute path", dir.display()),
            ));
        }
    }
    errors
}

/// Longest `bgp.drain_s` accepted (ten minutes): a drain answers only after it.
const MAX_DRAIN_S: u64 = 600;

fn check_bgp(bgp: &BgpConfig) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (key, path) in [
        ("bgp.bird_socket", &bgp.bird_socket),
        ("bgp.include_file", &bgp.include_file),
    ] {
        if !path.is_absolute() {
            errors.push(ConfigError::at_key(
                key,
                format!("\"{}\" must be an absolute path", path.display()),
            ));
        } else if path.file_name().is_none() {
            errors.push(ConfigError::at_key(
                key,
                format!("\"{}\" must name a file", path.display()),
            ));
        }
    }
    if bgp.drain_s > MAX_DRAIN_S {
        errors.push(ConfigError::at_key(
            "bgp.drain_s",
            format!("{} is above the maximum {MAX_DRAIN_S}", bgp.drain_s),
        ));
    }
    if bgp.site_prepend > MAX_SITE_PREPEND {
        errors.push(ConfigError::at_key(
            "bgp.site_prepend",
            format!(
                "{} is above the maximum {MAX_SITE_PREPEND} (a few prepends already lose \
                 against any shorter path)",
                bgp.site_prepend
            ),
        ));
    }
    match bgp.local_as {
        Some(asn) if asn == 0 || asn == AS_TRANS || asn == u32::MAX => {
            errors.push(ConfigError::at_key(
                "bgp.local_as",
                format!(
                    "{asn} is reserved (0, 23456 and 4294967295 are not AS numbers a node may use)"
                ),
            ));
        }
        None if bgp.site_prepend > 0 => errors.push(ConfigError::at_key(
            "bgp.site_prepend",
            format!(
                "{} prepends need bgp.local_as (this node's AS number, as in its BIRD's \
                 `local ... as N`)",
                bgp.site_prepend
            ),
        )),
        _ => {}
    }
    errors
}

/// Most AS-path prepends `bgp.site_prepend` takes.
const MAX_SITE_PREPEND: u8 = 10;

/// AS_TRANS (RFC 6793): stands in for a 4-byte AS towards old speakers, never a node's AS.
const AS_TRANS: u32 = 23456;

/// `[cluster]`: a node name usable as an etcd key segment and a metric label, http
/// URLs of etcd members, an absolute key prefix.
fn check_cluster(c: &ClusterConfig) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    // The same rules as a service name: a key segment in etcd and a metric label.
    if let Some(why) = service_name_problem(&c.node) {
        errors.push(ConfigError::at_key(
            "cluster.node",
            why.replace("service name", "node name"),
        ));
    }
    if c.etcd.is_empty() {
        errors.push(ConfigError::at_key(
            "cluster.etcd",
            "give at least one etcd member's client URL (\"http://host:port\")",
        ));
    }
    for (i, url) in c.etcd.iter().enumerate() {
        let ok = url
            .strip_prefix("http://")
            .and_then(|rest| rest.rsplit_once(':'))
            .is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        if !ok {
            errors.push(ConfigError::at_key(
                format!("cluster.etcd[{i}]"),
                format!("{url:?} is not \"http://host:port\" (TLS to etcd is not supported yet)"),
            ));
        }
    }
    let p = &c.prefix;
    if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') || p.contains("//") {
        errors.push(ConfigError::at_key(
            "cluster.prefix",
            format!("{p:?} must start with '/', not end with '/' and have no empty segment (e.g. \"/xdplb\")"),
        ));
    }
    errors
}

fn check_dataplane(dp: &DataplaneConfig) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut push = |key: &str, message: String| errors.push(ConfigError::at_key(key, message));
    if !(RING_SIZE_MIN..=RING_SIZE_MAX).contains(&dp.ring_size) {
        push(
            "dataplane.ring_size",
            format!(
                "{} is out of range: the Maglev table size must be a prime between \
                 {RING_SIZE_MIN} and {RING_SIZE_MAX} (default {DEFAULT_RING_SIZE})",
                dp.ring_size
            ),
        );
    } else if !is_prime(dp.ring_size) {
        let hint = next_prime(dp.ring_size)
            .filter(|p| *p <= RING_SIZE_MAX)
            .map(|p| format!(", for example {p}"))
            .unwrap_or_default();
        push(
            "dataplane.ring_size",
            format!(
                "{} is not a prime: the Maglev table size must be prime{hint}",
                dp.ring_size
            ),
        );
    }
    if dp.flow_table_size == 0 {
        push("dataplane.flow_table_size", "must be at least 1".to_owned());
    }
    if !(1..=MAX_SERVICES_LIMIT).contains(&dp.max_services) {
        push(
            "dataplane.max_services",
            format!(
                "{} is out of range: must be between 1 and {MAX_SERVICES_LIMIT}",
                dp.max_services
            ),
        );
    }
    if dp.max_backends == 0 {
        push("dataplane.max_backends", "must be at least 1".to_owned());
    }
    if !(1..=MAX_FILTER_RULES_LIMIT).contains(&dp.max_filter_rules) {
        push(
            "dataplane.max_filter_rules",
            format!(
                "{} is out of range: must be between 1 and {MAX_FILTER_RULES_LIMIT}",
                dp.max_filter_rules
            ),
        );
    }
    if let Some(n) = dp.new_flow_table_size {
        if !(1..=MAX_TABLE_LIMIT).contains(&n) {
            push(
                "dataplane.new_flow_table_size",
                format!("{n} is out of range: must be between 1 and {MAX_TABLE_LIMIT}"),
            );
        }
    }
    if !(1..=MAX_TABLE_LIMIT).contains(&dp.flow_limit_sources) {
        push(
            "dataplane.flow_limit_sources",
            format!(
                "{} is out of range: must be between 1 and {MAX_TABLE_LIMIT}",
                dp.flow_limit_sources
            ),
        );
    }
    if !super::model::MTU_RANGE.contains(&dp.mtu) {
        push(
            "dataplane.mtu",
            format!(
                "{} is out of range: must be between {} and {} (bytes of IP packet towards the backends)",
                dp.mtu,
                super::model::MTU_RANGE.start(),
                super::model::MTU_RANGE.end()
            ),
        );
    }
    if let Some(ip) = dp.source_ipv4 {
        if let Some(kind) = non_unicast(IpAddr::V4(ip)) {
            push(
                "dataplane.source_ipv4",
                format!("{ip} is {kind} address; the tunnel source must be a unicast address"),
            );
        }
    }
    if let Some(ip) = dp.source_ipv6 {
        if let Some(kind) = non_unicast(IpAddr::V6(ip)) {
            push(
                "dataplane.source_ipv6",
                format!("{ip} is {kind} address; the tunnel source must be a unicast address"),
            );
        }
    }
    if dp.max_new_flows_per_cpu > MAX_NEW_FLOWS_PER_CPU {
        push(
            "dataplane.max_new_flows_per_cpu",
            format!(
                "{} is out of range: must be between 0 (no cap) and {MAX_NEW_FLOWS_PER_CPU} \
                 new flows per second and CPU",
                dp.max_new_flows_per_cpu
            ),
        );
    }
    if dp.icmp_errors_per_cpu > super::model::MAX_ICMP_ERRORS_PER_CPU {
        push(
            "dataplane.icmp_errors_per_cpu",
            format!(
                "{} is out of range: must be between 0 (no limit) and \
                 {} ICMP errors per second and CPU",
                dp.icmp_errors_per_cpu,
                super::model::MAX_ICMP_ERRORS_PER_CPU
            ),
        );
    }
    if dp.gue_port == 0 {
        push(
            "dataplane.gue_port",
            "0 is out of range: must be between 1 and 65535 (the UDP port backends \
             decapsulate GUE on)"
                .to_owned(),
        );
    }
    if let Some(text) = &dp.source_ipv4_prefix {
        if let Err(why) = source_prefix_problem(text, dp.source_ipv4) {
            push("dataplane.source_ipv4_prefix", why);
        }
    }
    if let Some(text) = &dp.source_ipv6_prefix {
        if let Err(why) = source_prefix6_problem(text, dp.source_ipv6) {
            push("dataplane.source_ipv6_prefix", why);
        }
    }
    errors
}

/// Shortest `dataplane.source_ipv4_prefix`: 16 bits of a flow's entropy are left for
/// the host bits.
pub const SOURCE_PREFIX_MIN_LEN: u8 = 16;

/// What is wrong with `dataplane.source_ipv4_prefix` (given `source_ipv4`), if anything.
fn source_prefix_problem(text: &str, source: Option<std::net::Ipv4Addr>) -> Result<(), String> {
    let ipnet::IpNet::V4(net) = parse_prefix(text)? else {
        return Err(format!(
            "{text} is an IPv6 prefix; the outer IPv4 source needs an IPv4 one"
        ));
    };
    if net.prefix_len() < SOURCE_PREFIX_MIN_LEN {
        return Err(format!(
            "{text} is too wide: /{SOURCE_PREFIX_MIN_LEN} to /32 (16 bits of a flow's hash vary \
             the host part)"
        ));
    }
    if let Some(kind) = non_unicast(IpAddr::V4(net.network())) {
        return Err(format!(
            "{text} is {kind} prefix; tunnel sources must be unicast addresses"
        ));
    }
    if let Some(ip) = source.filter(|ip| !net.contains(ip)) {
        return Err(format!(
            "{text} does not contain dataplane.source_ipv4 ({ip}); the prefix replaces it as \
             the outer source, so give one inside it or leave source_ipv4 out"
        ));
    }
    Ok(())
}

/// Shortest `dataplane.source_ipv6_prefix`: a /64, the usual subnet; the tunnel varies
/// at most the last 32 bits of the address (a flow's hash has 32).
pub const SOURCE_PREFIX6_MIN_LEN: u8 = 64;

/// What is wrong with `dataplane.source_ipv6_prefix` (given `source_ipv6`), if anything.
fn source_prefix6_problem(text: &str, source: Option<std::net::Ipv6Addr>) -> Result<(), String> {
    let ipnet::IpNet::V6(net) = parse_prefix(text)? else {
        return Err(format!(
            "{text} is an IPv4 prefix; the outer IPv6 source needs an IPv6 one"
        ));
    };
    if net.prefix_len() < SOURCE_PREFIX6_MIN_LEN {
        return Err(format!(
            "{text} is too wide: /{SOURCE_PREFIX6_MIN_LEN} to /128 (up to 32 bits of a flow's \
             hash vary the last 32 bits of the address)"
        ));
    }
    if let Some(kind) = non_unicast(IpAddr::V6(net.network())) {
        return Err(format!(
            "{text} is {kind} prefix; tunnel sources must be unicast addresses"
        ));
    }
    if let Some(ip) = source.filter(|ip| !net.contains(ip)) {
        return Err(format!(
            "{text} does not contain dataplane.source_ipv6 ({ip}); the prefix replaces it as \
             the outer source, so give one inside it or leave source_ipv6 out"
        ));
    }
    Ok(())
}

/// A source prefix of `[security]`: `address/length`, IPv4 or IPv6, with no host
/// bits set (`10.0.0.1/8` is refused rather than silently widened to `10.0.0.0/8`).
pub fn parse_prefix(text: &str) -> Result<ipnet::IpNet, String> {
    let net: ipnet::IpNet = text.parse().map_err(|_| {
        format!(
            "{text:?} is not a prefix: expected address/length, such as \"203.0.113.0/24\" \
             or \"2001:db8::/32\""
        )
    })?;
    if net.trunc() != net {
        return Err(format!(
            "{text} has host bits set after /{len}: did you mean {trunc}?",
            len = net.prefix_len(),
            trunc = net.trunc()
        ));
    }
    Ok(net)
}

/// The rules of `[security]` (for the file, a reload and `PUT /api/v1/filters`): every
/// prefix parses without host bits, none is listed twice in one list, each list
/// fits `dataplane.max_filter_rules`, and `new_flows_per_source` is in range. Key
/// paths are `security.deny[N]`.
#[must_use]
pub fn validate_security(sec: &SecurityConfig, dp: &DataplaneConfig) -> Vec<ConfigError> {
    let mut errors = check_prefix_lists(&sec.deny, &sec.allow, "security.", dp);
    if let Some(limit) = &sec.new_flows_per_source {
        errors.extend(check_flow_limit(limit, "security.new_flows_per_source."));
    }
    errors
}

/// `deny` and `allow` source prefix lists (of `[security]` or of a service), with key
/// paths `{prefix}deny[N]`.
fn check_prefix_lists(
    deny: &[String],
    allow: &[String],
    prefix: &str,
    dp: &DataplaneConfig,
) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    for (kind, list) in [("deny", deny), ("allow", allow)] {
        let mut seen: HashMap<ipnet::IpNet, usize> = HashMap::new();
        for (i, text) in list.iter().enumerate() {
            let key = format!("{prefix}{kind}[{i}]");
            match parse_prefix(text) {
                Ok(net) => {
                    if let Some(first) = seen.insert(net, i) {
                        errors.push(ConfigError::at_key(
                            key,
                            format!("{net} is listed twice (also {prefix}{kind}[{first}])"),
                        ));
                    }
                }
                Err(message) => errors.push(ConfigError::at_key(key, message)),
            }
        }
        if list.len() > dp.max_filter_rules as usize {
            errors.push(ConfigError::at_key(
                format!("{prefix}{kind}"),
                format!(
                    "{} prefixes are more than dataplane.max_filter_rules = {}",
                    list.len(),
                    dp.max_filter_rules
                ),
            ));
        }
    }
    errors
}

/// `new_flows_per_source = { rate, burst, prefix_v4, prefix_v6 }`; key paths
/// `{prefix}rate` and so on.
fn check_flow_limit(limit: &FlowLimitConfig, prefix: &str) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if !(1..=MAX_FLOW_RATE).contains(&limit.rate) {
        errors.push(ConfigError::at_key(
            format!("{prefix}rate"),
            format!(
                "{} is out of range: new flows per second per source, 1 to {MAX_FLOW_RATE}",
                limit.rate
            ),
        ));
    }
    if limit.burst == 0 {
        errors.push(ConfigError::at_key(
            format!("{prefix}burst"),
            "must be at least 1 (the new flows a source may open at once)",
        ));
    }
    if limit.prefix_v4 > 32 {
        errors.push(ConfigError::at_key(
            format!("{prefix}prefix_v4"),
            format!(
                "{} is more than the 32 bits of an IPv4 address",
                limit.prefix_v4
            ),
        ));
    }
    if limit.prefix_v6 > 128 {
        errors.push(ConfigError::at_key(
            format!("{prefix}prefix_v6"),
            format!(
                "{} is more than the 128 bits of an IPv6 address",
                limit.prefix_v6
            ),
        ));
    }
    errors
}

/// The services' own `deny` (and `allow`) lists share one trie of
/// `dataplane.max_filter_rules` entries: the sum over the services must fit. `extra`
/// is a service not in `services` (the API's new one); errors are reported at the
/// first service over (with `key_of` its key prefix) or at `extra_prefix`.
fn check_service_filter_totals<'a>(
    services: impl Iterator<Item = (&'a ServiceConfig, String)>,
    dp: &DataplaneConfig,
) -> Vec<ConfigError> {
    let max = dp.max_filter_rules as usize;
    let mut errors = Vec::new();
    let (mut deny, mut allow) = (0usize, 0usize);
    let (mut deny_over, mut allow_over) = (false, false);
    for (svc, prefix) in services {
        deny += svc.deny.len();
        allow += svc.allow.len();
        for (kind, total, over) in [
            ("deny", deny, &mut deny_over),
            ("allow", allow, &mut allow_over),
        ] {
            if total > max && !*over {
                *over = true;
                errors.push(ConfigError::at_key(
                    format!("{prefix}{kind}"),
                    format!(
                        "the services' own {kind} lists hold {total} prefixes up to here, more \
                         than dataplane.max_filter_rules = {max} (they share one trie)"
                    ),
                ));
            }
        }
    }
    errors
}

/// Service and backend counts against the map capacities, reported once at the
/// first entry over the limit.
fn check_capacity(cfg: &Config, ids: &[ServiceIds]) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let dp = &cfg.dataplane;
    let max_services = dp.max_services as usize;
    if (1..=MAX_SERVICES_LIMIT).contains(&dp.max_services) && cfg.services.len() > max_services {
        errors.push(ConfigError::at_key(
            format!("service[{}]", ids[max_services].index),
            format!(
                "{} services are configured, more than dataplane.max_services = {}",
                cfg.services.len(),
                dp.max_services
            ),
        ));
    }
    errors.extend(check_service_filter_totals(
        cfg.services
            .iter()
            .zip(ids)
            .map(|(s, id)| (s, format!("service[{}].", id.index))),
        dp,
    ));
    let total: usize = cfg.services.iter().map(|s| s.backends.len()).sum();
    let max_backends = dp.max_backends as usize;
    if max_backends >= 1 && total > max_backends {
        let mut seen = 0;
        for (svc, id) in cfg.services.iter().zip(ids) {
            if seen + svc.backends.len() > max_backends {
                errors.push(ConfigError::at_key(
                    format!(
                        "service[{}].backend[{}]",
                        id.index,
                        id.backends[max_backends - seen]
                    ),
                    format!(
                        "{total} backends are configured in all, more than \
                         dataplane.max_backends = {max_backends}; this is the first one over"
                    ),
                ));
                break;
            }
            seen += svc.backends.len();
        }
    }
    errors
}

/// Collects the errors of one service, with key paths from [`Keys`].
struct Report<'k, 'a> {
    keys: &'k Keys<'a>,
    errors: Vec<ConfigError>,
}

impl Report<'_, '_> {
    fn field(&mut self, name: &str, message: impl Into<String>) {
        let key = self.keys.field(name);
        self.errors.push(ConfigError::at_key(key, message));
    }

    fn backend(&mut self, i: usize, field: &str, message: impl Into<String>) {
        let key = self.keys.backend(i, field);
        self.errors.push(ConfigError::at_key(key, message));
    }
}

fn check_service(
    svc: &ServiceConfig,
    others: &[ServiceConfig],
    dp: &DataplaneConfig,
    keys: &Keys<'_>,
) -> Vec<ConfigError> {
    let mut report = Report {
        keys,
        errors: Vec::new(),
    };
    check_identity(svc, others, &mut report);
    check_mode(svc, dp, &mut report);
    check_backends(svc, &mut report);
    check_quic(svc, &mut report);
    check_health(&svc.health, &mut report);
    check_l7_extras(svc, &mut report);
    report
        .errors
        .extend(check_prefix_lists(&svc.deny, &svc.allow, &keys.prefix, dp));
    if let Some(limit) = &svc.new_flows_per_source {
        report.errors.extend(check_flow_limit(
            limit,
            &keys.field("new_flows_per_source."),
        ));
    }
    report.errors
}

/// Name and VIP, alone and against the other services.
fn check_identity(svc: &ServiceConfig, others: &[ServiceConfig], report: &mut Report<'_, '_>) {
    if let Some(why) = service_name_problem(&svc.name) {
        report.field("name", why);
    } else if others.iter().any(|o| o.name == svc.name) {
        report.field(
            "name",
            format!(
                "service name \"{}\" is already used by another service",
                svc.name
            ),
        );
    }
    let vip = svc.vip;
    if vip.port() == 0 {
        report.field("vip", format!("{vip}: the VIP port must not be 0"));
    }
    if let Some(kind) = non_unicast(vip.ip()) {
        report.field(
            "vip",
            format!(
                "{} is {kind} address; a VIP must be a unicast address",
                vip.ip()
            ),
        );
    }
    let clash = others.iter().find(|o| {
        o.vip.ip() == vip.ip() && o.vip.port() == vip.port() && o.protocol == svc.protocol
    });
    if let Some(other) = clash {
        report.field(
            "vip",
            format!(
                "VIP {vip}/{} is already used by service \"{}\"",
                svc.protocol, other.name
            ),
        );
    }
}

/// What the mode allows: scheduler, address family, protocol, l7-only features, and
/// the dataplane settings an l4 service relies on.
fn check_mode(svc: &ServiceConfig, dp: &DataplaneConfig, report: &mut Report<'_, '_>) {
    if !svc.scheduler.allowed_in(svc.mode) {
        let allowed: Vec<&str> = Scheduler::ALL
            .iter()
            .filter(|s| s.allowed_in(svc.mode))
            .map(|s| s.as_str())
            .collect();
        report.field(
            "scheduler",
            format!(
                "scheduler \"{}\" is not available with mode = \"{}\"; use one of: {}",
                svc.scheduler,
                svc.mode,
                allowed.join(", ")
            ),
        );
    }
    match svc.mode {
        Mode::L4 => {
            if svc.sticky.is_some() {
                report.field("sticky", "sticky sessions are only for mode = \"l7\"");
            }
            if svc.cache.is_some() {
                report.field("cache", "caching is only for mode = \"l7\"");
            }
            if svc.tls.is_some() {
                report.field("tls", "TLS termination is only for mode = \"l7\"");
            }
            if svc.http != HttpConfig::default() {
                report.field("http", "http settings are only for mode = \"l7\"");
            }
            if svc.backend_protocol != super::model::BackendProtocol::Http1 {
                report.field(
                    "backend_protocol",
                    "backend_protocol is only for mode = \"l7\" (l4 forwards packets, not requests)",
                );
            }
            if svc.backend_tls.is_some() {
                report.field("backend_tls", "TLS to backends is only for mode = \"l7\"");
            }
            if svc.vip.is_ipv4()
                && dp.xdp_mode != XdpMode::Off
                && dp.source_ipv4.is_none()
                && dp.source_ipv4_prefix.is_none()
            {
                report.field(
                    "vip",
                    "an l4 IPv4 service needs dataplane.source_ipv4 (the outer source address \
                     of tunnelled packets) or dataplane.source_ipv4_prefix unless \
                     dataplane.xdp_mode = \"off\"",
                );
            }
            if svc.vip.is_ipv6()
                && dp.xdp_mode != XdpMode::Off
                && dp.source_ipv6.is_none()
                && dp.source_ipv6_prefix.is_none()
            {
                report.field(
                    "vip",
                    "an l4 IPv6 service needs dataplane.source_ipv6 (the outer source address \
                     of tunnelled packets) or dataplane.source_ipv6_prefix unless \
                     dataplane.xdp_mode = \"off\"",
                );
            }
            // The tunnel's family is the backend's: IPv4 in IPv6 towards an IPv6
            // backend, IPv6 in IPv4 towards an IPv4 one; each needs that family's source.
            if dp.xdp_mode != XdpMode::Off {
                for (i, b) in svc.backends.iter().enumerate() {
                    if b.address.is_ipv6()
                        && !svc.vip.is_ipv6()
                        && dp.source_ipv6.is_none()
                        && dp.source_ipv6_prefix.is_none()
                    {
                        report.backend(
                            i,
                            "address",
                            "an IPv6 backend is reached through an IPv6 tunnel, which needs \
                             dataplane.source_ipv6 (or dataplane.source_ipv6_prefix)",
                        );
                    }
                    if b.address.is_ipv4()
                        && !svc.vip.is_ipv4()
                        && dp.source_ipv4.is_none()
                        && dp.source_ipv4_prefix.is_none()
                    {
                        report.backend(
                            i,
                            "address",
                            "an IPv4 backend is reached through an IPv4 tunnel, which needs \
                             dataplane.source_ipv4 (or dataplane.source_ipv4_prefix)",
                        );
                    }
                }
            }
        }
        Mode::L7 => {
            if svc.protocol != Protocol::Tcp {
                report.field(
                    "protocol",
                    format!(
                        "protocol \"{}\" cannot be used with mode = \"l7\": the HTTP proxy \
                         needs protocol = \"tcp\"",
                        svc.protocol
                    ),
                );
            }
            if svc.new_flows_per_source.is_some() {
                report.field(
                    "new_flows_per_source",
                    "new_flows_per_source is for mode = \"l4\" services: the packets of an \
                     l7 service go to the kernel and its proxy before the fast path makes \
                     flows (deny and allow do apply)",
                );
            }
        }
    }
}

fn check_backends(svc: &ServiceConfig, report: &mut Report<'_, '_>) {
    let vip_port = svc.vip.port();
    let mut seen: HashMap<(IpAddr, u16), usize> = HashMap::new();
    for (i, b) in svc.backends.iter().enumerate() {
        if let Some(kind) = non_unicast(b.address) {
            report.backend(
                i,
                "address",
                format!(
                    "{} is {kind} address; a backend needs a unicast address",
                    b.address
                ),
            );
        }
        if let Some(&first) = seen.get(&(b.address, b.port)) {
            let first = report.keys.backend_id(first);
            report.backend(
                i,
                "address",
                format!(
                    "duplicate backend {}: already listed as backend[{first}]",
                    SocketAddr::new(b.address, b.port)
                ),
            );
        } else {
            seen.insert((b.address, b.port), i);
        }
        if b.weight > MAX_WEIGHT {
            report.backend(
                i,
                "weight",
                format!(
                    "{} is out of range: must be between 0 (drain) and {MAX_WEIGHT}",
                    b.weight
                ),
            );
        }
        if b.tier > MAX_TIER {
            report.backend(
                i,
                "tier",
                format!(
                    "{} is out of range: must be between 0 and {MAX_TIER}",
                    b.tier
                ),
            );
        }
        if svc.mode == Mode::L4 && b.port != vip_port {
            report.backend(
                i,
                "port",
                format!(
                    "port {} differs from the VIP port {vip_port}: l4 mode (DSR over IPIP) \
                     does not rewrite ports, so a backend must listen on the VIP port (or use \
                     mode = \"l7\")",
                    b.port
                ),
            );
        }
    }
}

/// `quic` (l4 UDP services) and the backends' `quic_id` (only there, not 0, unique in
/// the service).
fn check_quic(svc: &ServiceConfig, report: &mut Report<'_, '_>) {
    if svc.quic && (svc.mode != Mode::L4 || svc.protocol != Protocol::Udp) {
        report.field(
            "quic",
            "QUIC connection-ID routing is for mode = \"l4\" with protocol = \"udp\"",
        );
    }
    let mut seen: HashMap<u32, usize> = HashMap::new();
    for (i, b) in svc.backends.iter().enumerate() {
        let Some(id) = b.quic_id else { continue };
        if !svc.quic {
            report.backend(
                i,
                "quic_id",
                "a quic_id is used only by a service with quic = true",
            );
        } else if id == 0 {
            report.backend(
                i,
                "quic_id",
                "0 is out of range: must be between 1 and 4294967295 (0 means no server id)",
            );
        } else if let Some(&first) = seen.get(&id) {
            let first = report.keys.backend_id(first);
            report.backend(
                i,
                "quic_id",
                format!("quic_id {id} is already backend[{first}]'s: each must be unique"),
            );
        } else {
            seen.insert(id, i);
        }
    }
}

fn check_health(h: &HealthConfig, report: &mut Report<'_, '_>) {
    if h.interval_ms < MIN_INTERVAL_MS {
        report.field(
            "health.interval_ms",
            format!(
                "{} is too small: must be at least {MIN_INTERVAL_MS}",
                h.interval_ms
            ),
        );
    }
    if h.timeout_ms == 0 {
        report.field("health.timeout_ms", "must be at least 1");
    } else if h.timeout_ms > h.interval_ms {
        report.field(
            "health.timeout_ms",
            format!(
                "{} is longer than health.interval_ms = {}: the timeout must not exceed the \
                 interval",
                h.timeout_ms, h.interval_ms
            ),
        );
    }
    for (key, value) in [("health.rise", h.rise), ("health.fall", h.fall)] {
        if !(1..=MAX_RISE_FALL).contains(&value) {
            report.field(
                key,
                format!("{value} is out of range: must be between 1 and {MAX_RISE_FALL}"),
            );
        }
    }
    if !h.path.starts_with('/') {
        report.field("health.path", format!("\"{}\" must start with '/'", h.path));
    }
    if h.host
        .as_deref()
        .is_some_and(|host| host.is_empty() || host.contains(char::is_whitespace))
    {
        report.field(
            "health.host",
            "must be a non-empty host name without spaces",
        );
    }
    let (lo, hi) = h.expect_status;
    if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) {
        report.field(
            "health.expect_status",
            format!("[{lo}, {hi}]: HTTP status codes must be between 100 and 599"),
        );
    } else if lo > hi {
        report.field(
            "health.expect_status",
            format!("[{lo}, {hi}]: the first code must not be greater than the second"),
        );
    }
}

/// Most entries of `cache.targets`.
const MAX_CACHE_TARGETS: usize = 8;

/// Largest `cache.stale_if_unreachable_s`: one year.
const MAX_STALE_IF_UNREACHABLE_S: u64 = 365 * 24 * 3600;

/// `cache.targets`: at most [`MAX_CACHE_TARGETS`] distinct header field names (RFC 9110
/// tokens), none of them a field the cache reads anyway.
fn check_cache_targets(targets: &[String], report: &mut Report<'_, '_>) {
    if targets.len() > MAX_CACHE_TARGETS {
        report.field(
            "cache.targets",
            format!("{} names: at most {MAX_CACHE_TARGETS}", targets.len()),
        );
    }
    let mut seen: Vec<String> = Vec::new();
    for name in targets {
        let lower = name.to_ascii_lowercase();
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            report.field(
                "cache.targets",
                format!(
                    "\"{name}\" is not a header field name (RFC 9110 token: letters, digits \
                     and !#$%&'*+-.^_`|~)"
                ),
            );
        } else if matches!(lower.as_str(), "cache-control" | "expires" | "pragma") {
            report.field(
                "cache.targets",
                format!(
                    "\"{name}\" is read anyway: list only targeted fields (RFC 9213), \
                     e.g. \"CDN-Cache-Control\""
                ),
            );
        } else if seen.contains(&lower) {
            report.field("cache.targets", format!("\"{name}\" is listed twice"));
        }
        seen.push(lower);
    }
}

/// The values of `sticky` and `cache` (their presence in l4 mode is [`check_mode`]'s).
fn check_l7_extras(svc: &ServiceConfig, report: &mut Report<'_, '_>) {
    if let Some(sticky) = &svc.sticky {
        if !is_cookie_name(&sticky.cookie) {
            report.field(
                "sticky.cookie",
                format!(
                    "\"{}\" is not a valid cookie name (RFC 6265 token: printable ASCII \
                     without spaces or ()<>@,;:\\\"/[]?={{}})",
                    sticky.cookie
                ),
            );
        }
        if sticky.ttl_s == 0 {
            report.field("sticky.ttl_s", "must be at least 1");
        }
    }
    if let Some(cache) = &svc.cache {
        if cache.max_bytes == 0 {
            report.field("cache.max_bytes", "must be at least 1");
        }
        if cache.max_object_bytes == 0 {
            report.field("cache.max_object_bytes", "must be at least 1");
        }
        check_cache_targets(&cache.targets, report);
        if cache.stale_if_unreachable_s > MAX_STALE_IF_UNREACHABLE_S {
            report.field(
                "cache.stale_if_unreachable_s",
                format!(
                    "{} is more than {MAX_STALE_IF_UNREACHABLE_S} (one year)",
                    cache.stale_if_unreachable_s
                ),
            );
        }
    }
    if let Some(tls) = &svc.tls {
        let mut readable = true;
        for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
            if let Err(e) = fs::metadata(path) {
                report.field(key, format!("cannot read {}: {e}", path.display()));
                readable = false;
            }
        }
        // Loaded by the code the proxy sets TLS up with, so a file that is not a PEM
        // certificate, a key that is not one or does not match is refused here, by
        // key, rather than logged when the service starts.
        if readable && svc.mode == Mode::L7 {
            if let Err(e) = crate::l7::tls::server_config(tls) {
                let key = match e {
                    crate::l7::tls::TlsError::Cert { .. } => "tls.cert",
                    crate::l7::tls::TlsError::Key { .. } => "tls.key",
                    crate::l7::tls::TlsError::Pair { .. }
                    | crate::l7::tls::TlsError::Ca { .. }
                    | crate::l7::tls::TlsError::ServerName { .. } => "tls",
                };
                report.field(key, e.to_string());
            }
        }
    }
    check_backend_tls(svc, report);
    let h = &svc.http;
    for (key, v) in [
        ("http.connect_timeout_ms", h.connect_timeout_ms),
        ("http.header_timeout_ms", h.header_timeout_ms),
        ("http.idle_timeout_ms", h.idle_timeout_ms),
        ("http.response_timeout_ms", h.response_timeout_ms),
        ("http.eject_base_ms", h.eject_base_ms),
    ] {
        if v == 0 {
            report.field(key, "must be at least 1");
        }
    }
    if h.max_header_bytes < 1024 {
        report.field(
            "http.max_header_bytes",
            format!("must be at least 1024, found {}", h.max_header_bytes),
        );
    }
    if h.max_headers == 0 {
        report.field("http.max_headers", "must be at least 1");
    }
    if h.retries > 10 {
        report.field(
            "http.retries",
            format!("must be at most 10, found {}", h.retries),
        );
    }
    if h.eject_max_ms < h.eject_base_ms {
        report.field(
            "http.eject_max_ms",
            format!(
                "must be at least http.eject_base_ms ({}), found {}",
                h.eject_base_ms, h.eject_max_ms
            ),
        );
    }
    if svc.hash_on != HashOn::Client && svc.scheduler != Scheduler::Hash {
        report.field(
            "hash_on",
            format!(
                "hash_on is used only by scheduler = \"hash\" (this service uses \"{}\")",
                svc.scheduler
            ),
        );
    }
    if svc.slow_start_s > MAX_SLOW_START_S {
        report.field(
            "slow_start_s",
            format!(
                "must be at most {MAX_SLOW_START_S} (one day), found {}",
                svc.slow_start_s
            ),
        );
    }
}

/// `backend_protocol` and `backend_tls` (l7): `h2c` is cleartext; the TLS settings
/// are loaded by the code the proxy uses, so a bad CA file or server name is refused
/// here, by key.
fn check_backend_tls(svc: &ServiceConfig, report: &mut Report<'_, '_>) {
    use super::model::BackendProtocol;
    if svc.backend_protocol == BackendProtocol::H2c && svc.backend_tls.is_some() {
        report.field(
            "backend_tls",
            "backend_protocol = \"h2c\" is HTTP/2 over cleartext TCP: remove backend_tls, or \
             use backend_protocol = \"h2\" (HTTP/2 over TLS)",
        );
        return;
    }
    if svc.mode != Mode::L7 || !(svc.backend_tls.is_some() || svc.backend_protocol.needs_tls()) {
        return;
    }
    let tls = svc.backend_tls.clone().unwrap_or_default();
    if let Err(e) = crate::l7::tls::client_config(&tls, &[b"h2"]) {
        let key = match e {
            crate::l7::tls::TlsError::ServerName { .. } => "backend_tls.server_name",
            crate::l7::tls::TlsError::Ca { .. } if tls.ca.is_some() => "backend_tls.ca",
            _ => "backend_tls",
        };
        let why = if svc.backend_tls.is_none() {
            format!(
                "{e} (backend_protocol = \"{}\" uses TLS; without backend_tls it trusts the \
                 system's certificate authorities: set backend_tls.ca)",
                svc.backend_protocol
            )
        } else {
            e.to_string()
        };
        report.field(key, why);
    }
}

fn service_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("a service name must not be empty".to_owned())
    } else if name.chars().count() > MAX_NAME_LEN {
        Some(format!(
            "service name is {} characters long, the most allowed is {MAX_NAME_LEN}",
            name.chars().count()
        ))
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
    {
        // The name is a path segment of the API's URLs, a metric label and part of
        // file names: no '/', no "." or "..", nothing that reads as an option.
        Some(format!(
            "service name \"{name}\" may only contain ASCII letters, digits, '_', '.' and \
             '-', and must start with a letter or digit"
        ))
    } else {
        None
    }
}

/// Whether a socket bound to `listen` receives what is sent to `target`: the same
/// address and port, or a wildcard address on the same port.
fn listens_on(listen: SocketAddr, target: SocketAddr) -> bool {
    listen.port() == target.port()
        && (listen.ip().is_unspecified()
            || listen.ip().to_canonical() == target.ip().to_canonical())
}

/// An l7 service must not send its requests to this agent itself: a backend that is
/// an l7 VIP (its own or another service's) or the API, or (`reverse`, for a service
/// checked against others that are not checked again) a VIP that another l7 service
/// has as backend, loops every request through the proxy. Its VIP must not be the
/// API's address either. The loops that pass through another host are the proxy's to
/// detect at run time.
fn check_local_targets(
    svc: &ServiceConfig,
    all: &[&ServiceConfig],
    agent: &AgentConfig,
    reverse: bool,
    report: &mut Report<'_, '_>,
) {
    if svc.mode != Mode::L7 {
        return;
    }
    let api = agent.api_listen;
    if listens_on(api, svc.vip) {
        report.field(
            "vip",
            format!(
                "{} is the agent's own API address (agent.api_listen = {api}): an l7 VIP \
                 needs an address and port of its own",
                svc.vip
            ),
        );
    }
    for (i, b) in svc.backends.iter().enumerate() {
        let target = SocketAddr::new(b.address, b.port);
        let why = if listens_on(api, target) {
            Some(format!("the agent's own API (agent.api_listen = {api})"))
        } else if listens_on(svc.vip, target) {
            Some("this service's own VIP".to_owned())
        } else {
            all.iter()
                .find(|o| o.mode == Mode::L7 && o.name != svc.name && listens_on(o.vip, target))
                .map(|o| format!("the VIP of l7 service \"{}\" on this agent", o.name))
        };
        if let Some(why) = why {
            report.backend(
                i,
                "address",
                format!(
                    "{target} is {why}: the proxy would send every request back to itself \
                     (a loop); a backend must be another server"
                ),
            );
        }
    }
    if reverse {
        let user = all.iter().find(|o| {
            o.mode == Mode::L7
                && o.name != svc.name
                && o.backends
                    .iter()
                    .any(|b| listens_on(svc.vip, SocketAddr::new(b.address, b.port)))
        });
        if let Some(other) = user {
            report.field(
                "vip",
                format!(
                    "{} is a backend of l7 service \"{}\" on this agent: that service would \
                     send its requests here and loop through the proxy",
                    svc.vip, other.name
                ),
            );
        }
    }
}

/// The `tls` of a service given through the API (or read back from the state file)
/// may only name files in `agent.tls_dir`, after following symbolic links and `..`:
/// an API client must not make the agent read any file it can. `kept` is the `tls`
/// the service has already (from the config file, say): keeping it is allowed.
#[must_use]
pub fn check_api_tls(
    svc: &ServiceConfig,
    agent: &AgentConfig,
    kept: Option<&TlsConfig>,
) -> Vec<ConfigError> {
    let Some(tls) = &svc.tls else {
        return Vec::new();
    };
    if Some(tls) == kept {
        return Vec::new();
    }
    let Some(dir) = &agent.tls_dir else {
        return vec![ConfigError::at_key(
            "tls",
            "TLS files cannot be named through the API unless agent.tls_dir names the \
             directory they must be in (services of the config file may name any path)",
        )];
    };
    let mut errors = Vec::new();
    for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
        if let Some(why) = outside(path, dir) {
            errors.push(ConfigError::at_key(key, why));
        }
    }
    errors
}

/// The `backend_tls.ca` of a service given through the API follows the rule of
/// [`check_api_tls`]: a file in `agent.tls_dir`, unless the service keeps the
/// `backend_tls` it has (`kept`).
#[must_use]
pub fn check_api_backend_tls(
    svc: &ServiceConfig,
    agent: &AgentConfig,
    kept: Option<&super::model::BackendTlsConfig>,
) -> Vec<ConfigError> {
    let Some(ca) = svc.backend_tls.as_ref().and_then(|t| t.ca.as_ref()) else {
        return Vec::new();
    };
    if kept.and_then(|k| k.ca.as_ref()) == Some(ca) {
        return Vec::new();
    }
    let Some(dir) = &agent.tls_dir else {
        return vec![ConfigError::at_key(
            "backend_tls.ca",
            "TLS files cannot be named through the API unless agent.tls_dir names the \
             directory they must be in (services of the config file may name any path)",
        )];
    };
    outside(ca, dir)
        .map(|why| ConfigError::at_key("backend_tls.ca", why))
        .into_iter()
        .collect()
}

/// Why `path` is not a file inside `dir` (both resolved), if it is not.
fn outside(path: &Path, dir: &Path) -> Option<String> {
    let shown = path.display();
    if !path.is_absolute() {
        return Some(format!("\"{shown}\" must be an absolute path"));
    }
    let dir_real = match fs::canonicalize(dir) {
        Ok(d) => d,
        Err(e) => return Some(format!("agent.tls_dir {}: {e}", dir.display())),
    };
    match fs::canonicalize(path) {
        Err(e) => Some(format!("cannot read {shown}: {e}")),
        Ok(real) if real.starts_with(&dir_real) && real != dir_real => None,
        Ok(real) => Some(format!(
            "{shown} (that is {}) is outside agent.tls_dir = {}: the API may only name \
             files in it",
            real.display(),
            dir.display()
        )),
    }
}

/// Linux accepts an interface name of 1 to 15 bytes without '/', ':' or white space.
fn interface_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("must not be empty (leave it out to take --iface)".to_owned())
    } else if name.len() > MAX_IFNAME_LEN {
        Some(format!(
            "\"{name}\" is longer than {MAX_IFNAME_LEN} bytes, the limit for interface names"
        ))
    } else if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        Some(format!("\"{name}\" is not a valid interface name"))
    } else {
        None
    }
}

/// `Some("a multicast")` and the like when `ip` cannot be a unicast endpoint.
fn non_unicast(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified")
    } else if ip.is_multicast() {
        Some("a multicast")
    } else if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast")
    } else {
        None
    }
}

/// An RFC 9110 token character (header field names).
pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 6265 `cookie-name` = RFC 2616 `token`: one or more printable ASCII characters
/// other than separators.
pub(super) fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

pub(super) fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    if n.is_multiple_of(2) {
        return false;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 2;
    }
    true
}

pub(super) fn next_prime(n: u32) -> Option<u32> {
    (n..=u32::MAX).find(|&c| is_prime(c))
}
