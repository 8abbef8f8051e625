//! What one map stream has still to send: the changes since its last message, coalesced.
//!
//! A change is kept per subject, newest first: a peer's record replaces whatever was pending
//! about that peer, a second endpoints or online change replaces the first, a new filter the old
//! one. So a stream that falls behind holds at most one entry per peer, never a queue that grows
//! with the rate of change; ten thousand nodes coming online cost each stream one pending entry
//! per peer until its next tick, and one message. Past [`OUTBOX_CAP`] peers the backlog is
//! dropped and the stream sends a fresh full map instead ([`Taken::Resync`]): its memory stays
//! bounded, and nobody else waits for it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use warren_proto::control::map_response::Kind;

/// One change, shared by every stream that receives it.
pub type Delta = Arc<Kind>;

/// Peers with pending changes a stream may hold before it resyncs with a full map.
pub const OUTBOX_CAP: usize = 4096;

/// What is pending about one peer.
#[derive(Debug, Default)]
struct Slot {
    /// Added, changed or removed: the whole record (or its removal).
    record: Option<Delta>,
    /// Endpoints changed since `record`.
    endpoints: Option<Delta>,
    /// Online state changed since `record`.
    online: Option<Delta>,
}

#[derive(Debug, Default)]
struct Pending {
    settings: Option<Delta>,
    self_changed: Option<Delta>,
    filter: Option<Delta>,
    peers: BTreeMap<u64, Slot>,
    /// The backlog was dropped: the stream must send a full map.
    resync: bool,
    /// The server ended the stream (node deleted, expired, or a newer stream replaced it).
    closed: bool,
    /// Taken by [`Outbox::try_recv`] and not yet handed out (tests and benchmarks).
    ready: VecDeque<Delta>,
}

impl Pending {
    fn drain_into(&mut self, out: &mut Vec<Delta>) {
        out.extend(self.settings.take());
        out.extend(self.self_changed.take());
        out.extend(self.filter.take());
        for slot in std::mem::take(&mut self.peers).into_values() {
            out.extend(slot.record);
            out.extend(slot.endpoints);
            out.extend(slot.online);
        }
    }
}

/// The result of offering a change to an outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Pending now (alone or in place of an older change about the same subject).
    Queued,
    /// This change overflowed the outbox: the backlog is gone and the stream will resync.
    Lagged,
    /// Not kept: the stream already resyncs, or it is closed.
    Dropped,
}

/// What a stream finds when it looks at its outbox.
#[derive(Debug, PartialEq)]
pub enum Taken {
    /// The changes to send, in the order they apply.
    Changes(Vec<Delta>),
    /// The backlog overflowed: send a full map (and ask the netmap for one with
    /// [`crate::netmap::Netmap::resync`]).
    Resync,
    /// The server ended the stream.
    Closed,
}

/// One stream's pending changes, shared between the netmap (which pushes under the core lock)
/// and the stream's task (which takes them without it).
#[derive(Debug, Default)]
pub struct Outbox {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Nothing here panics while holding the lock; recover the data if it ever does.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers a change; see [`Pushed`].
    pub fn push(&self, delta: Delta) -> Pushed {
        let mut p = self.lock();
        if p.resync || p.closed {
            return Pushed::Dropped;
        }
        match &*delta {
            Kind::PeerAdded(n) | Kind::PeerChanged(n) => {
                let slot = p.peers.entry(n.id).or_default();
                // A peer the node has not been told of yet stays "added", with the newest
                // record.
                let added = matches!(slot.record.as_deref(), Some(Kind::PeerAdded(_)))
                    && matches!(&*delta, Kind::PeerChanged(_));
                let record = if added {
                    Arc::new(Kind::PeerAdded(n.clone()))
                } else {
                    Arc::clone(&delta)
                };
                *slot = Slot {
                    record: Some(record),
                    ..Slot::default()
                };
            }
            Kind::PeerRemoved(r) => {
                let id = r.id;
                *p.peers.entry(id).or_default() = Slot {
                    record: Some(delta),
                    ..Slot::default()
                };
            }
            Kind::PeerEndpoints(e) => {
                let id = e.id;
                p.peers.entry(id).or_default().endpoints = Some(delta);
            }
            Kind::PeerOnline(o) => {
                let id = o.id;
                p.peers.entry(id).or_default().online = Some(delta);
            }
            Kind::SelfChanged(_) => p.self_changed = Some(delta),
            Kind::FilterChanged(_) => p.filter = Some(delta),
            Kind::SettingsChanged(_) => p.settings = Some(delta),
            // Full maps, pages, batches and keepalives are made by the stream, never pushed.
            Kind::Full(_) | Kind::FullPage(_) | Kind::Batch(_) | Kind::Keepalive(_) => {
                return Pushed::Dropped;
            }
        }
        let lagged = p.peers.len() > OUTBOX_CAP;
        if lagged {
            *p = Pending {
                resync: true,
                ..Pending::default()
            };
        }
        drop(p);
        self.notify.notify_one();
        if lagged {
            Pushed::Lagged
        } else {
            Pushed::Queued
        }
    }

