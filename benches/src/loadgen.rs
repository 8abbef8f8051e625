//! A load generator for the control server: it starts a real `warren-control serve` process
//! and plays N nodes against it over real gRPC, each exactly as a node behaves (one HTTP/2
//! connection per node; GetServerKey, RegisterNode with a proof sealed by the node's own key,
//! then StreamMapResponse read continuously by its own task and UpdateNode with endpoints),
//! while sampling the server's memory and CPU time from `/proc` every 100 ms.
//!
//! The phases:
//! 1. registration: every node registers, `concurrency` at a time;
//! 2. streams: every node opens its map stream and reports endpoints, `concurrency` at a time,
//!    until every stream has its full map, sees every peer online and knows every peer's
//!    endpoints;
//! 3. fan-out: `probes` more nodes join one after another; for each, how long every open stream
//!    takes to see it online (join fan-out), then to see the endpoints it reports (endpoint
//!    fan-out);
//! 4. restart: control is killed (SIGKILL) and started again on the same database (or, with
//!    `failover`, every node moves to a second instance on the same PostgreSQL database); every
//!    node reconnects, resuming from the map version it applied (or, without `resume`, asking
//!    for a full map), until every stream has its start again and its view shows every peer
//!    online (time to consistency, and the bytes it took).
//!
//! Streams are read as the node reads them ([`MapReader`]: paged full maps assembled, batches
//! unpacked, the version kept for resuming).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use prost::Message;
use tonic::transport::{Channel, Endpoint};
use warren_node_core::netmap::MapReader;
use warren_proto::control::control_client::ControlClient;
use warren_proto::control::map_response::Kind;
use warren_proto::control::*;
use warren_proto::proof::{make_proof, request_digest, unix_ms};
use warren_proto::{ControlPublicKey, DiscoSecretKey, NodeSecretKey};

/// How long control may take to stop after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(60);

/// Largest map message a simulated node accepts (the real node's limit).
const MAX_MAP_BYTES: usize = 64 << 20;

/// Clock ticks per second in `/proc/PID/stat` (USER_HZ, 100 on every Linux architecture
/// warren runs on).
const CLOCK_TICKS: f64 = 100.0;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated nodes.
    pub nodes: usize,
    /// The `warren-control` binary.
    pub control_bin: PathBuf,
    /// Registrations (and stream openings) in flight at once.
    pub concurrency: usize,
    /// Run control's embedded DERP server (on free loopback ports), as its default config does.
    pub embedded_derp: bool,
    /// Run control's web admin page (on a free loopback port), as its default config does.
    pub web: bool,
    /// How long each phase may take before the run fails.
    pub timeout: Duration,
    /// Nodes that join one at a time once the mesh is up, to time fan-out (0: skip).
    pub probes: usize,
    /// Kill control with SIGKILL once the mesh is up, start it again and time the way back.
    pub restart: bool,
    /// The `[database]` section of control's config (e.g. PostgreSQL); `None`: SQLite in the
    /// run's directory.
    pub database_toml: Option<String>,
    /// With `restart` on a shared database: run a second instance from the start, and after
    /// the kill every node moves to it (the first is not started again).
    pub failover: bool,
    /// After the kill, nodes resume from the version they applied (`false`: every node asks
    /// for a full map, as a node without resume would).
    pub resume: bool,
    /// Print progress to standard error.
    pub verbose: bool,
}

impl Options {
    /// `nodes` nodes against `control_bin` with the defaults: 64 in flight, embedded DERP and
    /// web page on, 300 s per phase, quiet.
    pub fn new(nodes: usize, control_bin: PathBuf) -> Self {
        Self {
            nodes,
            control_bin,
            concurrency: 64,
            embedded_derp: true,
            web: true,
            timeout: Duration::from_secs(300),
            probes: 10,
            restart: true,
            database_toml: None,
            failover: false,
            resume: true,
            verbose: false,
        }
    }
}

/// Control's memory and CPU time at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Peak resident set (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// Resident set (VmRSS), KiB.
    pub rss_kib: u64,
    /// User + system CPU time, seconds.
    pub cpu_secs: f64,
}

/// What one simulated node saw.
#[derive(Debug, Clone, Default)]
pub struct NodeResult {
    /// Its node id.
    pub id: u64,
    /// Its hostname.
    pub hostname: String,
    /// Full maps received (one is right: the stream never reconnects).
    pub full_maps: u32,
    /// Peers in the first full map.
    pub full_map_peers: usize,
    /// The first full map named itself as self and exactly every other simulated node as
    /// peers.
    pub full_map_exact: bool,
    /// Protobuf bytes of the first full map (all its pages).
    pub full_map_bytes: u64,
    /// Messages of the first full map (its pages).
    pub full_map_messages: u64,
    /// Messages received on the stream, the full map included.
    pub messages: u64,
    /// Protobuf bytes received on the stream, the full map included (gRPC's 5-byte frame
    /// headers and HTTP/2 framing not counted).
    pub bytes: u64,
    /// Messages by kind ("full", "peer_online", ...).
    pub kinds: BTreeMap<&'static str, u64>,
    /// After control's restart: the stream resumed (no full map).
    pub restart_resumed: bool,
    /// After control's restart: messages and bytes until the run ended.
    pub restart_messages: u64,
    /// Protobuf bytes of those.
    pub restart_bytes: u64,
}

/// The fan-out latencies of one kind of change: from the change until each open stream had it.
#[derive(Debug, Clone, Default)]
pub struct FanOut {
    /// Changes timed.
    pub changes: usize,
    /// Deliveries timed (changes x streams that got them in time).
    pub samples: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Slowest.
    pub max: Duration,
}

