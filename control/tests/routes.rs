//! Subnet routes, exit nodes and DNS settings through a real server on loopback: nodes follow
//! their map streams as the node daemon does, an operator approves routes over the admin
//! socket, and each test checks what every node was actually told (records, deltas, filters).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{Server, register_req, server_key, sign};
use tonic::Code;
use tonic::transport::Channel;
use warren_control::config::PolicyMode;
use warren_proto::control::admin_client::AdminClient;
use warren_proto::control::control_client::ControlClient;
use warren_proto::control::map_response::Kind;
use warren_proto::control::*;
use warren_proto::{ControlPublicKey, NodeSecretKey};

/// How long a test waits for a delta it expects.
const WAIT: Duration = Duration::from_secs(10);

/// A node as a test drives it: its own connection, its map stream and what it was told.
struct TestNode {
    key: NodeSecretKey,
    server_key: ControlPublicKey,
    id: u64,
    name: String,
    url: String,
    control: Option<ControlClient<Channel>>,
    stream: Option<tonic::Streaming<MapResponse>>,
    me: Node,
    peers: BTreeMap<u64, Node>,
    filter: PacketFilter,
    dns: DnsConfig,
    /// Every delta received, in order (keepalives left out).
    log: Vec<Kind>,
}

impl TestNode {
    /// Registers a node with `auth_key` over its own connection (not yet streaming).
    async fn register(server: &Server, auth_key: &str, host: &str) -> Self {
        let mut control = server.control().await;
        let sk = server_key(&mut control).await;
        let key = NodeSecretKey::generate();
        let me = control
            .register_node(register_req(&key, &sk, auth_key, host))
            .await
            .expect("register")
            .into_inner()
            .node
            .expect("node");
        Self {
            key,
            server_key: sk,
            id: me.id,
            name: me.given_name.clone(),
            url: server.url.clone(),
            control: Some(control),
            stream: None,
            me,
            peers: BTreeMap::new(),
            filter: PacketFilter::default(),
            dns: DnsConfig::default(),
            log: Vec::new(),
        }
    }

    fn client(&mut self) -> &mut ControlClient<Channel> {
        self.control.as_mut().expect("connected")
    }

    /// Opens the map stream (reconnecting first if the node was killed) and reads the full map.
    async fn connect(&mut self) {
        if self.control.is_none() {
            self.control = Some(
                ControlClient::connect(self.url.clone())
                    .await
                    .expect("connect"),
            );
        }
        let proof = sign(
            &self.key,
            &self.server_key,
            "StreamMapResponse",
            &StreamMapRequest::default(),
        );
        let mut stream = self
            .client()
            .stream_map_response(StreamMapRequest {
                proof: Some(proof),
                ..StreamMapRequest::default()
            })
            .await
            .expect("stream")
            .into_inner();
        let first = stream.message().await.expect("ok").expect("full map");
        let Some(Kind::Full(full)) = first.kind else {
            panic!("first message is a full map: {first:?}")
        };
        self.apply(Kind::Full(full));
        self.stream = Some(stream);
    }

    /// Ends the map stream only; the connection stays.
    fn close_stream(&mut self) {
        self.stream = None;
    }

    /// As `kill -9`: the stream and the TCP connection go.
    fn kill(&mut self) {
        self.stream = None;
        self.control = None;
    }

