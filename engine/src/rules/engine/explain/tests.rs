use serde_json::{json, Value};

use super::Decision;
use crate::rules::{Denial, Entitlements, Snapshot};

fn snapshot(flags: &[Value], segments: &[Value]) -> Snapshot {
    crate::rules::tests::snapshot(flags, segments, "p")
}

/// Customers whose key starts with "paid" are entitled to everything.
struct Paid;
impl Entitlements for Paid {
    fn grants(&self, customer: &str, _flag: &str) -> Result<(), Denial> {
        if customer.starts_with("paid") {
            Ok(())
        } else {
            Err(Denial::NotInPlan)
        }
    }
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Random(u64);
impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

fn condition(random: &mut Random) -> Value {
    match random.below(4) {
        0 => json!({"attribute": "country", "op": "in", "values": ["fr", "de"]}),
        1 => json!({"attribute": "age", "op": "gte", "value": random.below(60)}),
        2 => {
            json!({"attribute": "plan", "op": "eq", "value": "pro", "negate": random.below(2) == 0})
        }
        _ => json!({"any": [
            {"attribute": "country", "op": "eq", "value": "us"},
            {"attribute": "age", "op": "lt", "value": 18}]}),
    }
}

fn serve(random: &mut Random, variants: &[&str]) -> Value {
    if random.below(2) == 0 {
        json!({"variant": random.pick(variants)})
    } else {
        let first = random.below(101);
        json!({"rollout": [{"variant": variants[0], "weight": first},
                           {"variant": variants[1], "weight": 100 - first}],
               "bucket_by": [random.pick(&["targeting_key", "company"])]})
    }
}

fn flag(random: &mut Random, index: usize) -> Value {
    let key = format!("f{index}");
    let multivariate = random.below(2) == 0;
    let variants: &[&str] = if multivariate {
        &["a", "b"]
    } else {
        &["on", "off"]
    };
    let rules: Vec<Value> = (0..random.below(4))
        .map(|rule| {
            let mut rule_document =
                json!({"id": format!("r{rule}"), "serve": serve(random, variants)});
            if random.below(3) == 0 {
                rule_document["segment"] = json!("staff");
            }
            let mut conditions: Vec<Value> =
                (0..random.below(3)).map(|_| condition(random)).collect();
            if conditions.is_empty() && rule_document.get("segment").is_none() {
                conditions.push(condition(random));
            }
            if !conditions.is_empty() {
                rule_document["conditions"] = json!(conditions);
            }
            if random.below(4) == 0 {
                rule_document["sample"] = json!({"percent": random.below(101)});
            }
            rule_document
        })
        .collect();
    let mut environment = json!({"enabled": random.below(5) != 0, "rules": rules,
                                 "default": serve(random, variants)});
    if random.below(3) == 0 {
        environment["targets"] = json!({variants[0]: ["u1", "u2"], variants[1]: ["u3"]});
    }
    let mut document = json!({"key": key, "environments": {"p": environment}});
    if multivariate {
        document["kind"] = json!("multivariate");
        document["variants"] = json!({"a": "A", "b": "B"});
        document["off_variant"] = json!("a");
    } else if random.below(4) == 0 {
        document["kind"] = json!("plan");
    }
    if index > 0 && random.below(4) == 0 {
        let parent = format!("f{}", random.below(index as u64));
        document["prerequisites"] = json!([{"flag": parent}]);
    }
    document
}

fn context(random: &mut Random) -> Value {
    let mut context = serde_json::Map::new();
    if random.below(5) != 0 {
        context.insert(
            "targeting_key".into(),
            json!(random.pick(&["u1", "u2", "u3", "u4", "u5"])),
        );
    }
    if random.below(2) == 0 {
        context.insert(
            "country".into(),
            json!(random.pick(&["fr", "de", "us", "jp"])),
        );
    }
    if random.below(2) == 0 {
        context.insert("age".into(), json!(random.below(80)));
    }
    if random.below(2) == 0 {
        context.insert("plan".into(), json!(random.pick(&["pro", "free"])));
    }
    if random.below(2) == 0 {
        context.insert(
            "company".into(),
            json!(random.pick(&["acme", "globex", "initech"])),
        );
    }
    if random.below(2) == 0 {
        context.insert(
            "email".into(),
            json!(random.pick(&["a@staff.test", "b@else.test"])),
        );
    }
    if random.below(2) == 0 {
        context.insert("customer".into(), json!(random.pick(&["paid-1", "free-1"])));
    }
    Value::Object(context)
}

/// On generated flags (rules, segments, samples, rollouts, targets,
/// prerequisites, plan flags) and contexts, the replay reaches the decision
/// the evaluator reached: same reason, variant and rule.
#[test]
fn the_replay_agrees_with_evaluation_on_generated_flags() {
    let staff = json!({"key": "staff", "included": ["u4"], "excluded": ["u1"],
                       "conditions": [{"attribute": "email", "op": "ends_with", "value": "@staff.test"}]});
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let mut compared = 0;
    for _ in 0..200 {
        let flags: Vec<Value> = (0..6).map(|index| flag(&mut random, index)).collect();
        let snapshot = snapshot(&flags, std::slice::from_ref(&staff));
        for _ in 0..25 {
            let context = context(&mut random);
            for document in &flags {
                let key = document["key"].as_str().unwrap();
                let attributes = context
                    .as_object()
                    .map(|map| map as &dyn crate::rules::conditions::Attributes);
                let answer = snapshot.evaluate(key, &context, &Paid);
                let (trace, decision) = snapshot.replay(key, attributes, &Paid);
                let expected = Decision {
                    reason: answer.reason,
                    variant: answer.variant.map(str::to_string),
                    rule: answer.rule.map(str::to_string),
                };
                assert_eq!(
                    decision.as_ref(),
                    Some(&expected),
                    "{document} with {context}: {trace}"
                );
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 30_000);
}

#[test]
fn a_trace_shows_each_step() {
    let staff = json!({"key": "staff", "included": ["u4"],
                       "conditions": [{"attribute": "email", "op": "ends_with", "value": "@staff.test"}]});
    let gate = json!({"key": "gate", "environments": {"p": {"enabled": true}}});
    let checkout = json!({"key": "checkout", "prerequisites": [{"flag": "gate"}],
        "environments": {"p": {"enabled": true,
            "targets": {"off": ["u9"]},
            "rules": [
                {"id": "staff-first", "segment": "staff", "serve": {"variant": "on"}},
                {"id": "adults", "conditions": [{"attribute": "age", "op": "gte", "value": 18}],
                 "serve": {"rollout": [{"variant": "on", "weight": 25}, {"variant": "off", "weight": 75}]}}],
            "default": {"variant": "off"}}}});
    let snapshot = snapshot(&[gate, checkout], &[staff]);
    let context = json!({"targeting_key": "u1", "email": "u1@else.test", "age": 30});
    let (answer, trace) = snapshot.explain("checkout", context.as_object().map(|m| m as _), &Paid);
    let position = crate::bucketing::Profile::default()
        .rollout_position("checkout", "checkout", "u1", 100_000);
    let served = if position < 25_000 { "on" } else { "off" };
    assert_eq!(answer.variant, Some(served));
    assert_eq!(
        trace,
        json!({
            "environment_enabled": true,
            "prerequisites": [{"flag": "gate", "wants": ["on"], "variant": "on", "met": true,
                               "trace": {"environment_enabled": true, "decided_by": "the default"}}],
            "targets": {"targeting_key": "u1", "matched": false},
            "rules": [
                {"id": "staff-first", "segment": {"key": "staff", "member": false, "by": {"conditions": [
                    {"attribute": "email", "op": "ends_with", "value": "u1@else.test", "matched": false}]}},
                 "matched": false},
                {"id": "adults", "conditions": [{"attribute": "age", "op": "gte", "value": 30, "matched": true}],
                 "matched": true,
                 "rollout": {"bucket_by": ["targeting_key"], "subject": "u1", "position": position, "of": 100_000,
                             "bands": [{"variant": "on", "from": 0, "to": 25_000},
                                       {"variant": "off", "from": 25_000, "to": 100_000}],
                             "variant": served}}],
            "decided_by": "rule \"adults\""
        })
    );
}
