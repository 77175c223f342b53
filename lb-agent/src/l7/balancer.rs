//! A service's backend pool on the L7 path: four weighted schedulers, leases that count
//! requests in flight, and passive health (outlier ejection).
//!
//! # Schedulers (all weighted)
//!
//! - `round-robin`: nginx's smooth weighted round robin (`ngx_http_upstream_get_peer`):
//!   every pick adds each candidate's weight to its running `current`, takes the largest
//!   `current` and subtracts the candidates' total from it. Weights 5, 1, 1 give
//!   `a a b a c a a`: exact shares over every cycle, with the light backends spread out
//!   rather than bunched. The running values survive [`Pool::update`] for backends that
//!   stay, so slow-start weight changes do not restart the cycle.
//! - `least-request`: the candidate with the lowest `(in_flight + 1) / weight` (the load
//!   it would have after this request, relative to its capacity), compared exactly by
//!   cross-multiplication. Ties go to the first candidate from a rotating start, so an
//!   idle pool of equal weights is served in turn. With unequal weights and no
//!   concurrency, the heaviest backend takes every request (it has the lowest expected
//!   load); under concurrency the in-flight counts settle in proportion to the weights.
//! - `p2c`: the power of two random choices (Mitzenmacher, "The Power of Two Choices in
//!   Randomized Load Balancing", 2001): two distinct candidates drawn at random with
//!   probability proportional to weight, and the one with the lower
//!   `(in_flight + 1) / weight` wins. Nearly the balance of least-request, without its
//!   herding onto one backend when many balancers see the same counts.
//! - `hash`: consistent weighted hashing of the request (the client address, a header
//!   or a cookie per `hash_on`; the client address when that header or cookie is
//!   absent or empty) into a Maglev table (Eisenbud et al., NSDI 2016) built by
//!   [`crate::dataplane::ring`], the same builder as the XDP rings. The key hash is
//!   [`lb_common::hash::tagged_hash`] (FNV-1a with `MurmurHash3`'s finaliser, the same
//!   code as the ring's member hash): fixed, so every restart and every LB node maps
//!   a key to the same backend. When the chosen backend is excluded or ejected the walk
//!   continues to the following slots, so a key always falls back to the same backend.
//!   IPv4-mapped IPv6 clients hash as their IPv4 address.
//!
//! The table has [`HASH_TABLE_SIZE`] = 65537 slots (prime), the L4 default: 256 KiB
//! per `hash` service (other schedulers build no table), rebuilt off the pick path in
//! a few milliseconds on each [`Pool::update`]. Smaller tables cost stability, because
//! Maglev's extra disruption grows with backends/slots. Measured with equal weights,
//! removing one backend moves this share of the *other* backends' keys (averaged over
//! ten removals):
//!
//! | backends | 4093 slots | 16381 | 32749 | 65537 |
//! |---------:|-----------:|------:|------:|------:|
//! | 10       | 1.0%       | 0.57% | 0.32% | 0.27% |
//! | 50       | 2.2%       | 1.0%  | 0.70% | 0.45% |
//! | 100      | 3.0%       | 1.3%  | 0.90% | 0.56% |
//!
//! Weight shares are within a slot (0.0015%). The `hash_minimal_disruption` test
//! checks the 10-backend case at the key level: only 0.5% of the others' 10 000 keys
//! move, and restoring the backend restores the mapping exactly.
//!
//! # Passive health (outlier detection)
//!
//! After the style of Envoy's consecutive-5xx / consecutive-gateway-failure outlier
//! detection: `eject_after` consecutive failures ([`Outcome`] other than `Success`; a
//! success resets the count) eject a backend for `eject_base_ms * 2^(n-1)`, capped at
//! `eject_max_ms`, where `n` counts ejections in a row. When the time is up the backend
//! is eligible again; its first success after that resets `n` to 0, while failing again
//! ejects it for twice as long. Results that arrive while a backend is ejected (requests
//! already in flight) do not count. `eject_after = 0` disables ejection. Ejections are
//! logged with `warn!`; the return is logged with `info!` when the first result after the
//! ejection arrives (or at [`Pool::snapshot`]).
//!
//! Ejection never empties the pool: when every candidate left is ejected, [`Pool::pick`]
//! ignores ejection (Envoy's panic threshold at 100%). [`Pool::lease`] and
//! [`Pool::lease_by_token`] (sticky sessions) do not: they return `None` so the caller
//! falls back to [`Pool::pick`].
//!
//! # Sticky sessions
//!
//! [`Pool::lease_by_token`] takes the [`StickyKey`] and maps a backend token (see
//! [`super::sticky`]) to a serving, non-ejected backend. Each serving set computes its
//! backends' tokens once, on the first lookup after an [`Pool::update`], and caches them
//! with the key's fingerprint; a lookup with another key computes them afresh. There is
//! no per-session state.
//!
//! # Concurrency and clock
//!
//! The serving set is an immutable `Arc` held by one slot per L7 worker
//! ([`super::workers::Shards`]), each on its own cache line behind its own mutex, which
//! only its worker takes on the request path: `update` builds the new set outside the
//! locks (picks never wait for a Maglev table) and swaps it into every slot. A pick
//! works under its worker's slot with the round-robin running values and the
//! least-request rotation kept there (so each worker runs its own smooth weighted round
//! robin: the same shares overall), and passive health reports a success on a backend
//! with no failure on record without taking its lock. In-flight counts are atomics held
//! by [`Lease`]s (one per worker too), which keep their backend alive after it leaves the set.
//! The `*_at` methods take the time explicitly,
//! so tests drive ejection without sleeping; the plain methods use `Instant::now()`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng as _;