impl FanOut {
    fn from(mut samples: Vec<Duration>, changes: usize) -> Self {
        samples.sort_unstable();
        Self {
            changes,
            samples: samples.len(),
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

/// How control came back after SIGKILL.
#[derive(Debug, Clone, Default)]
pub struct Restart {
    /// From SIGKILL until control accepted connections again.
    pub down: Duration,
    /// From control accepting connections until every stream had its start again and saw
    /// every peer online; `None` when the run gave up.
    pub consistent: Option<Duration>,
    /// Streams that resumed (changes only) and ones that got a full map.
    pub resumed: usize,
    /// See `resumed`.
    pub full: usize,
    /// Protobuf bytes all streams received from the restart until consistent.
    pub bytes: u64,
    /// Messages of those.
    pub messages: u64,
    /// Control at the end of the restart phase.
    pub usage: Usage,
}

/// The outcome of a run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Simulated nodes.
    pub nodes: usize,
    /// Registrations in flight.
    pub concurrency: usize,
    /// Wall time of the registration phase.
    pub register_time: Duration,
    /// Registrations per second over that phase.
    pub register_rate: f64,
    /// Registration latency (connect + GetServerKey + RegisterNode), median.
    pub register_p50: Duration,
    /// Registration latency, 99th percentile.
    pub register_p99: Duration,
    /// From the first stream opened until every stream had its full map.
    pub all_full_maps: Option<Duration>,
    /// From the first stream opened until every stream saw every peer online.
    pub all_online: Option<Duration>,
    /// From the first stream opened until every stream knew every peer's endpoints.
    pub all_endpoints: Option<Duration>,
    /// Protobuf bytes of all first full maps.
    pub full_map_bytes_total: u64,
    /// Messages on all streams after their full maps.
    pub delta_messages: u64,
    /// Protobuf bytes of those.
    pub delta_bytes: u64,
    /// Control just after it started (no node yet).
    pub usage_idle: Usage,
    /// Control after registration, before any stream.
    pub usage_registered: Usage,
    /// Control when every stream was consistent (or the run gave up).
    pub usage_end: Usage,
    /// Largest VmRSS sampled, KiB.
    pub max_sampled_rss_kib: u64,
    /// The load generator itself at the end (it shares the machine's cores with control).
    pub usage_loadgen: Usage,
    /// Join fan-out: from a node opening its stream until every stream saw it online.
    pub join_fan_out: FanOut,
    /// Endpoint fan-out: from a node reporting endpoints until every stream had them.
    pub endpoint_fan_out: FanOut,
    /// The restart phase, when it ran.
    pub restart: Option<Restart>,
    /// From SIGTERM at the end until control exited; `None` when it did not within 60 s.
    pub shutdown: Option<Duration>,
    /// What each node saw, in registration order.
    pub per_node: Vec<NodeResult>,
}

impl Report {
    /// Every node got exactly one full map, listing exactly the other nodes.
    pub fn full_maps_exact(&self) -> bool {
        self.per_node
            .iter()
            .all(|n| n.full_maps == 1 && n.full_map_exact)
    }

    /// The report as one JSON object (without the per-node list unless `per_node`).
    pub fn to_json(&self, per_node: bool) -> serde_json::Value {
        let usage = |u: &Usage| {
            serde_json::json!({
                "peak_rss_kib": u.peak_rss_kib,
                "rss_kib": u.rss_kib,
                "cpu_secs": u.cpu_secs,
            })
        };
        let secs = |d: Option<Duration>| d.map(|d| d.as_secs_f64());
        let fan_out = |f: &FanOut| {
            serde_json::json!({
                "changes": f.changes,
                "samples": f.samples,
                "p50_ms": f.p50.as_secs_f64() * 1e3,
                "p99_ms": f.p99.as_secs_f64() * 1e3,
                "max_ms": f.max.as_secs_f64() * 1e3,
            })
        };
        let mut v = serde_json::json!({
            "nodes": self.nodes,
            "concurrency": self.concurrency,
            "register_secs": self.register_time.as_secs_f64(),
            "register_rate_per_sec": self.register_rate,
            "register_p50_ms": self.register_p50.as_secs_f64() * 1e3,
            "register_p99_ms": self.register_p99.as_secs_f64() * 1e3,
            "all_full_maps_secs": secs(self.all_full_maps),
            "all_online_secs": secs(self.all_online),
            "all_endpoints_secs": secs(self.all_endpoints),
            "full_map_bytes_total": self.full_map_bytes_total,
            "full_map_bytes_per_node": self.full_map_bytes_total / self.nodes.max(1) as u64,
            "full_maps_exact": self.full_maps_exact(),
            "delta_messages": self.delta_messages,
            "delta_bytes": self.delta_bytes,
            "control_idle": usage(&self.usage_idle),
            "control_registered": usage(&self.usage_registered),
            "control_end": usage(&self.usage_end),
            "control_max_sampled_rss_kib": self.max_sampled_rss_kib,
            "loadgen": usage(&self.usage_loadgen),
            "shutdown_secs": secs(self.shutdown),
            "join_fan_out": fan_out(&self.join_fan_out),
            "endpoint_fan_out": fan_out(&self.endpoint_fan_out),
            "restart": self.restart.as_ref().map(|r| serde_json::json!({
                "down_secs": r.down.as_secs_f64(),
                "consistent_secs": secs(r.consistent),
                "resumed": r.resumed,
                "full": r.full,
                "bytes": r.bytes,
                "messages": r.messages,
                "control": usage(&r.usage),
            })),
        });
        if per_node {
            v["per_node"] = self
                .per_node
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "id": n.id,
                        "hostname": n.hostname,
                        "full_maps": n.full_maps,
                        "full_map_peers": n.full_map_peers,
                        "full_map_exact": n.full_map_exact,
                        "full_map_bytes": n.full_map_bytes,
                        "messages": n.messages,
                        "bytes": n.bytes,
                        "kinds": n.kinds,
                    })
                })
                .collect();
        }
        v
    }

    /// The report for people, one figure a line.
    pub fn to_text(&self) -> String {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let secs = |d: Option<Duration>| match d {
            Some(d) => format!("{:.2} s", d.as_secs_f64()),
            None => "not reached".into(),
        };
        let usage = |u: &Usage| {
            format!(
                "peak RSS {:.1} MiB, RSS {:.1} MiB, CPU {:.2} s",
                mib(u.peak_rss_kib),
                mib(u.rss_kib),
                u.cpu_secs
            )
        };
        let n = self.nodes.max(1) as u64;
        let fan_out = |f: &FanOut| {
            format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} changes, {} deliveries)",
                f.p50.as_secs_f64() * 1e3,
                f.p99.as_secs_f64() * 1e3,
                f.max.as_secs_f64() * 1e3,
                f.changes,
                f.samples
            )
        };
        [
            format!(
                "nodes                 {} ({} in flight)",
                self.nodes, self.concurrency
            ),
            format!(
                "registration          {:.2} s, {:.0}/s, p50 {:.1} ms, p99 {:.1} ms",
                self.register_time.as_secs_f64(),
                self.register_rate,
                self.register_p50.as_secs_f64() * 1e3,
                self.register_p99.as_secs_f64() * 1e3
            ),
            format!("all full maps         {}", secs(self.all_full_maps)),
            format!("all peers online      {}", secs(self.all_online)),
            format!("all peers' endpoints  {}", secs(self.all_endpoints)),
            format!(
                "full maps             {} bytes, {} per node, exact: {}",
                self.full_map_bytes_total,
                self.full_map_bytes_total / n,
                self.full_maps_exact()
            ),
            format!(
                "deltas                {} messages, {} bytes",
                self.delta_messages, self.delta_bytes
            ),
            format!("control idle          {}", usage(&self.usage_idle)),
            format!("control registered    {}", usage(&self.usage_registered)),
            format!("control at end        {}", usage(&self.usage_end)),
            format!(
                "control max RSS seen  {:.1} MiB",
                mib(self.max_sampled_rss_kib)
            ),
            format!("loadgen itself        {}", usage(&self.usage_loadgen)),
            format!("join fan-out          {}", fan_out(&self.join_fan_out)),
            format!("shutdown (SIGTERM)    {}", secs(self.shutdown)),
            format!("endpoint fan-out      {}", fan_out(&self.endpoint_fan_out)),
            match &self.restart {
                None => "restart               not run".into(),
                Some(r) => format!(
                    "restart (SIGKILL)     down {:.2} s, consistent {} later; {} resumed, {} full maps; {} bytes in {} messages ({} per node); {}",
                    r.down.as_secs_f64(),
                    secs(r.consistent),
                    r.resumed,
                    r.full,
                    r.bytes,
                    r.messages,
                    r.bytes / n,
                    usage(&r.usage)
                ),
            },
        ]
        .join("\n")
    }
}

