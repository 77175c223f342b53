//! The etcd side: read the prefix, apply watch events, write API changes as
//! compare-and-swap transactions, seed services, publish this node's health view under
//! its lease, and share the sticky-cookie key. Every request is bounded in time: an
//! etcd that does not answer is "unreachable" (API writes 503), never a hang.

use std::{collections::BTreeMap, time::Duration};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};

use super::{
    keys::{Key, Keys},
    shared::{Change, HealthView, ServiceDoc, Shared, Versioned},
};
use crate::config::{ClusterConfig, SecurityConfig, ServiceConfig};

/// How long one request to etcd may take (the lease keep-alive's answer included).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one member may take to answer before the next is asked (idempotent
/// requests) or the write counts as unanswered.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause before another round over the members when none could apply a request.
const ROUND_PAUSE: Duration = Duration::from_millis(100);

/// Why a write to the store did not happen. Either way nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another node changed what this change was based on (409).
    #[error("{0}")]
    Conflict(String),
    /// etcd did not answer (503); the request was not applied.
    #[error("the cluster store (etcd) is unreachable: {0}")]
    Unreachable(String),
    /// A write went out but no answer came back: it may or may not have been applied
    /// (503; the watch brings it if it was).
    #[error(
        "the cluster store (etcd) did not answer a write: {0}; it may or may not have been applied (GET it to see)"
    )]
    Unknown(String),
}

/// A connection to the etcd cluster: one client per member (lazy: connecting succeeds
/// with every member down). Requests go to the member that answered last; a member
/// that refuses the connection or has no leader is skipped for the next, so losing one
/// member costs nothing. etcd's own clients work the same way.
#[derive(Clone)]
pub struct Store {
    clients: std::sync::Arc<Vec<(String, Client)>>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub keys: Keys,
}

/// The request did not reach a member that could apply it (connection refused or
/// failed, no leader): safe to send again elsewhere, even a write.
fn not_applied(e: &etcd_client::Error) -> bool {
    let text = e.to_string();
    ["connect error", "Connection refused", "no leader"]
        .iter()
        .any(|m| text.contains(m))
}

