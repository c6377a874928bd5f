//! GrowthBook targeting conditions (its MongoDB-like `condition` objects)
//! to FlagShip conditions with the same answers: `$and`/`$or`/`$nor`/`$not`
//! become `all`/`any`/`not` groups, `$elemMatch`/`$all` become `some`
//! groups, `$size` a `length` group, and each operator the FlagShip
//! operator that agrees with it. GrowthBook reads a missing attribute as
//! null and still compares it (null is 0 to `$gt`), so every condition
//! carries the `if_missing` answer GrowthBook gives for null.

use serde_json::{json, Map, Value};

use super::ImportError;
use crate::rules::condition_documents::{nesting_depth, MAX_CONDITION_DEPTH};
use crate::rules::conditions::padded_version;
use crate::rules::criteria::ELEMENT;

type Result<T> = std::result::Result<T, ImportError>;

fn always() -> Value {
    json!({"all": []})
}

fn never() -> Value {
    json!({"any": []})
}

fn unsupported(what: String) -> ImportError {
    ImportError::Unsupported(format!("GrowthBook condition: {what}"))
}

/// Translates a GrowthBook condition; `saved_groups` holds the lists
/// `$inGroup` and `$notInGroup` name.
pub fn translate_condition(
    condition: &Value,
    saved_groups: &Map<String, Value>,
) -> Result<Vec<Value>> {
    // Translation recurses; refuse what no real condition needs before it
    // could exhaust the stack.
    if nesting_depth(condition) > MAX_CONDITION_DEPTH {
        return Err(unsupported(format!(
            "nesting deeper than {MAX_CONDITION_DEPTH} levels of JSON"
        )));
    }
    Translator { saved_groups }.condition(condition)
}

struct Translator<'a> {
    saved_groups: &'a Map<String, Value>,
}

/// JavaScript's number conversion of a value, as `<` and `>` apply it.
fn js_number(value: &Value) -> Option<f64> {
    match value {
        Value::Null => Some(0.0),
        Value::Bool(flag) => Some(f64::from(u8::from(*flag))),
        Value::Number(number) => number.as_f64(),
        Value::String(text) if text.trim().is_empty() => Some(0.0),
        Value::String(text) => text.trim().parse::<f64>().ok(),
        _ => None,
    }
}

/// GrowthBook's `isOperatorObject`: a non-empty object whose keys are all
/// operators; any other object is a value compared for equality.
fn is_operator_object(value: &Value) -> bool {
    value
        .as_object()
        .is_some_and(|map| !map.is_empty() && map.keys().all(|key| key.starts_with('$')))
}

fn leaf(attribute: &str, op: &str, values: Value, if_missing: bool) -> Value {
    json!({"attribute": attribute, "op": op, "values": values, "if_missing": if_missing})
}

