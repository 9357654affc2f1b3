//! The demo registers' synthetic data: deterministic, realistic in shape, and
//! valid against the record schemas the registers are registered with.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;

use lienthong_provider::demo::{
    BIRTH_RECORD, CRIMINAL_RECORD_EXTRACT, CivilStatusRegister, DEATH_RECORD, DEMO_CITIZENS, DemoRegisterKind, Gender,
    JudicialRegister, MARRIAGE_RECORD, citizen, citizen_index, citizen_national_id, demo_schemas,
};
use lienthong_provider::{FetchContext, FetchError, RecordSource};
use serde_json::{Value, json};

const SEED: u64 = 20_250_630;

/// The options the broker validates with: Rust regex patterns and formats checked.
fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::options()
        .with_pattern_options(jsonschema::PatternOptions::regex())
        .should_validate_formats(true)
        .build(schema)
        .unwrap()
}

fn definition(record_type: &str) -> Value {
    let (_, text) = demo_schemas()
        .into_iter()
        .find(|(name, _)| *name == record_type)
        .unwrap();
    serde_json::from_str(text).unwrap()
}

fn assert_valid(validator: &jsonschema::Validator, record: &Value, what: &str) {
    let errors: Vec<String> = validator
        .iter_errors(record)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{what} invalid: {errors:?}\n{record:#}");
}

fn ctx(record_type: &str, query: Value) -> FetchContext {
    FetchContext {
        record_type: record_type.to_owned(),
        schema_version: 1,
        query,
        request_id: "req-1".to_owned(),
        consumer: "tax-office".to_owned(),
        purpose: "test".to_owned(),
        fields: Vec::new(),
        deadline: None,
    }
}

fn iso(date: time::Date) -> String {
    format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
}

#[test]
fn schema_files_are_registration_definitions() {
    let schemas = demo_schemas();
    assert_eq!(schemas.len(), 4);
    for (record_type, text) in schemas {
        let def: Value = serde_json::from_str(text).unwrap();
        let keys: HashSet<&str> = def.as_object().unwrap().keys().map(String::as_str).collect();
        let expected: HashSet<&str> = [
            "name",
            "description",
            "owner",
            "subject_key",
            "query_schema",
            "record_schema",
        ]
        .into();
        assert_eq!(keys, expected, "{record_type}");
        assert_eq!(def["name"], record_type);
        assert_eq!(def["subject_key"], "national_id");
        let owner = if record_type.starts_with("civil_status.") {
            DemoRegisterKind::CivilStatus
        } else {
            DemoRegisterKind::JudicialRecords
        };
        assert_eq!(def["owner"], owner.member_id());
        assert!(owner.record_types().contains(&record_type));
        for which in ["query_schema", "record_schema"] {
            let schema = &def[which];
            assert!(
                jsonschema::draft202012::meta::is_valid(schema),
                "{record_type} {which} is not a valid 2020-12 schema"
            );
            assert_eq!(schema["type"], "object");
            assert_eq!(schema["additionalProperties"], false);
        }
        assert_eq!(def["query_schema"]["required"], json!(["national_id"]));
    }
    assert_eq!(DemoRegisterKind::CivilStatus.schemas().len(), 3);
    assert_eq!(DemoRegisterKind::JudicialRecords.schemas().len(), 1);
}

#[test]
fn query_schema_accepts_ids_and_rejects_malformed_queries() {
    let query = validator(&definition(BIRTH_RECORD)["query_schema"]);
    let id = citizen_national_id(SEED, 7);
    assert!(query.is_valid(&json!({ "national_id": id })));
    assert!(query.is_valid(&json!({ "national_id": id, "birth_date": "1990-02-28" })));
    assert!(!query.is_valid(&json!({ "national_id": "12345678901" })));
    assert!(!query.is_valid(&json!({ "national_id": "12345678901a" })));
    assert!(!query.is_valid(&json!({ "national_id": id, "birth_date": "1990-02-30" })));
    assert!(!query.is_valid(&json!({ "national_id": id, "name": "x" })));
    assert!(!query.is_valid(&json!({ "birth_date": "1990-02-28" })));
}

#[test]
fn one_thousand_records_of_each_type_validate_against_their_schema() {
    let civil = CivilStatusRegister::new(SEED);
    let judicial = JudicialRegister::new(SEED);
    let birth = validator(&definition(BIRTH_RECORD)["record_schema"]);
    let marriage = validator(&definition(MARRIAGE_RECORD)["record_schema"]);
    let death = validator(&definition(DEATH_RECORD)["record_schema"]);
    let extract = validator(&definition(CRIMINAL_RECORD_EXTRACT)["record_schema"]);

    for index in 0..1_000 {
        assert_valid(&birth, &civil.birth_record(index), "birth record");
        assert_valid(&extract, &judicial.criminal_record_extract(index), "extract");
    }
    let (mut marriages, mut deaths, mut with_convictions, mut fatherless) = (0, 0, 0, 0);
    let mut index = 0;
    while marriages < 1_000 || deaths < 1_000 || with_convictions < 200 {
        if let Some(record) = civil.marriage_record(index) {
            if marriages < 1_000 {
                assert_valid(&marriage, &record, "marriage record");
            }
            marriages += 1;
        }
        if let Some(record) = civil.death_record(index) {
            if deaths < 1_000 {
                assert_valid(&death, &record, "death record");
            }
            deaths += 1;
        }
        let record = judicial.criminal_record_extract(index);
        if !record["convictions"].as_array().unwrap().is_empty() && with_convictions < 200 {
            assert_valid(&extract, &record, "extract with convictions");
            with_convictions += 1;
        }
        if index < 2_000 && civil.birth_record(index).get("father").is_none() {
            fatherless += 1;
        }
        index += 1;
        assert!(index < DEMO_CITIZENS, "too few marriages, deaths or convictions");
    }
    // Births registered without a father exist but are rare.
    assert!((1..200).contains(&fatherless), "{fatherless} fatherless births");
}

#[test]
fn same_seed_and_index_give_the_same_records() {
    let a = CivilStatusRegister::new(SEED);
    let b = CivilStatusRegister::new(SEED);
    let j = JudicialRegister::new(SEED);
    for index in [0, 1, 2, 4_242, 99_999] {
        assert_eq!(citizen(SEED, index), citizen(SEED, index));
        assert_eq!(a.birth_record(index), b.birth_record(index));
        assert_eq!(a.marriage_record(index), b.marriage_record(index));
        assert_eq!(a.death_record(index), b.death_record(index));
        assert_eq!(
            j.criminal_record_extract(index),
            JudicialRegister::new(SEED).criminal_record_extract(index)
        );
    }
    // Indexes beyond the population wrap around.
    assert_eq!(citizen(SEED, DEMO_CITIZENS + 3), citizen(SEED, 3));
    // Another seed is another world.
    let differing = (0..100)
        .filter(|i| citizen(SEED, *i).full_name != citizen(SEED + 1, *i).full_name)
        .count();
    assert!(differing > 50, "only {differing} of 100 names differ");
}

#[test]
fn every_citizen_has_a_distinct_id_that_maps_back_to_its_index() {
    let mut seen = HashSet::with_capacity(DEMO_CITIZENS as usize);
    for index in 0..DEMO_CITIZENS {
        let c = citizen(SEED, index);
        let id = &c.national_id;
        assert_eq!(id.len(), 12, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_digit()), "{id}");
        assert_eq!(&id[..3], c.birth_place.province.code);
        let year = c.birth_date.year();
        let expected_digit = match (year >= 2000, c.gender) {
            (false, Gender::Male) => '0',
            (false, Gender::Female) => '1',
            (true, Gender::Male) => '2',
            (true, Gender::Female) => '3',
        };
        assert_eq!(id.chars().nth(3), Some(expected_digit), "{id}");
        assert_eq!(&id[4..6], format!("{:02}", year % 100));
        assert_eq!(id[6..].parse::<u32>().unwrap(), index);
        assert_eq!(citizen_index(SEED, id), Some(index));
        assert!(seen.insert(id.clone()), "duplicate id {id}");
    }
    assert_eq!(seen.len(), DEMO_CITIZENS as usize);
}

