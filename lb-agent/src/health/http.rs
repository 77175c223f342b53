//! The HTTP check, on a plain TCP connection: one HTTP/1.1 `GET` with `Host` and
//! `Connection: close`. The status line and headers (at most [`MAX_HEAD_BYTES`]) are
//! read and the status must fall within `expect_status`; then at most
//! [`MAX_BODY_BYTES`] of body are read and discarded, so a check costs the backend a
//! full response but the checker a bounded amount of memory and time. Everything,
//! connect included, happens within the check's timeout.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::{CheckError, tcp};
use crate::config::HealthConfig;

/// Limit on the status line plus headers.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Body bytes read (and discarded) at most; a longer body is fine, the rest is unread.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Size of one read.
const READ_CHUNK: usize = 4 * 1024;

/// A prepared HTTP check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HttpCheck {
    /// The complete request, built once.
    request: Vec<u8>,
    /// Accepted statuses, inclusive.
    expect: (u16, u16),
}

impl HttpCheck {
    /// The check `config` describes for the backend at `addr`; the `Host` header is
    /// `config.host`, or `addr` (`[v6]:port` for IPv6) when absent.
    pub fn new(config: &HealthConfig, addr: SocketAddr) -> Self {
        let host = config.host.clone().unwrap_or_else(|| addr.to_string());
        let path = if config.path.is_empty() {
            "/"
        } else {
            &config.path
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xdplb-health\r\n\
             Connection: close\r\n\r\n"
        );
        Self {
            request: request.into_bytes(),
            expect: config.expect_status,
        }
    }

    /// Runs the check against `addr` before `deadline`; returns the status received.
    /// `timeout` is only for the failure reason.
    pub async fn check(
        &self,
        addr: SocketAddr,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<u16, CheckError> {
        let mut stream = tcp::connect(addr, deadline, timeout).await?;
        timeout_at(deadline, stream.write_all(&self.request))
            .await
            .map_err(|_| CheckError::Timeout {
                phase: "sending request",
            })?
            .map_err(|source| CheckError::Io {
                phase: "write",
                source,
            })?;

        let mut buf = Vec::with_capacity(READ_CHUNK);
        let head_len = read_head(&mut stream, &mut buf, deadline).await?;
        let head = parse_head(&buf[..head_len])?;
        let (low, high) = self.expect;
        if !(low..=high).contains(&head.status) {
            return Err(CheckError::Status {
                status: head.status,
                expected: self.expect,
            });
        }
        let body_start = buf.split_off(head_len);
        drain_body(&mut stream, head.body, &body_start, buf, deadline).await?;
        Ok(head.status)
    }
}

/// Reads until the end of the headers; returns the length of the head (status line,
/// headers and the blank line). `buf` may hold body bytes past it.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<usize, CheckError> {
    let mut status_line_ok = false;
    loop {
        if !status_line_ok {
            if let Some(eol) = buf.iter().position(|&b| b == b'\n') {
                // Fail fast on something that is not HTTP at all (an SSH banner, ...).
                parse_status_line(&buf[..eol]).ok_or(CheckError::InvalidStatusLine)?;
                status_line_ok = true;
            }
        }
        if let Some(end) = head_end(buf) {
            return if end > MAX_HEAD_BYTES {
                Err(CheckError::HeadersTooLarge {
                    limit: MAX_HEAD_BYTES,
                })
            } else {
                Ok(end)
            };
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(CheckError::HeadersTooLarge {
                limit: MAX_HEAD_BYTES,
            });
        }
        buf.reserve(READ_CHUNK);
        if read(stream, buf, deadline).await? == 0 {
            return Err(CheckError::Closed);
        }
    }
}

/// Reads and discards the body as `framing` describes, at most [`MAX_BODY_BYTES`] of
/// it, `first` being the part already read with the head. `scratch` is a buffer to
/// reuse.
async fn drain_body(
    stream: &mut TcpStream,
    framing: Framing,
    first: &[u8],
    mut scratch: Vec<u8>,
    deadline: Instant,
) -> Result<(), CheckError> {
    let limit = match framing {
        Framing::Empty => return Ok(()),
        Framing::Length(len) => usize::try_from(len)
            .unwrap_or(usize::MAX)
            .min(MAX_BODY_BYTES),
        Framing::Chunked | Framing::UntilClose => MAX_BODY_BYTES,
    };
    let mut seen = first.len();
    // The last bytes read, enough to spot the end of a chunked body.
    let mut tail = Vec::with_capacity(2 * LAST_CHUNK.len());
    keep_tail(&mut tail, first);
    loop {
        if seen >= limit || (framing == Framing::Chunked && ends_chunked(&tail, seen)) {
            return Ok(());
        }
        scratch.clear();
        scratch.reserve(READ_CHUNK);
        match read(stream, &mut scratch, deadline).await? {
            // The backend closed: the response is complete (or truncated, which does
            // not make the status any less valid).
            0 => return Ok(()),
            n => {
                seen += n;
                keep_tail(&mut tail, &scratch);
            }
        }
    }
}

