//! Where a relayed lookup's time goes inside the broker: the broker's own
//! Prometheus histograms (the lookup, its call to the register, its wait for
//! the audit commit), scraped before and after a phase and subtracted.
//!
//! The load generator sees only the whole round trip. Split this way, a run
//! shows whether a slow relayed lookup waited for the disk (the audit wait)
//! or for a core (the register call slows down as much when the machine is
//! busy, though the register itself is as fast as in the direct phase).

use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The broker's histogram of the Lookup RPC, from arrival to answer.
const LOOKUP: &str = "lienthong_request_duration_seconds";
/// Its histogram of calls to registers.
const PROVIDER_CALL: &str = "lienthong_provider_call_duration_seconds";
/// Its histogram of waits for an audit entry to be durable.
const AUDIT_WAIT: &str = "lienthong_audit_append_duration_seconds";
/// Longest a scrape may take before the phase goes without the split.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest `/metrics` answer read; the broker's is a few tens of KiB.
const MAX_ANSWER: u64 = 4 << 20;

/// One histogram family, summed over the series the bench counts.
#[derive(Clone, Debug, Default, PartialEq)]
struct Summed {
    count: f64,
    sum: f64,
    /// (upper bound in seconds, cumulative count), ascending, `+Inf` last.
    buckets: Vec<(f64, f64)>,
}

impl Summed {
    fn add_bucket(&mut self, le: f64, cumulative: f64) {
        match self.buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += cumulative,
            None => {
                self.buckets.push((le, cumulative));
                self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }

    fn add(&mut self, other: &Summed) {
        self.count += other.count;
        self.sum += other.sum;
        for &(le, c) in &other.buckets {
            self.add_bucket(le, c);
        }
    }

    /// What was observed between `before` (an earlier scrape) and `self`.
    fn since(&self, before: &Summed) -> Summed {
        let earlier = |le: f64| before.buckets.iter().find(|(b, _)| *b == le).map_or(0.0, |(_, c)| *c);
        Summed {
            count: (self.count - before.count).max(0.0),
            sum: (self.sum - before.sum).max(0.0),
            buckets: self
                .buckets
                .iter()
                .map(|&(le, c)| (le, (c - earlier(le)).max(0.0)))
                .collect(),
        }
    }

    /// The `q` quantile in seconds, interpolated linearly inside its bucket
    /// as Prometheus's `histogram_quantile` does; the last finite bound when
    /// it falls in `+Inf`.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        let (mut lower, mut below) = (0.0, 0.0);
        for &(le, cumulative) in &self.buckets {
            if cumulative >= rank {
                if le.is_infinite() {
                    return Some(lower);
                }
                let inside = cumulative - below;
                let fraction = if inside > 0.0 { (rank - below) / inside } else { 1.0 };
                return Some(lower + (le - lower) * fraction);
            }
            (lower, below) = (le, cumulative);
        }
        Some(lower)
    }

    fn timing(&self) -> Option<Timing> {
        let ms = |s: f64| (s * 1e6).round() / 1e3;
        Some(Timing {
            count: self.count as u64,
            mean_ms: ms(self.sum / self.count.max(1.0)),
            p50_ms: ms(self.quantile(0.5)?),
            p99_ms: ms(self.quantile(0.99)?),
        })
    }
}

/// The broker's timings at one instant, summed over its replicas.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Scrape {
    lookup: Summed,
    provider_call: Summed,
    audit_wait: Summed,
}

impl Scrape {
    /// Reads the three families from Prometheus's text exposition format.
    fn parse(text: &str) -> Scrape {
        let mut s = Scrape::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            for (family, into) in [
                (LOOKUP, &mut s.lookup),
                (PROVIDER_CALL, &mut s.provider_call),
                (AUDIT_WAIT, &mut s.audit_wait),
            ] {
                let Some(part) = name.strip_prefix(family) else {
                    continue;
                };
                // Only Lookup: Collect and the admin RPCs share the family.
                if family == LOOKUP && !labels.contains(r#"rpc="lookup""#) {
                    continue;
                }
                match part {
                    "_count" => into.count += value,
                    "_sum" => into.sum += value,
                    "_bucket" => {
                        if let Some(le) = label(labels, "le").and_then(|v| v.parse::<f64>().ok()) {
                            into.add_bucket(le, value);
                        }
                    }
                    _ => {}
                }
            }
        }
        s
    }

    fn add(&mut self, other: &Scrape) {
        self.lookup.add(&other.lookup);
        self.provider_call.add(&other.provider_call);
        self.audit_wait.add(&other.audit_wait);
    }
}

/// The value of `key` in a label set such as `provider="x",le="0.5"}`.
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let rest = labels.get(start..)?;
    rest.get(..rest.find('"')?)
}

