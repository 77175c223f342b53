//! The HTTP/1.1 client towards the backends, driven from the request's own task (as
//! Pingora's `HttpSession` is): the request's task writes the request head (one buffer,
//! one write) and its body, reads the response head, and returns the response with a
//! body ([`H1Body`]) that reads the rest from the same connection as the client side
//! polls it. The connection is a plain value moved along, never a task of its own:
//! no channel, no oneshot, no wake-up of another task per request. When the body ends
//! cleanly on a keep-alive response, the body puts the connection back into its
//! worker's pool ([`Pool`]); in any other case (a body cut short or failing, framing
//! errors, `Connection: close`, a close-delimited body, bytes after the response) the
//! connection is dropped, which closes it.
//!
//! What it accepts from a backend is at least as strict as hyper's client (RFC 9112):
//! - the response head must be complete within [`MAX_HEAD`] bytes and [`MAX_HEADERS`]
//!   fields; obsolete line folding, bad field names or values, a bad status line are
//!   errors;
//! - framing (§6.3): no body for a response to `HEAD` and for 1xx, 204 and 304;
//!   `Transfer-Encoding` must be exactly `chunked` in an HTTP/1.1 response and comes
//!   without `Content-Length` (both: an error, never a guess); every `Content-Length`
//!   (repeated fields, comma lists) must be the same decimal number; with neither, the
//!   body runs to the connection's close;
//! - chunked bodies: hexadecimal sizes of at most 15 digits, chunk lines ending in
//!   CRLF, each chunk's data followed by CRLF, trailer fields parsed as header fields;
//! - interim responses (1xx other than 101) are read and dropped.
//!
//! Every such error fails the request as [`Failure::Other`] (the proxy answers 502 and
//! does not retry it) and closes the connection.
//!
//! Requests: `METHOD path HTTP/1.1` with the fields as given; the body is framed as
//! hyper's client frames it: none when the body is empty, the request's own
//! `Content-Length` when it has one (else the body's exact size), chunked otherwise
//! (with trailers); a `GET`, `HEAD` or `CONNECT` body of unknown size is not sent. The
//! body is sent while the response is read: a response that comes before the body has
//! been sent in full ends the sending (the connection is then not reused).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use bytes::{Buf as _, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::io::{AsyncRead, AsyncWriteExt as _, ReadBuf};

use super::{Failure, MAX_IDLE_H1, Stream, UpstreamError};
use crate::l7::body::{Body, BoxError};

/// The largest response head (status line and fields) accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most fields a response head (or a trailer section) may carry (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;
/// Bytes read from a backend at a time (at least).
const READ_CHUNK: usize = 16 * 1024;
/// The longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;

// ---------------------------------------------------------------------------
// Connections and the pool
// ---------------------------------------------------------------------------

/// An HTTP/1.1 connection to a backend and the bytes read from it but not used yet.
pub(crate) struct Conn {
    io: Stream,
    buf: BytesMut,
}

