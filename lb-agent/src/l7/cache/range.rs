//! Range requests answered from a stored complete response (RFC 9110 §14), as pure
//! functions:
//!
//! - [`parse`]: the `Range` header of a GET against a representation of `len` bytes:
//!   absent, another unit or invalid syntax → [`Ranges::Ignore`] (serve the whole 200,
//!   §14.2); no satisfiable range → [`Ranges::Unsatisfiable`] (416 with
//!   `Content-Range: bytes */len`); else the satisfiable ranges, clipped to the length.
//! - [`if_range_allows`]: `If-Range` (§13.1.5): the range is served only when the
//!   validator matches the stored response by *strong* comparison (an entity tag that
//!   is not weak and equal; a date equal to a strong `Last-Modified`); otherwise the
//!   whole representation is sent.
//! - [`content_range`]: the `Content-Range` of a served range.
//!
//! - [`multipart_allowed`] / [`multipart_body`]: several satisfiable ranges in ascending
//!   order without overlap are sent as one `multipart/byteranges` (§14.6); other sets,
//!   and more than [`MAX_RANGES`] specs, get the whole 200 (allowed by §14.2).

use http::{HeaderMap, header};

use super::policy::date_header;

/// Range specs looked at in one request; more and the whole representation is sent
/// (many small or overlapping ranges are a known denial-of-service pattern, §17.15).
pub const MAX_RANGES: usize = 16;

/// What a `Range` header asks of a representation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ranges {
    /// Serve the whole representation (no `Range`, another unit, invalid syntax).
    Ignore,
    /// No range is satisfiable: 416.
    Unsatisfiable,
    /// The satisfiable ranges, as inclusive `(first, last)` byte positions within the length.
    Satisfiable(Vec<(u64, u64)>),
}

/// Parse a `Range` value against a representation of `len` bytes (§14.1.1, §14.1.2).
#[must_use]
pub fn parse(value: &str, len: u64) -> Ranges {
    let Some((unit, set)) = value.trim().split_once('=') else {
        return Ranges::Ignore;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Ranges::Ignore;
    }
    let specs: Vec<&str> = set
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if specs.is_empty() || specs.len() > MAX_RANGES {
        return Ranges::Ignore;
    }
    let digits = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let mut out = Vec::new();
    for spec in specs {
        let Some((first, last)) = spec.split_once('-') else {
            return Ranges::Ignore;
        };
        let (first, last) = (first.trim(), last.trim());
        if first.is_empty() {
            // suffix-range: the last N bytes
            let Some(n) = digits(last) else {
                return Ranges::Ignore;
            };
            if n > 0 && len > 0 {
                out.push((len - n.min(len), len - 1));
            }
            continue;
        }
        let Some(first) = digits(first) else {
            return Ranges::Ignore;
        };
        let last = if last.is_empty() {
            None
        } else {
            match digits(last) {
                Some(l) if l >= first => Some(l),
                _ => return Ranges::Ignore,
            }
        };
        if first < len {
            out.push((first, last.map_or(len - 1, |l| l.min(len - 1))));
        }
    }
    if out.is_empty() {
        Ranges::Unsatisfiable
    } else {
        Ranges::Satisfiable(out)
    }
}

/// Does the request's `If-Range` (if any) let the range be served from a response
/// with `stored` header fields (§13.1.5)? Absent: yes. An entity tag: strong
/// comparison with `ETag`. A date: equal to `Last-Modified`, which must be strong
/// (at least a second before the response's `Date`, §8.8.2.2).
#[must_use]
pub fn if_range_allows(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(value) = req.get(header::IF_RANGE) else {
        return true;
    };
    let Ok(value) = value.to_str() else {
        return false;
    };
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        let strong = |t: &str| t.starts_with('"') && t.len() >= 2 && t.ends_with('"');
        return stored
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .is_some_and(|etag| strong(value) && strong(etag) && etag == value);
    }
    let (Ok(since), Some(modified), Some(date)) = (
        httpdate::parse_http_date(value),
        date_header(stored, &header::LAST_MODIFIED),
        date_header(stored, &header::DATE),
    ) else {
        return false;
    };
    since == modified
        && date
            .duration_since(modified)
            .is_ok_and(|d| d.as_secs() >= 1)
}

/// The `Content-Range` of bytes `first..=last` of `len`.
#[must_use]
pub fn content_range(first: u64, last: u64, len: u64) -> String {
    format!("bytes {first}-{last}/{len}")
}

/// The `Content-Range` of a 416 (§15.5.17).
#[must_use]
pub fn unsatisfied_range(len: u64) -> String {
    format!("bytes */{len}")
}

/// May several satisfiable ranges be sent as one `multipart/byteranges` (§14.6)? Only
/// when they are in ascending order and do not overlap: other sets (a known way to make
/// a server send a body many times over, §17.15) get the whole representation.
#[must_use]
pub fn multipart_allowed(ranges: &[(u64, u64)]) -> bool {
    ranges.len() > 1 && ranges.windows(2).all(|w| w[0].1 < w[1].0)
}

