//! The L7 path: an HTTP reverse proxy for services with `mode = "l7"` (and for hosts
//! where XDP cannot attach).
//!
//! - [`body`]: the boxed body type shared by the modules below.
//! - [`cache`]: the RFC 9111 shared HTTP cache (moka store, collapsing, revalidation).
pub mod body;
pub mod cache;
