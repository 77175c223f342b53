//! The shared HTTP cache of the reverse proxy (RFC 9111, with RFC 5861's
//! `stale-while-revalidate` / `stale-if-error` and RFC 9211's `Cache-Status`).
//!
//! [`Cache::handle`] answers a request from the store or through an [`Upstream`]:
//!
//! - GET and HEAD are looked up (key: lower-case host + path and query, then the
//!   variant selected by `Vary`, §4.1); other methods pass through, and unsafe ones
//!   that succeed invalidate the target URI and same-host `Location` /
//!   `Content-Location` (§4.4).
//! - Response directives come from the first targeted field of the service's `targets`
//!   present with a valid value (RFC 9213, default `CDN-Cache-Control`), which then
//!   overrides `Cache-Control` and `Expires`; the field is forwarded unchanged.
//! - A fresh response is served with its `Age` (§4.2); a client's own
//!   `If-None-Match` / `If-Modified-Since` is answered with 304 from the store (§4.3.2).
//! - A GET with `Range` is answered from a stored complete 200 ([`range`]: 206 for one
//!   satisfiable range, `multipart/byteranges` for several in ascending order without
//!   overlap, 416 for none, the whole 200 for invalid syntax, overlapping or unordered
//!   ranges, or an `If-Range` that does not match strongly); when nothing usable is stored it
//!   goes to a backend as it is and the answer is not stored.
//! - A 200 to a HEAD that went upstream updates the stored GET response when its
//!   validators and length match and drops it when they do not (§4.3.5).
//! - A stale one (or one that must be validated) is validated with the stored `ETag` /
//!   `Last-Modified` (§4.3.1); a 304 refreshes the stored header fields (§3.2, §4.3.4),
//!   a full response replaces them. Within `stale-while-revalidate` the stale response
//!   is served at once and refreshed in the background; within `stale-if-error` it is
//!   served when the upstream fails or answers 500/502/503/504; with
//!   `stale_if_unreachable_s`, also when the upstream cannot be reached at all (§4.2.4),
//!   unless `must-revalidate`, `proxy-revalidate`, `s-maxage` or `no-cache` forbid it.
//! - Concurrent misses of one URI are collapsed into one upstream request: the first
//!   leads, its body is streamed to its client and collected for the store at once
//!   (a tee), the others wait (at most [`COLLAPSE_WAIT`]) and are served the stored
//!   result, or go upstream themselves if nothing usable was stored.
//!
//! Laid out as pingora-cache is: the rules live in [`policy`] (pure functions), the
//! bounded memory store and its keys in [`store`], the collapsing lock in [`lock`], the
//! body tee in [`tee`]; this module runs a request through them.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;

use crate::config::CacheConfig;
use crate::l7::body::{Body, empty, full};

mod lock;
pub mod policy;
pub mod range;
pub mod store;
mod tee;
#[cfg(test)]
mod tests;

pub use lock::COLLAPSE_WAIT;
use lock::{CacheLock, Locked, WritePermit};
use policy::{CacheControl, Reuse};
use store::{Key, KeyRef, Lookup, Store, Stored};

/// The cache's name in `Cache-Status`.
pub const CACHE_NAME: &str = "xdplb";

/// The `Cache-Status` header (RFC 9211).
pub const CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");

/// What the upstream call failed with (connect failure, timeout, reset, no backend).
#[derive(Debug)]
pub struct UpstreamError(pub String);

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UpstreamError {}

/// How the proxy reaches the backends; the cache calls it for misses, revalidations
/// and background refreshes. Cloned into spawned tasks.
pub trait Upstream: Clone + Send + Sync + 'static {
    /// Send `req` to a backend.
    fn send(&self, req: Request<Body>)
    -> BoxFuture<'static, Result<Response<Body>, UpstreamError>>;
}

/// How a request was answered (the `result` label of `xdplb_cache_requests_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheResult {
    /// A fresh stored response.
    Hit,
    /// Fetched from the upstream (nothing usable stored, or validation returned a new one).
    Miss,
    /// A stale stored response (`stale-while-revalidate`, `stale-if-error`, `max-stale`).
    Stale,
    /// A stored response validated by the upstream with 304.
    Revalidated,
    /// Not handled by the cache (method, range).
    Bypass,
    /// Served what a concurrent request for the same URI fetched.
    Collapsed,
}

