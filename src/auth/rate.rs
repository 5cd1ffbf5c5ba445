//! Rate limits: one token bucket (GCRA, from `governor`) per API key name, or per client address
//! for requests without a valid key, checked before a request is read or queued, so that one
//! caller's flood is refused at the door and cannot fill the queue that every caller shares.
//!
//! Off unless `--rate-limit-per-s` is given. Buckets of callers that have been quiet long enough to
//! be full again are dropped every [`limits::RATE_LIMIT_SWEEP_PERIOD`]: a full bucket and a missing
//! one behave the same, so memory follows the callers active within one refill, not all callers ever.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// Whose tokens a request spends.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// A valid API key, by name: every connection and address using it shares one bucket.
    Key(Arc<str>),
    /// No valid key: the client's address (so guessing keys is rate limited too).
    Address(IpAddr),
}

/// The rate limiter of a running server.
pub struct Limiter {
    buckets: RateLimiter<Bucket, DefaultKeyedStateStore<Bucket>, DefaultClock>,
}

impl Limiter {
    /// `per_second` requests per second sustained, bursts of up to `burst` at once.
    pub fn new(per_second: NonZeroU32, burst: NonZeroU32) -> Self {
        Self {
            buckets: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
        }
    }

    /// Spends one token of `bucket`, or says how long until one is there.
    pub fn check(&self, bucket: &Bucket) -> Result<(), Duration> {
        self.buckets
            .check_key(bucket)
            .map_err(|not_until| not_until.wait_time_from(self.buckets.clock().now()))
    }

    /// Forgets the buckets that are full again.
    pub fn sweep(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }

    /// How many buckets are held now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// Whole seconds for `Retry-After`, rounded up and at least one (a client told "0" retries at once).
pub fn retry_after_seconds(wait: Duration) -> u32 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    u32::try_from(seconds.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_refused_and_other_buckets_are_untouched() {
        let limiter = Limiter::new(NonZeroU32::new(1).unwrap(), NonZeroU32::new(3).unwrap());
        let flood = Bucket::Key("flood".into());
        for _ in 0..3 {
            assert!(limiter.check(&flood).is_ok());
        }
        let wait = limiter.check(&flood).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(limiter.check(&Bucket::Key("calm".into())).is_ok());
        assert!(limiter.check(&Bucket::Address([127, 0, 0, 1].into())).is_ok());
        assert_eq!(limiter.len(), 3);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(3)), 3);
    }
}
