//! HTTP/2 to backends (`backend_protocol`, [`super::upstream`]) and gRPC through the
//! proxy: real sockets on 127.0.0.1, a real gRPC server and client (tonic, messages with
//! prost's derive: no protoc), hyper HTTP/2 backends over cleartext and over TLS with
//! ALPN (rustls, rcgen certificates), and `h2`'s server where a test needs a stream
//! refused.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::config::ServiceConfig;
use crate::l7::body::{self, Body};
use crate::l7::service::L7Service;
use crate::l7::stats::HttpStats;

const LONG: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------

/// An l7 service on 127.0.0.1 with these extra keys (JSON).
fn cfg(extra: &str) -> ServiceConfig {
    let sep = if extra.is_empty() { "" } else { ", " };
    serde_json::from_str(&format!(
        r#"{{"name": "t", "vip": "127.0.0.1:0", "mode": "l7"{sep}{extra}}}"#
    ))
    .expect("cfg")
}

async fn start(cfg: &ServiceConfig, backends: &[SocketAddr], stats: HttpStats) -> L7Service {
    let dir = tempfile::tempdir().expect("temporary directory");
    let svc = L7Service::start(cfg, dir.path(), stats)
        .await
        .expect("start");
    let serving: Vec<(SocketAddr, u32)> = backends.iter().map(|a| (*a, 100)).collect();
    svc.update_backends(&serving);
    svc
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

/// A certificate for 127.0.0.1 and its key, with the PEM file of the certificate (the
/// CA the proxy trusts: it signs itself).
struct Cert {
    _dir: tempfile::TempDir,
    pem: std::path::PathBuf,
    acceptor_parts: (Vec<u8>, Vec<u8>),
}

fn new_cert() -> Cert {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("rcgen");
    let pem = dir.path().join("backend.pem");
    std::fs::write(&pem, ck.cert.pem()).expect("write");
    Cert {
        _dir: dir,
        pem,
        acceptor_parts: (ck.cert.der().to_vec(), ck.key_pair.serialize_der()),
    }
}

fn acceptor(cert: &Cert, alpn: &[&[u8]]) -> TlsAcceptor {
    let (c, k) = &cert.acceptor_parts;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut sc = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls_pki_types::CertificateDer::from(c.clone())],
            rustls_pki_types::PrivateKeyDer::Pkcs8(k.clone().into()),
        )
        .expect("server config");
    sc.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsAcceptor::from(Arc::new(sc))
}

// ---------------------------------------------------------------------------
// An HTTP backend that records what it sees (HTTP/1.1 and HTTP/2)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Seen {
    version: Version,
    uri: String,
    headers: HeaderMap,
}

struct HttpBackend {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpBackend {
    fn last(&self) -> Seen {
        self.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("a request")
    }
}

/// `/echo-trailers`: answers with the request body, then trailers `x-got` (the
/// request's trailer `x-t`) and `x-resp: yes`; `/slow`: 300 ms, then its address;
/// anything else: its address.
async fn route(
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    seen.lock().expect("lock").push(Seen {
        version: req.version(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
    });
    Ok(match req.uri().path() {
        "/echo-trailers" => {
            let collected = req.into_body().collect().await.expect("request body");
            let got = collected.trailers().and_then(|t| t.get("x-t")).map_or_else(
                || "none".to_owned(),
                |v| v.to_str().expect("ascii").to_owned(),
            );
            let mut trailers = HeaderMap::new();
            trailers.insert("x-got", got.parse().expect("value"));
            trailers.insert("x-resp", "yes".parse().expect("value"));
            let frames = vec![
                Ok::<_, Infallible>(http_body::Frame::data(collected.to_bytes())),
                Ok(http_body::Frame::trailers(trailers)),
            ];
            // Declared (RFC 9110 §6.6.2): an HTTP/1.1 client gets them only so.
            Response::builder()
                .header("trailer", "x-got, x-resp")
                .body(body::boxed(StreamBody::new(futures_util::stream::iter(
                    frames,
                ))))
                .expect("response")
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Response::new(body::full(addr.to_string()))
        }
        _ => Response::new(body::full(addr.to_string())),
    })
}

/// A backend speaking HTTP/2 only (`h2`), or both by preface / ALPN, with TLS when
/// `tls` is given.
async fn http_backend(tls: Option<TlsAcceptor>, h2_only: bool) -> HttpBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (c, s) = (Arc::clone(&conns), Arc::clone(&seen));
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let s = Arc::clone(&s);
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| route(addr, Arc::clone(&s), req));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let builder = if h2_only {
                    builder.http2_only()
                } else {
                    builder
                };
                match tls {
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(a) => {
                        if let Ok(t) = a.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(t), svc).await;
                        }
                    }
                }
            });
        }
    });
    HttpBackend {
        addr,
        conns,
        seen,
        task,
    }
}