/// One of the broker's timings over a phase.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(super) struct Timing {
    /// Observations in the phase.
    pub count: u64,
    /// Exact: the histogram's sum over its count.
    pub mean_ms: f64,
    /// Interpolated inside the histogram's factor-2 buckets (from 0.25 ms).
    pub p50_ms: f64,
    /// Likewise.
    pub p99_ms: f64,
}

/// A relayed phase as the broker timed it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(super) struct InsideBroker {
    /// The Lookup RPC, from its arrival at the broker's service to the answer.
    pub lookup: Option<Timing>,
    /// The call to the register inside it.
    pub provider_call: Option<Timing>,
    /// The wait for the lookup's audit entry to be durable inside it.
    pub audit_wait: Option<Timing>,
}

/// What the broker observed between two scrapes.
pub(super) fn between(before: &Scrape, after: &Scrape) -> InsideBroker {
    InsideBroker {
        lookup: after.lookup.since(&before.lookup).timing(),
        provider_call: after.provider_call.since(&before.provider_call).timing(),
        audit_wait: after.audit_wait.since(&before.audit_wait).timing(),
    }
}

/// Scrapes every broker's `/metrics` and sums them; `None` when there is no
/// broker to ask or one does not answer in time.
pub(super) async fn scrape(brokers: &[SocketAddr]) -> Option<Scrape> {
    if brokers.is_empty() {
        return None;
    }
    let mut total = Scrape::default();
    for &addr in brokers {
        let text = tokio::time::timeout(SCRAPE_TIMEOUT, get_metrics(addr))
            .await
            .ok()?
            .ok()?;
        total.add(&Scrape::parse(&text));
    }
    Some(total)
}

/// The broker's gauge of where its check of the audit log's history stands.
const HISTORY_CHECK: &str = "lienthong_audit_history_check";

/// The state the history check is in (`running`, `passed`, `failed`): the
/// label of the series set to 1.
fn history_check_state(exposition: &str) -> Option<&str> {
    exposition.lines().find_map(|line| {
        let (labels, value) = line.strip_prefix(HISTORY_CHECK)?.strip_prefix('{')?.split_once('}')?;
        if value.trim() == "1" {
            label(labels, "state")
        } else {
            None
        }
    })
}

