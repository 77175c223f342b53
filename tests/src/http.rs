//! A tiny HTTP/1.1 server and load client on std threads, for namespace test beds.
//!
//! - [`HttpServer`] listens inside a namespace (on all addresses, so both a backend's
//!   LAN address and a VIP on its `lo` reach it), answers `GET /healthz` with `ok` and
//!   any other `GET` with a body naming the backend (`be1\n`, also in `X-Backend`;
//!   paths under `/cached/` with `Cache-Control: public, max-age=60,
//!   stale-if-error=300`), and counts what it served. One connection at a time, each bounded by timeouts.
//! - [`get`] makes one request with `Connection: close` from the calling thread's
//!   namespace; [`run_load`] makes N of them from a namespace over a few threads, with
//!   an overall deadline, and reports successes, failures and which backend answered.
//! - For control-plane tests: [`HttpServer::start_keep_alive`] (a thread per connection,
//!   many requests per connection) with [`connect_keep_alive`] and [`get_keep_alive`];
//!   [`request`] (any method, headers and body, for REST APIs); [`get_from`] (a fixed
//!   client port, to reuse a 5-tuple on purpose).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::netns;

/// Connect, read and write timeout of one client request and one served connection.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head or response the server and client accept.
const MAX_MESSAGE: usize = 64 * 1024;

