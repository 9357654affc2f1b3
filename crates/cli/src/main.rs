//! `lienthong`: the broker, its demo federation, and the tools to run it.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use lienthong_cli::client::ConnectArgs;
use lienthong_cli::commands::{self, AuditCmd, EndpointCmd, GrantCmd, LookupArgs, MemberCmd, SchemaCmd};
use lienthong_cli::demo::{self, DemoOptions};
use lienthong_cli::federation::FederationOptions;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

mod health;

// jemalloc rather than glibc malloc: per-request allocations on many threads
// were a fifth of the broker's CPU per lookup, and glibc's per-thread arenas
// kept freed memory around after bursts (see BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// lienthong: a data-sharing broker between government agency registers.
#[derive(Debug, Parser)]
#[command(name = "lienthong", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Print results as JSON instead of text (`lookup` always does, `audit export` writes JSON lines).
    #[arg(long, global = true)]
    json: bool,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "LIENTHONG_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    ///
    /// SIGTERM or Ctrl-C drains in-flight lookups and signs a final tree head;
    /// SIGHUP has it reload its TLS files (tls.ca, tls.cert, tls.key) now.
    Serve {
        /// Config file (TOML); every key can be overridden by a LIENTHONG_* variable.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the default configuration and exit.
        #[arg(long)]
        print_default_config: bool,
    },
    /// Run a whole federation on this machine and play the once-only story.
    Demo {
        /// Directory for certificates, config and data; a fresh temporary one when omitted.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the federation running after the story, and print how to call it.
        #[arg(long)]
        keep_running: bool,
        /// Seed of the synthetic citizens.
        #[arg(long, default_value_t = 2020)]
        seed: u64,
        /// Expose Prometheus metrics on this address (e.g. 127.0.0.1:9464).
        #[arg(long)]
        metrics_listen: Option<String>,
    },
    /// Run one of the demo registers (synthetic data for 100,000 citizens).
    DemoProvider {
        /// Which register.
        #[arg(value_enum)]
        kind: RegisterKind,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:9101")]
        listen: String,
        /// Certificates directory (ca.pem and the register's member certificate).
        /// The files in use (these, or `--ca`, `--cert` and `--key`) are read
        /// again every minute, and at once on SIGHUP: a renewed certificate, or a
        /// CA bundle during a CA roll, serves new connections without a restart,
        /// and files the register would not start with are logged and left unused.
        #[arg(long = "tls-dir")]
        tls_dir: PathBuf,
        /// The register's member id (its certificate is `<member>.pem`).
        #[arg(long)]
        member: Option<String>,
        /// Federation trust domain.
        #[arg(long, default_value = "lienthong.gov.vn")]
        trust_domain: String,
        /// Seed of the synthetic citizens.
        #[arg(long, default_value_t = 2020)]
        seed: u64,
        /// TLS handshakes under way from one address at once; a connection past
        /// it is closed. Raise it when a proxy that opens a connection per
        /// request (nginx `grpc_pass`) calls the register.
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
        max_handshakes_per_address: u32,
        /// Refuse the broker certificates listed in FILE (one SHA-256
        /// fingerprint a line, as `lienthong certs fingerprint` prints it):
        /// after a broker key leaked and the brokers moved to a new certificate.
        /// The file is read again every second; a change applies to open
        /// connections too. A bad file at start stops the register; later,
        /// the list read before stays in force and the fault is logged.
        #[arg(long, value_name = "FILE")]
        refuse_certificates: Option<PathBuf>,
        /// On SIGTERM or Ctrl-C, how long fetches in flight may take to finish
        /// before their connections are closed.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        shutdown_grace: std::time::Duration,
        #[command(flatten)]
        limits: RegisterLimits,
    },
    /// Create the federation CA, issue certificates, and revoke them at the broker.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Administer member agencies.
    #[command(subcommand)]
    Member(MemberCmd),
    /// Administer provider endpoints.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Administer grants.
    #[command(subcommand)]
    Grant(GrantCmd),
    /// Register and inspect record types.
    #[command(subcommand)]
    Schema(SchemaCmd),
    /// Look one record up, as a consumer.
    Lookup(LookupArgs),
    /// Read, export and verify the access log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Ask a broker's gRPC health service whether it serves (exit 0) or not (exit 1);
    /// needs only the CA certificate (`--ca` or `--certs`), for container probes.
    Health(health::HealthArgs),
    // No doc comment: clap would take it for the about and drop the long
    // help `BenchArgs` gives (the scenarios and how they are measured).
    Bench(lienthong_cli::bench::BenchArgs),
    // Started by `bench --scenarios bare`; not a way to run a federation.
    #[command(hide = true)]
    BenchBare(lienthong_cli::bare::BareArgs),
}

