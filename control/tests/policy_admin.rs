//! The access policy through a real server on loopback: `policy get|set|check|explain` over the
//! admin socket, file mode's live reload (the file watched; a broken or deleted file keeps the
//! policy in force), start-up refusing a broken file, tags checked against `tagOwners` on
//! pre-auth keys and changed live with `nodes tag`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Server, register_req, server_key, wait_until};
use tonic::Code;
use tonic::transport::Channel;
use warren_control::config::{Config, PolicyMode};
use warren_control::policy::{CompiledPolicy, PolicyError, Pos};
use warren_proto::NodeSecretKey;
use warren_proto::control::admin_client::AdminClient;
use warren_proto::control::control_client::ControlClient;
use warren_proto::control::*;

/// tag:server is owned by alice; bob's devices may reach servers on 80, alice's on 22.
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

/// Only alice's devices reach each other.
const POLICY_2: &str = r#"{
  "tagOwners": {"tag:server": ["alice@"]},
  "acls": [{"action": "accept", "src": ["alice@"], "dst": ["alice@:*"]}],
}
"#;

/// A syntax error at line 3, column 3 (a key without quotes or value).
const BROKEN: &str = "{\n  \"acls\": [],\n  oops\n}\n";

/// A policy whose own `tests` fail: 100.64.0.1 may not reach 100.64.0.2 on 22.
const FAILING_TESTS: &str = r#"{
  "acls": [{"action": "accept", "src": ["100.64.0.9"], "dst": ["100.64.0.10:*"]}],
  "tests": [{"src": "100.64.0.1", "accept": ["100.64.0.2:22"]}],
}
"#;

async fn start_database_mode() -> Server {
    Server::start_with(|c| c.policy.mode = PolicyMode::Database).await
}

async fn get(admin: &mut AdminClient<Channel>) -> GetPolicyResponse {
    admin
        .get_policy(GetPolicyRequest {})
        .await
        .expect("get")
        .into_inner()
}

async fn set(admin: &mut AdminClient<Channel>, text: &str) -> Result<u64, tonic::Status> {
    admin
        .set_policy(SetPolicyRequest {
            policy: text.into(),
        })
        .await
        .map(|r| r.into_inner().updates_sent)
}

async fn check(admin: &mut AdminClient<Channel>, text: &str) -> Result<(), tonic::Status> {
    admin
        .check_policy(CheckPolicyRequest {
            policy: text.into(),
        })
        .await
        .map(|_| ())
}

/// The compiler's own error for `text`, which the server must pass on unchanged.
fn compile_error(text: &str) -> PolicyError {
    CompiledPolicy::from_text(text).expect_err("refused")
}

