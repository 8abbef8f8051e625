//! How control takes connections. tonic serves whatever stream of connections it is given and
//! bounds none of them, so this module does:
//!
//! - [`bind_tcp`]: a TCP listener with a deep backlog (a restart with thousands of nodes
//!   reconnecting at once must not overflow the kernel's accept queue).
//! - [`Acceptor`]: the accepted connections, each with TCP_NODELAY set (tonic ignores its own
//!   `tcp_nodelay` for connections it did not accept), at most [`Limits::max_connections`] at a
//!   time (over the cap a connection is closed at once). A failed accept (out of file
//!   descriptors, say) pauses it, 10 ms doubling up to 1 s, instead of retrying at once as
//!   tonic would (a busy loop that starved everything else); the admin socket keeps a spare
//!   descriptor, so an operator can still get in when the process is out of them.
//! - [`Conn`]: a connection with a deadline. It must start a request within
//!   [`Limits::handshake_timeout`] of being accepted, and is closed after
//!   [`Limits::idle_timeout`] without a request in flight (a node's map stream is always in
//!   flight, so only idle and silent peers are cut). [`TrackLayer`] tells each connection when
//!   its requests start and end. A peer that stops answering HTTP/2 pings is closed by the
//!   server's keepalive (see `serve`).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};
use tokio::time::{Instant, Sleep};
use tonic::codegen::http;

use warren_derp::log_limit::LogLimiter;

/// The listen backlog when the configuration names none; the kernel caps it at
/// `net.core.somaxconn` (4096 on current Linux).
pub const DEFAULT_BACKLOG: u32 = 4096;
/// How long a new connection may take to start its first request, by default.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may go without a request in flight, by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How many TCP connections control serves at once, by default (a node holds one or two).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;
/// How many admin connections the local socket serves at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// The first pause after a failed accept; each further failure doubles it.
pub const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause after failed accepts.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// File descriptors kept out of reach of TCP connections: the database, the listeners, the
/// admin socket's connections and the embedded DERP server's sockets need some too.
pub const FD_RESERVE: u64 = 128;

/// Raises the soft limit on open files to the hard limit (a server with thousands of nodes
/// needs more than the usual soft 1024) and returns the soft limit now in force (`None`:
/// unlimited).
pub fn raise_nofile_limit() -> io::Result<Option<u64>> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // An unlimited hard limit still cannot exceed the kernel's fs.nr_open (2^20 by default).
    let target = limit.maximum.unwrap_or(1 << 20);
    if limit.current.is_some_and(|current| current < target) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: limit.maximum,
            },
        )?;
    }
    Ok(getrlimit(Resource::Nofile).current)
}

/// The TCP connection cap that leaves [`FD_RESERVE`] descriptors of `nofile` (the soft limit
/// on open files; `None`: unlimited) for everything else.
pub fn cap_for_fd_limit(max_connections: usize, nofile: Option<u64>) -> usize {
    let Some(nofile) = nofile else {
        return max_connections;
    };
    let room = usize::try_from(nofile.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    max_connections.min(room).max(1)
}

/// Binds a TCP listener on `addr` whose accept queue holds `backlog` connections (tokio's
/// `TcpListener::bind` always asks for 1024).
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As tokio's bind does: a restarted server can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The bounds on one listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// How long after being accepted a connection must have started its first request.
    pub handshake_timeout: Duration,
    /// How long a connection may go without a request in flight before it is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// What one listener's acceptor has seen, for logs and tests.
#[derive(Debug, Default)]
pub struct AcceptStats {
    accepted: AtomicU64,
    refused: AtomicU64,
    errors: AtomicU64,
    handshake_timeouts: AtomicU64,
    idle_timeouts: AtomicU64,
    open: AtomicUsize,
    backoff_ms: AtomicU64,
    spare_used: AtomicU64,
}

impl AcceptStats {
    /// Connections accepted and handed to the server.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed at once because the cap was reached.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Failed `accept` calls.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Connections closed for not starting a request in time.
    pub fn handshake_timeouts(&self) -> u64 {
        self.handshake_timeouts.load(Ordering::Relaxed)
    }

    /// Connections closed for going idle.
    pub fn idle_timeouts(&self) -> u64 {
        self.idle_timeouts.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The pause before the next accept after failures; zero while accepts succeed.
    pub fn backoff(&self) -> Duration {
        Duration::from_millis(self.backoff_ms.load(Ordering::Relaxed))
    }

    /// Connections accepted into the spare descriptor when the process had no other.
    pub fn spare_used(&self) -> u64 {
        self.spare_used.load(Ordering::Relaxed)
    }
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A process on this host, over the admin socket.
    Local,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Local => f.write_str("local"),
        }
    }
}

