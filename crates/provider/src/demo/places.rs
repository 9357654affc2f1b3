//! Real provinces (pre-2025 boundaries, official two-level codes used in citizen
//! identity numbers) with a few of their real wards and communes.

use rand::Rng;
use rand::rngs::SmallRng;

/// A province-level unit: a province (`tỉnh`) or a centrally governed city.
#[derive(Debug)]
pub struct Province {
    /// Official 3-digit code, the first three digits of a citizen identity number.
    pub code: &'static str,
    /// Name without the administrative prefix, e.g. `Hà Nội`.
    pub name: &'static str,
    /// Centrally governed city (`Thành phố`) rather than a province (`Tỉnh`).
    pub is_city: bool,
    /// Relative population, used to weight where citizens are registered.
    pub weight: u32,
    /// `(district, ward or commune)` pairs of real local units.
    pub localities: &'static [(&'static str, &'static str)],
}

impl Province {
    /// Full official name, e.g. `Thành phố Hà Nội`, `Tỉnh Nghệ An`.
    pub fn full_name(&self) -> String {
        if self.is_city {
            format!("Thành phố {}", self.name)
        } else {
            format!("Tỉnh {}", self.name)
        }
    }
}

/// One commune-level unit, where civil status events are registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Locality {
    /// The province or centrally governed city.
    pub province: &'static Province,
    /// District-level unit, e.g. `Quận Hoàn Kiếm`.
    pub district: &'static str,
    /// Commune-level unit, e.g. `Phường Hàng Bạc`.
    pub ward: &'static str,
}

impl PartialEq for Province {
    fn eq(&self, other: &Self) -> bool {
        self.code == other.code
    }
}
impl Eq for Province {}

impl Locality {
    /// Address line: `Phường Hàng Bạc, Quận Hoàn Kiếm, Thành phố Hà Nội`.
    pub fn address(&self) -> String {
        format!("{}, {}, {}", self.ward, self.district, self.province.full_name())
    }

    /// The commune-level People's Committee that keeps the civil status books,
    /// e.g. `UBND phường Hàng Bạc`.
    pub fn registration_office(&self) -> String {
        format!("UBND {}", lower_first(self.ward))
    }

    /// The district-level people's court, e.g. `Tòa án nhân dân quận Hoàn Kiếm`.
    pub fn district_court(&self) -> String {
        format!("Tòa án nhân dân {}", lower_first(self.district))
    }
}

