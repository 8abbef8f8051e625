//! `warren-labtool`: a tiny traffic tool the netns lab runs inside namespaces.
//!
//! ```text
//! warren-labtool tcp-sink  --listen ADDR:PORT [--timeout-secs 60]
//! warren-labtool tcp-send  --to ADDR:PORT --bytes N [--timeout-secs 30]
//! warren-labtool tcp-probe --to ADDR:PORT [--timeout-secs 1]
//! warren-labtool tcp-serve   --listen ADDR:PORT [--listen ADDR:PORT ...]
//! warren-labtool tcp-connect --to ADDR:PORT [--timeout-ms 2000]
//! warren-labtool udp-echo        --listen ADDR:PORT [--listen ADDR:PORT ...]
//! warren-labtool udp-probe       --from-port P --to ADDR:PORT [--to ...] [--timeout-ms 1000]
//! warren-labtool udp-listen-once --port P [--timeout-ms 1000] [--send-to ADDR:PORT]
//! warren-labtool udp-send        --from ADDR:PORT --to ADDR:PORT [--count 1]
//! warren-labtool nat-rules       --kind KIND --wan IP --host IP [--host IP ...] [--hairpin yes]
//! warren-labtool reap
//! ```
//! `tcp-sink` accepts one connection, reads it to EOF and prints `{"bytes":N,"sha256":"hex"}`;
//! `tcp-send` connects (retrying until the timeout), sends N bytes of the lab's deterministic
//! stream, shuts down its write half and prints the same report for what it sent.
//! `tcp-probe` makes one connection attempt and exits 0 if it succeeded.
//! `tcp-serve` binds every address, prints `ready`, then answers each connection with the line
//! `hello from PORT` and closes it, forever. `tcp-connect` makes one connection attempt and
//! prints its outcome, exiting 0 for each: `connected LINE` (the first line the server sent),
//! `refused`, `unreachable` or `timeout` (`warren_netns_tests::tcp` drives both).
//! `nat-rules` prints the nft file a NAT router of KIND (cone, restr, portr, sym, noudp) loads
//! with `nft -f` (scripts/demo uses it; the lab itself calls the same code).
//! `reap` removes the labs of test processes that died without cleaning up (scripts/test runs
//! it after the tests; labs of live test processes are left alone).
//! The UDP commands observe NATs; `warren_netns_tests::udp` documents their output and drives
//! them.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use warren_netns_tests::traffic::{PatternStream, TransferReport};
use warren_netns_tests::udp::READY_LINE;

const USAGE: &str = "usage:
  warren-labtool tcp-sink  --listen ADDR:PORT [--timeout-secs 60]
  warren-labtool tcp-send  --to ADDR:PORT --bytes N [--timeout-secs 30]
  warren-labtool tcp-probe --to ADDR:PORT [--timeout-secs 1]
  warren-labtool tcp-serve   --listen ADDR:PORT [--listen ADDR:PORT ...]
  warren-labtool tcp-connect --to ADDR:PORT [--timeout-ms 2000]
  warren-labtool udp-echo        --listen ADDR:PORT [--listen ADDR:PORT ...]
  warren-labtool udp-probe       --from-port P --to ADDR:PORT [--to ...] [--timeout-ms 1000]
  warren-labtool udp-listen-once --port P [--timeout-ms 1000] [--send-to ADDR:PORT]
  warren-labtool udp-send        --from ADDR:PORT --to ADDR:PORT [--count 1]
  warren-labtool nat-rules       --kind KIND --wan IP --host IP [--host IP ...] [--hairpin yes]
  warren-labtool reap";

