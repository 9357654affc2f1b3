//! How long this replica may serve lookups from an authorization snapshot it
//! knows is behind the database.
//!
//! A change committed by any replica (a revoked grant, a disabled member, a
//! revoked certificate, a removed endpoint) reaches this one's snapshot only
//! when a reload succeeds. While none does, the old snapshot would keep
//! honouring what was taken away, so past `limits.max_snapshot_lag_ms` the
//! replica refuses lookups (fail closed) until a reload succeeds. Admin and
//! audit calls go on, so that an admin can repair what blocks the reload.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Whether this replica's snapshot is behind the database, since when, and
/// whether its lookups are refused for it.
pub struct Freshness {
    bound: Duration,
    /// Mirrors `lag.since.is_some()`, so that a lookup on a current snapshot
    /// (the usual case) takes no lock.
    behind: AtomicBool,
    lag: Mutex<Lag>,
    /// `true` while lookups are refused; the health status follows it.
    refusing: watch::Sender<bool>,
}

impl Freshness {
    /// Lookups are refused once the snapshot has been behind for longer than `bound`.
    pub fn new(bound: Duration) -> Freshness {
        Freshness {
            bound,
            behind: AtomicBool::new(false),
            lag: Mutex::new(Lag::default()),
            refusing: watch::channel(false).0,
        }
    }

    /// The bound lookups are refused after.
    pub fn bound(&self) -> Duration {
        self.bound
    }

    fn lag(&self) -> MutexGuard<'_, Lag> {
        // Plain data, consistent after every statement: usable after a panic elsewhere.
        self.lag.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that the database holds a change the snapshot lacks (or may
    /// lack: a reload failed). With `at_once`, the change is known to be
    /// committed and in effect, and lookups are refused from now on rather
    /// than after the bound.
    pub fn behind(&self, at_once: bool) {
        let now = Instant::now();
        let mut lag = self.lag();
        lag.behind(now, at_once);
        self.behind.store(true, Ordering::Release);
        self.settle(&mut lag, now);
    }

    /// Records a reload that succeeded, having started (its lock held) at
    /// `started`: it holds every change known before then.
    pub fn loaded(&self, started: Instant) {
        let mut lag = self.lag();
        let left = lag.loaded(started);
        self.behind.store(lag.since.is_some(), Ordering::Release);
        if left {
            tracing::info!("the authorization snapshot is current again; lookups are served");
            self.refusing.send_replace(false);
        }
    }

    /// Whether lookups are refused now. Moves into the refused state when
    /// the bound has just passed.
    pub fn refusing(&self) -> bool {
        if !self.behind.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        let mut lag = self.lag();
        self.settle(&mut lag, now)
    }

    /// Whether the snapshot is known to be behind (refused or not yet).
    pub fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// When lookups will be refused unless a reload succeeds first; `None`
    /// when the snapshot is current or they are refused already.
    pub fn refuse_at(&self) -> Option<Instant> {
        self.lag().refuse_at(self.bound)
    }

    /// How long the snapshot has been known to be behind; zero when current.
    pub fn behind_for(&self) -> Duration {
        self.lag().since.map(|since| since.elapsed()).unwrap_or_default()
    }

    /// Follows the refused state (`true` while lookups are refused).
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.refusing.subscribe()
    }

    /// Applies the bound at `now`; logs and announces entering the refused state.
    fn settle(&self, lag: &mut Lag, now: Instant) -> bool {
        let (refusing, entered) = lag.check(now, self.bound);
        if entered {
            tracing::warn!(
                behind_ms = lag.since.map(|s| now.saturating_duration_since(s).as_millis() as u64),
                max_snapshot_lag_ms = self.bound.as_millis() as u64,
                "the authorization snapshot is behind the database and cannot be reloaded; lookups are \
                 refused until a reload succeeds (the `snapshot reload failed` lines say why)"
            );
            self.refusing.send_replace(true);
        }
        refusing
    }
}

/// The state machine behind [`Freshness`], on explicit instants.
#[derive(Debug, Default)]
struct Lag {
    /// When the snapshot was first known to be behind; `None` when current.
    since: Option<Instant>,
    /// A committed change could not be loaded: refuse without waiting.
    at_once: bool,
    /// Lookups are refused (the refusal was announced).
    refusing: bool,
}

