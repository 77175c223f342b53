//! The key layout under `[cluster] prefix` in etcd (README "Several LB nodes"):
//!
//! | key | value |
//! | --- | --- |
//! | `<prefix>/services/<name>` | a [`ServiceDoc`](super::shared::ServiceDoc): the service (`[[service]]` keys) and its backends' overrides |
//! | `<prefix>/security` | the `[security]` table (JSON, same keys) |
//! | `<prefix>/health/<node>` | a node's [`HealthView`](super::shared::HealthView), bound to its lease |
//! | `<prefix>/sticky-key` | the L7 sticky-cookie key (64 hex digits), created once |
//!
//! One key per service: a write compares that key's revision (409 when another node
//! changed the service in between), so changes to different services never conflict.

/// What a key under the prefix stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Service(String),
    Security,
    Health(String),
    StickyKey,
}

/// The keys under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// `prefix` as validated by the config (`/xdplb`: leading '/', no trailing '/').
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// Everything of this cluster (what a node reads and watches).
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    pub fn service(&self, name: &str) -> String {
        format!("{}/services/{name}", self.prefix)
    }

    pub fn security(&self) -> String {
        format!("{}/security", self.prefix)
    }

    pub fn health(&self, node: &str) -> String {
        format!("{}/health/{node}", self.prefix)
    }

    pub fn sticky_key(&self) -> String {
        format!("{}/sticky-key", self.prefix)
    }

    /// What `key` stands for; None for keys of no meaning here (left alone).
    pub fn parse(&self, key: &[u8]) -> Option<Key> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let one_segment = |s: &str| (!s.is_empty() && !s.contains('/')).then(|| s.to_owned());
        if let Some(name) = rest.strip_prefix("services/") {
            return one_segment(name).map(Key::Service);
        }
        if let Some(node) = rest.strip_prefix("health/") {
            return one_segment(node).map(Key::Health);
        }
        match rest {
            "security" => Some(Key::Security),
            "sticky-key" => Some(Key::StickyKey),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_strangers_are_ignored() {
        let k = Keys::new("/xdplb");
        assert_eq!(k.service("web"), "/xdplb/services/web");
        assert_eq!(k.health("lb1"), "/xdplb/health/lb1");
        assert_eq!(k.all(), "/xdplb/");
        for (key, want) in [
            (k.service("web"), Some(Key::Service("web".into()))),
            (k.security(), Some(Key::Security)),
            (k.health("lb1"), Some(Key::Health("lb1".into()))),
            (k.sticky_key(), Some(Key::StickyKey)),
            ("/xdplb/services/".into(), None),
            ("/xdplb/services/a/b".into(), None),
            ("/xdplbx/services/web".into(), None),
            ("/other/services/web".into(), None),
            ("/xdplb/whatever".into(), None),
        ] {
            assert_eq!(k.parse(key.as_bytes()), want, "{key}");
        }
        // Another cluster's prefix that starts like ours is not ours.
        assert_eq!(Keys::new("/xdplb").parse(b"/xdplb2/security"), None);
    }
}