const CHUNK: usize = 64 * 1024;

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-labtool: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Parsed `--flag value` pairs.
struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(args: &[String], allowed: &[&str]) -> Result<Self> {
        let mut out = Vec::new();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let name = flag
                .strip_prefix("--")
                .with_context(|| format!("unexpected argument {flag:?}\n{USAGE}"))?;
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => (
                    name.to_owned(),
                    it.next()
                        .with_context(|| format!("--{name} needs a value"))?
                        .clone(),
                ),
            };
            if !allowed.contains(&name.as_str()) {
                bail!("unknown flag --{name}\n{USAGE}");
            }
            out.push((name, value));
        }
        Ok(Self(out))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn required(&self, name: &str) -> Result<&str> {
        self.get(name)
            .with_context(|| format!("--{name} is required\n{USAGE}"))
    }

    fn addr(&self, name: &str) -> Result<SocketAddr> {
        let v = self.required(name)?;
        v.parse()
            .with_context(|| format!("--{name} {v:?} is not an ADDR:PORT"))
    }

    /// Every value of `--name`, in order.
    fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Every `--name ADDR:PORT`, in order (at least one).
    fn addrs(&self, name: &str) -> Result<Vec<SocketAddr>> {
        let all: Vec<SocketAddr> = self
            .0
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| {
                v.parse()
                    .with_context(|| format!("--{name} {v:?} is not an ADDR:PORT"))
            })
            .collect::<Result<_>>()?;
        if all.is_empty() {
            bail!("--{name} is required\n{USAGE}");
        }
        Ok(all)
    }

    fn number<T: std::str::FromStr>(&self, name: &str, default: Option<T>) -> Result<T> {
        match (self.get(name), default) {
            (Some(v), _) => v
                .parse()
                .map_err(|_| anyhow::anyhow!("--{name} {v:?} is not a valid number")),
            (None, Some(d)) => Ok(d),
            (None, None) => bail!("--{name} is required\n{USAGE}"),
        }
    }

    fn millis(&self, default: u64) -> Result<Duration> {
        Ok(Duration::from_millis(
            self.number("timeout-ms", Some(default))?,
        ))
    }

    fn secs(&self, default: u64) -> Result<Duration> {
        match self.get("timeout-secs") {
            None => Ok(Duration::from_secs(default)),
            Some(v) => {
                Ok(Duration::from_secs(v.parse().with_context(|| {
                    format!("--timeout-secs {v:?} is not a number")
                })?))
            }
        }
    }
}

fn run(args: Vec<String>) -> Result<()> {
    let (cmd, rest) = args.split_first().with_context(|| USAGE.to_owned())?;
    match cmd.as_str() {
        "tcp-sink" => {
            let flags = Flags::parse(rest, &["listen", "timeout-secs"])?;
            tcp_sink(flags.addr("listen")?, flags.secs(60)?)
        }
        "tcp-send" => {
            let flags = Flags::parse(rest, &["to", "bytes", "timeout-secs"])?;
            let bytes = flags.required("bytes")?;
            let bytes: u64 = bytes
                .parse()
                .with_context(|| format!("--bytes {bytes:?} is not a number"))?;
            tcp_send(flags.addr("to")?, bytes, flags.secs(30)?)
        }
        "tcp-probe" => {
            let flags = Flags::parse(rest, &["to", "timeout-secs"])?;
            let to = flags.addr("to")?;
            TcpStream::connect_timeout(&to, flags.secs(1)?.max(Duration::from_millis(100)))
                .with_context(|| format!("connect to {to}"))?;
            Ok(())
        }
        "tcp-serve" => {
            let flags = Flags::parse(rest, &["listen"])?;
            tcp_serve(&flags.addrs("listen")?)
        }
        "tcp-connect" => {
            let flags = Flags::parse(rest, &["to", "timeout-ms"])?;
            tcp_connect(flags.addr("to")?, flags.millis(2000)?)
        }
        "udp-echo" => {
            let flags = Flags::parse(rest, &["listen"])?;
            udp_echo(&flags.addrs("listen")?)
        }
        "udp-probe" => {
            let flags = Flags::parse(rest, &["from-port", "to", "timeout-ms"])?;
            udp_probe(
                flags.number("from-port", None)?,
                &flags.addrs("to")?,
                flags.millis(1000)?,
            )
        }
        "udp-listen-once" => {
            let flags = Flags::parse(rest, &["port", "timeout-ms", "send-to"])?;
            let send_to = match flags.get("send-to") {
                Some(_) => Some(flags.addr("send-to")?),
                None => None,
            };
            udp_listen_once(flags.number("port", None)?, flags.millis(1000)?, send_to)
        }
        "udp-send" => {
            let flags = Flags::parse(rest, &["from", "to", "count"])?;
            udp_send(
                flags.addr("from")?,
                flags.addr("to")?,
                flags.number("count", Some(1))?,
            )
        }
        "reap" => {
            Flags::parse(rest, &[])?;
            warren_netns_tests::lab::reap_dead_labs();
            Ok(())
        }
        "nat-rules" => {
            let flags = Flags::parse(rest, &["kind", "wan", "host", "hairpin"])?;
            let kind = warren_netns_tests::nat::parse_kind(flags.required("kind")?)?;
            let wan: Ipv4Addr = flags
                .required("wan")?
                .parse()
                .context("--wan is not an IPv4 address")?;
            let hosts = flags
                .all("host")
                .iter()
                .map(|h| {
                    h.parse()
                        .with_context(|| format!("--host {h:?} is not IPv4"))
                })
                .collect::<Result<Vec<Ipv4Addr>>>()?;
            let hairpin = flags.get("hairpin").is_some_and(|v| v == "yes");
            print!(
                "{}",
                warren_netns_tests::nat::router_nft_file(kind, hairpin, wan, &hosts)?
            );
            Ok(())
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// Accepts one connection, reads it to EOF, prints the report. `idle` bounds each read, so a
/// stalled transfer ends with an error instead of hanging.
fn tcp_sink(listen: SocketAddr, idle: Duration) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    let (mut stream, _peer) = listener.accept().context("accept")?;
    stream.set_read_timeout(Some(idle))?;
    let mut hasher = Sha256::new();
    let mut total: u64 = 0;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("read after {total} bytes")),
        }
    }
    println!("{}", TransferReport::new(total, hasher).to_json());
    Ok(())
}

