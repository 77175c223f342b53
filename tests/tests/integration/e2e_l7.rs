//! End-to-end tests of the L7 path in network namespaces: the real agent, its XDP fast
//! path passing the L7 VIP's packets up to the kernel, its HTTP proxy listening on the
//! VIP (added to the LB's `lo` by the agent), and the backends' HTTP servers, with a
//! client in its own namespace on the far side of the router.
//!
//! - [`l7_service_behind_the_fast_path`]: round robin over three backends, `Via`, sticky
//!   cookies (pinning, opaque value, failover with a new cookie when the pinned backend
//!   dies), the cache (a second GET is a hit, counted once at the backend; the cached
//!   page still answers with every backend down; purge through the API), and the
//!   `xdplb_http_*` / `xdplb_cache_*` series.
//! - [`xdp_off_still_serves_l7`]: with `--xdp-mode off` the proxy alone serves.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use xdplb_tests::require_privileges;
use xdplb_tests::{
    config::{BackendConfig, LbConfig, ServiceConfig},
    http::{self, Response},
    netns,
    scenario::{BedOptions, L4Bed},
    topology::{AgentOptions, BACKEND_ADDRS, Topology, VIP_PORT},
};

/// The L7 service's VIP: in the routed VIP network, next to the L4 service's.
const L7_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const SERVICE: &str = "shop";
const COOKIE: &str = "LBSTICKY";
const API: &str = "127.0.0.1:9090";
const TIMEOUT: Duration = Duration::from_secs(2);

fn l7_vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(L7_VIP, VIP_PORT))
}

