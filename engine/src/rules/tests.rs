//! Whole-document tests of the engine: parse, compile, evaluate.

use serde_json::{json, Value};

use super::document::parse_flag_document;
use super::engine::Snapshot;
use super::resolution::{ErrorCode, Reason, Resolution};
use super::{parse_segment, Denial, Entitlements, NoEntitlements};

/// The compiled snapshot of flag and segment documents in environment
/// `env` (shared with the explain tests).
pub(super) fn snapshot(flags: &[Value], segments: &[Value], env: &str) -> Snapshot {
    let flags = flags
        .iter()
        .map(|doc| {
            let parsed = parse_flag_document(doc).unwrap();
            let config = parsed.environments.get(env).cloned();
            (parsed.flag, config)
        })
        .collect();
    let segments = segments
        .iter()
        .map(|doc| parse_segment(doc).unwrap())
        .collect();
    Snapshot::compile(flags, segments)
}

fn eval<'a>(snapshot: &'a Snapshot, key: &'a str, context: Value) -> Resolution<'a> {
    snapshot.evaluate(key, &context, &NoEntitlements)
}

fn checkout() -> Value {
    json!({
        "key": "new-checkout",
        "kind": "boolean",
        "environments": {
            "production": {
                "enabled": true,
                "targets": {"on": ["user-1"], "off": ["user-2"]},
                "rules": [
                    {"id": "nordic-enterprise",
                     "conditions": [{"attribute": "country", "op": "in", "values": ["NO", "SE"]},
                                    {"attribute": "plan", "op": "eq", "values": ["enterprise"]}],
                     "serve": {"variant": "on"}},
                    {"id": "beta", "segment": "beta-testers",
                     "serve": {"rollout": {"on": 50, "off": 50}, "bucket_by": "targeting_key"}}
                ],
                "default": {"rollout": {"on": 25, "off": 75}}
            },
            "staging": {"enabled": false}
        }
    })
}

fn beta_segment() -> Value {
    json!({"key": "beta-testers", "included": ["tester-1"], "excluded": ["user-9"],
           "conditions": [{"attribute": "email", "op": "ends_with", "values": ["@beta.io"]}]})
}

#[test]
fn targets_rules_segments_and_default_in_order() {
    let s = snapshot(&[checkout()], &[beta_segment()], "production");
    let on = eval(&s, "new-checkout", json!({"targeting_key": "user-1"}));
    assert_eq!(
        (on.value.clone(), on.reason, on.rule),
        (json!(true), Reason::TargetingMatch, Some("targets"))
    );
    let off = eval(
        &s,
        "new-checkout",
        json!({"targeting_key": "user-2", "country": "NO", "plan": "enterprise"}),
    );
    assert_eq!(
        off.variant,
        Some("off"),
        "individual targets win over rules"
    );

    let rule = eval(
        &s,
        "new-checkout",
        json!({"targeting_key": "u", "country": "SE", "plan": "enterprise"}),
    );
    assert_eq!(rule.reason, Reason::TargetingMatch);
    assert_eq!(rule.rule, Some("nordic-enterprise"));
    assert_eq!(*rule.value, json!(true));

    let half = eval(&s, "new-checkout", json!({"targeting_key": "tester-1"}));
    assert_eq!((half.reason, half.rule), (Reason::Split, Some("beta")));

    let by_condition = eval(
        &s,
        "new-checkout",
        json!({"key": "x", "email": "x@beta.io"}),
    );
    assert_eq!(by_condition.rule, Some("beta"));
    let excluded = eval(
        &s,
        "new-checkout",
        json!({"key": "user-9", "email": "x@beta.io"}),
    );
    assert_eq!(
        (excluded.reason, excluded.rule),
        (Reason::Split, None),
        "excluded falls to the default"
    );
}

#[test]
fn disabled_environment_serves_off() {
    let s = snapshot(&[checkout()], &[beta_segment()], "staging");
    let r = eval(&s, "new-checkout", json!({"targeting_key": "user-1"}));
    assert_eq!(
        (r.value.clone(), r.reason, r.variant),
        (json!(false), Reason::Disabled, Some("off"))
    );
    // An environment the document does not mention is off too.
    let s = snapshot(&[checkout()], &[], "development");
    assert_eq!(eval(&s, "new-checkout", json!({})).reason, Reason::Disabled);
}

