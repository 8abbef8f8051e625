//! `OsNet` against the real kernel: routes, rules, nftables and sysctls, in a network namespace
//! of its own so the host's are never touched.
//!
//! Each test re-executes this binary under `unshare --net` (an anonymous namespace that
//! vanishes with the process, so nothing is left even when a test fails) with
//! `WARREN_OSNET_INSIDE` naming the test; the copy inside first checks that its namespace is
//! not the one it was started from. Without root, `unshare`, `ip` or `nft` the tests say why
//! and pass, unless `WARREN_NETNS_REQUIRED=1` (CI), where that is a failure.

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde_json::{Value, json};
use warren_node::os_net::{
    self, BYPASS_MARK, Installed, OsNet, RouterConfig, SUBNET_ROUTE_MARK, SYSCTL_RECORD,
};

/// Names the test a re-executed copy runs inside the namespace.
const INSIDE: &str = "WARREN_OSNET_INSIDE";
/// The namespace (`net:[inode]`) the outer test ran in; the inner copy refuses to run there.
const PARENT_NS: &str = "WARREN_OSNET_PARENT_NS";
/// Set for the child that installs everything and then is killed.
const CRASH_CHILD: &str = "WARREN_OSNET_CRASH_CHILD";

const IPV4_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

fn net(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

/// Why the namespace tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not root".into());
    }
    for (tool, arg) in [("unshare", "--version"), ("ip", "-V"), ("nft", "--version")] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("{tool} is missing"));
        }
    }
    let ok = Command::new("unshare")
        .args(["--net", "--", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Some("unshare --net fails (no CAP_SYS_ADMIN?)".into());
    }
    None
}

fn this_ns() -> String {
    std::fs::read_link("/proc/self/ns/net")
        .expect("read /proc/self/ns/net")
        .to_string_lossy()
        .into_owned()
}

/// Runs `body` in a fresh network namespace: here when this is the re-executed copy for
/// `name`, else by re-executing this test binary under `unshare --net`.
fn in_namespace(name: &str, body: fn()) {
    if std::env::var(INSIDE).as_deref() == Ok(name) {
        let parent = std::env::var(PARENT_NS).expect("parent namespace");
        assert_ne!(
            this_ns(),
            parent,
            "refusing to run: still in the namespace the test started in"
        );
        return body();
    }
    if let Some(why) = missing() {
        if std::env::var_os("WARREN_NETNS_REQUIRED").is_some_and(|v| v != "0") {
            panic!("WARREN_NETNS_REQUIRED is set but the namespace test cannot run: {why}");
        }
        eprintln!("skipping {name}: {why}");
        return;
    }
    let exe = std::env::current_exe().expect("test binary");
    let status = Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, name)
        .env(PARENT_NS, this_ns())
        .status()
        .expect("run unshare");
    assert!(status.success(), "{name} inside the namespace: {status}");
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json_of(args: &[&str]) -> Value {
    let text = sh(args);
    if text.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&text).expect("JSON")
}

/// The namespace as the tests need it: lo, a TUN device `wt0` standing in for the node's,
/// and a LAN `lan0` (192.168.77.1/24, fd00:77::1/64) with the default route; forwarding off.
fn lab() {
    sh(&["ip", "link", "set", "lo", "up"]);
    sh(&["ip", "tuntap", "add", "wt0", "mode", "tun"]);
    sh(&["ip", "link", "set", "wt0", "up"]);
    sh(&[
        "ip", "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
    ]);
    sh(&["ip", "link", "set", "lan0", "up"]);
    sh(&["ip", "link", "set", "lan1", "up"]);
    sh(&["ip", "addr", "add", "192.168.77.1/24", "dev", "lan0"]);
    sh(&[
        "ip",
        "-6",
        "addr",
        "add",
        "fd00:77::1/64",
        "dev",
        "lan0",
        "nodad",
    ]);
    sh(&["ip", "route", "add", "default", "via", "192.168.77.254"]);
    std::fs::write(IPV4_FORWARD, "0").expect("ip_forward");
    std::fs::write(IPV6_FORWARD, "0").expect("ipv6 forwarding");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Table 52 as `<type> <dst> <dev>` lines, both families.
fn table52() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for family in ["-4", "-6"] {
        let shown = Command::new("ip")
            .args([family, "-j", "route", "show", "table", "52"])
            .output()
            .expect("ip route");
        let stderr = String::from_utf8_lossy(&shown.stderr);
        if stderr.contains("FIB table does not exist") {
            // Never used yet in this namespace: empty.
            continue;
        }
        assert!(shown.status.success(), "ip route show table 52: {stderr}");
        let text = String::from_utf8_lossy(&shown.stdout);
        let routes: Value = if text.trim().is_empty() {
            Value::Array(Vec::new())
        } else {
            serde_json::from_str(&text).expect("JSON")
        };
        for r in routes.as_array().expect("array") {
            out.insert(format!(
                "{} {}{} {}",
                r["type"].as_str().unwrap_or("unicast"),
                r["dst"].as_str().expect("dst"),
                if family == "-6" && r["dst"] == "default" {
                    "6"
                } else {
                    ""
                },
                // IPv6 shows throw routes on lo.
                if r["type"] == "throw" {
                    "-"
                } else {
                    r["dev"].as_str().unwrap_or("-")
                }
            ));
        }
    }
    out
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Rules with preferences 5200-5299 as `<family> <pref> <selector> <action>` lines.
fn our_rules() -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let rules = json_of(&["ip", family, "-j", "rule"]);
        for r in rules.as_array().expect("array") {
            let pref = r["priority"].as_u64().expect("priority");
            if !(5200..5300).contains(&pref) {
                continue;
            }
            let selector = match (r["fwmark"].as_str(), r["fwmask"].as_str()) {
                (Some(m), Some(k)) => format!("fwmark {m}/{k}"),
                (Some(m), None) => format!("fwmark {m}"),
                _ => "all".into(),
            };
            let action = match r["table"].as_str() {
                Some(t) => format!("lookup {t}"),
                None => r["action"].as_str().unwrap_or("?").to_string(),
            };
            out.push(format!("{family} {pref} {selector} {action}"));
        }
    }
    out
}

