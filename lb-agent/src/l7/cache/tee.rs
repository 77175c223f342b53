//! The body tee: a response streams to its client while its data is collected for
//! the store ([`tee`]).

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;

use crate::l7::body::{Body, BoxError, Observed, Observer, boxed};

/// What stores a complete body: it starts the store's insert as a task and returns
/// it. Dropped unused (and what it holds with it, the cache lock's write permit) when
/// the body fails, is dropped early or outgrows the limit.
pub(super) type Store = Box<dyn FnOnce(Bytes) -> JoinHandle<()> + Send + Sync>;

/// `body` passed through while its data is collected for the store, up to `limit`
/// bytes: the whole body goes to `store` when it ends, nothing when it fails, is dropped
/// early or outgrows the limit. The end is the end of the stream, or the last of
/// `expected` bytes (hyper stops polling a body once its `Content-Length` is
/// written), or the inner body reporting its end (see [`Observed`]). The body's last
/// frame (or its end) is held until the store has it: a client that has the whole
/// response finds it stored when it asks again.
pub(super) fn tee(body: Body, expected: Option<u64>, limit: u64, store: Store) -> Body {
    let collect = Collect {
        chunks: Some(Vec::new()),
        size: 0,
        expected,
        limit,
        store: Some(store),
        storing: None,
    };
    boxed(Observed::new(body, collect))
}

/// The tee's [`Observer`]: what has been collected so far.
struct Collect {
    /// `None` once given up (over the limit).
    chunks: Option<Vec<Bytes>>,
    size: u64,
    expected: Option<u64>,
    limit: u64,
    store: Option<Store>,
    /// The store's insert, once started.
    storing: Option<JoinHandle<()>>,
}

impl Observer for Collect {
    fn data(&mut self, data: &Bytes) -> Result<(), BoxError> {
        self.size += data.len() as u64;
        if let Some(chunks) = self.chunks.as_mut() {
            if self.size > self.limit {
                tracing::debug!("cache: body over the object limit, not stored");
                self.chunks = None;
                self.store = None;
            } else {
                chunks.push(data.clone());
            }
        }
        Ok(())
    }

    fn complete(&self) -> bool {
        self.expected == Some(self.size)
    }

    /// The body is complete: hand what was collected to the store. (On an error, or
    /// when dropped early, `store` is dropped: nothing is stored.)
    fn end(&mut self, complete: bool) {
        if !complete {
            return;
        }
        if let (Some(chunks), Some(store)) = (self.chunks.take(), self.store.take()) {
            let body = if chunks.len() == 1 {
                chunks.into_iter().next().unwrap_or_default()
            } else {
                let mut all = BytesMut::with_capacity(usize::try_from(self.size).unwrap_or(0));
                for c in chunks {
                    all.extend_from_slice(&c);
                }
                all.freeze()
            };
            self.storing = Some(store(body));
        }
    }

    fn settle(&mut self) -> Option<JoinHandle<()>> {
        self.storing.take()
    }
}
