//! One environment's configuration of a flag (`enabled`, `targets`, `rules`,
//! `default`): its types and its parser, checked against the flag's variants.

use serde_json::{Map, Value};

use super::condition_documents::parse_conditions;
use super::criteria::Criterion;
use super::fields::{
    is_valid_key, object, optional_bool, optional_string, refuse_unknown_fields, string_list, Path,
    Result, ValidationError,
};
use crate::bucketing::{Profile, BUCKETS};

/// One environment's configuration of a flag.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentConfig {
    pub enabled: bool,
    /// Variant name → subject keys served that variant.
    pub targets: Vec<(String, Vec<String>)>,
    pub rules: Vec<Rule>,
    pub default: Option<Serve>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub segment: Option<String>,
    pub conditions: Vec<Criterion>,
    /// A percentage gate after the conditions: subjects outside it fall
    /// through to the next rule, as an Unleash strategy rollout does.
    pub sample: Option<Sample>,
    pub serve: Serve,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Thousandths of a percent.
    pub percent: u32,
    pub bucket_by: Vec<String>,
    pub salt: Option<String>,
    pub profile: Profile,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Serve {
    Variant(String),
    Rollout(Rollout),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Variant name and weight, in layout order: thousandths of a percent
    /// in variant order, or for an integer-weight profile the vendor's
    /// weights in the order written.
    pub weights: Vec<(String, u32)>,
    /// Attributes tried in turn; the first one present places the subject.
    pub bucket_by: Vec<String>,
    pub salt: Option<String>,
    pub profile: Profile,
    /// Served when no `bucket_by` attribute is present; without it such a
    /// subject falls through to the next rule (or the off variant).
    pub unplaced: Option<String>,
}

const ENVIRONMENT_FIELDS: &[&str] = &["enabled", "targets", "rules", "default"];
const RULE_FIELDS: &[&str] = &["id", "segment", "conditions", "sample", "serve"];
const SERVE_FIELDS: &[&str] = &[
    "variant",
    "rollout",
    "bucket_by",
    "salt",
    "bucketing",
    "unplaced",
];
const SAMPLE_FIELDS: &[&str] = &["percent", "bucket_by", "salt", "bucketing"];

fn require_variant(variants: &[(String, Value)], name: &str, path: Path<'_>) -> Result<()> {
    if variants.iter().any(|(known, _)| known == name) {
        Ok(())
    } else {
        let known: Vec<&str> = variants.iter().map(|(n, _)| n.as_str()).collect();
        Err(ValidationError::new(
            path,
            format!(
                "unknown variant \"{name}\"; the flag has: {}",
                known.join(", ")
            ),
        ))
    }
}

/// Parses one environment's configuration against the flag's variants;
/// `bucketing` is the flag's profile, for rollouts and samples naming none.
pub fn parse_environment_config(
    config: &Value,
    variants: &[(String, Value)],
    bucketing: Profile,
    path: Path<'_>,
) -> Result<EnvironmentConfig> {
    let map = object(config, path)?;
    refuse_unknown_fields(map, ENVIRONMENT_FIELDS, path)?;
    let enabled = optional_bool(map, "enabled", path)?.unwrap_or(false);

    let mut targets = Vec::new();
    let mut seen_targets = std::collections::HashMap::new();
    match map.get("targets") {
        None | Some(Value::Null) => {}
        Some(Value::Object(entries)) => {
            let targets_path = path.field("targets");
            for (variant, keys) in entries {
                let target_path = targets_path.field(variant);
                require_variant(variants, variant, target_path)?;
                let keys = string_list(Some(keys), target_path)?;
                for subject in &keys {
                    if let Some(other) = seen_targets.insert(subject.clone(), variant.clone()) {
                        if other != *variant {
                            return Err(ValidationError::new(
                                target_path,
                                format!("\"{subject}\" is also targeted to variant \"{other}\""),
                            ));
                        }
                    }
                }
                targets.push((variant.clone(), keys));
            }
        }
        Some(_) => {
            return Err(ValidationError::new(
                path.field("targets"),
                "must be an object of variant: [subject keys]",
            ))
        }
    }

    let mut rules = Vec::new();
    match map.get("rules") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            let mut ids = std::collections::HashSet::new();
            let rules_path = path.field("rules");
            for (index, item) in items.iter().enumerate() {
                let rule_path = rules_path.index(index);
                let rule = parse_rule(item, variants, bucketing, rule_path, index)?;
                if !ids.insert(rule.id.clone()) {
                    return Err(ValidationError::new(
                        rule_path.field("id"),
                        format!("duplicate rule id \"{}\"", rule.id),
                    ));
                }
                rules.push(rule);
            }
        }
        Some(_) => {
            return Err(ValidationError::new(
                path.field("rules"),
                "must be an array",
            ))
        }
    }

    let default = match map.get("default") {
        None | Some(Value::Null) => None,
        Some(serve) => Some(parse_serve(
            serve,
            variants,
            bucketing,
            path.field("default"),
        )?),
    };
    Ok(EnvironmentConfig {
        enabled,
        targets,
        rules,
        default,
    })
}

