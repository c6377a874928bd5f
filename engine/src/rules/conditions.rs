//! Condition operators, compiled once when configuration is loaded: regexes
//! built, semvers and timestamps parsed, numbers converted, so that matching
//! a context does no parsing of the rule side.

use ipnet::IpNet;
use regex::{Regex, RegexBuilder};
use semver::Version;
use std::borrow::Cow;
use std::net::IpAddr;

use serde_json::Value;

use super::operators::{op_name, IfMissing, JsonType, Operator};

/// The rule side of a condition, in the form matching needs.
#[derive(Debug, Clone)]
enum Operands {
    /// eq, neq, in, not_in: strings (lower-cased when case-insensitive) and numbers.
    Scalars(Vec<Scalar>),
    /// contains, starts_with, ends_with.
    Strings(Vec<String>),
    Patterns(Vec<Regex>),
    Number(f64),
    /// Milliseconds since the Unix epoch.
    Instant(i64),
    Version(Version),
    Networks(Vec<IpNet>),
    /// gt/gte/lt/lte against a string: strings compare by code point, a
    /// number attribute against the operand's numeric value.
    Text(String, Option<f64>),
    Types(Vec<JsonType>),
    /// version_*: the operand as a padded version string.
    Padded(String),
    None,
}

#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Text(String),
    Number(f64),
    Bool(bool),
    /// An array or object, equal only to the same JSON value as a whole.
    Json(Value),
}

/// Where conditions read context attributes from: a JSON object, or only
/// the keys a caller extracted from a larger document.
pub trait Attributes {
    fn get(&self, key: &str) -> Option<&Value>;
}

impl<T: Attributes + ?Sized> Attributes for &T {
    fn get(&self, key: &str) -> Option<&Value> {
        (**self).get(key)
    }
}

impl Attributes for serde_json::Map<String, Value> {
    fn get(&self, key: &str) -> Option<&Value> {
        serde_json::Map::get(self, key)
    }
}

/// One compiled condition. `attribute` is a dotted path into the context.
#[derive(Debug, Clone)]
pub struct Condition {
    pub attribute: String,
    path: Vec<String>,
    pub op: Operator,
    pub negate: bool,
    pub case_insensitive: bool,
    pub if_missing: Option<IfMissing>,
    operands: Operands,
    /// The values as written, for export.
    pub values: Vec<Value>,
}

impl PartialEq for Condition {
    fn eq(&self, other: &Self) -> bool {
        self.attribute == other.attribute
            && self.op == other.op
            && self.negate == other.negate
            && self.case_insensitive == other.case_insensitive
            && self.if_missing == other.if_missing
            && self.values == other.values
    }
}

/// Accepts `1.2.3`, `v1.2.3`, and the short forms `1` and `1.2` that app
/// versions often take, padding them with zeros.
pub fn parse_version(text: &str) -> Option<Version> {
    let text = text.trim();
    let text = text.strip_prefix('v').unwrap_or(text);
    if let Ok(version) = Version::parse(text) {
        return Some(version);
    }
    let split_at = text.find(['-', '+']).unwrap_or(text.len());
    let (core, rest) = text.split_at(split_at);
    let padded = match core.split('.').count() {
        1 => format!("{core}.0.0{rest}"),
        2 => format!("{core}.0{rest}"),
        _ => return None,
    };
    Version::parse(&padded).ok()
}

/// RFC 3339 timestamps, or numbers as seconds since the Unix epoch (what
/// `extract(epoch from ...)` gives in SQL). Returns milliseconds.
pub fn parse_instant(value: &Value) -> Option<i64> {
    match value {
        Value::String(text) => chrono::DateTime::parse_from_rfc3339(text.trim())
            .ok()
            .map(|instant| instant.timestamp_millis()),
        Value::Number(number) => number
            .as_f64()
            .filter(|seconds| seconds.is_finite())
            .map(|seconds| (seconds * 1000.0) as i64),
        _ => None,
    }
}

fn number_of(value: &Value) -> Option<f64> {
    match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().parse::<f64>().ok().filter(|n| n.is_finite()),
        _ => None,
    }
}

