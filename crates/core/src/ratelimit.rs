//! Per-grant token buckets, and the tokens a replica leased from the
//! federation-wide ones.
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

/// Maps keyed by grant id behind independent locks.
#[derive(Debug)]
struct Shards<T>(Vec<Mutex<HashMap<String, T>>>);

impl<T> Shards<T> {
    fn new() -> Self {
        Shards((0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect())
    }

    fn lock(&self, grant_id: &str) -> Option<MutexGuard<'_, HashMap<String, T>>> {
        // A panic while holding the lock leaves an entry at worst one token off.
        Some(lock(self.0.get(shard_of(grant_id))?))
    }

    fn all(&self) -> impl Iterator<Item = MutexGuard<'_, HashMap<String, T>>> {
        self.0.iter().map(lock)
    }
}

fn lock<T>(shard: &Mutex<T>) -> MutexGuard<'_, T> {
    shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Token buckets keyed by grant id: capacity `per_minute`, refilled at
/// `per_minute / 60` tokens per second.
#[derive(Debug)]
pub struct RateLimiter {
    shards: Shards<Bucket>,
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
        RateLimiter { shards: Shards::new() }
    }

    /// Takes one token from the grant's bucket: `Ok` if the request may
    /// proceed, else how long until a token is available. `per_minute == 0`
    /// means unlimited.
    pub fn check(&self, grant_id: &str, per_minute: u32, now: Instant) -> Result<(), Duration> {
        if per_minute == 0 {
            return Ok(());
        }
        let Some(mut buckets) = self.shards.lock(grant_id) else {
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

    /// Returns a token [`RateLimiter::check`] took for a lookup the broker
    /// could not put to the register (no endpoint, its circuit open): it goes back into the bucket
    /// (never past its capacity). Nothing to do for a bucket already full,
    /// or pruned (which it is only when full).
    pub fn give_back(&self, grant_id: &str, per_minute: u32, now: Instant) {
        if per_minute == 0 {
            return;
        }
        let Some(mut buckets) = self.shards.lock(grant_id) else {
            return;
        };
        if let Some(bucket) = buckets.get_mut(grant_id) {
            bucket.refill(now);
            bucket.units = bucket
                .units
                .saturating_add(UNITS_PER_TOKEN)
                .min(capacity(bucket.per_minute));
        }
    }

    /// Drops buckets that have refilled completely by `now`; a full bucket
    /// behaves exactly like a new one, so this only frees memory.
    pub fn prune(&self, now: Instant) {
        for mut buckets in self.shards.all() {
            buckets.retain(|_, bucket| {
                bucket.refill(now);
                bucket.units < capacity(bucket.per_minute)
            });
        }
    }

    /// Number of buckets held.
    pub fn len(&self) -> usize {
        self.shards.all().map(|buckets| buckets.len()).sum()
    }

    /// True if no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How long leased tokens stay usable. A replica that stops using a grant
/// lets its unused tokens lapse rather than spend them later in a burst the
/// federation-wide bucket did not allow then.
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// Tokens a replica leases at once from a federation-wide bucket of
/// `per_minute`: a tenth of a second's refill, at least one (a round trip to
/// the database per lookup only for grants of under 600 a minute), at most
/// 1,024. Leased tokens another replica cannot use are at most that much.
pub fn lease_size(per_minute: u32) -> u32 {
    (per_minute / 600).clamp(1, 1024)
}

/// A grant's leased tokens, usable until `until`; none (`tokens == 0`)
/// when the shared bucket was found empty, until it refills.
#[derive(Debug)]
struct Lease {
    tokens: u32,
    until: Instant,
}

/// What a broker holds of a grant's federation-wide bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// A leased token, now used.
    Token,
    /// The shared bucket was empty when last asked, and its next token is
    /// due after this long: refused without asking again.
    Empty(Duration),
    /// Nothing held: ask the shared bucket.
    Nothing,
}

/// Tokens this broker took from its grants' federation-wide buckets (shared
/// by the replicas through the database) and has not used yet, each usable
/// until [`LEASE_TTL`] after the grant's last lease. Every token used was
/// handed out by a shared bucket, so the replicas together never exceed a
/// grant's limit. A bucket found empty is remembered until it refills, so
/// a consumer past its limit does not cost the database a round trip per
/// refused lookup.
#[derive(Debug)]
pub struct Leases {
    shards: Shards<Lease>,
}

impl Default for Leases {
    fn default() -> Self {
        Leases::new()
    }
}

impl Leases {
    /// No tokens held.
    pub fn new() -> Self {
        Leases { shards: Shards::new() }
    }

    /// Uses one of the grant's leased tokens if one is held.
    pub fn take(&self, grant_id: &str, now: Instant) -> Held {
        let Some(mut leases) = self.shards.lock(grant_id) else {
            return Held::Nothing;
        };
        let Some(lease) = leases.get_mut(grant_id) else {
            return Held::Nothing;
        };
        let held = if now >= lease.until {
            Held::Nothing
        } else if lease.tokens == 0 {
            Held::Empty(lease.until - now)
        } else {
            lease.tokens -= 1;
            Held::Token
        };
        if held == Held::Nothing || (held == Held::Token && lease.tokens == 0) {
            leases.remove(grant_id);
        }
        held
    }

    /// Holds `tokens` more of the grant's, usable until `now + LEASE_TTL`;
    /// tokens held before and lapsed by `now` are dropped.
    pub fn hold(&self, grant_id: &str, tokens: u32, now: Instant) {
        if tokens == 0 {
            return;
        }
        let Some(mut leases) = self.shards.lock(grant_id) else {
            return;
        };
        let until = now + LEASE_TTL;
        let lease = leases.entry(grant_id.to_owned()).or_insert(Lease { tokens: 0, until });
        if now >= lease.until {
            lease.tokens = 0;
        }
        lease.tokens = lease.tokens.saturating_add(tokens);
        lease.until = until;
    }

    /// Holds again one token [`Leases::take`] handed out for a lookup that
    /// the broker could not put to the register. It goes back to this
    /// broker's lease, not to the shared bucket: crediting the database
    /// would cost a write per failed lookup, the more so while a register
    /// is down, and the token, taken from the shared bucket, stays within
    /// the grant's limit either way. It is usable until the lease lapses
    /// (at least [`LEASE_TTL`] from now when none is held), as the consumer's
    /// retry usually comes; unused, it lapses like any leased token. A bucket
    /// remembered empty holds this one token now.
    pub fn give_back(&self, grant_id: &str, now: Instant) {
        let Some(mut leases) = self.shards.lock(grant_id) else {
            return;
        };
        let fresh = Lease {
            tokens: 1,
            until: now + LEASE_TTL,
        };
        match leases.get_mut(grant_id) {
            Some(lease) if lease.tokens > 0 && now < lease.until => lease.tokens = lease.tokens.saturating_add(1),
            Some(lease) => *lease = fresh,
            None => {
                leases.insert(grant_id.to_owned(), fresh);
            }
        }
    }

    /// Remembers at `now` that the grant's shared bucket had no token, and
    /// that the next is due at `refilled`; tokens still held are kept.
    pub fn empty_until(&self, grant_id: &str, now: Instant, refilled: Instant) {
        let Some(mut leases) = self.shards.lock(grant_id) else {
            return;
        };
        let empty = Lease {
            tokens: 0,
            until: refilled,
        };
        match leases.get_mut(grant_id) {
            Some(lease) if lease.tokens > 0 && now < lease.until => {}
            Some(lease) => *lease = empty,
            None => {
                leases.insert(grant_id.to_owned(), empty);
            }
        }
    }

    /// Number of grants with tokens held.
    pub fn len(&self) -> usize {
        self.shards.all().map(|leases| leases.len()).sum()
    }

    /// True if no tokens are held.
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
        assert_send_sync::<Leases>();
    }

    #[test]
    fn leased_tokens_are_used_once_each_and_lapse() {
        let leases = Leases::new();
        let t0 = Instant::now();
        assert_eq!(leases.take("g", t0), Held::Nothing, "nothing leased");
        leases.hold("g", 3, t0);
        for i in 0..3 {
            assert_eq!(leases.take("g", t0), Held::Token, "token {i}");
        }
        assert_eq!(leases.take("g", t0), Held::Nothing, "three leased, three used");
        assert!(leases.is_empty(), "a spent lease is dropped");
        leases.hold("g", 2, t0);
        assert_eq!(leases.take("g", t0 + LEASE_TTL), Held::Nothing, "lapsed");
        assert!(leases.is_empty(), "a lapsed lease is dropped");
        // Tokens that lapsed are not revived by a new lease.
        leases.hold("g", 5, t0);
        leases.hold("g", 1, t0 + LEASE_TTL * 2);
        assert_eq!(leases.take("g", t0 + LEASE_TTL * 2), Held::Token);
        assert_eq!(leases.take("g", t0 + LEASE_TTL * 2), Held::Nothing);
    }

    #[test]
    fn an_empty_bucket_is_remembered_until_it_refills() {
        let leases = Leases::new();
        let t0 = Instant::now();
        leases.empty_until("g", t0, t0 + Duration::from_secs(10));
        assert_eq!(leases.take("g", t0), Held::Empty(Duration::from_secs(10)));
        assert_eq!(
            leases.take("g", t0 + Duration::from_secs(4)),
            Held::Empty(Duration::from_secs(6))
        );
        assert_eq!(
            leases.take("g", t0 + Duration::from_secs(10)),
            Held::Nothing,
            "refilled: ask again"
        );
        // Tokens leased meanwhile are used first.
        leases.hold("g", 1, t0);
        leases.empty_until("g", t0, t0 + Duration::from_secs(10));
        assert_eq!(leases.take("g", t0), Held::Token);
        // Tokens that lapsed are not: the bucket's emptiness is remembered.
        leases.hold("g", 1, t0);
        let later = t0 + LEASE_TTL;
        leases.empty_until("g", later, later + Duration::from_secs(1));
        assert_eq!(leases.take("g", later), Held::Empty(Duration::from_secs(1)));
    }

    #[test]
    fn a_token_given_back_is_used_again_and_never_overfills() {
        let limiter = RateLimiter::new();
        let t0 = Instant::now();
        limiter.check("g", 2, t0).unwrap();
        limiter.check("g", 2, t0).unwrap();
        assert!(limiter.check("g", 2, t0).is_err());
        limiter.give_back("g", 2, t0);
        assert_eq!(limiter.check("g", 2, t0), Ok(()), "the token given back");
        assert!(limiter.check("g", 2, t0).is_err());
        // A bucket refilled meanwhile keeps its capacity: two, not three.
        let later = t0 + Duration::from_secs(60);
        limiter.give_back("g", 2, later);
        limiter.check("g", 2, later).unwrap();
        limiter.check("g", 2, later).unwrap();
        assert!(limiter.check("g", 2, later).is_err());
        // Unlimited, or a bucket never used: nothing to give back.
        limiter.give_back("free", 0, t0);
        limiter.give_back("unknown", 5, t0);
        assert_eq!(limiter.len(), 1);
    }

    #[test]
    fn a_leased_token_given_back_is_held_again() {
        let leases = Leases::new();
        let t0 = Instant::now();
        leases.hold("g", 1, t0);
        assert_eq!(leases.take("g", t0), Held::Token);
        leases.give_back("g", t0);
        assert_eq!(leases.take("g", t0), Held::Token, "given back");
        assert_eq!(leases.take("g", t0), Held::Nothing);
        // Added to the tokens held, within the lease's life.
        leases.hold("g", 2, t0);
        leases.give_back("g", t0);
        for _ in 0..3 {
            assert_eq!(leases.take("g", t0), Held::Token);
        }
        // A bucket remembered empty: the token given back is used first, then
        // the bucket is asked again.
        leases.empty_until("g", t0, t0 + Duration::from_secs(10));
        leases.give_back("g", t0);
        assert_eq!(leases.take("g", t0), Held::Token);
        assert_eq!(leases.take("g", t0), Held::Nothing);
        // Unused, it lapses like any leased token.
        leases.give_back("g", t0);
        assert_eq!(leases.take("g", t0 + LEASE_TTL), Held::Nothing);
    }

    #[test]
    fn leases_are_per_grant() {
        let leases = Leases::new();
        let t0 = Instant::now();
        leases.hold("a", 1, t0);
        assert_eq!(leases.take("b", t0), Held::Nothing);
        assert_eq!(leases.take("a", t0), Held::Token);
    }

    #[test]
    fn a_lease_is_a_tenth_of_a_seconds_refill() {
        assert_eq!(lease_size(1), 1);
        assert_eq!(lease_size(599), 1);
        assert_eq!(lease_size(6_000), 10);
        assert_eq!(lease_size(60_000), 100);
        assert_eq!(lease_size(u32::MAX), 1024);
    }

    proptest::proptest! {
        /// Whatever the interleaving of leases and uses, a broker uses no
        /// more tokens than it was handed, and none after its lease lapsed.
        #[test]
        fn never_uses_more_than_it_was_handed(
            steps in proptest::collection::vec((0u32..4, 0u64..3_000), 1..60)
        ) {
            let leases = Leases::new();
            let t0 = Instant::now();
            let (mut handed, mut used, mut clock) = (0u64, 0u64, t0);
            let mut last_hold = None;
            for (tokens, advance_ms) in steps {
                clock += Duration::from_millis(advance_ms);
                if tokens > 0 {
                    leases.hold("g", tokens, clock);
                    handed += u64::from(tokens);
                    last_hold = Some(clock);
                } else if leases.take("g", clock) == Held::Token {
                    used += 1;
                    let held_at = last_hold.unwrap_or(t0);
                    proptest::prop_assert!(clock < held_at + LEASE_TTL, "a token used after its lease lapsed");
                }
                proptest::prop_assert!(used <= handed);
            }
        }
    }
}
