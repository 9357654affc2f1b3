//! Server assembly: opens the store and the audit log, bootstraps the first
//! admin, and serves every service (plus health and reflection) over mutual
//! TLS until shut down.

use crate::admin::AdminService;
use crate::audit::AuditService;
use crate::config::Config;
use crate::error::BrokerError;
use crate::exchange::ExchangeService;
use crate::protocol::CallOrigin;
use crate::reflection::{Index, ReflectionV1, ReflectionV1Alpha};
use crate::relay::Relay;
use crate::schema::SchemaService;
use crate::state::Broker;
use arc_swap::ArcSwap;
use lienthong::v1::admin_server::AdminServer;
use lienthong::v1::audit_server::AuditServer;
use lienthong::v1::exchange_server::ExchangeServer;
use lienthong::v1::schema_registry_server::SchemaRegistryServer;
use lienthong_audit::{AuditConfig, AuditLog, LogKeys};
use lienthong_core::audit::{AuditEvent, EntryKind, Outcome};
use lienthong_core::{Member, MemberId, Role};
use lienthong_store::{StoreError, StoreOptions};
use lienthong_tls::AcceptOptions;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_reflection::pb::v1::server_reflection_server::ServerReflectionServer;
use tonic_reflection::pb::v1alpha::server_reflection_server::ServerReflectionServer as ServerReflectionAlphaServer;

/// HTTP/2 connection receive window of the broker's listener (1 MiB).
const CONNECTION_WINDOW: u32 = 1 << 20;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material unusable.
    #[error("tls: {0}")]
    Tls(#[from] lienthong_tls::TlsError),
    /// Database unusable.
    #[error("database: {0}")]
    Store(#[from] StoreError),
    /// Audit log unusable.
    #[error("audit log: {0}")]
    Audit(#[from] lienthong_audit::AuditError),
    /// Listener or data directory.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Broker(#[from] BrokerError),
}

/// A running broker.
pub struct ServerHandle {
    /// Address the gRPC listener is bound to.
    pub addr: SocketAddr,
    /// Address of the Prometheus `/metrics` listener, when configured.
    pub metrics_addr: Option<SocketAddr>,
    /// Shared state (for tests and the demo).
    pub broker: Arc<Broker>,
    shutdown: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<Result<(), StartError>>>,
    reload_tls: Arc<tokio::sync::Notify>,
}

impl ServerHandle {
    /// Stops accepting, drains in-flight requests (up to the configured grace
    /// period), flushes the audit log and signs a final tree head.
    pub async fn shutdown(mut self) -> Result<(), StartError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.wait().await
    }

    /// Waits until the server stops by itself (after a shutdown signal).
    ///
    /// Cancel-safe: dropping the future (say, in a `select!` that a signal
    /// won) leaves the handle waitable, so a later `wait` still sees the drain
    /// and the final tree head through.
    pub async fn wait(&mut self) -> Result<(), StartError> {
        let Some(join) = self.join.as_mut() else {
            return Ok(());
        };
        let ended = join.await;
        self.join = None;
        match ended {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StartError::Broker(BrokerError::Internal(format!(
                "server task ended: {e}"
            )))),
        }
    }

    /// Has the broker look at its TLS files now (`lienthong serve` does on
    /// SIGHUP) rather than at its next `tls.reload_check_ms`; the outcome is
    /// in its log and in `lienthong_tls_files_refused`.
    pub fn reload_tls(&self) {
        self.reload_tls.notify_one();
    }

    /// A sender that starts the graceful shutdown.
    pub fn take_shutdown(&mut self) -> Option<oneshot::Sender<()>> {
        self.shutdown.take()
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StartError {
    let what = what.into();
    move |source| StartError::Io { what, source }
}

/// Creates the data directory readable by the owner only.
/// Refuses a broker whose subject secret is not the one the federation's
/// database was first started with: the citizens' histories would not find
/// the lookups it logs (a replica started without the shared
/// `subject-hmac.key`, which then made one of its own, or given another's).
async fn check_subject_key(
    store: &Arc<dyn lienthong_store::Store>,
    keys: &LogKeys,
    data_dir: &std::path::Path,
) -> Result<(), StartError> {
    let recorded = store.claim_subject_key(keys.subject_key_fingerprint()).await?;
    if recorded == keys.subject_key_fingerprint() {
        return Ok(());
    }
    Err(lienthong_audit::AuditError::Keys(format!(
        "{} is not the subject secret this federation's database was started with: citizens' \
         histories would not find the lookups this broker logs. Copy subject-hmac.key from the data_dir \
         of a broker already running on this database into {} (every replica holds the same file, \
         mode 0600), then start again",
        data_dir.join(lienthong_audit::keys::SUBJECT_KEY_FILE).display(),
        data_dir.display()
    ))
    .into())
}

fn create_data_dir(dir: &std::path::Path) -> Result<(), StartError> {
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create data directory {}", dir.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("cannot restrict data directory {}", dir.display())))?;
    }
    Ok(())
}

/// How often the claim on this broker's log is checked (see
/// [`lienthong_store::LogClaim::still_held`]).
const CLAIM_CHECK: Duration = Duration::from_secs(5);

/// Keeps `claim` (until aborted, after the final tree head) and checks it
/// every [`CLAIM_CHECK`]; the receiver turns `true` once another broker holds it.
fn watch_log_claim(
    mut claim: lienthong_store::LogClaim,
    log_id: String,
) -> (JoinHandle<()>, tokio::sync::watch::Receiver<bool>) {
    let (lost_tx, lost_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut ticker = tokio::time::interval(CLAIM_CHECK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            match claim.still_held().await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(
                        %log_id,
                        "another broker holds this broker's audit log now (its data directory was copied); stopping"
                    );
                    lost_tx.send_replace(true);
                    // Keeps `claim` until aborted.
                    std::future::pending::<()>().await;
                }
                // The database out of reach: no one writes the log meanwhile.
                Err(e) => tracing::warn!(error = %e, "cannot check this broker's claim on its audit log"),
            }
        }
    });
    (task, lost_rx)
}