impl CacheResult {
    /// The metric label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::Revalidated => "revalidated",
            Self::Bypass => "bypass",
            Self::Collapsed => "collapsed",
        }
    }
}

/// This cache's `Cache-Status` list member (RFC 9211 §2).
#[derive(Clone, Debug, Default)]
struct Status {
    hit: bool,
    fwd: Option<&'static str>,
    fwd_status: Option<u16>,
    stored: bool,
    collapsed: bool,
    ttl: Option<i64>,
    detail: Option<&'static str>,
}

impl Status {
    fn forwarded(fwd: &'static str) -> Self {
        Self {
            fwd: Some(fwd),
            ..Self::default()
        }
    }

    fn render(&self) -> String {
        let mut s = String::with_capacity(40);
        s.push_str(CACHE_NAME);
        if self.hit {
            s.push_str("; hit");
        }
        if let Some(fwd) = self.fwd {
            let _ = write!(s, "; fwd={fwd}");
        }
        if let Some(code) = self.fwd_status {
            let _ = write!(s, "; fwd-status={code}");
        }
        if self.stored {
            s.push_str("; stored");
        }
        if self.collapsed {
            s.push_str("; collapsed");
        }
        if let Some(ttl) = self.ttl {
            let _ = write!(s, "; ttl={ttl}");
        }
        if let Some(detail) = self.detail {
            let _ = write!(s, "; detail={detail}");
        }
        s
    }
}

/// Add this cache's `Cache-Status` member after those of caches before it.
fn add_cache_status(headers: &mut HeaderMap, status: &Status) {
    if let Some(v) = cache_status_value(headers, status) {
        headers.insert(CACHE_STATUS, v);
    }
}

/// The `Cache-Status` value of a response with `headers`: the members of caches before
/// us, then ours.
fn cache_status_value(headers: &HeaderMap, status: &Status) -> Option<HeaderValue> {
    let ours = status.render();
    let value = if headers.contains_key(&CACHE_STATUS) {
        let mut all: Vec<String> = headers
            .get_all(&CACHE_STATUS)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        all.push(ours);
        all.join(", ")
    } else {
        ours
    };
    // The string's buffer becomes the value's (no copy).
    HeaderValue::from_maybe_shared(bytes::Bytes::from(value)).ok()
}

/// Which of the request fields that [`Cache::hit`] reads are present: found in one
/// pass over the request's field names (most requests carry none of them) instead of
/// one hashed lookup per field.
#[derive(Debug, Default, PartialEq, Eq)]
struct HitFields {
    /// `Cache-Control` or `Pragma`.
    directives: bool,
    /// `If-None-Match` or `If-Modified-Since`.
    conditional: bool,
    /// `Range`.
    range: bool,
}

impl HitFields {
    fn of(headers: &HeaderMap) -> Self {
        let mut f = Self::default();
        for name in headers.keys() {
            if *name == header::CACHE_CONTROL || *name == header::PRAGMA {
                f.directives = true;
            } else if *name == header::IF_NONE_MATCH || *name == header::IF_MODIFIED_SINCE {
                f.conditional = true;
            } else if *name == header::RANGE {
                f.range = true;
            }
        }
        f
    }
}

/// A response on its way out, with what the cache did.
struct Served {
    resp: Response<Body>,
    result: CacheResult,
    status: Status,
}

/// What one GET/HEAD request brings to the cache.
struct Ctx {
    key: Key,
    head: bool,
    req_cc: CacheControl,
    req_headers: HeaderMap,
    started: SystemTime,
    /// A GET with `Range`: answered from a stored complete response (RFC 9110 §14).
    ranged: bool,
}

/// The shared HTTP cache. Cheap to clone (one shared store).
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    object_limit: u64,
    /// URIs with an upstream request under way that others may wait for.
    lock: CacheLock,
    /// Targeted cache-control fields obeyed, in order of precedence (RFC 9213).
    targets: Vec<HeaderName>,
    /// How long past its freshness a response may be served when the upstream
    /// cannot be reached (zero: never, unless `stale-if-error`).
    unreachable: Duration,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (entries, bytes) = self.usage();
        f.debug_struct("Cache")
            .field("entries", &entries)
            .field("bytes", &bytes)
            .field("object_limit", &self.inner.object_limit)
            .finish()
    }
}

