//! Self-tests of the lab harness: needs only root and iproute2 (plus `ping`), not warren.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use warren_netns_tests::lab::{REGISTRY_DIR, default_resolv_conf, list_namespaces, netns_etc_dir};
use warren_netns_tests::services::{
    self, DnsServers, HttpOutcome, Internet, Subnet, WarrenOsState, route_get,
};
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
    // The lab's LAN has no route anywhere else: ping fails outright (exit 2), which is an
    // error, not "no reply"...
    let outside = lab.ping(&a, IpAddr::V4(Ipv4Addr::new(10, 77, 251, 1)));
    ensure!(
        outside.is_err(),
        "ping to an unroutable address gave {outside:?}"
    );
    // ...while a free address on the LAN simply never answers (exit 1).
    ensure!(
        !lab.ping(&a, IpAddr::V4(Ipv4Addr::new(10, 77, 250, 3)))?,
        "a free address on the LAN answered"
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
    let mut etc = std::path::PathBuf::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut lab = Lab::new("panics").expect("create lab");
        prefix = lab.prefix().to_owned();
        let ns = lab.add_ns("x").expect("add ns");
        etc = netns_etc_dir(&ns);
        assert!(etc.join("resolv.conf").is_file(), "no resolv.conf for {ns}");
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
    assert!(!etc.exists(), "{} left behind", etc.display());
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

/// A lab whose test process died without dropping it (as when nextest kills a test binary at
/// its timeout) is cleaned up by the next lab: its processes die and its namespaces go.
#[test]
fn labs_of_dead_test_processes_are_reaped() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    // A "dead owner": a process that has exited (its pid no longer runs with this start time).
    let mut gone = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let gone_pid = gone.id();
    gone.wait().expect("wait for true");

    let prefix = format!("wt{}x", std::process::id() % 10_000);
    let ns = format!("{prefix}-orphan");
    let run = |args: &[&str]| {
        let status = std::process::Command::new("ip")
            .args(args)
            .status()
            .expect("run ip");
        assert!(status.success(), "ip {args:?}: {status}");
    };
    run(&["netns", "add", &ns]);
    let etc = netns_etc_dir(&ns);
    std::fs::create_dir_all(&etc).expect("create /etc/netns/NS");
    std::fs::write(etc.join("resolv.conf"), "nameserver 10.53.0.53\n").expect("resolv.conf");
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &ns, "sleep", "600"])
        .spawn()
        .expect("spawn sleeper");
    // The reaper finds processes by namespace: wait until the sleeper is really inside it
    // (`ip netns exec` enters it only after the spawn returns).
    let sleeper_pid = sleeper.id().to_string();
    wait_until(
        Duration::from_secs(10),
        "the sleeper entered its namespace",
        || {
            let out = std::process::Command::new("ip")
                .args(["netns", "pids", &ns])
                .output()?;
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == sleeper_pid))
        },
    )
    .expect("sleeper in namespace");
    let registry = Path::new(REGISTRY_DIR).join(format!("{prefix}.pids"));
    std::fs::create_dir_all(REGISTRY_DIR).expect("registry dir");
    std::fs::write(
        &registry,
        format!("owner {gone_pid} 1\nns {ns}\npid {} 1\n", sleeper.id()),
    )
    .expect("write registry file");

    // Creating any lab reaps it.
    let lab = Lab::new("reaper").expect("create lab");
    drop(lab);
    let status = sleeper.wait().expect("wait for sleeper");
    assert!(!status.success(), "sleeper exited by itself?");
    assert_eq!(
        lab_namespaces(&prefix).expect("list"),
        Vec::<String>::new(),
        "the dead lab's namespace is still there"
    );
    assert!(!registry.exists(), "registry file left behind");
    assert!(
        !etc.exists(),
        "the dead lab's {} is still there",
        etc.display()
    );
}

