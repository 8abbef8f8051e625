//! The route commands of the real `warren-control` binary against a server on loopback:
//! `nodes approve-routes`, `nodes list-routes` (table and JSON) and `policy explain
//! --exit-node`, with their exact output and exit codes.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{Server, new_auth_key, register_req, server_key, sign};
use warren_proto::NodeSecretKey;
use warren_proto::control::*;

const BIN: &str = env!("CARGO_BIN_EXE_warren-control");

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
async fn approve_routes_list_routes_and_explain_via_an_exit_node() {
    let server = Server::start().await;
    let mut admin = server.local_admin().await;
    let mut control = server.control().await;
    let sk = server_key(&mut control).await;
    let auth = new_auth_key(&mut admin).await;
    let key = NodeSecretKey::generate();
    let router = control
        .register_node(register_req(&key, &sk, &auth, "gw"))
        .await
        .expect("register")
        .into_inner()
        .node
        .expect("node");
    control
        .register_node(register_req(
            &NodeSecretKey::generate(),
            &sk,
            &auth,
            "laptop",
        ))
        .await
        .expect("register");
    // The router is online (following its map), so it becomes primary once approved.
    let proof = sign(&key, &sk, "StreamMapResponse", &StreamMapRequest::default());
    let _stream = control
        .stream_map_response(StreamMapRequest {
            proof: Some(proof),
            ..StreamMapRequest::default()
        })
        .await
        .expect("stream");
    let mut req = UpdateNodeRequest {
        advertised_routes: Some(RouteList {
            routes: vec!["10.20.0.0/24".into(), "0.0.0.0/0".into(), "::/0".into()],
        }),
        ..UpdateNodeRequest::default()
    };
    req.proof = Some(sign(&key, &sk, "UpdateNode", &req));
    control.update_node(req).await.expect("advertise");
    let (s, id) = (&server.socket, router.id.to_string());

    // Nothing approved yet: listed, serving nothing.
    let o = cli(s, &["nodes", "list-routes"]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!(
            "ID  HOSTNAME  APPROVED  AVAILABLE                      SERVING (PRIMARY)\n\
             {id:<2}  gw                  0.0.0.0/0, 10.20.0.0/24, ::/0\n"
        )
    );

    let o = cli(
        s,
        &[
            "nodes",
            "approve-routes",
            &id,
            "--routes",
            "10.20.0.0/24,0.0.0.0/0",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("node {id} (gw) approved routes: 0.0.0.0/0, 10.20.0.0/24, ::/0\n")
    );
    let o = cli(s, &["-o", "json", "nodes", "list-routes", "--id", &id]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        v,
        serde_json::json!([{
            "id": router.id,
            "name": "gw",
            "advertised": ["0.0.0.0/0", "10.20.0.0/24", "::/0"],
            "approved": ["0.0.0.0/0", "10.20.0.0/24", "::/0"],
            "serving": ["10.20.0.0/24", "0.0.0.0/0", "::/0"],
        }])
    );

    // No policy: the laptop may use the exit node for anything.
    let o = cli(
        s,
        &[
            "policy",
            "explain",
            "laptop",
            "198.51.100.7:443",
            "--exit-node",
            "gw",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        "no policy: every node may reach every other\n\
         proto tcp, port 443\n\
         laptop (100.64.0.2) -> 198.51.100.7 via exit node gw: allowed by the default (no acls \
         or grants: allow all)\n"
    );

    // A malformed route is refused with the server's message; "" clears.
    let o = cli(
        s,
        &["nodes", "approve-routes", &id, "--routes", "10.20.0.1/24"],
    )
    .await;
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("routes: \"10.20.0.1/24\" has host bits set; write 10.20.0.0/24"),
        "{}",
        stderr(&o)
    );
    let o = cli(s, &["nodes", "approve-routes", &id, "--routes", ""]).await;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("node {id} (gw): no routes approved\n"));
    let o = cli(s, &["-o", "json", "nodes", "list-routes", "--id", "999"]).await;
    assert_eq!(stdout(&o).trim(), "[]");
    drop(admin);
    server.stop().await;
}
