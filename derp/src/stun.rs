//! The STUN server: answers RFC 5389 Binding requests with the source address as
//! XOR-MAPPED-ADDRESS (like Tailscale's derper), ignores every other datagram, never panics.
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

/// Serves STUN on `socket` until `shutdown` resolves.
pub async fn serve(socket: UdpSocket, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let state = match UdpSocketState::new((&socket).into()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "STUN socket setup failed; not serving STUN");
            return;
        }
    };
    // Room for a GRO run (up to 64 KiB), so no datagram of one is cut off.
    let mut buf = vec![0u8; 64 << 10];
    let mut out = Vec::with_capacity(64);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = socket.readable() => if let Err(e) = r {
                // The socket itself failed (not one datagram): waiting again would spin.
                warn!(error = %e, "STUN socket failed; not serving STUN");
                break;
            },
        }
        let mut meta = [RecvMeta::default()];
        let received = socket.try_io(Interest::READABLE, || {
            let mut bufs = [IoSliceMut::new(&mut buf)];
            state.recv((&socket).into(), &mut bufs, &mut meta)
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
            answer(&socket, &state, &meta, packet, &mut out).await;
        }
    }
    info!("STUN server stopped");
}

/// Answers one datagram when it is a Binding request, from the address it was sent to.
async fn answer(
    socket: &UdpSocket,
    state: &UdpSocketState,
    meta: &RecvMeta,
    packet: &[u8],
    out: &mut Vec<u8>,
) {
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
    let sent = socket
        .async_io(Interest::WRITABLE, || {
            state.try_send(socket.into(), &transmit)
        })
        .await;
    // Per datagram, and requests can be spoofed: no louder than debug.
    if let Err(e) = sent {
        debug!(%src, error = %e, "STUN send failed");
    }
}
