//! End-to-end tests of the L7 proxy: real sockets on 127.0.0.1 (ports from :0), real
//! hyper backends started here, real clients (hyper's client connections, raw
//! `TcpStream`s for protocol edge cases, tokio-rustls with an rcgen certificate).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{CacheConfig, ServiceConfig, StickyConfig, TlsConfig};
use crate::l7::body::{self, Body};
use crate::l7::headers::via_name;
use crate::l7::service::L7Service;
use crate::l7::stats::HttpStats;

const LONG: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------

/// A hyper HTTP/1.1 backend that records what it sees.
struct Backend {
    addr: SocketAddr,
    /// TCP connections accepted.
    conns: Arc<AtomicUsize>,
    /// Request headers, in arrival order.
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    fn hits(&self) -> usize {
        self.seen.lock().expect("lock").len()
    }

    fn last(&self) -> HeaderMap {
        self.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("a request")
    }
}

fn query_u64(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Routes: `/slow?ms=N`, `/echo` (collects, then answers with the body),
/// `/echo-stream` (answers with the request body as it comes: chunked), `/stream`
/// (one chunk, 1.5 s pause, another), `/ws` (101, then echoes bytes), `/headers`
/// (hop-by-hop fields in the response), `/cached` (fresh for 60 s), `/cached-xff` (the
/// same, `Vary: X-Forwarded-For`), anything else: the backend's address.
async fn backend_route(
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<HeaderMap>>>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    seen.lock().expect("lock").push(req.headers().clone());
    let name = addr.to_string();
    let resp = match req.uri().path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query_u64(&req, "ms"))).await;
            Response::new(body::full(name))
        }
        "/echo" => {
            let Ok(collected) = req.into_body().collect().await else {
                return Ok(Response::new(body::full("body error")));
            };
            Response::new(body::full(collected.to_bytes()))
        }
        "/echo-stream" => Response::new(body::boxed(req.into_body())),
        "/stream" => {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"first;")).await;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let _ = tx.send(Bytes::from_static(b"second")).await;
            });
            let frames = futures_util::stream::poll_fn(move |cx| {
                rx.poll_recv(cx)
                    .map(|d| d.map(|d| Ok::<_, Infallible>(http_body::Frame::data(d))))
            });
            Response::new(body::boxed(http_body_util::StreamBody::new(frames)))
        }
        "/ws" => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(up) = on.await {
                    let mut io = TokioIo::new(up);
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = io.read(&mut buf).await {
                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(body::empty())
                .expect("101")
        }
        "/headers" => Response::builder()
            .header("connection", "x-drop")
            .header("x-drop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-kept", "1")
            .body(body::full(name))
            .expect("response"),
        "/cached" => Response::builder()
            .header("cache-control", "public, max-age=60")
            .body(body::full(name))
            .expect("response"),
        "/cached-xff" => Response::builder()
            .header("cache-control", "public, max-age=60")
            .header("vary", "X-Forwarded-For")
            .body(body::full(name))
            .expect("response"),
        "/status" => Response::builder()
            .status(u16::try_from(query_u64(&req, "code")).unwrap_or(500))
            .body(body::full(name))
            .expect("response"),
        _ => Response::new(body::full(name)),
    };
    Ok(resp)
}

async fn backend() -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (c, s) = (Arc::clone(&conns), Arc::clone(&seen));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let svc = service_fn(move |req| backend_route(addr, Arc::clone(&s), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    Backend {
        addr,
        conns,
        seen,
        task,
    }
}

/// An address nobody listens on.
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

// ---------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------

fn cfg() -> ServiceConfig {
    serde_json::from_str(r#"{"name": "t", "vip": "127.0.0.1:0", "mode": "l7"}"#).expect("cfg")
}

/// A fresh directory, removed when dropped.
fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary directory")
}

async fn start(cfg: &ServiceConfig, backends: &[SocketAddr]) -> L7Service {
    start_with(cfg, backends, HttpStats::new()).await
}

async fn start_with(cfg: &ServiceConfig, backends: &[SocketAddr], stats: HttpStats) -> L7Service {
    // The state directory is read only at start (the sticky key).
    let svc = L7Service::start(cfg, temp_dir().path(), stats)
        .await
        .expect("start");
    let serving: Vec<(SocketAddr, u32)> = backends.iter().map(|a| (*a, 100)).collect();
    svc.update_backends(&serving);
    svc
}

// ---------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn h1(addr: SocketAddr) -> H1 {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    send
}

fn get_req(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "web.example")
        .body(Full::default())
        .expect("request")
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

