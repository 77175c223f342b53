//! The client side of an L7 service: the accept loop, each connection's TLS handshake
//! and HTTP serving, its timeouts, and graceful shutdown.
//!
//! Per connection ([`serve_connection`]):
//! 1. `TCP_NODELAY`; with TLS, the handshake under `header_timeout_ms` (ALPN picks
//!    `h2` or `http/1.1`).
//! 2. hyper-util's `auto` builder serves HTTP/1.1 (keep-alive, pipelining) or HTTP/2
//!    (prior knowledge on cleartext, "h2c"; ALPN on TLS), with upgrades enabled. The
//!    requests go to [`proxy::handle`].
//! 3. Timeouts are enforced by [`TimedIo`], a wrapper around the connection's IO that
//!    knows, through [`ConnActivity`], whether a request is in flight:
//!    - *header timeout* (`header_timeout_ms`, slowloris): from the accept (or the end
//!      of the TLS handshake), and on a kept-alive HTTP/1 connection from the first
//!      byte of the next request, the whole request head must arrive in time. When it
//!      does not, the client gets `408 Request Timeout` (written by the wrapper,
//!      `Connection: close`) and the connection is closed.
//!    - *idle timeout* (`idle_timeout_ms`): a connection with no request in flight and
//!      no byte of a new one (HTTP/1), or no open stream (HTTP/2), for that long is
//!      closed. An upgraded (tunnelled) connection is closed after that long without a
//!      byte in either direction.
//!    - HTTP/2 also pings the client every `idle_timeout_ms` and drops it when the
//!      ack takes longer than `header_timeout_ms` (hyper's keep-alive).
//!
//!    hyper's own `header_read_timeout` is turned off: in hyper 1.x it starts when the
//!    connection starts waiting for a head, idle keep-alive time included (so it would
//!    cap the idle timeout), and on expiry hyper closes the connection without writing
//!    anything (`hyper::Error` "read header from client timeout"; no 408).
//! 4. Limits: hyper refuses an HTTP/1 head with more than `max_headers` fields or
//!    larger than `max(max_header_bytes, 8192)` bytes with its own `431`; h2 refuses
//!    header lists above `max_header_bytes + 32 * max_headers` (its own size measure
//!    adds 32 bytes per field); [`proxy::handle`] checks both limits exactly for
//!    every request, HTTP/1 and HTTP/2.
//!
//! Shutdown ([`Server::shutdown`]): the listener closes at once (new connections are
//! refused), every connection is told to finish (HTTP/1: close after the current
//! response, at once when idle; HTTP/2: GOAWAY), tunnels keep running; after all are
//! done, or after the grace period, whatever remains is dropped.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::l7::proxy::{self, Proxy};

/// The HTTP/2 connection preface, to tell h2c prior knowledge from HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Written to a client whose request head did not arrive within the header timeout.
const TIMEOUT_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

// ---------------------------------------------------------------------------
// Task tracking
// ---------------------------------------------------------------------------

/// Counts live tasks (connections, tunnels) so shutdown can wait for them.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    live: AtomicUsize,
    idle: Notify,
}

/// One live task of a [`Tracker`]; dropping it ends the task's count.
#[derive(Debug)]
pub(crate) struct TrackToken(Arc<Tracker>);

impl Tracker {
    pub(crate) fn token(self: &Arc<Self>) -> TrackToken {
        self.live.fetch_add(1, Ordering::SeqCst);
        TrackToken(Arc::clone(self))
    }

    /// Wait until no token is alive.
    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.live.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TrackToken {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

// ---------------------------------------------------------------------------
// Connection activity and timeouts
// ---------------------------------------------------------------------------

const NONE: u64 = u64::MAX;

/// What one client connection is doing, shared by its IO wrapper and its requests.
#[derive(Debug)]
pub(crate) struct ConnActivity {
    epoch: Instant,
    /// Requests whose response has not ended yet.
    in_flight: AtomicU32,
    /// When the last request ended (or the connection started), ms since `epoch`.
    last_ms: AtomicU64,
    /// When the head being read started, ms since `epoch`; `NONE` when not reading one.
    head_start_ms: AtomicU64,
    /// HTTP/2 (no head timer: streams are multiplexed).
    h2: AtomicBool,
    /// Upgraded: bytes in either direction count as activity.
    tunnel: AtomicBool,
    /// The reader's waker: the deadline moves when a request ends, and hyper does
    /// not poll a reader that has nothing to read.
    reader: AtomicWaker,
}

/// A request in flight; dropping it ends the request.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<ConnActivity>);

impl ConnActivity {
    fn new(h2: bool) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            last_ms: AtomicU64::new(0),
            head_start_ms: AtomicU64::new(if h2 { NONE } else { 0 }),
            h2: AtomicBool::new(h2),
            tunnel: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    /// A request head arrived: no head timer until it ends.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.head_start_ms.store(NONE, Ordering::SeqCst);
        InFlight(Arc::clone(self))
    }

    /// The connection was upgraded: from now on it is a byte tunnel.
    pub(crate) fn set_tunnel(&self) {
        self.tunnel.store(true, Ordering::SeqCst);
        self.last_ms.store(self.now_ms(), Ordering::SeqCst);
    }

    fn on_read(&self) {
        if self.tunnel.load(Ordering::Relaxed) {
            self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        } else if !self.h2.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::SeqCst) == 0
            && self.head_start_ms.load(Ordering::SeqCst) == NONE
        {
            self.head_start_ms.store(self.now_ms(), Ordering::SeqCst);
        }
    }

