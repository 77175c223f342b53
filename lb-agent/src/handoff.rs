//! Hand-off of the listening sockets from a running agent to a new one (a hitless
//! restart of the L7 proxy and the REST API), as HAProxy's seamless reload does: the
//! running agent listens on a Unix socket, `<state_dir>/handoff.sock` (0600, peers of
//! another uid are refused); a new agent for the same state directory connects there
//! when it starts and the two speak:
//!
//! 1. new → old: `XDPLB-TAKEOVER 1\n`.
//! 2. The old agent stops its control plane as at SIGTERM (API server, health checks,
//!    cluster store and BGP tasks; the fast path stays pinned for adoption), but keeps
//!    its L7 services accepting, then answers with one message: a 4-byte big-endian
//!    length, then an [`Offer`] in JSON, with the listening sockets' descriptors
//!    attached (`SCM_RIGHTS`: the REST API's first when the offer names it, then one per
//!    L7 VIP, in the offer's order).
//! 3. The new agent checks every descriptor (a listening TCP socket bound to the
//!    address the offer names), adopts the fast path, starts its L7 services on the
//!    inherited sockets and its API on the inherited API socket, and when they accept
//!    sends `READY\n`.
//! 4. The old agent stops accepting and drains its connections (HTTP/1: `Connection:
//!    close` on the next response; HTTP/2: GOAWAY; grace 5 s), leaves the VIPs it added
//!    to `lo` to the new agent, and exits.
//!
//! Between 2 and 3 the kernel queues new connections in the sockets' backlogs (the
//! sockets never close), so none is refused. Without an answer on the socket (no file,
//! or nobody listening: the old agent is gone) the new agent binds by itself; an old
//! agent that accepts the request but does not answer within [`OFFER_TIMEOUT`], or a
//! peer that answers something else, is an error naming what went wrong (the new agent
//! does not start: it could not bind the addresses anyway). An old agent whose new
//! agent goes away before `READY` (or does not send it within [`READY_TIMEOUT`]) drains
//! and exits all the same, saying so.
//!
//! Why not `SO_REUSEPORT` (both agents bind, the old one closes its socket): closing a
//! listening socket resets the connections waiting in its accept queue (unless the
//! kernel's `tcp_migrate_req` and a BPF `sk_reuseport` program move them), and while
//! both are bound new connections are spread to the old agent, which is about to stop.
//! Passing the very socket keeps one accept queue: nothing is lost, nothing is split.

use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd},
        unix::{fs::PermissionsExt as _, net::UnixStream},
    },
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The socket's file name under the state directory.
pub const SOCKET_FILE: &str = "handoff.sock";

/// How long a new agent waits for the running one's offer (it stops its control plane
/// and its API server first).
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the old agent waits for `READY` (the new agent loads the fast path and
/// starts its services in between).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// At most this many descriptors go in one `SCM_RIGHTS` message (the kernel's
/// `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

const REQUEST: &[u8] = b"XDPLB-TAKEOVER 1\n";
const READY: &[u8] = b"READY\n";
const VERSION: u32 = 1;
/// Largest offer accepted (JSON bytes).
const MAX_OFFER: usize = 1 << 20;

/// What the old agent hands over (the descriptors travel beside it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Protocol version (1).
    pub version: u32,
    /// The old agent's process id (for the logs).
    pub pid: u32,
    /// The REST API's address, when its socket is attached (first descriptor).
    pub api: Option<SocketAddr>,
    /// The L7 VIPs, one descriptor each, in this order after the API's.
    pub l7: Vec<SocketAddr>,
    /// The VIPs the old agent added to `lo`: the new agent removes them when done.
    pub vips_added: Vec<IpAddr>,
}

/// Why a hand-off failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("hand-off socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "hand-off socket {}: the running agent accepted the take-over but sent nothing within {timeout:?}; it may hang: stop it (SIGKILL if need be) and start again",
        path.display()
    )]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("hand-off socket {}: the peer is not a usable xdplb agent: {why}", path.display())]
    BadPeer { path: PathBuf, why: String },
}

/// The sockets a new agent inherited, and the line back to the old agent.
#[derive(Debug)]
pub struct Inherited {
    /// The old agent's process id.
    pub from_pid: u32,
    /// The REST API's listening socket.
    pub api: Option<(SocketAddr, std::net::TcpListener)>,
    /// The L7 VIPs' listening sockets.
    pub l7: BTreeMap<SocketAddr, std::net::TcpListener>,
    /// VIPs the old agent added to `lo`.
    pub vips_added: Vec<IpAddr>,
    conn: UnixStream,
}

