//! Integration tests of the cache: a real hyper HTTP/1.1 backend on 127.0.0.1 that
//! counts hits per path and answers as configured per path, an [`Upstream`] that
//! opens a hyper client connection to it per request, and `Cache::handle` called
//! directly. Expiry uses real (short) sleeps: `max-age=1` and ~1.1 s waits.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::{Cache, CacheResult, Upstream, UpstreamError};
use crate::config::CacheConfig;
use crate::l7::body::{Body, BoxError, boxed, empty, full};

const HOST: &str = "test.local";

/// How the backend answers one path.
#[derive(Clone)]
struct Route {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    delay: Duration,
    /// Answer `If-None-Match` with this tag by 304.
    etag: Option<String>,
    /// Send the body in chunks without `Content-Length`.
    chunked: bool,
    /// Status for non-GET/HEAD requests.
    unsafe_status: u16,
}

impl Route {
    fn ok(cache_control: &str, body: &str) -> Self {
        let mut headers = vec![("content-type", "text/plain".to_owned())];
        if !cache_control.is_empty() {
            headers.push(("cache-control", cache_control.to_owned()));
        }
        Self {
            status: 200,
            headers,
            body: Bytes::copy_from_slice(body.as_bytes()),
            delay: Duration::ZERO,
            etag: None,
            chunked: false,
            unsafe_status: 200,
        }
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn etag(mut self, tag: &str) -> Self {
        self.etag = Some(tag.to_owned());
        self
    }
}

#[derive(Default)]
struct State {
    routes: Mutex<HashMap<String, Route>>,
    hits: Mutex<HashMap<String, u64>>,
    seen: Mutex<Vec<(Method, String, HeaderMap)>>,
}

/// The test backend: a hyper server on 127.0.0.1:0.
struct Backend {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(State::default());
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                while conns.try_join_next().is_some() {}
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = Arc::clone(&st);
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(req, Arc::clone(&st)));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    fn route(&self, path: &str, route: Route) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(path.to_owned(), route);
    }

    fn hits(&self, path: &str) -> u64 {
        self.state
            .hits
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Method and headers of the last request for `path`.
    fn last(&self, path: &str) -> (Method, HeaderMap) {
        let seen = self.state.seen.lock().unwrap();
        let (m, _, h) = seen
            .iter()
            .rev()
            .find(|(_, p, _)| p == path)
            .expect("a request for the path");
        (m.clone(), h.clone())
    }

    /// Close the port and every connection.
    fn stop(&self) {
        self.task.abort();
    }

    fn upstream(&self) -> TestUpstream {
        TestUpstream { addr: self.addr }
    }
}

async fn answer(req: Request<Incoming>, st: Arc<State>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let n = {
        let mut hits = st.hits.lock().unwrap();
        let n = hits.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    st.seen
        .lock()
        .unwrap()
        .push((req.method().clone(), path.clone(), req.headers().clone()));
    let route = st.routes.lock().unwrap().get(&path).cloned();
    let Some(route) = route else {
        let mut r = Response::new(full("no route"));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return Ok(r);
    };
    if !route.delay.is_zero() {
        tokio::time::sleep(route.delay).await;
    }
    let mut b = Response::builder().header("x-hit", n);
    for (k, v) in &route.headers {
        b = b.header(*k, v);
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD);
    if let Some(tag) = &route.etag {
        b = b.header(header::ETAG, tag);
        let inm = req.headers().get(header::IF_NONE_MATCH);
        if safe && inm.is_some_and(|v| v.as_bytes() == tag.as_bytes()) {
            return Ok(b.status(304).body(empty()).unwrap());
        }
    }
    let status = if safe {
        route.status
    } else {
        route.unsafe_status
    };
    let body = if route.chunked {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = route
            .body
            .chunks(1000)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        boxed(StreamBody::new(futures_util::stream::iter(chunks)))
    } else {
        full(route.body.clone())
    };
    Ok(b.status(status).body(body).unwrap())
}

/// A fresh hyper HTTP/1.1 connection per request to the backend.
#[derive(Clone)]
struct TestUpstream {
    addr: SocketAddr,
}

impl Upstream for TestUpstream {
    fn send(
        &self,
        req: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, UpstreamError>> {
        let addr = self.addr;
        Box::pin(async move {
            let err = |what: &str, e: &dyn std::fmt::Display| UpstreamError(format!("{what}: {e}"));
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|e| err("connect", &e))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| err("handshake", &e))?;
            tokio::spawn(conn);
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| err("request", &e))?;
            Ok(resp.map(boxed))
        })
    }
}

/// An upstream that always fails with the given text.
#[derive(Clone)]
struct FailingUpstream(&'static str);

impl Upstream for FailingUpstream {
    fn send(
        &self,
        _req: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, UpstreamError>> {
        let e = self.0;
        Box::pin(async move { Err(UpstreamError(e.to_owned())) })
    }
}

fn cache() -> Cache {
    Cache::new(&CacheConfig {
        max_bytes: 16 << 20,
        max_object_bytes: 1 << 20,
        targets: crate::config::default_cache_targets(),
        stale_if_unreachable_s: 0,
    })
}

fn req(method: Method, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, HOST);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).unwrap()
}

fn get(path: &str) -> Request<Body> {
    req(Method::GET, path, &[])
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    result: CacheResult,
    body: Bytes,
}

impl Got {
    fn cache_status(&self) -> &str {
        self.headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn call(cache: &Cache, up: &impl Upstream, req: Request<Body>) -> Got {
    let resp = cache.handle(req, up.clone()).await;
    let result = *resp
        .extensions()
        .get::<CacheResult>()
        .expect("CacheResult extension");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        result,
        body,
    }
}

/// Let the store task of a just-finished miss insert the response.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(30)).await;
}

async fn stale_wait() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

#[test]
fn result_labels() {
    let all = [
        (CacheResult::Hit, "hit"),
        (CacheResult::Miss, "miss"),
        (CacheResult::Stale, "stale"),
        (CacheResult::Revalidated, "revalidated"),
        (CacheResult::Bypass, "bypass"),
        (CacheResult::Collapsed, "collapsed"),
    ];
    for (r, s) in all {
        assert_eq!(r.as_str(), s);
    }
}

#[tokio::test]
async fn miss_then_hit_with_age_and_cache_status() {
    let be = Backend::start().await;
    be.route("/a", Route::ok("max-age=60", "hello").header("age", "10"));
    let (c, up) = (cache(), be.upstream());

    let g = call(&c, &up, get("/a")).await;
    assert_eq!((g.status, g.result), (StatusCode::OK, CacheResult::Miss));
    assert_eq!(
        g.cache_status(),
        "xdplb; fwd=uri-miss; fwd-status=200; stored"
    );
    assert_eq!(g.body, "hello");
    settle().await;

    let g = call(&c, &up, get("/a")).await;
    assert_eq!((g.status, g.result), (StatusCode::OK, CacheResult::Hit));
    assert_eq!(g.body, "hello");
    // the upstream's Age (10) plus the time it spent here
    let age: u64 = g.header("age").parse().unwrap();
    assert!((10..=11).contains(&age), "age {age}");
    assert_eq!(g.cache_status(), "xdplb; hit; ttl=49");
    assert_eq!(g.header("x-hit"), "1");
    assert_eq!(be.hits("/a"), 1);
    c.run_pending_tasks().await;
    assert_eq!(c.usage().0, 1);
}

