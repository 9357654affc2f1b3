//! The authorization decision: every deny reason, the allow path, precedence
//! between reasons, and properties that must hold for any set of grants.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lienthong_core::policy::{AccessRequest, Allowed, Decision, DenyReason, decide};
use lienthong_core::snapshot::Snapshot;
use lienthong_core::{Grant, GrantFields, Member, MemberId, Role};
use proptest::prelude::*;
use std::time::Duration;
use time::macros::datetime;
use time::{Duration as TimeDelta, OffsetDateTime};

const NOW: OffsetDateTime = datetime!(2025-06-01 12:00 UTC);
const RT: &str = "civil.birth";

fn consumer() -> Member {
    Member {
        id: MemberId::new("tax-office").unwrap(),
        display_name: "Tax office".into(),
        roles: vec![Role::Consumer],
        enabled: true,
        disabled_reason: String::new(),
        created_at: datetime!(2024-01-01 0:00 UTC),
        updated_at: datetime!(2024-01-01 0:00 UTC),
    }
}

fn pointers(ps: &[&str]) -> GrantFields {
    GrantFields::Pointers(ps.iter().map(|s| s.to_string()).collect())
}

fn grant(id: &str, fields: GrantFields, purposes: &[&str]) -> Grant {
    Grant {
        id: id.into(),
        consumer: consumer().id,
        record_type: RT.into(),
        fields,
        purposes: purposes.iter().map(|s| s.to_string()).collect(),
        valid_from: datetime!(2025-01-01 0:00 UTC),
        valid_until: Some(datetime!(2026-01-01 0:00 UTC)),
        rate_limit_per_minute: 120,
        revoked_at: None,
        revoked_reason: String::new(),
        created_by: MemberId::new("admin").unwrap(),
        created_at: datetime!(2025-01-01 0:00 UTC),
        reviewed_version: None,
    }
}

fn fields(ps: &[&str]) -> Vec<String> {
    ps.iter().map(|s| s.to_string()).collect()
}

fn ask(grants: &[Grant], purpose: &str, requested: &[&str]) -> Decision {
    let requested = fields(requested);
    decide(
        &consumer(),
        grants,
        &AccessRequest {
            record_type: RT,
            purpose,
            fields: &requested,
        },
        NOW,
    )
}

fn denied(d: Decision) -> DenyReason {
    match d {
        Decision::Deny(r) => r,
        Decision::Allow(a) => panic!("expected a denial, got {a:?}"),
    }
}

fn allowed(d: Decision) -> Allowed {
    match d {
        Decision::Allow(a) => a,
        Decision::Deny(r) => panic!("expected allow, got {r}"),
    }
}

// ---------------------------------------------------------------- allow path

#[test]
fn allows_requested_fields_covered_by_the_grant() {
    let g = grant("g1", pointers(&["/father", "/full_name"]), &["tax"]);
    let a = allowed(ask(&[g], "tax", &["/full_name", "/father/full_name", "/full_name"]));
    assert_eq!(a.grant_id, "g1");
    assert_eq!(a.fields, pointers(&["/father/full_name", "/full_name"]));
    assert_eq!(a.rate_limit_per_minute, 120);
}

#[test]
fn no_requested_fields_means_the_grants_fields() {
    let g = grant("g1", pointers(&["/full_name"]), &["tax"]);
    assert_eq!(allowed(ask(&[g], "tax", &[])).fields, pointers(&["/full_name"]));
    let all = grant("g2", GrantFields::All, &["tax"]);
    assert_eq!(
        allowed(ask(std::slice::from_ref(&all), "tax", &[])).fields,
        GrantFields::All
    );
    assert_eq!(
        allowed(ask(&[all], "tax", &["/anything/deep"])).fields,
        pointers(&["/anything/deep"])
    );
}

#[test]
fn validity_window_is_inclusive_at_start_and_exclusive_at_end() {
    let mut g = grant("g1", GrantFields::All, &["tax"]);
    g.valid_from = NOW;
    assert!(ask(&[g.clone()], "tax", &[]).is_allowed());
    g.valid_from = NOW - TimeDelta::days(1);
    g.valid_until = Some(NOW);
    assert_eq!(
        denied(ask(&[g.clone()], "tax", &[])),
        DenyReason::GrantExpired { valid_until: NOW }
    );
    g.valid_until = None;
    assert!(ask(&[g], "tax", &[]).is_allowed());
}