impl Conn {
    pub(crate) fn new(io: Stream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection may take a request: nothing to read (the backend
    /// neither closed it nor sent anything unasked). Polls once without waiting; tokio
    /// answers from its readiness state, without a system call when nothing arrived.
    fn usable(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.io).poll_read(&mut cx, &mut rb),
            Poll::Pending
        )
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Idle HTTP/1.1 connections by backend, one pool per upstream (per worker and
/// service): last in, first out, at most [`MAX_IDLE_H1`] per backend, closed after
/// the pool's timeout unused (a sweep task runs while the pool holds connections).
pub(crate) struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    timeout: Duration,
    /// A sweep task runs (set and cleared under `idle`'s lock).
    sweeping: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            idle: Mutex::default(),
            timeout,
            sweeping: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection to `addr` that is open and not expired.
    pub(crate) fn take(&self, addr: SocketAddr) -> Option<Conn> {
        let mut map = self.lock();
        let list = map.get_mut(&addr)?;
        while let Some(mut idle) = list.pop() {
            if idle.since.elapsed() < self.timeout && idle.conn.usable() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// `conn`, its response read to the end, is idle again.
    fn put(self: &Arc<Self>, addr: SocketAddr, conn: Conn) {
        let mut map = self.lock();
        let list = map.entry(addr).or_default();
        if list.len() >= MAX_IDLE_H1 {
            list.retain_mut(|i| i.conn.usable());
            if list.len() >= MAX_IDLE_H1 {
                return; // dropped: the connection closes
            }
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
        if !self.sweeping.load(Ordering::Relaxed) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                self.sweeping.store(true, Ordering::Relaxed);
                rt.spawn(sweep(Arc::downgrade(self)));
            }
        }
    }

    /// Close the connections idle for the timeout or closed by their backend; whether
    /// any is left (else the sweep stops, under the lock).
    fn expire(&self) -> bool {
        let mut map = self.lock();
        map.retain(|_, list| {
            list.retain_mut(|i| i.since.elapsed() < self.timeout && i.conn.usable());
            !list.is_empty()
        });
        if map.is_empty() {
            self.sweeping.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Idle connections to `addr` (tests).
    #[cfg(test)]
    pub(crate) fn idle(&self, addr: SocketAddr) -> usize {
        self.lock().get_mut(&addr).map_or(0, |l| {
            l.iter_mut()
                .filter_map(|i| i.conn.usable().then_some(()))
                .count()
        })
    }
}

/// Expire idle connections every timeout / 6 while the pool lives and holds any.
async fn sweep(pool: Weak<Pool>) {
    let every = pool
        .upgrade()
        .map_or(super::IDLE, |p| p.timeout)
        .checked_div(6)
        .unwrap_or(super::IDLE);
    loop {
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(p) if p.expire() => {}
            _ => return,
        }
    }
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

fn invalid(what: impl std::fmt::Display) -> UpstreamError {
    UpstreamError {
        failure: Failure::Other,
        source: format!("invalid response from the backend: {what}").into(),
    }
}

fn invalid_body(what: impl std::fmt::Display) -> BoxError {
    format!("invalid response body from the backend: {what}").into()
}

fn reset(source: impl Into<BoxError>) -> UpstreamError {
    UpstreamError {
        failure: Failure::Reset,
        source: source.into(),
    }
}

/// An I/O error before the response's first byte: on a reused connection most likely
/// the backend closed it while idle ([`Failure::Stale`]).
fn before_response(e: io::Error, reused: bool) -> UpstreamError {
    let failure = match e.kind() {
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof
        | io::ErrorKind::NotConnected => {
            if reused {
                Failure::Stale
            } else {
                Failure::Reset
            }
        }
        _ => Failure::Other,
    };
    UpstreamError {
        failure,
        source: e.into(),
    }
}

// ---------------------------------------------------------------------------
// Request
// ---------------------------------------------------------------------------

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReqFraming {
    /// No body sent.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    Chunked,
}

/// The request's framing (as hyper's client decides it), its fields adjusted.
fn request_framing(method: &Method, headers: &mut HeaderMap, body: &Body) -> ReqFraming {
    if body.is_end_stream() {
        headers.remove(TRANSFER_ENCODING);
        return ReqFraming::None;
    }
    headers.remove(TRANSFER_ENCODING);
    if let Some(n) = content_length(headers).ok().flatten() {
        return ReqFraming::Length(n);
    }
    headers.remove(CONTENT_LENGTH);
    if let Some(n) = body.size_hint().exact() {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        return ReqFraming::Length(n);
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) {
        return ReqFraming::None;
    }
    headers.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    ReqFraming::Chunked
}

/// The request head in one buffer.
fn encode_head(parts: &http::request::Parts) -> Vec<u8> {
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let mut len = parts.method.as_str().len() + path.len() + 16;
    for (n, v) in &parts.headers {
        len += n.as_str().len() + v.len() + 4;
    }
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (n, v) in &parts.headers {
        out.extend_from_slice(n.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Write the request body to `w` as `framing` says. `Ok(false)`: the client's body
/// failed (the request is abandoned; the caller reports it).
async fn send_body<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    mut body: Body,
    framing: ReqFraming,
) -> Result<(), SendError> {
    let mut sent: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(SendError::Body)?;
        match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    continue;
                }
                match framing {
                    ReqFraming::None => {}
                    ReqFraming::Length(n) => {
                        sent += data.len() as u64;
                        if sent > n {
                            return Err(SendError::Body(
                                "request body longer than its Content-Length".into(),
                            ));
                        }
                        w.write_all(&data).await.map_err(SendError::Io)?;
                    }
                    ReqFraming::Chunked => {
                        let head = format!("{:x}\r\n", data.len());
                        w.write_all(head.as_bytes()).await.map_err(SendError::Io)?;
                        w.write_all(&data).await.map_err(SendError::Io)?;
                        w.write_all(b"\r\n").await.map_err(SendError::Io)?;
                    }
                }
            }
            Err(frame) => {
                if let (ReqFraming::Chunked, Ok(trailers)) = (framing, frame.into_trailers()) {
                    let mut out = b"0\r\n".to_vec();
                    for (n, v) in &trailers {
                        out.extend_from_slice(n.as_str().as_bytes());
                        out.extend_from_slice(b": ");
                        out.extend_from_slice(v.as_bytes());
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b"\r\n");
                    w.write_all(&out).await.map_err(SendError::Io)?;
                    w.flush().await.map_err(SendError::Io)?;
                    return Ok(());
                }
            }
        }
    }
    match framing {
        ReqFraming::Length(n) if sent < n => {
            return Err(SendError::Body(
                "request body shorter than its Content-Length".into(),
            ));
        }
        ReqFraming::Chunked => w.write_all(b"0\r\n\r\n").await.map_err(SendError::Io)?,
        _ => {}
    }
    w.flush().await.map_err(SendError::Io)
}

enum SendError {
    /// The client's body failed.
    Body(BoxError),
    /// Writing to the backend failed.
    Io(io::Error),
}

/// Send `req` (origin-form URI, `Host` set) over `conn`; the response head with its
/// body. `pool`: where the connection goes when the response ends cleanly (`None`:
/// used once).
pub(crate) async fn send(
    mut conn: Conn,
    reused: bool,
    req: Request<Body>,
    pool: Option<&Arc<Pool>>,
    addr: SocketAddr,
) -> Result<Response<H1Body>, UpstreamError> {
    let (mut parts, body) = req.into_parts();
    let framing = request_framing(&parts.method, &mut parts.headers, &body);
    let head_request = parts.method == Method::HEAD;
    let out = encode_head(&parts);
    let mut request_complete = true;
    let head = if framing == ReqFraming::None {
        conn.io
            .write_all(&out)
            .await
            .map_err(|e| before_response(e, reused))?;
        read_head(&mut conn, reused).await?
    } else {
        // The body is sent while the response head is awaited.
        let Conn { io, buf } = &mut conn;
        let (mut rd, mut wr) = tokio::io::split(io);
        let sending = async {
            wr.write_all(&out).await.map_err(SendError::Io)?;
            send_body(&mut wr, body, framing).await
        };
        let reading = read_head_from(&mut rd, buf, reused);
        tokio::pin!(sending, reading);
        tokio::select! {
            biased;
            sent = &mut sending => match sent {
                Ok(()) => reading.await?,
                Err(SendError::Body(e)) => {
                    return Err(UpstreamError {
                        failure: Failure::Other,
                        source: e,
                    });
                }
                // The backend may have answered and closed: its answer, if any.
                Err(SendError::Io(e)) => match reading.await {
                    Ok(head) => {
                        request_complete = false;
                        head
                    }
                    Err(_) => return Err(before_response(e, reused)),
                },
            },
            head = &mut reading => {
                request_complete = false;
                head?
            }
        }
    };
    let mut body = H1Body {
        conn: Some(conn),
        state: State::Done,
        keep_alive: head.keep_alive && request_complete,
        pool: pool.map(|p| (Arc::clone(p), addr)),
    };
    let no_body = head_request
        || head.status.is_informational()
        || head.status == StatusCode::NO_CONTENT
        || head.status == StatusCode::NOT_MODIFIED;
    body.state = if no_body {
        State::Length(0)
    } else {
        match head.framing {
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => {
                body.keep_alive = false;
                State::Eof
            }
        }
    };
    if body.state == State::Length(0) {
        body.finish();
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.version_mut() = head.version;
    *resp.headers_mut() = head.headers;
    Ok(resp)
}

// ---------------------------------------------------------------------------
// Response head
// ---------------------------------------------------------------------------

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    /// Until the connection closes.
    Close,
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

async fn read_head(conn: &mut Conn, reused: bool) -> Result<Head, UpstreamError> {
    let Conn { io, buf } = conn;
    read_head_from(io, buf, reused).await
}

/// Read and parse the response head (interim responses dropped).
async fn read_head_from<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    reused: bool,
) -> Result<Head, UpstreamError> {
    let mut seen = false;
    loop {
        if !buf.is_empty() {
            seen = true;
            if let Some(head) = parse_head(buf)? {
                if head.status.is_informational() && head.status != StatusCode::SWITCHING_PROTOCOLS
                {
                    continue;
                }
                return Ok(head);
            }
        }
        buf.reserve(READ_CHUNK);
        let n = match tokio_util::io::read_buf(io, buf).await {
            Ok(n) => n,
            Err(e) if !seen => return Err(before_response(e, reused)),
            Err(e) => return Err(reset(e)),
        };
        if n == 0 {
            let e = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                if seen {
                    "connection closed before the response head ended"
                } else {
                    "connection closed before a response"
                },
            );
            return Err(if seen {
                reset(e)
            } else {
                before_response(e, reused)
            });
        }
    }
}

/// One response head from the start of `buf` (consumed), `None` when incomplete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, UpstreamError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(invalid(format_args!(
                    "response head larger than {MAX_HEAD} bytes"
                )));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(invalid(format_args!(
                "more than {MAX_HEADERS} fields in the response head"
            )));
        }
        Err(e) => return Err(invalid(e)),
    };
    if len > MAX_HEAD {
        return Err(invalid(format_args!(
            "response head larger than {MAX_HEAD} bytes"
        )));
    }
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| invalid("bad status code"))?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Field values as slices of the head (no copy): their offsets first, as the
    // parser borrows the buffer.
    let base = buf.as_ptr() as usize;
    let mut spans = Vec::with_capacity(resp.headers.len());
    for f in resp.headers.iter() {
        let name = HeaderName::from_bytes(f.name.as_bytes())
            .map_err(|_| invalid(format_args!("bad field name {:?}", f.name)))?;
        let start = f.value.as_ptr() as usize - base;
        spans.push((name, start, start + f.value.len()));
    }
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, start, end) in spans {
        let value = HeaderValue::from_maybe_shared(head.slice(start..end))
            .map_err(|_| invalid(format_args!("bad value of field {name}")))?;
        headers.append(name, value);
    }
    let close = has_token(&headers, "close");
    let keep_alive = match version {
        Version::HTTP_11 => !close,
        _ => !close && has_token(&headers, "keep-alive"),
    };
    let framing = response_framing(&headers, version)?;
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// Whether a `Connection` field lists `token`.
fn has_token(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The `Content-Length` of `headers`: `Ok(None)` without one; an error when a value is
/// not a decimal number or two differ.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, UpstreamError> {
    let mut found = None;
    for v in headers.get_all(CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(invalid("bad Content-Length"));
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(m) if m != n => return Err(invalid("differing Content-Length values")),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

/// How a response with a body is delimited (RFC 9112 §6.3), or why it cannot be
/// trusted.
fn response_framing(headers: &HeaderMap, version: Version) -> Result<Framing, UpstreamError> {
    if headers.contains_key(TRANSFER_ENCODING) {
        if headers.contains_key(CONTENT_LENGTH) {
            return Err(invalid("both Transfer-Encoding and Content-Length"));
        }
        if version != Version::HTTP_11 {
            return Err(invalid("Transfer-Encoding in an HTTP/1.0 response"));
        }
        let mut codings = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty());
        return match (codings.next(), codings.next()) {
            (Some(c), None) if c.eq_ignore_ascii_case(b"chunked") => Ok(Framing::Chunked),
            _ => Err(invalid("Transfer-Encoding other than chunked")),
        };
    }
    Ok(match content_length(headers)? {
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

// ---------------------------------------------------------------------------
// Response body
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes left.
    Length(u64),
    /// Until the connection closes.
    Eof,
    /// A chunk-size line next.
    ChunkSize,
    /// This many bytes of chunk data left.
    ChunkData(u64),
    /// The CRLF after a chunk's data next.
    ChunkEnd,
    /// The trailer section (after the last chunk) next.
    Trailers,
    Done,
}

/// What [`H1Body::step`] made of the buffered bytes.
enum Step {
    Frame(Frame<Bytes>),
    /// More bytes needed.
    More,
    Done,
}

/// A backend's response body read from its connection (see the [module docs](self)).
pub(crate) struct H1Body {
    conn: Option<Conn>,
    state: State,
    /// The connection may take another request once this body ends cleanly.
    keep_alive: bool,
    pool: Option<(Arc<Pool>, SocketAddr)>,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl H1Body {
    /// The body ended cleanly: the connection back to the pool when it may be reused.
    fn finish(&mut self) {
        self.state = State::Done;
        let conn = self.conn.take();
        if let (true, Some(conn), Some((pool, addr))) = (self.keep_alive, conn, self.pool.take()) {
            if conn.buf.is_empty() {
                pool.put(addr, conn);
            }
        }
    }

    /// The body failed: the connection is closed.
    fn fail(&mut self, e: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }

    /// Make what the buffer holds into a frame, or say more is needed.
    fn step(&mut self) -> Result<Step, BoxError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Step::Done);
        };
        let buf = &mut conn.buf;
        loop {
            match self.state {
                State::Done => return Ok(Step::Done),
                State::Length(0) => {
                    self.finish();
                    return Ok(Step::Done);
                }
                State::Length(left) | State::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(n).freeze();
                    let left = left - n as u64;
                    self.state = match self.state {
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Step::Frame(Frame::data(data)));
                }
                State::Eof => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let data = buf.split().freeze();
                    return Ok(Step::Frame(Frame::data(data)));
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(invalid_body("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::ChunkSize => {
                    let Some(lf) = buf.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                        if buf.len() >= MAX_CHUNK_LINE {
                            return Err(invalid_body("chunk-size line too long"));
                        }
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&buf[..=lf])?;
                    buf.advance(lf + 1);
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.finish();
                        return Ok(Step::Done);
                    }
                    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
                        Ok(httparse::Status::Complete((len, fields))) => {
                            let mut map = HeaderMap::with_capacity(fields.len());
                            for f in fields {
                                let name = HeaderName::from_bytes(f.name.as_bytes())
                                    .map_err(|_| invalid_body("bad trailer field name"))?;
                                let value = HeaderValue::from_bytes(f.value)
                                    .map_err(|_| invalid_body("bad trailer field value"))?;
                                map.append(name, value);
                            }
                            (len, map)
                        }
                        Ok(httparse::Status::Partial) => {
                            if buf.len() > MAX_HEAD {
                                return Err(invalid_body("trailer section too large"));
                            }
                            return Ok(Step::More);
                        }
                        Err(e) => return Err(invalid_body(format_args!("trailers: {e}"))),
                    };
                    buf.advance(len);
                    self.finish();
                    return Ok(Step::Frame(Frame::trailers(trailers)));
                }
            }
        }
    }

    /// After a data frame: take the framing that follows when it is buffered already
    /// (the end of a length, or the last chunk without trailers), so the body reports
    /// its end with its last data: the client side then finishes the response without
    /// another poll, and the connection is back in the pool.
    fn settle(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        match self.state {
            State::Length(0) => self.finish(),
            State::ChunkEnd if conn.buf.starts_with(b"\r\n0\r\n\r\n") => {
                conn.buf.advance(7);
                self.finish();
            }
            _ => {}
        }
    }
}

