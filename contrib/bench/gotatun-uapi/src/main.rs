//! `gotatun-uapi IFACE`: creates the TUN device IFACE, runs a GotaTun WireGuard device on it
//! with the UAPI socket at /var/run/wireguard/IFACE.sock (configured with `wg setconf`), and
//! stops on SIGTERM or SIGINT. It exists only so the throughput bench can compare GotaTun with
//! the other WireGuards on the same links; GotaTun ships no binary of its own.

use gotatun::device::{DeviceBuilder, uapi::UapiServer};
use gotatun::udp::socket::UdpSocketFactory;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(name) = std::env::args().nth(1) else {
        return Err("usage: gotatun-uapi IFACE".into());
    };
    let uapi = UapiServer::default_unix_socket(&name, None, None)
        .map_err(|e| format!("UAPI socket for {name}: {e}"))?;
    let device = DeviceBuilder::new()
        .create_tun(&name)?
        .with_udp(UdpSocketFactory::default())
        .with_uapi(uapi)
        .build()
        .await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    device.stop().await;
    Ok(())
}