    fn apply(&mut self, kind: Kind) {
        match &kind {
            Kind::Full(f) => {
                self.me = f.self_node.clone().unwrap_or_default();
                self.peers = f.peers.iter().map(|n| (n.id, n.clone())).collect();
                self.filter = f.filter.clone().unwrap_or_default();
                self.dns = f.dns.clone().unwrap_or_default();
            }
            Kind::PeerAdded(n) | Kind::PeerChanged(n) => {
                self.peers.insert(n.id, n.clone());
            }
            Kind::PeerRemoved(r) => {
                self.peers.remove(&r.id);
            }
            Kind::SelfChanged(n) => self.me = n.clone(),
            Kind::FilterChanged(f) => self.filter = f.clone(),
            Kind::SettingsChanged(s) => self.dns = s.dns.clone().unwrap_or_default(),
            Kind::PeerOnline(o) => {
                if let Some(p) = self.peers.get_mut(&o.id) {
                    p.online = o.online;
                }
            }
            Kind::PeerEndpoints(e) => {
                if let Some(p) = self.peers.get_mut(&e.id) {
                    p.endpoints = e.endpoints.clone();
                }
            }
            Kind::Keepalive(_) => return,
            // This client does not ask for pages or batches.
            Kind::FullPage(_) | Kind::Batch(_) => panic!("unasked-for {kind:?}"),
        }
        self.log.push(kind);
    }

    /// Reads deltas until `done` holds (panics naming `what` after [`WAIT`]).
    async fn until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            let stream = self.stream.as_mut().expect("streaming");
            let m = tokio::time::timeout_at(deadline, stream.message())
                .await
                .unwrap_or_else(|_| panic!("{}: timed out waiting for {what}", self.name))
                .expect("stream ok")
                .expect("stream open");
            if let Some(kind) = m.kind {
                self.apply(kind);
            }
        }
    }

    /// Reads whatever arrives within `quiet` (to check that nothing else does).
    async fn settle(&mut self, quiet: Duration) {
        while let Some(stream) = self.stream.as_mut() {
            match tokio::time::timeout(quiet, stream.message()).await {
                Ok(m) => {
                    let kind = m.expect("stream ok").expect("stream open").kind;
                    if let Some(kind) = kind {
                        self.apply(kind);
                    }
                }
                Err(_) => return,
            }
        }
    }

    /// Sends the node's whole advertised list.
    async fn advertise(&mut self, routes: &[&str]) -> Result<(), tonic::Status> {
        let mut req = UpdateNodeRequest {
            advertised_routes: Some(RouteList {
                routes: routes.iter().map(|r| r.to_string()).collect(),
            }),
            ..UpdateNodeRequest::default()
        };
        req.proof = Some(sign(&self.key, &self.server_key, "UpdateNode", &req));
        self.client().update_node(req).await.map(|_| ())
    }

    fn peer(&self, id: u64) -> Option<&Node> {
        self.peers.get(&id)
    }

    /// The primary routes a peer record carries.
    fn routes_of(&self, id: u64) -> Option<Vec<String>> {
        self.peer(id).map(|n| n.primary_routes.clone())
    }

    /// The node's IPv4 address, bare.
    fn ipv4(&self) -> String {
        self.me.addresses[0].trim_end_matches("/32").to_owned()
    }
}

async fn set_policy(admin: &mut AdminClient<Channel>, text: &str) {
    admin
        .set_policy(SetPolicyRequest {
            policy: text.into(),
        })
        .await
        .expect("policy set");
}

async fn approve(
    admin: &mut AdminClient<Channel>,
    id: u64,
    routes: &[&str],
) -> Result<Node, tonic::Status> {
    admin
        .approve_routes(ApproveRoutesRequest {
            id,
            routes: routes.iter().map(|r| r.to_string()).collect(),
        })
        .await
        .map(|r| r.into_inner().node.expect("node"))
}

async fn user_key(admin: &mut AdminClient<Channel>, user: &str, tags: &[&str]) -> String {
    let _ = admin
        .create_user(CreateUserRequest { name: user.into() })
        .await;
    admin
        .create_pre_auth_key(CreatePreAuthKeyRequest {
            user: user.into(),
            reusable: true,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        })
        .await
        .expect("pre-auth key")
        .into_inner()
        .secret
}

