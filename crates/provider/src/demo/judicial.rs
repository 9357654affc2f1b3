//! The judicial records register: criminal record extracts (`Phiếu lý lịch tư pháp`).

use rand::Rng;
use rand::rngs::SmallRng;
use serde_json::{Value, json};
use time::{Date, Duration};

use super::places::pick_locality;
use super::{
    CRIMINAL_RECORD_EXTRACT, Gender, REFERENCE_DATE, Stream, add_months, add_years, citizen, date_between, death_date,
    iso_date, rng_for, subject,
};
use crate::kit::{FetchContext, FetchError, RecordSource};

/// Criminal record extracts of the synthetic citizens of one seed.
#[derive(Clone, Debug)]
pub struct JudicialRegister {
    seed: u64,
}

/// The Penal Code 2015 (Law 100/2015/QH13, amended 2017) took effect on this day;
/// the demo only holds judgments under it.
const PENAL_CODE_2015_IN_FORCE: Date = time::macros::date!(2018 - 01 - 01);

/// Penalties a court may impose for an offence, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Penalty {
    Warning,
    Fine,
    NonCustodialReform,
    Imprisonment,
    SuspendedImprisonment,
}

impl Penalty {
    fn code(self) -> &'static str {
        match self {
            Penalty::Warning => "warning",
            Penalty::Fine => "fine",
            Penalty::NonCustodialReform => "non_custodial_reform",
            Penalty::Imprisonment => "imprisonment",
            Penalty::SuspendedImprisonment => "suspended_imprisonment",
        }
    }
}

/// One offence of the Penal Code 2015, clause 1, with the penalties it allows.
struct Offence {
    article: u32,
    title: &'static str,
    penalties: &'static [Penalty],
    /// Prison term range of clause 1, in months.
    months: (u32, u32),
    /// Fine range of clause 1, in millions of đồng.
    fine_millions: (u32, u32),
    /// Relative frequency among convictions.
    weight: u32,
}

use Penalty::{Fine, Imprisonment, NonCustodialReform, SuspendedImprisonment, Warning};

static OFFENCES: &[Offence] = &[
    Offence {
        article: 173,
        title: "Tội trộm cắp tài sản",
        penalties: &[NonCustodialReform, Imprisonment, SuspendedImprisonment],
        months: (6, 36),
        fine_millions: (0, 0),
        weight: 30,
    },
    Offence {
        article: 174,
        title: "Tội lừa đảo chiếm đoạt tài sản",
        penalties: &[NonCustodialReform, Imprisonment, SuspendedImprisonment],
        months: (6, 36),
        fine_millions: (0, 0),
        weight: 12,
    },
    Offence {
        article: 168,
        title: "Tội cướp tài sản",
        penalties: &[Imprisonment],
        months: (36, 120),
        fine_millions: (0, 0),
        weight: 3,
    },
    Offence {
        article: 171,
        title: "Tội cướp giật tài sản",
        penalties: &[Imprisonment],
        months: (12, 60),
        fine_millions: (0, 0),
        weight: 4,
    },
    Offence {
        article: 134,
        title: "Tội cố ý gây thương tích hoặc gây tổn hại cho sức khỏe của người khác",
        penalties: &[NonCustodialReform, Imprisonment, SuspendedImprisonment],
        months: (6, 36),
        fine_millions: (0, 0),
        weight: 14,
    },
    Offence {
        article: 260,
        title: "Tội vi phạm quy định về tham gia giao thông đường bộ",
        penalties: &[Fine, NonCustodialReform, Imprisonment, SuspendedImprisonment],
        months: (12, 60),
        fine_millions: (30, 100),
        weight: 8,
    },
    Offence {
        article: 249,
        title: "Tội tàng trữ trái phép chất ma túy",
        penalties: &[Imprisonment],
        months: (12, 60),
        fine_millions: (0, 0),
        weight: 10,
    },
    Offence {
        article: 251,
        title: "Tội mua bán trái phép chất ma túy",
        penalties: &[Imprisonment],
        months: (24, 84),
        fine_millions: (0, 0),
        weight: 5,
    },
    Offence {
        article: 321,
        title: "Tội đánh bạc",
        penalties: &[Fine, NonCustodialReform, Imprisonment, SuspendedImprisonment],
        months: (6, 36),
        fine_millions: (20, 100),
        weight: 10,
    },
    Offence {
        article: 318,
        title: "Tội gây rối trật tự công cộng",
        penalties: &[Warning, Fine, NonCustodialReform, Imprisonment],
        months: (3, 24),
        fine_millions: (5, 50),
        weight: 4,
    },
    Offence {
        article: 175,
        title: "Tội lạm dụng tín nhiệm chiếm đoạt tài sản",
        penalties: &[NonCustodialReform, Imprisonment, SuspendedImprisonment],
        months: (6, 36),
        fine_millions: (0, 0),
        weight: 3,
    },
    Offence {
        article: 178,
        title: "Tội hủy hoại hoặc cố ý làm hư hỏng tài sản",
        penalties: &[Fine, NonCustodialReform, Imprisonment],
        months: (6, 36),
        fine_millions: (10, 50),
        weight: 2,
    },
    Offence {
        article: 341,
        title: "Tội làm giả con dấu, tài liệu của cơ quan, tổ chức; tội sử dụng con dấu hoặc tài liệu giả của cơ quan, tổ chức",
        penalties: &[Fine, NonCustodialReform, Imprisonment],
        months: (6, 24),
        fine_millions: (30, 100),
        weight: 2,
    },
    Offence {
        article: 353,
        title: "Tội tham ô tài sản",
        penalties: &[Imprisonment],
        months: (24, 84),
        fine_millions: (0, 0),
        weight: 1,
    },
    Offence {
        article: 354,
        title: "Tội nhận hối lộ",
        penalties: &[Imprisonment],
        months: (24, 84),
        fine_millions: (0, 0),
        weight: 1,
    },
];

