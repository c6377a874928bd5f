//! The flag and segment documents of DESIGN.md: parsed from JSON, validated
//! field by field, and turned into typed definitions. Every refusal names the
//! path of the offending field so a DBA can find it in a large document.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use super::conditions::{Condition, IfMissing, Operator};
use super::criteria::{ArrayTest, Criterion};
use crate::bucketing::{Profile, BUCKETS};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidationError {
    /// Dotted path of the offending field, e.g. `environments.production.rules[0].serve`.
    pub path: String,
    pub message: String,
}

impl ValidationError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ValidationError {}

pub type Result<T> = std::result::Result<T, ValidationError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Boolean,
    Percentage,
    Plan,
    Multivariate,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Boolean => "boolean",
            Kind::Percentage => "percentage",
            Kind::Plan => "plan",
            Kind::Multivariate => "multivariate",
        }
    }

    fn parse(text: &str) -> Option<Kind> {
        Some(match text {
            "boolean" => Kind::Boolean,
            "percentage" => Kind::Percentage,
            "plan" => Kind::Plan,
            "multivariate" => Kind::Multivariate,
            _ => return None,
        })
    }
}

/// The flag-level part of a flag document (everything but `environments`).
#[derive(Debug, Clone, PartialEq)]
pub struct FlagDefinition {
    pub key: String,
    pub kind: Kind,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Sorted by variant name: the fixed order rollouts lay buckets out in.
    pub variants: Vec<(String, Value)>,
    pub off_variant: String,
    pub prerequisites: Vec<Prerequisite>,
    pub salt: Option<String>,
    /// The bucketing of rollouts and samples that name none.
    pub bucketing: Option<Profile>,
    pub archived: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prerequisite {
    pub flag: String,
    /// Met when the prerequisite flag serves any of these.
    pub variants: Vec<String>,
}

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

#[derive(Debug, Clone, PartialEq)]
pub struct SegmentDefinition {
    pub key: String,
    pub name: Option<String>,
    pub included: Vec<String>,
    pub excluded: Vec<String>,
    pub conditions: Vec<Criterion>,
}

/// A whole flag document as `put_flag` receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagDocument {
    pub flag: FlagDefinition,
    pub environments: BTreeMap<String, EnvironmentConfig>,
}

const FLAG_FIELDS: &[&str] = &[
    "key",
    "kind",
    "name",
    "description",
    "variants",
    "off_variant",
    "prerequisites",
    "salt",
    "bucketing",
    "archived",
    "environments",
];
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
const SEGMENT_FIELDS: &[&str] = &[
    "key",
    "name",
    "description",
    "included",
    "excluded",
    "conditions",
];
const CONDITION_FIELDS: &[&str] = &[
    "attribute",
    "op",
    "values",
    "value",
    "negate",
    "case_insensitive",
    "if_missing",
];

/// Keys of flags, segments and variants: what a URL or a log line can carry.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>> {
    value
        .as_object()
        .ok_or_else(|| ValidationError::new(path, "must be a JSON object"))
}

fn refuse_unknown_fields(map: &Map<String, Value>, allowed: &[&str], path: &str) -> Result<()> {
    match map.keys().find(|field| !allowed.contains(&field.as_str())) {
        Some(field) => Err(ValidationError::new(
            join(path, field),
            format!("unknown field; expected one of: {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

fn optional_string(map: &Map<String, Value>, field: &str, path: &str) -> Result<Option<String>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(ValidationError::new(join(path, field), "must be a string")),
    }
}

fn optional_bool(map: &Map<String, Value>, field: &str, path: &str) -> Result<Option<bool>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(flag)) => Ok(Some(*flag)),
        Some(_) => Err(ValidationError::new(
            join(path, field),
            "must be true or false",
        )),
    }
}

