//! Building blocks of the xdplb XDP programs; the entry points are in `main.rs`
//! (`xdp_lb`, `xdp_decap`) and `floors.rs` (benchmark floors).
//!
//! One concern per module, as in Katran's `lib/bpf`:
//! - [`maps`]: every map the programs share with the agent.
//! - [`parsing`]: bounds-checked header access and the Ethernet/VLAN/IPv4/L4 parser.
//! - [`hashing`]: backend choice: flow table, then the service's Maglev ring.
//! - [`csum`]: the IPv4 header checksum.
//! - [`encap`]: IPv4-in-IPv4 encapsulation and decapsulation, and next-hop lookup.
//! - [`icmp`]: echo replies, ICMP errors about VIP flows to their backend, and
//!   "fragmentation needed" for packets over `dataplane.mtu`.
//! - [`filter`]: `[security]` and per-service deny/allow source prefixes (LPM tries).
//! - [`limit`]: `new_flows_per_source`, token buckets per masked source.
//! - [`nexthop`]: next hops from the agent's map, `bpf_fib_lookup` as the fallback.
//! - [`stats`]: per-CPU counter updates.
//! - [`ipv6`]: the IPv6 path: parser, 6in6 / 4in6 / 6in4 tunnels, `next_hop_v6`, decap.
//! - [`icmp6`]: ICMPv6 echo replies, errors about VIP flows, "packet too big".
//! - [`gate`]: the source filters as both families' paths apply them.
//! - [`gue`]: GUE (IPv4 in UDP) encapsulation and decapsulation, per-flow outer source.
//! - [`quic`]: QUIC connection-ID routing.
//! - [`keys`]: map keys with padding, built without `memset`.
//! - [`short`]: the established IPv4 flow's short path, inline in `xdp_lb`.
#![no_std]

pub mod csum;
pub mod encap;
pub mod filter;
pub mod gate;
pub mod gue;
pub mod hashing;
pub mod icmp;
pub mod icmp6;
pub mod ipv6;
pub mod keys;
pub mod limit;
pub mod maps;
pub mod nexthop;
pub mod parsing;
pub mod quic;
pub mod short;
pub mod stats;
