//! `failover`: how long a dead backend keeps failing client connections, for a few
//! health-check settings.
//!
//! For every setting (kind, `interval_ms`, `timeout_ms`, `fall`; `rise` 2) one run
//! builds the step-1 test bed ([`L4Bed`]: client, router, the LB running the real
//! lb-agent with XDP, three backends with HTTP servers) with service `web` on the VIP
//! and those health checks, then:
//! - starts bounded continuous client traffic ([`Load`]: short `Connection: close` GETs
//!   to the VIP on [`THREADS`] threads, [`PAUSE`] between two requests of a thread);
//! - after [`WARMUP`] stops be2's server: its listening socket is closed when `stop`
//!   returns, which is t0 (connects to it are refused from then on);
//! - lets the traffic run on for the setting's window + [`TAIL`], then reads:
//!   - detected after: the agent's `health change applied ... up=false` line for be2
//!     (RFC 3339 UTC time) minus t0 on the wall clock;
//!   - last failure after: start of the last failed connection minus t0 (the moment
//!     after which no connection failed);
//!   - failed / total: connections that failed, of those that were in flight at the
//!     stop or started after it (until the end of the traffic);
//!   - the window it is compared with: `fall × interval × 1.1` (the checker's +10 %
//!     jitter) `+ timeout`.
//!
//! Runs of the different settings are interleaved (run 1 of every setting, then run 2,
//! ...). Each run is bounded (window + about 3 s of traffic, plus setting up the bed),
//! and its namespaces are removed when it ends, also on error or panic. It is a
//! measurement, not a test: nothing is asserted about time.

use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use xdplb_tests::{
    config::{BackendConfig, LbConfig, ServiceConfig},
    load::{self, Load, Sample},
    scenario::{BedOptions, L4Bed},
    topology::{BACKEND_ADDRS, LB_ADDR, vip_socket},
};

use crate::report::{Cell, Report};

const DEFAULT_RUNS: usize = 2;
const MAX_RUNS: usize = 10;

/// Client threads of the traffic.
const THREADS: usize = 3;
/// Pause between two requests of a client thread.
const PAUSE: Duration = Duration::from_millis(5);
/// Traffic before the backend dies.
const WARMUP: Duration = Duration::from_millis(1000);
/// Traffic after the setting's window.
const TAIL: Duration = Duration::from_millis(1500);
/// Extra time to wait for the agent's log line after the traffic ended.
const LOG_GRACE: Duration = Duration::from_secs(2);
/// The backend that dies (index into [`BACKEND_ADDRS`]): be2.
const VICTIM: usize = 1;
/// `rise` of every setting.
const RISE: u32 = 2;

/// Arguments of `failover`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Runs per setting, 1 to 10; the table shows their median and min.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RUNS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_RUNS as u64))]
    runs: usize,
}

/// One health-check setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Setting {
    kind: &'static str,
    interval_ms: u64,
    timeout_ms: u64,
    fall: u32,
}

/// The settings measured, fastest first.
const SETTINGS: [Setting; 5] = [
    Setting::new("http", 100, 80, 2),
    Setting::new("http", 200, 150, 2),
    Setting::new("tcp", 200, 150, 2),
    Setting::new("http", 500, 300, 2),
    Setting::new("http", 1000, 500, 3),
];

impl Setting {
    const fn new(kind: &'static str, interval_ms: u64, timeout_ms: u64, fall: u32) -> Self {
        Self {
            kind,
            interval_ms,
            timeout_ms,
            fall,
        }
    }

    /// The service's `health = { ... }`.
    fn health_toml(&self) -> String {
        let path = if self.kind == "http" {
            r#", path = "/healthz""#
        } else {
            ""
        };
        format!(
            r#"{{ kind = "{}"{path}, interval_ms = {}, timeout_ms = {}, rise = {RISE}, fall = {} }}"#,
            self.kind, self.interval_ms, self.timeout_ms, self.fall
        )
    }

    /// `fall × interval × 1.1 + timeout`.
    fn window(&self) -> Duration {
        Duration::from_millis(self.interval_ms).mul_f64(1.1) * self.fall
            + Duration::from_millis(self.timeout_ms)
    }

    fn label(&self) -> String {
        format!(
            "{} {}/{} ms, fall {}",
            self.kind, self.interval_ms, self.timeout_ms, self.fall
        )
    }