impl Translator<'_> {
    fn condition(&self, condition: &Value) -> Result<Vec<Value>> {
        let Some(map) = condition.as_object() else {
            return Err(unsupported(format!("{condition} is not an object")));
        };
        let mut criteria = Vec::with_capacity(map.len());
        for (key, value) in map {
            criteria.push(match key.as_str() {
                "$or" | "$nor" => {
                    let members = self.members(value, key)?;
                    // GrowthBook's empty $or holds, so an empty $nor fails.
                    let any = if members.is_empty() {
                        always()
                    } else {
                        json!({ "any": members })
                    };
                    if key == "$or" {
                        any
                    } else {
                        json!({ "not": any })
                    }
                }
                "$and" => json!({"all": self.members(value, key)?}),
                "$not" => json!({"not": {"all": self.condition(value)?}}),
                attribute => self.value(attribute, value)?,
            });
        }
        Ok(criteria)
    }

    fn members(&self, value: &Value, key: &str) -> Result<Vec<Value>> {
        let items = value
            .as_array()
            .ok_or_else(|| unsupported(format!("{key} takes an array")))?;
        items
            .iter()
            .map(|item| Ok(json!({"all": self.condition(item)?})))
            .collect()
    }

    /// `evalConditionValue`: a literal to compare with, or operators.
    fn value(&self, attribute: &str, expected: &Value) -> Result<Value> {
        Ok(match expected {
            // GrowthBook compares `value + ""` with a string and
            // `value * 1` with a number; null becomes "null" and 0.
            Value::String(text) => leaf(attribute, "eq", json!([text]), text == "null"),
            Value::Number(number) => {
                let zero = number.as_f64() == Some(0.0);
                leaf(attribute, "eq", json!([number]), zero)
            }
            Value::Bool(flag) => leaf(attribute, "eq", json!([flag]), false),
            Value::Null => json!({"attribute": attribute, "op": "exists", "negate": true}),
            Value::Object(operators) if is_operator_object(expected) => {
                let criteria = operators
                    .iter()
                    .map(|(operator, operand)| self.operator(attribute, operator, operand))
                    .collect::<Result<Vec<_>>>()?;
                match criteria.len() {
                    1 => criteria.into_iter().next().unwrap_or_else(always),
                    _ => json!({ "all": criteria }),
                }
            }
            // An array, or an object that is not all operators: JSON equality.
            structured => leaf(attribute, "eq", json!([structured]), false),
        })
    }

    fn scalars(&self, operator: &str, list: &[Value]) -> Result<(Vec<Value>, bool)> {
        let mut values = Vec::new();
        let mut has_null = false;
        for item in list {
            match item {
                Value::Null => has_null = true,
                Value::String(_) | Value::Number(_) | Value::Bool(_) => values.push(item.clone()),
                other => {
                    return Err(unsupported(format!(
                        "{operator} with the non-scalar value {other}"
                    )))
                }
            }
        }
        Ok((values, has_null))
    }

    /// `$in` and its kin: a subject (or, for an array, any of its elements)
    /// in the list.
    fn membership(
        &self,
        attribute: &str,
        operator: &str,
        list: &[Value],
        fold: bool,
    ) -> Result<Value> {
        let (values, has_null) = self.scalars(operator, list)?;
        if values.is_empty() {
            return Ok(if has_null {
                json!({"attribute": attribute, "op": "exists", "negate": true})
            } else {
                never()
            });
        }
        let mut condition = leaf(attribute, "in", json!(values), has_null);
        if fold {
            condition["case_insensitive"] = Value::Bool(true);
        }
        Ok(condition)
    }

    fn operator(&self, attribute: &str, operator: &str, expected: &Value) -> Result<Value> {
        let not = |criterion: Value| json!({ "not": criterion });
        Ok(match operator {
            "$eq" => self.value(attribute, expected)?,
            "$ne" => not(self.value(attribute, expected)?),
            "$gt" | "$gte" | "$lt" | "$lte" => {
                let op = &operator[1..];
                let bound = match expected {
                    Value::Number(_) | Value::String(_) => expected.clone(),
                    other => return Err(unsupported(format!("{operator} against {other}"))),
                };
                // null compares as 0 with a number or a numeric string.
                let if_missing = js_number(&bound).is_some_and(|bound| match op {
                    "gt" => 0.0 > bound,
                    "gte" => 0.0 >= bound,
                    "lt" => 0.0 < bound,
                    _ => 0.0 <= bound,
                });
                leaf(attribute, op, json!([bound]), if_missing)
            }
            "$veq" | "$vne" | "$vgt" | "$vgte" | "$vlt" | "$vlte" => {
                let comparison = if operator == "$vne" {
                    "eq"
                } else {
                    &operator[2..]
                };
                let bound = padded_version(expected);
                let missing = padded_version(&Value::Null);
                let if_missing = match comparison {
                    "eq" => missing == bound,
                    "gt" => missing > bound,
                    "gte" => missing >= bound,
                    "lt" => missing < bound,
                    _ => missing <= bound,
                };
                let operand = match expected {
                    Value::String(_) | Value::Number(_) => expected.clone(),
                    _ => json!(""),
                };
                let condition = leaf(
                    attribute,
                    &format!("version_{comparison}"),
                    json!([operand]),
                    if_missing,
                );
                if operator == "$vne" {
                    not(condition)
                } else {
                    condition
                }
            }
            "$exists" => {
                let truthy = !matches!(expected, Value::Null | Value::Bool(false))
                    && expected != &json!(0)
                    && expected != &json!("");
                json!({"attribute": attribute, "op": "exists", "negate": !truthy})
            }
            "$in" | "$ini" | "$nin" | "$nini" => {
                let Some(list) = expected.as_array() else {
                    // GrowthBook answers false for a list that is not one.
                    return Ok(never());
                };
                let within = self.membership(attribute, operator, list, operator.ends_with('i'))?;
                if operator.starts_with("$n") {
                    not(within)
                } else {
                    within
                }
            }
            "$inGroup" | "$notInGroup" => {
                let group = expected
                    .as_str()
                    .and_then(|name| self.saved_groups.get(name))
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let within = self.membership(attribute, operator, group, false)?;
                if operator == "$inGroup" {
                    within
                } else {
                    not(within)
                }
            }
            "$not" => not(self.value(attribute, expected)?),
            "$size" => json!({"length": attribute, "where": [self.value(ELEMENT, expected)?]}),
            "$elemMatch" => {
                let members = if is_operator_object(expected) {
                    vec![self.value(ELEMENT, expected)?]
                } else {
                    self.condition(expected)?
                };
                json!({"some": attribute, "where": members})
            }
            "$all" | "$alli" => {
                let Some(list) = expected.as_array() else {
                    return Ok(never());
                };
                let mut members = vec![leaf(attribute, "type", json!(["array"]), false)];
                for item in list {
                    let mut member = self.value(ELEMENT, item)?;
                    if operator == "$alli" && item.is_string() {
                        member["case_insensitive"] = Value::Bool(true);
                    }
                    members.push(json!({"some": attribute, "where": [member]}));
                }
                json!({ "all": members })
            }
            "$regex" | "$regexi" => {
                let Some(pattern) = expected.as_str() else {
                    return Ok(never());
                };
                let compiled = regex::RegexBuilder::new(pattern)
                    .case_insensitive(operator == "$regexi")
                    .build();
                match compiled {
                    // JavaScript tests null as the text "null".
                    Ok(regex) => {
                        let mut condition = leaf(
                            attribute,
                            "matches",
                            json!([pattern]),
                            regex.is_match("null"),
                        );
                        if operator == "$regexi" {
                            condition["case_insensitive"] = Value::Bool(true);
                        }
                        condition
                    }
                    Err(_)
                        if ["(?=", "(?!", "(?<=", "(?<!", "\\1"]
                            .iter()
                            .any(|js_only| pattern.contains(js_only)) =>
                    {
                        return Err(unsupported(format!(
                            "the regular expression {pattern:?} uses lookaround or \
                             backreferences, which FlagShip's linear-time regexes lack"
                        )))
                    }
                    // GrowthBook treats a pattern it cannot compile as false.
                    Err(_) => never(),
                }
            }
            "$type" => match expected.as_str() {
                Some(name @ ("string" | "number" | "boolean" | "array" | "object" | "null")) => {
                    leaf(attribute, "type", json!([name]), name == "null")
                }
                // GrowthBook reads a missing attribute as null, never
                // undefined, and knows no other type names.
                _ => never(),
            },
            // GrowthBook evaluates an operator it does not know as false.
            _ => never(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translated(condition: Value) -> Vec<Value> {
        translate_condition(&condition, &Map::new()).unwrap()
    }

    #[test]
    fn null_semantics_travel_as_if_missing() {
        // GrowthBook compares a missing age as 0.
        assert_eq!(
            translated(json!({"age": {"$gt": -10}})),
            [json!({"attribute": "age", "op": "gt", "values": [-10], "if_missing": true})]
        );
        assert_eq!(
            translated(json!({"age": {"$lt": -10}}))[0]["if_missing"],
            json!(false)
        );
        // $ne holds for a missing attribute.
        assert_eq!(
            translated(json!({"level": {"$ne": "senior"}})),
            [
                json!({"not": {"attribute": "level", "op": "eq", "values": ["senior"],
                            "if_missing": false}})
            ]
        );
    }

    #[test]
    fn logic_and_constants() {
        assert_eq!(translated(json!({"$or": []})), [json!({"all": []})]);
        assert_eq!(
            translated(json!({"$nor": []})),
            [json!({"not": {"all": []}})]
        );
        assert_eq!(translated(json!({"a": {"$in": "x"}})), [json!({"any": []})]);
        assert_eq!(
            translated(json!({"a": {"$bogus": 1}})),
            [json!({"any": []})]
        );
    }

    #[test]
    fn absurd_nesting_is_refused_before_recursing() {
        let mut deep = json!({"a": 1});
        for _ in 0..500 {
            deep = json!({ "$not": deep });
        }
        let error = translate_condition(&deep, &Map::new()).unwrap_err();
        assert!(matches!(error, ImportError::Unsupported(ref what) if what.contains("nesting")));
        // serde_json drops deep values recursively; leak it rather than
        // test the drop's stack.
        std::mem::forget(deep);
    }

    #[test]
    fn javascript_only_regexes_are_refused() {
        let error =
            translate_condition(&json!({"a": {"$regex": "^(?!admin)"}}), &Map::new()).unwrap_err();
        assert!(matches!(error, ImportError::Unsupported(ref what) if what.contains("lookaround")));
    }
}
