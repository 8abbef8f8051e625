//! The policy with the real `warren-control` binary: SIGHUP reloads the policy of a server run
//! as a child process (the signal goes to that process only), a policy whose tests fail at
//! start-up is a loud error but the server runs, and the `policy` and `nodes tag` commands print
//! and exit as documented.

mod common;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Server, register_req, server_key, wait_until};
use tonic::transport::Channel;
use warren_control::config::PolicyMode;
use warren_control::store::{SqliteStore, Store};
use warren_proto::NodeSecretKey;
use warren_proto::control::admin_client::AdminClient;
use warren_proto::control::*;

const BIN: &str = env!("CARGO_BIN_EXE_warren-control");

const POLICY: &str = r#"{
  // Who owns which tag.
  "tagOwners": {
    "tag:server": ["alice@"],
  },
  "acls": [
    {"action": "accept", "src": ["bob@"], "dst": ["tag:server:80"]},
    {"action": "accept", "src": ["alice@"], "dst": ["tag:server:22"]},
  ],
}
"#;

const POLICY_2: &str = r#"{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}"#;

const BROKEN: &str = "{\n  \"acls\": [],\n  oops\n}\n";

const FAILING_TESTS: &str = r#"{
  "acls": [{"action": "accept", "src": ["100.64.0.9"], "dst": ["100.64.0.10:*"]}],
  "tests": [{"src": "100.64.0.1", "accept": ["100.64.0.2:22"]}],
}
"#;

