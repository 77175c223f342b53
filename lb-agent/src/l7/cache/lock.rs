//! The collapsing lock (request collapsing), after pingora-cache's `lock`: of the
//! concurrent misses of one key, the first gets a [`WritePermit`] and goes upstream;
//! the others get a [`ReadLock`] and wait for it (at most [`COLLAPSE_WAIT`]), then
//! look in the store again. A permit is released when dropped: once the leader's
//! response is stored, or known not to be.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::store::Key;

/// How long a collapsed request waits for the leader before going upstream itself.
pub const COLLAPSE_WAIT: Duration = Duration::from_secs(30);

/// Keys with an upstream request under way that others may wait for.
type Flights = Arc<Mutex<HashMap<Key, watch::Receiver<()>>>>;

fn flights(f: &Flights) -> MutexGuard<'_, HashMap<Key, watch::Receiver<()>>> {
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The cache's collapsing lock.
#[derive(Debug, Default)]
pub(super) struct CacheLock {
    flights: Flights,
}

/// What [`CacheLock::lock`] gives.
pub(super) enum Locked {
    /// Nobody is fetching the key: this request does, and holds the lock.
    Write(WritePermit),
    /// Another request is fetching the key: wait for it.
    Read(ReadLock),
}

/// The lead of a collapsed fetch: dropping it wakes the waiters.
pub(super) struct WritePermit {
    flights: Flights,
    key: Key,
    _done: watch::Sender<()>,
}

impl Drop for WritePermit {
    fn drop(&mut self) {
        // Only the leader inserts the key and only its drop removes it; the sender
        // drops after this, which wakes the waiters.
        flights(&self.flights).remove(&self.key);
    }
}

/// A wait for the lead of a collapsed fetch.
pub(super) struct ReadLock(watch::Receiver<()>);

impl ReadLock {
    /// Wait until the leader is done, or [`COLLAPSE_WAIT`] has passed.
    pub(super) async fn wait(mut self) {
        let _ = tokio::time::timeout(COLLAPSE_WAIT, self.0.changed()).await;
    }
}

impl CacheLock {
    /// Become the one fetching `key`, or get a lock that waits for the one already
    /// fetching it.
    pub(super) fn lock(&self, key: &Key) -> Locked {
        let mut map = flights(&self.flights);
        if let Some(rx) = map.get(key) {
            return Locked::Read(ReadLock(rx.clone()));
        }
        let (tx, rx) = watch::channel(());
        map.insert(key.clone(), rx);
        Locked::Write(WritePermit {
            flights: Arc::clone(&self.flights),
            key: key.clone(),
            _done: tx,
        })
    }
}
