//! A limit on log lines that peers can cause: a refused connection, a malformed request or a
//! connection that never speaks each deserve a warning, but one per event would let any
//! unauthenticated peer fill the log. One [`LogLimiter`] per server is shared by all such sites.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a server's peers may cause per [`PEER_LOG_WINDOW`].
pub const PEER_LOG_BURST: u32 = 20;
/// The window [`PEER_LOG_BURST`] applies to.
pub const PEER_LOG_WINDOW: Duration = Duration::from_secs(60);

/// Lets at most `burst` lines through per `window` and counts the lines it held back, so the
/// next line that gets through can say how many were lost.
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
    /// since the last one that was logged.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    /// [`allow`](Self::allow) at the given time.
    pub fn allow_at(&self, now: Instant) -> Option<u64> {
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
    fn a_burst_per_window_then_the_count_of_what_was_held_back() {
        let limiter = LogLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let allowed: Vec<_> = (0..10).map(|_| limiter.allow_at(t0)).collect();
        assert_eq!(allowed[..3], [Some(0), Some(0), Some(0)]);
        assert!(allowed[3..].iter().all(Option::is_none));
        assert_eq!(limiter.allow_at(t0 + Duration::from_secs(9)), None);
        // A new window: the first line reports the 8 held back.
        assert_eq!(limiter.allow_at(t0 + Duration::from_secs(10)), Some(8));
        assert_eq!(limiter.allow_at(t0 + Duration::from_secs(10)), Some(0));
    }
}
