//! Why an evaluation answered as it did: the steps of `evaluate_at_depth`
//! replayed with what each one saw (prerequisites, the entitlement, the
//! targets, each rule in order with each condition's attribute value and
//! outcome, segment membership, the bucket and the band it fell in).
//!
//! The answer itself always comes from the evaluation; the replay only
//! explains it. The replay also says which step decided and what that step
//! served, and the tests check on generated flags and contexts that this
//! agrees with the answer, so the explanation cannot drift from the
//! evaluator.

use serde_json::{json, Map, Value};

use super::{
    all_hold, pick_slot, scalar_text, targeting_key, Attributes, CompiledFlag, CompiledRule,
    CompiledServe, Criterion, Denial, Entitlements, Kind, Placement, Reason, Resolution, Snapshot,
    MAX_PREREQUISITE_DEPTH,
};
use crate::rules::operators::op_name;
use crate::rules::placement::BucketBy;

/// What decided an evaluation, as the replay saw it: the reason, the
/// variant served and the rule, to compare with the real answer.
#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    pub reason: Reason,
    pub variant: Option<String>,
    pub rule: Option<String>,
}

impl Snapshot {
    /// The answer `evaluate_attributes` gives, and how it was reached
    /// (`{"steps": [...], "decided_by": ...}`).
    pub fn explain<'a>(
        &'a self,
        flag_key: &'a str,
        attributes: Option<&dyn Attributes>,
        entitlements: &dyn Entitlements,
    ) -> (Resolution<'a>, Value) {
        let resolution = self.evaluate_attributes(flag_key, attributes, entitlements);
        let (trace, _) = self.replay(flag_key, attributes, entitlements);
        (resolution, trace)
    }

    /// The trace and the decision the replay reached.
    pub fn replay(
        &self,
        flag_key: &str,
        attributes: Option<&dyn Attributes>,
        entitlements: &dyn Entitlements,
    ) -> (Value, Option<Decision>) {
        let mut trace = Map::new();
        let decision = self.replay_into(&mut trace, flag_key, attributes, entitlements, 0);
        (Value::Object(trace), decision)
    }

    fn replay_into(
        &self,
        trace: &mut Map<String, Value>,
        flag_key: &str,
        attributes: Option<&dyn Attributes>,
        entitlements: &dyn Entitlements,
        depth: usize,
    ) -> Option<Decision> {
        let decided = |trace: &mut Map<String, Value>, step: &str| {
            trace.insert("decided_by".into(), Value::String(step.into()));
        };
        let Some(flag) = self.flags.get(flag_key) else {
            decided(trace, "the flag is missing or cannot be evaluated");
            return None;
        };
        if flag.archived {
            decided(trace, "the flag is archived");
            return None;
        }
        let Some(attributes) = attributes else {
            decided(trace, "the context is not an object");
            return Some(flag.decision(flag.off, Reason::Error, None));
        };
        let enabled = flag.environment.as_ref().is_some_and(|env| env.enabled);
        trace.insert("environment_enabled".into(), Value::Bool(enabled));
        let Some(environment) = flag.environment.as_ref().filter(|env| env.enabled) else {
            decided(trace, "the environment is off");
            return Some(flag.decision(flag.off, Reason::Disabled, None));
        };

        let mut prerequisites = Vec::new();
        for (prerequisite, wanted) in &flag.prerequisites {
            let mut inner = Map::new();
            let mut variant = None;
            let mut met = false;
            if depth < MAX_PREREQUISITE_DEPTH {
                self.replay_into(
                    &mut inner,
                    prerequisite,
                    Some(attributes),
                    entitlements,
                    depth + 1,
                );
                let outcome =
                    self.evaluate_at_depth(prerequisite, Some(attributes), entitlements, depth + 1);
                variant = outcome.variant.map(str::to_string);
                met = outcome.error.is_none()
                    && outcome
                        .variant
                        .is_some_and(|variant| wanted.iter().any(|w| w == variant));
            }
            prerequisites.push(json!({
                "flag": prerequisite, "wants": wanted, "variant": variant, "met": met,
                "trace": Value::Object(inner),
            }));
            if !met {
                trace.insert("prerequisites".into(), Value::Array(prerequisites));
                decided(
                    trace,
                    &format!("prerequisite \"{prerequisite}\" is not met"),
                );
                return Some(flag.decision(
                    flag.off,
                    Reason::PrerequisiteFailed,
                    Some(prerequisite),
                ));
            }
        }
        if !prerequisites.is_empty() {
            trace.insert("prerequisites".into(), Value::Array(prerequisites));
        }

        if flag.kind == Kind::Plan {
            let customer = attributes.get("customer").and_then(scalar_text);
            let granted = match &customer {
                Some(customer) => entitlements.grants(customer, &flag.key),
                None => Err(Denial::NoCustomer),
            };
            trace.insert(
                "entitlement".into(),
                json!({"customer": customer, "granted": granted.is_ok(),
                       "detail": granted.err().map(Denial::as_str)}),
            );
            if granted.is_err() {
                decided(trace, "the customer is not entitled");
                return Some(flag.decision(flag.off, Reason::NotEntitled, None));
            }
        }

        let targeting_key = targeting_key(attributes);
        if !environment.targets.is_empty() {
            let target = targeting_key
                .as_ref()
                .and_then(|key| environment.targets.get(key.as_ref()));
            trace.insert(
                "targets".into(),
                json!({"targeting_key": targeting_key, "matched": target.is_some()}),
            );
            if let Some(&index) = target {
                decided(trace, "the targeting key is targeted");
                return Some(flag.decision(index, Reason::TargetingMatch, Some("targets")));
            }
        }

        let mut rules = Vec::new();
        let mut decision = None;
        for rule in &environment.rules {
            let (entry, served) =
                self.replay_rule(flag, rule, attributes, targeting_key.as_deref());
            rules.push(entry);
            if let Some((index, reason)) = served {
                decided(trace, &format!("rule \"{}\"", rule.id));
                decision = Some(flag.decision(index, reason, Some(&rule.id)));
                break;
            }
        }
        if !rules.is_empty() {
            trace.insert("rules".into(), Value::Array(rules));
        }
        if decision.is_some() {
            return decision;
        }

        decided(trace, "the default");
        Some(match &environment.default {
            CompiledServe::Variant(index) => {
                let reason = if environment.is_static {
                    Reason::Static
                } else {
                    Reason::Default
                };
                flag.decision(*index, reason, None)
            }
            rollout => {
                let (band, index) =
                    replay_rollout(flag, rollout, attributes, targeting_key.as_deref());
                trace.insert("rollout".into(), band);
                match index {
                    Some(index) => flag.decision(index, Reason::Split, None),
                    None => flag.decision(flag.off, Reason::Default, None),
                }
            }
        })
    }

    /// One rule as evaluation saw it, and what it served if it decided.
    fn replay_rule(
        &self,
        flag: &CompiledFlag,
        rule: &CompiledRule,
        attributes: &dyn Attributes,
        targeting_key: Option<&str>,
    ) -> (Value, Option<(usize, Reason)>) {
        let mut entry = Map::new();
        entry.insert("id".into(), Value::String(rule.id.clone()));
        if let Some(segment) = &rule.segment {
            let (member, by) = self.segment_membership(segment, attributes, targeting_key);
            entry.insert(
                "segment".into(),
                json!({"key": segment, "member": member, "by": by}),
            );
            if !member {
                entry.insert("matched".into(), Value::Bool(false));
                return (Value::Object(entry), None);
            }
        }
        let conditions: Vec<Value> = rule
            .conditions
            .iter()
            .map(|criterion| explain_criterion(criterion, attributes))
            .collect();
        if !conditions.is_empty() {
            entry.insert("conditions".into(), Value::Array(conditions));
        }
        let matched = all_hold(&rule.conditions, attributes);
        entry.insert("matched".into(), Value::Bool(matched));
        if !matched {
            return (Value::Object(entry), None);
        }
        if let Some(sample) = &rule.sample {
            let placed = sample.place(attributes, targeting_key);
            let (subject, position) = match placed {
                Some((subject, position)) => (Some(subject), Some(position)),
                None => (None, None),
            };
            let admitted = position.is_some_and(|position| position < sample.percent);
            entry.insert(
                "sample".into(),
                json!({"subject": subject, "position": position,
                       "admitted_below": sample.percent, "admitted": admitted}),
            );
            if !admitted {
                return (Value::Object(entry), None);
            }
        }
        match &rule.serve {
            CompiledServe::Variant(index) => {
                (Value::Object(entry), Some((*index, Reason::TargetingMatch)))
            }
            rollout => {
                let (band, index) = replay_rollout(flag, rollout, attributes, targeting_key);
                entry.insert("rollout".into(), band);
                (
                    Value::Object(entry),
                    index.map(|index| (index, Reason::Split)),
                )
            }
        }
    }

    /// Whether the subject is in the segment, and what decided it.
    fn segment_membership(
        &self,
        key: &str,
        attributes: &dyn Attributes,
        targeting_key: Option<&str>,
    ) -> (bool, Value) {
        let Some(segment) = self.segments.get(key) else {
            return (false, json!("the segment does not exist"));
        };
        if let Some(subject) = targeting_key {
            if segment.excluded.contains(subject) {
                return (false, json!("excluded by targeting key"));
            }
            if segment.included.contains(subject) {
                return (true, json!("included by targeting key"));
            }
        }
        if segment.conditions.is_empty() {
            return (
                false,
                json!("not listed, and the segment has no conditions"),
            );
        }
        let conditions: Vec<Value> = segment
            .conditions
            .iter()
            .map(|criterion| explain_criterion(criterion, attributes))
            .collect();
        (
            all_hold(&segment.conditions, attributes),
            json!({"conditions": conditions}),
        )
    }
}