fn parse_rule(
    value: &Value,
    variants: &[(String, Value)],
    bucketing: Profile,
    path: Path<'_>,
    index: usize,
) -> Result<Rule> {
    let map = object(value, path)?;
    refuse_unknown_fields(map, RULE_FIELDS, path)?;
    let id = match optional_string(map, "id", path)? {
        Some(id) if is_valid_key(&id) => id,
        Some(id) => {
            return Err(ValidationError::new(
                path.field("id"),
                format!("\"{id}\" is not a valid rule id"),
            ))
        }
        None => format!("rule-{index}"),
    };
    let segment = match optional_string(map, "segment", path)? {
        Some(segment) if !is_valid_key(&segment) => {
            return Err(ValidationError::new(
                path.field("segment"),
                format!("\"{segment}\" is not a valid segment key"),
            ))
        }
        other => other,
    };
    let conditions = parse_conditions(map.get("conditions"), path.field("conditions"))?;
    let sample = match map.get("sample") {
        None | Some(Value::Null) => None,
        Some(sample) => Some(parse_sample(sample, bucketing, path.field("sample"))?),
    };
    if segment.is_none() && conditions.is_empty() && sample.is_none() {
        return Err(ValidationError::new(
            path,
            "a rule needs a segment, a sample or at least one condition",
        ));
    }
    let serve = map
        .get("serve")
        .ok_or_else(|| ValidationError::new(path.field("serve"), "is required"))?;
    let serve = parse_serve(serve, variants, bucketing, path.field("serve"))?;
    Ok(Rule {
        id,
        segment,
        conditions,
        sample,
        serve,
    })
}

pub(crate) fn parse_profile(
    map: &Map<String, Value>,
    path: Path<'_>,
    default: Profile,
) -> Result<Profile> {
    match optional_string(map, "bucketing", path)? {
        None => Ok(default),
        Some(name) => Profile::parse_named(&name)
            .map_err(|message| ValidationError::new(path.field("bucketing"), message)),
    }
}

/// `"bucket_by": "attr"` or a list tried in turn; defaults to the targeting key.
fn parse_bucket_by(map: &Map<String, Value>, path: Path<'_>) -> Result<Vec<String>> {
    let field_path = path.field("bucket_by");
    let attributes = match map.get("bucket_by") {
        None | Some(Value::Null) => vec!["targeting_key".to_string()],
        Some(Value::String(attribute)) => vec![attribute.clone()],
        Some(Value::Array(_)) => string_list(map.get("bucket_by"), field_path)?,
        Some(_) => {
            return Err(ValidationError::new(
                field_path,
                "must be an attribute name or a list of them",
            ))
        }
    };
    if attributes.is_empty() || attributes.iter().any(|a| a.trim().is_empty()) {
        return Err(ValidationError::new(field_path, "must not be empty"));
    }
    Ok(attributes)
}

/// `{"percent": 50, "bucket_by": ..., "salt": ..., "bucketing": ...}`.
fn parse_sample(value: &Value, bucketing: Profile, path: Path<'_>) -> Result<Sample> {
    let map = object(value, path)?;
    refuse_unknown_fields(map, SAMPLE_FIELDS, path)?;
    let profile = parse_profile(map, path, bucketing)?;
    let percent_path = path.field("percent");
    let percent = map
        .get("percent")
        .ok_or_else(|| ValidationError::new(percent_path, "is required"))?
        .as_f64()
        .and_then(crate::bucketing::weight_from_percent)
        .ok_or_else(|| {
            ValidationError::new(
                percent_path,
                "must be a percentage from 0 to 100 with at most three decimals",
            )
        })?;
    if profile == Profile::Unleash && percent % 1000 != 0 {
        return Err(ValidationError::new(
            percent_path,
            "an unleash sample is a whole percentage",
        ));
    }
    Ok(Sample {
        percent,
        bucket_by: parse_bucket_by(map, path)?,
        salt: optional_string(map, "salt", path)?,
        profile,
    })
}

