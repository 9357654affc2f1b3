//! Broker configuration: defaults, then a TOML file, then `LIENTHONG_*`
//! environment variables, then [`Config::validate`].
//!
//! Every key of the file can be overridden by an environment variable named
//! after its path: `relay.provider_timeout_ms` is `LIENTHONG_RELAY_PROVIDER_TIMEOUT_MS`,
//! `listen` is `LIENTHONG_LISTEN`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "LIENTHONG_";

/// Why the configuration could not be used. Always names the key and where it
/// came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// toml's message, which names the key and line.
        message: String,
    },
    /// An environment override has a value of the wrong type.
    #[error("environment variable {var}: {message}")]
    Env {
        /// Variable.
        var: String,
        /// What is wrong.
        message: String,
    },
    /// A value parsed but is unusable.
    #[error("config key `{key}` (from {source_name}): {message}")]
    Invalid {
        /// Dotted key.
        key: String,
        /// File path or "defaults"/"environment".
        source_name: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole broker configuration.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC listen address (mutual TLS), e.g. `0.0.0.0:7443`.
    pub listen: String,
    /// Directory for the SQLite database and the audit keys.
    pub data_dir: PathBuf,
    /// `sqlite://...` or `postgres://...`; empty means `sqlite://<data_dir>/lienthong.db`.
    pub database_url: String,
    /// Allow a PostgreSQL server on another host without verified TLS
    /// (`sslmode` other than `verify-full`/`verify-ca`): only where the
    /// network path is protected otherwise. Off: such a URL is refused.
    pub allow_unverified_database: bool,
    /// SPIFFE trust domain of the federation.
    pub trust_domain: String,
    /// Member id of the first administrator, created on first start.
    pub bootstrap_admin: String,
    /// Certificates.
    pub tls: TlsConfig,
    /// Limits.
    pub limits: Limits,
    /// Relay to providers.
    pub relay: RelayConfig,
    /// Audit log.
    pub audit: AuditSection,
    /// Logs, traces and metrics.
    pub telemetry: Telemetry,
}

// By hand, so that a debug print never shows the database password.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Config {
            listen,
            data_dir,
            database_url,
            allow_unverified_database,
            trust_domain,
            bootstrap_admin,
            tls,
            limits,
            relay,
            audit,
            telemetry,
        } = self;
        f.debug_struct("Config")
            .field("listen", listen)
            .field("data_dir", data_dir)
            .field("database_url", &lienthong_store::redact_url(database_url))
            .field("allow_unverified_database", allow_unverified_database)
            .field("trust_domain", trust_domain)
            .field("bootstrap_admin", bootstrap_admin)
            .field("tls", tls)
            .field("limits", limits)
            .field("relay", relay)
            .field("audit", audit)
            .field("telemetry", telemetry)
            .finish()
    }
}

/// Certificate files (PEM).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Federation CA certificate: trusted for clients and providers.
    pub ca: PathBuf,
    /// Broker certificate chain.
    pub cert: PathBuf,
    /// Broker private key.
    pub key: PathBuf,
    /// Concurrent TLS handshakes at most.
    pub max_concurrent_handshakes: usize,
    /// Concurrent TLS handshakes from one IP address at most: a connection
    /// past it is closed at once, so that one host cannot hold every slot.
    /// Raise it when several agencies reach the broker through one NAT
    /// address.
    pub max_handshakes_per_address: usize,
    /// Handshake timeout.
    pub handshake_timeout_ms: u64,
    /// Connections open at once whose client presented no certificate the
    /// broker accepts (health probes, reflection); one past it is closed
    /// after its handshake.
    pub max_unauthenticated_connections: usize,
    /// How long such a connection stays open after its handshake.
    pub unauthenticated_connection_ms: u64,
    /// How often the broker looks at `ca`, `cert` and `key` for new contents
    /// and, when they changed and pass the start-up checks, serves them from
    /// the next connection on; 0: only on SIGHUP.
    pub reload_check_ms: u64,
}

/// The least `tls.reload_check_ms` other than 0.
const MIN_RELOAD_CHECK_MS: u64 = 100;

/// Size and rate limits.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest schema accepted at registration, bytes.
    pub max_schema_bytes: usize,
    /// Deepest JSON nesting accepted in a schema.
    pub max_schema_depth: usize,
    /// Largest gRPC message, bytes.
    pub max_message_bytes: usize,
    /// Largest query JSON, bytes.
    pub max_query_bytes: usize,
    /// Most items in one Collect.
    pub max_collect_items: usize,
    /// Lookups and collects processed at once; further ones wait their turn
    /// (within their deadline) before anything is allocated for them.
    pub max_concurrent_exchanges: usize,
    /// Pooled database connections.
    pub database_max_connections: u32,
    /// Wait for a pooled connection before failing closed.
    pub database_acquire_timeout_ms: u64,
    /// Grace period for in-flight requests on shutdown.
    pub shutdown_grace_ms: u64,
    /// Longest this replica serves lookups from an authorization snapshot it
    /// knows is behind the database (a change it cannot load: revoked grants,
    /// disabled members and revoked certificates would still be honoured);
    /// past it, lookups are refused with `UNAVAILABLE` until a reload
    /// succeeds, and the Exchange reports `NOT_SERVING`.
    pub max_snapshot_lag_ms: u64,
    /// Citizens' histories (`Audit.SubjectHistory` pages) one member may
    /// read a minute from this replica: a portal or auditor cannot walk the
    /// national id space at will.
    pub subject_history_per_minute: u32,
}

