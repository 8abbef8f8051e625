//! The node's side of the control protocol: a gRPC client that seals a fresh proof of its node
//! key into every call, registers, reports endpoints, and follows the map stream, reconnecting
//! with backoff when control goes away. The data plane never waits on it.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};
use warren_node_core::netmap::MapReader;
use warren_proto::backoff::Backoff;
use warren_proto::control::control_client::ControlClient;
use warren_proto::control::map_response::Kind;
use warren_proto::control::*;
use warren_proto::proof::{make_proof, request_digest};
use warren_proto::{ControlPublicKey, DiscoPublicKey, NodeSecretKey};

/// Largest map message the node accepts (a full map of about 100,000 peers).
pub const MAX_MAP_BYTES: usize = 64 << 20;

/// A connection to control, able to prove the node's identity.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: ControlClient<Channel>,
    node: NodeSecretKey,
    server: ControlPublicKey,
}

/// Opens the TCP connection for tonic to `uri`'s host and port (80, or 443 for https, when the URL names
/// none),
/// with the node's bypass mark set before connecting (see [`crate::os_net::mark_own_socket`])
/// and Nagle off, as tonic's own connector has it. Each resolved address is tried in turn, for
/// at most [`ADDRESS_TIMEOUT`] (a name with several addresses is several control instances: one
/// that vanished must not hold up the others); tonic's connect timeout bounds the whole.
async fn dial_marked(uri: Uri) -> std::io::Result<TokioIo<TcpStream>> {
    use std::os::fd::AsFd;
    let host = uri.host().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("control URL {uri} has no host"),
        )
    })?;
    // An IPv6 literal comes with its brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        crate::os_net::mark_own_socket(socket.as_fd(), "control");
        match tokio::time::timeout(ADDRESS_TIMEOUT, socket.connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(TokioIo::new(stream));
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out"),
                ));
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} has no address"),
        )
    }))
}

/// How long one of control's addresses gets to accept a connection before the next is tried.
const ADDRESS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long connecting to control may take, over all its addresses.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/2 receive window of the map stream: what control may have in flight to this node.
/// A full map arrives in 7 KiB pages read as they come, so 256 KiB keeps the pipe full over
/// long round trips while control holds little per node (hyper's client default is 2 MiB,
/// which at ten thousand nodes is gigabytes control may have to buffer for slow readers).
pub const STREAM_WINDOW: u32 = 256 * 1024;
/// The connection's window: the map stream and the occasional unary call.
pub const CONNECTION_WINDOW: u32 = 512 * 1024;

/// The control URLs `--control` names: one, or several instances on one database separated by
/// commas, in order of preference.
pub fn control_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Client {
    /// Connects to the first of `urls` that answers; returns the client and which URL it was.
    pub async fn connect_any(
        urls: &[String],
        node: NodeSecretKey,
    ) -> anyhow::Result<(Self, usize)> {
        let mut failures = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            match Self::connect(url, node.clone()).await {
                Ok(client) => return Ok((client, i)),
                Err(e) => {
                    tracing::warn!(%url, error = %format!("{e:#}"), "control instance unreachable");
                    failures.push(format!("{e:#}"));
                }
            }
        }
        if failures.is_empty() {
            anyhow::bail!("no control URL given");
        }
        anyhow::bail!("no control instance answered: {}", failures.join("; "))
    }

    /// Connects to `url` and fetches the server's key. The TCP connection carries the bypass
    /// mark, so it reaches control by the host's routes even when an exit
    /// node or a subnet route covers control's address.
    pub async fn connect(url: &str, node: NodeSecretKey) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(url.to_string())
            .with_context(|| format!("bad control URL {url:?}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .connect_with_connector(tower::service_fn(dial_marked))
            .await
            .with_context(|| format!("connecting to control at {url}"))?;
        // Full maps of large meshes exceed tonic's 4 MiB default.
        let mut grpc = ControlClient::new(channel).max_decoding_message_size(MAX_MAP_BYTES);
        let key = grpc
            .get_server_key(GetServerKeyRequest {})
            .await
            .context("fetching control's key")?;
        let server = ControlPublicKey::from_slice(&key.into_inner().server_key)
            .context("control sent a malformed key")?;
        Ok(Self { grpc, node, server })
    }

    /// A fresh proof for `method` over `req` (which carries no proof yet).
    fn proof(&self, method: &str, req: &impl prost::Message) -> NodeProof {
        let mut nonce = [0u8; 24];
        // Without an OS generator the nonce stays zero and control refuses it as a replay
        // after first use, which shows up as a clear error rather than a weaker proof.
        let _ = getrandom::getrandom(&mut nonce);
        make_proof(
            &self.node,
            &self.server,
            method,
            warren_proto::proof::unix_ms(),
            nonce,
            &request_digest(req),
        )
    }

    /// Registers with a pre-auth key (ignored by control when the node is known).
    pub async fn register(
        &mut self,
        auth_key: &str,
        disco: DiscoPublicKey,
        hostname: &str,
    ) -> Result<Node, tonic::Status> {
        let mut req = RegisterNodeRequest {
            proof: None,
            auth_key: auth_key.to_string(),
            disco_key: disco.to_vec(),
            hostname: hostname.to_string(),
        };
        req.proof = Some(self.proof("RegisterNode", &req));
        let node = self.grpc.register_node(req).await?.into_inner().node;
        node.ok_or_else(|| tonic::Status::internal("control answered without a node"))
    }

    /// Reports what peers need to reach this node: its endpoints and home DERP region.
    pub async fn report(&mut self, advert: &Advert) -> Result<(), tonic::Status> {
        let mut req = UpdateNodeRequest {
            proof: None,
            endpoints: Some(EndpointList {
                endpoints: advert.endpoints.iter().map(|e| e.to_string()).collect(),
            }),
            hostname: None,
            home_region: Some(advert.home_region),
            advertised_routes: Some(RouteList {
                routes: advert.routes.iter().map(|r| r.to_string()).collect(),
            }),
        };
        req.proof = Some(self.proof("UpdateNode", &req));
        self.grpc.update_node(req).await.map(|_| ())
    }

    /// Opens the map stream; with `resume` (map id, version applied), control may send only
    /// what changed since.
    pub async fn stream(
        &mut self,
        resume: Option<(u64, u64)>,
    ) -> Result<tonic::Streaming<MapResponse>, tonic::Status> {
        let mut req = StreamMapRequest::paged(resume);
        req.proof = Some(self.proof("StreamMapResponse", &req));
        Ok(self.grpc.stream_map_response(req).await?.into_inner())
    }
}

