//! A whole federation in one process: certificates, a broker on SQLite (or a
//! given database), the two demo registers, members, schemas, endpoints and
//! grants. `lienthong demo` and the end-to-end tests both start it.

use crate::client::{Clients, connect, member_files, status_error};
use anyhow::{Context, Result};
use lienthong::v1 as pb;
use lienthong_broker::{Config, ServerHandle};
use lienthong_provider::demo::DemoRegisterKind;
use lienthong_tls::{ServerTls, TlsMaterial};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// The federation's administrator (bootstrapped from the broker config).
pub const ADMIN: &str = "federation-admin";
/// Civil-status register (provider of birth, marriage and death records).
pub const CIVIL_STATUS: &str = "civil-status";
/// National centre for judicial records (provider of criminal-record extracts).
pub const JUDICIAL_RECORDS: &str = "judicial-records";
/// Ha Noi judicial-records office: issues criminal-record certificates (consumer).
pub const JUDICIAL_OFFICE: &str = "hanoi-judicial-office";
/// Ha Noi tax department: a consumer with no grant for civil-status records.
pub const TAX_DEPT: &str = "hanoi-tax-dept";
/// National public service portal: shows citizens who read their data.
pub const CITIZEN_PORTAL: &str = "citizen-portal";
/// State audit office.
pub const STATE_AUDIT: &str = "state-audit";

/// Legal basis of criminal-record certificate applications (Law on Judicial
/// Records 28/2009/QH12, art. 45-46).
pub const PURPOSE_CERTIFICATE: &str = "law-28-2009-qh12/art-45";
/// Legal basis of data sharing between agencies (Decree 47/2020/ND-CP, art. 12).
pub const PURPOSE_DATA_SHARING: &str = "decree-47-2020/art-12";

/// Members of the demo federation: id, display name, roles.
pub const MEMBERS: &[(&str, &str, &[pb::Role])] = &[
    (
        CIVIL_STATUS,
        "Civil status register (Ministry of Justice)",
        &[pb::Role::Provider, pb::Role::Integrator],
    ),
    (
        JUDICIAL_RECORDS,
        "National Centre for Judicial Records",
        &[pb::Role::Provider, pb::Role::Integrator],
    ),
    (
        JUDICIAL_OFFICE,
        "Ha Noi Department of Justice, judicial-records office",
        &[pb::Role::Consumer],
    ),
    (TAX_DEPT, "Ha Noi Tax Department", &[pb::Role::Consumer]),
    (
        CITIZEN_PORTAL,
        "National Public Service Portal",
        &[pb::Role::SubjectPortal],
    ),
    (STATE_AUDIT, "State Audit Office", &[pb::Role::Auditor]),
];

/// How to start a federation.
#[derive(Clone, Debug)]
pub struct FederationOptions {
    /// Directory for certificates, config and data (created).
    pub dir: PathBuf,
    /// Seed of the synthetic citizens.
    pub seed: u64,
    /// Database URL; SQLite in the directory when `None`.
    pub database_url: Option<String>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Address the broker listens on (`host:port`); a free loopback port
    /// when `None`.
    pub listen: Option<String>,
    /// Prometheus listener, if any.
    pub metrics_listen: Option<String>,
    /// CA whose certificates may scrape it over TLS (`telemetry.metrics_client_ca`);
    /// plain HTTP when `None`.
    pub metrics_client_ca: Option<PathBuf>,
    /// Extra TOML appended to the broker config (tests tune timeouts with it).
    /// It follows the `[audit]` table: bare keys before any header are audit settings.
    pub extra_config: String,
}

impl FederationOptions {
    /// Defaults for a directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FederationOptions {
            dir: dir.into(),
            seed: 2020,
            database_url: None,
            trust_domain: "lienthong.gov.vn".into(),
            listen: None,
            metrics_listen: None,
            metrics_client_ca: None,
            extra_config: String::new(),
        }
    }
}

