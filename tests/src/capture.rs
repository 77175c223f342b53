//! Packet counting and ICMP echo inside namespaces, with raw sockets (no external tools).
//!
//! - [`Capture`]: an `AF_PACKET` socket bound to one interface of a namespace that
//!   counts the frames a filter accepts, by direction. On a host running XDP it sees
//!   what the program passed up (XDP runs before packet taps), so "the LB received no
//!   frame from the VIP" is a count of zero there; kernel-side drops are reported so a
//!   zero is never the result of an overrun buffer.
//! - [`ping`]: one ICMP echo request and its reply, from inside a namespace.

use std::{
    ffi::CString,
    mem::{size_of, zeroed},
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

use crate::{
    netns,
    packet::{self, Frame, IPPROTO_ICMP, Ipv4Packet},
};

/// Which frames of an interface a [`Capture`] looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Frames the interface received.
    Incoming,
    /// Frames the interface sent.
    Outgoing,
    /// Both.
    Both,
}

/// What a [`Capture`] counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureStats {
    /// Frames in the chosen direction that the filter accepted.
    pub matched: u64,
    /// Frames in the chosen direction.
    pub seen: u64,
    /// Frames the kernel dropped because the socket's buffer was full (should be 0).
    pub kernel_drops: u64,
}

/// Counts frames on one interface of a namespace until [`Capture::finish`].
#[derive(Debug)]
pub struct Capture {
    label: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<CaptureStats>>>,
}

type Filter = Box<dyn Fn(&[u8]) -> bool + Send>;

impl Capture {
    /// Starts counting frames on `iface` in namespace `ns` for which `filter(frame)` is
    /// true. Frames are seen from the moment this returns.
    pub fn start(
        ns: &str,
        iface: &str,
        direction: Direction,
        filter: impl Fn(&[u8]) -> bool + Send + 'static,
    ) -> anyhow::Result<Self> {
        let label = format!("{ns}/{iface}");
        let iface_owned = iface.to_owned();
        let fd = netns::in_netns(ns, move || packet_socket(&iface_owned))
            .with_context(|| format!("opening a packet socket on {label}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            let filter: Filter = Box::new(filter);
            thread::Builder::new()
                .name(format!("cap-{iface}"))
                .spawn(move || count(&fd, direction, &filter, &stop))?
        };
        Ok(Self {
            label,
            stop,
            thread: Some(thread),
        })
    }

    /// Counts IPv4 frames (untagged or with one VLAN tag) whose outer source is `src`.
    pub fn ipv4_source(
        ns: &str,
        iface: &str,
        direction: Direction,
        src: Ipv4Addr,
    ) -> anyhow::Result<Self> {
        Self::start(ns, iface, direction, move |frame| {
            Frame::parse(frame)
                .and_then(|f| f.ipv4())
                .is_ok_and(|ip| ip.src == src)
        })
    }

    /// `ns/iface`.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Stops counting (after reading what is queued) and returns the counts.
    pub fn finish(mut self) -> anyhow::Result<CaptureStats> {
        self.stop_thread()
            .with_context(|| format!("capture on {}", self.label))
    }

    fn stop_thread(&mut self) -> anyhow::Result<CaptureStats> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self
            .thread
            .take()
            .ok_or_else(|| anyhow!("capture already finished"))?;
        t.join().map_err(|_| anyhow!("capture thread panicked"))?
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.thread.is_some() {
            let _ = self.stop_thread();
        }
    }
}

fn last_error(what: &str) -> anyhow::Error {
    anyhow!("{what}: {}", std::io::Error::last_os_error())
}

/// `ETH_P_ALL` in network byte order, as `AF_PACKET` wants it.
fn eth_p_all_be() -> u16 {
    (libc::ETH_P_ALL as u16).to_be()
}

/// An `AF_PACKET` raw socket bound to `iface` (looked up in the calling thread's namespace).
fn packet_socket(iface: &str) -> anyhow::Result<OwnedFd> {
    let c = CString::new(iface)?;
    // SAFETY: c is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(ifindex != 0, "no interface {iface}");
    // Protocol 0 receives nothing until bound, so no frame of another interface gets in.
    // SAFETY: plain syscall.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(last_error("socket(AF_PACKET)"));
    }
    // SAFETY: raw is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let rcvbuf: libc::c_int = 8 << 20;
    set_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf)
        .or_else(|_| set_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf))?;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 20_000,
    };
    set_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    // SAFETY: sockaddr_ll is plain data; zeroed is valid.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = eth_p_all_be();
    sll.sll_ifindex = i32::try_from(ifindex)?;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(last_error("bind(AF_PACKET)"));
    }
    // Reading the statistics resets them: start from zero.
    packet_drops(&fd)?;
    Ok(fd)
}