/// What the node tells control about how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Advert {
    /// LAN and NAT-mapped UDP endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Home DERP region; 0 for none.
    pub home_region: u32,
    /// Routes this node offers to serve (subnet routes; 0.0.0.0/0 and ::/0 for an exit node).
    pub routes: Vec<ipnet::IpNet>,
}

/// What the map follower tells the daemon.
#[derive(Debug)]
pub enum MapEvent {
    /// The stream is open (again).
    Connected,
    /// One message of the stream.
    Message(Box<Kind>),
    /// The stream ended; the follower retries.
    Disconnected {
        /// Why.
        reason: String,
        /// Control said this node is deleted or expired: its peers must go.
        revoked: bool,
    },
}

/// The first wait before reconnecting to control.
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait before reconnecting to control.
const MAX_BACKOFF: Duration = Duration::from_secs(15);

/// Follows the map stream forever: connect, report endpoints, forward messages; on failure wait
/// with jittered exponential backoff (250 ms up to 15 s, see [`Backoff`]) and start over, so a
/// fleet that lost one control server does not come back to it in lockstep. With several
/// control URLs (instances on one database) each failure moves on to the next one, starting at
/// `first`; the stream resumes there from the version the node applied, since versions are the
/// database's. Tunnels are untouched throughout: only the map stream moves.
pub async fn follow(
    urls: Vec<String>,
    first: usize,
    node: NodeSecretKey,
    mut advert: watch::Receiver<Advert>,
    events: mpsc::Sender<MapEvent>,
) {
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    // Kept across reconnects: the version the daemon has applied, to resume from.
    let mut reader = MapReader::default();
    let mut at = first % urls.len().max(1);
    loop {
        let Some(url) = urls.get(at) else {
            tracing::error!("no control URL to follow");
            return;
        };
        let mut connected = false;
        let result = follow_once(
            url,
            &node,
            &mut advert,
            &events,
            &mut connected,
            &mut reader,
        )
        .await;
        if connected {
            // The stream was up: start backing off from the beginning again.
            backoff.reset();
        }
        let (reason, revoked) = match result {
            Ok(()) => ("control closed the stream".to_string(), false),
            Err(Failure::Status(s)) => {
                let revoked = matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::PermissionDenied
                );
                (format!("{} ({:?})", s.message(), s.code()), revoked)
            }
            Err(Failure::Other(e)) => (format!("{e:#}"), false),
            Err(Failure::Stopped) => return,
        };
        let wait = backoff.next_wait(crate::random_u64());
        if revoked {
            // A deleted or expired node has no reason to come back soon; the daemon drops its
            // map, so the next stream starts with a full one.
            backoff.give_up_soon();
            reader.forget();
        }
        if urls.len() > 1 {
            at = (at + 1) % urls.len();
        }
        tracing::warn!(%reason, retry_in = ?wait, next = %urls[at], "control stream down");
        if events
            .send(MapEvent::Disconnected { reason, revoked })
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

enum Failure {
    Status(tonic::Status),
    Other(anyhow::Error),
    Stopped,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Self::Status(s)
    }
}

