//! The agent's log: `tracing` events (the L7 access log among them, target
//! `xdplb::access`) formatted by `tracing-subscriber` and written to stderr by a
//! [`tracing_appender::non_blocking`] writer: a worker thread drains a bounded buffer of
//! lines, so a request never waits for a `write(2)` to stderr (a pipe to journald, a
//! file, a terminal). When that buffer is full (the sink cannot keep up), lines are
//! dropped and counted rather than slowing the proxy: `xdplb_log_lines_dropped_total`.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::{EnvFilter, fmt};

/// Lines the buffer holds before it drops new ones.
const BUFFERED_LINES: usize = 65_536;

/// The writer's count of dropped lines, once [`init`] ran.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Install the subscriber (filter from `XDPLB_LOG`, default `info`; `log` records, e.g.
/// aya's, get through too). Keep the guard until the end of `main`: dropping it writes
/// out what is still buffered.
#[must_use = "dropping the guard at once flushes and stops the log writer"]
pub fn init() -> WorkerGuard {
    let filter = EnvFilter::try_from_env("XDPLB_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("xdplb-log")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    fmt().with_env_filter(filter).with_writer(writer).init();
    guard
}

/// Log lines dropped because the writer could not keep up (None: [`init`] did not run,
/// as in tests).
#[must_use]
pub fn dropped_lines() -> Option<usize> {
    DROPPED.get().map(ErrorCounter::dropped_lines)
}
