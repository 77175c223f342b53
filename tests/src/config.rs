//! A builder for the agent's TOML config (DESIGN.md, "Config"), so tests can vary
//! services, backends, weights and tiers without string templates of their own.
//!
//! Only keys that are set are written: omitted ones take the agent's documented
//! defaults, which is itself part of what the tests exercise.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
};

/// One `[[service]]` backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// Backend address.
    pub address: IpAddr,
    /// `port`; omitted means the VIP's port.
    pub port: Option<u16>,
    /// `weight`; omitted means 100.
    pub weight: Option<u32>,
    /// `tier`; omitted means 0.
    pub tier: Option<u32>,
}

impl BackendConfig {
    /// A backend with every optional key omitted.
    pub fn new(address: impl Into<IpAddr>) -> Self {
        Self {
            address: address.into(),
            port: None,
            weight: None,
            tier: None,
        }
    }

    /// Sets `weight`.
    #[must_use]
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Sets `port`.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Sets `tier`.
    #[must_use]
    pub fn tier(mut self, tier: u32) -> Self {
        self.tier = Some(tier);
        self
    }

    fn to_inline_table(&self) -> String {
        let mut s = format!("{{ address = \"{}\"", self.address);
        if let Some(p) = self.port {
            let _ = write!(s, ", port = {p}");
        }
        if let Some(w) = self.weight {
            let _ = write!(s, ", weight = {w}");
        }
        if let Some(t) = self.tier {
            let _ = write!(s, ", tier = {t}");
        }
        s.push_str(" }");
        s
    }
}

/// One `[[service]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceConfig {
    /// `name`.
    pub name: String,
    /// `vip` (address and port).
    pub vip: SocketAddr,
    /// `protocol` (`tcp` | `udp`); omitted means tcp.
    pub protocol: Option<String>,
    /// `mode` (`l4` | `l7`); omitted means l4.
    pub mode: Option<String>,
    /// `scheduler`; omitted means the mode's default.
    pub scheduler: Option<String>,
    /// `health` as an inline TOML table, e.g. `{ kind = "tcp", interval_ms = 200 }`.
    pub health: Option<String>,
    /// The backends.
    pub backends: Vec<BackendConfig>,
    /// Further `key = value` lines written verbatim into the table (for keys this
    /// builder does not know yet).
    pub extra: Vec<String>,
}

impl ServiceConfig {
    /// A service with no backends and every optional key omitted.
    pub fn new(name: &str, vip: SocketAddr) -> Self {
        Self {
            name: name.to_owned(),
            vip,
            protocol: None,
            mode: None,
            scheduler: None,
            health: None,
            backends: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Adds a backend.
    #[must_use]
    pub fn backend(mut self, backend: BackendConfig) -> Self {
        self.backends.push(backend);
        self
    }

    /// Sets `protocol`.
    #[must_use]
    pub fn protocol(mut self, protocol: &str) -> Self {
        self.protocol = Some(protocol.to_owned());
        self
    }

    /// Sets `mode`.
    #[must_use]
    pub fn mode(mut self, mode: &str) -> Self {
        self.mode = Some(mode.to_owned());
        self
    }

    /// Sets `scheduler`.
    #[must_use]
    pub fn scheduler(mut self, scheduler: &str) -> Self {
        self.scheduler = Some(scheduler.to_owned());
        self
    }

    /// Sets `health` (an inline TOML table).
    #[must_use]
    pub fn health(mut self, health: &str) -> Self {
        self.health = Some(health.to_owned());
        self
    }

    /// Adds a verbatim `key = value` line.
    #[must_use]
    pub fn extra(mut self, line: &str) -> Self {
        self.extra.push(line.to_owned());
        self
    }
}

/// The whole agent config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbConfig {
    /// `[agent] interface`.
    pub interface: String,
    /// `[agent] api_listen`, if set.
    pub api_listen: Option<String>,
    /// `[dataplane] xdp_mode`, if set (the CLI's `--xdp-mode` overrides it).
    pub xdp_mode: Option<String>,
    /// `[dataplane] source_ipv4`.
    pub source_ipv4: Option<Ipv4Addr>,
    /// `[dataplane] ring_size`.
    pub ring_size: Option<u32>,
    /// `[dataplane] flow_table_size`.
    pub flow_table_size: Option<u32>,
    /// The services.
    pub services: Vec<ServiceConfig>,
}

impl LbConfig {
    /// An empty config for `interface`.
    pub fn new(interface: &str) -> Self {
        Self {
            interface: interface.to_owned(),
            api_listen: None,
            xdp_mode: None,
            source_ipv4: None,
            ring_size: None,
            flow_table_size: None,
            services: Vec::new(),
        }
    }

