//! `l7`: requests/s and latency of the agent's HTTP reverse proxy beside HAProxy and
//! nginx, on loopback, in front of the same two backends, without and with cache hits.
//!
//! One run starts, all on 127.0.0.1 with ports the kernel picked:
//! - two backends: this binary re-executed as `xdplb-bench l7-backend --port P --name N`
//!   ([`run_backend`]), a hyper 1 HTTP/1.1 server with keep-alive on one tokio thread
//!   answering `GET /nocache` (a [`BODY_LEN`]-byte body, `Cache-Control: no-store`) and
//!   `GET /cached` (the same body, `Cache-Control: public, max-age=3600`), and counting
//!   those requests (`GET /count`);
//! - lb-agent (`$XDPLB_AGENT_BIN`) with `--xdp-mode off`: two L7 services, `plain`
//!   without a cache and `cached` with `cache = { max_bytes = 67108864 }`, round robin
//!   over the two backends, `[agent] workers = N`; `XDPLB_LOG=info,xdplb::access=off` (no
//!   access log), and a second agent with `XDPLB_LOG=info` (its default: the access log on,
//!   written to a file); with `--agent-b PATH` (repeatable), one more agent per binary
//!   named (access log off, rows "xdplb (B) Nt", "xdplb (C) Nt", ...), so builds are
//!   compared in one interleaved run;
//! - HAProxy: `mode http`, `balance roundrobin`, `http-reuse always`,
//!   `option http-keep-alive`, `nbthread N`, no log; a second frontend/backend pair with
//!   HAProxy's own `cache` (`http-request cache-use`, `http-response cache-store`);
//! - nginx: `upstream` with `keepalive 64`, `proxy_http_version 1.1`,
//!   `proxy_set_header Connection ""`, `worker_processes N`, `access_log off`; a second
//!   server with `proxy_cache` (`proxy_cache_path` in the run's temporary directory).
//!
//! Every proxy runs once per thread count N of `--proxy-threads` (default 1 and 2). Each
//! proxy thus has one port without a cache and one with a cache. Then, for each
//! case and target (the proxies, and "direct": wrk straight at be1, the floor), wrk runs
//! for the warm-up (discarded; it also fills the caches), the cache case checks through
//! one request that the proxy answers from its cache (xdplb `Cache-Status: xdplb; hit`,
//! nginx `X-Cache-Status: HIT`, HAProxy `X-Cache-Status: HIT` set from `res.cache_hit`),
//! and a measured run follows: `wrk -tT -cC -dDs --latency`. Every row also shows how
//! many requests each backend received during the measured run (their own counters):
//! every request without a cache, none with cache hits, and the round-robin split; and
//! the proxy's CPU time per request (utime + stime of its processes, from `/proc`).
//!
//! One table is printed at the end. Everything runs on the same machine (wrk, proxies
//! and backends share the CPUs), so the figures are relative: compare the rows of one
//! run. Every process started is stopped at the end, also on error ([`Proc`]), and the
//! temporary directory is removed. The default run takes about a minute.

use std::{
    convert::Infallible,
    fmt::Write as _,
    fs,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use xdplb_tests::{http, topology::agent_binary};

use crate::report::{self, Cell, Report};

const DEFAULT_DURATION_S: u64 = 5;
const DEFAULT_WARMUP_S: u64 = 1;
const DEFAULT_RUNS: u32 = 3;
const DEFAULT_CONNECTIONS: u32 = 32;
const DEFAULT_THREADS: u32 = 2;

/// Bytes of the backends' `/nocache` and `/cached` bodies.
pub const BODY_LEN: usize = 600;
/// `cache = { max_bytes }` of the agent, and the other proxies' cache sizes.
const CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// How long a proxy or backend may take to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Extra time wrk gets beyond its duration before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(15);
const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// The agent's log line once it serves.
const AGENT_READY: &str = "agent ready";
/// The agent's log filter: info (so `agent ready` shows), without the access log.
const AGENT_LOG_FILTER: &str = "info,xdplb::access=off";

/// Arguments of `l7`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds measured per row, 1 to 60.
    #[arg(long = "duration", value_name = "S", default_value_t = DEFAULT_DURATION_S,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    duration_s: u64,
    /// Seconds of warm-up before each measurement, 0 to 10.
    #[arg(long = "warmup", value_name = "S", default_value_t = DEFAULT_WARMUP_S,
          value_parser = clap::value_parser!(u64).range(0..=10))]
    warmup_s: u64,
    /// wrk connections, from --threads to 1000.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONNECTIONS)]
    connections: u32,
    /// wrk threads, 1 to 16.
    #[arg(long, value_name = "T", default_value_t = DEFAULT_THREADS,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    threads: u32,
    /// Runs of every row, 1 to 10 (interleaved: run 1 of every row, then run 2, ...); the
    /// table shows median (min-max).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RUNS,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    runs: u32,
    /// Thread counts of the proxies, 1 to 64, comma-separated: each proxy runs once
    /// per count (`[agent] workers`, HAProxy `nbthread`, nginx `worker_processes`).
    #[arg(long = "proxy-threads", value_name = "N,..", value_delimiter = ',',
          default_values_t = [1u32, 2], value_parser = clap::value_parser!(u32).range(1..=64))]
    proxy_threads: Vec<u32>,
    /// Measure only the rows whose label ("no cache / xdplb 2t", "cache hits / nginx 1t",
    /// ...) contains this text; repeatable (any of them). All proxies still start.
    #[arg(long, value_name = "TEXT")]
    only: Vec<String>,
    /// Another lb-agent binary (an older or newer build) measured in the same run, rows
    /// "xdplb (B) Nt" (access log off), interleaved with the others: before/after
    /// comparisons in the same conditions. Repeatable: (B), (C), ... in order.
    #[arg(long = "agent-b", value_name = "PATH")]
    agent_b: Vec<PathBuf>,
}

