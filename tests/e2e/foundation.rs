//! The foundation: health, reflection, mutual-TLS identity, config errors.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::federation::{ADMIN, JUDICIAL_OFFICE};
use lienthong_tls::{Identity, IssueSpec};
use std::time::Duration;
use tonic::Code;

#[tokio::test]
async fn health_serving_and_reflection_lists_every_service() {
    let (_dir, fed) = bare_federation().await;
    let c = client(&fed, ADMIN).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel.clone());
    for service in ["", "lienthong.v1.Exchange", "lienthong.v1.Admin"] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service}"
        );
    }
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(c.channel.clone());
    let ask = |request: MessageRequest| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    // One stream, as grpcurl keeps it: a symbol the broker does not know is
    // answered in the stream, and the questions after it are answered too.
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol("no.such.Service".into())),
            ask(MessageRequest::FileContainingSymbol("lienthong.v1.Audit".into())),
        ]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in lienthong::SERVICE_NAMES {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }
    assert!(names.iter().any(|n| n == "grpc.health.v1.Health"));
    // In the contract, served by registers, not by the broker.
    assert!(
        !names.iter().any(|n| n == "lienthong.provider.v1.RecordProvider"),
        "{names:?}"
    );
    let unknown = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ErrorResponse(error)) = unknown.message_response else {
        panic!("no error response: {unknown:?}")
    };
    assert_eq!(error.error_code, Code::NotFound as i32, "{error:?}");
    let audit = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = audit.message_response else {
        panic!("no files: {audit:?}")
    };
    // The file and its imports, so that a client can build the types at once.
    use prost::Message;
    let files: Vec<String> = files
        .file_descriptor_proto
        .iter()
        .map(|f| {
            prost_types::FileDescriptorProto::decode(f.as_slice())
                .unwrap()
                .name()
                .to_owned()
        })
        .collect();
    assert_eq!(
        files,
        [
            "lienthong/v1/audit.proto",
            "google/protobuf/timestamp.proto",
            "lienthong/v1/exchange.proto"
        ]
    );
    assert!(
        stream.message().await.unwrap().is_none(),
        "ends with the client's stream"
    );

    // The older protocol version, which older clients call, answers alike.
    use tonic_reflection::pb::v1alpha;
    let mut alpha = v1alpha::server_reflection_client::ServerReflectionClient::new(c.channel.clone());
    let mut stream = alpha
        .server_reflection_info(tokio_stream::iter(vec![v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1alpha::server_reflection_request::MessageRequest::FileByFilename(
                "lienthong/v1/exchange.proto".into(),
            )),
        }]))
        .await
        .unwrap()
        .into_inner();
    let answer = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(
            answer.message_response,
            Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(_))
        ),
        "{answer:?}"
    );
    fed.shutdown().await.unwrap();
}

async fn expect_unauthenticated(c: &lienthong_cli::client::Clients, needle: &str) {
    let err = c
        .schemas()
        .list_record_types(pb::ListRecordTypesRequest::default())
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains(needle),
        "message {:?} should mention {needle:?}",
        err.message()
    );
}