fn key_field(map: &Map<String, Value>, field: &str, path: &str) -> Result<String> {
    let key = optional_string(map, field, path)?
        .ok_or_else(|| ValidationError::new(join(path, field), "is required"))?;
    if !is_valid_key(&key) {
        return Err(ValidationError::new(
            join(path, field),
            format!("\"{key}\" is not a valid key (1 to 128 letters, digits, '-', '_' or '.')"),
        ));
    }
    Ok(key)
}

fn string_list(value: Option<&Value>, path: &str) -> Result<Vec<String>> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| match item {
                Value::String(text) => Ok(text.clone()),
                Value::Number(number) => Ok(number.to_string()),
                _ => Err(ValidationError::new(
                    format!("{path}[{index}]"),
                    "must be a string",
                )),
            })
            .collect(),
        Some(_) => Err(ValidationError::new(path, "must be an array of strings")),
    }
}

/// Parses and validates a whole flag document.
pub fn parse_flag_document(document: &Value) -> Result<FlagDocument> {
    let map = object(document, "")?;
    let flag = parse_flag_definition(document)?;
    let mut environments = BTreeMap::new();
    match map.get("environments") {
        None | Some(Value::Null) => {}
        Some(Value::Object(envs)) => {
            for (env_key, config) in envs {
                let path = format!("environments.{env_key}");
                environments.insert(
                    env_key.clone(),
                    parse_environment_config(
                        config,
                        &flag.variants,
                        flag.bucketing.unwrap_or_default(),
                        &path,
                    )?,
                );
            }
        }
        Some(_) => {
            return Err(ValidationError::new(
                "environments",
                "must be an object keyed by environment",
            ))
        }
    }
    Ok(FlagDocument { flag, environments })
}

/// Parses the flag-level fields; `environments`, if present, is left alone.
pub fn parse_flag_definition(document: &Value) -> Result<FlagDefinition> {
    let map = object(document, "")?;
    refuse_unknown_fields(map, FLAG_FIELDS, "")?;
    let key = key_field(map, "key", "")?;
    let kind = match optional_string(map, "kind", "")? {
        None => Kind::Boolean,
        Some(text) => Kind::parse(&text).ok_or_else(|| {
            ValidationError::new(
                "kind",
                format!(
                    "unknown kind \"{text}\"; expected boolean, percentage, plan or multivariate"
                ),
            )
        })?,
    };

    let variants: Vec<(String, Value)> = match map.get("variants") {
        None | Some(Value::Null) => match kind {
            Kind::Multivariate => {
                return Err(ValidationError::new(
                    "variants",
                    "is required for a multivariate flag",
                ))
            }
            _ => vec![
                ("off".into(), Value::Bool(false)),
                ("on".into(), Value::Bool(true)),
            ],
        },
        Some(Value::Object(entries)) => {
            let mut variants: Vec<(String, Value)> = entries
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            variants.sort_by(|a, b| a.0.cmp(&b.0));
            variants
        }
        Some(_) => {
            return Err(ValidationError::new(
                "variants",
                "must be an object of name: value",
            ))
        }
    };
    if variants.is_empty() {
        return Err(ValidationError::new(
            "variants",
            "needs at least one variant",
        ));
    }
    for (name, value) in &variants {
        if !is_valid_key(name) {
            return Err(ValidationError::new(
                format!("variants.{name}"),
                "is not a valid variant name (letters, digits, '-', '_' or '.')",
            ));
        }
        check_value_depth(value, &format!("variants.{name}"))?;
        if kind != Kind::Multivariate && !value.is_boolean() {
            return Err(ValidationError::new(
                format!("variants.{name}"),
                format!("a {} flag's variants must be true or false", kind.as_str()),
            ));
        }
    }

    let off_variant = match optional_string(map, "off_variant", "")? {
        Some(name) => name,
        None if variants.iter().any(|(name, _)| name == "off") => "off".to_string(),
        None => {
            return Err(ValidationError::new(
                "off_variant",
                "is required when no variant is named \"off\"",
            ))
        }
    };
    if !variants.iter().any(|(name, _)| *name == off_variant) {
        return Err(ValidationError::new(
            "off_variant",
            format!("\"{off_variant}\" is not one of the variants"),
        ));
    }

    let prerequisites = match map.get("prerequisites") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let path = format!("prerequisites[{index}]");
                let entry = object(item, &path)?;
                refuse_unknown_fields(entry, &["flag", "variant", "variants"], &path)?;
                let flag = key_field(entry, "flag", &path)?;
                if flag == key {
                    return Err(ValidationError::new(
                        join(&path, "flag"),
                        "a flag cannot be its own prerequisite",
                    ));
                }
                let variants = match (entry.get("variant"), entry.get("variants")) {
                    (Some(_), Some(_)) => {
                        return Err(ValidationError::new(
                            &path,
                            "give \"variant\" or \"variants\", not both",
                        ))
                    }
                    (None, Some(list)) => {
                        let list = string_list(Some(list), &join(&path, "variants"))?;
                        if list.is_empty() {
                            return Err(ValidationError::new(
                                join(&path, "variants"),
                                "needs at least one variant",
                            ));
                        }
                        list
                    }
                    _ => vec![optional_string(entry, "variant", &path)?
                        .unwrap_or_else(|| "on".to_string())],
                };
                Ok(Prerequisite { flag, variants })
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(ValidationError::new("prerequisites", "must be an array")),
    };

    Ok(FlagDefinition {
        key,
        kind,
        name: optional_string(map, "name", "")?,
        description: optional_string(map, "description", "")?,
        variants,
        off_variant,
        prerequisites,
        salt: optional_string(map, "salt", "")?,
        bucketing: match map.get("bucketing") {
            None | Some(Value::Null) => None,
            Some(_) => Some(parse_profile(map, "", Profile::default())?),
        },
        archived: optional_bool(map, "archived", "")?.unwrap_or(false),
    })
}