fn pick_offence(rng: &mut SmallRng) -> &'static Offence {
    let total: u32 = OFFENCES.iter().map(|o| o.weight).sum();
    let mut ticket = rng.gen_range(0..total);
    for offence in OFFENCES {
        if ticket < offence.weight {
            return offence;
        }
        ticket -= offence.weight;
    }
    &OFFENCES[0]
}

/// `02 năm 06 tháng`, how Vietnamese judgments state terms.
fn term_text(months: u32) -> String {
    match (months / 12, months % 12) {
        (0, m) => format!("{m:02} tháng"),
        (y, 0) => format!("{y:02} năm"),
        (y, m) => format!("{y:02} năm {m:02} tháng"),
    }
}

/// `20.000.000 đồng`.
fn vnd_text(amount: u64) -> String {
    // Thousands groups, most significant last, then joined with dots.
    let mut groups = Vec::new();
    let mut rest = amount;
    while rest >= 1000 {
        groups.push(format!("{:03}", rest % 1000));
        rest /= 1000;
    }
    groups.push(rest.to_string());
    groups.reverse();
    format!("{} đồng", groups.join("."))
}

/// One judgment and its sentence; expungement is decided over all of a
/// person's convictions (see [`expunge`]).
struct Conviction {
    json: Value,
    judgment: Date,
    served: Date,
    /// When the conviction would be expunged if no new offence followed.
    eligible: Date,
}

impl Conviction {
    fn into_json(self, expunged_on: Date) -> Value {
        let mut json = self.json;
        if let Some(object) = json.as_object_mut() {
            if self.served <= REFERENCE_DATE {
                object.insert("sentence_completed_on".into(), json!(iso_date(self.served)));
            }
            let expunged = expunged_on <= REFERENCE_DATE;
            object.insert("expunged".into(), json!(expunged));
            if expunged {
                object.insert("expunged_on".into(), json!(iso_date(expunged_on)));
            }
        }
        json
    }
}