#[test]
fn most_recent_usable_grant_wins_then_smallest_id() {
    let mut old = grant("a-old", pointers(&["/x"]), &["tax"]);
    old.created_at = datetime!(2025-01-01 0:00 UTC);
    let mut new = grant("z-new", pointers(&["/x"]), &["tax"]);
    new.created_at = datetime!(2025-02-01 0:00 UTC);
    let mut tie = grant("m-new", pointers(&["/x"]), &["tax"]);
    tie.created_at = datetime!(2025-02-01 0:00 UTC);
    for order in [
        vec![old.clone(), new.clone(), tie.clone()],
        vec![tie.clone(), new.clone(), old.clone()],
    ] {
        assert_eq!(allowed(ask(&order, "tax", &["/x"])).grant_id, "m-new");
    }
    // A newer grant that lacks the field does not shadow an older one that has it.
    let mut narrow = grant("narrow", pointers(&["/y"]), &["tax"]);
    narrow.created_at = datetime!(2025-03-01 0:00 UTC);
    assert_eq!(allowed(ask(&[narrow, old], "tax", &["/x"])).grant_id, "a-old");
}

// ---------------------------------------------------------------- deny reasons

#[test]
fn member_must_be_a_consumer() {
    let mut m = consumer();
    m.roles = vec![Role::Provider, Role::Auditor];
    let g = grant("g1", GrantFields::All, &["tax"]);
    let requested = fields(&[]);
    let d = decide(
        &m,
        &[g],
        &AccessRequest {
            record_type: RT,
            purpose: "tax",
            fields: &requested,
        },
        NOW,
    );
    let r = denied(d);
    assert_eq!(r, DenyReason::NotAConsumer);
    assert_eq!(r.code(), "not_a_consumer");
    assert!(r.to_string().contains("consumer role"));
}

#[test]
fn member_must_be_enabled() {
    let mut m = consumer();
    m.enabled = false;
    let g = grant("g1", GrantFields::All, &["tax"]);
    let requested = fields(&[]);
    let r = denied(decide(
        &m,
        &[g],
        &AccessRequest {
            record_type: RT,
            purpose: "tax",
            fields: &requested,
        },
        NOW,
    ));
    assert_eq!(r, DenyReason::MemberDisabled);
    assert_eq!(r.code(), "member_disabled");
}

#[test]
fn no_grant_at_all() {
    let r = denied(ask(&[], "tax", &[]));
    assert_eq!(r, DenyReason::NoGrant { record_type: RT.into() });
    assert_eq!(r.code(), "no_grant");
    assert!(r.to_string().contains("civil.birth") && r.to_string().contains("ask the federation admin"));
}

#[test]
fn grants_of_other_consumers_or_record_types_are_ignored() {
    let mut other_consumer = grant("g1", GrantFields::All, &["tax"]);
    other_consumer.consumer = MemberId::new("police").unwrap();
    let mut other_type = grant("g2", GrantFields::All, &["tax"]);
    other_type.record_type = "civil.marriage".into();
    assert_eq!(
        denied(ask(&[other_consumer, other_type], "tax", &[])).code(),
        "no_grant"
    );
}

#[test]
fn purpose_not_granted() {
    let g = grant("g1", GrantFields::All, &["tax", "census"]);
    let r = denied(ask(&[g], "marriage", &[]));
    assert_eq!(
        r,
        DenyReason::PurposeNotGranted {
            purpose: "marriage".into()
        }
    );
    assert_eq!(r.code(), "purpose_not_granted");
    assert_eq!(
        r.to_string(),
        "purpose \"marriage\" is not granted for this record type; state a granted purpose or ask the federation admin to add it"
    );
}

