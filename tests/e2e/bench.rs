//! `lienthong bench`: one quick run through the built binary measures the
//! default scenarios and reports them as JSON. No timing is asserted: only that
//! every scenario ran and moved lookups (the proxy may be skipped without nginx).

use crate::harness::run_cli;
use serde_json::Value;

/// The first JSON value of the output (stdout comes first; progress lines on
/// stderr follow it).
fn report_of(output: &str) -> Value {
    serde_json::Deserializer::from_str(output)
        .into_iter::<Value>()
        .next()
        .unwrap_or_else(|| panic!("no JSON in the bench output:\n{output}"))
        .unwrap_or_else(|e| panic!("bench output is not JSON ({e}):\n{output}"))
}

fn throughput(phase: &Value) -> f64 {
    phase["throughput_per_s"].as_f64().unwrap_or(0.0)
}

#[test]
fn quick_bench_reports_direct_relayed_proxy_and_bare_as_json() {
    // With a filled audit log: the broker is set up, stopped, filled and
    // restarted before the phases, which then measure the restarted one.
    let (ok, output) = run_cli(&["bench", "--quick", "--json", "--log-entries", "3000"], &[]);
    assert!(ok, "bench failed:\n{output}");
    let report = report_of(&output);
    assert_eq!(report["settings"]["log_entries"], 3000, "{report:#}");
    let fill = &report["log_fill"];
    assert_eq!(fill["appended"], 3000, "{fill:#}");
    // The set-up's own entries (members, schema, endpoint, grant) come first.
    assert!(fill["entries"].as_u64().is_some_and(|n| n > 3000), "{fill:#}");
    assert!(fill["history_check_s"].as_f64().is_some(), "{fill:#}");
    let scenarios = report["scenarios"].as_array().expect("scenarios array");
    let names: Vec<&str> = scenarios.iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["direct", "relayed", "proxy", "bare"], "{report:#}");
    let cpus = report["machine"]["cpus"].as_f64().unwrap_or(0.0);
    // The open loop says how it spaced its requests; evenly unless asked otherwise.
    assert_eq!(report["settings"]["arrivals"], "even", "{report:#}");
    for s in scenarios {
        let name = s["name"].as_str().unwrap_or_default();
        if name == "proxy" && s["status"] == "skipped" {
            assert!(
                s["note"].as_str().is_some_and(|n| n.contains("nginx")),
                "a skipped proxy says why: {s:#}"
            );
            continue;
        }
        assert_eq!(s["status"], "ok", "{name}: {s:#}");
        for mode in ["closed", "open"] {
            let phase = &s[mode];
            assert!(throughput(phase) > 0.0, "{name} {mode} moved no lookups: {s:#}");
            assert!(
                phase["latency_us"]["p99"].as_u64().unwrap_or(0) > 0,
                "{name} {mode}: {s:#}"
            );
            assert!(phase["ok"].as_u64().unwrap_or(0) > 0, "{name} {mode}: {s:#}");
            // The machine did the work of the phase, and no more than its cores can.
            let busy = phase["machine"]["busy_cores"].as_f64().unwrap_or(0.0);
            assert!(busy > 0.0 && busy <= cpus + 0.5, "{name} {mode} busy {busy}: {s:#}");
        }
        // The open loop says how late its generator sent, a part of the latencies;
        // the closed loop has no due times.
        let lag = &s["open"]["send_lag_us"];
        assert!(
            lag["max"]
                .as_u64()
                .is_some_and(|max| max >= lag["p50"].as_u64().unwrap_or(u64::MAX)),
            "{name}: {s:#}"
        );
        assert!(s["closed"].get("send_lag_us").is_none(), "{name}: {s:#}");
    }
    // The audit's SQLite threads were found inside the broker, a part of its CPU;
    // without a broker there is no such part.
    let relayed = &scenarios[1]["closed"]["cpu_s_per_1000"];
    let sqlite = relayed["sqlite_in_broker"].as_f64();
    let broker_cpu = relayed["intermediary"].as_f64().unwrap_or(0.0);
    assert!(
        sqlite.is_some_and(|s| s <= broker_cpu + 1e-9),
        "SQLite's share of the broker: {relayed:#}"
    );
    assert!(
        scenarios[0]["closed"]["cpu_s_per_1000"]
            .get("sqlite_in_broker")
            .is_none()
    );
    // What each relayed lookup costs the disk is counted (zero on tmpfs).
    assert!(
        scenarios[1]["closed"]["disk_kib_per_lookup"]["intermediary"]
            .as_f64()
            .is_some(),
        "{:#}",
        scenarios[1]
    );
    // The disk every relayed lookup waits on is timed and named, so a reader
    // can tell a VM's scratch disk from a server's journalled one.
    let disk = &report["disk"];
    assert!(disk["fdatasync_p50_us"].as_u64().unwrap_or(0) > 0, "{disk:#}");
    assert!(disk["filesystem"].as_str().is_some_and(|fs| !fs.is_empty()), "{disk:#}");
    // The relayed lookups were real ones: the broker's own figures are there.
    let broker = &report["broker"];
    assert!(broker["rss_after_setup_kib"].as_u64().unwrap_or(0) > 0, "{broker:#}");
    let inflight = &broker["inflight"];
    assert_eq!(inflight["lookups_in_flight"], 1000, "{broker:#}");
    assert!(inflight["peak_rss_kib"].as_u64().unwrap_or(0) > 0, "{broker:#}");
    assert!(throughput(&inflight["phase"]) > 0.0, "{broker:#}");
    let ratios = &report["ratios"];
    for ratio in ["relayed_over_direct_throughput", "relayed_over_bare_throughput"] {
        assert!(ratios[ratio].as_f64().unwrap_or(0.0) > 0.0, "{ratio}: {report:#}");
    }
    // The bare relay (the broker's stack without its work) is a process of its
    // own, measured like the broker, so the broker's work can be told apart.
    let bare_cpu = scenarios[3]["closed"]["cpu_s_per_1000"]["intermediary"].as_f64();
    assert!(bare_cpu.is_some_and(|c| c > 0.0), "the bare relay's CPU: {report:#}");
    assert!(ratios["broker_work_cpu_ms_per_lookup"].as_f64().is_some(), "{report:#}");
    // Every relayed lookup wakes the broker's threads at least once; direct has
    // no process in the middle to count.
    for (i, name) in [(1, "relayed"), (3, "bare")] {
        let switches = &scenarios[i]["open"]["switches_per_lookup"];
        assert!(
            switches["intermediary"].as_f64().is_some_and(|n| n > 0.0),
            "{name}'s context switches per lookup: {switches:#}"
        );
        assert!(switches["provider"].as_f64().is_some(), "{name}: {switches:#}");
    }
    assert!(
        scenarios[0]["open"]["switches_per_lookup"]
            .get("intermediary")
            .is_none()
    );
    // The broker's own histograms split each relayed phase into its call to
    // the register and its wait for the audit entry. Lookups still in flight
    // at a scrape are counted in one part and not yet in another, so the
    // counts agree only up to them.
    for mode in ["closed", "open"] {
        let inside = &scenarios[1][mode]["inside_broker"];
        let count = |part: &str| inside[part]["count"].as_u64().unwrap_or(0);
        let lookups = count("lookup");
        assert!(lookups > 0, "relayed {mode}: {inside:#}");
        for part in ["provider_call", "audit_wait"] {
            assert!(
                count(part).abs_diff(lookups) <= lookups / 5 + 512,
                "relayed {mode} {part}: {inside:#}"
            );
            let mean = |part: &str| inside[part]["mean_ms"].as_f64().unwrap_or(f64::NAN);
            assert!(mean(part) <= mean("lookup"), "a part of the lookup: {inside:#}");
        }
    }
    for i in [0, 2, 3] {
        assert!(scenarios[i]["closed"].get("inside_broker").is_none(), "{report:#}");
    }
}

#[test]
fn bench_help_explains_the_scenarios_and_the_load_models() {
    let (ok, help) = run_cli(&["bench", "--help"], &[]);
    assert!(ok, "{help}");
    for scenario in ["direct", "relayed", "proxy", "bare", "relayed-pg", "relayed-pg-2"] {
        assert!(
            help.contains(&format!("  {scenario} ")),
            "{scenario} is explained:\n{help}"
        );
    }
    for words in [
        "coordinated omission",
        "in parentheses",
        "context switches",
        "--inflight",
        "--log-entries",
    ] {
        assert!(help.contains(words), "{words}:\n{help}");
    }
}