impl Cache {
    /// A cache of at most `cfg.max_bytes`, storing bodies up to `cfg.object_limit()`.
    #[must_use]
    pub fn new(cfg: &CacheConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                store: Store::new(cfg.max_bytes),
                object_limit: cfg.object_limit(),
                lock: CacheLock::default(),
                // Validated by config/rules.rs: a name that is not one cannot get here.
                targets: cfg
                    .targets
                    .iter()
                    .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
                    .collect(),
                unreachable: Duration::from_secs(cfg.stale_if_unreachable_s),
            }),
        }
    }

    /// Answer `req` from the cache or through `upstream`. The response carries a
    /// `Cache-Status` header (RFC 9211, cache name "xdplb") and the `CacheResult` in
    /// its extensions (`resp.extensions().get::<CacheResult>()`).
    pub async fn handle<U: Upstream>(&self, req: Request<Body>, upstream: U) -> Response<Body> {
        let Served {
            mut resp,
            result,
            status,
        } = self.serve(req, upstream).await;
        add_cache_status(resp.headers_mut(), &status);
        resp.extensions_mut().insert(result);
        resp
    }

    /// The fast path of a cache hit: `req`'s fresh stored response, as
    /// [`handle`](Self::handle) would serve it (`Cache-Status: xdplb; hit; ttl=N`, its
    /// `Age`, a 304 for a matching conditional, a 206 for a `Range`), found without
    /// building the upstream request first. `None` whenever `handle` would do anything
    /// else (nothing fresh stored for it, a request directive wanting validation, a
    /// method other than GET and HEAD): the caller then calls `handle`, which looks
    /// again. The result is `CacheResult::Hit`; it is not put in the extensions.
    ///
    /// `req` is the request before the caller's changes for the upstream: `unchanged`
    /// says which request fields the request given to `handle` would carry unchanged.
    /// A stored response whose `Vary` names any other field is left to `handle`, and
    /// so must be any request where `Cache-Control`, `Pragma`, `Range`, `If-Range`,
    /// `If-None-Match`, `If-Modified-Since`, the host or the target would differ.
    pub async fn hit<B>(
        &self,
        req: &Request<B>,
        unchanged: impl Fn(&HeaderName) -> bool,
    ) -> Option<Response<Body>> {
        let head = match *req.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return None,
        };
        let Lookup::Found(stored) = lookup(&self.inner.store, req).await else {
            return None;
        };
        // Every variant of a URI varies on the same names (`Store::put`).
        if !stored.vary.iter().all(|(name, _)| unchanged(name)) {
            return None;
        }
        let now = SystemTime::now();
        let fields = HitFields::of(req.headers());
        // Without `Cache-Control` and `Pragma` the request has no directives.
        let req_cc = if fields.directives {
            CacheControl::parse_request(req.headers())
        } else {
            CacheControl::default()
        };
        if policy::reuse(&req_cc, &stored.cc, stored.lifetime, stored.age(now)) != Reuse::Fresh {
            return None;
        }
        let asked = Asked {
            headers: req.headers(),
            head,
            // Range is defined for GET only (see `serve`).
            ranged: !head && fields.range,
        };
        // Without `If-None-Match` and `If-Modified-Since`, `not_modified` is false.
        let conditional_match = fields.conditional
            && stored.status.is_success()
            && policy::not_modified(asked.headers, &stored.headers);
        let whole = !asked.ranged && !conditional_match;
        if whole {
            // The common case: the stored response whole, its header map built at store
            // time with `Age` and `Cache-Status` in place (what `serve_stored` and
            // `add_cache_status` give it, without building either per hit).
            let headers = stored.hit_head(now, |ttl| {
                let status = Status {
                    hit: true,
                    ttl: Some(ttl),
                    ..Status::default()
                };
                cache_status_value(&stored.headers, &status)
                    .unwrap_or_else(|| HeaderValue::from_static(CACHE_NAME))
            });
            let mut resp = Response::new(if head {
                empty()
            } else {
                full(stored.body.clone())
            });
            *resp.status_mut() = stored.status;
            *resp.headers_mut() = headers;
            return Some(resp);
        }
        let status = Status {
            hit: true,
            ..Status::default()
        };
        let Served {
            mut resp, status, ..
        } = serve_stored(&asked, &stored, now, CacheResult::Hit, status);
        add_cache_status(resp.headers_mut(), &status);
        Some(resp)
    }

    /// Remove stored responses: every entry when `path` is None, else those whose
    /// path (without query) equals `path`, or starts with it when `prefix`. Returns how many.
    pub fn purge(&self, path: Option<&str>, prefix: bool) -> u64 {
        self.inner.store.purge(path, prefix)
    }

    /// (entries, bytes) currently stored.
    #[must_use]
    pub fn usage(&self) -> (u64, u64) {
        self.inner.store.usage()
    }

    /// Run the store's pending maintenance (so [`usage`](Self::usage) is up to date).
    pub async fn run_pending_tasks(&self) {
        self.inner.store.run_pending_tasks().await;
    }

    async fn serve<U: Upstream>(&self, req: Request<Body>, upstream: U) -> Served {
        let method = req.method().clone();
        if method != Method::GET && method != Method::HEAD {
            return self.bypass(req, &upstream, "method", None).await;
        }
        let ctx = Ctx {
            key: key_of(&req),
            head: method == Method::HEAD,
            req_cc: CacheControl::parse_request(req.headers()),
            req_headers: req.headers().clone(),
            started: SystemTime::now(),
            // Range is defined for GET only; on HEAD it is ignored (RFC 9110 §14.2).
            ranged: method == Method::GET && req.headers().contains_key(header::RANGE),
        };
        let now = SystemTime::now();
        let (mut found, fwd) = match self.inner.store.lookup(&ctx.key, &ctx.req_headers).await {
            Lookup::UriMiss => (None, "uri-miss"),
            Lookup::VaryMiss => (None, "vary-miss"),
            Lookup::Found(stored) => {
                let age = stored.age(now);
                match policy::reuse(&ctx.req_cc, &stored.cc, stored.lifetime, age) {
                    Reuse::Fresh => {
                        let status = Status {
                            hit: true,
                            ..Status::default()
                        };
                        return from_store(&ctx, &stored, now, CacheResult::Hit, status);
                    }
                    reuse @ (Reuse::StaleWhileRevalidate | Reuse::MaxStale) => {
                        let detail = if reuse == Reuse::MaxStale {
                            "max-stale"
                        } else {
                            self.spawn_refresh(&ctx, &req, upstream, Arc::clone(&stored));
                            "stale-while-revalidate"
                        };
                        let status = Status {
                            hit: true,
                            detail: Some(detail),
                            ..Status::default()
                        };
                        return from_store(&ctx, &stored, now, CacheResult::Stale, status);
                    }
                    Reuse::Validate => {
                        // fresh, but the request's directives want it validated
                        let fresh = stored.lifetime > age && !stored.cc.no_cache;
                        let fwd = if fresh { "request" } else { "stale" };
                        (Some(stored), fwd)
                    }
                }
            }
        };
        if ctx.req_cc.only_if_cached {
            // RFC 9111 §5.2.1.7
            let mut status = Status::forwarded(fwd);
            status.detail = Some("only-if-cached");
            return Served {
                resp: error_response(StatusCode::GATEWAY_TIMEOUT),
                result: CacheResult::Miss,
                status,
            };
        }
        if ctx.ranged {
            // A Range request that the store cannot answer goes to a backend as it is;
            // its 206 is not stored (the cache fills from complete responses).
            return self.bypass(req, &upstream, "bypass", Some("range")).await;
        }
        if ctx.head {
            // A HEAD miss goes upstream as HEAD and is not stored.
            return self.forward(&ctx, req, &upstream, found, fwd, None).await;
        }
        match self.inner.lock.lock(&ctx.key) {
            Locked::Write(permit) => {
                return self
                    .forward(&ctx, req, &upstream, found, fwd, Some(permit))
                    .await;
            }
            Locked::Read(waiting) => waiting.wait().await,
        }
        let now = SystemTime::now();
        if let Lookup::Found(stored) = self.inner.store.lookup(&ctx.key, &ctx.req_headers).await {
            let reuse = policy::reuse(&ctx.req_cc, &stored.cc, stored.lifetime, stored.age(now));
            if stored.response_time >= ctx.started || reuse == Reuse::Fresh {
                let status = Status {
                    collapsed: true,
                    ..Status::forwarded(fwd)
                };
                return from_store(&ctx, &stored, now, CacheResult::Collapsed, status);
            }
            found = Some(stored);
        }
        // The leader's response was not storable (or it took too long): go ourselves.
        self.forward(&ctx, req, &upstream, found, fwd, None).await
    }

    /// Refresh `stale` in the background unless a fetch of its URI is under way.
    fn spawn_refresh<U: Upstream>(
        &self,
        ctx: &Ctx,
        req: &Request<Body>,
        upstream: U,
        stale: Arc<Stored>,
    ) {
        let Locked::Write(permit) = self.inner.lock.lock(&ctx.key) else {
            return;
        };
        let mut refresh = Request::new(empty());
        *refresh.method_mut() = Method::GET;
        *refresh.uri_mut() = req.uri().clone();
        *refresh.version_mut() = req.version();
        *refresh.headers_mut() = req.headers().clone();
        // The refresh fetches the whole response to store it.
        refresh.headers_mut().remove(header::RANGE);
        refresh.headers_mut().remove(header::IF_RANGE);
        let ctx = Ctx {
            key: ctx.key.clone(),
            head: false,
            req_cc: CacheControl::default(),
            req_headers: ctx.req_headers.clone(),
            started: SystemTime::now(),
            ranged: false,
        };
        let this = self.clone();
        tokio::spawn(async move {
            let served = this
                .forward(&ctx, refresh, &upstream, Some(stale), "stale", Some(permit))
                .await;
            tracing::debug!(key = %ctx.key, status = served.status.render(), "cache: background refresh");
            if served.status.stored {
                // Drive the tee so that the new response reaches the store.
                let mut body = served.resp.into_body();
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
            }
        });
    }

    /// Pass a request through without the cache; unsafe methods that succeed
    /// invalidate the URIs they affect (RFC 9111 §4.4).
    async fn bypass<U: Upstream>(
        &self,
        req: Request<Body>,
        upstream: &U,
        fwd: &'static str,
        detail: Option<&'static str>,
    ) -> Served {
        let unsafe_method = !matches!(
            *req.method(),
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        let key = key_of(&req);
        let mut status = Status {
            detail,
            ..Status::forwarded(fwd)
        };
        let resp = match upstream.send(req).await {
            Ok(resp) => resp,
            Err(e) => {
                status.detail = Some("upstream-error");
                return Served {
                    resp: upstream_error(&e),
                    result: CacheResult::Bypass,
                    status,
                };
            }
        };
        status.fwd_status = Some(resp.status().as_u16());
        if unsafe_method && (resp.status().is_success() || resp.status().is_redirection()) {
            self.inner.store.invalidate(&key).await;
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(path) = resp
                    .headers()
                    .get(&name)
                    .and_then(|v| policy::same_host_path(v, &key.host))
                {
                    self.inner
                        .store
                        .invalidate(&Key::new(&key.host, &path))
                        .await;
                }
            }
        }
        Served {
            resp,
            result: CacheResult::Bypass,
            status,
        }
    }

    /// Serve a stored response because the upstream failed, if `stale-if-error` allows,
    /// or (no answer at all: `code` is None) `stale_if_unreachable_s` does.
    fn stale_on_error(
        &self,
        ctx: &Ctx,
        stored: Option<&Arc<Stored>>,
        fwd: &'static str,
        code: Option<StatusCode>,
        now: SystemTime,
    ) -> Option<Served> {
        let stored = stored?;
        let age = stored.age(now);
        let detail = if policy::stale_if_error_ok(&ctx.req_cc, &stored.cc, stored.lifetime, age) {
            "stale-if-error"
        } else if code.is_none()
            && policy::stale_if_unreachable_ok(
                &ctx.req_cc,
                &stored.cc,
                stored.lifetime,
                age,
                self.inner.unreachable,
            )
        {
            "unreachable"
        } else {
            return None;
        };
        let status = Status {
            fwd_status: code.map(|c| c.as_u16()),
            detail: Some(detail),
            ..Status::forwarded(fwd)
        };
        Some(from_store(ctx, stored, now, CacheResult::Stale, status))
    }

    /// Send a GET/HEAD upstream: validating `stale` when it has validators, serving it
    /// on errors within `stale-if-error`, storing what may be stored. `permit`, if
    /// any (the collapsing lock), is released once the response is stored or known
    /// not to be.
    async fn forward<U: Upstream>(
        &self,
        ctx: &Ctx,
        mut req: Request<Body>,
        upstream: &U,
        stale: Option<Arc<Stored>>,
        fwd: &'static str,
        permit: Option<WritePermit>,
    ) -> Served {
        let validating = !ctx.head && {
            // The cache wants a full response it can store, and answers the client's
            // own condition itself.
            policy::strip_conditionals(req.headers_mut());
            stale
                .as_ref()
                .is_some_and(|s| policy::add_validators(req.headers_mut(), &s.headers))
        };
        let mut status = Status::forwarded(fwd);
        let request_time = SystemTime::now();
        let sent = upstream.send(req).await;
        let response_time = SystemTime::now();
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                if let Some(served) =
                    self.stale_on_error(ctx, stale.as_ref(), fwd, None, response_time)
                {
                    return served;
                }
                tracing::debug!(key = %ctx.key, "cache: upstream failed: {e}");
                status.detail = Some("upstream-error");
                return Served {
                    resp: upstream_error(&e),
                    result: CacheResult::Miss,
                    status,
                };
            }
        };
        let code = resp.status();
        status.fwd_status = Some(code.as_u16());
        if matches!(code.as_u16(), 500 | 502 | 503 | 504) {
            if let Some(served) =
                self.stale_on_error(ctx, stale.as_ref(), fwd, Some(code), response_time)
            {
                return served;
            }
        }
        let (mut parts, body) = resp.into_parts();
        policy::ensure_date(&mut parts.headers, response_time);
        if let (true, StatusCode::NOT_MODIFIED, Some(old)) = (validating, code, stale.as_ref()) {
            // §4.3.4: freshen the stored response with the 304's header fields.
            let fresh = self
                .update_stored(ctx, old, &parts.headers, request_time, response_time)
                .await;
            drop(permit);
            return from_store(ctx, &fresh, response_time, CacheResult::Revalidated, status);
        }
        if let (true, StatusCode::OK, Some(old)) = (ctx.head, code, stale.as_ref()) {
            // §4.3.5: a 200 to HEAD updates the stored GET response when its validators
            // and length match, and makes it unusable when they do not.
            if policy::head_matches(&old.headers, &parts.headers) {
                let fresh = self
                    .update_stored(ctx, old, &parts.headers, request_time, response_time)
                    .await;
                status.detail = Some("head-refresh");
                return from_store(ctx, &fresh, response_time, CacheResult::Revalidated, status);
            }
            self.inner.store.invalidate(&ctx.key).await;
            status.detail = Some("head-invalidated");
            return Served {
                resp: Response::from_parts(parts, body),
                result: CacheResult::Miss,
                status,
            };
        }
        let method = if ctx.head { Method::HEAD } else { Method::GET };
        let length =
            content_length(&parts.headers).or_else(|| http_body::Body::size_hint(&body).exact());
        let resp_cc = CacheControl::parse_response(&parts.headers, &self.inner.targets);
        let storable = policy::storable(
            &method,
            &ctx.req_headers,
            &ctx.req_cc,
            code,
            &parts.headers,
            &resp_cc,
        )
        .and_then(|()| match length {
            Some(len) if len > self.inner.object_limit => Err("too-large"),
            _ => Ok(()),
        });
        let client_304 = !ctx.head
            && code.is_success()
            && policy::not_modified(&ctx.req_headers, &parts.headers);
        if let Err(why) = storable {
            tracing::debug!(key = %ctx.key, "cache: not stored: {why}");
            drop(permit);
            let resp = if client_304 {
                not_modified_response(&parts.headers)
            } else {
                Response::from_parts(parts, body)
            };
            return Served {
                resp,
                result: CacheResult::Miss,
                status,
            };
        }
        status.stored = true;
        let store = self.inner.store.clone();
        let key = ctx.key.clone();
        let req_headers = ctx.req_headers.clone();
        let headers = parts.headers.clone();
        let targets = self.inner.targets.clone();
        let put: tee::Store = Box::new(move |body| {
            tokio::spawn(async move {
                // Held until the response is stored (or its body given up: then dropped
                // with this closure), so collapsed requests wait for the store.
                let _permit = permit;
                let stored = Stored::new(
                    code,
                    headers,
                    body,
                    &req_headers,
                    &targets,
                    request_time,
                    response_time,
                );
                store.put(key, Arc::new(stored)).await;
            })
        });
        let tee = tee::tee(body, length, self.inner.object_limit, put);
        let resp = if client_304 {
            // The client has it: answer 304 and let the body flow into the store.
            let head = not_modified_response(&parts.headers);
            let mut body = tee;
            tokio::spawn(async move {
                while let Some(frame) = body.frame().await {
                    if frame.is_err() {
                        break;
                    }
                }
            });
            head
        } else {
            Response::from_parts(parts, tee)
        };
        Served {
            resp,
            result: CacheResult::Miss,
            status,
        }
    }

    /// Update `old` with the header fields of a 304 (§4.3.4) or of a 200 to HEAD
    /// (§4.3.5) as §3.2 says, store the result if it is still storable (else drop the
    /// stored response), and return what to serve this request: with the new
    /// `Set-Cookie`, which is for this client only and never stored.
    async fn update_stored(
        &self,
        ctx: &Ctx,
        old: &Stored,
        fresh: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Arc<Stored> {
        let merged = policy::merge_304(&old.headers, fresh);
        let stored_headers = {
            let mut h = merged.clone();
            h.remove(header::SET_COOKIE);
            h
        };
        let build = |headers| {
            Stored::new(
                old.status,
                headers,
                old.body.clone(),
                &ctx.req_headers,
                &self.inner.targets,
                request_time,
                response_time,
            )
        };
        let for_store = Arc::new(build(stored_headers));
        let still_storable = policy::storable(
            &Method::GET,
            &ctx.req_headers,
            &ctx.req_cc,
            for_store.status,
            &for_store.headers,
            &for_store.cc,
        );
        match still_storable {
            Ok(()) => {
                self.inner
                    .store
                    .put(ctx.key.clone(), Arc::clone(&for_store))
                    .await;
            }
            Err(why) => {
                tracing::debug!(key = %ctx.key, "cache: dropped after update: {why}");
                if !ctx.req_cc.no_store {
                    self.inner.store.invalidate(&ctx.key).await;
                }
            }
        }
        if merged.contains_key(header::SET_COOKIE) {
            Arc::new(build(merged))
        } else {
            for_store
        }
    }
}

