//! Deterministic assignment of subjects to rollout buckets.
//!
//! A subject lands in bucket `XXH3-64("<salt>:<value>") mod 100 000`, where the
//! salt is the flag key unless a rule names its own. Weights are expressed in
//! thousandths of a percent (25% = 25 000 buckets) and variants occupy
//! consecutive bucket ranges in a fixed order, so raising one variant's weight
//! at the expense of the next only moves subjects into it. This mapping is
//! frozen: other clients reproduce it from the test vectors in the README.

use xxhash_rust::xxh3::xxh3_64;

/// Number of buckets; one bucket is a thousandth of a percent.
pub const BUCKETS: u32 = 100_000;

/// The bucket, in `0..BUCKETS`, of `value` under `salt`.
pub fn bucket(salt: &str, value: &str) -> u32 {
    let mut input = Vec::with_capacity(salt.len() + 1 + value.len());
    input.extend_from_slice(salt.as_bytes());
    input.push(b':');
    input.extend_from_slice(value.as_bytes());
    (xxh3_64(&input) % u64::from(BUCKETS)) as u32
}

/// Whose bucketing a rollout or sample reproduces. FlagShip's own is the
/// default; the others exist so that a flag imported from that system keeps
/// every subject where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    #[default]
    Xxh3,
    /// murmur3_x86_32 of `group:value`; rollout weights are Unleash's
    /// integer weights, whose sum is the modulus.
    Unleash,
    /// GrowthBook's hash version 2 (the current one).
    GrowthBook,
    /// GrowthBook's hash version 1, for experiments created before v2.
    GrowthBookV1,
    /// SHA-1 of `flag.salt.value`.
    LaunchDarkly,
}

