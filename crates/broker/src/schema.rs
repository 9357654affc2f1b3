//! `SchemaRegistry`: record types and their versions.

use crate::convert;
use crate::error::{BrokerError, Result};
use crate::state::{Broker, Caller};
use lienthong::v1 as pb;
use lienthong::v1::schema_registry_server::SchemaRegistry;
use lienthong_core::schema::{BreakingChange, CompiledRecordType, check_compatibility, parse_next_definition};
use lienthong_core::{Compatibility, MemberId, RecordTypeDefinition, RecordTypeVersion, Role};
use lienthong_store::StoreError;
use std::sync::Arc;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

/// Breaking changes a refused registration names in its status message.
const SHOWN_CHANGES: usize = 5;

/// The SchemaRegistry service.
pub struct SchemaService {
    broker: Arc<Broker>,
}

/// What the registry's reads answer from: the snapshot the call was
/// authenticated against or, while this replica knows its snapshot is behind
/// the database (a change it cannot load), the database, as Admin reads do:
/// an integrator who registered a version through another replica must not
/// be told it does not exist for as long as this one cannot reload.
enum Registry {
    Snapshot(Arc<lienthong_core::Snapshot>),
    /// Every version by name, ascending.
    Stored(std::collections::BTreeMap<String, Vec<RecordTypeVersion>>),
}

impl Registry {
    /// Every version of `name`, ascending.
    fn versions(&self, name: &str) -> Vec<&RecordTypeVersion> {
        match self {
            Registry::Snapshot(s) => s.record_type_versions(name).iter().map(|v| &v.version).collect(),
            Registry::Stored(by_name) => by_name.get(name).map(|v| v.iter().collect()).unwrap_or_default(),
        }
    }

    /// The version a request for `version` of `name` means (0: the current one).
    fn version(&self, name: &str, version: u32) -> Option<&RecordTypeVersion> {
        match self {
            Registry::Snapshot(s) => s.record_type(name, version).map(|v| &v.version),
            Registry::Stored(by_name) => lienthong_core::schema::select_version(by_name.get(name)?, version, |v| v),
        }
    }

    /// Record type names in byte order.
    fn names(&self) -> Vec<&str> {
        match self {
            Registry::Snapshot(s) => {
                let mut names: Vec<&str> = s.record_type_names().collect();
                names.sort();
                names
            }
            Registry::Stored(by_name) => by_name.keys().map(String::as_str).collect(),
        }
    }
}

impl SchemaService {
    /// The registry this call's reads answer from (see [`Registry`]).
    async fn registry(&self, caller: &Caller) -> Result<Registry> {
        if !self.broker.freshness.is_behind() {
            return Ok(Registry::Snapshot(caller.snapshot.clone()));
        }
        let stored = match self.broker.store.list_record_type_versions().await {
            Ok(stored) => stored,
            // What keeps the snapshot behind may be a row this version cannot
            // read (a newer replica's) or the database being away: the
            // snapshot, old as it is, answers better than an error.
            Err(e) => {
                tracing::warn!(error = %e, "record types unreadable in the database; answered from this replica's snapshot");
                return Ok(Registry::Snapshot(caller.snapshot.clone()));
            }
        };
        let mut by_name = std::collections::BTreeMap::<String, Vec<RecordTypeVersion>>::new();
        for v in stored {
            by_name.entry(v.definition.name.clone()).or_default().push(v);
        }
        Ok(Registry::Stored(by_name))
    }

    /// Wraps the shared state.
    pub fn new(broker: Arc<Broker>) -> Self {
        SchemaService { broker }
    }
}

/// Only an integrator or admin of the owning member, or a federation admin,
/// may change a member's record types.
fn may_manage(caller: &Caller, owner: &str) -> Result<()> {
    let own = caller.id() == owner && (caller.member.has_role(Role::Integrator) || caller.member.has_role(Role::Admin));
    if own || caller.member.has_role(Role::Admin) {
        Ok(())
    } else {
        Err(BrokerError::PermissionDenied(format!(
            "member {} may not manage record types owned by {}: only that member's integrators or a federation admin may",
            caller.id(),
            crate::exchange::clip(owner, 64)
        )))
    }
}

/// What every decision on a definition is made on, its name and owner,
/// given and well-formed: a definition without an owner is a mistake to
/// correct, not an attempt on another member's record types.
fn named_and_owned(d: &pb::RecordTypeDefinition) -> Result<()> {
    if d.name.trim().is_empty() {
        return Err(BrokerError::InvalidArgument(
            "definition.name is required: the record type's name, e.g. civil_status.birth_record".into(),
        ));
    }
    if d.owner.trim().is_empty() {
        return Err(BrokerError::InvalidArgument(
            "definition.owner is required: the member id of the provider whose register serves the record type".into(),
        ));
    }
    MemberId::new(d.owner.as_str())
        .map(drop)
        .map_err(|e| BrokerError::InvalidArgument(format!("definition.owner: {e}")))
}

