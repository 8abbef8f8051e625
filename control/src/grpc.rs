//! The gRPC services: `Control` for nodes (every call but GetServerKey proven with the node's
//! key) and `Admin` for operators (an API key over TCP; none over the local unix socket). They
//! check input, lock the [`Core`] briefly, and turn results into responses.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc};
use tokio_stream::Stream;
use tonic::codegen::http;
use tonic::{Request, Response, Status};
use warren_proto::control::admin_server::Admin;
use warren_proto::control::control_server::Control;
use warren_proto::control::map_response::Kind;
use warren_proto::control::*;
use warren_proto::proof::{ReplayGuard, request_digest, unix_ms, verify_proof};
use warren_proto::{ControlSecretKey, DiscoPublicKey, NodePublicKey};

use crate::config::PolicyMode;
use crate::core::{Core, NewAuthKey};
use crate::error::ControlError;
use crate::listen::ConnInfo;
use crate::policy::{CompiledPolicy, Explanation, NodeId, PolicyState, Section};
use crate::store::{ApiKeyRecord, PreAuthKeyRecord};
use warren_derp::log_limit::LogLimiter;

/// Largest request message accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Largest policy text accepted (a file, or `policy set`/`check`), in bytes.
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;
/// Largest Admin request accepted: a policy and its envelope.
pub const MAX_ADMIN_REQUEST_BYTES: usize = MAX_POLICY_BYTES + 4096;
/// Most (source, destination) pairs one `policy explain` answers.
pub const MAX_EXPLAIN_PAIRS: usize = 1000;
pub use crate::core::TAGGED_DEVICES;

/// How tonic words the INTERNAL statuses it answers a request it cannot decode with (prost's
/// `DecodeError`, a bad frame, a missing message). gRPC's status table calls a request that
/// does not parse INTERNAL; to the sender it is its own error, INVALID_ARGUMENT.
const DECODE_FAILURES: [&str; 5] = [
    "failed to decode Protobuf message",
    "protocol error:",
    "Missing request message",
    "Unexpected EOF decoding stream",
    "Error decompressing",
];

/// Whether `status` is tonic's answer to a request it could not decode.
fn is_decode_failure(status: &Status) -> bool {
    status.code() == tonic::Code::Internal
        && DECODE_FAILURES
            .iter()
            .any(|prefix| status.message().starts_with(prefix))
}

/// Answers requests tonic could not decode with INVALID_ARGUMENT instead of INTERNAL, and logs
/// them (a warning, rate-limited: any peer can send them).
#[derive(Debug, Clone)]
pub struct MalformedRequestLayer {
    logs: Arc<LogLimiter>,
}

impl MalformedRequestLayer {
    /// Logs through `logs`.
    pub fn new(logs: Arc<LogLimiter>) -> Self {
        Self { logs }
    }
}

impl<S> tower::Layer<S> for MalformedRequestLayer {
    type Service = MalformedRequest<S>;

    fn layer(&self, inner: S) -> MalformedRequest<S> {
        MalformedRequest {
            inner,
            logs: Arc::clone(&self.logs),
        }
    }
}

/// The service [`MalformedRequestLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct MalformedRequest<S> {
    inner: S,
    logs: Arc<LogLimiter>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for MalformedRequest<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<ConnInfo>().map(ConnInfo::peer);
        let method = req.uri().path().to_owned();
        let logs = Arc::clone(&self.logs);
        let response = self.inner.call(req);
        Box::pin(async move {
            let mut response = response.await?;
            // A request refused before its handler ran carries its status in the headers.
            if let Some(status) = Status::from_header_map(response.headers())
                && is_decode_failure(&status)
            {
                let refused =
                    Status::invalid_argument(format!("malformed request: {}", status.message()));
                if refused.add_header(response.headers_mut()).is_err() {
                    tracing::debug!("cannot rewrite a status header");
                }
                if let Some(held_back) = logs.allow() {
                    let peer = peer.map(|p| p.to_string()).unwrap_or_default();
                    tracing::warn!(%peer, %method, error = status.message(), held_back,
                        "malformed request");
                }
            }
            Ok(response)
        })
    }
}

fn random30() -> Result<[u8; 30], Status> {
    let mut b = [0u8; 30];
    getrandom::getrandom(&mut b).map_err(|_| Status::internal("no randomness available"))?;
    Ok(b)
}

/// State shared by both services.
#[derive(Debug)]
pub struct Shared {
    /// The server's state.
    pub core: Mutex<Core>,
    /// The server's key, for opening node proofs.
    pub key: ControlSecretKey,
    /// How often an idle map stream gets a keepalive.
    pub keepalive: Duration,
    /// How long an ephemeral node may stay offline.
    pub ephemeral_timeout: Duration,
    /// Nonces of recently accepted node proofs.
    pub replay: std::sync::Mutex<ReplayGuard>,
    /// The database, for what is checked outside the core (proof nonces every instance on a
    /// shared database must see).
    pub store: Arc<dyn crate::store::Store>,
    /// Set to true when the server shuts down; map streams then end.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Where the access policy comes from, and its text in force.
    pub policy: PolicySource,
    /// The server's Prometheus metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Where the access policy comes from (`policy.mode`, `policy.path`) and the text in force, kept
/// beside the core so `policy get` returns exactly what is enforced.
#[derive(Debug)]
pub struct PolicySource {
    /// `policy.mode`.
    pub mode: PolicyMode,
    /// The policy file (file mode with a path configured).
    pub path: Option<std::path::PathBuf>,
    /// The text in force; `None`: no policy. Changed only with the core locked, together with
    /// the core's policy.
    text: std::sync::Mutex<Option<Arc<str>>>,
}

impl PolicySource {
    /// A source with `text` in force.
    pub fn new(mode: PolicyMode, path: Option<std::path::PathBuf>, text: Option<Arc<str>>) -> Self {
        Self {
            mode,
            path,
            text: std::sync::Mutex::new(text),
        }
    }