/// Connects (retrying until `timeout`), sends `bytes` bytes of the pattern, prints the report.
fn tcp_send(to: SocketAddr, bytes: u64, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut stream = loop {
        let left = timeout.saturating_sub(start.elapsed());
        match TcpStream::connect_timeout(
            &to,
            left.clamp(Duration::from_millis(100), Duration::from_secs(2)),
        ) {
            Ok(s) => break s,
            Err(e) if start.elapsed() >= timeout => {
                return Err(e).with_context(|| format!("connect to {to} for {timeout:?}"));
            }
            // A refused connection returns at once: back off briefly before retrying.
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    };
    stream.set_write_timeout(Some(timeout))?;
    let mut pattern = PatternStream::new();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        pattern.fill(&mut buf[..n]);
        stream
            .write_all(&buf[..n])
            .with_context(|| format!("write after {} bytes", bytes - left))?;
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    stream.flush()?;
    stream.shutdown(Shutdown::Write).context("shutdown write")?;
    // Wait for the sink to close its side, so "sent" means "the sink has read everything".
    stream.set_read_timeout(Some(timeout))?;
    let mut rest = [0u8; 1];
    while matches!(stream.read(&mut rest), Ok(n) if n > 0) {}
    println!("{}", TransferReport::new(bytes, hasher).to_json());
    Ok(())
}

/// Binds every address, prints the ready line, then answers each connection with `hello from
/// PORT\n` and closes it, forever.
fn tcp_serve(listen: &[SocketAddr]) -> Result<()> {
    let listeners = listen
        .iter()
        .map(|a| TcpListener::bind(a).with_context(|| format!("bind {a}")))
        .collect::<Result<Vec<_>>>()?;
    println!("{READY_LINE}");
    thread::scope(|scope| {
        let workers: Vec<_> = listeners
            .iter()
            .map(|listener| {
                scope.spawn(move || -> Result<()> {
                    let port = listener.local_addr()?.port();
                    loop {
                        match listener.accept() {
                            Ok((mut stream, _)) => {
                                // The client may have gone already: its problem, not ours.
                                let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
                                let _ = stream.write_all(format!("hello from {port}\n").as_bytes());
                                let _ = stream.shutdown(Shutdown::Both);
                            }
                            Err(e) if transient(&e) || e.kind() == ErrorKind::ConnectionAborted => {
                            }
                            Err(e) => return Err(e).context("accept"),
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            match w.join() {
                Ok(r) => r?,
                Err(_) => bail!("a serve thread panicked"),
            }
        }
        Ok(())
    })
}

/// One connection attempt to `to` within `timeout`; prints `connected LINE` with the first line
/// the server sent, or `refused`, `unreachable` or `timeout`.
fn tcp_connect(to: SocketAddr, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&to, timeout.max(Duration::from_millis(10))) {
        Ok(s) => s,
        Err(e) => {
            let outcome = match e.kind() {
                ErrorKind::ConnectionRefused => "refused",
                ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => "unreachable",
                ErrorKind::TimedOut | ErrorKind::WouldBlock => "timeout",
                _ => return Err(e).with_context(|| format!("connect to {to}")),
            };
            println!("{outcome}");
            return Ok(());
        }
    };
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_millis(500));
    stream.set_read_timeout(Some(left))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(e).with_context(|| format!("read the greeting from {to}"));
            }
        }
    }
    println!("connected {}", String::from_utf8_lossy(&line));
    Ok(())
}

/// Largest datagram the UDP commands read.
const DATAGRAM: usize = 2048;

/// Binds every address, prints the ready line, then answers each datagram with its source
/// address as text (`ip:port`), forever.
fn udp_echo(listen: &[SocketAddr]) -> Result<()> {
    let sockets = listen
        .iter()
        .map(|a| UdpSocket::bind(a).with_context(|| format!("bind {a}")))
        .collect::<Result<Vec<_>>>()?;
    println!("{READY_LINE}");
    thread::scope(|scope| {
        let workers: Vec<_> = sockets
            .iter()
            .map(|sock| {
                scope.spawn(move || -> Result<()> {
                    let mut buf = [0u8; DATAGRAM];
                    loop {
                        match sock.recv_from(&mut buf) {
                            Ok((_, src)) => {
                                // A failed reply (e.g. no route back) is the probe's problem.
                                let _ = sock.send_to(src.to_string().as_bytes(), src);
                            }
                            Err(e) if transient(&e) => {}
                            Err(e) => return Err(e).context("receive"),
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            match w.join() {
                Ok(r) => r?,
                Err(_) => bail!("an echo thread panicked"),
            }
        }
        Ok(())
    })
}

/// Errors a UDP socket may report that say nothing about the socket itself: an ICMP error from
/// an earlier send, an interrupted call, a read timeout.
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock
            | ErrorKind::TimedOut
    )
}

/// From one socket bound to `0.0.0.0:from_port`, asks each echo server in `targets` what source
/// address it sees, resending every quarter of `timeout`. Prints `TARGET MAPPED` or
/// `TARGET timeout` per target.
fn udp_probe(from_port: u16, targets: &[SocketAddr], timeout: Duration) -> Result<()> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, from_port))
        .with_context(|| format!("bind 0.0.0.0:{from_port}"))?;
    let resend = (timeout / 4).max(Duration::from_millis(50));
    let mut buf = [0u8; DATAGRAM];
    for &target in targets {
        let deadline = Instant::now() + timeout;
        let mut next_send = Instant::now();
        let mut seen: Option<String> = None;
        while seen.is_none() {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if now >= next_send {
                sock.send_to(b"warren-labtool probe", target)
                    .with_context(|| format!("send to {target}"))?;
                next_send = now + resend;
            }
            let wait = next_send.min(deadline).saturating_duration_since(now);
            sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            match sock.recv_from(&mut buf) {
                // Late answers from an earlier target are not about this one.
                Ok((n, src)) if src == target => {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    text.parse::<SocketAddr>()
                        .with_context(|| format!("{target} answered {text:?}, not an ADDR:PORT"))?;
                    seen = Some(text);
                }
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(e) => return Err(e).context("receive"),
            }
        }
        println!("{target} {}", seen.as_deref().unwrap_or("timeout"));
    }
    Ok(())
}

/// Binds `0.0.0.0:port`, prints the ready line, sends one datagram to `send_to` if given, then
/// prints `from SRC` for the first datagram to arrive within `timeout`, or `timeout`.
fn udp_listen_once(port: u16, timeout: Duration, send_to: Option<SocketAddr>) -> Result<()> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("bind 0.0.0.0:{port}"))?;
    println!("{READY_LINE}");
    if let Some(to) = send_to {
        sock.send_to(b"warren-labtool listen", to)
            .with_context(|| format!("send to {to}"))?;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; DATAGRAM];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            println!("timeout");
            return Ok(());
        }
        sock.set_read_timeout(Some(left))?;
        match sock.recv_from(&mut buf) {
            Ok((_, src)) => {
                println!("from {src}");
                return Ok(());
            }
            Err(e) if transient(&e) => {}
            Err(e) => return Err(e).context("receive"),
        }
    }
}

/// Sends `count` datagrams from a socket bound to `from` to `to`.
fn udp_send(from: SocketAddr, to: SocketAddr, count: u32) -> Result<()> {
    let sock = UdpSocket::bind(from).with_context(|| format!("bind {from}"))?;
    for _ in 0..count {
        sock.send_to(b"warren-labtool send", to)
            .with_context(|| format!("send to {to}"))?;
    }
    Ok(())
}