/// A client that trusts the federation CA but presents no certificate.
async fn without_certificate(fed: &lienthong_cli::federation::Federation) -> lienthong_cli::client::Clients {
    let ca_pem = std::fs::read_to_string(fed.certs.join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile_certs(&ca_pem) {
        roots.add(c).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let channel = lienthong_tls::connect_channel(&fed.broker_url, std::sync::Arc::new(cfg), Duration::from_secs(5))
        .await
        .unwrap();
    lienthong_cli::client::Clients { channel }
}

#[tokio::test]
async fn mutual_tls_refuses_every_bad_identity_and_accepts_an_enabled_member() {
    let (_dir, fed) = federation().await;

    // No client certificate at all.
    expect_unauthenticated(&without_certificate(&fed).await, "no client certificate").await;

    // A certificate from another CA, naming a real member.
    let other = lienthong_tls::CertificateAuthority::generate(&fed.options.trust_domain).unwrap();
    let forged = other.issue(&IssueSpec::member(JUDICIAL_OFFICE)).unwrap();
    expect_unauthenticated(&connect_with(&fed, &forged.cert_pem, &forged.key_pem).await, "CA").await;

    // An expired certificate.
    let now = time::OffsetDateTime::now_utc();
    let expired = ca(&fed)
        .issue(&IssueSpec {
            identity: Identity::Member(JUDICIAL_OFFICE.into()),
            hosts: vec![],
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
        })
        .unwrap();
    expect_unauthenticated(
        &connect_with(&fed, &expired.cert_pem, &expired.key_pem).await,
        "expired",
    )
    .await;

    // A valid certificate of a member that was never registered.
    let (cert, key) = issue(&fed, "stranger-agency");
    expect_unauthenticated(&connect_with(&fed, &cert, &key).await, "not registered").await;

    // An enabled member is served; once disabled, its open connection is
    // refused on the very next request.
    let office = client(&fed, JUDICIAL_OFFICE).await;
    office
        .schemas()
        .list_record_types(pb::ListRecordTypesRequest::default())
        .await
        .unwrap();
    client(&fed, ADMIN)
        .await
        .admin()
        .disable_member(pb::SetMemberEnabledRequest {
            id: JUDICIAL_OFFICE.into(),
            reason: "certificate compromised".into(),
        })
        .await
        .unwrap();
    expect_unauthenticated(&office, "disabled").await;

    // Every refusal reached the audit log as an authentication entry.
    let entries = logged(
        &fed,
        pb::EntryFilter {
            kind: pb::EntryKind::Authentication as i32,
            ..Default::default()
        },
    )
    .await;
    assert!(entries.len() >= 5, "authentication failures audited: {}", entries.len());
    fed.shutdown().await.unwrap();
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}

#[test]
fn bad_config_files_exit_non_zero_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for f in ["ca.pem", "broker.pem", "broker.key"] {
        std::fs::write(d.join(f), "x").unwrap();
    }
    let tls = "[tls]\nca = \"ca.pem\"\ncert = \"broker.pem\"\nkey = \"broker.key\"\n";
    let cases = [
        (
            "unknown-key.toml",
            format!("{tls}\n[limits]\nmax_colect_items = 3\n"),
            "max_colect_items",
        ),
        (
            "bad-address.toml",
            format!("listen = \"localhost-7443\"\n{tls}"),
            "listen",
        ),
        (
            "missing-tls.toml",
            "[tls]\nca = \"nowhere/ca.pem\"\n".to_string(),
            "tls.ca",
        ),
    ];
    for (name, text, needle) in cases {
        let path = d.join(name);
        std::fs::write(&path, text).unwrap();
        let (ok, out) = run_cli(&["serve", "--config", path.to_str().unwrap()], &[]);
        assert!(!ok, "{name} must fail");
        assert!(
            out.contains(needle) && out.contains(name),
            "{name}: output {out:?} should name {needle} and the file"
        );
    }
}

/// `lienthong certs init --dir DIR/certs ARGS`, and a default broker config
/// using its files, with its data in DIR/data.
fn config_after_certs_init(dir: &std::path::Path, args: &[&str]) -> lienthong_broker::config::Config {
    let certs = dir.join("certs");
    let mut all = vec!["certs", "init", "--dir", certs.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, out) = run_cli(&all, &[]);
    assert!(ok, "{out}");
    let mut config = lienthong_broker::config::Config {
        data_dir: dir.join("data"),
        ..Default::default()
    };
    config.tls.ca = certs.join("ca.pem");
    config.tls.cert = certs.join("broker.pem");
    config.tls.key = certs.join("broker.key");
    config
}

#[tokio::test]
async fn a_broker_certificate_from_another_trust_domain_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_after_certs_init(dir.path(), &["--trust-domain", "lienthong.gov.vn"]);
    config.trust_domain = "tax.example".into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let Err(e) = lienthong_broker::server::start(config.clone(), Some(listener)).await else {
        panic!("a broker whose certificate is in another trust domain must not start");
    };
    let text = e.to_string();
    for needle in [
        "broker.pem",
        "spiffe://tax.example/broker",
        "lienthong.gov.vn",
        "--trust-domain",
    ] {
        assert!(text.contains(needle), "{text:?} should name {needle}");
    }
    // The same files with the trust domain they were made for start.
    config.trust_domain = "lienthong.gov.vn".into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker = lienthong_broker::server::start(config, Some(listener)).await.unwrap();
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_broker_certificate_made_for_a_service_name_still_answers_local_health_probes() {
    let dir = tempfile::tempdir().unwrap();
    // As deploy/README.md has it for Kubernetes: the Service's name.
    let config = config_after_certs_init(dir.path(), &["--host", "lienthong-broker.lienthong.svc"]);
    let certs = dir.path().join("certs");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker = lienthong_broker::server::start(config, Some(listener)).await.unwrap();
    let port = broker.addr.port();
    let ca = certs.join("ca.pem").display().to_string();
    // The probe of deploy/k8s/deployment.yaml and the image's HEALTHCHECK.
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("https://{host}:{port}");
        let ca = ca.clone();
        let (ok, out) = tokio::task::spawn_blocking(move || run_cli(&["health", "--broker", &url, "--ca", &ca], &[]))
            .await
            .unwrap();
        assert!(ok, "health through {host}: {out}");
    }
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn clients_refuse_a_server_that_is_not_the_broker() {
    // Every member's certificate chains to the federation CA and may serve
    // (registers do): one answering at the broker's address must get no
    // queries and no admin commands.
    let (_dir, fed) = federation().await;
    let m = lienthong_tls::TlsMaterial::load(&lienthong_cli::client::member_files(
        &fed.certs,
        lienthong_cli::federation::CIVIL_STATUS,
    ))
    .unwrap();
    let tls = std::sync::Arc::new(lienthong_tls::ServerTls::new(&m, &fed.options.trust_domain).unwrap());
    let impostor =
        lienthong_provider::testing::start_raw_server(lienthong_provider::testing::RawProvider::new("{}"), tls)
            .await
            .unwrap();
    let refused = lienthong_cli::client::connect(
        &impostor.url(),
        &lienthong_cli::client::member_files(&fed.certs, JUDICIAL_OFFICE),
    )
    .await;
    let err = format!(
        "{:#}",
        refused.err().expect("a member's certificate is not the broker's")
    );
    assert!(err.contains("cannot connect to the broker"), "{err}");
    // The broker itself is accepted.
    lienthong_cli::client::connect(
        &fed.broker_url,
        &lienthong_cli::client::member_files(&fed.certs, JUDICIAL_OFFICE),
    )
    .await
    .unwrap();
    impostor.shutdown().await;
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_flood_without_a_certificate_is_summed_up_in_the_log_not_logged_call_by_call() {
    let (dir, fed) = bare_federation().await;
    let anonymous = without_certificate(&fed).await;
    let per_minute = lienthong_broker::refusals::PER_MINUTE as usize;
    for _ in 0..per_minute + 200 {
        let err = anonymous
            .admin()
            .list_members(pb::ListMembersRequest::default())
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    // The shutdown writes the summary of what was not logged one by one.
    fed.shutdown().await.unwrap();
    let db = dir.path().join("broker-data/lienthong.db");
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT json_extract(leaf, '$.reason') FROM audit_entries WHERE kind = 'authentication' ORDER BY sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    // A minute's budget one by one (and what refilled while the calls ran,
    // ten a second), then one summary of the rest.
    let (summary, one_by_one) = reasons.split_last().unwrap();
    assert!(
        (per_minute..per_minute + 200).contains(&one_by_one.len()),
        "{} logged one by one",
        one_by_one.len()
    );
    assert!(one_by_one.iter().all(|r| r.contains("no client certificate")));
    assert_eq!(
        summary,
        &format!(
            "unauthenticated: {} more refusals from 127.0.0.1, past the {per_minute} a minute logged one by one",
            per_minute + 200 - one_by_one.len()
        )
    );
}

/// The CLI as `member` with `input` on its standard input.
async fn cli_with_stdin(
    fed: &lienthong_cli::federation::Federation,
    member: &str,
    args: &[&str],
    input: String,
) -> (bool, String) {
    use std::io::Write;
    let env = cli_env(fed, member);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new(bin())
            .args(&args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).to_string();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    })
    .await
    .unwrap()
}

/// A national ID need not be typed on a command line (shell history,
/// process list): `lookup --query -` and `audit history --subject -` read
/// it from standard input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reads_a_national_id_from_standard_input() {
    let (_dir, fed) = federation().await;
    let subject = citizen_id(&fed, 21);
    let query = serde_json::json!({ "national_id": subject }).to_string();
    let (ok, out) = cli_with_stdin(
        &fed,
        lienthong_cli::federation::JUDICIAL_OFFICE,
        &[
            "lookup",
            "--type",
            "civil_status.birth_record",
            "--query",
            "-",
            "--purpose",
            lienthong_cli::federation::PURPOSE_CERTIFICATE,
        ],
        format!("{query}\n"),
    )
    .await;
    assert!(ok && out.contains("full_name") && out.contains("receipt"), "{out}");
    let (ok, out) = cli_with_stdin(
        &fed,
        lienthong_cli::federation::CITIZEN_PORTAL,
        &["audit", "history", "--subject", "-"],
        format!("{subject}\n"),
    )
    .await;
    assert!(
        ok && out.contains("hanoi-judicial-office") && out.contains("civil_status.birth_record"),
        "{out}"
    );
    let (ok, out) = cli_with_stdin(
        &fed,
        lienthong_cli::federation::CITIZEN_PORTAL,
        &["audit", "history", "--subject", "-"],
        String::new(),
    )
    .await;
    assert!(!ok && out.contains("standard input was empty"), "{out}");
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn certificate_files_typed_on_the_command_line_beat_the_environment() {
    let (_dir, fed) = federation().await;
    let certs = fed.certs.display().to_string();
    let url = fed.broker_url.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        // The container image sets LIENTHONG_CA for its health probe.
        let env = [
            ("LIENTHONG_CA", "/nonexistent/ca.pem"),
            ("LIENTHONG_CERT", "/nonexistent/admin.pem"),
        ];
        run_cli(
            &["--broker", &url, "--certs", &certs, "--as", ADMIN, "member", "list"],
            &env,
        )
    })
    .await
    .unwrap();
    assert!(ok && out.contains(JUDICIAL_OFFICE), "{out}");
    // From the environment alone, the files named on their own still win.
    let env = cli_env(&fed, ADMIN);
    let (ok, out) = tokio::task::spawn_blocking(move || {
        let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.push(("LIENTHONG_CA", "/nonexistent/ca.pem"));
        run_cli(&["member", "list"], &env)
    })
    .await
    .unwrap();
    assert!(!ok && out.contains("/nonexistent/ca.pem"), "{out}");
}

