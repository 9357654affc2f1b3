//! The open loop's load generator: one thread that sends each request at its
//! due time and handles the answers.
//!
//! The thread runs its own single-threaded Tokio runtime, with the target's
//! connections dialled again on it, and waits for the next due time on a
//! `timerfd` in that runtime's epoll set (on Linux; elsewhere on Tokio's
//! timer, to the millisecond). It then wakes once for a due
//! request or for an answer, and no other thread is woken to send: a
//! generator that hands each request to another thread pays a wake-up per
//! request, which on a small virtual machine costs more than the request,
//! and adds its own delay to every latency it measures (BENCHMARKS.md,
//! fifteenth round). Tokio's timer rounds to the millisecond, too coarse to
//! pace a few thousand requests a second.

use super::{Arrivals, CALL_TIMEOUT, CallError, Live, OPEN_LOOP_MAX_OUTSTANDING, Target, micros};
use anyhow::{Context, Result, anyhow};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use timer::Timer;

/// What the pacer shares with the phase that watches it.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) live: Arc<Live>,
    pub(super) recorded: Arc<Mutex<Histogram<u64>>>,
    /// Requests sent and not yet answered.
    pub(super) outstanding: Arc<AtomicU64>,
    /// Measured requests not sent because [`OPEN_LOOP_MAX_OUTSTANDING`] were
    /// already waiting.
    pub(super) dropped: Arc<AtomicU64>,
    /// How late each measured request was sent after its due time, in µs:
    /// the generator's own delay, already inside the latencies.
    pub(super) send_lag: Arc<Mutex<Histogram<u64>>>,
}

/// The schedule: requests due at `rate` a second on average, spaced as
/// `arrivals` says, the first `warmup` unmeasured, until `warmup + duration`
/// has passed.
#[derive(Clone, Copy)]
pub(super) struct Schedule {
    pub(super) rate: f64,
    pub(super) arrivals: Arrivals,
    /// Seeds the Poisson gaps, so every scenario and round of a run gets the
    /// same arrival times.
    pub(super) seed: u64,
    pub(super) warmup: Duration,
    pub(super) duration: Duration,
}

/// When each request is due after the start, in order.
struct DueTimes {
    /// Mean gap between two requests, in nanoseconds.
    gap_ns: f64,
    /// `None`: evenly spaced.
    poisson: Option<SmallRng>,
    next: u64,
    /// The Poisson schedule's running sum, in nanoseconds.
    at_ns: f64,
}

impl DueTimes {
    fn new(schedule: &Schedule) -> DueTimes {
        DueTimes {
            gap_ns: 1e9 / schedule.rate,
            poisson: match schedule.arrivals {
                Arrivals::Even => None,
                Arrivals::Poisson => Some(SmallRng::seed_from_u64(schedule.seed)),
            },
            next: 0,
            at_ns: 0.0,
        }
    }
}

impl Iterator for DueTimes {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let at_ns = match &mut self.poisson {
            // From the index, not a running sum, so rounding never drifts.
            None => self.next as f64 * self.gap_ns,
            Some(rng) => {
                let at = self.at_ns;
                // Exponential gaps (inverse transform): 1 - u is in (0, 1], so the logarithm is finite.
                let u: f64 = rng.r#gen();
                self.at_ns += -(1.0_f64 - u).ln() * self.gap_ns;
                at
            }
        };
        self.next += 1;
        Some(Duration::from_nanos(at_ns as u64))
    }
}

/// The pacer's thread, once it has connected and started the schedule.
pub(super) struct Pacer {
    pub(super) started: Instant,
    pub(super) thread: JoinHandle<()>,
}

/// Starts the pacer on its own thread and returns once the target's
/// connections are open and the first request is due, or with the reason
/// they could not be opened.
pub(super) async fn start(target: &Target, schedule: Schedule, shared: &Shared) -> Result<Pacer> {
    let (ready, started) = tokio::sync::oneshot::channel::<Result<Instant>>();
    let (target, shared) = (target.clone(), shared.clone());
    let thread = std::thread::Builder::new()
        .name("bench-pacer".into())
        .spawn(move || run(target, schedule, shared, ready))
        .context("starting the open loop's thread")?;
    let started = started
        .await
        .map_err(|_| anyhow!("the open loop's thread stopped before it started"))??;
    Ok(Pacer { started, thread })
}

