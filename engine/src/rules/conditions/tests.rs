use super::*;
use serde_json::json;

fn condition(op: &str, values: Value) -> Condition {
    condition_with(op, values, false, false)
}

fn condition_with(op: &str, values: Value, negate: bool, ci: bool) -> Condition {
    let values = values.as_array().cloned().unwrap_or_default();
    Condition::compile(
        "attr".into(),
        Operator::parse(op).unwrap(),
        &values,
        negate,
        ci,
    )
    .unwrap()
}

fn holds(condition: &Condition, attribute: Value) -> bool {
    let context = json!({ "attr": attribute });
    condition.matches(context.as_object().unwrap())
}

#[test]
fn names_line_up_with_variants() {
    for name in Operator::NAMES {
        assert_eq!(op_name(Operator::parse(name).unwrap()), *name);
    }
}

#[test]
fn equality_operators() {
    assert!(holds(&condition("eq", json!(["NO"])), json!("NO")));
    assert!(!holds(&condition("eq", json!(["NO"])), json!("no")));
    assert!(holds(
        &condition_with("eq", json!(["NO"]), false, true),
        json!("no")
    ));
    assert!(holds(&condition("neq", json!(["NO"])), json!("SE")));
    assert!(holds(&condition("in", json!(["NO", "SE"])), json!("SE")));
    assert!(!holds(&condition("in", json!(["NO", "SE"])), json!("DK")));
    assert!(holds(
        &condition("not_in", json!(["NO", "SE"])),
        json!("DK")
    ));
    assert!(holds(&condition("eq", json!([42])), json!(42.0)));
    assert!(holds(&condition("eq", json!([42])), json!("42")));
    assert!(holds(&condition("eq", json!([true])), json!(true)));
    assert!(!holds(&condition("eq", json!([true])), json!("yes")));
    assert!(holds(&condition("eq", json!(["true"])), json!(true)));
}

#[test]
fn string_operators() {
    assert!(holds(
        &condition("contains", json!(["@acme"])),
        json!("bob@acme.com")
    ));
    assert!(!holds(
        &condition("contains", json!(["@acme"])),
        json!("bob@ACME.com")
    ));
    assert!(holds(
        &condition_with("contains", json!(["@acme"]), false, true),
        json!("bob@ACME.com")
    ));
    assert!(holds(
        &condition("starts_with", json!(["bo"])),
        json!("bob")
    ));
    assert!(holds(
        &condition("ends_with", json!([".com", ".no"])),
        json!("x.no")
    ));
    assert!(!holds(
        &condition("ends_with", json!([".com"])),
        json!("x.org")
    ));
}

#[test]
fn regex_operator() {
    let pattern = condition("matches", json!(["^user-[0-9]+$"]));
    assert!(holds(&pattern, json!("user-12")));
    assert!(!holds(&pattern, json!("user-x")));
    assert!(!holds(&pattern, json!(12)));
    assert!(holds(
        &condition_with("matches", json!(["^ADMIN"]), false, true),
        json!("admin-1")
    ));
    let error =
        Condition::compile("a".into(), Operator::Matches, &[json!("(")], false, false).unwrap_err();
    assert!(error.contains("invalid regular expression"), "{error}");
}

#[test]
fn numeric_operators() {
    assert!(holds(&condition("gt", json!([10])), json!(11)));
    assert!(!holds(&condition("gt", json!([10])), json!(10)));
    assert!(holds(&condition("gte", json!([10])), json!(10)));
    assert!(holds(&condition("lt", json!([10])), json!(9.5)));
    assert!(holds(&condition("lte", json!([10])), json!("10")));
    assert!(!holds(&condition("lt", json!([10])), json!("ten")));
    assert!(!holds(&condition("lt", json!([10])), json!(true)));
    assert!(Condition::compile("a".into(), Operator::Gt, &[json!(true)], false, false).is_err());
    // A string operand compares strings by code point, numbers numerically.
    assert!(holds(
        &condition("gt", json!(["alphabet"])),
        json!("always")
    ));
    assert!(!holds(&condition("lt", json!(["zebra"])), json!("zebra")));
    assert!(!holds(&condition("lt", json!(["10"])), json!("8")));
    assert!(holds(&condition("lt", json!(["10"])), json!(8)));
    assert!(!holds(&condition("gt", json!(["abc"])), json!(8)));
    assert!(Condition::compile(
        "a".into(),
        Operator::Gt,
        &[json!(1), json!(2)],
        false,
        false
    )
    .is_err());
}

