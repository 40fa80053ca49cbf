//! RFC 3339 `date-time` checking for IODEF timestamps. RFC 7970 §2.2.8
//! (DATETIME) types them as xs:dateTime profiled on RFC 3339, so a value must
//! satisfy both: four-digit year, upper-case `T`, seconds 00-59 (no leap
//! second, which xs:dateTime lacks), and a mandatory `Z` or `±hh:mm` offset.
//! Pure string checks: no clock, no allocation.

/// Checks one timestamp, saying what is wrong with it.
pub fn check(value: &str) -> Result<(), &'static str> {
    let b = value.as_bytes();
    if b.len() == 10 && shape(b, 0, "dddd-dd-dd") {
        return Err("a date without a time; expected YYYY-MM-DDThh:mm:ss with a time zone");
    }
    if b.len() < 19 || !shape(b, 0, "dddd-dd-ddTdd:dd:dd") {
        return Err("not of the form YYYY-MM-DDThh:mm:ss[.fraction](Z|+hh:mm|-hh:mm)");
    }
    let year = num(&b[0..4]);
    let month = num(&b[5..7]);
    let day = num(&b[8..10]);
    if year == 0 {
        return Err("year 0000 does not exist in xs:dateTime");
    }
    if !(1..=12).contains(&month) {
        return Err("month out of range 01-12");
    }
    if day == 0 || day > days_in_month(year, month) {
        return Err("day out of range for the month");
    }
    if num(&b[11..13]) > 23 || num(&b[14..16]) > 59 || num(&b[17..19]) > 59 {
        return Err("time out of range (hh 00-23, mm 00-59, ss 00-59)");
    }
    let mut rest = &b[19..];
    if let Some((b'.', frac)) = rest.split_first() {
        let digits = frac.iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err("a fraction of a second needs at least one digit");
        }
        rest = &frac[digits..];
    }
    match rest {
        [] => Err("missing time zone offset (Z or +hh:mm/-hh:mm), required by RFC 3339"),
        [b'Z'] => Ok(()),
        [b'+' | b'-', ..] if rest.len() == 6 && shape(rest, 1, "dd:dd") => {
            let (h, m) = (num(&rest[1..3]), num(&rest[4..6]));
            if m > 59 || h > 14 || (h == 14 && m != 0) {
                Err("time zone offset out of range (-14:00 to +14:00)")
            } else {
                Ok(())
            }
        }
        _ => Err("bad time zone offset; expected Z, +hh:mm or -hh:mm"),
    }
}

/// Whether `b[from..]` matches `pattern`, where `d` is any ASCII digit and
/// every other byte must match literally.
fn shape(b: &[u8], from: usize, pattern: &str) -> bool {
    let p = pattern.as_bytes();
    b.len() >= from + p.len()
        && b[from..from + p.len()]
            .iter()
            .zip(p)
            .all(|(c, want)| if *want == b'd' { c.is_ascii_digit() } else { c == want })
}

/// Decimal value of ASCII digits already checked by `shape`.
fn num(digits: &[u8]) -> u32 {
    digits.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0'))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn rfc3339_timestamps_with_zone_are_accepted() {
        for ok in ["2024-03-01T12:00:00Z", "2024-02-29T23:59:59.123+05:30", "1999-12-31T00:00:00-14:00"] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn a_timestamp_without_zone_is_rejected_for_the_missing_offset() {
        assert!(check("2024-03-01T12:00:00").unwrap_err().contains("missing time zone"));
    }

    #[test]
    fn date_only_and_garbage_are_rejected() {
        assert!(check("2024-03-01").unwrap_err().contains("date without a time"));
        assert!(check("yesterday").unwrap_err().contains("not of the form"));
        assert!(check("2024-03-01 12:00:00Z").is_err());
        assert!(check("2024-03-01t12:00:00z").is_err());
    }

    #[test]
    fn out_of_range_fields_are_rejected() {
        assert!(check("2023-02-29T00:00:00Z").unwrap_err().contains("day"));
        assert!(check("2024-13-01T00:00:00Z").unwrap_err().contains("month"));
        assert!(check("2024-01-01T24:00:00Z").unwrap_err().contains("time out of range"));
        assert!(check("2024-01-01T23:59:60Z").is_err());
        assert!(check("2024-01-01T00:00:00+15:00").unwrap_err().contains("offset out of range"));
        assert!(check("2024-01-01T00:00:00.Z").is_err());
        assert!(check("0000-01-01T00:00:00Z").is_err());
    }
}
