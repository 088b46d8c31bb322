//! Accepting connections without running out of file descriptors, and
//! without letting idle connections lock clients out.
//!
//! tonic's listener streams hand every `accept` error to a loop that retries
//! at once: out of descriptors (EMFILE), the listening socket stays readable,
//! so the daemon spins on `accept4` and nobody, health probes included, gets
//! in. This module replaces them with one accept task per listener that
//! feeds tonic a stream of [`Conn`]s:
//!
//! - EMFILE, ENFILE, ENOBUFS, ENOMEM (and any error it does not know) pause
//!   accepting with exponential backoff, 5 ms doubling to 500 ms, with one
//!   warning per streak and the counter `sllm_accept_errors_total`; errors
//!   that concern only the connection being accepted (ECONNABORTED, EPROTO,
//!   ...) skip it, as accept(2) advises.
//! - At most `max` connections are open at once ([`Connections`]): each holds
//!   a semaphore permit, returned when the connection is dropped.
//!   [`connection_limit`] lowers `max` at start-up so that the open-file limit
//!   keeps a reserve for partitions, handles, metrics and the next health
//!   probe.
//! - At the limit, a new connection is let in by closing the one idle longest
//!   (no request in flight, none for at least a second), as gRPC's
//!   MaxConnectionIdle does; gRPC clients reconnect on their next call. If
//!   every connection is busy, accepting pauses until one closes: new
//!   connections wait in the kernel's backlog, and nothing spins.
//!
//! Requests are counted per connection by [`TrackRequestsLayer`]: tonic puts
//! each connection's [`ConnInfo`] into its requests' extensions, and the layer
//! adds the connection's [`Peer`] for the service.
//!
//! Closing is done from the read side: the connection's next read returns
//! end-of-file, so hyper ends it as if the client had left. A request that
//! arrived in the same instant is not cut off: a connection with a request in
//! flight cancels its close.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::lock;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc};
use tonic::codegen::http;
use tonic::transport::server::Connected;

use crate::peer::Peer;

/// Connections open at once unless `--max-connections` says otherwise.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Descriptors kept out of the connection limit: at least this many...
const MIN_RESERVE_FDS: u64 = 64;
/// ...and at least this fraction of the open-file limit.
const RESERVE_FRACTION: u64 = 4;
/// First pause after an accept error, doubled per failure up to the max.
const BACKOFF_FIRST: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(500);
/// A connection is closed for a newcomer only after this long without a
/// request, so a client that just connected gets to send its first one.
const MIN_IDLE: Duration = Duration::from_secs(1);
/// At the limit, how often to look again for a connection that went idle.
const RECHECK: Duration = Duration::from_millis(250);
/// A connection told to close that is still open after this long (its
/// task has not run) is given up on, and another one is picked.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// A connection told to close that is not reading (its peer does not read
/// what the daemon writes, so hyper is stuck writing) has its writes fail
/// after this long: it cannot hold its place by never reading.
const FORCE_CLOSE_AFTER: Duration = Duration::from_secs(1);
/// The at-the-limit notes are logged at most this often.
const NOTE_EVERY: Duration = Duration::from_secs(60);

/// The connection limit in force and how it was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimit {
    /// Connections open at once.
    pub max: usize,
    /// What `--max-connections` asked for.
    pub requested: usize,
    /// The soft open-file limit, `None` when unlimited.
    pub open_files: Option<u64>,
    /// Descriptors left out of the limit for everything else.
    pub reserve: u64,
}

impl ConnectionLimit {
    /// Whether the open-file limit lowered the requested limit.
    pub fn lowered(&self) -> bool {
        self.max < self.requested
    }
}

/// The connection limit for `requested` under an open-file limit of
/// `open_files` (`None`: unlimited): a quarter of the descriptors, at least
/// 64, stay in reserve; at least one connection is always allowed.
pub fn connection_limit(requested: usize, open_files: Option<u64>) -> ConnectionLimit {
    let requested = requested.max(1);
    let Some(open_files) = open_files else {
        return ConnectionLimit {
            max: requested,
            requested,
            open_files,
            reserve: 0,
        };
    };
    let reserve = MIN_RESERVE_FDS.max(open_files / RESERVE_FRACTION);
    let room = open_files.saturating_sub(reserve).max(1);
    ConnectionLimit {
        max: usize::try_from(room).unwrap_or(usize::MAX).min(requested),
        requested,
        open_files: Some(open_files),
        reserve,
    }
}