async fn admin_node(admin: &mut AdminClient<Channel>, id: u64) -> Node {
    admin
        .list_nodes(AdminListNodesRequest::default())
        .await
        .expect("nodes")
        .into_inner()
        .nodes
        .into_iter()
        .find(|n| n.id == id)
        .expect("listed")
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Peers never see what a node advertises or what was approved, only what it serves for them.
fn assert_no_route_lists(node: &TestNode) {
    for p in node.peers.values() {
        assert!(
            p.advertised_routes.is_empty() && p.approved_routes.is_empty(),
            "{} sees {}'s route lists: {p:?}",
            node.name,
            p.given_name
        );
    }
}

/// A database-mode server with `policy`, and four connected nodes: a gateway named `name`
/// owned by `tag` (registered by user ops), then alice-laptop, bob-phone and carol-pc.
async fn gateway_and_three_users(
    policy: &str,
    tag: &str,
    name: &str,
) -> (Server, AdminClient<Channel>, [TestNode; 4]) {
    let server = Server::start_with(|c| c.policy.mode = PolicyMode::Database).await;
    let mut admin = server.local_admin().await;
    set_policy(&mut admin, policy).await;
    let gw_key = user_key(&mut admin, "ops", &[tag]).await;
    let mut nodes = [
        TestNode::register(&server, &gw_key, name).await,
        TestNode::register(
            &server,
            &user_key(&mut admin, "alice", &[]).await,
            "alice-laptop",
        )
        .await,
        TestNode::register(
            &server,
            &user_key(&mut admin, "bob", &[]).await,
            "bob-phone",
        )
        .await,
        TestNode::register(
            &server,
            &user_key(&mut admin, "carol", &[]).await,
            "carol-pc",
        )
        .await,
    ];
    for n in &mut nodes {
        n.connect().await;
    }
    (server, admin, nodes)
}

/// alice may reach the 10.20.0.0/16 network; bob only the router's own address on 22; carol
/// nothing.
const SUBNET_POLICY: &str = r#"{
  "tagOwners": {"tag:router": ["ops@"]},
  "acls": [
    {"action": "accept", "src": ["alice@"], "dst": ["10.20.0.0/16:*"]},
    {"action": "accept", "src": ["bob@"], "dst": ["tag:router:22"]},
  ],
}"#;

#[tokio::test]
async fn a_route_is_served_once_approved_and_only_to_viewers_the_policy_lets_use_it() {
    let (server, mut admin, [mut router, mut alice, mut bob, mut carol]) =
        gateway_and_three_users(SUBNET_POLICY, "tag:router", "router").await;
    let r = router.id;

    // Advertised, not approved: nothing is served; the router's own record says what it offers.
    router
        .advertise(&["10.20.0.0/24"])
        .await
        .expect("advertise");
    router
        .until("its advertised routes", |n| {
            n.me.advertised_routes == ["10.20.0.0/24"]
        })
        .await;
    assert!(router.me.approved_routes.is_empty() && router.me.primary_routes.is_empty());
    bob.settle(Duration::from_millis(300)).await;
    assert_eq!(bob.routes_of(r), Some(vec![]), "bob sees the router itself");
    assert_eq!(
        alice.peer(r),
        None,
        "alice may only reach the subnet: not served yet"
    );
    let listed = admin_node(&mut admin, r).await;
    assert_eq!(listed.advertised_routes, ["10.20.0.0/24"]);
    assert!(listed.approved_routes.is_empty() && listed.primary_routes.is_empty());

    // Approved: alice gets the router with the route; bob keeps it without; carol nothing.
    let approved = approve(&mut admin, r, &["10.20.0.0/24"])
        .await
        .expect("approve");
    assert_eq!(approved.approved_routes, ["10.20.0.0/24"]);
    assert_eq!(
        approved.primary_routes,
        ["10.20.0.0/24"],
        "online: primary at once"
    );
    alice
        .until("the router with its route", |n| {
            n.routes_of(r) == Some(strings(&["10.20.0.0/24"]))
        })
        .await;
    assert!(
        alice
            .log
            .iter()
            .any(|k| matches!(k, Kind::PeerAdded(n) if n.id == r)),
        "{:?}",
        alice.log
    );
    router
        .until("itself as primary", |n| {
            n.me.primary_routes == ["10.20.0.0/24"]
        })
        .await;
    assert_eq!(router.me.approved_routes, ["10.20.0.0/24"]);
    assert!(!router.me.exit_node);
    // The router's filter admits alice into the subnet (the rule's own destination).
    router
        .until("a filter for the subnet", |n| {
            n.filter.rules.iter().any(|rule| {
                rule.src.contains(&format!("{}/32", alice.ipv4()))
                    && rule.dst.iter().any(|d| d.net == "10.20.0.0/16")
            })
        })
        .await;
    bob.settle(Duration::from_millis(300)).await;
    carol.settle(Duration::from_millis(300)).await;
    assert_eq!(
        bob.routes_of(r),
        Some(vec![]),
        "bob may not reach the subnet"
    );
    assert_eq!(carol.peer(r), None);
    for n in [&alice, &bob, &carol] {
        assert_no_route_lists(n);
    }
    let listed = admin_node(&mut admin, r).await;
    assert_eq!(listed.primary_routes, ["10.20.0.0/24"]);

    // Cleared: alice loses the router (a delta, not a reconnect), the router its primary.
    approve(&mut admin, r, &[]).await.expect("clear");
    alice
        .until("the router removed", |n| n.peer(r).is_none())
        .await;
    router
        .until("no primary", |n| {
            n.me.primary_routes.is_empty() && n.me.approved_routes.is_empty()
        })
        .await;
    assert_eq!(
        router.me.advertised_routes,
        ["10.20.0.0/24"],
        "still offered"
    );
    server.stop().await;
}