impl Args {
    /// The rule between arguments that clap's per-value checks cannot state.
    pub fn check(&self) -> Result<(), String> {
        if (self.threads..=1000).contains(&self.connections) {
            Ok(())
        } else {
            Err(format!(
                "--connections must be between --threads ({}) and 1000",
                self.threads
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------
// The backend: `xdplb-bench l7-backend --port P --name N`.

/// Arguments of the internal `l7-backend`.
#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// Port on 127.0.0.1 to serve on.
    #[arg(long, value_name = "P")]
    port: u16,
    /// Name on the first line of its bodies.
    #[arg(long, value_name = "N", default_value = "backend")]
    name: String,
}

/// The body of `/nocache` and `/cached`: the backend's name on the first line, padded
/// to [`BODY_LEN`] bytes.
fn body_of(name: &str) -> Bytes {
    let mut body = format!("{name}\n");
    while body.len() < BODY_LEN - 1 {
        body.push(char::from(b'a' + (body.len() % 26) as u8));
    }
    body.push('\n');
    Bytes::from(body)
}

struct Backend {
    body: Bytes,
    /// `/nocache` and `/cached` requests answered.
    served: AtomicU64,
    /// Connections accepted.
    accepted: AtomicU64,
}

impl Backend {
    fn answer(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, cache_control, body) = match req.uri().path() {
            "/nocache" => (200, "no-store", self.body.clone()),
            "/cached" => (200, "public, max-age=3600", self.body.clone()),
            "/count" => {
                let n = self.served.load(Ordering::Relaxed);
                let c = self.accepted.load(Ordering::Relaxed);
                return reply(200, "no-store", Bytes::from(format!("{n} {c}\n")));
            }
            "/" | "/healthz" => (200, "no-store", Bytes::from_static(b"ok\n")),
            _ => (404, "no-store", Bytes::from_static(b"not found\n")),
        };
        if status == 200 && body.len() == BODY_LEN {
            self.served.fetch_add(1, Ordering::Relaxed);
        }
        reply(status, cache_control, body)
    }
}

fn reply(status: u16, cache_control: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body));
    *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static(cache_control),
    );
    resp
}

