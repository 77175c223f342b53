//! The one body type the L7 path passes around: any hyper body, boxed, so the proxy,
//! the cache and the backends' responses fit one `Request<Body>` / `Response<Body>`;
//! and the one body wrapper, [`Observed`], through which the proxy and the cache see
//! a body stream by (size limit, lease, access log, cache tee), and which can hold a
//! body's last frame until work the end started is done ([`Observer::settle`]).

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt as _, Empty, Full, combinators::BoxBody};
use tokio::task::JoinHandle;

/// Error type of boxed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body of any origin.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// An empty body.
#[must_use]
pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed()
}

/// Box any body whose error converts to [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// What an [`Observed`] body tells about itself as it streams.
///
/// Every body wrapper of the L7 path is one of these: the request size limit
/// (`proxy`), the backend lease held until the response ends (`proxy`), the access log
/// and byte count of the client's response (`proxy`), and the cache's tee that
/// collects a response for the store (`cache::tee`).
pub trait Observer {
    /// A data chunk passes. An error cuts the body there, with that error.
    fn data(&mut self, data: &Bytes) -> Result<(), BoxError> {
        let _ = data;
        Ok(())
    }

    /// Whether the body is known to be complete although the inner body has not said
    /// so (the observer counted a declared length).
    fn complete(&self) -> bool {
        false
    }

    /// The inner body failed with `error` (called just before `end(false)`; not
    /// for an error of the observer's own [`data`](Observer::data)).
    fn failed(&mut self, error: &BoxError) {
        let _ = error;
    }

    /// The body ended: completely (`true`), or with an error (`false`). Called at most
    /// once; the observer is dropped right after. A body dropped before its end drops
    /// its observer without this call.
    fn end(&mut self, complete: bool) {
        let _ = complete;
    }

    /// After `end(true)`: work the body's last frame (or its end) waits for, so that
    /// whoever reads the body sees its last byte only once this is done (the cache's
    /// tee: the response is in the store before its client has all of it). None:
    /// nothing to wait for.
    fn settle(&mut self) -> Option<JoinHandle<()>> {
        None
    }
}

/// A body passed through frame by frame and shown to an [`Observer`].
///
/// The end is the inner body's end (or its error), the inner body reporting
/// `is_end_stream` after a frame (hyper stops polling then), or the observer's
/// [`complete`](Observer::complete); after it the inner body is not polled again,
/// [`is_end_stream`](http_body::Body::is_end_stream) is true (and only then: so
/// hyper polls until the observer has seen everything) and the observer is dropped.
/// When the observer has work to [`settle`](Observer::settle), the frame that ended the
/// body (or the end of the stream) is held until that work is done.
/// A body already at its end when wrapped ends at once (hyper never polls an empty
/// body).
pub struct Observed<B, O: Observer> {
    inner: B,
    /// `None` once the body has ended.
    observer: Option<O>,
    /// What the observer's [`settle`](Observer::settle) gave, and the frame held back
    /// until it is done (`None`: the end of the stream is held).
    held: Option<(JoinHandle<()>, Option<Frame<Bytes>>)>,
}

impl<B: http_body::Body, O: Observer> Observed<B, O> {
    /// Observe `inner`.
    pub fn new(inner: B, observer: O) -> Self {
        let mut body = Self {
            inner,
            observer: Some(observer),
            held: None,
        };
        if body.inner.is_end_stream() || body.observer.as_ref().is_some_and(O::complete) {
            body.end(true);
        }
        body
    }

    /// Ends the observation; complete, the observer's [`settle`](Observer::settle) work
    /// (if any) is held, for the last frame to wait on.
    fn end(&mut self, complete: bool) {
        if let Some(mut observer) = self.observer.take() {
            observer.end(complete);
            if complete {
                if let Some(work) = observer.settle() {
                    self.held = Some((work, None));
                }
            }
        }
    }