/// Writes `text` to `path` the way editors and deploy tools do: a new file renamed over it.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Waits (up to 20 s) until the policy in force is `text`.
async fn wait_for_policy(admin: &mut AdminClient<Channel>, text: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(admin).await;
        if r.configured && r.policy == text {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for the policy; in force: {:?}",
            r.policy
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A node registered with `auth_key`; returns its key and id.
async fn register(
    control: &mut ControlClient<Channel>,
    auth_key: &str,
    host: &str,
) -> (NodeSecretKey, u64) {
    let sk = server_key(control).await;
    let key = NodeSecretKey::generate();
    let node = control
        .register_node(register_req(&key, &sk, auth_key, host))
        .await
        .expect("register")
        .into_inner()
        .node
        .expect("node");
    (key, node.id)
}

async fn user_key(admin: &mut AdminClient<Channel>, user: &str, tags: &[&str]) -> String {
    let _ = admin
        .create_user(CreateUserRequest { name: user.into() })
        .await;
    admin
        .create_pre_auth_key(CreatePreAuthKeyRequest {
            user: user.into(),
            reusable: true,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("pre-auth key")
        .into_inner()
        .secret
}

/// The names of the peers `node` sees now.
async fn peers(control: &mut ControlClient<Channel>, node: &NodeSecretKey) -> Vec<String> {
    let sk = server_key(control).await;
    let mut req = ListNodesRequest { proof: None };
    req.proof = Some(common::sign(node, &sk, "ListNodes", &req));
    let mut names: Vec<String> = control
        .list_nodes(req)
        .await
        .expect("peers")
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| n.given_name)
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn database_mode_get_set_and_check_through_the_admin_socket() {
    let server = start_database_mode().await;
    let mut admin = server.local_admin().await;

    let none = get(&mut admin).await;
    assert!(!none.configured);
    assert_eq!(none.policy, "");
    assert_eq!(none.mode, "database");

    check(&mut admin, POLICY)
        .await
        .expect("a good policy checks");
    assert!(!get(&mut admin).await.configured, "check changes nothing");
    set(&mut admin, POLICY).await.expect("set");
    let r = get(&mut admin).await;
    assert!(r.configured);
    assert_eq!(r.policy, POLICY, "the text as written, comments and all");

    set(&mut admin, POLICY_2).await.expect("replace");
    assert_eq!(get(&mut admin).await.policy, POLICY_2);
    server.stop().await;
}

#[tokio::test]
async fn the_stored_policy_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db.sqlite");
    let configure = |c: &mut Config| {
        c.policy.mode = PolicyMode::Database;
        c.database.sqlite.path = db.clone();
    };
    let server = Server::start_with(configure).await;
    let mut admin = server.local_admin().await;
    set(&mut admin, POLICY).await.expect("set");
    drop(admin);
    server.stop().await;

    let server = Server::start_with(configure).await;
    let mut admin = server.local_admin().await;
    let r = get(&mut admin).await;
    assert!(r.configured);
    assert_eq!(r.policy, POLICY);
    server.stop().await;
}

#[tokio::test]
async fn set_in_file_mode_is_refused_naming_policy_mode() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.hujson");
    std::fs::write(&file, POLICY).expect("write");
    let server = Server::start_with(|c| c.policy.path = file.clone()).await;
    let mut admin = server.local_admin().await;
    let err = set(&mut admin, POLICY_2).await.expect_err("file mode");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("policy.mode"), "{err:?}");
    assert!(
        err.message().contains(&file.display().to_string()),
        "{err:?}"
    );
    // check works in file mode too, and the file's policy is what get shows.
    check(&mut admin, POLICY_2)
        .await
        .expect("check in file mode");
    let r = get(&mut admin).await;
    assert_eq!((r.configured, r.mode.as_str()), (true, "file"));
    assert_eq!(r.policy, POLICY);
    assert_eq!(r.path, file.display().to_string());
    server.stop().await;
}

#[tokio::test]
async fn a_syntax_error_names_line_and_column_and_changes_nothing() {
    let server = start_database_mode().await;
    let mut admin = server.local_admin().await;
    set(&mut admin, POLICY).await.expect("set");

    let expected = compile_error(BROKEN);
    assert!(
        matches!(
            expected,
            PolicyError::Syntax {
                at: Pos { line: 3, col: 3 },
                ..
            }
        ),
        "{expected:?}"
    );
    for err in [
        set(&mut admin, BROKEN).await.expect_err("set"),
        check(&mut admin, BROKEN).await.expect_err("check"),
    ] {
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(err.message(), expected.to_string());
        assert!(err.message().starts_with("3:3: "), "{err:?}");
    }
    assert_eq!(get(&mut admin).await.policy, POLICY, "the old one stays");
    server.stop().await;
}

#[tokio::test]
async fn failing_tests_are_refused_by_set_and_check_and_the_old_policy_stays() {
    let server = start_database_mode().await;
    let mut admin = server.local_admin().await;
    set(&mut admin, POLICY).await.expect("set");
    for err in [
        set(&mut admin, FAILING_TESTS).await.expect_err("set"),
        check(&mut admin, FAILING_TESTS).await.expect_err("check"),
    ] {
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with("test(s) failed: "), "{err:?}");
        assert!(err.message().contains("tests[0]"), "{err:?}");
        assert!(err.message().contains("100.64.0.1"), "{err:?}");
    }
    assert_eq!(get(&mut admin).await.policy, POLICY);
    server.stop().await;
}

