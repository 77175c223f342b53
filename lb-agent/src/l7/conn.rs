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
//! [`TimedIo`] also gives hyper's own answers to unparsable request heads (400, 414,
//! 431: a bare head, no body) the shape of the proxy's errors: when, with no request in
//! flight on an HTTP/1 connection, hyper writes exactly such a head, the wrapper
//! writes what its [`ParseErrorHook`] returns instead ([`bare_error_status`]).
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

/// The response to write instead of hyper's bare answer with this status to an
/// unparsable request head; `None`: keep hyper's.
pub(crate) type ParseErrorHook = Arc<dyn Fn(u16) -> Option<Vec<u8>> + Send + Sync>;

/// The status of `data` when it is exactly one bare response head as hyper's HTTP/1
/// server writes it for a parse error: `HTTP/1.1 <4xx> <reason>`, then only
/// `content-length: 0`, `date` and `connection` fields, then the blank line, nothing
/// else. Responses of the proxy always carry `Content-Type` (its own) or `Via` (a
/// backend's), so they never match.
pub(crate) fn bare_error_status(data: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(data).ok()?;
    let head = text.strip_suffix("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.strip_prefix("HTTP/1.1 ")?.get(..3)?;
    let status: u16 = status.parse().ok()?;
    if !(400..500).contains(&status) {
        return None;
    }
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        let known = if name.eq_ignore_ascii_case("content-length") {
            value == "0"
        } else {
            name.eq_ignore_ascii_case("date") || name.eq_ignore_ascii_case("connection")
        };
        if !known {
            return None;
        }
    }
    Some(status)
}

