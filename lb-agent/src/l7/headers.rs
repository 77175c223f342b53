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
//! - [`append_via`]: `Via: 1.1 <name>` (or `2 <name>`, `1.0 <name>` by the message's
//!   version), appended to any `Via` already present, on requests and responses.
//!   `<name>` is [`via_name`]: `xdplb-` and 8 hex digits drawn at random once per
//!   agent process, so every hop of a chain of agents has its own name.
//! - [`via_names_us`]: whether a request already went through this agent (a loop:
//!   a backend that leads back to one of our VIPs, directly or through other hosts).
//! - [`is_upgrade_request`]: whether a request asks for a protocol switch. `h2c` is
//!   never passed on (RFC 9113 §3.1 removed it; a backend must not be switched to
//!   HTTP/2 behind our back): it is dropped from `Upgrade`, with `HTTP2-Settings`.

use std::net::IpAddr;

use http::Version;
use http::header::{
    CONNECTION, Entry, HOST, HeaderMap, HeaderName, HeaderValue, OccupiedEntry, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE, VIA,
};

/// The prefix of the pseudonym this proxy uses in `Via` ([`via_name`]).
pub const VIA_PREFIX: &str = "xdplb";

/// This agent's pseudonym in `Via`: `xdplb-` and 8 random hex digits, drawn once per
/// process. Unique per agent (not per host: two agents on one host differ), the same
/// for all its services (a service whose backend is another service of the same
/// agent is a loop too; config and API refuse it anyway).
#[must_use]
pub fn via_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| format!("{VIA_PREFIX}-{:08x}", rand::random::<u32>()))
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");
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

/// Whether `headers` ask for a protocol switch we pass on: `Connection` lists
/// `upgrade` and `Upgrade` names a protocol other than `h2c` (HTTP/1.1 only; h2 has
/// no such mechanism).
#[must_use]
pub fn is_upgrade_request(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && upgrade_protocols(headers).next().is_some()
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The protocols of every `Upgrade` field, `h2c` left out.
fn upgrade_protocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("h2c"))
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

/// Whether the request's `TE` lists `trailers` (the client accepts trailer fields).
#[must_use]
pub fn te_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers"))
        })
}

/// The fields [`strip_hop_by_hop`] always removes (`Upgrade` too unless upgrading, and
/// whatever `Connection` names).
pub static HOP_BY_HOP: [&HeaderName; 8] = [
    &CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &TE,
    &TRANSFER_ENCODING,
    &PROXY_AUTHENTICATE,
    &PROXY_AUTHORIZATION,
    &HTTP2_SETTINGS,
];

/// Whether [`strip_hop_by_hop`] removes a field of this name whatever `Connection`
/// says (when not upgrading): [`HOP_BY_HOP`] and `Upgrade`.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == UPGRADE || HOP_BY_HOP.contains(&name)
}

