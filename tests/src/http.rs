//! HTTP for namespace test beds: backends that count what they serve, and clients, on
//! hyper (the HTTP/1.1 implementation the agent uses too).
//!
//! The sockets are ours, the HTTP is hyper's: a test bed needs to know and choose the
//! TCP connection (which namespace it is made in, its local port, one connection per
//! request or one for many), so the client makes the `TcpStream` itself and hands it to
//! hyper's connection-level client; each call runs a single-threaded tokio runtime on
//! the calling thread, so the socket belongs to that thread's namespace.
//!
//! - [`HttpServer`] listens inside a namespace (on all addresses, so both a backend's
//!   LAN address and a VIP on its `lo` reach it), answers `GET /healthz` with `ok` and
//!   any other `GET` with a body naming the backend (`be1\n`, also in `X-Backend`;
//!   paths under `/cached/` with `Cache-Control: public, max-age=60,
//!   stale-if-error=300`), and counts what it served. [`HttpServer::start`] closes every
//!   connection after one answer; [`HttpServer::start_keep_alive`] keeps them open.
//! - [`get`] makes one request with `Connection: close` from the calling thread's
//!   namespace; [`run_load`] makes N of them from a namespace over a few threads, with
//!   an overall deadline, and reports successes, failures and which backend answered.
//! - For control-plane tests: [`connect_keep_alive`] and [`get_keep_alive`] (many
//!   requests on one connection); [`request`] (any method, headers and body, for REST
//!   APIs); [`get_from`] (a fixed client port, to reuse a 5-tuple on purpose).

