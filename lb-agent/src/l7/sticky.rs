//! Signed sticky-session cookies: the key that signs them, the cookie format, and the
//! `Cookie` / `Set-Cookie` header helpers.
//!
//! # Design
//!
//! A sticky cookie names a backend without revealing it and without any server-side
//! session table, so nothing grows with the number of clients:
//!
//! - The **key** is 32 random bytes kept in `<state_dir>/sticky.key` (mode 0600, created
//!   atomically on first start), so cookies stay valid across restarts. Every LB node
//!   that shares the file accepts the others' cookies.
//! - A backend's **token** is `HMAC-SHA256(key, "backend:" + "ip:port")` truncated to 8
//!   bytes: stable for a backend, opaque to the client (it reveals nothing of the
//!   address without the key). [`super::balancer::Pool::lease_by_token`] maps a token
//!   back to a serving backend.
//! - The **cookie value** is `base64url-no-pad(token(8) || expiry(8, big-endian unix
//!   seconds) || HMAC-SHA256(key, token || expiry)[..16])`, 43 characters. The MAC binds
//!   the expiry, so a client cannot extend its cookie; a 128-bit truncated tag is the
//!   size RFC 2104 section 5 and NIST SP 800-107 consider ample for online forgery.
//!   Verification uses the `hmac` crate's constant-time `verify_truncated_left`.
//!
//! Rotating the key (deleting the file) invalidates every cookie: clients are then
//! balanced afresh and get a new cookie, which is the intended failure mode.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use http::{HeaderMap, HeaderValue, header::COOKIE};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Name of the key file under `state_dir`.
pub const KEY_FILE: &str = "sticky.key";
/// Key length in bytes.
pub const KEY_LEN: usize = 32;
/// Backend token length in bytes.
pub const TOKEN_LEN: usize = 8;
/// Truncated MAC length in bytes.
const TAG_LEN: usize = 16;
/// Decoded cookie length: token, expiry, tag.
const COOKIE_LEN: usize = TOKEN_LEN + 8 + TAG_LEN;

/// Errors loading or creating the key file.
#[derive(Debug, thiserror::Error)]
pub enum StickyError {
    /// The key file exists but cannot be read.
    #[error("cannot read sticky key {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The key file does not hold exactly [`KEY_LEN`] bytes.
    #[error(
        "sticky key {} holds {len} bytes, expected {KEY_LEN}: fix or remove it (a new key invalidates every sticky cookie)",
        path.display()
    )]
    WrongSize {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The new key file cannot be written.
    #[error("cannot create sticky key {}: {source}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The operating system's random generator failed.
    #[error("cannot generate a sticky key: {0}")]
    Random(String),
}

/// The secret that signs sticky cookies and derives backend tokens.
#[derive(Clone)]
pub struct StickyKey {
    key: [u8; KEY_LEN],
    /// A public digest of the key, so pools can tell which key their cached tokens
    /// were derived with (see [`StickyKey::fingerprint`]).
    fingerprint: [u8; 8],
}

impl fmt::Debug for StickyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key itself.
        f.debug_struct("StickyKey")
            .field("fingerprint", &hex(&self.fingerprint))
            .finish_non_exhaustive()
    }
}