    /// The text in force (`None`: no policy).
    pub fn text(&self) -> Option<Arc<str>> {
        self.text
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Records the text now in force; call with the core locked, right after the core's policy
    /// changed.
    pub fn set_text(&self, text: Option<Arc<str>>) {
        *self
            .text
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = text;
    }
}

/// Compiles a policy text, refusing one above [`MAX_POLICY_BYTES`].
pub fn compile_policy(text: &str) -> Result<CompiledPolicy, ControlError> {
    if text.len() > MAX_POLICY_BYTES {
        return Err(ControlError::PolicyTooLarge {
            size: text.len(),
            max: MAX_POLICY_BYTES,
        });
    }
    Ok(CompiledPolicy::from_text(text)?)
}

impl Shared {
    /// Runs `work` on the core on a blocking thread: core calls that write to the database
    /// (SQLite, synchronous) never hold up the async threads that serve the map streams.
    pub async fn with_core<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&mut Core) -> T + Send + 'static,
    ) -> T {
        let shared = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || work(&mut shared.core.blocking_lock()));
        match task.await {
            Ok(out) => out,
            // A panic in the core is a bug: carry it to the caller as if it had run here.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Checks an API key, as every Admin call over TCP does and the web admin page's login and
    /// sessions do (one rule for both), and records its use (a database write, so off the
    /// async threads).
    pub async fn check_api_key(self: &Arc<Self>, key: &str) -> Result<(), ControlError> {
        let key = key.to_owned();
        self.with_core(move |core| core.check_api_key(&key, unix_ms()))
            .await
    }

    /// Checks a node proof for `method` over `rest` (the request with its proof taken out).
    /// Its nonce is claimed in this process and, on a shared database, in the database, so a
    /// captured request replayed to another instance is refused there too.
    pub async fn prove(
        &self,
        proof: Option<NodeProof>,
        rest: &impl prost::Message,
        method: &str,
        now: i64,
    ) -> Result<NodePublicKey, ControlError> {
        let digest = request_digest(rest);
        let proven = verify_proof(&self.key, proof.as_ref(), method, now, &digest)?;
        self.replay
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .check(proven.nonce, now)?;
        if self.store.shared() {
            let store = Arc::clone(&self.store);
            let forget = now - 2 * warren_proto::proof::MAX_SKEW_MS;
            let fresh =
                tokio::task::spawn_blocking(move || store.claim_nonce(&proven.nonce, now, forget))
                    .await
                    .map_err(|e| crate::store::StoreError::Backend {
                        message: format!("nonce check did not finish: {e}"),
                    })??;
            if !fresh {
                return Err(warren_proto::proof::ProofError::Replayed.into());
            }
        }
        Ok(proven.node)
    }
}

/// The `Control` service.
#[derive(Debug, Clone)]
pub struct ControlService {
    shared: Arc<Shared>,
}

impl ControlService {
    /// A service over `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Checks the call's proof (outside the lock), then authenticates the node and returns the
    /// core still locked: the call's work runs under the same lock, so the node cannot be
    /// expired or deleted between the check and the work.
    async fn authenticate(
        &self,
        proof: Option<NodeProof>,
        rest: &impl prost::Message,
        method: &str,
    ) -> Result<(tokio::sync::MutexGuard<'_, Core>, u64, NodePublicKey), Status> {
        let now = unix_ms();
        let key = self.shared.prove(proof, rest, method, now).await?;
        let core = self.shared.core.lock().await;
        let id = core.authenticate(&key, now)?;
        Ok((core, id, key))
    }
}

fn parse_endpoints(list: &[String]) -> Result<Vec<SocketAddr>, ControlError> {
    if list.len() > crate::core::MAX_ENDPOINTS {
        return Err(ControlError::InvalidField {
            field: "endpoints",
            reason: "more than 64",
        });
    }
    let bad = |reason| ControlError::InvalidField {
        field: "endpoints",
        reason,
    };
    list.iter()
        .map(|s| {
            let ep: SocketAddr = s.parse().map_err(|_| bad("not ip:port"))?;
            // Peers send handshakes to these: nothing that is not a unicast host.
            let ip = ep.ip();
            if ep.port() == 0 || ip.is_unspecified() || ip.is_multicast() {
                return Err(bad("not a unicast address with a port"));
            }
            if matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast()) {
                return Err(bad("not a unicast address with a port"));
            }
            Ok(ep)
        })
        .collect()
}

