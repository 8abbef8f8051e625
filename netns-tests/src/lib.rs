//! A network-namespace lab that runs warren's real binaries.
//!
//! [`Lab`] is an RAII guard: it creates namespaces (all named with a short unique prefix), links
//! them with veth pairs onto Linux bridges living in their own "switch" namespaces, spawns
//! processes inside them and, on drop, kills every process and deletes every namespace. When
//! the drop happens during a panic it first prints the logs of every process it spawned.
//!
//! The lab never touches the host namespace's interfaces, routes or firewall, and only assigns
//! addresses inside its own ranges ([`lab::LAB_RANGES`]: `10.77.0.0/16`, TEST-NET-3
//! `203.0.113.0/24`, and for [`services`] `10.20.0.0/16`, `10.53.0.0/16`, `10.54.0.0/16`,
//! TEST-NET-2 `198.51.100.0/24`). Outside the namespaces it writes only its directory, its
//! registry file and each namespace's `/etc/netns/NS/resolv.conf` (so no node can rewrite the
//! host's resolver), all removed when the lab ends.
//! Tests synchronise with [`wait_until`], never fixed sleeps.
//!
//! [`nat`] builds an "internet" with NAT routers of every RFC 4787 kind in front of LANs;
//! [`udp`] drives the labtool's UDP commands (echo, probe, listen, send) to observe them, and
//! [`tcp`] its TCP server and connect probe (is a port open through the packet filter?).
//! [`mesh`] drives the real `warren-control` and `warren` binaries on top of a lab; [`traffic`]
//! holds the deterministic byte stream and the report format of the `warren-labtool` binary.
//! [`postgres`] starts a throwaway PostgreSQL server for tests of several control instances.
//! [`services`] builds what subnet routers, exit nodes and MagicDNS need around a mesh (a LAN
//! behind routers, an internet behind exit nodes, DNS servers) and observes them.

pub mod binaries;
pub mod lab;
pub mod mesh;
pub mod nat;
pub mod natmesh;
pub mod postgres;
pub mod process;
pub mod services;
pub mod tcp;
pub mod traffic;
pub mod udp;
pub mod wait;

pub use binaries::{Binaries, binaries, binaries_with_labtool, require_root};
pub use lab::{Lab, Lan, serial};
pub use mesh::{
    Control, ControlConfig, Mesh, Node, NodeInfo, NodeOptions, NodeStatus, PeerStatus, PolicyEdit,
    PolicySource, PreAuthKey,
};
pub use nat::{Host, NatKind, NatLab, Site};
pub use natmesh::NatMesh;
pub use process::ProcHandle;
pub use traffic::TransferReport;
pub use wait::{wait_until, wait_until_every};

/// Runs one lab test: takes the lab's serial lock, returns early (or fails, see
/// [`require_root`]) without root, finds the binaries (`labtool` is the caller's
/// `env!("CARGO_BIN_EXE_warren-labtool")`), creates a fresh [`Lab`] named `name` and runs
/// `body` in it. An error fails the test while the lab is still alive, so its drop prints
/// every process's log before it removes everything.
pub fn lab_test(
    name: &str,
    labtool: &str,
    body: impl FnOnce(&mut Lab, &Binaries) -> anyhow::Result<()>,
) {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let bins = binaries_with_labtool(labtool).unwrap_or_else(|e| panic!("{e:#}"));
    let mut lab = Lab::new(name).unwrap_or_else(|e| panic!("cannot create the lab: {e:#}"));
    if let Err(e) = body(&mut lab, &bins) {
        panic!("{name} failed: {e:?}");
    }
}
