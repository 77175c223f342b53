//! The agent's log: `tracing` events (the L7 access log among them, target
//! `xdplb::access`) formatted by `tracing-subscriber` and written to stderr in batches
//! by one writer thread: an event appends its line to a shared buffer (a lock and a
//! copy: no system call, no wake-up of another thread), and the writer thread takes
//! what has gathered every [`FLUSH_EVERY`] (or as soon as [`FLUSH_BYTES`] are waiting)
//! and writes it with one `write(2)`. A request never waits for stderr (a pipe to
//! journald, a file, a terminal). When the buffer holds [`BUFFERED_BYTES`] (the sink
//! cannot keep up), new lines are dropped and counted rather than slowing the proxy:
//! `xdplb_log_lines_dropped_total`.
//!
//! Why not `tracing-appender`'s non-blocking writer, used before: it hands every line
//! to its thread through a channel, which wakes that thread for nearly every line
//! under load: measured with `bench l7` (access log on, one worker), the log cost twice
//! the CPU per request of the proxy without it.
//!
//! The access log has a path of its own ([`access_line`]): once [`init`] has installed
//! the writer, an access line is formatted by the proxy straight into a per-thread
//! buffer (the same text `tracing-subscriber` would print: timestamp, level, target,
//! `key=value` fields) and appended to the shared buffer, without a `tracing` event:
//! no field visitor, no dynamic dispatch per field, no timestamp formatted from scratch
//! (the date and time up to the second are kept per thread). `XDPLB_LOG` still decides
//! whether it is written (`xdplb::access=off`). Where [`init`] did not run (tests, or
//! the writer thread could not start) the proxy emits the `tracing` event instead.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use tracing_subscriber::{EnvFilter, fmt};

/// Bytes the buffer holds before it drops new lines (about 65,000 access-log lines).
const BUFFERED_BYTES: usize = 16 << 20;
/// The writer thread writes at least this often while lines wait.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// ... and at once when this much waits.
const FLUSH_BYTES: usize = 256 << 10;

/// The writer's count of dropped lines, once [`init`] ran.
static DROPPED: OnceLock<Arc<Shared>> = OnceLock::new();
/// The buffer access lines are appended to directly, once [`init`] installed the writer
/// thread (see [`access_line`]).
static DIRECT: OnceLock<Arc<Shared>> = OnceLock::new();

/// The target of the access log's lines (`XDPLB_LOG=info,xdplb::access=off` turns them off).
pub const ACCESS_TARGET: &str = "xdplb::access";

#[derive(Debug, Default)]
struct Buffer {
    data: Vec<u8>,
    /// The writer thread was told to write now (not yet done).
    kicked: bool,
    /// [`LogGuard`] was dropped: write what is left and stop.
    closing: bool,
}