/// A listener the [`Acceptor`] can take connections from.
pub trait Listen: Unpin + Send + 'static {
    /// The connections it yields.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Accepts one connection, prepared for serving.
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Io, Peer)>>;
}

impl Listen for TcpListener {
    type Io = TcpStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(TcpStream, Peer)>> {
        loop {
            let (stream, peer) = ready!(TcpListener::poll_accept(self, cx))?;
            // Map deltas and small replies leave at once instead of waiting on Nagle.
            match stream.set_nodelay(true) {
                Ok(()) => return Poll::Ready(Ok((stream, Peer::Tcp(peer)))),
                // Only a connection already gone fails here: drop it.
                Err(e) => tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY"),
            }
        }
    }
}

impl Listen for UnixListener {
    type Io = UnixStream;

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(UnixStream, Peer)>> {
        UnixListener::poll_accept(self, cx).map_ok(|(stream, _)| (stream, Peer::Local))
    }
}

/// The accepted connections of a listener, as the stream of connections tonic serves.
#[derive(Debug)]
pub struct Acceptor<L> {
    listener: L,
    limits: Limits,
    stats: Arc<AcceptStats>,
    logs: Arc<LogLimiter>,
    backoff: Duration,
    pause: Option<Pin<Box<Sleep>>>,
    /// Keeps a spare descriptor (see [`Acceptor::with_spare_fd`]).
    keep_spare: bool,
    spare: Option<std::fs::File>,
}

impl<L: Listen> Acceptor<L> {
    /// Accepts from `listener` within `limits`, counting into `stats`; warnings a peer can
    /// cause go through `logs`.
    pub fn new(
        listener: L,
        limits: Limits,
        stats: Arc<AcceptStats>,
        logs: Arc<LogLimiter>,
    ) -> Self {
        Self {
            listener,
            limits,
            stats,
            logs,
            backoff: Duration::ZERO,
            pause: None,
            keep_spare: false,
            spare: None,
        }
    }

    /// Holds a spare file descriptor and gives it up to accept a connection when the process
    /// has no other, so this listener still answers when the process is out of descriptors.
    pub fn with_spare_fd(mut self) -> Self {
        self.keep_spare = true;
        self.spare = open_spare();
        self
    }
}

/// A descriptor to hold in reserve.
fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

/// Whether an accept failed because the process or the system is out of file descriptors.
fn out_of_fds(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(Errno::from_io_error(e), Some(Errno::MFILE | Errno::NFILE))
}

/// Whether an accept failed for the one connection only (it went away before it was taken),
/// so the next can be taken at once.
fn connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::PermissionDenied
    )
}

impl<L: Listen> tokio_stream::Stream for Acceptor<L> {
    type Item = io::Result<Conn<L::Io>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(pause) = this.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                this.pause = None;
            }
            let (io, peer) = match ready!(this.listener.poll_accept(cx)) {
                Ok(accepted) => accepted,
                Err(e) if connection_error(&e) => {
                    tracing::debug!(error = %e, "a connection went away before it was accepted");
                    continue;
                }
                Err(e) => {
                    this.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if out_of_fds(&e) && this.spare.take().is_some() {
                        // Its descriptor is free now: take the connection with it.
                        this.stats.spare_used.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // The connection waits in the queue; retrying at once would spin.
                    this.backoff = (this.backoff * 2).clamp(MIN_ACCEPT_BACKOFF, MAX_ACCEPT_BACKOFF);
                    let ms = u64::try_from(this.backoff.as_millis()).unwrap_or(u64::MAX);
                    this.stats.backoff_ms.store(ms, Ordering::Relaxed);
                    if let Some(held_back) = this.logs.allow() {
                        tracing::warn!(error = %e, retry_in = ?this.backoff, held_back,
                            "cannot accept connections");
                    }
                    this.pause = Some(Box::pin(tokio::time::sleep(this.backoff)));
                    continue;
                }
            };
            if !this.backoff.is_zero() {
                this.backoff = Duration::ZERO;
                this.stats.backoff_ms.store(0, Ordering::Relaxed);
                tracing::info!("accepting connections again");
            }
            if this.keep_spare && this.spare.is_none() {
                this.spare = open_spare();
            }
            let slot = Slot::take(&this.stats);
            if slot.open_before >= this.limits.max_connections {
                this.stats.refused.fetch_add(1, Ordering::Relaxed);
                drop(io);
                if let Some(held_back) = this.logs.allow() {
                    tracing::warn!(
                        %peer,
                        max = this.limits.max_connections,
                        held_back,
                        "connection closed: the connection cap is reached"
                    );
                }
                continue;
            }
            this.stats.accepted.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Some(Ok(Conn::new(
                io,
                peer,
                this.limits,
                slot,
                Arc::clone(&this.logs),
            ))));
        }
    }
}