use std::{
    collections::BTreeMap,
    future::Future,
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{
    Method, Request, StatusCode, body::Incoming, client::conn::http1::SendRequest, header,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::netns;

/// Connect, read and write timeout of one client request and one served connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections a keep-alive server serves at once.
pub const KEEP_ALIVE_MAX_CONNECTIONS: usize = 64;

/// Counters of an [`HttpServer`].
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    health: AtomicU64,
    errors: AtomicU64,
}

/// Runs `fut` to completion on a new single-threaded runtime on the calling thread:
/// sockets it creates belong to the calling thread's network namespace.
fn block_on<F: Future>(fut: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    Ok(rt.block_on(fut))
}

/// An HTTP server on a thread inside a namespace; stopped when dropped.
#[derive(Debug)]
pub struct HttpServer {
    name: String,
    addr: SocketAddr,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl HttpServer {
    /// Starts a server named `name` (the body of its answers) in namespace `ns`,
    /// listening on `addr` (typically `0.0.0.0:80`); it closes each connection after
    /// one answer (`Connection: close`). Returns once it is listening.
    pub fn start(ns: &str, addr: SocketAddr, name: &str) -> anyhow::Result<Self> {
        Self::start_with(ns, addr, name, false)
    }

    /// Like [`HttpServer::start`], but a connection may carry many requests (HTTP/1.1
    /// keep-alive): the server answers with `Connection: keep-alive` until the client
    /// sends `Connection: close` or closes. At most [`KEEP_ALIVE_MAX_CONNECTIONS`] are
    /// served at once (further ones are closed at once and counted as errors); stopping
    /// the server closes them within about 5 ms.
    pub fn start_keep_alive(ns: &str, addr: SocketAddr, name: &str) -> anyhow::Result<Self> {
        Self::start_with(ns, addr, name, true)
    }

    fn start_with(
        ns: &str,
        addr: SocketAddr,
        name: &str,
        keep_alive: bool,
    ) -> anyhow::Result<Self> {
        let listener = netns::in_netns(ns, move || {
            let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .with_context(|| format!("starting HTTP server {name} in {ns}"))?;
        Self::serve_on(listener, addr, name, keep_alive)
    }

    /// Serves on a bound, non-blocking listener from a new thread.
    fn serve_on(
        listener: TcpListener,
        addr: SocketAddr,
        name: &str,
        keep_alive: bool,
    ) -> anyhow::Result<Self> {
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (counters, stop, name) = (counters.clone(), stop.clone(), name.to_owned());
            thread::Builder::new()
                .name(format!("http-{name}"))
                .spawn(move || block_on(serve(listener, name, counters, stop, keep_alive))?)?
        };
        Ok(Self {
            name: name.to_owned(),
            addr,
            counters,
            stop,
            thread: Some(thread),
        })
    }

    /// The backend name this server answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests served other than `/healthz`.
    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    /// `/healthz` requests served.
    pub fn health_requests(&self) -> u64 {
        self.counters.health.load(Ordering::Relaxed)
    }

    /// Connections that ended in an error (timeout, malformed request, over the limit).
    pub fn errors(&self) -> u64 {
        self.counters.errors.load(Ordering::Relaxed)
    }

    /// Stops the server and returns its thread's result.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow!("HTTP server {} panicked", self.name))?,
            None => Ok(()),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The accept loop: notices `stop` within 5 ms; a task per connection. Returning drops
/// the runtime, which ends the connection tasks and closes their sockets.
async fn serve(
    listener: TcpListener,
    name: String,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    keep_alive: bool,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let name: Arc<str> = name.into();
    let open = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = tokio::time::sleep(Duration::from_millis(5)) => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("accept"),
        };
        if keep_alive && open.load(Ordering::Relaxed) >= KEEP_ALIVE_MAX_CONNECTIONS {
            drop(stream);
            counters.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (name, counters, open) = (name.clone(), counters.clone(), open.clone());
        tokio::spawn(async move {
            let service = {
                let (name, counters) = (name.clone(), counters.clone());
                service_fn(move |req| {
                    let answer = answer(&req, &name, &counters, keep_alive);
                    async move { Ok::<_, std::convert::Infallible>(answer) }
                })
            };
            let served = hyper::server::conn::http1::Builder::new()
                .keep_alive(keep_alive)
                .timer(TokioTimer::new())
                .header_read_timeout(IO_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if served.is_err() {
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    Ok(())
}

/// The answer to one request (see the module docs), counted.
fn answer(
    req: &Request<Incoming>,
    name: &str,
    counters: &Counters,
    keep_alive: bool,
) -> hyper::Response<Full<Bytes>> {
    let path = req.uri().path();
    let (status, body) = match (req.method(), path) {
        (&Method::GET, "/healthz") => {
            counters.health.fetch_add(1, Ordering::Relaxed);
            (StatusCode::OK, "ok\n".to_owned())
        }
        (&Method::GET, _) => {
            counters.requests.fetch_add(1, Ordering::Relaxed);
            (StatusCode::OK, format!("{name}\n"))
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, "only GET\n".to_owned()),
    };
    let client_closes = req
        .headers()
        .get(header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let connection = if keep_alive && !client_closes {
        "keep-alive"
    } else {
        "close"
    };
    let mut response = hyper::Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .header("x-backend", name)
        .header(header::CONNECTION, connection);
    // Paths under /cached/ may be stored for a minute by a shared cache and served stale
    // for five minutes when the backends fail.
    if path.starts_with("/cached/") {
        response = response.header(
            header::CACHE_CONTROL,
            "public, max-age=60, stale-if-error=300",
        );
    }
    response
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

/// A parsed HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (decoded if it was chunked).
    pub body: String,
    /// The client's local address of the connection.
    pub local: SocketAddr,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The backend that answered: the first line of the body.
    pub fn backend(&self) -> &str {
        self.body.lines().next().unwrap_or_default()
    }
}

/// A request to `peer`: `Host`, `User-Agent: xdplb-tests`, `Connection` (`close` or
/// `keep-alive`), the given header fields, and a body (with its `Content-Length`).
fn build_request(
    peer: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    close: bool,
) -> anyhow::Result<Request<Full<Bytes>>> {
    let mut req = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).with_context(|| format!("method {method}"))?)
        .uri(path)
        .header(header::HOST, peer.to_string())
        .header(header::USER_AGENT, "xdplb-tests")
        .header(
            header::CONNECTION,
            if close { "close" } else { "keep-alive" },
        );
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    if let Some(b) = body {
        req = req.header(header::CONTENT_LENGTH, b.len());
    }
    let body = Full::new(Bytes::from(body.unwrap_or_default().to_owned()));
    Ok(req.body(body)?)
}

/// Sends `req` on an open connection and reads the whole answer, bounded by `timeout`.
async fn exchange(
    sender: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    local: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let read = async {
        sender
            .ready()
            .await
            .with_context(|| format!("connection {local} closed"))?;
        let resp = sender
            .send_request(req)
            .await
            .with_context(|| format!("request on {local}"))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter(|(n, _)| *n != header::TRANSFER_ENCODING)
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).trim().to_owned(),
                )
            })
            .collect();
        let body = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("response body on {local}"))?
            .to_bytes();
        anyhow::Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            local,
        })
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| anyhow!("no complete response on {local} within {timeout:?}"))?
}