    /// Ends the stream: its task sees [`Taken::Closed`].
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// Everything pending, in the order it applies: settings, the node's own record, its
    /// filter, then each peer's record, endpoints and online state, by peer id.
    pub fn take(&self) -> Taken {
        let mut p = self.lock();
        if p.closed {
            return Taken::Closed;
        }
        if p.resync {
            return Taken::Resync;
        }
        let mut out: Vec<Delta> = p.ready.drain(..).collect();
        p.drain_into(&mut out);
        Taken::Changes(out)
    }

    /// Drops the backlog and the resync mark: a full map made now covers everything before it.
    /// Called by the netmap, under the same lock as the full map's snapshot.
    pub fn reset(&self) {
        let mut p = self.lock();
        let closed = p.closed;
        *p = Pending {
            closed,
            ..Pending::default()
        };
    }

    /// Waits until something was pushed (or the stream closed) since the last wait.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// The next pending change, one at a time (for tests and benchmarks that read an outbox
    /// without a stream); `None` when nothing is pending, the stream resyncs, or it is closed.
    pub fn try_recv(&self) -> Option<Delta> {
        let mut p = self.lock();
        if p.closed || p.resync {
            return None;
        }
        if p.ready.is_empty() {
            let mut out = Vec::new();
            p.drain_into(&mut out);
            p.ready.extend(out);
        }
        p.ready.pop_front()
    }

    /// How many peers have changes pending.
    pub fn pending_peers(&self) -> usize {
        self.lock().peers.len()
    }

    /// Whether the backlog overflowed and the stream must resync.
    pub fn lagging(&self) -> bool {
        self.lock().resync
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::control::{Node, PeerEndpoints, PeerOnline, PeerRemoved};

    fn rec(id: u64, name: &str) -> Delta {
        Arc::new(Kind::PeerChanged(Node {
            id,
            given_name: name.into(),
            ..Node::default()
        }))
    }

    fn online(id: u64, on: bool) -> Delta {
        Arc::new(Kind::PeerOnline(PeerOnline {
            id,
            online: on,
            last_seen_unix_ms: 0,
        }))
    }

    #[test]
    fn changes_about_one_peer_coalesce_to_the_newest() {
        let o = Outbox::default();
        assert_eq!(o.push(rec(2, "a")), Pushed::Queued);
        assert_eq!(o.push(online(2, true)), Pushed::Queued);
        assert_eq!(o.push(online(2, false)), Pushed::Queued);
        assert_eq!(o.push(rec(1, "x")), Pushed::Queued);
        let eps = Arc::new(Kind::PeerEndpoints(PeerEndpoints {
            id: 1,
            endpoints: vec!["192.0.2.1:1".into()],
        }));
        assert_eq!(o.push(eps.clone()), Pushed::Queued);
        let Taken::Changes(got) = o.take() else {
            panic!("changes expected")
        };
        // By peer id; a record before the endpoints and online state that followed it.
        assert_eq!(got, vec![rec(1, "x"), eps, rec(2, "a"), online(2, false)]);
        // A record replaces what was pending about the peer; a removal replaces the record.
        o.push(online(3, true));
        o.push(rec(3, "b"));
        assert_eq!(o.take(), Taken::Changes(vec![rec(3, "b")]));
        // A peer not yet told of stays added, with the newest record.
        let added = |name: &str| {
            Arc::new(Kind::PeerAdded(Node {
                id: 4,
                given_name: name.into(),
                ..Node::default()
            }))
        };
        o.push(added("d"));
        o.push(rec(4, "e"));
        assert_eq!(o.take(), Taken::Changes(vec![added("e")]));
        o.push(rec(3, "c"));
        let gone = Arc::new(Kind::PeerRemoved(PeerRemoved { id: 3 }));
        o.push(gone.clone());
        assert_eq!(o.take(), Taken::Changes(vec![gone]));
        assert_eq!(o.take(), Taken::Changes(vec![]));
    }

    #[test]
    fn overflow_drops_the_backlog_until_reset() {
        let o = Outbox::default();
        for id in 0..OUTBOX_CAP as u64 {
            assert_eq!(o.push(online(id, true)), Pushed::Queued);
        }
        assert_eq!(o.push(online(OUTBOX_CAP as u64, true)), Pushed::Lagged);
        assert!(o.lagging());
        assert_eq!(o.push(online(1, false)), Pushed::Dropped);
        assert_eq!(o.take(), Taken::Resync);
        o.reset();
        assert_eq!(o.take(), Taken::Changes(vec![]));
        o.close();
        assert_eq!(o.push(online(1, true)), Pushed::Dropped);
        assert_eq!(o.take(), Taken::Closed);
    }
}
