//! Sliding-window rate limits counted in sub-window buckets.
//!
//! A window of length `W` is cut into [`SUB_WINDOWS`] buckets of width
//! `w = ceil(W / SUB_WINDOWS)`, aligned on multiples of `w`. An attempt at
//! time `t` falls in bucket `b = floor(t / w)` and is judged against every
//! attempt in buckets `b - SUB_WINDOWS ..= b`. Those buckets cover
//! `[t - W, t]` and at most `w` more before it, so:
//!
//! - **never too many**: in any interval of length `W`, attempts admitted
//!   cost at most the limit (the buckets always cover the exact window);
//! - **late by at most one bucket**: an attempt stops counting between `W`
//!   and `W + w` after it was made (`w` is 1/60 of the window: one second of
//!   a one-minute window), so a caller may be refused up to `w` longer than
//!   an exact sliding log would refuse it.
//!
//! Every attempt counts, admitted or not (an attempt is not usage): a
//! caller that keeps trying while limited stays limited.
//!
//! The state is plain old data of fixed size, so it can live in shared
//! memory; times are microseconds on any fixed epoch.

use chrono::DateTime;
use serde_json::{json, Value};

/// Buckets per window.
pub const SUB_WINDOWS: i64 = 60;
/// Ring size: the `SUB_WINDOWS + 1` live buckets, rounded up.
pub const BUCKETS: usize = 64;

/// Windows from one second to one day.
pub const MIN_WINDOW_US: i64 = 1_000_000;
pub const MAX_WINDOW_US: i64 = 86_400_000_000;

/// One subject's window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// The window's length (µs); 0 for a window never used.
    pub window_us: i64,
    /// The newest bucket counted.
    pub newest: i64,
    /// Attempted cost per bucket, indexed by bucket number modulo `BUCKETS`.
    pub counts: [u32; BUCKETS],
}

/// What one attempt was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub allowed: bool,
    /// What the window still admits after this attempt.
    pub remaining: u64,
    /// When this attempt's cost would fit again (0 when admitted; `None`
    /// when it never fits: the cost is above the limit).
    pub retry_after_us: Option<i64>,
    /// When every attempt now counted has left the window.
    pub reset_at_us: i64,
}

fn slot(bucket: i64) -> usize {
    bucket.rem_euclid(BUCKETS as i64) as usize
}

impl Window {
    pub const fn unused() -> Window {
        Window {
            window_us: 0,
            newest: 0,
            counts: [0; BUCKETS],
        }
    }

    fn empty(window_us: i64) -> Window {
        Window {
            window_us,
            ..Window::unused()
        }
    }

    fn width(&self) -> i64 {
        (self.window_us + SUB_WINDOWS - 1) / SUB_WINDOWS
    }

    /// Whether nothing counted at `now_us` (the slot may serve another subject).
    pub fn is_idle(&self, now_us: i64) -> bool {
        self.window_us == 0 || now_us.div_euclid(self.width()) > self.newest + SUB_WINDOWS
    }

    /// Moves the ring forward to `bucket`, clearing the buckets it enters.
    /// A clock that steps back counts into the newest bucket: later, never
    /// sooner, than it should.
    fn advance_to(&mut self, bucket: i64) -> i64 {
        if bucket <= self.newest {
            return self.newest;
        }
        let entered = (bucket - self.newest).min(BUCKETS as i64);
        for back in 0..entered {
            self.counts[slot(bucket - back)] = 0;
        }
        self.newest = bucket;
        bucket
    }

    /// The live buckets, oldest first, with their numbers.
    fn live(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
        (self.newest - SUB_WINDOWS..=self.newest)
            .map(|bucket| (bucket, u64::from(self.counts[slot(bucket)])))
    }