/// How log lines are written (`telemetry.log_format` in a broker's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The register kit's limits on its connections, as `demo-provider` flags
/// (defaults: the kit's own).
#[derive(Debug, Clone, clap::Args)]
struct RegisterLimits {
    /// Calls at once on one connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`);
    /// the broker queues calls past it.
    #[arg(long, default_value_t = lienthong_provider::DEFAULT_MAX_CONCURRENT_STREAMS,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_concurrent_streams: u32,
    /// Largest fetch request accepted, in bytes; a larger one is refused with
    /// RESOURCE_EXHAUSTED before it is read whole.
    #[arg(long, default_value_t = lienthong_provider::DEFAULT_MAX_REQUEST_BYTES as u64,
          value_parser = clap::value_parser!(u64).range(1..=(64 << 20)))]
    max_request_bytes: u64,
    /// How often a quiet connection is pinged (HTTP/2 keepalive).
    #[arg(long, value_parser = parse_positive_duration, default_value = "30s")]
    keepalive_interval: std::time::Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    #[arg(long, value_parser = parse_positive_duration, default_value = "10s")]
    keepalive_timeout: std::time::Duration,
    /// How long a connection of a peer that is not the broker (a load
    /// balancer's probe, a member, a refused certificate) stays open.
    #[arg(long, value_parser = parse_positive_duration, default_value = "10s")]
    non_broker_connection_lifetime: std::time::Duration,
    /// Connections of peers that are not the broker open at once; the
    /// broker's own are not counted.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    max_non_broker_connections: u32,
}

impl RegisterLimits {
    /// Sets these limits in `config`.
    fn apply(&self, config: &mut lienthong_provider::ProviderConfig) {
        config.max_concurrent_streams = self.max_concurrent_streams;
        // Bounded by the parser to 64 MiB, which every target's usize holds.
        config.max_request_bytes = usize::try_from(self.max_request_bytes).unwrap_or(usize::MAX);
        config.http2_keepalive_interval = self.keepalive_interval;
        config.http2_keepalive_timeout = self.keepalive_timeout;
        config.non_broker_connection_lifetime = self.non_broker_connection_lifetime;
        config.max_non_broker_connections = self.max_non_broker_connections as usize;
    }
}

