//! Two demo registers with synthetic, deterministic data: civil status and
//! judicial records for [`DEMO_CITIZENS`] citizens.
//!
//! Nothing is materialised: every citizen and every record is derived on demand,
//! in constant time, from the seed and the citizen's index. The index is also the
//! 6-digit serial at the end of the citizen's national ID, so an ID maps back to
//! its citizen without a table.

mod civil_status;
mod judicial;
pub mod names;
pub mod places;

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;

use lienthong_tls::ServerTls;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use time::{Date, Duration, Month};
use tokio::net::TcpListener;

pub use civil_status::CivilStatusRegister;
pub use judicial::JudicialRegister;
pub use names::PersonName;
pub use places::{Locality, Province};

use crate::kit::{FetchError, ProviderConfig, ProviderError, RecordSource, serve};

/// Number of synthetic citizens the demo registers know.
pub const DEMO_CITIZENS: u32 = 100_000;

/// The day the synthetic world is frozen at: no event happens after it, and
/// documents issued "today" carry this date, so records never change over time.
pub const REFERENCE_DATE: Date = time::macros::date!(2025 - 06 - 30);

/// Record type of the birth record.
pub const BIRTH_RECORD: &str = "civil_status.birth_record";
/// Record type of the marriage record.
pub const MARRIAGE_RECORD: &str = "civil_status.marriage_record";
/// Record type of the death record.
pub const DEATH_RECORD: &str = "civil_status.death_record";
/// Record type of the criminal record extract.
pub const CRIMINAL_RECORD_EXTRACT: &str = "judicial.criminal_record_extract";

/// Which demo register to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DemoRegisterKind {
    /// Births, marriages and deaths (member `civil-status`).
    CivilStatus,
    /// Criminal record extracts (member `judicial-records`).
    JudicialRecords,
}

impl DemoRegisterKind {
    /// Both kinds, in a stable order.
    pub const ALL: [DemoRegisterKind; 2] = [DemoRegisterKind::CivilStatus, DemoRegisterKind::JudicialRecords];

    /// The member id owning this register's record types.
    pub fn member_id(self) -> &'static str {
        match self {
            DemoRegisterKind::CivilStatus => "civil-status",
            DemoRegisterKind::JudicialRecords => "judicial-records",
        }
    }

    /// The record types this register serves.
    pub fn record_types(self) -> &'static [&'static str] {
        match self {
            DemoRegisterKind::CivilStatus => &[BIRTH_RECORD, MARRIAGE_RECORD, DEATH_RECORD],
            DemoRegisterKind::JudicialRecords => &[CRIMINAL_RECORD_EXTRACT],
        }
    }

    /// The register as a [`RecordSource`] generating data from `seed`.
    pub fn source(self, seed: u64) -> Arc<dyn RecordSource> {
        match self {
            DemoRegisterKind::CivilStatus => Arc::new(CivilStatusRegister::new(seed)),
            DemoRegisterKind::JudicialRecords => Arc::new(JudicialRegister::new(seed)),
        }
    }

    /// Registration definitions (`lienthong schema register --file`) of this register's types.
    pub fn schemas(self) -> Vec<(&'static str, &'static str)> {
        demo_schemas()
            .into_iter()
            .filter(|(record_type, _)| self.record_types().contains(record_type))
            .collect()
    }
}

impl fmt::Display for DemoRegisterKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.member_id())
    }
}

/// A name that is not one of the demo registers.
#[derive(Debug, thiserror::Error)]
#[error("unknown demo register {0:?}; expected civil-status or judicial-records")]
pub struct UnknownRegister(String);

impl FromStr for DemoRegisterKind {
    type Err = UnknownRegister;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DemoRegisterKind::ALL
            .into_iter()
            .find(|kind| kind.member_id() == s)
            .ok_or_else(|| UnknownRegister(s.to_owned()))
    }
}

