//! The rules of an RFC 9111 shared cache as pure functions over header maps, status
//! codes and times, so they can be tested without sockets:
//!
//! - [`CacheControl`]: the `Cache-Control` directives of a request or response
//!   (RFC 9111 §5.2, plus `stale-while-revalidate` / `stale-if-error` of RFC 5861);
//!   malformed values never panic: an invalid `max-age` / `s-maxage` counts as 0
//!   (stale), other invalid arguments are ignored, values past 2^31 saturate (§1.2.2).
//! - [`storable`]: may a response be stored (§3, with the shared-cache rules of
//!   §3.5 for `Authorization`; `Set-Cookie` responses and 206 are never stored).
//! - [`freshness_lifetime`]: `s-maxage` > `max-age` > `Expires - Date`, else the
//!   heuristic of §4.2.2 (10% of `Date - Last-Modified`, at most 24 h).
//! - [`corrected_initial_age`] / [`current_age`]: the age calculation of §4.2.3.
//! - [`reuse`] / [`stale_if_error_ok`]: may a stored response be served fresh,
//!   served stale, or must it be validated (§4.2.4, §5.2.1, §5.2.2, RFC 5861).
//! - [`Vary`] and [`vary_value`]: selecting a variant (§4.1).
//! - [`strip_conditionals`], [`add_validators`], [`merge_304`], [`not_modified`],
//!   [`not_modified_headers`]: validation (§4.3, §3.2) and answering a client's own
//!   conditional request from the cache (§4.3.2, RFC 9110 §13.1).
//! - [`same_host_path`]: the URIs invalidated by unsafe methods (§4.4).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};

/// The largest delta-seconds value (RFC 9111 §1.2.2): bigger or overflowing ones become this.
pub const DELTA_MAX: u64 = 2_147_483_648;

/// The heuristic freshness lifetime is capped at one day.
pub const HEURISTIC_MAX: Duration = Duration::from_secs(24 * 3600);

