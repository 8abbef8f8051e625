//! The map stream as a node that asks for pages reads it, over a real loopback socket: a full
//! map larger than a page arrives in pages of bounded size and assembles (with the node's own
//! reader) into exactly the one-message map; a node that reconnects with a version control
//! still covers gets only what changed, in a fraction of the bytes, and ends with the same map
//! as a fresh full map; an unknown version or another map's id gets a full map.

mod common;

use std::time::Duration;

use common::{Server, new_auth_key, register_req, server_key, sign, stream_req_with};
use prost::Message;
use tonic::Streaming;
use tonic::transport::Channel;
use warren_node_core::netmap::{MapReader, Netmap};
use warren_proto::control::control_client::ControlClient;
use warren_proto::control::map_response::Kind;
use warren_proto::control::*;
use warren_proto::{ControlPublicKey, NodeSecretKey};

const STEP: Duration = Duration::from_secs(10);

async fn next(stream: &mut Streaming<MapResponse>) -> MapResponse {
    tokio::time::timeout(STEP, stream.message())
        .await
        .expect("a message in time")
        .expect("ok")
        .expect("open")
}

/// Opens `node`'s stream (`pages`, resuming from `resume`) and reads until the node has its
/// start: a whole full map, or the changes it resumed with (the first message with a version).
/// Returns the stream, the changes in order, the messages and their bytes.
async fn start(
    c: &mut ControlClient<Channel>,
    node: &NodeSecretKey,
    sk: &ControlPublicKey,
    resume: Option<(u64, u64)>,
    reader: &mut MapReader,
) -> (Streaming<MapResponse>, Vec<Kind>, Vec<MapResponse>, usize) {
    let mut stream = c
        .stream_map_response(stream_req_with(node, sk, resume, true))
        .await
        .expect("stream")
        .into_inner();
    reader.restart();
    let (mut changes, mut messages, mut bytes) = (Vec::new(), Vec::new(), 0);
    loop {
        let m = next(&mut stream).await;
        if matches!(m.kind, Some(Kind::Keepalive(_))) {
            continue;
        }
        bytes += m.encoded_len();
        messages.push(m.clone());
        let versioned = m.version != 0;
        changes.extend(reader.read(m).expect("a well-formed message"));
        if versioned {
            return (stream, changes, messages, bytes);
        }
    }
}

