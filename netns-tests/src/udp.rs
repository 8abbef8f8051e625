//! Observing UDP through NATs with the labtool's UDP commands:
//!
//! ```text
//! warren-labtool udp-echo        --listen ADDR:PORT [--listen ADDR:PORT …]
//! warren-labtool udp-probe       --from-port P --to ADDR:PORT [--to …] [--timeout-ms 1000]
//! warren-labtool udp-listen-once --port P [--timeout-ms 1000] [--send-to ADDR:PORT]
//! warren-labtool udp-send        --from ADDR:PORT --to ADDR:PORT [--count 1]
//! ```
//! `udp-echo` prints `ready` once bound, then answers every datagram with the source address it
//! saw, as text `ip:port`. `udp-probe` sends from one socket bound to `0.0.0.0:P` to each target
//! in turn (resending a few times within the timeout) and prints one line per target:
//! `TARGET MAPPED` (what the echo server saw: the NAT's mapping) or `TARGET timeout`.
//! `udp-listen-once` binds `0.0.0.0:P`, prints `ready`, sends one datagram to `--send-to` if
//! given, then prints `from SRC` for the first datagram or `timeout`. `udp-send` sends `--count` datagrams from `--from` to `--to`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::lab::Lab;
use crate::process::ProcHandle;
use crate::wait::wait_until;

/// How long a labtool UDP process may take to bind and print `ready`.
pub const READY_DEADLINE: Duration = Duration::from_secs(10);

/// The line the labtool prints once its sockets are bound.
pub const READY_LINE: &str = "ready";

/// Starts `udp-echo` in `ns` on every address of `listen` and waits until it has bound them.
pub fn start_echo(
    lab: &mut Lab,
    labtool: &Path,
    ns: &str,
    listen: &[SocketAddr],
) -> Result<ProcHandle> {
    ensure!(!listen.is_empty(), "udp-echo needs an address");
    let mut args = vec!["udp-echo".to_owned()];
    for a in listen {
        args.push("--listen".to_owned());
        args.push(a.to_string());
    }
    let proc = lab.spawn(ns, &format!("udp-echo {}", listen[0]), labtool, &args)?;
    wait_ready(&proc)?;
    Ok(proc)
}

/// Waits until a labtool process has printed [`READY_LINE`]; fails if it exits first.
pub(crate) fn wait_ready(proc: &ProcHandle) -> Result<()> {
    wait_until(READY_DEADLINE, &format!("{} is ready", proc.name()), || {
        if let Some(status) = proc.try_status() {
            bail!("exited ({status}): {}", proc.stderr().trim());
        }
        Ok(proc.stdout().lines().any(|l| l == READY_LINE))
    })?;
    Ok(())
}

/// Runs `udp-probe` in `ns` from local port `from_port` to each of `targets` (each waited for
/// up to `timeout`), and returns what each echo server saw (`None`: no answer).
pub fn probe(
    lab: &Lab,
    labtool: &Path,
    ns: &str,
    from_port: u16,
    targets: &[SocketAddr],
    timeout: Duration,
) -> Result<Vec<Option<SocketAddr>>> {
    let mut args = vec![
        "udp-probe".to_owned(),
        "--from-port".to_owned(),
        from_port.to_string(),
        "--timeout-ms".to_owned(),
        timeout.as_millis().to_string(),
    ];
    for t in targets {
        args.push("--to".to_owned());
        args.push(t.to_string());
    }
    let limit = timeout * u32::try_from(targets.len()).unwrap_or(u32::MAX) + READY_DEADLINE;
    let out = lab.run_ok_timeout(ns, labtool, &args, limit)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_probe_output(&stdout, targets)
}

/// Parses `udp-probe`'s output: one `TARGET MAPPED|timeout` line per target, in order.
pub fn parse_probe_output(stdout: &str, targets: &[SocketAddr]) -> Result<Vec<Option<SocketAddr>>> {
    let lines: Vec<&str> = stdout.lines().collect();
    ensure!(
        lines.len() == targets.len(),
        "udp-probe printed {} lines for {} targets:\n{stdout}",
        lines.len(),
        targets.len()
    );
    lines
        .iter()
        .zip(targets)
        .map(|(line, target)| {
            let (t, seen) = line
                .split_once(' ')
                .with_context(|| format!("bad udp-probe line {line:?}"))?;
            ensure!(
                t == target.to_string(),
                "udp-probe line {line:?} is not about {target}"
            );
            if seen == "timeout" {
                Ok(None)
            } else {
                Ok(Some(seen.parse().with_context(|| {
                    format!("bad mapped address in udp-probe line {line:?}")
                })?))
            }
        })
        .collect()
}

