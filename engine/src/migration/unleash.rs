//! Unleash client state (`/api/client/features`, or the delta API's events)
//! to FlagShip flag documents that answer every context the way an Unleash
//! SDK does: strategies become ordered rules, strategy rollouts become
//! `sample` gates, variants become `unleash`-bucketed rollouts, overrides
//! become rules ahead of them, dependencies become prerequisites.
//!
//! What FlagShip cannot reproduce exactly is refused (`Unsupported`), never
//! approximated. Constraints Unleash itself evaluates to a constant (an
//! unknown operator, `IN []`, an invalid semver) are folded here, which is
//! exact.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

mod constraints;
mod variants;

use super::ImportError;
use crate::rules::conditions::parse_network;
use crate::rules::fields::is_valid_key;
use constraints::{attribute_for, stickiness_attributes, translate_constraint, Translated};
use variants::{prerequisite_variants, variant_serve, variant_table};

/// Unleash's variant for "no variant"; the off variant of imported
/// multivariate flags.
pub const DISABLED_VARIANT: &str = "disabled";

/// Context fields Unleash reads from the top level of its context; any
/// other name is looked up in `properties`.
const STANDARD_FIELDS: &[&str] = &[
    "userId",
    "sessionId",
    "remoteAddress",
    "environment",
    "appName",
    "currentTime",
];

type Result<T> = std::result::Result<T, ImportError>;

/// A feature and the constraints of every segment, after replaying events.
struct State {
    features: Vec<Map<String, Value>>,
    segments: HashMap<String, Vec<Value>>,
}

fn segment_entry(segment: &Value) -> Option<(String, Vec<Value>)> {
    let id = match segment.get("id")? {
        Value::Number(id) => id.to_string(),
        Value::String(id) => id.clone(),
        _ => return None,
    };
    let constraints = segment
        .get("constraints")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    Some((id, constraints))
}

fn objects(value: Option<&Value>, what: &str) -> Result<Vec<Value>> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(_) => Err(ImportError::Invalid(format!("{what} must be an array"))),
    }
}

impl State {
    /// Adds a feature, or replaces the one of the same name.
    fn upsert(&mut self, feature: &Value) -> Result<()> {
        let feature = feature.as_object().ok_or_else(|| {
            ImportError::Invalid("every feature must be a JSON object".to_string())
        })?;
        let name = feature
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| ImportError::Invalid("every feature needs a \"name\"".to_string()))?;
        self.features
            .retain(|known| known.get("name").and_then(Value::as_str) != Some(name));
        self.features.push(feature.clone());
        Ok(())
    }

    /// Everything replaced by the `features` and `segments` of `source`: a
    /// whole client state, or the delta API's hydration event.
    fn hydrate(&mut self, source: &Value, prefix: &str) -> Result<()> {
        self.features.clear();
        self.segments.clear();
        for feature in objects(source.get("features"), &format!("{prefix}features"))? {
            self.upsert(&feature)?;
        }
        self.segments.extend(
            objects(source.get("segments"), &format!("{prefix}segments"))?
                .iter()
                .filter_map(segment_entry),
        );
        Ok(())
    }
}

fn load_state(state: &Value) -> Result<State> {
    let mut loaded = State {
        features: Vec::new(),
        segments: HashMap::new(),
    };
    let Some(events) = state.get("events") else {
        loaded.hydrate(state, "")?;
        return Ok(loaded);
    };
    // The delta API: replay the events in order.
    for event in objects(Some(events), "events")? {
        match event.get("type").and_then(Value::as_str) {
            Some("hydration") => loaded.hydrate(&event, "hydration.")?,
            Some("feature-updated") => {
                loaded.upsert(event.get("feature").unwrap_or(&Value::Null))?
            }
            Some("feature-removed") => {
                let name = event.get("featureName").and_then(Value::as_str);
                loaded
                    .features
                    .retain(|known| known.get("name").and_then(Value::as_str) != name);
            }
            Some("segment-updated") => {
                if let Some((id, constraints)) = event.get("segment").and_then(segment_entry) {
                    loaded.segments.insert(id, constraints);
                }
            }
            Some("segment-removed") => {
                if let Some(id) = event.get("segmentId") {
                    let id = id.as_str().map(str::to_string).unwrap_or(id.to_string());
                    loaded.segments.remove(&id);
                }
            }
            other => {
                return Err(ImportError::Unsupported(format!(
                    "delta event type {}",
                    other.map(|t| format!("\"{t}\"")).unwrap_or("(none)".into())
                )))
            }
        }
    }
    Ok(loaded)
}

