//! The live netmap: every node as its peers see it, and the open map streams. A change is turned
//! into one delta, built once and shared by reference with each subscriber that can see the
//! node, so a join, move or leave costs work in proportion to the peers it affects, never a
//! rebuild of every node's map. A subscriber that cannot keep up is marked lagging and gets no
//! more deltas; its stream then replaces the backlog with a fresh full map ([`Netmap::resync`]),
//! so its memory stays bounded, nobody else waits for it, and it does not have to reconnect.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;
use warren_proto::control::{
    DerpMap, DnsConfig, FullMap, Node, PeerEndpoints, PeerOnline, PeerRemoved, map_response::Kind,
};

/// One change, shared by every stream that receives it.
pub type Delta = Arc<Kind>;

/// How many deltas a stream may have queued before it counts as lagging.
pub const STREAM_QUEUE: usize = 256;

#[derive(Debug)]
struct Subscriber {
    stream: u64,
    tx: mpsc::Sender<Delta>,
    lagging: Arc<AtomicBool>,
}

/// What a new subscription gets.
#[derive(Debug)]
pub struct Subscription {
    /// Identifies this stream among the node's successive ones.
    pub stream: u64,
    /// The map at the moment of subscribing; deltas follow from exactly there.
    pub full: FullMap,
    /// The deltas.
    pub deltas: mpsc::Receiver<Delta>,
    /// Set when deltas were skipped because the queue was full: call [`Netmap::resync`].
    pub lagging: Arc<AtomicBool>,
}

/// Every visible node and every open stream.
#[derive(Debug, Default)]
pub struct Netmap {
    nodes: BTreeMap<u64, Arc<Node>>,
    subscribers: BTreeMap<u64, Subscriber>,
    next_stream: u64,
    dns: DnsConfig,
    derp_map: DerpMap,
    lagged: u64,
}

impl Netmap {
    /// An empty netmap with these DNS and DERP settings.
    pub fn new(dns: DnsConfig, derp_map: DerpMap) -> Self {
        Self {
            dns,
            derp_map,
            ..Self::default()
        }
    }

    /// Number of nodes in the map.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the map has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Number of streams dropped because they could not keep up.
    pub fn lagged(&self) -> u64 {
        self.lagged
    }

    /// The node with this id, as peers see it.
    pub fn node(&self, id: u64) -> Option<&Arc<Node>> {
        self.nodes.get(&id)
    }

    /// Whether `viewer` may see `node`. Every node sees every other one until ACL policy arrives;
    /// this is the single place that decision lives.
    fn visible(&self, _viewer: u64, _node: u64) -> bool {
        true
    }

    /// The full map for `id`: itself and every peer it can see.
    pub fn full_map(&self, id: u64) -> Option<FullMap> {
        let me = self.nodes.get(&id)?;
        let peers = self
            .nodes
            .iter()
            .filter(|(other, _)| **other != id && self.visible(id, **other))
            .map(|(_, n)| Node::clone(n))
            .collect();
        Some(FullMap {
            self_node: Some(Node::clone(me)),
            peers,
            dns: Some(self.dns.clone()),
            derp_map: Some(self.derp_map.clone()),
            filter: None,
        })
    }

    /// Opens a stream for `id`, replacing (and so closing) any earlier one of that node.
    pub fn subscribe(&mut self, id: u64) -> Option<Subscription> {
        let full = self.full_map(id)?;
        let (tx, deltas) = mpsc::channel(STREAM_QUEUE);
        self.next_stream += 1;
        let stream = self.next_stream;
        let lagging = Arc::new(AtomicBool::new(false));
        let sub = Subscriber {
            stream,
            tx,
            lagging: Arc::clone(&lagging),
        };
        self.subscribers.insert(id, sub);
        Some(Subscription {
            stream,
            full,
            deltas,
            lagging,
        })
    }

