//! The node's data path between the core and the kernel, spread over three threads so that
//! reading, encrypting and the two kinds of writes overlap instead of taking turns:
//!
//! - the event loop (the runtime's thread) reads the TUN device and the UDP socket and runs
//!   the core, which encrypts and decrypts straight into batch buffers this module owns;
//! - `warren-udp-tx` sends each outbound batch as one UDP GSO send (one syscall for up to 64
//!   datagrams to one peer);
//! - `warren-tun-tx` writes each inbound batch to the TUN device, coalesced into as few
//!   writes as GRO allows when the device has offload (a 64 KB TCP segment per write).
//!
//! Batches are handed over whole through bounded channels and come back empty to be reused,
//! so nothing is allocated per packet and a wakeup crosses threads at most once per batch
//! (none while the receiving thread is busy). The sans-IO core stays on the event loop; the
//! threads only do syscalls.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};
use warren_node_core::node::{Datagram, Dest, Node, NodeError, encapsulated_len};

use crate::derp::DerpLinks;
use crate::udp::{BatchSocket, MAX_BATCH_BYTES};

/// Batches per direction: one being filled, the rest queued or in a syscall.
const POOL: usize = 4;
/// Largest datagram or packet handled (an IP packet's 64 KiB limit, plus WireGuard's header).
const MAX_DATAGRAM: usize = 65_535 + warren_node_core::wg::OVERHEAD;
/// Packets per inbound batch: what one TUN write pass can coalesce (tun-rs's ideal batch).
pub const TUN_BATCH: usize = tun_rs::IDEAL_BATCH_SIZE;
/// Room kept in front of each inbound packet for the virtio-net header that offload writes.
const TUN_OFFSET: usize = VIRTIO_NET_HDR_LEN;
/// How long the event loop waits for a batch to come back before it gives up on the thread.
const RETURN_WAIT: Duration = Duration::from_secs(5);

/// What the data path did, for `/metrics`: whether the TUN device has offload, and the most
/// bytes one TUN read and one TUN write carried (above the MTU only with offload: a TSO
/// segment read whole, a GRO-coalesced write).
#[derive(Debug, Default)]
pub struct Counters {
    offload: bool,
    largest_read: AtomicUsize,
    largest_write: AtomicUsize,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataStats {
    /// The TUN device has offload (virtio-net header, TSO/GRO).
    pub offload: bool,
    /// Most bytes of IP packets one TUN read returned.
    pub largest_read: usize,
    /// Most bytes one TUN write carried (one IP packet, coalesced or not).
    pub largest_write: usize,
}

impl Counters {
    /// Counters for a device with or without offload.
    pub fn new(offload: bool) -> Arc<Self> {
        Arc::new(Self {
            offload,
            ..Self::default()
        })
    }

    /// The figures so far.
    pub fn snapshot(&self) -> DataStats {
        DataStats {
            offload: self.offload,
            largest_read: self.largest_read.load(Ordering::Relaxed),
            largest_write: self.largest_write.load(Ordering::Relaxed),
        }
    }
}

/// A pool of reusable batches and where they are written: by a worker thread (handed over
/// full, coming back empty) or, with [`Threads::Off`], by the event loop itself at once.
enum Pool<B> {
    Thread {
        to_worker: Option<SyncSender<B>>,
        back: Receiver<B>,
        made: usize,
        worker: Option<JoinHandle<()>>,
    },
    Inline {
        work: Box<dyn FnMut(&mut B) + Send>,
        spare: Option<B>,
    },
}

impl<B> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let threaded = matches!(self, Self::Thread { .. });
        f.debug_struct("Pool")
            .field("threaded", &threaded)
            .finish_non_exhaustive()
    }
}

/// Whether the data path writes on worker threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// UDP sends and TUN writes on their own threads, beside the event loop: a node uses a
    /// second core when it has one.
    On,
    /// Everything on the event loop's thread: no handoffs, which is cheaper where one core
    /// is all the node gets.
    Off,
}