/// Schemas compiled at once. Compiling is CPU work that a member's request
/// sets off (a schema's patterns, bounded in size and number): it runs off
/// the async runtime, a few at a time, so that registrations cannot starve
/// lookups of threads or grow the broker's memory without bound.
static SCHEMA_WORK: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Runs schema work (parsing, compiling, comparing) on the blocking pool,
/// once a [`SCHEMA_WORK`] permit is free.
async fn schema_work<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let _permit = SCHEMA_WORK
        .acquire()
        .await
        .map_err(|_| BrokerError::Internal("the schema work queue is closed".into()))?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| BrokerError::Internal(format!("schema work did not finish: {e}")))
}

/// [`check_compatibility`] as schema work: comparing inlines references.
async fn compare(previous: &RecordTypeDefinition, next: &RecordTypeDefinition) -> Result<Vec<BreakingChange>> {
    let (previous, next) = (previous.clone(), next.clone());
    schema_work(move || check_compatibility(&previous, &next)).await
}

/// The version a record type is now, among `existing` (ascending): the one
/// lookups that pin no version use, the newest not deprecated. What a new
/// version is compared against and whose owner may register it: lookups
/// move from it to the new one.
fn current(existing: &[RecordTypeVersion]) -> Option<&RecordTypeVersion> {
    lienthong_core::schema::select_version(existing, 0, |v| v)
}

/// A record type belongs to the owner of its current version: whatever
/// owner a new definition names, only that owner's integrators or a
/// federation admin may register its next version.
fn may_change_record_type(caller: &Caller, existing: &[RecordTypeVersion]) -> Result<()> {
    match current(existing) {
        Some(current) => may_manage(caller, current.definition.owner.as_str()),
        None => Ok(()),
    }
}

/// The registered version `def` (of digest `digest`) repeats, if registering
/// it would change nothing: the same schemas and subject key, under the
/// owner the record type has now. Another owner is a change (a transfer),
/// never a repeat.
fn identical<'a>(
    existing: &'a [RecordTypeVersion],
    def: &RecordTypeDefinition,
    digest: &str,
) -> Option<&'a RecordTypeVersion> {
    let current_owner = &current(existing)?.definition.owner;
    existing
        .iter()
        .filter(|v| v.definition.owner == def.owner && *current_owner == def.owner)
        .find(|v| v.digest == digest)
}

impl Broker {
    /// Parses a submitted definition as the next version of `existing`:
    /// what it keeps unchanged from the current version is admitted under
    /// the rules that version was stored under.
    async fn parse(&self, d: pb::RecordTypeDefinition, existing: &[RecordTypeVersion]) -> Result<RecordTypeDefinition> {
        let owner = MemberId::new(d.owner.clone()).map_err(|e| BrokerError::InvalidArgument(format!("owner: {e}")))?;
        let limits = self.schema_limits;
        let previous = current(existing).map(|v| v.definition.clone());
        schema_work(move || {
            parse_next_definition(
                previous.as_ref(),
                &d.name,
                &d.description,
                owner,
                &d.query_schema_json,
                &d.record_schema_json,
                &d.subject_key,
                &limits,
            )
        })
        .await?
        .map_err(|e| BrokerError::InvalidArgument(e.to_string()))
    }

    async fn versions_of(&self, name: &str) -> Result<Vec<RecordTypeVersion>> {
        let mut v: Vec<_> = self
            .store
            .list_record_type_versions()
            .await?
            .into_iter()
            .filter(|v| v.definition.name == name)
            .collect();
        v.sort_by_key(|v| v.version);
        Ok(v)
    }

