//! The agent's log: `tracing` events (the L7 access log among them, target
//! `xdplb::access`) formatted by `tracing-subscriber` and written to stderr in batches
//! by one writer thread. Each thread that logs has a buffer of its own: an event
//! appends its line there (a lock no other thread takes but the writer, once per turn;
//! a copy; no system call, no wake-up of another thread), and the writer thread takes
//! what has gathered in every thread's buffer every [`FLUSH_EVERY`] (or as soon as one
//! holds [`FLUSH_BYTES`]) and writes it with one `write(2)`. A request never waits for
//! stderr (a pipe to journald, a file, a terminal), and the L7 workers never contend
//! for a lock or a cache line to log. The lines of one thread come out in order; lines
//! of different threads gathered in the same turn come out thread by thread (each has
//! its timestamp). When a thread's buffer holds [`THREAD_BYTES`] (the sink cannot keep
//! up), that thread's new lines are dropped and counted rather than slowing the proxy:
//! `xdplb_log_lines_dropped_total`. Dropping the [`LogGuard`] writes out everything
//! logged before it.
//!
//! Why not `tracing-appender`'s non-blocking writer, used before: it hands every line
//! to its thread through a channel, which wakes that thread for nearly every line
//! under load: measured with `bench l7` (access log on, one worker), the log cost twice
//! the CPU per request of the proxy without it. Why not one buffer shared by every
//! thread (session 21): its lock and its tail bounce between the workers' cores.
//!
//! The access log has a path of its own ([`access_line`]): once [`init`] has installed
//! the writer, an access line is formatted by the proxy straight into its thread's
//! buffer (the same text `tracing-subscriber` would print: timestamp, level, target,
//! `key=value` fields, see [`Fields`]), without a `tracing` event: no field visitor, no
//! dynamic dispatch per field, no `fmt` machinery, no timestamp formatted from scratch
//! (the date and time up to the second are kept per thread). `XDPLB_LOG` still decides
//! whether it is written (`xdplb::access=off`). Where [`init`] did not run (tests, or
//! the writer thread could not start) the proxy emits the `tracing` event instead.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread::Thread;
use std::time::{Duration, SystemTime};

use tracing_subscriber::{EnvFilter, fmt};

/// Bytes one thread's buffer holds before that thread's new lines are dropped (about
/// 20,000 access-log lines of 200 bytes: an L7 worker logging 100,000 requests a second
/// fills it in 0.2 s of a stalled sink).
const THREAD_BYTES: usize = 4 << 20;
/// The writer thread writes at least this often while lines wait.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// ... and at once when one thread's buffer holds this much.
const FLUSH_BYTES: usize = 256 << 10;

/// The writer's count of dropped lines, once [`init`] ran.
static DROPPED: OnceLock<Arc<Shared>> = OnceLock::new();
/// The buffers access lines are appended to directly, once [`init`] installed the
/// writer thread (see [`access_line`]).
static DIRECT: OnceLock<Arc<Shared>> = OnceLock::new();

/// The target of the access log's lines (`XDPLB_LOG=info,xdplb::access=off` turns them off).
pub const ACCESS_TARGET: &str = "xdplb::access";

/// One thread's lines waiting for the writer.
#[derive(Debug, Default)]
struct Local {
    pending: Mutex<Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    lines: Vec<u8>,
    /// The thread's access-line timestamps.
    clock: Clock,
}

