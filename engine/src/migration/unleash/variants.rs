//! Unleash variants as FlagShip serves: weighted variant lists become
//! `unleash`-bucketed rollouts, and a dependency's wanted variants become
//! the prerequisite's variants.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use super::constraints::stickiness_attributes;
use super::{array, feature_name, ImportError, Result, DISABLED_VARIANT};
use crate::rules::fields::is_valid_key;

/// One variant list (a feature's or a strategy's) as a FlagShip serve.
/// `inherited` is the stickiness of the strategy that owns the list.
pub(super) fn variant_serve(
    variants: &[Value],
    group_id: &str,
    inherited: Option<String>,
) -> Value {
    let weighted: Vec<(&str, u64)> = variants
        .iter()
        .map(|variant| {
            (
                variant.get("name").and_then(Value::as_str).unwrap_or(""),
                variant.get("weight").and_then(Value::as_u64).unwrap_or(0),
            )
        })
        .collect();
    let mut positive = weighted.iter().filter(|(_, weight)| *weight > 0);
    if let (Some((only, _)), None) = (positive.next(), positive.next()) {
        // One variant holds every bucket: no hashing, so no stickiness
        // value is needed either.
        return json!({"variant": only});
    }
    let stickiness = variants
        .first()
        .and_then(|variant| variant.get("stickiness"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or(inherited)
        .unwrap_or_else(|| "default".into());
    let bucket_by = match stickiness.as_str() {
        "default" => vec!["userId".into(), "sessionId".into(), "remoteAddress".into()],
        other => stickiness_attributes(other),
    };
    let rollout: Vec<Value> = weighted
        .iter()
        .map(|(name, weight)| json!({"variant": name, "weight": weight}))
        .collect();
    // Unleash draws a variant at random for a context without a stickiness
    // value; FlagShip stays deterministic and serves the first one, so the
    // feature stays enabled as it does there.
    let unplaced = weighted
        .iter()
        .find(|(_, weight)| *weight > 0)
        .map(|(name, _)| *name);
    json!({"rollout": rollout, "bucketing": "unleash", "bucket_by": bucket_by, "salt": group_id,
           "unplaced": unplaced})
}

/// The FlagShip value of an Unleash variant: its payload, or true.
pub(super) fn variant_value(variant: &Value) -> Value {
    variant.get("payload").cloned().unwrap_or(Value::Bool(true))
}

/// Every variant the feature can serve, by name, from the feature and its
/// strategies. Empty for a feature without variants.
pub(super) fn variant_table(feature: &Map<String, Value>) -> Result<BTreeMap<String, Value>> {
    let name = feature_name(feature);
    let mut table = BTreeMap::new();
    let strategy_variants = array(feature, "strategies")
        .iter()
        .flat_map(|strategy| strategy.get("variants").and_then(Value::as_array))
        .flatten();
    for variant in array(feature, "variants").iter().chain(strategy_variants) {
        let variant_name = variant.get("name").and_then(Value::as_str).unwrap_or("");
        if variant_name == DISABLED_VARIANT || !is_valid_key(variant_name) {
            return Err(ImportError::Unsupported(format!(
                "feature \"{name}\": variant name \"{variant_name}\" (FlagShip variant names are \
                 letters, digits, '-', '_' or '.', and \"disabled\" is the off variant)"
            )));
        }
        let value = variant_value(variant);
        match table.get(variant_name) {
            Some(known) if *known != value => {
                return Err(ImportError::Unsupported(format!(
                    "feature \"{name}\": variant \"{variant_name}\" with two different payloads"
                )))
            }
            _ => {
                table.insert(variant_name.to_string(), value);
            }
        }
    }
    Ok(table)
}

/// The FlagShip variants that stand for an Unleash dependency's wish, or
/// None when the dependency can never be met.
pub(super) fn prerequisite_variants(
    dependency: &Map<String, Value>,
    parent: &Map<String, Value>,
) -> Result<Option<Vec<String>>> {
    let parent_variants = variant_table(parent)?;
    let boolean = parent_variants.is_empty();
    let (on, off): (Vec<String>, &str) = if boolean {
        (vec!["on".into()], "off")
    } else {
        (parent_variants.keys().cloned().collect(), DISABLED_VARIANT)
    };
    if dependency.get("enabled").and_then(Value::as_bool) == Some(false) {
        return Ok(Some(vec![off.to_string()]));
    }
    let wanted: Vec<&str> = array(dependency, "variants")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    if wanted.is_empty() {
        return Ok(Some(on));
    }
    // An enabled parent without variants answers Unleash's "disabled"
    // variant, which FlagShip's boolean flag serves as "on".
    let chosen: Vec<String> = if boolean {
        if wanted.contains(&DISABLED_VARIANT) {
            on
        } else {
            Vec::new()
        }
    } else {
        on.into_iter()
            .filter(|variant| wanted.contains(&variant.as_str()))
            .collect()
    };
    Ok((!chosen.is_empty()).then_some(chosen))
}
