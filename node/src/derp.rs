//! The node's DERP connections: one to the home region (announced as preferred) and others to
//! peers' home regions on demand, each in its own task that reconnects with backoff. While a
//! link is connected, packets go straight into its connection's writer queue (no task hop on the
//! data path); while it connects they wait in the link's queue and are sent once it is up. A
//! full queue drops, as a congested relay would. Packets that arrive are handed to the daemon
//! loop. DERP runs over TCP, so it also works where UDP is blocked.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use warren_derp::client::{Client, ClientError, ClientEvent, ClientSender, ConnectOptions};
use warren_node_core::netmap::DerpUrl;
use warren_proto::backoff::Backoff;
use warren_proto::{NodePublicKey, NodeSecretKey};

/// Packets waiting for one link's connection.
const LINK_QUEUE: usize = 512;
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The first wait before reconnecting a link.
const MIN_BACKOFF: Duration = Duration::from_millis(100);

/// A packet a DERP relay delivered.
#[derive(Debug)]
pub struct DerpReceived {
    /// The region it came through.
    pub region: u32,
    /// The peer that sent it.
    pub from: NodePublicKey,
    /// The packet.
    pub packet: Vec<u8>,
}

#[derive(Debug)]
enum Out {
    Packet(NodePublicKey, Vec<u8>),
    Preferred(bool),
}

/// The connection's sender while the link is up.
type Live = Arc<Mutex<Option<ClientSender>>>;

#[derive(Debug)]
struct Link {
    out: mpsc::Sender<Out>,
    live: Live,
    task: JoinHandle<()>,
}

