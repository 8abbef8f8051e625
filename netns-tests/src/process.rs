//! Processes a lab spawned inside its namespaces.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How long [`ProcHandle::kill`] waits after SIGTERM before it sends SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// A process spawned by [`crate::Lab::spawn`]. Cheap to clone; the lab keeps a clone and kills
/// the process when it drops. Its stdout and stderr go to log files in the lab's directory.
#[derive(Clone)]
pub struct ProcHandle {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    ns: String,
    command: String,
    pid: u32,
    stdout: PathBuf,
    stderr: PathBuf,
    child: Mutex<Child>,
}

impl fmt::Debug for ProcHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProcHandle")
            .field("name", &self.inner.name)
            .field("ns", &self.inner.ns)
            .field("pid", &self.inner.pid)
            .finish()
    }
}

impl ProcHandle {
    pub(crate) fn spawn(
        name: &str,
        ns: &str,
        mut cmd: Command,
        stdout: PathBuf,
        stderr: PathBuf,
    ) -> Result<Self> {
        let command = format!("{cmd:?}");
        let out = std::fs::File::create(&stdout)
            .with_context(|| format!("create {}", stdout.display()))?;
        let err = std::fs::File::create(&stderr)
            .with_context(|| format!("create {}", stderr.display()))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name} in {ns}: {command}"))?;
        Ok(Self {
            inner: Arc::new(Inner {
                name: name.to_owned(),
                ns: ns.to_owned(),
                command,
                pid: child.id(),
                stdout,
                stderr,
                child: Mutex::new(child),
            }),
        })
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.inner
            .child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The namespace it runs in.
    pub fn ns(&self) -> &str {
        &self.inner.ns
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.inner.command
    }

    /// Its process id (`ip netns exec` execs the program, so this is the program itself).
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// Its exit status if it has exited, without waiting.
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.child().try_wait().ok().flatten()
    }

    /// True while it has not exited.
    pub fn is_running(&self) -> bool {
        self.try_status().is_none()
    }

    /// Waits up to `deadline` for it to exit; `None` if it is still running then.
    pub fn wait_exit(&self, deadline: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if start.elapsed() >= deadline {
                return None;
            }
            thread::sleep(crate::wait::POLL_INTERVAL);
        }
    }

    /// Sends SIGTERM without waiting (no-op if it already exited).
    pub fn terminate(&self) {
        let mut child = self.child();
        if matches!(child.try_wait(), Ok(None)) {
            // The child is not reaped yet, so its pid cannot have been reused.
            let _ = Command::new("kill")
                .args(["-TERM", &self.inner.pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Sends signal `name` (`HUP`, `USR1`, …) without waiting. Fails if it already exited or
    /// `kill` refuses.
    pub fn signal(&self, name: &str) -> Result<()> {
        let mut child = self.child();
        anyhow::ensure!(
            matches!(child.try_wait(), Ok(None)),
            "{} has exited; not sending SIG{name}",
            self.inner.name
        );
        // The child is not reaped yet (we hold its lock), so its pid cannot have been reused.
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.inner.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("run kill")?;
        anyhow::ensure!(
            status.success(),
            "kill -{name} {} failed ({status})",
            self.inner.pid
        );
        Ok(())
    }

    /// Stops it: SIGTERM, then SIGKILL if it has not exited after [`TERM_GRACE`]. Returns its
    /// exit status.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.terminate();
        if let Some(status) = self.wait_exit(TERM_GRACE) {
            return Ok(status);
        }
        self.force_kill()
    }

    /// SIGKILL and reap.
    pub fn force_kill(&self) -> Result<ExitStatus> {
        let mut child = self.child();
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        let _ = child.kill();
        child
            .wait()
            .with_context(|| format!("wait for {}", self.inner.name))
    }

    /// Path of its stdout log.
    pub fn stdout_path(&self) -> &Path {
        &self.inner.stdout
    }

    /// Path of its stderr log.
    pub fn stderr_path(&self) -> &Path {
        &self.inner.stderr
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.inner.stdout)
    }

    /// Everything it wrote to stderr so far (where warren's tracing logs go).
    pub fn stderr(&self) -> String {
        read_lossy(&self.inner.stderr)
    }

    /// Its log for a failure report: the last `max_lines` lines of stdout and of stderr.
    pub fn log_tail(&self, max_lines: usize) -> String {
        let mut out = format!(
            "===== {} (ns {}, pid {}, {}) =====\n{}\n",
            self.inner.name,
            self.inner.ns,
            self.inner.pid,
            match self.try_status() {
                Some(s) => format!("exited: {s}"),
                None => "still running".to_owned(),
            },
            self.inner.command,
        );
        for (what, text) in [("stdout", self.stdout()), ("stderr", self.stderr())] {
            if text.is_empty() {
                continue;
            }
            let lines: Vec<&str> = text.lines().collect();
            let skip = lines.len().saturating_sub(max_lines);
            out.push_str(&format!("----- {what} -----\n"));
            if skip > 0 {
                out.push_str(&format!("[... {skip} earlier lines ...]\n"));
            }
            for line in &lines[skip..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
