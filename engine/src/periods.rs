//! Usage periods: which window a moment falls in, for each limit period.
//!
//! Everything is UTC. Calendar periods start on the hour, at midnight, on
//! ISO Monday, or on the 1st. A `billing_month` renews on the customer's
//! billing anchor day, clamped to short months: an anchor on the 31st renews
//! on Feb 28 (29 in leap years), Mar 31, Apr 30, and always returns to the
//! 31st when the month has one. Counters roll over lazily, by comparing the
//! period start stored with the one computed here, so no cron is needed.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Timelike, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    None,
    Hour,
    Day,
    Week,
    Month,
    BillingMonth,
}

impl Period {
    pub const NAMES: [&'static str; 6] = ["none", "hour", "day", "week", "month", "billing_month"];

    pub fn parse(name: &str) -> Option<Period> {
        Some(match name {
            "none" => Period::None,
            "hour" => Period::Hour,
            "day" => Period::Day,
            "week" => Period::Week,
            "month" => Period::Month,
            "billing_month" => Period::BillingMonth,
            _ => return None,
        })
    }
}

/// The window holding `at`: its start and the moment it resets. `None`
/// (never resets) has neither.
pub fn window(
    period: Period,
    at: DateTime<Utc>,
    anchor: Option<DateTime<Utc>>,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let midnight = |date: NaiveDate| Utc.from_utc_datetime(&date.and_time(NaiveTime::MIN));
    Some(match period {
        Period::None => return None,
        Period::Hour => {
            let start = at
                .with_nanosecond(0)
                .and_then(|t| t.with_second(0))
                .and_then(|t| t.with_minute(0))
                .expect("zero is a valid minute, second and nanosecond");
            (start, start + Duration::hours(1))
        }
        Period::Day => {
            let start = midnight(at.date_naive());
            (start, start + Duration::days(1))
        }
        Period::Week => {
            let days_since_monday = i64::from(at.weekday().num_days_from_monday());
            let start = midnight(at.date_naive()) - Duration::days(days_since_monday);
            (start, start + Duration::weeks(1))
        }
        Period::Month => {
            let start = midnight(first_of_month(at.year(), at.month()));
            let (year, month) = next_month(at.year(), at.month());
            (start, midnight(first_of_month(year, month)))
        }
        Period::BillingMonth => match anchor {
            None => return window(Period::Month, at, None),
            Some(anchor) => billing_window(at, anchor),
        },
    })
}

fn first_of_month(year: i32, month: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(year, month, 1).expect("the 1st exists in every month")
}

fn next_month(year: i32, month: u32) -> (i32, u32) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

fn previous_month(year: i32, month: u32) -> (i32, u32) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let (next_year, next) = next_month(year, month);
    first_of_month(next_year, next)
        .pred_opt()
        .expect("every month has a last day")
        .day()
}

/// The anchor's renewal moment in one month: its day clamped to the month's
/// length, at the anchor's time of day.
fn renewal(year: i32, month: u32, anchor: DateTime<Utc>) -> DateTime<Utc> {
    let day = anchor.day().min(days_in_month(year, month));
    let date = NaiveDate::from_ymd_opt(year, month, day).expect("the day was clamped");
    Utc.from_utc_datetime(&date.and_time(anchor.time()))
}