#[test]
fn timestamp_operators() {
    let before = condition("before", json!(["2025-01-01T00:00:00Z"]));
    assert!(holds(&before, json!("2024-12-31T23:59:59Z")));
    assert!(!holds(&before, json!("2025-01-01T00:00:00Z")));
    assert!(holds(&before, json!("2025-01-01T01:00:00+02:00")));
    assert!(holds(&before, json!(1_700_000_000)));
    assert!(!holds(&before, json!("yesterday")));
    let after = condition("after", json!([1_700_000_000]));
    assert!(holds(&after, json!("2024-01-01T00:00:00Z")));
    assert!(
        Condition::compile("a".into(), Operator::After, &[json!("soon")], false, false).is_err()
    );
}

#[test]
fn semver_operators() {
    assert!(holds(
        &condition("semver_eq", json!(["1.2.0"])),
        json!("1.2")
    ));
    assert!(holds(
        &condition("semver_eq", json!(["1.2.3"])),
        json!("v1.2.3")
    ));
    assert!(holds(
        &condition("semver_gt", json!(["1.2.3"])),
        json!("1.10.0")
    ));
    assert!(!holds(
        &condition("semver_gt", json!(["1.2.3"])),
        json!("1.2.3-beta.1")
    ));
    assert!(holds(
        &condition("semver_lt", json!(["1.2.3"])),
        json!("1.2.3-beta.1")
    ));
    assert!(holds(
        &condition("semver_eq", json!(["1.2.3"])),
        json!("1.2.3+build.7")
    ));
    assert!(!holds(
        &condition("semver_lt", json!(["2.0.0"])),
        json!("not.a.version")
    ));
    assert!(
        Condition::compile("a".into(), Operator::SemverEq, &[json!("x")], false, false).is_err()
    );
}

#[test]
fn inclusive_semver_operators() {
    assert!(holds(
        &condition("semver_gte", json!(["1.2.3"])),
        json!("1.2.3")
    ));
    assert!(holds(
        &condition("semver_gte", json!(["1.2.3"])),
        json!("1.3.0")
    ));
    assert!(!holds(
        &condition("semver_gte", json!(["1.2.3"])),
        json!("1.2.3-rc.1")
    ));
    assert!(holds(
        &condition("semver_lte", json!(["1.2.3"])),
        json!("1.2.3")
    ));
    assert!(!holds(
        &condition("semver_lte", json!(["1.2.3"])),
        json!("1.2.4")
    ));
}

#[test]
fn structured_values_compare_whole() {
    let pair = condition("eq", json!([["hello", "world"]]));
    assert!(holds(&pair, json!(["hello", "world"])));
    assert!(!holds(&pair, json!(["world", "hello"])));
    assert!(!holds(&pair, json!("hello")));
    let object = condition("eq", json!([{"a": 1}]));
    assert!(holds(&object, json!({"a": 1})));
    assert!(!holds(&object, json!({"a": 1, "b": 2})));
}

#[test]
fn type_operator() {
    let typed = |types: Value, attribute: Value| holds(&condition("type", types), attribute);
    assert!(typed(json!(["string"]), json!("a")));
    assert!(typed(json!(["array"]), json!([1, 2])));
    assert!(!typed(json!(["number"]), json!([1, 2])));
    assert!(typed(json!(["object", "null"]), json!({"a": 1})));
    assert!(typed(json!(["null"]), Value::Null));
    assert!(condition("type", json!(["null"])).matches(json!({}).as_object().unwrap()));
    assert!(
        Condition::compile("a".into(), Operator::Type, &[json!("date")], false, false).is_err()
    );
}