#[test]
fn grant_not_yet_valid() {
    let mut g = grant("g1", GrantFields::All, &["tax"]);
    g.valid_from = datetime!(2025-07-01 0:00 UTC);
    let r = denied(ask(&[g], "tax", &[]));
    assert_eq!(
        r,
        DenyReason::GrantNotYetValid {
            valid_from: datetime!(2025-07-01 0:00 UTC)
        }
    );
    assert_eq!(r.code(), "grant_not_yet_valid");
    assert!(r.to_string().contains("2025-07-01T00:00:00Z"), "{r}");
}

#[test]
fn grant_expired() {
    let mut g = grant("g1", GrantFields::All, &["tax"]);
    g.valid_until = Some(datetime!(2025-05-01 0:00 UTC));
    let r = denied(ask(&[g], "tax", &[]));
    assert_eq!(
        r,
        DenyReason::GrantExpired {
            valid_until: datetime!(2025-05-01 0:00 UTC)
        }
    );
    assert_eq!(r.code(), "grant_expired");
    assert!(r.to_string().contains("renew"), "{r}");
}

#[test]
fn grant_revoked() {
    let mut g = grant("g1", GrantFields::All, &["tax"]);
    g.revoked_at = Some(datetime!(2025-05-01 0:00 UTC));
    g.revoked_reason = "court order 12/2025".into();
    let r = denied(ask(&[g], "tax", &[]));
    assert_eq!(
        r,
        DenyReason::GrantRevoked {
            reason: "court order 12/2025".into()
        }
    );
    assert_eq!(r.code(), "grant_revoked");
    assert!(r.to_string().contains("court order 12/2025"), "{r}");
    assert_eq!(
        DenyReason::GrantRevoked { reason: String::new() }.to_string(),
        "grant was revoked; ask the federation admin for a new grant"
    );
}

#[test]
fn field_not_granted_names_the_first_missing_field() {
    let g = grant("g1", pointers(&["/full_name", "/father/full_name"]), &["tax"]);
    let r = denied(ask(&[g], "tax", &["/full_name", "/father", "/mother"]));
    assert_eq!(
        r,
        DenyReason::FieldNotGranted {
            field: "/father".into()
        }
    );
    assert_eq!(r.code(), "field_not_granted");
    assert_eq!(
        r.to_string(),
        "grant has no field /father; ask the federation admin to extend the grant or request fewer fields"
    );
}

#[test]
fn requested_fields_are_never_trimmed() {
    let g = grant("g1", pointers(&["/a"]), &["tax"]);
    assert_eq!(
        denied(ask(&[g], "tax", &["/a", "/b"])),
        DenyReason::FieldNotGranted { field: "/b".into() }
    );
}

#[test]
fn a_pointer_does_not_cover_a_sibling_sharing_its_prefix() {
    let g = grant("g1", pointers(&["/father"]), &["tax"]);
    assert!(ask(std::slice::from_ref(&g), "tax", &["/father/full_name"]).is_allowed());
    assert_eq!(
        denied(ask(&[g], "tax", &["/fathers_name"])),
        DenyReason::FieldNotGranted {
            field: "/fathers_name".into()
        }
    );
}

#[test]
fn rate_limited_reason() {
    let r = DenyReason::RateLimited {
        retry_after: Duration::from_micros(1500),
    };
    assert_eq!(r.code(), "rate_limited");
    assert_eq!(r.to_string(), "rate limit of the grant exceeded; retry in 2 ms");
}

// ---------------------------------------------------------------- precedence

#[test]
fn field_not_granted_beats_purpose_not_granted() {
    let lacking = grant("g1", pointers(&["/a"]), &["tax"]);
    let other_purpose = grant("g2", GrantFields::All, &["census"]);
    assert_eq!(
        denied(ask(&[other_purpose, lacking], "tax", &["/b"])).code(),
        "field_not_granted"
    );
}