#[test]
fn ids_of_no_generated_citizen_are_unknown() {
    let id = citizen_national_id(SEED, 123);
    // Serial beyond the population.
    let beyond = format!("{}{}", &id[..6], DEMO_CITIZENS);
    assert_eq!(citizen_index(SEED, &beyond), None);
    // Right serial, wrong birth year or province.
    let other_year = if &id[4..6] == "99" { "98" } else { "99" };
    let wrong_year = format!("{}{other_year}{}", &id[..4], &id[6..]);
    assert_eq!(citizen_index(SEED, &wrong_year), None);
    let other_province = if &id[..3] == "999" { "998" } else { "999" };
    assert_eq!(citizen_index(SEED, &format!("{other_province}{}", &id[3..])), None);
    assert_eq!(citizen_index(SEED, &id[..11]), None);
    assert_eq!(citizen_index(SEED, &format!("{}x", &id[..11])), None);
    // Another seed's world has other citizens behind the same serials.
    let shared = (0..100)
        .filter(|i| citizen_index(SEED + 1, &citizen_national_id(SEED, *i)).is_some())
        .count();
    assert!(shared < 5, "{shared} ids valid under another seed");
}

#[test]
fn population_has_realistic_shares() {
    let civil = CivilStatusRegister::new(SEED);
    let judicial = JudicialRegister::new(SEED);
    let n = 20_000;
    let (mut married, mut deceased, mut convicted, mut nguyen, mut male) = (0, 0, 0, 0, 0);
    let mut provinces = HashSet::new();
    for index in 0..n {
        let c = citizen(SEED, index);
        married += usize::from(civil.marriage_record(index).is_some());
        deceased += usize::from(civil.death_record(index).is_some());
        let extract = judicial.criminal_record_extract(index);
        convicted += usize::from(!extract["convictions"].as_array().unwrap().is_empty());
        nguyen += usize::from(c.name.family == "Nguyễn");
        male += usize::from(c.gender == Gender::Male);
        provinces.insert(c.birth_place.province.code);
    }
    let share = |k: usize| k as f64 / f64::from(n);
    assert!((0.2..0.5).contains(&share(married)), "married {}", share(married));
    assert!((0.02..0.2).contains(&share(deceased)), "deceased {}", share(deceased));
    assert!(
        (0.005..0.06).contains(&share(convicted)),
        "convicted {}",
        share(convicted)
    );
    assert!((0.33..0.43).contains(&share(nguyen)), "Nguyễn {}", share(nguyen));
    assert!((0.45..0.55).contains(&share(male)), "male {}", share(male));
    assert!(provinces.contains("001") && provinces.contains("079") && provinces.len() > 15);
}

