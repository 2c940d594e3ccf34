//! Request-rate budgets: a token bucket per API key (management API) and
//! per call URL (data plane), holding one second of the user's `rate` and
//! refilled at `rate` per second. The buckets are governor's (GCRA), kept
//! in memory: a restart gives every bucket its burst back, which is all a
//! rate limit needs.
//!
//! Never decides anything but "now, or after this long".

use crate::model::FnKey;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

/// Buckets kept before the map is emptied. Each names a key or a function
/// that exists (a lookup found it before its bucket is made), so only
/// rotated keys and removed functions add up; emptying the map now and
/// then forgets those and hands every bucket a fresh burst, once.
const MAX_BUCKETS: usize = 100_000;

/// Whose requests a bucket counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// An API key, by its hash.
    Key([u8; 32]),
    /// A function's call URL (a `--refresh` keeps its bucket).
    Url(FnKey),
}

struct Entry {
    /// The rate the limiter was made with: a changed budget makes a new one.
    rate: u32,
    limiter: Arc<DefaultDirectRateLimiter>,
}

pub struct RateLimits {
    buckets: Mutex<HashMap<Bucket, Entry>>,
    clock: DefaultClock,
}

impl RateLimits {
    pub fn new() -> RateLimits {
        RateLimits {
            buckets: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
        }
    }

    /// Takes a token from `bucket` (made with `rate` per second if new or
    /// if the rate changed), or says in how many whole seconds (at least 1,
    /// as `Retry-After` counts) one will be there.
    pub fn check(&self, bucket: Bucket, rate: u32) -> Result<(), u64> {
        let Some(per_second) = NonZeroU32::new(rate) else {
            // A rate of 0 is refused when set; nothing to count against.
            return Ok(());
        };
        let limiter = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&bucket) {
                buckets.clear();
            }
            let entry = buckets.entry(bucket).or_insert_with(|| Entry {
                rate,
                limiter: Arc::new(DefaultDirectRateLimiter::direct(Quota::per_second(
                    per_second,
                ))),
            });
            if entry.rate != rate {
                entry.rate = rate;
                entry.limiter = Arc::new(DefaultDirectRateLimiter::direct(Quota::per_second(
                    per_second,
                )));
            }
            Arc::clone(&entry.limiter)
        };
        limiter.check().map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
        })
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Name;

    #[test]
    fn a_bucket_passes_its_burst_then_refuses_with_a_wait_of_whole_seconds() {
        let rates = RateLimits::new();
        let key = Bucket::Key([1; 32]);
        for _ in 0..3 {
            assert_eq!(rates.check(key.clone(), 3), Ok(()));
        }
        assert_eq!(rates.check(key.clone(), 3), Err(1));
        // Another bucket is not touched.
        let url = Bucket::Url(FnKey::new(
            Name::parse("bob").unwrap(),
            Name::parse("f").unwrap(),
        ));
        assert_eq!(rates.check(url, 3), Ok(()));
        // A changed rate starts a bucket of its own.
        assert_eq!(rates.check(key, 5), Ok(()));
    }
}
