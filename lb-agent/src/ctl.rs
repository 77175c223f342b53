//! `lb-agent ctl`: a small client of the REST API for operators.
//!
//! ```text
//! lb-agent ctl [--api URL] [--token T] status|services|backends SVC|drain SVC ADDR|
//!              enable SVC ADDR|disable SVC ADDR|weight SVC ADDR N|stats|reload
//! ```
//!
//! Prints human-readable tables; a failed request prints the API's `{"error"}` message
//! (through the returned error) so the command exits non-zero.

use std::{io::Write, net::IpAddr, time::Duration};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::{Value, json};

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug, PartialEq, Eq, Subcommand)]
pub enum CtlCommand {
    /// Is the agent alive, and how are its services doing.
    Status,
    /// List services: VIP, mode, active tier, fail-open, backends.
    Services,
    /// List a service's backends: tier, weight, state, health, serving.
    Backends { service: String },
    /// Stop sending new flows to a backend; its established flows continue.
    Drain { service: String, address: IpAddr },
    /// Let a drained or disabled backend serve again.
    Enable { service: String, address: IpAddr },
    /// Take a backend out at once: its established flows move to other backends.
    Disable { service: String, address: IpAddr },
    /// Set a backend's weight (0 drains it).
    Weight {
        service: String,
        address: IpAddr,
        weight: u32,
    },
    /// Fast-path traffic per service and backend, global counters and drops.
    Stats,
    /// Make the agent re-read its config file.
    Reload,
}

/// Run one command against the API at `api`, printing to stdout.
pub fn run(api: &str, token: Option<&str>, cmd: CtlCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    run_to(api, token, cmd, &mut out)
}

/// [`run`], printing to `out`.
pub fn run_to(
    api: &str,
    token: Option<&str>,
    cmd: CtlCommand,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let client = Client::new(api, token);
    match cmd {
        CtlCommand::Status => {
            client.call("GET", "/healthz", None)?;
            let services = client.call("GET", "/api/v1/services", None)?;
            status(out, client.base(), &services)?;
        }
        CtlCommand::Services => {
            let services = client.call("GET", "/api/v1/services", None)?;
            services_table(out, &services)?;
        }
        CtlCommand::Backends { service } => {
            let svc = client.call("GET", &format!("/api/v1/services/{service}"), None)?;
            backends_table(out, &svc)?;
        }
        CtlCommand::Drain { service, address } => {
            let b = client.patch(&service, address, json!({ "state": "drain" }))?;
            backend_line(out, &service, &b)?;
        }
        CtlCommand::Enable { service, address } => {
            let b = client.patch(&service, address, json!({ "state": "enabled" }))?;
            backend_line(out, &service, &b)?;
        }
        CtlCommand::Disable { service, address } => {
            let b = client.patch(&service, address, json!({ "state": "disabled" }))?;
            backend_line(out, &service, &b)?;
        }
        CtlCommand::Weight {
            service,
            address,
            weight,
        } => {
            let b = client.patch(&service, address, json!({ "weight": weight }))?;
            backend_line(out, &service, &b)?;
        }
        CtlCommand::Stats => {
            let stats = client.call("GET", "/api/v1/stats", None)?;
            stats_tables(out, &stats)?;
        }
        CtlCommand::Reload => {
            let r = client.call("POST", "/api/v1/reload", None)?;
            writeln!(
                out,
                "reloaded: {} service(s)",
                r["services"].as_u64().unwrap_or(0)
            )?;
        }
    }
    Ok(())
}

struct Client {
    agent: ureq::Agent,
    base: String,
    auth: Option<String>,
}