fn text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

fn array<'a>(map: &'a Map<String, Value>, field: &str) -> &'a [Value] {
    map.get(field)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn feature_name(feature: &Map<String, Value>) -> &str {
    feature.get("name").and_then(Value::as_str).unwrap_or("")
}

fn percentage(strategy: &Map<String, Value>, field: &str) -> Result<u32> {
    let parameters = strategy.get("parameters").and_then(Value::as_object);
    let raw = parameters.and_then(|p| text(p.get(field)));
    raw.as_deref()
        .map(str::trim)
        .and_then(|raw| raw.parse::<f64>().ok())
        .filter(|percent| (0.0..=100.0).contains(percent))
        .map(|percent| percent.round() as u32)
        .ok_or_else(|| {
            ImportError::Invalid(format!(
                "strategy {}: parameter \"{field}\" must be a percentage, not {}",
                strategy.get("name").and_then(Value::as_str).unwrap_or("?"),
                raw.unwrap_or_else(|| "nothing".into())
            ))
        })
}

fn parameter(strategy: &Map<String, Value>, field: &str) -> Option<String> {
    text(
        strategy
            .get("parameters")
            .and_then(Value::as_object)
            .and_then(|p| p.get(field)),
    )
}

fn comma_list(raw: Option<String>) -> Vec<String> {
    raw.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_string)
        .collect()
}

struct Translation {
    rules: Vec<Value>,
    default: Option<Value>,
}

/// One strategy's gates: extra conditions and an optional sample, or None
/// when Unleash would never enable it.
fn strategy_gates(
    feature: &str,
    strategy: &Map<String, Value>,
    conditions: &mut Vec<Value>,
) -> Result<Option<Option<Value>>> {
    let kind = strategy.get("name").and_then(Value::as_str).unwrap_or("");
    let group_id = parameter(strategy, "groupId").unwrap_or_else(|| feature.to_string());
    let sample = |percent: u32, bucket_by: Vec<String>| json!({"percent": percent, "bucket_by": bucket_by, "salt": group_id, "bucketing": "unleash"});
    let unsupported_random = |percent: u32| {
        ImportError::Unsupported(format!(
            "feature \"{feature}\": strategy {kind} samples {percent}% at random \
             (FlagShip evaluates deterministically; only 0% and 100% import)"
        ))
    };
    Ok(Some(match kind {
        "default" => None,
        "userWithId" => {
            let users = comma_list(parameter(strategy, "userIds"));
            if users.is_empty() {
                return Ok(None);
            }
            conditions.push(json!({"attribute": "userId", "op": "in", "values": users}));
            None
        }
        "remoteAddress" => {
            let networks: Vec<String> = comma_list(parameter(strategy, "IPs"))
                .into_iter()
                .filter(|entry| parse_network(entry).is_some())
                .collect();
            if networks.is_empty() {
                return Ok(None);
            }
            conditions
                .push(json!({"attribute": "remoteAddress", "op": "in_cidr", "values": networks}));
            None
        }
        "flexibleRollout" => {
            let percent = percentage(strategy, "rollout")?;
            let stickiness = parameter(strategy, "stickiness").unwrap_or_else(|| "default".into());
            match (stickiness.as_str(), percent) {
                (_, 0) => return Ok(None),
                ("default" | "random", 100) => None,
                ("random", _) => return Err(unsupported_random(percent)),
                (field, _) => Some(sample(percent, stickiness_attributes(field))),
            }
        }
        "gradualRolloutUserId" | "gradualRolloutSessionId" => {
            let percent = percentage(strategy, "percentage")?;
            if percent == 0 {
                return Ok(None);
            }
            let field = if kind == "gradualRolloutUserId" {
                "userId"
            } else {
                "sessionId"
            };
            Some(sample(percent, vec![field.into()]))
        }
        "gradualRolloutRandom" => match percentage(strategy, "percentage")? {
            0 => return Ok(None),
            100 => None,
            percent => return Err(unsupported_random(percent)),
        },
        other => {
            return Err(ImportError::Unsupported(format!(
                "feature \"{feature}\": strategy \"{other}\" (custom and host-dependent \
                 strategies run in the Unleash SDK)"
            )))
        }
    }))
}