/// Serve a stored response (with its current `Age`), or 304 when the client's own
/// conditional matches it.
fn from_store(
    ctx: &Ctx,
    stored: &Stored,
    now: SystemTime,
    result: CacheResult,
    status: Status,
) -> Served {
    let asked = Asked {
        headers: &ctx.req_headers,
        head: ctx.head,
        ranged: ctx.ranged,
    };
    serve_stored(&asked, stored, now, result, status)
}

/// What [`serve_stored`] needs of a GET or HEAD request.
struct Asked<'a> {
    headers: &'a HeaderMap,
    head: bool,
    /// A GET with `Range`.
    ranged: bool,
}

/// [`from_store`] for a request given by its parts.
fn serve_stored(
    asked: &Asked<'_>,
    stored: &Stored,
    now: SystemTime,
    result: CacheResult,
    mut status: Status,
) -> Served {
    let ranged = if asked.ranged {
        range_response(asked.headers, stored)
    } else {
        None
    };
    let mut resp =
        if stored.status.is_success() && policy::not_modified(asked.headers, &stored.headers) {
            not_modified_response(&stored.headers)
        } else if let Some(resp) = ranged {
            resp
        } else {
            let mut resp = Response::new(if asked.head {
                empty()
            } else {
                full(stored.body.clone())
            });
            *resp.status_mut() = stored.status;
            *resp.headers_mut() = stored.headers.clone();
            resp
        };
    let age = stored.age(now).as_secs().min(policy::DELTA_MAX);
    resp.headers_mut().insert(header::AGE, age.into());
    status.ttl = Some(stored.ttl(now));
    Served {
        resp,
        result,
        status,
    }
}

