//! Thread-per-core serving for the L7 proxy: `[agent] workers` threads, each running its
//! own single-threaded tokio runtime, as nginx's and HAProxy's worker threads do.
//!
//! A client connection is handed, once, at its accept, to the worker with the fewest
//! live connections (HAProxy's default listener dispatch: one accept queue, connections
//! spread by load) and lives on that worker to its end: its TLS handshake, HTTP serving,
//! request handling, cache lookups and the backend connection it uses all run on that
//! one thread. Each service keeps one pool of backend connections per worker
//! ([`PerWorker`]), so a request never waits for a task on another thread: no
//! cross-thread wake-up between a client connection and its backend connection, no
//! work stealing, no lock shared by the workers on the request path. The metrics and
//! the balancer's scheduling state are sharded per worker too ([`shard`]); what the
//! workers still both write per request are the reference counts of the backend a
//! request leases and of the service (the server's service function and the
//! forwarder each hold one).
//!
//! Accepting stays where it was (the listening socket is not duplicated per worker), so
//! the hand-over of listening sockets to a new agent and the successor of a service
//! with new settings serve the same socket as before ([`crate::handoff`],
//! [`super::manager`]): one socket per VIP, no `SO_REUSEPORT` group whose members would
//! each have to be handed over (a connection waiting in the backlog of a closed member
//! is reset unless `tcp_migrate_req` is on). The cost is one hop per connection (the
//! socket moves from the accepting runtime's reactor to the worker's), none per request.
//!
//! The pool is process-wide: [`init`] starts it (the agent, with `[agent] workers`);
//! without it (unit tests), the first use starts one worker per CPU.

use std::cell::Cell;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use tokio::runtime::Handle;

/// The most workers [`init`] starts.
const MAX_WORKERS: usize = 1024;

static WORKERS: OnceLock<Workers> = OnceLock::new();

thread_local! {
    /// The index of the worker this thread is, if it is one.
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The running workers.
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    /// Client connections living on this worker.
    connections: AtomicUsize,
}

/// One connection counted on its worker until dropped.
#[derive(Debug)]
pub(crate) struct Placed {
    worker: &'static Worker,
}

impl Placed {
    /// The runtime to run the connection on.
    pub(crate) fn handle(&self) -> &Handle {
        &self.worker.handle
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        self.worker.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Start `n` workers (1 to 1024; the agent calls this once, before serving). Fails
/// when they run already with another count, or a thread cannot start.
pub fn init(n: usize) -> std::io::Result<()> {
    let n = n.clamp(1, MAX_WORKERS);
    if let Some(w) = WORKERS.get() {
        return if w.len() == n {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "the L7 workers run already ({} of them)",
                w.len()
            )))
        };
    }
    let started = Workers::start(n)?;
    // A race with another `init` or a first use: keep whichever came first.
    let _ = WORKERS.set(started);
    Ok(())
}

/// The workers: those [`init`] started, else one per CPU, started now.
pub(crate) fn get() -> &'static Workers {
    WORKERS.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Workers::start(n).unwrap_or_else(|e| panic!("cannot start the L7 worker threads: {e}"))
    })
}

/// The index of the worker the calling thread is (`None` off the workers).
#[must_use]
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// How many shards a value written on the request path needs so that no two workers
/// write the same one: one per running worker, 1 before [`init`] (or a first use).
#[must_use]
pub(crate) fn shard_count() -> usize {
    WORKERS.get().map_or(1, Workers::len)
}

/// The shard of the calling thread among `n` (`n` >= 1): its worker's index, shard 0
/// off the workers (the control plane, tests).
#[must_use]
pub(crate) fn shard(n: usize) -> usize {
    current().unwrap_or(0) % n
}

/// One value per worker ([`shard_count`] of them, made when the value is), each on its
/// own cache line: what a worker writes on the request path lives in its own shard
/// ([`Shards::mine`]), so no line is written by two workers per request; readers
/// combine the shards ([`Shards::iter`]).
#[derive(Debug)]
pub(crate) struct Shards<T>(Box<[CachePadded<T>]>);

impl<T: Default> Default for Shards<T> {
    fn default() -> Self {
        Self::new(T::default)
    }
}

impl<T> Shards<T> {
    /// One shard per worker, each made by `make`.
    pub(crate) fn new(mut make: impl FnMut() -> T) -> Self {
        Self(
            (0..shard_count())
                .map(|_| CachePadded::new(make()))
                .collect(),
        )
    }

    /// The index of the calling worker's shard ([`shard`]).
    pub(crate) fn my_index(&self) -> usize {
        shard(self.0.len())
    }