#[tokio::test]
async fn auto_approvers_approve_on_advertise_and_when_the_policy_changes() {
    let server = Server::start_with(|c| c.policy.mode = PolicyMode::Database).await;
    let mut admin = server.local_admin().await;
    set_policy(&mut admin, SUBNET_POLICY).await;
    let router_key = user_key(&mut admin, "ops", &["tag:router"]).await;
    let alice_key = user_key(&mut admin, "alice", &[]).await;
    let mut router = TestNode::register(&server, &router_key, "router").await;
    let mut alice = TestNode::register(&server, &alice_key, "alice-laptop").await;
    router.connect().await;
    alice.connect().await;
    let r = router.id;
    router
        .advertise(&["10.20.0.0/24", "192.168.7.0/24", "0.0.0.0/0", "::/0"])
        .await
        .expect("advertise");
    router.settle(Duration::from_millis(300)).await;
    assert!(router.me.approved_routes.is_empty(), "no autoApprovers yet");

    // A policy with autoApprovers: what it covers is approved without an admin, live.
    let with_auto = SUBNET_POLICY.replace(
        r#""acls""#,
        r#""autoApprovers": {"routes": {"10.20.0.0/16": ["tag:router"], "0.0.0.0/0": ["tag:router"]}},
  "acls""#,
    );
    set_policy(&mut admin, &with_auto).await;
    router
        .until("auto-approval", |n| !n.me.approved_routes.is_empty())
        .await;
    // 192.168.7.0/24 is inside the 0.0.0.0/0 entry; that entry never approves the exit route.
    assert_eq!(
        router.me.approved_routes,
        ["10.20.0.0/24", "192.168.7.0/24"]
    );
    assert!(!router.me.exit_node);
    alice
        .until("the router's route", |n| {
            n.routes_of(r) == Some(strings(&["10.20.0.0/24"]))
        })
        .await;

    // Advertising a new route under an approver prefix approves it at once.
    router
        .advertise(&[
            "10.20.0.0/24",
            "10.20.9.0/24",
            "192.168.7.0/24",
            "0.0.0.0/0",
            "::/0",
        ])
        .await
        .expect("advertise");
    alice
        .until("the new route", |n| {
            n.routes_of(r) == Some(strings(&["10.20.0.0/24", "10.20.9.0/24"]))
        })
        .await;

    // exitNode approves both exit routes together.
    let with_exit = with_auto.replace(
        r#""0.0.0.0/0": ["tag:router"]}"#,
        r#""0.0.0.0/0": ["tag:router"]}, "exitNode": ["tag:router"]"#,
    );
    set_policy(&mut admin, &with_exit).await;
    router.until("exit node", |n| n.me.exit_node).await;
    assert!(
        router.me.approved_routes.contains(&"0.0.0.0/0".to_owned())
            && router.me.approved_routes.contains(&"::/0".to_owned()),
        "{:?}",
        router.me.approved_routes
    );
    // Auto-approval only adds: a policy without autoApprovers keeps the approvals.
    set_policy(&mut admin, SUBNET_POLICY).await;
    router.settle(Duration::from_millis(300)).await;
    assert!(router.me.exit_node);
    assert_eq!(router.me.approved_routes.len(), 5);
    server.stop().await;
}