#[tokio::test]
async fn policy_calls_over_tcp_need_an_api_key() {
    let server = start_database_mode().await;
    let channel = Channel::from_shared(server.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut remote = AdminClient::new(channel);
    let err = remote
        .get_policy(GetPolicyRequest {})
        .await
        .expect_err("no key");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = set(&mut remote, POLICY).await.expect_err("no key");
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut admin = server.local_admin().await;
    assert!(!get(&mut admin).await.configured, "nothing was set");
    server.stop().await;
}

/// A server in file mode on `file` (which must exist).
async fn start_file_mode(file: &Path) -> Server {
    let file: PathBuf = file.into();
    Server::start_with(move |c| c.policy.path = file).await
}

#[tokio::test]
async fn editing_the_policy_file_applies_it_and_a_broken_edit_keeps_the_old() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.hujson");
    std::fs::write(&file, POLICY).expect("write");
    let server = start_file_mode(&file).await;
    let stats = server.stats.policy.clone();
    let mut admin = server.local_admin().await;
    assert_eq!(get(&mut admin).await.policy, POLICY);

    // Replaced by rename, as editors do.
    replace_file(&file, POLICY_2);
    wait_for_policy(&mut admin, POLICY_2).await;
    let applied = stats.applied.load(Ordering::SeqCst);
    assert!(applied >= 1, "{applied}");

    // A broken edit, written in place: refused with its line:col, the old policy stays.
    std::fs::write(&file, BROKEN).expect("write");
    // (Waiting for its own error: a reader may also catch the file truncated, mid-write.)
    wait_until("the broken edit is refused", || {
        stats
            .last_error()
            .is_some_and(|e| e.contains("3:3: syntax error"))
    })
    .await;
    let error = stats.last_error().expect("an error");
    assert!(
        error.starts_with(&format!("policy file {}: 3:3: ", file.display())),
        "{error}"
    );
    assert!(stats.refused.load(Ordering::SeqCst) >= 1);
    assert_eq!(get(&mut admin).await.policy, POLICY_2);

    // A policy whose tests fail is refused on reload too.
    std::fs::write(&file, FAILING_TESTS).expect("write");
    wait_until("the failing tests are refused", || {
        stats
            .last_error()
            .is_some_and(|e| e.contains("test(s) failed"))
    })
    .await;
    assert_eq!(get(&mut admin).await.policy, POLICY_2);

    // Fixing the file applies it.
    std::fs::write(&file, POLICY).expect("write");
    wait_for_policy(&mut admin, POLICY).await;
    server.stop().await;
}

#[tokio::test]
async fn a_deleted_policy_file_keeps_the_policy_in_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.hujson");
    std::fs::write(&file, POLICY).expect("write");
    let server = start_file_mode(&file).await;
    let stats = server.stats.policy.clone();
    let mut admin = server.local_admin().await;

    std::fs::remove_file(&file).expect("remove");
    wait_until("the removal is noticed", || {
        stats.refused.load(Ordering::SeqCst) >= 1
    })
    .await;
    let error = stats.last_error().expect("an error");
    assert!(error.contains("does not exist"), "{error}");
    let r = get(&mut admin).await;
    assert!(r.configured, "not allow-all");
    assert_eq!(r.policy, POLICY);

    // Put back (another policy): applied.
    replace_file(&file, POLICY_2);
    wait_for_policy(&mut admin, POLICY_2).await;
    server.stop().await;
}