/// How the broker calls providers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Default timeout of a provider call, capped further by the consumer's deadline.
    pub provider_timeout_ms: u64,
    /// Per record type timeouts overriding `provider_timeout_ms`.
    pub record_type_timeouts_ms: BTreeMap<String, u64>,
    /// Connect timeout to a provider endpoint.
    pub connect_timeout_ms: u64,
    /// Concurrent calls to one provider at most; further calls wait (up to their deadline).
    pub provider_concurrency: usize,
    /// Attempts after the first one, for `UNAVAILABLE` answers only.
    pub max_retries: u32,
    /// Retries allowed as a percentage of calls (retry budget).
    pub retry_budget_percent: u32,
    /// Consecutive failures that open an endpoint's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker waits before letting a probe through.
    pub breaker_open_ms: u64,
}

/// Audit log settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSection {
    /// Sign a tree head this often when the log grew.
    pub sign_interval_ms: u64,
    /// Most entries per group commit.
    pub max_batch: usize,
    /// Longest a lookup waits for its audit entry to be durable, or for the
    /// database's count of a rate limit the replicas share, before it fails
    /// with `UNAVAILABLE` (a database that hangs rather than refuses).
    pub commit_timeout_ms: u64,
}

/// Observability.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// `text` or `json`.
    pub log_format: String,
    /// `RUST_LOG`-style filter, e.g. `info,lienthong_broker=debug`.
    pub log_filter: String,
    /// OTLP/gRPC collector, e.g. `https://collector.example:4317` (verified
    /// against `otlp_ca`) or `http://127.0.0.1:4317`; empty: no export.
    pub otlp_endpoint: String,
    /// CA certificates (PEM) the collector's certificate must chain to;
    /// required with an `https` endpoint.
    pub otlp_ca: PathBuf,
    /// Client certificate chain (PEM) for a collector that requires mutual
    /// TLS; empty: none.
    pub otlp_cert: PathBuf,
    /// Private key (PEM) of `otlp_cert`.
    pub otlp_key: PathBuf,
    /// Prometheus `/metrics` listener, e.g. `127.0.0.1:9464`, or a bare port
    /// such as `9464` for loopback; empty: off. Plain HTTP unless
    /// `metrics_client_ca` is set.
    pub metrics_listen: String,
    /// CA certificates (PEM) whose certificates may scrape `/metrics`: when
    /// set, the listener serves HTTPS with the broker's `tls.cert`/`tls.key`
    /// and refuses, in the TLS handshake, a scraper without a certificate
    /// chaining to one of them. Any such certificate may scrape, federation
    /// member or not: use a CA of its own for monitoring. Empty: plain HTTP.
    pub metrics_client_ca: PathBuf,
}

impl Telemetry {
    /// Whether `/metrics` is served over TLS with required client certificates.
    pub fn metrics_tls(&self) -> bool {
        !self.metrics_client_ca.as_os_str().is_empty()
    }

    /// The metrics listener address, `None` when off. A bare port means loopback.
    pub fn metrics_addr(&self) -> Option<Result<SocketAddr, String>> {
        let text = self.metrics_listen.trim();
        if text.is_empty() {
            return None;
        }
        if let Ok(port) = text.trim_start_matches(':').parse::<u16>() {
            return Some(Ok(SocketAddr::from(([127, 0, 0, 1], port))));
        }
        Some(
            text.parse::<SocketAddr>()
                .map_err(|e| format!("{text:?} is not an address like 127.0.0.1:9464 or a port ({e})")),
        )
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7443".into(),
            data_dir: PathBuf::from("lienthong-data"),
            database_url: String::new(),
            allow_unverified_database: false,
            trust_domain: "lienthong.gov.vn".into(),
            bootstrap_admin: String::new(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            relay: RelayConfig::default(),
            audit: AuditSection::default(),
            telemetry: Telemetry::default(),
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            ca: PathBuf::from("certs/ca.pem"),
            cert: PathBuf::from("certs/broker.pem"),
            key: PathBuf::from("certs/broker.key"),
            max_concurrent_handshakes: 256,
            max_handshakes_per_address: 32,
            handshake_timeout_ms: 10_000,
            max_unauthenticated_connections: 64,
            unauthenticated_connection_ms: 10_000,
            reload_check_ms: 60_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_schema_bytes: 256 * 1024,
            max_schema_depth: 32,
            max_message_bytes: 4 * 1024 * 1024,
            max_query_bytes: 16 * 1024,
            max_collect_items: 16,
            max_concurrent_exchanges: 256,
            database_max_connections: 16,
            database_acquire_timeout_ms: 3_000,
            shutdown_grace_ms: 10_000,
            // Above a reload's usual time and a notification's delay (well
            // under a second), short enough that a revocation is not ignored
            // for long by a replica that cannot load it.
            max_snapshot_lag_ms: 5_000,
            // Ten pages a second per portal: far above one citizen paging
            // through their own history, far below enumerating ids.
            subject_history_per_minute: 600,
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            provider_timeout_ms: 5_000,
            record_type_timeouts_ms: BTreeMap::new(),
            connect_timeout_ms: 2_000,
            provider_concurrency: 1024,
            max_retries: 2,
            retry_budget_percent: 20,
            breaker_failures: 5,
            breaker_open_ms: 5_000,
        }
    }
}

impl Default for AuditSection {
    fn default() -> Self {
        AuditSection {
            sign_interval_ms: 1_000,
            max_batch: 512,
            commit_timeout_ms: 10_000,
        }
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            log_format: "text".into(),
            log_filter: "info".into(),
            otlp_endpoint: String::new(),
            otlp_ca: PathBuf::new(),
            otlp_cert: PathBuf::new(),
            otlp_key: PathBuf::new(),
            metrics_listen: String::new(),
            metrics_client_ca: PathBuf::new(),
        }
    }
}

impl Config {
    /// The process's environment as [`Config::load`] takes it. A variable
    /// that is not UTF-8 belongs to another program and is skipped (reading
    /// it as text would abort), unless it is one of ours: that one is kept,
    /// its bad bytes replaced, so that validation names it.
    pub fn environment() -> Vec<(String, String)> {
        std::env::vars_os()
            .filter_map(|(key, value)| {
                let key = key.into_string().ok()?;
                let value = match value.into_string() {
                    Ok(value) => value,
                    Err(raw) if key.starts_with(ENV_PREFIX) => raw.to_string_lossy().into_owned(),
                    Err(_) => return None,
                };
                Some((key, value))
            })
            .collect()
    }