async fn send(conn: &mut H1, req: Request<Full<Bytes>>) -> Got {
    conn.ready().await.expect("ready");
    let resp = tokio::time::timeout(LONG, conn.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(addr: SocketAddr, path: &str) -> Got {
    send(&mut h1(addr).await, get_req(path)).await
}

/// Write `request`, read until the proxy closes (requests say `Connection: close`).
async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(LONG, s.read_to_end(&mut out))
        .await
        .expect("closed in time");
    String::from_utf8_lossy(&out).into_owned()
}

/// Read one response with a `Content-Length` body from `s`.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(LONG, s.read(&mut chunk))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed mid-response: {text}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_on_both_sides() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let mut conn = h1(svc.local_addr()).await;
    for _ in 0..5 {
        let got = send(&mut conn, get_req("/")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body, b.addr.to_string());
    }
    // Five requests on one client connection, and one pooled backend connection.
    assert_eq!(b.hits(), 5);
    assert_eq!(b.conns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_and_response_bodies() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let out = raw(
        svc.local_addr(),
        b"POST /echo-stream HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let lower = out.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked"), "{out}");
    let body = out.split_once("\r\n\r\n").expect("head").1;
    let decoded: String = body
        .split("\r\n")
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s)
        .collect();
    assert_eq!(decoded, "hello world", "{body:?}");
    // The backend got a chunked body too (no length known in advance).
    assert_eq!(b.last()["transfer-encoding"], "chunked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_stream_without_buffering() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let mut conn = h1(svc.local_addr()).await;
    let t0 = Instant::now();
    let resp = conn
        .send_request(get_req("/stream"))
        .await
        .expect("response");
    let mut body = resp.into_body();
    let first = body
        .frame()
        .await
        .expect("a frame")
        .expect("ok")
        .into_data()
        .expect("data");
    let first_at = t0.elapsed();
    assert_eq!(first, "first;");
    let rest = body.collect().await.expect("rest").to_bytes();
    let total = t0.elapsed();
    assert_eq!(rest, "second");
    assert!(
        first_at < Duration::from_millis(1000),
        "first bytes after {first_at:?}"
    );
    assert!(total >= Duration::from_millis(1400), "done after {total:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let mut s = TcpStream::connect(svc.local_addr()).await.expect("connect");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-key: k\r\n\r\n",
    )
    .await
    .expect("write");
    let head = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    let seen = b.last();
    assert_eq!(seen["upgrade"], "websocket");
    assert_eq!(seen["connection"], "upgrade");
    assert_eq!(seen["sec-websocket-key"], "k");
    for msg in [&b"ping"[..], b"second message", &[0u8, 255, 1, 2][..]] {
        s.write_all(msg).await.expect("write");
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(LONG, s.read_exact(&mut got))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(got, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let stream = TcpStream::connect(svc.local_addr()).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = Request::get("http://h2.example/headers")
            .body(Full::<Bytes>::default())
            .expect("req");
        let resp = send.send_request(req).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.headers()["via"], format!("1.1 {}", via_name()));
        assert!(!resp.headers().contains_key("x-drop"));
    }
    let seen = b.last();
    assert_eq!(seen["host"], "h2.example");
    assert_eq!(seen["via"], format!("2 {}", via_name()));
    assert_eq!(b.conns.load(Ordering::SeqCst), 1);
}

/// A self-signed certificate for localhost and its key, in files of a directory that
/// lives as long as the first value.
fn tls_files() -> (
    tempfile::TempDir,
    TlsConfig,
    rustls_pki_types::CertificateDer<'static>,
) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let d = temp_dir();
    let tls = TlsConfig {
        cert: d.path().join("cert.pem"),
        key: d.path().join("key.pem"),
    };
    std::fs::write(&tls.cert, ck.cert.pem()).expect("write");
    std::fs::write(&tls.key, ck.key_pair.serialize_pem()).expect("write");
    (d, tls, ck.cert.der().clone())
}

