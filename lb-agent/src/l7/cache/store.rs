//! The memory store of the HTTP cache: a [`moka::future::Cache`] from [`Key`] (host and
//! path-and-query) to the stored variants of that URI (RFC 9111 §4.1: one per distinct
//! set of values of the request headers the response's `Vary` names).
//!
//! Every entry weighs the bytes of its key, header fields and bodies (plus a small
//! fixed overhead), and the cache's capacity is `max_bytes`, so moka's TinyLFU
//! admission and LRU eviction keep the memory bounded. Updating one variant replaces
//! the entry (a read-modify-write that a concurrent update of another variant of the
//! same URI may win; the loser is simply not stored).
//!
//! Each thread also keeps a small front of the URIs it looked up last (`FRONT`): a
//! lookup found there skips moka's read path (its hash, its concurrent map and the read
//! log that feeds its eviction policy, whose queue every worker shares). Every
//! [`FRONT_READS`]-th lookup of an entry still goes through moka, so the eviction policy
//! keeps seeing the URI as hot. Any change to the store (put, invalidate, purge) moves
//! its generation and so retires every thread's front entries of it; an entry moka
//! evicts is dropped with it (the front holds it weakly).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use moka::future::Cache as Moka;

use super::policy::{self, CacheControl};

/// At most this many variants of one URI are kept (the oldest goes first).
const MAX_VARIANTS: usize = 8;

/// Bytes counted per stored response besides its fields and body.
const OVERHEAD: usize = 160;

/// Lookups of a URI answered from a thread's front, per lookup that goes through moka
/// (and so counts as a read for its eviction policy).
pub const FRONT_READS: u32 = 16;

/// URIs a thread's front holds at most (all of the thread's stores together); when
/// full, it starts again empty.
const FRONT_ENTRIES: usize = 64;

/// What a response is stored under: the lower-case host (with port, if given) and the
/// path and query.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Key {
    /// Lower-case host[:port].
    pub host: Box<str>,
    /// Path and query, as requested.
    pub path_and_query: Box<str>,
}

impl Key {
    /// A key from host and path-and-query.
    #[must_use]
    pub fn new(host: &str, path_and_query: &str) -> Self {
        Self {
            host: host.to_ascii_lowercase().into(),
            path_and_query: path_and_query.into(),
        }
    }

    /// The path without the query.
    #[must_use]
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(&*self.path_and_query, |(p, _)| p)
    }
}

/// A [`Key`] borrowed from a request (host already lower-case), to look up without
/// building one: it hashes and compares as the `Key` of the same strings.
#[derive(Debug, Hash)]
pub struct KeyRef<'a> {
    /// Lower-case host[:port].
    pub host: &'a str,
    /// Path and query, as requested.
    pub path_and_query: &'a str,
}

/// The two strings of a [`Key`] or a [`KeyRef`].
pub trait KeyParts: moka::Equivalent<Key> + std::hash::Hash {
    /// Lower-case host[:port] and path-and-query.
    fn parts(&self) -> (&str, &str);
}

impl KeyParts for Key {
    fn parts(&self) -> (&str, &str) {
        (&self.host, &self.path_and_query)
    }
}

impl KeyParts for KeyRef<'_> {
    fn parts(&self) -> (&str, &str) {
        (self.host, self.path_and_query)
    }
}

impl moka::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *key.host == *self.host && *key.path_and_query == *self.path_and_query
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.host, self.path_and_query)
    }
}

/// One stored response.
#[derive(Debug)]
pub struct Stored {
    /// Its status.
    pub status: StatusCode,
    /// Its end-to-end header fields (with `Date` and `Content-Length`).
    pub headers: HeaderMap,
    /// Its whole body.
    pub body: Bytes,
    /// When the response was received (RFC 9111 §4.2.3 `response_time`).
    pub response_time: SystemTime,
    /// `corrected_initial_age`.
    pub initial_age: Duration,
    /// Freshness lifetime (0 when none).
    pub lifetime: Duration,
    /// Its `Cache-Control`.
    pub cc: CacheControl,
    /// The request header fields its `Vary` names, with the values they had.
    pub vary: Vec<(HeaderName, Option<String>)>,
    /// `headers` as a fresh hit sends them, built once when stored: `Age` and
    /// `Cache-Status` are already in place (placeholder values), so a hit clones this
    /// map and sets the two values in place, without the map growing ([`Self::hit_head`]).
    hit_headers: HeaderMap,
    /// `hit_headers` with the `Age` and `Cache-Status` values of the (age, ttl) they
    /// were last rendered for: the hits within the same second clone this map as it is.
    hit_head: std::sync::Mutex<Option<Arc<HitHead>>>,
}