#[tokio::test]
async fn primary_fails_over_when_its_stream_ends_and_a_returning_router_does_not_take_over() {
    // No policy: every node sees every route.
    let server = Server::start().await;
    let mut admin = server.local_admin().await;
    let key = user_key(&mut admin, "alice", &[]).await;
    let mut r1 = TestNode::register(&server, &key, "r1").await;
    let mut r2 = TestNode::register(&server, &key, "r2").await;
    let mut viewer = TestNode::register(&server, &key, "viewer").await;
    for n in [&mut r1, &mut r2, &mut viewer] {
        n.connect().await;
    }
    let (a, b) = (r1.id, r2.id);
    let prefix = strings(&["10.30.0.0/24"]);
    for n in [&mut r1, &mut r2] {
        n.advertise(&["10.30.0.0/24"]).await.expect("advertise");
    }
    approve(&mut admin, b, &["10.30.0.0/24"])
        .await
        .expect("approve");
    approve(&mut admin, a, &["10.30.0.0/24"])
        .await
        .expect("approve");
    // r2 was approved first and is online: it stays primary although r1 has the lower id.
    viewer
        .until("r2 primary", |n| n.routes_of(b) == Some(prefix.clone()))
        .await;
    viewer.settle(Duration::from_millis(300)).await;
    assert_eq!(viewer.routes_of(a), Some(vec![]));

    // r2's map stream ends (the daemon stops following): r1 takes over.
    let t = Instant::now();
    r2.close_stream();
    viewer
        .until("r1 primary", |n| {
            n.routes_of(a) == Some(prefix.clone()) && n.routes_of(b) == Some(vec![])
        })
        .await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(
        viewer
            .log
            .iter()
            .rev()
            .take(4)
            .any(|k| matches!(k, Kind::PeerChanged(n) if n.id == a)),
        "{:?}",
        viewer.log
    );
    r1.until("primary", |n| n.me.primary_routes == prefix).await;

    // r2 comes back: r1 keeps the prefix.
    r2.connect().await;
    assert!(r2.me.primary_routes.is_empty(), "{:?}", r2.me);
    viewer.settle(Duration::from_millis(300)).await;
    assert_eq!(viewer.routes_of(a), Some(prefix.clone()));
    assert_eq!(viewer.routes_of(b), Some(vec![]));
    assert_eq!(admin_node(&mut admin, a).await.primary_routes, prefix);

    // r1 is killed (connection and all): r2 takes over again.
    let t = Instant::now();
    r1.kill();
    viewer
        .until("r2 primary again", |n| {
            n.routes_of(b) == Some(prefix.clone()) && n.routes_of(a) == Some(vec![])
        })
        .await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_no_route_lists(&viewer);
    server.stop().await;
}