#[test]
fn a_dead_grant_with_the_purpose_beats_purpose_not_granted() {
    // A live grant for another purpose does not hide why the grant for this
    // one cannot be used: the consumer must wait, renew or ask again.
    let live_other_purpose = grant("g1", GrantFields::All, &["census"]);
    let mut revoked = grant("g2", GrantFields::All, &["tax"]);
    revoked.revoked_at = Some(NOW);
    revoked.revoked_reason = "court order 12/2025".into();
    assert_eq!(
        denied(ask(&[revoked, live_other_purpose.clone()], "tax", &[])),
        DenyReason::GrantRevoked {
            reason: "court order 12/2025".into()
        }
    );
    let mut later = grant("g3", GrantFields::All, &["tax"]);
    later.valid_from = NOW + TimeDelta::seconds(8);
    later.valid_until = Some(NOW + TimeDelta::seconds(16));
    assert_eq!(
        denied(ask(&[live_other_purpose.clone(), later.clone()], "tax", &[])),
        DenyReason::GrantNotYetValid {
            valid_from: NOW + TimeDelta::seconds(8)
        }
    );
    let mut expired = later;
    expired.valid_from = NOW - TimeDelta::seconds(16);
    expired.valid_until = Some(NOW - TimeDelta::seconds(8));
    assert_eq!(
        denied(ask(&[expired, live_other_purpose.clone()], "tax", &[])),
        DenyReason::GrantExpired {
            valid_until: NOW - TimeDelta::seconds(8)
        }
    );
    // No grant of any state names the purpose: then it is not granted.
    assert_eq!(
        denied(ask(&[live_other_purpose], "tax", &[])).code(),
        "purpose_not_granted"
    );
}

#[test]
fn a_live_grant_lacking_a_field_beats_a_dead_grant_with_it() {
    let lacking = grant("g1", pointers(&["/a"]), &["tax"]);
    let mut revoked = grant("g2", GrantFields::All, &["tax"]);
    revoked.revoked_at = Some(NOW);
    assert_eq!(
        denied(ask(&[revoked, lacking], "tax", &["/b"])),
        DenyReason::FieldNotGranted { field: "/b".into() }
    );
}

#[test]
fn dead_grants_with_the_purpose_beat_no_grant_and_the_newest_explains() {
    let mut revoked = grant("g1", GrantFields::All, &["tax"]);
    revoked.revoked_at = Some(NOW);
    revoked.created_at = datetime!(2025-01-01 0:00 UTC);
    let mut expired = grant("g2", GrantFields::All, &["tax"]);
    expired.valid_until = Some(NOW - TimeDelta::hours(1));
    expired.created_at = datetime!(2025-02-01 0:00 UTC);
    let mut dead_other_purpose = grant("g3", GrantFields::All, &["census"]);
    dead_other_purpose.revoked_at = Some(NOW);
    assert_eq!(
        denied(ask(
            &[revoked.clone(), expired.clone(), dead_other_purpose.clone()],
            "tax",
            &[]
        ))
        .code(),
        "grant_expired"
    );
    assert_eq!(
        denied(ask(&[revoked, dead_other_purpose.clone()], "tax", &[])).code(),
        "grant_revoked"
    );
    // Only dead grants, none naming the purpose: no grant.
    assert_eq!(denied(ask(&[dead_other_purpose], "tax", &[])).code(), "no_grant");
}

#[test]
fn revocation_wins_over_the_validity_window() {
    let mut g = grant("g1", GrantFields::All, &["tax"]);
    g.revoked_at = Some(NOW);
    g.valid_until = Some(NOW - TimeDelta::days(1));
    assert_eq!(denied(ask(&[g], "tax", &[])).code(), "grant_revoked");
}