use super::sticky::{StickyKey, TOKEN_LEN, cookie_value};
use super::workers::Shards;
use crate::config::{HashOn, HttpConfig, Scheduler};
use crate::dataplane::ring::{self, RingMember};
use lb_common::hash::tagged_hash;

/// Slots of a `hash` pool's Maglev table (prime; see the module documentation).
pub const HASH_TABLE_SIZE: u32 = 65537;

/// The result of one request to a backend, for passive health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response that is not a 5xx.
    Success,
    /// The connection could not be opened.
    ConnectError,
    /// The connection broke before the response completed.
    Reset,
    /// A 5xx response.
    Status5xx,
    /// No response in time.
    Timeout,
}

/// What a request offers to the scheduler.
pub struct PickKey<'a> {
    /// The client's address.
    pub client: IpAddr,
    /// The request's headers (for `hash_on = "header:..."` or `"cookie:..."`).
    pub headers: &'a http::HeaderMap,
}

/// One backend as the API, metrics and tests see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendState {
    /// Address.
    pub addr: SocketAddr,
    /// Current weight.
    pub weight: u32,
    /// Requests in flight (leases held).
    pub in_flight: u32,
    /// Whether passive health has ejected it.
    pub ejected: bool,
    /// Failures since the last success (or the last ejection).
    pub consecutive_failures: u32,
}

/// A chosen backend; counts as one request in flight until dropped.
pub struct Lease {
    backend: Arc<Backend>,
    /// The shard of the in-flight count it added to.
    shard: usize,
}

impl Lease {
    fn new(backend: &Arc<Backend>) -> Self {
        let shard = backend.in_flight.my_index();
        backend.in_flight.at(shard).fetch_add(1, Ordering::Relaxed);
        Self {
            backend: Arc::clone(backend),
            shard,
        }
    }

    /// The backend's address.
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.backend.addr
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend
            .in_flight
            .at(self.shard)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Lease").field(&self.backend.addr).finish()
    }
}

/// A backend's state that outlives serving-set updates.
struct Backend {
    addr: SocketAddr,
    /// Requests in flight, one count per worker (each on its own cache line; a
    /// shard wraps below zero when a lease ends on another thread than it began, the
    /// wrapping sum is right).
    in_flight: Shards<AtomicU32>,
    /// End of the current ejection, nanoseconds since the pool's epoch; 0: none.
    /// Read without locking by picks; written under `health`.
    ejected_until: AtomicU64,
    /// Whether `health` is all zero (no failure, ejection or pending return on
    /// record): a success then changes nothing and is not locked for. Written under
    /// `health`.
    clean: AtomicBool,
    health: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    consecutive_failures: u32,
    /// Ejections in a row (reset by a success after returning).
    ejections: u32,
    /// The current or last ejection's length, while its return is not yet logged.
    ejected_for: Option<Duration>,
}