/// The `Cache-Control` directives this cache acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheControl {
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache`; the qualified response form (`no-cache="field"`) counts as unqualified.
    pub no_cache: bool,
    /// `private`; the qualified form counts as unqualified.
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate` (the same as `must-revalidate` for a shared cache).
    pub proxy_revalidate: bool,
    /// `only-if-cached` (request).
    pub only_if_cached: bool,
    /// `max-age`; an invalid argument is 0.
    pub max_age: Option<u64>,
    /// `s-maxage`; an invalid argument is 0.
    pub s_maxage: Option<u64>,
    /// `max-stale` (request): `Some(None)` accepts any staleness.
    pub max_stale: Option<Option<u64>>,
    /// `min-fresh` (request).
    pub min_fresh: Option<u64>,
    /// `stale-while-revalidate` (RFC 5861 §3).
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error` (RFC 5861 §4), request or response.
    pub stale_if_error: Option<u64>,
    /// `must-understand` (§5.2.2.3): store only status codes this cache understands,
    /// and then ignore `no-store`.
    pub must_understand: bool,
    /// Read from a targeted field (RFC 9213) rather than `Cache-Control`: `Expires`
    /// is then ignored too (RFC 9213 §2.2).
    pub targeted: bool,
}

/// Parse a delta-seconds value (RFC 9111 §1.2.2): digits only, saturating at [`DELTA_MAX`].
#[must_use]
pub fn parse_delta(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut v: u64 = 0;
    for b in s.bytes() {
        v = v.saturating_mul(10).saturating_add(u64::from(b - b'0'));
        if v > DELTA_MAX {
            return Some(DELTA_MAX);
        }
    }
    Some(v)
}

/// Split a list field on commas that are not inside a quoted string.
fn split_list(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.retain(|p| !p.is_empty());
    out
}

/// The lesser of an existing and a new value (duplicates keep the more restrictive one).
fn min_opt(old: Option<u64>, new: u64) -> Option<u64> {
    Some(old.map_or(new, |o| o.min(new)))
}

impl CacheControl {
    /// The directives of all `Cache-Control` lines of `headers`.
    #[must_use]
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut cc = Self::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for directive in split_list(value) {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive, None),
                };
                let name = name.to_ascii_lowercase();
                let delta = arg.and_then(parse_delta);
                match name.as_str() {
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "only-if-cached" => cc.only_if_cached = true,
                    "must-understand" => cc.must_understand = true,
                    // Invalid freshness information means stale (§4.2.1, §5.2.2.1).
                    "max-age" => cc.max_age = min_opt(cc.max_age, delta.unwrap_or(0)),
                    "s-maxage" => cc.s_maxage = min_opt(cc.s_maxage, delta.unwrap_or(0)),
                    "max-stale" => match (arg, delta) {
                        (None, _) => cc.max_stale = Some(None),
                        (Some(_), Some(d)) => cc.max_stale = Some(Some(d)),
                        (Some(_), None) => {}
                    },
                    "min-fresh" => {
                        if let Some(d) = delta {
                            cc.min_fresh = Some(d);
                        }
                    }
                    "stale-while-revalidate" => {
                        if let Some(d) = delta {
                            cc.stale_while_revalidate = Some(d);
                        }
                    }
                    "stale-if-error" => {
                        if let Some(d) = delta {
                            cc.stale_if_error = Some(d);
                        }
                    }
                    _ => {}
                }
            }
        }
        cc
    }

    /// The directives of a request: [`parse`](Self::parse), and `Pragma: no-cache`
    /// counts as `no-cache` when there is no `Cache-Control` (§5.4).
    #[must_use]
    pub fn parse_request(headers: &HeaderMap) -> Self {
        let mut cc = Self::parse(headers);
        if !headers.contains_key(header::CACHE_CONTROL)
            && headers
                .get_all(header::PRAGMA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| {
                    split_list(v)
                        .iter()
                        .any(|d| d.eq_ignore_ascii_case("no-cache"))
                })
        {
            cc.no_cache = true;
        }
        cc
    }

    /// The directives of a response for this cache: those of the first field of
    /// `targets` (RFC 9213 targeted fields, e.g. `CDN-Cache-Control`, in order of
    /// precedence) that is present with a valid, non-empty value, else `Cache-Control`'s.
    #[must_use]
    pub fn parse_response(headers: &HeaderMap, targets: &[HeaderName]) -> Self {
        targets
            .iter()
            .find_map(|name| Self::parse_targeted(headers, name))
            .unwrap_or_else(|| Self::parse(headers))
    }

    /// The directives of targeted field `name` (RFC 9213 §2.1): a Structured Field
    /// Dictionary (RFC 9651; all lines combined). `None` when the field is absent,
    /// empty or not a valid dictionary: the cache then behaves as if it were absent.
    /// A directive whose value has the wrong type (`max-age="60"`, a negative or
    /// fractional number) is ignored; parameters are ignored.
    #[must_use]
    pub fn parse_targeted(headers: &HeaderMap, name: &HeaderName) -> Option<Self> {
        let mut lines = headers.get_all(name).iter().peekable();
        lines.peek()?;
        let mut value = Vec::new();
        for (i, line) in lines.enumerate() {
            if i > 0 {
                value.extend_from_slice(b", ");
            }
            value.extend_from_slice(line.as_bytes());
        }
        let dict: sfv::Dictionary = sfv::Parser::new(&value).parse().ok()?;
        if dict.is_empty() {
            return None;
        }
        let mut cc = Self {
            targeted: true,
            ..Self::default()
        };
        for (key, entry) in &dict {
            let sfv::ListEntry::Item(item) = entry else {
                continue;
            };
            let flag = item.bare_item.as_boolean() == Some(true);
            let delta = item
                .bare_item
                .as_integer()
                .and_then(|i| u64::try_from(i64::from(i)).ok())
                .map(|d| d.min(DELTA_MAX));
            match (key.as_str(), flag, delta) {
                ("no-store", true, _) => cc.no_store = true,
                ("no-cache", true, _) => cc.no_cache = true,
                ("private", true, _) => cc.private = true,
                ("public", true, _) => cc.public = true,
                ("must-revalidate", true, _) => cc.must_revalidate = true,
                ("proxy-revalidate", true, _) => cc.proxy_revalidate = true,
                ("must-understand", true, _) => cc.must_understand = true,
                ("max-age", _, Some(d)) => cc.max_age = Some(d),
                ("s-maxage", _, Some(d)) => cc.s_maxage = Some(d),
                ("stale-while-revalidate", _, Some(d)) => cc.stale_while_revalidate = Some(d),
                ("stale-if-error", _, Some(d)) => cc.stale_if_error = Some(d),
                _ => {}
            }
        }
        Some(cc)
    }
}

/// An HTTP-date header field, if present and valid.
#[must_use]
pub fn date_header(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    parse_date(headers.get(name)?.to_str().ok()?)
}

/// Parse an HTTP-date (RFC 9110 §5.6.7: IMF-fixdate, rfc850-date, asctime-date),
/// matching day and month names and `GMT` case-insensitively, as a cache recipient
/// should (RFC 9111 §4.2).
#[must_use]
pub fn parse_date(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    if let Ok(t) = httpdate::parse_http_date(value) {
        return Some(t);
    }
    let mut norm = String::with_capacity(value.len());
    let mut word = String::new();
    let flush = |word: &mut String, norm: &mut String| {
        if word.eq_ignore_ascii_case("gmt") {
            norm.push_str("GMT");
        } else {
            for (i, c) in word.chars().enumerate() {
                norm.push(if i == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                });
            }
        }
        word.clear();
    };
    for c in value.chars() {
        if c.is_ascii_alphabetic() {
            word.push(c);
        } else {
            flush(&mut word, &mut norm);
            norm.push(c);
        }
    }
    flush(&mut word, &mut norm);
    httpdate::parse_http_date(&norm).ok()
}

/// Give `headers` a `Date` of `now` when it has none or an invalid one (RFC 9110
/// §6.6.1: a recipient that caches or forwards a response without one adds it), so that
/// `Expires` and the age are measured against the time the response was received.
pub fn ensure_date(headers: &mut HeaderMap, now: SystemTime) {
    if date_header(headers, &header::DATE).is_none() {
        if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(now)) {
            headers.insert(header::DATE, v);
        }
    }
}

/// Status codes whose caching semantics this cache understands (§3); 206 (no range
/// support) and 304 (only used to validate) are not among them.
#[must_use]
pub fn understood_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203
            | 204
            | 300
            | 301
            | 302
            | 303
            | 307
            | 308
            | 400
            | 403
            | 404
            | 405
            | 410
            | 414
            | 451
            | 500
            | 501
            | 502
            | 503
            | 504
    )
}

/// Final status codes a response may be stored with (§3): any of 200-599 with explicit
/// freshness, except 206 (partial content is not stored) and 304 (used only to
/// validate); codes this cache does not know (299, 499, 599) included, unless
/// `must-understand` is present.
#[must_use]
pub fn final_status(status: StatusCode) -> bool {
    (200..=599).contains(&status.as_u16()) && !matches!(status.as_u16(), 206 | 304)
}

/// Status codes that are heuristically cacheable (RFC 9110 §15.1), less 206.
#[must_use]
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// The `Vary` of a response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vary {
    /// `Vary: *`: no request can match, never stored.
    Star,
    /// The (lower-case, de-duplicated) request header names; empty without `Vary`.
    Fields(Vec<HeaderName>),
}

impl Vary {
    /// The `Vary` of `headers` (all lines).
    #[must_use]
    pub fn parse(headers: &HeaderMap) -> Self {
        let mut names: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::VARY) {
            let Ok(value) = value.to_str() else { continue };
            for name in split_list(value) {
                if name == "*" {
                    return Self::Star;
                }
                match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(n) if !names.contains(&n) => names.push(n),
                    _ => {}
                }
            }
        }
        Self::Fields(names)
    }
}

/// The normalised value of request header `name` for Vary matching (§4.1): all lines
/// combined, list members trimmed of whitespace, empty members dropped; `None` when absent.
#[must_use]
pub fn vary_value(req: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    let mut present = false;
    for v in req.get_all(name) {
        present = true;
        let s = String::from_utf8_lossy(v.as_bytes());
        parts.extend(split_list(&s).into_iter().map(|p| {
            // collapse inner runs of whitespace so "a ,  b" and "a, b" match
            p.split_whitespace().collect::<Vec<_>>().join(" ")
        }));
    }
    present.then(|| parts.join(","))
}

/// Why a response may not be stored (for logs).
pub type NotStorable = &'static str;

/// May the response to a request be stored by a shared cache (RFC 9111 §3, §3.5)?
#[must_use = "the reason tells why not"]
pub fn storable(
    method: &Method,
    req_headers: &HeaderMap,
    req_cc: &CacheControl,
    status: StatusCode,
    resp_headers: &HeaderMap,
    resp_cc: &CacheControl,
) -> Result<(), NotStorable> {
    if method != Method::GET {
        return Err("method");
    }
    if !final_status(status) {
        return Err("status");
    }
    if resp_cc.must_understand {
        // §5.2.2.3: only status codes it understands, and then `no-store` is ignored.
        if !understood_status(status) {
            return Err("must-understand");
        }
        if req_cc.no_store {
            return Err("no-store");
        }
    } else if req_cc.no_store || resp_cc.no_store {
        return Err("no-store");
    }
    if resp_cc.private {
        return Err("private");
    }
    if req_headers.contains_key(header::AUTHORIZATION)
        && !(resp_cc.public || resp_cc.s_maxage.is_some() || resp_cc.must_revalidate)
    {
        return Err("authorization");
    }
    if resp_headers.contains_key(header::SET_COOKIE) {
        return Err("set-cookie");
    }
    if Vary::parse(resp_headers) == Vary::Star {
        return Err("vary-star");
    }
    let lifetime = freshness_lifetime(status, resp_headers, resp_cc);
    let validator =
        resp_headers.contains_key(header::ETAG) || resp_headers.contains_key(header::LAST_MODIFIED);
    match lifetime {
        // Storing what is stale at once only pays when it can be validated or served stale.
        Some(l) if !l.is_zero() || validator || resp_cc.stale_if_error.is_some() => Ok(()),
        Some(_) => Err("expired"),
        // §3: `no-cache` responses may be stored; worth it when they can be validated.
        None if resp_cc.no_cache && validator => Ok(()),
        None => Err("no-freshness"),
    }
}

/// Is there explicit freshness information (`s-maxage`, `max-age`, `Expires`)?
#[must_use]
pub fn has_explicit_freshness(headers: &HeaderMap, cc: &CacheControl) -> bool {
    cc.s_maxage.is_some() || cc.max_age.is_some() || headers.contains_key(header::EXPIRES)
}

/// The freshness lifetime of a response (§4.2.1): `s-maxage`, else `max-age`, else
/// `Expires - Date` (an invalid `Expires` is in the past), else the heuristic of §4.2.2
/// when the status is heuristically cacheable or the response is `public`, and it has
/// `Last-Modified`. `None` when nothing gives a lifetime.
#[must_use]
pub fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    cc: &CacheControl,
) -> Option<Duration> {
    if let Some(s) = cc.s_maxage {
        return Some(Duration::from_secs(s));
    }
    if let Some(m) = cc.max_age {
        return Some(Duration::from_secs(m));
    }
    if headers.contains_key(header::EXPIRES) && !cc.targeted {
        let expires = date_header(headers, &header::EXPIRES);
        let date = date_header(headers, &header::DATE);
        return Some(match (expires, date) {
            (Some(e), Some(d)) => e.duration_since(d).unwrap_or(Duration::ZERO),
            // Without Date the cache adds one when storing; until then nothing is fresh.
            _ => Duration::ZERO,
        });
    }
    if !(heuristically_cacheable(status) || cc.public) {
        return None;
    }
    let last_modified = date_header(headers, &header::LAST_MODIFIED)?;
    let date = date_header(headers, &header::DATE)?;
    let since = date.duration_since(last_modified).unwrap_or(Duration::ZERO);
    Some((since / 10).min(HEURISTIC_MAX))
}

/// Whole seconds since the epoch (HTTP dates have no finer resolution).
fn whole_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The `Age` of a response: the first member of its first line (§5.1: a list-based
/// value uses its first member), `None` when absent or invalid.
#[must_use]
pub fn age_value(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(header::AGE)?.to_str().ok()?;
    parse_delta(v.split(',').next().unwrap_or(v))
}

/// `corrected_initial_age` of RFC 9111 §4.2.3: the age the response had when it
/// arrived, from its `Age` and `Date` and the times the request was sent
/// (`request_time`) and the response received (`response_time`).
#[must_use]
pub fn corrected_initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let age_value = age_value(headers).unwrap_or(0);
    // Date has one-second resolution: compare it with the response time in whole seconds
    // so that a response is not up to a second old on arrival.
    let apparent_age = date_header(headers, &header::DATE).map_or(0, |d| {
        whole_secs(response_time).saturating_sub(whole_secs(d))
    });
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    let corrected_age_value = Duration::from_secs(age_value).saturating_add(response_delay);
    corrected_age_value.max(Duration::from_secs(apparent_age))
}

/// `current_age` of §4.2.3: the initial age plus the time resident in the cache.
#[must_use]
pub fn current_age(initial_age: Duration, response_time: SystemTime, now: SystemTime) -> Duration {
    initial_age.saturating_add(now.duration_since(response_time).unwrap_or(Duration::ZERO))
}

/// How a stored response may be used for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh and acceptable: serve it.
    Fresh,
    /// Stale, but within `stale-while-revalidate`: serve it and refresh in the background.
    StaleWhileRevalidate,
    /// Stale, but the request's `max-stale` accepts it.
    MaxStale,
    /// It must be validated (or fetched anew) before use.
    Validate,
}

/// Decide how a stored response with the given freshness `lifetime` and current `age`
/// may satisfy a request (§4.2.4, §5.2.1, §5.2.2, RFC 5861 §3).
///
/// A response's `no-cache` and a request's `no-cache` / `max-age=0` force validation;
/// `must-revalidate` / `proxy-revalidate` forbid serving it stale. `s-maxage` implies
/// `proxy-revalidate` (§5.2.2.10) unless the response explicitly allows
/// `stale-while-revalidate`.
#[must_use]
pub fn reuse(req: &CacheControl, resp: &CacheControl, lifetime: Duration, age: Duration) -> Reuse {
    if resp.no_cache || req.no_cache {
        return Reuse::Validate;
    }
    if req
        .max_age
        .is_some_and(|m| m == 0 || age > Duration::from_secs(m))
    {
        return Reuse::Validate;
    }
    if lifetime > age {
        if req
            .min_fresh
            .is_some_and(|m| lifetime - age < Duration::from_secs(m))
        {
            return Reuse::Validate;
        }
        return Reuse::Fresh;
    }
    if resp.must_revalidate || resp.proxy_revalidate {
        return Reuse::Validate;
    }
    let staleness = age - lifetime;
    if resp
        .stale_while_revalidate
        .is_some_and(|swr| staleness <= Duration::from_secs(swr))
    {
        return Reuse::StaleWhileRevalidate;
    }
    if resp.s_maxage.is_some() {
        return Reuse::Validate;
    }
    match req.max_stale {
        Some(None) => Reuse::MaxStale,
        Some(Some(s)) if staleness <= Duration::from_secs(s) => Reuse::MaxStale,
        _ => Reuse::Validate,
    }
}

/// May a stored response be served when the upstream failed (RFC 5861 §4)? The window
/// is the larger of the request's and the response's `stale-if-error`;
/// `must-revalidate` / `proxy-revalidate` forbid it (§5.2.2.2).
#[must_use]
pub fn stale_if_error_ok(
    req: &CacheControl,
    resp: &CacheControl,
    lifetime: Duration,
    age: Duration,
) -> bool {
    if resp.must_revalidate || resp.proxy_revalidate {
        return false;
    }
    let window = match (req.stale_if_error, resp.stale_if_error) {
        (Some(a), Some(b)) => a.max(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return false,
    };
    age.saturating_sub(lifetime) <= Duration::from_secs(window)
}

/// May a stale stored response be served because the upstream could not be reached
/// at all (connect failure, reset, timeout, closed without a response: "disconnected"
/// in §4.2.4), at most `limit` past its freshness? Not when the response forbids serving
/// it stale (`must-revalidate`, `proxy-revalidate`, `s-maxage` (§5.2.2.10), `no-cache`)
/// or the request asks for validation (`no-cache`) or bounds the age (`max-age`).
#[must_use]
pub fn stale_if_unreachable_ok(
    req: &CacheControl,
    resp: &CacheControl,
    lifetime: Duration,
    age: Duration,
    limit: Duration,
) -> bool {
    if limit.is_zero()
        || resp.must_revalidate
        || resp.proxy_revalidate
        || resp.s_maxage.is_some()
        || resp.no_cache
        || req.no_cache
        || req.max_age.is_some()
    {
        return false;
    }
    age.saturating_sub(lifetime) <= limit
}

/// Conditional request header fields a cache replaces with its own validators.
const CONDITIONALS: [HeaderName; 2] = [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE];

/// Remove the client's `If-None-Match` / `If-Modified-Since` (the cache wants a full
/// response it can store, and answers the client's condition itself).
pub fn strip_conditionals(req: &mut HeaderMap) {
    for name in &CONDITIONALS {
        req.remove(name);
    }
}

/// Add the stored response's validators to a request (§4.3.1): `If-None-Match` from
/// `ETag`, `If-Modified-Since` from `Last-Modified`. Returns whether any was added.
pub fn add_validators(req: &mut HeaderMap, stored: &HeaderMap) -> bool {
    let mut added = false;
    if let Some(etag) = stored.get(header::ETAG) {
        req.insert(header::IF_NONE_MATCH, etag.clone());
        added = true;
    }
    if let Some(lm) = stored.get(header::LAST_MODIFIED) {
        if date_header(stored, &header::LAST_MODIFIED).is_some() {
            req.insert(header::IF_MODIFIED_SINCE, lm.clone());
            added = true;
        }
    }
    added
}

/// Does a stored response have a validator?
#[must_use]
pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || date_header(headers, &header::LAST_MODIFIED).is_some()
}

/// Header fields a 304 never replaces in the stored response (§3.2): hop-by-hop fields
/// (§3.1), `Content-Length`, and the content metadata the stored body depends on.
fn kept_on_update(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "content-length"
            | "content-encoding"
            | "content-range"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
    )
}

/// The stored header fields updated with a 304's (§3.2, §4.3.4): every field the 304
/// carries replaces the stored field of that name, except those of [`kept_on_update`].
#[must_use]
pub fn merge_304(stored: &HeaderMap, fresh: &HeaderMap) -> HeaderMap {
    let mut merged = stored.clone();
    for name in fresh.keys() {
        if kept_on_update(name) {
            continue;
        }
        merged.remove(name);
        for v in fresh.get_all(name) {
            merged.append(name.clone(), v.clone());
        }
    }
    merged
}

/// May a `200` answer to a HEAD update the stored GET response with `stored` fields
/// (§4.3.5)? Yes when every validator the HEAD response carries (`ETag`,
/// `Last-Modified`) equals the stored one, and its `Content-Length`, if any, equals the
/// stored body's; otherwise the stored response is out of date and must not be served
/// without validation.
#[must_use]
pub fn head_matches(stored: &HeaderMap, head: &HeaderMap) -> bool {
    let same = |name: &HeaderName| match head.get(name) {
        None => true,
        Some(v) => stored
            .get(name)
            .is_some_and(|s| s.as_bytes().trim_ascii() == v.as_bytes().trim_ascii()),
    };
    same(&header::ETAG) && same(&header::LAST_MODIFIED) && same(&header::CONTENT_LENGTH)
}

/// The opaque part of an entity tag (without `W/`), for weak comparison.
fn opaque_tag(tag: &str) -> &str {
    let tag = tag.trim();
    tag.strip_prefix("W/").unwrap_or(tag)
}

/// Does the client's conditional GET/HEAD evaluate to "not modified" against a
/// response with `resp` headers (RFC 9110 §13.1.2, §13.1.3, §13.2.2)? `If-None-Match`
/// (weak comparison, `*` matches any) takes precedence over `If-Modified-Since`.
#[must_use]
pub fn not_modified(req: &HeaderMap, resp: &HeaderMap) -> bool {
    if req.contains_key(header::IF_NONE_MATCH) {
        let Some(etag) = resp.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let etag = opaque_tag(etag);
        return req
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(split_list)
            .any(|t| t == "*" || opaque_tag(t) == etag);
    }
    let Some(since) = date_header(req, &header::IF_MODIFIED_SINCE) else {
        return false;
    };
    // RFC 9111 §4.3.2: without Last-Modified, the response's Date stands for it.
    date_header(resp, &header::LAST_MODIFIED)
        .or_else(|| date_header(resp, &header::DATE))
        .is_some_and(|modified| modified <= since)
}

/// The header fields of a 304 answered from a stored response (RFC 9110 §15.4.5).
#[must_use]
pub fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::LAST_MODIFIED,
        header::VARY,
        header::AGE,
    ] {
        for v in stored.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// The path-and-query of a `Location` / `Content-Location` value when it refers to
/// `host` (relative references and absolute URIs of the same authority), for
/// invalidation (§4.4).
#[must_use]
pub fn same_host_path(value: &HeaderValue, host: &str) -> Option<String> {
    let s = value.to_str().ok()?.trim();
    if s.starts_with('/') && !s.starts_with("//") {
        let uri: http::Uri = s.parse().ok()?;
        return uri.path_and_query().map(|pq| pq.as_str().to_owned());
    }
    let uri: http::Uri = s.parse().ok()?;
    uri.scheme()?;
    let authority = uri.authority()?;
    if !authority.as_str().eq_ignore_ascii_case(host) {
        return None;
    }
    Some(
        uri.path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned()),
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A header map from name/value pairs (also used by `range`'s tests).
    pub(in crate::l7::cache) fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn cc(v: &str) -> CacheControl {
        CacheControl::parse(&hm(&[("cache-control", v)]))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn t(s: u64) -> SystemTime {
        UNIX_EPOCH + secs(1_700_000_000 + s)
    }

    fn date(s: u64) -> String {
        httpdate::fmt_http_date(t(s))
    }

    #[test]
    fn parses_directives() {
        let c = cc(
            r#"Public, MAX-AGE=60, s-maxage="120", no-cache="set-cookie", stale-while-revalidate=5, stale-if-error=7, x-ext="a,b", must-revalidate"#,
        );
        assert!(c.public && c.no_cache && c.must_revalidate);
        assert_eq!(c.max_age, Some(60));
        assert_eq!(c.s_maxage, Some(120));
        assert_eq!(c.stale_while_revalidate, Some(5));
        assert_eq!(c.stale_if_error, Some(7));
        assert!(!c.private && !c.no_store);
    }

    #[test]
    fn combines_lines_and_keeps_lowest_duplicate() {
        let c = CacheControl::parse(&hm(&[
            ("cache-control", "max-age=60"),
            ("cache-control", "private, max-age=30"),
        ]));
        assert!(c.private);
        assert_eq!(c.max_age, Some(30));
    }

    #[test]
    fn malformed_values_do_not_panic() {
        assert_eq!(cc("max-age=abc").max_age, Some(0));
        assert_eq!(cc("max-age=").max_age, Some(0));
        assert_eq!(cc("max-age=-5").max_age, Some(0));
        assert_eq!(cc("s-maxage=1.5").s_maxage, Some(0));
        assert_eq!(
            cc("max-age=99999999999999999999999").max_age,
            Some(DELTA_MAX)
        );
        assert_eq!(cc("stale-while-revalidate=x").stale_while_revalidate, None);
        assert_eq!(cc("max-stale=x").max_stale, None);
        assert_eq!(cc("max-stale").max_stale, Some(None));
        assert_eq!(cc(",,, ,=,\"").max_age, None);
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_bytes(b"max-age=\xff").unwrap(),
        );
        assert_eq!(CacheControl::parse(&h), CacheControl::default());
    }

    #[test]
    fn pragma_no_cache_only_without_cache_control() {
        assert!(CacheControl::parse_request(&hm(&[("pragma", "no-cache")])).no_cache);
        assert!(
            !CacheControl::parse_request(&hm(&[
                ("pragma", "no-cache"),
                ("cache-control", "max-age=5")
            ]))
            .no_cache
        );
    }

    fn store_ok(
        req: &[(&str, &str)],
        status: u16,
        resp: &[(&str, &str)],
    ) -> Result<(), &'static str> {
        let (rq, rs) = (hm(req), hm(resp));
        storable(
            &Method::GET,
            &rq,
            &CacheControl::parse_request(&rq),
            StatusCode::from_u16(status).unwrap(),
            &rs,
            &CacheControl::parse(&rs),
        )
    }

    #[test]
    fn storability() {
        let d = date(0);
        assert_eq!(
            store_ok(&[], 200, &[("cache-control", "max-age=60")]),
            Ok(())
        );
        assert_eq!(store_ok(&[], 200, &[]), Err("no-freshness"));
        assert_eq!(
            store_ok(&[], 206, &[("cache-control", "max-age=60")]),
            Err("status")
        );
        // RFC 9111 §3: an unknown final status with explicit freshness may be stored
        // (was Err("status") before issue 13 item 4; 304 is the code never stored)
        assert_eq!(
            store_ok(&[], 299, &[("cache-control", "max-age=60")]),
            Ok(())
        );
        assert_eq!(
            store_ok(&[], 304, &[("cache-control", "max-age=60")]),
            Err("status")
        );
        assert_eq!(
            store_ok(
                &[("cache-control", "no-store")],
                200,
                &[("cache-control", "max-age=60")]
            ),
            Err("no-store")
        );
        assert_eq!(
            store_ok(&[], 200, &[("cache-control", "max-age=60, no-store")]),
            Err("no-store")
        );
        assert_eq!(
            store_ok(&[], 200, &[("cache-control", "private, max-age=60")]),
            Err("private")
        );
        assert_eq!(
            store_ok(
                &[],
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")]
            ),
            Err("set-cookie")
        );
        assert_eq!(
            store_ok(
                &[],
                200,
                &[("cache-control", "max-age=60"), ("vary", "accept, *")]
            ),
            Err("vary-star")
        );
        // Authorization: only with public, s-maxage or must-revalidate.
        let auth = [("authorization", "Bearer x")];
        assert_eq!(
            store_ok(&auth, 200, &[("cache-control", "max-age=60")]),
            Err("authorization")
        );
        assert_eq!(
            store_ok(&auth, 200, &[("cache-control", "public, max-age=60")]),
            Ok(())
        );
        assert_eq!(
            store_ok(&auth, 200, &[("cache-control", "s-maxage=60")]),
            Ok(())
        );
        assert_eq!(
            store_ok(
                &auth,
                200,
                &[("cache-control", "max-age=60, must-revalidate")]
            ),
            Ok(())
        );
        // Heuristic: cacheable status (or public) and Last-Modified.
        assert_eq!(
            store_ok(&[], 200, &[("date", &d), ("last-modified", &date(0))]),
            Ok(())
        );
        assert_eq!(
            store_ok(&[], 302, &[("date", &d), ("last-modified", &date(0))]),
            Err("no-freshness")
        );
        assert_eq!(
            store_ok(
                &[],
                302,
                &[
                    ("date", &d),
                    ("last-modified", &date(0)),
                    ("cache-control", "public")
                ]
            ),
            Ok(())
        );
        assert_eq!(
            store_ok(&[], 302, &[("cache-control", "max-age=5")]),
            Ok(())
        );
        // Expires in the past without a validator is pointless; with one it is kept.
        assert_eq!(store_ok(&[], 200, &[("expires", "0")]), Err("expired"));
        assert_eq!(
            store_ok(&[], 200, &[("expires", "0"), ("etag", "\"a\"")]),
            Ok(())
        );
        // no-cache with a validator: storable, always validated.
        assert_eq!(
            store_ok(
                &[],
                200,
                &[("cache-control", "no-cache"), ("etag", "\"a\"")]
            ),
            Ok(())
        );
        // not GET
        let rs = hm(&[("cache-control", "max-age=60")]);
        assert_eq!(
            storable(
                &Method::HEAD,
                &HeaderMap::new(),
                &CacheControl::default(),
                StatusCode::OK,
                &rs,
                &CacheControl::parse(&rs)
            ),
            Err("method")
        );
    }

    fn lifetime(status: u16, resp: &[(&str, &str)]) -> Option<Duration> {
        let h = hm(resp);
        freshness_lifetime(
            StatusCode::from_u16(status).unwrap(),
            &h,
            &CacheControl::parse(&h),
        )
    }

    #[test]
    fn freshness_lifetime_precedence() {
        let all = [
            ("cache-control", "max-age=60, s-maxage=120"),
            ("expires", &date(1000)),
            ("date", &date(0)),
        ];
        assert_eq!(lifetime(200, &all), Some(secs(120)));
        assert_eq!(
            lifetime(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("expires", &date(1000)),
                    ("date", &date(0))
                ]
            ),
            Some(secs(60))
        );
        assert_eq!(
            lifetime(200, &[("expires", &date(1000)), ("date", &date(0))]),
            Some(secs(1000))
        );
        assert_eq!(
            lifetime(200, &[("expires", &date(0)), ("date", &date(1000))]),
            Some(secs(0))
        );
        assert_eq!(
            lifetime(200, &[("expires", "garbage"), ("date", &date(0))]),
            Some(secs(0))
        );
        assert_eq!(
            lifetime(200, &[("cache-control", "max-age=bogus")]),
            Some(secs(0))
        );
    }

    #[test]
    fn heuristic_freshness() {
        // 10% of Date - Last-Modified
        assert_eq!(
            lifetime(200, &[("date", &date(10_000)), ("last-modified", &date(0))]),
            Some(secs(1000))
        );
        // capped at 24 h
        assert_eq!(
            lifetime(
                404,
                &[("date", &date(10_000_000)), ("last-modified", &date(0))]
            ),
            Some(HEURISTIC_MAX)
        );
        // not for 302 unless public
        assert_eq!(
            lifetime(302, &[("date", &date(10_000)), ("last-modified", &date(0))]),
            None
        );
        assert_eq!(
            lifetime(
                302,
                &[
                    ("date", &date(10_000)),
                    ("last-modified", &date(0)),
                    ("cache-control", "public")
                ]
            ),
            Some(secs(1000))
        );
        // Last-Modified in the future: zero
        assert_eq!(
            lifetime(200, &[("date", &date(0)), ("last-modified", &date(50))]),
            Some(secs(0))
        );
        assert_eq!(lifetime(200, &[("date", &date(0))]), None);
    }

    #[test]
    fn age_calculation() {
        // Age header plus response delay
        let h = hm(&[("age", "30"), ("date", &date(100))]);
        assert_eq!(corrected_initial_age(&h, t(100), t(102)), secs(32));
        // apparent age (clock: Date 50 s before the response arrived) wins when larger
        let h = hm(&[("age", "10"), ("date", &date(50))]);
        assert_eq!(corrected_initial_age(&h, t(100), t(100)), secs(50));
        // Date in the future: apparent age 0
        let h = hm(&[("date", &date(500))]);
        assert_eq!(corrected_initial_age(&h, t(100), t(100)), secs(0));
        // invalid Age ignored
        let h = hm(&[("age", "x"), ("date", &date(100))]);
        assert_eq!(corrected_initial_age(&h, t(100), t(100)), secs(0));
        // sub-second response time within the Date's second: age 0
        let h = hm(&[("date", &date(100))]);
        let rt = t(100) + Duration::from_millis(900);
        assert_eq!(corrected_initial_age(&h, rt, rt), secs(0));
        assert_eq!(current_age(secs(5), t(100), t(110)), secs(15));
        assert_eq!(current_age(secs(5), t(100), t(90)), secs(5));
    }

    #[test]
    fn reuse_decisions() {
        let none = CacheControl::default();
        let r =
            |req: &str, resp: &str, l: u64, a: u64| reuse(&cc(req), &cc(resp), secs(l), secs(a));
        assert_eq!(r("", "max-age=60", 60, 10), Reuse::Fresh);
        assert_eq!(r("", "max-age=60", 60, 60), Reuse::Validate);
        assert_eq!(r("", "no-cache", 60, 0), Reuse::Validate);
        assert_eq!(r("no-cache", "", 60, 0), Reuse::Validate);
        assert_eq!(r("max-age=0", "", 60, 0), Reuse::Validate);
        assert_eq!(r("max-age=5", "", 60, 10), Reuse::Validate);
        assert_eq!(r("max-age=15", "", 60, 10), Reuse::Fresh);
        assert_eq!(r("min-fresh=55", "", 60, 10), Reuse::Validate);
        assert_eq!(r("min-fresh=5", "", 60, 10), Reuse::Fresh);
        assert_eq!(
            r("", "stale-while-revalidate=30", 60, 80),
            Reuse::StaleWhileRevalidate
        );
        assert_eq!(r("", "stale-while-revalidate=30", 60, 100), Reuse::Validate);
        assert_eq!(
            r("", "stale-while-revalidate=30, must-revalidate", 60, 80),
            Reuse::Validate
        );
        assert_eq!(
            r("", "stale-while-revalidate=30, proxy-revalidate", 60, 80),
            Reuse::Validate
        );
        assert_eq!(
            r("", "stale-while-revalidate=30, no-cache", 60, 80),
            Reuse::Validate
        );
        assert_eq!(
            r("", "s-maxage=60, stale-while-revalidate=30", 60, 80),
            Reuse::StaleWhileRevalidate
        );
        assert_eq!(r("max-stale", "", 60, 1000), Reuse::MaxStale);
        assert_eq!(r("max-stale=10", "", 60, 65), Reuse::MaxStale);
        assert_eq!(r("max-stale=10", "", 60, 75), Reuse::Validate);
        assert_eq!(r("max-stale", "s-maxage=60", 60, 65), Reuse::Validate);
        assert_eq!(r("max-stale", "must-revalidate", 60, 65), Reuse::Validate);
        assert_eq!(reuse(&none, &none, secs(0), secs(0)), Reuse::Validate);
    }

    #[test]
    fn stale_if_error_window() {
        let s = |req: &str, resp: &str, l: u64, a: u64| {
            stale_if_error_ok(&cc(req), &cc(resp), secs(l), secs(a))
        };
        assert!(s("", "stale-if-error=60", 10, 50));
        assert!(!s("", "stale-if-error=60", 10, 80));
        assert!(s("stale-if-error=100", "stale-if-error=60", 10, 80));
        assert!(s("stale-if-error=100", "", 10, 80));
        assert!(!s("", "", 10, 11));
        assert!(!s("", "stale-if-error=60, must-revalidate", 10, 20));
        assert!(!s("", "stale-if-error=60, proxy-revalidate", 10, 20));
        assert!(s("", "stale-if-error=60, no-cache", 10, 20));
        // fresh but validation forced: allowed
        assert!(s("", "stale-if-error=0, no-cache", 60, 20));
    }

    #[test]
    fn vary_parsing_and_values() {
        assert_eq!(Vary::parse(&hm(&[])), Vary::Fields(vec![]));
        assert_eq!(
            Vary::parse(&hm(&[
                ("vary", "Accept-Encoding, accept-language"),
                ("vary", "accept-encoding")
            ])),
            Vary::Fields(vec![header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE])
        );
        assert_eq!(Vary::parse(&hm(&[("vary", "a, *")])), Vary::Star);
        let a = hm(&[
            ("accept-encoding", "gzip ,  br"),
            ("accept-encoding", "zstd"),
        ]);
        let b = hm(&[("accept-encoding", "gzip, br, zstd")]);
        assert_eq!(
            vary_value(&a, &header::ACCEPT_ENCODING),
            vary_value(&b, &header::ACCEPT_ENCODING)
        );
        assert_ne!(
            vary_value(
                &hm(&[("accept-encoding", "gzip")]),
                &header::ACCEPT_ENCODING
            ),
            vary_value(&b, &header::ACCEPT_ENCODING)
        );
        assert_eq!(vary_value(&b, &header::ACCEPT_LANGUAGE), None);
        assert_eq!(
            vary_value(&hm(&[("accept-language", "")]), &header::ACCEPT_LANGUAGE),
            Some(String::new())
        );
    }

    #[test]
    fn validators_and_conditionals() {
        let stored = hm(&[("etag", "\"v1\""), ("last-modified", &date(0))]);
        let mut req = hm(&[
            ("if-none-match", "\"client\""),
            ("if-modified-since", &date(5)),
            ("accept", "*/*"),
        ]);
        strip_conditionals(&mut req);
        assert!(
            !req.contains_key(header::IF_NONE_MATCH)
                && !req.contains_key(header::IF_MODIFIED_SINCE)
        );
        assert!(add_validators(&mut req, &stored));
        assert_eq!(req.get(header::IF_NONE_MATCH).unwrap(), "\"v1\"");
        assert_eq!(
            req.get(header::IF_MODIFIED_SINCE).unwrap(),
            date(0).as_str()
        );
        let mut req = HeaderMap::new();
        assert!(!add_validators(
            &mut req,
            &hm(&[("last-modified", "nonsense")])
        ));
        assert!(req.is_empty());
        assert!(has_validator(&stored));
        assert!(!has_validator(&hm(&[("last-modified", "nonsense")])));
    }

    #[test]
    fn client_conditionals() {
        let resp = hm(&[("etag", "W/\"v1\""), ("last-modified", &date(100))]);
        assert!(not_modified(
            &hm(&[("if-none-match", "\"v0\", \"v1\"")]),
            &resp
        ));
        assert!(not_modified(&hm(&[("if-none-match", "*")]), &resp));
        assert!(!not_modified(&hm(&[("if-none-match", "\"v2\"")]), &resp));
        // If-None-Match takes precedence over If-Modified-Since
        assert!(!not_modified(
            &hm(&[
                ("if-none-match", "\"v2\""),
                ("if-modified-since", &date(200))
            ]),
            &resp
        ));
        assert!(not_modified(
            &hm(&[("if-modified-since", &date(100))]),
            &resp
        ));
        assert!(!not_modified(
            &hm(&[("if-modified-since", &date(50))]),
            &resp
        ));
        assert!(!not_modified(&hm(&[("if-modified-since", "bad")]), &resp));
        assert!(!not_modified(&HeaderMap::new(), &resp));
        let nm = not_modified_headers(&hm(&[
            ("etag", "\"a\""),
            ("content-type", "text/plain"),
            ("cache-control", "max-age=1"),
        ]));
        assert!(nm.contains_key(header::ETAG) && nm.contains_key(header::CACHE_CONTROL));
        assert!(!nm.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn merge_304_updates_but_keeps_content_metadata() {
        let stored = hm(&[
            ("content-length", "5"),
            ("content-encoding", "gzip"),
            ("content-type", "text/plain"),
            ("cache-control", "max-age=1"),
            ("etag", "\"v1\""),
            ("x-a", "1"),
            ("x-a", "2"),
        ]);
        let fresh = hm(&[
            ("content-length", "0"),
            ("content-encoding", "br"),
            ("cache-control", "max-age=100"),
            ("x-a", "3"),
            ("x-new", "n"),
            ("date", &date(5)),
        ]);
        let m = merge_304(&stored, &fresh);
        assert_eq!(m.get("content-length").unwrap(), "5");
        assert_eq!(m.get("content-encoding").unwrap(), "gzip");
        assert_eq!(m.get("content-type").unwrap(), "text/plain");
        assert_eq!(m.get("cache-control").unwrap(), "max-age=100");
        assert_eq!(m.get_all("x-a").iter().collect::<Vec<_>>(), vec!["3"]);
        assert_eq!(m.get("x-new").unwrap(), "n");
        assert_eq!(m.get("etag").unwrap(), "\"v1\"");
        assert_eq!(m.get("date").unwrap(), date(5).as_str());
    }

    fn targeted(resp: &[(&str, &str)]) -> CacheControl {
        CacheControl::parse_response(&hm(resp), &[HeaderName::from_static("cdn-cache-control")])
    }

    #[test]
    fn targeted_field_overrides_cache_control_and_expires() {
        // RFC 9213 §2.2: the targeted field wins over Cache-Control ...
        let c = targeted(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=10000"),
        ]);
        assert!(c.targeted && !c.no_store);
        assert_eq!(c.max_age, Some(10000));
        let c = targeted(&[
            ("cache-control", "max-age=3600"),
            ("cdn-cache-control", "max-age=1"),
        ]);
        assert_eq!(c.max_age, Some(1));
        // ... and over Expires: max-age=0 with a future Expires is stale
        let h = hm(&[
            ("cdn-cache-control", "max-age=0"),
            ("expires", &date(10_000)),
            ("date", &date(0)),
        ]);
        let c = targeted(&[
            ("cdn-cache-control", "max-age=0"),
            ("expires", &date(10_000)),
            ("date", &date(0)),
        ]);
        assert_eq!(freshness_lifetime(StatusCode::OK, &h, &c), Some(secs(0)));
        // a past or invalid Expires does not shorten a targeted max-age
        let h = hm(&[("cdn-cache-control", "max-age=3600"), ("expires", "0")]);
        let c = CacheControl::parse_response(&h, &[HeaderName::from_static("cdn-cache-control")]);
        assert_eq!(freshness_lifetime(StatusCode::OK, &h, &c), Some(secs(3600)));
        // flags, extensions ignored, huge values saturate
        let c = targeted(&[(
            "cdn-cache-control",
            "private, no-cache, foobar, max-age=99999999999",
        )]);
        assert!(c.private && c.no_cache);
        assert_eq!(c.max_age, Some(DELTA_MAX));
        let c = targeted(&[("cdn-cache-control", "no-store")]);
        assert!(c.no_store);
    }

    #[test]
    fn invalid_or_absent_targeted_field_falls_back_to_cache_control() {
        for bad in ["max-age=10000, &&&&&", "", "MaX-aGe=3600", "max-age =100"] {
            let c = targeted(&[("cdn-cache-control", bad), ("cache-control", "no-store")]);
            assert!(!c.targeted && c.no_store, "{bad:?}");
        }
        // a value of the wrong type ignores the directive, not the field
        let c = targeted(&[
            ("cdn-cache-control", r#"max-age="10000""#),
            ("cache-control", "max-age=5"),
        ]);
        assert!(c.targeted);
        assert_eq!(c.max_age, None);
        let c = targeted(&[("cdn-cache-control", "max-age=-5, s-maxage=2.5")]);
        assert_eq!((c.max_age, c.s_maxage), (None, None));
        // lines are combined into one dictionary
        let c = targeted(&[
            ("cdn-cache-control", "max-age=60"),
            ("cdn-cache-control", "must-revalidate"),
        ]);
        assert!(c.must_revalidate);
        assert_eq!(c.max_age, Some(60));
        // without targets only Cache-Control counts
        let h = hm(&[
            ("cdn-cache-control", "max-age=60"),
            ("cache-control", "max-age=1"),
        ]);
        assert_eq!(CacheControl::parse_response(&h, &[]).max_age, Some(1));
    }

    #[test]
    fn first_valid_target_wins() {
        let targets = [
            HeaderName::from_static("xdplb-cache-control"),
            HeaderName::from_static("cdn-cache-control"),
        ];
        let h = hm(&[
            ("cdn-cache-control", "max-age=60"),
            ("xdplb-cache-control", "max-age=5"),
        ]);
        assert_eq!(CacheControl::parse_response(&h, &targets).max_age, Some(5));
        // an invalid first one is as if absent
        let h = hm(&[
            ("cdn-cache-control", "max-age=60"),
            ("xdplb-cache-control", "max-age=5, ((("),
        ]);
        assert_eq!(CacheControl::parse_response(&h, &targets).max_age, Some(60));
    }

    #[test]
    fn unknown_final_status_codes_and_must_understand() {
        for code in [299, 499, 599] {
            assert_eq!(
                store_ok(&[], code, &[("cache-control", "max-age=60")]),
                Ok(())
            );
            // but not heuristically
            assert_eq!(
                store_ok(
                    &[],
                    code,
                    &[("date", &date(100)), ("last-modified", &date(0))]
                ),
                Err("no-freshness")
            );
            assert_eq!(
                store_ok(
                    &[],
                    code,
                    &[("cache-control", "max-age=60, no-store, must-understand")]
                ),
                Err("must-understand")
            );
        }
        // must-understand with a known status overrides no-store
        assert_eq!(
            store_ok(
                &[],
                200,
                &[("cache-control", "max-age=60, no-store, must-understand")]
            ),
            Ok(())
        );
        // ... not the request's no-store
        assert_eq!(
            store_ok(
                &[("cache-control", "no-store")],
                200,
                &[("cache-control", "max-age=60, no-store, must-understand")]
            ),
            Err("no-store")
        );
        for code in [206, 304, 100, 101] {
            assert_eq!(
                store_ok(&[], code, &[("cache-control", "max-age=60")]),
                Err("status"),
                "{code}"
            );
        }
    }

    #[test]
    fn age_list_uses_its_first_member() {
        assert_eq!(age_value(&hm(&[("age", "7200, 0")])), Some(7200));
        assert_eq!(age_value(&hm(&[("age", "0, 7200")])), Some(0));
        assert_eq!(age_value(&hm(&[("age", " 30 ")])), Some(30));
        assert_eq!(age_value(&hm(&[("age", "3s")])), None);
        assert_eq!(age_value(&hm(&[])), None);
        let h = hm(&[("age", "7200, 0"), ("date", &date(100))]);
        assert_eq!(corrected_initial_age(&h, t(100), t(100)), secs(7200));
    }

    #[test]
    fn stale_when_unreachable_unless_forbidden() {
        let s = |req: &str, resp: &str, l: u64, a: u64, limit: u64| {
            stale_if_unreachable_ok(&cc(req), &cc(resp), secs(l), secs(a), secs(limit))
        };
        assert!(s("", "max-age=2", 2, 10, 60));
        assert!(!s("", "max-age=2", 2, 100, 60), "past the limit");
        assert!(!s("", "max-age=2", 2, 10, 0), "off");
        for forbids in [
            "must-revalidate",
            "proxy-revalidate",
            "no-cache",
            "s-maxage=2",
        ] {
            assert!(
                !s("", &format!("max-age=2, {forbids}"), 2, 10, 60),
                "{forbids}"
            );
        }
        assert!(!s("no-cache", "max-age=2", 2, 10, 60));
        assert!(!s("max-age=5", "max-age=2", 2, 10, 60));
    }

    #[test]
    fn head_updates_only_with_matching_validators_and_length() {
        let stored = hm(&[
            ("etag", "\"v1\""),
            ("last-modified", &date(0)),
            ("content-length", "11"),
        ]);
        assert!(head_matches(&stored, &hm(&[])));
        assert!(head_matches(
            &stored,
            &hm(&[("etag", "\"v1\""), ("content-length", "11")])
        ));
        assert!(head_matches(&stored, &hm(&[("last-modified", &date(0))])));
        assert!(!head_matches(&stored, &hm(&[("etag", "\"v2\"")])));
        assert!(!head_matches(&stored, &hm(&[("last-modified", &date(1))])));
        assert!(!head_matches(&stored, &hm(&[("content-length", "12")])));
        // a validator the stored response lacks cannot match
        assert!(!head_matches(
            &hm(&[("content-length", "11")]),
            &hm(&[("etag", "\"v1\"")])
        ));
    }

    #[test]
    fn dates_are_matched_case_insensitively() {
        let want = httpdate::parse_http_date("Thu, 18 Aug 2050 02:01:18 GMT").ok();
        for v in [
            "Thu, 18 Aug 2050 02:01:18 GMT",
            "THU, 18 Aug 2050 02:01:18 GMT",
            "Thu, 18 AUG 2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:18 gMT",
            " thursday, 18-aug-50 02:01:18 gmt ",
        ] {
            assert_eq!(parse_date(v), want, "{v}");
        }
        assert_eq!(parse_date("foo"), None);
        assert_eq!(parse_date("Thu, 18 Aug 2050 02:01:18 UTC"), None);
    }

    #[test]
    fn missing_or_invalid_date_is_the_receipt_time() {
        let mut h = hm(&[("date", "foo"), ("expires", &date(10))]);
        ensure_date(&mut h, t(0));
        assert_eq!(h.get("date").unwrap(), date(0).as_str());
        let cc = CacheControl::parse(&h);
        assert_eq!(freshness_lifetime(StatusCode::OK, &h, &cc), Some(secs(10)));
        let mut h = hm(&[("date", &date(5))]);
        ensure_date(&mut h, t(0));
        assert_eq!(
            h.get("date").unwrap(),
            date(5).as_str(),
            "a valid Date is kept"
        );
    }

    #[test]
    fn if_modified_since_uses_date_without_last_modified() {
        let resp = hm(&[("date", &date(100))]);
        assert!(not_modified(
            &hm(&[("if-modified-since", &date(100))]),
            &resp
        ));
        assert!(!not_modified(
            &hm(&[("if-modified-since", &date(99))]),
            &resp
        ));
    }

    #[test]
    fn invalidation_uris() {
        let v = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(
            same_host_path(&v("/a/b?c=1"), "ex.com"),
            Some("/a/b?c=1".into())
        );
        assert_eq!(
            same_host_path(&v("http://EX.com/x"), "ex.com"),
            Some("/x".into())
        );
        assert_eq!(
            same_host_path(&v("https://ex.com:8443/x"), "ex.com:8443"),
            Some("/x".into())
        );
        assert_eq!(same_host_path(&v("http://other.com/x"), "ex.com"), None);
        assert_eq!(same_host_path(&v("//ex.com/x"), "ex.com"), None);
        assert_eq!(same_host_path(&v("relative/x"), "ex.com"), None);
        assert_eq!(
            same_host_path(&v("http://ex.com"), "ex.com"),
            Some("/".into())
        );
    }
}
