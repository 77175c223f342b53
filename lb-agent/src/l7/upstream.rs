//! The backend side of an L7 service: how a request reaches a backend, by the service's
//! `backend_protocol` (and `backend_tls`).
//!
//! - `http1`: a pool of keep-alive connections of its own ([`H1Pool`], on hyper's
//!   `client::conn::http1`), one per L7 worker and service (the upstream is per worker,
//!   [`super::workers::PerWorker`]), over TCP, or over TLS with ALPN `http/1.1` when
//!   `backend_tls` is set. A connection carries one request at a time; when the
//!   response's body has been read to its end it goes back to its backend's idle list
//!   (last in, first out: the most recently used connection is the likeliest to be
//!   alive and warm), at most [`MAX_IDLE_H1`] of them per backend (beyond that it is
//!   closed), and is closed after [`IDLE`] unused. A connection whose response was cut
//!   short, or that was upgraded, is never reused. The connection task runs on the
//!   worker that opened it, so a client connection and its backend connections stay on
//!   one thread. A request that a pooled connection closed before taking it (hyper
//!   hands it back: the backend closed the idle connection) is sent again on the next
//!   idle connection or a new one, whatever its method, as hyper-util's client does.
//! - `h2c`, `h2`: HTTP/2 (hyper's `client::conn::http2`), over TCP with prior knowledge
//!   or over TLS where the backend must select `h2` in ALPN (else the connection
//!   counts as a connect failure). Requests are multiplexed: a backend gets one
//!   connection, and another only when every one it has carries [`MAX_STREAMS`]
//!   streams (or the backend's own `SETTINGS_MAX_CONCURRENT_STREAMS`, when lower), at
//!   most [`MAX_CONNS`]; past that, streams wait in the least loaded connection's queue
//!   (bounded by `response_timeout_ms`). New connections to one backend are opened one
//!   at a time, so a burst of requests shares the first one instead of opening one
//!   each. A connection is pinged every [`PING_INTERVAL`] (closed when the ack takes
//!   longer than [`PING_TIMEOUT`]) and closed after [`IDLE`] without a stream.
//! - `auto`: TLS with ALPN `h2, http/1.1`; a backend that selects `h2` is spoken to as
//!   above; one that selects `http/1.1` (or nothing) gets this request on that
//!   connection and the next ones through the HTTP/1.1 pool for [`LEARN_TTL`], after
//!   which ALPN is asked again.
//!
//! Protocol translation (RFC 9113 §8.2, §8.3.1): towards an h2 backend the target URI
//! becomes `:scheme` (`https` over TLS, else `http`), `:authority` (the request's
//! `Host`, which the proxy sets from the client's `Host` or `:authority`; the backend's
//! address when there is none) and `:path`; `Host` itself is not sent (an h2 request must
//! not carry one that differs from `:authority`). Connection-specific fields never reach
//! an h2 backend (the proxy removes them; hyper drops any left), except `TE: trailers`,
//! which the proxy passes to h2 backends when the client sent it ([`passes_te`]).
//! Towards an HTTP/1.1 backend, `TE` is never sent. Upgrades (`Connection: upgrade`,
//! WebSocket) always go over HTTP/1.1: to the same backend address, in cleartext for
//! `h2c`, over TLS with ALPN `http/1.1` for `h2` and `auto` (HTTP/2 has no `Upgrade`; an
//! h2-only backend refuses them, giving `502`).
//!
//! Errors ([`UpstreamError`]) say whether the request may be sent again: a connect
//! failure; a reset before the response (the proxy retries idempotent requests); a
//! stream the backend refused (`REFUSED_STREAM`, or above the last stream id of a
//! graceful `GOAWAY`): never processed (RFC 9113 §8.7), so the proxy retries it
//! whatever its method when it had no body. A request that a pooled connection closed
//! before taking it (hyper hands it back) is sent once more on a new connection here.
//!
//! [`passes_te`]: Upstream::passes_te

use std::collections::HashMap;
use std::future::Future as _;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{HOST, TE};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::debug;

use crate::config::{BackendProtocol, BackendTlsConfig, ServiceConfig};
use crate::l7::body::{Body, BoxError, Observed, Observer};
use crate::l7::tls::{self, TlsError};

