//! Netcheck against one server alone: control with its embedded DERP and STUN (two STUN ports on
//! one address, the second announced as a STUN-only node of the region) is enough for a node to
//! tell a symmetric NAT from an endpoint-independent one.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use warren_netns_tests::mesh::ControlConfig;
use warren_netns_tests::nat::SERVER_ADDRS;
use warren_netns_tests::{Binaries, Control, Lab, NatKind, NatLab, Node, wait_until};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");
const SOON: Duration = Duration::from_secs(30);

fn lab_test(name: &str, body: impl FnOnce(&mut Lab, &Binaries) -> Result<()>) {
    warren_netns_tests::lab_test(name, LABTOOL, body);
}

/// `warren netcheck --json` of `node` once it has measured: (udp, mapping_varies).
fn netcheck(lab: &Lab, node: &Node) -> Result<(bool, bool)> {
    let mut last = None;
    wait_until(
        SOON,
        &format!("{} has a netcheck with UDP", node.hostname),
        || {
            node.check_running()?;
            let report = node.netcheck(lab)?;
            let udp = report["udp"].as_bool() == Some(true);
            last = Some((udp, report["mapping_varies"].as_bool() == Some(true)));
            Ok(udp)
        },
    )?;
    last.context("no netcheck")
}

#[test]
fn one_server_tells_symmetric_nat_from_the_rest() {
    lab_test("netcheck-one-server", |lab, bins| {
        let mut net = NatLab::new(lab)?;
        let srv = net.server_ns().to_owned();
        let addr: Ipv4Addr = SERVER_ADDRS[0];
        // Only the embedded server: its default map, its default STUN ports (3478 and 3479).
        let settings = ControlConfig {
            extra_toml: format!("\n[derp.server]\nipv4 = \"{addr}\"\n"),
            ..ControlConfig::default()
        };
        let control = Control::start_with(lab, bins, &srv, addr, "control", &settings)?;
        control.create_user(lab, "lab")?;
        let key = control.create_preauth_key(lab, "lab", &["--reusable"])?;
        let mut seen = Vec::new();
        for (i, kind) in [NatKind::Symmetric, NatKind::PortRestricted]
            .into_iter()
            .enumerate()
        {
            let site = net.add_site(lab, kind, false, 1)?;
            let h = site.host(0)?;
            let node = Node::spawn(
                lab,
                bins,
                &h.ns,
                h.addr,
                &format!("node{i}"),
                &control.url,
                &key.secret,
            )?;
            let (udp, varies) = netcheck(lab, &node)?;
            seen.push((kind, udp, varies));
        }
        ensure!(
            seen == [
                (NatKind::Symmetric, true, true),
                (NatKind::PortRestricted, true, false)
            ],
            "netcheck behind (kind, udp, mapping varies): {seen:?}"
        );
        Ok(())
    });
}