impl Lag {
    /// Behind from `now`, unless known to be behind since earlier.
    fn behind(&mut self, now: Instant, at_once: bool) {
        self.since.get_or_insert(now);
        self.at_once |= at_once;
    }

    /// A reload that started at `started` succeeded. A change first known
    /// after it started may have been committed after it read the database,
    /// so that mark stays for the next reload. Returns whether lookups were
    /// refused until now.
    fn loaded(&mut self, started: Instant) -> bool {
        if self.since.is_none_or(|since| since > started) {
            return false;
        }
        let was_refusing = self.refusing;
        *self = Lag::default();
        was_refusing
    }

    /// Whether lookups are refused at `now`, and whether that started now.
    fn check(&mut self, now: Instant, bound: Duration) -> (bool, bool) {
        let Some(since) = self.since else {
            return (false, false);
        };
        if self.refusing {
            return (true, false);
        }
        if self.at_once || now.saturating_duration_since(since) >= bound {
            self.refusing = true;
            return (true, true);
        }
        (false, false)
    }

    /// When the bound passes, if lookups are not refused yet.
    fn refuse_at(&self, bound: Duration) -> Option<Instant> {
        match self.since {
            Some(since) if !self.refusing => Some(since.checked_add(bound).unwrap_or(since)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BOUND: Duration = Duration::from_secs(5);

    #[test]
    fn a_snapshot_behind_is_served_within_the_bound_and_refused_past_it_until_a_reload() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut lag = Lag::default();
        assert_eq!(lag.check(at(0), BOUND), (false, false), "current");
        assert_eq!(lag.refuse_at(BOUND), None);

        lag.behind(at(100), false);
        // A second failure does not restart the clock.
        lag.behind(at(3_000), false);
        assert_eq!(lag.refuse_at(BOUND), Some(at(5_100)));
        assert_eq!(lag.check(at(5_099), BOUND), (false, false), "within the bound");
        assert_eq!(lag.check(at(5_100), BOUND), (true, true), "entered once, at the bound");
        assert_eq!(lag.check(at(9_000), BOUND), (true, false), "and stays");
        assert_eq!(lag.refuse_at(BOUND), None);

        // A reload that started before the change was known does not hold it.
        assert!(!lag.loaded(at(50)));
        assert_eq!(lag.check(at(9_001), BOUND), (true, false));
        // One that started after it does.
        assert!(lag.loaded(at(9_002)), "leaving the refused state is reported");
        assert_eq!(lag.check(at(20_000), BOUND), (false, false));
        assert!(!lag.loaded(at(20_001)), "nothing to leave");
    }

    #[test]
    fn a_committed_change_that_cannot_be_loaded_is_refused_at_once() {
        let t0 = Instant::now();
        let mut lag = Lag::default();
        lag.behind(t0, true);
        assert_eq!(lag.check(t0, BOUND), (true, true));
        assert!(lag.loaded(t0 + Duration::from_millis(1)));
        assert_eq!(lag.check(t0 + Duration::from_millis(2), BOUND), (false, false));
        // Cleared with the rest: the next lag waits for the bound again.
        lag.behind(t0 + Duration::from_millis(3), false);
        assert_eq!(lag.check(t0 + Duration::from_millis(4), BOUND), (false, false));
    }

    #[tokio::test]
    async fn the_refused_state_is_announced_on_entering_and_leaving() {
        let freshness = Freshness::new(Duration::from_millis(1));
        let mut refusing = freshness.subscribe();
        assert!(!freshness.refusing() && !freshness.is_behind());
        freshness.behind(false);
        assert!(freshness.is_behind());
        std::thread::sleep(Duration::from_millis(5));
        assert!(freshness.refusing());
        assert!(*refusing.borrow_and_update());
        freshness.loaded(Instant::now());
        assert!(!freshness.refusing() && !freshness.is_behind());
        assert!(refusing.has_changed().unwrap());
        assert!(!*refusing.borrow_and_update());
        assert_eq!(freshness.behind_for(), Duration::ZERO);
    }
}
