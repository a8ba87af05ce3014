//! A metric value as a canonical Kubernetes quantity string (`"4"`,
//! `"1500m"`, `"3k"`).
//!
//! apimachinery's `resource.Quantity` (`pkg/api/resource/quantity.go`,
//! `amount.go`, `suffix.go`) writes a decimal value in canonical form: factors
//! of ten move into the exponent, the exponent is then lowered to a multiple
//! of three (the mantissa grows instead) and named by its SI suffix — `m` for
//! 10⁻³, none for 10⁰, `k`, `M`, `G`, `T`, `P`, `E` above. So 1.5 is `1500m`,
//! 1000 is `1k`, 1500 is `1500`, 2.5e6 is `2500k`.
//!
//! Rounding: values are kept to milli-units, and anything finer is rounded
//! **up** to the next milli-unit. Quantity itself rounds up when it has to
//! drop precision ("0.1m will be rounded up to 1m", quantity.go), and for a
//! load metric rounding up never reports less load than there is: 0.0001
//! requests in flight is `1m`, not `0`. The f64 is first written in its
//! shortest round-trip decimal form (what `{:e}` prints), so 1.1 is exactly
//! `1100m`, not `1101m` from the binary fraction 1.100000000000000088.
//!
//! Refused (an error for the caller to report, never a number): NaN and
//! infinities, negative values (no load is negative; a metric that is should
//! not reach an autoscaler unnoticed), and values whose milli-units exceed
//! `i64::MAX` (about 9.2e15): the HPA reads `MilliValue()`, an int64, and
//! would see garbage.

/// Why a value has no quantity.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum QuantityError {
    #[error("{0} is not a finite number")]
    NotFinite(f64),
    #[error("{0} is negative")]
    Negative(f64),
    #[error("{0} is too large for a Kubernetes quantity (at most 9.2e15)")]
    TooLarge(f64),
    /// Not expected: Rust's own `{:e}` output did not read back.
    #[error("{0} could not be written as a decimal")]
    Unwritable(f64),
}

/// `value` as Kubernetes writes a `DecimalSI` quantity, rounded up to milli-units.
pub fn format(value: f64) -> Result<String, QuantityError> {
    Ok(canonical(to_milli(value)?))
}

/// `value` in milli-units, rounded up.
pub fn to_milli(value: f64) -> Result<i64, QuantityError> {
    if !value.is_finite() {
        return Err(QuantityError::NotFinite(value));
    }
    if value < 0.0 {
        return Err(QuantityError::Negative(value));
    }
    if value == 0.0 {
        return Ok(0);
    }
    // Shortest round-trip form: "1.5e0", "1e-7", "1.2345e15"; at most 17
    // significant digits, so the mantissa fits a u64.
    let unwritable = QuantityError::Unwritable(value);
    let text = format!("{value:e}");
    let (mantissa, exponent) = text.split_once('e').ok_or(unwritable)?;
    let exponent: i32 = exponent.parse().map_err(|_| unwritable)?;
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: u128 = format!("{int}{frac}").parse().map_err(|_| unwritable)?;
    // value = digits × 10^(exponent - len(frac)); in milli-units, × 10^3.
    let shift = exponent - frac.len() as i32 + 3;
    let too_large = QuantityError::TooLarge(value);
    let milli: u128 = if shift >= 0 {
        if shift > 38 {
            return Err(too_large);
        }
        digits
            .checked_mul(10u128.pow(shift as u32))
            .ok_or(too_large)?
    } else if -shift > 38 {
        // Below 10^-38 of a milli-unit, yet not zero: one milli-unit.
        1
    } else {
        let div = 10u128.pow((-shift) as u32);
        digits.div_ceil(div)
    };
    i64::try_from(milli).map_err(|_| too_large)
}