/// Waits until the broker whose `/metrics` is at `addr` has checked its audit
/// log's history against the signed root; measuring meanwhile would time the
/// lookups beside a read of the whole log.
pub(super) async fn wait_history_checked(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match tokio::time::timeout(SCRAPE_TIMEOUT, get_metrics(addr)).await {
            Ok(Ok(text)) => match history_check_state(&text) {
                Some("passed") => return Ok(()),
                Some("failed") => {
                    anyhow::bail!("the restarted broker found its audit log's history altered; its log says why")
                }
                state => format!("check {}", state.unwrap_or("not reported")),
            },
            Ok(Err(e)) => e.to_string(),
            Err(_) => "metrics did not answer in time".into(),
        };
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the restarted broker did not finish checking its audit log's history within {} s ({last})",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /metrics` over HTTP/1.0, so that the answer ends with the connection.
async fn get_metrics(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut answer = String::new();
    stream.take(MAX_ANSWER).read_to_string(&mut answer).await?;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("the metrics answer has no header end".into()))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        return Err(bad(format!("the metrics listener answered {status:?}")));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_check_state_is_the_series_set_to_one() {
        let text = "# HELP lienthong_audit_history_check Check\n\
            # TYPE lienthong_audit_history_check gauge\n\
            lienthong_audit_history_check{state=\"running\"} 0\n\
            lienthong_audit_history_check{state=\"passed\"} 1\n\
            lienthong_audit_history_check{state=\"failed\"} 0\n";
        assert_eq!(history_check_state(text), Some("passed"));
        assert_eq!(history_check_state(&text.replace("} 1", "} 0")), None);
        assert_eq!(history_check_state("lienthong_audit_queued_appends 1\n"), None);
    }

    fn exposition(lookups: u32, slow: u32) -> String {
        // Two Lookup series (two outcomes) and one Collect series that must
        // not count; buckets cumulative as Prometheus writes them.
        let fast = lookups - slow;
        format!(
            "# HELP lienthong_request_duration_seconds Latency.\n\
             lienthong_request_duration_seconds_sum{{rpc=\"lookup\",record_type=\"b\",outcome=\"allowed\"}} {}\n\
             lienthong_request_duration_seconds_count{{rpc=\"lookup\",record_type=\"b\",outcome=\"allowed\"}} {lookups}\n\
             lienthong_request_duration_seconds_bucket{{le=\"0.001\",rpc=\"lookup\",record_type=\"b\",outcome=\"allowed\"}} {fast}\n\
             lienthong_request_duration_seconds_bucket{{le=\"0.002\",rpc=\"lookup\",record_type=\"b\",outcome=\"allowed\"}} {fast}\n\
             lienthong_request_duration_seconds_bucket{{le=\"0.004\",rpc=\"lookup\",record_type=\"b\",outcome=\"allowed\"}} {lookups}\n\
             lienthong_request_duration_seconds_bucket{{le=\"+Inf\",rpc=\"lookup\",record_type=\"b\",outcome=\"allowed\"}} {lookups}\n\
             lienthong_request_duration_seconds_sum{{rpc=\"lookup\",record_type=\"b\",outcome=\"denied\"}} 0.0\n\
             lienthong_request_duration_seconds_count{{rpc=\"lookup\",record_type=\"b\",outcome=\"denied\"}} 0\n\
             lienthong_request_duration_seconds_sum{{rpc=\"collect\",record_type=\"b\",outcome=\"allowed\"}} 9.0\n\
             lienthong_request_duration_seconds_count{{rpc=\"collect\",record_type=\"b\",outcome=\"allowed\"}} 9\n\
             lienthong_request_duration_seconds_bucket{{le=\"0.001\",rpc=\"collect\",record_type=\"b\",outcome=\"allowed\"}} 9\n\
             lienthong_provider_call_duration_seconds_sum{{provider=\"civil-status\"}} {}\n\
             lienthong_provider_call_duration_seconds_count{{provider=\"civil-status\"}} {lookups}\n\
             lienthong_provider_call_duration_seconds_bucket{{provider=\"civil-status\",le=\"0.001\"}} {lookups}\n\
             lienthong_provider_call_duration_seconds_bucket{{provider=\"civil-status\",le=\"+Inf\"}} {lookups}\n\
             lienthong_audit_append_duration_seconds_sum 0.0\n\
             lienthong_audit_append_duration_seconds_count 0\n\
             # EOF\n",
            f64::from(fast) * 0.0005 + f64::from(slow) * 0.003,
            f64::from(lookups) * 0.0005,
        )
    }

    #[test]
    fn a_phase_is_what_the_broker_observed_between_two_scrapes() {
        let before = Scrape::parse(&exposition(100, 0));
        // 100 more lookups in the phase: 90 under 1 ms, 10 between 2 and 4 ms.
        let after = Scrape::parse(&exposition(200, 10));
        let inside = between(&before, &after);
        let lookup = inside.lookup.expect("lookups were observed");
        assert_eq!(lookup.count, 100, "Collect's series must not count");
        // (90 × 0.5 ms + 10 × 3 ms) / 100 less nothing: the first scrape had
        // 100 at 0.5 ms, the second 190 at 0.5 ms and 10 at 3 ms.
        assert!((lookup.mean_ms - 0.75).abs() < 1e-9, "{lookup:?}");
        // The median falls in the first bucket, interpolated from 0.
        assert!((lookup.p50_ms - 0.5 / 0.9).abs() < 1e-3, "{lookup:?}");
        // The 99th percentile falls between 2 and 4 ms: rank 99 of 100, the
        // bucket holds ranks 91..100.
        assert!((lookup.p99_ms - (2.0 + 2.0 * 9.0 / 10.0)).abs() < 1e-9, "{lookup:?}");
        let call = inside.provider_call.expect("calls were observed");
        assert_eq!((call.count, call.mean_ms), (100, 0.5));
        assert_eq!(inside.audit_wait, None, "no audit wait was observed");
    }

    #[test]
    fn replicas_are_summed_and_a_quantile_past_the_last_bound_is_that_bound() {
        let mut both = Scrape::parse(&exposition(50, 0));
        both.add(&Scrape::parse(&exposition(50, 0)));
        assert_eq!(both.lookup.count, 100.0);
        assert_eq!(both.lookup.buckets.first(), Some(&(0.001, 100.0)));
        let tail = Summed {
            count: 10.0,
            sum: 100.0,
            buckets: vec![(0.5, 1.0), (f64::INFINITY, 10.0)],
        };
        assert_eq!(tail.quantile(0.99), Some(0.5));
    }

    #[test]
    fn labels_are_read_by_name() {
        assert_eq!(label(r#"provider="a",le="0.25""#, "le"), Some("0.25"));
        assert_eq!(label(r#"le="+Inf""#, "le"), Some("+Inf"));
        assert_eq!(label(r#"provider="a""#, "le"), None);
    }

    #[tokio::test]
    async fn a_broker_that_does_not_answer_gives_no_split() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        assert_eq!(scrape(&[addr]).await, None);
        assert_eq!(scrape(&[]).await, None);
    }
}
