//! The fast path as the agent sees it: load and attach ([`loader`]), the typed maps
//! ([`maps`]), the Maglev ring builder ([`ring`]), desired state -> map writes
//! ([`sync`]), next-hop resolution ([`neigh`]), the interface's forwarding switch
//! ([`forwarding`]) and counters ([`stats`]).

pub mod forwarding;
pub mod loader;
pub mod maps;
pub mod neigh;
pub mod ring;
pub mod stats;
pub mod sync;