/// The answer to a GET with `Range` from a stored complete `200` (RFC 9110 §14):
/// 206 with the single satisfiable range, or with several as `multipart/byteranges`
/// when they ascend without overlap; 416 when none is satisfiable; `None` (serve the
/// whole 200) when the range is invalid, `If-Range` does not match strongly, the stored
/// status is not 200, or the ranges overlap or are out of order.
fn range_response(req: &HeaderMap, stored: &Stored) -> Option<Response<Body>> {
    if stored.status != StatusCode::OK || !range::if_range_allows(req, &stored.headers) {
        return None;
    }
    let value = req.get(header::RANGE)?.to_str().ok()?;
    let len = stored.body.len() as u64;
    match range::parse(value, len) {
        range::Ranges::Ignore => None,
        range::Ranges::Unsatisfiable => {
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let headers = resp.headers_mut();
            *headers = policy::not_modified_headers(&stored.headers);
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&range::unsatisfied_range(len)).ok()?,
            );
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            Some(resp)
        }
        range::Ranges::Satisfiable(ranges) if range::multipart_allowed(&ranges) => {
            let boundary = format!("xdplb-{:016x}", rand::random::<u64>());
            let content_type = stored
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok());
            let body = range::multipart_body(&stored.body, &ranges, content_type, &boundary);
            let length = body.len();
            let mut resp = Response::new(full(body));
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let headers = resp.headers_mut();
            *headers = stored.headers.clone();
            headers.remove(header::CONTENT_RANGE);
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_str(&format!("multipart/byteranges; boundary={boundary}"))
                    .ok()?,
            );
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            Some(resp)
        }
        range::Ranges::Satisfiable(ranges) => {
            let [(first, last)] = ranges[..] else {
                return None;
            };
            let start = usize::try_from(first).ok()?;
            let end = usize::try_from(last).ok()?;
            let part = stored.body.slice(start..=end);
            let mut resp = Response::new(full(part.clone()));
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let headers = resp.headers_mut();
            *headers = stored.headers.clone();
            headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&range::content_range(first, last, len)).ok()?,
            );
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(part.len()));
            Some(resp)
        }
    }
}