type MapStream = Pin<Box<dyn Stream<Item = Result<MapResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    async fn get_server_key(
        &self,
        _: Request<GetServerKeyRequest>,
    ) -> Result<Response<GetServerKeyResponse>, Status> {
        Ok(Response::new(GetServerKeyResponse {
            server_key: self.shared.key.public_key().to_vec(),
        }))
    }

    async fn register_node(
        &self,
        req: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let mut req = req.into_inner();
        let now = unix_ms();
        let proof = req.proof.take();
        let registered = async {
            let key = self.shared.prove(proof, &req, "RegisterNode", now).await?;
            let disco = DiscoPublicKey::from_slice(&req.disco_key).map_err(|_| {
                ControlError::InvalidField {
                    field: "disco_key",
                    reason: "must be 32 bytes",
                }
            })?;
            // Registration writes to the database: off the async threads.
            self.shared
                .with_core(move |core| core.register(key, disco, &req.hostname, &req.auth_key, now))
                .await
        }
        .await;
        match &registered {
            Ok(_) => self.shared.metrics.registered(),
            Err(e) => self.shared.metrics.refused(e),
        }
        Ok(Response::new(RegisterNodeResponse {
            node: Some(registered?),
        }))
    }

    async fn get_node(
        &self,
        req: Request<GetNodeRequest>,
    ) -> Result<Response<GetNodeResponse>, Status> {
        let mut rest = req.into_inner();
        let proof = rest.proof.take();
        let (core, id, _) = self.authenticate(proof, &rest, "GetNode").await?;
        let node = core.node(id)?;
        Ok(Response::new(GetNodeResponse { node: Some(node) }))
    }

    async fn list_nodes(
        &self,
        req: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        let mut rest = req.into_inner();
        let proof = rest.proof.take();
        let (core, id, _) = self.authenticate(proof, &rest, "ListNodes").await?;
        let nodes = core.peers(id);
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn update_node(
        &self,
        req: Request<UpdateNodeRequest>,
    ) -> Result<Response<UpdateNodeResponse>, Status> {
        let mut req = req.into_inner();
        let proof = req.proof.take();
        let now = unix_ms();
        let key = self.shared.prove(proof, &req, "UpdateNode", now).await?;
        let endpoints = req
            .endpoints
            .map(|e| parse_endpoints(&e.endpoints))
            .transpose()?;
        // Everything is checked before anything is applied: a bad route refuses the whole call.
        let advertised = req
            .advertised_routes
            .map(|r| crate::routes::parse_routes("advertised_routes", &r.routes))
            .transpose()?;
        if let Some(h) = &req.hostname {
            crate::core::check_hostname(h)?;
        }
        // The node is authenticated under the same lock as the work, which writes to the
        // database: off the async threads.
        self.shared
            .with_core(move |core| {
                let id = core.authenticate(&key, now)?;
                core.update_node(id, endpoints, req.hostname, req.home_region)?;
                if let Some(routes) = advertised {
                    core.advertise_routes(id, routes)?;
                }
                Ok::<_, ControlError>(())
            })
            .await?;
        Ok(Response::new(UpdateNodeResponse {}))
    }

    type StreamMapResponseStream = MapStream;

    async fn stream_map_response(
        &self,
        req: Request<StreamMapRequest>,
    ) -> Result<Response<MapStream>, Status> {
        let mut rest = req.into_inner();
        let proof = rest.proof.take();
        let now = unix_ms();
        let key = self
            .shared
            .prove(proof, &rest, "StreamMapResponse", now)
            .await?;
        let resume = (rest.map_id != 0 && rest.version != 0).then_some((rest.map_id, rest.version));
        // Subscribing may lease map versions in the database: off the async threads.
        let (id, sub) = self
            .shared
            .with_core(move |core| {
                let id = core.authenticate(&key, now)?;
                Ok::<_, ControlError>((id, core.subscribe(id, now, resume)?))
            })
            .await?;
        let resumed = matches!(sub.start, crate::netmap::Start::Resume(_));
        tracing::info!(node = id, key = %key.short(), resumed, "map stream opened");
        // Two messages in flight: the stream makes the next one only when the node has taken
        // the last, so a slow node holds back its own pages and nobody else's.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(run_stream(
            Arc::clone(&self.shared),
            id,
            sub,
            rest.pages,
            tx,
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Most encoded bytes of peers (or changes) in one map message: a page fits the stream's
/// encode buffer ([`warren_proto::codec::BUFFER_SIZE`]) with room for the envelope.
pub const PAGE_BYTES: usize = 7 * 1024;

/// How long a stream gathers changes before it sends them as one message, when changes are
/// few.
pub const COALESCE_TICK: Duration = Duration::from_millis(50);
/// The longest a busy stream gathers: while changes keep arriving at [`BUSY_TICK`] peers or
/// more per tick, the stream waits twice as long again, up to this (so a join storm costs each
/// stream a few large messages, not twenty small ones a second, and a quiet stream still sends
/// within one short tick).
pub const MAX_COALESCE_TICK: Duration = Duration::from_millis(800);
/// Peers with pending changes per [`COALESCE_TICK`] that count as busy.
pub const BUSY_TICK: usize = 32;

/// Writes one map stream's messages, numbering them.
struct MapWriter {
    tx: mpsc::Sender<Result<MapResponse, Status>>,
    seq: u64,
    metrics: Arc<crate::metrics::Metrics>,
    /// The node assembles paged full maps and applies batches.
    pages: bool,
}

/// The stream is gone (the node left); stop feeding it.
struct Gone;

impl MapWriter {
    async fn send(&mut self, kind: Kind, version: u64) -> Result<(), Gone> {
        self.seq += 1;
        let label = crate::metrics::kind_label(&kind);
        let response = MapResponse {
            seq: self.seq,
            version,
            kind: Some(kind),
        };
        let len = prost::Message::encoded_len(&response);
        self.tx.send(Ok(response)).await.map_err(|_| Gone)?;
        self.metrics.sent_label(label, len);
        Ok(())
    }

    /// A full map: in pages when the node takes them, else as one message.
    async fn full(&mut self, mut src: crate::netmap::FullMapSource) -> Result<(), Gone> {
        let version = src.version;
        if !self.pages {
            return self.send(Kind::Full(src.collect()), version).await;
        }
        let mut head = src.take_head();
        let room = PAGE_BYTES.saturating_sub(prost::Message::encoded_len(&head));
        head.peers = if room > 0 {
            src.next_page(room)
        } else {
            Vec::new()
        };
        head.more = !src.is_done();
        let more = head.more;
        self.send(Kind::Full(head), if more { 0 } else { version })
            .await?;
        while !src.is_done() {
            let peers = src.next_page(PAGE_BYTES);
            let more = !src.is_done();
            let page = FullMapPage { peers, more };
            self.send(Kind::FullPage(page), if more { 0 } else { version })
                .await?;
        }
        Ok(())
    }

    /// Changes in the order they apply, bringing the node to `version`: batches of at most
    /// [`PAGE_BYTES`] when the node takes them, else one message each.
    async fn changes(
        &mut self,
        changes: Vec<crate::netmap::Delta>,
        version: u64,
    ) -> Result<(), Gone> {
        if !self.pages {
            let n = changes.len();
            for (i, d) in changes.into_iter().enumerate() {
                let v = if i + 1 == n { version } else { 0 };
                self.send(Kind::clone(&d), v).await?;
            }
            return Ok(());
        }
        let mut batch: Vec<MapResponse> = Vec::new();
        let mut used = 0;
        let mut iter = changes.into_iter().peekable();
        while let Some(d) = iter.next() {
            let item = MapResponse {
                seq: 0,
                version: 0,
                kind: Some(Kind::clone(&d)),
            };
            let len = prost::Message::encoded_len(&item) + 4;
            if !batch.is_empty() && used + len > PAGE_BYTES {
                let full = std::mem::take(&mut batch);
                used = 0;
                self.send_batch(full, 0).await?;
            }
            used += len;
            batch.push(item);
            if iter.peek().is_none() {
                self.send_batch(std::mem::take(&mut batch), version).await?;
            }
        }
        Ok(())
    }

    async fn send_batch(&mut self, mut batch: Vec<MapResponse>, version: u64) -> Result<(), Gone> {
        if batch.len() == 1
            && let Some(kind) = batch.pop().and_then(|m| m.kind)
        {
            return self.send(kind, version).await;
        }
        self.send(Kind::Batch(MapBatch { changes: batch }), version)
            .await
    }
}

/// Feeds one map stream: the full map (or the changes since the version the node resumed
/// from), then what its outbox gathers, once per [`COALESCE_TICK`]; keepalives when idle.
/// Unsubscribes at the end.
async fn run_stream(
    shared: Arc<Shared>,
    id: u64,
    sub: crate::netmap::Subscription,
    pages: bool,
    tx: mpsc::Sender<Result<MapResponse, Status>>,
) {
    let metrics = Arc::clone(&shared.metrics);
    metrics.stream_open(true);
    let crate::netmap::Subscription {
        stream,
        start,
        version,
        outbox,
        published,
    } = sub;
    let mut out = MapWriter {
        tx,
        seq: 0,
        metrics: Arc::clone(&metrics),
        pages,
    };
    let first = match start {
        crate::netmap::Start::Full(src) => out.full(*src).await,
        crate::netmap::Start::Resume(changes) => out.changes(changes, version).await,
    };
    let mut keepalive = tokio::time::interval_at(
        tokio::time::Instant::now() + shared.keepalive,
        shared.keepalive,
    );
    let mut stopping = shared.stopping.subscribe();
    let stopped = async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopped);
    let mut open = first.is_ok();
    while open {
        let sent = tokio::select! {
            _ = &mut stopped => {
                let _ = out.tx.send(Err(Status::unavailable("control is shutting down"))).await;
                break;
            }
            () = outbox.changed() => {
                // Whatever else arrives within the tick goes out in the same message; while
                // changes pour in, the stream gathers longer.
                let mut waited = COALESCE_TICK;
                tokio::time::sleep(waited).await;
                while waited < MAX_COALESCE_TICK
                    && outbox.pending_peers() * COALESCE_TICK.as_millis() as usize
                        >= BUSY_TICK * waited.as_millis() as usize
                {
                    tokio::time::sleep(waited).await;
                    waited *= 2;
                }
                // Every change up to this version is in the outbox by now.
                let version = published.load(Ordering::Acquire);
                match outbox.take() {
                    crate::outbox::Taken::Changes(c) if c.is_empty() => continue,
                    crate::outbox::Taken::Changes(c) => out.changes(c, version).await,
                    crate::outbox::Taken::Resync => {
                        // Changes were dropped: a full map replaces the backlog.
                        let src = shared.core.lock().await.resync(id, stream);
                        match src {
                            Some(src) => out.full(src).await,
                            None => break,
                        }
                    }
                    crate::outbox::Taken::Closed => {
                        // The server ended this stream: deleted, expired or replaced.
                        let status = shared.core.lock().await.stream_end_reason(id, unix_ms());
                        let _ = out.tx.send(Err(status)).await;
                        break;
                    }
                }
            }
            _ = keepalive.tick() => out.send(Kind::Keepalive(Keepalive {}), 0).await,
            _ = out.tx.closed() => break,
        };
        keepalive.reset();
        open = sent.is_ok();
    }
    metrics.stream_open(false);
    // An ephemeral node left offline is deleted by the periodic sweep (see `serve`). Going
    // offline records when the node was last seen: a database write, off the async threads.
    shared
        .with_core(move |core| core.unsubscribe(id, stream, unix_ms()))
        .await;
    tracing::info!(node = id, "map stream closed");
}

/// The `Admin` service.
#[derive(Debug, Clone)]
pub struct AdminService {
    shared: Arc<Shared>,
    require_api_key: bool,
}

impl AdminService {
    /// A service over `shared`; `require_api_key` is false only on the local unix socket.
    pub fn new(shared: Arc<Shared>, require_api_key: bool) -> Self {
        Self {
            shared,
            require_api_key,
        }
    }

    async fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if !self.require_api_key {
            return Ok(());
        }
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or(ControlError::ApiKeyMissing)?;
        let key = header
            .strip_prefix("Bearer ")
            .ok_or(ControlError::ApiKeyMissing)?;
        self.shared.check_api_key(key).await?;
        Ok(())
    }
}

