//! How control takes connections, over real loopback sockets: the listen backlog, the options
//! of accepted sockets, and the deadline and cap every connection has.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{
    Server, get_node_req, new_auth_key, register_req, server_key, stream_req, wait_until,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use warren_control::listen::Limits;
use warren_proto::NodeSecretKey;
use warren_proto::control::ListUsersRequest;
use warren_proto::control::map_response::Kind;

/// Connects `n` clients at once and returns those connected within `within`.
async fn connect_all(addr: SocketAddr, n: usize, within: Duration) -> Vec<tokio::net::TcpStream> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr)))
        .collect();
    let mut streams = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + within;
    for t in tasks {
        match tokio::time::timeout_at(deadline, t).await {
            Ok(joined) => streams.push(joined.expect("join").expect("connect")),
            Err(_) => break,
        }
    }
    streams
}

#[tokio::test]
async fn listen_backlog_queues_more_than_tokios_default_of_1024() {
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .expect("somaxconn")
        .trim()
        .parse()
        .expect("number");
    assert!(
        somaxconn >= 2048,
        "net.core.somaxconn={somaxconn} caps every backlog below what this test measures"
    );
    let listener = warren_control::listen::bind_tcp(
        "127.0.0.1:0".parse().expect("addr"),
        warren_control::listen::DEFAULT_BACKLOG,
    )
    .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Nobody accepts: every connection must wait in the kernel's accept queue. With a backlog of
    // 1024 the queue holds 1025, and further SYNs are dropped (the connects hang).
    let n = 1100;
    let streams = connect_all(addr, n, Duration::from_secs(20)).await;
    assert_eq!(streams.len(), n, "connections completed without an accept");
    drop(listener);
}

#[tokio::test]
async fn accepted_connections_have_tcp_nodelay_set() {
    let listener = warren_control::listen::bind_tcp(
        "127.0.0.1:0".parse().expect("addr"),
        warren_control::listen::DEFAULT_BACKLOG,
    )
    .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut acceptor = warren_control::listen::Acceptor::new(
        listener,
        Limits::default(),
        Arc::default(),
        Arc::default(),
    );
    let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let accepted = tokio::time::timeout(Duration::from_secs(10), acceptor.next())
        .await
        .expect("accepted in time")
        .expect("stream open")
        .expect("accepted");
    // The server's side of the connection, as tonic gets it.
    assert!(
        accepted.io().nodelay().expect("getsockopt"),
        "TCP_NODELAY on the accepted socket"
    );
}

/// Whether the server closes `stream` within `within` (reading and dropping what it sends).
async fn closed_by_server(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// The HTTP/2 client preface and an empty SETTINGS frame: the handshake, and then nothing.
const H2_PREFACE_AND_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";

#[tokio::test]
async fn a_connection_without_a_request_is_closed_at_the_handshake_deadline() {
    let server = Server::start_with(|c| {
        c.connections.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let mut handshake_only = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    handshake_only
        .write_all(H2_PREFACE_AND_SETTINGS)
        .await
        .expect("preface");
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(10)).await,
        "a connection that sends nothing is closed"
    );
    assert!(
        closed_by_server(&mut handshake_only, Duration::from_secs(10)).await,
        "a connection that only does the HTTP/2 handshake is closed"
    );
    assert_eq!(server.stats.tcp.handshake_timeouts(), 2);
    wait_until("closed connections are off the count", || {
        server.stats.tcp.open() == 0
    })
    .await;
    // A client that asks at once is served.
    let mut c = server.control().await;
    server_key(&mut c).await;
    server.stop().await;
}

#[tokio::test]
async fn over_the_cap_new_connections_are_closed_while_nodes_and_admin_keep_working() {
    let server = Server::start_with(|c| {
        c.connections.max_connections = 3;
        c.connections.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let mut admin = server.local_admin().await;
    let mut node_channel = server.control().await;
    let sk = server_key(&mut node_channel).await;
    let auth = new_auth_key(&mut admin).await;
    let node = NodeSecretKey::generate();
    node_channel
        .register_node(register_req(&node, &sk, &auth, "n"))
        .await
        .expect("register");
    // Two silent connections fill the cap of three.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(
            tokio::net::TcpStream::connect(server.addr)
                .await
                .expect("connect"),
        );
    }
    wait_until("three connections are open", || {
        server.stats.tcp.open() == 3
    })
    .await;
    let mut over = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("the kernel completes the connect");
    assert!(
        closed_by_server(&mut over, Duration::from_secs(5)).await,
        "a connection over the cap is closed"
    );
    assert_eq!(server.stats.tcp.refused(), 1);
    // The node's connection and the admin socket still work.
    let me = node_channel
        .get_node(get_node_req(&node, &sk))
        .await
        .expect("the connected node is served")
        .into_inner();
    assert_eq!(me.node.expect("node").hostname, "n");
    let users = admin
        .list_users(ListUsersRequest {})
        .await
        .expect("the admin socket is served")
        .into_inner();
    assert_eq!(users.users.len(), 1);
    // A place freed is a place for a new connection.
    drop(silent);
    wait_until("the silent connections are off the count", || {
        server.stats.tcp.open() == 1
    })
    .await;
    let mut again = server.control().await;
    server_key(&mut again).await;
    server.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_but_a_map_stream_keeps_its_connection() {
    let server = Server::start_with(|c| {
        c.connections.idle_timeout = Duration::from_millis(300);
        c.keepalive_interval = Duration::from_millis(200);
    })
    .await;
    let mut admin = server.local_admin().await;
    let mut caller = server.control().await;
    let sk = server_key(&mut caller).await;
    let auth = new_auth_key(&mut admin).await;
    let node = NodeSecretKey::generate();
    caller
        .register_node(register_req(&node, &sk, &auth, "n"))
        .await
        .expect("register");
    let mut follower = server.control().await;
    let mut stream = follower
        .stream_map_response(stream_req(&node, &sk))
        .await
        .expect("stream")
        .into_inner();
    // The caller's connection has nothing in flight: it is closed.
    wait_until("the idle caller's connection is closed", || {
        server.stats.tcp.idle_timeouts() == 1
    })
    .await;
    // The stream's connection stays, across many idle timeouts.
    let mut keepalives = 0;
    while keepalives < 8 {
        let m = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("in time")
            .expect("stream alive")
            .expect("message");
        if matches!(m.kind, Some(Kind::Keepalive(_))) {
            keepalives += 1;
        }
    }
    assert_eq!(server.stats.tcp.idle_timeouts(), 1);
    assert_eq!(server.stats.tcp.open(), 1);
    drop(stream);
    server.stop().await;
}