impl CompiledFlag {
    fn decision(&self, index: usize, reason: Reason, rule: Option<&str>) -> Decision {
        Decision {
            reason,
            variant: Some(self.variants[index].0.clone()),
            rule: rule.map(str::to_string),
        }
    }
}

/// One criterion with what it read and whether it held.
fn explain_criterion(criterion: &Criterion, attributes: &dyn Attributes) -> Value {
    let matched = criterion.matches(attributes);
    match criterion {
        Criterion::Condition(condition) => {
            let mut entry = json!({
                "attribute": condition.attribute,
                "op": op_name(condition.op),
                "value": condition.lookup(attributes),
                "matched": matched,
            });
            if condition.negate {
                entry["negate"] = Value::Bool(true);
            }
            entry
        }
        Criterion::All(members) | Criterion::Any(members) => json!({
            "group": if matches!(criterion, Criterion::All(_)) { "all" } else { "any" },
            "members": members.iter().map(|member| explain_criterion(member, attributes)).collect::<Vec<_>>(),
            "matched": matched,
        }),
        Criterion::Not(member) => json!({
            "group": "not",
            "members": [explain_criterion(member, attributes)],
            "matched": matched,
        }),
        Criterion::Some(_) => json!({"group": "some", "matched": matched}),
        Criterion::Length(_) => json!({"group": "length", "matched": matched}),
    }
}