/// Remove the hop-by-hop fields of RFC 9110 §7.6.1 (see the [module docs](self)).
///
/// A message with none of them (no `Connection` either: the usual case) is told in one
/// pass over its field names and left as it is, without a lookup per hop-by-hop name.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: Upgrading) {
    if upgrading == Upgrading::No && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = connection_tokens(headers)
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in listed {
        // A client must not make us drop the fields that identify the request.
        if name != HOST && !(upgrading == Upgrading::Yes && name == UPGRADE) {
            headers.remove(&name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    match upgrading {
        Upgrading::No => {
            headers.remove(UPGRADE);
        }
        Upgrading::Yes => {
            let protocols = upgrade_protocols(headers).collect::<Vec<_>>().join(", ");
            match HeaderValue::from_str(&protocols) {
                Ok(v) if !protocols.is_empty() => {
                    headers.insert(UPGRADE, v);
                }
                _ => {
                    headers.remove(UPGRADE);
                }
            }
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
}

/// The client's address as `X-Forwarded-For` carries it (IPv4-mapped IPv6 addresses
/// as IPv4): formatted once per client connection, not per request.
#[must_use]
pub fn client_value(client: IpAddr) -> HeaderValue {
    // An IP address is digits, hex letters, '.' and ':': always a valid value.
    HeaderValue::from_str(&client.to_canonical().to_string())
        .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// What [`add_forwarded`] records about the client side.
#[derive(Debug, Clone, Copy)]
pub struct Forwarded<'a> {
    /// The client's address ([`client_value`]).
    pub client: &'a HeaderValue,
    /// Whether the client reached us over TLS.
    pub tls: bool,
    /// The host the client asked for (`Host`, or the h2 `:authority`).
    pub host: Option<&'a HeaderValue>,
}

/// Set `X-Forwarded-For` (appended), `X-Forwarded-Proto` and `X-Forwarded-Host`.
pub fn add_forwarded(headers: &mut HeaderMap, fwd: &Forwarded<'_>) {
    // One lookup of `X-Forwarded-For`: a request without one (the usual case) gets the
    // client's value, which is a shared copy, no allocation.
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(e) => {
            e.insert(fwd.client.clone());
        }
        Entry::Occupied(mut e) => {
            // Not a valid value (never: both parts are visible ASCII): the list is
            // left as the client sent it.
            if let Some(v) = appended(&e, fwd.client) {
                e.insert(v);
            }
        }
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if fwd.tls { "https" } else { "http" }),
    );
    match fwd.host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// The `Via` entry for a message received with `version`.
#[must_use]
pub fn via_entry(version: Version) -> String {
    let protocol = match version {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    };
    format!("{protocol} {}", via_name())
}

/// [`via_entry`] as a header value, built once per process for each version.
#[must_use]
pub fn via_value(version: Version) -> &'static HeaderValue {
    static VALUES: std::sync::OnceLock<[HeaderValue; 5]> = std::sync::OnceLock::new();
    let values = VALUES.get_or_init(|| {
        [
            Version::HTTP_09,
            Version::HTTP_10,
            Version::HTTP_11,
            Version::HTTP_2,
            Version::HTTP_3,
        ]
        .map(|v| {
            // ASCII letters, digits, '-', '.' and a space: always a valid value.
            HeaderValue::from_str(&via_entry(v)).unwrap_or_else(|_| HeaderValue::from_static("1.1"))
        })
    });
    let i = match version {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    };
    &values[i]
}

/// Whether an entry of `Via` names this agent ([`via_name`]) as a recipient: the
/// request has been through this proxy already.
#[must_use]
pub fn via_names_us(headers: &HeaderMap) -> bool {
    let ours = via_name();
    headers
        .get_all(VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        // `received-protocol received-by [ comment ]` (RFC 9110 §7.6.3).
        .filter_map(|entry| entry.split_whitespace().nth(1))
        .any(|by| by == ours)
}

/// Append our `Via` entry for a message received with `version`.
pub fn append_via(headers: &mut HeaderMap, version: Version) {
    let ours = via_value(version);
    let mut entry = match headers.entry(VIA) {
        Entry::Vacant(e) => {
            e.insert(ours.clone());
            return;
        }
        Entry::Occupied(e) => e,
    };
    let value = appended(&entry, ours).unwrap_or_else(|| ours.clone());
    entry.insert(value);
}

/// The list field `entry` (every line of it, empty members left out) with `ours` as
/// its last member, as one value: `ours` alone when nothing came before, `None` when
/// the joined list is not a valid value.
fn appended(entry: &OccupiedEntry<'_, HeaderValue>, ours: &HeaderValue) -> Option<HeaderValue> {
    let prior: Vec<&str> = entry
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    if prior.is_empty() {
        return Some(ours.clone());
    }
    let ours = ours.to_str().unwrap_or_default();
    HeaderValue::from_str(&format!("{}, {ours}", prior.join(", "))).ok()
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

    /// Without any hop-by-hop field the map is left as it is (the one-pass check), and
    /// each hop-by-hop field alone is still found and removed.
    #[test]
    fn a_message_without_hop_by_hop_fields_is_unchanged() {
        let plain = map(&[
            ("host", "example"),
            ("x-forwarded-for", "203.0.113.1"),
            ("accept", "*/*"),
            ("x-keep-alive", "1"),
        ]);
        let mut h = plain.clone();
        strip_hop_by_hop(&mut h, Upgrading::No);
        assert_eq!(h, plain);
        for name in HOP_BY_HOP.iter().copied().chain([&UPGRADE]) {
            let mut h = plain.clone();
            h.insert(name.clone(), HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h, Upgrading::No);
            assert_eq!(h, plain, "{name}");
        }
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
    fn h2c_is_never_an_upgrade_and_is_stripped() {
        let h2c = map(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
        ]);
        assert!(!is_upgrade_request(Version::HTTP_11, &h2c));
        let mut h = h2c.clone();
        strip_hop_by_hop(&mut h, Upgrading::No);
        assert!(names(&h).is_empty(), "{h:?}");
        // Offered next to another protocol: only that one is passed on.
        let mut h = map(&[
            ("connection", "upgrade"),
            ("upgrade", "H2C, websocket"),
            ("http2-settings", "x"),
        ]);
        assert!(is_upgrade_request(Version::HTTP_11, &h));
        strip_hop_by_hop(&mut h, Upgrading::Yes);
        assert_eq!(names(&h), ["connection", "upgrade"]);
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
                client: &client_value(client),
                tls: false,
                host: Some(&HeaderValue::from_static("web.example")),
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
                client: &client_value(mapped),
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
        let name = via_name();
        assert!(name.starts_with("xdplb-") && name.len() == 14, "{name}");
        assert_eq!(name, via_name(), "one name per process");
        let mut h = HeaderMap::new();
        append_via(&mut h, Version::HTTP_11);
        assert_eq!(h[VIA], format!("1.1 {name}"));
        let mut h = map(&[("via", "1.0 fred"), ("via", "1.1 p.example")]);
        append_via(&mut h, Version::HTTP_2);
        assert_eq!(h[VIA], format!("1.0 fred, 1.1 p.example, 2 {name}"));
        assert_eq!(via_entry(Version::HTTP_10), format!("1.0 {name}"));
        assert_eq!(via_value(Version::HTTP_10), &format!("1.0 {name}"));
        assert_eq!(via_value(Version::HTTP_2), &format!("2 {name}"));
        let mut h = map(&[("via", "")]);
        append_via(&mut h, Version::HTTP_11);
        assert_eq!(h[VIA], format!("1.1 {name}"));
    }

    #[test]
    fn via_names_us_finds_our_entry_only() {
        let name = via_name();
        assert!(!via_names_us(&HeaderMap::new()));
        assert!(!via_names_us(&map(&[("via", "1.1 xdplb, 1.0 fred")])));
        assert!(!via_names_us(&map(&[("via", &format!("1.1 {name}x"))])));
        assert!(via_names_us(&map(&[(
            "via",
            &format!("1.0 fred, 1.1 {name} (comment)")
        )])));
        assert!(via_names_us(&map(&[
            ("via", "1.1 a"),
            ("via", &format!("2 {name}"))
        ])));
        let mut h = HeaderMap::new();
        append_via(&mut h, Version::HTTP_11);
        assert!(via_names_us(&h));
    }
}
