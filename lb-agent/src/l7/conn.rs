//! One client connection as the proxy's requests see it ([`ConnInfo`]), and the
//! connection's timeouts.
//!
//! Timeouts are enforced by [`TimedIo`], a wrapper around the connection's IO that
//! knows, through [`ConnActivity`], whether a request is in flight:
//! - *header timeout* (`header_timeout_ms`, slowloris): from the accept (or the end
//!   of the TLS handshake), and on a kept-alive HTTP/1 connection from the first
//!   byte of the next request, the whole request head must arrive in time. When it
//!   does not, the client gets `408 Request Timeout` (written by the wrapper,
//!   `Connection: close`) and the connection is closed.
//! - *idle timeout* (`idle_timeout_ms`): a connection with no request in flight and
//!   no byte of a new one (HTTP/1), or no open stream (HTTP/2), for that long is
//!   closed. An upgraded (tunnelled) connection is closed after that long without a
//!   byte in either direction.
//!
//! The server ([`super::server`]) wraps each accepted connection in a [`TimedIo`]; the
//! proxy's requests hold an [`InFlight`] while they run and mark upgrades as tunnels.
//! This module depends on neither, so `server` → `proxy` → `conn` has no cycle.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tracing::debug;

/// The HTTP/2 connection preface, to tell h2c prior knowledge from HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Written to a client whose request head did not arrive within the header timeout.
const TIMEOUT_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

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
    pub(crate) fn new(h2: bool) -> Arc<Self> {
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
    pub(crate) fn new(
        inner: I,
        activity: Arc<ConnActivity>,
        header: Duration,
        idle: Duration,
    ) -> Self {
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

/// Resolves when the hard stop is set (or its sender is gone).
pub(crate) async fn stopped(hard: &mut watch::Receiver<bool>) {
    let _ = hard.wait_for(|s| *s).await;
}