/// A client that has read the whole response of a fill finds it stored when it asks
/// again at once: the tee holds the body's last bytes until the store has it (no
/// `settle` here). Before, the insert ran after the client had everything, and a quick
/// second request was collapsed onto the still-open fill.
#[tokio::test]
async fn a_fill_is_stored_before_its_client_has_the_last_byte() {
    let be = Backend::start().await;
    be.route("/len", Route::ok("max-age=60", "hello"));
    let mut chunked = Route::ok("max-age=60", &"c".repeat(2500));
    chunked.chunked = true;
    be.route("/chunked", chunked);
    let (c, up) = (cache(), be.upstream());
    for path in ["/len", "/chunked"] {
        let g = call(&c, &up, get(path)).await;
        assert_eq!(g.result, CacheResult::Miss, "{path}");
        let g = call(&c, &up, get(path)).await;
        assert_eq!(g.result, CacheResult::Hit, "{path}");
        assert_eq!(be.hits(path), 1, "{path}");
    }
}

#[tokio::test]
async fn absolute_form_and_host_header_share_a_key() {
    let be = Backend::start().await;
    be.route("/abs", Route::ok("max-age=60", "x"));
    let (c, up) = (cache(), be.upstream());
    // HTTP/2-style: authority in the URI (host upper-case), no Host header
    let r = Request::builder()
        .uri("http://TEST.local/abs?q=1")
        .body(empty())
        .unwrap();
    assert_eq!(call(&c, &up, r).await.result, CacheResult::Miss);
    settle().await;
    assert_eq!(
        call(&c, &up, get("/abs?q=1")).await.result,
        CacheResult::Hit
    );
    // another query is another resource
    assert_eq!(
        call(&c, &up, get("/abs?q=2")).await.result,
        CacheResult::Miss
    );
}

#[tokio::test]
async fn head_from_stored_get_and_head_miss_not_stored() {
    let be = Backend::start().await;
    be.route("/h", Route::ok("max-age=60", "body!"));
    let (c, up) = (cache(), be.upstream());

    let g = call(&c, &up, req(Method::HEAD, "/h", &[])).await;
    assert_eq!(g.result, CacheResult::Miss);
    assert!(g.body.is_empty());
    assert_eq!(be.last("/h").0, Method::HEAD);
    settle().await;
    // the HEAD response was not stored
    let g = call(&c, &up, get("/h")).await;
    assert_eq!(g.result, CacheResult::Miss);
    settle().await;

    let g = call(&c, &up, req(Method::HEAD, "/h", &[])).await;
    assert_eq!(g.result, CacheResult::Hit);
    assert!(g.body.is_empty());
    assert_eq!(g.header("content-length"), "5");
    assert_eq!(be.hits("/h"), 2);
}

#[tokio::test]
async fn unsafe_methods_bypass_and_invalidate() {
    let be = Backend::start().await;
    for p in ["/a", "/b", "/c", "/other"] {
        be.route(p, Route::ok("max-age=60", p));
    }
    let mut post = Route::ok("max-age=60", "/a");
    post.unsafe_status = 201;
    be.route(
        "/a",
        post.header("location", "/b")
            .header("content-location", "http://test.local/c"),
    );
    let mut failing = Route::ok("max-age=60", "/other");
    failing.unsafe_status = 400;
    be.route("/other", failing.header("location", "/b"));
    let (c, up) = (cache(), be.upstream());
    for p in ["/a", "/b", "/c", "/other"] {
        call(&c, &up, get(p)).await;
    }
    settle().await;

    // a failed PUT invalidates nothing
    let g = call(&c, &up, req(Method::PUT, "/other", &[])).await;
    assert_eq!((g.status.as_u16(), g.result), (400, CacheResult::Bypass));
    for p in ["/a", "/b", "/c", "/other"] {
        assert_eq!(call(&c, &up, get(p)).await.result, CacheResult::Hit, "{p}");
    }

    let g = call(&c, &up, req(Method::POST, "/a", &[])).await;
    assert_eq!((g.status.as_u16(), g.result), (201, CacheResult::Bypass));
    assert_eq!(g.cache_status(), "xdplb; fwd=method; fwd-status=201");
    assert_eq!(be.last("/a").0, Method::POST);
    for p in ["/a", "/b", "/c"] {
        assert_eq!(call(&c, &up, get(p)).await.result, CacheResult::Miss, "{p}");
    }
    assert_eq!(call(&c, &up, get("/other")).await.result, CacheResult::Hit);

    // OPTIONS (safe) bypasses without invalidating
    settle().await;
    let g = call(&c, &up, req(Method::OPTIONS, "/b", &[])).await;
    assert_eq!(g.result, CacheResult::Bypass);
    assert_eq!(call(&c, &up, get("/b")).await.result, CacheResult::Hit);
}

#[tokio::test]
async fn storability_rules() {
    let be = Backend::start().await;
    let last_modified = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(3600));
    /// Path, backend answer, request headers, whether the response is stored.
    type Case = (
        &'static str,
        Route,
        &'static [(&'static str, &'static str)],
        bool,
    );
    let cases: Vec<Case> = vec![
        ("/plain", Route::ok("max-age=60", "x"), &[], true),
        (
            "/no-store",
            Route::ok("max-age=60, no-store", "x"),
            &[],
            false,
        ),
        (
            "/req-no-store",
            Route::ok("max-age=60", "x"),
            &[("cache-control", "no-store")],
            false,
        ),
        (
            "/private",
            Route::ok("private, max-age=60", "x"),
            &[],
            false,
        ),
        (
            "/cookie",
            Route::ok("max-age=60", "x").header("set-cookie", "a=b"),
            &[],
            false,
        ),
        (
            "/vary-star",
            Route::ok("max-age=60", "x").header("vary", "*"),
            &[],
            false,
        ),
        ("/nothing", Route::ok("", "x"), &[], false),
        (
            "/auth",
            Route::ok("max-age=60", "x"),
            &[("authorization", "Bearer t")],
            false,
        ),
        (
            "/auth-public",
            Route::ok("public, max-age=60", "x"),
            &[("authorization", "Bearer t")],
            true,
        ),
        (
            "/auth-smaxage",
            Route::ok("s-maxage=60", "x"),
            &[("authorization", "Bearer t")],
            true,
        ),
        (
            "/heuristic",
            Route::ok("", "x").header("last-modified", last_modified.clone()),
            &[],
            true,
        ),
        (
            "/s-maxage",
            Route::ok("max-age=0, s-maxage=60", "x"),
            &[],
            true,
        ),
        (
            "/expires",
            Route::ok("", "x").header(
                "expires",
                httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60)),
            ),
            &[],
            true,
        ),
        ("/bad-max-age", Route::ok("max-age=soon", "x"), &[], false),
    ];
    let (c, up) = (cache(), be.upstream());
    for (path, route, headers, _) in &cases {
        be.route(path, route.clone());
        call(&c, &up, req(Method::GET, path, headers)).await;
    }
    settle().await;
    for (path, _, headers, stored) in &cases {
        let g = call(&c, &up, req(Method::GET, path, headers)).await;
        let want = if *stored {
            CacheResult::Hit
        } else {
            CacheResult::Miss
        };
        assert_eq!(g.result, want, "{path}: {}", g.cache_status());
        assert_eq!(be.hits(path), if *stored { 1 } else { 2 }, "{path}");
    }
    // 1 hour since Last-Modified: 6 minutes of heuristic freshness
    let g = call(&c, &up, get("/heuristic")).await;
    assert!(
        g.cache_status().contains("ttl=35") || g.cache_status().contains("ttl=36"),
        "{}",
        g.cache_status()
    );
}

