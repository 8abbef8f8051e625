//! The server's state and rules, without gRPC or a clock: registration, authentication, the
//! admin operations, and keeping store, address allocator and live netmap in step. Every method
//! takes the current time, so tests and benchmarks drive it directly.
//!
//! The database decides; the core is a cache of it. A write goes to the store first (where
//! addresses, names, node keys and single-use pre-auth keys are unique, atomically), which
//! logs it with the next version of the change log; the core then applies committed changes in
//! log order ([`Core::catch_up`]), its own and other instances' alike, and the netmap fans them
//! out to the streams of this process. Map versions are the log's, so a node resumes at any
//! instance on the same database.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use warren_proto::control::{DerpMap, DnsConfig, Node};
use warren_proto::{DiscoPublicKey, NodePublicKey};

use crate::error::ControlError;
use crate::ipam::Ipam;
use crate::netmap::{FullMapSource, Netmap, Restored, Subscription};
use crate::policy::{CompiledPolicy, NodeOwner, PolicyError, PolicyNode, PolicyState, PolicyUser};
use crate::routes::{self, Primaries};
use crate::secret::{self, SecretKind};
use crate::store::{
    ApiKeyRecord, Change, ChangeKind, NodeRecord, PreAuthKeyRecord, Store, StoreError, UserRecord,
};

/// Default lifetime of a pre-auth key (Headscale's).
pub const DEFAULT_AUTH_KEY_LIFETIME: Duration = Duration::from_secs(3600);
/// The user a tagged node is shown under (Tailscale's and Headscale's name): it is owned by
/// its tags, not by the user whose key registered it.
pub const TAGGED_DEVICES: &str = "tagged-devices";
/// Longest hostname accepted.
pub const MAX_HOSTNAME: usize = 255;
/// Most endpoints a node may report.
pub const MAX_ENDPOINTS: usize = 64;
/// How long an instance's presence outlives its last heartbeat: then another instance
/// declares it dead and its nodes offline.
pub const PRESENCE_TTL_MS: i64 = 10_000;
/// How often an instance renews its presence and looks for dead ones.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How often a registration retries after losing an address or name to another instance.
const REGISTER_ATTEMPTS: usize = 32;
/// How far past the lowest free address a retried registration may land.
const REGISTER_SPREAD: u32 = 4096;
/// Change-log entries read at a time when catching up.
const CATCH_UP_BATCH: usize = 2048;

