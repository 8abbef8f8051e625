//! The lab: namespaces, the bridges between them and the processes inside them.

use std::ffi::OsStr;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::process::{ProcHandle, TERM_GRACE};

/// Where every live lab registers itself (`<prefix>.pids`), so that a later lab can clean up
/// after one whose test process was killed (e.g. by nextest's timeout) before its drop ran.
pub const REGISTRY_DIR: &str = "/tmp/warren-lab";

/// Default time limit of [`Lab::run`].
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// How many log lines per process a failing test prints.
const LOG_TAIL_LINES: usize = 200;

static LOCK: Mutex<()> = Mutex::new(());
static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Serialises lab tests inside one test binary: take it first thing in every test. A test that
/// panicked while holding it does not poison the rest.
pub fn serial() -> MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An RAII guard over a set of network namespaces and the processes running in them.
///
/// Dropping it kills every spawned process (SIGTERM, then SIGKILL after a bounded wait) and
/// deletes every namespace it created, which also removes their veth interfaces. If the drop
/// happens during a panic (a failing test), it first prints every process's log to stderr.
/// Set `WARREN_LAB_KEEP=1` to keep the lab's directory (configs, state, logs) afterwards.
pub struct Lab {
    name: String,
    prefix: String,
    dir: Option<tempfile::TempDir>,
    namespaces: Vec<String>,
    procs: Vec<ProcHandle>,
    registry: PathBuf,
    ports: usize,
    runs: AtomicUsize,
}

/// A LAN: one "switch" namespace holding the Linux bridge `br0`, to which hosts are attached
/// with [`Lab::attach`].
#[derive(Debug, Clone)]
pub struct Lan {
    switch_ns: String,
}

impl Lan {
    /// The namespace holding the bridge.
    pub fn switch_ns(&self) -> &str {
        &self.switch_ns
    }
}

