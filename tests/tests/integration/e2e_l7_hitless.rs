//! Hitless L7 (issue 13, item 2), end to end in network namespaces: the real agent
//! binary behind its XDP fast path, an l7 service over the three backends' HTTP
//! servers, and a client in its own namespace sending continuous traffic of two kinds
//! (new connections with `Connection: close`, and keep-alive connections that send
//! request after request, opening a new connection only when the server said
//! `Connection: close`, as HTTP clients do) while:
//! - once, the settings change through the config file and `POST /api/v1/reload` (first:
//!   after a change through the API, the API's copy of the service shadows the file's);
//! - 10 times, the service's settings change through `PUT /api/v1/services/shop`
//!   (scheduler, cache size, idle timeout, sticky cookie on or off);
//! - 10 times, a new agent takes over from the running one (the listening sockets pass
//!   over `<state_dir>/handoff.sock`, the old agent drains and exits by itself).
//!
//! Every request must be answered `200` and no connection refused; the counts are
//! printed (`hitless FIGURES`).

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use xdplb_tests::require_privileges;
use xdplb_tests::{
    config::{BackendConfig, LbConfig, ServiceConfig},
    http, netns,
    scenario::{BedOptions, L4Bed},
    topology::{AgentOptions, BACKEND_ADDRS, Topology, VIP_PORT},
};

const L7_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const SERVICE: &str = "shop";
const API: &str = "127.0.0.1:9090";
/// Bound on each request of the load (connect, send, receive).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Most requests one load thread makes, and the longest the load runs.
const MAX_PER_THREAD: usize = 6000;
const MAX_LOAD: Duration = Duration::from_secs(150);
const PAUSE: Duration = Duration::from_millis(5);

fn l7_vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(L7_VIP, VIP_PORT))
}

/// The settings of change `i`: every change differs from the one before.
struct Variant {
    scheduler: &'static str,
    cache_bytes: u64,
    idle_ms: u64,
    sticky: bool,
}

fn variant(i: usize) -> Variant {
    Variant {
        scheduler: ["round-robin", "least-request", "p2c"][i % 3],
        cache_bytes: if i.is_multiple_of(2) {
            1 << 20
        } else {
            2 << 20
        },
        idle_ms: 30_000 + 1000 * i as u64,
        sticky: i % 4 == 1,
    }
}

const HEALTH: &str = r#"{ kind = "http", path = "/healthz", interval_ms = 200, timeout_ms = 150, rise = 2, fall = 2 }"#;

