//! Per-grant token buckets.
//!
//! Arithmetic is exact integer arithmetic: one token is [`UNITS_PER_TOKEN`]
//! units, and a bucket of `N` per minute refills `N` units per nanosecond.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Units per token: nanoseconds per minute, so the refill rate in units per
/// nanosecond equals the per-minute limit.
const UNITS_PER_TOKEN: u128 = 60_000_000_000;
/// Independent locks, so concurrent lookups under different grants rarely contend.
const SHARDS: usize = 16;

#[derive(Debug)]
struct Bucket {
    /// Tokens held, in units.
    units: u128,
    /// Per-minute limit the bucket was last used with.
    per_minute: u32,
    /// Last refill.
    last: Instant,
}

impl Bucket {
    fn full(per_minute: u32, now: Instant) -> Self {
        Bucket {
            units: capacity(per_minute),
            per_minute,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        // Instants passed out of order never drain or double-fill a bucket.
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        let added = elapsed.saturating_mul(u128::from(self.per_minute));
        self.units = self.units.saturating_add(added).min(capacity(self.per_minute));
        if now > self.last {
            self.last = now;
        }
    }

    /// Follows a changed limit: a raised limit grants its extra tokens at once,
    /// a lowered one caps what is held.
    fn resize(&mut self, per_minute: u32) {
        if per_minute > self.per_minute {
            let extra = capacity(per_minute) - capacity(self.per_minute);
            self.units = self.units.saturating_add(extra);
        }
        self.per_minute = per_minute;
        self.units = self.units.min(capacity(per_minute));
    }

    fn take(&mut self, per_minute: u32, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if per_minute != self.per_minute {
            self.resize(per_minute);
        }
        if self.units >= UNITS_PER_TOKEN {
            self.units -= UNITS_PER_TOKEN;
            Ok(())
        } else {
            let missing = UNITS_PER_TOKEN - self.units;
            let nanos = missing.div_ceil(u128::from(per_minute));
            Err(Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)))
        }
    }
}

fn capacity(per_minute: u32) -> u128 {
    u128::from(per_minute) * UNITS_PER_TOKEN
}

/// Token buckets keyed by grant id: capacity `per_minute`, refilled at
/// `per_minute / 60` tokens per second.
#[derive(Debug)]
pub struct RateLimiter {
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new()
    }
}

/// FNV-1a: fast, allocation-free, good enough to spread grant ids.
fn shard_of(grant_id: &str) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in grant_id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % SHARDS as u64) as usize
}

impl RateLimiter {
    /// An empty limiter.
    pub fn new() -> Self {
        RateLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn lock(&self, grant_id: &str) -> Option<MutexGuard<'_, HashMap<String, Bucket>>> {
        let shard = self.shards.get(shard_of(grant_id))?;
        // A panic while holding the lock leaves a bucket at worst one token off.
        Some(shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// Takes one token from the grant's bucket: `Ok` if the request may
    /// proceed, else how long until a token is available. `per_minute == 0`
    /// means unlimited.
    pub fn check(&self, grant_id: &str, per_minute: u32, now: Instant) -> Result<(), Duration> {
        if per_minute == 0 {
            return Ok(());
        }
        let Some(mut buckets) = self.lock(grant_id) else {
            return Ok(());
        };
        if let Some(bucket) = buckets.get_mut(grant_id) {
            return bucket.take(per_minute, now);
        }
        let mut bucket = Bucket::full(per_minute, now);
        let outcome = bucket.take(per_minute, now);
        buckets.insert(grant_id.to_owned(), bucket);
        outcome
    }

    /// Drops buckets that have refilled completely by `now`; a full bucket
    /// behaves exactly like a new one, so this only frees memory.
    pub fn prune(&self, now: Instant) {
        for shard in &self.shards {
            let mut buckets = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            buckets.retain(|_, bucket| {
                bucket.refill(now);
                bucket.units < capacity(bucket.per_minute)
            });
        }
    }

    /// Number of buckets held.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len())
            .sum()
    }

    /// True if no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn allows_exactly_n_then_refuses_with_a_positive_retry_after() {
        let limiter = RateLimiter::new();
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(limiter.check("g1", 5, t0), Ok(()), "request {i}");
        }
        let retry = limiter.check("g1", 5, t0).unwrap_err();
        assert!(retry > Duration::ZERO);
        // 5 per minute: one token every 12 s.
        assert_eq!(retry, Duration::from_secs(12));
    }

    #[test]
    fn refills_over_time() {
        let limiter = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..60 {
            limiter.check("g", 60, t0).unwrap();
        }
        assert!(limiter.check("g", 60, t0).is_err());
        let half = t0 + Duration::from_millis(500);
        assert_eq!(limiter.check("g", 60, half), Err(Duration::from_millis(500)));
        let one = t0 + Duration::from_secs(1);
        assert_eq!(limiter.check("g", 60, one), Ok(()));
        assert!(limiter.check("g", 60, one).is_err());
        // A full minute refills the whole bucket, and not more.
        let later = one + Duration::from_secs(120);
        for _ in 0..60 {
            limiter.check("g", 60, later).unwrap();
        }
        assert!(limiter.check("g", 60, later).is_err());
    }

    #[test]
    fn zero_means_unlimited() {
        let limiter = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(limiter.check("free", 0, t0), Ok(()));
        }
        assert!(limiter.is_empty());
    }

    #[test]
    fn grants_have_separate_buckets() {
        let limiter = RateLimiter::new();
        let t0 = Instant::now();
        limiter.check("a", 1, t0).unwrap();
        assert!(limiter.check("a", 1, t0).is_err());
        assert_eq!(limiter.check("b", 1, t0), Ok(()));
    }

    #[test]
    fn bucket_follows_a_changed_limit() {
        let limiter = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..10 {
            limiter.check("g", 10, t0).unwrap();
        }
        assert!(limiter.check("g", 10, t0).is_err());
        // Raised to 12: two more at once.
        assert_eq!(limiter.check("g", 12, t0), Ok(()));
        assert_eq!(limiter.check("g", 12, t0), Ok(()));
        assert!(limiter.check("g", 12, t0).is_err());
        // Lowered to 2: after a long pause the bucket holds 2, not 12.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(limiter.check("g", 2, later), Ok(()));
        assert_eq!(limiter.check("g", 2, later), Ok(()));
        assert_eq!(limiter.check("g", 2, later), Err(Duration::from_secs(30)));
    }

    #[test]
    fn instants_out_of_order_do_not_refill() {
        let limiter = RateLimiter::new();
        let t1 = Instant::now() + Duration::from_secs(10);
        limiter.check("g", 1, t1).unwrap();
        assert!(limiter.check("g", 1, t1 - Duration::from_secs(5)).is_err());
        assert!(limiter.check("g", 1, t1).is_err());
    }

    #[test]
    fn prune_drops_only_full_buckets() {
        let limiter = RateLimiter::new();
        let t0 = Instant::now();
        limiter.check("busy", 1, t0).unwrap();
        limiter.check("idle", 60, t0).unwrap();
        limiter.prune(t0 + Duration::from_secs(2));
        assert_eq!(limiter.len(), 1);
        // The pruned bucket behaves like a fresh one; the kept one still limits.
        assert!(limiter.check("busy", 1, t0 + Duration::from_secs(2)).is_err());
    }

    #[test]
    fn limiter_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RateLimiter>();
    }
}
