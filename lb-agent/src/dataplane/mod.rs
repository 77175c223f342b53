//! The fast path as the agent sees it. Data flows downhill through it:
//! the desired state and the [`desired::Sink`] it is handed to ([`desired`]), failed
//! writes retried with backoff ([`retry`]), the one writer that turns it into map
//! writes ([`sync`]), the typed maps ([`maps`]) and the Maglev ring builder ([`ring`]).
//! The balancer's lifecycle on an interface (load, adopt, attach, stop, detach) is
//! [`fast_path`], built on [`loader`] (object, capacities, pins), next-hop resolution
//! ([`neigh`]), the interface's forwarding switch ([`forwarding`]) and counters
//! ([`stats`]); [`nexthop`] makes the backends' next hops for the fast path's map. The `[security]` source filters' tries and rule ids are [`filters`]; [`batch`] writes many array entries in one `bpf()` call (the rings).

pub mod batch;
pub mod desired;
pub mod fast_path;
pub mod filters;
pub mod forwarding;
pub mod loader;
pub mod maps;
pub mod neigh;
pub mod nexthop;
pub mod quic_ids;
pub mod retry;
pub mod ring;
pub mod stats;
pub mod sync;
