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

/// A Binding request with a CHANGE-REQUEST carrying `flags` (0x04 change IP, 0x02 change
/// port), classic (RFC 3489, a 16-byte id) or RFC 5389 (cookie and 12-byte id) as `classic`
/// says, and any further `(type, 4-byte value)` attributes.
fn request_bytes(classic: bool, id: u8, flags: u8, extra: &[(u16, [u8; 4])]) -> Vec<u8> {
    let mut out = vec![
        0x00,
        0x01,
        0x00,
        u8::try_from(8 * (1 + extra.len())).expect("short"),
    ];
    if !classic {
        out.extend_from_slice(&stun::MAGIC_COOKIE);
        out.extend_from_slice(&[id; 12]);
    } else {
        out.extend_from_slice(&[id; 16]);
    }
    out.extend_from_slice(&[0x00, 0x03, 0x00, 0x04, 0, 0, 0, flags]);
    for (ty, value) in extra {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(value);
    }
    out
}

/// Sends `request` to `server`; returns the answer and where it came from.
async fn exchange(sock: &UdpSocket, server: SocketAddr, request: &[u8]) -> (Vec<u8>, SocketAddr) {
    sock.send_to(request, server).await.expect("send");
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(STEP, sock.recv_from(&mut buf))
        .await
        .expect("answer in time")
        .expect("recv");
    (buf[..n].to_vec(), from)
}

/// Classic RFC 3489 Binding requests (no magic cookie), as Debian's `stun` client sends them,
/// are answered with MAPPED-ADDRESS and the 16-byte id echoed.
#[tokio::test]
async fn classic_requests_are_answered_with_mapped_address() {
    let running = start().await;
    let server = running.stun_addr.expect("stun runs");
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let (answer, from) = exchange(&sock, server, &request_bytes(true, 0x31, 0, &[])).await;
    assert_eq!(from, server);
    assert_eq!(
        stun::parse_classic_response(&answer),
        Ok(([0x31; 16], sock.local_addr().expect("addr")))
    );
    running.shutdown().await;
}

/// A comprehension-required attribute the server does not understand gets 420 with
/// UNKNOWN-ATTRIBUTES (RFC 8489 §6.3.1), in both forms; optional ones are ignored.
#[tokio::test]
async fn unknown_required_attributes_get_420() {
    let running = start().await;
    let server = running.stun_addr.expect("stun runs");
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    for classic in [false, true] {
        let req = request_bytes(classic, 5, 0, &[(0x7777, [1; 4]), (0x8fff, [2; 4])]);
        let (answer, _) = exchange(&sock, server, &req).await;
        let (transaction, code, unknown) =
            stun::parse_error_response(&answer).expect("an error response");
        let expected = if classic {
            stun::Transaction::Rfc3489([5; 16])
        } else {
            stun::Transaction::Rfc5389([5; 12])
        };
        assert_eq!(
            (transaction, code, unknown),
            (expected, stun::ERROR_UNKNOWN_ATTRIBUTE, vec![0x7777])
        );
    }
    // Only comprehension-optional extras: answered.
    let req = request_bytes(false, 6, 0, &[(0x8fff, [2; 4])]);
    let (answer, _) = exchange(&sock, server, &req).await;
    assert_eq!(
        stun::parse_response(&answer),
        Ok(([6; 12], sock.local_addr().expect("addr")))
    );
    running.shutdown().await;
}

