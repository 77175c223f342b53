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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tracing_subscriber::{EnvFilter, fmt};

/// Bytes the buffer holds before it drops new lines (about 65,000 access-log lines).
const BUFFERED_BYTES: usize = 16 << 20;
/// The writer thread writes at least this often while lines wait.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// ... and at once when this much waits.
const FLUSH_BYTES: usize = 256 << 10;

/// The writer's count of dropped lines, once [`init`] ran.
static DROPPED: OnceLock<Arc<Shared>> = OnceLock::new();

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