/// HTTP/1.1 over a connected std stream: hyper's handshake on the current runtime, its
/// connection driven by a task.
async fn handshake(stream: TcpStream) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    stream.set_nonblocking(true)?;
    let io = TokioIo::new(tokio::net::TcpStream::from_std(stream)?);
    let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request on a fresh connection `stream`, with `Connection: close`.
fn once(
    stream: TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let local = stream.local_addr()?;
    let req = build_request(stream.peer_addr()?, method, path, headers, body, true)?;
    block_on(async move {
        let mut sender = handshake(stream).await?;
        exchange(&mut sender, req, local, timeout).await
    })?
}

/// One `GET path` to `target` with `Connection: close` on a connection of its own, each
/// step bounded by `timeout`. Runs in the calling thread's namespace (call it inside
/// [`netns::in_netns`]).
pub fn get(target: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<Response> {
    let stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connect {target}"))?;
    once(stream, "GET", path, &[], None, timeout)
}

/// One request with any method, extra header fields and body to `target`, with
/// `Connection: close`, each step bounded by `timeout`; the whole answer is read
/// (a chunked body decoded). For REST APIs. Runs in the calling thread's namespace
/// (call it inside [`netns::in_netns`]).
pub fn request(
    target: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connect {target}"))?;
    once(stream, method, path, headers, body, timeout)
        .with_context(|| format!("{method} {path} on {target}"))
}

/// One REST call to `target` from inside namespace `ns`: `(status, body)`. A body is
/// sent as `Content-Type: application/json`; each step is bounded by `timeout`. The
/// agent APIs of the test beds (e2e_control, cluster_bed, ecmp_bed) all go through it.
pub fn json_call_in(
    ns: &str,
    target: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, String)> {
    let (m, p, body) = (method.to_owned(), path.to_owned(), body.map(str::to_owned));
    netns::in_netns(ns, move || {
        let headers: &[(&str, &str)] = if body.is_some() {
            &[("Content-Type", "application/json")]
        } else {
            &[]
        };
        let r = request(target, &m, &p, headers, body.as_deref(), timeout)?;
        Ok((r.status, r.body))
    })
}

/// Like [`get`], but from the given local IPv4 address and port (bound with
/// `SO_REUSEADDR`), so a test can reuse a connection's 5-tuple on purpose. Runs in the
/// calling thread's namespace (call it inside [`netns::in_netns`]).
pub fn get_from(
    local: SocketAddr,
    target: SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let stream = connect_from(local, target, timeout)
        .with_context(|| format!("connect {target} from {local}"))?;
    once(stream, "GET", path, &[], None, timeout)
}

/// A TCP connection from `local` to `target` (IPv4), the connect bounded by `timeout`.
fn connect_from(
    local: SocketAddr,
    target: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let (SocketAddr::V4(local), SocketAddr::V4(target)) = (local, target) else {
        bail!("get_from supports IPv4 only");
    };
    let sockaddr = |a: std::net::SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let last = || std::io::Error::last_os_error();
    // SAFETY: plain socket calls on a descriptor we own; every pointer passed points to
    // a live value of the size given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        ensure!(fd >= 0, "socket: {}", last());
        let fd = OwnedFd::from_raw_fd(fd);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let one: libc::c_int = 1;
        ensure!(
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0,
            "SO_REUSEADDR: {}",
            last()
        );
        // A blocking connect gives up after SO_SNDTIMEO.
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        ensure!(
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            ) == 0,
            "SO_SNDTIMEO: {}",
            last()
        );
        let l = sockaddr(local);
        ensure!(
            libc::bind(raw, (&raw const l).cast(), len) == 0,
            "bind {local}: {}",
            last()
        );
        let t = sockaddr(target);
        ensure!(
            libc::connect(raw, (&raw const t).cast(), len) == 0,
            "connect: {}",
            last()
        );
        Ok(TcpStream::from(fd))
    }
}

/// An open HTTP/1.1 connection for [`get_keep_alive`], made in a namespace; usable from
/// any thread.
pub struct KeepAliveConnection {
    runtime: tokio::runtime::Runtime,
    sender: SendRequest<Full<Bytes>>,
    local: SocketAddr,
    peer: SocketAddr,
    timeout: Duration,
}

impl std::fmt::Debug for KeepAliveConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeepAliveConnection({} -> {})", self.local, self.peer)
    }
}