/// The soft limit on open files (`None`: unlimited).
pub fn open_file_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// The open connections and the permits that bound them.
pub struct Connections {
    max: usize,
    permits: Arc<Semaphore>,
    open: Mutex<HashMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    min_idle: Duration,
    /// When the limit was last noted in the log: closing idle connections,
    /// and all busy.
    noted: Mutex<[Option<Instant>; 2]>,
}

impl Connections {
    /// Room for `max` connections (at least one).
    pub fn new(max: usize) -> Arc<Self> {
        Self::with_min_idle(max, MIN_IDLE)
    }

    fn with_min_idle(max: usize, min_idle: Duration) -> Arc<Self> {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(Self {
            max,
            permits: Arc::new(Semaphore::new(max)),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            min_idle,
            noted: Mutex::new([None; 2]),
        })
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.open).len()
    }

    /// Waits for room for one more connection: a free permit, else one
    /// freed by closing the connection idle longest, else (all busy) one
    /// freed when a connection ends. `None` if the permits are gone.
    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => return Some(permit),
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {}
        }
        let mut closing: Option<(Arc<ConnState>, Instant)> = None;
        loop {
            let still_closing = closing.as_ref().is_some_and(|(conn, since)| {
                conn.closing.load(Ordering::SeqCst) && since.elapsed() < CLOSE_WAIT
            });
            if !still_closing {
                closing = self.close_idlest().map(|conn| (conn, Instant::now()));
                if closing.is_some() {
                    self.note(0, || {
                        tracing::info!(
                            "{} connections open, the limit (--max-connections): closing the one \
                             idle longest for each new one; clients reconnect on their next call",
                            self.max
                        );
                    });
                } else {
                    self.note(1, || {
                        tracing::info!(
                            "all {} connections are busy (--max-connections): new ones wait \
                             until one is done",
                            self.max
                        );
                    });
                }
            }
            tokio::select! {
                permit = Arc::clone(&self.permits).acquire_owned() => return permit.ok(),
                () = tokio::time::sleep(RECHECK) => {}
            }
        }
    }

    /// Runs `log` unless note `which` was logged within [`NOTE_EVERY`].
    fn note(&self, which: usize, log: impl FnOnce()) {
        let mut noted = lock(&self.noted);
        if noted[which].is_none_or(|at| at.elapsed() >= NOTE_EVERY) {
            noted[which] = Some(Instant::now());
            drop(noted);
            log();
        }
    }

    /// Tells the connection idle longest (at least `min_idle`) to close.
    fn close_idlest(&self) -> Option<Arc<ConnState>> {
        let now = Instant::now();
        let victim = lock(&self.open)
            .values()
            .filter(|c| !c.closing.load(Ordering::SeqCst) && c.in_flight() == 0)
            .map(|c| (c.idle_since(), c))
            .filter(|(since, _)| now.saturating_duration_since(*since) >= self.min_idle)
            .min_by_key(|(since, _)| *since)
            .map(|(_, c)| Arc::clone(c))?;
        tracing::debug!(
            peer = %victim.peer,
            idle_s = now.saturating_duration_since(victim.idle_since()).as_secs_f64(),
            "closing the connection idle longest to let a new one in (--max-connections)"
        );
        metrics::counter!("sllm_connections_closed_idle_total").increment(1);
        victim.close();
        Some(victim)
    }

    fn register<IO>(
        self: &Arc<Self>,
        io: IO,
        peer: Peer,
        permit: OwnedSemaphorePermit,
    ) -> Conn<IO> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if peer.is_unix() {
            // Who connects through the socket, as the kernel vouches for it.
            tracing::info!(%peer, "connection accepted");
        } else {
            tracing::debug!(%peer, "connection accepted");
        }
        let state = Arc::new(ConnState {
            peer,
            in_flight: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            closing: AtomicBool::new(false),
            reader: Mutex::new(None),
            writer: Mutex::new(None),
        });
        let open = {
            let mut open = lock(&self.open);
            open.insert(id, Arc::clone(&state));
            open.len()
        };
        metrics::gauge!("sllm_connections").set(open as f64);
        Conn {
            io,
            state,
            id,
            connections: Arc::clone(self),
            eof: false,
            force_close: None,
            _permit: permit,
        }
    }

    fn forget(&self, id: u64) {
        let open = {
            let mut open = lock(&self.open);
            open.remove(&id);
            open.len()
        };
        metrics::gauge!("sllm_connections").set(open as f64);
    }
}

