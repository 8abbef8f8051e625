//! The deterministic byte stream `warren-labtool` sends and the report it prints.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// A deterministic pseudo-random byte stream (xorshift64*), the same on every run, so a sender
/// and a sink can prove a transfer arrived intact by comparing byte counts and SHA-256 digests.
#[derive(Debug, Clone)]
pub struct PatternStream {
    state: u64,
}

impl PatternStream {
    /// The seed every `tcp-send` uses.
    pub const SEED: u64 = 0x5741_5252_454e_2d31; // "WARREN-1"

    /// A stream starting from [`Self::SEED`].
    pub fn new() -> Self {
        Self { state: Self::SEED }
    }

    /// Fills `buf` with the next `buf.len()` bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

impl Default for PatternStream {
    fn default() -> Self {
        Self::new()
    }
}

/// What `tcp-send` and `tcp-sink` print as one JSON line: `{"bytes":N,"sha256":"hex"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferReport {
    /// Number of bytes sent or received.
    pub bytes: u64,
    /// Lower-case hex SHA-256 of those bytes.
    pub sha256: String,
}

impl TransferReport {
    /// The report for `bytes` bytes hashed by `hasher`.
    pub fn new(bytes: u64, hasher: Sha256) -> Self {
        Self {
            bytes,
            sha256: hex::encode(hasher.finalize()),
        }
    }

    /// The JSON line form.
    pub fn to_json(&self) -> String {
        serde_json::json!({ "bytes": self.bytes, "sha256": self.sha256 }).to_string()
    }

    /// Parses the last non-empty line of `stdout` as a report.
    pub fn parse(stdout: &str) -> Result<Self> {
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .context("no report line in labtool output")?;
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("bad report line {line:?}"))?;
        Ok(Self {
            bytes: v["bytes"]
                .as_u64()
                .with_context(|| format!("no `bytes` in {line:?}"))?,
            sha256: v["sha256"]
                .as_str()
                .with_context(|| format!("no `sha256` in {line:?}"))?
                .to_owned(),
        })
    }

    /// The report a correct transfer of `bytes` bytes of [`PatternStream`] produces.
    pub fn expected(bytes: u64) -> Self {
        let mut stream = PatternStream::new();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            stream.fill(&mut buf[..n]);
            hasher.update(&buf[..n]);
            left -= n as u64;
        }
        Self::new(bytes, hasher)
    }
}

/// Runs `warren-labtool tcp-sink` in `sink_ns` listening on `to`, then `tcp-send` of `bytes`
/// bytes from `src_ns`, and returns (sender's report, sink's report). `deadline` bounds the
/// whole transfer.
pub fn tcp_transfer(
    lab: &mut crate::Lab,
    labtool: &std::path::Path,
    src_ns: &str,
    sink_ns: &str,
    to: std::net::SocketAddr,
    bytes: u64,
    deadline: std::time::Duration,
) -> Result<(TransferReport, TransferReport)> {
    let secs = deadline.as_secs().max(1).to_string();
    let target = to.to_string();
    let sink = lab.spawn(
        sink_ns,
        &format!("tcp-sink {target}"),
        labtool,
        ["tcp-sink", "--listen", &target, "--timeout-secs", &secs],
    )?;
    let bytes_arg = bytes.to_string();
    let sent = lab.run_timeout(
        src_ns,
        labtool,
        [
            "tcp-send",
            "--to",
            &target,
            "--bytes",
            &bytes_arg,
            "--timeout-secs",
            &secs,
        ],
        deadline + std::time::Duration::from_secs(5),
    )?;
    anyhow::ensure!(
        sent.status.success(),
        "tcp-send to {target} failed ({}): {}\nsink stderr: {}",
        sent.status,
        String::from_utf8_lossy(&sent.stderr),
        sink.stderr()
    );
    let sent = TransferReport::parse(&String::from_utf8_lossy(&sent.stdout))?;
    let status = sink
        .wait_exit(std::time::Duration::from_secs(10))
        .context("tcp-sink did not exit after the sender finished")?;
    anyhow::ensure!(
        status.success(),
        "tcp-sink failed ({status}): {}",
        sink.stderr()
    );
    Ok((sent, TransferReport::parse(&sink.stdout())?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_deterministic_across_chunkings() {
        let mut a = PatternStream::new();
        let mut whole = [0u8; 100];
        a.fill(&mut whole);
        let mut b = PatternStream::new();
        let mut parts = [0u8; 100];
        // chunks that are multiples of 8 keep the same word boundaries
        b.fill(&mut parts[..40]);
        b.fill(&mut parts[40..]);
        assert_eq!(whole, parts);
        assert_ne!(whole[..8], whole[8..16]);
    }

    #[test]
    fn report_round_trips() {
        let r = TransferReport::expected(1000);
        assert_eq!(r.bytes, 1000);
        assert_eq!(
            TransferReport::parse(&format!("noise\n{}\n", r.to_json())).expect("should succeed"),
            r
        );
    }
}
