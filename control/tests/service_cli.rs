//! `warren-control configtest` and `warren-control health`, run as the real binary: the exact
//! output and exit code for a good configuration, an unknown key, a policy that does not parse
//! (file, line and column), a healthy server, a server whose database fails, and a stopped one.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::Server;

const BIN: &str = env!("CARGO_BIN_EXE_warren-control");

const POLICY: &str = r#"{
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["*:*"]},
  ],
}
"#;

/// A comma is missing after `"src": ["*"]` (line 3, column 38).
const BROKEN_POLICY: &str = r#"{
  "acls": [
    {"action": "accept", "src": ["*"] "dst": ["*:*"]},
  ],
}
"#;

/// Runs the CLI with `args` (off the runtime's thread: a server may run on it).
async fn cli(args: Vec<String>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("WARREN_CONTROL_CONFIG")
        .env_remove("WARREN_CONTROL_SOCKET")
        .env_remove("WARREN_CONTROL_URL")
        .env_remove("WARREN_API_KEY");
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

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|p| p.to_string()).collect()
}

/// `configtest` on the file `config` (with the policy `policy` beside it when given).
async fn configtest(dir: &Path, config: &str, policy: Option<&str>) -> Output {
    let path = dir.join("control.toml");
    std::fs::write(&path, config).expect("write config");
    if let Some(policy) = policy {
        std::fs::write(dir.join("policy.hujson"), policy).expect("write policy");
    }
    cli(args(&[
        "--config",
        &path.display().to_string(),
        "configtest",
    ]))
    .await
}

#[tokio::test]
async fn configtest_accepts_a_good_config_and_its_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let config =
        format!("listen_addr = \"0.0.0.0:50443\"\n[policy]\npath = \"{d}/policy.hujson\"\n");
    let o = configtest(dir.path(), &config, Some(POLICY)).await;
    assert_eq!(stderr(&o), "");
    assert_eq!(
        stdout(&o),
        format!("policy ok: {d}/policy.hujson\nconfig ok: {d}/control.toml\n")
    );
    assert!(o.status.success());

    // No policy configured: said so, still ok.
    let o = configtest(dir.path(), "listen_addr = \"0.0.0.0:50443\"\n", None).await;
    assert_eq!(
        stdout(&o),
        format!(
            "policy: none configured (every node may reach every other)\n\
             config ok: {d}/control.toml\n"
        )
    );
    assert!(o.status.success());

    // JSON for scripts.
    let path = format!("{d}/control.toml");
    let o = cli(args(&["--config", &path, "-o", "json", "configtest"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["config"], path.as_str());
    assert_eq!(v["policy_file"], serde_json::Value::Null);
    assert_eq!(v["policy_mode"], "file");
}

#[tokio::test]
async fn configtest_names_an_unknown_key_and_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let o = configtest(dir.path(), "listen_adr = \"0.0.0.0:50443\"\n", None).await;
    assert_eq!(stdout(&o), "");
    // The exact message up to the list of keys (which grows with the configuration).
    let err = stderr(&o);
    let (head, keys) = err
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(
        head,
        format!(
            "error: {d}/control.toml: TOML parse error at line 1, column 1\n  |\n\
             1 | listen_adr = \"0.0.0.0:50443\"\n  | ^^^^^^^^^^\n\
             unknown field `listen_adr`, "
        )
    );
    assert!(keys.starts_with("`server_url`, `listen_addr`, "), "{keys}");
    assert!(keys.ends_with(", `policy`, `log`\n\n"), "{keys}");
    assert_eq!(o.status.code(), Some(1));

    // A value out of range names its key.
    let o = configtest(dir.path(), "[prefixes]\nv4 = \"10.0.0.0/8\"\n", None).await;
    assert_eq!(
        stderr(&o),
        "error: prefixes.v4: must be a range of at least 4 addresses within 100.64.0.0/10\n"
    );
    assert_eq!(o.status.code(), Some(1));
}