fn translate_strategies(
    feature: &Map<String, Value>,
    segments: &HashMap<String, Vec<Value>>,
) -> Result<Translation> {
    let name = feature_name(feature);
    let feature_serve = if array(feature, "variants").is_empty() {
        json!({"variant": "on"})
    } else {
        variant_serve(array(feature, "variants"), name, None)
    };
    // Overrides pin a subject to a feature variant once a strategy enabled it.
    let overrides: Vec<(Value, String)> = array(feature, "variants")
        .iter()
        .flat_map(|variant| {
            let variant_name = variant.get("name").and_then(Value::as_str).unwrap_or("");
            variant
                .get("overrides")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(move |o| {
                    let context_name = o.get("contextName")?.as_str()?;
                    let values: Vec<String> = o
                        .get("values")?
                        .as_array()?
                        .iter()
                        .filter_map(|v| text(Some(v)))
                        .collect();
                    (!values.is_empty()).then(|| {
                        (
                            json!({"attribute": attribute_for(context_name), "op": "in", "values": values}),
                            variant_name.to_string(),
                        )
                    })
                })
        })
        .collect();
    let mut rules = Vec::new();
    let strategies = array(feature, "strategies");
    let with_overrides = |rules: &mut Vec<Value>,
                          id: &str,
                          conditions: &[Value],
                          sample: &Option<Value>,
                          serve: &Value,
                          uses_feature_variants: bool| {
        if uses_feature_variants {
            for (index, (condition, variant)) in overrides.iter().enumerate() {
                let mut all = conditions.to_vec();
                all.push(condition.clone());
                let mut rule = json!({"id": format!("{id}-override-{index}"),
                    "conditions": all, "serve": {"variant": variant}});
                if let Some(sample) = sample {
                    rule["sample"] = sample.clone();
                }
                rules.push(rule);
            }
        }
        if conditions.is_empty() && sample.is_none() {
            return Some(serve.clone());
        }
        let mut rule = json!({"id": id, "conditions": conditions, "serve": serve});
        if let Some(sample) = sample {
            rule["sample"] = sample.clone();
        }
        rules.push(rule);
        None
    };
    if strategies.is_empty() {
        // A feature without strategies is on for everyone.
        let default = with_overrides(&mut rules, "variants", &[], &None, &feature_serve, true);
        return Ok(Translation { rules, default });
    }
    'strategies: for (index, strategy) in strategies.iter().enumerate() {
        let strategy = strategy
            .as_object()
            .ok_or_else(|| ImportError::Invalid(format!("feature \"{name}\": bad strategy")))?;
        if strategy.get("disabled").and_then(Value::as_bool) == Some(true) {
            continue;
        }
        let mut conditions = Vec::new();
        let mut constraints: Vec<Value> = array(strategy, "constraints").to_vec();
        for segment in array(strategy, "segments") {
            let id = text(Some(segment)).unwrap_or_default();
            match segments.get(&id) {
                Some(segment_constraints) => constraints.extend(segment_constraints.clone()),
                // Unleash never enables a strategy whose segment it lacks.
                None => continue 'strategies,
            }
        }
        for constraint in &constraints {
            match translate_constraint(constraint)? {
                Translated::Condition(condition) => conditions.push(condition),
                Translated::Always(true) => {}
                Translated::Always(false) => continue 'strategies,
            }
        }
        let Some(sample) = strategy_gates(name, strategy, &mut conditions)? else {
            continue;
        };
        let kind = strategy.get("name").and_then(Value::as_str).unwrap_or("");
        let id = format!("s{index}-{kind}");
        let strategy_variants = array(strategy, "variants");
        let (serve, feature_variants) = if strategy_variants.is_empty() {
            (feature_serve.clone(), true)
        } else {
            let group_id = parameter(strategy, "groupId").unwrap_or_else(|| name.to_string());
            let stickiness = parameter(strategy, "stickiness");
            (
                variant_serve(strategy_variants, &group_id, stickiness),
                false,
            )
        };
        if let Some(default) = with_overrides(
            &mut rules,
            &id,
            &conditions,
            &sample,
            &serve,
            feature_variants,
        ) {
            // Everyone reaching this strategy is enabled: later ones never run.
            return Ok(Translation {
                rules,
                default: Some(default),
            });
        }
    }
    Ok(Translation {
        rules,
        default: None,
    })
}