    fn on_write(&self) {
        if self.tunnel.load(Ordering::Relaxed) {
            self.last_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// When the connection times out, and whether that is a header timeout (408).
    fn deadline(&self, header: Duration, idle: Duration) -> Option<(Instant, bool)> {
        let at = |ms: u64, d: Duration| self.epoch + Duration::from_millis(ms) + d;
        if self.tunnel.load(Ordering::Relaxed) {
            return Some((at(self.last_ms.load(Ordering::Relaxed), idle), false));
        }
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        match self.head_start_ms.load(Ordering::SeqCst) {
            NONE => Some((at(self.last_ms.load(Ordering::SeqCst), idle), false)),
            start => Some((at(start, header), true)),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_ms.store(a.now_ms(), Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
        a.reader.wake();
    }
}

/// A client connection's IO with the header and idle timeouts of the
/// [module docs](self).
pub(crate) struct TimedIo<I> {
    inner: I,
    activity: Arc<ConnActivity>,
    sleep: Pin<Box<Sleep>>,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// Bytes of the h2 preface matched so far; `None` once decided.
    preface: Option<usize>,
}

impl<I> TimedIo<I> {
    fn new(inner: I, activity: Arc<ConnActivity>, header: Duration, idle: Duration) -> Self {
        let h2 = activity.h2.load(Ordering::Relaxed);
        Self {
            inner,
            activity,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            header_timeout: header,
            idle_timeout: idle,
            preface: (!h2).then_some(0),
        }
    }

    fn sniff_preface(&mut self, data: &[u8]) {
        let Some(seen) = self.preface else { return };
        let want = &H2_PREFACE[seen..];
        let n = want.len().min(data.len());
        if data[..n] != want[..n] {
            self.preface = None;
        } else if seen + n == H2_PREFACE.len() {
            self.preface = None;
            self.activity.h2.store(true, Ordering::SeqCst);
            self.activity.head_start_ms.store(NONE, Ordering::SeqCst);
        } else {
            self.preface = Some(seen + n);
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for TimedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.activity.reader.register(cx.waker());
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    if this.preface.is_some() {
                        let data = buf.filled()[before..].to_vec();
                        this.sniff_preface(&data);
                    }
                    this.activity.on_read();
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        let Some((deadline, head)) = this
            .activity
            .deadline(this.header_timeout, this.idle_timeout)
        else {
            return Poll::Pending;
        };
        if this.sleep.deadline() != deadline {
            this.sleep.as_mut().reset(deadline);
        }
        if this.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if head {
            // Best effort: the socket's send buffer is empty between requests.
            if let Poll::Ready(Ok(n)) = Pin::new(&mut this.inner).poll_write(cx, TIMEOUT_408) {
                debug!(bytes = n, "wrote 408 after the header timeout");
                let _ = Pin::new(&mut this.inner).poll_flush(cx);
            }
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not received within the header timeout",
            )))
        } else {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle for longer than the idle timeout",
            )))
        }
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TimedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_write();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.on_write();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

/// What a request knows about its connection.
#[derive(Debug)]
pub(crate) struct ConnInfo {
    /// The client's address.
    pub(crate) client: SocketAddr,
    /// Whether the connection is TLS.
    pub(crate) tls: bool,
    /// The connection's activity (timeouts).
    pub(crate) activity: Arc<ConnActivity>,
}

/// The hyper builder for one service's connections.
fn builder(proxy: &Proxy) -> auto::Builder<TokioExecutor> {
    let http = &proxy.http;
    let header = Duration::from_millis(http.header_timeout_ms);
    let idle = Duration::from_millis(http.idle_timeout_ms);
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(None)
        .max_headers(usize::try_from(http.max_headers).unwrap_or(usize::MAX))
        .max_buf_size(usize::try_from(http.max_header_bytes).map_or(usize::MAX, |n| n.max(8192)));
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(idle)
        .keep_alive_timeout(header)
        // h2 counts 32 bytes of overhead per field: leave the exact limit (and the
        // 431 naming it) to the proxy's check.
        .max_header_list_size(
            http.max_header_bytes
                .saturating_add(http.max_headers.saturating_mul(32)),
        );
    b
}

/// Serve one accepted connection until it ends.
async fn serve_connection(
    stream: TcpStream,
    client: SocketAddr,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%client, error = %e, "TCP_NODELAY");
    }
    let header = Duration::from_millis(proxy.http.header_timeout_ms);
    let idle = Duration::from_millis(proxy.http.idle_timeout_ms);
    let service = proxy.name.clone();
    match tls {
        None => {
            let activity = ConnActivity::new(false);
            let io = TimedIo::new(stream, Arc::clone(&activity), header, idle);
            run_http(io, client, false, activity, proxy, &builder, watcher).await;
        }
        Some(acceptor) => {
            let tls_stream = match tokio::time::timeout(header, acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%service, %client, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%service, %client, "TLS handshake timed out");
                    return;
                }
            };
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let activity = ConnActivity::new(h2);
            let io = TimedIo::new(tls_stream, Arc::clone(&activity), header, idle);
            run_http(io, client, true, activity, proxy, &builder, watcher).await;
        }
    }
}

