//! Path selection for one peer: which of its candidate addresses answers disco pings, how fast,
//! and whether that direct path can be trusted right now. Packets go direct while it is
//! trusted and through the peer's DERP region otherwise (and direct as well, in case it works
//! again). Pure state: every method takes `now`; transaction ids come from the caller.
//!
//! Timers are Tailscale's (PROTOCOLS.md section 3) with one addition: a heartbeat that has had
//! no answer for [`MISSED_HEARTBEAT`] ends trust at once instead of waiting for the 6.5 s trust
//! window to run out. With 3 s heartbeats that bounds the switch to DERP at 5 s after the last
//! pong, whatever the phase of the failure, which is what a TCP transfer needs to survive.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// A disco transaction id.
pub type TxId = [u8; 12];

/// Ping the best direct path this often while the session is active.
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// A direct path is trusted this long after its last pong.
pub const TRUST: Duration = Duration::from_millis(6_500);
/// A heartbeat unanswered this long ends trust early.
pub const MISSED_HEARTBEAT: Duration = Duration::from_secs(2);
/// Without data sent for this long the session is idle: no more heartbeats.
pub const SESSION_ACTIVE: Duration = Duration::from_secs(45);
/// While a direct path works, look for a better one this often.
pub const REPROBE: Duration = Duration::from_secs(60);
/// At or below this round trip, stop looking for better.
pub const GOOD_ENOUGH: Duration = Duration::from_millis(5);
/// A ping without a pong after this long is given up.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// At most one full discovery round (pings to every candidate, CallMeMaybe) this often.
pub const DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);
/// While relaying, keep sending directly too for this long after the direct path's last pong.
pub const DIRECT_GRACE: Duration = Duration::from_secs(13);
/// Most candidates kept per peer (reported plus learned). When full, a new one replaces the
/// learned candidate heard from least recently (never a reported one or the best path).
pub const MAX_CANDIDATES: usize = 32;
/// A learned candidate (from a ping, a CallMeMaybe or WireGuard) not heard from for this
/// long is forgotten, so a long-lived peer keeps learning new NAT mappings (Tailscale drops
/// ping-learned endpoints after its 45 s session timeout too). Reported ones stay while
/// control reports them; the best path stays as long as it is the best.
pub const LEARNED_EXPIRY: Duration = Duration::from_secs(45);

/// How a candidate address became known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The peer reported it through control.
    Reported,
    /// It came in a CallMeMaybe over DERP.
    CallMeMaybe,
    /// A ping arrived from it (peer-reflexive).
    Reflexive,
}

#[derive(Debug, Clone)]
struct Candidate {
    origin: Origin,
    /// When it was last added, re-announced, or sent us a ping or a pong.
    heard: Instant,
    last_ping: Option<Instant>,
    last_pong: Option<Instant>,
    rtt: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Best {
    addr: SocketAddr,
    rtt: Duration,
    last_pong: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    to: SocketAddr,
    sent: Instant,
    heartbeat: bool,
}

/// Where a datagram for the peer goes now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A trusted direct path.
    Direct(SocketAddr),
    /// Through DERP, and also to a direct path that is not trusted (yet, or any more).
    Relay {
        /// The untrusted direct path, if there is one.
        also_direct: Option<SocketAddr>,
    },
    /// No DERP for this peer and nothing confirmed: try these addresses, the one WireGuard
    /// last heard the peer from first.
    Spray(Vec<SocketAddr>),
}

/// A ping the caller must send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PingOut {
    /// Its transaction id.
    pub tx_id: TxId,
    /// Where to send it.
    pub to: SocketAddr,
}

/// What a pong did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PongResult {
    /// The address that answered.
    pub addr: SocketAddr,
    /// Its round trip.
    pub rtt: Duration,
    /// Whether it is now the best path (and was not before).
    pub new_best: bool,
}

