//! The per-request handler of the L7 proxy, in phases modelled on Pingora's
//! `ProxyHttp` (request filter, upstream peer, upstream request filter, response
//! filter, logging):
//!
//! 1. **Request filter** ([`check_request`], [`check_limits`]): RFC 9112 framing and
//!    `Host` rules first: two `Host` fields, or an HTTP/1.1 request without one, or a
//!    `Host` that is not a valid authority give `400`; `Transfer-Encoding` naming
//!    `chunked` more than once gives `400`, any other transfer coding `501` (hyper
//!    already refuses one whose last coding is not `chunked`). A request whose `Via`
//!    names this agent ([`headers::via_names_us`]) has come round a loop: `508`, a
//!    WARN naming the service, and it is not forwarded. Then the limits: more than
//!    `max_headers` fields or more
//!    than `max_header_bytes` of fields (name + value + 4 per field) give `431`; a
//!    `Content-Length` above `max_body_bytes` gives `413` at once; a streamed body is
//!    cut when it passes `max_body_bytes` ([`BodyLimit`]), which gives `413` when
//!    the response has not started. A request body that fails on the client's side
//!    (bad chunk size or extension, client gone) gives `400` and is not counted
//!    against the backend ([`ClientBody`]).
//! 2. **Upstream request** ([`prepare`]): hop-by-hop fields removed and
//!    `X-Forwarded-For/-Proto/-Host` and `Via` added ([`headers`]); the URI becomes
//!    origin-form and `Host` is kept (for h2 clients set from `:authority`); the
//!    service's `backend_protocol` decides how it reaches the backend
//!    ([`upstream`]: HTTP/1.1, h2c, h2, auto; `TE: trailers` kept for HTTP/2
//!    backends). `Upgrade: h2c` is never forwarded.
//! 3. **Cache** (when the service has one): every request except upgrades goes
//!    through [`Cache::handle`], with the [`Forwarder`] below as its [`Upstream`]: the
//!    cache sits between the client and backend selection. Without a cache the
//!    forwarder is called directly.
//! 4. **Upstream peer** ([`Forwarder::forward`]): the sticky cookie's backend when the
//!    cookie verifies and that backend still serves, else `Pool::pick`. No backend:
//!    `503` naming the service.
//! 5. **Forward and retry**: through the service's [`upstream::Upstream`] (pooled keep-alive
//!    HTTP/1.1 or multiplexed HTTP/2, `TCP_NODELAY`, `connect_timeout_ms`); the
//!    response head must come within
//!    `response_timeout_ms` (`504`). Idempotent methods (GET, HEAD, OPTIONS, PUT,
//!    DELETE, TRACE) without a body are retried on a *different* backend after a
//!    connect error or a reset before any response, at most `retries` times; a
//!    request of any method without a body whose HTTP/2 stream the backend refused
//!    (not processed) is retried the same way. An idempotent request without a body
//!    whose pooled HTTP/1.1 connection failed before the response (closed by the
//!    backend while idle, as the request went out: `UpstreamError::is_stale`) is sent
//!    once more to the same backend, outside `retries` and not reported. Every
//!    attempt's [`Outcome`] goes to the pool: `ConnectError`, `Reset`, `Timeout`;
//!    `Status5xx` for 502, 503 and 504 (a backend or its own upstream failing; a 500
//!    is taken as the application's answer to one request, not a sign of ill health);
//!    `Success` otherwise. A request cut for its size or failed by its client's body
//!    is not reported.
//! 6. **Upgrades** (`Connection: upgrade` + `Upgrade`, HTTP/1.1): forwarded with
//!    those fields; on `101` both sides' connections are taken over and bytes copied
//!    both ways until either side closes (or the service stops).
//! 7. **Response filter**: hop-by-hop fields removed, `Via` added, the body streamed
//!    through unbuffered; the backend's [`Lease`] is held until the body ends. With
//!    sticky sessions, a `Set-Cookie` (Secure on TLS) is added whenever the backend
//!    that answered is not the one the request's cookie named.
//! 8. **Logging**: when the response body ends (or the client goes), one
//!    `xdplb::access` event (service, client, method, path, status, backend, cache,
//!    duration_ms, bytes) and the [`ServiceStats`] series.
//!
//! Error statuses of ours: `400` malformed request (head or body), `413` body too
//! large, `431` header too large, `501` unknown transfer coding, `502` backend
//! failed (connect, reset, bad response), `503` no backend, `504` backend answered
//! too late, `508` loop. Their bodies are `text/plain` and name the service; the
//! errors hyper's parser answers itself (`400`, `414`, `431`) get the same shape
//! ([`parse_error_response`], written by [`super::conn::TimedIo`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{
    CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HOST, HeaderName, HeaderValue, SET_COOKIE,
    TRANSFER_ENCODING,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::HttpConfig;