/// A rollout's weights: `{"on": 25, "off": 75}` (laid out in variant
/// order) or `[{"variant": "on", "weight": 25}, ...]` (laid out as written).
fn parse_weights(
    rollout: &Value,
    variants: &[(String, Value)],
    profile: Profile,
    path: Path<'_>,
) -> Result<Vec<(String, u32)>> {
    // Where each weight was written, so that a refusal can name it.
    enum WrittenAt<'a> {
        Key(&'a str),
        Item(usize),
    }
    let entries: Vec<(String, &Value, WrittenAt)> = match rollout {
        Value::Object(entries) => entries
            .iter()
            .map(|(variant, weight)| (variant.clone(), weight, WrittenAt::Key(variant)))
            .collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let item_path = path.index(index);
                let entry = object(item, item_path)?;
                refuse_unknown_fields(entry, &["variant", "weight"], item_path)?;
                let variant = optional_string(entry, "variant", item_path)?.ok_or_else(|| {
                    ValidationError::new(item_path.field("variant"), "is required")
                })?;
                let weight = entry.get("weight").ok_or_else(|| {
                    ValidationError::new(item_path.field("weight"), "is required")
                })?;
                Ok((variant, weight, WrittenAt::Item(index)))
            })
            .collect::<Result<_>>()?,
        _ => {
            return Err(ValidationError::new(
                path,
                "must be an object of variant: weight or an array of {variant, weight}",
            ))
        }
    };
    let mut weights: Vec<(String, u32)> = Vec::with_capacity(entries.len());
    let mut total = 0u64;
    for (variant, weight, written_at) in entries {
        let item_path;
        let weight_path = match written_at {
            WrittenAt::Key(name) => path.field(name),
            WrittenAt::Item(index) => {
                item_path = path.index(index);
                item_path.field("weight")
            }
        };
        require_variant(variants, &variant, weight_path)?;
        if weights.iter().any(|(seen, _)| *seen == variant) {
            return Err(ValidationError::new(weight_path, "variant listed twice"));
        }
        let weight = if profile.has_integer_weights() {
            weight
                .as_u64()
                .and_then(|weight| u32::try_from(weight).ok())
                .filter(|weight| *weight <= 1_000_000)
                .ok_or_else(|| {
                    ValidationError::new(
                        weight_path,
                        format!(
                            "must be a whole number from 0 to 1000000 ({} weights)",
                            profile.as_str()
                        ),
                    )
                })?
        } else {
            weight
                .as_f64()
                .and_then(crate::bucketing::weight_from_percent)
                .ok_or_else(|| {
                    ValidationError::new(
                        weight_path,
                        "must be a percentage from 0 to 100 with at most three decimals",
                    )
                })?
        };
        total += u64::from(weight);
        weights.push((variant, weight));
    }
    if profile.has_integer_weights() {
        if total == 0 {
            return Err(ValidationError::new(path, "weights sum to 0"));
        }
    } else if total != u64::from(BUCKETS) {
        return Err(ValidationError::new(
            path,
            format!("weights sum to {}%, not 100%", total as f64 / 1000.0),
        ));
    }
    if rollout.is_object() {
        // Lay buckets out in the flag's variant order, independent of how
        // the document happened to list them.
        weights.sort_by_key(|(name, _)| variants.iter().position(|(known, _)| known == name));
    }
    Ok(weights)
}

/// `{"variant": "on"}` or `{"rollout": {"on": 25, "off": 75}, "bucket_by": ..., "salt": ...}`.
pub fn parse_serve(
    value: &Value,
    variants: &[(String, Value)],
    bucketing: Profile,
    path: Path<'_>,
) -> Result<Serve> {
    let map = object(value, path)?;
    refuse_unknown_fields(map, SERVE_FIELDS, path)?;
    match (map.get("variant"), map.get("rollout")) {
        (Some(_), Some(_)) => Err(ValidationError::new(
            path,
            "give either \"variant\" or \"rollout\", not both",
        )),
        (Some(Value::String(name)), None) => {
            require_variant(variants, name, path.field("variant"))?;
            Ok(Serve::Variant(name.clone()))
        }
        (Some(_), None) => Err(ValidationError::new(
            path.field("variant"),
            "must be a string",
        )),
        (None, Some(rollout)) => {
            let profile = parse_profile(map, path, bucketing)?;
            let weights = parse_weights(rollout, variants, profile, path.field("rollout"))?;
            let unplaced = optional_string(map, "unplaced", path)?;
            if let Some(variant) = &unplaced {
                require_variant(variants, variant, path.field("unplaced"))?;
            }
            Ok(Serve::Rollout(Rollout {
                unplaced,
                weights,
                bucket_by: parse_bucket_by(map, path)?,
                salt: optional_string(map, "salt", path)?,
                profile,
            }))
        }
        (None, None) => Err(ValidationError::new(
            path,
            "needs \"variant\" or \"rollout\"",
        )),
    }
}
