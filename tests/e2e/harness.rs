//! Shared set-up for the end-to-end tests.

use lienthong::v1 as pb;
use lienthong_cli::client::{Clients, connect, member_files};
use lienthong_cli::federation::{Federation, FederationOptions};
use lienthong_tls::{CertificateAuthority, IssueSpec, TlsMaterial};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tempfile::TempDir;

/// A federation in a temporary directory, set up (members, schemas, grants).
pub async fn federation() -> (TempDir, Federation) {
    let dir = tempfile::tempdir().unwrap();
    let fed = Federation::start(FederationOptions::new(dir.path()))
        .await
        .expect("federation starts");
    (dir, fed)
}

/// A federation with only the bootstrap admin.
pub async fn bare_federation() -> (TempDir, Federation) {
    let dir = tempfile::tempdir().unwrap();
    let fed = Federation::start_bare(FederationOptions::new(dir.path()))
        .await
        .expect("federation starts");
    (dir, fed)
}

/// The federation's CA, to issue odd certificates.
pub fn ca(fed: &Federation) -> CertificateAuthority {
    CertificateAuthority::load(
        &fed.certs.join("ca.pem"),
        &fed.certs.join("ca.key"),
        &fed.options.trust_domain,
    )
    .unwrap()
}

/// Connects presenting an arbitrary certificate.
pub async fn connect_with(fed: &Federation, cert_pem: &str, key_pem: &str) -> Clients {
    connect_presenting(fed, &material(fed, cert_pem, key_pem)).await
}

/// `cert_pem` and `key_pem` with the federation's CA.
pub fn material(fed: &Federation, cert_pem: &str, key_pem: &str) -> TlsMaterial {
    let ca = std::fs::read_to_string(fed.certs.join("ca.pem")).unwrap();
    TlsMaterial::from_pem(&ca, cert_pem, key_pem).unwrap()
}

/// Connects presenting `material`'s certificate, whatever its encoding.
pub async fn connect_presenting(fed: &Federation, material: &TlsMaterial) -> Clients {
    let config = lienthong_tls::client_config(material, None).unwrap();
    let channel = lienthong_tls::connect_channel(&fed.broker_url, config, Duration::from_secs(5))
        .await
        .unwrap();
    Clients { channel }
}

/// Creates a grant as `admin`, which must be allowed.
pub async fn granted(admin: &Clients, request: pb::CreateGrantRequest) -> pb::Grant {
    admin.admin().create_grant(request).await.unwrap().into_inner()
}

/// Revokes grant `id` as `admin`, which must be allowed.
pub async fn revoke(admin: &Clients, id: &str, reason: &str) {
    admin
        .admin()
        .revoke_grant(pb::RevokeGrantRequest {
            id: id.into(),
            reason: reason.into(),
        })
        .await
        .unwrap();
}

/// Connects as a member of the federation.
pub async fn client(fed: &Federation, member: &str) -> Clients {
    connect(&fed.broker_url, &member_files(&fed.certs, member))
        .await
        .unwrap()
}

/// Issues a certificate for `member` from the federation CA.
pub fn issue(fed: &Federation, member: &str) -> (String, String) {
    let c = ca(fed).issue(&IssueSpec::member(member)).unwrap();
    (c.cert_pem, c.key_pem)
}

/// National id of demo citizen `index`.
pub fn citizen_id(fed: &Federation, index: u32) -> String {
    lienthong_provider::demo::citizen_national_id(fed.options.seed, index)
}

/// A birth-record lookup for `subject`.
pub fn birth_lookup(subject: &str, purpose: &str) -> pb::LookupRequest {
    pb::LookupRequest {
        record_type: "civil_status.birth_record".into(),
        query_json: serde_json::json!({ "national_id": subject }).to_string(),
        purpose: purpose.into(),
        ..Default::default()
    }
}

/// A grant of birth records to `consumer` for the tax law's purpose.
pub fn birth_grant(consumer: &str, fields: &[&str], rate: u32) -> pb::CreateGrantRequest {
    pb::CreateGrantRequest {
        consumer: consumer.into(),
        record_type: "civil_status.birth_record".into(),
        fields: fields.iter().map(|s| s.to_string()).collect(),
        purposes: vec!["tax-law-38-2019/art-17".into()],
        valid_from: None,
        valid_until: None,
        rate_limit_per_minute: rate,
    }
}

/// `office` looks `subject`'s birth record up for a criminal-record certificate.
pub async fn look_up_birth(
    office: &Clients,
    subject: &str,
) -> Result<tonic::Response<pb::LookupResponse>, tonic::Status> {
    office
        .exchange()
        .lookup(birth_lookup(subject, lienthong_cli::federation::PURPOSE_CERTIFICATE))
        .await
}

/// Path of the built `lienthong` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lienthong"))
}

/// Runs the binary with arguments, returning (success, stdout + stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// CLI environment acting as `member` against the federation.
pub fn cli_env(fed: &Federation, member: &str) -> Vec<(&'static str, String)> {
    vec![
        ("LIENTHONG_BROKER", fed.broker_url.clone()),
        ("LIENTHONG_CERTS", fed.certs.display().to_string()),
        ("LIENTHONG_AS", member.to_string()),
    ]
}

/// Runs the CLI as `member`, off the async runtime so an in-process broker
/// keeps serving while the CLI waits for it.
pub async fn cli_as(fed: &Federation, member: &str, args: &[&str]) -> (bool, String) {
    let env = cli_env(fed, member);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_cli(&args, &env)
    })
    .await
    .unwrap()
}

