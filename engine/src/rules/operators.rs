//! The condition operators documents name, the JSON types the `type`
//! operator tests, and what a condition answers when its attribute is
//! missing.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Eq,
    Neq,
    In,
    NotIn,
    Contains,
    StartsWith,
    EndsWith,
    Matches,
    Gt,
    Gte,
    Lt,
    Lte,
    Before,
    After,
    SemverEq,
    SemverGt,
    SemverLt,
    Exists,
    SemverGte,
    SemverLte,
    InCidr,
    Type,
    VersionEq,
    VersionGt,
    VersionGte,
    VersionLt,
    VersionLte,
}

impl Operator {
    pub const NAMES: &'static [&'static str] = &[
        "eq",
        "neq",
        "in",
        "not_in",
        "contains",
        "starts_with",
        "ends_with",
        "matches",
        "gt",
        "gte",
        "lt",
        "lte",
        "before",
        "after",
        "semver_eq",
        "semver_gt",
        "semver_lt",
        "exists",
        "semver_gte",
        "semver_lte",
        "in_cidr",
        "type",
        "version_eq",
        "version_gt",
        "version_gte",
        "version_lt",
        "version_lte",
    ];

    pub fn parse(name: &str) -> Option<Operator> {
        Some(match name {
            "eq" => Operator::Eq,
            "neq" => Operator::Neq,
            "in" => Operator::In,
            "not_in" => Operator::NotIn,
            "contains" => Operator::Contains,
            "starts_with" => Operator::StartsWith,
            "ends_with" => Operator::EndsWith,
            "matches" => Operator::Matches,
            "gt" => Operator::Gt,
            "gte" => Operator::Gte,
            "lt" => Operator::Lt,
            "lte" => Operator::Lte,
            "before" => Operator::Before,
            "after" => Operator::After,
            "semver_eq" => Operator::SemverEq,
            "semver_gt" => Operator::SemverGt,
            "semver_lt" => Operator::SemverLt,
            "exists" => Operator::Exists,
            "semver_gte" => Operator::SemverGte,
            "semver_lte" => Operator::SemverLte,
            "in_cidr" => Operator::InCidr,
            "type" => Operator::Type,
            "version_eq" => Operator::VersionEq,
            "version_gt" => Operator::VersionGt,
            "version_gte" => Operator::VersionGte,
            "version_lt" => Operator::VersionLt,
            "version_lte" => Operator::VersionLte,
            _ => return None,
        })
    }
}

/// The JSON types the `type` operator names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonType {
    String,
    Number,
    Boolean,
    Array,
    Object,
    Null,
}

impl JsonType {
    pub(super) const NAMES: &'static [&'static str] =
        &["string", "number", "boolean", "array", "object", "null"];

    pub(super) fn parse(name: &str) -> Option<JsonType> {
        Some(match name {
            "string" => JsonType::String,
            "number" => JsonType::Number,
            "boolean" => JsonType::Boolean,
            "array" => JsonType::Array,
            "object" => JsonType::Object,
            "null" => JsonType::Null,
            _ => return None,
        })
    }

    pub fn of(value: &Value) -> JsonType {
        match value {
            Value::String(_) => JsonType::String,
            Value::Number(_) => JsonType::Number,
            Value::Bool(_) => JsonType::Boolean,
            Value::Array(_) => JsonType::Array,
            Value::Object(_) => JsonType::Object,
            Value::Null => JsonType::Null,
        }
    }
}

/// What a condition answers when its attribute is absent or null.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMissing {
    /// This outcome, whatever the operator and `negate` say.
    Outcome(bool),
    /// Compare the current time instead (`before`/`after` only): Unleash's
    /// date constraints read the clock when the context carries no time.
    Now,
}

pub fn op_name(op: Operator) -> &'static str {
    Operator::NAMES[op as usize]
}
