//! The STUN server over real loopback UDP: bursts, classic (RFC 3489) clients, RFC 5780
//! CHANGE-REQUEST with the alternate port, unknown attributes, and Debian's `stun` client.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use warren_derp::config::Config;
use warren_derp::{Relay, RelayOptions, Running};
use warren_proto::DerpSecretKey;
use warren_proto::stun;

const STEP: Duration = Duration::from_secs(10);

/// A relay with STUN on a loopback port (no DERP clients needed), and a second STUN port when
/// `alt`.
async fn start_with_alt(alt: bool) -> Running {
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        stun_listen: "127.0.0.1:0".parse().expect("addr"),
        stun_alt_listen: alt.then(|| "127.0.0.1:0".parse().expect("addr")),
        ..Config::default()
    };
    warren_derp::start_with(
        &config,
        Relay::new(DerpSecretKey::generate(), RelayOptions::default()),
    )
    .await
    .expect("start")
}

async fn start() -> Running {
    start_with_alt(false).await
}

/// Sends a Binding request (RFC 5389, as netcheck sends it) to `server`; returns where the
/// answer came from and the mapped address it reports.
async fn ask(sock: &UdpSocket, server: SocketAddr, id: stun::TxId) -> (SocketAddr, SocketAddr) {
    let mut req = Vec::new();
    stun::build_request(id, Some(stun::SOFTWARE_TAILNODE), &mut req);
    sock.send_to(&req, server).await.expect("send");
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(STEP, sock.recv_from(&mut buf))
        .await
        .expect("answer in time")
        .expect("recv");
    let (got, mapped) = stun::parse_response(&buf[..n]).expect("a success response");
    assert_eq!(got, id);
    (from, mapped)
}

/// A client socket whose receive buffer holds a whole burst of answers, so only the server
/// can lose them.
async fn big_client_socket() -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let state = quinn_udp::UdpSocketState::new((&sock).into()).expect("state");
    state
        .set_recv_buffer_size((&sock).into(), 8 << 20)
        .expect("rcvbuf");
    sock
}

fn txid(i: u32) -> stun::TxId {
    let mut t = [0xa5; 12];
    t[..4].copy_from_slice(&i.to_be_bytes());
    t
}

/// 2,000 Binding requests sent back to back from one socket are all answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_binding_requests_is_answered_whole() {
    const BURST: u32 = 2_000;
    let running = start().await;
    let server = running.stun_addr.expect("stun runs");
    let sock = std::sync::Arc::new(big_client_socket().await);
    let receiver = {
        let sock = sock.clone();
        tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            let mut buf = [0u8; 1500];
            // Stop when all are in, or when nothing more arrived for a while (lost ones).
            while seen.len() < BURST as usize {
                let Ok(r) = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await
                else {
                    break;
                };
                let n = r.expect("recv");
                let (id, _) = stun::parse_response(&buf[..n]).expect("a success response");
                seen.insert(id);
            }
            seen.len()
        })
    };
    let mut req = Vec::new();
    for i in 0..BURST {
        req.clear();
        stun::build_request(txid(i), Some(stun::SOFTWARE_TAILNODE), &mut req);
        sock.send_to(&req, server).await.expect("send");
    }
    let answered = tokio::time::timeout(STEP, receiver)
        .await
        .expect("counted in time")
        .expect("join");
    assert_eq!(answered, BURST as usize, "answers to a burst of {BURST}");
    running.shutdown().await;
}

/// A second STUN port is reported in `Running` and answered by the same server, each from its
/// own address.
#[tokio::test]
async fn the_second_stun_port_answers_too() {
    let running = start_with_alt(true).await;
    let main = running.stun_addr.expect("stun runs");
    let alt = running.stun_alt_addr.expect("second port runs");
    assert_ne!(main.port(), alt.port());
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let me = sock.local_addr().expect("addr");
    for (i, server) in [main, alt, main, alt].into_iter().enumerate() {
        let (from, mapped) = ask(&sock, server, txid(u32::try_from(i).expect("small"))).await;
        assert_eq!((from, mapped), (server, me));
    }
    // Without the setting there is no second port.
    let plain = start().await;
    assert_eq!(plain.stun_alt_addr, None);
    plain.shutdown().await;
    running.shutdown().await;
}

/// The `warren-derp` binary's `--stun-alt-listen` flag opens the second port.
#[tokio::test]
async fn the_binary_takes_a_second_stun_port_flag() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_warren-derp"))
        .args(["--listen", "127.0.0.1:0", "--stun-listen", "127.0.0.1:0"])
        .args(["--stun-alt-listen", "127.0.0.1:0", "--key-path"])
        .arg(dir.path().join("derp.key"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn warren-derp");
    let log = child.stderr.take().expect("stderr");
    // The first log lines name the bound addresses; read them off the async runtime.
    let listening = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(log)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("DERP relay listening"))
    });
    let line = tokio::time::timeout(STEP, listening).await;
    let line = match line {
        Ok(Ok(Some(line))) => line,
        other => {
            let _ = child.kill();
            panic!("warren-derp did not say where it listens: {other:?}");
        }
    };
    let alt: Option<SocketAddr> = line
        .split("stun_alt=Some(")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .and_then(|a| a.parse().ok());
    let answered = match alt {
        Some(alt) => {
            let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
            let (from, mapped) = ask(&sock, alt, txid(7)).await;
            Some((from == alt, mapped == sock.local_addr().expect("addr")))
        }
        None => None,
    };
    child.kill().expect("kill");
    let _ = child.wait();
    assert_eq!(answered, Some((true, true)), "second port in {line:?}");
}