    /// Loads `path` (if given) over the defaults, applies environment overrides
    /// from `env`, resolves relative paths against the file's directory and
    /// validates.
    pub fn load(path: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let (mut tree, source_name) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                let tree: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: parse_message(&text, &e),
                })?;
                (tree, path.display().to_string())
            }
            None => (toml::Table::new(), "defaults".to_string()),
        };
        let from_env = apply_env(&mut tree, env)?;
        let mut config: Config = Config::deserialize(toml::Value::Table(tree)).map_err(|e| {
            let message = e.to_string();
            // A value of the wrong range or shape set by a variable is named
            // by the variable: it is not in the file.
            match from_env.iter().find(|(key, _)| message.contains(&format!("`{key}`"))) {
                Some((_, var)) => ConfigError::Env {
                    var: var.clone(),
                    message: message.trim_end().to_owned(),
                },
                None => ConfigError::Parse {
                    path: path
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| PathBuf::from("<environment>")),
                    message,
                },
            }
        })?;
        if let Some(dir) = path.and_then(Path::parent) {
            config.resolve_relative(dir);
        }
        // A bad value set by a variable is named by the variable, not the file.
        config.validate(&source_name).map_err(|e| match e {
            ConfigError::Invalid { key, message, .. } if from_env.contains_key(&key) => ConfigError::Invalid {
                source_name: format!("environment variable {}", from_env[&key]),
                key,
                message,
            },
            e => e,
        })?;
        Ok(config)
    }

    /// Makes relative file paths relative to the config file's directory, so a
    /// config works wherever the broker is started from.
    fn resolve_relative(&mut self, base: &Path) {
        for p in [
            &mut self.data_dir,
            &mut self.tls.ca,
            &mut self.tls.cert,
            &mut self.tls.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        // Optional files: empty stays empty (off), not the config's directory.
        for p in [
            &mut self.telemetry.otlp_ca,
            &mut self.telemetry.otlp_cert,
            &mut self.telemetry.otlp_key,
            &mut self.telemetry.metrics_client_ca,
        ] {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        }
        // A SQLite file named relative to wherever the broker happened to be
        // started would be a second, empty database, whose audit log the
        // next start from the usual place refuses as rolled back.
        // (`postgres://` parameters such as `sslrootcert` are libpq's, read
        // as libpq reads them.)
        let sqlite_file = self
            .database_url
            .strip_prefix("sqlite://")
            .or_else(|| self.database_url.strip_prefix("sqlite:"));
        if let Some(file) = sqlite_file
            && !file.is_empty()
            && !file.starts_with(':')
            && Path::new(file).is_relative()
        {
            self.database_url = format!("sqlite://{}", base.join(file).display());
        }
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            source_name: source_name.into(),
            message,
        };
        self.listen.parse::<SocketAddr>().map_err(|e| {
            invalid(
                "listen",
                format!("{:?} is not an address like 127.0.0.1:7443 ({e})", self.listen),
            )
        })?;
        // The same rule as the certificates `lienthong certs init` makes.
        if !lienthong_tls::is_valid_trust_domain(&self.trust_domain) {
            return Err(invalid(
                "trust_domain",
                format!(
                    "{:?} is not a trust domain (lowercase letters, digits, '.', '-', '_')",
                    self.trust_domain
                ),
            ));
        }
        if !self.bootstrap_admin.is_empty() {
            lienthong_core::MemberId::new(self.bootstrap_admin.clone())
                .map_err(|e| invalid("bootstrap_admin", e.to_string()))?;
        }
        for (key, path) in [
            ("tls.ca", &self.tls.ca),
            ("tls.cert", &self.tls.cert),
            ("tls.key", &self.tls.key),
        ] {
            if !path.is_file() {
                return Err(invalid(key, format!("file {} does not exist", path.display())));
            }
        }
        let known_scheme = ["sqlite:", "postgres://", "postgresql://"]
            .iter()
            .any(|scheme| self.database_url.starts_with(scheme));
        if !self.database_url.is_empty() && !known_scheme {
            return Err(invalid("database_url", "must start with sqlite: or postgres://".into()));
        }
        if !["text", "json"].contains(&self.telemetry.log_format.as_str()) {
            return Err(invalid(
                "telemetry.log_format",
                format!("{:?} is not `text` or `json`", self.telemetry.log_format),
            ));
        }
        if let Some(Err(e)) = self.telemetry.metrics_addr() {
            return Err(invalid("telemetry.metrics_listen", e));
        }
        // Parsed here, not at the listener's start, so that a wrong file is
        // named by its key before anything runs.
        if self.telemetry.metrics_tls() {
            lienthong_tls::read_trust_anchors(&self.telemetry.metrics_client_ca)
                .map_err(|e| invalid("telemetry.metrics_client_ca", e.to_string()))?;
        }
        crate::telemetry::check_log_filter(&self.telemetry.log_filter).map_err(|e| {
            invalid(
                "telemetry.log_filter",
                format!("{:?} is not a RUST_LOG-style filter: {e}", self.telemetry.log_filter),
            )
        })?;
        crate::telemetry::check_otlp(&crate::telemetry::TelemetryOptions::from_config(&self.telemetry))
            .map_err(|e| invalid(e.key, e.message))?;
        let positive = [
            ("limits.max_schema_bytes", self.limits.max_schema_bytes as u64),
            ("limits.max_schema_depth", self.limits.max_schema_depth as u64),
            ("limits.max_message_bytes", self.limits.max_message_bytes as u64),
            ("limits.max_query_bytes", self.limits.max_query_bytes as u64),
            ("limits.max_collect_items", self.limits.max_collect_items as u64),
            (
                "limits.max_concurrent_exchanges",
                self.limits.max_concurrent_exchanges as u64,
            ),
            (
                "limits.database_max_connections",
                self.limits.database_max_connections as u64,
            ),
            // A timeout of 0 elapses at once: no handshake, dial or
            // database connection could ever finish.
            ("tls.handshake_timeout_ms", self.tls.handshake_timeout_ms),
            (
                "tls.max_unauthenticated_connections",
                self.tls.max_unauthenticated_connections as u64,
            ),
            // 0 would close a health probe's connection before its answer.
            (
                "tls.unauthenticated_connection_ms",
                self.tls.unauthenticated_connection_ms,
            ),
            ("relay.connect_timeout_ms", self.relay.connect_timeout_ms),
            (
                "limits.database_acquire_timeout_ms",
                self.limits.database_acquire_timeout_ms,
            ),
            ("relay.provider_timeout_ms", self.relay.provider_timeout_ms),
            // 0 would refuse every lookup after any reload that fails once.
            ("limits.max_snapshot_lag_ms", self.limits.max_snapshot_lag_ms),
            // 0 would refuse every history: there is no "unlimited".
            (
                "limits.subject_history_per_minute",
                u64::from(self.limits.subject_history_per_minute),
            ),
            ("relay.provider_concurrency", self.relay.provider_concurrency as u64),
            ("relay.breaker_failures", self.relay.breaker_failures as u64),
            ("audit.sign_interval_ms", self.audit.sign_interval_ms),
            ("audit.max_batch", self.audit.max_batch as u64),
            ("audit.commit_timeout_ms", self.audit.commit_timeout_ms),
            (
                "tls.max_concurrent_handshakes",
                self.tls.max_concurrent_handshakes as u64,
            ),
            (
                "tls.max_handshakes_per_address",
                self.tls.max_handshakes_per_address as u64,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0".into()));
            }
        }
        // Each look reads and hashes the three files: a few a second at most.
        if (1..MIN_RELOAD_CHECK_MS).contains(&self.tls.reload_check_ms) {
            return Err(invalid(
                "tls.reload_check_ms",
                format!("must be 0 (only on SIGHUP) or at least {MIN_RELOAD_CHECK_MS}"),
            ));
        }
        for (record_type, ms) in &self.relay.record_type_timeouts_ms {
            if *ms == 0 {
                return Err(invalid(
                    &format!("relay.record_type_timeouts_ms.{record_type}"),
                    "must be greater than 0".into(),
                ));
            }
        }
        Ok(())
    }

    /// The listen address (validated).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|e| ConfigError::Invalid {
            key: "listen".into(),
            source_name: "config".into(),
            message: format!("{e}"),
        })
    }

    /// The database URL, defaulting to SQLite in the data directory.
    pub fn database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}", self.data_dir.join("lienthong.db").display())
        } else {
            self.database_url.clone()
        }
    }

    /// Timeout of a provider call for one record type.
    pub fn provider_timeout(&self, record_type: &str) -> Duration {
        Duration::from_millis(
            self.relay
                .record_type_timeouts_ms
                .get(record_type)
                .copied()
                .unwrap_or(self.relay.provider_timeout_ms),
        )
    }

    /// A commented example file, as `lienthong serve --print-config` shows it.
    pub fn example_toml() -> String {
        toml::to_string_pretty(&Config::default()).unwrap_or_default()
    }
}