impl<B: Send + 'static> Pool<B> {
    fn start(
        name: &str,
        threads: Threads,
        work: impl FnMut(&mut B) + Send + 'static,
    ) -> io::Result<Self> {
        if threads == Threads::Off {
            return Ok(Self::Inline {
                work: Box::new(work),
                spare: None,
            });
        }
        let (to_worker, rx) = sync_channel::<B>(POOL);
        let (back_tx, back) = sync_channel::<B>(POOL);
        let mut work = work;
        let worker = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                while let Ok(mut batch) = rx.recv() {
                    work(&mut batch);
                    if back_tx.send(batch).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self::Thread {
            to_worker: Some(to_worker),
            back,
            made: 0,
            worker: Some(worker),
        })
    }

    /// An empty batch: a returned one, a new one while fewer than [`POOL`] exist, or else
    /// the next to come back (the worker is behind: this is the backpressure).
    fn take(&mut self, make: impl FnOnce() -> B) -> B {
        let (back, made) = match self {
            Self::Inline { spare, .. } => return spare.take().unwrap_or_else(make),
            Self::Thread { back, made, .. } => (back, made),
        };
        if let Ok(b) = back.try_recv() {
            return b;
        }
        if *made < POOL {
            *made += 1;
            return make();
        }
        match back.recv_timeout(RETURN_WAIT) {
            Ok(b) => b,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                // A worker stuck in a syscall this long is broken; keep the node running
                // with a fresh batch rather than stall every peer.
                tracing::warn!("data path worker did not return a batch; starting another");
                make()
            }
        }
    }

    /// Hands `cur` to the writer and puts an empty batch in its place.
    fn swap_out(&mut self, cur: &mut B, make: impl FnOnce() -> B) {
        let next = self.take(make);
        let full = std::mem::replace(cur, next);
        self.give(full);
    }

    fn give(&mut self, mut batch: B) {
        match self {
            Self::Inline { work, spare } => {
                work(&mut batch);
                *spare = Some(batch);
            }
            Self::Thread { to_worker, .. } => {
                if let Some(tx) = to_worker
                    && tx.send(batch).is_err()
                {
                    tracing::warn!("data path worker ended; batch dropped");
                }
            }
        }
    }

    /// Stops the worker after the batches it has.
    fn stop(&mut self) {
        if let Self::Thread {
            to_worker, worker, ..
        } = self
        {
            *to_worker = None;
            if let Some(w) = worker.take()
                && w.join().is_err()
            {
                tracing::error!("data path worker panicked");
            }
        }
    }
}

impl<B> Drop for Pool<B> {
    fn drop(&mut self) {
        if let Self::Thread {
            to_worker, worker, ..
        } = self
        {
            *to_worker = None;
            if let Some(w) = worker.take() {
                let _ = w.join();
            }
        }
    }
}

/// Datagrams for one destination laid out for one GSO send: equal sizes, the last may be
/// shorter. The buffer keeps its full size; `len` is what is used.
#[derive(Debug)]
struct UdpBatch {
    buf: Vec<u8>,
    len: usize,
    dst: Option<SocketAddr>,
    segment: usize,
    count: usize,
    closed: bool,
}