/// The header fields of a fresh hit for one (age, ttl) ([`Stored::hit_head`]).
#[derive(Debug)]
struct HitHead {
    age: u64,
    ttl: i64,
    headers: HeaderMap,
}

impl Stored {
    /// Build a stored response: `headers` are the end-to-end fields (hop-by-hop ones are
    /// dropped here), `req_headers` the request's, for `Vary`; `targets` the targeted
    /// cache-control fields obeyed (RFC 9213). Adds `Date` when absent
    /// (RFC 9110 §6.6.1) and sets `Content-Length` to the body's.
    #[must_use]
    pub fn new(
        status: StatusCode,
        mut headers: HeaderMap,
        body: Bytes,
        req_headers: &HeaderMap,
        targets: &[HeaderName],
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Self {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
        ] {
            headers.remove(name);
        }
        if !headers.contains_key(http::header::DATE) {
            if let Ok(v) = httpdate::fmt_http_date(response_time).parse() {
                headers.insert(http::header::DATE, v);
            }
        }
        headers.insert(http::header::CONTENT_LENGTH, body.len().into());
        let cc = CacheControl::parse_response(&headers, targets);
        let lifetime = policy::freshness_lifetime(status, &headers, &cc).unwrap_or_default();
        let initial_age = policy::corrected_initial_age(&headers, request_time, response_time);
        let vary = match policy::Vary::parse(&headers) {
            policy::Vary::Fields(names) => names
                .into_iter()
                .map(|n| {
                    let v = policy::vary_value(req_headers, &n);
                    (n, v)
                })
                .collect(),
            policy::Vary::Star => Vec::new(),
        };
        let mut hit_headers = headers.clone();
        hit_headers.insert(http::header::AGE, HeaderValue::from_static("0"));
        // Where `Cache-Status` of caches before us is, ours joins it; else it goes last.
        hit_headers.insert(super::CACHE_STATUS, HeaderValue::from_static(""));
        Self {
            status,
            headers,
            body,
            response_time,
            initial_age,
            lifetime,
            cc,
            vary,
            hit_headers,
            hit_head: std::sync::Mutex::new(None),
        }
    }

    /// The header fields of this response served whole as a fresh hit at `now`: the
    /// stored fields with its `Age` and `Cache-Status` (`render(ttl)` gives the
    /// `Cache-Status` value for a remaining freshness of `ttl` seconds). The map is
    /// built once per distinct (age, ttl) and kept: the hits that follow clone it as it
    /// is (no field inserted, no name hashed per hit). The slot is only ever
    /// `try_lock`ed and held for an `Arc` clone: a contended hit builds its own map.
    pub fn hit_head(&self, now: SystemTime, render: impl FnOnce(i64) -> HeaderValue) -> HeaderMap {
        let age = self.age(now).as_secs().min(policy::DELTA_MAX);
        let ttl = self.ttl(now);
        let current = match self.hit_head.try_lock() {
            Ok(slot) => slot
                .as_ref()
                .filter(|h| h.age == age && h.ttl == ttl)
                .map(Arc::clone),
            Err(_) => None,
        };
        if let Some(head) = current {
            return head.headers.clone();
        }
        let mut headers = self.hit_headers.clone();
        // Both fields are in `hit_headers` already: replaced in place (no growth).
        headers.insert(http::header::AGE, HeaderValue::from(age));
        headers.insert(super::CACHE_STATUS, render(ttl));
        if let Ok(mut slot) = self.hit_head.try_lock() {
            *slot = Some(Arc::new(HitHead {
                age,
                ttl,
                headers: headers.clone(),
            }));
        }
        headers
    }

    /// The current age (§4.2.3).
    #[must_use]
    pub fn age(&self, now: SystemTime) -> Duration {
        policy::current_age(self.initial_age, self.response_time, now)
    }

    /// Remaining freshness in whole seconds, negative when stale (RFC 9211 `ttl`).
    #[must_use]
    pub fn ttl(&self, now: SystemTime) -> i64 {
        let age = self.age(now);
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        if self.lifetime >= age {
            secs(self.lifetime - age)
        } else {
            -secs(age - self.lifetime).max(1)
        }
    }