/// Where and why a config file is not TOML, without toml's quote of the
/// line: that line may hold a secret (a `database_url` with a password whose
/// backslash broke the string), and the message reaches the log.
fn parse_message(text: &str, error: &toml::de::Error) -> String {
    let Some(span) = error.span() else {
        return error.message().to_owned();
    };
    let before = text.get(..span.start).unwrap_or_default();
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |i| before.len() - i - 1) + 1;
    format!("line {line}, column {column}: {}", error.message().trim_end())
}

/// Variables of the `lienthong` command line (and of the deploy files), not
/// broker settings: `serve` ignores them.
const NOT_SETTINGS: &[&str] = &["BROKER", "CERTS", "AS", "CA", "CERT", "KEY", "LOG_FORMAT"];

/// Why a `LIENTHONG_*` variable that names no key is refused, or `None` when
/// it is not meant as a setting at all. A variable inside a section
/// (`LIENTHONG_TELEMETRY_…`) or one edit or two away from a key is a setting
/// mistyped: ignored, it would leave the default in force, and a typo in
/// `…_METRICS_CLIENT_CA` would leave `/metrics` open. Anything else
/// (`LIENTHONG_DB_PASSWORD`, `LIENTHONG_IMAGE` in the compose file) belongs
/// to another program.
fn unknown_setting(rest: &str, known: &[(String, Vec<String>, toml::Value)], maps: &[String]) -> Option<String> {
    if NOT_SETTINGS.contains(&rest) || service_link(rest) {
        return None;
    }
    if let Some(map) = maps
        .iter()
        .find(|m| rest == m.as_str() || rest.starts_with(&format!("{m}_")))
    {
        return Some(format!(
            "`{}` is a table keyed by record type and cannot be set from the environment; set it in the config file",
            map.to_lowercase().replacen('_', ".", 1)
        ));
    }
    let closest = known
        .iter()
        .map(|(name, path, _)| (strsim::levenshtein(name, rest), name, path))
        .min_by_key(|(distance, _, _)| *distance);
    let in_section = known
        .iter()
        .any(|(_, path, _)| path.len() > 1 && rest.starts_with(&format!("{}_", path[0].to_uppercase())));
    match closest {
        Some((distance, name, path)) if distance <= 2 || in_section => Some(format!(
            "no config key is named by this variable; did you mean {ENV_PREFIX}{name} (`{}`)? \
             `lienthong serve --print-default-config` lists every key",
            path.join(".")
        )),
        _ => None,
    }
}

