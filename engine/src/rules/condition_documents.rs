//! Conditions lists as documents write them: parsed into the criteria tree,
//! with the nesting limits that keep parsing and evaluation off the stack's edge.

use serde_json::Value;

use super::conditions::Condition;
use super::criteria::{ArrayTest, Criterion};
use super::fields::{
    object, optional_bool, optional_string, refuse_unknown_fields, Path, Result, ValidationError,
};
use super::operators::{IfMissing, Operator};

const CONDITION_FIELDS: &[&str] = &[
    "attribute",
    "op",
    "values",
    "value",
    "negate",
    "case_insensitive",
    "if_missing",
];

/// How deep a conditions list may nest, in JSON levels (a group of groups
/// of conditions is about 7): far beyond any real targeting rule, and
/// shallow enough that parsing and evaluating cannot exhaust the stack.
pub const MAX_CONDITION_DEPTH: usize = 48;

/// How deep a stored value (a variant's value, a customer's attributes)
/// may nest, in JSON levels. Every document that holds one is read back
/// whole when an environment or customer is loaded, within serde_json's
/// 128 levels; 64 leaves room for the envelope around the value.
pub const MAX_VALUE_DEPTH: usize = 64;

/// Refuses a value nested deeper than `MAX_VALUE_DEPTH`, naming `path`.
pub fn check_value_depth(value: &Value, path: Path<'_>) -> Result<()> {
    let depth = nesting_depth(value);
    if depth > MAX_VALUE_DEPTH {
        return Err(ValidationError::new(
            path,
            format!("nests {depth} levels of JSON, more than the limit of {MAX_VALUE_DEPTH}"),
        ));
    }
    Ok(())
}

/// The nesting depth of a JSON value (a scalar is 0), without recursion.
pub fn nesting_depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut pending = vec![(value, 0usize)];
    while let Some((value, depth)) = pending.pop() {
        deepest = deepest.max(depth);
        match value {
            Value::Array(items) => pending.extend(items.iter().map(|item| (item, depth + 1))),
            Value::Object(map) => pending.extend(map.values().map(|item| (item, depth + 1))),
            _ => {}
        }
    }
    deepest
}

pub fn parse_conditions(value: Option<&Value>, path: Path<'_>) -> Result<Vec<Criterion>> {
    if value.is_some_and(|value| nesting_depth(value) > MAX_CONDITION_DEPTH) {
        return Err(ValidationError::new(
            path,
            format!("nests deeper than {MAX_CONDITION_DEPTH} levels of JSON"),
        ));
    }
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| parse_criterion(item, path.index(index)))
            .collect(),
        Some(_) => Err(ValidationError::new(path, "must be an array of conditions")),
    }
}

/// A condition, or a group: `{"all": [...]}`, `{"any": [...]}`,
/// `{"not": {...}}`, `{"some": "attr", "where": [...]}`,
/// `{"length": "attr", "where": [...]}`.
fn parse_criterion(value: &Value, path: Path<'_>) -> Result<Criterion> {
    let map = object(value, path)?;
    let group = ["all", "any", "not", "some", "length"]
        .into_iter()
        .find(|kind| map.contains_key(*kind));
    let Some(kind) = group else {
        return parse_condition(value, path).map(Criterion::Condition);
    };
    let members = |field: &str| -> Result<Vec<Criterion>> {
        match map.get(field) {
            Some(Value::Array(_)) => parse_conditions(map.get(field), path.field(field)),
            _ => Err(ValidationError::new(
                path.field(field),
                "must be an array of conditions",
            )),
        }
    };
    let array_test = |allowed: &[&str]| -> Result<ArrayTest> {
        refuse_unknown_fields(map, allowed, path)?;
        let attribute = optional_string(map, kind, path)?
            .filter(|attribute| !attribute.trim().is_empty())
            .ok_or_else(|| ValidationError::new(path.field(kind), "must name an attribute"))?;
        Ok(ArrayTest::new(attribute, members("where")?))
    };
    Ok(match kind {
        "all" | "any" => {
            refuse_unknown_fields(map, &[kind], path)?;
            let members = members(kind)?;
            if kind == "all" {
                Criterion::All(members)
            } else {
                Criterion::Any(members)
            }
        }
        "not" => {
            refuse_unknown_fields(map, &["not"], path)?;
            Criterion::Not(Box::new(parse_criterion(&map["not"], path.field("not"))?))
        }
        "some" => Criterion::Some(array_test(&["some", "where"])?),
        _ => Criterion::Length(array_test(&["length", "where"])?),
    })
}

fn parse_condition(value: &Value, path: Path<'_>) -> Result<Condition> {
    let map = object(value, path)?;
    refuse_unknown_fields(map, CONDITION_FIELDS, path)?;
    let attribute = optional_string(map, "attribute", path)?
        .filter(|attribute| !attribute.trim().is_empty())
        .ok_or_else(|| ValidationError::new(path.field("attribute"), "is required"))?;
    let op_name = optional_string(map, "op", path)?
        .ok_or_else(|| ValidationError::new(path.field("op"), "is required"))?;
    let op = Operator::parse(&op_name).ok_or_else(|| {
        ValidationError::new(
            path.field("op"),
            format!(
                "unknown operator \"{op_name}\"; valid operators: {}",
                Operator::NAMES.join(", ")
            ),
        )
    })?;
    let values = match (map.get("values"), map.get("value")) {
        (Some(_), Some(_)) => {
            return Err(ValidationError::new(
                path,
                "give \"values\" or \"value\", not both",
            ))
        }
        (Some(Value::Array(values)), None) => values.clone(),
        (Some(_), None) => {
            return Err(ValidationError::new(
                path.field("values"),
                "must be an array",
            ))
        }
        (None, Some(single)) => vec![single.clone()],
        (None, None) => Vec::new(),
    };
    let case_insensitive = optional_bool(map, "case_insensitive", path)?.unwrap_or(false);
    let negate = optional_bool(map, "negate", path)?.unwrap_or(false);
    let if_missing = match map.get("if_missing") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(outcome)) => Some(IfMissing::Outcome(*outcome)),
        Some(Value::String(now)) if now == "now" => Some(IfMissing::Now),
        Some(_) => {
            return Err(ValidationError::new(
                path.field("if_missing"),
                "must be true, false or \"now\"",
            ))
        }
    };
    Condition::compile(attribute, op, &values, negate, case_insensitive)
        .map_err(|message| ValidationError::new(path.field("values"), message))?
        .with_if_missing(if_missing)
        .map_err(|message| ValidationError::new(path.field("if_missing"), message))
}