impl Profile {
    pub const NAMES: &'static [&'static str] = &[
        "xxh3",
        "unleash",
        "growthbook",
        "growthbook-v1",
        "launchdarkly",
    ];

    pub fn parse(name: &str) -> Option<Profile> {
        Some(match name {
            "xxh3" => Profile::Xxh3,
            "unleash" => Profile::Unleash,
            "growthbook" => Profile::GrowthBook,
            "growthbook-v1" => Profile::GrowthBookV1,
            "launchdarkly" => Profile::LaunchDarkly,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        Profile::NAMES[self as usize]
    }

    /// Parses a profile name, or says which names there are.
    pub fn parse_named(name: &str) -> Result<Profile, String> {
        Profile::parse(name).ok_or_else(|| {
            format!(
                "unknown bucketing profile \"{name}\"; expected one of: {}",
                Profile::NAMES.join(", ")
            )
        })
    }

    /// Whether rollout weights are the vendor's integers (any positive sum)
    /// rather than percentages summing to 100.
    pub fn has_integer_weights(self) -> bool {
        self == Profile::Unleash
    }

    /// The subject's place in a percentage sample, in `0..BUCKETS`: inside a
    /// sample of p thousandths of a percent when below p.
    pub fn sample_position(self, flag_key: &str, salt: &str, value: &str) -> u32 {
        match self {
            // Unleash admits a subject when `hash % 100 + 1 <= percent`.
            Profile::Unleash => {
                (crate::profiles::unleash_normalized(value, salt, 100, 0) - 1) * (BUCKETS / 100)
            }
            other => other.rollout_position(flag_key, salt, value, BUCKETS),
        }
    }

    /// The subject's place in a rollout whose weights sum to `total`.
    pub fn rollout_position(self, flag_key: &str, salt: &str, value: &str, total: u32) -> u32 {
        let fraction = match self {
            Profile::Xxh3 => return bucket(salt, value),
            Profile::Unleash => {
                return crate::profiles::unleash_variant_target(value, salt, total) - 1
            }
            Profile::GrowthBook => crate::profiles::growthbook_hash(salt, value, 2),
            Profile::GrowthBookV1 => crate::profiles::growthbook_hash(salt, value, 1),
            Profile::LaunchDarkly => {
                Some(crate::profiles::launchdarkly_bucket(flag_key, salt, value))
            }
        };
        // GrowthBook's positions are whole ten-thousandths, so rounding is
        // exact; LaunchDarkly compares its fraction against weight / 100 000,
        // which flooring preserves.
        let scaled = fraction.unwrap_or(0.0) * f64::from(BUCKETS);
        let position = if matches!(self, Profile::LaunchDarkly) {
            scaled.floor()
        } else {
            scaled.round()
        };
        (position as u32).min(BUCKETS - 1)
    }
}

/// Picks the slot whose cumulative range holds `bucket`. `weights` are in
/// thousandths of a percent and sum to `BUCKETS`.
pub fn slot_for(bucket: u32, weights: &[u32]) -> Option<usize> {
    let mut upper = 0u32;
    for (index, weight) in weights.iter().enumerate() {
        upper += weight;
        if bucket < upper {
            return Some(index);
        }
    }
    None
}

/// Parses a percentage with at most three decimals ("25", "12.5", 33.333)
/// into thousandths of a percent, refusing anything finer or out of range.
pub fn weight_from_percent(percent: f64) -> Option<u32> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return None;
    }
    let scaled = percent * 1000.0;
    let rounded = scaled.round();
    if (scaled - rounded).abs() > 1e-6 {
        return None;
    }
    Some(rounded as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published in the README; other clients must reproduce them.
    pub const VECTORS: &[(&str, &str, u32)] = &[
        ("new-checkout", "user-1", 31_778), // XXH3-64 0x2eb63d18f0ebfe42
        ("new-checkout", "user-2", 851),    // XXH3-64 0xce9ab652bf415b73
        ("new-checkout", "", 28_968),       // XXH3-64 0x4e532f081c37d768
        ("beta-salt", "org-42", 42_610),    // XXH3-64 0xec78455eef25c012
        ("checkout", "ünïcødé", 23_401),    // XXH3-64 0x1896f8bd9fd836c9
        ("a", "b", 26_521),                 // XXH3-64 0x35a5819dd7f7c459
    ];

    #[test]
    fn buckets_are_stable_test_vectors() {
        for (salt, value, expected) in VECTORS {
            assert_eq!(bucket(salt, value), *expected, "{salt}:{value}");
        }
    }

    #[test]
    fn bucket_is_in_range_and_deterministic() {
        for i in 0..1000 {
            let value = format!("user-{i}");
            let first = bucket("flag", &value);
            assert!(first < BUCKETS);
            assert_eq!(first, bucket("flag", &value));
        }
    }

    #[test]
    fn salt_changes_the_assignment() {
        let moved = (0..1000)
            .filter(|i| bucket("a", &i.to_string()) != bucket("b", &i.to_string()))
            .count();
        assert!(moved > 990, "only {moved} of 1000 moved");
    }

    #[test]
    fn slots_follow_cumulative_weights() {
        let weights = [25_000, 75_000];
        assert_eq!(slot_for(0, &weights), Some(0));
        assert_eq!(slot_for(24_999, &weights), Some(0));
        assert_eq!(slot_for(25_000, &weights), Some(1));
        assert_eq!(slot_for(99_999, &weights), Some(1));
        assert_eq!(slot_for(100_000, &weights), None);
        assert_eq!(slot_for(10, &[0, 100_000]), Some(1));
    }

    #[test]
    fn percentages_become_thousandths() {
        assert_eq!(weight_from_percent(25.0), Some(25_000));
        assert_eq!(weight_from_percent(33.333), Some(33_333));
        assert_eq!(weight_from_percent(0.001), Some(1));
        assert_eq!(weight_from_percent(12.3456), None);
        assert_eq!(weight_from_percent(-1.0), None);
        assert_eq!(weight_from_percent(100.5), None);
        assert_eq!(weight_from_percent(f64::NAN), None);
    }

    #[test]
    fn uniform_enough() {
        let in_first_quarter = (0..20_000)
            .filter(|i| bucket("new-checkout", &format!("user-{i}")) < 25_000)
            .count();
        let share = in_first_quarter as f64 / 20_000.0;
        assert!((share - 0.25).abs() < 0.01, "share {share}");
    }
}