impl Inherited {
    /// Tell the old agent this one accepts on the inherited sockets: it stops
    /// accepting and drains.
    pub fn ready(mut self) -> io::Result<()> {
        self.conn.write_all(READY)
    }
}

/// The hand-off socket's path under `state_dir`.
#[must_use]
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_FILE)
}

/// Ask the agent running for `state_dir` for its listening sockets. `Ok(None)`: no
/// agent answers there (none runs, or it is gone), bind as usual.
pub fn take_over(state_dir: &Path, timeout: Duration) -> Result<Option<Inherited>, HandoffError> {
    let path = socket_path(state_dir);
    let io_err = |source| HandoffError::Io {
        path: path.clone(),
        source,
    };
    let mut conn = match UnixStream::connect(&path) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                tracing::info!(path = %path.display(), "hand-off socket left by an agent that is gone: binding the sockets here");
            }
            return Ok(None);
        }
        Err(e) => return Err(io_err(e)),
    };
    conn.set_read_timeout(Some(timeout)).map_err(io_err)?;
    conn.set_write_timeout(Some(timeout)).map_err(io_err)?;
    conn.write_all(REQUEST).map_err(io_err)?;
    let (offer, fds) = match receive_offer(&mut conn) {
        Ok(r) => r,
        Err(Received::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(HandoffError::Timeout { path, timeout });
        }
        Err(Received::Io(e)) => return Err(io_err(e)),
        Err(Received::Bad(why)) => return Err(HandoffError::BadPeer { path, why }),
    };
    let bad = |why: String| HandoffError::BadPeer {
        path: path.clone(),
        why,
    };
    let mut fds = fds.into_iter();
    let mut listener = |addr: SocketAddr| -> Result<std::net::TcpListener, HandoffError> {
        let fd = fds
            .next()
            .ok_or_else(|| bad("fewer descriptors than the offer names".to_owned()))?;
        check_listener(fd, addr).map_err(bad)
    };
    let api = offer.api.map(|a| listener(a).map(|l| (a, l))).transpose()?;
    let mut l7 = BTreeMap::new();
    for &addr in &offer.l7 {
        l7.insert(addr, listener(addr)?);
    }
    if fds.next().is_some() {
        return Err(bad("more descriptors than the offer names".to_owned()));
    }
    conn.set_read_timeout(None).map_err(io_err)?;
    Ok(Some(Inherited {
        from_pid: offer.pid,
        api,
        l7,
        vips_added: offer.vips_added,
        conn,
    }))
}

enum Received {
    Io(io::Error),
    Bad(String),
}

impl From<io::Error> for Received {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Read one offer: length, JSON, with the descriptors of its first segment.
fn receive_offer(conn: &mut UnixStream) -> Result<(Offer, Vec<OwnedFd>), Received> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (n, fds) = {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let mut fds = Vec::new();
        let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these descriptors in this process
                // for us; nothing else owns them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if truncated {
            return Err(Received::Bad(format!(
                "more than {MAX_FDS} descriptors (truncated)"
            )));
        }
        (msg.bytes, fds)
    };
    if n == 0 {
        return Err(Received::Bad(
            "closed the connection without an offer".to_owned(),
        ));
    }
    let mut data = buf[..n].to_vec();
    while data.len() < 4 {
        let mut more = [0u8; 4];
        let k = conn.read(&mut more)?;
        if k == 0 {
            return Err(Received::Bad("the offer ends early".to_owned()));
        }
        data.extend_from_slice(&more[..k]);
    }
    let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
    if len > MAX_OFFER {
        return Err(Received::Bad(format!(
            "an offer of {len} bytes (at most {MAX_OFFER})"
        )));
    }
    while data.len() < 4 + len {
        let mut more = vec![0u8; 4 + len - data.len()];
        let k = conn.read(&mut more)?;
        if k == 0 {
            return Err(Received::Bad("the offer ends early".to_owned()));
        }
        data.extend_from_slice(&more[..k]);
    }
    if data.len() > 4 + len {
        return Err(Received::Bad("bytes after the offer".to_owned()));
    }
    let offer: Offer = serde_json::from_slice(&data[4..])
        .map_err(|e| Received::Bad(format!("the offer is not valid JSON: {e}")))?;
    if offer.version != VERSION {
        return Err(Received::Bad(format!(
            "protocol version {} (this agent speaks {VERSION})",
            offer.version
        )));
    }
    let named = offer.l7.len() + usize::from(offer.api.is_some());
    if named != fds.len() {
        return Err(Received::Bad(format!(
            "the offer names {named} sockets but {} descriptors came",
            fds.len()
        )));
    }
    Ok((offer, fds))
}

