//! Live config reload with the real `warren-control` binary: SIGHUP and an edit of the config
//! file apply DNS settings and the log level to the running server, and every node hears of
//! them on the map stream it has open; keys that need a restart are named in the log; a
//! config that does not load is refused and changes nothing.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{register_req, server_key, stream_req, wait_until};
use tonic::Streaming;
use warren_proto::NodeSecretKey;
use warren_proto::control::admin_client::AdminClient;
use warren_proto::control::control_client::ControlClient;
use warren_proto::control::map_response::Kind;
use warren_proto::control::*;

const BIN: &str = env!("CARGO_BIN_EXE_warren-control");

/// Every line of the config but the ones a test changes.
fn config_text(dir: &Path, listen: &str, level: &str, dns: &str) -> String {
    format!(
        "server_url = \"http://127.0.0.1:1\"\nlisten_addr = \"{listen}\"\n\
         unix_socket = {:?}\n[noise]\nprivate_key_path = {:?}\n\
         [database.sqlite]\npath = {:?}\n[derp]\npaths = [{:?}]\n[derp.server]\nenabled = false\n\
         [policy]\npath = {:?}\n[log]\nlevel = \"{level}\"\n[dns]\n{dns}\n",
        dir.join("control.sock"),
        dir.join("control.key"),
        dir.join("db.sqlite"),
        dir.join("derp.json"),
        dir.join("policy.hujson"),
    )
}

/// A DERP map file with one region, `id`.
fn derp_json(id: u32) -> String {
    format!(
        r#"{{"Regions": {{"{id}": {{"RegionID": {id}, "RegionCode": "r{id}", "Nodes": [
            {{"Name": "{id}a", "RegionID": {id}, "HostName": "192.0.2.9", "DERPPort": 3340}}]}}}}}}"#
    )
}

fn region_ids(map: &DerpMap) -> Vec<u32> {
    map.regions.iter().map(|r| r.region_id).collect()
}

/// `warren-control serve` as a child process (without `RUST_LOG`, so `log.level` rules), its
/// log collected line by line.
struct Spawned {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Spawned {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .arg("serve")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warren-control");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                lines.lock().expect("log").push(line);
            }
        });
        Self { child, log }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// Waits (up to 20 s) for a log line after the first `skip` holding every one of `parts`.
    async fn wait_for_log(&self, skip: usize, parts: &[&str]) -> String {
        let find = || {
            self.log()
                .into_iter()
                .skip(skip)
                .find(|l| parts.iter().all(|p| l.contains(p)))
        };
        wait_until(&format!("a log line with {parts:?}"), || find().is_some()).await;
        find().unwrap_or_default()
    }

    fn hangup(&self) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
            .expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("kill");
    }

    async fn stop(self) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
            .expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
        let status = tokio::task::spawn_blocking(move || {
            let mut this = self;
            this.child.wait()
        })
        .await
        .expect("join")
        .expect("wait");
        assert!(status.success(), "{status}");
    }
}

/// A test that fails before `stop` leaves no server running.
impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Registers a node and opens its map stream; returns the stream and its full map.
async fn node(
    control: &mut ControlClient<tonic::transport::Channel>,
    auth: &str,
    host: &str,
) -> (Streaming<MapResponse>, FullMap) {
    let sk = server_key(control).await;
    let key = NodeSecretKey::generate();
    control
        .register_node(register_req(&key, &sk, auth, host))
        .await
        .expect("register");
    let mut stream = control
        .stream_map_response(stream_req(&key, &sk))
        .await
        .expect("stream")
        .into_inner();
    let first = next(&mut stream).await;
    let Kind::Full(full) = first else {
        panic!("first message is a full map: {first:?}")
    };
    (stream, full)
}

/// The next message that is not a keepalive nor about peers, within 20 s.
async fn next(stream: &mut Streaming<MapResponse>) -> Kind {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .expect("a map message within 20 s")
            .expect("the stream is open")
            .expect("the stream did not end");
        match m.kind.expect("a kind") {
            Kind::Keepalive(_) | Kind::PeerAdded(_) | Kind::PeerOnline(_) => continue,
            Kind::PeerEndpoints(_) | Kind::PeerChanged(_) => continue,
            other => return other,
        }
    }
}

fn record(name: &str, kind: &str, value: &str) -> DnsRecord {
    DnsRecord {
        name: name.into(),
        r#type: kind.into(),
        value: value.into(),
    }
}

