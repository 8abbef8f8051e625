//! How control takes connections, over real loopback sockets: the listen backlog and the
//! options of accepted sockets.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_stream::StreamExt;

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
    let mut acceptor = warren_control::listen::Acceptor::new(listener);
    let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let accepted = tokio::time::timeout(Duration::from_secs(10), acceptor.next())
        .await
        .expect("accepted in time")
        .expect("stream open")
        .expect("accepted");
    // The server's side of the connection, as tonic gets it.
    assert!(
        accepted.nodelay().expect("getsockopt"),
        "TCP_NODELAY on the accepted socket"
    );
}
