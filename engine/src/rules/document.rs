//! The flag and segment documents of DESIGN.md: parsed from JSON, validated
//! field by field, and turned into typed definitions. Every refusal names the
//! path of the offending field so a DBA can find it in a large document.

use std::collections::BTreeMap;

use serde_json::Value;

use super::condition_documents::{check_value_depth, parse_conditions};
use super::criteria::Criterion;
use super::environment_config::{parse_environment_config, parse_profile, EnvironmentConfig};
use super::fields::{
    is_valid_key, key_field, object, optional_bool, optional_string, refuse_unknown_fields,
    string_list, Result, ValidationError, ROOT,
};
use crate::bucketing::Profile;

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
const SEGMENT_FIELDS: &[&str] = &[
    "key",
    "name",
    "description",
    "included",
    "excluded",
    "conditions",
];

/// Parses and validates a whole flag document.
pub fn parse_flag_document(document: &Value) -> Result<FlagDocument> {
    let map = object(document, ROOT)?;
    let flag = parse_flag_definition(document)?;
    let mut environments = BTreeMap::new();
    match map.get("environments") {
        None | Some(Value::Null) => {}
        Some(Value::Object(envs)) => {
            let environments_path = ROOT.field("environments");
            for (env_key, config) in envs {
                let path = environments_path.field(env_key);
                environments.insert(
                    env_key.clone(),
                    parse_environment_config(
                        config,
                        &flag.variants,
                        flag.bucketing.unwrap_or_default(),
                        path,
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
    let map = object(document, ROOT)?;
    refuse_unknown_fields(map, FLAG_FIELDS, ROOT)?;
    let key = key_field(map, "key", ROOT)?;
    let kind = match optional_string(map, "kind", ROOT)? {
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
        check_value_depth(value, ROOT.field("variants").field(name))?;
        if kind != Kind::Multivariate && !value.is_boolean() {
            return Err(ValidationError::new(
                format!("variants.{name}"),
                format!("a {} flag's variants must be true or false", kind.as_str()),
            ));
        }
    }

    let off_variant = match optional_string(map, "off_variant", ROOT)? {
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

    let prerequisites_path = ROOT.field("prerequisites");
    let prerequisites = match map.get("prerequisites") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| {
                let path = prerequisites_path.index(index);
                let entry = object(item, path)?;
                refuse_unknown_fields(entry, &["flag", "variant", "variants"], path)?;
                let flag = key_field(entry, "flag", path)?;
                if flag == key {
                    return Err(ValidationError::new(
                        path.field("flag"),
                        "a flag cannot be its own prerequisite",
                    ));
                }
                let variants = match (entry.get("variant"), entry.get("variants")) {
                    (Some(_), Some(_)) => {
                        return Err(ValidationError::new(
                            path,
                            "give \"variant\" or \"variants\", not both",
                        ))
                    }
                    (None, Some(list)) => {
                        let list = string_list(Some(list), path.field("variants"))?;
                        if list.is_empty() {
                            return Err(ValidationError::new(
                                path.field("variants"),
                                "needs at least one variant",
                            ));
                        }
                        list
                    }
                    _ => vec![optional_string(entry, "variant", path)?
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
        name: optional_string(map, "name", ROOT)?,
        description: optional_string(map, "description", ROOT)?,
        variants,
        off_variant,
        prerequisites,
        salt: optional_string(map, "salt", ROOT)?,
        bucketing: match map.get("bucketing") {
            None | Some(Value::Null) => None,
            Some(_) => Some(parse_profile(map, ROOT, Profile::default())?),
        },
        archived: optional_bool(map, "archived", ROOT)?.unwrap_or(false),
    })
}

pub fn parse_segment(document: &Value) -> Result<SegmentDefinition> {
    let map = object(document, ROOT)?;
    refuse_unknown_fields(map, SEGMENT_FIELDS, ROOT)?;
    Ok(SegmentDefinition {
        key: key_field(map, "key", ROOT)?,
        name: optional_string(map, "name", ROOT)?,
        included: string_list(map.get("included"), ROOT.field("included"))?,
        excluded: string_list(map.get("excluded"), ROOT.field("excluded"))?,
        conditions: parse_conditions(map.get("conditions"), ROOT.field("conditions"))?,
    })
}
