//! The client side of an L7 service: the accept loop, each connection's TLS handshake
//! and HTTP serving, its timeouts, and graceful shutdown.
//!
//! Each accepted connection is handed to one of the L7 workers (the least loaded; see
//! [`super::workers`]) and served there to its end.
//!
//! Per connection ([`serve_connection`]):
//! 1. `TCP_NODELAY`; with TLS, the handshake under `header_timeout_ms` (ALPN picks
//!    `h2` or `http/1.1`).
//! 2. hyper-util's `auto` builder serves HTTP/1.1 (keep-alive, pipelining) or HTTP/2
//!    (prior knowledge on cleartext, "h2c"; ALPN on TLS), with upgrades enabled. The
//!    requests go to [`proxy::handle`].
//! 3. The header and idle timeouts of [`super::conn::TimedIo`] (see [`super::conn`]): a request head
//!    must arrive within `header_timeout_ms` (else `408`), an idle connection closes
//!    after `idle_timeout_ms`; HTTP/2 also pings the client every `idle_timeout_ms`
//!    and drops it when the ack takes longer than `header_timeout_ms` (hyper's
//!    keep-alive).
//!
//!    hyper's own `header_read_timeout` is turned off: in hyper 1.x it starts when the
//!    connection starts waiting for a head, idle keep-alive time included (so it would
//!    cap the idle timeout), and on expiry hyper closes the connection without writing
//!    anything (`hyper::Error` "read header from client timeout"; no 408).
//!    With `half_close`, a client that sends a request and shuts down its write side
//!    still gets the response.
//! 4. Limits: hyper refuses an HTTP/1 head with more than `max_headers` fields or
//!    larger than `max(max_header_bytes, 8192)` bytes with its own `431`; h2 refuses
//!    header lists above `max_header_bytes + 32 * max_headers` (its own size measure
//!    adds 32 bytes per field); [`proxy::handle`] checks both limits exactly for
//!    every request, HTTP/1 and HTTP/2. The bare answers hyper's HTTP/1 parser writes
//!    itself (400, 414, 431: no body) are replaced on the way out by
//!    [`TimedIo`]'s parse-error hook with the shape of the proxy's own errors
//!    ([`proxy::parse_error_response`]).
//!
//! Shutdown ([`Server::shutdown`]) drains without failing a request: the accept loop
//! stops (its listener is shared: when a successor serves the same socket, after a
//! settings change or a hand-off to a new agent, connections waiting in the backlog
//! go to the successor; otherwise the listener closes with the last holder), and
//! every connection is told to finish: HTTP/2 gets GOAWAY (the client retries the
//! streams the server did not take); HTTP/1 answers its current or next request with
//! `Connection: close` and then closes (as HAProxy's `idle-close-on-response`: an idle
//! keep-alive connection is not closed under a client that may be sending a request
//! at that moment). Tunnels keep running. After all are done, or after the grace
//! period, whatever remains is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tracing::instrument::WithSubscriber;
use tracing::{debug, warn};

use crate::l7::conn::{
    ConnActivity, ConnInfo, ParseErrorHook, ResponseTimer, TimedIo, stopped, when_woken,
};
use crate::l7::proxy::{self, Proxy};
use crate::l7::workers;

// ---------------------------------------------------------------------------
// Connections
// ---------------------------------------------------------------------------

/// The hyper builder for one service's connections.
/// hyper's own limit of HTTP/1 request header fields. Set explicitly (even to this
/// value), hyper builds its two field arrays of that size element by element on every
/// request (its docs: "a performance drop of about 5%"); left unset, it uses fixed
/// arrays of this size with the same limit (431 above it).
const HYPER_MAX_HEADERS: usize = 100;