fn expected_rules() -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        out.push(format!("{family} 5210 fwmark 0x80000/0xff0000 lookup main"));
        out.push(format!(
            "{family} 5230 fwmark 0x80000/0xff0000 lookup default"
        ));
        out.push(format!("{family} 5250 fwmark 0x80000/0xff0000 unreachable"));
        out.push(format!("{family} 5270 all lookup 52"));
    }
    out
}

/// The device `ip route get` picks for `dst`, with an optional fwmark.
fn route_dev(dst: &str, mark: Option<u32>) -> String {
    let mark = mark.map(|m| format!("{m:#x}"));
    let mut args = vec!["ip", "-j", "route", "get", dst];
    if let Some(m) = &mark {
        args.extend(["mark", m.as_str()]);
    }
    let got = json_of(&args);
    got[0]["dev"].as_str().unwrap_or("none").to_string()
}

fn sysctl(path: &str) -> String {
    std::fs::read_to_string(path)
        .expect("sysctl")
        .trim()
        .to_string()
}

fn nft_table_exists() -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", "warren"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("nft")
        .success()
}

/// Checks table `inet warren` as `nft -j` shows it: chains with their hooks, and the rules'
/// expressions (the mark rule by what it computes, since nft may fold its constants).
fn assert_nft_table(snat: bool) {
    let listing = json_of(&["nft", "-j", "list", "table", "inet", "warren"]);
    let items = listing["nftables"].as_array().expect("nftables");
    let chains: Vec<(String, String, String, i64)> = items
        .iter()
        .filter_map(|i| i.get("chain"))
        .map(|c| {
            (
                c["name"].as_str().expect("name").to_string(),
                c["type"].as_str().expect("type").to_string(),
                c["hook"].as_str().expect("hook").to_string(),
                c["prio"].as_i64().expect("prio"),
            )
        })
        .collect();
    let mut want = vec![("forward".into(), "filter".into(), "forward".into(), 0)];
    if snat {
        want.push((
            "postrouting".into(),
            "nat".into(),
            "postrouting".into(),
            100,
        ));
    }
    assert_eq!(chains, want);
    let rules: Vec<(&str, &Value)> = items
        .iter()
        .filter_map(|i| i.get("rule"))
        .map(|r| (r["chain"].as_str().expect("chain"), &r["expr"]))
        .collect();
    assert_eq!(rules.len(), if snat { 4 } else { 3 }, "{listing}");
    let iif = json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "wt0"}});
    let oif = json!({"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "wt0"}});
    // Rule 1: from the tunnel, set our mark bits to SUBNET_ROUTE_MARK, keep the rest; accept.
    let (chain, expr) = rules[0];
    assert_eq!(chain, "forward");
    assert_eq!(expr[0], iif);
    let value = &expr[1]["mangle"]["value"]["|"];
    let and = value[0]["&"][1].as_u64().expect("and mask") as u32;
    let or = value[1].as_u64().expect("or value") as u32;
    for mark in [0u32, 0xffff_ffff, 0x0012_3456, 0x00ff_0000, 0x8000_0001] {
        assert_eq!(
            (mark & and) | or,
            (mark & 0xff00_ffff) | SUBNET_ROUTE_MARK,
            "mark {mark:#x}: {expr}"
        );
    }
    assert_eq!(expr[2], json!({"accept": null}));
    assert_eq!(
        rules[1],
        (
            "forward",
            &json!([oif, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"prefix": {"addr": "100.64.0.0", "len": 10}}}}, {"drop": null}])
        )
    );
    assert_eq!(rules[2], ("forward", &json!([oif, {"accept": null}])));
    if snat {
        assert_eq!(
            rules[3],
            (
                "postrouting",
                &json!([{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 0x00ff_0000]}, "right": 0x0004_0000}}, {"masquerade": null}])
            )
        );
    }
}

