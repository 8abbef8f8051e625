//! A bound on the log lines peers can cause. A refused client, a bad frame or a connection
//! event each deserve a line, but one per event would let anyone who can open a TCP connection
//! fill the log; the relay shares one [`LogLimiter`] between all such sites.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines the relay's peers may cause per [`PEER_LOG_WINDOW`].
pub const PEER_LOG_BURST: u32 = 20;
/// The window [`PEER_LOG_BURST`] applies to.
pub const PEER_LOG_WINDOW: Duration = Duration::from_secs(60);

/// Lets at most `burst` lines through per `window` and counts those it held back, so the next
/// line let through can say how many were lost.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    window_start: Option<Instant>,
    used: u32,
    held_back: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new(PEER_LOG_BURST, PEER_LOG_WINDOW)
    }
}

impl LogLimiter {
    /// At most `burst` lines per `window`.
    pub fn new(burst: u32, window: Duration) -> Self {
        Self {
            burst,
            window,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether a line may be logged now: `Some(n)` when it may, `n` being the lines held back
    /// since the last one let through. Reads tokio's clock, so paused-time tests control it.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(tokio::time::Instant::now().into_std())
    }

    /// [`allow`](Self::allow) at `now`.
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
        // The state stays consistent even if a holder panicked.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let start = *s.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= self.window {
            s.window_start = Some(now);
            s.used = 0;
        }
        if s.used < self.burst {
            s.used += 1;
            Some(std::mem::take(&mut s.held_back))
        } else {
            s.held_back += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_held_back() {
        let limiter = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let first: Vec<_> = (0..10).map(|_| limiter.allow_at(t0)).collect();
        assert_eq!(first[..3], [Some(0), Some(0), Some(0)]);
        assert_eq!(first[3..], [None; 7]);
        assert_eq!(limiter.allow_at(t0 + Duration::from_secs(9)), None);
        // A new window: the first line says how many were lost.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(limiter.allow_at(later), Some(8));
        assert_eq!(limiter.allow_at(later), Some(0));
    }
}