/// Counters of an [`HttpServer`].
#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    health: AtomicU64,
    errors: AtomicU64,
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
    /// listening on `addr` (typically `0.0.0.0:80`). Returns once it is listening.
    pub fn start(ns: &str, addr: SocketAddr, name: &str) -> anyhow::Result<Self> {
        let listener = netns::in_netns(ns, move || {
            let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .with_context(|| format!("starting HTTP server {name} in {ns}"))?;
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (counters, stop, name) = (counters.clone(), stop.clone(), name.to_owned());
            thread::Builder::new()
                .name(format!("http-{name}"))
                .spawn(move || serve(&listener, &name, &counters, &stop))?
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

    /// Connections that ended in an error (timeout, malformed request).
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

impl HttpServer {
    /// Like [`HttpServer::start`], but each connection gets its own thread and may carry
    /// many requests (HTTP/1.1 keep-alive): the server answers with `Connection:
    /// keep-alive` until the client sends `Connection: close` or closes, or the
    /// connection idles for [`IO_TIMEOUT`]. At most [`KEEP_ALIVE_MAX_CONNECTIONS`] are
    /// served at once (further ones are closed at once and counted as errors); stopping
    /// the server ends them within about 50 ms.
    pub fn start_keep_alive(ns: &str, addr: SocketAddr, name: &str) -> anyhow::Result<Self> {
        let listener = netns::in_netns(ns, move || {
            let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .with_context(|| format!("starting keep-alive HTTP server {name} in {ns}"))?;
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (counters, stop, name) = (counters.clone(), stop.clone(), name.to_owned());
            thread::Builder::new()
                .name(format!("http-ka-{name}"))
                .spawn(move || serve_keep_alive(&listener, &name, &counters, &stop))?
        };
        Ok(Self {
            name: name.to_owned(),
            addr,
            counters,
            stop,
            thread: Some(thread),
        })
    }
}

/// Connections a keep-alive server serves at once.
pub const KEEP_ALIVE_MAX_CONNECTIONS: usize = 64;

/// The accept loop of [`HttpServer::start_keep_alive`]: a thread per connection.
fn serve_keep_alive(
    listener: &TcpListener,
    name: &str,
    counters: &Arc<Counters>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        conns.retain(|c| !c.is_finished());
        match listener.accept() {
            Ok((stream, _)) if conns.len() >= KEEP_ALIVE_MAX_CONNECTIONS => {
                drop(stream);
                counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            Ok((stream, _)) => {
                let (n, c, st) = (name.to_owned(), counters.clone(), stop.clone());
                let spawned = thread::Builder::new()
                    .name(format!("http-ka-{name}-conn"))
                    .spawn(move || {
                        if handle_keep_alive(stream, &n, &c, &st).is_err() {
                            c.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                match spawned {
                    Ok(c) => conns.push(c),
                    Err(_) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e).context("accept"),
        }
    };
    stop.store(true, Ordering::Relaxed);
    for c in conns {
        let _ = c.join();
    }
    result
}

/// Serves requests on one connection until the client closes or asks to, it idles
/// for [`IO_TIMEOUT`], or the server stops.
fn handle_keep_alive(
    mut stream: TcpStream,
    name: &str,
    counters: &Counters,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    // Short reads, so a stop is noticed; idleness is bounded separately.
    stream.set_read_timeout(Some(Duration::from_millis(50)))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let mut idle_since = Instant::now();
    loop {
        // One complete head in the buffer?
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            let mut lines = head.lines();
            let mut parts = lines.next().unwrap_or_default().split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let close = lines.any(|l| {
                l.split_once(':').is_some_and(|(n, v)| {
                    n.trim().eq_ignore_ascii_case("connection")
                        && v.trim().eq_ignore_ascii_case("close")
                })
            });
            let (status, body) = match (method, path) {
                ("GET", "/healthz") => {
                    counters.health.fetch_add(1, Ordering::Relaxed);
                    ("200 OK", "ok\n".to_owned())
                }
                ("GET", _) => {
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    ("200 OK", format!("{name}\n"))
                }
                _ => ("405 Method Not Allowed", "only GET\n".to_owned()),
            };
            let connection = if close { "close" } else { "keep-alive" };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Backend: {name}\r\n\
                 {}Connection: {connection}\r\n\r\n{body}",
                body.len(),
                cache_headers(path)
            );
            stream.write_all(response.as_bytes())?;
            if close {
                let _ = stream.shutdown(Shutdown::Write);
                return Ok(());
            }
            idle_since = Instant::now();
            continue;
        }
        ensure!(buf.len() < MAX_MESSAGE, "request head too long");
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        ensure!(
            idle_since.elapsed() < IO_TIMEOUT,
            "connection idle for {IO_TIMEOUT:?}"
        );
        match stream.read(&mut chunk) {
            Ok(0) => {
                ensure!(buf.is_empty(), "connection closed within a request head");
                return Ok(());
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e).context("read"),
        }
    }
}

/// The accept loop: polls a non-blocking listener so it notices `stop` within 5 ms.
fn serve(
    listener: &TcpListener,
    name: &str,
    counters: &Counters,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if handle(stream, name, counters).is_err() {
                    counters.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("accept"),
        }
    }
    Ok(())
}

fn handle(mut stream: TcpStream, name: &str, counters: &Counters) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let head = read_head(&mut stream)?;
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (status, body) = match (method, path) {
        ("GET", "/healthz") => {
            counters.health.fetch_add(1, Ordering::Relaxed);
            ("200 OK", "ok\n".to_owned())
        }
        ("GET", _) => {
            counters.requests.fetch_add(1, Ordering::Relaxed);
            ("200 OK", format!("{name}\n"))
        }
        _ => ("405 Method Not Allowed", "only GET\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Backend: {name}\r\n\
         {}Connection: close\r\n\r\n{body}",
        body.len(),
        cache_headers(path)
    );
    stream.write_all(response.as_bytes())?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// Caching headers of an answer: paths under `/cached/` may be stored for a minute by
/// a shared cache and served stale for five minutes when the backends fail.
fn cache_headers(path: &str) -> &'static str {
    if path.starts_with("/cached/") {
        "Cache-Control: public, max-age=60, stale-if-error=300\r\n"
    } else {
        ""
    }
}

/// Reads up to the end of the request head (`\r\n\r\n`).
fn read_head(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        ensure!(buf.len() < MAX_MESSAGE, "request head too long");
        let n = stream.read(&mut chunk)?;
        ensure!(n > 0, "connection closed before the request head ended");
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A parsed HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body (everything after the head).
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

/// One `GET path` to `target` with `Connection: close`, each step bounded by `timeout`.
/// Runs in the calling thread's namespace (call it inside [`netns::in_netns`]).
pub fn get(target: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connect {target}"))?;
    let local = stream.local_addr()?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: xdplb-tests\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("send from {local}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .with_context(|| format!("read on {local}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        ensure!(
            raw.len() <= MAX_MESSAGE,
            "response longer than {MAX_MESSAGE} bytes"
        );
    }
    parse_response(&raw, local).with_context(|| format!("response on {local}"))
}

/// One request with any method, extra header fields and body to `target`, with
/// `Connection: close`, each step bounded by `timeout`; the whole answer is read
/// (a `Transfer-Encoding: chunked` body is decoded). For REST APIs. Runs in the calling
/// thread's namespace (call it inside [`netns::in_netns`]).
pub fn request(
    target: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connect {target}"))?;
    let local = stream.local_addr()?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: xdplb-tests\r\nConnection: close\r\n"
    );
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    if let Some(b) = body {
        req.push_str(b);
    }
    stream
        .write_all(req.as_bytes())
        .with_context(|| format!("send {method} {path} from {local}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .with_context(|| format!("read on {local}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        ensure!(
            raw.len() <= 16 * MAX_MESSAGE,
            "response longer than {} bytes",
            16 * MAX_MESSAGE
        );
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no complete head in {} bytes", raw.len()))?;
    let chunked = String::from_utf8_lossy(&raw[..split]).lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if chunked {
        let mut decoded = raw[..split + 4].to_vec();
        decoded.extend(dechunk(&raw[split + 4..])?);
        let mut r = parse_response(&decoded, local)?;
        r.headers.retain(|(n, _)| n != "transfer-encoding");
        return Ok(r);
    }
    parse_response(&raw, local).with_context(|| format!("response on {local}"))
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
    let mut stream = connect_from(local, target, timeout)
        .with_context(|| format!("connect {target} from {local}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: xdplb-tests\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("send from {local}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .with_context(|| format!("read on {local}"))?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
        ensure!(
            raw.len() <= MAX_MESSAGE,
            "response longer than {MAX_MESSAGE} bytes"
        );
    }
    parse_response(&raw, local).with_context(|| format!("response on {local}"))
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

/// Decodes a `Transfer-Encoding: chunked` body (extensions and trailers ignored).
fn dechunk(mut body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("chunk size line not terminated"))?;
        let size_text = String::from_utf8_lossy(&body[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("chunk size {size_text:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        ensure!(body.len() >= size + 2, "chunk of {size} bytes cut short");
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

/// Opens a connection to `target` from namespace `ns` for [`get_keep_alive`]; the
/// socket belongs to `ns` but can be used from any thread. Reads and writes are
/// bounded by `timeout`.
pub fn connect_keep_alive(
    ns: &str,
    target: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<TcpStream> {
    netns::in_netns(ns, move || {
        let stream = TcpStream::connect_timeout(&target, timeout)
            .with_context(|| format!("connect {target}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(stream)
    })
}

/// One `GET path` on an open connection, keeping it open (`Connection: keep-alive`);
/// reads exactly one response, whose body length must be given by `Content-Length`.
pub fn get_keep_alive(stream: &mut TcpStream, path: &str) -> anyhow::Result<Response> {
    let local = stream.local_addr()?;
    let peer = stream.peer_addr()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {peer}\r\nUser-Agent: xdplb-tests\r\nConnection: keep-alive\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("send from {local}"))?;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut byte = [0u8; 1];
    // The head, a byte at a time so nothing of a later response is consumed.
    while !raw.ends_with(b"\r\n\r\n") {
        ensure!(raw.len() < MAX_MESSAGE, "response head too long");
        let n = stream
            .read(&mut byte)
            .with_context(|| format!("read on {local}"))?;
        ensure!(
            n > 0,
            "connection {local} closed before the response head ended"
        );
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .ok_or_else(|| anyhow!("keep-alive response without content-length"))?
        .parse()
        .context("content-length")?;
    ensure!(len <= MAX_MESSAGE, "response body of {len} bytes");
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        let want = (len - body.len()).min(chunk.len());
        let n = stream
            .read(&mut chunk[..want])
            .with_context(|| format!("read on {local}"))?;
        ensure!(n > 0, "connection {local} closed within the response body");
        body.extend_from_slice(&chunk[..n]);
    }
    raw.extend(body);
    parse_response(&raw, local).with_context(|| format!("response on {local}"))
}

fn parse_response(raw: &[u8], local: SocketAddr) -> anyhow::Result<Response> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no complete head in {} bytes", raw.len()))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    if let Some(len) = headers.iter().find(|(n, _)| n == "content-length") {
        let len: usize = len.1.parse().context("content-length")?;
        ensure!(
            body.len() == len,
            "body has {} bytes, content-length says {len}",
            body.len()
        );
    }
    Ok(Response {
        status,
        headers,
        body: body.to_owned(),
        local,
    })
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
    use super::*;

    #[test]
    fn responses_parse() {
        let local: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\nX-Backend: be2\r\nContent-Length: 4\r\n\r\nbe2\n",
            local,
        )
        .unwrap();
        assert_eq!(
            (r.status, r.backend(), r.header("x-backend")),
            (200, "be2", Some("be2"))
        );
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nbe2\n", local).is_err()
        );
        assert!(parse_response(b"garbage", local).is_err());
    }

    #[test]
    fn keep_alive_server_and_clients_work_on_loopback() {
        // The caller's namespace, loopback only: no privileges needed.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let (c, s) = (counters.clone(), stop.clone());
            thread::spawn(move || serve_keep_alive(&listener, "be8", &c, &s))
        };
        let mut conn = TcpStream::connect(addr).unwrap();
        conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let local = conn.local_addr().unwrap();
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
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap().unwrap();
        assert_eq!(counters.requests.load(Ordering::Relaxed), 5);
        assert_eq!(counters.health.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde"
        );
        assert!(dechunk(b"5\r\nab").is_err());
    }

    #[test]
    fn server_and_load_work_on_loopback() {
        // Uses the caller's namespace through a thread-local listener: no privileges needed.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let (c, s) = (counters.clone(), stop.clone());
            thread::spawn(move || serve(&listener, "be9", &c, &s))
        };
        let mut per_backend = BTreeMap::new();
        for _ in 0..5 {
            let r = get(addr, "/", IO_TIMEOUT).unwrap();
            *per_backend.entry(r.backend().to_owned()).or_insert(0) += 1;
        }
        assert_eq!(get(addr, "/healthz", IO_TIMEOUT).unwrap().body, "ok\n");
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap().unwrap();
        assert_eq!(per_backend, BTreeMap::from([("be9".to_owned(), 5)]));
        assert_eq!(counters.requests.load(Ordering::Relaxed), 5);
        assert_eq!(counters.health.load(Ordering::Relaxed), 1);
    }
}