/// Candidate paths to one peer.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    candidates: BTreeMap<SocketAddr, Candidate>,
    best: Option<Best>,
    pending: BTreeMap<TxId, Pending>,
    last_discovery: Option<Instant>,
    last_active: Option<Instant>,
    last_heartbeat: Option<Instant>,
    last_reprobe: Option<Instant>,
    /// Where the peer's last authenticated WireGuard datagram came from.
    wg_from: Option<SocketAddr>,
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Whether `new` should replace `cur`: clearly faster, or as fast and on a preferred kind of
/// address (private/LAN, then IPv6). Small differences keep the current path, so it does not flap.
fn better(new: (SocketAddr, Duration), cur: (SocketAddr, Duration)) -> bool {
    let (n_addr, n_rtt) = new;
    let (c_addr, c_rtt) = cur;
    if n_rtt * 10 < c_rtt * 9 {
        return true;
    }
    if n_rtt > c_rtt + c_rtt / 10 + Duration::from_micros(100) {
        return false;
    }
    let rank = |a: SocketAddr| (is_private(a.ip()), a.is_ipv6());
    rank(n_addr) > rank(c_addr)
}

impl Paths {
    /// The best direct path and its round trip, trusted or not.
    pub fn best(&self) -> Option<(SocketAddr, Duration)> {
        self.best.map(|b| (b.addr, b.rtt))
    }

    /// Every candidate address, in order.
    pub fn candidates(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.candidates.keys().copied()
    }

    /// Learns `addr` (or notes that it was heard from again). Returns whether it is new.
    fn add(&mut self, addr: SocketAddr, origin: Origin, now: Instant) -> bool {
        if let Some(c) = self.candidates.get_mut(&addr) {
            c.heard = c.heard.max(now);
            return false;
        }
        self.expire(now);
        if self.candidates.len() >= MAX_CANDIDATES {
            let best = self.best.map(|b| b.addr);
            let victim = self
                .candidates
                .iter()
                .filter(|(a, c)| c.origin != Origin::Reported && Some(**a) != best)
                .min_by_key(|(_, c)| c.heard)
                .map(|(a, _)| *a);
            let Some(victim) = victim else {
                return false;
            };
            self.candidates.remove(&victim);
            tracing::debug!(%victim, new = %addr, "disco: candidate replaced");
        }
        self.candidates.insert(
            addr,
            Candidate {
                origin,
                heard: now,
                last_ping: None,
                last_pong: None,
                rtt: None,
            },
        );
        true
    }

    /// Forgets learned candidates not heard from for [`LEARNED_EXPIRY`], except the best path.
    fn expire(&mut self, now: Instant) {
        let best = self.best.map(|b| b.addr);
        self.candidates.retain(|a, c| {
            c.origin == Origin::Reported || Some(*a) == best || now < c.heard + LEARNED_EXPIRY
        });
    }

    /// Replaces the reported candidates; learned ones stay.
    pub fn set_reported(&mut self, endpoints: &[SocketAddr], now: Instant) {
        self.candidates
            .retain(|a, c| c.origin != Origin::Reported || endpoints.contains(a));
        let mut added = false;
        for e in endpoints {
            if let Some(c) = self.candidates.get_mut(e) {
                c.origin = Origin::Reported;
            } else {
                added |= self.add(*e, Origin::Reported, now);
            }
        }
        if added {
            // New places to try: the next packet runs discovery at once, not 5 s later.
            self.rediscover();
        }
        if self
            .best
            .is_some_and(|b| !self.candidates.contains_key(&b.addr))
        {
            self.best = None;
        }
    }

    /// Lets the next [`Self::wants_discovery`] say yes at once (new candidates, or a new way
    /// to reach the peer for CallMeMaybe).
    pub fn rediscover(&mut self) {
        self.last_discovery = None;
    }

    /// Whether the direct path can carry traffic alone now.
    pub fn trusted(&self, now: Instant) -> bool {
        let Some(best) = self.best else { return false };
        if now >= best.last_pong + TRUST {
            return false;
        }
        // A heartbeat to it that went unanswered ends trust early.
        !self.pending.values().any(|p| {
            p.heartbeat
                && p.to == best.addr
                && p.sent > best.last_pong
                && now >= p.sent + MISSED_HEARTBEAT
        })
    }

    /// Where to send now; `relay` says whether the peer can be reached through DERP.
    pub fn route(&self, now: Instant, relay: bool) -> Route {
        if let Some(b) = self.best.filter(|_| self.trusted(now)) {
            return Route::Direct(b.addr);
        }
        if relay {
            // A direct path that answered recently may be back any moment: keep trying it
            // beside DERP. One silent for longer is left to discovery's pings, so a dead path
            // does not double every packet's cost for the rest of the session.
            let recent = |b: &Best| now < b.last_pong + DIRECT_GRACE;
            return Route::Relay {
                also_direct: self.best.filter(recent).map(|b| b.addr),
            };
        }
        match self.best {
            Some(b) => Route::Spray(vec![b.addr]),
            None => {
                // Where WireGuard last heard the peer goes first (data goes only there).
                let heard = self.wg_from.filter(|a| self.candidates.contains_key(a));
                let rest = self
                    .candidates
                    .keys()
                    .copied()
                    .filter(|a| Some(*a) != heard);
                Route::Spray(heard.into_iter().chain(rest).collect())
            }
        }
    }