impl Lab {
    /// Creates an empty lab. `name` labels its directory and messages; namespaces get a short
    /// unique prefix (`wt<pid%10000><n>`) that no existing namespace uses.
    ///
    /// It first reaps labs left behind by test processes that died without dropping them (see
    /// [`reap_dead_labs`]), then claims its prefix atomically by creating its registry file
    /// `/tmp/warren-lab/<prefix>.pids`.
    pub fn new(name: &str) -> Result<Self> {
        reap_dead_labs();
        std::fs::create_dir_all(REGISTRY_DIR).with_context(|| format!("create {REGISTRY_DIR}"))?;
        let existing = list_namespaces()?;
        let pid = std::process::id() % 10_000;
        let (prefix, registry) = loop {
            let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
            let prefix = format!("wt{pid}{n}");
            let taken = existing
                .iter()
                .any(|ns| ns.starts_with(&format!("{prefix}-")));
            if taken {
                continue;
            }
            let registry = Path::new(REGISTRY_DIR).join(format!("{prefix}.pids"));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&registry)
            {
                Ok(mut f) => {
                    let me = std::process::id();
                    let start = proc_start_time(me).context("read this process's start time")?;
                    writeln!(f, "owner {me} {start}")
                        .with_context(|| format!("write {}", registry.display()))?;
                    break (prefix, registry);
                }
                // Another live lab (in another test process) holds this prefix.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("create {}", registry.display()));
                }
            }
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("warren-lab-{name}-"))
            .tempdir()
            .context("create the lab directory")?;
        std::fs::create_dir(dir.path().join("logs"))?;
        Ok(Self {
            name: name.to_owned(),
            prefix,
            dir: Some(dir),
            namespaces: Vec::new(),
            procs: Vec::new(),
            registry,
            ports: 0,
            runs: AtomicUsize::new(0),
        })
    }

    /// The lab's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The prefix of every namespace this lab creates (`<prefix>-<short>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The lab's private directory, for configs, state directories and logs.
    pub fn dir(&self) -> &Path {
        match &self.dir {
            Some(d) => d.path(),
            None => Path::new("/nonexistent"),
        }
    }

    /// The namespaces created so far, full names, in creation order.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The processes spawned so far.
    pub fn procs(&self) -> &[ProcHandle] {
        &self.procs
    }

    /// Creates namespace `<prefix>-<short>` with `lo` up, and returns its full name.
    pub fn add_ns(&mut self, short: &str) -> Result<String> {
        ensure!(
            !short.is_empty()
                && short.len() <= 24
                && short.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "bad namespace short name {short:?}"
        );
        let ns = format!("{}-{short}", self.prefix);
        ensure!(
            !self.namespaces.contains(&ns),
            "namespace {ns} already exists in this lab"
        );
        // Registered before it exists, so a reaper never misses it.
        self.register(&format!("ns {ns}"))?;
        ip(&["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // Its own resolver file before anything runs in it: `ip netns exec` bind-mounts
        // /etc/netns/NS/resolv.conf over /etc/resolv.conf, so a node that takes over "the"
        // resolver (MagicDNS) rewrites this file, never the host's.
        let dir = netns_etc_dir(&ns);
        if dir.exists() {
            // Left by a lab that died before it could remove it: not ours to keep.
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let conf = dir.join("resolv.conf");
        std::fs::write(&conf, default_resolv_conf(&ns))
            .with_context(|| format!("write {}", conf.display()))?;
        Ok(ns)
    }

    /// The file namespace `ns` sees as `/etc/resolv.conf` (`/etc/netns/NS/resolv.conf`,
    /// bind-mounted by `ip netns exec`). [`Lab::add_ns`] creates it with
    /// [`default_resolv_conf`]; the lab removes it, and its directory, when it ends.
    pub fn resolv_conf_path(&self, ns: &str) -> Result<PathBuf> {
        self.check_own(ns)?;
        Ok(netns_etc_dir(ns).join("resolv.conf"))
    }

    /// The current contents of `ns`'s `/etc/resolv.conf` (see [`Lab::resolv_conf_path`]).
    pub fn resolv_conf(&self, ns: &str) -> Result<String> {
        let path = self.resolv_conf_path(ns)?;
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    }

    /// Replaces `ns`'s `/etc/resolv.conf` (see [`Lab::resolv_conf_path`]) with `text`, in
    /// place. Do it before a node starts in `ns`.
    pub fn set_resolv_conf(&self, ns: &str, text: &str) -> Result<()> {
        let path = self.resolv_conf_path(ns)?;
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))
    }

    /// Creates a LAN: a namespace `<prefix>-<short>` holding an up bridge `br0`.
    pub fn add_lan(&mut self, short: &str) -> Result<Lan> {
        let ns = self.add_ns(short)?;
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        Ok(Lan { switch_ns: ns })
    }

    /// Connects namespace `ns` to `lan` with a veth pair: the end in `ns` is named `ifname`,
    /// gets `addr_cidr` (e.g. `"10.77.0.11/24"`, which must be a lab address: see
    /// [`LAB_RANGES`]) and is up;
    /// the other end is a port of the LAN's bridge.
    pub fn attach(&mut self, lan: &Lan, ns: &str, ifname: &str, addr_cidr: &str) -> Result<()> {
        ensure!(
            !ifname.is_empty() && ifname.len() <= 15,
            "interface name {ifname:?} must be 1-15 characters"
        );
        self.check_own(ns)?;
        let (addr, len) = parse_lab_cidr(addr_cidr)?;
        self.ports += 1;
        let port = format!("p{}", self.ports);
        let sw = lan.switch_ns();
        ip(&[
            "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", ifname, "netns", ns,
        ])?;
        ip(&["-n", sw, "link", "set", &port, "master", "br0", "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/{len}"),
            "dev",
            ifname,
        ])?;
        ip(&["-n", ns, "link", "set", ifname, "up"])?;
        Ok(())
    }

    /// Adds a further address `addr_cidr` (a lab address, see [`LAB_RANGES`]) to interface
    /// `ifname` of `ns`, e.g. a second public address of a server.
    pub fn add_addr(&self, ns: &str, ifname: &str, addr_cidr: &str) -> Result<()> {
        self.check_own(ns)?;
        let (addr, len) = parse_lab_cidr(addr_cidr)?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/{len}"),
            "dev",
            ifname,
        ])
    }

    /// Adds a route in `ns`: `dest` is `"default"` or a CIDR, `via` a gateway that is a lab
    /// address (see [`LAB_RANGES`]).
    pub fn add_route(&self, ns: &str, dest: &str, via: Ipv4Addr) -> Result<()> {
        self.check_own(ns)?;
        ensure!(is_lab_addr(via), "gateway {via} is not a lab address");
        ip(&["-n", ns, "route", "add", dest, "via", &via.to_string()])
    }

    /// Sets a sysctl inside `ns` (e.g. `net.ipv4.ip_forward`, `1`).
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<()> {
        self.run_ok(ns, "sysctl", ["-q", "-w", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Appends a line to this lab's registry file.
    fn register(&self, line: &str) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.registry)
            .with_context(|| format!("open {}", self.registry.display()))?;
        writeln!(f, "{line}").with_context(|| format!("write {}", self.registry.display()))
    }

    fn check_own(&self, ns: &str) -> Result<()> {
        ensure!(
            self.namespaces.iter().any(|n| n == ns),
            "namespace {ns} was not created by this lab"
        );
        Ok(())
    }

    fn netns_exec<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: impl IntoIterator<Item = S>,
    ) -> Result<Command> {
        self.check_own(ns)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program).args(args);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,warren=debug");
        }
        Ok(cmd)
    }

    /// Starts `program args…` inside `ns` (via `ip netns exec`), stdout and stderr going to log
    /// files in the lab's directory. The lab kills it on drop; the returned handle (a clone)
    /// can kill it earlier, wait for it and read its output.
    pub fn spawn<S: AsRef<OsStr>>(
        &mut self,
        ns: &str,
        name: &str,
        program: impl AsRef<OsStr>,
        args: impl IntoIterator<Item = S>,
    ) -> Result<ProcHandle> {
        let cmd = self.netns_exec(ns, program, args)?;
        let seq = self.procs.len();
        let logs = self.dir().join("logs");
        let stem: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let handle = ProcHandle::spawn(
            name,
            ns,
            cmd,
            logs.join(format!("{seq:02}-{stem}.stdout")),
            logs.join(format!("{seq:02}-{stem}.stderr")),
        )?;
        self.procs.push(handle.clone());
        if let Some(start) = proc_start_time(handle.pid()) {
            self.register(&format!("pid {} {start}", handle.pid()))?;
        }
        Ok(handle)
    }

    /// Runs `program args…` inside `ns` to completion, with [`RUN_TIMEOUT`], capturing its
    /// output. A non-zero exit is not an error here; see [`Lab::run_ok`].
    pub fn run<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: impl IntoIterator<Item = S>,
    ) -> Result<Output> {
        self.run_timeout(ns, program, args, RUN_TIMEOUT)
    }

    /// [`Lab::run`] with an explicit time limit; the process is killed and an error returned
    /// when it runs longer.
    pub fn run_timeout<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: impl IntoIterator<Item = S>,
        timeout: Duration,
    ) -> Result<Output> {
        let mut cmd = self.netns_exec(ns, program, args)?;
        let desc = format!("{cmd:?}");
        // Output goes to files, not pipes: nothing can block on a full pipe, and a stray
        // grandchild keeping a pipe open cannot hang us.
        let n = self.runs.fetch_add(1, Ordering::Relaxed);
        let out_path = self.dir().join(format!("logs/run-{n:04}.stdout"));
        let err_path = self.dir().join(format!("logs/run-{n:04}.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(std::fs::File::create(&err_path)?);
        let mut child = cmd.spawn().with_context(|| format!("spawn {desc}"))?;
        let start = Instant::now();
        let status: ExitStatus = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if start.elapsed() >= timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{desc} did not finish within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(10));
        };
        let output = Output {
            status,
            stdout: std::fs::read(&out_path)?,
            stderr: std::fs::read(&err_path)?,
        };
        let _ = std::fs::remove_file(&out_path);
        let _ = std::fs::remove_file(&err_path);
        Ok(output)
    }

    /// [`Lab::run`], failing (with its output in the message) unless it exits 0.
    pub fn run_ok<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: impl IntoIterator<Item = S>,
    ) -> Result<Output> {
        self.run_ok_timeout(ns, program, args, RUN_TIMEOUT)
    }

    /// [`Lab::run_ok`] with an explicit time limit (see [`Lab::run_timeout`]).
    pub fn run_ok_timeout<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: impl IntoIterator<Item = S>,
        timeout: Duration,
    ) -> Result<Output> {
        let program = program.as_ref().to_owned();
        let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let out = self.run_timeout(ns, &program, &args, timeout)?;
        if !out.status.success() {
            bail!(
                "`{} {}` in {ns} failed ({}):\n{}{}",
                program.to_string_lossy(),
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
            );
        }
        Ok(out)
    }

    /// One ICMP echo from `ns` to `addr` (`ping -c 1 -W 1`): true iff a reply came back, false
    /// if none did (exit status 1); any other failure of `ping` is an error.
    pub fn ping(&self, ns: &str, addr: IpAddr) -> Result<bool> {
        self.ping_wait(ns, addr, Duration::from_secs(1))
    }

    /// One ICMP echo from `ns` to `addr`, waiting at most `wait` for the reply (`ping -W`
    /// takes fractions of a second): true iff a reply came back, false if none did (exit
    /// status 1); any other failure of `ping` is an error.
    pub fn ping_wait(&self, ns: &str, addr: IpAddr, wait: Duration) -> Result<bool> {
        let out = self.run_timeout(
            ns,
            "ping",
            [
                "-n",
                "-c",
                "1",
                "-W",
                &format!("{:.3}", wait.as_secs_f64()),
                &addr.to_string(),
            ],
            wait + Duration::from_secs(10),
        )?;
        // ping exits 0 on a reply, 1 when none came back, 2 (or anything else) on an error
        // such as "Network is unreachable" or a bad argument: that is not a missing reply.
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => bail!(
                "`ping {addr}` in {ns} failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Kills every process spawned so far: SIGTERM to all, then SIGKILL to those still alive
    /// after [`TERM_GRACE`].
    pub fn kill_all(&self) {
        for p in &self.procs {
            p.terminate();
        }
        let start = Instant::now();
        for p in &self.procs {
            if p.wait_exit(TERM_GRACE.saturating_sub(start.elapsed()))
                .is_none()
            {
                let _ = p.force_kill();
            }
        }
    }

    /// Every process's log tail, for a failure report.
    pub fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| p.log_tail(LOG_TAIL_LINES))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_all();
        // Anything else still inside (a child of a spawned process, a stray `run`) goes too:
        // deleting a namespace does not stop the processes in it.
        kill_inside(&self.namespaces, Vec::new());
        if thread::panicking() {
            eprintln!(
                "\n##### lab `{}` failed: logs of its {} processes #####\n{}",
                self.name,
                self.procs.len(),
                self.logs()
            );
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!(
                    "lab `{}`: could not delete namespace {ns}: {e:#}",
                    self.name
                );
            }
            if let Err(e) = remove_netns_etc(ns) {
                eprintln!("lab `{}`: {e:#}", self.name);
            }
        }
        let _ = std::fs::remove_file(&self.registry);
        if std::env::var_os("WARREN_LAB_KEEP").is_some_and(|v| v != "0")
            && let Some(dir) = self.dir.take()
        {
            let path: PathBuf = dir.keep();
            eprintln!("lab `{}`: kept its directory {}", self.name, path.display());
        }
    }
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, clock ticks since boot):
/// together with the pid it identifies a process, since pids get reused.
fn proc_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name start at field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// True if process `pid` exists and started at `start`.
fn same_process_alive(pid: u32, start: u64) -> bool {
    proc_start_time(pid) == Some(start)
}