    fn config(&self) -> LbConfig {
        let svc = BACKEND_ADDRS.iter().fold(
            ServiceConfig::new("web", vip_socket()).health(&self.health_toml()),
            |s, &a| s.backend(BackendConfig::new(a)),
        );
        LbConfig::new("eth0")
            .source_ipv4(LB_ADDR)
            .sizes(65537, 65536)
            .service(svc)
    }
}

/// What one run observed. Times are milliseconds after t0.
#[derive(Clone, Debug, Default)]
struct Outcome {
    /// `health change applied ... up=false` for the victim.
    applied_ms: Option<f64>,
    /// `backend down` for the victim (the checker's verdict).
    verdict_ms: Option<f64>,
    /// Start of the last failed connection in flight at or started after the stop.
    last_failure_ms: Option<f64>,
    /// Connections in flight at or started after the stop, and how many of them failed.
    total: usize,
    failed: usize,
    /// End of the traffic.
    end_ms: f64,
    /// How long stopping the server took (t0 is when it returned).
    stop_ms: f64,
    /// Problems with the run that make its figures doubtful.
    warnings: Vec<String>,
}

fn ms_between(later: Instant, earlier: Instant) -> f64 {
    if later >= earlier {
        (later - earlier).as_secs_f64() * 1000.0
    } else {
        -(earlier - later).as_secs_f64() * 1000.0
    }
}

/// One run of `setting`: bed up, traffic, be2 stops, bed down.
fn run_once(setting: &Setting) -> anyhow::Result<Outcome> {
    let victim: IpAddr = BACKEND_ADDRS[VICTIM].into();
    let victim_name = format!("be{}", VICTIM + 1);
    let mut bed = L4Bed::start(&BedOptions {
        config: setting.config(),
        ..BedOptions::default()
    })
    .context("starting the test bed")?;
    let load = Load::start(
        &bed.topo.client.ns,
        THREADS,
        WARMUP + setting.window() + TAIL,
        PAUSE,
    )?;
    thread::sleep(WARMUP);
    let mark = bed.topo.agent_log().len();
    let asked = Instant::now();
    bed.servers.remove(VICTIM).stop()?;
    let t0 = Instant::now();
    let t0_wall = load::wall_of(t0);
    let samples = load.finish()?;
    let traffic_end = Instant::now();

    let addr = victim.to_string();
    let applied = load::wait_for_log(
        &bed.topo,
        mark,
        &["health change applied", &addr, "up=false"],
        LOG_GRACE,
    )
    .ok();
    let log = bed.topo.agent_log();
    let verdict = load::find_log_line(&log, mark, &["backend down", &addr]);
    let after_t0 = |line: &String| load::log_time(line).map(|t| (t - t0_wall) * 1000.0);

    let mut out = Outcome {
        applied_ms: applied.as_ref().and_then(after_t0),
        verdict_ms: verdict.as_ref().and_then(after_t0),
        end_ms: ms_between(traffic_end, t0),
        stop_ms: ms_between(t0, asked),
        ..Outcome::default()
    };
    let (before, after): (Vec<&Sample>, Vec<&Sample>) = samples.iter().partition(|s| s.end < asked);
    out.total = after.len();
    let failures: Vec<&&Sample> = after.iter().filter(|s| !s.ok()).collect();
    out.failed = failures.len();
    out.last_failure_ms = failures
        .iter()
        .map(|s| ms_between(s.start, t0))
        .reduce(f64::max);

    let warm = load::tally(before.iter().copied());
    if let Some(n) = warm.get("FAILED") {
        out.warnings.push(format!(
            "{n} connections failed before the stop (warm-up: {warm:?})"
        ));
    }
    for b in 1..=BACKEND_ADDRS.len() {
        if !warm.contains_key(&format!("be{b}")) {
            out.warnings
                .push(format!("be{b} answered no connection before the stop"));
        }
    }
    if let Some(s) = after
        .iter()
        .find(|s| s.start > t0 && s.backend() == Some(victim_name.as_str()))
    {
        out.warnings.push(format!(
            "{victim_name} answered a connection started {:.0} ms after it stopped",
            ms_between(s.start, t0)
        ));
    }
    if out.applied_ms.is_none() {
        out.warnings.push(format!(
            "the agent logged no `health change applied` with up=false for {addr} within {:.1} s of t0",
            out.end_ms / 1000.0 + LOG_GRACE.as_secs_f64()
        ));
    }
    // Still failing at the end: no reroute seen.
    if let Some(last) = out.last_failure_ms {
        let last_start = samples.last().map_or(t0, |s| s.start);
        if last + 200.0 > ms_between(last_start, t0) {
            out.warnings.push(format!(
                "connections still failed at the end of the traffic ({last:.0} ms after t0)"
            ));
        }
    }
    drop(bed);
    Ok(out)
}