/// What a CHANGE-REQUEST (RFC 5780) gets, for the classic and the RFC 5389 form:
/// no flag -> an ordinary answer; change IP -> 420 (one address); change port -> the answer
/// comes from the other STUN port, or 420 when there is none.
#[tokio::test]
async fn change_requests_use_the_second_port_and_never_another_ip() {
    const IP: u8 = 0x04;
    const PORT: u8 = 0x02;
    let single = start().await;
    let both = start_with_alt(true).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let me = sock.local_addr().expect("addr");
    let one = single.stun_addr.expect("stun runs");
    let main = both.stun_addr.expect("stun runs");
    let alt = both.stun_alt_addr.expect("second port");
    let refused = |answer: &[u8]| {
        stun::parse_error_response(answer).map(|(_, code, unknown)| (code, unknown))
    };
    let change_refused = Ok((
        stun::ERROR_UNKNOWN_ATTRIBUTE,
        vec![stun::ATTR_CHANGE_REQUEST],
    ));
    for classic in [true, false] {
        let mapped = |answer: &[u8]| {
            if classic {
                stun::parse_classic_response(answer).map(|(_, a)| a)
            } else {
                stun::parse_response(answer).map(|(_, a)| a)
            }
        };
        for (server, flags) in [(one, 0), (main, 0), (alt, 0)] {
            let (answer, from) =
                exchange(&sock, server, &request_bytes(classic, 1, flags, &[])).await;
            assert_eq!(
                (mapped(&answer), from),
                (Ok(me), server),
                "no flags, {classic}"
            );
        }
        for (server, flags) in [
            (one, IP),
            (one, IP | PORT),
            (one, PORT),
            (main, IP),
            (alt, IP | PORT),
        ] {
            let (answer, from) =
                exchange(&sock, server, &request_bytes(classic, 2, flags, &[])).await;
            assert_eq!(
                (refused(&answer), from),
                (change_refused.clone(), server),
                "flags {flags:#x} to {server}, classic {classic}"
            );
        }
        for (server, other) in [(main, alt), (alt, main)] {
            let (answer, from) =
                exchange(&sock, server, &request_bytes(classic, 3, PORT, &[])).await;
            assert_eq!(
                (mapped(&answer), from),
                (Ok(me), other),
                "change port, {classic}"
            );
        }
    }
    single.shutdown().await;
    both.shutdown().await;
}

/// Runs Debian's `stun` client (package `stun-client`) with `args`; returns what it printed
/// (stdout and stderr). Fails, saying so, when the binary is not installed: this test must
/// not pass without it.
async fn stun_client(args: &[String]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).expect("create");
    let err = out.try_clone().expect("clone");
    let spawned = std::process::Command::new("stun")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "Debian's `stun` client is not installed (apt-get install -y stun-client); \
             this interoperability test needs it"
        ),
        Err(e) => panic!("cannot run `stun`: {e}"),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`stun {}` did not finish in time", args.join(" "));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::read_to_string(&out_path).expect("read output")
}

/// A UDP port free right now for the client's source port: `stun -p P` binds P and P + 1 on
/// every address, so both must be free there.
fn free_udp_port() -> u16 {
    for _ in 0..100 {
        let a = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        let port = a.local_addr().expect("addr").port();
        if port < u16::MAX && std::net::UdpSocket::bind(("0.0.0.0", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two adjacent free UDP ports in 100 tries");
}

/// Debian's `stun` client (RFC 3489, classic requests with CHANGE-REQUEST) gets its mapped
/// address from the server, and its NAT type test completes: on loopback, "Open".
#[tokio::test]
async fn debian_stun_client_interoperates() {
    let running = start_with_alt(true).await;
    let server = running.stun_addr.expect("stun runs");
    let src = free_udp_port();
    let args = [
        server.to_string(),
        "1".into(),
        "-v".into(),
        "-p".into(),
        src.to_string(),
    ];
    let text = stun_client(&args).await;
    assert!(
        text.contains(&format!("MappedAddress = 127.0.0.1:{src}")),
        "test I by `stun {}`:\n{text}",
        args.join(" ")
    );
    assert!(
        text.contains(&format!("SourceAddress = {server}")),
        "test I by `stun {}`:\n{text}",
        args.join(" ")
    );
    let src = free_udp_port();
    let args = [server.to_string(), "-p".into(), src.to_string()];
    let text = stun_client(&args).await;
    assert!(
        text.contains("Primary: Open"),
        "NAT type test by `stun {}`:\n{text}",
        args.join(" ")
    );
    running.shutdown().await;
}
