//! The STUN server: answers RFC 5389 Binding requests with the source address as
//! XOR-MAPPED-ADDRESS (like Tailscale's derper), and classic RFC 3489 ones (no magic cookie)
//! with MAPPED-ADDRESS and SOURCE-ADDRESS; ignores every other datagram, never panics.
//! Comprehension-required attributes it does not understand get a 420 error listing them
//! (RFC 8489 §6.3.1).
//!
//! It may listen on a second port too ([`crate::config::Config::stun_alt_listen`]): a node
//! asking both learns whether its NAT maps by destination, from this one server, and an
//! RFC 5780 CHANGE-REQUEST for another port is answered from the other port. A request to
//! change the IP address gets 420: the server has one.
//!
//! Bursts (a netcheck from many nodes at once) are absorbed by a large socket receive buffer
//! ([`RECV_BUFFER_BYTES`], forced past `net.core.rmem_max` when the process may) and drained
//! in batches (recvmmsg through quinn-udp).
//!
//! A server bound to a wildcard address answers each request from the address it arrived at
//! (IP_PKTINFO through quinn-udp), so on a host with several addresses a client sees its
//! answer come from the server it asked, and NAT mappings opened towards that address match.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, info, trace, warn};
use warren_proto::stun;

/// The receive buffer asked of the kernel for each STUN socket. A Binding request takes about
/// 1 KiB of buffer space in the kernel, so this holds thousands of requests arriving at once.
pub const RECV_BUFFER_BYTES: usize = 8 << 20;
/// Room for one received datagram, or one GRO run of them (up to 64 KiB), so none is cut off.
const SLOT_BYTES: usize = 64 << 10;
/// Datagrams received per system call.
const BATCH: usize = quinn_udp::BATCH_SIZE;
/// Batches drained from one socket before the loop looks at shutdown and the other socket.
const BATCHES_PER_TURN: usize = 8;

/// One socket the server answers on.
struct Port {
    socket: UdpSocket,
    state: UdpSocketState,
    /// The bound address (IP unspecified on a wildcard socket).
    local: SocketAddr,
}

impl Port {
    fn new(socket: UdpSocket) -> std::io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        let local = socket.local_addr()?;
        let port = Self {
            socket,
            state,
            local,
        };
        port.grow_receive_buffer();
        Ok(port)
    }

    /// Asks for [`RECV_BUFFER_BYTES`] of receive buffer: forced (SO_RCVBUFFORCE, needs
    /// CAP_NET_ADMIN) where possible, else as much as `net.core.rmem_max` allows.
    fn grow_receive_buffer(&self) {
        #[cfg(target_os = "linux")]
        let forced = rustix::net::sockopt::set_socket_recv_buffer_size_force(
            &self.socket,
            RECV_BUFFER_BYTES,
        )
        .is_ok();
        #[cfg(not(target_os = "linux"))]
        let forced = false;
        if !forced
            && let Err(e) = self
                .state
                .set_recv_buffer_size((&self.socket).into(), RECV_BUFFER_BYTES)
        {
            debug!(error = %e, "could not set the STUN receive buffer");
        }
        let granted = self
            .state
            .recv_buffer_size((&self.socket).into())
            .unwrap_or(0);
        let addr = self.local;
        // Linux reports twice what it grants for data (the rest is bookkeeping).
        let usable = if cfg!(target_os = "linux") {
            granted / 2
        } else {
            granted
        };
        if usable < RECV_BUFFER_BYTES {
            info!(
                %addr,
                granted = usable,
                wanted = RECV_BUFFER_BYTES,
                "STUN receive buffer is small: bursts may be lost (raise net.core.rmem_max)"
            );
        } else {
            debug!(%addr, granted, forced, "STUN receive buffer");
        }
    }
}

