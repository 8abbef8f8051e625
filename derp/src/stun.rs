//! The STUN server: answers RFC 5389 Binding requests with the source address as
//! XOR-MAPPED-ADDRESS (like Tailscale's derper), ignores every other datagram, never panics.
//! It may listen on a second port too ([`crate::config::Config::stun_alt_listen`]): a node
//! asking both learns whether its NAT maps by destination, from this one server.
//!
//! A server bound to a wildcard address answers each request from the address it arrived at
//! (IP_PKTINFO through quinn-udp), so on a host with several addresses a client sees its
//! answer come from the server it asked, and NAT mappings opened towards that address match.

use std::io::IoSliceMut;
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::{debug, info, trace, warn};
use warren_proto::stun;

/// One socket the server answers on.
struct Port {
    socket: UdpSocket,
    state: UdpSocketState,
}

impl Port {
    fn new(socket: UdpSocket) -> std::io::Result<Self> {
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Self { socket, state })
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
    // Room for a GRO run (up to 64 KiB), so no datagram of one is cut off.
    let mut buf = vec![0u8; 64 << 10];
    let mut out = Vec::with_capacity(64);
    loop {
        let ready = tokio::select! {
            _ = &mut shutdown => break,
            r = readable(&ports, 0) => (0, r),
            r = readable(&ports, 1) => (1, r),
        };
        let (at, r) = ready;
        let Some(port) = ports.get(at) else {
            continue;
        };
        if let Err(e) = r {
            // The socket itself failed (not one datagram): waiting again would spin.
            warn!(error = %e, "STUN socket failed; not serving STUN");
            break;
        }
        let mut meta = [RecvMeta::default()];
        let received = port.socket.try_io(Interest::READABLE, || {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            port.state.recv((&port.socket).into(), &mut bufs, &mut meta)
        });
        match received {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                // ICMP errors surface here on some systems; keep serving without spinning.
                debug!(error = %e, "STUN receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        }
        let [meta] = meta;
        // GRO may hand over a run of datagrams from one sender; each gets its own answer.
        let Some(run) = buf.get(..meta.len) else {
            continue;
        };
        for packet in run.chunks(meta.stride.max(1)) {
            answer(port, &meta, packet, &mut out).await;
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

/// Answers one datagram when it is a Binding request, from the address it was sent to.
async fn answer(port: &Port, meta: &RecvMeta, packet: &[u8], out: &mut Vec<u8>) {
    let src = meta.addr;
    let txid = match stun::parse_request(packet) {
        Ok(txid) => txid,
        Err(e) => {
            trace!(%src, error = %e, "not a valid Binding request; ignored");
            return;
        }
    };
    out.clear();
    stun::build_response(txid, src, out);
    let transmit = Transmit {
        destination: src,
        ecn: None,
        contents: out,
        segment_size: None,
        src_ip: meta.dst_ip,
    };
    let sent = port
        .socket
        .async_io(Interest::WRITABLE, || {
            port.state.try_send((&port.socket).into(), &transmit)
        })
        .await;
    // Per datagram, and requests can be spoofed: no louder than debug.
    if let Err(e) = sent {
        debug!(%src, error = %e, "STUN send failed");
    }
}