/// A register serving in this process.
pub struct Register {
    /// Which one.
    pub kind: DemoRegisterKind,
    /// Its member id.
    pub member: &'static str,
    /// Address it listens on.
    pub addr: SocketAddr,
    /// The broker certificates it refuses (empty at first), changeable while
    /// it serves, as a register told of a leaked broker key.
    pub refused: lienthong_provider::RefusedCertificates,
    shutdown: Option<oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl Register {
    /// Starts a demo register with its member certificate from `certs`.
    pub async fn start(kind: DemoRegisterKind, certs: &Path, seed: u64, trust_domain: &str) -> Result<Register> {
        Register::start_at(kind, certs, seed, trust_domain, "127.0.0.1:0".parse()?).await
    }

    /// Like [`Register::start`], on `addr` (e.g. the address of one stopped before).
    pub async fn start_at(
        kind: DemoRegisterKind,
        certs: &Path,
        seed: u64,
        trust_domain: &str,
        addr: SocketAddr,
    ) -> Result<Register> {
        let member = match kind {
            DemoRegisterKind::CivilStatus => CIVIL_STATUS,
            DemoRegisterKind::JudicialRecords => JUDICIAL_RECORDS,
        };
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let material = TlsMaterial::load(&member_files(certs, member))?;
        let tls = Arc::new(ServerTls::new(&material, trust_domain)?);
        let config = lienthong_provider::ProviderConfig::new(trust_domain);
        let refused = config.refused_certificates.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let join = tokio::spawn(async move {
            if let Err(e) =
                lienthong_provider::demo::run_demo_register(kind, seed, tls, config, listener, shutdown).await
            {
                tracing::error!(error = %e, "demo register stopped");
            }
        });
        Ok(Register {
            kind,
            member,
            addr,
            refused,
            shutdown: Some(tx),
            join: Some(join),
        })
    }

    /// The endpoint URL to register with the broker.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// Stops the register (its port stops answering).
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
    }
}

