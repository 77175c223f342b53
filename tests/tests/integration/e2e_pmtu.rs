//! Path MTU end to end (issue 11, item 3), in the step-1 namespaces: the server LAN and
//! the agent's `dataplane.mtu` are 1500 (the defaults), so a full-size client segment
//! (1500 bytes, DF set as Linux sends TCP) no longer fits once the LB adds its 20-byte
//! tunnel header. The LB answers it from XDP with ICMP "fragmentation needed"
//! (next-hop MTU 1480); the client's kernel caches that path MTU (`ip route get`
//! shows `mtu 1480`) and resends smaller segments, and a 4 MiB upload to the VIP
//! completes. The upload's sink is a plain TCP socket on every backend (the VIP is on
//! their `lo`); the client is the kernel's TCP stack behind a std `TcpStream`.
//!
//! Needs root (see `netns::require_privileges`) and the agent binary
//! (`XDPLB_AGENT_BIN`, else `target/release/lb-agent`).

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, ensure};
use xdplb_tests::{
    config::{BackendConfig, ServiceConfig},
    http, netns, require_privileges,
    scenario::{BedOptions, L4Bed},
    topology::{BACKEND_ADDRS, Topology, VIP},
};

/// The upload service's port (service `upload` beside step 1's `web`).
const UPLOAD_PORT: u16 = 5001;
const UPLOAD_BYTES: u64 = 4 << 20;
/// Bound on the whole upload.
const UPLOAD_DEADLINE: Duration = Duration::from_secs(30);
const API_LISTEN: &str = "127.0.0.1:9090";

/// A TCP sink in a backend: takes one connection, reads it to the end and answers
/// with the byte count (8 bytes, big endian). Ends by itself at `stop` or the deadline.
fn sink(ns: &str, stop: Arc<AtomicBool>) -> anyhow::Result<JoinHandle<anyhow::Result<u64>>> {
    let listener = netns::in_netns(ns, || {
        let l = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], UPLOAD_PORT)))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .with_context(|| format!("binding the sink in {ns}"))?;
    Ok(thread::spawn(move || {
        let deadline = Instant::now() + UPLOAD_DEADLINE + Duration::from_secs(5);
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        return Ok(0);
                    }
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).context("accept"),
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(UPLOAD_DEADLINE))?;
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0u64;
        loop {
            let n = conn.read(&mut buf).context("reading the upload")?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        conn.write_all(&total.to_be_bytes())?;
        Ok(total)
    }))
}

/// `ip route get VIP` in the client's namespace.
fn route_to_vip(client_ns: &str) -> anyhow::Result<String> {
    netns::run(&["ip", "-n", client_ns, "route", "get", &VIP.to_string()])
}

/// The value of `xdplb_fastpath_packets_total{result="<result>"}` in `/metrics`.
fn fastpath_counter(lb_ns: &str, result: &str) -> anyhow::Result<f64> {
    let addr: SocketAddr = API_LISTEN.parse()?;
    let text = netns::in_netns(lb_ns, move || {
        let r = http::request(addr, "GET", "/metrics", &[], None, Duration::from_secs(3))?;
        ensure!(r.status == 200, "GET /metrics: status {}", r.status);
        Ok(r.body)
    })?;
    let prefix = format!("xdplb_fastpath_packets_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
        .ok_or_else(|| anyhow!("no {prefix} in /metrics:\n{text}"))
}

#[test]
fn a_client_learns_the_path_mtu_from_the_lb_and_uploads() -> anyhow::Result<()> {
    require_privileges!();
    let upload = BACKEND_ADDRS.iter().fold(
        ServiceConfig::new("upload", SocketAddrV4::new(VIP, UPLOAD_PORT).into()),
        |s, &a| s.backend(BackendConfig::new(a)),
    );
    let opts = BedOptions {
        config: Topology::default_config()
            .service(upload)
            .api_listen(API_LISTEN),
        ..BedOptions::default()
    };
    let bed = L4Bed::start(&opts)?;
    let t = &bed.topo;
    let before = route_to_vip(&t.client.ns)?;
    ensure!(
        !before.contains("mtu"),
        "the client has a path MTU to the VIP before any traffic: {before}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sinks = t
        .backends
        .iter()
        .map(|b| sink(&b.ns, stop.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let target = SocketAddr::from(SocketAddrV4::new(VIP, UPLOAD_PORT));
    let sent = netns::in_netns(&t.client.ns, move || {
        let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .with_context(|| format!("connecting to {target}"))?;
        s.set_write_timeout(Some(UPLOAD_DEADLINE))?;
        s.set_read_timeout(Some(UPLOAD_DEADLINE))?;
        let chunk = vec![0xa5u8; 64 << 10];
        let mut left = UPLOAD_BYTES;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n]).context("uploading")?;
            left -= n as u64;
        }
        s.shutdown(Shutdown::Write)?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count)
            .context("reading the sink's byte count")?;
        Ok(u64::from_be_bytes(count))
    });
    stop.store(true, Ordering::Relaxed);
    let received: Vec<u64> = sinks
        .into_iter()
        .map(|h| h.join().map_err(|_| anyhow!("a sink panicked"))?)
        .collect::<anyhow::Result<_>>()?;
    let after = route_to_vip(&t.client.ns)?;
    let frag_needed = fastpath_counter(&t.lb.ns, "icmp_frag_needed");
    eprintln!(
        "upload: {sent:?}; sinks {received:?}; route after: {after}; icmp_frag_needed {frag_needed:?}"
    );
    let sent = sent.with_context(|| {
        format!(
            "the upload failed; route: {after}\nagent log (tail):\n{}",
            t.agent_log_tail(30)
        )
    })?;
    ensure!(
        sent == UPLOAD_BYTES && received.iter().sum::<u64>() == UPLOAD_BYTES,
        "the sink got {received:?} bytes and said {sent}, want {UPLOAD_BYTES}"
    );
    ensure!(
        after.contains("mtu 1480"),
        "the client did not learn the path MTU 1480 to the VIP: {after}"
    );
    ensure!(
        frag_needed? >= 1.0,
        "the LB did not count the fragmentation needed it sent"
    );
    Ok(())
}