/// `warren-control serve` as a child process, its log collected line by line.
struct Spawned {
    child: Child,
    socket: PathBuf,
    db: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Spawned {
    /// Starts the server with `[policy]` set to `policy` (TOML lines) and waits for its socket.
    async fn start(policy: &str, dir: tempfile::TempDir) -> Self {
        let d = dir.path();
        let socket = d.join("control.sock");
        let db = d.join("db.sqlite");
        let config = d.join("control.toml");
        std::fs::write(
            &config,
            format!(
                "server_url = \"http://127.0.0.1:1\"\nlisten_addr = \"127.0.0.1:0\"\n\
                 unix_socket = {socket:?}\n[noise]\nprivate_key_path = {:?}\n\
                 [database.sqlite]\npath = {db:?}\n[derp.server]\nenabled = false\n\
                 [policy]\n{policy}\n",
                d.join("control.key"),
            ),
        )
        .expect("config");
        let mut child = Command::new(BIN)
            .args(["--config"])
            .arg(&config)
            .arg("serve")
            .env("RUST_LOG", "info")
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
        let mut this = Self {
            child,
            socket,
            db,
            log,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        // The file appears at bind(), a moment before listen(): wait until a connection is
        // accepted, not until the file exists.
        while std::os::unix::net::UnixStream::connect(&this.socket).is_err() {
            if let Ok(Some(status)) = this.child.try_wait() {
                panic!("warren-control exited ({status}): {:?}", this.log());
            }
            assert!(tokio::time::Instant::now() < deadline, "no socket");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        this
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }

    /// Waits (up to 20 s) for a log line holding every one of `parts`.
    async fn wait_for_log(&self, parts: &[&str]) -> String {
        let find = || {
            self.log()
                .into_iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
        };
        wait_until(&format!("a log line with {parts:?}"), || find().is_some()).await;
        find().unwrap_or_default()
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
            .expect("a pid");
        rustix::process::kill_process(pid, signal).expect("kill");
    }

    async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(
            warren_control::cli::connect_unix(&self.socket)
                .await
                .expect("connect"),
        )
    }

    async fn stop(self) {
        self.signal(rustix::process::Signal::TERM);
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

async fn policy_text(admin: &mut AdminClient<Channel>) -> (bool, String) {
    let r = admin
        .get_policy(GetPolicyRequest {})
        .await
        .expect("get")
        .into_inner();
    (r.configured, r.policy)
}

#[tokio::test]
async fn sighup_reloads_the_stored_policy_and_refuses_a_broken_one() {
    let child = Spawned::start("mode = \"database\"", tempfile::tempdir().expect("tempdir")).await;
    let mut admin = child.admin().await;
    admin
        .set_policy(SetPolicyRequest {
            policy: POLICY.into(),
        })
        .await
        .expect("set");

    // Another program changes the stored policy (as an offline tool would); SIGHUP loads it.
    let store = SqliteStore::open(&child.db, true).expect("open the database");
    store.set_policy(Some(POLICY_2), 0, 1).expect("store");
    child.signal(rustix::process::Signal::HUP);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while policy_text(&mut admin).await.1 != POLICY_2 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", child.log());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child
        .wait_for_log(&["policy reloaded and applied", "SIGHUP"])
        .await;

    // A broken stored policy: refused with its line:col, the one in force stays.
    store.set_policy(Some(BROKEN), 0, 2).expect("store");
    child.signal(rustix::process::Signal::HUP);
    let line = child
        .wait_for_log(&["policy reload refused", "3:3: syntax error"])
        .await;
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains("the policy stored in the database"), "{line}");
    assert_eq!(policy_text(&mut admin).await, (true, POLICY_2.into()));
    drop(admin);
    child.stop().await;
}

#[tokio::test]
async fn failing_tests_at_start_up_are_a_loud_error_but_the_server_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.hujson");
    std::fs::write(&file, FAILING_TESTS).expect("write");
    let child = Spawned::start(&format!("path = {file:?}"), dir).await;
    let line = child.wait_for_log(&["FAILS its own tests"]).await;
    assert!(line.contains("ERROR"), "{line}");
    let test = child.wait_for_log(&["policy test fails"]).await;
    assert!(test.contains("tests[0]"), "{test}");
    assert!(test.contains("100.64.0.1"), "{test}");
    // It serves, with that policy in force.
    let mut admin = child.admin().await;
    assert_eq!(policy_text(&mut admin).await, (true, FAILING_TESTS.into()));
    drop(admin);
    child.stop().await;
}

/// Runs the CLI against `socket` (off the runtime's thread: the server runs on it).
async fn cli(socket: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("--socket").arg(socket).args(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run the CLI"))
        .await
        .expect("join")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test]
async fn the_cli_gets_sets_checks_explains_and_tags() {
    let server = Server::start_with(|c| c.policy.mode = PolicyMode::Database).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.hujson");
    let broken = dir.path().join("broken.hujson");
    std::fs::write(&good, POLICY).expect("write");
    std::fs::write(&broken, BROKEN).expect("write");
    let (g, b) = (good.to_str().expect("path"), broken.to_str().expect("path"));
    let s = &server.socket;

    let o = cli(s, &["policy", "get"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "no policy: every node may reach every other\n");

    for cmd in ["set", "check"] {
        let o = cli(s, &["policy", cmd, b]).await;
        assert!(!o.status.success(), "{cmd} of a broken policy must fail");
        assert!(
            stderr(&o).contains("error: 3:3: syntax error"),
            "{cmd}: {}",
            stderr(&o)
        );
    }
    let o = cli(s, &["policy", "check", g]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "policy ok\n");
    let o = cli(s, &["policy", "set", g]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("policy set ("), "{}", stdout(&o));
    let o = cli(s, &["policy", "get"]).await;
    assert_eq!(stdout(&o), POLICY);

    // Two nodes: alice's laptop and a server tagged by its key.
    let mut admin = server.local_admin().await;
    let mut control = server.control().await;
    let sk = server_key(&mut control).await;
    let _ = admin
        .create_user(CreateUserRequest {
            name: "alice".into(),
        })
        .await;
    let mut ids = Vec::new();
    for (host, tags) in [("laptop", vec![]), ("web", vec!["tag:server".to_string()])] {
        let auth = admin
            .create_pre_auth_key(CreatePreAuthKeyRequest {
                user: "alice".into(),
                tags,
                ..Default::default()
            })
            .await
            .expect("key")
            .into_inner()
            .secret;
        let node = control
            .register_node(register_req(&NodeSecretKey::generate(), &sk, &auth, host))
            .await
            .expect("register")
            .into_inner()
            .node
            .expect("node");
        ids.push(node.id);
    }

    let o = cli(s, &["policy", "explain", "laptop", "web:22"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.starts_with("proto tcp, port 22\n"), "{text}");
    assert!(
        text.contains(": allowed by acls[1] (line 8, column 5); web is in laptop's netmap"),
        "{text}"
    );
    // acls without proto allow TCP, UDP and ICMP only: GRE is denied (and has no ports).
    let o = cli(
        s,
        &[
            "policy",
            "explain",
            "laptop",
            "tag:server",
            "--proto",
            "gre",
        ],
    )
    .await;
    let text = stdout(&o);
    assert!(text.starts_with("proto gre, no ports\n"), "{text}");
    assert!(
        text.contains(": denied (no rule allows it); web is in laptop's netmap"),
        "{text}"
    );
    let o = cli(s, &["-o", "json", "policy", "explain", "alice@", "web"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["port"], "any");
    assert_eq!(v["decisions"][0]["allowed"], true);
    assert_eq!(v["decisions"][0]["port"], 22);
    assert_eq!(v["decisions"][0]["rule"]["index"], 1);
    assert_eq!(v["decisions"][0]["in_netmap"], true);

    let laptop = ids[0].to_string();
    let o = cli(s, &["nodes", "tag", &laptop, "--tags", "tag:server"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("node {laptop} (laptop) tagged tag:server\n")
    );
    let o = cli(s, &["nodes", "tag", &laptop, "--tags", "tag:db"]).await;
    assert!(!o.status.success());
    assert!(stderr(&o).contains("\"tag:db\""), "{}", stderr(&o));
    server.stop().await;
}