/// Serves until killed: HTTP/1.1 with keep-alive on one tokio thread.
pub fn run_backend(args: &BackendArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let backend = Arc::new(Backend {
        body: body_of(&args.name),
        served: AtomicU64::new(0),
        accepted: AtomicU64::new(0),
    });
    let port = args.port;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((LOCALHOST, port))
            .await
            .with_context(|| format!("binding 127.0.0.1:{port}"))?;
        loop {
            let (stream, _) = listener.accept().await.context("accept")?;
            let _ = stream.set_nodelay(true);
            backend.accepted.fetch_add(1, Ordering::Relaxed);
            let backend = Arc::clone(&backend);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let resp = backend.answer(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                // Errors are clients that went away: nothing to do.
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

// ---------------------------------------------------------------------------------------
// Processes.

/// A process this benchmark started, in its own process group, with its output in a
/// log file. Dropping it stops the group (SIGTERM, then SIGKILL after 3 s), and the
/// kernel sends it SIGTERM if this process dies first (`PR_SET_PDEATHSIG`).
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        // Appended, so a log can be emptied under a running process
        // ([`Bed::trim_access_logs`]).
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        // SAFETY: the closure only calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for error messages.
    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Fails, with the end of its log, if the process has exited.
    fn alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); the end of its log:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    fn signal_group(&self, sig: libc::c_int) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill has no memory-safety preconditions; -pid is the group this
            // child leads (process_group(0)).
            unsafe { libc::kill(-pid, sig) };
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            // Its workers, if any, may still run.
            self.signal_group(libc::SIGKILL);
            return;
        }
        self.signal_group(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                // nginx's master waits for its workers, so the group is empty by now;
                // SIGKILL to an empty group is harmless.
                self.signal_group(libc::SIGKILL);
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: {} ignored SIGTERM for 3 s: killing it", self.name);
        self.signal_group(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// `n` distinct free TCP ports on 127.0.0.1 (bound at once, then released).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .context("picking free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// `program` on PATH or in /usr/sbin (nginx and haproxy live there).
fn find_program(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// First line of `program args` (stdout, else stderr), for the notes.
fn version_of(program: &Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            [o.stdout, o.stderr].into_iter().find_map(|b| {
                String::from_utf8_lossy(&b)
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .map(|l| l.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Waits until `GET path` on `addr` answers 200, or fails after [`START_TIMEOUT`].
fn wait_for_http(proc: &mut Proc, addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        proc.alive()?;
        let last = match http::get(addr, path, Duration::from_secs(1)) {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => format!("status {}", r.status),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "{}: GET {path} on {addr} did not answer 200 within {START_TIMEOUT:?} (last: {last}); the end of its log:\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// CPU time (utime + stime, seconds) of process `pid` with all its threads, and of its
/// child processes (nginx's workers).
fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = |pid: &str| -> u64 {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command (which may hold spaces) in parentheses.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        // rest[0] is field 3 (state): utime is field 14, stime field 15.
        let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        get(11) + get(12)
    };
    let mut total = ticks(&pid.to_string());
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let children = fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace() {
                total += ticks(child);
            }
        }
    }
    total as f64 / hz
}

// ---------------------------------------------------------------------------------------
// Configs.

/// Ports of one proxy instance: its port without a cache, its port with one, the
/// agent's API (unused by the others), and the two backends it proxies to.
#[derive(Clone, Copy, Debug)]
struct Ports {
    backends: [u16; 2],
    api: u16,
    proxy: [u16; 2],
}

impl Ports {
    fn pick(backends: [u16; 2]) -> anyhow::Result<Self> {
        let p = free_ports(3)?;
        Ok(Self {
            backends,
            api: p[0],
            proxy: [p[1], p[2]],
        })
    }
}

fn agent_toml(ports: &Ports, state_dir: &Path, workers: u32) -> String {
    let backends = format!(
        "[{{ address = \"127.0.0.1\", port = {} }}, {{ address = \"127.0.0.1\", port = {} }}]",
        ports.backends[0], ports.backends[1]
    );
    format!(
        r#"# xdplb-bench l7: the agent as an L7 proxy only (--xdp-mode off)
[agent]
api_listen = "127.0.0.1:{api}"
state_dir = "{state}"
workers = {workers}

[dataplane]
xdp_mode = "off"

[[service]]
name = "plain"
vip = "127.0.0.1:{plain}"
mode = "l7"
scheduler = "round-robin"
backend = {backends}

[[service]]
name = "cached"
vip = "127.0.0.1:{cached}"
mode = "l7"
scheduler = "round-robin"
backend = {backends}
cache = {{ max_bytes = {CACHE_BYTES} }}
"#,
        api = ports.api,
        state = state_dir.display(),
        plain = ports.proxy[0],
        cached = ports.proxy[1],
    )
}

fn haproxy_cfg(ports: &Ports, threads: u32) -> String {
    let servers = format!(
        "    server be1 127.0.0.1:{}\n    server be2 127.0.0.1:{}\n",
        ports.backends[0], ports.backends[1]
    );
    format!(
        "# xdplb-bench l7
global
    nbthread {threads}
    maxconn 4000

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s

cache bench
    total-max-size {cache_mb}
    max-age 3600

frontend plain
    bind 127.0.0.1:{plain}
    default_backend servers

frontend cached
    bind 127.0.0.1:{cached}
    default_backend servers_cached

backend servers
    balance roundrobin
{servers}
backend servers_cached
    balance roundrobin
    http-request cache-use bench
    http-response cache-store bench
    http-after-response set-header X-Cache-Status HIT if {{ res.cache_hit }}
{servers}",
        cache_mb = CACHE_BYTES / (1024 * 1024),
        plain = ports.proxy[0],
        cached = ports.proxy[1],
    )
}

fn nginx_conf(ports: &Ports, dir: &Path, workers: u32) -> String {
    let d = dir.display();
    format!(
        r#"# xdplb-bench l7
daemon off;
master_process on;
worker_processes {workers};
user root;
pid {d}/nginx.pid;
error_log {d}/nginx.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {d}/nginx-client-body;
    proxy_temp_path {d}/nginx-proxy-temp;
    fastcgi_temp_path {d}/nginx-fastcgi-temp;
    uwsgi_temp_path {d}/nginx-uwsgi-temp;
    scgi_temp_path {d}/nginx-scgi-temp;
    keepalive_requests 1000000;
    keepalive_timeout 60s;

    upstream backends {{
        server 127.0.0.1:{be1};
        server 127.0.0.1:{be2};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    proxy_cache_path {d}/nginx-cache levels=1:2 keys_zone=bench:10m max_size={cache_bytes} inactive=60m use_temp_path=off;

    server {{
        listen 127.0.0.1:{plain};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}

    server {{
        listen 127.0.0.1:{cached};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
}}
"#,
        be1 = ports.backends[0],
        be2 = ports.backends[1],
        cache_bytes = CACHE_BYTES,
        plain = ports.proxy[0],
        cached = ports.proxy[1],
    )
}

// ---------------------------------------------------------------------------------------
// wrk.

/// What one wrk run reported.
#[derive(Clone, Debug, Default, PartialEq)]
struct WrkResult {
    requests_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    non_2xx_3xx: u64,
    /// connect, read, write, timeout.
    socket_errors: [u64; 4],
}

impl WrkResult {
    fn errors(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.non_2xx_3xx > 0 {
            out.push(format!("{} non-2xx/3xx", self.non_2xx_3xx));
        }
        for (n, what) in self
            .socket_errors
            .iter()
            .zip(["connect", "read", "write", "timeout"])
        {
            if *n > 0 {
                out.push(format!("{n} {what}"));
            }
        }
        out
    }
}

/// A latency of wrk's (`812.00us`, `1.23ms`, `2.01s`, `1.50m`) in microseconds.
fn parse_latency(v: &str) -> anyhow::Result<f64> {
    let v = v.trim();
    let (number, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = v.strip_suffix('h') {
        (n, 3600e6)
    } else {
        bail!("latency {v:?} has no unit")
    };
    Ok(number
        .trim()
        .parse::<f64>()
        .with_context(|| format!("latency {v:?}"))?
        * scale)
}

/// Parses `wrk --latency`'s report.
fn parse_wrk(out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult::default();
    let (mut rps, mut p50, mut p99) = (None, None, None);
    let mut in_distribution = false;
    for line in out.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            match t.split_once(char::is_whitespace) {
                Some(("50%", v)) => p50 = Some(parse_latency(v)?),
                Some(("99%", v)) => p99 = Some(parse_latency(v)?),
                Some((pct, _)) if pct.ends_with('%') => {}
                _ => in_distribution = false,
            }
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            rps = Some(v.trim().parse::<f64>().context("Requests/sec")?);
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx_3xx = v.trim().parse().context("Non-2xx or 3xx responses")?;
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            for part in v.split(',') {
                let mut words = part.split_whitespace();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    bail!("socket errors {v:?}");
                };
                let i = match what {
                    "connect" => 0,
                    "read" => 1,
                    "write" => 2,
                    "timeout" => 3,
                    _ => bail!("socket errors {v:?}"),
                };
                r.socket_errors[i] = n.parse().with_context(|| format!("socket errors {v:?}"))?;
            }
        } else if let Some((n, _)) = t.split_once(" requests in ") {
            r.requests = n.trim().parse().context("requests in")?;
        }
    }
    r.requests_per_s = rps.context("no Requests/sec line")?;
    r.p50_us = p50.context("no 50% latency line")?;
    r.p99_us = p99.context("no 99% latency line")?;
    Ok(r)
}

/// `wrk -tT -cC -dDs [--latency] url`, bounded by its duration + [`WRK_GRACE`].
fn wrk(
    wrk: &Path,
    args: &Args,
    duration_s: u64,
    url: &str,
    log: &Path,
) -> anyhow::Result<WrkResult> {
    let mut cmd = Command::new(wrk);
    cmd.args([
        format!("-t{}", args.threads),
        format!("-c{}", args.connections),
        format!("-d{duration_s}s"),
        "--latency".to_owned(),
        url.to_owned(),
    ]);
    let mut proc = Proc::spawn("wrk", &mut cmd, log)?;
    let deadline = Instant::now() + Duration::from_secs(duration_s) + WRK_GRACE;
    let status = loop {
        if let Some(status) = proc.child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!(
                "wrk on {url} did not end within {:?}",
                Duration::from_secs(duration_s) + WRK_GRACE
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    let out = proc.log_text();
    ensure!(status.success(), "wrk on {url} failed ({status}):\n{out}");
    parse_wrk(&out).with_context(|| format!("reading wrk's report on {url}:\n{out}"))
}

// ---------------------------------------------------------------------------------------
// The run.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    NoCache,
    CacheHits,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::NoCache => "no cache",
            Case::CacheHits => "cache hits",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Case::NoCache => "/nocache",
            Case::CacheHits => "/cached",
        }
    }
}

/// What is measured: wrk straight at be1, or one of the proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Direct,
    /// The agent with its access log off.
    Xdplb,
    /// The agent with its access log on (its default), written to a file.
    XdplbLog,
    /// The i-th `--agent-b` binary, access log off.
    XdplbAlt(usize),
    Haproxy,
    Nginx,
}

/// One proxy (or the backend itself) at one thread count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Target {
    kind: Kind,
    /// The proxy's threads: `[agent] workers`, HAProxy's `nbthread`, nginx's
    /// `worker_processes` (1 for direct: the backend's one thread).
    threads: u32,
}

impl Target {
    fn label(self, case: Case) -> String {
        let t = self.threads;
        match (self.kind, case) {
            (Kind::Direct, _) => "direct (be1)".to_owned(),
            (Kind::Xdplb, _) => format!("xdplb {t}t"),
            (Kind::XdplbLog, _) => format!("xdplb {t}t, access log"),
            (Kind::XdplbAlt(i), _) => format!("xdplb ({}) {t}t", alt_letter(i)),
            (Kind::Haproxy, Case::NoCache) => format!("haproxy {t}t"),
            (Kind::Haproxy, Case::CacheHits) => format!("haproxy {t}t (bonus)"),
            (Kind::Nginx, _) => format!("nginx {t}t"),
        }
    }
}

/// One measured row.
struct Row {
    case: Case,
    target: Target,
    wrk: WrkResult,
    /// Requests be1 and be2 received during the measured run.
    backend_requests: [u64; 2],
    /// Connections be1 and be2 accepted during the measured run (new ones: a proxy that
    /// reuses its keep-alive connections opens few).
    backend_connections: u64,
    /// CPU seconds the proxy's processes used during the measured run.
    cpu_s: Option<f64>,
    /// Problems that make the row doubtful.
    flags: Vec<String>,
}

/// One running proxy.
struct Instance {
    target: Target,
    proc: Proc,
    ports: Ports,
}

/// Everything started for a run. Field order is drop order: the processes stop before
/// the directory they use is removed.
struct Bed {
    backends: Vec<Proc>,
    proxies: Vec<Instance>,
    backend_ports: [u16; 2],
    dir: tempfile::TempDir,
}

/// The agent's log filter: `info` (so `agent ready` shows), without the access log
/// unless `access_log`.
fn agent_log_filter(access_log: bool) -> &'static str {
    if access_log { "info" } else { AGENT_LOG_FILTER }
}

/// The letter of the i-th `--agent-b` binary: B, C, ...
fn alt_letter(i: usize) -> char {
    char::from(b'B' + u8::try_from(i % 24).unwrap_or(0))
}

/// The proxies started at each thread count: the agent (without and with its access
/// log), the `--agent-b` ones, HAProxy, nginx.
fn proxy_kinds(tools: &Tools) -> Vec<Kind> {
    let mut kinds = vec![Kind::Xdplb, Kind::XdplbLog];
    kinds.extend((0..tools.agent_b.len()).map(Kind::XdplbAlt));
    kinds.extend([Kind::Haproxy, Kind::Nginx]);
    kinds
}

impl Bed {
    fn start(tools: &Tools, threads: &[u32]) -> anyhow::Result<Self> {
        // Removed when dropped: declared before the processes that use it (and Bed's last
        // field), so it goes after them.
        let dir = tempfile::Builder::new()
            .prefix("xdplb-bench-l7.")
            .tempdir()
            .context("creating the run's temporary directory")?;
        let bp = free_ports(2)?;
        let backend_ports = [bp[0], bp[1]];
        let me = std::env::current_exe().context("locating this binary")?;
        let mut backends = Vec::new();
        for (i, port) in backend_ports.iter().enumerate() {
            let name = format!("be{}", i + 1);
            let mut cmd = Command::new(&me);
            cmd.args(["l7-backend", "--port", &port.to_string(), "--name", &name]);
            backends.push(Proc::spawn(
                &name,
                &mut cmd,
                &dir.path().join(format!("{name}.log")),
            )?);
        }
        for (b, port) in backends.iter_mut().zip(backend_ports) {
            wait_for_http(b, (LOCALHOST, port).into(), "/nocache")?;
        }
        let mut bed = Bed {
            backends,
            proxies: Vec::new(),
            backend_ports,
            dir,
        };
        for &t in threads {
            for kind in proxy_kinds(tools) {
                let target = Target { kind, threads: t };
                let ports = Ports::pick(backend_ports)?;
                let proc = bed.start_proxy(tools, target, &ports)?;
                bed.proxies.push(Instance {
                    target,
                    proc,
                    ports,
                });
            }
        }
        for i in 0..bed.proxies.len() {
            let target = bed.proxies[i].target;
            for case in [Case::NoCache, Case::CacheHits] {
                let addr = bed.addr(target, case);
                wait_for_http(bed.proc(target), addr, case.path())?;
            }
        }
        bed.check_round_robin()?;
        Ok(bed)
    }

    fn start_proxy(&self, tools: &Tools, target: Target, ports: &Ports) -> anyhow::Result<Proc> {
        let t = target.threads;
        let dir = self.dir.path();
        match target.kind {
            Kind::Direct => bail!("direct is not a proxy"),
            Kind::Xdplb | Kind::XdplbLog | Kind::XdplbAlt(_) => {
                let access_log = target.kind == Kind::XdplbLog;
                let (binary, alt) = match target.kind {
                    Kind::XdplbAlt(i) => (
                        tools.agent_b.get(i).context("an --agent-b binary")?,
                        format!("-{}", alt_letter(i)),
                    ),
                    _ => (&tools.agent, String::new()),
                };
                let name = format!("agent{alt}-{t}t{}", if access_log { "-log" } else { "" });
                let state_dir = dir.join(format!("{name}-state"));
                fs::create_dir_all(&state_dir)?;
                let agent_config = dir.join(format!("{name}.toml"));
                fs::write(&agent_config, agent_toml(ports, &state_dir, t))?;
                let mut cmd = Command::new(binary);
                cmd.arg("run")
                    .arg("--config")
                    .arg(&agent_config)
                    .args(["--xdp-mode", "off", "--api"])
                    .arg(format!("127.0.0.1:{}", ports.api))
                    .arg("--state-dir")
                    .arg(&state_dir)
                    .env("XDPLB_LOG", agent_log_filter(access_log))
                    .env_remove("RUST_LOG");
                let mut agent = Proc::spawn(&name, &mut cmd, &dir.join(format!("{name}.log")))?;
                let deadline = Instant::now() + START_TIMEOUT;
                while !agent.log_text().contains(AGENT_READY) {
                    agent.alive()?;
                    ensure!(
                        Instant::now() < deadline,
                        "lb-agent did not log `{AGENT_READY}` within {START_TIMEOUT:?}; its log:\n{}",
                        agent.log_tail()
                    );
                    thread::sleep(Duration::from_millis(50));
                }
                Ok(agent)
            }
            Kind::Haproxy => {
                let haproxy_config = dir.join(format!("haproxy-{t}t.cfg"));
                fs::write(&haproxy_config, haproxy_cfg(ports, t))?;
                let check = Command::new(&tools.haproxy)
                    .arg("-c")
                    .arg("-f")
                    .arg(&haproxy_config)
                    .output()
                    .context("haproxy -c")?;
                ensure!(
                    check.status.success(),
                    "haproxy rejects the bench config: {}{}",
                    String::from_utf8_lossy(&check.stdout),
                    String::from_utf8_lossy(&check.stderr)
                );
                let mut cmd = Command::new(&tools.haproxy);
                cmd.arg("-db").arg("-f").arg(&haproxy_config);
                Proc::spawn(
                    &format!("haproxy {t}t"),
                    &mut cmd,
                    &dir.join(format!("haproxy-{t}t.log")),
                )
            }
            Kind::Nginx => {
                let ndir = dir.join(format!("nginx-{t}t"));
                fs::create_dir_all(&ndir)?;
                let nginx_config = ndir.join("nginx.conf");
                fs::write(&nginx_config, nginx_conf(ports, &ndir, t))?;
                let mut cmd = Command::new(&tools.nginx);
                cmd.arg("-c")
                    .arg(&nginx_config)
                    .arg("-p")
                    .arg(&ndir)
                    .arg("-e")
                    .arg(ndir.join("nginx.log"));
                Proc::spawn(&format!("nginx {t}t"), &mut cmd, &ndir.join("nginx.out"))
            }
        }
    }

    fn instance(&self, target: Target) -> &Instance {
        self.proxies
            .iter()
            .find(|i| i.target == target)
            .expect("every target measured was started")
    }

    fn addr(&self, target: Target, case: Case) -> SocketAddr {
        let i = usize::from(case == Case::CacheHits);
        let port = match target.kind {
            Kind::Direct => self.backend_ports[0],
            _ => self.instance(target).ports.proxy[i],
        };
        (LOCALHOST, port).into()
    }

    fn proc(&mut self, target: Target) -> &mut Proc {
        match target.kind {
            Kind::Direct => &mut self.backends[0],
            _ => {
                &mut self
                    .proxies
                    .iter_mut()
                    .find(|i| i.target == target)
                    .expect("every target measured was started")
                    .proc
            }
        }
    }

    /// Empties the log files of agents with their access log on (their lines are
    /// appended: the file stays small, while the agent still writes every line).
    fn trim_access_logs(&self) {
        for i in &self.proxies {
            if i.target.kind == Kind::XdplbLog {
                if let Ok(f) = fs::OpenOptions::new().write(true).open(&i.proc.log) {
                    let _ = f.set_len(0);
                }
            }
        }
    }

    fn all_alive(&mut self) -> anyhow::Result<()> {
        for p in self
            .backends
            .iter_mut()
            .chain(self.proxies.iter_mut().map(|i| &mut i.proc))
        {
            p.alive()?;
        }
        Ok(())
    }

    /// Requests be1 and be2 have answered on `/nocache` and `/cached`, and connections
    /// they accepted (each `/count` request is one more).
    fn backend_counts(&self) -> anyhow::Result<[(u64, u64); 2]> {
        let mut out = [(0, 0); 2];
        for (n, port) in out.iter_mut().zip(self.backend_ports) {
            let r = http::get((LOCALHOST, port).into(), "/count", Duration::from_secs(2))
                .with_context(|| format!("reading the request count of 127.0.0.1:{port}"))?;
            ensure!(r.status == 200, "GET /count: {r:?}");
            let (requests, connections) = r
                .body
                .trim()
                .split_once(' ')
                .with_context(|| format!("GET /count: {:?}", r.body))?;
            *n = (
                requests.parse().context("GET /count")?,
                connections.parse().context("GET /count")?,
            );
        }
        Ok(out)
    }

    /// Every proxy sends requests to both backends.
    fn check_round_robin(&self) -> anyhow::Result<()> {
        for i in &self.proxies {
            let target = i.target;
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..6 {
                let r = http::get(
                    self.addr(target, Case::NoCache),
                    "/nocache",
                    Duration::from_secs(2),
                )?;
                ensure!(
                    r.status == 200 && r.body.len() == BODY_LEN,
                    "{}: GET /nocache: {r:?}",
                    target.label(Case::NoCache)
                );
                seen.insert(r.backend().to_owned());
            }
            ensure!(
                seen.len() == 2,
                "{}: only {seen:?} answered 6 requests",
                target.label(Case::NoCache)
            );
        }
        Ok(())
    }

    /// One GET of `/cached` through `target`: whether its cache answered (the header
    /// each proxy sets for a hit), with the header's value for messages.
    fn cache_hit(&self, target: Target) -> anyhow::Result<(bool, String)> {
        let r = http::get(
            self.addr(target, Case::CacheHits),
            "/cached",
            Duration::from_secs(2),
        )?;
        ensure!(
            r.status == 200 && r.body.len() == BODY_LEN,
            "{}: GET /cached: {r:?}",
            target.label(Case::CacheHits)
        );
        Ok(match target.kind {
            Kind::Direct => (false, String::new()),
            Kind::Xdplb | Kind::XdplbLog | Kind::XdplbAlt(_) => {
                let v = r.header("cache-status").unwrap_or("(none)").to_owned();
                (v.contains("; hit"), format!("Cache-Status: {v}"))
            }
            Kind::Haproxy | Kind::Nginx => {
                let v = r.header("x-cache-status").unwrap_or("(none)").to_owned();
                (v == "HIT", format!("X-Cache-Status: {v}"))
            }
        })
    }
}

/// The programs the run needs.
struct Tools {
    agent: PathBuf,
    /// `--agent-b`, in order.
    agent_b: Vec<PathBuf>,
    haproxy: PathBuf,
    nginx: PathBuf,
    wrk: PathBuf,
}

impl Tools {
    fn find(agent_b: &[PathBuf]) -> anyhow::Result<Self> {
        let agent = agent_binary()?;
        for b in agent_b {
            ensure!(b.is_file(), "--agent-b {}: not a file", b.display());
        }
        let found: Vec<Option<PathBuf>> = ["haproxy", "nginx", "wrk"]
            .iter()
            .map(|p| find_program(p))
            .collect();
        let missing: Vec<&str> = ["haproxy", "nginx", "wrk"]
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(p, _)| *p)
            .collect();
        ensure!(
            missing.is_empty(),
            "missing {}: `cargo xtask bench l7` installs them from Debian \
             (or `apt-get install --no-install-recommends haproxy nginx wrk`)",
            missing.join(", ")
        );
        let mut found = found.into_iter().flatten();
        let mut next = || found.next().expect("checked above");
        Ok(Self {
            agent,
            agent_b: agent_b.to_vec(),
            haproxy: next(),
            nginx: next(),
            wrk: next(),
        })
    }
}

/// Runs every case against every target and prints the table.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let tools = Tools::find(&args.agent_b)?;
    let mut targets = vec![Target {
        kind: Kind::Direct,
        threads: 1,
    }];
    for &t in &args.proxy_threads {
        for kind in proxy_kinds(&tools) {
            targets.push(Target { kind, threads: t });
        }
    }
    let wanted = |case: Case, target: Target| {
        let label = format!("{} / {}", case.label(), target.label(case));
        args.only.is_empty() || args.only.iter().any(|o| label.contains(o.as_str()))
    };
    let mut bed = Bed::start(&tools, &args.proxy_threads)?;
    eprintln!(
        "l7: {} run(s) x 2 cases x {} targets, {} s warm-up + {} s measured each (wrk -t{} -c{}); backends on 127.0.0.1:{}/{}",
        args.runs,
        targets.len(),
        args.warmup_s,
        args.duration_s,
        args.threads,
        args.connections,
        bed.backend_ports[0],
        bed.backend_ports[1]
    );
    let wrk_log = bed.dir.path().join("wrk.out");
    let mut rows = Vec::new();
    for run in 0..args.runs {
        for case in [Case::NoCache, Case::CacheHits] {
            for &target in &targets {
                if !wanted(case, target) {
                    continue;
                }
                let direct = target.kind == Kind::Direct;
                let addr = bed.addr(target, case);
                let url = format!("http://{addr}{}", case.path());
                let label = format!("{} / {}", case.label(), target.label(case));
                if args.warmup_s > 0 {
                    wrk(&tools.wrk, args, args.warmup_s, &url, &wrk_log)
                        .with_context(|| format!("{label}: warm-up"))?;
                }
                let mut flags = Vec::new();
                if case == Case::CacheHits && !direct {
                    let (hit, shown) = bed.cache_hit(target)?;
                    if !hit {
                        flags.push(format!("not a cache hit ({shown})"));
                    }
                }
                bed.trim_access_logs();
                let before = bed.backend_counts()?;
                let cpu_before = (!direct).then(|| cpu_seconds(bed.proc(target).pid()));
                let result = wrk(&tools.wrk, args, args.duration_s, &url, &wrk_log)
                    .with_context(|| label.clone())?;
                let cpu_s = cpu_before.map(|b| cpu_seconds(bed.proc(target).pid()) - b);
                let after = bed.backend_counts()?;
                bed.all_alive()?;
                let backend_requests = [after[0].0 - before[0].0, after[1].0 - before[1].0];
                // Less the one `/count` connection per backend of the `before` reading.
                let backend_connections =
                    (after[0].1 - before[0].1 - 1) + (after[1].1 - before[1].1 - 1);
                flags.extend(result.errors());
                if case == Case::CacheHits && !direct {
                    let forwarded = backend_requests[0] + backend_requests[1];
                    // A few misses are expected at most (an entry expiring, a race at start).
                    if forwarded * 100 > result.requests.max(1) {
                        flags.push(format!("{forwarded} requests reached the backends"));
                    }
                }
                let cpu_per_req = cpu_s.map_or_else(String::new, |c| {
                    format!(
                        "  cpu {:>5.1} us/req",
                        c * 1e6 / result.requests.max(1) as f64
                    )
                });
                eprintln!(
                    "  run {} {label:<38} {:>9.0} req/s  p50 {:>9}  p99 {:>9}{cpu_per_req}{}",
                    run + 1,
                    result.requests_per_s,
                    fmt_latency(result.p50_us),
                    fmt_latency(result.p99_us),
                    if flags.is_empty() {
                        String::new()
                    } else {
                        format!("  [{}]", flags.join("; "))
                    }
                );
                rows.push(Row {
                    case,
                    target,
                    wrk: result,
                    backend_requests,
                    backend_connections,
                    cpu_s,
                    flags,
                });
            }
        }
    }
    bed.trim_access_logs();
    let notes = Notes::gather(&tools);
    drop(bed);
    report(args, &rows, &notes, started.elapsed())
}

fn fmt_latency(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} us")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

struct Notes {
    cpus: usize,
    cpu_model: String,
    kernel: String,
    agent: String,
    agent_b: Vec<String>,
    haproxy: String,
    nginx: String,
    wrk: String,
}

impl Notes {
    fn gather(tools: &Tools) -> Self {
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("model name")
                        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
                })
            })
            .unwrap_or_else(|| "unknown CPU".to_owned());
        Self {
            cpus: thread::available_parallelism().map_or(0, usize::from),
            cpu_model,
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned()),
            agent: version_of(&tools.agent, &["--version"]),
            agent_b: tools
                .agent_b
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    format!(
                        "xdplb ({}) = {}: {}",
                        alt_letter(i),
                        b.display(),
                        version_of(b, &["--version"])
                    )
                })
                .collect(),
            haproxy: version_of(&tools.haproxy, &["-v"]),
            nginx: version_of(&tools.nginx, &["-v"]),
            wrk: version_of(&tools.wrk, &["-v"]),
        }
    }
}

