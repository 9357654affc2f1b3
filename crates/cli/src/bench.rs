//! `lienthong bench`: what the broker costs compared with calling the register
//! directly and with a plain reverse proxy, measured in one run on the same
//! payloads, all with mutual TLS.
//!
//! The scenarios share one demo civil-status register (a kit provider, its
//! own process):
//! * `direct`: the load generator calls `RecordProvider.Fetch` itself,
//!   presenting the broker's certificate (a register only answers the broker);
//! * `relayed`: `Exchange.Lookup` through a broker (`lienthong serve`, its own
//!   process) with authorization, query and record validation, field filtering,
//!   rate limiting and durable audit (SQLite in the run's directory);
//! * `proxy`: `RecordProvider.Fetch` through nginx `grpc_pass`, which checks the
//!   consumer's certificate and calls the register with the broker's;
//! * `bare`: `RecordProvider.Fetch` through the broker's own TLS, gRPC and relay
//!   stack with none of its work (`lienthong bench-bare`, see `crate::bare`):
//!   what the stack costs against nginx, and what the broker's work adds;
//! * `relayed-pg`: the relayed lookup through a broker on PostgreSQL (a
//!   throwaway cluster the bench starts with `initdb`/`pg_ctl`);
//! * `relayed-pg-2`: the same through two broker replicas on that database, the
//!   load generator alternating between them as a round-robin balancer would.
//!
//! Servers run as separate processes so their CPU time and memory are read
//! from `/proc/<pid>` without counting the load generator.

mod disk;
mod fill;
mod inside;
mod pacer;

use crate::client::{member_files, status_error};
use crate::federation::{
    ADMIN, CIVIL_STATUS, JUDICIAL_OFFICE, MEMBERS, PURPOSE_DATA_SHARING, definition_from_json, demo_grants, make_certs,
};
use anyhow::{Context, Result, anyhow, bail};
use disk::{DiskReport, probe_fsync};
use hdrhistogram::Histogram;
use lienthong::provider::v1::FetchRequest;
use lienthong::provider::v1::record_provider_client::RecordProviderClient;
use lienthong::v1 as pb;
use lienthong::v1::exchange_client::ExchangeClient;
use lienthong_provider::demo::{BIRTH_RECORD, citizen_national_id};
use lienthong_store::testing::PgCluster;
use lienthong_tls::{Identity, TlsMaterial};
use serde::Serialize;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Deadline each benchmark call carries (`grpc-timeout`).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Latencies above this are recorded as this (microseconds).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Requests a single HTTP/2 connection carries at once in the in-flight probe;
/// hyper's servers allow 200 concurrent streams by default.
const STREAMS_PER_CONNECTION: usize = 100;
/// Open loop: requests still outstanding beyond which new ones are counted as
/// dropped instead of sent, so an overloaded target cannot exhaust memory.
const OPEN_LOOP_MAX_OUTSTANDING: u64 = 50_000;
/// Open loop: a p99 send lag from this many µs up is worth a note beside the
/// latencies it is part of.
const SEND_LAG_WORTH_NOTING_US: u64 = 1_000;
/// Rate limit of the benchmark grant: high enough never to refuse, so the
/// limiter runs but does not shape the load.
const BENCH_RATE_LIMIT_PER_MINUTE: u32 = 1_000_000_000;
/// Log filter of the bench's broker and bare relay: the bench measures
/// serving, not logging (nor the spans an `info` filter creates).
const BENCH_LOG_FILTER: &str = "warn";
/// `USER_HZ`: the unit of CPU times in `/proc/<pid>/stat` (100 on every Linux
/// architecture lienthong builds for).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// `lienthong bench` options.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Measure the broker against a direct call and an nginx proxy, all with mutual TLS",
    long_about = "Measure the broker against a direct call and an nginx proxy, all with mutual TLS.\n\n\
        Starts a demo civil-status register and a broker (`lienthong serve`, SQLite audit log in the run's \
        directory) as separate processes, and nginx (`grpc_pass`, mutual TLS on both sides) when it is \
        installed. The load generator then measures, on the same birth-record payloads:\n  \
        direct   RecordProvider.Fetch on the register, presenting the broker's certificate\n  \
        relayed  Exchange.Lookup through the broker: authorization, query and record validation, field \
        filtering, rate limiting, durable audit\n  \
        proxy    RecordProvider.Fetch through nginx grpc_pass\n  \
        bare     RecordProvider.Fetch through a bare relay made of the broker's own parts (mutual-TLS \
        acceptor, tonic server, the relay's register connections) doing none of its work: no authorization, \
        validation, filtering or audit. What the broker's protocol stack alone costs, against nginx; the \
        broker's CPU beyond it is what its work costs\n  \
        relayed-pg    the relayed lookup through a broker whose database is PostgreSQL: a throwaway cluster \
        started with initdb/pg_ctl (on PATH or /usr/lib/postgresql/*/bin; as root it runs as the postgres \
        user), made as durable as the SQLite broker (fsync, synchronous_commit, full_page_writes on)\n  \
        relayed-pg-2  the same through two broker replicas on that one database (own data dirs and audit \
        logs, shared subject HMAC key), the load alternating between them\n\n\
        The PostgreSQL scenarios are not run by default; without PostgreSQL they are skipped with a note. \
        CPU per lookup of the database server (postmaster and all its backends) is reported apart from the \
        broker's; with SQLite, the CPU of its threads inside the broker (the audit commits) is shown in \
        parentheses in the same column, as a part of the broker's. The switches column counts the context \
        switches of the process in the middle, all its threads, per lookup: how often its threads went to \
        sleep and were woken again (or were preempted), which grows as the rate falls.\n\n\
        Each relayed phase is also split as the broker timed it, from its own histograms (the bench gives \
        its brokers a loopback /metrics listener and reads it before and after the phase): the lookup inside \
        the broker, its call to the register and its wait for the audit entry to be durable.\n\n\
        Closed loop (fixed concurrency) gives the saturation throughput; open loop (fixed arrival rate, \
        latency from each request's intended send time, so a stall is not hidden by coordinated omission) \
        gives latency under load. The broker's peak RSS is also measured with --inflight lookups in flight.\n\n\
        Prints a table, or JSON with the global --json flag."
)]
pub struct BenchArgs {
    /// Scenarios to run, comma-separated: direct, relayed, proxy, bare, relayed-pg, relayed-pg-2
    /// (e.g. `--scenarios relayed,relayed-pg,relayed-pg-2` compares SQLite, PostgreSQL and two replicas).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "direct,relayed,proxy,bare")]
    pub scenarios: Vec<Scenario>,
    /// Load model: `closed` (fixed concurrency, finds saturation), `open` (fixed
    /// arrival rate, needs --rate; each target first gets an unmeasured
    /// closed-loop warm-up of --warmup) or `both` (closed, then open at --rate or
    /// at half the relayed saturation throughput).
    #[arg(long, value_enum, default_value = "both")]
    pub mode: Mode,
    /// Open loop: how requests are spaced. `even`: one every 1/rate, the
    /// steadiest load (as wrk2 sends). `poisson`: independent arrivals,
    /// exponential gaps averaging 1/rate, as many clients acting on their own
    /// send; some requests come close together, so queues form at rates an
    /// even load would not show. Seeded by --seed: every scenario and round
    /// gets the same arrival times.
    #[arg(long, value_enum, default_value = "even")]
    pub arrivals: Arrivals,
    /// Closed loop: requests kept in flight (enough to saturate every scenario on a small machine).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Open loop: arrival rate in lookups per second, e.g. `2000` or `2000/s`
    /// (default with `--mode both`: half the relayed closed-loop throughput).
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<f64>,
    /// Measured time of every scenario and mode, e.g. `10s` or `1500ms`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Unmeasured load before each measurement (connections, caches, allocator).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// HTTP/2 connections the load generator opens to each target (the same for all scenarios;
    /// relayed-pg-2 splits them between its two replicas).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Repeat every phase this many times, alternating scenarios, and report the
    /// median round of each (throughput for closed loop, p99 for open loop):
    /// steadier ratios on a machine with other work running.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Distinct citizens the lookups cycle through.
    #[arg(long, default_value_t = 1000)]
    pub subjects: u32,
    /// Lookups held in flight through the broker while its peak RSS is measured (0: skip).
    #[arg(long, default_value_t = 1000)]
    pub inflight: usize,
    /// Audit entries to put in the broker's log before the phases (0: the log
    /// holds only the set-up's entries). A deployment's log holds millions,
    /// and the citizens' index takes each entry on a random page, so commits
    /// cost more once it outgrows the page cache. The bench sets the broker up,
    /// stops it, appends the entries (accesses of the bench's consumer, one
    /// subject each) through the audit crate as the broker would, restarts it
    /// and waits for its check of the history. About a minute per million
    /// entries, fill and check included. Only the SQLite broker of `relayed`
    /// is filled, under its data directory's lock, as `serve` takes it.
    #[arg(long, default_value_t = 0)]
    pub log_entries: u64,
    /// A few seconds per scenario (warm-up 300ms, 1.5s measured, 200 subjects): a smoke run
    /// that checks everything works; too short for figures worth quoting.
    #[arg(long)]
    pub quick: bool,
    /// Seed of the synthetic citizens.
    #[arg(long, default_value_t = 2020)]
    pub seed: u64,
    /// Directory for certificates, configs, the broker's database and logs (kept
    /// afterwards); a temporary one, removed at the end, when omitted.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Directory for the broker's SQLite database and audit keys (default: inside --dir).
    /// Put it on the disk a deployment would use: every lookup waits for a commit,
    /// so the disk's fsync latency is part of the relayed latency. The report
    /// names its file system and, for ext4, whether it keeps a journal.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The nginx executable for the proxy scenario; default: `nginx` on PATH, then /usr/sbin/nginx.
    #[arg(long)]
    pub nginx: Option<PathBuf>,
    /// nginx worker processes (one per core is nginx's own recommendation).
    #[arg(long)]
    pub nginx_workers: Option<usize>,
}

/// Where the load goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// The register itself.
    Direct,
    /// Through the broker (SQLite).
    Relayed,
    /// Through nginx `grpc_pass`.
    Proxy,
    /// Through the broker's stack without its work (`lienthong bench-bare`).
    Bare,
    /// Through a broker on PostgreSQL.
    #[value(name = "relayed-pg")]
    #[serde(rename = "relayed-pg")]
    RelayedPg,
    /// Through two broker replicas on one PostgreSQL database.
    #[value(name = "relayed-pg-2")]
    #[serde(rename = "relayed-pg-2")]
    RelayedPg2,
}

impl Scenario {
    /// Lowercase name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::Relayed => "relayed",
            Scenario::Proxy => "proxy",
            Scenario::Bare => "bare",
            Scenario::RelayedPg => "relayed-pg",
            Scenario::RelayedPg2 => "relayed-pg-2",
        }
    }

    /// Broker replicas on PostgreSQL the scenario needs.
    fn pg_replicas(self) -> usize {
        match self {
            Scenario::RelayedPg => 1,
            Scenario::RelayedPg2 => 2,
            Scenario::Direct | Scenario::Relayed | Scenario::Proxy | Scenario::Bare => 0,
        }
    }
}

/// Load model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Fixed concurrency.
    Closed,
    /// Fixed arrival rate.
    Open,
    /// Closed, then open.
    Both,
}

/// How the open loop spaces its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arrivals {
    /// One every 1/rate.
    Even,
    /// Exponential gaps averaging 1/rate.
    Poisson,
}

fn parse_rate(s: &str) -> std::result::Result<f64, String> {
    let number = s.trim().trim_end_matches("/s").trim();
    match number.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a rate; give lookups per second such as 2000 or 2000/s"
        )),
    }
}

/// Durations and sizes after `--quick`.
#[derive(Debug, Clone, Serialize)]
struct Settings {
    scenarios: Vec<Scenario>,
    closed_loop: bool,
    open_loop: bool,
    concurrency: usize,
    connections: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    rate_per_s: Option<f64>,
    /// How the open loop spaced its requests.
    arrivals: Arrivals,
    duration_s: f64,
    warmup_s: f64,
    subjects: u32,
    inflight: usize,
    /// Entries appended to the broker's audit log before the phases.
    log_entries: u64,
    rounds: usize,
    quick: bool,
    seed: u64,
}

impl Settings {
    fn of(args: &BenchArgs) -> Result<Settings> {
        let mut scenarios = Vec::new();
        for s in &args.scenarios {
            if !scenarios.contains(s) {
                scenarios.push(*s);
            }
        }
        if scenarios.is_empty() {
            bail!("no scenario given; use --scenarios direct,relayed,proxy");
        }
        if args.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if args.rounds == 0 {
            bail!("--rounds must be at least 1");
        }
        if args.connections == 0 {
            bail!("--connections must be at least 1");
        }
        if args.subjects == 0 || args.subjects > lienthong_provider::demo::DEMO_CITIZENS {
            bail!(
                "--subjects must be between 1 and {}",
                lienthong_provider::demo::DEMO_CITIZENS
            );
        }
        let (closed_loop, open_loop) = match args.mode {
            Mode::Closed => (true, false),
            Mode::Open => (false, true),
            Mode::Both => (true, true),
        };
        if args.log_entries > 0 && !scenarios.contains(&Scenario::Relayed) {
            bail!(
                "--log-entries fills the audit log of the SQLite broker, which only the relayed scenario measures \
                 (the PostgreSQL replicas' logs are not filled); add relayed to --scenarios"
            );
        }
        if args.mode == Mode::Open && args.rate.is_none() {
            bail!("--mode open needs --rate (lookups per second); --mode both picks half the relayed saturation");
        }
        let (duration, warmup, subjects) = if args.quick {
            (
                Duration::from_millis(1500),
                Duration::from_millis(300),
                args.subjects.min(200),
            )
        } else {
            (args.duration, args.warmup, args.subjects)
        };
        if duration.is_zero() {
            bail!("--duration must be positive");
        }
        Ok(Settings {
            scenarios,
            closed_loop,
            open_loop,
            concurrency: args.concurrency,
            connections: args.connections,
            rate_per_s: args.rate,
            arrivals: args.arrivals,
            duration_s: duration.as_secs_f64(),
            warmup_s: warmup.as_secs_f64(),
            subjects,
            inflight: args.inflight,
            log_entries: args.log_entries,
            rounds: args.rounds,
            quick: args.quick,
            seed: args.seed,
        })
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_s)
    }

    fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_s)
    }
}

// ---------------------------------------------------------------------------
// Report

/// Everything one run measured.
#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    settings: Settings,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk: Option<DiskReport>,
    /// The broker's audit log as filled by `--log-entries`.
    #[serde(skip_serializing_if = "Option::is_none")]
    log_fill: Option<fill::FillReport>,
    scenarios: Vec<ScenarioReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<BrokerReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    postgres: Option<PostgresReport>,
    ratios: Ratios,
    notes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    memory_mib: u64,
    load_average_at_start: String,
}

impl Machine {
    fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| status_field(&m, "MemTotal:"))
            .map(|k| k / 1024)
            .unwrap_or(0);
        let load = std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model,
            memory_mib,
            load_average_at_start: load,
        }
    }
}

#[derive(Debug, Serialize)]
struct ScenarioReport {
    name: &'static str,
    /// `ok`, `skipped` or `failed`.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    closed: Option<PhaseReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    open: Option<PhaseReport>,
}

#[derive(Debug, Clone, Serialize)]
struct PhaseReport {
    #[serde(skip_serializing_if = "Option::is_none")]
    concurrency: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target_rate_per_s: Option<f64>,
    connections: usize,
    duration_s: f64,
    ok: u64,
    errors: u64,
    /// Open loop: arrivals not sent because too many were outstanding.
    dropped: u64,
    /// Open loop: how late the load generator sent the measured requests
    /// after their due times, in µs. Already part of the latencies, which
    /// count from the due times; on a busy machine the generator waits for a
    /// core like every other process.
    #[serde(skip_serializing_if = "Option::is_none")]
    send_lag_us: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_error: Option<String>,
    /// Calls that failed during the unmeasured warm-up (nginx, say, while it
    /// opens its upstream connections), counted apart from `errors`.
    #[serde(skip_serializing_if = "is_zero")]
    warmup_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_warmup_error: Option<String>,
    throughput_per_s: f64,
    latency_us: Latency,
    cpu_s_per_1000: CpuCost,
    switches_per_lookup: Switches,
    disk_kib_per_lookup: DiskWrites,
    /// The whole machine's CPU during the phase: on two shared cores, latency
    /// is queueing once this nears the core count.
    machine: MachineLoad,
    /// Relayed: the lookup, its register call and its audit wait as the
    /// broker's own histograms timed them.
    #[serde(skip_serializing_if = "Option::is_none")]
    inside_broker: Option<inside::InsideBroker>,
    /// With --rounds above 1: throughput (closed) or p99 in µs (open) of every
    /// round, in order; the figures above are from the median one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    rounds: Vec<f64>,
}

