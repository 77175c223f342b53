//! Long-lived TCP streams with sequence checks, for failover scenarios where what
//! matters is whether established connections survive (issue 10, 5(a) and 5(d)).
//!
//! - [`EchoServer`] listens inside a namespace (on all addresses, so a backend's VIP on
//!   `lo` reaches it). Each connection first gets the server's name and a newline
//!   (`be1\n`), then every byte it sends is echoed back; at the client's end of stream
//!   the server closes. It counts connections and connections that ended in an error.
//! - [`Streams`] opens N connections from a namespace to a target and, on each, writes
//!   a chunk of a known byte pattern every `interval` for `duration` while a reader
//!   checks that what comes back is exactly that pattern, in order (any lost,
//!   duplicated or corrupted byte is an error, not a stall). It records the longest
//!   gap between two reads that brought data, and how each connection ended: a reset,
//!   a timeout or a wrong byte is a failure. [`Streams::finish`] gives a
//!   [`StreamReport`].
//! - [`probe`]: one short connection (hello, one echoed chunk, close), for checking
//!   that new connections succeed while streams run.
//!
//! Everything is bounded: connects, reads and writes time out, [`Streams`] stop by
//! themselves after `duration`, and a server stops (and shuts its connections) when
//! dropped.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::netns;

/// Bound on a connect, and on a read or write that makes no progress.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest server name in a hello line.
const MAX_HELLO: usize = 64;

/// The byte at `offset` of connection `conn`'s stream: not periodic within a chunk and
/// different between connections, so a byte from another place or connection shows.
fn pattern(conn: u32, offset: u64) -> u8 {
    let x = offset
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(u64::from(conn).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    (x >> 56) as u8
}

// --- server --------------------------------------------------------------------------

/// An echo server with a hello line; see the [module docs](self).
#[derive(Debug)]
pub struct EchoServer {
    name: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<anyhow::Result<()>>>,
}

impl EchoServer {
    /// Listens on `addr` inside namespace `ns`; `name` is the hello line.
    pub fn start(ns: &str, addr: SocketAddr, name: &str) -> anyhow::Result<Self> {
        ensure!(
            !name.is_empty() && name.len() < MAX_HELLO && !name.contains('\n'),
            "bad server name {name:?}"
        );
        let listener = netns::in_netns(ns, move || {
            let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let open = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, accepted, errors, open) = (
                Arc::clone(&stop),
                Arc::clone(&accepted),
                Arc::clone(&errors),
                Arc::clone(&open),
            );
            let hello = format!("{name}\n");
            thread::Builder::new()
                .name(format!("echo-{name}"))
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((conn, _)) => {
                                accepted.fetch_add(1, Ordering::Relaxed);
                                conn.set_nonblocking(false)?;
                                if let Ok(c) = conn.try_clone() {
                                    lock(&open).push(c);
                                }
                                let (hello, errors) = (hello.clone(), Arc::clone(&errors));
                                thread::spawn(move || {
                                    if serve(conn, &hello).is_err() {
                                        errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                });
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                thread::sleep(Duration::from_millis(5));
                            }
                            Err(e) => return Err(e).context("accept"),
                        }
                    }
                    Ok(())
                })?
        };
        Ok(Self {
            name: name.to_owned(),
            addr,
            stop,
            accepted,
            errors,
            open,
            acceptor: Some(acceptor),
        })
    }

    /// The hello name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections that ended in an error (a reset, a timeout) rather than the client's
    /// end of stream.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in lock(&self.open).drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One server connection: hello, then echo until the client's end of stream.
fn serve(mut conn: TcpStream, hello: &str) -> std::io::Result<()> {
    // Idle streams are fine (a client may pause); a dead peer is noticed by the bound.
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    conn.set_nodelay(true)?;
    conn.write_all(hello.as_bytes())?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return conn.shutdown(Shutdown::Write);
        }
        conn.write_all(&buf[..n])?;
    }
}

// --- clients -------------------------------------------------------------------------

/// Options of [`Streams::start`].
#[derive(Clone, Debug)]
pub struct StreamOptions {
    /// Connections.
    pub connections: usize,
    /// Bytes written per chunk.
    pub chunk: usize,
    /// Pause between two chunks of one connection.
    pub interval: Duration,
    /// How long each connection streams.
    pub duration: Duration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            connections: 24,
            chunk: 512,
            interval: Duration::from_millis(20),
            duration: Duration::from_secs(8),
        }
    }
}