/// Streams one HTTP/2 connection carries before another is opened (RFC 9113 §6.5.2
/// recommends that a server allow at least 100).
pub const MAX_STREAMS: usize = 100;
/// HTTP/2 connections to one backend at most.
pub const MAX_CONNS: usize = 8;
/// An HTTP/2 (or pooled HTTP/1.1) connection without a request this long is closed.
pub const IDLE: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per backend (per worker); one more is closed.
pub const MAX_IDLE_H1: usize = 256;
/// HTTP/2 keep-alive ping interval.
pub const PING_INTERVAL: Duration = Duration::from_secs(30);
/// HTTP/2 keep-alive ping timeout.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `auto` remembers that a backend chose HTTP/1.1.
pub const LEARN_TTL: Duration = Duration::from_secs(60);

const ALPN_H1: &[&[u8]] = &[b"http/1.1"];
const ALPN_H2: &[&[u8]] = &[b"h2"];
const ALPN_AUTO: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A backend's response body: holds the HTTP/2 stream's place in its connection
/// until the body ends.
pub(crate) type UpstreamBody = Observed<Incoming, Slot>;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// What kind of failure an [`UpstreamError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No connection (refused, timeout, TLS handshake or ALPN failure).
    Connect,
    /// The backend refused the stream: not processed, safe to send again.
    Refused,
    /// The connection closed or reset before a response.
    Reset,
    /// A reused (pooled) HTTP/1.1 connection closed or reset before a response: most
    /// likely the backend closed it while idle as the request went out, which says
    /// nothing against the backend.
    Stale,
    /// Anything else (a malformed response, ...).
    Other,
}

/// A request that got no response from a backend.
#[derive(Debug)]
pub(crate) struct UpstreamError {
    failure: Failure,
    source: BoxError,
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(self.source.as_ref())
    }
}

impl UpstreamError {
    fn connect(source: impl Into<BoxError>) -> Self {
        Self {
            failure: Failure::Connect,
            source: source.into(),
        }
    }

    /// An error of hyper, classified.
    fn from_client(source: impl Into<BoxError>) -> Self {
        let source = source.into();
        let failure = classify(source.as_ref());
        Self { failure, source }
    }

    /// No connection could be made.
    pub(crate) fn is_connect(&self) -> bool {
        self.failure == Failure::Connect
    }

    /// The request was certainly not processed (any method may be sent again).
    pub(crate) fn is_refused(&self) -> bool {
        self.failure == Failure::Refused
    }

    /// The connection closed or was reset before the response (idempotent requests
    /// may be sent again).
    pub(crate) fn is_reset(&self) -> bool {
        matches!(
            self.failure,
            Failure::Reset | Failure::Refused | Failure::Stale
        )
    }

    /// A pooled connection failed as it was reused ([`Failure::Stale`]): an
    /// idempotent request may be sent again to the same backend.
    pub(crate) fn is_stale(&self) -> bool {
        self.failure == Failure::Stale
    }
}

/// The failure an error chain describes.
fn classify(e: &(dyn std::error::Error + 'static)) -> Failure {
    let mut source = Some(e);
    let mut reset = false;
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR))
            {
                return Failure::Refused;
            }
            if h2.is_io() || h2.is_reset() || h2.is_go_away() {
                reset = true;
            }
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                reset = true;
            }
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
            ) {
                reset = true;
            }
        }
        source = err.source();
    }
    if reset {
        Failure::Reset
    } else {
        Failure::Other
    }
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