#[derive(Debug, Default)]
struct Shared {
    buffer: Mutex<Buffer>,
    wake: Condvar,
    dropped: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Buffer> {
        self.buffer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Append one formatted event (one `write` call of the formatter).
    fn append(&self, line: &[u8]) {
        let mut b = self.lock();
        if b.data.len() + line.len() > BUFFERED_BYTES {
            drop(b);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        b.data.extend_from_slice(line);
        if b.data.len() >= FLUSH_BYTES && !b.kicked {
            b.kicked = true;
            drop(b);
            self.wake.notify_one();
        }
    }

    /// The writer thread: batches to `out` until closed.
    fn run(&self, out: &mut dyn std::io::Write) {
        let mut spare = Vec::new();
        loop {
            let closing = {
                let mut b = self.lock();
                if !b.closing && !b.kicked {
                    b = self
                        .wake
                        .wait_timeout(b, FLUSH_EVERY)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                b.kicked = false;
                std::mem::swap(&mut b.data, &mut spare);
                b.closing
            };
            if !spare.is_empty() {
                // Nowhere to report a failing stderr: the lines are lost.
                let _ = out.write_all(&spare);
                let _ = out.flush();
                spare.clear();
                if spare.capacity() > 4 * FLUSH_BYTES {
                    spare.shrink_to(FLUSH_BYTES);
                }
            }
            if closing && self.lock().data.is_empty() {
                return;
            }
        }
    }
}

/// The formatter's writer: one per event, appending to the shared buffer.
#[derive(Debug)]
struct Appender(Arc<Shared>);

impl std::io::Write for Appender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes out what is buffered and stops the writer thread when dropped.
#[derive(Debug)]
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Install the subscriber (filter from `XDPLB_LOG`, default `info`; `log` records, e.g.
/// aya's, get through too). Keep the guard until the end of `main`: dropping it writes
/// out what is still buffered.
#[must_use = "dropping the guard at once flushes and stops the log writer"]
pub fn init() -> LogGuard {
    let filter = EnvFilter::try_from_env("XDPLB_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let shared = Arc::new(Shared::default());
    let writer = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("xdplb-log".to_owned())
        .spawn(move || writer.run(&mut std::io::stderr()));
    let thread = match thread {
        Ok(t) => Some(t),
        Err(e) => {
            // Without its thread the log would only fill up: write directly instead.
            eprintln!("cannot start the log writer thread ({e}): logging unbuffered");
            fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
            return LogGuard {
                shared,
                thread: None,
            };
        }
    };
    let _ = DROPPED.set(Arc::clone(&shared));
    let _ = DIRECT.set(Arc::clone(&shared));
    let make = Arc::clone(&shared);
    fmt()
        .with_env_filter(filter)
        // Colours only for a terminal: a file or journald gets plain lines (an access
        // line with colours is twice as long, and costs as much more to format).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(move || Appender(Arc::clone(&make)))
        .init();
    LogGuard { shared, thread }
}

/// Log lines dropped because the writer could not keep up (None: [`init`] did not run,
/// as in tests).
#[must_use]
pub fn dropped_lines() -> Option<usize> {
    DROPPED.get().map(|s| s.dropped.load(Ordering::Relaxed))
}

/// Write one access-log line without a `tracing` event: `fields` appends the line's
/// `key=value` fields (space-separated, no newline) to the buffer it is given. The line
/// reads as `tracing-subscriber` would print an INFO event of target [`ACCESS_TARGET`]
/// with those fields. Returns false, writing nothing, when [`init`] has not installed the
/// buffered writer: the caller then emits a `tracing` event. When `XDPLB_LOG` turns the
/// target off, returns true without calling `fields`.
pub fn access_line(fields: impl FnOnce(&mut Vec<u8>)) -> bool {
    let Some(shared) = DIRECT.get() else {
        return false;
    };
    if !tracing::enabled!(target: "xdplb::access", tracing::Level::INFO) {
        return true;
    }
    LINE.with_borrow_mut(|line| {
        line.buf.clear();
        line.clock.write(&mut line.buf, SystemTime::now());
        line.buf.extend_from_slice(b"  INFO xdplb::access: ");
        fields(&mut line.buf);
        line.buf.push(b'\n');
        shared.append(&line.buf);
        if line.buf.capacity() > 64 << 10 {
            line.buf = Vec::new();
        }
    });
    true
}

thread_local! {
    static LINE: RefCell<Line> = RefCell::new(Line::default());
}

/// A thread's access line being built, and its clock.
#[derive(Debug, Default)]
struct Line {
    buf: Vec<u8>,
    clock: Clock,
}

/// RFC 3339 UTC timestamps with microseconds (`2026-12-02T02:47:05.123456Z`, as
/// `tracing-subscriber`'s default timer writes them), the part up to the second kept
/// from the previous call within the same second.
#[derive(Debug, Default)]
struct Clock {
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS.`
    prefix: Vec<u8>,
}

impl Clock {
    fn write(&mut self, out: &mut Vec<u8>, now: SystemTime) {
        let since = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = since.as_secs();
        if self.second != Some(secs) {
            self.prefix.clear();
            let (y, m, d) = civil_from_days(secs / 86_400);
            let t = secs % 86_400;
            let _ = write!(
                self.prefix,
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.",
                t / 3600,
                t % 3600 / 60,
                t % 60
            );
            self.second = Some(secs);
        }
        out.extend_from_slice(&self.prefix);
        let _ = write!(out, "{:06}Z", since.subsec_micros());
    }
}

/// Year, month, day of a count of days since 1970-01-01 (H. Hinnant's `civil_from_days`,
/// proleptic Gregorian calendar).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that records each write.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn access_timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            SystemTime::UNIX_EPOCH
                + Duration::from_secs(secs)
                + Duration::from_micros(micros.into())
        };
        let mut clock = Clock::default();
        let mut out = Vec::new();
        for (t, want) in [
            (at(0, 0), "1970-01-01T00:00:00.000000Z"),
            (at(951_782_399, 999_999), "2000-02-28T23:59:59.999999Z"),
            (at(951_782_400, 1), "2000-02-29T00:00:00.000001Z"),
            (at(951_868_800, 0), "2000-03-01T00:00:00.000000Z"),
            (at(1_798_761_296, 123_456), "2026-12-31T23:54:56.123456Z"),
            // Same second again: the kept prefix, new microseconds.
            (at(1_798_761_296, 7), "2026-12-31T23:54:56.000007Z"),
            (at(4_107_542_400, 0), "2100-03-01T00:00:00.000000Z"),
        ] {
            out.clear();
            clock.write(&mut out, t);
            assert_eq!(String::from_utf8_lossy(&out), want);
        }
    }

    #[test]
    fn lines_are_written_in_batches_in_order_and_dropped_past_the_bound() {
        let shared = Arc::new(Shared::default());
        let sink = Sink::default();
        let (s, mut out) = (Arc::clone(&shared), sink.clone());
        let thread = std::thread::spawn(move || s.run(&mut out));
        for i in 0..1000 {
            shared.append(format!("line {i}\n").as_bytes());
        }
        std::thread::sleep(FLUSH_EVERY * 3);
        // Far fewer writes than lines.
        let writes = sink.0.lock().unwrap().len();
        assert!((1..100).contains(&writes), "{writes} writes");
        drop(LogGuard {
            shared: Arc::clone(&shared),
            thread: Some(thread),
        });
        let all: Vec<u8> = sink.0.lock().unwrap().concat();
        let expected: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&all), expected);

        // Past the bound (no writer draining it): dropped and counted, never cut.
        let full = Shared::default();
        full.lock().data = vec![b'x'; BUFFERED_BYTES - 3];
        full.append(b"abcd");
        assert_eq!(full.dropped.load(Ordering::Relaxed), 1);
        full.append(b"abc");
        assert_eq!(full.dropped.load(Ordering::Relaxed), 1);
        assert!(full.lock().data.ends_with(b"xabc"));
    }
}
