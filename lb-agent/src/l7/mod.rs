//! The L7 path: an HTTP reverse proxy for services with `mode = "l7"` (and for hosts
//! where XDP cannot attach).
//!
//! - [`balancer`]: a service's backend pool: weighted round robin, least request,
//!   power of two choices and consistent hashing, with leases and passive health.
//! - [`body`]: the boxed body type shared by the modules below.
//! - [`cache`]: the RFC 9111 shared HTTP cache (moka store, collapsing, revalidation).
//! - [`sticky`]: signed sticky-session cookies and their key.
//! - [`vip`]: L7 VIPs made local addresses (added to `lo` when needed).
pub mod balancer;
pub mod body;
pub mod cache;
pub mod sticky;
pub mod vip;