/// A connection to a backend, in cleartext or TLS.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether ALPN selected `h2`.
    fn is_h2(&self) -> bool {
        match self {
            Self::Plain(_) => false,
            Self::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, data),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// TLS towards the backends: the settings and one client configuration per ALPN list.
struct TlsSide {
    cfg: BackendTlsConfig,
    /// ALPN `http/1.1` (the HTTP/1.1 pool, upgrades).
    h1: TlsConnector,
    /// ALPN `h2` (`h2`) or `h2, http/1.1` (`auto`).
    h2: TlsConnector,
}

/// Opens connections to backends: TCP (`TCP_NODELAY`), then TLS when set, all within
/// the connect timeout.
struct Dialer {
    connect_timeout: Duration,
    tls: Option<TlsSide>,
}

impl Dialer {
    /// Connect to `addr`; `h2_alpn`: offer the HTTP/2 ALPN list rather than `http/1.1`.
    async fn dial(&self, addr: SocketAddr, h2_alpn: bool) -> Result<Stream, UpstreamError> {
        let connect = async {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let Some(tls) = &self.tls else {
                return Ok::<_, io::Error>(Stream::Plain(tcp));
            };
            let name = tls::backend_server_name(&tls.cfg, addr);
            let connector = if h2_alpn { &tls.h2 } else { &tls.h1 };
            let s = connector.connect(name, tcp).await.map_err(|e| {
                io::Error::new(e.kind(), format!("TLS handshake with the backend: {e}"))
            })?;
            Ok(Stream::Tls(Box::new(s)))
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(UpstreamError::connect(e)),
            Err(_) => Err(UpstreamError::connect(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no connection within the connect timeout ({} ms)",
                    self.connect_timeout.as_millis()
                ),
            ))),
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP/2 pool
// ---------------------------------------------------------------------------

/// Streams of one HTTP/2 connection.
#[derive(Debug)]
struct Use {
    streams: AtomicUsize,
    /// The peer's `SETTINGS_MAX_CONCURRENT_STREAMS`, as last seen.
    peer_max: AtomicUsize,
    /// When the last stream ended, ms since the pool's epoch.
    last_ms: AtomicU64,
    epoch: Instant,
}

impl Use {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn cap(&self) -> usize {
        self.peer_max.load(Ordering::Relaxed).clamp(1, MAX_STREAMS)
    }
}

/// What a response body holds of its connection until it ends: an HTTP/2 stream's
/// place in its connection (given back when dropped: the body ends, or the request
/// fails), or an HTTP/1.1 connection, back to its pool when the body has been read to
/// its end (closed when it is dropped before).
#[derive(Debug, Default)]
pub(crate) struct Slot(Option<Held>);

#[derive(Debug)]
enum Held {
    H2(Arc<Use>),
    H1 {
        pool: Arc<H1Pool>,
        addr: SocketAddr,
        send: http1::SendRequest<Body>,
    },
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(Held::H2(u)) = self.0.take() {
            u.last_ms.store(u.now_ms(), Ordering::Relaxed);
            u.streams.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Observer for Slot {
    fn end(&mut self, complete: bool) {
        if complete && matches!(self.0, Some(Held::H1 { .. })) {
            if let Some(Held::H1 { pool, addr, send }) = self.0.take() {
                pool.put(addr, send);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 pool
// ---------------------------------------------------------------------------

/// An idle HTTP/1.1 connection.
#[derive(Debug)]
struct Idle {
    send: http1::SendRequest<Body>,
    since: Instant,
}

/// Idle HTTP/1.1 connections by backend (see the [module docs](self)). One per
/// upstream, that is per worker and service: its lock is never contended on the
/// request path (only the control plane, off the workers, shares the first one).
#[derive(Debug)]
pub(crate) struct H1Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    /// [`IDLE`] (shorter in tests).
    timeout: Duration,
    /// The pool's sweep task ([`sweep_h1`]), started on the runtime of the pool's first
    /// connection (again if that runtime has gone), stopped with the pool.
    sweeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Default for H1Pool {
    fn default() -> Self {
        Self::with_timeout(IDLE)
    }
}

impl Drop for H1Pool {
    fn drop(&mut self) {
        if let Some(task) = self
            .sweeper
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

impl H1Pool {
    fn with_timeout(timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            timeout,
            sweeper: Mutex::default(),
        }
    }

    /// Start the sweep task on the calling runtime unless it runs.
    fn ensure_sweeper(pool: &Arc<Self>) {
        let mut sweeper = pool.sweeper.lock().unwrap_or_else(PoisonError::into_inner);
        if sweeper
            .as_ref()
            .is_none_or(tokio::task::JoinHandle::is_finished)
        {
            *sweeper = Some(tokio::spawn(sweep_h1(Arc::downgrade(pool))));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection to `addr` that is open and not expired.
    fn take(&self, addr: SocketAddr) -> Option<http1::SendRequest<Body>> {
        let mut map = self.lock();
        let list = map.get_mut(&addr)?;
        while let Some(idle) = list.pop() {
            if !idle.send.is_closed() && idle.since.elapsed() < self.timeout {
                return Some(idle.send);
            }
        }
        None
    }

    /// `send`'s connection, its response read to the end, is idle again.
    fn put(&self, addr: SocketAddr, send: http1::SendRequest<Body>) {
        if send.is_closed() {
            return;
        }
        let mut map = self.lock();
        let list = map.entry(addr).or_default();
        if list.len() >= MAX_IDLE_H1 {
            list.retain(|i| !i.send.is_closed());
            if list.len() >= MAX_IDLE_H1 {
                return; // dropped: the connection closes
            }
        }
        list.push(Idle {
            send,
            since: Instant::now(),
        });
    }

    /// Close the connections idle for [`IDLE`] (their handles dropped, hyper ends
    /// them) and forget the closed ones.
    fn expire(&self) {
        let mut map = self.lock();
        map.retain(|_, list| {
            list.retain(|i| !i.send.is_closed() && i.since.elapsed() < self.timeout);
            !list.is_empty()
        });
    }

    /// Idle connections to `addr` (tests).
    #[cfg(test)]
    pub(crate) fn idle(&self, addr: SocketAddr) -> usize {
        self.lock()
            .get(&addr)
            .map_or(0, |l| l.iter().filter(|i| !i.send.is_closed()).count())
    }
}

/// Run one HTTP/1.1 connection to `addr` (upgrades included). Its task does nothing
/// else: it is polled on each of its reads and writes, a few times per request, so a
/// timer beside it would be polled as often ([`sweep_h1`] expires idle connections).
async fn drive_h1<T>(conn: http1::Connection<T, Body>, addr: SocketAddr)
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    if let Err(e) = conn.with_upgrades().await {
        debug!(backend = %addr, error = %e, "HTTP/1.1 connection to a backend ended with an error");
    }
}

/// Expire a pool's idle connections every [`IDLE`] / 6 (its timeout / 6) while the
/// pool lives: one task per pool (per worker and service), not one timer per
/// connection.
async fn sweep_h1(pool: std::sync::Weak<H1Pool>) {
    let every = pool.upgrade().map_or(IDLE, |p| p.timeout) / 6;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.expire(),
            None => return,
        }
    }
}

#[derive(Clone)]
struct H2Conn {
    id: u64,
    send: http2::SendRequest<Body>,
    usage: Arc<Use>,
}

/// One backend's HTTP/2 connections.
#[derive(Default)]
struct H2Backend {
    conns: Mutex<Vec<H2Conn>>,
    /// Held while a connection is being opened.
    dialing: tokio::sync::Mutex<()>,
}

impl H2Backend {
    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<H2Conn>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The least loaded open connection with a free stream (any open one with
    /// `full_ok`), its stream taken.
    fn pick(&self, full_ok: bool) -> Option<(http2::SendRequest<Body>, Slot)> {
        let mut conns = self.conns();
        conns.retain(|c| !c.send.is_closed());
        let c = conns
            .iter()
            .min_by_key(|c| c.usage.streams.load(Ordering::Acquire))?;
        if !full_ok && c.usage.streams.load(Ordering::Acquire) >= c.usage.cap() {
            return None;
        }
        c.usage.streams.fetch_add(1, Ordering::AcqRel);
        Some((c.send.clone(), Slot(Some(Held::H2(Arc::clone(&c.usage))))))
    }

    fn remove(&self, id: u64) {
        self.conns().retain(|c| c.id != id);
    }
}

/// What a new connection to an `auto` backend turned out to be.
enum Opened {
    H2(http2::SendRequest<Body>, Slot),
    /// The backend chose HTTP/1.1: this connection, for one request.
    H1(Stream),
}

// ---------------------------------------------------------------------------
// Upstream
// ---------------------------------------------------------------------------

/// How one service reaches its backends (see the [module docs](self)).
pub(crate) struct Upstream {
    protocol: BackendProtocol,
    dialer: Arc<Dialer>,
    h1: Arc<H1Pool>,
    h2: Mutex<HashMap<SocketAddr, Arc<H2Backend>>>,
    next_id: AtomicU64,
    /// `auto`: backends that chose HTTP/1.1, until when.
    learned_h1: Mutex<HashMap<SocketAddr, Instant>>,
    epoch: Instant,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("protocol", &self.protocol)
            .field("tls", &self.dialer.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The backend side of `cfg` (its `backend_protocol`, `backend_tls` and
    /// `http.connect_timeout_ms`).
    pub(crate) fn new(cfg: &ServiceConfig) -> Result<Self, TlsError> {
        let protocol = cfg.backend_protocol;
        let tls = match (&cfg.backend_tls, protocol) {
            (_, BackendProtocol::H2c) | (None, BackendProtocol::Http1) => None,
            (tls, _) => {
                let tls = tls.clone().unwrap_or_default();
                let h2_alpn = if protocol == BackendProtocol::Auto {
                    ALPN_AUTO
                } else {
                    ALPN_H2
                };
                Some(TlsSide {
                    h1: TlsConnector::from(tls::client_config(&tls, ALPN_H1)?),
                    h2: TlsConnector::from(tls::client_config(&tls, h2_alpn)?),
                    cfg: tls,
                })
            }
        };
        let dialer = Arc::new(Dialer {
            connect_timeout: Duration::from_millis(cfg.http.connect_timeout_ms),
            tls,
        });
        Ok(Self {
            protocol,
            dialer,
            h1: Arc::default(),
            h2: Mutex::default(),
            next_id: AtomicU64::new(0),
            learned_h1: Mutex::default(),
            epoch: Instant::now(),
        })
    }

    /// Whether requests may carry `TE: trailers` to the backends (HTTP/2 ones).
    pub(crate) fn passes_te(&self) -> bool {
        self.protocol != BackendProtocol::Http1
    }

    /// Send `req` (origin-form URI, `Host` set) to the backend at `addr`; the response
    /// head, or why there is none.
    pub(crate) async fn send(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        match self.protocol {
            BackendProtocol::Http1 => self.send_h1(addr, req).await,
            _ if upgrade => self.send_h1(addr, req).await,
            BackendProtocol::Auto if self.learned_h1(addr) => self.send_h1(addr, req).await,
            _ => self.send_h2(addr, req).await,
        }
    }

    fn learned_h1(&self, addr: SocketAddr) -> bool {
        let mut learned = self
            .learned_h1
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match learned.get(&addr) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                learned.remove(&addr);
                false
            }
            None => false,
        }
    }

    /// The HTTP/1.1 pool (tests).
    #[cfg(test)]
    pub(crate) fn h1_pool(&self) -> &H1Pool {
        &self.h1
    }

    /// With idle HTTP/1.1 connections closed after `timeout` (tests).
    #[cfg(test)]
    pub(crate) fn with_h1_idle_timeout(mut self, timeout: Duration) -> Self {
        self.h1 = Arc::new(H1Pool::with_timeout(timeout));
        self
    }

    /// Through the HTTP/1.1 pool: an idle connection to `addr`, else a new one.
    async fn send_h1(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (mut parts, body) = req.into_parts();
        if parts.uri.authority().is_some() {
            let path = parts
                .uri
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str);
            parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
        }
        parts.version = Version::HTTP_11;
        parts.headers.remove(TE);
        if !parts.headers.contains_key(HOST) {
            // HTTP/1.1 requires one (a client's HTTP/1.0 request may have none): the
            // backend's address, as hyper-util's client sets it.
            let host = if addr.port() == 80 {
                addr.ip().to_string()
            } else {
                addr.to_string()
            };
            if let Ok(v) = http::HeaderValue::from_str(&host) {
                parts.headers.insert(HOST, v);
            }
        }
        let upgrade = parts.headers.contains_key(http::header::UPGRADE);
        let mut req = Request::from_parts(parts, body);
        loop {
            let (mut send, reused) = match self.h1.take(addr) {
                Some(send) => (send, true),
                None => (self.connect_h1(addr).await?, false),
            };
            if reused && send.ready().await.is_err() {
                continue; // closed meanwhile: the next one
            }
            match send.try_send_request(req).await {
                Ok(resp) => {
                    // An upgraded connection is the tunnel's: never pooled.
                    let slot = Slot((!upgrade).then(|| Held::H1 {
                        pool: Arc::clone(&self.h1),
                        addr,
                        send,
                    }));
                    return Ok(resp.map(|b| Observed::new(b, slot)));
                }
                Err(mut e) => match e.take_message() {
                    // A pooled connection closed before taking the request (the
                    // backend closed it while idle): the request was not sent.
                    Some(back) if reused => {
                        debug!(backend = %addr, error = %e.error(), "pooled HTTP/1.1 connection closed before the request was sent; sending it again");
                        req = back;
                    }
                    _ => {
                        let mut err = UpstreamError::from_client(e.into_error());
                        if reused && err.failure == Failure::Reset {
                            err.failure = Failure::Stale;
                        }
                        return Err(err);
                    }
                },
            }
        }
    }

    /// A new HTTP/1.1 connection to `addr`, its task on the calling runtime (the
    /// worker's).
    async fn connect_h1(
        &self,
        addr: SocketAddr,
    ) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let stream = self.dialer.dial(addr, false).await?;
        let (send, conn) = http1::Builder::new()
            .handshake::<_, Body>(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError {
                failure: Failure::Connect,
                source: e.into(),
            })?;
        tokio::spawn(drive_h1(conn, addr));
        H1Pool::ensure_sweeper(&self.h1);
        Ok(send)
    }

    fn backend(&self, addr: SocketAddr) -> Arc<H2Backend> {
        let mut map = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(addr).or_default())
    }

    /// Over HTTP/2 (or, for an `auto` backend that chooses HTTP/1.1, over the new
    /// connection as HTTP/1.1).
    async fn send_h2(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let scheme = if self.dialer.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut req = h2_request(req, scheme, addr)?;
        let backend = self.backend(addr);
        for attempt in 0..2 {
            let (mut send, slot) = match backend.pick(false) {
                Some(picked) => picked,
                None => match self.open(addr, &backend).await? {
                    Opened::H2(send, slot) => (send, slot),
                    Opened::H1(stream) => return self.send_once_h1(addr, stream, req).await,
                },
            };
            match send.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|b| Observed::new(b, slot))),
                Err(mut e) => match e.take_message() {
                    // The connection closed before taking the request: once more, on
                    // another (or a new) connection.
                    Some(back) if attempt == 0 => {
                        debug!(backend = %addr, error = %e.error(), "HTTP/2 connection closed before the request was sent; sending it again");
                        req = back;
                    }
                    _ => return Err(UpstreamError::from_client(e.into_error())),
                },
            }
        }
        Err(UpstreamError {
            failure: Failure::Reset,
            source: "HTTP/2 connections to the backend closed before taking the request".into(),
        })
    }

    /// A stream on a new HTTP/2 connection to `addr` (or on one another request just
    /// opened), one connection being opened per backend at a time.
    async fn open(
        &self,
        addr: SocketAddr,
        backend: &Arc<H2Backend>,
    ) -> Result<Opened, UpstreamError> {
        let _dialing = backend.dialing.lock().await;
        if let Some((send, slot)) = backend.pick(false) {
            return Ok(Opened::H2(send, slot));
        }
        if backend.conns().len() >= MAX_CONNS {
            if let Some((send, slot)) = backend.pick(true) {
                return Ok(Opened::H2(send, slot));
            }
        }
        let stream = self.dialer.dial(addr, true).await?;
        if self.dialer.tls.is_some() && !stream.is_h2() {
            if self.protocol == BackendProtocol::Auto {
                debug!(backend = %addr, "backend chose HTTP/1.1 in ALPN");
                self.learned_h1
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(addr, Instant::now() + LEARN_TTL);
                return Ok(Opened::H1(stream));
            }
            return Err(UpstreamError::connect(format!(
                "backend {addr} did not select h2 in ALPN (backend_protocol = \"h2\")"
            )));
        }
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake::<_, Body>(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError {
                failure: Failure::Connect,
                source: e.into(),
            })?;
        let usage = Arc::new(Use {
            streams: AtomicUsize::new(1),
            peer_max: AtomicUsize::new(MAX_STREAMS),
            last_ms: AtomicU64::new(0),
            epoch: self.epoch,
        });
        usage.last_ms.store(usage.now_ms(), Ordering::Relaxed);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        backend.conns().push(H2Conn {
            id,
            send: send.clone(),
            usage: Arc::clone(&usage),
        });
        let slot = Slot(Some(Held::H2(Arc::clone(&usage))));
        tokio::spawn(drive(conn, Arc::clone(backend), id, usage, addr));
        Ok(Opened::H2(send, slot))
    }

    /// `req` (in HTTP/2 form) over `stream` as HTTP/1.1, the connection used once.
    async fn send_once_h1(
        &self,
        addr: SocketAddr,
        stream: Stream,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let (mut send, conn) = http1::Builder::new()
            .handshake::<_, Body>(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError {
                failure: Failure::Connect,
                source: e.into(),
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(backend = %addr, error = %e, "HTTP/1.1 connection ended with an error");
            }
        });
        let (mut parts, body) = req.into_parts();
        if let Some(authority) = parts.uri.authority() {
            if let Ok(v) = http::HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(HOST, v);
            }
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str)
            .to_owned();
        parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
        parts.version = Version::HTTP_11;
        parts.headers.remove(TE);
        let resp = send
            .send_request(Request::from_parts(parts, body))
            .await
            .map_err(UpstreamError::from_client)?;
        Ok(resp.map(|b| Observed::new(b, Slot::default())))
    }
}

// ---------------------------------------------------------------------------
// Health checks
// ---------------------------------------------------------------------------

/// An `http` health check of a backend spoken to in HTTP/2 or over TLS: a `GET` of
/// `health.path` (`Host` / `:authority`: `health.host`, else the backend's address) on
/// a new connection each time, in the service's backend protocol (`auto`: what ALPN
/// gives); the status, then at most [`crate::health::MAX_BODY_BYTES`] of body read. The
/// caller bounds it with the check's timeout.
#[derive(Debug)]
pub(crate) struct Checker {
    protocol: BackendProtocol,
    /// The dialer, or why the TLS settings could not be loaded.
    dialer: Result<Dialer, String>,
    path: String,
    host: String,
    expect: (u16, u16),
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Checker {
    pub(crate) fn new(
        config: &crate::config::HealthConfig,
        addr: SocketAddr,
        speaks: &crate::health::Speaks,
    ) -> Self {
        let protocol = speaks.protocol;
        let tls = match (&speaks.tls, protocol) {
            (_, BackendProtocol::H2c) | (None, BackendProtocol::Http1) => Ok(None),
            (tls, _) => {
                let tls = tls.clone().unwrap_or_default();
                let h2_alpn = if protocol == BackendProtocol::Auto {
                    ALPN_AUTO
                } else {
                    ALPN_H2
                };
                tls::client_config(&tls, ALPN_H1)
                    .and_then(|h1| Ok((h1, tls::client_config(&tls, h2_alpn)?)))
                    .map(|(h1, h2)| {
                        Some(TlsSide {
                            h1: TlsConnector::from(h1),
                            h2: TlsConnector::from(h2),
                            cfg: tls,
                        })
                    })
                    .map_err(|e| e.to_string())
            }
        };
        let path = if config.path.is_empty() {
            "/".to_owned()
        } else {
            config.path.clone()
        };
        Self {
            protocol,
            // The check's own timeout bounds the whole check.
            dialer: tls.map(|tls| Dialer {
                connect_timeout: Duration::from_secs(3600),
                tls,
            }),
            path,
            host: config.host.clone().unwrap_or_else(|| addr.to_string()),
            expect: config.expect_status,
        }
    }

    /// The accepted statuses, inclusive.
    pub(crate) fn expect(&self) -> (u16, u16) {
        self.expect
    }

    /// The status the backend at `addr` answers with, or why there is none.
    pub(crate) async fn status(&self, addr: SocketAddr) -> Result<u16, String> {
        let dialer = self.dialer.as_ref().map_err(Clone::clone)?;
        let h2_alpn = self.protocol != BackendProtocol::Http1;
        let stream = dialer
            .dial(addr, h2_alpn)
            .await
            .map_err(|e| format!("connect failed: {e}"))?;
        let h2 = match self.protocol {
            BackendProtocol::Http1 => false,
            BackendProtocol::H2c => true,
            BackendProtocol::Auto => stream.is_h2(),
            BackendProtocol::H2 if stream.is_h2() => true,
            BackendProtocol::H2 => return Err("backend did not select h2 in ALPN".to_owned()),
        };
        let builder = Request::get(&self.path).header(http::header::USER_AGENT, "xdplb-health");
        let resp = if h2 {
            let scheme = if dialer.tls.is_some() {
                "https"
            } else {
                "http"
            };
            let uri = format!("{scheme}://{}{}", self.host, self.path);
            let req = builder
                .uri(uri)
                .version(Version::HTTP_2)
                .body(crate::l7::body::empty())
                .map_err(|e| format!("bad request: {e}"))?;
            let (mut send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP/2 handshake failed: {e}"))?;
            tokio::spawn(conn);
            send.send_request(req).await
        } else {
            let req = builder
                .header(HOST, &self.host)
                .header(http::header::CONNECTION, "close")
                .body(crate::l7::body::empty())
                .map_err(|e| format!("bad request: {e}"))?;
            let (mut send, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake failed: {e}"))?;
            tokio::spawn(conn);
            send.send_request(req).await
        }
        .map_err(|e| format!("request failed: {}", root(&e)))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut read = 0;
        while read < crate::health::MAX_BODY_BYTES {
            match http_body_util::BodyExt::frame(&mut body).await {
                Some(Ok(f)) => read += f.data_ref().map_or(0, bytes::Bytes::len),
                // The status is what counts; a body cut short does not change it.
                Some(Err(_)) | None => break,
            }
        }
        Ok(status)
    }
}

fn root(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// Run one HTTP/2 connection: note the peer's stream limit as it changes, close it
/// after [`IDLE`] without a stream, and take it out of the pool when it ends.
async fn drive<T>(
    conn: http2::Connection<T, Body, TokioExecutor>,
    backend: Arc<H2Backend>,
    id: u64,
    usage: Arc<Use>,
    addr: SocketAddr,
) where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut conn = std::pin::pin!(conn);
    let mut tick = tokio::time::interval(IDLE / 6);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let polled = std::future::poll_fn(|cx| {
            let r = conn.as_mut().poll(cx);
            usage
                .peer_max
                .store(conn.current_max_send_streams(), Ordering::Relaxed);
            r
        });
        tokio::select! {
            r = polled => {
                if let Err(e) = r {
                    debug!(backend = %addr, error = %e, "HTTP/2 connection to a backend ended with an error");
                }
                break;
            }
            _ = tick.tick() => {
                let idle_ms = usage.now_ms().saturating_sub(usage.last_ms.load(Ordering::Relaxed));
                if usage.streams.load(Ordering::Acquire) == 0 && idle_ms >= u64::try_from(IDLE.as_millis()).unwrap_or(u64::MAX) {
                    // Without the pool's handle the connection ends (GOAWAY) once
                    // nothing uses it.
                    backend.remove(id);
                }
            }
        }
    }
    backend.remove(id);
}

/// `req` as an HTTP/2 request: absolute URI with the `Host` as `:authority` (see the
/// [module docs](self)).
fn h2_request(
    req: Request<Body>,
    scheme: &str,
    addr: SocketAddr,
) -> Result<Request<Body>, UpstreamError> {
    let (mut parts, body) = req.into_parts();
    let host = parts
        .headers
        .remove(HOST)
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
        .map_or_else(|| addr.to_string(), |a| a.as_str().to_owned());
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    parts.uri = Uri::try_from(format!("{scheme}://{host}{path}"))
        .map_err(|e| UpstreamError::connect(format!("cannot build the request URI: {e}")))?;
    parts.version = Version::HTTP_2;
    // Only `TE: trailers` may go to an h2 backend (RFC 9113 §8.2.2).
    if parts.headers.get(TE).is_some_and(|v| v != "trailers") {
        parts.headers.remove(TE);
    }
    Ok(Request::from_parts(parts, body))
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn h2_requests_carry_host_as_authority() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let req = Request::get("/a?b=1")
            .header("host", "web.example:8443")
            .header("te", "trailers")
            .header("x", "1")
            .body(crate::l7::body::empty())
            .expect("req");
        let r = h2_request(req, "https", addr).expect("h2");
        assert_eq!(r.uri().to_string(), "https://web.example:8443/a?b=1");
        assert_eq!(r.version(), Version::HTTP_2);
        assert!(r.headers().get(HOST).is_none());
        assert_eq!(r.headers()["te"], "trailers");
        assert_eq!(r.headers()["x"], "1");

        let req = Request::get("/")
            .body(crate::l7::body::empty())
            .expect("req");
        let r = h2_request(req, "http", addr).expect("h2");
        assert_eq!(r.uri().to_string(), "http://127.0.0.1:8080/");
    }

    #[test]
    fn refused_streams_and_graceful_goaway_are_safe_to_send_again() {
        let refused = h2::Error::from(h2::Reason::REFUSED_STREAM);
        assert_eq!(classify(&refused), Failure::Refused);
        let cancel = h2::Error::from(h2::Reason::CANCEL);
        assert_eq!(classify(&cancel), Failure::Other);
        let io = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(classify(&io), Failure::Reset);
        let e = UpstreamError::connect("x");
        assert!(e.is_connect() && !e.is_reset() && !e.is_refused());
    }
}
