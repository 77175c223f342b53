//! Prometheus metrics (DESIGN.md "Metrics", prefix `xdplb_`), served at `GET /metrics`.
//!
//! Fast-path counters and the per-service views live in the maps and in
//! [`Control`]; they are read at scrape time into a fresh registry, so a deleted
//! service or backend disappears from the next scrape instead of lingering. Only the
//! health-check latency histogram lives for the agent's lifetime (it is fed by the
//! health checker through [`Metrics::health_observer`]).
//!
//! Series:
//! - `xdplb_packets_total{service,backend}`, `xdplb_bytes_total{service,backend}`:
//!   traffic the fast path sent to each backend (`backend` = `address:port`).
//! - `xdplb_drops_total{reason}`: packets the fast path dropped, by reason
//!   (`new_flow_limit`: over a `new_flows_per_source` limit).
//! - `xdplb_filter_drops_total{rule}`: packets dropped by a `[security]` rule (the deny
//!   prefix as written, or `not_allowed` for sources the allow list did not match), or
//!   by a service's own list (`SERVICE:PREFIX`, `SERVICE:not_allowed`).
//! - `xdplb_fastpath_packets_total{result}`: the fast path's other global counters
//!   (`rx`, `tx`, `pass_not_vip`, `flow_new`, ...).
//! - `xdplb_fastpath_enabled`: 1 when an XDP fast path is attached (the traffic series
//!   above exist only then).
//! - `xdplb_dataplane_sync_pending`: 1 while an accepted desired state is not (fully)
//!   written to the fast path's maps: the write failed and is retried with backoff.
//! - `xdplb_dataplane_sync_failures_total`: failed writes of the desired state to the
//!   maps since the agent started. These two exist with a fast path (or once a write
//!   has failed).
//! - `xdplb_backend_up{service,backend}`: the health checker's verdict (1 up, 0 down).
//! - `xdplb_backend_serving{service,backend}`: 1 when the backend takes new flows.
//! - `xdplb_backend_weight{service,backend}`: effective weight (config or override).
//! - `xdplb_backend_ring_weight{service,backend}`: the weight in the ring now (0 when not
//!   serving; below `backend_weight` while slow start ramps it).
//! - `xdplb_service_all_down{service}`: 1 when no backend of any tier is eligible.
//! - `xdplb_service_fail_open{service}`: 1 when no backend is eligible and the last
//!   serving set keeps serving.
//! - `xdplb_health_check_seconds`: histogram of health-check durations.
//! - `xdplb_vip_announced{vip}` (with `[bgp]`): 1 when the VIP is in the announcement
//!   BIRD took last, 0 when this node would announce it but does not (drained, BIRD
//!   absent or refusing).
//!
//! - `xdplb_log_lines_dropped_total`: log lines (access log included) dropped because
//!   stderr could not take them as fast as they came ([`crate::logging`]).
//!
//! The text is OpenMetrics (what `prometheus-client` writes; Prometheus scrapes it),
//! served as [`CONTENT_TYPE`].

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{control::Control, l7::stats::HttpStats};

/// Content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Histogram buckets for health checks, in seconds: 0.1 ms to 5 s.
const HEALTH_CHECK_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VipLabels {
    vip: String,
}