/// Relays one TCP connection to `to`, until `freeze` is set: then bytes stop flowing both ways
/// while both sockets stay open (a router that lost power or its cable).
async fn freezable_proxy(
    to: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let frozen = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&frozen);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let (mut ri, mut wi) = inbound.into_split();
            let (mut ro, mut wo) = outbound.into_split();
            let (f1, f2) = (Arc::clone(&flag), Arc::clone(&flag));
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                while let Ok(n) = ri.read(&mut buf).await {
                    if n == 0 || f1.load(Ordering::SeqCst) {
                        break;
                    }
                    if wo.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                // Frozen: hold the sockets open, silently.
                std::future::pending::<()>().await;
                drop((ri, wo));
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                while let Ok(n) = ro.read(&mut buf).await {
                    if n == 0 || f2.load(Ordering::SeqCst) {
                        break;
                    }
                    if wi.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                std::future::pending::<()>().await;
                drop((ro, wi));
            });
        }
    });
    (addr, frozen)
}

#[tokio::test]
async fn a_silently_dead_primary_is_caught_by_the_http2_pings_with_the_default_timing() {
    let server = Server::start().await;
    let mut admin = server.local_admin().await;
    let key = user_key(&mut admin, "alice", &[]).await;
    let mut r1 = TestNode::register(&server, &key, "r1").await;
    let mut r2 = TestNode::register(&server, &key, "r2").await;
    let mut viewer = TestNode::register(&server, &key, "viewer").await;
    // r1 reaches the server through a link that can go silent.
    let (via, frozen) = freezable_proxy(server.addr).await;
    r1.url = format!("http://{via}");
    r1.control = None;
    for n in [&mut r1, &mut r2, &mut viewer] {
        n.connect().await;
    }
    let prefix = strings(&["10.40.0.0/24"]);
    for n in [&mut r1, &mut r2] {
        n.advertise(&["10.40.0.0/24"]).await.expect("advertise");
        approve(&mut admin, n.id, &["10.40.0.0/24"])
            .await
            .expect("approve");
    }
    let (a, b) = (r1.id, r2.id);
    viewer
        .until("r1 primary", |n| n.routes_of(a) == Some(prefix.clone()))
        .await;
    let t = Instant::now();
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    viewer
        .until("r2 primary after r1 went silent", |n| {
            n.routes_of(b) == Some(prefix.clone())
        })
        .await;
    let took = t.elapsed();
    // Pings every 4 s, 4 s to answer: at most 8 s (plus scheduling), under the 10 s budget.
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(took > Duration::from_secs(3), "not a TCP close: {took:?}");
    server.stop().await;
}

/// alice may use exit nodes; carol may only reach the exit node itself on 22; bob nothing.
const EXIT_POLICY: &str = r#"{
  "tagOwners": {"tag:exit": ["ops@"]},
  "acls": [
    {"action": "accept", "src": ["alice@"], "dst": ["autogroup:internet:*"]},
    {"action": "accept", "src": ["carol@"], "dst": ["tag:exit:22"]},
  ],
}"#;

