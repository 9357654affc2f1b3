//! deploy/: what operators copy must work as shipped.
//!
//! * Every broker TOML file in deploy/ loads through the broker's own loader.
//! * The compose federation's topology runs as separate OS processes on
//!   loopback, driven by the compose files themselves: `init-certs.sh` makes the
//!   certificates and the shared subject secret, two `lienthong serve` processes
//!   run deploy/compose/broker.toml on one PostgreSQL, two `lienthong
//!   demo-provider` processes serve the registers, `setup-federation.sh`
//!   administers the federation. compose.yaml's volumes are directories, and
//!   each process gets those its container mounts, at the paths compose.yaml
//!   names: no container holds another member's private key, the CA's or the
//!   admin's unless it is theirs. A client spreads lookups over both brokers;
//!   one broker is SIGKILLed mid-run and the client's retries land on the
//!   other; both logs verify, before and after the killed broker comes back.
//!   The brokers export their spans as broker.toml says, over mutual TLS, to
//!   an OTLP/gRPC endpoint serving the certificate init-certs.sh issued the
//!   collector, with the files otel-collector.yaml names (a stand-in for the
//!   collector: the test has no container engine).

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::client::{Clients, connect, member_files};
use lienthong_cli::federation::{JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, STATE_AUDIT};
use lienthong_store::testing::PgCluster;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use rustls::pki_types::pem::PemObject;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::Code;

const TRUST_DOMAIN: &str = "lienthong.gov.vn";
const SEED: u64 = 2020;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn toml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn deploy_every_shipped_broker_config_loads_with_the_broker_loader() {
    let deploy = repo().join("deploy");
    let mut files = Vec::new();
    toml_files(&deploy, &mut files);
    files.sort();
    let shipped: Vec<String> = files
        .iter()
        .map(|f| f.strip_prefix(&deploy).unwrap().display().to_string())
        .collect();
    for expected in ["compose/broker.toml", "k8s/lienthong.toml", "systemd/lienthong.toml"] {
        assert!(
            shipped.iter().any(|s| s == expected),
            "{expected} missing from {shipped:?}"
        );
    }
    // The certificates live where the deployment mounts them; the loader
    // insists they exist, so stand-ins are given through the environment.
    let tls = tempfile::tempdir().unwrap();
    let mut env = Vec::new();
    for (var, file) in [("CA", "ca.pem"), ("CERT", "broker.pem"), ("KEY", "broker.key")] {
        let path = tls.path().join(file);
        std::fs::write(&path, "placeholder").unwrap();
        env.push((format!("LIENTHONG_TLS_{var}"), path.display().to_string()));
    }
    let otlp_ca = tls.path().join("collector-ca.pem");
    std::fs::write(&otlp_ca, "placeholder").unwrap();
    // Parsed at load: a real CA certificate.
    let metrics_ca = tls.path().join("metrics-ca.pem");
    let monitoring = lienthong_tls::CertificateAuthority::generate("monitoring.lienthong.gov.vn").unwrap();
    std::fs::write(&metrics_ca, monitoring.cert_pem()).unwrap();
    // The collector's CA and the client certificate shown to it: the
    // federation CA and the brokers' own certificate, in broker-tls (the
    // compose test below runs the brokers with broker.toml's own paths).
    let mut compose_env = env.clone();
    for (var, path) in &env {
        let otlp_var = var.replace("LIENTHONG_TLS_", "LIENTHONG_TELEMETRY_OTLP_");
        compose_env.push((otlp_var, path.clone()));
    }
    for (file, name) in files.iter().zip(&shipped) {
        let mut env = env.clone();
        if name.starts_with("k8s/") {
            // Mounted from the `lienthong-otlp` Secret.
            env.push(("LIENTHONG_TELEMETRY_OTLP_CA".to_string(), otlp_ca.display().to_string()));
            // Mounted from the `lienthong-metrics-ca` Secret; only where the
            // file names it, so that the check below sees the file's choice.
            let text = std::fs::read_to_string(file).unwrap();
            if text.lines().any(|l| l.trim_start().starts_with("metrics_client_ca")) {
                env.push((
                    "LIENTHONG_TELEMETRY_METRICS_CLIENT_CA".to_string(),
                    metrics_ca.display().to_string(),
                ));
            }
        }
        if name.starts_with("compose/") {
            env = compose_env.clone();
        }
        let config = lienthong_broker::Config::load(Some(file), env)
            .unwrap_or_else(|e| panic!("deploy/{name} does not load: {e}"));
        // One layout everywhere: the image, the unit and the manifests agree.
        assert_eq!(config.listen_addr().unwrap().port(), 7443, "{name}");
        assert!(config.data_dir.starts_with("/var/lib/lienthong"), "{name}");
        assert_eq!(config.trust_domain, TRUST_DOMAIN, "{name}");
        assert_eq!(config.bootstrap_admin, "federation-admin", "{name}");
        assert_eq!(config.telemetry.log_format, "json", "{name}");
        // Metrics name which agencies ask for which record types, how often:
        // off the host, only scrapers with a certificate read them, except
        // on compose's own network (no Prometheus there, only its collector).
        if let Some(addr) = config.telemetry.metrics_addr() {
            let off_host = !addr.unwrap().ip().is_loopback();
            assert!(
                !off_host || config.telemetry.metrics_tls() || name.starts_with("compose/"),
                "{name} serves /metrics in plain HTTP to the network"
            );
        }
        if name.starts_with("k8s/") {
            assert_eq!(config.telemetry.metrics_client_ca, metrics_ca, "{name}");
        }
        if name.starts_with("compose/") || name.starts_with("k8s/") {
            // Replicas: one shared PostgreSQL, the password from PGPASSWORD.
            let rest = config
                .database_url
                .strip_prefix("postgres://")
                .unwrap_or_else(|| panic!("{name}"));
            let userinfo = rest.split_once('@').map(|(u, _)| u).unwrap_or("");
            assert!(!userinfo.contains(':'), "{name} must not hold a database password");
            assert!(!config.telemetry.metrics_listen.is_empty(), "{name} exposes metrics");
            assert!(!config.telemetry.otlp_endpoint.is_empty(), "{name} exports traces");
            // Another host: the broker would refuse it without verified TLS.
            assert!(
                config
                    .database_url
                    .contains("sslmode=verify-full&sslrootcert=/etc/lienthong/"),
                "{name} reaches its database without verified TLS"
            );
            assert!(!config.allow_unverified_database, "{name}");
            // Spans name who read what and why, and cross to another host
            // (namespace, container): encrypted, the collector verified, and
            // nothing for the broker to warn about at start.
            assert!(
                config.telemetry.otlp_endpoint.starts_with("https://"),
                "{name} exports traces in clear"
            );
            assert!(
                !config.telemetry.otlp_ca.as_os_str().is_empty(),
                "{name} verifies the collector"
            );
            assert!(
                !lienthong_broker::telemetry::exports_in_clear_off_host(&config.telemetry.otlp_endpoint),
                "{name}"
            );
        }
    }
    // And a typo in a shipped file would be caught: the loader refuses unknown keys.
    let broken = tls.path().join("broken.toml");
    let text = std::fs::read_to_string(deploy.join("compose/broker.toml")).unwrap();
    std::fs::write(&broken, text.replace("sign_interval_ms", "sign_intervall_ms")).unwrap();
    let err = lienthong_broker::Config::load(Some(&broken), compose_env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("sign_intervall_ms"), "{err}");
}