/// What the daemon knows about one connection.
pub struct ConnState {
    peer: Peer,
    in_flight: AtomicUsize,
    /// When the last request began or ended (or the connection opened).
    last_active: Mutex<Instant>,
    /// Set to close the connection; cleared if a request slips in first.
    closing: AtomicBool,
    /// Woken to deliver the close to a read that is waiting.
    reader: Mutex<Option<Waker>>,
    /// Woken to deliver the close to a write that is waiting.
    writer: Mutex<Option<Waker>>,
}

impl ConnState {
    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn idle_since(&self) -> Instant {
        *lock(&self.last_active)
    }

    fn begin_request(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        *lock(&self.last_active) = Instant::now();
        RequestGuard(Arc::clone(self))
    }

    fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for slot in [&self.reader, &self.writer] {
            // Taken out first: the guard is gone before the task is woken.
            let waker = lock(slot).take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }

    /// Whether the next read should end the connection: told to close and
    /// still idle. A request that arrived meanwhile cancels the close.
    fn should_close(&self) -> bool {
        if !self.closing.load(Ordering::SeqCst) {
            return false;
        }
        if self.in_flight() > 0 {
            self.closing.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn park_reader(&self, waker: &Waker) {
        park(&self.reader, waker);
    }

    fn park_writer(&self, waker: &Waker) {
        park(&self.writer, waker);
    }
}

fn park(slot: &Mutex<Option<Waker>>, waker: &Waker) {
    let mut slot = lock(slot);
    if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
        *slot = Some(waker.clone());
    }
}

/// A request in flight on a connection.
struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        *lock(&self.0.last_active) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connection info tonic puts into every request's extensions.
#[derive(Clone)]
pub struct ConnInfo(Arc<ConnState>);

impl ConnInfo {
    /// The peer at the other end.
    pub fn peer(&self) -> &Peer {
        &self.0.peer
    }
}

/// An accepted connection: the socket, its permit, its state.
pub struct Conn<IO> {
    io: IO,
    state: Arc<ConnState>,
    id: u64,
    connections: Arc<Connections>,
    /// End-of-file was delivered: the connection is closing for good.
    eof: bool,
    /// Started when a write first sees the connection told to close: when
    /// it fires, writes fail ([`FORCE_CLOSE_AFTER`]).
    force_close: Option<Pin<Box<tokio::time::Sleep>>>,
    _permit: OwnedSemaphorePermit,
}

impl<IO> Conn<IO> {
    /// Whether writes must fail now: told to close, still idle, and not
    /// closed by its reads within [`FORCE_CLOSE_AFTER`]. Arms the timer (so
    /// that it wakes the writer) on the first call after the close.
    fn write_refused(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.state.should_close() {
            self.force_close = None;
            return false;
        }
        let timer = self
            .force_close
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(FORCE_CLOSE_AFTER)));
        timer.as_mut().poll(cx).is_ready()
    }

    fn refused() -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "closed to make room for another connection (--max-connections)",
        )
    }
}

impl<IO> Drop for Conn<IO> {
    fn drop(&mut self) {
        self.connections.forget(self.id);
    }
}