fn report(args: &Args, rows: &[Row], notes: &Notes, took: Duration) -> anyhow::Result<()> {
    let mut report = Report::new(
        "l7",
        format!(
            "HTTP/1.1 reverse proxies on loopback in front of the same two backends, \
             wrk -t{} -c{} -d{}s --latency after a {} s warm-up; {} run(s) per row, figures are median (min-max)",
            args.threads, args.connections, args.duration_s, args.warmup_s, args.runs
        ),
    );
    // The rows of one (case, target), in run order.
    let mut groups: Vec<Vec<&Row>> = Vec::new();
    for r in rows {
        match groups
            .iter_mut()
            .find(|g| g[0].case == r.case && g[0].target == r.target)
        {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    let rps = |g: &[&Row]| g.iter().map(|r| r.wrk.requests_per_s).collect::<Vec<_>>();
    let median_rps = |case: Case, target: Target| {
        groups
            .iter()
            .find(|g| g[0].case == case && g[0].target == target)
            .map(|g| report::median(&rps(g)))
    };
    let ratio = |v: f64, base: Option<f64>| match base {
        Some(b) if b > 0.0 => format!("{:.2}", v / b),
        _ => "-".to_owned(),
    };
    let mut cells = Vec::new();
    for g in &groups {
        let (case, target) = (g[0].case, g[0].target);
        let flags: Vec<String> = g.iter().flat_map(|r| r.flags.iter().cloned()).collect();
        let flagged = if flags.is_empty() { "" } else { " !" };
        let rps_cell = Cell::samples("", 0, &rps(g));
        let m = rps_cell.median().unwrap_or(f64::NAN);
        let latency = |f: fn(&Row) -> f64| {
            let v: Vec<f64> = g.iter().map(|r| f(r)).collect();
            let st = report::Stats::of(&v).expect("one run at least");
            let shown = if v.len() == 1 {
                fmt_latency(st.median)
            } else {
                format!(
                    "{} ({}-{})",
                    fmt_latency(st.median),
                    fmt_latency(st.min),
                    fmt_latency(st.max)
                )
            };
            Cell::samples("us", 0, &v).with_shown(shown)
        };
        let cpu: Vec<f64> = g
            .iter()
            .filter_map(|r| r.cpu_s.map(|cpu| cpu * 1e6 / r.wrk.requests.max(1) as f64))
            .collect();
        let backend: Vec<String> = g
            .iter()
            .map(|r| format!("{}+{}", r.backend_requests[0], r.backend_requests[1]))
            .collect();
        let conns: Vec<f64> = g.iter().map(|r| r.backend_connections as f64).collect();
        cells.push(vec![
            Cell::text(case.label()),
            Cell::text(format!("{}{flagged}", target.label(case))),
            rps_cell,
            latency(|r| r.wrk.p50_us),
            latency(|r| r.wrk.p99_us),
            Cell::text(ratio(
                m,
                median_rps(
                    case,
                    Target {
                        kind: Kind::Haproxy,
                        ..target
                    },
                ),
            )),
            Cell::text(ratio(
                m,
                median_rps(
                    case,
                    Target {
                        kind: Kind::Nginx,
                        ..target
                    },
                ),
            )),
            if cpu.is_empty() {
                Cell::text("-")
            } else {
                Cell::samples("us", 1, &cpu)
            },
            Cell::text(backend.join(", ")),
            Cell::samples("", 0, &conns),
            Cell::text(if flags.is_empty() {
                "-".to_owned()
            } else {
                flags.join("; ")
            }),
        ]);
    }
    let table = report.table(
        "",
        &[
            ("case", false),
            ("proxy", false),
            ("req/s", true),
            ("p50", true),
            ("p99", true),
            ("vs haproxy", true),
            ("vs nginx", true),
            ("proxy CPU/req", true),
            ("backend reqs be1+be2 (per run)", true),
            ("new be conns", true),
            ("errors / flags", false),
        ],
    );
    for c in cells {
        table.row(c);
    }
    let mut n = String::new();
    let _ = write!(
        n,
        "Machine: {} CPUs ({}), kernel {}. wrk, the proxy under test and both backends share these
  CPUs, so the figures are relative: compare rows of one run, not with other machines.
Versions: {}; {}; {}; {}.
Settings (each proxy: one port without a cache, one with; round robin over be1 and be2, keep-alive
  to the backends, no access log unless the row says so). Nt = the proxy runs N threads.
- backends: this binary (`xdplb-bench l7-backend`), hyper 1 HTTP/1.1 on one tokio thread each;
  /nocache and /cached return the same {BODY_LEN}-byte body with Cache-Control no-store and
  public, max-age=3600. direct = wrk straight at be1 (the floor; one backend, one thread).
- xdplb: lb-agent run --xdp-mode off, services `plain` (no cache) and `cached`
  (cache = {{ max_bytes = {CACHE_BYTES} }}), scheduler round-robin, default [service.http]
  settings, [agent] workers = N; XDPLB_LOG={AGENT_LOG_FILTER}. \"access log\" rows: XDPLB_LOG=info,
  the agent's default: one xdplb::access line per request, written to a file (emptied
  between rows). The agent reads XDPLB_LOG, not RUST_LOG.{}
- haproxy: mode http, nbthread N, balance roundrobin, http-reuse always, option http-keep-alive,
  no log; cache row (bonus): `cache` section of {} MB, http-request cache-use /
  http-response cache-store, X-Cache-Status set from res.cache_hit.
- nginx: worker_processes N, upstream keepalive 64, proxy_http_version 1.1,
  proxy_set_header Connection \"\", access_log off; cache row: proxy_cache (proxy_cache_path
  in a temporary directory), add_header X-Cache-Status $upstream_cache_status.
Columns: vs haproxy / vs nginx = this row's median req/s / that proxy's median req/s in the same
  case at the same thread count.
  proxy CPU/req = user+system CPU time of the proxy's processes (all threads; nginx's workers)
  during the measured run / requests wrk completed. backend reqs = requests be1 and be2
  counted during the measured run (no cache: about all, split by round robin; cache hits:
  none). new be conns = connections the backends accepted during it (wrk's own for direct;
  a proxy that keeps its backend connections alive opens none or few). Each cache row was
  preceded by a request whose header showed a hit.
  ! = a row with errors or flags (non-2xx/3xx responses, socket errors, no cache hit, more
  than 1% of cache-hit requests forwarded): its figures are doubtful.
{} wrk runs took {:.0} s in all.",
        notes.cpus,
        notes.cpu_model,
        notes.kernel,
        notes.agent,
        notes.haproxy,
        notes.nginx,
        notes.wrk,
        notes
            .agent_b
            .iter()
            .map(|b| format!("\n- {b}: the same settings as xdplb, access log off (--agent-b)."))
            .collect::<String>(),
        CACHE_BYTES / (1024 * 1024),
        rows.len(),
        took.as_secs_f64()
    );
    report.note(n);
    report.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUT: &str = "Running 5s test @ http://127.0.0.1:8080/nocache
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   612.50us  301.22us  12.01ms   91.02%
    Req/Sec    25.31k     1.20k   28.00k    70.00%
  Latency Distribution
     50%  560.00us
     75%  700.12us
     90%    0.88ms
     99%    1.75ms
  251843 requests in 5.00s, 189.60MB read
  Socket errors: connect 0, read 2, write 0, timeout 7
  Non-2xx or 3xx responses: 3