/// Lowercases the administrative prefix (`Phường` → `phường`) as Vietnamese
/// official names are written after a title.
fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Provinces and cities the synthetic citizens are registered in, weighted by
/// population (2019 census, in ten-thousands).
pub static PROVINCES: &[Province] = &[
    Province {
        code: "001",
        name: "Hà Nội",
        is_city: true,
        weight: 805,
        localities: &[
            ("Quận Hoàn Kiếm", "Phường Hàng Bạc"),
            ("Quận Hoàn Kiếm", "Phường Tràng Tiền"),
            ("Quận Hoàn Kiếm", "Phường Hàng Trống"),
            ("Quận Ba Đình", "Phường Phúc Xá"),
            ("Quận Ba Đình", "Phường Trúc Bạch"),
            ("Quận Ba Đình", "Phường Kim Mã"),
            ("Quận Cầu Giấy", "Phường Dịch Vọng"),
            ("Quận Cầu Giấy", "Phường Nghĩa Đô"),
            ("Quận Cầu Giấy", "Phường Yên Hòa"),
            ("Quận Đống Đa", "Phường Láng Hạ"),
            ("Quận Đống Đa", "Phường Văn Miếu"),
            ("Huyện Đông Anh", "Xã Cổ Loa"),
            ("Huyện Gia Lâm", "Xã Bát Tràng"),
        ],
    },
    Province {
        code: "079",
        name: "Hồ Chí Minh",
        is_city: true,
        weight: 899,
        localities: &[
            ("Quận 1", "Phường Bến Nghé"),
            ("Quận 1", "Phường Bến Thành"),
            ("Quận 1", "Phường Đa Kao"),
            ("Quận 3", "Phường Võ Thị Sáu"),
            ("Quận 5", "Phường 11"),
            ("Quận Phú Nhuận", "Phường 7"),
            ("Thành phố Thủ Đức", "Phường Thảo Điền"),
            ("Thành phố Thủ Đức", "Phường Linh Trung"),
            ("Huyện Củ Chi", "Xã Phú Mỹ Hưng"),
            ("Huyện Cần Giờ", "Xã Long Hòa"),
        ],
    },
    Province {
        code: "031",
        name: "Hải Phòng",
        is_city: true,
        weight: 203,
        localities: &[
            ("Quận Hồng Bàng", "Phường Hoàng Văn Thụ"),
            ("Quận Hồng Bàng", "Phường Minh Khai"),
            ("Quận Lê Chân", "Phường Dư Hàng"),
            ("Quận Ngô Quyền", "Phường Máy Tơ"),
            ("Huyện Cát Hải", "Thị trấn Cát Bà"),
        ],
    },
    Province {
        code: "048",
        name: "Đà Nẵng",
        is_city: true,
        weight: 113,
        localities: &[
            ("Quận Hải Châu", "Phường Thạch Thang"),
            ("Quận Hải Châu", "Phường Hải Châu I"),
            ("Quận Hải Châu", "Phường Phước Ninh"),
            ("Quận Sơn Trà", "Phường An Hải Bắc"),
            ("Quận Sơn Trà", "Phường Mân Thái"),
            ("Quận Ngũ Hành Sơn", "Phường Mỹ An"),
            ("Quận Ngũ Hành Sơn", "Phường Hòa Hải"),
            ("Huyện Hòa Vang", "Xã Hòa Bắc"),
        ],
    },
    Province {
        code: "092",
        name: "Cần Thơ",
        is_city: true,
        weight: 124,
        localities: &[
            ("Quận Ninh Kiều", "Phường Tân An"),
            ("Quận Ninh Kiều", "Phường An Hòa"),
            ("Quận Ninh Kiều", "Phường Xuân Khánh"),
            ("Quận Cái Răng", "Phường Lê Bình"),
            ("Huyện Phong Điền", "Xã Mỹ Khánh"),
        ],
    },
    Province {
        code: "026",
        name: "Vĩnh Phúc",
        is_city: false,
        weight: 115,
        localities: &[
            ("Thành phố Vĩnh Yên", "Phường Ngô Quyền"),
            ("Thành phố Vĩnh Yên", "Phường Liên Bảo"),
            ("Thành phố Phúc Yên", "Phường Hùng Vương"),
            ("Huyện Tam Đảo", "Thị trấn Tam Đảo"),
        ],
    },
    Province {
        code: "038",
        name: "Thanh Hóa",
        is_city: false,
        weight: 364,
        localities: &[
            ("Thành phố Thanh Hóa", "Phường Điện Biên"),
            ("Thành phố Thanh Hóa", "Phường Lam Sơn"),
            ("Thành phố Thanh Hóa", "Phường Ba Đình"),
            ("Thành phố Sầm Sơn", "Phường Trường Sơn"),
            ("Thị xã Bỉm Sơn", "Phường Ba Đình"),
        ],
    },
    Province {
        code: "040",
        name: "Nghệ An",
        is_city: false,
        weight: 333,
        localities: &[
            ("Thành phố Vinh", "Phường Hưng Bình"),
            ("Thành phố Vinh", "Phường Lê Lợi"),
            ("Thành phố Vinh", "Phường Quang Trung"),
            ("Thị xã Cửa Lò", "Phường Nghi Thủy"),
            ("Huyện Nam Đàn", "Xã Kim Liên"),
        ],
    },
    Province {
        code: "046",
        name: "Thừa Thiên Huế",
        is_city: false,
        weight: 113,
        localities: &[
            ("Thành phố Huế", "Phường Phú Hội"),
            ("Thành phố Huế", "Phường Vĩnh Ninh"),
            ("Thành phố Huế", "Phường Thuận Thành"),
            ("Thị xã Hương Thủy", "Phường Phú Bài"),
        ],
    },
    Province {
        code: "075",
        name: "Đồng Nai",
        is_city: false,
        weight: 310,
        localities: &[
            ("Thành phố Biên Hòa", "Phường Quyết Thắng"),
            ("Thành phố Biên Hòa", "Phường Trung Dũng"),
            ("Thành phố Biên Hòa", "Phường Tân Phong"),
            ("Thành phố Long Khánh", "Phường Xuân An"),
        ],
    },
    Province {
        code: "074",
        name: "Bình Dương",
        is_city: false,
        weight: 243,
        localities: &[
            ("Thành phố Thủ Dầu Một", "Phường Phú Cường"),
            ("Thành phố Thủ Dầu Một", "Phường Hiệp Thành"),
            ("Thành phố Dĩ An", "Phường Dĩ An"),
        ],
    },
    Province {
        code: "022",
        name: "Quảng Ninh",
        is_city: false,
        weight: 132,
        localities: &[
            ("Thành phố Hạ Long", "Phường Hồng Gai"),
            ("Thành phố Hạ Long", "Phường Bãi Cháy"),
            ("Thành phố Móng Cái", "Phường Trần Phú"),
        ],
    },
    Province {
        code: "027",
        name: "Bắc Ninh",
        is_city: false,
        weight: 137,
        localities: &[
            ("Thành phố Bắc Ninh", "Phường Suối Hoa"),
            ("Thành phố Bắc Ninh", "Phường Tiền An"),
            ("Thành phố Từ Sơn", "Phường Đông Ngàn"),
        ],
    },
    Province {
        code: "030",
        name: "Hải Dương",
        is_city: false,
        weight: 189,
        localities: &[
            ("Thành phố Hải Dương", "Phường Trần Hưng Đạo"),
            ("Thành phố Hải Dương", "Phường Nguyễn Trãi"),
        ],
    },
    Province {
        code: "034",
        name: "Thái Bình",
        is_city: false,
        weight: 186,
        localities: &[
            ("Thành phố Thái Bình", "Phường Lê Hồng Phong"),
            ("Thành phố Thái Bình", "Phường Đề Thám"),
        ],
    },
    Province {
        code: "036",
        name: "Nam Định",
        is_city: false,
        weight: 178,
        localities: &[
            ("Thành phố Nam Định", "Phường Vị Xuyên"),
            ("Thành phố Nam Định", "Phường Trần Hưng Đạo"),
        ],
    },
    Province {
        code: "052",
        name: "Bình Định",
        is_city: false,
        weight: 149,
        localities: &[
            ("Thành phố Quy Nhơn", "Phường Lê Lợi"),
            ("Thành phố Quy Nhơn", "Phường Trần Phú"),
        ],
    },
    Province {
        code: "056",
        name: "Khánh Hòa",
        is_city: false,
        weight: 123,
        localities: &[
            ("Thành phố Nha Trang", "Phường Lộc Thọ"),
            ("Thành phố Nha Trang", "Phường Vĩnh Hải"),
        ],
    },
    Province {
        code: "066",
        name: "Đắk Lắk",
        is_city: false,
        weight: 187,
        localities: &[
            ("Thành phố Buôn Ma Thuột", "Phường Tân Lợi"),
            ("Thành phố Buôn Ma Thuột", "Phường Thắng Lợi"),
        ],
    },
    Province {
        code: "068",
        name: "Lâm Đồng",
        is_city: false,
        weight: 130,
        localities: &[("Thành phố Đà Lạt", "Phường 1"), ("Thành phố Đà Lạt", "Phường 10")],
    },
    Province {
        code: "089",
        name: "An Giang",
        is_city: false,
        weight: 191,
        localities: &[
            ("Thành phố Long Xuyên", "Phường Mỹ Bình"),
            ("Thành phố Châu Đốc", "Phường Châu Phú A"),
        ],
    },
    Province {
        code: "096",
        name: "Cà Mau",
        is_city: false,
        weight: 119,
        localities: &[("Thành phố Cà Mau", "Phường 5"), ("Thành phố Cà Mau", "Phường 7")],
    },
];

/// Total of the province weights, the range a weighted draw is made in.
fn total_weight() -> u32 {
    PROVINCES.iter().map(|p| p.weight).sum()
}

/// Draws a province, weighted by population.
pub fn pick_province(rng: &mut SmallRng) -> &'static Province {
    let mut ticket = rng.gen_range(0..total_weight());
    for province in PROVINCES {
        if ticket < province.weight {
            return province;
        }
        ticket -= province.weight;
    }
    // Unreachable since the ticket is below the total; the capital is a sane fallback.
    &PROVINCES[0]
}

/// Draws a commune-level unit of the given province.
pub fn pick_locality(rng: &mut SmallRng, province: &'static Province) -> Locality {
    let (district, ward) = match province.localities.len() {
        0 => ("", ""),
        n => province.localities[rng.gen_range(0..n)],
    };
    Locality {
        province,
        district,
        ward,
    }
}

/// Draws a province and one of its communes.
pub fn pick_any_locality(rng: &mut SmallRng) -> Locality {
    let province = pick_province(rng);
    pick_locality(rng, province)
}

/// Looks a province up by its 3-digit code.
pub fn province_by_code(code: &str) -> Option<&'static Province> {
    PROVINCES.iter().find(|p| p.code == code)
}
