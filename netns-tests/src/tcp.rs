//! Checking whether TCP connections get through, with the labtool's `tcp-serve` and
//! `tcp-connect`:
//!
//! ```text
//! warren-labtool tcp-serve   --listen ADDR:PORT [--listen ADDR:PORT …]
//! warren-labtool tcp-connect --to ADDR:PORT [--timeout-ms 2000]
//! ```
//! `tcp-serve` prints `ready` once bound, then answers every connection with `hello from PORT`
//! and closes it. `tcp-connect` makes one attempt and prints `connected LINE`, `refused`,
//! `unreachable` or `timeout`. A packet filter that drops a SYN shows as `timeout`; a host
//! with no listener answers `refused`; so a test that wants "dropped" runs a server on the port.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::lab::Lab;
use crate::process::ProcHandle;

/// What one `tcp-connect` attempt saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpOutcome {
    /// The connection was made and the server sent this line.
    Connected(String),
    /// The destination answered with a reset: nothing listens there.
    Refused,
    /// An ICMP unreachable came back.
    Unreachable,
    /// Nothing came back within the timeout (a dropped SYN).
    Timeout,
}

impl TcpOutcome {
    /// True for [`TcpOutcome::Connected`].
    pub fn is_connected(&self) -> bool {
        matches!(self, TcpOutcome::Connected(_))
    }
}

/// Starts `tcp-serve` in `ns` on every address of `listen` and waits until it has bound them.
pub fn start_server(
    lab: &mut Lab,
    labtool: &Path,
    ns: &str,
    listen: &[SocketAddr],
) -> Result<ProcHandle> {
    ensure!(!listen.is_empty(), "tcp-serve needs an address");
    let mut args = vec!["tcp-serve".to_owned()];
    for a in listen {
        args.push("--listen".to_owned());
        args.push(a.to_string());
    }
    let proc = lab.spawn(ns, &format!("tcp-serve {}", listen[0]), labtool, &args)?;
    crate::udp::wait_ready(&proc)?;
    Ok(proc)
}

/// One `tcp-connect` from `ns` to `to`, waiting at most `timeout` for the handshake.
pub fn connect(
    lab: &Lab,
    labtool: &Path,
    ns: &str,
    to: SocketAddr,
    timeout: Duration,
) -> Result<TcpOutcome> {
    let out = lab.run_ok_timeout(
        ns,
        labtool,
        [
            "tcp-connect",
            "--to",
            &to.to_string(),
            "--timeout-ms",
            &timeout.as_millis().to_string(),
        ],
        timeout + Duration::from_secs(10),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_connect_output(&stdout)
}

/// Parses `tcp-connect`'s one line.
pub fn parse_connect_output(stdout: &str) -> Result<TcpOutcome> {
    let line = stdout
        .lines()
        .next()
        .with_context(|| format!("tcp-connect printed nothing: {stdout:?}"))?;
    Ok(match line {
        "refused" => TcpOutcome::Refused,
        "unreachable" => TcpOutcome::Unreachable,
        "timeout" => TcpOutcome::Timeout,
        other => match other.strip_prefix("connected ") {
            Some(greeting) => TcpOutcome::Connected(greeting.to_owned()),
            None => bail!("bad tcp-connect line {line:?}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_output_parses() {
        assert_eq!(
            parse_connect_output("connected hello from 22\n").expect("parse"),
            TcpOutcome::Connected("hello from 22".to_owned())
        );
        assert_eq!(
            parse_connect_output("timeout\n").expect("parse"),
            TcpOutcome::Timeout
        );
        assert_eq!(
            parse_connect_output("refused\n").expect("parse"),
            TcpOutcome::Refused
        );
        assert_eq!(
            parse_connect_output("unreachable\n").expect("parse"),
            TcpOutcome::Unreachable
        );
        assert!(parse_connect_output("").is_err());
        assert!(parse_connect_output("maybe\n").is_err());
    }
}