/// A replacement response being written in place of hyper's.
struct Replacing {
    bytes: Vec<u8>,
    written: usize,
    /// What hyper asked to write: reported as written once `bytes` are out.
    claimed: usize,
}

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
    /// When the reader's timer fires, ms since `epoch`; `NONE` when it is not armed.
    armed_ms: AtomicU64,
    /// The idle timeout in ms (set by [`TimedIo::new`]).
    idle_ms: AtomicU64,
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
            armed_ms: AtomicU64::new(NONE),
            idle_ms: AtomicU64::new(0),
        })
    }

    fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Whether the connection speaks HTTP/2 (ALPN or the h2c preface).
    pub(crate) fn is_h2(&self) -> bool {
        self.h2.load(Ordering::SeqCst)
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

    /// When the connection times out (ms since `epoch`), and whether that is a header
    /// timeout (408); `None` while a request is in flight.
    fn deadline_ms(&self, header: Duration, idle: Duration) -> Option<(u64, bool)> {
        let at = |ms: u64, d: Duration| ms.saturating_add(duration_ms(d));
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

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(NONE / 2)
}

impl Drop for InFlight {
    /// The idle deadline starts now. The reader is woken (to arm its timer) only when
    /// its timer is not armed at or before that deadline: on a busy connection it is
    /// (see [`TimedIo`]'s `poll_read`), so the end of a request costs no extra poll
    /// of the connection.
    fn drop(&mut self) {
        let a = &self.0;
        let now = a.now_ms();
        a.last_ms.store(now, Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
        let armed = a.armed_ms.load(Ordering::SeqCst);
        if armed == NONE || armed > now.saturating_add(a.idle_ms.load(Ordering::Relaxed)) {
            a.reader.wake();
        }
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
    parse_error: ParseErrorHook,
    /// Set once a parse error answer has been replaced (the connection ends then).
    replacing: Option<Replacing>,
}

impl<I> TimedIo<I> {
    pub(crate) fn new(
        inner: I,
        activity: Arc<ConnActivity>,
        header: Duration,
        idle: Duration,
        parse_error: ParseErrorHook,
    ) -> Self {
        let h2 = activity.h2.load(Ordering::Relaxed);
        activity.idle_ms.store(duration_ms(idle), Ordering::Relaxed);
        Self {
            inner,
            activity,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            header_timeout: header,
            idle_timeout: idle,
            preface: (!h2).then_some(0),
            parse_error,
            replacing: None,
        }
    }

    /// Whether a write of `bufs` by hyper is its bare answer to an unparsable head,
    /// to be replaced (see the [module docs](self)).
    fn replacement(&self, bufs: &[io::IoSlice<'_>]) -> Option<Replacing> {
        let a = &self.activity;
        let claimed: usize = bufs.iter().map(|b| b.len()).sum();
        if self.replacing.is_some()
            || claimed > 512
            || a.h2.load(Ordering::SeqCst)
            || a.tunnel.load(Ordering::SeqCst)
            || a.in_flight.load(Ordering::SeqCst) > 0
        {
            return None;
        }
        let data: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let status = bare_error_status(&data)?;
        let bytes = (self.parse_error)(status)?;
        debug!(
            status,
            "replacing hyper's bare answer to an unparsable request head"
        );
        Some(Replacing {
            bytes,
            written: 0,
            claimed,
        })
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
        // The timer is armed at the deadline, or before it: a deadline that moved later
        // (a request ended, bytes went through a tunnel) is checked when the earlier
        // timer fires, so a busy connection does no timer work per request. While a
        // request is in flight nothing times out, and the timer stays at or before
        // `idle` from now: the idle deadline after the request's end cannot be earlier,
        // so that end need not wake this reader ([`InFlight`]'s drop).
        let a = &this.activity;
        let head = loop {
            let (deadline, head, due) = match a.deadline_ms(this.header_timeout, this.idle_timeout)
            {
                Some((ms, head)) => (ms, head, true),
                None => (
                    a.now_ms().saturating_add(duration_ms(this.idle_timeout)),
                    false,
                    false,
                ),
            };
            let armed = a.armed_ms.load(Ordering::SeqCst);
            if armed == NONE || deadline < armed {
                this.sleep.as_mut().reset(a.instant(deadline));
                a.armed_ms.store(deadline, Ordering::SeqCst);
            }
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            a.armed_ms.store(NONE, Ordering::SeqCst);
            if due && a.now_ms() >= deadline {
                break head;
            }
        };
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

impl<I: AsyncRead + AsyncWrite + Unpin> TimedIo<I> {
    /// Write the replacement of hyper's parse error answer when `bufs` is one (or one
    /// is being written); `None`: write `bufs` as they are.
    fn poll_replace(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Option<Poll<io::Result<usize>>> {
        if self.replacing.is_none() {
            self.replacing = Some(self.replacement(bufs)?);
        }
        let rep = self.replacing.as_mut()?;
        if rep.written == rep.bytes.len() {
            // Done; anything hyper writes after it goes as it is.
            return None;
        }
        while rep.written < rep.bytes.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &rep.bytes[rep.written..]) {
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => rep.written += n,
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        Some(Poll::Ready(Ok(rep.claimed)))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TimedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(r) = this.poll_replace(cx, &[io::IoSlice::new(data)]) {
            return r;
        }
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
        if let Some(r) = this.poll_replace(cx, bufs) {
            return r;
        }
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
    /// The client's address as `X-Forwarded-For` carries it (formatted once).
    pub(crate) client_value: http::HeaderValue,
    /// Whether the connection is TLS.
    pub(crate) tls: bool,
    /// The connection's activity (timeouts).
    pub(crate) activity: Arc<ConnActivity>,
    /// The response timer its requests reuse ([`ConnInfo::timeout`]).
    pub(crate) timer: ResponseTimer,
}

/// A timer kept by a client connection for the response timeout of its requests
/// (`response_timeout_ms`), re-armed per request rather than made anew: a new tokio
/// timer is inserted into the runtime's timer wheel when first polled and removed when
/// dropped (a lock and a list operation each), while moving a registered one to a
/// later deadline, as the next request's always is, only updates it in place (the
/// wheel moves it when its old slot comes up). Requests on one HTTP/1 connection run
/// one at a time and share it; a concurrent HTTP/2 stream that finds it taken makes its
/// own.
#[derive(Default)]
pub(crate) struct ResponseTimer(std::sync::Mutex<Option<Pin<Box<Sleep>>>>);

impl std::fmt::Debug for ResponseTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ResponseTimer").finish_non_exhaustive()
    }
}

impl ConnInfo {
    /// `fut`'s output, or `None` when it is not done within `after`, timed by the
    /// connection's [`ResponseTimer`]. `fut` is taken pinned where the caller made it:
    /// a backend request's future is large, and moving it in would copy it.
    pub(crate) async fn timeout<F: Future>(
        &self,
        after: Duration,
        mut fut: Pin<&mut F>,
    ) -> Option<F::Output> {
        let slot = &self.timer.0;
        let deadline = Instant::now() + after;
        let taken = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let mut sleep = match taken {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        let out = std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            sleep.as_mut().poll(cx).map(|()| None)
        })
        .await;
        *slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sleep);
        out
    }
}

/// Resolves when the hard stop is set (or its sender is gone).
pub(crate) async fn stopped(hard: &mut watch::Receiver<bool>) {
    let _ = hard.wait_for(|s| *s).await;
}

/// `fut`, polled only when it asked to be: on the first poll and after its own waker
/// fired, not on every wake-up of the task that holds it. For a future raced beside a
/// connection in one `select!` (a drain signal that fires once, if ever): polling a
/// pending `watch` wait locks the channel's shared waiter list, which every
/// connection of the service watches, on each wake-up of each connection.
pub(crate) fn when_woken<F: Future>(fut: F) -> WhenWoken<F> {
    WhenWoken {
        fut: Box::pin(fut),
        flag: Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        }),
    }
}

/// See [`when_woken`].
pub(crate) struct WhenWoken<F> {
    fut: Pin<Box<F>>,
    flag: Arc<WakeFlag>,
}

/// The waker [`WhenWoken`] gives its future: notes the wake-up, then wakes the task.
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl std::task::Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Registered before the flag is read: a wake-up in between is not lost.
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = std::task::Waker::from(Arc::clone(&self.flag));
        let mut inner = Context::from_waker(&waker);
        self.fut.as_mut().poll(&mut inner)
    }
}

