//! A builder for the agent's TOML config (DESIGN.md, "Config"), so tests can vary
//! services, backends, weights and tiers without string templates of their own.
//!
//! The builder holds only the keys a test sets, as TOML values made by serde from
//! typed values, and the `toml` crate writes the file: omitted keys take the agent's
//! documented defaults, which is itself part of what the tests exercise. No key list
//! lives here: the helpers (`weight`, `mode`, `sizes` ...) are shorthands, and `set`
//! (or `extra`) takes any key of the agent's model. [`LbConfig::model`] reads the
//! result back into the agent's own model ([`lb_agent::config::Config`]), defaults
//! filled in by the agent's code.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use serde::Serialize;
use toml::{Table, Value};

/// A TOML value made by serde from `value`.
///
/// # Panics
///
/// `value` has no TOML form (a unit, a map with non-string keys): a bug in the test.
fn toml_value(value: impl Serialize) -> Value {
    Value::try_from(value).expect("a value with a TOML form")
}

/// The keys of `text`, a TOML snippet such as `cache = { max_bytes = 1024 }`.
///
/// # Panics
///
/// `text` is not valid TOML: a bug in the test.
fn snippet(text: &str) -> Table {
    text.parse()
        .unwrap_or_else(|e| panic!("not a TOML key = value line: {text:?}: {e}"))
}

/// One `[[service]]` backend.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendConfig {
    keys: Table,
}

impl BackendConfig {
    /// A backend with every optional key omitted.
    pub fn new(address: impl Into<IpAddr>) -> Self {
        Self { keys: Table::new() }.set("address", address.into())
    }

    /// Sets any key of a backend.
    #[must_use]
    pub fn set(mut self, key: &str, value: impl Serialize) -> Self {
        self.keys.insert(key.to_owned(), toml_value(value));
        self
    }

    /// Sets `weight`.
    #[must_use]
    pub fn weight(self, weight: u32) -> Self {
        self.set("weight", weight)
    }

    /// Sets `port`.
    #[must_use]
    pub fn port(self, port: u16) -> Self {
        self.set("port", port)
    }

    /// Sets `tier`.
    #[must_use]
    pub fn tier(self, tier: u32) -> Self {
        self.set("tier", tier)
    }
}

/// One `[[service]]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    keys: Table,
    backends: Vec<BackendConfig>,
}

impl ServiceConfig {
    /// A service with no backends and every optional key omitted.
    pub fn new(name: &str, vip: SocketAddr) -> Self {
        Self {
            keys: Table::new(),
            backends: Vec::new(),
        }
        .set("name", name)
        .set("vip", vip)
    }

    /// `name`.
    pub fn name(&self) -> &str {
        self.keys
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    /// Sets any key of a service.
    #[must_use]
    pub fn set(mut self, key: &str, value: impl Serialize) -> Self {
        self.keys.insert(key.to_owned(), toml_value(value));
        self
    }

    /// Adds a backend.
    #[must_use]
    pub fn backend(mut self, backend: BackendConfig) -> Self {
        self.backends.push(backend);
        self
    }

    /// Sets `protocol`.
    #[must_use]
    pub fn protocol(self, protocol: &str) -> Self {
        self.set("protocol", protocol)
    }

    /// Sets `mode`.
    #[must_use]
    pub fn mode(self, mode: &str) -> Self {
        self.set("mode", mode)
    }

    /// Sets `scheduler`.
    #[must_use]
    pub fn scheduler(self, scheduler: &str) -> Self {
        self.set("scheduler", scheduler)
    }

    /// Sets `health` (an inline TOML table, e.g. `{ kind = "tcp", interval_ms = 200 }`).
    #[must_use]
    pub fn health(self, health: &str) -> Self {
        self.extra(&format!("health = {health}"))
    }

    /// Sets the keys of a TOML `key = value` line (e.g. `cache = { max_bytes = 1024 }`).
    #[must_use]
    pub fn extra(mut self, line: &str) -> Self {
        self.keys.extend(snippet(line));
        self
    }

    fn table(&self) -> Table {
        let mut t = self.keys.clone();
        let backends = self.backends.iter().map(|b| Value::Table(b.keys.clone()));
        let backends = backends.collect();
        t.insert("backend".to_owned(), Value::Array(backends));
        t
    }
}

/// The whole agent config.
#[derive(Clone, Debug, PartialEq)]
pub struct LbConfig {
    /// `[agent] interface`.
    pub interface: String,
    agent: Table,
    dataplane: Table,
    /// Further top-level tables (`[bgp]`, ...), by name.
    tables: Table,
    /// The services.
    pub services: Vec<ServiceConfig>,
}

impl LbConfig {
    /// An empty config for `interface`.
    pub fn new(interface: &str) -> Self {
        Self {
            interface: interface.to_owned(),
            agent: Table::new(),
            dataplane: Table::new(),
            tables: Table::new(),
            services: Vec::new(),
        }
    }