impl Condition {
    /// Compiles a condition, or says what is wrong with its values.
    pub fn compile(
        attribute: String,
        op: Operator,
        values: &[Value],
        negate: bool,
        case_insensitive: bool,
    ) -> Result<Condition, String> {
        let fold = |text: &str| {
            if case_insensitive {
                text.to_lowercase()
            } else {
                text.to_string()
            }
        };
        let need_values = || {
            if values.is_empty() {
                Err(format!(
                    "operator \"{}\" needs at least one value",
                    op_name(op)
                ))
            } else {
                Ok(())
            }
        };
        let single = || -> Result<&Value, String> {
            match values {
                [one] => Ok(one),
                _ => Err(format!(
                    "operator \"{}\" takes exactly one value",
                    op_name(op)
                )),
            }
        };
        let operands = match op {
            Operator::Eq | Operator::Neq | Operator::In | Operator::NotIn => {
                need_values()?;
                let scalars = values
                    .iter()
                    .map(|value| match value {
                        Value::String(text) => Ok(Scalar::Text(fold(text))),
                        Value::Number(number) => number
                            .as_f64()
                            .map(Scalar::Number)
                            .ok_or_else(|| "number out of range".to_string()),
                        Value::Bool(flag) => Ok(Scalar::Bool(*flag)),
                        Value::Array(_) | Value::Object(_) if !case_insensitive => {
                            Ok(Scalar::Json(value.clone()))
                        }
                        _ => Err(
                            "values must be strings, numbers, booleans, arrays or objects \
                             (no null, and no arrays or objects case-insensitively)"
                                .to_string(),
                        ),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Operands::Scalars(scalars)
            }
            Operator::Contains | Operator::StartsWith | Operator::EndsWith => {
                need_values()?;
                let strings = values
                    .iter()
                    .map(|value| match value {
                        Value::String(text) => Ok(fold(text)),
                        _ => Err(format!("operator \"{}\" takes string values", op_name(op))),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Operands::Strings(strings)
            }
            Operator::Matches => {
                need_values()?;
                let patterns =
                    values
                        .iter()
                        .map(|value| match value {
                            Value::String(pattern) => RegexBuilder::new(pattern)
                                .case_insensitive(case_insensitive)
                                .size_limit(1 << 20)
                                .build()
                                .map_err(|error| {
                                    format!("invalid regular expression \"{pattern}\": {error}")
                                }),
                            _ => Err("operator \"matches\" takes regular expressions as strings"
                                .to_string()),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                Operands::Patterns(patterns)
            }
            Operator::Gt | Operator::Gte | Operator::Lt | Operator::Lte => {
                let value = single()?;
                match value {
                    Value::Number(number) => Operands::Number(
                        number
                            .as_f64()
                            .ok_or_else(|| "number out of range".to_string())?,
                    ),
                    Value::String(text) => Operands::Text(text.clone(), number_of(value)),
                    _ => {
                        return Err(format!(
                            "operator \"{}\" compares numbers or strings",
                            op_name(op)
                        ))
                    }
                }
            }
            Operator::VersionEq
            | Operator::VersionGt
            | Operator::VersionGte
            | Operator::VersionLt
            | Operator::VersionLte => match single()? {
                value @ (Value::String(_) | Value::Number(_)) => {
                    Operands::Padded(padded_version(value))
                }
                _ => {
                    return Err(format!(
                        "operator \"{}\" takes a version as a string",
                        op_name(op)
                    ))
                }
            },
            Operator::Type => {
                need_values()?;
                let types = values
                    .iter()
                    .map(|value| {
                        value.as_str().and_then(JsonType::parse).ok_or_else(|| {
                            format!(
                                "operator \"type\" takes type names: {}",
                                JsonType::NAMES.join(", ")
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Operands::Types(types)
            }
            Operator::Before | Operator::After => {
                let value = single()?;
                Operands::Instant(parse_instant(value).ok_or_else(|| {
                    format!(
                        "operator \"{}\" takes an RFC 3339 timestamp or seconds since the epoch",
                        op_name(op)
                    )
                })?)
            }
            Operator::SemverEq
            | Operator::SemverGt
            | Operator::SemverLt
            | Operator::SemverGte
            | Operator::SemverLte => {
                let value = single()?;
                let version = value.as_str().and_then(parse_version).ok_or_else(|| {
                    format!(
                        "operator \"{}\" takes a semantic version such as \"1.2.3\"",
                        op_name(op)
                    )
                })?;
                Operands::Version(version)
            }
            Operator::InCidr => {
                need_values()?;
                let networks = values
                    .iter()
                    .map(|value| value.as_str().and_then(parse_network).ok_or_else(|| {
                        format!("operator \"in_cidr\" takes IPv4 or IPv6 addresses or CIDR ranges, not {value}")
                    }))
                    .collect::<Result<Vec<_>, _>>()?;
                Operands::Networks(networks)
            }
            Operator::Exists => {
                if !values.is_empty() {
                    return Err("operator \"exists\" takes no values".to_string());
                }
                Operands::None
            }
        };
        if case_insensitive
            && !matches!(
                op,
                Operator::Eq
                    | Operator::Neq
                    | Operator::In
                    | Operator::NotIn
                    | Operator::Contains
                    | Operator::StartsWith
                    | Operator::EndsWith
                    | Operator::Matches
            )
        {
            return Err(format!(
                "\"case_insensitive\" applies to string operators, not \"{}\"",
                op_name(op)
            ));
        }
        let path = attribute.split('.').map(str::to_string).collect();
        Ok(Condition {
            attribute,
            path,
            op,
            negate,
            case_insensitive,
            if_missing: None,
            operands,
            values: values.to_vec(),
        })
    }

    /// Sets the answer for an absent attribute; `Now` only suits `before`
    /// and `after`.
    pub fn with_if_missing(mut self, if_missing: Option<IfMissing>) -> Result<Condition, String> {
        if if_missing == Some(IfMissing::Now)
            && !matches!(self.op, Operator::Before | Operator::After)
        {
            return Err(format!(
                "\"if_missing\": \"now\" applies to \"before\" and \"after\", not \"{}\"",
                op_name(self.op)
            ));
        }
        self.if_missing = if_missing;
        Ok(self)
    }

    /// The top-level context keys this condition may read: the attribute as
    /// a flat key, and the head of its dotted path.
    pub fn context_keys(&self) -> [&str; 2] {
        [self.attribute.as_str(), self.path[0].as_str()]
    }

    /// Looks the attribute up in the context: a top-level key of that exact
    /// name first (so `"user.email"` may be flat), then the dotted path.
    pub fn lookup<'a>(&self, context: &'a dyn Attributes) -> Option<&'a Value> {
        lookup_path(context, &self.attribute, &self.path)
    }

    /// Whether the context satisfies the condition. A missing or null
    /// attribute never matches, even negated, except for `exists` and
    /// unless `if_missing` says otherwise.
    pub fn matches(&self, context: &dyn Attributes) -> bool {
        let attribute = self.lookup(context).filter(|value| !value.is_null());
        let Some(attribute) = attribute else {
            return match self.if_missing {
                Some(IfMissing::Outcome(outcome)) => outcome,
                Some(IfMissing::Now) => self.compare_instant(now_millis()) != self.negate,
                None if self.op == Operator::Type => {
                    self.matches_scalar(&Value::Null) != self.negate
                }
                None => self.op == Operator::Exists && self.negate,
            };
        };
        let outcome = match attribute {
            // An array attribute (e.g. a user's groups) matches when any
            // element does, unless the condition compares whole values.
            Value::Array(items)
                if !matches!(self.op, Operator::Exists | Operator::Type)
                    && !self.compares_whole_values() =>
            {
                items.iter().any(|item| self.matches_scalar(item))
            }
            _ => self.matches_scalar(attribute),
        };
        outcome != self.negate
    }

    fn compares_whole_values(&self) -> bool {
        matches!(&self.operands, Operands::Scalars(scalars)
            if scalars.iter().any(|scalar| matches!(scalar, Scalar::Json(_))))
    }

    fn text_of<'v>(&self, value: &'v Value) -> Option<Cow<'v, str>> {
        let text = match value {
            Value::String(text) => Cow::Borrowed(text.as_str()),
            Value::Number(number) => Cow::Owned(number.to_string()),
            Value::Bool(flag) => Cow::Borrowed(if *flag { "true" } else { "false" }),
            _ => return None,
        };
        Some(if self.case_insensitive {
            Cow::Owned(text.to_lowercase())
        } else {
            text
        })
    }

    fn equals_any(&self, value: &Value, scalars: &[Scalar]) -> bool {
        scalars.iter().any(|scalar| match (scalar, value) {
            (Scalar::Bool(expected), Value::Bool(actual)) => expected == actual,
            (Scalar::Json(expected), _) => expected == value,
            (Scalar::Number(expected), _) => number_of(value) == Some(*expected),
            (Scalar::Text(expected), Value::String(_) | Value::Number(_) | Value::Bool(_)) => {
                self.text_of(value).as_deref() == Some(expected.as_str())
            }
            _ => false,
        })
    }

    fn matches_scalar(&self, value: &Value) -> bool {
        match (&self.operands, self.op) {
            (Operands::Scalars(scalars), Operator::Eq | Operator::In) => {
                self.equals_any(value, scalars)
            }
            (Operands::Scalars(scalars), Operator::Neq | Operator::NotIn) => {
                !self.equals_any(value, scalars)
            }
            (Operands::Strings(needles), op) => {
                let Some(text) = self.text_of(value) else {
                    return false;
                };
                needles.iter().any(|needle| match op {
                    Operator::Contains => text.contains(needle.as_str()),
                    Operator::StartsWith => text.starts_with(needle.as_str()),
                    _ => text.ends_with(needle.as_str()),
                })
            }
            (Operands::Patterns(patterns), _) => match value {
                Value::String(text) => patterns.iter().any(|pattern| pattern.is_match(text)),
                _ => false,
            },
            (Operands::Number(bound), op) => match value {
                Value::Number(_) | Value::String(_) => match number_of(value) {
                    Some(actual) => match op {
                        Operator::Gt => actual > *bound,
                        Operator::Gte => actual >= *bound,
                        Operator::Lt => actual < *bound,
                        _ => actual <= *bound,
                    },
                    None => false,
                },
                _ => false,
            },
            (Operands::Instant(_), _) => match parse_instant(value) {
                Some(actual) => self.compare_instant(actual),
                None => false,
            },
            (Operands::Version(bound), op) => match value.as_str().and_then(parse_version) {
                Some(actual) => {
                    let ordering = actual.cmp_precedence(bound);
                    match op {
                        Operator::SemverEq => ordering.is_eq(),
                        Operator::SemverGt => ordering.is_gt(),
                        Operator::SemverGte => ordering.is_ge(),
                        Operator::SemverLte => ordering.is_le(),
                        _ => ordering.is_lt(),
                    }
                }
                None => false,
            },
            (Operands::Networks(networks), _) => match value
                .as_str()
                .and_then(|text| text.trim().parse::<IpAddr>().ok())
            {
                Some(address) => networks.iter().any(|network| network.contains(&address)),
                None => false,
            },
            (Operands::Text(bound, numeric), op) => {
                let ordering = match value {
                    Value::String(text) => text.as_str().cmp(bound.as_str()),
                    Value::Number(number) => match (number.as_f64(), numeric) {
                        (Some(actual), Some(bound)) => match actual.partial_cmp(bound) {
                            Some(ordering) => ordering,
                            None => return false,
                        },
                        _ => return false,
                    },
                    _ => return false,
                };
                match op {
                    Operator::Gt => ordering.is_gt(),
                    Operator::Gte => ordering.is_ge(),
                    Operator::Lt => ordering.is_lt(),
                    _ => ordering.is_le(),
                }
            }
            (Operands::Types(types), _) => types.contains(&JsonType::of(value)),
            (Operands::Padded(bound), op) => {
                let ordering = padded_version(value).cmp(bound);
                match op {
                    Operator::VersionEq => ordering.is_eq(),
                    Operator::VersionGt => ordering.is_gt(),
                    Operator::VersionGte => ordering.is_ge(),
                    Operator::VersionLt => ordering.is_lt(),
                    _ => ordering.is_le(),
                }
            }
            (Operands::None, _) => true,
            (Operands::Scalars(_), _) => false,
        }
    }
}

impl Condition {
    fn compare_instant(&self, actual: i64) -> bool {
        match self.operands {
            Operands::Instant(bound) if self.op == Operator::Before => actual < bound,
            Operands::Instant(bound) => actual > bound,
            _ => false,
        }
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// GrowthBook's padded version string (its `paddedVersionString`), which
/// the `version_*` operators compare as text: a leading `v` and build
/// metadata dropped, parts split at `.` and `-`, numeric parts
/// right-aligned in five characters, and a `~` after a three-part release
/// so that it sorts after its pre-releases. Any number of parts works
/// (`1.2.3.4`), unlike SemVer.
pub fn padded_version(input: &Value) -> String {
    let text = match input {
        Value::Number(number) => number.to_string(),
        Value::String(text) if !text.is_empty() => text.clone(),
        _ => "0".to_string(),
    };
    let text = text.strip_prefix('v').unwrap_or(&text);
    let text = text.split('+').next().unwrap_or("");
    let mut parts: Vec<&str> = text.split(['-', '.']).collect();
    if parts.len() == 3 {
        parts.push("~");
    }
    parts
        .iter()
        .map(|part| {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                format!("{part:>5}")
            } else {
                part.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// An address (a network of one) or a CIDR range, IPv4 or IPv6.
pub fn parse_network(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

pub fn lookup_path<'a>(
    context: &'a dyn Attributes,
    attribute: &str,
    path: &[String],
) -> Option<&'a Value> {
    if let Some(value) = context.get(attribute) {
        return Some(value);
    }
    if path.len() < 2 {
        return None;
    }
    let mut current = context.get(&path[0])?;
    for segment in &path[1..] {
        current = current.as_object()?.get(segment)?;
    }
    Some(current)
}

#[cfg(test)]
mod tests;
