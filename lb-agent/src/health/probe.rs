//! One check of one backend: the [`Probe`] built from a target's config, and the
//! [`CheckError`] whose message is the failure reason shown in logs and status.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use std::sync::Arc;

use super::{Speaks, http::HttpCheck, tcp};
use crate::config::{BackendProtocol, HealthConfig, HealthKind};

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
    /// The HTTP/2 or TLS check failed before a status (connect, handshake, ALPN,
    /// reset): the reason.
    #[error("{0}")]
    Backend(String),
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
    /// A GET in the service's backend protocol (HTTP/2, TLS), through the proxy's
    /// upstream code, on a new connection each time.
    Upstream(Arc<crate::l7::upstream::Checker>),
}

impl Probe {
    /// The probe for `config`, `None` for `kind = "none"`; an `http` check speaks
    /// what `speaks` says.
    pub fn new(config: &HealthConfig, addr: SocketAddr, speaks: &Speaks) -> Option<Self> {
        match config.kind {
            HealthKind::None => None,
            HealthKind::Tcp => Some(Self::Tcp),
            HealthKind::Http
                if speaks.protocol == BackendProtocol::Http1 && speaks.tls.is_none() =>
            {
                Some(Self::Http(HttpCheck::new(config, addr)))
            }
            HealthKind::Http => Some(Self::Upstream(Arc::new(crate::l7::upstream::Checker::new(
                config, addr, speaks,
            )))),
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
            Self::Upstream(check) => {
                let status = tokio::time::timeout_at(deadline, check.status(addr))
                    .await
                    .map_err(|_| CheckError::Timeout {
                        phase: "waiting for the response",
                    })?
                    .map_err(CheckError::Backend)?;
                let (low, high) = check.expect();
                if !(low..=high).contains(&status) {
                    return Err(CheckError::Status {
                        status,
                        expected: (low, high),
                    });
                }
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
        let h1 = Speaks::default();
        assert!(Probe::new(&config, addr, &h1).is_none());
        config.kind = HealthKind::Tcp;
        assert!(matches!(Probe::new(&config, addr, &h1), Some(Probe::Tcp)));
        config.kind = HealthKind::Http;
        assert!(matches!(
            Probe::new(&config, addr, &h1),
            Some(Probe::Http(_))
        ));
        let h2c = Speaks {
            protocol: BackendProtocol::H2c,
            tls: None,
        };
        assert!(matches!(
            Probe::new(&config, addr, &h2c),
            Some(Probe::Upstream(_))
        ));
    }

    /// An HTTP/2-only backend (`hyper`, h2c) answering `/healthz` with 204 and
    /// anything else with 503.
    async fn h2c_backend() -> SocketAddr {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: http::Request<_>| async move {
                        let status = if req.version() == http::Version::HTTP_2
                            && req.uri().path() == "/healthz"
                            && req.uri().authority().map(|a| a.as_str()) == Some("web.example")
                        {
                            204
                        } else {
                            503
                        };
                        let mut resp = http::Response::new(crate::l7::body::empty());
                        *resp.status_mut() = http::StatusCode::from_u16(status).expect("status");
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_checks_of_h2c_backends_speak_http2() {
        let addr = h2c_backend().await;
        let config = HealthConfig {
            kind: HealthKind::Http,
            host: Some("web.example".to_owned()),
            ..HealthConfig::default()
        };
        let h2c = Speaks {
            protocol: BackendProtocol::H2c,
            tls: None,
        };
        let probe = Probe::new(&config, addr, &h2c).expect("probe");
        let ok = probe.check(addr, Duration::from_secs(5)).await;
        assert_eq!(ok.expect("up"), "status 204");
        // The plain HTTP/1.1 check cannot talk to it.
        let h1 = Probe::new(&config, addr, &Speaks::default()).expect("probe");
        assert!(h1.check(addr, Duration::from_secs(5)).await.is_err());
        // A status outside the range, a dead port.
        let bad = HealthConfig {
            path: "/other".to_owned(),
            ..config.clone()
        };
        let probe = Probe::new(&bad, addr, &h2c).expect("probe");
        let e = probe.check(addr, Duration::from_secs(5)).await;
        assert_eq!(
            e.expect_err("503").to_string(),
            "status 503 not in 200..=399"
        );
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let probe = Probe::new(&config, dead, &h2c).expect("probe");
        let e = probe.check(dead, Duration::from_secs(5)).await;
        assert!(
            e.expect_err("dead").to_string().contains("connect failed"),
            "dead port"
        );
    }
}