/// failed / total connections of each run, as two cells of samples.
fn counts(outcomes: &[Outcome]) -> Cell {
    let failed: Vec<f64> = outcomes.iter().map(|o| o.failed as f64).collect();
    let total: Vec<f64> = outcomes.iter().map(|o| o.total as f64).collect();
    let (f, t) = (Cell::samples("", 0, &failed), Cell::samples("", 0, &total));
    let shown = format!("{} / {}", f.shown(), t.shown());
    f.with_shown(shown)
}

/// Runs every setting `args.runs` times (interleaved) and prints the table.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!(
        "failover: {} settings x {} runs; each run builds the bed, kills be2's server under traffic, tears the bed down",
        SETTINGS.len(),
        args.runs
    );
    let mut results: Vec<Vec<Outcome>> = vec![Vec::new(); SETTINGS.len()];
    for run in 0..args.runs {
        for (setting, outcomes) in SETTINGS.iter().zip(&mut results) {
            let o = run_once(setting)
                .with_context(|| format!("run {} of {}", run + 1, setting.label()))?;
            eprintln!(
                "  run {} {:<26} applied {} / last failure {} / {} of {} failed",
                run + 1,
                setting.label(),
                o.applied_ms
                    .map_or("-".to_owned(), |v| format!("{v:.0} ms")),
                o.last_failure_ms
                    .map_or("-".to_owned(), |v| format!("{v:.0} ms")),
                o.failed,
                o.total
            );
            outcomes.push(o);
        }
    }
    report(args, &results, started.elapsed())
}