async fn run_http<I>(
    io: TimedIo<I>,
    client: SocketAddr,
    tls: bool,
    activity: Arc<ConnActivity>,
    proxy: Arc<Proxy>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(ConnInfo {
        client,
        tls,
        activity,
    });
    let service = proxy.name.clone();
    let svc = service_fn(move |req| {
        // Taken when hyper hands over the head, before the handler first runs, so
        // the header timer cannot fire in between.
        let in_flight = info.activity.begin();
        let proxy = Arc::clone(&proxy);
        let info = Arc::clone(&info);
        async move { Ok::<_, Infallible>(proxy::handle(proxy, info, req, in_flight).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    if let Err(e) = watcher.watch(conn).await {
        debug!(%service, %client, error = %e, "connection ended with an error");
    }
}

// ---------------------------------------------------------------------------
// Accept loop
// ---------------------------------------------------------------------------

/// Resolves when the hard stop is set (or its sender is gone).
pub(crate) async fn stopped(hard: &mut watch::Receiver<bool>) {
    let _ = hard.wait_for(|s| *s).await;
}

/// A running accept loop.
#[derive(Debug)]
pub(crate) struct Server {
    stop: watch::Sender<Option<Duration>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Serve `listener` for `proxy` (TLS when `tls` is set).
    pub(crate) fn spawn(
        listener: TcpListener,
        proxy: Arc<Proxy>,
        tls: Option<TlsAcceptor>,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(None);
        let task = tokio::spawn(accept_loop(listener, proxy, tls, stop_rx));
        Self {
            stop,
            task: Some(task),
        }
    }

    /// Stop accepting, let in-flight requests finish within `grace`, then close all.
    pub(crate) async fn shutdown(mut self, grace: Duration) {
        self.stop.send_replace(Some(grace));
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                warn!(error = %e, "L7 accept loop failed");
            }
        }
    }
}

impl Drop for Server {
    /// A service dropped without [`Server::shutdown`] stops at once.
    fn drop(&mut self) {
        if self.task.is_some() {
            self.stop.send_replace(Some(Duration::ZERO));
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<Option<Duration>>,
) {
    let builder = Arc::new(builder(&proxy));
    let graceful = GracefulShutdown::new();
    let conns = Arc::new(Tracker::default());
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    let token = conns.token();
                    let watcher = graceful.watcher();
                    let mut hard = proxy.hard_stop.subscribe();
                    let fut = serve_connection(
                        stream,
                        client,
                        Arc::clone(&proxy),
                        tls.clone(),
                        Arc::clone(&builder),
                        watcher,
                    );
                    tokio::spawn(async move {
                        let _token = token;
                        tokio::select! {
                            () = fut => {}
                            () = stopped(&mut hard) => {}
                        }
                    });
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    warn!(service = %proxy.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    let grace = (*stop.borrow()).unwrap_or_default();
    drop(listener);
    debug!(service = %proxy.name, ?grace, "L7 service shutting down");
    let drained = tokio::time::timeout(grace, async {
        graceful.shutdown().await;
        conns.wait_idle().await;
        proxy.tunnels.wait_idle().await;
    })
    .await;
    if drained.is_err() {
        warn!(service = %proxy.name, ?grace, "grace period over: closing the remaining connections");
    }
    proxy.hard_stop.send_replace(true);
    conns.wait_idle().await;
    proxy.tunnels.wait_idle().await;
}