impl Backend {
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            in_flight: Shards::default(),
            ejected_until: AtomicU64::new(0),
            clean: AtomicBool::new(true),
            health: Mutex::new(Health::default()),
        }
    }

    fn is_ejected(&self, now_ns: u64) -> bool {
        now_ns < self.ejected_until.load(Ordering::Relaxed)
    }

    fn in_flight(&self) -> u32 {
        self.in_flight
            .iter()
            .fold(0u32, |n, s| n.wrapping_add(s.load(Ordering::Relaxed)))
    }
}

struct Member {
    backend: Arc<Backend>,
    weight: u32,
}

/// One serving set: immutable once built, except the lazily computed sticky tokens.
struct Set {
    members: Vec<Member>,
    /// Member index by address (foldhash: the keys are ours, looked up per report).
    index: HashMap<SocketAddr, usize, foldhash::fast::RandomState>,
    /// Maglev table of member indices (hash scheduler only).
    table: Vec<u32>,
    /// (key fingerprint, token of each member).
    tokens: OnceLock<([u8; 8], Vec<[u8; TOKEN_LEN]>)>,
}

impl Set {
    fn empty() -> Self {
        Self {
            members: Vec::new(),
            index: HashMap::default(),
            table: Vec::new(),
            tokens: OnceLock::new(),
        }
    }
}

/// One worker's view of the pool: the serving set and its scheduling state.
struct Slot {
    set: Arc<Set>,
    /// Smooth WRR running values, by member index.
    rr: Vec<i64>,
    /// Rotating start for least-request ties.
    rotation: usize,
}

/// Ejection settings from [`HttpConfig`].
#[derive(Clone, Copy)]
struct EjectPolicy {
    after: u32,
    base: Duration,
    max: Duration,
}