#[cfg(test)]
mod tests {
    use super::bare_error_status;

    /// A future under `when_woken` is polled first, then only after its own waker
    /// fired, and still completes when it does.
    #[tokio::test]
    async fn when_woken_polls_the_future_only_after_its_wake_up() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        let polls = Arc::new(AtomicU32::new(0));
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let mut wait = Box::pin(async move { rx.wait_for(|s| *s).await.is_ok() });
        let counted = {
            let polls = Arc::clone(&polls);
            std::future::poll_fn(move |cx| {
                polls.fetch_add(1, Ordering::SeqCst);
                wait.as_mut().poll(cx)
            })
        };
        let mut fut = std::pin::pin!(super::when_woken(counted));
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "polled without a wake-up");
        tx.send(true).unwrap();
        assert_eq!(fut.as_mut().poll(&mut cx), std::task::Poll::Ready(true));
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }

    /// The connection's timer times each request anew: a request done within its
    /// timeout gets its output, one that is not gets `None` once its own timeout is
    /// over, whether the reused timer was idle, had fired, or was armed earlier or
    /// later than the new deadline.
    #[tokio::test]
    async fn the_reused_response_timer_times_each_request() {
        use std::time::Duration;
        use tokio::time::Instant;
        let conn = super::ConnInfo {
            client: "127.0.0.1:1".parse().unwrap(),
            client_value: http::HeaderValue::from_static("127.0.0.1"),
            tls: false,
            activity: super::ConnActivity::new(false),
            timer: super::ResponseTimer::default(),
        };
        let ms = Duration::from_millis;
        let hour = Duration::from_secs(3600);
        let check = async {
            // Done at once: the timer is not even armed.
            assert_eq!(
                conn.timeout(hour, std::pin::pin!(std::future::ready(1)))
                    .await,
                Some(1)
            );
            // Never done: `None` after its timeout.
            let t = Instant::now();
            assert_eq!(
                conn.timeout(ms(20), std::pin::pin!(std::future::pending::<()>()))
                    .await,
                None
            );
            assert!(t.elapsed() >= ms(20));
            // After it fired: armed again (an hour), done after one yield.
            assert_eq!(
                conn.timeout(hour, std::pin::pin!(tokio::task::yield_now()))
                    .await,
                Some(())
            );
            // An earlier deadline than the one armed.
            let t = Instant::now();
            assert_eq!(
                conn.timeout(ms(30), std::pin::pin!(std::future::pending::<()>()))
                    .await,
                None
            );
            assert!(t.elapsed() >= ms(30));
            // Armed at 20 ms, then moved later to 60 ms: not before 60 ms.
            assert_eq!(
                conn.timeout(ms(20), std::pin::pin!(tokio::task::yield_now()))
                    .await,
                Some(())
            );
            let t = Instant::now();
            assert_eq!(
                conn.timeout(ms(60), std::pin::pin!(std::future::pending::<()>()))
                    .await,
                None
            );
            assert!(t.elapsed() >= ms(60));
            // Two at once (HTTP/2 streams): the second has a timer of its own.
            let (done, never) = (
                std::pin::pin!(tokio::task::yield_now()),
                std::pin::pin!(std::future::pending::<()>()),
            );
            let (a, b) = tokio::join!(conn.timeout(hour, done), conn.timeout(ms(20), never));
            assert_eq!((a, b), (Some(()), None));
        };
        tokio::time::timeout(Duration::from_secs(30), check)
            .await
            .expect("every timeout fired");
    }

    #[test]
    fn only_bare_error_heads_match() {
        let date = "date: Tue, 01 Dec 2026 12:00:00 GMT";
        for (head, want) in [
            (
                format!(
                    "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n{date}\r\n\r\n"
                ),
                Some(431),
            ),
            (
                format!(
                    "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n{date}\r\n\r\n"
                ),
                Some(400),
            ),
            ("HTTP/1.1 414 URI Too Long\r\n\r\n".to_owned(), Some(414)),
            // Ours (content-type) or a backend's (via), a body, a success, h1.0.
            (
                format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n{date}\r\n\r\n"
                ),
                None,
            ),
            (
                "HTTP/1.1 400 Bad Request\r\nvia: 1.1 x\r\ncontent-length: 0\r\n\r\n".to_owned(),
                None,
            ),
            (
                "HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\nno".to_owned(),
                None,
            ),
            (
                "HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n".to_owned(),
                None,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_owned(),
                None,
            ),
            ("HTTP/1.0 400 Bad Request\r\n\r\n".to_owned(), None),
            (
                "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n".to_owned(),
                None,
            ),
        ] {
            assert_eq!(bare_error_status(head.as_bytes()), want, "{head}");
        }
    }
}