#[tokio::test]
async fn partial_content_is_not_stored_and_range_bypasses() {
    let be = Backend::start().await;
    let mut r = Route::ok("max-age=60", "part");
    r.status = 206;
    be.route("/r", r);
    let (c, up) = (cache(), be.upstream());
    let g = call(&c, &up, req(Method::GET, "/r", &[("range", "bytes=0-3")])).await;
    assert_eq!((g.status.as_u16(), g.result), (206, CacheResult::Bypass));
    assert!(g.cache_status().contains("fwd=bypass"));
    call(&c, &up, get("/r")).await;
    settle().await;
    assert_eq!(call(&c, &up, get("/r")).await.result, CacheResult::Miss);
}

#[tokio::test]
async fn vary_selects_variants() {
    let be = Backend::start().await;
    be.route(
        "/v",
        Route::ok("max-age=60", "v").header("vary", "Accept-Language"),
    );
    let (c, up) = (cache(), be.upstream());
    let en = || req(Method::GET, "/v", &[("accept-language", "en")]);
    let fr = || req(Method::GET, "/v", &[("accept-language", "fr")]);
    assert_eq!(call(&c, &up, en()).await.result, CacheResult::Miss);
    settle().await;
    assert_eq!(call(&c, &up, en()).await.result, CacheResult::Hit);
    let g = call(&c, &up, fr()).await;
    assert_eq!(g.result, CacheResult::Miss);
    assert!(
        g.cache_status().contains("fwd=vary-miss"),
        "{}",
        g.cache_status()
    );
    settle().await;
    assert_eq!(call(&c, &up, fr()).await.result, CacheResult::Hit);
    assert_eq!(call(&c, &up, en()).await.result, CacheResult::Hit);
    // absent header is its own variant
    assert_eq!(call(&c, &up, get("/v")).await.result, CacheResult::Miss);
    assert_eq!(be.hits("/v"), 3);
}

#[tokio::test]
async fn stale_is_revalidated_with_304_and_headers_merged() {
    let be = Backend::start().await;
    be.route(
        "/r",
        Route::ok("max-age=1", "original")
            .etag("\"v1\"")
            .header("x-version", "1"),
    );
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/r")).await;
    stale_wait().await;
    // the origin now says: still v1, fresh for 60 s, with a new header value
    be.route(
        "/r",
        Route::ok("max-age=60", "ignored")
            .etag("\"v1\"")
            .header("x-version", "2"),
    );
    let g = call(&c, &up, get("/r")).await;
    assert_eq!(
        (g.status, g.result),
        (StatusCode::OK, CacheResult::Revalidated)
    );
    assert!(
        g.cache_status()
            .starts_with("xdplb; fwd=stale; fwd-status=304"),
        "{}",
        g.cache_status()
    );
    assert_eq!(g.body, "original");
    assert_eq!(g.header("x-version"), "2");
    assert_eq!(g.header("content-length"), "8");
    assert_eq!(be.last("/r").1.get("if-none-match").unwrap(), "\"v1\"");
    let g = call(&c, &up, get("/r")).await;
    assert_eq!(g.result, CacheResult::Hit);
    assert_eq!(g.header("x-version"), "2");
    assert_eq!(be.hits("/r"), 2);
}

#[tokio::test]
async fn stale_is_replaced_by_a_new_200_and_last_modified_is_sent() {
    let be = Backend::start().await;
    let lm = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(100));
    be.route(
        "/r",
        Route::ok("max-age=1", "old").header("last-modified", lm.clone()),
    );
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/r")).await;
    stale_wait().await;
    be.route("/r", Route::ok("max-age=60", "new"));
    let g = call(&c, &up, get("/r")).await;
    assert_eq!((g.result, &g.body[..]), (CacheResult::Miss, &b"new"[..]));
    assert!(
        g.cache_status()
            .contains("fwd=stale; fwd-status=200; stored")
    );
    assert_eq!(
        be.last("/r").1.get("if-modified-since").unwrap(),
        lm.as_str()
    );
    settle().await;
    let g = call(&c, &up, get("/r")).await;
    assert_eq!((g.result, &g.body[..]), (CacheResult::Hit, &b"new"[..]));
}

#[tokio::test]
async fn client_conditionals_answered_from_the_cache() {
    let be = Backend::start().await;
    be.route("/e", Route::ok("max-age=60", "etagged").etag("\"t\""));
    let (c, up) = (cache(), be.upstream());
    let cond = || req(Method::GET, "/e", &[("if-none-match", "\"t\"")]);
    // miss: the cache asks for the full response (stores it) and answers 304 itself
    let g = call(&c, &up, cond()).await;
    assert_eq!(
        (g.status, g.result),
        (StatusCode::NOT_MODIFIED, CacheResult::Miss)
    );
    assert!(g.body.is_empty());
    assert!(be.last("/e").1.get("if-none-match").is_none());
    settle().await;
    let g = call(&c, &up, cond()).await;
    assert_eq!(
        (g.status, g.result),
        (StatusCode::NOT_MODIFIED, CacheResult::Hit)
    );
    assert_eq!(g.header("etag"), "\"t\"");
    let g = call(
        &c,
        &up,
        req(Method::GET, "/e", &[("if-none-match", "\"other\"")]),
    )
    .await;
    assert_eq!((g.status, g.result), (StatusCode::OK, CacheResult::Hit));
    assert_eq!(g.body, "etagged");
    assert_eq!(be.hits("/e"), 1);
}