// ---------------------------------------------------------------------------
// gRPC: a tonic server and client without code generation
// ---------------------------------------------------------------------------

#[derive(Clone, PartialEq, prost::Message)]
struct Msg {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint32, tag = "2")]
    n: u32,
}

fn msg(text: &str, n: u32) -> Msg {
    Msg {
        text: text.to_owned(),
        n,
    }
}

type Codec = tonic_prost::ProstCodec<Msg, Msg>;
type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, tonic::Status>> + Send>>;
type Fut<T> = Pin<Box<dyn Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send>>;

/// `/t.T/Unary`: echoes the text, upper-cased, with the `x-who` metadata it got; the text
/// `fail` gets `NOT_FOUND` with a message and trailer metadata `x-why`.
struct Unary;

impl tonic::server::UnaryService<Msg> for Unary {
    type Response = Msg;
    type Future = Fut<Msg>;

    fn call(&mut self, req: tonic::Request<Msg>) -> Self::Future {
        Box::pin(async move {
            let who = req
                .metadata()
                .get("x-who")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let m = req.into_inner();
            if m.text == "fail" {
                let mut md = tonic::metadata::MetadataMap::new();
                md.insert("x-why", "asked-to".parse().expect("metadata"));
                return Err(tonic::Status::with_metadata(
                    tonic::Code::NotFound,
                    "no such thing",
                    md,
                ));
            }
            Ok(tonic::Response::new(msg(
                &format!("{} {who}", m.text.to_uppercase()),
                m.n,
            )))
        })
    }
}

/// `/t.T/Count`: `n` messages, 100 ms apart.
struct Count;

impl tonic::server::ServerStreamingService<Msg> for Count {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = Fut<MsgStream>;

    fn call(&mut self, req: tonic::Request<Msg>) -> Self::Future {
        Box::pin(async move {
            let n = req.into_inner().n;
            let s = futures_util::stream::unfold(0, move |i| async move {
                if i == n {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                Some((Ok(msg("tick", i)), i + 1))
            });
            Ok(tonic::Response::new(Box::pin(s) as MsgStream))
        })
    }
}

/// `/t.T/Chat`: answers each message as it comes (`n + 1000`).
struct Chat;

impl tonic::server::StreamingService<Msg> for Chat {
    type Response = Msg;
    type ResponseStream = MsgStream;
    type Future = Fut<MsgStream>;

