//! The API through `router(state).oneshot(request)`, over a real [`Control`] with no
//! fast path (or a fake one for the counters), persisting into a temporary state dir.

use std::{path::PathBuf, sync::Arc};

use axum::{
    body::Body,
    http::{Request, StatusCode, header},
};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::{ApiState, router};
use crate::{
    config::{Config, ServiceConfig},
    control::{Control, ControlError, STATE_FILE},
    dataplane::{
        desired::{DesiredState, NoFastPath, Sink},
        stats::{ServiceTraffic, Snapshot, Traffic},
    },
    health::HealthChecker,
    metrics::Metrics,
};

const TOKEN: &str = "t0ken-with-some-length";

fn config_text(state_dir: &std::path::Path, extra: &str) -> String {
    agent_config_text(state_dir, "", extra)
}

/// [`config_text`] with more `[agent]` keys.
fn agent_config_text(state_dir: &std::path::Path, agent: &str, extra: &str) -> String {
    format!(
        "[agent]\nstate_dir = \"{}\"\n{agent}\
         [dataplane]\nsource_ipv4 = \"198.18.1.10\"\n\
         [[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n\
         backend = [{{ address = \"198.18.2.11\" }}, {{ address = \"198.18.2.12\", tier = 1 }}]\n{extra}",
        state_dir.display()
    )
}

/// A sink with fixed counters, standing in for the fast path.
struct FakeFastPath;

impl Sink for FakeFastPath {
    fn apply(&mut self, _desired: &DesiredState) -> anyhow::Result<()> {
        Ok(())
    }
    fn snapshot(&self, services: &[ServiceConfig]) -> Option<Snapshot> {
        let mut s = Snapshot::default();
        s.counters.insert("rx", 5);
        s.drops.insert("no_backend", 1);
        s.filter_drops.insert("203.0.113.0/24".to_owned(), 2);
        for svc in services {
            let mut t = ServiceTraffic {
                packets: 4,
                bytes: 400,
                ..Default::default()
            };
            t.backends.insert(
                format!("{}:{}", svc.backends[0].address, svc.backends[0].port),
                Traffic {
                    packets: 4,
                    bytes: 400,
                },
            );
            s.services.insert(svc.name.clone(), t);
        }
        Some(s)
    }
}

struct Fixture {
    state: ApiState,
    /// The state dir and config file; removed on drop.
    dir: tempfile::TempDir,
}

fn new_control(text: &str, sink: Box<dyn Sink>) -> Result<Control, ControlError> {
    let config = Config::parse(text, "test").expect("test config");
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    Control::new(config, HealthChecker::new(tx, Arc::new(|_| {})), sink)
}

impl Fixture {
    fn new() -> Self {
        Self::with(None, Box::new(NoFastPath))
    }

    fn with(token: Option<&str>, sink: Box<dyn Sink>) -> Self {
        Self::with_agent(token, sink, |_| String::new())
    }

    /// With more `[agent]` keys, made from the fixture's directory.
    fn with_agent(
        token: Option<&str>,
        sink: Box<dyn Sink>,
        agent: impl FnOnce(&std::path::Path) -> String,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("xdplb-api-test-")
            .tempdir()
            .expect("temporary dir");
        let text = agent_config_text(dir.path(), &agent(dir.path()), "");
        let config_path = dir.path().join("lb.toml");
        std::fs::write(&config_path, &text).expect("write config");
        let control = new_control(&text, sink).expect("control");
        Self {
            state: ApiState {
                control: Arc::new(tokio::sync::Mutex::new(control)),
                token: token.map(str::to_owned),
                metrics: Arc::new(Metrics::new()),
                config_path,
                l7: crate::l7::manager::L7Registry::default(),
                bgp: None,
            },
            dir,
        }
    }

    /// Over `text`, written as the config file in `dir`.
    fn from_text(dir: tempfile::TempDir, text: &str) -> Self {
        let config_path = dir.path().join("lb.toml");
        std::fs::write(&config_path, text).expect("write config");
        let control = new_control(text, Box::new(NoFastPath)).expect("control");
        Self {
            state: ApiState {
                control: Arc::new(tokio::sync::Mutex::new(control)),
                token: None,
                metrics: Arc::new(Metrics::new()),
                config_path,
                l7: crate::l7::manager::L7Registry::default(),
                bgp: None,
            },
            dir,
        }
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, Value) {
        let (status, _, body) = self.send_raw(method, uri, body, token).await;
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body)
                .unwrap_or_else(|e| panic!("{method} {uri}: not JSON ({e}): {body}"))
        };
        (status, value)
    }

    async fn send_raw(
        &self,
        method: &str,
        uri: &str,
        body: Option<&str>,
        token: Option<&str>,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(b.to_owned())),
            None => req.body(Body::empty()),
        }
        .expect("request");
        let resp = router(self.state.clone())
            .oneshot(req)
            .await
            .expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            headers,
            String::from_utf8(bytes.to_vec()).expect("utf-8"),
        )
    }

    async fn call(&self, method: &str, uri: &str, body: Option<&str>) -> (StatusCode, Value) {
        self.send(method, uri, body, None).await
    }

    async fn names(&self) -> Vec<String> {
        let (status, v) = self.call("GET", "/api/v1/services", None).await;
        assert_eq!(status, StatusCode::OK);
        v["services"]
            .as_array()
            .expect("services")
            .iter()
            .map(|s| s["name"].as_str().expect("name").to_owned())
            .collect()
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join(STATE_FILE)
    }
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

fn backend<'a>(svc: &'a Value, address: &str) -> &'a Value {
    svc["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .find(|b| b["address"] == address)
        .unwrap_or_else(|| panic!("no backend {address} in {svc}"))
}

const SHOP: &str =
    r#"{"name": "shop", "vip": "198.18.100.2:443", "backend": [{"address": "198.18.2.21"}]}"#;