/// The median round: by throughput for closed loop, by p99 for open loop.
fn median_round(mut rounds: Vec<PhaseReport>, open: bool) -> Option<PhaseReport> {
    let key = |r: &PhaseReport| {
        if open {
            r.latency_us.p99 as f64
        } else {
            r.throughput_per_s
        }
    };
    let all: Vec<f64> = rounds.iter().map(key).collect();
    rounds.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = rounds.len().checked_sub(1)? / 2;
    let mut median = rounds.swap_remove(mid);
    if all.len() > 1 {
        median.rounds = all;
    }
    Some(median)
}

#[derive(Debug, Clone, Copy, Serialize, Default)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
    mean: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// CPU seconds per 1,000 successful lookups, per process.
#[derive(Debug, Clone, Copy, Serialize, Default)]
struct CpuCost {
    /// The process between consumer and register: the broker or nginx (all workers).
    #[serde(skip_serializing_if = "Option::is_none")]
    intermediary: Option<f64>,
    /// The register.
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<f64>,
    /// The PostgreSQL server: the postmaster and every backend, including those
    /// that exited during the phase (relayed-pg scenarios only; SQLite runs
    /// inside the broker and is counted there).
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<f64>,
    /// SQLite's worker threads inside the broker (the relayed scenario): the
    /// durable audit's commits, a part of `intermediary`.
    #[serde(skip_serializing_if = "Option::is_none")]
    sqlite_in_broker: Option<f64>,
    /// This process.
    #[serde(skip_serializing_if = "Option::is_none")]
    load_generator: Option<f64>,
}

/// Context switches per successful lookup, voluntary and involuntary, of every
/// thread of a process: how often its threads slept and were woken again, or
/// were preempted (see BENCHMARKS.md, eleventh round).
#[derive(Debug, Clone, Copy, Serialize, Default)]
struct Switches {
    /// The broker, nginx (all workers) or the bare relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    intermediary: Option<f64>,
    /// The register.
    #[serde(skip_serializing_if = "Option::is_none")]
    provider: Option<f64>,
}

/// KiB written to storage per successful lookup (`write_bytes` of
/// `/proc/<pid>/io`: pages sent to the disk, or dirtied to be, by the
/// process; nothing on a memory-backed file system). The durable audit's
/// cost to the disk: each commit writes every page it changed, whole, to
/// SQLite's WAL (BENCHMARKS.md, twentieth round).
#[derive(Debug, Clone, Copy, Serialize, Default)]
struct DiskWrites {
    /// The broker (its SQLite database), nginx or the bare relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    intermediary: Option<f64>,
    /// The PostgreSQL server: the postmaster and its live processes (a
    /// backend that exits during the phase takes its count with it).
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<f64>,
}

#[derive(Debug, Serialize, Default)]
struct BrokerReport {
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_after_setup_kib: Option<u64>,
    /// Peak RSS over the relayed closed-loop run.
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_saturation_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inflight: Option<InflightReport>,
}

/// The PostgreSQL cluster and the broker replicas of the relayed-pg scenarios.
#[derive(Debug, Serialize)]
struct PostgresReport {
    server_version: String,
    /// `fsync`, `synchronous_commit` and `full_page_writes` as the brokers' sessions see them.
    durability: String,
    /// The cluster's data directory (removed at the end of the run).
    data_directory: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    postmaster_pid: Option<u32>,
    /// The cluster's filesystem: every lookup waits for one WAL flush.
    #[serde(skip_serializing_if = "Option::is_none")]
    disk: Option<DiskReport>,
    replicas: Vec<ReplicaReport>,
    /// With two replicas: from the end of the administration through replica A
    /// until replica B answered its first lookup (LISTEN/NOTIFY propagation).
    #[serde(skip_serializing_if = "Option::is_none")]
    replica_b_ready_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
struct ReplicaReport {
    pid: u32,
    data_dir: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_after_setup_kib: Option<u64>,
}

#[derive(Debug, Serialize)]
struct InflightReport {
    lookups_in_flight: usize,
    connections: usize,
    /// Peak RSS while they were in flight (`VmHWM`, reset just before).
    #[serde(skip_serializing_if = "Option::is_none")]
    peak_rss_kib: Option<u64>,
    phase: PhaseReport,
}

#[derive(Debug, Serialize, Default)]
struct Ratios {
    /// Closed loop: relayed throughput / direct throughput.
    #[serde(skip_serializing_if = "Option::is_none")]
    relayed_over_direct_throughput: Option<f64>,
    /// Closed loop: relayed throughput / proxy throughput.
    #[serde(skip_serializing_if = "Option::is_none")]
    relayed_over_proxy_throughput: Option<f64>,
    /// With --rounds above 1: relayed/direct throughput of each round, whose
    /// phases ran minutes apart at most and so shared the machine's state.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    relayed_over_direct_throughput_by_round: Vec<f64>,
    /// With --rounds above 1: relayed/proxy throughput of each round.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    relayed_over_proxy_throughput_by_round: Vec<f64>,
    /// Open loop: relayed p99 minus direct p99, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_added_over_direct_ms: Option<f64>,
    /// Open loop: relayed p99 minus proxy p99, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_added_over_proxy_ms: Option<f64>,
    /// Open loop: proxy p99 minus direct p99, milliseconds: what a plain proxy
    /// adds at the same rate, the yardstick for `p99_added_over_direct_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    proxy_p99_added_over_direct_ms: Option<f64>,
    /// Closed loop: broker CPU per lookup / nginx CPU per lookup.
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_over_proxy_cpu_per_lookup: Option<f64>,
    /// Closed loop: bare relay throughput / proxy throughput: the broker's
    /// protocol stack alone against nginx.
    #[serde(skip_serializing_if = "Option::is_none")]
    bare_over_proxy_throughput: Option<f64>,
    /// Closed loop: relayed throughput / bare relay throughput: what the
    /// broker's work (policy, validation, filtering, audit) leaves of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    relayed_over_bare_throughput: Option<f64>,
    /// With --rounds above 1: bare/proxy throughput of each round.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    bare_over_proxy_throughput_by_round: Vec<f64>,
    /// With --rounds above 1: relayed/bare throughput of each round.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    relayed_over_bare_throughput_by_round: Vec<f64>,
    /// Closed loop: bare relay CPU per lookup / nginx CPU per lookup.
    #[serde(skip_serializing_if = "Option::is_none")]
    bare_over_proxy_cpu_per_lookup: Option<f64>,
    /// Closed loop: broker CPU per lookup minus the bare relay's, milliseconds:
    /// what the broker's work costs on top of its stack.
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_work_cpu_ms_per_lookup: Option<f64>,
    /// Closed loop: that work's CPU per lookup / nginx CPU per lookup.
    #[serde(skip_serializing_if = "Option::is_none")]
    broker_work_over_proxy_cpu_per_lookup: Option<f64>,
    /// Open loop: bare relay p99 minus direct p99, milliseconds: what the
    /// broker's stack alone adds at the same rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    bare_p99_added_over_direct_ms: Option<f64>,
    /// Closed loop: relayed-pg throughput / relayed throughput (PostgreSQL against SQLite).
    #[serde(skip_serializing_if = "Option::is_none")]
    relayed_pg_over_relayed_throughput: Option<f64>,
    /// Closed loop: relayed-pg-2 throughput / relayed-pg throughput (two replicas against one).
    #[serde(skip_serializing_if = "Option::is_none")]
    relayed_pg_2_over_relayed_pg_throughput: Option<f64>,
    /// Closed loop: CPU per lookup of broker plus PostgreSQL server (relayed-pg) / of the
    /// broker with SQLite inside it (relayed).
    #[serde(skip_serializing_if = "Option::is_none")]
    relayed_pg_over_relayed_cpu_per_lookup: Option<f64>,
}

// ---------------------------------------------------------------------------
// /proc

/// The first number after `key` in a `/proc/<pid>/status`-style text.
fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l[key.len()..].split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    status_field(&std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?, key)
}

/// User plus system CPU time of a process (all its threads), seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The sum of `read(file)` over the threads of `pids`, `file` being the text
/// of `/proc/<pid>/task/<tid>/<name>`, or `None` when no thread gave a value.
/// Threads that have exited are not counted.
fn over_threads<T: std::ops::AddAssign + Default>(
    pids: &[u32],
    name: &str,
    read: impl Fn(&str) -> Option<T>,
) -> Option<T> {
    let mut found = None;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Some(value) = std::fs::read_to_string(task.path().join(name))
                .ok()
                .and_then(|file| read(&file))
            {
                *found.get_or_insert_with(T::default) += value;
            }
        }
    }
    found
}

/// Context switches so far of every thread of `pids`, or `None` when no
/// process could be read.
fn context_switches(pids: &[u32]) -> Option<u64> {
    over_threads(pids, "status", status_switches)
}

/// Voluntary plus involuntary context switches in a `/proc/<pid>/task/<tid>/status` text.
fn status_switches(status: &str) -> Option<u64> {
    Some(status_field(status, "voluntary_ctxt_switches:")? + status_field(status, "nonvoluntary_ctxt_switches:")?)
}

/// Names of the threads sqlx runs each SQLite connection on
/// (`sqlx-sqlite-worker-N`, cut to 15 bytes by the kernel).
/// How `lienthong serve` announces its `/metrics` listener on stderr.
const METRICS_PREFIX: &str = "metrics on http://";
const SQLITE_THREADS: &str = "sqlx-sqlite";

/// CPU seconds of the threads of `pids` whose name starts with `prefix`, or
/// `None` when none has such a thread (a broker on PostgreSQL, nginx).
fn threads_cpu_seconds(pids: &[u32], prefix: &str) -> Option<f64> {
    over_threads(pids, "stat", |stat| {
        stat_name(stat)
            .is_some_and(|n| n.starts_with(prefix))
            .then(|| stat_cpu_seconds(stat))
            .flatten()
    })
}

/// The command (or thread) name in a `/proc/<pid>/stat` line (field 2).
fn stat_name(stat: &str) -> Option<&str> {
    stat.get(stat.find('(')? + 1..stat.rfind(')')?)
}