#[test]
fn an_unknown_log_format_is_refused_not_read_as_text() {
    for (args, env) in [
        (vec!["--log-format", "JSON", "serve", "--print-default-config"], vec![]),
        (
            vec!["serve", "--print-default-config"],
            vec![("LIENTHONG_LOG_FORMAT", "jsn")],
        ),
    ] {
        let (ok, out) = run_cli(&args, &env);
        assert!(!ok, "{args:?} {env:?} must fail: {out}");
        assert!(out.contains("possible values: text, json"), "{out}");
    }
}

/// A connection flag a command does not use is refused, not ignored:
/// `serve --ca bundle.pem` during a CA roll would otherwise seem to work.
/// The same values from the environment (the container image sets
/// `LIENTHONG_CA` for its health probe) are left alone.
#[test]
fn flags_a_command_ignores_are_refused() {
    let (ok, out) = run_cli(&["serve", "--ca", "bundle.pem", "--print-default-config"], &[]);
    assert!(
        !ok && out.contains("does not take --ca") && out.contains("tls.ca"),
        "{out}"
    );
    let (ok, out) = run_cli(&["serve", "--print-default-config"], &[("LIENTHONG_CA", "bundle.pem")]);
    assert!(ok && out.contains("[tls]"), "{out}");
    let (ok, out) = run_cli(&["demo", "--as", "federation-admin"], &[]);
    assert!(!ok && out.contains("does not take --as"), "{out}");
    let (ok, out) = run_cli(
        &["demo-provider", "civil-status", "--tls-dir", "x", "--certs", "y"],
        &[],
    );
    assert!(!ok && out.contains("does not take --certs"), "{out}");
}