fn assert_nothing_installed(state: &Path) {
    assert_eq!(table52(), BTreeSet::new(), "table 52 empty");
    assert_eq!(our_rules(), Vec::<String>::new(), "no rules at 5200-5299");
    assert!(!nft_table_exists(), "nft table inet warren removed");
    assert_eq!(sysctl(IPV4_FORWARD), "0");
    assert_eq!(sysctl(IPV6_FORWARD), "0");
    assert!(!state.join(SYSCTL_RECORD).exists(), "sysctl record removed");
}

#[test]
fn routes_rules_and_router_mode_are_installed_and_removed() {
    in_namespace(
        "routes_rules_and_router_mode_are_installed_and_removed",
        || {
            lab();
            let state = tempfile::tempdir().expect("state dir");
            runtime().block_on(routes_rules_and_router(state.path()));
        },
    );
}

async fn routes_rules_and_router(state: &Path) {
    // Errors name the operation and the object.
    let err = OsNet::new("bad name", state).await.expect_err("bad name");
    assert_eq!(err.to_string(), "bad interface name \"bad name\"");
    let mut missing = OsNet::new("wt9", state).await.expect("new wt9");
    let err = missing
        .set_routes(&[net("10.0.0.0/8")])
        .await
        .expect_err("no wt9");
    assert_eq!(err.to_string(), "interface wt9 does not exist");
    drop(missing);
    assert_nothing_installed(state);

    let mut os = OsNet::new("wt0", state).await.expect("new");
    assert_eq!(os.installed(), Installed::default());

    // An exit node plus a subnet route: both families into the tunnel, rules in place.
    let exit = [
        net("10.20.0.0/24"),
        net("fd7a:115c:a1e0:ab12::/64"),
        net("0.0.0.0/0"),
        net("::/0"),
    ];
    os.set_routes(&exit).await.expect("set routes");
    assert_eq!(
        table52(),
        set(&[
            "unicast 10.20.0.0/24 wt0",
            "unicast default wt0",
            "unicast default6 wt0",
            "unicast fd7a:115c:a1e0:ab12::/64 wt0",
        ])
    );
    assert_eq!(our_rules(), expected_rules());
    // Everything goes into the tunnel, the node's own (marked) traffic by the host's routes.
    assert_eq!(route_dev("1.1.1.1", None), "wt0");
    assert_eq!(route_dev("1.1.1.1", Some(BYPASS_MARK)), "lan0");
    assert_eq!(
        route_dev("192.168.77.5", None),
        "wt0",
        "LAN into the tunnel"
    );
    // Repeating is a no-op.
    os.set_routes(&exit).await.expect("again");
    assert_eq!(table52().len(), 4);

    // Allow LAN access: throw routes for the host's LAN.
    let lan = os_net::lan_prefixes("wt0");
    assert_eq!(lan, [net("192.168.77.0/24"), net("fd00:77::/64")]);
    os.set_lan_bypass(&lan).await.expect("lan bypass");
    assert_eq!(
        route_dev("192.168.77.5", None),
        "lan0",
        "LAN stays off the tunnel"
    );
    assert_eq!(route_dev("1.1.1.1", None), "wt0");
    assert!(table52().contains("throw 192.168.77.0/24 -"));
    assert!(table52().contains("throw fd00:77::/64 -"));

    // Exit node deselected, routes changed: the diff removes the rest.
    os.set_lan_bypass(&[]).await.expect("no bypass");
    os.set_routes(&[net("10.21.0.7/24")]).await.expect("change");
    assert_eq!(table52(), set(&["unicast 10.21.0.0/24 wt0"]));
    assert_eq!(
        os.installed(),
        Installed {
            routes: vec![net("10.21.0.0/24")],
            lan_bypass: vec![],
            rules: true,
            router: None,
        }
    );

    // A down tunnel refuses IPv4 routes (the kernel also dropped the ones it had); once it is
    // up again the next call puts them back.
    sh(&["ip", "link", "set", "wt0", "down"]);
    let err = os
        .set_routes(&[net("10.20.0.0/24")])
        .await
        .expect_err("down");
    assert_eq!(
        err.to_string(),
        "adding route 10.20.0.0/24 to table 52: Network is down"
    );
    sh(&["ip", "link", "set", "wt0", "up"]);
    os.set_routes(&[net("10.20.0.0/24")]).await.expect("up");
    assert_eq!(table52(), set(&["unicast 10.20.0.0/24 wt0"]));

    // Router mode: forwarding on (old values recorded), the nft table in place.
    os.set_router(Some(RouterConfig { snat: true }))
        .await
        .expect("router");
    assert_eq!(sysctl(IPV4_FORWARD), "1");
    assert_eq!(sysctl(IPV6_FORWARD), "1");
    let record = std::fs::read_to_string(state.join(SYSCTL_RECORD)).expect("record");
    assert!(record.contains("net.ipv4.ip_forward=0\n"), "{record}");
    assert!(
        record.contains("net.ipv6.conf.all.forwarding=0\n"),
        "{record}"
    );
    assert_nft_table(true);
    os.set_router(Some(RouterConfig { snat: false }))
        .await
        .expect("no snat");
    assert_nft_table(false);
    let again = std::fs::read_to_string(state.join(SYSCTL_RECORD)).expect("record");
    assert_eq!(again, record, "the first record is kept");
    os.set_router(None).await.expect("router off");
    assert!(!nft_table_exists());
    assert_eq!(sysctl(IPV4_FORWARD), "0");
    assert_eq!(sysctl(IPV6_FORWARD), "0");
    assert!(!state.join(SYSCTL_RECORD).exists());

    // Cleanup removes everything, and can be repeated.
    os.set_router(Some(RouterConfig::default()))
        .await
        .expect("router");
    os.set_lan_bypass(&lan).await.expect("lan bypass");
    os.cleanup().await.expect("cleanup");
    assert_nothing_installed(state);
    assert_eq!(os.installed(), Installed::default());
    os.cleanup().await.expect("cleanup again");

    // The node's own sockets carry the bypass mark.
    let udp = UdpSocket::bind("127.0.0.1:0").expect("udp");
    os_net::mark_socket(udp.as_fd()).expect("mark");
    assert_eq!(
        socket2::SockRef::from(&udp).mark().expect("read mark"),
        BYPASS_MARK
    );
    assert_eq!(os_net::own_socket_mark(), Some(BYPASS_MARK));
}

