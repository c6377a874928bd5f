use super::*;

fn refusal(feature: Value) -> String {
    match translate(&json!({"features": [feature]}), "production") {
        Err(ImportError::Unsupported(what)) => what,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn what_cannot_be_reproduced_is_refused_by_name() {
    let custom = refusal(json!({"name": "f", "enabled": true,
            "strategies": [{"name": "myStrategy"}]}));
    assert!(custom.contains("strategy \"myStrategy\""), "{custom}");
    let random = refusal(json!({"name": "f", "enabled": true,
            "strategies": [{"name": "gradualRolloutRandom", "parameters": {"percentage": "30"}}]}));
    assert!(random.contains("30% at random"), "{random}");
    let sticky_random = refusal(json!({"name": "f", "enabled": true,
            "strategies": [{"name": "flexibleRollout",
                            "parameters": {"rollout": "50", "stickiness": "random"}}]}));
    assert!(sticky_random.contains("50% at random"), "{sticky_random}");
    let reserved = refusal(json!({"name": "f", "enabled": true, "strategies": [],
            "variants": [{"name": "disabled", "weight": 1}]}));
    assert!(reserved.contains("\"disabled\""), "{reserved}");
    let clash = refusal(json!({"name": "f", "enabled": true,
            "strategies": [{"name": "default", "variants": [{"name": "a", "weight": 1, "payload": {"type": "string", "value": "x"}}]}],
            "variants": [{"name": "a", "weight": 1}]}));
    assert!(clash.contains("two different payloads"), "{clash}");
}

#[test]
fn malformed_state_is_invalid_not_unsupported() {
    assert!(matches!(
        translate(&json!({"features": {}}), "p"),
        Err(ImportError::Invalid(_))
    ));
    assert!(matches!(
        translate(&json!({"features": [{"enabled": true}]}), "p"),
        Err(ImportError::Invalid(_))
    ));
}

#[test]
fn strategies_become_rules_and_a_catch_all_the_default() {
    let documents = translate(
        &json!({"features": [{"name": "f", "enabled": true, "strategies": [
                {"name": "userWithId", "parameters": {"userIds": "a, b"}},
                {"name": "flexibleRollout", "parameters": {"rollout": "30", "groupId": "g"}},
                {"name": "default"},
                {"name": "userWithId", "parameters": {"userIds": "never-reached"}}]}]}),
        "production",
    )
    .unwrap();
    let config = &documents[0]["environments"]["production"];
    assert_eq!(
        config["rules"][0]["conditions"][0],
        json!({"attribute": "userId", "op": "in", "values": ["a", "b"]})
    );
    assert_eq!(
        config["rules"][1]["sample"],
        json!({"percent": 30, "bucket_by": ["userId", "sessionId"], "salt": "g",
                   "bucketing": "unleash"})
    );
    assert_eq!(config["rules"].as_array().unwrap().len(), 2);
    assert_eq!(config["default"], json!({"variant": "on"}));
}