/// Registration definitions of every demo record type, as `(record type, JSON)`.
///
/// The JSON is exactly what `lienthong schema register --file` takes: `name`,
/// `description`, `owner`, `subject_key`, `query_schema`, `record_schema`.
pub fn demo_schemas() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            BIRTH_RECORD,
            include_str!("../../schemas/civil_status.birth_record.json"),
        ),
        (
            MARRIAGE_RECORD,
            include_str!("../../schemas/civil_status.marriage_record.json"),
        ),
        (
            DEATH_RECORD,
            include_str!("../../schemas/civil_status.death_record.json"),
        ),
        (
            CRIMINAL_RECORD_EXTRACT,
            include_str!("../../schemas/judicial.criminal_record_extract.json"),
        ),
    ]
}

/// Serves one demo register over mutual TLS on `listener` until `shutdown` resolves.
///
/// Only the broker of the trust domain `tls` was built for may call it;
/// `config` must name that trust domain.
pub async fn run_demo_register<F>(
    kind: DemoRegisterKind,
    seed: u64,
    tls: Arc<ServerTls>,
    config: ProviderConfig,
    listener: TcpListener,
    shutdown: F,
) -> Result<(), ProviderError>
where
    F: Future<Output = ()> + Send + 'static,
{
    tracing::info!(register = %kind, "starting demo register with {DEMO_CITIZENS} synthetic citizens");
    serve(kind.source(seed), tls, config, listener, shutdown).await
}

/// A citizen's sex as written on civil status documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gender {
    /// `Nam`.
    Male,
    /// `Nữ`.
    Female,
}

impl Gender {
    /// `male` or `female`, the value used in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Gender::Male => "male",
            Gender::Female => "female",
        }
    }
}

/// One synthetic citizen, the subject of every demo record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Citizen {
    /// Index in `0..DEMO_CITIZENS`; also the serial of the national ID.
    pub index: u32,
    /// 12-digit citizen identity number.
    pub national_id: String,
    /// Family, middle and given name.
    pub name: PersonName,
    /// `Nguyễn Thị Lan`.
    pub full_name: String,
    /// Sex.
    pub gender: Gender,
    /// Date of birth.
    pub birth_date: Date,
    /// Where the birth was registered; its province code starts the national ID.
    pub birth_place: Locality,
    /// Ethnic group (`dân tộc`), e.g. `Kinh`.
    pub ethnicity: &'static str,
}

/// Ethnic groups with their approximate share of the population in per mille.
static ETHNICITIES: &[(&str, u32)] = &[
    ("Kinh", 853),
    ("Tày", 19),
    ("Thái", 18),
    ("Mường", 15),
    ("Khmer", 14),
    ("H'Mông", 13),
    ("Nùng", 11),
    ("Hoa", 8),
    ("Dao", 9),
];

/// What a record is derived from; mixed into the seed so records of one citizen
/// are independent of each other yet individually stable.
#[derive(Clone, Copy)]
#[repr(u64)]
pub(crate) enum Stream {
    Citizen = 1,
    Couple = 2,
    Birth = 3,
    Marriage = 4,
    Death = 5,
    DeathRecord = 6,
    Judicial = 7,
}