impl Store {
    /// Run `f` on the members' clients, starting with the one that answered last, until
    /// one answers. `idempotent`: also move on after an answer that did not come (an
    /// idempotent request may be sent twice); a write stops there ([`StoreError::Unknown`]).
    async fn call<T, F, Fut>(&self, what: &str, idempotent: bool, f: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.clients.len();
        if n == 0 {
            return Err(StoreError::Unreachable(format!("{what}: no etcd endpoint")));
        }
        let start = self.current.load(Relaxed);
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut errors = Vec::new();
        // Rounds over every member until REQUEST_TIMEOUT: a round where none could
        // apply the request (no leader during an election after the leader was lost,
        // connections refused) is tried again shortly, as etcd's own clients do, so
        // losing the leader member costs a wait of about an election, not a 503.
        for i in 0.. {
            if i > 0 && i % n == 0 {
                if tokio::time::Instant::now() + ROUND_PAUSE >= deadline {
                    break;
                }
                tokio::time::sleep(ROUND_PAUSE).await;
                errors.clear();
            }
            let idx = (start + i) % n;
            let (url, client) = &self.clients[idx];
            match tokio::time::timeout(ATTEMPT_TIMEOUT, f(client.clone())).await {
                Ok(Ok(v)) => {
                    self.current.store(idx, Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) if idempotent || not_applied(&e) => errors.push(format!("{url}: {e}")),
                Ok(Err(e)) => return Err(StoreError::Unknown(format!("{what}: {url}: {e}"))),
                Err(_) if idempotent => errors.push(format!(
                    "{url}: no answer within {} ms",
                    ATTEMPT_TIMEOUT.as_millis()
                )),
                Err(_) => {
                    return Err(StoreError::Unknown(format!(
                        "{what}: {url}: no answer within {} ms",
                        ATTEMPT_TIMEOUT.as_millis()
                    )));
                }
            }
        }
        Err(StoreError::Unreachable(format!(
            "{what}: {}",
            errors.join("; ")
        )))
    }

    /// The client of the member that answered last (for the watch and the lease).
    fn current(&self) -> Client {
        let idx = self.current.load(std::sync::atomic::Ordering::Relaxed);
        self.clients[idx % self.clients.len()].1.clone()
    }
}

impl Store {
    pub async fn connect(cfg: &ClusterConfig) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            // HTTP/2 pings: a watch on a member that died fails within ~2 s.
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true)
            // A member cut off from the quorum answers at once instead of hanging.
            .with_require_leader(true);
        let mut clients = Vec::new();
        for url in &cfg.etcd {
            let client = Client::connect([url], Some(options.clone()))
                .await
                .map_err(|e| StoreError::Unreachable(format!("connecting to {url}: {e}")))?;
            clients.push((url.clone(), client));
        }
        Ok(Store {
            clients: std::sync::Arc::new(clients),
            current: std::sync::Arc::default(),
            keys: Keys::new(&cfg.prefix),
        })
    }

    /// Everything under the prefix, at one revision.
    pub async fn load(&self) -> Result<Shared, StoreError> {
        let all = self.keys.all();
        let resp = self
            .call("reading the prefix", true, |mut c| {
                let all = all.clone();
                async move { c.get(all, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut shared = Shared {
            revision: resp.header().map_or(0, |h| h.revision()),
            ..Default::default()
        };
        for kv in resp.kvs() {
            apply(
                &mut shared,
                &self.keys,
                kv.key(),
                Some((kv.value(), kv.mod_revision())),
            );
        }
        Ok(shared)
    }

    /// A watch of the prefix from `revision` on (inclusive).
    pub async fn watch(&self, revision: i64) -> Result<WatchStream, StoreError> {
        let mut c = self.current();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision);
        match tokio::time::timeout(REQUEST_TIMEOUT, c.watch(self.keys.all(), Some(options))).await {
            Ok(Ok(w)) => Ok(w),
            Ok(Err(e)) => Err(StoreError::Unreachable(format!("watching the prefix: {e}"))),
            Err(_) => Err(StoreError::Unreachable(
                "watching the prefix: no answer".into(),
            )),
        }
    }

    /// Write `changes` in one transaction that holds only if every key is still at the
    /// revision `shared` knows (absent where it knows none). Returns the new revision.
    pub async fn commit(&self, changes: &[Change], shared: &Shared) -> Result<i64, StoreError> {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        for change in changes {
            let known = shared.known_revision(change);
            let key = match change {
                Change::PutService(doc) => self.keys.service(&doc.service.name),
                Change::DeleteService(name) => self.keys.service(name),
                Change::PutSecurity(_) => self.keys.security(),
            };
            compares.push(if known == 0 {
                Compare::create_revision(key.clone(), CompareOp::Equal, 0)
            } else {
                Compare::mod_revision(key.clone(), CompareOp::Equal, known)
            });
            ops.push(match change {
                Change::PutService(doc) => TxnOp::put(key, to_json(doc), None),
                Change::DeleteService(_) => TxnOp::delete(key, None),
                Change::PutSecurity(sec) => TxnOp::put(key, to_json(sec), None),
            });
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let resp = self
            .call("writing the change", false, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            return Err(StoreError::Conflict(conflict_message(changes)));
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Put each of `services` (and `security`, when it has a list) where etcd has no
    /// key of that name (create_revision == 0), one transaction each. Returns the names
    /// of the services created.
    pub async fn seed(
        &self,
        services: &[ServiceConfig],
        security: &SecurityConfig,
    ) -> Result<Vec<String>, StoreError> {
        let mut created = Vec::new();
        for svc in services {
            let key = self.keys.service(&svc.name);
            let doc = ServiceDoc {
                service: svc.clone(),
                overrides: BTreeMap::new(),
            };
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, to_json(&doc), None)]);
            // Create-only: sending it twice cannot do harm.
            let answer = self
                .call("seeding a service", true, |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if answer.succeeded() {
                created.push(svc.name.clone());
            }
        }
        if !security.deny.is_empty() || !security.allow.is_empty() {
            let key = self.keys.security();
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key, to_json(security), None)]);
            self.call("seeding [security]", true, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        }
        Ok(created)
    }

    /// A lease of `ttl_s` seconds for this node's health view.
    pub async fn grant(&self, ttl_s: i64) -> Result<i64, StoreError> {
        Ok(self
            .call("granting a lease", true, |mut c| async move {
                c.lease_grant(ttl_s, None).await
            })
            .await?
            .id())
    }

    /// Keep `lease` alive: a keeper and the stream of its answers.
    pub async fn keep_alive(
        &self,
        lease: i64,
    ) -> Result<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream), StoreError> {
        let mut c = self.current();
        match tokio::time::timeout(REQUEST_TIMEOUT, c.lease_keep_alive(lease)).await {
            Ok(Ok(k)) => Ok(k),
            Ok(Err(e)) => Err(StoreError::Unreachable(format!(
                "keeping the lease alive: {e}"
            ))),
            Err(_) => Err(StoreError::Unreachable(
                "keeping the lease alive: no answer".into(),
            )),
        }
    }

    /// Publish this node's health view under `lease`.
    pub async fn publish(
        &self,
        node: &str,
        view: &HealthView,
        lease: i64,
    ) -> Result<(), StoreError> {
        let (key, value) = (self.keys.health(node), to_json(view));
        self.call("publishing the health view", true, |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                c.put(key, value, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await
        .map(drop)
    }

    /// The cluster's sticky-cookie key: created once by whichever node comes first
    /// (create_revision == 0), read by every other.
    pub async fn sticky_key(&self, fresh: &[u8; 32]) -> Result<Vec<u8>, StoreError> {
        let key = self.keys.sticky_key();
        let hex: String = fresh.iter().map(|b| format!("{b:02x}")).collect();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), hex, None)]);
        self.call("creating the sticky key", true, |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await?;
        let resp = self
            .call("reading the sticky key", true, |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        let text = resp
            .kvs()
            .first()
            .and_then(|kv| std::str::from_utf8(kv.value()).ok())
            .unwrap_or_default();
        decode_hex(text.trim())
            .filter(|k| k.len() == 32)
            .ok_or_else(|| StoreError::Unreachable(format!("{key} does not hold 64 hex digits")))
    }
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    text.len()
        .is_multiple_of(2)
        .then(|| {
            (0..text.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .flatten()
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("the shared state serialises")
}

/// The 409's text: which keys another node changed first.
pub fn conflict_message(changes: &[Change]) -> String {
    let what: Vec<String> = changes
        .iter()
        .map(|c| match c {
            Change::PutService(doc) => format!("service {}", doc.service.name),
            Change::DeleteService(name) => format!("service {name}"),
            Change::PutSecurity(_) => "[security]".to_owned(),
        })
        .collect();
    format!(
        "{} changed concurrently (another node wrote it since this node last read it); \
         nothing changed: read it again and retry",
        what.join(", ")
    )
}

/// Apply one key's new value (None: deleted) to `shared`. A value that does not parse
/// is logged and leaves the entry out (a service written by a newer agent, or by hand).
pub fn apply(shared: &mut Shared, keys: &Keys, key: &[u8], value: Option<(&[u8], i64)>) {
    let Some(which) = keys.parse(key) else {
        return;
    };
    let parsed = |what: &str| -> Option<(serde_json::Value, i64)> {
        let (bytes, rev) = value?;
        match serde_json::from_slice(bytes) {
            Ok(v) => Some((v, rev)),
            Err(e) => {
                tracing::error!(key = %String::from_utf8_lossy(key), error = %e, "{what} in etcd does not parse: left out");
                None
            }
        }
    };
    match which {
        Key::Service(name) => {
            let doc = parsed("a service").and_then(|(v, rev)| {
                match serde_json::from_value::<ServiceDoc>(v) {
                    Ok(doc) if doc.service.name == name => Some(Versioned {
                        value: doc,
                        mod_revision: rev,
                    }),
                    Ok(doc) => {
                        tracing::error!(key = %String::from_utf8_lossy(key), named = %doc.service.name, "a service in etcd names another service than its key: left out");
                        None
                    }
                    Err(e) => {
                        tracing::error!(key = %String::from_utf8_lossy(key), error = %e, "a service in etcd is not a service: left out");
                        None
                    }
                }
            });
            match doc {
                Some(doc) => {
                    shared.services.insert(name, doc);
                }
                None => {
                    shared.services.remove(&name);
                }
            }
        }
        Key::Security => {
            shared.security = parsed("[security]").and_then(|(v, rev)| {
                serde_json::from_value(v).ok().map(|value| Versioned {
                    value,
                    mod_revision: rev,
                })
            });
        }
        Key::Health(node) => {
            match parsed("a health view").and_then(|(v, _)| serde_json::from_value(v).ok()) {
                Some(view) => {
                    shared.health.insert(node, view);
                }
                None => {
                    shared.health.remove(&node);
                }
            }
        }
        Key::StickyKey => {}
    }
}

/// Apply a watch answer's events to `shared`.
pub fn apply_events(shared: &mut Shared, keys: &Keys, resp: &etcd_client::WatchResponse) {
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let value = match ev.event_type() {
            EventType::Put => Some((kv.value(), kv.mod_revision())),
            EventType::Delete => None,
        };
        apply(shared, keys, kv.key(), value);
        shared.revision = shared.revision.max(kv.mod_revision());
    }
    if let Some(h) = resp.header() {
        shared.revision = shared.revision.max(h.revision());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_update_the_shared_state_and_bad_values_are_left_out() {
        let keys = Keys::new("/x");
        let mut shared = Shared::default();
        let doc = br#"{"service": {"name": "web", "vip": "198.18.100.1:80", "backend": [{"address": "198.18.1.11"}]}}"#;
        apply(&mut shared, &keys, b"/x/services/web", Some((doc, 5)));
        assert_eq!(shared.services["web"].mod_revision, 5);
        assert_eq!(shared.services["web"].value.service.backends.len(), 1);
        // A key naming another service than its value, or garbage: out.
        apply(&mut shared, &keys, b"/x/services/api", Some((doc, 6)));
        assert!(!shared.services.contains_key("api"));
        apply(&mut shared, &keys, b"/x/services/web", Some((b"{", 7)));
        assert!(shared.services.is_empty());
        apply(&mut shared, &keys, b"/x/services/web", Some((doc, 8)));
        apply(&mut shared, &keys, b"/x/services/web", None);
        assert!(shared.services.is_empty());
        // Health views come and go with their keys.
        let view = br#"{"down": {"web": ["198.18.1.11:80"]}, "published_ms": 1}"#;
        apply(&mut shared, &keys, b"/x/health/lb2", Some((view, 9)));
        assert!(shared.health["lb2"].is_down("web", "198.18.1.11:80".parse().unwrap()));
        apply(&mut shared, &keys, b"/x/health/lb2", None);
        assert!(shared.health.is_empty());
    }

    #[test]
    fn a_conflict_names_what_changed() {
        let m = conflict_message(&[Change::DeleteService("web".into())]);
        assert!(m.starts_with("service web changed concurrently"), "{m}");
    }

    #[test]
    fn hex_keys_decode() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}

/// Against a real etcd (Debian's etcd-server, on loopback, data in a temporary folder):
/// seeding creates only, a stale revision is a conflict, the watch brings the same state
/// as a read, the sticky key is created once, a health view lives under its lease.
#[cfg(test)]
mod etcd_tests {
    use std::{
        net::TcpListener,
        process::{Child, Command, Stdio},
        time::{Duration, Instant},
    };

    use super::*;
    use crate::{
        cluster::shared::diff,
        config::{ClusterConfig, Config},
    };

    /// etcd as a child process, killed when dropped.
    struct Etcd {
        child: Child,
        url: String,
        _dir: tempfile::TempDir,
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    fn etcd() -> Etcd {
        let dir = tempfile::tempdir().expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path())
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("t={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting `etcd` (Debian's etcd-server; `cargo xtask setup` installs it)");
        Etcd {
            child,
            url,
            _dir: dir,
        }
    }

    fn services(text: &str) -> Config {
        toml::from_str(text).expect("config")
    }

    #[tokio::test]
    async fn a_real_etcd_seeds_once_refuses_stale_writes_and_watches() {
        let etcd = etcd();
        let cfg = ClusterConfig {
            node: "lb1".into(),
            etcd: vec![etcd.url.clone()],
            prefix: "/t".into(),
        };
        let store = Store::connect(&cfg).await.expect("connect");
        let file = services(
            "[security]\ndeny = [\"203.0.113.0/24\"]\n\
             [[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\nbackend = [{ address = \"198.18.1.11\" }]\n\
             [[service]]\nname = \"api\"\nvip = \"198.18.100.2:80\"\nbackend = [{ address = \"198.18.1.12\" }]\n",
        );
        // etcd starts in the background: the first requests may find it not ready. Wait
        // with a read, not with the seed itself: a write sent while etcd starts may be
        // applied and still go unanswered (an error), and a second seed would then find
        // part of it done (seen in CI on a loaded machine: created ["api"]).
        let deadline = Instant::now() + Duration::from_secs(15);
        while let Err(e) = store.load().await {
            assert!(Instant::now() < deadline, "etcd did not answer: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let created = store
            .seed(&file.services, &file.security)
            .await
            .expect("seed");
        assert_eq!(created, ["web", "api"]);
        // Seeding again creates nothing, even with another version of a service.
        let mut changed = file.clone();
        changed.services[0].backends[0].weight = 7;
        assert!(
            store
                .seed(&changed.services, &changed.security)
                .await
                .unwrap()
                .is_empty()
        );
        let shared = store.load().await.unwrap();
        assert_eq!(shared.services.len(), 2);
        assert_eq!(shared.services["web"].value.service, file.services[0]);
        assert_eq!(shared.security.as_ref().unwrap().value, file.security);
        let watch_from = shared.revision + 1;

        // A change based on what this node read: accepted.
        let before = shared.to_overlay();
        let mut after = before.clone();
        after.services.get_mut("web").unwrap().backends[0].weight = 300;
        let changes = diff(&before, &after);
        let rev = store.commit(&changes, &shared).await.expect("commit");
        assert!(rev > shared.revision);
        // The same base again (another node's view, not updated yet): a conflict,
        // and nothing written.
        after.services.get_mut("web").unwrap().backends[0].weight = 5;
        let e = store
            .commit(&diff(&before, &after), &shared)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
        let now = store.load().await.unwrap();
        assert_eq!(now.services["web"].value.service.backends[0].weight, 300);
        // Creating a service that another node created meanwhile: a conflict too.
        let mut stale = shared.clone();
        stale.services.remove("api");
        let mut o = stale.to_overlay();
        let base = o.clone();
        o.services.insert("api".into(), file.services[1].clone());
        let e = store.commit(&diff(&base, &o), &stale).await.unwrap_err();
        assert!(matches!(e, StoreError::Conflict(_)), "{e}");
        // A deletion on the current revision.
        let mut gone = now.to_overlay();
        gone.services.remove("api");
        store
            .commit(&diff(&now.to_overlay(), &gone), &now)
            .await
            .expect("delete");

        // The watch from the first read brings the same state as a read now.
        let mut watch = store.watch(watch_from).await.unwrap();
        let mut followed = shared.clone();
        let end = store.load().await.unwrap();
        while followed.services != end.services {
            let resp = tokio::time::timeout(Duration::from_secs(5), watch.message())
                .await
                .expect("the watch brings every change")
                .unwrap()
                .expect("watch open");
            apply_events(&mut followed, &store.keys, &resp);
        }
        assert_eq!(followed.revision, end.revision);
        assert_eq!(followed.services, end.services);
        assert_eq!(
            followed.to_overlay().services.keys().collect::<Vec<_>>(),
            ["web"]
        );

        // The sticky key: created once, the same for every later caller.
        let k1 = store.sticky_key(&[1; 32]).await.unwrap();
        let k2 = store.sticky_key(&[2; 32]).await.unwrap();
        assert_eq!(k1, vec![1; 32]);
        assert_eq!(k2, k1);

        // A health view under a lease: there while kept alive, gone after its TTL.
        let lease = store.grant(1).await.unwrap();
        let mut view = HealthView::default();
        view.down
            .entry("web".into())
            .or_default()
            .insert("198.18.1.11:80".parse().unwrap());
        store.publish("lb1", &view, lease).await.unwrap();
        assert_eq!(store.load().await.unwrap().health["lb1"], view);
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.load().await.unwrap().health.contains_key("lb1") {
            assert!(Instant::now() < deadline, "the view outlived its lease");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