    /// Does this variant match a request's header fields (§4.1)?
    #[must_use]
    pub fn matches(&self, req_headers: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, value)| policy::vary_value(req_headers, name) == *value)
    }

    /// Bytes this response is counted for.
    #[must_use]
    pub fn weight(&self) -> usize {
        let fields: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .map(|(n, v)| n.as_str().len() + v.as_ref().map_or(0, String::len))
            .sum();
        // `hit_headers` and the kept map of `hit_head` hold the fields again (the
        // values share their bytes; the names and the maps' own tables do not).
        OVERHEAD + 3 * fields + vary + self.body.len()
    }

    fn same_variant(&self, other: &Self) -> bool {
        self.vary == other.vary
    }
}

/// All stored variants of one URI.
#[derive(Debug, Default)]
pub struct Variants(pub Vec<Arc<Stored>>);

/// What a lookup found.
pub enum Lookup {
    /// Nothing stored for the URI.
    UriMiss,
    /// Responses stored for the URI, none for this request's header fields.
    VaryMiss,
    /// The matching variant.
    Found(Arc<Stored>),
}

/// One URI in a thread's front.
#[derive(Debug)]
struct FrontEntry {
    /// The store ([`Generation::id`]) and its generation when the entry was filled.
    store: u64,
    generation: u64,
    key: Key,
    /// What moka held for the key (weak: an entry moka evicts is not kept alive here).
    variants: Weak<Variants>,
    /// Lookups answered from here since the last one through moka.
    reads: u32,
}

thread_local! {
    /// This thread's most recent lookups, by a hash of (store, host, path-and-query).
    static FRONT: RefCell<HashMap<u64, FrontEntry, foldhash::fast::FixedState>> =
        RefCell::new(HashMap::with_hasher(foldhash::fast::FixedState::default()));
}

/// Which store a [`FrontEntry`] belongs to, and whether it is still current.
#[derive(Debug)]
struct Generation {
    /// Unique per store (its clones share it).
    id: u64,
    /// Moved after every change of the store (once moka has it).
    current: AtomicU64,
}

static STORE_IDS: AtomicU64 = AtomicU64::new(1);

/// The size-bounded store.
#[derive(Clone)]
pub struct Store {
    moka: Moka<Key, Arc<Variants>>,
    generation: Arc<Generation>,
}

