//! Exponential backoff with jitter, for everything that reconnects (a node to control, to a DERP
//! server). Without jitter, every node that lost the same server retries at the same instants
//! and the restarted server meets its whole fleet in a few synchronized bursts of SYNs.
//!
//! Pure: the caller supplies the randomness, so the schedule is testable and replayable.

use std::time::Duration;

/// A reconnect schedule: waits grow from `initial` to `max`, doubling after each failure, and
/// each wait is drawn from the upper half of the current step ("equal jitter"), so retries of
/// many clients spread out while none waits less than half its step.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// A schedule starting at `initial` and growing to at most `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self {
            initial,
            max,
            step: initial,
        }
    }

    /// The wait before the next attempt, with `random` (any value, uniformly drawn) as the
    /// jitter source; the step then doubles, up to the maximum.
    pub fn next_wait(&mut self, random: u64) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        jittered(step, random)
    }

    /// Back to the initial step (after a connection that worked).
    pub fn reset(&mut self) {
        self.step = self.initial;
    }

    /// Straight to the longest step (when retrying soon is pointless).
    pub fn give_up_soon(&mut self) {
        self.step = self.max;
    }

    /// The current step: the next wait lies in its upper half.
    pub fn step(&self) -> Duration {
        self.step
    }
}

/// A point in `[step / 2, step]` chosen by `random`.
fn jittered(step: Duration, random: u64) -> Duration {
    let nanos = u64::try_from(step.as_nanos()).unwrap_or(u64::MAX);
    let half = nanos / 2;
    let spread = nanos - half;
    let offset = if spread == 0 {
        0
    } else {
        random % (spread + 1)
    };
    Duration::from_nanos(half + offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn steps_double_to_the_maximum_and_reset() {
        let mut b = Backoff::new(250 * MS, 15_000 * MS);
        let steps: Vec<Duration> = (0..9)
            .map(|_| {
                let s = b.step();
                b.next_wait(0);
                s
            })
            .collect();
        let ms: Vec<u128> = steps.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [250, 500, 1000, 2000, 4000, 8000, 15_000, 15_000, 15_000]
        );
        b.reset();
        assert_eq!(b.step(), 250 * MS);
        b.give_up_soon();
        assert_eq!(b.step(), 15_000 * MS);
    }

    #[test]
    fn waits_lie_in_the_upper_half_of_the_step() {
        let mut b = Backoff::new(1000 * MS, 1000 * MS);
        assert_eq!(b.next_wait(0), 500 * MS);
        assert_eq!(b.next_wait(u64::MAX), jittered(1000 * MS, u64::MAX));
        for r in [1, 7, 1 << 20, 123_456_789_012, u64::MAX - 1] {
            let w = b.next_wait(r);
            assert!(w >= 500 * MS && w <= 1000 * MS, "{w:?}");
        }
        assert_eq!(jittered(Duration::ZERO, 99), Duration::ZERO);
        assert_eq!(
            jittered(Duration::from_nanos(1), 99),
            Duration::from_nanos(1)
        );
    }

    #[test]
    fn clients_with_different_randomness_do_not_retry_in_lockstep() {
        // 2,000 clients that lost the same server: their first retries spread over the whole
        // upper half of the step instead of landing on one instant.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut waits: Vec<u128> = (0..2000)
            .map(|_| {
                // xorshift: a cheap, deterministic stream of draws.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                Backoff::new(250 * MS, 15_000 * MS)
                    .next_wait(seed)
                    .as_micros()
            })
            .collect();
        waits.sort_unstable();
        waits.dedup();
        assert!(waits.len() > 1900, "only {} distinct waits", waits.len());
        assert!(waits[0] >= 125_000 && *waits.last().unwrap_or(&0) <= 250_000);
        // Every 25 ms slice of [125, 250] ms gets some of them.
        for slice in 0..5u128 {
            let lo = 125_000 + slice * 25_000;
            assert!(
                waits.iter().any(|w| (lo..lo + 25_000).contains(w)),
                "no retry in [{lo}, {}) us",
                lo + 25_000
            );
        }
    }
}