fn user_msg(u: &crate::store::UserRecord) -> User {
    User {
        id: u.id,
        name: u.name.clone(),
        created_unix_ms: u.created_ms,
    }
}

fn auth_key_msg(k: &PreAuthKeyRecord, user: String) -> PreAuthKey {
    PreAuthKey {
        id: k.id,
        user,
        prefix: k.prefix.clone(),
        reusable: k.reusable,
        ephemeral: k.ephemeral,
        used: k.used,
        expiration_unix_ms: k.expiration_ms.unwrap_or(0),
        created_unix_ms: k.created_ms,
        tags: k.tags.clone(),
    }
}

fn api_key_msg(k: &ApiKeyRecord) -> ApiKey {
    ApiKey {
        id: k.id,
        prefix: k.prefix.clone(),
        expiration_unix_ms: k.expiration_ms.unwrap_or(0),
        created_unix_ms: k.created_ms,
        last_used_unix_ms: k.last_used_ms.unwrap_or(0),
    }
}

fn secs(s: u64) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s))
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_user(
        &self,
        req: Request<CreateUserRequest>,
    ) -> Result<Response<CreateUserResponse>, Status> {
        self.authorize(&req).await?;
        let name = req.into_inner().name;
        let u = self
            .shared
            .with_core(move |core| core.create_user(&name, unix_ms()))
            .await?;
        Ok(Response::new(CreateUserResponse {
            user: Some(user_msg(&u)),
        }))
    }

    async fn list_users(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersResponse>, Status> {
        self.authorize(&req).await?;
        // Read from the database (another instance may have added users): off the async threads.
        let users = self
            .shared
            .with_core(|core| core.users())
            .await
            .iter()
            .map(user_msg)
            .collect();
        Ok(Response::new(ListUsersResponse { users }))
    }

    async fn delete_user(
        &self,
        req: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        self.authorize(&req).await?;
        let name = req.into_inner().name;
        self.shared
            .with_core(move |core| core.delete_user(&name))
            .await?;
        Ok(Response::new(DeleteUserResponse {}))
    }

    async fn create_pre_auth_key(
        &self,
        req: Request<CreatePreAuthKeyRequest>,
    ) -> Result<Response<CreatePreAuthKeyResponse>, Status> {
        self.authorize(&req).await?;
        let r = req.into_inner();
        let new = NewAuthKey {
            user: r.user,
            reusable: r.reusable,
            ephemeral: r.ephemeral,
            expiration: secs(r.expiration_secs),
            tags: r.tags,
        };
        let random = random30()?;
        let (k, secret, user) = self
            .shared
            .with_core(move |core| {
                let (k, secret) = core.create_auth_key(&new, random, unix_ms())?;
                let user = core.auth_key_user(&k);
                Ok::<_, ControlError>((k, secret, user))
            })
            .await?;
        Ok(Response::new(CreatePreAuthKeyResponse {
            key: Some(auth_key_msg(&k, user)),
            secret,
        }))
    }

    async fn list_pre_auth_keys(
        &self,
        req: Request<ListPreAuthKeysRequest>,
    ) -> Result<Response<ListPreAuthKeysResponse>, Status> {
        self.authorize(&req).await?;
        let user = req.into_inner().user;
        let keys = self
            .shared
            .with_core(move |core| {
                Ok::<_, ControlError>(
                    core.auth_keys(nonempty(&user))?
                        .iter()
                        .map(|k| auth_key_msg(k, core.auth_key_user(k)))
                        .collect(),
                )
            })
            .await?;
        Ok(Response::new(ListPreAuthKeysResponse { keys }))
    }

    async fn expire_pre_auth_key(
        &self,
        req: Request<ExpirePreAuthKeyRequest>,
    ) -> Result<Response<ExpirePreAuthKeyResponse>, Status> {
        self.authorize(&req).await?;
        let prefix = req.into_inner().prefix;
        self.shared
            .with_core(move |core| core.expire_auth_key(&prefix, unix_ms()))
            .await?;
        Ok(Response::new(ExpirePreAuthKeyResponse {}))
    }

    async fn create_api_key(
        &self,
        req: Request<CreateApiKeyRequest>,
    ) -> Result<Response<CreateApiKeyResponse>, Status> {
        self.authorize(&req).await?;
        let exp = secs(req.get_ref().expiration_secs);
        let random = random30()?;
        let (k, secret) = self
            .shared
            .with_core(move |core| core.create_api_key(exp, random, unix_ms()))
            .await?;
        Ok(Response::new(CreateApiKeyResponse {
            key: Some(api_key_msg(&k)),
            secret,
        }))
    }

    async fn list_api_keys(
        &self,
        req: Request<ListApiKeysRequest>,
    ) -> Result<Response<ListApiKeysResponse>, Status> {
        self.authorize(&req).await?;
        let keys = self
            .shared
            .with_core(|core| core.api_keys())
            .await?
            .iter()
            .map(api_key_msg)
            .collect();
        Ok(Response::new(ListApiKeysResponse { keys }))
    }

    async fn expire_api_key(
        &self,
        req: Request<ExpireApiKeyRequest>,
    ) -> Result<Response<ExpireApiKeyResponse>, Status> {
        self.authorize(&req).await?;
        let prefix = req.into_inner().prefix;
        self.shared
            .with_core(move |core| core.expire_api_key(&prefix, unix_ms()))
            .await?;
        Ok(Response::new(ExpireApiKeyResponse {}))
    }

    async fn list_nodes(
        &self,
        req: Request<AdminListNodesRequest>,
    ) -> Result<Response<AdminListNodesResponse>, Status> {
        self.authorize(&req).await?;
        let user = nonempty(&req.get_ref().user);
        let nodes = self.shared.core.lock().await.admin_nodes(user)?;
        Ok(Response::new(AdminListNodesResponse { nodes }))
    }

    async fn delete_node(
        &self,
        req: Request<DeleteNodeRequest>,
    ) -> Result<Response<DeleteNodeResponse>, Status> {
        self.authorize(&req).await?;
        let id = req.get_ref().id;
        self.shared
            .with_core(move |core| core.delete_node(id))
            .await?;
        Ok(Response::new(DeleteNodeResponse {}))
    }

    async fn expire_node(
        &self,
        req: Request<ExpireNodeRequest>,
    ) -> Result<Response<ExpireNodeResponse>, Status> {
        self.authorize(&req).await?;
        let id = req.get_ref().id;
        let node = self
            .shared
            .with_core(move |core| core.expire_node(id, unix_ms()))
            .await?;
        Ok(Response::new(ExpireNodeResponse { node: Some(node) }))
    }

    async fn rename_node(
        &self,
        req: Request<RenameNodeRequest>,
    ) -> Result<Response<RenameNodeResponse>, Status> {
        self.authorize(&req).await?;
        let r = req.into_inner();
        let node = self
            .shared
            .with_core(move |core| core.rename_node(r.id, &r.new_name))
            .await?;
        Ok(Response::new(RenameNodeResponse { node: Some(node) }))
    }

    async fn verify_node(
        &self,
        req: Request<VerifyNodeRequest>,
    ) -> Result<Response<VerifyNodeResponse>, Status> {
        self.authorize(&req).await?;
        let key = NodePublicKey::from_slice(&req.get_ref().node_key).map_err(|_| {
            ControlError::InvalidField {
                field: "node_key",
                reason: "must be 32 bytes",
            }
        })?;
        let known = self
            .shared
            .core
            .lock()
            .await
            .authenticate(&key, unix_ms())
            .is_ok();
        Ok(Response::new(VerifyNodeResponse { known }))
    }

    async fn tag_node(
        &self,
        req: Request<TagNodeRequest>,
    ) -> Result<Response<TagNodeResponse>, Status> {
        self.authorize(&req).await?;
        let r = req.into_inner();
        let node = self
            .shared
            .with_core(move |core| core.tag_node(r.id, r.tags))
            .await?;
        tracing::info!(node = node.id, tags = ?node.tags, "node tagged");
        Ok(Response::new(TagNodeResponse { node: Some(node) }))
    }

    async fn get_policy(
        &self,
        req: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        self.authorize(&req).await?;
        let source = &self.shared.policy;
        // Under the core's lock: the text and the policy in force change together.
        let (configured, text) = {
            let core = self.shared.core.lock().await;
            (core.policy_configured(), source.text())
        };
        Ok(Response::new(GetPolicyResponse {
            configured,
            policy: text.map(|t| t.to_string()).unwrap_or_default(),
            mode: source.mode.as_str().into(),
            path: source
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }))
    }

    async fn set_policy(
        &self,
        req: Request<SetPolicyRequest>,
    ) -> Result<Response<SetPolicyResponse>, Status> {
        self.authorize(&req).await?;
        let source = &self.shared.policy;
        if source.mode == PolicyMode::File {
            let path = match &source.path {
                Some(p) => p.display().to_string(),
                None => "not configured (policy.path is empty)".into(),
            };
            return Err(ControlError::PolicyModeIsFile { path }.into());
        }
        let text: Arc<str> = req.into_inner().policy.into();
        // Compiling needs no lock; applying and storing happen under it, together.
        let compiled = Arc::new(compile_policy(&text)?);
        let shared = Arc::clone(&self.shared);
        let stored = Arc::clone(&text);
        let sent = self
            .shared
            .with_core(move |core| {
                let sent = core.store_policy(&stored, compiled, unix_ms())?;
                // Still under the lock: the text and the policy in force change together.
                shared.policy.set_text(Some(stored));
                Ok::<_, ControlError>(sent)
            })
            .await?;
        tracing::info!(updates = sent, bytes = text.len(), "policy set and applied");
        Ok(Response::new(SetPolicyResponse {
            updates_sent: u64::try_from(sent).unwrap_or(u64::MAX),
        }))
    }

    async fn check_policy(
        &self,
        req: Request<CheckPolicyRequest>,
    ) -> Result<Response<CheckPolicyResponse>, Status> {
        self.authorize(&req).await?;
        let compiled = compile_policy(&req.into_inner().policy)?;
        self.shared
            .core
            .lock()
            .await
            .check_policy(&compiled)
            .map_err(ControlError::from)?;
        Ok(Response::new(CheckPolicyResponse {}))
    }

    async fn approve_routes(
        &self,
        req: Request<ApproveRoutesRequest>,
    ) -> Result<Response<ApproveRoutesResponse>, Status> {
        self.authorize(&req).await?;
        let r = req.into_inner();
        let routes = crate::routes::parse_routes("routes", &r.routes)?;
        let node = self
            .shared
            .with_core(move |core| core.approve_routes(r.id, routes))
            .await?;
        tracing::info!(node = node.id, approved = ?node.approved_routes, "routes approved by an admin");
        Ok(Response::new(ApproveRoutesResponse { node: Some(node) }))
    }

    async fn health(
        &self,
        req: Request<HealthRequest>,
    ) -> Result<Response<HealthResponse>, Status> {
        self.authorize(&req).await?;
        let source = &self.shared.policy;
        let (database_error, nodes, policy_configured) = self
            .shared
            .with_core(|core| {
                // A read that goes to the database (users and nodes are served from memory).
                let database_error = match core.api_keys() {
                    Ok(_) => String::new(),
                    Err(e) => e.to_string(),
                };
                let nodes = core.admin_nodes(None)?;
                Ok::<_, ControlError>((database_error, nodes, core.policy_configured()))
            })
            .await?;
        // File mode with a path must have a policy in force (start-up refuses one that does not
        // compile, and a reload keeps the one in force); no policy otherwise is allowed.
        let policy_ok =
            policy_configured || source.mode != PolicyMode::File || source.path.is_none();
        Ok(Response::new(HealthResponse {
            healthy: database_error.is_empty() && policy_ok,
            database_error,
            policy_configured,
            policy_mode: source.mode.as_str().into(),
            policy_path: source
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            nodes: nodes.len() as u64,
            nodes_online: nodes.iter().filter(|n| n.online).count() as u64,
        }))
    }

    async fn explain_policy(
        &self,
        req: Request<ExplainPolicyRequest>,
    ) -> Result<Response<ExplainPolicyResponse>, Status> {
        self.authorize(&req).await?;
        let r = req.into_inner();
        let proto = match r.proto.as_str() {
            "" => crate::policy::proto::TCP,
            p => crate::policy::parse_proto(p).ok_or(ControlError::InvalidField {
                field: "proto",
                reason: "not a protocol name or number 1-255",
            })?,
        };
        let port = r
            .port
            .map(|p| {
                u16::try_from(p).map_err(|_| ControlError::InvalidField {
                    field: "port",
                    reason: "above 65535",
                })
            })
            .transpose()?;
        let mut core = self.shared.core.lock().await;
        let answer = if r.exit_node.is_empty() {
            explain(core.policy_state(), &r.src, &r.dst, port, proto)?
        } else {
            explain_exit(
                core.policy_state(),
                &r.src,
                &r.dst,
                &r.exit_node,
                port,
                proto,
            )?
        };
        Ok(Response::new(ExplainPolicyResponse {
            configured: core.policy_configured(),
            ..answer
        }))
    }
}