    /// A WireGuard datagram from the peer came from `from` and was authenticated: until a
    /// path is confirmed, [`Self::route`] sends there first (as WireGuard's own roaming does).
    pub fn note_wg_from(&mut self, from: SocketAddr, now: Instant) {
        self.wg_from = Some(from);
        // Also refreshes a known candidate: a learned address the peer keeps sending from
        // must not expire under it.
        self.add(from, Origin::Reflexive, now);
    }

    /// Records that data was sent to the peer (keeps the session active).
    pub fn note_sent(&mut self, now: Instant) {
        self.last_active = Some(now);
    }

    fn active(&self, now: Instant) -> bool {
        self.last_active.is_some_and(|t| now < t + SESSION_ACTIVE)
    }

    /// Whether a discovery round (pings to all, CallMeMaybe) is due: the direct path is not
    /// trusted and the last round is older than [`DISCOVERY_INTERVAL`].
    pub fn wants_discovery(&self, now: Instant) -> bool {
        !self.trusted(now)
            && self
                .last_discovery
                .is_none_or(|t| now >= t + DISCOVERY_INTERVAL)
    }

    fn ping(&mut self, to: SocketAddr, now: Instant, heartbeat: bool, tx_id: TxId) -> PingOut {
        self.pending.insert(
            tx_id,
            Pending {
                to,
                sent: now,
                heartbeat,
            },
        );
        if let Some(c) = self.candidates.get_mut(&to) {
            c.last_ping = Some(now);
        }
        PingOut { tx_id, to }
    }

    /// Records a ping the caller sends to `to` for its own reasons (`warren ping`), so its pong
    /// counts like any other.
    pub fn track_ping(&mut self, to: SocketAddr, now: Instant, tx_id: TxId) -> PingOut {
        self.ping(to, now, false, tx_id)
    }

    /// Starts a discovery round: one ping to every candidate.
    pub fn discover(&mut self, now: Instant, mut tx_id: impl FnMut() -> TxId) -> Vec<PingOut> {
        self.last_discovery = Some(now);
        self.expire(now);
        let addrs: Vec<SocketAddr> = self.candidates.keys().copied().collect();
        addrs
            .into_iter()
            .map(|a| self.ping(a, now, false, tx_id()))
            .collect()
    }

    /// Pings due at `now`: the heartbeat to the best path, and a re-probe of every candidate
    /// while the best is slower than [`GOOD_ENOUGH`].
    pub fn due_pings(&mut self, now: Instant, mut tx_id: impl FnMut() -> TxId) -> Vec<PingOut> {
        self.pending.retain(|_, p| now < p.sent + PING_TIMEOUT);
        self.expire(now);
        let mut out = Vec::new();
        if !self.active(now) {
            return out;
        }
        let Some(best) = self.best else { return out };
        if self.last_heartbeat.is_none_or(|t| now >= t + HEARTBEAT) {
            self.last_heartbeat = Some(now);
            out.push(self.ping(best.addr, now, true, tx_id()));
        }
        if self.trusted(now)
            && best.rtt > GOOD_ENOUGH
            && self.last_reprobe.is_none_or(|t| now >= t + REPROBE)
        {
            self.last_reprobe = Some(now);
            let others: Vec<SocketAddr> = self
                .candidates
                .keys()
                .copied()
                .filter(|a| *a != best.addr)
                .collect();
            out.extend(
                others
                    .into_iter()
                    .map(|a| self.ping(a, now, false, tx_id())),
            );
        }
        out
    }

    /// When [`Self::due_pings`] has something to do next, if anything.
    pub fn next_timeout(&self, now: Instant) -> Option<Instant> {
        let heartbeat = (self.active(now) && self.best.is_some())
            .then(|| self.last_heartbeat.map_or(now, |t| t + HEARTBEAT));
        let expiry = self.pending.values().map(|p| p.sent + PING_TIMEOUT).min();
        // Trust can end early through a missed heartbeat: wake up then to re-route.
        let missed = self
            .pending
            .values()
            .filter(|p| p.heartbeat)
            .map(|p| p.sent + MISSED_HEARTBEAT)
            .filter(|t| *t > now)
            .min();
        [heartbeat, expiry, missed].into_iter().flatten().min()
    }

