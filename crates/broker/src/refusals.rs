//! Bounds what callers without a valid identity can write to the permanent
//! access log. Every refused request is still counted and logged, but an
//! address (an IPv6 /64) refused more than [`PER_MINUTE`] times a minute gets one summary
//! entry per interval instead of one entry per request: a host with no
//! certificate looping on an RPC would otherwise grow the log for ever and
//! take the audit writer's time from real lookups.

use lienthong_core::ratelimit::RateLimiter;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Instant;

/// Refusals an address may have logged one by one per minute.
pub const PER_MINUTE: u32 = 600;
/// Addresses counted apart at most; beyond, their counts go to `::` so that
/// many addresses cannot grow this map either.
const MAX_ADDRESSES: usize = 4096;

/// The address a budget belongs to: an IPv4 address, or an IPv6 address's
/// /64. One IPv6 host is given a whole /64 and can rotate through it: a
/// budget per address would let it log every refusal.
fn network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
        v4 => v4,
    }
}

/// Per-address gate on authentication-failure entries.
#[derive(Default)]
pub struct RefusalGate {
    limiter: RateLimiter,
    suppressed: Mutex<HashMap<IpAddr, u64>>,
}

impl RefusalGate {
    /// True when a refusal from `addr` gets an entry of its own; otherwise it
    /// is counted for the next [`RefusalGate::take`]. A refusal from an
    /// unknown address is always logged.
    pub fn admit(&self, addr: Option<IpAddr>, now: Instant) -> bool {
        let Some(ip) = addr.map(network) else { return true };
        if self.limiter.check(&ip.to_string(), PER_MINUTE, now).is_ok() {
            return true;
        }
        let mut suppressed = self.suppressed.lock().unwrap_or_else(|p| p.into_inner());
        let key = if suppressed.len() >= MAX_ADDRESSES && !suppressed.contains_key(&ip) {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            ip
        };
        *suppressed.entry(key).or_default() += 1;
        false
    }

    /// The refusals counted since the last call, by address, and forgets the
    /// addresses whose buckets are full again.
    pub fn take(&self, now: Instant) -> Vec<(IpAddr, u64)> {
        self.limiter.prune(now);
        let mut suppressed = self.suppressed.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts: Vec<(IpAddr, u64)> = suppressed.drain().collect();
        counts.sort();
        counts
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn an_address_past_its_budget_is_counted_not_logged() {
        let gate = RefusalGate::default();
        let now = Instant::now();
        let flood = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
        let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8));
        let logged = (0..PER_MINUTE + 250).filter(|_| gate.admit(Some(flood), now)).count();
        assert_eq!(logged, PER_MINUTE as usize, "a burst of a minute's budget is logged");
        assert!(gate.admit(Some(other), now), "another address has its own budget");
        assert!(gate.admit(None, now), "an unknown address is always logged");
        assert_eq!(gate.take(now), [(flood, 250)]);
        assert!(gate.take(now).is_empty(), "counts are handed over once");
        // A minute later the budget is back.
        assert!(gate.admit(Some(flood), now + std::time::Duration::from_secs(60)));
    }

    /// One host of an IPv6 /64 rotating its address shares one budget.
    #[test]
    fn an_ipv6_prefix_shares_one_budget() {
        let gate = RefusalGate::default();
        let now = Instant::now();
        let base: u128 = "2001:db8:1:2::".parse::<Ipv6Addr>().unwrap().into();
        let logged = (0..PER_MINUTE as u128 + 100)
            .filter(|i| gate.admit(Some(IpAddr::V6(Ipv6Addr::from(base + i + 1))), now))
            .count();
        assert_eq!(logged, PER_MINUTE as usize);
        let prefix = IpAddr::V6("2001:db8:1:2::".parse().unwrap());
        assert_eq!(gate.take(now), [(prefix, 100)]);
        assert!(
            gate.admit(Some(IpAddr::V6("2001:db8:1:3::1".parse().unwrap())), now),
            "the next /64"
        );
    }

    #[test]
    fn many_addresses_cannot_grow_the_counts() {
        let gate = RefusalGate::default();
        let now = Instant::now();
        let mut logged = 0;
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            for _ in 0..=PER_MINUTE {
                logged += usize::from(gate.admit(Some(ip), now));
            }
        }
        let counts = gate.take(now);
        assert_eq!(counts.len(), MAX_ADDRESSES + 1, "{} addresses kept", counts.len());
        assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), MAX_ADDRESSES as u64 + 10);
        assert_eq!(counts[0], (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 1));
        assert!(counts.contains(&(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 10)));
        assert_eq!(logged, (MAX_ADDRESSES + 10) * PER_MINUTE as usize);
    }
}