/// One place under a listener's cap, given back when its connection is dropped.
#[derive(Debug)]
struct Slot {
    stats: Arc<AcceptStats>,
    open_before: usize,
}

impl Slot {
    fn take(stats: &Arc<AcceptStats>) -> Self {
        Self {
            open_before: stats.open.fetch_add(1, Ordering::Relaxed),
            stats: Arc::clone(stats),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a connection's requests tell its deadline.
#[derive(Debug)]
struct Activity {
    accepted: Instant,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    idle: Mutex<Idle>,
}

#[derive(Debug)]
struct Idle {
    /// When the last request in flight ended.
    since: Instant,
    /// Wakes the connection's reads, so a deadline is set as soon as it goes idle.
    waker: Option<Waker>,
}

/// Why a connection's deadline closed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Handshake,
    Idle,
}

impl Activity {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// When the connection is to be closed, unless a request starts first.
    fn deadline(&self, limits: &Limits) -> Option<(Instant, Expiry)> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        match self.requests.load(Ordering::Acquire) {
            0 => Some((self.accepted + limits.handshake_timeout, Expiry::Handshake)),
            _ => Some((self.lock().since + limits.idle_timeout, Expiry::Idle)),
        }
    }

    fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }
}

/// A request in flight on a connection, until its response body is dropped.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut idle = self.0.lock();
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            idle.since = Instant::now();
            if let Some(w) = idle.waker.take() {
                w.wake();
            }
        }
    }
}

/// What the server knows of a connection; tonic puts it in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    peer: Peer,
    activity: Arc<Activity>,
}

impl ConnInfo {
    /// Who is at the other end.
    pub fn peer(&self) -> Peer {
        self.peer
    }
}

/// An accepted connection under its listener's limits: closed when it does not start a request
/// in time or goes idle.
#[derive(Debug)]
pub struct Conn<S> {
    io: S,
    info: ConnInfo,
    limits: Limits,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    expired: bool,
    logs: Arc<LogLimiter>,
    slot: Slot,
}

impl<S> Conn<S> {
    fn new(io: S, peer: Peer, limits: Limits, slot: Slot, logs: Arc<LogLimiter>) -> Self {
        let now = Instant::now();
        Self {
            io,
            info: ConnInfo {
                peer,
                activity: Arc::new(Activity {
                    accepted: now,
                    requests: AtomicU64::new(0),
                    in_flight: AtomicUsize::new(0),
                    idle: Mutex::new(Idle {
                        since: now,
                        waker: None,
                    }),
                }),
            },
            limits,
            timer: Box::pin(tokio::time::sleep_until(now + limits.handshake_timeout)),
            armed: None,
            expired: false,
            logs,
            slot,
        }
    }

    /// The socket.
    pub fn io(&self) -> &S {
        &self.io
    }

    /// Fails once the connection's deadline has passed with no request in flight.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let activity = &self.info.activity;
        {
            let mut idle = activity.lock();
            if !idle.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                idle.waker = Some(cx.waker().clone());
            }
        }
        let Some((deadline, why)) = activity.deadline(&self.limits) else {
            return Ok(());
        };
        if self.armed != Some(deadline) {
            self.timer.as_mut().reset(deadline);
            self.armed = Some(deadline);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        if !self.expired {
            self.expired = true;
            let peer = self.info.peer;
            match why {
                Expiry::Handshake => {
                    self.slot
                        .stats
                        .handshake_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(held_back) = self.logs.allow() {
                        tracing::warn!(%peer, timeout = ?self.limits.handshake_timeout, held_back,
                            "connection closed: no request within the handshake deadline");
                    }
                }
                Expiry::Idle => {
                    self.slot
                        .stats
                        .idle_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "idle connection closed");
                }
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            match why {
                Expiry::Handshake => "no request within the handshake deadline",
                Expiry::Idle => "idle connection",
            },
        ))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_deadline(cx)?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S> tonic::transport::server::Connected for Conn<S> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// Tells each connection when its requests start and end (their response bodies are dropped),
/// which its deadline depends on. Requests not served through an [`Acceptor`] pass untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrackLayer;

impl<S> tower::Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track { inner }
    }
}

/// The service [`TrackLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct Track<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for Track<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Tracked<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let in_flight = req
            .extensions()
            .get::<ConnInfo>()
            .map(|info| info.activity.start());
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    _in_flight: Option<InFlight>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_connections_leave_descriptors_for_the_rest() {
        assert_eq!(cap_for_fd_limit(16_384, Some(1024)), 1024 - 128);
        assert_eq!(cap_for_fd_limit(16_384, Some(1 << 20)), 16_384);
        assert_eq!(cap_for_fd_limit(16_384, None), 16_384);
        assert_eq!(cap_for_fd_limit(16_384, Some(100)), 1);
    }
}