/// The building blocks of the routes, exit-node and MagicDNS tests, without warren: a LAN
/// behind a "router" namespace, an internet behind an "exit" namespace, the two DNS servers on
/// the mesh LAN; the labtool's dns-serve/dns-query/dig, http-serve/http-get and dns-load; and
/// everything (namespaces, processes, /etc/netns/NS) gone after the drop.
fn services_lab(lab: &mut Lab) -> Result<Vec<u32>> {
    let labtool = Path::new(LABTOOL);
    let lan = lab.add_lan("lan")?;
    let client = lab.add_ns("client")?;
    let router = lab.add_ns("router")?;
    lab.attach(&lan, &client, "eth0", "10.77.0.11/24")?;
    lab.attach(&lan, &router, "eth0", "10.77.0.12/24")?;
    let dns = DnsServers::build(
        lab,
        labtool,
        &lan,
        &[
            ("www.example.net", IpAddr::V4(Ipv4Addr::new(192, 0, 2, 44))),
            ("www.example.net", "2001:db8::44".parse()?),
            ("x.corp.example", IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99))),
        ],
        &[("x.corp.example", IpAddr::V4(Ipv4Addr::new(10, 54, 1, 7)))],
    )?;
    for ns in [&client, &router] {
        DnsServers::route_from(lab, ns)?;
    }
    let subnet = Subnet::build(lab, labtool)?;
    let internet = Internet::build(lab, labtool)?;
    subnet.attach_router(lab, &router, 1)?;
    internet.attach_exit(lab, &router, 1)?;

    // Every namespace has its own resolv.conf, as the lab wrote it.
    for ns in lab.namespaces() {
        ensure!(
            lab.resolv_conf(ns)? == default_resolv_conf(ns),
            "resolv.conf of {ns}"
        );
    }
    // What a process in the namespace sees as /etc/resolv.conf is that file.
    let seen = lab.run_ok(&client, "cat", ["/etc/resolv.conf"])?;
    ensure!(
        String::from_utf8_lossy(&seen.stdout) == default_resolv_conf(&client),
        "the client sees {:?} as /etc/resolv.conf",
        String::from_utf8_lossy(&seen.stdout)
    );

    // DNS: the upstream and the split server answer their own records, NXDOMAIN otherwise.
    let q = |server: Ipv4Addr, name: &str, qtype: &str| {
        services::dns_query(
            lab,
            labtool,
            &client,
            IpAddr::V4(server),
            name,
            qtype,
            Duration::from_secs(2),
        )
    };
    let a = q(DnsServers::UPSTREAM, "www.example.net", "A")?;
    ensure!(a.is_a(&[Ipv4Addr::new(192, 0, 2, 44)]), "{a:?}");
    let aaaa = q(DnsServers::UPSTREAM, "www.example.net", "AAAA")?;
    ensure!(
        aaaa.rcode == "NOERROR" && aaaa.data_of("AAAA") == ["2001:db8::44"],
        "{aaaa:?}"
    );
    let nx = q(DnsServers::UPSTREAM, "nothing.example.net", "A")?;
    ensure!(nx.rcode == "NXDOMAIN" && nx.answers.is_empty(), "{nx:?}");
    let split = q(DnsServers::SPLIT, "x.corp.example", "A")?;
    ensure!(split.is_a(&[Ipv4Addr::new(10, 54, 1, 7)]), "{split:?}");
    // dig agrees.
    let d = services::dig(
        lab,
        &client,
        IpAddr::V4(DnsServers::UPSTREAM),
        "www.example.net",
        "A",
    )?;
    ensure!(d.is_a(&[Ipv4Addr::new(192, 0, 2, 44)]), "dig: {d:?}");
    let d = services::dig(
        lab,
        &client,
        IpAddr::V4(DnsServers::SPLIT),
        "nothing.corp.example",
        "A",
    )?;
    ensure!(d.rcode == "NXDOMAIN", "dig: {d:?}");
    // A server nobody runs: the query times out.
    let none = q(Ipv4Addr::new(10, 53, 0, 99), "www.example.net", "A")?;
    ensure!(none.rcode == "timeout", "{none:?}");
    // The namespace's resolver (glibc, via its resolv.conf) uses the upstream.
    let resolved = lab.run_ok(&client, "getent", ["ahostsv4", "www.example.net"])?;
    ensure!(
        String::from_utf8_lossy(&resolved.stdout).contains("192.0.2.44"),
        "getent through resolv.conf: {}",
        String::from_utf8_lossy(&resolved.stdout)
    );

    // dns-load at 1,000 queries/s for a second against the upstream.
    let load = services::dns_load(
        lab,
        labtool,
        &client,
        IpAddr::V4(DnsServers::UPSTREAM),
        "www.example.net",
        1000,
        1,
    )?;
    eprintln!("dns-load against the lab upstream: {load}");
    ensure!(
        load["sent"] == 1000 && load["answered"].as_u64().is_some_and(|a| a >= 900),
        "dns-load: {load}"
    );

    // HTTP: the router reaches the LAN host and the web server; the client neither.
    let get =
        |ns: &str, url: &str| services::http_get(lab, labtool, ns, url, Duration::from_secs(2));
    let web = get(&router, &Internet::url())?;
    ensure!(web.is_ok_with(Internet::BODY), "router -> web: {web:?}");
    let lanweb = get(&router, &format!("http://{}:80/", Subnet::HOST))?;
    ensure!(
        lanweb.is_ok_with(Subnet::BODY),
        "router -> LAN host: {lanweb:?}"
    );
    let refused = get(&router, &format!("http://{}:81/", Subnet::HOST))?;
    ensure!(refused == HttpOutcome::Refused, "{refused:?}");
    for url in [Internet::url(), format!("http://{}:80/", Subnet::HOST)] {
        let got = get(&client, &url)?;
        ensure!(
            got == HttpOutcome::Unreachable,
            "the client must have no route to {url}: {got:?}"
        );
    }
    // The LAN host sees the router's address; it has no route to the mesh or 100.64.0.0/10.
    let src = subnet.seen_source(lab, labtool, &router, 40000, Duration::from_secs(2))?;
    ensure!(
        src.map(|s| s.ip()) == Some(IpAddr::V4(Ipv4Addr::new(10, 20, 0, 1))),
        "{src:?}"
    );
    for dst in ["100.64.0.1", "10.77.0.11", "198.51.100.80"] {
        let r = route_get(lab, &subnet.host_ns, dst.parse()?, None);
        ensure!(r.is_err(), "the LAN host has a route to {dst}: {r:?}");
    }
    let r = route_get(lab, &internet.web_ns, "10.77.0.11".parse()?, None);
    ensure!(
        r.is_err(),
        "the web server has a route to the mesh LAN: {r:?}"
    );

    // Nothing of warren's is installed anywhere (what the cleanup tests compare with).
    for ns in [&client, &router] {
        let st = WarrenOsState::read(lab, ns)?;
        ensure!(st.is_clean(), "{ns}: {st:?}");
    }
    let _ = dns;
    Ok(lab.procs().iter().map(|p| p.pid()).collect())
}

#[test]
fn services_lab_builds_answers_and_is_removed() {
    let _serial = serial();
    if !require_root() {
        return;
    }
    let mut lab = Lab::new("services").expect("create lab");
    let prefix = lab.prefix().to_owned();
    let result = services_lab(&mut lab);
    let etc: Vec<_> = lab
        .namespaces()
        .iter()
        .map(|ns| netns_etc_dir(ns))
        .collect();
    let pids = match result {
        Ok(p) => p,
        Err(e) => panic!("services lab: {e:?}"),
    };
    assert!(pids.len() >= 6, "servers: {pids:?}");
    drop(lab);
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} survived the lab");
    }
    assert_eq!(
        lab_namespaces(&prefix).expect("list"),
        Vec::<String>::new(),
        "namespaces left behind"
    );
    for dir in etc {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
