//! The L7 proxy's numbers: Prometheus families that live as long as the agent (the
//! agent builds a fresh registry per scrape and calls [`HttpStats::register`] on it),
//! and per-service totals for the JSON `/api/v1/stats`.
//!
//! Series (DESIGN.md "Metrics"; prometheus-client appends `_total` to counters):
//! - `xdplb_http_requests_total{service,backend,code}`: responses sent to clients, by
//!   the backend that produced them (`""` when none did: a cache hit, a 503 for no
//!   backend, a 413 or 431 of ours).
//! - `xdplb_http_request_seconds{service}`: time from the request head to the end of
//!   the response body (0.5 ms to 10 s buckets).
//! - `xdplb_cache_requests_total{service,result}`: cache lookups by result (`hit`,
//!   `miss`, `stale`, `revalidated`, `bypass`, `collapsed`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Buckets of `xdplb_http_request_seconds`: 0.5 ms to 10 s.
pub const REQUEST_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    backend: String,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    service: String,
    result: String,
}

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

/// Totals of one service, for the JSON API.
#[derive(Debug, Default)]
struct Totals {
    requests: AtomicU64,
    cache_hits: AtomicU64,
}

/// Per-service totals (see [`HttpStats::service_totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceTotals {
    /// Responses sent.
    pub requests: u64,
    /// Responses served from the cache (`hit` and `stale`).
    pub cache_hits: u64,
}

/// The L7 metrics; clones share the same series.
#[derive(Clone, Debug)]
pub struct HttpStats {
    requests: Family<RequestLabels, Counter>,
    seconds: Family<ServiceLabels, Histogram, fn() -> Histogram>,
    cache: Family<CacheLabels, Counter>,
    totals: Arc<RwLock<HashMap<String, Arc<Totals>>>>,
}