/// How long resolving one DERP server's name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Fills in the address of DERP servers the map names only by host name (Tailscale's maps
/// usually do), so netcheck can STUN them and the DERP connection dials the address. A name
/// that does not resolve is left alone: its DERP URL still resolves when it connects.
async fn resolve_derp_names(map: &mut DerpMap) {
    for node in map.regions.iter_mut().flat_map(|r| r.nodes.iter_mut()) {
        let name = node.host_name.as_str();
        if !node.ipv4.is_empty()
            || !node.ipv6.is_empty()
            || name.is_empty()
            || name.parse::<std::net::IpAddr>().is_ok()
        {
            continue;
        }
        match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
            Ok(Ok(addrs)) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                // IPv4 first, as the STUN and DERP sockets are.
                if let Some(a) = addrs.iter().find(|a| a.is_ipv4()) {
                    node.ipv4 = a.ip().to_string();
                } else if let Some(a) = addrs.first() {
                    node.ipv6 = a.ip().to_string();
                }
            }
            Ok(Err(e)) => tracing::warn!(host = name, error = %e, "cannot resolve DERP server"),
            Err(_) => tracing::warn!(host = name, "resolving DERP server timed out"),
        }
    }
}

async fn follow_once(
    url: &str,
    node: &NodeSecretKey,
    advert: &mut watch::Receiver<Advert>,
    events: &mpsc::Sender<MapEvent>,
    connected: &mut bool,
    reader: &mut MapReader,
) -> Result<(), Failure> {
    let mut client = Client::connect(url, node.clone())
        .await
        .map_err(Failure::Other)?;
    reader.restart();
    let resume = reader.resume_point();
    let mut stream = client.stream(resume).await?;
    if let Some((_, version)) = resume {
        tracing::debug!(version, "resuming the map stream");
    }
    let current = advert.borrow_and_update().clone();
    client.report(&current).await?;
    events
        .send(MapEvent::Connected)
        .await
        .map_err(|_| Failure::Stopped)?;
    *connected = true;
    loop {
        tokio::select! {
            msg = stream.message() => match msg? {
                Some(m) => {
                    tracing::trace!(seq = m.seq, version = m.version, "map message");
                    // A message that does not make sense ends the stream; the next one starts
                    // over with a full map.
                    let kinds = reader.read(m).map_err(|e| {
                        reader.forget();
                        Failure::Other(anyhow::anyhow!("bad map message: {e}"))
                    })?;
                    for mut kind in kinds {
                        let derp_map = match &mut kind {
                            Kind::Full(full) => full.derp_map.as_mut(),
                            Kind::SettingsChanged(s) => s.derp_map.as_mut(),
                            _ => None,
                        };
                        if let Some(derp_map) = derp_map {
                            resolve_derp_names(derp_map).await;
                        }
                        events.send(MapEvent::Message(Box::new(kind))).await.map_err(|_| Failure::Stopped)?;
                    }
                }
                None => return Ok(()),
            },
            changed = advert.changed() => {
                if changed.is_err() {
                    return Err(Failure::Stopped);
                }
                let current = advert.borrow_and_update().clone();
                tracing::debug!(endpoints = ?current.endpoints, home = current.home_region, "reporting to control");
                client.report(&current).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_urls_are_a_comma_separated_list_in_order() {
        assert_eq!(
            control_urls("http://a:1, http://b:2,,http://c:3 "),
            vec!["http://a:1", "http://b:2", "http://c:3"]
        );
        assert_eq!(control_urls("http://only:1"), vec!["http://only:1"]);
        assert!(control_urls(" , ").is_empty());
    }

    #[tokio::test]
    async fn control_is_dialled_by_name_and_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("listen");
        let port = listener.local_addr().expect("addr").port();
        for url in [
            format!("http://127.0.0.1:{port}"),
            format!("http://localhost:{port}/"),
        ] {
            let uri: Uri = url.parse().expect("uri");
            let io = dial_marked(uri).await.expect("dial");
            let (_, from) = listener.accept().await.expect("accept");
            assert_eq!(io.inner().local_addr().expect("local"), from, "{url}");
            if let Some(mark) = crate::os_net::own_socket_mark() {
                let got = socket2::SockRef::from(io.inner()).mark().expect("mark");
                assert_eq!(got, mark, "control's socket carries the bypass mark");
            }
        }
        let err = dial_marked("http://127.0.0.1:1".parse().expect("uri"))
            .await
            .expect_err("nothing listens on port 1");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    #[tokio::test]
    async fn derp_names_are_resolved_and_literals_left_alone() {
        let node = |host: &str, ipv4: &str| DerpNode {
            host_name: host.into(),
            ipv4: ipv4.into(),
            ..DerpNode::default()
        };
        let mut map = DerpMap {
            regions: vec![DerpRegion {
                region_id: 1,
                nodes: vec![
                    node("localhost", ""),
                    node("derp.example", "192.0.2.1"),
                    node("192.0.2.2", ""),
                ],
                ..DerpRegion::default()
            }],
        };
        resolve_derp_names(&mut map).await;
        let ips: Vec<&str> = map.regions[0]
            .nodes
            .iter()
            .map(|n| n.ipv4.as_str())
            .collect();
        assert_eq!(ips, ["127.0.0.1", "192.0.2.1", ""]);
    }
}