/// `fd` as a TCP listener, when it is one listening on `addr`.
fn check_listener(fd: OwnedFd, addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    use nix::sys::socket::{getsockopt, sockopt};
    let listening =
        getsockopt(&fd, sockopt::AcceptConn).map_err(|e| format!("descriptor for {addr}: {e}"))?;
    let stream = matches!(
        getsockopt(&fd, sockopt::SockType),
        Ok(nix::sys::socket::SockType::Stream)
    );
    if !listening || !stream {
        return Err(format!(
            "descriptor for {addr} is not a listening stream socket"
        ));
    }
    let listener = std::net::TcpListener::from(fd);
    let local = listener
        .local_addr()
        .map_err(|e| format!("descriptor for {addr}: {e}"))?;
    if local != addr {
        return Err(format!("descriptor for {addr} is bound to {local}"));
    }
    Ok(listener)
}

/// Send `offer` with `fds` (in the offer's order) over `conn`.
pub fn send_offer(conn: &UnixStream, offer: &Offer, fds: &[OwnedFd]) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!(
            "{} listening sockets: at most {MAX_FDS} can be handed over",
            fds.len()
        )));
    }
    let json = serde_json::to_vec(offer).map_err(io::Error::other)?;
    let len = u32::try_from(json.len()).map_err(io::Error::other)?;
    let mut data = len.to_be_bytes().to_vec();
    data.extend_from_slice(&json);
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs = if raw.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&raw)]
    };
    let sent = sendmsg::<()>(
        conn.as_raw_fd(),
        &[io::IoSlice::new(&data)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    // The descriptors went with the first byte; the rest is plain data.
    let mut w = conn;
    w.write_all(&data[sent..])
}

/// A take-over request from a new agent, answered with [`Request::offer`].
#[derive(Debug)]
pub struct Request {
    conn: UnixStream,
}

/// What the new agent said after the offer.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It accepts on the sockets.
    Ready,
    /// It went away, said something else, or took too long.
    Gone(String),
}

impl Request {
    /// Send the offer, then wait (blocking, up to `timeout`) for `READY`.
    pub fn offer(self, offer: &Offer, fds: &[OwnedFd], timeout: Duration) -> Outcome {
        if let Err(e) = send_offer(&self.conn, offer, fds) {
            return Outcome::Gone(format!("sending the offer: {e}"));
        }
        let mut conn = self.conn;
        if let Err(e) = conn.set_read_timeout(Some(timeout)) {
            return Outcome::Gone(e.to_string());
        }
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while got.len() < READY.len() {
            match conn.read(&mut byte) {
                Ok(0) => return Outcome::Gone("closed before READY".to_owned()),
                Ok(_) => got.push(byte[0]),
                Err(e) => return Outcome::Gone(format!("waiting for READY: {e}")),
            }
        }
        if got == READY {
            Outcome::Ready
        } else {
            Outcome::Gone(format!(
                "said {:?} instead of READY",
                String::from_utf8_lossy(&got)
            ))
        }
    }
}

/// The running agent's end: `<state_dir>/handoff.sock`.
#[derive(Debug)]
pub struct HandoffListener {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    /// The socket file's inode: removed at exit only while it is still ours.
    ino: u64,
}

impl HandoffListener {
    /// Listen on `<state_dir>/handoff.sock`, replacing a file left there (a new agent
    /// binds after its take-over: the old one's socket is then unlinked, and it
    /// takes no second request).
    pub fn bind(state_dir: &Path) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        std::fs::create_dir_all(state_dir)?;
        let path = socket_path(state_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = tokio::net::UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let ino = std::fs::metadata(&path)?.ino();
        Ok(Self {
            listener,
            path,
            ino,
        })
    }