impl Local {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The log's buffers and its writer thread's state.
#[derive(Debug, Default)]
struct Shared {
    /// Every thread's buffer (registered on its first line), and `spare`'s: lines of a
    /// thread whose own buffer cannot be reached (while its thread-local storage is
    /// being torn down).
    locals: Mutex<Vec<Arc<Local>>>,
    spare: Arc<Local>,
    /// The writer thread, woken when a buffer passes [`FLUSH_BYTES`] and at close.
    writer: OnceLock<Thread>,
    /// [`LogGuard`] was dropped: write what is left and stop.
    closing: AtomicBool,
    dropped: AtomicUsize,
    /// `XDPLB_LOG` enables the access log ([`ACCESS_TARGET`] at INFO): decided once by
    /// [`init`] (the filter is fixed for the process's life), not per line.
    access: AtomicBool,
}

thread_local! {
    /// This thread's buffer, and the [`Shared`] it is registered with.
    static LOCAL: RefCell<Option<(Weak<Shared>, Arc<Local>)>> = const { RefCell::new(None) };
}

impl Shared {
    fn new() -> Arc<Self> {
        let shared = Arc::new(Self::default());
        shared
            .locals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&shared.spare));
        shared
    }

    /// This thread's buffer, registered on first use.
    fn local(self: &Arc<Self>) -> Arc<Local> {
        let local = Arc::new(Local::default());
        self.locals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&local));
        local
    }

    /// Append one formatted event (one `write` call of the formatter) to this thread's
    /// buffer.
    fn append(self: &Arc<Self>, line: &[u8]) {
        self.write_line(|p| p.lines.extend_from_slice(line));
    }

    /// Let `write` append one whole line (or nothing) to this thread's buffer: dropped
    /// and counted when the buffer would pass [`THREAD_BYTES`].
    fn write_line(self: &Arc<Self>, write: impl FnOnce(&mut Pending)) {
        let mut write = Some(write);
        // Not reachable (the thread's storage is being torn down, or this is a line
        // logged while the slot is borrowed): `write` is left for `spare`.
        let _ = LOCAL.try_with(|slot| {
            let Ok(mut slot) = slot.try_borrow_mut() else {
                return;
            };
            let mine = matches!(&*slot, Some((owner, _)) if std::ptr::eq(owner.as_ptr(), Arc::as_ptr(self)));
            if !mine {
                *slot = Some((Arc::downgrade(self), self.local()));
            }
            if let (Some((_, local)), Some(write)) = (&*slot, write.take()) {
                self.write_to(local, write);
            }
        });
        if let Some(write) = write {
            self.write_to(&self.spare, write);
        }
    }

    fn write_to(&self, local: &Local, write: impl FnOnce(&mut Pending)) {
        let mut pending = local.lock();
        let before = pending.lines.len();
        write(&mut pending);
        let after = pending.lines.len();
        if after > THREAD_BYTES {
            pending.lines.truncate(before);
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Wake the writer once, as the buffer passes the mark.
        if before < FLUSH_BYTES && after >= FLUSH_BYTES {
            drop(pending);
            if let Some(w) = self.writer.get() {
                w.unpark();
            }
        }
    }

    /// Move every buffer's lines to the end of `batch`; forget the buffers of threads
    /// that have ended (nothing else holds them) once they are empty.
    fn take(&self, batch: &mut Vec<u8>, spare: &mut Vec<u8>) {
        let mut locals = self.locals.lock().unwrap_or_else(PoisonError::into_inner);
        locals.retain(|local| {
            {
                let mut pending = local.lock();
                if pending.lines.is_empty() {
                    drop(pending);
                    // Held by the registry alone (or by `Shared::spare`, which is
                    // never forgotten): its thread has ended.
                    return Arc::strong_count(local) > 1;
                }
                // Swap, so the thread's lock is held for no copy.
                std::mem::swap(&mut pending.lines, spare);
            }
            batch.extend_from_slice(spare);
            spare.clear();
            true
        });
    }

    /// The writer thread: batches to `out` until closed.
    fn run(&self, out: &mut dyn std::io::Write) {
        let (mut batch, mut spare) = (Vec::new(), Vec::new());
        loop {
            if !self.closing.load(Ordering::Acquire) {
                std::thread::park_timeout(FLUSH_EVERY);
            }
            // Read before taking: every line logged before the guard was dropped is in
            // this turn's batch.
            let closing = self.closing.load(Ordering::Acquire);
            self.take(&mut batch, &mut spare);
            if !batch.is_empty() {
                // Nowhere to report a failing stderr: the lines are lost.
                let _ = out.write_all(&batch);
                let _ = out.flush();
                batch.clear();
                for v in [&mut batch, &mut spare] {
                    if v.capacity() > 4 * FLUSH_BYTES {
                        v.shrink_to(FLUSH_BYTES);
                    }
                }
            }
            if closing {
                return;
            }
        }
    }

    /// Start the writer thread on `out`.
    fn start(
        out: impl std::io::Write + Send + 'static,
    ) -> std::io::Result<(Arc<Self>, std::thread::JoinHandle<()>)> {
        let shared = Self::new();
        let writer = Arc::clone(&shared);
        let mut out = out;
        let thread = std::thread::Builder::new()
            .name("xdplb-log".to_owned())
            .spawn(move || writer.run(&mut out))?;
        let _ = shared.writer.set(thread.thread().clone());
        Ok((shared, thread))
    }
}

