//! Active health checks of backends.
//!
//! A [`HealthChecker`] runs one tokio task per checked [`Target`]: `tcp` (a connect)
//! or `http` (a `GET` whose status must fall within a range); `kind = "none"`
//! targets get no task and are always up. Each task checks its backend every
//! `interval_ms` (±10 %, and the first check after a random part of an interval, so
//! checks of many backends do not synchronise), each check bounded by `timeout_ms`.
//!
//! Verdicts follow the rise/fall state machine of `state.rs`: a new target starts up
//! (an agent restart never takes a serving backend out before it has evidence),
//! goes down after `fall` consecutive failures and comes back after `rise`
//! consecutive successes. Every change is logged with its reason and the check's
//! latency, and sent as a [`Transition`] to whoever feeds the reconciler.

mod http;
mod probe;
mod state;
mod tcp;
#[cfg(test)]
mod testutil;

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, sleep_until};

pub use http::{MAX_BODY_BYTES, MAX_HEAD_BYTES};
pub use probe::CheckError;

use crate::config::HealthConfig;
use probe::Probe;
use state::TargetState;

/// Reason shown for targets with `kind = "none"`.
const DISABLED_REASON: &str = "checks disabled";

/// Which backend a check is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct TargetKey {
    /// Name of the service the backend belongs to.
    pub service: String,
    /// Backend address.
    pub address: IpAddr,
    /// Backend port (the one checked).
    pub port: u16,
}

impl TargetKey {
    /// The address checks connect to.
    #[must_use]
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

impl fmt::Display for TargetKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.service, self.socket_addr())
    }
}

/// A backend to check, and how.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// The backend.
    pub key: TargetKey,
    /// Its service's health check.
    pub config: HealthConfig,
    /// The protocol an `http` check speaks: the one the proxy speaks to the backend.
    pub speaks: Speaks,
}

/// How an `http` check reaches a backend: its service's `backend_protocol` and
/// `backend_tls` (an l7 service's backends get checked in the protocol they are
/// served in; l4 services and `http1` without TLS: the plain HTTP/1.1 check).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Speaks {
    /// `backend_protocol`.
    pub protocol: crate::config::BackendProtocol,
    /// `backend_tls`.
    pub tls: Option<crate::config::BackendTlsConfig>,
}

/// Sent on every up<->down change.
#[derive(Clone, Debug)]
pub struct Transition {
    /// The backend.
    pub key: TargetKey,
    /// The new verdict.
    pub up: bool,
    /// Outcome of the check that decided ("connect refused", "status 200", ...).
    pub reason: String,
    /// Duration of that check.
    pub latency: Duration,
    /// When the change happened.
    pub at: std::time::Instant,
}

/// Health of one target, for the API (`health` of a backend, see `api::types`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[schema(as = HealthStatus)]
pub struct Status {
    /// Current verdict.
    pub up: bool,
    /// Completed checks.
    pub checks: u64,
    /// Completed checks that failed.
    pub failures: u64,
    /// Outcome of the last check; empty before the first one.
    pub last_reason: String,
    /// Duration of the last check, in milliseconds.
    pub last_latency_ms: f64,
    /// Current streak of successful checks.
    pub consecutive_ok: u32,
    /// Current streak of failed checks.
    pub consecutive_fail: u32,
}

/// Health state shared between the checker and its tasks.
type Shared = Arc<Mutex<HashMap<TargetKey, Entry>>>;

/// One target's state, owned by the task of generation `generation`: a task whose
/// target was removed or restarted finds a different (or no) entry and stops, so a
/// check that was in flight when its task was aborted cannot write stale results.
#[derive(Debug)]
struct Entry {
    generation: u64,
    state: TargetState,
}

/// A target the checker knows, with its task (none for `kind = "none"`).
#[derive(Debug)]
struct Running {
    config: HealthConfig,
    speaks: Speaks,
    task: Option<JoinHandle<()>>,
}

impl Running {
    fn stop(&self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Runs the health checks of a set of targets; see the [module docs](self).
pub struct HealthChecker {
    shared: Shared,
    running: HashMap<TargetKey, Running>,
    events: UnboundedSender<Transition>,
    observe: Arc<dyn Fn(Duration) + Send + Sync>,
    next_generation: u64,
}

impl fmt::Debug for HealthChecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HealthChecker")
            .field("targets", &self.running.len())
            .finish_non_exhaustive()
    }
}

impl HealthChecker {
    /// A checker with no targets. Transitions go to `events` (a closed receiver is
    /// fine); `observe` gets the duration of every completed check (success or
    /// failure), for the `xdplb_health_check_seconds` histogram.
    pub fn new(
        events: UnboundedSender<Transition>,
        observe: Arc<dyn Fn(Duration) + Send + Sync>,
    ) -> Self {
        Self {
            shared: Shared::default(),
            running: HashMap::new(),
            events,
            observe,
            next_generation: 0,
        }
    }