    /// Adds a service.
    #[must_use]
    pub fn service(mut self, service: ServiceConfig) -> Self {
        self.services.push(service);
        self
    }

    /// Sets any key of `[agent]`.
    #[must_use]
    pub fn agent(mut self, key: &str, value: impl Serialize) -> Self {
        self.agent.insert(key.to_owned(), toml_value(value));
        self
    }

    /// Sets any key of `[dataplane]`.
    #[must_use]
    pub fn dataplane(mut self, key: &str, value: impl Serialize) -> Self {
        self.dataplane.insert(key.to_owned(), toml_value(value));
        self
    }

    /// Sets any key of a further top-level table (`[bgp]`, ...), creating the table.
    ///
    /// # Panics
    ///
    /// `table` names a key that is not a table: a bug in the test.
    #[must_use]
    pub fn table(mut self, table: &str, key: &str, value: impl Serialize) -> Self {
        let t = self
            .tables
            .entry(table)
            .or_insert_with(|| Value::Table(Table::new()));
        t.as_table_mut()
            .expect("a table")
            .insert(key.to_owned(), toml_value(value));
        self
    }

    /// Sets a whole further table, e.g. `[cluster]` from a serialisable struct or map
    /// (replacing what [`LbConfig::table`] set in it).
    #[must_use]
    pub fn section(mut self, name: &str, value: impl Serialize) -> Self {
        self.tables.insert(name.to_owned(), toml_value(value));
        self
    }

    /// Sets `api_listen`.
    #[must_use]
    pub fn api_listen(self, addr: &str) -> Self {
        self.agent("api_listen", addr)
    }

    /// Sets `xdp_mode` (the CLI's `--xdp-mode` overrides it).
    #[must_use]
    pub fn xdp_mode(self, mode: &str) -> Self {
        self.dataplane("xdp_mode", mode)
    }

    /// Sets `source_ipv4`.
    #[must_use]
    pub fn source_ipv4(self, addr: Ipv4Addr) -> Self {
        self.dataplane("source_ipv4", addr)
    }

    /// Sets `ring_size` and `flow_table_size`.
    #[must_use]
    pub fn sizes(self, ring_size: u32, flow_table_size: u32) -> Self {
        self.dataplane("ring_size", ring_size)
            .dataplane("flow_table_size", flow_table_size)
    }

    /// The service called `name`, to change it in place.
    pub fn service_mut(&mut self, name: &str) -> Option<&mut ServiceConfig> {
        self.services.iter_mut().find(|s| s.name() == name)
    }

    /// The document, with `state_dir` in `[agent]` when given.
    fn document(&self, state_dir: Option<&Path>) -> Table {
        let mut agent = self.agent.clone();
        agent.insert("interface".to_owned(), toml_value(&self.interface));
        if let Some(dir) = state_dir {
            agent.insert("state_dir".to_owned(), toml_value(dir));
        }
        let mut doc = Table::new();
        doc.insert("agent".to_owned(), Value::Table(agent));
        doc.insert("dataplane".to_owned(), Value::Table(self.dataplane.clone()));
        doc.extend(self.tables.clone());
        let services = self.services.iter().map(|s| Value::Table(s.table()));
        doc.insert("service".to_owned(), Value::Array(services.collect()));
        doc
    }

    /// Renders the TOML, with `state_dir` in `[agent]`.
    ///
    /// # Panics
    ///
    /// A key was set to a value TOML cannot write: a bug in the test.
    pub fn to_toml(&self, state_dir: &Path) -> String {
        toml::to_string(&self.document(Some(state_dir))).expect("a TOML document")
    }

    /// The agent's model of this config, with the agent's defaults filled in (not
    /// checked against the agent's rules: see `lb_agent::config::Config::parse`).
    ///
    /// # Errors
    ///
    /// A key the agent does not know, or a value of the wrong type.
    pub fn model(&self) -> Result<lb_agent::config::Config, toml::de::Error> {
        Value::Table(self.document(None)).try_into()
    }
}

#[cfg(test)]
mod tests {
    use lb_agent::config::{Config, Mode, Scheduler};

    use super::*;

    fn step1() -> LbConfig {
        LbConfig::new("eth0")
            .source_ipv4(Ipv4Addr::new(198, 18, 1, 10))
            .sizes(65537, 65536)
            .service(
                ServiceConfig::new("web", "198.18.100.1:80".parse().unwrap())
                    .backend(BackendConfig::new(Ipv4Addr::new(198, 18, 1, 11)))
                    .backend(
                        BackendConfig::new(Ipv4Addr::new(198, 18, 1, 12))
                            .weight(50)
                            .tier(1)
                            .port(8080),
                    ),
            )
    }

