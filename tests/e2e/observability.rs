//! Observability end to end: one trace from the consumer through the broker
//! into the register, Prometheus counters moving for every outcome without a
//! subject key in sight, and a SIGTERM under load that drains, signs a final
//! tree head over every entry and exits 0.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::federation::{
    ADMIN, CIVIL_STATUS, Federation, FederationOptions, JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, TAX_DEPT,
};
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{IdGenerator, InMemorySpanExporter, RandomIdGenerator, SdkTracerProvider, SpanData};
use std::sync::OnceLock;
use std::time::Duration;
use tonic::Code;

/// Installs, once per test process, a subscriber exporting the spans of the
/// broker and the provider kit to memory through the OpenTelemetry layer.
fn span_exporter() -> InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER
        .get_or_init(|| {
            use tracing_subscriber::layer::SubscriberExt;
            use tracing_subscriber::{Layer, filter::Targets};
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let layer = tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("e2e"))
                .with_filter(Targets::new().with_target("lienthong", tracing::Level::DEBUG));
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("no other subscriber in this test process");
            exporter
        })
        .clone()
}

fn spans_of(exporter: &InMemorySpanExporter, trace: TraceId) -> Vec<SpanData> {
    exporter
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect()
}

fn attr(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

fn named<'a>(spans: &'a [SpanData], name: &str, kind: SpanKind) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == name && s.span_kind == kind)
        .unwrap_or_else(|| {
            let names: Vec<_> = spans
                .iter()
                .map(|s| (s.name.to_string(), s.span_kind.clone()))
                .collect();
            panic!("no {kind:?} span {name}; spans: {names:?}")
        })
}

fn child<'a>(spans: &'a [SpanData], parent: &SpanData, name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| s.name == name && s.parent_span_id == parent.span_context.span_id())
        .unwrap_or_else(|| panic!("span {name} is not a child of {}", parent.name))
}

const LOOKUP: &str = "lienthong.v1.Exchange/Lookup";
const FETCH: &str = "lienthong.provider.v1.RecordProvider/Fetch";