/// One side of an `explain` question: a node, or an address no node has.
#[derive(Debug, Clone)]
struct Side {
    node: Option<(NodeId, String)>,
    v4: Option<std::net::IpAddr>,
    v6: Option<std::net::IpAddr>,
}

impl Side {
    /// The address to ask with, in the family of `other` when only one fits.
    fn addr_for(&self, other: &Side) -> Option<std::net::IpAddr> {
        match (self.v4, other.v4) {
            (Some(a), Some(_)) => Some(a),
            _ if other.v6.is_some() && self.v6.is_some() => self.v6,
            _ => self.v4.or(self.v6),
        }
    }
}

/// Resolves `what` (a mesh IP, a node name, a user, a group or a tag) to endpoints.
fn resolve(state: &PolicyState, role: &'static str, what: &str) -> Result<Vec<Side>, ControlError> {
    let of_node = |id: NodeId| {
        state.node(id).map(|n| Side {
            node: Some((id, n.name.clone())),
            v4: n.ipv4.map(Into::into),
            v6: n.ipv6.map(Into::into),
        })
    };
    if let Ok(ip) = what.parse::<std::net::IpAddr>() {
        // An address: its node, or the bare address (a host, a subnet).
        let node = state.find_nodes(what).first().copied();
        let mut e = match node {
            Some(id) => of_node(id).ok_or_else(|| ControlError::NoSuchTarget {
                role,
                what: what.into(),
            })?,
            None => Side {
                node: None,
                v4: None,
                v6: None,
            },
        };
        // Ask about exactly the address given.
        (e.v4, e.v6) = match ip {
            std::net::IpAddr::V4(_) => (Some(ip), None),
            std::net::IpAddr::V6(_) => (None, Some(ip)),
        };
        return Ok(vec![e]);
    }
    let found: Vec<Side> = state
        .find_nodes(what)
        .into_iter()
        .filter_map(of_node)
        .collect();
    if found.is_empty() {
        return Err(ControlError::NoSuchTarget {
            role,
            what: what.into(),
        });
    }
    Ok(found)
}

