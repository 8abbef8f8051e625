//! The gRPC services over a real loopback socket: proofs of key possession, precise errors for
//! bad requests that change nothing, API-key protection of the admin API, and the map stream's
//! full map, deltas and sequence numbers.

mod common;

use std::time::Duration;

use common::{Server, new_auth_key, register_req, server_key, sign};
use tonic::Code;
use tonic::transport::Channel;
use warren_proto::NodeSecretKey;
use warren_proto::control::admin_client::AdminClient;
use warren_proto::control::map_response::Kind;
use warren_proto::control::*;

#[tokio::test]
async fn proofs_are_required_and_bad_requests_change_nothing() {
    let server = Server::start().await;
    let mut c = server.control().await;
    let mut admin = server.local_admin().await;
    let sk = server_key(&mut c).await;
    let auth = new_auth_key(&mut admin).await;

    let victim = NodeSecretKey::generate();
    c.register_node(register_req(&victim, &sk, &auth, "victim"))
        .await
        .expect("register");

    // Knowing the victim's public key is not enough: a proof sealed with another key fails.
    let attacker = NodeSecretKey::generate();
    let mut forged = sign(&attacker, &sk, "GetNode", &GetNodeRequest::default());
    forged.node_key = victim.public_key().to_vec();
    let err = c
        .get_node(GetNodeRequest {
            proof: Some(forged),
        })
        .await
        .expect_err("forged");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    let err = c
        .get_node(GetNodeRequest { proof: None })
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::Unauthenticated);

    // A captured request cannot be sent again, nor its proof moved to another body.
    let mut eps = UpdateNodeRequest {
        proof: None,
        endpoints: Some(EndpointList {
            endpoints: vec!["192.0.2.1:1".into()],
        }),
        hostname: None,
        home_region: None,
        advertised_routes: None,
    };
    eps.proof = Some(sign(&victim, &sk, "UpdateNode", &eps));
    c.update_node(eps.clone()).await.expect("first use");
    let err = c.update_node(eps.clone()).await.expect_err("replayed");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("already used"), "{err:?}");
    let mut moved = eps;
    moved.endpoints = Some(EndpointList {
        endpoints: vec!["198.51.100.9:1".into()],
    });
    let err = c
        .update_node(moved)
        .await
        .expect_err("moved to another body");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("another method or request"),
        "{err:?}"
    );

    // A proof for one method does not work on another.
    let other = sign(&victim, &sk, "GetNode", &GetNodeRequest::default());
    let err = c
        .update_node(UpdateNodeRequest {
            proof: Some(other),
            endpoints: None,
            hostname: None,
            home_region: None,
            advertised_routes: None,
        })
        .await
        .expect_err("wrong method");
    assert_eq!(err.code(), Code::Unauthenticated);

    let x = NodeSecretKey::generate();
    let mut bad = register_req(&x, &sk, &auth, "x");
    bad.proof = None;
    bad.disco_key = vec![1, 2, 3];
    bad.proof = Some(sign(&x, &sk, "RegisterNode", &bad));
    assert_eq!(
        c.register_node(bad).await.expect_err("disco").code(),
        Code::InvalidArgument
    );

    let huge = register_req(&NodeSecretKey::generate(), &sk, &auth, &"h".repeat(200_000));
    let err = c.register_node(huge).await.expect_err("oversized");
    // tonic refuses a message over the server's decoding limit before the handler runs.
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

    let mut bad_eps = UpdateNodeRequest {
        proof: None,
        endpoints: Some(EndpointList {
            endpoints: vec!["not an endpoint".into()],
        }),
        hostname: None,
        home_region: None,
        advertised_routes: None,
    };
    bad_eps.proof = Some(sign(&victim, &sk, "UpdateNode", &bad_eps));
    assert_eq!(
        c.update_node(bad_eps).await.expect_err("endpoints").code(),
        Code::InvalidArgument
    );

    let unknown = NodeSecretKey::generate();
    let proof = sign(&unknown, &sk, "GetNode", &GetNodeRequest::default());
    assert_eq!(
        c.get_node(GetNodeRequest { proof: Some(proof) })
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );

    // The server is still up and exactly one node is stored.
    let nodes = admin
        .list_nodes(AdminListNodesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        nodes[0].endpoints,
        ["192.0.2.1:1"],
        "only the genuine update applied"
    );
    server.stop().await;
}