#[test]
fn leftovers_of_a_crashed_run_are_removed() {
    in_namespace("leftovers_of_a_crashed_run_are_removed", || {
        if std::env::var_os(CRASH_CHILD).is_some() {
            return crash_child();
        }
        lab();
        let state = tempfile::tempdir().expect("state dir");
        // A real crash: a child in this namespace installs everything, then is killed.
        let exe = std::env::current_exe().expect("test binary");
        let status = Command::new(exe)
            .args([
                "leftovers_of_a_crashed_run_are_removed",
                "--exact",
                "--nocapture",
            ])
            .env(CRASH_CHILD, state.path())
            .status()
            .expect("crash child");
        assert!(!status.success(), "the child was killed");
        assert_eq!(table52().len(), 3, "{:?}", table52());
        assert_eq!(our_rules(), expected_rules());
        assert!(nft_table_exists());
        assert_eq!(sysctl(IPV4_FORWARD), "1");
        assert!(state.path().join(SYSCTL_RECORD).exists());

        runtime().block_on(async {
            let os = OsNet::new("wt0", state.path()).await.expect("new");
            assert_eq!(os.installed(), Installed::default());
        });
        assert_nothing_installed(state.path());
    });
}

/// Installs routes, LAN bypass and router mode, then is killed (SIGKILL) without cleaning up.
fn crash_child() {
    let state = std::env::var_os(CRASH_CHILD).expect("state dir");
    runtime().block_on(async {
        let mut os = OsNet::new("wt0", Path::new(&state)).await.expect("new");
        os.set_routes(&[net("10.20.0.0/24"), net("0.0.0.0/0")])
            .await
            .expect("routes");
        os.set_lan_bypass(&[net("192.168.77.0/24")])
            .await
            .expect("bypass");
        os.set_router(Some(RouterConfig::default()))
            .await
            .expect("router");
        // As the OOM killer would: no destructor, no core file.
        let me = rustix::process::getpid();
        let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
        unreachable!("SIGKILL returned");
    });
}
