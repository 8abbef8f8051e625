//! A network-namespace lab that runs warren's real binaries.
//!
//! [`Lab`] is an RAII guard: it creates namespaces (all named with a short unique prefix), links
//! them with veth pairs onto Linux bridges living in their own "switch" namespaces, spawns
//! processes inside them and, on drop, kills every process and deletes every namespace. When
//! the drop happens during a panic it first prints the logs of every process it spawned.
//!
//! The lab never touches the host namespace's interfaces, routes or firewall, and only assigns
//! addresses inside `10.77.0.0/16`. Tests synchronise with [`wait_until`], never fixed sleeps.
//!
//! [`mesh`] drives the real `warren-control` and `warren` binaries on top of a lab; [`traffic`]
//! holds the deterministic byte stream and the report format of the `warren-labtool` binary.

pub mod binaries;
pub mod lab;
pub mod mesh;
pub mod process;
pub mod traffic;
pub mod wait;

pub use binaries::{Binaries, binaries, binaries_with_labtool, require_root};
pub use lab::{Lab, Lan, serial};
pub use mesh::{Control, ControlConfig, Mesh, Node, NodeInfo, NodeStatus, PeerStatus, PreAuthKey};
pub use process::ProcHandle;
pub use traffic::TransferReport;
pub use wait::wait_until;