#[tokio::test]
async fn no_cache_response_and_request_directives_force_validation() {
    let be = Backend::start().await;
    be.route("/nc", Route::ok("no-cache, max-age=60", "nc").etag("\"a\""));
    be.route("/f", Route::ok("max-age=60", "f").etag("\"b\""));
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/nc")).await;
    call(&c, &up, get("/f")).await;
    settle().await;

    let g = call(&c, &up, get("/nc")).await;
    assert_eq!(g.result, CacheResult::Revalidated);
    assert!(
        g.cache_status().contains("fwd=stale; fwd-status=304"),
        "{}",
        g.cache_status()
    );
    assert_eq!(be.hits("/nc"), 2);

    for directive in [
        ("cache-control", "no-cache"),
        ("cache-control", "max-age=0"),
        ("pragma", "no-cache"),
    ] {
        let g = call(&c, &up, req(Method::GET, "/f", &[directive])).await;
        assert_eq!(g.result, CacheResult::Revalidated, "{directive:?}");
        assert!(
            g.cache_status().contains("fwd=request; fwd-status=304"),
            "{}",
            g.cache_status()
        );
        assert_eq!(g.body, "f");
    }
    assert_eq!(be.hits("/f"), 4);
    assert_eq!(call(&c, &up, get("/f")).await.result, CacheResult::Hit);
}

#[tokio::test]
async fn collapses_concurrent_misses() {
    let be = Backend::start().await;
    let mut slow = Route::ok("max-age=60", &"s".repeat(10_000));
    slow.delay = Duration::from_millis(200);
    slow.chunked = true;
    be.route("/slow", slow);
    let (c, up) = (cache(), be.upstream());
    let mut tasks = JoinSet::new();
    for _ in 0..20 {
        let (c, up) = (c.clone(), up.clone());
        tasks.spawn(async move { call(&c, &up, get("/slow")).await });
    }
    let mut results = HashMap::new();
    while let Some(g) = tasks.join_next().await {
        let g = g.unwrap();
        assert_eq!(g.status, StatusCode::OK);
        assert_eq!(g.body.len(), 10_000);
        if g.result == CacheResult::Collapsed {
            assert!(
                g.cache_status().contains("; collapsed"),
                "{}",
                g.cache_status()
            );
        }
        *results.entry(g.result).or_insert(0) += 1;
    }
    assert_eq!(be.hits("/slow"), 1);
    assert_eq!(results.get(&CacheResult::Miss), Some(&1));
    assert_eq!(results.get(&CacheResult::Collapsed), Some(&19));
}

#[tokio::test]
async fn collapsed_waiters_go_upstream_when_not_storable() {
    let be = Backend::start().await;
    let mut slow = Route::ok("no-store", "private stuff");
    slow.delay = Duration::from_millis(100);
    be.route("/ns", slow);
    let (c, up) = (cache(), be.upstream());
    let mut tasks = JoinSet::new();
    for _ in 0..5 {
        let (c, up) = (c.clone(), up.clone());
        tasks.spawn(async move { call(&c, &up, get("/ns")).await });
    }
    while let Some(g) = tasks.join_next().await {
        let g = g.unwrap();
        assert_eq!((g.status, g.result), (StatusCode::OK, CacheResult::Miss));
        assert_eq!(g.body, "private stuff");
    }
    assert_eq!(be.hits("/ns"), 5);
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let be = Backend::start().await;
    let mut r = Route::ok("max-age=1, stale-while-revalidate=30", "v1");
    be.route("/swr", r.clone());
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/swr")).await;
    stale_wait().await;
    r.body = Bytes::from_static(b"v2");
    r.delay = Duration::from_millis(200);
    be.route("/swr", r);

    let t0 = Instant::now();
    let g = call(&c, &up, get("/swr")).await;
    assert!(t0.elapsed() < Duration::from_millis(150), "served at once");
    assert_eq!((g.result, &g.body[..]), (CacheResult::Stale, &b"v1"[..]));
    assert!(
        g.cache_status().contains("hit; ttl=-"),
        "{}",
        g.cache_status()
    );
    assert!(g.cache_status().contains("detail=stale-while-revalidate"));
    // a second stale request during the refresh does not start another
    let g = call(&c, &up, get("/swr")).await;
    assert_eq!(g.result, CacheResult::Stale);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(be.hits("/swr"), 2);
    let g = call(&c, &up, get("/swr")).await;
    assert_eq!((g.result, &g.body[..]), (CacheResult::Hit, &b"v2"[..]));
}

#[tokio::test]
async fn stale_if_error_when_backend_is_down() {
    let be = Backend::start().await;
    be.route(
        "/sie",
        Route::ok("max-age=1, stale-if-error=60", "still here"),
    );
    be.route("/plain", Route::ok("max-age=1", "gone"));
    be.route(
        "/mr",
        Route::ok("max-age=1, must-revalidate, stale-if-error=60", "strict"),
    );
    let (c, up) = (cache(), be.upstream());
    for p in ["/sie", "/plain", "/mr"] {
        call(&c, &up, get(p)).await;
    }
    be.stop();
    stale_wait().await;

    let g = call(&c, &up, get("/sie")).await;
    assert_eq!((g.status, g.result), (StatusCode::OK, CacheResult::Stale));
    assert_eq!(g.body, "still here");
    assert!(
        g.cache_status().contains("fwd=stale; ttl=-"),
        "{}",
        g.cache_status()
    );
    assert!(g.cache_status().contains("detail=stale-if-error"));
    assert!(g.header("age").parse::<u64>().unwrap() >= 1);

    let g = call(&c, &up, get("/plain")).await;
    assert_eq!(
        (g.status, g.result),
        (StatusCode::BAD_GATEWAY, CacheResult::Miss)
    );
    let g = call(&c, &up, get("/mr")).await;
    assert_eq!(
        g.status,
        StatusCode::BAD_GATEWAY,
        "must-revalidate forbids stale-if-error"
    );

    // the request directive works too
    let g = call(
        &c,
        &up,
        req(
            Method::GET,
            "/plain",
            &[("cache-control", "stale-if-error=60")],
        ),
    )
    .await;
    assert_eq!((g.status, g.result), (StatusCode::OK, CacheResult::Stale));
}

#[tokio::test]
async fn stale_if_error_on_5xx_and_must_revalidate_passes_it_through() {
    let be = Backend::start().await;
    be.route("/sie", Route::ok("max-age=1, stale-if-error=60", "good"));
    be.route(
        "/mr",
        Route::ok(
            "max-age=1, must-revalidate, stale-while-revalidate=60",
            "good",
        ),
    );
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/sie")).await;
    call(&c, &up, get("/mr")).await;
    stale_wait().await;
    for p in ["/sie", "/mr"] {
        let mut broken = Route::ok("", "broken");
        broken.status = 503;
        be.route(p, broken);
    }
    let g = call(&c, &up, get("/sie")).await;
    assert_eq!(
        (g.status, g.result, &g.body[..]),
        (StatusCode::OK, CacheResult::Stale, &b"good"[..])
    );
    assert!(g.cache_status().contains("fwd-status=503"));
    let g = call(&c, &up, get("/mr")).await;
    assert_eq!(
        (g.status, g.result),
        (StatusCode::SERVICE_UNAVAILABLE, CacheResult::Miss)
    );
}