#[test]
fn audit_query_refuses_a_limit_of_zero() {
    let (ok, out) = run_cli(&["audit", "query", "--limit", "0"], &[]);
    assert!(!ok && out.contains("--limit"), "{out}");
}

#[test]
fn a_kept_running_demo_stops_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    // `--broker` is where the demo's broker listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let mut child = std::process::Command::new(bin())
        .args(["demo", "--keep-running", "--broker", &url])
        .env("TMPDIR", tmp.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    // Its last hint: the federation is up and waiting.
    let mut told = Vec::new();
    for line in lines.by_ref() {
        let last = line.contains("broker config:");
        told.push(line);
        if last {
            break;
        }
    }
    assert!(
        told.iter().any(|l| l.contains("broker config:")),
        "the demo should print how to call it: {told:?}"
    );
    assert!(
        told.iter().any(|l| l.contains(&format!("LIENTHONG_BROKER={url} "))),
        "{told:?}"
    );
    let config = told
        .iter()
        .find_map(|l| l.split("broker config:").nth(1))
        .map(|p| std::fs::read_to_string(p.trim()).unwrap())
        .unwrap();
    assert!(config.contains(&format!("listen = \"127.0.0.1:{port}\"")), "{config}");
    assert!(
        std::fs::read_dir(tmp.path()).unwrap().next().is_some(),
        "the demo keeps its federation in a temporary directory"
    );
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let rest: Vec<String> = lines.collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopping")), "{rest:?}");
    // The temporary directory held the federation's CA key.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Two brokers on one data directory would write one audit log with one
/// signing key: the second is refused at start, and starts once the first
/// has stopped.
#[tokio::test]
async fn a_second_broker_on_the_same_data_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_after_certs_init(dir.path(), &[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let first = lienthong_broker::server::start(config.clone(), Some(listener))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let Err(e) = lienthong_broker::server::start(config.clone(), Some(listener)).await else {
        panic!("a second broker started on a data directory in use");
    };
    let text = e.to_string();
    assert!(
        text.contains("another broker is running with data directory") && text.contains("broker.lock"),
        "{text}"
    );
    first.shutdown().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let again = lienthong_broker::server::start(config, Some(listener)).await.unwrap();
    again.shutdown().await.unwrap();
}

/// A SQLite database serves one broker, wherever `database_url` puts it: a
/// second broker pointed at it from another data directory is refused.
#[tokio::test]
async fn a_second_broker_on_the_same_sqlite_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_after_certs_init(dir.path(), &[]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let first = lienthong_broker::server::start(config.clone(), Some(listener))
        .await
        .unwrap();
    let mut other = config.clone();
    other.data_dir = dir.path().join("other-data");
    other.database_url = config.database_url();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let Err(e) = lienthong_broker::server::start(other, Some(listener)).await else {
        panic!("a second broker started on a SQLite database in use");
    };
    let text = e.to_string();
    assert!(
        text.contains("another broker is running on this SQLite database"),
        "{text}"
    );
    first.shutdown().await.unwrap();
}

/// A broker stopped cleanly leaves its SQLite database in one file (the WAL
/// copied back and emptied), so that a backup copied over it, as a restore
/// does, cannot meet an old WAL that SQLite would replay onto it.
#[tokio::test]
async fn a_stopped_broker_leaves_its_database_in_one_file() {
    let (_dir, fed) = federation().await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    for i in 0..20 {
        look_up_birth(&office, &citizen_id(&fed, i)).await.unwrap();
    }
    let wal = fed.dir.join("broker-data/lienthong.db-wal");
    assert!(
        std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0),
        "the lookups went through the WAL"
    );
    fed.shutdown().await.unwrap();
    let left = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(left, 0, "{left} bytes left in {}", wal.display());
}

/// A broker with no admin serves, but nobody could administer it: it says
/// so at start, with what to set. With `bootstrap_admin` set, nothing is said.
#[test]
fn a_broker_without_an_admin_says_how_to_get_one() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let config = config_after_certs_init(dir.path(), &[]);
    let text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        config.data_dir.display().to_string(),
        config.tls.ca.display().to_string(),
        config.tls.cert.display().to_string(),
        config.tls.key.display().to_string(),
    );
    let file = dir.path().join("broker.toml");
    std::fs::write(&file, text).unwrap();
    let start = |admin: &str| {
        let mut child = std::process::Command::new(bin())
            .args(["serve", "--config"])
            .arg(&file)
            .env("LIENTHONG_BOOTSTRAP_ADMIN", admin)
            .env("RUST_LOG", "warn,lienthong_broker=info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut seen = Vec::new();
        for line in BufReader::new(child.stderr.take().unwrap())
            .lines()
            .map_while(Result::ok)
        {
            let serving = line.contains("broker serving");
            seen.push(line);
            if serving {
                break;
            }
        }
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
        seen
    };
    let seen = start("");
    assert!(
        seen.iter()
            .any(|l| l.contains("no enabled member has the admin role") && l.contains("bootstrap_admin")),
        "{seen:?}"
    );
    let seen = start("federation-admin");
    assert!(seen.iter().any(|l| l.contains("broker serving")), "{seen:?}");
    assert!(
        !seen.iter().any(|l| l.contains("no enabled member has the admin role")),
        "{seen:?}"
    );
}
