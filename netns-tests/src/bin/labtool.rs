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
//! warren-labtool dns-serve  --listen ADDR:PORT --record NAME=IP [--record NAME=IP ...]
//! warren-labtool dns-query  --server IP[:PORT] --name NAME [--type A|AAAA|PTR|TXT|...] [--timeout-ms 2000]
//! warren-labtool dns-load   --server IP[:PORT] --name NAME [--rate 1000] [--seconds 5]
//! warren-labtool http-serve --listen ADDR:PORT --body TEXT
//! warren-labtool http-get   --url http://IP:PORT/PATH [--timeout-ms 2000]
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
//! `dns-serve` is a tiny authoritative UDP DNS server: A/AAAA for its records (a name with
//! records of the other family only gets an empty NOERROR), NXDOMAIN for every other name; it
//! prints `ready` once bound. `dns-query` sends one query (a PTR query may name an IP address)
//! and prints `{"rcode":"NOERROR","answers":[{"name","type","ttl","data"}],"ms":N}`, with rcode
//! `timeout` or `unreachable` when no answer came (exit 0 for each).
//! `dns-load` sends queries at a fixed rate for a while from one socket and prints
//! `{"sent","answered","lost","errors","p50_ms","p99_ms","max_ms"}` (errors: answers whose
//! rcode is not NOERROR; lost: no answer within a second of the last query).
//! `http-serve` answers every HTTP/1.1 request with `200 OK` and the body, forever, after
//! printing `ready`. `http-get` makes one GET and prints the status code on the first line and
//! the body after it, or `refused`, `unreachable` or `timeout` (exit 0 for each).
//! `warren_netns_tests::services` drives all of them.
//! `reap` removes the labs of test processes that died without cleaning up: their processes,
//! namespaces and `/etc/netns/NS` directories (scripts/test runs it after the tests; labs of
//! live test processes are left alone).
//! The UDP commands observe NATs; `warren_netns_tests::udp` documents their output and drives
//! them.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
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
  warren-labtool dns-serve  --listen ADDR:PORT --record NAME=IP [--record NAME=IP ...]
  warren-labtool dns-query  --server IP[:PORT] --name NAME [--type A|AAAA|PTR] [--timeout-ms 2000]
  warren-labtool dns-load   --server IP[:PORT] --name NAME [--rate 1000] [--seconds 5]
  warren-labtool http-serve --listen ADDR:PORT --body TEXT
  warren-labtool http-get   --url http://IP:PORT/PATH [--timeout-ms 2000]
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
        "dns-serve" => {
            let flags = Flags::parse(rest, &["listen", "record"])?;
            let records = flags
                .all("record")
                .iter()
                .map(|r| parse_record(r))
                .collect::<Result<Vec<_>>>()?;
            dns::serve(flags.addr("listen")?, &records)
        }
        "dns-query" => {
            let flags = Flags::parse(rest, &["server", "name", "type", "timeout-ms"])?;
            dns::query(
                dns_server(flags.required("server")?)?,
                flags.required("name")?,
                flags.get("type").unwrap_or("A"),
                flags.millis(2000)?,
            )
        }
        "dns-load" => {
            let flags = Flags::parse(rest, &["server", "name", "type", "rate", "seconds"])?;
            dns::load(
                dns_server(flags.required("server")?)?,
                flags.required("name")?,
                flags.get("type").unwrap_or("A"),
                flags.number("rate", Some(1000))?,
                flags.number("seconds", Some(5))?,
            )
        }
        "http-serve" => {
            let flags = Flags::parse(rest, &["listen", "body"])?;
            http_serve(flags.addr("listen")?, flags.required("body")?)
        }
        "http-get" => {
            let flags = Flags::parse(rest, &["url", "timeout-ms"])?;
            http_get(flags.required("url")?, flags.millis(2000)?)
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

/// `NAME=IP` of `dns-serve --record`.
fn parse_record(text: &str) -> Result<(String, IpAddr)> {
    let (name, ip) = text
        .split_once('=')
        .with_context(|| format!("--record {text:?} is not NAME=IP"))?;
    let ip: IpAddr = ip
        .parse()
        .with_context(|| format!("--record {text:?}: {ip:?} is not an IP address"))?;
    Ok((dns::normalize(name), ip))
}

/// `IP` (port 53) or `IP:PORT`.
fn dns_server(text: &str) -> Result<SocketAddr> {
    if let Ok(sa) = text.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let ip: IpAddr = text
        .parse()
        .with_context(|| format!("--server {text:?} is neither IP nor IP:PORT"))?;
    Ok(SocketAddr::new(ip, 53))
}

/// The labtool's DNS: an authoritative toy server, a one-shot query and a fixed-rate load,
/// all with hickory-proto's message types.
mod dns {
    use std::collections::BTreeMap;
    use std::io::ErrorKind;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
    use std::str::FromStr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::thread;
    use std::time::{Duration, Instant};

    use anyhow::{Context, Result, bail};
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, AAAA};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    use super::{READY_LINE, transient};

    /// Lower case, no trailing dot.
    pub(crate) fn normalize(name: &str) -> String {
        name.trim_end_matches('.').to_ascii_lowercase()
    }

    /// Answers every query on `listen` from `records`, forever.
    pub(crate) fn serve(listen: SocketAddr, records: &[(String, IpAddr)]) -> Result<()> {
        let sock = UdpSocket::bind(listen).with_context(|| format!("bind {listen}"))?;
        println!("{READY_LINE}");
        let mut buf = [0u8; 4096];
        loop {
            let (n, src) = match sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if transient(&e) => continue,
                Err(e) => return Err(e).context("receive"),
            };
            let Ok(request) = Message::from_vec(&buf[..n]) else {
                // Not DNS: answer FORMERR when at least an id is there.
                if n >= 2 {
                    let id = u16::from_be_bytes([buf[0], buf[1]]);
                    let reply = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
                    if let Ok(bytes) = reply.to_vec() {
                        let _ = sock.send_to(&bytes, src);
                    }
                }
                continue;
            };
            let reply = answer(&request, records);
            match reply.to_vec() {
                Ok(bytes) => {
                    // A failed reply (no route back) is the client's problem.
                    let _ = sock.send_to(&bytes, src);
                }
                Err(e) => eprintln!("cannot encode the reply to {src}: {e}"),
            }
        }
    }

    fn answer(request: &Message, records: &[(String, IpAddr)]) -> Message {
        let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
        reply.metadata.authoritative = true;
        reply.metadata.recursion_desired = request.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        let Some(query) = request.queries.first() else {
            reply.metadata.response_code = ResponseCode::FormErr;
            return reply;
        };
        reply.add_query(query.clone());
        let wanted = normalize(&query.name().to_ascii());
        let mine: Vec<IpAddr> = records
            .iter()
            .filter(|(name, _)| *name == wanted)
            .map(|&(_, ip)| ip)
            .collect();
        if mine.is_empty() {
            reply.metadata.response_code = ResponseCode::NXDomain;
            return reply;
        }
        for ip in mine {
            let data = match (query.query_type(), ip) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(query.name().clone(), 30, data));
        }
        reply
    }

    fn rcode_text(code: ResponseCode) -> String {
        match code {
            ResponseCode::NoError => "NOERROR".to_owned(),
            ResponseCode::FormErr => "FORMERR".to_owned(),
            ResponseCode::ServFail => "SERVFAIL".to_owned(),
            ResponseCode::NXDomain => "NXDOMAIN".to_owned(),
            ResponseCode::NotImp => "NOTIMP".to_owned(),
            ResponseCode::Refused => "REFUSED".to_owned(),
            other => format!("RCODE{}", u16::from(other)),
        }
    }

    /// The query message for `name` of `qtype` (a PTR query may name an IP address).
    fn build_query(id: u16, name: &str, qtype: &str) -> Result<Message> {
        let rtype = RecordType::from_str(&qtype.to_ascii_uppercase())
            .map_err(|e| anyhow::anyhow!("--type {qtype:?}: {e}"))?;
        let qname = match (rtype, name.parse::<IpAddr>()) {
            (RecordType::PTR, Ok(ip)) => Name::from(ip),
            _ => {
                let mut n =
                    Name::from_ascii(name).map_err(|e| anyhow::anyhow!("--name {name:?}: {e}"))?;
                n.set_fqdn(true);
                n
            }
        };
        let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(qname, rtype));
        Ok(msg)
    }

    fn socket_for(server: SocketAddr) -> Result<UdpSocket> {
        let bind: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        UdpSocket::bind(bind).with_context(|| format!("bind {bind}"))
    }

    /// One query; prints the JSON outcome.
    pub(crate) fn query(
        server: SocketAddr,
        name: &str,
        qtype: &str,
        timeout: Duration,
    ) -> Result<()> {
        let id = u16::try_from(std::process::id() & 0xffff).unwrap_or(1);
        let msg = build_query(id, name, qtype)?;
        let bytes = msg.to_vec().context("encode the query")?;
        let sock = socket_for(server)?;
        let start = Instant::now();
        let outcome = |rcode: &str| {
            println!(
                "{}",
                serde_json::json!({"rcode": rcode, "answers": [], "ms": start.elapsed().as_millis() as u64})
            );
        };
        if let Err(e) = sock.send_to(&bytes, server) {
            if matches!(
                e.kind(),
                ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable
            ) {
                outcome("unreachable");
                return Ok(());
            }
            return Err(e).with_context(|| format!("send to {server}"));
        }
        let mut buf = [0u8; 65535];
        loop {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                outcome("timeout");
                return Ok(());
            }
            sock.set_read_timeout(Some(left))?;
            let (n, src) = match sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::NetworkUnreachable | ErrorKind::HostUnreachable
                    ) =>
                {
                    outcome("unreachable");
                    return Ok(());
                }
                Err(e) if transient(&e) => continue,
                Err(e) => return Err(e).context("receive"),
            };
            if src != server || n < 2 || u16::from_be_bytes([buf[0], buf[1]]) != id {
                continue;
            }
            let reply = Message::from_vec(&buf[..n])
                .map_err(|e| anyhow::anyhow!("undecodable answer from {server}: {e}"))?;
            let answers: Vec<serde_json::Value> = reply
                .answers
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "name": r.name.to_ascii(),
                        "type": r.record_type().to_string(),
                        "ttl": r.ttl,
                        "data": r.data.to_string(),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "rcode": rcode_text(reply.metadata.response_code),
                    "answers": answers,
                    "ms": start.elapsed().as_millis() as u64,
                })
            );
            return Ok(());
        }
    }

    /// `rate` queries a second for `seconds` from one socket; prints the latency summary.
    pub(crate) fn load(
        server: SocketAddr,
        name: &str,
        qtype: &str,
        rate: u64,
        seconds: u64,
    ) -> Result<()> {
        let total = rate.saturating_mul(seconds);
        if rate == 0 || total == 0 || total > 65_536 {
            bail!("--rate x --seconds must be 1..=65536 (one query per DNS id), not {total}");
        }
        let total = usize::try_from(total)?;
        let template = build_query(0, name, qtype)?
            .to_vec()
            .context("encode the query")?;
        let sock = Arc::new(socket_for(server)?);
        sock.connect(server)
            .with_context(|| format!("connect to {server}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        // Per id: when it was sent and how long its answer took, in ns (+1, so 0 = none).
        let sent_at: Arc<Vec<AtomicU64>> =
            Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
        let took: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
        let errors = Arc::new(AtomicU64::new(0));
        let done_sending = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let receiver = {
            let (sock, sent_at, took, errors, done) = (
                Arc::clone(&sock),
                Arc::clone(&sent_at),
                Arc::clone(&took),
                Arc::clone(&errors),
                Arc::clone(&done_sending),
            );
            thread::spawn(move || -> Result<()> {
                let mut buf = [0u8; 4096];
                let mut done_at: Option<Instant> = None;
                loop {
                    if done.load(Ordering::Acquire) {
                        let at = *done_at.get_or_insert_with(Instant::now);
                        let all = took.iter().all(|t| t.load(Ordering::Relaxed) != 0);
                        if all || at.elapsed() >= Duration::from_secs(1) {
                            return Ok(());
                        }
                    }
                    match sock.recv(&mut buf) {
                        Ok(n) if n >= 4 => {
                            let now = start.elapsed().as_nanos() as u64 + 1;
                            let id = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                            let Some(sent) = sent_at.get(id).map(|s| s.load(Ordering::Acquire))
                            else {
                                continue;
                            };
                            if sent == 0 || took[id].load(Ordering::Relaxed) != 0 {
                                continue;
                            }
                            took[id].store(now.saturating_sub(sent).max(1), Ordering::Relaxed);
                            if buf[3] & 0x0f != 0 {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(_) => {}
                        Err(e) if transient(&e) => {}
                        Err(e) => return Err(e).context("receive"),
                    }
                }
            })
        };
        let interval = Duration::from_secs(1).as_nanos() as u64 / rate;
        let mut packet = template.clone();
        let mut send_errors = 0u64;
        for i in 0..total {
            let due = Duration::from_nanos(interval * i as u64);
            let now = start.elapsed();
            if due > now {
                thread::sleep(due - now);
            }
            let id = u16::try_from(i).unwrap_or(u16::MAX);
            packet[..2].copy_from_slice(&id.to_be_bytes());
            sent_at[i].store(start.elapsed().as_nanos() as u64 + 1, Ordering::Release);
            if sock.send(&packet).is_err() {
                send_errors += 1;
            }
        }
        done_sending.store(true, Ordering::Release);
        match receiver.join() {
            Ok(r) => r?,
            Err(_) => bail!("the receive thread panicked"),
        }
        let mut lat: Vec<u64> = took
            .iter()
            .map(|t| t.load(Ordering::Relaxed))
            .filter(|&t| t != 0)
            .collect();
        lat.sort_unstable();
        let pct = |p: f64| -> Option<f64> {
            if lat.is_empty() {
                return None;
            }
            let idx = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            Some(lat[idx] as f64 / 1e6)
        };
        let answered = lat.len();
        let mut summary = BTreeMap::new();
        summary.insert("sent", serde_json::json!(total));
        summary.insert("send_errors", serde_json::json!(send_errors));
        summary.insert("answered", serde_json::json!(answered));
        summary.insert("lost", serde_json::json!(total - answered));
        summary.insert("errors", serde_json::json!(errors.load(Ordering::Relaxed)));
        summary.insert("rate", serde_json::json!(rate));
        summary.insert("seconds", serde_json::json!(seconds));
        summary.insert("p50_ms", serde_json::json!(pct(0.50)));
        summary.insert("p99_ms", serde_json::json!(pct(0.99)));
        summary.insert("max_ms", serde_json::json!(pct(1.0)));
        println!("{}", serde_json::to_string(&summary)?);
        Ok(())
    }
}

/// Answers every HTTP request on `listen` with `200 OK` and `body`, forever.
fn http_serve(listen: SocketAddr, body: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    println!("{READY_LINE}");
    let body = body.to_owned();
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if transient(&e) || e.kind() == ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e).context("accept"),
        };
        let body = body.clone();
        thread::spawn(move || {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(reply.as_bytes());
            let _ = stream.shutdown(Shutdown::Both);
        });
    }
}

/// One GET of `url` (`http://IP:PORT/PATH`); prints the status code and the body, or
/// `refused`, `unreachable` or `timeout`.
fn http_get(url: &str, timeout: Duration) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("--url {url:?} is not http://IP:PORT/PATH"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let to: SocketAddr = hostport
        .parse()
        .or_else(|_| hostport.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 80)))
        .with_context(|| format!("--url {url:?}: {hostport:?} is not IP[:PORT]"))?;
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
    stream.set_write_timeout(Some(left))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .with_context(|| format!("send the request to {to}"))?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                println!("timeout");
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset && reply.is_empty() => {
                println!("refused");
                return Ok(());
            }
            Err(e) => return Err(e).with_context(|| format!("read the reply from {to}")),
        }
    }
    let text = String::from_utf8_lossy(&reply);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{to} sent no complete HTTP head: {text:?}"))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .with_context(|| format!("{to} sent no status line: {head:?}"))?;
    println!("{status}\n{body}");
    Ok(())
}