/// The formatter's writer: one per event, appending to the thread's buffer.
#[derive(Debug)]
struct Appender(&'static Arc<Shared>);

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
        self.shared.closing.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
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
    let (shared, thread) = match Shared::start(std::io::stderr()) {
        Ok(started) => started,
        Err(e) => {
            // Without its thread the log would only fill up: write directly instead.
            eprintln!("cannot start the log writer thread ({e}): logging unbuffered");
            fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .init();
            return LogGuard {
                shared: Shared::new(),
                thread: None,
            };
        }
    };
    let _ = DROPPED.set(Arc::clone(&shared));
    let _ = DIRECT.set(Arc::clone(&shared));
    if let Some(direct) = DIRECT.get() {
        fmt()
            .with_env_filter(filter)
            // Colours only for a terminal: a file or journald gets plain lines (an access
            // line with colours is twice as long, and costs as much more to format).
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(move || Appender(direct))
            .init();
        // The subscriber is global and its filter never changes: ask it once.
        direct.access.store(
            tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO),
            Ordering::Relaxed,
        );
    }
    LogGuard {
        shared,
        thread: Some(thread),
    }
}

/// Log lines dropped because the writer could not keep up (None: [`init`] did not run,
/// as in tests).
#[must_use]
pub fn dropped_lines() -> Option<usize> {
    DROPPED.get().map(|s| s.dropped.load(Ordering::Relaxed))
}

/// Write one access-log line without a `tracing` event: `fields` writes the line's
/// fields through [`Fields`]. The line reads as `tracing-subscriber` would print an
/// INFO event of target [`ACCESS_TARGET`] with those fields. Returns false, writing
/// nothing, when [`init`] has not installed the buffered writer: the caller then emits a
/// `tracing` event. When `XDPLB_LOG` turns the target off, returns true without calling
/// `fields`.
pub fn access_line(fields: impl FnOnce(&mut Fields<'_>)) -> bool {
    let Some(shared) = DIRECT.get() else {
        return false;
    };
    if !shared.access.load(Ordering::Relaxed) {
        return true;
    }
    shared.write_line(|p| {
        p.clock.write(&mut p.lines, SystemTime::now());
        p.lines.extend_from_slice(b"  INFO xdplb::access: ");
        fields(&mut Fields::new(&mut p.lines));
        p.lines.push(b'\n');
    });
    true
}

/// Writes `key=value` fields as `tracing-subscriber`'s default format prints them
/// (separated by one space; a `%` field as it displays, a `&str` field as its `Debug`,
/// numbers in decimal), without the `fmt` machinery where the value allows.
#[derive(Debug)]
pub struct Fields<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Fields<'a> {
    /// Fields appended to `out`.
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b' ');
        }
        self.first = false;
        self.out.extend_from_slice(key.as_bytes());
        self.out.push(b'=');
    }

    /// A field recorded with `%` (`Display`) whose value is `value`'s text.
    pub fn display(&mut self, key: &str, value: &str) {
        self.key(key);
        self.out.extend_from_slice(value.as_bytes());
    }

    /// A `&str` field recorded as a value (`tracing` prints it with `Debug`: quoted).
    pub fn debug_str(&mut self, key: &str, value: &str) {
        self.key(key);
        // Printable ASCII but `"` and `\` is its own `Debug` text inside the quotes.
        if value
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
        {
            self.out.push(b'"');
            self.out.extend_from_slice(value.as_bytes());
            self.out.push(b'"');
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }

    /// An integer field.
    pub fn u64(&mut self, key: &str, value: u64) {
        self.key(key);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }

    /// An address recorded with `%`.
    pub fn ip(&mut self, key: &str, ip: IpAddr) {
        self.key(key);
        write_ip(self.out, ip);
    }

    /// A socket address recorded with `%`, or nothing (`key=`).
    pub fn socket_addr(&mut self, key: &str, addr: Option<SocketAddr>) {
        self.key(key);
        match addr {
            Some(SocketAddr::V4(a)) => {
                write_ip(self.out, IpAddr::V4(*a.ip()));
                self.out.push(b':');
                self.out
                    .extend_from_slice(itoa::Buffer::new().format(a.port()).as_bytes());
            }
            Some(a) => {
                let _ = write!(self.out, "{a}");
            }
            None => {}
        }
    }
}

