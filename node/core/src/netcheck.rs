//! Netcheck: what the network looks like from this node, learned by sending STUN Binding
//! requests from the node's one UDP socket to every DERP region's STUN servers. It reports
//! whether UDP works, the global (NAT-mapped) endpoint, whether the mapping varies by
//! destination (a hard NAT), and the latency to each region; [`choose_home`] picks the home
//! region with hysteresis. Sans-IO: the node sends what [`Netcheck::start`] and
//! [`Netcheck::due`] return and feeds STUN responses to [`Netcheck::handle_response`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use warren_proto::stun;

/// A DERP region id; 0 means none.
pub type RegionId = u32;

/// Resend an unanswered request after this long.
pub const RETRANSMIT: Duration = Duration::from_millis(150);
/// Give up on the whole check after this long.
pub const GIVE_UP: Duration = Duration::from_secs(3);
/// Most requests per server.
pub const MAX_ATTEMPTS: u8 = 3;

/// A STUN server to probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StunServer {
    /// The region it belongs to.
    pub region: RegionId,
    /// Its address.
    pub addr: SocketAddr,
}

/// What a finished check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Some server answered over UDP.
    pub udp: bool,
    /// The address servers saw us at (the first answer's).
    pub global: Option<SocketAddr>,
    /// Two servers saw different mapped addresses: the NAT maps per destination (hard NAT).
    pub mapping_varies: bool,
    /// The fastest answer from each region.
    pub latency: BTreeMap<RegionId, Duration>,
}

#[derive(Debug, Clone)]
struct Probe {
    server: StunServer,
    tx_id: stun::TxId,
    last_sent: Instant,
    attempts: u8,
    answer: Option<(SocketAddr, Duration)>,
}

/// One check in progress.
#[derive(Debug, Clone)]
pub struct Netcheck {
    started: Instant,
    probes: Vec<Probe>,
}

fn request(tx_id: stun::TxId) -> Vec<u8> {
    let mut out = Vec::with_capacity(stun::request_len(Some(stun::SOFTWARE_TAILNODE)));
    stun::build_request(tx_id, Some(stun::SOFTWARE_TAILNODE), &mut out);
    out
}

impl Netcheck {
    /// Starts a check against `servers`; returns the requests to send now.
    pub fn start(
        servers: &[StunServer],
        now: Instant,
        mut tx_id: impl FnMut() -> stun::TxId,
    ) -> (Self, Vec<(SocketAddr, Vec<u8>)>) {
        let probes: Vec<Probe> = servers
            .iter()
            .map(|s| Probe {
                server: *s,
                tx_id: tx_id(),
                last_sent: now,
                attempts: 1,
                answer: None,
            })
            .collect();
        let out = probes
            .iter()
            .map(|p| (p.server.addr, request(p.tx_id)))
            .collect();
        (
            Self {
                started: now,
                probes,
            },
            out,
        )
    }

    /// A STUN response arrived from `from`; false when it was not one of ours.
    pub fn handle_response(&mut self, from: SocketAddr, datagram: &[u8], now: Instant) -> bool {
        let Ok((tx_id, mapped)) = stun::parse_response(datagram) else {
            return false;
        };
        let Some(p) = self
            .probes
            .iter_mut()
            .find(|p| p.tx_id == tx_id && p.server.addr == from)
        else {
            return false;
        };
        if p.answer.is_none() {
            // Time from the request this answers; a retransmit restarts the clock.
            p.answer = Some((mapped, now.saturating_duration_since(p.last_sent)));
        }
        true
    }

    /// Retransmissions due at `now`.
    pub fn due(&mut self, now: Instant) -> Vec<(SocketAddr, Vec<u8>)> {
        if self.is_done(now) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for p in &mut self.probes {
            if p.answer.is_none() && p.attempts < MAX_ATTEMPTS && now >= p.last_sent + RETRANSMIT {
                p.attempts += 1;
                p.last_sent = now;
                out.push((p.server.addr, request(p.tx_id)));
            }
        }
        out
    }

    /// When [`Self::due`] or [`Self::is_done`] changes next.
    pub fn next_timeout(&self) -> Instant {
        let retransmit = self
            .probes
            .iter()
            .filter(|p| p.answer.is_none() && p.attempts < MAX_ATTEMPTS)
            .map(|p| p.last_sent + RETRANSMIT)
            .min();
        retransmit
            .unwrap_or(self.started + GIVE_UP)
            .min(self.started + GIVE_UP)
    }

    /// Whether every server answered or time is up.
    pub fn is_done(&self, now: Instant) -> bool {
        now >= self.started + GIVE_UP || self.probes.iter().all(|p| p.answer.is_some())
    }

    /// The findings so far.
    pub fn report(&self) -> Report {
        let mut r = Report::default();
        for p in &self.probes {
            let Some((mapped, rtt)) = p.answer else {
                continue;
            };
            r.udp = true;
            match r.global {
                None => r.global = Some(mapped),
                Some(g) if g != mapped => r.mapping_varies = true,
                Some(_) => {}
            }
            let best = r.latency.entry(p.server.region).or_insert(rtt);
            *best = (*best).min(rtt);
        }
        r
    }
}