/// Locks `dir` for this process (`broker.lock`, released when the file is
/// closed, at exit at the latest): two brokers on one data directory would
/// write one audit log with one signing key, each taking the other's
/// entries for its own. Whatever else writes a broker's data directory (the
/// bench filling its log) takes it too.
pub fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    let path = dir.join("broker.lock");
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(&path)
        .map_err(io(format!("cannot open {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StartError::Broker(BrokerError::FailedPrecondition(format!(
            "another broker is running with data directory {} (it holds {}); stop it first, or give this one a \
             data directory of its own",
            dir.display(),
            path.display()
        )))),
        Err(std::fs::TryLockError::Error(e)) => Err(StartError::Io {
            what: format!("cannot lock {}", path.display()),
            source: e,
        }),
    }
}

/// Starts a broker. With `listener` given (tests bind `127.0.0.1:0`), serves on
/// it; otherwise binds `config.listen`.
pub async fn start(config: Config, listener: Option<TcpListener>) -> Result<ServerHandle, StartError> {
    lienthong_tls::install_crypto_provider();
    let config = Arc::new(config);
    create_data_dir(&config.data_dir)?;
    let data_dir_lock = lock_data_dir(&config.data_dir)?;
    let own = crate::own_tls::OwnTls::load(&config)?;
    crate::own_tls::warn_if_expiring(&config.tls.cert, own.expires, OffsetDateTime::now_utc());
    let store = lienthong_store::open(&StoreOptions {
        url: config.database_url(),
        max_connections: config.limits.database_max_connections,
        acquire_timeout: Duration::from_millis(config.limits.database_acquire_timeout_ms),
        allow_unverified_postgres: config.allow_unverified_database,
    })
    .await?;
    let keys = LogKeys::load_or_create(&config.data_dir)?;
    let Some(log_claim) = store.claim_log(&keys.log_id()).await? else {
        let why = match store.backend() {
            lienthong_store::Backend::Sqlite => format!(
                "another broker is running on this SQLite database ({}): a SQLite database serves one broker; \
                 stop it first, or give this one a database of its own (several replicas share a PostgreSQL one)",
                config.database_url()
            ),
            lienthong_store::Backend::Postgres => format!(
                "another broker is writing audit log {} in this database: its data directory \
                 (audit-signing.key) was copied from, or is shared with, {}; every broker needs a data \
                 directory, and so a signing key, of its own",
                keys.log_id(),
                config.data_dir.display()
            ),
        };
        return Err(StartError::Broker(BrokerError::FailedPrecondition(why)));
    };
    check_subject_key(&store, &keys, &config.data_dir).await?;
    let audit = AuditLog::open(
        store.clone(),
        keys,
        AuditConfig {
            sign_interval: Duration::from_millis(config.audit.sign_interval_ms),
            max_batch: config.audit.max_batch,
            commit_timeout: Duration::from_millis(config.audit.commit_timeout_ms),
            ..AuditConfig::default()
        },
    )
    .await?;
    bootstrap_admin(&config, &store, &audit).await?;
    let served = crate::own_tls::Served {
        server: Arc::new(own.server),
        metrics: own.metrics.map(|config| Arc::new(ArcSwap::new(config))),
    };
    let metrics_tls = served.metrics.as_ref().map(|tls| crate::metrics::MetricsTls {
        config: tls.clone(),
        handshake_timeout: Duration::from_millis(config.tls.handshake_timeout_ms),
    });
    let relay = Relay::new(own.material, config.trust_domain.clone(), config.relay.clone());
    let broker = Broker::new(config.clone(), store, audit, relay).await?;
    let metrics_listener = match config.telemetry.metrics_addr() {
        None => None,
        Some(Ok(addr)) => Some(crate::metrics::bind(addr).await.map_err(|e| StartError::Io {
            what: format!("cannot listen for metrics on {addr}"),
            source: e.source,
        })?),
        Some(Err(e)) => return Err(BrokerError::InvalidArgument(format!("telemetry.metrics_listen: {e}")).into()),
    };
    let metrics_addr = match &metrics_listener {
        Some(l) => Some(l.local_addr().map_err(io("metrics listener address"))?),
        None => None,
    };
    broker.metrics.certificate_expiry.set(own.expires.unix_timestamp());
    let server_tls = served.server.clone();
    let reload_tls = Arc::new(tokio::sync::Notify::new());
    let tls_watch =
        crate::own_tls::spawn_watch(config.clone(), broker.clone(), served, own.expires, reload_tls.clone());
    let watcher = broker.spawn_watcher(Duration::from_secs(2));
    let refusal_summaries = broker.spawn_refusal_summaries(Duration::from_secs(10));

    let listener = match listener {
        Some(l) => l,
        None => TcpListener::bind(&config.listen)
            .await
            .map_err(io(format!("cannot listen on {}", config.listen)))?,
    };
    let addr = listener.local_addr().map_err(io("listener address"))?;
    let incoming = lienthong_tls::incoming(
        listener,
        server_tls,
        AcceptOptions {
            max_concurrent_handshakes: config.tls.max_concurrent_handshakes,
            handshake_timeout: Duration::from_millis(config.tls.handshake_timeout_ms),
            max_handshakes_per_address: config.tls.max_handshakes_per_address,
            unauthenticated: Some(lienthong_tls::UnauthenticatedLimits {
                max_connections: config.tls.max_unauthenticated_connections,
                lifetime: Duration::from_millis(config.tls.unauthenticated_connection_ms),
            }),
        },
    );
    // The certificate each member connects with, for the expiry warnings.
    let noting = broker.clone();
    let incoming = tokio_stream::StreamExt::map(incoming, move |accepted| {
        if let Ok(stream) = &accepted {
            noting.note_member_certificate(stream.peer());
        }
        accepted
    });

    let health_reporter = lienthong::health::HealthReporter::new();
    health_reporter.set_serving::<AdminServer<AdminService>>();
    health_reporter.set_serving::<SchemaRegistryServer<SchemaService>>();
    health_reporter.set_serving::<ExchangeServer<ExchangeService>>();
    health_reporter.set_serving::<AuditServer<AuditService>>();
    // NOT_SERVING while this replica refuses lookups: an altered log, a stale snapshot.
    let exchange_health = broker.spawn_exchange_health(health_reporter.clone());
    let reflection = reflection_index().map_err(|e| BrokerError::Internal(format!("reflection: {e}")))?;
    // Cancelled at shutdown, ending open reflection streams (see `reflection::answers`).
    let reflection_closing = tokio_util::sync::CancellationToken::new();
    let reflection_alpha =
        ServerReflectionAlphaServer::new(ReflectionV1Alpha(reflection.clone(), reflection_closing.clone()))
            .accept_compressed(GZIP);
    let reflection =
        ServerReflectionServer::new(ReflectionV1(reflection, reflection_closing.clone())).accept_compressed(GZIP);

    let max = config.limits.max_message_bytes;
    let calls = TaskTracker::new();
    let router = tonic::transport::Server::builder()
        // h2 closes a connection whose peer has more small DATA frames unread
        // than half the connection window allows (ENHANCE_YOUR_CALM); with the
        // default 64 KiB that is ~200 queued lookups on one connection.
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // Stamps each call's arrival, refuses what is not gRPC, and gives
        // tonic's own failures the codes the gRPC spec gives them.
        .layer(crate::protocol::ProtocolLayer)
        .add_service(health_reporter.service().accept_compressed(GZIP))
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            ToTheEnd::new(
                AdminServer::new(AdminService::new(broker.clone()))
                    .max_decoding_message_size(max)
                    .accept_compressed(GZIP),
                &calls,
            )
            .audited(&broker),
        )
        .add_service(
            ToTheEnd::new(
                SchemaRegistryServer::new(SchemaService::new(broker.clone()))
                    .max_decoding_message_size(max)
                    .accept_compressed(GZIP),
                &calls,
            )
            .audited(&broker),
        )
        .add_service(
            ToTheEnd::bounded(
                ExchangeServer::new(ExchangeService::new(broker.clone()))
                    .max_decoding_message_size(max)
                    .accept_compressed(GZIP),
                &calls,
                config.limits.max_concurrent_exchanges,
                broker.metrics.exchanges_waiting.clone(),
            )
            .audited(&broker),
        )
        .add_service(
            ToTheEnd::new(
                AuditServer::new(AuditService::new(broker.clone()))
                    .max_decoding_message_size(max)
                    .accept_compressed(GZIP),
                &calls,
            )
            .audited(&broker),
        );

    // The metrics listener outlives the gRPC one until the final tree head
    // is signed, so a scrape can watch the drain.
    let (metrics_stop, metrics_task) = match metrics_listener {
        Some(listener) => {
            let (stop, stopped) = oneshot::channel::<()>();
            let tls = metrics_tls.is_some();
            let task = tokio::spawn(crate::metrics::serve(
                listener,
                metrics_tls,
                Arc::downgrade(&broker),
                async move {
                    let _ = stopped.await;
                },
            ));
            if let Some(addr) = metrics_addr {
                if tls {
                    tracing::info!(
                        %addr,
                        "metrics at https://{addr}/metrics, for scrapers with a certificate from telemetry.metrics_client_ca"
                    );
                } else if addr.ip().is_loopback() {
                    tracing::info!(%addr, "metrics at http://{addr}/metrics");
                } else {
                    tracing::warn!(
                        %addr,
                        "metrics listener is reachable from the network; /metrics has no authentication \
                         (set telemetry.metrics_client_ca to require client certificates)"
                    );
                }
            }
            (Some(stop), Some(task))
        }
        None => (None, None),
    };

    let (tx, rx) = oneshot::channel::<()>();
    let grace = Duration::from_millis(config.limits.shutdown_grace_ms);
    let task_broker = broker.clone();
    let (claim_watch, claim_lost) = watch_log_claim(log_claim, broker.audit.log_id().to_owned());
    let join = tokio::spawn(async move {
        // Held until the final tree head is signed: no other broker writes
        // this log, or signs with this key, before then.
        let _dir_lock = data_dir_lock;
        let lost = claim_lost.clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let signal = async move {
            let mut lost = lost;
            tokio::select! {
                _ = rx => {}
                // Another broker writes this log now: stop rather than write
                // it too (the orchestrator's restart is then refused, saying so).
                Ok(_) = lost.wait_for(|lost| *lost) => {}
            }
            // Ended first, so that it cannot report SERVING after this.
            exchange_health.abort();
            let _ = exchange_health.await;
            // Every service and the server as a whole ("") NOT_SERVING, so
            // that a probe or a Watch of any of them moves traffic away
            // during the drain; then every Watch ends, as its call would
            // otherwise hold its connection, and so the drain, to the end
            // of the grace period.
            health_reporter.shut_down();
            reflection_closing.cancel();
            let _ = stop_tx.send(());
        };
        let serve = router.serve_with_incoming_shutdown(incoming, signal);
        tokio::pin!(serve);
        // Serve until the signal; then give in-flight requests the grace period.
        let served = tokio::select! {
            r = &mut serve => Some(r),
            _ = stop_rx => None,
        };
        let grace_ends = tokio::time::Instant::now() + grace;
        // Register calls still under way shortly before the end are given up,
        // leaving their lookups the rest of the period to be audited and
        // answered (UNAVAILABLE), rather than dropped, unaudited, at its end.
        let give_up_at = grace_ends - (grace / 4).min(Duration::from_secs(1));
        let giving_up = {
            let broker = task_broker.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(give_up_at).await;
                broker.relay.give_up_calls();
            })
        };
        let result = match served {
            Some(r) => r,
            None => match tokio::time::timeout_at(grace_ends, &mut serve).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        grace_ms = grace.as_millis() as u64,
                        "grace period over; abandoning in-flight requests"
                    );
                    Ok(())
                }
            },
        };
        // Connections are closed; calls whose client left earlier may still be
        // running towards their audit entry, which the final head should cover.
        calls.close();
        if tokio::time::timeout_at(grace_ends, calls.wait()).await.is_err() {
            tracing::warn!(
                running = calls.len(),
                "grace period over; calls whose client left are abandoned before their end"
            );
        }
        giving_up.abort();
        watcher.abort();
        tls_watch.abort();
        refusal_summaries.abort();
        task_broker.summarize_refusals().await;
        let head = task_broker.audit.shutdown().await;
        if let Some(stop) = metrics_stop {
            let _ = stop.send(());
        }
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        let head = head?;
        // SQLite copies its WAL back and empties it here, where the stop
        // waits for it: a stopped broker's database is then one file, which
        // a backup can be copied over without meeting an old WAL.
        task_broker.store.close().await;
        if let Some(h) = head {
            tracing::info!(tree_size = h.tree_size, "final tree head signed");
        }
        claim_watch.abort();
        let _ = claim_watch.await;
        if *claim_lost.borrow() {
            return Err(StartError::Broker(BrokerError::FailedPrecondition(
                "another broker took this broker's audit log (its data directory was copied); stopped rather \
                 than write one log from two brokers"
                    .into(),
            )));
        }
        result.map_err(|e| StartError::Broker(BrokerError::Internal(format!("server: {e}"))))
    });
    tracing::info!(%addr, trust_domain = %config.trust_domain, log_id = %broker.audit.log_id(), "broker serving");
    Ok(ServerHandle {
        addr,
        metrics_addr,
        broker,
        shutdown: Some(tx),
        join: Some(join),
        reload_tls,
    })
}