/// Cleans up after labs whose owning test process is gone without having dropped them (a test
/// binary killed by a timeout never runs [`Lab`]'s drop). For each registry file in
/// [`REGISTRY_DIR`] whose `owner PID START` no longer exists, it SIGKILLs the processes the lab
/// spawned (`pid PID START` lines, checked against pid reuse) and every process still inside
/// the lab's namespaces (`ns NAME` lines; that also catches their children), deletes those
/// namespaces and removes the file. Best effort: errors are printed, not returned.
pub fn reap_dead_labs() {
    let Ok(entries) = std::fs::read_dir(REGISTRY_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pids") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let mut owner = None;
        let mut pids = Vec::new();
        let mut namespaces = Vec::new();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["owner", pid, start] => owner = pid.parse().ok().zip(start.parse().ok()),
                ["pid", pid, start] => pids.extend(pid.parse().ok().zip(start.parse().ok())),
                ["ns", ns] => namespaces.push((*ns).to_owned()),
                _ => {}
            }
        }
        match owner {
            Some((pid, start)) if same_process_alive(pid, start) => continue,
            // A file still being written by its (live) creator has no owner line yet.
            None if entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(10)) =>
            {
                continue;
            }
            _ => {}
        }
        eprintln!(
            "reaping the lab of dead test process ({}): {namespaces:?}",
            path.display()
        );
        let spawned: Vec<String> = pids
            .into_iter()
            .filter(|&(pid, start)| same_process_alive(pid, start))
            .map(|(pid, _)| pid.to_string())
            .collect();
        kill_inside(&namespaces, spawned);
        let existing = list_namespaces().unwrap_or_default();
        for ns in namespaces.iter().rev().filter(|ns| existing.contains(ns)) {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("could not delete leftover namespace {ns}: {e:#}");
            }
        }
        for ns in &namespaces {
            if let Err(e) = remove_netns_etc(ns) {
                eprintln!("{e:#}");
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// Where `ip netns exec` finds the files it bind-mounts over `/etc` for namespace `ns`.
pub const NETNS_ETC: &str = "/etc/netns";

/// `/etc/netns/NS`: the per-namespace `/etc` overrides of `ns`.
pub fn netns_etc_dir(ns: &str) -> PathBuf {
    Path::new(NETNS_ETC).join(ns)
}

/// What [`Lab::add_ns`] writes as namespace `ns`'s `/etc/resolv.conf`: the lab's upstream DNS
/// server (see [`crate::services::DnsServers`]), short timeouts, and a comment naming the
/// namespace, so a byte-for-byte comparison after a node restored it means something.
pub fn default_resolv_conf(ns: &str) -> String {
    format!(
        "# warren lab: /etc/resolv.conf of network namespace {ns}\n\
         nameserver 10.53.0.53\n\
         options timeout:1 attempts:2\n"
    )
}

/// Removes `/etc/netns/NS` (the lab-unique name makes it the lab's own). Gone already is fine.
fn remove_netns_etc(ns: &str) -> Result<()> {
    let dir = netns_etc_dir(ns);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("could not remove {}", dir.display())),
    }
}