fn billing_window(at: DateTime<Utc>, anchor: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let this_month = renewal(at.year(), at.month(), anchor);
    let (start_year, start_month) = if this_month <= at {
        (at.year(), at.month())
    } else {
        previous_month(at.year(), at.month())
    };
    let (end_year, end_month) = next_month(start_year, start_month);
    (
        renewal(start_year, start_month, anchor),
        renewal(end_year, end_month, anchor),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn bounds(period: Period, at: &str, anchor: Option<&str>) -> (String, String) {
        let (start, end) = window(period, t(at), anchor.map(t)).unwrap();
        (start.to_rfc3339(), end.to_rfc3339())
    }

    fn pair(start: &str, end: &str) -> (String, String) {
        (t(start).to_rfc3339(), t(end).to_rfc3339())
    }

    #[test]
    fn calendar_periods() {
        let at = "2024-02-29T13:45:10.5Z";
        assert_eq!(
            bounds(Period::Hour, at, None),
            pair("2024-02-29T13:00:00Z", "2024-02-29T14:00:00Z")
        );
        assert_eq!(
            bounds(Period::Day, at, None),
            pair("2024-02-29T00:00:00Z", "2024-03-01T00:00:00Z")
        );
        // 2024-02-29 is a Thursday; ISO weeks start on Monday.
        assert_eq!(
            bounds(Period::Week, at, None),
            pair("2024-02-26T00:00:00Z", "2024-03-04T00:00:00Z")
        );
        assert_eq!(
            bounds(Period::Month, at, None),
            pair("2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z")
        );
        assert_eq!(
            bounds(Period::Month, "2024-12-31T23:59:59Z", None),
            pair("2024-12-01T00:00:00Z", "2025-01-01T00:00:00Z")
        );
        assert_eq!(window(Period::None, t(at), None), None);
    }

    #[test]
    fn boundaries_belong_to_the_period_they_start() {
        assert_eq!(
            bounds(Period::Day, "2024-03-01T00:00:00Z", None),
            pair("2024-03-01T00:00:00Z", "2024-03-02T00:00:00Z")
        );
        assert_eq!(
            bounds(Period::Month, "2024-02-29T23:59:59.999999Z", None).0,
            t("2024-02-01T00:00:00Z").to_rfc3339()
        );
    }

    #[test]
    fn anchor_on_the_31st_clamps_to_month_ends() {
        let anchor = Some("2023-01-31T10:00:00Z");
        // Leap year: Jan 31 -> Feb 29 -> Mar 31 -> Apr 30 -> May 31.
        assert_eq!(
            bounds(Period::BillingMonth, "2024-02-15T00:00:00Z", anchor),
            pair("2024-01-31T10:00:00Z", "2024-02-29T10:00:00Z")
        );
        assert_eq!(
            bounds(Period::BillingMonth, "2024-02-29T10:00:00Z", anchor),
            pair("2024-02-29T10:00:00Z", "2024-03-31T10:00:00Z")
        );
        assert_eq!(
            bounds(Period::BillingMonth, "2024-04-30T09:59:59Z", anchor),
            pair("2024-03-31T10:00:00Z", "2024-04-30T10:00:00Z")
        );
        assert_eq!(
            bounds(Period::BillingMonth, "2024-05-01T00:00:00Z", anchor),
            pair("2024-04-30T10:00:00Z", "2024-05-31T10:00:00Z")
        );
        // Common year: Feb 28.
        assert_eq!(
            bounds(Period::BillingMonth, "2023-03-01T00:00:00Z", anchor),
            pair("2023-02-28T10:00:00Z", "2023-03-31T10:00:00Z")
        );
    }

    #[test]
    fn anchors_on_the_29th_and_30th() {
        let on_29th = Some("2023-11-29T00:00:00Z");
        assert_eq!(
            bounds(Period::BillingMonth, "2023-02-28T12:00:00Z", on_29th),
            pair("2023-02-28T00:00:00Z", "2023-03-29T00:00:00Z")
        );
        assert_eq!(
            bounds(Period::BillingMonth, "2024-02-28T12:00:00Z", on_29th),
            pair("2024-01-29T00:00:00Z", "2024-02-29T00:00:00Z")
        );
        let on_30th = Some("2023-04-30T06:30:00Z");
        assert_eq!(
            bounds(Period::BillingMonth, "2024-03-01T00:00:00Z", on_30th),
            pair("2024-02-29T06:30:00Z", "2024-03-30T06:30:00Z")
        );
        assert_eq!(
            bounds(Period::BillingMonth, "2025-01-30T06:29:59Z", on_30th),
            pair("2024-12-30T06:30:00Z", "2025-01-30T06:30:00Z")
        );
    }

    #[test]
    fn year_boundary_and_missing_anchor() {
        let anchor = Some("2020-06-15T00:00:00Z");
        assert_eq!(
            bounds(Period::BillingMonth, "2025-01-10T00:00:00Z", anchor),
            pair("2024-12-15T00:00:00Z", "2025-01-15T00:00:00Z")
        );
        assert_eq!(
            bounds(Period::BillingMonth, "2025-01-10T00:00:00Z", None),
            bounds(Period::Month, "2025-01-10T00:00:00Z", None)
        );
    }

    #[test]
    fn every_period_name_parses() {
        for name in Period::NAMES {
            assert!(Period::parse(name).is_some(), "{name}");
        }
        assert_eq!(Period::parse("fortnight"), None);
    }
}