fn conviction(rng: &mut SmallRng, judgment: Date, court: String) -> Conviction {
    let offence = pick_offence(rng);
    let penalty = offence.penalties[rng.gen_range(0..offence.penalties.len())];
    let months = rng.gen_range(offence.months.0..=offence.months.1);
    let mut sentence = json!({ "penalty": penalty.code() });
    // When the sentence is served, and how long the clean period before
    // automatic expungement is (Penal Code 2015, article 70).
    let (served, clean_years, description) = match penalty {
        Penalty::Warning => (judgment, 1, "Cảnh cáo".to_owned()),
        Penalty::Fine => {
            let fine = u64::from(rng.gen_range(offence.fine_millions.0..=offence.fine_millions.1)) * 1_000_000;
            sentence["fine_vnd"] = json!(fine);
            (add_months(judgment, 3), 1, format!("Phạt tiền {}", vnd_text(fine)))
        }
        Penalty::NonCustodialReform => {
            let months = months.min(36);
            sentence["term_months"] = json!(months);
            (
                add_months(judgment, months),
                1,
                format!("{} cải tạo không giam giữ", term_text(months)),
            )
        }
        Penalty::Imprisonment => {
            sentence["term_months"] = json!(months);
            (
                add_months(judgment, months),
                if months <= 60 { 2 } else { 3 },
                format!("{} tù", term_text(months)),
            )
        }
        Penalty::SuspendedImprisonment => {
            let months = months.min(36);
            let probation = (months * 2).clamp(12, 60);
            sentence["term_months"] = json!(months);
            sentence["probation_months"] = json!(probation);
            (
                add_months(judgment, probation),
                1,
                format!(
                    "{} tù cho hưởng án treo, thời gian thử thách {}",
                    term_text(months),
                    term_text(probation)
                ),
            )
        }
    };
    sentence["description"] = json!(description);
    Conviction {
        json: json!({
            "case_number": format!("{}/{}/HS-ST", rng.gen_range(1..=450), judgment.year()),
            "court": court,
            "judgment_date": iso_date(judgment),
            "offence": {
                "code": "Bộ luật Hình sự 2015",
                "article": offence.article,
                "clause": 1,
                "title": offence.title,
            },
            "sentence": sentence,
        }),
        judgment,
        served,
        eligible: add_years(served, clean_years),
    }
}

/// Decides expungement: a new conviction before an old one is expunged restarts
/// the clean period, so all convictions of such a chain are expunged together,
/// once the last of them is (Penal Code 2015, article 70(4)).
fn expunge(convictions: Vec<Conviction>) -> Vec<Value> {
    let mut chains: Vec<Vec<Conviction>> = Vec::new();
    for conviction in convictions {
        let joins_last_chain = chains.last().is_some_and(|chain| {
            chain
                .iter()
                .map(|c| c.eligible)
                .max()
                .is_some_and(|eligible| conviction.judgment < eligible)
        });
        match chains.last_mut() {
            Some(chain) if joins_last_chain => chain.push(conviction),
            _ => chains.push(vec![conviction]),
        }
    }
    chains
        .into_iter()
        .flat_map(|chain| {
            let expunged_on = chain.iter().map(|c| c.eligible).max().unwrap_or(REFERENCE_DATE);
            chain.into_iter().map(move |c| c.into_json(expunged_on))
        })
        .collect()
}

impl JudicialRegister {
    /// The register of the world generated from `seed`.
    pub fn new(seed: u64) -> Self {
        JudicialRegister { seed }
    }