/// `xdplb_vip_announced{vip}`: every VIP wanted or announced, 1 when announced.
fn vip_announced(status: &crate::bgp::BgpStatus) -> Family<VipLabels, Gauge> {
    let family = Family::<VipLabels, Gauge>::default();
    for vip in status.wanted.iter().chain(&status.announced) {
        family
            .get_or_create(&VipLabels {
                vip: vip.to_string(),
            })
            .set(i64::from(status.announced.contains(vip)));
    }
    family
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

/// The agent's metrics; see the [module docs](self).
#[derive(Debug)]
pub struct Metrics {
    health_check_seconds: Histogram,
    /// The L7 proxy's series (`xdplb_http_*`, `xdplb_cache_*`), fed by its services.
    pub http: HttpStats,
    /// The VIP announcer, with `[bgp]`: `xdplb_vip_announced{vip}`.
    pub bgp: std::sync::OnceLock<Arc<crate::bgp::BgpNode>>,
    /// The link to the cluster store, with `[cluster]`: `xdplb_cluster_store_up`.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[must_use]
    pub fn new() -> Self {
        Self {
            health_check_seconds: Histogram::new(HEALTH_CHECK_BUCKETS),
            http: HttpStats::new(),
            bgp: std::sync::OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// For `HealthChecker::new`'s `observe` argument: records
    /// `xdplb_health_check_seconds`.
    #[must_use]
    pub fn health_observer(self: &Arc<Self>) -> Arc<dyn Fn(Duration) + Send + Sync> {
        let this = Arc::clone(self);
        Arc::new(move |d: Duration| this.health_check_seconds.observe(d.as_secs_f64()))
    }

    /// Prometheus (OpenMetrics) text of everything, reading the fast path's counters
    /// and the services' views now.
    #[must_use]
    pub fn render(&self, control: &Control) -> String {
        let mut registry = Registry::with_prefix("xdplb");

        let up = Family::<BackendLabels, Gauge>::default();
        let serving = Family::<BackendLabels, Gauge>::default();
        let weight = Family::<BackendLabels, Gauge>::default();
        let fail_open = Family::<ServiceLabels, Gauge>::default();
        let all_down = Family::<ServiceLabels, Gauge>::default();
        let ring_weight = Family::<BackendLabels, Gauge>::default();
        let local_down = Family::<BackendLabels, Gauge>::default();
        let clustered = control.cluster_facts().is_some();
        for view in control.views() {
            all_down
                .get_or_create(&ServiceLabels {
                    service: view.name.clone(),
                })
                .set(i64::from(view.all_down));
            fail_open
                .get_or_create(&ServiceLabels {
                    service: view.name.clone(),
                })
                .set(i64::from(view.fail_open));
            for b in &view.backends {
                let labels = BackendLabels {
                    service: view.name.clone(),
                    backend: backend_label(b.address, b.port),
                };
                up.get_or_create(&labels).set(i64::from(b.healthy));
                serving.get_or_create(&labels).set(i64::from(b.serving));
                weight.get_or_create(&labels).set(i64::from(b.weight));
                ring_weight
                    .get_or_create(&labels)
                    .set(i64::from(b.effective_weight));
                if clustered {
                    local_down
                        .get_or_create(&labels)
                        .set(i64::from(b.local_down));
                }
            }
        }
        if clustered {
            registry.register(
                "backend_local_down",
                "1 when this node's own checks find the backend down but the cluster's majority does not, so it stays in every ring ([cluster])",
                local_down,
            );
        }
        if let Some(cluster) = self.cluster.get() {
            let store_up = Gauge::<i64>::default();
            store_up.set(i64::from(cluster.connected()));
            registry.register(
                "cluster_store_up",
                "1 while the cluster store (etcd) answers; 0: this node serves its last shared state and API changes answer 503",
                store_up,
            );
        }

        if let Some(node) = self.bgp.get() {
            registry.register(
                "vip_announced",
                "1 when this node announces the VIP to BIRD (BGP), 0 when it would but does not (drained, BIRD failing)",
                vip_announced(&node.status()),
            );
        }

        if let Some(dropped) = crate::logging::dropped_lines() {
            let counter = Counter::<u64>::default();
            counter.inc_by(dropped as u64);
            registry.register(
                "log_lines_dropped",
                "Log lines (access log included) dropped because stderr could not take them as fast as they came",
                counter,
            );
        }

        let snapshot = control.snapshot();
        let enabled = Gauge::<i64>::default();
        enabled.set(i64::from(snapshot.is_some()));
        registry.register(
            "fastpath_enabled",
            "1 when the XDP fast path is attached and its counters are read",
            enabled,
        );
        // Shown where there is a fast path, or once a write to it has failed.
        let sync = control.dataplane_status();
        if snapshot.is_some() || sync.failures_total > 0 {
            let pending = Gauge::<i64>::default();
            pending.set(i64::from(sync.pending));
            registry.register(
                "dataplane_sync_pending",
                "1 while an accepted desired state is not fully written to the fast path's maps (the write is retried with backoff)",
                pending,
            );
            let failures = Counter::<u64>::default();
            failures.inc_by(sync.failures_total);
            registry.register(
                "dataplane_sync_failures",
                "Failed writes of the desired state to the fast path's maps",
                failures,
            );
        }
        if let Some(snapshot) = snapshot {
            let packets = Family::<BackendLabels, Counter>::default();
            let bytes = Family::<BackendLabels, Counter>::default();
            for (service, traffic) in &snapshot.services {
                for (backend, t) in &traffic.backends {
                    let labels = BackendLabels {
                        service: service.clone(),
                        backend: backend.clone(),
                    };
                    packets.get_or_create(&labels).inc_by(t.packets);
                    bytes.get_or_create(&labels).inc_by(t.bytes);
                }
            }
            let drops = Family::<ReasonLabels, Counter>::default();
            for (reason, v) in &snapshot.drops {
                drops
                    .get_or_create(&ReasonLabels {
                        reason: (*reason).to_owned(),
                    })
                    .inc_by(*v);
            }
            let fastpath = Family::<ResultLabels, Counter>::default();
            for (result, v) in &snapshot.counters {
                fastpath
                    .get_or_create(&ResultLabels {
                        result: (*result).to_owned(),
                    })
                    .inc_by(*v);
            }
            registry.register(
                "packets",
                "Packets the fast path sent to a backend",
                packets,
            );
            registry.register("bytes", "Bytes the fast path sent to a backend", bytes);
            registry.register("drops", "Packets the fast path dropped, by reason", drops);
            let filter_drops = Family::<RuleLabels, Counter>::default();
            for (rule, v) in &snapshot.filter_drops {
                filter_drops
                    .get_or_create(&RuleLabels { rule: rule.clone() })
                    .inc_by(*v);
            }
            registry.register(
                "filter_drops",
                "Packets dropped by a [security] rule: a deny prefix, or \"not_allowed\" (the allow list matched no rule)",
                filter_drops,
            );
            registry.register(
                "fastpath_packets",
                "Packets the fast path handled, by what it did with them",
                fastpath,
            );
        }

        registry.register(
            "backend_up",
            "Health check verdict of a backend (1 up, 0 down)",
            up,
        );
        registry.register(
            "backend_serving",
            "1 when the backend takes new flows",
            serving,
        );
        registry.register(
            "backend_weight",
            "Effective weight of a backend (configured or overridden through the API)",
            weight,
        );
        registry.register(
            "backend_ring_weight",
            "Weight of a backend in the ring now: 0 when not serving, lower than backend_weight while slow start ramps it",
            ring_weight,
        );
        registry.register(
            "service_all_down",
            "1 when no backend of any tier of the service is eligible (it fails open, or drops with on_all_down = \"drop\")",
            all_down,
        );
        registry.register(
            "service_fail_open",
            "1 when no backend of the service is eligible and the last serving set keeps serving",
            fail_open,
        );
        self.http.register(&mut registry);
        registry.register(
            "health_check_seconds",
            "Duration of health checks, successful or not",
            self.health_check_seconds.clone(),
        );

        let mut out = String::new();
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}

/// The `backend` label: `address:port`, IPv6 in brackets (as the snapshot spells it).
fn backend_label(address: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(address, port).to_string()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        config::{Config, ServiceConfig},
        dataplane::{
            desired::{DesiredState, Sink},
            stats::{ServiceTraffic, Snapshot, Traffic},
        },
        health::HealthChecker,
    };

    /// A sink that pretends to be a fast path with fixed counters.
    struct FakeFastPath;

    impl Sink for FakeFastPath {
        fn apply(&mut self, _desired: &DesiredState) -> anyhow::Result<()> {
            Ok(())
        }
        fn snapshot(&self, services: &[ServiceConfig]) -> Option<Snapshot> {
            let mut snapshot = Snapshot::default();
            snapshot.counters.insert("rx", 10);
            snapshot.counters.insert("tx", 7);
            snapshot.drops.insert("no_backend", 3);
            snapshot.filter_drops.insert("203.0.113.0/24".to_owned(), 4);
            for s in services {
                let mut traffic = ServiceTraffic::default();
                for b in &s.backends {
                    traffic.packets += 7;
                    traffic.bytes += 700;
                    traffic.backends.insert(
                        backend_label(b.address, b.port),
                        Traffic {
                            packets: 7,
                            bytes: 700,
                        },
                    );
                }
                snapshot.services.insert(s.name.clone(), traffic);
            }
            Some(snapshot)
        }
    }

    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn control(sink: Box<dyn Sink>, tag: &str) -> (Control, TempDir) {
        let dir = TempDir(
            std::env::temp_dir().join(format!("xdplb-metrics-test-{}-{tag}", std::process::id())),
        );
        let toml = format!(
            "[agent]\nstate_dir = \"{}\"\n[dataplane]\nsource_ipv4 = \"198.18.1.10\"\n\
             [[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n\
             backend = [{{ address = \"198.18.2.11\" }}, {{ address = \"198.18.2.12\", tier = 1 }}]\n",
            dir.0.display()
        );
        let config = Config::parse(&toml, "test").expect("config");
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let health = HealthChecker::new(tx, Arc::new(|_| {}));
        (Control::new(config, health, sink).expect("control"), dir)
    }

    /// Checks the text is well-formed OpenMetrics: every sample line is
    /// `name{labels} value` of a declared family, and it ends with `# EOF`.
    /// Returns the samples.
    fn parse(text: &str) -> BTreeMap<String, f64> {
        assert!(text.ends_with("# EOF\n"), "{text}");
        let mut families = Vec::new();
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                match parts.next() {
                    Some("TYPE") => {
                        let name = parts.next().expect("TYPE name");
                        let kind = parts.next().expect("TYPE kind");
                        assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                        families.push(name.to_owned());
                    }
                    Some("HELP") => assert!(parts.next().is_some(), "{line}"),
                    Some("EOF") => {}
                    _ => panic!("unexpected comment line {line:?}"),
                }
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample: series value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}"));
            let name = series.split('{').next().expect("name");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    let inner = labels
                        .strip_prefix('{')
                        .and_then(|l| l.strip_suffix('}'))
                        .unwrap_or_else(|| panic!("labels in {line:?}"));
                    for pair in inner.split(',') {
                        let (k, v) = pair.split_once('=').expect("label=value");
                        assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                        assert!(v.starts_with('"') && v.ends_with('"'), "{line}");
                    }
                }
            }
            assert!(
                families.iter().any(|f| name.starts_with(f.as_str())),
                "sample {name} before its # TYPE"
            );
            samples.insert(series.to_owned(), value);
        }
        samples
    }

    #[tokio::test]
    async fn renders_views_counters_and_histogram() {
        let (control, _dir) = control(Box::new(FakeFastPath), "fake");
        let metrics = Arc::new(Metrics::new());
        let observe = metrics.health_observer();
        observe(Duration::from_micros(300));
        observe(Duration::from_millis(30));
        let text = metrics.render(&control);
        let samples = parse(&text);
        let get = |s: &str| {
            *samples
                .get(s)
                .unwrap_or_else(|| panic!("no sample {s} in\n{text}"))
        };
        let b1 = r#"{service="web",backend="198.18.2.11:80"}"#;
        let b2 = r#"{service="web",backend="198.18.2.12:80"}"#;
        assert_eq!(get(&format!("xdplb_packets_total{b1}")), 7.0);
        assert_eq!(get(&format!("xdplb_bytes_total{b2}")), 700.0);
        assert_eq!(get(r#"xdplb_drops_total{reason="no_backend"}"#), 3.0);
        assert_eq!(
            get(r#"xdplb_filter_drops_total{rule="203.0.113.0/24"}"#),
            4.0
        );
        assert_eq!(get(r#"xdplb_fastpath_packets_total{result="rx"}"#), 10.0);
        assert_eq!(get("xdplb_fastpath_enabled"), 1.0);
        assert_eq!(get("xdplb_dataplane_sync_pending"), 0.0);
        assert_eq!(get("xdplb_dataplane_sync_failures_total"), 0.0);
        assert_eq!(get(&format!("xdplb_backend_up{b1}")), 1.0);
        assert_eq!(get(&format!("xdplb_backend_serving{b1}")), 1.0);
        assert_eq!(
            get(&format!("xdplb_backend_serving{b2}")),
            0.0,
            "tier 1 idles"
        );
        assert_eq!(get(&format!("xdplb_backend_weight{b2}")), 100.0);
        assert_eq!(get(r#"xdplb_service_fail_open{service="web"}"#), 0.0);
        assert_eq!(get("xdplb_health_check_seconds_count"), 2.0);
        assert_eq!(
            get(r#"xdplb_health_check_seconds_bucket{le="0.0005"}"#),
            1.0
        );
        assert_eq!(get(r#"xdplb_health_check_seconds_bucket{le="0.05"}"#), 2.0);
        assert!(text.contains("# TYPE xdplb_health_check_seconds histogram"));
        for absent in ["xdplb_http_", "xdplb_cache_"] {
            assert!(!text.contains(absent), "{absent} must not exist yet");
        }
    }

    /// A fast path whose map writes fail while `failing` is above 0 (each failure
    /// counts it down), keeping the last desired state it was given.
    struct FlakySink {
        failing: Arc<std::sync::atomic::AtomicU32>,
        written: Arc<std::sync::Mutex<Option<DesiredState>>>,
    }

    impl Sink for FlakySink {
        fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<()> {
            use std::sync::atomic::Ordering;
            if self
                .failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                anyhow::bail!("injected map write failure");
            }
            *self.written.lock().expect("lock") = Some(desired.clone());
            Ok(())
        }
        fn snapshot(&self, _services: &[ServiceConfig]) -> Option<Snapshot> {
            Some(Snapshot::default())
        }
    }

    /// A change accepted while the maps refuse writes: the API says so, the write is
    /// retried with growing delays, and the API and metrics show it pending until the
    /// fourth attempt succeeds and the maps hold the change.
    #[tokio::test]
    async fn failed_map_writes_are_retried_and_shown_until_they_succeed() {
        use axum::{body::Body, http::Request};
        use http_body_util::BodyExt as _;
        use tower::ServiceExt as _;

        use crate::{
            api::{ApiState, router},
            control::ControlError,
        };

        let failing = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let written = Arc::new(std::sync::Mutex::new(None));
        let sink = FlakySink {
            failing: failing.clone(),
            written: written.clone(),
        };
        let (control, _dir) = control(Box::new(sink), "flaky");
        let state = ApiState {
            control: Arc::new(tokio::sync::Mutex::new(control)),
            token: None,
            metrics: Arc::new(Metrics::new()),
            config_path: std::path::PathBuf::from("/nonexistent"),
            l7: crate::l7::manager::L7Registry::default(),
            bgp: None,
        };
        let call = |method: &'static str, uri: &'static str, body: Option<&'static str>| {
            let state = state.clone();
            async move {
                let req = Request::builder().method(method).uri(uri);
                let req = match body {
                    Some(b) => req
                        .header("content-type", "application/json")
                        .body(Body::from(b)),
                    None => req.body(Body::empty()),
                }
                .expect("request");
                let resp = router(state).oneshot(req).await.expect("infallible");
                let status = resp.status();
                let bytes = resp.into_body().collect().await.expect("body").to_bytes();
                (status, String::from_utf8(bytes.to_vec()).expect("utf-8"))
            }
        };
        let dataplane = || async {
            let (status, body) = call("GET", "/api/v1/stats", None).await;
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            v["dataplane"].clone()
        };
        let sync_metrics = || async {
            let (status, text) = call("GET", "/metrics", None).await;
            assert_eq!(status, 200);
            let samples = parse(&text);
            (
                samples["xdplb_dataplane_sync_pending"],
                samples["xdplb_dataplane_sync_failures_total"],
            )
        };
        let written_weight = || {
            written
                .lock()
                .expect("lock")
                .as_ref()
                .expect("written")
                .services[0]
                .backends[0]
                .weight
        };
        assert_eq!(written_weight(), 100);
        assert_eq!(dataplane().await["pending"], false);
        assert_eq!(sync_metrics().await, (0.0, 0.0));

        // Three writes fail: the change is accepted and saved, the request says so.
        failing.store(3, std::sync::atomic::Ordering::SeqCst);
        let (status, body) = call(
            "PATCH",
            "/api/v1/services/web/backends/198.18.2.11",
            Some(r#"{"weight": 50}"#),
        )
        .await;
        assert_eq!(status, 500, "{body}");
        assert!(body.contains("accepted and saved"), "{body}");
        assert!(body.contains("injected map write failure"), "{body}");
        assert_eq!(written_weight(), 100, "the maps do not have it yet");
        let (_, svc) = call("GET", "/api/v1/services/web", None).await;
        assert!(
            svc.contains(r#""weight":50"#),
            "the API shows the accepted change: {svc}"
        );

        let d = dataplane().await;
        assert_eq!(d["pending"], true, "{d}");
        assert_eq!(d["attempts"], 1, "{d}");
        assert_eq!(d["failures_total"], 1, "{d}");
        assert!(
            d["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("injected map write failure")),
            "{d}"
        );
        assert!(
            d["next_retry_ms"].as_u64().is_some_and(|ms| ms <= 100),
            "{d}"
        );
        assert_eq!(sync_metrics().await, (1.0, 1.0));

        // The retries: not before they are due, each failure waits longer.
        let mut retry_at = state.control.lock().await.watch_retry();
        let mut due = retry_at.borrow_and_update().expect("a retry is scheduled");
        for attempt in 2..=3 {
            let mut c = state.control.lock().await;
            assert!(
                c.retry_writes_at(due - Duration::from_millis(1)).is_none(),
                "not due yet"
            );
            assert!(matches!(
                c.retry_writes_at(due),
                Some(Err(ControlError::Apply(_)))
            ));
            let status = c.dataplane_status();
            assert_eq!(
                (status.attempts, status.failures_total),
                (attempt, attempt.into())
            );
            drop(c);
            assert!(retry_at.has_changed().expect("sender alive"));
            let next = retry_at.borrow_and_update().expect("still scheduled");
            assert!(next > due, "attempt {attempt}: the next retry comes later");
            due = next;
            assert_eq!(written_weight(), 100);
        }
        assert_eq!(dataplane().await["attempts"], 3);
        assert_eq!(sync_metrics().await, (1.0, 3.0));

        // The fourth attempt succeeds: the maps have the change, nothing is pending.
        assert!(matches!(
            state.control.lock().await.retry_writes_at(due),
            Some(Ok(()))
        ));
        assert_eq!(written_weight(), 50);
        assert_eq!(*retry_at.borrow_and_update(), None);
        assert!(
            state
                .control
                .lock()
                .await
                .retry_writes_at(due + Duration::from_secs(60))
                .is_none(),
            "nothing left to retry"
        );
        let d = dataplane().await;
        assert_eq!(
            d,
            serde_json::json!({
                "pending": false, "attempts": 0, "last_error": null,
                "pending_ms": null, "next_retry_ms": null, "failures_total": 3,
            })
        );
        assert_eq!(sync_metrics().await, (0.0, 3.0));
    }

    #[tokio::test]
    async fn without_a_fast_path_no_traffic_series() {
        let (control, _dir) = control(Box::new(crate::dataplane::desired::NoFastPath), "none");
        let text = Metrics::new().render(&control);
        let samples = parse(&text);
        assert_eq!(samples["xdplb_fastpath_enabled"], 0.0);
        assert!(!text.contains("xdplb_packets_total"), "{text}");
        assert!(!text.contains("xdplb_drops_total"), "{text}");
        assert!(!text.contains("xdplb_dataplane_sync"), "{text}");
        assert!(text.contains(r#"xdplb_backend_up{service="web",backend="198.18.2.11:80"} 1"#));
        assert_eq!(samples["xdplb_health_check_seconds_count"], 0.0);
    }
}