async fn tls_connect(
    addr: SocketAddr,
    cert: &rustls_pki_types::CertificateDer<'static>,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    connector
        .connect(name, stream)
        .await
        .expect("TLS handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_alpn_h2_and_http1() {
    let b = backend().await;
    let (_dir, tls, cert) = tls_files();
    let mut c = cfg();
    c.tls = Some(tls);
    c.sticky = Some(StickyConfig {
        cookie: "S".to_owned(),
        ttl_s: 60,
    });
    let svc = start(&c, &[b.addr]).await;

    let io = tls_connect(svc.local_addr(), &cert, b"h2").await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .expect("h2");
    tokio::spawn(conn);
    let req = Request::get("https://secure.example/")
        .body(Full::<Bytes>::default())
        .expect("req");
    let resp = h2.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let seen = b.last();
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["host"], "secure.example");

    let io = tls_connect(svc.local_addr(), &cert, b"http/1.1").await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let got = send(&mut sender, get_req("/")).await;
    assert_eq!(got.status, StatusCode::OK);
    let cookie = got.headers["set-cookie"].to_str().expect("ascii");
    assert!(cookie.contains("Secure"), "{cookie}");
    assert_eq!(b.last()["x-forwarded-proto"], "https");
    assert_eq!(b.last()["via"], format!("1.1 {}", via_name()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_removed_and_forwarding_fields_added() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let req = Request::get("/headers?x=1")
        .header("host", "web.example")
        .header("connection", "x-custom, keep-alive")
        .header("x-custom", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic eA==")
        .header("te", "trailers")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-forwarded-proto", "https")
        .header("via", "1.0 other")
        .header("x-end", "kept")
        .body(Full::default())
        .expect("req");
    let got = send(&mut h1(svc.local_addr()).await, req).await;
    assert_eq!(got.status, StatusCode::OK);
    let seen = b.last();
    for gone in ["x-custom", "keep-alive", "proxy-authorization", "te"] {
        assert!(
            !seen.contains_key(gone),
            "{gone} reached the backend: {seen:?}"
        );
    }
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "web.example");
    assert_eq!(seen["via"], format!("1.0 other, 1.1 {}", via_name()));
    assert_eq!(seen["host"], "web.example");
    assert_eq!(seen["x-end"], "kept");
    // Response side.
    for gone in ["x-drop", "keep-alive", "proxy-authenticate"] {
        assert!(!got.headers.contains_key(gone), "{gone} reached the client");
    }
    assert_eq!(got.headers["x-kept"], "1");
    assert_eq!(got.headers["via"], format!("1.1 {}", via_name()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_splits_between_two_backends() {
    let (b1, b2) = (backend().await, backend().await);
    let svc = start(&cfg(), &[b1.addr, b2.addr]).await;
    let mut conn = h1(svc.local_addr()).await;
    for _ in 0..10 {
        assert_eq!(send(&mut conn, get_req("/")).await.status, StatusCode::OK);
    }
    assert_eq!((b1.hits(), b2.hits()), (5, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_past_a_dead_backend() {
    let b = backend().await;
    let dead = dead_addr().await;
    let stats = HttpStats::new();
    let svc = start_with(&cfg(), &[b.addr, dead], stats.clone()).await;
    let mut conn = h1(svc.local_addr()).await;
    for _ in 0..6 {
        let got = send(&mut conn, get_req("/")).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body, b.addr.to_string());
    }
    assert_eq!(b.hits(), 6);
    // A POST with a body is not retried: it fails when it lands on the dead backend.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let req = Request::post("/echo")
            .header("host", "x")
            .body(Full::new(Bytes::from_static(b"payload")))
            .expect("req");
        let got = send(&mut h1(svc.local_addr()).await, req).await;
        if got.status == StatusCode::OK {
            assert_eq!(got.body, "payload");
        }
        statuses.push(got.status.as_u16());
    }
    assert!(
        statuses.iter().all(|s| [200, 502].contains(s)),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
    let failed = statuses.iter().filter(|s| **s == 502).count() as u64;
    assert_eq!(stats.requests("t", "", 502), failed);
}

/// A backend that accepts, reads the request and closes without answering.
async fn resetting_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&conns);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            drop(stream);
        }
    });
    (addr, conns)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_response_is_retried_elsewhere() {
    let b = backend().await;
    let (resetter, resets) = resetting_backend().await;
    let mut c = cfg();
    c.http.eject_after = 0;
    let svc = start(&c, &[b.addr, resetter]).await;
    for _ in 0..4 {
        let got = get(svc.local_addr(), "/").await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body, b.addr.to_string());
    }
    assert!(resets.load(Ordering::SeqCst) >= 1, "the resetter was tried");
    // With retries off, a GET that lands on it fails with 502.
    c.http.retries = 0;
    let svc = start(&c, &[resetter]).await;
    let got = get(svc.local_addr(), "/").await;
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_backend_is_503_naming_the_service() {
    let svc = start(&cfg(), &[]).await;
    let got = get(svc.local_addr(), "/").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    let text = String::from_utf8_lossy(&got.body);
    assert!(text.contains("\"t\""), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_is_504() {
    let b = backend().await;
    let mut c = cfg();
    c.http.response_timeout_ms = 300;
    let svc = start(&c, &[b.addr]).await;
    let t0 = Instant::now();
    let got = get(svc.local_addr(), "/slow?ms=3000").await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        t0.elapsed() < Duration::from_millis(2000),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(b.hits(), 1, "a timed-out request is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_too_large_is_413() {
    let b = backend().await;
    let mut c = cfg();
    c.http.max_body_bytes = 1000;
    let svc = start(&c, &[b.addr]).await;
    // Declared length: refused before any byte of the body, without a backend.
    let out = raw(
        svc.local_addr(),
        b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2000\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert_eq!(b.hits(), 0);
    // Chunked: cut when it passes the limit.
    let chunk = format!("320\r\n{}\r\n", "a".repeat(800));
    let req = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{chunk}{chunk}0\r\n\r\n"
    );
    let out = raw(svc.local_addr(), req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    // Within the limit, fine.
    let req = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{chunk}0\r\n\r\n"
    );
    let out = raw(svc.local_addr(), req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits_are_431() {
    let b = backend().await;
    let mut c = cfg();
    c.http.max_headers = 20;
    c.http.max_header_bytes = 2048;
    let svc = start(&c, &[b.addr]).await;
    // Too many fields: hyper's parser refuses the head.
    let mut req = String::from("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for i in 0..30 {
        req.push_str(&format!("x-h{i}: v\r\n"));
    }
    req.push_str("\r\n");
    let out = raw(svc.local_addr(), req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    // Over max_header_bytes but within hyper's 8 KiB buffer: the proxy's check.
    let req = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: {}\r\n\r\n",
        "b".repeat(3000)
    );
    let out = raw(svc.local_addr(), req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert!(out.contains("2048 bytes"), "{out}");
    // Past hyper's buffer: hyper's 431.
    let req = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: {}\r\n\r\n",
        "b".repeat(20_000)
    );
    let out = raw(svc.local_addr(), req.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_gets_408_at_the_header_timeout() {
    let b = backend().await;
    let mut c = cfg();
    c.http.header_timeout_ms = 500;
    let svc = start(&c, &[b.addr]).await;
    let mut s = TcpStream::connect(svc.local_addr()).await.expect("connect");
    let t0 = Instant::now();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Still trickling: does not extend the deadline.
    s.write_all(b"x-b: 2\r\n").await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(LONG, s.read_to_end(&mut out))
        .await
        .expect("closed in time")
        .expect("read");
    let took = t0.elapsed();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2000),
        "{took:?}"
    );
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed_silently() {
    let b = backend().await;
    let mut c = cfg();
    c.http.idle_timeout_ms = 600;
    c.http.header_timeout_ms = 5000;
    let svc = start(&c, &[b.addr]).await;
    let mut s = TcpStream::connect(svc.local_addr()).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let head = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let t0 = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(LONG, s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");
    let took = t0.elapsed();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(3000),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_and_refuses_new() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let addr = svc.local_addr();
    let slow = tokio::spawn(async move { get(addr, "/slow?ms=1000").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let shut = tokio::spawn(svc.shutdown(Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    let got = slow.await.expect("join");
    assert_eq!(got.status, StatusCode::OK);
    shut.await.expect("join");
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(2500), "shutdown took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_bounds_shutdown() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let addr = svc.local_addr();
    let slow = tokio::spawn(async move {
        let mut conn = h1(addr).await;
        conn.send_request(get_req("/slow?ms=5000")).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    svc.shutdown(Duration::from_millis(300)).await;
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1500), "shutdown took {took:?}");
    assert!(
        slow.await.expect("join").is_err(),
        "cut by the end of the grace period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move() {
    let b = backend().await;
    let stats = HttpStats::new();
    let svc = start_with(&cfg(), &[b.addr], stats.clone()).await;
    for _ in 0..3 {
        assert_eq!(get(svc.local_addr(), "/").await.status, StatusCode::OK);
    }
    assert_eq!(
        get(svc.local_addr(), "/status?code=503").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let backend = b.addr.to_string();
    assert_eq!(stats.requests("t", &backend, 200), 3);
    assert_eq!(stats.requests("t", &backend, 503), 1);
    assert_eq!(stats.service_totals("t").requests, 4);
    let mut registry = prometheus_client::registry::Registry::with_prefix("xdplb");
    stats.register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains("xdplb_http_request_seconds_count{service=\"t\"} 4"),
        "{text}"
    );
}

/// A `MakeWriter` into a shared buffer (also used by `proxy`'s unit tests).
#[derive(Clone, Default)]
pub(super) struct Captured(pub(super) Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn access_log_has_one_line_per_request() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_thread_names(true)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    // Other tests hit the access-log callsite concurrently with no subscriber of
    // their own; make sure the interest cached for it counts this thread's.
    tracing::callsite::rebuild_interest_cache();
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    assert_eq!(
        get(svc.local_addr(), "/hello?q=secret").await.status,
        StatusCode::OK
    );
    let none = start(&cfg(), &[]).await;
    assert_eq!(
        get(none.local_addr(), "/x").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let text = String::from_utf8_lossy(&captured.0.lock().expect("lock")).into_owned();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("xdplb::access"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let ok = lines[0];
    for needle in [
        "service=t",
        "client=127.0.0.1",
        "method=GET",
        "path=/hello",
        "status=200",
        &format!("backend={}", b.addr),
        "bytes=",
        "duration_ms=",
    ] {
        assert!(ok.contains(needle), "{needle} missing: {ok}");
    }
    assert!(
        !ok.contains("secret"),
        "the query string is not logged: {ok}"
    );
    assert!(lines[1].contains("status=503"), "{}", lines[1]);
    // Served on an L7 worker thread (thread-per-core), logged to this test's subscriber.
    for l in &lines {
        assert!(l.contains("xdplb-l7-"), "not on an L7 worker: {l}");
    }
}

/// Thread-per-core: connections kept open are spread over the L7 workers (each new one
/// goes to the least loaded), and each connection's requests stay on its worker.
#[tokio::test(flavor = "current_thread")]
async fn connections_spread_over_the_l7_workers_and_stay_on_theirs() {
    let workers = crate::l7::workers::get().len();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_thread_names(true)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    // Other tests of this binary hold a few connections on the workers meanwhile: enough
    // connections that every worker gets some whatever they hold.
    let n = 16 * workers;
    let mut conns = Vec::new();
    for i in 0..n {
        let mut c = h1(svc.local_addr()).await;
        let got = send(&mut c, get_req(&format!("/c{i}/first"))).await;
        assert_eq!(got.status, StatusCode::OK);
        conns.push(c);
    }
    for (i, c) in conns.iter_mut().enumerate() {
        let got = send(c, get_req(&format!("/c{i}/second"))).await;
        assert_eq!(got.status, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let text = String::from_utf8_lossy(&captured.0.lock().expect("lock")).into_owned();
    // The worker thread of each request, by path.
    let thread_of = |path: &str| -> String {
        let line = text
            .lines()
            .find(|l| l.contains("xdplb::access") && l.contains(&format!("path={path} ")))
            .unwrap_or_else(|| panic!("no access line for {path} in\n{text}"));
        let at = line.find("xdplb-l7-").expect("served on an L7 worker");
        line[at..]
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_owned()
    };
    let mut used = std::collections::BTreeSet::new();
    for i in 0..n {
        let first = thread_of(&format!("/c{i}/first"));
        assert_eq!(
            first,
            thread_of(&format!("/c{i}/second")),
            "connection {i} moved"
        );
        used.insert(first);
    }
    assert_eq!(used.len(), workers, "{used:?}");
    drop(conns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cookie_pins_and_moves_when_the_backend_goes() {
    let (b1, b2) = (backend().await, backend().await);
    let mut c = cfg();
    c.sticky = Some(StickyConfig {
        cookie: "LBSTICKY".to_owned(),
        ttl_s: 60,
    });
    let svc = start(&c, &[b1.addr, b2.addr]).await;
    let addr = svc.local_addr();
    let first = get(addr, "/").await;
    let set = first.headers["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(set.starts_with("LBSTICKY="), "{set}");
    assert!(!set.contains("Secure"), "no Secure without TLS: {set}");
    let cookie = set.split(';').next().expect("pair").to_owned();
    let pinned = first.body.clone();
    let with_cookie = |cookie: String| {
        Request::get("/")
            .header("host", "x")
            .header("cookie", format!("other=1; {cookie}"))
            .body(Full::<Bytes>::default())
            .expect("req")
    };
    let mut conn = h1(addr).await;
    for _ in 0..6 {
        let got = send(&mut conn, with_cookie(cookie.clone())).await;
        assert_eq!(got.body, pinned, "pinned");
        assert!(!got.headers.contains_key("set-cookie"));
    }
    // The pinned backend leaves the serving set: the request goes to the other one,
    // with a new cookie.
    let (gone, other) = if pinned == b1.addr.to_string() {
        (b1.addr, b2.addr)
    } else {
        (b2.addr, b1.addr)
    };
    svc.update_backends(&[(other, 100)]);
    let got = send(&mut conn, with_cookie(cookie.clone())).await;
    assert_eq!(got.body, other.to_string());
    let new = got.headers["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_ne!(new.split(';').next(), Some(cookie.as_str()));
    assert_ne!(gone, other);
    // A forged cookie is ignored and replaced.
    let got = send(&mut conn, with_cookie("LBSTICKY=forged".to_owned())).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.headers.contains_key("set-cookie"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_response_is_served_as_a_hit() {
    let b = backend().await;
    let mut c = cfg();
    c.cache = Some(CacheConfig {
        max_bytes: 1 << 20,
        max_object_bytes: 1 << 16,
        targets: crate::config::default_cache_targets(),
        stale_if_unreachable_s: 0,
    });
    let stats = HttpStats::new();
    let svc = start_with(&c, &[b.addr], stats.clone()).await;
    let first = get(svc.local_addr(), "/cached").await;
    assert_eq!(first.status, StatusCode::OK);
    let cs = |g: &Got| {
        g.headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    assert!(cs(&first).contains("fwd="), "{}", cs(&first));
    // Responses served from the store without a fetch of their own: hits, and a request
    // that came while the first response was still being stored (it waits for that
    // store and is served from it, `collapsed`).
    let from_store = |g: &Got| cs(g).contains("hit") || cs(g).contains("collapsed");
    let mut second = get(svc.local_addr(), "/cached").await;
    let mut served_from_store = usize::from(from_store(&second));
    for _ in 0..20 {
        // The store may take the entry in a moment after the first body ends.
        if cs(&second).contains("hit") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        second = get(svc.local_addr(), "/cached").await;
        served_from_store += usize::from(from_store(&second));
    }
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body, b.addr.to_string());
    assert!(cs(&second).contains("hit"), "{}", cs(&second));
    assert_eq!(stats.cache_requests("t", "hit"), 1);
    assert!(stats.service_totals("t").cache_hits >= 1);
    // Hits (and collapsed requests) are counted without a backend.
    assert_eq!(stats.requests("t", "", 200), served_from_store as u64);
    // Purge: the next request goes to the backend again.
    assert_eq!(svc.purge_cache(None, false), Some(1));
    let hits = b.hits();
    let third = get(svc.local_addr(), "/cached").await;
    assert!(!cs(&third).contains("hit"), "{}", cs(&third));
    assert_eq!(b.hits(), hits + 1);
    // A service without a cache has nothing to purge.
    let plain = start(&cfg(), &[b.addr]).await;
    assert_eq!(plain.purge_cache(None, false), None);
}

/// A hit answered before the upstream request is built (`proxy::fresh_hit`) is one the
/// cache would answer after it: a response that varies on a field the proxy rewrites
/// (`X-Forwarded-For`) is matched against the request as the proxy forwards it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_match_the_request_as_forwarded() {
    let b = backend().await;
    let mut c = cfg();
    c.cache = Some(CacheConfig {
        max_bytes: 1 << 20,
        max_object_bytes: 1 << 16,
        targets: crate::config::default_cache_targets(),
        stale_if_unreachable_s: 0,
    });
    let svc = start(&c, &[b.addr]).await;
    let mut conn = h1(svc.local_addr()).await;
    let with_xff = |xff: &str| {
        Request::get("/cached-xff")
            .header("host", "web.example")
            .header("x-forwarded-for", xff)
            .body(Full::default())
            .expect("request")
    };
    let cs = |g: &Got| {
        g.headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    // Stored for the request as forwarded: `X-Forwarded-For: 198.18.0.9, 127.0.0.1`.
    let mut got = send(&mut conn, with_xff("198.18.0.9")).await;
    for _ in 0..40 {
        if cs(&got).contains("hit") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        got = send(&mut conn, with_xff("198.18.0.9")).await;
    }
    assert!(cs(&got).contains("; hit"), "{}", cs(&got));
    let hits = b.hits();
    // The client's field equals the stored value, but the request as forwarded has one
    // entry more: another variant, fetched.
    let other = send(&mut conn, with_xff("198.18.0.9, 127.0.0.1")).await;
    assert_eq!(other.status, StatusCode::OK);
    assert!(cs(&other).contains("fwd=vary-miss"), "{}", cs(&other));
    assert_eq!(b.hits(), hits + 1);
    // And plain hits still come from the store.
    let again = send(&mut conn, with_xff("198.18.0.9")).await;
    assert!(cs(&again).contains("; hit"), "{}", cs(&again));
    assert_eq!(b.hits(), hits + 1);
}

/// Not a test: prints sequential keep-alive latency direct and through the proxy
/// (`cargo test --release -p lb-agent l7::tests::measure -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not a test: speed is measured, not asserted"]
async fn measure_keep_alive_latency() {
    const N: u32 = 5000;
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    for (what, addr) in [("direct", b.addr), ("proxied", svc.local_addr())] {
        let mut conn = h1(addr).await;
        for _ in 0..200 {
            send(&mut conn, get_req("/")).await;
        }
        let t0 = Instant::now();
        for _ in 0..N {
            send(&mut conn, get_req("/")).await;
        }
        let per = t0.elapsed() / N;
        println!("{what}: {N} sequential GETs on one connection, {per:?} per request");
    }
    for conns in [1usize, 8, 32] {
        let addr = svc.local_addr();
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..conns)
            .map(|_| {
                tokio::spawn(async move {
                    let mut conn = h1(addr).await;
                    for _ in 0..(20_000 / conns) {
                        send(&mut conn, get_req("/")).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("join");
        }
        let rps = 20_000.0 / t0.elapsed().as_secs_f64();
        println!("proxied: {conns} connections, {rps:.0} requests/s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_errors_name_the_service_and_what_failed() {
    let first = start(&cfg(), &[]).await;
    let mut c = cfg();
    c.vip = first.local_addr();
    let e = L7Service::start(&c, temp_dir().path(), HttpStats::new())
        .await
        .expect_err("port in use")
        .to_string();
    assert!(
        e.contains("service \"t\"") && e.contains(&first.local_addr().to_string()),
        "{e}"
    );
    let mut c = cfg();
    c.tls = Some(TlsConfig {
        cert: "/nonexistent/cert.pem".into(),
        key: "/nonexistent/key.pem".into(),
    });
    let e = L7Service::start(&c, temp_dir().path(), HttpStats::new())
        .await
        .expect_err("no cert")
        .to_string();
    assert!(
        e.contains("service \"t\"") && e.contains("/nonexistent/cert.pem"),
        "{e}"
    );
    let mut c = cfg();
    c.mode = crate::config::Mode::L4;
    let e = L7Service::start(&c, temp_dir().path(), HttpStats::new())
        .await
        .expect_err("l4")
        .to_string();
    assert!(e.contains("not an l7 service"), "{e}");
}

// ---------------------------------------------------------------------------
// Bad input (issue 9)
// ---------------------------------------------------------------------------

/// The body of a response read by [`raw`].
fn raw_body(out: &str) -> &str {
    out.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_loops_back_gets_508_and_is_not_forwarded_again() {
    // A service whose backend is its own VIP (config and API refuse this; a loop
    // through another host cannot be refused there): one hop, then 508.
    let svc = start(&cfg(), &[]).await;
    svc.update_backends(&[(svc.local_addr(), 100)]);
    let got = get(svc.local_addr(), "/").await;
    assert_eq!(got.status, StatusCode::LOOP_DETECTED);
    let text = String::from_utf8_lossy(&got.body);
    assert!(text.starts_with("508 request loop"), "{text}");
    assert!(
        text.contains(via_name()) && text.contains("service \"t\""),
        "{text}"
    );
    // The 508 (ours, without Via) came back through the first hop.
    assert_eq!(got.headers["via"], format!("1.1 {}", via_name()));
    let served: u64 = svc
        .pool_snapshot()
        .iter()
        .map(|b| u64::from(b.in_flight))
        .sum();
    assert_eq!(served, 0);

    // A request that says it went through us already is answered at once.
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let req = Request::get("/")
        .header("host", "web.example")
        .header("via", format!("1.1 other, 1.1 {}", via_name()))
        .body(Full::default())
        .expect("req");
    let got = send(&mut h1(svc.local_addr()).await, req).await;
    assert_eq!(got.status, StatusCode::LOOP_DETECTED);
    assert_eq!(b.hits(), 0);
    // Another proxy's Via is fine.
    let req = Request::get("/")
        .header("host", "web.example")
        .header("via", "1.1 xdplb-00000000x")
        .body(Full::default())
        .expect("req");
    let got = send(&mut h1(svc.local_addr()).await, req).await;
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_bodies_are_400_and_eject_no_backend() {
    let (b1, b2) = (backend().await, backend().await);
    let mut c = cfg();
    c.http.eject_after = 3;
    let svc = start(&c, &[b1.addr, b2.addr]).await;
    let ext = format!("1;{}\r\na\r\n0\r\n\r\n", "e".repeat(100_000));
    let bad: [&str; 4] = [
        "zz\r\nabc\r\n0\r\n\r\n",
        "fffffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        "-1\r\na\r\n0\r\n\r\n",
        &ext,
    ];
    let mut normal = h1(svc.local_addr()).await;
    for round in 0..4 {
        for body in bad {
            // A first valid chunk, so the request is on its way to a backend when
            // the bad one arrives.
            let req = format!(
                "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n{body}"
            );
            let out = raw(svc.local_addr(), req.as_bytes()).await;
            assert!(out.starts_with("HTTP/1.1 400"), "round {round}: {out}");
            assert!(
                raw_body(&out).starts_with("400 bad request: request body"),
                "{out}"
            );
            let got = send(&mut normal, get_req("/")).await;
            assert_eq!(got.status, StatusCode::OK, "a normal client is served");
        }
    }
    for b in svc.pool_snapshot() {
        assert!(!b.ejected, "{b:?}");
        assert_eq!(b.consecutive_failures, 0, "{b:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_gets_its_response() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let mut s = TcpStream::connect(svc.local_addr()).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    s.shutdown().await.expect("shutdown write side");
    let mut out = Vec::new();
    tokio::time::timeout(LONG, s.read_to_end(&mut out))
        .await
        .expect("in time")
        .expect("read");
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with(&b.addr.to_string()), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_transfer_encoding_follow_rfc_9112() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let addr = svc.local_addr();
    for (req, want, text) in [
        (
            "GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\nconnection: close\r\n\r\n",
            "400",
            "400 bad request: more than one Host field (service \"t\")\n",
        ),
        (
            "GET / HTTP/1.1\r\nconnection: close\r\n\r\n",
            "400",
            "400 bad request: HTTP/1.1 request without Host (service \"t\")\n",
        ),
        (
            "GET / HTTP/1.1\r\nhost: a b\r\nconnection: close\r\n\r\n",
            "400",
            "400 bad request: Host is not a valid host[:port] (service \"t\")\n",
        ),
        (
            "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "400",
            "400 bad request: Transfer-Encoding names chunked more than once (service \"t\")\n",
        ),
        (
            "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "400",
            "400 bad request: Transfer-Encoding names chunked more than once (service \"t\")\n",
        ),
        (
            "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            "501",
            "501 transfer coding not implemented: gzip (service \"t\")\n",
        ),
    ] {
        let out = raw(addr, req.as_bytes()).await;
        assert!(out.starts_with(&format!("HTTP/1.1 {want}")), "{req}: {out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("content-type: text/plain; charset=utf-8"),
            "{out}"
        );
        assert_eq!(raw_body(&out), text, "{req}");
    }
    assert_eq!(b.hits(), 0, "none of these reached the backend");
    // Still served: HTTP/1.0 without Host, one chunked coding, an empty Host.
    for req in [
        "GET / HTTP/1.0\r\n\r\n",
        "GET / HTTP/1.1\r\nhost:\r\nconnection: close\r\n\r\n",
        "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ] {
        let out = raw(addr, req.as_bytes()).await;
        assert!(
            out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200"),
            "{req}: {out}"
        );
    }
    assert_eq!(b.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_not_forwarded() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let out = raw(
        svc.local_addr(),
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings, close\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    // An ordinary request, as the backend saw it.
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let seen = b.last();
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert!(
            !seen.contains_key(gone),
            "{gone} reached the backend: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hypers_own_parse_errors_have_the_proxys_error_shape() {
    let b = backend().await;
    let mut c = cfg();
    c.http.max_header_bytes = 100_000;
    c.http.max_headers = 20;
    let svc = start(&c, &[b.addr]).await;
    let addr = svc.local_addr();
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        "u".repeat(70_000)
    );
    let mut many = String::from("GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    for i in 0..30 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    for (req, status, text) in [
        (
            long_uri,
            "414",
            "414 request target too long (service \"t\")\n".to_owned(),
        ),
        (
            many,
            "431",
            "431 request header larger than 20 fields or 100000 bytes (service \"t\")\n".to_owned(),
        ),
        (
            "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1x\r\n\r\nabc".to_owned(),
            "400",
            "400 bad request: malformed request head (service \"t\")\n".to_owned(),
        ),
        (
            "GET / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"
                .to_owned(),
            "400",
            "400 bad request: malformed request head (service \"t\")\n".to_owned(),
        ),
    ] {
        let out = raw(addr, req.as_bytes()).await;
        let head = out
            .split_once("\r\n\r\n")
            .map_or("", |(h, _)| h)
            .to_ascii_lowercase();
        assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
        assert!(
            head.contains("content-type: text/plain; charset=utf-8"),
            "{out}"
        );
        assert!(
            head.contains(&format!("content-length: {}", text.len())),
            "{out}"
        );
        assert_eq!(raw_body(&out), text);
    }
    assert_eq!(b.hits(), 0);
    // The proxy keeps serving.
    assert_eq!(get(addr, "/").await.status, StatusCode::OK);
}

/// New settings on the same socket (what the manager does for a settings change):
/// connections made during the swap are all served, a request in flight on the old
/// settings finishes, a kept-alive connection gets `Connection: close` on its next
/// response (not a reset), new connections get the new settings, and the cache stays
/// when its settings did not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_settings_take_over_the_socket_and_old_connections_drain() {
    let b = backend().await;
    let mut c = cfg();
    c.cache = Some(CacheConfig {
        max_bytes: 1 << 20,
        max_object_bytes: 1 << 16,
        targets: crate::config::default_cache_targets(),
        stale_if_unreachable_s: 0,
    });
    let serving = [(b.addr, 100)];
    let state = temp_dir();
    let old = L7Service::start_on(&c, state.path(), HttpStats::new(), None, &serving)
        .await
        .expect("start");
    let addr = old.local_addr();
    // A cached page, a kept-alive connection and a slow request on the old settings.
    assert_eq!(get(addr, "/cached").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut kept = h1(addr).await;
    let first = send(&mut kept, get_req("/")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.headers.contains_key("connection"));
    let slow = tokio::spawn(async move { get(addr, "/slow?ms=800").await });
    // Clients connecting all through the swap.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let clients = tokio::spawn(async move {
        let (mut ok, mut refused) = (0, 0);
        while !s.load(Ordering::SeqCst) {
            match TcpStream::connect(addr).await {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (ok, refused)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut next = c.clone();
    next.scheduler = crate::config::Scheduler::LeastRequest;
    next.sticky = Some(StickyConfig {
        cookie: "NEWSTICKY".to_owned(),
        ttl_s: 60,
    });
    let new = old
        .successor(&next, state.path(), HttpStats::new(), &serving)
        .expect("successor");
    assert_eq!(new.local_addr(), addr);
    let draining = tokio::spawn(old.shutdown(Duration::from_secs(5)));

    // New connections: the new settings (the sticky cookie), the same cache.
    let fresh = get(addr, "/").await;
    assert_eq!(fresh.status, StatusCode::OK);
    let cookie = fresh
        .headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(cookie.starts_with("NEWSTICKY="), "{cookie}");
    let hit = get(addr, "/cached").await;
    let cs = hit
        .headers
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(cs.contains("hit"), "the cache was not kept: {cs}");
    // The kept-alive connection of the old settings: answered, then told to close.
    let last = send(&mut kept, get_req("/")).await;
    assert_eq!(last.status, StatusCode::OK);
    assert_eq!(
        last.headers.get("connection").and_then(|v| v.to_str().ok()),
        Some("close")
    );
    assert!(!last.headers.contains_key("set-cookie"), "old settings");
    // The slow request finishes, and the old service is gone soon after.
    assert_eq!(slow.await.expect("join").status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(3), draining)
        .await
        .expect("the old service drained in time")
        .expect("join");
    stop.store(true, Ordering::SeqCst);
    let (ok, refused) = clients.await.expect("join");
    assert!(ok > 10, "{ok} connections");
    assert_eq!(refused, 0, "connections refused during the swap");
    // The socket still serves (the successor holds it).
    assert_eq!(get(addr, "/").await.status, StatusCode::OK);
    new.shutdown(Duration::from_secs(1)).await;
    assert!(TcpStream::connect(addr).await.is_err(), "closed at the end");
}

/// An HTTP/2 connection of a draining service: its stream in flight finishes (no
/// `Connection` field on h2), then the server's GOAWAY ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_h2_finishes_streams_then_goes_away() {
    let b = backend().await;
    let svc = start(&cfg(), &[b.addr]).await;
    let stream = TcpStream::connect(svc.local_addr()).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = |path: &str| {
        Request::get(format!("http://h2.example{path}"))
            .body(Full::<Bytes>::default())
            .expect("req")
    };
    let warm = send.send_request(req("/")).await.expect("response");
    assert_eq!(warm.status(), StatusCode::OK);
    let slow = send.send_request(req("/slow?ms=500"));
    let slow = tokio::spawn(slow);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    let shut = tokio::spawn(svc.shutdown(Duration::from_secs(5)));
    let resp = slow
        .await
        .expect("join")
        .expect("the stream in flight finishes");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(!resp.headers().contains_key("connection"));
    // GOAWAY: the client's connection ends without an error, well before the grace.
    tokio::time::timeout(Duration::from_secs(3), conn)
        .await
        .expect("the connection ends after GOAWAY")
        .expect("join")
        .expect("a clean end");
    shut.await.expect("join");
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// The HTTP/1.1 backend pool
// ---------------------------------------------------------------------------

/// A GET through `up` to `addr`, its body read to the end.
async fn pool_get(up: &crate::l7::upstream::Upstream, addr: SocketAddr, path: &str) -> Bytes {
    let req = Request::get(path)
        .header("host", "web.example")
        .body(body::empty())
        .expect("request");
    let resp = tokio::time::timeout(LONG, up.send(addr, req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.expect("body").to_bytes()
}

/// A backend on a plain thread: each connection answers `answers` keep-alive
/// requests, then reads the next request's head and closes without an answer (the
/// race of a keep-alive connection the backend closes as a request goes out). Counts
/// connections.
fn closing_backend(answers: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&conns);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            c.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                for n in 0..=answers {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    if n == answers {
                        return; // closed unanswered
                    }
                    if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn the_http1_pool_reuses_expires_and_resends_on_a_stale_connection() {
    use crate::l7::upstream::Upstream;
    let b = backend().await;
    let up = Upstream::new(&cfg())
        .expect("upstream")
        .with_h1_idle_timeout(Duration::from_millis(600));

    // Reuse: one request after another takes the connection the last one gave back.
    for _ in 0..5 {
        assert_eq!(pool_get(&up, b.addr, "/").await, b.addr.to_string());
    }
    assert_eq!(b.conns.load(Ordering::SeqCst), 1, "one connection, reused");
    assert_eq!(up.h1_pool().idle(b.addr), 1);

    // Two at once need two connections; both go back to the idle list (LIFO).
    let (x, y) = tokio::join!(
        pool_get(&up, b.addr, "/slow?ms=50"),
        pool_get(&up, b.addr, "/slow?ms=50")
    );
    assert!(!x.is_empty() && !y.is_empty());
    assert_eq!(b.conns.load(Ordering::SeqCst), 2);
    assert_eq!(up.h1_pool().idle(b.addr), 2);

    // A response dropped before its end: that connection is not reused.
    let req = Request::get("/stream")
        .header("host", "web.example")
        .body(body::empty())
        .expect("request");
    let resp = up.send(b.addr, req).await.expect("response");
    drop(resp);
    assert_eq!(
        up.h1_pool().idle(b.addr),
        1,
        "the cut connection is not given back"
    );

    // Idle past the timeout: closed by the pool (the backend sees them go).
    let deadline = Instant::now() + LONG;
    while up.h1_pool().idle(b.addr) > 0 {
        assert!(Instant::now() < deadline, "idle connections never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = b.conns.load(Ordering::SeqCst);
    pool_get(&up, b.addr, "/").await;
    assert_eq!(
        b.conns.load(Ordering::SeqCst),
        before + 1,
        "a new connection after expiry"
    );

    // A backend that closes each connection unanswered at its second request: an
    // idempotent request is sent again, on a new connection to the same backend (it
    // is the only one: no retry elsewhere could save it), and the backend is not
    // marked down for it; a POST is not sent again.
    let (stale, conns) = closing_backend(1);
    let mut c = cfg();
    c.http.retries = 0;
    let svc = start(&c, &[stale]).await;
    let mut client = h1(svc.local_addr()).await;
    for i in 1..=4 {
        let got = send(&mut client, get_req("/")).await;
        assert_eq!(got.status, StatusCode::OK, "request {i}");
        assert_eq!(got.body, "ok");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 4);
    let post = Request::post("/")
        .header("host", "web.example")
        .body(Full::new(Bytes::from_static(b"x")))
        .expect("request");
    assert_eq!(
        send(&mut client, post).await.status,
        StatusCode::BAD_GATEWAY
    );
}
