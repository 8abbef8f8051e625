//! A client's outgoing queues: data packets and disco packets (each bounded, dropping the
//! oldest when full, as Tailscale's `sendPkt` drops at the queue head), and a small control
//! queue (pongs, `PeerGone`). The connection's writer drains control first, then disco, then
//! data, so disco packets overtake a full data queue.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;
use warren_proto::NodePublicKey;
use warren_proto::derp::Frame;

/// Control frames kept at most (pongs and `PeerGone`); more are dropped, like Tailscale's
/// one-slot pong channel.
const CONTROL_DEPTH: usize = 16;
/// Control frames kept for a mesh peer: it hears `PeerPresent`/`PeerGone` for every client,
/// all of them at once when it starts watching.
const MESH_CONTROL_DEPTH: usize = 1 << 16;

/// One queued item for the writer.
#[derive(Debug)]
pub(crate) enum Next {
    /// A frame to write.
    Frame(Frame),
    /// The connection is to close; write the health text first when there is one.
    Close(Option<String>),
}

#[derive(Debug, Default)]
struct Inner {
    control: VecDeque<Frame>,
    disco: Lane,
    data: Lane,
    closed: Option<Option<String>>,
}

/// Most bytes of packets queued for one client in each lane (data, disco), whatever the packet
/// count: a deep queue of small WireGuard packets absorbs bursts, and large packets (or large
/// packets dressed up as disco) cannot pile up past this.
pub(crate) const MAX_QUEUE_BYTES: usize = 1 << 20;

/// One lane of packets, bounded in count and in bytes; the oldest go first when it is full.
#[derive(Debug, Default)]
struct Lane {
    packets: VecDeque<(NodePublicKey, Vec<u8>)>,
    bytes: usize,
}

impl Lane {
    /// Appends a packet; returns how many old ones were dropped to make room.
    fn push(&mut self, depth: usize, src: NodePublicKey, packet: Vec<u8>) -> u64 {
        let mut dropped = 0;
        while self.packets.len() >= depth || self.bytes + packet.len() > MAX_QUEUE_BYTES {
            if self.pop().is_none() {
                break;
            }
            dropped += 1;
        }
        self.bytes += packet.len();
        self.packets.push_back((src, packet));
        dropped
    }

    fn pop(&mut self) -> Option<(NodePublicKey, Vec<u8>)> {
        let p = self.packets.pop_front()?;
        self.bytes -= p.1.len();
        Some(p)
    }
}

/// What happened to a pushed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued without loss.
    Queued,
    /// Queued, and the oldest packet of the same kind was dropped to make room.
    DroppedOldest,
    /// The connection is closing; the packet was dropped.
    Closed,
}

/// A client's send queues. Many producers (other clients' readers), one consumer (the writer).
#[derive(Debug)]
pub(crate) struct ClientQueue {
    depth: usize,
    control_depth: usize,
    inner: Mutex<Inner>,
    notify: Notify,
    dropped: AtomicU64,
}