/// The default L4 service plus the L7 service `shop` over the same three backends.
fn config() -> LbConfig {
    let shop = BACKEND_ADDRS.iter().fold(
        ServiceConfig::new(SERVICE, l7_vip())
            .mode("l7")
            .scheduler("round-robin")
            .health(r#"{ kind = "http", path = "/healthz", interval_ms = 200, timeout_ms = 150, rise = 2, fall = 2 }"#)
            .extra(&format!(r#"sticky = {{ cookie = "{COOKIE}", ttl_s = 600 }}"#))
            .extra("cache = { max_bytes = 1048576 }"),
        |s, &a| s.backend(BackendConfig::new(a)),
    );
    Topology::default_config().service(shop).api_listen(API)
}

fn get(ns: &str, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Response> {
    let (path, headers): (String, Vec<(String, String)>) = (
        path.to_owned(),
        headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
    );
    netns::in_netns(ns, move || {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        http::request(l7_vip(), "GET", &path, &h, None, TIMEOUT)
    })
}

/// A call to the agent's API from inside the LB namespace.
fn api(bed: &L4Bed, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<Response> {
    let (method, path, body) = (method.to_owned(), path.to_owned(), body.map(str::to_owned));
    netns::in_netns(&bed.topo.lb.ns, move || {
        let target: SocketAddr = API.parse()?;
        http::request(target, &method, &path, &[], body.as_deref(), TIMEOUT)
    })
}

/// The `name=value` of our Set-Cookie, if the response sets it.
fn sticky_cookie(r: &Response) -> Option<String> {
    r.headers
        .iter()
        .filter(|(n, _)| n == "set-cookie")
        .find_map(|(_, v)| {
            let pair = v.split(';').next()?.trim();
            pair.starts_with(&format!("{COOKIE}="))
                .then(|| pair.to_owned())
        })
}

/// Polls the API until backend `addr` of `shop` shows `healthy`.
fn wait_healthy(bed: &L4Bed, addr: Ipv4Addr, healthy: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let needle = format!(r#""address":"{addr}""#);
    loop {
        let r = api(bed, "GET", &format!("/api/v1/services/{SERVICE}"), None)?;
        let seen = r
            .body
            .split("},{")
            .find(|b| b.contains(&needle))
            .map(|b| b.contains(&format!(r#""healthy":{healthy}"#)));
        if seen == Some(true) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("backend {addr} not healthy={healthy} after 5 s: {}", r.body);
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn l7_service_behind_the_fast_path() -> anyhow::Result<()> {
    require_privileges!();
    let mut bed = L4Bed::start(&BedOptions {
        config: config(),
        ..BedOptions::default()
    })?;
    let client = bed.topo.client.ns.clone();

    // Round robin, Via, a sticky cookie on every response to a client without one.
    let mut per_backend = std::collections::BTreeMap::<String, usize>::new();
    let mut first_cookie = None;
    for _ in 0..30 {
        let r = get(&client, "/rr", &[])?;
        ensure!(r.status == 200, "GET /rr through the proxy: {r:?}");
        ensure!(
            r.header("via").is_some_and(|v| v.contains("xdplb")),
            "no Via: xdplb in {:?}",
            r.headers
        );
        let cookie = sticky_cookie(&r).context("no sticky cookie on a first response")?;
        ensure!(
            !cookie.contains("198.18"),
            "the cookie names the backend's address: {cookie}"
        );
        first_cookie.get_or_insert((cookie, r.backend().to_owned()));
        *per_backend.entry(r.backend().to_owned()).or_default() += 1;
    }
    eprintln!("l7 FIGURES: 30 requests, round robin: {per_backend:?}");
    // Each L7 worker (one per CPU: the agent's default) runs its own smooth round robin
    // (README), and each request's connection goes to one of them: a worker's counts
    // differ by at most one between backends, so the totals by at most one per worker.
    let workers = thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let (min, max) = (
        per_backend.values().copied().min().unwrap_or(0),
        per_backend.values().copied().max().unwrap_or(0),
    );
    ensure!(
        per_backend.len() == 3 && max - min <= workers,
        "round robin over 3 equal backends on {workers} workers should give 10 each, give or take one per worker: {per_backend:?}"
    );

    // Sticky: the cookie pins the client.
    let (cookie, pinned) = first_cookie.context("no cookie")?;
    for _ in 0..10 {
        let r = get(&client, "/sticky", &[("Cookie", &cookie)])?;
        ensure!(
            r.status == 200 && r.backend() == pinned,
            "with {cookie} the request went to {} instead of {pinned}",
            r.backend()
        );
        ensure!(
            sticky_cookie(&r).is_none(),
            "a valid cookie was reissued: {:?}",
            r.headers
        );
    }
    // A forged cookie is ignored (and replaced).
    let forged = format!("{COOKIE}=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let r = get(&client, "/sticky", &[("Cookie", &forged)])?;
    ensure!(
        r.status == 200 && sticky_cookie(&r).is_some(),
        "a forged cookie: {r:?}"
    );

    // The pinned backend dies: the next request goes elsewhere with a new cookie.
    let idx = pinned
        .strip_prefix("be")
        .and_then(|n| n.parse::<usize>().ok())
        .context("backend name")?
        - 1;
    let pinned_addr = BACKEND_ADDRS[idx];
    let pos = bed
        .servers
        .iter()
        .position(|s| s.name() == pinned)
        .context("pinned server")?;
    bed.servers.remove(pos).stop()?;
    wait_healthy(&bed, pinned_addr, false)?;
    let r = get(&client, "/sticky", &[("Cookie", &cookie)])?;
    let new_cookie = sticky_cookie(&r);
    eprintln!(
        "l7 FIGURES: sticky to {pinned}; after it died the request went to {} with a new cookie: {}",
        r.backend(),
        new_cookie.is_some()
    );
    ensure!(
        r.status == 200 && r.backend() != pinned,
        "after {pinned} died: {r:?}"
    );
    let new_cookie = new_cookie.context("no new cookie after failover")?;
    ensure!(new_cookie != cookie, "the same cookie was reissued");
    let again = get(&client, "/sticky", &[("Cookie", &new_cookie)])?;
    ensure!(
        again.backend() == r.backend(),
        "the new cookie does not pin: {} then {}",
        r.backend(),
        again.backend()
    );

    // The cache: a second GET is a hit and does not reach a backend.
    let served = |bed: &L4Bed| bed.servers.iter().map(|s| s.requests()).sum::<u64>();
    let before = served(&bed);
    let miss = get(&client, "/cached/page", &[])?;
    let hit = get(&client, "/cached/page", &[])?;
    let status = |r: &Response| r.header("cache-status").unwrap_or_default().to_owned();
    eprintln!(
        "l7 FIGURES: cache: first {:?}, second {:?}; backend requests {}",
        status(&miss),
        status(&hit),
        served(&bed) - before
    );
    ensure!(miss.status == 200 && hit.status == 200, "{miss:?} {hit:?}");
    // A hit: the first response's last bytes reached the client only once the store
    // had it (cache::tee), so even on a loaded machine the second GET finds it.
    ensure!(
        status(&hit).contains("hit"),
        "the second GET was not a hit: {:?}",
        hit.headers
    );
    ensure!(
        served(&bed) - before == 1,
        "two GETs of a cacheable page reached the backends {} times",
        served(&bed) - before
    );
    // Every backend down: the cached page still answers; an uncached one cannot.
    for s in bed.servers.drain(..) {
        s.stop()?;
    }
    for &a in &BACKEND_ADDRS {
        wait_healthy(&bed, a, false)?;
    }
    let cached = get(&client, "/cached/page", &[])?;
    ensure!(
        cached.status == 200,
        "the cached page with every backend down: {cached:?}"
    );
    let uncached = get(&client, "/cached/other", &[])?;
    ensure!(
        uncached.status >= 500,
        "an uncached page with every backend down: {uncached:?}"
    );
    // Purge through the API: then the page is gone too.
    let purge = api(
        &bed,
        "POST",
        &format!("/api/v1/services/{SERVICE}/cache/purge"),
        Some(r#"{"path":"/cached/page"}"#),
    )?;
    ensure!(
        purge.status == 200 && purge.body.contains(r#""purged":1"#),
        "purge: {purge:?}"
    );
    let bad = api(
        &bed,
        "POST",
        &format!("/api/v1/services/{SERVICE}/cache/purge"),
        Some(r#"{"path":"no-slash"}"#),
    )?;
    ensure!(bad.status == 400, "a bad purge body: {bad:?}");
    thread::sleep(Duration::from_millis(100));
    let gone = get(&client, "/cached/page", &[])?;
    ensure!(gone.status >= 500, "after the purge: {gone:?}");

    // Metrics and stats.
    let metrics = api(&bed, "GET", "/metrics", None)?;
    for needle in [
        format!(r#"xdplb_http_requests_total{{service="{SERVICE}""#),
        format!(r#"xdplb_cache_requests_total{{service="{SERVICE}",result="hit"}}"#),
        "xdplb_http_request_seconds".to_owned(),
    ] {
        ensure!(
            metrics.body.contains(&needle),
            "no {needle} in /metrics:\n{}",
            metrics.body
        );
    }
    let stats = api(&bed, "GET", "/api/v1/stats", None)?;
    ensure!(
        stats.body.contains(r#""cache_hits""#) && stats.body.contains(SERVICE),
        "no L7 figures in /api/v1/stats: {}",
        stats.body
    );
    Ok(())
}

#[test]
fn xdp_off_still_serves_l7() -> anyhow::Result<()> {
    require_privileges!();
    let bed = L4Bed::start(&BedOptions {
        config: config(),
        agent: AgentOptions {
            xdp_mode: Some("off".to_owned()),
            ..AgentOptions::default()
        },
        ..BedOptions::default()
    })?;
    let log = bed.topo.agent_log();
    ensure!(
        log.contains("L4 services are not served") && log.contains("web"),
        "the agent did not say which services are not served:\n{log}"
    );
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..9 {
        let r = get(&bed.topo.client.ns, "/", &[])?;
        ensure!(r.status == 200, "GET through the proxy without XDP: {r:?}");
        backends.insert(r.backend().to_owned());
    }
    ensure!(backends.len() == 3, "only {backends:?} answered");
    Ok(())
}