/// A duration above zero (`500ms`, `10s`): zero would close every
/// connection at once or ping without pause.
fn parse_positive_duration(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err("must be above zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RegisterKind {
    CivilStatus,
    JudicialRecords,
}

#[derive(Debug, Subcommand)]
enum CertsCmd {
    /// Create a federation CA and the broker's certificate in DIR.
    Init {
        /// Directory (created).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain of the federation.
        #[arg(long, default_value = "lienthong.gov.vn")]
        trust_domain: String,
        /// Host names or IPs clients reach the broker by (repeat; e.g. a Service name), besides
        /// localhost and 127.0.0.1, which the certificate always names for local health checks.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Issue a member certificate (`<member>.pem`, `<member>.key`), or with
    /// `--broker-cert` a new broker certificate, signed by the CA in DIR.
    Issue {
        /// Member id.
        #[arg(long, required_unless_present = "broker_cert", conflicts_with = "broker_cert")]
        member: Option<String>,
        /// Re-issue the broker's own certificate (rotation, new host names).
        #[arg(long)]
        broker_cert: bool,
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// Host names or IPs the certificate may serve (a member's register, the broker; repeat),
        /// besides localhost and 127.0.0.1, which it then names for local health checks. A
        /// member without --host gets a client certificate only.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
    /// Revoke a member certificate at the broker (as an admin): refused from
    /// its next request (other replicas within a second), while the member's
    /// other certificates keep working. Permanent.
    Revoke(commands::RevokeCertArgs),
    /// List the certificates revoked at the broker (as an admin).
    Revoked {
        /// Only this member's.
        // Its own id: `member` is the global `--as`.
        #[arg(long = "member", id = "owner", value_name = "MEMBER")]
        member: Option<String>,
    },
    /// Print a certificate file's SHA-256 fingerprint, as revocations name it.
    Fingerprint {
        /// PEM certificate file.
        file: PathBuf,
    },
}

/// The names a served certificate always carries, then `hosts`: `--host` for a
/// Service name must not drop `localhost`, which the container's and the
/// Kubernetes probes' `lienthong health` connect to.
fn with_local_names(hosts: Vec<String>) -> Vec<String> {
    let mut all = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for h in hosts {
        if !all.iter().any(|a| a.eq_ignore_ascii_case(&h)) {
            all.push(h);
        }
    }
    all
}

/// The `host:port` the demo's broker listens on for `--broker URL`.
fn listen_address(broker: &str) -> Result<String> {
    let rest = broker.strip_prefix("https://").unwrap_or(broker);
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || !authority.contains(':') {
        anyhow::bail!(
            "--broker {broker:?}: the demo's broker needs an address with a port, such as https://127.0.0.1:7443"
        );
    }
    Ok(authority.to_owned())
}

fn init_logging(format: LogFormat, filter: Option<&str>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter.unwrap_or("warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only clutter a log file or the journal.
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if format == LogFormat::Json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Set once `serve` knows its config asks for JSON logs: the fatal error
/// that ends it is then a JSON line too, as every line before it.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The global flags `serve` refuses, by argument id: its config says where
/// it listens and which certificates it serves.
const SERVE_REFUSES: &[&str] = &Typed::CONNECTION;
/// The global flags `demo` refuses for its certificates (it makes its own);
/// `--broker` is its broker's address.
const DEMO_REFUSES: &[&str] = &["certs", "member", "ca", "cert", "key"];
/// The global flags `demo-provider` refuses for its address and certificate
/// directory; `--ca`, `--cert` and `--key` replace files of its `--tls-dir`.
const DEMO_PROVIDER_REFUSES: &[&str] = &["broker", "certs"];
/// `--json`, refused by the commands that print no results.
const NO_RESULTS: &[&str] = &["json"];

/// Every global flag a command refuses, by command: left out of its `--help`.
const REFUSED_GLOBALS: [(&str, &[&[&str]]); 3] = [
    ("serve", &[SERVE_REFUSES]),
    ("demo", &[DEMO_REFUSES, NO_RESULTS]),
    ("demo-provider", &[DEMO_PROVIDER_REFUSES, NO_RESULTS]),
];

/// The command line, with each command's `--help` leaving out the global
/// flags it refuses. Parsing is unchanged: a refused flag is still parsed,
/// then refused saying what to use instead.
fn cli_command() -> clap::Command {
    let cmd = Cli::command();
    let globals: Vec<clap::Arg> = cmd.get_arguments().filter(|a| a.is_global_set()).cloned().collect();
    REFUSED_GLOBALS.into_iter().fold(cmd, |cmd, (name, lists)| {
        cmd.mut_subcommand(name, |sub| {
            // A command's own argument of a global's id takes its place
            // there (clap does not copy a global over it): the same flag,
            // hidden. Its value stays the command's, which only refuses it.
            lists
                .iter()
                .flat_map(|ids| ids.iter())
                .filter_map(|id| globals.iter().find(|a| a.get_id() == id))
                .fold(sub, |sub, global| sub.arg(global.clone().global(false).hide(true)))
        })
    })
}

/// The global flags typed on the command line (not set by the environment
/// or left at their defaults), by argument id.
struct Typed(Vec<&'static str>);

impl Typed {
    const CONNECTION: [&'static str; 7] = ["broker", "certs", "member", "ca", "cert", "key", "json"];

    fn of(matches: &clap::ArgMatches) -> Typed {
        let sub = matches.subcommand().map_or(matches, |(_, m)| m);
        let typed = |id: &str| {
            matches!(
                sub.try_get_raw(id).ok().flatten().and_then(|_| sub.value_source(id)),
                Some(clap::parser::ValueSource::CommandLine)
            )
        };
        Typed(Self::CONNECTION.into_iter().filter(|id| typed(id)).collect())
    }

    fn has(&self, id: &str) -> bool {
        self.0.contains(&id)
    }

    /// Refuses the typed flags among `ignored`, which `command` does not
    /// use: silently ignored, `serve --ca bundle.pem` during a CA roll
    /// would seem to work and change nothing.
    fn refuse(&self, command: &str, ignored: &[&str], instead: &str) -> Result<()> {
        let flags: Vec<String> = ignored
            .iter()
            .filter(|id| self.has(id))
            .map(|id| format!("--{}", if *id == "member" { "as" } else { id }))
            .collect();
        if flags.is_empty() {
            return Ok(());
        }
        anyhow::bail!("`lienthong {command}` does not take {}: {instead}", flags.join(", "))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let matches = cli_command().get_matches();
    let typed = Typed::of(&matches);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let flag = cli.log_format == LogFormat::Json;
    match run(cli, typed).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("error: {}", lienthong_cli::error_text(&e));
            let json = flag || JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed);
            stderr_line(json, "ERROR", &text, &[]);
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli, typed: Typed) -> Result<()> {
    // The other commands log nothing of their own, but load key files: a
    // warning about one (readable by its group) must still reach the operator.
    if !matches!(
        cli.command,
        Command::Serve { .. } | Command::Demo { .. } | Command::DemoProvider { .. } | Command::Bench(_)
    ) {
        init_logging(cli.log_format, None);
    }
    match cli.command {
        Command::Serve {
            config,
            print_default_config,
        } => {
            typed.refuse(
                "serve",
                SERVE_REFUSES,
                "the broker takes its address and certificates from its config file \
                 (`listen`, `tls.ca`, `tls.cert`, `tls.key`) or their LIENTHONG_* variables",
            )?;
            if print_default_config {
                print!("{}", lienthong_broker::Config::example_toml());
                return Ok(());
            }
            let cfg = lienthong_broker::Config::load(config.as_deref(), lienthong_broker::Config::environment())?;
            let mut telemetry = lienthong_broker::telemetry::TelemetryOptions::from_config(&cfg.telemetry);
            if cli.log_format == LogFormat::Json {
                telemetry.log_format = "json".into();
            }
            let json = telemetry.log_format == "json";
            JSON_LOGS.store(json, std::sync::atomic::Ordering::Relaxed);
            let telemetry = lienthong_broker::telemetry::init(&telemetry)?;
            let result = serve(cfg, json).await;
            telemetry.shutdown().await;
            result
        }
        Command::Demo {
            dir,
            keep_running,
            seed,
            metrics_listen,
        } => {
            let (dir, temp) = match dir {
                Some(d) => (d, None),
                None => {
                    let t = tempfile::Builder::new().prefix("lienthong-demo-").tempdir()?;
                    (t.path().to_path_buf(), Some(t))
                }
            };
            // A throwaway federation's database is removed at the end anyway:
            // no warning that a memory-backed temporary directory would lose it.
            let quiet = format!("warn,{}=error", lienthong_store::VOLATILE_LOG_TARGET);
            init_logging(cli.log_format, Some(if temp.is_some() { &quiet } else { "warn" }));
            typed.refuse(
                "demo",
                DEMO_REFUSES,
                "the demo makes its own certificates in its directory (`--dir`)",
            )?;
            typed.refuse("demo", NO_RESULTS, "it tells a story, and prints no results to format")?;
            let mut federation = FederationOptions::new(dir);
            federation.seed = seed;
            federation.metrics_listen = metrics_listen;
            if typed.has("broker") {
                federation.listen = Some(listen_address(&cli.connect.broker)?);
            }
            demo::run(DemoOptions {
                federation,
                keep_running,
            })
            .await
        }
        Command::DemoProvider {
            kind,
            listen,
            tls_dir,
            member,
            trust_domain,
            seed,
            max_handshakes_per_address,
            refuse_certificates,
            shutdown_grace,
            limits,
        } => {
            typed.refuse(
                "demo-provider",
                // Its own `--member` takes the id of the global `--as`.
                DEMO_PROVIDER_REFUSES,
                "a register takes its certificate from `--tls-dir` and `--member` \
                 (`--ca`, `--cert` and `--key` replace a file of it), and its address from `--listen`",
            )?;
            typed.refuse(
                "demo-provider",
                NO_RESULTS,
                "it serves, and prints no results to format",
            )?;
            init_logging(cli.log_format, Some("info"));
            let kind = match kind {
                RegisterKind::CivilStatus => lienthong_provider::demo::DemoRegisterKind::CivilStatus,
                RegisterKind::JudicialRecords => lienthong_provider::demo::DemoRegisterKind::JudicialRecords,
            };
            let member = member.unwrap_or_else(|| match kind {
                lienthong_provider::demo::DemoRegisterKind::CivilStatus => "civil-status".into(),
                lienthong_provider::demo::DemoRegisterKind::JudicialRecords => "judicial-records".into(),
            });
            let mut config = lienthong_provider::ProviderConfig::new(&trust_domain);
            config.member = Some(member.clone());
            config.accept.max_handshakes_per_address = max_handshakes_per_address as usize;
            config.shutdown_grace = shutdown_grace;
            limits.apply(&mut config);
            if let Some(path) = &refuse_certificates {
                config.refused_certificates =
                    lienthong_provider::RefusedCertificates::watch_file(path, std::time::Duration::from_secs(1))?;
            }
            lienthong_tls::install_crypto_provider();
            // `--ca` for a CA roll's bundle, `--cert`/`--key` for a renewed
            // certificate, each over its file in `--tls-dir`.
            let files = cli
                .connect
                .typed_over(lienthong_cli::client::member_files(&tls_dir, &member));
            let material = lienthong_tls::TlsMaterial::load(&files)?;
            let tls = std::sync::Arc::new(lienthong_tls::ServerTls::new(&material, &trust_domain)?);
            // A renewed certificate is taken within a minute, without a restart,
            // and at once on SIGHUP, which would otherwise end the register.
            config.tls_files = Some(files);
            let reload_now = std::sync::Arc::new(tokio::sync::Notify::new());
            config.tls_reload_now = Some(reload_now.clone());
            let mut hangups = lienthong_cli::Hangups::new();
            // Lives as long as the process, which ends when the register does.
            tokio::spawn(async move {
                loop {
                    hangups.next().await;
                    reload_now.notify_one();
                }
            });
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let addr = listener.local_addr()?.to_string();
            let json = cli.log_format == LogFormat::Json;
            // Said once the kit's start-up checks have passed: a script
            // waiting for this line must not take a register that is about
            // to refuse its own certificate for one that serves.
            let announce = move || {
                stderr_line(
                    json,
                    "INFO",
                    &format!("{member} register serving on {addr}"),
                    &[("addr", addr.clone())],
                )
            };
            tracing::info!(
                register = %kind,
                "starting demo register with {} synthetic citizens",
                lienthong_provider::demo::DEMO_CITIZENS
            );
            lienthong_provider::serve_announced(
                kind.source(seed),
                tls,
                config,
                listener,
                lienthong_cli::shutdown_signal(),
                announce,
            )
            .await?;
            Ok(())
        }
        Command::Certs(CertsCmd::Init {
            dir,
            trust_domain,
            hosts,
        }) => {
            lienthong_tls::init_dir_with_hosts(&dir, &trust_domain, &with_local_names(hosts))?;
            if cli.json {
                let written = serde_json::json!({ "dir": dir, "trust_domain": trust_domain });
                println!("{written}");
            } else {
                println!(
                    "federation CA and broker certificate written to {} (trust domain {trust_domain})",
                    dir.display()
                );
            }
            Ok(())
        }
        Command::Certs(CertsCmd::Issue {
            member,
            broker_cert,
            dir,
            hosts,
        }) => {
            // A member without --host serves nowhere: its certificate is a
            // client certificate only, naming no host (not even localhost).
            let member = member.filter(|_| !broker_cert);
            let hosts = if member.is_some() && hosts.is_empty() {
                hosts
            } else {
                with_local_names(hosts)
            };
            let issued = match &member {
                Some(member) => lienthong_tls::issue_member_in_dir(&dir, member, &hosts)?,
                None => lienthong_tls::issue_broker_in_dir(&dir, &hosts)?,
            };
            let fingerprint = commands::certificate_fingerprint(&issued.cert)?;
            let replaced = issued.replaced.as_ref().map(|old| {
                let day = |t: time::OffsetDateTime| t.date().to_string();
                (
                    lienthong_tls::fingerprint_hex(&old.sha256),
                    day(old.not_before),
                    day(old.not_after),
                )
            });
            if cli.json {
                let replaced = replaced.as_ref().map(|(fingerprint, from, until)| {
                    serde_json::json!({ "fingerprint_sha256": fingerprint, "valid_from": from, "valid_until": until })
                });
                let out = serde_json::json!({
                    "certificate": issued.cert,
                    "key": issued.key,
                    "fingerprint_sha256": fingerprint,
                    "replaced": replaced,
                });
                println!("{out}");
                return Ok(());
            }
            println!(
                "issued {} and {} (sha256 fingerprint {fingerprint})",
                issued.cert.display(),
                issued.key.display(),
            );
            if let Some((fingerprint, from, until)) = replaced {
                println!(
                    "replaced the certificate that was there (sha256 fingerprint {fingerprint}, valid {from} to {until}); it \
                     stays valid until then unless revoked"
                );
                match &member {
                    Some(member) => println!(
                        "once the member uses the new one (at once if its key leaked): lienthong --as <admin> certs \
                         revoke --fingerprint {fingerprint} --member {member} --reason \"...\""
                    ),
                    None => println!(
                        "running brokers take the new files at their next look (tls.reload_check_ms) or on SIGHUP; \
                         only if the old key leaked: once every replica presents the new one, give {fingerprint} to \
                         the registers to refuse (their --refuse-certificates file)"
                    ),
                }
            }
            Ok(())
        }
        Command::Certs(CertsCmd::Revoke(args)) => commands::revoke_certificate(&cli.connect, args, cli.json).await,
        Command::Certs(CertsCmd::Revoked { member }) => {
            commands::revoked_certificates(&cli.connect, member, cli.json).await
        }
        Command::Certs(CertsCmd::Fingerprint { file }) => {
            let fingerprint = commands::certificate_fingerprint(&file)?;
            if cli.json {
                println!("{}", serde_json::json!({ "fingerprint_sha256": fingerprint }));
            } else {
                println!("{fingerprint}");
            }
            Ok(())
        }
        Command::Member(c) => commands::member(&cli.connect, c, cli.json).await,
        Command::Endpoint(c) => commands::endpoint(&cli.connect, c, cli.json).await,
        Command::Grant(c) => commands::grant(&cli.connect, c, cli.json).await,
        Command::Schema(c) => commands::schema(&cli.connect, c, cli.json).await,
        Command::Lookup(a) => commands::lookup(&cli.connect, a).await,
        Command::Audit(c) => commands::audit(&cli.connect, c, cli.json).await,
        Command::Health(a) => health::run(&cli.connect, a, cli.json).await,
        Command::Bench(a) => {
            init_logging(cli.log_format, Some("warn"));
            lienthong_cli::bench::run(a, cli.json).await
        }
        Command::BenchBare(a) => lienthong_cli::bare::serve(a).await,
    }
}

/// Prints a line that people and tools wait for on stderr (the listening
/// address, the error that stopped the command), also when the log filter
/// would drop it: as text, or as one JSON object shaped like the JSON log
/// lines around it, so that every stderr line parses.
fn stderr_line(json: bool, level: &str, message: &str, fields: &[(&str, String)]) {
    if !json {
        eprintln!("{message}");
        return;
    }
    let mut object = serde_json::Map::new();
    object.insert("message".into(), message.into());
    for (key, value) in fields {
        object.insert((*key).into(), value.as_str().into());
    }
    let timestamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    eprintln!(
        "{}",
        serde_json::json!({
            "timestamp": timestamp,
            "level": level,
            "fields": object,
            "target": "lienthong",
        })
    );
}

async fn serve(cfg: lienthong_broker::Config, json: bool) -> Result<()> {
    // Handlers are installed on the first poll: do it before starting, so a
    // SIGTERM during start-up also ends in a clean shutdown.
    let signal = lienthong_cli::shutdown_signal();
    tokio::pin!(signal);
    let _ = futures::poll!(&mut signal);
    // SIGHUP has the broker reload its TLS files; caught from before it starts.
    let mut hangups = lienthong_cli::Hangups::new();
    // `lienthong bench` reads the plain form of this line (`METRICS_PREFIX`).
    let metrics_tls = !cfg.telemetry.metrics_client_ca.as_os_str().is_empty();
    let mut handle = lienthong_broker::start(cfg, None).await?;
    let addr = handle.addr.to_string();
    stderr_line(
        json,
        "INFO",
        &format!("lienthong broker listening on {addr} (mutual TLS)"),
        &[("addr", addr.clone())],
    );
    if let Some(m) = handle.metrics_addr {
        stderr_line(
            json,
            "INFO",
            &if metrics_tls {
                format!("metrics on https://{m}/metrics (client certificate required)")
            } else {
                format!("metrics on http://{m}/metrics")
            },
            &[("metrics_addr", m.to_string())],
        );
    }
    let stop = handle.take_shutdown();
    loop {
        tokio::select! {
            r = handle.wait() => return r.map_err(Into::into),
            _ = &mut signal => break,
            () = hangups.next() => handle.reload_tls(),
        }
    }
    stderr_line(
        json,
        "INFO",
        "shutting down: draining in-flight requests, flushing the audit log",
        &[],
    );
    if let Some(tx) = stop {
        let _ = tx.send(());
    }
    handle.wait().await?;
    stderr_line(json, "INFO", "stopped cleanly", &[]);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The long help of `lienthong <path...>`.
    fn help(path: &[&str]) -> String {
        let mut cmd = cli_command();
        // As parsing does: the global flags reach each command.
        cmd.build();
        let mut sub = &mut cmd;
        for name in path {
            sub = sub.find_subcommand_mut(name).unwrap();
        }
        sub.render_long_help().to_string()
    }

    /// Each command's help lists the flags it takes, and none it refuses.
    #[test]
    fn help_advertises_no_flag_the_command_refuses() {
        // An option's own line: `-c, --config <CONFIG>`, `--json`.
        let shown = |text: &str, name: &str| {
            text.lines()
                .map(str::trim_start)
                .filter(|l| l.starts_with('-'))
                .any(|l| l.split([',', ' ']).any(|t| t == format!("--{name}")))
        };
        let cases: [(&[&str], &[&str], &[&str]); 4] = [
            (
                &["serve"],
                &["config", "log-format"],
                &["broker", "certs", "as", "ca", "cert", "key", "json"],
            ),
            (
                &["demo"],
                &["broker", "dir", "log-format"],
                &["certs", "as", "ca", "cert", "key", "json"],
            ),
            (
                &["demo-provider"],
                &["tls-dir", "member", "ca", "cert", "key", "log-format"],
                &["broker", "certs", "json"],
            ),
            (
                &["grant", "create"],
                &["broker", "certs", "as", "ca", "cert", "key", "json"],
                &[],
            ),
        ];
        for (path, taken, refused) in cases {
            let text = help(path);
            for name in taken {
                assert!(shown(&text, name), "{path:?} --{name} missing:\n{text}");
            }
            for name in refused {
                assert!(!shown(&text, name), "{path:?} --{name} advertised:\n{text}");
            }
        }
        // Still parsed where refused, to be refused saying what to use instead.
        let matches = cli_command()
            .try_get_matches_from(["lienthong", "demo", "--ca", "ca.pem", "--json"])
            .unwrap();
        let typed = Typed::of(&matches);
        let refused = typed.refuse("demo", DEMO_REFUSES, "x").unwrap_err().to_string();
        assert!(refused.contains("--ca"), "{refused}");
        assert!(typed.refuse("demo", NO_RESULTS, "x").is_err());
    }

    /// `demo-provider` without limit flags serves with the kit's defaults,
    /// so the flags' documented defaults cannot drift from the kit's.
    #[test]
    fn demo_provider_limits_default_to_the_kits() {
        let cli = Cli::try_parse_from(["lienthong", "demo-provider", "civil-status", "--tls-dir", "certs"]).unwrap();
        let Command::DemoProvider { limits, .. } = cli.command else {
            panic!("not demo-provider");
        };
        let mut config = lienthong_provider::ProviderConfig::new("gov.test");
        let defaults = format!("{config:?}");
        limits.apply(&mut config);
        assert_eq!(format!("{config:?}"), defaults);
    }

    #[test]
    fn demo_provider_limits_are_set_from_flags() {
        let cli = Cli::try_parse_from([
            "lienthong",
            "demo-provider",
            "civil-status",
            "--tls-dir",
            "certs",
            "--max-concurrent-streams",
            "8",
            "--max-request-bytes",
            "4096",
            "--non-broker-connection-lifetime",
            "500ms",
            "--max-non-broker-connections",
            "3",
        ])
        .unwrap();
        let Command::DemoProvider { limits, .. } = cli.command else {
            panic!("not demo-provider");
        };
        let mut config = lienthong_provider::ProviderConfig::new("gov.test");
        limits.apply(&mut config);
        assert_eq!(config.max_concurrent_streams, 8);
        assert_eq!(config.max_request_bytes, 4096);
        assert_eq!(
            config.non_broker_connection_lifetime,
            std::time::Duration::from_millis(500)
        );
        assert_eq!(config.max_non_broker_connections, 3);
        let zero = Cli::try_parse_from([
            "lienthong",
            "demo-provider",
            "civil-status",
            "--tls-dir",
            "certs",
            "--keepalive-timeout",
            "0s",
        ]);
        assert!(zero.is_err(), "a zero keepalive timeout was accepted");
    }
}