/// The request compression every service accepts besides none: stock
/// clients offer gzip (grpc-java's `withCompression("gzip")`, grpcio's
/// `compression=Gzip`), and a message is still held to
/// `limits.max_message_bytes` once decompressed. Answers go uncompressed,
/// which every client reads.
const GZIP: tonic::codec::CompressionEncoding = tonic::codec::CompressionEncoding::Gzip;

/// Calls at once on one client connection (HTTP/2
/// `SETTINGS_MAX_CONCURRENT_STREAMS`): without it a connection, even one
/// without a certificate on the health service, could hold any number of
/// streams open. The load generator's 256 lookups on 4 connections, a
/// busy agency backend, stay well under it.
const MAX_STREAMS_PER_CONNECTION: u32 = 1_024;

/// The reflection service's contents: the services this broker serves and
/// their types. The contract also holds `lienthong.provider.v1.RecordProvider`,
/// which registers serve and the broker does not: a client listing the
/// broker's services must not find it.
fn reflection_index() -> Result<Arc<Index>, crate::reflection::ReflectionError> {
    let services: Vec<&str> = lienthong::SERVICE_NAMES
        .iter()
        .copied()
        .chain([
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ])
        .collect();
    let index = Index::new(
        &[
            lienthong::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ],
        &services,
    )?;
    Ok(Arc::new(index))
}