    /// A pong arrived from `from` for `tx_id`. Pongs for unknown transactions, or from another
    /// address than the one pinged, are ignored.
    pub fn handle_pong(
        &mut self,
        tx_id: TxId,
        from: SocketAddr,
        now: Instant,
    ) -> Option<PongResult> {
        let p = self.pending.get(&tx_id).filter(|p| p.to == from)?;
        let rtt = now.saturating_duration_since(p.sent);
        self.pending.remove(&tx_id);
        if let Some(c) = self.candidates.get_mut(&from) {
            c.last_pong = Some(now);
            c.heard = c.heard.max(now);
            c.rtt = Some(rtt);
        } else {
            return None;
        }
        if self.best.is_none_or(|b| b.addr == from) {
            // A pong from the best path is as good as a heartbeat: the next is due 3 s later.
            self.last_heartbeat = Some(now);
        }
        let new_best = match self.best {
            Some(b) if b.addr == from => {
                self.best = Some(Best {
                    addr: from,
                    rtt,
                    last_pong: now,
                });
                false
            }
            Some(b) if self.trusted(now) && !better((from, rtt), (b.addr, b.rtt)) => false,
            _ => {
                self.best = Some(Best {
                    addr: from,
                    rtt,
                    last_pong: now,
                });
                true
            }
        };
        Some(PongResult {
            addr: from,
            rtt,
            new_best,
        })
    }

    /// A ping arrived directly from `from`: learn it as a candidate. Returns a ping to send
    /// back (beside the pong), which opens our side of a NAT or firewall and lets our side
    /// confirm the path too.
    ///
    /// While `from` is unconfirmed (no pong from it within [`TRUST`]) the answer is a ping at
    /// once, however recently we pinged it: our earlier ping may have died at the peer's
    /// firewall before the peer's own ping opened it, and this ping proves it is open now.
    /// Waiting out the rate limit cost a heartbeat (3 s) to go direct. This cannot loop: the
    /// peer gets our pong before our ping, so the ping finds its side confirmed. A confirmed
    /// candidate is pinged back only when not pinged for a [`HEARTBEAT`] and not the trusted
    /// best path.
    pub fn handle_ping_from(
        &mut self,
        from: SocketAddr,
        now: Instant,
        tx_id: impl FnOnce() -> TxId,
    ) -> Option<PingOut> {
        self.add(from, Origin::Reflexive, now);
        let c = self.candidates.get(&from)?;
        let confirmed = c.last_pong.is_some_and(|t| now < t + TRUST);
        if confirmed {
            let recent = c.last_ping.is_some_and(|t| now < t + HEARTBEAT);
            let known_good = self.best.is_some_and(|b| b.addr == from) && self.trusted(now);
            if recent || known_good {
                return None;
            }
        }
        Some(self.ping(from, now, false, tx_id()))
    }

