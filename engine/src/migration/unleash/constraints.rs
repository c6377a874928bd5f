//! Unleash constraints and stickiness as FlagShip conditions and bucketing
//! attributes: one constraint becomes one condition, or a constant when
//! Unleash itself evaluates it to one.

use serde_json::{json, Value};

use super::{array, text, ImportError, Result, STANDARD_FIELDS};
use crate::rules::conditions::parse_network;

/// The attribute of a FlagShip context holding an Unleash context field.
pub(super) fn attribute_for(context_name: &str) -> String {
    if STANDARD_FIELDS.contains(&context_name) {
        context_name.to_string()
    } else {
        format!("properties.{context_name}")
    }
}

/// Where Unleash looks for a stickiness value: the field itself, then
/// `properties` (its `resolveContextValue`).
pub(super) fn stickiness_attributes(stickiness: &str) -> Vec<String> {
    match stickiness {
        "default" => vec!["userId".into(), "sessionId".into()],
        field if STANDARD_FIELDS.contains(&field) => vec![field.to_string()],
        field => vec![field.to_string(), format!("properties.{field}")],
    }
}

/// A constraint's translation: a condition, or a constant.
pub(super) enum Translated {
    Condition(Value),
    Always(bool),
}

pub(super) fn translate_constraint(constraint: &Value) -> Result<Translated> {
    let Some(map) = constraint.as_object() else {
        return Err(ImportError::Invalid(
            "every constraint must be a JSON object".into(),
        ));
    };
    let context_name = map
        .get("contextName")
        .and_then(Value::as_str)
        .ok_or_else(|| ImportError::Invalid("a constraint needs a \"contextName\"".into()))?;
    let operator = map.get("operator").and_then(Value::as_str).unwrap_or("");
    let inverted = map.get("inverted").and_then(Value::as_bool) == Some(true);
    let case_insensitive = map.get("caseInsensitive").and_then(Value::as_bool) == Some(true);
    let mut values: Vec<String> = array(map, "values")
        .iter()
        .filter_map(|value| text(Some(value)))
        .collect();
    let single = text(map.get("value"));
    if values.is_empty() {
        values.extend(single.clone());
    }
    // What Unleash answers for a constraint that can never hold, after
    // `inverted` flips it.
    let never = Translated::Always(inverted);
    let attribute = attribute_for(context_name);
    let condition = |op: &str, operands: Value, missing: Value, folds: bool| {
        let mut condition = json!({"attribute": attribute, "op": op, "values": operands});
        if inverted {
            condition["negate"] = Value::Bool(true);
        }
        if folds && case_insensitive {
            condition["case_insensitive"] = Value::Bool(true);
        }
        condition["if_missing"] = missing;
        Translated::Condition(condition)
    };
    // Unleash's answer for an absent field: false for every operator but
    // NOT_IN, then flipped by `inverted`.
    let missing = |base: bool| Value::Bool(base != inverted);
    Ok(match operator {
        "IN" | "NOT_IN" => {
            let not_in = operator == "NOT_IN";
            if values.is_empty() {
                // Nothing is in an empty list.
                Translated::Always(not_in != inverted)
            } else {
                let op = if not_in { "not_in" } else { "in" };
                condition(op, json!(values), missing(not_in), false)
            }
        }
        "STR_CONTAINS" | "STR_STARTS_WITH" | "STR_ENDS_WITH" => {
            if values.is_empty() {
                return Ok(never);
            }
            let op = match operator {
                "STR_CONTAINS" => "contains",
                "STR_STARTS_WITH" => "starts_with",
                _ => "ends_with",
            };
            condition(op, json!(values), missing(false), true)
        }
        "NUM_EQ" | "NUM_GT" | "NUM_GTE" | "NUM_LT" | "NUM_LTE" => {
            let Some(number) = single
                .as_deref()
                .and_then(|text| text.trim().parse::<f64>().ok())
                .filter(|number| number.is_finite())
            else {
                return Ok(never);
            };
            let op = match operator {
                "NUM_EQ" => "eq",
                "NUM_GT" => "gt",
                "NUM_GTE" => "gte",
                "NUM_LT" => "lt",
                _ => "lte",
            };
            condition(op, json!([number]), missing(false), false)
        }
        "DATE_AFTER" | "DATE_BEFORE" => {
            let Some(instant) = single
                .as_deref()
                .filter(|text| chrono::DateTime::parse_from_rfc3339(text).is_ok())
            else {
                return Ok(never);
            };
            let op = if operator == "DATE_AFTER" {
                "after"
            } else {
                "before"
            };
            // Unleash compares the clock when the context carries no time.
            let missing = if context_name == "currentTime" {
                json!("now")
            } else {
                missing(false)
            };
            condition(op, json!([instant]), missing, false)
        }
        "SEMVER_EQ" | "SEMVER_GT" | "SEMVER_GTE" | "SEMVER_LT" | "SEMVER_LTE" => {
            // Unleash accepts only strict semantic versions (no "v", no
            // short forms); anything else makes the constraint false.
            let Some(version) = single
                .as_deref()
                .filter(|text| semver::Version::parse(text).is_ok())
            else {
                return Ok(never);
            };
            let op = operator.to_ascii_lowercase();
            condition(&op, json!([version]), missing(false), false)
        }
        "REGEX" => {
            let Some(pattern) = single.filter(|pattern| regex::Regex::new(pattern).is_ok()) else {
                return Ok(never);
            };
            condition("matches", json!([pattern]), missing(false), true)
        }
        "IN_CIDR" => {
            // Unleash ignores the entries it cannot parse.
            let networks: Vec<&String> = values
                .iter()
                .filter(|value| parse_network(value).is_some())
                .collect();
            if networks.is_empty() {
                return Ok(never);
            }
            condition("in_cidr", json!(networks), missing(false), false)
        }
        // Unleash evaluates an operator it does not know as false, inverted
        // or not.
        _ => Translated::Always(false),
    })
}
