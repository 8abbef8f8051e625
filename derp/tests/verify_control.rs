//! Client verification against a real warren-control over gRPC: `Admin.VerifyNode` with an API
//! key over TCP, and without one over the local admin socket.

use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Channel;
use warren_control::config::Config as ControlConfig;
use warren_derp::client::ConnectOptions;
use warren_derp::config::{Config, VerifyClients};
use warren_derp::verify::{ControlVerifier, Verifier, VerifyError};
use warren_derp::{Client, ClientEvent};
use warren_proto::control::admin_client::AdminClient;
use warren_proto::control::control_client::ControlClient;
use warren_proto::control::*;
use warren_proto::proof::{make_proof, request_digest};
use warren_proto::{ControlPublicKey, DerpSecretKey, DiscoSecretKey, NodeSecretKey};

struct Control {
    dir: tempfile::TempDir,
    url: String,
    socket: std::path::PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start_control() -> Control {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = ControlConfig {
        unix_socket: dir.path().join("control.sock"),
        ..ControlConfig::default()
    };
    config.noise.private_key_path = dir.path().join("control.key");
    config.database.sqlite.path = dir.path().join("db.sqlite");
    config.derp.server.enabled = Some(false);
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", tcp.local_addr().expect("addr"));
    let socket = config.unix_socket.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(warren_control::serve::serve_on(config, tcp, async move {
        let _ = stopped.await;
    }));
    // The server creates its unix socket once it is listening on both.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "control did not start"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Control {
        dir,
        url,
        socket,
        stop,
        task,
    }
}

async fn local_admin(socket: &std::path::Path) -> AdminClient<Channel> {
    let channel = warren_control::cli::connect_unix(socket)
        .await
        .expect("unix connect");
    AdminClient::new(channel)
}

/// Registers `node` with control through a reusable pre-auth key.
async fn register(control: &Control, node: &NodeSecretKey) {
    let mut admin = local_admin(&control.socket).await;
    let _ = admin
        .create_user(CreateUserRequest {
            name: "alice".into(),
        })
        .await;
    let auth = admin
        .create_pre_auth_key(CreatePreAuthKeyRequest {
            user: "alice".into(),
            reusable: true,
            ..Default::default()
        })
        .await
        .expect("pre-auth key")
        .into_inner()
        .secret;
    let mut c = ControlClient::connect(control.url.clone())
        .await
        .expect("connect");
    let server = c
        .get_server_key(GetServerKeyRequest {})
        .await
        .expect("key")
        .into_inner();
    let server = ControlPublicKey::from_slice(&server.server_key).expect("32 bytes");
    let mut req = RegisterNodeRequest {
        proof: None,
        auth_key: auth,
        disco_key: DiscoSecretKey::generate().public_key().to_vec(),
        hostname: "known".into(),
    };
    let mut nonce = [0u8; 24];
    nonce[..8].copy_from_slice(&warren_proto::proof::unix_ms().to_be_bytes());
    req.proof = Some(make_proof(
        node,
        &server,
        "RegisterNode",
        warren_proto::proof::unix_ms(),
        nonce,
        &request_digest(&req),
    ));
    c.register_node(req).await.expect("register");
}

#[tokio::test]
async fn control_verifier_asks_verify_node() {
    let control = start_control().await;
    let known = NodeSecretKey::generate();
    register(&control, &known).await;
    let stranger = NodeSecretKey::generate();

    // Over TCP with an API key.
    let mut admin = local_admin(&control.socket).await;
    let secret = admin
        .create_api_key(CreateApiKeyRequest {
            expiration_secs: 3600,
        })
        .await
        .expect("api key")
        .into_inner()
        .secret;
    let api_key_path = control.dir.path().join("api.key");
    std::fs::write(&api_key_path, format!("{secret}\n")).expect("write");
    let v = ControlVerifier::new(&control.url, Some(&api_key_path)).expect("verifier");
    assert!(v.verify(known.public_key()).await.expect("answer"));
    assert!(!v.verify(stranger.public_key()).await.expect("answer"));

    // A wrong API key is an error, not an answer.
    let bad_path = control.dir.path().join("bad.key");
    std::fs::write(&bad_path, "warren-api-000000000000-000").expect("write");
    let bad = ControlVerifier::new(&control.url, Some(&bad_path)).expect("verifier");
    let err = bad
        .verify(known.public_key())
        .await
        .expect_err("unauthenticated");
    assert!(
        matches!(
            err,
            VerifyError::Rpc {
                code: tonic::Code::Unauthenticated,
                ..
            }
        ),
        "{err}"
    );

    // Over the local admin socket, no API key needed.
    let local = ControlVerifier::new(&format!("unix:{}", control.socket.display()), None)
        .expect("verifier");
    assert!(local.verify(known.public_key()).await.expect("answer"));

    // The relay configured like a deployment: known nodes in, strangers out.
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        stun: false,
        verify_clients: Some(VerifyClients {
            url: control.url.clone(),
            api_key_path: Some(api_key_path),
            fail_open: false,
        }),
        ..Config::default()
    };
    let relay = warren_derp::relay_from_config(&config, DerpSecretKey::generate()).expect("relay");
    let running = warren_derp::start_with(&config, relay)
        .await
        .expect("start");
    let url = format!("http://{}/derp", running.http_addr);
    let opts = ConnectOptions::default();
    let mut ok = Client::connect(&url, &known, &opts)
        .await
        .expect("known admitted");
    // The relay closes a refused client's connection before its ServerInfo.
    let refused = Client::connect(&url, &stranger, &opts)
        .await
        .expect_err("stranger refused");
    assert!(
        matches!(
            refused,
            warren_derp::client::ClientError::Read(warren_derp::ReadError::Closed)
        ),
        "{refused:?}"
    );
    ok.sender().ping([4; 8]).await.expect("ping");
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(10), ok.recv())
            .await
            .expect("in time")
            .expect("pong"),
        ClientEvent::Pong { data: [4; 8] }
    );
    assert_eq!(running.relay.stats().refused, 1);
    running.shutdown().await;

    let _ = control.stop.send(());
    control
        .task
        .await
        .expect("join")
        .expect("control ran cleanly");
}