impl Drop for Register {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A running federation.
pub struct Federation {
    /// Root directory.
    pub dir: PathBuf,
    /// Certificates directory (`ca.pem`, `<member>.pem`, `<member>.key`).
    pub certs: PathBuf,
    /// The broker config file written for `lienthong serve`.
    pub config_path: PathBuf,
    /// The broker.
    pub broker: ServerHandle,
    /// `https://127.0.0.1:<port>`.
    pub broker_url: String,
    /// The registers.
    pub registers: Vec<Register>,
    /// Options it was started with.
    pub options: FederationOptions,
}

/// Writes certificates for the broker and every demo member.
pub fn make_certs(certs: &Path, trust_domain: &str) -> Result<()> {
    if !certs.join("ca.key").exists() {
        lienthong_tls::init_dir(certs, trust_domain)?;
    }
    let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    for (id, roles) in std::iter::once((ADMIN, &[][..])).chain(MEMBERS.iter().map(|m| (m.0, m.2))) {
        // Only the registers serve: the others' certificates name no host.
        let serves = roles.contains(&pb::Role::Provider);
        if !certs.join(format!("{id}.pem")).exists() {
            lienthong_tls::issue_member_in_dir(certs, id, if serves { &hosts } else { &[] })?;
        }
    }
    Ok(())
}

/// Writes a broker config file for this federation and loads it back through
/// the same loader `lienthong serve` uses.
pub fn write_config(opts: &FederationOptions, certs: &Path, data_dir: &Path) -> Result<(PathBuf, Config)> {
    let mut text = format!(
        "# Written by `lienthong demo`; run this broker alone with `lienthong serve --config {path}`\n\
         listen = {listen:?}\n\
         data_dir = {data:?}\n\
         trust_domain = {td:?}\n\
         bootstrap_admin = {admin:?}\n",
        path = opts.dir.join("broker.toml").display(),
        listen = opts.listen.as_deref().unwrap_or("127.0.0.1:7443"),
        data = data_dir.display().to_string(),
        td = opts.trust_domain,
        admin = ADMIN,
    );
    if let Some(url) = &opts.database_url {
        text.push_str(&format!("database_url = {url:?}\n"));
    }
    text.push_str(&format!(
        "\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        certs.join("ca.pem").display().to_string(),
        certs.join("broker.pem").display().to_string(),
        certs.join("broker.key").display().to_string()
    ));
    if let Some(m) = &opts.metrics_listen {
        text.push_str(&format!("\n[telemetry]\nmetrics_listen = {m:?}\n"));
        if let Some(ca) = &opts.metrics_client_ca {
            text.push_str(&format!("metrics_client_ca = {:?}\n", ca.display().to_string()));
        }
    }
    // Last, so that bare keys at the start of `extra_config` land in it.
    text.push_str("\n[audit]\nsign_interval_ms = 200\n");
    text.push_str(&opts.extra_config);
    let path = opts.dir.join("broker.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    let config = Config::load(Some(&path), std::iter::empty())?;
    Ok((path, config))
}

impl Federation {
    /// Starts everything and sets the federation up (members, schemas,
    /// endpoints, grants).
    pub async fn start(options: FederationOptions) -> Result<Federation> {
        let fed = Self::start_bare(options).await?;
        fed.setup().await?;
        Ok(fed)
    }

    /// Starts certificates, broker and registers without any administration.
    pub async fn start_bare(mut options: FederationOptions) -> Result<Federation> {
        lienthong_tls::install_crypto_provider();
        std::fs::create_dir_all(&options.dir).with_context(|| format!("creating {}", options.dir.display()))?;
        let certs = options.dir.join("certs");
        make_certs(&certs, &options.trust_domain)?;
        let wanted = options.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let listener = TcpListener::bind(&wanted)
            .await
            .with_context(|| format!("the demo's broker cannot listen on {wanted}"))?;
        let bound = listener.local_addr()?;
        // The config names the port in use, so that `serve --config` of it
        // serves where the printed commands call.
        options.listen = Some(bound.to_string());
        let (config_path, config) = write_config(&options, &certs, &options.dir.join("broker-data"))?;
        let broker = lienthong_broker::start(config, Some(listener)).await?;
        // The certificates name localhost and 127.0.0.1.
        let host = match bound.ip() {
            ip if ip.is_unspecified() || ip.is_loopback() => "127.0.0.1".to_string(),
            ip => ip.to_string(),
        };
        let broker_url = format!("https://{host}:{}", broker.addr.port());
        let mut registers = Vec::new();
        for kind in [DemoRegisterKind::CivilStatus, DemoRegisterKind::JudicialRecords] {
            registers.push(Register::start(kind, &certs, options.seed, &options.trust_domain).await?);
        }
        Ok(Federation {
            dir: options.dir.clone(),
            certs,
            config_path,
            broker,
            broker_url,
            registers,
            options,
        })
    }

    /// Clients acting as `member`.
    pub async fn client(&self, member: &str) -> Result<Clients> {
        connect(&self.broker_url, &member_files(&self.certs, member)).await
    }

    /// Admits the demo members, registers the schemas (as each register's
    /// integrator), adds endpoints and creates the grants.
    pub async fn setup(&self) -> Result<()> {
        let admin = self.client(ADMIN).await?;
        for (id, name, roles) in MEMBERS {
            let r = admin
                .admin()
                .add_member(pb::AddMemberRequest {
                    id: id.to_string(),
                    display_name: name.to_string(),
                    roles: roles.iter().map(|r| *r as i32).collect(),
                })
                .await;
            match r {
                Ok(_) => {}
                Err(s) if s.code() == tonic::Code::AlreadyExists => {}
                Err(s) => return Err(status_error(s)).context(format!("adding member {id}")),
            }
        }
        for (record_type, json) in lienthong_provider::demo::demo_schemas() {
            let def = definition_from_json(json).with_context(|| format!("schema file of {record_type}"))?;
            let owner = def.owner.clone();
            let integrator = self.client(&owner).await?;
            integrator
                .schemas()
                .register(pb::RegisterRequest {
                    definition: Some(def),
                    compatibility: 0,
                })
                .await
                .map_err(status_error)
                .with_context(|| format!("registering {record_type}"))?;
        }
        let existing = admin
            .admin()
            .list_endpoints(pb::ListEndpointsRequest::default())
            .await
            .map_err(status_error)?
            .into_inner()
            .endpoints;
        for reg in &self.registers {
            if existing.iter().any(|e| e.provider == reg.member && e.url == reg.url()) {
                continue;
            }
            admin
                .admin()
                .add_endpoint(pb::AddEndpointRequest {
                    provider: reg.member.to_string(),
                    url: reg.url(),
                })
                .await
                .map_err(status_error)
                .with_context(|| format!("adding the endpoint of {}", reg.member))?;
        }
        for g in demo_grants() {
            match admin.admin().create_grant(g).await {
                Ok(_) => {}
                // A federation started again in its directory: the grant made
                // the first time still allows this, and is not made twice.
                Err(s) if s.code() == tonic::Code::AlreadyExists => {}
                Err(s) => return Err(status_error(s)).context("creating a grant"),
            }
        }
        Ok(())
    }

    /// Stops the registers only (the broker may already be gone).
    pub async fn shutdown_registers(&mut self) {
        for r in &mut self.registers {
            r.stop().await;
        }
    }

    /// Stops registers and broker; the broker flushes and signs its log.
    pub async fn shutdown(mut self) -> Result<()> {
        for r in &mut self.registers {
            r.stop().await;
        }
        self.broker.shutdown().await?;
        Ok(())
    }
}

/// The grants of the demo: what the judicial-records office may read, and why.
pub fn demo_grants() -> Vec<pb::CreateGrantRequest> {
    let grant = |record_type: &str, fields: &[&str], purposes: &[&str]| pb::CreateGrantRequest {
        consumer: JUDICIAL_OFFICE.into(),
        record_type: record_type.into(),
        fields: fields.iter().map(|s| s.to_string()).collect(),
        purposes: purposes.iter().map(|s| s.to_string()).collect(),
        valid_from: None,
        valid_until: None,
        rate_limit_per_minute: 600,
    };
    vec![
        grant(
            "civil_status.birth_record",
            &[
                "/full_name",
                "/birth_date",
                "/gender",
                "/place_of_birth",
                "/father/full_name",
                "/mother/full_name",
            ],
            &[PURPOSE_CERTIFICATE, PURPOSE_DATA_SHARING],
        ),
        grant(
            "civil_status.marriage_record",
            &["/marriage_date", "/spouse/full_name", "/status"],
            &[PURPOSE_CERTIFICATE],
        ),
        grant("judicial.criminal_record_extract", &["*"], &[PURPOSE_CERTIFICATE]),
    ]
}

/// Reads a record type file as `lienthong schema register --file` takes it:
/// `{name, description, owner, subject_key, query_schema, record_schema}`.
pub fn definition_from_json(text: &str) -> Result<pb::RecordTypeDefinition> {
    let v: serde_json::Value = serde_json::from_str(text).context("the file is not valid JSON")?;
    let s = |k: &str| -> Result<String> {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .with_context(|| format!("the file has no string field {k:?}"))
    };
    let schema = |k: &str| -> Result<String> {
        v.get(k)
            .filter(|x| x.is_object())
            .map(|x| x.to_string())
            .with_context(|| format!("the file has no object field {k:?}"))
    };
    Ok(pb::RecordTypeDefinition {
        name: s("name")?,
        description: s("description")?,
        owner: s("owner")?,
        query_schema_json: schema("query_schema")?,
        record_schema_json: schema("record_schema")?,
        subject_key: s("subject_key")?,
    })
}
