//! The server's state and rules, without gRPC or a clock: registration, authentication, the
//! admin operations, and keeping store, address allocator and live netmap in step. Every method
//! takes the current time, so tests and benchmarks drive it directly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use warren_proto::control::{DerpMap, DnsConfig, Node};
use warren_proto::{DiscoPublicKey, NodePublicKey};

use crate::error::ControlError;
use crate::ipam::Ipam;
use crate::netmap::{FullMapSource, MAX_REMOVED, Netmap, Restored, Subscription};
use crate::policy::{CompiledPolicy, NodeOwner, PolicyError, PolicyNode, PolicyState, PolicyUser};
use crate::routes::{self, Primaries};
use crate::secret::{self, SecretKind};
use crate::store::{ApiKeyRecord, MapKey, NodeRecord, PreAuthKeyRecord, Store, UserRecord};

/// Default lifetime of a pre-auth key (Headscale's).
pub const DEFAULT_AUTH_KEY_LIFETIME: Duration = Duration::from_secs(3600);
/// The user a tagged node is shown under (Tailscale's and Headscale's name): it is owned by
/// its tags, not by the user whose key registered it.
pub const TAGGED_DEVICES: &str = "tagged-devices";
/// Longest hostname accepted.
pub const MAX_HOSTNAME: usize = 255;
/// Most endpoints a node may report.
pub const MAX_ENDPOINTS: usize = 64;
/// Map versions a process leases from the database at a time: versions it hands out stay
/// below the lease, so a restarted server never reuses one.
const LEASE_SPAN: u64 = 1 << 24;

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
    store: Box<dyn Store>,
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
    /// Map versions are handed out below this (leased in the database).
    lease: u64,
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
    /// Loads everything from `store`.
    pub fn open(
        store: Box<dyn Store>,
        settings: &Settings,
        now_ms: i64,
    ) -> Result<Self, ControlError> {
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
            store,
            primaries: Primaries::default(),
            routers: BTreeSet::new(),
            lease: 0,
        };
        // Versions go on from the lease of the last run, which no version reached.
        let state = core.store.map_state()?;
        let boot = state.lease;
        core.lease = boot.saturating_add(LEASE_SPAN);
        core.store.set_map_value(MapKey::Lease, core.lease)?;
        let fingerprint = policy_fingerprint(settings.policy.as_deref());
        let mut policy_version = state.policy_version;
        if fingerprint != state.policy_fingerprint {
            // Another policy than the versions were counted under: nobody resumes across it.
            policy_version = boot;
            core.store
                .set_map_value(MapKey::PolicyFingerprint, fingerprint)?;
            core.store.set_map_value(MapKey::PolicyVersion, boot)?;
        }
        core.netmap.restore(&Restored {
            map_id: state.map_id,
            boot,
            floor: state.floor,
            policy_version,
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
        // Routes advertised while the server was down may be approvable under this policy.
        core.auto_approve_all()?;
        Ok(core)
    }

    /// How many nodes are online, offline and expired at `now_ms` (for metrics).
    pub fn node_states(&self, now_ms: i64) -> crate::metrics::NodeStates {
        let mut states = crate::metrics::NodeStates::default();
        for n in self.nodes.values() {
            if expired(n.expiry_ms, now_ms) {
                states.expired += 1;
            } else if self.netmap.is_subscribed(n.id) {
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
            online: self.netmap.is_subscribed(n.id),
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

    /// Stores a node's record with the map version its publication will get (the next one):
    /// call [`Self::publish`] right after, with no other change in between.
    fn save(&mut self, n: &mut NodeRecord) -> Result<(), ControlError> {
        n.version = self.netmap.version() + 1;
        self.store.update_node(n)?;
        Ok(())
    }

    /// Leases more map versions when the netmap nears the end of its lease.
    fn keep_lease(&mut self) {
        if self.netmap.version().saturating_add(LEASE_SPAN / 4) < self.lease {
            return;
        }
        let lease = self.lease.saturating_add(LEASE_SPAN);
        match self.store.set_map_value(MapKey::Lease, lease) {
            Ok(()) => self.lease = lease,
            Err(e) => tracing::error!(error = %e, "cannot lease map versions"),
        }
    }

    /// Records a node's removal from the map so resuming nodes learn of it.
    fn store_removal(&mut self, id: u64) {
        if let Some(v) = self.netmap.removed_at(id)
            && let Err(e) = self.store.add_removed(id, v, MAX_REMOVED)
        {
            tracing::error!(node = id, error = %e, "cannot record the removal");
        }
    }

    /// Puts a node's current record into the live netmap (with its policy identity).
    fn publish(&mut self, n: &NodeRecord) -> (Node, usize) {
        let view = self.view(n);
        let identity = self.identity(n);
        let sent = self.netmap.upsert(view.clone(), identity);
        (view, sent)
    }

    fn unique_name(&self, wanted: &str, except: Option<u64>) -> String {
        let base = dns_label(wanted);
        let free = |n: &str| self.names.get(n).is_none_or(|id| Some(*id) == except);
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
            }
            n.disco_key = disco_key;
            n.hostname = hostname.to_string();
            self.save(&mut n)?;
            self.nodes.insert(id, n.clone());
            return Ok(self.publish(&n).0);
        }
        let key = self.check_auth_key(auth_key, now_ms)?;
        let (ipv4, ipv6) = self.ipam.allocate()?;
        let mut n = NodeRecord {
            id: 0,
            node_key,
            disco_key,
            hostname: hostname.to_string(),
            given_name: self.unique_name(hostname, None),
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
            version: self.netmap.version() + 1,
        };
        n.id = match self.store.register_node(&n) {
            Ok(id) => id,
            Err(e) => {
                self.ipam.release(ipv4);
                return Err(e.into());
            }
        };
        tracing::info!(node = n.id, name = %n.given_name, key = %node_key.short(), %ipv4, "node registered");
        self.by_key.insert(node_key, n.id);
        self.names.insert(n.given_name.clone(), n.id);
        let (view, _) = self.publish(&n);
        self.nodes.insert(n.id, n);
        Ok(view)
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
        self.save(&mut n)?;
        let strings: Vec<String> = n.endpoints.iter().map(|e| e.to_string()).collect();
        let sent = if record_changed {
            self.publish(&n).1
        } else {
            self.netmap.set_endpoints(id, strings)
        };
        self.nodes.insert(id, n);
        Ok(sent)
    }

    /// Opens a map stream for `id` and marks it online. With `resume` (map id, version the
    /// node applied) the stream starts with the changes since, when the netmap still has them.
    pub fn subscribe(
        &mut self,
        id: u64,
        now_ms: i64,
        resume: Option<(u64, u64)>,
    ) -> Result<Subscription, ControlError> {
        self.keep_lease();
        self.netmap.set_online(id, true, now_ms);
        let sub = self
            .netmap
            .subscribe(id, resume)
            .ok_or(ControlError::NodeNotFound { id })?;
        // A router coming online may be the only one of a prefix: it becomes primary (a
        // self_changed follows its full map).
        if self.routers.contains(&id) {
            self.elect();
        }
        Ok(sub)
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
        self.netmap.set_online(id, false, now_ms);
        if self.routers.contains(&id) {
            // Its prefixes fail over to the lowest-id online router serving them.
            self.elect();
        }
        let n = self.nodes.get_mut(&id)?;
        n.last_seen_ms = Some(now_ms);
        let n = n.clone();
        if let Err(e) = self.store.update_node(&n) {
            tracing::warn!(node = id, error = %e, "could not record last seen");
        }
        Some(n.ephemeral)
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
            .filter(|n| n.ephemeral && !self.netmap.is_subscribed(n.id))
            .filter(|n| now_ms.saturating_sub(n.last_seen_ms.unwrap_or(n.created_ms)) > timeout_ms)
            .map(|n| n.id)
            .collect();
        for id in &due {
            tracing::info!(node = id, "ephemeral node inactive; deleting");
            self.delete_node(*id)?;
        }
        Ok(due)
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
        let u = self.store.create_user(name, now_ms)?;
        self.users.insert(u.id, u.clone());
        Ok(u)
    }

    /// Every user.
    pub fn users(&self) -> Vec<UserRecord> {
        self.users.values().cloned().collect()
    }

    /// Removes a user that has no nodes.
    pub fn delete_user(&mut self, name: &str) -> Result<(), ControlError> {
        let id = self.user_by_name(name)?.id;
        let count = self.nodes.values().filter(|n| n.user_id == id).count();
        if count > 0 {
            return Err(ControlError::UserHasNodes {
                name: name.into(),
                count,
            });
        }
        self.store.delete_user(id)?;
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
        let user_id = self.user_by_name(&new.user)?.id;
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
        let n = self
            .nodes
            .get(&id)
            .ok_or(ControlError::NodeNotFound { id })?;
        self.store.delete_node(id)?;
        let n = n.clone();
        self.nodes.remove(&id);
        self.by_key.remove(&n.node_key);
        self.names.remove(&n.given_name);
        self.ipam.release(n.ipv4);
        tracing::info!(node = id, name = %n.given_name, "node deleted");
        let mut sent = self.netmap.remove(id);
        self.store_removal(id);
        if self.routers.remove(&id) {
            sent += self.elect();
        }
        Ok(sent)
    }

    /// Expires a node's key now: its peers drop it and it must register again.
    pub fn expire_node(&mut self, id: u64, now_ms: i64) -> Result<Node, ControlError> {
        let mut n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or(ControlError::NodeNotFound { id })?;
        n.expiry_ms = Some(now_ms);
        self.save(&mut n)?;
        let view = self.view(&n);
        self.nodes.insert(id, n);
        self.netmap.remove(id);
        self.store_removal(id);
        if self.routers.contains(&id) {
            self.elect();
        }
        Ok(view)
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
        let old = std::mem::replace(&mut n.given_name, name.to_string());
        self.save(&mut n)?;
        self.names.remove(&old);
        self.names.insert(n.given_name.clone(), id);
        let view = if self.netmap.node(id).is_some() {
            self.publish(&n).0
        } else {
            self.view(&n)
        };
        self.nodes.insert(id, n);
        Ok(view)
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
        let fingerprint = policy_fingerprint(policy.as_deref());
        let mut sent = self.netmap.set_policy(policy)?;
        let v = self.netmap.policy_version();
        for (key, value) in [
            (MapKey::PolicyFingerprint, fingerprint),
            (MapKey::PolicyVersion, v),
        ] {
            if let Err(e) = self.store.set_map_value(key, value) {
                tracing::error!(error = %e, "cannot record the policy's map version");
            }
        }
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
    /// The policy stored for `policy.mode = "database"`, if any.
    pub fn stored_policy(&self) -> Result<Option<crate::store::StoredPolicy>, ControlError> {
        Ok(self.store.policy()?)
    }

    /// Database mode's `policy set`: `policy` (compiled from `text`) has its tests run against
    /// the current nodes, is stored, then applied. A refused policy or a failed write changes
    /// nothing, so the stored and the enforced policy never disagree. Returns the deltas sent.
    pub fn store_policy(
        &mut self,
        text: &str,
        policy: Arc<CompiledPolicy>,
        now_ms: i64,
    ) -> Result<usize, ControlError> {
        self.check_policy(&policy)?;
        let previous = self.store.policy()?;
        self.store.set_policy(Some(text), now_ms)?;
        match self.set_policy(Some(policy)) {
            Ok(sent) => Ok(sent),
            Err(e) => {
                // Not expected: the same tests passed against the same nodes just above. The
                // stored copy goes back all the same.
                let (text, at) = match &previous {
                    Some(p) => (Some(p.text.as_str()), p.updated_ms),
                    None => (None, now_ms),
                };
                if let Err(undo) = self.store.set_policy(text, at) {
                    tracing::error!(error = %undo, "cannot restore the stored policy");
                }
                Err(e.into())
            }
        }
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
        self.save(&mut n)?;
        let view = if self.netmap.node(id).is_some() {
            self.publish(&n).0
        } else {
            self.view(&n)
        };
        // Its new tags may make it an auto-approver of the routes it advertises.
        if let Some(approved) = self.auto_approvals(&n) {
            n.approved_routes = approved;
            self.nodes.insert(id, n.clone());
            self.store_routes(n)?;
            return self.node(id);
        }
        self.nodes.insert(id, n);
        Ok(view)
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
    fn store_routes(&mut self, mut n: NodeRecord) -> Result<usize, ControlError> {
        self.save(&mut n)?;
        self.track_routes(&n);
        let id = n.id;
        let live = self.netmap.node(id).is_some();
        self.nodes.insert(id, n.clone());
        // Published first, at the version just stored; the election's republication of it
        // (when it became or stopped being primary) follows, and streams coalesce the two.
        let mut sent = if live { self.publish(&n).1 } else { 0 };
        sent += self.elect();
        Ok(sent)
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
            if !self.netmap.is_subscribed(id) || self.netmap.node(id).is_none() {
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