#[tokio::test]
async fn a_lookup_is_one_trace_from_the_consumer_into_the_register() {
    let exporter = span_exporter();
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 4242);

    // The consumer's own span: the broker's span must be its child.
    let ids = RandomIdGenerator::default();
    let (trace, consumer_span) = (ids.new_trace_id(), ids.new_span_id());
    let mut request = tonic::Request::new(birth_lookup(&subject, PURPOSE_CERTIFICATE));
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{trace}-{consumer_span}-01").parse().unwrap());
    let receipt = office
        .exchange()
        .lookup(request)
        .await
        .unwrap()
        .into_inner()
        .receipt
        .unwrap();

    // The broker's RPC span ends as the answer leaves; wait for it.
    assert!(
        eventually(Duration::from_secs(5), async || {
            let spans = spans_of(&exporter, trace);
            spans.iter().any(|s| s.name == LOOKUP)
                && spans.iter().any(|s| s.name == FETCH && s.span_kind == SpanKind::Server)
        })
        .await,
        "broker and register spans are exported under the consumer's trace id: {:?}",
        spans_of(&exporter, trace)
            .iter()
            .map(|s| s.name.to_string())
            .collect::<Vec<_>>()
    );
    let spans = spans_of(&exporter, trace);
    let rpc = named(&spans, LOOKUP, SpanKind::Server);
    assert_eq!(
        rpc.parent_span_id, consumer_span,
        "the broker continues the consumer's span"
    );
    assert!(rpc.parent_span_is_remote);
    assert_eq!(attr(rpc, "consumer").as_deref(), Some(JUDICIAL_OFFICE));
    assert_eq!(attr(rpc, "provider").as_deref(), Some(CIVIL_STATUS));
    assert_eq!(attr(rpc, "record_type").as_deref(), Some("civil_status.birth_record"));
    assert_eq!(attr(rpc, "purpose").as_deref(), Some(PURPOSE_CERTIFICATE));
    assert_eq!(attr(rpc, "outcome").as_deref(), Some("allowed"));
    for step in ["authorize", "validate_query", "validate_record", "audit_commit"] {
        child(&spans, rpc, step);
    }
    let call = named(&spans, FETCH, SpanKind::Client);
    assert_eq!(call.parent_span_id, rpc.span_context.span_id());
    assert_eq!(attr(call, "outcome").as_deref(), Some("ok"));
    // The register's span is a child of the broker's provider call, in the same trace.
    let fetch = named(&spans, FETCH, SpanKind::Server);
    assert_eq!(fetch.parent_span_id, call.span_context.span_id());
    assert!(
        fetch.parent_span_is_remote,
        "the register learnt its parent over the wire"
    );
    assert_eq!(attr(fetch, "trace_id"), Some(trace.to_string()));
    assert_eq!(attr(fetch, "outcome").as_deref(), Some("ok"));

    // Nothing in any span of the trace holds the national id.
    for s in &spans {
        for kv in &s.attributes {
            assert!(
                !kv.value.to_string().contains(&subject),
                "span {} attribute {} carries the subject key",
                s.name,
                kv.key
            );
        }
    }

    // The audit entry names the same trace.
    let entries = logged(
        &fed,
        pb::EntryFilter {
            actor: JUDICIAL_OFFICE.into(),
            ..Default::default()
        },
    )
    .await;
    let entry = entries.iter().find(|e| e.sequence == receipt.sequence).unwrap();
    assert_eq!(entry.trace_id, trace.to_string());

    // Without a traceparent the broker starts the trace, and the register still joins it.
    let untraced = pb::LookupRequest {
        request_id: "untraced-lookup-1".into(),
        ..birth_lookup(&subject, PURPOSE_CERTIFICATE)
    };
    office.exchange().lookup(untraced).await.unwrap();
    let mut started: Option<TraceId> = None;
    assert!(
        eventually(Duration::from_secs(5), async || {
            let all = exporter.get_finished_spans().unwrap();
            started = all
                .iter()
                .find(|s| s.name == LOOKUP && attr(s, "request_id").as_deref() == Some("untraced-lookup-1"))
                .map(|s| s.span_context.trace_id());
            started.is_some_and(|t| {
                all.iter()
                    .any(|s| s.name == FETCH && s.span_kind == SpanKind::Server && s.span_context.trace_id() == t)
            })
        })
        .await,
        "the register's span joins the trace the broker started"
    );
    let spans = spans_of(&exporter, started.unwrap());
    assert_eq!(named(&spans, LOOKUP, SpanKind::Server).parent_span_id, SpanId::INVALID);
    fed.shutdown().await.unwrap();
}

fn requests(consumer: &str, record_type: &str, outcome: &str) -> String {
    format!(
        r#"lienthong_requests_total{{rpc="lookup",consumer="{consumer}",record_type="{record_type}",outcome="{outcome}"}}"#
    )
}