fn set_opt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> anyhow::Result<()> {
    // SAFETY: value points to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(last_error("setsockopt"));
    }
    Ok(())
}

/// Frames dropped since the last call (`PACKET_STATISTICS` resets on read).
fn packet_drops(fd: &OwnedFd) -> anyhow::Result<u64> {
    // SAFETY: tpacket_stats is plain data.
    let mut st: libc::tpacket_stats = unsafe { zeroed() };
    let mut len = size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: st and len are valid out pointers of the right size.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&raw mut st).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(last_error("getsockopt(PACKET_STATISTICS)"));
    }
    Ok(u64::from(st.tp_drops))
}

/// Receives frames until `stop`, then drains what is queued and reads the drop count.
fn count(
    fd: &OwnedFd,
    direction: Direction,
    filter: &Filter,
    stop: &AtomicBool,
) -> anyhow::Result<CaptureStats> {
    let mut stats = CaptureStats::default();
    let mut buf = vec![0u8; 1 << 17];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        // SAFETY: sockaddr_ll is plain data.
        let mut from: libc::sockaddr_ll = unsafe { zeroed() };
        let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let flags = if stopping { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: buf and from are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
                (&raw mut from).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            match err.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut if stopping => break,
                std::io::ErrorKind::WouldBlock
                | std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::Interrupted => {
                    continue;
                }
                _ => bail!("recvfrom(AF_PACKET): {err}"),
            }
        }
        let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
        let wanted = match direction {
            Direction::Incoming => !outgoing,
            Direction::Outgoing => outgoing,
            Direction::Both => true,
        };
        if wanted {
            stats.seen += 1;
            let len = usize::try_from(n)?.min(buf.len());
            if filter(&buf[..len]) {
                stats.matched += 1;
            }
        }
    }
    stats.kernel_drops = packet_drops(fd)?;
    Ok(stats)
}

/// Sends one ICMP echo request to `target` from namespace `ns` and waits up to
/// `timeout` for the reply; returns the round-trip time.
pub fn ping(ns: &str, target: Ipv4Addr, timeout: Duration) -> anyhow::Result<Duration> {
    netns::in_netns(ns, move || ping_here(target, timeout))
        .with_context(|| format!("ping {target} from {ns}"))
}

fn ping_here(target: Ipv4Addr, timeout: Duration) -> anyhow::Result<Duration> {
    // SAFETY: plain syscall.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    if raw < 0 {
        return Err(last_error("socket(AF_INET, SOCK_RAW, ICMP)"));
    }
    // SAFETY: raw is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    set_opt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
    let ident = (std::process::id() as u16) ^ 0x5a5a;
    let mut echo = vec![8, 0, 0, 0];
    echo.extend_from_slice(&ident.to_be_bytes());
    echo.extend_from_slice(&1u16.to_be_bytes());
    echo.extend_from_slice(b"xdplb-tests ping");
    let csum = packet::internet_checksum(&echo);
    echo[2..4].copy_from_slice(&csum.to_be_bytes());
    // SAFETY: sockaddr_in is plain data.
    let mut to: libc::sockaddr_in = unsafe { zeroed() };
    to.sin_family = libc::AF_INET as libc::sa_family_t;
    to.sin_addr.s_addr = u32::from_ne_bytes(target.octets());
    let start = Instant::now();
    // SAFETY: echo and to are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            echo.as_ptr().cast(),
            echo.len(),
            0,
            (&raw const to).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(last_error("sendto"));
    }
    let mut buf = [0u8; 2048];
    while start.elapsed() < timeout {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            continue;
        }
        let Ok(ip) = Ipv4Packet::parse(&buf[..usize::try_from(n)?]) else {
            continue;
        };
        let p = &ip.payload;
        let is_reply = ip.protocol == IPPROTO_ICMP
            && ip.src == target
            && p.len() >= 8
            && p[0] == 0
            && p[4..6] == ident.to_be_bytes();
        if is_reply {
            return Ok(start.elapsed());
        }
    }
    bail!("no echo reply within {timeout:?}")
}
