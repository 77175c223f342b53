//! Header rewriting at the proxy's two edges (RFC 9110 §7.6).
//!
//! - [`strip_hop_by_hop`]: removes the fields that describe one connection only
//!   (§7.6.1): `Connection` and every field it names, `Keep-Alive`, `Proxy-Connection`,
//!   `TE`, `Transfer-Encoding` (hyper frames each side's body itself), `Upgrade`, and
//!   `Proxy-Authenticate` / `Proxy-Authorization`. When an upgrade is being proxied,
//!   `Upgrade` is kept and `Connection: upgrade` set again ([`Upgrading::Yes`]).
//! - [`add_forwarded`]: the request side's `X-Forwarded-For` (the client's address
//!   appended to any list the client sent), `X-Forwarded-Proto` (`http` or `https`,
//!   always ours), `X-Forwarded-Host` (the host the client asked for, always ours).
//! - [`append_via`]: `Via: 1.1 xdplb` (or `2 xdplb`, `1.0 xdplb` by the message's
//!   version), appended to any `Via` already present, on requests and responses.
//! - [`is_upgrade_request`]: whether a request asks for a protocol switch.

use std::net::IpAddr;

use http::Version;
use http::header::{
    CONNECTION, HOST, HeaderMap, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION,
    TE, TRANSFER_ENCODING, UPGRADE, VIA,
};

/// The pseudonym this proxy uses in `Via`.
pub const VIA_NAME: &str = "xdplb";

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether the message being rewritten belongs to a protocol switch we pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrading {
    /// Ordinary message: `Upgrade` goes like the other hop-by-hop fields.
    No,
    /// An upgrade request or a `101` answer: `Upgrade` stays, `Connection: upgrade` is set.
    Yes,
}

/// Whether `headers` ask for a protocol switch: `Connection` lists `upgrade` and an
/// `Upgrade` field is present (HTTP/1.1 only; h2 has no such mechanism).
#[must_use]
pub fn is_upgrade_request(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The comma-separated tokens of every `Connection` field.
fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Remove the hop-by-hop fields of RFC 9110 §7.6.1 (see the [module docs](self)).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: Upgrading) {
    let listed: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in listed {
        // A client must not make us drop the fields that identify the request.
        if name != HOST && !(upgrading == Upgrading::Yes && name == UPGRADE) {
            headers.remove(&name);
        }
    }
    for name in [
        &CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRANSFER_ENCODING,
        &PROXY_AUTHENTICATE,
        &PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    match upgrading {
        Upgrading::No => {
            headers.remove(UPGRADE);
        }
        Upgrading::Yes => {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
}

/// What [`add_forwarded`] records about the client side.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    /// The client's address.
    pub client: IpAddr,
    /// Whether the client reached us over TLS.
    pub tls: bool,
    /// The host the client asked for (`Host`, or the h2 `:authority`).
    pub host: Option<&'a str>,
}

/// Set `X-Forwarded-For` (appended), `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub fn add_forwarded(headers: &mut HeaderMap, fwd: &Forwarded<'_>) {
    let client = fwd.client.to_canonical().to_string();
    let prior: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let xff = if prior.is_empty() {
        client
    } else {
        format!("{}, {client}", prior.join(", "))
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if fwd.tls { "https" } else { "http" }),
    );
    match fwd.host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// The `Via` entry for a message received with `version`.
#[must_use]
pub fn via_entry(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "0.9 xdplb",
        Version::HTTP_10 => "1.0 xdplb",
        Version::HTTP_2 => "2 xdplb",
        Version::HTTP_3 => "3 xdplb",
        _ => "1.1 xdplb",
    }
}

/// Append our `Via` entry for a message received with `version`.
pub fn append_via(headers: &mut HeaderMap, version: Version) {
    let ours = via_entry(version);
    let prior: Vec<&str> = headers
        .get_all(VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let value = if prior.is_empty() {
        HeaderValue::from_static(ours)
    } else {
        match HeaderValue::from_str(&format!("{}, {ours}", prior.join(", "))) {
            Ok(v) => v,
            Err(_) => HeaderValue::from_static(ours),
        }
    };
    headers.insert(VIA, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn hop_by_hop_fields_and_connection_listed_ones_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret , close"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
            ("host", "example"),
        ]);
        strip_hop_by_hop(&mut h, Upgrading::No);
        assert_eq!(names(&h), ["host", "x-kept"]);
    }

    #[test]
    fn connection_cannot_remove_host() {
        let mut h = map(&[("connection", "host"), ("host", "example")]);
        strip_hop_by_hop(&mut h, Upgrading::No);
        assert_eq!(names(&h), ["host"]);
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection_upgrade() {
        let mut h = map(&[
            ("connection", "Upgrade, keep-alive"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(is_upgrade_request(Version::HTTP_11, &h));
        assert!(!is_upgrade_request(Version::HTTP_2, &h));
        assert!(!is_upgrade_request(
            Version::HTTP_11,
            &map(&[("upgrade", "x")])
        ));
        strip_hop_by_hop(&mut h, Upgrading::Yes);
        assert_eq!(names(&h), ["connection", "sec-websocket-key", "upgrade"]);
        assert_eq!(h[CONNECTION], "upgrade");
        assert_eq!(h[UPGRADE], "websocket");
    }

    #[test]
    fn forwarded_for_appends_and_proto_host_are_ours() {
        let client = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 7));
        let mut h = map(&[
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "203.0.113.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil"),
        ]);
        add_forwarded(
            &mut h,
            &Forwarded {
                client,
                tls: false,
                host: Some("web.example"),
            },
        );
        assert_eq!(h[&X_FORWARDED_FOR], "203.0.113.1, 203.0.113.2, 198.18.0.7");
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        assert_eq!(h[&X_FORWARDED_HOST], "web.example");

        let mut h = HeaderMap::new();
        let mapped: IpAddr = "::ffff:198.18.0.7".parse().expect("ip");
        add_forwarded(
            &mut h,
            &Forwarded {
                client: mapped,
                tls: true,
                host: None,
            },
        );
        assert_eq!(h[&X_FORWARDED_FOR], "198.18.0.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }

    #[test]
    fn via_appends_by_version() {
        let mut h = HeaderMap::new();
        append_via(&mut h, Version::HTTP_11);
        assert_eq!(h[VIA], "1.1 xdplb");
        let mut h = map(&[("via", "1.0 fred"), ("via", "1.1 p.example")]);
        append_via(&mut h, Version::HTTP_2);
        assert_eq!(h[VIA], "1.0 fred, 1.1 p.example, 2 xdplb");
        assert_eq!(via_entry(Version::HTTP_10), "1.0 xdplb");
    }
}
