//! Prometheus metrics for `warren up --metrics-listen ADDR`: per-peer traffic, path and
//! handshakes, filter drops, DERP reconnects and MagicDNS outcomes.
//!
//! The sans-IO core keeps counters of its own ([`Node::peer_stats`], [`Node::dns_stats`]) and
//! knows nothing of metrics. The daemon loop samples them once a [`SAMPLE_EVERY`] into a
//! [`Sampler`], which publishes a [`Snapshot`]; a scrape renders the latest snapshot into a
//! fresh recorder, so a peer that left the netmap leaves the output too (the series stay bounded
//! by the peer count).
//!
//! [`Node::peer_stats`]: warren_node_core::Node::peer_stats
//! [`Node::dns_stats`]: warren_node_core::Node::dns_stats

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, describe_counter, describe_gauge, gauge};
use tokio::sync::watch;
use warren_node_core::PathStatus;
use warren_node_core::dns::DnsStats;
use warren_node_core::node::PeerStats;
use warren_proto::NodePublicKey;

/// How often the daemon samples the core's counters for metrics.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// A handshake is counted when the last one moved later by more than this: the core reports
/// the time since the last handshake with timer granularity, and WireGuard handshakes at most
/// every few seconds (rekeys every 2 minutes).
const HANDSHAKE_JITTER: Duration = Duration::from_secs(1);

/// Every `path` label of `warren_node_peer_path`.
pub const PATHS: [&str; 4] = ["direct", "relay", "trying", "unreachable"];

/// One peer at a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSample {
    /// The `peer` label: its name in the netmap (its short key when it has none).
    pub name: String,
    /// Bytes of the IP packets received from it through the tunnel (after decryption, as the
    /// WireGuard session counts them).
    pub rx_bytes: u64,
    /// Bytes of the IP packets sent to it through the tunnel (before encryption).
    pub tx_bytes: u64,
    /// One of [`PATHS`].
    pub path: &'static str,
    /// The last round trip on a direct path.
    pub latency: Option<Duration>,
    /// Handshakes completed since the daemon started (see [`Sampler`]).
    pub handshakes: u64,
    /// Its packets dropped by the packet filter.
    pub filter_drops: u64,
}

/// What a scrape shows: the latest sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Peers, in key order.
    pub peers: Vec<PeerSample>,
    /// MagicDNS counters.
    pub dns: DnsStats,
    /// DERP connections made again after a link's first one.
    pub derp_reconnects: u64,
    /// Each DERP link (region) and whether it is connected.
    pub derp_links: Vec<(u32, bool)>,
    /// The data path's TUN figures.
    pub data: crate::datapath::DataStats,
}

/// Turns the core's counters into snapshots, counting handshakes from the movement of each
/// peer's last-handshake time.
#[derive(Debug)]
pub struct Sampler {
    /// Per peer: when its last handshake was (as far as we know) and how many we counted.
    handshakes: BTreeMap<NodePublicKey, (Option<Instant>, u64)>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Sampler {
    /// A sampler and the receiver a metrics listener reads from.
    pub fn new() -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        (
            Self {
                handshakes: BTreeMap::new(),
                tx,
            },
            rx,
        )
    }

    /// Publishes a snapshot of `peers` (from [`Node::peer_stats`] at `now`) and the rest.
    ///
    /// [`Node::peer_stats`]: warren_node_core::Node::peer_stats
    pub fn sample(
        &mut self,
        peers: Vec<PeerStats>,
        dns: DnsStats,
        derp_reconnects: u64,
        derp_links: Vec<(u32, bool)>,
        data: crate::datapath::DataStats,
        now: Instant,
    ) {
        let mut seen = BTreeMap::new();
        let peers = peers
            .into_iter()
            .map(|p| {
                let at = p.session.since_handshake.and_then(|d| now.checked_sub(d));
                let (last, mut count) = self.handshakes.remove(&p.key).unwrap_or((None, 0));
                let newer = match (last, at) {
                    (None, Some(_)) => true,
                    (Some(last), Some(at)) => at > last + HANDSHAKE_JITTER,
                    (_, None) => false,
                };
                if newer {
                    count += 1;
                }
                seen.insert(p.key, (if newer { at } else { last.or(at) }, count));
                PeerSample {
                    name: if p.name.is_empty() {
                        p.key.short().to_string()
                    } else {
                        p.name
                    },
                    rx_bytes: p.session.rx_bytes,
                    tx_bytes: p.session.tx_bytes,
                    path: path_label(&p.status),
                    latency: p.status.latency(),
                    handshakes: count,
                    filter_drops: p.filter_drops,
                }
            })
            .collect();
        // Peers no longer in the netmap are forgotten.
        self.handshakes = seen;
        self.tx.send_replace(Arc::new(Snapshot {
            peers,
            dns,
            derp_reconnects,
            derp_links,
            data,
        }));
    }
}