impl ClientQueue {
    pub(crate) fn new(depth: usize) -> Self {
        Self {
            depth: depth.max(1),
            control_depth: CONTROL_DEPTH,
            inner: Mutex::new(Inner::default()),
            notify: Notify::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Queues for a mesh peer: room for a presence frame per client.
    pub(crate) fn for_mesh_peer(depth: usize) -> Self {
        Self {
            control_depth: MESH_CONTROL_DEPTH,
            ..Self::new(depth)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the queues inconsistent (each operation
        // is a single push or pop), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a packet from `src`, on the disco queue when `disco`.
    pub(crate) fn push_packet(&self, src: NodePublicKey, packet: Vec<u8>, disco: bool) -> Pushed {
        let mut inner = self.lock();
        if inner.closed.is_some() {
            return Pushed::Closed;
        }
        let lane = if disco {
            &mut inner.disco
        } else {
            &mut inner.data
        };
        let dropped = lane.push(self.depth, src, packet);
        drop(inner);
        self.notify.notify_one();
        if dropped == 0 {
            return Pushed::Queued;
        }
        self.dropped.fetch_add(dropped, Ordering::Relaxed);
        Pushed::DroppedOldest
    }

    /// Queues a control frame; returns false when it was dropped (queue full or closing).
    pub(crate) fn push_control(&self, frame: Frame) -> bool {
        let mut inner = self.lock();
        if inner.closed.is_some() || inner.control.len() >= self.control_depth {
            return false;
        }
        inner.control.push_back(frame);
        drop(inner);
        self.notify.notify_one();
        true
    }

    /// Asks the writer to close the connection, after writing `health` when given. Queued
    /// packets are dropped.
    pub(crate) fn close(&self, health: Option<String>) {
        let mut inner = self.lock();
        if inner.closed.is_none() {
            inner.closed = Some(health);
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// The next item without waiting: control first, then disco, then data.
    pub(crate) fn try_next(&self) -> Option<Next> {
        let mut inner = self.lock();
        if let Some(health) = &inner.closed {
            return Some(Next::Close(health.clone()));
        }
        if let Some(f) = inner.control.pop_front() {
            return Some(Next::Frame(f));
        }
        let (src, packet) = match inner.disco.pop() {
            Some(p) => p,
            None => inner.data.pop()?,
        };
        Some(Next::Frame(Frame::RecvPacket { src, packet }))
    }

    /// Waits for the next item. Cancel-safe: nothing is taken until it is returned.
    pub(crate) async fn next(&self) -> Next {
        loop {
            if let Some(next) = self.try_next() {
                return next;
            }
            self.notify.notified().await;
        }
    }

    /// (data, disco) packets waiting.
    pub(crate) fn lens(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.data.packets.len(), inner.disco.packets.len())
    }

    /// Packets this client lost to a full queue.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> NodePublicKey {
        NodePublicKey::from_bytes([b; 32])
    }

    fn src_of(n: Option<Next>) -> Vec<u8> {
        match n {
            Some(Next::Frame(Frame::RecvPacket { packet, .. })) => packet,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    #[test]
    fn full_queue_drops_oldest_and_stays_bounded() {
        let q = ClientQueue::new(4);
        for i in 0..10u8 {
            let out = q.push_packet(k(1), vec![i], false);
            assert_eq!(
                out,
                if i < 4 {
                    Pushed::Queued
                } else {
                    Pushed::DroppedOldest
                }
            );
        }
        assert_eq!(q.lens(), (4, 0));
        assert_eq!(q.dropped(), 6);
        for want in 6..10u8 {
            assert_eq!(src_of(q.try_next()), vec![want]);
        }
        assert!(q.try_next().is_none());
    }

    #[test]
    fn deep_queue_is_also_bounded_in_bytes() {
        let big = 60 * 1024;
        // Both lanes: large packets that look like disco get no more room than data.
        for disco in [false, true] {
            let q = ClientQueue::new(10_000);
            for i in 0..100u8 {
                q.push_packet(k(1), vec![i; big], disco);
            }
            let (data, discos) = q.lens();
            let len = if disco { discos } else { data };
            assert_eq!(
                len,
                MAX_QUEUE_BYTES / big,
                "bytes, not the packet count, bound it"
            );
            assert_eq!(q.dropped(), 100 - len as u64);
            // The newest packets are the ones kept.
            assert_eq!(src_of(q.try_next())[0], (100 - len) as u8);
        }
        // Small packets fill the count limit well below the byte limit.
        let q = ClientQueue::new(512);
        for _ in 0..600 {
            q.push_packet(k(1), vec![0; 1300], false);
        }
        assert_eq!(q.lens(), (512, 0));
    }

    #[test]
    fn disco_overtakes_a_full_data_queue_and_control_goes_first() {
        let q = ClientQueue::new(32);
        for i in 0..40u8 {
            q.push_packet(k(1), vec![i], false);
        }
        q.push_packet(k(2), b"disco".to_vec(), true);
        assert!(q.push_control(Frame::Pong { data: [7; 8] }));
        assert!(matches!(
            q.try_next(),
            Some(Next::Frame(Frame::Pong { data })) if data == [7; 8]
        ));
        assert_eq!(src_of(q.try_next()), b"disco".to_vec());
        assert_eq!(src_of(q.try_next()), vec![8]);
        assert_eq!(q.lens(), (31, 0));
    }

    #[test]
    fn close_wins_over_queued_packets_and_refuses_more() {
        let q = ClientQueue::new(2);
        q.push_packet(k(1), vec![1], false);
        q.close(Some("replaced".into()));
        assert_eq!(q.push_packet(k(1), vec![2], false), Pushed::Closed);
        assert!(!q.push_control(Frame::KeepAlive));
        assert!(matches!(q.try_next(), Some(Next::Close(Some(t))) if t == "replaced"));
    }

    #[test]
    fn control_queue_is_bounded() {
        let q = ClientQueue::new(2);
        for _ in 0..CONTROL_DEPTH {
            assert!(q.push_control(Frame::Pong { data: [0; 8] }));
        }
        assert!(!q.push_control(Frame::Pong { data: [0; 8] }));
    }
}