/// The body of a `multipart/byteranges` answer (RFC 9110 §14.6): for each range a part
/// with its `Content-Type` (the representation's, if any) and `Content-Range`, then the
/// closing delimiter.
#[must_use]
pub fn multipart_body(
    body: &[u8],
    ranges: &[(u64, u64)],
    content_type: Option<&str>,
    boundary: &str,
) -> Vec<u8> {
    let len = body.len() as u64;
    let mut out = Vec::new();
    for &(first, last) in ranges {
        out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        if let Some(ct) = content_type {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(
            format!("Content-Range: {}\r\n\r\n", content_range(first, last, len)).as_bytes(),
        );
        let (a, b) = (
            usize::try_from(first).unwrap_or(usize::MAX),
            usize::try_from(last).unwrap_or(usize::MAX),
        );
        if let Some(part) = body.get(a..=b) {
            out.extend_from_slice(part);
        }
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::cache::policy::tests::hm;

    fn sat(v: &[(u64, u64)]) -> Ranges {
        Ranges::Satisfiable(v.to_vec())
    }

    #[test]
    fn single_ranges_of_every_form() {
        assert_eq!(parse("bytes=0-1", 11), sat(&[(0, 1)]));
        assert_eq!(parse("bytes=1-", 11), sat(&[(1, 10)]));
        assert_eq!(parse("bytes=-1", 11), sat(&[(10, 10)]));
        assert_eq!(parse("BYTES = 2-4", 11), sat(&[(2, 4)]));
        // last past the end is clipped; a suffix longer than the body is all of it
        assert_eq!(parse("bytes=5-100", 11), sat(&[(5, 10)]));
        assert_eq!(parse("bytes=-50", 11), sat(&[(0, 10)]));
    }

    #[test]
    fn unsatisfiable_ranges_get_416() {
        assert_eq!(parse("bytes=11-", 11), Ranges::Unsatisfiable);
        assert_eq!(parse("bytes=20-30", 11), Ranges::Unsatisfiable);
        assert_eq!(parse("bytes=-0", 11), Ranges::Unsatisfiable);
        assert_eq!(parse("bytes=0-", 0), Ranges::Unsatisfiable);
        assert_eq!(parse("bytes=-5", 0), Ranges::Unsatisfiable);
        // one satisfiable range among unsatisfiable ones is served
        assert_eq!(parse("bytes=20-30, 0-0", 11), sat(&[(0, 0)]));
    }

    #[test]
    fn invalid_syntax_and_other_units_are_ignored() {
        for v in [
            "bytes=5-1",
            "bytes=a-b",
            "bytes=1-2-3",
            "bytes=",
            "bytes",
            "bytes=--1",
            "bytes=+1-2",
            "items=0-1",
            "bytes=0-1, x",
        ] {
            assert_eq!(parse(v, 11), Ranges::Ignore, "{v}");
        }
        let many = format!("bytes={}", vec!["0-0"; MAX_RANGES + 1].join(","));
        assert_eq!(parse(&many, 11), Ranges::Ignore);
    }

    #[test]
    fn multiple_ranges_are_listed() {
        assert_eq!(parse("bytes=0-1, 4-5", 11), sat(&[(0, 1), (4, 5)]));
    }

    #[test]
    fn if_range_needs_a_strong_match() {
        let stored = hm(&[
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
            ("date", "Tue, 01 Dec 2026 10:00:05 GMT"),
        ]);
        let ok = |v: &str| if_range_allows(&hm(&[("if-range", v)]), &stored);
        assert!(if_range_allows(&HeaderMap::new(), &stored));
        assert!(ok("\"v1\""));
        assert!(!ok("\"v2\""));
        assert!(!ok("W/\"v1\""));
        assert!(ok("Tue, 01 Dec 2026 10:00:00 GMT"));
        assert!(!ok("Tue, 01 Dec 2026 10:00:01 GMT"));
        assert!(!ok("garbage"));
        // a weak stored tag never matches
        let weak = hm(&[("etag", "W/\"v1\"")]);
        assert!(!if_range_allows(&hm(&[("if-range", "\"v1\"")]), &weak));
        // Last-Modified within the second of Date is weak
        let close = hm(&[
            ("last-modified", "Tue, 01 Dec 2026 10:00:00 GMT"),
            ("date", "Tue, 01 Dec 2026 10:00:00 GMT"),
        ]);
        assert!(!if_range_allows(
            &hm(&[("if-range", "Tue, 01 Dec 2026 10:00:00 GMT")]),
            &close
        ));
    }

    #[test]
    fn content_range_values() {
        assert_eq!(content_range(0, 1, 11), "bytes 0-1/11");
        assert_eq!(unsatisfied_range(11), "bytes */11");
    }

    #[test]
    fn multipart_only_for_ascending_disjoint_ranges() {
        assert!(multipart_allowed(&[(0, 1), (4, 5)]));
        assert!(!multipart_allowed(&[(0, 1)]));
        assert!(!multipart_allowed(&[(4, 5), (0, 1)]), "descending");
        assert!(!multipart_allowed(&[(0, 4), (3, 5)]), "overlapping");
        assert!(!multipart_allowed(&[(0, 4), (4, 5)]), "overlapping by one");
    }

    #[test]
    fn multipart_body_layout() {
        let b = multipart_body(b"0123456789", &[(0, 1), (8, 9)], Some("text/plain"), "B");
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/10\r\n\r\n01\
             \r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 8-9/10\r\n\r\n89\
             \r\n--B--\r\n"
        );
        let b = multipart_body(b"abc", &[(0, 0), (2, 2)], None, "x");
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "\r\n--x\r\nContent-Range: bytes 0-0/3\r\n\r\na\r\n--x\r\nContent-Range: bytes 2-2/3\r\n\r\nc\r\n--x--\r\n"
        );
    }
}
