//! The memory store of the HTTP cache: a [`moka::future::Cache`] from [`Key`] (host and
//! path-and-query) to the stored variants of that URI (RFC 9111 §4.1: one per distinct
//! set of values of the request headers the response's `Vary` names).
//!
//! Every entry weighs the bytes of its key, header fields and bodies (plus a small
//! fixed overhead), and the cache's capacity is `max_bytes`, so moka's TinyLFU
//! admission and LRU eviction keep the memory bounded. Updating one variant replaces
//! the entry (a read-modify-write that a concurrent update of another variant of the
//! same URI may win; the loser is simply not stored).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use moka::future::Cache as Moka;

use super::policy::{self, CacheControl};

/// At most this many variants of one URI are kept (the oldest goes first).
const MAX_VARIANTS: usize = 8;

/// Bytes counted per stored response besides its fields and body.
const OVERHEAD: usize = 160;

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
    /// The `Age` and `Cache-Status` values of a fresh hit for the (age, ttl) they were
    /// last rendered for: hits within the same second share them.
    hit_values: std::sync::Mutex<Option<HitValues>>,
}

/// The two per-second values of a fresh hit ([`Stored::hit_head`]).
#[derive(Debug, Clone)]
struct HitValues {
    age: u64,
    ttl: i64,
    age_value: HeaderValue,
    status_value: HeaderValue,
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
            hit_values: std::sync::Mutex::new(None),
        }
    }

    /// The header fields of this response served whole as a fresh hit at `now`: the
    /// stored fields with its `Age` and `Cache-Status` (`render(ttl)` gives the
    /// `Cache-Status` value for a remaining freshness of `ttl` seconds: it is called
    /// once per distinct (age, ttl), the values kept for the hits that follow).
    pub fn hit_head(&self, now: SystemTime, render: impl FnOnce(i64) -> HeaderValue) -> HeaderMap {
        let age = self.age(now).as_secs().min(policy::DELTA_MAX);
        let ttl = self.ttl(now);
        let cached = match self.hit_values.try_lock() {
            Ok(v) => v.as_ref().filter(|v| v.age == age && v.ttl == ttl).cloned(),
            Err(_) => None,
        };
        let values = cached.unwrap_or_else(|| {
            let v = HitValues {
                age,
                ttl,
                age_value: HeaderValue::from(age),
                status_value: render(ttl),
            };
            if let Ok(mut slot) = self.hit_values.try_lock() {
                *slot = Some(v.clone());
            }
            v
        });
        let mut headers = self.hit_headers.clone();
        // Both fields are in `hit_headers` already: replaced in place.
        headers.insert(http::header::AGE, values.age_value);
        headers.insert(super::CACHE_STATUS, values.status_value);
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
        // `hit_headers` holds the fields again (the values share their bytes; the
        // names and the map's own tables do not).
        OVERHEAD + 2 * fields + vary + self.body.len()
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

/// The size-bounded store.
#[derive(Clone)]
pub struct Store {
    moka: Moka<Key, Arc<Variants>>,
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
        Self { moka }
    }

    /// The variant stored for `key` (a [`Key`] or a [`KeyRef`]) that matches `req_headers`.
    pub async fn lookup<Q>(&self, key: &Q, req_headers: &HeaderMap) -> Lookup
    where
        Q: moka::Equivalent<Key> + std::hash::Hash + ?Sized,
    {
        let Some(variants) = self.moka.get(key).await else {
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
    }

    /// Drop everything stored for `key`.
    pub async fn invalidate(&self, key: &Key) {
        self.moka.invalidate(key).await;
    }

    /// Drop every entry when `path` is `None`, else those whose path (without query)
    /// equals `path`, or starts with it when `prefix`. Returns how many.
    pub fn purge(&self, path: Option<&str>, prefix: bool) -> u64 {
        let Some(path) = path else {
            let n = self.moka.iter().count() as u64;
            self.moka.invalidate_all();
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