fn report(args: &Args, results: &[Vec<Outcome>], took: Duration) -> anyhow::Result<()> {
    let mut report = Report::new(
        "failover",
        format!(
            "be2 of 3 backends dies under traffic ({THREADS} client threads, short connections, \
             {} ms pause); {} run(s) per setting{}",
            PAUSE.as_millis(),
            args.runs,
            if args.runs > 1 {
                ", figures are median (min-max)"
            } else {
                ""
            }
        ),
    );
    let table = report.table(
        "",
        &[
            ("health (interval/timeout)", false),
            ("window (fall x interval + timeout)", false),
            ("detected after", true),
            ("last failure after", true),
            ("failed / total connections", true),
        ],
    );
    for (s, o) in SETTINGS.iter().zip(results) {
        table.row(vec![
            Cell::text(s.label()),
            Cell::text(format!(
                "{} x {} + {} = {:.0} ms",
                s.fall,
                s.interval_ms,
                s.timeout_ms,
                s.window().as_secs_f64() * 1000.0
            )),
            Cell::maybe_samples(
                "ms",
                0,
                &o.iter().map(|o| o.applied_ms).collect::<Vec<_>>(),
                "not logged",
            ),
            Cell::maybe_samples(
                "ms",
                0,
                &o.iter().map(|o| o.last_failure_ms).collect::<Vec<_>>(),
                "none failed",
            ),
            counts(o),
        ]);
    }

    let all: Vec<&Outcome> = results.iter().flatten().collect();
    let beyond: Vec<String> = SETTINGS
        .iter()
        .zip(results)
        .flat_map(|(s, o)| {
            let w = s.window().as_secs_f64() * 1000.0;
            o.iter()
                .filter_map(move |o| o.applied_ms.filter(|&a| a > w))
                .map(move |a| format!("{} detected after {a:.0} ms > window {w:.0} ms", s.label()))
        })
        .collect();
    let apply_gap = all
        .iter()
        .filter_map(|o| Some(o.applied_ms? - o.verdict_ms?))
        .fold(f64::NAN, f64::max);
    let stop_max = all.iter().map(|o| o.stop_ms).fold(f64::NAN, f64::max);
    report.note(format!(
        "Method: each run builds the namespace test bed (client, router, LB with lb-agent and XDP, be1..be3
with HTTP servers), service web with the health check shown and rise {RISE}. After {} ms of traffic
be2's server stops; t0 = the moment its listening socket is closed (stopping took at most {stop_max:.0} ms),
so from t0 connects to it and its checks are refused at once (no check waits for its timeout).
- window = fall x interval x 1.1 (the checker's +10% jitter) + timeout: the longest the agent should
  take. A refused check fails at once, so expect about (fall - 1 + U(0,1)) x interval.
- detected after = time of the agent's \"health change applied ... up=false\" log line for be2 (its
  RFC 3339 UTC stamp) - t0 on the wall clock: the maps are rewritten by then. The checker's own
  \"backend down\" line came at most {apply_gap:.1} ms before it.
- last failure after = start of the last failed client connection - t0: after it none failed (the
  reroute). Negative: only connections already in flight at t0 failed.
- failed / total = connections in flight at t0 or started after it, until {} ms after the window; about
  a third of those started before the reroute go to be2 and are refused.
{} runs took {:.0} s in all.",
        WARMUP.as_millis(),
        TAIL.as_millis(),
        all.len(),
        took.as_secs_f64()
    ));
    if !beyond.is_empty() {
        report.note(format!(
            "Detection beyond the window: {}",
            beyond.join("; ")
        ));
    }
    let warnings: Vec<String> = SETTINGS
        .iter()
        .zip(results)
        .flat_map(|(s, o)| {
            o.iter().enumerate().flat_map(move |(i, o)| {
                o.warnings
                    .iter()
                    .map(move |w| format!("{} run {}: {w}", s.label(), i + 1))
            })
        })
        .collect();
    if !warnings.is_empty() {
        report.note(format!(
            "Warnings (figures of these runs are doubtful):\n  {}",
            warnings.join("\n  ")
        ));
    }
    report.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_render_as_agent_config() {
        assert_eq!(
            SETTINGS[0].health_toml(),
            r#"{ kind = "http", path = "/healthz", interval_ms = 100, timeout_ms = 80, rise = 2, fall = 2 }"#
        );
        assert_eq!(
            SETTINGS[2].health_toml(),
            r#"{ kind = "tcp", interval_ms = 200, timeout_ms = 150, rise = 2, fall = 2 }"#
        );
        assert_eq!(SETTINGS[4].window(), Duration::from_millis(3800));
        assert!(
            SETTINGS
                .iter()
                .all(|s| s.timeout_ms <= s.interval_ms && s.interval_ms >= 50)
        );
    }

    #[test]
    fn summaries_and_args() {
        assert_eq!(
            Cell::maybe_samples("ms", 0, &[Some(10.0)], "x").shown(),
            "10 ms"
        );
        assert_eq!(
            Cell::maybe_samples("ms", 0, &[Some(30.0), Some(10.0), None], "none").shown(),
            "20 ms (10-30), 1x none"
        );
        let o = |failed, total| Outcome {
            failed,
            total,
            ..Outcome::default()
        };
        assert_eq!(
            counts(&[o(3, 90), o(1, 100), o(2, 95)]).shown(),
            "2 (1-3) / 95 (90-100)"
        );
        use clap::Parser as _;
        let a = |v: &[&str]| {
            let argv = ["xdplb-bench", "failover"].iter().chain(v);
            crate::Cli::try_parse_from(argv).map(|cli| match cli.benchmark {
                crate::Benchmark::Failover(args) => args.runs,
                other => panic!("parsed as {other:?}"),
            })
        };
        assert_eq!(a(&[]).unwrap(), DEFAULT_RUNS);
        assert_eq!(a(&["--runs", "3"]).unwrap(), 3);
        assert_eq!(a(&["--runs=1"]).unwrap(), 1);
        assert_eq!(
            a(&["--help"]).unwrap_err().kind(),
            clap::error::ErrorKind::DisplayHelp
        );
        assert!(a(&["--runs", "0"]).is_err());
        assert!(a(&["--runs", "11"]).is_err());
        assert!(a(&["--bogus"]).is_err());
    }
}