/// SplitMix64 finaliser: spreads `(index, stream)` over all 64 bits.
fn mix(index: u32, stream: Stream) -> u64 {
    let mut z = ((stream as u64) << 32 | u64::from(index)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator for one record kind of one citizen (or couple).
pub(crate) fn rng_for(seed: u64, index: u32, stream: Stream) -> SmallRng {
    SmallRng::seed_from_u64(seed ^ mix(index, stream))
}

/// A uniformly drawn day in `[from, to]`; `from` if the range is empty.
pub(crate) fn date_between(rng: &mut SmallRng, from: Date, to: Date) -> Date {
    let span = (to - from).whole_days();
    if span <= 0 {
        return from;
    }
    from.checked_add(Duration::days(rng.gen_range(0..=span)))
        .unwrap_or(from)
}

/// 1 January of `year`.
pub(crate) fn new_year(year: i32) -> Date {
    Date::from_calendar_date(year, Month::January, 1).unwrap_or(REFERENCE_DATE)
}

/// The same calendar day `years` later (29 February becomes 28 February).
pub(crate) fn add_years(date: Date, years: i32) -> Date {
    let year = date.year() + years;
    Date::from_calendar_date(year, date.month(), date.day())
        .or_else(|_| Date::from_calendar_date(year, date.month(), 28))
        .unwrap_or(date)
}

/// The date a number of months later, day clamped to 28 to stay valid.
pub(crate) fn add_months(date: Date, months: u32) -> Date {
    let total = date.year() * 12 + i32::from(u8::from(date.month())) - 1 + months as i32;
    let (year, month0) = (total.div_euclid(12), total.rem_euclid(12));
    let month = Month::try_from(month0 as u8 + 1).unwrap_or(Month::January);
    Date::from_calendar_date(year, month, date.day().min(28)).unwrap_or(date)
}

/// `YYYY-MM-DD`, the JSON Schema `date` format.
pub(crate) fn iso_date(date: Date) -> String {
    format!("{:04}-{:02}-{:02}", date.year(), u8::from(date.month()), date.day())
}

/// Parses a `YYYY-MM-DD` date.
pub(crate) fn parse_iso_date(s: &str) -> Option<Date> {
    let mut parts = s.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let month = Month::try_from(m.parse::<u8>().ok()?).ok()?;
    Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()
}

/// Draws from a `(value, weight)` table.
pub(crate) fn weighted<T: Copy>(rng: &mut SmallRng, table: &[(T, u32)]) -> Option<T> {
    let total: u32 = table.iter().map(|(_, w)| w).sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.gen_range(0..total);
    for (value, weight) in table {
        if ticket < *weight {
            return Some(*value);
        }
        ticket -= weight;
    }
    None
}

/// A registered marriage between citizens `2p` and `2p + 1`.
///
/// Pairing neighbours keeps marriages consistent from both sides (each spouse's
/// marriage record names the other) without any lookup table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Couple {
    pub husband: u32,
    pub wife: u32,
    pub husband_birth_year: i32,
    pub wife_birth_year: i32,
    pub date: Date,
}

impl Couple {
    /// The other spouse of `index`.
    pub fn spouse_of(&self, index: u32) -> u32 {
        if index == self.husband { self.wife } else { self.husband }
    }
}

/// The marriage of the pair `index` belongs to, if the pair is married.
pub(crate) fn couple(seed: u64, index: u32) -> Option<Couple> {
    let index = index % DEMO_CITIZENS;
    let pair = index / 2;
    let mut rng = rng_for(seed, pair, Stream::Couple);
    if !rng.gen_bool(0.42) {
        return None;
    }
    let (husband, wife) = if rng.gen_bool(0.5) {
        (pair * 2, pair * 2 + 1)
    } else {
        (pair * 2 + 1, pair * 2)
    };
    let husband_birth_year = rng.gen_range(1935..=2003);
    let wife_birth_year = (husband_birth_year + rng.gen_range(-2..=7)).clamp(1935, 2005);
    // Legal minimum ages are 20 for men and 18 for women (Marriage and Family Law
    // 2014); a year more keeps every birthday before the wedding whatever the days.
    let marriage_year = (husband_birth_year + rng.gen_range(21..=34)).max(wife_birth_year + 19);
    let date = date_between(
        &mut rng,
        new_year(marriage_year),
        new_year(marriage_year + 1) - Duration::days(1),
    );
    // A date after REFERENCE_DATE has not happened yet: the pair is single.
    (date <= REFERENCE_DATE).then_some(Couple {
        husband,
        wife,
        husband_birth_year,
        wife_birth_year,
        date,
    })
}

/// Birth years weighted toward the younger, larger cohorts.
static BIRTH_COHORTS: &[((i32, i32), u32)] = &[
    ((1935, 1954), 1),
    ((1955, 1974), 3),
    ((1975, 1994), 4),
    ((1995, 2024), 5),
];

/// The citizen with `index` in the world generated from `seed`.
///
/// Indexes at or above [`DEMO_CITIZENS`] wrap around.
pub fn citizen(seed: u64, index: u32) -> Citizen {
    let index = index % DEMO_CITIZENS;
    let mut rng = rng_for(seed, index, Stream::Citizen);
    let (gender, birth_year) = match couple(seed, index) {
        Some(c) if c.husband == index => (Gender::Male, c.husband_birth_year),
        Some(c) => (Gender::Female, c.wife_birth_year),
        None => {
            let gender = if rng.gen_bool(0.505) {
                Gender::Male
            } else {
                Gender::Female
            };
            let (from, to) = weighted(&mut rng, BIRTH_COHORTS).unwrap_or((1975, 1994));
            (gender, rng.gen_range(from..=to))
        }
    };
    let last_day = (new_year(birth_year + 1) - Duration::days(1)).min(REFERENCE_DATE);
    let birth_date = date_between(&mut rng, new_year(birth_year), last_day);
    let birth_place = places::pick_any_locality(&mut rng);
    let family = names::pick_family_name(&mut rng);
    let name = names::pick_name(&mut rng, family, gender, birth_year);
    let ethnicity = weighted(&mut rng, ETHNICITIES).unwrap_or("Kinh");
    let national_id = national_id_of(birth_place.province.code, gender, birth_year, index);
    Citizen {
        index,
        national_id,
        full_name: name.full(),
        name,
        gender,
        birth_date,
        birth_place,
        ethnicity,
    }
}

/// Province code + gender/century digit + 2-digit birth year + 6-digit serial.
fn national_id_of(province_code: &str, gender: Gender, birth_year: i32, serial: u32) -> String {
    let century = if birth_year >= 2000 { 2 } else { 0 };
    let digit = century
        + match gender {
            Gender::Male => 0,
            Gender::Female => 1,
        };
    format!("{province_code}{digit}{:02}{:06}", birth_year.rem_euclid(100), serial)
}

/// The 12-digit national ID of citizen `index` (wrapping like [`citizen`]).
pub fn citizen_national_id(seed: u64, index: u32) -> String {
    citizen(seed, index).national_id
}

/// The index of the citizen holding `national_id`, if it is one of the generated citizens.
pub fn citizen_index(seed: u64, national_id: &str) -> Option<u32> {
    if national_id.len() != 12 || !national_id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let index: u32 = national_id[6..].parse().ok()?;
    if index >= DEMO_CITIZENS {
        return None;
    }
    (citizen(seed, index).national_id == national_id).then_some(index)
}

/// The day `citizen` died, if the citizen is deceased.
pub(crate) fn death_date(seed: u64, citizen: &Citizen) -> Option<Date> {
    let mut rng = rng_for(seed, citizen.index, Stream::Death);
    let age_at_reference = REFERENCE_DATE.year() - citizen.birth_date.year();
    let probability = match age_at_reference {
        a if a >= 80 => 0.45,
        a if a >= 65 => 0.18,
        a if a >= 40 => 0.05,
        _ => 0.01,
    };
    if !rng.gen_bool(probability) {
        return None;
    }
    // Nobody dies before the events already on record about them.
    let mut earliest = citizen.birth_date + Duration::days(1);
    if let Some(c) = couple(seed, citizen.index) {
        earliest = earliest.max(c.date + Duration::days(1));
    }
    let from = earliest.max(add_years(citizen.birth_date, age_at_reference / 2));
    Some(date_between(&mut rng, from.min(REFERENCE_DATE), REFERENCE_DATE))
}

/// The citizen a lookup is about, after checking the query.
///
/// The query is `{national_id, birth_date?}`; when a birth date is given it must
/// match too, as a register would not disclose a record on a mistyped ID.
pub(crate) fn subject(seed: u64, query: &Value) -> Result<Citizen, FetchError> {
    let object = query
        .as_object()
        .ok_or_else(|| FetchError::InvalidQuery("query must be a JSON object".to_owned()))?;
    if let Some(unknown) = object.keys().find(|k| *k != "national_id" && *k != "birth_date") {
        return Err(FetchError::InvalidQuery(format!(
            "query field {unknown:?} is not understood by this register; use national_id and birth_date"
        )));
    }
    let national_id = match object.get("national_id") {
        Some(Value::String(id)) => id,
        Some(_) => {
            return Err(FetchError::InvalidQuery(
                "query field national_id must be a string of 12 digits".to_owned(),
            ));
        }
        None => {
            return Err(FetchError::InvalidQuery(
                "query field national_id is required".to_owned(),
            ));
        }
    };
    if national_id.len() != 12 || !national_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(FetchError::InvalidQuery(
            "query field national_id must be a string of 12 digits".to_owned(),
        ));
    }
    let birth_date = match object.get("birth_date") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_iso_date(s).ok_or_else(|| {
            FetchError::InvalidQuery("query field birth_date must be a date like 1990-01-31".to_owned())
        })?),
        Some(_) => {
            return Err(FetchError::InvalidQuery(
                "query field birth_date must be a date like 1990-01-31".to_owned(),
            ));
        }
    };
    let index = citizen_index(seed, national_id)
        .ok_or_else(|| FetchError::NotFound("no citizen with this national id is registered here".to_owned()))?;
    let citizen = citizen(seed, index);
    if birth_date.is_some_and(|d| d != citizen.birth_date) {
        return Err(FetchError::NotFound(
            "no citizen with this national id and birth date is registered here".to_owned(),
        ));
    }
    Ok(citizen)
}