/// A long-running `lienthong` process whose stderr is forwarded with a label;
/// killed on drop.
struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    /// Spawns `cmd` and waits for the stderr line containing `marker`, which
    /// ends with the bound address (`... on 127.0.0.1:PORT[ (...)]`).
    fn spawn(label: &'static str, mut cmd: Command, marker: &'static str) -> Daemon {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, rest)) = line.split_once(marker) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
                eprintln!("[{label}] {line}");
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("{label} prints its address"));
        Daemon { child, addr }
    }

    fn url(&self) -> String {
        let port = self.addr.rsplit(':').next().unwrap();
        format!("https://127.0.0.1:{port}")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One volume or file mounted into a compose service's container.
#[derive(Clone, Debug)]
struct Mount {
    /// A named volume, or a path (relative to deploy/compose) for a bind mount.
    source: String,
    target: String,
}

impl Mount {
    fn named_volume(&self) -> Option<&str> {
        (!self.source.starts_with('.') && !self.source.starts_with('/')).then_some(self.source.as_str())
    }
}

/// What the test takes from one service of deploy/compose/compose.yaml.
#[derive(Clone, Debug, Default)]
struct Service {
    command: Vec<String>,
    environment: BTreeMap<String, String>,
    mounts: Vec<Mount>,
}

/// deploy/compose/compose.yaml's services, with the broker and collector
/// configurations they mount, read as the container engine reads them (YAML
/// merge keys resolved). The workspace has no YAML parser: python3's PyYAML
/// (which kubernetes-validate brings; ./scripts/test.sh installs it) turns
/// the files into JSON.
struct Compose {
    services: BTreeMap<String, Service>,
    broker_toml: serde_json::Value,
    collector_yaml: serde_json::Value,
}

impl Compose {
    fn load() -> Compose {
        const TO_JSON: &str = r#"
import json, sys, yaml
try:
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib
with open(sys.argv[1]) as f:
    compose = yaml.safe_load(f)
with open(sys.argv[2], "rb") as f:
    broker = tomllib.load(f)
with open(sys.argv[3]) as f:
    collector = yaml.safe_load(f)
json.dump({"compose": compose, "broker": broker, "collector": collector}, sys.stdout)
"#;
        let compose_dir = repo().join("deploy/compose");
        let out = Command::new("python3")
            .args(["-c", TO_JSON])
            .arg(compose_dir.join("compose.yaml"))
            .arg(compose_dir.join("broker.toml"))
            .arg(compose_dir.join("otel-collector.yaml"))
            .output()
            .expect("python3 (with PyYAML: ./scripts/test.sh installs it) reads compose.yaml");
        assert!(
            out.status.success(),
            "python3 with PyYAML reads compose.yaml (./scripts/test.sh installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let words = |v: &serde_json::Value| -> Vec<String> {
            match v {
                serde_json::Value::Array(a) => a.iter().map(|w| w.as_str().unwrap().to_string()).collect(),
                serde_json::Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
                _ => Vec::new(),
            }
        };
        let mut services = BTreeMap::new();
        for (name, svc) in doc["compose"]["services"].as_object().unwrap() {
            let environment = svc["environment"]
                .as_object()
                .map(|env| {
                    env.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mounts = svc["volumes"]
                .as_array()
                .map(|vols| {
                    vols.iter()
                        .map(|v| {
                            let v = v.as_str().expect("volumes in the short syntax");
                            let mut parts = v.split(':');
                            Mount {
                                source: parts.next().unwrap().to_string(),
                                target: parts.next().unwrap().to_string(),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut command = words(&svc["entrypoint"]);
            command.extend(words(&svc["command"]));
            services.insert(
                name.clone(),
                Service {
                    command,
                    environment,
                    mounts,
                },
            );
        }
        Compose {
            services,
            broker_toml: doc["broker"].clone(),
            collector_yaml: doc["collector"].clone(),
        }
    }

    fn service(&self, name: &str) -> &Service {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("compose.yaml has no service {name}"))
    }

    /// The value of `--flag=VALUE` in a service's command.
    fn flag(&self, service: &str, flag: &str) -> String {
        let prefix = format!("{flag}=");
        self.service(service)
            .command
            .iter()
            .find_map(|w| w.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{service} runs without {flag}"))
            .to_string()
    }

    /// A file of otel-collector.yaml's OTLP/gRPC receiver TLS settings
    /// (`cert_file`, `key_file`, `client_ca_file`).
    fn collector_tls(&self, key: &str) -> String {
        self.collector_yaml["receivers"]["otlp"]["protocols"]["grpc"]["tls"][key]
            .as_str()
            .unwrap_or_else(|| panic!("otel-collector.yaml's OTLP/gRPC receiver serves TLS without {key}"))
            .to_string()
    }

    /// The compose service broker.toml's `telemetry.otlp_endpoint` names.
    fn collector_service(&self) -> String {
        let endpoint = self.broker_path("telemetry", "otlp_endpoint");
        let host = endpoint
            .strip_prefix("https://")
            .unwrap_or_else(|| panic!("broker.toml exports spans in clear: {endpoint}"))
            .split([':', '/'])
            .next()
            .unwrap()
            .to_string();
        self.service(&host);
        host
    }

    /// A path of broker.toml (`tls.key`, say).
    fn broker_path(&self, section: &str, key: &str) -> String {
        let value = if section.is_empty() {
            &self.broker_toml[key]
        } else {
            &self.broker_toml[section][key]
        };
        value
            .as_str()
            .unwrap_or_else(|| panic!("broker.toml {section}.{key}"))
            .to_string()
    }
}

/// The test's layout: the compose federation's volumes as directories, each
/// process given the directories its container would mount, at the paths
/// compose.yaml, init-certs.sh's environment and broker.toml name.
struct Site {
    dir: tempfile::TempDir,
    database_url: String,
    /// Where the brokers send their spans (the stand-in collector).
    otlp_endpoint: String,
    compose: Compose,
}

impl Site {
    fn new(dir: tempfile::TempDir) -> Site {
        Site {
            dir,
            database_url: String::new(),
            otlp_endpoint: String::new(),
            compose: Compose::load(),
        }
    }

    /// The directory standing for a named volume.
    fn volume(&self, name: &str) -> PathBuf {
        self.dir.path().join("volumes").join(name)
    }

    /// Where `container_path` of `service`'s container lives here: under the
    /// volume (or the repository file) mounted deepest above it.
    fn host_path(&self, service: &str, container_path: &str) -> PathBuf {
        let path = Path::new(container_path);
        let mount = self
            .compose
            .service(service)
            .mounts
            .iter()
            .filter(|m| path.starts_with(&m.target))
            .max_by_key(|m| m.target.len())
            .unwrap_or_else(|| panic!("{service}'s container has nothing mounted at {container_path}"));
        let rest = path.strip_prefix(&mount.target).unwrap();
        let base = match mount.named_volume() {
            Some(volume) => self.volume(volume),
            None => repo().join("deploy/compose").join(&mount.source),
        };
        if rest.as_os_str().is_empty() {
            base
        } else {
            base.join(rest)
        }
    }

    /// A file of broker.toml's `[tls]` (`ca`, `cert`, `key`), where broker-N mounts it.
    fn broker_file(&self, n: u32, key: &str) -> PathBuf {
        self.host_path(&format!("broker-{n}"), &self.compose.broker_path("tls", key))
    }
    /// A file of broker.toml's `[telemetry]` (`otlp_ca`, `otlp_cert`,
    /// `otlp_key`), where broker-N mounts it.
    fn otlp_file(&self, n: u32, key: &str) -> PathBuf {
        self.host_path(&format!("broker-{n}"), &self.compose.broker_path("telemetry", key))
    }
    /// A file of the collector's TLS settings, where its container mounts it.
    fn collector_file(&self, key: &str) -> PathBuf {
        self.host_path(&self.compose.collector_service(), &self.compose.collector_tls(key))
    }
    fn ca_private(&self) -> PathBuf {
        let dir = &self.compose.service("certs-init").environment["CA_PRIVATE_DIR"];
        self.host_path("certs-init", dir)
    }
    fn data(&self, broker: u32) -> PathBuf {
        self.host_path(&format!("broker-{broker}"), &self.compose.broker_path("", "data_dir"))
    }
    /// The client identities, as the `federation-setup` container sees them.
    fn clients(&self) -> PathBuf {
        let dir = &self.compose.service("federation-setup").environment["LIENTHONG_CERTS"];
        self.host_path("federation-setup", dir)
    }
    /// The CA certificate the brokers check the database's certificate with
    /// (`sslrootcert` of broker.toml's database_url).
    fn database_root_cert(&self) -> PathBuf {
        let url = self.compose.broker_path("", "database_url");
        let root = url
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix("sslrootcert="))
            .expect("broker.toml's database_url names sslrootcert");
        self.host_path("broker-1", root)
    }
    /// The database server's certificate or key (`ssl_cert_file`,
    /// `ssl_key_file`), where the postgres service reads it.
    fn database_file(&self, setting: &str) -> String {
        let prefix = format!("{setting}=");
        let path = self
            .compose
            .service("postgres")
            .command
            .iter()
            .find_map(|w| w.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("postgres is started without {setting}"));
        std::fs::read_to_string(self.host_path("postgres", path)).unwrap()
    }

    /// `PATH` with the built binary first, as the scripts call `lienthong`.
    fn path_env() -> String {
        let bin_dir = bin().parent().unwrap().to_path_buf();
        format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default())
    }

    fn run_script(&self, script: &str, env: &[(&str, String)]) -> String {
        let out = Command::new("sh")
            .arg(repo().join("deploy/compose").join(script))
            .env("PATH", Self::path_env())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{script} failed:\n{text}");
        text
    }

    /// init-certs.sh with the `certs-init` service's environment, its
    /// container paths turned into the volumes' directories here. Ownership
    /// is left as it is (the test does not run as root).
    fn init_certs(&self) -> String {
        let env: Vec<(&str, String)> = self
            .compose
            .service("certs-init")
            .environment
            .iter()
            .filter(|(k, _)| !k.ends_with("OWNER"))
            .map(|(k, v)| {
                let value = if v.starts_with('/') {
                    v.split_whitespace()
                        .map(|p| self.host_path("certs-init", p).display().to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                } else {
                    v.clone()
                };
                (k.as_str(), value)
            })
            .collect();
        assert!(env.iter().any(|(k, _)| *k == "TRUST_DOMAIN"), "{env:?}");
        self.run_script("init-certs.sh", &env)
    }

    /// `lienthong serve` with deploy/compose/broker.toml, adapted to loopback
    /// through environment overrides only; its files where broker-N mounts them.
    fn broker(&self, n: u32) -> Daemon {
        let mut cmd = Command::new(bin());
        cmd.args(["serve", "--config"])
            .arg(self.host_path(&format!("broker-{n}"), "/etc/lienthong/lienthong.toml"))
            .env("LIENTHONG_LISTEN", "127.0.0.1:0")
            .env("LIENTHONG_DATA_DIR", self.data(n))
            .env("LIENTHONG_DATABASE_URL", &self.database_url)
            .env("LIENTHONG_TLS_CA", self.broker_file(n, "ca"))
            .env("LIENTHONG_TLS_CERT", self.broker_file(n, "cert"))
            .env("LIENTHONG_TLS_KEY", self.broker_file(n, "key"))
            // The stand-in collector on loopback; its certificate also
            // names localhost (as the database's does).
            .env("LIENTHONG_TELEMETRY_OTLP_ENDPOINT", &self.otlp_endpoint)
            .env("LIENTHONG_TELEMETRY_OTLP_CA", self.otlp_file(n, "otlp_ca"))
            .env("LIENTHONG_TELEMETRY_OTLP_CERT", self.otlp_file(n, "otlp_cert"))
            .env("LIENTHONG_TELEMETRY_OTLP_KEY", self.otlp_file(n, "otlp_key"))
            .env("LIENTHONG_TELEMETRY_METRICS_LISTEN", "")
            .env("LIENTHONG_AUDIT_SIGN_INTERVAL_MS", "200")
            .env("RUST_LOG", "warn");
        Daemon::spawn(
            if n == 1 { "broker-1" } else { "broker-2" },
            cmd,
            "lienthong broker listening on ",
        )
    }

    /// A demo register with the `--tls-dir` its compose service mounts.
    fn register(&self, kind: &'static str) -> Daemon {
        let tls_dir = self.host_path(kind, &self.compose.flag(kind, "--tls-dir"));
        let mut cmd = Command::new(bin());
        cmd.args(["demo-provider", kind, "--listen", "127.0.0.1:0", "--tls-dir"])
            .arg(tls_dir)
            .args(["--trust-domain", TRUST_DOMAIN, "--seed", &SEED.to_string()])
            .env("RUST_LOG", "warn");
        Daemon::spawn(kind, cmd, "register serving on ")
    }

    fn setup_federation(&self, broker_url: &str, civil: &Daemon, judicial: &Daemon) -> String {
        self.run_script(
            "setup-federation.sh",
            &[
                ("LIENTHONG_BROKER", broker_url.to_string()),
                ("LIENTHONG_CERTS", self.clients().display().to_string()),
                (
                    "SCHEMAS_DIR",
                    repo().join("crates/provider/schemas").display().to_string(),
                ),
                ("CIVIL_STATUS_URL", civil.url()),
                ("JUDICIAL_RECORDS_URL", judicial.url()),
            ],
        )
    }

    async fn client(&self, url: &str, member: &str) -> Clients {
        connect(url, &member_files(&self.clients(), member)).await.unwrap()
    }

    /// `lienthong audit verify` as the state auditor through `broker_url`.
    async fn verify(&self, broker_url: &str) -> (bool, String) {
        let args: Vec<String> = [
            "--broker",
            broker_url,
            "--certs",
            &self.clients().display().to_string(),
            "--as",
            STATE_AUDIT,
            "audit",
            "verify",
            "--state",
            &self.dir.path().join("verifier.json").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        tokio::task::spawn_blocking(move || run_cli(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[]))
            .await
            .unwrap()
    }

    /// Every file in the named volumes `service`'s container mounts, by
    /// path, with its contents.
    fn files_of(&self, service: &str) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return; // a volume nothing wrote into
            };
            for entry in entries {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.insert(path.clone(), std::fs::read(&path).unwrap());
                }
            }
        }
        let mut files = BTreeMap::new();
        for m in &self.compose.service(service).mounts {
            if let Some(volume) = m.named_volume() {
                walk(&self.volume(volume), &mut files);
            }
        }
        files
    }
}

/// The private keys a container may hold (file names in the volumes it
/// mounts), per compose service; `certs-init` makes them all.
const KEYS_OF: &[(&str, &[&str])] = &[
    // One identity for both replicas, and the shared subject secret.
    ("broker-1", &["broker.key", "subject-hmac.key"]),
    ("broker-2", &["broker.key", "subject-hmac.key"]),
    ("civil-status", &["civil-status.key"]),
    ("judicial-records", &["judicial-records.key"]),
    ("postgres", &["database.key"]),
    ("otel-collector", &["collector.key"]),
    // The admin, the registers' integrators (keys of their own, not the
    // registers'), and the demo clients a person acts as.
    (
        "federation-setup",
        &[
            "citizen-portal.key",
            "civil-status.key",
            "federation-admin.key",
            "hanoi-judicial-office.key",
            "hanoi-tax-dept.key",
            "judicial-records.key",
            "state-audit.key",
        ],
    ),
];

/// What init-certs.sh left is laid out so that each container holds its own
/// keys and nobody else's: a broken-into register holds neither the broker's
/// key nor the federation admin's, a broker no member's.
fn assert_each_container_holds_only_its_own_keys(site: &Site) {
    let services: Vec<&String> = site.compose.services.keys().collect();
    let mut holders: BTreeMap<Vec<u8>, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for service in services.iter().filter(|s| **s != "certs-init") {
        let expected = KEYS_OF
            .iter()
            .find(|(s, _)| s == service)
            .unwrap_or_else(|| panic!("compose service {service}: say in KEYS_OF which keys it may hold"))
            .1;
        let files = site.files_of(service);
        let keys: Vec<String> = files
            .keys()
            .filter(|p| p.extension().is_some_and(|e| e == "key"))
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(sorted, expected, "the keys {service}'s container mounts");
        for (path, bytes) in files.iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "key")) {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & 0o077, 0, "{} is for its owner only: {mode:o}", path.display());
            let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
            assert_eq!(dir_mode, 0o700, "{}'s directory", path.display());
            // The replicas are one identity.
            let role = service
                .strip_suffix("-1")
                .or(service.strip_suffix("-2"))
                .unwrap_or(service);
            holders.entry(bytes.clone()).or_default().insert(role);
        }
    }
    for (_, roles) in holders {
        assert_eq!(roles.len(), 1, "one key, in the containers of {roles:?}");
    }
    // The CA's directory keeps the CA key and nothing else that is secret.
    let mut at_ca: Vec<String> = std::fs::read_dir(site.ca_private())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    at_ca.sort();
    assert_eq!(at_ca, ["ca.key", "ca.pem"], "the CA keeps no member's key");
    let ca_volume = site
        .compose
        .service("certs-init")
        .mounts
        .iter()
        .find(|m| site.ca_private().starts_with(site.volume(&m.source)))
        .map(|m| m.source.clone())
        .unwrap();
    for service in services.iter().filter(|s| **s != "certs-init") {
        assert!(
            !site
                .compose
                .service(service)
                .mounts
                .iter()
                .any(|m| m.source == ca_volume),
            "{service} mounts the CA's private volume"
        );
    }
}

/// The collector's certificate, as init-certs.sh issued it into the volume
/// only the collector mounts, is one the brokers accept for the host name
/// broker.toml sends spans to: it chains to their `telemetry.otlp_ca`, names
/// that host, and is valid now for serving TLS.
fn assert_collector_certificate_is_valid_for_its_host(site: &Site) {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let pem = |path: PathBuf| -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .map(Result::unwrap)
            .collect()
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem(site.otlp_file(1, "otlp_ca")) {
        roots.add(ca).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap();
    let chain = pem(site.collector_file("cert_file"));
    let host = site.compose.collector_service();
    assert_eq!(host, "otel-collector");
    let verify = |name: &str| {
        verifier.verify_server_cert(
            &chain[0],
            &chain[1..],
            &ServerName::try_from(name.to_string()).unwrap(),
            &[],
            UnixTime::now(),
        )
    };
    verify(&host).unwrap_or_else(|e| panic!("the collector's certificate for {host}: {e}"));
    // The check is real: a host the certificate does not name is refused.
    assert!(verify("postgres").is_err());
}

/// One span export the stand-in collector received, with the client
/// certificate (DER) the exporter showed.
type Export = (ExportTraceServiceRequest, Option<Vec<u8>>);

/// The stand-in for the compose collector: OTLP/gRPC over TLS as
/// otel-collector.yaml configures it (`cert_file`, `key_file`, and
/// `client_ca_file`: a client certificate from that CA is required), with
/// the files from the collector's container mounts.
struct Collector(tokio::sync::mpsc::UnboundedSender<Export>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let peer = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        let _ = self.0.send((request.into_inner(), peer));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves the stand-in collector on a loopback port.
async fn tls_collector(site: &Site) -> (u16, tokio::sync::mpsc::UnboundedReceiver<Export>) {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |key| std::fs::read(site.collector_file(key)).unwrap();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read("cert_file"), read("key_file")))
        .client_ca_root(Certificate::from_pem(read("client_ca_file")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (port, rx)
}

/// `(size, entries)` that `audit verify` reported for `log_id`, if it verified.
fn verified(out: &str, log_id: &str) -> Option<(u64, u64)> {
    let line = out.lines().find(|l| l.starts_with(&format!("log {log_id}: OK")))?;
    let number_before = |word: &str| -> Option<u64> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let i = words.iter().position(|w| w.trim_end_matches(',') == word)?;
        words.get(i.checked_sub(1)?)?.trim_end_matches(',').parse().ok()
    };
    let size = line.split("of size ").nth(1)?.split_whitespace().next()?.parse().ok()?;
    Some((size, number_before("entries")?))
}

/// How one lookup of the client was answered.
#[derive(Clone)]
struct Answer {
    /// Index of the broker that answered.
    broker: usize,
    /// Index of the broker tried first.
    first: usize,
    /// Whether broker 2 had been killed when the lookup started.
    after_kill: bool,
    receipt: pb::Receipt,
}

/// One lookup, trying broker `first` and retrying on the other while a
/// broker is unreachable; returns the answering broker and the receipt.
async fn lookup_with_failover(brokers: &[Clients; 2], first: usize, subject: &str) -> (usize, pb::Receipt) {
    let mut last = None;
    for attempt in 0..6 {
        let b = (first + attempt) % 2;
        let mut request = tonic::Request::new(birth_lookup(subject, PURPOSE_CERTIFICATE));
        request.set_timeout(Duration::from_secs(5));
        match brokers[b].exchange().lookup(request).await {
            Ok(r) => return (b, r.into_inner().receipt.expect("a released record carries a receipt")),
            Err(s) if matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled) => {
                last = Some(s);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => panic!("lookup through broker {} failed for good: {s:?}", b + 1),
        }
    }
    panic!("no broker answered: {last:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_two_broker_processes_survive_a_kill_and_both_logs_verify() {
    let cluster = PgCluster::start().expect("PostgreSQL binaries (the test command installs them)");
    let mut site = Site::new(tempfile::tempdir().unwrap());
    // The brokers verify the database's certificate, as compose's do.
    site.database_url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        cluster.create_database().await.unwrap(),
        site.database_root_cert().display()
    );

    // Certificates and the shared subject secret, as the compose init service
    // makes them, each container's in the volumes it alone mounts; running it
    // again changes nothing.
    site.init_certs();
    cluster
        .enable_tls(
            &site.database_file("ssl_cert_file"),
            &site.database_file("ssl_key_file"),
        )
        .unwrap();
    assert_each_container_holds_only_its_own_keys(&site);
    let secret = |n| std::fs::read_to_string(site.data(n).join("subject-hmac.key")).unwrap();
    assert_eq!(secret(1).trim().len(), 64);
    assert_eq!(secret(1), secret(2), "replicas share one subject secret");
    let everything = || site.files_of("certs-init");
    let before = everything();
    assert!(before.len() > 20, "{:?}", before.keys());
    site.init_certs();
    assert!(
        before == everything(),
        "a second run keeps the CA, every certificate and key, and the secret"
    );
    assert_collector_certificate_is_valid_for_its_host(&site);
    let (otlp_port, mut exports) = tls_collector(&site).await;
    site.otlp_endpoint = format!("https://localhost:{otlp_port}");

    let mut broker1 = site.broker(1);
    let mut broker2 = site.broker(2);
    let civil = site.register("civil-status");
    let judicial = site.register("judicial-records");

    let out = site.setup_federation(&broker1.url(), &civil, &judicial);
    assert!(out.contains("federation set up"), "{out}");
    let again = site.setup_federation(&broker1.url(), &civil, &judicial);
    assert!(
        again.contains("member civil-status exists") && again.contains("active grant of judicial"),
        "a second run keeps what exists:\n{again}"
    );

    // The probe of the image and the manifests: only the CA, no client certificate.
    let ca = site.broker_file(2, "ca");
    let (ok, out) = exchange_health(&broker2.url(), &ca).await;
    assert!(ok && out.contains("SERVING"), "{out}");
    // The probe checks whom it talks to: a broker of another CA is not healthy.
    let foreign = lienthong_tls::CertificateAuthority::generate(TRUST_DOMAIN).unwrap();
    let foreign_ca = site.dir.path().join("foreign-ca.pem");
    std::fs::write(&foreign_ca, foreign.cert_pem()).unwrap();
    let (ok, out) = exchange_health(&broker2.url(), &foreign_ca).await;
    assert!(!ok && out.contains("certificate"), "{out}");

    let office = [
        site.client(&broker1.url(), JUDICIAL_OFFICE).await,
        site.client(&broker2.url(), JUDICIAL_OFFICE).await,
    ];
    // Broker 2 learns the grants created through broker 1 from the database.
    let o = office.clone();
    let subject = lienthong_provider::demo::citizen_national_id(SEED, 1);
    assert!(
        eventually(Duration::from_secs(5), async || o[1]
            .exchange()
            .lookup(birth_lookup(&subject, PURPOSE_CERTIFICATE))
            .await
            .is_ok())
        .await,
        "broker 2 serves the grants set up through broker 1"
    );

    // Four clients spread lookups over both brokers; broker 2 is killed
    // once 40 lookups have been answered.
    const TOTAL: u32 = 160;
    const KILL_AFTER: u32 = 40;
    let next = Arc::new(AtomicU32::new(0));
    let answered = Arc::new(AtomicU32::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let receipts = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (office, next, answered, killed, receipts) = (
            office.clone(),
            next.clone(),
            answered.clone(),
            killed.clone(),
            receipts.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= TOTAL {
                    break;
                }
                let subject = lienthong_provider::demo::citizen_national_id(SEED, 1000 + i);
                let after_kill = killed.load(Ordering::SeqCst);
                let first = (i % 2) as usize;
                let (broker, receipt) = lookup_with_failover(&office, first, &subject).await;
                receipts.lock().unwrap().push(Answer {
                    broker,
                    first,
                    after_kill,
                    receipt,
                });
                answered.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    let a = answered.clone();
    assert!(eventually(Duration::from_secs(20), async || a.load(Ordering::SeqCst) >= KILL_AFTER).await);
    tokio::task::block_in_place(|| broker2.kill());
    killed.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("every lookup was answered by one broker or the other");
    }
    let receipts = receipts.lock().unwrap().clone();
    assert_eq!(receipts.len(), TOTAL as usize);
    assert!(
        receipts.iter().any(|a| a.broker == 1),
        "broker 2 answered before it was killed"
    );
    assert!(
        receipts.iter().filter(|a| a.after_kill).all(|a| a.broker == 0),
        "after the kill only broker 1 answers"
    );
    let failed_over = receipts.iter().filter(|a| a.after_kill && a.first == 1).count();
    assert!(
        failed_over > 0,
        "lookups sent to the killed broker were retried on the other"
    );
    let log_of = |broker: usize| -> String {
        let ids: std::collections::BTreeSet<&str> = receipts
            .iter()
            .filter(|a| a.broker == broker)
            .map(|a| a.receipt.log_id.as_str())
            .collect();
        assert_eq!(ids.len(), 1, "broker {} writes one log", broker + 1);
        ids.into_iter().next().unwrap().to_string()
    };
    let (log1, log2) = (log_of(0), log_of(1));
    assert_ne!(log1, log2, "each replica keeps its own log");

    let (ok, out) = exchange_health(&broker2.url(), &ca).await;
    assert!(!ok, "a killed broker is reported unhealthy: {out}");

    // Through the surviving broker, both logs verify: the killed one up to
    // the last tree head it signed.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (ok, out) = site.verify(&broker1.url()).await;
    assert!(ok, "{out}");
    assert!(verified(&out, &log1).is_some(), "{out}");
    let (killed_head, _) = verified(&out, &log2).unwrap_or_else(|| panic!("{out}"));

    // Every lookup that released data is in the log of the broker that
    // answered, as the receipt says, even those broker 2 answered just
    // before it was killed.
    let auditor = site.client(&broker1.url(), STATE_AUDIT).await;
    let mut stored: HashMap<(String, u64), Vec<u8>> = HashMap::new();
    for log in [&log1, &log2] {
        let mut token = String::new();
        loop {
            let page = auditor
                .audit()
                .query_entries(pb::QueryEntriesRequest {
                    filter: Some(pb::EntryFilter {
                        log_id: log.clone(),
                        ..Default::default()
                    }),
                    page_size: 1000,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner();
            for e in page.entries {
                stored.insert((log.clone(), e.sequence), e.leaf_hash);
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
    }
    let mut per_log = BTreeMap::<&str, u64>::new();
    for r in receipts.iter().map(|a| &a.receipt) {
        assert_eq!(
            stored.get(&(r.log_id.clone(), r.sequence)),
            Some(&r.leaf_hash),
            "released lookup {}#{} is logged",
            r.log_id,
            r.sequence
        );
        *per_log.entry(r.log_id.as_str()).or_default() += 1;
    }
    assert_eq!(per_log.len(), 2, "{per_log:?}");
    let log2_size = stored.keys().filter(|(log, _)| *log == log2).count() as u64;

    // Broker 2 comes back on its data directory (same key, same log) and
    // signs a head over everything it logged before the kill.
    let mut restarted = site.broker(2);
    let head_of_log2 = async || {
        auditor
            .audit()
            .get_signed_tree_head(pb::GetSignedTreeHeadRequest { log_id: log2.clone() })
            .await
            .map(|h| h.into_inner().tree_size)
            .unwrap_or(0)
    };
    assert!(
        eventually(Duration::from_secs(10), async || head_of_log2().await == log2_size).await,
        "the restarted broker signs a head over its whole log ({log2_size} entries)"
    );
    assert!(tokio::task::block_in_place(|| restarted.terminate()).success());
    let (ok, out) = site.verify(&broker1.url()).await;
    assert!(ok, "the restarted broker extended its log consistently: {out}");
    let (head, entries) = verified(&out, &log2).unwrap_or_else(|| panic!("{out}"));
    assert!(head >= killed_head && head >= log2_size, "{out}");
    assert_eq!(
        head, entries,
        "every entry of the killed broker's log is now signed: {out}"
    );
    for r in receipts.iter().map(|a| &a.receipt).filter(|r| r.log_id == log2) {
        assert!(
            r.sequence < head,
            "lookup {} is covered by broker 2's signed head",
            r.sequence
        );
    }

    assert!(tokio::task::block_in_place(|| broker1.terminate()).success());

    // The brokers' spans reached the collector over TLS, each export from a
    // client showing the brokers' certificate (broker.toml's otlp_cert).
    let broker_cert = rustls::pki_types::CertificateDer::from_pem_file(site.otlp_file(1, "otlp_cert"))
        .unwrap()
        .as_ref()
        .to_vec();
    let mut spans = Vec::new();
    while let Ok((export, peer)) = exports.try_recv() {
        assert_eq!(
            peer.as_ref(),
            Some(&broker_cert),
            "spans from a client without the brokers' certificate"
        );
        for resource in &export.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(|kv| format!("{:?}", kv.value));
            assert!(
                service.as_ref().is_some_and(|s| s.contains("lienthong-broker")),
                "{service:?}"
            );
            spans.extend(
                resource
                    .scope_spans
                    .iter()
                    .flat_map(|s| &s.spans)
                    .map(|s| s.name.clone()),
            );
        }
    }
    assert!(
        spans.iter().any(|name| name == "lienthong.v1.Exchange/Lookup"),
        "the lookups' spans reached the collector: {} spans",
        spans.len()
    );
}