    /// Diffs against the running set: starts checks for new targets, stops removed
    /// ones, restarts those whose config changed (keeping their current up/down
    /// state and counters, forgetting their streaks). `kind = "none"`: no task,
    /// always up (a down target switched to it comes up, with a [`Transition`]).
    /// Of duplicate keys the last wins. Must be called from within a tokio runtime.
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        let wanted: BTreeMap<TargetKey, (HealthConfig, Speaks)> = targets
            .into_iter()
            .map(|t| (t.key, (t.config, t.speaks)))
            .collect();
        let mut shared = lock(&self.shared);
        self.running.retain(|key, running| {
            let keep = wanted.contains_key(key);
            if !keep {
                running.stop();
                shared.remove(key);
            }
            keep
        });
        for (key, (config, speaks)) in wanted {
            if self
                .running
                .get(&key)
                .is_some_and(|r| r.config == config && r.speaks == speaks)
            {
                continue;
            }
            let generation = self.next_generation;
            self.next_generation += 1;
            let probe = Probe::new(&config, key.socket_addr(), &speaks);
            match shared.entry(key.clone()) {
                MapEntry::Occupied(mut entry) => {
                    let entry = entry.get_mut();
                    entry.generation = generation;
                    entry.state.reset_streaks();
                    if probe.is_none() {
                        DISABLED_REASON.clone_into(&mut entry.state.last_reason);
                        if !entry.state.up {
                            entry.state.up = true;
                            self.transition(&key, true, DISABLED_REASON, Duration::ZERO);
                        }
                    }
                }
                MapEntry::Vacant(entry) => {
                    let reason = if probe.is_none() { DISABLED_REASON } else { "" };
                    entry.insert(Entry {
                        generation,
                        state: TargetState::new(reason),
                    });
                }
            }
            let task = probe.map(|probe| {
                let task = Task {
                    key: key.clone(),
                    generation,
                    probe,
                    interval: Duration::from_millis(config.interval_ms.max(1)),
                    timeout: Duration::from_millis(config.timeout_ms.max(1)),
                    rise: config.rise,
                    fall: config.fall,
                    shared: Arc::clone(&self.shared),
                    events: self.events.clone(),
                    observe: Arc::clone(&self.observe),
                };
                tokio::spawn(task.run())
            });
            if let Some(old) = self.running.insert(
                key,
                Running {
                    config,
                    speaks,
                    task,
                },
            ) {
                old.stop();
            }
        }
    }

    /// Current up/down of a target; `None` if unknown (callers treat unknown targets
    /// as up). `kind = "none"` targets are always up.
    #[must_use]
    pub fn is_up(&self, key: &TargetKey) -> Option<bool> {
        lock(&self.shared).get(key).map(|entry| entry.state.up)
    }

    /// Status of every target, ordered by key.
    #[must_use]
    pub fn status(&self) -> Vec<(TargetKey, Status)> {
        let mut all: Vec<_> = lock(&self.shared)
            .iter()
            .map(|(key, entry)| (key.clone(), entry.state.status()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Stops every task and forgets every target.
    pub fn shutdown(&mut self) {
        let mut shared = lock(&self.shared);
        for (_, running) in self.running.drain() {
            running.stop();
        }
        shared.clear();
    }

    /// Logs and sends a change the checker itself decided (not a check).
    fn transition(&self, key: &TargetKey, up: bool, reason: &str, latency: Duration) {
        log_transition(key, up, reason, latency);
        // Nobody listening is fine: the state is still queryable.
        let _ = self.events.send(Transition {
            key: key.clone(),
            up,
            reason: reason.to_owned(),
            latency,
            at: std::time::Instant::now(),
        });
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for running in self.running.values() {
            running.stop();
        }
    }
}

/// The check loop of one target.
struct Task {
    key: TargetKey,
    generation: u64,
    probe: Probe,
    interval: Duration,
    timeout: Duration,
    rise: u32,
    fall: u32,
    shared: Shared,
    events: UnboundedSender<Transition>,
    observe: Arc<dyn Fn(Duration) + Send + Sync>,
}

impl Task {
    async fn run(self) {
        let addr = self.key.socket_addr();
        sleep(first_delay(self.interval)).await;
        loop {
            let started = Instant::now();
            let result = self.probe.check(addr, self.timeout).await;
            let latency = started.elapsed();
            (self.observe)(latency);
            if !self.record(result, latency) {
                return;
            }
            sleep_until(started + next_delay(self.interval)).await;
        }
    }

    /// Records a completed check; `false` if this task has been superseded.
    fn record(&self, result: Result<String, CheckError>, latency: Duration) -> bool {
        let (ok, reason) = match result {
            Ok(detail) => (true, detail),
            Err(err) => (false, err.to_string()),
        };
        let changed = {
            let mut shared = lock(&self.shared);
            let Some(entry) = shared
                .get_mut(&self.key)
                .filter(|e| e.generation == self.generation)
            else {
                return false;
            };
            let changed = entry
                .state
                .record(ok, reason.clone(), latency, self.rise, self.fall);
            if let Some(up) = changed {
                // Sent under the lock so that events keep the order of the changes.
                let _ = self.events.send(Transition {
                    key: self.key.clone(),
                    up,
                    reason: reason.clone(),
                    latency,
                    at: std::time::Instant::now(),
                });
            }
            changed
        };
        match changed {
            Some(up) => log_transition(&self.key, up, &reason, latency),
            None => tracing::debug!(
                service = %self.key.service,
                backend = %self.key.address,
                port = self.key.port,
                ok,
                reason = reason.as_str(),
                latency_ms = millis(latency),
                "health check",
            ),
        }
        true
    }
}

fn log_transition(key: &TargetKey, up: bool, reason: &str, latency: Duration) {
    let (service, addr, port, latency_ms) =
        (key.service.as_str(), key.address, key.port, millis(latency));
    if up {
        tracing::info!(service, backend = %addr, port, reason, latency_ms, "backend up");
    } else {
        tracing::warn!(service, backend = %addr, port, reason, latency_ms, "backend down");
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Delay before a target's first check: uniform in `[0, interval)`.
fn first_delay(interval: Duration) -> Duration {
    if interval.is_zero() {
        return Duration::ZERO;
    }
    rand::rng().random_range(Duration::ZERO..interval)
}

/// Time from one check's start to the next: `interval` ±10 %.
fn next_delay(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.9..=1.1))
}

/// Locks the shared state; a panic elsewhere does not make it unusable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