    #[test]
    fn renders_the_step1_config() {
        let state_dir = Path::new("/tmp/x \"y\"/state");
        let text = step1().to_toml(state_dir);
        // The agent's model reads it (its rules would refuse port 8080 in l4, which is
        // not the point here), and what the test set is what the agent has.
        let cfg: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(cfg.agent.interface.as_deref(), Some("eth0"));
        assert_eq!(cfg.agent.state_dir, state_dir);
        assert_eq!(
            cfg.dataplane.source_ipv4,
            Some(Ipv4Addr::new(198, 18, 1, 10))
        );
        assert_eq!(
            (cfg.dataplane.ring_size, cfg.dataplane.flow_table_size),
            (65537, 65536)
        );
        let [svc] = &cfg.services[..] else {
            panic!("one service: {cfg:?}")
        };
        assert_eq!(
            (svc.name.as_str(), svc.vip.to_string()),
            ("web", "198.18.100.1:80".to_owned())
        );
        let backends: Vec<(String, u16, u32, u8)> = svc
            .backends
            .iter()
            .map(|b| (b.address.to_string(), b.port, b.weight, b.tier))
            .collect();
        assert_eq!(
            backends,
            [
                ("198.18.1.11".to_owned(), 80, 100, 0),
                ("198.18.1.12".to_owned(), 8080, 50, 1)
            ]
        );
        // Only the keys set are written; the rest are the agent's defaults.
        for omitted in [
            "protocol",
            "mode",
            "scheduler",
            "health",
            "xdp_mode",
            "api_listen",
        ] {
            assert!(!text.contains(omitted), "{omitted} in\n{text}");
        }
        assert_eq!(text.matches("weight").count(), 1, "{text}");
        let mut model = step1().model().expect("model");
        model.agent.state_dir = state_dir.to_owned();
        assert_eq!(model, cfg);
    }

    #[test]
    fn the_suites_default_config_is_valid_for_the_agent() {
        let mut cfg = crate::topology::Topology::default_config().api_listen("127.0.0.1:9090");
        let web = cfg.service_mut("web").expect("web");
        *web = web
            .clone()
            .health(r#"{ kind = "http", path = "/healthz", interval_ms = 200, timeout_ms = 150 }"#);
        let text = cfg.to_toml(Path::new("/s"));
        let parsed = Config::parse(&text, "bed.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(parsed.services[0].backends.len(), 3);
    }

    #[test]
    fn further_tables_reach_the_agent() {
        let cfg = LbConfig::new("eth0")
            .table("bgp", "bird_socket", "/run/x/bird.ctl")
            .table("bgp", "site_prepend", 2)
            .table("bgp", "local_as", 65001);
        let model = cfg.model().expect("model");
        let bgp = model.bgp.expect("[bgp]");
        assert_eq!(bgp.bird_socket, Path::new("/run/x/bird.ctl"));
        assert_eq!((bgp.site_prepend, bgp.local_as), (2, Some(65001)));
        assert_eq!(bgp.drain_s, 5, "omitted keys take the agent's defaults");
        Config::parse(&cfg.to_toml(Path::new("/s")), "bgp.toml").expect("valid");
    }

    #[test]
    fn ipv6_vips_are_bracketed() {
        let svc = ServiceConfig::new("v6", "[fd00:18::100]:443".parse().unwrap()).protocol("udp");
        let toml = LbConfig::new("eth0").service(svc).to_toml(Path::new("/s"));
        assert!(toml.contains("vip = \"[fd00:18::100]:443\""), "{toml}");
        assert!(toml.contains("protocol = \"udp\""), "{toml}");
    }

    #[test]
    fn any_key_of_the_model_can_be_set() {
        let svc = ServiceConfig::new("shop", "198.18.100.2:80".parse().unwrap())
            .mode("l7")
            .health(r#"{ kind = "http", interval_ms = 200, timeout_ms = 150 }"#)
            .extra(r#"sticky = { cookie = "S", ttl_s = 600 }"#)
            .set("slow_start_s", 30)
            .backend(BackendConfig::new(Ipv4Addr::new(198, 18, 1, 11)).set("tier", 2));
        let cfg = LbConfig::new("eth0")
            .xdp_mode("off")
            .api_listen("127.0.0.1:19090")
            .service(svc);
        let model = cfg.model().expect("model");
        let shop = &model.services[0];
        assert_eq!(
            (shop.mode, shop.scheduler),
            (Mode::L7, Scheduler::RoundRobin)
        );
        assert_eq!(shop.health.interval_ms, 200);
        assert_eq!(shop.sticky.as_ref().map(|s| s.ttl_s), Some(600));
        assert_eq!(shop.slow_start_s, 30);
        assert_eq!((shop.backends[0].port, shop.backends[0].tier), (80, 2));
        assert_eq!(model.agent.api_listen, "127.0.0.1:19090".parse().unwrap());
        Config::parse(&cfg.to_toml(Path::new("/s")), "shop.toml").expect("valid");
        // A key the agent does not know is the agent's error, not a silent no-op.
        let typo = LbConfig::new("eth0").dataplane("ring_sise", 13);
        assert!(
            typo.model()
                .expect_err("unknown")
                .to_string()
                .contains("ring_sise")
        );
    }
}