#[tokio::test]
async fn configtest_names_the_policy_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().display().to_string();
    let config = format!("[policy]\npath = \"{d}/policy.hujson\"\n");
    let o = configtest(dir.path(), &config, Some(BROKEN_POLICY)).await;
    assert_eq!(stdout(&o), "");
    assert_eq!(
        stderr(&o),
        format!("error: policy file {d}/policy.hujson: 3:38: syntax error: Expected comma\n")
    );
    assert_eq!(o.status.code(), Some(1));

    // A policy file that is not there.
    std::fs::remove_file(dir.path().join("policy.hujson")).expect("rm");
    let o = configtest(dir.path(), &config, None).await;
    assert_eq!(
        stderr(&o),
        format!("error: policy file {d}/policy.hujson does not exist\n")
    );
    assert_eq!(o.status.code(), Some(1));

    // No file to test at all.
    let o = cli(args(&["configtest"])).await;
    assert_eq!(
        stderr(&o),
        "error: configtest needs a configuration file: --config PATH (or WARREN_CONTROL_CONFIG)\n"
    );
    assert_eq!(o.status.code(), Some(1));
}

#[tokio::test]
async fn health_of_a_running_a_broken_and_a_stopped_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.hujson");
    std::fs::write(&policy, POLICY).expect("write policy");
    let p = policy.clone();
    let server = Server::start_with(move |c| c.policy.path = p).await;
    let socket = server.socket.display().to_string();

    let o = cli(args(&["--socket", &socket, "health"])).await;
    assert_eq!(stderr(&o), "");
    assert_eq!(
        stdout(&o),
        format!(
            "healthy\ndatabase: ok\npolicy: in force, from {}\nnodes: 0 (0 online)\n",
            policy.display()
        )
    );
    assert!(o.status.success());

    let o = cli(args(&["--socket", &socket, "-o", "json", "health"])).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["healthy"], true);
    assert_eq!(v["database"], "ok");
    assert_eq!(v["policy_configured"], true);
    assert_eq!(v["policy_mode"], "file");

    // Over TCP with an API key, as from another host; a wrong key is refused.
    let secret = server
        .local_admin()
        .await
        .create_api_key(warren_proto::control::CreateApiKeyRequest {
            expiration_secs: 60,
        })
        .await
        .expect("api key")
        .into_inner()
        .secret;
    let url = server.url.clone();
    let o = cli(args(&["--server", &url, "--api-key", &secret, "health"])).await;
    assert_eq!(stderr(&o), "");
    assert!(stdout(&o).starts_with("healthy\n"), "{}", stdout(&o));
    assert!(o.status.success());
    let o = cli(args(&[
        "--server",
        &url,
        "--api-key",
        "warren-api-nope",
        "health",
    ]))
    .await;
    assert_eq!(stdout(&o), "");
    assert!(
        stderr(&o).starts_with("error: not healthy: "),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).ends_with(" (Unauthenticated)\n"),
        "{}",
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(1));

    // The database fails under the server (a table it reads is gone): not healthy, exit 1.
    let db = server.socket.with_file_name("db.sqlite");
    let conn = rusqlite::Connection::open(&db).expect("open db");
    conn.execute_batch("ALTER TABLE api_keys RENAME TO api_keys_gone")
        .expect("rename");
    let o = cli(args(&["--socket", &socket, "health"])).await;
    assert_eq!(
        stdout(&o),
        format!(
            "not healthy\ndatabase: storage: sqlite: no such table: api_keys\n\
             policy: in force, from {}\nnodes: 0 (0 online)\n",
            policy.display()
        )
    );
    assert_eq!(stderr(&o), "error: not healthy\n");
    assert_eq!(o.status.code(), Some(1));
    conn.execute_batch("ALTER TABLE api_keys_gone RENAME TO api_keys")
        .expect("rename back");
    drop(conn);
    let o = cli(args(&["--socket", &socket, "health"])).await;
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));

    server.stop().await;
    let o = cli(args(&["--socket", &socket, "health"])).await;
    assert_eq!(stdout(&o), "");
    assert_eq!(
        stderr(&o),
        format!(
            "error: not healthy: cannot reach the server at {socket}: \
             No such file or directory (os error 2)\n"
        )
    );
    assert_eq!(o.status.code(), Some(1));

    // A socket nobody listens on any more (a server that was killed leaves it behind).
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let stale = stale.display().to_string();
    let o = cli(args(&["--socket", &stale, "health"])).await;
    assert_eq!(
        stderr(&o),
        format!(
            "error: not healthy: cannot reach the server at {stale}: \
             Connection refused (os error 111)\n"
        )
    );
    assert_eq!(o.status.code(), Some(1));
}