impl Store {
    /// A store of at most `max_bytes` (by [`Stored::weight`]).
    #[must_use]
    pub fn new(max_bytes: u64) -> Self {
        let moka = Moka::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &Key, v: &Arc<Variants>| {
                let w = k.host.len()
                    + k.path_and_query.len()
                    + v.0.iter().map(|s| s.weight()).sum::<usize>();
                u32::try_from(w).unwrap_or(u32::MAX)
            })
            .support_invalidation_closures()
            .build();
        Self {
            moka,
            generation: Arc::new(Generation {
                id: STORE_IDS.fetch_add(1, Ordering::Relaxed),
                current: AtomicU64::new(0),
            }),
        }
    }

    /// After a change to moka: every thread's front entries of this store are stale.
    fn changed(&self) {
        self.generation.current.fetch_add(1, Ordering::AcqRel);
    }

    /// The variants stored for `key`: from this thread's front when it has them for the
    /// store's current generation, else (and every [`FRONT_READS`]-th time) from moka.
    async fn variants<Q: KeyParts>(&self, key: &Q) -> Option<Arc<Variants>> {
        // Read before moka is: a change made after this is seen by the next lookup.
        let generation = self.generation.current.load(Ordering::Acquire);
        let id = self.generation.id;
        let (host, path_and_query) = key.parts();
        let hash = foldhash::fast::FixedState::with_seed(0).hash_one((id, host, path_and_query));
        let front = FRONT.try_with(|front| {
            let mut front = front.borrow_mut();
            let entry = front.get_mut(&hash)?;
            if entry.store != id
                || entry.generation != generation
                || *entry.key.host != *host
                || *entry.key.path_and_query != *path_and_query
            {
                return None;
            }
            entry.reads += 1;
            if entry.reads >= FRONT_READS {
                return None;
            }
            entry.variants.upgrade()
        });
        if let Ok(Some(variants)) = front {
            return Some(variants);
        }
        let variants = self.moka.get(key).await?;
        let entry = FrontEntry {
            store: id,
            generation,
            key: Key {
                host: host.into(),
                path_and_query: path_and_query.into(),
            },
            variants: Arc::downgrade(&variants),
            reads: 0,
        };
        let _ = FRONT.try_with(|front| {
            let mut front = front.borrow_mut();
            if front.len() >= FRONT_ENTRIES && !front.contains_key(&hash) {
                front.clear();
            }
            front.insert(hash, entry);
        });
        Some(variants)
    }

    /// The variant stored for `key` (a [`Key`] or a [`KeyRef`]) that matches `req_headers`.
    pub async fn lookup<Q: KeyParts>(&self, key: &Q, req_headers: &HeaderMap) -> Lookup {
        let Some(variants) = self.variants(key).await else {
            return Lookup::UriMiss;
        };
        variants
            .0
            .iter()
            .find(|s| s.matches(req_headers))
            .map_or(Lookup::VaryMiss, |s| Lookup::Found(Arc::clone(s)))
    }

    /// Store `stored` under `key`, replacing the variant with the same `Vary` values
    /// (and variants selected by other header names: the URI's `Vary` changed).
    pub async fn put(&self, key: Key, stored: Arc<Stored>) {
        let names: Vec<&HeaderName> = stored.vary.iter().map(|(n, _)| n).collect();
        let mut variants: Vec<Arc<Stored>> = match self.moka.get(&key).await {
            Some(old) => old
                .0
                .iter()
                .filter(|s| {
                    !s.same_variant(&stored)
                        && s.vary.iter().map(|(n, _)| n).collect::<Vec<_>>() == names
                })
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        if variants.len() >= MAX_VARIANTS {
            variants.drain(..=variants.len() - MAX_VARIANTS);
        }
        variants.push(stored);
        self.moka.insert(key, Arc::new(Variants(variants))).await;
        self.changed();
    }

    /// Drop everything stored for `key`.
    pub async fn invalidate(&self, key: &Key) {
        self.moka.invalidate(key).await;
        self.changed();
    }

    /// Drop every entry when `path` is `None`, else those whose path (without query)
    /// equals `path`, or starts with it when `prefix`. Returns how many.
    pub fn purge(&self, path: Option<&str>, prefix: bool) -> u64 {
        let Some(path) = path else {
            let n = self.moka.iter().count() as u64;
            self.moka.invalidate_all();
            self.changed();
            return n;
        };
        let owned = path.to_owned();
        let matches = move |k: &Key| {
            if prefix {
                k.path().starts_with(&owned)
            } else {
                k.path() == owned
            }
        };
        let n = self.moka.iter().filter(|(k, _)| matches(k)).count() as u64;
        if n > 0 {
            if let Err(e) = self.moka.invalidate_entries_if(move |k, _| matches(k)) {
                tracing::warn!("cache purge: {e}");
            }
            self.changed();
        }
        n
    }

    /// (entries, bytes) currently stored (moka's counts, updated by its maintenance).
    #[must_use]
    pub fn usage(&self) -> (u64, u64) {
        (self.moka.entry_count(), self.moka.weighted_size())
    }

    /// Run moka's pending maintenance (evictions, counts) now.
    pub async fn run_pending_tasks(&self) {
        self.moka.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher as _;

    use super::*;

    /// A fresh hit's fields: the stored ones with `Age` and `Cache-Status` in their
    /// places, rendered once per (age, ttl) and reused within it, renewed after.
    #[test]
    fn hit_heads_are_kept_per_second() {
        // On a whole second: ages and ttls below are exact.
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut headers = HeaderMap::new();
        headers.insert("cache-control", HeaderValue::from_static("max-age=60"));
        headers.insert("x-a", HeaderValue::from_static("1"));
        let stored = Stored::new(
            StatusCode::OK,
            headers,
            Bytes::from_static(b"body"),
            &HeaderMap::new(),
            &[],
            t0,
            t0,
        );
        let renders = std::cell::Cell::new(0);
        let head = |at: SystemTime| {
            stored.hit_head(at, |ttl| {
                renders.set(renders.get() + 1);
                HeaderValue::from_str(&format!("xdplb; hit; ttl={ttl}")).unwrap()
            })
        };
        let first = head(t0);
        assert_eq!(first.get("age").unwrap(), "0");
        assert_eq!(first.get("cache-status").unwrap(), "xdplb; hit; ttl=60");
        assert_eq!(first.get("x-a").unwrap(), "1");
        assert_eq!(first.get("content-length").unwrap(), "4");
        assert_eq!(first.len(), stored.headers.len() + 2);
        // For the same (age, ttl): the kept map, not rendered again.
        assert_eq!(head(t0), first);
        assert_eq!(renders.get(), 1);
        // Seconds later: new values, the other fields as they were, in the same order.
        let later = head(t0 + Duration::from_secs(7));
        assert_eq!(renders.get(), 2);
        assert_eq!(later.get("age").unwrap(), "7");
        assert_eq!(later.get("cache-status").unwrap(), "xdplb; hit; ttl=53");
        assert_eq!(
            later.keys().collect::<Vec<_>>(),
            first.keys().collect::<Vec<_>>()
        );
        assert_eq!(head(t0 + Duration::from_secs(7)), later);
        assert_eq!(renders.get(), 2);
    }

    fn stored(body: &'static [u8]) -> Arc<Stored> {
        Arc::new(Stored::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(body),
            &HeaderMap::new(),
            &[],
            SystemTime::now(),
            SystemTime::now(),
        ))
    }

    async fn body(store: &Store, host: &str, pq: &str) -> Option<Bytes> {
        let key = KeyRef {
            host,
            path_and_query: pq,
        };
        match store.lookup(&key, &HeaderMap::new()).await {
            Lookup::Found(s) => Some(s.body.clone()),
            _ => None,
        }
    }

    /// A thread's front answers repeated lookups, and never with what the store no
    /// longer holds: a put, an invalidation or a purge (on this thread or another) is
    /// seen by the next lookup; two stores do not see each other's entries.
    #[tokio::test]
    async fn the_front_follows_every_change_of_the_store() {
        let store = Store::new(1 << 20);
        let other = Store::new(1 << 20);
        store.put(Key::new("h", "/p"), stored(b"one")).await;
        for _ in 0..3 * FRONT_READS {
            assert_eq!(body(&store, "h", "/p").await.as_deref(), Some(&b"one"[..]));
        }
        assert_eq!(body(&other, "h", "/p").await, None);
        store.put(Key::new("h", "/p"), stored(b"two")).await;
        assert_eq!(body(&store, "h", "/p").await.as_deref(), Some(&b"two"[..]));
        // A change from another thread (its own runtime).
        let remote = store.clone();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(remote.put(Key::new("h", "/p"), stored(b"three")));
        })
        .join()
        .unwrap();
        assert_eq!(
            body(&store, "h", "/p").await.as_deref(),
            Some(&b"three"[..])
        );
        store.invalidate(&Key::new("h", "/p")).await;
        assert_eq!(body(&store, "h", "/p").await, None);
        store.put(Key::new("h", "/p"), stored(b"four")).await;
        store.put(Key::new("h", "/q"), stored(b"q")).await;
        assert!(body(&store, "h", "/p").await.is_some());
        assert!(body(&store, "h", "/q").await.is_some());
        assert_eq!(store.purge(Some("/p"), false), 1);
        assert_eq!(body(&store, "h", "/p").await, None);
        assert_eq!(body(&store, "h", "/q").await.as_deref(), Some(&b"q"[..]));
        assert!(store.purge(None, false) >= 1);
        assert_eq!(body(&store, "h", "/q").await, None);
        // More URIs than the front holds: each still found.
        let paths: Vec<String> = (0..2 * FRONT_ENTRIES).map(|i| format!("/{i}")).collect();
        for p in &paths {
            store.put(Key::new("h", p), stored(b"x")).await;
        }
        for _ in 0..2 {
            for p in &paths {
                assert!(body(&store, "h", p).await.is_some(), "{p}");
            }
        }
    }

    /// A borrowed key finds what its owned form stored: same hash, equivalent.
    #[tokio::test]
    async fn borrowed_keys_hash_and_compare_as_owned_ones() {
        let hasher = std::collections::hash_map::RandomState::new();
        for (host, pq) in [("a.example:8080", "/x?y=1"), ("", "/"), ("h", "")] {
            let owned = Key::new(host, pq);
            let borrowed = KeyRef {
                host,
                path_and_query: pq,
            };
            assert_eq!(hasher.hash_one(&owned), hasher.hash_one(&borrowed));
            assert!(moka::Equivalent::equivalent(&borrowed, &owned));
        }
        // Fields do not run into each other: ("ab", "/") is not ("a", "b/").
        let other = KeyRef {
            host: "a",
            path_and_query: "b/",
        };
        assert!(!moka::Equivalent::equivalent(&other, &Key::new("ab", "/")));
        let store = Store::new(1 << 20);
        let stored = Stored::new(
            StatusCode::OK,
            HeaderMap::new(),
            Bytes::from_static(b"x"),
            &HeaderMap::new(),
            &[],
            SystemTime::now(),
            SystemTime::now(),
        );
        store.put(Key::new("h", "/p"), Arc::new(stored)).await;
        let found = |host, pq| {
            let store = store.clone();
            async move {
                let key = KeyRef {
                    host,
                    path_and_query: pq,
                };
                matches!(
                    store.lookup(&key, &HeaderMap::new()).await,
                    Lookup::Found(_)
                )
            }
        };
        assert!(found("h", "/p").await);
        assert!(!found("h", "/q").await);
        assert!(!found("hh", "/p").await);
    }
}