#[tokio::test]
async fn a_broken_policy_file_refuses_the_start_naming_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.hujson");
    std::fs::write(&file, BROKEN).expect("write");
    let mut config = Config {
        unix_socket: dir.path().join("control.sock"),
        ..Config::default()
    };
    config.noise.private_key_path = dir.path().join("control.key");
    config.database.sqlite.path = dir.path().join("db.sqlite");
    config.derp.server.enabled = Some(false);
    config.policy.path = file.clone();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = warren_control::serve::serve_on(config.clone(), tcp, std::future::pending())
        .await
        .expect_err("refused");
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!(
            "policy file {}: 3:3: syntax error",
            file.display()
        )),
        "{text}"
    );
    assert!(!config.unix_socket.exists(), "nothing was served");

    // A missing file refuses the start too.
    config.policy.path = dir.path().join("absent.hujson");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let err = warren_control::serve::serve_on(config, tcp, std::future::pending())
        .await
        .expect_err("refused");
    assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
}

#[tokio::test]
async fn explain_names_the_deciding_rule_and_the_netmap() {
    let server = start_database_mode().await;
    let mut admin = server.local_admin().await;
    let mut control = server.control().await;
    set(&mut admin, POLICY).await.expect("set");
    let alice = user_key(&mut admin, "alice", &[]).await;
    let bob = user_key(&mut admin, "bob", &[]).await;
    let servers = user_key(&mut admin, "alice", &["tag:server"]).await;
    register(&mut control, &alice, "laptop").await;
    register(&mut control, &bob, "phone").await;
    register(&mut control, &servers, "web").await;

    let explain = |src: &str, dst: &str, port: Option<u32>| ExplainPolicyRequest {
        src: src.into(),
        dst: dst.into(),
        port,
        proto: String::new(),
        exit_node: String::new(),
    };
    // alice's laptop to the server on 22: the second acl (index 1, line 8).
    let r = admin
        .explain_policy(explain("laptop", "web", Some(22)))
        .await
        .expect("explain")
        .into_inner();
    assert!(r.configured);
    assert_eq!(r.proto, 6, "tcp by default");
    assert_eq!(r.decisions.len(), 1);
    let d = &r.decisions[0];
    assert!(d.allowed);
    assert_eq!(
        (d.src_node.as_str(), d.dst_node.as_str()),
        ("laptop", "web")
    );
    let rule = d.rule.clone().expect("a rule");
    assert_eq!(
        (rule.section.as_str(), rule.index, rule.line),
        ("acls", 1, 8)
    );
    assert!(d.visible, "the server is in the laptop's netmap");

    // On 80 the laptop is denied, by no rule.
    let d = admin
        .explain_policy(explain("laptop", "web", Some(80)))
        .await
        .expect("explain")
        .into_inner()
        .decisions
        .remove(0);
    assert!(!d.allowed);
    assert_eq!(d.rule, None);

    // bob's phone, any port: allowed on 80 by the first acl.
    let r = admin
        .explain_policy(explain("bob@", "tag:server", None))
        .await
        .expect("explain")
        .into_inner();
    assert!(r.any_port);
    let d = &r.decisions[0];
    assert!(d.allowed);
    assert_eq!(d.port, 80);
    assert_eq!(d.rule.as_ref().map(|r| (r.index, r.line)), Some((0, 7)));

    // The laptop and the phone never see each other; by mesh IP too.
    let phone_ip = admin
        .list_nodes(AdminListNodesRequest::default())
        .await
        .expect("nodes")
        .into_inner()
        .nodes
        .into_iter()
        .find(|n| n.given_name == "phone")
        .expect("phone")
        .addresses[0]
        .trim_end_matches("/32")
        .to_owned();
    let d = admin
        .explain_policy(explain("alice@", &phone_ip, None))
        .await
        .expect("explain")
        .into_inner()
        .decisions
        .remove(0);
    assert!(!d.allowed);
    assert!(!d.visible);
    assert_eq!(d.dst_node, "phone");

    // Names that match nothing, and a bad protocol, are the asker's error.
    let err = admin
        .explain_policy(explain("nobody", "web", None))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("\"nobody\""), "{err:?}");
    let err = admin
        .explain_policy(ExplainPolicyRequest {
            proto: "carrier-pigeon".into(),
            ..explain("laptop", "web", None)
        })
        .await
        .expect_err("bad proto");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_pre_auth_key_with_an_unowned_tag_is_refused() {
    let server = start_database_mode().await;
    let mut admin = server.local_admin().await;
    admin
        .create_user(CreateUserRequest {
            name: "alice".into(),
        })
        .await
        .expect("user");
    let key = |tags: &[&str]| CreatePreAuthKeyRequest {
        user: "alice".into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    // No policy: nothing to check against, any tag goes.
    admin
        .create_pre_auth_key(key(&["tag:anything"]))
        .await
        .expect("no policy");
    set(&mut admin, POLICY).await.expect("set");
    let err = admin
        .create_pre_auth_key(key(&["tag:server", "tag:db"]))
        .await
        .expect_err("unowned");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(
        err.message(),
        PolicyError::TagWithoutOwner {
            tag: "tag:db".into()
        }
        .to_string()
    );
    let keys = admin
        .list_pre_auth_keys(ListPreAuthKeysRequest::default())
        .await
        .expect("list")
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1, "the refused key was not stored");
    admin
        .create_pre_auth_key(key(&["tag:server"]))
        .await
        .expect("owned");
    server.stop().await;
}