#[test]
fn every_code_is_distinct_snake_case() {
    let reasons = [
        DenyReason::NotAConsumer,
        DenyReason::MemberDisabled,
        DenyReason::NoGrant { record_type: RT.into() },
        DenyReason::PurposeNotGranted { purpose: "p".into() },
        DenyReason::GrantNotYetValid { valid_from: NOW },
        DenyReason::GrantExpired { valid_until: NOW },
        DenyReason::GrantRevoked { reason: "r".into() },
        DenyReason::FieldNotGranted { field: "/x".into() },
        DenyReason::RateLimited {
            retry_after: Duration::from_secs(1),
        },
    ];
    let codes: std::collections::HashSet<&str> = reasons.iter().map(DenyReason::code).collect();
    assert_eq!(codes.len(), reasons.len());
    for r in &reasons {
        assert!(r.code().bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        let text = r.to_string();
        assert!(
            !text.ends_with('.') && text.starts_with(|c: char| c.is_ascii_lowercase()),
            "{text}"
        );
    }
}

// ---------------------------------------------------------------- snapshot

#[test]
fn snapshot_decides_with_its_indexes() {
    let mut police = consumer();
    police.id = MemberId::new("police").unwrap();
    let g = grant("g1", pointers(&["/full_name"]), &["tax"]);
    let snap = Snapshot::build(7, NOW, vec![consumer(), police], vec![g], Vec::new(), Vec::new());
    let requested = fields(&["/full_name"]);
    let req = AccessRequest {
        record_type: RT,
        purpose: "tax",
        fields: &requested,
    };
    assert_eq!(allowed(snap.decide("tax-office", &req, NOW)).grant_id, "g1");
    assert_eq!(denied(snap.decide("police", &req, NOW)).code(), "no_grant");
    assert_eq!(denied(snap.decide("nobody", &req, NOW)), DenyReason::NotAConsumer);
    assert_eq!(
        denied(Snapshot::empty().decide("tax-office", &req, NOW)),
        DenyReason::NotAConsumer
    );
}

// ---------------------------------------------------------------- properties

const POOL: [&str; 7] = ["/a", "/a/x", "/a/y", "/b", "/c", "/c/z", "/d"];
const PURPOSES: [&str; 3] = ["tax", "census", "benefit"];

fn arb_fields() -> impl Strategy<Value = GrantFields> {
    prop_oneof![
        1 => Just(GrantFields::All),
        4 => proptest::sample::subsequence(POOL.to_vec(), 0..=4)
            .prop_map(|ps| GrantFields::Pointers(ps.into_iter().map(String::from).collect())),
    ]
}

fn arb_grant() -> impl Strategy<Value = Grant> {
    (
        0u32..1000,
        arb_fields(),
        proptest::sample::subsequence(PURPOSES.to_vec(), 1..=3),
        -30i64..30,
        proptest::option::of(1i64..60),
        any::<bool>(),
        -100i64..0,
    )
        .prop_map(|(n, fields, purposes, from, until, revoked, created)| {
            let mut g = grant(&format!("g{n}"), fields, &purposes);
            g.valid_from = NOW + TimeDelta::days(from);
            g.valid_until = until.map(|u| g.valid_from + TimeDelta::days(u));
            if revoked {
                g.revoked_at = Some(NOW - TimeDelta::days(1));
                g.revoked_reason = "revoked in test".into();
            }
            g.created_at = NOW + TimeDelta::days(created);
            g
        })
}

/// A grant that cannot be used for purpose "tax" now.
fn arb_unusable_grant() -> impl Strategy<Value = Grant> {
    (arb_grant(), 0u8..4).prop_map(|(mut g, how)| {
        match how {
            0 => g.revoked_at = Some(NOW - TimeDelta::seconds(1)),
            1 => {
                g.valid_from = NOW - TimeDelta::days(10);
                g.valid_until = Some(NOW - TimeDelta::seconds(1));
            }
            2 => {
                g.valid_from = NOW + TimeDelta::seconds(1);
                g.valid_until = None;
            }
            _ => g.purposes.retain(|p| p != "tax"),
        }
        if g.purposes.is_empty() {
            g.purposes.push("census".into());
        }
        g
    })
}

/// Grants with distinct ids.
fn arb_grants(max: usize, unusable: bool) -> impl Strategy<Value = Vec<Grant>> {
    let one = if unusable {
        arb_unusable_grant().boxed()
    } else {
        arb_grant().boxed()
    };
    proptest::collection::vec(one, (if unusable { 0 } else { 1 })..max).prop_map(|mut gs| {
        for (i, g) in gs.iter_mut().enumerate() {
            g.id = format!("g{i:02}");
        }
        gs
    })
}

fn arb_request_fields() -> impl Strategy<Value = Vec<String>> {
    proptest::sample::subsequence(POOL.to_vec(), 0..=3).prop_map(|ps| ps.into_iter().map(String::from).collect())
}

fn covered(granted: &GrantFields, pointer: &str) -> bool {
    match granted {
        GrantFields::All => true,
        GrantFields::Pointers(ps) => ps.iter().any(|g| pointer == g || pointer.starts_with(&format!("{g}/"))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn without_a_usable_grant_the_answer_is_deny(
        grants in arb_grants(8, true),
        requested in arb_request_fields(),
    ) {
        let requested: Vec<&str> = requested.iter().map(String::as_str).collect();
        prop_assert!(!ask(&grants, "tax", &requested).is_allowed());
    }

    #[test]
    fn allowed_fields_are_within_the_grant(
        grants in arb_grants(8, false),
        requested in arb_request_fields(),
        purpose in proptest::sample::select(PURPOSES.to_vec()),
    ) {
        let req: Vec<&str> = requested.iter().map(String::as_str).collect();
        if let Decision::Allow(a) = ask(&grants, purpose, &req) {
            let g = grants.iter().find(|g| g.id == a.grant_id).expect("allowed by a known grant");
            prop_assert!(g.revoked_at.is_none() && g.valid_from <= NOW && g.valid_until.is_none_or(|u| NOW < u));
            prop_assert!(g.purposes.iter().any(|p| p == purpose));
            match &a.fields {
                GrantFields::All => prop_assert_eq!(&g.fields, &GrantFields::All),
                GrantFields::Pointers(ps) => {
                    for p in ps {
                        prop_assert!(covered(&g.fields, p), "{} not covered by {:?}", p, g.fields);
                    }
                }
            }
        }
    }

    #[test]
    fn a_denial_names_the_purposes_own_grant_when_the_consumer_holds_one(
        grants in arb_grants(8, false),
        requested in arb_request_fields(),
        purpose in proptest::sample::select(PURPOSES.to_vec()),
    ) {
        let req: Vec<&str> = requested.iter().map(String::as_str).collect();
        if let Decision::Deny(reason) = ask(&grants, purpose, &req) {
            let names_it = |g: &Grant| g.purposes.iter().any(|p| p == purpose);
            let live = |g: &Grant| g.revoked_at.is_none() && g.valid_from <= NOW && g.valid_until.is_none_or(|u| NOW < u);
            // "Not granted" only when no grant of any state names the purpose ...
            if grants.iter().any(names_it) {
                prop_assert!(
                    !matches!(reason, DenyReason::PurposeNotGranted { .. } | DenyReason::NoGrant { .. }),
                    "{reason:?}"
                );
            }
            // ... and when none that names it is live, the reason is why the newest is not.
            if grants.iter().any(names_it) && !grants.iter().any(|g| names_it(g) && live(g)) {
                prop_assert!(
                    matches!(
                        reason,
                        DenyReason::GrantNotYetValid { .. } | DenyReason::GrantExpired { .. } | DenyReason::GrantRevoked { .. }
                    ),
                    "{reason:?}"
                );
            }
        }
    }

    #[test]
    fn revoking_or_expiring_a_grant_never_widens_access(
        grants in arb_grants(8, false),
        requested in arb_request_fields(),
        purpose in proptest::sample::select(PURPOSES.to_vec()),
        victim in any::<proptest::sample::Index>(),
        expire in any::<bool>(),
    ) {
        let req: Vec<&str> = requested.iter().map(String::as_str).collect();
        let before = ask(&grants, purpose, &req);
        let mut after_grants = grants.clone();
        let v = victim.index(after_grants.len());
        if expire {
            after_grants[v].valid_until = Some(NOW);
        } else {
            after_grants[v].revoked_at = Some(NOW);
        }
        let after = ask(&after_grants, purpose, &req);
        if let Decision::Allow(a) = &after {
            // Allowed after implies allowed before ...
            let Decision::Allow(b) = &before else {
                return Err(TestCaseError::fail(format!("denied before, allowed after: {a:?}")));
            };
            // ... for the same fields when fields were named ...
            if !req.is_empty() {
                prop_assert_eq!(&a.fields, &b.fields);
            }
            // ... and by a grant that was already usable before.
            prop_assert_ne!(&a.grant_id, &after_grants[v].id);
            let same: Vec<Grant> = grants.iter().filter(|g| g.id == a.grant_id).cloned().collect();
            let alone = ask(&same, purpose, &req);
            prop_assert!(matches!(&alone, Decision::Allow(x) if x.fields == a.fields));
        }
    }
}
