//! Self-tests of the lab harness: needs only root and iproute2 (plus `ping`), not warren.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use warren_netns_tests::lab::list_namespaces;
use warren_netns_tests::traffic::{TransferReport, tcp_transfer};
use warren_netns_tests::{Lab, require_root, serial, wait_until};

const LABTOOL: &str = env!("CARGO_BIN_EXE_warren-labtool");

fn lab_namespaces(prefix: &str) -> Result<Vec<String>> {
    Ok(list_namespaces()?
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect())
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Two namespaces on a bridge: ping both ways, move bytes with the labtool, then check that
/// dropping the lab kills its processes and removes its namespaces.
fn two_hosts(lab: &mut Lab) -> Result<u32> {
    let lan = lab.add_lan("lan")?;
    let a = lab.add_ns("a")?;
    let b = lab.add_ns("b")?;
    lab.attach(&lan, &a, "eth0", "10.77.250.1/24")?;
    lab.attach(&lan, &b, "eth0", "10.77.250.2/24")?;
    ensure!(
        lab.namespaces().len() == 3,
        "namespaces: {:?}",
        lab.namespaces()
    );

    let addr_a = IpAddr::V4(Ipv4Addr::new(10, 77, 250, 1));
    let addr_b = IpAddr::V4(Ipv4Addr::new(10, 77, 250, 2));
    let took = wait_until(Duration::from_secs(10), "a pings b", || {
        lab.ping(&a, addr_b)
    })?;
    eprintln!("first ping a -> b after {} ms", took.as_millis());
    ensure!(lab.ping(&b, addr_a)?, "b cannot ping a");
    // The lab's LAN has no route anywhere else.
    ensure!(
        !lab.ping(&a, IpAddr::V4(Ipv4Addr::new(10, 77, 251, 1)))?,
        "an address outside the LAN answered"
    );

    let bytes = 3_000_001;
    let (sent, received) = tcp_transfer(
        lab,
        Path::new(LABTOOL),
        &a,
        &b,
        SocketAddr::new(addr_b, 5201),
        bytes,
        Duration::from_secs(30),
    )?;
    ensure!(sent == received, "sent {sent:?}, received {received:?}");
    ensure!(sent == TransferReport::expected(bytes), "unexpected stream");

    // A long-running process the drop must kill.
    let sleeper = lab.spawn(&a, "sleeper", "sleep", ["600"])?;
    ensure!(sleeper.is_running(), "sleeper exited early");
    let out = lab.run_ok(&b, "ip", ["-br", "addr", "show", "dev", "eth0"])?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("10.77.250.2/24"),
        "eth0 in b: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(sleeper.pid())
}

#[test]
fn two_namespaces_ping_and_are_removed_on_drop() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let mut lab = Lab::new("selftest").expect("create lab");
    let prefix = lab.prefix().to_owned();
    let pid = two_hosts(&mut lab).expect("two hosts on a bridge");
    assert_eq!(lab_namespaces(&prefix).expect("list").len(), 3);
    drop(lab);
    assert!(!pid_alive(pid), "process {pid} survived the lab");
    assert_eq!(
        lab_namespaces(&prefix).expect("list"),
        Vec::<String>::new(),
        "namespaces left behind"
    );
}

#[test]
fn panicking_test_still_cleans_up() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let mut prefix = String::new();
    let mut pid = 0;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::new("panics").expect("create lab");
        prefix = lab.prefix().to_owned();
        let ns = lab.add_ns("x").expect("add ns");
        let p = lab
            .spawn(
                &ns,
                "talker",
                "sh",
                ["-c", "echo hello-from-talker; exec sleep 600"],
            )
            .expect("spawn");
        pid = p.pid();
        wait_until(Duration::from_secs(5), "talker wrote its line", || {
            Ok(p.stdout().contains("hello-from-talker"))
        })
        .expect("talker output");
        panic!("deliberate panic inside a lab");
    }));
    assert!(result.is_err(), "the closure should have panicked");
    assert!(!prefix.is_empty() && pid != 0);
    assert!(!pid_alive(pid), "process {pid} survived the lab");
    assert_eq!(
        lab_namespaces(&prefix).expect("list"),
        Vec::<String>::new(),
        "namespaces left behind"
    );
}

#[test]
fn run_is_bounded_and_addresses_are_confined() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let mut lab = Lab::new("bounds").expect("create lab");
    let lan = lab.add_lan("lan").expect("lan");
    let ns = lab.add_ns("h").expect("ns");
    let err = lab
        .run_timeout(&ns, "sleep", ["5"], Duration::from_millis(300))
        .expect_err("sleep 5 must time out");
    assert!(err.to_string().contains("did not finish"), "{err:#}");
    lab.attach(&lan, &ns, "eth0", "192.168.1.5/24")
        .expect_err("addresses outside 10.77.0.0/16 are refused");
    lab.attach(&lan, &ns, "an-interface-name-too-long", "10.77.1.5/24")
        .expect_err("interface names over 15 characters are refused");
    let status = lab
        .spawn(&ns, "false", "false", Vec::<&str>::new())
        .expect("spawn")
        .wait_exit(Duration::from_secs(5))
        .context("false did not exit")
        .expect("exit");
    assert!(!status.success());
}
