//! xdplb's test support: the namespace test bed, a packet builder and decoder for XDP
//! fixtures, HTTP backends and clients (on hyper), and the end-to-end scenarios that the
//! integration tests (`tests/`) and the demo binary (`xdplb-demo`) share.
//!
//! Module map:
//! - [`netns`]: namespace guard, commands and Rust code inside namespaces, privilege check.
//! - [`topology`]: the step-1 network (client, router, lb, be1..be3) and the agent's lifecycle.
//! - [`config`]: a builder for the agent's TOML config.
//! - [`http`]: HTTP backends that count what they serve, and clients whose TCP connection
//!   the test owns (namespace, local port, one per request or one for many), on hyper.
//! - [`bird`]: BIRD 2 daemons in namespaces (own config, socket, log) and `birdc`.
//! - [`ecmp_bed`]: several LB nodes behind a router with ECMP over BGP/BFD (BIRD 2),
//!   backends with echo servers, and a store network for the shared state.
//! - [`stream`]: long-lived TCP streams with sequence checks, and their echo server.
//! - [`capture`]: packet counting with `AF_PACKET` sockets, and ping.
//! - [`packet`]: Ethernet/IPv4/TCP/UDP builder and decoder with checksums.
//! - [`packet6`]: IPv6 headers, TCP/UDP/ICMPv6 over IPv6, extension headers, the tunnel
//!   kinds (6in6, 4in6, 6in4), and a checksum checker through any of them.
//! - [`scenario`]: the L4 end-to-end run and its observations.
//! - [`load`]: continuous client traffic under control-plane changes, and times from the
//!   agent's log.
//! - [`xdp_bed`]: the XDP bed of the fixtures and the benchmark: load the balancer, fill
//!   its maps, `test_run`, and the oracle and expected frames.
//! - [`require_privileges!`]: the entry line of every privileged test.

pub mod bird;
pub mod capture;
pub mod cluster_bed;
pub mod config;
pub mod ecmp_bed;
pub mod etcd;
pub mod http;
pub mod load;
pub mod netns;
pub mod packet;
pub mod packet6;
pub mod scenario;
pub mod stream;
pub mod topology;
pub mod xdp_bed;