    fn call(&mut self, req: tonic::Request<tonic::Streaming<Msg>>) -> Self::Future {
        Box::pin(async move {
            let s = req
                .into_inner()
                .map(|m| m.map(|m| msg(&format!("re:{}", m.text), m.n + 1000)));
            Ok(tonic::Response::new(Box::pin(s) as MsgStream))
        })
    }
}

async fn grpc_route(req: Request<Incoming>) -> Result<Response<tonic::body::Body>, Infallible> {
    let mut grpc = tonic::server::Grpc::new(Codec::default());
    Ok(match req.uri().path() {
        "/t.T/Unary" => grpc.unary(Unary, req).await,
        "/t.T/Count" => grpc.server_streaming(Count, req).await,
        "/t.T/Chat" => grpc.streaming(Chat, req).await,
        _ => tonic::Status::unimplemented("no such method").into_http(),
    })
}

/// A tonic gRPC server (HTTP/2 only; TLS with ALPN `h2` when `tls` is given).
async fn grpc_backend(
    tls: Option<TlsAcceptor>,
) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&conns);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let tls = tls.clone();
            tokio::spawn(async move {
                let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                let svc = service_fn(grpc_route);
                match tls {
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(a) => {
                        if let Ok(t) = a.accept(stream).await {
                            let _ = builder.serve_connection(TokioIo::new(t), svc).await;
                        }
                    }
                }
            });
        }
    });
    (addr, conns, task)
}

type Client = tonic::client::Grpc<tonic::transport::Channel>;

/// A tonic client to the proxy (h2c, prior knowledge).
async fn grpc_client(vip: SocketAddr) -> Client {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{vip}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the proxy");
    tonic::client::Grpc::new(channel)
}

async fn unary(client: &mut Client, text: &str) -> Result<tonic::Response<Msg>, tonic::Status> {
    client.ready().await.expect("ready");
    let mut req = tonic::Request::new(msg(text, 7));
    req.metadata_mut()
        .insert("x-who", "alice".parse().expect("metadata"));
    client
        .unary(
            req,
            http::uri::PathAndQuery::from_static("/t.T/Unary"),
            Codec::default(),
        )
        .await
}