    async fn register(&self, caller: &Caller, r: pb::RegisterRequest) -> Result<pb::RegisterResponse> {
        let d = r
            .definition
            .ok_or_else(|| BrokerError::InvalidArgument("definition is required".into()))?;
        named_and_owned(&d)?;
        may_manage(caller, &d.owner)?;
        let compatibility = match pb::Compatibility::try_from(r.compatibility) {
            Ok(pb::Compatibility::None) => {
                caller.require(&[Role::Admin], "register with compatibility NONE")?;
                Compatibility::None
            }
            Ok(_) => Compatibility::Backward,
            Err(_) => {
                return Err(BrokerError::InvalidArgument(format!(
                    "compatibility {} is not a valid mode",
                    r.compatibility
                )));
            }
        };
        // Checked before anything is compiled, and again below against what
        // is current then.
        let existing = self.versions_of(&d.name).await?;
        may_change_record_type(caller, &existing)?;
        let def = self.parse(d, &existing).await?;
        match caller.snapshot.member(def.owner.as_str()) {
            Some(m) if m.has_role(Role::Provider) => {}
            Some(_) => {
                return Err(BrokerError::FailedPrecondition(format!(
                    "owner {} does not hold the provider role",
                    def.owner
                )));
            }
            None => {
                return Err(BrokerError::NotFound(format!(
                    "owner {} is not a registered member",
                    def.owner
                )));
            }
        }
        let digest = def.digest();
        // A concurrent registration on another replica can take our version
        // number; re-read and try again.
        for _ in 0..3 {
            let existing = self.versions_of(&def.name).await?;
            may_change_record_type(caller, &existing)?;
            if let Some(same) = identical(&existing, &def, &digest) {
                return Ok(pb::RegisterResponse {
                    version: Some(convert::record_type_version(same)),
                    created: false,
                });
            }
            if let Some(latest) = current(&existing)
                && compatibility == Compatibility::Backward
            {
                let changes = compare(&latest.definition, &def).await?;
                if !changes.is_empty() {
                    // A few in the status (a header, which clients cap at
                    // 8-16 KiB); `schema check` lists them all in its body.
                    let mut list: Vec<String> = changes
                        .iter()
                        .take(SHOWN_CHANGES)
                        .map(|c| format!("{} at {}: {}", c.kind, c.pointer, c.message))
                        .collect();
                    if changes.len() > SHOWN_CHANGES {
                        list.push(format!(
                            "and {} more (`lienthong schema check` lists them all)",
                            changes.len() - SHOWN_CHANGES
                        ));
                    }
                    return Err(BrokerError::FailedPrecondition(format!(
                        "{} is not backward compatible with version {}: {}",
                        def.name,
                        latest.version,
                        list.join("; ")
                    )));
                }
            }
            let version = RecordTypeVersion {
                field_pointers: def.field_pointers(),
                digest: digest.clone(),
                definition: def.clone(),
                version: existing.last().map_or(1, |v| v.version + 1),
                deprecated: false,
                deprecation_note: String::new(),
                registered_at: OffsetDateTime::now_utc(),
                registered_by: caller.member.id.clone(),
                compatibility,
            };
            let compiled = version.clone();
            schema_work(move || CompiledRecordType::compile(compiled).map(drop))
                .await?
                .map_err(|e| BrokerError::InvalidArgument(e.to_string()))?;
            match self.store.insert_record_type_version(&version).await {
                Ok(()) => {
                    let mode = if compatibility == Compatibility::None {
                        "none"
                    } else {
                        "backward"
                    };
                    let mut detail = format!("compatibility={mode} digest={digest}");
                    if let Some(previous) = current(&existing).map(|v| &v.definition.owner)
                        && *previous != def.owner
                    {
                        detail.push_str(&format!(" owner={} previous_owner={previous}", def.owner));
                    }
                    self.applied(
                        caller,
                        "schema.register",
                        &format!("{}@{}", version.definition.name, version.version),
                        Some(detail),
                    )
                    .await?;
                    return Ok(pb::RegisterResponse {
                        version: Some(convert::record_type_version(&version)),
                        created: true,
                    });
                }
                Err(StoreError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        // A conflict with concurrent registrations: ABORTED, as the gRPC
        // spec has it, so that a client retries the whole registration.
        Err(BrokerError::Aborted(format!(
            "{} is being registered concurrently; retry",
            def.name
        )))
    }

    async fn check(&self, caller: &Caller, r: pb::CheckCompatibilityRequest) -> Result<pb::CheckCompatibilityResponse> {
        let d = r
            .definition
            .ok_or_else(|| BrokerError::InvalidArgument("definition is required".into()))?;
        named_and_owned(&d)?;
        // Checking compiles the schemas, as registering does: only those who
        // may register the definition may ask.
        may_manage(caller, &d.owner)?;
        let existing = self.versions_of(&d.name).await?;
        may_change_record_type(caller, &existing)?;
        let def = self.parse(d, &existing).await?;
        let identical = identical(&existing, &def, &def.digest()).is_some();
        let (against_version, changes) = match current(&existing) {
            Some(latest) => (latest.version, compare(&latest.definition, &def).await?),
            None => (0, Vec::new()),
        };
        Ok(pb::CheckCompatibilityResponse {
            compatible: changes.is_empty(),
            against_version,
            changes: changes.iter().map(convert::breaking_change).collect(),
            identical,
        })
    }

    async fn deprecate(&self, caller: &Caller, r: pb::DeprecateRequest) -> Result<pb::RecordTypeVersion> {
        // 0 means "the current version" elsewhere: deprecating whichever one
        // that is must not be a guess.
        if r.version == 0 {
            return Err(BrokerError::InvalidArgument(
                "version is required: name the version to deprecate (1 or more; ListVersions shows them)".into(),
            ));
        }
        let v = caller.snapshot.record_type(&r.name, r.version).ok_or_else(|| {
            BrokerError::NotFound(format!(
                "record type {} has no version {}",
                crate::exchange::clip(&r.name, 128),
                r.version
            ))
        })?;
        may_manage(caller, v.owner().as_str())?;
        // Shown to every consumer of the version, in one line.
        let note = crate::admin::one_line("the note (why, and what to use instead)", &r.note, 500)?;
        let updated = self
            .store
            .deprecate_record_type_version(&r.name, r.version, note)
            .await?;
        self.applied(
            caller,
            "schema.deprecate",
            &format!("{}@{}", r.name, r.version),
            Some(r.note.trim().to_string()),
        )
        .await?;
        Ok(convert::record_type_version(&updated))
    }
}

#[tonic::async_trait]
impl SchemaRegistry for SchemaService {
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> std::result::Result<Response<pb::RegisterResponse>, Status> {
        let caller = self.broker.authenticate(&request, "SchemaRegistry.Register").await?;
        let r = request.into_inner();
        let target = r.definition.as_ref().map(|d| d.name.clone()).unwrap_or_default();
        match self.broker.register(&caller, r).await {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                self.broker
                    .admin_refused(caller.id(), "schema.register", &target, &e)
                    .await;
                Err(e.into())
            }
        }
    }

    async fn get(
        &self,
        request: Request<pb::GetRecordTypeRequest>,
    ) -> std::result::Result<Response<pb::RecordTypeVersion>, Status> {
        let caller = self.broker.authenticate(&request, "SchemaRegistry.Get").await?;
        let r = request.get_ref();
        let registry = self.registry(&caller).await?;
        let v = registry.version(&r.name, r.version).ok_or_else(|| {
            BrokerError::NotFound(if r.version == 0 {
                format!(
                    "record type {:?} is not registered",
                    crate::exchange::clip(&r.name, 128)
                )
            } else {
                format!(
                    "record type {:?} has no version {}",
                    crate::exchange::clip(&r.name, 128),
                    r.version
                )
            })
        })?;
        Ok(Response::new(convert::record_type_version(v)))
    }

    async fn list_versions(
        &self,
        request: Request<pb::ListVersionsRequest>,
    ) -> std::result::Result<Response<pb::ListVersionsResponse>, Status> {
        let caller = self
            .broker
            .authenticate(&request, "SchemaRegistry.ListVersions")
            .await?;
        let name = &request.get_ref().name;
        let versions: Vec<_> = self
            .registry(&caller)
            .await?
            .versions(name)
            .into_iter()
            .map(convert::record_type_version)
            .collect();
        if versions.is_empty() {
            return Err(BrokerError::NotFound(format!(
                "record type {:?} is not registered",
                crate::exchange::clip(name, 128)
            ))
            .into());
        }
        Ok(Response::new(pb::ListVersionsResponse { versions }))
    }

    async fn list_record_types(
        &self,
        request: Request<pb::ListRecordTypesRequest>,
    ) -> std::result::Result<Response<pb::ListRecordTypesResponse>, Status> {
        let caller = self
            .broker
            .authenticate(&request, "SchemaRegistry.ListRecordTypes")
            .await?;
        let owner = &request.get_ref().owner;
        let registry = self.registry(&caller).await?;
        let record_types = registry
            .names()
            .into_iter()
            .filter_map(|n| registry.version(n, 0))
            .filter(|v| owner.is_empty() || v.definition.owner.as_str() == owner)
            .map(convert::record_type_version)
            .collect();
        Ok(Response::new(pb::ListRecordTypesResponse { record_types }))
    }

    async fn deprecate(
        &self,
        request: Request<pb::DeprecateRequest>,
    ) -> std::result::Result<Response<pb::RecordTypeVersion>, Status> {
        let caller = self.broker.authenticate(&request, "SchemaRegistry.Deprecate").await?;
        let r = request.into_inner();
        let target = format!("{}@{}", r.name, r.version);
        match self.broker.deprecate(&caller, r).await {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                self.broker
                    .admin_refused(caller.id(), "schema.deprecate", &target, &e)
                    .await;
                Err(e.into())
            }
        }
    }

    async fn check_compatibility(
        &self,
        request: Request<pb::CheckCompatibilityRequest>,
    ) -> std::result::Result<Response<pb::CheckCompatibilityResponse>, Status> {
        let caller = self
            .broker
            .authenticate(&request, "SchemaRegistry.CheckCompatibility")
            .await?;
        let r = request.into_inner();
        let target = r.definition.as_ref().map(|d| d.name.clone()).unwrap_or_default();
        // A refusal is audited as Register's are: asking is how a member
        // probes what it may not register.
        match self.broker.check(&caller, r).await {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                self.broker
                    .admin_refused(caller.id(), "schema.check", &target, &e)
                    .await;
                Err(e.into())
            }
        }
    }
}
