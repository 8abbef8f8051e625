//! The relay's sans-IO core: which connection serves which node key, who sent to whom (for
//! `PeerGone`), the `PeerGone(not here)` budget, and the region mesh: which mesh peers watch
//! this server's clients, and which keys are connected to another server of the region (and
//! through which mesh link packets for them go). No sockets, no clock (time is a
//! parameter), ordered maps only, so it replays the same way every time.
//!
//! The shell ([`super::Relay`]) holds one `Registry` behind a mutex and calls it for every
//! state change; `H` is whatever the shell needs to reach a connection (its send queue).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use warren_proto::NodePublicKey;

/// A connection's number, unique for the life of the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// `PeerGone(not here)` answers per client: a burst of 3, then one per second (Tailscale's
/// `peerGoneLim`).
const NOT_HERE_BURST: u32 = 3;
const NOT_HERE_EVERY: Duration = Duration::from_secs(1);

/// A token bucket for `PeerGone(not here)` answers.
#[derive(Debug, Clone)]
struct NotHereBudget {
    tokens: u32,
    last_refill: Option<Instant>,
}

impl NotHereBudget {
    fn new() -> Self {
        Self {
            tokens: NOT_HERE_BURST,
            last_refill: None,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        match self.last_refill {
            None => self.last_refill = Some(now),
            Some(last) => {
                let elapsed = now.saturating_duration_since(last);
                let gained = elapsed.as_nanos() / NOT_HERE_EVERY.as_nanos();
                if gained > 0 {
                    let gained = u32::try_from(gained).unwrap_or(u32::MAX);
                    self.tokens = self.tokens.saturating_add(gained).min(NOT_HERE_BURST);
                    self.last_refill = Some(now);
                }
            }
        }
        if self.tokens > 0 {
            self.tokens -= 1;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct Entry<H> {
    conn: ConnId,
    handle: H,
    preferred: bool,
    mesh_peer: bool,
    not_here: NotHereBudget,
}

/// Where a `SendPacket` goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<H> {
    /// Queue it to this connection.
    Deliver(H),
    /// The key is connected to another server of the region: send a `ForwardPacket` over
    /// this mesh link.
    Forward(MeshLinkId),
    /// Nobody with that key is connected: drop the packet (and count it). `answer` is the
    /// sender's connection when it is to be told `PeerGone(not here)`: only for disco packets,
    /// and rate-limited, as Tailscale does.
    NotHere {
        /// Where to send `PeerGone(not here)`, if anywhere.
        answer: Option<H>,
    },
}

/// A link from this server to another server of the region (this server is its client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MeshLinkId(pub u64);

/// What [`Registry::register`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered<H> {
    /// The new connection's id.
    pub conn: ConnId,
    /// The connection it replaced (the same key was connected): close it.
    pub replaced: Option<(ConnId, H)>,
    /// Mesh peers watching connections: tell them `PeerPresent` (empty for a mesh peer).
    pub present_to: Vec<H>,
}

/// The registry of connected clients.
#[derive(Debug)]
pub struct Registry<H> {
    next_conn: u64,
    clients: BTreeMap<NodePublicKey, Entry<H>>,
    /// src -> the destinations src sent packets to while connected.
    sent_to: BTreeMap<NodePublicKey, BTreeSet<NodePublicKey>>,
    /// dst -> the sources that sent to dst (the reverse of `sent_to`, to clean it up).
    recv_from: BTreeMap<NodePublicKey, BTreeSet<NodePublicKey>>,
    /// Connected mesh peers that asked to watch connections.
    watchers: BTreeSet<NodePublicKey>,
    /// Keys connected to other servers of the region, with the mesh links that announced them
    /// (a key can be connected to two servers at once while it moves).
    remote: BTreeMap<NodePublicKey, BTreeSet<MeshLinkId>>,
}

impl<H> Default for Registry<H> {
    fn default() -> Self {
        Self {
            next_conn: 1,
            clients: BTreeMap::new(),
            sent_to: BTreeMap::new(),
            recv_from: BTreeMap::new(),
            watchers: BTreeSet::new(),
            remote: BTreeMap::new(),
        }
    }
}

impl<H: Clone> Registry<H> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Call after a client finished its handshake (and passed verification). The newest
    /// connection for a key wins: an older one is returned in `replaced` for the shell to close.
    pub fn register(&mut self, key: NodePublicKey, handle: H, mesh_peer: bool) -> Registered<H> {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let entry = Entry {
            conn,
            handle,
            preferred: false,
            mesh_peer,
            not_here: NotHereBudget::new(),
        };
        let replaced = self.clients.insert(key, entry).map(|old| {
            // A replaced watcher must ask again on its new connection.
            self.watchers.remove(&key);
            (old.conn, old.handle)
        });
        let present_to = if mesh_peer {
            Vec::new()
        } else {
            self.watcher_handles(&key)
        };
        Registered {
            conn,
            replaced,
            present_to,
        }
    }

    fn watcher_handles(&self, except: &NodePublicKey) -> Vec<H> {
        self.watchers
            .iter()
            .filter(|w| *w != except)
            .filter_map(|w| self.clients.get(w).map(|e| e.handle.clone()))
            .collect()
    }

    /// A connected mesh peer asks to watch connections. Returns the keys connected now (mesh
    /// peers left out), to announce with `PeerPresent`; later arrivals and departures come
    /// through [`Registered::present_to`] and [`Self::unregister`]. `None` when `key` is not a
    /// connected mesh peer.
    pub fn watch(&mut self, key: &NodePublicKey) -> Option<Vec<NodePublicKey>> {
        if !self.is_mesh_peer(key) {
            return None;
        }
        self.watchers.insert(*key);
        Some(
            self.clients
                .iter()
                .filter(|(k, e)| *k != key && !e.mesh_peer)
                .map(|(k, _)| *k)
                .collect(),
        )
    }

    /// Another server of the region says `key` is connected to it (through `link`).
    pub fn add_remote(&mut self, key: NodePublicKey, link: MeshLinkId) {
        self.remote.entry(key).or_default().insert(link);
    }

    /// Another server says `key` left it (other servers may still have it).
    pub fn remove_remote(&mut self, key: &NodePublicKey, link: MeshLinkId) {
        if let Some(links) = self.remote.get_mut(key) {
            links.remove(&link);
            if links.is_empty() {
                self.remote.remove(key);
            }
        }
    }

    /// A mesh link went down: forget every key it announced.
    pub fn drop_link(&mut self, link: MeshLinkId) {
        self.remote.retain(|_, links| {
            links.remove(&link);
            !links.is_empty()
        });
    }

    /// How many keys are known to be connected to other servers of the region.
    pub fn remote_len(&self) -> usize {
        self.remote.len()
    }

    /// Call when connection `conn` of `key` ended. When `conn` is still the key's active
    /// connection, the key leaves and the result lists the connections to tell
    /// `PeerGone(disconnected)`: every still-connected peer this key sent packets to, and the
    /// mesh peers watching connections. A connection that was already replaced leaves nothing
    /// behind and notifies nobody.
    pub fn unregister(&mut self, key: &NodePublicKey, conn: ConnId) -> Vec<H> {
        let mesh_peer = match self.clients.get(key) {
            Some(entry) if entry.conn == conn => entry.mesh_peer,
            _ => return Vec::new(),
        };
        self.clients.remove(key);
        self.watchers.remove(key);
        let mut notify = if mesh_peer {
            Vec::new()
        } else {
            self.watcher_handles(key)
        };
        for dst in self.sent_to.remove(key).unwrap_or_default() {
            if let Some(srcs) = self.recv_from.get_mut(&dst) {
                srcs.remove(key);
                if srcs.is_empty() {
                    self.recv_from.remove(&dst);
                }
            }
            if let Some(entry) = self.clients.get(&dst) {
                notify.push(entry.handle.clone());
            }
        }
        for src in self.recv_from.remove(key).unwrap_or_default() {
            if let Some(dsts) = self.sent_to.get_mut(&src) {
                dsts.remove(key);
                if dsts.is_empty() {
                    self.sent_to.remove(&src);
                }
            }
        }
        notify
    }

    /// Routes a packet from `src` to `dst`. `disco` says whether the payload is a disco packet;
    /// `now` feeds the `PeerGone(not here)` rate limit. `via_mesh` is set for packets another
    /// server forwarded: those are delivered here or dropped, never forwarded again (so two
    /// servers with stale views cannot bounce a packet between them).
    pub fn route(
        &mut self,
        src: &NodePublicKey,
        dst: &NodePublicKey,
        disco: bool,
        via_mesh: bool,
        now: Instant,
    ) -> Route<H> {
        if let Some(entry) = self.clients.get(dst) {
            let handle = entry.handle.clone();
            if self.clients.contains_key(src) && src != dst {
                self.sent_to.entry(*src).or_default().insert(*dst);
                self.recv_from.entry(*dst).or_default().insert(*src);
            }
            return Route::Deliver(handle);
        }
        if !via_mesh && let Some(link) = self.remote.get(dst).and_then(|l| l.first()) {
            return Route::Forward(*link);
        }
        let answer = self
            .clients
            .get_mut(src)
            .filter(|_| disco)
            .and_then(|entry| entry.not_here.take(now).then(|| entry.handle.clone()));
        Route::NotHere { answer }
    }

    /// Records a client's `NotePreferred`. Returns false when `conn` is no longer the key's
    /// active connection.
    pub fn note_preferred(&mut self, key: &NodePublicKey, conn: ConnId, preferred: bool) -> bool {
        match self.clients.get_mut(key) {
            Some(entry) if entry.conn == conn => {
                entry.preferred = preferred;
                true
            }
            _ => false,
        }
    }

    /// Whether `key` said this server is its home.
    pub fn is_preferred(&self, key: &NodePublicKey) -> bool {
        self.clients.get(key).is_some_and(|e| e.preferred)
    }

    /// Whether `key` is connected as a mesh peer.
    pub fn is_mesh_peer(&self, key: &NodePublicKey) -> bool {
        self.clients.get(key).is_some_and(|e| e.mesh_peer)
    }

    /// The active connection for `key`.
    pub fn get(&self, key: &NodePublicKey) -> Option<(ConnId, &H)> {
        self.clients.get(key).map(|e| (e.conn, &e.handle))
    }

    /// Every connected client's handle, in key order (for queue gauges).
    pub fn handles(&self) -> impl Iterator<Item = &H> {
        self.clients.values().map(|e| &e.handle)
    }

    /// How many keys are connected.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether nobody is connected.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// How many keys have connected preferring this server as home.
    pub fn preferred_count(&self) -> usize {
        self.clients.values().filter(|e| e.preferred).count()
    }

    /// The number of (src, dst) pairs remembered for `PeerGone`; bounded by connected pairs.
    pub fn sent_to_pairs(&self) -> usize {
        self.sent_to.values().map(BTreeSet::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> NodePublicKey {
        NodePublicKey::from_bytes([b; 32])
    }

    #[test]
    fn newest_connection_wins_and_old_one_leaves_quietly() {
        let mut r = Registry::new();
        let first = r.register(k(1), "a1", false);
        assert_eq!(first.replaced, None);
        let second = r.register(k(1), "a2", false);
        assert_eq!(second.replaced, Some((first.conn, "a1")));
        assert_eq!(r.get(&k(1)), Some((second.conn, &"a2")));
        r.register(k(2), "b", false);
        assert_eq!(
            r.route(&k(2), &k(1), false, false, Instant::now()),
            Route::Deliver("a2")
        );
        // The replaced connection ending does not remove the key nor notify anybody.
        r.register(k(3), "c", false);
        r.route(&k(1), &k(3), false, false, Instant::now());
        assert!(r.unregister(&k(1), first.conn).is_empty());
        assert_eq!(r.get(&k(1)).map(|(c, _)| c), Some(second.conn));
        // The active one ending notifies the peers it sent to.
        assert_eq!(r.unregister(&k(1), second.conn), vec!["c"]);
        assert_eq!(r.get(&k(1)), None);
    }

    #[test]
    fn peer_gone_goes_to_those_the_leaver_sent_to() {
        let mut r = Registry::new();
        let a = r.register(k(1), "a", false).conn;
        let b = r.register(k(2), "b", false).conn;
        r.register(k(3), "c", false);
        let now = Instant::now();
        assert_eq!(
            r.route(&k(1), &k(2), false, false, now),
            Route::Deliver("b")
        );
        assert_eq!(r.route(&k(1), &k(3), true, false, now), Route::Deliver("c"));
        assert_eq!(
            r.route(&k(2), &k(1), false, false, now),
            Route::Deliver("a")
        );
        assert_eq!(r.sent_to_pairs(), 3);
        // b leaves: only a (whom b sent to) hears; c never got anything from b.
        assert_eq!(r.unregister(&k(2), b), vec!["a"]);
        assert_eq!(r.sent_to_pairs(), 1);
        // a leaves: c hears; b is gone already.
        assert_eq!(r.unregister(&k(1), a), vec!["c"]);
        assert_eq!(r.sent_to_pairs(), 0);
    }

    #[test]
    fn not_here_answers_only_disco_and_is_rate_limited() {
        let mut r: Registry<&str> = Registry::new();
        r.register(k(1), "a", false);
        let t0 = Instant::now();
        assert_eq!(
            r.route(&k(1), &k(9), false, false, t0),
            Route::NotHere { answer: None }
        );
        for _ in 0..3 {
            assert_eq!(
                r.route(&k(1), &k(9), true, false, t0),
                Route::NotHere { answer: Some("a") }
            );
        }
        assert_eq!(
            r.route(&k(1), &k(9), true, false, t0),
            Route::NotHere { answer: None }
        );
        let t1 = t0 + Duration::from_millis(1500);
        assert_eq!(
            r.route(&k(1), &k(9), true, false, t1),
            Route::NotHere { answer: Some("a") }
        );
        assert_eq!(
            r.route(&k(1), &k(9), true, false, t1),
            Route::NotHere { answer: None }
        );
        assert_eq!(r.sent_to_pairs(), 0);
    }

    #[test]
    fn note_preferred_is_recorded_for_the_active_connection_only() {
        let mut r = Registry::new();
        let old = r.register(k(1), 1, false).conn;
        let new = r.register(k(1), 2, true).conn;
        assert!(!r.note_preferred(&k(1), old, true));
        assert!(!r.is_preferred(&k(1)));
        assert!(r.note_preferred(&k(1), new, true));
        assert!(r.is_preferred(&k(1)));
        assert!(r.is_mesh_peer(&k(1)));
        assert_eq!(r.preferred_count(), 1);
    }

    #[test]
    fn watchers_hear_of_arrivals_and_departures_but_not_of_mesh_peers() {
        let mut r = Registry::new();
        r.register(k(1), "a", false);
        assert_eq!(r.watch(&k(1)), None, "only mesh peers may watch");
        r.register(k(8), "mesh", true);
        assert_eq!(r.watch(&k(8)), Some(vec![k(1)]));
        assert_eq!(r.register(k(2), "b", false).present_to, vec!["mesh"]);
        assert!(r.register(k(9), "mesh2", true).present_to.is_empty());
        let b = r.get(&k(2)).map(|(c, _)| c).expect("b");
        assert_eq!(r.unregister(&k(2), b), vec!["mesh"]);
        let m = r.get(&k(8)).map(|(c, _)| c).expect("mesh");
        r.unregister(&k(8), m);
        assert!(r.register(k(3), "c", false).present_to.is_empty());
    }

    #[test]
    fn remote_keys_are_forwarded_once_and_forgotten_with_their_link() {
        let now = Instant::now();
        let (l1, l2) = (MeshLinkId(1), MeshLinkId(2));
        let mut r = Registry::new();
        r.register(k(1), "a", false);
        r.add_remote(k(2), l1);
        assert_eq!(r.route(&k(1), &k(2), false, false, now), Route::Forward(l1));
        // A forwarded packet is never forwarded again.
        assert!(matches!(
            r.route(&k(1), &k(2), false, true, now),
            Route::NotHere { .. }
        ));
        // A local connection wins over a remote announcement.
        r.register(k(2), "b", false);
        assert_eq!(
            r.route(&k(1), &k(2), false, false, now),
            Route::Deliver("b")
        );
        // A "gone" from one link leaves the key reachable through another that has it.
        r.add_remote(k(3), l2);
        r.remove_remote(&k(3), l1);
        assert_eq!(r.route(&k(1), &k(3), false, false, now), Route::Forward(l2));
        r.add_remote(k(4), l1);
        r.add_remote(k(4), l2);
        r.remove_remote(&k(4), l1);
        assert_eq!(r.route(&k(1), &k(4), false, false, now), Route::Forward(l2));
        r.remove_remote(&k(4), l2);
        r.drop_link(l2);
        assert_eq!(r.remote_len(), 1);
        r.remove_remote(&k(2), l1);
        assert_eq!(r.remote_len(), 0);
    }
}
