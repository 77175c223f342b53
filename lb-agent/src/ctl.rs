//! `lb-agent ctl`: a small client of the REST API for operators.
//!
//! ```text
//! lb-agent ctl [--api URL] [--token T] status|services|backends SVC|drain SVC ADDR|
//!              enable SVC ADDR|disable SVC ADDR|weight SVC ADDR N|stats|reload
//! ```
//!
//! Prints human-readable tables; a failed request prints the API's `{"error"}` message
//! (through the returned error) so the command exits non-zero. Requests and answers
//! are the API's own [`types`](crate::api::types).

use std::{fmt::Display, io::Write, net::IpAddr, time::Duration};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde::{Serialize, de::DeserializeOwned};

use crate::api::types::{
    AdminState, Backend, BackendPatch, ErrorBody, Healthz, ReloadResponse, Service, ServiceList,
    Stats,
};

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
    let state = |state| BackendPatch {
        state: Some(state),
        weight: None,
    };
    match cmd {
        CtlCommand::Status => {
            client.get::<Healthz>("/healthz")?;
            let services: ServiceList = client.get("/api/v1/services")?;
            status(out, client.base(), &services.services)?;
        }
        CtlCommand::Services => {
            let services: ServiceList = client.get("/api/v1/services")?;
            services_table(out, &services.services)?;
        }
        CtlCommand::Backends { service } => {
            let svc: Service = client.get(&format!("/api/v1/services/{service}"))?;
            backends_table(out, &svc)?;
        }
        CtlCommand::Drain { service, address } => {
            let b = client.patch(&service, address, state(AdminState::Drain))?;
            backend_line(out, &service, b.as_ref())?;
        }
        CtlCommand::Enable { service, address } => {
            let b = client.patch(&service, address, state(AdminState::Enabled))?;
            backend_line(out, &service, b.as_ref())?;
        }
        CtlCommand::Disable { service, address } => {
            let b = client.patch(&service, address, state(AdminState::Disabled))?;
            backend_line(out, &service, b.as_ref())?;
        }
        CtlCommand::Weight {
            service,
            address,
            weight,
        } => {
            let patch = BackendPatch {
                weight: Some(weight),
                state: None,
            };
            let b = client.patch(&service, address, patch)?;
            backend_line(out, &service, b.as_ref())?;
        }
        CtlCommand::Stats => {
            let stats: Stats = client.get("/api/v1/stats")?;
            stats_tables(out, &stats)?;
        }
        CtlCommand::Reload => {
            let r: ReloadResponse = client.call("POST", "/api/v1/reload", None::<&()>)?;
            writeln!(out, "reloaded: {} service(s)", r.services)?;
            for (what, names) in [
                ("added", &r.added),
                ("removed", &r.removed),
                ("changed", &r.changed),
            ] {
                if !names.is_empty() {
                    writeln!(out, "{what}: {}", names.join(", "))?;
                }
            }
            for s in &r.shadowed {
                writeln!(
                    out,
                    "shadowed: {} ({} in the file; kept: {})",
                    s.service, s.file, s.kept
                )?;
            }
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

    /// One request; the answer read as `T`, or the API's error.
    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(auth) = &self.auth {
            request = request.header("Authorization", auth);
        }
        let sent = match body {
            Some(body) => self.agent.run(
                request
                    .header("Content-Type", "application/json")
                    .body(serde_json::to_vec(body)?)?,
            ),
            None => self.agent.run(request.body(())?),
        };
        let mut response = sent.with_context(|| format!("{method} {url}"))?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer to {method} {url}"))?;
        if !status.is_success() {
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map_or_else(|_| text.trim().to_owned(), |e| e.error);
            bail!("{method} {path}: {status}: {message}");
        }
        serde_json::from_str(&text)
            .with_context(|| format!("{method} {url}: unexpected answer: {text:.200}"))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.call("GET", path, None::<&()>)
    }

    /// The backend's live view after the change (None when its service has none yet).
    fn patch(
        &self,
        service: &str,
        address: IpAddr,
        body: BackendPatch,
    ) -> anyhow::Result<Option<Backend>> {
        self.call(
            "PATCH",
            &format!("/api/v1/services/{service}/backends/{address}"),
            Some(&body),
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

/// A value, or "-" when there is none.
fn text(v: Option<impl Display>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn yes_no(v: Option<bool>) -> String {
    match v {
        Some(true) => "yes".to_owned(),
        Some(false) => "no".to_owned(),
        None => "-".to_owned(),
    }
}

fn state_name(state: AdminState) -> &'static str {
    match state {
        AdminState::Enabled => "enabled",
        AdminState::Drain => "drain",
        AdminState::Disabled => "disabled",
    }
}

fn address_port(b: &Backend) -> String {
    if b.address.is_ipv6() {
        format!("[{}]:{}", b.address, b.port)
    } else {
        format!("{}:{}", b.address, b.port)
    }
}

/// How many backends have a live `flag` set.
fn count(backends: &[Backend], flag: fn(&crate::api::types::BackendLive) -> bool) -> usize {
    backends
        .iter()
        .filter(|b| b.live.as_ref().is_some_and(flag))
        .count()
}

fn healthy(backends: &[Backend]) -> usize {
    count(backends, |l| l.healthy)
}

fn serving(backends: &[Backend]) -> usize {
    count(backends, |l| l.serving)
}

fn status(out: &mut dyn Write, api: &str, services: &[Service]) -> anyhow::Result<()> {
    let backends: usize = services.iter().map(|s| s.backends.len()).sum();
    writeln!(
        out,
        "agent {api}: ok, {} service(s), {backends} backend(s)",
        services.len()
    )?;
    for s in services {
        let b = &s.backends;
        let mut notes = Vec::new();
        if s.fail_open {
            notes.push("FAIL-OPEN: no backend eligible, the last set keeps serving".to_owned());
        } else if serving(b) == 0 {
            notes.push("NOT SERVING: no backend takes new flows".to_owned());
        }
        writeln!(
            out,
            "  {} {} {}: tier {}, {}/{} healthy, {} serving{}",
            s.config.name,
            s.config.mode,
            s.config.vip,
            text(s.active_tier),
            healthy(b),
            b.len(),
            serving(b),
            notes.iter().map(|n| format!("; {n}")).collect::<String>(),
        )?;
    }
    Ok(())
}

fn services_table(out: &mut dyn Write, services: &[Service]) -> anyhow::Result<()> {
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
    for s in services {
        let b = &s.backends;
        t.row(vec![
            s.config.name.clone(),
            s.config.vip.to_string(),
            s.config.protocol.to_string(),
            s.config.mode.to_string(),
            s.config.scheduler.to_string(),
            text(s.active_tier),
            yes_no(Some(s.fail_open)),
            b.len().to_string(),
            healthy(b).to_string(),
            serving(b).to_string(),
        ]);
    }
    t.print(out)?;
    Ok(())
}

fn backends_table(out: &mut dyn Write, svc: &Service) -> anyhow::Result<()> {
    writeln!(
        out,
        "service {} ({} {}): active tier {}{}",
        svc.config.name,
        svc.config.mode,
        svc.config.vip,
        text(svc.active_tier),
        if svc.fail_open {
            ", FAIL-OPEN"
        } else if svc.all_down {
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
    for b in &svc.backends {
        let live = b.live.as_ref();
        t.row(vec![
            address_port(b),
            b.tier.to_string(),
            b.weight.to_string(),
            text(live.map(|l| state_name(l.state))),
            yes_no(live.map(|l| l.healthy)),
            yes_no(live.map(|l| l.serving)),
            yes_no(live.map(|l| l.active)),
            live.and_then(|l| l.health.as_ref())
                .map(|h| h.last_reason.as_str())
                .filter(|r| !r.is_empty())
                .unwrap_or("-")
                .to_owned(),
        ]);
    }
    t.print(out)?;
    Ok(())
}

/// One backend after a change; "-" for what is unknown (no backend view at all, or
/// no live fields yet).
fn backend_line(out: &mut dyn Write, service: &str, b: Option<&Backend>) -> anyhow::Result<()> {
    let live = b.and_then(|b| b.live.as_ref());
    writeln!(
        out,
        "{service} {}: state {}, weight {}, healthy {}, serving {}, active {}",
        b.map_or_else(|| "-".to_owned(), address_port),
        text(live.map(|l| state_name(l.state))),
        text(b.map(|b| b.weight)),
        yes_no(live.map(|l| l.healthy)),
        yes_no(live.map(|l| l.serving)),
        yes_no(live.map(|l| l.active)),
    )?;
    Ok(())
}

fn stats_tables(out: &mut dyn Write, stats: &Stats) -> anyhow::Result<()> {
    let Some(traffic) = stats.traffic.as_ref().filter(|_| stats.fast_path) else {
        writeln!(out, "no fast path (xdp mode off): no L4 traffic counters")?;
        return Ok(());
    };
    let mut t = Table::new(&["SERVICE", "BACKEND", "PACKETS", "BYTES"]);
    for (name, s) in &traffic.services {
        t.row(vec![
            name.clone(),
            "(all)".to_owned(),
            s.packets.to_string(),
            s.bytes.to_string(),
        ]);
        for (backend, b) in &s.backends {
            t.row(vec![
                name.clone(),
                backend.clone(),
                b.packets.to_string(),
                b.bytes.to_string(),
            ]);
        }
    }
    t.print(out)?;
    for (map, title) in [
        (&traffic.counters, "COUNTER"),
        (&traffic.drops, "DROP REASON"),
    ] {
        writeln!(out)?;
        let mut t = Table::new(&[title, "PACKETS"]);
        for (label, v) in map {
            t.row(vec![label.clone(), v.to_string()]);
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
        /// The agent's state dir and config file; removed on drop.
        _dir: tempfile::TempDir,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Server {
        fn start(token: Option<&str>) -> Self {
            let dir = tempfile::Builder::new()
                .prefix("xdplb-ctl-test-")
                .tempdir()
                .expect("temporary dir");
            let toml = format!(
                "[agent]\nstate_dir = \"{}\"\n[dataplane]\nsource_ipv4 = \"198.18.1.10\"\n\
                 [[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n\
                 backend = [{{ address = \"198.18.2.11\" }}, {{ address = \"198.18.2.12\", tier = 1 }}]\n",
                dir.path().display()
            );
            let config_path = dir.path().join("lb.toml");
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
                        bgp: None,
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
                _dir: dir,
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

    #[test]
    fn stats_tables_show_the_fast_path_counters() {
        let stats: Stats = serde_json::from_str(
            r#"{"fast_path":true,"counters":{"rx":5,"tx":4},"drops":{"no_backend":1},
                "services":{"web":{"packets":4,"bytes":400,
                "backends":{"198.18.2.11:80":{"packets":4,"bytes":400}}}}}"#,
        )
        .expect("stats");
        let mut out = Vec::new();
        stats_tables(&mut out, &stats).expect("print");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "SERVICE  BACKEND         PACKETS  BYTES\n\
             web      (all)           4        400\n\
             web      198.18.2.11:80  4        400\n\
             \n\
             COUNTER  PACKETS\n\
             rx       5\n\
             tx       4\n\
             \n\
             DROP REASON  PACKETS\n\
             no_backend   1\n"
        );
    }

    #[test]
    fn a_backend_without_a_view_prints_dashes() {
        let mut out = Vec::new();
        backend_line(&mut out, "web", None).expect("print");
        let b: Backend =
            serde_json::from_str(r#"{"address":"fd00:18::11","port":80,"tier":0,"weight":7}"#)
                .expect("backend");
        backend_line(&mut out, "web", Some(&b)).expect("print");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "web -: state -, weight -, healthy -, serving -, active -\n\
             web [fd00:18::11]:80: state -, weight 7, healthy -, serving -, active -\n"
        );
    }
}
