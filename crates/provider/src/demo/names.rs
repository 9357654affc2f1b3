//! Vietnamese personal names: family names with their approximate national
//! frequencies, and gendered middle and given names.

use rand::Rng;
use rand::rngs::SmallRng;

use super::Gender;

/// Family names with their share of the population in per mille.
static FAMILY_NAMES: &[(&str, u32)] = &[
    ("Nguyễn", 380),
    ("Trần", 110),
    ("Lê", 95),
    ("Phạm", 70),
    ("Hoàng", 31),
    ("Huỳnh", 20),
    ("Phan", 45),
    ("Vũ", 20),
    ("Võ", 19),
    ("Đặng", 21),
    ("Bùi", 20),
    ("Đỗ", 14),
    ("Hồ", 13),
    ("Ngô", 13),
    ("Dương", 10),
    ("Lý", 5),
    ("Đinh", 8),
    ("Trương", 8),
    ("Đào", 7),
    ("Cao", 5),
    ("Mai", 5),
    ("Lương", 4),
    ("Trịnh", 4),
    ("Tô", 2),
];

static MALE_MIDDLE: &[&str] = &[
    "Văn", "Hữu", "Đức", "Minh", "Quốc", "Thanh", "Xuân", "Công", "Đình", "Quang", "Tiến", "Gia", "Trung", "Anh",
];

static FEMALE_MIDDLE: &[&str] = &[
    "Thị", "Ngọc", "Thanh", "Minh", "Thu", "Xuân", "Bảo", "Phương", "Kim", "Hồng", "Diệu", "Khánh",
];

static MALE_GIVEN: &[&str] = &[
    "An", "Bình", "Dũng", "Hải", "Hùng", "Long", "Nam", "Quân", "Tuấn", "Cường", "Đạt", "Hiếu", "Hoàng", "Huy",
    "Khang", "Khoa", "Kiên", "Minh", "Phúc", "Quang", "Sơn", "Thắng", "Thành", "Trung", "Tùng", "Việt", "Vinh", "Đức",
    "Tâm", "Lâm",
];

static FEMALE_GIVEN: &[&str] = &[
    "An", "Châu", "Hà", "Hạnh", "Hoa", "Hương", "Lan", "Linh", "Mai", "Phương", "Thảo", "Trang", "Yến", "Anh", "Chi",
    "Dung", "Giang", "Hằng", "Hiền", "Huyền", "Loan", "Ngân", "Nhung", "Oanh", "Quyên", "Thu", "Thủy", "Trâm", "Uyên",
    "Vy",
];

/// A person's name in Vietnamese order: family, middle, given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersonName {
    /// Family name (`họ`), e.g. `Nguyễn`.
    pub family: &'static str,
    /// Middle name (`tên đệm`), e.g. `Thị`.
    pub middle: &'static str,
    /// Given name (`tên`), e.g. `Lan`.
    pub given: &'static str,
}

impl PersonName {
    /// `Nguyễn Thị Lan`.
    pub fn full(&self) -> String {
        format!("{} {} {}", self.family, self.middle, self.given)
    }
}

/// Draws a family name with its national frequency.
pub fn pick_family_name(rng: &mut SmallRng) -> &'static str {
    let total: u32 = FAMILY_NAMES.iter().map(|(_, w)| w).sum();
    let mut ticket = rng.gen_range(0..total);
    for (name, weight) in FAMILY_NAMES {
        if ticket < *weight {
            return name;
        }
        ticket -= weight;
    }
    FAMILY_NAMES[0].0
}

/// Draws middle and given names for someone of `gender` born in `birth_year`;
/// `Văn`/`Thị` were the usual middle names before the 1980s.
pub fn pick_name(rng: &mut SmallRng, family: &'static str, gender: Gender, birth_year: i32) -> PersonName {
    let (middles, givens) = match gender {
        Gender::Male => (MALE_MIDDLE, MALE_GIVEN),
        Gender::Female => (FEMALE_MIDDLE, FEMALE_GIVEN),
    };
    let traditional = if birth_year < 1980 { 0.6 } else { 0.25 };
    let middle = if rng.gen_bool(traditional) {
        middles[0]
    } else {
        middles[rng.gen_range(0..middles.len())]
    };
    let mut given = givens[rng.gen_range(0..givens.len())];
    if given == middle {
        // `Minh Minh` is not a name; take the neighbour in the list instead.
        let at = givens.iter().position(|g| *g == given).unwrap_or(0);
        given = givens[(at + 1) % givens.len()];
    }
    PersonName { family, middle, given }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn nguyen_is_the_most_common_family_name_but_not_the_only_one() {
        let mut rng = SmallRng::seed_from_u64(7);
        let draws: Vec<&str> = (0..10_000).map(|_| pick_family_name(&mut rng)).collect();
        let nguyen = draws.iter().filter(|n| **n == "Nguyễn").count();
        let tran = draws.iter().filter(|n| **n == "Trần").count();
        assert!((3_300..4_300).contains(&nguyen), "Nguyễn drawn {nguyen} times");
        assert!(tran > 700 && tran < nguyen, "Trần drawn {tran} times");
        for (name, _) in FAMILY_NAMES {
            assert!(draws.contains(name), "{name} never drawn");
        }
    }

    #[test]
    fn middle_and_given_name_never_repeat() {
        let mut rng = SmallRng::seed_from_u64(9);
        for i in 0..5_000 {
            let gender = if i % 2 == 0 { Gender::Male } else { Gender::Female };
            let name = pick_name(&mut rng, "Lê", gender, 1950 + (i % 70));
            assert_ne!(name.middle, name.given);
        }
    }
}