fn builder(proxy: &Proxy) -> auto::Builder<TokioExecutor> {
    let http = &proxy.http;
    let header = Duration::from_millis(http.header_timeout_ms);
    let idle = Duration::from_millis(http.idle_timeout_ms);
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // A client may send its request and shut its write side (`shutdown(SHUT_WR)`,
        // `Connection: close`): it still gets its response.
        .half_close(true)
        .header_read_timeout(None)
        .max_buf_size(usize::try_from(http.max_header_bytes).map_or(usize::MAX, |n| n.max(8192)));
    let max_headers = usize::try_from(http.max_headers).unwrap_or(usize::MAX);
    if max_headers != HYPER_MAX_HEADERS {
        b.http1().max_headers(max_headers);
    }
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
    watcher: watch::Receiver<bool>,
) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%client, error = %e, "TCP_NODELAY");
    }
    let header = Duration::from_millis(proxy.http.header_timeout_ms);
    let idle = Duration::from_millis(proxy.http.idle_timeout_ms);
    let service = proxy.name.clone();
    let hook_proxy = Arc::clone(&proxy);
    let parse_error: ParseErrorHook = Arc::new(move |status| {
        proxy::parse_error_response(status, &hook_proxy.name, &hook_proxy.http)
    });
    match tls {
        None => {
            let activity = ConnActivity::new(false);
            let io = TimedIo::new(stream, Arc::clone(&activity), header, idle, parse_error);
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
            let io = TimedIo::new(tls_stream, Arc::clone(&activity), header, idle, parse_error);
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
    mut drain: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let info = Arc::new(ConnInfo {
        client,
        client_value: crate::l7::headers::client_value(client.ip()),
        tls,
        activity: Arc::clone(&activity),
        timer: ResponseTimer::default(),
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
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => r,
        () = when_woken(stopped(&mut drain)) => {
            // HTTP/2: GOAWAY. HTTP/1: the proxy closes after the next response
            // (`Connection: close`, see the module docs).
            if activity.is_h2() {
                conn.as_mut().graceful_shutdown();
            }
            conn.await
        }
    };
    if let Err(e) = ended {
        debug!(%service, %client, error = %e, "connection ended with an error");
    }
}

// ---------------------------------------------------------------------------
// Accept loop
// ---------------------------------------------------------------------------

/// A running accept loop.
#[derive(Debug)]
pub(crate) struct Server {
    stop: watch::Sender<Option<Duration>>,
    /// Set when a successor serves the shared listener: stop accepting at once (the
    /// drain starts with [`Server::shutdown`]).
    pause: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Serve `listener` for `proxy` (TLS when `tls` is set). The listener may be shared
    /// with another server (a predecessor that is draining).
    pub(crate) fn spawn(
        listener: Arc<TcpListener>,
        proxy: Arc<Proxy>,
        tls: Option<TlsAcceptor>,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(None);
        let (pause, pause_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, proxy, tls, stop_rx, pause_rx));
        Self {
            stop,
            pause,
            task: Some(task),
        }
    }

    /// Stop accepting now, before [`Server::shutdown`] runs: called when a successor
    /// has started on the shared listener, so that every connection accepted from then
    /// on gets the successor's settings. Connections already accepted go on.
    pub(crate) fn stop_accepting(&self) {
        self.pause.send_replace(true);
    }

    /// Stop accepting, let in-flight requests finish within `grace` (draining as the
    /// [module docs](self) say), then close all.
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
    listener: Arc<TcpListener>,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<Option<Duration>>,
    mut pause: watch::Receiver<bool>,
) {
    let builder = Arc::new(builder(&proxy));
    // Tells every connection to finish (see the module docs).
    let (drain, _) = watch::channel(false);
    // Connections; the proxy's `tunnels` tracks upgraded tunnels.
    let conns = TaskTracker::new();
    loop {
        tokio::select! {
            // Stop signals first: once paused, not one more connection is taken.
            biased;
            _ = stop.changed() => break,
            () = async { drop(pause.wait_for(|p| *p).await) } => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, client)) => {
                    // The connection lives on one worker from here on (see
                    // `super::workers`): its socket moves to that worker's reactor.
                    let stream = match stream.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            debug!(service = %proxy.name, %client, error = %e, "accepted connection lost");
                            continue;
                        }
                    };
                    let place = workers::get().place();
                    let watcher = drain.subscribe();
                    let mut hard = proxy.hard_stop.subscribe();
                    let proxy = Arc::clone(&proxy);
                    let tls = tls.clone();
                    let builder = Arc::clone(&builder);
                    let handle = place.handle().clone();
                    let serve = async move {
                        let _place = place;
                        let stream = match TcpStream::from_std(stream) {
                            Ok(s) => s,
                            Err(e) => {
                                debug!(service = %proxy.name, %client, error = %e, "cannot serve the connection on its worker");
                                return;
                            }
                        };
                        let fut = serve_connection(stream, client, proxy, tls, builder, watcher);
                        tokio::select! {
                            () = fut => {}
                            () = stopped(&mut hard) => {}
                        }
                    };
                    // The worker logs to the subscriber in force where the service
                    // accepts: in the agent the global one (`logging::init`), which the
                    // worker has anyway; elsewhere (a test's scoped subscriber) it is
                    // carried along, at the price of setting it on every poll.
                    if crate::logging::dropped_lines().is_some() {
                        conns.spawn_on(serve, &handle);
                    } else {
                        conns.spawn_on(WithSubscriber::with_current_subscriber(serve), &handle);
                    }
                }
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    warn!(service = %proxy.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
    drop(listener);
    // Paused: the accepted connections go on until `shutdown` names the grace period
    // (or the server is dropped: stop at once).
    let grace = match stop.wait_for(Option::is_some).await {
        Ok(g) => (*g).unwrap_or_default(),
        Err(_) => Duration::ZERO,
    };
    debug!(service = %proxy.name, ?grace, "L7 service shutting down");
    // Closed trackers: `wait` returns once no task is left (tunnels may still start
    // from requests in flight; they are waited for too).
    conns.close();
    proxy.tunnels.close();
    proxy
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    drain.send_replace(true);
    let drained = tokio::time::timeout(grace, async {
        conns.wait().await;
        proxy.tunnels.wait().await;
    })
    .await;
    if drained.is_err() {
        warn!(service = %proxy.name, ?grace, "grace period over: closing the remaining connections");
    }
    proxy.hard_stop.send_replace(true);
    conns.wait().await;
    proxy.tunnels.wait().await;
}