#[tokio::test]
async fn nodes_tag_retags_a_node_live() {
    let server = start_database_mode().await;
    let mut admin = server.local_admin().await;
    let mut control = server.control().await;
    set(&mut admin, POLICY).await.expect("set");
    let bob = user_key(&mut admin, "bob", &[]).await;
    let alice = user_key(&mut admin, "alice", &[]).await;
    let (phone, _) = register(&mut control, &bob, "phone").await;
    let (_, box_id) = register(&mut control, &alice, "box").await;

    // bob's phone reaches only tag:server: alice's box is no peer yet.
    assert_eq!(peers(&mut control, &phone).await, Vec::<String>::new());

    let node = admin
        .tag_node(TagNodeRequest {
            id: box_id,
            tags: vec!["tag:server".into()],
        })
        .await
        .expect("tag")
        .into_inner()
        .node
        .expect("node");
    assert_eq!(node.tags, ["tag:server"]);
    assert_eq!(node.user, "tagged-devices", "owned by its tag");
    // Live: the phone sees the box now.
    assert_eq!(peers(&mut control, &phone).await, ["box"]);
    let listed = admin
        .list_nodes(AdminListNodesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .nodes;
    let listed = listed.iter().find(|n| n.id == box_id).expect("listed");
    assert_eq!(
        (listed.user.as_str(), listed.tags.as_slice()),
        ("tagged-devices", ["tag:server".to_string()].as_slice())
    );
    // alice's own list no longer holds it.
    let alices = admin
        .list_nodes(AdminListNodesRequest {
            user: "alice".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .nodes;
    assert!(alices.iter().all(|n| n.id != box_id), "{alices:?}");

    // No tags, an unowned tag, an unknown node: typed refusals that change nothing.
    let tag = |id, tags: &[&str]| TagNodeRequest {
        id,
        tags: tags.iter().map(|t| t.to_string()).collect(),
    };
    let err = admin.tag_node(tag(box_id, &[])).await.expect_err("no tags");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("at least one tag"), "{err:?}");
    let err = admin
        .tag_node(tag(box_id, &["tag:db"]))
        .await
        .expect_err("unowned");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("\"tag:db\""), "{err:?}");
    let err = admin
        .tag_node(tag(9999, &["tag:server"]))
        .await
        .expect_err("unknown node");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(peers(&mut control, &phone).await, ["box"]);
    server.stop().await;
}