fn config(v: &Variant) -> LbConfig {
    let mut shop = ServiceConfig::new(SERVICE, l7_vip())
        .mode("l7")
        .scheduler(v.scheduler)
        .health(HEALTH)
        .extra(&format!("cache = {{ max_bytes = {} }}", v.cache_bytes))
        .extra(&format!("http = {{ idle_timeout_ms = {} }}", v.idle_ms));
    if v.sticky {
        shop = shop.extra(r#"sticky = { cookie = "LBSTICKY", ttl_s = 600 }"#);
    }
    let shop = BACKEND_ADDRS
        .iter()
        .fold(shop, |s, &a| s.backend(BackendConfig::new(a)));
    Topology::default_config().service(shop).api_listen(API)
}

/// The service as a `PUT /api/v1/services/shop` body.
fn body(v: &Variant) -> String {
    let backends: Vec<String> = BACKEND_ADDRS
        .iter()
        .map(|a| format!(r#"{{"address":"{a}","port":{VIP_PORT}}}"#))
        .collect();
    let sticky = if v.sticky {
        r#","sticky":{"cookie":"LBSTICKY","ttl_s":600}"#
    } else {
        ""
    };
    format!(
        r#"{{"name":"{SERVICE}","vip":"{}","mode":"l7","scheduler":"{}","health":{{"kind":"http","path":"/healthz","interval_ms":200,"timeout_ms":150,"rise":2,"fall":2}},"cache":{{"max_bytes":{}}},"http":{{"idle_timeout_ms":{}}}{sticky},"backend":[{}]}}"#,
        l7_vip(),
        v.scheduler,
        v.cache_bytes,
        v.idle_ms,
        backends.join(",")
    )
}

fn api(
    bed: &L4Bed,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<http::Response> {
    let (method, path, body) = (method.to_owned(), path.to_owned(), body.map(str::to_owned));
    netns::in_netns(&bed.topo.lb.ns, move || {
        let target: SocketAddr = API.parse()?;
        http::request(
            target,
            &method,
            &path,
            &[],
            body.as_deref(),
            REQUEST_TIMEOUT,
        )
    })
}

/// Whether the service the API shows has the settings of `v` (its idle timeout).
fn in_force(bed: &L4Bed, v: &Variant) -> anyhow::Result<()> {
    let shown = api(bed, "GET", &format!("/api/v1/services/{SERVICE}"), None)?;
    ensure!(
        shown
            .body
            .contains(&format!("\"idle_timeout_ms\":{}", v.idle_ms)),
        "the service does not have the settings asked for: {}",
        shown.body
    );
    Ok(())
}

/// What one load thread saw.
#[derive(Debug, Default)]
struct Counts {
    ok: usize,
    /// Connections that could not be made (refused, reset or timed out at connect).
    refused: usize,
    /// Requests sent that got no `200`.
    failed: usize,
    /// New connections a keep-alive thread opened after `Connection: close`.
    reopened: usize,
    errors: Vec<String>,
}

impl Counts {
    fn error(&mut self, refused: bool, e: String) {
        if refused {
            self.refused += 1;
        } else {
            self.failed += 1;
        }
        if self.errors.len() < 10 {
            self.errors.push(e);
        }
    }
}

/// `Connection: close` GETs, one connection each.
fn new_connections(stop: &AtomicBool) -> Counts {
    let mut c = Counts::default();
    let end = Instant::now() + MAX_LOAD;
    while !stop.load(Ordering::SeqCst)
        && Instant::now() < end
        && c.ok + c.failed + c.refused < MAX_PER_THREAD
    {
        match http::get(l7_vip(), "/new", REQUEST_TIMEOUT) {
            Ok(r) if r.status == 200 => c.ok += 1,
            Ok(r) => c.error(false, format!("status {} from {}", r.status, r.backend())),
            Err(e) => {
                let e = format!("{e:#}");
                c.error(e.starts_with("connect"), e);
            }
        }
        thread::sleep(PAUSE);
    }
    c
}

/// GETs on a kept-alive connection; a new one after `Connection: close`.
fn keep_alive(ns: &str, stop: &AtomicBool) -> Counts {
    let mut c = Counts::default();
    let end = Instant::now() + MAX_LOAD;
    let mut conn = None;
    while !stop.load(Ordering::SeqCst)
        && Instant::now() < end
        && c.ok + c.failed + c.refused < MAX_PER_THREAD
    {
        let open = match conn.as_mut() {
            Some(open) => open,
            None => match http::connect_keep_alive(ns, l7_vip(), REQUEST_TIMEOUT) {
                Ok(new) => conn.insert(new),
                Err(e) => {
                    c.error(true, format!("{e:#}"));
                    thread::sleep(PAUSE);
                    continue;
                }
            },
        };
        match http::get_keep_alive(open, "/ka") {
            Ok(r) if r.status == 200 => {
                c.ok += 1;
                if r.header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                {
                    conn = None;
                    c.reopened += 1;
                }
            }
            Ok(r) => {
                c.error(false, format!("status {} from {}", r.status, r.backend()));
                conn = None;
            }
            Err(e) => {
                c.error(false, format!("{e:#}"));
                conn = None;
            }
        }
        thread::sleep(PAUSE);
    }
    c
}

#[test]
fn l7_restarts_and_changes_fail_nothing() -> anyhow::Result<()> {
    require_privileges!();
    let mut bed = L4Bed::start(&BedOptions {
        config: config(&variant(0)),
        ..BedOptions::default()
    })?;
    let client = bed.topo.client.ns.clone();
    // The service serves before the load starts.
    let first = netns::in_netns(&client, || http::get(l7_vip(), "/", REQUEST_TIMEOUT))?;
    ensure!(first.status == 200, "first request: {first:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..2 {
        let s = stop.clone();
        workers.push((
            "new connections",
            netns::spawn_in_netns(&client, &format!("new-{i}"), move || {
                Ok(new_connections(&s))
            })?,
        ));
        let (s, ns) = (stop.clone(), client.clone());
        workers.push((
            "keep-alive",
            netns::spawn_in_netns(&client, &format!("ka-{i}"), move || Ok(keep_alive(&ns, &s)))?,
        ));
    }
    let started = Instant::now();
    let result = (|| -> anyhow::Result<Vec<Duration>> {
        let mut takeovers = Vec::new();
        thread::sleep(Duration::from_millis(500));
        // One change through the config file.
        let path = bed.topo.run_dir().join("lb.toml");
        let state_dir = bed.topo.run_dir().join("state");
        std::fs::write(&path, config(&variant(1)).to_toml(&state_dir))?;
        let r = api(&bed, "POST", "/api/v1/reload", None)?;
        ensure!(r.status == 200, "config reload: {r:?}");
        in_force(&bed, &variant(1)).context("after the reload")?;
        thread::sleep(Duration::from_millis(400));
        for i in 2..=11 {
            let r = api(
                &bed,
                "PUT",
                &format!("/api/v1/services/{SERVICE}"),
                Some(&body(&variant(i))),
            )?;
            ensure!(r.status == 200, "change {i} through the API: {r:?}");
            thread::sleep(Duration::from_millis(400));
            let t = Instant::now();
            let status = bed
                .topo
                .take_over_agent(&AgentOptions::default(), Duration::from_secs(20))
                .with_context(|| format!("take-over {i}"))?;
            takeovers.push(t.elapsed());
            ensure!(
                status.success(),
                "the old agent exited with {status} after take-over {i}"
            );
            thread::sleep(Duration::from_millis(400));
        }
        in_force(&bed, &variant(11)).context("after the take-overs")?;
        thread::sleep(Duration::from_millis(800));
        Ok(takeovers)
    })();
    stop.store(true, Ordering::SeqCst);
    let mut totals = std::collections::BTreeMap::<&str, Counts>::new();
    for (kind, w) in workers {
        let c = w
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        let t = totals.entry(kind).or_default();
        t.ok += c.ok;
        t.failed += c.failed;
        t.refused += c.refused;
        t.reopened += c.reopened;
        t.errors.extend(c.errors);
    }
    for (kind, c) in &totals {
        eprintln!(
            "hitless FIGURES: {kind}: {} requests answered 200, {} failed, {} connections refused{}",
            c.ok,
            c.failed,
            c.refused,
            if *kind == "keep-alive" {
                format!(", {} new connections after Connection: close", c.reopened)
            } else {
                String::new()
            }
        );
    }
    let takeovers = result.with_context(|| bed.topo.agent_log_tail(60))?;
    // Each new agent served the sockets it inherited (no agent bound by itself).
    let log = bed.topo.agent_log();
    let inherited = log
        .matches("serving the listening socket of the previous agent")
        .count();
    let drained = log.matches("the new agent serves: draining").count();
    ensure!(
        inherited == 10 && drained == 10,
        "{inherited} agents served an inherited L7 socket and {drained} old agents drained (10 each expected)"
    );
    eprintln!(
        "hitless FIGURES: 1 config reload, 10 API changes, 10 take-overs ({:?} each, new agent ready and old one exited) in {:?}",
        takeovers,
        started.elapsed()
    );
    for (kind, c) in &totals {
        ensure!(
            c.failed == 0 && c.refused == 0,
            "{kind}: {} failed, {} refused; first errors: {:?}\nagent log:\n{}",
            c.failed,
            c.refused,
            c.errors,
            bed.topo.agent_log_tail(80)
        );
        ensure!(c.ok > 100, "{kind}: only {} requests answered", c.ok);
    }
    Ok(())
}