#[tokio::test]
async fn exit_nodes_are_offered_only_to_viewers_with_internet_access_and_a_grant_applies_live() {
    let (server, mut admin, [mut exit, mut alice, mut bob, mut carol]) =
        gateway_and_three_users(EXIT_POLICY, "tag:exit", "exit").await;
    let e = exit.id;
    exit.advertise(&["0.0.0.0/0", "::/0"])
        .await
        .expect("advertise");
    // Approving one exit route approves both.
    let approved = approve(&mut admin, e, &["0.0.0.0/0"])
        .await
        .expect("approve");
    assert_eq!(approved.approved_routes, ["0.0.0.0/0", "::/0"]);
    assert!(approved.exit_node);
    assert!(
        approved.primary_routes.is_empty(),
        "exit routes are not elected"
    );
    exit.until("exit node", |n| n.me.exit_node).await;
    alice
        .until("the exit node offered", |n| {
            n.peer(e).is_some_and(|p| p.exit_node)
        })
        .await;
    assert!(alice.peer(e).is_some_and(|p| p.primary_routes.is_empty()));
    carol.settle(Duration::from_millis(300)).await;
    bob.settle(Duration::from_millis(300)).await;
    assert!(
        carol.peer(e).is_some_and(|p| !p.exit_node),
        "carol sees the node, not an exit node: {:?}",
        carol.peer(e)
    );
    assert_eq!(bob.peer(e), None, "nothing lets bob see the exit node");
    // The exit node's filter keeps alice's internet rule (autogroup:internet, not its own IP).
    exit.until("the internet rule", |n| {
        n.filter.rules.iter().any(|r| {
            r.src.contains(&format!("{}/32", alice.ipv4()))
                && r.dst.iter().any(|d| d.net == "8.0.0.0/7")
        })
    })
    .await;

    // explain: may X use the exit node for 198.51.100.7:443?
    let explain = |src: &str| ExplainPolicyRequest {
        src: src.into(),
        dst: "198.51.100.7".into(),
        port: Some(443),
        proto: String::new(),
        exit_node: "exit".into(),
    };
    let d = admin
        .explain_policy(explain("alice-laptop"))
        .await
        .expect("explain")
        .into_inner()
        .decisions
        .remove(0);
    assert!(d.allowed && d.exit_node_offered && d.visible, "{d:?}");
    assert_eq!((d.dst_node.as_str(), d.dst_node_id), ("exit", e));
    assert_eq!(d.dst_ip, "198.51.100.7");
    assert_eq!(
        d.rule.map(|r| (r.section, r.index)),
        Some(("acls".into(), 0))
    );
    for who in ["bob-phone", "carol-pc"] {
        let d = admin
            .explain_policy(explain(who))
            .await
            .expect("explain")
            .into_inner()
            .decisions
            .remove(0);
        assert!(!d.allowed && !d.exit_node_offered, "{who}: {d:?}");
    }
    let err = admin
        .explain_policy(ExplainPolicyRequest {
            exit_node: "no-such-node".into(),
            ..explain("alice-laptop")
        })
        .await
        .expect_err("unknown exit node");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        "exit node \"no-such-node\" matches no node name, mesh address, user, group or tag"
    );

    // A policy edit gives bob the internet: the exit node appears for him, offered, live.
    let granted = EXIT_POLICY.replace(r#"["alice@"]"#, r#"["alice@", "bob@"]"#);
    set_policy(&mut admin, &granted).await;
    bob.until("the exit node offered", |n| {
        n.peer(e).is_some_and(|p| p.exit_node)
    })
    .await;
    assert!(
        bob.log
            .iter()
            .any(|k| matches!(k, Kind::PeerAdded(n) if n.id == e && n.exit_node))
    );
    // And carol gets it offered when her rule becomes `*`, which covers the internet.
    let star = granted.replace(r#"["tag:exit:22"]"#, r#"["*:*"]"#);
    set_policy(&mut admin, &star).await;
    carol
        .until("the exit node offered", |n| {
            n.peer(e).is_some_and(|p| p.exit_node)
        })
        .await;
    assert!(
        carol
            .log
            .iter()
            .any(|k| matches!(k, Kind::PeerChanged(n) if n.id == e && n.exit_node)),
        "a kept peer changes: {:?}",
        carol.log
    );
    for n in [&alice, &bob, &carol] {
        assert_no_route_lists(n);
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_routes_are_refused_with_typed_errors_and_change_nothing() {
    let server = Server::start().await;
    let mut admin = server.local_admin().await;
    let key = user_key(&mut admin, "alice", &[]).await;
    let mut node = TestNode::register(&server, &key, "r").await;
    node.advertise(&["10.20.0.0/24"]).await.expect("good");

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            strings(&["10.20.0.1/24"]),
            "advertised_routes: \"10.20.0.1/24\" has host bits set; write 10.20.0.0/24",
        ),
        (
            strings(&["10.20.0.0/24", "not-a-route"]),
            "advertised_routes: \"not-a-route\" is not a prefix (address/length, like \
             10.20.0.0/24 or 0.0.0.0/0)",
        ),
        (
            strings(&["100.64.0.0/16"]),
            "advertised_routes: \"100.64.0.0/16\" overlaps the mesh's own range 100.64.0.0/10",
        ),
        (
            (0..300)
                .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
                .collect(),
            "advertised_routes: 300 routes; at most 256",
        ),
    ];
    for (routes, message) in &cases {
        // A hostname in the same request is not applied either.
        let mut req = UpdateNodeRequest {
            hostname: Some("renamed".into()),
            advertised_routes: Some(RouteList {
                routes: routes.clone(),
            }),
            ..UpdateNodeRequest::default()
        };
        req.proof = Some(sign(&node.key, &node.server_key, "UpdateNode", &req));
        let err = node.client().update_node(req).await.expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(err.message(), *message);
    }
    let listed = admin_node(&mut admin, node.id).await;
    assert_eq!(listed.advertised_routes, ["10.20.0.0/24"]);
    assert_eq!(listed.hostname, "r");

    let err = approve(&mut admin, node.id, &["fd7a:115c:a1e0::/64"])
        .await
        .expect_err("mesh range");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "routes: \"fd7a:115c:a1e0::/64\" overlaps the mesh's own range fd7a:115c:a1e0::/48"
    );
    let err = approve(&mut admin, 999, &["10.0.0.0/8"])
        .await
        .expect_err("no node");
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "node 999 not found")
    );
    assert!(
        admin_node(&mut admin, node.id)
            .await
            .approved_routes
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test]
async fn dns_settings_arrive_in_the_full_map() {
    let server = Server::start_with(|c| {
        c.dns.base_domain = "mesh.example".into();
        c.dns.nameservers.global = strings(&["1.1.1.1", "[2606:4700:4700::1111]:53"]);
        c.dns
            .nameservers
            .split
            .insert("corp.example".into(), strings(&["10.0.0.53"]));
        c.dns.search_domains = strings(&["corp.example"]);
        c.dns.extra_records = vec![warren_control::config::ExtraRecord {
            name: "grafana.mesh.example".into(),
            kind: "A".into(),
            value: "100.64.0.9".into(),
        }];
    })
    .await;
    let mut admin = server.local_admin().await;
    let key = user_key(&mut admin, "alice", &[]).await;
    let mut node = TestNode::register(&server, &key, "n").await;
    node.connect().await;
    let dns = &node.dns;
    assert!(dns.magic_dns);
    assert_eq!(dns.base_domain, "mesh.example");
    assert_eq!(dns.nameservers, ["1.1.1.1", "[2606:4700:4700::1111]:53"]);
    assert_eq!(
        dns.split,
        [SplitDns {
            domain: "corp.example".into(),
            nameservers: strings(&["10.0.0.53"]),
        }]
    );
    assert_eq!(dns.search_domains, ["corp.example"]);
    assert_eq!(
        dns.extra_records,
        [DnsRecord {
            name: "grafana.mesh.example".into(),
            r#type: "A".into(),
            value: "100.64.0.9".into(),
        }]
    );
    server.stop().await;
}

#[tokio::test]
async fn routes_and_approvals_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("db.sqlite");
    let configure = |c: &mut warren_control::config::Config| c.database.sqlite.path = db.clone();
    let server = Server::start_with(configure).await;
    let mut admin = server.local_admin().await;
    let key = user_key(&mut admin, "alice", &[]).await;
    let mut node = TestNode::register(&server, &key, "r").await;
    node.advertise(&["10.20.0.0/24", "::/0", "0.0.0.0/0"])
        .await
        .expect("advertise");
    approve(&mut admin, node.id, &["::/0", "10.20.0.0/24"])
        .await
        .expect("approve");
    drop(admin);
    node.kill();
    server.stop().await;

    let server = Server::start_with(configure).await;
    let mut admin = server.local_admin().await;
    let n = admin_node(&mut admin, node.id).await;
    assert_eq!(n.advertised_routes, ["0.0.0.0/0", "10.20.0.0/24", "::/0"]);
    assert_eq!(n.approved_routes, ["0.0.0.0/0", "10.20.0.0/24", "::/0"]);
    assert!(n.exit_node);
    assert!(n.primary_routes.is_empty(), "offline: primary for nothing");
    server.stop().await;
}
