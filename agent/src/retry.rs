//! Back-off with jitter for retrying the network: doubles from `min` to `max`, each delay randomised
//! by ±20% so a fleet of boards that lost the same API server does not come back in lockstep.

use std::time::Duration;

/// Retry delays for one kind of request; `reset` after a success.
#[derive(Debug, Clone)]
pub struct RetryBackoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl RetryBackoff {
    /// Starts at `min`, never exceeds `max` (before jitter).
    pub fn new(min: Duration, max: Duration) -> Self {
        RetryBackoff { min, max, next: min }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let jitter = 0.8 + fastrand::f64() * 0.4;
        base.mul_f64(jitter)
    }

    /// Back to `min` after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_caps_jitters_and_resets() {
        let mut b = RetryBackoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let secs: Vec<f64> = (0..6).map(|_| b.next_delay().as_secs_f64()).collect();
        for (got, want) in secs.iter().zip([1.0, 2.0, 4.0, 8.0, 8.0, 8.0]) {
            assert!((want * 0.8..=want * 1.2).contains(got), "{secs:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(1200));
    }
}