impl Default for HttpStats {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpStats {
    #[must_use]
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            seconds: Family::new_with_constructor(request_histogram),
            cache: Family::default(),
            totals: Arc::default(),
        }
    }

    /// Register the families in `registry` (created with the `xdplb` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_requests",
            "HTTP responses sent by the L7 proxy, by service, backend and status code",
            self.requests.clone(),
        );
        registry.register(
            "http_request_seconds",
            "Time from an HTTP request's head to the end of its response body",
            self.seconds.clone(),
        );
        registry.register(
            "cache_requests",
            "L7 cache lookups by service and result",
            self.cache.clone(),
        );
    }

    fn totals(&self, service: &str) -> Arc<Totals> {
        if let Some(t) = self
            .totals
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
        {
            return Arc::clone(t);
        }
        let mut w = self
            .totals
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(w.entry(service.to_owned()).or_default())
    }

    /// Count one response (`backend` is `None` when no backend produced it).
    pub fn record_response(&self, service: &str, backend: Option<&str>, code: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                service: service.to_owned(),
                backend: backend.unwrap_or_default().to_owned(),
                code,
            })
            .inc();
        self.totals(service)
            .requests
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Count one cache lookup by its result label.
    pub fn record_cache(&self, service: &str, result: &str) {
        self.cache
            .get_or_create(&CacheLabels {
                service: service.to_owned(),
                result: result.to_owned(),
            })
            .inc();
        if matches!(result, "hit" | "stale") {
            self.totals(service)
                .cache_hits
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Observe one request's duration.
    pub fn observe_duration(&self, service: &str, elapsed: Duration) {
        self.seconds
            .get_or_create(&ServiceLabels {
                service: service.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The series of `service`, resolved once: a running service records through it
    /// without allocating or looking its label sets up per request.
    #[must_use]
    pub fn service(&self, service: &str) -> ServiceStats {
        ServiceStats {
            name: service.to_owned(),
            requests: self.requests.clone(),
            by_response: RwLock::default(),
            seconds: self
                .seconds
                .get_or_create(&ServiceLabels {
                    service: service.to_owned(),
                })
                .clone(),
            cache: self.cache.clone(),
            by_result: Default::default(),
            totals: self.totals(service),
        }
    }

    /// The totals of `service` since the agent started (zero when unknown).
    #[must_use]
    pub fn service_totals(&self, service: &str) -> ServiceTotals {
        self.totals
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(service)
            .map(|t| ServiceTotals {
                requests: t.requests.load(Ordering::Relaxed),
                cache_hits: t.cache_hits.load(Ordering::Relaxed),
            })
            .unwrap_or_default()
    }

    /// The value of `xdplb_http_requests_total` for one label set (tests and the API).
    #[must_use]
    pub fn requests(&self, service: &str, backend: &str, code: u16) -> u64 {
        self.requests
            .get_or_create(&RequestLabels {
                service: service.to_owned(),
                backend: backend.to_owned(),
                code,
            })
            .get()
    }

    /// The value of `xdplb_cache_requests_total` for one label set.
    #[must_use]
    pub fn cache_requests(&self, service: &str, result: &str) -> u64 {
        self.cache
            .get_or_create(&CacheLabels {
                service: service.to_owned(),
                result: result.to_owned(),
            })
            .get()
    }
}

/// The cache results counted with a pre-resolved handle ([`ServiceStats::record_cache`]).
const CACHE_RESULTS: [&str; 6] = ["hit", "miss", "stale", "revalidated", "bypass", "collapsed"];

/// The series of one service with their handles resolved ([`HttpStats::service`]): the
/// same series as [`HttpStats`]'s methods record into, found without allocating: the
/// `(backend, code)` handles are made on first use and kept (in a map hashed with
/// foldhash: the key is ours, not a client's, and SipHash was most of the lookup), the
/// duration histogram and the totals are resolved at creation.
#[derive(Debug)]
pub struct ServiceStats {
    name: String,
    requests: Family<RequestLabels, Counter>,
    by_response: RwLock<HashMap<(Option<SocketAddr>, u16), Counter, foldhash::fast::RandomState>>,
    seconds: Histogram,
    cache: Family<CacheLabels, Counter>,
    by_result: [OnceLock<Counter>; CACHE_RESULTS.len()],
    totals: Arc<Totals>,
}

impl ServiceStats {
    /// Count one response (`backend` is `None` when no backend produced it).
    pub fn record_response(&self, backend: Option<SocketAddr>, code: u16) {
        let key = (backend, code);
        let hit = self
            .by_response
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
            .map(Counter::inc);
        if hit.is_none() {
            let counter = self
                .requests
                .get_or_create(&RequestLabels {
                    service: self.name.clone(),
                    backend: backend.map(|b| b.to_string()).unwrap_or_default(),
                    code,
                })
                .clone();
            counter.inc();
            self.by_response
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(key, counter);
        }
        self.totals.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Count one cache lookup by its result label.
    pub fn record_cache(&self, result: &str) {
        match CACHE_RESULTS.iter().position(|r| *r == result) {
            Some(i) => {
                self.by_result[i]
                    .get_or_init(|| {
                        self.cache
                            .get_or_create(&CacheLabels {
                                service: self.name.clone(),
                                result: result.to_owned(),
                            })
                            .clone()
                    })
                    .inc();
            }
            None => {
                self.cache
                    .get_or_create(&CacheLabels {
                        service: self.name.clone(),
                        result: result.to_owned(),
                    })
                    .inc();
            }
        }
        if matches!(result, "hit" | "stale") {
            self.totals.cache_hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Observe one request's duration.
    pub fn observe_duration(&self, elapsed: Duration) {
        self.seconds.observe(elapsed.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_render_under_the_contract_names() {
        let stats = HttpStats::new();
        stats.record_response("web", Some("198.18.2.11:80"), 200);
        stats.record_response("web", None, 503);
        stats.record_cache("web", "hit");
        stats.record_cache("web", "miss");
        stats.observe_duration("web", Duration::from_millis(3));
        let mut registry = Registry::with_prefix("xdplb");
        stats.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for needle in [
            "xdplb_http_requests_total{service=\"web\",backend=\"198.18.2.11:80\",code=\"200\"} 1",
            "xdplb_http_requests_total{service=\"web\",backend=\"\",code=\"503\"} 1",
            "xdplb_cache_requests_total{service=\"web\",result=\"hit\"} 1",
            "xdplb_http_request_seconds_bucket{le=\"0.005\",service=\"web\"} 1",
            "xdplb_http_request_seconds_count{service=\"web\"} 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
        assert_eq!(
            stats.service_totals("web"),
            ServiceTotals {
                requests: 2,
                cache_hits: 1
            }
        );
        assert_eq!(stats.service_totals("nope"), ServiceTotals::default());
        // The pre-resolved handles count into the same series and totals.
        let web = stats.service("web");
        let be: SocketAddr = "198.18.2.11:80".parse().unwrap();
        for _ in 0..3 {
            web.record_response(Some(be), 200);
        }
        web.record_response(None, 503);
        web.record_cache("hit");
        web.record_cache("odd");
        web.observe_duration(Duration::from_millis(3));
        assert_eq!(stats.requests("web", "198.18.2.11:80", 200), 4);
        assert_eq!(stats.requests("web", "", 503), 2);
        assert_eq!(stats.cache_requests("web", "hit"), 2);
        assert_eq!(stats.cache_requests("web", "odd"), 1);
        assert_eq!(
            stats.service_totals("web"),
            ServiceTotals {
                requests: 6,
                cache_hits: 2
            }
        );
        let mut registry = Registry::with_prefix("xdplb");
        stats.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("xdplb_http_request_seconds_count{service=\"web\"} 2"),
            "{text}"
        );
        // A second registry (the next scrape) sees the same series.
        let mut again = Registry::with_prefix("xdplb");
        stats.clone().register(&mut again);
        let mut text2 = String::new();
        prometheus_client::encoding::text::encode(&mut text2, &again).expect("encode");
        assert_eq!(text, text2);
    }
}