/// Where a rollout placed the subject: the value it was bucketed by, the
/// position, and each variant's band (`from` inclusive, `to` exclusive, in
/// the same units as the position).
fn replay_rollout(
    flag: &CompiledFlag,
    serve: &CompiledServe,
    attributes: &dyn Attributes,
    targeting_key: Option<&str>,
) -> (Value, Option<usize>) {
    let CompiledServe::Rollout {
        slots,
        weights,
        total,
        placement,
        unplaced,
    } = serve
    else {
        return (Value::Null, None);
    };
    let served = pick_slot(serve, attributes, targeting_key);
    let mut from = 0u32;
    let bands: Vec<Value> = slots
        .iter()
        .zip(weights)
        .map(|((index, _), weight)| {
            let band =
                json!({"variant": flag.variants[*index].0, "from": from, "to": from + weight});
            from += weight;
            band
        })
        .collect();
    let subject = placement.subject(attributes, targeting_key);
    let position = subject
        .as_ref()
        .map(|subject| placement.rollout_position(subject, *total));
    let mut band = json!({
        "bucket_by": bucket_by_names(placement),
        "subject": subject,
        "position": position,
        "of": total,
        "bands": bands,
        "variant": served.map(|index| flag.variants[index].0.clone()),
    });
    if subject.is_none() {
        band["unplaced"] = json!(unplaced.map(|index| flag.variants[index].0.clone()));
    }
    (band, served)
}

fn bucket_by_names(placement: &Placement) -> Vec<String> {
    placement
        .bucket_by
        .iter()
        .map(|bucket_by| match bucket_by {
            BucketBy::TargetingKey => "targeting_key".to_string(),
            BucketBy::Attribute(name, _) => name.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