impl<IO> Connected for Conn<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo(Arc::clone(&self.state))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Conn<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.eof || this.state.should_close() {
            this.eof = true;
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if polled.is_pending() {
            // Parked: a close must be able to wake this read. Checked again
            // after parking, in case the close came in between.
            this.state.park_reader(cx.waker());
            if this.state.should_close() {
                this.eof = true;
                return Poll::Ready(Ok(()));
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Conn<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_refused(cx) {
            return Poll::Ready(Err(Self::refused()));
        }
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if polled.is_pending() {
            this.state.park_writer(cx.waker());
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_refused(cx) {
            return Poll::Ready(Err(Self::refused()));
        }
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if polled.is_pending() {
            this.state.park_writer(cx.waker());
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_refused(cx) {
            return Poll::Ready(Err(Self::refused()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A listening socket the accept task can drive.
pub trait Listener: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Accepts one connection and says who is on the other end.
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Io, Peer)>>;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Io, Peer)>> {
        let (stream, peer) = ready!(tokio::net::TcpListener::poll_accept(self, cx))?;
        // gRPC's small frames should not wait for Nagle (tonic's own
        // listener sets this too).
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        Poll::Ready(Ok((stream, Peer::tcp(peer, local))))
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;

    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Io, Peer)>> {
        let (stream, _) = ready!(tokio::net::UnixListener::poll_accept(self, cx))?;
        let peer = Peer::unix(&stream);
        Poll::Ready(Ok((stream, peer)))
    }
}

/// The connections of one listener, as tonic's `serve_with_incoming*`
/// takes them. Dropping it stops the accept task and closes the listener.
pub struct Incoming<IO> {
    accepted: mpsc::Receiver<Conn<IO>>,
    task: tokio::task::AbortHandle,
}

impl<IO> Drop for Incoming<IO> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<IO> tokio_stream::Stream for Incoming<IO> {
    type Item = Result<Conn<IO>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().accepted.poll_recv(cx).map(|c| c.map(Ok))
    }
}

/// Starts accepting on `listener` within `connections`' limit. Must be
/// called inside the tokio runtime.
pub fn incoming<L: Listener>(listener: L, connections: Arc<Connections>) -> Incoming<L::Io> {
    let (tx, accepted) = mpsc::channel(1);
    let task = tokio::spawn(accept_loop(listener, connections, tx)).abort_handle();
    Incoming { accepted, task }
}

async fn accept_loop<L: Listener>(
    listener: L,
    connections: Arc<Connections>,
    tx: mpsc::Sender<Conn<L::Io>>,
) {
    let mut backoff = Backoff::default();
    loop {
        let (io, peer) = match poll_fn(|cx| listener.poll_accept(cx)).await {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            Err(e) if about_this_connection(&e) => {
                tracing::debug!(error = %e, "a connection failed while being accepted; skipped");
                continue;
            }
            Err(e) => {
                tokio::time::sleep(backoff.failed(&e)).await;
                continue;
            }
        };
        // At the limit this holds the accepted socket (one descriptor
        // from the reserve) until there is room for it.
        let Some(permit) = connections.admit().await else {
            return;
        };
        if tx
            .send(connections.register(io, peer, permit))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// EMFILE / ENFILE: this process, or the machine, is out of descriptors.
fn out_of_descriptors(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let errno = e.raw_os_error();
    [Errno::MFILE, Errno::NFILE]
        .iter()
        .any(|x| errno == Some(x.raw_os_error()))
}

/// Errors accept(2) reports for the pending connection, not the listener:
/// retry at once.
fn about_this_connection(e: &io::Error) -> bool {
    use rustix::io::Errno;
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) {
        return true;
    }
    let errno = e.raw_os_error();
    [
        Errno::PROTO,
        Errno::PERM,
        Errno::NETDOWN,
        Errno::NOPROTOOPT,
        Errno::HOSTDOWN,
        Errno::NONET,
        Errno::HOSTUNREACH,
        Errno::OPNOTSUPP,
        Errno::NETUNREACH,
    ]
    .iter()
    .any(|x| errno == Some(x.raw_os_error()))
}

/// Pauses between failed accepts: doubling, capped, one warning per streak.
#[derive(Debug, Default)]
struct Backoff {
    failures: u64,
    since: Option<Instant>,
    pause: Duration,
}

impl Backoff {
    /// Counts a failure and returns how long to pause before the next try.
    fn failed(&mut self, e: &io::Error) -> Duration {
        let descriptors = out_of_descriptors(e);
        metrics::counter!(
            "sllm_accept_errors_total",
            "kind" => if descriptors { "descriptors" } else { "other" }
        )
        .increment(1);
        if self.failures == 0 {
            self.since = Some(Instant::now());
            self.pause = BACKOFF_FIRST;
            if descriptors {
                tracing::warn!(
                    error = %e,
                    "out of file descriptors: new connections wait (retrying every {BACKOFF_FIRST:?} \
                     to {BACKOFF_MAX:?}); raise the open-file limit (ulimit -n, systemd LimitNOFILE=) \
                     or lower --max-connections"
                );
            } else {
                tracing::warn!(
                    error = %e,
                    "accepting a connection failed; retrying every {BACKOFF_FIRST:?} to {BACKOFF_MAX:?}"
                );
            }
        } else {
            self.pause = (self.pause * 2).min(BACKOFF_MAX);
        }
        self.failures += 1;
        self.pause
    }

    /// An accept succeeded: the streak, if any, is over.
    fn succeeded(&mut self) {
        if self.failures > 0 {
            let seconds = self.since.map_or(0.0, |s| s.elapsed().as_secs_f64());
            tracing::info!(
                failures = self.failures,
                seconds,
                "accepting connections again"
            );
            *self = Self::default();
        }
    }
}

/// Counts each connection's requests in flight (so that busy connections
/// are never closed for newcomers) and gives the service the request's
/// [`Peer`]. Goes on `Server::builder().layer(...)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackRequestsLayer;

impl<S> tower::Layer<S> for TrackRequestsLayer {
    type Service = TrackRequests<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TrackRequests { inner }
    }
}

/// The service [`TrackRequestsLayer`] makes.
#[derive(Clone, Debug)]
pub struct TrackRequests<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for TrackRequests<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let conn = req.extensions().get::<ConnInfo>().cloned();
        // Ends when the response is ready; its body of a unary call follows
        // at once, well inside the idle time a close waits for.
        let guard = conn.as_ref().map(|c| c.0.begin_request());
        if let Some(conn) = conn {
            req.extensions_mut().insert(conn.0.peer.clone());
        }
        let response = self.inner.call(req);
        Box::pin(async move {
            let out = response.await;
            drop(guard);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_limit_keeps_a_reserve_of_descriptors() {
        let unlimited = connection_limit(1024, None);
        assert_eq!((unlimited.max, unlimited.lowered()), (1024, false));
        // Under `prlimit --nofile=200`: 64 kept back.
        let low = connection_limit(1024, Some(200));
        assert_eq!((low.max, low.reserve, low.lowered()), (136, 64, true));
        // A quarter of a larger limit.
        assert_eq!(connection_limit(100_000, Some(4096)).max, 3072);
        assert_eq!(connection_limit(1024, Some(1 << 20)).max, 1024);
        // Never zero, even with almost no descriptors.
        assert_eq!(connection_limit(1024, Some(10)).max, 1);
        assert_eq!(connection_limit(0, None).max, 1);
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let emfile = io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error());
        assert!(out_of_descriptors(&emfile));
        let pauses: Vec<Duration> = (0..10).map(|_| b.failed(&emfile)).collect();
        assert_eq!(pauses[0], BACKOFF_FIRST);
        assert_eq!(pauses[1], BACKOFF_FIRST * 2);
        assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        b.succeeded();
        assert_eq!(b.failed(&emfile), BACKOFF_FIRST);
        let aborted = io::Error::from_raw_os_error(rustix::io::Errno::CONNABORTED.raw_os_error());
        assert!(about_this_connection(&aborted) && !about_this_connection(&emfile));
    }

    /// A listener that fails with EMFILE while `failing`, counting tries.
    struct Failing {
        failing: Arc<AtomicBool>,
        tries: Arc<AtomicUsize>,
        inner: tokio::net::TcpListener,
    }

    impl Listener for Failing {
        type Io = tokio::net::TcpStream;

        fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Io, Peer)>> {
            self.tries.fetch_add(1, Ordering::SeqCst);
            if self.failing.load(Ordering::SeqCst) {
                return Poll::Ready(Err(io::Error::from_raw_os_error(
                    rustix::io::Errno::MFILE.raw_os_error(),
                )));
            }
            Listener::poll_accept(&self.inner, cx)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_descriptors_it_backs_off_instead_of_spinning() {
        use tokio_stream::StreamExt;
        let inner = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let (failing, tries) = (
            Arc::new(AtomicBool::new(true)),
            Arc::new(AtomicUsize::new(0)),
        );
        let listener = Failing {
            failing: Arc::clone(&failing),
            tries: Arc::clone(&tries),
            inner,
        };
        let mut incoming = incoming(listener, Connections::new(4));
        // Ten (virtual) seconds of EMFILE: a few dozen tries, not millions.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let n = tries.load(Ordering::SeqCst);
        assert!((10..=40).contains(&n), "{n} tries in 10 s");
        // Descriptors are back: the next try, within the longest pause, gets in.
        failing.store(false, Ordering::SeqCst);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let conn = tokio::time::timeout(BACKOFF_MAX * 2, incoming.next()).await;
        assert!(matches!(conn, Ok(Some(Ok(_)))), "accepted after the streak");
    }

    #[tokio::test]
    async fn at_the_limit_the_connection_idle_longest_is_closed_for_a_newcomer() {
        use tokio_stream::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = || async move { tokio::net::TcpStream::connect(addr).await.unwrap() };
        let connections = Connections::with_min_idle(2, Duration::from_millis(100));
        let mut clients = vec![connect().await, connect().await];
        let mut incoming = incoming(listener, Arc::clone(&connections));
        let mut first = incoming.next().await.unwrap().unwrap();
        let mut second = incoming.next().await.unwrap().unwrap();
        assert_eq!(connections.open(), 2);
        // The first is busy: a request in flight.
        let busy = first.connect_info().0.begin_request();
        tokio::time::sleep(Duration::from_millis(150)).await;
        clients.push(connect().await);
        let mut third = tokio::time::timeout(Duration::from_secs(5), async {
            // The second, idle, reads end-of-file; hyper would drop it.
            let mut buf = [0u8; 8];
            assert_eq!(second.read(&mut buf).await.unwrap(), 0);
            drop(second);
            incoming.next().await.unwrap().unwrap()
        })
        .await
        .expect("the newcomer is admitted");
        assert_eq!(connections.open(), 2);
        // The busy one still works.
        clients[0].write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        first.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        // Both busy now: the next newcomer waits, and nothing is closed.
        let also_busy = third.connect_info().0.begin_request();
        clients.push(connect().await);
        assert!(
            tokio::time::timeout(Duration::from_millis(700), incoming.next())
                .await
                .is_err(),
            "admitted past the limit"
        );
        clients[2].write_all(b"pong").await.unwrap();
        third.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"pong");
        // A connection that ends makes room.
        drop(busy);
        drop(first);
        let fourth = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("room once one closed");
        assert!(fourth.is_some());
        drop(also_busy);
    }

    #[tokio::test]
    async fn a_connection_told_to_close_that_never_reads_cannot_keep_its_place() {
        use tokio_stream::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A client that never reads: the daemon's writes to it back up.
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut incoming = incoming(listener, Connections::with_min_idle(1, Duration::ZERO));
        let mut conn = incoming.next().await.unwrap().unwrap();
        let state = conn.connect_info().0;
        let writing = tokio::spawn(async move {
            // What hyper does for a peer flooding it with PINGs: keeps writing
            // (and so never reads, and never sees end-of-file).
            let piece = vec![0u8; 64 << 10];
            loop {
                if let Err(e) = conn.write_all(&piece).await {
                    return e;
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!writing.is_finished(), "the writes are stuck, not failing");
        state.close();
        let e = tokio::time::timeout(FORCE_CLOSE_AFTER * 5, writing)
            .await
            .expect("the stuck writes fail soon after the close")
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe, "{e}");
    }

    #[tokio::test]
    async fn a_request_that_slips_in_cancels_the_close() {
        use tokio_stream::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut incoming = incoming(listener, Connections::with_min_idle(1, Duration::ZERO));
        let mut conn = incoming.next().await.unwrap().unwrap();
        let state = conn.connect_info().0;
        state.close();
        let guard = state.begin_request();
        client.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        conn.read_exact(&mut buf).await.unwrap();
        assert!(!state.closing.load(Ordering::SeqCst), "close cancelled");
        drop(guard);
        // A read parked before the close is woken by it.
        let (read, ()) = tokio::join!(conn.read(&mut buf), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            state.close();
        });
        assert_eq!(read.unwrap(), 0, "closed once idle");
    }
}