    /// The calling worker's shard.
    pub(crate) fn mine(&self) -> &T {
        &self.0[self.my_index()]
    }

    /// Shard `index` (of [`Shards::my_index`], maybe on another thread since).
    pub(crate) fn at(&self, index: usize) -> &T {
        &self.0[index]
    }

    /// Every shard.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|s| &**s)
    }
}

impl Workers {
    fn start(n: usize) -> std::io::Result<Self> {
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            workers.push(Worker {
                handle: runtime.handle().clone(),
                connections: AtomicUsize::new(0),
            });
            std::thread::Builder::new()
                .name(format!("xdplb-l7-{i}"))
                .spawn(move || {
                    INDEX.with(|c| c.set(Some(i)));
                    // Runs the tasks handed to it, for the life of the process.
                    runtime.block_on(std::future::pending::<()>());
                })?;
        }
        Ok(Self { workers })
    }

    /// How many workers run.
    #[must_use]
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether there is none (never: at least one starts).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Live client connections on each worker.
    #[must_use]
    pub fn connections(&self) -> Vec<usize> {
        self.workers
            .iter()
            .map(|w| w.connections.load(Ordering::Relaxed))
            .collect()
    }

    /// A place for one new connection: the worker with the fewest live connections
    /// (the lowest index among equals).
    pub(crate) fn place(&'static self) -> Placed {
        let worker = self
            .workers
            .iter()
            .min_by_key(|w| w.connections.load(Ordering::Relaxed))
            .expect("at least one worker");
        worker.connections.fetch_add(1, Ordering::Relaxed);
        Placed { worker }
    }
}

/// One value per worker (a service's backend connection pool): dereferences to the
/// calling worker's own value, and to the first one off the workers (the control
/// plane, tests).
pub(crate) struct PerWorker<T> {
    values: Vec<T>,
}

impl<T> PerWorker<T> {
    /// One value per running worker, each made by `make`; the first error is returned.
    pub(crate) fn try_new<E>(mut make: impl FnMut() -> Result<T, E>) -> Result<Self, E> {
        Ok(Self {
            values: (0..get().len()).map(|_| make()).collect::<Result<_, _>>()?,
        })
    }
}

impl<T> std::ops::Deref for PerWorker<T> {
    type Target = T;

    fn deref(&self) -> &T {
        let i = current().unwrap_or(0);
        &self.values[i % self.values.len()]
    }
}

/// Run `f` once on each worker (started if need be) and return what each returned,
/// in worker order (tests of per-worker state).
#[cfg(test)]
pub(crate) fn on_each<T: Send + 'static>(f: impl Fn() -> T + Send + Sync + 'static) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    get()
        .workers
        .iter()
        .map(|w| {
            let (tx, rx) = std::sync::mpsc::channel();
            let f = std::sync::Arc::clone(&f);
            w.handle.spawn(async move {
                let _ = tx.send(f());
            });
            rx.recv().expect("the worker runs the task")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_go_to_the_least_loaded_worker_and_per_worker_values_follow_the_thread() {
        let w = get();
        assert!(!w.is_empty());
        let base = w.connections();
        // Place as many as there are workers, beyond what the others hold now: each
        // goes to the least loaded one, so the spread never grows beyond one.
        let placed: Vec<Placed> = (0..w.len() * 3).map(|_| w.place()).collect();
        let now = w.connections();
        let grown: Vec<usize> = now.iter().zip(&base).map(|(n, b)| n - b).collect();
        assert_eq!(grown.iter().sum::<usize>(), w.len() * 3);
        let (min, max) = (now.iter().min().unwrap(), now.iter().max().unwrap());
        assert!(
            max - min <= (base.iter().max().unwrap() - base.iter().min().unwrap()).max(1),
            "{now:?} from {base:?}"
        );
        drop(placed);
        assert_eq!(current(), None);
        let values = PerWorker::try_new({
            let mut i = 0usize;
            move || {
                i += 1;
                Ok::<_, std::convert::Infallible>(i - 1)
            }
        })
        .unwrap_or_else(|e| match e {});
        assert_eq!(*values, 0);
        // On worker k, the value is the k-th.
        let values = std::sync::Arc::new(values);
        for k in 0..w.len() {
            let (tx, rx) = std::sync::mpsc::channel();
            let values = std::sync::Arc::clone(&values);
            w.workers[k].handle.spawn(async move {
                tx.send((current(), **values)).unwrap();
            });
            assert_eq!(rx.recv().unwrap(), (Some(k), k));
        }
    }
}