/// The canonical `DecimalSI` text of `milli` milli-units (≥ 0), as
/// apimachinery's `int64Amount.AsCanonicalBytes` and the suffix table make it.
pub fn canonical(milli: i64) -> String {
    if milli <= 0 {
        return "0".into();
    }
    let mut mantissa = milli;
    let mut exponent: i32 = -3;
    while mantissa % 10 == 0 {
        mantissa /= 10;
        exponent += 1;
    }
    // Lower the exponent to a multiple of three. Cannot overflow: it only
    // gives back factors of ten just taken out.
    match exponent.rem_euclid(3) {
        1 => {
            mantissa *= 10;
            exponent -= 1;
        }
        2 => {
            mantissa *= 100;
            exponent -= 2;
        }
        _ => {}
    }
    let suffix = match exponent {
        -3 => "m",
        0 => "",
        3 => "k",
        6 => "M",
        9 => "G",
        12 => "T",
        15 => "P",
        // i64::MAX milli-units is 9.2e15 units: the exponent stops at 15.
        _ => "E",
    };
    format!("{mantissa}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn apimachinery_canonical_forms() {
        // From apimachinery's quantity_test.go TestQuantityString (DecimalSI
        // rows whose precision is milli or coarser), as f64 inputs.
        for (value, want) in [
            (1e9, "1G"),
            (0.001, "1m"),
            (0.08, "80m"),
            (1.08, "1080m"),
            (3e8, "300M"),
            (1e12, "1T"),
            (1.234567e12, "1234567M"),
            (3000.0, "3k"),
            (0.0, "0"),
            // quantity_test.go TestQuantityParse canonical rows.
            (9.0, "9"),
            (8000.0, "8k"),
            (50_000.0, "50k"),
            (7e6, "7M"),
            (6e9, "6G"),
            (5e12, "5T"),
            (4e13, "40T"),
            (3e14, "300T"),
            (2e15, "2P"),
            (100_035.0, "100035"),
            (0.5, "500m"),
            (0.05, "50m"),
            (0.005, "5m"),
        ] {
            assert_eq!(format(value).unwrap(), want, "{value}");
        }
    }

    #[test]
    fn the_issue_examples() {
        assert_eq!(format(4.0).unwrap(), "4");
        assert_eq!(format(1.5).unwrap(), "1500m");
        assert_eq!(format(10.0).unwrap(), "10");
        assert_eq!(format(1500.0).unwrap(), "1500");
        assert_eq!(format(2.5e6).unwrap(), "2500k");
        assert_eq!(format(-0.0).unwrap(), "0");
    }

    #[test]
    fn finer_than_milli_rounds_up() {
        assert_eq!(format(0.0001).unwrap(), "1m");
        assert_eq!(format(1e-300).unwrap(), "1m");
        assert_eq!(format(f64::MIN_POSITIVE).unwrap(), "1m");
        assert_eq!(format(5e-324).unwrap(), "1m");
        assert_eq!(format(1.0001).unwrap(), "1001m");
        assert_eq!(format(2.9999).unwrap(), "3");
        assert_eq!(format(0.0015).unwrap(), "2m");
    }

    #[test]
    fn binary_fractions_do_not_bump_the_last_milli() {
        // 1.1 is 1.100000000000000088817841970012523 in binary; what was meant is 1.1.
        assert_eq!(format(1.1).unwrap(), "1100m");
        assert_eq!(format(0.3).unwrap(), "300m");
        assert_eq!(format(4.35).unwrap(), "4350m");
        assert_eq!(
            format(0.1 + 0.2).unwrap(),
            "301m",
            "0.30000000000000004 is more than 0.3"
        );
    }

    #[test]
    fn large_values_up_to_the_int64_limit() {
        assert_eq!(format(9.2e15).unwrap(), "9200T");
        assert_eq!(format(9.3e15).unwrap_err(), QuantityError::TooLarge(9.3e15));
        assert_eq!(canonical(i64::MAX), "9223372036854775807m");
        assert!(matches!(format(1e18), Err(QuantityError::TooLarge(_))));
        assert!(matches!(format(f64::MAX), Err(QuantityError::TooLarge(_))));
    }

    #[test]
    fn refuses_what_is_not_a_load() {
        assert!(matches!(format(f64::NAN), Err(QuantityError::NotFinite(_))));
        assert!(matches!(
            format(f64::INFINITY),
            Err(QuantityError::NotFinite(_))
        ));
        assert!(matches!(
            format(f64::NEG_INFINITY),
            Err(QuantityError::NotFinite(_))
        ));
        assert!(matches!(format(-1.0), Err(QuantityError::Negative(_))));
        assert!(matches!(format(-1e-9), Err(QuantityError::Negative(_))));
    }

    /// Reads a canonical string back, as `ParseQuantity` would (milli-units).
    fn parse_milli(s: &str) -> i128 {
        let (digits, exp) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
            None => (s, 0),
            Some((i, _)) => (
                &s[..i],
                match &s[i..] {
                    "m" => -3,
                    "k" => 3,
                    "M" => 6,
                    "G" => 9,
                    "T" => 12,
                    "P" => 15,
                    other => panic!("suffix {other}"),
                },
            ),
        };
        digits.parse::<i128>().unwrap() * 10i128.pow((exp + 3) as u32)
    }

    proptest! {
        #[test]
        fn round_trips_and_never_under_reports(value in 0.0f64..1e15) {
            let text = format(value).unwrap();
            let milli = parse_milli(&text);
            prop_assert_eq!(milli, to_milli(value).unwrap() as i128);
            prop_assert!(milli as f64 / 1000.0 >= value * (1.0 - 1e-15), "{} < {}", text, value);
            prop_assert!((milli as f64 / 1000.0) - value <= 0.001 + value * 1e-15);
            // Canonical: no trailing zeros before a suffix other than m...
            let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
            if text != "0" {
                prop_assert!(!digits.ends_with("000"), "{}", text);
            }
        }

        #[test]
        fn integers_are_exact(n in 0u64..9_000_000_000_000) {
            let text = format(n as f64).unwrap();
            prop_assert_eq!(parse_milli(&text), n as i128 * 1000);
        }
    }
}