fn run(target: Target, schedule: Schedule, shared: Shared, ready: tokio::sync::oneshot::Sender<Result<Instant>>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(anyhow!(e).context("building the open loop's runtime")));
            return;
        }
    };
    runtime.block_on(async move {
        let prepared = async {
            let target = target
                .redial()
                .await
                .context("connecting the open loop to its target")?;
            let timer = Timer::new().context("creating the open loop's timer")?;
            Ok::<_, anyhow::Error>((target, timer))
        };
        let (target, timer) = match prepared.await {
            Ok(p) => p,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let started = Instant::now();
        if ready.send(Ok(started)).is_err() {
            return;
        }
        pace(&target, &timer, schedule, started, &shared).await;
        // Late answers to requests due inside the window still count: that is the point.
        let drain_until = Instant::now() + CALL_TIMEOUT + Duration::from_secs(1);
        while shared.outstanding.load(Ordering::Relaxed) > 0 && Instant::now() < drain_until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

async fn pace(target: &Target, timer: &Timer, schedule: Schedule, started: Instant, shared: &Shared) {
    let measure_from = started + schedule.warmup;
    let end = measure_from + schedule.duration;
    let mut lag = super::histogram();
    let mut i: u64 = 0;
    for offset in DueTimes::new(&schedule) {
        let intended = started + offset;
        if intended >= end {
            break;
        }
        if intended > Instant::now()
            && let Err(e) = timer.sleep_until(intended).await
        {
            // Pacing on stops being open loop; say why and stop sending.
            shared.live.error(
                &CallError {
                    code: tonic::Code::Internal,
                    message: format!("the open loop's timer failed: {e}"),
                },
                true,
            );
            break;
        }
        let measured = intended >= measure_from;
        if measured {
            lag.saturating_record(micros(intended.elapsed()));
        }
        if shared.outstanding.load(Ordering::Relaxed) >= OPEN_LOOP_MAX_OUTSTANDING {
            if measured {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
            i += 1;
            continue;
        }
        shared.outstanding.fetch_add(1, Ordering::Relaxed);
        let (target, shared) = (target.clone(), shared.clone());
        // On this thread's runtime: no other thread is woken to send it.
        tokio::spawn(async move {
            let result = target.call(i).await;
            let latency = micros(intended.elapsed());
            match result {
                Ok(()) if measured => {
                    if let Ok(mut h) = shared.recorded.lock() {
                        h.saturating_record(latency);
                    }
                    shared.live.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(()) => {}
                Err(e) => shared.live.error(&e, measured),
            }
            shared.outstanding.fetch_sub(1, Ordering::Relaxed);
        });
        i += 1;
    }
    if let Ok(mut h) = shared.send_lag.lock() {
        let _ = h.add(&lag);
    }
}

#[cfg(target_os = "linux")]
mod timer {
    use rustix::time::{
        ClockId, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags, Timespec, clock_gettime, timerfd_create,
        timerfd_settime,
    };
    use std::os::fd::OwnedFd;
    use std::time::{Duration, Instant};
    use tokio::io::unix::AsyncFd;

    /// A `timerfd` registered with the current runtime: an absolute deadline on
    /// the monotonic clock (the one [`Instant`] reads on Linux), to the timer
    /// slack's precision.
    pub(super) struct Timer {
        fd: AsyncFd<OwnedFd>,
        /// An [`Instant`] and the monotonic clock's reading at that moment, to
        /// turn one into the other.
        origin: (Instant, Duration),
    }

    impl Timer {
        pub(super) fn new() -> std::io::Result<Timer> {
            let fd = timerfd_create(
                TimerfdClockId::Monotonic,
                TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
            )?;
            let now = Instant::now();
            let clock = clock_gettime(ClockId::Monotonic);
            let clock = Duration::new(
                u64::try_from(clock.tv_sec).unwrap_or(0),
                u32::try_from(clock.tv_nsec).unwrap_or(0),
            );
            // Sound for an `OwnedFd`: it stays open, and the same descriptor, for
            // as long as the `AsyncFd` owns it, which is what tokio's `unsafe`
            // replacement (`register`) asks its caller to promise. The workspace
            // forbids `unsafe`, so the safe, deprecated constructor it is.
            #[allow(deprecated)]
            let fd = AsyncFd::with_interest(fd, tokio::io::Interest::READABLE)?;
            Ok(Timer {
                fd,
                origin: (now, clock),
            })
        }

        pub(super) async fn sleep_until(&self, at: Instant) -> std::io::Result<()> {
            let (origin, clock) = self.origin;
            let due = clock + at.saturating_duration_since(origin);
            let value = Timespec {
                tv_sec: i64::try_from(due.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(due.subsec_nanos()),
            };
            let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
            // A past deadline fires at once. (`value` is never zero, which would disarm it:
            // the monotonic clock is well past zero once anything runs.)
            timerfd_settime(
                self.fd.get_ref(),
                TimerfdTimerFlags::ABSTIME,
                &Itimerspec {
                    it_interval: zero,
                    it_value: value,
                },
            )?;
            loop {
                let mut ready = self.fd.readable().await?;
                let mut expirations = [0u8; 8];
                match ready.try_io(|fd| rustix::io::read(fd.get_ref(), &mut expirations).map_err(std::io::Error::from))
                {
                    Ok(result) => return result.map(|_| ()),
                    Err(_would_block) => continue,
                }
            }
        }
    }
}

/// Without a `timerfd`, Tokio's timer: requests due within the same
/// millisecond leave together, their latencies still counted from their own
/// due times.
#[cfg(not(target_os = "linux"))]
mod timer {
    use std::time::Instant;

    pub(super) struct Timer;

    impl Timer {
        pub(super) fn new() -> std::io::Result<Timer> {
            Ok(Timer)
        }

        pub(super) async fn sleep_until(&self, at: Instant) -> std::io::Result<()> {
            tokio::time::sleep_until(at.into()).await;
            Ok(())
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::{Connections, Dial, histogram};
    use super::*;

    /// A target that stopped taking connections after the closed loop costs
    /// the open loop a clear error, not a hang or a panic.
    #[tokio::test]
    async fn a_target_that_refuses_connections_fails_the_start_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        lienthong_tls::init_dir(dir.path(), "bench.test").unwrap();
        lienthong_tls::issue_member_in_dir(dir.path(), "consumer", &[]).unwrap();
        let material = lienthong_tls::TlsMaterial::load(&crate::client::member_files(dir.path(), "consumer")).unwrap();
        let config = lienthong_tls::client_config(&material, None).unwrap();
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let target = Target::fetch(
            Connections {
                channels: Vec::new(),
                dials: vec![Dial {
                    url: format!("https://127.0.0.1:{port}"),
                    config,
                }],
            },
            Arc::from(Vec::new()),
        );
        let shared = Shared {
            live: Arc::default(),
            recorded: Arc::new(Mutex::new(histogram())),
            outstanding: Arc::default(),
            dropped: Arc::default(),
            send_lag: Arc::new(Mutex::new(histogram())),
        };
        let schedule = Schedule {
            rate: 100.0,
            arrivals: Arrivals::Even,
            seed: 0,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
        };
        let e = match start(&target, schedule, &shared).await {
            Ok(_) => panic!("the open loop started against a closed port"),
            Err(e) => format!("{e:#}"),
        };
        assert!(e.contains("connecting the open loop to its target"), "{e}");
        assert_eq!(shared.live.ok.load(Ordering::Relaxed), 0);
    }

    fn due_times(arrivals: Arrivals, seed: u64, n: usize) -> Vec<Duration> {
        let schedule = Schedule {
            rate: 4_000.0,
            arrivals,
            seed,
            warmup: Duration::ZERO,
            duration: Duration::from_secs(1),
        };
        DueTimes::new(&schedule).take(n).collect()
    }

    #[test]
    fn even_arrivals_are_due_every_one_over_the_rate() {
        let due = due_times(Arrivals::Even, 1, 4_001);
        assert_eq!(due[0], Duration::ZERO);
        assert_eq!(due[1], Duration::from_micros(250));
        assert_eq!(due[2_000], Duration::from_millis(500));
        assert_eq!(due[4_000], Duration::from_secs(1));
    }

    /// What `--arrivals poisson` promises: the asked-for rate on average,
    /// gaps spread as an exponential distribution's (not even ones), and the
    /// same arrival times for every scenario of a run.
    #[test]
    fn poisson_arrivals_keep_the_rate_with_exponential_gaps_and_repeat_with_the_seed() {
        let n = 200_000;
        let due = due_times(Arrivals::Poisson, 2020, n + 1);
        assert_eq!(due, due_times(Arrivals::Poisson, 2020, n + 1), "same seed, other times");
        assert_ne!(
            due,
            due_times(Arrivals::Poisson, 2021, n + 1),
            "another seed, same times"
        );
        assert_eq!(due[0], Duration::ZERO);
        // `Duration` subtraction panics if a request were due before the one ahead of it.
        let gaps: Vec<f64> = due.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e6).collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!((mean - 250.0).abs() < 2.5, "mean gap {mean} µs at 4,000/s");
        // An exponential distribution's standard deviation is its mean; even gaps have none.
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        assert!((sd / mean - 1.0).abs() < 0.02, "coefficient of variation {}", sd / mean);
        // And 1 - 1/e of its gaps are shorter than the mean.
        let short = gaps.iter().filter(|&&g| g < mean).count() as f64 / n as f64;
        assert!(
            (short - (1.0 - (-1.0_f64).exp())).abs() < 0.005,
            "{short} of the gaps below the mean"
        );
    }

    #[tokio::test]
    async fn the_timer_never_fires_early_and_a_past_deadline_returns_at_once() {
        let timer = Timer::new().unwrap();
        for _ in 0..20 {
            let at = Instant::now() + Duration::from_micros(300);
            timer.sleep_until(at).await.unwrap();
            assert!(Instant::now() >= at, "the timer fired before its deadline");
        }
        // A deadline already past must not disarm the timer and wait for ever.
        let past = timer.sleep_until(Instant::now() - Duration::from_millis(1));
        tokio::time::timeout(Duration::from_secs(10), past)
            .await
            .expect("a past deadline fires at once")
            .unwrap();
    }
}
