//! The civil status register: birth, marriage and death records.

use rand::Rng;
use rand::rngs::SmallRng;
use serde_json::{Value, json};
use time::{Date, Duration};

use super::names::{pick_family_name, pick_name};
use super::places::{pick_any_locality, pick_locality};
use super::{
    BIRTH_RECORD, Citizen, DEATH_RECORD, Gender, Locality, MARRIAGE_RECORD, REFERENCE_DATE, Stream, citizen, couple,
    date_between, death_date, iso_date, place_json, rng_for, subject,
};
use crate::kit::{FetchContext, FetchError, RecordSource};

/// Births, marriages and deaths of the synthetic citizens of one seed.
#[derive(Clone, Debug)]
pub struct CivilStatusRegister {
    seed: u64,
}

/// Civil status events are registered within days, never after the world's end.
fn registered_on(rng: &mut SmallRng, event: Date, within_days: i64) -> Date {
    let latest = (event + Duration::days(within_days)).min(REFERENCE_DATE);
    date_between(rng, event, latest.max(event))
}

/// Where and under which book entry an event was registered.
fn registration_json(rng: &mut SmallRng, locality: &Locality, date: Date) -> Value {
    json!({
        "office": locality.registration_office(),
        "date": iso_date(date),
        "book_number": format!("{:02}/{}", rng.gen_range(1..=3), date.year()),
        "entry_number": rng.gen_range(1..=800),
    })
}

/// Whole years between two dates.
fn age_on(birth: Date, day: Date) -> i32 {
    let mut age = day.year() - birth.year();
    if (day.month(), day.day()) < (birth.month(), birth.day()) {
        age -= 1;
    }
    age
}

impl CivilStatusRegister {
    /// The register of the world generated from `seed`.
    pub fn new(seed: u64) -> Self {
        CivilStatusRegister { seed }
    }

    /// The birth record of citizen `index`; every citizen has one.
    pub fn birth_record(&self, index: u32) -> Value {
        let c = citizen(self.seed, index);
        let mut rng = rng_for(self.seed, c.index, Stream::Birth);
        let year = c.birth_date.year();
        // A few births are registered without a father; the child then bears
        // the mother's family name.
        let has_father = rng.gen_bool(0.97);
        let mother_family = if has_father {
            pick_family_name(&mut rng)
        } else {
            c.name.family
        };
        let father_year = year - rng.gen_range(21..=42);
        // Spouses are of similar age; mothers between 18 and 40 at the birth.
        let mother_year = (father_year + rng.gen_range(-2..=7)).clamp(year - 40, year - 18);
        let father = pick_name(&mut rng, c.name.family, Gender::Male, father_year);
        let mother = pick_name(&mut rng, mother_family, Gender::Female, mother_year);
        let native_province = if rng.gen_bool(0.7) {
            c.birth_place.province
        } else {
            pick_any_locality(&mut rng).province
        };
        let residence = c.birth_place.address();
        let registered = registered_on(&mut rng, c.birth_date, 60);
        let parent = |name: String, birth_year: i32| {
            json!({
                "full_name": name,
                "birth_year": birth_year,
                "ethnicity": c.ethnicity,
                "nationality": "Việt Nam",
                "residence": residence,
            })
        };
        let mut record = json!({
            "national_id": c.national_id,
            "full_name": c.full_name,
            "gender": c.gender.as_str(),
            "birth_date": iso_date(c.birth_date),
            "place_of_birth": place_json(&c.birth_place),
            "native_place": native_province.full_name(),
            "ethnicity": c.ethnicity,
            "nationality": "Việt Nam",
        });
        if let Some(object) = record.as_object_mut() {
            if has_father {
                object.insert("father".into(), parent(father.full(), father_year));
            }
            object.insert("mother".into(), parent(mother.full(), mother_year));
            object.insert(
                "registration".into(),
                registration_json(&mut rng, &c.birth_place, registered),
            );
        }
        record
    }