/// The full map as one message, as a node that does not ask for pages gets it.
async fn whole_map(
    c: &mut ControlClient<Channel>,
    node: &NodeSecretKey,
    sk: &ControlPublicKey,
) -> FullMap {
    let mut stream = c
        .stream_map_response(stream_req_with(node, sk, None, false))
        .await
        .expect("stream")
        .into_inner();
    let m = next(&mut stream).await;
    assert!(m.version > 0, "a whole full map is a point to resume from");
    match m.kind {
        Some(Kind::Full(full)) => {
            assert!(!full.more, "one message");
            full
        }
        other => panic!("a full map first: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_full_maps_assemble_and_resumed_streams_get_only_the_changes() {
    let server = Server::start().await;
    let mut c = server.control().await;
    let mut admin = server.local_admin().await;
    let sk = server_key(&mut c).await;
    let auth = new_auth_key(&mut admin).await;
    // 150 nodes: one node's map is several pages of at most 7 KiB.
    let mut nodes = Vec::new();
    for i in 0..150 {
        let key = NodeSecretKey::generate();
        let id = c
            .register_node(register_req(&key, &sk, &auth, &format!("node-{i}")))
            .await
            .expect("register")
            .into_inner()
            .node
            .expect("node")
            .id;
        nodes.push((key, id));
    }
    let viewer = &nodes[0].0;
    let whole = whole_map(&mut c, viewer, &sk).await;
    assert_eq!(whole.peers.len(), 149);

    // Paged: each message fits the stream's buffer, and the pages make the same map.
    let mut reader = MapReader::default();
    let (stream, changes, messages, full_bytes) =
        start(&mut c, viewer, &sk, None, &mut reader).await;
    assert!(messages.len() >= 3, "{} messages", messages.len());
    assert!(matches!(&messages[0].kind, Some(Kind::Full(f)) if f.more));
    for m in &messages {
        assert!(
            m.encoded_len() <= warren_proto::codec::BUFFER_SIZE,
            "{} bytes",
            m.encoded_len()
        );
    }
    assert!(
        messages[..messages.len() - 1]
            .iter()
            .all(|m| m.version == 0),
        "only the last page is a point to resume from"
    );
    let [Kind::Full(paged)] = &changes[..] else {
        panic!("one assembled full map: {changes:?}")
    };
    assert_eq!(paged.peers, whole.peers);
    assert_eq!(
        (&paged.dns, &paged.derp_map, &paged.filter),
        (&whole.dns, &whole.derp_map, &whole.filter)
    );
    assert_eq!(paged.map_id, whole.map_id);
    let mut netmap = Netmap::default();
    for k in changes {
        netmap.apply(k).expect("applies");
    }
    let resume = reader.resume_point().expect("a point to resume from");
    drop(stream);

    // While the viewer is away: one node moves, one is deleted.
    let (mover, mover_id) = &nodes[1];
    let mut update = UpdateNodeRequest {
        endpoints: Some(EndpointList {
            endpoints: vec!["192.0.2.9:41641".into()],
        }),
        ..UpdateNodeRequest::default()
    };
    update.proof = Some(sign(mover, &sk, "UpdateNode", &update));
    c.update_node(update).await.expect("endpoints");
    let gone = nodes[2].1;
    admin
        .delete_node(DeleteNodeRequest { id: gone })
        .await
        .expect("delete");

    // Resumed: no full map, a fraction of its bytes, and the two changes.
    let (stream, changes, messages, bytes) =
        start(&mut c, viewer, &sk, Some(resume), &mut reader).await;
    assert!(
        messages
            .iter()
            .all(|m| !matches!(m.kind, Some(Kind::Full(_) | Kind::FullPage(_)))),
        "{messages:?}"
    );
    assert!(
        bytes * 10 < full_bytes,
        "{bytes} bytes resumed, {full_bytes} for the map"
    );
    assert!(changes.iter().any(
        |k| matches!(k, Kind::PeerChanged(n) if n.id == *mover_id && n.endpoints == ["192.0.2.9:41641"])
    ));
    assert!(
        changes
            .iter()
            .any(|k| matches!(k, Kind::PeerRemoved(r) if r.id == gone))
    );
    for k in changes {
        netmap.apply(k).expect("applies");
    }
    let resumed_to = reader.resume_point().expect("a version");
    assert!(resumed_to.1 > resume.1);
    drop(stream);
    // The same map as a fresh one.
    let fresh = whole_map(&mut c, viewer, &sk).await;
    let held: Vec<Node> = netmap.peers().cloned().collect();
    assert_eq!(held, fresh.peers);

    // A version this map never handed out, or another map's: a full map.
    for unknown in [
        (resume.0, resumed_to.1 + 1_000_000),
        (resume.0 ^ 1, resumed_to.1),
    ] {
        let mut reader = MapReader::default();
        let (_stream, changes, messages, _) =
            start(&mut c, viewer, &sk, Some(unknown), &mut reader).await;
        assert!(
            matches!(&messages[0].kind, Some(Kind::Full(_))),
            "{unknown:?}"
        );
        assert!(matches!(&changes[..], [Kind::Full(f)] if f.peers == fresh.peers));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_within_a_tick_go_out_as_one_batch() {
    let server = Server::start().await;
    let mut c = server.control().await;
    let mut admin = server.local_admin().await;
    let sk = server_key(&mut c).await;
    let auth = new_auth_key(&mut admin).await;
    let viewer = NodeSecretKey::generate();
    c.register_node(register_req(&viewer, &sk, &auth, "viewer"))
        .await
        .expect("register");
    let mut reader = MapReader::default();
    let (mut stream, _, _, _) = start(&mut c, &viewer, &sk, None, &mut reader).await;
    // Twenty joins at once: they reach the viewer in far fewer messages, each a batch or a
    // single change, all applied in order.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..20 {
        let (mut c, req) = (
            c.clone(),
            register_req(&NodeSecretKey::generate(), &sk, &auth, &format!("j{i}")),
        );
        calls.spawn(async move { c.register_node(req).await });
    }
    let mut joined = Vec::new();
    while let Some(r) = calls.join_next().await {
        joined.push(
            r.expect("join")
                .expect("register")
                .into_inner()
                .node
                .expect("node")
                .id,
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut messages = 0;
    while seen.len() < joined.len() {
        let m = next(&mut stream).await;
        if matches!(m.kind, Some(Kind::Keepalive(_))) {
            continue;
        }
        messages += 1;
        for k in reader.read(m).expect("well-formed") {
            if let Kind::PeerAdded(n) = k {
                seen.insert(n.id);
            }
        }
    }
    assert!(
        messages < joined.len(),
        "{messages} messages for {} joins",
        joined.len()
    );
}