/// `ip` as it displays; IPv4 without `fmt`.
fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
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
        let mut micros = since.subsec_micros();
        let mut digits = [b'0'; 6];
        for d in digits.iter_mut().rev() {
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        out.extend_from_slice(&digits);
        out.push(b'Z');
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
    fn lines_are_written_in_batches_in_order_per_thread_and_flushed_at_close() {
        let sink = Sink::default();
        let (shared, thread) = Shared::start(sink.clone()).expect("writer thread");
        let guard = LogGuard {
            shared: Arc::clone(&shared),
            thread: Some(thread),
        };
        let workers: Vec<_> = (0..3)
            .map(|t| {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        shared.append(format!("t{t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        for i in 0..1000 {
            shared.append(format!("main line {i}\n").as_bytes());
        }
        // The workers have ended: their buffers, once drained, are forgotten (within a
        // few turns of the writer).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while shared.locals.lock().unwrap().len() > 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "buffers of ended threads kept"
            );
            std::thread::sleep(FLUSH_EVERY);
        }
        assert_eq!(shared.locals.lock().unwrap().len(), 2, "spare + main");
        // Far fewer writes than lines.
        let writes = sink.0.lock().unwrap().len();
        assert!((1..100).contains(&writes), "{writes} writes");
        // Written at close: what the last turn has not taken.
        shared.append(b"last\n");
        drop(guard);
        let all = String::from_utf8(sink.0.lock().unwrap().concat()).expect("utf-8");
        assert!(all.ends_with("last\n"), "{all}");
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 4001);
        for who in ["t0", "t1", "t2", "main"] {
            let own: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("{who} ")))
                .collect();
            let expected: Vec<String> = (0..1000).map(|i| format!("{who} line {i}")).collect();
            assert_eq!(own, expected, "lines of {who}");
        }
    }

    #[test]
    fn a_full_thread_buffer_drops_and_counts_whole_lines() {
        // No writer draining it.
        let shared = Shared::new();
        shared.append(b"x");
        let local = LOCAL.with_borrow(|slot| Arc::clone(&slot.as_ref().expect("registered").1));
        local.lock().lines.resize(THREAD_BYTES - 3, b'x');
        shared.append(b"abcd");
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 1);
        shared.append(b"abc");
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 1);
        assert!(local.lock().lines.ends_with(b"xabc"));
        // Another thread's buffer is not full.
        let other = Arc::clone(&shared);
        std::thread::spawn(move || other.append(b"y"))
            .join()
            .expect("thread");
        assert_eq!(shared.dropped.load(Ordering::Relaxed), 1);
        let mut batch = Vec::new();
        shared.take(&mut batch, &mut Vec::new());
        assert_eq!(batch.len(), THREAD_BYTES + 1);
    }

    #[test]
    fn fields_read_as_tracing_formats_them() {
        let mut out = Vec::new();
        let mut f = Fields::new(&mut out);
        f.display("service", "web");
        f.ip("client", "198.18.0.7".parse().expect("ip"));
        f.ip("client6", "fd00:18::1".parse().expect("ip"));
        f.socket_addr("backend", Some("0.0.0.0:65535".parse().expect("addr")));
        f.socket_addr("backend6", Some("[fd00:18::2]:80".parse().expect("addr")));
        f.socket_addr("none", None);
        f.debug_str("cache", "hit");
        f.debug_str("odd", "a\"b\\c\té");
        f.debug_str("empty", "");
        f.u64("n", u64::MAX);
        f.u64("zero", 0);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            format!(
                "service=web client=198.18.0.7 client6=fd00:18::1 backend=0.0.0.0:65535 \
                 backend6=[fd00:18::2]:80 none= cache=\"hit\" odd={:?} empty=\"\" n={} zero=0",
                "a\"b\\c\té",
                u64::MAX
            )
        );
    }
}
