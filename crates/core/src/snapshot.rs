//! The in-memory authorization snapshot: members, grants, compiled record
//! types and endpoints indexed for the lookup path. Immutable once built; the
//! broker builds a new one from the store and swaps it atomically.

use crate::filter::FieldSelection;
use crate::grant::{Endpoint, Grant, GrantFields};
use crate::member::{Fingerprint, Member, RevokedCertificate};
use crate::policy::{self, AccessRequest, Decision, DenyReason};
use crate::schema::CompiledRecordType;
use std::collections::HashMap;
use std::sync::Arc;
use time::OffsetDateTime;

/// Where a grant sits in the nested grant index.
#[derive(Debug)]
struct GrantLocation {
    consumer: String,
    record_type: String,
    index: usize,
    /// The record type version the grant was made against: the newest one
    /// registered when it was created. Its fields bound what the grant
    /// releases, so a later version that adds a field under a granted object
    /// (or at the top, under `*`) does not widen the grant.
    reviewed: Option<Arc<CompiledRecordType>>,
    /// The grant's fields as a tree within the reviewed version's shape and
    /// each version's (version number, selection), built once rather than on
    /// every lookup.
    selections: Vec<(u32, FieldSelection)>,
}

/// Read-only view of everything the broker needs to authorize and route.
#[derive(Debug)]
pub struct Snapshot {
    /// Store change counter the snapshot was built from.
    pub version: u64,
    /// When it was built.
    pub built_at: OffsetDateTime,
    /// Sorted by id.
    members: Vec<Member>,
    member_index: HashMap<String, usize>,
    /// consumer -> record type -> grants, most recently created first.
    grants: HashMap<String, HashMap<String, Vec<Grant>>>,
    grant_index: HashMap<String, GrantLocation>,
    /// name -> versions, ascending.
    record_types: HashMap<String, Vec<Arc<CompiledRecordType>>>,
    record_type_names: Vec<String>,
    /// provider -> endpoints, oldest first.
    endpoints: HashMap<String, Vec<Endpoint>>,
    /// Member certificates refused although valid, by fingerprint.
    revoked_certificates: HashMap<Fingerprint, RevokedCertificate>,
}

impl Snapshot {
    /// A snapshot holding nothing: every decision is a denial.
    pub fn empty() -> Snapshot {
        Snapshot::build(
            0,
            OffsetDateTime::UNIX_EPOCH,
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        )
    }

