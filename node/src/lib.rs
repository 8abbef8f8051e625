//! warren-node: the node daemon's shell around `warren-node-core`: key storage, the control
//! client, the TUN device and UDP socket loop, and the local API that the CLI talks to.

pub mod api;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod derp;
pub mod endpoints;
pub mod metrics;
pub mod os_net;
pub mod resolver_os;
pub mod state;
pub mod udp;

/// A random number from the OS, for jitter (a zero if the OS has none: jitter is then lost,
/// nothing else).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    match getrandom::getrandom(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
    }
}
