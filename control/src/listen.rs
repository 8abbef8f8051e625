//! How control takes connections: a TCP listener with a deep backlog (a restart with thousands
//! of nodes reconnecting at once must not overflow the kernel's accept queue), and an
//! [`Acceptor`] that prepares every accepted socket before tonic serves it (tonic ignores its
//! own `tcp_nodelay` setting for a stream of connections it did not accept itself).

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// The listen backlog when the configuration names none; the kernel caps it at
/// `net.core.somaxconn` (4096 on current Linux).
pub const DEFAULT_BACKLOG: u32 = 4096;

/// Binds a TCP listener on `addr` whose accept queue holds `backlog` connections (tokio's
/// `TcpListener::bind` always asks for 1024).
pub fn bind_tcp(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As tokio's bind does: a restarted server can bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The accepted connections of a listener, as a stream tonic serves: each with TCP_NODELAY set,
/// so map deltas and small replies leave at once instead of waiting on Nagle's algorithm.
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
}

impl Acceptor {
    /// Accepts from `listener`.
    pub fn new(listener: TcpListener) -> Self {
        Self { listener }
    }
}

impl tokio_stream::Stream for Acceptor {
    type Item = std::io::Result<TcpStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let (stream, peer) = match ready!(self.listener.poll_accept(cx)) {
                Ok(accepted) => accepted,
                Err(e) => return Poll::Ready(Some(Err(e))),
            };
            match stream.set_nodelay(true) {
                Ok(()) => return Poll::Ready(Some(Ok(stream))),
                // Only a connection already gone fails here: drop it.
                Err(e) => tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY"),
            }
        }
    }
}