/// Unary, server streaming, bidi streaming and an error status, through `vip`.
async fn grpc_all_kinds(vip: SocketAddr) {
    let mut client = grpc_client(vip).await;

    // Unary, metadata both ways.
    let resp = tokio::time::timeout(LONG, unary(&mut client, "hello"))
        .await
        .expect("in time")
        .expect("unary");
    assert_eq!(resp.get_ref(), &msg("HELLO alice", 7));

    // An error status: grpc-status, grpc-message and metadata from the trailers
    // (a trailers-only response).
    let status = unary(&mut client, "fail").await.expect_err("NOT_FOUND");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "no such thing");
    assert_eq!(status.metadata().get("x-why").expect("x-why"), "asked-to");

    // Server streaming: messages arrive one by one (100 ms apart at the server), not
    // all at the end.
    client.ready().await.expect("ready");
    let resp = client
        .server_streaming(
            tonic::Request::new(msg("go", 5)),
            http::uri::PathAndQuery::from_static("/t.T/Count"),
            Codec::default(),
        )
        .await
        .expect("server streaming");
    let mut stream = resp.into_inner();
    let first = tokio::time::Instant::now();
    let mut got = Vec::new();
    let mut first_at = None;
    while let Some(m) = tokio::time::timeout(LONG, stream.message())
        .await
        .expect("in time")
        .expect("message")
    {
        first_at.get_or_insert_with(|| first.elapsed());
        got.push(m.n);
    }
    assert_eq!(got, [0, 1, 2, 3, 4]);
    let total = first.elapsed();
    let first_at = first_at.expect("a message");
    assert!(
        first_at + Duration::from_millis(250) < total,
        "the first message came at {first_at:?}, the stream ended at {total:?}: buffered"
    );

    // Bidi: each answer comes before the next request is sent (nothing buffered
    // either way), then the stream ends with OK.
    client.ready().await.expect("ready");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Msg>(1);
    let outbound = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    tx.send(msg("a", 1)).await.expect("send");
    let resp = client
        .streaming(
            tonic::Request::new(outbound),
            http::uri::PathAndQuery::from_static("/t.T/Chat"),
            Codec::default(),
        )
        .await
        .expect("bidi");
    let mut inbound = resp.into_inner();
    for (i, text) in ["a", "b", "c"].iter().enumerate() {
        if i > 0 {
            tx.send(msg(text, u32::try_from(i).expect("small") + 1))
                .await
                .expect("send");
        }
        let m = tokio::time::timeout(LONG, inbound.message())
            .await
            .expect("an answer before the next request")
            .expect("message")
            .expect("not the end");
        assert_eq!(
            m,
            msg(
                &format!("re:{text}"),
                1001 + u32::try_from(i).expect("small")
            )
        );
    }
    drop(tx);
    let end = tokio::time::timeout(LONG, inbound.message())
        .await
        .expect("in time")
        .expect("grpc-status 0 in the trailers");
    assert!(end.is_none());
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_an_h2c_backend() {
    let (backend, conns, _task) = grpc_backend(None).await;
    let stats = HttpStats::new();
    let svc = start(
        &cfg(r#""backend_protocol": "h2c""#),
        &[backend],
        stats.clone(),
    )
    .await;
    grpc_all_kinds(svc.local_addr()).await;
    // Every call multiplexed on one connection to the backend.
    assert_eq!(conns.load(Ordering::SeqCst), 1);
    // Metrics name the backend (gRPC answers are HTTP 200, errors included).
    assert_eq!(stats.requests("t", &backend.to_string(), 200), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_an_h2_tls_backend_with_alpn() {
    let cert = new_cert();
    let (backend, _conns, _task) = grpc_backend(Some(acceptor(&cert, &[b"h2"]))).await;
    let extra = format!(
        r#""backend_protocol": "h2", "backend_tls": {{"ca": "{}"}}"#,
        cert.pem.display()
    );
    let svc = start(&cfg(&extra), &[backend], HttpStats::new()).await;
    grpc_all_kinds(svc.local_addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_backend_that_does_not_select_h2_or_is_not_trusted_gets_502() {
    let cert = new_cert();
    // Speaks HTTP/1.1 only, and does not take part in ALPN.
    let b = http_backend(Some(acceptor(&cert, &[])), false).await;
    let extra = format!(
        r#""backend_protocol": "h2", "backend_tls": {{"ca": "{}"}}, "http": {{"retries": 0}}"#,
        cert.pem.display()
    );
    let svc = start(&cfg(&extra), &[b.addr], HttpStats::new()).await;
    let (status, body) = h1_get(svc.local_addr(), "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("did not select h2"), "{body}");

    // A certificate signed by nobody the proxy trusts.
    let other = new_cert();
    let b = http_backend(Some(acceptor(&cert, &[b"h2"])), true).await;
    let extra = format!(
        r#""backend_protocol": "h2", "backend_tls": {{"ca": "{}"}}, "http": {{"retries": 0}}"#,
        other.pem.display()
    );
    let svc = start(&cfg(&extra), &[b.addr], HttpStats::new()).await;
    let (status, body) = h1_get(svc.local_addr(), "/").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body.contains("certificate"), "{body}");
    // ... unless verification is off.
    let extra = r#""backend_protocol": "h2", "backend_tls": {"verify": false}"#;
    let svc = start(&cfg(extra), &[b.addr], HttpStats::new()).await;
    let (status, _) = h1_get(svc.local_addr(), "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(b.last().version, Version::HTTP_2);
}

async fn h1_get(vip: SocketAddr, path: &str) -> (StatusCode, String) {
    let stream = TcpStream::connect(vip).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", "web.example")
        .body(Full::<Bytes>::default())
        .expect("request");
    let resp = tokio::time::timeout(LONG, send.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_reaches_an_h2c_backend() {
    let b = http_backend(None, true).await;
    let svc = start(
        &cfg(r#""backend_protocol": "h2c""#),
        &[b.addr],
        HttpStats::new(),
    )
    .await;
    let stream = TcpStream::connect(svc.local_addr()).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    // A chunked request body with trailers; the client accepts trailers.
    let mut trailers = HeaderMap::new();
    trailers.insert("x-t", "from-client".parse().expect("value"));
    let frames = vec![
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"abc"))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let req = Request::post("/echo-trailers?q=1")
        .header("host", "web.example:8080")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("trailer", "x-t")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .expect("request");
    let resp = tokio::time::timeout(LONG, send.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected
        .trailers()
        .cloned()
        .expect("trailers in the chunked response");
    assert_eq!(collected.to_bytes(), "abc");
    assert_eq!(trailers["x-got"], "from-client");
    assert_eq!(trailers["x-resp"], "yes");
    let seen = b.last();
    assert_eq!(seen.version, Version::HTTP_2);
    // :authority is the client's Host; no Host field, no connection-specific field.
    assert_eq!(seen.uri, "http://web.example:8080/echo-trailers?q=1");
    assert!(seen.headers.get("host").is_none(), "{:?}", seen.headers);
    for gone in ["connection", "x-hop", "keep-alive", "transfer-encoding"] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone}: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.headers["te"], "trailers");
    assert_eq!(seen.headers["x-forwarded-host"], "web.example:8080");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_gets_trailers_both_ways_and_streams_share_one_backend_connection() {
    let b = http_backend(None, true).await;
    let svc = start(
        &cfg(r#""backend_protocol": "h2c""#),
        &[b.addr],
        HttpStats::new(),
    )
    .await;
    let stream = TcpStream::connect(svc.local_addr()).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-t", "h2-client".parse().expect("value"));
    let frames = vec![
        Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(b"xyz"))),
        Ok(http_body::Frame::trailers(trailers)),
    ];
    let req = Request::post("http://svc.example/echo-trailers")
        .header("te", "trailers")
        .body(body::boxed(StreamBody::new(futures_util::stream::iter(
            frames,
        ))))
        .expect("request");
    let resp = send.clone().send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = resp.into_body().collect().await.expect("body");
    let t = collected.trailers().cloned().expect("trailers");
    assert_eq!(collected.to_bytes(), "xyz");
    assert_eq!(t["x-got"], "h2-client");
    assert_eq!(t["x-resp"], "yes");
    assert_eq!(b.last().uri, "http://svc.example/echo-trailers");

    // 20 slow requests at once: multiplexed on the one backend connection.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut s = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://svc.example/slow")
                .body(body::empty())
                .expect("request");
            s.send_request(req).await.expect("response").status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), StatusCode::OK);
    }
    assert_eq!(b.conns.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_uses_what_the_backend_selects() {
    let cert = new_cert();
    let extra = format!(
        r#""backend_protocol": "auto", "backend_tls": {{"ca": "{}"}}"#,
        cert.pem.display()
    );
    let h2 = http_backend(Some(acceptor(&cert, &[b"h2", b"http/1.1"])), false).await;
    let svc = start(&cfg(&extra), &[h2.addr], HttpStats::new()).await;
    for _ in 0..2 {
        assert_eq!(h1_get(svc.local_addr(), "/").await.0, StatusCode::OK);
    }
    assert_eq!(h2.last().version, Version::HTTP_2);
    // Backend pools are per L7 worker (`l7::workers`): one HTTP/2 connection per worker
    // that served one of the client connections, at most.
    let workers = crate::l7::workers::get().len();
    let n = h2.conns.load(Ordering::SeqCst);
    assert!((1..=workers.min(2)).contains(&n), "{n} connections");

    let h1 = http_backend(Some(acceptor(&cert, &[b"http/1.1"])), false).await;
    let svc = start(&cfg(&extra), &[h1.addr], HttpStats::new()).await;
    for _ in 0..3 {
        let (status, body) = h1_get(svc.local_addr(), "/").await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let seen = h1.last();
    assert_eq!(seen.version, Version::HTTP_11);
    assert_eq!(seen.headers["host"], "web.example");
    assert!(!seen.headers.contains_key("te"));
    // In each worker that served a request (pools and the ALPN memory are per worker):
    // the first on the probing connection, the rest on one pooled connection. So with
    // one worker 2, and never more than one connection per request.
    let n = h1.conns.load(Ordering::SeqCst);
    if workers == 1 {
        assert_eq!(n, 2);
    } else {
        assert!((2..=3).contains(&n), "{n} connections");
    }
}

/// An HTTP/2 server (the `h2` crate) that refuses the first stream of each
/// connection with `REFUSED_STREAM` and answers the others `200`.
async fn refusing_backend() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let streams = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&streams);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                let mut first = true;
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    s.fetch_add(1, Ordering::SeqCst);
                    if std::mem::take(&mut first) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else {
                        let _ = respond.send_response(Response::new(()), true);
                    }
                }
            });
        }
    });
    (addr, streams, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_sent_again_even_for_post_without_a_body() {
    let (backend, streams, _task) = refusing_backend().await;
    let svc = start(
        &cfg(r#""backend_protocol": "h2c""#),
        &[backend],
        HttpStats::new(),
    )
    .await;
    let stream = TcpStream::connect(svc.local_addr()).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::post("/")
        .header("host", "web.example")
        .body(Full::<Bytes>::default())
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(streams.load(Ordering::SeqCst), 2);
}

#[test]
fn backend_protocol_config_is_checked() {
    use crate::config::{BackendProtocol, validate_service};
    let agent = crate::config::AgentConfig::default();
    let dp = crate::config::DataplaneConfig::default();
    let errors = |extra: &str| -> Vec<String> {
        let svc: ServiceConfig = serde_json::from_str(&format!(
            r#"{{"name": "t", "vip": "127.0.0.1:8443", "mode": "l7", "backend": [{{"address": "127.0.0.1", "port": 9000}}], {extra}}}"#
        ))
        .expect("cfg");
        validate_service(&svc, &[], &agent, &dp)
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(cfg("").backend_protocol, BackendProtocol::Http1);
    let e = errors(r#""backend_protocol": "h2c""#);
    assert!(e.is_empty(), "{e:?}");
    let e = errors(r#""backend_protocol": "h2c", "backend_tls": {"verify": false}"#);
    assert!(
        e.iter()
            .any(|e| e.contains("backend_tls") && e.contains("cleartext")),
        "{e:?}"
    );
    let e = errors(r#""backend_protocol": "h2", "backend_tls": {"ca": "/nonexistent/ca.pem"}"#);
    assert!(
        e.iter()
            .any(|e| e.contains("backend_tls.ca") && e.contains("/nonexistent/ca.pem")),
        "{e:?}"
    );
    let e = errors(
        r#""backend_protocol": "h2", "backend_tls": {"verify": false, "server_name": "no such!"}"#,
    );
    assert!(
        e.iter().any(|e| e.contains("backend_tls.server_name")),
        "{e:?}"
    );
    let cert = new_cert();
    let ok = format!(
        r#""backend_protocol": "auto", "backend_tls": {{"ca": "{}", "server_name": "api.internal"}}"#,
        cert.pem.display()
    );
    assert!(errors(&ok).is_empty(), "{:?}", errors(&ok));
    // Not for l4.
    let svc: ServiceConfig = serde_json::from_str(
        r#"{"name": "t", "vip": "127.0.0.1:80", "backend_protocol": "h2c", "backend_tls": {"verify": false}}"#,
    )
    .expect("cfg");
    let e: Vec<String> = validate_service(&svc, &[], &agent, &dp)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        e.iter()
            .any(|e| e.contains("backend_protocol") && e.contains("l7")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|e| e.contains("backend_tls") && e.contains("l7")),
        "{e:?}"
    );
    // Unknown values are refused by name.
    let bad: Result<ServiceConfig, _> = serde_json::from_str(
        r#"{"name": "t", "vip": "127.0.0.1:80", "mode": "l7", "backend_protocol": "h3"}"#,
    );
    let bad = bad.expect_err("h3").to_string();
    assert!(bad.contains("h3") && bad.contains("h2c"), "{bad}");
}
