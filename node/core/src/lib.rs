//! The node's logic without I/O: which peer a packet belongs to, WireGuard sessions, what to
//! send where and when. The shell in `warren-node` owns the sockets, the TUN device and the
//! clock, feeds inputs in with `handle_*` and drains outputs with `poll_*`, so everything here
//! is tested without sockets or sleeps.

pub mod dns;
pub mod filter;
pub mod ip;
pub mod netcheck;
pub mod netmap;
pub mod node;
pub mod path;
pub mod routing;
pub mod sim;
pub mod wg;

pub use node::{
    Datagram, Dest, Event, LocalNets, Node, NodeError, PathKind, PathStatus, PeerConfig, PeerStats,
    TimeoutReason, Transmit,
};
