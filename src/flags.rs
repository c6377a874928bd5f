//! The validators behind every write of flags and segments. put_flag and the
//! BEFORE triggers on the tables call them, so one piece of code decides what
//! a valid document is, whichever way it arrives.

use pgrx::prelude::*;
use pgrx::JsonB;

use crate::postgres::jsonb::DocumentArg;
use serde_json::{json, Map, Value};

use crate::errors::invalid_parameter;
use flagship_engine::bucketing::Profile;
use flagship_engine::merge_patch::merge_patch;
use flagship_engine::rules::condition_documents::check_value_depth;
use flagship_engine::rules::document::{parse_flag_document, parse_segment};
use flagship_engine::rules::environment_config::parse_environment_config;
use flagship_engine::rules::{Path, ValidationError, ROOT};

fn refuse(subject: &str, key: Option<&str>, error: ValidationError) -> ! {
    let hint = error
        .message
        .contains("unknown operator")
        .then_some("see the list of condition operators in the README");
    match key {
        Some(key) => invalid_parameter(format!("{subject} \"{key}\": {error}"), hint),
        None => invalid_parameter(format!("{subject}: {error}"), hint),
    }
}

fn document_key(document: &Value) -> Option<&str> {
    document.get("key").and_then(Value::as_str)
}

/// Validates a flag document (environments included) and returns its
/// flag-level fields with every default filled in. Raises 22023 naming the
/// offending field.
#[pg_extern(immutable, parallel_safe)]
pub fn validate_flag(definition: DocumentArg) -> JsonB {
    let document = definition.value("flag");
    let parsed = parse_flag_document(&document)
        .unwrap_or_else(|error| refuse("flag", document_key(&document), error));
    let flag = parsed.flag;
    let variants: Map<String, Value> = flag.variants.into_iter().collect();
    let prerequisites: Vec<Value> = flag
        .prerequisites
        .iter()
        .map(|p| match p.variants.as_slice() {
            [single] => json!({"flag": p.flag, "variant": single}),
            several => json!({"flag": p.flag, "variants": several}),
        })
        .collect();
    JsonB(json!({
        "key": flag.key,
        "kind": flag.kind.as_str(),
        "name": flag.name,
        "description": flag.description,
        "variants": variants,
        "off_variant": flag.off_variant,
        "prerequisites": prerequisites,
        "salt": flag.salt,
        "bucketing": flag.bucketing.map(|profile| profile.as_str()),
        "archived": flag.archived,
    }))
}

/// Validates one environment's configuration of a flag against its
/// variants, with FlagShip's own bucketing. Kept with its 0.1.0 signature:
/// until `ALTER EXTENSION flagship UPDATE` runs, 0.1.0's triggers call it
/// from the new library.
#[pg_extern(immutable, parallel_safe)]
pub fn validate_flag_environment(
    flag_key: &str,
    variants: DocumentArg,
    environment_key: &str,
    config: DocumentArg,
) -> bool {
    validate_flag_config(flag_key, variants, None, environment_key, config)
}

/// Validates one environment's configuration of a flag against its
/// variants and bucketing profile (NULL: xxh3). Raises 22023 naming the
/// offending field.
#[pg_extern(immutable, parallel_safe)]
pub fn validate_flag_config(
    flag_key: &str,
    variants: DocumentArg,
    bucketing: Option<&str>,
    environment_key: &str,
    config: DocumentArg,
) -> bool {
    let subject = format!("flag \"{flag_key}\"");
    let bucketing = match bucketing {
        None => Profile::default(),
        Some(name) => Profile::parse_named(name).unwrap_or_else(|message| {
            refuse(
                "flag",
                Some(flag_key),
                ValidationError::new("bucketing", message),
            )
        }),
    };
    let mut variants: Vec<(String, Value)> = match variants.value(&format!("{subject}: variants")) {
        Value::Object(map) => map.into_iter().collect(),
        _ => invalid_parameter(
            format!("flag \"{flag_key}\": variants must be an object"),
            None,
        ),
    };
    variants.sort_by(|a, b| a.0.cmp(&b.0));
    let path = format!("environments.{environment_key}");
    let config = config.value(&format!("{subject}: {path}"));
    parse_environment_config(&config, &variants, bucketing, Path::Text(&path))
        .unwrap_or_else(|error| refuse("flag", Some(flag_key), error));
    true
}

/// Validates a segment document. Raises 22023 naming the offending field.
#[pg_extern(immutable, parallel_safe)]
pub fn validate_segment(definition: DocumentArg) -> bool {
    let document = definition.value("segment");
    parse_segment(&document)
        .unwrap_or_else(|error| refuse("segment", document_key(&document), error));
    true
}

/// `target` with the JSON Merge Patch (RFC 7396) `patch` applied: what
/// `flagship.patch_flag` writes back.
#[pg_extern(immutable, parallel_safe, strict)]
pub fn json_merge_patch(target: DocumentArg, patch: DocumentArg) -> JsonB {
    JsonB(merge_patch(target.value("target"), &patch.value("patch")))
}

/// Raises 22023 naming `field` unless `value` is a stored value FlagShip can
/// load back: at most `MAX_VALUE_DEPTH` levels deep, numbers that fit a
/// double. CHECK constraints call it (customer attributes), so plain SQL
/// writes meet the same limit as the put_ functions.
#[pg_extern(immutable, parallel_safe, strict)]
pub fn check_stored_value(field: &str, value: DocumentArg) -> bool {
    let document = value.value(field);
    check_value_depth(&document, ROOT)
        .unwrap_or_else(|error| invalid_parameter(format!("{field}: {}", error.message), None));
    true
}