#[tokio::test]
async fn list_and_get_show_config_and_live_view() {
    let f = Fixture::new();
    let (status, v) = f.call("GET", "/api/v1/services", None).await;
    assert_eq!(status, StatusCode::OK);
    let web = &v["services"][0];
    assert_eq!(web["name"], "web");
    assert_eq!(web["vip"], "198.18.100.1:80");
    assert_eq!(web["protocol"], "tcp");
    assert_eq!(web["mode"], "l4");
    assert_eq!(web["scheduler"], "maglev");
    assert_eq!(web["health"]["kind"], "none");
    assert_eq!(web["active_tier"], 0);
    assert_eq!(web["fail_open"], false);
    assert!(
        web.get("backend").is_none(),
        "the live list replaces the config's"
    );
    let b = backend(web, "198.18.2.11");
    assert_eq!(
        (&b["port"], &b["weight"], &b["tier"], &b["state"]),
        (&json!(80), &json!(100), &json!(0), &json!("enabled"))
    );
    assert_eq!(
        (&b["healthy"], &b["serving"], &b["active"]),
        (&json!(true), &json!(true), &json!(true))
    );
    assert_eq!(b["health"]["up"], true);
    assert_eq!(b["health"]["last_reason"], "checks disabled");
    let b2 = backend(web, "198.18.2.12");
    assert_eq!((&b2["tier"], &b2["serving"]), (&json!(1), &json!(false)));

    let (status, one) = f.call("GET", "/api/v1/services/web", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&one, web);
    let (status, v) = f.call("GET", "/api/v1/services/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("nope"));
}

#[tokio::test]
async fn create_then_get_and_duplicate_conflicts() {
    let f = Fixture::new();
    let (status, headers, body) = f
        .send_raw("POST", "/api/v1/services", Some(SHOP), None)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(headers[header::LOCATION], "/api/v1/services/shop");
    let created: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        backend(&created, "198.18.2.21")["port"],
        443,
        "port defaults to the VIP's"
    );
    let (status, got) = f.call("GET", "/api/v1/services/shop", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, created);
    assert_eq!(f.names().await, ["web", "shop"]);

    let (status, v) = f.call("POST", "/api/v1/services", Some(SHOP)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(error_of(&v).contains("exists already"), "{v}");
}

#[tokio::test]
async fn invalid_creations_are_rejected_and_change_nothing() {
    let f = Fixture::new();
    let cases = [
        (r#"{"name": "a", "vip": "198.18.100.9"}"#, "vip"),
        (
            r#"{"name": "a", "vip": "198.18.100.9:80", "wieght": 1}"#,
            "wieght",
        ),
        (
            r#"{"name": "a", "vip": "198.18.100.9:80", "backend": [{"address": "198.18.2.1", "weight": 1000001}]}"#,
            "backend[0].weight",
        ),
        (
            r#"{"name": "a", "vip": "198.18.100.9:80", "backend": [{"address": "198.18.2.1", "weight": "heavy"}]}"#,
            "backend[0].weight",
        ),
        (r#"{"name": "a", "vip": "198.18.100.1:80"}"#, "vip"),
        (r#"{"name": "a b", "vip": "198.18.100.9:80"}"#, "name"),
        (r#"{"name": "a", "#, "invalid JSON body"),
        ("", "needs a JSON body"),
    ];
    for (body, key) in cases {
        let (status, v) = f.call("POST", "/api/v1/services", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(error_of(&v).contains(key), "{body}: {v} should name {key}");
    }
    assert_eq!(f.names().await, ["web"]);
    assert!(!f.state_file().exists(), "nothing persisted");
}

#[tokio::test]
async fn put_replaces_and_checks_the_name() {
    let f = Fixture::new();
    let body = r#"{"name": "web", "vip": "198.18.100.1:80", "backend": [{"address": "198.18.2.13", "weight": 7}]}"#;
    let (status, v) = f.call("PUT", "/api/v1/services/web", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["backends"].as_array().expect("backends").len(), 1);
    assert_eq!(backend(&v, "198.18.2.13")["weight"], 7);

    let (status, v) = f.call("PUT", "/api/v1/services/web", Some(SHOP)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("name"), "{v}");
    let (status, _) = f.call("PUT", "/api/v1/services/shop", Some(SHOP)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, v) = f.call("GET", "/api/v1/services/web", None).await;
    assert_eq!(
        backend(&v, "198.18.2.13")["weight"],
        7,
        "the rejected PUTs changed nothing"
    );
}

#[tokio::test]
async fn delete_then_gone() {
    let f = Fixture::new();
    let (status, v) = f.call("DELETE", "/api/v1/services/web", None).await;
    assert_eq!((status, v), (StatusCode::NO_CONTENT, Value::Null));
    let (status, _) = f.call("GET", "/api/v1/services/web", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, v) = f.call("DELETE", "/api/v1/services/web", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("service web not found"), "{v}");
    assert!(f.names().await.is_empty());
}

#[tokio::test]
async fn backends_add_patch_remove() {
    let f = Fixture::new();
    let uri = "/api/v1/services/web/backends";
    let (status, b) = f
        .call("POST", uri, Some(r#"{"address": "198.18.2.13"}"#))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{b}");
    assert_eq!(
        (&b["address"], &b["port"], &b["weight"], &b["tier"]),
        (&json!("198.18.2.13"), &json!(80), &json!(100), &json!(0))
    );
    assert_eq!(b["serving"], true);
    let (status, v) = f
        .call(
            "POST",
            uri,
            Some(r#"{"address": "198.18.2.13", "port": 80}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = f
        .call(
            "POST",
            uri,
            Some(r#"{"address": "198.18.2.14", "port": 81}"#),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "l4 port must equal the VIP's: {v}"
    );
    let (status, v) = f
        .call(
            "POST",
            uri,
            Some(r#"{"address": "198.18.2.14", "prot": 80}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("prot"), "{v}");
    let (status, _) = f
        .call(
            "POST",
            "/api/v1/services/nope/backends",
            Some(r#"{"address": "198.18.2.14"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let one = "/api/v1/services/web/backends/198.18.2.11";
    let (status, b) = f.call("PATCH", one, Some(r#"{"state": "drain"}"#)).await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_eq!(
        (&b["state"], &b["serving"], &b["active"]),
        (&json!("drain"), &json!(false), &json!(true))
    );
    let (_, svc) = f.call("GET", "/api/v1/services/web", None).await;
    let seen = backend(&svc, "198.18.2.11");
    assert_eq!(
        (&seen["state"], &seen["serving"], &seen["active"]),
        (&json!("drain"), &json!(false), &json!(true))
    );
    let (status, b) = f
        .call("PATCH", one, Some(r#"{"weight": 3, "state": "enabled"}"#))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&b["state"], &b["weight"], &b["serving"]),
        (&json!("enabled"), &json!(3), &json!(true))
    );

    for (body, status, needle) in [
        ("{}", StatusCode::BAD_REQUEST, "weight"),
        (r#"{"state": "off"}"#, StatusCode::BAD_REQUEST, "state"),
        (r#"{"weight": 1000001}"#, StatusCode::BAD_REQUEST, "maximum"),
        (r#"{"wait": 1}"#, StatusCode::BAD_REQUEST, "wait"),
    ] {
        let (got, v) = f.call("PATCH", one, Some(body)).await;
        assert_eq!(got, status, "{body}: {v}");
        assert!(error_of(&v).contains(needle), "{body}: {v}");
    }
    let (status, v) = f
        .call(
            "PATCH",
            "/api/v1/services/web/backends/198.18.2.99",
            Some(r#"{"state": "drain"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    let (status, v) = f
        .call(
            "PATCH",
            "/api/v1/services/web/backends/not-an-ip",
            Some(r#"{"state": "drain"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("not-an-ip"), "{v}");

    let (status, _) = f.call("DELETE", one, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = f.call("DELETE", one, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, svc) = f.call("GET", "/api/v1/services/web", None).await;
    let addresses: Vec<&str> = svc["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["address"].as_str().expect("address"))
        .collect();
    assert_eq!(addresses, ["198.18.2.12", "198.18.2.13"]);
}

#[tokio::test]
async fn ipv6_backend_addresses_in_the_path() {
    let f = Fixture::new();
    let body = r#"{"name": "v6", "vip": "[fd00:18::1]:80", "mode": "l7", "backend": [{"address": "fd00:18::11", "port": 8080}]}"#;
    let (status, v) = f.call("POST", "/api/v1/services", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    for path in ["fd00:18::11", "[fd00:18::11]"] {
        let (status, b) = f
            .call(
                "PATCH",
                &format!("/api/v1/services/v6/backends/{path}"),
                Some(r#"{"weight": 9}"#),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{path}: {b}");
        assert_eq!(b["port"], 8080);
    }
}

#[tokio::test]
async fn token_guards_the_api_but_not_healthz_or_metrics() {
    let f = Fixture::with(Some(TOKEN), Box::new(NoFastPath));
    let (status, headers, body) = f.send_raw("GET", "/api/v1/services", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    assert!(body.contains("bearer token"), "{body}");
    let (status, _) = f.send("GET", "/api/v1/services", None, Some("wrong")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = f
        .send(
            "GET",
            "/api/v1/services",
            None,
            Some(&TOKEN[..TOKEN.len() - 1]),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = f
        .send("DELETE", "/api/v1/services/web", None, Some("wrong"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        f.state.control.lock().await.config().services.len(),
        1,
        "nothing deleted"
    );
    let (status, _) = f.send("GET", "/api/v1/services", None, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK);

    let (status, v) = f.send("GET", "/healthz", None, None).await;
    assert_eq!((status, v), (StatusCode::OK, json!({"status": "ok"})));
    let (status, headers, body) = f.send_raw("GET", "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], crate::metrics::CONTENT_TYPE);
    assert!(body.contains("xdplb_backend_up{"), "{body}");
    assert!(body.ends_with("# EOF\n"));
}

#[tokio::test]
async fn stats_show_only_what_exists() {
    let f = Fixture::new();
    let (status, v) = f.call("GET", "/api/v1/stats", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v, json!({"fast_path": false}));

    let f = Fixture::with(None, Box::new(FakeFastPath));
    let (status, v) = f.call("GET", "/api/v1/stats", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v["fast_path"], true);
    assert_eq!(v["dataplane"]["pending"], false);
    assert_eq!(v["counters"]["rx"], 5);
    assert_eq!(v["drops"]["no_backend"], 1);
    assert_eq!(v["filter_drops"]["203.0.113.0/24"], 2);
    assert_eq!(v["services"]["web"]["packets"], 4);
    assert_eq!(
        v["services"]["web"]["backends"]["198.18.2.11:80"]["bytes"],
        400
    );
}

#[tokio::test]
async fn reload_rereads_the_config_file() {
    let f = Fixture::new();
    let path = f.state.config_path.clone();
    let extra = "[[service]]\nname = \"dns\"\nvip = \"198.18.100.3:53\"\nprotocol = \"udp\"\n";
    std::fs::write(&path, config_text(f.dir.path(), extra)).expect("write");
    let (status, v) = f.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["services"], 2);
    assert_eq!(f.names().await, ["web", "dns"]);

    std::fs::write(
        &path,
        config_text(f.dir.path(), "[[service]]\nname = \"bad\"\n"),
    )
    .expect("write");
    let (status, v) = f.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&v).contains("vip"), "{v}");
    assert_eq!(f.names().await, ["web", "dns"], "kept the running config");
}

#[tokio::test]
async fn changes_survive_a_restart_and_a_corrupt_state_refuses_to_start() {
    let f = Fixture::new();
    let (status, _) = f.call("POST", "/api/v1/services", Some(SHOP)).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = f
        .call(
            "PATCH",
            "/api/v1/services/web/backends/198.18.2.11",
            Some(r#"{"state": "disabled"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let text = config_text(f.dir.path(), "");
    let again = new_control(&text, Box::new(NoFastPath)).expect("restart");
    let names: Vec<&str> = again
        .config()
        .services
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["web", "shop"]);
    let web = again.view("web").expect("web");
    assert_eq!(web.backends[0].state, crate::state::AdminState::Disabled);
    assert!(!web.backends[0].active);

    std::fs::write(f.state_file(), "{ not json").expect("corrupt");
    match new_control(&text, Box::new(NoFastPath)) {
        Err(ControlError::State { message, .. }) => {
            assert!(message.contains("corrupt"), "{message}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a corrupt state file must stop the agent"),
    }
    assert_eq!(
        std::fs::read_to_string(f.state_file()).expect("read"),
        "{ not json",
        "not replaced"
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let f = Fixture::new();
    let (status, v) = f.call("GET", "/api/v1/nothing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&v).contains("/api/v1/nothing"));
    let (status, v) = f.call("PATCH", "/api/v1/services", Some("{}")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(error_of(&v).contains("PATCH"));
}

#[tokio::test]
async fn a_held_lock_answers_503() {
    let f = Fixture::new();
    let _held = f.state.control.lock().await;
    let (status, v) = f.call("GET", "/api/v1/services", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(error_of(&v).contains("busy"));
}

/// The DESIGN.md routes ("REST API") that exist so far, steps 1 to 4 (the cluster and
/// node routes of step 5 join this list with their routes).
const DESIGN_ROUTES: &[(&str, &str)] = &[
    ("get", "/api/v1/services"),
    ("post", "/api/v1/services"),
    ("get", "/api/v1/services/{name}"),
    ("put", "/api/v1/services/{name}"),
    ("delete", "/api/v1/services/{name}"),
    ("post", "/api/v1/services/{name}/backends"),
    ("patch", "/api/v1/services/{name}/backends/{address}"),
    ("delete", "/api/v1/services/{name}/backends/{address}"),
    ("get", "/api/v1/stats"),
    ("post", "/api/v1/services/{name}/cache/purge"),
    ("post", "/api/v1/reload"),
    ("post", "/api/v1/node/drain"),
    ("post", "/api/v1/node/undrain"),
    ("get", "/api/v1/filters"),
    ("put", "/api/v1/filters"),
    ("get", "/api/v1/cluster"),
    ("get", "/healthz"),
    ("get", "/metrics"),
];

/// (method, path) of every operation in an OpenAPI document.
fn operations(spec: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in [
            "get", "put", "post", "delete", "options", "head", "patch", "trace",
        ] {
            if item.get(method).is_some() {
                out.push((method.to_owned(), path.clone()));
            }
        }
    }
    out
}

/// The property names a schema allows: its own, and those of what it refers to or
/// combines (`$ref`, `allOf`, `anyOf`, `oneOf`).
fn properties(spec: &Value, schema: &Value) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.strip_prefix("#/components/schemas/").expect("local ref");
        out.extend(properties(spec, &spec["components"]["schemas"][name]));
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        for s in schema[key].as_array().into_iter().flatten() {
            out.extend(properties(spec, s));
        }
    }
    if let Some(p) = schema["properties"].as_object() {
        out.extend(p.keys().cloned());
    }
    out
}

/// Every key of `value` is a property of schema `name` in `spec`.
fn assert_documented(spec: &Value, name: &str, value: &Value) {
    let allowed = properties(
        spec,
        &json!({ "$ref": format!("#/components/schemas/{name}") }),
    );
    assert!(!allowed.is_empty(), "no schema {name}");
    for key in value.as_object().expect("an object").keys() {
        assert!(
            allowed.contains(key),
            "{name}: {key} is not documented ({allowed:?})"
        );
    }
}

#[tokio::test]
async fn openapi_document_lists_exactly_the_routes_the_router_has() {
    let f = Fixture::new();
    let (status, spec) = f.call("GET", "/api/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK, "{spec}");
    assert_eq!(spec, serde_json::to_value(super::openapi()).expect("json"));
    assert_eq!(spec["openapi"], "3.1.0");
    let documented = operations(&spec);
    for (method, path) in DESIGN_ROUTES {
        assert!(
            documented.contains(&((*method).to_owned(), (*path).to_owned())),
            "DESIGN.md route {method} {path} is not in the OpenAPI document"
        );
    }
    assert!(documented.contains(&("get".to_owned(), "/api/v1/openapi.json".to_owned())));
    assert!(
        spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
            .get(crate::metrics::CONTENT_TYPE)
            .is_some(),
        "/metrics is documented with another content type than it has"
    );
    // Every documented operation is routed: called without a body on a fresh agent, it
    // answers with one of its documented statuses, never the "no such route" or
    // "method not allowed" fallbacks.
    for (method, path) in &documented {
        let f = Fixture::new();
        let uri = path
            .replace("{name}", "web")
            .replace("{address}", "198.18.2.11");
        let (status, _, body) = f.send_raw(&method.to_uppercase(), &uri, None, None).await;
        assert!(
            status != StatusCode::METHOD_NOT_ALLOWED && !body.contains("no such route"),
            "{method} {path} is documented but not routed: {status} {body}"
        );
        let listed = &spec["paths"][path][method]["responses"];
        assert!(
            listed.get(status.as_str()).is_some(),
            "{method} {uri} answered {status}, which {path} does not document: {body}"
        );
    }
    let (status, v) = f.call("GET", "/api/v1/openapi.jsn", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
}

#[tokio::test]
async fn answers_carry_only_documented_fields() {
    let spec = serde_json::to_value(super::openapi()).expect("json");
    let f = Fixture::with(None, Box::new(FakeFastPath));
    let (_, web) = f.call("GET", "/api/v1/services/web", None).await;
    assert_documented(&spec, "Service", &web);
    for b in web["backends"].as_array().expect("backends") {
        assert_documented(&spec, "Backend", b);
        assert_documented(&spec, "HealthStatus", &b["health"]);
    }
    assert_documented(&spec, "HealthConfig", &web["health"]);
    assert_documented(&spec, "HttpConfig", &web["http"]);
    let (_, stats) = f.call("GET", "/api/v1/stats", None).await;
    assert_documented(&spec, "Stats", &stats);
    assert_documented(&spec, "ServiceTraffic", &stats["services"]["web"]);
    let (_, reload) = f.call("POST", "/api/v1/reload", None).await;
    assert_documented(&spec, "ReloadResponse", &reload);
    let (_, error) = f.call("GET", "/api/v1/services/nope", None).await;
    assert_documented(&spec, "ErrorBody", &error);
    // The request bodies: what the API accepts is what the document describes.
    let shop: Value = serde_json::from_str(SHOP).expect("json");
    assert_documented(&spec, "ServiceConfig", &shop);
    assert_documented(
        &spec,
        "BackendConfig",
        &json!({"address": "198.18.2.13", "port": 80, "weight": 1, "tier": 0}),
    );
    assert_documented(
        &spec,
        "BackendPatch",
        &json!({"weight": 1, "state": "drain"}),
    );
}

#[tokio::test]
async fn the_openapi_document_needs_the_token_like_the_rest_of_the_api() {
    let f = Fixture::with(Some(TOKEN), Box::new(NoFastPath));
    let (status, _) = f.send("GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, spec) = f
        .send("GET", "/api/v1/openapi.json", None, Some(TOKEN))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(
        spec["paths"]["/healthz"]["get"]["security"],
        json!([{}]),
        "no token"
    );
}

// --- bad input (issue 9) ---------------------------------------------------

/// An l7 service `shop` as JSON with `extra` fields after its name.
fn l7_shop(extra: &str) -> String {
    format!(
        r#"{{"name": "shop", "vip": "198.18.100.2:443", "mode": "l7"{extra}, "backend": [{{"address": "198.18.2.21"}}]}}"#
    )
}

#[tokio::test]
async fn bad_services_are_refused_naming_the_key() {
    let f = Fixture::new();
    let cases = [
        // Backends that are this agent: every request would loop through the proxy.
        (
            r#"{"name": "shop", "vip": "198.18.100.2:443", "mode": "l7", "backend": [{"address": "198.18.100.2", "port": 443}]}"#,
            "backend[0].address: 198.18.100.2:443 is this service's own VIP",
        ),
        (
            r#"{"name": "shop", "vip": "198.18.100.2:443", "mode": "l7", "backend": [{"address": "127.0.0.1", "port": 9090}]}"#,
            "backend[0].address: 127.0.0.1:9090 is the agent's own API",
        ),
        (
            r#"{"name": "shop", "vip": "127.0.0.1:9090", "mode": "l7"}"#,
            "vip: 127.0.0.1:9090 is the agent's own API address",
        ),
        (
            r#"{"name": "shop", "vip": "198.18.100.2:443", "mode": "l7", "backend": [{"address": "198.18.2.21", "port": 0}]}"#,
            "backend[0].port",
        ),
        (
            r#"{"name": "..", "vip": "198.18.100.9:80"}"#,
            "name: service name \"..\"",
        ),
        (
            r#"{"name": ".", "vip": "198.18.100.9:80"}"#,
            "name: service name \".\"",
        ),
        (
            r#"{"name": "a/b", "vip": "198.18.100.9:80"}"#,
            "name: service name \"a/b\"",
        ),
    ];
    for (body, needle) in cases {
        let (status, v) = f.call("POST", "/api/v1/services", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(
            error_of(&v).contains(needle),
            "{body}: {v} should say {needle}"
        );
    }
    // A second l7 service may not send to the first one's VIP, nor the first take a
    // backend that is the second's VIP.
    let (status, v) = f.call("POST", "/api/v1/services", Some(&l7_shop(""))).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let loop_back = r#"{"name": "api", "vip": "198.18.100.3:80", "mode": "l7", "backend": [{"address": "198.18.100.2", "port": 443}]}"#;
    let (status, v) = f.call("POST", "/api/v1/services", Some(loop_back)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        error_of(&v).contains("the VIP of l7 service \"shop\""),
        "{v}"
    );
    let (status, v) = f
        .call(
            "POST",
            "/api/v1/services/shop/backends",
            Some(r#"{"address": "198.18.100.2"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_of(&v).contains("own VIP"), "{v}");
    assert_eq!(f.names().await, ["web", "shop"]);
}

/// A certificate and its key, a key of another certificate and a file that is not PEM.
fn write_tls_files(dir: &std::path::Path) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let other = rcgen::generate_simple_self_signed(vec!["x".to_owned()]).expect("rcgen");
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("c.pem"), ck.cert.pem()).expect("write");
    std::fs::write(dir.join("k.pem"), ck.key_pair.serialize_pem()).expect("write");
    std::fs::write(dir.join("other.pem"), other.key_pair.serialize_pem()).expect("write");
    std::fs::write(dir.join("junk"), "not pem").expect("write");
}

#[tokio::test]
async fn api_tls_files_must_be_a_pem_pair_in_tls_dir() {
    let f = Fixture::with_agent(None, Box::new(NoFastPath), |dir| {
        format!("tls_dir = \"{}\"\n", dir.join("tls").display())
    });
    let tls_dir = f.dir.path().join("tls");
    write_tls_files(&tls_dir);
    let outside = f.dir.path().join("elsewhere");
    write_tls_files(&outside);
    let tls = |dir: &std::path::Path, cert: &str, key: &str| {
        l7_shop(&format!(
            r#", "tls": {{"cert": "{}", "key": "{}"}}"#,
            dir.join(cert).display(),
            dir.join(key).display()
        ))
    };
    let cases = [
        (tls(&tls_dir, "junk", "k.pem"), "tls.cert: TLS certificate"),
        (tls(&tls_dir, "c.pem", "junk"), "tls.key: TLS key"),
        (tls(&tls_dir, "c.pem", "other.pem"), "tls: TLS certificate"),
        (tls(&outside, "c.pem", "k.pem"), "outside agent.tls_dir"),
        (
            tls(&tls_dir.join("..").join("elsewhere"), "c.pem", "k.pem"),
            "outside agent.tls_dir",
        ),
        (
            tls(std::path::Path::new("/etc"), "passwd", "shadow"),
            "tls.cert",
        ),
    ];
    for (body, needle) in &cases {
        let (status, v) = f.call("POST", "/api/v1/services", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(
            error_of(&v).contains(needle),
            "{body}: {v} should say {needle}"
        );
    }
    assert!(!f.state_file().exists(), "nothing persisted");
    let (status, v) = f
        .call(
            "POST",
            "/api/v1/services",
            Some(&tls(&tls_dir, "c.pem", "k.pem")),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
}

#[tokio::test]
async fn without_tls_dir_the_api_names_no_tls_files_but_keeps_the_files() {
    let dir = tempfile::Builder::new()
        .prefix("xdplb-api-test-")
        .tempdir()
        .expect("temporary dir");
    write_tls_files(&dir.path().join("tls"));
    let shop = format!(
        "[[service]]\nname = \"shop\"\nvip = \"198.18.100.2:443\"\nmode = \"l7\"\n\
         tls = {{ cert = \"{0}/tls/c.pem\", key = \"{0}/tls/k.pem\" }}\n\
         backend = [{{ address = \"198.18.2.21\" }}]\n",
        dir.path().display()
    );
    let text = config_text(dir.path(), &shop);
    let f = Fixture::from_text(dir, &text);
    let tls = format!(
        r#", "tls": {{"cert": "{0}/tls/c.pem", "key": "{0}/tls/k.pem"}}"#,
        f.dir.path().display()
    );
    // The config file's service keeps its files through API changes.
    let body = l7_shop(&tls);
    let (status, v) = f.call("PUT", "/api/v1/services/shop", Some(&body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = f
        .call(
            "POST",
            "/api/v1/services/shop/backends",
            Some(r#"{"address": "198.18.2.22"}"#),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    // A new service may not name files.
    let body = body
        .replace("\"shop\"", "\"shop2\"")
        .replace("198.18.100.2", "198.18.100.4");
    let (status, v) = f.call("POST", "/api/v1/services", Some(&body)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_of(&v).contains("unless agent.tls_dir"), "{v}");
}

/// Control over the fixture's config with `state` as its state file: the error message
/// when it refuses to start.
fn start_with_state(f: &Fixture, state: &Value) -> Result<Control, String> {
    let text = serde_json::to_string_pretty(state).expect("json");
    std::fs::write(f.state_file(), &text).expect("write state");
    let result = new_control(&config_text(f.dir.path(), ""), Box::new(NoFastPath));
    assert_eq!(
        std::fs::read_to_string(f.state_file()).expect("read"),
        text,
        "the state file is left as it is"
    );
    result.map_err(|e| match e {
        ControlError::State { message, .. } => message,
        e => panic!("wrong error: {e}"),
    })
}

#[tokio::test]
async fn the_state_file_goes_through_the_apis_rules() {
    let f = Fixture::new();
    let refused = [
        // A weight the API caps at 1,000,000.
        (
            json!({"version": 1, "backends": {"web": {"198.18.2.11": {"weight": 4294967295u32}}}}),
            "backends[\"web\"][\"198.18.2.11\"].weight: 4294967295 is above the maximum 1000000",
        ),
        (
            json!({"version": 1, "backends": {"web": {"198.18.2.11": {}}}}),
            "backends[\"web\"][\"198.18.2.11\"]: give \"weight\" and/or \"state\"",
        ),
        // A service the API would refuse.
        (
            json!({"version": 1, "services": {"shop": {"name": "shop", "vip": "198.18.100.2:443",
                "backend": [{"address": "198.18.2.21", "weight": 2000000}]}}}),
            "services[\"shop\"].backend[0].weight",
        ),
        (
            json!({"version": 1, "services": {"shop": {"name": "..", "vip": "198.18.100.2:443"}}}),
            "services[\"shop\"].name: the entry \"shop\" holds a service named \"..\"",
        ),
        (
            json!({"version": 1, "services": {"..": {"name": "..", "vip": "198.18.100.2:443"}}}),
            "services[\"..\"].name: service name \"..\"",
        ),
        (
            json!({"version": 1, "services": {"shop": {"name": "shop", "vip": "198.18.100.2:443",
                "mode": "l7", "backend": [{"address": "198.18.100.2"}]}}}),
            "services[\"shop\"].backend[0].address: 198.18.100.2:443 is this service's own VIP",
        ),
        // Files the API could not have named (no agent.tls_dir).
        (
            json!({"version": 1, "services": {"shop": {"name": "shop", "vip": "198.18.100.2:443",
                "mode": "l7", "tls": {"cert": "/etc/passwd", "key": "/etc/shadow"}}}}),
            "services[\"shop\"].tls: TLS files cannot be named through the API",
        ),
    ];
    for (state, needle) in refused {
        match start_with_state(&f, &state) {
            Ok(_) => panic!("{state} was accepted"),
            Err(message) => {
                assert!(
                    message.contains(needle),
                    "{state}: {message} should say {needle}"
                );
                assert!(message.contains("the file is left as it is"), "{message}");
            }
        }
    }

    // Entries that refer to nothing are dropped (with a WARN); the rest is served.
    let state = json!({"version": 1,
    "deleted": ["ghost"],
    "backends": {
        "ghost": {"198.18.2.11": {"weight": 5}},
        "web": {"198.18.2.99": {"weight": 5}, "198.18.2.11": {"state": "drain"}},
    }});
    let control = start_with_state(&f, &state).expect("starts");
    assert!(control.overrides("ghost").is_none());
    let web = control.overrides("web").expect("web's overrides");
    assert_eq!(
        web.keys().map(ToString::to_string).collect::<Vec<_>>(),
        ["198.18.2.11"]
    );
    assert_eq!(
        control.view("web").expect("web").backends[0].state,
        crate::state::AdminState::Drain
    );
}

#[tokio::test]
async fn a_reload_that_removes_every_service_needs_allow_empty() {
    let f = Fixture::new();
    std::fs::write(&f.state.config_path, "").expect("truncate");
    let (status, v) = f.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let error = error_of(&v);
    assert!(
        error.contains("would remove every service (web)") && error.contains("allow_empty"),
        "{v}"
    );
    assert_eq!(f.names().await, ["web"], "nothing changed");
    let (status, v) = f
        .call("POST", "/api/v1/reload", Some(r#"{"allow_empty": false}"#))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    let (status, v) = f
        .call("POST", "/api/v1/reload", Some(r#"{"alow_empty": true}"#))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert!(error_of(&v).contains("alow_empty"), "{v}");
    assert_eq!(f.names().await, ["web"], "nothing changed");

    let (status, v) = f
        .call("POST", "/api/v1/reload", Some(r#"{"allow_empty": true}"#))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (&v["services"], &v["removed"]),
        (&json!(0), &json!(["web"]))
    );
    assert!(f.names().await.is_empty());
    // With nothing served, an empty file is no surprise.
    let (status, v) = f.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn a_reload_reports_what_it_changed_and_what_the_api_shadows() {
    let f = Fixture::new();
    let path = f.state.config_path.clone();
    // Through the API: web replaced, shop created.
    let web =
        r#"{"name": "web", "vip": "198.18.100.1:80", "backend": [{"address": "198.18.2.13"}]}"#;
    let (status, _) = f.call("PUT", "/api/v1/services/web", Some(web)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = f.call("POST", "/api/v1/services", Some(SHOP)).await;
    assert_eq!(status, StatusCode::CREATED);

    // The file: web edited (shadowed by the API's copy), dns added, shop added too
    // (shadowed), then a second reload edits dns and removes it.
    let web_edited = "[agent]\nstate_dir = \"{dir}\"\n[dataplane]\nsource_ipv4 = \"198.18.1.10\"\n\
         [[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n\
         backend = [{ address = \"198.18.2.11\", weight = 5 }]\n"
        .replace("{dir}", &f.dir.path().display().to_string());
    let dns = "[[service]]\nname = \"dns\"\nvip = \"198.18.100.3:53\"\nprotocol = \"udp\"\n";
    let shop = "[[service]]\nname = \"shop\"\nvip = \"198.18.100.2:443\"\n\
                backend = [{ address = \"198.18.2.29\" }]\n";
    std::fs::write(&path, format!("{web_edited}{dns}{shop}")).expect("write");
    let (status, v) = f.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["added"], json!(["dns"]));
    assert_eq!(v["removed"], json!([]));
    assert_eq!(
        v["changed"],
        json!([]),
        "the API's copies are served as before"
    );
    assert_eq!(
        v["shadowed"],
        json!([
            {"service": "shop", "file": "added", "kept": "api-copy"},
            {"service": "web", "file": "changed", "kept": "api-copy"},
        ])
    );
    let (_, got) = f.call("GET", "/api/v1/services/web", None).await;
    assert!(
        got["backends"][0]["address"] == "198.18.2.13",
        "the API's copy stays in force: {got}"
    );

    // Deleted through the API, then edited in the file: still deleted, and said so.
    let (status, _) = f.call("DELETE", "/api/v1/services/dns", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let dns_edited = dns.replace("53\"", "5353\"");
    std::fs::write(&path, format!("{web_edited}{dns_edited}{shop}")).expect("write");
    let (status, v) = f.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["shadowed"],
        json!([{"service": "dns", "file": "changed", "kept": "api-deleted"}])
    );

    // A file-only service changed and removed.
    let f = Fixture::new();
    let path = f.state.config_path.clone();
    std::fs::write(&path, config_text(f.dir.path(), dns)).expect("write");
    let (status, v) = f.call("POST", "/api/v1/reload", None).await;
    assert_eq!((status, &v["added"]), (StatusCode::OK, &json!(["dns"])));
    let text = config_text(f.dir.path(), "").replace("198.18.2.12", "198.18.2.14");
    std::fs::write(&path, text).expect("write");
    let (status, v) = f.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (&v["changed"], &v["removed"], &v["shadowed"]),
        (&json!(["web"]), &json!(["dns"]), &json!([]))
    );
}

#[tokio::test]
async fn node_routes_drain_and_undrain_through_the_announcer() {
    use std::os::unix::fs::PermissionsExt as _;
    let spec = serde_json::to_value(super::openapi()).expect("json");
    // Without [bgp]: nothing announced, nothing to drain.
    let f = Fixture::new();
    let (status, v) = f.call("GET", "/api/v1/node", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"bgp": null}));
    let (status, v) = f.call("POST", "/api/v1/node/drain", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("[bgp]")),
        "{v}"
    );

    // With an announcer over a fake birdc that answers like BIRD 2.
    let mut f = Fixture::new();
    let dir = f.dir.path().to_path_buf();
    let birdc = dir.join("birdc");
    std::fs::write(
        &birdc,
        "#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\necho Reconfigured\n",
    )
    .expect("fake birdc");
    std::fs::set_permissions(&birdc, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let bgp = crate::config::BgpConfig {
        bird_socket: dir.join("bird.ctl"),
        include_file: dir.join("xdplb.conf"),
        drain_s: 1,
        ..crate::config::BgpConfig::default()
    };
    let node = crate::bgp::BgpNode::new(crate::bgp::Announcer::with_birdc(bgp, birdc));
    let vip: std::net::IpAddr = "198.18.100.1".parse().expect("ip");
    assert_eq!(node.update([vip].into()).await, Ok(true));
    f.state.metrics.bgp.set(node.clone()).expect("set once");
    f.state.bgp = Some(node);
    let (status, v) = f.call("GET", "/api/v1/node", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_documented(&spec, "NodeStatus", &v);
    assert_documented(&spec, "BgpStatus", &v["bgp"]);
    assert_eq!(v["bgp"]["announced"], json!(["198.18.100.1"]));
    assert_eq!(v["bgp"]["drained"], json!(false));
    assert_eq!(v["bgp"]["bird"], json!("configured"));
    let (_, _, metrics) = f.send_raw("GET", "/metrics", None, None).await;
    assert!(
        metrics.contains("xdplb_vip_announced{vip=\"198.18.100.1\"} 1"),
        "{metrics}"
    );

    // Drain answers after drain_s, with nothing announced.
    let started = std::time::Instant::now();
    let (status, v) = f.call("POST", "/api/v1/node/drain", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert_eq!(v["bgp"]["drained"], json!(true));
    assert_eq!(v["bgp"]["announced"], json!([]));
    assert_eq!(v["bgp"]["wanted"], json!(["198.18.100.1"]));
    let file = std::fs::read_to_string(dir.join("xdplb.conf")).expect("include file");
    assert!(!file.contains("route "), "{file}");
    let (_, _, metrics) = f.send_raw("GET", "/metrics", None, None).await;
    assert!(
        metrics.contains("xdplb_vip_announced{vip=\"198.18.100.1\"} 0"),
        "{metrics}"
    );

    let (status, v) = f.call("POST", "/api/v1/node/undrain", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["bgp"]["drained"], json!(false));
    assert_eq!(v["bgp"]["announced"], json!(["198.18.100.1"]));
    let file = std::fs::read_to_string(dir.join("xdplb.conf")).expect("include file");
    assert!(file.contains("route 198.18.100.1/32 blackhole;"), "{file}");
    let calls = std::fs::read_to_string(dir.join("calls")).expect("calls");
    assert_eq!(calls.lines().count(), 3, "{calls}");
}

/// A sink that keeps the last desired state it was given.
struct Recording(Arc<std::sync::Mutex<Option<DesiredState>>>);

impl Sink for Recording {
    fn apply(&mut self, desired: &DesiredState) -> anyhow::Result<()> {
        *self.0.lock().expect("lock") = Some(desired.clone());
        Ok(())
    }
    fn snapshot(&self, _services: &[ServiceConfig]) -> Option<Snapshot> {
        None
    }
}

#[tokio::test]
async fn filters_are_replaced_whole_persisted_and_written() {
    let last = Arc::new(std::sync::Mutex::new(None));
    let f = Fixture::with(None, Box::new(Recording(last.clone())));
    let (status, v) = f.call("GET", "/api/v1/filters", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"deny": [], "allow": []}));

    let body = r#"{"deny": ["203.0.113.0/24", "2001:db8:bad::/48"], "allow": ["198.18.0.0/15"]}"#;
    let (status, v) = f.call("PUT", "/api/v1/filters", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["deny"], json!(["203.0.113.0/24", "2001:db8:bad::/48"]));
    let (_, got) = f.call("GET", "/api/v1/filters", None).await;
    assert_eq!(got, v);
    let desired = last.lock().expect("lock").clone().expect("applied");
    let deny: Vec<String> = desired
        .filters
        .deny
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(deny, ["203.0.113.0/24", "2001:db8:bad::/48"]);
    assert_eq!(desired.filters.allow.len(), 1);

    // Replaced whole: a key left out is an empty list.
    let (status, v) = f
        .call(
            "PUT",
            "/api/v1/filters",
            Some(r#"{"deny": ["198.51.100.7/32"]}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v, json!({"deny": ["198.51.100.7/32"], "allow": []}));
    let desired = last.lock().expect("lock").clone().expect("applied");
    assert!(desired.filters.allow.is_empty());

    // Persisted: a restarted agent has them, and a reload of the file keeps them.
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(f.state_file()).expect("state file"))
            .expect("json");
    assert_eq!(state["security"]["deny"], json!(["198.51.100.7/32"]));
    let text = config_text(f.dir.path(), "[security]\ndeny = [\"192.0.2.0/24\"]\n");
    let again = new_control(&text, Box::new(NoFastPath)).expect("restart");
    assert_eq!(again.filters().deny, ["198.51.100.7/32"]);
    std::fs::write(&f.state.config_path, &text).expect("write");
    let (status, v) = f.call("POST", "/api/v1/reload", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, got) = f.call("GET", "/api/v1/filters", None).await;
    assert_eq!(got["deny"], json!(["198.51.100.7/32"]));
}

#[tokio::test]
async fn bad_filters_are_refused_naming_the_entry_and_change_nothing() {
    let f = Fixture::new();
    let good = r#"{"deny": ["203.0.113.0/24"]}"#;
    let (status, _) = f.call("PUT", "/api/v1/filters", Some(good)).await;
    assert_eq!(status, StatusCode::OK);
    for (body, want) in [
        (
            r#"{"deny": ["203.0.113.0/24", "10.1.2.3/8"]}"#,
            "security.deny[1]: 10.1.2.3/8 has host bits set after /8: did you mean 10.0.0.0/8?",
        ),
        (r#"{"allow": ["2001:db8::1/32"]}"#, "security.allow[0]"),
        (r#"{"deny": ["203.0.113.0"]}"#, "is not a prefix"),
        (r#"{"deny": ["10.0.0.0/33"]}"#, "is not a prefix"),
        (r#"{"deny": ["10.0.0.0/8", "10.0.0.0/8"]}"#, "listed twice"),
        (r#"{"deny": [], "nope": 1}"#, "nope"),
        (r#"{"deny": "10.0.0.0/8"}"#, "deny"),
    ] {
        let (status, v) = f.call("PUT", "/api/v1/filters", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(error_of(&v).contains(want), "{body}: {v}");
    }
    let (_, got) = f.call("GET", "/api/v1/filters", None).await;
    assert_eq!(got, json!({"deny": ["203.0.113.0/24"], "allow": []}));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(f.state_file()).expect("state file"))
            .expect("json");
    assert_eq!(state["security"]["deny"], json!(["203.0.113.0/24"]));
}

#[tokio::test]
async fn a_service_carries_its_own_filters_and_flood_limit() {
    let last = Arc::new(std::sync::Mutex::new(None));
    let f = Fixture::with(None, Box::new(Recording(last.clone())));
    let body = r#"{"name": "web", "vip": "198.18.100.1:80",
        "backend": [{"address": "198.18.2.13"}],
        "deny": ["203.0.113.0/24", "2001:db8:bad::/48"], "allow": ["198.18.0.0/15"],
        "new_flows_per_source": {"rate": 100, "burst": 200, "prefix_v4": 24}}"#;
    let (status, v) = f.call("PUT", "/api/v1/services/web", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (_, v) = f.call("GET", "/api/v1/services/web", None).await;
    assert_eq!(
        v["deny"],
        json!(["203.0.113.0/24", "2001:db8:bad::/48"]),
        "{v}"
    );
    assert_eq!(v["allow"], json!(["198.18.0.0/15"]), "{v}");
    assert_eq!(
        v["new_flows_per_source"],
        json!({"rate": 100, "burst": 200, "prefix_v4": 24, "prefix_v6": 64}),
        "{v}"
    );
    let desired = last.lock().expect("lock").clone().expect("applied");
    let web = desired
        .services
        .iter()
        .find(|s| s.name == "web")
        .expect("web desired");
    assert_eq!(web.filters.deny.len(), 2);
    assert_eq!(web.filters.allow.len(), 1);
    assert_eq!(web.filters.new_flows.map(|l| l.prefix_v4), Some(24));

    // Refused with the key named, and nothing changes.
    for (bad, want) in [
        (
            r#""deny": ["203.0.113.9/24"]"#,
            "deny[0]: 203.0.113.9/24 has host bits set",
        ),
        (r#""allow": ["10.0.0.0/8", "10.0.0.0/8"]"#, "allow[1]"),
        (
            r#""new_flows_per_source": {"rate": 0, "burst": 1}"#,
            "new_flows_per_source.rate: 0 is out of range",
        ),
        (r#""new_flows_per_source": {"rate": 1}"#, "burst"),
    ] {
        let body = format!(
            r#"{{"name": "web", "vip": "198.18.100.1:80", "backend": [{{"address": "198.18.2.13"}}], {bad}}}"#
        );
        let (status, v) = f.call("PUT", "/api/v1/services/web", Some(&body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(error_of(&v).contains(want), "{bad}: {v}");
    }
    let (_, v) = f.call("GET", "/api/v1/services/web", None).await;
    assert_eq!(
        v["deny"],
        json!(["203.0.113.0/24", "2001:db8:bad::/48"]),
        "{v}"
    );

    // The global limit goes through PUT /api/v1/filters with the lists.
    let (status, v) = f
        .call(
            "PUT",
            "/api/v1/filters",
            Some(r#"{"new_flows_per_source": {"rate": 1000, "burst": 2000}}"#),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        v["new_flows_per_source"],
        json!({"rate": 1000, "burst": 2000, "prefix_v4": 32, "prefix_v6": 64})
    );
    let desired = last.lock().expect("lock").clone().expect("applied");
    assert_eq!(desired.filters.new_flows.map(|l| l.rate), Some(1000));
}

#[tokio::test]
async fn without_cluster_the_cluster_route_says_so() {
    let f = Fixture::new();
    let (status, v) = f.call("GET", "/api/v1/cluster", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("no [cluster]")),
        "{v}"
    );
}

#[tokio::test]
async fn quic_services_show_their_backends_quic_ids_and_bad_ids_are_refused() {
    let f = Fixture::new();
    let h3 = r#"{"name": "h3", "vip": "198.18.100.8:443", "protocol": "udp", "quic": true,
        "backend": [{"address": "198.18.2.31", "quic_id": 7}, {"address": "198.18.2.32", "quic_id": 70000}]}"#;
    let (status, created) = f.call("POST", "/api/v1/services", Some(h3)).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let (status, got) = f.call("GET", "/api/v1/services/h3", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["quic"], true);
    assert_eq!(backend(&got, "198.18.2.31")["quic_id"], 7);
    assert_eq!(backend(&got, "198.18.2.32")["quic_id"], 70000);
    // A service without quic shows no such fields.
    let (_, web) = f.call("GET", "/api/v1/services/web", None).await;
    assert!(web.get("quic").is_none(), "{web}");
    assert!(
        backend(&web, "198.18.2.11").get("quic_id").is_none(),
        "{web}"
    );

    let cases = [
        (
            r#"{"name": "q2", "vip": "198.18.100.9:443", "protocol": "udp", "quic": true,
            "backend": [{"address": "198.18.2.31", "quic_id": 7}, {"address": "198.18.2.32", "quic_id": 7}]}"#,
            "backend[1].quic_id",
        ),
        (
            r#"{"name": "q2", "vip": "198.18.100.9:443", "quic": true, "backend": [{"address": "198.18.2.31"}]}"#,
            "quic",
        ),
        (
            r#"{"name": "q2", "vip": "198.18.100.9:443", "protocol": "udp",
            "backend": [{"address": "198.18.2.31", "quic_id": 1}]}"#,
            "backend[0].quic_id",
        ),
    ];
    for (body, key) in cases {
        let (status, v) = f.call("POST", "/api/v1/services", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(error_of(&v).contains(key), "{body}: {v} should name {key}");
    }
    assert_eq!(f.names().await, ["web", "h3"]);
}

#[tokio::test]
async fn backend_protocol_and_backend_tls_through_the_api() {
    let f = Fixture::with_agent(None, Box::new(NoFastPath), |dir| {
        format!("tls_dir = \"{}\"\n", dir.join("tls").display())
    });
    let tls_dir = f.dir.path().join("tls");
    write_tls_files(&tls_dir);
    let outside = f.dir.path().join("elsewhere");
    write_tls_files(&outside);
    let with_ca = |dir: &std::path::Path| {
        l7_shop(&format!(
            r#", "backend_protocol": "h2", "backend_tls": {{"ca": "{}", "server_name": "api.internal"}}"#,
            dir.join("c.pem").display()
        ))
    };
    for (body, needle) in [
        (with_ca(&outside), "backend_tls.ca"),
        (
            l7_shop(r#", "backend_protocol": "h2c", "backend_tls": {"verify": false}"#),
            "backend_tls: backend_protocol = \"h2c\"",
        ),
        (l7_shop(r#", "backend_protocol": "h3""#), "h2c"),
    ] {
        let (status, v) = f.call("POST", "/api/v1/services", Some(&body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert!(
            error_of(&v).contains(needle),
            "{body}: {v} should say {needle}"
        );
    }
    assert!(!f.state_file().exists(), "nothing persisted");
    let (status, v) = f
        .call("POST", "/api/v1/services", Some(&with_ca(&tls_dir)))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    let (status, v) = f.call("GET", "/api/v1/services/shop", None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["backend_protocol"], "h2", "{v}");
    assert_eq!(v["backend_tls"]["server_name"], "api.internal", "{v}");
    assert_eq!(v["backend_tls"]["verify"], true, "{v}");
}