/// The `path` label of a peer's status.
pub fn path_label(status: &PathStatus) -> &'static str {
    match status {
        PathStatus::Direct { .. } => "direct",
        PathStatus::Relay { .. } => "relay",
        PathStatus::Trying { .. } => "trying",
        PathStatus::Unreachable => "unreachable",
    }
}

/// The exposition text of `s` (names in the README's metrics table).
pub fn render(s: &Snapshot) -> String {
    warren_derp::metrics::snapshot(|| {
        describe_gauge!("warren_node_peers", "Peers in the netmap.");
        gauge!("warren_node_peers").set(s.peers.len() as f64);
        describe_counter!(
            "warren_node_peer_rx_bytes_total",
            "Bytes of IP packets received from the peer through the tunnel (decrypted)."
        );
        describe_counter!(
            "warren_node_peer_tx_bytes_total",
            "Bytes of IP packets sent to the peer through the tunnel (before encryption)."
        );
        describe_gauge!(
            "warren_node_peer_path",
            "1 for the path the peer's traffic takes now (direct, relay, trying, unreachable)."
        );
        describe_gauge!(
            "warren_node_peer_latency_seconds",
            "Round trip of the last disco ping on the peer's direct path."
        );
        describe_counter!(
            "warren_node_peer_handshakes_total",
            "WireGuard handshakes completed with the peer."
        );
        describe_counter!(
            "warren_node_peer_filter_drops_total",
            "The peer's packets dropped by the packet filter."
        );
        for p in &s.peers {
            let peer = p.name.clone();
            counter!("warren_node_peer_rx_bytes_total", "peer" => peer.clone())
                .absolute(p.rx_bytes);
            counter!("warren_node_peer_tx_bytes_total", "peer" => peer.clone())
                .absolute(p.tx_bytes);
            for path in PATHS {
                gauge!("warren_node_peer_path", "peer" => peer.clone(), "path" => path)
                    .set(if path == p.path { 1.0 } else { 0.0 });
            }
            if let Some(latency) = p.latency {
                gauge!("warren_node_peer_latency_seconds", "peer" => peer.clone())
                    .set(latency.as_secs_f64());
            }
            counter!("warren_node_peer_handshakes_total", "peer" => peer.clone())
                .absolute(p.handshakes);
            counter!("warren_node_peer_filter_drops_total", "peer" => peer)
                .absolute(p.filter_drops);
        }
        describe_counter!(
            "warren_node_derp_reconnects_total",
            "DERP connections made again after a link's first one."
        );
        counter!("warren_node_derp_reconnects_total").absolute(s.derp_reconnects);
        describe_gauge!(
            "warren_node_derp_connected",
            "1 while the DERP link to the region is connected."
        );
        for (region, up) in &s.derp_links {
            gauge!("warren_node_derp_connected", "region" => region.to_string()).set(if *up {
                1.0
            } else {
                0.0
            });
        }
        describe_gauge!(
            "warren_node_tun_offload",
            "1 when the TUN device has offload (TSO segments in, GRO-coalesced writes out)."
        );
        gauge!("warren_node_tun_offload").set(if s.data.offload { 1.0 } else { 0.0 });
        describe_gauge!(
            "warren_node_tun_largest_read_bytes",
            "Most bytes of IP packets one TUN read returned (a whole TSO segment with offload)."
        );
        gauge!("warren_node_tun_largest_read_bytes").set(s.data.largest_read as f64);
        describe_gauge!(
            "warren_node_tun_largest_write_bytes",
            "Most bytes one TUN write carried (a GRO-coalesced packet with offload)."
        );
        gauge!("warren_node_tun_largest_write_bytes").set(s.data.largest_write as f64);
        describe_counter!(
            "warren_node_dns_queries_total",
            "MagicDNS queries by outcome: answered locally, forwarded upstream, SERVFAIL \
             (upstream timed out), no upstream, FORMERR, dropped at a cap."
        );
        let d = &s.dns;
        for (result, n) in [
            ("answered_locally", d.answered_locally),
            ("forwarded", d.forwarded),
            ("servfail", d.servfail),
            ("no_upstream", d.no_upstream),
            ("formerr", d.formerr),
            ("dropped", d.dropped),
        ] {
            counter!("warren_node_dns_queries_total", "result" => result).absolute(n);
        }
    })
}