/// A fingerprint of the policy in force (0: none configured): when it differs from the one
/// the stored versions were counted under, resuming nodes need full maps.
fn policy_fingerprint(policy: Option<&CompiledPolicy>) -> u64 {
    use sha2::Digest;
    let Some(p) = policy else { return 0 };
    // The compiled form: reformatting the file or editing comments changes nothing.
    let digest = sha2::Sha256::digest(format!("{p:?}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(b).max(1)
}

/// What the core needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// IPv4 range for nodes.
    pub v4: ipnet::Ipv4Net,
    /// IPv6 range for nodes.
    pub v6: ipnet::Ipv6Net,
    /// MagicDNS settings sent in every full map.
    pub dns: DnsConfig,
    /// The DERP relays sent in every full map.
    pub derp_map: DerpMap,
    /// The access policy in force at start; `None`: none configured, every node may reach
    /// every other.
    pub policy: Option<Arc<CompiledPolicy>>,
}

/// A new pre-auth key's options.
#[derive(Debug, Clone, Default)]
pub struct NewAuthKey {
    /// Owner's name.
    pub user: String,
    /// Usable more than once.
    pub reusable: bool,
    /// Its nodes are deleted after they go away.
    pub ephemeral: bool,
    /// Lifetime; `None` for the default.
    pub expiration: Option<Duration>,
    /// Tags for its nodes, each `tag:<name>`.
    pub tags: Vec<String>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn expired(at: Option<i64>, now_ms: i64) -> bool {
    at.is_some_and(|t| t <= now_ms)
}

/// A store error as the caller should see it: a single-use key lost to a concurrent
/// registration is [`ControlError::AuthKeyUsed`], a node deleted meanwhile is not found.
fn store_error(e: StoreError, id: u64) -> ControlError {
    match e {
        StoreError::KeyUsed => ControlError::AuthKeyUsed,
        StoreError::Conflict {
            what: "deleted node",
        } => ControlError::NodeNotFound { id },
        e => e.into(),
    }
}

/// Turns a hostname into a DNS label: lowercase letters, digits and dashes, at most 63.
pub fn dns_label(hostname: &str) -> String {
    let mut s: String = hostname
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.truncate(63);
    let s = s.trim_matches('-').to_string();
    if s.is_empty() { "node".into() } else { s }
}

fn valid_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A hostname is shown to other users (status, CLI): no control characters, at most 255 bytes.
pub fn check_hostname(hostname: &str) -> Result<(), ControlError> {
    if hostname.len() > MAX_HOSTNAME {
        return Err(ControlError::InvalidField {
            field: "hostname",
            reason: "longer than 255 bytes",
        });
    }
    if hostname.chars().any(char::is_control) {
        return Err(ControlError::InvalidField {
            field: "hostname",
            reason: "contains control characters",
        });
    }
    Ok(())
}

/// Tags as the policy language writes them: `tag:` then an ASCII letter, then letters, digits,
/// `-` and `_` (one rule for keys, nodes and policy files).
fn check_tags(tags: &[String]) -> Result<(), ControlError> {
    if tags
        .iter()
        .all(|t| t.len() <= 67 && crate::policy::valid_tag(t))
    {
        Ok(())
    } else {
        Err(ControlError::InvalidField {
            field: "tags",
            reason: "each tag is tag:<name>: a letter, then letters, digits, - or _",
        })
    }
}

/// The control server's state.
pub struct Core {
    store: Arc<dyn Store>,
    /// This process among the instances on the database (its presence rows).
    instance: u64,
    /// The last change-log version applied.
    applied: u64,
    /// Nodes some instance serves a stream of.
    online: BTreeSet<u64>,
    /// The policy to apply with the next policy change this process commits (one from the log
    /// written by another instance is read from the store, or only counted in file mode).
    pending_policy: Option<Option<Arc<CompiledPolicy>>>,
    /// Policy changes of other instances are read from the store (`policy.mode = "database"`).
    policy_from_store: bool,
    /// Set when a stored policy from the log was applied: the server's copy of its text is stale.
    policy_reloaded: bool,
    users: BTreeMap<u64, UserRecord>,
    nodes: BTreeMap<u64, NodeRecord>,
    by_key: HashMap<NodePublicKey, u64>,
    names: HashMap<String, u64>,
    ipam: Ipam,
    netmap: Netmap,
    /// The primary router of each subnet prefix served by an online node.
    primaries: Primaries,
    /// Nodes that serve (advertise and have approved) at least one subnet route: the
    /// candidates of the election.
    routers: BTreeSet<u64>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("nodes", &self.nodes.len())
            .field("users", &self.users.len())
            .finish()
    }
}

impl Core {
    /// Loads everything from `store` and joins the instances serving it.
    pub fn open(
        store: Arc<dyn Store>,
        settings: &Settings,
        now_ms: i64,
    ) -> Result<Self, ControlError> {
        let instance = store.join_instance(now_ms)?;
        // Instances that died while nobody watched: their nodes are offline. One that died
        // moments ago (this server's predecessor, restarted) keeps its nodes online for the
        // expiry, and they stay online when they come back in time.
        store.reap_instances(now_ms - PRESENCE_TTL_MS, now_ms)?;
        let state = store.map_state()?;
        let mut core = Self {
            users: store.users()?.into_iter().map(|u| (u.id, u)).collect(),
            nodes: BTreeMap::new(),
            by_key: HashMap::new(),
            names: HashMap::new(),
            ipam: Ipam::new(settings.v4, settings.v6),
            netmap: Netmap::new(
                settings.dns.clone(),
                settings.derp_map.clone(),
                settings.policy.clone(),
            ),
            online: store.online_nodes()?.into_iter().collect(),
            instance,
            applied: state.version,
            pending_policy: None,
            policy_from_store: false,
            policy_reloaded: false,
            store,
            primaries: Primaries::default(),
            routers: BTreeSet::new(),
        };
        let boot = state.version;
        core.netmap.restore(&Restored {
            map_id: state.map_id,
            boot,
            floor: state.floor,
            policy_version: state.policy_version,
            removed: state.removed,
        });
        for n in core.store.nodes()? {
            core.track_routes(&n);
            core.ipam.reserve(n.ipv4);
            core.by_key.insert(n.node_key, n.id);
            core.names.insert(n.given_name.clone(), n.id);
            if !expired(n.expiry_ms, now_ms) {
                let view = core.view(&n);
                let identity = core.identity(&n);
                // Which routers are primary is not stored: their records count as changed.
                let serves = !n.approved_routes.is_empty();
                let version = if serves { boot } else { n.version };
                core.netmap.load(view, identity, version);
            }
            core.nodes.insert(n.id, n);
        }
        // Another policy than the versions were counted under: nobody resumes across it.
        let fingerprint = policy_fingerprint(settings.policy.as_deref());
        if core.store.set_policy_fingerprint(fingerprint)?.is_some() {
            core.pending_policy = Some(settings.policy.clone());
        }
        // Changes committed since the state was read (other instances', the policy's).
        core.catch_up()?;
        // Routes advertised while the server was down may be approvable under this policy.
        core.auto_approve_all()?;
        Ok(core)
    }

    /// This process's instance id among the servers on the database.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// The store, for work done outside the core (proof nonces, heartbeats).
    pub fn store(&self) -> Arc<dyn Store> {
        Arc::clone(&self.store)
    }

    /// Policy changes other instances commit are read from the store (`policy.mode =
    /// "database"`); otherwise each instance enforces its own file and only counts them.
    pub fn set_policy_from_store(&mut self, on: bool) {
        self.policy_from_store = on;
    }

    /// Whether a stored policy written by another instance was applied since the last call.
    pub fn take_policy_reloaded(&mut self) -> bool {
        std::mem::take(&mut self.policy_reloaded)
    }

    /// The last change-log version applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Applies every committed change this process has not applied yet, in log order; returns
    /// how many. Called after each local write and whenever the log grows (PostgreSQL's NOTIFY).
    pub fn catch_up(&mut self) -> Result<usize, ControlError> {
        let mut applied = 0;
        loop {
            let changes = self.store.changes_after(self.applied, CATCH_UP_BATCH)?;
            let Some(first) = changes.first() else {
                return Ok(applied);
            };
            if first.version != self.applied + 1 {
                // The entries in between were trimmed: read everything instead.
                self.reload()?;
                continue;
            }
            for c in changes {
                self.apply(c);
                applied += 1;
            }
        }
    }

    /// Takes up the database's state wholesale when this process fell behind the log's trimmed
    /// end: every record newer than what was applied, every removal, every presence flip.
    fn reload(&mut self) -> Result<(), ControlError> {
        tracing::warn!(
            applied = self.applied,
            "fell behind the change log; reloading every node"
        );
        let head = self.store.map_state()?.version;
        let mut stored = self.store.nodes()?;
        stored.sort_by_key(|n| n.version);
        let now = warren_proto::proof::unix_ms();
        let ids: BTreeSet<u64> = stored.iter().map(|n| n.id).collect();
        for n in stored {
            if n.version > self.applied && n.version <= head {
                let kind = if expired(n.expiry_ms, now) {
                    ChangeKind::Removed
                } else {
                    ChangeKind::Record
                };
                self.apply(Change {
                    version: n.version,
                    node_id: n.id,
                    kind,
                    record: Some(n),
                });
            }
        }
        let gone: Vec<u64> = self
            .nodes
            .keys()
            .filter(|id| !ids.contains(id))
            .copied()
            .collect();
        let online: BTreeSet<u64> = self.store.online_nodes()?.into_iter().collect();
        self.netmap.pin(head);
        for id in gone {
            self.apply_removal(id, None);
        }
        for id in online.symmetric_difference(&self.online.clone()) {
            let record = self.nodes.get(id).cloned();
            self.apply_presence(*id, online.contains(id), record);
        }
        self.netmap.unpin();
        self.applied = self.applied.max(head);
        Ok(())
    }

    /// Applies a change this process just committed: at once when it is the next in the log,
    /// else after the changes before it. Returns the deltas sent.
    fn commit(&mut self, change: Change) -> usize {
        if change.version == self.applied + 1 {
            return self.apply(change);
        }
        if change.version > self.applied
            && let Err(e) = self.catch_up()
        {
            tracing::error!(error = %e, "cannot read the change log");
        }
        0
    }

    /// Applies one committed change to the cache and the netmap, at its version; returns the
    /// deltas sent.
    fn apply(&mut self, c: Change) -> usize {
        self.netmap.pin(c.version);
        let sent = match c.kind {
            ChangeKind::Record | ChangeKind::Endpoints => match c.record {
                Some(n) => self.apply_record(n, c.kind == ChangeKind::Endpoints),
                // Deleted since: its removal follows in the log.
                None => 0,
            },
            ChangeKind::Removed => self.apply_removal(c.node_id, c.record),
            ChangeKind::Online | ChangeKind::Offline => {
                self.apply_presence(c.node_id, c.kind == ChangeKind::Online, c.record)
            }
            ChangeKind::Policy => self.apply_policy(),
        };
        self.netmap.unpin();
        self.applied = c.version;
        sent
    }

    /// Takes up a node's stored record in the cache (names, keys, addresses, routers).
    fn cache_record(&mut self, n: NodeRecord) {
        let id = n.id;
        if let Some(old) = self.nodes.get(&id)
            && old.given_name != n.given_name
            && self.names.get(&old.given_name) == Some(&id)
        {
            self.names.remove(&old.given_name);
        }
        if !self.users.contains_key(&n.user_id) {
            self.refresh_users();
        }
        self.by_key.insert(n.node_key, id);
        self.names.insert(n.given_name.clone(), id);
        self.ipam.reserve(n.ipv4);
        self.track_routes(&n);
        self.nodes.insert(id, n);
    }

    fn apply_record(&mut self, n: NodeRecord, endpoints_only: bool) -> usize {
        let id = n.id;
        let was_router = self.routers.contains(&id);
        self.cache_record(n.clone());
        let mut sent = if endpoints_only && self.netmap.node(id).is_some() {
            let strings = n.endpoints.iter().map(|e| e.to_string()).collect();
            self.netmap.set_endpoints(id, strings)
        } else {
            self.publish(&n).1
        };
        if was_router || self.routers.contains(&id) {
            sent += self.elect();
        }
        sent
    }

    fn apply_removal(&mut self, id: u64, record: Option<NodeRecord>) -> usize {
        match record {
            // Expired: it stays registered, out of the map.
            Some(n) => self.cache_record(n),
            None => {
                if let Some(n) = self.nodes.remove(&id) {
                    self.by_key.remove(&n.node_key);
                    if self.names.get(&n.given_name) == Some(&id) {
                        self.names.remove(&n.given_name);
                    }
                    self.ipam.release(n.ipv4);
                    tracing::info!(node = id, name = %n.given_name, "node deleted");
                }
                self.online.remove(&id);
            }
        }
        let was_router = self.routers.contains(&id);
        if !self.nodes.contains_key(&id) {
            self.routers.remove(&id);
        }
        let mut sent = self.netmap.remove(id);
        if was_router {
            sent += self.elect();
        }
        sent
    }

    fn apply_presence(&mut self, id: u64, online: bool, record: Option<NodeRecord>) -> usize {
        if online {
            self.online.insert(id);
        } else {
            self.online.remove(&id);
        }
        let mut last_seen = 0;
        if let (Some(n), Some(r)) = (self.nodes.get_mut(&id), record) {
            n.last_seen_ms = r.last_seen_ms;
            last_seen = r.last_seen_ms.unwrap_or(0);
        }
        let mut sent = self.netmap.set_online(id, online, last_seen);
        // A router coming online may be the only one of a prefix; one going offline hands its
        // prefixes to the lowest-id online router serving them.
        if self.routers.contains(&id) {
            sent += self.elect();
        }
        sent
    }

    fn apply_policy(&mut self) -> usize {
        let policy = match self.pending_policy.take() {
            Some(p) => p,
            None if self.policy_from_store => match self.stored_policy() {
                Ok(stored) => {
                    self.policy_reloaded = true;
                    match stored
                        .map(|p| CompiledPolicy::from_text(&p.text))
                        .transpose()
                    {
                        Ok(p) => p.map(Arc::new),
                        Err(e) => {
                            tracing::error!(error = %e, "the stored policy does not compile; keeping the one in force");
                            self.netmap.note_policy_change();
                            return 0;
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the stored policy");
                    self.netmap.note_policy_change();
                    return 0;
                }
            },
            None => {
                // Another instance's policy file: this one enforces its own, but nodes that
                // resume across the change get full maps.
                self.netmap.note_policy_change();
                return 0;
            }
        };
        match self.netmap.set_policy(policy) {
            Ok(sent) => sent,
            Err(e) => {
                tracing::error!(error = %e, "policy from the change log refused; keeping the one in force");
                self.netmap.note_policy_change();
                0
            }
        }
    }

    fn refresh_users(&mut self) {
        match self.store.users() {
            Ok(users) => self.users = users.into_iter().map(|u| (u.id, u)).collect(),
            Err(e) => tracing::error!(error = %e, "cannot read users"),
        }
    }

    /// How many nodes are online, offline and expired at `now_ms` (for metrics).
    pub fn node_states(&self, now_ms: i64) -> crate::metrics::NodeStates {
        let mut states = crate::metrics::NodeStates::default();
        for n in self.nodes.values() {
            if expired(n.expiry_ms, now_ms) {
                states.expired += 1;
            } else if self.online.contains(&n.id) {
                states.online += 1;
            } else {
                states.offline += 1;
            }
        }
        states
    }

    /// The live netmap, for inspection.
    pub fn netmap(&self) -> &Netmap {
        &self.netmap
    }

    fn user_name(&self, id: u64) -> String {
        self.users
            .get(&id)
            .map(|u| u.name.clone())
            .unwrap_or_default()
    }

    fn user_by_name(&self, name: &str) -> Result<&UserRecord, ControlError> {
        self.users
            .values()
            .find(|u| u.name == name)
            .ok_or_else(|| ControlError::UserNotFound { name: name.into() })
    }

    /// The user named `name`, reading the database when this cache does not know it (another
    /// instance may have added it).
    fn find_user(&mut self, name: &str) -> Result<UserRecord, ControlError> {
        if self.user_by_name(name).is_err() {
            self.refresh_users();
        }
        self.user_by_name(name).cloned()
    }

    /// A node record as peers and admins see it.
    fn view(&self, n: &NodeRecord) -> Node {
        Node {
            id: n.id,
            node_key: n.node_key.to_vec(),
            disco_key: n.disco_key.to_vec(),
            hostname: n.hostname.clone(),
            given_name: n.given_name.clone(),
            // A tagged node belongs to its tags, not to the user whose key registered it.
            user: if n.tags.is_empty() {
                self.user_name(n.user_id)
            } else {
                TAGGED_DEVICES.to_owned()
            },
            tags: n.tags.clone(),
            addresses: vec![format!("{}/32", n.ipv4), format!("{}/128", n.ipv6)],
            endpoints: n.endpoints.iter().map(|e| e.to_string()).collect(),
            online: self.online.contains(&n.id),
            last_seen_unix_ms: n.last_seen_ms.unwrap_or(0),
            expiry_unix_ms: n.expiry_ms.unwrap_or(0),
            created_unix_ms: n.created_ms,
            ephemeral: n.ephemeral,
            home_region: n.home_region,
            advertised_routes: n
                .advertised_routes
                .iter()
                .map(ToString::to_string)
                .collect(),
            approved_routes: n.approved_routes.iter().map(ToString::to_string).collect(),
            primary_routes: self
                .primaries
                .of(n.id)
                .iter()
                .map(ToString::to_string)
                .collect(),
            exit_node: routes::serving(&n.advertised_routes, &n.approved_routes)
                .iter()
                .any(routes::is_exit),
        }
    }

    /// A node as the policy sees it: owned by its tags when it has any (Headscale 0.28+:
    /// a tagged node belongs to no user), else by its user.
    fn identity(&self, n: &NodeRecord) -> PolicyNode {
        let owner = if n.tags.is_empty() {
            NodeOwner::User(PolicyUser {
                id: n.user_id,
                name: self.user_name(n.user_id),
                email: None,
            })
        } else {
            NodeOwner::Tags(n.tags.clone())
        };
        PolicyNode {
            id: crate::policy::NodeId(n.id),
            name: n.given_name.clone(),
            owner,
            ipv4: Some(n.ipv4),
            ipv6: Some(n.ipv6),
            // What the policy matches on: the routes the node actually serves.
            approved_routes: routes::serving(&n.advertised_routes, &n.approved_routes),
        }
    }

    /// Stores a changed node (logging `kind`) and applies the change; returns the deltas sent.
    fn save(
        &mut self,
        n: &NodeRecord,
        kind: ChangeKind,
        claim: bool,
    ) -> Result<usize, ControlError> {
        let version = self
            .store
            .update_node(n, kind, claim)
            .map_err(|e| store_error(e, n.id))?;
        Ok(self.commit(Change {
            version,
            node_id: n.id,
            kind,
            record: Some(n.clone()),
        }))
    }

    /// Puts a node's current record into the live netmap (with its policy identity).
    fn publish(&mut self, n: &NodeRecord) -> (Node, usize) {
        let view = self.view(n);
        let identity = self.identity(n);
        let sent = self.netmap.upsert(view.clone(), identity);
        (view, sent)
    }

    fn unique_name(&self, wanted: &str, taken: &BTreeSet<String>) -> String {
        let base = dns_label(wanted);
        let free = |n: &str| !self.names.contains_key(n) && !taken.contains(n);
        if free(&base) {
            return base;
        }
        (2u32..)
            .map(|i| {
                let suffix = format!("-{i}");
                let mut b = base.clone();
                b.truncate(63 - suffix.len());
                format!("{b}{suffix}")
            })
            .find(|n| free(n))
            .unwrap_or(base)
    }

    /// `wanted` with a random suffix (`-` and four hex digits), for a registration that lost
    /// its sequential name to another instance.
    fn random_name(&self, wanted: &str, random: u32, taken: &BTreeSet<String>) -> String {
        let mut base = dns_label(wanted);
        base.truncate(63 - 5);
        (0..16u32)
            .map(|i| {
                format!(
                    "{base}-{:04x}",
                    random.wrapping_add(i.wrapping_mul(0x9e37)) & 0xffff
                )
            })
            .find(|n| !self.names.contains_key(n) && !taken.contains(n))
            .unwrap_or_else(|| self.unique_name(wanted, taken))
    }

    fn check_auth_key(&self, text: &str, now_ms: i64) -> Result<PreAuthKeyRecord, ControlError> {
        let presented = secret::parse(SecretKind::Auth, text)?;
        let key = self
            .store
            .preauth_key(&presented.prefix)?
            .ok_or(ControlError::AuthKeyNotFound)?;
        if !secret::same_hash(&key.hash, &presented.hash) {
            return Err(ControlError::AuthKeyNotFound);
        }
        if expired(key.expiration_ms, now_ms) {
            return Err(ControlError::AuthKeyExpired);
        }
        if key.used && !key.reusable {
            return Err(ControlError::AuthKeyUsed);
        }
        Ok(key)
    }

    /// Registers `node_key`, or returns its record when it is known and not expired (the pre-auth
    /// key is then not needed). Nothing is stored when the key is refused.
    pub fn register(
        &mut self,
        node_key: NodePublicKey,
        disco_key: DiscoPublicKey,
        hostname: &str,
        auth_key: &str,
        now_ms: i64,
    ) -> Result<Node, ControlError> {
        check_hostname(hostname)?;
        if let Some(&id) = self.by_key.get(&node_key) {
            let mut n = self
                .nodes
                .get(&id)
                .cloned()
                .ok_or(ControlError::NodeNotFound { id })?;
            let mut claim = false;
            if expired(n.expiry_ms, now_ms) {
                // Coming back after expiry takes a valid key, which then owns the node; without
                // one the answer is that the node expired, not that "" is a malformed key.
                if auth_key.is_empty() {
                    return Err(ControlError::NodeExpired { key: node_key });
                }
                let key = self.check_auth_key(auth_key, now_ms)?;
                n.expiry_ms = None;
                n.auth_key_id = Some(key.id);
                n.user_id = key.user_id;
                n.tags = key.tags;
                n.ephemeral = key.ephemeral;
                claim = true;
            }
            n.disco_key = disco_key;
            n.hostname = hostname.to_string();
            self.save(&n, ChangeKind::Record, claim)?;
            return self.node(id);
        }
        let key = self.check_auth_key(auth_key, now_ms)?;
        // Address and name are picked from this cache and made unique by the database: one
        // lost to another instance's registration is read from the log and the next is tried.
        let mut taken_names = BTreeSet::new();
        let mut last = StoreError::Conflict {
            what: "node address",
        };
        for attempt in 0..REGISTER_ATTEMPTS {
            // After losing a race, skip ahead of the other instance's lowest-first choices.
            let mut random = [0u8; 4];
            if attempt > 0 {
                getrandom::getrandom(&mut random).unwrap_or_default();
            }
            let random = u32::from_le_bytes(random);
            let (ipv4, ipv6) = if attempt == 0 {
                self.ipam.allocate()?
            } else {
                self.ipam.allocate_spread(REGISTER_SPREAD, random)?
            };
            let mut given_name = self.unique_name(hostname, &taken_names);
            if attempt > 0 && given_name != dns_label(hostname) {
                given_name = self.random_name(hostname, random, &taken_names);
            }
            let mut n = NodeRecord {
                id: 0,
                node_key,
                disco_key,
                hostname: hostname.to_string(),
                given_name,
                user_id: key.user_id,
                tags: key.tags.clone(),
                ipv4,
                ipv6,
                endpoints: Vec::new(),
                last_seen_ms: None,
                expiry_ms: None,
                created_ms: now_ms,
                ephemeral: key.ephemeral,
                auth_key_id: Some(key.id),
                home_region: 0,
                advertised_routes: Vec::new(),
                approved_routes: Vec::new(),
                version: 0,
            };
            let lost = match self.store.register_node(&n) {
                Ok((id, version)) => {
                    n.id = id;
                    n.version = version;
                    tracing::info!(node = id, name = %n.given_name, key = %node_key.short(), %ipv4, "node registered");
                    self.commit(Change {
                        version,
                        node_id: id,
                        kind: ChangeKind::Record,
                        record: Some(n),
                    });
                    return self.node(id);
                }
                // The address stays reserved here: another node holds it.
                Err(StoreError::Conflict {
                    what: "node address",
                }) => None,
                Err(StoreError::Conflict { what: "node name" }) => Some(n.given_name),
                Err(StoreError::Conflict { what: "node key" }) => {
                    // The same node registered through another instance at the same moment.
                    self.ipam.release(ipv4);
                    self.catch_up()?;
                    if self.by_key.contains_key(&node_key) {
                        return self.register(node_key, disco_key, hostname, auth_key, now_ms);
                    }
                    return Err(StoreError::Conflict { what: "node key" }.into());
                }
                Err(e) => {
                    self.ipam.release(ipv4);
                    return Err(store_error(e, 0));
                }
            };
            last = StoreError::Conflict {
                what: "node address",
            };
            if let Some(name) = lost {
                self.ipam.release(ipv4);
                taken_names.insert(name);
                last = StoreError::Conflict { what: "node name" };
            }
            self.catch_up()?;
        }
        Err(last.into())
    }

    /// The id of the node that proved `key`, if it may act.
    pub fn authenticate(&self, key: &NodePublicKey, now_ms: i64) -> Result<u64, ControlError> {
        let id = *self
            .by_key
            .get(key)
            .ok_or(ControlError::UnknownNode { key: *key })?;
        let n = self
            .nodes
            .get(&id)
            .ok_or(ControlError::UnknownNode { key: *key })?;
        if expired(n.expiry_ms, now_ms) {
            return Err(ControlError::NodeExpired { key: *key });
        }
        Ok(id)
    }

    /// A node's own record.
    pub fn node(&self, id: u64) -> Result<Node, ControlError> {
        self.nodes
            .get(&id)
            .map(|n| self.view(n))
            .ok_or(ControlError::NodeNotFound { id })
    }

    /// The peers `id` can see.
    pub fn peers(&self, id: u64) -> Vec<Node> {
        self.netmap
            .full_map(id)
            .map(|m| m.peers)
            .unwrap_or_default()
    }

    /// Applies what a node reported; returns the deltas sent.
    pub fn update_node(
        &mut self,
        id: u64,
        endpoints: Option<Vec<SocketAddr>>,
        hostname: Option<String>,
        home_region: Option<u32>,
    ) -> Result<usize, ControlError> {
        let mut n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or(ControlError::NodeNotFound { id })?;
        if endpoints.as_ref().is_some_and(|e| e.len() > MAX_ENDPOINTS) {
            return Err(ControlError::InvalidField {
                field: "endpoints",
                reason: "more than 64",
            });
        }
        if let Some(h) = &hostname {
            check_hostname(h)?;
        }
        let endpoints_changed = endpoints.as_ref().is_some_and(|e| *e != n.endpoints);
        let record_changed = hostname.as_ref().is_some_and(|h| *h != n.hostname)
            || home_region.is_some_and(|r| r != n.home_region);
        if !endpoints_changed && !record_changed {
            return Ok(0);
        }
        if let Some(r) = home_region {
            n.home_region = r;
        }
        if let Some(e) = endpoints {
            n.endpoints = e;
        }
        if let Some(h) = hostname {
            n.hostname = h;
        }
        let kind = if record_changed {
            ChangeKind::Record
        } else {
            ChangeKind::Endpoints
        };
        self.save(&n, kind, false)
    }

    /// Opens a map stream for `id` and marks it online. With `resume` (map id, version the
    /// node applied) the stream starts with the changes since, when the netmap still has them.
    pub fn subscribe(
        &mut self,
        id: u64,
        now_ms: i64,
        resume: Option<(u64, u64)>,
    ) -> Result<Subscription, ControlError> {
        if !self.nodes.contains_key(&id) {
            return Err(ControlError::NodeNotFound { id });
        }
        self.claim_presence(id, now_ms)?;
        let sub = self
            .netmap
            .subscribe(id, resume)
            .ok_or(ControlError::NodeNotFound { id })?;
        Ok(sub)
    }

    /// Records that this instance serves a stream of `id`, and applies the node coming online
    /// when that is its first stream on any instance.
    fn claim_presence(&mut self, id: u64, now_ms: i64) -> Result<(), ControlError> {
        if let Some(version) = self.store.set_presence(id, self.instance, true, now_ms)? {
            self.commit(Change {
                version,
                node_id: id,
                kind: ChangeKind::Online,
                record: self.nodes.get(&id).cloned(),
            });
        }
        Ok(())
    }

    /// The server is shutting down: see [`Netmap::stop_sending`].
    pub fn stop_sending(&mut self) {
        self.netmap.stop_sending();
    }

    /// A fresh full map for a lagging stream; see [`Netmap::resync`].
    pub fn resync(&mut self, id: u64, stream: u64) -> Option<FullMapSource> {
        self.netmap.resync(id, stream)
    }

    /// Closes stream `stream` of `id`. When that leaves the node offline, records when it was
    /// last seen and returns whether it is ephemeral (and so due for reaping).
    pub fn unsubscribe(&mut self, id: u64, stream: u64, now_ms: i64) -> Option<bool> {
        // Not this stream's end when a newer stream replaced it (and is still open).
        if !self.netmap.unsubscribe(id, stream) && self.netmap.is_subscribed(id) {
            return None;
        }
        match self.store.set_presence(id, self.instance, false, now_ms) {
            Ok(Some(version)) => {
                let mut record = self.nodes.get(&id).cloned();
                if let Some(r) = &mut record {
                    r.last_seen_ms = Some(now_ms);
                }
                self.commit(Change {
                    version,
                    node_id: id,
                    kind: ChangeKind::Offline,
                    record,
                });
            }
            // Another instance still serves it.
            Ok(None) => {}
            Err(e) => tracing::warn!(node = id, error = %e, "could not record the node offline"),
        }
        let n = self.nodes.get(&id)?;
        (!self.online.contains(&id)).then_some(n.ephemeral)
    }

    /// Deletes every ephemeral node that has been offline (or never connected) for longer than
    /// `timeout_ms`; returns the ids deleted.
    pub fn reap_ephemeral(
        &mut self,
        now_ms: i64,
        timeout_ms: i64,
    ) -> Result<Vec<u64>, ControlError> {
        let due: Vec<u64> = self
            .nodes
            .values()
            .filter(|n| n.ephemeral && !self.online.contains(&n.id))
            .filter(|n| now_ms.saturating_sub(n.last_seen_ms.unwrap_or(n.created_ms)) > timeout_ms)
            .map(|n| n.id)
            .collect();
        let mut deleted = Vec::new();
        for id in due {
            tracing::info!(node = id, "ephemeral node inactive; deleting");
            match self.delete_node(id) {
                Ok(_) => deleted.push(id),
                // Another instance's sweep was first.
                Err(ControlError::NodeNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Why a map stream of `id` ended from the server's side.
    pub fn stream_end_reason(&self, id: u64, now_ms: i64) -> tonic::Status {
        match self.nodes.get(&id) {
            None => tonic::Status::not_found("node was deleted"),
            Some(n) if expired(n.expiry_ms, now_ms) => {
                ControlError::NodeExpired { key: n.node_key }.into()
            }
            Some(_) => tonic::Status::aborted("map stream replaced by a newer one"),
        }
    }

    // --- admin ---

    /// Adds a user.
    pub fn create_user(&mut self, name: &str, now_ms: i64) -> Result<UserRecord, ControlError> {
        if !valid_label(name) {
            return Err(ControlError::InvalidField {
                field: "name",
                reason: "lowercase letters, digits, dashes; at most 63",
            });
        }
        if self.users.values().any(|u| u.name == name) {
            return Err(ControlError::UserExists { name: name.into() });
        }
        let u = self.store.create_user(name, now_ms).map_err(|e| match e {
            // Another instance created it meanwhile.
            StoreError::Conflict { .. } => ControlError::UserExists { name: name.into() },
            e => e.into(),
        })?;
        self.users.insert(u.id, u.clone());
        Ok(u)
    }

    /// Every user, as the database has them (another instance may have added some).
    pub fn users(&mut self) -> Vec<UserRecord> {
        self.refresh_users();
        self.users.values().cloned().collect()
    }

    /// Removes a user that has no nodes.
    pub fn delete_user(&mut self, name: &str) -> Result<(), ControlError> {
        let id = self.find_user(name)?.id;
        let count = self.nodes.values().filter(|n| n.user_id == id).count();
        if count > 0 {
            return Err(ControlError::UserHasNodes {
                name: name.into(),
                count,
            });
        }
        self.store.delete_user(id).map_err(|e| match e {
            // A node registered through another instance meanwhile.
            StoreError::InUse { .. } => ControlError::UserHasNodes {
                name: name.into(),
                count: 1,
            },
            e => e.into(),
        })?;
        self.users.remove(&id);
        Ok(())
    }

    /// Makes a pre-auth key from 30 random bytes; returns it and its one-time text.
    pub fn create_auth_key(
        &mut self,
        new: &NewAuthKey,
        random: [u8; 30],
        now_ms: i64,
    ) -> Result<(PreAuthKeyRecord, String), ControlError> {
        let user_id = self.find_user(&new.user)?.id;
        // The tags must be owned in the policy in force (Headscale checks only the prefix).
        self.check_node_tags(&new.tags)?;
        let issued = secret::issue(SecretKind::Auth, random);
        let mut rec = PreAuthKeyRecord {
            id: 0,
            user_id,
            prefix: issued.prefix,
            hash: issued.hash,
            reusable: new.reusable,
            ephemeral: new.ephemeral,
            used: false,
            expiration_ms: Some(
                now_ms.saturating_add(ms(new.expiration.unwrap_or(DEFAULT_AUTH_KEY_LIFETIME))),
            ),
            created_ms: now_ms,
            tags: new.tags.clone(),
        };
        rec.id = self.store.insert_preauth_key(&rec)?;
        Ok((rec, issued.text))
    }

    /// Pre-auth keys, of one user or all.
    pub fn auth_keys(&self, user: Option<&str>) -> Result<Vec<PreAuthKeyRecord>, ControlError> {
        let only = user
            .map(|u| self.user_by_name(u).map(|u| u.id))
            .transpose()?;
        Ok(self
            .store
            .preauth_keys()?
            .into_iter()
            .filter(|k| only.is_none_or(|u| k.user_id == u))
            .collect())
    }

    /// The owner's name of a pre-auth key.
    pub fn auth_key_user(&self, key: &PreAuthKeyRecord) -> String {
        self.user_name(key.user_id)
    }

    /// Makes a pre-auth key unusable from now on.
    pub fn expire_auth_key(&mut self, prefix: &str, now_ms: i64) -> Result<(), ControlError> {
        let key =
            self.store
                .preauth_key(prefix)?
                .ok_or_else(|| ControlError::KeyPrefixNotFound {
                    prefix: prefix.into(),
                })?;
        self.store.expire_preauth_key(key.id, now_ms)?;
        Ok(())
    }

    /// Makes an API key from 30 random bytes; returns it and its one-time text.
    pub fn create_api_key(
        &mut self,
        expiration: Option<Duration>,
        random: [u8; 30],
        now_ms: i64,
    ) -> Result<(ApiKeyRecord, String), ControlError> {
        let issued = secret::issue(SecretKind::Api, random);
        let mut rec = ApiKeyRecord {
            id: 0,
            prefix: issued.prefix,
            hash: issued.hash,
            expiration_ms: expiration.map(|d| now_ms.saturating_add(ms(d))),
            created_ms: now_ms,
            last_used_ms: None,
        };
        rec.id = self.store.insert_api_key(&rec)?;
        Ok((rec, issued.text))
    }

    /// Every API key.
    pub fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, ControlError> {
        Ok(self.store.api_keys()?)
    }

    /// Makes an API key unusable from now on.
    pub fn expire_api_key(&mut self, prefix: &str, now_ms: i64) -> Result<(), ControlError> {
        let key = self
            .store
            .api_key(prefix)?
            .ok_or_else(|| ControlError::KeyPrefixNotFound {
                prefix: prefix.into(),
            })?;
        self.store.expire_api_key(key.id, now_ms)?;
        Ok(())
    }

    /// Checks a presented API key and records its use.
    pub fn check_api_key(&mut self, text: &str, now_ms: i64) -> Result<(), ControlError> {
        let presented =
            secret::parse(SecretKind::Api, text).map_err(|_| ControlError::ApiKeyInvalid)?;
        let key = self
            .store
            .api_key(&presented.prefix)?
            .ok_or(ControlError::ApiKeyInvalid)?;
        if !secret::same_hash(&key.hash, &presented.hash) {
            return Err(ControlError::ApiKeyInvalid);
        }
        if expired(key.expiration_ms, now_ms) {
            return Err(ControlError::ApiKeyExpired);
        }
        self.store.touch_api_key(key.id, now_ms)?;
        Ok(())
    }

    /// Nodes, of one user or all. A tagged node belongs to no user: a user's list leaves it
    /// out.
    pub fn admin_nodes(&self, user: Option<&str>) -> Result<Vec<Node>, ControlError> {
        let only = user
            .map(|u| self.user_by_name(u).map(|u| u.id))
            .transpose()?;
        Ok(self
            .nodes
            .values()
            .filter(|n| only.is_none_or(|u| n.user_id == u && n.tags.is_empty()))
            .map(|n| self.view(n))
            .collect())
    }

    /// Deletes a node: its peers drop it and its own stream ends.
    pub fn delete_node(&mut self, id: u64) -> Result<usize, ControlError> {
        if !self.nodes.contains_key(&id) {
            return Err(ControlError::NodeNotFound { id });
        }
        let version = self.store.delete_node(id).map_err(|e| store_error(e, id))?;
        Ok(self.commit(Change {
            version,
            node_id: id,
            kind: ChangeKind::Removed,
            record: None,
        }))
    }

    /// Expires a node's key now: its peers drop it and it must register again.
    pub fn expire_node(&mut self, id: u64, now_ms: i64) -> Result<Node, ControlError> {
        let mut n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or(ControlError::NodeNotFound { id })?;
        n.expiry_ms = Some(now_ms);
        self.save(&n, ChangeKind::Removed, false)?;
        self.node(id)
    }

    /// Gives a node a new unique name.
    pub fn rename_node(&mut self, id: u64, name: &str) -> Result<Node, ControlError> {
        if !valid_label(name) {
            return Err(ControlError::InvalidField {
                field: "new_name",
                reason: "lowercase letters, digits, dashes; at most 63",
            });
        }
        let mut n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or(ControlError::NodeNotFound { id })?;
        if self.names.get(name).is_some_and(|other| *other != id) {
            return Err(ControlError::NameTaken { name: name.into() });
        }
        n.given_name = name.to_string();
        let kind = if self.netmap.node(id).is_some() {
            ChangeKind::Record
        } else {
            // Expired: out of the map, and staying out.
            ChangeKind::Removed
        };
        match self.save(&n, kind, false) {
            // Taken through another instance meanwhile.
            Err(ControlError::Store(StoreError::Conflict { what: "node name" })) => {
                Err(ControlError::NameTaken { name: name.into() })
            }
            other => other.map(|_| ()),
        }?;
        self.node(id)
    }

    // --- settings ---

    /// The DNS settings and DERP map nodes get.
    pub fn settings(&self) -> (&DnsConfig, &DerpMap) {
        self.netmap.settings()
    }

    /// Replaces the DNS settings and DERP map (a live config reload): every open map stream
    /// gets the new values as one delta, without ending. Returns the deltas sent (none when
    /// nothing changed).
    pub fn set_settings(&mut self, dns: DnsConfig, derp_map: DerpMap) -> usize {
        self.netmap.set_settings(dns, derp_map)
    }

    // --- policy ---

    /// Replaces the access policy (`None`: none, every node may reach every other). Atomic: a
    /// policy whose `tests` fail against the current nodes changes nothing. Every node that
    /// gains or loses a peer or whose filter changes is told at once; returns the deltas sent.
    pub fn set_policy(
        &mut self,
        policy: Option<Arc<CompiledPolicy>>,
    ) -> Result<usize, PolicyError> {
        if let Some(p) = &policy {
            self.check_policy(p)?;
        }
        let fingerprint = policy_fingerprint(policy.as_deref());
        let mut sent = match self.store.set_policy_fingerprint(fingerprint) {
            Ok(Some(version)) => {
                self.pending_policy = Some(policy);
                self.commit(Change {
                    version,
                    node_id: 0,
                    kind: ChangeKind::Policy,
                    record: None,
                })
            }
            // The same policy (reformatted, or as the log already has it).
            Ok(None) => 0,
            Err(e) => {
                // Enforced all the same, at the current version: resuming nodes may miss
                // that it changed until the next change is logged.
                tracing::error!(error = %e, "cannot record the policy change");
                self.netmap.set_policy(policy)?
            }
        };
        // autoApprovers run again on every policy change (Headscale's ReloadPolicy). A store
        // failure here leaves those approvals for the next change; the policy stands.
        match self.auto_approve_all() {
            Ok(n) => sent += n,
            Err(e) => tracing::error!(error = %e, "cannot store auto-approved routes"),
        }
        Ok(sent)
    }

    /// Runs `policy`'s `tests` against the current nodes, changing nothing (`policy check`).
    pub fn check_policy(&mut self, policy: &CompiledPolicy) -> Result<(), PolicyError> {
        self.netmap.policy().check(policy)
    }

    /// The policy state: who sees whom, filters, `explain`, name lookups.
    pub fn policy_state(&mut self) -> &PolicyState {
        self.netmap.policy()
    }

    /// Whether a policy is configured.
    pub fn policy_configured(&self) -> bool {
        self.netmap.policy_configured()
    }

    /// The policy in force's `tests` run against the current nodes: `Some` with the failures
    /// (for a loud warning at start-up, where the policy is kept: see the README).
    pub fn policy_failures(&mut self) -> Option<PolicyError> {
        let state = self.netmap.policy();
        state.check(state.policy()).err()
    }
}

// --- policy storage and tags, for the Admin API (`policy set`, `nodes tag`, tagged keys) ---

impl Core {
    /// Renews this instance's presence (claiming its streams' nodes again if it had been
    /// declared dead), declares dead instances that stopped renewing theirs, and applies what
    /// that changed.
    pub fn keep_presence(&mut self, now_ms: i64) -> Result<(), ControlError> {
        if !self.store.heartbeat(self.instance, now_ms)? {
            tracing::warn!(
                instance = self.instance,
                "this instance was declared dead; claiming its nodes again"
            );
            for id in self.netmap.subscribed() {
                self.claim_presence(id, now_ms)?;
            }
        }
        let dead = self
            .store
            .reap_instances(now_ms - PRESENCE_TTL_MS, now_ms)?;
        if dead > 0 {
            tracing::info!(instances = dead, "declared silent instances dead");
        }
        self.catch_up()?;
        Ok(())
    }

    /// The policy stored for `policy.mode = "database"`, if any.
    pub fn stored_policy(&self) -> Result<Option<crate::store::StoredPolicy>, ControlError> {
        Ok(self.store.policy()?)
    }

    /// Database mode's `policy set`: `policy` (compiled from `text`) has its tests run against
    /// the current nodes, is stored, then applied (by every instance on the database, from the
    /// change log). A refused policy or a failed write changes nothing, so the stored and the
    /// enforced policy never disagree. Returns the deltas sent.
    pub fn store_policy(
        &mut self,
        text: &str,
        policy: Arc<CompiledPolicy>,
        now_ms: i64,
    ) -> Result<usize, ControlError> {
        self.check_policy(&policy)?;
        let fingerprint = policy_fingerprint(Some(&policy));
        let version = self.store.set_policy(Some(text), fingerprint, now_ms)?;
        self.pending_policy = Some(Some(policy));
        let mut sent = self.commit(Change {
            version,
            node_id: 0,
            kind: ChangeKind::Policy,
            record: None,
        });
        match self.auto_approve_all() {
            Ok(n) => sent += n,
            Err(e) => tracing::error!(error = %e, "cannot store auto-approved routes"),
        }
        Ok(sent)
    }

    /// Checks tags a pre-auth key or a node is to carry: each `tag:<name>`, and owned in the
    /// policy in force (any tag when no policy is configured).
    pub fn check_node_tags(&self, tags: &[String]) -> Result<(), ControlError> {
        check_tags(tags)?;
        // With no policy configured any well-formed tag goes: nothing owns tags yet.
        if self.netmap.policy_configured() {
            self.netmap.compiled_policy().check_tags(tags)?;
        }
        Ok(())
    }

    /// Replaces a node's tags (at least one, each owned in the policy): the node is then owned
    /// by its tags, not by a user, and its peers' maps and filters follow at once.
    pub fn tag_node(&mut self, id: u64, mut tags: Vec<String>) -> Result<Node, ControlError> {
        if tags.is_empty() {
            return Err(ControlError::InvalidField {
                field: "tags",
                reason: "at least one tag is required",
            });
        }
        self.check_node_tags(&tags)?;
        tags.sort();
        tags.dedup();
        let mut n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or(ControlError::NodeNotFound { id })?;
        n.tags = tags;
        // Its new tags may make it an auto-approver of the routes it advertises.
        if let Some(approved) = self.auto_approvals(&n) {
            n.approved_routes = approved;
        }
        let kind = if self.netmap.node(id).is_some() {
            ChangeKind::Record
        } else {
            ChangeKind::Removed
        };
        self.save(&n, kind, false)?;
        self.node(id)
    }
}

// --- subnet routes and exit nodes ---

impl Core {
    /// Keeps `routers` (the election's candidates) in step with a node's record.
    fn track_routes(&mut self, n: &NodeRecord) {
        let serves_subnet = routes::serving(&n.advertised_routes, &n.approved_routes)
            .iter()
            .any(|r| !routes::is_exit(r));
        if serves_subnet {
            self.routers.insert(n.id);
        } else {
            self.routers.remove(&n.id);
        }
    }

    /// Stores a node whose routes changed and tells everyone concerned: its peers (each sees
    /// only the routes its policy allows), itself, and whoever a new primary concerns.
    fn store_routes(&mut self, n: NodeRecord) -> Result<usize, ControlError> {
        // Published at the version stored; the election's republication of it (when it became
        // or stopped being primary) goes out at the same version, and streams coalesce the two.
        let kind = if self.netmap.node(n.id).is_some() {
            ChangeKind::Record
        } else {
            ChangeKind::Removed
        };
        self.save(&n, kind, false)
    }

    /// Re-elects primary routers and republishes every node whose primary prefixes changed;
    /// returns the deltas sent.
    fn elect(&mut self) -> usize {
        let changed = self.run_election();
        self.republish(changed.into_iter())
    }

    fn run_election(&mut self) -> BTreeSet<u64> {
        let mut candidates: BTreeMap<ipnet::IpNet, BTreeSet<u64>> = BTreeMap::new();
        for &id in &self.routers {
            if !self.online.contains(&id) || self.netmap.node(id).is_none() {
                continue;
            }
            let Some(n) = self.nodes.get(&id) else {
                continue;
            };
            for r in routes::serving(&n.advertised_routes, &n.approved_routes) {
                if !routes::is_exit(&r) {
                    candidates.entry(r).or_default().insert(id);
                }
            }
        }
        let changed = self.primaries.elect(&candidates);
        if !changed.is_empty() {
            tracing::info!(nodes = ?changed, "primary routers changed");
        }
        changed
    }

    fn republish(&mut self, ids: impl Iterator<Item = u64>) -> usize {
        let mut sent = 0;
        for id in ids {
            if self.netmap.node(id).is_none() {
                continue;
            }
            if let Some(n) = self.nodes.get(&id).cloned() {
                sent += self.publish(&n).1;
            }
        }
        sent
    }

    /// What `autoApprovers` adds to a node's approved routes (nothing without a policy).
    fn auto_approvals(&self, n: &NodeRecord) -> Option<Vec<ipnet::IpNet>> {
        if n.advertised_routes.is_empty() || !self.netmap.policy_configured() {
            return None;
        }
        let auto = routes::auto_approved(
            self.netmap.compiled_policy(),
            &self.identity(n),
            &n.advertised_routes,
        );
        let mut approved = n.approved_routes.clone();
        approved.extend(auto);
        let approved = routes::with_exit_pair(approved);
        (approved != n.approved_routes).then_some(approved)
    }

    /// Runs `autoApprovers` over every node (after a policy change, at start); approval only
    /// adds. Returns the deltas sent.
    fn auto_approve_all(&mut self) -> Result<usize, ControlError> {
        let due: Vec<(u64, Vec<ipnet::IpNet>)> = self
            .nodes
            .values()
            .filter_map(|n| self.auto_approvals(n).map(|a| (n.id, a)))
            .collect();
        let mut sent = 0;
        for (id, approved) in due {
            if let Some(mut n) = self.nodes.get(&id).cloned() {
                tracing::info!(node = id, routes = ?approved, "routes auto-approved");
                n.approved_routes = approved;
                sent += self.store_routes(n)?;
            }
        }
        Ok(sent)
    }

    /// Replaces the routes a node advertises (its whole list, as `UpdateNode` sends it);
    /// `autoApprovers` then approves what it may. Returns the deltas sent.
    pub fn advertise_routes(
        &mut self,
        id: u64,
        advertised: Vec<ipnet::IpNet>,
    ) -> Result<usize, ControlError> {
        let mut n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or(ControlError::NodeNotFound { id })?;
        if n.advertised_routes == advertised {
            return Ok(0);
        }
        tracing::info!(node = id, routes = ?advertised, "routes advertised");
        n.advertised_routes = advertised;
        if let Some(approved) = self.auto_approvals(&n) {
            tracing::info!(node = id, routes = ?approved, "routes auto-approved");
            n.approved_routes = approved;
        }
        self.store_routes(n)
    }

    /// Sets the routes approved for a node (the whole list; empty clears it). Approving
    /// either exit route approves both. Returns the node as admins see it.
    pub fn approve_routes(
        &mut self,
        id: u64,
        approved: Vec<ipnet::IpNet>,
    ) -> Result<Node, ControlError> {
        let mut n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or(ControlError::NodeNotFound { id })?;
        let approved = routes::with_exit_pair(approved);
        if n.approved_routes != approved {
            tracing::info!(node = id, routes = ?approved, "routes approved");
            n.approved_routes = approved;
            self.store_routes(n)?;
        }
        self.node(id)
    }

    /// The prefix's primary router, if an online node serves it.
    pub fn primary_of(&self, prefix: &ipnet::IpNet) -> Option<u64> {
        self.primaries.get(prefix)
    }
}