/// The rule that decided an explanation, for the wire.
fn rule_ref(e: &Explanation) -> Option<PolicyRuleRef> {
    e.rule.map(|o| PolicyRuleRef {
        section: match o.section {
            Section::Acl => "acls",
            Section::Grant => "grants",
            Section::AllowAll => "default",
        }
        .into(),
        index: u32::try_from(o.index).unwrap_or(u32::MAX),
        line: o.at.line,
        column: o.at.col,
    })
}

/// The position in the policy's rule list of the first rule from `e`'s origin.
fn rule_position(state: &PolicyState, e: &Explanation) -> Option<usize> {
    let origin = e.rule?;
    state
        .policy()
        .rules()
        .iter()
        .position(|r| r.origin == origin)
}

/// Whether `src` may reach `dst` on some port: the first rule, in policy order, that allows any
/// port, and a port it allows. Each rule's port ranges are tried at their first port (a rule
/// allowing any port of a range allows its first), so the search stops at the first rule
/// whose own range start is allowed by it or an earlier rule.
fn explain_any_port(
    state: &PolicyState,
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    proto: u8,
) -> (Explanation, u16) {
    let mut tried: std::collections::HashMap<u16, Explanation> = Default::default();
    for (i, rule) in state.policy().rules().iter().enumerate() {
        if !rule.body.protos.is_empty() && !rule.body.protos.contains(&proto) {
            continue;
        }
        for range in rule.body.dst.iter().flat_map(|d| d.ports.iter()) {
            // Port 0 is no real port: `*` is shown by its first usable one.
            let port = if range.first == 0 && range.last > 0 {
                1
            } else {
                range.first
            };
            let e = tried
                .entry(port)
                .or_insert_with(|| state.explain(src, dst, port, proto));
            if e.allowed && rule_position(state, e).is_some_and(|at| at <= i) {
                return (e.clone(), port);
            }
        }
    }
    (state.explain(src, dst, 0, proto), 0)
}