use crate::l7::balancer::{Lease, Outcome, PickKey, Pool};
use crate::l7::body::{self, Body, BoxError, Observed, Observer};
use crate::l7::cache::{Cache, CacheResult, Upstream, UpstreamError};
use crate::l7::conn::{ConnInfo, InFlight, stopped};
use crate::l7::headers::{self, Forwarded, Upgrading};
use crate::l7::stats::ServiceStats;
use crate::l7::sticky::{self, StickyKey};
use crate::l7::upstream::{self, UpstreamBody};
use crate::l7::workers::PerWorker;

/// Sticky sessions of a service.
#[derive(Debug)]
pub(crate) struct Sticky {
    pub(crate) key: StickyKey,
    pub(crate) cookie: String,
    pub(crate) ttl: Duration,
}

/// Everything the handler of one service needs; shared by its connections.
pub(crate) struct Proxy {
    pub(crate) name: String,
    pub(crate) http: HttpConfig,
    /// The VIP speaks TLS (`X-Forwarded-Proto`, Secure cookies).
    pub(crate) tls: bool,
    pub(crate) pool: Pool,
    pub(crate) cache: Option<Cache>,
    pub(crate) sticky: Option<Sticky>,
    /// How requests reach the backends (`backend_protocol`, `backend_tls`): one set of
    /// backend connection pools per L7 worker (see [`super::workers`]); a request uses
    /// its own worker's.
    pub(crate) upstream: PerWorker<upstream::Upstream>,
    /// The service's series, resolved once.
    pub(crate) stats: ServiceStats,
    /// Live upgraded tunnels (shutdown waits for them).
    pub(crate) tunnels: TaskTracker,
    /// Set when the grace period is over: connections and tunnels end.
    pub(crate) hard_stop: watch::Sender<bool>,
    /// Set when the service drains (stopped, replaced by new settings, or handed to a
    /// new agent): HTTP/1 responses carry `Connection: close`.
    pub(crate) draining: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("name", &self.name)
            .field("tls", &self.tls)
            .field("cache", &self.cache.is_some())
            .field("sticky", &self.sticky.as_ref().map(|s| &s.cookie))
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Why a request got an error status of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no backend available")]
    NoBackend,
    #[error("cannot connect to backend {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("backend {addr} failed: {reason}")]
    Backend { addr: SocketAddr, reason: String },
    #[error("backend {addr} sent no response header within {ms} ms")]
    Timeout { addr: SocketAddr, ms: u64 },
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("request header larger than {limit} {unit}")]
    HeaderTooLarge { limit: u64, unit: &'static str },
    #[error("bad request: {reason}")]
    BadRequest { reason: String },
    #[error("transfer coding not implemented: {coding}")]
    NotImplemented { coding: String },
    #[error("request loop: the request has already passed through this proxy ({via})")]
    Loop { via: &'static str },
}

impl ProxyError {
    fn status(&self) -> StatusCode {
        match self {
            Self::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            Self::Connect { .. } | Self::Backend { .. } => StatusCode::BAD_GATEWAY,
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeaderTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::NotImplemented { .. } => StatusCode::NOT_IMPLEMENTED,
            Self::Loop { .. } => StatusCode::LOOP_DETECTED,
        }
    }

    /// Whether the client's connection cannot be trusted after this error (framing
    /// in doubt, or a body left unread): `Connection: close`.
    fn closes(&self) -> bool {
        matches!(
            self,
            Self::BodyTooLarge { .. }
                | Self::HeaderTooLarge { .. }
                | Self::BadRequest { .. }
                | Self::NotImplemented { .. }
        )
    }

    /// The body text of this error, as every error of ours has it.
    fn text(&self, service: &str) -> String {
        error_text(self.status(), &self.to_string(), service)
    }

    /// The response sent to the client.
    fn response(&self, service: &str) -> Response<Body> {
        let status = self.status();
        let text = match self {
            Self::NoBackend => format!("503 no backend available for service \"{service}\"\n"),
            _ => self.text(service),
        };
        let mut resp = Response::new(body::full(text));
        *resp.status_mut() = status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(ERROR_CONTENT_TYPE));
        if self.closes() {
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// The `Content-Type` of every error body of ours.
const ERROR_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// `<code> <what> (service "<name>")`: the text of every error of ours.
fn error_text(status: StatusCode, what: &str, service: &str) -> String {
    format!("{} {what} (service \"{service}\")\n", status.as_u16())
}

/// The bytes of the response that replaces the bare one hyper's HTTP/1 parser writes
/// for a request head it cannot parse (`status` 400, 414 or 431: no body, no
/// `Content-Type`): the same shape as the proxy's own errors. `None` for another
/// status.
pub(crate) fn parse_error_response(
    status: u16,
    service: &str,
    http: &HttpConfig,
) -> Option<Vec<u8>> {
    let status = StatusCode::from_u16(status).ok()?;
    let what = match status {
        StatusCode::BAD_REQUEST => "bad request: malformed request head".to_owned(),
        StatusCode::URI_TOO_LONG => "request target too long".to_owned(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => format!(
            "request header larger than {} fields or {} bytes",
            http.max_headers,
            http.max_header_bytes.max(8192)
        ),
        _ => return None,
    };
    let text = error_text(status, &what, service);
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {ERROR_CONTENT_TYPE}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        text.len()
    );
    Some([head.into_bytes(), text.into_bytes()].concat())
}

// ---------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------

/// The client's request body on its way to a backend ([`Observed`]): past `limit`
/// bytes it is cut (`413`); when it fails on the client's side (a malformed chunk, the
/// client gone) that is the client's fault (`400`). Either is recorded in the
/// request's [`Shared`] `fault`,
/// so the forwarder tells it from a backend failure (hyper's client reports a failed
/// request body as its own error) and does not count it against the backend.
struct ClientBody {
    remaining: u64,
    limit: u64,
    shared: Arc<Shared>,
}

impl Observer for ClientBody {
    fn data(&mut self, data: &Bytes) -> Result<(), BoxError> {
        let n = data.len() as u64;
        if n > self.remaining {
            let err = ProxyError::BodyTooLarge { limit: self.limit };
            let _ = self.shared.fault.set(err.clone());
            return Err(err.to_string().into());
        }
        self.remaining -= n;
        Ok(())
    }

    fn failed(&mut self, error: &BoxError) {
        let _ = self.shared.fault.set(ProxyError::BadRequest {
            reason: format!("request body: {}", root_cause(error.as_ref())),
        });
    }
}

/// A backend's response body holds the backend's lease ([`Observed`]): the lease is
/// returned when the body ends (or is dropped).
impl Observer for Lease {}

/// What the access log and the metrics record at the end of a request.
struct Finish {
    proxy: Arc<Proxy>,
    client: SocketAddr,
    method: Method,
    uri: Uri,
    status: u16,
    backend: Option<SocketAddr>,
    cache: Option<&'static str>,
    start: Instant,
    bytes: u64,
    _in_flight: InFlight,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        self.proxy.stats.observe_duration(elapsed);
        let line = AccessLine {
            service: &self.proxy.name,
            client: self.client.ip(),
            method: &self.method,
            path: self.uri.path(),
            status: self.status,
            backend: self.backend,
            cache: self.cache.unwrap_or(""),
            duration_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            bytes: self.bytes,
        };
        // The agent's buffered log takes the line directly; elsewhere (tests) the event.
        if !crate::logging::access_line(|buf| line.write(buf)) {
            line.event();
        }
    }
}

/// The fields of one access-log line.
struct AccessLine<'a> {
    service: &'a str,
    client: IpAddr,
    method: &'a Method,
    path: &'a str,
    status: u16,
    backend: Option<SocketAddr>,
    cache: &'a str,
    duration_ms: u64,
    bytes: u64,
}

impl AccessLine<'_> {
    /// The line as a `tracing` event.
    fn event(&self) {
        info!(
            target: "xdplb::access",
            service = %self.service,
            client = %self.client,
            method = %self.method,
            path = %self.path,
            status = self.status,
            backend = %OptionalAddr(self.backend),
            cache = self.cache,
            duration_ms = self.duration_ms,
            bytes = self.bytes,
        );
    }

    /// The same fields as [`Self::event`], as `tracing-subscriber` formats them (`%`
    /// fields as they display, the `cache` string as `{:?}`), written straight into the
    /// access log's buffer ([`crate::logging::access_line`]).
    fn write(&self, f: &mut crate::logging::Fields<'_>) {
        f.display("service", self.service);
        f.ip("client", self.client);
        f.display("method", self.method.as_str());
        f.display("path", self.path);
        f.u64("status", self.status.into());
        f.socket_addr("backend", self.backend);
        f.debug_str("cache", self.cache);
        f.u64("duration_ms", self.duration_ms);
        f.u64("bytes", self.bytes);
    }
}

