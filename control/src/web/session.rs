//! Who is logged in to the web admin page, and how fast a peer may guess API keys.
//!
//! Both tables are plain state with the time passed in (`now`), so their rules are tested
//! without a clock; the HTTP layer owns the clock and the randomness. Both are capped, so no
//! number of logins or failed guesses grows them without bound.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long a session lasts after login (also the cookie's `Max-Age`).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// Sessions held at once; a login past this evicts the session closest to its end.
pub const MAX_SESSIONS: usize = 256;
/// The first failed login from an address delays that address's next attempt by this much;
/// each further failure doubles it, up to [`MAX_LOGIN_DELAY`].
pub const FIRST_LOGIN_DELAY: Duration = Duration::from_millis(250);
/// The longest delay a run of failed logins imposes.
pub const MAX_LOGIN_DELAY: Duration = Duration::from_secs(8);
/// An address with no failed login for this long starts again from no delay.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(15 * 60);
/// Addresses whose failures are remembered at once; past this the oldest is forgotten.
pub const MAX_TRACKED_PEERS: usize = 4096;

/// 32 random bytes, hex: a session id or a CSRF token.
pub type Token = String;

/// One logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// The API key it logged in with; checked again (as the CLI's key is) on every request, so
    /// expiring the key ends the session at once.
    pub api_key: String,
    /// The token every form of this session carries in its hidden `csrf` field.
    pub csrf: Token,
    /// When it ends.
    pub expires: Instant,
}

/// The server-side session table: session id (the cookie's value) to [`Session`].
#[derive(Debug, Default)]
pub struct Sessions {
    by_id: HashMap<Token, Session>,
}

impl Sessions {
    /// Starts a session under `id` (random, from the caller) that ends [`SESSION_LIFETIME`]
    /// after `now`. Expired sessions go first; when the table is still full, the session
    /// closest to its end makes room.
    pub fn insert(&mut self, id: Token, api_key: String, csrf: Token, now: Instant) {
        self.by_id.retain(|_, s| s.expires > now);
        if self.by_id.len() >= MAX_SESSIONS
            && let Some(oldest) = self
                .by_id
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(id, _)| id.clone())
        {
            self.by_id.remove(&oldest);
        }
        let expires = now + SESSION_LIFETIME;
        self.by_id.insert(
            id,
            Session {
                api_key,
                csrf,
                expires,
            },
        );
    }

    /// The live session with this id; an expired one is removed and not returned.
    pub fn get(&mut self, id: &str, now: Instant) -> Option<Session> {
        let session = self.by_id.get(id)?;
        if session.expires <= now {
            self.by_id.remove(id);
            return None;
        }
        Some(session.clone())
    }

    /// Ends a session (logout, or its API key no longer valid).
    pub fn remove(&mut self, id: &str) {
        self.by_id.remove(id);
    }

    /// Sessions held (expired ones included until they are next swept).
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

/// Failed logins per peer address: each failure doubles the wait before that address's next
/// login attempt is checked, so guessing keys costs time while one typo costs a quarter second.
#[derive(Debug, Default)]
pub struct Throttle {
    by_peer: HashMap<IpAddr, Failures>,
}

impl Throttle {
    /// How long a login attempt from `peer` waits before its key is checked.
    pub fn delay(&mut self, peer: IpAddr, now: Instant) -> Duration {
        let Some(f) = self.by_peer.get(&peer) else {
            return Duration::ZERO;
        };
        if now.saturating_duration_since(f.last) >= FAILURE_MEMORY {
            self.by_peer.remove(&peer);
            return Duration::ZERO;
        }
        let doublings = f.count.saturating_sub(1).min(16);
        FIRST_LOGIN_DELAY
            .saturating_mul(1 << doublings)
            .min(MAX_LOGIN_DELAY)
    }

    /// Records a wrong key from `peer`.
    pub fn failed(&mut self, peer: IpAddr, now: Instant) {
        if !self.by_peer.contains_key(&peer) && self.by_peer.len() >= MAX_TRACKED_PEERS {
            self.by_peer
                .retain(|_, f| now.saturating_duration_since(f.last) < FAILURE_MEMORY);
            if self.by_peer.len() >= MAX_TRACKED_PEERS
                && let Some(oldest) = self
                    .by_peer
                    .iter()
                    .min_by_key(|(_, f)| f.last)
                    .map(|(ip, _)| *ip)
            {
                self.by_peer.remove(&oldest);
            }
        }
        let f = self.by_peer.entry(peer).or_insert(Failures {
            count: 0,
            last: now,
        });
        f.count = f.count.saturating_add(1);
        f.last = now;
    }

    /// Records a successful login from `peer`: its failures are forgotten.
    pub fn succeeded(&mut self, peer: IpAddr) {
        self.by_peer.remove(&peer);
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_ends_at_its_expiry_and_the_table_is_capped() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        s.insert("a".into(), "key".into(), "csrf".into(), t0);
        assert_eq!(s.get("a", t0).map(|s| s.csrf), Some("csrf".into()));
        assert!(s.get("a", t0 + SESSION_LIFETIME).is_none());
        assert!(s.is_empty(), "an expired session is removed when seen");

        for i in 0..MAX_SESSIONS + 10 {
            let at = t0 + Duration::from_secs(i as u64);
            s.insert(format!("s{i}"), "key".into(), "c".into(), at);
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        let late = t0 + Duration::from_secs(MAX_SESSIONS as u64 + 10);
        assert!(s.get("s0", late).is_none(), "the oldest made room");
        assert!(s.get(&format!("s{}", MAX_SESSIONS + 9), late).is_some());
    }

    #[test]
    fn failed_logins_double_the_delay_up_to_the_cap_and_are_forgotten() {
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        let mut t = Throttle::default();
        assert_eq!(t.delay(ip, t0), Duration::ZERO);
        t.failed(ip, t0);
        assert_eq!(t.delay(ip, t0), Duration::from_millis(250));
        t.failed(ip, t0);
        assert_eq!(t.delay(ip, t0), Duration::from_millis(500));
        for _ in 0..40 {
            t.failed(ip, t0);
        }
        assert_eq!(t.delay(ip, t0), MAX_LOGIN_DELAY);
        assert_eq!(t.delay(other, t0), Duration::ZERO, "per address");
        assert_eq!(t.delay(ip, t0 + FAILURE_MEMORY), Duration::ZERO);
        t.failed(ip, t0);
        t.succeeded(ip);
        assert_eq!(t.delay(ip, t0), Duration::ZERO);
    }

    #[test]
    fn the_failure_table_is_capped() {
        let t0 = Instant::now();
        let mut t = Throttle::default();
        for i in 0..MAX_TRACKED_PEERS as u32 + 5 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            t.failed(ip, t0 + Duration::from_millis(u64::from(i)));
        }
        assert_eq!(t.by_peer.len(), MAX_TRACKED_PEERS);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        assert!(!same_secret("", "a"));
    }
}
