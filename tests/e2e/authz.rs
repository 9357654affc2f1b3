//! Authorization end to end: grants, revocation, roles, expiry, rate limits
//! and refused admin input.

use crate::harness::*;
use lienthong::v1 as pb;
use lienthong_cli::federation::{ADMIN, CITIZEN_PORTAL, CIVIL_STATUS, JUDICIAL_OFFICE, PURPOSE_CERTIFICATE, TAX_DEPT};
use tonic::Code;

#[tokio::test]
async fn grant_allows_revocation_denies_the_next_lookup() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let tax = client(&fed, TAX_DEPT).await;
    let subject = citizen_id(&fed, 11);
    let lookup = birth_lookup(&subject, "tax-law-38-2019/art-17");

    let err = tax.exchange().lookup(lookup.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("grant"), "{}", err.message());

    let g = granted(&admin, birth_grant(TAX_DEPT, &["/full_name", "/birth_date"], 0)).await;
    let r = tax.exchange().lookup(lookup.clone()).await.unwrap().into_inner();
    let record: serde_json::Value = serde_json::from_str(&r.record_json).unwrap();
    let mut keys: Vec<&String> = record.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["birth_date", "full_name"],
        "only granted fields leave the broker"
    );
    assert!(r.receipt.is_some());

    // A purpose not in the grant.
    let err = tax
        .exchange()
        .lookup(birth_lookup(&subject, PURPOSE_CERTIFICATE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("purpose"), "{}", err.message());

    revoke(&admin, &g.id, "end of the tax audit").await;
    let err = tax.exchange().lookup(lookup).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("revoked"), "{}", err.message());

    // A second revocation changes nothing and says so, quoting the first;
    // the log holds one revocation, and the refused second.
    let err = admin
        .admin()
        .revoke_grant(pb::RevokeGrantRequest {
            id: g.id.clone(),
            reason: "second thoughts".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("already revoked") && err.message().contains("end of the tax audit"),
        "{err:?}"
    );
    let revocations: Vec<_> = admin_entries(&fed)
        .await
        .into_iter()
        .filter(|e| e.action == "grant.revoke" && e.target == g.id)
        .map(|e| e.outcome())
        .collect();
    assert_eq!(revocations, [pb::Outcome::Allowed, pb::Outcome::Invalid]);

    // Grants are never deleted: the revoked one is still listed.
    let listed = admin
        .admin()
        .list_grants(pb::ListGrantsRequest {
            consumer: TAX_DEPT.into(),
            record_type: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert!(listed.iter().any(|x| x.id == g.id && x.revoked_at.is_some()));
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_member_without_the_consumer_role_is_denied() {
    let (_dir, fed) = federation().await;
    let portal = client(&fed, CITIZEN_PORTAL).await;
    let err = portal
        .exchange()
        .lookup(birth_lookup(&citizen_id(&fed, 3), PURPOSE_CERTIFICATE))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("consumer"), "{}", err.message());
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_expired_grant_is_denied() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let now = time::OffsetDateTime::now_utc();
    let mut g = birth_grant(TAX_DEPT, &["*"], 0);
    g.valid_from = Some(lienthong_broker::convert::ts(now - time::Duration::hours(2)));
    // One already past is refused: it would allow nothing.
    g.valid_until = Some(lienthong_broker::convert::ts(now - time::Duration::hours(1)));
    let err = admin.admin().create_grant(g.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("already past"), "{}", err.message());
    let until = time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    g.valid_until = Some(lienthong_broker::convert::ts(until));
    admin.admin().create_grant(g).await.unwrap();
    tokio::time::sleep((until - time::OffsetDateTime::now_utc()).try_into().unwrap_or_default()).await;
    let err = client(&fed, TAX_DEPT)
        .await
        .exchange()
        .lookup(birth_lookup(&citizen_id(&fed, 5), "tax-law-38-2019/art-17"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("expired"), "{}", err.message());
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rate_limit_of_n_per_minute_allows_n_and_refuses_the_next() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    admin
        .admin()
        .create_grant(birth_grant(TAX_DEPT, &["/full_name"], 3))
        .await
        .unwrap();
    let tax = client(&fed, TAX_DEPT).await;
    for i in 0..3 {
        tax.exchange()
            .lookup(birth_lookup(&citizen_id(&fed, 20 + i), "tax-law-38-2019/art-17"))
            .await
            .unwrap_or_else(|e| panic!("lookup {i} within the limit: {e:?}"));
    }
    let err = tax
        .exchange()
        .lookup(birth_lookup(&citizen_id(&fed, 30), "tax-law-38-2019/art-17"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let retry: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    // The same wait for gRPC's own retry policies (gRFC A6), in milliseconds.
    let pushback: u64 = err
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        pushback > 0 && pushback <= retry * 1000,
        "pushback {pushback} ms, retry-after {retry} s"
    );
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_admin_input_is_refused_and_changes_nothing() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let count = async || {
        admin
            .admin()
            .list_grants(pb::ListGrantsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .grants
            .len()
    };
    let before = count().await;
    let now = time::OffsetDateTime::now_utc();
    let mut until_before_from = birth_grant(TAX_DEPT, &["/full_name"], 0);
    until_before_from.valid_from = Some(lienthong_broker::convert::ts(now));
    until_before_from.valid_until = Some(lienthong_broker::convert::ts(now - time::Duration::hours(1)));
    let mut no_purpose = birth_grant(TAX_DEPT, &["/full_name"], 0);
    no_purpose.purposes.clear();
    let mut unknown_type = birth_grant(TAX_DEPT, &["/full_name"], 0);
    unknown_type.record_type = "civil_status.pet_record".into();
    let cases: Vec<(pb::CreateGrantRequest, Code, &str)> = vec![
        (
            birth_grant("ghost-agency", &["/full_name"], 0),
            Code::NotFound,
            "ghost-agency",
        ),
        (unknown_type, Code::NotFound, "civil_status.pet_record"),
        (
            birth_grant(TAX_DEPT, &["/shoe_size"], 0),
            Code::InvalidArgument,
            "/shoe_size",
        ),
        (no_purpose, Code::InvalidArgument, "purpose"),
        (until_before_from, Code::InvalidArgument, "valid_until"),
        (
            birth_grant(CITIZEN_PORTAL, &["/full_name"], 0),
            Code::FailedPrecondition,
            "consumer role",
        ),
    ];
    for (req, code, needle) in cases {
        let err = admin.admin().create_grant(req).await.unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert!(
            err.message().contains(needle),
            "{:?} should name {needle:?}",
            err.message()
        );
    }
    // A non-admin caller.
    let err = client(&fed, JUDICIAL_OFFICE)
        .await
        .admin()
        .create_grant(birth_grant(JUDICIAL_OFFICE, &["*"], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("admin"), "{}", err.message());
    let err = admin
        .admin()
        .add_member(pb::AddMemberRequest {
            id: "Bad Id".into(),
            display_name: "x".into(),
            roles: vec![pb::Role::Consumer as i32],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A name or reason is one line: a control character would forge log
    // lines, and PostgreSQL refuses NUL.
    for display_name in ["Office\nINFO granted", "Office\0", "Office\u{1b}[2J"] {
        let err = admin
            .admin()
            .add_member(pb::AddMemberRequest {
                id: "new-office".into(),
                display_name: display_name.into(),
                roles: vec![pb::Role::Consumer as i32],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{display_name:?}");
        assert!(err.message().contains("without control characters"), "{err:?}");
    }
    let err = admin
        .admin()
        .disable_member(pb::SetMemberEnabledRequest {
            id: TAX_DEPT.into(),
            reason: "fraud\r\nsuspected".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let tax = admin
        .admin()
        .get_member(pb::GetMemberRequest { id: TAX_DEPT.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(tax.enabled, "{tax:?}");
    // A role number that is no role is refused, not read as "every member".
    let err = admin
        .admin()
        .list_members(pb::ListMembersRequest { role: 99 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(count().await, before, "nothing was stored");
    fed.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_disabled_register_gets_no_more_queries() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let office = client(&fed, JUDICIAL_OFFICE).await;
    let subject = citizen_id(&fed, 12);
    look_up_birth(&office, &subject).await.unwrap();
    admin
        .admin()
        .disable_member(pb::SetMemberEnabledRequest {
            id: CIVIL_STATUS.into(),
            reason: "register key reported stolen".into(),
        })
        .await
        .unwrap();
    let err = look_up_birth(&office, &subject).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("register civil-status is disabled"),
        "{}",
        err.message()
    );
    admin
        .admin()
        .enable_member(pb::SetMemberEnabledRequest {
            id: CIVIL_STATUS.into(),
            reason: String::new(),
        })
        .await
        .unwrap();
    look_up_birth(&office, &subject).await.unwrap();
    fed.shutdown().await.unwrap();
}

/// A consumer whose grant for one purpose is live is told why its grant
/// for another purpose cannot be used (not yet valid, expired, revoked),
/// not that the other purpose is not granted.
#[tokio::test]
async fn a_dead_grant_is_named_even_beside_a_live_grant_for_another_purpose() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let tax = client(&fed, TAX_DEPT).await;
    let subject = citizen_id(&fed, 13);
    admin
        .admin()
        .create_grant(birth_grant(TAX_DEPT, &["*"], 0))
        .await
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let for_purpose = |purpose: &str, from: time::OffsetDateTime, until: time::OffsetDateTime| {
        let mut g = birth_grant(TAX_DEPT, &["*"], 0);
        g.purposes = vec![purpose.into()];
        g.valid_from = Some(lienthong_broker::convert::ts(from));
        g.valid_until = Some(lienthong_broker::convert::ts(until));
        g
    };
    let hour = time::Duration::hours(1);
    admin
        .admin()
        .create_grant(for_purpose("pw-later", now + hour, now + 2 * hour))
        .await
        .unwrap();
    admin
        .admin()
        .create_grant(for_purpose("pw-over", now - 2 * hour, now + time::Duration::seconds(1)))
        .await
        .unwrap();
    let revoked = granted(&admin, for_purpose("pw-revoked", now - hour, now + hour)).await;
    revoke(&admin, &revoked.id, "inspection closed").await;
    tax.exchange()
        .lookup(birth_lookup(&subject, "tax-law-38-2019/art-17"))
        .await
        .expect("the live grant is used");
    // A grant cannot be made already expired: "pw-over" ends a second after `now`.
    let over = now + time::Duration::seconds(1) - time::OffsetDateTime::now_utc();
    tokio::time::sleep(over.try_into().unwrap_or_default()).await;

    for (purpose, says, reason) in [
        ("pw-later", "grant is not valid before", "grant_not_yet_valid"),
        ("pw-over", "grant expired at", "grant_expired"),
        ("pw-revoked", "grant was revoked (inspection closed)", "grant_revoked"),
    ] {
        let mut lookup = birth_lookup(&subject, purpose);
        lookup.request_id = format!("dead-{purpose}");
        let err = tax.exchange().lookup(lookup).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{purpose}: {err:?}");
        assert!(err.message().starts_with(says), "{purpose}: {}", err.message());
        let entry = logged(
            &fed,
            pb::EntryFilter {
                actor: TAX_DEPT.into(),
                ..Default::default()
            },
        )
        .await
        .into_iter()
        .find(|e| e.request_id == format!("dead-{purpose}"))
        .expect("the refusal is logged");
        assert!(entry.reason.starts_with(reason), "{purpose}: {}", entry.reason);
    }
    // A purpose no grant names is still "not granted".
    let err = tax
        .exchange()
        .lookup(birth_lookup(&subject, "pw-never"))
        .await
        .unwrap_err();
    assert!(err.message().contains("is not granted"), "{}", err.message());
    fed.shutdown().await.unwrap();
}

/// Lookups refused because the register is disabled fetch nothing, and so
/// use none of the grant's rate limit.
#[tokio::test]
async fn lookups_refused_for_a_disabled_register_use_none_of_the_rate_limit() {
    let (_dir, fed) = federation().await;
    let admin = client(&fed, ADMIN).await;
    let tax = client(&fed, TAX_DEPT).await;
    admin
        .admin()
        .create_grant(birth_grant(TAX_DEPT, &["/full_name"], 1))
        .await
        .unwrap();
    let lookup = birth_lookup(&citizen_id(&fed, 17), "tax-law-38-2019/art-17");
    admin
        .admin()
        .disable_member(pb::SetMemberEnabledRequest {
            id: CIVIL_STATUS.into(),
            reason: "register under maintenance".into(),
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let err = tax.exchange().lookup(lookup.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    admin
        .admin()
        .enable_member(pb::SetMemberEnabledRequest {
            id: CIVIL_STATUS.into(),
            reason: String::new(),
        })
        .await
        .unwrap();
    tax.exchange()
        .lookup(lookup.clone())
        .await
        .expect("the one lookup a minute is still there");
    let err = tax.exchange().lookup(lookup).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    fed.shutdown().await.unwrap();
}