/// The home region: the fastest, except that the current one is kept unless the new one is at
/// least 10 ms and a third faster (so the home does not flap between similar regions).
pub fn choose_home(
    current: Option<RegionId>,
    latency: &BTreeMap<RegionId, Duration>,
) -> Option<RegionId> {
    let (best, best_rtt) = latency.iter().min_by_key(|(id, rtt)| (**rtt, **id))?;
    let Some(cur) = current else {
        return Some(*best);
    };
    let Some(cur_rtt) = latency.get(&cur) else {
        return Some(*best);
    };
    let much_faster =
        *best_rtt + Duration::from_millis(10) <= *cur_rtt && *best_rtt * 3 <= *cur_rtt * 2;
    Some(if much_faster { *best } else { cur })
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn response(tx: stun::TxId, mapped: &str) -> Vec<u8> {
        let mut out = Vec::new();
        stun::build_response(tx, mapped.parse().expect("addr"), &mut out);
        out
    }

    fn servers() -> Vec<StunServer> {
        vec![
            StunServer {
                region: 900,
                addr: "203.0.113.10:3478".parse().expect("addr"),
            },
            StunServer {
                region: 900,
                addr: "203.0.113.11:3478".parse().expect("addr"),
            },
            StunServer {
                region: 901,
                addr: "198.51.100.5:3478".parse().expect("addr"),
            },
        ]
    }

    fn ids() -> impl FnMut() -> stun::TxId {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; 12]
        }
    }

    #[test]
    fn easy_nat_report() {
        let t0 = Instant::now();
        let (mut nc, out) = Netcheck::start(&servers(), t0, ids());
        assert_eq!(out.len(), 3);
        let ms = Duration::from_millis;
        assert!(nc.handle_response(
            servers()[0].addr,
            &response([1; 12], "192.0.2.7:41641"),
            t0 + ms(20)
        ));
        assert!(nc.handle_response(
            servers()[1].addr,
            &response([2; 12], "192.0.2.7:41641"),
            t0 + ms(25)
        ));
        // An answer from a server that was not asked that question is not ours.
        assert!(!nc.handle_response(
            servers()[0].addr,
            &response([3; 12], "192.0.2.7:1"),
            t0 + ms(26)
        ));
        assert!(!nc.handle_response(servers()[0].addr, b"garbage", t0 + ms(26)));
        assert!(!nc.is_done(t0 + ms(30)));
        let again = nc.due(t0 + RETRANSMIT);
        assert_eq!(again.len(), 1, "only the silent server is asked again");
        assert!(nc.handle_response(
            servers()[2].addr,
            &response([3; 12], "192.0.2.7:41641"),
            t0 + RETRANSMIT + ms(60)
        ));
        assert!(nc.is_done(t0 + ms(300)));
        let r = nc.report();
        assert!(r.udp && !r.mapping_varies);
        assert_eq!(r.global, Some("192.0.2.7:41641".parse().expect("addr")));
        assert_eq!(r.latency[&900], ms(20));
        assert_eq!(r.latency[&901], ms(60));
    }

    #[test]
    fn hard_nat_and_no_udp() {
        let t0 = Instant::now();
        let (mut nc, _) = Netcheck::start(&servers(), t0, ids());
        nc.handle_response(servers()[0].addr, &response([1; 12], "192.0.2.7:1000"), t0);
        nc.handle_response(servers()[1].addr, &response([2; 12], "192.0.2.7:2000"), t0);
        assert!(nc.report().mapping_varies);

        let (mut silent, _) = Netcheck::start(&servers(), t0, ids());
        let mut sent = 0;
        let mut now = t0;
        while !silent.is_done(now) {
            now = silent.next_timeout();
            sent += silent.due(now).len();
        }
        assert_eq!(sent, 3 * (MAX_ATTEMPTS as usize - 1));
        assert_eq!(silent.report(), Report::default());
    }

    #[test]
    fn home_region_hysteresis() {
        let ms = Duration::from_millis;
        let lat = |a: u64, b: u64| BTreeMap::from([(900, ms(a)), (901, ms(b))]);
        assert_eq!(choose_home(None, &lat(30, 20)), Some(901));
        assert_eq!(
            choose_home(Some(900), &lat(30, 21)),
            Some(900),
            "9 ms faster is not enough"
        );
        assert_eq!(
            choose_home(Some(900), &lat(60, 45)),
            Some(900),
            "15 ms but not a third"
        );
        assert_eq!(choose_home(Some(900), &lat(30, 15)), Some(901));
        assert_eq!(
            choose_home(Some(902), &lat(30, 40)),
            Some(900),
            "current region gone"
        );
        assert_eq!(choose_home(Some(900), &BTreeMap::new()), None);
    }
}