    /// Replaces a lagging stream's backlog with a fresh full map and a new, empty queue.
    /// `None` when `stream` is no longer the node's stream.
    pub fn resync(&mut self, id: u64, stream: u64) -> Option<(FullMap, mpsc::Receiver<Delta>)> {
        if self.subscribers.get(&id).is_none_or(|s| s.stream != stream) {
            return None;
        }
        let full = self.full_map(id)?;
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        let sub = self.subscribers.get_mut(&id)?;
        sub.tx = tx;
        sub.lagging.store(false, Ordering::Release);
        Some((full, rx))
    }

    /// Closes stream `stream` of `id`; false when a newer stream had already replaced it.
    pub fn unsubscribe(&mut self, id: u64, stream: u64) -> bool {
        if self
            .subscribers
            .get(&id)
            .is_some_and(|s| s.stream == stream)
        {
            self.subscribers.remove(&id);
            return true;
        }
        false
    }

    /// Whether `id` has an open stream.
    pub fn is_subscribed(&self, id: u64) -> bool {
        self.subscribers.contains_key(&id)
    }

    /// Adds or replaces a node; tells every subscriber that can see it. Returns deltas sent.
    pub fn upsert(&mut self, node: Node) -> usize {
        let id = node.id;
        let node = Arc::new(node);
        let existed = self.nodes.insert(id, Arc::clone(&node)).is_some();
        let delta = Arc::new(if existed {
            Kind::PeerChanged(Node::clone(&node))
        } else {
            Kind::PeerAdded(Node::clone(&node))
        });
        let mut sent = self.fanout(id, &delta);
        if existed && self.send(id, Arc::new(Kind::SelfChanged(Node::clone(&node)))) {
            sent += 1;
        }
        sent
    }

    /// Removes a node and closes its stream; tells every subscriber that could see it.
    pub fn remove(&mut self, id: u64) -> usize {
        if self.nodes.remove(&id).is_none() {
            return 0;
        }
        self.subscribers.remove(&id);
        let delta = Arc::new(Kind::PeerRemoved(PeerRemoved { id }));
        self.fanout(id, &delta)
    }

    /// Replaces a node's endpoints; tells every subscriber that can see it.
    pub fn set_endpoints(&mut self, id: u64, endpoints: Vec<String>) -> usize {
        let Some(node) = self.nodes.get_mut(&id) else {
            return 0;
        };
        Arc::make_mut(node).endpoints = endpoints.clone();
        let delta = Arc::new(Kind::PeerEndpoints(PeerEndpoints { id, endpoints }));
        self.fanout(id, &delta)
    }

    /// Marks a node online or offline; tells every subscriber that can see it.
    pub fn set_online(&mut self, id: u64, online: bool, last_seen_unix_ms: i64) -> usize {
        let Some(node) = self.nodes.get_mut(&id) else {
            return 0;
        };
        let n = Arc::make_mut(node);
        if n.online == online {
            return 0;
        }
        n.online = online;
        n.last_seen_unix_ms = last_seen_unix_ms;
        let delta = Arc::new(Kind::PeerOnline(PeerOnline {
            id,
            online,
            last_seen_unix_ms,
        }));
        self.fanout(id, &delta)
    }

    fn fanout(&mut self, about: u64, delta: &Delta) -> usize {
        let targets: Vec<u64> = self
            .subscribers
            .keys()
            .copied()
            .filter(|viewer| *viewer != about && self.visible(*viewer, about))
            .collect();
        targets
            .into_iter()
            .filter(|t| self.send(*t, Arc::clone(delta)))
            .count()
    }

    fn send(&mut self, to: u64, delta: Delta) -> bool {
        let Some(sub) = self.subscribers.get(&to) else {
            return false;
        };
        if sub.lagging.load(Ordering::Acquire) {
            return false;
        }
        match sub.tx.try_send(delta) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(node = to, "map stream lagging; it gets a fresh full map");
                self.lagged += 1;
                sub.lagging.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.subscribers.remove(&to);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u64) -> Node {
        Node {
            id,
            given_name: format!("n{id}"),
            ..Node::default()
        }
    }