/// How one connection went.
#[derive(Clone, Debug)]
pub struct StreamResult {
    /// Its number (also its byte pattern).
    pub conn: u32,
    /// The client's port, once connected.
    pub local_port: Option<u16>,
    /// The server that said hello.
    pub server: Option<String>,
    /// Bytes written.
    pub sent: u64,
    /// Bytes read back and checked.
    pub echoed: u64,
    /// The longest gap between two reads that brought data, while streaming.
    pub longest_stall: Duration,
    /// When that gap began.
    pub stall_began: Option<Instant>,
    /// Why the connection failed, if it did (reset, timeout, wrong byte, short echo).
    pub error: Option<String>,
}

impl StreamResult {
    /// Whether the error, if any, is a connection reset.
    pub fn reset(&self) -> bool {
        self.error
            .as_deref()
            .is_some_and(|e| e.contains("reset") || e.contains("Broken pipe"))
    }
}

/// The outcome of [`Streams`].
#[derive(Clone, Debug)]
pub struct StreamReport {
    /// One per connection.
    pub results: Vec<StreamResult>,
}

impl StreamReport {
    /// Connections that ended in an error.
    pub fn failed(&self) -> Vec<&StreamResult> {
        self.results.iter().filter(|r| r.error.is_some()).collect()
    }

    /// Connections reset by the peer (or by a router in between).
    pub fn resets(&self) -> usize {
        self.results.iter().filter(|r| r.reset()).count()
    }

    /// The longest stall over all connections, with its connection.
    pub fn longest_stall(&self) -> Option<&StreamResult> {
        self.results.iter().max_by_key(|r| r.longest_stall)
    }

    /// Connections whose longest stall exceeds `limit`.
    pub fn stalled_over(&self, limit: Duration) -> usize {
        self.results
            .iter()
            .filter(|r| r.longest_stall > limit)
            .count()
    }

    /// Bytes echoed over all connections.
    pub fn echoed(&self) -> u64 {
        self.results.iter().map(|r| r.echoed).sum()
    }

    /// Connections per server.
    pub fn per_server(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for r in &self.results {
            *m.entry(r.server.clone().unwrap_or_else(|| "(none)".into()))
                .or_default() += 1;
        }
        m
    }

    /// A one-line summary.
    pub fn summary(&self) -> String {
        let longest = self.longest_stall();
        format!(
            "{} connections, {} failed ({} resets), {} bytes echoed and checked, longest stall {:.0} ms, per server {:?}",
            self.results.len(),
            self.failed().len(),
            self.resets(),
            self.echoed(),
            longest.map_or(0.0, |r| r.longest_stall.as_secs_f64() * 1000.0),
            self.per_server()
        )
    }
}

/// Streaming connections; see the [module docs](self).
#[derive(Debug)]
pub struct Streams {
    workers: Vec<JoinHandle<anyhow::Result<StreamResult>>>,
}

impl Streams {
    /// Opens the connections from namespace `ns` to `target` (all connected, or an
    /// error, before this returns) and starts streaming on each.
    pub fn start(ns: &str, target: SocketAddr, opts: &StreamOptions) -> anyhow::Result<Self> {
        ensure!(opts.chunk > 0 && opts.connections > 0, "nothing to stream");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let mut workers = Vec::new();
        for i in 0..opts.connections {
            let conn = u32::try_from(i)?;
            let (opts, ready) = (opts.clone(), ready_tx.clone());
            workers.push(netns::spawn_in_netns(
                ns,
                &format!("stream-{i}"),
                move || Ok(stream_one(conn, target, &opts, &ready)),
            )?);
        }
        drop(ready_tx);
        for _ in 0..opts.connections {
            match ready_rx.recv_timeout(IO_TIMEOUT * 2) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("a stream did not start: {e}"),
                Err(e) => bail!("streams did not start within {:?}: {e}", IO_TIMEOUT * 2),
            }
        }
        Ok(Self { workers })
    }

    /// Waits for every connection to finish streaming and close.
    pub fn finish(self) -> anyhow::Result<StreamReport> {
        let mut results = Vec::new();
        for w in self.workers {
            results.push(w.join().map_err(|_| anyhow!("stream thread panicked"))??);
        }
        Ok(StreamReport { results })
    }
}