#[tokio::test]
async fn upstream_errors_become_502_or_504() {
    let c = cache();
    let g = call(
        &c,
        &FailingUpstream("connect: connection refused"),
        get("/x"),
    )
    .await;
    assert_eq!(
        (g.status, g.result),
        (StatusCode::BAD_GATEWAY, CacheResult::Miss)
    );
    assert!(g.cache_status().contains("detail=upstream-error"));
    let g = call(&c, &FailingUpstream("upstream timeout"), get("/x")).await;
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT);
    let g = call(&c, &FailingUpstream("reset"), req(Method::POST, "/x", &[])).await;
    assert_eq!(
        (g.status, g.result),
        (StatusCode::BAD_GATEWAY, CacheResult::Bypass)
    );
    let g = call(
        &c,
        &FailingUpstream("reset"),
        req(Method::GET, "/x", &[("cache-control", "only-if-cached")]),
    )
    .await;
    assert_eq!(g.status, StatusCode::GATEWAY_TIMEOUT);
}

#[tokio::test]
async fn large_bodies_stream_in_full_but_are_not_stored() {
    let be = Backend::start().await;
    be.route("/big", Route::ok("max-age=60", &"b".repeat(5000)));
    let mut chunked = Route::ok("max-age=60", &"c".repeat(5000));
    chunked.chunked = true;
    be.route("/big-chunked", chunked);
    be.route("/small", Route::ok("max-age=60", &"s".repeat(500)));
    let c = Cache::new(&CacheConfig {
        max_bytes: 1 << 20,
        max_object_bytes: 1000,
        targets: crate::config::default_cache_targets(),
        stale_if_unreachable_s: 0,
    });
    let up = be.upstream();
    for p in ["/big", "/big-chunked", "/small"] {
        let g = call(&c, &up, get(p)).await;
        assert_eq!(g.result, CacheResult::Miss);
        assert_eq!(g.body.len(), if p == "/small" { 500 } else { 5000 });
    }
    settle().await;
    assert_eq!(call(&c, &up, get("/big")).await.result, CacheResult::Miss);
    let g = call(&c, &up, get("/big-chunked")).await;
    assert_eq!((g.result, g.body.len()), (CacheResult::Miss, 5000));
    assert_eq!(call(&c, &up, get("/small")).await.result, CacheResult::Hit);
}

#[tokio::test]
async fn memory_stays_within_max_bytes() {
    let be = Backend::start().await;
    be.route("/obj", Route::ok("max-age=60", &"m".repeat(4000)));
    let max_bytes = 64 * 1024;
    let c = Cache::new(&CacheConfig {
        max_bytes,
        max_object_bytes: 8 * 1024,
        targets: crate::config::default_cache_targets(),
        stale_if_unreachable_s: 0,
    });
    let up = be.upstream();
    for i in 0..100 {
        call(&c, &up, get(&format!("/obj?i={i}"))).await;
        settle_fast().await;
        c.run_pending_tasks().await;
        assert!(c.usage().1 <= max_bytes, "{:?}", c.usage());
    }
    settle().await;
    c.run_pending_tasks().await;
    let (entries, bytes) = c.usage();
    assert!(bytes <= max_bytes && bytes > 0, "{bytes}");
    assert!(entries > 0 && entries < 17, "{entries}");
}