/// A [`warren_derp::metrics::Render`] of the latest snapshot in `rx`.
pub fn render_from(rx: watch::Receiver<Arc<Snapshot>>) -> warren_derp::metrics::Render {
    Arc::new(move || {
        let snapshot = Arc::clone(&rx.borrow());
        Box::pin(async move { render(&snapshot) })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_node_core::wg::SessionStats;
    use warren_proto::NodeSecretKey;

    fn peer(key: NodePublicKey, since: Option<Duration>, rx: u64) -> PeerStats {
        PeerStats {
            key,
            name: "b".into(),
            allowed_ips: Vec::new(),
            routes: Vec::new(),
            exit_node: false,
            status: PathStatus::Unreachable,
            session: SessionStats {
                since_handshake: since,
                tx_bytes: 0,
                rx_bytes: rx,
            },
            filter_drops: 0,
        }
    }

    #[test]
    fn handshakes_are_counted_when_the_last_one_moves_later() {
        let key = NodeSecretKey::generate().public_key();
        let (mut s, rx) = Sampler::new();
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut step = |now: Instant, since: Option<Duration>| {
            s.sample(
                vec![peer(key, since, 7)],
                DnsStats::default(),
                0,
                Vec::new(),
                Default::default(),
                now,
            );
            rx.borrow().peers[0].handshakes
        };
        assert_eq!(step(at(100), None), 0);
        // First handshake at 100 s.
        assert_eq!(step(at(101), Some(Duration::from_secs(1))), 1);
        // The same handshake seen later, with timer jitter: not counted again.
        assert_eq!(step(at(110), Some(Duration::from_millis(10_300))), 1);
        // A rekey at 220 s.
        assert_eq!(step(at(221), Some(Duration::from_secs(1))), 2);
        // The session expires, then a new handshake at 400 s.
        assert_eq!(step(at(390), None), 2);
        assert_eq!(step(at(401), Some(Duration::from_secs(1))), 3);
    }

    #[test]
    fn render_has_every_peer_series_and_the_dns_outcomes() {
        let key = NodeSecretKey::generate().public_key();
        let (mut s, rx) = Sampler::new();
        let now = Instant::now();
        let dns = DnsStats {
            answered_locally: 3,
            forwarded: 2,
            servfail: 1,
            ..DnsStats::default()
        };
        s.sample(
            vec![peer(key, Some(Duration::from_secs(1)), 1234)],
            dns,
            5,
            vec![(900, true)],
            crate::datapath::DataStats {
                offload: true,
                largest_read: 65_160,
                largest_write: 64_000,
            },
            now,
        );
        let text = render(&rx.borrow());
        let m = warren_derp::metrics::parse_exposition(&text);
        let expect = [
            ("warren_node_peers", 1.0),
            ("warren_node_peer_rx_bytes_total{peer=\"b\"}", 1234.0),
            ("warren_node_peer_tx_bytes_total{peer=\"b\"}", 0.0),
            ("warren_node_peer_handshakes_total{peer=\"b\"}", 1.0),
            ("warren_node_peer_filter_drops_total{peer=\"b\"}", 0.0),
            (
                "warren_node_peer_path{path=\"unreachable\",peer=\"b\"}",
                1.0,
            ),
            ("warren_node_peer_path{path=\"direct\",peer=\"b\"}", 0.0),
            ("warren_node_derp_reconnects_total", 5.0),
            ("warren_node_derp_connected{region=\"900\"}", 1.0),
            (
                "warren_node_dns_queries_total{result=\"answered_locally\"}",
                3.0,
            ),
            ("warren_node_dns_queries_total{result=\"forwarded\"}", 2.0),
            ("warren_node_dns_queries_total{result=\"servfail\"}", 1.0),
            ("warren_node_tun_offload", 1.0),
            ("warren_node_tun_largest_read_bytes", 65_160.0),
            ("warren_node_tun_largest_write_bytes", 64_000.0),
        ];
        for (series, value) in expect {
            assert_eq!(m.get(series), Some(&value), "{series} in {text}");
        }
    }

    #[test]
    fn every_documented_node_metric_is_rendered_and_no_other() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
            .expect("README");
        let documented: std::collections::BTreeSet<(String, String)> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `warren_node_"))
            .map(|rest| {
                let (name, rest) = rest.split_once('`').expect("backtick");
                let kind = rest.split('|').nth(1).expect("type column").trim();
                (format!("warren_node_{name}"), kind.to_owned())
            })
            .collect();
        assert!(documented.len() >= 8, "{documented:?}");
        let key = NodeSecretKey::generate().public_key();
        let (mut s, rx) = Sampler::new();
        let mut p = peer(key, Some(Duration::from_secs(1)), 1);
        p.status = PathStatus::Direct {
            addr: "192.0.2.1:41641".parse().expect("addr"),
            latency: Duration::from_millis(2),
        };
        s.sample(
            vec![p],
            DnsStats::default(),
            0,
            vec![(1, true)],
            Default::default(),
            Instant::now(),
        );
        let rendered: std::collections::BTreeSet<(String, String)> = render(&rx.borrow())
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, k)| (n.to_owned(), k.to_owned()))
            .collect();
        assert_eq!(rendered, documented);
    }
}
