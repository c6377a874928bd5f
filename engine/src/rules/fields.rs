//! Reading a JSON document's fields: the error every refusal carries (with
//! the dotted path of the offending field, so a DBA can find it in a large
//! document) and the typed readers the document parsers share.

use std::fmt;

use serde_json::{Map, Value};

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

/// Keys of flags, segments and variants: what a URL or a log line can carry.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Where a field sits in a document. The parsers build it on the stack as
/// they descend and print it only when a refusal names it, so that loading
/// stored documents, which all validate, formats no path text at all (it
/// was a twentieth of a cold load).
#[derive(Debug, Clone, Copy)]
pub enum Path<'a> {
    /// The document itself (`""`), or a prefix the caller gave as text.
    Text(&'a str),
    Field(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

/// The document itself.
pub const ROOT: Path<'static> = Path::Text("");

impl<'a> Path<'a> {
    pub fn field(&'a self, name: &'a str) -> Path<'a> {
        Path::Field(self, name)
    }

    pub fn index(&'a self, index: usize) -> Path<'a> {
        Path::Index(self, index)
    }

    fn is_root(&self) -> bool {
        matches!(self, Path::Text(""))
    }
}

/// Dotted fields and bracketed indexes: `environments.production.rules[0].serve`.
impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Text(text) => f.write_str(text),
            Path::Field(parent, name) if parent.is_root() => f.write_str(name),
            Path::Field(parent, name) => write!(f, "{parent}.{name}"),
            Path::Index(parent, index) => write!(f, "{parent}[{index}]"),
        }
    }
}

impl From<Path<'_>> for String {
    fn from(path: Path<'_>) -> String {
        path.to_string()
    }
}

pub(crate) fn object<'a>(value: &'a Value, path: Path<'_>) -> Result<&'a Map<String, Value>> {
    value
        .as_object()
        .ok_or_else(|| ValidationError::new(path, "must be a JSON object"))
}

pub(crate) fn refuse_unknown_fields(
    map: &Map<String, Value>,
    allowed: &[&str],
    path: Path<'_>,
) -> Result<()> {
    match map.keys().find(|field| !allowed.contains(&field.as_str())) {
        Some(field) => Err(ValidationError::new(
            path.field(field),
            format!("unknown field; expected one of: {}", allowed.join(", ")),
        )),
        None => Ok(()),
    }
}

pub(crate) fn optional_string(
    map: &Map<String, Value>,
    field: &str,
    path: Path<'_>,
) -> Result<Option<String>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(ValidationError::new(path.field(field), "must be a string")),
    }
}

pub(crate) fn optional_bool(
    map: &Map<String, Value>,
    field: &str,
    path: Path<'_>,
) -> Result<Option<bool>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(flag)) => Ok(Some(*flag)),
        Some(_) => Err(ValidationError::new(
            path.field(field),
            "must be true or false",
        )),
    }
}

pub(crate) fn key_field(map: &Map<String, Value>, field: &str, path: Path<'_>) -> Result<String> {
    let key = optional_string(map, field, path)?
        .ok_or_else(|| ValidationError::new(path.field(field), "is required"))?;
    if !is_valid_key(&key) {
        return Err(ValidationError::new(
            path.field(field),
            format!("\"{key}\" is not a valid key (1 to 128 letters, digits, '-', '_' or '.')"),
        ));
    }
    Ok(key)
}

pub(crate) fn string_list(value: Option<&Value>, path: Path<'_>) -> Result<Vec<String>> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(index, item)| match item {
                Value::String(text) => Ok(text.clone()),
                Value::Number(number) => Ok(number.to_string()),
                _ => Err(ValidationError::new(path.index(index), "must be a string")),
            })
            .collect(),
        Some(_) => Err(ValidationError::new(path, "must be an array of strings")),
    }
}