#[test]
fn cidr_operator() {
    let networks = condition(
        "in_cidr",
        json!(["10.0.0.0/8", "192.168.1.7", "2001:db8::/32"]),
    );
    assert!(holds(&networks, json!("10.20.30.40")));
    assert!(holds(&networks, json!("192.168.1.7")));
    assert!(!holds(&networks, json!("192.168.1.8")));
    assert!(holds(&networks, json!("2001:db8:0:1::42")));
    assert!(!holds(&networks, json!("2001:db9::1")));
    assert!(!holds(&networks, json!("not an address")));
    assert!(Condition::compile(
        "a".into(),
        Operator::InCidr,
        &[json!("10.0.0/8x")],
        false,
        false
    )
    .is_err());
}

#[test]
fn if_missing_overrides_the_missing_answer() {
    let empty = json!({});
    let context = empty.as_object().unwrap();
    let not_in = condition("not_in", json!(["x"]))
        .with_if_missing(Some(IfMissing::Outcome(true)))
        .unwrap();
    assert!(not_in.matches(context));
    let after_past = condition("after", json!(["2000-01-01T00:00:00Z"]))
        .with_if_missing(Some(IfMissing::Now))
        .unwrap();
    assert!(after_past.matches(context), "now is after 2000");
    let before_past = condition("before", json!(["2000-01-01T00:00:00Z"]))
        .with_if_missing(Some(IfMissing::Now))
        .unwrap();
    assert!(!before_past.matches(context));
    assert!(condition("eq", json!(["x"]))
        .with_if_missing(Some(IfMissing::Now))
        .is_err());
}

#[test]
fn exists_and_missing_attributes() {
    let exists = condition("exists", json!([]));
    assert!(holds(&exists, json!("anything")));
    assert!(!holds(&exists, Value::Null));
    let not_exists = condition_with("exists", json!([]), true, false);
    assert!(not_exists.matches(json!({}).as_object().unwrap()));
    // A missing attribute matches nothing, even negated.
    let negated = condition_with("eq", json!(["x"]), true, false);
    assert!(!negated.matches(json!({}).as_object().unwrap()));
    assert!(!condition("neq", json!(["x"])).matches(json!({}).as_object().unwrap()));
    assert!(negated.matches(json!({"attr": "y"}).as_object().unwrap()));
}

#[test]
fn negate_inverts() {
    assert!(!holds(
        &condition_with("in", json!(["a"]), true, false),
        json!("a")
    ));
    assert!(holds(
        &condition_with("in", json!(["a"]), true, false),
        json!("b")
    ));
}

#[test]
fn array_attributes_match_any_element() {
    assert!(holds(
        &condition("in", json!(["beta"])),
        json!(["alpha", "beta"])
    ));
    assert!(!holds(
        &condition("in", json!(["gamma"])),
        json!(["alpha", "beta"])
    ));
}

#[test]
fn dotted_paths_and_flat_keys() {
    let c = Condition::compile(
        "user.email".into(),
        Operator::EndsWith,
        &[json!("@acme.com")],
        false,
        false,
    )
    .unwrap();
    assert!(c.matches(
        json!({"user": {"email": "a@acme.com"}})
            .as_object()
            .unwrap()
    ));
    assert!(c.matches(json!({"user.email": "a@acme.com"}).as_object().unwrap()));
    assert!(!c.matches(json!({"user": "a@acme.com"}).as_object().unwrap()));
}

#[test]
fn wrong_value_types_are_refused() {
    assert!(Condition::compile("a".into(), Operator::In, &[], false, false).is_err());
    assert!(Condition::compile("a".into(), Operator::In, &[Value::Null], false, false).is_err());
    assert!(Condition::compile("a".into(), Operator::Eq, &[json!({"x": 1})], false, true).is_err());
    assert!(Condition::compile("a".into(), Operator::Contains, &[json!(1)], false, false).is_err());
    assert!(Condition::compile("a".into(), Operator::Exists, &[json!(1)], false, false).is_err());
    assert!(Condition::compile("a".into(), Operator::Gt, &[json!(1)], false, true).is_err());
}