#[test]
fn marriages_agree_from_both_sides_and_events_are_in_order() {
    let civil = CivilStatusRegister::new(SEED);
    let judicial = JudicialRegister::new(SEED);
    let mut checked = 0;
    for index in 0..5_000 {
        let c = citizen(SEED, index);
        let birth = iso(c.birth_date);
        if let Some(m) = civil.marriage_record(index) {
            let spouse_index = citizen_index(SEED, m["spouse"]["national_id"].as_str().unwrap())
                .expect("the spouse is a generated citizen");
            let back = civil.marriage_record(spouse_index).unwrap();
            assert_eq!(back["spouse"]["national_id"], c.national_id.as_str());
            assert_eq!(back["marriage_date"], m["marriage_date"]);
            assert_eq!(back["registration"], m["registration"]);
            assert_ne!(back["gender"], m["gender"]);
            assert!(m["marriage_date"].as_str().unwrap() > birth.as_str());
            checked += 1;
        }
        if let Some(d) = civil.death_record(index) {
            let died = d["death_date"].as_str().unwrap();
            assert!(died > birth.as_str());
            if let Some(m) = civil.marriage_record(index) {
                assert!(died >= m["marriage_date"].as_str().unwrap());
                assert_eq!(m["status"], "ended_by_death");
            }
            assert!(d["registration"]["date"].as_str().unwrap() >= died);
        }
        let extract = judicial.criminal_record_extract(index);
        for conviction in extract["convictions"].as_array().unwrap() {
            let judged = conviction["judgment_date"].as_str().unwrap();
            assert!(judged >= "2018-01-01", "judged under the Penal Code 2015");
            let adult = (c.birth_date.year() + 18).to_string();
            assert!(judged[..4] >= adult[..], "convicted as a minor");
            if let Some(d) = civil.death_record(index) {
                assert!(judged < d["death_date"].as_str().unwrap());
            }
        }
        let active = extract["convictions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["expunged"] == false);
        assert_eq!(extract["has_criminal_record"], active);
    }
    assert!(checked > 1_000);
}

#[test]
fn records_read_like_vietnamese_documents() {
    let civil = CivilStatusRegister::new(SEED);
    for index in 0..50 {
        let record = civil.birth_record(index);
        let c = citizen(SEED, index);
        assert_eq!(record["national_id"], c.national_id.as_str());
        assert_eq!(record["full_name"], c.full_name.as_str());
        assert_eq!(record["birth_date"], iso(c.birth_date).as_str());
        assert_eq!(c.full_name.split(' ').count(), 3);
        let office = record["registration"]["office"].as_str().unwrap();
        assert!(
            office == format!("UBND {}", c.birth_place.ward.to_lowercase())
                || office.starts_with("UBND phường ")
                || office.starts_with("UBND xã ")
                || office.starts_with("UBND thị trấn "),
            "{office}"
        );
        let mother = record["mother"]["full_name"].as_str().unwrap();
        assert_eq!(mother.split(' ').count(), 3);
        match record.get("father") {
            // Children bear their father's family name...
            Some(father) => {
                assert!(father["full_name"].as_str().unwrap().starts_with(c.name.family))
            }
            // ...or their mother's when no father is registered.
            None => assert!(mother.starts_with(c.name.family)),
        }
    }
}

#[tokio::test]
async fn registers_answer_fetches_and_refuse_unknown_subjects() {
    let civil = CivilStatusRegister::new(SEED);
    let c = citizen(SEED, 5);
    let by_id = json!({ "national_id": c.national_id });
    let record = civil.fetch(ctx(BIRTH_RECORD, by_id.clone())).await.unwrap();
    assert_eq!(record, civil.birth_record(5));

    let with_date = json!({ "national_id": c.national_id, "birth_date": iso(c.birth_date) });
    assert_eq!(civil.fetch(ctx(BIRTH_RECORD, with_date)).await.unwrap(), record);

    let wrong_date = json!({ "national_id": c.national_id, "birth_date": "1900-01-01" });
    assert!(matches!(
        civil.fetch(ctx(BIRTH_RECORD, wrong_date)).await,
        Err(FetchError::NotFound(_))
    ));
    let unknown = json!({ "national_id": format!("{}{}", &c.national_id[..6], DEMO_CITIZENS + 1) });
    let err = civil.fetch(ctx(BIRTH_RECORD, unknown)).await.unwrap_err();
    assert!(matches!(err, FetchError::NotFound(_)));
    assert!(!err.to_string().contains(&c.national_id[..6]), "{err}");

    for bad in [
        json!([]),
        json!({}),
        json!({ "national_id": 123 }),
        json!({ "national_id": "12345" }),
        json!({ "national_id": c.national_id, "birth_date": "31/12/1990" }),
        json!({ "national_id": c.national_id, "nickname": "x" }),
    ] {
        assert!(
            matches!(
                civil.fetch(ctx(BIRTH_RECORD, bad.clone())).await,
                Err(FetchError::InvalidQuery(_))
            ),
            "{bad}"
        );
    }

    // Married and unmarried, deceased and living citizens exist among the first few.
    let married = (0..100).find(|i| civil.marriage_record(*i).is_some()).unwrap();
    let single = (0..100).find(|i| civil.marriage_record(*i).is_none()).unwrap();
    let query = |i: u32| json!({ "national_id": citizen_national_id(SEED, i) });
    assert_eq!(
        civil.fetch(ctx(MARRIAGE_RECORD, query(married))).await.unwrap(),
        civil.marriage_record(married).unwrap()
    );
    assert!(matches!(
        civil.fetch(ctx(MARRIAGE_RECORD, query(single))).await,
        Err(FetchError::NotFound(_))
    ));
    let alive = (0..100).find(|i| civil.death_record(*i).is_none()).unwrap();
    assert!(matches!(
        civil.fetch(ctx(DEATH_RECORD, query(alive))).await,
        Err(FetchError::NotFound(_))
    ));

    let judicial = JudicialRegister::new(SEED);
    assert_eq!(judicial.record_types(), vec![CRIMINAL_RECORD_EXTRACT.to_owned()]);
    let extract = judicial
        .fetch(ctx(CRIMINAL_RECORD_EXTRACT, query(single)))
        .await
        .unwrap();
    assert_eq!(extract, judicial.criminal_record_extract(single));
}

#[test]
fn register_kinds_parse_from_their_member_ids() {
    for kind in DemoRegisterKind::ALL {
        assert_eq!(kind.member_id().parse::<DemoRegisterKind>().unwrap(), kind);
        let types: Vec<String> = kind.source(1).record_types();
        assert_eq!(types, kind.record_types());
    }
    assert!("population".parse::<DemoRegisterKind>().is_err());
}