/// The size of a chunk-size line (`line` ends with its LF).
fn chunk_size(line: &[u8]) -> Result<u64, BoxError> {
    let Some(line) = line.strip_suffix(b"\r\n") else {
        return Err(invalid_body("chunk-size line not ended by CRLF"));
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(invalid_body("bad chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest.starts_with(b";")) || rest.iter().any(|&b| b < 0x20 && b != b'\t')
    {
        return Err(invalid_body("bad chunk size"));
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let v = char::from(d).to_digit(16).unwrap_or(0);
        (n << 4) | u64::from(v)
    });
    Ok(size)
}

impl http_body::Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.step() {
                Ok(Step::Frame(f)) => {
                    if f.is_data() {
                        this.settle();
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                Ok(Step::Done) => return Poll::Ready(None),
                Ok(Step::More) => {}
                Err(e) => return this.fail(e),
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_CHUNK);
            }
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.io),
                cx,
                &mut conn.buf
            )) {
                Ok(0) if this.state == State::Eof => {
                    this.keep_alive = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail(invalid_body(
                        "the backend closed the connection before the body's end",
                    ));
                }
                Ok(_) => {}
                Err(e) => return this.fail(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The parser and framing against a real loopback socket on which a backend writes
    //! raw bytes: one case table of responses, good and bad, and one of request bodies.

    use std::time::Duration;

    use http_body_util::{BodyExt as _, Full, StreamBody};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A backend for one connection: reads the request until it ends with `until`,
    /// writes `segments` (a pause between them), then closes (`close`) or waits for
    /// the client to close. Gives the request's bytes.
    async fn raw_backend(
        segments: Vec<Vec<u8>>,
        until: &'static [u8],
        close: bool,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(until) {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            for (i, seg) in segments.iter().enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                if s.write_all(seg).await.is_err() {
                    return got;
                }
            }
            if !close {
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
            got
        });
        (addr, task)
    }

    /// What came of a request.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        /// Status, body, trailer `x-t` (if any), whether the connection went back to
        /// the pool.
        Ok(u16, String, Option<String>, bool),
        /// No response: the failure kind.
        Head(Failure),
        /// The response came, its body failed.
        Body(u16),
    }

    async fn exchange(addr: SocketAddr, req: Request<Body>) -> Got {
        let pool = Arc::new(Pool::new(Duration::from_secs(60)));
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let conn = Conn::new(Stream::Plain(tcp));
        let resp = match tokio::time::timeout(
            Duration::from_secs(5),
            send(conn, false, req, Some(&pool), addr),
        )
        .await
        .expect("in time")
        {
            Ok(r) => r,
            Err(e) => return Got::Head(e.failure),
        };
        let status = resp.status().as_u16();
        let collected =
            match tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
                .await
                .expect("body in time")
            {
                Ok(c) => c,
                Err(_) => return Got::Body(status),
            };
        let trailer = collected
            .trailers()
            .and_then(|t| t.get("x-t"))
            .map(|v| v.to_str().expect("ascii").to_owned());
        let body = String::from_utf8(collected.to_bytes().to_vec()).expect("utf-8");
        Got::Ok(status, body, trailer, pool.idle(addr) == 1)
    }

    fn get(method: Method) -> Request<Body> {
        let mut r = Request::new(crate::l7::body::empty());
        *r.method_mut() = method;
        *r.uri_mut() = http::Uri::from_static("/p");
        r.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("web.example"));
        r
    }

    fn ok(status: u16, body: &str, trailer: Option<&str>, reused: bool) -> Got {
        Got::Ok(status, body.to_owned(), trailer.map(str::to_owned), reused)
    }

    #[tokio::test]
    async fn responses_are_framed_as_rfc_9112_says_and_bad_ones_refused() {
        let long_field = format!("x-long: {}\r\n", "a".repeat(MAX_HEAD));
        let many_fields: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: 1\r\n")).collect();
        #[rustfmt::skip]
        let cases: Vec<(&str, Method, Vec<&str>, bool, Got)> = vec![
            ("content-length", Method::GET, vec!["HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"], false, ok(200, "hello", None, true)),
            ("content-length in pieces", Method::GET, vec!["HTTP/1.1 200 OK\r\ncont", "ent-length: 5\r\n\r", "\nhel", "lo"], false, ok(200, "hello", None, true)),
            ("repeated equal content-length", Method::GET, vec!["HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2, 2\r\n\r\nok"], false, ok(200, "ok", None, true)),
            ("zero length", Method::GET, vec!["HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"], false, ok(200, "", None, true)),
            ("chunked", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"], false, ok(200, "hello world", None, true)),
            ("chunked in pieces", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r", "\nhel", "lo\r\n0", "\r\n\r", "\n"], false, ok(200, "hello", None, true)),
            ("chunked, extensions, upper-case hex", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\nA;name=v\r\n0123456789\r\n0\r\n\r\n"], false, ok(200, "0123456789", None, true)),
            ("chunked with trailers", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n"], false, ok(200, "ok", Some("1"), true)),
            ("close-delimited", Method::GET, vec!["HTTP/1.1 200 OK\r\n\r\nhel", "lo"], true, ok(200, "hello", None, false)),
            ("connection: close", Method::GET, vec!["HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"], false, ok(200, "ok", None, false)),
            ("HTTP/1.0 without keep-alive", Method::GET, vec!["HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"], false, ok(200, "ok", None, false)),
            ("HTTP/1.0 keep-alive", Method::GET, vec!["HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok"], false, ok(200, "ok", None, true)),
            ("HEAD: no body", Method::HEAD, vec!["HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"], false, ok(200, "", None, true)),
            ("204: no body", Method::GET, vec!["HTTP/1.1 204 No Content\r\n\r\n"], false, ok(204, "", None, true)),
            ("304: no body", Method::GET, vec!["HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n"], false, ok(304, "", None, true)),
            ("interim responses dropped", Method::GET, vec!["HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n", "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"], false, ok(200, "ok", None, true)),
            ("bytes after the response", Method::GET, vec!["HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA"], false, ok(200, "ok", None, false)),
            // Refused heads: 502, the connection closed.
            ("transfer-encoding with content-length", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"], false, Got::Head(Failure::Other)),
            ("differing content-lengths", Method::GET, vec!["HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok"], false, Got::Head(Failure::Other)),
            ("differing content-lengths in a list", Method::GET, vec!["HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\nok"], false, Got::Head(Failure::Other)),
            ("content-length not a number", Method::GET, vec!["HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok"], false, Got::Head(Failure::Other)),
            ("transfer-encoding other than chunked", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n"], false, Got::Head(Failure::Other)),
            ("transfer-encoding in HTTP/1.0", Method::GET, vec!["HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"], false, Got::Head(Failure::Other)),
            ("obs-fold", Method::GET, vec!["HTTP/1.1 200 OK\r\nx-a: one\r\n two\r\ncontent-length: 2\r\n\r\nok"], false, Got::Head(Failure::Other)),
            ("space before the colon", Method::GET, vec!["HTTP/1.1 200 OK\r\ncontent-length : 2\r\n\r\nok"], false, Got::Head(Failure::Other)),
            ("bad status line", Method::GET, vec!["HTTP/1.1 2000 OK\r\ncontent-length: 2\r\n\r\nok"], false, Got::Head(Failure::Other)),
            ("not HTTP", Method::GET, vec!["SSH-2.0-OpenSSH_9.2\r\n\r\n"], false, Got::Head(Failure::Other)),
            ("oversized head", Method::GET, vec!["HTTP/1.1 200 OK\r\n", &long_field, "content-length: 2\r\n\r\nok"], false, Got::Head(Failure::Other)),
            ("too many fields", Method::GET, vec!["HTTP/1.1 200 OK\r\n", &many_fields, "content-length: 2\r\n\r\nok"], false, Got::Head(Failure::Other)),
            ("closed before a response", Method::GET, vec![], true, Got::Head(Failure::Reset)),
            ("closed within the head", Method::GET, vec!["HTTP/1.1 200 OK\r\ncontent-"], true, Got::Head(Failure::Reset)),
            // Refused bodies: the body fails, the connection closed.
            ("bad chunk size", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"], false, Got::Body(200)),
            ("chunk size overflow", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\nhello\r\n0\r\n\r\n"], false, Got::Body(200)),
            ("chunk size line without CR", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"], false, Got::Body(200)),
            ("chunk data too long", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n"], false, Got::Body(200)),
            ("body shorter than content-length", Method::GET, vec!["HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"], true, Got::Body(200)),
            ("chunked body cut", Method::GET, vec!["HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"], true, Got::Body(200)),
        ];
        for (name, method, segments, close, want) in cases {
            let segments = segments
                .into_iter()
                .map(|s| s.as_bytes().to_vec())
                .collect();
            let (addr, backend) = raw_backend(segments, b"\r\n\r\n", close).await;
            let got = exchange(addr, get(method)).await;
            assert_eq!(got, want, "{name}");
            backend.abort();
        }
    }

    /// A request body of these chunks, with trailer `x-t` when given, of unknown size.
    fn streamed(parts: &[&'static str], trailer: Option<&'static str>) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        if let Some(t) = trailer {
            let mut map = HeaderMap::new();
            map.insert("x-t", HeaderValue::from_static(t));
            frames.push(Ok(Frame::trailers(map)));
        }
        crate::l7::body::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn request_bodies_are_framed_as_hyper_frames_them() {
        #[rustfmt::skip]
        let cases: Vec<(&str, Method, Option<&'static str>, Body, &'static [u8], &str)> = vec![
            ("empty", Method::GET, None, crate::l7::body::empty(), b"\r\n\r\n", "GET /p HTTP/1.1\r\nhost: web.example\r\n\r\n"),
            ("known size", Method::POST, None, crate::l7::body::boxed(Full::new(Bytes::from_static(b"hello"))), b"hello", "POST /p HTTP/1.1\r\nhost: web.example\r\ncontent-length: 5\r\n\r\nhello"),
            ("the request's content-length", Method::PUT, Some("5"), streamed(&["he", "llo"], None), b"hello", "PUT /p HTTP/1.1\r\nhost: web.example\r\ncontent-length: 5\r\n\r\nhello"),
            ("chunked", Method::POST, None, streamed(&["he", "llo"], None), b"0\r\n\r\n", "POST /p HTTP/1.1\r\nhost: web.example\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"),
            ("chunked with trailers", Method::POST, None, streamed(&["ok"], Some("1")), b"x-t: 1\r\n\r\n", "POST /p HTTP/1.1\r\nhost: web.example\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n"),
            ("a GET body of unknown size is not sent", Method::GET, None, streamed(&["x"], None), b"\r\n\r\n", "GET /p HTTP/1.1\r\nhost: web.example\r\n\r\n"),
        ];
        for (name, method, length, body, until, want) in cases {
            let (addr, backend) = raw_backend(
                vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()],
                until,
                false,
            )
            .await;
            let mut req = get(method);
            if let Some(l) = length {
                req.headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from_static(l));
            }
            let req = req.map(|_| body);
            assert_eq!(
                exchange(addr, req).await,
                ok(200, "ok", None, true),
                "{name}"
            );
            let got = backend.await.expect("backend");
            assert_eq!(String::from_utf8_lossy(&got), want, "{name}");
        }
    }
}
