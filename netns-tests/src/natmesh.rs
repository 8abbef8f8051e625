//! warren across NATs: the [`NatLab`] internet with control (and its embedded DERP + STUN
//! server) in the public server's namespace, and nodes on the hosts of NAT sites.
//!
//! ```text
//!   srv 203.0.113.10: warren-control :50443, embedded DERP :3340 (both addresses), STUN .10:3478
//!   srv 203.0.113.11: warren-derp STUN .11:3478 (its DERP listener on .11:3341 is unused)
//! ```
//! The DERP map (`derp.paths`) lists region 999 with two nodes, 999a at `.10` and 999b at
//! `.11`, both DERP port 3340 (the embedded server listens on every address), so a node's
//! netcheck gets STUN answers from two addresses and can tell a symmetric NAT from the others.
//! The second STUN server is a separate process because a STUN socket bound to `0.0.0.0`
//! answers from the primary address (`.10`) whatever address the request went to, and netcheck
//! rightly ignores an answer from an address it did not ask.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::binaries::Binaries;
use crate::lab::Lab;
use crate::mesh::{Control, ControlConfig, Node, NodeStatus, PeerStatus, PreAuthKey};
use crate::nat::{NatLab, SERVER_ADDRS, Site};
use crate::process::ProcHandle;
use crate::wait::wait_until;

/// The DERP region of the lab's relay.
pub const REGION: u32 = 999;
/// The embedded DERP server's port.
pub const DERP_PORT: u16 = 3340;
/// The STUN port on both server addresses.
pub const STUN_PORT: u16 = 3478;

/// A NAT lab with control, DERP and STUN on the public server.
#[derive(Debug)]
pub struct NatMesh {
    /// The internet and its sites.
    pub net: NatLab,
    /// Control in the server namespace at `203.0.113.10`.
    pub control: Control,
    /// The second STUN server (at `203.0.113.11`).
    pub stun2: ProcHandle,
    /// A reusable pre-auth key of user `lab`.
    pub key: PreAuthKey,
    bins: Binaries,
}

/// The DERP map JSON the lab's control loads.
pub fn derp_map_json() -> String {
    let node = |name: &str, ip: Ipv4Addr| {
        serde_json::json!({
            "Name": name, "RegionID": REGION, "HostName": ip.to_string(), "IPv4": ip.to_string(),
            "STUNPort": STUN_PORT, "DERPPort": DERP_PORT, "PlainHTTP": true,
        })
    };
    serde_json::json!({
        "Regions": {
            REGION.to_string(): {
                "RegionID": REGION, "RegionCode": "lab", "RegionName": "NAT lab",
                "Nodes": [node("999a", SERVER_ADDRS[0]), node("999b", SERVER_ADDRS[1])],
            }
        }
    })
    .to_string()
}

impl NatMesh {
    /// Builds the internet, the server with control and both STUN servers, user `lab` and a
    /// reusable key.
    pub fn start(lab: &mut Lab, bins: &Binaries) -> Result<Self> {
        ensure!(
            bins.derp.is_file(),
            "binary `warren-derp` not found at {}: run `cargo build --workspace --bins`",
            bins.derp.display()
        );
        let net = NatLab::new(lab)?;
        let srv = net.server_ns().to_owned();
        let dir = lab.dir().join("control");
        std::fs::create_dir_all(&dir)?;
        let map_path = dir.join("derp.json");
        std::fs::write(&map_path, derp_map_json())?;
        let extra = format!(
            "\n[derp]\npaths = [\"{map}\"]\n\
             \n[derp.server]\nenabled = true\nregion_id = {REGION}\n\
             listen_addr = \"0.0.0.0:{DERP_PORT}\"\n\
             stun_listen_addr = \"{a}:{STUN_PORT}\"\nipv4 = \"{a}\"\n\
             automatically_add_embedded_derp_region = false\nverify_clients = true\n",
            map = map_path.display(),
            a = SERVER_ADDRS[0],
        );
        let settings = ControlConfig {
            extra_toml: extra,
            ..ControlConfig::default()
        };
        let stun_key = dir.join("stun2.key");
        let stun2 = lab.spawn(
            &srv,
            "warren-derp stun .11",
            &bins.derp,
            [
                "--listen".to_owned(),
                format!("{}:3341", SERVER_ADDRS[1]),
                "--stun-listen".to_owned(),
                format!("{}:{STUN_PORT}", SERVER_ADDRS[1]),
                "--key-path".to_owned(),
                stun_key.to_string_lossy().into_owned(),
            ],
        )?;
        let control = Control::start_with(lab, bins, &srv, SERVER_ADDRS[0], "control", &settings)?;
        control.create_user(lab, "lab")?;
        let key = control.create_preauth_key(lab, "lab", &["--reusable"])?;
        ensure!(
            stun2.is_running(),
            "warren-derp exited:\n{}",
            stun2.stderr()
        );
        Ok(Self {
            net,
            control,
            stun2,
            key,
            bins: bins.clone(),
        })
    }