/// A backend's address in the access log, or nothing.
struct OptionalAddr(Option<SocketAddr>);

impl std::fmt::Display for OptionalAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => Ok(()),
        }
    }
}

/// The response body sent to the client ([`Observed`]) counts its bytes into
/// `Finish`, which logs when the body ends (or is dropped).
impl Observer for Finish {
    fn data(&mut self, data: &Bytes) -> Result<(), BoxError> {
        self.bytes += data.len() as u64;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Handler
// ---------------------------------------------------------------------------

/// Handle one client request (see the [module docs](self)).
pub(crate) async fn handle(
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
    in_flight: InFlight,
) -> Response<Body> {
    let start = Instant::now();
    // The request's one hold on the service (shared by the workers: no clone of it per
    // request that is not needed).
    let mut finish = Finish {
        proxy,
        client: conn.client,
        method: req.method().clone(),
        uri: req.uri().clone(),
        status: 0,
        backend: None,
        cache: None,
        start,
        bytes: 0,
        _in_flight: in_flight,
    };
    let resp = respond(&conn, req, &mut finish).await;
    let proxy = &finish.proxy;
    finish.status = resp.status().as_u16();
    proxy.stats.record_response(finish.backend, finish.status);
    if let Some(result) = finish.cache {
        proxy.stats.record_cache(result);
    }
    let (mut parts, inner) = resp.into_parts();
    if proxy.draining.load(std::sync::atomic::Ordering::SeqCst)
        && !conn.activity.is_h2()
        && parts.status != http::StatusCode::SWITCHING_PROTOCOLS
    {
        // The connection closes after this response (hyper honours the field).
        parts.headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    // An empty body is never polled: `Observed` drops `finish` (which logs) at once.
    Response::from_parts(parts, Observed::new(inner, finish).boxed())
}

/// Request filter: `Host`, `Transfer-Encoding` and loops (see the [module docs](self)).
fn check_request(version: Version, headers: &HeaderMap) -> Result<(), ProxyError> {
    let bad = |reason: &str| {
        Err(ProxyError::BadRequest {
            reason: reason.to_owned(),
        })
    };
    let mut hosts = headers.get_all(HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return bad("more than one Host field"),
        (None, _) if version == Version::HTTP_11 => return bad("HTTP/1.1 request without Host"),
        (Some(h), None)
            if !h.is_empty()
                && !plain_host(h.as_bytes())
                && http::uri::Authority::try_from(h.as_bytes()).is_err() =>
        {
            return bad("Host is not a valid host[:port]");
        }
        _ => {}
    }
    let mut chunked = 0;
    for coding in headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
    {
        if coding.eq_ignore_ascii_case(b"chunked") {
            chunked += 1;
        } else {
            return Err(ProxyError::NotImplemented {
                coding: String::from_utf8_lossy(coding).into_owned(),
            });
        }
    }
    if chunked > 1 {
        return bad("Transfer-Encoding names chunked more than once");
    }
    if headers::via_names_us(headers) {
        return Err(ProxyError::Loop {
            via: headers::via_name(),
        });
    }
    Ok(())
}

/// Whether `host` is a `reg-name` or IPv4 address of letters, digits, `-` and `.`,
/// with an optional `:port` of up to five digits: a valid authority (what
/// `http::uri::Authority` accepts), told without building one (no allocation per
/// request). Anything else is left to `Authority`.
fn plain_host(host: &[u8]) -> bool {
    let (name, port) = match host.iter().position(|&b| b == b':') {
        Some(i) => (&host[..i], Some(&host[i + 1..])),
        None => (host, None),
    };
    !name.is_empty()
        && name
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && port.is_none_or(|p| p.len() <= 5 && p.iter().all(u8::is_ascii_digit))
}

/// Request filter: header and body size limits.
fn check_limits(http: &HttpConfig, headers: &HeaderMap) -> Result<(), ProxyError> {
    if headers.len() > usize::try_from(http.max_headers).unwrap_or(usize::MAX) {
        return Err(ProxyError::HeaderTooLarge {
            limit: u64::from(http.max_headers),
            unit: "fields",
        });
    }
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if bytes as u64 > u64::from(http.max_header_bytes) {
        return Err(ProxyError::HeaderTooLarge {
            limit: u64::from(http.max_header_bytes),
            unit: "bytes",
        });
    }
    let length = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if length.is_some_and(|n| n > http.max_body_bytes) {
        return Err(ProxyError::BodyTooLarge {
            limit: http.max_body_bytes,
        });
    }
    Ok(())
}

/// Whether `uri` is a path and query only (an HTTP/1.1 request's usual target):
/// then it is forwarded as it is, not parsed again.
fn is_origin_form(uri: &Uri) -> bool {
    uri.scheme().is_none() && uri.authority().is_none() && uri.path_and_query().is_some()
}

/// Upstream request filter: the request as backends (and the cache) see it.
fn prepare(
    proxy: &Proxy,
    conn: &ConnInfo,
    req: Request<Incoming>,
    upgrading: Upgrading,
    shared: &Arc<Shared>,
) -> Request<Body> {
    let (mut parts, incoming) = req.into_parts();
    // The host asked for: the target's authority (h2's `:authority`, an absolute-form
    // target), set as `Host`; else the client's `Host` as it is (a shared copy of its
    // value: [`check_request`] has accepted it, and it stays where it is).
    let (host, set_host) = match parts.uri.authority() {
        Some(a) => (HeaderValue::from_str(a.as_str()).ok(), true),
        None => (
            parts
                .headers
                .get(HOST)
                .filter(|h| h.to_str().is_ok())
                .cloned(),
            false,
        ),
    };
    let h = &mut parts.headers;
    let te_trailers = headers::te_trailers(h);
    headers::strip_hop_by_hop(h, upgrading);
    if te_trailers && proxy.upstream.passes_te() {
        // The one TE an HTTP/2 hop carries (gRPC needs it; RFC 9113 §8.2.2).
        h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    h.remove(EXPECT); // hyper answered any 100-continue on our side
    headers::add_forwarded(
        h,
        &Forwarded {
            client: &conn.client_value,
            tls: conn.tls,
            host: host.as_ref(),
        },
    );
    headers::append_via(h, parts.version);
    if let (true, Some(v)) = (set_host, host) {
        h.insert(HOST, v);
    }
    if !is_origin_form(&parts.uri) {
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = Version::HTTP_11;
    let body = if incoming.is_end_stream() {
        body::empty()
    } else {
        let limit = ClientBody {
            remaining: proxy.http.max_body_bytes,
            limit: proxy.http.max_body_bytes,
            shared: Arc::clone(shared),
        };
        Observed::new(incoming, limit).boxed()
    };
    Request::from_parts(parts, body)
}

/// A cache hit answered before [`prepare`] (no upstream request built, no backend
/// state): [`Cache::hit`] with the request as the client sent it, which is what the
/// cache would see after `prepare` except for the fields [`prepare`] rewrites. Taken
/// only for a request without a body whose `Connection` names no field besides
/// `keep-alive` and `close` (so `prepare` removes none the cache reads), and a stored
/// response whose `Vary` names none of the fields [`forward_rewrites`] names; anything else goes through
/// `prepare` and [`Cache::handle`].
async fn fresh_hit(cache: &Cache, req: &Request<Incoming>) -> Option<Response<Body>> {
    if !req.body().is_end_stream() {
        return None;
    }
    let plain_connection = req
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .all(|t| {
            t.is_empty()
                || t.eq_ignore_ascii_case(b"keep-alive")
                || t.eq_ignore_ascii_case(b"close")
        });
    if !plain_connection {
        return None;
    }
    cache.hit(req, |name| !forward_rewrites(name)).await
}

/// Whether [`prepare`] removes, adds or changes the request field `name`: the fields
/// [`headers::strip_hop_by_hop`] always removes ([`headers::HOP_BY_HOP`]), and the rest of
/// [`FORWARD_REWRITES`].
fn forward_rewrites(name: &HeaderName) -> bool {
    headers::HOP_BY_HOP.contains(&name) || FORWARD_REWRITES.contains(&name.as_str())
}

/// The request fields besides [`headers::HOP_BY_HOP`] that [`prepare`] (with
/// [`headers::strip_hop_by_hop`] and [`headers::add_forwarded`]) removes, adds or
/// changes, besides those a `Connection` field names (`close` and `keep-alive` are the
/// ones [`fresh_hit`] lets through). Keep in step with `prepare`.
const FORWARD_REWRITES: [&str; 8] = [
    "close",
    "upgrade",
    "expect",
    "host",
    "via",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

async fn respond(
    conn: &Arc<ConnInfo>,
    mut req: Request<Incoming>,
    finish: &mut Finish,
) -> Response<Body> {
    let proxy = &finish.proxy;
    if let Err(e) = check_request(req.version(), req.headers()) {
        if matches!(e, ProxyError::Loop { .. }) {
            warn!(service = %proxy.name, client = %conn.client, via = ?req.headers().get_all(http::header::VIA).iter().collect::<Vec<_>>(),
                "request loop: this request already went through this agent (a backend of the service leads back to it); answered 508, not forwarded");
        } else {
            debug!(service = %proxy.name, client = %conn.client, error = %e, "request refused");
        }
        return e.response(&proxy.name);
    }
    if let Err(e) = check_limits(&proxy.http, req.headers()) {
        debug!(service = %proxy.name, client = %conn.client, error = %e, "request refused");
        return e.response(&proxy.name);
    }
    let upgrade = headers::is_upgrade_request(req.version(), req.headers());
    if let (false, Some(cache)) = (upgrade, &proxy.cache) {
        if let Some(resp) = fresh_hit(cache, &req).await {
            finish.cache = Some(CacheResult::Hit.as_str());
            return resp;
        }
    }
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let sticky_token = proxy.sticky.as_ref().and_then(|s| {
        sticky::cookie_value(req.headers(), &s.cookie)
            .and_then(|v| s.key.verify(v, SystemTime::now()))
    });
    let shared = Arc::new(Shared::default());
    let upgrading = if upgrade {
        Upgrading::Yes
    } else {
        Upgrading::No
    };
    let req = prepare(proxy, conn, req, upgrading, &shared);
    let forwarder = Forwarder {
        proxy: Arc::clone(proxy),
        conn: Arc::clone(conn),
        sticky_token,
        shared,
    };

    let mut resp = match (client_upgrade, &proxy.cache) {
        (Some(client_upgrade), _) => match forwarder.forward(req).await {
            Ok((resp, lease)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                tunnel(proxy, conn, client_upgrade, resp, lease)
            }
            Ok((resp, lease)) => backend_response(resp, lease),
            Err(e) => e.response(&proxy.name),
        },
        (None, Some(cache)) => {
            let resp = cache.handle(req, forwarder.clone()).await;
            let result = resp.extensions().get::<CacheResult>().copied();
            finish.cache = result.map(CacheResult::as_str);
            let served_stale = matches!(result, Some(CacheResult::Stale | CacheResult::Hit));
            // The cache answers an upstream failure with its own 502/504: give ours
            // (503, 413, ...) unless it served something stored.
            match forwarder.error() {
                Some(e) if !served_stale && resp.status().is_server_error() => {
                    let mut ours = e.response(&proxy.name);
                    if let Some(r) = result {
                        ours.extensions_mut().insert(r);
                    }
                    if let Some(cs) = resp.headers().get("cache-status") {
                        ours.headers_mut().insert("cache-status", cs.clone());
                    }
                    ours
                }
                _ => resp,
            }
        }
        (None, None) => match forwarder.forward(req).await {
            Ok((resp, lease)) => backend_response(resp, lease),
            Err(e) => e.response(&proxy.name),
        },
    };

    let backend = forwarder.backend();
    finish.backend = backend;
    if let (Some(s), Some(addr)) = (&proxy.sticky, backend) {
        if sticky_token != Some(s.key.backend_token(addr)) {
            let value = s.key.issue(addr, s.ttl, SystemTime::now());
            resp.headers_mut().append(
                SET_COOKIE,
                sticky::set_cookie(&s.cookie, &value, s.ttl, proxy.tls),
            );
        }
    }
    resp
}

/// Response filter: a backend's response as the client gets it.
fn backend_response(resp: Response<UpstreamBody>, lease: Lease) -> Response<Body> {
    let (mut parts, incoming) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, Upgrading::No);
    headers::append_via(&mut parts.headers, parts.version);
    parts.version = Version::HTTP_11;
    Response::from_parts(parts, Observed::new(incoming, lease).boxed())
}

/// A `101` from the backend: answer the client with it and join the two connections.
fn tunnel(
    proxy: &Arc<Proxy>,
    conn: &ConnInfo,
    client_upgrade: hyper::upgrade::OnUpgrade,
    mut resp: Response<UpstreamBody>,
    lease: Lease,
) -> Response<Body> {
    let backend_upgrade = hyper::upgrade::on(&mut resp);
    conn.activity.set_tunnel();
    let mut hard = proxy.hard_stop.subscribe();
    let service = proxy.name.clone();
    let client = conn.client;
    proxy.tunnels.spawn(async move {
        let _lease = lease;
        let (c, b) = tokio::join!(client_upgrade, backend_upgrade);
        let (c, b) = match (c, b) {
            (Ok(c), Ok(b)) => (c, b),
            (c, b) => {
                debug!(%service, %client, client_err = ?c.err(), backend_err = ?b.err(), "upgrade failed");
                return;
            }
        };
        let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut c, &mut b) => match r {
                Ok((up, down)) => debug!(%service, %client, up, down, "tunnel closed"),
                Err(e) => debug!(%service, %client, error = %e, "tunnel failed"),
            },
            () = stopped(&mut hard) => debug!(%service, %client, "tunnel closed by shutdown"),
        }
    });
    let (mut parts, _) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, Upgrading::Yes);
    headers::append_via(&mut parts.headers, parts.version);
    Response::from_parts(parts, body::empty())
}

// ---------------------------------------------------------------------------
// Forwarding
// ---------------------------------------------------------------------------

/// What the forwarder did, for the handler after the cache.
#[derive(Debug, Default)]
struct Record {
    backend: Option<SocketAddr>,
    error: Option<ProxyError>,
}

/// What one request's forwarder and its request body share (one allocation per
/// request).
#[derive(Debug, Default)]
struct Shared {
    /// Set when the client's body failed: the client's fault, not the backend's.
    fault: OnceLock<ProxyError>,
    record: Mutex<Record>,
}

/// Backend selection, forwarding and retries for one client request; the cache's
/// [`Upstream`].
#[derive(Clone)]
pub(crate) struct Forwarder {
    proxy: Arc<Proxy>,
    sticky_token: Option<[u8; 8]>,
    /// The client's connection (its address, its response timer).
    conn: Arc<ConnInfo>,
    shared: Arc<Shared>,
}

/// Methods that RFC 9110 §9.2.2 calls idempotent.
fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The pool's name for a backend's answer.
fn status_outcome(status: StatusCode) -> Outcome {
    match status.as_u16() {
        502..=504 => Outcome::Status5xx,
        _ => Outcome::Success,
    }
}

/// The innermost message of an error chain, for logs and error bodies.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

impl Forwarder {
    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.shared
            .record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The backend whose response was returned.
    fn backend(&self) -> Option<SocketAddr> {
        self.record().backend
    }

    /// The error of the last failed forward.
    fn error(&self) -> Option<ProxyError> {
        self.record().error.clone()
    }

    fn choose(&self, headers: &HeaderMap, first: bool, exclude: &[SocketAddr]) -> Option<Lease> {
        let pool = &self.proxy.pool;
        if let (true, Some(s), Some(token)) = (first, &self.proxy.sticky, self.sticky_token) {
            if let Some(lease) = pool.lease_by_token(&s.key, token) {
                return Some(lease);
            }
        }
        let key = PickKey {
            client: self.conn.client.ip(),
            headers,
        };
        pool.pick(&key, exclude)
    }

    /// Send `req` (origin-form URI) to a backend, retrying as the module docs say.
    pub(crate) async fn forward(
        &self,
        req: Request<Body>,
    ) -> Result<(Response<UpstreamBody>, Lease), ProxyError> {
        let r = self.try_forward(req).await;
        let mut rec = self.record();
        match &r {
            Ok((_, lease)) => {
                rec.backend = Some(lease.addr());
                rec.error = None;
            }
            Err(e) => rec.error = Some(e.clone()),
        }
        r
    }

    async fn try_forward(
        &self,
        req: Request<Body>,
    ) -> Result<(Response<UpstreamBody>, Lease), ProxyError> {
        let proxy = &self.proxy;
        let (mut parts, body) = req.into_parts();
        let empty = body.is_end_stream();
        let retryable = is_idempotent(&parts.method) && empty;
        let attempts = if empty {
            proxy.http.retries.saturating_add(1)
        } else {
            1
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str);
        // Origin-form already (`prepare` made it so): each attempt takes a copy.
        let origin = is_origin_form(&parts.uri).then(|| parts.uri.clone());
        let timeout = Duration::from_millis(proxy.http.response_timeout_ms);
        let mut body = Some(body);
        let mut exclude = Vec::new();
        let mut last = ProxyError::NoBackend;
        // A stale pooled connection (closed by the backend as the request went out):
        // an idempotent request goes once more to the same backend, not counted as an
        // attempt nor against the backend.
        let mut stale: Option<Lease> = None;
        let mut stale_used = false;
        let mut attempt = 0;
        while attempt < attempts || stale.is_some() {
            let lease = match stale.take() {
                Some(lease) => lease,
                None => {
                    let Some(lease) = self.choose(&parts.headers, attempt == 0, &exclude) else {
                        return Err(last);
                    };
                    attempt += 1;
                    lease
                }
            };
            let addr = lease.addr();
            let uri = match &origin {
                Some(uri) => uri.clone(),
                None => Uri::try_from(path).map_err(|e| ProxyError::Backend {
                    addr,
                    reason: format!("cannot build the request URI: {e}"),
                })?,
            };
            let mut breq = Request::new(body.take().unwrap_or_else(body::empty));
            *breq.method_mut() = parts.method.clone();
            *breq.uri_mut() = uri;
            *breq.version_mut() = Version::HTTP_11;
            // Kept for a later send only if there can be one (another attempt, or the
            // one resend on a stale connection): a request with a body has one attempt.
            let again = attempt < attempts || (retryable && !stale_used);
            *breq.headers_mut() = if again {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let send = std::pin::pin!(proxy.upstream.send(addr, breq));
            match self.conn.timeout(timeout, send).await {
                None => {
                    proxy.pool.report(addr, Outcome::Timeout);
                    return Err(ProxyError::Timeout {
                        addr,
                        ms: proxy.http.response_timeout_ms,
                    });
                }
                Some(Ok(resp)) => {
                    proxy.pool.report(addr, status_outcome(resp.status()));
                    return Ok((resp, lease));
                }
                Some(Err(e)) => {
                    if let Some(fault) = self.shared.fault.get() {
                        debug!(service = %proxy.name, backend = %addr, error = %fault, "request body failed on the client's side");
                        return Err(fault.clone());
                    }
                    let reason = root_cause(&e);
                    if e.is_stale() && retryable && !stale_used {
                        debug!(service = %proxy.name, backend = %addr, error = %reason, "pooled connection closed by the backend as the request went out; sending it again");
                        stale_used = true;
                        stale = Some(lease);
                        continue;
                    }
                    let (outcome, err, retry) = if e.is_connect() {
                        let err = ProxyError::Connect { addr, reason };
                        (Outcome::ConnectError, err, true)
                    } else {
                        let reset = e.is_reset();
                        (Outcome::Reset, ProxyError::Backend { addr, reason }, reset)
                    };
                    proxy.pool.report(addr, outcome);
                    debug!(service = %proxy.name, backend = %addr, attempt, error = %err, "attempt failed");
                    if !((retry && retryable) || (e.is_refused() && empty)) {
                        return Err(err);
                    }
                    // A refused stream says nothing against the backend (a graceful
                    // GOAWAY, a full connection): it may take the request again.
                    if !e.is_refused() {
                        exclude.push(addr);
                    }
                    last = err;
                }
            }
        }
        Err(last)
    }
}

impl Upstream for Forwarder {
    fn send(
        &self,
        req: Request<Body>,
    ) -> BoxFuture<'static, Result<Response<Body>, UpstreamError>> {
        let this = self.clone();
        Box::pin(async move {
            match this.forward(req).await {
                Ok((resp, lease)) => Ok(backend_response(resp, lease)),
                Err(e) => Err(UpstreamError(e.to_string())),
            }
        })
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    /// The allocation-free Host check accepts only what `Authority` accepts, and the
    /// filter's verdict is the same with it as with `Authority` alone.
    #[test]
    fn plain_hosts_are_authorities() {
        for host in [
            "example.com",
            "a-b.c:8080",
            "127.0.0.1",
            "127.0.0.1:80",
            "h:",
            "h:99999",
            "H.Example.COM:1",
            "x",
            "h:123456",
            "[::1]:80",
            "[::1]",
            "user@h",
            "h_x",
            "h:80:81",
            "h/p",
            "h?q",
            "h%20",
            ":80",
            "a b",
            "h:8a",
            "\u{e9}",
        ] {
            let b = host.as_bytes();
            let authority = http::uri::Authority::try_from(b).is_ok();
            assert!(
                !plain_host(b) || authority,
                "{host}: plain but not an authority"
            );
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_bytes(b).unwrap());
            assert_eq!(
                check_request(Version::HTTP_11, &h).is_ok(),
                authority,
                "{host}"
            );
        }
        assert!(plain_host(b"example.com:8080"));
        assert!(plain_host(b"10.0.0.1"));
        assert!(!plain_host(b"[::1]:80"));
    }

    #[test]
    fn limits() {
        let http = HttpConfig {
            max_headers: 2,
            max_header_bytes: 30,
            max_body_bytes: 10,
            ..HttpConfig::default()
        };
        let mut h = HeaderMap::new();
        h.insert("a", HeaderValue::from_static("1"));
        assert_eq!(check_limits(&http, &h), Ok(()));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("11"));
        assert_eq!(
            check_limits(&http, &h).map_err(|e| e.status()),
            Err(StatusCode::PAYLOAD_TOO_LARGE)
        );
        h.insert("b", HeaderValue::from_static("1"));
        assert_eq!(
            check_limits(&http, &h).map_err(|e| e.status()),
            Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        let mut h = HeaderMap::new();
        h.insert(
            "a",
            HeaderValue::from_static("0123456789012345678901234567890"),
        );
        assert_eq!(
            check_limits(&http, &h).map_err(|e| e.status()),
            Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn outcomes_and_methods() {
        assert_eq!(status_outcome(StatusCode::OK), Outcome::Success);
        assert_eq!(
            status_outcome(StatusCode::INTERNAL_SERVER_ERROR),
            Outcome::Success
        );
        assert_eq!(status_outcome(StatusCode::BAD_GATEWAY), Outcome::Status5xx);
        assert_eq!(
            status_outcome(StatusCode::GATEWAY_TIMEOUT),
            Outcome::Status5xx
        );
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }

    /// The access line written straight into the log buffer reads as
    /// `tracing-subscriber` prints the `tracing` event of the same fields.
    #[test]
    fn direct_access_lines_read_as_the_tracing_event() {
        use crate::l7::tests::Captured;
        let method = Method::from_bytes(b"PURGE").expect("method");
        let lines = [
            AccessLine {
                service: "web",
                client: "198.18.0.7".parse().expect("ip"),
                method: &Method::GET,
                path: "/a/b%20c.html",
                status: 200,
                backend: Some("198.18.2.11:8080".parse().expect("addr")),
                cache: "hit",
                duration_ms: 12,
                bytes: 600,
            },
            AccessLine {
                service: "api-v2",
                client: "fd00:18::1".parse().expect("ip"),
                method: &method,
                path: "/",
                status: 503,
                backend: None,
                cache: "",
                duration_ms: 0,
                bytes: 0,
            },
            AccessLine {
                service: "s",
                client: "::ffff:198.18.0.1".parse().expect("ip"),
                method: &Method::POST,
                path: "/x",
                status: 413,
                backend: Some("[fd00:18::2]:80".parse().expect("addr")),
                cache: "stale",
                duration_ms: u64::MAX,
                bytes: 1 << 40,
            },
        ];
        for line in &lines {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::INFO)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::callsite::rebuild_interest_cache();
                line.event();
            });
            let from_tracing =
                String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
            let mut direct = b"  INFO xdplb::access: ".to_vec();
            line.write(&mut crate::logging::Fields::new(&mut direct));
            direct.push(b'\n');
            let direct = String::from_utf8(direct).expect("utf-8");
            // tracing's line starts with its own timestamp: compare what follows it.
            let after_time = from_tracing
                .find("  INFO")
                .map(|i| &from_tracing[i..])
                .unwrap_or_else(|| panic!("no level in {from_tracing:?}"));
            assert_eq!(after_time, direct);
        }
    }

    #[test]
    fn error_bodies_name_the_service() {
        let r = ProxyError::NoBackend.response("web");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
