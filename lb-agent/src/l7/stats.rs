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
//!
//! Every value written per request is sharded by L7 worker ([`super::workers::Shards`]):
//! each worker counts into its own cache line and no line is written by two workers per
//! request; a scrape or the API sums the shards (no count lost, still monotonic).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use super::workers::Shards;

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

/// A Prometheus counter counted per worker and summed when read: the same series as
/// prometheus-client's `Counter`, without an atomic written by every worker.
#[derive(Clone, Debug, Default)]
pub(crate) struct ShardedCounter(Arc<Shards<AtomicU64>>);

impl ShardedCounter {
    fn inc(&self) {
        self.0.mine().fetch_add(1, Ordering::Relaxed);
    }

    /// The sum of the shards.
    fn get(&self) -> u64 {
        self.0.iter().map(|s| s.load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// One worker's observations: sum, count and the count per bucket of
/// [`REQUEST_BUCKETS`] and +Inf (not cumulative: the encoder sums them up).
#[derive(Debug, Default)]
struct HistogramShard {
    sum: f64,
    count: u64,
    buckets: [u64; REQUEST_BUCKETS.len() + 1],
}

/// A Prometheus histogram with [`REQUEST_BUCKETS`], observed per worker (each behind
/// its own lock, which only its worker takes on the request path) and merged when
/// read: the series prometheus-client's `Histogram` renders, without its one mutex
/// shared by the workers.
#[derive(Clone, Debug, Default)]
pub(crate) struct ShardedHistogram(Arc<Shards<Mutex<HistogramShard>>>);

impl ShardedHistogram {
    fn observe(&self, v: f64) {
        // The first bucket whose bound is >= v (+Inf for larger values and NaN), as
        // prometheus-client's histogram does.
        let i = REQUEST_BUCKETS
            .iter()
            .position(|b| *b >= v)
            .unwrap_or(REQUEST_BUCKETS.len());
        let mut s = self.0.mine().lock().unwrap_or_else(PoisonError::into_inner);
        s.sum += v;
        s.count += 1;
        s.buckets[i] += 1;
    }

    /// The shards merged.
    fn merged(&self) -> HistogramShard {
        let mut all = HistogramShard::default();
        for shard in self.0.iter() {
            let s = shard.lock().unwrap_or_else(PoisonError::into_inner);
            all.sum += s.sum;
            all.count += s.count;
            for (a, b) in all.buckets.iter_mut().zip(s.buckets) {
                *a += b;
            }
        }
        all
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let all = self.merged();
        let buckets: Vec<(f64, u64)> = REQUEST_BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(all.buckets)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(all.sum, all.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Totals of one service, for the JSON API.
#[derive(Debug, Default)]
struct Totals {
    requests: ShardedCounter,
    cache_hits: ShardedCounter,
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
    requests: Family<RequestLabels, ShardedCounter>,
    seconds: Family<ServiceLabels, ShardedHistogram>,
    cache: Family<CacheLabels, ShardedCounter>,
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
            seconds: Family::default(),
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
        self.totals(service).requests.inc();
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
            self.totals(service).cache_hits.inc();
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
            by_response: Shards::default(),
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
                requests: t.requests.get(),
                cache_hits: t.cache_hits.get(),
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
/// `(backend, code)` handles are made on first use and kept in a map per worker (hashed
/// with foldhash: the key is ours, not a client's, and SipHash was most of the lookup;
/// locked only by its worker on the request path), the duration histogram and the
/// totals are resolved at creation.
#[derive(Debug)]
pub struct ServiceStats {
    name: String,
    requests: Family<RequestLabels, ShardedCounter>,
    by_response: Shards<Mutex<ResponseHandles>>,
    seconds: ShardedHistogram,
    cache: Family<CacheLabels, ShardedCounter>,
    by_result: [OnceLock<ShardedCounter>; CACHE_RESULTS.len()],
    totals: Arc<Totals>,
}

type ResponseHandles =
    HashMap<(Option<SocketAddr>, u16), ShardedCounter, foldhash::fast::RandomState>;

impl ServiceStats {
    /// Count one response (`backend` is `None` when no backend produced it).
    pub fn record_response(&self, backend: Option<SocketAddr>, code: u16) {
        let mut handles = self
            .by_response
            .mine()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        handles
            .entry((backend, code))
            .or_insert_with(|| {
                self.requests
                    .get_or_create(&RequestLabels {
                        service: self.name.clone(),
                        backend: backend.map(|b| b.to_string()).unwrap_or_default(),
                        code,
                    })
                    .clone()
            })
            .inc();
        drop(handles);
        self.totals.requests.inc();
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
            self.totals.cache_hits.inc();
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
    use crate::l7::workers;

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

    /// Each worker counts into its own shard; a scrape and the API see the sum.
    #[test]
    fn worker_shards_are_summed() {
        let n = workers::on_each(|| ()).len();
        assert_eq!(workers::shard_count(), n);
        let stats = HttpStats::new();
        let web = Arc::new(stats.service("web"));
        let be: SocketAddr = "198.18.2.11:80".parse().unwrap();
        let shards = workers::on_each({
            let web = Arc::clone(&web);
            move || {
                for _ in 0..10 {
                    web.record_response(Some(be), 200);
                    web.observe_duration(Duration::from_millis(2));
                }
                web.record_response(None, 503);
                web.record_cache("hit");
                workers::current()
            }
        });
        assert_eq!(shards, (0..n).map(Some).collect::<Vec<_>>());
        // Off the workers: shard 0.
        web.record_response(Some(be), 200);
        let n = u64::try_from(n).unwrap();
        assert_eq!(stats.requests("web", "198.18.2.11:80", 200), 10 * n + 1);
        assert_eq!(stats.requests("web", "", 503), n);
        assert_eq!(stats.cache_requests("web", "hit"), n);
        assert_eq!(
            stats.service_totals("web"),
            ServiceTotals {
                requests: 11 * n + 1,
                cache_hits: n
            }
        );
        // Every worker wrote its own shard.
        assert!(
            web.totals
                .requests
                .0
                .iter()
                .all(|s| s.load(Ordering::Relaxed) >= 11)
        );
        let mut registry = Registry::with_prefix("xdplb");
        stats.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for needle in [
            format!(
                "xdplb_http_requests_total{{service=\"web\",backend=\"198.18.2.11:80\",code=\"200\"}} {}",
                10 * n + 1
            ),
            format!(
                "xdplb_http_request_seconds_count{{service=\"web\"}} {}",
                10 * n
            ),
            "xdplb_http_request_seconds_bucket{le=\"0.001\",service=\"web\"} 0".to_owned(),
            format!(
                "xdplb_http_request_seconds_bucket{{le=\"0.0025\",service=\"web\"}} {}",
                10 * n
            ),
            format!(
                "xdplb_http_request_seconds_bucket{{le=\"+Inf\",service=\"web\"}} {}",
                10 * n
            ),
        ] {
            assert!(text.contains(&needle), "{needle} missing in\n{text}");
        }
    }
}