/// The final chunk of a chunked body, with an empty trailer.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// Keeps the last few bytes of what was read in `tail`.
fn keep_tail(tail: &mut Vec<u8>, read: &[u8]) {
    let keep = LAST_CHUNK.len() + 2;
    tail.extend_from_slice(&read[read.len().saturating_sub(keep)..]);
    let excess = tail.len().saturating_sub(keep);
    tail.drain(..excess);
}

/// Whether a chunked body of `seen` bytes ending in `tail` has ended. A false
/// positive only stops the read early, which is harmless.
fn ends_chunked(tail: &[u8], seen: usize) -> bool {
    if seen == LAST_CHUNK.len() {
        tail == LAST_CHUNK
    } else {
        tail.ends_with(b"\r\n0\r\n\r\n")
    }
}

/// One read into the spare capacity of `buf`, before `deadline`.
async fn read(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<usize, CheckError> {
    timeout_at(deadline, stream.read_buf(buf))
        .await
        .map_err(|_| CheckError::Timeout {
            phase: "reading response",
        })?
        .map_err(|source| CheckError::Io {
            phase: "read",
            source,
        })
}

/// How the body of a response is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the backend closes.
    UntilClose,
}

/// What the checker needs of a response head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    body: Framing,
}

/// The offset just past the blank line that ends the head, if it is in `buf`.
/// Accepts bare `\n` line ends as well as `\r\n`.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        let rest = &buf[i + 1..];
        if rest.starts_with(b"\r\n") {
            Some(i + 3)
        } else if rest.starts_with(b"\n") {
            Some(i + 2)
        } else {
            None
        }
    })
}

/// Parses `HTTP/1.x NNN[ reason]` (without the line end) into the status code.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (minor, rest) = rest.split_first()?;
    let rest = rest.strip_prefix(b" ").filter(|_| minor.is_ascii_digit())?;
    let (code, reason) = rest.split_at_checked(3)?;
    if !(reason.is_empty() || reason.starts_with(b" ")) {
        return None;
    }
    code.iter().try_fold(0u16, |acc, &d| {
        d.is_ascii_digit().then(|| acc * 10 + u16::from(d - b'0'))
    })
}