    /// Counts an attempt of `cost` at `now_us` against `limit` per
    /// `window_us`. A window of another length starts over.
    pub fn attempt(&mut self, window_us: i64, now_us: i64, cost: u32, limit: u64) -> Attempt {
        if self.window_us != window_us {
            *self = Window::empty(window_us);
            self.newest = now_us.div_euclid(self.width());
        }
        let width = self.width();
        let bucket = self.advance_to(now_us.div_euclid(width));
        let before: u64 = self.live().map(|(_, count)| count).sum();
        let allowed = before + u64::from(cost) <= limit;
        let counted = &mut self.counts[slot(bucket)];
        *counted = counted.saturating_add(cost);
        let after: u64 = self.live().map(|(_, count)| count).sum();

        // Bucket j leaves the window when the clock reaches bucket j + SUB_WINDOWS + 1.
        let leaves_at = |bucket: i64| (bucket + SUB_WINDOWS + 1) * width;
        let retry_after_us = if allowed {
            Some(0)
        } else if u64::from(cost) > limit {
            None
        } else {
            let mut still = after;
            self.live()
                .find(|&(_, count)| {
                    still -= count;
                    still + u64::from(cost) <= limit
                })
                .map(|(bucket, _)| (leaves_at(bucket) - now_us).max(0))
        };
        let reset_at_us = self
            .live()
            .filter(|&(_, count)| count > 0)
            .last()
            .map_or(now_us, |(bucket, _)| leaves_at(bucket));
        Attempt {
            allowed,
            remaining: limit.saturating_sub(after),
            retry_after_us,
            reset_at_us,
        }
    }
}

/// The window a subject's rate limit `name` of a given length counts in:
/// one per database, organization, subject, name and length, so tenants
/// (and copies of a database) never share a window, and a changed length
/// starts a window of its own. `seed` is the server's secret: without it
/// nobody can tell which slots of the shared table a window will probe.
pub fn counter_key(
    seed: u64,
    database: u32,
    organization: &[u8; 16],
    subject: &str,
    name: &str,
    window_us: i64,
) -> [u64; 2] {
    let mut identity = Vec::with_capacity(4 + 16 + subject.len() + 1 + name.len() + 8);
    identity.extend_from_slice(&database.to_le_bytes());
    identity.extend_from_slice(organization);
    identity.extend_from_slice(subject.as_bytes());
    identity.push(0);
    identity.extend_from_slice(name.as_bytes());
    identity.extend_from_slice(&window_us.to_le_bytes());
    let hash = xxhash_rust::xxh3::xxh3_128_with_seed(&identity, seed);
    [hash as u64, (hash >> 64) as u64]
}

/// The organization a window belongs to, as the shared table records it.
pub fn organization_key(seed: u64, database: u32, organization: &[u8; 16]) -> u64 {
    let mut identity = [0u8; 20];
    identity[..4].copy_from_slice(&database.to_le_bytes());
    identity[4..].copy_from_slice(organization);
    xxhash_rust::xxh3::xxh3_64_with_seed(&identity, seed)
}

/// Whether an organization that holds `held` of the live windows among the
/// `probes` slots a new window may take has had its share: a quarter, so
/// no organization (nor three) can fill the slots another one needs.
pub fn has_its_share(held: usize, probes: usize) -> bool {
    held >= probes / 4
}

/// The answer to an attempt: `{"allowed", "limit", "remaining",
/// "reset_at", "retry_after_ms", "reason"}`; without an attempt (no
/// limit), allowed and unlimited. `epoch_unix_us` is where the clock the
/// attempt was counted on starts, in Unix microseconds.
pub fn result(limit: Option<u64>, attempt: Option<&Attempt>, epoch_unix_us: i64) -> Value {
    let allowed = attempt.is_none_or(|attempt| attempt.allowed);
    json!({
        "allowed": allowed,
        "limit": limit,
        "remaining": attempt.map(|attempt| attempt.remaining),
        "reset_at": attempt
            .and_then(|attempt| DateTime::from_timestamp_micros(attempt.reset_at_us + epoch_unix_us))
            .map_or(Value::Null, crate::limits::timestamp),
        "retry_after_ms": attempt.map_or(json!(0), |attempt| {
            json!(attempt.retry_after_us.map(|wait| (wait + 999) / 1000))
        }),
        "reason": if allowed { "WITHIN_LIMIT" } else { "RATE_LIMITED" },
    })
}