/// Creates the admin named in the config on first start, so a fresh
/// federation can be administered.
async fn bootstrap_admin(
    config: &Config,
    store: &Arc<dyn lienthong_store::Store>,
    audit: &Arc<AuditLog>,
) -> Result<(), StartError> {
    if config.bootstrap_admin.is_empty() {
        // Every administration needs an admin: without one, every call is
        // refused and nothing says why until someone reads the config.
        let members = store.list_members().await?;
        if !members.iter().any(|m| m.enabled && m.roles.contains(&Role::Admin)) {
            tracing::warn!(
                "no enabled member has the admin role and `bootstrap_admin` is not set: nobody can add members, \
                 endpoints or grants; set `bootstrap_admin` (or LIENTHONG_BOOTSTRAP_ADMIN) to an admin's member id, \
                 issue it a certificate (`lienthong certs issue --member <id>`) and restart"
            );
        }
        return Ok(());
    }
    let id = MemberId::new(config.bootstrap_admin.clone()).map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
    if store.get_member(id.as_str()).await?.is_some() {
        return Ok(());
    }
    let now = OffsetDateTime::now_utc();
    let member = Member {
        id: id.clone(),
        display_name: "Federation administrator (bootstrap)".into(),
        roles: vec![Role::Admin],
        enabled: true,
        disabled_reason: String::new(),
        created_at: now,
        updated_at: now,
    };
    match store.insert_member(&member).await {
        Ok(()) | Err(StoreError::AlreadyExists { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let mut event = AuditEvent::new(EntryKind::Admin, now);
    event.actor = "config".into();
    event.action = "member.bootstrap".into();
    event.target = id.to_string();
    event.outcome = Outcome::Allowed;
    event.reason = "roles=admin".into();
    audit.append(event).await?;
    store.publish_change().await?;
    tracing::info!(member = %id, "bootstrap admin created");
    Ok(())
}

/// When a request reached the broker, before it waited for a turn: its
/// `grpc-timeout` counts from here.
#[derive(Clone, Copy, Debug)]
pub struct Arrived(pub Instant);

/// A call as hyper hands it to the services.
pub(crate) type HttpRequest = http::Request<tonic::body::Body>;
/// An answer as the services hand it to hyper.
pub(crate) type HttpResponse = http::Response<tonic::body::Body>;
type Answer = futures::future::BoxFuture<'static, Result<HttpResponse, std::convert::Infallible>>;

/// The tasks of calls under way; shutdown waits for them (within the grace
/// period) before the final tree head, including calls whose client left.
type TaskTracker = tokio_util::task::TaskTracker;

/// A call that runs to its end even when its client leaves.
///
/// When a client hangs up (deadline, cancel, dropped connection), hyper drops
/// the call's future wherever it stands: after the register answered but
/// before the audit entry was written, or after an admin change was stored but
/// before it was logged. This future runs the call in place, in hyper's task
/// for the stream, while the client waits; dropped before the call's end, it
/// hands the call (pinned in its box, so nothing moves) to a task of its own,
/// which goes on to the audited end and throws only the answer away. Running
/// in place spares every call a task and a wake-up between tasks; a call
/// counts in the tracker from its start either way. A handler that panics is
/// answered `INTERNAL`.
struct RunToEnd {
    call: Option<Answer>,
    tracker: TaskTracker,
    /// For a call that had to wait for a turn: whether it has one. Given up
    /// before, it never starts and nothing is handed on.
    started: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl RunToEnd {
    /// Starts tracking `call`, holding `keep` until it ends; an answer tonic
    /// made before the handler ran is audited as `origin`'s.
    fn new<F, K>(tracker: &TaskTracker, call: F, keep: K, origin: Option<CallOrigin>) -> RunToEnd
    where
        F: std::future::Future<Output = Result<HttpResponse, std::convert::Infallible>> + Send + 'static,
        K: Send + 'static,
    {
        let token = tracker.token();
        RunToEnd {
            call: Some(Box::pin(async move {
                let answer = audited(call, origin).await;
                drop((keep, token));
                answer
            })),
            tracker: tracker.clone(),
            started: None,
        }
    }

    /// A call that waits for one of `limit`'s turns before `inner` is called
    /// with `request`, in arrival order, and no longer than the client's
    /// deadline allows (counted from its arrival, less the margin a lookup
    /// keeps): past it, it is answered `DEADLINE_EXCEEDED` and audited as
    /// `origin`'s, having released nothing.
    fn waiting<S>(
        tracker: &TaskTracker,
        limit: &Limit,
        mut inner: S,
        request: HttpRequest,
        origin: Option<CallOrigin>,
    ) -> RunToEnd
    where
        S: tower::Service<HttpRequest, Response = HttpResponse, Error = std::convert::Infallible> + Send + 'static,
        S::Future: Send + 'static,
    {
        use std::sync::atomic::Ordering;
        let token = tracker.token();
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = started.clone();
        let turns = limit.turns.clone();
        let waiting = Waiting::new(&limit.waiting);
        let deadline = turn_deadline(&request);
        RunToEnd {
            call: Some(Box::pin(async move {
                let turn = match deadline {
                    Some(at) => tokio::time::timeout_at(at.into(), turns.acquire_owned()).await.ok(),
                    None => Some(turns.acquire_owned().await),
                };
                // Either way it now runs to its end: the call, or its entry.
                flag.store(true, Ordering::Release);
                drop(waiting);
                let Some(Ok(turn)) = turn else {
                    if let Some(origin) = origin {
                        origin.audit(crate::protocol::TIMED_OUT).await;
                    }
                    drop(token);
                    return Ok(crate::protocol::waited_past_deadline());
                };
                let answer = match std::future::poll_fn(|cx| inner.poll_ready(cx)).await {
                    Ok(()) => audited(inner.call(request), origin).await,
                    Err(never) => match never {},
                };
                drop((turn, token));
                answer
            })),
            tracker: tracker.clone(),
            started: Some(started),
        }
    }
}

/// The answer of `call`, once a call tonic refused before its handler (see
/// [`crate::protocol::refused_unseen`]) is audited as `origin`'s.
async fn audited<F>(call: F, origin: Option<CallOrigin>) -> Result<HttpResponse, std::convert::Infallible>
where
    F: std::future::Future<Output = Result<HttpResponse, std::convert::Infallible>>,
{
    let answer = call.await;
    let refused = answer.as_ref().ok().and_then(crate::protocol::refused_unseen);
    if let (Some(origin), Some(failure)) = (origin, refused) {
        origin.audit(failure).await;
    }
    answer
}

/// When a call waiting for a turn stops waiting: its client's deadline less
/// the margin a lookup keeps (a tenth, at most 50 ms), so that the client
/// hears the broker's answer before its own timer fires.
fn turn_deadline(request: &HttpRequest) -> Option<Instant> {
    let metadata = tonic::metadata::MetadataMap::from_headers(request.headers().clone());
    let timeout = crate::exchange::grpc_timeout(&metadata)?;
    let margin = (timeout / 10).min(Duration::from_millis(50));
    let arrived = request.extensions().get::<Arrived>().map_or_else(Instant::now, |a| a.0);
    arrived.checked_add(timeout - margin)
}

/// Counts a call in `lienthong_exchanges_waiting` while it lives.
struct Waiting(prometheus_client::metrics::gauge::Gauge);

impl Waiting {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Waiting {
        gauge.inc();
        Waiting(gauge.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn failed_call() -> HttpResponse {
    tonic::Status::internal("the broker failed while handling this request; it is in the broker's log, retry later")
        .into_http()
}

impl std::future::Future for RunToEnd {
    type Output = Result<HttpResponse, std::convert::Infallible>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let Some(call) = self.call.as_mut() else {
            // Polled after its answer: hyper never does.
            return std::task::Poll::Ready(Ok(failed_call()));
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call.as_mut().poll(cx))) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(answer)) => {
                self.call = None;
                std::task::Poll::Ready(answer)
            }
            Err(_) => {
                self.call = None;
                tracing::error!("a call ended without an answer: its handler panicked");
                std::task::Poll::Ready(Ok(failed_call()))
            }
        }
    }
}

impl Drop for RunToEnd {
    fn drop(&mut self) {
        let Some(call) = self.call.take() else { return };
        if self
            .started
            .as_ref()
            .is_some_and(|s| !s.load(std::sync::atomic::Ordering::Acquire))
        {
            // Given up while waiting for a turn: it never starts.
            return;
        }
        // Outside a runtime (it is shutting down) there is nowhere to go on.
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tracker.spawn(async move {
                if futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(call))
                    .await
                    .is_err()
                {
                    tracing::error!("a call whose client had left panicked before its end");
                }
            });
        }
    }
}

/// A service whose every call runs to its end (see [`RunToEnd`]), and
/// optionally of which at most `limit` calls run at once across every
/// connection, the rest waiting for a turn in arrival order.
///
/// A call keeps its turn until it ends, even when its client has gone, so
/// calls given up on still count against the limit while they finish; a call
/// given up while still waiting never starts, and one whose deadline passes
/// while it waits is answered `DEADLINE_EXCEEDED` and audited. A waiting call
/// holds its HTTP/2 stream, its request and a small future, while a running
/// lookup holds its future, the relay call and its buffers: under a burst of
/// a thousand lookups on a CPU-bound broker the limit keeps memory near what
/// it needs, with the same throughput. Only the exchange is limited so health
/// checks, admin and audit calls are answered under load.
struct ToTheEnd<S> {
    inner: S,
    tracker: TaskTracker,
    /// Whose calls these are, to audit the ones tonic refuses unseen.
    broker: Option<Arc<Broker>>,
    limit: Option<Limit>,
}

#[derive(Clone)]
struct Limit {
    turns: Arc<tokio::sync::Semaphore>,
    /// Calls waiting for a turn, for `lienthong_exchanges_waiting`.
    waiting: prometheus_client::metrics::gauge::Gauge,
}

impl<S> ToTheEnd<S> {
    fn new(service: S, tracker: &TaskTracker) -> Self {
        ToTheEnd {
            inner: service,
            tracker: tracker.clone(),
            broker: None,
            limit: None,
        }
    }

    fn bounded(
        service: S,
        tracker: &TaskTracker,
        limit: usize,
        waiting: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        let turns = Arc::new(tokio::sync::Semaphore::new(limit.max(1)));
        let mut bounded = ToTheEnd::new(service, tracker);
        bounded.limit = Some(Limit { turns, waiting });
        bounded
    }

    /// Audits the calls tonic refuses before their handler (a message that
    /// cannot be decoded, too large, missing) as `broker`'s refusals.
    fn audited(mut self, broker: &Arc<Broker>) -> Self {
        self.broker = Some(broker.clone());
        self
    }
}

impl<S: Clone> Clone for ToTheEnd<S> {
    fn clone(&self) -> Self {
        ToTheEnd {
            inner: self.inner.clone(),
            tracker: self.tracker.clone(),
            broker: self.broker.clone(),
            limit: self.limit.clone(),
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for ToTheEnd<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<HttpRequest> for ToTheEnd<S>
where
    S: tower::Service<HttpRequest, Response = HttpResponse, Error = std::convert::Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = HttpResponse;
    type Error = std::convert::Infallible;
    type Future = RunToEnd;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        let origin = self.broker.as_ref().map(|b| CallOrigin::of(b, &request));
        let Some(limit) = &self.limit else {
            return RunToEnd::new(&self.tracker, self.inner.call(request), (), origin);
        };
        // A turn free now (none is free while calls wait: the semaphore hands
        // each released one to the first waiter) costs nothing more.
        match limit.turns.clone().try_acquire_owned() {
            Ok(turn) => RunToEnd::new(&self.tracker, self.inner.call(request), turn, origin),
            Err(_) => RunToEnd::waiting(&self.tracker, limit, self.inner.clone(), request, origin),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tower::Service;

    type Outcome = Result<http::Response<tonic::body::Body>, std::convert::Infallible>;

    fn request() -> http::Request<tonic::body::Body> {
        http::Request::new(tonic::body::Body::empty())
    }

    #[tokio::test]
    async fn a_call_given_up_by_its_client_still_runs_to_its_end() {
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        let mut service = ToTheEnd::new(
            tower::service_fn(move |_: http::Request<tonic::body::Body>| {
                let flag = flag.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    flag.store(true, Ordering::SeqCst);
                    Outcome::Ok(http::Response::new(tonic::body::Body::empty()))
                }
            }),
            &TaskTracker::new(),
        );
        let call = service.call(request());
        // The client hangs up: hyper drops the call's future.
        assert!(tokio::time::timeout(Duration::from_millis(5), call).await.is_err());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            finished.load(Ordering::SeqCst),
            "the call went on after its client left"
        );
    }

    /// A service that counts its calls, each taking `ms`.
    fn counted(
        ms: u64,
        calls: Arc<std::sync::atomic::AtomicUsize>,
    ) -> impl tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_: http::Request<tonic::body::Body>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Outcome::Ok(http::Response::new(tonic::body::Body::empty()))
            }
        })
    }

    fn with_timeout(timeout: &'static str) -> http::Request<tonic::body::Body> {
        let mut r = request();
        r.headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static(timeout));
        r.extensions_mut().insert(Arrived(Instant::now()));
        r
    }

    #[tokio::test]
    async fn a_call_given_up_keeps_its_turn_until_it_ends() {
        let waiting = prometheus_client::metrics::gauge::Gauge::default();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut first = ToTheEnd::bounded(counted(200, calls.clone()), &TaskTracker::new(), 1, waiting.clone());
        let mut second = first.clone();
        let call = first.call(request());
        assert!(tokio::time::timeout(Duration::from_millis(5), call).await.is_err());
        // Its client is gone, but the call still runs and holds the only turn.
        let mut next = second.call(request());
        let early = tokio::time::timeout(Duration::from_millis(50), &mut next).await;
        assert!(early.is_err(), "a second call got a turn while the first was running");
        assert_eq!(waiting.get(), 1);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let Ok(_) = next.await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the turn came back when the first call ended"
        );
        assert_eq!(waiting.get(), 0);
    }

    #[tokio::test]
    async fn a_call_given_up_while_waiting_never_starts() {
        let waiting = prometheus_client::metrics::gauge::Gauge::default();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut first = ToTheEnd::bounded(counted(100, calls.clone()), &TaskTracker::new(), 1, waiting.clone());
        let mut second = first.clone();
        let running = tokio::spawn(first.call(request()));
        let mut given_up = second.call(request());
        assert!(
            tokio::time::timeout(Duration::from_millis(20), &mut given_up)
                .await
                .is_err()
        );
        assert_eq!(waiting.get(), 1);
        drop(given_up);
        assert_eq!(waiting.get(), 0);
        let _ = running.await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the call given up while waiting ran");
    }

    #[tokio::test]
    async fn a_call_whose_deadline_passes_while_waiting_is_answered_deadline_exceeded() {
        let waiting = prometheus_client::metrics::gauge::Gauge::default();
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut first = ToTheEnd::bounded(counted(2_000, calls.clone()), &TaskTracker::new(), 1, waiting.clone());
        let mut second = first.clone();
        let _running = tokio::spawn(first.call(request()));
        // 100 ms from its arrival, less the broker's margin: well before the first ends.
        let Ok(answer) = tokio::time::timeout(Duration::from_secs(1), second.call(with_timeout("100m")))
            .await
            .expect("answered at its deadline, not after the running call");
        let status = tonic::Status::from_header_map(answer.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(
            status.message().contains("nothing was released"),
            "{}",
            status.message()
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the expired call never started");
        assert_eq!(waiting.get(), 0);
    }

    #[tokio::test]
    async fn shutdown_waits_for_calls_running_in_place_and_for_those_handed_off() {
        let tracker = TaskTracker::new();
        let slow = |ms| {
            tower::service_fn(move |_: http::Request<tonic::body::Body>| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Outcome::Ok(http::Response::new(tonic::body::Body::empty()))
            })
        };
        let left = ToTheEnd::new(slow(30), &tracker).call(request());
        drop(left);
        let in_place = ToTheEnd::new(slow(300), &tracker).call(request());
        tracker.close();
        let answered = tokio::spawn(in_place);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), tracker.wait())
                .await
                .is_err(),
            "shutdown went on while a call whose client left was under way"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(100), tracker.wait())
                .await
                .is_err(),
            "shutdown went on while a call was answering its client"
        );
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("both calls ended");
        assert!(answered.await.is_ok());
    }

    #[tokio::test]
    async fn a_call_that_panics_is_answered_internal() {
        let mut service = ToTheEnd::new(
            tower::service_fn(|_: http::Request<tonic::body::Body>| async {
                if true {
                    panic!("a bug in a handler");
                }
                Outcome::Ok(http::Response::new(tonic::body::Body::empty()))
            }),
            &TaskTracker::new(),
        );
        let Ok(answer) = service.call(request()).await;
        let status = tonic::Status::from_header_map(answer.headers()).expect("a gRPC status");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().contains("retry later"), "{}", status.message());
    }
}
