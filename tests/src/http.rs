//! A tiny HTTP/1.1 server and load client on std threads, for namespace test beds.
//!
//! - [`HttpServer`] listens inside a namespace (on all addresses, so both a backend's
//!   LAN address and a VIP on its `lo` reach it), answers `GET /healthz` with `ok` and
//!   any other `GET` with a body naming the backend (`be1\n`, also in `X-Backend`), and
//!   counts what it served. One connection at a time, each bounded by timeouts.
//! - [`get`] makes one request with `Connection: close` from the calling thread's
//!   namespace; [`run_load`] makes N of them from a namespace over a few threads, with
//!   an overall deadline, and reports successes, failures and which backend answered.

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
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
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