#[tokio::test]
async fn admin_over_tcp_needs_an_api_key() {
    let server = Server::start().await;
    let mut local = server.local_admin().await;
    let channel = Channel::from_shared(server.url.clone())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut remote = AdminClient::new(channel);
    let err = remote
        .list_users(ListUsersRequest {})
        .await
        .expect_err("no key");
    assert_eq!(err.code(), Code::Unauthenticated);

    let key = local
        .create_api_key(CreateApiKeyRequest {
            expiration_secs: 3600,
        })
        .await
        .expect("api key");
    let secret = key.into_inner().secret;
    let mut req = tonic::Request::new(ListUsersRequest {});
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {secret}").parse().expect("header"),
    );
    remote.list_users(req).await.expect("with key");

    // The right prefix with a wrong secret: the hash comparison refuses it.
    let mut forged = secret.clone();
    let last = forged.pop().expect("non-empty");
    forged.push(if last == '0' { '1' } else { '0' });
    let mut req = tonic::Request::new(ListUsersRequest {});
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {forged}").parse().expect("header"),
    );
    assert_eq!(
        remote
            .list_users(req)
            .await
            .expect_err("wrong secret")
            .code(),
        Code::Unauthenticated
    );

    let mut req = tonic::Request::new(ListUsersRequest {});
    req.metadata_mut().insert(
        "authorization",
        "Bearer warren-api-000000000000-000"
            .parse()
            .expect("header"),
    );
    assert_eq!(
        remote.list_users(req).await.expect_err("bad key").code(),
        Code::Unauthenticated
    );
    server.stop().await;
}

#[tokio::test]
async fn map_stream_sends_full_map_then_numbered_deltas() {
    let server = Server::start().await;
    let mut c = server.control().await;
    let mut admin = server.local_admin().await;
    let sk = server_key(&mut c).await;
    let auth = new_auth_key(&mut admin).await;
    let a = NodeSecretKey::generate();
    c.register_node(register_req(&a, &sk, &auth, "a"))
        .await
        .expect("a");

    let proof = sign(&a, &sk, "StreamMapResponse", &StreamMapRequest::default());
    let mut stream = c
        .stream_map_response(StreamMapRequest {
            proof: Some(proof),
            ..StreamMapRequest::default()
        })
        .await
        .expect("stream")
        .into_inner();
    let first = stream.message().await.expect("ok").expect("message");
    assert_eq!(first.seq, 1);
    let Some(Kind::Full(full)) = first.kind else {
        panic!("first message is a full map: {first:?}")
    };
    assert!(full.peers.is_empty());
    assert_eq!(full.self_node.expect("self").hostname, "a");

    // Each change is waited for before the next, so none coalesces with another.
    let mut seq = 1;
    let mut next_change = async |stream: &mut tonic::Streaming<MapResponse>| loop {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("in time")
            .expect("ok")
            .expect("msg");
        seq += 1;
        assert_eq!(m.seq, seq, "sequence numbers have no gaps");
        match m.kind.expect("kind") {
            Kind::Keepalive(_) => assert_eq!(m.version, 0, "a keepalive is no resume point"),
            k => {
                assert!(m.version > 0, "a change says the version it brings: {k:?}");
                return k;
            }
        }
    };
    let b = NodeSecretKey::generate();
    let bnode = c
        .register_node(register_req(&b, &sk, &auth, "b"))
        .await
        .expect("b")
        .into_inner()
        .node
        .expect("node");
    let k = next_change(&mut stream).await;
    assert!(
        matches!(&k, Kind::PeerAdded(n) if n.id == bnode.id),
        "{k:?}"
    );
    let mut update = UpdateNodeRequest {
        proof: None,
        endpoints: Some(EndpointList {
            endpoints: vec!["192.0.2.7:41641".into()],
        }),
        hostname: None,
        home_region: None,
        advertised_routes: None,
    };
    update.proof = Some(sign(&b, &sk, "UpdateNode", &update));
    c.update_node(update).await.expect("endpoints");
    let k = next_change(&mut stream).await;
    assert!(
        matches!(&k, Kind::PeerEndpoints(e) if e.endpoints == ["192.0.2.7:41641"]),
        "{k:?}"
    );
    admin
        .delete_node(DeleteNodeRequest { id: bnode.id })
        .await
        .expect("delete");
    let k = next_change(&mut stream).await;
    assert!(
        matches!(&k, Kind::PeerRemoved(r) if r.id == bnode.id),
        "{k:?}"
    );

    // Idle streams get keepalives.
    let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("msg");
    assert!(matches!(m.kind, Some(Kind::Keepalive(_))));
    // Shutting down ends open map streams, so the server stops cleanly with a node connected.
    let stop = tokio::spawn(server.stop());
    let end = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("in time");
    assert_eq!(
        end.expect_err("stream ends with a status").code(),
        Code::Unavailable
    );
    tokio::time::timeout(Duration::from_secs(10), stop)
        .await
        .expect("server stops")
        .expect("join");
}