impl StickyKey {
    /// Load `<state_dir>/sticky.key`, or create it (random, mode 0600, written
    /// atomically: temporary file, fsync, rename, fsync of the directory). A file of the
    /// wrong size is an error naming the file, never silently replaced.
    ///
    /// # Errors
    ///
    /// [`StickyError`] when the file cannot be read or written, has the wrong size, or
    /// the random generator fails.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, StickyError> {
        let path = state_dir.join(KEY_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                let key: [u8; KEY_LEN] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| StickyError::WrongSize {
                            path: path.clone(),
                            len: bytes.len() as u64,
                        })?;
                let mode = fs::metadata(&path).map_or(0, |m| m.permissions().mode());
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        mode = format!("{:o}", mode & 0o777),
                        "sticky key is accessible to other users; chmod 600 it"
                    );
                }
                Ok(Self::from_bytes(key))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut key = [0u8; KEY_LEN];
                {
                    use rand::TryRngCore as _;
                    rand::rngs::OsRng
                        .try_fill_bytes(&mut key)
                        .map_err(|e| StickyError::Random(e.to_string()))?;
                }
                write_atomically(state_dir, &path, &key).map_err(|source| StickyError::Write {
                    path: path.clone(),
                    source,
                })?;
                tracing::info!(path = %path.display(), "created a new sticky-session key");
                Ok(Self::from_bytes(key))
            }
            Err(source) => Err(StickyError::Read { path, source }),
        }
    }

    /// A key from its bytes (tests, or keys distributed by other means).
    #[must_use]
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&mac(&bytes, &[b"fingerprint"])[..8]);
        Self {
            key: bytes,
            fingerprint,
        }
    }

    /// A public 8-byte digest of the key (`HMAC-SHA256(key, "fingerprint")` truncated):
    /// equal for equal keys, and safe to log. Pools use it to check that cached tokens
    /// were derived with the key they are asked about.
    #[must_use]
    pub const fn fingerprint(&self) -> [u8; 8] {
        self.fingerprint
    }

    /// The opaque, stable token naming a backend: `HMAC-SHA256(key, "backend:" + addr)`
    /// truncated to 8 bytes. It reveals nothing of the address without the key.
    #[must_use]
    pub fn backend_token(&self, addr: SocketAddr) -> [u8; TOKEN_LEN] {
        let addr = addr.to_string();
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&mac(&self.key, &[b"backend:", addr.as_bytes()])[..TOKEN_LEN]);
        token
    }

    /// The cookie value for `addr` expiring at `now + ttl`: base64url without padding of
    /// token(8) || expiry unix seconds(8, big-endian) || `HMAC-SHA256(key, token ||
    /// expiry)` truncated to 16 bytes.
    #[must_use]
    pub fn issue(&self, addr: SocketAddr, ttl: Duration, now: SystemTime) -> String {
        let token = self.backend_token(addr);
        let expiry = unix_secs(now).saturating_add(ttl.as_secs());
        let mut raw = [0u8; COOKIE_LEN];
        raw[..TOKEN_LEN].copy_from_slice(&token);
        raw[TOKEN_LEN..TOKEN_LEN + 8].copy_from_slice(&expiry.to_be_bytes());
        let tag = mac(&self.key, &[&raw[..TOKEN_LEN + 8]]);
        raw[TOKEN_LEN + 8..].copy_from_slice(&tag[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// Verify a cookie value: `Some(token)` when its MAC is valid (constant-time check)
    /// and it has not expired at `now`; `None` when it is tampered with, expired,
    /// signed by another key or malformed. Never panics.
    #[must_use]
    pub fn verify(&self, value: &str, now: SystemTime) -> Option<[u8; TOKEN_LEN]> {
        // 32 bytes encode to 43 characters; checking first bounds the decoder's work.
        if value.len() != COOKIE_LEN.div_ceil(3) * 4 - 1 {
            return None;
        }
        let mut raw = [0u8; COOKIE_LEN + 2];
        let n = URL_SAFE_NO_PAD.decode_slice(value, &mut raw).ok()?;
        if n != COOKIE_LEN {
            return None;
        }
        let (signed, tag) = raw[..COOKIE_LEN].split_at(TOKEN_LEN + 8);
        let mut m = HmacSha256::new_from_slice(&self.key).ok()?;
        m.update(signed);
        m.verify_truncated_left(tag).ok()?;
        let mut expiry = [0u8; 8];
        expiry.copy_from_slice(&signed[TOKEN_LEN..]);
        if unix_secs(now) >= u64::from_be_bytes(expiry) {
            return None;
        }
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&signed[..TOKEN_LEN]);
        Some(token)
    }
}

/// `HMAC-SHA256(key, concat(parts))`.
fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length; the error is unreachable.
    let Ok(mut m) = HmacSha256::new_from_slice(key) else {
        return [0; 32];
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Write `bytes` to `path` with mode 0600: a temporary file in the same directory,
/// fsync, rename over `path`, fsync of the directory.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{KEY_FILE}.tmp.{}", std::process::id()));
    // A stale temporary file may carry other permissions; start from scratch.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A cookie's value from the request's `Cookie` headers (several headers and
/// `;`-separated pairs; the first pair named `name` wins). Surrounding double quotes
/// (RFC 6265's quoted cookie-value) are removed. Headers that are not UTF-8 are skipped.
#[must_use]
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok())
        .flat_map(|line| line.split(';'))
        .find_map(|pair| {
            let (n, v) = pair.split_once('=')?;
            if n.trim() != name {
                return None;
            }
            let v = v.trim();
            Some(
                v.strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v),
            )
        })
}

