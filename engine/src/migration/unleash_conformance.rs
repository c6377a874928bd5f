//! Unleash's client specification, run through the importer and the rule
//! engine: every assertion of every file of `index.json`, with the cases
//! FlagShip answers differently listed by reason.

use serde_json::{json, Value};

use super::unleash::{translate_each, DISABLED_VARIANT};
use crate::rules::document::parse_flag_document;
use crate::rules::{NoEntitlements, Snapshot};

const ENVIRONMENT: &str = "production";

struct Outcome {
    passed: usize,
    failed: Vec<String>,
}

/// Unleash's `isEnabled` and `getVariant` read off a FlagShip resolution.
fn answers(snapshot: &Snapshot, multivariate: bool, flag: &str, context: &Value) -> (bool, Value) {
    let resolution = snapshot.evaluate(flag, context, &NoEntitlements);
    let served = resolution
        .error
        .is_none()
        .then_some(resolution.variant)
        .flatten();
    let enabled = match served {
        Some(variant) if multivariate => variant != DISABLED_VARIANT,
        Some(variant) => variant == "on",
        None => false,
    };
    let variant = match served {
        Some(name) if multivariate && enabled => {
            let mut variant = json!({"name": name, "enabled": true, "feature_enabled": true});
            if resolution.value.is_object() {
                variant["payload"] = resolution.value.clone();
            }
            variant
        }
        _ => json!({"name": DISABLED_VARIANT, "enabled": false, "feature_enabled": enabled}),
    };
    (enabled, variant)
}

fn variant_matches(expected: &Value, actual: &Value) -> bool {
    ["name", "enabled", "payload", "feature_enabled"]
        .iter()
        .all(|field| match expected.get(field) {
            None => true,
            Some(wanted) => actual.get(field) == Some(wanted),
        })
}

fn run_file(path: &std::path::Path, outcome: &mut Outcome) {
    let suite: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let file = path.file_name().unwrap().to_string_lossy().to_string();
    let translated = translate_each(&suite["state"], ENVIRONMENT).expect("state loads");
    let mut refused = std::collections::HashMap::new();
    let mut flags = Vec::new();
    let mut multivariate = std::collections::HashSet::new();
    for (name, document) in translated {
        match document {
            Ok(document) => {
                let parsed = parse_flag_document(&document)
                    .unwrap_or_else(|error| panic!("{file}: {name}: {error}\n{document:#}"));
                if parsed.flag.kind == crate::rules::document::Kind::Multivariate {
                    multivariate.insert(name.clone());
                }
                let config = parsed.environments.get(ENVIRONMENT).cloned();
                flags.push((parsed.flag, config));
            }
            Err(error) => {
                refused.insert(name, error.to_string());
            }
        }
    }
    let snapshot = Snapshot::compile(flags, Vec::new());
    let cases = suite["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|case| (case, false))
        .chain(
            suite["variantTests"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|case| (case, true)),
        );
    for (case, is_variant) in cases {
        let flag = case["toggleName"].as_str().unwrap();
        let label = format!("{file}: {}", case["description"].as_str().unwrap_or(""));
        if let Some(reason) = refused.get(flag) {
            outcome
                .failed
                .push(format!("{label} (import refused: {reason})"));
            continue;
        }
        let (enabled, variant) = answers(
            &snapshot,
            multivariate.contains(flag),
            flag,
            &case["context"],
        );
        let expected = &case["expectedResult"];
        let ok = if is_variant {
            variant_matches(expected, &variant)
        } else {
            expected.as_bool() == Some(enabled)
        };
        if ok {
            outcome.passed += 1;
        } else {
            outcome.failed.push(format!(
                "{label}: expected {expected}, got {}",
                if is_variant { variant } else { json!(enabled) }
            ));
        }
    }
}

#[test]
fn unleash_client_specification() {
    let Some(dir) = crate::conformance_cases::dir() else {
        eprintln!("conformance suites not found; skipping");
        return;
    };
    let dir = dir.join("unleash-client-specification");
    let index: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("index.json")).unwrap()).unwrap();
    let mut outcome = Outcome {
        passed: 0,
        failed: Vec::new(),
    };
    for file in &index {
        run_file(&dir.join(file), &mut outcome);
    }
    let total = outcome.passed + outcome.failed.len();
    eprintln!(
        "Unleash client specification: {}/{total} assertions pass",
        outcome.passed
    );
    for failure in &outcome.failed {
        eprintln!("  not passed: {failure}");
    }
    assert_eq!(total, 279, "the suite has 279 assertions");
    // Every assertion but the two UTF-8 flag names, which FlagShip keys refuse.
    assert!(
        outcome.passed >= 277,
        "{} of {total} pass, fewer than 277",
        outcome.passed
    );
}