impl UdpBatch {
    fn new() -> Self {
        Self {
            buf: vec![0; MAX_BATCH_BYTES + MAX_DATAGRAM],
            len: 0,
            dst: None,
            segment: 0,
            count: 0,
            closed: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether a datagram of `len` bytes for `dst` may join (at the end of the buffer).
    fn fits(&self, dst: SocketAddr, len: usize, max: usize) -> bool {
        match self.dst {
            None => true,
            Some(d) => {
                d == dst
                    && !self.closed
                    && self.count < max
                    && len <= self.segment
                    && self.len + len <= MAX_BATCH_BYTES
            }
        }
    }

    /// Takes the `len` bytes written at `self.len` as the next datagram (it [`Self::fits`]).
    fn commit(&mut self, dst: SocketAddr, len: usize) {
        if self.dst.is_none() {
            self.dst = Some(dst);
            self.segment = len;
        } else if len < self.segment {
            self.closed = true;
        }
        self.len += len;
        self.count += 1;
    }

    fn clear(&mut self) {
        self.len = 0;
        self.dst = None;
        self.segment = 0;
        self.count = 0;
        self.closed = false;
    }
}

/// The outbound half: TUN packets encrypted into GSO batches for the `warren-udp-tx` thread.
#[derive(Debug)]
pub struct UdpTx {
    pool: Pool<UdpBatch>,
    cur: UdpBatch,
    max_segments: usize,
    /// A datagram that did not fit the batch it was written into, on its way to the next.
    spare: Vec<u8>,
}

impl UdpTx {
    /// Starts the sending thread on `socket` (with [`Threads::Off`], sends on the caller's).
    pub fn start(socket: Arc<BatchSocket>, threads: Threads) -> io::Result<Self> {
        let max_segments = socket.max_segments();
        let pool = Pool::start("warren-udp-tx", threads, move |b: &mut UdpBatch| {
            if let Some(dst) = b.dst
                && let Err(e) = socket.send_blocking(dst, &b.buf[..b.len], b.segment)
            {
                tracing::debug!(error = %e, %dst, "UDP send");
            }
            b.clear();
        })?;
        Ok(Self {
            pool,
            cur: UdpBatch::new(),
            max_segments,
            spare: Vec::with_capacity(MAX_DATAGRAM),
        })
    }

    /// Encrypts `packet` (from the TUN device) into the batch; a datagram for DERP goes to
    /// its link (then the result is true), and what the core queued instead waits for
    /// [`Node::poll_transmit`].
    pub fn encrypt(
        &mut self,
        node: &mut Node,
        derp: &mut DerpLinks,
        packet: &[u8],
        now: Instant,
    ) -> Result<bool, NodeError> {
        let start = self.cur.len;
        let end = start + encapsulated_len(packet.len());
        let Some(tail) = self.cur.buf.get_mut(start..end) else {
            return Err(NodeError::Wg {
                peer: None,
                error: warren_node_core::wg::WgError::BufferTooSmall,
            });
        };
        match node.encapsulate(packet, now, tail)? {
            None => {}
            Some(Datagram {
                dst: Dest::Udp(dst),
                len,
            }) => {
                if self.cur.fits(dst, len, self.max_segments) {
                    self.cur.commit(dst, len);
                } else {
                    self.spare.clear();
                    self.spare
                        .extend_from_slice(&self.cur.buf[start..start + len]);
                    self.flush();
                    self.cur.buf[..len].copy_from_slice(&self.spare);
                    self.cur.commit(dst, len);
                }
            }
            Some(Datagram {
                dst: Dest::Derp { region, peer },
                len,
            }) => {
                derp.send(region, peer, self.cur.buf[start..start + len].to_vec());
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Adds a datagram the core queued (handshakes, disco, a path being tried).
    pub fn push(&mut self, dst: SocketAddr, datagram: &[u8]) {
        if datagram.len() > MAX_DATAGRAM {
            return;
        }
        if !self.cur.fits(dst, datagram.len(), self.max_segments) {
            self.flush();
        }
        let start = self.cur.len;
        self.cur.buf[start..start + datagram.len()].copy_from_slice(datagram);
        self.cur.commit(dst, datagram.len());
    }

    /// Hands the batch being filled to the sending thread.
    pub fn flush(&mut self) {
        if !self.cur.is_empty() {
            self.pool.swap_out(&mut self.cur, UdpBatch::new);
        }
    }

    /// Sends what is batched and stops the thread.
    pub fn stop(&mut self) {
        self.flush();
        self.pool.stop();
    }
}

/// One packet's buffer in a [`TunBatch`]: allocated (and zeroed) once at full size, with the
/// packet's length kept apart, so taking it for the next packet writes nothing (a `Vec`
/// would zero the bytes it grows by, every packet).
#[derive(Debug)]
struct Slot {
    buf: Box<[u8]>,
    len: usize,
}

impl Slot {
    fn new() -> Self {
        Self {
            buf: vec![0; TUN_OFFSET + MAX_DATAGRAM].into_boxed_slice(),
            len: 0,
        }
    }
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl AsMut<[u8]> for Slot {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

/// GRO grows the first packet of a run by the payloads of the next ones, within the slot.
impl tun_rs::ExpandBuffer for Slot {
    fn buf_capacity(&self) -> usize {
        self.buf.len()
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        let new_len = new_len.min(self.buf.len());
        if new_len > self.len {
            self.buf[self.len..new_len].fill(value);
        }
        self.len = new_len;
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        let end = (self.len + src.len()).min(self.buf.len());
        let n = end - self.len;
        self.buf[self.len..end].copy_from_slice(&src[..n]);
        self.len = end;
    }
}

/// Packets for the TUN device, each behind [`TUN_OFFSET`] bytes of room for its virtio-net
/// header; only `bufs[..count]` are in use.
#[derive(Debug)]
struct TunBatch {
    bufs: Vec<Slot>,
    count: usize,
}

impl TunBatch {
    fn new() -> Self {
        Self {
            bufs: (0..TUN_BATCH).map(|_| Slot::new()).collect(),
            count: 0,
        }
    }
}

/// The inbound half: decrypted packets batched for the `warren-tun-tx` thread.
#[derive(Debug)]
pub struct TunTx {
    pool: Pool<TunBatch>,
    cur: TunBatch,
}

impl TunTx {
    /// Starts the writing thread on `tun` (with [`Threads::Off`], writes on the caller's).
    /// With offload on, each batch is coalesced (GRO) into as few writes as its flows allow.
    pub fn start(
        tun: Arc<AsyncDevice>,
        counters: Arc<Counters>,
        threads: Threads,
    ) -> io::Result<Self> {
        let mut gro = GROTable::new();
        let pool = Pool::start("warren-tun-tx", threads, move |b: &mut TunBatch| {
            let device: &tun_rs::DeviceImpl = &tun;
            let bufs = &mut b.bufs[..b.count];
            if let Err(e) = device.send_multiple(&mut gro, bufs, TUN_OFFSET) {
                tracing::debug!(error = %e, "TUN write");
            }
            // GRO grew the first packet of each coalesced run in place.
            let largest = bufs.iter().map(|p| p.len - TUN_OFFSET).max().unwrap_or(0);
            counters.largest_write.fetch_max(largest, Ordering::Relaxed);
            b.count = 0;
        })?;
        Ok(Self {
            pool,
            cur: TunBatch::new(),
        })
    }

    /// A buffer of `room` bytes for the next packet; [`Self::commit`] keeps it.
    pub fn slot(&mut self, room: usize) -> &mut [u8] {
        let slot = &mut self.cur.bufs[self.cur.count];
        slot.len = (TUN_OFFSET + room).min(slot.buf.len());
        &mut slot.buf[TUN_OFFSET..slot.len]
    }

    /// Keeps the first `len` bytes of the last [`Self::slot`] as a packet.
    pub fn commit(&mut self, len: usize) {
        let slot = &mut self.cur.bufs[self.cur.count];
        slot.len = slot.len.min(TUN_OFFSET + len);
        self.cur.count += 1;
        if self.cur.count == TUN_BATCH {
            self.flush();
        }
    }

    /// Adds a packet the core queued (MagicDNS answers).
    pub fn push(&mut self, packet: &[u8]) {
        self.slot(packet.len()).copy_from_slice(packet);
        self.commit(packet.len());
    }

    /// Hands the batch being filled to the writing thread.
    pub fn flush(&mut self) {
        if self.cur.count > 0 {
            self.pool.swap_out(&mut self.cur, TunBatch::new);
        }
    }

    /// Writes what is batched and stops the thread.
    pub fn stop(&mut self) {
        self.flush();
        self.pool.stop();
    }
}

/// Reads from the TUN device: with offload, one read takes up to 64 KB of TCP (or UDP)
/// segments, split here into packets of the device's MTU.
#[derive(Debug)]
pub struct TunRx {
    counters: Arc<Counters>,
    raw: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
}

impl TunRx {
    /// Buffers for packets of up to `mtu` bytes.
    pub fn new(mtu: u16, counters: Arc<Counters>) -> Self {
        Self {
            counters,
            raw: vec![0; VIRTIO_NET_HDR_LEN + 65_535],
            bufs: vec![vec![0; usize::from(mtu)]; TUN_BATCH],
            sizes: vec![0; TUN_BATCH],
        }
    }

    /// One read without waiting: the packets it held (`WouldBlock` when nothing is ready).
    pub fn try_read(&mut self, tun: &AsyncDevice) -> io::Result<impl Iterator<Item = &[u8]>> {
        let n = tun.try_recv_multiple(&mut self.raw, &mut self.bufs, &mut self.sizes, 0)?;
        let bytes = self.sizes[..n].iter().sum();
        self.counters
            .largest_read
            .fetch_max(bytes, Ordering::Relaxed);
        Ok(self
            .bufs
            .iter()
            .zip(&self.sizes)
            .take(n)
            .map(|(b, &len)| &b[..len]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tun_rs::ExpandBuffer;

    #[test]
    fn slot_grows_and_shrinks_within_its_buffer_without_clearing_it() {
        let mut s = Slot::new();
        s.buf_resize(4, 7);
        assert_eq!(s.as_ref(), &[7, 7, 7, 7]);
        s.buf_extend_from_slice(&[1, 2]);
        assert_eq!(s.as_ref(), &[7, 7, 7, 7, 1, 2]);
        s.buf_resize(2, 0);
        assert_eq!(s.as_ref(), &[7, 7]);
        // Taken again for a longer packet, the old bytes are there to be overwritten.
        s.len = 5;
        assert_eq!(s.as_ref(), &[7, 7, 7, 7, 1]);
        assert_eq!(s.buf_capacity(), TUN_OFFSET + MAX_DATAGRAM);
        s.len = s.buf_capacity() - 1;
        s.buf_extend_from_slice(&[9, 9, 9]);
        assert_eq!(s.len, s.buf_capacity(), "never past the buffer");
    }

    #[test]
    fn udp_batch_takes_equal_sizes_for_one_destination_and_a_shorter_last() {
        let a: SocketAddr = "192.0.2.1:1".parse().expect("addr");
        let b: SocketAddr = "192.0.2.2:1".parse().expect("addr");
        let mut batch = UdpBatch::new();
        assert!(batch.fits(a, 100, 64));
        batch.commit(a, 100);
        assert!(batch.fits(a, 100, 64));
        assert!(!batch.fits(b, 100, 64), "another destination");
        assert!(!batch.fits(a, 101, 64), "a longer datagram");
        assert!(!batch.fits(a, 100, 1), "at most max datagrams");
        batch.commit(a, 100);
        batch.commit(a, 40);
        assert!(!batch.fits(a, 40, 64), "nothing after a shorter one");
        assert_eq!((batch.len, batch.segment, batch.count), (240, 100, 3));
        batch.clear();
        assert!(batch.is_empty() && batch.fits(b, 1312, 64));
        let mut n = 0;
        while batch.fits(a, 1312, 64) {
            batch.commit(a, 1312);
            n += 1;
        }
        assert_eq!(
            n,
            MAX_BATCH_BYTES / 1312,
            "a batch stays under the 64 KiB UDP limit"
        );
    }
}
