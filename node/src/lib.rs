//! warren-node: the node daemon's shell around `warren-node-core`: key storage, the control
//! client, the TUN device and UDP socket loop, and the local API that the CLI talks to.

pub mod api;
pub mod control;
pub mod daemon;
pub mod derp;
pub mod endpoints;
pub mod state;
pub mod udp;