/// Parses a window such as `30s`, `1m`, `12h` or `1d` (1 s to 1 day) into
/// microseconds.
pub fn parse_window(text: &str) -> Result<i64, String> {
    let refuse =
        || format!("\"{text}\" is not a window from 1s to 1d (a whole number and s, m, h or d)");
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(refuse)?;
    let (digits, unit) = text.split_at(split);
    let amount: i64 = digits.parse().map_err(|_| refuse())?;
    let unit_us: i64 = match unit {
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        _ => return Err(refuse()),
    };
    match amount.checked_mul(unit_us) {
        Some(window) if (MIN_WINDOW_US..=MAX_WINDOW_US).contains(&window) => Ok(window),
        _ => Err(refuse()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000_000;

    #[test]
    fn a_window_admits_its_limit_then_refuses() {
        let mut window = Window::unused();
        let start = 1_000 * MINUTE;
        for n in 0..100 {
            let attempt = window.attempt(MINUTE, start + n, 1, 100);
            assert_eq!(
                attempt,
                Attempt {
                    allowed: true,
                    remaining: 99 - n as u64,
                    retry_after_us: Some(0),
                    reset_at_us: start + 61 * 1_000_000,
                }
            );
        }
        let refused = window.attempt(MINUTE, start + 100, 1, 100);
        assert_eq!(
            refused,
            Attempt {
                allowed: false,
                remaining: 0,
                // All 101 attempts sit in the first bucket: it leaves the
                // window 61 buckets (of one second) after it began.
                retry_after_us: Some(61 * 1_000_000 - 100),
                reset_at_us: start + 61 * 1_000_000,
            }
        );
        // Still refused one bucket before, admitted once the bucket left.
        assert!(
            !window
                .attempt(MINUTE, start + 60 * 1_000_000, 1, 100)
                .allowed
        );
        assert!(
            window
                .attempt(MINUTE, start + 61 * 1_000_000, 1, 100)
                .allowed
        );
    }

    #[test]
    fn answers_are_whole_documents() {
        let mut window = Window::unused();
        let attempt = window.attempt(MINUTE, 0, 1, 1);
        assert_eq!(
            result(Some(1), Some(&attempt), 946_684_800_000_000),
            json!({"allowed": true, "limit": 1, "remaining": 0,
                   "reset_at": "2000-01-01T00:01:01+00:00", "retry_after_ms": 0,
                   "reason": "WITHIN_LIMIT"})
        );
        let refused = window.attempt(MINUTE, 500, 1, 1);
        assert_eq!(
            result(Some(1), Some(&refused), 0)["retry_after_ms"],
            json!(61_000)
        );
        assert_eq!(
            result(Some(1), Some(&refused), 0)["reason"],
            json!("RATE_LIMITED")
        );
        assert_eq!(
            result(None, None, 0),
            json!({"allowed": true, "limit": null, "remaining": null, "reset_at": null,
                   "retry_after_ms": 0, "reason": "WITHIN_LIMIT"})
        );
    }

    #[test]
    fn a_cost_above_the_limit_never_fits() {
        let mut window = Window::unused();
        let attempt = window.attempt(MINUTE, 0, 11, 10);
        assert!(!attempt.allowed);
        assert_eq!(attempt.retry_after_us, None);
    }

    #[test]
    fn a_changed_window_starts_over() {
        let mut window = Window::unused();
        assert!(window.attempt(MINUTE, 0, 5, 5).allowed);
        assert!(!window.attempt(MINUTE, 1, 1, 5).allowed);
        assert!(window.attempt(2 * MINUTE, 2, 1, 5).allowed);
    }

    #[test]
    fn a_clock_that_steps_back_counts_into_the_newest_bucket() {
        let mut window = Window::unused();
        assert!(window.attempt(MINUTE, 10 * MINUTE, 1, 2).allowed);
        assert!(window.attempt(MINUTE, 9 * MINUTE, 1, 2).allowed);
        assert!(!window.attempt(MINUTE, 9 * MINUTE, 1, 2).allowed);
    }

    #[test]
    fn windows_parse_from_one_second_to_one_day() {
        assert_eq!(parse_window("1s"), Ok(1_000_000));
        assert_eq!(parse_window("1m"), Ok(MINUTE));
        assert_eq!(parse_window("90m"), Ok(90 * MINUTE));
        assert_eq!(parse_window("24h"), Ok(86_400_000_000));
        assert_eq!(parse_window("1d"), Ok(86_400_000_000));
        for bad in [
            "",
            "0s",
            "2d",
            "25h",
            "1",
            "m",
            "1 m",
            "1ms",
            "-1s",
            "1.5m",
            "99999999999999999999s",
        ] {
            assert!(parse_window(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_organization_gets_a_quarter_of_the_slots_a_window_may_take() {
        assert!(!has_its_share(15, 64));
        assert!(has_its_share(16, 64));
        assert!(has_its_share(40, 64));
    }

    #[test]
    fn windows_differ_by_database_organization_subject_name_length_and_seed() {
        let org = [7u8; 16];
        let key = counter_key(1, 5, &org, "acme", "requests", MINUTE);
        for other in [
            counter_key(2, 5, &org, "acme", "requests", MINUTE),
            counter_key(1, 6, &org, "acme", "requests", MINUTE),
            counter_key(1, 5, &[8u8; 16], "acme", "requests", MINUTE),
            counter_key(1, 5, &org, "acme2", "requests", MINUTE),
            counter_key(1, 5, &org, "acme", "requests2", MINUTE),
            counter_key(1, 5, &org, "acmer", "equests", MINUTE),
            counter_key(1, 5, &org, "acme", "requests", 2 * MINUTE),
        ] {
            assert_ne!(key, other);
        }
    }

    /// xorshift: reproducible inputs without a dependency.
    struct Numbers(u64);
    impl Numbers {
        fn next(&mut self, below: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % below
        }
    }

    /// Differential test against an exact log of every attempt: the window
    /// refuses whatever the exact sliding window `[t - W, t]` would refuse
    /// (never too many), and admits whatever a window longer by two buckets
    /// would admit (late by at most one bucket); admitted cost in any
    /// interval of length W never exceeds the limit.
    #[test]
    fn the_bucketed_window_agrees_with_an_exact_log() {
        let mut numbers = Numbers(0x9E37_79B9_7F4A_7C15);
        for _round in 0..300 {
            let window_us = [1_000_000, 7_000_000, MINUTE, 3_600_000_000][numbers.next(4) as usize];
            let limit = 1 + numbers.next(40);
            let width = (window_us + SUB_WINDOWS - 1) / SUB_WINDOWS;
            let mut window = Window::unused();
            let mut log: Vec<(i64, u64, bool)> = Vec::new();
            let mut now = numbers.next(1 << 40) as i64;
            for _ in 0..400 {
                now += numbers.next((window_us / 8) as u64) as i64;
                // Often land exactly on an earlier attempt's window edge,
                // where an off-by-one in the bucket arithmetic shows.
                if !log.is_empty() && numbers.next(3) == 0 {
                    let (at, _, _) = log[numbers.next(log.len() as u64) as usize];
                    now = now.max(at + window_us);
                }
                let cost = 1 + numbers.next(4) as u32;
                let attempted_since = |from: i64| -> u64 {
                    log.iter()
                        .filter(|(at, _, _)| *at >= from)
                        .map(|(_, cost, _)| cost)
                        .sum()
                };
                let exact = attempted_since(now - window_us);
                let generous = attempted_since(now - window_us - 2 * width);
                let attempt = window.attempt(window_us, now, cost, limit);
                if exact + u64::from(cost) > limit {
                    assert!(!attempt.allowed, "admitted past the exact window");
                }
                if generous + u64::from(cost) <= limit {
                    assert!(
                        attempt.allowed,
                        "refused what a slightly longer window admits"
                    );
                }
                if let Some(wait) = attempt.retry_after_us.filter(|wait| *wait > 0) {
                    // The promised wait is exact: not a microsecond sooner.
                    assert!(
                        window
                            .clone()
                            .attempt(window_us, now + wait, cost, limit)
                            .allowed
                    );
                    assert!(
                        !window
                            .clone()
                            .attempt(window_us, now + wait - 1, cost, limit)
                            .allowed
                    );
                }
                log.push((now, u64::from(cost), attempt.allowed));
                let admitted: u64 = log
                    .iter()
                    .filter(|(at, _, allowed)| *allowed && *at >= now - window_us)
                    .map(|(_, cost, _)| cost)
                    .sum();
                assert!(
                    admitted <= limit,
                    "admitted {admitted} > {limit} in one window"
                );
            }
        }
    }
}