/// SIGKILLs `victims` and every process still inside `namespaces` (children and strays
/// included), so that deleting the namespaces leaves nothing running. Best effort.
fn kill_inside(namespaces: &[String], mut victims: Vec<String>) {
    for ns in namespaces {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", ns])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        {
            victims.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_owned),
            );
        }
    }
    if !victims.is_empty() {
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&victims)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Runs `ip ARGS` (in the host namespace, so only ever with `netns add|del` or `-n NS`).
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Names of all network namespaces (`ip netns list`).
pub fn list_namespaces() -> Result<Vec<String>> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .stdin(Stdio::null())
        .output()
        .context("run `ip netns list` (is iproute2 installed?)")?;
    ensure!(
        out.status.success(),
        "`ip netns list` failed: {}",
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// The only ranges the lab assigns addresses from: `10.77.0.0/16` (LANs), TEST-NET-3
/// `203.0.113.0/24` (RFC 5737, documentation only: the lab's "internet", see [`crate::nat`]),
/// and for [`crate::services`]: `10.20.0.0/16` (LANs behind subnet routers), `10.53.0.0/16`
/// and `10.54.0.0/16` (DNS servers) and TEST-NET-2 `198.51.100.0/24` (the internet behind
/// exit nodes). All of them exist only inside the lab's namespaces.
pub const LAB_RANGES: [(Ipv4Addr, u8); 6] = [
    (Ipv4Addr::new(10, 77, 0, 0), 16),
    (Ipv4Addr::new(203, 0, 113, 0), 24),
    (Ipv4Addr::new(10, 20, 0, 0), 16),
    (Ipv4Addr::new(10, 53, 0, 0), 16),
    (Ipv4Addr::new(10, 54, 0, 0), 16),
    (Ipv4Addr::new(198, 51, 100, 0), 24),
];

fn is_lab_addr(a: Ipv4Addr) -> bool {
    LAB_RANGES.iter().any(|&(net, len)| {
        let mask = u32::MAX << (32 - u32::from(len));
        u32::from(a) & mask == u32::from(net)
    })
}

/// Parses `a.b.c.d/len`, requiring a lab address (see [`LAB_RANGES`]) and `len >= 16`.
fn parse_lab_cidr(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    let (addr, len) = cidr
        .split_once('/')
        .with_context(|| format!("{cidr:?} is not ADDR/LEN"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .with_context(|| format!("bad address in {cidr:?}"))?;
    let len: u8 = len
        .parse()
        .with_context(|| format!("bad prefix length in {cidr:?}"))?;
    ensure!(
        is_lab_addr(addr) && (16..=32).contains(&len),
        "{cidr} is outside the lab's ranges (10.77.0.0/16, 203.0.113.0/24, 10.20.0.0/16, \
         10.53.0.0/16, 10.54.0.0/16, 198.51.100.0/24): the lab only uses addresses there"
    );
    Ok((addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_cidrs_are_confined_to_lab_ranges() {
        assert!(parse_lab_cidr("10.77.0.11/24").is_ok());
        assert!(parse_lab_cidr("10.78.0.11/24").is_err());
        assert!(parse_lab_cidr("10.77.0.11/8").is_err());
        assert!(parse_lab_cidr("192.168.1.1/24").is_err());
        assert!(parse_lab_cidr("10.77.0.11").is_err());
        assert!(parse_lab_cidr("203.0.113.10/24").is_ok());
        assert!(parse_lab_cidr("203.0.114.10/24").is_err());
        assert!(parse_lab_cidr("198.51.100.1/24").is_ok());
        assert!(parse_lab_cidr("198.51.101.1/24").is_err());
        assert!(parse_lab_cidr("10.53.0.53/32").is_ok());
        assert!(parse_lab_cidr("10.55.0.53/32").is_err());
        assert!(parse_lab_cidr("10.20.0.10/24").is_ok());
    }
}