fn translate_feature(
    feature: &Map<String, Value>,
    state: &State,
    environment: &str,
) -> Result<Value> {
    let name = feature_name(feature);
    if !is_valid_key(name) {
        return Err(ImportError::Unsupported(format!(
            "feature name \"{name}\" (FlagShip flag keys are 1 to 128 letters, digits, '-', '_' \
             or '.')"
        )));
    }
    let variants = variant_table(feature)?;
    // Rollouts and samples name their profile and salt themselves (rather
    // than the flag), so importing one environment never moves the buckets
    // of the flag's other environments.
    let mut document = json!({"key": name});
    if let Some(description) = feature.get("description").and_then(Value::as_str) {
        document["description"] = json!(description);
    }
    let off = if variants.is_empty() {
        "off"
    } else {
        let mut all: Map<String, Value> = variants.into_iter().collect();
        all.insert(DISABLED_VARIANT.into(), Value::Bool(false));
        document["kind"] = json!("multivariate");
        document["variants"] = Value::Object(all);
        document["off_variant"] = json!(DISABLED_VARIANT);
        DISABLED_VARIANT
    };

    let mut enabled = feature.get("enabled").and_then(Value::as_bool) == Some(true);
    let mut prerequisites = Vec::new();
    for dependency in array(feature, "dependencies") {
        let dependency = dependency
            .as_object()
            .ok_or_else(|| ImportError::Invalid(format!("feature \"{name}\": bad dependency")))?;
        let parent_name = dependency.get("feature").and_then(Value::as_str);
        let parent = state
            .features
            .iter()
            .find(|feature| parent_name == Some(feature_name(feature)));
        // Unleash allows one level only: a missing parent, or a parent with
        // dependencies of its own, leaves the child off.
        let Some(parent) = parent.filter(|parent| array(parent, "dependencies").is_empty()) else {
            enabled = false;
            break;
        };
        match prerequisite_variants(dependency, parent)? {
            Some(wanted) => prerequisites.push(json!({"flag": parent_name, "variants": wanted})),
            None => {
                enabled = false;
                break;
            }
        }
    }
    if enabled && !prerequisites.is_empty() {
        document["prerequisites"] = Value::Array(prerequisites);
    }

    let mut config = json!({"enabled": enabled});
    if enabled {
        let translation = translate_strategies(feature, &state.segments)?;
        if !translation.rules.is_empty() {
            config["rules"] = Value::Array(translation.rules);
        }
        config["default"] = translation
            .default
            .unwrap_or_else(|| json!({"variant": off}));
    }
    document["environments"] = json!({ environment: config });
    Ok(document)
}

/// Each feature's flag document, parents before the flags that depend on
/// them, or the reason it cannot be imported.
pub fn translate_each(state: &Value, environment: &str) -> Result<Vec<(String, Result<Value>)>> {
    let state = load_state(state)?;
    let mut translated: Vec<(String, Result<Value>)> = state
        .features
        .iter()
        .map(|feature| {
            (
                feature_name(feature).to_string(),
                translate_feature(feature, &state, environment),
            )
        })
        .collect();
    // Parents first: a flag with prerequisites after every flag without.
    translated.sort_by_key(|(_, document)| {
        document
            .as_ref()
            .map(|document| document.get("prerequisites").is_some())
            .unwrap_or(false)
    });
    Ok(translated)
}

/// Every feature's flag document, or the first reason one cannot be imported.
pub fn translate(state: &Value, environment: &str) -> Result<Vec<Value>> {
    translate_each(state, environment)?
        .into_iter()
        .map(|(_, document)| document)
        .collect()
}

#[cfg(test)]
mod tests;