async fn settle_fast() {
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn purge_by_path_prefix_and_all() {
    let be = Backend::start().await;
    for p in ["/p/a", "/p/b", "/q"] {
        be.route(p, Route::ok("max-age=60", p));
    }
    let (c, up) = (cache(), be.upstream());
    for p in ["/p/a?x=1", "/p/a?x=2", "/p/b", "/q"] {
        call(&c, &up, get(p)).await;
    }
    settle().await;
    c.run_pending_tasks().await;
    assert_eq!(c.usage().0, 4);
    assert_eq!(c.purge(Some("/p/a"), false), 2);
    assert_eq!(
        call(&c, &up, get("/p/a?x=1")).await.result,
        CacheResult::Miss
    );
    assert_eq!(call(&c, &up, get("/p/b")).await.result, CacheResult::Hit);
    settle().await;
    c.run_pending_tasks().await;
    assert_eq!(c.purge(Some("/p/"), true), 2);
    assert_eq!(call(&c, &up, get("/p/b")).await.result, CacheResult::Miss);
    assert_eq!(call(&c, &up, get("/q")).await.result, CacheResult::Hit);
    settle().await;
    c.run_pending_tasks().await;
    assert_eq!(c.purge(None, false), 2);
    c.run_pending_tasks().await;
    assert_eq!(c.usage(), (0, 0));
    assert_eq!(call(&c, &up, get("/q")).await.result, CacheResult::Miss);
}

#[tokio::test]
async fn upstream_cache_status_is_kept_first() {
    let be = Backend::start().await;
    be.route(
        "/cs",
        Route::ok("max-age=60", "x").header("cache-status", "origin-cache; hit"),
    );
    let (c, up) = (cache(), be.upstream());
    let g = call(&c, &up, get("/cs")).await;
    assert_eq!(
        g.cache_status(),
        "origin-cache; hit, xdplb; fwd=uri-miss; fwd-status=200; stored"
    );
}

/// A hyper server in front of the cache (as the proxy will be): the cache's bodies are
/// driven by hyper, which stops polling a body once its `Content-Length` is written.
async fn front(cache: Cache, up: TestUpstream) -> TestUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (cache, up) = (cache.clone(), up.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (cache, up) = (cache.clone(), up.clone());
                    async move { Ok::<_, Infallible>(cache.handle(req.map(boxed), up).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    TestUpstream { addr }
}

#[tokio::test]
async fn stores_what_a_hyper_server_sends() {
    let be = Backend::start().await;
    be.route("/len", Route::ok("max-age=60", "with content-length"));
    let mut chunked = Route::ok("max-age=60", &"c".repeat(2500));
    chunked.chunked = true;
    be.route("/chunked", chunked);
    let mut no_content = Route::ok("max-age=60", "");
    no_content.status = 204;
    be.route("/204", no_content);
    be.route("/empty", Route::ok("max-age=60", ""));
    let client = front(cache(), be.upstream()).await;
    let fetch = |path: &'static str| {
        let client = client.clone();
        async move {
            let resp = client.send(get(path)).await.expect("front answers");
            let cs = resp.headers()["cache-status"].to_str().unwrap().to_owned();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, cs, body)
        }
    };
    for path in ["/len", "/chunked", "/204", "/empty"] {
        let (status, cs, first) = fetch(path).await;
        assert!(cs.contains("fwd=uri-miss"), "{path}: {cs}");
        settle().await;
        let (status2, cs, second) = fetch(path).await;
        assert!(cs.starts_with("xdplb; hit"), "{path}: {cs}");
        assert_eq!((status, &first), (status2, &second), "{path}");
        assert_eq!(be.hits(path), 1, "{path}");
    }
}

#[tokio::test]
async fn cookie_of_a_304_goes_to_its_client_only() {
    let be = Backend::start().await;
    be.route("/k", Route::ok("max-age=1", "k").etag("\"k\""));
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/k")).await;
    stale_wait().await;
    be.route(
        "/k",
        Route::ok("max-age=60", "k")
            .etag("\"k\"")
            .header("set-cookie", "session=1"),
    );
    let g = call(&c, &up, get("/k")).await;
    assert_eq!(g.result, CacheResult::Revalidated);
    assert_eq!(g.header("set-cookie"), "session=1");
    let g = call(&c, &up, get("/k")).await;
    assert_eq!(g.result, CacheResult::Hit);
    assert!(g.headers.get("set-cookie").is_none());
}

#[tokio::test]
async fn a_304_that_makes_the_response_private_drops_it() {
    let be = Backend::start().await;
    be.route("/p", Route::ok("max-age=1", "p").etag("\"p\""));
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/p")).await;
    stale_wait().await;
    be.route("/p", Route::ok("private, max-age=60", "p").etag("\"p\""));
    let g = call(&c, &up, get("/p")).await;
    assert_eq!(
        (g.result, &g.body[..]),
        (CacheResult::Revalidated, &b"p"[..])
    );
    assert_eq!(call(&c, &up, get("/p")).await.result, CacheResult::Miss);
}

fn cache_with(f: impl FnOnce(&mut CacheConfig)) -> Cache {
    let mut cfg = CacheConfig {
        max_bytes: 16 << 20,
        max_object_bytes: 1 << 20,
        targets: crate::config::default_cache_targets(),
        stale_if_unreachable_s: 0,
    };
    f(&mut cfg);
    Cache::new(&cfg)
}

fn range(path: &str, range: &str, if_range: Option<&str>) -> Request<Body> {
    let mut h = vec![("range", range)];
    if let Some(v) = if_range {
        h.push(("if-range", v));
    }
    req(Method::GET, path, &h)
}

#[tokio::test]
async fn ranges_are_answered_from_a_stored_complete_response() {
    let be = Backend::start().await;
    be.route("/r", Route::ok("max-age=60", "01234567890").etag("\"v1\""));
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/r")).await;
    settle().await;

    for (r, body, cr) in [
        ("bytes=0-1", "01", "bytes 0-1/11"),
        ("bytes=1-", "1234567890", "bytes 1-10/11"),
        ("bytes=-1", "0", "bytes 10-10/11"),
        ("bytes=9-100", "90", "bytes 9-10/11"),
    ] {
        let g = call(&c, &up, range("/r", r, None)).await;
        assert_eq!(
            (g.status.as_u16(), g.result),
            (206, CacheResult::Hit),
            "{r}"
        );
        assert_eq!(g.body, body, "{r}");
        assert_eq!(g.header("content-range"), cr);
        assert_eq!(g.header("content-length"), body.len().to_string());
        assert_eq!(g.header("etag"), "\"v1\"");
    }
    // nothing satisfiable: 416 with the length
    let g = call(&c, &up, range("/r", "bytes=11-", None)).await;
    assert_eq!(g.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(g.header("content-range"), "bytes */11");
    assert!(g.body.is_empty());
    // several ascending ranges: multipart/byteranges
    let g = call(&c, &up, range("/r", "bytes=0-1, 4-5", None)).await;
    assert_eq!((g.status.as_u16(), g.result), (206, CacheResult::Hit));
    let ct = g.header("content-type").to_owned();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .expect("multipart content type");
    assert_eq!(
        String::from_utf8(g.body.to_vec()).unwrap(),
        format!(
            "\r\n--{boundary}\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/11\r\n\r\n01\
             \r\n--{boundary}\r\nContent-Type: text/plain\r\nContent-Range: bytes 4-5/11\r\n\r\n45\
             \r\n--{boundary}--\r\n"
        )
    );
    assert_eq!(g.header("content-length"), g.body.len().to_string());
    assert!(g.headers.get("content-range").is_none());
    // invalid syntax, another unit, overlapping or unordered ranges: the whole 200
    for r in ["bytes=5-1", "items=0-1", "bytes=0-4,3-5", "bytes=4-5,0-1"] {
        let g = call(&c, &up, range("/r", r, None)).await;
        assert_eq!(
            (g.status.as_u16(), &g.body[..]),
            (200, &b"01234567890"[..]),
            "{r}"
        );
        assert_eq!(g.result, CacheResult::Hit);
    }
    // If-Range: the range only with a strong match
    let g = call(&c, &up, range("/r", "bytes=1-2", Some("\"v1\""))).await;
    assert_eq!((g.status.as_u16(), &g.body[..]), (206, &b"12"[..]));
    for ir in ["\"v0\"", "W/\"v1\""] {
        let g = call(&c, &up, range("/r", "bytes=1-2", Some(ir))).await;
        assert_eq!(g.status.as_u16(), 200, "{ir}");
    }
    // HEAD ignores Range
    let g = call(&c, &up, req(Method::HEAD, "/r", &[("range", "bytes=0-1")])).await;
    assert_eq!((g.status.as_u16(), g.result), (200, CacheResult::Hit));
    assert_eq!(be.hits("/r"), 1, "all from the store");

    // a Range request that misses goes to the backend as it is and stores nothing
    be.route("/m", Route::ok("max-age=60", "abcdef"));
    let g = call(&c, &up, range("/m", "bytes=0-1", None)).await;
    assert_eq!(g.result, CacheResult::Bypass);
    assert_eq!(be.last("/m").1.get("range").unwrap(), "bytes=0-1");
    settle().await;
    assert_eq!(call(&c, &up, get("/m")).await.result, CacheResult::Miss);
}

#[tokio::test]
async fn stale_range_request_with_swr_refreshes_the_whole_response() {
    let be = Backend::start().await;
    let r = Route::ok("max-age=1, stale-while-revalidate=30", "0123456789");
    be.route("/s", r.clone());
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/s")).await;
    stale_wait().await;
    let g = call(&c, &up, range("/s", "bytes=0-3", None)).await;
    assert_eq!((g.status.as_u16(), g.result), (206, CacheResult::Stale));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(be.hits("/s"), 2);
    assert!(
        be.last("/s").1.get("range").is_none(),
        "refresh without Range"
    );
    assert_eq!(call(&c, &up, get("/s")).await.result, CacheResult::Hit);
}

#[tokio::test]
async fn cdn_cache_control_overrides_cache_control() {
    let be = Backend::start().await;
    be.route(
        "/cdn-fresh",
        Route::ok("no-store", "a").header("cdn-cache-control", "max-age=60"),
    );
    be.route(
        "/cdn-nostore",
        Route::ok("max-age=60", "b").header("cdn-cache-control", "no-store"),
    );
    be.route(
        "/cdn-private",
        Route::ok("max-age=60", "c").header("cdn-cache-control", "private"),
    );
    be.route(
        "/cdn-invalid",
        Route::ok("no-store", "d").header("cdn-cache-control", "max-age=60, &&&"),
    );
    let (c, up) = (cache(), be.upstream());
    for p in ["/cdn-fresh", "/cdn-nostore", "/cdn-private", "/cdn-invalid"] {
        let g = call(&c, &up, get(p)).await;
        // forwarded downstream: a CDN in front may be addressed too
        assert!(!g.header("cdn-cache-control").is_empty(), "{p}");
    }
    settle().await;
    assert_eq!(
        call(&c, &up, get("/cdn-fresh")).await.result,
        CacheResult::Hit
    );
    for p in ["/cdn-nostore", "/cdn-private", "/cdn-invalid"] {
        assert_eq!(call(&c, &up, get(p)).await.result, CacheResult::Miss, "{p}");
    }
}

#[tokio::test]
async fn configured_targets_take_precedence_in_order() {
    let be = Backend::start().await;
    be.route(
        "/t",
        Route::ok("max-age=60", "t")
            .header("xdplb-cache-control", "no-store")
            .header("cdn-cache-control", "max-age=60"),
    );
    let up = be.upstream();
    // default targets: CDN-Cache-Control stores it
    let c = cache();
    call(&c, &up, get("/t")).await;
    settle().await;
    assert_eq!(call(&c, &up, get("/t")).await.result, CacheResult::Hit);
    // ours first: no-store
    let c = cache_with(|cfg| {
        cfg.targets = vec!["xdplb-Cache-Control".into(), "CDN-Cache-Control".into()];
    });
    call(&c, &up, get("/t")).await;
    settle().await;
    assert_eq!(call(&c, &up, get("/t")).await.result, CacheResult::Miss);
    // none: Cache-Control alone
    let c = cache_with(|cfg| cfg.targets.clear());
    be.route(
        "/u",
        Route::ok("max-age=60", "u").header("cdn-cache-control", "no-store"),
    );
    call(&c, &up, get("/u")).await;
    settle().await;
    assert_eq!(call(&c, &up, get("/u")).await.result, CacheResult::Hit);
}

#[tokio::test]
async fn head_response_refreshes_or_invalidates_the_stored_get() {
    let be = Backend::start().await;
    be.route(
        "/h",
        Route::ok("max-age=1", "body one")
            .header("x-a", "1")
            .etag("\"v1\""),
    );
    be.route("/i", Route::ok("max-age=1", "body two").etag("\"v1\""));
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/h")).await;
    call(&c, &up, get("/i")).await;
    settle().await;
    stale_wait().await;

    // same validator: the HEAD's fields update the stored GET, freshness included
    be.route(
        "/h",
        Route::ok("max-age=60", "body one")
            .header("x-a", "2")
            .etag("\"v1\""),
    );
    let g = call(&c, &up, req(Method::HEAD, "/h", &[])).await;
    assert_eq!(
        (g.status.as_u16(), g.result),
        (200, CacheResult::Revalidated)
    );
    assert!(
        g.cache_status().contains("detail=head-refresh"),
        "{}",
        g.cache_status()
    );
    assert_eq!(be.last("/h").0, Method::HEAD);
    let g = call(&c, &up, get("/h")).await;
    assert_eq!(
        (g.result, &g.body[..]),
        (CacheResult::Hit, &b"body one"[..])
    );
    assert_eq!(g.header("x-a"), "2");
    assert_eq!(be.hits("/h"), 2);

    // another validator: the stored GET is not served again
    be.route("/i", Route::ok("max-age=60", "body three").etag("\"v2\""));
    let g = call(&c, &up, req(Method::HEAD, "/i", &[])).await;
    assert_eq!(g.result, CacheResult::Miss);
    assert!(g.cache_status().contains("detail=head-invalidated"));
    let g = call(&c, &up, get("/i")).await;
    assert_eq!(
        (g.result, &g.body[..]),
        (CacheResult::Miss, &b"body three"[..])
    );
}

#[tokio::test]
async fn stale_served_when_the_backend_is_unreachable_if_configured() {
    let be = Backend::start().await;
    be.route("/p", Route::ok("max-age=1", "plain"));
    be.route("/mr", Route::ok("max-age=1, must-revalidate", "strict"));
    be.route("/sm", Route::ok("s-maxage=1", "shared"));
    let c = cache_with(|cfg| cfg.stale_if_unreachable_s = 60);
    let up = be.upstream();
    for p in ["/p", "/mr", "/sm"] {
        call(&c, &up, get(p)).await;
    }
    settle().await;
    be.stop();
    stale_wait().await;
    let g = call(&c, &up, get("/p")).await;
    assert_eq!((g.status.as_u16(), g.result), (200, CacheResult::Stale));
    assert_eq!(g.body, "plain");
    assert!(
        g.cache_status().contains("detail=unreachable"),
        "{}",
        g.cache_status()
    );
    for p in ["/mr", "/sm"] {
        let g = call(&c, &up, get(p)).await;
        assert_eq!(g.status, StatusCode::BAD_GATEWAY, "{p}");
    }
    // the client may still insist on validation
    let g = call(
        &c,
        &up,
        req(Method::GET, "/p", &[("cache-control", "no-cache")]),
    )
    .await;
    assert_eq!(g.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn a_5xx_is_not_unreachable() {
    let be = Backend::start().await;
    be.route("/p", Route::ok("max-age=1", "plain"));
    let c = cache_with(|cfg| cfg.stale_if_unreachable_s = 60);
    let up = be.upstream();
    call(&c, &up, get("/p")).await;
    settle().await;
    stale_wait().await;
    let mut broken = Route::ok("", "broken");
    broken.status = 503;
    be.route("/p", broken);
    let g = call(&c, &up, get("/p")).await;
    assert_eq!(g.status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn unknown_status_with_explicit_freshness_is_reused() {
    let be = Backend::start().await;
    let mut r = Route::ok("max-age=60", "odd");
    r.status = 599;
    be.route("/599", r.clone());
    r.headers
        .push(("cache-control", "no-store, must-understand".into()));
    be.route("/599mu", r);
    let (c, up) = (cache(), be.upstream());
    call(&c, &up, get("/599")).await;
    call(&c, &up, get("/599mu")).await;
    settle().await;
    let g = call(&c, &up, get("/599")).await;
    assert_eq!((g.status.as_u16(), g.result), (599, CacheResult::Hit));
    assert_eq!(call(&c, &up, get("/599mu")).await.result, CacheResult::Miss);
}

/// `Cache::hit` with `unchanged`, as [`call`] reads a response.
async fn fast(
    cache: &Cache,
    req: Request<Body>,
    unchanged: impl Fn(&http::HeaderName) -> bool,
) -> Option<Got> {
    let resp = cache.hit(&req, unchanged).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Some(Got {
        status: parts.status,
        headers: parts.headers,
        result: CacheResult::Hit,
        body,
    })
}

/// What a request (made anew for each path) is, and the status and body it gets.
type FastCase = (
    &'static str,
    fn() -> Request<Body>,
    StatusCode,
    &'static str,
);

/// The fields of a response that do not depend on the second it is served in.
fn timeless(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    h.remove(header::AGE);
    h.remove("cache-status");
    h
}

#[tokio::test]
async fn the_hit_fast_path_serves_what_handle_serves_and_nothing_else() {
    let be = Backend::start().await;
    be.route("/p", Route::ok("max-age=60", "plain").etag("\"p\""));
    be.route(
        "/v",
        Route::ok("max-age=60", "varied").header("vary", "Accept-Language"),
    );
    be.route(
        "/x",
        Route::ok("max-age=60", "xff").header("vary", "X-Forwarded-For"),
    );
    be.route("/n", Route::ok("no-cache", "validated").etag("\"n\""));
    be.route(
        "/c",
        Route::ok("max-age=60", "behind another cache").header("cache-status", "origin-cdn; hit"),
    );
    let (c, up) = (cache(), be.upstream());
    let en = || req(Method::GET, "/v", &[("accept-language", "en")]);
    for r in [get("/p"), en(), get("/x"), get("/n"), get("/c")] {
        assert_eq!(call(&c, &up, r).await.result, CacheResult::Miss);
    }
    settle().await;
    let all = |_: &http::HeaderName| true;
    let fresh_hits: [FastCase; 9] = [
        ("GET", || get("/p"), StatusCode::OK, "plain"),
        ("HEAD", || req(Method::HEAD, "/p", &[]), StatusCode::OK, ""),
        (
            "If-None-Match",
            || req(Method::GET, "/p", &[("if-none-match", "\"p\"")]),
            StatusCode::NOT_MODIFIED,
            "",
        ),
        (
            "Range",
            || req(Method::GET, "/p", &[("range", "bytes=1-2")]),
            StatusCode::PARTIAL_CONTENT,
            "la",
        ),
        (
            "Vary",
            || req(Method::GET, "/v", &[("accept-language", "en")]),
            StatusCode::OK,
            "varied",
        ),
        (
            "Cache-Status of a cache before us",
            || get("/c"),
            StatusCode::OK,
            "behind another cache",
        ),
        (
            "If-Modified-Since",
            || {
                req(
                    Method::GET,
                    "/p",
                    &[("if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT")],
                )
            },
            StatusCode::NOT_MODIFIED,
            "",
        ),
        (
            "request directives that allow it",
            || req(Method::GET, "/p", &[("cache-control", "max-age=600")]),
            StatusCode::OK,
            "plain",
        ),
        // The same again: the per-second Age and Cache-Status values are reused.
        ("again", || get("/p"), StatusCode::OK, "plain"),
    ];
    for (what, make, status, body) in fresh_hits {
        let f = fast(&c, make(), all)
            .await
            .unwrap_or_else(|| panic!("{what}: no fast hit"));
        let h = call(&c, &up, make()).await;
        assert_eq!(h.result, CacheResult::Hit, "{what}");
        assert_eq!((f.status, &f.body[..]), (status, body.as_bytes()), "{what}");
        assert_eq!((h.status, &h.body), (f.status, &f.body), "{what}");
        assert_eq!(timeless(&f.headers), timeless(&h.headers), "{what}");
        // The same fields in the same order, Age and Cache-Status included.
        assert_eq!(
            f.headers.keys().collect::<Vec<_>>(),
            h.headers.keys().collect::<Vec<_>>(),
            "{what}"
        );
        let ours = |s: &str| s.rsplit_once("ttl=").map(|(a, _)| a.to_owned());
        assert_eq!(ours(f.cache_status()), ours(h.cache_status()), "{what}");
        let before = if what.starts_with("Cache-Status") {
            "origin-cdn; hit, "
        } else {
            ""
        };
        assert!(
            f.cache_status()
                .starts_with(&format!("{before}xdplb; hit; ttl=")),
            "{what}: {}",
            f.cache_status()
        );
        assert!(!f.header("age").is_empty(), "{what}: no Age");
    }
    // Everything else is left to `handle`.
    let none: [(&str, Request<Body>); 8] = [
        ("nothing stored", get("/none")),
        (
            "request Pragma: no-cache",
            req(Method::GET, "/p", &[("pragma", "no-cache")]),
        ),
        (
            "request max-age=0",
            req(Method::GET, "/p", &[("cache-control", "max-age=0")]),
        ),
        (
            "request min-fresh past the lifetime",
            req(Method::GET, "/p", &[("cache-control", "min-fresh=600")]),
        ),
        (
            "another variant",
            req(Method::GET, "/v", &[("accept-language", "fr")]),
        ),
        ("response no-cache", get("/n")),
        (
            "request no-cache",
            req(Method::GET, "/p", &[("cache-control", "no-cache")]),
        ),
        ("POST", req(Method::POST, "/p", &[])),
    ];
    for (what, r) in none {
        assert!(fast(&c, r, all).await.is_none(), "{what}: a fast hit");
    }
    // A response that varies on a field the caller would change is the caller's.
    assert!(fast(&c, get("/x"), all).await.is_some());
    let xff_rewritten = |n: &http::HeaderName| n != "x-forwarded-for";
    assert!(fast(&c, get("/x"), xff_rewritten).await.is_none());
    assert!(fast(&c, get("/p"), xff_rewritten).await.is_some());
    // Not one of these reached the backend.
    assert_eq!(
        (be.hits("/p"), be.hits("/v"), be.hits("/x"), be.hits("/c")),
        (1, 1, 1, 1)
    );
}

/// `HitFields` sees the fields `Cache::hit` reads, whatever their case or position, and
/// nothing else.
#[test]
fn hit_fields_are_found_in_one_pass() {
    use super::HitFields;
    let of = |fields: &[(&str, &str)]| {
        let mut h = http::HeaderMap::new();
        for (n, v) in fields {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        HitFields::of(&h)
    };
    let f = |directives, conditional, range| HitFields {
        directives,
        conditional,
        range,
    };
    assert_eq!(of(&[]), f(false, false, false));
    assert_eq!(
        of(&[("host", "a"), ("accept", "*/*"), ("if-range", "\"x\"")]),
        f(false, false, false)
    );
    assert_eq!(of(&[("Cache-Control", "no-cache")]), f(true, false, false));
    assert_eq!(
        of(&[("host", "a"), ("PRAGMA", "no-cache")]),
        f(true, false, false)
    );
    assert_eq!(of(&[("if-none-match", "*")]), f(false, true, false));
    assert_eq!(
        of(&[("if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT")]),
        f(false, true, false)
    );
    assert_eq!(
        of(&[
            ("range", "bytes=0-1"),
            ("x", "y"),
            ("cache-control", "max-age=1")
        ]),
        f(true, false, true)
    );
}