/// A broker running as its own OS process (`lienthong serve`), for crash and
/// signal tests. Killed on drop.
pub struct BrokerProcess {
    pub child: Child,
    pub url: String,
}

impl BrokerProcess {
    /// Starts `lienthong serve --config <config>` where the config listens on
    /// port 0, and reads the bound address from its output.
    pub fn start(config: &Path) -> BrokerProcess {
        BrokerProcess::start_with(config, &[])
    }

    /// Stops `fed`'s broker and hands its data directory and config to a
    /// broker process of its own, started with `env` (settings as `LIENTHONG_*`).
    pub async fn take_over(fed: &mut Federation, env: &[(&str, &str)]) -> BrokerProcess {
        let stop = fed.broker.take_shutdown().unwrap();
        let _ = stop.send(());
        fed.broker.wait().await.unwrap();
        BrokerProcess::start_with(&fed.config_path, env)
    }

    /// [`BrokerProcess::start`] with more environment (settings as `LIENTHONG_*`).
    pub fn start_with(config: &Path, env: &[(&str, &str)]) -> BrokerProcess {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(config)
            .env("LIENTHONG_LISTEN", "127.0.0.1:0")
            .envs(env.iter().copied())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(addr) = line.strip_prefix("lienthong broker listening on ") {
                    let addr = addr.split_whitespace().next().unwrap_or_default().to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
                eprintln!("[broker] {line}");
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("broker process prints its address");
        let port = addr.rsplit(':').next().unwrap();
        BrokerProcess {
            child,
            url: format!("https://127.0.0.1:{port}"),
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (a name `kill` knows: `HUP`, `TERM`).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `lienthong health --service lienthong.v1.Exchange` against the broker at
/// `url`, trusting only `ca` and holding no member certificate, as a
/// container probe does: whether it reports SERVING, and what it printed.
pub async fn exchange_health(url: &str, ca: &Path) -> (bool, String) {
    let (url, ca) = (url.to_owned(), ca.display().to_string());
    tokio::task::spawn_blocking(move || {
        run_cli(
            &[
                "health",
                "--broker",
                &url,
                "--ca",
                &ca,
                "--service",
                "lienthong.v1.Exchange",
            ],
            &[],
        )
    })
    .await
    .unwrap()
}

/// Polls `f` until it returns true or `timeout` passes.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if std::time::Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every entry of a log (this broker's own when `log_id` is empty), as
/// sequence -> leaf hash, read page by page as an auditor.
pub async fn logged_leaves(auditor: &Clients, log_id: &str) -> std::collections::HashMap<u64, Vec<u8>> {
    let mut entries = std::collections::HashMap::new();
    let mut token = String::new();
    loop {
        let filter = pb::EntryFilter {
            log_id: log_id.into(),
            ..Default::default()
        };
        let page = auditor
            .audit()
            .query_entries(pb::QueryEntriesRequest {
                filter: Some(filter),
                page_size: 1000,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        for e in page.entries {
            entries.insert(e.sequence, e.leaf_hash);
        }
        if page.next_page_token.is_empty() {
            return entries;
        }
        token = page.next_page_token;
    }
}

/// `GET path` over plain HTTP/1.1; returns (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    http_response(raw)
}

/// An HTTP/1.1 response read to its end: (status, body).
pub fn http_response(raw: Vec<u8>) -> (u16, String) {
    let text = String::from_utf8(raw).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `series` (name and labels exactly as exposed), 0 when absent.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Entries of the broker's own log matching `filter` (up to 1,000), oldest
/// first, as the state auditor reads them.
pub async fn logged(fed: &Federation, filter: pb::EntryFilter) -> Vec<pb::AuditEntry> {
    client(fed, lienthong_cli::federation::STATE_AUDIT)
        .await
        .audit()
        .query_entries(pb::QueryEntriesRequest {
            filter: Some(filter),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// The admin entries of the broker's own log (up to 1,000), oldest first:
/// changes, and refused admin requests.
pub async fn admin_entries(fed: &Federation) -> Vec<pb::AuditEntry> {
    logged(
        fed,
        pb::EntryFilter {
            kind: pb::EntryKind::Admin as i32,
            ..Default::default()
        },
    )
    .await
}

/// Makes `url` the only endpoint of civil-status.
pub async fn replace_civil_endpoint(fed: &Federation, url: &str) {
    let admin = client(fed, lienthong_cli::federation::ADMIN).await;
    let eps = admin
        .admin()
        .list_endpoints(pb::ListEndpointsRequest {
            provider: lienthong_cli::federation::CIVIL_STATUS.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .endpoints;
    admin
        .admin()
        .add_endpoint(pb::AddEndpointRequest {
            provider: lienthong_cli::federation::CIVIL_STATUS.into(),
            url: url.into(),
        })
        .await
        .unwrap();
    for e in eps {
        admin
            .admin()
            .remove_endpoint(pb::RemoveEndpointRequest { id: e.id })
            .await
            .unwrap();
    }
}

/// Runs the Python script at `script` with `settings` as JSON on its standard
/// input, off the async runtime, and returns the JSON summary it printed and
/// what it wrote to standard error; a script that fails fails the test,
/// showing the latter.
pub async fn run_python(script: &'static str, settings: serde_json::Value) -> (serde_json::Value, String) {
    use std::io::Write;
    let output = tokio::task::spawn_blocking(move || {
        let mut child = Command::new("python3")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(settings.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{script} failed:\n{stderr}");
    (serde_json::from_slice(&output.stdout).unwrap(), stderr)
}
