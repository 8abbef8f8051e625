//! Polling a condition with a deadline: the only way lab tests synchronise.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// How often [`wait_until`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `cond` every [`POLL_INTERVAL`] until it returns `Ok(true)`, and returns how long that
/// took. `Err` from `cond` counts as "not yet" (a daemon that is still starting often makes a
/// probe fail); the last such error is reported if `deadline` passes, together with `what`.
pub fn wait_until(
    deadline: Duration,
    what: &str,
    cond: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    wait_until_every(deadline, POLL_INTERVAL, what, cond)
}

/// [`wait_until`] re-checking every `interval`, for measurements that want a finer grain than
/// [`POLL_INTERVAL`] (a condition that itself waits, such as a ping, may use
/// [`Duration::ZERO`]).
pub fn wait_until_every(
    deadline: Duration,
    interval: Duration,
    what: &str,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last_err = None;
    loop {
        match cond() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if start.elapsed() >= deadline {
            match last_err {
                Some(e) => {
                    bail!("timed out after {deadline:?} waiting until {what} (last error: {e:#})")
                }
                None => bail!("timed out after {deadline:?} waiting until {what}"),
            }
        }
        thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_once_condition_holds() {
        let mut n = 0;
        let took = wait_until(Duration::from_secs(5), "n reaches 3", || {
            n += 1;
            Ok(n >= 3)
        })
        .expect("should succeed");
        assert!(took < Duration::from_secs(5));
        assert_eq!(n, 3);
    }

    #[test]
    fn times_out_with_description_and_last_error() {
        let err = wait_until(Duration::from_millis(120), "never", || {
            anyhow::bail!("probe failed")
        })
        .expect_err("should fail")
        .to_string();
        assert!(err.contains("never"), "{err}");
        assert!(err.contains("probe failed"), "{err}");
    }
}
