//! Everything the xdplb kernel programs and the userspace agent must agree on:
//! map names and capacities ([`maps`]), the `#[repr(C)]` key and value layouts
//! ([`types`]), the counter indices ([`stats`]) and the flow hash and ring
//! indexing ([`hash`]), which the agent's tests use as the oracle for the XDP
//! program's choices.
#![no_std]

pub mod hash;
pub mod maps;
pub mod stats;
pub mod types;