    /// Indexes store lists. Duplicates (same member id, grant id, or record type
    /// name and version) keep the last one given.
    pub fn build(
        version: u64,
        built_at: OffsetDateTime,
        members: Vec<Member>,
        grants: Vec<Grant>,
        record_types: Vec<Arc<CompiledRecordType>>,
        endpoints: Vec<Endpoint>,
    ) -> Snapshot {
        let mut by_id: HashMap<String, Member> = HashMap::with_capacity(members.len());
        for member in members {
            by_id.insert(member.id.as_str().to_owned(), member);
        }
        let mut members: Vec<Member> = by_id.into_values().collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let member_index = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.id.as_str().to_owned(), i))
            .collect();

        let mut unique_grants: HashMap<String, Grant> = HashMap::with_capacity(grants.len());
        for grant in grants {
            unique_grants.insert(grant.id.clone(), grant);
        }
        let mut nested: HashMap<String, HashMap<String, Vec<Grant>>> = HashMap::new();
        for grant in unique_grants.into_values() {
            nested
                .entry(grant.consumer.as_str().to_owned())
                .or_default()
                .entry(grant.record_type.clone())
                .or_default()
                .push(grant);
        }
        let mut grant_index = HashMap::new();
        for (consumer, by_type) in &mut nested {
            for (record_type, list) in by_type.iter_mut() {
                // Same order policy::decide prefers, so the winner is found first.
                list.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| a.id.cmp(&b.id)));
                for (index, grant) in list.iter().enumerate() {
                    grant_index.insert(
                        grant.id.clone(),
                        GrantLocation {
                            consumer: consumer.clone(),
                            record_type: record_type.clone(),
                            index,
                            reviewed: None,
                            selections: Vec::new(),
                        },
                    );
                }
            }
        }

        let mut types: HashMap<String, Vec<Arc<CompiledRecordType>>> = HashMap::new();
        for compiled in record_types {
            types.entry(compiled.name().to_owned()).or_default().push(compiled);
        }
        for versions in types.values_mut() {
            // Stable sort, then keep the last of equal versions.
            versions.sort_by_key(|v| v.version_number());
            let mut deduped: Vec<Arc<CompiledRecordType>> = Vec::with_capacity(versions.len());
            for v in versions.drain(..) {
                match deduped.last_mut() {
                    Some(last) if last.version_number() == v.version_number() => *last = v,
                    _ => deduped.push(v),
                }
            }
            *versions = deduped;
        }
        let mut record_type_names: Vec<String> = types.keys().cloned().collect();
        record_type_names.sort();
        for (id, location) in &mut grant_index {
            let Some(grant) = nested
                .get(&location.consumer)
                .and_then(|by_type| by_type.get(&location.record_type))
                .and_then(|list| list.get(location.index))
                .filter(|g| &g.id == id)
            else {
                continue;
            };
            let versions = types.get(&location.record_type).map_or(&[][..], Vec::as_slice);
            // The version the grant was checked against when it was made. For
            // a grant made before that was recorded: the newest version then
            // in use (a deprecated one was not what the admin looked at);
            // clocks of replicas differ a little, so a grant that looks older
            // than every version was made against the first.
            let reviewed = match grant.reviewed_version {
                Some(n) => versions.iter().find(|v| v.version_number() == n),
                None => versions
                    .iter()
                    .rev()
                    .find(|v| v.version.registered_at <= grant.created_at && !v.version.deprecated),
            }
            .or_else(|| versions.first())
            .cloned();
            let mut granted = FieldSelection::from_fields(&grant.fields);
            if let Some(r) = &reviewed {
                granted = granted.intersect(r.shape());
            }
            location.selections = versions
                .iter()
                .map(|v| (v.version_number(), granted.intersect(v.shape())))
                .collect();
            location.reviewed = reviewed;
        }

        let mut by_provider: HashMap<String, Vec<Endpoint>> = HashMap::new();
        for endpoint in endpoints {
            by_provider
                .entry(endpoint.provider.as_str().to_owned())
                .or_default()
                .push(endpoint);
        }
        for list in by_provider.values_mut() {
            list.sort_by(|a, b| a.created_at.cmp(&b.created_at).then_with(|| a.id.cmp(&b.id)));
            list.dedup_by(|a, b| a.id == b.id);
        }

        Snapshot {
            version,
            built_at,
            members,
            member_index,
            grants: nested,
            grant_index,
            record_types: types,
            record_type_names,
            endpoints: by_provider,
            revoked_certificates: HashMap::new(),
        }
    }

    /// The same snapshot, refusing these member certificates.
    pub fn with_revoked_certificates(mut self, revoked: Vec<RevokedCertificate>) -> Snapshot {
        self.revoked_certificates = revoked.into_iter().map(|r| (r.fingerprint, r)).collect();
        self
    }

    /// The revocation of the certificate with this fingerprint, if it is revoked.
    pub fn revoked_certificate(&self, fingerprint: &Fingerprint) -> Option<&RevokedCertificate> {
        self.revoked_certificates.get(fingerprint)
    }

    /// The member with this id.
    pub fn member(&self, id: &str) -> Option<&Member> {
        self.member_index.get(id).and_then(|&i| self.members.get(i))
    }

    /// Every member, by id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.iter()
    }

    /// Grants of `consumer` for `record_type` in any state, most recently created first.
    pub fn grants_for(&self, consumer: &str, record_type: &str) -> &[Grant] {
        self.grants
            .get(consumer)
            .and_then(|by_type| by_type.get(record_type))
            .map_or(&[], Vec::as_slice)
    }

    /// The grant with this id.
    pub fn grant(&self, id: &str) -> Option<&Grant> {
        let location = self.grant_index.get(id)?;
        self.grants_for(&location.consumer, &location.record_type)
            .get(location.index)
    }

    /// The fields a grant releases from a record of `version` (its fields
    /// within that version's shape), as built with the snapshot.
    pub fn grant_selection(&self, id: &str, version: u32) -> Option<&FieldSelection> {
        self.grant_index
            .get(id)?
            .selections
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, selection)| selection)
    }

    /// The record type version a grant was made against (the newest one
    /// registered when it was created); `None` for an unknown grant or type.
    pub fn grant_reviewed(&self, id: &str) -> Option<&Arc<CompiledRecordType>> {
        self.grant_index.get(id)?.reviewed.as_ref()
    }

    /// What a request naming `fields` under grant `id` gets from a record of
    /// `version`: those fields within the grant's reviewed version and
    /// `version`'s shapes.
    pub fn requested_selection(&self, id: &str, version: &CompiledRecordType, fields: &GrantFields) -> FieldSelection {
        let mut selection = FieldSelection::from_fields(fields).intersect(version.shape());
        if let Some(reviewed) = self.grant_reviewed(id) {
            selection = selection.intersect(reviewed.shape());
        }
        selection
    }

    /// Number of grants held.
    pub fn grant_count(&self) -> usize {
        self.grant_index.len()
    }

    /// A record type version; `version == 0` means the newest non-deprecated one
    /// (or the newest if all are deprecated).
    pub fn record_type(&self, name: &str, version: u32) -> Option<&Arc<CompiledRecordType>> {
        let versions = self.record_types.get(name)?;
        crate::schema::select_version(versions, version, |v| &v.version)
    }

    /// Every version of a record type, ascending.
    pub fn record_type_versions(&self, name: &str) -> &[Arc<CompiledRecordType>] {
        self.record_types.get(name).map_or(&[], Vec::as_slice)
    }

    /// Record type names, sorted.
    pub fn record_type_names(&self) -> impl Iterator<Item = &str> {
        self.record_type_names.iter().map(String::as_str)
    }

    /// Endpoints of a provider, oldest first.
    pub fn endpoints(&self, provider: &str) -> &[Endpoint] {
        self.endpoints.get(provider).map_or(&[], Vec::as_slice)
    }

    /// [`policy::decide`] for `consumer`; an unknown member is not a consumer.
    /// A field the request names must also have existed when the grant was
    /// made: a grant of `/father` made against a version without
    /// `/father/national_id` does not release it when a later version adds it.
    pub fn decide(&self, consumer: &str, request: &AccessRequest<'_>, now: OffsetDateTime) -> Decision {
        let Some(member) = self.member(consumer) else {
            return Decision::Deny(DenyReason::NotAConsumer);
        };
        let decision = policy::decide(member, self.grants_for(consumer, request.record_type), request, now);
        if let Decision::Allow(allowed) = &decision
            && let Some(reviewed) = self.grant_reviewed(&allowed.grant_id)
            && let Some(field) = request.fields.iter().find(|f| !reviewed.has_field(f))
        {
            return Decision::Deny(DenyReason::FieldNotGranted { field: field.clone() });
        }
        decision
    }
}