#[test]
fn static_and_default_reasons() {
    let flag = json!({"key": "f", "environments": {"p": {"enabled": true}}});
    let s = snapshot(&[flag], &[], "p");
    let r = eval(&s, "f", json!({}));
    assert_eq!((r.value.clone(), r.reason), (json!(true), Reason::Static));
    let flag = json!({"key": "f", "environments": {"p": {"enabled": true,
        "rules": [{"conditions": [{"attribute": "a", "op": "exists"}], "serve": {"variant": "on"}}],
        "default": {"variant": "off"}}}});
    let s = snapshot(&[flag], &[], "p");
    let r = eval(&s, "f", json!({}));
    assert_eq!((r.value.clone(), r.reason), (json!(false), Reason::Default));
    let r = eval(&s, "f", json!({"a": 1}));
    assert_eq!(
        (r.value.clone(), r.reason, r.rule),
        (json!(true), Reason::TargetingMatch, Some("rule-0"))
    );
}

#[test]
fn error_codes() {
    let s = snapshot(
        &[checkout(), json!({"key": "old", "archived": true})],
        &[],
        "production",
    );
    let missing = eval(&s, "nope", json!({}));
    assert_eq!(
        (missing.reason, missing.value.clone()),
        (Reason::Error, Value::Null)
    );
    assert_eq!(missing.error.as_ref().unwrap().0, ErrorCode::FlagNotFound);
    assert_eq!(missing.to_json()["error_code"], json!("FLAG_NOT_FOUND"));
    let archived = eval(&s, "old", json!({}));
    assert_eq!(archived.error.unwrap().0, ErrorCode::FlagNotFound);
    let bad = eval(&s, "new-checkout", json!([1, 2]));
    assert_eq!(
        (bad.reason, bad.value.clone()),
        (Reason::Error, json!(false))
    );
    assert_eq!(bad.error.unwrap().0, ErrorCode::InvalidContext);
    assert_eq!(s.live_flag_keys().collect::<Vec<_>>(), vec!["new-checkout"]);
}

#[test]
fn result_shape() {
    let s = snapshot(&[checkout()], &[], "production");
    let r = eval(&s, "new-checkout", json!({"targeting_key": "user-1"})).to_json();
    assert_eq!(
        r,
        json!({"key": "new-checkout", "value": true, "variant": "on", "reason": "TARGETING_MATCH", "rule": "targets"})
    );
    let r = eval(&s, "new-checkout", json!({})).to_json();
    assert!(r.get("rule").is_none() && r.get("error_code").is_none());
}

#[test]
fn prerequisites_gate_the_flag() {
    let payments = json!({"key": "payments-v2", "environments": {"p": {"enabled": true,
        "rules": [{"conditions": [{"attribute": "country", "op": "eq", "values": ["NO"]}], "serve": {"variant": "on"}}],
        "default": {"variant": "off"}}}});
    let checkout = json!({"key": "checkout", "prerequisites": [{"flag": "payments-v2", "variant": "on"}],
        "environments": {"p": {"enabled": true}}});
    let s = snapshot(&[payments, checkout], &[], "p");
    let r = eval(&s, "checkout", json!({"country": "NO"}));
    assert_eq!((r.value.clone(), r.reason), (json!(true), Reason::Static));
    let r = eval(&s, "checkout", json!({"country": "SE"}));
    assert_eq!(
        (r.value.clone(), r.reason, r.rule),
        (
            json!(false),
            Reason::PrerequisiteFailed,
            Some("payments-v2")
        )
    );
    let orphan = json!({"key": "orphan", "prerequisites": [{"flag": "gone"}], "environments": {"p": {"enabled": true}}});
    let s = snapshot(&[orphan], &[], "p");
    assert_eq!(
        eval(&s, "orphan", json!({})).reason,
        Reason::PrerequisiteFailed
    );
}

