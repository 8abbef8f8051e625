//! `warren-labtool`: a tiny traffic tool the netns lab runs inside namespaces.
//!
//! ```text
//! warren-labtool tcp-sink  --listen ADDR:PORT [--timeout-secs 60]
//! warren-labtool tcp-send  --to ADDR:PORT --bytes N [--timeout-secs 30]
//! warren-labtool tcp-probe --to ADDR:PORT [--timeout-secs 1]
//! ```
//! `tcp-sink` accepts one connection, reads it to EOF and prints `{"bytes":N,"sha256":"hex"}`;
//! `tcp-send` connects (retrying until the timeout), sends N bytes of the lab's deterministic
//! stream, shuts down its write half and prints the same report for what it sent.
//! `tcp-probe` makes one connection attempt and exits 0 if it succeeded.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use warren_netns_tests::traffic::{PatternStream, TransferReport};

const USAGE: &str = "usage:
  warren-labtool tcp-sink  --listen ADDR:PORT [--timeout-secs 60]
  warren-labtool tcp-send  --to ADDR:PORT --bytes N [--timeout-secs 30]
  warren-labtool tcp-probe --to ADDR:PORT [--timeout-secs 1]";

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