    /// The marriage record of citizen `index`, if the citizen ever married.
    pub fn marriage_record(&self, index: u32) -> Option<Value> {
        let c = citizen(self.seed, index);
        let marriage = couple(self.seed, c.index)?;
        let spouse = citizen(self.seed, marriage.spouse_of(c.index));
        // One generator per couple, so both spouses see the same certificate.
        let mut rng = rng_for(self.seed, c.index / 2, Stream::Marriage);
        let (husband, wife) = if c.gender == Gender::Male {
            (&c, &spouse)
        } else {
            (&spouse, &c)
        };
        let office_locality = if rng.gen_bool(0.6) {
            wife.birth_place
        } else {
            husband.birth_place
        };
        let registration = registration_json(&mut rng, &office_locality, marriage.date);
        let ended_on = [death_date(self.seed, &c), death_date(self.seed, &spouse)]
            .into_iter()
            .flatten()
            .min();
        let mut record = json!({
            "national_id": c.national_id,
            "full_name": c.full_name,
            "gender": c.gender.as_str(),
            "birth_date": iso_date(c.birth_date),
            "spouse": {
                "national_id": spouse.national_id,
                "full_name": spouse.full_name,
                "gender": spouse.gender.as_str(),
                "birth_date": iso_date(spouse.birth_date),
                "ethnicity": spouse.ethnicity,
                "nationality": "Việt Nam",
            },
            "marriage_date": iso_date(marriage.date),
            "status": if ended_on.is_some() { "ended_by_death" } else { "married" },
        });
        if let Some(object) = record.as_object_mut() {
            if let Some(day) = ended_on {
                object.insert("ended_on".into(), json!(iso_date(day)));
            }
            object.insert("registration".into(), registration);
        }
        Some(record)
    }

    /// The death record of citizen `index`, if the citizen is deceased.
    pub fn death_record(&self, index: u32) -> Option<Value> {
        let c = citizen(self.seed, index);
        let died = death_date(self.seed, &c)?;
        let mut rng = rng_for(self.seed, c.index, Stream::DeathRecord);
        let place = if rng.gen_bool(0.75) {
            c.birth_place
        } else {
            pick_locality(&mut rng, c.birth_place.province)
        };
        let age = age_on(c.birth_date, died);
        let causes: &[&str] = if age >= 70 {
            &["Tuổi già", "Bệnh tim mạch", "Đột quỵ", "Ung thư", "Viêm phổi"]
        } else {
            &[
                "Tai nạn giao thông",
                "Bệnh tim mạch",
                "Ung thư",
                "Đột quỵ",
                "Đuối nước",
                "Bệnh hiểm nghèo",
            ]
        };
        let cause = causes[rng.gen_range(0..causes.len())];
        let (declarant, relationship) = declarant(self.seed, &mut rng, &c, died, age);
        let registered = registered_on(&mut rng, died, 15);
        Some(json!({
            "national_id": c.national_id,
            "full_name": c.full_name,
            "gender": c.gender.as_str(),
            "birth_date": iso_date(c.birth_date),
            "death_date": iso_date(died),
            "age_at_death": age,
            "place_of_death": place_json(&place),
            "cause_of_death": cause,
            "declarant": { "full_name": declarant, "relationship": relationship },
            "registration": registration_json(&mut rng, &place, registered),
        }))
    }
}

/// Who declared the death: the surviving spouse if any, else a child, a parent
/// or a sibling depending on the age of the deceased.
fn declarant(seed: u64, rng: &mut SmallRng, c: &Citizen, died: Date, age: i32) -> (String, &'static str) {
    if let Some(marriage) = couple(seed, c.index) {
        let spouse = citizen(seed, marriage.spouse_of(c.index));
        if death_date(seed, &spouse).is_none_or(|d| d > died) {
            return (spouse.full_name, "spouse");
        }
    }
    let gender = if rng.gen_bool(0.5) {
        Gender::Male
    } else {
        Gender::Female
    };
    let year = c.birth_date.year();
    if age >= 45 {
        let family = if c.gender == Gender::Male {
            c.name.family
        } else {
            pick_family_name(rng)
        };
        let child_year = year + rng.gen_range(20..=35);
        let child = pick_name(rng, family, gender, child_year);
        (child.full(), "child")
    } else if age < 30 {
        let parent_year = year - rng.gen_range(21..=40);
        let parent = pick_name(rng, c.name.family, Gender::Male, parent_year);
        (parent.full(), "parent")
    } else {
        let sibling_year = year + rng.gen_range(-8..=8);
        let sibling = pick_name(rng, c.name.family, gender, sibling_year);
        (sibling.full(), "sibling")
    }
}

#[async_trait::async_trait]
impl RecordSource for CivilStatusRegister {
    fn record_types(&self) -> Vec<String> {
        vec![
            BIRTH_RECORD.to_owned(),
            MARRIAGE_RECORD.to_owned(),
            DEATH_RECORD.to_owned(),
        ]
    }

    async fn fetch(&self, ctx: FetchContext) -> Result<Value, FetchError> {
        let c = subject(self.seed, &ctx.query)?;
        match ctx.record_type.as_str() {
            BIRTH_RECORD => Ok(self.birth_record(c.index)),
            MARRIAGE_RECORD => self
                .marriage_record(c.index)
                .ok_or_else(|| FetchError::NotFound("no marriage is registered for this citizen".to_owned())),
            DEATH_RECORD => self
                .death_record(c.index)
                .ok_or_else(|| FetchError::NotFound("no death is registered for this citizen".to_owned())),
            other => Err(FetchError::NotServed(format!("record type {other} is not served here"))),
        }
    }
}