/// Serves STUN on `socket`, and on `alternate` (a second port) when given, until `shutdown`
/// resolves. Both are answered by this one loop.
pub async fn serve(
    socket: UdpSocket,
    alternate: Option<UdpSocket>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut ports = Vec::with_capacity(2);
    for socket in std::iter::once(socket).chain(alternate) {
        match Port::new(socket) {
            Ok(p) => ports.push(p),
            Err(e) => {
                warn!(error = %e, "STUN socket setup failed; not serving STUN");
                return;
            }
        }
    }
    let mut slots = vec![0u8; SLOT_BYTES * BATCH];
    let mut metas = [RecvMeta::default(); BATCH];
    let mut out = Vec::with_capacity(64);
    'serve: loop {
        let (at, ready) = tokio::select! {
            _ = &mut shutdown => break,
            r = readable(&ports, 0) => (0, r),
            r = readable(&ports, 1) => (1, r),
        };
        let Some(port) = ports.get(at) else {
            continue;
        };
        if let Err(e) = ready {
            // The socket itself failed (not one datagram): waiting again would spin.
            warn!(error = %e, "STUN socket failed; not serving STUN");
            break;
        }
        for _ in 0..BATCHES_PER_TURN {
            let received = port.socket.try_io(Interest::READABLE, || {
                let mut bufs: Vec<IoSliceMut<'_>> = slots
                    .chunks_exact_mut(SLOT_BYTES)
                    .map(IoSliceMut::new)
                    .collect();
                port.state
                    .recv((&port.socket).into(), &mut bufs, &mut metas)
            });
            let count = match received {
                Ok(count) => count,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue 'serve,
                Err(e) => {
                    // ICMP errors surface here on some systems; keep serving without spinning.
                    debug!(error = %e, "STUN receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue 'serve;
                }
            };
            for (meta, slot) in metas.iter().zip(slots.chunks_exact(SLOT_BYTES)).take(count) {
                // GRO may hand over a run of datagrams from one sender; each gets its own
                // answer.
                let Some(run) = slot.get(..meta.len) else {
                    continue;
                };
                for packet in run.chunks(meta.stride.max(1)) {
                    answer(&ports, at, meta, packet, &mut out).await;
                }
            }
        }
    }
    info!("STUN server stopped");
}

/// Resolves when port `at` is readable; never when there is no such port.
async fn readable(ports: &[Port], at: usize) -> std::io::Result<()> {
    match ports.get(at) {
        Some(p) => p.socket.readable().await,
        None => std::future::pending().await,
    }
}

/// Answers one datagram that arrived on `ports[at]` when it is a Binding request: a success
/// from the address it was sent to (or from the other port, for a change-port request), or a
/// 420 error naming what the server cannot honour: comprehension-required attributes it does
/// not understand, and CHANGE-REQUEST when it asks for another IP (this server has one) or
/// for another port that is not there.
async fn answer(ports: &[Port], at: usize, meta: &RecvMeta, packet: &[u8], out: &mut Vec<u8>) {
    let src = meta.addr;
    let Some(here) = ports.get(at) else {
        return;
    };
    let request = match stun::parse_binding_request(packet) {
        Ok(request) => request,
        Err(e) => {
            trace!(%src, error = %e, "not a valid Binding request; ignored");
            return;
        }
    };
    let mut unknown = request.unknown;
    let mut from = here;
    let stun::ChangeRequest {
        change_ip,
        change_port,
    } = request.change;
    if change_ip {
        unknown.push(stun::ATTR_CHANGE_REQUEST);
    } else if change_port {
        // Only another port: an answer from another IP would be a change-IP answer.
        let other = ports
            .iter()
            .enumerate()
            .find(|(i, p)| *i != at && p.local.ip() == here.local.ip());
        match other {
            Some((_, other)) => from = other,
            None => unknown.push(stun::ATTR_CHANGE_REQUEST),
        }
    }
    out.clear();
    if unknown.is_empty() {
        let ip = meta
            .dst_ip
            .or(Some(from.local.ip()).filter(|ip| !ip.is_unspecified()));
        let source = ip.map(|ip| SocketAddr::new(ip, from.local.port()));
        stun::build_binding_success(request.transaction, src, source, out);
    } else {
        trace!(%src, ?unknown, "STUN request with attributes not honoured; answering 420");
        from = here;
        stun::build_unknown_attributes_error(request.transaction, &unknown, out);
    }
    let transmit = Transmit {
        destination: src,
        ecn: None,
        contents: out,
        segment_size: None,
        src_ip: meta.dst_ip,
    };
    let sent = from
        .socket
        .async_io(Interest::WRITABLE, || {
            from.state.try_send((&from.socket).into(), &transmit)
        })
        .await;
    // Per datagram, and requests can be spoofed: no louder than debug.
    if let Err(e) = sent {
        debug!(%src, error = %e, "STUN send failed");
    }
}