#[test]
fn a_cycle_that_slipped_past_writes_does_not_recurse_forever() {
    let a = json!({"key": "a", "prerequisites": [{"flag": "b"}], "environments": {"p": {"enabled": true}}});
    let b = json!({"key": "b", "prerequisites": [{"flag": "a"}], "environments": {"p": {"enabled": true}}});
    let s = snapshot(&[a, b], &[], "p");
    assert_eq!(eval(&s, "a", json!({})).reason, Reason::PrerequisiteFailed);
}

struct Grants(&'static str);
impl Entitlements for Grants {
    fn grants(&self, customer: &str, _flag: &str) -> Result<(), Denial> {
        if customer == self.0 {
            Ok(())
        } else {
            Err(Denial::NotInPlan)
        }
    }
}

#[test]
fn plan_flags_need_an_entitlement() {
    let reports =
        json!({"key": "reports", "kind": "plan", "environments": {"p": {"enabled": true}}});
    let s = snapshot(&[reports], &[], "p");
    let r = eval(&s, "reports", json!({"customer": "acme"}));
    assert_eq!(
        (r.value.clone(), r.reason),
        (json!(false), Reason::NotEntitled)
    );
    let r = s.evaluate("reports", &json!({"customer": "acme"}), &Grants("acme"));
    assert_eq!((r.value.clone(), r.reason), (json!(true), Reason::Static));
    let r = s.evaluate("reports", &json!({}), &Grants("acme"));
    assert_eq!(
        r.to_json(),
        json!({"key": "reports", "value": false, "variant": "off", "reason": "NOT_ENTITLED",
               "detail": "the context names no customer (attribute \"customer\")"})
    );
    let r = s.evaluate("reports", &json!({"customer": "globex"}), &Grants("acme"));
    assert_eq!(
        (r.reason, r.detail),
        (Reason::NotEntitled, Some(Denial::NotInPlan))
    );
}

fn rollout_flag(weights: Value) -> Snapshot {
    let flag = json!({"key": "exp", "kind": "multivariate",
        "variants": {"a": "A", "b": "B", "c": "C"}, "off_variant": "a",
        "environments": {"p": {"enabled": true, "default": {"rollout": weights}}}});
    snapshot(&[flag], &[], "p")
}

fn share(s: &Snapshot, variant: &str) -> f64 {
    let hits = (0..20_000)
        .filter(|i| {
            eval(s, "exp", json!({"targeting_key": format!("user-{i}")})).variant == Some(variant)
        })
        .count();
    hits as f64 / 20_000.0
}

#[test]
fn rollout_distribution_25_percent() {
    let flag = json!({"key": "exp", "environments": {"p": {"enabled": true,
        "default": {"rollout": {"on": 25, "off": 75}}}}});
    let s = snapshot(&[flag], &[], "p");
    let on = (0..20_000)
        .filter(|i| eval(&s, "exp", json!({"targeting_key": format!("user-{i}")})).is_enabled())
        .count() as f64
        / 20_000.0;
    assert!((on - 0.25).abs() <= 0.01, "on share {on}");
}

#[test]
fn rollout_distribution_20_30_50() {
    let s = rollout_flag(json!({"a": 20, "b": 30, "c": 50}));
    for (variant, expected) in [("a", 0.20), ("b", 0.30), ("c", 0.50)] {
        let got = share(&s, variant);
        assert!((got - expected).abs() <= 0.01, "{variant}: {got}");
    }
}

#[test]
fn raising_a_rollout_keeps_everyone_who_was_in() {
    let at = |percent: f64| {
        let flag = json!({"key": "exp", "environments": {"p": {"enabled": true,
            "default": {"rollout": {"on": percent, "off": 100.0 - percent}}}}});
        snapshot(&[flag], &[], "p")
    };
    let (low, high) = (at(25.0), at(40.0));
    let mut newly_in = 0;
    for i in 0..20_000 {
        let context = json!({"targeting_key": format!("user-{i}")});
        let before = eval(&low, "exp", context.clone()).is_enabled();
        let after = eval(&high, "exp", context).is_enabled();
        assert!(!before || after, "user-{i} dropped out");
        newly_in += usize::from(!before && after);
    }
    assert!(newly_in > 2_500, "only {newly_in} joined");
}

#[test]
fn buckets_are_sticky_and_follow_bucket_by_and_salt() {
    let s = rollout_flag(json!({"a": 33.333, "b": 33.333, "c": 33.334}));
    let first = eval(&s, "exp", json!({"targeting_key": "user-7"}));
    for _ in 0..10 {
        assert_eq!(
            eval(&s, "exp", json!({"targeting_key": "user-7", "other": 1})).variant,
            first.variant
        );
    }
    let by_org = json!({"key": "org-exp", "environments": {"p": {"enabled": true,
        "default": {"rollout": {"on": 50, "off": 50}, "bucket_by": "org.id", "salt": "s1"}}}});
    let s = snapshot(&[by_org], &[], "p");
    let variants: std::collections::HashSet<_> = (0..50)
        .map(|i| {
            eval(
                &s,
                "org-exp",
                json!({"targeting_key": format!("u{i}"), "org": {"id": "o-1"}}),
            )
            .variant
        })
        .collect();
    assert_eq!(variants.len(), 1, "one organization, one bucket");
    let expected_bucket = crate::bucketing::bucket("s1", "o-1");
    let expected = if expected_bucket < 50_000 {
        "off"
    } else {
        "on"
    };
    assert_eq!(variants.into_iter().next().unwrap(), Some(expected));
    // Without the attribute, the default rollout serves the off variant.
    let r = eval(&s, "org-exp", json!({"targeting_key": "u"}));
    assert_eq!((r.variant, r.reason), (Some("off"), Reason::Default));
}

#[test]
fn rollout_layout_uses_variant_name_order() {
    // "off" sorts before "on": buckets [0, 75 000) are off, the rest on.
    let flag = json!({"key": "exp", "environments": {"p": {"enabled": true,
        "default": {"rollout": {"on": 25, "off": 75}}}}});
    let s = snapshot(&[flag], &[], "p");
    for i in 0..500 {
        let subject = format!("user-{i}");
        let bucket = crate::bucketing::bucket("exp", &subject);
        let r = eval(&s, "exp", json!({"targeting_key": subject}));
        assert_eq!(r.is_enabled(), bucket >= 75_000);
    }
}

fn refusal(doc: Value) -> String {
    parse_flag_document(&doc).unwrap_err().to_string()
}

#[test]
fn validation_names_the_field() {
    let e = refusal(
        json!({"key": "f", "environments": {"production": {"rules": [
        {"conditions": [{"attribute": "a", "op": "eq", "values": ["x"]}, {"attribute": "b", "op": "lolwut", "values": []}],
         "serve": {"variant": "on"}}]}}}),
    );
    assert!(
        e.starts_with(
            "environments.production.rules[0].conditions[1].op: unknown operator \"lolwut\""
        ),
        "{e}"
    );

    let e = refusal(
        json!({"key": "f", "environments": {"p": {"default": {"rollout": {"on": 30, "off": 60}}}}}),
    );
    assert_eq!(
        e,
        "environments.p.default.rollout: weights sum to 90%, not 100%"
    );

    let e = refusal(json!({"key": "f", "environments": {"p": {"default": {"variant": "maybe"}}}}));
    assert!(
        e.starts_with("environments.p.default.variant: unknown variant \"maybe\""),
        "{e}"
    );

    let e = refusal(json!({"key": "f", "environments": {"p": {"targets": {"purple": ["u"]}}}}));
    assert!(
        e.starts_with("environments.p.targets.purple: unknown variant"),
        "{e}"
    );

    assert!(refusal(json!({"kind": "boolean"})).starts_with("key: is required"));
    assert!(refusal(json!({"key": "has space"})).starts_with("key:"));
    assert!(refusal(json!({"key": "f", "kind": "ternary"})).starts_with("kind: unknown kind"));
    assert!(refusal(json!({"key": "f", "colour": "red"})).starts_with("colour: unknown field"));
    assert!(
        refusal(json!({"key": "f", "variants": {"on": "yes", "off": "no"}}))
            .starts_with("variants.off:")
    );
    assert!(
        refusal(json!({"key": "f", "kind": "multivariate"})).starts_with("variants: is required")
    );
    assert!(
        refusal(json!({"key": "f", "kind": "multivariate", "variants": {"a": 1}}))
            .starts_with("off_variant:")
    );
    assert!(
        refusal(json!({"key": "f", "prerequisites": [{"flag": "f"}]})).contains("own prerequisite")
    );
    assert!(refusal(json!({"key": "f", "environments": {"p": {"default": {"rollout": {"on": 12.3456, "off": 87.6544}}}}}))
        .contains("at most three decimals"));
    assert!(refusal(
        json!({"key": "f", "environments": {"p": {"rules": [{"serve": {"variant": "on"}}]}}})
    )
    .contains("needs a segment, a sample or at least one condition"));
    assert!(refusal(
        json!({"key": "f", "environments": {"p": {"targets": {"on": ["u"], "off": ["u"]}}}})
    )
    .contains("also targeted"));
    assert!(refusal(json!({"key": "f", "environments": {"p": {"rules": [
        {"id": "r", "conditions": [{"attribute": "a", "op": "exists"}], "serve": {"variant": "on"}},
        {"id": "r", "conditions": [{"attribute": "a", "op": "exists"}], "serve": {"variant": "on"}}]}}}))
        .contains("duplicate rule id"));
    assert!(refusal(json!({"key": "f", "environments": {"p": {"default": {"variant": "on", "rollout": {"on": 100}}}}}))
        .contains("not both"));
    assert!(refusal(json!([1])).contains("must be a JSON object"));
}

#[test]
fn weights_with_three_decimals_are_exact() {
    let flag = json!({"key": "f", "environments": {"p": {"default": {"rollout": {"on": 33.333, "off": 66.667}}}}});
    assert!(parse_flag_document(&flag).is_ok());
}

fn one_env(flag: Value) -> Snapshot {
    snapshot(&[flag], &[], "p")
}

#[test]
fn samples_gate_rules_and_let_the_rest_fall_through() {
    let flag = json!({"key": "exp", "environments": {"p": {"enabled": true,
        "rules": [{"id": "half", "sample": {"percent": 50, "bucket_by": ["userId", "sessionId"]},
                   "serve": {"variant": "on"}}],
        "default": {"variant": "off"}}}});
    let s = one_env(flag);
    let mut admitted = 0;
    for i in 0..10_000 {
        let r = eval(&s, "exp", json!({"userId": format!("u{i}")}));
        let inside = crate::bucketing::bucket("exp", &format!("u{i}")) < 50_000;
        assert_eq!(r.variant == Some("on"), inside, "u{i}");
        admitted += usize::from(inside);
    }
    assert!((4_800..5_200).contains(&admitted), "{admitted}");
    // The second attribute places subjects without the first; a context
    // with neither is outside the sample.
    let by_session = eval(&s, "exp", json!({"sessionId": "s1"})).variant;
    let expected = crate::bucketing::bucket("exp", "s1") < 50_000;
    assert_eq!(by_session == Some("on"), expected);
    assert_eq!(eval(&s, "exp", json!({})).variant, Some("off"));
}

#[test]
fn unleash_profile_reproduces_unleash_rollouts_and_variants() {
    // Unleash's client specification: 25% of group "Feature.flexible" by
    // userId admits the users whose murmur3 normalized value is <= 25.
    let flag = json!({"key": "f", "kind": "multivariate",
        "variants": {"blue": 1, "red": 2, "disabled": false}, "off_variant": "disabled",
        "environments": {"p": {"enabled": true,
        "rules": [{"id": "s0", "sample": {"percent": 25, "bucket_by": "userId",
                   "salt": "Feature.flexible", "bucketing": "unleash"},
                   "serve": {"rollout": [{"variant": "red", "weight": 1}, {"variant": "blue", "weight": 2}],
                             "bucketing": "unleash", "bucket_by": "userId", "salt": "f"}}]}}});
    let s = one_env(flag);
    for i in 0..2_000 {
        let user = i.to_string();
        let r = eval(&s, "f", json!({"userId": user}));
        let inside = crate::profiles::unleash_normalized(&user, "Feature.flexible", 100, 0) <= 25;
        if !inside {
            assert_eq!(r.variant, Some("disabled"));
            continue;
        }
        // Variants are laid out as written: red takes target 1, blue 2..3.
        let target = crate::profiles::unleash_variant_target(&user, "f", 3);
        let expected = if target <= 1 { "red" } else { "blue" };
        assert_eq!(r.variant, Some(expected), "user {user}");
    }
}

#[test]
fn other_profiles_place_subjects_with_their_vendor_hash() {
    for (profile, expected_position) in [
        (
            "growthbook",
            (crate::profiles::growthbook_hash("seed", "u1", 2).unwrap() * 100_000.0).round(),
        ),
        (
            "growthbook-v1",
            (crate::profiles::growthbook_hash("seed", "u1", 1).unwrap() * 100_000.0).round(),
        ),
        (
            "launchdarkly",
            (crate::profiles::launchdarkly_bucket("exp", "seed", "u1") * 100_000.0).floor(),
        ),
    ] {
        let flag = json!({"key": "exp", "environments": {"p": {"enabled": true,
            "default": {"rollout": [{"variant": "on", "weight": 40}, {"variant": "off", "weight": 60}],
                        "bucketing": profile, "salt": "seed"}}}});
        let s = one_env(flag);
        let r = eval(&s, "exp", json!({"targeting_key": "u1"}));
        let expected = if expected_position < 40_000.0 {
            "on"
        } else {
            "off"
        };
        assert_eq!(r.variant, Some(expected), "{profile}");
    }
}

#[test]
fn unplaced_subjects_and_if_missing() {
    let flag = json!({"key": "exp", "environments": {"p": {"enabled": true,
        "rules": [{"conditions": [{"attribute": "country", "op": "not_in", "values": ["NO"],
                                   "if_missing": true}],
                   "serve": {"rollout": {"on": 50, "off": 50}, "bucket_by": "userId",
                             "unplaced": "on"}}],
        "default": {"variant": "off"}}}});
    let s = one_env(flag);
    // No country: the condition holds; no userId: the unplaced variant.
    let r = eval(&s, "exp", json!({}));
    assert_eq!((r.variant, r.reason), (Some("on"), Reason::Split));
    assert_eq!(
        eval(&s, "exp", json!({"country": "NO"})).variant,
        Some("off")
    );
}

#[test]
fn prerequisites_may_accept_several_variants() {
    let parent = json!({"key": "parent", "kind": "multivariate",
        "variants": {"a": 1, "b": 2, "c": 3}, "off_variant": "c",
        "environments": {"p": {"enabled": true,
            "rules": [{"conditions": [{"attribute": "v", "op": "eq", "values": ["b"]}],
                       "serve": {"variant": "b"}}],
            "default": {"variant": "a"}}}});
    let child = json!({"key": "child", "prerequisites": [{"flag": "parent", "variants": ["a", "b"]}],
        "environments": {"p": {"enabled": true}}});
    let s = snapshot(&[parent.clone(), child], &[], "p");
    assert!(eval(&s, "child", json!({})).is_enabled());
    assert!(eval(&s, "child", json!({"v": "b"})).is_enabled());
    let picky = json!({"key": "child", "prerequisites": [{"flag": "parent", "variants": ["c"]}],
        "environments": {"p": {"enabled": true}}});
    let s = snapshot(&[parent, picky], &[], "p");
    let r = eval(&s, "child", json!({}));
    assert_eq!(r.reason, Reason::PrerequisiteFailed);
}

#[test]
fn new_fields_are_validated() {
    let refusal = |doc: Value| parse_flag_document(&doc).unwrap_err().to_string();
    let env = |rules: Value| json!({"key": "f", "environments": {"p": {"enabled": true, "rules": rules}}});
    assert!(refusal(env(
        json!([{"sample": {"percent": 101}, "serve": {"variant": "on"}}])
    ))
    .starts_with("environments.p.rules[0].sample.percent:"));
    assert!(refusal(env(
        json!([{"sample": {"percent": 12.5, "bucketing": "unleash"}, "serve": {"variant": "on"}}])
    ))
    .contains("whole percentage"));
    assert!(refusal(env(
        json!([{"sample": {"percent": 10, "bucketing": "fnv"}, "serve": {"variant": "on"}}])
    ))
    .contains("unknown bucketing profile \"fnv\""));
    assert!(refusal(json!({"key": "f", "environments": {"p": {"default":
        {"rollout": [{"variant": "on", "weight": 0}], "bucketing": "unleash"}}}}))
    .contains("weights sum to 0"));
    assert!(refusal(json!({"key": "f", "environments": {"p": {"default":
        {"rollout": [{"variant": "on", "weight": 60}, {"variant": "on", "weight": 40}]}}}}))
    .contains("variant listed twice"));
    assert!(refusal(json!({"key": "f", "environments": {"p": {"default":
        {"rollout": {"on": 50, "off": 50}, "unplaced": "maybe"}}}}))
    .contains("unknown variant \"maybe\""));
    assert!(refusal(env(
        json!([{"conditions": [{"attribute": "a", "op": "eq", "values": ["x"],
        "if_missing": "now"}], "serve": {"variant": "on"}}])
    ))
    .contains("if_missing"));
    assert!(
        refusal(json!({"key": "f", "prerequisites": [{"flag": "g", "variants": []}]}))
            .contains("needs at least one variant")
    );
}

#[test]
fn a_flag_level_profile_applies_to_rollouts_and_samples_naming_none() {
    let flag = json!({"key": "f", "bucketing": "unleash", "environments": {"p": {"enabled": true,
        "rules": [{"id": "half", "sample": {"percent": 50, "bucket_by": "userId"},
                   "serve": {"rollout": [{"variant": "on", "weight": 1}, {"variant": "off", "weight": 2}],
                             "bucket_by": "userId"}}],
        "default": {"variant": "off"}}}});
    let s = one_env(flag);
    for i in 0..500 {
        let user = i.to_string();
        let inside = crate::profiles::unleash_normalized(&user, "f", 100, 0) <= 50;
        let on = crate::profiles::unleash_variant_target(&user, "f", 3) <= 1;
        let expected = if inside && on { "on" } else { "off" };
        assert_eq!(
            eval(&s, "f", json!({"userId": user})).variant,
            Some(expected),
            "{user}"
        );
    }
    // Integer weights are Unleash's; percentages must still sum to 100
    // under a percentage profile named by the rollout itself.
    let refusal = parse_flag_document(&json!({"key": "f", "bucketing": "unleash",
        "environments": {"p": {"default": {"rollout": {"on": 12.5, "off": 87.5}}}}}))
    .unwrap_err()
    .to_string();
    assert!(refusal.contains("whole number"), "{refusal}");
    assert!(
        parse_flag_document(&json!({"key": "f", "bucketing": "unleash",
        "environments": {"p": {"default": {"rollout": {"on": 12.5, "off": 87.5},
                                           "bucketing": "xxh3"}}}}))
        .is_ok()
    );
    let unknown = parse_flag_document(&json!({"key": "f", "bucketing": "md5"}))
        .unwrap_err()
        .to_string();
    assert!(
        unknown.starts_with("bucketing: unknown bucketing profile"),
        "{unknown}"
    );
}

#[test]
fn condition_groups_cannot_nest_without_bound() {
    let mut deep = json!({"attribute": "a", "op": "exists"});
    for _ in 0..60 {
        deep = json!({"not": deep});
    }
    let refusal = parse_flag_document(&json!({"key": "f", "environments": {"p": {
        "rules": [{"conditions": [deep], "serve": {"variant": "on"}}]}}}))
    .unwrap_err()
    .to_string();
    assert!(
        refusal.contains("nests deeper than 48 levels of JSON"),
        "{refusal}"
    );
    let mut fine = json!({"attribute": "a", "op": "exists"});
    for _ in 0..10 {
        fine = json!({"any": [fine]});
    }
    assert!(
        parse_flag_document(&json!({"key": "f", "environments": {"p": {
        "rules": [{"conditions": [fine], "serve": {"variant": "on"}}]}}}))
        .is_ok()
    );
}