    /// Starts a node named `hostname` on host `host` of `site`, without waiting.
    pub fn spawn_node(
        &self,
        lab: &mut Lab,
        site: &Site,
        host: usize,
        hostname: &str,
    ) -> Result<Node> {
        let h = site.host(host)?;
        Node::spawn(
            lab,
            &self.bins,
            &h.ns,
            h.addr,
            hostname,
            &self.control.url,
            &self.key.secret,
        )
    }

    /// Stops `node` and deletes it from control, so later nodes do not see it.
    pub fn remove_node(&self, lab: &Lab, node: &Node) -> Result<()> {
        let _ = node.proc().kill();
        let info = self.control.node_by_hostname(lab, &node.hostname)?;
        self.control.delete_node(lab, info.id)
    }
}

/// The peer of `status` owning mesh address `addr`.
pub fn peer(status: &NodeStatus, addr: Ipv4Addr) -> Result<&PeerStatus> {
    status
        .peer_with_addr(IpAddr::V4(addr))
        .with_context(|| format!("{} does not list a peer with {addr}", status.name))
}

/// Waits until `node` has its mesh IPv4 address and lists `peers` peers; returns the address.
pub fn wait_up(lab: &Lab, node: &Node, peers: usize, deadline: Duration) -> Result<Ipv4Addr> {
    let mut addr = None;
    wait_until(
        deadline,
        &format!("{} is up with {peers} peers", node.hostname),
        || {
            node.check_running()?;
            let s = node.status(lab)?;
            addr = s.ipv4();
            Ok(addr.is_some() && s.peers.len() == peers)
        },
    )?;
    addr.context("no address")
}

/// The path `from` reports to the peer with mesh address `to` (`None`: none yet).
pub fn path_to(lab: &Lab, from: &Node, to: Ipv4Addr) -> Result<Option<String>> {
    let s = from.status(lab)?;
    Ok(peer(&s, to)?.path.clone())
}

/// Splits `"direct 1.2.3.4:5"` into its endpoint; `None` for every other path (relayed,
/// unconfirmed addresses being tried, unreachable).
pub fn direct_endpoint(path: &str) -> Result<Option<std::net::SocketAddr>> {
    match path.split_once(' ') {
        Some(("direct", ep)) => {
            Ok(Some(ep.parse().with_context(|| {
                format!("bad endpoint in path {path:?}")
            })?))
        }
        Some(("relay" | "trying", _)) => Ok(None),
        None if path == "unreachable" => Ok(None),
        _ => bail!("unexpected path {path:?}"),
    }
}

/// A background `ping -D -i INTERVAL` over the mesh, to measure how long traffic stops.
#[derive(Debug)]
pub struct PingStream {
    proc: ProcHandle,
}

/// Seconds since the Unix epoch, as `ping -D` prints them.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl PingStream {
    /// Starts pinging `to` from `ns` every `interval` (each reply waited for 1 s at most).
    pub fn start(lab: &mut Lab, ns: &str, to: Ipv4Addr, interval: Duration) -> Result<Self> {
        let proc = lab.spawn(
            ns,
            &format!("ping stream to {to}"),
            "ping",
            [
                "-n".to_owned(),
                "-D".to_owned(),
                "-i".to_owned(),
                format!("{:.3}", interval.as_secs_f64()),
                "-W".to_owned(),
                "1".to_owned(),
                to.to_string(),
            ],
        )?;
        Ok(Self { proc })
    }

    /// Unix times of every reply so far, in order.
    pub fn replies(&self) -> Vec<f64> {
        self.proc
            .stdout()
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| {
                l.strip_prefix('[')
                    .and_then(|r| r.split(']').next())
                    .and_then(|t| t.parse().ok())
            })
            .collect()
    }

    /// Replies received after Unix time `t`.
    pub fn replies_after(&self, t: f64) -> usize {
        self.replies().into_iter().filter(|&r| r > t).count()
    }

    /// The longest time without a reply that overlaps `[from, to]` (Unix times), counting from
    /// the last reply before `from` to the first one after it, and so on until `to`.
    pub fn longest_gap(&self, from: f64, to: f64) -> Option<Duration> {
        let r = self.replies();
        let before = r.iter().rposition(|&t| t <= from)?;
        let mut max = 0.0f64;
        for w in r[before..].windows(2) {
            if w[0] > to {
                break;
            }
            max = max.max(w[1] - w[0]);
        }
        Some(Duration::from_secs_f64(max))
    }

    /// Stops it.
    pub fn stop(&self) {
        let _ = self.proc.kill();
    }
}