    /// The criminal record extract of citizen `index`; every citizen has one,
    /// most saying there is no conviction.
    pub fn criminal_record_extract(&self, index: u32) -> Value {
        let c = citizen(self.seed, index);
        let mut rng = rng_for(self.seed, c.index, Stream::Judicial);
        let probability = match c.gender {
            Gender::Male => 0.05,
            Gender::Female => 0.012,
        };
        let offender = rng.gen_bool(probability);
        // Criminal liability for these offences starts at 16; the demo only
        // records convictions of adults, and none after death.
        let first = add_years(c.birth_date, 18).max(PENAL_CODE_2015_IN_FORCE);
        let last = death_date(self.seed, &c)
            .map_or(REFERENCE_DATE, |d| d - Duration::days(1))
            .min(REFERENCE_DATE - Duration::days(30));
        let mut convictions = Vec::new();
        if offender && first < last {
            let count = if rng.gen_bool(0.2) { 2 } else { 1 };
            let mut judgments: Vec<Date> = (0..count).map(|_| date_between(&mut rng, first, last)).collect();
            judgments.sort();
            judgments.dedup();
            for judgment in judgments {
                let locality = if rng.gen_bool(0.6) {
                    c.birth_place
                } else {
                    pick_locality(&mut rng, c.birth_place.province)
                };
                let court = format!("{}, {}", locality.district_court(), locality.province.full_name());
                convictions.push(conviction(&mut rng, judgment, court));
            }
        }
        let convictions = expunge(convictions);
        let has_record = convictions.iter().any(|c| c["expunged"] == Value::Bool(false));
        let number = rng.gen_range(1..=99_999);
        json!({
            "national_id": c.national_id,
            "full_name": c.full_name,
            "gender": c.gender.as_str(),
            "birth_date": iso_date(c.birth_date),
            "place_of_birth": c.birth_place.address(),
            "nationality": "Việt Nam",
            "extract_number": format!("{number:05}/{}/LLTP", REFERENCE_DATE.year()),
            "issued_by": format!("Sở Tư pháp {}", c.birth_place.province.full_name()),
            "issue_date": iso_date(REFERENCE_DATE),
            "has_criminal_record": has_record,
            "summary": if has_record { "Có án tích" } else { "Không có án tích" },
            "convictions": convictions,
        })
    }
}

#[async_trait::async_trait]
impl RecordSource for JudicialRegister {
    fn record_types(&self) -> Vec<String> {
        vec![CRIMINAL_RECORD_EXTRACT.to_owned()]
    }

    async fn fetch(&self, ctx: FetchContext) -> Result<Value, FetchError> {
        let c = subject(self.seed, &ctx.query)?;
        match ctx.record_type.as_str() {
            CRIMINAL_RECORD_EXTRACT => Ok(self.criminal_record_extract(c.index)),
            other => Err(FetchError::NotServed(format!("record type {other} is not served here"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn judged(judgment: Date, served: Date, eligible: Date) -> Conviction {
        Conviction {
            json: json!({ "judgment_date": iso_date(judgment) }),
            judgment,
            served,
            eligible,
        }
    }

    #[test]
    fn reoffending_before_expungement_restarts_the_clean_period_for_both() {
        let first = judged(date!(2019 - 01 - 10), date!(2020 - 01 - 10), date!(2022 - 01 - 10));
        let second = judged(date!(2021 - 06 - 01), date!(2021 - 09 - 01), date!(2026 - 09 - 01));
        let out = expunge(vec![first, second]);
        assert_eq!(out[0]["expunged"], false);
        assert_eq!(out[1]["expunged"], false);
        assert_eq!(out[0]["sentence_completed_on"], "2020-01-10");
    }

    #[test]
    fn an_old_conviction_expunged_before_a_new_one_stays_expunged() {
        let first = judged(date!(2018 - 03 - 01), date!(2018 - 06 - 01), date!(2019 - 06 - 01));
        let second = judged(date!(2022 - 02 - 01), date!(2024 - 02 - 01), date!(2026 - 02 - 01));
        let out = expunge(vec![first, second]);
        assert_eq!(out[0]["expunged"], true);
        assert_eq!(out[0]["expunged_on"], "2019-06-01");
        assert_eq!(out[1]["expunged"], false);
        assert!(out[1].get("expunged_on").is_none());
    }

    #[test]
    fn judgments_state_terms_and_amounts_the_vietnamese_way() {
        assert_eq!(term_text(30), "02 năm 06 tháng");
        assert_eq!(term_text(24), "02 năm");
        assert_eq!(term_text(9), "09 tháng");
        assert_eq!(vnd_text(20_000_000), "20.000.000 đồng");
        assert_eq!(vnd_text(5_000_000), "5.000.000 đồng");
        assert_eq!(vnd_text(100_000_000), "100.000.000 đồng");
    }
}