    /// Adds a service.
    #[must_use]
    pub fn service(mut self, service: ServiceConfig) -> Self {
        self.services.push(service);
        self
    }

    /// Sets `source_ipv4`.
    #[must_use]
    pub fn source_ipv4(mut self, addr: Ipv4Addr) -> Self {
        self.source_ipv4 = Some(addr);
        self
    }

    /// Sets `ring_size` and `flow_table_size`.
    #[must_use]
    pub fn sizes(mut self, ring_size: u32, flow_table_size: u32) -> Self {
        self.ring_size = Some(ring_size);
        self.flow_table_size = Some(flow_table_size);
        self
    }

    /// The service called `name`, to change it in place.
    pub fn service_mut(&mut self, name: &str) -> Option<&mut ServiceConfig> {
        self.services.iter_mut().find(|s| s.name == name)
    }

    /// Renders the TOML, with `state_dir` in `[agent]`.
    pub fn to_toml(&self, state_dir: &Path) -> String {
        let mut s = String::from("[agent]\n");
        let _ = writeln!(s, "interface = {}", quote(&self.interface));
        let _ = writeln!(s, "state_dir = {}", quote(&state_dir.to_string_lossy()));
        if let Some(api) = &self.api_listen {
            let _ = writeln!(s, "api_listen = {}", quote(api));
        }
        s.push_str("\n[dataplane]\n");
        if let Some(m) = &self.xdp_mode {
            let _ = writeln!(s, "xdp_mode = {}", quote(m));
        }
        if let Some(a) = self.source_ipv4 {
            let _ = writeln!(s, "source_ipv4 = \"{a}\"");
        }
        if let Some(r) = self.ring_size {
            let _ = writeln!(s, "ring_size = {r}");
        }
        if let Some(f) = self.flow_table_size {
            let _ = writeln!(s, "flow_table_size = {f}");
        }
        for svc in &self.services {
            s.push_str("\n[[service]]\n");
            let _ = writeln!(s, "name = {}", quote(&svc.name));
            let _ = writeln!(s, "vip = \"{}\"", svc.vip);
            for (key, value) in [
                ("protocol", &svc.protocol),
                ("mode", &svc.mode),
                ("scheduler", &svc.scheduler),
            ] {
                if let Some(v) = value {
                    let _ = writeln!(s, "{key} = {}", quote(v));
                }
            }
            if let Some(h) = &svc.health {
                let _ = writeln!(s, "health = {h}");
            }
            for line in &svc.extra {
                let _ = writeln!(s, "{line}");
            }
            s.push_str("backend = [\n");
            for b in &svc.backends {
                let _ = writeln!(s, "  {},", b.to_inline_table());
            }
            s.push_str("]\n");
        }
        s
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04x}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_step1_config() {
        let cfg = LbConfig::new("eth0")
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
            );
        let toml = cfg.to_toml(Path::new("/tmp/x \"y\"/state"));
        let expected = r#"[agent]
interface = "eth0"
state_dir = "/tmp/x \"y\"/state"

[dataplane]
source_ipv4 = "198.18.1.10"
ring_size = 65537
flow_table_size = 65536

[[service]]
name = "web"
vip = "198.18.100.1:80"
backend = [
  { address = "198.18.1.11" },
  { address = "198.18.1.12", port = 8080, weight = 50, tier = 1 },
]
"#;
        assert_eq!(toml, expected);
    }

    #[test]
    fn ipv6_vips_are_bracketed() {
        let svc = ServiceConfig::new("v6", "[fd00:18::100]:443".parse().unwrap()).protocol("udp");
        let toml = LbConfig::new("eth0").service(svc).to_toml(Path::new("/s"));
        assert!(toml.contains("vip = \"[fd00:18::100]:443\""), "{toml}");
        assert!(toml.contains("protocol = \"udp\""), "{toml}");
    }
}
