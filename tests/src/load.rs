//! Continuous client traffic for control-plane scenarios, and times from the agent's
//! log, shared by the `e2e_control` tests and the `failover` benchmark:
//! - [`Load`]: short `Connection: close` GETs to the VIP from the client on a few
//!   threads, each recorded as a [`Sample`] (start, end, backend or error, client port);
//!   [`between`] and [`tally`] slice and count them.
//! - [`wall_of`], [`log_time`], [`logged_at`]: the agent logs RFC 3339 UTC times; these
//!   put an [`Instant`] and a log line on the same clock (seconds since the epoch).
//! - [`find_log_line`], [`wait_for_log`]: a line of the agent's log with given words.

use std::{
    collections::BTreeMap,
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail};

use crate::{
    http, netns,
    topology::{Topology, vip_socket},
};

/// Bound on each client request of a [`Load`] (connect, send, receive).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Most requests one thread of a [`Load`] makes.
pub const MAX_REQUESTS_PER_THREAD: usize = 4000;

// --- continuous client traffic -------------------------------------------------------

/// One client request of a [`Load`].
#[derive(Clone, Debug)]
pub struct Sample {
    /// When the request started (before the connect).
    pub start: Instant,
    /// When it ended (answer read, or error).
    pub end: Instant,
    /// The backend that answered, or the error.
    pub outcome: Result<String, String>,
    /// The client's port (known for answered requests).
    pub port: Option<u16>,
}

impl Sample {
    /// Whether a backend answered with status 200.
    pub fn ok(&self) -> bool {
        self.outcome.is_ok()
    }

    /// The backend that answered, if one did.
    pub fn backend(&self) -> Option<&str> {
        self.outcome.as_deref().ok()
    }
}

/// Short `Connection: close` GETs to the VIP from the client, on `threads` threads, each
/// request bounded by [`REQUEST_TIMEOUT`], a `pause` between two requests of a thread,
/// for `duration` (and at most [`MAX_REQUESTS_PER_THREAD`] requests per thread).
#[derive(Debug)]
pub struct Load {
    workers: Vec<JoinHandle<anyhow::Result<Vec<Sample>>>>,
}

impl Load {
    /// Starts the threads in namespace `ns` (the client's).
    pub fn start(
        ns: &str,
        threads: usize,
        duration: Duration,
        pause: Duration,
    ) -> anyhow::Result<Self> {
        let end = Instant::now() + duration;
        let target = vip_socket();
        let workers = (0..threads)
            .map(|i| {
                netns::spawn_in_netns(ns, &format!("load-{i}"), move || {
                    let mut samples = Vec::new();
                    while Instant::now() < end && samples.len() < MAX_REQUESTS_PER_THREAD {
                        let start = Instant::now();
                        let (outcome, port) = match http::get(target, "/", REQUEST_TIMEOUT) {
                            Ok(r) if r.status == 200 => {
                                (Ok(r.backend().to_owned()), Some(r.local.port()))
                            }
                            Ok(r) => (
                                Err(format!("status {} from {}", r.status, r.backend())),
                                Some(r.local.port()),
                            ),
                            Err(e) => (Err(format!("{e:#}")), None),
                        };
                        samples.push(Sample {
                            start,
                            end: Instant::now(),
                            outcome,
                            port,
                        });
                        thread::sleep(pause);
                    }
                    Ok(samples)
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { workers })
    }

    /// Waits for the end; the samples in order of their start.
    pub fn finish(self) -> anyhow::Result<Vec<Sample>> {
        let mut all = Vec::new();
        for w in self.workers {
            all.extend(w.join().map_err(|_| anyhow!("load thread panicked"))??);
        }
        all.sort_by_key(|s| s.start);
        Ok(all)
    }
}

/// Samples started in `[from, to)`.
pub fn between(samples: &[Sample], from: Instant, to: Instant) -> Vec<&Sample> {
    samples
        .iter()
        .filter(|s| s.start >= from && s.start < to)
        .collect()
}

/// Answers per backend, and failures (under `"FAILED"`).
pub fn tally<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> BTreeMap<String, usize> {
    let mut t = BTreeMap::new();
    for s in samples {
        *t.entry(s.backend().unwrap_or("FAILED").to_owned())
            .or_default() += 1;
    }
    t
}

// --- the agent's log -----------------------------------------------------------------

/// Wall-clock time of `instant` (measured against now), as seconds since the epoch.
pub fn wall_of(instant: Instant) -> f64 {
    let (now, now_wall) = (Instant::now(), SystemTime::now());
    let now_wall = now_wall
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    now_wall - now.saturating_duration_since(instant).as_secs_f64()
        + instant.saturating_duration_since(now).as_secs_f64()
}

/// The time of a log line (`2026-11-21T06:01:02.123456Z ...`, UTC) as seconds since the
/// epoch.
pub fn log_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, mi) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60) as f64 + s)
}

/// Where the line was logged relative to `t0`, in milliseconds (if it has a time).
pub fn logged_at(line: &str, t0: Instant) -> Option<f64> {
    Some((log_time(line)? - wall_of(t0)) * 1000.0)
}

/// The first log line after byte `from` that contains every one of `needles`.
pub fn find_log_line(log: &str, from: usize, needles: &[&str]) -> Option<String> {
    log.get(from..)?
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
}

/// Polls `cond` every `every` until it holds (returning how long that took) or `limit`
/// passes (an error naming `what`).
pub fn wait_for(
    what: &str,
    limit: Duration,
    every: Duration,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if cond()? {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(start.elapsed() < limit, "{what}: not within {limit:?}");
        thread::sleep(every);
    }
}

/// Polls the agent's log (from byte `from`) for a line with every one of `needles`.
pub fn wait_for_log(
    topo: &Topology,
    from: usize,
    needles: &[&str],
    timeout: Duration,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = find_log_line(&topo.agent_log(), from, needles) {
            return Ok(l);
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not log a line with {needles:?} within {timeout:?}; its log (tail):\n{}",
                topo.agent_log_tail(30)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_times_parse() {
        // 2026-11-21T06:01:02.5Z = 1_795_240_862.5 s since the epoch.
        let t = log_time("2026-11-21T06:01:02.500000Z  WARN backend down").unwrap();
        assert!((t - 1_795_240_862.5).abs() < 1e-6, "{t}");
        assert_eq!(log_time("no time here"), None);
    }

    #[test]
    fn log_lines_are_found_after_the_mark() {
        let log = "a up=false x\nb up=false y\n";
        assert_eq!(
            find_log_line(log, 0, &["up=false", "y"]).as_deref(),
            Some("b up=false y")
        );
        assert_eq!(find_log_line(log, 13, &["x"]), None);
        assert_eq!(find_log_line(log, 999, &["x"]), None);
    }
}