/// Reads the hello line (byte by byte: nothing of the echo may be consumed with it).
fn read_hello(conn: &mut TcpStream) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = conn.read(&mut b).context("reading the hello")?;
        ensure!(n == 1, "connection closed before the hello");
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
        ensure!(line.len() < MAX_HELLO, "hello line too long");
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

fn connect(target: SocketAddr) -> anyhow::Result<TcpStream> {
    let c = TcpStream::connect_timeout(&target, IO_TIMEOUT)
        .with_context(|| format!("connect {target}"))?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    c.set_nodelay(true)?;
    Ok(c)
}

fn stream_one(
    conn: u32,
    target: SocketAddr,
    opts: &StreamOptions,
    ready: &std::sync::mpsc::Sender<Result<(), String>>,
) -> StreamResult {
    let mut result = StreamResult {
        conn,
        local_port: None,
        server: None,
        sent: 0,
        echoed: 0,
        longest_stall: Duration::ZERO,
        stall_began: None,
        error: None,
    };
    let mut sock = match connect(target).and_then(|mut c| {
        let hello = read_hello(&mut c)?;
        Ok((c, hello))
    }) {
        Ok((c, hello)) => {
            result.local_port = c.local_addr().ok().map(|a| a.port());
            result.server = Some(hello);
            let _ = ready.send(Ok(()));
            c
        }
        Err(e) => {
            let _ = ready.send(Err(format!("connection {conn}: {e:#}")));
            result.error = Some(format!("{e:#}"));
            return result;
        }
    };
    let writer = match sock.try_clone() {
        Ok(w) => w,
        Err(e) => {
            result.error = Some(format!("clone: {e}"));
            return result;
        }
    };
    let (chunk, interval, duration) = (opts.chunk, opts.interval, opts.duration);
    let writing = thread::spawn(move || -> Result<u64, String> {
        let mut w = writer;
        let end = Instant::now() + duration;
        let mut offset = 0u64;
        let mut buf = vec![0u8; chunk];
        while Instant::now() < end {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = pattern(conn, offset + i as u64);
            }
            w.write_all(&buf)
                .map_err(|e| format!("write at byte {offset}: {e}"))?;
            offset += chunk as u64;
            thread::sleep(interval);
        }
        w.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        Ok(offset)
    });
    // Reader: check every byte; note the longest gap between reads that brought data.
    let mut buf = [0u8; 16 * 1024];
    let mut last = Instant::now();
    let read_error = loop {
        match sock.read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                let now = Instant::now();
                let gap = now - last;
                if gap > result.longest_stall {
                    result.longest_stall = gap;
                    result.stall_began = Some(last);
                }
                last = now;
                if let Some(i) = buf[..n]
                    .iter()
                    .enumerate()
                    .position(|(i, &b)| b != pattern(conn, result.echoed + i as u64))
                {
                    break Some(format!(
                        "wrong byte echoed at offset {}",
                        result.echoed + i as u64
                    ));
                }
                result.echoed += n as u64;
            }
            Err(e) => break Some(format!("read after {} bytes: {e}", result.echoed)),
        }
    };
    if read_error.is_some() {
        // Unblock the writer (it ends by itself within `duration` otherwise).
        let _ = sock.shutdown(Shutdown::Both);
    }
    let written = writing
        .join()
        .unwrap_or_else(|_| Err("writer panicked".into()));
    match written {
        Ok(sent) => result.sent = sent,
        Err(e) if read_error.is_none() => result.error = Some(e),
        Err(_) => {}
    }
    if let Some(e) = read_error {
        result.error = Some(e);
    } else if result.error.is_none() && result.echoed != result.sent {
        result.error = Some(format!(
            "echo ended after {} of {} bytes",
            result.echoed, result.sent
        ));
    }
    result
}

