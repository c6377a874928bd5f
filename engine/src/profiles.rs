//! Other flag systems' bucketing, reproduced bit for bit, so that a flag
//! imported from Unleash, GrowthBook or LaunchDarkly keeps every subject in
//! the rollout bucket it had there. Each function is the vendor's published
//! algorithm; the tests hold the vendors' own test vectors.
//!
//! FlagShip's own bucketing (`crate::bucketing`) stays the default: these
//! exist only to keep migrated users in place.

use sha1::{Digest, Sha1};

/// MurmurHash3, x86 32-bit variant (Austin Appleby's reference), which
/// Unleash clients use for rollouts and variants.
pub fn murmur3_x86_32(data: &[u8], seed: u32) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let mut hash = seed;
    let mut blocks = data.chunks_exact(4);
    for block in &mut blocks {
        let mut k = u32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
        hash ^= k;
        hash = hash
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (shift, byte) in tail.iter().enumerate() {
            k |= u32::from(*byte) << (8 * shift);
        }
        hash ^= k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    }
    hash ^= data.len() as u32;
    hash ^= hash >> 16;
    hash = hash.wrapping_mul(0x85eb_ca6b);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(0xc2b2_ae35);
    hash ^ (hash >> 16)
}

/// Unleash's seed for variant assignment (client specification 6).
pub const UNLEASH_VARIANT_SEED: u32 = 86_028_157;

/// Unleash's `normalizedValue`: the subject's position, 1 to `normalizer`,
/// in group `group_id` (a strategy's `groupId`, by default the flag name).
/// A rollout of p% includes the subject when the value is at most p.
pub fn unleash_normalized(value: &str, group_id: &str, normalizer: u32, seed: u32) -> u32 {
    let input = format!("{group_id}:{value}");
    murmur3_x86_32(input.as_bytes(), seed) % normalizer + 1
}

/// Unleash's variant target, 1 to `total_weight`: the first variant whose
/// cumulative weight reaches it is served.
pub fn unleash_variant_target(value: &str, group_id: &str, total_weight: u32) -> u32 {
    unleash_normalized(value, group_id, total_weight, UNLEASH_VARIANT_SEED)
}

/// 32-bit FNV-1a, GrowthBook's hash.
pub fn fnv1a_32(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

/// GrowthBook's `hash(seed, value, version)`, a position in [0, 1):
/// version 1 hashes `value + seed` into thousandths, version 2 hashes the
/// decimal text of `fnv1a(seed + value)` again into ten-thousandths. Other
/// versions have no answer.
pub fn growthbook_hash(seed: &str, value: &str, version: u32) -> Option<f64> {
    match version {
        1 => Some(f64::from(fnv1a_32(format!("{value}{seed}").as_bytes()) % 1000) / 1000.0),
        2 => {
            let first = fnv1a_32(format!("{seed}{value}").as_bytes());
            Some(f64::from(fnv1a_32(first.to_string().as_bytes()) % 10_000) / 10_000.0)
        }
        _ => None,
    }
}

/// LaunchDarkly's bucket, a position in [0, 1): SHA-1 of
/// `<flag key>.<salt>.<value>`, its first 15 hex digits over 0xFFFFFFFFFFFFFFF.
/// Variation weights are out of 100 000, laid out in the flag's order.
pub fn launchdarkly_bucket(flag_key: &str, salt: &str, value: &str) -> f64 {
    let digest = Sha1::digest(format!("{flag_key}.{salt}.{value}").as_bytes());
    // 15 hex digits are the first 7.5 bytes: the top 60 bits.
    let top = u64::from_be_bytes(digest[..8].try_into().expect("SHA-1 has 20 bytes")) >> 4;
    top as f64 / 0x0FFF_FFFF_FFFF_FFFFu64 as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_matches_the_reference_vectors() {
        // SMHasher's verification values for MurmurHash3_x86_32.
        let vectors: &[(&[u8], u32, u32)] = &[
            (b"", 0, 0),
            (b"", 1, 0x514e_28b7),
            (b"", 0xffff_ffff, 0x81f1_6f39),
            (b"\0\0\0\0", 0, 0x2362_f9de),
            (b"aaaa", 0x9747_b28c, 0x5a97_808a),
            (b"abc", 0, 0xb3dd_93fa),
            (b"Hello, world!", 0x9747_b28c, 0x2488_4cba),
            (
                b"The quick brown fox jumps over the lazy dog",
                0x9747_b28c,
                0x2fa8_26cd,
            ),
        ];
        for (input, seed, expected) in vectors {
            assert_eq!(
                murmur3_x86_32(input, *seed),
                *expected,
                "{:?} seed {seed:#x}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn unleash_normalized_values_match_the_clients_tests() {
        // unleash-client-node, test/strategy/util-test.js.
        assert_eq!(unleash_normalized("123", "gr1", 100, 0), 73);
        assert_eq!(unleash_normalized("999", "groupX", 100, 0), 25);
        // Every value lands in 1..=normalizer.
        for id in 0..2000 {
            let value = unleash_normalized(&id.to_string(), "g", 100, 0);
            assert!((1..=100).contains(&value));
            let target = unleash_variant_target(&id.to_string(), "g", 3);
            assert!((1..=3).contains(&target));
        }
    }

    #[test]
    fn growthbook_hash_matches_its_published_cases() {
        // The `hash` section of GrowthBook's SDK test cases (v1 and v2),
        // kept in ../shared/conformance when present (see tests/conformance
        // for the rest of that suite), else these copies of a few of them.
        let cases: Vec<(String, String, u32, Option<f64>)> =
            crate::conformance_cases::growthbook("hash")
                .map(|cases| {
                    cases
                        .iter()
                        .map(|case| {
                            (
                                case[0].as_str().unwrap().to_string(),
                                case[1].as_str().unwrap().to_string(),
                                case[2].as_u64().unwrap() as u32,
                                case[3].as_f64(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_else(|| {
                    vec![
                        (String::new(), "a".into(), 1, Some(0.22)),
                        ("b".into(), "a".into(), 1, Some(0.946)),
                    ]
                });
        assert!(!cases.is_empty());
        for (seed, value, version, expected) in cases {
            assert_eq!(
                growthbook_hash(&seed, &value, version),
                expected,
                "seed {seed:?} value {value:?} v{version}"
            );
        }
    }

    #[test]
    fn launchdarkly_buckets_match_the_sdk_tests() {
        // LaunchDarkly's SDK bucketing tests: flag "hashKey", salt "saltyA".
        for (user, expected) in [
            ("userKeyA", 0.421_575_87),
            ("userKeyB", 0.670_848_5),
            ("userKeyC", 0.103_431_06),
        ] {
            let bucket = launchdarkly_bucket("hashKey", "saltyA", user);
            assert!((bucket - expected).abs() < 1e-7, "{user}: {bucket}");
        }
    }
}