#[tokio::test]
async fn sighup_and_file_edits_reach_open_streams_and_restart_keys_are_named() {
    // The server reads dir/control.toml, a symlink to real/control.toml: editing the target
    // makes no event in dir, so only SIGHUP applies it; replacing the link by rename is a
    // file change the watch sees.
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("etc");
    let real = tmp.path().join("real");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::create_dir_all(&real).expect("mkdir");
    std::fs::write(
        dir.join("policy.hujson"),
        r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}"#,
    )
    .expect("policy");
    std::fs::write(dir.join("derp.json"), derp_json(900)).expect("derp map");
    let target: PathBuf = real.join("control.toml");
    let write_target = |text: String| std::fs::write(&target, text).expect("write config");
    write_target(config_text(
        &dir,
        "127.0.0.1:0",
        "info",
        "[dns.nameservers]\nglobal = [\"1.1.1.1\"]",
    ));
    let config = dir.join("control.toml");
    std::os::unix::fs::symlink(&target, &config).expect("symlink");

    let child = Spawned::start(&config);
    let serving = child
        .wait_for_log(0, &["warren-control serving", "listen="])
        .await;
    let addr = serving
        .split_whitespace()
        .find_map(|w| w.strip_prefix("listen="))
        .expect("listen=")
        .to_owned();
    let socket = dir.join("control.sock");
    wait_until("the admin socket accepts", || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    })
    .await;
    let mut admin = AdminClient::new(
        warren_control::cli::connect_unix(&socket)
            .await
            .expect("connect"),
    );
    let auth = common::new_auth_key(&mut admin).await;
    let mut control = ControlClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let (mut stream, full) = node(&mut control, &auth, "laptop").await;
    let dns = full.dns.expect("dns");
    assert_eq!(dns.nameservers, ["1.1.1.1"]);
    assert_eq!(dns.extra_records, []);
    let derp_map = full.derp_map.expect("derp map");
    assert_eq!(region_ids(&derp_map), [900]);

    // 1. SIGHUP: new nameservers and extra records, log level debug, a new listen address, and
    // a new region in the DERP map file (not watched: SIGHUP reads it).
    child.hangup();
    child
        .wait_for_log(
            0,
            &["config reloaded", "applied=nothing", "reason=\"SIGHUP\""],
        )
        .await;
    let before = child.log();
    assert!(
        !before.iter().any(|l| l.contains("DEBUG")),
        "log.level info: no debug lines: {before:?}"
    );
    write_target(config_text(
        &dir,
        "127.0.0.1:1",
        "debug",
        "extra_records = [{ name = \"grafana.warren.internal\", type = \"A\", value = \"100.64.0.9\" }]\n\
         [dns.nameservers]\nglobal = [\"9.9.9.9\", \"[2620:fe::fe]:53\"]",
    ));
    std::fs::write(dir.join("derp.json"), derp_json(901)).expect("derp map");
    let seen = child.log().len();
    child.hangup();
    let Kind::SettingsChanged(settings) = next(&mut stream).await else {
        panic!("settings changed")
    };
    let want = DnsConfig {
        magic_dns: true,
        base_domain: "warren.internal".into(),
        nameservers: vec!["9.9.9.9".into(), "[2620:fe::fe]:53".into()],
        split: vec![],
        search_domains: vec![],
        extra_records: vec![record("grafana.warren.internal", "A", "100.64.0.9")],
    };
    assert_eq!(settings.dns.as_ref(), Some(&want));
    let derp_map = settings.derp_map.expect("derp map");
    assert_eq!(region_ids(&derp_map), [901]);
    assert_eq!(derp_map.regions[0].nodes[0].host_name, "192.0.2.9");
    let warn = child
        .wait_for_log(seen, &["needs a restart", "reason=\"SIGHUP\""])
        .await;
    assert!(warn.contains(" WARN "), "{warn}");
    assert!(warn.contains("needs a restart: listen_addr "), "{warn}");
    assert!(warn.contains("keys=listen_addr"), "{warn}");
    let applied = child
        .wait_for_log(seen, &["config reloaded", "reason=\"SIGHUP\""])
        .await;
    assert!(
        applied.contains("applied=dns, derp map, log.level "),
        "{applied}"
    );
    assert!(applied.contains("updates=1"), "{applied}");
    // The debug level is in force: the policy reload that follows says it found no change.
    let debug = child
        .wait_for_log(seen, &["policy unchanged", "reason=\"SIGHUP\""])
        .await;
    assert!(debug.contains("DEBUG"), "{debug}");

    // 2. A config that does not load is refused with its error, and nothing changes.
    write_target(config_text(
        &dir,
        "127.0.0.1:1",
        "debug",
        "[dns.nameservers]\nglobal = [\"https://dns.example/dns-query\"]",
    ));
    let seen = child.log().len();
    child.hangup();
    let refused = child
        .wait_for_log(seen, &["config reload refused", "reason=\"SIGHUP\""])
        .await;
    assert!(refused.contains("ERROR"), "{refused}");
    assert!(
        refused.contains(
            r#"dns.nameservers.global: "https://dns.example/dns-query" is not an IP address or ip:port"#
        ),
        "{refused}"
    );
    // A node that connects now gets the settings still in force.
    let (_other, other_full) = node(&mut control, &auth, "phone").await;
    assert_eq!(other_full.dns.as_ref(), Some(&want));
    assert_eq!(
        other_full.derp_map.as_ref().map(region_ids),
        Some(vec![901])
    );

    // 3. The file replaced (no SIGHUP): the watch applies it on the same open stream.
    let fresh = dir.join(".control.toml.new");
    std::fs::write(
        &fresh,
        config_text(
            &dir,
            "127.0.0.1:1",
            "debug",
            "[dns.nameservers]\nglobal = [\"8.8.8.8\"]",
        ),
    )
    .expect("write");
    let seen = child.log().len();
    std::fs::rename(&fresh, &config).expect("rename");
    let Kind::SettingsChanged(settings) = next(&mut stream).await else {
        panic!("settings changed")
    };
    let want = DnsConfig {
        nameservers: vec!["8.8.8.8".into()],
        extra_records: vec![],
        ..want
    };
    assert_eq!(settings.dns.as_ref(), Some(&want));
    assert_eq!(settings.derp_map.as_ref().map(region_ids), Some(vec![901]));
    let applied = child
        .wait_for_log(seen, &["config reloaded", "reason=\"config file changed\""])
        .await;
    assert!(applied.contains("applied=dns "), "{applied}");
    assert!(
        !child.log()[seen..].iter().any(|l| l.contains("refused")),
        "{:?}",
        child.log()
    );
    drop((stream, admin, control));
    child.stop().await;
}