/// The `Set-Cookie` value `NAME=VALUE; Path=/; Max-Age=TTL; HttpOnly; SameSite=Lax`,
/// plus `; Secure` when `secure`. Bytes that cannot appear in a cookie name or value
/// (controls, space, `;`, `,`, `"`, `\`, and `=` in the name) are dropped, so the
/// result is always a valid header and cannot smuggle attributes.
#[must_use]
pub fn set_cookie(name: &str, value: &str, ttl: Duration, secure: bool) -> HeaderValue {
    let is_octet = |c: char| c.is_ascii_graphic() && !matches!(c, '"' | ',' | ';' | '\\');
    let name: String = name.chars().filter(|&c| is_octet(c) && c != '=').collect();
    let value: String = value.chars().filter(|&c| is_octet(c)).collect();
    let mut s = format!(
        "{name}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax",
        ttl.as_secs()
    );
    if secure {
        s.push_str("; Secure");
    }
    // Only visible ASCII remains, which is always a valid header value.
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> StickyKey {
        StickyKey::from_bytes([7; KEY_LEN])
    }

    fn addr() -> SocketAddr {
        "198.18.1.11:8080".parse().unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const NOW: u64 = 1_700_000_000;
    const TTL: Duration = Duration::from_secs(3600);

    #[test]
    fn round_trip() {
        let k = key();
        let v = k.issue(addr(), TTL, at(NOW));
        assert_eq!(v.len(), 43);
        assert!(
            v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(k.verify(&v, at(NOW)), Some(k.backend_token(addr())));
        assert_eq!(k.verify(&v, at(NOW + 3599)), Some(k.backend_token(addr())));
        // Stable: the same backend has the same token; another backend another one.
        let other: SocketAddr = "198.18.1.12:8080".parse().unwrap();
        assert_eq!(k.backend_token(addr()), key().backend_token(addr()));
        assert_ne!(k.backend_token(addr()), k.backend_token(other));
    }

    #[test]
    fn expired_rejected() {
        let k = key();
        let v = k.issue(addr(), TTL, at(NOW));
        assert_eq!(k.verify(&v, at(NOW + 3600)), None);
        assert_eq!(k.verify(&v, at(NOW + 100_000)), None);
        // A zero ttl is expired at once.
        let v0 = k.issue(addr(), Duration::ZERO, at(NOW));
        assert_eq!(k.verify(&v0, at(NOW)), None);
    }

    #[test]
    fn tampering_rejected() {
        let k = key();
        let v = k.issue(addr(), TTL, at(NOW));
        let raw = URL_SAFE_NO_PAD.decode(&v).unwrap();
        assert_eq!(raw.len(), COOKIE_LEN);
        // Flip every bit of every byte: token, expiry and MAC alike.
        for i in 0..raw.len() {
            for bit in 0..8 {
                let mut t = raw.clone();
                t[i] ^= 1 << bit;
                let tv = URL_SAFE_NO_PAD.encode(&t);
                assert_eq!(k.verify(&tv, at(NOW)), None, "byte {i} bit {bit}");
            }
        }
        // Extending the expiry without the key fails.
        let mut later = raw.clone();
        later[TOKEN_LEN..TOKEN_LEN + 8].copy_from_slice(&(NOW + 10 * 3600).to_be_bytes());
        assert_eq!(k.verify(&URL_SAFE_NO_PAD.encode(&later), at(NOW)), None);
        // Another backend's token with this MAC fails.
        let mut swapped = raw;
        let other = k.backend_token("198.18.1.12:8080".parse().unwrap());
        swapped[..TOKEN_LEN].copy_from_slice(&other);
        assert_eq!(k.verify(&URL_SAFE_NO_PAD.encode(&swapped), at(NOW)), None);
    }

    #[test]
    fn malformed_rejected_without_panic() {
        let k = key();
        let v = k.issue(addr(), TTL, at(NOW));
        let cases = [
            String::new(),
            "x".to_owned(),
            v[..42].to_owned(),
            format!("{v}A"),
            format!("{v}="),
            v.replace(['-', '_'], "+"),
            "é".repeat(21) + "a",
            "=".repeat(43),
            "!".repeat(43),
            "A".repeat(1000),
        ];
        for c in &cases {
            if c != &v {
                assert_eq!(k.verify(c, at(NOW)), None, "{c:?}");
            }
        }
        // Non-canonical trailing bits in the last character are rejected too.
        let last = v.as_bytes()[42];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let pos = alphabet.iter().position(|&c| c == last).unwrap();
        let mut tweaked = v.clone().into_bytes();
        tweaked[42] = alphabet[pos ^ 1];
        assert_eq!(
            k.verify(std::str::from_utf8(&tweaked).unwrap(), at(NOW)),
            None
        );
    }

    #[test]
    fn other_key_rejects() {
        let v = key().issue(addr(), TTL, at(NOW));
        let other = StickyKey::from_bytes([8; KEY_LEN]);
        assert_eq!(other.verify(&v, at(NOW)), None);
        assert_ne!(other.backend_token(addr()), key().backend_token(addr()));
        assert_ne!(other.fingerprint(), key().fingerprint());
        assert_eq!(key().fingerprint(), key().fingerprint());
    }

    #[test]
    fn token_hides_the_address() {
        let k = key();
        for a in ["198.18.1.11:8080", "10.0.0.1:80", "[2001:db8::1]:443"] {
            let a: SocketAddr = a.parse().unwrap();
            let raw = URL_SAFE_NO_PAD.decode(k.issue(a, TTL, at(NOW))).unwrap();
            let ip = match a.ip() {
                std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            assert!(!raw.windows(ip.len()).any(|w| w == ip.as_slice()), "{a}");
            assert!(!raw.windows(2).any(|w| w == a.port().to_be_bytes()), "{a}");
        }
        let dbg = format!("{k:?}");
        assert!(!dbg.contains("07, 07") && !dbg.contains("[7, 7"), "{dbg}");
    }

    #[test]
    fn key_file_created_0600_and_reloaded() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let state = dir.join("state");
        let k1 = StickyKey::load_or_create(&state).unwrap();
        let path = state.join(KEY_FILE);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(KEY_FILE)]);
        let k2 = StickyKey::load_or_create(&state).unwrap();
        assert_eq!(k1.key, k2.key);
        let v = k1.issue(addr(), TTL, at(NOW));
        assert!(k2.verify(&v, at(NOW)).is_some());
        // Two fresh directories get different keys.
        let k3 = StickyKey::load_or_create(&dir.join("other")).unwrap();
        assert_ne!(k1.key, k3.key);
    }

    #[test]
    fn wrong_size_file_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let path = dir.join(KEY_FILE);
        for len in [0usize, 31, 33, 64] {
            fs::write(&path, vec![1u8; len]).unwrap();
            let err = StickyKey::load_or_create(dir).unwrap_err();
            assert!(matches!(err, StickyError::WrongSize { len: l, .. } if l == len as u64));
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            // Not replaced.
            assert_eq!(fs::read(&path).unwrap().len(), len);
        }
    }

    #[test]
    fn unreadable_key_path_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // A directory where the file should be.
        fs::create_dir_all(dir.join(KEY_FILE)).unwrap();
        let err = StickyKey::load_or_create(dir).unwrap_err();
        assert!(matches!(err, StickyError::Read { .. }), "{err}");
    }

    fn headers(lines: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(COOKIE, HeaderValue::from_bytes(l).unwrap());
        }
        h
    }

    #[test]
    fn cookie_value_parsing() {
        let h = headers(&[b"a=1; lb=xyz; b=2"]);
        assert_eq!(cookie_value(&h, "lb"), Some("xyz"));
        assert_eq!(cookie_value(&h, "a"), Some("1"));
        assert_eq!(cookie_value(&h, "b"), Some("2"));
        assert_eq!(cookie_value(&h, "c"), None);
        // Prefix and suffix names do not match.
        assert_eq!(cookie_value(&headers(&[b"lbx=1; xlb=2"]), "lb"), None);
        // Several headers; first match wins, in header order.
        let h = headers(&[b"a=1", b"lb=first", b"lb=second"]);
        assert_eq!(cookie_value(&h, "lb"), Some("first"));
        let h = headers(&[b"lb=one; lb=two"]);
        assert_eq!(cookie_value(&h, "lb"), Some("one"));
        // Whitespace without the canonical space, stray semicolons, empty values.
        let h = headers(&[b";;lb =  v1 ;x"]);
        assert_eq!(cookie_value(&h, "lb"), Some("v1"));
        assert_eq!(cookie_value(&headers(&[b"lb="]), "lb"), Some(""));
        // Pairs without '=' are skipped.
        assert_eq!(cookie_value(&headers(&[b"lb; lb=v"]), "lb"), Some("v"));
        // Quoted values lose their quotes; '=' inside a value is kept.
        assert_eq!(cookie_value(&headers(&[b"lb=\"q\""]), "lb"), Some("q"));
        assert_eq!(cookie_value(&headers(&[b"lb=a=b"]), "lb"), Some("a=b"));
        // Names are case-sensitive.
        assert_eq!(cookie_value(&headers(&[b"LB=v"]), "lb"), None);
        // A non-UTF-8 header is skipped, the next one still read.
        let h = headers(&[b"lb=\xff", b"lb=ok"]);
        assert_eq!(cookie_value(&h, "lb"), Some("ok"));
        assert_eq!(cookie_value(&HeaderMap::new(), "lb"), None);
    }

    #[test]
    fn set_cookie_format() {
        let v = set_cookie("lb", "abc", Duration::from_secs(600), false);
        assert_eq!(
            v.to_str().unwrap(),
            "lb=abc; Path=/; Max-Age=600; HttpOnly; SameSite=Lax"
        );
        let v = set_cookie("lb", "abc", Duration::from_secs(1), true);
        assert_eq!(
            v.to_str().unwrap(),
            "lb=abc; Path=/; Max-Age=1; HttpOnly; SameSite=Lax; Secure"
        );
        // Hostile input cannot inject attributes or break the header.
        let v = set_cookie("l=b", "a; Domain=evil\r\n", Duration::from_secs(1), false);
        assert_eq!(
            v.to_str().unwrap(),
            "lb=aDomain=evil; Path=/; Max-Age=1; HttpOnly; SameSite=Lax"
        );
        // An issued value round-trips through Set-Cookie and Cookie.
        let k = key();
        let issued = k.issue(addr(), TTL, at(NOW));
        let sc = set_cookie("lb", &issued, TTL, true);
        let pair = sc.to_str().unwrap().split(';').next().unwrap().to_owned();
        let h = headers(&[pair.as_bytes()]);
        let got = cookie_value(&h, "lb").unwrap();
        assert_eq!(k.verify(got, at(NOW)), Some(k.backend_token(addr())));
    }
}