/// Reads control's memory and CPU time from `/proc`.
pub fn read_usage(pid: u32) -> anyhow::Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces and parentheses): state is
    // field 3, utime 14 and stime 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    Ok(Usage {
        peak_rss_kib: field("VmHWM:"),
        rss_kib: field("VmRSS:"),
        cpu_secs: (tick(11) + tick(12)) as f64 / CLOCK_TICKS,
    })
}

/// A free loopback TCP port (free when asked; the server binds it a moment later).
fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A free loopback UDP port.
fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running `warren-control serve` in its own temporary directory; killed when dropped.
struct ControlProcess {
    child_args: Vec<std::ffi::OsString>,
    dir: tempfile::TempDir,
    config: PathBuf,
    bin: PathBuf,
    child: Child,
    url: String,
    addr: std::net::SocketAddr,
    socket: PathBuf,
}

impl ControlProcess {
    /// Starts an instance; `key`: the private key file of another instance on the same
    /// database (they share it).
    fn start(opts: &Options, key: Option<&Path>) -> anyhow::Result<Self> {
        if !opts.control_bin.is_file() {
            bail!("no control binary at {}", opts.control_bin.display());
        }
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let port = free_tcp_port()?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let url = format!("http://{addr}");
        let socket = d.join("control.sock");
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut config = format!(
            "server_url = \"{url}\"\nlisten_addr = \"{addr}\"\nunix_socket = {}\n\
             [noise]\nprivate_key_path = {}\n{}\n",
            q(&socket),
            q(key.unwrap_or(&d.join("control.key"))),
            opts.database_toml.clone().unwrap_or_else(|| format!(
                "[database]\ntype = \"sqlite\"\n[database.sqlite]\npath = {}",
                q(&d.join("db.sqlite"))
            )),
        );
        // Control's HTTP/2 pings (every 4 s, closing a connection silent for 4 s) are meant
        // for nodes on machines of their own. Here thousands of simulated nodes share the cores
        // with control, and under a join storm their answers come late: 20 s each, so the run
        // measures control, not the generator's own scheduling.
        config += "[connections]\nhttp2_ping_interval = \"20s\"\nhttp2_ping_timeout = \"20s\"\n";
        if opts.web {
            config += &format!(
                "[web]\nenabled = true\nlisten_addr = \"127.0.0.1:{}\"\n",
                free_tcp_port()?
            );
        } else {
            config += "[web]\nenabled = false\n";
        }
        if opts.embedded_derp {
            config += &format!(
                "[derp.server]\nenabled = true\nlisten_addr = \"127.0.0.1:{}\"\n\
                 stun_listen_addr = \"127.0.0.1:{}\"\nstun_alt_listen_addr = \"127.0.0.1:{}\"\n",
                free_tcp_port()?,
                free_udp_port()?,
                free_udp_port()?,
            );
        } else {
            config += "[derp.server]\nenabled = false\n";
        }
        let config_path = d.join("control.toml");
        std::fs::write(&config_path, config)?;
        let child_args = vec![
            "--config".into(),
            config_path.clone().into_os_string(),
            "serve".into(),
        ];
        let child = spawn_control(&opts.control_bin, &child_args, d)?;
        Ok(Self {
            child_args,
            dir,
            config: config_path,
            bin: opts.control_bin.clone(),
            child,
            url,
            addr,
            socket,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its private key file.
    fn key_path(&self) -> PathBuf {
        self.dir.path().join("control.key")
    }

    /// SIGKILL, and nothing more.
    fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGKILL, then the same server again on the same database and addresses.
    fn kill_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        self.child = spawn_control(&self.bin, &self.child_args, self.dir.path())?;
        Ok(())
    }

    /// The end of control's log, for error messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("control.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until the gRPC port and the admin socket accept connections.
    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("control exited at start ({status}):\n{}", self.log_tail());
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok()
                && std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("control did not start listening:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs the admin CLI with JSON output and returns what it printed.
    fn cli(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .args(["-o", "json"])
            .args(args)
            .output()
            .with_context(|| format!("running warren-control {args:?}"))?;
        if !out.status.success() {
            bail!(
                "warren-control {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("warren-control {args:?} printed no JSON"))
    }

    /// Sends SIGTERM: control closes every stream and exits.
    fn terminate(&self) -> anyhow::Result<()> {
        let pid = i32::try_from(self.pid())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        Ok(())
    }

    /// Waits up to [`STOP_DEADLINE`] for control to exit after [`Self::terminate`]; returns
    /// how long it took, or `None` when it had to be killed (SIGKILL) after that.
    async fn wait_exit(&mut self, since: Instant) -> anyhow::Result<Option<Duration>> {
        while since.elapsed() < STOP_DEADLINE {
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(
                    status.success(),
                    "control exited with {status} after SIGTERM:\n{}",
                    self.log_tail()
                );
                return Ok(Some(since.elapsed()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child.kill()?;
        self.child.wait()?;
        Ok(None)
    }
}

/// Starts `warren-control` with `args`, its output appended to `dir`/control.log.
fn spawn_control(bin: &Path, args: &[std::ffi::OsString], dir: &Path) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("control.log"))?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A fresh nonce for every proof: each run talks to a fresh server, so a counter is unique.
fn nonce() -> [u8; 24] {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&n.to_be_bytes());
    b
}

/// A connection of its own to control at `url`, set up as the node sets up its own.
async fn dial(url: &str) -> anyhow::Result<ControlClient<Channel>> {
    let channel = Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        // The node's windows (see warren's control client).
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(512 * 1024)
        .connect()
        .await
        .context("connecting")?;
    Ok(ControlClient::new(channel).max_decoding_message_size(MAX_MAP_BYTES))
}

/// One simulated node with its own connection.
struct SimNode {
    key: NodeSecretKey,
    server: ControlPublicKey,
    grpc: ControlClient<Channel>,
    id: u64,
    hostname: String,
}

impl SimNode {
    fn proof(&self, method: &str, req: &impl Message) -> NodeProof {
        make_proof(
            &self.key,
            &self.server,
            method,
            unix_ms(),
            nonce(),
            &request_digest(req),
        )
    }

    /// Connects (its own HTTP/2 connection), fetches the server key and registers.
    async fn register(url: String, auth_key: String, hostname: String) -> anyhow::Result<Self> {
        let mut grpc = dial(&url).await?;
        let key = grpc
            .get_server_key(GetServerKeyRequest {})
            .await?
            .into_inner();
        let server = ControlPublicKey::from_slice(&key.server_key).context("server key")?;
        let mut node = Self {
            key: NodeSecretKey::generate(),
            server,
            grpc,
            id: 0,
            hostname,
        };
        let mut req = RegisterNodeRequest {
            proof: None,
            auth_key,
            disco_key: DiscoSecretKey::generate().public_key().to_vec(),
            hostname: node.hostname.clone(),
        };
        req.proof = Some(node.proof("RegisterNode", &req));
        let registered = node.grpc.register_node(req).await?.into_inner();
        node.id = registered.node.context("no node in the answer")?.id;
        Ok(node)
    }

    /// A new connection to `url` (another instance on the same database).
    async fn redial(&mut self, url: &str) -> anyhow::Result<()> {
        self.grpc = dial(url).await?;
        Ok(())
    }

    async fn open_stream(
        &mut self,
        resume: Option<(u64, u64)>,
    ) -> anyhow::Result<tonic::Streaming<MapResponse>> {
        let mut req = StreamMapRequest::paged(resume);
        req.proof = Some(self.proof("StreamMapResponse", &req));
        Ok(self.grpc.stream_map_response(req).await?.into_inner())
    }

    /// Reports endpoints as the node does after opening its stream.
    async fn report(&mut self, index: usize) -> anyhow::Result<()> {
        let lan = format!(
            "10.{}.{}.{}:41641",
            (index >> 16) & 0xff,
            (index >> 8) & 0xff,
            index & 0xff
        );
        let wan = format!("198.51.100.{}:{}", index % 250 + 1, 20000 + index % 40000);
        let mut req = UpdateNodeRequest {
            proof: None,
            endpoints: Some(EndpointList {
                endpoints: vec![lan, wan],
            }),
            hostname: None,
            home_region: Some(0),
            advertised_routes: Some(RouteList { routes: vec![] }),
        };
        req.proof = Some(self.proof("UpdateNode", &req));
        self.grpc.update_node(req).await?;
        Ok(())
    }
}

/// Progress shared by the stream tasks of one phase.
#[derive(Default)]
struct Progress {
    /// Streams that have their start (a whole full map, or the changes they resumed with).
    full: AtomicUsize,
    online: AtomicUsize,
    endpoints: AtomicUsize,
}

/// Nodes joining after the mesh is up, whose fan-out is timed.
#[derive(Default)]
struct Probes {
    /// Node ids from this one up are probes (ids grow with registration).
    first_id: AtomicU64,
    /// When each probe came online, and when it reported endpoints.
    online_at: Mutex<BTreeMap<u64, Instant>>,
    endpoints_at: Mutex<BTreeMap<u64, Instant>>,
    online_lat: Mutex<Vec<Duration>>,
    endpoints_lat: Mutex<Vec<Duration>>,
    online_seen: AtomicUsize,
    endpoints_seen: AtomicUsize,
}

impl Probes {
    fn is_probe(&self, id: u64) -> bool {
        let first = self.first_id.load(Ordering::Relaxed);
        first != 0 && id >= first
    }

    /// A stream saw probe `id` online (or with endpoints); records the latency once.
    fn saw(&self, id: u64, endpoints: bool, seen: &mut std::collections::BTreeSet<(u64, bool)>) {
        if !seen.insert((id, endpoints)) {
            return;
        }
        let (at, lat, count) = if endpoints {
            (
                &self.endpoints_at,
                &self.endpoints_lat,
                &self.endpoints_seen,
            )
        } else {
            (&self.online_at, &self.online_lat, &self.online_seen)
        };
        let start = at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied();
        if let Some(start) = start {
            lat.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(start.elapsed());
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A set of node positions.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Self(vec![0; n.div_ceil(64)])
    }
    /// Sets or clears bit `i`; returns whether it changed.
    fn set(&mut self, i: usize, on: bool) -> bool {
        let (w, b) = (i / 64, 1u64 << (i % 64));
        let was = self.0[w] & b != 0;
        if on {
            self.0[w] |= b;
        } else {
            self.0[w] &= !b;
        }
        was != on
    }
}

/// What a simulated node knows of the map: kept across its streams, as a node keeps its map
/// when it reconnects.
struct View {
    reader: MapReader,
    online: Bits,
    endpoints: Bits,
    n_online: usize,
    n_endpoints: usize,
}

impl View {
    fn new(n: usize) -> Self {
        Self {
            reader: MapReader::default(),
            online: Bits::new(n),
            endpoints: Bits::new(n),
            n_online: 0,
            n_endpoints: 0,
        }
    }

    fn note(&mut self, i: Option<usize>, on: Option<bool>, eps: Option<bool>) {
        let Some(i) = i else { return };
        if let Some(on) = on
            && self.online.set(i, on)
        {
            if on {
                self.n_online += 1
            } else {
                self.n_online -= 1
            }
        }
        if let Some(eps) = eps
            && self.endpoints.set(i, eps)
        {
            if eps {
                self.n_endpoints += 1
            } else {
                self.n_endpoints -= 1
            }
        }
    }
}

/// Which phase a stream belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    First,
    AfterRestart,
}

/// Reads one node's stream until it ends, keeping count of what the node would know: which
/// peers are online and which have endpoints.
async fn drain(
    mut stream: tonic::Streaming<MapResponse>,
    mut view: View,
    mut result: NodeResult,
    ids: Arc<Vec<u64>>,
    progress: Arc<Progress>,
    probes: Arc<Probes>,
    phase: Phase,
) -> (View, NodeResult) {
    let peers = ids.len() - 1;
    let (mut started, mut all_online, mut all_endpoints) = (false, false, false);
    let mut seen = std::collections::BTreeSet::new();
    let mut first_message = true;
    let pos = |id: u64| ids.binary_search(&id).ok();
    while let Ok(Some(m)) = stream.message().await {
        let len = m.encoded_len() as u64;
        let top = m
            .kind
            .as_ref()
            .map_or("none", warren_control::metrics::kind_label);
        let in_full = matches!(m.kind, Some(Kind::Full(_) | Kind::FullPage(_)));
        let versioned = m.version != 0;
        if phase == Phase::AfterRestart {
            if first_message {
                result.restart_resumed = !in_full;
            }
            result.restart_messages += 1;
            result.restart_bytes += len;
        } else {
            result.messages += 1;
            result.bytes += len;
            if in_full && result.full_maps == 0 {
                result.full_map_bytes += len;
                result.full_map_messages += 1;
            }
        }
        first_message = false;
        *result.kinds.entry(top).or_default() += 1;
        let Ok(changes) = view.reader.read(m) else {
            break;
        };
        for kind in changes {
            match kind {
                Kind::Full(full) => {
                    if phase == Phase::First {
                        result.full_maps += 1;
                        if result.full_maps == 1 {
                            result.full_map_peers = full.peers.len();
                            let mut got: Vec<u64> = full.peers.iter().map(|p| p.id).collect();
                            got.sort_unstable();
                            let want: Vec<u64> =
                                ids.iter().copied().filter(|&i| i != result.id).collect();
                            result.full_map_exact = got == want
                                && full.self_node.as_ref().map(|s| s.id) == Some(result.id);
                        }
                    }
                    for p in &full.peers {
                        view.note(pos(p.id), Some(p.online), Some(!p.endpoints.is_empty()));
                    }
                }
                Kind::PeerAdded(p) | Kind::PeerChanged(p) => {
                    if probes.is_probe(p.id) {
                        if p.online {
                            probes.saw(p.id, false, &mut seen);
                        }
                        if !p.endpoints.is_empty() {
                            probes.saw(p.id, true, &mut seen);
                        }
                    }
                    view.note(pos(p.id), Some(p.online), Some(!p.endpoints.is_empty()))
                }
                Kind::PeerRemoved(r) => view.note(pos(r.id), Some(false), Some(false)),
                Kind::PeerEndpoints(e) => {
                    if probes.is_probe(e.id) && !e.endpoints.is_empty() {
                        probes.saw(e.id, true, &mut seen);
                    }
                    view.note(pos(e.id), None, Some(!e.endpoints.is_empty()))
                }
                Kind::PeerOnline(o) => {
                    if probes.is_probe(o.id) && o.online {
                        probes.saw(o.id, false, &mut seen);
                    }
                    view.note(pos(o.id), Some(o.online), None)
                }
                _ => {}
            }
        }
        if !started && versioned {
            started = true;
            progress.full.fetch_add(1, Ordering::Relaxed);
        }
        if started && !all_online && view.n_online == peers {
            all_online = true;
            progress.online.fetch_add(1, Ordering::Relaxed);
        }
        if started && !all_endpoints && view.n_endpoints == peers {
            all_endpoints = true;
            progress.endpoints.fetch_add(1, Ordering::Relaxed);
        }
    }
    (view, result)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Waits until `count()` reaches `n`; returns the time since `since`, or `None` past `timeout`.
async fn wait_count(
    count: impl Fn() -> usize,
    n: usize,
    since: Instant,
    timeout: Duration,
) -> Option<Duration> {
    tokio::time::timeout(timeout, async {
        while count() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        since.elapsed()
    })
    .await
    .ok()
}

type Reader = tokio::task::JoinHandle<(View, NodeResult)>;

/// Notes a stream that had to be opened again (rare: its connection went idle too long).
fn note_retry(i: usize, e: &anyhow::Error) {
    eprintln!("loadgen: node {i} opens its stream again: {e:#}");
}

/// Opens every node's stream (resuming where its view says) and starts reading it; each node
/// reports its endpoints after opening, as the node does on every connect.
// Each argument is a different piece of the run's shared state; bundling them would only move
// the list into a struct built for this one call.
#[allow(clippy::too_many_arguments)]
async fn open_streams(
    nodes: Vec<(SimNode, View, NodeResult)>,
    sem: &Arc<tokio::sync::Semaphore>,
    ids: &Arc<Vec<u64>>,
    progress: &Arc<Progress>,
    probes: &Arc<Probes>,
    phase: Phase,
    timeout: Duration,
    redial: Option<&str>,
) -> anyhow::Result<(Vec<SimNode>, Vec<(usize, Reader)>)> {
    let mut openers = tokio::task::JoinSet::new();
    for (i, (mut node, view, result)) in nodes.into_iter().enumerate() {
        let (sem, ids, progress, probes) =
            (sem.clone(), ids.clone(), progress.clone(), probes.clone());
        let redial = redial.map(str::to_owned);
        openers.spawn(async move {
            let _permit = sem.acquire_owned().await;
            if let Some(url) = &redial {
                node.redial(url)
                    .await
                    .with_context(|| format!("node {i} moving to {url}"))?;
            }
            let resume = view.reader.resume_point();
            // A node that waited its turn longer than control's idle timeout (5 minutes) finds
            // its connection closed; like a node, it connects again (tonic redials on the next
            // call) and retries.
            let mut attempt = 0;
            let stream = loop {
                attempt += 1;
                match node.open_stream(resume).await {
                    Ok(stream) => break stream,
                    Err(e) if attempt < 3 => {
                        note_retry(i, &e);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e.context(format!("opening node {i}'s stream"))),
                }
            };
            let reader = tokio::spawn(drain(stream, view, result, ids, progress, probes, phase));
            node.report(i)
                .await
                .with_context(|| format!("node {i} reporting endpoints"))?;
            // The node (and so its connection) lives as long as its stream task.
            anyhow::Ok((i, node, reader))
        });
    }
    let mut held = Vec::with_capacity(openers.len());
    let mut readers = Vec::with_capacity(openers.len());
    let deadline = tokio::time::Instant::now() + timeout;
    while let Some(joined) = tokio::time::timeout_at(deadline, openers.join_next())
        .await
        .map_err(|_| anyhow::anyhow!("opening streams timed out"))?
    {
        let (i, node, reader) = joined??;
        held.push((i, node));
        readers.push((i, reader));
    }
    held.sort_by_key(|(i, _)| *i);
    readers.sort_by_key(|(i, _)| *i);
    Ok((held.into_iter().map(|(_, n)| n).collect(), readers))
}

/// Waits for every reader to end (their streams ended with control) and returns what each
/// saw, in node order.
async fn collect(readers: Vec<(usize, Reader)>) -> anyhow::Result<Vec<(View, NodeResult)>> {
    let mut out = Vec::with_capacity(readers.len());
    for (_, reader) in readers {
        let r = tokio::time::timeout(Duration::from_secs(30), reader)
            .await
            .context("a stream outlived control")??;
        out.push(r);
    }
    Ok(out)
}

/// Joins `n` probe nodes one after another and times their fan-out: online to every stream,
/// then their endpoints to every stream. Returns (join, endpoint) fan-out.
async fn run_probes(
    n: usize,
    control: &ControlProcess,
    auth_key: &str,
    streams: usize,
    probes: &Arc<Probes>,
    log: &impl Fn(String),
) -> anyhow::Result<(FanOut, FanOut)> {
    let mut held = Vec::new();
    for p in 0..n {
        let mut node =
            SimNode::register(control.url.clone(), auth_key.into(), format!("probe-{p}")).await?;
        if p == 0 {
            probes.first_id.store(node.id, Ordering::Relaxed);
        }
        let before = (
            probes.online_seen.load(Ordering::Relaxed),
            probes.endpoints_seen.load(Ordering::Relaxed),
        );
        probes
            .online_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.id, Instant::now());
        let mut stream = node.open_stream(None).await?;
        let drainer =
            tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
        let t = Instant::now();
        let seen = || probes.online_seen.load(Ordering::Relaxed) - before.0;
        if wait_count(seen, streams, t, Duration::from_secs(30))
            .await
            .is_none()
        {
            log(format!(
                "probe {p}: only {} of {streams} streams saw it online",
                seen()
            ));
        }
        probes
            .endpoints_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.id, Instant::now());
        node.report(1_000_000 + p).await?;
        let seen = || probes.endpoints_seen.load(Ordering::Relaxed) - before.1;
        if wait_count(seen, streams, t, Duration::from_secs(30))
            .await
            .is_none()
        {
            log(format!(
                "probe {p}: only {} of {streams} streams saw its endpoints",
                seen()
            ));
        }
        held.push((node, drainer));
    }
    for (_, drainer) in held {
        drainer.abort();
    }
    let take = |m: &Mutex<Vec<Duration>>| {
        std::mem::take(&mut *m.lock().unwrap_or_else(|e| e.into_inner()))
    };
    Ok((
        FanOut::from(take(&probes.online_lat), n),
        FanOut::from(take(&probes.endpoints_lat), n),
    ))
}

/// Runs the whole load: starts control, registers and streams `opts.nodes` nodes, times
/// fan-out, kills and restarts control, stops it (SIGTERM) and reports.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    anyhow::ensure!(opts.nodes >= 2, "at least 2 nodes");
    let concurrency = opts.concurrency.max(1);
    // Each node holds a connection: more descriptors than the usual soft limit of 1024.
    let limit = warren_control::listen::raise_nofile_limit()?;
    if let Some(limit) = limit
        && limit < opts.nodes as u64 + 64
    {
        bail!(
            "{} nodes need more open files than the limit of {limit}",
            opts.nodes
        );
    }
    let log = |msg: String| {
        if opts.verbose {
            eprintln!("loadgen: {msg}");
        }
    };
    let mut control = ControlProcess::start(opts, None)?;
    control.wait_ready(Duration::from_secs(30)).await?;
    // A second instance on the same database, standing by (failover).
    let mut standby = if opts.failover && opts.restart {
        anyhow::ensure!(
            opts.database_toml.is_some(),
            "failover needs a shared database (PostgreSQL)"
        );
        let key = control.key_path();
        let mut b = ControlProcess::start(opts, Some(&key))?;
        b.wait_ready(Duration::from_secs(30)).await?;
        log(format!("standby instance pid {} at {}", b.pid(), b.url));
        Some(b)
    } else {
        None
    };
    let pid = control.pid();
    log(format!("control pid {pid} at {}", control.url));

    // Sample control every 100 ms (whichever process it is now).
    let max_rss = Arc::new(Mutex::new(0u64));
    let current_pid = Arc::new(AtomicU64::new(u64::from(pid)));
    let sampler = {
        let (max_rss, current_pid) = (max_rss.clone(), current_pid.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let pid = u32::try_from(current_pid.load(Ordering::Relaxed)).unwrap_or(0);
                let Ok(u) = read_usage(pid) else { continue };
                let mut m = max_rss.lock().unwrap_or_else(|e| e.into_inner());
                *m = (*m).max(u.rss_kib);
            }
        })
    };
    let usage_idle = read_usage(pid)?;

    control.cli(&["users", "create", "loadgen"])?;
    let key = control.cli(&[
        "preauthkeys",
        "create",
        "--user",
        "loadgen",
        "--reusable",
        "--expiration",
        "24h",
    ])?;
    let auth_key = key["secret"]
        .as_str()
        .context("preauthkeys create printed no secret")?
        .to_string();

    // Registration.
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.nodes {
        let (sem, url, auth_key) = (sem.clone(), control.url.clone(), auth_key.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let t = Instant::now();
            let node = SimNode::register(url, auth_key, format!("load-{i}"))
                .await
                .with_context(|| format!("registering node {i}"));
            (i, t.elapsed(), node)
        });
    }
    let mut slots: Vec<Option<SimNode>> = (0..opts.nodes).map(|_| None).collect();
    let mut latencies = Vec::with_capacity(opts.nodes);
    let deadline = tokio::time::Instant::now() + opts.timeout;
    while let Some(joined) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .map_err(|_| anyhow::anyhow!("registration timed out"))?
    {
        let (i, took, node) = joined?;
        slots[i] = Some(node?);
        latencies.push(took);
    }
    let register_time = started.elapsed();
    latencies.sort_unstable();
    let usage_registered = read_usage(pid)?;
    log(format!(
        "{} registered in {:.2} s",
        opts.nodes,
        register_time.as_secs_f64()
    ));
    let nodes: Vec<SimNode> = slots.into_iter().flatten().collect();
    let mut ids: Vec<u64> = nodes.iter().map(|n| n.id).collect();
    ids.sort_unstable();
    ids.dedup();
    anyhow::ensure!(ids.len() == opts.nodes, "node ids are not distinct");
    let ids = Arc::new(ids);

    // Streams: open, then report endpoints, as the node does.
    let progress = Arc::new(Progress::default());
    let probes = Arc::new(Probes::default());
    let started = Instant::now();
    let first: Vec<(SimNode, View, NodeResult)> = nodes
        .into_iter()
        .map(|node| {
            let result = NodeResult {
                id: node.id,
                hostname: node.hostname.clone(),
                ..NodeResult::default()
            };
            (node, View::new(opts.nodes), result)
        })
        .collect();
    let (held, readers) = open_streams(
        first,
        &sem,
        &ids,
        &progress,
        &probes,
        Phase::First,
        opts.timeout,
        None,
    )
    .await?;
    log(format!(
        "{} streams open in {:.2} s",
        opts.nodes,
        started.elapsed().as_secs_f64()
    ));
    let n = opts.nodes;
    let all_full_maps = wait_count(
        || progress.full.load(Ordering::Relaxed),
        n,
        started,
        opts.timeout,
    )
    .await;
    log(format!("all full maps: {all_full_maps:?}"));
    let all_online = wait_count(
        || progress.online.load(Ordering::Relaxed),
        n,
        started,
        opts.timeout,
    )
    .await;
    log(format!("all online: {all_online:?}"));
    let all_endpoints = wait_count(
        || progress.endpoints.load(Ordering::Relaxed),
        n,
        started,
        opts.timeout,
    )
    .await;
    log(format!("all endpoints: {all_endpoints:?}"));
    let usage_end = read_usage(pid)?;

    let (join_fan_out, endpoint_fan_out) = if opts.probes > 0 {
        let f = run_probes(opts.probes, &control, &auth_key, n, &probes, &log).await?;
        log(format!(
            "fan-out p99: join {:?}, endpoints {:?}",
            f.0.p99, f.1.p99
        ));
        f
    } else {
        (FanOut::default(), FanOut::default())
    };

    let stop_at: Instant;
    let (per_node, restart) = if opts.restart {
        let killed = Instant::now();
        let redial = match standby.take() {
            // The first instance dies for good; every node moves to the other.
            Some(b) => {
                control.kill()?;
                control = b;
                Some(control.url.clone())
            }
            None => {
                control.kill_and_restart()?;
                None
            }
        };
        current_pid.store(u64::from(control.pid()), Ordering::Relaxed);
        let seen = collect(readers).await?;
        control.wait_ready(Duration::from_secs(60)).await?;
        let down = killed.elapsed();
        log(format!("control back after {:.2} s", down.as_secs_f64()));
        let mut results = Vec::with_capacity(n);
        let again: Vec<(SimNode, View, NodeResult)> = held
            .into_iter()
            .zip(seen)
            .map(|(node, (mut view, result))| {
                if !opts.resume {
                    view.reader.forget();
                }
                (node, view, result)
            })
            .collect();
        let progress = Arc::new(Progress::default());
        let back = Instant::now();
        let (held, readers) = open_streams(
            again,
            &sem,
            &ids,
            &progress,
            &probes,
            Phase::AfterRestart,
            opts.timeout,
            redial.as_deref(),
        )
        .await?;
        let consistent = wait_count(
            || progress.online.load(Ordering::Relaxed),
            n,
            back,
            opts.timeout,
        )
        .await;
        log(format!("consistent again: {consistent:?}"));
        let usage = read_usage(control.pid())?;
        stop_at = Instant::now();
        control.terminate()?;
        for (_, r) in collect(readers).await? {
            results.push(r);
        }
        drop(held);
        let restart = Restart {
            down,
            consistent,
            resumed: results.iter().filter(|r| r.restart_resumed).count(),
            full: results.iter().filter(|r| !r.restart_resumed).count(),
            bytes: results.iter().map(|r| r.restart_bytes).sum(),
            messages: results.iter().map(|r| r.restart_messages).sum(),
            usage,
        };
        (results, Some(restart))
    } else {
        stop_at = Instant::now();
        control.terminate()?;
        let results = collect(readers)
            .await?
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        drop(held);
        (results, None)
    };
    let shutdown = control.wait_exit(stop_at).await?;
    let usage_loadgen = read_usage(std::process::id())?;
    sampler.abort();
    let max_sampled_rss_kib =
        (*max_rss.lock().unwrap_or_else(|e| e.into_inner())).max(usage_end.rss_kib);
    let full_map_bytes_total = per_node.iter().map(|n| n.full_map_bytes).sum();
    let delta_messages = per_node
        .iter()
        .map(|n| n.messages.saturating_sub(n.full_map_messages))
        .sum();
    let delta_bytes = per_node.iter().map(|n| n.bytes - n.full_map_bytes).sum();
    Ok(Report {
        nodes: opts.nodes,
        concurrency,
        register_time,
        register_rate: opts.nodes as f64 / register_time.as_secs_f64().max(1e-9),
        register_p50: percentile(&latencies, 0.50),
        register_p99: percentile(&latencies, 0.99),
        all_full_maps,
        all_online,
        all_endpoints,
        full_map_bytes_total,
        delta_messages,
        delta_bytes,
        usage_idle,
        usage_registered,
        usage_end,
        max_sampled_rss_kib,
        usage_loadgen,
        join_fan_out,
        endpoint_fan_out,
        restart,
        shutdown,
        per_node,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_usage_is_read_from_proc() {
        let u = read_usage(std::process::id()).expect("/proc");
        assert!(u.rss_kib > 0, "{u:?}");
        assert!(u.peak_rss_kib >= u.rss_kib, "{u:?}");
        assert!(u.cpu_secs >= 0.0, "{u:?}");
    }

    #[test]
    fn bits_report_changes_and_percentiles_pick_ranks() {
        let mut b = Bits::new(130);
        assert!(b.set(129, true));
        assert!(!b.set(129, true));
        assert!(b.set(129, false));
        assert!(!b.set(0, false));
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 0.5), Duration::from_millis(51));
        assert_eq!(percentile(&ms, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&[], 0.99), Duration::ZERO);
    }
}