/// Answers `policy explain` for every (source node, destination node) pair, up to
/// [`MAX_EXPLAIN_PAIRS`].
fn explain(
    state: &PolicyState,
    src: &str,
    dst: &str,
    port: Option<u16>,
    proto: u8,
) -> Result<ExplainPolicyResponse, ControlError> {
    let srcs = resolve(state, "source", src)?;
    let dsts = resolve(state, "destination", dst)?;
    let total = srcs.len().saturating_mul(dsts.len());
    let mut decisions = Vec::new();
    let mut examined = 0usize;
    'pairs: for s in &srcs {
        for d in &dsts {
            if decisions.len() == MAX_EXPLAIN_PAIRS {
                break 'pairs;
            }
            examined += 1;
            if s.node.is_some() && s.node.as_ref().map(|n| n.0) == d.node.as_ref().map(|n| n.0) {
                // A node and itself: not a question the policy answers.
                continue;
            }
            let (Some(src_ip), Some(dst_ip)) = (s.addr_for(d), d.addr_for(s)) else {
                continue;
            };
            let (e, port) = match port {
                Some(p) => (state.explain(src_ip, dst_ip, p, proto), p),
                None => explain_any_port(state, src_ip, dst_ip, proto),
            };
            let (src_node_id, src_node) =
                s.node.clone().map(|(id, n)| (id.0, n)).unwrap_or_default();
            let (dst_node_id, dst_node) =
                d.node.clone().map(|(id, n)| (id.0, n)).unwrap_or_default();
            decisions.push(PolicyDecision {
                src_node_id,
                src_node,
                src_ip: src_ip.to_string(),
                dst_node_id,
                dst_node,
                dst_ip: dst_ip.to_string(),
                allowed: e.allowed,
                rule: rule_ref(&e),
                port: u32::from(port),
                visible: e.visible.unwrap_or(false),
                exit_node_offered: false,
            });
        }
    }
    // Pairs never looked at (a node paired with itself among them, if any).
    let omitted = u64::try_from(total - examined).unwrap_or(u64::MAX);
    Ok(ExplainPolicyResponse {
        decisions,
        proto: u32::from(proto),
        any_port: port.is_none(),
        omitted,
        configured: true,
    })
}