/// Opens a connection to `target` from namespace `ns` for [`get_keep_alive`]; requests
/// on it are bounded by `timeout`.
pub fn connect_keep_alive(
    ns: &str,
    target: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<KeepAliveConnection> {
    let stream = netns::in_netns(ns, move || {
        TcpStream::connect_timeout(&target, timeout).with_context(|| format!("connect {target}"))
    })?;
    let local = stream.local_addr()?;
    // The connection's task runs whenever a request is made through this runtime.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a tokio runtime")?;
    let sender = runtime.block_on(handshake(stream))?;
    Ok(KeepAliveConnection {
        runtime,
        sender,
        local,
        peer: target,
        timeout,
    })
}

/// One `GET path` on an open connection, keeping it open (`Connection: keep-alive`).
pub fn get_keep_alive(conn: &mut KeepAliveConnection, path: &str) -> anyhow::Result<Response> {
    let req = build_request(conn.peer, "GET", path, &[], None, false)?;
    let (local, timeout) = (conn.local, conn.timeout);
    conn.runtime
        .block_on(exchange(&mut conn.sender, req, local, timeout))
}

/// What [`run_load`] observed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Requests asked for.
    pub requested: usize,
    /// Requests answered with status 200.
    pub ok: usize,
    /// Failed requests: (request number, error), at most [`MAX_FAILURES_KEPT`] kept.
    pub failures: Vec<(usize, String)>,
    /// All failed requests (including those not kept in `failures`).
    pub failed: usize,
    /// Requests not attempted because the deadline passed.
    pub not_attempted: usize,
    /// Successful answers per backend name.
    pub per_backend: BTreeMap<String, usize>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

/// How many failure messages a [`LoadReport`] keeps.
pub const MAX_FAILURES_KEPT: usize = 20;

impl LoadReport {
    /// Whether every requested connection succeeded.
    pub fn all_ok(&self) -> bool {
        self.ok == self.requested
    }
}

/// Makes `requests` sequential `GET /` connections to `target` from namespace `ns`,
/// spread over `parallel` threads, each request bounded by [`IO_TIMEOUT`] per step and
/// the whole run by `deadline` (requests not started by then count as not attempted).
pub fn run_load(
    ns: &str,
    target: SocketAddr,
    requests: usize,
    parallel: usize,
    deadline: Duration,
) -> anyhow::Result<LoadReport> {
    ensure!(parallel > 0, "parallel must be at least 1");
    let next = Arc::new(AtomicUsize::new(0));
    let end = Instant::now() + deadline;
    let start = Instant::now();
    let mut workers = Vec::new();
    for i in 0..parallel.min(requests.max(1)) {
        let next = next.clone();
        workers.push(netns::spawn_in_netns(
            ns,
            &format!("load-{i}"),
            move || {
                let mut mine = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= requests || Instant::now() > end {
                        break;
                    }
                    mine.push((n, get(target, "/", IO_TIMEOUT)));
                }
                Ok(mine)
            },
        )?);
    }
    let mut report = LoadReport {
        requested: requests,
        ..LoadReport::default()
    };
    let mut attempted = 0;
    for w in workers {
        let results = w.join().map_err(|_| anyhow!("load thread panicked"))??;
        for (n, result) in results {
            attempted += 1;
            match result {
                Ok(r) if r.status == 200 => {
                    report.ok += 1;
                    *report
                        .per_backend
                        .entry(r.backend().to_owned())
                        .or_default() += 1;
                }
                Ok(r) => {
                    report.record_failure(n, format!("status {} from {}", r.status, r.backend()))
                }
                Err(e) => report.record_failure(n, format!("{e:#}")),
            }
        }
    }
    report.not_attempted = requests - attempted;
    report.elapsed = start.elapsed();
    report.failures.sort();
    Ok(report)
}

impl LoadReport {
    fn record_failure(&mut self, n: usize, msg: String) {
        self.failed += 1;
        if self.failures.len() < MAX_FAILURES_KEPT {
            self.failures.push((n, msg));
        }
    }
}