impl Client {
    fn new(api: &str, token: Option<&str>) -> Self {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(TIMEOUT))
            .build();
        Self {
            agent: config.into(),
            base: api.trim_end_matches('/').to_owned(),
            auth: token.map(|t| format!("Bearer {t}")),
        }
    }

    fn base(&self) -> &str {
        &self.base
    }

    /// One request; the JSON answer (Null for an empty one), or the API's error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(auth) = &self.auth {
            request = request.header("Authorization", auth);
        }
        let sent = match body {
            Some(body) => self.agent.run(
                request
                    .header("Content-Type", "application/json")
                    .body(serde_json::to_vec(&body)?)?,
            ),
            None => self.agent.run(request.body(())?),
        };
        let mut response = sent.with_context(|| format!("{method} {url}"))?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to {method} {url}"))?;
        let value: Option<Value> = serde_json::from_str(&text).ok();
        if !status.is_success() {
            let message = value
                .as_ref()
                .and_then(|v| v["error"].as_str())
                .map_or_else(|| text.trim().to_owned(), str::to_owned);
            bail!("{method} {path}: {status}: {message}");
        }
        match value {
            Some(v) => Ok(v),
            None if text.trim().is_empty() => Ok(Value::Null),
            None => bail!("{method} {url}: the answer is not JSON: {text:.200}"),
        }
    }

    fn patch(&self, service: &str, address: IpAddr, body: Value) -> anyhow::Result<Value> {
        self.call(
            "PATCH",
            &format!("/api/v1/services/{service}/backends/{address}"),
            Some(body),
        )
    }
}

