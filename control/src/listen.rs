//! How control takes connections: a TCP listener with a deep backlog (a restart with thousands
//! of nodes reconnecting at once must not overflow the kernel's accept queue).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

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