/// User plus system time in a `/proc/<pid>/stat` line, seconds.
fn stat_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) of proc(5); `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / CLOCK_TICKS_PER_SECOND)
}

/// CPU seconds of the reaped children of a process (`cutime` + `cstime`) in a
/// `/proc/<pid>/stat` line.
fn stat_reaped_children_cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 16 (cutime) and 17 (cstime) of proc(5), signed in the kernel's type.
    let cutime: i64 = fields.get(13)?.parse().ok()?;
    let cstime: i64 = fields.get(14)?.parse().ok()?;
    Some((cutime.max(0) + cstime.max(0)) as f64 / CLOCK_TICKS_PER_SECOND)
}

/// CPU seconds of a process, its live children and its children that exited
/// and were reaped. PostgreSQL serves each connection from a backend process
/// that exits with it: a backend ending inside a phase moves its time into
/// the postmaster's reaped-children time, so the sum stays monotonic.
fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let own = stat_cpu_seconds(&stat)? + stat_reaped_children_cpu_seconds(&stat)?;
    // A child that exits between the two reads is lost for this snapshot; the
    // window is a few microseconds against phases of seconds.
    let children: f64 = child_pids(pid).into_iter().filter_map(cpu_seconds).sum();
    Some(own + children)
}

/// The parent of a process, from `/proc/<pid>/stat` (field 4).
fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

/// Resets a process's peak RSS (`VmHWM`) to its current RSS (proc(5), `clear_refs` value 5).
fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn child_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect())
        .unwrap_or_default()
}

fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Bytes a process caused to be written to storage so far (`write_bytes`
/// of `/proc/<pid>/io`).
fn written_bytes(pid: u32) -> Option<u64> {
    status_field(
        &std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?,
        "write_bytes:",
    )
}

/// [`written_bytes`] of a set of processes.
fn written_by(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| written_bytes(*p)).sum()
}

/// [`written_bytes`] of a process and its live children.
fn tree_written_bytes(pid: u32) -> Option<u64> {
    let children: u64 = child_pids(pid).into_iter().filter_map(written_bytes).sum();
    Some(written_bytes(pid)? + children)
}

/// CPU seconds of a set of processes.
fn cpu_of(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

// ---------------------------------------------------------------------------
// Child processes

/// A server process started by the bench; stopped (SIGTERM, then SIGKILL) on drop.
struct ChildProcess {
    name: &'static str,
    child: std::process::Child,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl ChildProcess {
    /// Starts `cmd` and, when `ready_prefix` is given, waits for a stderr line
    /// starting with it and returns the rest of that line.
    async fn spawn(
        name: &'static str,
        mut cmd: Command,
        ready_prefix: Option<&'static str>,
        timeout: Duration,
    ) -> Result<(ChildProcess, Option<String>)> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                    if let (Some(prefix), Some(_)) = (ready_prefix, tx.as_ref())
                        && let Some(rest) = line.strip_prefix(prefix)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(rest.trim().to_string());
                    }
                    if let Ok(mut log) = log.lock() {
                        if log.len() == 40 {
                            log.pop_front();
                        }
                        log.push_back(line);
                    }
                }
            });
        }
        let mut process = ChildProcess { name, child, log };
        let Some(_) = ready_prefix else {
            return Ok((process, None));
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(line)) => Ok((process, Some(line))),
            Ok(Err(_)) => {
                let status = process.child.wait().ok();
                // Let the reader thread store the last lines.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(anyhow!(
                    "the {name} exited before it was ready ({}): {}",
                    status.map(|s| s.to_string()).unwrap_or_else(|| "unknown status".into()),
                    process.last_lines()
                ))
            }
            Err(_) => Err(anyhow!(
                "the {name} was not ready within {} s: {}",
                timeout.as_secs(),
                process.last_lines()
            )),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The rest of the last kept stderr line starting with `prefix`.
    fn line_after(&self, prefix: &str) -> Option<String> {
        let log = self.log.lock().ok()?;
        log.iter()
            .rev()
            .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
    }

    fn last_lines(&self) -> String {
        let lines = self
            .log
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        if lines.is_empty() {
            "no output".into()
        } else {
            lines.join(" | ")
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    async fn stop(&mut self, grace: Duration) {
        if self.exited() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if self.exited() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(process = self.name, "did not stop in time; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn parse_addr(text: &str, what: &str) -> Result<SocketAddr> {
    let first = text.split_whitespace().next().unwrap_or_default();
    first
        .parse()
        .with_context(|| format!("the {what} printed an address that does not parse: {first:?}"))
}

// ---------------------------------------------------------------------------
// Load targets

#[derive(Debug)]
struct CallError {
    code: tonic::Code,
    message: String,
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        CallError {
            code: s.code(),
            message: s.message().to_string(),
        }
    }
}

/// Where one of a target's client connections goes, so that the open loop can
/// dial the same connections again on its own thread.
#[derive(Clone)]
struct Dial {
    url: String,
    config: Arc<rustls::ClientConfig>,
}

impl Dial {
    /// Opens the connection on the current runtime, whose tasks then drive it.
    async fn connect(&self) -> Result<Channel> {
        Ok(lienthong_tls::connect_channel(&self.url, self.config.clone(), Duration::from_secs(5)).await?)
    }
}

/// A target's client connections, in the order its calls use them.
struct Connections {
    channels: Vec<Channel>,
    dials: Vec<Dial>,
}

impl Connections {
    /// Request `i` goes to connection `i % n` of the result: replica `i % k`
    /// when `sets` are `k` replicas' connections.
    fn interleave(sets: Vec<Connections>) -> Connections {
        let longest = sets.iter().map(|s| s.channels.len()).max().unwrap_or(0);
        let mut out = Connections {
            channels: Vec::new(),
            dials: Vec::new(),
        };
        for j in 0..longest {
            for set in &sets {
                if let (Some(c), Some(d)) = (set.channels.get(j), set.dials.get(j)) {
                    out.channels.push(c.clone());
                    out.dials.push(d.clone());
                }
            }
        }
        out
    }
}

/// What one benchmark call does, and over which connections.
#[derive(Clone)]
struct Target {
    calls: Calls,
    dials: Arc<[Dial]>,
}

#[derive(Clone)]
enum Calls {
    /// `RecordProvider.Fetch` (direct, or through nginx).
    Fetch {
        clients: Arc<[RecordProviderClient<Channel>]>,
        requests: Arc<[FetchRequest]>,
    },
    /// `Exchange.Lookup` through the broker.
    Lookup {
        clients: Arc<[ExchangeClient<Channel>]>,
        requests: Arc<[pb::LookupRequest]>,
    },
}

fn pick<T>(items: &[T], i: u64) -> &T {
    // Both slices are built non-empty; `i % len` is in range.
    &items[(i % items.len() as u64) as usize]
}

impl Target {
    fn fetch(connections: Connections, requests: Arc<[FetchRequest]>) -> Target {
        Target {
            calls: Calls::Fetch {
                clients: connections
                    .channels
                    .into_iter()
                    .map(RecordProviderClient::new)
                    .collect(),
                requests,
            },
            dials: connections.dials.into(),
        }
    }

    fn lookup(connections: Connections, requests: Arc<[pb::LookupRequest]>) -> Target {
        Target {
            calls: Calls::Lookup {
                clients: connections.channels.into_iter().map(ExchangeClient::new).collect(),
                requests,
            },
            dials: connections.dials.into(),
        }
    }

    /// The same calls over new connections, made on the current runtime so that
    /// their tasks run there.
    async fn redial(&self) -> Result<Target> {
        let mut channels = Vec::with_capacity(self.dials.len());
        for d in self.dials.iter() {
            channels.push(d.connect().await?);
        }
        let connections = Connections {
            channels,
            dials: self.dials.to_vec(),
        };
        Ok(match &self.calls {
            Calls::Fetch { requests, .. } => Target::fetch(connections, requests.clone()),
            Calls::Lookup { requests, .. } => Target::lookup(connections, requests.clone()),
        })
    }

    async fn call(&self, i: u64) -> std::result::Result<(), CallError> {
        match &self.calls {
            Calls::Fetch { clients, requests } => {
                let mut client = pick(clients, i).clone();
                let mut request = tonic::Request::new(pick(requests, i).clone());
                request.set_timeout(CALL_TIMEOUT);
                let response = client.fetch(request).await?.into_inner();
                if response.record_json.is_empty() {
                    return Err(CallError {
                        code: tonic::Code::Internal,
                        message: "the register answered an empty record".into(),
                    });
                }
            }
            Calls::Lookup { clients, requests } => {
                let mut client = pick(clients, i).clone();
                let mut request = tonic::Request::new(pick(requests, i).clone());
                request.set_timeout(CALL_TIMEOUT);
                let response = client.lookup(request).await?.into_inner();
                if response.record_json.is_empty() || response.receipt.is_none() {
                    return Err(CallError {
                        code: tonic::Code::Internal,
                        message: "the broker answered without a record or without a receipt".into(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Opens `n` mutual-TLS connections to `url`.
async fn channels(url: &str, material: &TlsMaterial, pin: Option<(&str, Identity)>, n: usize) -> Result<Connections> {
    let config = lienthong_tls::client_config(material, pin)?;
    let mut out = Connections {
        channels: Vec::with_capacity(n),
        dials: Vec::with_capacity(n),
    };
    for _ in 0..n {
        let dial = Dial {
            url: url.to_owned(),
            config: config.clone(),
        };
        out.channels.push(dial.connect().await?);
        out.dials.push(dial);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Measurement

fn histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low, 3 significant digits).
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid constant histogram bounds")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Counters the progress line reads while a phase runs.
#[derive(Default)]
struct Live {
    ok: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    warmup_errors: AtomicU64,
    first_warmup_error: Mutex<Option<String>>,
}

impl Live {
    /// Counts a failed call, apart when it came during the warm-up.
    fn error(&self, e: &CallError, measured: bool) {
        let (count, first) = if measured {
            (&self.errors, &self.first_error)
        } else {
            (&self.warmup_errors, &self.first_warmup_error)
        };
        count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = first.lock()
            && first.is_none()
        {
            *first = Some(format!("{:?}: {}", e.code, e.message));
        }
    }

    /// The warm-up's failed calls and the first of them.
    fn warmup(&self) -> (u64, Option<String>) {
        let first = self.first_warmup_error.lock().ok().and_then(|f| f.clone());
        (self.warmup_errors.load(Ordering::Relaxed), first)
    }
}

/// The processes whose CPU a phase charges to each role.
#[derive(Clone, Default)]
struct Watched {
    intermediary: Vec<u32>,
    provider: Vec<u32>,
    /// The PostgreSQL postmaster, counted with all its children.
    database: Option<u32>,
    /// The brokers' `/metrics` listeners (relayed scenarios), whose
    /// histograms split a lookup's time inside the broker.
    broker_metrics: Vec<SocketAddr>,
}

#[derive(Clone, Copy)]
struct CpuSnapshot {
    intermediary: Option<f64>,
    provider: Option<f64>,
    database: Option<f64>,
    sqlite_in_broker: Option<f64>,
    load_generator: Option<f64>,
    machine: Option<MachineCpu>,
    intermediary_switches: Option<u64>,
    provider_switches: Option<u64>,
    intermediary_written: Option<u64>,
    database_written: Option<u64>,
}

/// The whole machine's idle and stolen CPU time, all cores together, from
/// `/proc/stat`, and when it was read.
///
/// Busy time is what is left of the wall clock. The busy fields themselves
/// (user, system, ...) only advance on timer ticks, and a tickless kernel
/// stops the tick on an idle core: a core that wakes for a few hundred
/// microseconds at a time and sleeps in between is then counted idle, so a
/// lightly loaded phase read 0.00 cores busy while its processes alone used
/// 0.2. Idle time is measured on every entry to and exit from idle.
#[derive(Clone, Copy, Debug, PartialEq)]
struct MachineCpu {
    /// Idle or waiting for I/O, seconds.
    idle: f64,
    /// Wanted but given to other guests by the hypervisor, seconds.
    steal: f64,
    /// Online cores: the `cpuN` lines.
    cores: usize,
    at: Instant,
}

/// The `cpu` line of `/proc/stat` (proc(5)): user nice system idle iowait irq
/// softirq steal, in clock ticks, read at `at`.
fn parse_machine_cpu(proc_stat: &str, at: Instant) -> Option<MachineCpu> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map_while(|t| t.parse().ok()).collect();
    let tick = |i: usize| ticks.get(i).copied();
    let cores = proc_stat
        .lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    if cores == 0 {
        return None;
    }
    Some(MachineCpu {
        idle: (tick(3)? + tick(4)?) as f64 / CLOCK_TICKS_PER_SECOND,
        steal: tick(7).unwrap_or(0) as f64 / CLOCK_TICKS_PER_SECOND,
        cores,
        at,
    })
}

fn machine_cpu() -> Option<MachineCpu> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_machine_cpu(&text, Instant::now())
}

/// How many cores the whole machine kept busy, on average, during a phase.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
struct MachineLoad {
    /// Every process on the machine, this run's and others'.
    #[serde(skip_serializing_if = "Option::is_none")]
    busy_cores: Option<f64>,
    /// Time the hypervisor gave to other guests while this one wanted it.
    #[serde(skip_serializing_if = "Option::is_none")]
    stolen_cores: Option<f64>,
}

fn machine_load(before: CpuSnapshot, after: CpuSnapshot) -> MachineLoad {
    match (before.machine, after.machine) {
        (Some(b), Some(a)) if a.at > b.at && a.cores == b.cores => {
            let secs = (a.at - b.at).as_secs_f64();
            let cores = a.cores as f64;
            let idle = ((a.idle - b.idle) / secs).clamp(0.0, cores);
            let stolen = ((a.steal - b.steal) / secs).clamp(0.0, cores - idle);
            MachineLoad {
                busy_cores: Some(cores - idle - stolen),
                stolen_cores: Some(stolen),
            }
        }
        _ => MachineLoad::default(),
    }
}

impl Watched {
    fn snapshot(&self) -> CpuSnapshot {
        CpuSnapshot {
            intermediary: cpu_of(&self.intermediary),
            provider: cpu_of(&self.provider),
            database: self.database.and_then(tree_cpu_seconds),
            sqlite_in_broker: threads_cpu_seconds(&self.intermediary, SQLITE_THREADS),
            load_generator: cpu_of(&[std::process::id()]),
            machine: machine_cpu(),
            intermediary_switches: context_switches(&self.intermediary),
            provider_switches: context_switches(&self.provider),
            intermediary_written: written_by(&self.intermediary),
            database_written: self.database.and_then(tree_written_bytes),
        }
    }

    async fn inside(&self) -> Option<inside::Scrape> {
        inside::scrape(&self.broker_metrics).await
    }
}

fn cost(before: CpuSnapshot, after: CpuSnapshot, ok: u64) -> CpuCost {
    let per_1000 = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if ok > 0 => Some((b - a).max(0.0) * 1000.0 / ok as f64),
        _ => None,
    };
    CpuCost {
        intermediary: per_1000(before.intermediary, after.intermediary),
        provider: per_1000(before.provider, after.provider),
        database: per_1000(before.database, after.database),
        sqlite_in_broker: per_1000(before.sqlite_in_broker, after.sqlite_in_broker),
        load_generator: per_1000(before.load_generator, after.load_generator),
    }
}

/// How much a counter grew per successful lookup; `None` when it could not
/// be read at either end, or nothing succeeded.
fn per_lookup(before: Option<u64>, after: Option<u64>, ok: u64) -> Option<f64> {
    match (before, after) {
        (Some(b), Some(a)) if ok > 0 => Some(a.saturating_sub(b) as f64 / ok as f64),
        _ => None,
    }
}

fn switches(before: CpuSnapshot, after: CpuSnapshot, ok: u64) -> Switches {
    Switches {
        intermediary: per_lookup(before.intermediary_switches, after.intermediary_switches, ok),
        provider: per_lookup(before.provider_switches, after.provider_switches, ok),
    }
}

fn disk_writes(before: CpuSnapshot, after: CpuSnapshot, ok: u64) -> DiskWrites {
    let kib = |b: Option<u64>, a: Option<u64>| per_lookup(b, a, ok).map(|bytes| bytes / 1024.0);
    DiskWrites {
        intermediary: kib(before.intermediary_written, after.intermediary_written),
        database: kib(before.database_written, after.database_written),
    }
}

/// Progress on stderr: one line updated in place on a terminal, one line per
/// phase otherwise.
struct Progress {
    tty: bool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn update(&self, text: &str) {
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{text}");
            let _ = err.flush();
        }
    }

    fn is_tty(&self) -> bool {
        self.tty
    }

    fn line(&self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r\x1b[2K");
        }
        let _ = writeln!(err, "{text}");
    }

    /// Redraws the phase's line every 250 ms until `stop` is set.
    fn spawn_ticker(
        self: &Arc<Self>,
        label: String,
        live: Arc<Live>,
        started: Instant,
        total: Duration,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<()> {
        let progress = self.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let ok = live.ok.load(Ordering::Relaxed);
                let now = Instant::now();
                let rate = (ok.saturating_sub(last.1)) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
                last = (now, ok);
                progress.update(&format!(
                    "{label}: {:>4.1}/{:.1} s  {ok} ok  {} errors  {rate:.0}/s",
                    started.elapsed().as_secs_f64().min(total.as_secs_f64()),
                    total.as_secs_f64(),
                    live.errors.load(Ordering::Relaxed),
                ));
            }
        })
    }
}

/// One measured phase's raw results.
struct Phase {
    histogram: Histogram<u64>,
    ok: u64,
    errors: u64,
    dropped: u64,
    send_lag: Option<Histogram<u64>>,
    first_error: Option<String>,
    warmup_errors: (u64, Option<String>),
    cpu: CpuCost,
    switches: Switches,
    disk: DiskWrites,
    machine: MachineLoad,
    measured: Duration,
    inside: Option<inside::InsideBroker>,
}

impl Phase {
    fn report(&self, concurrency: Option<usize>, rate: Option<f64>, connections: usize) -> PhaseReport {
        let secs = self.measured.as_secs_f64().max(1e-9);
        PhaseReport {
            concurrency,
            target_rate_per_s: rate,
            connections,
            duration_s: secs,
            ok: self.ok,
            errors: self.errors,
            dropped: self.dropped,
            send_lag_us: self.send_lag.as_ref().map(Latency::of),
            first_error: self.first_error.clone(),
            warmup_errors: self.warmup_errors.0,
            first_warmup_error: self.warmup_errors.1.clone(),
            throughput_per_s: self.ok as f64 / secs,
            latency_us: Latency::of(&self.histogram),
            cpu_s_per_1000: self.cpu,
            switches_per_lookup: self.switches,
            disk_kib_per_lookup: self.disk,
            machine: self.machine,
            inside_broker: self.inside.clone(),
            rounds: Vec::new(),
        }
    }
}

/// Fixed concurrency: `concurrency` workers, each sending its next request as
/// soon as the previous one is answered. Counts completions inside the
/// measured window.
#[allow(clippy::too_many_arguments)] // two call sites; a struct would only rename the same eight values
async fn closed_loop(
    target: &Target,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    watched: &Watched,
    progress: &Arc<Progress>,
    label: String,
    on_measure_start: impl FnOnce(),
) -> Phase {
    let live = Arc::new(Live::default());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let measure_from = started + warmup;
    let end = measure_from + duration;
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let target = target.clone();
        let live = live.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut h = histogram();
            loop {
                let sent = Instant::now();
                if sent >= end {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let result = target.call(i).await;
                let done = Instant::now();
                let measured = done >= measure_from && done < end;
                match result {
                    Ok(()) if measured => {
                        h.saturating_record(micros(done - sent));
                        live.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(()) => {}
                    Err(e) => live.error(&e, measured),
                }
            }
            h
        }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = progress.spawn_ticker(label, live.clone(), started, warmup + duration, stop.clone());
    tokio::time::sleep_until(measure_from.into()).await;
    on_measure_start();
    let before = watched.snapshot();
    let inside_before = watched.inside().await;
    tokio::time::sleep_until(end.into()).await;
    let after = watched.snapshot();
    let inside_after = watched.inside().await;
    let mut total = histogram();
    for w in workers {
        if let Ok(h) = w.await {
            let _ = total.add(&h);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    let ok = live.ok.load(Ordering::Relaxed);
    let first_error = live.first_error.lock().ok().and_then(|f| f.clone());
    Phase {
        histogram: total,
        ok,
        errors: live.errors.load(Ordering::Relaxed),
        dropped: 0,
        send_lag: None,
        first_error,
        warmup_errors: live.warmup(),
        cpu: cost(before, after, ok),
        switches: switches(before, after, ok),
        disk: disk_writes(before, after, ok),
        machine: machine_load(before, after),
        measured: duration,
        inside: inside_before.zip(inside_after).map(|(b, a)| inside::between(&b, &a)),
    }
}

/// Fixed arrival rate: each request is due at a time set in advance (evenly
/// spaced or Poisson, see [`Arrivals`]) whatever happened to earlier ones,
/// and its latency counts from that intended time,
/// so a stalled target shows up in the percentiles instead of slowing the
/// generator down (coordinated omission). The requests are sent from a
/// thread of their own over connections of their own (see [`pacer`]).
async fn open_loop(
    target: &Target,
    schedule: pacer::Schedule,
    watched: &Watched,
    progress: &Arc<Progress>,
    label: String,
) -> Result<Phase> {
    let shared = pacer::Shared {
        live: Arc::new(Live::default()),
        recorded: Arc::new(Mutex::new(histogram())),
        outstanding: Arc::new(AtomicU64::new(0)),
        dropped: Arc::new(AtomicU64::new(0)),
        send_lag: Arc::new(Mutex::new(histogram())),
    };
    let (warmup, duration) = (schedule.warmup, schedule.duration);
    let pacer = pacer::start(target, schedule, &shared)
        .await
        .with_context(|| format!("{label}: starting the load generator"))?;
    let started = pacer.started;
    let measure_from = started + warmup;
    let end = measure_from + duration;
    let live = shared.live.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = progress.spawn_ticker(label, live.clone(), started, warmup + duration, stop.clone());
    tokio::time::sleep_until(measure_from.into()).await;
    let before = watched.snapshot();
    let inside_before = watched.inside().await;
    tokio::time::sleep_until(end.into()).await;
    let after = watched.snapshot();
    // The pacer waits for the answers to requests due inside the window, then
    // stops; a little longer here in case it is itself late.
    let drain_until = Instant::now() + CALL_TIMEOUT + Duration::from_secs(2);
    while !pacer.thread.is_finished() && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if pacer.thread.is_finished() && pacer.thread.join().is_err() {
        live.error(
            &CallError {
                code: tonic::Code::Internal,
                message: "the open loop's thread panicked".into(),
            },
            true,
        );
    }
    // After the drain, so that the broker's timings cover the same lookups.
    let inside_after = watched.inside().await;
    stop.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    let ok = live.ok.load(Ordering::Relaxed);
    let histogram = shared
        .recorded
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| histogram());
    let first_error = live.first_error.lock().ok().and_then(|f| f.clone());
    Ok(Phase {
        histogram,
        ok,
        errors: live.errors.load(Ordering::Relaxed),
        dropped: shared.dropped.load(Ordering::Relaxed),
        send_lag: shared.send_lag.lock().ok().map(|h| h.clone()),
        first_error,
        warmup_errors: live.warmup(),
        cpu: cost(before, after, ok),
        switches: switches(before, after, ok),
        disk: disk_writes(before, after, ok),
        machine: machine_load(before, after),
        measured: duration,
        inside: inside_before.zip(inside_after).map(|(b, a)| inside::between(&b, &a)),
    })
}

// ---------------------------------------------------------------------------
// Setting the federation up

/// Writes a broker's config to `dir/name`: defaults, except logging at `warn`
/// like the register and nginx (access log off), the listener and `/metrics`
/// on ephemeral loopback ports and, when given, a PostgreSQL `database_url`
/// instead of SQLite in `data_dir`.
fn write_broker_config(
    dir: &Path,
    name: &str,
    data_dir: &Path,
    database_url: Option<&str>,
    certs: &Path,
    trust_domain: &str,
) -> Result<PathBuf> {
    let database = database_url
        .map(|url| format!("database_url = {url:?}\n"))
        .unwrap_or_default();
    let text = format!(
        "# Written by `lienthong bench`.\n\
         listen = \"127.0.0.1:0\"\n\
         data_dir = {data:?}\n\
         {database}\
         trust_domain = {trust_domain:?}\n\
         bootstrap_admin = {ADMIN:?}\n\n\
         [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\n\
         [telemetry]\nlog_filter = {BENCH_LOG_FILTER:?}\nmetrics_listen = \"127.0.0.1:0\"\n",
        data = data_dir.display().to_string(),
        ca = certs.join("ca.pem").display().to_string(),
        cert = certs.join("broker.pem").display().to_string(),
        key = certs.join("broker.key").display().to_string(),
    );
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Starts `lienthong serve --config config` and returns it with its URL and
/// the address of its `/metrics` listener.
async fn start_broker(exe: &Path, config: &Path, name: &'static str) -> Result<(ChildProcess, String, SocketAddr)> {
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--config"])
        .arg(config)
        // The config file is the whole setup: an operator's environment must not
        // move the listener or the database of a bench broker.
        .env_remove("RUST_LOG")
        .env_remove("LIENTHONG_LISTEN")
        .env_remove("LIENTHONG_DATA_DIR")
        .env_remove("LIENTHONG_DATABASE_URL");
    let (process, line) = ChildProcess::spawn(
        name,
        cmd,
        Some("lienthong broker listening on "),
        Duration::from_secs(60),
    )
    .await?;
    let addr = parse_addr(&line.unwrap_or_default(), name)?;
    // `serve` prints its metrics address right after the line above; the
    // broker picked the port, so no other process can have taken it.
    let waited = Instant::now();
    let metrics = loop {
        if let Some(m) = process.line_after(METRICS_PREFIX) {
            break parse_addr(m.trim_end_matches("/metrics"), name)?;
        }
        if waited.elapsed() > Duration::from_secs(5) {
            bail!("the {name} did not say where its metrics are: {}", process.last_lines());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    Ok((process, format!("https://127.0.0.1:{}", addr.port()), metrics))
}

/// Members, the birth-record schema, the register's endpoint and the grant.
async fn administer(broker_url: &str, certs: &Path, provider_url: &str) -> Result<pb::CreateGrantRequest> {
    let admin = crate::client::connect(broker_url, &member_files(certs, ADMIN)).await?;
    for (id, name, roles) in MEMBERS
        .iter()
        .filter(|m| [CIVIL_STATUS, JUDICIAL_OFFICE].contains(&m.0))
    {
        admin
            .admin()
            .add_member(pb::AddMemberRequest {
                id: id.to_string(),
                display_name: name.to_string(),
                roles: roles.iter().map(|r| *r as i32).collect(),
            })
            .await
            .map_err(status_error)
            .with_context(|| format!("adding member {id}"))?;
    }
    let (_, json) = lienthong_provider::demo::demo_schemas()
        .into_iter()
        .find(|(name, _)| *name == BIRTH_RECORD)
        .ok_or_else(|| anyhow!("the demo registers have no {BIRTH_RECORD} schema"))?;
    let integrator = crate::client::connect(broker_url, &member_files(certs, CIVIL_STATUS)).await?;
    integrator
        .schemas()
        .register(pb::RegisterRequest {
            definition: Some(definition_from_json(json)?),
            compatibility: 0,
        })
        .await
        .map_err(status_error)
        .context("registering the birth-record schema")?;
    admin
        .admin()
        .add_endpoint(pb::AddEndpointRequest {
            provider: CIVIL_STATUS.into(),
            url: provider_url.into(),
        })
        .await
        .map_err(status_error)
        .context("adding the register's endpoint")?;
    let mut grant = demo_grants()
        .into_iter()
        .find(|g| g.record_type == BIRTH_RECORD)
        .ok_or_else(|| anyhow!("the demo has no birth-record grant"))?;
    grant.rate_limit_per_minute = BENCH_RATE_LIMIT_PER_MINUTE;
    admin
        .admin()
        .create_grant(grant.clone())
        .await
        .map_err(status_error)
        .context("creating the grant")?;
    Ok(grant)
}

/// The same lookups, as the consumer sends them and as the broker relays them.
fn payloads(seed: u64, subjects: u32, grant: &pb::CreateGrantRequest) -> (Vec<pb::LookupRequest>, Vec<FetchRequest>) {
    let mut lookups = Vec::with_capacity(subjects as usize);
    let mut fetches = Vec::with_capacity(subjects as usize);
    for i in 0..subjects {
        let query_json = serde_json::json!({ "national_id": citizen_national_id(seed, i) }).to_string();
        lookups.push(pb::LookupRequest {
            record_type: BIRTH_RECORD.into(),
            query_json: query_json.clone(),
            purpose: PURPOSE_DATA_SHARING.into(),
            fields: Vec::new(),
            schema_version: 0,
            request_id: String::new(),
        });
        fetches.push(FetchRequest {
            record_type: BIRTH_RECORD.into(),
            schema_version: 1,
            query_json,
            // What the broker sends: a UUIDv7 request id, the consumer, the purpose, the granted fields.
            request_id: format!("0197a000-0000-7000-8000-{i:012}"),
            consumer: JUDICIAL_OFFICE.into(),
            purpose: PURPOSE_DATA_SHARING.into(),
            fields: grant.fields.clone(),
        });
    }
    (lookups, fetches)
}

fn find_nginx(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nginx"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/nginx")])
        .find(|p| p.is_file())
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// nginx terminating the consumer's mutual TLS (client certificate checked
/// against the federation CA) and calling the register over mutual TLS with
/// the broker's certificate, verifying the register's. Tuned as one would in
/// production: upstream keep-alive, no access log, one worker per core.
fn nginx_config(dir: &Path, certs: &Path, port: u16, provider: SocketAddr, workers: usize) -> String {
    let p = |name: &str| certs.join(name).display().to_string();
    let d = |name: &str| dir.join(name).display().to_string();
    // Workers drop root privileges to `user`; Debian has no `nobody` group, the default.
    let user = if effective_uid() == Some(0) {
        "user root root;\n"
    } else {
        ""
    };
    format!(
        "# Written by `lienthong bench`.\n\
{user}worker_processes {workers};\n\
pid {pid};\n\
error_log {error_log} warn;\n\
events {{ worker_connections 4096; }}\n\
http {{\n\
    access_log off;\n\
    client_body_temp_path {tmp}/body;\n\
    proxy_temp_path {tmp}/proxy;\n\
    fastcgi_temp_path {tmp}/fastcgi;\n\
    uwsgi_temp_path {tmp}/uwsgi;\n\
    scgi_temp_path {tmp}/scgi;\n\
    keepalive_requests 1000000;\n\
    keepalive_timeout 300s;\n\
    http2_max_concurrent_streams 1024;\n\
    upstream register {{\n\
        server {provider};\n\
        keepalive 256;\n\
        keepalive_requests 1000000;\n\
        keepalive_timeout 300s;\n\
    }}\n\
    server {{\n\
        listen 127.0.0.1:{port} ssl http2;\n\
        ssl_protocols TLSv1.2 TLSv1.3;\n\
        ssl_certificate {broker_pem};\n\
        ssl_certificate_key {broker_key};\n\
        ssl_client_certificate {ca};\n\
        ssl_verify_client on;\n\
        ssl_verify_depth 2;\n\
        location / {{\n\
            grpc_pass grpcs://register;\n\
            grpc_ssl_protocols TLSv1.2 TLSv1.3;\n\
            grpc_ssl_certificate {broker_pem};\n\
            grpc_ssl_certificate_key {broker_key};\n\
            grpc_ssl_trusted_certificate {ca};\n\
            grpc_ssl_verify on;\n\
            grpc_ssl_verify_depth 2;\n\
            grpc_ssl_name localhost;\n\
            grpc_ssl_server_name on;\n\
            grpc_ssl_session_reuse on;\n\
        }}\n\
    }}\n\
}}\n",
        pid = d("nginx.pid"),
        error_log = d("error.log"),
        tmp = d("tmp"),
        broker_pem = p("broker.pem"),
        broker_key = p("broker.key"),
        ca = p("ca.pem"),
    )
}

/// Starts nginx in the foreground and waits until it accepts connections and
/// its workers are up.
/// Starts the bare relay (`lienthong bench-bare`) in front of the register;
/// returns it and its URL.
async fn start_bare(exe: &Path, certs: &Path, trust_domain: &str, register: &str) -> Result<(ChildProcess, String)> {
    let mut cmd = Command::new(exe);
    cmd.args(["bench-bare", "--tls-dir"])
        .arg(certs)
        .args([
            "--trust-domain",
            trust_domain,
            "--provider",
            CIVIL_STATUS,
            "--register",
            register,
            "--log-filter",
            BENCH_LOG_FILTER,
        ])
        // Logged as the bench's broker is, whatever the operator's RUST_LOG.
        .env_remove("RUST_LOG");
    let (process, line) =
        ChildProcess::spawn("bare relay", cmd, Some(crate::bare::READY), Duration::from_secs(60)).await?;
    let addr = parse_addr(&line.unwrap_or_default(), "bare relay")?;
    Ok((process, format!("https://127.0.0.1:{}", addr.port())))
}

async fn start_nginx(
    exe: &Path,
    dir: &Path,
    certs: &Path,
    provider: SocketAddr,
    workers: usize,
) -> Result<(ChildProcess, u16)> {
    let nginx_dir = dir.join("nginx");
    std::fs::create_dir_all(nginx_dir.join("tmp")).with_context(|| format!("creating {}", nginx_dir.display()))?;
    let mut last_error = None;
    // The port is free when picked but nginx binds it later: retry on a race.
    for _ in 0..3 {
        let port = free_port()?;
        let conf = nginx_dir.join("nginx.conf");
        std::fs::write(&conf, nginx_config(&nginx_dir, certs, port, provider, workers))
            .with_context(|| format!("writing {}", conf.display()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("-p")
            .arg(&nginx_dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"]);
        let (mut process, _) = ChildProcess::spawn("nginx proxy", cmd, None, Duration::ZERO).await?;
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if process.exited() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let log = std::fs::read_to_string(nginx_dir.join("error.log")).unwrap_or_default();
                last_error = Some(format!(
                    "nginx exited at start: {} {}",
                    process.last_lines(),
                    log.lines().last().unwrap_or_default()
                ));
                break;
            }
            let up = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok();
            if up && child_pids(process.pid()).len() >= workers {
                return Ok((process, port));
            }
            if Instant::now() > end {
                bail!("nginx did not accept connections within 10 s: {}", process.last_lines());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Err(anyhow!(last_error.unwrap_or_else(|| "nginx could not start".into())))
}

// ---------------------------------------------------------------------------
// PostgreSQL

/// Process names of the broker replicas on PostgreSQL, by index.
const PG_REPLICA_NAMES: [&str; 2] = ["broker on PostgreSQL (replica A)", "broker on PostgreSQL (replica B)"];

/// How long replica B may take to see the administration done through replica A.
const REPLICA_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// A throwaway PostgreSQL cluster with the broker replicas serving one database of it.
struct PgSetup {
    /// Each replica and its URL; A first. Declared before `cluster` so that an
    /// early return kills the brokers before the database goes away.
    replicas: Vec<(ChildProcess, String)>,
    /// Each replica's `/metrics` address, in the same order.
    metrics: Vec<SocketAddr>,
    report: PostgresReport,
    cluster: PgCluster,
}

/// What the bench learns from the cluster once it is durable.
struct PgFacts {
    server_version: String,
    durability: String,
    data_directory: String,
    postmaster_pid: Option<u32>,
}

/// `PgCluster` is tuned for tests (no fsync, asynchronous commit). A broker on
/// PostgreSQL in production waits for its WAL flush on every commit, as the
/// SQLite broker waits for `fdatasync`, so the comparison turns durability
/// back on (`ALTER SYSTEM` overrides `postgresql.conf`) and reloads.
async fn make_durable(admin_url: &str) -> Result<PgFacts> {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(admin_url)
        .await
        .context("connecting to the bench's PostgreSQL cluster")?;
    for setting in ["fsync", "synchronous_commit", "full_page_writes"] {
        sqlx::query(&format!("ALTER SYSTEM SET {setting} = on"))
            .execute(&mut conn)
            .await
            .with_context(|| format!("setting {setting} = on"))?;
    }
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&mut conn)
        .await
        .context("reloading the PostgreSQL configuration")?;
    conn.close().await.context("closing the setup connection")?;
    // The postmaster applies a reload asynchronously; a fresh session shows when it has.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut conn = sqlx::PgConnection::connect(admin_url)
            .await
            .context("connecting to the bench's PostgreSQL cluster")?;
        let (fsync, synchronous_commit, full_page_writes, server_version, data_directory, backend): (
            String,
            String,
            String,
            String,
            String,
            i32,
        ) = sqlx::query_as(
            "SELECT current_setting('fsync'), current_setting('synchronous_commit'), \
             current_setting('full_page_writes'), current_setting('server_version'), \
             current_setting('data_directory'), pg_backend_pid()",
        )
        .fetch_one(&mut conn)
        .await
        .context("reading the PostgreSQL settings")?;
        // Read while the backend is alive: its parent is the postmaster.
        let postmaster_pid = u32::try_from(backend).ok().and_then(parent_pid);
        conn.close().await.context("closing the setup connection")?;
        let durability =
            format!("fsync={fsync}, synchronous_commit={synchronous_commit}, full_page_writes={full_page_writes}");
        if [&fsync, &synchronous_commit, &full_page_writes]
            .iter()
            .all(|v| *v == "on")
        {
            return Ok(PgFacts {
                server_version,
                durability,
                data_directory,
                postmaster_pid,
            });
        }
        if Instant::now() > deadline {
            bail!("PostgreSQL did not apply the durable settings within 10 s after a reload: {durability}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copies replica A's subject HMAC key into `to` (README, "PostgreSQL and
/// several replicas"): a citizen's pseudonym must be the same in every log.
fn share_subject_key(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let key = lienthong_audit::keys::SUBJECT_KEY_FILE;
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let target = to.join(key);
    std::fs::copy(from.join(key), &target)
        .with_context(|| format!("copying {key} from {} to {}", from.display(), to.display()))?;
    // The broker refuses a key file readable by group or others.
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", target.display()))?;
    Ok(())
}

/// Waits until `url` answers `request` with a record: the replica has picked
/// up the members, schema, endpoint and grant written through the other one.
async fn await_first_lookup(url: &str, material: &TlsMaterial, request: &pb::LookupRequest) -> Result<Duration> {
    let started = Instant::now();
    let target = Target::lookup(
        channels(url, material, None, 1).await?,
        Arc::from(vec![request.clone()]),
    );
    loop {
        match target.call(0).await {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) if started.elapsed() > REPLICA_SYNC_TIMEOUT => bail!(
                "replica B did not serve a lookup within {} s of the administration through replica A \
                 (last answer {:?}: {})",
                REPLICA_SYNC_TIMEOUT.as_secs(),
                e.code,
                e.message
            ),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Everything the PostgreSQL scenarios share, besides the cluster.
struct PgContext<'a> {
    exe: &'a Path,
    dir: &'a Path,
    certs: &'a Path,
    trust_domain: &'a str,
    provider_url: &'a str,
    consumer_material: &'a TlsMaterial,
    probe: &'a pb::LookupRequest,
    fsync_samples: usize,
    progress: &'a Progress,
}

/// Starts `replicas` brokers (1 or 2) on a fresh database of `cluster`,
/// administers the federation through the first and, with two, waits until
/// the second serves lookups.
async fn setup_postgres(cluster: PgCluster, replicas: usize, cx: &PgContext<'_>) -> Result<PgSetup> {
    let database_url = cluster.create_database().await.context("creating the bench database")?;
    let facts = make_durable(&cluster.url()).await?;
    // The cluster lives in a temporary directory of its own; its WAL is there.
    let disk = Path::new(&facts.data_directory)
        .parent()
        .and_then(|d| probe_fsync(d, cx.fsync_samples).ok());
    let mut started: Vec<(ChildProcess, String)> = Vec::new();
    let mut replica_reports = Vec::new();
    let mut data_dirs: Vec<PathBuf> = Vec::new();
    let mut metrics_addrs = Vec::new();
    for (i, name) in PG_REPLICA_NAMES
        .iter()
        .enumerate()
        .take(replicas.clamp(1, PG_REPLICA_NAMES.len()))
    {
        let tag = if i == 0 { "a" } else { "b" };
        let data_dir = cx.dir.join(format!("broker-pg-{tag}-data"));
        if let Some(first) = data_dirs.first() {
            share_subject_key(first, &data_dir)?;
        }
        let config = write_broker_config(
            cx.dir,
            &format!("broker-pg-{tag}.toml"),
            &data_dir,
            Some(&database_url),
            cx.certs,
            cx.trust_domain,
        )?;
        let (process, url, metrics) = start_broker(cx.exe, &config, name).await?;
        replica_reports.push(ReplicaReport {
            pid: process.pid(),
            data_dir: data_dir.display().to_string(),
            rss_after_setup_kib: None,
        });
        data_dirs.push(data_dir);
        started.push((process, url));
        metrics_addrs.push(metrics);
    }
    let Some((_, url_a)) = started.first() else {
        bail!("no broker replica was started");
    };
    administer(url_a, cx.certs, cx.provider_url).await?;
    let mut replica_b_ready_ms = None;
    if let Some((_, url_b)) = started.get(1) {
        cx.progress
            .line("bench: waiting for replica B to see the administration done through replica A");
        let waited = await_first_lookup(url_b, cx.consumer_material, cx.probe).await?;
        cx.progress.line(&format!(
            "bench: replica B served its first lookup {} ms after the administration through replica A",
            waited.as_millis()
        ));
        replica_b_ready_ms = Some(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX));
    }
    for (r, (process, _)) in replica_reports.iter_mut().zip(&started) {
        r.rss_after_setup_kib = status_kib(process.pid(), "VmRSS:");
    }
    Ok(PgSetup {
        replicas: started,
        metrics: metrics_addrs,
        report: PostgresReport {
            server_version: facts.server_version,
            durability: facts.durability,
            data_directory: facts.data_directory,
            postmaster_pid: facts.postmaster_pid,
            disk,
            replicas: replica_reports,
            replica_b_ready_ms,
        },
        cluster,
    })
}

// ---------------------------------------------------------------------------
// The run

struct Prepared {
    scenario: Scenario,
    target: Target,
    watched: Watched,
    /// Connections the load generator holds to the target (all replicas).
    connections: usize,
}

/// Runs the benchmark and prints its report (a table, or JSON with `json`).
pub async fn run(args: BenchArgs, json: bool) -> Result<()> {
    let settings = Settings::of(&args)?;
    let machine = Machine::read();
    let progress = Arc::new(Progress::new());
    lienthong_tls::install_crypto_provider();
    let (dir, _temp) = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new().prefix("lienthong-bench-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let trust_domain = "lienthong.gov.vn";
    let certs = dir.join("certs");
    make_certs(&certs, trust_domain)?;
    let exe = std::env::current_exe().context("cannot find the lienthong executable to start the servers")?;
    let mut notes = Vec::new();

    progress.line("bench: starting the civil-status register and the broker");
    let mut provider_cmd = Command::new(&exe);
    provider_cmd
        .args(["demo-provider", "civil-status", "--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(&certs)
        .args(["--trust-domain", trust_domain, "--seed", &settings.seed.to_string()])
        // nginx opens an upstream connection per request in flight, all from
        // one address: the default cap of 32 handshakes at once per address
        // closed its first few hundred (502s in its warm-up), as a register
        // behind nginx would be configured not to.
        .args(["--max-handshakes-per-address", "256"])
        // The kit logs every fetch at info; the bench measures serving, not logging.
        .env("RUST_LOG", "warn");
    let (mut provider, line) = ChildProcess::spawn(
        "civil-status register",
        provider_cmd,
        Some("civil-status register serving on "),
        Duration::from_secs(60),
    )
    .await?;
    let provider_addr = parse_addr(&line.unwrap_or_default(), "register")?;
    let provider_url = format!("https://127.0.0.1:{}", provider_addr.port());

    let data_dir = match &args.data_dir {
        Some(d) => d.join(format!("lienthong-bench-{}", std::process::id())),
        None => dir.join("broker-data"),
    };
    let disk = match probe_fsync(&data_dir, if settings.quick { 20 } else { 200 }) {
        Ok(d) => Some(d),
        Err(e) => {
            notes.push(format!("could not time fdatasync in {}: {e:#}", data_dir.display()));
            None
        }
    };
    let config = write_broker_config(&dir, "broker.toml", &data_dir, None, &certs, trust_domain)?;
    let (mut broker, mut broker_url, mut broker_metrics) = start_broker(&exe, &config, "broker").await?;
    let grant = administer(&broker_url, &certs, &provider_url).await?;
    let mut log_fill = None;
    if settings.log_entries > 0 {
        // The log has one writer: the broker is stopped while the bench appends.
        broker.stop(Duration::from_secs(30)).await;
        let (entries, seconds) = fill::fill(&config, &grant, settings.log_entries, settings.seed, &progress).await?;
        (broker, broker_url, broker_metrics) = start_broker(&exe, &config, "broker").await?;
        progress.line(&format!(
            "bench: {entries} entries in the broker's audit log; waiting for the restarted broker's check of its history"
        ));
        let checking = Instant::now();
        inside::wait_history_checked(broker_metrics, fill::check_timeout(entries)).await?;
        log_fill = Some(fill::FillReport {
            entries,
            appended: settings.log_entries,
            seconds,
            history_check_s: checking.elapsed().as_secs_f64(),
        });
    }
    let (lookups, fetches) = payloads(settings.seed, settings.subjects, &grant);
    let (lookups, fetches): (Arc<[pb::LookupRequest]>, Arc<[FetchRequest]>) = (lookups.into(), fetches.into());

    let broker_material = TlsMaterial::load(&member_files(&certs, "broker"))?;
    let consumer_material = TlsMaterial::load(&member_files(&certs, JUDICIAL_OFFICE))?;

    // relayed-pg and relayed-pg-2 share one cluster and one database: the
    // second replica joins the deployment the first one measures alone.
    let pg_replicas = settings.scenarios.iter().map(|s| s.pg_replicas()).max().unwrap_or(0);
    let mut pg: Option<PgSetup> = None;
    let mut pg_unavailable: Option<(&'static str, String)> = None;
    if pg_replicas > 0 {
        progress.line(&format!(
            "bench: starting a throwaway PostgreSQL cluster and {pg_replicas} broker replica{} on it",
            if pg_replicas == 1 { "" } else { "s" }
        ));
        match tokio::task::spawn_blocking(PgCluster::start).await {
            Ok(Ok(cluster)) => {
                let probe = lookups
                    .first()
                    .ok_or_else(|| anyhow!("no lookup payloads were built"))?
                    .clone();
                let cx = PgContext {
                    exe: &exe,
                    dir: &dir,
                    certs: &certs,
                    trust_domain,
                    provider_url: &provider_url,
                    consumer_material: &consumer_material,
                    probe: &probe,
                    fsync_samples: if settings.quick { 20 } else { 200 },
                    progress: &progress,
                };
                match setup_postgres(cluster, pg_replicas, &cx).await {
                    Ok(setup) => pg = Some(setup),
                    Err(e) => pg_unavailable = Some(("failed", format!("failed: PostgreSQL setup: {e:#}"))),
                }
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                pg_unavailable = Some(("skipped", format!("skipped: {e}")));
            }
            Ok(Err(e)) => {
                pg_unavailable = Some(("failed", format!("failed: PostgreSQL could not be started: {e}")));
            }
            Err(e) => pg_unavailable = Some(("failed", format!("failed: starting PostgreSQL panicked: {e}"))),
        }
        if let Some((_, note)) = &pg_unavailable {
            progress.line(&format!("bench: PostgreSQL scenarios {note}"));
        }
    }
    // Direct, proxy and bare all call `RecordProvider.Fetch`, differing in what stands between.
    let provider_pid = provider.pid();
    let fetch_phase = |scenario, chans: Connections, intermediary: Vec<u32>| Prepared {
        scenario,
        target: Target::fetch(chans, fetches.clone()),
        watched: Watched {
            intermediary,
            provider: vec![provider_pid],
            database: None,
            broker_metrics: Vec::new(),
        },
        connections: settings.connections,
    };
    let mut nginx: Option<ChildProcess> = None;
    let mut bare: Option<ChildProcess> = None;
    let mut prepared = Vec::new();
    let mut reports: Vec<ScenarioReport> = Vec::new();
    for scenario in &settings.scenarios {
        let skipped = |status: &'static str, note: String| ScenarioReport {
            name: scenario.name(),
            status,
            note: Some(note),
            closed: None,
            open: None,
        };
        match scenario {
            Scenario::Direct => {
                let chans = channels(
                    &provider_url,
                    &broker_material,
                    Some((trust_domain, Identity::Member(CIVIL_STATUS.into()))),
                    settings.connections,
                )
                .await?;
                prepared.push(fetch_phase(*scenario, chans, Vec::new()));
            }
            Scenario::Relayed => {
                let chans = channels(&broker_url, &consumer_material, None, settings.connections).await?;
                prepared.push(Prepared {
                    scenario: *scenario,
                    target: Target::lookup(chans, lookups.clone()),
                    watched: Watched {
                        intermediary: vec![broker.pid()],
                        provider: vec![provider.pid()],
                        database: None,
                        broker_metrics: vec![broker_metrics],
                    },
                    connections: settings.connections,
                });
            }
            Scenario::Proxy => {
                let Some(exe) = find_nginx(args.nginx.as_deref()) else {
                    let note = "skipped: nginx is not installed (not on PATH nor /usr/sbin/nginx); \
                        install it (Debian: apt-get install nginx) or pass --nginx PATH"
                        .to_string();
                    progress.line(&format!("bench: proxy {note}"));
                    reports.push(skipped("skipped", note));
                    continue;
                };
                let workers = args.nginx_workers.unwrap_or(machine.cpus).max(1);
                let started = start_nginx(&exe, &dir, &certs, provider_addr, workers).await;
                let (process, port) = match started {
                    Ok(p) => p,
                    Err(e) => {
                        let note = format!("failed: nginx ({}) could not be started: {e:#}", exe.display());
                        progress.line(&format!("bench: proxy {note}"));
                        reports.push(skipped("failed", note));
                        continue;
                    }
                };
                let url = format!("https://127.0.0.1:{port}");
                let chans = match channels(&url, &consumer_material, None, settings.connections).await {
                    Ok(c) => c,
                    Err(e) => {
                        let note = format!("failed: cannot connect to nginx: {e:#}");
                        progress.line(&format!("bench: proxy {note}"));
                        reports.push(skipped("failed", note));
                        continue;
                    }
                };
                let mut pids = vec![process.pid()];
                pids.extend(child_pids(process.pid()));
                nginx = Some(process);
                prepared.push(fetch_phase(*scenario, chans, pids));
            }
            Scenario::Bare => {
                let (process, url) = start_bare(&exe, &certs, trust_domain, &provider_url).await?;
                let chans = channels(&url, &consumer_material, None, settings.connections).await?;
                prepared.push(fetch_phase(*scenario, chans, vec![process.pid()]));
                bare = Some(process);
            }
            Scenario::RelayedPg | Scenario::RelayedPg2 => {
                let wanted = scenario.pg_replicas();
                let Some(setup) = pg.as_ref().filter(|s| s.replicas.len() >= wanted) else {
                    let (status, note) = pg_unavailable
                        .clone()
                        .unwrap_or(("failed", "failed: the PostgreSQL replicas were not started".into()));
                    reports.push(skipped(status, note));
                    continue;
                };
                let per_replica = settings.connections.div_ceil(wanted);
                let mut by_replica = Vec::with_capacity(wanted);
                for (_, url) in setup.replicas.iter().take(wanted) {
                    by_replica.push(channels(url, &consumer_material, None, per_replica).await?);
                }
                // Interleaved, so that request i goes to replica i % wanted: the
                // round robin of a gRPC-aware balancer in front of the replicas.
                let connections = Connections::interleave(by_replica);
                prepared.push(Prepared {
                    scenario: *scenario,
                    target: Target::lookup(connections, lookups.clone()),
                    watched: Watched {
                        intermediary: setup.replicas.iter().take(wanted).map(|(p, _)| p.pid()).collect(),
                        provider: vec![provider.pid()],
                        database: setup.report.postmaster_pid,
                        broker_metrics: setup.metrics.iter().take(wanted).copied().collect(),
                    },
                    connections: per_replica * wanted,
                });
            }
        }
        reports.push(ScenarioReport {
            name: scenario.name(),
            status: "ok",
            note: None,
            closed: None,
            open: None,
        });
    }

    let mut broker_report = BrokerReport {
        pid: broker.pid(),
        rss_after_setup_kib: status_kib(broker.pid(), "VmRSS:"),
        ..BrokerReport::default()
    };

    if settings.closed_loop {
        let mut rounds: Vec<Vec<PhaseReport>> = vec![Vec::new(); prepared.len()];
        let mut peaks: Vec<u64> = Vec::new();
        for round in 0..settings.rounds {
            for (k, p) in prepared.iter().enumerate() {
                let mut label = format!("{} closed c={}", p.scenario.name(), settings.concurrency);
                if settings.rounds > 1 {
                    label.push_str(&format!(" round {}/{}", round + 1, settings.rounds));
                }
                let broker_pid = broker.pid();
                let is_relayed = p.scenario == Scenario::Relayed;
                let phase = closed_loop(
                    &p.target,
                    settings.concurrency,
                    settings.warmup(),
                    settings.duration(),
                    &p.watched,
                    &progress,
                    label.clone(),
                    || {
                        if is_relayed && !reset_peak_rss(broker_pid) {
                            tracing::debug!("cannot reset the broker's peak RSS");
                        }
                    },
                )
                .await;
                if is_relayed {
                    peaks.extend(status_kib(broker.pid(), "VmHWM:"));
                }
                let r = phase.report(Some(settings.concurrency), None, p.connections);
                progress.line(&phase_line(&label, &r));
                rounds[k].push(r);
            }
        }
        broker_report.peak_rss_saturation_kib = peaks.into_iter().max();
        for (p, phases) in prepared.iter().zip(rounds) {
            if let Some(i) = reports.iter().position(|r| r.name == p.scenario.name()) {
                reports[i].closed = median_round(phases, false);
            }
        }
    }

    if settings.open_loop {
        let rate = match settings.rate_per_s {
            Some(r) => Some(r),
            None => {
                let closed = |s: Scenario| {
                    reports
                        .iter()
                        .find(|r| r.name == s.name())
                        .and_then(|r| r.closed.as_ref())
                        .map(|c| c.throughput_per_s)
                        .filter(|t| *t > 0.0)
                };
                let base = closed(Scenario::Relayed).or_else(|| {
                    prepared
                        .iter()
                        .filter_map(|p| closed(p.scenario))
                        .min_by(|a, b| a.total_cmp(b))
                });
                base.map(|t| (t / 2.0).max(1.0))
            }
        };
        match rate {
            None => {
                notes.push("open loop skipped: no closed-loop throughput to derive a rate from; pass --rate".into())
            }
            Some(rate) => {
                if !settings.closed_loop {
                    // nginx opens an upstream connection (a TLS handshake with
                    // the register) for every request in flight beyond those it
                    // keeps alive. Started cold at a few thousand lookups/s it
                    // could fall behind for good: p99 of seconds, its and the
                    // register's CPU doubled. The closed loop of `--mode both`
                    // leaves every target warm; `--mode open` warms them the
                    // same way, unmeasured.
                    for p in &prepared {
                        let label = format!("{} warm-up c={}", p.scenario.name(), settings.concurrency);
                        closed_loop(
                            &p.target,
                            settings.concurrency,
                            settings.warmup(),
                            Duration::ZERO,
                            &p.watched,
                            &progress,
                            label,
                            || {},
                        )
                        .await;
                    }
                }
                let mut rounds: Vec<Vec<PhaseReport>> = vec![Vec::new(); prepared.len()];
                for round in 0..settings.rounds {
                    for (k, p) in prepared.iter().enumerate() {
                        let mut label = format!("{} open {rate:.0}/s", p.scenario.name());
                        if settings.rounds > 1 {
                            label.push_str(&format!(" round {}/{}", round + 1, settings.rounds));
                        }
                        let schedule = pacer::Schedule {
                            rate,
                            arrivals: settings.arrivals,
                            seed: settings.seed,
                            warmup: settings.warmup(),
                            duration: settings.duration(),
                        };
                        let phase = open_loop(&p.target, schedule, &p.watched, &progress, label.clone()).await;
                        // One target failing to take new connections costs its
                        // open loop, not the figures of the whole run.
                        let phase = match phase {
                            Ok(phase) => phase,
                            Err(e) => {
                                let note = format!("{label} failed: {e:#}");
                                progress.line(&format!("bench: {note}"));
                                notes.push(note);
                                continue;
                            }
                        };
                        let r = phase.report(None, Some(rate), p.connections);
                        progress.line(&phase_line(&label, &r));
                        rounds[k].push(r);
                    }
                }
                for (p, phases) in prepared.iter().zip(rounds) {
                    if let Some(i) = reports.iter().position(|r| r.name == p.scenario.name()) {
                        reports[i].open = median_round(phases, true);
                    }
                }
                notes.extend(send_lag_note(&reports));
            }
        }
    }

    if settings.inflight > 0 && settings.scenarios.contains(&Scenario::Relayed) {
        let connections = settings
            .inflight
            .div_ceil(STREAMS_PER_CONNECTION)
            .max(settings.connections);
        let chans = channels(&broker_url, &consumer_material, None, connections).await?;
        let target = Target::lookup(chans, lookups.clone());
        let watched = Watched {
            intermediary: vec![broker.pid()],
            provider: vec![provider.pid()],
            database: None,
            broker_metrics: vec![broker_metrics],
        };
        let label = format!("relayed in flight={}", settings.inflight);
        let broker_pid = broker.pid();
        let mut reset = true;
        let phase = closed_loop(
            &target,
            settings.inflight,
            settings.warmup(),
            settings.duration().min(Duration::from_secs(5)),
            &watched,
            &progress,
            label.clone(),
            || reset = reset_peak_rss(broker_pid),
        )
        .await;
        let r = phase.report(Some(settings.inflight), None, connections);
        progress.line(&phase_line(&label, &r));
        if !reset {
            notes.push(
                "could not reset the broker's peak RSS before the in-flight probe; its figure is the peak since start"
                    .into(),
            );
        }
        broker_report.inflight = Some(InflightReport {
            lookups_in_flight: settings.inflight,
            connections,
            peak_rss_kib: status_kib(broker.pid(), "VmHWM:"),
            phase: r,
        });
    }

    if broker.exited() {
        notes.push(format!("the broker exited during the run: {}", broker.last_lines()));
    }
    let mut postgres = None;
    if let Some(mut setup) = pg.take() {
        for (process, _) in &mut setup.replicas {
            if process.exited() {
                notes.push(format!(
                    "the {} exited during the run: {}",
                    process.name,
                    process.last_lines()
                ));
            }
            process.stop(Duration::from_secs(15)).await;
        }
        if args.dir.is_some() {
            notes.push(format!(
                "the PostgreSQL cluster in {} is removed at the end of the run, whatever --dir says",
                setup.report.data_directory
            ));
        }
        let PgSetup { report, cluster, .. } = setup;
        // Dropping the cluster runs `pg_ctl stop` and removes its directory: blocking work.
        let _ = tokio::task::spawn_blocking(move || drop(cluster)).await;
        postgres = Some(report);
    }
    if let Some(n) = nginx.as_mut() {
        n.stop(Duration::from_secs(5)).await;
    }
    if let Some(b) = bare.as_mut() {
        b.stop(Duration::from_secs(5)).await;
    }
    broker.stop(Duration::from_secs(15)).await;
    provider.stop(Duration::from_secs(5)).await;
    if args.dir.is_some() {
        notes.push(format!("files kept in {}", dir.display()));
    } else if args.data_dir.is_some() {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    if settings.quick {
        notes.push("--quick: a smoke run; measure without it for figures worth quoting".into());
    }

    let ratios = ratios(&reports);
    let report = Report {
        machine,
        settings,
        disk,
        log_fill,
        scenarios: reports,
        broker: settings_has_relayed(&prepared).then_some(broker_report),
        postgres,
        ratios,
        notes,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_table(&report));
    }
    Ok(())
}

fn settings_has_relayed(prepared: &[Prepared]) -> bool {
    prepared.iter().any(|p| p.scenario == Scenario::Relayed)
}

fn ratios(reports: &[ScenarioReport]) -> Ratios {
    let get = |name: &str| reports.iter().find(|r| r.name == name && r.status == "ok");
    let closed_tp = |name: &str| {
        get(name)
            .and_then(|r| r.closed.as_ref())
            .map(|c| c.throughput_per_s)
            .filter(|t| *t > 0.0)
    };
    let open_p99 = |name: &str| {
        get(name)
            .and_then(|r| r.open.as_ref())
            .filter(|o| o.ok > 0)
            .map(|o| o.latency_us.p99 as f64)
    };
    let cpu = |name: &str| {
        get(name)
            .and_then(|r| r.closed.as_ref())
            .and_then(|c| c.cpu_s_per_1000.intermediary)
    };
    // SQLite runs inside the broker; PostgreSQL's share is in its own processes.
    let cpu_with_database = |name: &str| {
        get(name).and_then(|r| r.closed.as_ref()).and_then(|c| {
            let broker = c.cpu_s_per_1000.intermediary?;
            Some(broker + c.cpu_s_per_1000.database.unwrap_or(0.0))
        })
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    // The scenarios' phases alternate within a round, so a round's pair is
    // a fairer comparison on a noisy machine than the medians of each.
    let by_round = |a: &str, b: &str| -> Vec<f64> {
        let rounds = |name: &str| {
            get(name)
                .and_then(|r| r.closed.as_ref())
                .map(|c| c.rounds.clone())
                .unwrap_or_default()
        };
        let (a, b) = (rounds(a), rounds(b));
        if a.len() < 2 || a.len() != b.len() {
            return Vec::new();
        }
        a.iter()
            .zip(&b)
            .filter(|(_, b)| **b > 0.0)
            .map(|(a, b)| a / b)
            .collect()
    };
    let diff_ms = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some((a - b) / 1000.0),
        _ => None,
    };
    // CPU seconds per 1,000 lookups are milliseconds per lookup.
    let work = match (cpu("relayed"), cpu("bare")) {
        (Some(broker), Some(bare)) => Some(broker - bare),
        _ => None,
    };
    Ratios {
        relayed_over_direct_throughput: ratio(closed_tp("relayed"), closed_tp("direct")),
        relayed_over_proxy_throughput: ratio(closed_tp("relayed"), closed_tp("proxy")),
        relayed_over_direct_throughput_by_round: by_round("relayed", "direct"),
        relayed_over_proxy_throughput_by_round: by_round("relayed", "proxy"),
        p99_added_over_direct_ms: diff_ms(open_p99("relayed"), open_p99("direct")),
        p99_added_over_proxy_ms: diff_ms(open_p99("relayed"), open_p99("proxy")),
        proxy_p99_added_over_direct_ms: diff_ms(open_p99("proxy"), open_p99("direct")),
        broker_over_proxy_cpu_per_lookup: ratio(cpu("relayed"), cpu("proxy")),
        bare_over_proxy_throughput: ratio(closed_tp("bare"), closed_tp("proxy")),
        relayed_over_bare_throughput: ratio(closed_tp("relayed"), closed_tp("bare")),
        bare_over_proxy_throughput_by_round: by_round("bare", "proxy"),
        relayed_over_bare_throughput_by_round: by_round("relayed", "bare"),
        bare_over_proxy_cpu_per_lookup: ratio(cpu("bare"), cpu("proxy")),
        broker_work_cpu_ms_per_lookup: work,
        broker_work_over_proxy_cpu_per_lookup: ratio(work, cpu("proxy")),
        bare_p99_added_over_direct_ms: diff_ms(open_p99("bare"), open_p99("direct")),
        relayed_pg_over_relayed_throughput: ratio(closed_tp("relayed-pg"), closed_tp("relayed")),
        relayed_pg_2_over_relayed_pg_throughput: ratio(closed_tp("relayed-pg-2"), closed_tp("relayed-pg")),
        relayed_pg_over_relayed_cpu_per_lookup: ratio(cpu_with_database("relayed-pg"), cpu_with_database("relayed")),
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// Says how late the open loop's generator sent its requests, when that is a
/// part of the latencies worth knowing: on two shared cores it waits for a
/// core like the processes it measures.
fn send_lag_note(reports: &[ScenarioReport]) -> Option<String> {
    let lags: Vec<(&str, u64)> = reports
        .iter()
        .filter_map(|r| Some((r.name, r.open.as_ref()?.send_lag_us?.p99)))
        .collect();
    if !lags.iter().any(|(_, p99)| *p99 >= SEND_LAG_WORTH_NOTING_US) {
        return None;
    }
    let list: Vec<String> = lags
        .iter()
        .map(|(name, p99)| format!("{name} {} ms", ms(*p99)))
        .collect();
    Some(format!(
        "open loop: the load generator sent requests late (p99 {}); the latencies count from the due times, \
         so they include that delay: the generator waits for a core like every process on the machine",
        list.join(", ")
    ))
}

fn phase_line(label: &str, r: &PhaseReport) -> String {
    let mut line = format!(
        "bench: {label}: {:.0}/s, p50 {} ms, p99 {} ms, {} errors",
        r.throughput_per_s,
        ms(r.latency_us.p50),
        ms(r.latency_us.p99),
        r.errors
    );
    if r.dropped > 0 {
        line.push_str(&format!(", {} dropped", r.dropped));
    }
    if let Some(lag) = r.send_lag_us.filter(|l| l.p99 >= SEND_LAG_WORTH_NOTING_US) {
        line.push_str(&format!(", sent up to {} ms late (p99)", ms(lag.p99)));
    }
    if let Some(e) = &r.first_error {
        line.push_str(&format!(" (first: {e})"));
    }
    if r.warmup_errors > 0 {
        line.push_str(&format!("; {} during the unmeasured warm-up", r.warmup_errors));
        if let Some(e) = &r.first_warmup_error {
            line.push_str(&format!(" (first: {e})"));
        }
    }
    line
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

/// A scenario's phases that ran, each with its load as the table names it.
fn phases(r: &ScenarioReport) -> impl Iterator<Item = (String, &PhaseReport)> {
    let closed = r
        .closed
        .as_ref()
        .map(|c| (format!("closed c={}", c.concurrency.unwrap_or(0)), c));
    let open = r
        .open
        .as_ref()
        .map(|o| (format!("open {:.0}/s", o.target_rate_per_s.unwrap_or(0.0)), o));
    closed.into_iter().chain(open)
}

/// The relayed phases as the broker timed them, or nothing when no phase
/// has its histograms.
fn render_inside(scenarios: &[ScenarioReport]) -> String {
    let timing = |t: &Option<inside::Timing>| match t {
        Some(t) => format!("{:.2} / {:.2} / {:.2}", t.mean_ms, t.p50_ms, t.p99_ms),
        None => "-".into(),
    };
    let mut rows = String::new();
    for r in scenarios.iter().filter(|r| r.status == "ok") {
        for (load, p) in phases(r) {
            if let Some(i) = &p.inside_broker {
                rows.push_str(&format!(
                    "{:<12} {:<13}   {:>24}   {:>24}   {:>24}\n",
                    r.name,
                    load,
                    timing(&i.lookup),
                    timing(&i.provider_call),
                    timing(&i.audit_wait)
                ));
            }
        }
    }
    if rows.is_empty() {
        return rows;
    }
    format!(
        "\ninside the broker, from its own histograms (ms: mean / p50 / p99)\n\
         {:<12} {:<13}   {:>24}   {:>24}   {:>24}\n{rows}\
         lookup: from its arrival at the broker's service to the answer; register call and audit wait are parts \
         of it. Means are exact; p50 and p99 are interpolated inside factor-2 buckets (0.25 ms, 0.5 ms, 1 ms, ...), \
         so read them as within a factor of two. A register call much slower than the direct phase's whole \
         lookup is time spent waiting for a core, not in the register.\n",
        "scenario", "load", "lookup", "register call", "audit wait"
    )
}

fn render_table(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let s = &report.settings;
    out.push_str(&format!(
        "\nlienthong bench: {} CPUs ({}), {} MiB, load average at start {}\n",
        m.cpus, m.cpu_model, m.memory_mib, m.load_average_at_start
    ));
    out.push_str(&format!(
        "{} s measured after {} s warm-up per phase, {} connections, {} subjects; all calls mutual TLS\n\n",
        s.duration_s, s.warmup_s, s.connections, s.subjects
    ));
    if s.open_loop {
        out.push_str(match s.arrivals {
            Arrivals::Even => "open loop: evenly spaced arrivals (--arrivals even)\n\n",
            Arrivals::Poisson => "open loop: Poisson arrivals, exponential gaps (--arrivals poisson)\n\n",
        });
    }
    if let Some(d) = &report.disk {
        out.push_str(&format!(
            "broker database in {}: fdatasync p50 {} ms, p99 {} ms (every lookup waits for one commit)\n\n",
            d.place(),
            ms(d.fdatasync_p50_us),
            ms(d.fdatasync_p99_us)
        ));
    }
    if let Some(f) = &report.log_fill {
        out.push_str(&format!(
            "broker's audit log: {} entries before the phases ({} appended by the bench in {:.1} s, {:.0}/s; \
             the restarted broker checked the history in {:.1} s)\n\n",
            f.entries,
            f.appended,
            f.seconds,
            f.appended as f64 / f.seconds.max(1e-3),
            f.history_check_s
        ));
    }
    out.push_str(&format!(
        "{:<12} {:<13} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}   {:<35}   {}\n",
        "", "", "", "", "", "", "", "", "", "CPU ms per lookup", "machine"
    ));
    out.push_str(&format!(
        "{:<12} {:<13} {:>11} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}   {:>8} {:>8} {:>8} {:>8}   {:>10} {:>9} {:>13}\n",
        "scenario",
        "load",
        "lookups/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9",
        "max ms",
        "errors",
        "middle",
        "register",
        "database",
        "loadgen",
        "cores busy",
        "switches",
        "disk KiB"
    ));
    let row = |name: &str, load: String, p: &PhaseReport| {
        format!(
            "{:<12} {:<13} {:>11.0} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7}   {:>8} {:>8} {:>8} {:>8}   {:>10} {:>9} {:>13}\n",
            name,
            load,
            p.throughput_per_s,
            ms(p.latency_us.p50),
            ms(p.latency_us.p90),
            ms(p.latency_us.p99),
            ms(p.latency_us.p999),
            ms(p.latency_us.max),
            p.errors + p.dropped,
            opt(p.cpu_s_per_1000.intermediary, 3),
            opt(p.cpu_s_per_1000.provider, 3),
            match (p.cpu_s_per_1000.database, p.cpu_s_per_1000.sqlite_in_broker) {
                (None, Some(sqlite)) => format!("({sqlite:.3})"),
                (database, _) => opt(database, 3),
            },
            opt(p.cpu_s_per_1000.load_generator, 3),
            match p.machine.busy_cores {
                Some(busy) => format!("{busy:.2}/{}", report.machine.cpus),
                None => "-".into(),
            },
            opt(p.switches_per_lookup.intermediary, 1),
            match (p.disk_kib_per_lookup.intermediary, p.disk_kib_per_lookup.database) {
                (middle, Some(database)) => format!("{} ({database:.1})", opt(middle, 1)),
                (middle, None) => opt(middle, 1),
            },
        )
    };
    for r in &report.scenarios {
        if r.status != "ok" {
            out.push_str(&format!("{:<12} {}\n", r.name, r.note.as_deref().unwrap_or(r.status)));
            continue;
        }
        for (load, p) in phases(r) {
            out.push_str(&row(r.name, load, p));
        }
    }
    out.push_str(
        "CPU ms per lookup = CPU s per 1,000 lookups; middle: the broker (relayed; relayed-pg-2: both replicas) \
         or nginx (proxy, all workers) or the bare relay (bare); database: the PostgreSQL server, all its processes, or in parentheses \
         SQLite's threads inside the broker (part of middle); cores busy: the whole machine's CPU during the \
         phase, every process counted, against its core count; switches: the middle's context switches per lookup, \
         all its threads (each voluntary one a sleep and a wake-up); disk KiB: what the middle wrote to storage per \
         lookup (the broker: its SQLite database, audit log included), in parentheses the PostgreSQL server's\n",
    );
    out.push_str(&render_inside(&report.scenarios));
    if let Some(b) = &report.broker {
        out.push_str("\nbroker process:");
        if let Some(k) = b.rss_after_setup_kib {
            out.push_str(&format!(" RSS after setup {:.1} MiB;", k as f64 / 1024.0));
        }
        if let Some(k) = b.peak_rss_saturation_kib {
            out.push_str(&format!(" peak RSS at saturation {:.1} MiB;", k as f64 / 1024.0));
        }
        if let Some(i) = &b.inflight {
            out.push_str(&format!(
                " peak RSS with {} lookups in flight {} ({:.0}/s, p99 {} ms, {} errors)",
                i.lookups_in_flight,
                i.peak_rss_kib
                    .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into()),
                i.phase.throughput_per_s,
                ms(i.phase.latency_us.p99),
                i.phase.errors
            ));
        }
        out.push('\n');
    }
    if let Some(pg) = &report.postgres {
        out.push_str(&format!(
            "\nPostgreSQL {} (throwaway cluster, {}): {} broker replica{}, RSS after setup {}",
            pg.server_version,
            pg.durability,
            pg.replicas.len(),
            if pg.replicas.len() == 1 { "" } else { "s" },
            pg.replicas
                .iter()
                .map(|r| {
                    r.rss_after_setup_kib
                        .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                        .unwrap_or_else(|| "-".into())
                })
                .collect::<Vec<_>>()
                .join(" / ")
        ));
        if let Some(ms) = pg.replica_b_ready_ms {
            out.push_str(&format!(
                "; replica B served lookups {ms} ms after the administration through A"
            ));
        }
        out.push('\n');
        if let Some(d) = &pg.disk {
            out.push_str(&format!(
                "PostgreSQL data in {}: fdatasync p50 {} ms, p99 {} ms (every lookup waits for one WAL flush)\n",
                d.place(),
                ms(d.fdatasync_p50_us),
                ms(d.fdatasync_p99_us)
            ));
        }
    }
    let r = &report.ratios;
    out.push_str("\nratios (same run):\n");
    let ms_opt = |v: Option<f64>| v.map(|v| format!("{v:.3} ms")).unwrap_or_else(|| "-".into());
    // Round-by-round ratios, shown only when there were rounds that paired up.
    let by_round = |pairs: [(&'static str, &[f64]); 2]| {
        pairs
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(label, v)| {
                (
                    label,
                    v.iter().map(|x| format!("{x:.3}")).collect::<Vec<_>>().join(" / "),
                )
            })
            .collect::<Vec<_>>()
    };
    let mut lines = vec![
        ("throughput relayed/direct", opt(r.relayed_over_direct_throughput, 3)),
        ("throughput relayed/proxy", opt(r.relayed_over_proxy_throughput, 3)),
    ];
    lines.extend(by_round([
        (
            "throughput relayed/direct, round by round",
            &r.relayed_over_direct_throughput_by_round,
        ),
        (
            "throughput relayed/proxy, round by round",
            &r.relayed_over_proxy_throughput_by_round,
        ),
    ]));
    lines.extend([
        ("p99 added vs direct (open)", ms_opt(r.p99_added_over_direct_ms)),
        ("p99 added vs proxy (open)", ms_opt(r.p99_added_over_proxy_ms)),
        (
            "p99 nginx adds vs direct (open)",
            ms_opt(r.proxy_p99_added_over_direct_ms),
        ),
        (
            "CPU per lookup broker/nginx",
            opt(r.broker_over_proxy_cpu_per_lookup, 3),
        ),
    ]);
    if report.scenarios.iter().any(|s| s.name == "bare") {
        lines.extend([
            (
                "throughput bare/proxy (the stack alone/nginx)",
                opt(r.bare_over_proxy_throughput, 3),
            ),
            (
                "throughput relayed/bare (with the work/without)",
                opt(r.relayed_over_bare_throughput, 3),
            ),
        ]);
        lines.extend(by_round([
            (
                "throughput bare/proxy, round by round",
                &r.bare_over_proxy_throughput_by_round,
            ),
            (
                "throughput relayed/bare, round by round",
                &r.relayed_over_bare_throughput_by_round,
            ),
        ]));
        lines.extend([
            ("CPU per lookup bare/nginx", opt(r.bare_over_proxy_cpu_per_lookup, 3)),
            (
                "CPU per lookup of the broker's work (relayed-bare)",
                ms_opt(r.broker_work_cpu_ms_per_lookup),
            ),
            (
                "CPU per lookup broker's work/nginx",
                opt(r.broker_work_over_proxy_cpu_per_lookup, 3),
            ),
            (
                "p99 the bare stack adds vs direct (open)",
                ms_opt(r.bare_p99_added_over_direct_ms),
            ),
        ]);
    }
    if report.postgres.is_some() || r.relayed_pg_over_relayed_throughput.is_some() {
        lines.extend([
            (
                "throughput relayed-pg/relayed (PostgreSQL/SQLite)",
                opt(r.relayed_pg_over_relayed_throughput, 3),
            ),
            (
                "throughput relayed-pg-2/relayed-pg (2 replicas/1)",
                opt(r.relayed_pg_2_over_relayed_pg_throughput, 3),
            ),
            (
                "CPU per lookup relayed-pg/relayed (broker+database)",
                opt(r.relayed_pg_over_relayed_cpu_per_lookup, 3),
            ),
        ]);
    }
    for (label, value) in lines {
        out.push_str(&format!("  {label:<52} {value}\n"));
    }
    for n in &report.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn bench_args(argv: &[&str]) -> BenchArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
            .unwrap()
            .bench
    }

    #[test]
    fn a_log_to_fill_needs_the_scenario_that_measures_it() {
        let refused = Settings::of(&bench_args(&[
            "--scenarios",
            "direct,relayed-pg",
            "--log-entries",
            "10",
        ]));
        let message = refused.unwrap_err().to_string();
        assert!(message.contains("add relayed to --scenarios"), "{message}");
        let settings = Settings::of(&bench_args(&["--scenarios", "relayed", "--log-entries", "10"])).unwrap();
        assert_eq!(settings.log_entries, 10);
        assert_eq!(
            Settings::of(&bench_args(&[])).unwrap().log_entries,
            0,
            "an empty log by default"
        );
    }

    #[test]
    fn rates_parse_with_or_without_unit() {
        assert_eq!(parse_rate("2000").unwrap(), 2000.0);
        assert_eq!(parse_rate("2500/s").unwrap(), 2500.0);
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("-5/s").is_err());
    }

    #[test]
    fn sqlite_threads_are_found_by_name_and_their_cpu_counted() {
        use std::sync::atomic::AtomicBool;
        let me = [std::process::id()];
        assert_eq!(threads_cpu_seconds(&me, "no-such-thread"), None);
        let stop = Arc::new(AtomicBool::new(false));
        let spin = stop.clone();
        let busy = std::thread::Builder::new()
            .name("sqlx-sqlite-worker-7".into())
            .spawn(move || {
                let mut n = 0u64;
                while !spin.load(Ordering::Relaxed) {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            })
            .unwrap();
        // However busy the machine, the spinning thread's time shows up.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut sqlite = 0.0;
        while sqlite < 0.05 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            sqlite = threads_cpu_seconds(&me, SQLITE_THREADS).expect("the named thread is found");
        }
        stop.store(true, Ordering::Relaxed);
        busy.join().unwrap();
        assert!(sqlite >= 0.05, "{sqlite} s: the busy thread's time is counted");
        // The kernel rounds a thread's user and system times to clock ticks
        // apart from the process's, so the part may exceed the whole by a
        // tick of each.
        let whole = cpu_seconds(me[0]).unwrap();
        assert!(
            sqlite <= whole + 2.0 / CLOCK_TICKS_PER_SECOND,
            "{sqlite} s of the process's {whole} s: a part of it"
        );
    }

    #[test]
    fn proc_stat_cpu_time_skips_a_command_name_with_spaces() {
        let line = "4242 (tokio (rt) 1) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 130 0 0 20 0 9 0 100 1000 200";
        assert_eq!(stat_cpu_seconds(line), Some(3.8));
        assert_eq!(stat_cpu_seconds("4242 (short"), None);
        let reaped = "77 (postgres) S 1 77 77 0 -1 4194560 900 0 0 0 250 130 1200 34 20 0 1 0 100 1000 200";
        assert_eq!(stat_reaped_children_cpu_seconds(reaped), Some(12.34));
        assert_eq!(stat_reaped_children_cpu_seconds("77 (short) S 1"), None);
        // Our own process is always readable.
        assert!(cpu_seconds(std::process::id()).is_some());
        assert_eq!(stat_name(line), Some("tokio (rt) 1"));
        assert_eq!(stat_name("4242 no name"), None);
        assert!(status_kib(std::process::id(), "VmHWM:").is_some_and(|k| k > 0));
        assert!(tree_cpu_seconds(std::process::id()).is_some());
        assert_eq!(
            parent_pid(std::process::id()),
            Some(std::os::unix::process::parent_id())
        );
    }

    #[test]
    fn postgres_scenarios_parse_and_name_themselves() {
        use clap::ValueEnum;
        for (text, scenario, replicas) in [
            ("relayed", Scenario::Relayed, 0),
            ("relayed-pg", Scenario::RelayedPg, 1),
            ("relayed-pg-2", Scenario::RelayedPg2, 2),
        ] {
            let parsed = Scenario::from_str(text, false).unwrap();
            assert_eq!(parsed, scenario);
            assert_eq!(parsed.name(), text);
            assert_eq!(parsed.pg_replicas(), replicas);
            assert_eq!(serde_json::to_value(parsed).unwrap(), text);
        }
    }

    #[test]
    fn a_replica_config_points_at_postgres_and_keeps_its_own_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        make_certs(&certs, "gov.example").unwrap();
        let url = "postgres://lienthong@127.0.0.1:5999/bench";
        let data = dir.path().join("broker-pg-b-data");
        let path = write_broker_config(dir.path(), "b.toml", &data, Some(url), &certs, "gov.example").unwrap();
        let config = lienthong_broker::config::Config::load(Some(&path), Vec::new()).unwrap();
        assert_eq!(config.database_url(), url);
        assert_eq!(config.data_dir, data);
        assert_eq!(
            config.telemetry.metrics_addr(),
            Some(Ok(SocketAddr::from(([127, 0, 0, 1], 0)))),
            "the bench reads the broker's histograms"
        );
        let sqlite = write_broker_config(dir.path(), "a.toml", &data, None, &certs, "gov.example").unwrap();
        let config = lienthong_broker::config::Config::load(Some(&sqlite), Vec::new()).unwrap();
        assert!(
            config.database_url().starts_with("sqlite://"),
            "{}",
            config.database_url()
        );
    }

    #[test]
    fn the_subject_key_is_shared_privately() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let keys = lienthong_audit::LogKeys::load_or_create(&a).unwrap();
        share_subject_key(&a, &b).unwrap();
        let key = lienthong_audit::keys::SUBJECT_KEY_FILE;
        assert_eq!(std::fs::read(a.join(key)).unwrap(), std::fs::read(b.join(key)).unwrap());
        let mode = std::fs::metadata(b.join(key)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "readable by group or others: {mode:o}");
        // Replica B loads it: same pseudonyms, its own signing key.
        let other = lienthong_audit::LogKeys::load_or_create(&b).unwrap();
        assert_ne!(keys.log_id(), other.log_id());
        assert_eq!(keys.subject_hash("001084004217"), other.subject_hash("001084004217"));
    }

    /// Needs the PostgreSQL server binaries, like the store's PostgreSQL suite.
    #[tokio::test]
    async fn the_bench_cluster_is_made_durable() {
        let cluster = tokio::task::spawn_blocking(PgCluster::start).await.unwrap().unwrap();
        let facts = make_durable(&cluster.url()).await.unwrap();
        assert_eq!(facts.durability, "fsync=on, synchronous_commit=on, full_page_writes=on");
        let postmaster = facts.postmaster_pid.unwrap();
        assert!(tree_cpu_seconds(postmaster).is_some());
        assert!(
            !child_pids(postmaster).is_empty(),
            "the postmaster has its auxiliary processes"
        );
        tokio::task::spawn_blocking(move || drop(cluster)).await.unwrap();
    }

    /// A one-second phase of `ok` lookups with nothing else measured.
    fn bare_phase(ok: u64) -> Phase {
        Phase {
            histogram: histogram(),
            ok,
            errors: 0,
            dropped: 0,
            send_lag: None,
            first_error: None,
            warmup_errors: (0, None),
            cpu: CpuCost::default(),
            disk: DiskWrites::default(),
            switches: Switches::default(),
            machine: MachineLoad::default(),
            measured: Duration::from_secs(1),
            inside: None,
        }
    }

    #[test]
    fn the_median_round_is_reported_with_every_round() {
        let phase = |tp: f64, p99: u64| bare_phase(1).report(None, None, 1).with(tp, p99);
        let closed = median_round(vec![phase(300.0, 9), phase(100.0, 1), phase(200.0, 5)], false).unwrap();
        assert_eq!(closed.throughput_per_s, 200.0);
        assert_eq!(closed.rounds, vec![300.0, 100.0, 200.0]);
        let open = median_round(
            vec![phase(1.0, 900), phase(1.0, 100), phase(1.0, 500), phase(1.0, 700)],
            true,
        )
        .unwrap();
        assert_eq!(open.latency_us.p99, 500);
        assert!(median_round(Vec::new(), true).is_none());
        let single = median_round(vec![phase(1.0, 1)], false).unwrap();
        assert!(single.rounds.is_empty(), "one round lists no rounds");
    }

    impl PhaseReport {
        fn with(mut self, throughput: f64, p99: u64) -> PhaseReport {
            self.throughput_per_s = throughput;
            self.latency_us.p99 = p99;
            self
        }
    }

    #[test]
    fn machine_load_is_the_wall_clock_less_idle_and_stolen_time_of_every_core() {
        let t0 = Instant::now();
        let stat = "cpu  100 20 30 5000 40 5 6 7 0 0\ncpu0 50 10 15 2500 20 2 3 3 0 0\n\
                    cpu1 50 10 15 2500 20 3 3 4 0 0\nintr 1\n";
        assert_eq!(
            parse_machine_cpu(stat, t0),
            Some(MachineCpu {
                idle: 50.4,
                steal: 0.07,
                cores: 2,
                at: t0
            })
        );
        assert_eq!(parse_machine_cpu("cpu0 1 2 3\n", t0), None);
        assert_eq!(parse_machine_cpu("cpu  1 2 3 4 5 6 7 8\nintr 1\n", t0), None);
        let at = |secs: u64, idle, steal| CpuSnapshot {
            intermediary: None,
            provider: None,
            database: None,
            sqlite_in_broker: None,
            load_generator: None,
            machine: Some(MachineCpu {
                idle,
                steal,
                cores: 2,
                at: t0 + Duration::from_secs(secs),
            }),
            intermediary_switches: None,
            provider_switches: None,
            intermediary_written: None,
            database_written: None,
        };
        // 10 s on 2 cores: 0.5 s idle and 0.5 s stolen leave 19 s busy.
        let load = machine_load(at(0, 100.0, 1.0), at(10, 100.5, 1.5));
        assert!((load.busy_cores.unwrap() - 1.9).abs() < 1e-9, "{load:?}");
        assert!((load.stolen_cores.unwrap() - 0.05).abs() < 1e-9, "{load:?}");
        // Counters that ran ahead of the wall clock never make it negative.
        let load = machine_load(at(0, 100.0, 1.0), at(10, 125.0, 1.0));
        assert_eq!(load.busy_cores, Some(0.0));
        let unread = CpuSnapshot {
            machine: None,
            ..at(10, 0.0, 0.0)
        };
        assert_eq!(machine_load(at(0, 100.0, 1.0), unread), MachineLoad::default());
        assert_eq!(
            machine_load(at(10, 100.0, 1.0), at(10, 100.0, 1.0)),
            MachineLoad::default()
        );
    }

    #[test]
    fn a_late_open_loop_generator_is_named_beside_the_latencies_it_is_part_of() {
        let open = |name: &'static str, lag_us: &[u64]| {
            let mut lag = histogram();
            for v in lag_us {
                lag.record(*v).unwrap();
            }
            ScenarioReport {
                name,
                status: "ok",
                note: None,
                closed: Some(bare_phase(10).report(Some(8), None, 1)),
                open: Some(
                    Phase {
                        send_lag: Some(lag),
                        ..bare_phase(10)
                    }
                    .report(None, Some(100.0), 1),
                ),
            }
        };
        let on_time = [open("direct", &[40; 100]), open("relayed", &[60; 100])];
        assert_eq!(send_lag_note(&on_time), None);
        let late = [open("direct", &[40; 100]), open("relayed", &[2_500; 100])];
        let note = send_lag_note(&late).expect("a late generator is noted");
        assert!(
            note.contains("relayed 2.50 ms") && note.contains("direct 0.04 ms"),
            "{note}"
        );
        // The closed loop has no due times, so no lag to report.
        assert!(late[0].closed.as_ref().unwrap().send_lag_us.is_none());
    }

    #[test]
    fn context_switches_are_counted_per_lookup() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t700\nnonvoluntary_ctxt_switches:\t42\n";
        assert_eq!(status_switches(status), Some(742));
        assert_eq!(status_switches("Name:\tx\n"), None);
        assert!(
            context_switches(&[std::process::id()]).is_some(),
            "this test's own threads are read"
        );
        assert_eq!(context_switches(&[u32::MAX]), None);

        let snapshot = |intermediary, provider| CpuSnapshot {
            intermediary: None,
            provider: None,
            database: None,
            sqlite_in_broker: None,
            load_generator: None,
            machine: None,
            intermediary_switches: intermediary,
            provider_switches: provider,
            intermediary_written: intermediary.map(|n| n * 1024),
            database_written: provider.map(|n| n * 1024),
        };
        let s = switches(snapshot(Some(1_000), Some(50)), snapshot(Some(15_700), None), 1_000);
        assert_eq!(s.intermediary, Some(14.7));
        assert_eq!(s.provider, None, "a register that could not be read has no figure");
        let none = switches(snapshot(Some(1_000), Some(50)), snapshot(Some(15_700), Some(60)), 0);
        assert_eq!((none.intermediary, none.provider), (None, None), "no lookups, no ratio");
        // The same arithmetic for the bytes written, in KiB per lookup.
        let w = disk_writes(snapshot(Some(1_000), Some(50)), snapshot(Some(15_700), None), 1_000);
        assert_eq!((w.intermediary, w.database), (Some(14.7), None));
        let none = disk_writes(snapshot(Some(1_000), Some(50)), snapshot(Some(15_700), Some(60)), 0);
        assert_eq!((none.intermediary, none.database), (None, None), "no lookups, no ratio");
    }

    /// A failed call during the warm-up is not one of the phase's errors,
    /// but it is reported beside them, with the first of its kind.
    #[test]
    fn warmup_errors_are_counted_apart() {
        let live = Live::default();
        let bad_gateway = CallError {
            code: tonic::Code::Internal,
            message: "502 Bad Gateway".into(),
        };
        live.error(&bad_gateway, false);
        live.error(&bad_gateway, false);
        assert_eq!(live.errors.load(Ordering::Relaxed), 0);
        assert!(live.first_error.lock().unwrap().is_none());
        let mut phase = bare_phase(10);
        phase.warmup_errors = live.warmup();
        let report = phase.report(Some(1), None, 1);
        assert_eq!(report.warmup_errors, 2);
        let line = phase_line("proxy closed c=1", &report);
        assert!(
            line.contains("0 errors; 2 during the unmeasured warm-up (first: Internal: 502 Bad Gateway)"),
            "{line}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["warmup_errors"], 2);
        assert!(json.get("first_error").is_none());
        live.error(&bad_gateway, true);
        assert_eq!(live.errors.load(Ordering::Relaxed), 1);
    }

    /// `write_bytes`, not `cancelled_write_bytes` nor `wchar`, is what
    /// reached (or will reach) the disk.
    #[test]
    fn bytes_written_are_read_from_proc_io() {
        let io =
            "rchar: 10\nwchar: 999\nsyscr: 1\nsyscw: 2\nread_bytes: 0\nwrite_bytes: 4096\ncancelled_write_bytes: 7\n";
        assert_eq!(status_field(io, "write_bytes:"), Some(4096));
        assert!(
            written_bytes(std::process::id()).is_some(),
            "this process's own counters are read"
        );
        assert!(tree_written_bytes(std::process::id()).is_some());
        assert_eq!(written_by(&[]), None);
        assert_eq!(written_by(&[u32::MAX]), None);
    }

    #[test]
    fn status_fields_are_read_in_kib() {
        let text = "Name:\tx\nVmHWM:\t   12345 kB\nVmRSS:\t  100 kB\n";
        assert_eq!(status_field(text, "VmHWM:"), Some(12345));
        assert_eq!(status_field(text, "VmRSS:"), Some(100));
        assert_eq!(status_field(text, "VmSwap:"), None);
    }

    #[test]
    fn ratios_compare_relayed_with_the_baselines_of_the_same_run() {
        let phase = |tp: f64, p99: u64, cpu: Option<f64>| PhaseReport {
            concurrency: None,
            target_rate_per_s: None,
            connections: 1,
            duration_s: 1.0,
            ok: 10,
            errors: 0,
            dropped: 0,
            send_lag_us: None,
            first_error: None,
            warmup_errors: 0,
            first_warmup_error: None,
            throughput_per_s: tp,
            latency_us: Latency {
                p99,
                ..Latency::default()
            },
            cpu_s_per_1000: CpuCost {
                intermediary: cpu,
                ..CpuCost::default()
            },
            switches_per_lookup: Switches::default(),
            disk_kib_per_lookup: DiskWrites::default(),
            machine: MachineLoad::default(),
            inside_broker: None,
            rounds: Vec::new(),
        };
        let scenario = |name, status, closed: Option<PhaseReport>, open: Option<PhaseReport>| ScenarioReport {
            name,
            status,
            note: None,
            closed,
            open,
        };
        // A direct run beside which the relayed figures are read.
        let direct = || {
            scenario(
                "direct",
                "ok",
                Some(phase(1000.0, 0, None)),
                Some(phase(0.0, 800, None)),
            )
        };
        let reports = vec![
            direct(),
            scenario(
                "relayed",
                "ok",
                Some(phase(500.0, 0, Some(0.2))),
                Some(phase(0.0, 1300, None)),
            ),
            scenario("proxy", "skipped", None, None),
        ];
        let r = ratios(&reports);
        assert_eq!(r.relayed_over_direct_throughput, Some(0.5));
        assert_eq!(r.relayed_over_proxy_throughput, None);
        assert!(r.relayed_over_direct_throughput_by_round.is_empty(), "one round");
        assert_eq!(r.p99_added_over_direct_ms, Some(0.5));
        assert_eq!(r.proxy_p99_added_over_direct_ms, None, "no proxy in this run");
        assert_eq!(r.broker_over_proxy_cpu_per_lookup, None);
        assert_eq!(r.relayed_pg_over_relayed_throughput, None);

        let with_database = |tp: f64, broker: f64, database: f64| {
            let mut p = phase(tp, 0, Some(broker));
            p.cpu_s_per_1000.database = Some(database);
            p
        };
        let reports = vec![
            scenario("relayed", "ok", Some(phase(500.0, 0, Some(0.2))), None),
            scenario("relayed-pg", "ok", Some(with_database(400.0, 0.2, 0.1)), None),
            scenario("relayed-pg-2", "ok", Some(with_database(600.0, 0.25, 0.15)), None),
        ];
        let r = ratios(&reports);
        assert_eq!(r.relayed_pg_over_relayed_throughput, Some(0.8));
        assert_eq!(r.relayed_pg_2_over_relayed_pg_throughput, Some(1.5));
        let cpu = r.relayed_pg_over_relayed_cpu_per_lookup.unwrap();
        assert!((cpu - 1.5).abs() < 1e-9, "{cpu}");

        // The bare relay splits the broker's CPU into its stack and its work.
        let reports = vec![
            direct(),
            scenario("relayed", "ok", Some(phase(300.0, 0, Some(0.25))), None),
            scenario("proxy", "ok", Some(phase(600.0, 0, Some(0.05))), None),
            scenario(
                "bare",
                "ok",
                Some(phase(480.0, 0, Some(0.1))),
                Some(phase(0.0, 1400, None)),
            ),
        ];
        let r = ratios(&reports);
        assert_eq!(r.bare_over_proxy_throughput, Some(0.8));
        assert_eq!(r.relayed_over_bare_throughput, Some(0.625));
        assert_eq!(r.bare_over_proxy_cpu_per_lookup, Some(2.0));
        let work = r.broker_work_cpu_ms_per_lookup.unwrap();
        assert!((work - 0.15).abs() < 1e-9, "{work}");
        let over = r.broker_work_over_proxy_cpu_per_lookup.unwrap();
        assert!((over - 3.0).abs() < 1e-9, "{over}");
        assert_eq!(r.bare_p99_added_over_direct_ms, Some(0.6));
        assert_eq!(render_inside(&reports), "", "no phase has the broker's histograms");
        let r = ratios(&reports[..3]);
        assert_eq!(r.broker_work_cpu_ms_per_lookup, None, "no bare relay in this run");
        assert_eq!(r.bare_over_proxy_throughput, None);

        // Three rounds: each round's pair, in order, beside the medians' ratio.
        let with_rounds = |tp: f64, rounds: &[f64]| {
            let mut p = phase(tp, 0, None);
            p.rounds = rounds.to_vec();
            p
        };
        let reports = vec![
            scenario(
                "direct",
                "ok",
                Some(with_rounds(1000.0, &[1000.0, 800.0, 1200.0])),
                Some(phase(0.0, 800, None)),
            ),
            scenario("relayed", "ok", Some(with_rounds(300.0, &[300.0, 400.0, 240.0])), None),
            scenario(
                "proxy",
                "ok",
                Some(with_rounds(600.0, &[600.0, 800.0])),
                Some(phase(0.0, 2000, None)),
            ),
        ];
        let r = ratios(&reports);
        assert_eq!(r.proxy_p99_added_over_direct_ms, Some(1.2));
        assert_eq!(r.p99_added_over_direct_ms, None, "no open-loop relayed phase");
        assert_eq!(r.relayed_over_direct_throughput, Some(0.3));
        assert_eq!(r.relayed_over_direct_throughput_by_round, vec![0.3, 0.5, 0.2]);
        assert!(
            r.relayed_over_proxy_throughput_by_round.is_empty(),
            "rounds that do not pair up are not compared"
        );
    }

    #[test]
    fn relayed_phases_are_split_as_the_broker_timed_them() {
        let timing = |mean_ms, p50_ms, p99_ms| {
            Some(inside::Timing {
                count: 100,
                mean_ms,
                p50_ms,
                p99_ms,
            })
        };
        let mut open = Phase {
            inside: Some(inside::InsideBroker {
                lookup: timing(3.06, 2.82, 14.67),
                provider_call: timing(0.92, 0.8, 3.77),
                audit_wait: None,
            }),
            ..bare_phase(100)
        }
        .report(None, Some(3500.0), 4);
        let scenarios = vec![ScenarioReport {
            name: "relayed",
            status: "ok",
            note: None,
            closed: None,
            open: Some(open.clone()),
        }];
        let text = render_inside(&scenarios);
        let row = text
            .lines()
            .find(|l| l.starts_with("relayed"))
            .unwrap_or_else(|| panic!("no relayed row in {text}"));
        assert!(row.contains("open 3500/s"), "{row}");
        assert!(row.contains("3.06 / 2.82 / 14.67"), "{row}");
        assert!(row.contains("0.92 / 0.80 / 3.77"), "{row}");
        assert!(row.trim_end().ends_with('-'), "no audit wait observed: {row}");
        let json = serde_json::to_value(&open).unwrap();
        assert_eq!(json["inside_broker"]["provider_call"]["p99_ms"], 3.77);

        open.inside_broker = None;
        let json = serde_json::to_value(&open).unwrap();
        assert!(json.get("inside_broker").is_none(), "{json}");
    }

    #[test]
    fn nginx_config_terminates_and_originates_mutual_tls() {
        let conf = nginx_config(
            Path::new("/run/x"),
            Path::new("/c"),
            8443,
            "127.0.0.1:9101".parse().unwrap(),
            2,
        );
        for needle in [
            "listen 127.0.0.1:8443 ssl http2;",
            "ssl_verify_client on;",
            "ssl_client_certificate /c/ca.pem;",
            "grpc_pass grpcs://register;",
            "server 127.0.0.1:9101;",
            "grpc_ssl_certificate /c/broker.pem;",
            "grpc_ssl_certificate_key /c/broker.key;",
            "grpc_ssl_trusted_certificate /c/ca.pem;",
            "grpc_ssl_verify on;",
            "grpc_ssl_name localhost;",
            "worker_processes 2;",
        ] {
            assert!(conf.contains(needle), "missing {needle:?} in\n{conf}");
        }
    }
}