    /// The next valid take-over request. Peers of another user, or that send
    /// something else within 5 s, are logged and dropped.
    pub async fn next(&self) -> Request {
        loop {
            let conn = match self.listener.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "hand-off socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            match Self::read_request(conn).await {
                Ok(conn) => return Request { conn },
                Err(why) => {
                    tracing::warn!(path = %self.path.display(), why, "hand-off socket: request refused")
                }
            }
        }
    }

    async fn read_request(conn: tokio::net::UnixStream) -> Result<UnixStream, String> {
        use tokio::io::AsyncReadExt as _;
        let cred = conn.peer_cred().map_err(|e| e.to_string())?;
        let me = nix::unistd::geteuid().as_raw();
        if cred.uid() != me {
            return Err(format!(
                "peer uid {} is not this agent's ({me})",
                cred.uid()
            ));
        }
        let mut conn = conn;
        let mut got = vec![0u8; REQUEST.len()];
        match tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut got)).await {
            Ok(Ok(_)) if got == REQUEST => {}
            Ok(Ok(_)) => {
                return Err(format!(
                    "not a take-over request: {:?}",
                    String::from_utf8_lossy(&got)
                ));
            }
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no request within 5 s".to_owned()),
        }
        let std = conn.into_std().map_err(|e| e.to_string())?;
        std.set_nonblocking(false).map_err(|e| e.to_string())?;
        Ok(std)
    }

    /// Remove the socket file, unless another agent has replaced it.
    pub fn remove(self) {
        use std::os::unix::fs::MetadataExt as _;
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> (SocketAddr, std::net::TcpListener) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (l.local_addr().unwrap(), l)
    }

    #[test]
    fn no_agent_means_bind_here() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            take_over(dir.path(), Duration::from_secs(1))
                .unwrap()
                .is_none()
        );
        // A file left by an agent that is gone (nobody listening on it).
        drop(std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap());
        assert!(socket_path(dir.path()).exists());
        assert!(
            take_over(dir.path(), Duration::from_secs(1))
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sockets_go_to_the_new_agent_and_keep_their_queue() {
        let dir = tempfile::tempdir().unwrap();
        let old = HandoffListener::bind(dir.path()).unwrap();
        let (api_addr, api) = listener();
        let (vip, l7) = listener();
        // A client connects before the hand-off: it waits in the backlog.
        let early = std::net::TcpStream::connect(vip).unwrap();
        let path = dir.path().to_owned();
        let new = std::thread::spawn(move || take_over(&path, Duration::from_secs(5)));
        let req = old.next().await;
        let offer = Offer {
            version: VERSION,
            pid: 7,
            api: Some(api_addr),
            l7: vec![vip],
            vips_added: vec!["198.18.100.1".parse().unwrap()],
        };
        let fds: Vec<OwnedFd> = vec![api.into(), l7.into()];
        let outcome =
            tokio::task::spawn_blocking(move || req.offer(&offer, &fds, Duration::from_secs(5)));
        let got = new.join().unwrap().unwrap().expect("an offer");
        assert_eq!(got.from_pid, 7);
        assert_eq!(got.api.as_ref().map(|a| a.0), Some(api_addr));
        assert_eq!(
            got.vips_added,
            vec!["198.18.100.1".parse::<IpAddr>().unwrap()]
        );
        let inherited = got.l7.get(&vip).unwrap().try_clone().unwrap();
        got.ready().unwrap();
        assert_eq!(outcome.await.unwrap(), Outcome::Ready);
        // The connection made before the hand-off is accepted by the new owner.
        let (mut accepted, from) = inherited.accept().unwrap();
        assert_eq!(from, early.local_addr().unwrap());
        let mut early = early;
        early.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        accepted.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        old.remove();
    }

    /// A fake "agent" that answers the request with `answer` and `fds`.
    fn fake_peer(dir: &Path, answer: Vec<u8>, fds: Vec<OwnedFd>) -> std::thread::JoinHandle<()> {
        let l = std::os::unix::net::UnixListener::bind(socket_path(dir)).unwrap();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = vec![0u8; REQUEST.len()];
            c.read_exact(&mut req).unwrap();
            assert_eq!(req, REQUEST);
            use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
            let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            let cmsgs = if raw.is_empty() {
                vec![]
            } else {
                vec![ControlMessage::ScmRights(&raw)]
            };
            if !answer.is_empty() {
                sendmsg::<()>(
                    c.as_raw_fd(),
                    &[io::IoSlice::new(&answer)],
                    &cmsgs,
                    MsgFlags::empty(),
                    None,
                )
                .unwrap();
            }
            // Hold the connection a moment, then close.
            std::thread::sleep(Duration::from_millis(200));
        })
    }

    fn framed(json: &str) -> Vec<u8> {
        let mut v = u32::try_from(json.len()).unwrap().to_be_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v
    }

    fn bad_peer(answer: Vec<u8>, fds: Vec<OwnedFd>) -> String {
        let dir = tempfile::tempdir().unwrap();
        let peer = fake_peer(dir.path(), answer, fds);
        let err = take_over(dir.path(), Duration::from_secs(2)).unwrap_err();
        peer.join().unwrap();
        match err {
            HandoffError::BadPeer { .. } => err.to_string(),
            other => panic!("expected a bad peer, got {other}"),
        }
    }

    #[test]
    fn a_bad_peer_is_an_error_naming_what_is_wrong() {
        let (vip, l7) = listener();
        // Garbage instead of JSON.
        let e = bad_peer(framed("hello"), vec![]);
        assert!(e.contains("not valid JSON"), "{e}");
        // Another version.
        let e = bad_peer(
            framed(r#"{"version":2,"pid":1,"api":null,"l7":[],"vips_added":[]}"#),
            vec![],
        );
        assert!(e.contains("protocol version 2"), "{e}");
        // Names a socket but sends none.
        let e = bad_peer(
            framed(&format!(
                r#"{{"version":1,"pid":1,"api":null,"l7":["{vip}"],"vips_added":[]}}"#
            )),
            vec![],
        );
        assert!(e.contains("names 1 sockets but 0 descriptors"), "{e}");
        // A descriptor bound elsewhere than the offer says.
        let e = bad_peer(
            framed(r#"{"version":1,"pid":1,"api":null,"l7":["127.0.0.1:1"],"vips_added":[]}"#),
            vec![l7.into()],
        );
        assert!(e.contains(&format!("is bound to {vip}")), "{e}");
        // A descriptor that is not a listening socket.
        let file: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let e = bad_peer(
            framed(r#"{"version":1,"pid":1,"api":null,"l7":["127.0.0.1:1"],"vips_added":[]}"#),
            vec![file],
        );
        assert!(e.contains("127.0.0.1:1"), "{e}");
        // Closing without a word.
        let e = bad_peer(vec![], vec![]);
        assert!(e.contains("without an offer"), "{e}");
    }

    #[test]
    fn a_peer_that_hangs_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(socket_path(dir.path())).unwrap();
        let peer = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            drop(c);
        });
        let err = take_over(dir.path(), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, HandoffError::Timeout { .. }), "{err}");
        assert!(err.to_string().contains("may hang"), "{err}");
        peer.join().unwrap();
    }

    #[tokio::test]
    async fn the_old_agent_refuses_other_requests_and_sees_a_new_agent_go() {
        let dir = tempfile::tempdir().unwrap();
        let old = HandoffListener::bind(dir.path()).unwrap();
        let path = socket_path(dir.path());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Someone says something else: dropped, the listener waits on.
        let mut wrong = UnixStream::connect(&path).unwrap();
        wrong.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        // A real request whose sender goes away before READY.
        let p2 = path.clone();
        let newcomer = std::thread::spawn(move || {
            let mut c = UnixStream::connect(&p2).unwrap();
            c.write_all(REQUEST).unwrap();
            let mut b = [0u8; 64];
            let _ = c.read(&mut b);
            // Gone without READY.
        });
        let req = tokio::time::timeout(Duration::from_secs(5), old.next())
            .await
            .unwrap();
        let outcome = tokio::task::spawn_blocking(move || {
            req.offer(
                &Offer {
                    version: VERSION,
                    ..Offer::default()
                },
                &[],
                Duration::from_secs(5),
            )
        })
        .await
        .unwrap();
        newcomer.join().unwrap();
        assert!(
            matches!(outcome, Outcome::Gone(ref w) if w.contains("closed before READY")),
            "{outcome:?}"
        );
        // A new agent replaced the file: the old one does not remove it.
        let replaced = HandoffListener::bind(dir.path()).unwrap();
        old.remove();
        assert!(path.exists());
        replaced.remove();
        assert!(!path.exists());
    }
}