    /// `last`, the frame that ended the body (None: the end of the stream), once the
    /// settling work, if any, is done. A failed or cancelled task holds nothing back.
    fn release(
        &mut self,
        last: Option<Frame<Bytes>>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.held.as_mut() {
            None => Poll::Ready(last.map(Ok)),
            Some((_, slot)) => {
                *slot = last;
                self.poll_held(cx)
            }
        }
    }

    fn poll_held(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some((work, _)) = self.held.as_mut() {
            let _ = ready!(Pin::new(work).poll(cx));
        }
        let last = self.held.take().and_then(|(_, last)| last);
        Poll::Ready(last.map(Ok))
    }
}

impl<B, O> http_body::Body for Observed<B, O>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    O: Observer + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.held.is_some() {
            return this.poll_held(cx);
        }
        let Some(observer) = this.observer.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            None => {
                this.end(true);
                this.release(None, cx)
            }
            Some(Err(e)) => {
                let e = e.into();
                observer.failed(&e);
                this.end(false);
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(e) = observer.data(data) {
                        this.end(false);
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                if observer.complete() || this.inner.is_end_stream() {
                    this.end(true);
                    return this.release(Some(frame), cx);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.observer.is_none() && self.held.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.observer, &self.held) {
            (_, Some((_, last))) => SizeHint::with_exact(
                last.as_ref()
                    .and_then(Frame::data_ref)
                    .map_or(0, |d| d.len() as u64),
            ),
            (None, None) => SizeHint::with_exact(0),
            (Some(_), None) => self.inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::StreamBody;

    use super::*;

    /// Records what it is told; cuts the body past `limit` bytes, and calls the body
    /// complete at `expected` bytes.
    #[derive(Default)]
    struct Log {
        seen: Arc<Mutex<Vec<String>>>,
        size: u64,
        limit: Option<u64>,
        expected: Option<u64>,
    }

    impl Observer for Log {
        fn data(&mut self, data: &Bytes) -> Result<(), BoxError> {
            self.size += data.len() as u64;
            self.seen
                .lock()
                .unwrap()
                .push(format!("data {}", data.len()));
            match self.limit {
                Some(l) if self.size > l => Err("too large".into()),
                _ => Ok(()),
            }
        }

        fn complete(&self) -> bool {
            self.expected == Some(self.size)
        }

        fn end(&mut self, complete: bool) {
            self.seen.lock().unwrap().push(format!("end {complete}"));
        }
    }

    impl Drop for Log {
        fn drop(&mut self) {
            self.seen.lock().unwrap().push("drop".to_owned());
        }
    }

    /// A streamed body of these chunks (never reports its end before the stream ends).
    fn chunks(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    fn observe(body: Body, log: Log) -> (Observed<Body, Log>, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::clone(&log.seen);
        (Observed::new(body, log), seen)
    }

    fn seen(s: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
        s.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn passes_frames_and_ends_once() {
        let (mut b, s) = observe(chunks(&["ab", "cde"]), Log::default());
        assert!(!http_body::Body::is_end_stream(&b));
        let mut got = Vec::new();
        while let Some(f) = b.frame().await {
            got.extend_from_slice(f.unwrap().data_ref().unwrap());
        }
        assert_eq!(got, b"abcde");
        assert!(http_body::Body::is_end_stream(&b));
        assert_eq!(http_body::Body::size_hint(&b).exact(), Some(0));
        assert!(b.frame().await.is_none());
        assert_eq!(seen(&s), ["data 2", "data 3", "end true", "drop"]);
    }

    #[tokio::test]
    async fn an_inner_body_that_reports_its_end_ends_with_its_last_frame() {
        let (mut b, s) = observe(full("abc"), Log::default());
        assert!(b.frame().await.unwrap().is_ok());
        assert!(http_body::Body::is_end_stream(&b));
        assert_eq!(seen(&s), ["data 3", "end true", "drop"]);
    }

    #[tokio::test]
    async fn an_empty_body_ends_at_once() {
        let (b, s) = observe(empty(), Log::default());
        assert!(http_body::Body::is_end_stream(&b));
        assert_eq!(seen(&s), ["end true", "drop"]);
    }

    #[tokio::test]
    async fn an_observer_error_cuts_the_body() {
        let mut log = Log::default();
        log.limit = Some(3);
        let (mut b, s) = observe(chunks(&["ab", "cd", "ef"]), log);
        assert!(b.frame().await.unwrap().is_ok());
        let e = b.frame().await.unwrap().unwrap_err();
        assert_eq!(e.to_string(), "too large");
        assert!(b.frame().await.is_none());
        assert_eq!(seen(&s), ["data 2", "data 2", "end false", "drop"]);
    }

    #[tokio::test]
    async fn a_complete_observer_ends_the_body_early() {
        let mut log = Log::default();
        log.expected = Some(4);
        let (mut b, s) = observe(chunks(&["ab", "cd", "ef"]), log);
        assert!(b.frame().await.unwrap().is_ok());
        assert!(b.frame().await.unwrap().is_ok());
        assert!(http_body::Body::is_end_stream(&b));
        assert!(b.frame().await.is_none());
        assert_eq!(seen(&s), ["data 2", "data 2", "end true", "drop"]);
    }

    #[tokio::test]
    async fn a_body_dropped_early_drops_its_observer_without_an_end() {
        let (mut b, s) = observe(chunks(&["ab", "cd"]), Log::default());
        assert!(b.frame().await.unwrap().is_ok());
        drop(b);
        assert_eq!(seen(&s), ["data 2", "drop"]);
    }

    /// An observer whose end starts work: the frame that ended the body is held until
    /// that work is done, then passed on; the body is at its end only after.
    #[tokio::test]
    async fn the_last_frame_waits_for_the_work_the_end_started() {
        struct Settling {
            work: Option<tokio::sync::oneshot::Receiver<()>>,
            started: Option<JoinHandle<()>>,
        }
        impl Observer for Settling {
            fn end(&mut self, complete: bool) {
                let rx = self.work.take().expect("one end");
                assert!(complete);
                self.started = Some(tokio::spawn(async move {
                    let _ = rx.await;
                }));
            }
            fn settle(&mut self) -> Option<JoinHandle<()>> {
                self.started.take()
            }
        }
        for streamed in [false, true] {
            let (done, rx) = tokio::sync::oneshot::channel();
            let inner = if streamed {
                chunks(&["ab", "cd"])
            } else {
                full("abcd")
            };
            let mut body = Observed::new(
                inner,
                Settling {
                    work: Some(rx),
                    started: None,
                },
            );
            let mut frames = Vec::new();
            let waker = futures_util::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            // Everything but the end is passed on; then the body waits.
            let last = loop {
                match http_body::Body::poll_frame(Pin::new(&mut body), &mut cx) {
                    Poll::Ready(Some(Ok(f))) => frames.push(f.into_data().expect("data")),
                    Poll::Ready(other) => panic!("ended before the work: {:?}", other.is_none()),
                    Poll::Pending => break String::from_utf8(frames.concat()).expect("utf-8"),
                }
            };
            assert!(
                !http_body::Body::is_end_stream(&body),
                "streamed {streamed}"
            );
            // The full body's one frame ends it: held; the stream's end is held after
            // its two frames.
            assert_eq!(
                last,
                if streamed { "abcd" } else { "" },
                "streamed {streamed}"
            );
            tokio::task::yield_now().await;
            assert!(http_body::Body::poll_frame(Pin::new(&mut body), &mut cx).is_pending());
            done.send(()).expect("the work waits");
            let rest = body.collect().await.expect("body").to_bytes();
            assert_eq!(
                rest,
                if streamed { "" } else { "abcd" },
                "streamed {streamed}"
            );
        }
    }
}
