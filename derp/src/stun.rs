//! The STUN server: answers RFC 5389 Binding requests with the source address as
//! XOR-MAPPED-ADDRESS (like Tailscale's derper), ignores every other datagram, never panics.

use std::time::Duration;

use tokio::net::UdpSocket;
use tracing::{debug, info, trace, warn};
use warren_proto::stun;

/// Serves STUN on `socket` until `shutdown` resolves.
pub async fn serve(socket: UdpSocket, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut buf = vec![0u8; 2048];
    let mut out = Vec::with_capacity(64);
    loop {
        let (n, src) = tokio::select! {
            _ = &mut shutdown => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    // ICMP errors surface here on some systems; keep serving without spinning.
                    debug!(error = %e, "STUN receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let Some(packet) = buf.get(..n) else { continue };
        if !stun::is_stun(packet) {
            trace!(%src, "not STUN; ignored");
            continue;
        }
        let txid = match stun::parse_request(packet) {
            Ok(txid) => txid,
            Err(e) => {
                trace!(%src, error = %e, "not a valid Binding request; ignored");
                continue;
            }
        };
        out.clear();
        stun::build_response(txid, src, &mut out);
        if let Err(e) = socket.send_to(&out, src).await {
            warn!(%src, error = %e, "STUN send failed");
        }
    }
    info!("STUN server stopped");
}