/// Parses a complete head: status line and the headers that frame the body.
fn parse_head(head: &[u8]) -> Result<Head, CheckError> {
    let mut lines = head.split(|&b| b == b'\n');
    let status = lines
        .next()
        .and_then(parse_status_line)
        .ok_or(CheckError::InvalidStatusLine)?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (line[..colon].trim_ascii(), line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = value
                .to_ascii_lowercase()
                .windows(7)
                .any(|w| w == b"chunked");
        }
    }
    let body = if matches!(status, 100..=199 | 204 | 304) {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(len) = length {
        Framing::Length(len)
    } else {
        Framing::UntilClose
    };
    Ok(Head { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthKind;
    use crate::health::testutil::{Backend, closed_port};

    const TIMEOUT: Duration = Duration::from_millis(300);

    fn check_for(addr: SocketAddr) -> HttpCheck {
        let config = HealthConfig {
            kind: HealthKind::Http,
            ..HealthConfig::default()
        };
        HttpCheck::new(&config, addr)
    }

    async fn run(check: &HttpCheck, addr: SocketAddr, timeout: Duration) -> Result<u16, String> {
        check
            .check(addr, Instant::now() + timeout, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Some(200));
        assert_eq!(
            parse_status_line(b"HTTP/1.0 503 Service Unavailable"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.1 204"), Some(204));
        for bad in [
            &b""[..],
            b"SSH-2.0-OpenSSH_9.6\r",
            b"HTTP/2 200",
            b"HTTP/1.1 20 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 2x0 OK",
            b"HTTP/1.x 200 OK",
            b"http/1.1 200 OK",
        ] {
            assert_eq!(
                parse_status_line(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn end_of_head() {
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"), Some(25));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\n\nbody"), Some(17));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nA: b\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn body_framing() {
        let framing = |head: &str| parse_head(head.as_bytes()).unwrap().body;
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"),
            Framing::Length(12)
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Framing::Chunked
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nServer: x\r\n\r\n"),
            Framing::UntilClose
        );
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
            Framing::Empty
        );
        assert_eq!(framing("HTTP/1.1 304 Not Modified\r\n\r\n"), Framing::Empty);
        assert!(matches!(
            parse_head(b"hello\r\n\r\n"),
            Err(CheckError::InvalidStatusLine)
        ));
    }

    #[test]
    fn chunked_end() {
        let mut tail = Vec::new();
        keep_tail(&mut tail, b"5\r\nhello\r\n0\r\n");
        assert!(!ends_chunked(&tail, 15));
        keep_tail(&mut tail, b"\r\n");
        assert!(ends_chunked(&tail, 17));
        assert!(tail.len() <= LAST_CHUNK.len() + 2);
        assert!(ends_chunked(b"0\r\n\r\n", 5));
    }

    #[test]
    fn request_uses_host_or_address() {
        let addr: SocketAddr = "[2001:db8::1]:8080".parse().unwrap();
        let mut config = HealthConfig {
            path: "/ready".into(),
            ..HealthConfig::default()
        };
        assert_eq!(
            String::from_utf8(HttpCheck::new(&config, addr).request).unwrap(),
            "GET /ready HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\nUser-Agent: xdplb-health\r\n\
             Connection: close\r\n\r\n"
        );
        config.host = Some("app.example".into());
        let request = String::from_utf8(HttpCheck::new(&config, addr).request).unwrap();
        assert!(request.contains("\r\nHost: app.example\r\n"), "{request}");
    }

    #[tokio::test]
    async fn status_in_range_succeeds_and_outside_fails() {
        let backend = Backend::http(200).await;
        let check = check_for(backend.addr);
        assert_eq!(run(&check, backend.addr, TIMEOUT).await, Ok(200));
        backend.set_status(399);
        assert_eq!(run(&check, backend.addr, TIMEOUT).await, Ok(399));
        backend.set_status(503);
        assert_eq!(
            run(&check, backend.addr, TIMEOUT).await,
            Err("status 503 not in 200..=399".into())
        );
        backend.set_status(404);
        let config = HealthConfig {
            expect_status: (404, 404),
            ..HealthConfig::default()
        };
        assert_eq!(
            run(
                &HttpCheck::new(&config, backend.addr),
                backend.addr,
                TIMEOUT
            )
            .await,
            Ok(404)
        );
    }

    #[tokio::test]
    async fn sends_the_configured_host() {
        let backend = Backend::http(200).await;
        let config = HealthConfig {
            path: "/healthz?deep=1".into(),
            host: Some("health.example".into()),
            ..HealthConfig::default()
        };
        run(
            &HttpCheck::new(&config, backend.addr),
            backend.addr,
            TIMEOUT,
        )
        .await
        .unwrap();
        run(&check_for(backend.addr), backend.addr, TIMEOUT)
            .await
            .unwrap();
        let requests = backend.requests();
        assert_eq!(requests.len(), 2);
        assert!(
            requests[0].starts_with("GET /healthz?deep=1 HTTP/1.1\r\n"),
            "{}",
            requests[0]
        );
        assert_eq!(
            Backend::host_of(&requests[0]).as_deref(),
            Some("health.example")
        );
        assert_eq!(
            Backend::host_of(&requests[1]),
            Some(backend.addr.to_string())
        );
        for request in &requests {
            assert!(request.contains("\r\nConnection: close\r\n"), "{request}");
            assert!(
                request.contains("\r\nUser-Agent: xdplb-health\r\n"),
                "{request}"
            );
        }
    }

    #[tokio::test]
    async fn a_silent_backend_times_out() {
        let backend = Backend::silent().await;
        let timeout = Duration::from_millis(100);
        let started = Instant::now();
        let result = run(&check_for(backend.addr), backend.addr, timeout).await;
        assert_eq!(result, Err("timeout reading response".into()));
        let took = started.elapsed();
        assert!(took >= timeout && took < timeout * 3, "{took:?}");
    }

    #[tokio::test]
    async fn refused_and_garbage() {
        let addr = closed_port().await;
        assert_eq!(
            run(&check_for(addr), addr, TIMEOUT).await,
            Err("connect refused".into())
        );

        let backend = Backend::raw(b"SSH-2.0-OpenSSH_9.6\r\n".to_vec(), true).await;
        let result = run(&check_for(backend.addr), backend.addr, TIMEOUT).await;
        assert_eq!(result, Err("invalid status line".into()));

        let backend = Backend::raw(b"HTTP/1.1 200 OK\r\nServer: x".to_vec(), false).await;
        let result = run(&check_for(backend.addr), backend.addr, TIMEOUT).await;
        assert_eq!(
            result,
            Err("connection closed before end of headers".into())
        );

        let mut huge = b"HTTP/1.1 200 OK\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b"X-Pad: 0123456789abcdef\r\n", 400).flatten());
        huge.extend_from_slice(b"\r\n");
        let backend = Backend::raw(huge, true).await;
        let result = run(&check_for(backend.addr), backend.addr, TIMEOUT).await;
        assert_eq!(result, Err("response headers exceed 8192 bytes".into()));
    }

    /// Bodies that end without the backend closing: the check must not wait for the
    /// close (which would time out).
    #[tokio::test]
    async fn reads_at_most_the_body_limit() {
        let timeout = Duration::from_millis(500);
        let mut big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n".to_vec();
        big.resize(big.len() + 1_000_000, b'x');
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let responses = [
            big,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            chunked.to_vec(),
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
        ];
        for response in responses {
            let backend = Backend::raw(response, true).await;
            let started = Instant::now();
            assert!(
                run(&check_for(backend.addr), backend.addr, timeout)
                    .await
                    .is_ok()
            );
            assert!(started.elapsed() < timeout / 2, "{:?}", started.elapsed());
        }
        // Without framing, the body ends when the backend closes.
        let backend = Backend::raw(b"HTTP/1.0 200 OK\r\n\r\nfine".to_vec(), false).await;
        assert_eq!(
            run(&check_for(backend.addr), backend.addr, timeout).await,
            Ok(200)
        );
    }
}