Requests/sec:  50357.41
Transfer/sec:     37.91MB
";

    #[test]
    fn parses_wrk_reports() {
        let r = parse_wrk(WRK_OUT).unwrap();
        assert_eq!(r.requests_per_s, 50357.41);
        assert_eq!(r.p50_us, 560.0);
        assert_eq!(r.p99_us, 1750.0);
        assert_eq!(r.requests, 251_843);
        assert_eq!(r.non_2xx_3xx, 3);
        assert_eq!(r.socket_errors, [0, 2, 0, 7]);
        assert_eq!(r.errors(), ["3 non-2xx/3xx", "2 read", "7 timeout"]);
        let clean = WRK_OUT
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(parse_wrk(&clean).unwrap().errors().is_empty());
        assert!(parse_wrk("Requests/sec: 1\n").is_err());
    }

    #[test]
    fn latency_units() {
        assert_eq!(parse_latency("812.00us").unwrap(), 812.0);
        assert_eq!(parse_latency("1.5ms").unwrap(), 1500.0);
        assert_eq!(parse_latency("2.00s").unwrap(), 2e6);
        assert_eq!(parse_latency("1.00m").unwrap(), 60e6);
        assert!(parse_latency("12").is_err());
        assert_eq!(fmt_latency(560.0), "560 us");
        assert_eq!(fmt_latency(1750.0), "1.75 ms");
    }

    #[test]
    fn args_and_configs() {
        use clap::Parser as _;
        let a = |v: &[&str]| {
            let argv = ["xdplb-bench", "l7"].iter().chain(v);
            let cli = crate::Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
            match cli.benchmark {
                crate::Benchmark::L7(args) => args.check().map(|()| args),
                other => panic!("parsed as {other:?}"),
            }
        };
        let d = a(&[]).unwrap();
        assert_eq!((d.duration_s, d.connections, d.threads), (5, 32, 2));
        assert_eq!(d.proxy_threads, [1, 2]);
        assert!(d.only.is_empty() && d.agent_b.is_empty());
        let b = a(&["--agent-b", "/tmp/old-agent", "--agent-b", "/tmp/b"]).unwrap();
        assert_eq!(
            b.agent_b,
            [Path::new("/tmp/old-agent"), Path::new("/tmp/b")]
        );
        assert_eq!((alt_letter(0), alt_letter(1)), ('B', 'C'));
        let o = a(&[
            "--proxy-threads",
            "2",
            "--only",
            "xdplb",
            "--only",
            "nginx 2t",
        ])
        .unwrap();
        assert_eq!((o.proxy_threads, o.only.len()), (vec![2], 2));
        assert!(a(&["--proxy-threads", "0"]).is_err());
        let s = a(&["--duration=2", "--connections", "8", "--warmup", "0"]).unwrap();
        assert_eq!((s.duration_s, s.connections, s.warmup_s), (2, 8, 0));
        assert!(a(&["--help"]).unwrap_err().contains("Usage"));
        assert!(a(&["--duration", "0"]).is_err());
        assert!(a(&["--connections", "1"]).is_err());
        assert!(a(&["--bogus"]).is_err());
        let b = crate::Cli::try_parse_from(["xdplb-bench", "l7-backend", "--port", "9"]).unwrap();
        let crate::Benchmark::L7Backend(b) = b.benchmark else {
            panic!("not l7-backend")
        };
        assert_eq!((b.port, b.name.as_str()), (9, "backend"));
        assert!(crate::Cli::try_parse_from(["xdplb-bench", "l7-backend"]).is_err());

        assert_eq!(body_of("be1").len(), BODY_LEN);
        assert!(body_of("be2").starts_with(b"be2\n"));
        let ports = Ports {
            backends: [1001, 1002],
            api: 1003,
            proxy: [1004, 1005],
        };
        let toml = agent_toml(&ports, Path::new("/tmp/s"), 3);
        let config = lb_agent::config::Config::parse(&toml, "bench.toml")
            .unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(config.services.len(), 2);
        assert_eq!(config.agent.workers, Some(3));
        assert!(config.services[0].cache.is_none());
        assert_eq!(
            config.services[1].cache.as_ref().map(|c| c.max_bytes),
            Some(CACHE_BYTES)
        );
        let h = haproxy_cfg(&ports, 1);
        assert!(h.contains("server be2 127.0.0.1:1002") && h.contains("nbthread 1\n"));
        let n = nginx_conf(&ports, Path::new("/tmp/d"), 2);
        assert!(n.contains("listen 127.0.0.1:1005;") && n.contains("worker_processes 2;"));
    }
}