/// Checks `target` answers `GET /` from namespace `ns` with status 200; returns the backend name.
pub fn probe(ns: &str, target: SocketAddr) -> anyhow::Result<String> {
    netns::in_netns(ns, move || {
        let r = get(target, "/", IO_TIMEOUT)?;
        if r.status != 200 {
            bail!("GET / on {target}: status {}", r.status);
        }
        Ok(r.backend().to_owned())
    })
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// Serves one connection on loopback with `raw` as the answer, byte for byte: the
    /// tests of malformed or chunked answers need exact wire bytes.
    fn raw_server(raw: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let mut head = Vec::new();
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "client closed early");
                head.extend_from_slice(&buf[..n]);
            }
            s.write_all(raw).unwrap();
        });
        addr
    }

    #[test]
    fn responses_parse() {
        let ok = raw_server(b"HTTP/1.1 200 OK\r\nX-Backend: be2\r\nContent-Length: 4\r\n\r\nbe2\n");
        let r = get(ok, "/", IO_TIMEOUT).unwrap();
        assert_eq!(
            (r.status, r.backend(), r.header("x-backend")),
            (200, "be2", Some("be2"))
        );
        let short = raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nbe2\n");
        assert!(
            get(short, "/", IO_TIMEOUT).is_err(),
            "a body shorter than its length"
        );
        assert!(get(raw_server(b"garbage"), "/", IO_TIMEOUT).is_err());
    }

    #[test]
    fn chunked_bodies_decode() {
        let chunked = raw_server(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        );
        let r = request(chunked, "GET", "/", &[], None, IO_TIMEOUT).unwrap();
        assert_eq!(r.body, "abcde");
        assert_eq!(r.header("transfer-encoding"), None);
        let cut = raw_server(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab");
        assert!(request(cut, "GET", "/", &[], None, IO_TIMEOUT).is_err());
    }

    fn loopback_server(name: &str, keep_alive: bool) -> HttpServer {
        // The caller's namespace, loopback only: no privileges needed.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        HttpServer::serve_on(listener, addr, name, keep_alive).unwrap()
    }

    #[test]
    fn keep_alive_server_and_clients_work_on_loopback() {
        let server = loopback_server("be8", true);
        let addr = server.addr();
        let stream = TcpStream::connect(addr).unwrap();
        let local = stream.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sender = runtime.block_on(handshake(stream)).unwrap();
        let mut conn = KeepAliveConnection {
            runtime,
            sender,
            local,
            peer: addr,
            timeout: IO_TIMEOUT,
        };
        for _ in 0..3 {
            let r = get_keep_alive(&mut conn, "/").unwrap();
            assert_eq!((r.status, r.backend(), r.local), (200, "be8", local));
            assert_eq!(r.header("connection"), Some("keep-alive"));
        }
        // Other connections are served while that one stays open.
        assert_eq!(get(addr, "/healthz", IO_TIMEOUT).unwrap().body, "ok\n");
        let r = request(addr, "POST", "/x", &[("X-A", "1")], Some("{}"), IO_TIMEOUT).unwrap();
        assert_eq!(r.status, 405);
        let from = SocketAddr::from(([127, 0, 0, 1], 0));
        assert_eq!(
            get_from(from, addr, "/", IO_TIMEOUT).unwrap().backend(),
            "be8"
        );
        assert_eq!(get_keep_alive(&mut conn, "/").unwrap().backend(), "be8");
        let cached = get(addr, "/cached/x", IO_TIMEOUT).unwrap();
        assert_eq!(
            cached.header("cache-control"),
            Some("public, max-age=60, stale-if-error=300")
        );
        assert_eq!(server.requests(), 6);
        assert_eq!(server.health_requests(), 1);
        server.stop().unwrap();
        assert!(
            get_keep_alive(&mut conn, "/").is_err(),
            "stopping the server closes its connections"
        );
    }

    #[test]
    fn server_and_load_work_on_loopback() {
        let server = loopback_server("be9", false);
        let addr = server.addr();
        let mut per_backend = BTreeMap::new();
        for _ in 0..5 {
            let r = get(addr, "/", IO_TIMEOUT).unwrap();
            assert_eq!(r.header("connection"), Some("close"));
            *per_backend.entry(r.backend().to_owned()).or_insert(0) += 1;
        }
        assert_eq!(get(addr, "/healthz", IO_TIMEOUT).unwrap().body, "ok\n");
        assert_eq!(per_backend, BTreeMap::from([("be9".to_owned(), 5)]));
        assert_eq!(server.requests(), 5);
        assert_eq!(server.health_requests(), 1);
        server.stop().unwrap();
        assert!(
            get(addr, "/", IO_TIMEOUT).is_err(),
            "stopped: nothing listens"
        );
    }
}