fn require_variant(variants: &[(String, Value)], name: &str, path: &str) -> Result<()> {
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
    path: &str,
) -> Result<EnvironmentConfig> {
    let map = object(config, path)?;
    refuse_unknown_fields(map, ENVIRONMENT_FIELDS, path)?;
    let enabled = optional_bool(map, "enabled", path)?.unwrap_or(false);

    let mut targets = Vec::new();
    let mut seen_targets = std::collections::HashMap::new();
    match map.get("targets") {
        None | Some(Value::Null) => {}
        Some(Value::Object(entries)) => {
            for (variant, keys) in entries {
                let target_path = format!("{}.{variant}", join(path, "targets"));
                require_variant(variants, variant, &target_path)?;
                let keys = string_list(Some(keys), &target_path)?;
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
                join(path, "targets"),
                "must be an object of variant: [subject keys]",
            ))
        }
    }

    let mut rules = Vec::new();
    match map.get("rules") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) => {
            let mut ids = std::collections::HashSet::new();
            for (index, item) in items.iter().enumerate() {
                let rule_path = format!("{}[{index}]", join(path, "rules"));
                let rule = parse_rule(item, variants, bucketing, &rule_path, index)?;
                if !ids.insert(rule.id.clone()) {
                    return Err(ValidationError::new(
                        join(&rule_path, "id"),
                        format!("duplicate rule id \"{}\"", rule.id),
                    ));
                }
                rules.push(rule);
            }
        }
        Some(_) => {
            return Err(ValidationError::new(
                join(path, "rules"),
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
            &join(path, "default"),
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
    path: &str,
    index: usize,
) -> Result<Rule> {
    let map = object(value, path)?;
    refuse_unknown_fields(map, RULE_FIELDS, path)?;
    let id = match optional_string(map, "id", path)? {
        Some(id) if is_valid_key(&id) => id,
        Some(id) => {
            return Err(ValidationError::new(
                join(path, "id"),
                format!("\"{id}\" is not a valid rule id"),
            ))
        }
        None => format!("rule-{index}"),
    };
    let segment = match optional_string(map, "segment", path)? {
        Some(segment) if !is_valid_key(&segment) => {
            return Err(ValidationError::new(
                join(path, "segment"),
                format!("\"{segment}\" is not a valid segment key"),
            ))
        }
        other => other,
    };
    let conditions = parse_conditions(map.get("conditions"), &join(path, "conditions"))?;
    let sample = match map.get("sample") {
        None | Some(Value::Null) => None,
        Some(sample) => Some(parse_sample(sample, bucketing, &join(path, "sample"))?),
    };
    if segment.is_none() && conditions.is_empty() && sample.is_none() {
        return Err(ValidationError::new(
            path,
            "a rule needs a segment, a sample or at least one condition",
        ));
    }
    let serve = map
        .get("serve")
        .ok_or_else(|| ValidationError::new(join(path, "serve"), "is required"))?;
    let serve = parse_serve(serve, variants, bucketing, &join(path, "serve"))?;
    Ok(Rule {
        id,
        segment,
        conditions,
        sample,
        serve,
    })
}

fn parse_profile(map: &Map<String, Value>, path: &str, default: Profile) -> Result<Profile> {
    match optional_string(map, "bucketing", path)? {
        None => Ok(default),
        Some(name) => Profile::parse_named(&name)
            .map_err(|message| ValidationError::new(join(path, "bucketing"), message)),
    }
}

/// `"bucket_by": "attr"` or a list tried in turn; defaults to the targeting key.
fn parse_bucket_by(map: &Map<String, Value>, path: &str) -> Result<Vec<String>> {
    let field_path = join(path, "bucket_by");
    let attributes = match map.get("bucket_by") {
        None | Some(Value::Null) => vec!["targeting_key".to_string()],
        Some(Value::String(attribute)) => vec![attribute.clone()],
        Some(Value::Array(_)) => string_list(map.get("bucket_by"), &field_path)?,
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
fn parse_sample(value: &Value, bucketing: Profile, path: &str) -> Result<Sample> {
    let map = object(value, path)?;
    refuse_unknown_fields(map, SAMPLE_FIELDS, path)?;
    let profile = parse_profile(map, path, bucketing)?;
    let percent_path = join(path, "percent");
    let percent = map
        .get("percent")
        .ok_or_else(|| ValidationError::new(&percent_path, "is required"))?
        .as_f64()
        .and_then(crate::bucketing::weight_from_percent)
        .ok_or_else(|| {
            ValidationError::new(
                &percent_path,
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
    path: &str,
) -> Result<Vec<(String, u32)>> {
    let entries: Vec<(String, &Value, String)> = match rollout {
        Value::Object(entries) => entries
            .iter()
            .map(|(variant, weight)| (variant.clone(), weight, format!("{path}.{variant}")))
            .collect(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let item_path = format!("{path}[{index}]");
                let entry = object(item, &item_path)?;
                refuse_unknown_fields(entry, &["variant", "weight"], &item_path)?;
                let variant = optional_string(entry, "variant", &item_path)?.ok_or_else(|| {
                    ValidationError::new(join(&item_path, "variant"), "is required")
                })?;
                let weight = entry.get("weight").ok_or_else(|| {
                    ValidationError::new(join(&item_path, "weight"), "is required")
                })?;
                Ok((variant, weight, join(&item_path, "weight")))
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
    for (variant, weight, weight_path) in entries {
        require_variant(variants, &variant, &weight_path)?;
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
                        &weight_path,
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
                        &weight_path,
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
    path: &str,
) -> Result<Serve> {
    let map = object(value, path)?;
    refuse_unknown_fields(map, SERVE_FIELDS, path)?;
    match (map.get("variant"), map.get("rollout")) {
        (Some(_), Some(_)) => Err(ValidationError::new(
            path,
            "give either \"variant\" or \"rollout\", not both",
        )),
        (Some(Value::String(name)), None) => {
            require_variant(variants, name, &join(path, "variant"))?;
            Ok(Serve::Variant(name.clone()))
        }
        (Some(_), None) => Err(ValidationError::new(
            join(path, "variant"),
            "must be a string",
        )),
        (None, Some(rollout)) => {
            let profile = parse_profile(map, path, bucketing)?;
            let weights = parse_weights(rollout, variants, profile, &join(path, "rollout"))?;
            let unplaced = optional_string(map, "unplaced", path)?;
            if let Some(variant) = &unplaced {
                require_variant(variants, variant, &join(path, "unplaced"))?;
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
pub fn check_value_depth(value: &Value, path: &str) -> Result<()> {
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

pub fn parse_conditions(value: Option<&Value>, path: &str) -> Result<Vec<Criterion>> {
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
            .map(|(index, item)| parse_criterion(item, &format!("{path}[{index}]")))
            .collect(),
        Some(_) => Err(ValidationError::new(path, "must be an array of conditions")),
    }
}

/// A condition, or a group: `{"all": [...]}`, `{"any": [...]}`,
/// `{"not": {...}}`, `{"some": "attr", "where": [...]}`,
/// `{"length": "attr", "where": [...]}`.
fn parse_criterion(value: &Value, path: &str) -> Result<Criterion> {
    let map = object(value, path)?;
    let group = ["all", "any", "not", "some", "length"]
        .into_iter()
        .find(|kind| map.contains_key(*kind));
    let Some(kind) = group else {
        return parse_condition(value, path).map(Criterion::Condition);
    };
    let members = |field: &str| -> Result<Vec<Criterion>> {
        match map.get(field) {
            Some(Value::Array(_)) => parse_conditions(map.get(field), &join(path, field)),
            _ => Err(ValidationError::new(
                join(path, field),
                "must be an array of conditions",
            )),
        }
    };
    let array_test = |allowed: &[&str]| -> Result<ArrayTest> {
        refuse_unknown_fields(map, allowed, path)?;
        let attribute = optional_string(map, kind, path)?
            .filter(|attribute| !attribute.trim().is_empty())
            .ok_or_else(|| ValidationError::new(join(path, kind), "must name an attribute"))?;
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
            Criterion::Not(Box::new(parse_criterion(&map["not"], &join(path, "not"))?))
        }
        "some" => Criterion::Some(array_test(&["some", "where"])?),
        _ => Criterion::Length(array_test(&["length", "where"])?),
    })
}

fn parse_condition(value: &Value, path: &str) -> Result<Condition> {
    let map = object(value, path)?;
    refuse_unknown_fields(map, CONDITION_FIELDS, path)?;
    let attribute = optional_string(map, "attribute", path)?
        .filter(|attribute| !attribute.trim().is_empty())
        .ok_or_else(|| ValidationError::new(join(path, "attribute"), "is required"))?;
    let op_name = optional_string(map, "op", path)?
        .ok_or_else(|| ValidationError::new(join(path, "op"), "is required"))?;
    let op = Operator::parse(&op_name).ok_or_else(|| {
        ValidationError::new(
            join(path, "op"),
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
                join(path, "values"),
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
                join(path, "if_missing"),
                "must be true, false or \"now\"",
            ))
        }
    };
    Condition::compile(attribute, op, &values, negate, case_insensitive)
        .map_err(|message| ValidationError::new(join(path, "values"), message))?
        .with_if_missing(if_missing)
        .map_err(|message| ValidationError::new(join(path, "if_missing"), message))
}

pub fn parse_segment(document: &Value) -> Result<SegmentDefinition> {
    let map = object(document, "")?;
    refuse_unknown_fields(map, SEGMENT_FIELDS, "")?;
    Ok(SegmentDefinition {
        key: key_field(map, "key", "")?,
        name: optional_string(map, "name", "")?,
        included: string_list(map.get("included"), "included")?,
        excluded: string_list(map.get("excluded"), "excluded")?,
        conditions: parse_conditions(map.get("conditions"), "conditions")?,
    })
}