/// Whether `rest` (after `LIENTHONG_`) is one of the variables Kubernetes
/// sets for each Service of a namespace (`<NAME>_SERVICE_HOST`,
/// `<NAME>_SERVICE_PORT[_<PORT NAME>]`, `<NAME>_PORT[_<N>_<PROTO>[_ADDR|_PORT|_PROTO]]`):
/// a Service named `lienthong-audit` is no mistyped setting.
fn service_link(rest: &str) -> bool {
    if rest.ends_with("_SERVICE_HOST") || rest.contains("_SERVICE_PORT") {
        return true;
    }
    let Some(at) = rest.rfind("_PORT") else {
        return false;
    };
    let after = &rest[at + "_PORT".len()..];
    if after.is_empty() {
        return true;
    }
    let parts: Vec<&str> = after.split('_').skip(1).collect();
    match parts.as_slice() {
        [port, proto, rest @ ..] if rest.len() <= 1 => {
            port.bytes().all(|b| b.is_ascii_digit())
                && matches!(*proto, "TCP" | "UDP" | "SCTP")
                && matches!(rest, [] | ["ADDR" | "PORT" | "PROTO"])
        }
        _ => false,
    }
}

/// Applies `LIENTHONG_*` overrides to the parsed table. The type of each value
/// follows the default's type, so `LIENTHONG_LIMITS_MAX_COLLECT_ITEMS=8` is an
/// integer and `LIENTHONG_LISTEN=0.0.0.0:7443` a string.
/// Returns the variables applied, by the dotted key each set.
fn apply_env(
    tree: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut applied = BTreeMap::new();
    let defaults = match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    };
    let mut known: Vec<(String, Vec<String>, toml::Value)> = Vec::new();
    let mut maps = Vec::new();
    collect_leaves(&defaults, &mut Vec::new(), &mut known, &mut maps);
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let Some((_, path, default)) = known.iter().find(|(name, _, _)| name == rest) else {
            if let Some(message) = unknown_setting(rest, &known, &maps) {
                return Err(ConfigError::Env { var, message });
            }
            continue;
        };
        let value = match default {
            toml::Value::Integer(_) => {
                raw.trim()
                    .parse::<i64>()
                    .map(toml::Value::Integer)
                    .map_err(|_| ConfigError::Env {
                        var: var.clone(),
                        message: format!("{raw:?} is not an integer"),
                    })?
            }
            toml::Value::Boolean(_) => {
                raw.trim()
                    .parse::<bool>()
                    .map(toml::Value::Boolean)
                    .map_err(|_| ConfigError::Env {
                        var: var.clone(),
                        message: format!("{raw:?} is not true or false"),
                    })?
            }
            _ => toml::Value::String(raw),
        };
        let mut table = &mut *tree;
        for key in &path[..path.len() - 1] {
            let entry = table
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match entry {
                toml::Value::Table(t) => table = t,
                _ => {
                    return Err(ConfigError::Env {
                        var: var.clone(),
                        message: format!("`{key}` is not a table in the config file"),
                    });
                }
            }
        }
        if let Some(last) = path.last() {
            table.insert(last.clone(), value);
        }
        applied.insert(path.join("."), var);
    }
    Ok(applied)
}