/// Does a datagram sent from `sender_ns` (socket bound to `from`) to `to` arrive at port
/// `port` in `listener_ns` within `timeout`? Starts `udp-listen-once` there, waits until it
/// is bound, runs `udp-send`, and returns the source address the listener saw (`None`: nothing
/// arrived).
#[allow(clippy::too_many_arguments)]
pub fn deliver(
    lab: &mut Lab,
    labtool: &Path,
    listener_ns: &str,
    port: u16,
    sender_ns: &str,
    from: SocketAddr,
    to: SocketAddr,
    timeout: Duration,
) -> Result<Option<SocketAddr>> {
    let listener = spawn_listener(lab, labtool, listener_ns, port, timeout, None)?;
    wait_ready(&listener)?;
    lab.run_ok(
        sender_ns,
        labtool,
        [
            "udp-send",
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
            "--count",
            "3",
        ],
    )?;
    // A listener that already gave up saw nothing of what was sent: no answer either way.
    if listener.wait_exit(Duration::ZERO).is_some()
        && parse_listen_output(&listener.stdout())?.is_none()
    {
        bail!(
            "udp-listen-once in {listener_ns} timed out before the datagrams were sent \
             (inconclusive; is the machine overloaded?)"
        );
    }
    listener_result(&listener, listener_ns, timeout)
}

/// Starts `udp-listen-once` on `port` in `ns`, echoing to `send_to` first when given.
fn spawn_listener(
    lab: &mut Lab,
    labtool: &Path,
    ns: &str,
    port: u16,
    timeout: Duration,
    send_to: Option<SocketAddr>,
) -> Result<ProcHandle> {
    let port = port.to_string();
    let millis = timeout.as_millis().to_string();
    let send_to = send_to.map(|a| a.to_string());
    let mut args = vec!["udp-listen-once", "--port", &port, "--timeout-ms", &millis];
    let mut label = format!("udp-listen-once :{port}");
    if let Some(to) = &send_to {
        args.extend(["--send-to", to]);
        label.push_str(&format!(" --send-to {to}"));
    }
    lab.spawn(ns, &label, labtool, args)
}

/// Starts `udp-listen-once` on `port` in `ns` with `--send-to to` (an echo server) and returns
/// the source of the first datagram back (`None`: nothing within `timeout`): the control case
/// of [`deliver`], since a reply from the very endpoint a host sent to passes every NAT that
/// passes UDP at all.
pub fn send_and_listen(
    lab: &mut Lab,
    labtool: &Path,
    ns: &str,
    port: u16,
    to: SocketAddr,
    timeout: Duration,
) -> Result<Option<SocketAddr>> {
    let listener = spawn_listener(lab, labtool, ns, port, timeout, Some(to))?;
    listener_result(&listener, ns, timeout)
}

fn listener_result(
    listener: &ProcHandle,
    ns: &str,
    timeout: Duration,
) -> Result<Option<SocketAddr>> {
    let status = listener
        .wait_exit(timeout + READY_DEADLINE)
        .with_context(|| format!("udp-listen-once in {ns} did not exit"))?;
    let stdout = listener.stdout();
    ensure!(
        status.success(),
        "udp-listen-once in {ns} failed ({status}): {stdout}{}",
        listener.stderr()
    );
    parse_listen_output(&stdout)
}

/// Parses `udp-listen-once`'s output: `ready`, then `from SRC` or `timeout`.
pub fn parse_listen_output(stdout: &str) -> Result<Option<SocketAddr>> {
    let last = stdout
        .lines()
        .rfind(|l| *l != READY_LINE)
        .with_context(|| format!("udp-listen-once printed no result: {stdout:?}"))?;
    if last == "timeout" {
        return Ok(None);
    }
    let src = last
        .strip_prefix("from ")
        .with_context(|| format!("bad udp-listen-once line {last:?}"))?;
    Ok(Some(src.parse().with_context(|| {
        format!("bad source in udp-listen-once line {last:?}")
    })?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_output_parses_in_order() {
        let t: Vec<SocketAddr> = vec![
            "203.0.113.10:3478".parse().expect("addr"),
            "203.0.113.11:3478".parse().expect("addr"),
        ];
        let got = parse_probe_output(
            "203.0.113.10:3478 203.0.113.21:20417\n203.0.113.11:3478 timeout\n",
            &t,
        )
        .expect("parse");
        assert_eq!(
            got,
            vec![Some("203.0.113.21:20417".parse().expect("addr")), None]
        );
        assert!(parse_probe_output("203.0.113.11:3478 timeout\n", &t).is_err());
        assert!(
            parse_probe_output("203.0.113.11:3478 timeout\n203.0.113.10:3478 timeout\n", &t)
                .is_err()
        );
    }

    #[test]
    fn listen_output_parses() {
        assert_eq!(
            parse_listen_output("ready\ntimeout\n").expect("parse"),
            None
        );
        assert_eq!(
            parse_listen_output("ready\nfrom 203.0.113.10:3479\n").expect("parse"),
            Some("203.0.113.10:3479".parse().expect("addr"))
        );
        assert!(parse_listen_output("ready\n").is_err());
        assert!(parse_listen_output("ready\nfrom nonsense\n").is_err());
    }
}