/// `{ward, district, province}` of a locality, as records carry places.
pub(crate) fn place_json(locality: &Locality) -> Value {
    serde_json::json!({
        "ward": locality.ward,
        "district": locality.district,
        "province": locality.province.full_name(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn iso_dates_round_trip_and_reject_impossible_days() {
        let day = date!(2004 - 02 - 29);
        assert_eq!(iso_date(day), "2004-02-29");
        assert_eq!(parse_iso_date("2004-02-29"), Some(day));
        for bad in [
            "2005-02-29",
            "2004-2-29",
            "29/02/2004",
            "2004-02-29-01",
            "",
            "abcd-ef-gh",
        ] {
            assert_eq!(parse_iso_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn calendar_arithmetic_stays_valid() {
        assert_eq!(add_years(date!(2004 - 02 - 29), 18), date!(2022 - 02 - 28));
        assert_eq!(add_years(date!(2000 - 07 - 15), 18), date!(2018 - 07 - 15));
        assert_eq!(add_months(date!(2020 - 11 - 30), 3), date!(2021 - 02 - 28));
        assert_eq!(add_months(date!(2020 - 01 - 10), 24), date!(2022 - 01 - 10));
    }

    #[test]
    fn every_province_has_localities_with_real_codes() {
        let mut codes = std::collections::HashSet::new();
        for province in places::PROVINCES {
            assert!(!province.localities.is_empty(), "{}", province.name);
            assert_eq!(province.code.len(), 3);
            assert!(codes.insert(province.code), "duplicate {}", province.code);
        }
        assert_eq!(places::province_by_code("001").map(|p| p.name), Some("Hà Nội"));
        assert_eq!(
            places::province_by_code("079").map(|p| p.full_name()),
            Some("Thành phố Hồ Chí Minh".to_owned())
        );
        assert_eq!(
            places::province_by_code("046").map(|p| p.full_name()),
            Some("Tỉnh Thừa Thiên Huế".to_owned())
        );
    }
}