/// Rows printed with each column as wide as its widest cell.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Self {
        Self {
            rows: vec![header.iter().map(|h| (*h).to_owned()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn print(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn yes_no(v: &Value) -> String {
    match v.as_bool() {
        Some(true) => "yes".to_owned(),
        Some(false) => "no".to_owned(),
        None => "-".to_owned(),
    }
}

fn address_port(b: &Value) -> String {
    let port = text(&b["port"]);
    match b["address"].as_str() {
        Some(a) if a.contains(':') => format!("[{a}]:{port}"),
        Some(a) => format!("{a}:{port}"),
        None => "-".to_owned(),
    }
}

fn services_of(v: &Value) -> &[Value] {
    v["services"].as_array().map_or(&[], Vec::as_slice)
}

fn backends_of(svc: &Value) -> &[Value] {
    svc["backends"].as_array().map_or(&[], Vec::as_slice)
}

fn count(backends: &[Value], key: &str) -> usize {
    backends
        .iter()
        .filter(|b| b[key].as_bool() == Some(true))
        .count()
}

fn status(out: &mut dyn Write, api: &str, services: &Value) -> anyhow::Result<()> {
    let services = services_of(services);
    let backends: usize = services.iter().map(|s| backends_of(s).len()).sum();
    writeln!(
        out,
        "agent {api}: ok, {} service(s), {backends} backend(s)",
        services.len()
    )?;
    for s in services {
        let b = backends_of(s);
        let mut notes = Vec::new();
        if s["fail_open"].as_bool() == Some(true) {
            notes.push("FAIL-OPEN: no backend eligible, the last set keeps serving".to_owned());
        } else if count(b, "serving") == 0 {
            notes.push("NOT SERVING: no backend takes new flows".to_owned());
        }
        writeln!(
            out,
            "  {} {} {}: tier {}, {}/{} healthy, {} serving{}",
            text(&s["name"]),
            text(&s["mode"]),
            text(&s["vip"]),
            text(&s["active_tier"]),
            count(b, "healthy"),
            b.len(),
            count(b, "serving"),
            notes.iter().map(|n| format!("; {n}")).collect::<String>(),
        )?;
    }
    Ok(())
}

fn services_table(out: &mut dyn Write, services: &Value) -> anyhow::Result<()> {
    let mut t = Table::new(&[
        "NAME",
        "VIP",
        "PROTO",
        "MODE",
        "SCHEDULER",
        "ACTIVE TIER",
        "FAIL-OPEN",
        "BACKENDS",
        "HEALTHY",
        "SERVING",
    ]);
    for s in services_of(services) {
        let b = backends_of(s);
        t.row(vec![
            text(&s["name"]),
            text(&s["vip"]),
            text(&s["protocol"]),
            text(&s["mode"]),
            text(&s["scheduler"]),
            text(&s["active_tier"]),
            yes_no(&s["fail_open"]),
            b.len().to_string(),
            count(b, "healthy").to_string(),
            count(b, "serving").to_string(),
        ]);
    }
    t.print(out)?;
    Ok(())
}

fn backends_table(out: &mut dyn Write, svc: &Value) -> anyhow::Result<()> {
    writeln!(
        out,
        "service {} ({} {}): active tier {}{}",
        text(&svc["name"]),
        text(&svc["mode"]),
        text(&svc["vip"]),
        text(&svc["active_tier"]),
        if svc["fail_open"].as_bool() == Some(true) {
            ", FAIL-OPEN"
        } else if svc["all_down"].as_bool() == Some(true) {
            ", ALL DOWN: dropping"
        } else {
            ""
        }
    )?;
    let mut t = Table::new(&[
        "BACKEND",
        "TIER",
        "WEIGHT",
        "STATE",
        "HEALTHY",
        "SERVING",
        "ACTIVE",
        "LAST CHECK",
    ]);
    for b in backends_of(svc) {
        t.row(vec![
            address_port(b),
            text(&b["tier"]),
            text(&b["weight"]),
            text(&b["state"]),
            yes_no(&b["healthy"]),
            yes_no(&b["serving"]),
            yes_no(&b["active"]),
            b["health"]["last_reason"]
                .as_str()
                .filter(|r| !r.is_empty())
                .unwrap_or("-")
                .to_owned(),
        ]);
    }
    t.print(out)?;
    Ok(())
}

fn backend_line(out: &mut dyn Write, service: &str, b: &Value) -> anyhow::Result<()> {
    writeln!(
        out,
        "{service} {}: state {}, weight {}, healthy {}, serving {}, active {}",
        address_port(b),
        text(&b["state"]),
        text(&b["weight"]),
        yes_no(&b["healthy"]),
        yes_no(&b["serving"]),
        yes_no(&b["active"]),
    )?;
    Ok(())
}

fn stats_tables(out: &mut dyn Write, stats: &Value) -> anyhow::Result<()> {
    if stats["fast_path"].as_bool() != Some(true) {
        writeln!(out, "no fast path (xdp mode off): no L4 traffic counters")?;
        return Ok(());
    }
    let mut t = Table::new(&["SERVICE", "BACKEND", "PACKETS", "BYTES"]);
    if let Some(services) = stats["services"].as_object() {
        for (name, s) in services {
            t.row(vec![
                name.clone(),
                "(all)".to_owned(),
                text(&s["packets"]),
                text(&s["bytes"]),
            ]);
            if let Some(backends) = s["backends"].as_object() {
                for (backend, b) in backends {
                    t.row(vec![
                        name.clone(),
                        backend.clone(),
                        text(&b["packets"]),
                        text(&b["bytes"]),
                    ]);
                }
            }
        }
    }
    t.print(out)?;
    for (key, title) in [("counters", "COUNTER"), ("drops", "DROP REASON")] {
        let Some(map) = stats[key].as_object() else {
            continue;
        };
        writeln!(out)?;
        let mut t = Table::new(&[title, "PACKETS"]);
        for (label, v) in map {
            t.row(vec![label.clone(), text(v)]);
        }
        t.print(out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc};

    use super::*;
    use crate::{
        api::{ApiState, router},
        config::Config,
        control::Control,
        dataplane::desired::NoFastPath,
        health::HealthChecker,
        metrics::Metrics,
    };

    /// An agent's API on 127.0.0.1, served from a runtime on its own thread.
    struct Server {
        addr: SocketAddr,
        dir: std::path::PathBuf,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Server {
        fn start(token: Option<&str>) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "xdplb-ctl-test-{}-{}",
                std::process::id(),
                token.is_some()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("mkdir");
            let toml = format!(
                "[agent]\nstate_dir = \"{}\"\n[dataplane]\nsource_ipv4 = \"198.18.1.10\"\n\
                 [[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n\
                 backend = [{{ address = \"198.18.2.11\" }}, {{ address = \"198.18.2.12\", tier = 1 }}]\n",
                dir.display()
            );
            let config_path = dir.join("lb.toml");
            std::fs::write(&config_path, &toml).expect("write config");
            let token = token.map(str::to_owned);
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let config = Config::parse(&toml, "test").expect("config");
                    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
                    let health = HealthChecker::new(tx, Arc::new(|_| {}));
                    let control =
                        Control::new(config, health, Box::new(NoFastPath)).expect("control");
                    let state = ApiState {
                        control: Arc::new(tokio::sync::Mutex::new(control)),
                        token,
                        metrics: Arc::new(Metrics::new()),
                        config_path,
                        l7: crate::l7::manager::L7Registry::default(),
                    };
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind");
                    addr_tx
                        .send(listener.local_addr().expect("addr"))
                        .expect("send");
                    axum::serve(listener, router(state))
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        })
                        .await
                        .expect("serve");
                });
            });
            let addr = addr_rx.recv().expect("server address");
            Self {
                addr,
                dir,
                stop: Some(stop_tx),
                thread: Some(thread),
            }
        }

        fn url(&self) -> String {
            format!("http://{}", self.addr)
        }

        fn run(&self, token: Option<&str>, cmd: CtlCommand) -> anyhow::Result<String> {
            let mut out = Vec::new();
            run_to(&self.url(), token, cmd, &mut out)?;
            Ok(String::from_utf8(out).expect("utf-8"))
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn ctl_against_a_live_api() {
        let server = Server::start(None);
        let out = server.run(None, CtlCommand::Services).expect("services");
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{out}");
        assert!(lines[1].starts_with("web"), "{out}");
        assert!(
            lines[1].contains("198.18.100.1:80") && lines[1].contains("l4"),
            "{out}"
        );

        let out = server
            .run(
                None,
                CtlCommand::Drain {
                    service: "web".into(),
                    address: ip("198.18.2.11"),
                },
            )
            .expect("drain");
        assert_eq!(
            out.trim(),
            "web 198.18.2.11:80: state drain, weight 100, healthy yes, serving no, active yes"
        );

        let out = server
            .run(
                None,
                CtlCommand::Backends {
                    service: "web".into(),
                },
            )
            .expect("backends");
        assert!(out.contains("active tier 1"), "{out}");
        let row = out
            .lines()
            .find(|l| l.starts_with("198.18.2.12:80"))
            .expect("row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            &cells[..7],
            ["198.18.2.12:80", "1", "100", "enabled", "yes", "yes", "yes"],
            "{out}"
        );

        let out = server
            .run(
                None,
                CtlCommand::Weight {
                    service: "web".into(),
                    address: ip("198.18.2.11"),
                    weight: 5,
                },
            )
            .expect("weight");
        assert!(out.contains("weight 5"), "{out}");

        let out = server.run(None, CtlCommand::Status).expect("status");
        assert!(out.contains(": ok, 1 service(s), 2 backend(s)"), "{out}");

        let out = server.run(None, CtlCommand::Stats).expect("stats");
        assert!(out.contains("no fast path"), "{out}");

        let out = server.run(None, CtlCommand::Reload).expect("reload");
        assert_eq!(out.trim(), "reloaded: 1 service(s)");

        let err = server
            .run(
                None,
                CtlCommand::Enable {
                    service: "web".into(),
                    address: ip("198.18.2.99"),
                },
            )
            .expect_err("unknown backend");
        let message = format!("{err:#}");
        assert!(message.contains("404"), "{message}");
        assert!(
            message.contains("backend 198.18.2.99 in web not found"),
            "{message}"
        );
    }

    #[test]
    fn ctl_sends_the_token() {
        let server = Server::start(Some("s3cret"));
        let err = server
            .run(None, CtlCommand::Services)
            .expect_err("no token");
        assert!(format!("{err:#}").contains("401"), "{err:#}");
        let err = server
            .run(Some("wrong"), CtlCommand::Services)
            .expect_err("wrong token");
        assert!(format!("{err:#}").contains("bearer token"), "{err:#}");
        server
            .run(Some("s3cret"), CtlCommand::Services)
            .expect("right token");
    }

    #[test]
    fn ctl_reports_an_unreachable_agent() {
        // A port nothing listens on: bind, note it, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let mut out = Vec::new();
        let err = run_to(
            &format!("http://127.0.0.1:{port}"),
            None,
            CtlCommand::Status,
            &mut out,
        )
        .expect_err("nothing listens");
        assert!(format!("{err:#}").contains("/healthz"), "{err:#}");
    }
}