impl Link {
    fn live(&self) -> Option<ClientSender> {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// All DERP connections of the node.
#[derive(Debug)]
pub struct DerpLinks {
    key: NodeSecretKey,
    urls: BTreeMap<u32, Vec<DerpUrl>>,
    links: BTreeMap<u32, Link>,
    home: Option<u32>,
    received: mpsc::Sender<DerpReceived>,
    /// Connections made again after a link's first one (for metrics).
    reconnects: Arc<AtomicU64>,
}

impl DerpLinks {
    /// No connections yet; received packets arrive on the returned channel.
    pub fn new(key: NodeSecretKey) -> (Self, mpsc::Receiver<DerpReceived>) {
        let (received, rx) = mpsc::channel(1024);
        (
            Self {
                key,
                urls: BTreeMap::new(),
                links: BTreeMap::new(),
                home: None,
                received,
                reconnects: Arc::default(),
            },
            rx,
        )
    }

    /// The regions' servers, from the DERP map. Links to regions whose servers changed restart.
    pub fn set_urls(&mut self, urls: BTreeMap<u32, Vec<DerpUrl>>) {
        let changed: Vec<u32> = self
            .links
            .keys()
            .copied()
            .filter(|r| urls.get(r) != self.urls.get(r))
            .collect();
        for r in changed {
            if let Some(link) = self.links.remove(&r) {
                link.task.abort();
            }
        }
        self.urls = urls;
        if let Some(home) = self.home {
            self.link(home);
        }
    }

    /// The home region: its connection is kept open and marked preferred.
    pub fn set_home(&mut self, region: u32) {
        if let Some(old) = self.home.replace(region).filter(|old| *old != region)
            && let Some(link) = self.links.get(&old)
        {
            let _ = link.out.try_send(Out::Preferred(false));
        }
        if let Some(link) = self.link(region) {
            let _ = link.out.try_send(Out::Preferred(true));
        }
    }

    /// Whether the link to `region` is connected now (false when there is none yet, or it is
    /// between attempts: packets through it are queued or lost).
    pub fn is_up(&self, region: u32) -> bool {
        self.links.get(&region).is_some_and(|l| l.live().is_some())
    }

    /// Every link's region and whether it is connected now.
    pub fn links_up(&self) -> Vec<(u32, bool)> {
        self.links
            .iter()
            .map(|(r, l)| (*r, l.live().is_some()))
            .collect()
    }

    /// How many times a link connected again after its first connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Sends a packet to `peer` through `region`, connecting to it if needed.
    pub fn send(&mut self, region: u32, peer: NodePublicKey, packet: Vec<u8>) {
        let Some(link) = self.link(region) else {
            tracing::debug!(region, "no DERP server known for region");
            return;
        };
        let sent = match link.live() {
            Some(tx) => tx.try_send(peer, packet).map_err(|_| ()),
            None => link.out.try_send(Out::Packet(peer, packet)).map_err(|_| ()),
        };
        if sent.is_err() {
            tracing::trace!(region, "DERP link queue full or closing; packet dropped");
        }
    }

    fn link(&mut self, region: u32) -> Option<&Link> {
        if self
            .links
            .get(&region)
            .is_some_and(|l| l.task.is_finished())
        {
            self.links.remove(&region);
        }
        if !self.links.contains_key(&region) {
            let urls = self.urls.get(&region)?.clone();
            let (out, rx) = mpsc::channel(LINK_QUEUE);
            let live = Live::default();
            let preferred = self.home == Some(region);
            let task = tokio::spawn(run_link(
                region,
                urls,
                self.key.clone(),
                rx,
                live.clone(),
                self.received.clone(),
                preferred,
                Arc::clone(&self.reconnects),
            ));
            self.links.insert(region, Link { out, live, task });
        }
        self.links.get(&region)
    }

    /// Closes every connection.
    pub fn close(&mut self) {
        for (_, link) in std::mem::take(&mut self.links) {
            link.task.abort();
        }
    }
}

/// Keeps one region's connection up and moves packets both ways until the link is dropped.
#[expect(
    clippy::too_many_arguments,
    reason = "the link task's inputs, each used once; a struct would only rename them"
)]
async fn run_link(
    region: u32,
    urls: Vec<DerpUrl>,
    key: NodeSecretKey,
    mut out: mpsc::Receiver<Out>,
    live: Live,
    received: mpsc::Sender<DerpReceived>,
    mut preferred: bool,
    reconnects: Arc<AtomicU64>,
) {
    let set_live = |s: Option<ClientSender>| *live.lock().unwrap_or_else(|e| e.into_inner()) = s;
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    let mut first = true;
    let mut connected_before = false;
    loop {
        // Every attempt but the first waits, also after a connection that was lost: a server
        // that drops us at once (another holder of this key, say) is not hammered.
        if !std::mem::take(&mut first) {
            // Keep the queue moving meanwhile: stale packets are worthless later.
            let wait = tokio::time::sleep(backoff.next_wait(crate::random_u64()));
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    _ = &mut wait => break,
                    o = out.recv() => match o {
                        None => return,
                        Some(Out::Preferred(p)) => preferred = p,
                        Some(Out::Packet(..)) => {}
                    },
                }
            }
        }
        let mut client = None;
        for u in &urls {
            let options = ConnectOptions {
                insecure_skip_verify: u.insecure,
                dial: u.dial,
                // DERP must leave by the host's routes, never by the tunnel's table 52.
                mark: crate::os_net::own_socket_mark(),
                ..ConnectOptions::default()
            };
            match Client::connect(&u.url, &key, &options).await {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(e) => tracing::warn!(region, url = %u.url, error = %e, "DERP connect failed"),
            }
        }
        let Some(client) = client else {
            continue;
        };
        tracing::info!(region, preferred, "DERP connected");
        if std::mem::replace(&mut connected_before, true) {
            reconnects.fetch_add(1, Ordering::Relaxed);
        }
        let connected = tokio::time::Instant::now();
        let (tx, mut rx) = client.split();
        if preferred && tx.note_preferred(true).await.is_err() {
            continue;
        }
        // What waited for the connection goes first; from now on the daemon sends directly.
        // Packets it queued just before the switch are still taken from `out` below.
        while let Ok(o) = out.try_recv() {
            match o {
                Out::Packet(peer, packet) => {
                    let _ = tx.try_send(peer, packet);
                }
                Out::Preferred(p) => {
                    preferred = p;
                    let _ = tx.note_preferred(p).await;
                }
            }
        }
        set_live(Some(tx.clone()));
        loop {
            tokio::select! {
                o = out.recv() => match o {
                    None => return,
                    Some(Out::Packet(peer, packet)) => match tx.try_send(peer, packet) {
                        Err(ClientError::Closed) => {
                            tracing::warn!(region, "DERP writer stopped; reconnecting");
                            break;
                        }
                        Err(e) => tracing::trace!(region, error = %e, "DERP packet dropped"),
                        Ok(()) => {}
                    },
                    Some(Out::Preferred(p)) => {
                        preferred = p;
                        if tx.note_preferred(p).await.is_err() {
                            break;
                        }
                    }
                },
                ev = rx.recv() => match ev {
                    Ok(ClientEvent::RecvPacket { src, packet }) => {
                        if received.send(DerpReceived { region, from: src, packet }).await.is_err() {
                            return;
                        }
                    }
                    Ok(other) => tracing::trace!(region, event = ?other, "DERP event"),
                    Err(e) => {
                        tracing::warn!(region, error = %e, "DERP connection lost; reconnecting");
                        break;
                    }
                },
            }
        }
        set_live(None);
        // Only a connection that lasted starts the next attempts from the shortest wait.
        if connected.elapsed() >= MAX_BACKOFF {
            backoff.reset();
        }
    }
}
