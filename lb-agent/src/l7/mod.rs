//! The L7 path: an HTTP reverse proxy for services with `mode = "l7"` (and for hosts
//! where XDP cannot attach).
//!
//! - [`body`]: the boxed body type shared by the modules below.
//! - [`vip`]: L7 VIPs made local addresses (added to `lo` when needed).
pub mod body;
pub mod vip;