    /// The peer asked us (over DERP) to ping these endpoints of its own.
    pub fn handle_call_me_maybe(
        &mut self,
        endpoints: &[SocketAddr],
        now: Instant,
        mut tx_id: impl FnMut() -> TxId,
    ) -> Vec<PingOut> {
        for e in endpoints {
            self.add(*e, Origin::CallMeMaybe, now);
        }
        let targets: Vec<SocketAddr> = endpoints
            .iter()
            .copied()
            .filter(|e| self.candidates.contains_key(e))
            .collect();
        targets
            .into_iter()
            .map(|a| self.ping(a, now, false, tx_id()))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    fn ids() -> impl FnMut() -> TxId {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; 12]
        }
    }

    #[test]
    fn pong_makes_a_trusted_direct_path_that_expires() {
        let t0 = Instant::now();
        let mut p = Paths::default();
        let a = addr("198.51.100.1:41641");
        p.set_reported(&[a], t0);
        assert_eq!(p.route(t0, true), Route::Relay { also_direct: None });
        assert!(p.wants_discovery(t0));
        let pings = p.discover(t0, ids());
        assert_eq!(pings.len(), 1);
        assert!(
            !p.wants_discovery(t0 + Duration::from_secs(1)),
            "rate limited"
        );
        let r = p
            .handle_pong(pings[0].tx_id, a, t0 + Duration::from_millis(20))
            .expect("matched");
        assert!(r.new_best);
        assert_eq!(r.rtt, Duration::from_millis(20));
        assert_eq!(p.route(t0 + Duration::from_secs(1), true), Route::Direct(a));
        let late = t0 + Duration::from_millis(20) + TRUST;
        assert_eq!(
            p.route(late, true),
            Route::Relay {
                also_direct: Some(a)
            }
        );
        let dead = t0 + Duration::from_millis(20) + DIRECT_GRACE;
        assert_eq!(
            p.route(dead, true),
            Route::Relay { also_direct: None },
            "long silent: DERP only"
        );
    }

    #[test]
    fn pongs_from_elsewhere_or_unknown_are_ignored() {
        let t0 = Instant::now();
        let mut p = Paths::default();
        let a = addr("198.51.100.1:1");
        p.set_reported(&[a], t0);
        let pings = p.discover(t0, ids());
        assert!(
            p.handle_pong(pings[0].tx_id, addr("203.0.113.9:1"), t0)
                .is_none()
        );
        assert!(p.handle_pong([99; 12], a, t0).is_none());
        assert!(!p.trusted(t0));
    }

    #[test]
    fn missed_heartbeat_ends_trust_within_five_seconds_of_the_last_pong() {
        let t0 = Instant::now();
        let mut p = Paths::default();
        let a = addr("198.51.100.1:1");
        p.set_reported(&[a], t0);
        let mut next_id = ids();
        p.note_sent(t0);
        let ping = p.discover(t0, &mut next_id)[0];
        p.handle_pong(ping.tx_id, a, t0).expect("pong");
        // The path dies right after that pong; data keeps flowing.
        let mut now = t0;
        let mut relay_at = None;
        while now < t0 + Duration::from_secs(10) {
            now += Duration::from_millis(10);
            p.note_sent(now);
            let _ = p.due_pings(now, &mut next_id);
            if relay_at.is_none() && matches!(p.route(now, true), Route::Relay { .. }) {
                relay_at = Some(now - t0);
            }
        }
        let relay_at = relay_at.expect("fell back to relay");
        assert!(
            relay_at <= Duration::from_secs(5),
            "relay after {relay_at:?}"
        );
        assert!(
            relay_at >= HEARTBEAT,
            "not before the first heartbeat could fail"
        );
    }

    #[test]
    fn hysteresis_keeps_the_path_on_small_differences() {
        let t0 = Instant::now();
        let mut p = Paths::default();
        let (a, b) = (addr("198.51.100.1:1"), addr("198.51.100.2:1"));
        p.set_reported(&[a, b], t0);
        let pings = p.discover(t0, ids());
        let ms = Duration::from_millis;
        assert!(
            p.handle_pong(pings[0].tx_id, a, t0 + ms(10))
                .expect("a")
                .new_best
        );
        // b is 5% faster: not enough to switch.
        assert!(
            !p.handle_pong(pings[1].tx_id, b, t0 + ms(9) + Duration::from_micros(500))
                .expect("b")
                .new_best
        );
        assert_eq!(p.best().map(|b| b.0), Some(a));
        // A clearly faster answer wins.
        let again = p.discover(t0 + ms(6000), ids());
        let t = t0 + ms(6000);
        p.handle_pong(again[0].tx_id, a, t + ms(10)).expect("a");
        assert!(
            p.handle_pong(again[1].tx_id, b, t + ms(2))
                .expect("b")
                .new_best
        );
    }

    #[test]
    fn private_address_wins_a_tie() {
        assert!(better(
            (addr("10.0.0.2:1"), Duration::from_millis(1)),
            (addr("198.51.100.1:1"), Duration::from_millis(1))
        ));
        assert!(!better(
            (addr("198.51.100.1:1"), Duration::from_millis(1)),
            (addr("10.0.0.2:1"), Duration::from_millis(1))
        ));
    }

    #[test]
    fn reflexive_and_call_me_maybe_candidates() {
        let t0 = Instant::now();
        let mut p = Paths::default();
        let r = addr("203.0.113.5:6000");
        let back = p.handle_ping_from(r, t0, || [7; 12]).expect("ping back");
        assert_eq!(back.to, r);
        let ms = Duration::from_millis;
        p.handle_pong(back.tx_id, r, t0 + ms(2)).expect("pong");
        assert!(
            p.handle_ping_from(r, t0 + ms(3), || [8; 12]).is_none(),
            "a confirmed path is not pinged back"
        );
        let c = [addr("203.0.113.6:1"), addr("203.0.113.7:1")];
        assert_eq!(p.handle_call_me_maybe(&c, t0, ids()).len(), 2);
        assert_eq!(p.candidates().count(), 3);
        // Reported endpoints replace only reported ones.
        p.set_reported(&[], t0);
        assert_eq!(p.candidates().count(), 3);
    }

    #[test]
    fn a_new_mapping_is_learned_after_32_others() {
        // A long-lived peer whose NAT keeps giving it new mappings, each of which pings us.
        let t0 = Instant::now();
        let secs = |n: u16| t0 + Duration::from_secs(u64::from(n));
        let mapping = |n: u16| SocketAddr::from(([203, 0, 113, 5], 1000 + n));
        let mut p = Paths::default();
        let reported = addr("198.51.100.9:41641");
        p.set_reported(&[reported], t0);
        let mut next_id = ids();
        let back = p
            .handle_ping_from(mapping(0), t0, &mut next_id)
            .expect("ping back");
        p.handle_pong(back.tx_id, mapping(0), t0).expect("pong");
        assert_eq!(p.best().map(|b| b.0), Some(mapping(0)));
        // 40 more, one a second: well within LEARNED_EXPIRY, so the cap has to make room.
        for n in 1..=40 {
            let back = p
                .handle_ping_from(mapping(n), secs(n), &mut next_id)
                .unwrap_or_else(|| panic!("mapping {n} is pinged back"));
            assert_eq!(back.to, mapping(n));
            assert!(
                p.candidates().any(|a| a == mapping(n)),
                "mapping {n} learned"
            );
            assert!(p.candidates().count() <= MAX_CANDIDATES, "bounded");
        }
        assert_eq!(p.candidates().count(), MAX_CANDIDATES);
        // The least recently heard learned ones made room; the reported endpoint and the
        // best path (the oldest of all) did not.
        assert!(p.candidates().any(|a| a == reported));
        assert!(p.candidates().any(|a| a == mapping(0)));
        assert!(!p.candidates().any(|a| a == mapping(10)));
        assert!(p.candidates().any(|a| a == mapping(11)));
        // The newest mapping's pong is counted: it becomes the path.
        let t = secs(41);
        let ping = p.track_ping(mapping(40), t, [200; 12]);
        let r = p.handle_pong(ping.tx_id, mapping(40), t).expect("pong");
        assert!(r.new_best);
        assert_eq!(p.route(t, true), Route::Direct(mapping(40)));
    }

    #[test]
    fn learned_candidates_expire_unless_heard_from_or_best() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut p = Paths::default();
        let reported = addr("198.51.100.9:41641");
        let (heard, best) = (addr("203.0.113.5:1"), addr("203.0.113.5:2"));
        let told = addr("203.0.113.6:1");
        p.set_reported(&[reported], t0);
        let mut next_id = ids();
        let _ = p.handle_ping_from(heard, t0, &mut next_id);
        let _ = p.handle_call_me_maybe(&[told], t0, &mut next_id);
        let back = p.handle_ping_from(best, t0, &mut next_id).expect("ping");
        p.handle_pong(back.tx_id, best, t0).expect("pong");
        // `heard` pings again later; `told` is never heard from again.
        let _ = p.handle_ping_from(heard, at(30), &mut next_id);
        let targets = |p: &mut Paths, t| -> Vec<SocketAddr> {
            let mut to: Vec<_> = p.discover(t, ids()).into_iter().map(|x| x.to).collect();
            to.sort();
            to
        };
        let mut expect = vec![reported, heard, best];
        expect.sort();
        assert_eq!(targets(&mut p, at(46)), expect, "`told` expired");
        let mut expect = vec![reported, best];
        expect.sort();
        assert_eq!(
            targets(&mut p, at(80)),
            expect,
            "`heard` expired; the best path and the reported endpoint stay"
        );
        // A full set of reported endpoints is never evicted for a learned one.
        let many: Vec<SocketAddr> = (0..40u16)
            .map(|n| SocketAddr::from(([198, 51, 100, 10], n + 1)))
            .collect();
        let mut p = Paths::default();
        p.set_reported(&many, t0);
        assert_eq!(p.candidates().count(), MAX_CANDIDATES);
        assert!(p.handle_ping_from(told, t0, ids()).is_none());
        assert!(p.candidates().all(|a| many.contains(&a)));
    }

    #[test]
    fn ping_from_an_unconfirmed_candidate_is_answered_with_a_ping_at_once() {
        // fw x fw: our ping to `a` died at the peer's firewall; the peer's ping then opened it.
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut p = Paths::default();
        let a = addr("198.51.100.2:41641");
        p.set_reported(&[a], t0);
        let first = p.discover(t0, ids());
        assert_eq!(first.len(), 1);
        let back = p
            .handle_ping_from(a, t0 + ms(40), || [42; 12])
            .expect("ping back at once, though we pinged 40 ms ago");
        assert_eq!(
            back,
            PingOut {
                tx_id: [42; 12],
                to: a
            }
        );
        let r = p.handle_pong(back.tx_id, a, t0 + ms(60)).expect("pong");
        assert!(r.new_best);
        assert_eq!(p.route(t0 + ms(60), true), Route::Direct(a));
    }

    #[test]
    fn mutual_ping_backs_end_once_both_sides_are_confirmed() {
        // Two peers' path state, wired together over a loss-free path: A's ping reaches B,
        // which answers with a pong and a ping; the exchange stops by itself.
        let t0 = Instant::now();
        let (a_addr, b_addr) = (addr("198.51.100.1:1"), addr("198.51.100.2:1"));
        let (mut a, mut b) = (Paths::default(), Paths::default());
        a.set_reported(&[b_addr], t0);
        b.set_reported(&[a_addr], t0);
        let mut next_id = ids();
        // (sent by a, tx_id, is a pong), in flight in order.
        let mut wire: Vec<(bool, TxId, bool)> = a
            .discover(t0, &mut next_id)
            .into_iter()
            .map(|p| (true, p.tx_id, false))
            .collect();
        let mut sent = 0;
        while let Some((from_a, tx_id, pong)) = (!wire.is_empty()).then(|| wire.remove(0)) {
            sent += 1;
            assert!(sent < 10, "ping-backs do not stop");
            let (me, src) = if from_a {
                (&mut b, a_addr)
            } else {
                (&mut a, b_addr)
            };
            if pong {
                me.handle_pong(tx_id, src, t0);
            } else {
                wire.push((!from_a, tx_id, true));
                if let Some(back) = me.handle_ping_from(src, t0, &mut next_id) {
                    wire.push((!from_a, back.tx_id, false));
                }
            }
        }
        assert!(a.trusted(t0) && b.trusted(t0));
    }

    #[test]
    fn no_relay_sprays_candidates_until_confirmed() {
        let t0 = Instant::now();
        let mut p = Paths::default();
        let (a, b) = (addr("10.0.0.1:1"), addr("10.0.0.2:1"));
        p.set_reported(&[a, b], t0);
        assert_eq!(p.route(t0, false), Route::Spray(vec![a, b]));
        p.note_wg_from(b, t0);
        assert_eq!(
            p.route(t0, false),
            Route::Spray(vec![b, a]),
            "where WireGuard heard the peer goes first"
        );
        let c = addr("198.51.100.7:9");
        p.note_wg_from(c, t0);
        assert_eq!(p.route(t0, false), Route::Spray(vec![c, a, b]), "learned");
        // The peer keeps sending from `c` for longer than a learned candidate lives: every
        // packet keeps it, and data keeps going there first.
        let mut t = t0;
        for _ in 0..10 {
            t += Duration::from_secs(10);
            p.note_wg_from(c, t);
            let _ = p.discover(t, ids());
        }
        assert!(t > t0 + LEARNED_EXPIRY);
        assert_eq!(
            p.route(t, false),
            Route::Spray(vec![c, a, b]),
            "still heard"
        );
    }

    #[test]
    fn new_endpoints_lift_the_discovery_rate_limit() {
        let t0 = Instant::now();
        let mut p = Paths::default();
        let a = addr("198.51.100.1:41641");
        p.set_reported(&[a], t0);
        let _ = p.discover(t0, ids());
        let t1 = t0 + Duration::from_secs(1);
        p.set_reported(&[a], t0);
        assert!(!p.wants_discovery(t1), "same endpoints: still rate limited");
        p.set_reported(&[a, addr("198.51.100.2:41641")], t0);
        assert!(p.wants_discovery(t1), "a new endpoint: discovery at once");
    }
}