/// One short connection from the calling thread's namespace: hello, one chunk echoed
/// and checked, close. Returns the server's name. Call it inside
/// [`netns::in_netns`].
pub fn probe(target: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let mut c = TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connect {target}"))?;
    c.set_read_timeout(Some(timeout))?;
    c.set_write_timeout(Some(timeout))?;
    let hello = read_hello(&mut c)?;
    let data: Vec<u8> = (0..64).map(|i| pattern(u32::MAX, i)).collect();
    c.write_all(&data)?;
    c.shutdown(Shutdown::Write)?;
    let mut back = Vec::new();
    c.read_to_end(&mut back).context("reading the echo")?;
    ensure!(back == data, "echo differs from what was sent");
    Ok(hello)
}

/// New connections made one after another while something else happens: a [`probe`]
/// every `every` from a namespace until [`Probes::finish`] (at most [`MAX_PROBES`]).
#[derive(Debug)]
pub struct Probes {
    stop: Arc<AtomicBool>,
    worker: JoinHandle<anyhow::Result<Vec<ProbeResult>>>,
}

/// Most probes one [`Probes`] makes.
pub const MAX_PROBES: usize = 2000;

/// One probe of a [`Probes`].
#[derive(Clone, Debug)]
pub struct ProbeResult {
    /// When it started.
    pub start: Instant,
    /// How long it took.
    pub took: Duration,
    /// The server's name, or the error.
    pub outcome: Result<String, String>,
}

impl Probes {
    /// Starts probing `target` from namespace `ns`, each probe bounded by `timeout`.
    pub fn start(
        ns: &str,
        target: SocketAddr,
        every: Duration,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let worker = netns::spawn_in_netns(ns, "probes", move || {
            let mut out = Vec::new();
            while !flag.load(Ordering::Relaxed) && out.len() < MAX_PROBES {
                let start = Instant::now();
                let outcome = probe(target, timeout).map_err(|e| format!("{e:#}"));
                out.push(ProbeResult {
                    start,
                    took: start.elapsed(),
                    outcome,
                });
                thread::sleep(every);
            }
            Ok(out)
        })?;
        Ok(Self { stop, worker })
    }

    /// Stops probing (after the probe under way) and returns every result.
    pub fn finish(self) -> anyhow::Result<Vec<ProbeResult>> {
        self.stop.store(true, Ordering::Relaxed);
        self.worker
            .join()
            .map_err(|_| anyhow!("probe thread panicked"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_between_connections_and_offsets() {
        let a: Vec<u8> = (0..256).map(|o| pattern(0, o)).collect();
        let b: Vec<u8> = (0..256).map(|o| pattern(1, o)).collect();
        assert_ne!(a, b);
        let distinct: std::collections::BTreeSet<u8> = a.iter().copied().collect();
        assert!(distinct.len() > 100, "{distinct:?}");
    }

    #[test]
    fn streams_echo_and_check_over_loopback() {
        // In this process's own namespace: loopback only, no privileges needed.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            for _ in 0..2 {
                let (c, _) = listener.accept().unwrap();
                thread::spawn(move || serve(c, "lo1\n"));
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let opts = StreamOptions {
            connections: 2,
            chunk: 100,
            interval: Duration::from_millis(5),
            duration: Duration::from_millis(200),
        };
        let r = stream_one(7, addr, &opts, &tx);
        assert!(rx.recv().unwrap().is_ok());
        assert_eq!(r.error, None, "{r:?}");
        assert_eq!(r.server.as_deref(), Some("lo1"));
        assert!(r.sent >= 1000 && r.echoed == r.sent, "{r:?}");
        assert_eq!(probe(addr, IO_TIMEOUT).unwrap(), "lo1");
        // A server that answers with the wrong bytes is caught.
        let bad = TcpListener::bind("127.0.0.1:0").unwrap();
        let bad_addr = bad.local_addr().unwrap();
        thread::spawn(move || {
            let (mut c, _) = bad.accept().unwrap();
            c.write_all(b"liar\n").unwrap();
            let mut buf = [0u8; 100];
            let n = c.read(&mut buf).unwrap();
            buf[..n].iter_mut().for_each(|b| *b ^= 1);
            c.write_all(&buf[..n]).unwrap();
        });
        let r = stream_one(8, bad_addr, &opts, &tx);
        assert!(
            r.error.as_deref().is_some_and(|e| e.contains("wrong byte")),
            "{r:?}"
        );
        server.join().unwrap();
    }
}
