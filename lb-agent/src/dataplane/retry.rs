//! Failed writes of the desired state into the fast path, and when to try again.
//!
//! A change is accepted (and persisted) before it is written to the maps; when a map
//! write fails, the desired state stays accepted and the write is retried with an
//! exponential backoff ([`backoff`]: [`FIRST_RETRY`] doubling up to [`MAX_RETRY`]) until
//! one succeeds. [`WriteRetry`] keeps that state; [`SyncStatus`] is how the API
//! (`"dataplane"` in `GET /api/v1/stats`) and the metrics
//! (`xdplb_dataplane_sync_pending`, `xdplb_dataplane_sync_failures_total`) show it.
//!
//! The backoff is two lines of arithmetic here rather than a crate (backon,
//! backoff): the retries are driven by the agent's event loop, which needs the next
//! deadline as a value to show and to sleep on, not a retrying future.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Delay before the first retry.
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest delay between two attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(10);

/// Delay after the `failures`-th failed attempt in a row (1-based).
#[must_use]
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY)
}

/// Whether the last desired state is in the maps, and if not, since when and when the
/// next attempt is due.
#[derive(Debug, Default)]
pub struct WriteRetry {
    pending: Option<Pending>,
    failures_total: u64,
}

#[derive(Debug)]
struct Pending {
    /// Failed attempts in a row.
    attempts: u32,
    last_error: String,
    since: Instant,
    next: Instant,
}

impl WriteRetry {
    /// A write failed at `now`: returns when to try again.
    pub fn failed(&mut self, error: &anyhow::Error, now: Instant) -> Instant {
        self.failures_total += 1;
        let p = self.pending.get_or_insert(Pending {
            attempts: 0,
            last_error: String::new(),
            since: now,
            next: now,
        });
        p.attempts += 1;
        p.last_error = format!("{error:#}");
        p.next = now + backoff(p.attempts);
        p.next
    }

    /// A write succeeded: returns how many failed attempts in a row it ends, if any.
    pub fn succeeded(&mut self) -> Option<u32> {
        self.pending.take().map(|p| p.attempts)
    }

    /// When the next attempt is due (None: nothing pending).
    #[must_use]
    pub fn next_attempt(&self) -> Option<Instant> {
        self.pending.as_ref().map(|p| p.next)
    }

    /// Whether an attempt is due at `now`.
    #[must_use]
    pub fn due(&self, now: Instant) -> bool {
        self.next_attempt().is_some_and(|next| next <= now)
    }

    #[must_use]
    pub fn status(&self, now: Instant) -> SyncStatus {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        match &self.pending {
            None => SyncStatus {
                failures_total: self.failures_total,
                ..SyncStatus::default()
            },
            Some(p) => SyncStatus {
                pending: true,
                attempts: p.attempts,
                last_error: Some(p.last_error.clone()),
                pending_ms: Some(ms(now.saturating_duration_since(p.since))),
                next_retry_ms: Some(ms(p.next.saturating_duration_since(now))),
                failures_total: self.failures_total,
            },
        }
    }
}

/// The `"dataplane"` object of `GET /api/v1/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SyncStatus {
    /// An accepted desired state is not (fully) in the maps yet; it is being retried.
    pub pending: bool,
    /// Failed attempts in a row while pending (0 when not).
    pub attempts: u32,
    /// Why the last attempt failed, while pending.
    pub last_error: Option<String>,
    /// For how long the maps have lagged behind, while pending.
    pub pending_ms: Option<u64>,
    /// Time until the next attempt, while pending.
    pub next_retry_ms: Option<u64>,
    /// Failed writes since the agent started.
    pub failures_total: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let delays: Vec<u128> = (1..=9).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]
        );
        assert_eq!(backoff(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn pending_until_a_write_succeeds() {
        let t0 = Instant::now();
        let mut r = WriteRetry::default();
        assert_eq!(r.status(t0), SyncStatus::default());
        assert!(!r.due(t0));

        let next = r.failed(&anyhow::anyhow!("map full"), t0);
        assert_eq!(next, t0 + FIRST_RETRY);
        assert!(!r.due(t0 + Duration::from_millis(99)));
        assert!(r.due(next));
        let s = r.status(t0 + Duration::from_millis(40));
        assert_eq!(
            s,
            SyncStatus {
                pending: true,
                attempts: 1,
                last_error: Some("map full".into()),
                pending_ms: Some(40),
                next_retry_ms: Some(60),
                failures_total: 1,
            }
        );

        let t1 = next;
        let next = r.failed(&anyhow::anyhow!("still full"), t1);
        assert_eq!(next, t1 + Duration::from_millis(200));
        let s = r.status(t1);
        assert_eq!((s.attempts, s.pending_ms), (2, Some(100)));
        assert_eq!(s.last_error.as_deref(), Some("still full"));

        assert_eq!(r.succeeded(), Some(2));
        assert_eq!(r.next_attempt(), None);
        assert_eq!(
            r.status(t1),
            SyncStatus {
                failures_total: 2,
                ..SyncStatus::default()
            }
        );
        assert_eq!(r.succeeded(), None);

        // A new failure starts from the first delay again.
        assert_eq!(r.failed(&anyhow::anyhow!("x"), t1), t1 + FIRST_RETRY);
        assert_eq!(r.status(t1).attempts, 1);
    }
}