impl EjectPolicy {
    /// Length of the `n`-th ejection in a row (n >= 1).
    fn duration(self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.saturating_sub(1)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// A service's backend pool. `Send + Sync`; share it behind an `Arc`.
pub struct Pool {
    scheduler: Scheduler,
    hash_on: HashOn,
    eject: EjectPolicy,
    epoch: Instant,
    /// One slot per worker (see the module documentation).
    slots: Shards<Mutex<Slot>>,
    /// Serialises [`Pool::update`].
    updating: Mutex<()>,
}

impl Pool {
    /// An empty pool. `Maglev` and `SourceIp` (l4 schedulers, rejected for l7 by the
    /// config) behave as `Hash` on the client address.
    #[must_use]
    pub fn new(scheduler: Scheduler, hash_on: HashOn, http: &HttpConfig) -> Self {
        let (scheduler, hash_on) = match scheduler {
            Scheduler::Maglev | Scheduler::SourceIp => (Scheduler::Hash, HashOn::Client),
            s => (s, hash_on),
        };
        Self {
            scheduler,
            hash_on,
            eject: EjectPolicy {
                after: http.eject_after,
                base: Duration::from_millis(http.eject_base_ms),
                max: Duration::from_millis(http.eject_max_ms),
            },
            epoch: Instant::now(),
            slots: Shards::new(|| {
                Mutex::new(Slot {
                    set: Arc::new(Set::empty()),
                    rr: Vec::new(),
                    rotation: 0,
                })
            }),
            updating: Mutex::new(()),
        }
    }

    /// The calling worker's slot.
    fn slot(&self) -> MutexGuard<'_, Slot> {
        self.slots
            .mine()
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> Arc<Set> {
        Arc::clone(&self.slot().set)
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Replace the serving set: (address, weight). Backends that remain keep their
    /// state (in-flight count, ejection history, round-robin position); removed ones
    /// disappear (leases still held on them stay valid). Entries of weight 0 and
    /// repeated addresses (after the first) are ignored.
    pub fn update(&self, serving: &[(SocketAddr, u32)]) {
        // One update at a time; picks go on with the old set while the new one (and its
        // Maglev table) is built, and only wait for the swap.
        let _updating = self.updating.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.current();

        let mut members = Vec::with_capacity(serving.len());
        let mut index = HashMap::with_capacity_and_hasher(serving.len(), Default::default());
        // Each new member's index in the old set, if it was there.
        let mut was = Vec::with_capacity(serving.len());
        for &(addr, weight) in serving {
            if weight == 0 || index.contains_key(&addr) {
                continue;
            }
            let backend = match old.index.get(&addr) {
                Some(&i) => {
                    was.push(Some(i));
                    Arc::clone(&old.members[i].backend)
                }
                None => {
                    was.push(None);
                    Arc::new(Backend::new(addr))
                }
            };
            index.insert(addr, members.len());
            members.push(Member { backend, weight });
        }

        let table = if self.scheduler == Scheduler::Hash {
            let keys: Vec<String> = members.iter().map(|m| m.backend.addr.to_string()).collect();
            let ring_members: Vec<RingMember<'_>> = members
                .iter()
                .zip(&keys)
                .enumerate()
                .map(|(i, (m, key))| RingMember {
                    id: u32::try_from(i).unwrap_or(u32::MAX),
                    key,
                    weight: m.weight,
                })
                .collect();
            ring::build(&ring_members, HASH_TABLE_SIZE).unwrap_or_default()
        } else {
            Vec::new()
        };

        let new = Arc::new(Set {
            members,
            index,
            table,
            tokens: OnceLock::new(),
        });
        for slot in self.slots.iter() {
            let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
            // Backends that remain keep their running value in each worker's slot.
            let rr = was
                .iter()
                .map(|w| w.and_then(|i| slot.rr.get(i).copied()).unwrap_or(0))
                .collect();
            slot.rr = rr;
            slot.set = Arc::clone(&new);
        }
    }

    /// Choose a backend, skipping `exclude` (backends this request already tried) and
    /// ejected ones; if every backend left is ejected, ejection is ignored. `None` when
    /// no backend is left.
    #[must_use]
    pub fn pick(&self, key: &PickKey<'_>, exclude: &[SocketAddr]) -> Option<Lease> {
        self.pick_with(key, exclude, Instant::now)
    }

    /// [`Pool::pick`] at time `now`.
    #[must_use]
    pub fn pick_at(
        &self,
        key: &PickKey<'_>,
        exclude: &[SocketAddr],
        now: Instant,
    ) -> Option<Lease> {
        self.pick_with(key, exclude, || now)
    }

    /// [`Pool::pick`] at the time `now()` tells, read only when a member of the set
    /// is or was ejected (the clock is not read per request otherwise).
    fn pick_with(
        &self,
        key: &PickKey<'_>,
        exclude: &[SocketAddr],
        now: impl FnOnce() -> Instant,
    ) -> Option<Lease> {
        let mut slot = self.slot();
        let Slot { set, rr, rotation } = &mut *slot;
        let now_ns = if set
            .members
            .iter()
            .any(|m| m.backend.ejected_until.load(Ordering::Relaxed) != 0)
        {
            self.nanos(now())
        } else {
            0
        };
        let members = &set.members;
        let allowed = |i: usize| !exclude.contains(&members[i].backend.addr);
        let mut any_allowed = false;
        let mut any_healthy = false;
        for m in members {
            if !exclude.contains(&m.backend.addr) {
                any_allowed = true;
                if !m.backend.is_ejected(now_ns) {
                    any_healthy = true;
                    break;
                }
            }
        }
        if !any_allowed {
            return None;
        }
        // Panic mode: with no healthy candidate, ejected ones are candidates too.
        let ok = |i: usize| allowed(i) && (!any_healthy || !members[i].backend.is_ejected(now_ns));
        let i = match self.scheduler {
            Scheduler::RoundRobin => smooth_wrr(members, rr, ok),
            Scheduler::LeastRequest => {
                let start = *rotation;
                *rotation = rotation.wrapping_add(1);
                least_request(members, start, ok)
            }
            Scheduler::P2c => p2c(members, ok),
            Scheduler::Hash | Scheduler::Maglev | Scheduler::SourceIp => {
                hash_pick(set, self.key_hash(key), ok)
            }
        }?;
        Some(Lease::new(&members[i].backend))
    }

    /// The lease for a specific backend (sticky sessions): `None` if it is not in the
    /// serving set or is ejected.
    #[must_use]
    pub fn lease(&self, addr: SocketAddr) -> Option<Lease> {
        self.lease_at(addr, Instant::now())
    }

    /// [`Pool::lease`] at time `now`.
    #[must_use]
    pub fn lease_at(&self, addr: SocketAddr, now: Instant) -> Option<Lease> {
        let set = self.current();
        let b = &set.members[*set.index.get(&addr)?].backend;
        (!b.is_ejected(self.nanos(now))).then(|| Lease::new(b))
    }

    /// The lease for the backend whose sticky token under `key` is `token`: `None` if
    /// no serving backend has it or that backend is ejected. Tokens are computed once
    /// per serving set (and key).
    #[must_use]
    pub fn lease_by_token(&self, key: &StickyKey, token: [u8; TOKEN_LEN]) -> Option<Lease> {
        self.lease_by_token_at(key, token, Instant::now())
    }

    /// [`Pool::lease_by_token`] at time `now`.
    #[must_use]
    pub fn lease_by_token_at(
        &self,
        key: &StickyKey,
        token: [u8; TOKEN_LEN],
        now: Instant,
    ) -> Option<Lease> {
        let set = self.current();
        let compute = || -> Vec<[u8; TOKEN_LEN]> {
            set.members
                .iter()
                .map(|m| key.backend_token(m.backend.addr))
                .collect()
        };
        let (fingerprint, cached) = set.tokens.get_or_init(|| (key.fingerprint(), compute()));
        let i = if *fingerprint == key.fingerprint() {
            cached.iter().position(|t| *t == token)
        } else {
            compute().iter().position(|t| *t == token)
        }?;
        let b = &set.members[i].backend;
        (!b.is_ejected(self.nanos(now))).then(|| Lease::new(b))
    }

    /// Passive health: feed each request's result. Results for backends no longer in
    /// the serving set are ignored.
    pub fn report(&self, addr: SocketAddr, outcome: Outcome) {
        self.report_with(addr, outcome, Instant::now);
    }

    /// [`Pool::report`] at time `now`.
    pub fn report_at(&self, addr: SocketAddr, outcome: Outcome, now: Instant) {
        self.report_with(addr, outcome, || now);
    }

    /// [`Pool::report`] at the time `now()` tells, not read for a success on a
    /// backend with nothing on record.
    fn report_with(&self, addr: SocketAddr, outcome: Outcome, now: impl FnOnce() -> Instant) {
        let b = {
            let slot = self.slot();
            let Some(&i) = slot.set.index.get(&addr) else {
                return;
            };
            let b = &slot.set.members[i].backend;
            if outcome == Outcome::Success && b.clean.load(Ordering::Relaxed) {
                // Nothing on record to reset (and so no ejection either).
                return;
            }
            Arc::clone(b)
        };
        let now_ns = self.nanos(now());
        let mut h = b.health.lock().unwrap_or_else(PoisonError::into_inner);
        if b.is_ejected(now_ns) {
            // The tail of the requests that got it ejected.
            return;
        }
        settle(&b, &mut h);
        if outcome == Outcome::Success {
            h.consecutive_failures = 0;
            h.ejections = 0;
            b.clean.store(true, Ordering::Relaxed);
            return;
        }
        b.clean.store(false, Ordering::Relaxed);
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        if self.eject.after == 0 || h.consecutive_failures < self.eject.after {
            return;
        }
        let failures = h.consecutive_failures;
        h.ejections = h.ejections.saturating_add(1);
        h.consecutive_failures = 0;
        let duration = self.eject.duration(h.ejections);
        h.ejected_for = Some(duration);
        let until = now_ns
            .saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX))
            .max(1);
        b.ejected_until.store(until, Ordering::Relaxed);
        tracing::warn!(
            backend = %addr,
            failures,
            last = ?outcome,
            ejection = h.ejections,
            duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            "backend ejected by passive health"
        );
    }

    /// The serving set with weights, in-flight counts and ejection, in `update` order.
    #[must_use]
    pub fn snapshot(&self) -> Vec<BackendState> {
        self.snapshot_at(Instant::now())
    }

    /// [`Pool::snapshot`] at time `now`.
    #[must_use]
    pub fn snapshot_at(&self, now: Instant) -> Vec<BackendState> {
        let set = self.current();
        let now_ns = self.nanos(now);
        set.members
            .iter()
            .map(|m| {
                let b = &m.backend;
                let mut h = b.health.lock().unwrap_or_else(PoisonError::into_inner);
                let ejected = b.is_ejected(now_ns);
                if !ejected {
                    settle(b, &mut h);
                }
                BackendState {
                    addr: b.addr,
                    weight: m.weight,
                    in_flight: b.in_flight(),
                    ejected,
                    consecutive_failures: h.consecutive_failures,
                }
            })
            .collect()
    }

    /// The hash of what `hash_on` selects; the client address when the header or
    /// cookie is absent or empty.
    fn key_hash(&self, key: &PickKey<'_>) -> u64 {
        let value = match &self.hash_on {
            HashOn::Client => None,
            HashOn::Header(name) => key
                .headers
                .get(name.as_str())
                .map(http::HeaderValue::as_bytes),
            HashOn::Cookie(name) => cookie_value(key.headers, name).map(str::as_bytes),
        };
        match value {
            Some(v) if !v.is_empty() => tagged_hash(b'v', v),
            _ => match key.client.to_canonical() {
                IpAddr::V4(a) => tagged_hash(b'4', &a.octets()),
                IpAddr::V6(a) => tagged_hash(b'6', &a.octets()),
            },
        }
    }
}

/// Log the return of a backend whose ejection is over (called with its health locked,
/// when it is not ejected).
fn settle(b: &Backend, h: &mut Health) {
    if let Some(d) = h.ejected_for.take() {
        b.ejected_until.store(0, Ordering::Relaxed);
        tracing::info!(
            backend = %b.addr,
            ejected_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
            "backend returns after ejection"
        );
    }
}

/// Whether a's load `(in_flight + 1) / weight` is below b's.
fn lighter(a: &Member, b: &Member) -> bool {
    let load = |m: &Member| u64::from(m.backend.in_flight()) + 1;
    u128::from(load(a)) * u128::from(b.weight) < u128::from(load(b)) * u128::from(a.weight)
}

/// nginx's smooth weighted round robin over the members that pass `ok`, with the
/// running values `current` (one per member).
fn smooth_wrr(
    members: &[Member],
    current: &mut [i64],
    ok: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, m) in members.iter().enumerate() {
        if !ok(i) {
            continue;
        }
        let w = i64::from(m.weight);
        current[i] += w;
        total += w;
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

/// The lightest member passing `ok`; ties go to the first from `start`.
fn least_request(members: &[Member], start: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
    let n = members.len();
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (start.wrapping_add(k)) % n;
        if ok(i) && best.is_none_or(|b| lighter(&members[i], &members[b])) {
            best = Some(i);
        }
    }
    best
}

/// Two distinct members passing `ok`, drawn with probability proportional to weight;
/// the lighter wins (the first on a tie).
fn p2c(members: &[Member], ok: impl Fn(usize) -> bool) -> Option<usize> {
    let total: u64 = (0..members.len())
        .filter(|&i| ok(i))
        .map(|i| u64::from(members[i].weight))
        .sum();
    let mut rng = rand::rng();
    let draw = |rng: &mut rand::rngs::ThreadRng, total: u64, skip: Option<usize>| {
        if total == 0 {
            return None;
        }
        let mut r = rng.random_range(0..total);
        for (i, m) in members.iter().enumerate() {
            if !ok(i) || Some(i) == skip {
                continue;
            }
            let w = u64::from(m.weight);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    };
    let first = draw(&mut rng, total, None)?;
    let Some(second) = draw(
        &mut rng,
        total - u64::from(members[first].weight),
        Some(first),
    ) else {
        return Some(first);
    };
    Some(if lighter(&members[second], &members[first]) {
        second
    } else {
        first
    })
}

/// The table's slot for `hash`, then the following slots until a member passes `ok`;
/// the first member passing `ok` if none of the table's does (a member too light to
/// own a slot).
fn hash_pick(set: &Set, hash: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
    let len = set.table.len();
    if len > 0 {
        // The remainder is below the table length, a usize.
        let start = usize::try_from(hash % len as u64).unwrap_or(0);
        for k in 0..len {
            let slot = (start + k) % len;
            let i = set.table[slot] as usize;
            if i < set.members.len() && ok(i) {
                return Some(i);
            }
        }
    }
    (0..set.members.len()).find(|&i| ok(i))
}

#[cfg(test)]
mod tests;