/// Answers `policy explain SRC DST --exit-node E`: may each source node use exit node E to reach
/// DST, an internet address? Allowed only when E is an approved exit node offered to the source
/// ([`PolicyState::exit_offered`]) and a rule lets the source reach DST (and the port).
fn explain_exit(
    state: &PolicyState,
    src: &str,
    dst: &str,
    exit: &str,
    port: Option<u16>,
    proto: u8,
) -> Result<ExplainPolicyResponse, ControlError> {
    let dst_ip: std::net::IpAddr = dst.parse().map_err(|_| ControlError::InvalidField {
        field: "dst",
        reason: "with exit_node, DST must be an IP address (the internet host to reach)",
    })?;
    let exits = state.find_nodes(exit);
    let [exit_id] = exits[..] else {
        return Err(ControlError::NoSuchTarget {
            role: "exit node",
            what: exit.into(),
        });
    };
    let exit_name = state
        .node(exit_id)
        .map(|n| n.name.clone())
        .unwrap_or_default();
    let srcs = resolve(state, "source", src)?;
    let mut decisions = Vec::new();
    for s in srcs.iter().take(MAX_EXPLAIN_PAIRS) {
        let src_ip = match dst_ip {
            std::net::IpAddr::V4(_) => s.v4,
            std::net::IpAddr::V6(_) => s.v6,
        };
        let Some(src_ip) = src_ip else { continue };
        let (e, port) = match port {
            Some(p) => (state.explain(src_ip, dst_ip, p, proto), p),
            None => explain_any_port(state, src_ip, dst_ip, proto),
        };
        let (src_node_id, src_node) = s.node.clone().map(|(id, n)| (id.0, n)).unwrap_or_default();
        let offered = s
            .node
            .as_ref()
            .is_some_and(|(id, _)| state.exit_offered(*id, exit_id));
        let visible = s
            .node
            .as_ref()
            .is_some_and(|(id, _)| state.are_peers(*id, exit_id));
        decisions.push(PolicyDecision {
            src_node_id,
            src_node,
            src_ip: src_ip.to_string(),
            dst_node_id: exit_id.0,
            dst_node: exit_name.clone(),
            dst_ip: dst_ip.to_string(),
            allowed: offered && e.allowed,
            rule: rule_ref(&e),
            port: u32::from(port),
            visible,
            exit_node_offered: offered,
        });
    }
    Ok(ExplainPolicyResponse {
        decisions,
        proto: u32::from(proto),
        any_port: port.is_none(),
        omitted: u64::try_from(srcs.len().saturating_sub(MAX_EXPLAIN_PAIRS)).unwrap_or(u64::MAX),
        configured: true,
    })
}