/// Every settable leaf of `table` as (variable suffix, key path, default),
/// and in `maps` the variable suffixes of the tables keyed by user data.
fn collect_leaves(
    table: &toml::Table,
    prefix: &mut Vec<String>,
    out: &mut Vec<(String, Vec<String>, toml::Value)>,
    maps: &mut Vec<String>,
) {
    for (key, value) in table {
        prefix.push(key.clone());
        match value {
            toml::Value::Table(t) if !t.is_empty() => collect_leaves(t, prefix, out, maps),
            // Maps keyed by user data (record type timeouts) are not overridable by env.
            toml::Value::Table(_) => maps.push(prefix.join("_").to_uppercase()),
            other => out.push((prefix.join("_").to_uppercase(), prefix.clone(), other.clone())),
        }
        prefix.pop();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tls_files(dir: &Path) -> String {
        for f in ["ca.pem", "broker.pem", "broker.key"] {
            write(dir, f, "x");
        }
        "[tls]\nca = \"ca.pem\"\ncert = \"broker.pem\"\nkey = \"broker.key\"\n".into()
    }

    #[test]
    fn a_relative_sqlite_file_is_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_files(dir.path());
        let d = dir.path().display();
        for (url, want) in [
            ("sqlite://rel.db", format!("sqlite://{d}/rel.db")),
            ("sqlite:data/x.db", format!("sqlite://{d}/data/x.db")),
            ("sqlite:///abs/x.db", "sqlite:///abs/x.db".to_string()),
            ("sqlite::memory:", "sqlite::memory:".to_string()),
            (
                "postgres://u@db/x?sslmode=disable",
                "postgres://u@db/x?sslmode=disable".to_string(),
            ),
        ] {
            let p = write(dir.path(), "db.toml", &format!("database_url = {url:?}\n{tls}"));
            let config = Config::load(Some(&p), vec![]).unwrap();
            assert_eq!(config.database_url, want, "{url}");
        }
    }

    #[test]
    fn telemetry_keys_are_checked_and_a_bare_metrics_port_is_loopback() {
        let mut t = Telemetry::default();
        assert!(t.metrics_addr().is_none(), "metrics are off by default");
        t.metrics_listen = "9464".into();
        assert_eq!(
            t.metrics_addr().unwrap().unwrap(),
            "127.0.0.1:9464".parse::<SocketAddr>().unwrap()
        );
        t.metrics_listen = "0.0.0.0:9464".into();
        assert_eq!(t.metrics_addr().unwrap().unwrap().port(), 9464);
        t.metrics_listen = "everywhere".into();
        assert!(t.metrics_addr().unwrap().is_err());

        let dir = tempfile::tempdir().unwrap();
        let tls = tls_files(dir.path());
        for (extra, key) in [
            (
                "[telemetry]\nmetrics_listen = \"nowhere\"\n",
                "telemetry.metrics_listen",
            ),
            (
                "[telemetry]\nlog_filter = \"info,lienthong=loud\"\n",
                "telemetry.log_filter",
            ),
            (
                "[telemetry]\notlp_endpoint = \"127.0.0.1:4317\"\n",
                "telemetry.otlp_endpoint",
            ),
        ] {
            let p = write(dir.path(), "t.toml", &format!("{tls}{extra}"));
            let e = Config::load(Some(&p), vec![]).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        let p = write(
            dir.path(),
            "ok.toml",
            &format!("{tls}[telemetry]\notlp_endpoint = \"http://127.0.0.1:4317\"\nmetrics_listen = \"9464\"\n"),
        );
        assert!(Config::load(Some(&p), vec![]).is_ok());
    }

    /// Spans name who read what and why: an https endpoint needs the CA its
    /// certificate is checked against, a client certificate comes with its
    /// key, TLS files next to a plain http endpoint are refused rather than
    /// ignored, and credentials in the URL are refused without being echoed.
    #[test]
    fn otlp_tls_keys_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_files(dir.path());
        for f in ["collector-ca.pem", "otlp.pem", "otlp.key"] {
            write(dir.path(), f, "x");
        }
        let https = "[telemetry]\notlp_endpoint = \"https://collector.example:4317\"\n";
        let p = write(
            dir.path(),
            "ok.toml",
            &format!("{tls}{https}otlp_ca = \"collector-ca.pem\"\n"),
        );
        let c = Config::load(Some(&p), vec![]).unwrap();
        assert_eq!(c.telemetry.otlp_ca, dir.path().join("collector-ca.pem"));
        assert!(
            c.telemetry.otlp_cert.as_os_str().is_empty(),
            "no client certificate: empty, not the directory"
        );
        let p = write(
            dir.path(),
            "mtls.toml",
            &format!("{tls}{https}otlp_ca = \"collector-ca.pem\"\notlp_cert = \"otlp.pem\"\notlp_key = \"otlp.key\"\n"),
        );
        Config::load(Some(&p), vec![]).unwrap();

        for (extra, key, says) in [
            ("", "telemetry.otlp_ca", "CA"),
            (
                "otlp_ca = \"gone.pem\"\n",
                "telemetry.otlp_ca",
                "gone.pem does not exist",
            ),
            (
                "otlp_ca = \"collector-ca.pem\"\notlp_cert = \"otlp.pem\"\n",
                "telemetry.otlp_key",
                "private key",
            ),
            (
                "otlp_ca = \"collector-ca.pem\"\notlp_key = \"otlp.key\"\n",
                "telemetry.otlp_cert",
                "certificate",
            ),
        ] {
            let p = write(dir.path(), "t.toml", &format!("{tls}{https}{extra}"));
            let e = Config::load(Some(&p), vec![]).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{extra}: {e}");
        }
        let p = write(
            dir.path(),
            "clear.toml",
            &format!("{tls}[telemetry]\notlp_endpoint = \"http://10.0.0.9:4317\"\notlp_ca = \"collector-ca.pem\"\n"),
        );
        let e = Config::load(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("telemetry.otlp_ca") && e.contains("https://"), "{e}");
        let p = write(
            dir.path(),
            "creds.toml",
            &format!("{tls}[telemetry]\notlp_endpoint = \"http://otlpuser:T0kenPW@203.0.113.9:4317\"\n"),
        );
        let e = Config::load(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("telemetry.otlp_endpoint") && e.contains("otlp_cert"), "{e}");
        assert!(!e.contains("T0kenPW") && !e.contains("otlpuser"), "{e}");

        // From the environment, as the other keys; a bad one is named by its variable.
        let p = write(dir.path(), "plain.toml", &tls);
        let ca = dir.path().join("collector-ca.pem").display().to_string();
        let env = |ca: &str| {
            vec![
                (
                    "LIENTHONG_TELEMETRY_OTLP_ENDPOINT".to_string(),
                    "https://collector.example:4317".to_string(),
                ),
                ("LIENTHONG_TELEMETRY_OTLP_CA".to_string(), ca.to_string()),
            ]
        };
        assert_eq!(
            Config::load(Some(&p), env(&ca)).unwrap().telemetry.otlp_ca,
            PathBuf::from(&ca)
        );
        let e = Config::load(Some(&p), env("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("LIENTHONG_TELEMETRY_OTLP_CA"), "{e}");
    }

    /// Scrapers of an off-host `/metrics` must show a certificate: the CA
    /// they are checked against is read and parsed at load, and a file the
    /// listener could not use stops the load, named by its key (or variable).
    #[test]
    fn the_metrics_client_ca_is_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_files(dir.path());
        let monitoring = lienthong_tls::CertificateAuthority::generate("monitoring").unwrap();
        write(dir.path(), "monitoring-ca.pem", &monitoring.cert_pem());
        let metrics = "[telemetry]\nmetrics_listen = \"0.0.0.0:9464\"\n";

        let p = write(dir.path(), "plain.toml", &format!("{tls}{metrics}"));
        let c = Config::load(Some(&p), vec![]).unwrap();
        assert!(!c.telemetry.metrics_tls(), "plain HTTP unless a CA is named");
        assert!(c.telemetry.metrics_client_ca.as_os_str().is_empty());

        let p = write(
            dir.path(),
            "mtls.toml",
            &format!("{tls}{metrics}metrics_client_ca = \"monitoring-ca.pem\"\n"),
        );
        let c = Config::load(Some(&p), vec![]).unwrap();
        assert!(c.telemetry.metrics_tls());
        assert_eq!(c.telemetry.metrics_client_ca, dir.path().join("monitoring-ca.pem"));

        write(dir.path(), "not-pem.pem", "x");
        write(dir.path(), "key.pem", &monitoring.key_pem());
        write(
            dir.path(),
            "garbled.pem",
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        );
        for (file, says) in [
            ("gone.pem", "gone.pem"),
            ("not-pem.pem", "no PEM certificate"),
            ("key.pem", "no PEM certificate"),
            ("garbled.pem", "not a usable CA certificate"),
        ] {
            let p = write(
                dir.path(),
                "t.toml",
                &format!("{tls}{metrics}metrics_client_ca = {file:?}\n"),
            );
            let e = Config::load(Some(&p), vec![]).unwrap_err().to_string();
            assert!(
                e.contains("telemetry.metrics_client_ca") && e.contains(says),
                "{file}: {e}"
            );
        }

        // From the environment, as the other keys; a bad one is named by its variable.
        let p = write(dir.path(), "env.toml", &format!("{tls}{metrics}"));
        let var = |path: &Path| {
            vec![(
                "LIENTHONG_TELEMETRY_METRICS_CLIENT_CA".to_string(),
                path.display().to_string(),
            )]
        };
        let ca = dir.path().join("monitoring-ca.pem");
        assert_eq!(
            Config::load(Some(&p), var(&ca)).unwrap().telemetry.metrics_client_ca,
            ca
        );
        let e = Config::load(Some(&p), var(&dir.path().join("not-pem.pem")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("LIENTHONG_TELEMETRY_METRICS_CLIENT_CA"), "{e}");
    }

    #[test]
    fn file_then_env_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_files(dir.path());
        let p = write(
            dir.path(),
            "c.toml",
            &format!("listen = \"127.0.0.1:9000\"\n{tls}[limits]\nmax_collect_items = 4\n"),
        );
        let env = vec![
            ("LIENTHONG_LIMITS_MAX_COLLECT_ITEMS".to_string(), "8".to_string()),
            ("LIENTHONG_TRUST_DOMAIN".to_string(), "gov.example".to_string()),
            ("OTHER".to_string(), "x".to_string()),
        ];
        let c = Config::load(Some(&p), env).unwrap();
        assert_eq!(c.listen, "127.0.0.1:9000");
        assert_eq!(c.limits.max_collect_items, 8);
        assert_eq!(c.trust_domain, "gov.example");
        assert_eq!(c.tls.ca, dir.path().join("ca.pem"));
    }

    /// A mistyped variable would leave the default in force without a word:
    /// one inside a section, or close to a key, stops the broker naming the
    /// key meant; other programs' `LIENTHONG_*` variables are left alone.
    #[test]
    fn a_mistyped_variable_is_refused_naming_the_key_meant() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "c.toml", &tls_files(dir.path()));
        let load = |var: &str, value: &str| Config::load(Some(&p), vec![(var.to_string(), value.to_string())]);
        let e = load("LIENTHONG_TELEMETRY_METRICS_CLIENTCA", "/etc/ca.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("LIENTHONG_TELEMETRY_METRICS_CLIENTCA"), "{e}");
        assert!(e.contains("did you mean LIENTHONG_TELEMETRY_METRICS_CLIENT_CA"), "{e}");
        let e = load("LIENTHONG_LIMITS_MAX_COLECT_ITEMS", "abc")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`limits.max_collect_items`"), "{e}");
        let e = load("LIENTHONG_DATABSE_URL", "sqlite://x.db").unwrap_err().to_string();
        assert!(e.contains("did you mean LIENTHONG_DATABASE_URL"), "{e}");
        let e = load("LIENTHONG_RELAY_RECORD_TYPE_TIMEOUTS_MS", "5")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be set from the environment"), "{e}");
        for other in [
            "LIENTHONG_DB_PASSWORD",
            "LIENTHONG_IMAGE",
            "LIENTHONG_CERTS",
            "LIENTHONG_AS",
            "LIENTHONG_CA",
        ] {
            assert!(load(other, "x").is_ok(), "{other} is not a broker setting");
        }
        // Kubernetes' variables for a Service named `lienthong-audit`.
        for link in [
            "LIENTHONG_AUDIT_SERVICE_HOST",
            "LIENTHONG_AUDIT_SERVICE_PORT",
            "LIENTHONG_AUDIT_SERVICE_PORT_GRPC",
            "LIENTHONG_AUDIT_PORT",
            "LIENTHONG_AUDIT_PORT_7443_TCP",
            "LIENTHONG_AUDIT_PORT_7443_TCP_ADDR",
            "LIENTHONG_TLS_PORT_443_TCP_PROTO",
        ] {
            assert!(load(link, "10.0.0.1").is_ok(), "{link} is a Service's, not a setting");
        }
        let e = load("LIENTHONG_AUDIT_PORT_X", "1").unwrap_err().to_string();
        assert!(e.contains("did you mean"), "{e}");
    }

    /// A value out of its key's range that came from a variable is not in
    /// the file: the message names the variable.
    #[test]
    fn a_bad_value_from_a_variable_names_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "c.toml", &tls_files(dir.path()));
        let env = vec![("LIENTHONG_LIMITS_MAX_COLLECT_ITEMS".to_string(), "-1".to_string())];
        let e = Config::load(Some(&p), env).unwrap_err().to_string();
        assert!(
            e.starts_with("environment variable LIENTHONG_LIMITS_MAX_COLLECT_ITEMS"),
            "{e}"
        );
        assert!(!e.contains("c.toml"), "{e}");
    }

    /// Agencies behind one NAT share an address: its handshake bound is a
    /// setting, from the file or the environment, and never 0.
    #[test]
    fn the_per_address_handshake_bound_is_set_by_the_operator() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_files(dir.path());
        let p = write(dir.path(), "c.toml", &tls);
        assert_eq!(
            Config::load(Some(&p), vec![]).unwrap().tls.max_handshakes_per_address,
            32
        );
        let p = write(
            dir.path(),
            "nat.toml",
            &tls.replace("[tls]\n", "[tls]\nmax_handshakes_per_address = 200\n"),
        );
        assert_eq!(
            Config::load(Some(&p), vec![]).unwrap().tls.max_handshakes_per_address,
            200
        );
        let env = vec![("LIENTHONG_TLS_MAX_HANDSHAKES_PER_ADDRESS".to_string(), "64".to_string())];
        assert_eq!(Config::load(Some(&p), env).unwrap().tls.max_handshakes_per_address, 64);
        let env = vec![("LIENTHONG_TLS_MAX_HANDSHAKES_PER_ADDRESS".to_string(), "0".to_string())];
        let e = Config::load(Some(&p), env).unwrap_err().to_string();
        assert!(e.contains("max_handshakes_per_address"), "{e}");
    }

    /// The TLS files are looked at every 100 ms at most often, or only on SIGHUP.
    #[test]
    fn the_tls_files_are_looked_at_no_more_than_ten_times_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "reload.toml", &tls_files(dir.path()));
        for (ms, ok) in [("0", true), ("1", false), ("99", false), ("100", true), ("60000", true)] {
            let env = vec![("LIENTHONG_TLS_RELOAD_CHECK_MS".to_string(), ms.to_string())];
            match Config::load(Some(&p), env) {
                Ok(c) => assert!(ok && c.tls.reload_check_ms.to_string() == ms, "{ms}"),
                Err(e) => assert!(!ok && e.to_string().contains("tls.reload_check_ms"), "{ms}: {e}"),
            }
        }
    }

    #[test]
    fn a_debug_print_of_the_config_holds_no_database_password() {
        let config = Config {
            database_url: "postgres://app:Xy7q9Pw@db:5432/x?sslmode=verify-full".into(),
            ..Config::default()
        };
        let printed = format!("{config:?}");
        assert!(!printed.contains("Xy7q9Pw"), "{printed}");
        assert!(printed.contains("postgres://app:***@db:5432/x"), "{printed}");
        assert!(printed.contains("max_snapshot_lag_ms"), "{printed}");
    }

    #[test]
    fn a_file_that_is_not_toml_is_named_by_line_without_quoting_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("broker.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7443\"\ndatabase_url = \"postgres://app:Xy7\\q9Pw@db/x\"\n",
        )
        .unwrap();
        let e = Config::load(Some(&file), Vec::new()).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(
            !e.contains("Xy7") && !e.contains("q9Pw"),
            "the password was quoted: {e}"
        );
    }

    /// A replica that cannot load a change refuses lookups after a bound the
    /// operator sets, from the file or the environment, and never 0.
    #[test]
    fn the_snapshot_lag_bound_is_set_by_the_operator() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_files(dir.path());
        let p = write(dir.path(), "c.toml", &tls);
        assert_eq!(
            Config::load(Some(&p), vec![]).unwrap().limits.max_snapshot_lag_ms,
            5_000
        );
        let p = write(
            dir.path(),
            "lag.toml",
            &format!("{tls}[limits]\nmax_snapshot_lag_ms = 2000\n"),
        );
        assert_eq!(
            Config::load(Some(&p), vec![]).unwrap().limits.max_snapshot_lag_ms,
            2_000
        );
        let env = vec![("LIENTHONG_LIMITS_MAX_SNAPSHOT_LAG_MS".to_string(), "750".to_string())];
        assert_eq!(Config::load(Some(&p), env).unwrap().limits.max_snapshot_lag_ms, 750);
        let env = vec![("LIENTHONG_LIMITS_MAX_SNAPSHOT_LAG_MS".to_string(), "0".to_string())];
        let e = Config::load(Some(&p), env).unwrap_err().to_string();
        assert!(
            e.contains("must be greater than 0") && e.contains("LIENTHONG_LIMITS_MAX_SNAPSHOT_LAG_MS"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_files(dir.path());
        let p = write(dir.path(), "c.toml", &format!("{tls}lisen = \"x\"\n"));
        let e = Config::load(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("lisen") && e.contains("c.toml"), "{e}");

        let p = write(dir.path(), "d.toml", &format!("listen = \"nonsense\"\n{tls}"));
        let e = Config::load(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("listen") && e.contains("d.toml"), "{e}");

        let p = write(dir.path(), "e.toml", "[tls]\nca = \"missing.pem\"\n");
        let e = Config::load(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("tls.ca") && e.contains("missing.pem"), "{e}");

        let p = write(dir.path(), "f.toml", &tls);
        let e = Config::load(
            Some(&p),
            vec![("LIENTHONG_LIMITS_MAX_COLLECT_ITEMS".into(), "many".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("LIENTHONG_LIMITS_MAX_COLLECT_ITEMS"), "{e}");

        for key in [
            "LIENTHONG_TLS_HANDSHAKE_TIMEOUT_MS",
            "LIENTHONG_RELAY_CONNECT_TIMEOUT_MS",
            "LIENTHONG_LIMITS_DATABASE_ACQUIRE_TIMEOUT_MS",
            "LIENTHONG_LIMITS_SUBJECT_HISTORY_PER_MINUTE",
        ] {
            let e = Config::load(Some(&p), vec![(key.into(), "0".into())])
                .unwrap_err()
                .to_string();
            assert!(e.contains("must be greater than 0") && e.contains(key), "{key}: {e}");
        }

        // Trust domains as the certificates name them, '_' included.
        let p = write(dir.path(), "g.toml", &format!("trust_domain = \"gov_vn.test\"\n{tls}"));
        Config::load(Some(&p), vec![]).unwrap();
        let p = write(dir.path(), "h.toml", &format!("trust_domain = \"Gov.VN\"\n{tls}"));
        let e = Config::load(Some(&p), vec![]).unwrap_err().to_string();
        assert!(e.contains("trust_domain"), "{e}");
    }
}
