//! The L7 path: an HTTP reverse proxy for services with `mode = "l7"` (and for hosts
//! where XDP cannot attach).
//!
//! - [`service`]: [`service::L7Service`], one running service as the agent drives it
//!   (start, backends, purge, shutdown) and [`service::L7Error`].
//! - [`server`]: the accept loop, TLS handshakes, HTTP/1.1 and HTTP/2 serving,
//!   graceful shutdown.
//! - [`conn`]: one client connection as requests see it, its header and idle
//!   timeouts, and the error shape given to hyper's own parse-error answers.
//! - [`proxy`]: the per-request handler: RFC 9112 checks (`Host`,
//!   `Transfer-Encoding`), loop detection, limits, backend choice (sticky, pool),
//!   forwarding and retries, upgrades, cache, access log.
//! - [`headers`]: hop-by-hop removal (`h2c` upgrades too), `X-Forwarded-*`, `Via` with
//!   this agent's name and its loop check.
//! - [`tls`]: rustls server configuration from PEM files, ALPN h2 and http/1.1; the
//!   client configuration towards backends (`backend_tls`).
//! - [`upstream`]: how requests reach backends: HTTP/1.1 pool, HTTP/2 (h2c, h2 with
//!   ALPN, `auto`) with multiplexed streams, protocol translation.
//! - [`stats`]: [`stats::HttpStats`], the L7 Prometheus series and per-service totals.
//! - [`balancer`]: a service's backend pool: weighted round robin, least request,
//!   power of two choices and consistent hashing, with leases and passive health.
//! - [`cache`]: the RFC 9111 shared HTTP cache (moka store, collapsing, revalidation).
//! - [`sticky`]: signed sticky-session cookies and their key.
//! - [`body`]: the boxed body type shared by the modules below, and the one body
//!   wrapper, [`body::Observed`] (request size limit, backend lease, access log,
//!   cache tee).
//! - [`vip`]: L7 VIPs made local addresses (added to `lo` when needed).
//! - [`manager`]: runs the services the control plane publishes.
//! - [`workers`]: thread-per-core serving: the worker threads (one single-threaded
//!   runtime each) that client connections live on, and per-worker values
//!   (backend connection pools).
pub mod balancer;
pub mod body;
pub mod cache;
pub mod conn;
pub mod headers;
pub mod manager;
pub mod proxy;
pub mod server;
pub mod service;
pub mod stats;
pub mod sticky;
pub mod tls;
pub mod upstream;
pub mod vip;
pub mod workers;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_h2;