/// A 304 for a response with `headers` (RFC 9110 §15.4.5).
fn not_modified_response(headers: &HeaderMap) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    *resp.headers_mut() = policy::not_modified_headers(headers);
    resp
}

/// A short text response of the cache's own.
fn error_response(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(full(format!("{code}\n")));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// 504 when the upstream error was a timeout, else 502.
fn upstream_error(e: &UpstreamError) -> Response<Body> {
    if e.0.to_ascii_lowercase().contains("timeout") {
        error_response(StatusCode::GATEWAY_TIMEOUT)
    } else {
        error_response(StatusCode::BAD_GATEWAY)
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The store key of a request: host from the URI's authority (absolute form, HTTP/2)
/// or the `Host` header, lower-cased, without user info; then the path and query.
fn key_of<B>(req: &Request<B>) -> Key {
    let (host, pq) = key_parts(req);
    Key::new(host, pq)
}

/// The host (as given) and path-and-query of [`key_of`].
fn key_parts<B>(req: &Request<B>) -> (&str, &str) {
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default();
    let host = host.rsplit('@').next().unwrap_or(host).trim();
    let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    (host, pq)
}

/// Look `req` up: by its borrowed key when the host is lower-case already (no key
/// built), else by [`key_of`].
async fn lookup<B>(store: &Store, req: &Request<B>) -> Lookup {
    let (host, path_and_query) = key_parts(req);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        store
            .lookup(&Key::new(host, path_and_query), req.headers())
            .await
    } else {
        let key = KeyRef {
            host,
            path_and_query,
        };
        store.lookup(&key, req.headers()).await
    }
}