#[tokio::test]
async fn metrics_move_for_allowed_denied_and_failed_lookups_and_never_name_a_subject() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = FederationOptions::new(dir.path());
    options.metrics_listen = Some("127.0.0.1:0".into());
    let mut fed = Federation::start(options).await.unwrap();
    let addr = fed.broker.metrics_addr.expect("metrics listener configured");
    assert!(addr.ip().is_loopback());
    let (status, before) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{before}");
    assert!(before.ends_with("# EOF\n"), "a complete OpenMetrics exposition");

    let office = client(&fed, JUDICIAL_OFFICE).await;
    let tax = client(&fed, TAX_DEPT).await;
    let subjects: Vec<String> = (0..4).map(|i| citizen_id(&fed, 7000 + i)).collect();
    let birth = "civil_status.birth_record";
    let criminal = "judicial.criminal_record_extract";
    // Allowed.
    office
        .exchange()
        .lookup(birth_lookup(&subjects[0], PURPOSE_CERTIFICATE))
        .await
        .unwrap();
    // Denied: the tax department holds no grant.
    let e = tax
        .exchange()
        .lookup(birth_lookup(&subjects[1], PURPOSE_CERTIFICATE))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Failed: the judicial-records register is down.
    fed.registers[1].stop().await;
    let e = office
        .exchange()
        .lookup(pb::LookupRequest {
            record_type: criminal.into(),
            query_json: serde_json::json!({ "national_id": subjects[2] }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    // Invalid: a record type the registry does not know, named after a citizen.
    let made_up = format!("made_up.{}", subjects[3]);
    let e = office
        .exchange()
        .lookup(pb::LookupRequest {
            record_type: made_up.clone(),
            query_json: serde_json::json!({ "national_id": subjects[3] }).to_string(),
            purpose: PURPOSE_CERTIFICATE.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    let (status, after) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(moved(&requests(JUDICIAL_OFFICE, birth, "allowed")), 1.0, "{after}");
    assert_eq!(moved(&requests(TAX_DEPT, birth, "denied")), 1.0, "{after}");
    assert_eq!(moved(&requests(JUDICIAL_OFFICE, criminal, "failed")), 1.0, "{after}");
    assert_eq!(moved(&requests(JUDICIAL_OFFICE, "unknown", "invalid")), 1.0, "{after}");
    assert_eq!(
        moved(r#"lienthong_provider_calls_total{provider="civil-status",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        moved(r#"lienthong_provider_calls_total{provider="judicial-records",outcome="unavailable"}"#),
        1.0
    );
    assert_eq!(
        moved(
            r#"lienthong_request_duration_seconds_count{rpc="lookup",record_type="civil_status.birth_record",outcome="allowed"}"#
        ),
        1.0
    );
    assert!(sample(&after, r#"lienthong_requests_in_flight{rpc="lookup"}"#) == 0.0);
    assert!(sample(&after, "lienthong_audit_log_entries") >= sample(&before, "lienthong_audit_log_entries") + 4.0);
    assert!(sample(&after, "lienthong_audit_entries_total") >= 4.0);
    assert!(sample(&after, "lienthong_snapshot_version") >= 1.0);
    // The fresh log's history check has ended, and found nothing.
    assert_eq!(
        sample(&after, r#"lienthong_audit_history_check{state="passed"}"#),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, r#"lienthong_audit_history_check{state="failed"}"#),
        0.0,
        "{after}"
    );
    assert!(after.contains("lienthong_snapshot_age_seconds "), "{after}");
    assert!(
        after.contains(r#"lienthong_provider_endpoint_breaker_state{provider="civil-status""#),
        "{after}"
    );

    // No label carries a subject key or a client's made-up name.
    for s in &subjects {
        assert!(!after.contains(s.as_str()), "the scrape names subject {s}");
    }
    assert!(!after.contains(&made_up));
    assert!(!after.contains("made_up"));

    let (status, _) = http_get(addr, "/other").await;
    assert_eq!(status, 404);
    fed.shutdown().await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the metrics listener stops with the broker"
    );
}

/// A Prometheus-like scraper: trusts the federation CA for the broker's
/// certificate, shows `identity` (certificate, key) if any, speaks HTTP/1.1.
fn scraper(
    fed: &lienthong_cli::federation::Federation,
    identity: Option<(&str, &str)>,
) -> std::sync::Arc<rustls::ClientConfig> {
    let fed_ca = std::fs::read_to_string(fed.certs.join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for root in lienthong_tls::TlsMaterial::from_pem(&fed_ca, &fed_ca, &ca(fed).key_pem())
        .unwrap()
        .roots
    {
        roots.add(root).unwrap();
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => {
            let m = lienthong_tls::TlsMaterial::from_pem(&fed_ca, cert, key).unwrap();
            builder.with_client_auth_cert(m.chain, m.key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(config)
}

/// `GET path` over HTTPS as `config`'s scraper; returns (status, body), or
/// the error that ended the connection (a refusal arrives as a TLS alert).
async fn https_get(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    path: &str,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tls.read_to_end(&mut raw).await?;
    Ok(http_response(raw))
}

/// The TLS alert that ended a refused scrape.
fn alert(e: &std::io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// The labels say which agency asks for whose records how often: with
/// `telemetry.metrics_client_ca` set, only a scraper with a certificate from
/// that CA reads them, over TLS. None, or one from another CA (a federation
/// member's included), fails the handshake; plain HTTP gets no answer.
#[tokio::test]
async fn metrics_over_mutual_tls_only_for_scrapers_with_a_certificate_from_the_monitoring_ca() {
    let dir = tempfile::tempdir().unwrap();
    let monitoring = lienthong_tls::CertificateAuthority::generate("monitoring.lienthong.gov.vn").unwrap();
    let monitoring_ca = dir.path().join("monitoring-ca.pem");
    std::fs::write(&monitoring_ca, monitoring.cert_pem()).unwrap();
    let mut options = FederationOptions::new(dir.path().join("fed"));
    options.metrics_listen = Some("127.0.0.1:0".into());
    options.metrics_client_ca = Some(monitoring_ca);
    let fed = Federation::start(options).await.unwrap();
    let addr = fed.broker.metrics_addr.expect("metrics listener configured");

    let prometheus = monitoring
        .issue(&lienthong_tls::IssueSpec::member("prometheus"))
        .unwrap();
    let allowed = scraper(&fed, Some((&prometheus.cert_pem, &prometheus.key_pem)));
    let office = client(&fed, JUDICIAL_OFFICE).await;
    office
        .exchange()
        .lookup(birth_lookup(&citizen_id(&fed, 7100), PURPOSE_CERTIFICATE))
        .await
        .unwrap();
    let (status, scrape) = https_get(addr, allowed.clone(), "/metrics").await.unwrap();
    assert_eq!(status, 200, "{scrape}");
    assert!(scrape.ends_with("# EOF\n"), "a complete OpenMetrics exposition");
    assert_eq!(
        sample(
            &scrape,
            &requests(JUDICIAL_OFFICE, "civil_status.birth_record", "allowed")
        ),
        1.0,
        "{scrape}"
    );

    // No certificate: TLS 1.3 lets the client finish its half of the
    // handshake, so the server's refusal arrives as the alert in place of an answer.
    let e = https_get(addr, scraper(&fed, None), "/metrics").await.unwrap_err();
    assert_eq!(alert(&e), Some(rustls::AlertDescription::CertificateRequired), "{e}");
    // A federation member's certificate is from another CA than the scrapers'.
    let (member_cert, member_key) = issue(&fed, JUDICIAL_OFFICE);
    let e = https_get(addr, scraper(&fed, Some((&member_cert, &member_key))), "/metrics")
        .await
        .unwrap_err();
    assert_eq!(alert(&e), Some(rustls::AlertDescription::UnknownCA), "{e}");
    // A look-alike CA of the same trust domain: every CA has a name of its
    // own (creation date, key id), so it is another CA, not a bad signature.
    let stranger = lienthong_tls::CertificateAuthority::generate("monitoring.lienthong.gov.vn")
        .unwrap()
        .issue(&lienthong_tls::IssueSpec::member("prometheus"))
        .unwrap();
    let e = https_get(
        addr,
        scraper(&fed, Some((&stranger.cert_pem, &stranger.key_pem))),
        "/metrics",
    )
    .await
    .unwrap_err();
    assert_eq!(alert(&e), Some(rustls::AlertDescription::UnknownCA), "{e}");

    // Plain HTTP to the TLS port: no HTTP answer, let alone metrics.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut raw = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut raw))
            .await
            .expect("the broker closes the connection");
        assert!(
            read.is_err() || !raw.starts_with(b"HTTP/"),
            "plain HTTP was answered: {:?}",
            String::from_utf8_lossy(&raw)
        );
        assert!(!String::from_utf8_lossy(&raw).contains("lienthong_"));
    }

    // Refused handshakes give their connection slot back: more of them than
    // the listener serves at once, and the scraper still gets in.
    for _ in 0..20 {
        assert!(https_get(addr, scraper(&fed, None), "/metrics").await.is_err());
    }
    let (status, _) = https_get(addr, allowed.clone(), "/metrics").await.unwrap();
    assert_eq!(status, 200);

    // Connections that never start their handshake (no certificate is
    // needed to open one), more than the listener serves at once, from
    // another address: the scraper is still served at once, not after
    // their handshake timeout.
    let mut idle = Vec::new();
    for _ in 0..24 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        idle.push(socket.connect(addr).await.unwrap());
    }
    let (status, _) = tokio::time::timeout(Duration::from_secs(2), https_get(addr, allowed, "/metrics"))
        .await
        .expect("served while idle connections are open")
        .unwrap();
    assert_eq!(status, 200);
    drop(idle);
    fed.shutdown().await.unwrap();
}

/// How one lookup of the SIGTERM load ended.
#[derive(Clone, Debug)]
enum Ended {
    Released(pb::Receipt),
    Refused(tonic::Status),
}

#[tokio::test]
async fn sigterm_under_load_drains_and_signs_a_head_over_every_entry() {
    let (dir, mut fed) = federation().await;
    let mut process = BrokerProcess::take_over(&mut fed, &[]).await;
    let files = lienthong_cli::client::member_files(&fed.certs, JUDICIAL_OFFICE);
    let office = lienthong_cli::client::connect(&process.url, &files).await.unwrap();
    let ended = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Ended)>::new()));
    let released = || {
        ended
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, e)| matches!(e, Ended::Released(_)))
            .count()
    };
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let (office, ended) = (office.clone(), ended.clone());
        let seed = fed.options.seed;
        tasks.push(tokio::spawn(async move {
            for i in 0..2000u32 {
                let subject = lienthong_provider::demo::citizen_national_id(seed, t * 2000 + i);
                let request_id = format!("sigterm-load-{t}-{i}");
                let request = pb::LookupRequest {
                    request_id: request_id.clone(),
                    ..birth_lookup(&subject, PURPOSE_CERTIFICATE)
                };
                match office.exchange().lookup(request).await {
                    Ok(r) => {
                        let receipt = r.into_inner().receipt.expect("a released lookup has a receipt");
                        ended.lock().unwrap().push((request_id, Ended::Released(receipt)));
                    }
                    Err(status) => {
                        ended.lock().unwrap().push((request_id, Ended::Refused(status)));
                        return;
                    }
                }
            }
        }));
    }
    assert!(eventually(Duration::from_secs(30), async || released() >= 150).await);
    // Off the runtime: the registers and the load run on this test's thread.
    let (_process, status) = tokio::task::spawn_blocking(move || {
        let status = process.terminate();
        (process, status)
    })
    .await
    .unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0 after draining");
    for t in tasks {
        t.await.unwrap();
    }
    let ended = ended.lock().unwrap().clone();

    // The stopped broker's database: the last signed head covers every entry.
    let path = dir.path().join("broker-data/lienthong.db");
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    use sqlx::Row;
    let log = sqlx::query("SELECT log_id, public_key FROM audit_logs")
        .fetch_one(&pool)
        .await
        .unwrap();
    let (log_id, public_key): (String, Vec<u8>) = (log.get(0), log.get(1));
    let head = sqlx::query(
        "SELECT tree_size, root_hash, timestamp_ms, signature FROM tree_heads WHERE log_id = ? ORDER BY tree_size DESC LIMIT 1",
    )
    .bind(&log_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    let entries: Vec<(i64, Vec<u8>, String)> = sqlx::query_as(
        "SELECT sequence, leaf_hash, leaf FROM audit_entries \
             WHERE log_no = (SELECT log_no FROM audit_logs WHERE log_id = ?) ORDER BY sequence",
    )
    .bind(&log_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    let tree_size: i64 = head.get(0);
    assert_eq!(tree_size as usize, entries.len(), "the final head covers every entry");
    let hashes: Vec<[u8; 32]> = entries
        .iter()
        .map(|(_, h, _)| h.as_slice().try_into().unwrap())
        .collect();
    let root_hash: Vec<u8> = head.get(1);
    assert_eq!(lienthong_audit::merkle::root(&hashes).to_vec(), root_hash);
    let sth = lienthong_audit::SignedTreeHead {
        log_id: log_id.clone(),
        tree_size: tree_size as u64,
        root_hash: root_hash.as_slice().try_into().unwrap(),
        timestamp_ms: head.get::<i64, _>(2) as u64,
        signature: head.get(3),
    };
    lienthong_audit::sth::verify_tree_head(&sth, public_key.as_slice().try_into().unwrap())
        .expect("the final head is signed by the log's key");

    // Request ids of the lookups the broker accepted (each is audited).
    let accepted: std::collections::HashSet<String> = entries
        .iter()
        .filter_map(|(_, _, leaf)| {
            let v: serde_json::Value = serde_json::from_str(leaf).unwrap();
            v["request_id"].as_str().map(str::to_string)
        })
        .filter(|id| id.starts_with("sigterm-load-"))
        .collect();
    let mut refused = 0;
    for (request_id, end) in &ended {
        match end {
            Ended::Released(r) => {
                assert_eq!(
                    entries.get(r.sequence as usize).map(|(_, h, _)| h),
                    Some(&r.leaf_hash),
                    "the entry of released lookup {request_id} is in the log"
                );
            }
            // The broker took the lookup in and then refused it (draining).
            Ended::Refused(status) if accepted.contains(request_id) => {
                assert_eq!(
                    status.code(),
                    Code::Unavailable,
                    "accepted lookup {request_id} was cut off: {status:?}"
                );
                refused += 1;
            }
            // Never reached the broker: the client found the connection gone
            // (refused, or closed before the request was sent).
            Ended::Refused(status) => {
                assert!(
                    matches!(status.code(), Code::Unavailable | Code::Cancelled),
                    "lookup {request_id} ended oddly: {status:?}"
                );
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 8, "every load task ends refused once the broker is gone");
    fed.shutdown_registers().await;
}

/// With `--log-format json`, every line the broker writes to stderr is one
/// JSON object, its start and stop announcements included: a log shipper
/// parses the stream line by line.
#[tokio::test]
async fn json_logs_are_json_on_every_line_from_start_to_stop() {
    use std::io::{BufRead, BufReader};
    let (_dir, mut fed) = bare_federation().await;
    let stop = fed.broker.take_shutdown().unwrap();
    let _ = stop.send(());
    fed.broker.wait().await.unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["--log-format", "json", "serve", "--config"])
        .arg(&fed.config_path)
        .env("LIENTHONG_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let parsed: Result<serde_json::Value, _> = serde_json::from_str(&line);
            if let Ok(addr) = parsed.as_ref().map(|v| v["fields"]["addr"].clone())
                && let Some(addr) = addr.as_str()
            {
                let _ = tx.send(addr.to_owned());
            }
            lines.push(line);
        }
        lines
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the broker announces its address");
    let (serving, out) = exchange_health(&format!("https://{addr}"), &fed.certs.join("ca.pem")).await;
    assert!(serving, "{out}");
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().unwrap().success());
    let lines = reader.join().unwrap();
    assert!(lines.len() >= 4, "{lines:?}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
    }
    assert!(lines.last().unwrap().contains("stopped cleanly"), "{lines:?}");
    fed.shutdown_registers().await;
}

/// JSON logs set in the config (not by the flag): the fatal error that stops
/// the broker is a JSON line as well, the one line a log pipeline must not
/// fail to parse.
#[tokio::test]
async fn a_fatal_error_is_json_when_the_config_asks_for_json_logs() {
    let (_dir, mut fed) = bare_federation().await;
    // The running broker holds the data directory: a second one fails to start.
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&fed.config_path)
        .env("LIENTHONG_LISTEN", "127.0.0.1:0")
        .env("LIENTHONG_TELEMETRY_LOG_FORMAT", "json")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().expect("a fatal error is printed");
    for line in stderr.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["level"], "ERROR", "{last}");
    assert!(
        v["fields"]["message"].as_str().unwrap().starts_with("error: "),
        "{last}"
    );
    if let Some(stop) = fed.broker.take_shutdown() {
        let _ = stop.send(());
    }
    fed.broker.wait().await.unwrap();
    fed.shutdown_registers().await;
}

/// The certificates agencies use are watched for their end: the one each
/// member last connected with and the one each register endpoint presented
/// are in /metrics, and those within 30 days are warned of.
#[tokio::test]
async fn members_and_registers_certificate_expiries_are_exported_and_warned_of() {
    use lienthong_cli::federation::CIVIL_STATUS;
    let dir = tempfile::tempdir().unwrap();
    let mut options = FederationOptions::new(dir.path());
    options.metrics_listen = Some("127.0.0.1:0".into());
    let fed = Federation::start(options).await.unwrap();
    let addr = fed.broker.metrics_addr.expect("metrics listener configured");
    let now = time::OffsetDateTime::now_utc();
    let ending = ca(&fed)
        .issue(&lienthong_tls::IssueSpec {
            not_after: now + time::Duration::days(10),
            ..lienthong_tls::IssueSpec::client(JUDICIAL_OFFICE)
        })
        .unwrap();
    let office = connect_with(&fed, &ending.cert_pem, &ending.key_pem).await;
    office
        .exchange()
        .lookup(birth_lookup(&citizen_id(&fed, 7200), PURPOSE_CERTIFICATE))
        .await
        .unwrap();
    let not_after = |pem: &str| {
        lienthong_tls::summarize_pem(pem, "")
            .unwrap()
            .not_after
            .unix_timestamp() as f64
    };
    let (status, scrape) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{scrape}");
    assert_eq!(
        sample(
            &scrape,
            &format!(r#"lienthong_member_certificate_expiry_timestamp_seconds{{member="{JUDICIAL_OFFICE}"}}"#)
        ),
        not_after(&ending.cert_pem),
        "{scrape}"
    );
    let register_pem = std::fs::read_to_string(fed.certs.join(format!("{CIVIL_STATUS}.pem"))).unwrap();
    let register_series =
        format!(r#"lienthong_provider_endpoint_certificate_expiry_timestamp_seconds{{provider="{CIVIL_STATUS}","#);
    let register_expiry = scrape
        .lines()
        .find_map(|l| l.strip_prefix(&register_series))
        .and_then(|rest| rest.rsplit(' ').next())
        .map(|v| v.parse::<f64>().unwrap());
    assert_eq!(register_expiry, Some(not_after(&register_pem)), "{scrape}");
    assert_eq!(
        lienthong_broker::expiry::warn_of_expiring(&fed.broker.broker, now),
        1,
        "the office's certificate, not the register's (a year)"
    );
    fed.shutdown().await.unwrap();
}

/// A member's revoked certificate, still tried after the member moved to a
/// new one (a stolen key, an old client left running), is refused: its
/// expiry is no alarm, and the metric keeps the certificate the member uses.
#[tokio::test]
async fn a_revoked_certificate_still_tried_does_not_replace_the_members_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = FederationOptions::new(dir.path());
    options.metrics_listen = Some("127.0.0.1:0".into());
    let fed = Federation::start(options).await.unwrap();
    let addr = fed.broker.metrics_addr.expect("metrics listener configured");
    let now = time::OffsetDateTime::now_utc();
    let issue = |days: i64| {
        ca(&fed)
            .issue(&lienthong_tls::IssueSpec {
                not_after: now + time::Duration::days(days),
                ..lienthong_tls::IssueSpec::client(JUDICIAL_OFFICE)
            })
            .unwrap()
    };
    let (old, current) = (issue(20), issue(200));
    let series = format!(r#"lienthong_member_certificate_expiry_timestamp_seconds{{member="{JUDICIAL_OFFICE}"}}"#);
    let not_after = |pem: &str| {
        lienthong_tls::summarize_pem(pem, "")
            .unwrap()
            .not_after
            .unix_timestamp() as f64
    };
    let look_up = async |pem: &str, key: &str| {
        connect_with(&fed, pem, key)
            .await
            .exchange()
            .lookup(birth_lookup(&citizen_id(&fed, 7300), PURPOSE_CERTIFICATE))
            .await
    };
    look_up(&old.cert_pem, &old.key_pem).await.unwrap();
    client(&fed, ADMIN)
        .await
        .admin()
        .revoke_certificate(pb::RevokeCertificateRequest {
            certificate_pem: old.cert_pem.clone(),
            reason: "moved to a new certificate".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    look_up(&current.cert_pem, &current.key_pem).await.unwrap();
    let refused = look_up(&old.cert_pem, &old.key_pem).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let (status, scrape) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200, "{scrape}");
    assert_eq!(sample(&scrape, &series), not_after(&current.cert_pem), "{scrape}");
    assert_eq!(
        lienthong_broker::expiry::warn_of_expiring(&fed.broker.broker, now),
        0,
        "the revoked certificate's end is not warned of"
    );
    fed.shutdown().await.unwrap();
}
