//! The per-pod rate limit: a [`TokenBucket`] advanced by the caller's clock readings (it reads no
//! clock itself, so it is tested with made-up instants).

use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket { rate: f64::from(rate), burst, tokens: burst, last: now }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.take_or_wait(now).is_ok()
    }

    /// Takes a token if there is one; otherwise says how long until there will be.
    pub fn take_or_wait(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.rate > 0.0 {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        } else {
            // No refill: only a caller that does not wait can use this answer.
            Err(Duration::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 5, t0);
        assert_eq!((0..8).filter(|_| b.take(t0)).count(), 5, "the burst");
        assert!(!b.take(t0 + Duration::from_millis(50)), "half a token");
        assert!(b.take(t0 + Duration::from_millis(100)));
        assert_eq!(
            (0..100).filter(|_| b.take(t0 + Duration::from_secs(60))).count(),
            5,
            "refill caps at the burst"
        );
    }

    #[test]
    fn an_empty_bucket_says_how_long_until_the_next_token() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 1, t0);
        assert_eq!(b.take_or_wait(t0), Ok(()));
        let wait = b.take_or_wait(t0).expect_err("empty");
        assert!(wait > Duration::from_millis(9) && wait <= Duration::from_millis(10), "{wait:?}");
        assert_eq!(b.take_or_wait(t0 + wait), Ok(()), "the token is there after the wait");
    }
}