    #[test]
    fn subscriber_gets_full_map_then_only_deltas_about_others() {
        let mut m = Netmap::default();
        m.upsert(node(1));
        m.upsert(node(2));
        let mut sub = m.subscribe(1).expect("known");
        assert_eq!(sub.full.peers.len(), 1);
        assert_eq!(sub.full.self_node.as_ref().map(|n| n.id), Some(1));
        assert_eq!(m.upsert(node(3)), 1);
        assert!(matches!(&*sub.deltas.try_recv().expect("delta"), Kind::PeerAdded(n) if n.id == 3));
        assert_eq!(m.set_endpoints(3, vec!["10.0.0.3:1".into()]), 1);
        assert!(
            matches!(&*sub.deltas.try_recv().expect("delta"), Kind::PeerEndpoints(e) if e.id == 3)
        );
        assert_eq!(m.set_online(2, true, 7), 1);
        assert_eq!(m.set_online(2, true, 8), 0, "no change, no delta");
        assert_eq!(m.remove(3), 1);
        let _ = sub.deltas.try_recv();
        assert!(
            matches!(&*sub.deltas.try_recv().expect("delta"), Kind::PeerRemoved(r) if r.id == 3)
        );
        // A change to the subscriber itself arrives as SelfChanged, not as a peer.
        assert_eq!(m.upsert(node(1)), 1);
        assert!(
            matches!(&*sub.deltas.try_recv().expect("delta"), Kind::SelfChanged(n) if n.id == 1)
        );
    }

    #[test]
    fn join_costs_one_delta_per_subscriber() {
        let mut m = Netmap::default();
        let mut subs = Vec::new();
        for id in 1..=50 {
            m.upsert(node(id));
        }
        for id in 1..=50 {
            subs.push(m.subscribe(id).expect("known"));
        }
        assert_eq!(m.upsert(node(51)), 50);
    }

    #[test]
    fn a_lagging_stream_is_resynced_and_others_keep_their_deltas() {
        let mut m = Netmap::default();
        m.upsert(node(1));
        m.upsert(node(2));
        let mut slow = m.subscribe(1).expect("known");
        let mut fast = m.subscribe(2).expect("known");
        let joins = STREAM_QUEUE as u64 + 5;
        let mut fast_got = 0;
        for i in 0..joins {
            m.upsert(node(100 + i));
            while fast.deltas.try_recv().is_ok() {
                fast_got += 1;
            }
        }
        assert_eq!(fast_got, joins, "the fast stream missed nothing");
        assert!(slow.lagging.load(Ordering::Acquire));
        assert_eq!(m.lagged(), 1);
        // The slow stream's memory stayed bounded: only the queue's worth was kept.
        let mut queued = 0;
        while slow.deltas.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, STREAM_QUEUE);
        let (full, mut rx) = m.resync(1, slow.stream).expect("still subscribed");
        assert_eq!(
            full.peers.len() as u64,
            1 + joins,
            "the full map has all it missed"
        );
        assert!(!slow.lagging.load(Ordering::Acquire));
        m.upsert(node(9999));
        let d = rx.try_recv().expect("delta after resync");
        assert!(matches!(&*d, Kind::PeerAdded(n) if n.id == 9999));
        assert!(m.resync(1, slow.stream + 100).is_none());
    }

    #[test]
    fn replaced_stream_does_not_unsubscribe_the_new_one() {
        let mut m = Netmap::default();
        m.upsert(node(1));
        let old = m.subscribe(1).expect("known");
        let new = m.subscribe(1).expect("known");
        assert!(!m.unsubscribe(1, old.stream));
        assert!(m.is_subscribed(1));
        assert!(m.unsubscribe(1, new.stream));
    }
}
