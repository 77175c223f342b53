//! xdplb's agent: loads the XDP fast path, fills its maps from the desired state,
//! and (in later steps) runs health checks, the REST API, metrics and the L7 proxy.
//! The binary (`main.rs`) is a thin shell over these modules.

pub mod api;
pub mod bgp;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod ctl;
pub mod dataplane;
pub mod decap;
pub mod handoff;
pub mod health;
pub mod l7;
pub mod logging;
pub mod metrics;
pub mod run;
pub mod state;
