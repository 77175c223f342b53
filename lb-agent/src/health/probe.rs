//! One check of one backend: the [`Probe`] built from a target's config, and the
//! [`CheckError`] whose message is the failure reason shown in logs and status.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::{http::HttpCheck, tcp};
use crate::config::{HealthConfig, HealthKind};

/// Why a check failed. The `Display` text is the short reason users see.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The backend refused the connection (nothing listens).
    #[error("connect refused")]
    ConnectRefused,
    /// The connection was not established within the check's timeout.
    #[error("connect timeout after {}ms", .0.as_millis())]
    ConnectTimeout(Duration),
    /// Any other connect error (unreachable, reset, ...).
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// The check's timeout ran out during `phase` ("sending request", "reading response").
    #[error("timeout {phase}")]
    Timeout {
        /// What the check was doing.
        phase: &'static str,
    },
    /// An I/O error after the connection was established.
    #[error("{phase} failed: {source}")]
    Io {
        /// What the check was doing ("write", "read").
        phase: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The backend closed the connection before a complete status line and headers.
    #[error("connection closed before end of headers")]
    Closed,
    /// The first response line is not `HTTP/1.x NNN ...`.
    #[error("invalid status line")]
    InvalidStatusLine,
    /// The status line and headers exceed the limit.
    #[error("response headers exceed {limit} bytes")]
    HeadersTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The status is outside the accepted range.
    #[error("status {status} not in {}..={}", .expected.0, .expected.1)]
    Status {
        /// The status received.
        status: u16,
        /// The accepted range, inclusive.
        expected: (u16, u16),
    },
}

/// The check a task runs against its backend, prepared once per target.
#[derive(Clone, Debug)]
pub(crate) enum Probe {
    /// A TCP connect.
    Tcp,
    /// An HTTP/1.1 GET.
    Http(HttpCheck),
}

impl Probe {
    /// The probe for `config`, `None` for `kind = "none"`.
    pub fn new(config: &HealthConfig, addr: SocketAddr) -> Option<Self> {
        match config.kind {
            HealthKind::None => None,
            HealthKind::Tcp => Some(Self::Tcp),
            HealthKind::Http => Some(Self::Http(HttpCheck::new(config, addr))),
        }
    }

    /// Runs one check against `addr`, all of it within `timeout`. On success returns
    /// a short description ("connected", "status 200").
    pub async fn check(&self, addr: SocketAddr, timeout: Duration) -> Result<String, CheckError> {
        let deadline = Instant::now() + timeout;
        match self {
            Self::Tcp => {
                tcp::connect(addr, deadline, timeout).await?;
                Ok("connected".to_owned())
            }
            Self::Http(http) => {
                let status = http.check(addr, deadline, timeout).await?;
                Ok(format!("status {status}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_short() {
        let cases = [
            (CheckError::ConnectRefused, "connect refused"),
            (
                CheckError::ConnectTimeout(Duration::from_millis(300)),
                "connect timeout after 300ms",
            ),
            (
                CheckError::Status {
                    status: 503,
                    expected: (200, 399),
                },
                "status 503 not in 200..=399",
            ),
            (CheckError::InvalidStatusLine, "invalid status line"),
            (
                CheckError::Timeout {
                    phase: "reading response",
                },
                "timeout reading response",
            ),
            (
                CheckError::HeadersTooLarge { limit: 8192 },
                "response headers exceed 8192 bytes",
            ),
        ];
        for (err, want) in cases {
            assert_eq!(err.to_string(), want);
        }
    }

    #[test]
    fn kind_none_has_no_probe() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 80));
        let mut config = HealthConfig::default();
        assert!(Probe::new(&config, addr).is_none());
        config.kind = HealthKind::Tcp;
        assert!(matches!(Probe::new(&config, addr), Some(Probe::Tcp)));
        config.kind = HealthKind::Http;
        assert!(matches!(Probe::new(&config, addr), Some(Probe::Http(_))));
    }
}
